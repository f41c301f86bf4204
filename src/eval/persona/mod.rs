//! The persona benchmark (docs/ARCHITECTURE.md, "Persona benchmark"): does the loop
//! learn what its user wants, only from talking to it?
//!
//! A simulated user has a preference a rule can check, and says so in natural
//! words when a reply breaks it (and gives a thumbs down); a reply that keeps it
//! gets a thumbs up. The user is scripted (rules and templates), so the benchmark
//! needs no second model. Sessions go through a live `claw up` ([`run`]) while its
//! stages train in the background, as in real use; [`metrics`] turns the sessions
//! into OpenClaw-RL's measure (sessions until the preference is met in 3
//! consecutive sessions) and the held-out satisfaction rate before and after.

pub mod metrics;
pub mod plot;
pub mod run;

use regex::Regex;
use std::sync::LazyLock;

/// A simulated user.
pub struct Persona {
    pub name: &'static str,
    /// The preference, as the report states it.
    pub preference: &'static str,
    /// What the user says when a reply breaks it (one is picked per session).
    pub feedback: &'static [&'static str],
    check: fn(&str) -> bool,
}

impl Persona {
    /// Whether `reply` keeps the preference (only; see [`Verdict`] for the user's
    /// whole judgement).
    pub fn keeps_preference(&self, reply: &str) -> bool {
        (self.check)(reply)
    }

    /// What the user makes of `reply` to `task`: a reply must answer the task at
    /// all before its style counts, or the cheapest way to keep "be brief" or
    /// "no bold" would be to say nothing (a policy trained on the rule alone
    /// learns exactly that).
    pub fn verdict(&self, task: &str, reply: &str) -> Verdict {
        match (answers(task, reply), self.keeps_preference(reply)) {
            (false, _) => Verdict::NoAnswer,
            (true, false) => Verdict::Unsatisfied,
            (true, true) => Verdict::Satisfied,
        }
    }
}

/// The simulated user's judgement of one reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Satisfied,
    /// An answer, but it breaks the preference.
    Unsatisfied,
    /// Empty, a refusal, too short to be an answer, or about something else.
    NoAnswer,
}

/// What every user says to a reply that does not answer.
pub const NO_ANSWER_FEEDBACK: &[&str] = &[
    "That doesn't answer my question.",
    "Please actually answer what I asked.",
];

/// Fewest words a reply needs to count as an answer to these open tasks.
pub const MIN_ANSWER_WORDS: usize = 5;

/// A rule-level check that `reply` answers `task`: enough words, no refusal, on
/// topic (it shares a content word with the task: one of five letters or more,
/// compared on its first five letters so "airplanes" meets "airplane", or an
/// acronym such as "DNA", compared whole), and it states something (see
/// [`states_something`]). The instruction ("Explain ...") is not the topic:
/// "Explain what DNA is." is answered by a reply about DNA. A reply that only
/// asks ("How can I clean a cast iron pan?" to "How do I clean a cast iron
/// pan?") is on topic and says nothing; a learned "brief" found that loophole on
/// Qwen2.5-0.5B, and a learned "ask-back" the next one: "Sure, I'd be happy to!
/// What is gravity?".
pub fn answers(task: &str, reply: &str) -> bool {
    static REFUSAL: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"(?i)\b(i'?m sorry|i am sorry|i can(no|')t|i'?m (not able|unable)|as an ai)\b")
            .expect("valid regex")
    });
    let stems = |text: &str| -> Vec<String> {
        text.split(|c: char| !c.is_alphanumeric())
            .filter(|w| w.chars().count() >= 5)
            .map(|w| w.to_lowercase().chars().take(5).collect())
            .collect()
    };
    let words = |text: &str| -> Vec<String> {
        text.split(|c: char| !c.is_alphanumeric())
            .map(str::to_lowercase)
            .collect()
    };
    const COMMON: [&str; 15] = [
        "about", "which", "there", "their", "would", "could", "should", "where", "these", "those",
        "other", "thing", // the instructions that open tasks:
        "expla", "descr", "summa",
    ];
    let acronyms = task
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() >= 2 && w.chars().all(|c| c.is_ascii_uppercase()))
        .map(str::to_lowercase);
    let topic: Vec<String> = stems(task)
        .into_iter()
        .filter(|s| !COMMON.contains(&s.as_str()))
        .chain(acronyms)
        .collect();
    let on_topic = |text: &str| {
        let said: Vec<String> = stems(text).into_iter().chain(words(text)).collect();
        topic.is_empty() || topic.iter().any(|t| said.contains(t))
    };
    reply.split_whitespace().count() >= MIN_ANSWER_WORDS
        && !REFUSAL.is_match(reply)
        && on_topic(reply)
        && states_something(reply, &on_topic)
}

