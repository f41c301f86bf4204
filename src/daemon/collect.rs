//! `claw collect --watch DIR`: raw segments in `DIR/raw/` become samples in
//! `DIR/samples/`. Sessions span segments, so collect keeps one state (its
//! `--state` file, in `DIR/state/collect/`) and runs one worker at a time; a
//! second worker waits as a standby.
//!
//! Exactly once: before a batch runs, its plan (the input names, the wall-clock
//! time and the output name) is written to `intent.json`. collect itself writes
//! the output durably before the state that lists the inputs as consumed. After a
//! crash the same plan is run again against the same state, which gives the same
//! output under the same name (replacing, never adding); if the state already
//! lists the inputs, the plan had finished and is only cleared.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::collect_sync::Places;
use super::ledger::Ledger;
use super::status::StatusFile;
use super::wake::{sleep_unless_stopped, stop_requested, Waker};
use super::{DaemonConfig, Settling};
use crate::clock::unix_ms;
use crate::collect::{self, CollectConfig, Format};
use crate::rollout::{segment_file_name, RolloutFile};
use crate::store::Root;

/// One planned collect run.
#[derive(Serialize, Deserialize, Debug)]
struct Intent {
    /// File names in `DIR/raw/` (empty for a clock tick).
    inputs: Vec<String>,
    /// Clock ticks only: the event time to move the clock to ([`tick_target`]),
    /// so quiet sessions end without the clock passing events still to come.
    clock_to: Option<i64>,
    /// File name in `DIR/samples/`.
    output: String,
}

/// How often quiet open sessions are checked against the wall clock.
const TICK_EVERY: Duration = Duration::from_secs(5);

/// How long after an event a writer whose segments close at `segment_age` may
/// still hold it: serve checks its open segment's age every half second, and the
/// write and rename take the rest.
pub fn writer_lag(segment_age: Duration) -> Duration {
    segment_age + Duration::from_secs(1)
}

