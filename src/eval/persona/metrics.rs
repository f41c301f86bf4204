//! The persona benchmark's numbers.

use serde::{Deserialize, Serialize};

use super::plot::{Chart, Panel, Series, GREY, PALETTE};

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
    /// The final adapter's capability retention against the base model (trained
    /// runs, unless --no-retention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<crate::eval::retention::RetentionReport>,
    /// An LLM judge's verdicts on the held-out replies (--helpfulness-judge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helpful_before: Option<crate::eval::helpful::Helpfulness>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helpful_after: Option<crate::eval::helpful::Helpfulness>,
    /// The same judge on replies that answer nothing (its control).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helpful_empty: Option<crate::eval::helpful::Helpfulness>,
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

/// Sessions in the plot's sliding window.
pub const PLOT_WINDOW: usize = 8;

/// The learning curves of `results`: one panel per persona (in order of first
/// appearance), every method of that persona on it, the control (`off`) grey and
/// dashed. Labels name the method, and the seed where a persona ran with more
/// than one; a label keeps its colour across panels.
pub fn satisfaction_chart(results: &[RunResult]) -> Chart {
    let mut personas: Vec<&str> = Vec::new();
    for r in results {
        if !personas.contains(&r.persona.as_str()) {
            personas.push(&r.persona);
        }
    }
    let mut labels: Vec<String> = Vec::new();
    let panels = personas
        .iter()
        .map(|&p| {
            let runs: Vec<&RunResult> = results.iter().filter(|r| r.persona == p).collect();
            let seeds = runs.iter().any(|r| r.seed != runs[0].seed);
            let series = runs
                .iter()
                .map(|r| {
                    let control = r.method == "off";
                    let mut label = match control {
                        true => "off (control)".to_string(),
                        false => r.method.clone(),
                    };
                    if seeds {
                        label = format!("{label}, seed {}", r.seed);
                    }
                    let color = match control {
                        true => GREY,
                        false => {
                            let k = labels.iter().position(|l| *l == label).unwrap_or_else(|| {
                                labels.push(label.clone());
                                labels.len() - 1
                            });
                            PALETTE[k % PALETTE.len()]
                        }
                    };
                    let sat: Vec<bool> = r.sessions.iter().map(|s| s.satisfied).collect();
                    Series {
                        label,
                        color,
                        dashed: control,
                        points: r
                            .sessions
                            .iter()
                            .zip(rolling_rate(&sat, PLOT_WINDOW))
                            .map(|(s, y)| (s.index as f64, y))
                            .collect(),
                    }
                })
                .collect();
            let preference = super::persona(p).map(|q| q.preference);
            Panel {
                title: preference.map_or(p.to_string(), |q| format!("{p}: {q}")),
                series,
            }
        })
        .collect();
    Chart {
        title: format!(
            "Persona benchmark: satisfied sessions over a sliding window of {PLOT_WINDOW}"
        ),
        x_label: "session".into(),
        y_label: format!("satisfied (last {PLOT_WINDOW} sessions)"),
        // A little room past 0% and 100%: a control flat at 0% stays off the axis.
        y_range: (-0.03, 1.03),
        y_percent: true,
        panels,
    }
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
         refusal, sharing a content word with the task, stating something beyond questions \
         and pleasantries such as \"Sure, I'd be happy to!\") before its style counts: an empty \
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
             window of {PLOT_WINDOW} sessions: one panel per persona, every method on it \
             (the control, `off`, dashed).\n"
        ));
    }
    out.push_str(&helpfulness_section(results));
    out.push_str(&retention_section(results));
    out
}

/// The "Helpfulness" section: the judge's verdicts on the held-out replies.
pub fn helpfulness_section(results: &[RunResult]) -> String {
    let mut out = String::from("\n## Helpfulness\n\n");
    if results.iter().all(|r| r.helpful_after.is_none()) {
        out.push_str(
            "Not measured (`--helpfulness-judge MODEL.gguf|URL` has an LLM judge read each \
             held-out reply and say whether it answers the question).\n",
        );
        return out;
    }
    out.push_str(
        "An LLM judge read each held-out question and reply and said whether the reply \
         answers it with useful content (3 votes, majority; style and length do not \
         count), so a reply that keeps the preference but says nothing is a loss here. \
         The last column is the judge's control: each question with a reply that answers \
         nothing (\"Sure, I'd be happy to help!\" and the question asked back). A judge \
         that can tell calls none of those helpful; where it calls many helpful, its \
         other verdicts say little (a small model judging itself often cannot tell).\n\n\
         | persona | method | seed | judge | helpful before | helpful after | no verdict | control: empty replies judged helpful |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    let show = |h: &Option<crate::eval::helpful::Helpfulness>| match h {
        Some(h) => match h.rate() {
            Some(r) => format!("{:.0}% ({}/{})", 100.0 * r, h.helpful, h.judged),
            None => "no verdicts".into(),
        },
        None => "-".into(),
    };
    for r in results {
        let judge = r.helpful_after.as_ref().or(r.helpful_before.as_ref());
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.persona,
            r.method,
            r.seed,
            judge.map_or("-", |h| h.judge.as_str()),
            show(&r.helpful_before),
            show(&r.helpful_after),
            r.helpful_before.as_ref().map_or(0, |h| h.unjudged)
                + r.helpful_after.as_ref().map_or(0, |h| h.unjudged),
            show(&r.helpful_empty),
        ));
    }
    out
}

