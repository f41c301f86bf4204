use super::namespaces::Step;
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
