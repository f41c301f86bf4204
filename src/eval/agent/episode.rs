//! One episode of the agent benchmark: the model gets a task and a `python` tool
//! (the OpenAI `tools` field); each call it makes runs in the sandbox and its
//! output goes back as the `tool` message (the turn's next state, which collect
//! pairs and judge's env rules read); the episode ends with a final answer,
//! checked exactly, or when the tool rounds run out.
//!
//! The environment's verdict reaches the loop as each turn's reward, judged by
//! the turn's own next state: a tool error through judge's env rules (the
//! traceback is the next state), everything else through `/v1/feedback` (see
//! [`rate`]), with the correction as the feedback text that `distill-hints
//! --hint-source feedback` makes the hint. The last feedback ends the session
//! (`session_done`).

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::tasks::{check, Task};
use crate::eval::sandbox::{RunResult, Sandbox};

/// The system prompt every episode starts with.
pub const SYSTEM_PROMPT: &str = "You are a careful assistant with a python tool. The \
     tool runs a Python program and returns what it prints. Use it to compute anything \
     that needs computing: call it with a short program that prints the result, and \
     read the output. When you know the answer, end your reply with a line \
     \"Answer: <value>\" holding only the final value.";

/// The one tool offered, in the OpenAI `tools` shape.
pub fn python_tool() -> Value {
    json!({
        "type": "function",
        "function": {
            "name": "python",
            "description": "Run a Python 3 program and return its output (stdout, then \
                            stderr). Print the values you need with print().",
            "parameters": {
                "type": "object",
                "properties": {
                    "code": {"type": "string", "description": "the Python program"}
                },
                "required": ["code"],
            },
        },
    })
}

/// Most characters of a tool result sent back (the head and the tail are kept:
/// a traceback ends with its error).
pub const MAX_TOOL_CHARS: usize = 1500;

/// The model's side of the conversation, and where the environment's verdicts go.
pub trait Endpoint {
    /// One turn: the model's reply to `messages`, offered `tools`.
    fn chat(&self, turn: &TurnRequest<'_>) -> Result<Reply>;
    /// Rates the reply `response_id` of `session`; `done` ends the session.
    fn feedback(
        &self,
        session: &str,
        response_id: &str,
        rating: i8,
        text: Option<&str>,
        done: bool,
    ) -> Result<()>;
}

/// What one chat request carries.
pub struct TurnRequest<'a> {
    pub session: &'a str,
    pub messages: &'a [Value],
    pub tools: &'a [Value],
    /// A side turn: recorded, never trained on (the held-out episodes).
    pub side: bool,
    pub temperature: f32,
    pub max_tokens: usize,
    pub seed: u64,
}

/// The model's reply: its response id, text and parsed tool calls (OpenAI shape).
#[derive(Clone, Debug, Default)]
pub struct Reply {
    pub id: String,
    pub content: String,
    pub tool_calls: Vec<Value>,
}

/// Runs one program for the python tool.
pub trait ToolRunner {
    fn run(&self, code: &str) -> Result<ToolOutput>;
}

/// What the tool returned.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolOutput {
    /// The tool message's content.
    pub text: String,
    /// The program failed (exception, non-zero exit, timeout).
    pub error: bool,
    /// It did not even parse: an invalid call.
    pub syntax_error: bool,
}

impl ToolRunner for Sandbox {
    fn run(&self, code: &str) -> Result<ToolOutput> {
        Ok(tool_output(
            &Sandbox::run(self, code)?,
            self.limits().timeout,
        ))
    }
}

