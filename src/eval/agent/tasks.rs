//! The agent benchmark's tasks: problems whose answer must be computed (big-number
//! arithmetic, unit conversions, string manipulation, GSM8K-style word problems),
//! generated from a seed, and the exact answer check.
//!
//! The held-out set comes from a fixed seed of its own, so every method and seed
//! is measured on the same tasks; training tasks are drawn from the run's seed
//! and never repeat a held-out prompt.

use std::collections::HashSet;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// The seed of the held-out set (independent of `--seed`).
pub const HELDOUT_SEED: u64 = 0x5eed_4e1d;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Arithmetic,
    Units,
    Strings,
    Word,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Arithmetic, Kind::Units, Kind::Strings, Kind::Word];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Arithmetic => "arithmetic",
            Kind::Units => "units",
            Kind::Strings => "strings",
            Kind::Word => "word",
        }
    }
}

/// One problem and its exact answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub kind: Kind,
    pub prompt: String,
    /// The answer as text: an integer, a decimal with `decimals` places, or a word.
    pub answer: String,
    /// For numeric answers: the decimal places the prompt asks for (0: integer).
    /// None: a string answer, compared as text.
    pub decimals: Option<u32>,
    /// A Python program that prints the answer: what the environment shows in
    /// its correction (the hindsight hint), never the model.
    pub program: String,
}

/// `n` tasks from `seed`, the kinds in turn, no prompt twice and none of `avoid`.
pub fn generate(seed: u64, n: usize, avoid: &HashSet<String>) -> Vec<Task> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seen: HashSet<String> = HashSet::new();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let kind = Kind::ALL[out.len() % Kind::ALL.len()];
        let task = make(kind, &mut rng);
        if avoid.contains(&task.prompt) || !seen.insert(task.prompt.clone()) {
            continue;
        }
        out.push(task);
    }
    out
}

/// The held-out set: the first `n` tasks of [`HELDOUT_SEED`].
pub fn heldout(n: usize) -> Vec<Task> {
    generate(HELDOUT_SEED, n, &HashSet::new())
}

/// `n` training tasks of run `seed`, none of them in the held-out set of `heldout_n`.
pub fn training(seed: u64, n: usize, heldout: &[Task]) -> Vec<Task> {
    let avoid: HashSet<String> = heldout.iter().map(|t| t.prompt.clone()).collect();
    // A different stream from the held-out one even when seed == HELDOUT_SEED.
    generate(seed ^ 0x7a5c_0000_0000_0001, n, &avoid)
}

fn make(kind: Kind, rng: &mut StdRng) -> Task {
    match kind {
        Kind::Arithmetic => arithmetic(rng),
        Kind::Units => units(rng),
        Kind::Strings => strings(rng),
        Kind::Word => word(rng),
    }
}

/// A task with an integer answer, computed by the Python expression `expr`.
fn int_task(kind: Kind, prompt: String, answer: i64, expr: String) -> Task {
    Task {
        kind,
        prompt,
        answer: answer.to_string(),
        decimals: Some(0),
        program: format!("print({expr})"),
    }
}

fn arithmetic(rng: &mut StdRng) -> Task {
    let a: i64 = rng.gen_range(1_000..100_000);
    let b: i64 = rng.gen_range(100..10_000);
    let c: i64 = rng.gen_range(1_000..1_000_000);
    let (expr, answer) = match rng.gen_range(0..4) {
        0 => (format!("{a} * {b}"), a * b),
        1 => (format!("{a} * {b} + {c}"), a * b + c),
        2 => (format!("{c} - {a} * {b}"), c - a * b),
        _ => {
            let d: i64 = rng.gen_range(10..100);
            (format!("({a} + {c}) * {d}"), (a + c) * d)
        }
    };
    int_task(Kind::Arithmetic, format!("What is {expr}?"), answer, expr)
}

