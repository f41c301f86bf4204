//! Building the sandbox between fork and exec: the user, PID, mount, network
//! and IPC namespaces, the read-only view of the host a program gets, its
//! rlimits, and the init that reaps its PID namespace.
//!
//! Everything the child does is prepared beforehand ([`Plan::new`]): after
//! fork, only async-signal-safe system calls run, with no allocation.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

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

/// One host path shown inside the sandbox, at the same path.
#[derive(Clone, Debug)]
pub(super) enum Shown {
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
pub(super) const NOBODY: (u32, u32) = (65534, 65534);

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

/// What of the host a program sees: the system directories, the interpreter's
/// own directories (asked of it), device nodes and private temp dirs.
pub(super) fn view(python: &Path) -> Result<Vec<Shown>> {
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
pub(super) enum Step {
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
pub(super) struct Plan {
    root: CString,
    root_options: CString,
    pub(super) steps: Vec<Step>,
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
    user: Option<(u32, u32)>,
    limits: Limits,
    inherit: [libc::c_int; 2],
}

impl Plan {
    pub(super) fn new(
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
    pub(super) unsafe fn enter(&self) -> std::io::Result<()> {
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

pub(super) unsafe fn check(rc: libc::c_int, what: &[u8]) -> std::io::Result<()> {
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
pub(super) unsafe fn keep_only(inherit: &[libc::c_int]) -> std::io::Result<()> {
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
pub(super) unsafe fn set_limits(limits: &Limits) -> std::io::Result<()> {
    set_limit(libc::RLIMIT_CPU, limits.timeout.as_secs() + 1)?;
    set_limit(libc::RLIMIT_AS, limits.memory_bytes)?;
    set_limit(libc::RLIMIT_NPROC, limits.processes)?;
    set_limit(libc::RLIMIT_FSIZE, limits.file_bytes)?;
    set_limit(libc::RLIMIT_NOFILE, limits.open_files)?;
    set_limit(libc::RLIMIT_CORE, 0)
}
