//! A decoder's weights by name and format: the Hugging Face parameter and module
//! names (what PEFT adapters and checkpoints use), LoRA deltas on the block
//! linears, and conversions of the linear weights (f32, packed, ggml, ...).

use anyhow::{Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::*;

/// One of a block's linears, by its job. Its Hugging Face module name
/// ([`LinearName::hf_name`]) is what PEFT adapters, checkpoints and
/// `--lora-targets` use; the variants' order is the block's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LinearName {
    #[serde(rename = "q_proj")]
    Q,
    #[serde(rename = "k_proj")]
    K,
    #[serde(rename = "v_proj")]
    V,
    #[serde(rename = "o_proj")]
    O,
    #[serde(rename = "gate_proj")]
    Gate,
    #[serde(rename = "up_proj")]
    Up,
    #[serde(rename = "down_proj")]
    Down,
}

impl LinearName {
    /// Every block linear, in block order.
    pub const ALL: [LinearName; 7] = [
        LinearName::Q,
        LinearName::K,
        LinearName::V,
        LinearName::O,
        LinearName::Gate,
        LinearName::Up,
        LinearName::Down,
    ];

    /// The Hugging Face module name, e.g. `q_proj`.
    pub fn hf_name(self) -> &'static str {
        match self {
            LinearName::Q => "q_proj",
            LinearName::K => "k_proj",
            LinearName::V => "v_proj",
            LinearName::O => "o_proj",
            LinearName::Gate => "gate_proj",
            LinearName::Up => "up_proj",
            LinearName::Down => "down_proj",
        }
    }

    /// The linear a Hugging Face module name (`q_proj`, ...) names.
    pub fn from_hf(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.hf_name() == name)
    }

    /// The Hugging Face module group it sits in.
    fn group(self) -> &'static str {
        match self {
            LinearName::Q | LinearName::K | LinearName::V | LinearName::O => "self_attn",
            LinearName::Gate | LinearName::Up | LinearName::Down => "mlp",
        }
    }
}

impl std::fmt::Display for LinearName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.hf_name())
    }
}

impl Decoder {
    /// A copy with every linear weight dequantized to f32 (same math, no
    /// quantized matmul): the float reference for serving and the base for training.
    pub fn to_float(&self) -> Result<Self> {
        self.convert_weights(candle_core::quantized::GgmlDType::F32)
    }

    /// A copy whose linear weights are held and multiplied as `format`.
    pub fn with_weights(&self, format: crate::model::WeightFormat) -> Result<Self> {
        use crate::model::WeightFormat as F;
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

    /// The Hugging Face module path of block `layer`'s linear `name`, e.g.
    /// `model.layers.3.self_attn.q_proj`: the names PEFT adapters use.
    pub fn module_path(layer: usize, name: LinearName) -> String {
        format!("model.layers.{layer}.{}.{name}", name.group())
    }

    /// Block `layer`'s linear `name` (None past the last layer).
    pub fn linear(&self, layer: usize, name: LinearName) -> Option<&Linear> {
        let block = self.blocks.get(layer)?;
        Some(match name {
            LinearName::Q => &block.attn.q,
            LinearName::K => &block.attn.k,
            LinearName::V => &block.attn.v,
            LinearName::O => &block.attn.o,
            LinearName::Gate => &block.mlp.gate,
            LinearName::Up => &block.mlp.up,
            LinearName::Down => &block.mlp.down,
        })
    }

    fn linear_mut(&mut self, layer: usize, name: LinearName) -> Option<&mut Linear> {
        let block = self.blocks.get_mut(layer)?;
        Some(match name {
            LinearName::Q => &mut block.attn.q,
            LinearName::K => &mut block.attn.k,
            LinearName::V => &mut block.attn.v,
            LinearName::O => &mut block.attn.o,
            LinearName::Gate => &mut block.mlp.gate,
            LinearName::Up => &mut block.mlp.up,
            LinearName::Down => &mut block.mlp.down,
        })
    }

    /// The input width of linear `name` (its output width is the weight's rows).
    pub fn linear_in_dim(&self, name: LinearName) -> usize {
        let cfg = &self.config;
        match name {
            LinearName::O => cfg.num_heads * cfg.head_dim,
            LinearName::Down => cfg.intermediate_size,
            _ => cfg.hidden_size,
        }
    }

    /// A copy with `lora` set on block `layer`'s linear `name` (None removes it).
    /// Cheap: tensors are shared, only handles are copied.
    pub fn set_lora(
        &mut self,
        layer: usize,
        name: LinearName,
        lora: Option<crate::model::linear::LoraDelta>,
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
            for name in LinearName::ALL {
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
                let crate::model::linear::Weight::Float(w) = &linear.weight else {
                    anyhow::bail!("to_hf_layout needs float weights (call to_float first)");
                };
                linear.weight = crate::model::linear::Weight::Float(interleaved_to_halves(w, n)?);
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
                crate::model::linear::Weight::Float(w) => Ok(w.clone()),
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
            for name in LinearName::ALL {
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
            for name in LinearName::ALL {
                let path = Self::module_path(i, name);
                let weight = take(&format!("{path}.weight"))?;
                let bias = match has_bias.contains(&format!("{path}.bias")) {
                    true => Some(take(&format!("{path}.bias"))?),
                    false => None,
                };
                let linear = out.linear_mut(i, name).context("linear")?;
                linear.weight = crate::model::linear::Weight::Float(weight);
                linear.bias = bias;
            }
            out.blocks[i].attn.qkv = None;
            out.blocks[i].mlp.gate_up = None;
        }
        let eps = out.final_norm.eps;
        out.final_norm = RmsNorm::new(take("model.norm.weight")?, eps)?;
        out.head.weight = crate::model::linear::Weight::Float(match self.tied_head {
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
}
