//! The training objectives (docs/ARCHITECTURE.md, "Training"), per sample (token mean).
//!
//! ```text
//! A_t     = w_rl * reward + w_opd * clip(teacher_t - old_t, -c, +c)
//! ratio_t = exp(new_t - old_t)
//! L_pg    = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1-eps_low, 1+eps_high))
//! L       = L_pg + beta * mean_t k3(new_t, ref_t),   k3 = exp(ref-new) - (ref-new) - 1
//! ```
//! Advantages, old and reference log-probs are constants (no gradient); only the
//! new log-probs carry the graph.

use anyhow::Result;
use candle_core::{Device, Tensor};
use serde::Serialize;

/// Coefficients of the policy loss.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LossConfig {
    pub w_rl: f32,
    pub w_opd: f32,
    /// Clip of the teacher gap (teacher - old) per token.
    pub teacher_clip: f32,
    pub eps_low: f32,
    pub eps_high: f32,
    pub beta_kl: f32,
    /// What the reward is measured against before it enters the advantage.
    pub reward_baseline: RewardBaseline,
    /// Weight of the top-K distillation term, for samples that carry the
    /// teacher's top-K distribution (`claw distill-hints --topk K`).
    pub w_topk: f32,
}

/// The baseline subtracted from each sample's reward (variance reduction).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RewardBaseline {
    /// The reward as judged (OpenClaw-RL's binary RL: A = r).
    #[default]
    None,
    /// The mean reward of the step's batch (A = r − mean r, as GRPO and RLOO
    /// do within a group): a batch whose rewards are all −1 no longer pushes
    /// down every sampled token, which on a small model degrades the answers
    /// themselves; only the contrast between replies teaches.
    BatchMean,
    /// The mean of the last 32 judged rewards this trainer has seen, the
    /// batch's own included (REINFORCE's running baseline). With small
    /// batches the batch mean cancels a batch whose rewards agree: two accepted
    /// replies in a batch of two teach nothing. This baseline still contrasts
    /// them with the rejected replies of the batches before. It starts as the
    /// batch mean (the first batch is all it has seen) and starts again when
    /// `claw train` restarts.
    Recent,
}

/// How many judged rewards the `recent` baseline averages.
pub const RECENT_REWARDS: usize = 32;

/// The judged rewards a trainer saw last, newest at the back.
#[derive(Debug, Clone, Default)]
pub struct RecentRewards(std::collections::VecDeque<f32>);

impl RecentRewards {
    /// Adds a batch's judged rewards, forgetting the oldest beyond the window.
    pub fn push(&mut self, rewards: &[Option<f32>]) {
        for r in rewards.iter().flatten() {
            if self.0.len() == RECENT_REWARDS {
                self.0.pop_front();
            }
            self.0.push_back(*r);
        }
    }

    pub fn mean(&self) -> f32 {
        self.0.iter().sum::<f32>() / self.0.len().max(1) as f32
    }
}

impl RewardBaseline {
    /// The name `--reward-baseline` takes.
    pub fn name(self) -> &'static str {
        match self {
            RewardBaseline::None => "none",
            RewardBaseline::BatchMean => "batch-mean",
            RewardBaseline::Recent => "recent",
        }
    }

    /// The rewards of a batch, measured against this baseline (`None` stays
    /// `None`: a sample without a reward). `recent` already holds the batch's
    /// own rewards (only [`RewardBaseline::Recent`] reads it).
    pub fn apply(self, rewards: &[Option<f32>], recent: &RecentRewards) -> Vec<Option<f32>> {
        self.apply_to(rewards, rewards, recent)
    }

    /// `rewards` measured against the baseline of `rows`, the batch's input
    /// rows: samples training adds itself (self-imitation's replays) are
    /// measured as the rows are but do not move the baseline.
    pub fn apply_to(
        self,
        rewards: &[Option<f32>],
        rows: &[Option<f32>],
        recent: &RecentRewards,
    ) -> Vec<Option<f32>> {
        let mean = match self {
            RewardBaseline::None => return rewards.to_vec(),
            RewardBaseline::BatchMean => {
                // Every judged reward of the batch, however large (the recent
                // window holds only the last RECENT_REWARDS).
                let judged: Vec<f32> = rows.iter().flatten().copied().collect();
                judged.iter().sum::<f32>() / judged.len().max(1) as f32
            }
            RewardBaseline::Recent => recent.mean(),
        };
        rewards.iter().map(|r| r.map(|r| r - mean)).collect()
    }
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            w_rl: 1.0,
            w_opd: 1.0,
            teacher_clip: 1.0,
            eps_low: 0.2,
            eps_high: 0.28,
            beta_kl: 0.0,
            reward_baseline: RewardBaseline::None,
            w_topk: 1.0,
        }
    }
}

