//! Capability retention: does a learned adapter keep what the base model could
//! do? [`compare`] scores the base model and the base with the adapter on the
//! same three checks and puts them side by side:
//!
//! - gsm8k-mini accuracy (maths, [`super::gsm8k`]),
//! - facts-mini accuracy (factual QA, [`super::facts`]),
//! - perplexity of held-out text (ppl-mini, [`super::ppl`]).
//!
//! Each metric gets a ratio oriented so that higher is better (adapted / base
//! for the accuracies, base / adapted for perplexity, which is lower when
//! better) and a verdict: kept when the ratio is at least [`KEEP`] (the adapter
//! keeps 95% of the base score), else LOST. Decoding is greedy, so a run is
//! reproducible, and an adapter equal to the base (B = 0) keeps everything
//! with ratio 1.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::{facts, gsm8k, ppl, Outcome};
use crate::llm::{CallOptions, LocalBackend, VoteRunner};
use crate::model::{resolve_model_path, Model};

/// The share of the base score an adapter must keep.
pub const KEEP: f64 = 0.95;

/// What to measure, and how.
#[derive(Clone, Debug)]
pub struct Settings {
    pub gsm8k: Vec<gsm8k::Problem>,
    pub facts: Vec<facts::Question>,
    /// Held-out text for perplexity.
    pub text: String,
    /// Names of the three data sets, for the report.
    pub gsm8k_data: String,
    pub facts_data: String,
    pub text_data: String,
    /// Tokens per perplexity window (default: the context length less one, at
    /// most 2048).
    pub window: Option<usize>,
    /// Most tokens per reply.
    pub gsm8k_max_tokens: usize,
    pub facts_max_tokens: usize,
    pub seed: u64,
    /// Seconds one reply may take.
    pub timeout: f64,
    /// The verdict's threshold ([`KEEP`]).
    pub keep: f64,
}

impl Settings {
    /// The built-in sets (fixtures/eval: gsm8k-mini, facts-mini, ppl-mini), with
    /// replies bounded so SmolLM2 on two cores takes a few minutes per model.
    pub fn builtin() -> Result<Self> {
        Ok(Settings {
            gsm8k: gsm8k::builtin()?,
            facts: facts::builtin()?,
            text: ppl::BUILTIN.to_string(),
            gsm8k_data: "gsm8k-mini".into(),
            facts_data: "facts-mini".into(),
            text_data: "ppl-mini".into(),
            window: None,
            gsm8k_max_tokens: 256,
            facts_max_tokens: 32,
            seed: 0,
            timeout: 600.0,
            keep: KEEP,
        })
    }

    /// Only the first `n` gsm8k problems and facts questions (a quick run).
    pub fn limit(mut self, n: usize) -> Self {
        self.gsm8k.truncate(n.max(1));
        self.facts.truncate(n.max(1));
        self
    }
}

/// One model's scores: its name, then per metric the value and its 95% interval.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Scores {
    pub model: String,
    pub gsm8k: f64,
    pub gsm8k_ci95: Option<(f64, f64)>,
    pub facts: f64,
    pub facts_ci95: Option<(f64, f64)>,
    pub perplexity: f64,
    pub seconds: f64,
    /// Every graded item (gsm8k, facts, ppl), for --out; not in reports.
    #[serde(skip)]
    pub outcomes: Vec<Outcome>,
}

/// Scores `model` (whatever decoder it carries: the base, or with an adapter on)
/// on the three checks; `progress(what)` before each.
pub fn measure(model: Model, settings: &Settings, progress: &dyn Fn(&str)) -> Result<Scores> {
    let started = std::time::Instant::now();
    let name = model.name.clone();
    progress(&format!("{name}: perplexity of {}", settings.text_data));
    let window = settings
        .window
        .unwrap_or_else(|| (model.config.context_length - 1).min(2048));
    let ppl = ppl::run(
        &model,
        &model.decoder,
        &settings.text,
        window,
        &settings.text_data,
        &|_, _| {},
    )
    .with_context(|| format!("{name}: perplexity"))?;
    let mut runner = VoteRunner::new(
        Box::new(LocalBackend::new(model)),
        CallOptions {
            votes: 1,
            temperature: 0.0,
            max_tokens: settings.gsm8k_max_tokens,
            timeout: std::time::Duration::from_secs_f64(settings.timeout),
            retries: 0,
            backoff: std::time::Duration::from_millis(500),
            concurrency: 1,
            seed: settings.seed,
            stop: Vec::new(),
            role: "model",
        },
    )?;
    progress(&format!("{name}: {} gsm8k problems", settings.gsm8k.len()));
    let maths = gsm8k::run(&runner, &settings.gsm8k, &settings.gsm8k_data, &|| {})
        .with_context(|| format!("{name}: gsm8k"))?;
    runner.set_max_tokens(settings.facts_max_tokens)?;
    progress(&format!("{name}: {} facts questions", settings.facts.len()));
    let qa = facts::run(&runner, &settings.facts, &settings.facts_data, &|| {})
        .with_context(|| format!("{name}: facts"))?;
    let ci = |o: &Outcome| o.report.metrics.first().and_then(|m| m.ci95);
    Ok(Scores {
        model: name,
        gsm8k: maths.report.score,
        gsm8k_ci95: ci(&maths),
        facts: qa.report.score,
        facts_ci95: ci(&qa),
        perplexity: ppl.report.score,
        seconds: started.elapsed().as_secs_f64(),
        outcomes: vec![maths, qa, ppl],
    })
}

