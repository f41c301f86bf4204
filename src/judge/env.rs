//! The environment-outcome source: a tool result that plainly reports a failure
//! caused by the assistant's action scores -1, with no LLM call.
//!
//! Only next states with role `tool` are looked at: a user who pastes a traceback
//! is talking about something, not reporting the outcome of the assistant's tool
//! call, and is left to the LLM judge. The rules are deliberately conservative (a
//! false -1 trains the model away from a good action), and they only detect
//! failures: a tool result without an error is not evidence that the action was
//! right (the assistant may have read the wrong file successfully), so it gets no
//! verdict here and goes on to the next source (the LLM judge by default).
//!
//! Rules that look for an error *message* only read the first and last
//! [`EDGE_LINES`] non-empty lines, where shells, compilers and interpreters put
//! them, so a tool that prints a file which happens to contain "Error:" in the
//! middle is not taken for a failure.

use std::sync::OnceLock;

use regex::Regex;
use serde_json::Value as Json;

/// How many non-empty lines at the start and at the end of a tool result the
/// error-message rules read.
pub const EDGE_LINES: usize = 3;

/// One rule: its name (stored in `judge_raw`) and what it matches (for `--help`).
pub struct Rule {
    pub name: &'static str,
    pub describe: &'static str,
}

/// Every rule, in the order they are tried. `claw judge --help` lists them.
pub const RULES: &[Rule] = &[
    Rule {
        name: "traceback",
        describe: "a Python traceback: \"Traceback (most recent call last)\" anywhere",
    },
    Rule {
        name: "exit-status",
        describe: "a non-zero exit status anywhere: \"exit code: 2\", \"exit status 1\", \
                   \"exited with code 127\", \"returned non-zero exit status 1\", \
                   \"exit_code\": 1, \"returncode\": 1 (0 is success)",
    },
    Rule {
        name: "is-error",
        describe: "a JSON result flagged as an error: \"is_error\": true or \"isError\": true \
                   anywhere, or a JSON object whose top-level \"error\" is a non-empty \
                   string or object",
    },
    Rule {
        name: "error-line",
        describe: "an edge line that starts with \"error:\", \"Error:\", \"ERROR:\", \
                   \"error[E0425]:\", \"fatal:\" or \"npm ERR!\"",
    },
    Rule {
        name: "exception-line",
        describe: "an edge line that starts with an exception name and a colon: \
                   \"ValueError: ...\", \"java.io.IOException: ...\"",
    },
    Rule {
        name: "os-error",
        describe: "an edge line that contains \"command not found\", \"is not recognized as \
                   an internal or external command\", \"No such file or directory\", \
                   \"Permission denied\", \"Segmentation fault\" or \"panicked at\"",
    },
];

/// A failure found in a tool result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvError {
    /// The rule that matched (one of [`RULES`]).
    pub rule: &'static str,
    /// The matched text, trimmed to one line.
    pub evidence: String,
}

impl EnvError {
    /// The text stored in `judge_raw` for an env verdict.
    pub fn describe(&self) -> String {
        format!("env rule {}: {}", self.rule, self.evidence)
    }
}

fn regexes() -> &'static [(&'static str, Regex)] {
    static RES: OnceLock<Vec<(&'static str, Regex)>> = OnceLock::new();
    RES.get_or_init(|| {
        let re = |s: &str| Regex::new(s).expect("built-in env rule regex");
        vec![
            ("traceback", re(r"Traceback \(most recent call last\)")),
            (
                "exit-status",
                re(concat!(
                    r"(?i)(?:\bexit(?:ed)?[ _-]?(?:code|status)(?: of)?|\bexited with (?:code|status)",
                    r#"|returned non-zero exit status|"exit_?code"|"returncode"|"#,
                    r"\breturn ?code)",
                    r#"["']?\s*[:=]?\s*(-?\d+)"#,
                )),
            ),
            ("is-error", re(r#""(?:is_error|isError)"\s*:\s*true\b"#)),
            (
                "error-line",
                re(r"^(?:(?i:error)(?:\[[A-Za-z]*\d+\])?:|(?i:fatal):|npm ERR!)"),
            ),
            (
                "exception-line",
                re(r"^(?:[a-z_][A-Za-z0-9_]*\.)*[A-Z][A-Za-z0-9_]*(?:Error|Exception):"),
            ),
            (
                "os-error",
                re(concat!(
                    r"command not found|is not recognized as an internal or external command",
                    r"|No such file or directory|Permission denied|Segmentation fault",
                    r"|\bpanicked at\b",
                )),
            ),
        ]
    })
}

fn rule(name: &str) -> &'static Regex {
    regexes()
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, r)| r)
        .expect("known rule name")
}