/// What one sample brings to the loss besides its new log-probs.
#[derive(Debug, Clone, Copy)]
pub struct SampleSignal<'a> {
    pub reward: Option<f32>,
    pub teacher: Option<&'a [f32]>,
    /// Log-probs under the policy before this step.
    pub old: &'a [f32],
    /// Log-probs under the reference (needed only when beta_kl > 0).
    pub reference: Option<&'a [f32]>,
}

/// Per-sample statistics (token means), for the step metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct SampleStats {
    pub pg_loss: f32,
    pub kl: f32,
    pub mean_abs_advantage: f32,
    pub clip_fraction: f32,
}

/// Per-token advantages of one sample.
pub fn advantages(cfg: &LossConfig, signal: &SampleSignal) -> Vec<f32> {
    let base = cfg.w_rl * signal.reward.unwrap_or(0.0);
    (0..signal.old.len())
        .map(|t| {
            let opd = match signal.teacher {
                Some(teacher) => {
                    (teacher[t] - signal.old[t]).clamp(-cfg.teacher_clip, cfg.teacher_clip)
                }
                None => 0.0,
            };
            base + cfg.w_opd * opd
        })
        .collect()
}

/// The policy loss of one sample (a scalar tensor with the graph of `new`) and
/// its statistics.
pub fn policy_loss(
    cfg: &LossConfig,
    new: &Tensor,
    signal: &SampleSignal,
) -> Result<(Tensor, SampleStats)> {
    let len = signal.old.len();
    anyhow::ensure!(
        new.dims1()? == len,
        "new log-probs have {} tokens, old ones {len}",
        new.dims1()?
    );
    if let Some(teacher) = signal.teacher {
        anyhow::ensure!(
            teacher.len() == len,
            "teacher log-probs have {} tokens, the response {len}",
            teacher.len()
        );
    }
    let device = new.device();
    let adv = advantages(cfg, signal);
    let adv_t = Tensor::from_slice(&adv, len, device)?;
    let old_t = Tensor::from_slice(signal.old, len, device)?;
    let ratio = (new - &old_t)?.exp()?;
    let clipped = ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)?;
    let neg_adv = adv_t.neg()?;
    let unclipped_obj = (&neg_adv * &ratio)?;
    let clipped_obj = (&neg_adv * &clipped)?;
    let pg = unclipped_obj.maximum(&clipped_obj)?.mean_all()?;

    let ratio_v: Vec<f32> = ratio.to_vec1()?;
    let clipped_tokens = ratio_v
        .iter()
        .zip(&adv)
        .filter(|(r, a)| {
            let c = r.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high);
            -*a * c > -*a * **r
        })
        .count();
    let mut stats = SampleStats {
        pg_loss: pg.to_scalar()?,
        kl: 0.0,
        mean_abs_advantage: adv.iter().map(|a| a.abs()).sum::<f32>() / len.max(1) as f32,
        clip_fraction: clipped_tokens as f32 / len.max(1) as f32,
    };
    let loss = match (cfg.beta_kl > 0.0, signal.reference) {
        (true, Some(reference)) => {
            let k3 = k3(new, &Tensor::from_slice(reference, len, device)?)?.mean_all()?;
            stats.kl = k3.to_scalar()?;
            (pg + (k3 * cfg.beta_kl as f64)?)?
        }
        (true, None) => anyhow::bail!("beta_kl > 0 needs reference log-probs"),
        (false, _) => pg,
    };
    Ok((loss, stats))
}

/// k3 = exp(ref - new) - (ref - new) - 1, per token: an unbiased, non-negative
/// estimate of KL(new || ref).
pub fn k3(new: &Tensor, reference: &Tensor) -> Result<Tensor> {
    let d = (reference - new)?;
    Ok(((d.exp()? - &d)? - 1.0)?)
}