/// The "Retention" section: each trained run's final adapter against the base
/// model on gsm8k-mini, facts-mini and ppl-mini.
pub fn retention_section(results: &[RunResult]) -> String {
    let trained: Vec<(String, Option<&crate::eval::retention::RetentionReport>)> = results
        .iter()
        .filter(|r| r.method != "off")
        .map(|r| {
            (
                format!("{} | {}", r.persona, r.method),
                r.retention.as_ref(),
            )
        })
        .collect();
    retention_rows(&trained, "persona | method")
}

/// A "Retention" section for any learning benchmark: one entry per trained run,
/// its table cells (`label`, e.g. "brief | combined") and its report if measured;
/// `header` names the label's columns ("persona | method").
pub fn retention_rows(
    trained: &[(String, Option<&crate::eval::retention::RetentionReport>)],
    header: &str,
) -> String {
    if trained.is_empty() {
        return String::new();
    }
    let mut out = String::from("\n## Retention\n\n");
    let measured: Vec<(&str, &crate::eval::retention::RetentionReport)> = trained
        .iter()
        .filter_map(|(label, x)| x.map(|x| (label.as_str(), x)))
        .collect();
    let Some((_, first)) = measured.first() else {
        out.push_str(
            "Not measured (--no-retention, or no run left an adapter): see \
             `claw eval --bench retention --adapter FILE`.\n",
        );
        return out;
    };
    let columns = header.matches('|').count() + 1;
    out.push_str(&format!(
        "Does the learned adapter keep what the base model could do? Each trained run's \
         final adapter against the base ({}), greedy: gsm8k-mini accuracy ({} problems, at \
         most {} tokens), facts-mini accuracy ({} questions, at most {} tokens), and \
         perplexity of held-out text (ppl-mini). Ratio = adapted / base (perplexity: base / \
         adapted, as lower is better); kept when it is at least {}, else LOST.\n\n\
         | {header} | metric | base | adapted | ratio | verdict |\n|{}---|---|---|---|---|\n",
        first.base.model,
        first.gsm8k_items,
        first.gsm8k_max_tokens,
        first.facts_items,
        first.facts_max_tokens,
        first.keep,
        "---|".repeat(columns)
    ));
    for (label, x) in &measured {
        for line in x.markdown().lines().skip(2) {
            out.push_str(&format!("| {label} {line}\n"));
        }
    }
    out.push('\n');
    for (label, x) in trained {
        let line = x.map_or("not measured".to_string(), |x| x.overall());
        out.push_str(&format!("- {}: {line}\n", label.replace(" | ", " ")));
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

    fn run(persona: &str, method: &str, seed: u64, sat: &[bool]) -> RunResult {
        RunResult {
            persona: persona.into(),
            method: method.into(),
            seed,
            sessions: sat
                .iter()
                .enumerate()
                .map(|(i, &satisfied)| Session {
                    index: i + 1,
                    task: String::new(),
                    reply: String::new(),
                    satisfied,
                    no_answer: false,
                    turns: 1,
                    policy_version: 0,
                    seconds_since_start: 0.0,
                })
                .collect(),
            sessions_to_success: None,
            heldout_before: 0.0,
            heldout_after: 0.0,
            heldout_prompts: 0,
            helpful_before: None,
            helpful_after: None,
            helpful_empty: None,
            final_policy_version: 0,
            seconds: 0.0,
            settings: Default::default(),
            retention: None,
        }
    }

    #[test]
    fn the_report_has_a_retention_section_for_trained_runs() {
        use crate::eval::retention::{RetentionReport, Scores, Settings};
        let settings = Settings::builtin().unwrap().limit(4);
        let scores = |model: &str, g: f64, p: f64| Scores {
            model: model.into(),
            gsm8k: g,
            facts: 0.5,
            perplexity: p,
            ..Scores::default()
        };
        let mut trained = run("brief", "combined", 0, &[true, true]);
        trained.retention = Some(RetentionReport::from_scores(
            scores("base", 0.5, 10.0),
            scores("base+adapter-000004", 0.25, 10.2),
            &settings,
        ));
        let untrained = run("brief", "rl", 0, &[true]);
        let off = run("brief", "off", 0, &[true, true]);
        let md = report(
            &[trained.clone(), untrained, off.clone()],
            "claw eval",
            None,
        );
        let section = &md[md.find("## Retention").expect("a Retention section")..];
        assert!(section.contains("(base)"), "{section}");
        assert!(
            section
                .contains("| brief | combined | gsm8k accuracy | 50.0% | 25.0% | 0.500 | LOST |"),
            "{section}"
        );
        assert!(
            section.contains("| brief | combined | perplexity | 10.000 | 10.200 | 0.980 | kept |")
        );
        assert!(section.contains("- brief combined: LOST: "), "{section}");
        assert!(section.contains("- brief rl: not measured"), "{section}");
        assert!(!section.contains("brief off"), "{section}");
        // the JSON keeps it, and reads back
        let json = serde_json::to_string(&trained).unwrap();
        let back: RunResult = serde_json::from_str(&json).unwrap();
        assert_eq!(
            back.retention.unwrap().rows,
            trained.retention.unwrap().rows
        );
        // without any measurement, the section says so; with only the control, none
        let md = report(&[run("brief", "combined", 0, &[true])], "claw eval", None);
        assert!(md.contains("## Retention\n\nNot measured"), "{md}");
        assert!(!report(&[off], "claw eval", None).contains("## Retention"));
    }

    #[test]
    fn the_helpfulness_section_shows_the_judges_control_beside_its_verdicts() {
        use crate::eval::helpful::Helpfulness;
        let h = |helpful, judged, unjudged| Helpfulness {
            judge: "qwen".into(),
            helpful,
            judged,
            unjudged,
        };
        let mut judged = run("ask-back", "combined", 2, &[true]);
        judged.helpful_before = Some(h(17, 20, 0));
        judged.helpful_after = Some(h(15, 19, 1));
        judged.helpful_empty = Some(h(12, 20, 0));
        // a report from before the control was kept reads back without it
        let mut older = run("brief", "combined", 1, &[true]);
        older.helpful_before = Some(h(4, 4, 0));
        older.helpful_after = Some(h(3, 4, 0));
        let section = helpfulness_section(&[judged.clone(), older]);
        assert!(
            section.contains(
                "| ask-back | combined | 2 | qwen | 85% (17/20) | 79% (15/19) | 1 | 60% (12/20) |"
            ),
            "{section}"
        );
        assert!(
            section.contains("| brief | combined | 1 | qwen | 100% (4/4) | 75% (3/4) | 0 | - |"),
            "{section}"
        );
        let back: RunResult =
            serde_json::from_str(&serde_json::to_string(&judged).unwrap()).unwrap();
        assert_eq!(back.helpful_empty, judged.helpful_empty);
        assert!(helpfulness_section(&[run("brief", "off", 0, &[true])]).contains("Not measured"));
    }

    #[test]
    fn the_chart_has_a_panel_per_persona_with_the_control_on_it() {
        let results = [
            run("brief", "combined", 1, &[false, true, true]),
            run("one-paragraph", "combined", 1, &[true, true]),
            run("brief", "off", 1, &[false, false, false]),
            run("one-paragraph", "off", 1, &[false, true]),
            run("one-paragraph", "combined", 0, &[true, false]),
        ];
        let chart = satisfaction_chart(&results);
        let titles: Vec<&str> = chart.panels.iter().map(|p| p.title.as_str()).collect();
        assert_eq!(
            titles,
            [
                "brief: answers under 40 words",
                "one-paragraph: one paragraph: no line breaks"
            ]
        );
        let brief = &chart.panels[0].series;
        let labels: Vec<&str> = brief.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels, ["combined", "off (control)"]);
        assert_eq!(brief[0].points, [(1.0, 0.0), (2.0, 0.5), (3.0, 2.0 / 3.0)]);
        assert!(brief[1].dashed && brief[1].color == GREY && !brief[0].dashed);
        // Two seeds on one panel: the labels say which.
        let para = &chart.panels[1].series;
        let labels: Vec<&str> = para.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "combined, seed 1",
                "off (control), seed 1",
                "combined, seed 0"
            ]
        );
        assert_ne!(para[0].color, para[2].color);
    }

    #[test]
    fn rolling_rate_uses_the_shorter_window_at_the_start() {
        let sat = [true, false, true, true];
        assert_eq!(rolling_rate(&sat, 2), vec![1.0, 0.5, 0.5, 1.0]);
        assert_eq!(rate(&sat), 0.75);
    }
}
