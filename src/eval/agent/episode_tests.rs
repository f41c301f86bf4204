use std::cell::RefCell;

use super::*;
use crate::eval::agent::tasks::Kind;

/// A rating sent: response id, rating, text, session done.
type Rating = (String, i8, Option<String>, bool);

/// A model that replies from a script, and records what it was sent and rated.
#[derive(Default)]
struct Scripted {
    replies: RefCell<Vec<Reply>>,
    sent: RefCell<Vec<Vec<Value>>>,
    rated: RefCell<Vec<Rating>>,
}

impl Scripted {
    fn new(replies: Vec<Reply>) -> Self {
        let mut replies = replies;
        replies.reverse();
        Scripted {
            replies: RefCell::new(replies),
            ..Default::default()
        }
    }
}

impl Endpoint for Scripted {
    fn chat(&self, turn: &TurnRequest<'_>) -> Result<Reply> {
        assert_eq!(turn.tools[0]["function"]["name"], "python");
        self.sent.borrow_mut().push(turn.messages.to_vec());
        Ok(self.replies.borrow_mut().pop().expect("a scripted reply"))
    }
    fn feedback(
        &self,
        _: &str,
        id: &str,
        rating: i8,
        text: Option<&str>,
        done: bool,
    ) -> Result<()> {
        self.rated
            .borrow_mut()
            .push((id.into(), rating, text.map(str::to_string), done));
        Ok(())
    }
}

/// Prints the number a program multiplies, or fails on "boom".
struct FakePython;

impl ToolRunner for FakePython {
    fn run(&self, code: &str) -> Result<ToolOutput> {
        Ok(match code {
            c if c.contains("boom") => ToolOutput {
                text: "Traceback (most recent call last):\nNameError: name 'boom' is not defined"
                    .into(),
                error: true,
                syntax_error: false,
            },
            c if c.contains("print(") && !c.ends_with(')') => ToolOutput {
                text: "SyntaxError: '(' was never closed".into(),
                error: true,
                syntax_error: true,
            },
            "print(6+7)" => ToolOutput {
                text: "13".into(),
                error: false,
                syntax_error: false,
            },
            _ => ToolOutput {
                text: "42".into(),
                error: false,
                syntax_error: false,
            },
        })
    }
}

fn call(id: &str, code: &str) -> Value {
    json!({"id": id, "type": "function",
           "function": {"name": "python", "arguments": json!({"code": code}).to_string()}})
}

fn reply(id: &str, content: &str, calls: Vec<Value>) -> Reply {
    Reply {
        id: id.into(),
        content: content.into(),
        tool_calls: calls,
    }
}

fn task() -> Task {
    Task {
        kind: Kind::Arithmetic,
        prompt: "What is 6 * 7?".into(),
        answer: "42".into(),
        decimals: Some(0),
        program: "print(6 * 7)".into(),
    }
}

fn cfg(rounds: usize) -> EpisodeConfig {
    EpisodeConfig {
        tool_rounds: rounds,
        temperature: 0.7,
        max_tokens: 64,
    }
}

#[test]
fn a_tool_call_runs_and_its_output_is_the_next_message() {
    let model = Scripted::new(vec![
        reply("r1", "", vec![call("c1", "print(6*7)")]),
        reply("r2", "Answer: 42", vec![]),
    ]);
    let log = play(&model, &FakePython, &task(), "s", false, &cfg(2), 1).unwrap();
    assert_eq!(log.outcome, Outcome::Correct);
    assert_eq!(
        (log.calls(), log.valid_calls(), log.tool_errors()),
        (1, 1, 0)
    );
    let second = &model.sent.borrow()[1];
    assert_eq!(second.len(), 4, "system, user, assistant call, tool result");
    assert_eq!(second[2]["tool_calls"][0]["id"], "c1");
    assert_eq!(
        second[3],
        json!({"role": "tool", "tool_call_id": "c1", "content": "42"})
    );
    // Both turns get the outcome; the last one ends the session.
    assert_eq!(
        *model.rated.borrow(),
        vec![("r1".into(), 1, None, false), ("r2".into(), 1, None, true)]
    );
}

