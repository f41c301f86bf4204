//! A tiny random-weight model in the real GGUF format, so tests of the whole
//! runtime (loading, tokenizer, template, decoder, sampling, the CLI) run in
//! milliseconds and never need a download. Public so integration tests and
//! benchmarks can write one too.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::config::{Architecture, RopeScaling};

/// Shape of the tiny model: small, but with GQA, several layers and both Q4_1
/// and Q8_0 weights like the real default model.
pub struct TinySpec {
    pub architecture: Architecture,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// None: hidden / heads. Written as `attention.key_length` when set (and
    /// always for qwen3, whose readers require it).
    pub head_dim: Option<usize>,
    pub ffn: usize,
    pub context: usize,
    /// An `output.weight` LM head of its own (qwen2 models always have one).
    pub untied_head: bool,
    pub rope_scaling: Option<RopeScaling>,
    /// Writes the scaling as llama.cpp does for Llama 3.1+: a `rope_freqs.weight`
    /// tensor of per-frequency divisors, not `rope.scaling.*` metadata.
    pub rope_freqs_tensor: bool,
    pub seed: u64,
    /// Every linear weight in this GGUF type (None: the default model's mix of
    /// Q4_1 attention and Q8_0 MLP weights). k-quants need `hidden` and `ffn` to be
    /// multiples of 256.
    pub linear_dtype: Option<GgmlDType>,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            architecture: Architecture::Llama,
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: None,
            ffn: 128,
            context: 256,
            untied_head: false,
            rope_scaling: None,
            rope_freqs_tensor: false,
            seed: 0,
            linear_dtype: None,
        }
    }
}

impl TinySpec {
    /// A tiny Qwen3: per-head q/k norms, heads wider than hidden / heads.
    pub fn qwen3() -> Self {
        Self {
            architecture: Architecture::Qwen3,
            head_dim: Some(32),
            ..Self::default()
        }
    }

    /// A tiny Llama 3.1: untied head and llama3 RoPE scaling as a
    /// `rope_freqs.weight` tensor. The original context is short, so that the
    /// kept, interpolated and divided frequency bands all occur at head_dim 16.
    pub fn llama3() -> Self {
        Self {
            architecture: Architecture::Llama,
            untied_head: true,
            rope_scaling: Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_context: 64,
            }),
            rope_freqs_tensor: true,
            ..Self::default()
        }
    }
}

/// RoPE base of the tiny models.
const ROPE_THETA: f32 = 10_000.0;

