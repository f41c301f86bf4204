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
//! A program passes only if it runs to its end: a harness (fixed Python, run
//! with `-c`) reads the program's source from stdin, runs it as `__main__`, and
//! only when it returns writes a random nonce, which it read from a pipe before
//! the program started, to a file the program never sees by name. Exiting early
//! (`os._exit(0)`, `SystemExit`) or printing a marker of its own therefore fails.
//! Code written to inspect the harness's own frames could still find the nonce:
//! the bar is against programs that stop before their tests, not against a
//! program built to attack this harness.

use std::ffi::CString;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Limits for one program.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Wall-clock time before the program is killed.
    pub timeout: Duration,
    /// Address space (RLIMIT_AS), bytes.
    pub memory_bytes: u64,
    /// Processes the program may have at once (RLIMIT_NPROC, within its namespace).
    pub processes: u64,
    /// Largest file it may write (RLIMIT_FSIZE), bytes; stdout and stderr too,
    /// and the size of each of its private tmpfs.
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

/// One host path shown inside the sandbox, at the same path.
#[derive(Clone, Debug)]
enum Shown {
    /// A directory or file, read-only; `keep` holds the mount flags the host
    /// mount has that a read-only remount must keep (the kernel refuses to
    /// drop them in a user namespace).
    ReadOnly {
        path: PathBuf,
        dir: bool,
        keep: libc::c_ulong,
    },
    /// A device node, as it is.
    Device(PathBuf),
    /// A symbolic link such as `/lib -> usr/lib`.
    Link { path: PathBuf, target: PathBuf },
    /// A private tmpfs.
    Tmpfs(PathBuf),
}

/// `nobody`: who programs run as when claw runs as root.
const NOBODY: (u32, u32) = (65534, 65534);

/// Interpreters to fall back on when the given one is not executable by `nobody`.
const SYSTEM_PYTHONS: [&str; 2] = ["/usr/bin/python3", "/usr/local/bin/python3"];

/// Top-level system directories (or merged-/usr links) a Python needs.
const SYSTEM_DIRS: [&str; 7] = [
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
];

