//! llama.cpp's server for the tests that run claw in front of it: finding the
//! binary built by scripts/build-llama-server (skipped visibly when absent),
//! starting it and `claw serve --upstream`, and reading what was recorded.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use claw::rollout::{RolloutReader, RolloutRow};
use serde_json::Value as Json;

/// llama-server: `$CLAW_LLAMA_SERVER`, else the newest
/// `llama-server-*` in `$CLAW_BENCH_CACHE/bin` or `.bench-cache/bin` (where
/// scripts/build-llama-server puts it). None, with a visible message, when absent.
pub fn llama_server() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CLAW_LLAMA_SERVER") {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Some(path);
        }
        eprintln!("SKIP: CLAW_LLAMA_SERVER={} is not a file", path.display());
        return None;
    }
    let cache = std::env::var_os("CLAW_BENCH_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".bench-cache"));
    let bin = cache.join("bin");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&bin)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("llama-server-") && !n.ends_with(".tmp"))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some(path) => Some(path),
        None => {
            eprintln!(
                "SKIP: no llama-server in {} (build it with scripts/build-llama-server, or set \
                 CLAW_LLAMA_SERVER)",
                bin.display()
            );
            None
        }
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot find a free port")
}

/// A child process killed when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts llama-server on `model` (with `extra` arguments), on a loopback port;
/// waits for `/health`.
pub fn start_llama(bin: &Path, model: &Path, extra: &[&str]) -> (Killed, String) {
    start_llama_on(bin, model, free_port(), extra)
}

/// [`start_llama`] on a given port (to restart an engine where claw expects it).
pub fn start_llama_on(bin: &Path, model: &Path, port: u16, extra: &[&str]) -> (Killed, String) {
    let child = Command::new(bin)
        .arg("--model")
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["-c", "2048", "--threads", "1", "--parallel", "1"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start llama-server");
    let child = Killed(child);
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ok = ureq::get(&format!("{base}/health"))
            .timeout(Duration::from_secs(2))
            .call()
            .is_ok();
        if ok {
            return (child, base);
        }
        assert!(Instant::now() < deadline, "llama-server did not start");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts `claw serve --upstream URL` (with `extra`) on `data`.
pub fn start_claw(
    upstream: &str,
    data: &Path,
    extra: &[&str],
) -> (Killed, String, Arc<Mutex<String>>) {
    let mut child = super::claw()
        .args(["serve", "--upstream", upstream, "--dir"])
        .arg(data)
        .args(["--host", "127.0.0.1", "--port", "0", "-v"])
        .args(extra)
        .env_remove("CLAW_API_KEY")
        .env_remove("CLAW_UPSTREAM_API_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start claw serve");
    let (base, log) = super::wait_until_listening(&mut child);
    (Killed(child), base, log)
}

/// SIGTERM, then wait for a clean exit (the open segment is closed).
pub fn stop(mut server: Killed, log: &Mutex<String>) {
    let ok = Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            assert!(
                status.success(),
                "claw serve failed:\n{}",
                log.lock().unwrap()
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "claw serve did not stop:\n{}",
            log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// POST `body` (JSON) with `headers`; (status, body text, session header).
pub fn post(url: &str, headers: &[(&str, &str)], body: &Json) -> (u16, String, Option<String>) {
    let mut req = ureq::post(url).timeout(Duration::from_secs(120));
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let response = match req.send_json(body.clone()) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("POST {url}: {e}"),
    };
    let status = response.status();
    let session = response.header("x-session-id").map(str::to_string);
    (status, response.into_string().unwrap(), session)
}

pub fn rows(data: &Path) -> Vec<RolloutRow> {
    let mut files: Vec<String> = std::fs::read_dir(data.join("raw"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    files.sort();
    if files.is_empty() {
        return Vec::new();
    }
    RolloutReader::new(&files).unwrap().read_all_rows().unwrap()
}
