//! Factual QA: JSONL lines `{"question": ..., "answers": [...]}` (short questions
//! with unambiguous short answers: capitals, elements, dates, authors). The model
//! is asked for a short answer; a reply is right when it contains one of the
//! accepted answers, case-insensitively, as whole words (`Au` is found in "It is
//! Au." but not in "Australia"; `0` not in "100").
//!
//! The built-in set, [`BUILTIN`] (fixtures/eval/facts-mini.jsonl), was written
//! for claw: it needs no download and carries no licence.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value as Json;

use super::{stats, user_prompt, Bench, ItemResult, Metric, Outcome, Report};
use crate::llm::VoteRunner;

/// fixtures/eval/facts-mini.jsonl, built in.
pub const BUILTIN: &str = include_str!("../../fixtures/eval/facts-mini.jsonl");
/// The name reports give the built-in set.
pub const BUILTIN_NAME: &str = "facts-mini (built in)";

/// One question.
#[derive(Clone, Debug, PartialEq)]
pub struct Question {
    /// `line-N` (N the JSONL line, from 1), or the line's `id` when it has one.
    pub id: String,
    pub question: String,
    /// Accepted answers; any one in the reply makes it right.
    pub answers: Vec<String>,
}

/// Reads a JSONL file; errors name the file, line and field.
pub fn load(path: &Path) -> Result<Vec<Question>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the facts file {}", path.display()))?;
    parse(&text, &path.display().to_string())
}

/// The built-in set.
pub fn builtin() -> Result<Vec<Question>> {
    parse(BUILTIN, "fixtures/eval/facts-mini.jsonl")
}

/// Parses JSONL `text`; `name` is the file errors name.
pub fn parse(text: &str, name: &str) -> Result<Vec<Question>> {
    let out = super::jsonl_items(text, name, |at, json, id| {
        let question = json
            .get("question")
            .and_then(Json::as_str)
            .filter(|q| !q.trim().is_empty())
            .with_context(|| format!("{at}: `question` is missing, empty or not a string"))?
            .to_string();
        let answers = match json.get("answers") {
            Some(Json::Array(list)) => list
                .iter()
                .map(|a| {
                    a.as_str()
                        .map(str::trim)
                        .filter(|a| !a.is_empty())
                        .map(str::to_string)
                        .with_context(|| {
                            format!("{at}: `answers` must hold non-empty strings, found {a}")
                        })
                })
                .collect::<Result<Vec<_>>>()?,
            Some(Json::String(a)) if !a.trim().is_empty() => vec![a.trim().to_string()],
            _ => anyhow::bail!("{at}: `answers` is missing or not a list of strings"),
        };
        anyhow::ensure!(!answers.is_empty(), "{at}: `answers` is empty");
        Ok(Question {
            id,
            question,
            answers,
        })
    })?;
    anyhow::ensure!(!out.is_empty(), "{name} holds no questions");
    Ok(out)
}

/// The first accepted answer that `reply` contains as whole words, compared
/// case-insensitively; None when it holds none.
pub fn grade<'a>(reply: &str, answers: &'a [String]) -> Option<&'a str> {
    let reply = reply.to_lowercase();
    answers
        .iter()
        .find(|a| contains_words(&reply, &a.to_lowercase()))
        .map(String::as_str)
}

/// Whether `needle` occurs in `haystack` with no letter or digit right before
/// or right after it.
fn contains_words(haystack: &str, needle: &str) -> bool {
    if needle.is_empty() {
        return false;
    }
    let word = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
    let mut from = 0;
    while let Some(at) = haystack[from..].find(needle) {
        let start = from + at;
        let end = start + needle.len();
        let before = haystack[..start].chars().next_back();
        let after = haystack[end..].chars().next();
        if !word(before) && !word(after) {
            return true;
        }
        // the next char boundary after `start`
        from = start + haystack[start..].chars().next().map_or(1, char::len_utf8);
    }
    false
}

pub fn prompt(question: &Question) -> String {
    format!(
        "Answer the following question in a few words, with no explanation.\n\nQuestion: {}",
        question.question
    )
}