const DEVICES: [&str; 5] = [
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// The namespaces a program gets.
const NAMESPACES: libc::c_int = libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS;

/// Runs the program (source on stdin) as `__main__`; writes the nonce (read
/// from fd argv[1]) to fd argv[2] only when the program has run to its end.
const HARNESS: &str = r#"import os, sys
def _claw_harness():
    nonce_fd, verdict_fd = int(sys.argv[1]), int(sys.argv[2])
    nonce = os.read(nonce_fd, 256)
    os.close(nonce_fd)
    chunks = []
    while True:
        chunk = os.read(0, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    source = b"".join(chunks)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    import linecache, traceback, types
    def excepthook(kind, value, tb):
        while tb is not None and tb.tb_frame.f_code.co_filename != "program.py":
            tb = tb.tb_next
        traceback.print_exception(kind, value, tb)
    sys.excepthook = excepthook
    text = source.decode("utf-8", "replace")
    linecache.cache["program.py"] = (len(text), None, text.splitlines(True), "program.py")
    main = types.ModuleType("__main__")
    main.__file__ = "program.py"
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    sys.argv = ["program.py"]
    code = compile(source, "program.py", "exec")
    del chunks, source, text
    exec(code, main.__dict__)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os.write(verdict_fd, nonce)
    os._exit(0)
_claw_harness()
"#;

static RUN_COUNTER: AtomicU64 = AtomicU64::new(0);
const TAIL_BYTES: u64 = 4096;

/// Whether this process may create the namespaces the sandbox uses (as
/// `nobody` when it is root). Tried in a forked child that only unshares.
pub fn namespaces_available() -> Result<()> {
    // SAFETY: plain system call.
    let user = (unsafe { libc::geteuid() } == 0).then_some(NOBODY);
    // SAFETY: the child makes only raw system calls (async-signal-safe) and _exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("fork");
    }
    if pid == 0 {
        unsafe {
            if let Some((uid, gid)) = user {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    libc::_exit(200);
                }
            }
            if libc::unshare(NAMESPACES) != 0 {
                let errno = *libc::__errno_location();
                libc::_exit(errno.clamp(1, 199));
            }
            libc::_exit(0);
        }
    }
    let mut status = 0;
    loop {
        // SAFETY: plain system call on our own child.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == pid {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err).context("waitpid");
        }
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        255
    };
    match code {
        0 => Ok(()),
        200 => bail!("cannot switch to uid {} (nobody)", NOBODY.0),
        errno if errno < 200 => Err(std::io::Error::from_raw_os_error(errno))
            .context("unshare(user, mount, pid, network, ipc, uts namespaces)"),
        _ => bail!("the namespace probe died"),
    }
}

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
        let r = sandbox
            .run("import socket, tempfile\n")
            .context("the sandbox cannot start")?;
        anyhow::ensure!(
            r.passed,
            "the sandbox cannot run Python {}: {}",
            sandbox.python.display(),
            r.failure().unwrap_or_default()
        );
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

    /// Runs `program` (Python source). An `Err` means the sandbox itself failed
    /// (no temp dir, cannot spawn); a failing program is an `Ok` that did not pass.
    pub fn run(&self, program: &str) -> Result<RunResult> {
        let dir = TempDir::new(&self.temp_base, self.user)?;
        // Scratch files, unlinked as soon as they are open: the program reaches
        // them only through the descriptors it is given.
        let mut source = dir.scratch("program.py")?;
        source
            .write_all(program.as_bytes())
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
        cmd.args(["-I", "-B", "-c", HARNESS])
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

/// What of the host a program sees: the system directories, the interpreter's
/// own directories (asked of it), device nodes and private temp dirs.
fn view(python: &Path) -> Result<Vec<Shown>> {
    let probe = "import json, os, sys, sysconfig\n\
        paths = [os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable))]\n\
        paths += [sysconfig.get_paths().get(k) for k in ('stdlib', 'platstdlib', 'purelib', 'platlib')]\n\
        paths += [sysconfig.get_config_var('LIBDIR'), os.path.join(sys.prefix, 'pyvenv.cfg')]\n\
        paths += sys.path\n\
        print(json.dumps([p for p in paths if p]))\n";
    let out = Command::new(python)
        .args(["-I", "-c", probe])
        .env_clear()
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} failed to list its directories: {}",
        python.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let python_paths: Vec<String> = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{} listed its directories unreadably", python.display()))?;

    let mut shown = Vec::new();
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut add = |path: &Path, shown: &mut Vec<Shown>| -> Result<()> {
        let Ok(meta) = fs::metadata(path) else {
            return Ok(()); // absent (e.g. python311.zip): nothing to show
        };
        if dirs.iter().any(|d| path.starts_with(d)) || path == Path::new("/") {
            return Ok(());
        }
        let dir = meta.is_dir();
        if dir {
            dirs.push(path.to_path_buf());
        } else if !meta.is_file() {
            return Ok(());
        }
        shown.push(Shown::ReadOnly {
            path: path.to_path_buf(),
            dir,
            keep: mount_flags(path)?,
        });
        Ok(())
    };
    for top in SYSTEM_DIRS {
        let path = Path::new(top);
        match fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = fs::read_link(path)
                    .with_context(|| format!("cannot read the link {}", path.display()))?;
                shown.push(Shown::Link {
                    path: path.to_path_buf(),
                    target,
                });
            }
            Ok(_) => add(path, &mut shown)?,
            Err(_) => {}
        }
    }
    // the dynamic linker's cache: libraries outside its default directories
    if let Ok(cache) = Path::new("/etc/ld.so.cache").canonicalize() {
        add(&cache, &mut shown)?;
    }
    // parents first, so that a directory inside one already shown is skipped
    let mut python_dirs: Vec<PathBuf> = python_paths
        .iter()
        .filter_map(|p| Path::new(p).canonicalize().ok())
        .collect();
    python_dirs.sort_by_key(|p| p.components().count());
    for p in python_dirs {
        add(&p, &mut shown)?;
    }
    for dev in DEVICES {
        if Path::new(dev).exists() {
            shown.push(Shown::Device(PathBuf::from(dev)));
        }
    }
    for tmp in ["/tmp", "/var/tmp", "/dev/shm"] {
        shown.push(Shown::Tmpfs(PathBuf::from(tmp)));
    }
    Ok(shown)
}

/// statvfs's flag for a relatime mount (not in every libc's bindings).
const ST_RELATIME: libc::c_ulong = 4096;

