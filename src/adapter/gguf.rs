//! LoRA adapters as GGUF, the format llama.cpp (`llama-server --lora FILE`)
//! loads (docs/ARCHITECTURE.md, "Adapters and checkpoints").
//!
//! The format is what llama.cpp's own `convert_lora_to_gguf.py` writes and
//! `llama_adapter_lora_init_impl` (src/llama-adapter.cpp) reads, checked
//! against the llama.cpp vendored in llama-cpp-python 0.3.36:
//!
//! - metadata `general.type = "adapter"`, `adapter.type = "lora"`,
//!   `general.architecture` equal to the base model's (the loader refuses a
//!   mismatch), `adapter.lora.alpha` (f32; llama.cpp scales by alpha / rank,
//!   with rank read from B, as PEFT and claw do);
//! - per adapted linear, two tensors named after the base tensor:
//!   `blk.N.attn_q.weight.lora_a` and `.lora_b`;
//! - orientation: in ggml's dimension order (`ne[0]` first) A is `[in, rank]`
//!   and B is `[rank, out]`, i.e. exactly PEFT's row-major `lora_A` `(rank, in)`
//!   and `lora_B` `(out, rank)`, no transpose. The loader checks
//!   `base.ne[0] == a.ne[0]`, `base.ne[1] == b.ne[1]` and `a.ne[1] == b.ne[0]`;
//! - a llama-arch GGUF stores the Q and K rows permuted for interleaved RoPE
//!   (`LlamaModel.permute` in convert_hf_to_gguf.py, which the LoRA converter
//!   applies to B's rows), so those `B` rows are permuted the same way;
//!   qwen2/qwen3 store them as Hugging Face does.
//!
//! Tensors are f32 (an adapter is small; llama.cpp multiplies any float type).
//! claw adds `claw.step`, the checkpoint's step (the policy version).

use std::io::Cursor;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Tensor;

use super::lora::Adapter;
use crate::fsutil::write_atomic;
use crate::model::config::{Architecture, ModelConfig};
use crate::model::decoder::{halves_to_interleaved, LinearName};

/// The metadata key holding the checkpoint's step.
pub const STEP_KEY: &str = "claw.step";

/// `adapter-000012.safetensors` → `adapter-000012.gguf`.
pub fn gguf_path_for(adapter: &Path) -> PathBuf {
    adapter.with_extension("gguf")
}

/// llama.cpp's name of a block linear's weight, e.g. `blk.3.attn_q.weight`.
pub fn gguf_tensor_name(layer: usize, name: LinearName) -> String {
    let base = match name {
        LinearName::Q => "attn_q",
        LinearName::K => "attn_k",
        LinearName::V => "attn_v",
        LinearName::O => "attn_output",
        LinearName::Gate => "ffn_gate",
        LinearName::Up => "ffn_up",
        LinearName::Down => "ffn_down",
    };
    format!("blk.{layer}.{base}.weight")
}

/// What the GGUF writer needs to know of the base model.
#[derive(Debug, Clone)]
pub struct GgufBase {
    pub config: ModelConfig,
    /// Base tensor name → (out, in), from the base GGUF; checked when present.
    pub shapes: std::collections::HashMap<String, (usize, usize)>,
}

impl GgufBase {
    /// Reads the base model's metadata and tensor shapes (not its weights).
    pub fn from_model_file(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path)
            .with_context(|| format!("cannot open the base model {}", path.display()))?;
        let content = gguf_file::Content::read(&mut file)
            .with_context(|| format!("{}: not a GGUF file", path.display()))?;
        let config = ModelConfig::from_gguf(&content)
            .with_context(|| format!("{}: cannot read its model config", path.display()))?;
        let shapes = content
            .tensor_infos
            .iter()
            .filter_map(|(name, info)| match info.shape.dims() {
                // candle lists a GGUF tensor's dimensions outermost first: (out, in).
                &[out, inp] => Some((name.clone(), (out, inp))),
                _ => None,
            })
            .collect();
        Ok(GgufBase { config, shapes })
    }

    /// Only the config (no shape checks beyond the config's own).
    pub fn from_config(config: ModelConfig) -> Self {
        GgufBase {
            config,
            shapes: Default::default(),
        }
    }

    /// (out, in) of a block linear, from the config.
    fn linear_shape(&self, name: LinearName) -> (usize, usize) {
        let c = &self.config;
        let (h, q, kv) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        match name {
            LinearName::Q => (q, h),
            LinearName::K | LinearName::V => (kv, h),
            LinearName::O => (h, q),
            LinearName::Gate | LinearName::Up => (c.intermediate_size, h),
            LinearName::Down => (h, c.intermediate_size),
        }
    }
}