/// Looks for a failure in a next state. Only `role == "tool"` is considered.
pub fn detect(role: &str, text: &str) -> Option<EnvError> {
    if role != "tool" {
        return None;
    }
    let found = |rule: &'static str, evidence: &str| {
        Some(EnvError {
            rule,
            evidence: one_line(evidence),
        })
    };
    if let Some(m) = rule("traceback").find(text) {
        return found("traceback", m.as_str());
    }
    for caps in rule("exit-status").captures_iter(text) {
        // An unparsable (huge) number is not zero either.
        if !matches!(caps[1].parse::<i64>(), Ok(0)) {
            return found("exit-status", &caps[0]);
        }
    }
    if let Some(m) = rule("is-error").find(text) {
        return found("is-error", m.as_str());
    }
    if let Some(evidence) = json_error(text) {
        return found("is-error", &evidence);
    }
    let edges = edge_lines(text);
    for name in ["error-line", "exception-line", "os-error"] {
        let re = rule(name);
        if let Some(line) = edges.iter().find(|l| re.is_match(l)) {
            return found(name, line);
        }
    }
    None
}

/// A top-level `"error"` in a JSON object result: a non-empty string or an object.
fn json_error(text: &str) -> Option<String> {
    let t = text.trim();
    if !t.starts_with('{') {
        return None;
    }
    let Ok(Json::Object(obj)) = serde_json::from_str::<Json>(t) else {
        return None;
    };
    match obj.get("error")? {
        Json::String(s) if !s.trim().is_empty() => Some(format!("\"error\": {s:?}")),
        v @ Json::Object(o) if !o.is_empty() => Some(format!("\"error\": {v}")),
        _ => None,
    }
}

/// The first and last [`EDGE_LINES`] non-empty lines, with leading blanks removed.
fn edge_lines(text: &str) -> Vec<&str> {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_start)
        .filter(|l| !l.trim().is_empty())
        .collect();
    if lines.len() <= 2 * EDGE_LINES {
        return lines;
    }
    let mut edges = lines[..EDGE_LINES].to_vec();
    edges.extend_from_slice(&lines[lines.len() - EDGE_LINES..]);
    edges
}

