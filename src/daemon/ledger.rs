//! Which input segments a stage has finished, and who is working on which.
//!
//! - `state/STAGE/done/NAME`: an empty marker, created only after the output of
//!   input `NAME` is durable. A directory of markers (rather than one ledger file)
//!   lets several workers, on several machines, record their work without sharing
//!   a file; creating a marker is idempotent, so a redo after a crash is harmless.
//! - `state/STAGE/claims/NAME.lock`: held with `flock` while a worker processes
//!   `NAME`. The kernel drops the lock the moment its owner dies (on NFS, when the
//!   server's lock lease expires), which is the lease: no heartbeats, no clocks.
//! - `state/STAGE/worker.lock`: the same, for stages that run one worker at a
//!   time (collect and train); a second worker waits as a standby.
//!
//! On an object store (`s3://...`) the same names are objects: markers are
//! created with put-if-absent, and claims (`claims/NAME.lease`, `worker.lease`)
//! are leases their live owner renews ([`crate::store::lease`]).
//!
//! Markers and claims are keyed by [`short_name`]: the input's name itself, or
//! for a name too long to take a suffix, its start and a hash of the whole.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use bytes::Bytes;

use crate::fsutil::short_name;
use crate::store::lease::Lease;
use crate::store::{Remote, Root};

/// How long an object store claim lasts unless its owner renews it.
pub const LEASE: Duration = Duration::from_secs(30);

pub struct Ledger {
    place: Place,
    worker: String,
}

enum Place {
    Local { done: PathBuf, claims: PathBuf },
    Remote { remote: Arc<Remote>, state: String },
}

impl Ledger {
    /// The ledger under `state_dir` (created if missing), for worker `worker`.
    pub fn open(state_dir: &Path, worker: &str) -> Result<Self> {
        let done = state_dir.join("done");
        let claims = state_dir.join("claims");
        for dir in [&done, &claims] {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("{}: cannot create the directory", dir.display()))?;
        }
        Ok(Ledger {
            place: Place::Local { done, claims },
            worker: worker.to_string(),
        })
    }

    /// The ledger of `state` (`state/STAGE`) under `root`.
    pub fn open_in(root: &Root, state: &str, worker: &str) -> Result<Self> {
        match root {
            Root::Local(p) => Self::open(&p.join(state), worker),
            Root::Remote(r) => Ok(Ledger {
                place: Place::Remote {
                    remote: r.clone(),
                    state: state.to_string(),
                },
                worker: worker.to_string(),
            }),
        }
    }

    /// The inputs marked done.
    pub fn done_set(&self) -> Result<DoneSet> {
        match &self.place {
            Place::Local { done, .. } => {
                let entries = std::fs::read_dir(done)
                    .with_context(|| format!("listing {}", done.display()))?;
                Ok(DoneSet(
                    entries
                        .filter_map(|e| e.ok())
                        .filter_map(|e| e.file_name().into_string().ok())
                        .filter(|n| !n.starts_with('.'))
                        .collect(),
                ))
            }
            Place::Remote { remote, state } => Ok(DoneSet(
                remote
                    .list(&format!("{state}/done"))?
                    .into_iter()
                    .map(|e| e.name)
                    .collect(),
            )),
        }
    }

    pub fn is_done(&self, name: &str) -> bool {
        match &self.place {
            Place::Local { done, .. } => done.join(short_name(name)).exists(),
            Place::Remote { remote, state } => remote
                .head(&format!("{state}/done/{}", short_name(name)))
                .is_ok_and(|m| m.is_some()),
        }
    }

    /// Marks `name` done. Call only once its output is durable.
    pub fn mark_done(&self, name: &str) -> Result<()> {
        match &self.place {
            Place::Local { done, .. } => {
                let path = done.join(short_name(name));
                File::create(&path)
                    .with_context(|| format!("{}: cannot create", path.display()))?;
            }
            Place::Remote { remote, state } => {
                // Put-if-absent: a marker that exists (a redo) stays as it was.
                remote.create(&format!("{state}/done/{}", short_name(name)), Bytes::new())?;
            }
        }
        Ok(())
    }

    /// Makes the markers created so far durable (one directory fsync for many;
    /// an object is durable when its PUT returns).
    pub fn sync(&self) -> Result<()> {
        match &self.place {
            Place::Local { done, .. } => crate::fsutil::sync_parent_dir(&done.join("x")),
            Place::Remote { .. } => Ok(()),
        }
    }

    /// Claims `name` for this worker, or `None` when another live worker holds it.
    pub fn try_claim(&self, name: &str) -> Result<Option<Claim>> {
        match &self.place {
            Place::Local { claims, .. } => try_lock(
                &claims.join(format!("{}.lock", short_name(name))),
                &self.worker,
            ),
            Place::Remote { remote, state } => Ok(Lease::try_acquire(
                remote,
                &format!("{state}/claims/{}.lease", short_name(name)),
                &self.worker,
                LEASE,
            )?
            .map(|lease| Claim {
                held: Held::Lease(lease),
            })),
        }
    }

    /// Deletes input segments in `input` (a folder of `root`) marked done more
    /// than `age` ago. Returns how many were deleted.
    pub fn retain(&self, root: &Root, input: &str, age: Duration) -> Result<usize> {
        let now_ms = crate::clock::unix_ms();
        let finished: std::collections::HashMap<String, i64> = match &self.place {
            Place::Local { done, .. } => {
                let now = SystemTime::now();
                let mut out = std::collections::HashMap::new();
                for name in root.list_segments(input)? {
                    let marker = done.join(short_name(&name));
                    if let Ok(t) = std::fs::metadata(&marker).and_then(|m| m.modified()) {
                        let ago = now.duration_since(t).unwrap_or_default().as_millis() as i64;
                        out.insert(short_name(&name), now_ms - ago);
                    }
                }
                out
            }
            Place::Remote { remote, state } => remote
                .list(&format!("{state}/done"))?
                .into_iter()
                .map(|e| (e.name, e.modified_ms))
                .collect(),
        };
        let mut removed = 0;
        for name in root.list_segments(input)? {
            let Some(&at) = finished.get(&short_name(&name)) else {
                continue;
            };
            if now_ms.saturating_sub(at) < age.as_millis() as i64 {
                continue;
            }
            root.remove(&format!("{input}/{name}"))
                .with_context(|| format!("removing {name}"))?;
            removed += 1;
        }
        Ok(removed)
    }
}

