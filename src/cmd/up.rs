//! `claw up`: serve and every stage over one shared directory, as one process
//! tree with one log stream and one Ctrl-C.
//!
//! Each stage runs as a child process (`claw STAGE --watch DIR`): a crash in one
//! (or its memory) cannot take the others down, each restarts on its own, and
//! they are exactly the daemons one would run under systemd.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::daemon::supervise::{self, StageProcess};
use crate::daemon::wake::install_stop_handler;

const STAGES: [&str; 5] = ["serve", "collect", "judge", "distill-hints", "train"];

/// Run serve and every stage over one directory, as one process tree.
#[derive(Args, Debug)]
#[command(long_about = "\
Run the whole loop over one shared directory: `claw serve` records conversations,
and collect, judge, distill-hints and train run as daemons (`--watch DIR`), each
as a child process, with one log stream (lines prefixed by stage) and one Ctrl-C.
A stage that exits unexpectedly is restarted (with backoff); the first Ctrl-C
asks every stage to finish what it is doing and stop, a second stops at once
(nothing is lost either way: each stage redoes only unfinished work).

The directory:
  DIR/raw/          serve's event segments            (collect reads)
  DIR/samples/      turns with next state + feedback  (judge reads)
  DIR/judged/       + reward                          (distill-hints reads)
  DIR/distilled/    + hint and teacher log-probs      (train reads)
  DIR/checkpoints/  adapter-NNNNNN.safetensors, LATEST (serve hot-loads)
  DIR/state/STAGE/  done markers, claims, status files (claw status reads)
  DIR/quarantine/   inputs a stage refused, each with a .err saying why

Each stage can also run on its own (systemd, cron with --once, or another machine
mounting DIR); several judge or distill-hints workers share the work.

DIR may be an object store URL, s3://bucket/prefix (or gs://, az://), with the
credentials in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_REGION, AWS_ENDPOINT for an S3-compatible server, ...): the same folders are
key prefixes there, claims are leases renewed by their live worker, markers are
created with put-if-absent, LATEST moves by conditional update, and the stages
poll instead of waiting for notifications.

Examples:
  claw up --dir claw-data
  claw up --dir claw-data --without distill-hints --with 'judge=--sources feedback,env'
  claw up --dir claw-data --with 'train=--batch-size 4 --partial-after 20s'
  claw up --dir s3://my-bucket/claw")]
pub struct UpArgs {
    /// The shared directory: a path, or an object store URL (s3://bucket/prefix,
    /// gs://, az://) with credentials in the environment, which every stage gets.
    #[arg(long, default_value = "./claw-data")]
    pub dir: String,
    /// GGUF model for every stage (else $CLAW_MODEL or the default in models/).
    #[arg(long, env = "CLAW_MODEL")]
    pub model: Option<PathBuf>,
    /// Address serve listens on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port serve listens on.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Stages not to start (serve, collect, judge, distill-hints, train). Without
    /// distill-hints, train reads DIR/judged/.
    #[arg(long, value_delimiter = ',', value_name = "STAGE")]
    pub without: Vec<String>,
    /// Extra arguments for one stage, as STAGE=ARGS (split at spaces; repeatable).
    #[arg(long = "with", value_name = "STAGE=ARGS")]
    pub with: Vec<String>,
    /// How often the daemons look for new input besides notifications.
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    pub poll_interval: String,
}