/// The flags of the mount holding `path` that a read-only remount must keep.
fn mount_flags(path: &Path) -> Result<libc::c_ulong> {
    let c = cstring(path)?;
    // SAFETY: statvfs is plain data that the call fills.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statvfs {}", path.display()));
    }
    let f = st.f_flag as libc::c_ulong;
    // statvfs's ST_* bits, as the MS_* mount flags
    let map = [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (ST_RELATIME, libc::MS_RELATIME),
    ];
    let mut keep = map
        .iter()
        .filter(|(st, _)| f & *st != 0)
        .fold(0, |acc, (_, ms)| acc | ms);
    if f & (libc::ST_NOATIME | ST_RELATIME) == 0 {
        keep |= libc::MS_STRICTATIME;
    }
    Ok(keep)
}

fn cstring(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("{} holds a NUL byte", path.display()))
}

/// One step of building the sandbox's root, with its paths ready for the
/// child (which may not allocate).
enum Step {
    Dir(CString),
    File(CString),
    Link {
        target: CString,
        path: CString,
    },
    Bind {
        src: CString,
        dst: CString,
        recursive: bool,
        /// Remount read-only, keeping these flags.
        read_only: Option<libc::c_ulong>,
    },
    Tmpfs {
        dst: CString,
        options: CString,
    },
}

/// Everything the child needs to enter the sandbox, prepared beforehand.
struct Plan {
    root: CString,
    root_options: CString,
    steps: Vec<Step>,
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
    user: Option<(u32, u32)>,
    limits: Limits,
    inherit: [libc::c_int; 2],
}

impl Plan {
    fn new(
        root: &Path,
        view: &[Shown],
        limits: &Limits,
        user: Option<(u32, u32)>,
        inherit: [libc::c_int; 2],
    ) -> Result<Plan> {
        let inside =
            |p: &Path| -> Result<CString> { cstring(&root.join(p.strip_prefix("/").unwrap_or(p))) };
        let mut steps = Vec::new();
        let mut made = std::collections::HashSet::new();
        let mut parents = |p: &Path, steps: &mut Vec<Step>| -> Result<()> {
            let mut above: Vec<&Path> = p
                .ancestors()
                .skip(1)
                .filter(|a| *a != Path::new("/"))
                .collect();
            above.reverse();
            for a in above {
                if made.insert(a.to_path_buf()) {
                    steps.push(Step::Dir(inside(a)?));
                }
            }
            made.insert(p.to_path_buf());
            Ok(())
        };
        for item in view {
            match item {
                Shown::ReadOnly { path, dir, keep } => {
                    parents(path, &mut steps)?;
                    let dst = inside(path)?;
                    steps.push(if *dir {
                        Step::Dir(dst.clone())
                    } else {
                        Step::File(dst.clone())
                    });
                    steps.push(Step::Bind {
                        src: cstring(path)?,
                        dst,
                        recursive: *dir,
                        read_only: Some(*keep),
                    });
                }
                Shown::Device(path) => {
                    parents(path, &mut steps)?;
                    let dst = inside(path)?;
                    steps.push(Step::File(dst.clone()));
                    steps.push(Step::Bind {
                        src: cstring(path)?,
                        dst,
                        recursive: false,
                        read_only: None,
                    });
                }
                Shown::Link { path, target } => {
                    parents(path, &mut steps)?;
                    steps.push(Step::Link {
                        target: cstring(target)?,
                        path: inside(path)?,
                    });
                }
                Shown::Tmpfs(path) => {
                    parents(path, &mut steps)?;
                    let dst = inside(path)?;
                    steps.push(Step::Dir(dst.clone()));
                    steps.push(Step::Tmpfs {
                        dst,
                        options: CString::new(format!(
                            "size={},nr_inodes=4096,mode=1777",
                            limits.file_bytes.max(1 << 20)
                        ))?,
                    });
                }
            }
        }
        // SAFETY: plain system calls.
        let (uid, gid) = user.unwrap_or_else(|| unsafe { (libc::getuid(), libc::getgid()) });
        Ok(Plan {
            root: cstring(root)?,
            root_options: CString::new("size=1m,nr_inodes=1024,mode=0755")?,
            steps,
            // the same ids inside: not root there, so exec drops the
            // namespace's capabilities
            uid_map: format!("{uid} {uid} 1\n").into_bytes(),
            gid_map: format!("{gid} {gid} 1\n").into_bytes(),
            user,
            limits: limits.clone(),
            inherit,
        })
    }

