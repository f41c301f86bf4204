//! The decoder: token embedding, N blocks of (RMSNorm → GQA attention with RoPE →
//! residual, RMSNorm → SwiGLU MLP → residual), final RMSNorm and LM head. Qwen3
//! adds an RMSNorm on each head of q and k before RoPE; Llama 3.1+ scales RoPE's
//! frequencies (`rope_freqs.weight` or the config's [`RopeScaling`]).
//!
//! One implementation serves and trains. [`Kernels::Fused`] uses candle's fast
//! fused kernels (rms_norm, rope, softmax_last_dim), which have no backward;
//! [`Kernels::Differentiable`] computes the same math with ops that have one,
//! for the training path (docs/ARCHITECTURE.md, "Model runtime", lists the ops without backward):
//! claw's own fused ops with written-out gradients ([`super::ops`], and the
//! whole attention as [`super::attention::CausalAttention`]).
//!
//! The residual connection is the config's [`Residual`]: the standard running
//! sum, or Attention Residuals ([`super::attnres`]), where each sublayer reads a
//! learned softmax mix over depth of the embedding and earlier sublayer outputs.

mod cache;
mod step;

use std::io::{Read, Seek};

use anyhow::{Context, Result};
use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::attnres::{self, DepthAttention};
use super::config::{Architecture, ModelConfig, Residual, RopeScaling};
use super::linear::Linear;
pub use cache::KvCache;

/// Which implementation of the non-matmul ops to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Fastest; no gradients flow through norms, RoPE or softmax.
    Fused,
    /// Composed ops only, so every parameter receives a gradient.
    Differentiable,
}

/// How RoPE pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs (2i, 2i+1): llama-arch GGUFs store Q/K permuted for this layout.
    Interleaved,
    /// Pairs (i, i + d/2): the Hugging Face / NeoX layout (Qwen2 GGUFs, float checkpoints).
    Halves,
}

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    /// The same weight as a plain vector, for the decode step.
    weight_vec: Vec<f32>,
    eps: f64,
}

impl RmsNorm {
    fn new(weight: Tensor, eps: f64) -> Result<Self> {
        let weight_vec = weight.to_vec1()?;
        Ok(Self {
            weight,
            weight_vec,
            eps,
        })
    }

    /// The fused kernel's arithmetic on one vector.
    fn forward_vec(&self, x: &[f32]) -> Vec<f32> {
        let mut out = x.to_vec();
        self.forward_in_place(&mut out);
        out
    }

    fn forward_in_place(&self, x: &mut [f32]) {
        let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        let inv = 1.0 / (mean_sq + self.eps as f32).sqrt();
        x.iter_mut()
            .zip(&self.weight_vec)
            .for_each(|(v, w)| *v = *v * inv * w);
    }

    /// Normalizes each weight-sized chunk of `x` (every head of a q or k row).
    fn forward_heads_vec(&self, x: &mut [f32]) {
        for head in x.chunks_exact_mut(self.weight_vec.len()) {
            self.forward_in_place(head);
        }
    }

    /// `x`: (batch, seq, heads·dim) → the same, each head normalized.
    fn forward_heads(&self, x: &Tensor, kernels: Kernels) -> candle_core::Result<Tensor> {
        let (b, t, width) = x.dims3()?;
        let dim = self.weight_vec.len();
        let heads = x.reshape((b, t, width / dim, dim))?;
        self.forward(&heads, kernels)?.reshape((b, t, width))
    }
}

impl RmsNorm {
    fn forward(&self, x: &Tensor, kernels: Kernels) -> candle_core::Result<Tensor> {
        match kernels {
            Kernels::Fused => candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32),
            Kernels::Differentiable => x.contiguous()?.apply_op2(
                &self.weight,
                super::ops::RmsNormOp {
                    eps: self.eps as f32,
                },
            ),
        }
    }
}

#[derive(Debug, Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// cos/sin again as (positions, head_dim / 2) vectors, for the decode step
    /// and the differentiable op.
    cos_vec: std::sync::Arc<Vec<f32>>,
    sin_vec: std::sync::Arc<Vec<f32>>,
    half: usize,
    layout: RopeLayout,
}

