//! Waiting for work, and stopping cleanly.
//!
//! A daemon sleeps until its input folder changes (inotify and friends, through
//! the notify crate) or the poll interval passes, whichever comes first: the poll
//! is the fallback where notifications do not arrive (network filesystems) or were
//! missed. SIGINT/SIGTERM set a flag the loops check between segments, so the
//! segment in flight is finished and recorded; a second signal exits at once
//! (what is in flight is then redone by the next worker, never half-recorded).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::Result;
use notify::{RecursiveMode, Watcher};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    if STOP.swap(true, Ordering::SeqCst) {
        // Second signal: the user wants out now. Only async-signal-safe calls here.
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
}

/// Routes SIGINT and SIGTERM to the stop flag (call once, at daemon start).
pub fn install_stop_handler() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only touches an atomic and calls _exit.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

/// Whether a stop was requested.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Asks the loops to stop (as a signal would).
pub fn request_stop() {
    STOP.store(true, Ordering::SeqCst);
}

/// Sleeps `d`, waking early on a stop request; returns whether one came.
pub fn sleep_unless_stopped(d: Duration) -> bool {
    let end = Instant::now() + d;
    while !stop_requested() {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
    true
}

/// The child gets SIGTERM (a graceful stop) if this process dies, however it
/// dies: no stage outlives its `claw up`.
pub fn stop_when_parent_dies(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Wakes a daemon when its input folder changes, or every `interval`.
pub struct Waker {
    events: Option<Receiver<()>>,
    // Kept alive for its notifications.
    _watcher: Option<notify::RecommendedWatcher>,
    interval: Duration,
}

impl Waker {
    /// Watches `dir` unless `poll_only` (or notifications cannot be set up there,
    /// which is said once and falls back to polling).
    pub fn new(dir: &Path, poll_only: bool, interval: Duration) -> Self {
        let mut waker = Waker {
            events: None,
            _watcher: None,
            interval,
        };
        if poll_only {
            return waker;
        }
        let (tx, rx) = channel();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok() {
                let _ = tx.send(());
            }
        })
        .and_then(|mut w| w.watch(dir, RecursiveMode::NonRecursive).map(|()| w));
        match watcher {
            Ok(w) => {
                waker.events = Some(rx);
                waker._watcher = Some(w);
            }
            Err(e) => crate::warn!(
                "{}: no filesystem notifications ({e}); polling every {:?}",
                dir.display(),
                interval
            ),
        }
        waker
    }

    /// Blocks until the folder changes, the interval passes or a stop is requested.
    pub fn wait(&self) -> Result<()> {
        let end = Instant::now() + self.interval;
        loop {
            if stop_requested() {
                return Ok(());
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            let slice = left.min(Duration::from_millis(100));
            match &self.events {
                Some(rx) => match rx.recv_timeout(slice) {
                    Ok(()) => {
                        // A burst of events (create, write, rename) is one wake-up;
                        // a short pause lets a writer finish its rename.
                        std::thread::sleep(Duration::from_millis(20));
                        while rx.try_recv().is_ok() {}
                        return Ok(());
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => std::thread::sleep(slice),
                },
                None => std::thread::sleep(slice),
            }
        }
    }
}
