//! `claw serve --dir s3://...`: serve records and hot-reloads exactly as over a
//! local directory, in a local spool (`--spool`, its `raw/`, `wal/` and
//! `checkpoints/`), and one thread keeps the spool in step with the store:
//!
//! - every closed segment in `SPOOL/raw/` is uploaded to `raw/NAME` (one PUT:
//!   never partial) and only then removed from the spool. A crash between the
//!   two uploads it again under the same name (same bytes), so nothing is lost
//!   or doubled; the open segment and the durable log stay local, so a kill -9
//!   loses no answered turn (the next server on the spool replays the log);
//! - `checkpoints/LATEST` is polled, and a new checkpoint is copied into
//!   `SPOOL/checkpoints/` before the local `LATEST` names it
//!   ([`crate::store::checkpoints::Mirror`]), which the reload thread follows.
//!
//! On shutdown the thread makes a last pass after the recorder closed its
//! segment, so a graceful stop leaves nothing in the spool.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::store::checkpoints::Mirror;
use crate::store::Remote;

pub struct StoreSync {
    stop: mpsc::Sender<()>,
    handle: JoinHandle<()>,
}

impl StoreSync {
    /// Pulls the store's checkpoint once now (so serve starts on it), then
    /// starts the thread, polling every `poll`.
    pub fn start(remote: Arc<Remote>, spool: &Path, poll: Duration) -> Result<StoreSync> {
        let raw = spool.join("raw");
        std::fs::create_dir_all(&raw)
            .with_context(|| format!("{}: cannot create the directory", raw.display()))?;
        let mut mirror = Mirror::new(&remote, &spool.join("checkpoints"))?;
        if let Err(e) = mirror.pull(false) {
            crate::warn!("checkpoints: {e:#}");
        }
        upload_closed(&remote, &raw);
        let (stop, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("claw-store-sync".into())
            .spawn(move || loop {
                let last = !matches!(rx.recv_timeout(poll), Err(RecvTimeoutError::Timeout));
                upload_closed(&remote, &raw);
                if last {
                    return;
                }
                if let Err(e) = mirror.pull(false) {
                    crate::debug!("checkpoints: {e:#}");
                }
            })
            .context("starting the store sync thread")?;
        Ok(StoreSync { stop, handle })
    }

    /// A last upload pass (call after the recorder closed its segment).
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.handle.join();
    }
}

/// Uploads every closed segment of `raw` (its `.parquet` files; the open one is
/// a `.parquet.tmp`) to the store's `raw/`, removing each once it is there.
fn upload_closed(remote: &Remote, raw: &Path) {
    let names = match crate::store::list_segments(raw) {
        Ok(n) => n,
        Err(e) => {
            crate::warn!("{e:#}");
            return;
        }
    };
    for name in names {
        let path: PathBuf = raw.join(&name);
        let result = std::fs::read(&path)
            .with_context(|| format!("reading {}", path.display()))
            .and_then(|bytes| remote.put(&format!("raw/{name}"), bytes.into()).map(|_| ()))
            .and_then(|()| {
                std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
            });
        if let Err(e) = result {
            // Kept in the spool: the next pass tries again.
            crate::warn!("uploading a recorded segment: {e:#}");
            return;
        }
    }
}