impl Rope {
    /// `freq_divisors`: a GGUF's `rope_freqs.weight` (one divisor per frequency,
    /// llama.cpp's form of Llama 3's scaling), which replaces the config's
    /// llama3 scaling; a linear scaling still applies on top, as in llama.cpp.
    fn new(
        cfg: &ModelConfig,
        layout: RopeLayout,
        freq_divisors: Option<&[f32]>,
        device: &Device,
    ) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let mut divisors = match (freq_divisors, &cfg.rope_scaling) {
            (Some(d), _) => d.to_vec(),
            (None, Some(scaling)) => scaling.divisors(cfg.head_dim, cfg.rope_theta),
            (None, None) => vec![1.0; half],
        };
        if let (Some(_), Some(RopeScaling::Linear { factor })) = (freq_divisors, &cfg.rope_scaling)
        {
            divisors.iter_mut().for_each(|d| *d *= factor);
        }
        anyhow::ensure!(
            divisors.len() == half && divisors.iter().all(|d| d.is_finite() && *d > 0.0),
            "RoPE frequency divisors must be {half} positive numbers (head_dim {}), got {}",
            cfg.head_dim,
            divisors.len()
        );
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f32 / cfg.head_dim as f32) / divisors[i])
            .collect();
        let positions = Tensor::arange(0u32, cfg.context_length as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((cfg.context_length, 1))?;
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let angles = positions.matmul(&inv_freq)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        Ok(Self {
            cos_vec: std::sync::Arc::new(cos.flatten_all()?.to_vec1()?),
            sin_vec: std::sync::Arc::new(sin.flatten_all()?.to_vec1()?),
            cos,
            sin,
            half,
            layout,
        })
    }

    /// Rotates each `dim`-sized head of `x` in place for position `pos`, with the
    /// same formula as candle's `rope_i` / `rope` kernels.
    fn apply_vec(&self, x: &mut [f32], pos: usize, dim: usize) {
        let cos = &self.cos_vec[pos * self.half..(pos + 1) * self.half];
        let sin = &self.sin_vec[pos * self.half..(pos + 1) * self.half];
        for head in x.chunks_exact_mut(dim) {
            for i in 0..self.half {
                let (a, b) = match self.layout {
                    RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                    RopeLayout::Halves => (i, i + self.half),
                };
                let (x1, x2) = (head[a], head[b]);
                head[a] = x1 * cos[i] - x2 * sin[i];
                head[b] = x1 * sin[i] + x2 * cos[i];
            }
        }
    }

    /// `x`: (batch, heads, seq, head_dim), contiguous; positions start at `offset`.
    fn apply(&self, x: &Tensor, offset: usize, kernels: Kernels) -> candle_core::Result<Tensor> {
        let seq = x.dim(2)?;
        let cos = self.cos.narrow(0, offset, seq)?;
        let sin = self.sin.narrow(0, offset, seq)?;
        use candle_nn::rotary_emb as re;
        match (self.layout, kernels) {
            (RopeLayout::Interleaved, Kernels::Fused) => re::rope_i(x, &cos, &sin),
            (RopeLayout::Halves, Kernels::Fused) => re::rope(x, &cos, &sin),
            (layout, Kernels::Differentiable) => x.contiguous()?.apply_op1(super::ops::RopeOp {
                cos: self.cos_vec.clone(),
                sin: self.sin_vec.clone(),
                offset,
                interleaved: layout == RopeLayout::Interleaved,
            }),
        }
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// Qwen3: RMSNorm of each head of q and of k (weights of head_dim), before RoPE.
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    /// q, k and v stacked into one packed matrix (packed weights only).
    qkv: Option<Linear>,
}

impl Attention {
    /// The head norms present, by their Hugging Face names.
    fn head_norms(&self) -> impl Iterator<Item = (&'static str, &RmsNorm)> {
        [("q_norm", &self.q_norm), ("k_norm", &self.k_norm)]
            .into_iter()
            .filter_map(|(name, n)| n.as_ref().map(|n| (name, n)))
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
    /// gate and up stacked into one packed matrix (packed weights only).
    gate_up: Option<Linear>,
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    mlp_norm: RmsNorm,
    mlp: Mlp,
}

/// One AttnRes aggregation: the sublayer's own zero-initialised query w and
/// key RMSNorm gain g.
#[derive(Debug, Clone)]
struct DepthOp {
    query: Tensor,
    gain: Tensor,
    /// u = w ⊙ g as a plain vector (the score is r·(u·v)), for the decode step.
    u: Vec<f32>,
    eps: f64,
}

impl DepthOp {
    fn new(query: Tensor, gain: Tensor, eps: f64) -> Result<Self> {
        let (w, g): (Vec<f32>, Vec<f32>) = (query.to_vec1()?, gain.to_vec1()?);
        anyhow::ensure!(w.len() == g.len(), "AttnRes query and norm sizes differ");
        let u = w.iter().zip(&g).map(|(a, b)| a * b).collect();
        Ok(Self {
            query,
            gain,
            u,
            eps,
        })
    }

    /// Σ α_i v_i over `sources`, each (batch, seq, d). One source is itself
    /// (its weight is exactly 1). With `alphas`, also appends the mean weight
    /// of each source over all tokens.
    fn forward(&self, sources: &[&Tensor], alphas: Option<&mut Vec<Vec<f32>>>) -> Result<Tensor> {
        let (b, t, d) = sources[0].dims3()?;
        if sources.len() == 1 {
            if let Some(alphas) = alphas {
                alphas.push(vec![1.0]);
            }
            return Ok(sources[0].clone());
        }
        let n = sources.len();
        let v = Tensor::stack(sources, 2)?.reshape((b * t, n, d))?;
        if let Some(alphas) = alphas {
            let flat: Vec<f32> = v.flatten_all()?.to_vec1()?;
            let mut mean = vec![0f32; n];
            for row in flat.chunks_exact(n * d) {
                for (m, a) in
                    mean.iter_mut()
                        .zip(attnres::depth_weights(row, &self.u, self.eps as f32))
                {
                    *m += a / (b * t) as f32;
                }
            }
            alphas.push(mean);
        }
        let h = v.apply_op3(
            &self.query,
            &self.gain,
            DepthAttention {
                eps: self.eps as f32,
            },
        )?;
        Ok(h.reshape((b, t, d))?)
    }
}

/// Per-depth diagnostics of one forward pass (the AttnRes study): magnitudes
/// and routing weights, each averaged over all tokens.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DepthTrace {
    /// RMS of each sublayer's input before its PreNorm: the running sum for
    /// the standard residual, the depth-attention mix for AttnRes.
    pub input_rms: Vec<f32>,
    /// RMS of each sublayer's raw output f_l(h_l).
    pub output_rms: Vec<f32>,
    /// AttnRes only: per sublayer (the first included, with its single
    /// source), then the final readout, the mean weight of each source.
    pub alphas: Vec<Vec<f32>>,
}

fn rms(t: &Tensor) -> Result<f32> {
    Ok(t.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()?)
}

/// The AttnRes sources of the tensor path while the sublayers run.
enum Sources {
    /// Embedding, then every sublayer output.
    Full(Vec<Tensor>),
    /// Embedding and finished block sums; the current block's partial sum.
    Block {
        size: usize,
        blocks: Vec<Tensor>,
        partial: Option<Tensor>,
    },
}

