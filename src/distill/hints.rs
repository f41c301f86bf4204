//! Hindsight hints (docs/ARCHITECTURE.md, "Hindsight hints and distillation"):
//! reading the hint judge's replies, choosing one hint, and building the teacher's
//! context from it.

use anyhow::{bail, Result};
use serde::Serialize;
use serde_json::{json, Value as Json};

use crate::llm::boxed::{last_boxed, parse_score};

/// Hints of this many characters or fewer are not hints (OpenClaw-RL's filter).
pub const MIN_HINT_CHARS: usize = 10;

/// The marker appended to the last user message before the hint.
pub const HINT_MARKER: &str = "\n\n[user's hint / instruction]\n";

/// What separates a hint placed before the user's message from that message.
const BEFORE_SEPARATOR: &str = "\n\n";

/// One hint-judge reply, read.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HintVote {
    /// The last `\boxed{±1}`; None if missing or anything else (0 is invalid here).
    pub score: Option<i8>,
    /// The last `[HINT_START]...[HINT_END]`, trimmed.
    pub hint: Option<String>,
}

impl HintVote {
    /// A positive vote with a hint longer than [`MIN_HINT_CHARS`].
    pub fn accepted_hint(&self) -> Option<&str> {
        match (self.score, &self.hint) {
            (Some(1), Some(h)) if h.chars().count() > MIN_HINT_CHARS => Some(h),
            _ => None,
        }
    }
}

/// Reads one reply.
pub fn parse_hint_reply(text: &str) -> HintVote {
    let score = last_boxed(text).and_then(|b| parse_score(b, &[-1, 1]));
    HintVote {
        score,
        hint: last_hint(text),
    }
}

fn last_hint(text: &str) -> Option<String> {
    const START: &str = "[HINT_START]";
    const END: &str = "[HINT_END]";
    let end = text.rfind(END)?;
    let start = text[..end].rfind(START)? + START.len();
    let hint = text[start..end].trim();
    (!hint.is_empty()).then(|| hint.to_string())
}

/// How to pick one hint among several accepted ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Select {
    /// The longest (OpenClaw-RL's default: the most information).
    Longest,
    /// The shortest.
    Shortest,
    /// The one sharing the most words with the other hints (the consensus);
    /// ties go to the longer one.
    Overlap,
}

/// Picks one hint from the accepted ones, or None.
pub fn select_hint<'a>(hints: &[&'a str], select: Select) -> Option<&'a str> {
    let len = |h: &&str| h.chars().count();
    match select {
        Select::Longest => hints.iter().copied().max_by_key(len),
        Select::Shortest => hints.iter().copied().min_by_key(len),
        Select::Overlap => {
            let words = |h: &str| -> std::collections::HashSet<String> {
                h.split(|c: char| !c.is_alphanumeric())
                    .filter(|w| !w.is_empty())
                    .map(str::to_lowercase)
                    .collect()
            };
            let sets: Vec<_> = hints.iter().map(|h| words(h)).collect();
            let score = |i: usize| -> usize {
                (0..sets.len())
                    .filter(|&j| j != i)
                    .map(|j| sets[i].intersection(&sets[j]).count())
                    .sum()
            };
            (0..hints.len())
                .max_by_key(|&i| (score(i), len(&hints[i])))
                .map(|i| hints[i])
        }
    }
}

/// Where the teacher reads the hint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HintPlacement {
    /// Appended to the last user message (OpenClaw-RL's placement), wherever it is.
    LastUser,
    /// The last thing before the reply: appended to the last message if a user
    /// wrote it, else (a turn answering a tool result) a new user message after it.
    /// A hint on the task message, above the call and its output, barely moves a
    /// small teacher's next token (measured: docs/ARCHITECTURE.md).
    #[default]
    End,
    /// At the start of the last user message, above what the user asked: the
    /// teacher reads it as context and then answers the message. Appended after
    /// a conversational message, a correction ("That's too long.") is what a
    /// small policy teacher answers: it echoes it instead of answering the
    /// question (measured: docs/ARCHITECTURE.md, "Hindsight hints").
    Before,
}