fn units(rng: &mut StdRng) -> Task {
    // (from, to, factor): to = from * factor; Fahrenheit is the one affine case.
    const LINEAR: [(&str, &str, f64); 6] = [
        ("kilometres", "miles", 1.0 / 1.609344),
        ("miles", "kilometres", 1.609344),
        ("pounds", "kilograms", 0.45359237),
        ("inches", "centimetres", 2.54),
        ("US gallons", "litres", 3.785411784),
        ("feet", "metres", 0.3048),
    ];
    let k = rng.gen_range(0..LINEAR.len() + 1);
    let x = rng.gen_range(1_000..100_000) as f64 / 10.0;
    let (prompt, value, expr) = match LINEAR.get(k) {
        // `{factor}` prints the shortest text that parses back to the same
        // f64, so Python computes the very product the answer comes from.
        Some((from, to, factor)) => (
            format!("Convert {x} {from} to {to}."),
            x * factor,
            format!("{x} * {factor}"),
        ),
        None => (
            format!("Convert {x} degrees Fahrenheit to degrees Celsius."),
            (x - 32.0) * 5.0 / 9.0,
            format!("({x} - 32) * 5 / 9"),
        ),
    };
    Task {
        kind: Kind::Units,
        prompt: format!("{prompt} Give the answer rounded to 2 decimal places."),
        answer: format!("{value:.2}"),
        decimals: Some(2),
        program: format!("print(round({expr}, 2))"),
    }
}

const WORDS: [&str; 40] = [
    "strawberry",
    "mississippi",
    "bookkeeper",
    "parallelogram",
    "onomatopoeia",
    "refrigerator",
    "characteristic",
    "accommodation",
    "independence",
    "photosynthesis",
    "entrepreneur",
    "questionnaire",
    "kaleidoscope",
    "hippopotamus",
    "extraordinary",
    "communication",
    "responsibility",
    "encyclopedia",
    "constellation",
    "thermodynamics",
    "unbelievable",
    "rhododendron",
    "mathematician",
    "philosophical",
    "nevertheless",
    "pomegranate",
    "chrysanthemum",
    "bureaucracy",
    "millennium",
    "embarrassment",
    "necessarily",
    "perseverance",
    "conscientious",
    "sophisticated",
    "archaeology",
    "cappuccino",
    "tambourine",
    "marshmallow",
    "watermelon",
    "grasshopper",
];

fn strings(rng: &mut StdRng) -> Task {
    let w1 = *WORDS.choose(rng).unwrap_or(&WORDS[0]);
    let w2 = *WORDS.choose(rng).unwrap_or(&WORDS[1]);
    let letters: Vec<char> = w1.chars().collect();
    match rng.gen_range(0..4) {
        0 => Task {
            kind: Kind::Strings,
            prompt: format!("Write the word \"{w1}\" reversed, letter by letter."),
            answer: w1.chars().rev().collect(),
            decimals: None,
            program: format!("print('{w1}'[::-1])"),
        },
        1 => {
            let phrase = format!("{w1} {w2}");
            let c = letters[rng.gen_range(0..letters.len())];
            let n = phrase.chars().filter(|&x| x == c).count() as i64;
            int_task(
                Kind::Strings,
                format!("How many times does the letter '{c}' appear in \"{phrase}\"?"),
                n,
                format!("'{phrase}'.count('{c}')"),
            )
        }
        2 => {
            let phrase = format!("{w1}{w2}");
            let n = phrase.chars().count() as i64;
            int_task(
                Kind::Strings,
                format!("How many characters long is the string \"{phrase}\"?"),
                n,
                format!("len('{phrase}')"),
            )
        }
        _ => {
            // Every other letter, starting with the first.
            let answer: String = letters.iter().step_by(2).collect();
            Task {
                kind: Kind::Strings,
                prompt: format!(
                    "Take every second letter of \"{w1}\", starting with the first letter \
                     (positions 1, 3, 5, ...). What string do you get?"
                ),
                answer,
                decimals: None,
                program: format!("print('{w1}'[::2])"),
            }
        }
    }
}

const NAMES: [&str; 8] = [
    "Maria", "James", "Aisha", "Tom", "Lena", "Ravi", "Sofia", "Kenji",
];

