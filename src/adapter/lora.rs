//! LoRA adapters: y = Wx + (alpha/r)·B(Ax) on chosen linears, trained as candle
//! `Var`s and saved with PEFT's tensor names and config, so the files also load in
//! Hugging Face PEFT (and PEFT adapters load here).
//!
//! Adapters are always stored in the Hugging Face row layout. A llama-arch GGUF
//! served as stored keeps Q/K rows permuted for interleaved RoPE, so applying an
//! adapter there permutes the rows of the q/k `B` matrices to match.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::layout::config_path_for;
use crate::model::decoder::{halves_to_interleaved, Decoder, LinearName, RopeLayout};
use crate::model::linear::LoraDelta;

/// What an adapter adapts: rank, scale and target linears.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// The adapted linears, in block order (serialized as `q_proj`, ...).
    pub targets: Vec<LinearName>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            targets: LinearName::ALL.to_vec(),
        }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Parses `q,k,v,o,gate,up,down` (with or without `_proj`), or `all`.
    pub fn parse_targets(spec: &str) -> Result<Vec<LinearName>> {
        if spec.trim() == "all" {
            return Ok(LinearName::ALL.to_vec());
        }
        let mut out = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let name = match part.ends_with("_proj") {
                true => LinearName::from_hf(part),
                false => LinearName::from_hf(&format!("{part}_proj")),
            };
            let Some(name) = name else {
                bail!(
                    "unknown LoRA target `{part}`: expected some of q,k,v,o,gate,up,down (or all)"
                );
            };
            out.push(name);
        }
        anyhow::ensure!(!out.is_empty(), "no LoRA targets given");
        Ok(canonical_order(out))
    }
}

/// One adapted linear: A (rank, in) and B (out, rank).
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub layer: usize,
    pub name: LinearName,
    pub a: Var,
    pub b: Var,
}

impl LoraPair {
    /// PEFT's tensor name prefix, e.g.
    /// `base_model.model.model.layers.3.self_attn.q_proj`.
    pub fn peft_prefix(&self) -> String {
        format!(
            "base_model.model.{}",
            Decoder::module_path(self.layer, self.name)
        )
    }
}

/// A LoRA adapter for one decoder.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub config: LoraConfig,
    pub pairs: Vec<LoraPair>,
}

/// The JSON written beside an adapter: PEFT's `adapter_config.json` keys plus
/// claw's own (`claw_step` is the policy version).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterFileConfig {
    pub peft_type: String,
    pub task_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub bias: String,
    pub target_modules: Vec<String>,
    pub base_model_name_or_path: String,
    #[serde(default)]
    pub claw_step: u64,
    #[serde(default)]
    pub claw_metrics: serde_json::Value,
    /// Daemon mode: which inputs this checkpoint has consumed (src/daemon/train.rs).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub claw_ledger: serde_json::Value,
}

#[cfg(test)]
impl Adapter {
    /// A rank-2 adapter whose B is random too, so that it changes the model
    /// (`hf`: a decoder in the Hugging Face layout).
    pub fn random_for_tests(hf: &Decoder, seed: u64) -> Adapter {
        let adapter = Adapter::new(
            hf,
            LoraConfig {
                rank: 2,
                alpha: 4.0,
                ..Default::default()
            },
            seed,
        )
        .unwrap();
        for p in &adapter.pairs {
            let b = candle_core::Tensor::randn(0f32, 0.1, p.b.shape(), hf.device()).unwrap();
            p.b.set(&b).unwrap();
        }
        adapter
    }
}

