//! The counts of a collect run, and their one-paragraph summary.

use std::sync::Arc;

use serde::Serialize;

use super::pair::{PairStats, Sample};

/// Counts of one run, printed on stderr and by `--json`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    /// Inputs read in this run.
    pub inputs: u64,
    /// Inputs skipped because the state file lists them as collected.
    pub inputs_already_collected: u64,
    /// Inputs that could not be read (skipped, reported on stderr).
    pub inputs_unreadable: u64,
    /// Rows read from raw segments.
    pub raw_rows: u64,
    /// Non-empty lines read from JSONL imports.
    pub imported_lines: u64,
    /// Distinct sessions among the samples written.
    pub sessions: u64,
    /// Samples written (one per main turn).
    pub turns: u64,
    /// Turns with a next state (any role).
    pub with_next_state: u64,
    /// The same by `next_state_role` (`feedback`: no next request, feedback text).
    pub next_state_roles: std::collections::BTreeMap<String, u64>,
    pub with_feedback: u64,
    /// Turns carried in from the state file.
    pub carried_in: u64,
    /// Turns left open in the state file for the next run.
    pub carried_out: u64,
    pub open_sessions: u64,
    pub feedback_events: u64,
    pub feedback_attached: u64,
    pub dropped: Dropped,
    /// Main requests whose `messages_json` was not a JSON list (no next state from them).
    pub unreadable_messages: u64,
    pub seconds: f64,
    /// Input rows (raw rows + imported lines) per second.
    pub rows_per_s: f64,
}

/// Why events did not become samples (or did not reach one).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Dropped {
    pub side_turn: u64,
    pub no_response: u64,
    pub unknown_turn_type: u64,
    pub feedback_unmatched: u64,
    pub malformed_line: u64,
}

impl Stats {
    /// The one-paragraph summary for stderr.
    pub fn summary(&self) -> String {
        let mut read = Vec::new();
        if self.raw_rows > 0 || self.imported_lines == 0 {
            read.push(format!("{} raw rows", self.raw_rows));
        }
        if self.imported_lines > 0 {
            read.push(format!("{} imported lines", self.imported_lines));
        }
        let roles: Vec<String> = self
            .next_state_roles
            .iter()
            .map(|(role, n)| format!("{n} {role}"))
            .collect();
        let mut s = format!(
            "collect: {} from {} input(s) -> {} turns in {} sessions ({} with next state{}, {} with feedback)",
            read.join(" + "),
            self.inputs,
            self.turns,
            self.sessions,
            self.with_next_state,
            if roles.is_empty() {
                String::new()
            } else {
                format!(": {}", roles.join(", "))
            },
            self.with_feedback
        );
        let d = &self.dropped;
        let dropped: Vec<String> = [
            (d.side_turn, "side turns"),
            (d.no_response, "turns without a response"),
            (d.unknown_turn_type, "rows of unknown turn_type"),
            (
                d.feedback_unmatched,
                "feedback events whose turn was final, a side turn or unknown",
            ),
            (d.malformed_line, "malformed lines"),
        ]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
        if !dropped.is_empty() {
            s.push_str(&format!("; dropped {}", dropped.join(", ")));
        }
        if self.carried_in > 0 {
            s.push_str(&format!("; {} turns carried in", self.carried_in));
        }
        if self.carried_out > 0 || self.open_sessions > 0 {
            s.push_str(&format!(
                "; {} turns in {} open sessions carried to the next run",
                self.carried_out, self.open_sessions
            ));
        }
        if self.inputs_already_collected > 0 {
            s.push_str(&format!(
                "; {} inputs skipped (already collected)",
                self.inputs_already_collected
            ));
        }
        s.push_str(&format!(
            " [{:.2} s, {:.0} rows/s]",
            self.seconds, self.rows_per_s
        ));
        s
    }
}

impl Stats {
    /// Counts the samples written and what the pairing dropped.
    pub(super) fn count_samples(&mut self, out: &[Sample], pstats: &PairStats) {
        self.turns = out.len() as u64;
        self.sessions = {
            let mut n = 0;
            let mut last: Option<&Arc<str>> = None;
            for s in out {
                if last != Some(&s.session) {
                    n += 1;
                    last = Some(&s.session);
                }
            }
            n
        };
        for n in out.iter().filter_map(|s| s.next_state.as_ref()) {
            self.with_next_state += 1;
            *self.next_state_roles.entry(n.role.clone()).or_default() += 1;
        }
        self.with_feedback = out
            .iter()
            .filter(|s| s.feedback.is_some() || s.feedback_text.is_some())
            .count() as u64;
        self.feedback_events = pstats.feedback_events;
        self.feedback_attached = pstats.feedback_attached;
        self.dropped.side_turn = pstats.side_turns;
        self.dropped.no_response += pstats.no_response;
        self.dropped.unknown_turn_type = pstats.unknown_turn_type;
        self.dropped.feedback_unmatched = pstats.feedback_unmatched;
    }
}
