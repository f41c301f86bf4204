//! `claw up`'s process supervisor: each stage as a child process whose output
//! goes to our stderr prefixed by its name, restarted with backoff when it exits,
//! and stopped (SIGTERM, then SIGKILL after a grace period) at the end.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::wake::{stop_requested, stop_when_parent_dies};

/// One stage's child process (`claw ARGS`).
pub struct StageProcess {
    pub name: &'static str,
    pub args: Vec<String>,
    child: Option<Child>,
    started: Instant,
    restarts: u32,
    restart_at: Option<Instant>,
}

impl StageProcess {
    /// A stage to start at once, as `claw ARGS`.
    pub fn new(name: &'static str, args: Vec<String>) -> Self {
        StageProcess {
            name,
            args,
            child: None,
            started: Instant::now(),
            restarts: 0,
            restart_at: Some(Instant::now()),
        }
    }
}

/// Runs `stages` as children of `exe` (with `CLAW_MODEL=model` when given) until
/// a stop is requested, restarting those that exit; then stops them all.
pub fn run(exe: &Path, model: Option<&Path>, stages: &mut [StageProcess]) -> Result<()> {
    let result = supervise(exe, model, stages);
    shutdown(stages);
    result
}

fn supervise(exe: &Path, model: Option<&Path>, stages: &mut [StageProcess]) -> Result<()> {
    while !stop_requested() {
        for stage in stages.iter_mut() {
            if let Some(child) = &mut stage.child {
                if let Some(status) = child.try_wait()? {
                    stage.child = None;
                    if status.code() == Some(2) {
                        bail!(
                            "{} refused its arguments (exit 2): {}",
                            stage.name,
                            stage.args.join(" ")
                        );
                    }
                    // Back off for stages that keep dying young; reset for one that ran a while.
                    if stage.started.elapsed() > Duration::from_secs(60) {
                        stage.restarts = 0;
                    }
                    let wait = Duration::from_secs(1 << stage.restarts.min(6));
                    stage.restarts += 1;
                    crate::warn!(
                        "up: {} exited ({status}); restarting in {}s",
                        stage.name,
                        wait.as_secs()
                    );
                    stage.restart_at = Some(Instant::now() + wait);
                }
            }
            if stage.child.is_none() && stage.restart_at.is_some_and(|t| Instant::now() >= t) {
                stage.child = Some(spawn(exe, model, stage)?);
                stage.started = Instant::now();
                stage.restart_at = None;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn spawn(exe: &Path, model: Option<&Path>, stage: &StageProcess) -> Result<Child> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(exe);
    cmd.args(&stage.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a terminal's Ctrl-C reaches `up` only, which then
        // stops each stage once (a second signal would make it abandon its work).
        .process_group(0);
    stop_when_parent_dies(&mut cmd);
    if let Some(model) = model {
        cmd.env("CLAW_MODEL", model);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {} {}", exe.display(), stage.args.join(" ")))?;
    let name = stage.name;
    if let Some(out) = child.stdout.take() {
        forward(name, out);
    }
    if let Some(err) = child.stderr.take() {
        forward(name, err);
    }
    crate::debug!("up: started {name} (pid {})", child.id());
    Ok(child)
}

/// Copies a child's output to our stderr, a line at a time, prefixed by stage.
fn forward(name: &'static str, stream: impl Read + Send + 'static) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            // The children's own "claw: " prefix is noise in a merged stream.
            let line = line.strip_prefix("claw: ").unwrap_or(&line);
            crate::ui::log_line(format_args!("[{name:>13}] {line}"));
        }
    });
}

/// SIGTERM to every stage, then a grace period, then SIGKILL.
fn shutdown(stages: &mut [StageProcess]) {
    let running: Vec<&mut StageProcess> = stages.iter_mut().filter(|s| s.child.is_some()).collect();
    if running.is_empty() {
        return;
    }
    crate::info!("up: stopping {} stage(s)", running.len());
    for s in &running {
        if let Some(child) = &s.child {
            // SAFETY: signalling a child we started.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for s in running {
        let Some(mut child) = s.child.take() else {
            continue;
        };
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    crate::warn!("up: {} did not stop in time; killing it", s.name);
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}