impl Sources {
    fn new(residual: Residual, embedding: Tensor) -> Self {
        match residual {
            Residual::Block { size } => Sources::Block {
                size,
                blocks: vec![embedding],
                partial: None,
            },
            _ => Sources::Full(vec![embedding]),
        }
    }

    /// Sublayer `j`'s input (j = number of sublayers run so far, or the total
    /// for the readout).
    fn input(
        &mut self,
        j: usize,
        op: Option<&DepthOp>,
        alphas: Option<&mut Vec<Vec<f32>>>,
        readout: bool,
    ) -> Result<Tensor> {
        let list: Vec<&Tensor> = match self {
            Sources::Full(all) => all.iter().collect(),
            Sources::Block {
                size,
                blocks,
                partial,
            } => {
                // A block's first sublayer sees finished blocks only (Eq. 6):
                // the block that just ended becomes a source of its own.
                if !readout && j > 0 && j.is_multiple_of(*size) {
                    if let Some(p) = partial.take() {
                        blocks.push(p);
                    }
                }
                blocks.iter().chain(partial.iter()).collect()
            }
        };
        match op {
            Some(op) => op.forward(&list, alphas),
            None => {
                anyhow::ensure!(list.len() == 1, "AttnRes op missing for sublayer {j}");
                if let Some(alphas) = alphas {
                    alphas.push(vec![1.0]);
                }
                Ok(list[0].clone())
            }
        }
    }

