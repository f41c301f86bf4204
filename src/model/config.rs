//! Architecture facts of a decoder, read from GGUF metadata or from the JSON
//! config a from-scratch model is created from and saved with.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;

/// Which Llama-family variant a GGUF holds; decides biases, q/k norms and the
/// RoPE layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 1-3, SmolLM2: no attention biases; GGUF stores Q/K permuted for
    /// interleaved RoPE.
    Llama,
    /// Qwen2, Qwen2.5: q/k/v biases; RoPE on halves (NeoX layout), weights not permuted.
    Qwen2,
    /// Qwen3: no biases; each head of q and k RMS-normed before RoPE (on halves).
    Qwen3,
}

impl Architecture {
    /// The `general.architecture` name GGUF files use.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        }
    }

    /// q, k and v projections carry a bias.
    pub fn has_qkv_bias(self) -> bool {
        self == Architecture::Qwen2
    }

    /// Each head of q and k goes through its own RMSNorm before RoPE.
    pub fn has_qk_norm(self) -> bool {
        self == Architecture::Qwen3
    }
}

/// How RoPE's frequencies are stretched for long contexts, read from
/// `{arch}.rope.scaling.*`. (llama.cpp's own conversions of Llama 3.1+ ship
/// the llama3 scaling as a `rope_freqs.weight` tensor of per-frequency divisors
/// instead, which the decoder reads; see [`RopeScaling::divisors`].)
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Every frequency divided by `factor` (positions compressed).
    Linear { factor: f32 },
    /// Llama 3.1's `rope_scaling` (Hugging Face `rope_type: llama3`): frequencies
    /// whose wavelength exceeds `original_context / low_freq_factor` are divided
    /// by `factor`, those below `original_context / high_freq_factor` kept, and
    /// the band between interpolated smoothly.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_context: usize,
    },
}

impl RopeScaling {
    /// The divisor of each RoPE frequency θ_i = base^(-2i/d), i < d/2: what
    /// llama.cpp stores in `rope_freqs.weight` (HF's scaled inv_freq = θ_i / divisor).
    pub fn divisors(&self, head_dim: usize, base: f32) -> Vec<f32> {
        (0..head_dim / 2)
            .map(|i| {
                let freq = 1.0 / base.powf(2.0 * i as f32 / head_dim as f32);
                match *self {
                    RopeScaling::Linear { factor } => factor,
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_context,
                    } => {
                        let wavelen = 2.0 * std::f32::consts::PI / freq;
                        let original = original_context as f32;
                        if wavelen < original / high_freq_factor {
                            1.0
                        } else if wavelen > original / low_freq_factor {
                            factor
                        } else {
                            let smooth = (original / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            1.0 / ((1.0 - smooth) / factor + smooth)
                        }
                    }
                }
            })
            .collect()
    }
}

/// How each sublayer's input is formed from what came before it
/// (docs/ARCHITECTURE.md, "Attention Residuals"). Written `standard`, `attnres-full`
/// or `attnres-block:S` (S in sublayers: attention and MLP each count as one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Residual {
    /// PreNorm residual: h_l = h_{l-1} + f_{l-1}(h_{l-1}).
    #[default]
    Standard,
    /// Attention Residuals over the embedding and every earlier sublayer output.
    Full,
    /// Block AttnRes: sources are the embedding, the sums of finished blocks of
    /// `size` sublayers, and the current block's partial sum.
    Block { size: usize },
}

impl Residual {
    pub fn is_attnres(self) -> bool {
        self != Residual::Standard
    }
}

impl std::fmt::Display for Residual {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Residual::Standard => write!(f, "standard"),
            Residual::Full => write!(f, "attnres-full"),
            Residual::Block { size } => write!(f, "attnres-block:{size}"),
        }
    }
}

impl std::str::FromStr for Residual {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "standard" => Ok(Residual::Standard),
            "attnres-full" => Ok(Residual::Full),
            _ => {
                let size = s
                    .strip_prefix("attnres-block:")
                    .with_context(|| {
                        format!(
                            "unknown residual `{s}` (standard, attnres-full or attnres-block:S)"
                        )
                    })?
                    .parse::<usize>()
                    .with_context(|| format!("`{s}`: the block size is not a number"))?;
                anyhow::ensure!(size >= 1, "`{s}`: the block size must be at least 1");
                Ok(Residual::Block { size })
            }
        }
    }
}