/// The tool message for a sandbox run: stdout then stderr, truncated; a timeout or
/// a kill says so on an `Error:` line (which judge's env rules read as a failure).
pub fn tool_output(run: &RunResult, timeout: std::time::Duration) -> ToolOutput {
    let mut text = run.stdout.trim_end().to_string();
    let stderr = run.stderr.trim_end();
    if !stderr.is_empty() {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(stderr);
    }
    let error = !run.passed;
    if run.timed_out {
        text.push_str(&format!(
            "\nError: the program was stopped after {} s",
            timeout.as_secs_f64()
        ));
    } else if error && !stderr.contains("Traceback") {
        let why = run.failure().unwrap_or_default();
        text.push_str(&format!("\nError: {why}"));
    } else if text.is_empty() {
        text = "(no output: print() the values you need)".into();
    }
    let syntax_error = error
        && ["SyntaxError:", "IndentationError:", "TabError:"]
            .iter()
            .any(|e| stderr.contains(e));
    ToolOutput {
        text: truncate(text.trim(), MAX_TOOL_CHARS),
        error,
        syntax_error,
    }
}

/// `text` cut to at most `max` characters: its first two thirds and last third,
/// with a note of what was left out.
pub fn truncate(text: &str, max: usize) -> String {
    let n = text.chars().count();
    if n <= max {
        return text.to_string();
    }
    let head: String = text.chars().take(max * 2 / 3).collect();
    let tail: String = text.chars().skip(n - max / 3).collect();
    format!(
        "{head}\n... [{} characters left out] ...\n{tail}",
        n - head.chars().count() - tail.chars().count()
    )
}

/// How an episode ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Correct,
    Wrong,
    /// Still calling tools when the rounds ran out.
    NoAnswer,
}

/// One main turn of an episode, as the environment saw it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Turn {
    pub response_id: String,
    /// Tool calls it made (parsed by serve), and malformed ones left in its text.
    pub calls: usize,
    pub valid_calls: usize,
    /// A call's program failed: judge's env rules score this turn.
    pub tool_error: bool,
    /// A call's output holds the task's answer (the final answer would pass).
    #[serde(default)]
    pub printed_answer: bool,
}

/// One episode's record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpisodeLog {
    pub outcome: Outcome,
    /// The last reply (the final answer, or the last tool call).
    pub final_reply: String,
    pub turns: Vec<Turn>,
    /// The conversation as sent (system, user, assistant, tool messages).
    #[serde(skip)]
    pub messages: Vec<Value>,
}

impl EpisodeLog {
    pub fn correct(&self) -> bool {
        self.outcome == Outcome::Correct
    }
    pub fn calls(&self) -> usize {
        self.turns.iter().map(|t| t.calls).sum()
    }
    pub fn valid_calls(&self) -> usize {
        self.turns.iter().map(|t| t.valid_calls).sum()
    }
    pub fn tool_errors(&self) -> usize {
        self.turns.iter().filter(|t| t.tool_error).count()
    }
}

/// Settings of an episode.
#[derive(Clone, Debug)]
pub struct EpisodeConfig {
    /// Most replies with tool calls; the reply after the last one must answer.
    pub tool_rounds: usize,
    pub temperature: f32,
    pub max_tokens: usize,
}

