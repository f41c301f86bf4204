//! Reading a judge's reply and combining votes (docs/ARCHITECTURE.md, "Judging").
//!
//! A reply's vote is its **last** `\boxed{...}` whose content is `1`, `+1`, `-1` or
//! `0` (spaces around the number allowed). A reply whose last box holds anything
//! else (`\boxed{2}`, `\boxed{yes}`), or that has no box at all, is an invalid
//! vote. Votes are combined by strict majority: the value that occurs most often
//! wins, a tie between the top values gives 0, and no valid vote gives 0.

use crate::llm::boxed::{last_boxed, parse_score};

/// The vote in a judge reply: the last `\boxed{}` read as -1, 0 or +1, or `None`
/// (an invalid vote) when there is no box or the last box holds something else.
pub fn parse_vote(text: &str) -> Option<i8> {
    parse_score(last_boxed(text)?, &[-1, 0, 1])
}

/// The majority of the valid votes: the most frequent value, 0 on a tie between
/// the most frequent values, 0 with no valid vote.
pub fn majority(votes: &[i8]) -> i8 {
    let count = |v: i8| votes.iter().filter(|&&x| x == v).count();
    let tally = [(-1i8, count(-1)), (0, count(0)), (1, count(1))];
    let top = tally.iter().map(|&(_, n)| n).max().unwrap_or(0);
    if top == 0 {
        return 0;
    }
    let mut winners = tally.iter().filter(|&&(_, n)| n == top);
    match (winners.next(), winners.next()) {
        (Some(&(v, _)), None) => v,
        _ => 0,
    }
}

/// The outcome of `m` votes on one turn.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// The majority of the valid votes (see [`majority`]).
    pub reward: i8,
    /// The valid votes in call order; invalid ones are left out.
    pub votes: Vec<i8>,
    /// Calls that gave no valid vote: no box, a box with another value, a
    /// timeout, an HTTP or model error.
    pub invalid: usize,
    /// The text of the first reply whose vote equals the reward, if any.
    pub raw: Option<String>,
}

/// Combines the replies to one turn's `m` judge calls; `Err` is a failed call
/// (its message is only logged).
pub fn tally<E>(replies: &[Result<String, E>]) -> Verdict {
    let mut votes = Vec::new();
    let mut parsed = Vec::new();
    for reply in replies {
        let vote = reply.as_ref().ok().and_then(|t| parse_vote(t));
        if let Some(v) = vote {
            votes.push(v);
        }
        parsed.push(vote);
    }
    let reward = majority(&votes);
    let raw = replies
        .iter()
        .zip(&parsed)
        .find(|(_, v)| **v == Some(reward))
        .and_then(|(r, _)| r.as_ref().ok().cloned());
    Verdict {
        reward,
        invalid: replies.len() - votes.len(),
        votes,
        raw,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_boxes() {
        assert_eq!(parse_vote("so \\boxed{1}"), Some(1));
        assert_eq!(parse_vote("\\boxed{-1}"), Some(-1));
        assert_eq!(parse_vote("\\boxed{0}."), Some(0));
        assert_eq!(parse_vote("\\boxed{+1}"), Some(1));
        assert_eq!(parse_vote("\\boxed{ -1 }"), Some(-1));
    }

    #[test]
    fn the_last_box_counts() {
        assert_eq!(
            parse_vote("Maybe \\boxed{1}? No: the user asks to redo it. \\boxed{-1}"),
            Some(-1)
        );
        assert_eq!(parse_vote("\\boxed{-1} ... final: \\boxed{0}"), Some(0));
        // the last box is invalid, so the vote is invalid even though an earlier one is fine
        assert_eq!(parse_vote("\\boxed{1} then \\boxed{2}"), None);
        assert_eq!(parse_vote("\\boxed{1} then \\boxed{yes}"), None);
    }

    #[test]
    fn invalid_replies() {
        assert_eq!(parse_vote(""), None);
        assert_eq!(parse_vote("I think it is good: 1"), None);
        assert_eq!(parse_vote("\\boxed{}"), None);
        assert_eq!(parse_vote("\\boxed{2}"), None);
        assert_eq!(parse_vote("\\boxed{1.0}"), None);
        assert_eq!(parse_vote("\\boxed{+-1}"), None);
        assert_eq!(parse_vote("\\boxed{--1}"), None);
        assert_eq!(parse_vote("\\boxed{1"), None, "unclosed box (cut off)");
        assert_eq!(parse_vote("boxed{1}"), None, "no backslash");
        assert_eq!(parse_vote("\\boxed{\\text{1}}"), None);
        // an unclosed last box hides an earlier closed one: the reply was cut off
        assert_eq!(parse_vote("\\boxed{1} and finally \\boxed{-"), None);
    }

    #[test]
    fn majority_rules() {
        assert_eq!(majority(&[1, 1, -1]), 1);
        assert_eq!(majority(&[-1, -1, 1]), -1);
        assert_eq!(majority(&[0, 0, 1]), 0);
        assert_eq!(majority(&[1, 1, 1]), 1);
        assert_eq!(majority(&[1]), 1);
        // ties give 0
        assert_eq!(majority(&[1, -1]), 0);
        assert_eq!(majority(&[1, -1, 0]), 0);
        assert_eq!(majority(&[1, 1, -1, -1]), 0);
        assert_eq!(majority(&[1, 1, -1, -1, 0]), 0);
        // a plurality (not a strict half) is enough
        assert_eq!(majority(&[1, 1, -1, 0]), 1);
        // no valid vote gives 0
        assert_eq!(majority(&[]), 0);
    }

    #[test]
    fn tally_counts_invalid_and_keeps_an_agreeing_reply() {
        let replies: Vec<Result<String, String>> = vec![
            Ok("bad \\boxed{-1}".into()),
            Err("timed out".into()),
            Ok("good \\boxed{1}".into()),
            Ok("no box".into()),
            Ok("good again \\boxed{+1}".into()),
        ];
        let v = tally(&replies);
        assert_eq!(v.reward, 1);
        assert_eq!(v.votes, vec![-1, 1, 1]);
        assert_eq!(v.invalid, 2);
        assert_eq!(v.raw.as_deref(), Some("good \\boxed{1}"));
    }

    #[test]
    fn tally_of_a_tie_or_nothing() {
        let tie: Vec<Result<String, ()>> = vec![Ok("\\boxed{1}".into()), Ok("\\boxed{-1}".into())];
        let v = tally(&tie);
        assert_eq!((v.reward, v.invalid, v.raw), (0, 0, None));
        assert_eq!(v.votes, vec![1, -1]);

        let none: Vec<Result<String, ()>> = vec![Err(()), Ok("garbage".into()), Err(())];
        let v = tally(&none);
        assert_eq!((v.reward, v.invalid, v.raw), (0, 3, None));
        assert!(v.votes.is_empty());

        // a 0 reward with a 0 vote keeps that reply
        let zero: Vec<Result<String, ()>> = vec![
            Ok("\\boxed{0}".into()),
            Ok("\\boxed{0}".into()),
            Ok("\\boxed{1}".into()),
        ];
        assert_eq!(tally(&zero).raw.as_deref(), Some("\\boxed{0}"));
    }
}