/// Whether `reply` holds more than questions and pleasantries: two words or more
/// in its statements, where a question (a sentence ending in `?`) is not a
/// statement, nor is a pleasantry (a sentence that opens with "Sure", "I'd be
/// happy to", "You're welcome", ... and is not `on_topic`).
fn states_something(reply: &str, on_topic: &dyn Fn(&str) -> bool) -> bool {
    static SENTENCE: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"[^.!?\n]+[.!?]*").expect("valid regex"));
    static PLEASANTRY: LazyLock<Regex> = LazyLock::new(|| {
        opener(
            r"you['’]?re welcome|i['’]?d (be|love)|i would (be|love)|i['’]?m (happy|glad)|i am (happy|glad)|here['’]?s",
        )
    });
    SENTENCE
        .find_iter(reply)
        .map(|m| m.as_str())
        .filter(|s| !s.trim_end().ends_with('?'))
        .filter(|s| on_topic(s) || !PLEASANTRY.is_match(s))
        .flat_map(str::split_whitespace)
        .filter(|w| w.chars().any(char::is_alphanumeric))
        .count()
        >= 2
}

/// A text that opens (after any punctuation) with a courtesy word ("Sure",
/// "Thanks", "Let me", ...) or one of `more`: what the `direct` persona calls a
/// preamble and the answer rule a pleasantry, each with its own `more`.
fn opener(more: &str) -> Regex {
    const COURTESY: &str = "sure|certainly|of course|absolutely|great|okay|ok|alright|yes|\
                            no problem|hello|hi|hey|thanks|thank you|glad|happy to|let me|here is";
    Regex::new(&format!(r"(?i)^\W*({COURTESY}|{more})\b")).expect("valid regex")
}

/// Most words the `brief` user accepts.
pub const BRIEF_WORDS: usize = 40;

pub const PERSONAS: [Persona; 6] = [
    Persona {
        name: "no-bold",
        preference: "no markdown bold (**x**, __x__) and no headers (# lines)",
        feedback: &[
            "Please don't use bold text or headers, just plain sentences.",
            "No markdown formatting please, no bold and no headings.",
            "Could you write that without the bold text? Plain text is easier for me.",
        ],
        check: no_bold,
    },
    Persona {
        name: "brief",
        preference: "answers under 40 words",
        feedback: &[
            "That's too long. Please keep your answers under 40 words.",
            "Shorter please, a couple of sentences at most.",
            "Too much text. Give me the short version, under 40 words.",
        ],
        check: brief,
    },
    Persona {
        name: "direct",
        preference: "starts with the answer itself (no \"Sure!\", \"Certainly\", greetings or other preamble)",
        feedback: &[
            "Just give me the answer directly, without 'Sure!' or any preamble.",
            "Skip the introduction and start with the answer, please.",
            "No need for 'Certainly' or 'Of course', just answer.",
        ],
        check: direct,
    },
    Persona {
        name: "ask-back",
        preference: "ends with a short follow-up question to the user",
        feedback: &[
            "Please end your answer with a short follow-up question for me.",
            "I like it when you finish by asking me a question back.",
            "Could you end with a question, so we can keep talking?",
        ],
        check: ask_back,
    },
    Persona {
        name: "no-lists",
        preference: "plain sentences: no bulleted or numbered lists",
        feedback: &[
            "Please answer in plain sentences, not in a list.",
            "No bullet points or numbered lists, please. Just talk to me normally.",
            "I find lists hard to read. Could you write it as a short paragraph?",
        ],
        check: no_lists,
    },
    Persona {
        name: "one-paragraph",
        preference: "one paragraph: no line breaks",
        feedback: &[
            "Please answer in one short paragraph, without line breaks.",
            "Keep it to a single paragraph, please.",
            "Could you put that in one paragraph instead of several?",
        ],
        check: one_paragraph,
    },
];