/// Top-K distillation (OpenClaw-RL's `--distill-topk`): per response token, the
/// KL from the teacher's top-K distribution (renormalised over its K ids) to the
/// student, mean over tokens:
///
/// ```text
/// q_k = softmax_k(teacher_k)      L = mean_t Σ_k q_k (log q_k − student_k)
/// ```
///
/// `student` is (tokens, K): the student's log-probs of the teacher's ids. Unlike
/// the teacher gap on the sampled token, this teaches tokens the student did not
/// sample (a question where it stopped, a full stop where it went on).
pub fn topk_distill_loss(student: &Tensor, teacher: &[Vec<f32>]) -> Result<Tensor> {
    let (tokens, k) = student.dims2()?;
    anyhow::ensure!(
        teacher.len() == tokens && teacher.iter().all(|row| row.len() == k),
        "teacher top-K is {} rows for a student of {tokens} x {k}",
        teacher.len()
    );
    let mut q = Vec::with_capacity(tokens * k);
    let mut entropy_term = 0f64;
    for row in teacher {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = row.iter().map(|l| (l - max).exp()).sum();
        for l in row {
            let p = (l - max).exp() / sum;
            q.push(p);
            if p > 0.0 {
                entropy_term += f64::from(p) * f64::from(p.ln());
            }
        }
    }
    let q = Tensor::from_vec(q, (tokens, k), student.device())?;
    let cross = (q * student)?.sum_all()?.neg()?;
    Ok(((cross + entropy_term)? / tokens.max(1) as f64)?)
}

/// Negative mean log-likelihood of the response: the SFT and LM objectives.
pub fn nll_loss(new: &Tensor) -> Result<Tensor> {
    Ok(new.mean_all()?.neg()?)
}

