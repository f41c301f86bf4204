//! Running untrusted Python (model-written programs) with bounded harm.
//!
//! Each program runs under `python3 -I -B` with a cleared environment, in a
//! sandbox built with Linux namespaces between fork and exec (see [`Sandbox::run`]):
//! - a user namespace with only the caller's uid mapped (`nobody` when claw runs
//!   as root: the kernel exempts root from the process limit, and nobody cannot
//!   write root's files; the interpreter must then be one that nobody can
//!   execute: pyenv's under /root is not, /usr/bin/python3 is used);
//! - its own PID namespace, whose init is the program: when it ends or is
//!   killed, the kernel kills everything it started (a `setsid` daemon too),
//!   and `kill(-1)` reaches only its own processes;
//! - its own mount namespace whose root is an empty read-only tmpfs showing,
//!   read-only, only the system directories (`/usr`, `/lib*`, `/bin`, `/sbin`)
//!   and the interpreter's own directories, a few device nodes (`/dev/null`,
//!   `zero`, `full`, `random`, `urandom`), and a private tmpfs for each of
//!   `/tmp` (its working directory and HOME), `/var/tmp` and `/dev/shm`. No
//!   `/proc`, `/etc`, home, data directory or other program is visible;
//! - its own network (only a downed loopback) and IPC namespaces: no network,
//!   no abstract Unix sockets, and no path to a host socket;
//! - rlimits: CPU seconds, address space (memory), processes (a fork bomb hits
//!   it), file size (output files too; each tmpfs is as large), open files, no
//!   core dumps; `no_new_privs`; the parent dying kills it (`PR_SET_PDEATHSIG`).
//!
//! The namespaces are set up with raw system calls rather than by running
//! util-linux `unshare` or bubblewrap: neither is everywhere (`unshare` alone
//! cannot build the mount view), and the steps are few enough to keep in one
//! place here.
//!
//! Where the kernel gives no unprivileged user namespaces the sandbox refuses
//! to start, unless told to run without (`allow_unsandboxed`): programs then get
//! only the rlimits, their own process group and a fresh directory.
//!
//! The verdict comes from a harness (fixed Python, `harness.py`, run with `-c`),
//! never from the exit status: it writes a random nonce, which claw sent it
//! through a pipe, to a file the program never sees by name, and only then.
//! - [`Sandbox::run`] runs a program as `__main__` and passes it if it runs to
//!   its end: exiting early (`os._exit(0)`, `SystemExit`) or printing a marker
//!   of its own fails. The nonce is in the program's own process, so code
//!   built to inspect the harness's frames could find it: this says "it ran
//!   to its end", not more.
//! - [`Sandbox::check`] is for a verdict worth forging (HumanEval's pass@k):
//!   the untrusted candidate runs in its own process, which never holds the
//!   nonce; the trusted test code runs in the harness's process (undumpable,
//!   so the candidate cannot ptrace it or read its memory) and calls the
//!   candidate's function through pipes, its arguments and results crossing
//!   as plain values rebuilt by a parser that evaluates nothing. An object
//!   whose `__eq__` always says True, or code that walks the frames, gets
//!   nothing to forge with.

mod namespaces;

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use namespaces::{check, keep_only, set_limits, view, Plan, Shown, NOBODY};
pub use namespaces::{namespaces_available, Limits};

/// The fixed Python every program runs under (see its header).
const HARNESS: &str = include_str!("harness.py");

/// How a program ended.
#[derive(Clone, Debug, PartialEq)]
pub struct RunResult {
    /// Ran to its end (the harness's nonce came back), exited with status 0,
    /// within the time limit.
    pub passed: bool,
    /// The harness saw the program's end (whatever happened afterwards).
    pub completed: bool,
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
            (Some(0), _) if !self.completed => {
                "exited with status 0 before its end (its tests did not all run)".to_string()
            }
            (Some(code), _) if last.is_empty() => format!("exit status {code}"),
            _ => last,
        })
    }
}

/// A program judged by its tests, for [`Sandbox::check`]: HumanEval's shape.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct CheckedProgram {
    /// The untrusted module (a problem's prompt and a model's completion),
    /// run in its own process.
    pub candidate: String,
    /// Trusted code run before the tests, beside them (the prompt, for the
    /// helpers it defines that the tests use).
    pub prelude: String,
    /// Trusted code defining `check(candidate)`.
    pub test: String,
    /// The candidate's function the tests call.
    pub entry_point: String,
}

/// What the sandbox runs: a plain program ([`Sandbox::run`]) or a checked one
/// ([`Sandbox::check`]).
pub trait Program: Sync {
    fn run_in(&self, sandbox: &Sandbox) -> Result<RunResult>;
}

impl Program for String {
    fn run_in(&self, sandbox: &Sandbox) -> Result<RunResult> {
        sandbox.run(self)
    }
}

