//! The shared directory on an object store (docs/ARCHITECTURE.md, "Shared
//! directory on an object store"), against a local S3 server (moto, see
//! tests/common/s3.rs; the tests SKIP visibly without one): the server's
//! conditional writes, leases, `claw status` and `claw serve` over `s3://`.
//! The kill -9 exactly-once test over `s3://` is in tests/daemon.rs.

use crate::common::{claw, tiny_chat_model, wait_until_listening};

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use claw::store::lease::{Lease, Record};

#[test]
fn the_test_s3_server_refuses_a_second_put_if_absent_and_stale_updates() {
    let Some(s3) = crate::common::s3::server("the_test_s3_server_refuses_a_second_put_if_absent")
    else {
        return;
    };
    let remote = s3.remote(&s3.bucket("conditional"));
    s3.assert_conditional_writes(&remote);
}

#[test]
fn a_lease_excludes_others_until_released_or_its_owner_is_gone() {
    let Some(s3) = crate::common::s3::server("a_lease_excludes_others") else {
        return;
    };
    let remote = s3.remote(&s3.bucket("lease"));
    let ttl = Duration::from_secs(30);
    let a = Lease::try_acquire(&remote, "claims/x.lease", "a", ttl)
        .unwrap()
        .expect("free");
    assert!(Lease::try_acquire(&remote, "claims/x.lease", "b", ttl)
        .unwrap()
        .is_none());
    assert!(Lease::try_acquire(&remote, "claims/y.lease", "b", ttl)
        .unwrap()
        .is_some());
    drop(a);
    assert!(remote.get("claims/x.lease").unwrap().is_none(), "released");
    let b = Lease::try_acquire(&remote, "claims/x.lease", "b", ttl).unwrap();
    assert!(b.is_some());
    drop(b);

    // A claim left by a dead process of this host is taken over at once; one of
    // a live worker elsewhere only once it has expired.
    let record = |host: String, pid: u32, expires: i64| Record {
        owner: "gone".into(),
        token: "t".into(),
        host,
        pid,
        pid_start: None,
        expires_unix_ms: expires,
    };
    let put = |r: &Record| {
        remote
            .put("claims/z.lease", serde_json::to_vec(r).unwrap().into())
            .unwrap();
    };
    let far = claw::clock::unix_ms() + 3_600_000;
    put(&record(claw::daemon::hostname(), u32::MAX / 2, far));
    let took = Lease::try_acquire(&remote, "claims/z.lease", "c", ttl).unwrap();
    assert!(took.is_some(), "a dead owner's claim is taken over");
    drop(took);
    put(&record("another-host".into(), 1, far));
    assert!(Lease::try_acquire(&remote, "claims/z.lease", "c", ttl)
        .unwrap()
        .is_none());
    put(&record(
        "another-host".into(),
        1,
        claw::clock::unix_ms() - 1,
    ));
    assert!(Lease::try_acquire(&remote, "claims/z.lease", "c", ttl)
        .unwrap()
        .is_some());
}

#[test]
fn a_url_with_credentials_is_refused_without_echoing_them() {
    let out = claw()
        .args([
            "status",
            "--dir",
            "s3://AKIAEXAMPLE:hunter2secret@bucket/claw",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("environment"), "{err}");
    assert!(
        !err.contains("hunter2secret") && !err.contains("AKIAEXAMPLE"),
        "{err}"
    );
}

#[test]
fn claw_status_reads_a_bucket() {
    let Some(s3) = crate::common::s3::server("claw_status_reads_a_bucket") else {
        return;
    };
    let url = s3.bucket("status");
    let remote = s3.remote(&url);
    remote
        .put("checkpoints/LATEST", "adapter-000003.safetensors\n".into())
        .unwrap();
    remote
        .put("checkpoints/adapter-000003.safetensors", "x".into())
        .unwrap();
    remote
        .put("quarantine/raw/bad.parquet", "x".into())
        .unwrap();
    let mut cmd = claw();
    cmd.args(["status", "--dir", &url, "--json"]);
    for (k, v) in s3.env() {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["dir"], url.as_str());
    assert_eq!(report["checkpoint"]["policy_version"], 3);
    assert_eq!(report["quarantine"][0], "raw/bad.parquet");
    assert_eq!(report["stages"].as_array().unwrap().len(), 4);
}

/// serve over s3://: each answered turn lands in the bucket's raw/ (through
/// the spool), and a graceful stop leaves nothing in the spool.
#[test]
fn serve_records_into_a_bucket_through_its_spool() {
    let Some(s3) = crate::common::s3::server("serve_records_into_a_bucket") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_chat_model(tmp.path());
    let url = s3.bucket("serve");
    let remote = s3.remote(&url);
    let spool = tmp.path().join("spool");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_claw"));
    cmd.args(["serve", "--model"])
        .arg(&model)
        .args(["--dir", &url, "--spool"])
        .arg(&spool)
        .args(["--host", "127.0.0.1", "--port", "0", "-v"])
        .args(["--segment-rows", "1", "--reload-poll-ms", "200"])
        .env_remove("CLAW_API_KEY")
        .env("RAYON_NUM_THREADS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in s3.env() {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let (base, log) = wait_until_listening(&mut child);
    for i in 0..3 {
        let resp = ureq::post(&format!("{base}/v1/chat/completions")).send_json(
            serde_json::json!({"messages": [{"role": "user", "content": format!("hi {i}")}],
                               "max_tokens": 4}),
        );
        assert!(resp.is_ok(), "{resp:?}\n{}", log.lock().unwrap());
    }
    // Closed one-row segments are uploaded by the sync thread (every 200 ms).
    let start = Instant::now();
    while remote.list("raw").unwrap().len() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "segments not uploaded:\n{}",
            log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success(), "{}", log.lock().unwrap());
    assert!(
        claw::store::list_segments(&spool.join("raw"))
            .unwrap()
            .is_empty(),
        "left in the spool"
    );
    let mut rows = 0;
    for entry in remote.list("raw").unwrap() {
        let (bytes, _) = remote.get(&format!("raw/{}", entry.name)).unwrap().unwrap();
        rows += claw::rollout::RolloutFile::from_bytes(bytes, &entry.name)
            .unwrap()
            .num_rows();
    }
    assert_eq!(rows, 3, "{}", log.lock().unwrap());
    assert!(
        log.lock().unwrap().contains(&format!("{url}/raw")),
        "the log names the bucket"
    );
}