/// `writer_lag`: how long after an event its writer (claw serve) may still hold
/// it in a segment it has not closed; clock ticks stay that far behind the wall clock.
pub fn run(cfg: &DaemonConfig, base: &CollectConfig, writer_lag: Duration) -> Result<()> {
    let Some((_lock, mut status)) = super::start_single_worker(cfg)? else {
        return Ok(());
    };
    let root = cfg.root();
    let ledger = cfg.ledger()?;
    let mut places = match root {
        Root::Local(_) => Places::local(&cfg.state_dir(), cfg.input_dir(), cfg.output_dir()),
        Root::Remote(r) => Places::remote(r, &cfg.state_rel(), &cfg.input, cfg.stage.output())?,
    };
    let intent_rel = format!("{}/intent.json", cfg.state_rel());
    let waker = Waker::new(&cfg.input_dir(), cfg.poll_only, cfg.poll_interval);
    crate::info!(
        "collect: watching {} -> {} as worker {}",
        root.show(&cfg.input),
        root.show(cfg.stage.output()),
        cfg.worker_id
    );
    status.set("idle");
    let mut last_tick = Instant::now();
    let mut failures = 0u32;
    let mut settling = Settling::default();
    // After a batch failed for no input's fault that shows: plan this many
    // inputs one at a time, so that the one at fault stops only itself.
    let mut solo = 0usize;
    while !stop_requested() {
        let intent = match read_intent(root, &intent_rel)? {
            Some(intent) => {
                crate::debug!("collect: resuming the planned batch {:?}", intent.inputs);
                intent
            }
            None => {
                let tick = (last_tick.elapsed() >= TICK_EVERY).then_some(writer_lag);
                let most = if solo > 0 { 1 } else { cfg.batch_segments };
                match plan(
                    cfg,
                    &ledger,
                    &places,
                    tick,
                    most,
                    &mut status,
                    &mut settling,
                )? {
                    Some(intent) => {
                        if intent.inputs.is_empty() {
                            last_tick = Instant::now();
                        }
                        root.write(&intent_rel, &serde_json::to_vec_pretty(&intent)?)?;
                        intent
                    }
                    None => {
                        if cfg.once && !settling.any_waiting() {
                            break;
                        }
                        status.heartbeat();
                        waker.wait()?;
                        continue;
                    }
                }
            }
        };
        status.set("working");
        match execute(base, &mut places, &intent) {
            Ok(rows) => {
                failures = 0;
                solo = solo.saturating_sub(intent.inputs.len());
                for name in &intent.inputs {
                    ledger.mark_done(name)?;
                    places.consumed_input(name)?;
                }
                ledger.sync()?;
                root.remove(&intent_rel)?;
                if !intent.inputs.is_empty() {
                    status.done(intent.inputs.len() as u64, rows);
                }
            }
            Err(e) => {
                status.error(&e);
                // Bad data or a problem here? Read each input whole: the bad ones go
                // to quarantine and the plan is made again without them.
                let mut bad = 0;
                for name in &intent.inputs {
                    let read = match places.input(name)? {
                        Some(path) => read_whole(&path),
                        None => continue, // gone: the plan is made again
                    };
                    if let Err(read_err) = read {
                        cfg.quarantine(name, &read_err)?;
                        places.drop_input(name);
                        status.status.segments_quarantined += 1;
                        bad += 1;
                    }
                }
                if bad > 0 {
                    root.remove(&intent_rel)?;
                } else if intent.inputs.len() > 1 {
                    crate::warn!(
                        "collect: a batch of {} segments failed ({e:#}); running them one by one",
                        intent.inputs.len()
                    );
                    solo = intent.inputs.len();
                    root.remove(&intent_rel)?;
                } else if let (Some(name), false) = (intent.inputs.first(), is_io(&e)) {
                    // Readable, yet collect refuses its rows: the input is at
                    // fault (an I/O error is this machine's, and is retried).
                    cfg.quarantine(name, &e)?;
                    places.drop_input(name);
                    status.status.segments_quarantined += 1;
                    solo = solo.saturating_sub(1);
                    root.remove(&intent_rel)?;
                } else {
                    failures += 1;
                    let wait = Duration::from_secs(1 << failures.min(6));
                    crate::warn!("collect: {e:#}; retrying in {wait:?}");
                    status.set("idle");
                    if sleep_unless_stopped(wait) {
                        break;
                    }
                }
            }
        }
        if let Some(age) = cfg.retain {
            ledger.retain(root, &cfg.input, age)?;
        }
        status.set("idle");
    }
    status.set("stopped");
    crate::info!(
        "collect: stopped after {} segments ({} raw rows)",
        status.status.segments_done,
        status.status.rows_done
    );
    Ok(())
}

/// The next batch: unconsumed raw segments (bad ones are quarantined here), or
/// with `tick` (the writers' lag) and open sessions waiting on the clock, a run
/// without inputs. At most `most` inputs; one still being written ends the batch
/// before it (raw segments are in time order).
fn plan(
    cfg: &DaemonConfig,
    ledger: &Ledger,
    places: &Places,
    tick: Option<Duration>,
    most: usize,
    status: &mut StatusFile,
    settling: &mut Settling,
) -> Result<Option<Intent>> {
    // Read before the listing: an event old enough to be written by now was
    // written before the listing, so the listing has it (see `tick_target`).
    let now = unix_ms();
    let state_path = places.state_path.as_path();
    let consumed = consumed_names(state_path, &places.raw_dir)?;
    let done = ledger.done_set()?;
    let mut inputs = Vec::new();
    settling.begin_scan();
    for name in cfg.root().list_segments(&cfg.input)? {
        if consumed.contains(&name) {
            // Consumed, but the crash came before its marker: add the marker.
            if !done.contains(&name) {
                ledger.mark_done(&name)?;
            }
            continue;
        }
        if inputs.len() >= most {
            break;
        }
        let Some(path) = places.input(&name)? else {
            continue; // gone
        };
        match RolloutFile::open_path(&path) {
            Ok(_) => inputs.push(name),
            // (an object appears whole: an unreadable one is bad, not unfinished)
            Err(_) if path.exists() && places.sync.is_none() && !settling.settled(&name, &path) => {
                break
            }
            Err(e) if path.exists() => {
                status.error(&e);
                status.status.segments_quarantined += 1;
                cfg.quarantine(&name, &e)?;
                places.drop_input(&name);
            }
            Err(_) => {}
        }
    }
    if let Some(first) = inputs.first() {
        return Ok(Some(Intent {
            output: first.clone(),
            inputs,
            clock_to: None,
        }));
    }
    let Some(writer_lag) = tick else {
        return Ok(None);
    };
    if !has_pending_turns(state_path)? {
        return Ok(None);
    }
    let (Some(clock), Some(saved)) = (state_clock(state_path)?, modified_ms(state_path)) else {
        return Ok(None);
    };
    let Some(clock_to) = tick_target(clock, saved, now, writer_lag.as_millis() as i64) else {
        return Ok(None);
    };
    Ok(Some(Intent {
        inputs: Vec::new(),
        clock_to: Some(clock_to),
        output: segment_file_name(unix_ms().max(0) as u64, "collect-tick", 0),
    }))
}