impl Adapter {
    /// A fresh adapter: A uniform in ±1/sqrt(in) (PEFT's kaiming-uniform with
    /// a = sqrt(5)), B zero, so the adapted model starts equal to the base.
    pub fn new(decoder: &Decoder, config: LoraConfig, seed: u64) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let device = decoder.device().clone();
        let mut pairs = Vec::new();
        for layer in 0..decoder.config.num_layers {
            for &name in &config.targets {
                let linear = decoder
                    .linear(layer, name)
                    .with_context(|| format!("no linear {name} in layer {layer}"))?;
                let (out, inp) = (linear.out_dim()?, decoder.linear_in_dim(name));
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<f32> = (0..config.rank * inp)
                    .map(|_| rng.gen_range(-bound..bound) as f32)
                    .collect();
                pairs.push(LoraPair {
                    layer,
                    name,
                    a: Var::from_vec(a, (config.rank, inp), &device)?,
                    b: Var::zeros((out, config.rank), DType::F32, &device)?,
                });
            }
        }
        Ok(Self { config, pairs })
    }

    /// Every trainable tensor under its PEFT name (as saved).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.pairs
            .iter()
            .flat_map(|p| {
                let prefix = p.peft_prefix();
                [
                    (format!("{prefix}.lora_A.weight"), p.a.clone()),
                    (format!("{prefix}.lora_B.weight"), p.b.clone()),
                ]
            })
            .collect()
    }

    /// The tensors under PEFT's names.
    pub fn named_tensors(&self) -> BTreeMap<String, Tensor> {
        self.named_vars()
            .into_iter()
            .map(|(name, var)| (name, var.as_tensor().clone()))
            .collect()
    }

    /// `decoder` with this adapter on, for training: gradients reach A and B.
    pub fn apply(&self, decoder: &Decoder) -> Result<Decoder> {
        self.apply_with(decoder, |a, b, s| Ok(LoraDelta::new(a, b, s)?))
    }

    /// `decoder` with this adapter's current values on, detached from the
    /// graph and ready for the one-token decode step: for serving.
    pub fn apply_for_serving(&self, decoder: &Decoder) -> Result<Decoder> {
        self.apply_with(decoder, |a, b, s| Ok(LoraDelta::for_serving(a, b, s)?))
    }

    fn apply_with(
        &self,
        decoder: &Decoder,
        make: impl Fn(Tensor, Tensor, f64) -> Result<LoraDelta>,
    ) -> Result<Decoder> {
        let mut out = decoder.clone();
        let scale = self.config.scale();
        let interleaved = decoder.rope_layout() == RopeLayout::Interleaved;
        for pair in &self.pairs {
            anyhow::ensure!(
                pair.layer < decoder.config.num_layers,
                "adapter has layer {} but the model has {} layers",
                pair.layer,
                decoder.config.num_layers
            );
            let mut b = pair.b.as_tensor().clone();
            if interleaved {
                let heads = match pair.name {
                    LinearName::Q => Some(decoder.config.num_heads),
                    LinearName::K => Some(decoder.config.num_kv_heads),
                    _ => None,
                };
                if let Some(heads) = heads {
                    b = halves_to_interleaved(&b, heads)?;
                }
            }
            let linear = decoder.linear(pair.layer, pair.name).context("linear")?;
            let (out_dim, in_dim) = (linear.out_dim()?, decoder.linear_in_dim(pair.name));
            anyhow::ensure!(
                b.dims2()? == (out_dim, self.config.rank)
                    && pair.a.dims2()? == (self.config.rank, in_dim),
                "{}: LoRA shapes A {:?} B {:?} do not fit a ({out_dim}, {in_dim}) linear of rank {}",
                pair.peft_prefix(),
                pair.a.dims(),
                pair.b.dims(),
                self.config.rank
            );
            out.set_lora(
                pair.layer,
                pair.name,
                Some(make(pair.a.as_tensor().clone(), b, scale)?),
            )?;
        }
        Ok(out)
    }

    /// Serializes to safetensors bytes (with PEFT's `format: pt` metadata).
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let tensors = self.named_tensors();
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        Ok(safetensors::serialize(tensors.iter(), Some(metadata))?)
    }

    /// The JSON config written beside the tensors.
    pub fn file_config(&self, base_model: &str, step: u64) -> AdapterFileConfig {
        AdapterFileConfig {
            peft_type: "LORA".into(),
            task_type: "CAUSAL_LM".into(),
            r: self.config.rank,
            lora_alpha: self.config.alpha,
            lora_dropout: 0.0,
            bias: "none".into(),
            target_modules: self.config.targets.iter().map(|t| t.to_string()).collect(),
            base_model_name_or_path: base_model.into(),
            claw_step: step,
            claw_metrics: serde_json::Value::Null,
            claw_ledger: serde_json::Value::Null,
        }
    }

    /// Loads `NAME.safetensors` and its config `NAME.json` (or PEFT's
    /// `adapter_config.json` in the same directory).
    pub fn load(path: &Path, device: &Device) -> Result<(Self, AdapterFileConfig)> {
        let config_path = config_path_for(path);
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("cannot read the adapter config {}", config_path.display()))?;
        let file_config: AdapterFileConfig = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a LoRA adapter config", config_path.display()))?;
        anyhow::ensure!(
            file_config.peft_type.eq_ignore_ascii_case("lora"),
            "{}: peft_type is {}, only LORA is supported",
            config_path.display(),
            file_config.peft_type
        );
        anyhow::ensure!(
            file_config.r > 0,
            "{}: rank r must be positive",
            config_path.display()
        );
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read adapter {}", path.display()))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, device)
            .with_context(|| format!("{}: not a safetensors file", path.display()))?;
        let mut by_module: BTreeMap<(usize, LinearName), (Option<Tensor>, Option<Tensor>)> =
            BTreeMap::new();
        for (key, tensor) in tensors {
            let (layer, name, which) = parse_peft_name(&key).with_context(|| {
                format!(
                    "{}: unexpected tensor `{key}` in a LoRA adapter",
                    path.display()
                )
            })?;
            let entry = by_module.entry((layer, name)).or_default();
            let tensor = tensor.to_dtype(DType::F32)?;
            match which {
                'A' => entry.0 = Some(tensor),
                _ => entry.1 = Some(tensor),
            }
        }
        anyhow::ensure!(
            !by_module.is_empty(),
            "{}: the adapter holds no LoRA tensors",
            path.display()
        );
        let mut pairs = Vec::new();
        let mut targets = Vec::new();
        for ((layer, name), (a, b)) in by_module {
            let (Some(a), Some(b)) = (a, b) else {
                bail!(
                    "{}: layer {layer} {name} has only one of lora_A / lora_B",
                    path.display()
                );
            };
            targets.push(name);
            pairs.push(LoraPair {
                layer,
                name,
                a: Var::from_tensor(&a)?,
                b: Var::from_tensor(&b)?,
            });
        }
        let config = LoraConfig {
            rank: file_config.r,
            alpha: file_config.lora_alpha,
            targets: canonical_order(targets),
        };
        Ok((Self { config, pairs }, file_config))
    }
}

