//! Running untrusted Python (model-written programs) with bounded harm.
//!
//! Each program runs in its own `python3 -I -B` process, in a fresh directory
//! that is removed afterwards, with a cleared environment and these limits, set
//! in the child between fork and exec:
//! - when claw runs as root, the program runs as `nobody` (uid and gid 65534,
//!   no supplementary groups): the kernel exempts root from the process limit,
//!   and nobody cannot write root's files. The interpreter must then be one that
//!   nobody can execute (pyenv's under /root is not; /usr/bin/python3 is used);
//! - its own process group, killed as a whole (SIGKILL) when the wall-clock
//!   timeout passes and again after the program exits (so no child survives it);
//! - no network: a new user and network namespace (only a downed loopback
//!   device), where the kernel allows unprivileged namespaces. Without them the
//!   sandbox refuses to start unless told to run without (`allow_network`);
//! - rlimits: CPU seconds, address space (memory), processes (a fork bomb hits
//!   it; the count is per user namespace, so it covers only the sandbox), file
//!   size (output files too), open files, no core dumps;
//! - the parent dying kills it (`PR_SET_PDEATHSIG`).
//!
//! Not a security boundary against a determined attacker (the file system is
//! visible, read-only or not as for the user running claw): it keeps
//! benchmark programs that loop, fork, allocate or phone home from hurting the
//! machine or the results.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Limits for one program.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Wall-clock time before the process group is killed.
    pub timeout: Duration,
    /// Address space (RLIMIT_AS), bytes.
    pub memory_bytes: u64,
    /// Processes the program may have at once (RLIMIT_NPROC, within its namespace).
    pub processes: u64,
    /// Largest file it may write (RLIMIT_FSIZE), bytes; stdout and stderr too.
    pub file_bytes: u64,
    /// Open files (RLIMIT_NOFILE).
    pub open_files: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Duration::from_secs(10),
            memory_bytes: 1 << 30,
            processes: 16,
            file_bytes: 16 << 20,
            open_files: 64,
        }
    }
}

/// How a program ended.
#[derive(Clone, Debug, PartialEq)]
pub struct RunResult {
    /// Exited with status 0 within the time limit.
    pub passed: bool,
    pub timed_out: bool,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// The last few KB of stdout and stderr.
    pub stdout: String,
    pub stderr: String,
    pub seconds: f64,
}

impl RunResult {
    /// One line on why it failed (None when it passed).
    pub fn failure(&self) -> Option<String> {
        if self.passed {
            return None;
        }
        if self.timed_out {
            return Some("timed out".to_string());
        }
        let last = self
            .stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
            .to_string();
        Some(match (self.exit_code, self.signal) {
            (_, Some(sig)) if last.is_empty() => format!("killed by signal {sig}"),
            (_, Some(sig)) => format!("killed by signal {sig}: {last}"),
            (Some(code), _) if last.is_empty() => format!("exit status {code}"),
            _ => last,
        })
    }
}

/// A way to run Python programs in isolation (see the module docs).
#[derive(Clone, Debug)]
pub struct Sandbox {
    python: PathBuf,
    limits: Limits,
    network_isolated: bool,
    /// The (uid, gid) programs run as, when claw runs as root.
    user: Option<(u32, u32)>,
}

/// `nobody`: who programs run as when claw runs as root.
const NOBODY: (u32, u32) = (65534, 65534);

/// Interpreters to fall back on when the given one is not executable by `nobody`.
const SYSTEM_PYTHONS: [&str; 2] = ["/usr/bin/python3", "/usr/local/bin/python3"];

static RUN_COUNTER: AtomicU64 = AtomicU64::new(0);
const TAIL_BYTES: u64 = 4096;

