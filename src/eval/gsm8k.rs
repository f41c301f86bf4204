//! GSM8K-style maths: JSONL lines `{"question": ..., "answer": ...}` whose answer
//! ends in `#### N` (the GSM8K convention; an answer that is just a number works
//! too). The model is asked to reason step by step and end with `Answer: N`; its
//! answer is the last number in the reply (commas stripped), compared
//! numerically with N.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, Result};
use regex::Regex;
use serde_json::Value as Json;

use super::{stats, user_prompt, Bench, ItemResult, Metric, Outcome, Report};
use crate::llm::VoteRunner;

/// One problem.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    /// `line-N` (N the JSONL line, from 1), or the line's `id` when it has one.
    pub id: String,
    pub question: String,
    /// The final answer as written after `####`.
    pub answer: String,
    pub value: f64,
}

/// fixtures/eval/gsm8k-mini.jsonl, built in (the retention check's maths).
pub const BUILTIN: &str = include_str!("../../fixtures/eval/gsm8k-mini.jsonl");

/// Reads the JSONL file; errors name the file, line and field.
pub fn load(path: &Path) -> Result<Vec<Problem>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the GSM8K file {}", path.display()))?;
    parse(&text, &path.display().to_string())
}

/// The built-in gsm8k-mini problems.
pub fn builtin() -> Result<Vec<Problem>> {
    parse(BUILTIN, "fixtures/eval/gsm8k-mini.jsonl")
}

/// Parses JSONL `text`; `name` is the file errors name.
pub fn parse(text: &str, name: &str) -> Result<Vec<Problem>> {
    let out = super::jsonl_items(text, name, |at, json, id| {
        let field = |name: &str| -> Result<String> {
            json.get(name)
                .and_then(Json::as_str)
                .map(str::to_string)
                .with_context(|| format!("{at}: `{name}` is missing or not a string"))
        };
        let question = field("question")?;
        let full = field("answer")?;
        let answer = final_answer(&full).to_string();
        let value = parse_number(&answer).with_context(|| {
            format!("{at}: `answer` must end in `#### N` with N a number, got `{answer}`")
        })?;
        Ok(Problem {
            id,
            question,
            answer,
            value,
        })
    })?;
    anyhow::ensure!(!out.is_empty(), "{name} holds no problems");
    Ok(out)
}

/// What follows the last `####` (the whole text when there is none), trimmed.
pub fn final_answer(answer: &str) -> &str {
    answer.rsplit_once("####").map_or(answer, |(_, a)| a).trim()
}

/// A number as people write it: `1,234`, `-3.5`, `$12`, `40%`.
pub fn parse_number(text: &str) -> Option<f64> {
    let cleaned: String = text
        .trim()
        .trim_start_matches('$')
        .trim_end_matches(['%', '.'])
        .chars()
        .filter(|&c| c != ',')
        .collect();
    cleaned.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// The last number in a reply, commas stripped.
pub fn extract(reply: &str) -> Option<f64> {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| Regex::new(r"-?\d[\d,]*(?:\.\d+)?").expect("a valid regex"));
    re.find_iter(reply)
        .filter_map(|m| parse_number(m.as_str().trim_end_matches(',')))
        .last()
}

/// Whether two answers are the same number.
pub fn same(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * b.abs().max(1.0)
}

pub fn prompt(problem: &Problem) -> String {
    format!(
        "Solve the following math problem step by step. The last line of your response \
         should be of the form \"Answer: $ANSWER\" (without quotes) where $ANSWER is the \
         answer to the problem, a number.\n\n{}",
        problem.question
    )
}

/// Asks and grades every problem once.
pub fn run(
    runner: &VoteRunner,
    problems: &[Problem],
    data: &str,
    on_call: &(dyn Fn() + Sync),
) -> Result<Outcome> {
    let prompts: Vec<_> = problems
        .iter()
        .map(|p| user_prompt(format!("gsm8k:{}", p.id), &prompt(p)))
        .collect();
    let (replies, calls) = super::ask(runner, &prompts, on_call)?;
    let mut items = Vec::with_capacity(problems.len());
    let mut groups = Vec::with_capacity(problems.len());
    let mut invalid = 0;
    for ((p, prompt), mut reply) in problems.iter().zip(&prompts).zip(replies) {
        let (response, error) = match reply.swap_remove(0) {
            Ok(t) => (t, None),
            Err(e) => (String::new(), Some(e)),
        };
        let got = extract(&response);
        if got.is_none() {
            invalid += 1;
        }
        let correct = got.is_some_and(|g| same(g, p.value));
        groups.push(vec![correct]);
        items.push(ItemResult {
            id: p.id.clone(),
            sample: 0,
            prompt: super::prompt_text(prompt),
            response,
            extracted: got.map(|g| g.to_string()),
            expected: p.answer.clone(),
            correct: Some(correct),
            error,
        });
    }
    let metrics = vec![
        Metric::with_ci("accuracy", stats::accuracy(&groups)),
        Metric::new(
            "invalid_rate",
            invalid as f64 / problems.len().max(1) as f64,
        ),
    ];
    let report = Report::new(
        Bench::Gsm8k,
        runner.backend().name(),
        data,
        problems.len(),
        metrics,
    )
    .with_calls(&calls);
    Ok(Outcome { report, items })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_and_numbers() {
        assert_eq!(final_answer("5 + 3 = 8\n#### 8"), "8");
        assert_eq!(final_answer("42"), "42");
        assert_eq!(parse_number("1,234"), Some(1234.0));
        assert_eq!(parse_number("$12.50"), Some(12.5));
        assert_eq!(parse_number("-3"), Some(-3.0));
        assert_eq!(parse_number("abc"), None);
        assert_eq!(
            extract("3 apples + 4 = 7 apples.\nAnswer: 1,200"),
            Some(1200.0)
        );
        assert_eq!(extract("It costs $5.50."), Some(5.5));
        assert_eq!(extract("x = -4"), Some(-4.0));
        assert_eq!(extract("no idea"), None);
        assert_eq!(extract("1, 2, 3"), Some(3.0));
        assert!(same(7.0, 7.0000000001) && !same(7.0, 7.1));
    }
}