impl serde::Serialize for Residual {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Residual {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f64,
    pub context_length: usize,
    /// GGUF models are always standard; a from-scratch model records its choice.
    #[serde(default)]
    pub residual: Residual,
    /// None: RoPE's plain frequencies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
}

impl ModelConfig {
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let arch_name = content
            .metadata
            .get("general.architecture")
            .context("GGUF metadata has no general.architecture")?
            .to_string()?
            .clone();
        let architecture = match arch_name.as_str() {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            "qwen3" => Architecture::Qwen3,
            other => bail!("architecture `{other}` is not supported (llama, qwen2 and qwen3 are)"),
        };
        let get = |key: &str| -> Result<&gguf_file::Value> {
            let full = format!("{arch_name}.{key}");
            content
                .metadata
                .get(&full)
                .with_context(|| format!("GGUF metadata has no {full}"))
        };
        let get_usize = |key: &str| -> Result<usize> {
            let v = get(key)?;
            let n = v
                .to_u32()
                .map(u64::from)
                .or_else(|_| v.to_u64())
                .with_context(|| format!("{arch_name}.{key} is not an integer"))?;
            Ok(n as usize)
        };
        let hidden_size = get_usize("embedding_length")?;
        let num_heads = get_usize("attention.head_count")?;
        let num_kv_heads = get_usize("attention.head_count_kv").unwrap_or(num_heads);
        anyhow::ensure!(
            num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0,
            "head counts {num_heads}/{num_kv_heads} are not a valid GQA layout"
        );
        // Mixtral-style GGUFs say `llama` too; their experts' tensors differ.
        if let Ok(experts @ 1..) = get_usize("expert_count") {
            bail!("`{arch_name}` with {experts} experts (mixture of experts) is not supported");
        }
        // Qwen3 heads are wider than hidden / heads; key_length says so.
        let head_dim = get_usize("attention.key_length").unwrap_or(hidden_size / num_heads);
        if let Ok(value_dim) = get_usize("attention.value_length") {
            anyhow::ensure!(
                value_dim == head_dim,
                "value heads of {value_dim} differ from key heads of {head_dim} (not supported)"
            );
        }
        let rope_dim = get_usize("rope.dimension_count").unwrap_or(head_dim);
        anyhow::ensure!(
            rope_dim == head_dim && head_dim > 0 && head_dim.is_multiple_of(2),
            "partial RoPE (over {rope_dim} of each head's {head_dim} dimensions) is not supported"
        );
        let vocab_size = match get_usize("vocab_size") {
            Ok(n) => n,
            Err(_) => content
                .metadata
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
                .map(Vec::len)
                .context("GGUF metadata has neither vocab_size nor tokenizer.ggml.tokens")?,
        };
        Ok(Self {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: get_usize("feed_forward_length")?,
            num_layers: get_usize("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta: get("rope.freq_base")
                .and_then(|v| Ok(v.to_f32()?))
                .unwrap_or(10_000.0),
            rms_norm_eps: get("attention.layer_norm_rms_epsilon")
                .and_then(|v| Ok(v.to_f32()?))
                .unwrap_or(1e-5) as f64,
            context_length: get_usize("context_length").unwrap_or(4096),
            residual: Residual::Standard,
            rope_scaling: rope_scaling(&get)?,
        })
    }
}

/// `{arch}.rope.scaling.*`: `type` none, linear (with `factor`) or llama3 (with
/// `factor`, `low_freq_factor`, `high_freq_factor`, `original_context_length`,
/// defaulting to Llama 3.1's 8, 1, 4 and 8192 as Hugging Face does).
fn rope_scaling<'c>(
    get: &dyn Fn(&str) -> Result<&'c gguf_file::Value>,
) -> Result<Option<RopeScaling>> {
    let Ok(kind) = get("rope.scaling.type") else {
        return Ok(None);
    };
    let kind = kind
        .to_string()
        .context("rope.scaling.type is not a string")?;
    let float = |key: &str, default: f32| -> Result<f32> {
        match get(key) {
            Ok(v) => v
                .to_f32()
                .or_else(|_| v.to_f64().map(|x| x as f32))
                .with_context(|| format!("{key} is not a number")),
            Err(_) => Ok(default),
        }
    };
    let scaling = match kind.as_str() {
        "none" | "" => return Ok(None),
        "linear" => RopeScaling::Linear {
            factor: float("rope.scaling.factor", 1.0)?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: float("rope.scaling.factor", 8.0)?,
            low_freq_factor: float("rope.scaling.low_freq_factor", 1.0)?,
            high_freq_factor: float("rope.scaling.high_freq_factor", 4.0)?,
            original_context: match get("rope.scaling.original_context_length") {
                Ok(v) => v
                    .to_u32()
                    .map(|n| n as usize)
                    .or_else(|_| v.to_u64().map(|n| n as usize))
                    .context("rope.scaling.original_context_length is not an integer")?,
                Err(_) => 8192,
            },
        },
        other => bail!("RoPE scaling `{other}` is not supported (linear and llama3 are)"),
    };
    if let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        ..
    } = scaling
    {
        anyhow::ensure!(
            factor > 0.0 && high_freq_factor > low_freq_factor && low_freq_factor > 0.0,
            "llama3 RoPE scaling needs factor > 0 and high_freq_factor > low_freq_factor > 0"
        );
    }
    Ok(Some(scaling))
}