const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const MERGES: [(&str, &str); 3] = [("h", "e"), ("Ġ", "t"), ("l", "l")];
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The tiny model's vocabulary: specials, 256 byte tokens, then merged tokens.
pub fn tiny_vocab() -> Vec<String> {
    let mut vocab: Vec<String> = SPECIAL_TOKENS.iter().map(|s| s.to_string()).collect();
    vocab.extend(super::tokenizer::byte_alphabet());
    vocab.extend(MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    vocab
}

/// Writes a random-weight model to `path`.
pub fn write_tiny_gguf(path: &Path, spec: &TinySpec) -> Result<()> {
    let vocab = tiny_vocab();
    let head_dim = spec.head_dim.unwrap_or(spec.hidden / spec.heads);
    let arch = spec.architecture.gguf_name();
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut random = |rows: usize, cols: usize, scale: f32| -> Result<Tensor> {
        let data: Vec<f32> = (0..rows * cols)
            .map(|_| rng.gen_range(-scale..scale))
            .collect();
        Ok(Tensor::from_vec(data, (rows, cols), &Device::Cpu)?)
    };
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut add = |name: String, t: Tensor, dtype: GgmlDType| -> Result<()> {
        let is_linear = name.starts_with("blk.") && name.ends_with(".weight") && t.rank() == 2;
        let dtype = match spec.linear_dtype {
            Some(linear) if is_linear => linear,
            _ => dtype,
        };
        let q = QTensor::quantize(&t, dtype).with_context(|| format!("quantizing {name}"))?;
        tensors.push((name, q));
        Ok(())
    };
    let (h, q, kv) = (spec.hidden, spec.heads * head_dim, spec.kv_heads * head_dim);
    add(
        "token_embd.weight".into(),
        random(vocab.len(), h, 1.0)?,
        GgmlDType::Q8_0,
    )?;
    for l in 0..spec.layers {
        let p = format!("blk.{l}");
        let norm = |t: Tensor| -> Result<Tensor> { Ok(((t + 1.0)?).flatten_all()?) };
        add(
            format!("{p}.attn_norm.weight"),
            norm(random(1, h, 0.2)?)?,
            GgmlDType::F32,
        )?;
        add(
            format!("{p}.ffn_norm.weight"),
            norm(random(1, h, 0.2)?)?,
            GgmlDType::F32,
        )?;
        add(
            format!("{p}.attn_q.weight"),
            random(q, h, 0.3)?,
            GgmlDType::Q4_1,
        )?;
        add(
            format!("{p}.attn_k.weight"),
            random(kv, h, 0.3)?,
            GgmlDType::Q4_1,
        )?;
        add(
            format!("{p}.attn_v.weight"),
            random(kv, h, 0.3)?,
            GgmlDType::Q4_1,
        )?;
        add(
            format!("{p}.attn_output.weight"),
            random(h, q, 0.15)?,
            GgmlDType::Q4_1,
        )?;
        add(
            format!("{p}.ffn_gate.weight"),
            random(spec.ffn, h, 0.2)?,
            GgmlDType::Q8_0,
        )?;
        add(
            format!("{p}.ffn_up.weight"),
            random(spec.ffn, h, 0.2)?,
            GgmlDType::Q8_0,
        )?;
        add(
            format!("{p}.ffn_down.weight"),
            random(h, spec.ffn, 0.1)?,
            GgmlDType::Q8_0,
        )?;
        if spec.architecture.has_qkv_bias() {
            add(
                format!("{p}.attn_q.bias"),
                random(1, q, 0.1)?.flatten_all()?,
                GgmlDType::F32,
            )?;
            add(
                format!("{p}.attn_k.bias"),
                random(1, kv, 0.1)?.flatten_all()?,
                GgmlDType::F32,
            )?;
            add(
                format!("{p}.attn_v.bias"),
                random(1, kv, 0.1)?.flatten_all()?,
                GgmlDType::F32,
            )?;
        }
        if spec.architecture.has_qk_norm() {
            for name in ["attn_q_norm", "attn_k_norm"] {
                add(
                    format!("{p}.{name}.weight"),
                    norm(random(1, head_dim, 0.2)?)?,
                    GgmlDType::F32,
                )?;
            }
        }
    }
    add(
        "output_norm.weight".into(),
        (random(1, h, 0.2)? + 1.0)?.flatten_all()?,
        GgmlDType::F32,
    )?;
    if spec.architecture == Architecture::Qwen2 || spec.untied_head {
        add(
            "output.weight".into(),
            random(vocab.len(), h, 1.0)?,
            GgmlDType::Q8_0,
        )?;
    }

    use gguf_file::Value as V;
    let u32v = |n: usize| V::U32(n as u32);
    let token_types: Vec<V> = (0..vocab.len())
        .map(|i| V::I32(if i < SPECIAL_TOKENS.len() { 3 } else { 1 }))
        .collect();
    let key = |k: &str| format!("{arch}.{k}");
    let metadata: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String(arch.into())),
        ("general.name".into(), V::String("claw-tiny".into())),
        (key("block_count"), u32v(spec.layers)),
        (key("context_length"), u32v(spec.context)),
        (key("embedding_length"), u32v(h)),
        (key("feed_forward_length"), u32v(spec.ffn)),
        (key("attention.head_count"), u32v(spec.heads)),
        (key("attention.head_count_kv"), u32v(spec.kv_heads)),
        (key("rope.freq_base"), V::F32(ROPE_THETA)),
        (key("rope.dimension_count"), u32v(head_dim)),
        (key("attention.layer_norm_rms_epsilon"), V::F32(1e-5)),
        (key("vocab_size"), u32v(vocab.len())),
        ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), V::String("smollm".into())),
        (
            "tokenizer.ggml.tokens".into(),
            V::Array(vocab.iter().cloned().map(V::String).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), V::Array(token_types)),
        (
            "tokenizer.ggml.merges".into(),
            V::Array(
                MERGES
                    .iter()
                    .map(|(a, b)| V::String(format!("{a} {b}")))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.bos_token_id".into(), V::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(2)),
        ("tokenizer.chat_template".into(), V::String(CHATML.into())),
    ];
    let mut metadata = metadata;
    if spec.head_dim.is_some() || spec.architecture == Architecture::Qwen3 {
        metadata.push((key("attention.key_length"), u32v(head_dim)));
        metadata.push((key("attention.value_length"), u32v(head_dim)));
    }
    if spec.architecture == Architecture::Qwen3 {
        // candle-transformers' quantized_qwen3 builds its RoPE tables in this
        // dtype (F16 when absent); F32 keeps it comparable with claw's.
        metadata.push(("general.dtype".into(), V::U32(0)));
    }
    match (&spec.rope_scaling, spec.rope_freqs_tensor) {
        (Some(scaling), true) => {
            let divisors = scaling.divisors(head_dim, ROPE_THETA);
            let n = divisors.len();
            add(
                "rope_freqs.weight".into(),
                Tensor::from_vec(divisors, n, &Device::Cpu)?,
                GgmlDType::F32,
            )?;
        }
        (Some(RopeScaling::Linear { factor }), false) => {
            metadata.push((key("rope.scaling.type"), V::String("linear".into())));
            metadata.push((key("rope.scaling.factor"), V::F32(*factor)));
        }
        (
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_context,
            }),
            false,
        ) => {
            metadata.extend([
                (key("rope.scaling.type"), V::String("llama3".into())),
                (key("rope.scaling.factor"), V::F32(*factor)),
                (
                    key("rope.scaling.low_freq_factor"),
                    V::F32(*low_freq_factor),
                ),
                (
                    key("rope.scaling.high_freq_factor"),
                    V::F32(*high_freq_factor),
                ),
                (
                    key("rope.scaling.original_context_length"),
                    u32v(*original_context),
                ),
            ]);
        }
        (None, _) => {}
    }
    let md_refs: Vec<(&str, &V)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let tmp = path.with_extension("gguf.tmp");
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?,
    );
    gguf_file::write(&mut file, &md_refs, &t_refs)?;
    std::io::Write::flush(&mut file)?;
    drop(file);
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Largest absolute difference between two tensors of one shape (for tests
/// that compare a fused op with its composition).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar())
        .expect("tensors of one shape")
}
