//! GPQA: four-way multiple choice. The user brings the CSV (the data set is
//! gated); its standard columns are `Question`, `Correct Answer` and
//! `Incorrect Answer 1..3` (others, such as `Record ID`, are optional).
//!
//! Each question is asked `repeats` times, each time with its four choices in a
//! new order drawn from a RNG seeded by `--seed`, the question's id and the
//! repeat. The zero-shot chain-of-thought prompt asks for a last line
//! `Answer: $LETTER`; the first match of `(?i)Answer[ \t]*:[ \t]*\$?([A-D])\$?`
//! is the model's answer, and a reply without one is invalid (and wrong).

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use regex::Regex;

use super::{stats, user_prompt, Bench, ItemResult, Metric, Outcome, Report};
use crate::llm::{vote_seed, VoteItem, VoteRunner};

pub const LETTERS: [char; 4] = ['A', 'B', 'C', 'D'];

/// One question as the CSV has it.
#[derive(Clone, Debug, PartialEq)]
pub struct Question {
    /// `Record ID` when the file has it, else `row-N` (N the CSV record, from 1).
    pub id: String,
    pub question: String,
    pub correct: String,
    pub incorrect: [String; 3],
}

/// One asking of a question: its choices in order, and which letter is right.
#[derive(Clone, Debug, PartialEq)]
pub struct Asked {
    pub choices: [String; 4],
    pub answer: char,
}

/// The file `--subset NAME` reads in a data directory: `gpqa_NAME.csv`.
pub fn subset_file(dir: &Path, subset: &str) -> std::path::PathBuf {
    dir.join(format!("gpqa_{subset}.csv"))
}

/// Reads a GPQA CSV. Errors name the file, the record and the column.
pub fn load(path: &Path) -> Result<Vec<Question>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the GPQA file {}", path.display()))?;
    parse(&text).with_context(|| format!("{} is not a GPQA CSV", path.display()))
}

/// Parses GPQA CSV text (see [`load`]).
pub fn parse(text: &str) -> Result<Vec<Question>> {
    let records = parse_csv(text.strip_prefix('\u{feff}').unwrap_or(text))?;
    let Some((header, rows)) = records.split_first() else {
        bail!("the file is empty");
    };
    let column = |name: &str| -> Result<usize> {
        header
            .iter()
            .position(|h| h.trim() == name)
            .with_context(|| format!("no `{name}` column (the header has: {})", header.join(", ")))
    };
    let q = column("Question")?;
    let c = column("Correct Answer")?;
    let wrong = [
        column("Incorrect Answer 1")?,
        column("Incorrect Answer 2")?,
        column("Incorrect Answer 3")?,
    ];
    let id_col = header.iter().position(|h| h.trim() == "Record ID");
    let mut out = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let record = i + 1;
        if row.iter().all(|f| f.trim().is_empty()) {
            continue; // a trailing blank line
        }
        let field = |col: usize, name: &str| -> Result<String> {
            let value = row.get(col).map(|s| s.trim()).unwrap_or("");
            anyhow::ensure!(!value.is_empty(), "record {record}: `{name}` is empty");
            Ok(value.to_string())
        };
        let id = match id_col.and_then(|c| row.get(c)).map(|s| s.trim()) {
            Some(id) if !id.is_empty() => id.to_string(),
            _ => format!("row-{record}"),
        };
        out.push(Question {
            id,
            question: field(q, "Question")?,
            correct: field(c, "Correct Answer")?,
            incorrect: [
                field(wrong[0], "Incorrect Answer 1")?,
                field(wrong[1], "Incorrect Answer 2")?,
                field(wrong[2], "Incorrect Answer 3")?,
            ],
        });
    }
    anyhow::ensure!(!out.is_empty(), "the file has a header but no questions");
    Ok(out)
}

/// RFC 4180 CSV: quoted fields may hold commas, newlines and `""` quotes.
fn parse_csv(text: &str) -> Result<Vec<Vec<String>>> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut in_quotes = false;
    let mut line = 1;
    let mut quote_started = 0;
    while let Some(ch) = chars.next() {
        if ch == '\n' {
            line += 1;
        }
        if in_quotes {
            match ch {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                _ => field.push(ch),
            }
            continue;
        }
        match ch {
            '"' if field.is_empty() => {
                in_quotes = true;
                quote_started = line;
            }
            ',' => record.push(std::mem::take(&mut field)),
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            _ => field.push(ch),
        }
    }
    anyhow::ensure!(
        !in_quotes,
        "line {quote_started}: a quoted field is never closed"
    );
    if !field.is_empty() || !record.is_empty() {
        record.push(field);
        records.push(record);
    }
    Ok(records)
}

/// The order of the choices for one asking: seeded by `seed`, the question's
/// id and the repeat, so a re-run (or a run on another machine) asks the same.
pub fn shuffle(question: &Question, seed: u64, repeat: usize) -> Asked {
    let mut order = [0usize, 1, 2, 3]; // 0 = the correct answer
    let mut rng = StdRng::seed_from_u64(vote_seed(seed, &format!("gpqa:{}", question.id), repeat));
    order.shuffle(&mut rng);
    let text = |i: usize| {
        if i == 0 {
            question.correct.clone()
        } else {
            question.incorrect[i - 1].clone()
        }
    };
    let position = order.iter().position(|&i| i == 0).unwrap_or(0);
    Asked {
        choices: order.map(text),
        answer: LETTERS[position],
    }
}