/// The persona called `name`.
pub fn persona(name: &str) -> Option<&'static Persona> {
    PERSONAS.iter().find(|p| p.name == name)
}

fn no_bold(reply: &str) -> bool {
    static BOLD: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"\*\*[^*\n]+\*\*|__[^_\n]+__").expect("valid regex"));
    !BOLD.is_match(reply) && !reply.lines().any(|l| l.trim_start().starts_with('#'))
}

fn no_lists(reply: &str) -> bool {
    static ITEM: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"^\s*([-*•+]|\d+[.)])\s+\S").expect("valid regex"));
    !reply.lines().any(|l| ITEM.is_match(l))
}

fn one_paragraph(reply: &str) -> bool {
    !reply.trim().contains('\n')
}

fn brief(reply: &str) -> bool {
    reply.split_whitespace().count() < BRIEF_WORDS
}

fn direct(reply: &str) -> bool {
    static PREAMBLE: LazyLock<Regex> = LazyLock::new(|| {
        opener(
            r"good question|what a|greetings|well|i'?d be|i would be|i'?m happy|i am happy|i can help|here'?s|here are|as an ai",
        )
    });
    !reply.trim().is_empty() && !PREAMBLE.is_match(reply)
}

fn ask_back(reply: &str) -> bool {
    let text = reply.trim_end();
    if !text.ends_with('?') {
        return false;
    }
    // The question is the last sentence, and short.
    let last = text[..text.len() - 1]
        .rfind(['.', '!', '?', '\n'])
        .map_or(text, |i| &text[i + 1..]);
    last.split_whitespace().count() <= 25
}

/// The built-in training tasks (fixtures/persona/tasks.txt).
pub fn tasks() -> Vec<&'static str> {
    lines(include_str!("../../../fixtures/persona/tasks.txt"))
}

/// The built-in held-out tasks (fixtures/persona/heldout.txt).
pub fn heldout() -> Vec<&'static str> {
    lines(include_str!("../../../fixtures/persona/heldout.txt"))
}