fn is_user(message: &Json) -> bool {
    message.get("role").and_then(Json::as_str) == Some("user")
}

/// A copy of `messages` with the hint where `placement` puts it: the teacher's
/// context. With no user message at all, the last message gets it.
pub fn teacher_messages(
    messages: &[Json],
    hint: &str,
    placement: HintPlacement,
) -> Result<Vec<Json>> {
    let mut out = messages.to_vec();
    if placement == HintPlacement::End
        && out.last().is_some_and(|m| !is_user(m))
        && out.iter().any(is_user)
    {
        out.push(json!({"role": "user", "content": format!("{}{hint}", HINT_MARKER.trim_start())}));
        return Ok(out);
    }
    let Some(index) = out
        .iter()
        .rposition(is_user)
        .or_else(|| out.len().checked_sub(1))
    else {
        bail!("the turn has no messages to add a hint to");
    };
    let message = &mut out[index];
    // Above the user's own words, or after the last message's.
    let before = placement == HintPlacement::Before && is_user(message);
    let addition = if before {
        format!("{}{hint}{BEFORE_SEPARATOR}", HINT_MARKER.trim_start())
    } else {
        format!("{HINT_MARKER}{hint}")
    };
    match message.get_mut("content") {
        Some(Json::String(text)) if before => text.insert_str(0, &addition),
        Some(Json::String(text)) => text.push_str(&addition),
        Some(Json::Array(parts)) if before => {
            // Multi-part content: a text part of its own, first.
            parts.insert(0, json!({"type": "text", "text": addition}));
        }
        Some(Json::Array(parts)) => {
            // Multi-part content: extend the last text part, or add one.
            let last_text = parts
                .iter_mut()
                .rev()
                .find(|p| p.get("type").and_then(Json::as_str) == Some("text"));
            match last_text.and_then(|p| p.get_mut("text")) {
                Some(Json::String(text)) => text.push_str(&addition),
                _ => parts.push(json!({"type": "text", "text": addition})),
            }
        }
        Some(Json::Null) | None => {
            let alone = if before {
                addition.trim_end()
            } else {
                addition.trim_start()
            };
            message["content"] = Json::String(alone.to_string());
        }
        Some(other) => bail!("message {index} has content of an unexpected type: {other}"),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_score_and_hint() {
        let reply = "The user says the file was missing.\n\\boxed{1}\n[HINT_START] Check that the file exists before reading it. [HINT_END]";
        let vote = parse_hint_reply(reply);
        assert_eq!(vote.score, Some(1));
        assert_eq!(
            vote.accepted_hint(),
            Some("Check that the file exists before reading it.")
        );
        // The last box and the last hint count.
        let vote =
            parse_hint_reply("\\boxed{1} [HINT_START]a long enough hint[HINT_END] no, \\boxed{-1}");
        assert_eq!(vote.score, Some(-1));
        assert_eq!(vote.accepted_hint(), None);
        // 0 is not a hint-judge answer; short hints are not hints.
        assert_eq!(parse_hint_reply("\\boxed{0}").score, None);
        assert_eq!(
            parse_hint_reply("\\boxed{1}[HINT_START]too short[HINT_END]").accepted_hint(),
            None
        );
        assert_eq!(
            parse_hint_reply("\\boxed{+1} no hint").accepted_hint(),
            None
        );
        assert_eq!(parse_hint_reply("[HINT_END] [HINT_START]x").hint, None);
    }

    #[test]
    fn selects_hints() {
        let hints = [
            "Use metric units for distances.",
            "Answer in French, and use metric units.",
            "Be brief.",
        ];
        assert_eq!(select_hint(&hints, Select::Longest), Some(hints[1]));
        assert_eq!(select_hint(&hints, Select::Shortest), Some(hints[2]));
        // "use", "metric", "units" are shared by the first two.
        assert_eq!(select_hint(&hints, Select::Overlap), Some(hints[1]));
        assert_eq!(select_hint(&[], Select::Longest), None);
    }

    #[test]
    fn appends_the_hint_to_the_last_user_message() {
        let messages = vec![
            json!({"role": "system", "content": "sys"}),
            json!({"role": "user", "content": "first"}),
            json!({"role": "assistant", "content": "a"}),
            json!({"role": "user", "content": [{"type": "text", "text": "second"}]}),
            json!({"role": "tool", "content": "out", "tool_call_id": "1"}),
        ];
        let out = teacher_messages(&messages, "Be brief.", HintPlacement::LastUser).unwrap();
        assert_eq!(
            out[3]["content"][0]["text"],
            "second\n\n[user's hint / instruction]\nBe brief."
        );
        assert_eq!(out[1]["content"], "first", "earlier messages untouched");
        assert_eq!(out[4], messages[4]);
        // No user message: the last message gets it, wherever the hint goes.
        let only = vec![json!({"role": "system", "content": "sys"})];
        for placement in [
            HintPlacement::LastUser,
            HintPlacement::End,
            HintPlacement::Before,
        ] {
            let out = teacher_messages(&only, "Be brief.", placement).unwrap();
            assert_eq!(out.len(), 1);
            assert!(out[0]["content"].as_str().unwrap().ends_with("Be brief."));
            assert!(teacher_messages(&[], "x", placement).is_err());
        }
    }

    #[test]
    fn at_the_end_a_hint_follows_the_tool_result() {
        let messages = vec![
            json!({"role": "user", "content": "task"}),
            json!({"role": "assistant", "content": "", "tool_calls": []}),
            json!({"role": "tool", "content": "42", "tool_call_id": "1"}),
        ];
        let out = teacher_messages(&messages, "Answer now.", HintPlacement::End).unwrap();
        assert_eq!(out[..3], messages[..]);
        assert_eq!(
            out[3],
            json!({"role": "user", "content": "[user's hint / instruction]\nAnswer now."})
        );
        // A turn answering a user message: the same as OpenClaw-RL's placement.
        let asked = &messages[..1];
        assert_eq!(
            teacher_messages(asked, "Be brief.", HintPlacement::End).unwrap(),
            teacher_messages(asked, "Be brief.", HintPlacement::LastUser).unwrap()
        );
    }

    #[test]
    fn before_puts_the_hint_above_the_last_user_message() {
        let messages = vec![
            json!({"role": "user", "content": "Explain DNA."}),
            json!({"role": "assistant", "content": "a long reply"}),
            json!({"role": "user", "content": "That's too long."}),
        ];
        let out = teacher_messages(&messages, "Under 40 words.", HintPlacement::Before).unwrap();
        assert_eq!(
            out[2]["content"],
            "[user's hint / instruction]\nUnder 40 words.\n\nThat's too long."
        );
        assert_eq!(out[..2], messages[..2], "earlier messages untouched");
        let parts = vec![json!({"role": "user", "content": [{"type": "text", "text": "q"}]})];
        let out = teacher_messages(&parts, "Be brief.", HintPlacement::Before).unwrap();
        assert_eq!(
            out[0]["content"],
            json!([
                {"type": "text", "text": "[user's hint / instruction]\nBe brief.\n\n"},
                {"type": "text", "text": "q"}
            ])
        );
        // After a tool result the last user message still gets it, above the task.
        let tool = vec![
            json!({"role": "user", "content": "task"}),
            json!({"role": "tool", "content": "42", "tool_call_id": "1"}),
        ];
        let out = teacher_messages(&tool, "Answer now.", HintPlacement::Before).unwrap();
        assert_eq!(out.len(), 2);
        assert!(out[0]["content"].as_str().unwrap().ends_with("\n\ntask"));
    }
}