/// The inputs a stage has finished (see [`Ledger::done_set`]).
pub struct DoneSet(HashSet<String>);

impl DoneSet {
    pub fn contains(&self, name: &str) -> bool {
        self.0.contains(&short_name(name))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A held claim: a locked file (dropping it removes the file and releases the
/// lock), or an object store lease (dropping it deletes the object).
pub struct Claim {
    held: Held,
}

enum Held {
    File { _file: File, path: PathBuf },
    Lease(Lease),
}

impl Claim {
    /// Whether the claim may have passed to another worker (a lease that was
    /// not renewed in time): the work must not be committed then.
    pub fn lost(&self) -> bool {
        match &self.held {
            Held::File { .. } => false,
            Held::Lease(l) => l.lost(),
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Remove while still holding the lock: a worker that opened the old file
        // and gets the lock after us sees the path gone and backs off.
        if let Held::File { path, .. } = &self.held {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Takes the exclusive lock on `path` without waiting.
pub fn try_lock(path: &Path, owner: &str) -> Result<Option<Claim>> {
    Ok(lock_file(path, owner)?.map(|file| Claim {
        held: Held::File {
            _file: file,
            path: path.to_path_buf(),
        },
    }))
}
/// The open, `flock`ed file at `path`, or `None` when someone else holds it.
fn lock_file(path: &Path, owner: &str) -> Result<Option<File>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("{}: cannot open", path.display()))?;
    // SAFETY: a valid, open file descriptor.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(None);
        }
        return Err(err).with_context(|| format!("{}: cannot lock", path.display()));
    }
    // The previous owner may have removed the file between our open and our lock:
    // then we hold a lock on a file nobody else can find, which proves nothing.
    let held = file.metadata()?;
    match std::fs::metadata(path) {
        Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {}
        _ => return Ok(None),
    }
    let mut file = file;
    let _ = file.set_len(0);
    let _ = writeln!(file, "{owner} pid {}", std::process::id());
    Ok(Some(file))
}

/// The lock that makes a stage single-worker (collect, train): waits while another
/// worker holds it, checking `stop` between tries. `None` when stopped first.
pub struct StageLock {
    // Held for its lock; the file stays (a place for standbys to wait on).
    _held: StageHeld,
}

enum StageHeld {
    File { _file: File },
    Lease(Lease),
}

impl StageLock {
    /// Whether the lock may have passed to another worker (see [`Claim::lost`]).
    pub fn lost(&self) -> bool {
        match &self._held {
            StageHeld::File { .. } => false,
            StageHeld::Lease(l) => l.lost(),
        }
    }

    /// The stage lock of `state` (`state/STAGE`) under `root`.
    pub fn acquire_in(root: &Root, state: &str, owner: &str, stage: &str) -> Result<Option<Self>> {
        let remote = match root {
            Root::Local(p) => return Self::acquire(&p.join(state), owner, stage),
            Root::Remote(r) => r,
        };
        let rel = format!("{state}/worker.lease");
        let mut told = false;
        loop {
            if let Some(lease) = Lease::try_acquire(remote, &rel, owner, LEASE)? {
                return Ok(Some(StageLock {
                    _held: StageHeld::Lease(lease),
                }));
            }
            if !told {
                crate::info!(
                    "{stage}: another worker holds {}; waiting as a standby",
                    remote.show(&rel)
                );
                told = true;
            }
            if super::wake::sleep_unless_stopped(Duration::from_millis(500)) {
                return Ok(None);
            }
        }
    }

    pub fn acquire(state_dir: &Path, owner: &str, stage: &str) -> Result<Option<Self>> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("{}: cannot create the directory", state_dir.display()))?;
        let path = state_dir.join("worker.lock");
        let mut told = false;
        loop {
            if let Some(file) = lock_file(&path, owner)? {
                return Ok(Some(StageLock {
                    _held: StageHeld::File { _file: file },
                }));
            }
            if !told {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                crate::info!(
                    "{stage}: another worker ({}) holds {}; waiting as a standby",
                    holder.trim(),
                    path.display()
                );
                told = true;
            }
            if super::wake::sleep_unless_stopped(Duration::from_millis(500)) {
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_excludes_others_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let a = Ledger::open(dir.path(), "a").unwrap();
        let b = Ledger::open(dir.path(), "b").unwrap();
        let claim = a.try_claim("x.parquet").unwrap().expect("free");
        assert!(b.try_claim("x.parquet").unwrap().is_none());
        assert!(b.try_claim("y.parquet").unwrap().is_some());
        drop(claim);
        assert!(b.try_claim("x.parquet").unwrap().is_some());
    }

    #[test]
    fn done_markers_are_idempotent_and_listed() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path(), "w").unwrap();
        ledger.mark_done("a.parquet").unwrap();
        ledger.mark_done("a.parquet").unwrap();
        ledger.mark_done("b.parquet").unwrap();
        let done = ledger.done_set().unwrap();
        assert_eq!(done.len(), 2);
        assert!(ledger.is_done("b.parquet") && !ledger.is_done("c.parquet"));
        assert!(done.contains("a.parquet") && !done.contains("c.parquet"));
    }

    #[test]
    fn names_too_long_for_a_suffix_still_get_markers_and_claims() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path(), "w").unwrap();
        let long = format!("{}.parquet", "x".repeat(247)); // 255 bytes
        let claim = ledger.try_claim(&long).unwrap().expect("free");
        assert!(ledger.try_claim(&long).unwrap().is_none());
        drop(claim);
        ledger.mark_done(&long).unwrap();
        assert!(ledger.is_done(&long));
        assert!(ledger.done_set().unwrap().contains(&long));
        let other = format!("{}.parquet", "x".repeat(246));
        assert!(!ledger.is_done(&other));
        // retain finds it by its marker
        let input = dir.path().join("in");
        std::fs::create_dir_all(&input).unwrap();
        std::fs::write(input.join(&long), b"x").unwrap();
        assert_eq!(
            ledger
                .retain(&Root::Local(dir.path().to_path_buf()), "in", Duration::ZERO)
                .unwrap(),
            1
        );
    }

    #[test]
    fn retain_deletes_only_finished_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        std::fs::create_dir_all(&input).unwrap();
        for n in ["a.parquet", "b.parquet"] {
            std::fs::write(input.join(n), b"x").unwrap();
        }
        let ledger = Ledger::open(&dir.path().join("state"), "w").unwrap();
        ledger.mark_done("a.parquet").unwrap();
        let root = Root::Local(dir.path().to_path_buf());
        assert_eq!(ledger.retain(&root, "in", Duration::ZERO).unwrap(), 1);
        assert!(!input.join("a.parquet").exists() && input.join("b.parquet").exists());
    }
}