impl Program for CheckedProgram {
    fn run_in(&self, sandbox: &Sandbox) -> Result<RunResult> {
        sandbox.check(self)
    }
}

/// A way to run Python programs in isolation (see the module docs).
#[derive(Clone, Debug)]
pub struct Sandbox {
    python: PathBuf,
    limits: Limits,
    /// Namespaces in use (false only when allowed to run without).
    isolated: bool,
    /// The (uid, gid) programs run as, when claw runs as root.
    user: Option<(u32, u32)>,
    /// What of the host the program sees (namespaced runs).
    view: Vec<Shown>,
    /// Where each run's scratch directory goes.
    temp_base: PathBuf,
}

/// Interpreters to fall back on when the given one is not executable by `nobody`.
const SYSTEM_PYTHONS: [&str; 2] = ["/usr/bin/python3", "/usr/local/bin/python3"];

static RUN_COUNTER: AtomicU64 = AtomicU64::new(0);
const TAIL_BYTES: u64 = 4096;

/// Whether programs run in the namespaces, given whether they can be made
/// here: without them, only when allowed, else a refusal that says what to do.
fn isolation(available: Result<()>, allow_unsandboxed: bool) -> Result<bool> {
    match available {
        Ok(()) => Ok(true),
        Err(e) if allow_unsandboxed => {
            crate::warn!(
                "no user namespaces here ({e:#}): programs run WITHOUT the sandbox, with \
                 only rlimits, this machine's files and network (--unsafe-no-sandbox)"
            );
            Ok(false)
        }
        Err(e) => bail!(
            "cannot sandbox programs here: no user namespaces ({e:#}). The sandbox needs \
             unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, or \
             user.max_user_namespaces > 0; in a container, one allowed to create them); \
             --unsafe-no-sandbox runs the programs with only rlimits, on this machine's \
             files and network (only for code you trust)"
        ),
    }
}

impl Sandbox {
    /// Finds the interpreter (`python`, e.g. "python3", looked up on PATH) and
    /// checks that the sandbox works here. Without user namespaces it fails,
    /// unless `allow_unsandboxed` is set, in which case programs run with only
    /// the rlimits (and this machine's files and network).
    pub fn new(python: &str, limits: Limits, allow_unsandboxed: bool) -> Result<Self> {
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
        // The interpreter's directory without symlinks above it, so that the
        // path exists in the sandbox's view (which shows canonical paths).
        if let (Some(dir), Some(name)) = (resolved.parent(), resolved.file_name()) {
            if let Ok(dir) = dir.canonicalize() {
                resolved = dir.join(name);
            }
        }
        let temp_base = {
            let t = std::env::temp_dir();
            // the sandbox's user must reach its mount point under it
            if user.is_none() || world_executable(&t) {
                t
            } else {
                PathBuf::from("/tmp")
            }
        };
        let mut sandbox = Sandbox {
            python: resolved,
            limits,
            isolated: true,
            user,
            view: Vec::new(),
            temp_base,
        };
        sandbox.isolated = isolation(namespaces_available(), allow_unsandboxed)?;
        if sandbox.isolated {
            sandbox.view = view(&sandbox.python)?;
        }
        let plain = sandbox
            .run("import socket, tempfile\n")
            .context("the sandbox cannot start")?;
        let checked = sandbox
            .check(&CheckedProgram {
                candidate: "def echo(x):\n    return x\n".into(),
                prelude: String::new(),
                test: "def check(candidate):\n    assert candidate([1.5, 'a']) == [1.5, 'a']\n"
                    .into(),
                entry_point: "echo".into(),
            })
            .context("the sandbox cannot start")?;
        for r in [plain, checked] {
            anyhow::ensure!(
                r.passed,
                "the sandbox cannot run Python {}: {}",
                sandbox.python.display(),
                r.failure().unwrap_or_default()
            );
        }
        Ok(sandbox)
    }

    /// Whether programs run in the namespaces (false only when allowed without).
    pub fn isolated(&self) -> bool {
        self.isolated
    }