/// Where a clock tick at wall time `now` moves the event clock (`clock`, saved
/// in the state at wall time `saved`): on by the wall time that passed since, so
/// quiet sessions end while a backlog of older events cannot be jumped past; and
/// never nearer than `writer_lag` to `now`, as a writer may still hold a younger
/// event in a segment it has not closed (serve closes one `--segment-age-ms`
/// after its first row), and that event must not find its session ended.
/// `None`: the clock has nowhere to go yet.
fn tick_target(clock: i64, saved: i64, now: i64, writer_lag: i64) -> Option<i64> {
    let to = clock
        .saturating_add(now.saturating_sub(saved).max(0))
        .min(now.saturating_sub(writer_lag));
    (to > clock).then_some(to)
}

/// Runs the plan; returns the raw rows read.
fn execute(base: &CollectConfig, places: &mut Places, intent: &Intent) -> Result<u64> {
    let state_path = places.state_path.clone();
    let state_path = state_path.as_path();
    let consumed = consumed_names(state_path, &places.raw_dir)?;
    // Finished before a crash that left only the intent: running it again against
    // the newer state would write nothing over the output it wrote.
    let finished = match intent.inputs.is_empty() {
        false => intent.inputs.iter().all(|n| consumed.contains(n)),
        true => state_clock(state_path)?
            .zip(intent.clock_to)
            .is_none_or(|(clock, to)| clock >= to),
    };
    if finished {
        return Ok(0);
    }
    let mut inputs = Vec::new();
    for name in &intent.inputs {
        let path = places
            .input(name)?
            .with_context(|| format!("{name}: planned, but gone from the input folder"))?;
        inputs.push(path.display().to_string());
    }
    let output = places.out_dir.join(&intent.output);
    let run_cfg = CollectConfig {
        format: Format::Raw,
        state: Some(state_path.to_path_buf()),
        flush: false,
        strict: true,
        advance_clock_to: intent.clock_to,
        ..base.clone()
    };
    let stats = collect::collect(&inputs, &output.display().to_string(), &run_cfg)?;
    if stats.turns == 0 {
        // Nothing became a sample (feedback only, first turns of sessions, a tick
        // with nothing due): no empty segment for the next stage.
        let _ = std::fs::remove_file(&output);
    } else {
        crate::info!("{}", stats.summary());
    }
    places.push(&intent.output)?;
    Ok(stats.raw_rows)
}

/// Raw segment names the collect state lists as consumed.
fn consumed_names(state_path: &Path, raw_dir: &Path) -> Result<HashSet<String>> {
    #[derive(Deserialize)]
    struct Consumed {
        #[serde(default)]
        consumed: Vec<String>,
    }
    let text = match std::fs::read_to_string(state_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", state_path.display())),
    };
    let state: Consumed = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a collect state file", state_path.display()))?;
    let raw = std::fs::canonicalize(raw_dir).unwrap_or_else(|_| raw_dir.to_path_buf());
    Ok(state
        .consumed
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.parent() == Some(raw.as_path()))
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect())
}

/// The event clock the collect state has reached.
fn state_clock(state_path: &Path) -> Result<Option<i64>> {
    let text = match std::fs::read_to_string(state_path) {
        Ok(t) => t,
        Err(_) => return Ok(None),
    };
    let state: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a collect state file", state_path.display()))?;
    Ok(state["clock_ms"].as_i64())
}

fn modified_ms(path: &Path) -> Option<i64> {
    crate::clock::unix_ms_of(std::fs::metadata(path).ok()?.modified().ok()?)
}

