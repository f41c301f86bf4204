//! The Attention Residuals study (research/attnres.md section 5), driven by
//! `scripts/bench-attnres`: byte-level LMs trained from scratch on an English
//! text file, standard vs Block vs Full AttnRes, paired seeds (identical shared
//! initialisation and data order; the AttnRes parameters are extra and start at
//! zero), in a deep-narrow and a shallow-wide arm. Writes OUT/attnres.md,
//! OUT/attnres.json and OUT/attnres-routing-*.png.
//!
//!   cargo run --example bench_attnres -- CORPUS.txt OUT [--steps N] [--batch B]
//!       [--seq T] [--seeds-deep K] [--seeds-wide K] [--lr X] [--arms deep,wide]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use claw::model::config::{Architecture, ModelConfig, Residual};
use claw::model::decoder::{Decoder, DepthTrace, Kernels};
use claw::model::score::{self, Sequence};
use claw::model::KvCache;
use claw::train::optim::AdamWConfig;
use claw::train::{Objective, TrainSample, Trainer, TrainerConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

struct Args {
    corpus: PathBuf,
    out: PathBuf,
    steps: usize,
    batch: usize,
    seq: usize,
    seeds_deep: u64,
    seeds_wide: u64,
    lr: f64,
    arms: Vec<String>,
    val_windows: usize,
}

fn parse_args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let corpus = PathBuf::from(it.next().context("usage: CORPUS OUT [options]")?);
    let out = PathBuf::from(it.next().context("usage: CORPUS OUT [options]")?);
    let mut a = Args {
        corpus,
        out,
        steps: 300,
        batch: 8,
        seq: 128,
        seeds_deep: 3,
        seeds_wide: 2,
        lr: 2e-3,
        arms: vec!["deep".into(), "wide".into()],
        val_windows: 64,
    };
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--steps" => a.steps = value.parse()?,
            "--batch" => a.batch = value.parse()?,
            "--seq" => a.seq = value.parse()?,
            "--seeds-deep" => a.seeds_deep = value.parse()?,
            "--seeds-wide" => a.seeds_wide = value.parse()?,
            "--lr" => a.lr = value.parse()?,
            "--val-windows" => a.val_windows = value.parse()?,
            "--arms" => a.arms = value.split(',').map(str::to_string).collect(),
            other => anyhow::bail!("unknown option {other}"),
        }
    }
    Ok(a)
}

/// One model geometry of the study.
struct Arm {
    name: &'static str,
    hidden: usize,
    layers: usize,
    heads: usize,
    block: usize,
}

const ARMS: [Arm; 2] = [
    // Deep-narrow: the paper's ablation geometry scaled down; Block S=4 sublayers.
    Arm {
        name: "deep",
        hidden: 64,
        layers: 8,
        heads: 4,
        block: 4,
    },
    // Shallow-wide control at about the same parameter count; Block S=2.
    Arm {
        name: "wide",
        hidden: 128,
        layers: 2,
        heads: 4,
        block: 2,
    },
];

fn config(arm: &Arm, residual: Residual, seq: usize) -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: 256,
        hidden_size: arm.hidden,
        intermediate_size: (8 * arm.hidden).div_ceil(3).div_ceil(8) * 8,
        num_layers: arm.layers,
        num_heads: arm.heads,
        num_kv_heads: arm.heads,
        head_dim: arm.hidden / arm.heads,
        rope_theta: 10_000.0,
        // ≤ 1e-8 keeps the zero-query model the baseline's function (research §1.2).
        rms_norm_eps: 1e-8,
        context_length: seq + 1,
        residual,
        rope_scaling: None,
    }
}

#[derive(Serialize, Clone)]
struct RunResult {
    arm: String,
    residual: String,
    seed: u64,
    params: usize,
    /// (step, validation nats/byte).
    val_curve: Vec<(usize, f64)>,
    final_val: f64,
    train_loss_last: f64,
    median_step_ms: f64,
    /// Per Transformer block: gradient Frobenius norm, mean over the last quarter of steps.
    block_grad_norms: Vec<f64>,
    trace: DepthTrace,
    prefill_ms_128: f64,
    decode_ms_per_token: f64,
    wall_s: f64,
}