    /// In the forked child: enter the namespaces, fork the program's init
    /// (this process stays outside, waits for it and exits as it did), build
    /// its root and limits. Returns in the init, which then execs Python.
    ///
    /// # Safety
    /// Only between fork and exec: async-signal-safe system calls, no allocation.
    unsafe fn enter(&self) -> std::io::Result<()> {
        if let Some((uid, gid)) = self.user {
            check(libc::setgroups(0, std::ptr::null()), b"setgroups")?;
            check(libc::setgid(gid), b"setgid")?;
            check(libc::setuid(uid), b"setuid")?;
        }
        check(libc::unshare(NAMESPACES), b"unshare")?;
        // setuid made /proc/self root's; the maps are written through it
        check(libc::prctl(libc::PR_SET_DUMPABLE, 1), b"PR_SET_DUMPABLE")?;
        write_file(c"/proc/self/setgroups", b"deny\n")?;
        write_file(c"/proc/self/uid_map", &self.uid_map)?;
        write_file(c"/proc/self/gid_map", &self.gid_map)?;
        check(
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL),
            b"PR_SET_PDEATHSIG",
        )?;
        set_limit(libc::RLIMIT_CORE, 0)?;
        // Through this the init tells how Python ended (the init itself cannot
        // die by a signal of its own sending).
        let mut status_pipe = [0; 2];
        check(
            libc::pipe2(status_pipe.as_mut_ptr(), libc::O_CLOEXEC),
            b"pipe",
        )?;
        let init = libc::fork();
        if init < 0 {
            return Err(fail(b"fork"));
        }
        if init > 0 {
            exit_as(init, Some(status_pipe[0]));
        }
        // The program's init (pid 1 of the new PID namespace), which reaps
        // whatever is orphaned there and leaves Python its normal signals.
        check(
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL),
            b"PR_SET_PDEATHSIG",
        )?;
        let none = std::ptr::null();
        check(
            libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                none.cast(),
            ),
            b"make mounts private",
        )?;
        check(
            libc::mount(
                c"tmpfs".as_ptr(),
                self.root.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                self.root_options.as_ptr().cast(),
            ),
            b"mount the root tmpfs",
        )?;
        for step in &self.steps {
            step.apply()?;
        }
        check(libc::chdir(self.root.as_ptr()), b"chdir to the new root")?;
        check(
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
            b"pivot_root",
        )?;
        check(
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
            b"detach the old root",
        )?;
        check(libc::chdir(c"/".as_ptr()), b"chdir /")?;
        check(
            libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REMOUNT
                    | libc::MS_BIND
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV,
                none.cast(),
            ),
            b"remount the root read-only",
        )?;
        check(libc::chdir(c"/tmp".as_ptr()), b"chdir /tmp")?;
        check(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            b"PR_SET_NO_NEW_PRIVS",
        )?;
        let python = libc::fork();
        if python < 0 {
            return Err(fail(b"fork"));
        }
        if python > 0 {
            reap_until(python, status_pipe[1]);
        }
        set_limits(&self.limits)?;
        keep_only(&self.inherit)
    }
}

impl Step {
    /// # Safety
    /// Between fork and exec, as [`Plan::enter`].
    unsafe fn apply(&self) -> std::io::Result<()> {
        let none = std::ptr::null();
        match self {
            Step::Dir(path) => {
                if libc::mkdir(path.as_ptr(), 0o755) != 0
                    && *libc::__errno_location() != libc::EEXIST
                {
                    return Err(fail_at(b"mkdir", path));
                }
            }
            Step::File(path) => {
                let fd = libc::open(
                    path.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC,
                    0o644,
                );
                if fd < 0 {
                    return Err(fail_at(b"create", path));
                }
                libc::close(fd);
            }
            Step::Link { target, path } => {
                if libc::symlink(target.as_ptr(), path.as_ptr()) != 0 {
                    return Err(fail_at(b"symlink", path));
                }
            }
            Step::Bind {
                src,
                dst,
                recursive,
                read_only,
            } => {
                let rec = if *recursive { libc::MS_REC } else { 0 };
                if libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    none,
                    libc::MS_BIND | rec,
                    none.cast(),
                ) != 0
                {
                    return Err(fail_at(b"bind", dst));
                }
                if let Some(keep) = read_only {
                    let flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | keep;
                    if libc::mount(none, dst.as_ptr(), none, flags, none.cast()) != 0 {
                        return Err(fail_at(b"remount read-only", dst));
                    }
                }
            }
            Step::Tmpfs { dst, options } => {
                if libc::mount(
                    c"tmpfs".as_ptr(),
                    dst.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    options.as_ptr().cast(),
                ) != 0
                {
                    return Err(fail_at(b"mount tmpfs", dst));
                }
            }
        }
        Ok(())
    }
}