/// One metric, base and adapted side by side.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// `gsm8k accuracy`, `facts accuracy`, `perplexity`.
    pub metric: String,
    pub base: f64,
    pub adapted: f64,
    pub higher_is_better: bool,
    /// Oriented so that higher is better: adapted / base, or for a metric where
    /// lower is better base / adapted. None when the base scores 0 and the
    /// adapter more (nothing to keep).
    pub ratio: Option<f64>,
    /// The ratio is at least the threshold (or there was nothing to lose).
    pub kept: bool,
}

impl Row {
    pub fn new(metric: &str, base: f64, adapted: f64, higher_is_better: bool, keep: f64) -> Row {
        let (num, den) = match higher_is_better {
            true => (adapted, base),
            false => (base, adapted),
        };
        let ratio = if den > 0.0 {
            Some(num / den)
        } else if num == den {
            Some(1.0)
        } else {
            None
        };
        // 19/20 of a base is 0.95 whatever the rounding.
        let kept = ratio.is_none_or(|r| r >= keep - 1e-9);
        Row {
            metric: metric.into(),
            base,
            adapted,
            higher_is_better,
            ratio,
            kept,
        }
    }

    pub fn verdict(&self) -> &'static str {
        if self.kept {
            "kept"
        } else {
            "LOST"
        }
    }
}

/// The adapter's scores next to the base model's.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RetentionReport {
    pub base: Scores,
    pub adapted: Scores,
    /// The adapter file, when there is one.
    #[serde(default)]
    pub adapter: Option<String>,
    pub keep: f64,
    pub rows: Vec<Row>,
    /// Every metric kept.
    pub kept: bool,
    /// gsm8k problems, facts questions, and the settings that bound the run.
    pub gsm8k_items: usize,
    pub facts_items: usize,
    pub gsm8k_max_tokens: usize,
    pub facts_max_tokens: usize,
}

impl RetentionReport {
    /// The side-by-side rows of two models' scores.
    pub fn from_scores(base: Scores, adapted: Scores, settings: &Settings) -> Self {
        let keep = settings.keep;
        let rows = vec![
            Row::new("gsm8k accuracy", base.gsm8k, adapted.gsm8k, true, keep),
            Row::new("facts accuracy", base.facts, adapted.facts, true, keep),
            Row::new(
                "perplexity",
                base.perplexity,
                adapted.perplexity,
                false,
                keep,
            ),
        ];
        RetentionReport {
            kept: rows.iter().all(|r| r.kept),
            rows,
            base,
            adapted,
            adapter: None,
            keep,
            gsm8k_items: settings.gsm8k.len(),
            facts_items: settings.facts.len(),
            gsm8k_max_tokens: settings.gsm8k_max_tokens,
            facts_max_tokens: settings.facts_max_tokens,
        }
    }

    /// The overall line: what was kept and what was lost.
    pub fn overall(&self) -> String {
        let lost: Vec<&str> = self
            .rows
            .iter()
            .filter(|r| !r.kept)
            .map(|r| r.metric.as_str())
            .collect();
        if lost.is_empty() {
            format!(
                "kept: the adapter keeps at least {:.0}% of the base model on every metric",
                100.0 * self.keep
            )
        } else {
            format!(
                "LOST: the adapter keeps less than {:.0}% of the base model on {}",
                100.0 * self.keep,
                lost.join(", ")
            )
        }
    }

    /// A markdown table: metric, base, adapted, ratio, verdict.
    pub fn markdown(&self) -> String {
        let mut s =
            String::from("| metric | base | adapted | ratio | verdict |\n|---|---|---|---|---|\n");
        for r in &self.rows {
            let (base, adapted) = match r.higher_is_better {
                true => (pct(r.base), pct(r.adapted)),
                false => (format!("{:.3}", r.base), format!("{:.3}", r.adapted)),
            };
            let ratio = r.ratio.map_or("n/a (base 0)".into(), |x| format!("{x:.3}"));
            s.push_str(&format!(
                "| {} | {base} | {adapted} | {ratio} | {} |\n",
                r.metric,
                r.verdict()
            ));
        }
        s
    }