/// The adapter as GGUF bytes for `base`; `step` is recorded as `claw.step`.
pub fn to_gguf_lora(adapter: &Adapter, base: &GgufBase, step: u64) -> Result<Vec<u8>> {
    let config = &base.config;
    let rank = adapter.config.rank;
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(adapter.pairs.len() * 2);
    for pair in &adapter.pairs {
        let name = gguf_tensor_name(pair.layer, pair.name);
        anyhow::ensure!(
            pair.layer < config.num_layers,
            "the adapter has layer {} but the model has {} layers",
            pair.layer,
            config.num_layers
        );
        let (out, inp) = base
            .shapes
            .get(&name)
            .copied()
            .unwrap_or_else(|| base.linear_shape(pair.name));
        if !base.shapes.is_empty() {
            anyhow::ensure!(
                base.shapes.contains_key(&name),
                "the base model has no tensor {name} for the adapter's {}",
                pair.peft_prefix()
            );
        }
        let a = pair.a.as_tensor().to_dtype(candle_core::DType::F32)?;
        let mut b = pair.b.as_tensor().to_dtype(candle_core::DType::F32)?;
        anyhow::ensure!(
            a.dims2()? == (rank, inp) && b.dims2()? == (out, rank),
            "{}: LoRA shapes A {:?} B {:?} do not fit the base tensor {name} ({out}, {inp}) \
             at rank {rank}",
            pair.peft_prefix(),
            a.dims(),
            b.dims()
        );
        if config.architecture == Architecture::Llama {
            let heads = match pair.name {
                LinearName::Q => Some(config.num_heads),
                LinearName::K => Some(config.num_kv_heads),
                _ => None,
            };
            if let Some(heads) = heads {
                b = halves_to_interleaved(&b, heads)?;
            }
        }
        tensors.push((format!("{name}.lora_a"), f32_tensor(&a)?));
        tensors.push((format!("{name}.lora_b"), f32_tensor(&b)?));
    }
    anyhow::ensure!(!tensors.is_empty(), "the adapter holds no LoRA tensors");
    let arch = gguf_file::Value::String(config.architecture.gguf_name().into());
    let kind = gguf_file::Value::String("adapter".into());
    let lora = gguf_file::Value::String("lora".into());
    let alpha = gguf_file::Value::F32(adapter.config.alpha as f32);
    let name = gguf_file::Value::String(format!("claw adapter step {step}"));
    let step_value = gguf_file::Value::U64(step);
    let metadata: Vec<(&str, &gguf_file::Value)> = vec![
        ("general.architecture", &arch),
        ("general.type", &kind),
        ("general.name", &name),
        ("adapter.type", &lora),
        ("adapter.lora.alpha", &alpha),
        (STEP_KEY, &step_value),
    ];
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut out = Cursor::new(Vec::new());
    gguf_file::write(&mut out, &metadata, &refs).context("writing the GGUF adapter")?;
    Ok(out.into_inner())
}

fn f32_tensor(t: &Tensor) -> Result<QTensor> {
    Ok(QTensor::quantize(&t.contiguous()?, GgmlDType::F32)?)
}

/// Writes `adapter` as GGUF to `path` (atomically).
pub fn write_gguf_lora(adapter: &Adapter, base: &GgufBase, step: u64, path: &Path) -> Result<()> {
    let bytes = to_gguf_lora(adapter, base, step)?;
    write_atomic(path, &bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// Converts the adapter file at `adapter` (claw's or PEFT's safetensors with its
/// config) to GGUF LoRA for the base model `model` at `out`; returns its step.
pub fn export_file(adapter: &Path, model: &Path, out: &Path) -> Result<u64> {
    let (lora, config) = Adapter::load(adapter, &candle_core::Device::Cpu)?;
    let base = GgufBase::from_model_file(model)?;
    write_gguf_lora(&lora, &base, config.claw_step, out)
        .with_context(|| format!("converting {} to GGUF", adapter.display()))?;
    Ok(config.claw_step)
}

/// Reads `claw.step` from a GGUF adapter written by claw (None: not claw's, or
/// unreadable).
pub fn gguf_step(path: &Path) -> Option<u64> {
    let mut file = std::fs::File::open(path).ok()?;
    let content = gguf_file::Content::read(&mut file).ok()?;
    match content.metadata.get(STEP_KEY)? {
        gguf_file::Value::U64(s) => Some(*s),
        gguf_file::Value::U32(s) => Some(u64::from(*s)),
        _ => None,
    }
}

#[cfg(test)]
#[path = "gguf_tests.rs"]
mod tests;