/// Plays `task` through `endpoint`, running tool calls with `tools`. A main
/// episode (`side` false) then sends the environment's verdict on each turn.
pub fn play(
    endpoint: &dyn Endpoint,
    tools: &dyn ToolRunner,
    task: &Task,
    session: &str,
    side: bool,
    cfg: &EpisodeConfig,
    seed: u64,
) -> Result<EpisodeLog> {
    let offered = [python_tool()];
    let mut messages = vec![
        json!({"role": "system", "content": SYSTEM_PROMPT}),
        json!({"role": "user", "content": task.prompt}),
    ];
    let mut turns = Vec::new();
    let mut outcome = Outcome::NoAnswer;
    let mut final_reply = String::new();
    for round in 0..=cfg.tool_rounds {
        let reply = endpoint.chat(&TurnRequest {
            session,
            messages: &messages,
            tools: &offered,
            side,
            temperature: cfg.temperature,
            max_tokens: cfg.max_tokens,
            seed: seed.wrapping_add(round as u64 * 7_919),
        })?;
        final_reply = reply.content.clone();
        let malformed = malformed_calls(&reply.content);
        let mut turn = Turn {
            response_id: reply.id.clone(),
            calls: reply.tool_calls.len() + malformed,
            valid_calls: 0,
            tool_error: false,
            printed_answer: false,
        };
        if reply.tool_calls.is_empty() {
            outcome = match check(task, &reply.content) {
                true => Outcome::Correct,
                false => Outcome::Wrong,
            };
            turns.push(turn);
            break;
        }
        if round == cfg.tool_rounds {
            turns.push(turn); // out of rounds: no answer
            break;
        }
        messages.push(json!({
            "role": "assistant",
            "content": reply.content,
            "tool_calls": reply.tool_calls,
        }));
        for call in &reply.tool_calls {
            let (result, valid) = run_call(tools, call)?;
            turn.valid_calls += usize::from(valid);
            turn.tool_error |= result.error;
            turn.printed_answer |= !result.error && check(task, &result.text);
            final_reply = format!("{}\n[tool] {}", final_reply, result.text);
            messages.push(json!({
                "role": "tool",
                "tool_call_id": call["id"].as_str().unwrap_or_default(),
                "content": result.text,
            }));
        }
        turns.push(turn);
    }
    let log = EpisodeLog {
        outcome,
        final_reply,
        turns,
        messages,
    };
    if !side {
        rate(endpoint, session, task, &log)?;
    }
    Ok(log)
}

