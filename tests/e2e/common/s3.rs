//! An S3-compatible server on loopback for the `s3://` tests: the one
//! `scripts/test` started (`CLAW_TEST_S3_ENDPOINT`), else moto's server from
//! `.venv-s3` (which `scripts/test` installs from PyPI), else none, and the
//! tests that need it print a visible SKIP.
//!
//! Before a test relies on the server it checks the two guarantees the
//! exactly-once protocol rests on (a second put-if-absent is refused, a stale
//! conditional update is refused): a server that silently overwrites would
//! make a passing test prove nothing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use claw::store::Remote;

pub const KEY: &str = "claw-test";

pub struct S3 {
    pub endpoint: String,
    /// Ours to stop, when this test started it.
    server: Option<Child>,
}

impl Drop for S3 {
    fn drop(&mut self) {
        if let Some(child) = &mut self.server {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn moto_server() -> Option<PathBuf> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = repo.join(".venv-s3/bin/moto_server");
    path.is_file().then_some(path)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The server, or `None` after printing why the calling test skips.
pub fn server(test: &str) -> Option<S3> {
    if let Ok(endpoint) = std::env::var("CLAW_TEST_S3_ENDPOINT") {
        return Some(S3 {
            endpoint,
            server: None,
        });
    }
    let Some(moto) = moto_server() else {
        eprintln!(
            "SKIP {test}: no S3 server (set CLAW_TEST_S3_ENDPOINT, or run scripts/test, \
             which installs moto into .venv-s3)"
        );
        return None;
    };
    let port = free_port();
    let child = Command::new(&moto)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(child) = child else {
        eprintln!("SKIP {test}: {} did not start", moto.display());
        return None;
    };
    let s3 = S3 {
        endpoint: format!("http://127.0.0.1:{port}"),
        server: Some(child),
    };
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if start.elapsed() > Duration::from_secs(30) {
            eprintln!("SKIP {test}: moto_server did not listen within 30 s");
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(s3)
}

impl S3 {
    /// The settings a claw process needs for this server (as environment).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", KEY.into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// A new empty bucket (moto takes an unsigned create); returns its URL
    /// `s3://BUCKET/PREFIX`.
    pub fn bucket(&self, name: &str) -> String {
        let bucket = format!("{name}-{:08x}", rand::random::<u32>());
        let resp = ureq::put(&format!("{}/{bucket}", self.endpoint)).call();
        assert!(resp.is_ok(), "creating bucket {bucket}: {resp:?}");
        format!("s3://{bucket}/claw-data")
    }

    /// A client of `url` in this process.
    pub fn remote(&self, url: &str) -> Arc<Remote> {
        let settings = [
            ("aws_endpoint", self.endpoint.as_str()),
            ("aws_access_key_id", KEY),
            ("aws_secret_access_key", KEY),
            ("aws_region", "us-east-1"),
        ];
        Arc::new(Remote::open_with(url, &settings).expect("S3 client"))
    }

    /// Panics unless the server refuses a second put-if-absent and a stale
    /// conditional update (or the tests over it would prove nothing).
    pub fn assert_conditional_writes(&self, remote: &Remote) {
        let key = "conditional-check";
        let first = remote
            .create(key, "first".into())
            .unwrap()
            .expect("a first put-if-absent succeeds");
        assert!(
            remote.create(key, "second".into()).unwrap().is_none(),
            "the S3 server accepted a second put-if-absent: it overwrites, so the s3:// \
             exactly-once tests would prove nothing; use another server"
        );
        let newer = remote
            .update(key, "update".into(), &first)
            .unwrap()
            .expect("an update at the current version succeeds");
        assert!(
            remote
                .update(key, "stale".into(), &first)
                .unwrap()
                .is_none(),
            "the S3 server accepted an If-Match with a stale etag"
        );
        let (bytes, now) = remote.get(key).unwrap().unwrap();
        assert_eq!(&bytes[..], b"update");
        assert_eq!(now, newer);
        remote.delete(key).unwrap();
    }
}
