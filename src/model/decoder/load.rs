//! Building a decoder: from a GGUF file's tensors (llama, qwen2 and qwen3 names,
//! with llama.cpp's interleaved RoPE rows turned into Hugging Face's halves) or
//! with random weights (tests, and training from scratch).

use std::io::{Read, Seek};

use anyhow::{Context, Result};
use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Device, Tensor};

use super::*;

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