/// Attempted calls serve could not parse, left in the reply's text: each
/// `<tool_call>` block (serve keeps a block whose JSON is broken), else each bare
/// `{"name": ...` object, which small models write without the tags their
/// template asks for.
pub fn malformed_calls(content: &str) -> usize {
    static BARE: std::sync::LazyLock<regex::Regex> =
        std::sync::LazyLock::new(|| regex::Regex::new(r#"\{\s*"name"\s*:"#).expect("valid regex"));
    match content.matches("<tool_call>").count() {
        0 => BARE.find_iter(content).count(),
        n => n,
    }
}

/// Runs one call: the tool result, and whether the call was valid (the python
/// tool, a `code` string, a program that parses).
fn run_call(tools: &dyn ToolRunner, call: &Value) -> Result<(ToolOutput, bool)> {
    let name = call["function"]["name"].as_str().unwrap_or_default();
    let arguments = call["function"]["arguments"].as_str().unwrap_or_default();
    let code = serde_json::from_str::<Value>(arguments)
        .ok()
        .and_then(|a| a.get("code").and_then(Value::as_str).map(str::to_string));
    let refuse = |text: String| ToolOutput {
        text,
        error: true,
        syntax_error: false,
    };
    if name != "python" {
        let msg = format!("Error: there is no tool {name:?}; the only tool is python");
        return Ok((refuse(msg), false));
    }
    let Some(code) = code else {
        let msg = "Error: the python tool takes {\"code\": \"<program>\"}".to_string();
        return Ok((refuse(msg), false));
    };
    let out = tools.run(&code)?;
    let valid = !out.syntax_error;
    Ok((out, valid))
}

/// The environment's verdict, turn by turn, as each turn's next state shows it
/// (OpenClaw-RL scores each turn from its next state, not the episode's end):
/// - a call whose program failed: -1 from judge's env rules, its traceback the hint;
/// - a right final answer: +1;
/// - any other turn after the tool had printed the answer (another call, a wrong
///   answer): -1, "answer now" ([`answer_now`]);
/// - a call whose output holds the answer: +1;
/// - any other call (a wrong program, a malformed call): -1 with the correction;
/// - a wrong final answer: -1 with the correction.
///
/// Rating a good first call by the episode's end would punish it for a later
/// turn's mistake. The last rating ends the session.
fn rate(endpoint: &dyn Endpoint, session: &str, task: &Task, log: &EpisodeLog) -> Result<()> {
    let correction = correction(task, log);
    let n = log.turns.len();
    let mut printed_before = false;
    for (i, turn) in log.turns.iter().enumerate() {
        let last = i + 1 == n;
        let is_call = turn.calls > 0;
        let (rating, text): (i8, Option<String>) = if !is_call && log.correct() {
            (1, None)
        } else if printed_before && !turn.tool_error {
            (-1, Some(answer_now(task)))
        } else if !is_call {
            (-1, correction.clone())
        } else if turn.tool_error {
            (-1, None)
        } else if turn.printed_answer {
            (1, None)
        } else {
            (-1, Some(call_correction(task, turn)))
        };
        printed_before |= turn.printed_answer;
        endpoint.feedback(session, &turn.response_id, rating, text.as_deref(), last)?;
    }
    Ok(())
}

/// What the environment tells a wrong episode's final answer (None for a right
/// one): what went wrong and the call that computes the answer (the task's
/// reference program in the template's call format). The hint is only ever read
/// by the teacher (distill-hints), so it may show what the student must find
/// itself; it does not give the answer, which a teacher then writes at once.
pub fn correction(task: &Task, log: &EpisodeLog) -> Option<String> {
    let answer = &task.answer;
    let malformed = log.calls() > log.valid_calls() && log.tool_errors() == 0;
    let used_tool = log.valid_calls() > 0;
    Some(match log.outcome {
        Outcome::Correct => return None,
        Outcome::NoAnswer => format!(
            "You kept calling the tool and never answered. The correct answer is {answer}: \
             once the tool has printed the result, reply with \"Answer: {answer}\"."
        ),
        Outcome::Wrong if malformed => {
            format!("Your tool call was malformed. {}", call_first(task))
        }
        Outcome::Wrong if used_tool => format!("That is wrong. {}", call_first(task)),
        Outcome::Wrong => call_first(task),
    })
}

/// What the environment tells a turn after the tool had printed the answer. The
/// wording was measured on Qwen2.5-0.5B as the teacher, the hint after the tool
/// result: "... Do not call it again: reply with \"Answer: X\"" gave the reply's
/// first token "Answer" 0.33-0.60 (the rest went to another call), this one 0.98
/// (docs/ARCHITECTURE.md, "Agent benchmark").
fn answer_now(task: &Task) -> String {
    let answer = &task.answer;
    format!(
        "The tool printed {answer}. That is the result. Now write your final reply as plain \
         text, not a tool call: Answer: {answer}"
    )
}

/// What the environment tells a call turn whose program ran but did not print
/// the answer, or whose call was malformed: the call to make instead
/// ([`call_first`]).
fn call_correction(task: &Task, turn: &Turn) -> String {
    match turn.valid_calls < turn.calls {
        true => format!("Your tool call was malformed. {}", call_first(task)),
        false => format!(
            "That program does not print the answer. {}",
            call_first(task)
        ),
    }
}

/// The hint for a turn that should have been the task's call. The wording was
/// measured on Qwen2.5-0.5B's base weights as the teacher (greedy first-token
/// probabilities, three tasks): on the task's own turn, "That is wrong: the
/// correct answer is X. Do not work it out in your head: call the python tool
/// ..., here CALL, then reply \"Answer: <value>\"" gave the call's first token
/// `{"` 0.17-0.36, no more than no hint at all (0.08-0.35): a teacher told the
/// answer writes it. This one gives 0.74-0.75, and 0.95-0.97 after a wrong
/// program's output.
fn call_first(task: &Task) -> String {
    format!(
        "Do not answer yet. Your reply must be this tool call and nothing else: {}",
        reference_call(task)
    )
}

/// The task's reference program as one call of the python tool, written the way
/// Qwen2.5's chat template asks for calls.
fn reference_call(task: &Task) -> String {
    let call = json!({"name": "python", "arguments": {"code": task.program}});
    // serde_json writes no spaces; the template's own example has them.
    let text = format!(
        "{{\"name\": \"python\", \"arguments\": {{\"code\": {}}}}}",
        call["arguments"]["code"]
    );
    format!("<tool_call>{text}</tool_call>")
}

#[cfg(test)]
#[path = "episode_tests.rs"]
mod tests;