#[test]
fn a_wrong_answer_rates_every_turn_down_with_the_correction_but_a_failed_tool_keeps_its_error() {
    let model = Scripted::new(vec![
        reply("r1", "", vec![call("c1", "print(boom)")]),
        reply("r2", "Answer: 41", vec![]),
    ]);
    let log = play(&model, &FakePython, &task(), "s", false, &cfg(2), 1).unwrap();
    assert_eq!(log.outcome, Outcome::Wrong);
    assert_eq!(
        (log.calls(), log.valid_calls(), log.tool_errors()),
        (1, 1, 1)
    );
    let rated = model.rated.borrow();
    assert_eq!(
        rated[0],
        ("r1".into(), -1, None, false),
        "its hint is the traceback"
    );
    let (id, rating, text, done) = &rated[1];
    assert_eq!((id.as_str(), *rating, *done), ("r2", -1, true));
    let text = text.as_deref().unwrap();
    assert!(
        text.starts_with("That is wrong. Do not answer yet."),
        "{text}"
    );
    assert!(text.contains(r#""code": "print(6 * 7)""#), "{text}");
}

#[test]
fn answering_without_the_tool_is_checked_and_told_to_use_it() {
    let model = Scripted::new(vec![reply("r1", "I think the answer is 40.", vec![])]);
    let log = play(&model, &FakePython, &task(), "s", false, &cfg(2), 1).unwrap();
    assert_eq!((log.outcome, log.calls()), (Outcome::Wrong, 0));
    let text = model.rated.borrow()[0].2.clone().unwrap();
    assert!(text.contains("Your reply must be this tool call"), "{text}");
    assert!(
        !text.contains("42"),
        "the teacher is not told the answer: {text}"
    );
    // The hindsight hint shows the call that would have worked.
    assert!(
        text.contains(
            r#"<tool_call>{"name": "python", "arguments": {"code": "print(6 * 7)"}}</tool_call>"#
        ),
        "{text}"
    );
}

#[test]
fn invalid_calls_are_counted_and_out_of_rounds_is_no_answer() {
    let model = Scripted::new(vec![
        reply("r1", "", vec![call("c1", "print(6*7")]),
        reply("r2", "", vec![call("c2", "print(6*7)")]),
    ]);
    let log = play(&model, &FakePython, &task(), "s", false, &cfg(1), 1).unwrap();
    assert_eq!(log.outcome, Outcome::NoAnswer);
    assert_eq!(
        (log.calls(), log.valid_calls()),
        (2, 0),
        "the second never ran"
    );
    // A malformed block serve could not parse counts as an invalid call.
    let model = Scripted::new(vec![reply(
        "r1",
        "<tool_call>{\"name\": python</tool_call>",
        vec![],
    )]);
    let log = play(&model, &FakePython, &task(), "s", false, &cfg(1), 1).unwrap();
    assert_eq!(
        (log.outcome, log.calls(), log.valid_calls()),
        (Outcome::Wrong, 1, 0)
    );
    assert!(model.rated.borrow()[0]
        .2
        .as_deref()
        .unwrap()
        .contains("malformed"));
    // So does a bare JSON call without the tags (what Qwen2.5-0.5B often writes).
    let bare = r#"{"name": "multiply", "arguments": {"a": 6, "b": 7}}"#;
    assert_eq!(malformed_calls(bare), 1);
    assert_eq!(malformed_calls("Answer: 42"), 0);
    // Unknown tools and missing code are refused as errors, without running.
    let bad = json!({"id": "x", "function": {"name": "shell", "arguments": "{}"}});
    let (out, valid) = run_call(&FakePython, &bad).unwrap();
    assert!(
        out.error && !valid && out.text.starts_with("Error:"),
        "{out:?}"
    );
    let bad = json!({"id": "x", "function": {"name": "python", "arguments": "{\"src\": 1}"}});
    assert!(!run_call(&FakePython, &bad).unwrap().1);
}

#[test]
fn held_out_episodes_are_side_turns_and_get_no_verdict() {
    let model = Scripted::new(vec![reply("r1", "Answer: 42", vec![])]);
    let log = play(&model, &FakePython, &task(), "s", true, &cfg(1), 1).unwrap();
    assert!(log.correct());
    assert!(model.rated.borrow().is_empty());
}

#[test]
fn tool_results_say_how_a_program_failed_and_are_truncated() {
    let run = |passed, timed_out, stdout: &str, stderr: &str, code| RunResult {
        passed,
        completed: passed,
        timed_out,
        exit_code: code,
        signal: None,
        stdout: stdout.into(),
        stderr: stderr.into(),
        seconds: 0.1,
    };
    let t = std::time::Duration::from_secs(5);
    let ok = tool_output(&run(true, false, "42\n", "", Some(0)), t);
    assert_eq!((ok.text.as_str(), ok.error), ("42", false));
    let silent = tool_output(&run(true, false, "", "", Some(0)), t);
    assert!(silent.text.contains("print()"));
    let slow = tool_output(&run(false, true, "", "", None), t);
    assert!(
        slow.error
            && slow
                .text
                .contains("Error: the program was stopped after 5 s")
    );
    let tb = "Traceback (most recent call last):\n  File \"program.py\", line 1\nZeroDivisionError: division by zero";
    let failed = tool_output(&run(false, false, "", tb, Some(1)), t);
    assert_eq!(failed.text, tb);
    assert!(failed.error && !failed.syntax_error);
    let syntax = tool_output(
        &run(false, false, "", "SyntaxError: invalid syntax", Some(1)),
        t,
    );
    assert!(syntax.syntax_error);
    let long = "x".repeat(5000) + "END";
    let cut = truncate(&long, MAX_TOOL_CHARS);
    assert!(
        cut.chars().count() < MAX_TOOL_CHARS + 60 && cut.ends_with("END"),
        "{cut}"
    );
    assert!(cut.contains("characters left out"));
}

/// The python tool in the real sandbox (skipped where user namespaces are not
/// available).
#[test]
fn the_sandbox_runs_the_python_tool() {
    let limits = crate::eval::sandbox::Limits {
        timeout: std::time::Duration::from_secs(5),
        ..Default::default()
    };
    let sandbox = match Sandbox::new("python3", limits, false) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("SKIP: no sandbox here: {e:#}");
            return;
        }
    };
    let out = ToolRunner::run(&sandbox, "print(48213 * 9172)").unwrap();
    assert_eq!((out.text.as_str(), out.error), ("442209636", false));
    let out = ToolRunner::run(&sandbox, "print(1/0)").unwrap();
    assert!(
        out.error && out.text.contains("ZeroDivisionError"),
        "{out:?}"
    );
    assert!(
        crate::judge::env::detect("tool", &out.text).is_some(),
        "{out:?}"
    );
    let out = ToolRunner::run(&sandbox, "print((1,2").unwrap();
    assert!(out.syntax_error, "{out:?}");
}