/// The zero-shot chain-of-thought prompt (as simple-evals words it).
pub fn prompt(question: &Question, asked: &Asked) -> String {
    let mut p = String::from(
        "Answer the following multiple choice question. The last line of your response \
         should be of the following format: 'Answer: $LETTER' (without quotes) where \
         LETTER is one of ABCD. Think step by step before answering.\n\n",
    );
    p.push_str(&question.question);
    p.push_str("\n\n");
    for (letter, choice) in LETTERS.iter().zip(&asked.choices) {
        p.push_str(&format!("{letter}) {choice}\n"));
    }
    p
}

/// The model's letter: the first `Answer: X` in the reply, upper-cased.
pub fn extract(reply: &str) -> Option<char> {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| {
        Regex::new(r"(?i)Answer[ \t]*:[ \t]*\$?([A-D])\$?").expect("a valid regex")
    });
    re.captures(reply)
        .and_then(|c| c.get(1))
        .and_then(|m| m.as_str().chars().next())
        .map(|c| c.to_ascii_uppercase())
}

/// The prompts for every (question, repeat), and what each asked.
pub fn build(questions: &[Question], repeats: usize, seed: u64) -> (Vec<VoteItem>, Vec<Asked>) {
    let mut prompts = Vec::with_capacity(questions.len() * repeats);
    let mut asked = Vec::with_capacity(questions.len() * repeats);
    for q in questions {
        for r in 0..repeats {
            let a = shuffle(q, seed, r);
            prompts.push(user_prompt(format!("gpqa:{}#{r}", q.id), &prompt(q, &a)));
            asked.push(a);
        }
    }
    (prompts, asked)
}

/// Grades replies (in [`build`]'s order) into items and the report's metrics:
/// accuracy with its 95% interval (by question), and the invalid-answer rate.
pub fn grade(
    questions: &[Question],
    repeats: usize,
    prompts: &[VoteItem],
    asked: &[Asked],
    replies: &[Result<String, String>],
) -> (Vec<ItemResult>, Vec<Metric>) {
    let mut items = Vec::with_capacity(replies.len());
    let mut groups = vec![Vec::with_capacity(repeats); questions.len()];
    let mut invalid = 0usize;
    for (j, reply) in replies.iter().enumerate() {
        let q = j / repeats.max(1);
        let (response, error) = match reply {
            Ok(text) => (text.clone(), None),
            Err(e) => (String::new(), Some(e.clone())),
        };
        let letter = extract(&response);
        if letter.is_none() {
            invalid += 1;
        }
        let correct = letter == Some(asked[j].answer);
        groups[q].push(correct);
        items.push(ItemResult {
            id: questions[q].id.clone(),
            sample: (j % repeats.max(1)) as u32,
            prompt: super::prompt_text(&prompts[j]),
            response,
            extracted: letter.map(String::from),
            expected: asked[j].answer.to_string(),
            correct: Some(correct),
            error,
        });
    }
    let metrics = vec![
        Metric::with_ci("accuracy", stats::accuracy(&groups)),
        Metric::new("invalid_rate", invalid as f64 / replies.len().max(1) as f64),
    ];
    (items, metrics)
}

/// Asks and grades every question `repeats` times.
pub fn run(
    runner: &VoteRunner,
    questions: &[Question],
    repeats: usize,
    seed: u64,
    data: &str,
    on_call: &(dyn Fn() + Sync),
) -> Result<Outcome> {
    anyhow::ensure!(repeats >= 1, "--repeats must be at least 1");
    let (prompts, asked) = build(questions, repeats, seed);
    let (replies, calls) = super::ask(runner, &prompts, on_call)?;
    let replies: Vec<Result<String, String>> =
        replies.into_iter().map(|mut r| r.swap_remove(0)).collect();
    let (items, metrics) = grade(questions, repeats, &prompts, &asked, &replies);
    let report = Report::new(
        Bench::Gpqa,
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

    #[test]
    fn csv_with_quotes_commas_and_newlines() {
        let text = "a,b,c\r\n\"x, y\",\"two\nlines\",\"say \"\"hi\"\"\"\n1,,3";
        let r = parse_csv(text).unwrap();
        assert_eq!(r[1], ["x, y", "two\nlines", "say \"hi\""]);
        assert_eq!(r[2], ["1", "", "3"]);
        assert!(parse_csv("a\n\"open")
            .unwrap_err()
            .to_string()
            .contains("line 2"));
    }

    #[test]
    fn extraction_formats() {
        assert_eq!(extract("so...\nAnswer: C"), Some('C'));
        assert_eq!(extract("answer:b"), Some('B'));
        assert_eq!(extract("ANSWER :\t$D$"), Some('D'));
        assert_eq!(extract("Final Answer: $A"), Some('A'));
        assert_eq!(extract("The answer is C"), None);
        assert_eq!(extract("Answer: E"), None);
        assert_eq!(extract(""), None);
        // two answers: the first counts
        assert_eq!(extract("Answer: A\n...on reflection\nAnswer: B"), Some('A'));
    }

    #[test]
    fn missing_column_and_empty_field_are_named() {
        let err = parse("Question,Correct Answer\nq,a\n").unwrap_err();
        assert!(format!("{err:#}").contains("Incorrect Answer 1"), "{err:#}");
        let err = parse(
            "Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,Incorrect Answer 3\n\
             q,a,b,,d\n",
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("record 1: `Incorrect Answer 2` is empty"),
            "{err:#}"
        );
    }
}
