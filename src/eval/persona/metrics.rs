//! The persona benchmark's numbers.

use serde::{Deserialize, Serialize};

/// One training session: the task, the reply, and what the user thought.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Session {
    /// 1-based.
    pub index: usize,
    pub task: String,
    pub reply: String,
    pub satisfied: bool,
    /// The reply did not answer the task at all (empty, refusal, off topic).
    #[serde(default)]
    pub no_answer: bool,
    /// Replies in the session: 1 when the first one satisfied, more when the
    /// user asked again after a correction.
    #[serde(default = "one")]
    pub turns: usize,
    /// The policy version (training step) that answered.
    pub policy_version: u64,
    pub seconds_since_start: f64,
}

fn one() -> usize {
    1
}

/// One (persona, method) run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunResult {
    pub persona: String,
    pub method: String,
    pub seed: u64,
    pub sessions: Vec<Session>,
    /// Session at which the preference was first met 3 times in a row (the
    /// OpenClaw-RL measure), if it was.
    pub sessions_to_success: Option<usize>,
    pub heldout_before: f64,
    pub heldout_after: f64,
    pub heldout_prompts: usize,
    /// The last policy version served.
    pub final_policy_version: u64,
    pub seconds: f64,
    /// The settings the run trained with (defaults change between versions; a
    /// report must say what produced it). Empty in reports from before they were kept.
    #[serde(default)]
    pub settings: std::collections::BTreeMap<String, serde_json::Value>,
}

/// The first session `k` such that sessions k-2, k-1 and k were all satisfied.
pub fn sessions_to_success(satisfied: &[bool]) -> Option<usize> {
    let mut run = 0;
    for (i, &ok) in satisfied.iter().enumerate() {
        run = if ok { run + 1 } else { 0 };
        if run == 3 {
            return Some(i + 1);
        }
    }
    None
}

/// Satisfaction rate over a sliding window of `window` sessions, one value per
/// session (the window is shorter at the start).
pub fn rolling_rate(satisfied: &[bool], window: usize) -> Vec<f64> {
    let window = window.max(1);
    (0..satisfied.len())
        .map(|i| {
            let from = (i + 1).saturating_sub(window);
            let slice = &satisfied[from..=i];
            slice.iter().filter(|&&s| s).count() as f64 / slice.len() as f64
        })
        .collect()
}

/// Share of satisfied sessions in `[from, to)` (by position).
pub fn rate(satisfied: &[bool]) -> f64 {
    match satisfied.len() {
        0 => 0.0,
        n => satisfied.iter().filter(|&&s| s).count() as f64 / n as f64,
    }
}

/// The Markdown report of several runs.
pub fn report(results: &[RunResult], command: &str, plot: Option<&str>) -> String {
    let mut out = String::from("# Persona benchmark\n\n");
    out.push_str(
        "Does the loop learn what its user wants, only from talking to it? Each run starts \
         a fresh `claw up` (serve + collect + judge + distill-hints + train, per the method) \
         and a simulated user with one preference a rule can check; the user gives a thumbs \
         up when a reply keeps it, and a thumbs down with a natural correction when it does \
         not (docs/ARCHITECTURE.md, \"Persona benchmark\"). A reply must answer the task \
         (at least 5 words, no \
         refusal, sharing a content word with the task) before its style counts: an empty \
         reply keeps \"be brief\" but satisfies nobody, and a policy rewarded on the rule \
         alone learns to say nothing. Methods: `rl` (binary reward from the thumbs), `opd` \
         (the correction as a hindsight hint, on-policy distillation), `combined` (both), \
         `off` (no training: the control). Within a session the user says what is wrong \
         with a disappointing reply (the correction is the next message) and the model \
         tries again, up to a few turns; the session counts as satisfied when its first \
         reply is (OpenClaw-RL's measure).\n\n",
    );
    out.push_str(&format!("Command:\n\n```\n{command}\n```\n\n"));
    out.push_str(
        "| persona | method | seed | sessions | replies | sessions to 3-in-a-row | first half | second half | no answer (2nd half) | held-out before | held-out after | steps | minutes |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        let sat: Vec<bool> = r.sessions.iter().map(|s| s.satisfied).collect();
        let half = sat.len() / 2;
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {:.0}% | {:.0}% | {} | {:.0}% | {:.0}% | {} | {:.1} |\n",
            r.persona,
            r.method,
            r.seed,
            sat.len(),
            r.sessions.iter().map(|s| s.turns).sum::<usize>(),
            r.sessions_to_success
                .map_or("not reached".into(), |k| k.to_string()),
            100.0 * rate(&sat[..half]),
            100.0 * rate(&sat[half..]),
            r.sessions[half..].iter().filter(|s| s.no_answer).count(),
            100.0 * r.heldout_before,
            100.0 * r.heldout_after,
            r.final_policy_version,
            r.seconds / 60.0
        ));
    }
    let mut seen: Vec<String> = Vec::new();
    for r in results.iter().filter(|r| !r.settings.is_empty()) {
        let line = r
            .settings
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        if !seen.contains(&line) {
            seen.push(line);
        }
    }
    if !seen.is_empty() {
        out.push_str(&format!("\nSettings: {}.\n", seen.join("; ")));
    }
    out.push_str(&format!(
        "\nHeld-out: {} prompts never used in training, answered greedily as side turns \
         (recorded by serve but never trained on), at the start and at the end of the run.\n",
        results.first().map_or(0, |r| r.heldout_prompts)
    ));
    if let Some(plot) = plot {
        out.push_str(&format!(
            "\n![satisfaction over sessions]({plot})\n\nSatisfaction rate over a sliding \
             window of 8 sessions, per persona and method.\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_in_a_row_is_found_at_its_third_session() {
        let s = |v: &[u8]| v.iter().map(|&x| x == 1).collect::<Vec<_>>();
        assert_eq!(sessions_to_success(&s(&[1, 1, 1])), Some(3));
        assert_eq!(sessions_to_success(&s(&[1, 1, 0, 1, 1, 1, 1])), Some(6));
        assert_eq!(sessions_to_success(&s(&[0, 1, 1, 0, 1, 1])), None);
        assert_eq!(sessions_to_success(&[]), None);
    }

    #[test]
    fn rolling_rate_uses_the_shorter_window_at_the_start() {
        let sat = [true, false, true, true];
        assert_eq!(rolling_rate(&sat, 2), vec![1.0, 0.5, 0.5, 1.0]);
        assert_eq!(rate(&sat), 0.75);
    }
}