/// Whether the state holds turns waiting for their next state or feedback grace.
fn has_pending_turns(state_path: &Path) -> Result<bool> {
    let text = match std::fs::read_to_string(state_path) {
        Ok(t) => t,
        Err(_) => return Ok(false),
    };
    let state: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a collect state file", state_path.display()))?;
    Ok(state["sessions"].as_array().is_some_and(|sessions| {
        sessions
            .iter()
            .any(|s| s["pending"].as_array().is_some_and(|p| !p.is_empty()))
    }))
}

fn read_intent(root: &Root, rel: &str) -> Result<Option<Intent>> {
    match root.read(rel)? {
        Some(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{}: damaged (delete it: the next batch is planned again)",
                root.show(rel)
            )
        })?)),
        None => Ok(None),
    }
}

/// Whether an I/O error is behind `e` (this machine's trouble, not the data's).
fn is_io(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| c.downcast_ref::<std::io::Error>().is_some())
}

/// Reads every row of a segment (finds damage the footer check does not).
fn read_whole(path: &Path) -> Result<()> {
    let file = RolloutFile::open_path(path)?;
    for batch in file.batches(4096, None)? {
        batch?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn a_tick_moves_with_the_wall_clock_but_stays_a_writer_lag_behind_it() {
        // Live: the state was saved 200 ms after its last event.
        assert_eq!(tick_target(10_000, 10_200, 12_000, 6_000), None);
        assert_eq!(tick_target(10_000, 10_200, 20_000, 6_000), Some(14_000));
        // A backlog of old events: the clock moves only by the quiet time.
        assert_eq!(tick_target(1_000, 10_000, 15_000, 6_000), Some(6_000));
        // A wall clock that stepped back moves nothing.
        assert_eq!(tick_target(10_000, 12_000, 11_000, 0), None);
    }

    /// Where ticks at `lag` would have moved the clock past an event that its
    /// writer still held, over a simulated stream from a serve-like writer: each
    /// segment closes at the first half-second check `age` after its first row.
    fn clock_passes_unwritten_events(seed: u64, age: i64, lag: i64) -> usize {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let check_offset = rng.gen_range(0..500);
        let mut events = Vec::new(); // (happened, written)
        let (mut t, mut segment_start) = (0i64, None::<i64>);
        while t < 300_000 {
            t += rng.gen_range(0..3_000);
            let start = match segment_start {
                Some(s) if t < close_time(s, age, check_offset) => s,
                _ => t,
            };
            segment_start = Some(start);
            events.push((
                t,
                close_time(start, age, check_offset) + rng.gen_range(0..300),
            ));
        }
        let (mut clock, mut saved, mut consumed, mut last_tick) = (None::<i64>, 0, 0usize, 0);
        let mut passed = 0;
        for now in (0..330_000).step_by(100) {
            let ready = events.iter().filter(|e| e.1 <= now).count();
            if ready > consumed {
                clock = events[consumed..ready].iter().map(|e| e.0).max().max(clock);
                consumed = ready;
                saved = now + 50;
            } else if now - last_tick >= TICK_EVERY.as_millis() as i64 {
                last_tick = now;
                let Some(c) = clock else { continue };
                if let Some(to) = tick_target(c, saved, now, lag) {
                    passed += events.iter().filter(|e| e.1 > now && e.0 < to).count();
                    clock = Some(to);
                }
            }
        }
        passed
    }

    fn close_time(first_row: i64, age: i64, check_offset: i64) -> i64 {
        let due = first_row + age;
        due + (500 - (due - check_offset).rem_euclid(500)) % 500
    }

    #[test]
    fn no_tick_moves_the_clock_past_an_event_its_writer_still_holds() {
        for seed in 0..20 {
            for age in [300, 1_000, 5_000] {
                let lag = writer_lag(Duration::from_millis(age as u64)).as_millis() as i64;
                assert_eq!(
                    clock_passes_unwritten_events(seed, age, lag),
                    0,
                    "seed {seed}, age {age} ms"
                );
            }
        }
        // Without the lag (the wall time since the save alone) ticks do pass them.
        let passed: usize = (0..20)
            .map(|seed| clock_passes_unwritten_events(seed, 5_000, 0))
            .sum();
        assert!(passed > 0, "the simulation never holds an event back");
    }
}