/// `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` →
/// (3, Q, 'A'). Also accepts PEFT's `.lora_A.default.weight` spelling.
fn parse_peft_name(key: &str) -> Option<(usize, LinearName, char)> {
    let rest = key.split("layers.").nth(1)?;
    let mut parts = rest.split('.');
    let layer: usize = parts.next()?.parse().ok()?;
    let _group = parts.next()?;
    let name = LinearName::from_hf(parts.next()?)?;
    let which = match parts.next()? {
        "lora_A" => 'A',
        "lora_B" => 'B',
        _ => return None,
    };
    Some((layer, name, which))
}

/// Targets in block order (q, k, v, o, gate, up, down), once each, whatever
/// order they came in.
fn canonical_order(mut targets: Vec<LinearName>) -> Vec<LinearName> {
    targets.sort();
    targets.dedup();
    targets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_peft_names() {
        assert_eq!(
            parse_peft_name("base_model.model.model.layers.12.mlp.down_proj.lora_B.weight"),
            Some((12, LinearName::Down, 'B'))
        );
        assert_eq!(
            parse_peft_name(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
            ),
            Some((0, LinearName::Q, 'A'))
        );
        assert_eq!(parse_peft_name("model.embed_tokens.weight"), None);
    }

    #[test]
    fn parses_targets() {
        assert_eq!(
            LoraConfig::parse_targets("v_proj,q,q").unwrap(),
            vec![LinearName::Q, LinearName::V]
        );
        assert_eq!(LoraConfig::parse_targets("all").unwrap().len(), 7);
        assert!(LoraConfig::parse_targets("qq").is_err());
    }
}
