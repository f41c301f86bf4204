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
//!
//! Its parts:
//! - this file: the layers' types and the tensor forward pass (prompts,
//!   training, scoring);
//! - [`step`]: the decode step on plain vectors, batched over sequences;
//! - [`cache`]: the per-sequence KV cache and the attention over it;
//! - `load`: building from a GGUF file or random weights;
//! - `params`: weights by Hugging Face name, LoRA deltas, format conversions.

mod cache;
mod depth;
mod load;
mod params;
mod step;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Module, Tensor};

use super::attnres;
use super::config::{Architecture, ModelConfig, RopeScaling};
use super::linear::Linear;
pub use cache::KvCache;
use cache::{LayerKv, Past};
pub use depth::DepthTrace;
use depth::{rms, DepthOp, Sources};
pub use load::{halves_to_interleaved, interleaved_to_halves};
pub use params::LinearName;

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

    fn forward(
        &self,
        cx: &LayerContext,
        x: &Tensor,
        layer: usize,
        offset: usize,
        mask: Option<&Tensor>,
        past: Past,
    ) -> Result<Tensor> {
        let (cache, context) = past.split();
        let cfg = &cx.config;
        let (batch, seq, _) = x.dims3()?;
        let (heads, kv_heads, dim) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let mut qkv = Linear::forward_many(&[&self.q, &self.k, &self.v], self.qkv.as_ref(), x)?;
        for (t, norm) in qkv.iter_mut().zip([&self.q_norm, &self.k_norm]) {
            if let Some(norm) = norm {
                *t = norm.forward_heads(t, cx.kernels)?;
            }
        }
        if cx.kernels == Kernels::Differentiable && cache.is_none() {
            // Training: the whole attention as one op with its own backward.
            let context = match context {
                Some(c) => {
                    anyhow::ensure!(
                        batch == 1,
                        "a fixed context holds one sequence, got a batch of {batch}"
                    );
                    let kv = c
                        .layers
                        .get(layer)
                        .with_context(|| format!("the context has no layer {layer}"))?;
                    Some(super::attention::FixedContext {
                        keys: std::sync::Arc::new(kv.keys.clone()),
                        values: std::sync::Arc::new(kv.values.clone()),
                        positions: c.len,
                    })
                }
                None => None,
            };
            let y = qkv[0].contiguous()?.apply_op3(
                &qkv[1].contiguous()?,
                &qkv[2].contiguous()?,
                super::attention::CausalAttention {
                    heads,
                    kv_heads,
                    head_dim: dim,
                    cos: cx.rope.cos_vec.clone(),
                    sin: cx.rope.sin_vec.clone(),
                    interleaved: cx.rope.layout == RopeLayout::Interleaved,
                    scale: 1.0 / (dim as f32).sqrt(),
                    context,
                },
            )?;
            return Ok(self.o.forward(&y)?);
        }
        let split = |t: &Tensor, n: usize| -> candle_core::Result<Tensor> {
            t.reshape((batch, seq, n, dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = cx.rope.apply(&split(&qkv[0], heads)?, offset, cx.kernels)?;
        let k = cx
            .rope
            .apply(&split(&qkv[1], kv_heads)?, offset, cx.kernels)?;
        let v = split(&qkv[2], kv_heads)?;
        if cx.kernels == Kernels::Fused && batch == 1 {
            // Inference on one sequence: blocked attention on the cache's vectors.
            let mut scratch = LayerKv::default();
            let layer_kv = match (cache, context) {
                (Some(cache), _) => cache.layer(layer),
                (None, Some(context)) => {
                    scratch = context.layers.get(layer).cloned().unwrap_or_default();
                    &mut scratch
                }
                (None, None) => &mut scratch,
            };
            let y = layer_kv.append_and_attend(&q, &k, &v, heads)?;
            let y = Tensor::from_vec(y, (1, seq, heads * dim), cx.device)?;
            return Ok(self.o.forward(&y)?);
        }
        anyhow::ensure!(
            batch == 1 || (cache.is_none() && context.is_none()),
            "a KV cache holds one sequence, got a batch of {batch}"
        );
        // Only the differentiable kernels get here with a cache (the fused ones
        // took the blocked path above), and nothing gets here with a fixed
        // context (the fused path above, or the differentiable op earlier).
        let (k, v) = match cache {
            None => (k, v),
            Some(cache) => {
                let layer_kv = cache.layer(layer);
                layer_kv.append(&k, &v)?;
                layer_kv.tensors(kv_heads, dim, cx.device)?
            }
        };
        let total = k.dim(2)?;

        // GQA without copying K/V: the `group` query heads that share a KV head are
        // folded into the row dimension, (b, kv, group*seq, d) x (b, kv, d, total).
        let group = heads / kv_heads;
        let q = q.reshape((batch, kv_heads, group * seq, dim))?;
        let scores = q.matmul(&k.t()?)?;
        let scale = 1.0 / (dim as f64).sqrt();
        let probs = match (cx.kernels, mask) {
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
        Ok(self.o.forward(&y)?)
    }
}

/// What a layer's forward pass reads of its decoder: shapes, the RoPE tables,
/// which kernels, the device.
struct LayerContext<'a> {
    config: &'a ModelConfig,
    rope: &'a Rope,
    kernels: Kernels,
    device: &'a Device,
}

#[derive(Debug, Clone)]
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
    /// gate and up stacked into one packed matrix (packed weights only).
    gate_up: Option<Linear>,
}

impl Mlp {
    fn forward(&self, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        let gate_up = Linear::forward_many(&[&self.gate, &self.up], self.gate_up.as_ref(), x)?;
        let h = match kernels {
            Kernels::Differentiable => gate_up[0]
                .contiguous()?
                .apply_op2(&gate_up[1].contiguous()?, super::ops::SiluMul)?,
            _ => (candle_nn::ops::silu(&gate_up[0])? * &gate_up[1])?,
        };
        Ok(self.down.forward(&h)?)
    }
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    mlp_norm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    /// The attention sublayer's output for `x` (its residual is the caller's:
    /// a sum, or Attention Residuals' weighted sources).
    fn attend(
        &self,
        cx: &LayerContext,
        x: &Tensor,
        layer: usize,
        offset: usize,
        mask: Option<&Tensor>,
        past: Past,
    ) -> Result<Tensor> {
        let h = self.attn_norm.forward(x, cx.kernels)?;
        self.attn.forward(cx, &h, layer, offset, mask, past)
    }

    /// The MLP sublayer's output for `x` (residual as for [`Block::attend`]).
    fn feed_forward(&self, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        let h = self.mlp_norm.forward(x, kernels)?;
        self.mlp.forward(&h, kernels)
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

impl Decoder {
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

    /// Final-norm hidden states of a batch of whole sequences, (batch, seq,
    /// hidden), with no cache. Scoring applies the LM head only where it needs
    /// log-probs (the response), which is most of the saving on a 49k vocabulary.
    pub fn hidden_sequences(&self, ids: &Tensor) -> Result<Tensor> {
        self.hidden_states(ids, None)
    }

    /// Final-norm hidden states of `ids` (1, seq) at the positions after
    /// `context`'s, attending to its keys and values without extending it. With
    /// differentiable kernels the gradient flows through these rows only, not
    /// into the context: how a sequence longer than the memory for its whole
    /// graph trains on its last positions.
    pub fn hidden_after(&self, ids: &Tensor, context: &KvCache) -> Result<Tensor> {
        match context.is_empty() {
            true => self.hidden_traced(ids, Past::None, None),
            false => self.hidden_traced(ids, Past::Fixed(context), None),
        }
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

    /// Final-norm hidden states of `ids` (1, seq) after the positions in
    /// `cache`, which the pass extends: (1, seq, hidden).
    pub fn hidden_with_cache(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.hidden_states(ids, Some(cache))
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
        let hidden = self.hidden_traced(ids, Past::None, Some(&mut trace))?;
        Ok((hidden, trace))
    }

    fn hidden_states(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let past = match cache {
            Some(cache) => Past::Cache(cache),
            None => Past::None,
        };
        self.hidden_traced(ids, past, None)
    }

    fn hidden_traced(
        &self,
        ids: &Tensor,
        past: Past,
        mut trace: Option<&mut DepthTrace>,
    ) -> Result<Tensor> {
        let (batch, seq) = ids.dims2()?;
        let (mut cache, context) = past.split();
        let offset = match (&cache, context) {
            (Some(c), _) => c.len,
            (None, Some(c)) => c.len,
            (None, None) => 0,
        };
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
        // Only the tensor attention of a batch reads it (see `attention`).
        let mask = match self.kernels == Kernels::Fused && batch > 1 {
            true => causal_mask(seq, offset, &self.device)?,
            false => None,
        };
        let mut sources = attnres.then(|| Sources::new(self.config.residual, x.clone()));
        let cx = LayerContext {
            config: &self.config,
            rope: &self.rope,
            kernels: self.kernels,
            device: &self.device,
        };
        for (i, block) in self.blocks.iter().enumerate() {
            for j in [2 * i, 2 * i + 1] {
                if let Some(sources) = &mut sources {
                    let op = j.checked_sub(1).map(|k| &self.depth[k]);
                    x = sources.input(j, op, trace.as_mut().map(|t| &mut t.alphas), false)?;
                }
                let h = match j % 2 {
                    0 => block.attend(
                        &cx,
                        &x,
                        i,
                        offset,
                        mask.as_ref(),
                        Past::of(cache.as_deref_mut(), context),
                    )?,
                    _ => block.feed_forward(&x, self.kernels)?,
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
