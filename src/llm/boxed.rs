//! Answers in a `\boxed{...}`, as the judge prompts ask for them (the PRM's vote,
//! the hint judge's score): the last box of a reply, and its content read as one
//! of a few allowed scores.

/// The content of the last `\boxed{...}` in `text`, if any. Nested braces inside
/// the box are matched, so `\boxed{\text{1}}` yields `\text{1}`.
pub fn last_boxed(text: &str) -> Option<&str> {
    const OPEN: &str = "\\boxed{";
    let start = text.rfind(OPEN)? + OPEN.len();
    let mut depth = 1usize;
    for (i, c) in text[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&text[start..start + i]);
                }
            }
            _ => {}
        }
    }
    None // an unclosed box (the reply was cut off) is no box
}

/// Reads a box's content as one of `allowed` (`+1` and `1` are the same). Shared
/// with judges whose boxes allow fewer values (the hint judge accepts only ±1).
pub fn parse_score(content: &str, allowed: &[i8]) -> Option<i8> {
    // `i8::from_str` takes an optional sign (`+1`, `-1`) but not `+-1` or spaces.
    let value: i8 = content.trim().parse().ok()?;
    allowed.contains(&value).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_boxed_matches_nested_braces() {
        assert_eq!(
            last_boxed("a \\boxed{\\frac{1}{2}} b"),
            Some("\\frac{1}{2}")
        );
        assert_eq!(last_boxed("\\boxed{x}\\boxed{y}"), Some("y"));
        assert_eq!(last_boxed("nothing"), None);
    }

    #[test]
    fn score_with_restricted_values() {
        assert_eq!(parse_score("1", &[-1, 1]), Some(1));
        assert_eq!(parse_score("0", &[-1, 1]), None);
        assert_eq!(parse_score(" +1 ", &[-1, 1]), Some(1));
    }
}