fn lr_at(step: usize, total: usize, peak: f64) -> f64 {
    let warmup = (total / 10).max(1);
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let p = (step - warmup) as f64 / (total - warmup).max(1) as f64;
    // Cosine to 10% of the peak.
    peak * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
}

fn window(data: &[u8], start: usize, len: usize) -> TrainSample {
    let ids: Vec<u32> = data[start..start + len]
        .iter()
        .map(|&b| u32::from(b))
        .collect();
    TrainSample {
        sample_id: format!("{start}"),
        prompt_ids: ids[..1].to_vec(),
        response_ids: ids[1..].to_vec(),
        ..Default::default()
    }
}

fn val_loss(decoder: &Decoder, val: &[TrainSample]) -> Result<f64> {
    let seqs: Vec<Sequence> = val
        .iter()
        .map(|s| Sequence {
            prompt: &s.prompt_ids,
            response: &s.response_ids,
        })
        .collect();
    let lps = score::score(decoder, &seqs, 4096)?;
    let (mut sum, mut n) = (0f64, 0usize);
    for lp in lps {
        sum -= lp.iter().map(|&x| x as f64).sum::<f64>();
        n += lp.len();
    }
    Ok(sum / n as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Prefill of 128 tokens and per-token decode with the KV cache (fused kernels,
/// the serving path), medians over repeats.
fn latency(decoder: &Decoder, data: &[u8], seq: usize) -> Result<(f64, f64)> {
    let fused = decoder.clone().with_kernels(Kernels::Fused);
    let prompt: Vec<u32> = data[..16].iter().map(|&b| u32::from(b)).collect();
    let long: Vec<u32> = data[..seq.min(128)].iter().map(|&b| u32::from(b)).collect();
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for _ in 0..1 {
        let t = Instant::now();
        let mut cache = KvCache::new();
        fused.forward_last(
            &Tensor::new(long.as_slice(), &Device::Cpu)?.unsqueeze(0)?,
            &mut cache,
        )?;
        prefill.push(t.elapsed().as_secs_f64() * 1e3);

        let mut cache = KvCache::new();
        let mut logits = fused.forward_last(
            &Tensor::new(prompt.as_slice(), &Device::Cpu)?.unsqueeze(0)?,
            &mut cache,
        )?;
        let steps = seq.min(128) - 16;
        let t = Instant::now();
        for _ in 0..steps {
            let next = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?[0];
            logits = fused.forward_last(
                &Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?,
                &mut cache,
            )?;
        }
        decode.push(t.elapsed().as_secs_f64() * 1e3 / steps as f64);
    }
    Ok((median(prefill), median(decode)))
}

#[allow(clippy::too_many_arguments)]
fn run_one(
    args: &Args,
    arm: &Arm,
    residual: Residual,
    seed: u64,
    train: &[u8],
    val: &[TrainSample],
    trace_ids: &Tensor,
) -> Result<RunResult> {
    let started = Instant::now();
    let cfg = config(arm, residual, args.seq);
    let decoder = Decoder::new_random(&cfg, false, 0.02, seed, &Device::Cpu)?
        .with_kernels(Kernels::Differentiable);
    let params: usize = decoder
        .parameters()?
        .iter()
        .map(|(_, t)| t.elem_count())
        .sum();
    let tc = TrainerConfig {
        objective: Objective::Lm,
        lora: None,
        optim: AdamWConfig {
            lr: args.lr,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        },
        grad_clip: 1.0,
        seed,
        micro_batch_tokens: args.batch * (args.seq + 1),
        ..Default::default()
    };
    let mut trainer = Trainer::new(&decoder, tc, None)?;
    let names = trainer.named_vars();
    // Data order: from the seed alone, so every residual of a seed sees the same batches.
    let mut rng = StdRng::seed_from_u64(1000 + seed);
    let mut step_ms = Vec::new();
    let mut grad_sums = vec![0f64; arm.layers];
    let mut grad_count = 0usize;
    let mut val_curve = Vec::new();
    let mut train_loss_last = 0.0;
    let evals: Vec<usize> = (1..=4).map(|k| args.steps * k / 4).collect();
    for step in 0..args.steps {
        let batch: Vec<TrainSample> = (0..args.batch)
            .map(|_| {
                window(
                    train,
                    rng.gen_range(0..train.len() - args.seq - 1),
                    args.seq + 1,
                )
            })
            .collect();
        trainer.optimizer_mut().config.lr = lr_at(step, args.steps, args.lr);
        let t = Instant::now();
        let (mut grads, metrics) = trainer.gradients(&batch)?;
        if step >= args.steps * 3 / 4 {
            let mut per_block = vec![0f64; arm.layers];
            for (name, var) in &names {
                let Some(rest) = name.strip_prefix("model.layers.") else {
                    continue;
                };
                // Shared weights only, so the arms compare like with like.
                if name.contains("_res.") {
                    continue;
                }
                let block: usize = rest.split('.').next().unwrap_or("0").parse()?;
                if let Some(g) = grads.get(var) {
                    per_block[block] += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
                }
            }
            for (s, b) in grad_sums.iter_mut().zip(per_block) {
                *s += b.sqrt();
            }
            grad_count += 1;
        }
        let norm = grads.clip(1.0)?;
        anyhow::ensure!(norm.is_finite(), "non-finite gradient at step {step}");
        trainer.optimizer_mut().step(&grads)?;
        step_ms.push(t.elapsed().as_secs_f64() * 1e3);
        train_loss_last = metrics.loss as f64;
        if evals.contains(&(step + 1)) {
            let v = val_loss(&trainer.frozen_policy()?, val)?;
            val_curve.push((step + 1, v));
            eprintln!(
                "  {} {} seed {seed} step {} train {:.4} val {:.4} ({:.0} ms/step)",
                arm.name,
                residual,
                step + 1,
                metrics.loss,
                v,
                median(step_ms.clone())
            );
        }
    }
    let policy = trainer.frozen_policy()?;
    let (_, trace) = policy
        .clone()
        .with_kernels(Kernels::Fused)
        .trace_sequences(trace_ids)?;
    let (prefill, decode) = latency(&policy, train, args.seq)?;
    // (Single-shot here; the report's overheads come from `timing`, interleaved.)
    // Final value: the mean of the last two evaluations (research §5.5).
    let n = val_curve.len();
    let final_val = val_curve[n.saturating_sub(2)..]
        .iter()
        .map(|v| v.1)
        .sum::<f64>()
        / val_curve[n.saturating_sub(2)..].len() as f64;
    Ok(RunResult {
        arm: arm.name.to_string(),
        residual: residual.to_string(),
        seed,
        params,
        val_curve,
        final_val,
        train_loss_last,
        median_step_ms: median(step_ms),
        block_grad_norms: grad_sums
            .iter()
            .map(|s| s / grad_count.max(1) as f64)
            .collect(),
        trace,
        prefill_ms_128: prefill,
        decode_ms_per_token: decode,
        wall_s: started.elapsed().as_secs_f64(),
    })
}

/// Cost per residual, measured round-robin (one step or one generation of each
/// residual in turn, repeated) so that load from other processes on this shared
/// machine falls on all residuals alike: medians of train ms/step, decode
/// ms/token and prefill ms.
#[derive(Serialize, Clone, Default)]
struct Timing {
    step_ms: f64,
    decode_ms: f64,
    prefill_ms: f64,
}

fn timing(args: &Args, arm: &Arm, train: &[u8]) -> Result<BTreeMap<String, Timing>> {
    let residuals = [
        Residual::Standard,
        Residual::Block { size: arm.block },
        Residual::Full,
    ];
    let mut trainers = Vec::new();
    for r in residuals {
        let d = Decoder::new_random(&config(arm, r, args.seq), false, 0.02, 0, &Device::Cpu)?
            .with_kernels(Kernels::Differentiable);
        let tc = TrainerConfig {
            objective: Objective::Lm,
            lora: None,
            micro_batch_tokens: args.batch * (args.seq + 1),
            ..Default::default()
        };
        trainers.push(Trainer::new(&d, tc, None)?);
    }
    let mut rng = StdRng::seed_from_u64(7);
    let batch: Vec<TrainSample> = (0..args.batch)
        .map(|_| {
            window(
                train,
                rng.gen_range(0..train.len() - args.seq - 1),
                args.seq + 1,
            )
        })
        .collect();
    let mut steps = vec![Vec::new(); 3];
    let (mut decode, mut prefill) = (vec![Vec::new(); 3], vec![Vec::new(); 3]);
    for rep in 0..9 {
        for (k, t) in trainers.iter_mut().enumerate() {
            let started = Instant::now();
            t.step(&batch)?;
            if rep > 0 {
                steps[k].push(started.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    for _ in 0..7 {
        for (k, t) in trainers.iter().enumerate() {
            let (p, d) = latency(&t.frozen_policy()?, train, args.seq)?;
            prefill[k].push(p);
            decode[k].push(d);
        }
    }
    Ok(residuals
        .iter()
        .enumerate()
        .map(|(k, r)| {
            (
                r.to_string(),
                Timing {
                    step_ms: median(steps[k].clone()),
                    decode_ms: median(decode[k].clone()),
                    prefill_ms: median(prefill[k].clone()),
                },
            )
        })
        .collect())
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let var = match v.len() {
        0 | 1 => 0.0,
        n => v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1) as f64,
    };
    (m, var.sqrt())
}

/// max/min, coefficient of variation and first/last ratio of per-block norms.
fn spread(v: &[f64]) -> (f64, f64, f64) {
    let max = v.iter().copied().fold(f64::MIN, f64::max);
    let min = v.iter().copied().fold(f64::MAX, f64::min);
    let (m, _) = mean_std(v);
    let sd = (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
    (max / min, sd / m, v[0] / v[v.len() - 1])
}

fn main() -> Result<()> {
    let args = parse_args()?;
    std::fs::create_dir_all(&args.out)?;
    let data = std::fs::read(&args.corpus)
        .with_context(|| format!("cannot read corpus {}", args.corpus.display()))?;
    anyhow::ensure!(data.len() > 1 << 20, "the corpus is too small");
    // Contiguous held-out split: the last 5%.
    let split = data.len() * 95 / 100;
    let (train, held) = data.split_at(split);
    let stride = (held.len() - args.seq - 1) / args.val_windows;
    let val: Vec<TrainSample> = (0..args.val_windows)
        .map(|i| window(held, i * stride, args.seq + 1))
        .collect();
    let trace_tokens: Vec<u32> = (0..8)
        .flat_map(|i| {
            held[i * stride..i * stride + args.seq]
                .iter()
                .map(|&b| u32::from(b))
        })
        .collect();
    let trace_ids = Tensor::from_vec(trace_tokens, (8, args.seq), &Device::Cpu)?;
    eprintln!(
        "corpus {} bytes ({} train, {} held out); {} steps x {} x {} tokens",
        data.len(),
        train.len(),
        held.len(),
        args.steps,
        args.batch,
        args.seq
    );
    let total = Instant::now();
    let mut results: Vec<RunResult> = Vec::new();
    let mut timings: BTreeMap<String, BTreeMap<String, Timing>> = BTreeMap::new();
    for arm in ARMS
        .iter()
        .filter(|a| args.arms.iter().any(|n| n == a.name))
    {
        eprintln!("timing {} (round-robin)", arm.name);
        timings.insert(arm.name.to_string(), timing(&args, arm, train)?);
        let seeds = if arm.name == "deep" {
            args.seeds_deep
        } else {
            args.seeds_wide
        };
        for seed in 0..seeds {
            for residual in [
                Residual::Standard,
                Residual::Block { size: arm.block },
                Residual::Full,
            ] {
                let r = run_one(&args, arm, residual, seed, train, &val, &trace_ids)?;
                results.push(r);
                // Keep partial results if the run is cut short.
                std::fs::write(
                    args.out.join("attnres.json"),
                    serde_json::to_string_pretty(&serde_json::json!({
                        "runs": results, "timing": timings
                    }))?,
                )?;
            }
        }
    }
    let report = report(
        &args,
        &results,
        &timings,
        data.len(),
        total.elapsed().as_secs_f64(),
    )?;
    std::fs::write(args.out.join("attnres.md"), report)?;
    eprintln!(
        "wrote {} in {:.0} s",
        args.out.join("attnres.md").display(),
        total.elapsed().as_secs_f64()
    );
    Ok(())
}

fn report(
    args: &Args,
    results: &[RunResult],
    timings: &BTreeMap<String, BTreeMap<String, Timing>>,
    corpus_bytes: usize,
    wall: f64,
) -> Result<String> {
    let mut md = String::new();
    writeln!(md, "## Measured: {} steps x {} sequences x {} bytes, lr {} (warmup 10%, cosine to 10%), AdamW (0.9, 0.95), wd 0.1 on matrices, clip 1.0; corpus {:.1} MB, last 5% held out ({} validation windows); total wall time {:.0} s on this machine\n",
        args.steps, args.batch, args.seq, args.lr, corpus_bytes as f64 / 1e6, args.val_windows, wall)?;
    let mut by_arm: BTreeMap<String, Vec<&RunResult>> = BTreeMap::new();
    for r in results {
        by_arm.entry(r.arm.clone()).or_default().push(r);
    }
    for (arm, runs) in &by_arm {
        let geometry = ARMS.iter().find(|a| a.name == arm).context("arm")?;
        writeln!(
            md,
            "### Arm `{arm}`: width {}, {} blocks ({} sublayers), {} heads, Block S = {} sublayers\n",
            geometry.hidden,
            geometry.layers,
            2 * geometry.layers,
            geometry.heads,
            geometry.block
        )?;
        let residuals: Vec<String> = {
            let mut v: Vec<String> = runs.iter().map(|r| r.residual.clone()).collect();
            v.dedup();
            v.sort_by_key(|r| match r.as_str() {
                "standard" => 0,
                "attnres-full" => 2,
                _ => 1,
            });
            v.dedup();
            v
        };
        let of = |res: &str| -> Vec<&RunResult> {
            runs.iter().filter(|r| r.residual == res).copied().collect()
        };
        let base = of("standard");
        let base_vals: Vec<f64> = base.iter().map(|r| r.final_val).collect();
        let (base_mean, base_std) = mean_std(&base_vals);
        let times = timings.get(arm.as_str()).context("timing")?;
        let time_of = |res: &str| times.get(res).cloned().unwrap_or_default();
        let base_time = time_of("standard");
        let (base_step, base_decode, base_prefill) =
            (base_time.step_ms, base_time.decode_ms, base_time.prefill_ms);
        writeln!(md, "| residual | params | val nats/byte (mean ± std over seeds) | per-seed paired Δ vs standard | mean Δ (%) | train ms/step | decode ms/token | prefill 128 ms |")?;
        writeln!(md, "|---|---|---|---|---|---|---|---|")?;
        for res in &residuals {
            let rs = of(res);
            let vals: Vec<f64> = rs.iter().map(|r| r.final_val).collect();
            let (m, s) = mean_std(&vals);
            let deltas: Vec<f64> = rs
                .iter()
                .filter_map(|r| {
                    base.iter()
                        .find(|b| b.seed == r.seed)
                        .map(|b| r.final_val - b.final_val)
                })
                .collect();
            let t = time_of(res);
            let (step, decode, prefill) = (t.step_ms, t.decode_ms, t.prefill_ms);
            let pct = |x: f64, b: f64| {
                if res == "standard" {
                    String::new()
                } else {
                    format!(" ({:+.0}%)", 100.0 * (x / b - 1.0))
                }
            };
            let delta_text = match res.as_str() {
                "standard" => "—".to_string(),
                _ => deltas
                    .iter()
                    .map(|d| format!("{d:+.4}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            let mean_delta = match res.as_str() {
                "standard" => "—".to_string(),
                _ => {
                    let (dm, _) = mean_std(&deltas);
                    format!("{dm:+.4} ({:+.2}%)", 100.0 * dm / base_mean)
                }
            };
            writeln!(
                md,
                "| {res} | {} | {m:.4} ± {s:.4} | {delta_text} | {mean_delta} | {step:.0}{} | {decode:.3}{} | {prefill:.1}{} |",
                rs[0].params,
                pct(step, base_step),
                pct(decode, base_decode),
                pct(prefill, base_prefill)
            )?;
        }
        writeln!(md, "\nCosts are medians measured round-robin across the three residuals (8 train steps, 7 generations of 16 + 112 tokens each), so load from other processes falls on all alike.")?;
        writeln!(
            md,
            "\nBaseline seed std of the final validation loss: {base_std:.4} nats/byte."
        )?;
        for res in residuals.iter().filter(|r| r.as_str() != "standard") {
            let deltas: Vec<f64> = of(res)
                .iter()
                .filter_map(|r| {
                    base.iter()
                        .find(|b| b.seed == r.seed)
                        .map(|b| r.final_val - b.final_val)
                })
                .collect();
            let all_negative = deltas.iter().all(|d| *d < 0.0);
            let (dm, _) = mean_std(&deltas);
            let verdict = if deltas.len() >= 2 && all_negative && dm.abs() > 2.0 * base_std {
                "a win at this scale (every paired Δ negative, |mean Δ| > 2 × baseline seed std)"
            } else if all_negative {
                "every paired Δ negative, but not resolved by the §5.7 rule (|mean Δ| ≤ 2 × baseline seed std, or one seed)"
            } else {
                "not resolved at this scale (paired Δ of mixed sign or positive)"
            };
            writeln!(md, "- {res}: {verdict}.")?;
        }

        writeln!(md, "\nGradient-norm spread across Transformer blocks (shared weights; Frobenius norm per block, mean over the last quarter of steps, then over seeds):\n")?;
        writeln!(
            md,
            "| residual | max/min | CV | first/last | per-block norms (seed 0) |"
        )?;
        writeln!(md, "|---|---|---|---|---|")?;
        for res in &residuals {
            let rs = of(res);
            let stats: Vec<(f64, f64, f64)> =
                rs.iter().map(|r| spread(&r.block_grad_norms)).collect();
            let avg = |f: fn(&(f64, f64, f64)) -> f64| {
                stats.iter().map(f).sum::<f64>() / stats.len() as f64
            };
            let norms = rs[0]
                .block_grad_norms
                .iter()
                .map(|g| format!("{g:.3}"))
                .collect::<Vec<_>>()
                .join(" ");
            writeln!(
                md,
                "| {res} | {:.2} | {:.3} | {:.2} | {norms} |",
                avg(|s| s.0),
                avg(|s| s.1),
                avg(|s| s.2)
            )?;
        }
        writeln!(md, "\nMagnitudes across depth (seed 0, end of training, RMS over 8 held-out windows), per sublayer (a = attention, m = MLP):\n")?;
        let labels: Vec<String> = (0..2 * geometry.layers)
            .map(|j| format!("{}{}", j / 2, if j % 2 == 0 { "a" } else { "m" }))
            .collect();
        writeln!(md, "| residual | what | {} |", labels.join(" | "))?;
        writeln!(md, "|---|---|{}", "---|".repeat(labels.len()))?;
        for res in &residuals {
            let r = of(res)[0];
            let row = |v: &[f32]| {
                v.iter()
                    .map(|x| format!("{x:.2}"))
                    .collect::<Vec<_>>()
                    .join(" | ")
            };
            writeln!(md, "| {res} | output f(h) | {} |", row(&r.trace.output_rms))?;
            writeln!(
                md,
                "| {res} | input stream h | {} |",
                row(&r.trace.input_rms)
            )?;
        }
        for res in residuals.iter().filter(|r| r.as_str() != "standard") {
            let r = of(res)[0];
            let name = format!("attnres-routing-{arm}-{}.png", res.replace(':', ""));
            write_heatmap(&args.out.join(&name), &r.trace.alphas)?;
            let embedding: Vec<String> = r
                .trace
                .alphas
                .iter()
                .map(|a| format!("{:.2}", a[0]))
                .collect();
            let last: Vec<String> = r
                .trace
                .alphas
                .iter()
                .map(|a| format!("{:.2}", a[a.len() - 1]))
                .collect();
            let max: Vec<String> = r
                .trace
                .alphas
                .iter()
                .map(|a| format!("{:.2}", a.iter().copied().fold(0.0, f32::max)))
                .collect();
            writeln!(md, "\nRouting of {res} (seed 0; rows = sublayers 0a..{} then the readout; columns = sources, embedding first): ![{res} routing]({name})\n", labels.last().map(String::as_str).unwrap_or(""))?;
            writeln!(
                md,
                "- weight on the embedding per sublayer: {}",
                embedding.join(" ")
            )?;
            writeln!(md, "- weight on the most recent source: {}", last.join(" "))?;
            writeln!(md, "- max α: {}", max.join(" "))?;
        }
        writeln!(md)?;
    }
    Ok(md)
}

/// A heatmap of routing weights as a PNG: one row per AttnRes op, one column
/// per source, white (0) to dark blue (1); grey where a source does not exist.
fn write_heatmap(path: &Path, alphas: &[Vec<f32>]) -> Result<()> {
    let cell = 12;
    let cols = alphas.iter().map(Vec::len).max().unwrap_or(1);
    let (w, h) = (cols * cell, alphas.len() * cell);
    let mut rgb = vec![0u8; w * h * 3];
    for (r, row) in alphas.iter().enumerate() {
        for c in 0..cols {
            let color = match row.get(c) {
                Some(&a) => {
                    let a = a.clamp(0.0, 1.0);
                    [
                        (255.0 * (1.0 - a)) as u8,
                        (255.0 * (1.0 - 0.8 * a)) as u8,
                        (255.0 * (1.0 - 0.45 * a)) as u8,
                    ]
                }
                None => [200, 200, 200],
            };
            for y in r * cell..(r + 1) * cell {
                for x in c * cell..(c + 1) * cell {
                    let border = y % cell == 0 || x % cell == 0;
                    let px = if border { [255, 255, 255] } else { color };
                    rgb[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&px);
                }
            }
        }
    }
    std::fs::write(path, png::encode_rgb(w, h, &rgb))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// A minimal PNG encoder: 8-bit RGB, no filter, zlib with stored (uncompressed)
/// deflate blocks. No deflate crate is in the tree, and the images are small.
mod png {
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    0xEDB8_8320 ^ (crc >> 1)
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn adler32(data: &[u8]) -> u32 {
        let (mut a, mut b) = (1u32, 0u32);
        for &x in data {
            a = (a + u32::from(x)) % 65521;
            b = (b + a) % 65521;
        }
        (b << 16) | a
    }

    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    }

    pub fn encode_rgb(width: usize, height: usize, rgb: &[u8]) -> Vec<u8> {
        let mut raw = Vec::with_capacity(height * (width * 3 + 1));
        for row in rgb.chunks_exact(width * 3) {
            raw.push(0); // filter: none
            raw.extend_from_slice(row);
        }
        let mut z = vec![0x78, 0x01];
        let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
        for (i, block) in blocks.iter().enumerate() {
            z.push(u8::from(i + 1 == blocks.len()));
            let len = block.len() as u16;
            z.extend_from_slice(&len.to_le_bytes());
            z.extend_from_slice(&(!len).to_le_bytes());
            z.extend_from_slice(block);
        }
        z.extend_from_slice(&adler32(&raw).to_be_bytes());
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&(width as u32).to_be_bytes());
        ihdr.extend_from_slice(&(height as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        chunk(&mut out, b"IHDR", &ihdr);
        chunk(&mut out, b"IDAT", &z);
        chunk(&mut out, b"IEND", &[]);
        out
    }
}