    /// The interpreter programs run with.
    pub fn python(&self) -> &Path {
        &self.python
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Runs `program` (Python source) to its end. An `Err` means the sandbox
    /// itself failed (no temp dir, cannot spawn); a failing program is an `Ok`
    /// that did not pass.
    pub fn run(&self, program: &str) -> Result<RunResult> {
        self.launch("program", program.as_bytes())
    }

    /// Runs `program`'s tests against its candidate, each in its own process
    /// (see the module docs): passes only if `check(candidate)` returns.
    pub fn check(&self, program: &CheckedProgram) -> Result<RunResult> {
        let job = serde_json::to_vec(program).context("cannot encode the program")?;
        self.launch("check", &job)
    }

    /// Runs the harness in `mode` with `input` on its stdin.
    fn launch(&self, mode: &str, input: &[u8]) -> Result<RunResult> {
        let dir = TempDir::new(&self.temp_base, self.user)?;
        // Scratch files, unlinked as soon as they are open: the program reaches
        // them only through the descriptors it is given.
        let mut source = dir.scratch("input")?;
        source
            .write_all(input)
            .and_then(|()| source.seek(SeekFrom::Start(0)).map(drop))
            .context("cannot write the program to the sandbox's scratch file")?;
        let stdout = dir.scratch("stdout")?;
        let stderr = dir.scratch("stderr")?;
        let verdict = dir.scratch("verdict")?;
        let nonce = nonce();
        let (nonce_read, mut nonce_write) =
            std::io::pipe().context("cannot make a pipe for the sandbox")?;
        nonce_write
            .write_all(nonce.as_bytes())
            .context("cannot write the sandbox's nonce")?;
        drop(nonce_write);
        let inherit = [nonce_read.as_raw_fd(), verdict.as_raw_fd()];

        let mut cmd = Command::new(&self.python);
        cmd.args(["-I", "-B", "-c", HARNESS, mode])
            .args(inherit.map(|fd| fd.to_string()))
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::from(source))
            .stdout(Stdio::from(stdout.try_clone()?))
            .stderr(Stdio::from(stderr.try_clone()?))
            .process_group(0);
        let limits = self.limits.clone();
        let user = self.user;
        if self.isolated {
            cmd.env("HOME", "/tmp").env("TMPDIR", "/tmp");
            let root = dir.path.join("root");
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&root)
                .with_context(|| format!("cannot create {}", root.display()))?;
            if let Some((uid, gid)) = user {
                std::os::unix::fs::chown(&root, Some(uid), Some(gid))
                    .with_context(|| format!("cannot hand {} to uid {uid}", root.display()))?;
            }
            let plan = Plan::new(&root, &self.view, &limits, user, inherit)?;
            // SAFETY: runs in the forked child before exec; `Plan::enter` makes
            // only raw system calls and allocates nothing.
            unsafe { cmd.pre_exec(move || plan.enter()) };
        } else {
            let work = dir.path.join("work");
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&work)
                .with_context(|| format!("cannot create {}", work.display()))?;
            if let Some((uid, gid)) = user {
                std::os::unix::fs::chown(&work, Some(uid), Some(gid))
                    .with_context(|| format!("cannot hand {} to uid {uid}", work.display()))?;
            }
            cmd.current_dir(&work)
                .env("HOME", &work)
                .env("TMPDIR", &work);
            // SAFETY: runs in the forked child before exec; raw system calls only.
            unsafe {
                cmd.pre_exec(move || {
                    if let Some((uid, gid)) = user {
                        check(libc::setgroups(0, std::ptr::null()), b"setgroups")?;
                        check(libc::setgid(gid), b"setgid")?;
                        check(libc::setuid(uid), b"setuid")?;
                    }
                    set_limits(&limits)?;
                    keep_only(&inherit)?;
                    // (after setuid, which clears it)
                    check(
                        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL),
                        b"PR_SET_PDEATHSIG",
                    )
                });
            }
        }
        let start = Instant::now();
        let spawned = cmd.spawn();
        drop(cmd); // our copies of the child's descriptors
        drop(nonce_read);
        let mut child = spawned.with_context(|| {
            let why = tail(&stderr);
            format!(
                "cannot start {} in the sandbox{}{}",
                self.python.display(),
                if self.isolated { " (namespaces)" } else { "" },
                if why.trim().is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", why.trim())
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
        // The leader is not reaped yet, so its pid (the group id) cannot be
        // reused: this reaches the program's init and whatever stayed in its
        // group; the rest of its PID namespace dies with its init.
        // SAFETY: plain system call.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        let status = child.wait().context("waiting for the sandboxed program")?;
        let seconds = start.elapsed().as_secs_f64();
        let mut mark = [0u8; 64];
        let n = verdict.read_at(&mut mark, 0).unwrap_or(0);
        let completed = &mark[..n] == nonce.as_bytes();
        use std::os::unix::process::ExitStatusExt;
        Ok(RunResult {
            passed: completed && !timed_out && status.success(),
            completed,
            timed_out,
            exit_code: status.code(),
            signal: status.signal(),
            stdout: tail(&stdout),
            stderr: tail(&stderr),
            seconds,
        })
    }
}

/// 128 random bits, hex.
fn nonce() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
fn tail(f: &fs::File) -> String {
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(TAIL_BYTES);
    let mut buf = vec![0; (len - start) as usize];
    let n = f.read_at(&mut buf, start).unwrap_or(0);
    buf.truncate(n);
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

/// A private (0700) directory under `base`, owned by the sandbox's user when
/// it has one, removed on drop.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new(base: &Path, owner: Option<(u32, u32)>) -> Result<Self> {
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

    /// A new file only this process can open (0600, by claw's user), already
    /// unlinked.
    fn scratch(&self, name: &str) -> Result<fs::File> {
        let path = self.path.join(name);
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        Ok(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            crate::debug!("cannot remove {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests;
