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

use super::config::Architecture;

/// Shape of the tiny model: small, but with GQA, several layers and both Q4_1
/// and Q8_0 weights like the real default model.
pub struct TinySpec {
    pub architecture: Architecture,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub context: usize,
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
            ffn: 128,
            context: 256,
            seed: 0,
            linear_dtype: None,
        }
    }
}

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
    let head_dim = spec.hidden / spec.heads;
    let arch = match spec.architecture {
        Architecture::Llama => "llama",
        Architecture::Qwen2 => "qwen2",
    };
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
    let (h, kv) = (spec.hidden, spec.kv_heads * head_dim);
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
            random(h, h, 0.3)?,
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
            random(h, h, 0.15)?,
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
        if spec.architecture == Architecture::Qwen2 {
            add(
                format!("{p}.attn_q.bias"),
                random(1, h, 0.1)?.flatten_all()?,
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
    }
    add(
        "output_norm.weight".into(),
        (random(1, h, 0.2)? + 1.0)?.flatten_all()?,
        GgmlDType::F32,
    )?;
    if spec.architecture == Architecture::Qwen2 {
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
        (key("rope.freq_base"), V::F32(10_000.0)),
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