/// Asks and grades every question once.
pub fn run(
    runner: &VoteRunner,
    questions: &[Question],
    data: &str,
    on_call: &(dyn Fn() + Sync),
) -> Result<Outcome> {
    let prompts: Vec<_> = questions
        .iter()
        .map(|q| user_prompt(format!("facts:{}", q.id), &prompt(q)))
        .collect();
    let (replies, calls) = super::ask(runner, &prompts, on_call)?;
    let mut items = Vec::with_capacity(questions.len());
    let mut groups = Vec::with_capacity(questions.len());
    let mut empty = 0;
    for ((q, prompt), mut reply) in questions.iter().zip(&prompts).zip(replies) {
        let (response, error) = match reply.swap_remove(0) {
            Ok(t) => (t, None),
            Err(e) => (String::new(), Some(e)),
        };
        if response.trim().is_empty() {
            empty += 1;
        }
        let got = grade(&response, &q.answers);
        groups.push(vec![got.is_some()]);
        items.push(ItemResult {
            id: q.id.clone(),
            sample: 0,
            prompt: super::prompt_text(prompt),
            response,
            extracted: got.map(str::to_string),
            expected: q.answers.join(" | "),
            correct: Some(got.is_some()),
            error,
        });
    }
    let metrics = vec![
        Metric::with_ci("accuracy", stats::accuracy(&groups)),
        Metric::new("empty_rate", empty as f64 / questions.len().max(1) as f64),
    ];
    let report = Report::new(
        Bench::Facts,
        runner.backend().name(),
        data,
        questions.len(),
        metrics,
    )
    .with_calls(&calls);
    Ok(Outcome { report, items })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn answers_match_as_whole_words_in_any_case() {
        let gold = list(&["Au"]);
        assert_eq!(grade("The symbol is Au.", &gold), Some("Au"));
        assert_eq!(grade("au", &gold), Some("Au"));
        assert_eq!(grade("AU!", &gold), Some("Au"));
        assert_eq!(grade("(au)", &gold), Some("Au"));
        assert_eq!(grade("Australia", &gold), None);
        assert_eq!(grade("gauge", &gold), None);
        assert_eq!(grade("", &gold), None);
        // a rejected occurrence does not hide a later good one
        assert_eq!(grade("Australia uses Au", &gold), Some("Au"));
        let zero = list(&["0", "zero"]);
        assert_eq!(grade("It boils at 100 degrees.", &zero), None);
        assert_eq!(grade("At 0 degrees.", &zero), Some("0"));
        assert_eq!(grade("Zero degrees Celsius", &zero), Some("zero"));
        assert_eq!(grade("0.5", &zero), Some("0"), "punctuation bounds a word");
    }

    #[test]
    fn any_accepted_answer_counts_and_phrases_match_whole() {
        let gold = list(&["Neil Armstrong", "Armstrong"]);
        assert_eq!(
            grade("It was neil armstrong in 1969", &gold),
            Some("Neil Armstrong")
        );
        assert_eq!(grade("Armstrong.", &gold), Some("Armstrong"));
        assert_eq!(grade("Armstrongs", &gold), None);
        let co2 = list(&["carbon dioxide", "CO2"]);
        assert_eq!(grade("They take in CO2.", &co2), Some("CO2"));
        assert_eq!(grade("carbon monoxide", &co2), None);
        // non-ASCII text around an answer
        assert_eq!(
            grade("Réponse : Paris, évidemment", &list(&["Paris"])),
            Some("Paris")
        );
        assert_eq!(grade("éParisé", &list(&["Paris"])), None);
    }

    #[test]
    fn the_builtin_set_loads_and_bad_lines_are_named() {
        let qs = builtin().unwrap();
        assert!(qs.len() >= 40, "{}", qs.len());
        assert!(qs.iter().all(|q| !q.answers.is_empty()));
        let err = parse("{\"question\": \"Q?\", \"answers\": []}\n", "f.jsonl").unwrap_err();
        assert!(format!("{err:#}").contains("f.jsonl:1"), "{err:#}");
        let err = parse("\n{\"question\": \"Q?\", \"answers\": [3]}\n", "f.jsonl").unwrap_err();
        assert!(
            format!("{err:#}").contains("f.jsonl:2: `answers`"),
            "{err:#}"
        );
        let err = parse("{\"answers\": [\"a\"]}\n", "f.jsonl").unwrap_err();
        assert!(format!("{err:#}").contains("`question`"), "{err:#}");
        let one = parse("{\"question\": \"Q?\", \"answers\": \"x\", \"id\": 7}", "f").unwrap();
        assert_eq!(
            (one[0].id.as_str(), one[0].answers.clone()),
            ("7", list(&["x"]))
        );
    }
}
