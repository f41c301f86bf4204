//! Judge prompts as plain text files the user can replace.
//!
//! Format: optional `#` comment lines at the top, then sections started by a line
//! that is exactly `[system]` or `[user]` (a file with no section line is one user
//! message). In the text, `{name}` placeholders for the variables the caller
//! provides are replaced in one pass, so a value that itself contains `{response}`
//! is never expanded again; all other braces (`\boxed{1}`) stay as written.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value as Json};

/// A parsed prompt: the messages to send, with placeholders still in them.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptTemplate {
    /// (role, text) in file order.
    messages: Vec<(String, String)>,
}

impl PromptTemplate {
    /// Parses prompt text; `source` names it in errors, and every placeholder in
    /// `required` must appear somewhere (a prompt that never shows the judge the
    /// response is a mistake, not a choice).
    pub fn parse(text: &str, source: &str, required: &[&str]) -> Result<Self> {
        let mut messages: Vec<(String, String)> = Vec::new();
        let mut preamble = true;
        let mut loose = String::new();
        for line in text.lines() {
            let trimmed = line.trim_end();
            let section = match trimmed {
                "[system]" => Some("system"),
                "[user]" => Some("user"),
                _ => None,
            };
            if let Some(role) = section {
                preamble = false;
                messages.push((role.to_string(), String::new()));
                continue;
            }
            if preamble
                && trimmed.starts_with('#')
                && messages.is_empty()
                && loose.trim().is_empty()
            {
                continue;
            }
            let buf = match messages.last_mut() {
                Some((_, buf)) => buf,
                None => &mut loose,
            };
            buf.push_str(line);
            buf.push('\n');
        }
        if !loose.trim().is_empty() {
            messages.insert(0, ("user".to_string(), loose));
        }
        for (_, text) in &mut messages {
            *text = text.trim().to_string();
        }
        messages.retain(|(_, text)| !text.is_empty());
        if messages.is_empty() {
            bail!("{source}: the prompt is empty");
        }
        if !messages.iter().any(|(role, _)| role == "user") {
            bail!("{source}: the prompt has no [user] section");
        }
        for name in required {
            let placeholder = format!("{{{name}}}");
            if !messages.iter().any(|(_, t)| t.contains(&placeholder)) {
                bail!("{source}: the prompt never uses {placeholder}");
            }
        }
        Ok(PromptTemplate { messages })
    }

    /// Reads and parses a prompt file.
    pub fn load(path: &Path, required: &[&str]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the prompt file", path.display()))?;
        Self::parse(&text, &path.display().to_string(), required)
    }

    /// The OpenAI-style messages with `vars` substituted.
    pub fn render(&self, vars: &[(&str, &str)]) -> Vec<Json> {
        self.messages
            .iter()
            .map(|(role, text)| json!({"role": role, "content": substitute(text, vars)}))
            .collect()
    }
}

/// Replaces `{name}` for each `(name, value)` in one left-to-right pass.
fn substitute(text: &str, vars: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let hit = vars.iter().find(|(name, _)| {
            after
                .strip_prefix(name)
                .is_some_and(|tail| tail.starts_with('}'))
        });
        match hit {
            Some((name, value)) => {
                out.push_str(value);
                rest = &after[name.len() + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Shortens `text` to at most `max_chars` characters by cutting out the middle
/// (the start of a reply and the end of a tool's output carry the most signal),
/// saying how much was cut. Keeps long tool outputs inside a small judge's context.
pub fn clip_middle(text: &str, max_chars: usize) -> String {
    let total = text.chars().count();
    if total <= max_chars {
        return text.to_string();
    }
    let keep = max_chars / 2;
    let head_end = text.char_indices().nth(keep).map_or(text.len(), |(i, _)| i);
    let tail_start = text
        .char_indices()
        .nth(total - keep)
        .map_or(text.len(), |(i, _)| i);
    format!(
        "{}\n[... {} characters cut ...]\n{}",
        &text[..head_end],
        total - 2 * keep,
        &text[tail_start..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_comments_and_placeholders() {
        let p = PromptTemplate::parse(
            "# a comment\n[system]\nsys {x}\n[user]\nsay {x} and {y} \\boxed{1} {unknown}\n",
            "t",
            &["x"],
        )
        .unwrap();
        let m = p.render(&[("x", "X{y}"), ("y", "Y")]);
        assert_eq!(m[0]["content"], "sys X{y}");
        // the value of x is not expanded again, unknown braces stay
        assert_eq!(m[1]["content"], "say X{y} and Y \\boxed{1} {unknown}");
    }

    #[test]
    fn a_file_without_sections_is_one_user_message() {
        let p = PromptTemplate::parse("Grade {response}.\n", "t", &["response"]).unwrap();
        let m = p.render(&[("response", "r")]);
        assert_eq!(m, vec![json!({"role": "user", "content": "Grade r."})]);
    }

    #[test]
    fn bad_prompts_are_rejected_with_the_file_name() {
        let e = PromptTemplate::parse("", "p.txt", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.txt") && e.contains("empty"), "{e}");
        let e = PromptTemplate::parse("[system]\nhi\n", "p.txt", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no [user]"), "{e}");
        let e = PromptTemplate::parse("[user]\nhi\n", "p.txt", &["response"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("{response}"), "{e}");
    }

    #[test]
    fn clipping_keeps_both_ends() {
        assert_eq!(clip_middle("short", 10), "short");
        let text: String = ('a'..='z').collect();
        let c = clip_middle(&text, 10);
        assert!(
            c.starts_with("abcde\n[... 16 characters cut ...]\nvwxyz"),
            "{c}"
        );
        // multi-byte characters are never split
        let c = clip_middle(&"é".repeat(30), 4);
        assert!(c.starts_with("éé\n") && c.ends_with("\néé"), "{c}");
    }
}