fn one_line(s: &str) -> String {
    const MAX: usize = 200;
    let line = s.lines().next().unwrap_or("").trim();
    match line.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &line[..cut]),
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule_of(text: &str) -> Option<&'static str> {
        detect("tool", text).map(|e| e.rule)
    }

    #[test]
    fn every_rule_has_a_regex_and_a_description() {
        for r in RULES {
            assert!(regexes().iter().any(|(n, _)| *n == r.name), "{}", r.name);
            assert!(!r.describe.is_empty());
        }
        assert_eq!(RULES.len(), regexes().len());
    }

    #[test]
    fn detects_failures() {
        let cases: &[(&str, &str)] = &[
            (
                "Traceback (most recent call last):\n  File \"x.py\", line 1\nZeroDivisionError: division by zero",
                "traceback",
            ),
            ("exit code: 1", "exit-status"),
            ("stdout: \nstderr: boom\nExit code 2", "exit-status"),
            ("Process exited with code 127", "exit-status"),
            ("exit status 1", "exit-status"),
            ("Command 'make' returned non-zero exit status 2.", "exit-status"),
            (r#"{"stdout": "", "exit_code": 3}"#, "exit-status"),
            (r#"{"returncode": -9, "stdout": "x"}"#, "exit-status"),
            (r#"{"content": "oops", "is_error": true}"#, "is-error"),
            (r#"{"content": [], "isError": true}"#, "is-error"),
            (r#"{"error": "file not found"}"#, "is-error"),
            (r#"{"error": {"code": 404, "message": "no such repo"}}"#, "is-error"),
            ("Error: cannot open config.yaml", "error-line"),
            ("error: could not compile `foo` due to 2 previous errors", "error-line"),
            ("error[E0425]: cannot find value `x` in this scope", "error-line"),
            ("ERROR: relation \"users\" does not exist", "error-line"),
            ("fatal: not a git repository (or any of the parent directories): .git", "error-line"),
            ("npm ERR! code ENOENT", "error-line"),
            ("ValueError: invalid literal for int() with base 10: 'a'", "exception-line"),
            ("  ModuleNotFoundError: No module named 'numpy'", "exception-line"),
            ("java.lang.IllegalStateException: closed", "exception-line"),
            ("TypeError: Cannot read properties of undefined", "exception-line"),
            ("bash: line 1: foo: command not found", "os-error"),
            ("zsh: command not found: foo", "os-error"),
            ("cat: notes.txt: No such file or directory", "os-error"),
            ("rm: cannot remove '/etc/passwd': Permission denied", "os-error"),
            ("Segmentation fault (core dumped)", "os-error"),
            ("thread 'main' panicked at src/main.rs:2:5:\nboom", "os-error"),
            (
                "'foo' is not recognized as an internal or external command,",
                "os-error",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(rule_of(text), Some(*want), "{text:?}");
        }
    }

    #[test]
    fn leaves_successes_and_prose_alone() {
        let cases = [
            "",
            "ok",
            "3 files changed, 10 insertions(+)",
            "exit code: 0",
            "Process exited with code 0",
            r#"{"stdout": "hi", "exit_code": 0}"#,
            r#"{"result": "fine", "is_error": false}"#,
            r#"{"error": null, "result": 3}"#,
            r#"{"error": "", "result": 3}"#,
            "No errors found.",
            "0 errors, 0 warnings",
            "Error handling is done in handler.rs",
            "Error rate: 0.5%",
            "errors: 0",
            "warning: unused variable `x`",
            "The function returns an Error: see docs", // not at line start
            "test result: ok. 12 passed; 0 failed",
            "I fixed the ValueError you saw earlier.",
        ];
        for text in cases {
            assert_eq!(detect("tool", text), None, "{text:?}");
        }
    }

    #[test]
    fn error_messages_only_count_at_the_edges() {
        // A file listing with an "Error:" line in the middle is not a failure...
        let mut lines: Vec<String> = (0..10).map(|i| format!("line {i}")).collect();
        lines.insert(5, "Error: this is a heading in the docs".into());
        assert_eq!(detect("tool", &lines.join("\n")), None);
        // ...but the same line as the last one is.
        lines.push("Error: out of disk".into());
        let got = detect("tool", &lines.join("\n")).unwrap();
        assert_eq!(got.rule, "error-line");
        assert_eq!(got.evidence, "Error: out of disk");
        assert_eq!(got.describe(), "env rule error-line: Error: out of disk");
        // leading and trailing blank lines do not push the message off the edge
        let padded = format!(
            "\n\n{}\n\n\n",
            ["a", "b", "c", "d", "e", "f", "g", "fatal: x"].join("\n")
        );
        assert_eq!(rule_of(&padded), Some("error-line"));
    }

    #[test]
    fn only_tool_next_states_are_judged() {
        let tb = "Traceback (most recent call last):\n  ...\nKeyError: 'x'";
        assert_eq!(detect("user", tb), None);
        assert_eq!(detect("feedback", "Error: wrong"), None);
        assert!(detect("tool", tb).is_some());
    }

    #[test]
    fn evidence_is_one_short_line() {
        let long = format!("Error: {}", "x".repeat(500));
        let got = detect("tool", &long).unwrap();
        assert!(got.evidence.chars().count() <= 203);
        assert!(got.evidence.ends_with("..."));
    }
}
