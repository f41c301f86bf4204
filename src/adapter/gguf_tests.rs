//! The GGUF LoRA writer against llama.cpp's loader rules (src/llama-adapter.cpp):
//! names, shapes in ggml's dimension order, metadata, the Q/K row permutation.

use std::collections::HashMap;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};

use super::*;
use crate::model::testing::{write_tiny_gguf, TinySpec};
use crate::model::Model;

/// A tiny model of `spec` and a rank-2 adapter on every linear with random B.
fn model_and_adapter(spec: &TinySpec) -> (tempfile::TempDir, PathBuf, Adapter) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path, spec).unwrap();
    let model = Model::load(&path).unwrap();
    let hf = model.decoder.to_float().unwrap().to_hf_layout().unwrap();
    let adapter = Adapter::random_for_tests(&hf, 7);
    (dir, path, adapter)
}

/// The written file: its metadata and each tensor as f32 with its ggml `ne`.
fn read_back(bytes: &[u8]) -> (gguf_file::Content, HashMap<String, (Vec<usize>, Tensor)>) {
    let mut cursor = std::io::Cursor::new(bytes);
    let content = gguf_file::Content::read(&mut cursor).unwrap();
    let mut tensors = HashMap::new();
    for name in content.tensor_infos.keys() {
        let q = content.tensor(&mut cursor, name, &Device::Cpu).unwrap();
        assert_eq!(q.dtype(), GgmlDType::F32, "{name}");
        let ne: Vec<usize> = q.shape().dims().iter().rev().copied().collect();
        tensors.insert(name.clone(), (ne, q.dequantize(&Device::Cpu).unwrap()));
    }
    (content, tensors)
}

fn text(content: &gguf_file::Content, key: &str) -> String {
    match content.metadata.get(key) {
        Some(gguf_file::Value::String(s)) => s.clone(),
        other => panic!("{key}: {other:?}"),
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn names_shapes_and_metadata_follow_llama_cpps_loader() {
    let (_dir, model_path, adapter) = model_and_adapter(&TinySpec::default());
    let base = GgufBase::from_model_file(&model_path).unwrap();
    let bytes = to_gguf_lora(&adapter, &base, 12).unwrap();
    let (content, tensors) = read_back(&bytes);

    assert_eq!(text(&content, "general.type"), "adapter");
    assert_eq!(text(&content, "adapter.type"), "lora");
    assert_eq!(text(&content, "general.architecture"), "llama");
    match content.metadata.get("adapter.lora.alpha") {
        Some(gguf_file::Value::F32(a)) => assert_eq!(*a, 4.0),
        other => panic!("alpha: {other:?}"),
    }
    match content.metadata.get(STEP_KEY) {
        Some(gguf_file::Value::U64(s)) => assert_eq!(*s, 12),
        other => panic!("step: {other:?}"),
    }
    assert_eq!(tensors.len(), adapter.pairs.len() * 2);

    // The base model's own tensors, in ggml's order (ne[0] = in, ne[1] = out).
    let mut file = std::fs::File::open(&model_path).unwrap();
    let base_content = gguf_file::Content::read(&mut file).unwrap();
    for pair in &adapter.pairs {
        let name = gguf_tensor_name(pair.layer, pair.name);
        let base_ne: Vec<usize> = base_content.tensor_infos[&name]
            .shape
            .dims()
            .iter()
            .rev()
            .copied()
            .collect();
        let (a_ne, _) = &tensors[&format!("{name}.lora_a")];
        let (b_ne, _) = &tensors[&format!("{name}.lora_b")];
        // llama_adapter_lora_init_impl's checks, verbatim in meaning.
        assert_eq!(base_ne[0], a_ne[0], "{name}: base ne[0] vs lora_a ne[0]");
        assert_eq!(base_ne[1], b_ne[1], "{name}: base ne[1] vs lora_b ne[1]");
        assert_eq!(a_ne[1], b_ne[0], "{name}: lora_a is not transposed");
        assert_eq!(b_ne[0], 2, "{name}: rank is B's ne[0]");
    }
    // Every linear of every layer, under llama.cpp's names.
    for layer in 0..2 {
        for t in [
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ] {
            assert!(tensors.contains_key(&format!("blk.{layer}.{t}.weight.lora_a")));
        }
    }
}

#[test]
fn llama_q_and_k_rows_are_permuted_like_the_gguf_weights() {
    let spec = TinySpec::default();
    let (_dir, model_path, adapter) = model_and_adapter(&spec);
    let base = GgufBase::from_model_file(&model_path).unwrap();
    let (_, tensors) = read_back(&to_gguf_lora(&adapter, &base, 1).unwrap());
    for pair in &adapter.pairs {
        let name = gguf_tensor_name(pair.layer, pair.name);
        let (_, a) = &tensors[&format!("{name}.lora_a")];
        let (_, b) = &tensors[&format!("{name}.lora_b")];
        assert_eq!(max_diff(a, pair.a.as_tensor()), 0.0, "{name} A unchanged");
        let expected = match pair.name {
            LinearName::Q => halves_to_interleaved(pair.b.as_tensor(), spec.heads).unwrap(),
            LinearName::K => halves_to_interleaved(pair.b.as_tensor(), spec.kv_heads).unwrap(),
            _ => pair.b.as_tensor().clone(),
        };
        assert_eq!(max_diff(b, &expected), 0.0, "{name} B");
        if matches!(pair.name, LinearName::Q | LinearName::K) {
            // The permutation is not the identity: it matters.
            assert!(max_diff(b, pair.b.as_tensor()) > 0.0, "{name}");
        }
    }
}

#[test]
fn qwen_rows_are_not_permuted() {
    let spec = TinySpec {
        architecture: Architecture::Qwen2,
        untied_head: true,
        ..TinySpec::default()
    };
    let (_dir, model_path, adapter) = model_and_adapter(&spec);
    let base = GgufBase::from_model_file(&model_path).unwrap();
    let (content, tensors) = read_back(&to_gguf_lora(&adapter, &base, 1).unwrap());
    assert_eq!(text(&content, "general.architecture"), "qwen2");
    for pair in &adapter.pairs {
        let name = gguf_tensor_name(pair.layer, pair.name);
        let (_, b) = &tensors[&format!("{name}.lora_b")];
        assert_eq!(max_diff(b, pair.b.as_tensor()), 0.0, "{name}");
    }
}

#[test]
fn an_adapter_for_another_shape_is_refused() {
    let (_dir, _path, adapter) = model_and_adapter(&TinySpec::default());
    let other = tempfile::tempdir().unwrap();
    let wider = other.path().join("wider.gguf");
    write_tiny_gguf(
        &wider,
        &TinySpec {
            hidden: 128,
            ..TinySpec::default()
        },
    )
    .unwrap();
    let base = GgufBase::from_model_file(&wider).unwrap();
    let err = to_gguf_lora(&adapter, &base, 1).unwrap_err();
    assert!(format!("{err:#}").contains("do not fit"), "{err:#}");
}

#[test]
fn the_step_reads_back_from_a_written_file() {
    let (dir, model_path, adapter) = model_and_adapter(&TinySpec::default());
    let base = GgufBase::from_model_file(&model_path).unwrap();
    let path = dir.path().join("adapter-000005.gguf");
    write_gguf_lora(&adapter, &base, 5, &path).unwrap();
    assert_eq!(gguf_step(&path), Some(5));
    assert_eq!(gguf_step(&model_path), None);
    assert_eq!(
        gguf_path_for(Path::new("c/adapter-000005.safetensors")),
        Path::new("c/adapter-000005.gguf")
    );
}