    fn push(&mut self, v: Tensor) -> Result<()> {
        match self {
            Sources::Full(all) => all.push(v),
            Sources::Block { partial, .. } => {
                *partial = Some(match partial.take() {
                    Some(p) => (p + v)?,
                    None => v,
                });
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct Decoder {
    pub config: ModelConfig,
    pub kernels: Kernels,
    embedding: Tensor,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    head: Linear,
    /// The LM head reuses the embedding table (SmolLM2); full fine-tuning must
    /// then train one tensor, not two copies.
    tied_head: bool,
    rope: Rope,
    /// AttnRes ops for sublayers 1..2L (sublayer 0 reads the embedding alone),
    /// then the final readout; empty for the standard residual.
    depth: Vec<DepthOp>,
    device: Device,
}

/// The Hugging Face names of the block linears LoRA can target, in block order.
pub const LINEAR_NAMES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

impl Decoder {
    /// Loads quantized weights from a GGUF file (llama or qwen2 tensor names).
    pub fn from_gguf<R: Read + Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        cfg: &ModelConfig,
        device: &Device,
    ) -> Result<Self> {
        let mut gguf = GgufTensors {
            content,
            reader,
            device,
        };
        let token_embd = gguf.tensor("token_embd.weight")?;
        let (h, ffn) = (cfg.hidden_size, cfg.intermediate_size);
        // Rows as stored (some files pad the table beyond the tokenizer's
        // vocabulary); an untied head must have as many.
        let rows = token_embd.shape().dims().first().copied().unwrap_or(0);
        gguf.check_shape("token_embd.weight", &token_embd, (rows, h))?;
        let embedding = token_embd.dequantize(device)?;
        let arch = cfg.architecture;
        let bias = arch.has_qkv_bias();
        let (q_out, kv_out) = (
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("blk.{i}");
            let head_norm = |gguf: &mut GgufTensors<R>, name: &str| -> Result<Option<RmsNorm>> {
                if !arch.has_qk_norm() {
                    return Ok(None);
                }
                let norm = gguf.norm(&format!("{p}.{name}"), cfg.rms_norm_eps)?;
                anyhow::ensure!(
                    norm.weight_vec.len() == cfg.head_dim,
                    "{p}.{name}.weight has {} values, the heads have {}",
                    norm.weight_vec.len(),
                    cfg.head_dim
                );
                Ok(Some(norm))
            };
            let attn = Attention {
                q: gguf.linear(&format!("{p}.attn_q"), bias, (q_out, h))?,
                k: gguf.linear(&format!("{p}.attn_k"), bias, (kv_out, h))?,
                v: gguf.linear(&format!("{p}.attn_v"), bias, (kv_out, h))?,
                o: gguf.linear(&format!("{p}.attn_output"), false, (h, q_out))?,
                q_norm: head_norm(&mut gguf, "attn_q_norm")?,
                k_norm: head_norm(&mut gguf, "attn_k_norm")?,
                qkv: None,
            };
            let mlp = Mlp {
                gate: gguf.linear(&format!("{p}.ffn_gate"), false, (ffn, h))?,
                up: gguf.linear(&format!("{p}.ffn_up"), false, (ffn, h))?,
                down: gguf.linear(&format!("{p}.ffn_down"), false, (h, ffn))?,
                gate_up: None,
            };
            blocks.push(Block {
                attn_norm: gguf.norm(&format!("{p}.attn_norm"), cfg.rms_norm_eps)?,
                attn,
                mlp_norm: gguf.norm(&format!("{p}.ffn_norm"), cfg.rms_norm_eps)?,
                mlp,
            });
        }
        let final_norm = gguf.norm("output_norm", cfg.rms_norm_eps)?;
        // Untied models carry output.weight; tied ones reuse the embedding table.
        let tied_head = !content.tensor_infos.contains_key("output.weight");
        let head = if !tied_head {
            gguf.linear("output", false, (rows, h))?
        } else {
            Linear::quantized(token_embd, None)?
        };
        let layout = match cfg.architecture {
            Architecture::Llama => RopeLayout::Interleaved,
            Architecture::Qwen2 | Architecture::Qwen3 => RopeLayout::Halves,
        };
        let freq_divisors: Option<Vec<f32>> = match content.tensor_infos.contains_key(ROPE_FREQS) {
            true => Some(
                gguf.float(ROPE_FREQS)?
                    .flatten_all()?
                    .to_vec1()
                    .with_context(|| format!("reading {ROPE_FREQS}"))?,
            ),
            false => None,
        };
        Ok(Self {
            config: cfg.clone(),
            kernels: Kernels::Fused,
            embedding,
            blocks,
            final_norm,
            head,
            tied_head,
            rope: Rope::new(cfg, layout, freq_divisors.as_deref(), device)
                .with_context(|| format!("RoPE of {} (or {ROPE_FREQS})", arch.gguf_name()))?,
            depth: Vec::new(),
            device: device.clone(),
        })
    }

    /// A new model with random float weights in the Hugging Face layout, for
    /// training from scratch: N(0, `std`) matrices and embedding (the output
    /// projections of each sublayer scaled by 1/√(2·layers), as GPT-2 does), unit
    /// norms, and for AttnRes zero queries and unit key-norm gains. The shared
    /// weights are drawn in the same order whatever the residual, so two models
    /// of one seed differ only in their AttnRes parameters (paired runs).
    pub fn new_random(
        cfg: &ModelConfig,
        tied_head: bool,
        std: f64,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        use rand::{Rng, SeedableRng};
        anyhow::ensure!(
            cfg.num_heads > 0
                && cfg.num_kv_heads > 0
                && cfg.num_heads.is_multiple_of(cfg.num_kv_heads)
                && cfg.head_dim * cfg.num_heads == cfg.hidden_size
                && cfg.head_dim.is_multiple_of(2),
            "heads {}/{} and head_dim {} do not fit hidden size {}",
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.hidden_size
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut normal = |rows: usize, cols: usize, std: f64| -> Result<Tensor> {
            // Box-Muller: rand 0.8 has no normal distribution without rand_distr.
            let data: Vec<f32> = (0..rows * cols)
                .map(|_| {
                    let (a, b): (f64, f64) = (rng.gen_range(f64::EPSILON..1.0), rng.gen());
                    ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos() * std) as f32
                })
                .collect();
            Ok(Tensor::from_vec(data, (rows, cols), device)?)
        };
        let (h, kv) = (cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim);
        let out_std = std / (2.0 * cfg.num_layers as f64).sqrt();
        let ones = || Tensor::ones(h, DType::F32, device);
        let norm = |eps| -> Result<RmsNorm> { RmsNorm::new(ones()?, eps) };
        let embedding = normal(cfg.vocab_size, h, std)?;
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for _ in 0..cfg.num_layers {
            let attn = Attention {
                q: Linear::float(normal(h, h, std)?, None),
                k: Linear::float(normal(kv, h, std)?, None),
                v: Linear::float(normal(kv, h, std)?, None),
                o: Linear::float(normal(h, h, out_std)?, None),
                q_norm: None,
                k_norm: None,
                qkv: None,
            };
            let ffn = cfg.intermediate_size;
            let mlp = Mlp {
                gate: Linear::float(normal(ffn, h, std)?, None),
                up: Linear::float(normal(ffn, h, std)?, None),
                down: Linear::float(normal(h, ffn, out_std)?, None),
                gate_up: None,
            };
            blocks.push(Block {
                attn_norm: norm(cfg.rms_norm_eps)?,
                attn,
                mlp_norm: norm(cfg.rms_norm_eps)?,
                mlp,
            });
        }
        let head = match tied_head {
            true => Linear::float(embedding.clone(), None),
            false => Linear::float(normal(cfg.vocab_size, h, std)?, None),
        };
        let depth = match cfg.residual.is_attnres() {
            true => (0..2 * cfg.num_layers)
                .map(|_| {
                    DepthOp::new(
                        Tensor::zeros(h, DType::F32, device)?,
                        ones()?,
                        cfg.rms_norm_eps,
                    )
                })
                .collect::<Result<Vec<_>>>()?,
            false => Vec::new(),
        };
        Ok(Self {
            config: cfg.clone(),
            kernels: Kernels::Fused,
            embedding,
            blocks,
            final_norm: norm(cfg.rms_norm_eps)?,
            head,
            tied_head,
            rope: Rope::new(cfg, RopeLayout::Halves, None, device)?,
            depth,
            device: device.clone(),
        })
    }

    /// Whether the LM head is the embedding table.
    pub fn tied_head(&self) -> bool {
        self.tied_head
    }

    /// The checkpoint-name prefix of AttnRes op `k` (see the `depth` field).
    fn depth_prefix(&self, k: usize) -> String {
        let j = k + 1;
        if j == 2 * self.blocks.len() {
            return "model.final_res".to_string();
        }
        let kind = if j.is_multiple_of(2) {
            "attn_res"
        } else {
            "mlp_res"
        };
        format!("model.layers.{}.{kind}", j / 2)
    }

    /// A copy with every linear weight dequantized to f32 (same math, no
    /// quantized matmul): the float reference for serving and the base for training.
    pub fn to_float(&self) -> Result<Self> {
        self.convert_weights(candle_core::quantized::GgmlDType::F32)
    }

    /// A copy whose linear weights are held and multiplied as `format`.
    pub fn with_weights(&self, format: super::WeightFormat) -> Result<Self> {
        use super::WeightFormat as F;
        use candle_core::quantized::GgmlDType;
        match format {
            F::Ggml => Ok(self.clone()),
            F::F16 => self.convert_weights(GgmlDType::F16),
            F::F32 => self.convert_weights(GgmlDType::F32),
            F::Packed => {
                let mut packed = self.map_linears(Linear::to_packed)?;
                // The stacked copy replaces the separate packed ones, which go back
                // to their GGUF form (kept for dequantizing), so memory is not doubled.
                for block in &mut packed.blocks {
                    let a = &mut block.attn;
                    a.qkv = Linear::fuse(&[&a.q, &a.k, &a.v]);
                    if a.qkv.is_some() {
                        for l in [&mut a.q, &mut a.k, &mut a.v] {
                            *l = l.to_ggml()?;
                        }
                    }
                    let m = &mut block.mlp;
                    m.gate_up = Linear::fuse(&[&m.gate, &m.up]);
                    if m.gate_up.is_some() {
                        for l in [&mut m.gate, &mut m.up] {
                            *l = l.to_ggml()?;
                        }
                    }
                }
                Ok(packed)
            }
        }
    }

    /// A copy with every linear weight stored as `dtype` (F32 = dense float).
    pub fn convert_weights(&self, dtype: candle_core::quantized::GgmlDType) -> Result<Self> {
        self.map_linears(|l| l.convert(dtype))
    }

    fn map_linears(&self, f: impl Fn(&Linear) -> candle_core::Result<Linear>) -> Result<Self> {
        let mut out = self.clone();
        for block in &mut out.blocks {
            for linear in [
                &mut block.attn.q,
                &mut block.attn.k,
                &mut block.attn.v,
                &mut block.attn.o,
                &mut block.mlp.gate,
                &mut block.mlp.up,
                &mut block.mlp.down,
            ] {
                *linear = f(linear)?;
            }
            block.attn.qkv = None;
            block.mlp.gate_up = None;
        }
        out.head = f(&out.head)?;
        Ok(out)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn rope_layout(&self) -> RopeLayout {
        self.rope.layout
    }

    pub fn with_kernels(mut self, kernels: Kernels) -> Self {
        self.kernels = kernels;
        self
    }

    /// The Hugging Face module path of block `layer`'s linear `name` (one of
    /// [`LINEAR_NAMES`]), e.g. `model.layers.3.self_attn.q_proj`: the names PEFT
    /// adapters use.
    pub fn module_path(layer: usize, name: &str) -> String {
        let group = match name {
            "q_proj" | "k_proj" | "v_proj" | "o_proj" => "self_attn",
            _ => "mlp",
        };
        format!("model.layers.{layer}.{group}.{name}")
    }

    /// Block `layer`'s linear `name` (one of [`LINEAR_NAMES`]).
    pub fn linear(&self, layer: usize, name: &str) -> Option<&Linear> {
        let block = self.blocks.get(layer)?;
        Some(match name {
            "q_proj" => &block.attn.q,
            "k_proj" => &block.attn.k,
            "v_proj" => &block.attn.v,
            "o_proj" => &block.attn.o,
            "gate_proj" => &block.mlp.gate,
            "up_proj" => &block.mlp.up,
            "down_proj" => &block.mlp.down,
            _ => return None,
        })
    }

    fn linear_mut(&mut self, layer: usize, name: &str) -> Option<&mut Linear> {
        let block = self.blocks.get_mut(layer)?;
        Some(match name {
            "q_proj" => &mut block.attn.q,
            "k_proj" => &mut block.attn.k,
            "v_proj" => &mut block.attn.v,
            "o_proj" => &mut block.attn.o,
            "gate_proj" => &mut block.mlp.gate,
            "up_proj" => &mut block.mlp.up,
            "down_proj" => &mut block.mlp.down,
            _ => return None,
        })
    }

    /// A copy with `lora` set on block `layer`'s linear `name` (None removes it).
    /// Cheap: tensors are shared, only handles are copied.
    pub fn set_lora(
        &mut self,
        layer: usize,
        name: &str,
        lora: Option<super::linear::LoraDelta>,
    ) -> Result<()> {
        let linear = self
            .linear_mut(layer, name)
            .with_context(|| format!("the model has no linear {name} in layer {layer}"))?;
        linear.lora = lora;
        Ok(())
    }

    /// A copy with every LoRA delta removed: the reference policy.
    pub fn without_lora(&self) -> Self {
        let mut out = self.clone();
        for layer in 0..out.blocks.len() {
            for name in LINEAR_NAMES {
                if let Some(l) = out.linear_mut(layer, name) {
                    l.lora = None;
                }
            }
        }
        out
    }

    /// A copy in the Hugging Face layout: Q/K rows un-permuted (llama-arch GGUFs
    /// store them permuted for interleaved RoPE) and RoPE on (i, i + d/2) pairs. Same
    /// function, but weights and LoRA deltas then line up with HF/PEFT checkpoints.
    /// Needs float weights.
    pub fn to_hf_layout(&self) -> Result<Self> {
        if self.rope.layout == RopeLayout::Halves {
            return Ok(self.clone());
        }
        let mut out = self.clone();
        let (heads, kv_heads) = (self.config.num_heads, self.config.num_kv_heads);
        for block in &mut out.blocks {
            for (linear, n) in [(&mut block.attn.q, heads), (&mut block.attn.k, kv_heads)] {
                let super::linear::Weight::Float(w) = &linear.weight else {
                    anyhow::bail!("to_hf_layout needs float weights (call to_float first)");
                };
                linear.weight = super::linear::Weight::Float(interleaved_to_halves(w, n)?);
                if let Some(b) = &linear.bias {
                    linear.bias = Some(interleaved_to_halves(&b.unsqueeze(1)?, n)?.squeeze(1)?);
                }
                if let Some(lora) = &mut linear.lora {
                    lora.b = interleaved_to_halves(&lora.b, n)?;
                }
            }
            // A head norm's weight follows its head's dimensions.
            for norm in [&mut block.attn.q_norm, &mut block.attn.k_norm]
                .into_iter()
                .flatten()
            {
                let w = interleaved_to_halves(&norm.weight.unsqueeze(1)?, 1)?.squeeze(1)?;
                *norm = RmsNorm::new(w, norm.eps)?;
            }
            block.attn.qkv = None;
        }
        out.rope.layout = RopeLayout::Halves;
        Ok(out)
    }

    /// Every float parameter with its Hugging Face name, for full fine-tuning
    /// and checkpoints (`model.embed_tokens.weight`, `model.layers.N.…`,
    /// `model.norm.weight`, `lm_head.weight` when untied).
    pub fn parameters(&self) -> Result<Vec<(String, Tensor)>> {
        let float = |l: &Linear| -> Result<Tensor> {
            match &l.weight {
                super::linear::Weight::Float(w) => Ok(w.clone()),
                _ => anyhow::bail!("parameters() needs float weights (call to_float first)"),
            }
        };
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embedding.clone(),
        )];
        for (i, block) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                block.attn_norm.weight.clone(),
            ));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                block.mlp_norm.weight.clone(),
            ));
            for (name, norm) in block.attn.head_norms() {
                out.push((format!("{p}.self_attn.{name}.weight"), norm.weight.clone()));
            }
            for name in LINEAR_NAMES {
                let linear = self.linear(i, name).context("linear")?;
                let path = Self::module_path(i, name);
                out.push((format!("{path}.weight"), float(linear)?));
                if let Some(b) = &linear.bias {
                    out.push((format!("{path}.bias"), b.clone()));
                }
            }
        }
        out.push((
            "model.norm.weight".to_string(),
            self.final_norm.weight.clone(),
        ));
        if !self.tied_head {
            out.push(("lm_head.weight".to_string(), float(&self.head)?));
        }
        for (k, op) in self.depth.iter().enumerate() {
            let p = self.depth_prefix(k);
            out.push((format!("{p}.query"), op.query.clone()));
            out.push((format!("{p}.norm.weight"), op.gain.clone()));
        }
        Ok(out)
    }

    /// This decoder with every parameter taken (as f32) from `tensors`, by its
    /// Hugging Face name, each checked against the current shape; the tensors
    /// used are removed, so what is left over is the caller's to judge.
    pub fn take_parameters(
        &self,
        tensors: &mut std::collections::HashMap<String, Tensor>,
        source: &std::path::Path,
    ) -> anyhow::Result<Self> {
        self.map_parameters(|name, current| {
            let t = tensors
                .remove(name)
                .with_context(|| format!("{}: no tensor {name}", source.display()))?
                .to_dtype(candle_core::DType::F32)?;
            anyhow::ensure!(
                t.dims() == current.dims(),
                "{}: {name} has shape {:?}, the model needs {:?}",
                source.display(),
                t.dims(),
                current.dims()
            );
            Ok(t)
        })
    }

    /// A copy whose parameters are replaced by `f(name, tensor)` (names as in
    /// [`parameters`](Self::parameters)); with a tied head, the head follows the
    /// embedding. Used to make every weight a trainable `Var`, and to load a
    /// fully fine-tuned checkpoint.
    pub fn map_parameters(
        &self,
        mut f: impl FnMut(&str, &Tensor) -> Result<Tensor>,
    ) -> Result<Self> {
        let mut out = self.clone();
        let mut replaced = std::collections::HashMap::new();
        for (name, tensor) in self.parameters()? {
            replaced.insert(name.clone(), f(&name, &tensor)?);
        }
        let has_bias: std::collections::HashSet<String> = replaced
            .keys()
            .filter(|k| k.ends_with(".bias"))
            .cloned()
            .collect();
        let mut take = |name: &str| -> Result<Tensor> {
            replaced
                .remove(name)
                .with_context(|| format!("parameter {name} missing"))
        };
        out.embedding = take("model.embed_tokens.weight")?;
        for i in 0..out.blocks.len() {
            let p = format!("model.layers.{i}");
            let eps = out.blocks[i].attn_norm.eps;
            out.blocks[i].attn_norm =
                RmsNorm::new(take(&format!("{p}.input_layernorm.weight"))?, eps)?;
            out.blocks[i].mlp_norm =
                RmsNorm::new(take(&format!("{p}.post_attention_layernorm.weight"))?, eps)?;
            let attn = &mut out.blocks[i].attn;
            for (name, norm) in [("q_norm", &mut attn.q_norm), ("k_norm", &mut attn.k_norm)] {
                if let Some(norm) = norm {
                    *norm = RmsNorm::new(take(&format!("{p}.self_attn.{name}.weight"))?, norm.eps)?;
                }
            }
            for name in LINEAR_NAMES {
                let path = Self::module_path(i, name);
                let weight = take(&format!("{path}.weight"))?;
                let bias = match has_bias.contains(&format!("{path}.bias")) {
                    true => Some(take(&format!("{path}.bias"))?),
                    false => None,
                };
                let linear = out.linear_mut(i, name).context("linear")?;
                linear.weight = super::linear::Weight::Float(weight);
                linear.bias = bias;
            }
            out.blocks[i].attn.qkv = None;
            out.blocks[i].mlp.gate_up = None;
        }
        let eps = out.final_norm.eps;
        out.final_norm = RmsNorm::new(take("model.norm.weight")?, eps)?;
        out.head.weight = super::linear::Weight::Float(match self.tied_head {
            true => out.embedding.clone(),
            false => take("lm_head.weight")?,
        });
        for k in 0..out.depth.len() {
            let p = self.depth_prefix(k);
            let eps = out.depth[k].eps;
            out.depth[k] = DepthOp::new(
                take(&format!("{p}.query"))?,
                take(&format!("{p}.norm.weight"))?,
                eps,
            )?;
        }
        Ok(out)
    }

    /// Final-norm hidden states of a batch of whole sequences, (batch, seq,
    /// hidden), with no cache. Scoring applies the LM head only where it needs
    /// log-probs (the response), which is most of the saving on a 49k vocabulary.
    pub fn hidden_sequences(&self, ids: &Tensor) -> Result<Tensor> {
        self.hidden_states(ids, None)
    }

    /// The LM head (hidden → vocabulary logits).
    pub fn head(&self) -> &Linear {
        &self.head
    }

    /// Runs `ids` (batch, seq) after the positions already in `cache` and returns the
    /// logits of every new position: (batch, seq, vocab).
    pub fn forward(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let hidden = self.hidden_states(ids, Some(cache))?;
        Ok(self.head.forward(&hidden)?)
    }

    /// Logits of every position of a batch of whole sequences, (batch, seq, vocab),
    /// with no cache: the teacher-forcing pass of scoring and training.
    pub fn forward_sequences(&self, ids: &Tensor) -> Result<Tensor> {
        let hidden = self.hidden_states(ids, None)?;
        Ok(self.head.forward(&hidden)?)
    }

    /// Like [`forward`](Self::forward) but only the last position's logits:
    /// (batch, vocab). This is what generation needs, and it skips the LM head
    /// (the largest matmul) for every other prompt position.
    pub fn forward_last(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let hidden = self.hidden_states(ids, Some(cache))?;
        let seq = hidden.dim(1)?;
        let last = hidden.narrow(1, seq - 1, 1)?.contiguous()?;
        Ok(self.head.forward(&last)?.squeeze(1)?)
    }

    /// Like [`hidden_sequences`](Self::hidden_sequences), also returning the
    /// per-depth magnitudes and (AttnRes) routing weights of this pass.
    pub fn trace_sequences(&self, ids: &Tensor) -> Result<(Tensor, DepthTrace)> {
        let mut trace = DepthTrace::default();
        let hidden = self.hidden_traced(ids, None, Some(&mut trace))?;
        Ok((hidden, trace))
    }

    fn hidden_states(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.hidden_traced(ids, cache, None)
    }

    fn hidden_traced(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut KvCache>,
        mut trace: Option<&mut DepthTrace>,
    ) -> Result<Tensor> {
        let (batch, seq) = ids.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.len);
        anyhow::ensure!(seq > 0, "forward called with no tokens");
        anyhow::ensure!(
            offset + seq <= self.config.context_length,
            "sequence of {} tokens exceeds the model's context length {}",
            offset + seq,
            self.config.context_length
        );
        let attnres = self.config.residual.is_attnres();
        anyhow::ensure!(
            !attnres || self.depth.len() == 2 * self.blocks.len(),
            "the model's residual is {} but it has {} AttnRes ops for {} sublayers",
            self.config.residual,
            self.depth.len(),
            2 * self.blocks.len()
        );
        if let Some(cache) = cache.as_deref_mut() {
            if batch == 1 && seq == 1 && self.kernels == Kernels::Fused && trace.is_none() {
                let token: u32 = ids.flatten_all()?.to_vec1::<u32>()?[0];
                let hidden = self.decode_hidden(&[token], &mut [cache])?;
                return Ok(Tensor::from_vec(
                    hidden,
                    (1, 1, self.config.hidden_size),
                    &self.device,
                )?);
            }
        }
        let flat = ids.flatten_all()?;
        let mut x = self.embedding.index_select(&flat, 0)?.reshape((
            batch,
            seq,
            self.config.hidden_size,
        ))?;
        let mask = causal_mask(seq, offset, &self.device)?;
        let mut sources = attnres.then(|| Sources::new(self.config.residual, x.clone()));
        for (i, block) in self.blocks.iter().enumerate() {
            for j in [2 * i, 2 * i + 1] {
                if let Some(sources) = &mut sources {
                    let op = j.checked_sub(1).map(|k| &self.depth[k]);
                    x = sources.input(j, op, trace.as_mut().map(|t| &mut t.alphas), false)?;
                }
                let h = match j % 2 {
                    0 => {
                        let h = block.attn_norm.forward(&x, self.kernels)?;
                        self.attention(
                            &block.attn,
                            &h,
                            i,
                            offset,
                            mask.as_ref(),
                            cache.as_deref_mut(),
                        )?
                    }
                    _ => {
                        let h = block.mlp_norm.forward(&x, self.kernels)?;
                        self.mlp(&block.mlp, &h)?
                    }
                };
                if let Some(t) = trace.as_deref_mut() {
                    t.input_rms.push(rms(&x)?);
                    t.output_rms.push(rms(&h)?);
                }
                match &mut sources {
                    Some(sources) => sources.push(h)?,
                    None => x = (x + h)?,
                }
            }
        }
        if let Some(sources) = &mut sources {
            let readout = self.depth.last();
            x = sources.input(
                2 * self.blocks.len(),
                readout,
                trace.as_mut().map(|t| &mut t.alphas),
                true,
            )?;
        }
        if let Some(cache) = cache {
            cache.len = offset + seq;
        }
        Ok(self.final_norm.forward(&x, self.kernels)?)
    }

    fn mlp(&self, mlp: &Mlp, x: &Tensor) -> Result<Tensor> {
        let gate_up = Linear::forward_many(&[&mlp.gate, &mlp.up], mlp.gate_up.as_ref(), x)?;
        let h = match self.kernels {
            Kernels::Differentiable => gate_up[0]
                .contiguous()?
                .apply_op2(&gate_up[1].contiguous()?, super::ops::SiluMul)?,
            _ => (candle_nn::ops::silu(&gate_up[0])? * &gate_up[1])?,
        };
        Ok(mlp.down.forward(&h)?)
    }

    fn attention(
        &self,
        attn: &Attention,
        x: &Tensor,
        layer: usize,
        offset: usize,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (batch, seq, _) = x.dims3()?;
        let (heads, kv_heads, dim) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let mut qkv = Linear::forward_many(&[&attn.q, &attn.k, &attn.v], attn.qkv.as_ref(), x)?;
        for (t, norm) in qkv.iter_mut().zip([&attn.q_norm, &attn.k_norm]) {
            if let Some(norm) = norm {
                *t = norm.forward_heads(t, self.kernels)?;
            }
        }
        if self.kernels == Kernels::Differentiable && cache.is_none() && offset == 0 {
            // Training: the whole attention as one op with its own backward.
            let y = qkv[0].contiguous()?.apply_op3(
                &qkv[1].contiguous()?,
                &qkv[2].contiguous()?,
                super::attention::CausalAttention {
                    heads,
                    kv_heads,
                    head_dim: dim,
                    cos: self.rope.cos_vec.clone(),
                    sin: self.rope.sin_vec.clone(),
                    interleaved: self.rope.layout == RopeLayout::Interleaved,
                    scale: 1.0 / (dim as f32).sqrt(),
                },
            )?;
            return Ok(attn.o.forward(&y)?);
        }
        let split = |t: &Tensor, n: usize| -> candle_core::Result<Tensor> {
            t.reshape((batch, seq, n, dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = self
            .rope
            .apply(&split(&qkv[0], heads)?, offset, self.kernels)?;
        let k = self
            .rope
            .apply(&split(&qkv[1], kv_heads)?, offset, self.kernels)?;
        let v = split(&qkv[2], kv_heads)?;
        let (k, v) = match cache {
            None => (k, v),
            Some(cache) => {
                anyhow::ensure!(
                    batch == 1,
                    "a KV cache holds one sequence, got a batch of {batch}"
                );
                let layer_kv = cache.layer(layer);
                layer_kv.append(&k, &v)?;
                layer_kv.tensors(kv_heads, dim, &self.device)?
            }
        };
        let total = k.dim(2)?;

        // GQA without copying K/V: the `group` query heads that share a KV head are
        // folded into the row dimension, (b, kv, group*seq, d) x (b, kv, d, total).
        let group = heads / kv_heads;
        let q = q.reshape((batch, kv_heads, group * seq, dim))?;
        let scores = q.matmul(&k.t()?)?;
        let scale = 1.0 / (dim as f64).sqrt();
        let probs = match (self.kernels, mask) {
            (Kernels::Fused, Some(mask)) => candle_nn::ops::softmax_last_dim(
                &(scores * scale)?
                    .reshape((batch, kv_heads, group, seq, total))?
                    .broadcast_add(mask)?
                    .reshape((batch, kv_heads, group * seq, total))?,
            )?,
            (Kernels::Fused, None) => candle_nn::ops::softmax_last_dim(&(scores * scale)?)?,
            // The mask and the scale are built into the op (one pass, with its
            // own backward).
            (Kernels::Differentiable, _) => {
                scores.contiguous()?.apply_op1(super::ops::CausalSoftmax {
                    seq,
                    offset,
                    scale: scale as f32,
                })?
            }
        };
        let y = probs
            .matmul(&v)?
            .reshape((batch, heads, seq, dim))?
            .transpose(1, 2)?
            .reshape((batch, seq, heads * dim))?;
        Ok(attn.o.forward(&y)?)
    }
}

/// Reorders the rows of a Q or K weight (out, in) from the interleaved RoPE layout
/// of llama-arch GGUFs to the Hugging Face layout: per head, (d/2, 2) → (2, d/2).
pub fn interleaved_to_halves(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, cols) = w.dims2()?;
    let dim = out / heads;
    Ok(w.reshape((heads, dim / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, cols))?)
}

/// The inverse of [`interleaved_to_halves`]: HF rows to the GGUF layout.
pub fn halves_to_interleaved(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, cols) = w.dims2()?;
    let dim = out / heads;
    Ok(w.reshape((heads, 2, dim / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, cols))?)
}