impl Sandbox {
    /// Finds the interpreter (`python`, e.g. "python3", looked up on PATH) and
    /// checks that namespaces work here. Without them it fails, unless
    /// `allow_network` is set, in which case programs run with the machine's
    /// network.
    pub fn new(python: &str, limits: Limits, allow_network: bool) -> Result<Self> {
        anyhow::ensure!(
            !limits.timeout.is_zero(),
            "the sandbox timeout must be positive"
        );
        // Resolve the real interpreter once (PATH shims such as pyenv's need an
        // environment the sandbox does not give them).
        let output = Command::new(python)
            .args(["-c", "import sys; print(sys.executable)"])
            .stdin(Stdio::null())
            .output()
            .with_context(|| {
                format!("cannot run `{python}`: the humaneval benchmark needs Python 3 (pass --python PATH)")
            })?;
        anyhow::ensure!(
            output.status.success(),
            "`{python}` failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        let mut resolved = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        anyhow::ensure!(
            resolved.is_file(),
            "`{python}` reports its executable as `{}`, which does not exist",
            resolved.display()
        );
        // SAFETY: plain system call.
        let user = (unsafe { libc::geteuid() } == 0).then_some(NOBODY);
        if user.is_some() && !world_executable(&resolved) {
            let fallback = SYSTEM_PYTHONS
                .iter()
                .map(PathBuf::from)
                .find(|p| world_executable(p))
                .with_context(|| {
                    format!(
                        "{} is not executable by `nobody`, whom programs run as when claw runs \
                         as root; pass --python with an interpreter outside /root \
                         (e.g. /usr/bin/python3)",
                        resolved.display()
                    )
                })?;
            crate::debug!(
                "{} is not executable by `nobody`: the sandbox uses {}",
                resolved.display(),
                fallback.display()
            );
            resolved = fallback;
        }
        let mut sandbox = Sandbox {
            python: resolved,
            limits,
            network_isolated: true,
            user,
        };
        let probe = sandbox.run("import socket\n");
        match probe {
            Ok(r) if r.passed => {}
            Ok(r) => bail!(
                "the sandbox cannot run Python: {}",
                r.failure().unwrap_or_default()
            ),
            Err(e) if allow_network => {
                crate::warn!(
                    "no network namespace ({e:#}): programs run with this machine's network \
                     (--unsafe-no-netns)"
                );
                sandbox.network_isolated = false;
                let r = sandbox.run("pass\n")?;
                anyhow::ensure!(r.passed, "the sandbox cannot run Python: {:?}", r.failure());
            }
            Err(e) => bail!(
                "cannot cut programs off the network here: {e:#}. Unprivileged user \
                 namespaces are needed (sysctl kernel.unprivileged_userns_clone=1, or \
                 user.max_user_namespaces > 0); --unsafe-no-netns runs the programs with \
                 the network instead"
            ),
        }
        Ok(sandbox)
    }

    pub fn network_isolated(&self) -> bool {
        self.network_isolated
    }