pub fn run(args: UpArgs) -> Result<()> {
    for s in &args.without {
        anyhow::ensure!(
            STAGES.contains(&s.as_str()),
            "--without {s}: not a stage (choose from {})",
            STAGES.join(", ")
        );
    }
    let mut extra: std::collections::HashMap<&str, Vec<String>> = Default::default();
    for w in &args.with {
        let (stage, rest) = w
            .split_once('=')
            .with_context(|| format!("--with {w:?}: expected STAGE=ARGS"))?;
        let stage = STAGES
            .iter()
            .find(|s| **s == stage)
            .with_context(|| format!("--with {w:?}: `{stage}` is not a stage"))?;
        extra
            .entry(stage)
            .or_default()
            .extend(rest.split_whitespace().map(String::from));
    }
    pass_segment_age(&mut extra);
    // Parsed once here, so a bad URL fails before any stage starts.
    let root = crate::store::Root::parse(&args.dir).context("--dir")?;
    if let Some(dir) = root.local() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create the directory", dir.display()))?;
    }
    let dir = args.dir.clone();
    let distill = !args.without.iter().any(|s| s == "distill-hints");
    let mut stages = Vec::new();
    for name in STAGES {
        if args.without.iter().any(|s| s == name) {
            continue;
        }
        let mut argv: Vec<String> = match name {
            "serve" => vec![
                "serve".into(),
                "--dir".into(),
                dir.clone(),
                "--host".into(),
                args.host.clone(),
                "--port".into(),
                args.port.to_string(),
            ],
            _ => vec![
                name.into(),
                "--watch".into(),
                dir.clone(),
                "--poll-interval".into(),
                args.poll_interval.clone(),
            ],
        };
        if name == "train" && !distill {
            argv.extend(["--from".into(), "judged".into()]);
        }
        argv.extend(extra.remove(name).unwrap_or_default());
        stages.push(StageProcess::new(name, argv));
    }
    anyhow::ensure!(!stages.is_empty(), "--without left no stage to run");
    install_stop_handler();
    let exe = crate::daemon::claw_executable()?;
    let serving = match stages.iter().any(|s| s.name == "serve") {
        true => format!(" (serve on http://{}:{}/v1)", args.host, args.port),
        false => String::new(),
    };
    crate::info!(
        "up: {} over {}{serving}; Ctrl-C stops",
        stages.iter().map(|s| s.name).collect::<Vec<_>>().join(", "),
        root
    );
    supervise::run(&exe, args.model.as_deref(), &mut stages)
}

/// collect's clock waits for serve's open segment to close, so serve's
/// `--segment-age-ms` (when given) goes to collect too, unless collect has its own.
fn pass_segment_age(extra: &mut std::collections::HashMap<&str, Vec<String>>) {
    const FLAG: &str = "--segment-age-ms";
    let value_in = |args: &[String]| -> Option<String> {
        args.iter()
            .enumerate()
            .find_map(|(i, a)| match a.strip_prefix(FLAG) {
                Some("") => args.get(i + 1).cloned(),
                Some(rest) => rest.strip_prefix('=').map(String::from),
                None => None,
            })
    };
    let Some(age) = extra.get("serve").and_then(|a| value_in(a)) else {
        return;
    };
    let collect = extra.entry("collect").or_default();
    if value_in(collect).is_none() {
        collect.extend([FLAG.to_string(), age]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extras(
        pairs: &[(&'static str, &str)],
    ) -> std::collections::HashMap<&'static str, Vec<String>> {
        pairs
            .iter()
            .map(|(stage, args)| (*stage, args.split_whitespace().map(String::from).collect()))
            .collect()
    }

    #[test]
    fn serves_segment_age_reaches_collect_unless_collect_sets_its_own() {
        let mut e = extras(&[("serve", "--segment-age-ms 300 --reload-poll-ms 200")]);
        pass_segment_age(&mut e);
        assert_eq!(e["collect"], ["--segment-age-ms", "300"]);

        let mut e = extras(&[
            ("serve", "--segment-age-ms=300"),
            ("collect", "--feedback-grace 1s"),
        ]);
        pass_segment_age(&mut e);
        assert_eq!(
            e["collect"],
            ["--feedback-grace", "1s", "--segment-age-ms", "300"]
        );

        let mut e = extras(&[
            ("serve", "--segment-age-ms 300"),
            ("collect", "--segment-age-ms=900"),
        ]);
        pass_segment_age(&mut e);
        assert_eq!(e["collect"], ["--segment-age-ms=900"]);

        let mut e = extras(&[("serve", "--port-ish 1")]);
        pass_segment_age(&mut e);
        assert!(!e.contains_key("collect"), "nothing to pass: {e:?}");
    }
}