/// llama.cpp's per-frequency RoPE divisors (Llama 3.1+).
const ROPE_FREQS: &str = "rope_freqs.weight";

/// Reads named tensors out of a GGUF file.
struct GgufTensors<'a, R> {
    content: &'a gguf_file::Content,
    reader: &'a mut R,
    device: &'a Device,
}

impl<R: Read + Seek> GgufTensors<'_, R> {
    fn tensor(&mut self, name: &str) -> Result<QTensor> {
        self.content
            .tensor(self.reader, name, self.device)
            .with_context(|| format!("cannot read tensor {name}"))
    }

    fn float(&mut self, name: &str) -> Result<Tensor> {
        Ok(self.tensor(name)?.dequantize(self.device)?)
    }

    /// A linear layer whose weight must be (out, in).
    fn linear(&mut self, prefix: &str, with_bias: bool, shape: (usize, usize)) -> Result<Linear> {
        let name = format!("{prefix}.weight");
        let weight = self.tensor(&name)?;
        self.check_shape(&name, &weight, shape)?;
        let bias = match with_bias {
            true => Some(self.float(&format!("{prefix}.bias"))?),
            false => None,
        };
        Ok(Linear::quantized(weight, bias)?)
    }

    /// The metadata's sizes against a tensor's, so a mismatch names the tensor.
    fn check_shape(&self, name: &str, t: &QTensor, (out, inp): (usize, usize)) -> Result<()> {
        anyhow::ensure!(
            t.shape().dims() == [out, inp],
            "tensor {name} has shape {:?}, the metadata says ({out}, {inp})",
            t.shape().dims()
        );
        Ok(())
    }

    fn norm(&mut self, prefix: &str, eps: f64) -> Result<RmsNorm> {
        RmsNorm::new(self.float(&format!("{prefix}.weight"))?, eps)
    }
}

/// Additive causal mask (seq, offset + seq): 0 where a query may look, -inf where it
/// may not. None for a single new token, which may look at everything cached.
fn causal_mask(seq: usize, offset: usize, device: &Device) -> Result<Option<Tensor>> {
    if seq == 1 {
        return Ok(None);
    }
    let total = offset + seq;
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Some(Tensor::from_vec(mask, (seq, total), device)?))
}