fn lines(text: &'static str) -> Vec<&'static str> {
    crate::train::anchor::parse_prompts(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str) -> &'static Persona {
        persona(name).unwrap()
    }

    #[test]
    fn no_bold_catches_bold_and_headers_only() {
        assert!(p("no-bold").keeps_preference("Paris is the capital. It is big."));
        assert!(p("no-bold").keeps_preference("Use 2 * 3 * 4 and snake_case_names."));
        assert!(!p("no-bold").keeps_preference("The answer is **Paris**."));
        assert!(!p("no-bold").keeps_preference("__Note__: it rains."));
        assert!(!p("no-bold").keeps_preference("## Steps\n1. Boil water"));
    }

    #[test]
    fn no_lists_catches_bullets_and_numbers() {
        let p = persona("no-lists").unwrap();
        assert!(p.keeps_preference("Boil water. Then add 2.5 cups of tea - or less."));
        for bad in [
            "Steps:\n1. Boil water",
            "Tips:\n- sleep early",
            " * one\n * two",
            "2) second",
        ] {
            assert!(!p.keeps_preference(bad), "{bad:?}");
        }
    }

    #[test]
    fn one_paragraph_rejects_any_line_break_inside() {
        let p = p("one-paragraph");
        assert!(p.keeps_preference("Boil water. Add the tea.\n"));
        assert!(!p.keeps_preference("Boil water.\n\nAdd the tea."));
        assert!(!p.keeps_preference("Steps:\n- boil\n- steep"));
    }

    #[test]
    fn brief_counts_words() {
        assert!(p("brief").keeps_preference("Paris."));
        assert!(p("brief").keeps_preference(&"word ".repeat(BRIEF_WORDS - 1)));
        assert!(!p("brief").keeps_preference(&"word ".repeat(BRIEF_WORDS)));
    }

    #[test]
    fn direct_rejects_preambles() {
        assert!(p("direct").keeps_preference("Paris is the capital of France."));
        assert!(p("direct").keeps_preference("Shortly after dawn, bees leave the hive."));
        for bad in [
            "Sure! Paris.",
            "Certainly, here you go.",
            "Of course. Paris.",
            "Hello there! Paris.",
            "I'd be happy to help: Paris.",
            "Here's how: boil water.",
            "  **Great question!** Paris.",
            "",
        ] {
            assert!(!p("direct").keeps_preference(bad), "{bad:?}");
        }
    }

    #[test]
    fn ask_back_wants_a_short_closing_question() {
        assert!(p("ask-back").keeps_preference("Paris. Have you been there?"));
        assert!(p("ask-back").keeps_preference("Boil water.\nWant more tips?  "));
        assert!(!p("ask-back").keeps_preference("Paris. Have you been there? It is nice."));
        assert!(!p("ask-back").keeps_preference("Paris."));
        let long = format!("Paris. {}?", "word ".repeat(30));
        assert!(!p("ask-back").keeps_preference(&long));
    }

    #[test]
    fn a_reply_must_answer_before_its_style_counts() {
        let task = "How do airplanes stay in the air?";
        let good = "Airplanes fly because their wings push air down.";
        assert!(answers(task, good));
        for bad in [
            "",
            "The Dream-Tart.",
            "I'm sorry, I cannot help with that question about planes.",
            "The devil's own word is a mystery to everyone here.",
        ] {
            assert!(!answers(task, bad), "{bad:?}");
        }
        // The instruction is not the topic; an acronym is.
        let dna = "Explain what DNA is.";
        assert!(answers(dna, "DNA is the molecule that carries genes."));
        assert!(!answers(dna, "Let me explain: it is a kind of thing."));
        assert!(answers(
            "Explain how rainbows form.",
            "Sunlight bends in raindrops and splits into colours, making a rainbow."
        ));
        // Questions alone do not answer, however on topic; with a statement they may.
        let pan = "How do I clean a cast iron pan?";
        for asks in [
            "How can I clean a cast iron pan?",
            "What kind of cast iron pan is it? Is it rusty?",
            "Sure! Is your cast iron pan seasoned?",
            // what a learned ask-back on Qwen2.5-0.5B said to everything:
            "Sure, I'd be happy to! What is the best way to clean a cast iron pan?",
            "Sure, I'd be happy to help. Of course! How rusty is your cast iron pan?",
        ] {
            assert!(!answers(pan, asks), "{asks:?}");
        }
        for says in [
            "Clean it with hot water, then dry and oil the pan. Is it rusty?",
            // a pleasantry before an answer is not the answer, nor does it spoil one
            "Sure! Clean the pan with salt, then oil it. Want more tips?",
            "Sure, I'd be happy to help you clean your cast iron pan: scrub it with salt.",
        ] {
            assert!(answers(pan, says), "{says:?}");
        }
        let brief = persona("brief").unwrap();
        assert_eq!(brief.verdict(task, good), Verdict::Satisfied);
        assert_eq!(brief.verdict(task, ""), Verdict::NoAnswer);
        let long = format!("{good} {}", "More about wings and lift. ".repeat(10));
        assert_eq!(brief.verdict(task, &long), Verdict::Unsatisfied);
    }

    #[test]
    fn prompt_sets_are_disjoint_and_varied() {
        let (tasks, heldout) = (tasks(), heldout());
        assert!(tasks.len() >= 50 && heldout.len() >= 20);
        for h in &heldout {
            assert!(!tasks.contains(h), "{h} is in both sets");
        }
        let unique: std::collections::HashSet<_> = tasks.iter().collect();
        assert_eq!(unique.len(), tasks.len());
    }
}