    /// The interpreter programs run with.
    pub fn python(&self) -> &Path {
        &self.python
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Runs `program` (Python source). An `Err` means the sandbox itself failed
    /// (no temp dir, cannot spawn); a failing program is an `Ok` that did not pass.
    pub fn run(&self, program: &str) -> Result<RunResult> {
        let dir = TempDir::new(self.user)?;
        let script = dir.path.join("program.py");
        fs::write(&script, program)
            .with_context(|| format!("cannot write {}", script.display()))?;
        let stdout_path = dir.path.join("stdout");
        let stderr_path = dir.path.join("stderr");
        let stdout = fs::File::create(&stdout_path)?;
        let stderr = fs::File::create(&stderr_path)?;

        let mut cmd = Command::new(&self.python);
        cmd.args(["-I", "-B", "program.py"])
            .current_dir(&dir.path)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", &dir.path)
            .env("TMPDIR", &dir.path)
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0);
        let limits = self.limits.clone();
        let isolate = self.network_isolated;
        let user = self.user;
        let cpu = limits.timeout.as_secs() + 1;
        // SAFETY: runs in the forked child before exec; it only makes raw system
        // calls (setuid, unshare, setrlimit, prctl) and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                let check = |rc: libc::c_int| {
                    if rc != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                };
                if let Some((uid, gid)) = user {
                    check(libc::setgroups(0, std::ptr::null()))?;
                    check(libc::setgid(gid))?;
                    check(libc::setuid(uid))?;
                }
                if isolate && libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // After unshare: RLIMIT_NPROC then counts this namespace's processes.
                let set = |resource, value: u64| {
                    let lim = libc::rlimit {
                        rlim_cur: value as libc::rlim_t,
                        rlim_max: value as libc::rlim_t,
                    };
                    if libc::setrlimit(resource, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                };
                set(libc::RLIMIT_CPU, cpu)?;
                set(libc::RLIMIT_AS, limits.memory_bytes)?;
                set(libc::RLIMIT_NPROC, limits.processes)?;
                set(libc::RLIMIT_FSIZE, limits.file_bytes)?;
                set(libc::RLIMIT_NOFILE, limits.open_files)?;
                set(libc::RLIMIT_CORE, 0)?;
                // (after setuid, which clears it)
                check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))
            });
        }
        let start = Instant::now();
        let mut child = cmd.spawn().with_context(|| {
            format!(
                "cannot start {} in the sandbox{}",
                self.python.display(),
                if isolate {
                    " (a new user and network namespace)"
                } else {
                    ""
                }
            )
        })?;
        let pid = child.id() as libc::pid_t;
        let deadline = start + self.limits.timeout;
        let mut timed_out = false;
        loop {
            if exited_unreaped(pid)? {
                break;
            }
            if Instant::now() >= deadline {
                timed_out = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // The leader is not reaped yet, so its pid (the group id) cannot be reused:
        // killing the group reaches exactly the program and whatever it spawned.
        // SAFETY: plain system call.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        let status = child.wait().context("waiting for the sandboxed program")?;
        let seconds = start.elapsed().as_secs_f64();
        use std::os::unix::process::ExitStatusExt;
        Ok(RunResult {
            passed: !timed_out && status.success(),
            timed_out,
            exit_code: status.code(),
            signal: status.signal(),
            stdout: tail(&stdout_path),
            stderr: tail(&stderr_path),
            seconds,
        })
    }
}

/// Whether `pid` has exited, without reaping it.
fn exited_unreaped(pid: libc::pid_t) -> Result<bool> {
    // SAFETY: siginfo_t is plain data; waitid fills it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() == std::io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(err).context("waitid on the sandboxed program");
    }
    // SAFETY: si_pid is valid to read after a successful waitid.
    Ok(unsafe { info.si_pid() } != 0)
}

/// The last [`TAIL_BYTES`] of a file, lossily decoded.
fn tail(path: &Path) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)));
    let mut buf = Vec::new();
    let _ = f.take(TAIL_BYTES).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Whether `path` and every directory above it can be traversed/executed by others.
fn world_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Ok(path) = path.canonicalize() else {
        return false;
    };
    path.ancestors()
        .all(|p| fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
}

/// A private (0700) directory under the system temp dir, owned by the
/// sandbox's user when it has one, removed on drop.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new(owner: Option<(u32, u32)>) -> Result<Self> {
        let base = std::env::temp_dir();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        for attempt in 0..100u32 {
            let n = RUN_COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!(
                "claw-sandbox-{}-{n}-{nanos:x}-{attempt}",
                std::process::id()
            ));
            match fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {
                    let dir = TempDir { path };
                    if let Some((uid, gid)) = owner {
                        std::os::unix::fs::chown(&dir.path, Some(uid), Some(gid)).with_context(
                            || format!("cannot hand {} to uid {uid}", dir.path.display()),
                        )?;
                    }
                    return Ok(dir);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot create a directory in {}", base.display())
                    })
                }
            }
        }
        bail!("cannot create a fresh directory in {}", base.display())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            crate::debug!("cannot remove {}: {e}", self.path.display());
        }
    }
}