fn word(rng: &mut StdRng) -> Task {
    let name = *NAMES.choose(rng).unwrap_or(&NAMES[0]);
    let (prompt, answer, expr) = match rng.gen_range(0..5) {
        0 => {
            let (price, n) = (rng.gen_range(13..97), rng.gen_range(120..990));
            let paid = (price * n / 1000 + 1) * 1000 + rng.gen_range(0..5) * 1000;
            (
                format!(
                    "A shop sells chairs for ${price} each. {name} buys {n} chairs for an \
                     office and pays ${paid}. How many dollars of change does {name} get?"
                ),
                paid - price * n,
                format!("{paid} - {price} * {n}"),
            )
        }
        1 => {
            let (rows, seats, empty) = (
                rng.gen_range(23..89),
                rng.gen_range(17..64),
                rng.gen_range(40..400),
            );
            (
                format!(
                    "A stadium has {rows} rows of {seats} seats. At a match, {empty} seats \
                     stay empty. How many people are seated?"
                ),
                rows * seats - empty,
                format!("{rows} * {seats} - {empty}"),
            )
        }
        2 => {
            let (daily, days, spent) = (
                rng.gen_range(137..989),
                rng.gen_range(31..366),
                rng.gen_range(1_000..20_000),
            );
            (
                format!(
                    "{name} saves ${daily} every day for {days} days, then spends ${spent} \
                     on a car repair. How many dollars does {name} have left?"
                ),
                daily * days - spent,
                format!("{daily} * {days} - {spent}"),
            )
        }
        3 => {
            let (boxes, per, broken) = (
                rng.gen_range(48..300),
                rng.gen_range(12..48),
                rng.gen_range(3..9),
            );
            (
                format!(
                    "A farm packs {boxes} boxes of {per} eggs each. In every box, {broken} \
                     eggs are broken. How many unbroken eggs are there?"
                ),
                boxes * (per - broken),
                format!("{boxes} * ({per} - {broken})"),
            )
        }
        _ => {
            let (speed, hours, extra) = (
                rng.gen_range(47..129),
                rng.gen_range(13..58),
                rng.gen_range(100..900),
            );
            (
                format!(
                    "A truck drives {speed} km every hour for {hours} hours, then another \
                     {extra} km. How many kilometres does it drive in total?"
                ),
                speed * hours + extra,
                format!("{speed} * {hours} + {extra}"),
            )
        }
    };
    int_task(Kind::Word, prompt, answer, expr)
}

/// What the reply gives as its final answer: the text after the last
/// "Answer:" (case-insensitive) if there is one, else the whole reply.
pub fn final_answer(reply: &str) -> &str {
    let lower = reply.to_ascii_lowercase();
    match lower.rfind("answer:") {
        Some(at) => reply[at + "answer:".len()..].trim(),
        None => reply.trim(),
    }
}

/// Whether `reply` answers `task` exactly: for numbers, the last number of the
/// final answer (commas, `$` and units ignored) equals the answer at the task's
/// precision (rounded to its decimal places: 42, 42.0 and 42.00 are all 42); for
/// strings, the final answer's last word (quotes, backticks, bold and a closing
/// full stop removed), ignoring case.
pub fn check(task: &Task, reply: &str) -> bool {
    let answer = final_answer(reply);
    match task.decimals {
        Some(places) => {
            let (Some(got), Ok(want)) = (last_number(answer), task.answer.parse::<f64>()) else {
                return false;
            };
            let scale = 10f64.powi(places as i32);
            (got * scale).round() == (want * scale).round()
        }
        None => {
            let word = answer
                .split_whitespace()
                .last()
                .unwrap_or("")
                .trim_matches(|c: char| !c.is_alphanumeric());
            word.eq_ignore_ascii_case(&task.answer)
        }
    }
}