/// The error of the last system call, after naming the step on stderr (the
/// only way to say more from the child, which may not allocate).
unsafe fn fail(what: &[u8]) -> std::io::Error {
    let err = std::io::Error::last_os_error();
    say(&[b"claw sandbox: ", what, b" failed\n"]);
    err
}

unsafe fn fail_at(what: &[u8], path: &CString) -> std::io::Error {
    let err = std::io::Error::last_os_error();
    say(&[b"claw sandbox: ", what, b" ", path.as_bytes(), b" failed\n"]);
    err
}

unsafe fn say(parts: &[&[u8]]) {
    for p in parts {
        libc::write(2, p.as_ptr().cast(), p.len());
    }
}

unsafe fn check(rc: libc::c_int, what: &[u8]) -> std::io::Result<()> {
    if rc != 0 {
        return Err(fail(what));
    }
    Ok(())
}

unsafe fn write_file(path: &std::ffi::CStr, data: &[u8]) -> std::io::Result<()> {
    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return Err(fail(path.to_bytes()));
    }
    let n = libc::write(fd, data.as_ptr().cast(), data.len());
    let err = (n != data.len() as isize).then(|| fail(path.to_bytes()));
    libc::close(fd);
    err.map_or(Ok(()), Err)
}

/// Outside the program's namespace: waits for its init and exits as Python
/// did (as told through `status_from`), else as the init did.
unsafe fn exit_as(child: libc::pid_t, status_from: Option<libc::c_int>) -> ! {
    // Nothing of claw's is needed here; above all not the pipe through which
    // the spawning thread learns that exec happened (it waits for its end).
    if let Some(fd) = status_from {
        libc::dup2(fd, 3);
    }
    close_from(if status_from.is_some() { 4 } else { 3 }, false);
    let mut status = 0;
    loop {
        if libc::waitpid(child, &mut status, 0) == child {
            break;
        }
        if *libc::__errno_location() != libc::EINTR {
            libc::_exit(125);
        }
    }
    if status_from.is_some() {
        let mut told: libc::c_int = 0;
        let n = libc::read(
            3,
            (&raw mut told).cast(),
            std::mem::size_of::<libc::c_int>(),
        );
        if n == std::mem::size_of::<libc::c_int>() as isize {
            status = told;
        }
    }
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        libc::signal(sig, libc::SIG_DFL);
        libc::kill(libc::getpid(), sig);
        libc::_exit(128 + sig);
    }
    libc::_exit(libc::WEXITSTATUS(status))
}

/// The init of the program's PID namespace: reaps every child until Python
/// ends, then reports its status on `report` and exits, which ends the rest.
unsafe fn reap_until(python: libc::pid_t, report: libc::c_int) -> ! {
    libc::dup2(report, 3);
    close_from(4, false);
    loop {
        let mut status = 0;
        let pid = libc::waitpid(-1, &mut status, 0);
        if pid == python {
            libc::write(
                3,
                (&raw const status).cast(),
                std::mem::size_of::<libc::c_int>(),
            );
            libc::_exit(0);
        }
        if pid < 0 && *libc::__errno_location() != libc::EINTR {
            libc::_exit(125);
        }
    }
}

/// Closes (or marks close-on-exec) every descriptor from `first` up.
unsafe fn close_from(first: libc::c_uint, cloexec_only: bool) {
    let flags = if cloexec_only {
        libc::CLOSE_RANGE_CLOEXEC
    } else {
        0
    };
    if libc::syscall(libc::SYS_close_range, first, libc::c_uint::MAX, flags) == 0 {
        return;
    }
    // kernels before 5.11 (5.9 without the flag): one by one
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
        lim.rlim_cur.min(1 << 16) as libc::c_int
    } else {
        1024
    };
    for fd in first as libc::c_int..max {
        if cloexec_only {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        } else {
            libc::close(fd);
        }
    }
}

