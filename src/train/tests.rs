//! Training tests on the tiny random model: layout and scoring agree with the
//! serving runtime, every trainable tensor gets a gradient that matches finite
//! differences, and the signals move the model the way they say.

use candle_core::{Device, Tensor};

use super::loss::{LossConfig, RewardBaseline};
use super::optim::AdamWConfig;
use super::trainer::{Objective, TrainSample, Trainer, TrainerConfig};
use crate::adapter::{Adapter, LoraConfig};
use crate::model::decoder::{Decoder, KvCache};
use crate::model::score::{self, Sequence};
use crate::model::testing::{write_tiny_gguf, TinySpec};
use crate::model::{Model, SamplingParams, WeightFormat};

fn tiny_model(format: WeightFormat) -> Model {
    tiny_model_of(&TinySpec::default(), format)
}

fn tiny_model_of(spec: &TinySpec, format: WeightFormat) -> Model {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path, spec).unwrap();
    Model::load_with(&path, format).unwrap()
}

/// The architectures the trainer is checked on: SmolLM2-like llama, Qwen3
/// (per-head q/k norms) and Llama 3 (scaled RoPE, untied head).
fn variants() -> [(&'static str, TinySpec); 3] {
    [
        ("llama", TinySpec::default()),
        ("qwen3", TinySpec::qwen3()),
        ("llama3", TinySpec::llama3()),
    ]
}

fn logits(decoder: &Decoder, ids: &[u32]) -> Vec<f32> {
    let t = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    decoder
        .forward_sequences(&t)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

const PROMPT: [u32; 6] = [1, 104, 105, 106, 2, 1];

fn config(objective: Objective, lr: f64) -> TrainerConfig {
    TrainerConfig {
        objective,
        optim: AdamWConfig {
            lr,
            ..Default::default()
        },
        lora: Some(LoraConfig {
            rank: 4,
            alpha: 8.0,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Gives B random values so that every LoRA tensor (A too) gets a gradient.
fn randomize_b(adapter: &Adapter) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for p in &adapter.pairs {
        let values: Vec<f32> = (0..p.b.elem_count())
            .map(|_| rng.gen_range(-0.08f32..0.08))
            .collect();
        let t = Tensor::from_vec(values, p.b.shape(), &Device::Cpu).unwrap();
        p.b.set(&t).unwrap();
    }
}

#[test]
fn hf_layout_computes_the_same_function() {
    for (name, spec) in variants() {
        let model = tiny_model_of(&spec, WeightFormat::F32);
        let hf = model.decoder.to_hf_layout().unwrap();
        let ids = [1u32, 50, 60, 70, 80, 90];
        let d = max_diff(&logits(&model.decoder, &ids), &logits(&hf, &ids));
        assert!(d < 1e-4, "{name}: GGUF vs HF layout logits differ by {d}");
    }
}

#[test]
fn batched_scores_match_single_scores_and_serving_logprobs() {
    for (name, spec) in variants() {
        eprintln!("{name}");
        batched_scores_match_on(&tiny_model_of(&spec, WeightFormat::F32));
    }
}

fn batched_scores_match_on(model: &Model) {
    let params = SamplingParams {
        temperature: 1.0,
        seed: Some(3),
        max_tokens: 12,
        ignore_eos: true,
        ..Default::default()
    };
    let generation = model
        .generate(&PROMPT, &params, |_| crate::model::generate::Flow::Continue)
        .unwrap();
    let short = [1u32, 70];
    let response2 = [71u32, 72, 73];
    let seqs = [
        Sequence {
            prompt: &PROMPT,
            response: &generation.token_ids,
        },
        Sequence {
            prompt: &short,
            response: &response2,
        },
    ];
    // Training's decoder (float, HF layout, composed ops) vs the serving path's
    // recorded log-probs: the same weights, so they must agree closely.
    let trainer = Trainer::new(&model.decoder, config(Objective::Rl, 1e-3), None).unwrap();
    let policy = trainer.policy().unwrap();
    let batched = score::response_logprobs(&policy, &seqs, 4096).unwrap();
    let batched0: Vec<f32> = batched[0].to_vec1().unwrap();
    let gap = max_diff(&batched0, &generation.logprobs);
    assert!(gap < 1e-4, "train vs serve log-probs differ by {gap}");
    let single: Vec<f32> = score::response_logprobs(&policy, &seqs[1..], 4096).unwrap()[0]
        .to_vec1()
        .unwrap();
    let padded: Vec<f32> = batched[1].to_vec1().unwrap();
    let d = max_diff(&single, &padded);
    // Only rounding may differ (GEMM blocking depends on the batch shape).
    assert!(
        d < 1e-4,
        "padding changed a score by {d}: {single:?} vs {padded:?}"
    );
    // The no-grad fused path agrees too.
    let fused = score::score(&policy, &seqs, 8).unwrap();
    assert!(max_diff(&fused[0], &batched0) < 1e-4);
}

#[test]
fn a_sequence_over_the_token_budget_runs_in_parts_with_the_same_values() {
    for (name, spec) in variants() {
        let model = tiny_model_of(&spec, WeightFormat::F32);
        let prompt: Vec<u32> = (0..40).map(|i| 10 + (i * 7) % 90).collect();
        let response: Vec<u32> = (120..130).collect();
        let seqs = [Sequence {
            prompt: &prompt,
            response: &response,
        }];
        let trainer = Trainer::new(&model.decoder, config(Objective::Rl, 1e-3), None).unwrap();
        randomize_b(trainer.adapter().unwrap());
        let policy = trainer.policy().unwrap();
        let values = |max_tokens: usize| -> Vec<f32> {
            score::response_logprobs(&policy, &seqs, max_tokens).unwrap()[0]
                .to_vec1()
                .unwrap()
        };
        let whole = values(4096);
        // 49 positions: 33 read into a cache in chunks of 16, 16 live; with a
        // budget under the response's 10 tokens, the response alone is live.
        for max_tokens in [16, 5] {
            let d = max_diff(&values(max_tokens), &whole);
            assert!(d < 1e-4, "{name}, budget {max_tokens}: parts differ by {d}");
        }
        // No-grad scoring reads everything through the cache, 16 at a time
        // (the last chunk a single token).
        let d = max_diff(&score::score(&policy, &seqs, 16).unwrap()[0], &whole);
        assert!(d < 1e-4, "{name}: chunked scoring differs by {d}");

        // The trainer under that budget: every adapter tensor still gets a
        // gradient (through the live positions).
        let batch = vec![TrainSample {
            sample_id: "long".into(),
            prompt_ids: prompt.clone(),
            response_ids: response.clone(),
            reward: Some(1.0),
            ..Default::default()
        }];
        let small_budget = TrainerConfig {
            micro_batch_tokens: 16,
            ..config(Objective::Rl, 1e-3)
        };
        let trainer = Trainer::new(&model.decoder, small_budget, None).unwrap();
        randomize_b(trainer.adapter().unwrap());
        let (grads, metrics) = trainer.gradients(&batch).unwrap();
        assert!(metrics.loss.is_finite(), "{name}: loss {}", metrics.loss);
        for (var_name, var) in trainer.named_vars() {
            let norm: f32 = grads
                .get(&var)
                .unwrap_or_else(|| panic!("{name} {var_name}: no gradient"))
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(
                norm.is_finite() && norm > 0.0,
                "{name} {var_name}: gradient norm {norm}"
            );
        }
    }
}

#[test]
fn every_lora_tensor_and_every_full_weight_gets_a_gradient() {
    for (name, spec) in variants() {
        eprintln!("{name}");
        every_tensor_gets_a_gradient_on(&tiny_model_of(&spec, WeightFormat::F32));
    }
}

fn every_tensor_gets_a_gradient_on(model: &Model) {
    let batch = vec![TrainSample {
        sample_id: "s".into(),
        prompt_ids: PROMPT.to_vec(),
        response_ids: vec![80, 81, 82, 2],
        reward: Some(1.0),
        ..Default::default()
    }];
    let trainer = Trainer::new(&model.decoder, config(Objective::Rl, 1e-3), None).unwrap();
    randomize_b(trainer.adapter().unwrap());
    let (grads, _) = trainer.gradients(&batch).unwrap();
    let vars = trainer.named_vars();
    assert_eq!(vars.len(), 2 * 7 * 2, "A and B on 7 linears in 2 layers");
    for (name, var) in vars {
        let g = grads
            .get(&var)
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(
            norm.is_finite() && norm > 0.0,
            "{name}: gradient norm {norm}"
        );
    }

    let full = TrainerConfig {
        lora: None,
        ..config(Objective::Sft, 1e-3)
    };
    let trainer = Trainer::new(&model.decoder, full, None).unwrap();
    let (grads, _) = trainer.gradients(&batch).unwrap();
    let vars = trainer.named_vars();
    let head_norms = if model.config.architecture.has_qk_norm() {
        2
    } else {
        0
    };
    let lm_head = usize::from(!model.decoder.tied_head());
    assert_eq!(
        vars.len(),
        1 + 2 * (2 + head_norms + 7) + 1 + lm_head,
        "embedding, norms, linears, untied head"
    );
    for (name, var) in vars {
        let g = grads
            .get(&var)
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(
            norm.is_finite() && norm > 0.0,
            "{name}: gradient norm {norm}"
        );
    }
}

#[test]
fn loss_gradient_matches_finite_differences() {
    for (name, spec) in variants() {
        eprintln!("{name}: LoRA");
        gradient_matches_finite_differences(&tiny_model_of(&spec, WeightFormat::F32), true);
    }
    // Full fine-tuning reaches the norms too, Qwen3's per-head q/k norms among them.
    eprintln!("qwen3: full");
    gradient_matches_finite_differences(
        &tiny_model_of(&TinySpec::qwen3(), WeightFormat::F32),
        false,
    );
}

fn gradient_matches_finite_differences(model: &Model, lora: bool) {
    let teacher = vec![-1.0f32, -2.0, -0.5, -3.0];
    let batch = vec![
        TrainSample {
            prompt_ids: PROMPT.to_vec(),
            response_ids: vec![80, 81, 82, 2],
            reward: Some(-1.0),
            teacher_logprobs: Some(teacher),
            ..Default::default()
        },
        TrainSample {
            prompt_ids: vec![1, 90],
            response_ids: vec![91, 92],
            reward: Some(1.0),
            ..Default::default()
        },
    ];
    let mut cfg = config(Objective::Rl, 1e-3);
    cfg.loss.beta_kl = 0.5;
    if !lora {
        cfg.lora = None;
    }
    let trainer = Trainer::new(&model.decoder, cfg, None).unwrap();
    if lora {
        randomize_b(trainer.adapter().unwrap());
    }
    let (grads, _) = trainer.gradients(&batch).unwrap();

    // The loss as a function of the weights, with logp_old held fixed (as in
    // the step, where old log-probs are constants).
    let seqs: Vec<Sequence> = batch
        .iter()
        .map(|s| Sequence {
            prompt: &s.prompt_ids,
            response: &s.response_ids,
        })
        .collect();
    let old = score::score(&trainer.frozen_policy().unwrap(), &seqs, 4096).unwrap();
    let reference = score::score(trainer.reference(), &seqs, 4096).unwrap();
    let loss_now = |trainer: &Trainer| -> f64 {
        let policy = trainer.policy().unwrap();
        let new = score::response_logprobs(&policy, &seqs, 4096).unwrap();
        let mut total = 0.0;
        for (i, s) in batch.iter().enumerate() {
            let signal = super::loss::SampleSignal {
                reward: s.reward,
                teacher: s.teacher_logprobs.as_deref(),
                old: &old[i],
                reference: Some(&reference[i]),
            };
            let (l, _) = super::loss::policy_loss(&trainer.config.loss, &new[i], &signal).unwrap();
            total += l.to_scalar::<f32>().unwrap() as f64 / batch.len() as f64;
        }
        total
    };
    let mut checked = 0;
    let vars = trainer.named_vars().into_iter().enumerate();
    for (_, (name, var)) in vars.filter(|(i, (name, _))| i % 5 == 0 || name.contains("_norm")) {
        let g: Vec<f32> = grads
            .get(&var)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // The coordinate with the largest gradient: the best signal over f32 noise.
        let (idx, &analytic) = g
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap();
        let original: Vec<f32> = var.flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-2f32;
        let at = |delta: f32| -> f64 {
            let mut v = original.clone();
            v[idx] += delta;
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            loss_now(&trainer)
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
        var.set(&Tensor::from_vec(original, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
        let err = (numeric - analytic as f64).abs() / (analytic.abs() as f64).max(1e-3);
        assert!(
            err < 0.05,
            "{name}[{idx}]: analytic {analytic}, numeric {numeric}"
        );
        checked += 1;
    }
    assert!(checked >= 5);
}

fn first_token_logprob(trainer: &Trainer, token: u32) -> f32 {
    let seqs = [Sequence {
        prompt: &PROMPT,
        response: &[token],
    }];
    score::score(&trainer.frozen_policy().unwrap(), &seqs, 4096).unwrap()[0][0]
}

#[test]
fn binary_rewards_raise_the_rewarded_token() {
    let model = tiny_model(WeightFormat::F32);
    let (good, bad) = (120u32, 121u32);
    let batch: Vec<TrainSample> = (0..8usize)
        .map(|i| {
            let first = if i.is_multiple_of(2) { good } else { bad };
            TrainSample {
                sample_id: format!("s{i}"),
                prompt_ids: PROMPT.to_vec(),
                response_ids: vec![first, 100 + i as u32, 2],
                reward: Some(if first == good { 1.0 } else { -1.0 }),
                ..Default::default()
            }
        })
        .collect();
    let mut trainer = Trainer::new(&model.decoder, config(Objective::Rl, 1e-2), None).unwrap();
    let (before_good, before_bad) = (
        first_token_logprob(&trainer, good),
        first_token_logprob(&trainer, bad),
    );
    for _ in 0..10 {
        trainer.step(&batch).unwrap();
    }
    let (after_good, after_bad) = (
        first_token_logprob(&trainer, good),
        first_token_logprob(&trainer, bad),
    );
    assert!(
        after_good > before_good + 0.5,
        "log p(good) {before_good} -> {after_good}"
    );
    assert!(
        after_bad < before_bad - 0.5,
        "log p(bad) {before_bad} -> {after_bad}"
    );
}

#[test]
fn several_updates_per_batch_move_further_within_the_clip() {
    let model = tiny_model(WeightFormat::F32);
    let (good, bad) = (120u32, 121u32);
    let batch: Vec<TrainSample> = [good, bad, good, bad]
        .iter()
        .enumerate()
        .map(|(i, &first)| TrainSample {
            sample_id: format!("s{i}"),
            prompt_ids: PROMPT.to_vec(),
            response_ids: vec![first, 2],
            reward: Some(if first == good { 1.0 } else { -1.0 }),
            ..Default::default()
        })
        .collect();
    let gain = |updates: usize| {
        let config = TrainerConfig {
            updates_per_batch: updates,
            ..config(Objective::Rl, 1e-2)
        };
        let mut trainer = Trainer::new(&model.decoder, config, None).unwrap();
        let before = first_token_logprob(&trainer, good);
        let metrics = trainer.step(&batch).unwrap();
        (first_token_logprob(&trainer, good) - before, metrics)
    };
    let (one, m1) = gain(1);
    let (four, m4) = gain(4);
    // Each update is a step (a policy version); the batch counts as fresh.
    assert_eq!((m1.step, m4.step), (1, 4));
    assert_eq!((m1.max_staleness, m4.max_staleness), (0, 0));
    assert!(four > one * 1.5, "one update {one}, four {four}");
    // The first update's ratio is 1; later ones are measured against it, and
    // the clip starts to hold some tokens back.
    assert_eq!(m1.clip_fraction, 0.0);
    assert!(m4.clip_fraction > 0.0, "{m4:?}");
}

/// Two accepted replies in a step of their own: the batch mean cancels them, the
/// recent baseline weighs them against the rejected step before.
#[test]
fn the_recent_baseline_remembers_earlier_steps_and_the_batch_mean_does_not() {
    let model = tiny_model(WeightFormat::F32);
    let samples = |reward: f32, first: u32| -> Vec<TrainSample> {
        (0..2)
            .map(|i| TrainSample {
                sample_id: format!("s{first}-{i}"),
                prompt_ids: PROMPT.to_vec(),
                response_ids: vec![first, 2],
                reward: Some(reward),
                ..Default::default()
            })
            .collect()
    };
    let accepted_step = |baseline: RewardBaseline| {
        let mut config = config(Objective::Rl, 1e-2);
        config.loss.reward_baseline = baseline;
        let mut trainer = Trainer::new(&model.decoder, config, None).unwrap();
        trainer.step(&samples(-1.0, 121)).unwrap();
        trainer.step(&samples(1.0, 120)).unwrap()
    };
    let batch_mean = accepted_step(RewardBaseline::BatchMean);
    assert_eq!(batch_mean.mean_reward, 1.0);
    assert_eq!(batch_mean.mean_abs_advantage, 0.0, "{batch_mean:?}");
    // Mean of (-1, -1, +1, +1) is 0: the accepted replies keep their +1.
    let recent = accepted_step(RewardBaseline::Recent);
    assert!((recent.mean_abs_advantage - 1.0).abs() < 1e-6, "{recent:?}");
}

#[test]
fn teacher_logprobs_pull_the_student_towards_the_teacher() {
    let model = tiny_model(WeightFormat::F32);
    let response = vec![130u32, 131, 132, 133];
    let seqs = [Sequence {
        prompt: &PROMPT,
        response: &response,
    }];
    let mut trainer = Trainer::new(&model.decoder, config(Objective::Rl, 1e-2), None).unwrap();
    let before = score::score(&trainer.frozen_policy().unwrap(), &seqs, 4096).unwrap()[0].clone();
    // The teacher is more confident in this continuation than the student.
    let teacher: Vec<f32> = before.iter().map(|l| (l + 2.0).min(-0.01)).collect();
    let batch = vec![TrainSample {
        prompt_ids: PROMPT.to_vec(),
        response_ids: response.clone(),
        teacher_logprobs: Some(teacher),
        ..Default::default()
    }];
    for _ in 0..10 {
        trainer.step(&batch).unwrap();
    }
    let after = score::score(&trainer.frozen_policy().unwrap(), &seqs, 4096).unwrap()[0].clone();
    let (b, a): (f32, f32) = (before.iter().sum(), after.iter().sum());
    assert!(a > b + 1.0, "response log-prob {b} -> {a}");
}

#[test]
fn a_teachers_top_k_teaches_a_token_the_student_did_not_sample() {
    // The student answered 130 at the first position; the teacher's top-2 there
    // puts 90% on 150 (never sampled). Only top-K distillation can move p(150).
    let model = tiny_model(WeightFormat::F32);
    let (sampled, wanted) = (130u32, 150u32);
    let response = vec![sampled, 131, 2];
    let uniform = || (vec![140u32, 141], vec![-0.7f32, -0.7]);
    let batch = vec![TrainSample {
        sample_id: "s".into(),
        prompt_ids: PROMPT.to_vec(),
        response_ids: response,
        teacher_topk: Some(vec![
            (vec![wanted, sampled], vec![0.9f32.ln(), 0.1f32.ln()]),
            uniform(),
            uniform(),
        ]),
        ..Default::default()
    }];
    let mut trainer = Trainer::new(&model.decoder, config(Objective::Rl, 1e-2), None).unwrap();
    let before = first_token_logprob(&trainer, wanted);
    for _ in 0..10 {
        trainer.step(&batch).unwrap();
    }
    let after = first_token_logprob(&trainer, wanted);
    assert!(after > before + 1.0, "log p(wanted) {before} -> {after}");

    // A top-K that does not line up with the response is refused, naming the sample.
    let mut bad = batch[0].clone();
    bad.teacher_topk.as_mut().unwrap().pop();
    let err = format!("{:#}", trainer.step(&[bad]).unwrap_err());
    assert!(err.contains("sample s") && err.contains("top-K"), "{err}");

    // With --w-topk 0 the same sample teaches nothing (no reward, no teacher gap).
    let mut cfg = config(Objective::Rl, 1e-2);
    cfg.loss.w_topk = 0.0;
    let mut trainer = Trainer::new(&model.decoder, cfg, None).unwrap();
    let before = first_token_logprob(&trainer, wanted);
    trainer.step(&batch).unwrap();
    assert_eq!(first_token_logprob(&trainer, wanted), before);
}

#[test]
fn zero_weights_change_nothing() {
    let model = tiny_model(WeightFormat::F32);
    let mut cfg = config(Objective::Rl, 1e-2);
    cfg.loss = LossConfig {
        w_rl: 0.0,
        w_opd: 0.0,
        beta_kl: 0.0,
        ..Default::default()
    };
    let response = vec![140u32, 141, 2];
    let batch = vec![TrainSample {
        prompt_ids: PROMPT.to_vec(),
        response_ids: response.clone(),
        reward: Some(1.0),
        teacher_logprobs: Some(vec![-0.1; 3]),
        ..Default::default()
    }];
    let seqs = [Sequence {
        prompt: &PROMPT,
        response: &response,
    }];
    let mut trainer = Trainer::new(&model.decoder, cfg, None).unwrap();
    let before = score::score(&trainer.frozen_policy().unwrap(), &seqs, 4096).unwrap();
    for _ in 0..3 {
        let m = trainer.step(&batch).unwrap();
        assert_eq!(m.grad_norm, 0.0);
    }
    let after = score::score(&trainer.frozen_policy().unwrap(), &seqs, 4096).unwrap();
    assert_eq!(before, after);
}

#[test]
fn sft_lowers_the_loss_and_full_finetuning_learns_too() {
    let model = tiny_model(WeightFormat::F32);
    let batch = vec![TrainSample {
        prompt_ids: PROMPT.to_vec(),
        response_ids: vec![150, 151, 152, 2],
        ..Default::default()
    }];
    for lora in [true, false] {
        let mut cfg = config(Objective::Sft, if lora { 1e-2 } else { 1e-3 });
        if !lora {
            cfg.lora = None;
        }
        let mut trainer = Trainer::new(&model.decoder, cfg, None).unwrap();
        let first = trainer.step(&batch).unwrap().loss;
        let mut last = first;
        for _ in 0..5 {
            last = trainer.step(&batch).unwrap().loss;
        }
        assert!(last < first * 0.8, "lora={lora}: loss {first} -> {last}");
    }
}

#[test]
fn a_saved_adapter_serves_on_the_packed_model_like_the_trainer_scores() {
    for (name, spec) in variants() {
        eprintln!("{name}");
        a_saved_adapter_serves_like_the_trainer_scores(&spec);
    }
}

fn a_saved_adapter_serves_like_the_trainer_scores(spec: &TinySpec) {
    let model = tiny_model_of(spec, WeightFormat::F32);
    let mut trainer = Trainer::new(&model.decoder, config(Objective::Rl, 1e-2), None).unwrap();
    randomize_b(trainer.adapter().unwrap());
    let batch = vec![TrainSample {
        prompt_ids: PROMPT.to_vec(),
        response_ids: vec![160, 161, 2],
        reward: Some(1.0),
        ..Default::default()
    }];
    trainer.step(&batch).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = super::checkpoint::CheckpointDir::create(dir.path()).unwrap();
    let path = ckpt
        .save(
            trainer.adapter().unwrap(),
            "tiny",
            1,
            None,
            Some(trainer.optimizer()),
        )
        .unwrap();
    assert_eq!(ckpt.latest().unwrap(), Some(path.clone()));
    let (loaded, file_config) = Adapter::load(&path, &Device::Cpu).unwrap();
    assert_eq!(file_config.claw_step, 1);
    assert_eq!(loaded.config, trainer.adapter().unwrap().config);

    // The serving model keeps GGUF's interleaved Q/K rows and packed weights;
    // the adapter is stored in the HF layout and must be permuted on load.
    let served = tiny_model_of(spec, WeightFormat::F32);
    let serving = loaded.apply_for_serving(&served.decoder).unwrap();
    let ids = [1u32, 104, 105, 106, 107];
    let trained = logits(&trainer.frozen_policy().unwrap(), &ids);
    let d = max_diff(&trained, &logits(&serving, &ids));
    assert!(d < 1e-4, "trainer vs serving logits differ by {d}");
    let base_d = max_diff(&trained, &logits(&served.decoder, &ids));
    assert!(base_d > 1e-3, "the adapter should change the logits");

    // The one-token decode step (plain vectors, fused layers) adds the deltas too.
    let packed = tiny_model_of(spec, WeightFormat::Packed);
    let serving = loaded.apply_for_serving(&packed.decoder).unwrap();
    let mut cache = KvCache::new();
    let prompt = Tensor::new(&ids[..4], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    serving.forward(&prompt, &mut cache).unwrap();
    let next = Tensor::new(&ids[4..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let step: Vec<f32> = serving
        .forward(&next, &mut cache)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let vocab = step.len();
    let d = max_diff(&step, &trained[trained.len() - vocab..]);
    // The packed decode step multiplies with 16-bit activations: ~1e-3 of the f32 logits.
    assert!(d < 5e-3, "decode step with adapter differs by {d}");

    // Resume restores the optimizer moments.
    let mut resumed =
        Trainer::new(&model.decoder, config(Objective::Rl, 1e-2), Some(loaded)).unwrap();
    assert!(super::checkpoint::load_optimizer_state(&path, resumed.optimizer_mut(), 1).unwrap());
    assert_eq!(resumed.steps(), 1);
}

#[test]
fn a_full_checkpoint_loads_back_as_the_same_model() {
    let model = tiny_model(WeightFormat::F32);
    let mut cfg = config(Objective::Sft, 1e-2);
    cfg.lora = None;
    let mut trainer = Trainer::new(&model.decoder, cfg, None).unwrap();
    let batch = vec![TrainSample {
        prompt_ids: PROMPT.to_vec(),
        response_ids: vec![150, 151, 2],
        ..Default::default()
    }];
    trainer.step(&batch).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = super::checkpoint::CheckpointDir::create(dir.path()).unwrap();
    let path = ckpt
        .save_full(&trainer.full_parameters().unwrap(), 1, None)
        .unwrap();
    let loaded = super::checkpoint::load_full_weights(&model.decoder, &path).unwrap();
    let ids = [1u32, 104, 105, 106];
    let d = max_diff(
        &logits(&trainer.frozen_policy().unwrap(), &ids),
        &logits(&loaded, &ids),
    );
    assert!(d < 1e-5, "reloaded full weights differ by {d}");
    assert!(max_diff(&logits(&model.decoder, &ids), &logits(&loaded, &ids)) > 1e-4);
    // A file for another architecture is refused with the tensor's name.
    let other = dir.path().join("other.safetensors");
    let t = Tensor::zeros((3, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("model.embed_tokens.weight", t)]),
        &other,
    )
    .unwrap();
    let err = super::checkpoint::load_full_weights(&model.decoder, &other).unwrap_err();
    assert!(
        format!("{err:#}").contains("model.embed_tokens.weight"),
        "{err:#}"
    );
}

/// `claw train --gguf`: each checkpoint also gets its GGUF LoRA, written before
/// `LATEST` moves and pruned with its checkpoint.
#[test]
fn checkpoints_with_gguf_write_and_prune_it() {
    use crate::adapter::gguf::{gguf_step, GgufBase};
    let model = tiny_model(WeightFormat::F32);
    let adapter = Adapter::new(
        &model.decoder.to_hf_layout().unwrap(),
        LoraConfig {
            rank: 2,
            alpha: 4.0,
            ..Default::default()
        },
        0,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = GgufBase::from_config(model.config.clone());
    let ckpt = super::checkpoint::CheckpointDir::create(dir.path())
        .unwrap()
        .with_gguf(base);
    for step in 1..=3 {
        ckpt.save(&adapter, "tiny", step, None, None).unwrap();
        let gguf = dir.path().join(format!("adapter-{step:06}.gguf"));
        assert_eq!(gguf_step(&gguf), Some(step), "{}", gguf.display());
    }
    assert_eq!(ckpt.prune(1).unwrap(), vec![1, 2]);
    assert!(!dir.path().join("adapter-000001.gguf").exists());
    assert!(dir.path().join("adapter-000003.gguf").exists());
}

#[test]
fn a_rewarded_retry_is_also_a_demonstration_for_the_first_prompt() {
    use super::data::{hindsight_sample, train_sample};
    use crate::rollout::RolloutRow;
    let model = tiny_model(WeightFormat::F32);
    let question = serde_json::json!({"role": "user", "content": "What is DNA?"});
    let retry = serde_json::json!([
        question,
        {"role": "assistant", "content": "A long answer about many things."},
        {"role": "user", "content": "Too long. Under 40 words, please."},
    ]);
    let row = |messages: &serde_json::Value, reward: Option<f32>| RolloutRow {
        sample_id: "s1".into(),
        messages_json: messages.to_string(),
        prompt_ids: vec![1, 2, 3],
        response_ids: vec![5, 6, 2],
        reward,
        teacher_logprobs: Some(vec![-0.1; 3]),
        ..Default::default()
    };
    let demo_of = |r: &RolloutRow| {
        let sample = train_sample(r, model.config.vocab_size).unwrap();
        hindsight_sample(&model, r, &sample).unwrap()
    };
    let demo = demo_of(&row(&retry, Some(1.0))).expect("a rewarded retry is a demonstration");
    let first = model
        .template
        .render(std::slice::from_ref(&question), None, true)
        .unwrap();
    assert_eq!(demo.prompt_ids, model.tokenizer.encode(&first).unwrap());
    assert_eq!(demo.response_ids, vec![5, 6, 2]);
    assert_eq!(demo.sample_id, "s1#hindsight");
    assert_eq!(demo.reward, Some(1.0));
    assert!(
        demo.teacher_logprobs.is_none(),
        "the hint was about the retry's context"
    );
    // Not rewarded, no correction before it, or answering a tool: no demonstration.
    assert!(demo_of(&row(&retry, Some(-1.0))).is_none());
    assert!(demo_of(&row(&retry, None)).is_none());
    assert!(demo_of(&row(&serde_json::json!([question]), Some(1.0))).is_none());
    let tool = serde_json::json!([
        question,
        {"role": "assistant", "content": "", "tool_calls": []},
        {"role": "tool", "content": "42", "tool_call_id": "1"},
    ]);
    assert!(demo_of(&row(&tool, Some(1.0))).is_none());
}

#[test]
fn a_hint_is_replayed_on_other_openings_with_the_policy_as_its_teacher() {
    use super::replay::{HintReplay, ReplayConfig, ReplaySource};
    use crate::distill::hints::teacher_messages;
    use crate::distill::{HintPlacement, TeacherWeights};
    use crate::rollout::RolloutRow;
    use std::sync::Arc;
    let model = Arc::new(tiny_model(WeightFormat::F32));
    let trainer = Trainer::new(&model.decoder, config(Objective::Rl, 1e-3), None).unwrap();
    // A trained adapter, so that the policy and the base model differ.
    randomize_b(trainer.adapter().unwrap());
    let system = serde_json::json!({"role": "system", "content": "Be helpful."});
    let ask = |q: &str| serde_json::json!({"role": "user", "content": q});
    let row = |messages: serde_json::Value, hint: Option<&str>| RolloutRow {
        sample_id: "s".into(),
        messages_json: messages.to_string(),
        hint: hint.map(str::to_string),
        ..Default::default()
    };
    // The opening is everything up to the first user message; later turns are not.
    let corrected = row(
        serde_json::json!([system, ask("What is DNA?"), {"role": "assistant", "content": "A molecule."}, ask("Shorter.")]),
        Some("That's too long."),
    );
    let source = ReplaySource::of(&corrected).unwrap().unwrap();
    assert_eq!(source.opening, vec![system.clone(), ask("What is DNA?")]);
    assert_eq!(source.hint.as_deref(), Some("That's too long."));
    assert!(ReplaySource::of(&row(serde_json::json!([system]), None))
        .unwrap()
        .is_none());
    assert!(ReplaySource::of(&row(serde_json::json!({"no": 1}), None)).is_err());

    let placement = HintPlacement::Before;
    let mut replay = HintReplay::new(
        ReplayConfig {
            per_hint: 2,
            placement,
            teacher: TeacherWeights::Policy,
            max_tokens: 6,
            temperature: 0.7,
            seed: 3,
        },
        model.clone(),
    );
    let sample_of = |r: &RolloutRow| TrainSample {
        sample_id: "hinted".into(),
        prompt_ids: PROMPT.to_vec(),
        response_ids: vec![5, 6],
        replay: ReplaySource::of(r).unwrap().map(Arc::new),
        ..Default::default()
    };
    let hinted = sample_of(&corrected);
    let questions = ["Name a planet.", "What is rain?", "Why is the sky blue?"];
    for q in questions {
        replay.remember(&Arc::new(
            ReplaySource::of(&row(serde_json::json!([system, ask(q)]), None))
                .unwrap()
                .unwrap(),
        ));
    }
    replay.remember(hinted.replay.as_ref().unwrap());
    replay.remember(hinted.replay.as_ref().unwrap());
    assert_eq!(replay.pool_len(), 4, "each distinct opening once");

    let made = replay
        .samples(&trainer, std::slice::from_ref(&hinted), 1024)
        .unwrap();
    assert_eq!(made.len(), 2);
    let render = |messages: &[serde_json::Value]| {
        let text = model.template.render(messages, None, true).unwrap();
        model.tokenizer.encode(&text).unwrap()
    };
    let policy = trainer.frozen_policy().unwrap();
    let mut prompts = Vec::new();
    for s in &made {
        let q = questions
            .iter()
            .find(|q| s.prompt_ids == render(&[system.clone(), ask(q)]))
            .expect("a replay answers another opening, never the hinted one");
        prompts.push(*q);
        assert!(!s.response_ids.is_empty() && s.response_ids.len() <= 6);
        assert_eq!(s.reward, None);
        assert!(s.sample_id.starts_with("hinted#replay"));
        // The teacher is the current policy reading the hint above the question.
        let teacher_prompt = render(
            &teacher_messages(&[system.clone(), ask(q)], "That's too long.", placement).unwrap(),
        );
        let expected = score::score(
            &policy,
            &[Sequence {
                prompt: &teacher_prompt,
                response: &s.response_ids,
            }],
            1024,
        )
        .unwrap();
        assert_eq!(s.teacher_logprobs.as_ref(), Some(&expected[0]));
    }
    assert_ne!(prompts[0], prompts[1], "two different openings");
    assert_eq!(replay.made, 2);

    // With --hint-replay-teacher base the base model reads the hint.
    let mut base_replay = HintReplay::new(
        ReplayConfig {
            teacher: TeacherWeights::Base,
            per_hint: 1,
            // Near-uniform sampling: tokens the tiny model does not favour, whose
            // log-probs differ between the base and the policy.
            temperature: 50.0,
            ..replay.config().clone()
        },
        model.clone(),
    );
    base_replay.remember(hinted.replay.as_ref().unwrap());
    base_replay.remember(&Arc::new(
        ReplaySource::of(&row(serde_json::json!([system, ask(questions[0])]), None))
            .unwrap()
            .unwrap(),
    ));
    let made = base_replay
        .samples(&trainer, std::slice::from_ref(&hinted), 1024)
        .unwrap();
    let teacher_prompt = render(
        &teacher_messages(
            &[system.clone(), ask(questions[0])],
            "That's too long.",
            placement,
        )
        .unwrap(),
    );
    let seq = [Sequence {
        prompt: &teacher_prompt,
        response: &made[0].response_ids,
    }];
    let base_scores = score::score(trainer.reference(), &seq, 1024).unwrap();
    let policy_scores = score::score(&policy, &seq, 1024).unwrap();
    assert_eq!(made[0].teacher_logprobs.as_ref(), Some(&base_scores[0]));
    assert_ne!(
        base_scores, policy_scores,
        "the adapter changes the teacher"
    );

    // No hint in the batch, or no room for a reply: nothing is made.
    let plain = sample_of(&row(serde_json::json!([ask("Hi")]), None));
    assert!(replay.samples(&trainer, &[plain], 1024).unwrap().is_empty());
    assert!(replay.samples(&trainer, &[hinted], 8).unwrap().is_empty());
}

#[test]
fn the_anchor_distills_the_base_model_onto_the_policys_answers_to_every_prompt_in_turn() {
    use super::anchor::{Anchor, AnchorConfig};
    use std::sync::Arc;
    let model = Arc::new(tiny_model(WeightFormat::F32));
    let trainer = Trainer::new(&model.decoder, config(Objective::Rl, 1e-3), None).unwrap();
    randomize_b(trainer.adapter().unwrap());
    let prompts: Vec<String> = ["What is 2 + 3?", "Name a river.", "What is 7 * 6?"]
        .map(String::from)
        .to_vec();
    let mut anchor = Anchor::new(
        AnchorConfig {
            per_step: 2,
            max_tokens: 5,
            temperature: 50.0,
            seed: 1,
            topk: 0,
        },
        model.clone(),
        &prompts,
    )
    .unwrap();
    let render = |p: &str| {
        let messages = [serde_json::json!({"role": "user", "content": p})];
        let text = model.template.render(&messages, None, true).unwrap();
        model.tokenizer.encode(&text).unwrap()
    };
    let policy = trainer.frozen_policy().unwrap();
    let mut asked = Vec::new();
    for _ in 0..3 {
        let made = anchor.samples(&trainer, 1024).unwrap();
        assert_eq!(made.len(), 2);
        for s in &made {
            let p = prompts
                .iter()
                .position(|p| s.prompt_ids == render(p))
                .expect("an anchor sample answers an anchor prompt as a lone user message");
            asked.push(p);
            assert!(!s.response_ids.is_empty() && s.response_ids.len() <= 5);
            assert_eq!(s.reward, None);
            assert!(s.replay.is_none());
            // The teacher is the base model, reading the same prompt (no hint).
            let seq = [Sequence {
                prompt: &s.prompt_ids,
                response: &s.response_ids,
            }];
            let base = score::score(trainer.reference(), &seq, 1024).unwrap();
            assert_eq!(s.teacher_logprobs.as_ref(), Some(&base[0]));
            let own = score::score(&policy, &seq, 1024).unwrap();
            assert_ne!(base[0], own[0], "the policy differs from its teacher");
        }
    }
    // Every prompt once before any repeats: 6 draws of 3 prompts are two passes.
    let mut first: Vec<usize> = asked[..3].to_vec();
    first.sort_unstable();
    assert_eq!(first, vec![0, 1, 2], "{asked:?}");
    let mut second: Vec<usize> = asked[3..].to_vec();
    second.sort_unstable();
    assert_eq!(second, vec![0, 1, 2], "{asked:?}");
    assert_eq!(anchor.made, 6);
    // No room left in the context: no sample rather than an empty one.
    let shortest = prompts.iter().map(|p| render(p).len()).min().unwrap();
    assert!(anchor.samples(&trainer, shortest).unwrap().is_empty());

    // --anchor-topk: the base model's top-K at every reply token as well.
    let mut topk = Anchor::new(
        AnchorConfig {
            per_step: 1,
            max_tokens: 5,
            temperature: 50.0,
            seed: 1,
            topk: 3,
        },
        model.clone(),
        &prompts,
    )
    .unwrap();
    let s = topk.samples(&trainer, 1024).unwrap().pop().unwrap();
    let seq = [Sequence {
        prompt: &s.prompt_ids,
        response: &s.response_ids,
    }];
    let (lps, expected) = score::score_with_topk(trainer.reference(), &seq, 3, 1024).unwrap();
    assert_eq!(s.teacher_logprobs.as_ref(), Some(&lps[0]));
    let got = s.teacher_topk.expect("top-K rows");
    assert_eq!(got.len(), s.response_ids.len());
    for ((ids, lps), (want_ids, want_lps)) in got.iter().zip(&expected[0]) {
        assert_eq!(ids.len(), 3);
        assert!(ids.iter().zip(want_ids).all(|(a, b)| *a as i32 == *b));
        assert_eq!(lps, want_lps);
    }
}

#[test]
fn an_auxiliary_sample_adds_to_the_rows_loss_instead_of_diluting_it() {
    let model = tiny_model(WeightFormat::F32);
    let trainer = Trainer::new(&model.decoder, config(Objective::Rl, 1e-3), None).unwrap();
    randomize_b(trainer.adapter().unwrap());
    let teacher = |response: &[u32]| {
        let seq = [Sequence {
            prompt: &PROMPT,
            response,
        }];
        let own = score::score(&trainer.frozen_policy().unwrap(), &seq, 4096).unwrap();
        own[0]
            .iter()
            .map(|l| (l + 1.0).min(-0.01))
            .collect::<Vec<f32>>()
    };
    let sample = |response: Vec<u32>, auxiliary: bool| TrainSample {
        prompt_ids: PROMPT.to_vec(),
        teacher_logprobs: Some(teacher(&response)),
        response_ids: response,
        auxiliary,
        ..Default::default()
    };
    let row = sample(vec![130, 131, 2], false);
    let extra = || sample(vec![140, 141, 142, 2], true);
    let loss = |batch: &[TrainSample]| trainer.gradients(batch).unwrap().1.loss;
    let (alone, extra_alone) = (loss(std::slice::from_ref(&row)), loss(&[extra()]));
    // The row keeps its full weight and the auxiliary sample's loss adds to it...
    let with = loss(&[row.clone(), extra()]);
    assert!(
        (with - (alone + extra_alone)).abs() < 1e-5,
        "{with} vs {alone} + {extra_alone}"
    );
    // ...where a second row would share the batch's weight with it.
    let two_rows = loss(&[
        row,
        TrainSample {
            auxiliary: false,
            ..extra()
        },
    ]);
    assert!(
        (two_rows - (alone + extra_alone) / 2.0).abs() < 1e-5,
        "{two_rows}"
    );
}

#[test]
fn an_auxiliary_reward_is_measured_against_the_rows_baseline_without_moving_it() {
    let model = tiny_model(WeightFormat::F32);
    for baseline in [RewardBaseline::BatchMean, RewardBaseline::Recent] {
        let mut cfg = config(Objective::Rl, 1e-3);
        cfg.loss.reward_baseline = baseline;
        let trainer = Trainer::new(&model.decoder, cfg, None).unwrap();
        let sample = |reward: f32, auxiliary: bool| TrainSample {
            prompt_ids: PROMPT.to_vec(),
            response_ids: vec![130, 131, 2],
            reward: Some(reward),
            auxiliary,
            ..Default::default()
        };
        // Rows +1 and -1: baseline 0, so every advantage is ±1, the replayed
        // accepted reply's too. Counted in the baseline, it would make them
        // 2/3, -4/3 and 2/3 (mean |A| 8/9).
        let batch = [sample(1.0, false), sample(-1.0, false), sample(1.0, true)];
        let metrics = trainer.gradients(&batch).unwrap().1;
        assert!(
            (metrics.mean_abs_advantage - 1.0).abs() < 1e-5,
            "{baseline:?}: {}",
            metrics.mean_abs_advantage
        );
        assert_eq!(metrics.mean_reward, 0.0, "the rows' mean only");
    }
}