    /// The table with what it measured and the overall line, for a terminal.
    pub fn text(&self) -> String {
        format!(
            "retention  base {}  adapted {}\n\
             gsm8k-mini {} problems (max {} tokens), facts-mini {} questions (max {} tokens), \
             greedy; ratio = adapted/base (perplexity: base/adapted, lower is better), \
             kept when >= {}\n\n{}\n{}\n",
            self.base.model,
            self.adapted.model,
            self.gsm8k_items,
            self.gsm8k_max_tokens,
            self.facts_items,
            self.facts_max_tokens,
            self.keep,
            self.markdown(),
            self.overall()
        )
    }
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// Scores `base` and `adapted` (the same model with an adapter on) and compares
/// them; `progress(what)` before each step.
pub fn compare(
    base: Model,
    adapted: Model,
    settings: &Settings,
    progress: &dyn Fn(&str),
) -> Result<RetentionReport> {
    let base = measure(base, settings, progress)?;
    let adapted = measure(adapted, settings, progress)?;
    Ok(RetentionReport::from_scores(base, adapted, settings))
}

/// The retention check of a study that trains several adapters on one base
/// model (the persona benchmark): the base is scored once, on first use.
#[derive(Clone, Debug)]
pub struct Check {
    pub settings: Settings,
    base: std::sync::Arc<std::sync::Mutex<Option<Scores>>>,
}

impl Check {
    pub fn new(settings: Settings) -> Self {
        Check {
            settings,
            base: Default::default(),
        }
    }

    /// Compares the model at `model` (None: the default model) with `adapter` on
    /// against the base.
    pub fn adapter(
        &self,
        model: Option<&Path>,
        adapter: &Path,
        progress: &dyn Fn(&str),
    ) -> Result<RetentionReport> {
        let path = resolve_model_path(model)?;
        let load =
            || Model::load(&path).with_context(|| format!("loading the model {}", path.display()));
        let base = {
            let mut cached = self.base.lock().unwrap_or_else(|e| e.into_inner());
            match &*cached {
                Some(scores) => scores.clone(),
                None => {
                    let scores = measure(load()?, &self.settings, progress)?;
                    *cached = Some(scores.clone());
                    scores
                }
            }
        };
        let mut adapted = load()?;
        crate::adapter::apply_file(&mut adapted, adapter)?;
        let adapted = measure(adapted, &self.settings, progress)?;
        let mut report = RetentionReport::from_scores(base, adapted, &self.settings);
        report.adapter = Some(adapter.display().to_string());
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_are_oriented_so_higher_is_better() {
        let r = Row::new("acc", 0.40, 0.38, true, KEEP);
        assert!((r.ratio.unwrap() - 0.95).abs() < 1e-12);
        assert!(r.kept, "exactly 95% is kept");
        let r = Row::new("acc", 0.40, 0.37, true, KEEP);
        assert!(!r.kept && r.verdict() == "LOST");
        let r = Row::new("acc", 0.40, 0.60, true, KEEP);
        assert!((r.ratio.unwrap() - 1.5).abs() < 1e-12);
        assert!(r.kept);
        // perplexity: lower is better, the ratio is base / adapted
        let r = Row::new("ppl", 10.0, 10.5, false, KEEP);
        assert!((r.ratio.unwrap() - 10.0 / 10.5).abs() < 1e-12);
        assert!(r.kept);
        let r = Row::new("ppl", 10.0, 11.0, false, KEEP);
        assert!(!r.kept);
        let r = Row::new("ppl", 10.0, 9.0, false, KEEP);
        assert!(r.kept && r.ratio.unwrap() > 1.0);
    }

    #[test]
    fn a_base_of_zero_has_nothing_to_lose() {
        let r = Row::new("acc", 0.0, 0.0, true, KEEP);
        assert_eq!(r.ratio, Some(1.0));
        assert!(r.kept);
        let r = Row::new("acc", 0.0, 0.2, true, KEEP);
        assert_eq!(r.ratio, None);
        assert!(r.kept);
        assert!(RetentionReport::default()
            .markdown()
            .starts_with("| metric"));
    }

    #[test]
    fn the_overall_line_names_what_was_lost() {
        let settings = Settings::builtin().unwrap().limit(3);
        assert_eq!((settings.gsm8k.len(), settings.facts.len()), (3, 3));
        let scores = |g: f64, f: f64, p: f64| Scores {
            model: "m".into(),
            gsm8k: g,
            facts: f,
            perplexity: p,
            ..Scores::default()
        };
        let same =
            RetentionReport::from_scores(scores(0.2, 0.5, 12.0), scores(0.2, 0.5, 12.0), &settings);
        assert!(same.kept && same.rows.iter().all(|r| r.ratio == Some(1.0)));
        assert!(same.overall().starts_with("kept"), "{}", same.overall());
        let worse =
            RetentionReport::from_scores(scores(0.2, 0.5, 12.0), scores(0.1, 0.5, 20.0), &settings);
        assert!(!worse.kept);
        assert_eq!(
            worse.overall(),
            "LOST: the adapter keeps less than 95% of the base model on gsm8k accuracy, perplexity"
        );
        let md = worse.markdown();
        assert!(
            md.contains("| gsm8k accuracy | 20.0% | 10.0% | 0.500 | LOST |"),
            "{md}"
        );
        assert!(
            md.contains("| facts accuracy | 50.0% | 50.0% | 1.000 | kept |"),
            "{md}"
        );
        assert!(
            md.contains("| perplexity | 12.000 | 20.000 | 0.600 | LOST |"),
            "{md}"
        );
    }
}