/// A scalar zero on `device` (a sum's starting point).
pub fn zero(device: &Device) -> Result<Tensor> {
    Ok(Tensor::new(0f32, device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loss_of(cfg: &LossConfig, new: &[f32], signal: &SampleSignal) -> (f32, SampleStats) {
        let new = Tensor::from_slice(new, new.len(), &Device::Cpu).unwrap();
        let (loss, stats) = policy_loss(cfg, &new, signal).unwrap();
        (loss.to_scalar().unwrap(), stats)
    }

    #[test]
    fn advantage_mixes_reward_and_clipped_teacher_gap() {
        let cfg = LossConfig::default();
        let old = [-1.0, -1.0, -1.0];
        let teacher = [-0.5, -4.0, -1.0];
        let signal = SampleSignal {
            reward: Some(-1.0),
            teacher: Some(&teacher),
            old: &old,
            reference: None,
        };
        // -1 + clip(0.5), -1 + clip(-3 -> -1), -1 + 0
        assert_eq!(advantages(&cfg, &signal), vec![-0.5, -2.0, -1.0]);
    }

    #[test]
    fn at_ratio_one_the_loss_is_minus_the_mean_advantage() {
        let cfg = LossConfig::default();
        let old = [-2.0, -1.0];
        let signal = SampleSignal {
            reward: Some(1.0),
            teacher: None,
            old: &old,
            reference: None,
        };
        let (loss, stats) = loss_of(&cfg, &old, &signal);
        assert!((loss + 1.0).abs() < 1e-6);
        assert_eq!(stats.clip_fraction, 0.0);
    }

    #[test]
    fn ratio_is_clipped_asymmetrically() {
        let cfg = LossConfig::default();
        let old = [-1.0f32];
        // ratio e^0.5 = 1.65 with a positive advantage: clipped at 1.28.
        let new = [-0.5];
        let signal = SampleSignal {
            reward: Some(1.0),
            teacher: None,
            old: &old,
            reference: None,
        };
        let (loss, stats) = loss_of(&cfg, &new, &signal);
        assert!((loss + 1.28).abs() < 1e-5, "{loss}");
        assert_eq!(stats.clip_fraction, 1.0);
        // With a negative advantage the large ratio is not clipped (pessimistic bound).
        let neg = SampleSignal {
            reward: Some(-1.0),
            ..signal
        };
        let (loss, stats) = loss_of(&cfg, &new, &neg);
        assert!((loss - 0.5f32.exp()).abs() < 1e-5, "{loss}");
        assert_eq!(stats.clip_fraction, 0.0);
        // A small ratio with a negative advantage is clipped at 1 - 0.2.
        let (loss, _) = loss_of(&cfg, &[-2.0], &neg);
        assert!((loss - 0.8).abs() < 1e-5, "{loss}");
    }

    #[test]
    fn batch_mean_baseline_keeps_only_the_contrast() {
        let none = RecentRewards::default();
        let rewards = [Some(-1.0), Some(-1.0), Some(1.0), None, Some(-1.0)];
        assert_eq!(
            RewardBaseline::None.apply(&rewards, &none),
            rewards.to_vec()
        );
        assert_eq!(
            RewardBaseline::BatchMean.apply(&rewards, &none),
            vec![Some(-0.5), Some(-0.5), Some(1.5), None, Some(-0.5)]
        );
        // All alike: no reward signal left (the teacher gap may still teach).
        let same = [Some(-1.0); 4];
        assert!(RewardBaseline::BatchMean
            .apply(&same, &none)
            .iter()
            .all(|r| *r == Some(0.0)));
    }

    #[test]
    fn recent_baseline_contrasts_a_batch_with_the_ones_before() {
        let mut recent = RecentRewards::default();
        let rejected = [Some(-1.0), Some(-1.0)];
        recent.push(&rejected);
        // The first batch is all it has seen: the batch mean.
        assert_eq!(
            RewardBaseline::Recent.apply(&rejected, &recent),
            vec![Some(0.0), Some(0.0)]
        );
        recent.push(&rejected);
        let accepted = [Some(1.0), None, Some(1.0)];
        recent.push(&accepted);
        // Two accepted replies after four rejected ones: the mean is -1/3, and
        // they are pushed up where the batch mean would cancel them.
        let adv = RewardBaseline::Recent.apply(&accepted, &recent);
        assert!((adv[0].unwrap() - 4.0 / 3.0).abs() < 1e-6, "{adv:?}");
        assert_eq!(adv[1], None);
        assert_eq!(
            RewardBaseline::BatchMean.apply(&accepted, &recent),
            vec![Some(0.0), None, Some(0.0)]
        );
        // The window forgets: after RECENT_REWARDS accepted replies the
        // rejected ones are gone.
        for _ in 0..RECENT_REWARDS {
            recent.push(&[Some(1.0)]);
        }
        assert_eq!(recent.mean(), 1.0);
    }

    #[test]
    fn topk_loss_is_zero_at_the_teacher_and_pulls_towards_it() {
        // Teacher top-2 at two tokens: probabilities (0.75, 0.25) and (0.5, 0.5).
        let teacher = vec![vec![0.75f32.ln(), 0.25f32.ln()], vec![-3.0, -3.0]];
        let at = |rows: [[f32; 2]; 2]| {
            let flat: Vec<f32> = rows.iter().flatten().copied().collect();
            candle_core::Var::from_vec(flat, (2, 2), &Device::Cpu).unwrap()
        };
        let same = at([[0.75f32.ln(), 0.25f32.ln()], [0.5f32.ln(), 0.5f32.ln()]]);
        let l: f32 = topk_distill_loss(same.as_tensor(), &teacher)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(l.abs() < 1e-6, "{l}");
        // Away from it the loss is positive and its gradient is −q/tokens.
        let off = at([[-3.0, -0.1], [-1.0, -1.0]]);
        let loss = topk_distill_loss(off.as_tensor(), &teacher).unwrap();
        assert!(loss.to_scalar::<f32>().unwrap() > 0.1);
        let g: Vec<f32> = loss
            .backward()
            .unwrap()
            .get(off.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (got, want) in g.iter().zip([-0.375f32, -0.125, -0.25, -0.25]) {
            assert!((got - want).abs() < 1e-6, "{g:?}");
        }
        // Shapes must agree.
        assert!(topk_distill_loss(off.as_tensor(), &teacher[..1]).is_err());
    }

    #[test]
    fn baseline_names_are_the_cli_names() {
        use clap::ValueEnum;
        for b in RewardBaseline::value_variants() {
            assert_eq!(b.to_possible_value().unwrap().get_name(), b.name());
        }
    }

    #[test]
    fn k3_is_zero_at_equality_and_positive_elsewhere() {
        let a = Tensor::new(&[-1.0f32, -2.0], &Device::Cpu).unwrap();
        let b = Tensor::new(&[-1.0f32, -1.0], &Device::Cpu).unwrap();
        let v: Vec<f32> = k3(&a, &b).unwrap().to_vec1().unwrap();
        assert_eq!(v[0], 0.0);
        assert!(v[1] > 0.0);
    }
}