/// Leaves the program stdio and `inherit`; every other descriptor closes at exec.
unsafe fn keep_only(inherit: &[libc::c_int]) -> std::io::Result<()> {
    close_from(3, true);
    for &fd in inherit {
        check(libc::fcntl(fd, libc::F_SETFD, 0), b"pass a descriptor")?;
    }
    Ok(())
}

#[cfg(target_env = "gnu")]
type Resource = libc::__rlimit_resource_t;
#[cfg(not(target_env = "gnu"))]
type Resource = libc::c_int;

unsafe fn set_limit(resource: Resource, value: u64) -> std::io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: value as libc::rlim_t,
        rlim_max: value as libc::rlim_t,
    };
    check(libc::setrlimit(resource, &lim), b"setrlimit")
}

/// The program's rlimits (in its user namespace: RLIMIT_NPROC then counts
/// only its own processes).
unsafe fn set_limits(limits: &Limits) -> std::io::Result<()> {
    set_limit(libc::RLIMIT_CPU, limits.timeout.as_secs() + 1)?;
    set_limit(libc::RLIMIT_AS, limits.memory_bytes)?;
    set_limit(libc::RLIMIT_NPROC, limits.processes)?;
    set_limit(libc::RLIMIT_FSIZE, limits.file_bytes)?;
    set_limit(libc::RLIMIT_NOFILE, limits.open_files)?;
    set_limit(libc::RLIMIT_CORE, 0)
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
mod tests {
    use super::*;

    #[test]
    fn failure_says_an_early_exit_is_one() {
        let r = RunResult {
            passed: false,
            completed: false,
            timed_out: false,
            exit_code: Some(0),
            signal: None,
            stdout: String::new(),
            stderr: String::new(),
            seconds: 0.1,
        };
        assert!(r.failure().unwrap().contains("before its end"));
        let r = RunResult {
            exit_code: Some(1),
            stderr: "Traceback\nAssertionError: no\n".into(),
            ..r
        };
        assert_eq!(r.failure().unwrap(), "AssertionError: no");
    }

    #[test]
    fn no_namespaces_is_a_refusal_unless_allowed() {
        let missing = || Err(anyhow::anyhow!("Operation not permitted"));
        let err = isolation(missing(), false).unwrap_err().to_string();
        assert!(err.contains("no user namespaces"), "{err}");
        assert!(err.contains("Operation not permitted"), "{err}");
        assert!(err.contains("--unsafe-no-sandbox"), "{err}");
        assert!(!isolation(missing(), true).unwrap());
        assert!(isolation(Ok(()), false).unwrap());
    }

    #[test]
    fn unsandboxed_runs_keep_the_verdict_and_the_limits() {
        let sb = match Sandbox::new("python3", Limits::default(), true) {
            Ok(sb) => sb,
            Err(e) => {
                eprintln!("SKIP: no python3 for the sandbox: {e:#}");
                return;
            }
        };
        let sb = Sandbox {
            isolated: false,
            view: Vec::new(),
            ..sb
        };
        let r = sb.run("import os\nprint(len(os.listdir('.')))\n").unwrap();
        assert!(r.passed && r.stdout == "0\n", "{r:?}");
        let r = sb.run("import os\nos._exit(0)\n").unwrap();
        assert!(!r.passed && !r.completed, "{r:?}");
        let r = sb
            .run("import resource\nprint(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n")
            .unwrap();
        assert_eq!(r.stdout.trim(), Limits::default().open_files.to_string());
    }

    #[test]
    fn plans_create_parents_once_and_in_order() {
        let view = [
            Shown::ReadOnly {
                path: "/opt/py/bin".into(),
                dir: true,
                keep: 0,
            },
            Shown::ReadOnly {
                path: "/opt/py/lib".into(),
                dir: true,
                keep: 0,
            },
            Shown::Tmpfs("/dev/shm".into()),
            Shown::Device("/dev/null".into()),
        ];
        let plan = Plan::new(Path::new("/r"), &view, &Limits::default(), None, [3, 4]).unwrap();
        let dirs: Vec<String> = plan
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Dir(p) => Some(p.to_string_lossy().into_owned()),
                _ => None,
            })
            .collect();
        assert_eq!(
            dirs,
            [
                "/r/opt",
                "/r/opt/py",
                "/r/opt/py/bin",
                "/r/opt/py/lib",
                "/r/dev",
                "/r/dev/shm"
            ]
        );
    }
}