/// The last number in `text` (an optional minus sign, digits with optional
/// thousands commas, an optional fraction).
pub fn last_number(text: &str) -> Option<f64> {
    static NUMBER: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"-?\d[\d,]*(?:\.\d+)?").expect("valid regex")
    });
    NUMBER
        .find_iter(text)
        .last()
        .and_then(|m| m.as_str().replace(',', "").parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_and_the_sets_are_disjoint() {
        let held = heldout(40);
        assert_eq!(held, heldout(40));
        let train = training(3, 200, &held);
        assert_eq!(train, training(3, 200, &held));
        assert_ne!(train, training(4, 200, &held));
        for t in &train {
            assert!(!held.iter().any(|h| h.prompt == t.prompt), "{}", t.prompt);
        }
        for kind in Kind::ALL {
            assert_eq!(train.iter().filter(|t| t.kind == kind).count(), 50);
        }
    }

    #[test]
    fn answers_are_right() {
        for t in generate(1, 400, &HashSet::new()) {
            // A reply that states the answer passes its own check.
            assert!(check(&t, &format!("Answer: {}", t.answer)), "{t:?}");
            if t.prompt.starts_with("What is ") {
                let expr = t.prompt["What is ".len()..].trim_end_matches('?');
                assert_eq!(t.answer, eval_simple(expr).to_string(), "{expr}");
            }
        }
    }

    /// Each task's reference program, run by Python, prints its answer (the
    /// environment's hint must never teach a wrong program).
    #[test]
    fn reference_programs_print_the_answers() {
        let tasks = generate(2, 400, &HashSet::new());
        let script: String = tasks.iter().map(|t| format!("{}\n", t.program)).collect();
        let out = match std::process::Command::new("python3")
            .args(["-c", &script])
            .output()
        {
            Ok(out) => out,
            Err(e) => {
                eprintln!("SKIP reference_programs_print_the_answers: no python3 ({e})");
                return;
            }
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = printed.lines().collect();
        assert_eq!(lines.len(), tasks.len());
        for (t, line) in tasks.iter().zip(lines) {
            assert!(
                check(t, line),
                "{}: {} printed {line:?}, want {}",
                t.prompt,
                t.program,
                t.answer
            );
        }
    }

    /// `a * b`, `a * b + c`, `c - a * b` or `(a + c) * d`, for the test.
    fn eval_simple(expr: &str) -> i64 {
        let n: Vec<i64> = expr
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect();
        if expr.starts_with('(') {
            (n[0] + n[1]) * n[2]
        } else if expr.contains('-') {
            n[0] - n[1] * n[2]
        } else if expr.contains('+') {
            n[0] * n[1] + n[2]
        } else {
            n[0] * n[1]
        }
    }

    #[test]
    fn numbers_are_normalised_and_compared_at_the_asked_precision() {
        let int = Task {
            kind: Kind::Arithmetic,
            prompt: String::new(),
            answer: "1234567".into(),
            decimals: Some(0),
            program: String::new(),
        };
        for ok in [
            "Answer: 1234567",
            "The result is 1,234,567.",
            "answer: $1234567.00",
            "I computed 5 * 7 first. Answer: 1234567",
        ] {
            assert!(check(&int, ok), "{ok}");
        }
        for bad in ["Answer: 1234568", "Answer: 1234567 or 5", "no idea", ""] {
            assert!(!check(&int, bad), "{bad}");
        }
        let dec = Task {
            kind: Kind::Units,
            prompt: String::new(),
            answer: "85.24".into(),
            decimals: Some(2),
            program: String::new(),
        };
        assert!(check(&dec, "Answer: 85.24 miles"));
        assert!(check(&dec, "Answer: 85.2401"));
        assert!(!check(&dec, "Answer: 85.2"));
        assert!(!check(&dec, "Answer: 85"));
        let negative = Task {
            answer: "-42".into(),
            ..int.clone()
        };
        assert!(check(&negative, "Answer: -42"));
        assert!(!check(&negative, "Answer: 42"));
    }

    #[test]
    fn strings_compare_the_last_word_without_quotes() {
        let t = Task {
            kind: Kind::Strings,
            prompt: String::new(),
            answer: "yrrebwarts".into(),
            decimals: None,
            program: String::new(),
        };
        for ok in [
            "Answer: yrrebwarts",
            "The reversed word is \"yrrebwarts\".",
            "Answer: **YRREBWARTS**",
            "answer: `yrrebwarts`",
        ] {
            assert!(check(&t, ok), "{ok}");
        }
        assert!(!check(&t, "Answer: yrrebwart"));
        assert!(!check(&t, "Answer: yrrebwarts is wrong, it is strawberry"));
    }
}