#[cfg(test)]
mod tests {
    use super::*;
    use gguf_file::Value as V;

    /// The config of a GGUF header holding `arch`'s basic keys plus `extra`.
    fn config_of(arch: &str, extra: &[(&str, V)]) -> Result<ModelConfig> {
        let key = |k: &str| format!("{arch}.{k}");
        let mut md: Vec<(String, V)> = vec![
            ("general.architecture".into(), V::String(arch.into())),
            (key("embedding_length"), V::U32(64)),
            (key("attention.head_count"), V::U32(4)),
            (key("feed_forward_length"), V::U32(128)),
            (key("block_count"), V::U32(2)),
            (key("vocab_size"), V::U32(100)),
        ];
        md.extend(extra.iter().map(|(k, v)| (key(k), v.clone())));
        let refs: Vec<(&str, &V)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut bytes = std::io::Cursor::new(Vec::new());
        gguf_file::write(&mut bytes, &refs, &[])?;
        bytes.set_position(0);
        ModelConfig::from_gguf(&gguf_file::Content::read(&mut bytes)?)
    }

    #[test]
    fn head_size_comes_from_key_length() {
        let c = config_of("qwen3", &[("attention.key_length", V::U32(32))]).unwrap();
        assert_eq!((c.architecture, c.head_dim), (Architecture::Qwen3, 32));
        assert_eq!(config_of("llama", &[]).unwrap().head_dim, 16);
        let err = config_of("llama", &[("rope.dimension_count", V::U32(8))]).unwrap_err();
        assert!(err.to_string().contains("partial RoPE"), "{err}");
        let err = config_of("llama", &[("expert_count", V::U32(8))]).unwrap_err();
        assert!(err.to_string().contains("8 experts"), "{err}");
        let err = config_of("gemma2", &[]).unwrap_err();
        assert!(
            err.to_string().contains("`gemma2` is not supported"),
            "{err}"
        );
    }

    #[test]
    fn rope_scaling_is_read_from_metadata() {
        let llama3 = config_of(
            "llama",
            &[
                ("rope.scaling.type", V::String("llama3".into())),
                ("rope.scaling.factor", V::F32(32.0)),
            ],
        )
        .unwrap();
        // Unnamed fields take Llama 3.1's values.
        assert_eq!(
            llama3.rope_scaling,
            Some(RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_context: 8192,
            })
        );
        let linear = config_of(
            "llama",
            &[
                ("rope.scaling.type", V::String("linear".into())),
                ("rope.scaling.factor", V::F32(2.0)),
            ],
        )
        .unwrap();
        assert_eq!(
            linear.rope_scaling,
            Some(RopeScaling::Linear { factor: 2.0 })
        );
        let none = config_of("llama", &[("rope.scaling.type", V::String("none".into()))]);
        assert_eq!(none.unwrap().rope_scaling, None);
        let err =
            config_of("llama", &[("rope.scaling.type", V::String("yarn".into()))]).unwrap_err();
        assert!(err.to_string().contains("`yarn` is not supported"), "{err}");
    }

    #[test]
    fn llama3_divisors_keep_high_frequencies_and_divide_low_ones() {
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_context: 64,
        };
        // head_dim 16, base 10^4: wavelengths 6.3, 19.9, 62.8, 199, ...; kept
        // below 64/4 = 16, divided by 8 above 64, interpolated between.
        let d = scaling.divisors(16, 10_000.0);
        assert_eq!(d.len(), 8);
        assert_eq!(d[0], 1.0);
        assert!(d[1] > 1.0 && d[1] < d[2] && d[2] < 8.0, "{d:?}");
        assert!(d[3..].iter().all(|&x| x == 8.0), "{d:?}");
    }

    #[test]
    fn residual_names_round_trip() {
        for r in [
            Residual::Standard,
            Residual::Full,
            Residual::Block { size: 4 },
        ] {
            assert_eq!(r.to_string().parse::<Residual>().unwrap(), r);
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Residual>(&json).unwrap(), r);
        }
        assert!("attnres-block:0".parse::<Residual>().is_err());
        assert!("attnres-block".parse::<Residual>().is_err());
        assert!("mhc".parse::<Residual>().is_err());
    }
}
