//! Training on candle (docs/ARCHITECTURE.md, "Hindsight hints and distillation",
//! "Training" and "Model runtime"): the two learning signals (binary RL rewards and
//! on-policy distillation from hindsight hints) turned into LoRA or full-weight
//! updates. The teacher-forced log-probs it trains on come from
//! [`crate::model::score`].
//!
//! - [`loss`]: the clipped policy-gradient loss with teacher advantages and k3 KL.
//! - [`optim`]: AdamW with accumulation and grad-norm clipping.
//! - [`trainer`]: one step over a batch.
//! - [`driver`]: the loop around it: batching, skips, checkpoints and metrics.
//! - [`data`]: rollout rows and text files as samples, the held-out loss.
//! - [`run`]: one `claw train` run: model, trainer or resume, epochs.
//! - [`replay`]: `--hint-replay`: a standing preference's hint distilled on other
//!   prompts the user opened sessions with.
//! - [`anchor`]: `--anchor`: the base model's answers kept on a fixed set of
//!   prompts (maths, facts) while a style is learned.
//! - [`imitation`]: `--self-imitation`: accepted replies of earlier steps trained
//!   again.
//! - [`checkpoint`]: atomic adapter checkpoints, `LATEST`, keep-last-K, resume.
//!
//! The LoRA adapters it trains, their file format and the checkpoint layout are
//! [`crate::adapter`], shared with `serve`.
//! - [`init`]: a new model from a JSON config (`--init`), trained from scratch.

pub mod anchor;
pub mod checkpoint;
pub mod data;
pub mod driver;
pub mod imitation;
pub mod init;
pub mod loss;
pub mod optim;
pub mod replay;
pub mod run;
pub mod trainer;

pub use loss::{LossConfig, RewardBaseline};
pub use trainer::{Objective, StepMetrics, TrainSample, Trainer, TrainerConfig};

#[cfg(test)]
mod tests;
