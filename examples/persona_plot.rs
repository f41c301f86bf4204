//! Draws the persona benchmark's chart from saved results: the runs of one or
//! more persona.json files (or directories holding one) on one figure, e.g. a
//! method's runs and the control's from separate `--report` directories.
//!
//!   cargo run --example persona_plot -- OUT.png INPUT [INPUT...]
//!
//! `claw eval --bench persona --report DIR` draws DIR/persona.png itself; this
//! redraws old reports and puts runs that were reported apart side by side.

use std::path::PathBuf;

use anyhow::{Context, Result};
use claw::eval::persona::metrics::{satisfaction_chart, RunResult};
use claw::eval::persona::plot::render_png;

fn main() -> Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [out, inputs @ ..] = args.as_slice() else {
        anyhow::bail!("usage: persona_plot OUT.png INPUT [INPUT...]");
    };
    anyhow::ensure!(
        !inputs.is_empty(),
        "usage: persona_plot OUT.png INPUT [INPUT...]"
    );
    let mut results: Vec<RunResult> = Vec::new();
    for input in inputs {
        let path = match input.is_dir() {
            true => input.join("persona.json"),
            false => input.clone(),
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let runs: Vec<RunResult> =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        results.extend(runs);
    }
    std::fs::write(out, render_png(&satisfaction_chart(&results))?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("{}: {} runs", out.display(), results.len());
    Ok(())
}
