//! `claw eval`: the benchmarks' arithmetic and extraction on fixtures, a stub
//! OpenAI-compatible endpoint, the sandbox's containment, HumanEval's canonical
//! solutions, and the local model against `claw serve`.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{claw, spawn_server, tiny_model};
use claw::eval::sandbox::{Limits, Sandbox};
use claw::eval::{gpqa, gsm8k, humaneval};
use claw::model::testing::{write_tiny_gguf, TinySpec};
use serde_json::{json, Value as Json};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/eval")
        .join(name)
}

// ---------------------------------------------------------------- stub endpoint

/// A tiny OpenAI-compatible server on loopback: each chat completion's reply is
/// `answer(first user message)`. Counts requests. Lives until the test ends.
fn stub_endpoint(
    answer: impl Fn(&str) -> String + Send + Sync + 'static,
) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let answer = Arc::new(answer);
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { break };
            let answer = answer.clone();
            let counter = counter.clone();
            std::thread::spawn(move || serve_one(stream, &*answer, &counter));
        }
    });
    (url, count)
}

fn serve_one(stream: TcpStream, answer: &dyn Fn(&str) -> String, count: &AtomicUsize) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return;
    }
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    let reply = if request_line.starts_with("GET") {
        json!({"object": "list", "data": [{"id": "stub", "object": "model"}]})
    } else {
        count.fetch_add(1, Ordering::SeqCst);
        let req: Json = serde_json::from_slice(&body).unwrap();
        let prompt = req["messages"][0]["content"].as_str().unwrap_or("");
        json!({
            "id": "chatcmpl-stub", "object": "chat.completion", "model": "stub",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": answer(prompt)}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
        })
    };
    let body = reply.to_string();
    let mut stream = stream;
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Runs `claw eval ARGS --json` and returns the report.
fn eval_json(args: &[&str]) -> Json {
    let out = claw()
        .arg("eval")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "claw eval {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn metric(report: &Json, name: &str) -> f64 {
    report["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("no metric {name} in {report}"))["value"]
        .as_f64()
        .unwrap()
}

// ---------------------------------------------------------------- GPQA

#[test]
fn gpqa_fixture_loads_and_shuffles_reproducibly_over_every_letter() {
    let questions = gpqa::load(&fixture("gpqa-mini.csv")).unwrap();
    assert_eq!(questions.len(), 12);
    // quoted fields with newlines, commas and doubled quotes
    assert!(questions[4]
        .question
        .contains("2 H2 + O2 -> 2 H2O.\nHow many"));
    assert_eq!(questions[5].incorrect[2], "farad, the unit of capacitance");
    assert_eq!(
        questions[9].question,
        "A \"codon\" consists of how many nucleotides?"
    );
    assert_eq!(questions[0].id, "recS01");

    let (prompts, asked) = gpqa::build(&questions, 4, 7);
    assert_eq!(prompts.len(), 48);
    // seeded: the same seed gives the same orders, another seed others
    assert_eq!(gpqa::build(&questions, 4, 7).1, asked);
    assert_ne!(gpqa::build(&questions, 4, 8).1, asked);
    // the correct answer lands on each letter, and the choices are a permutation
    let letters: HashSet<char> = asked.iter().map(|a| a.answer).collect();
    assert_eq!(letters.len(), 4, "{letters:?}");
    for (j, a) in asked.iter().enumerate() {
        let q = &questions[j / 4];
        let pos = gpqa::LETTERS.iter().position(|&l| l == a.answer).unwrap();
        assert_eq!(a.choices[pos], q.correct);
        let mut got = a.choices.to_vec();
        got.sort();
        let mut want = vec![q.correct.clone()];
        want.extend(q.incorrect.iter().cloned());
        want.sort();
        assert_eq!(got, want);
    }
    // the prompt lists the choices and asks for the answer line
    let text = claw::eval::prompt_text(&prompts[0]);
    assert!(text.contains("'Answer: $LETTER'") && text.contains("\nA) ") && text.contains("\nD) "));
}

#[test]
fn gpqa_grading_arithmetic() {
    let questions = gpqa::load(&fixture("gpqa-mini.csv")).unwrap();
    let questions = &questions[..2];
    let (prompts, asked) = gpqa::build(questions, 2, 0);
    let wrong = |a: char| if a == 'A' { 'B' } else { 'A' };
    // q1: right, right; q2: wrong, no answer
    let replies = vec![
        Ok(format!("thinking...\nAnswer: {}", asked[0].answer)),
        Ok(format!(
            "answer: ${}$ and later Answer: {}",
            asked[1].answer,
            wrong(asked[1].answer)
        )),
        Ok(format!("Answer: {}", wrong(asked[2].answer))),
        Err("timed out".to_string()),
    ];
    let (items, metrics) = gpqa::grade(questions, 2, &prompts, &asked, &replies);
    assert_eq!(
        items.iter().map(|i| i.correct).collect::<Vec<_>>(),
        [Some(true), Some(true), Some(false), Some(false)]
    );
    assert_eq!(items[3].error.as_deref(), Some("timed out"));
    assert_eq!(items[3].extracted, None);
    assert_eq!(metrics[0].name, "accuracy");
    assert!((metrics[0].value - 0.5).abs() < 1e-12);
    // two questions with per-question accuracy 1 and 0: sd = sqrt(0.5), se = 0.5
    let (lo, hi) = metrics[0].ci95.unwrap();
    assert!(
        (lo - 0.0).abs() < 1e-12 && (hi - 1.0).abs() < 1e-12,
        "{lo} {hi}"
    );
    assert_eq!(metrics[1].name, "invalid_rate");
    assert!((metrics[1].value - 0.25).abs() < 1e-12);
}

/// The letter of the correct choice in a GPQA prompt, from (question, answer) pairs.
fn letter_of(prompt: &str, answers: &[(String, String)]) -> char {
    let (_, correct) = answers
        .iter()
        .find(|(q, _)| prompt.contains(&format!("\n\n{q}\n\n")))
        .unwrap_or_else(|| panic!("unknown question in {prompt}"));
    for line in prompt.lines() {
        for l in gpqa::LETTERS {
            if line.strip_prefix(&format!("{l}) ")) == Some(correct.as_str()) {
                return l;
            }
        }
    }
    panic!("no correct choice in {prompt}");
}

#[test]
fn gpqa_against_stub_endpoints() {
    let questions = gpqa::load(&fixture("gpqa-mini.csv")).unwrap();
    let answers: Vec<(String, String)> = questions
        .iter()
        .map(|q| (q.question.clone(), q.correct.clone()))
        .collect();
    let (right_url, calls) =
        stub_endpoint(move |p| format!("Let me think.\nAnswer: {}", letter_of(p, &answers)));
    let data = fixture("gpqa-mini.csv");
    let data = data.to_str().unwrap();
    let report = eval_json(&["--bench", "gpqa", "--data", data, "--url", &right_url]);
    assert_eq!(report["score"], 1.0);
    assert_eq!(report["items"], 12);
    assert_eq!(report["calls"], 48);
    assert_eq!(calls.load(Ordering::SeqCst), 48);
    assert_eq!(metric(&report, "invalid_rate"), 0.0);

    // always "A": a quarter right in expectation; 25 repeats make it close
    let (a_url, _) = stub_endpoint(|_| "Answer: A".to_string());
    let report = eval_json(&[
        "--bench",
        "gpqa",
        "--data",
        data,
        "--url",
        &a_url,
        "--repeats",
        "25",
        "--seed",
        "3",
        "--concurrency",
        "8",
    ]);
    let acc = report["score"].as_f64().unwrap();
    assert!((0.15..=0.35).contains(&acc), "always-A accuracy {acc}");
    // reproducible with the same seed
    let again = eval_json(&[
        "--bench",
        "gpqa",
        "--data",
        data,
        "--url",
        &a_url,
        "--repeats",
        "25",
        "--seed",
        "3",
    ]);
    assert_eq!(again["score"], report["score"]);

    // --subset reads gpqa_SUBSET.csv in a directory; --out writes every item
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("gpqa-mini.csv"),
        dir.path().join("gpqa_diamond.csv"),
    )
    .unwrap();
    let out = dir.path().join("items.json");
    let report = eval_json(&[
        "--bench",
        "gpqa",
        "--data",
        dir.path().to_str().unwrap(),
        "--subset",
        "diamond",
        "--url",
        &a_url,
        "--repeats",
        "1",
        "--limit",
        "5",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(report["items"], 5);
    let doc: Json = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let items = doc["items"].as_array().unwrap();
    assert_eq!(items.len(), 5);
    assert_eq!(items[0]["extracted"], "A");
    assert_eq!(items[0]["response"], "Answer: A");
    let right = items.iter().filter(|i| i["correct"] == true).count() as f64;
    assert!((doc["report"]["score"].as_f64().unwrap() - right / 5.0).abs() < 1e-12);
}

// ---------------------------------------------------------------- GSM8K

#[test]
fn gsm8k_fixture_stub_fail_under_and_parquet() {
    let problems = gsm8k::load(&fixture("gsm8k-mini.jsonl")).unwrap();
    assert!(problems.len() >= 20);
    let by_question: HashMap<String, String> = problems
        .iter()
        .map(|p| (p.question.clone(), p.answer.clone()))
        .collect();
    let (url, _) = stub_endpoint(move |prompt| {
        let q = by_question
            .keys()
            .find(|q| prompt.ends_with(q.as_str()))
            .unwrap();
        format!("Step 1: think about 3 things.\nAnswer: {}", by_question[q])
    });
    let data = fixture("gsm8k-mini.jsonl");
    let data = data.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("items.parquet");
    let report = eval_json(&[
        "--bench",
        "gsm8k",
        "--data",
        data,
        "--url",
        &url,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(report["score"], 1.0);
    // the Parquet results file: one row per problem
    let file = std::fs::File::open(&out).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<_> = reader.map(Result::unwrap).collect();
    assert_eq!(
        batches.iter().map(|b| b.num_rows()).sum::<usize>(),
        problems.len()
    );
    let schema = batches[0].schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(
        names,
        [
            "bench",
            "target",
            "id",
            "sample",
            "prompt",
            "response",
            "extracted",
            "expected",
            "correct",
            "error"
        ]
    );
    let correct = batches[0]
        .column_by_name("correct")
        .unwrap()
        .as_any()
        .downcast_ref::<arrow::array::BooleanArray>()
        .unwrap();
    assert!(correct.iter().all(|c| c == Some(true)));

    // a wrong endpoint fails the gate with exit status 1 and says why
    let (zero_url, _) = stub_endpoint(|_| "Answer: -1".to_string());
    let out = claw()
        .args([
            "eval",
            "--bench",
            "gsm8k",
            "--data",
            data,
            "--url",
            &zero_url,
            "--fail-under",
            "0.5",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("below --fail-under 0.5"), "{stderr}");
    // the table is still printed
    assert!(String::from_utf8_lossy(&out.stdout).contains("accuracy"));
}

#[test]
fn results_to_a_device_are_written_in_place() {
    use std::os::unix::fs::FileTypeExt;
    let (url, _) = stub_endpoint(|_| "Answer: 0".to_string());
    let data = fixture("gsm8k-mini.jsonl");
    let run = |out: &str| {
        claw()
            .args([
                "eval", "--bench", "gsm8k", "--limit", "2", "--url", &url, "--data",
            ])
            .arg(&data)
            .args(["--out", out])
            .output()
            .unwrap()
    };
    let out = run("/dev/full");
    assert!(!out.status.success(), "eval --out /dev/full succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/dev/full") && err.contains("No space"),
        "{err}"
    );
    let out = run("/dev/null");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for dev in ["/dev/full", "/dev/null"] {
        let ft = std::fs::metadata(dev).unwrap().file_type();
        assert!(ft.is_char_device(), "{dev} was replaced");
    }
}

#[test]
fn bad_inputs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"question\": \"q\", \"answer\": \"#### 3\"}\n{\"question\": \"q\"}\n",
    )
    .unwrap();
    let out = claw()
        .args([
            "eval",
            "--bench",
            "gsm8k",
            "--data",
            bad.to_str().unwrap(),
            "--url",
            "http://127.0.0.1:9",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.jsonl:2") && stderr.contains("`answer`"),
        "{stderr}"
    );

    let out = claw()
        .args([
            "eval",
            "--bench",
            "ppl",
            "--data",
            "x.txt",
            "--url",
            "http://127.0.0.1:9",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("local model"));
}

// ---------------------------------------------------------------- sandbox

/// The sandbox, or None with a visible message where this machine cannot
/// give one (no python3, or no unprivileged namespaces).
fn sandbox(timeout_s: u64) -> Option<Sandbox> {
    if Command::new("python3")
        .args(["-c", "pass"])
        .status()
        .map_or(true, |s| !s.success())
    {
        eprintln!("SKIP: no python3 on PATH: the sandbox tests need it");
        return None;
    }
    let sb = Sandbox::new(
        "python3",
        Limits {
            timeout: Duration::from_secs(timeout_s),
            memory_bytes: 512 << 20,
            ..Limits::default()
        },
        false,
    );
    match sb {
        Ok(sb) => Some(sb),
        Err(e) if format!("{e:#}").contains("no user namespaces") => {
            eprintln!("SKIP: no namespaces for the sandbox here: {e:#}");
            None
        }
        Err(e) => panic!("the sandbox cannot start: {e:#}"),
    }
}

/// A name no other test or run uses.
fn unique(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "claw-{tag}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Host processes whose command line contains `needle` (zombies excluded).
fn host_processes_with(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = entry.file_name().to_string_lossy().to_string();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains(needle) {
            continue;
        }
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        if stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        {
            found.push(format!("{pid}: {}", String::from_utf8_lossy(&cmdline)));
        }
    }
    found
}

/// A directory others may read (as a claw data directory usually is), with a
/// world-readable file in it.
fn readable_dir_with_file(base: &Path, name: &str, content: &str) -> (tempfile::TempDir, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("claw-data-")
        .tempdir_in(base)
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let file = dir.path().join(name);
    std::fs::write(&file, content).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    (dir, file)
}

#[test]
fn sandbox_runs_good_and_bad_programs() {
    let Some(sb) = sandbox(5) else { return };
    assert!(sb.isolated());
    let ok = sb.run("print('hi')\n").unwrap();
    assert!(ok.passed && ok.stdout == "hi\n", "{ok:?}");
    let bad = sb.run("assert 1 == 2\n").unwrap();
    assert!(!bad.passed && !bad.timed_out);
    assert!(bad.failure().unwrap().contains("AssertionError"), "{bad:?}");
    // tracebacks show the program's own lines
    assert!(bad.stderr.contains("assert 1 == 2"), "{bad:?}");
    let syntax = sb.run("def f(:\n").unwrap();
    assert!(!syntax.passed);
    assert!(
        syntax.failure().unwrap().contains("SyntaxError"),
        "{syntax:?}"
    );
    // each program starts in an empty private directory, with no environment
    // of ours, and its files are gone for the next one
    let r = sb
        .run("import os\nassert os.listdir('.') == [], os.listdir('.')\nassert 'CARGO' not in ''.join(os.environ)\nopen('x', 'w').write('1')\n")
        .unwrap();
    assert!(r.passed, "{r:?}");
    let r = sb
        .run("import os\nassert not os.path.exists('x')\n")
        .unwrap();
    assert!(r.passed, "{r:?}");
    // what HumanEval solutions import works
    let r = sb
        .run("import math, re, string, itertools, collections, functools, heapq, hashlib, typing, fractions, random, statistics, decimal, json\nprint(hashlib.md5(b'a').hexdigest()[:4], random.random() < 1)\n")
        .unwrap();
    assert!(r.passed && r.stdout == "0cc1 True\n", "{r:?}");
}

#[test]
fn sandbox_passes_only_programs_that_run_to_their_end() {
    let Some(sb) = sandbox(5) else { return };
    for early in [
        "import os\nos._exit(0)\n",
        "raise SystemExit(0)\n",
        "import sys\nsys.exit()\n",
        "exit(0)\n",
        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
        // a marker of its own making does not count
        "import sys\nfor fd in range(3, 64):\n    try:\n        __import__('os').write(fd, b'PASS')\n    except OSError:\n        pass\nsys.stdout.write('PASS\\n')\n__import__('os')._exit(0)\n",
    ] {
        let program = format!("{early}assert False, 'the tests ran'\n");
        let r = sb.run(&program).unwrap();
        assert!(!r.passed, "{early:?} passed: {r:?}");
        let why = r.failure().unwrap();
        assert!(!why.contains("the tests ran"), "{early:?}: {why}");
    }
    let r = sb.run("import os\nos._exit(0)\n").unwrap();
    assert!(
        r.failure().unwrap().contains("before its end"),
        "{:?}",
        r.failure()
    );
    // a program that ends normally passes whatever it leaves behind
    let r = sb
        .run("import atexit, os\natexit.register(lambda: os._exit(3))\nprint('done')\n")
        .unwrap();
    assert!(r.passed, "{r:?}");

    // HumanEval: a completion that exits before (or while) check() runs fails
    let problem = humaneval::Problem {
        task_id: "Test/0".into(),
        prompt: "def add(a, b):\n".into(),
        canonical_solution: "    return a + b\n".into(),
        test: "def check(candidate):\n    assert candidate(1, 2) == 3\n".into(),
        entry_point: "add".into(),
    };
    let good = sb
        .check(&humaneval::program(&problem, &problem.canonical_solution))
        .unwrap();
    assert!(good.passed, "{good:?}");
    for completion in [
        "    return 0\nraise SystemExit(0)\n",
        "    import sys; sys.exit(0)\n",
        "    import os; os._exit(0)\n",
        "    return 0\nimport os\nos._exit(0)\n",
    ] {
        let r = sb.check(&humaneval::program(&problem, completion)).unwrap();
        assert!(!r.passed, "{completion:?} passed: {r:?}");
    }
}

/// Looks for the verdict's nonce (32 hex digits) in every frame and object it
/// can reach, writes each candidate to every descriptor, and exits 0.
const FORGER: &str = "    import gc, os, re, sys\n    found = set()\n    def look(v):\n        if isinstance(v, bytes):\n            v = v.decode('latin-1')\n        if isinstance(v, str) and re.fullmatch('[0-9a-f]{32}', v):\n            found.add(v.encode())\n    f = sys._getframe()\n    while f is not None:\n        for v in f.f_locals.values():\n            look(v)\n        f = f.f_back\n    for o in gc.get_objects():\n        look(o)\n    for nonce in found:\n        for fd in range(3, 64):\n            try:\n                os.pwrite(fd, nonce, 0)\n            except OSError:\n                pass\n    os._exit(0)\n";

#[test]
fn humaneval_verdicts_cannot_be_forged() {
    let Some(sb) = sandbox(10) else { return };
    let problem = humaneval::Problem {
        task_id: "Test/1".into(),
        prompt: "from collections import Counter, namedtuple\n\ndef add(a, b):\n".into(),
        canonical_solution: "    return a + b\n".into(),
        test: "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate([1], [2.5]) == [1, 2.5]\n    assert candidate('a', 'b') == 'ab'\n".into(),
        entry_point: "add".into(),
    };
    let good = sb
        .check(&humaneval::program(&problem, &problem.canonical_solution))
        .unwrap();
    assert!(good.passed, "{good:?}");
    // Subclasses of plain values cross as the plain values they are.
    let sub = "    class Sum(type(a)):\n        pass\n    return Sum(a + b)\n";
    let r = sb.check(&humaneval::program(&problem, sub)).unwrap();
    assert!(r.passed, "{r:?}");

    // The frame-walking forger finds the nonce where the program shares the
    // harness's process (what `run` documents)...
    let in_process = format!(
        "{}{FORGER}\n\n{}\n\ncheck({})\n",
        problem.prompt, problem.test, problem.entry_point
    );
    let r = sb.run(&in_process).unwrap();
    assert!(
        r.passed,
        "the forger is no test if it cannot forge here: {r:?}"
    );
    // ...and nothing in the checked candidate's process.
    let hostile = [
        FORGER,
        // an answer equal to everything, bare or as an int
        "    class Any:\n        def __eq__(self, other):\n            return True\n    return Any()\n",
        "    class Any(int):\n        def __eq__(self, other):\n            return True\n        __hash__ = int.__hash__\n    return Any(0)\n",
        // ending the checker, or the whole sandbox, early
        "    import os\n    os.kill(os.getppid(), 9)\n",
        "    import os\n    os.kill(-1, 9)\n",
        "    raise SystemExit(0)\n",
        // at import, before any test
        "    return a + b\nimport os\nos._exit(0)\n",
    ];
    for completion in hostile {
        let r = sb.check(&humaneval::program(&problem, completion)).unwrap();
        assert!(!r.passed && !r.completed, "{completion:?} passed: {r:?}");
    }
    let r = sb
        .check(&humaneval::program(&problem, "    return 1 / 0\n"))
        .unwrap();
    assert_eq!(r.failure().unwrap(), "ZeroDivisionError: division by zero");

    // The checker cannot be traced by the candidate (it would read the nonce).
    let tracer = humaneval::Problem {
        prompt: "def attach():\n".into(),
        test: "def check(candidate):\n    assert candidate() == 'EPERM'\n".into(),
        entry_point: "attach".into(),
        ..problem
    };
    let attach = "    import ctypes, errno, os\n    libc = ctypes.CDLL(None, use_errno=True)\n    if libc.ptrace(16, os.getppid(), 0, 0) == 0:\n        return 'attached'\n    return errno.errorcode[ctypes.get_errno()]\n";
    let r = sb.check(&humaneval::program(&tracer, attach)).unwrap();
    assert!(r.passed, "{r:?}");
}

#[test]
fn sandbox_kills_an_endless_loop_at_the_timeout() {
    let Some(sb) = sandbox(2) else { return };
    let start = Instant::now();
    let r = sb.run("while True:\n    pass\n").unwrap();
    assert!(r.timed_out && !r.passed, "{r:?}");
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn sandbox_contains_a_fork_bomb() {
    let Some(sb) = sandbox(3) else { return };
    let start = Instant::now();
    let r = sb
        .run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
        .unwrap();
    assert!(!r.passed, "{r:?}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    // The process limit held: a program can count its failed forks.
    let r = sb
        .run(
            "import os, time\nkids = 0\nfor _ in range(100):\n    try:\n        if os.fork() == 0:\n            time.sleep(30)\n            os._exit(0)\n        kids += 1\n    except OSError:\n        break\nprint(kids)\n",
        )
        .unwrap();
    let kids: usize = r.stdout.trim().parse().unwrap_or_else(|_| panic!("{r:?}"));
    assert!(
        kids < Limits::default().processes as usize,
        "{kids} children"
    );
}

#[test]
fn sandbox_leaves_no_process_behind() {
    let Some(sb) = sandbox(3) else { return };
    // A child of its own, and a daemon in a new session (which a process-group
    // kill misses), each an exec'd `sleep` with a duration no one else uses.
    let spawn = |secs: &str| {
        format!(
            "import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        os.execvp('sleep', ['sleep', '{secs}'])\n    os._exit(0)\nif os.fork() == 0:\n    os.execvp('sleep', ['sleep', '{secs}1'])\nimport time\ntime.sleep(0.3)\n"
        )
    };
    let secs = format!("{}.{}", 200 + std::process::id() % 97, std::process::id());
    let r = sb.run(&spawn(&secs)).unwrap();
    assert!(r.passed, "{r:?}");
    // gone by the time run() returns
    let left = host_processes_with(&format!("sleep\0{secs}"));
    assert!(left.is_empty(), "left behind: {left:?}");

    // and when the program is killed at its timeout
    let secs = format!("{}.{}", 300 + std::process::id() % 97, std::process::id());
    let r = sb
        .run(&format!("{}while True:\n    pass\n", spawn(&secs)))
        .unwrap();
    assert!(r.timed_out, "{r:?}");
    let start = Instant::now();
    let mut left = host_processes_with(&format!("sleep\0{secs}"));
    while !left.is_empty() && start.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
        left = host_processes_with(&format!("sleep\0{secs}"));
    }
    assert!(left.is_empty(), "left behind after the timeout: {left:?}");
}

#[test]
fn sandbox_kill_all_reaches_only_the_program_itself() {
    let Some(sb) = sandbox(10) else { return };
    let sleeper = "import time\ntime.sleep(2)\nprint('survived')\n".to_string();
    let killer = "import os, time\nfor _ in range(30):\n    try:\n        os.kill(-1, 9)\n    except OSError:\n        pass\n    time.sleep(0.1)\n"
        .to_string();
    let programs = vec![sleeper.clone(), killer.clone(), sleeper, killer];
    let ran = humaneval::run_programs(&sb, &programs, 4, &|| {}).unwrap();
    for (i, r) in ran.iter().enumerate() {
        assert!(r.passed, "program {i} was killed: {r:?}");
    }
    assert_eq!(ran[0].stdout, "survived\n");
}

#[test]
fn sandbox_sees_no_host_files() {
    let Some(sb) = sandbox(5) else { return };
    // A data directory as claw's are (world-readable), in the temp dir and in
    // the build tree, and this user's home.
    let (_tmp_data, in_tmp) = readable_dir_with_file(
        &std::env::temp_dir(),
        "conversations.jsonl",
        "{\"secret\": \"recorded chat\"}\n",
    );
    let (_tree_data, in_tree) = readable_dir_with_file(
        Path::new(env!("CARGO_TARGET_TMPDIR")),
        "segment.parquet",
        "PAR1 secret",
    );
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let program = format!(
        "import os\nseen = []\nfor p in [{:?}, {:?}, os.path.dirname({:?}), {:?}, {:?}, '/etc/passwd', '/proc/self/environ']:\n    try:\n        if os.path.isdir(p):\n            os.listdir(p)\n        else:\n            open(p).read()\n        seen.append(p)\n    except OSError:\n        pass\nassert not seen, seen\nprint(sorted(os.listdir('/')))\n",
        in_tmp.display().to_string(),
        in_tree.display().to_string(),
        in_tree.display().to_string(),
        home,
        env!("CARGO_MANIFEST_DIR"),
    );
    let r = sb.run(&program).unwrap();
    assert!(r.passed, "the program read host files: {r:?}");
    // writes to what it does see fail
    let r = sb
        .run("import os\nfor p in ['/usr/claw-probe', '/claw-probe', '/etc/claw-probe']:\n    try:\n        open(p, 'w')\n        raise SystemExit('wrote ' + p)\n    except OSError:\n        pass\n")
        .unwrap();
    assert!(r.passed, "{r:?}");
    assert!(!Path::new("/usr/claw-probe").exists());
}

#[test]
fn sandbox_temp_dirs_are_private() {
    let Some(sb) = sandbox(5) else { return };
    let name = unique("leak");
    let program = format!(
        "for d in ['/tmp', '/dev/shm', '/var/tmp']:\n    with open(d + '/{name}', 'w') as f:\n        f.write('x')\n"
    );
    let r = sb.run(&program).unwrap();
    let leaked: Vec<_> = ["/tmp", "/dev/shm", "/var/tmp"]
        .iter()
        .map(|d| Path::new(d).join(&name))
        .filter(|p| p.exists())
        .collect();
    for p in &leaked {
        let _ = std::fs::remove_file(p);
    }
    assert!(r.passed, "the sandbox's temp dirs are not writable: {r:?}");
    assert!(leaked.is_empty(), "written on the host: {leaked:?}");
    // and the next program does not see them
    let r = sb
        .run(&format!(
            "import os\nassert not os.path.exists('/tmp/{name}')\n"
        ))
        .unwrap();
    assert!(r.passed, "{r:?}");
}

#[test]
fn sandbox_programs_cannot_see_each_other() {
    let Some(sb) = sandbox(10) else { return };
    let marker = unique("secret-source");
    let victim = format!("import time\n# {marker}\ntime.sleep(2)\n");
    // Looks for the other program's source wherever the sandbox keeps it.
    let spy = format!(
        "import os, time\ntime.sleep(0.5)\nfound = []\ntmp = {:?}\nroots = [os.path.join(tmp, d) for d in os.listdir(tmp) if d.startswith('claw-sandbox')]\nfor root in roots + ['/tmp', '/var/tmp', '/dev/shm']:\n    for top, dirs, files in os.walk(root):\n        for f in files:\n            try:\n                with open(os.path.join(top, f), 'rb') as h:\n                    if ({:?} + {:?}).encode() in h.read():\n                        found.append(os.path.join(top, f))\n            except OSError:\n                pass\nassert not found, found\n",
        std::env::temp_dir().display().to_string(),
        &marker[..8],
        &marker[8..],
    );
    let ran = humaneval::run_programs(&sb, &[victim, spy], 2, &|| {}).unwrap();
    assert!(ran[0].passed, "{:?}", ran[0]);
    assert!(
        ran[1].passed,
        "one program read another's source: {:?}",
        ran[1]
    );
}

#[test]
fn sandbox_cannot_reach_host_unix_sockets() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::{SocketAddr, UnixListener};
    let Some(sb) = sandbox(5) else { return };
    let dir = tempfile::Builder::new()
        .prefix("claw-sock-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let abstract_name = unique("abstract");
    let abstract_listener =
        UnixListener::bind_addr(&SocketAddr::from_abstract_name(abstract_name.as_bytes()).unwrap())
            .unwrap();
    abstract_listener.set_nonblocking(true).unwrap();
    let program = format!(
        "import socket\nreached = []\nfor addr in [{:?}, '\\0' + {:?}]:\n    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n    try:\n        s.connect(addr)\n        s.sendall(b'leak')\n        reached.append(addr)\n    except OSError:\n        pass\nassert not reached, reached\n",
        path.display().to_string(),
        abstract_name
    );
    let r = sb.run(&program).unwrap();
    assert!(r.passed, "the program reached a host socket: {r:?}");
    assert!(listener.accept().is_err(), "a connection came in");
    assert!(abstract_listener.accept().is_err(), "a connection came in");
}

#[test]
fn sandbox_bounds_memory() {
    let Some(sb) = sandbox(10) else { return };
    let start = Instant::now();
    let r = sb
        .run("chunks = []\nwhile True:\n    chunks.append(bytearray(50 << 20))\n")
        .unwrap();
    assert!(!r.passed && !r.timed_out, "{r:?}");
    assert!(r.failure().unwrap().contains("MemoryError"), "{r:?}");
    assert!(start.elapsed() < Duration::from_secs(8));
    // file size: writing past the limit fails
    let r = sb
        .run("with open('big', 'wb') as f:\n    for _ in range(64):\n        f.write(b'x' * (1 << 20))\n")
        .unwrap();
    assert!(!r.passed, "{r:?}");
}

#[test]
fn sandbox_has_no_network() {
    // A server on this machine's loopback that the program tries to reach.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let Some(sb) = sandbox(5) else { return };
    let program = format!(
        "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'leak')\nprint('connected')\n"
    );
    let r = sb.run(&program).unwrap();
    assert!(!r.passed, "{r:?}");
    assert!(!r.stdout.contains("connected"));
    let err = r.failure().unwrap();
    assert!(err.contains("OSError") || err.contains("Error"), "{err}");
    assert!(
        listener.accept().is_err(),
        "the program reached the host's loopback"
    );
    // and no interface but a downed loopback
    let r = sb
        .run("import socket\nprint([n for _, n in socket.if_nameindex()])\n")
        .unwrap();
    assert!(r.passed && r.stdout.trim() == "['lo']", "{r:?}");
}

// ---------------------------------------------------------------- HumanEval

fn humaneval_data() -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(humaneval::DEFAULT_DATA);
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "SKIP: {} is absent (run scripts/fetch-data humaneval)",
            path.display()
        );
        None
    }
}

#[test]
fn humaneval_canonical_solutions_all_pass_and_empty_completions_none() {
    let Some(path) = humaneval_data() else { return };
    let problems = humaneval::load(&path).unwrap();
    assert_eq!(problems.len(), 164);
    let Some(sb) = sandbox(20) else { return };
    let settings = humaneval::Settings {
        samples: 1,
        ks: &[1],
        workers: 2,
        data: "HumanEval",
    };
    let outcome = humaneval::run_canonical(&sb, &problems, &settings, &|| {}).unwrap();
    let failed: Vec<_> = outcome
        .items
        .iter()
        .filter(|i| i.correct != Some(true))
        .map(|i| format!("{}: {:?}", i.id, i.error))
        .collect();
    assert!(failed.is_empty(), "canonical solutions failed: {failed:?}");
    assert_eq!(outcome.report.score, 1.0);

    // An empty completion leaves a function with only its docstring: it returns
    // None, and no problem's tests accept that.
    let programs: Vec<_> = problems.iter().map(|p| humaneval::program(p, "")).collect();
    let ran = humaneval::run_programs(&sb, &programs, 2, &|| {}).unwrap();
    let passed: Vec<_> = problems
        .iter()
        .zip(&ran)
        .filter(|(_, r)| r.passed)
        .map(|(p, _)| &p.task_id)
        .collect();
    assert!(passed.is_empty(), "empty completions passed: {passed:?}");
}

#[test]
fn humaneval_through_the_cli_with_a_stub_model() {
    let Some(path) = humaneval_data() else { return };
    let problems = humaneval::load(&path).unwrap();
    let solutions: HashMap<String, String> = problems
        .iter()
        .take(6)
        .map(|p| (p.prompt.clone(), p.canonical_solution.clone()))
        .collect();
    // A chat model that answers in a fence with the whole function (prompt and
    // canonical body), and explains itself afterwards.
    let (url, _) = stub_endpoint(move |prompt| {
        let (stub, body) = solutions
            .iter()
            .find(|(s, _)| prompt.contains(s.as_str()))
            .unwrap();
        format!("Here you go:\n```python\n{stub}{body}```\nThis works because...\n")
    });
    let report = eval_json(&[
        "--bench",
        "humaneval",
        "--data",
        path.to_str().unwrap(),
        "--url",
        &url,
        "--limit",
        "6",
        "--samples",
        "2",
        "--k",
        "1,2,5",
    ]);
    assert_eq!(metric(&report, "pass@1"), 1.0);
    assert_eq!(metric(&report, "pass@2"), 1.0);
    assert_eq!(metric(&report, "problems_solved"), 6.0);
    assert!(report["notes"].to_string().contains("pass@5 needs"));
}

#[test]
fn humaneval_early_exits_score_zero_through_the_cli() {
    if sandbox(5).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("he.jsonl");
    let problems = [
        (
            "add",
            "def add(a, b):\n",
            "    return a + b\n",
            "assert candidate(2, 3) == 5",
        ),
        (
            "neg",
            "def neg(x):\n",
            "    return -x\n",
            "assert candidate(4) == -4",
        ),
    ];
    let lines: Vec<String> = problems
        .iter()
        .enumerate()
        .map(|(i, (name, prompt, solution, test))| {
            json!({
                "task_id": format!("Test/{i}"),
                "prompt": prompt,
                "canonical_solution": solution,
                "test": format!("def check(candidate):\n    {test}\n"),
                "entry_point": name,
            })
            .to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let run = |reply: &'static str| {
        let (url, _) = stub_endpoint(move |_| reply.to_string());
        eval_json(&[
            "--bench",
            "humaneval",
            "--data",
            data.to_str().unwrap(),
            "--url",
            &url,
            "--exec-timeout",
            "5",
        ])
    };
    // a body that exits before check() can fail, and one that leaves at import
    for reply in [
        "```python\n    raise SystemExit(0)\n```",
        "```python\nimport os\nos._exit(0)\ndef add(a, b):\n    return a + b\ndef neg(x):\n    return -x\n```",
        "```python\n    import sys\n    sys.exit(0)\n```",
    ] {
        let report = run(reply);
        assert_eq!(metric(&report, "pass@1"), 0.0, "{reply:?}: {report}");
    }
    // the canonical solutions pass through the same path
    let out = claw()
        .args([
            "eval",
            "--bench",
            "humaneval",
            "--canonical",
            "--json",
            "--data",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(metric(&report, "pass@1"), 1.0, "{report}");
}

// ---------------------------------------------------------------- local vs serve

/// The tiny test model with room for benchmark prompts (its vocabulary is
/// mostly single bytes, so they are long), written in `dir`.
fn tiny_long_model(dir: &Path) -> PathBuf {
    let model = dir.join("tiny-long.gguf");
    write_tiny_gguf(
        &model,
        &TinySpec {
            context: 2048,
            ..TinySpec::default()
        },
    )
    .unwrap();
    model
}

#[test]
fn local_and_served_tiny_model_give_the_same_results() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_long_model(dir.path());
    let data = fixture("gsm8k-mini.jsonl");
    let common = [
        "--bench",
        "gsm8k",
        "--data",
        data.to_str().unwrap(),
        "--limit",
        "4",
        "--max-tokens",
        "12",
        "--seed",
        "5",
    ];
    let local_out = dir.path().join("local.json");
    let status = claw()
        .arg("eval")
        .args(common)
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(&local_out)
        .env("RAYON_NUM_THREADS", "1")
        .status()
        .unwrap();
    assert!(status.success());
    let (mut server, url, _log) = spawn_server(&model, &dir.path().join("serve"), &[]);
    let served_out = dir.path().join("served.json");
    let status = claw()
        .arg("eval")
        .args(common)
        .args(["--url", &url, "--out"])
        .arg(&served_out)
        .env_remove("CLAW_MODEL")
        .status()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert!(status.success());
    let read =
        |p: &Path| -> Json { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
    let (local, served) = (read(&local_out), read(&served_out));
    let responses = |d: &Json| -> Vec<String> {
        d["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["response"].as_str().unwrap().to_string())
            .collect()
    };
    for d in [&local, &served] {
        let errors: Vec<&Json> = d["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| &i["error"])
            .collect();
        assert!(errors.iter().all(|e| e.is_null()), "{errors:?}");
    }
    assert_eq!(responses(&local), responses(&served));
    assert!(responses(&local).iter().any(|r| !r.is_empty()));
    assert_eq!(local["report"]["score"], served["report"]["score"]);
}

#[test]
fn ppl_on_the_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let data = fixture("ppl-mini.txt");
    let args = [
        "--bench",
        "ppl",
        "--data",
        data.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
    ];
    let report = eval_json(&args);
    let ppl = metric(&report, "perplexity");
    let bpb = metric(&report, "bits_per_byte");
    let nll = metric(&report, "nll_per_token");
    let tokens = metric(&report, "tokens");
    let bytes = metric(&report, "bytes");
    assert!(ppl.is_finite() && ppl > 1.0, "{report}");
    assert!((ppl.ln() - nll).abs() < 1e-9);
    assert!((bpb - nll * tokens / std::f64::consts::LN_2 / bytes).abs() < 1e-9);
    // windows change the context, not the accounting: every token is scored
    let small = eval_json(&[&args[..], &["--window", "8"]].concat());
    assert_eq!(metric(&small, "tokens"), tokens);
    assert!(small["items"].as_u64().unwrap() > 1);
}

#[test]
fn help_teaches() {
    let out = claw().args(["eval", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--bench",
        "gpqa",
        "humaneval",
        "pass@k",
        "facts",
        "retention",
        "--no-retention",
        "--fail-under",
        "--unsafe-no-sandbox",
        "Examples:",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}");
    }
}

// ---------------------------------------------------------------- facts

#[test]
fn facts_against_a_stub_endpoint() {
    let questions = claw::eval::facts::builtin().unwrap();
    assert!(questions.len() >= 40);
    // right on every other question, in a sentence with other words around it
    let answers: HashMap<String, (usize, String)> = questions
        .iter()
        .enumerate()
        .map(|(i, q)| (q.question.clone(), (i, q.answers[0].clone())))
        .collect();
    let (url, calls) = stub_endpoint(move |prompt| {
        let (i, answer) = answers
            .iter()
            .find(|(q, _)| prompt.ends_with(q.as_str()))
            .map(|(_, a)| a.clone())
            .unwrap();
        if i % 2 == 0 {
            format!("I believe it is {}.", answer.to_uppercase())
        } else {
            format!("Surely not x{answer}x.")
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("items.json");
    let report = eval_json(&[
        "--bench",
        "facts",
        "--url",
        &url,
        "--out",
        out.to_str().unwrap(),
    ]);
    let n = questions.len();
    assert_eq!(calls.load(Ordering::SeqCst), n);
    assert_eq!(report["bench"], "facts");
    assert_eq!(report["items"].as_u64().unwrap() as usize, n);
    let right = n.div_ceil(2) as f64;
    assert!(
        (report["score"].as_f64().unwrap() - right / n as f64).abs() < 1e-12,
        "{report}"
    );
    let ci = &report["metrics"][0]["ci95"];
    assert!(ci[0].as_f64().unwrap() < report["score"].as_f64().unwrap());
    let doc: Json = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let items = doc["items"].as_array().unwrap();
    assert_eq!(items.len(), n);
    assert_eq!(items[0]["correct"], true);
    assert_eq!(items[0]["extracted"], questions[0].answers[0].as_str());
    assert_eq!(items[1]["correct"], false);

    // --data, --limit and the gate
    let file = dir.path().join("mine.jsonl");
    std::fs::write(
        &file,
        "{\"question\": \"What is the capital of France?\", \"answers\": [\"Paris\"]}\n",
    )
    .unwrap();
    let (wrong, _) = stub_endpoint(|_| "Lyon".to_string());
    let out = claw()
        .args([
            "eval",
            "--bench",
            "facts",
            "--url",
            &wrong,
            "--fail-under",
            "0.5",
        ])
        .arg("--data")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("below --fail-under 0.5"), "{stderr}");
    // a bad file is named with its line
    std::fs::write(&file, "{\"question\": \"Q?\"}\n").unwrap();
    let out = claw()
        .args(["eval", "--bench", "facts", "--url", &wrong, "--data"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("mine.jsonl:1: `answers`"), "{stderr}");
}

// ---------------------------------------------------------------- retention

/// A fresh LoRA (B = 0) for `model`: the adapted model equals the base.
fn fresh_adapter(model: &Path, dir: &Path) -> PathBuf {
    use claw::adapter::{Adapter, LoraConfig};
    let loaded = claw::model::Model::load(model).unwrap();
    let adapter = Adapter::new(&loaded.decoder, LoraConfig::default(), 7).unwrap();
    let path = dir.join("adapter-000000.safetensors");
    std::fs::write(&path, adapter.to_safetensors().unwrap()).unwrap();
    std::fs::write(
        path.with_extension("json"),
        serde_json::to_string(&adapter.file_config(&loaded.name, 0)).unwrap(),
    )
    .unwrap();
    path
}

#[test]
fn retention_of_a_fresh_adapter_is_kept_with_ratio_one() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_long_model(dir.path());
    let adapter = fresh_adapter(&model, dir.path());
    let out = dir.path().join("retention.json");
    let report = eval_json(&[
        "--bench",
        "retention",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--limit",
        "3",
        "--max-tokens",
        "8",
        "--fail-under",
        "0.95",
        "--out",
        out.to_str().unwrap(),
    ]);
    let rows = report["rows"].as_array().unwrap();
    let metrics: Vec<&str> = rows.iter().map(|r| r["metric"].as_str().unwrap()).collect();
    assert_eq!(metrics, ["gsm8k accuracy", "facts accuracy", "perplexity"]);
    for row in rows {
        assert_eq!(row["ratio"], 1.0, "{row}");
        assert_eq!(row["kept"], true, "{row}");
        assert_eq!(row["base"], row["adapted"], "{row}");
    }
    assert_eq!(report["kept"], true);
    assert_eq!(
        (
            report["gsm8k_items"].as_u64(),
            report["facts_items"].as_u64()
        ),
        (Some(3), Some(3))
    );
    assert!(report["base"]["perplexity"].as_f64().unwrap() > 1.0);
    assert!(report["adapted"]["model"]
        .as_str()
        .unwrap()
        .ends_with("+adapter-000000"));
    // every item of both models, the same replies
    let doc: Json = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    for bench in ["gsm8k", "facts", "ppl"] {
        let (base, adapted) = (
            &doc["items"]["base"][bench],
            &doc["items"]["adapted"][bench],
        );
        assert!(!base.as_array().unwrap().is_empty(), "{bench}");
        assert_eq!(base, adapted, "{bench}");
    }

    // the text table
    let out = claw()
        .args([
            "eval",
            "--bench",
            "retention",
            "--limit",
            "2",
            "--max-tokens",
            "4",
        ])
        .arg("--model")
        .arg(&model)
        .arg("--adapter")
        .arg(&adapter)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("| perplexity |"), "{text}");
    assert!(text.contains("| 1.000 | kept |"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("kept: ")), "{text}");

    // it needs an adapter, and the local model
    let out = claw()
        .args(["eval", "--bench", "retention"])
        .arg("--model")
        .arg(&model)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--adapter"));
}
