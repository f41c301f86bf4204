//! Claims on an object store, which has no `flock`: a claim is an object
//! created with put-if-absent that names its owner and an expiry, and a thread
//! of the live owner renews it (compare-and-swap on its e-tag) every third of
//! the lease. Another worker takes a claim over, again by compare-and-swap, only
//! when it has expired or when its owner is a process on this host that is gone
//! (a worker killed and restarted on one machine does not wait out the lease).
//!
//! An owner that fails to renew in time (paused, cut off from the store) sees
//! [`Lease::lost`] and must not commit the work it holds the claim for: the
//! commit points are fenced by put-if-absent markers and conditional updates,
//! so the worse outcome of a lost lease is work done twice, never recorded twice.
//!
//! Clocks: expiry is the owner's wall clock; hosts' clocks must agree to well
//! within the lease (NTP), as for any lease.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::remote::{Remote, Version};
use crate::clock::unix_ms;

/// What a claim object holds.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Record {
    pub owner: String,
    /// Unique per acquisition: tells our own claim from another's.
    pub token: String,
    pub host: String,
    pub pid: u32,
    /// The process's start time (Linux: clock ticks since boot), against pid reuse.
    #[serde(default)]
    pub pid_start: Option<u64>,
    pub expires_unix_ms: i64,
}

/// A held claim; dropping it stops the renewal and deletes the object.
pub struct Lease {
    remote: Arc<Remote>,
    rel: String,
    token: String,
    lost: Arc<AtomicBool>,
    version: Arc<Mutex<Version>>,
    stop: Option<Sender<()>>,
    renewer: Option<std::thread::JoinHandle<()>>,
}

impl Lease {
    /// Takes the claim `rel` for `owner` for `ttl`, or `None` while a live
    /// worker holds it.
    pub fn try_acquire(
        remote: &Arc<Remote>,
        rel: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>> {
        let token = format!(
            "{owner}-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        );
        let owner = owner.to_string();
        let record = move |t: &str| Record {
            owner: owner.clone(),
            token: t.to_string(),
            host: crate::store::host::hostname(),
            pid: std::process::id(),
            pid_start: process_start(std::process::id()),
            expires_unix_ms: unix_ms() + ttl.as_millis() as i64,
        };
        let body = |r: &Record| Bytes::from(serde_json::to_vec(r).unwrap_or_default());
        let version = match remote.create(rel, body(&record(&token)))? {
            Some(v) => v,
            None => {
                let Some((bytes, version)) = remote.get(rel)? else {
                    return Ok(None); // released meanwhile: the next scan tries again
                };
                let current: Option<Record> = serde_json::from_slice(&bytes).ok();
                let takeable = match &current {
                    // A create whose answer was lost and retried: it is ours.
                    Some(c) if c.token == token => true,
                    Some(c) => expired(c) || owner_is_gone(c),
                    None => true, // damaged: nobody can renew it
                };
                if !takeable {
                    return Ok(None);
                }
                match remote.update(rel, body(&record(&token)), &version)? {
                    Some(v) => {
                        if let Some(c) = current {
                            crate::debug!(
                                "{}: took over the claim of {} (expired or gone)",
                                remote.show(rel),
                                c.owner
                            );
                        }
                        v
                    }
                    None => return Ok(None), // another worker was faster
                }
            }
        };
        let mut lease = Lease {
            remote: remote.clone(),
            rel: rel.to_string(),
            token: token.clone(),
            lost: Arc::new(AtomicBool::new(false)),
            version: Arc::new(Mutex::new(version)),
            stop: None,
            renewer: None,
        };
        let (tx, rx) = channel::<()>();
        let (remote, rel, lost, version) = (
            remote.clone(),
            rel.to_string(),
            lease.lost.clone(),
            lease.version.clone(),
        );
        let every = ttl / 3;
        let renewer = std::thread::Builder::new()
            .name("claw-lease".into())
            .spawn(move || loop {
                match rx.recv_timeout(every) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                let Ok(current) = version.lock().map(|v| v.clone()) else {
                    return;
                };
                let renewed = record(&token);
                match remote.update(&rel, body(&renewed), &current) {
                    Ok(Some(v)) => {
                        if let Ok(mut slot) = version.lock() {
                            *slot = v;
                        }
                    }
                    Ok(None) => {
                        crate::warn!("{}: claim lost (renewed too late)", remote.show(&rel));
                        lost.store(true, Ordering::SeqCst);
                        return;
                    }
                    // A transient error: try again at the next tick (the lease
                    // has two more thirds to run).
                    Err(e) => crate::debug!("renewing {}: {e:#}", remote.show(&rel)),
                }
            })
            .context("starting the lease renewal thread")?;
        lease.stop = Some(tx);
        lease.renewer = Some(renewer);
        Ok(Some(lease))
    }

    /// Whether another worker may have taken the claim (renewal failed).
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    pub fn show(&self) -> String {
        self.remote.show(&self.rel)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.renewer.take() {
            let _ = t.join();
        }
        if self.lost() {
            return;
        }
        // Delete only our own claim (a takeover replaced the token).
        if let Ok(Some((bytes, _))) = self.remote.get(&self.rel) {
            let ours =
                serde_json::from_slice::<Record>(&bytes).is_ok_and(|r| r.token == self.token);
            if ours {
                let _ = self.remote.delete(&self.rel);
            }
        }
    }
}

fn expired(r: &Record) -> bool {
    unix_ms() > r.expires_unix_ms
}

/// Whether the owner was a process on this host that no longer runs.
fn owner_is_gone(r: &Record) -> bool {
    if r.host != crate::store::host::hostname() {
        return false;
    }
    if r.pid == std::process::id() {
        return false; // this process: another of our own claims
    }
    // SAFETY: signal 0 only checks that the process exists.
    let exists = unsafe { libc::kill(r.pid as libc::pid_t, 0) } == 0;
    if !exists {
        return true;
    }
    // The pid was reused by another process since.
    matches!((r.pid_start, process_start(r.pid)), (Some(a), Some(b)) if a != b)
}

/// A process's start time in clock ticks since boot (Linux), if readable.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields after it.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split(' ').nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_start_time_is_read_and_stable() {
        let a = process_start(std::process::id());
        if cfg!(target_os = "linux") {
            assert!(a.is_some());
        }
        assert_eq!(a, process_start(std::process::id()));
    }

    #[test]
    fn an_owner_is_gone_only_on_this_host_without_its_process() {
        let mut r = Record {
            owner: "w".into(),
            token: "t".into(),
            host: crate::store::host::hostname(),
            pid: std::process::id(),
            pid_start: process_start(std::process::id()),
            expires_unix_ms: unix_ms() + 60_000,
        };
        assert!(!owner_is_gone(&r) && !expired(&r));
        r.pid = u32::MAX / 2; // no such process
        assert!(owner_is_gone(&r));
        r.host = "another-host".into();
        assert!(!owner_is_gone(&r));
        r.expires_unix_ms = unix_ms() - 1;
        assert!(expired(&r));
    }
}