/// Each turn is rated by its own next state: the call that printed the answer is
/// right even though the episode ended without one; the calls after it are the
/// mistake, and their hint says to answer.
#[test]
fn a_call_that_printed_the_answer_is_rewarded_and_repeating_it_is_not() {
    let model = Scripted::new(vec![
        reply("r1", "", vec![call("c1", "print(6*7)")]),
        reply("r2", "", vec![call("c2", "print(6*7)")]),
        reply("r3", "", vec![call("c3", "print(6*7)")]),
    ]);
    let log = play(&model, &FakePython, &task(), "s", false, &cfg(2), 1).unwrap();
    assert_eq!(log.outcome, Outcome::NoAnswer);
    let rated = model.rated.borrow();
    assert_eq!(rated[0], ("r1".into(), 1, None, false));
    for (i, (id, rating, text, done)) in rated.iter().enumerate().skip(1) {
        assert_eq!(
            (id.as_str(), *rating, *done),
            (["r2", "r3"][i - 1], -1, i == 2)
        );
        let text = text.as_deref().unwrap();
        assert!(text.contains("not a tool call: Answer: 42"), "{text}");
    }
}

/// A wrong answer after the tool printed the right one is told to copy it, not
/// to call the tool again.
#[test]
fn a_wrong_answer_after_the_tool_printed_the_right_one_is_told_to_copy_it() {
    let model = Scripted::new(vec![
        reply("r1", "", vec![call("c1", "print(6*7)")]),
        reply("r2", "Answer: 41", vec![]),
    ]);
    let log = play(&model, &FakePython, &task(), "s", false, &cfg(2), 1).unwrap();
    assert_eq!(log.outcome, Outcome::Wrong);
    let rated = model.rated.borrow();
    assert_eq!(rated[0].1, 1);
    assert_eq!((rated[1].1, rated[1].3), (-1, true));
    let text = rated[1].2.as_deref().unwrap();
    assert!(
        text.contains("The tool printed 42") && text.contains("Answer: 42"),
        "{text}"
    );
}

/// A program that runs but prints something else gets the reference call.
#[test]
fn a_call_that_prints_the_wrong_value_is_shown_the_call_that_computes_it() {
    let model = Scripted::new(vec![
        reply("r1", "", vec![call("c1", "print(6+7)")]),
        reply("r2", "Answer: 13", vec![]),
    ]);
    play(&model, &FakePython, &task(), "s", false, &cfg(2), 1).unwrap();
    let rated = model.rated.borrow();
    let text = rated[0].2.as_deref().unwrap();
    assert_eq!(rated[0].1, -1);
    assert!(
        text.starts_with("That program does not print the answer."),
        "{text}"
    );
    assert!(text.contains(r#""code": "print(6 * 7)""#), "{text}");
}
