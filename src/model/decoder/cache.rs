//! The KV cache of one sequence, and the attention of a decode step over it.

use candle_core::{Device, Tensor};

use crate::model::kernels::dot_f32;
use crate::model::pool::{HotPool, SharedOut};

/// Keys and values of the positions seen so far, one entry per layer. Each request
/// owns one; the decoder itself is shared and immutable.
///
/// Stored position-major, (positions, kv_heads, head_dim) in plain vectors: a new
/// token appends in place (no re-copy of the whole cache per step, as a tensor
/// concatenation would do), and single-token attention reads it directly. A cache
/// holds one sequence and is for inference: no gradient flows through it.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub(super) layers: Vec<LayerKv>,
    pub(super) len: usize,
}

#[derive(Debug, Clone, Default)]
pub(super) struct LayerKv {
    pub(super) keys: Vec<f32>,
    pub(super) values: Vec<f32>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A copy of the first `n` positions (all of them when `n >= len`): how a
    /// cached prompt prefix starts a new request without being consumed.
    pub fn prefix(&self, n: usize) -> Self {
        let n = n.min(self.len);
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let width = self.width(l);
                LayerKv {
                    keys: l.keys[..n * width].to_vec(),
                    values: l.values[..n * width].to_vec(),
                }
            })
            .collect();
        Self { layers, len: n }
    }

    /// Keeps only the first `n` positions.
    pub fn truncate(&mut self, n: usize) {
        if n >= self.len {
            return;
        }
        for i in 0..self.layers.len() {
            let width = self.width(&self.layers[i]);
            let layer = &mut self.layers[i];
            layer.keys.truncate(n * width);
            layer.values.truncate(n * width);
        }
        self.len = n;
    }

    /// Memory held (allocated capacity), in bytes.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.keys.capacity() + l.values.capacity()) * std::mem::size_of::<f32>())
            .sum()
    }

    /// Frees the growth headroom, so that [`bytes`](Self::bytes) is what the
    /// positions need (for a cache kept around, not appended to).
    pub fn shrink_to_fit(&mut self) {
        for layer in &mut self.layers {
            layer.keys.shrink_to_fit();
            layer.values.shrink_to_fit();
        }
    }

    /// Floats per position in `layer` (kv_heads * head_dim).
    fn width(&self, layer: &LayerKv) -> usize {
        layer.keys.len().checked_div(self.len).unwrap_or(0)
    }

    pub(super) fn layer(&mut self, layer: usize) -> &mut LayerKv {
        if self.layers.len() <= layer {
            self.layers.resize_with(layer + 1, LayerKv::default);
        }
        &mut self.layers[layer]
    }
}

impl LayerKv {
    /// Appends `k`, `v` of shape (1, kv_heads, seq, dim).
    pub(super) fn append(&mut self, k: &Tensor, v: &Tensor) -> candle_core::Result<()> {
        for (store, t) in [(&mut self.keys, k), (&mut self.values, v)] {
            let position_major = t.squeeze(0)?.transpose(0, 1)?.contiguous()?;
            store.extend_from_slice(&position_major.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(())
    }

    /// Everything cached as tensors (1, kv_heads, positions, dim).
    pub(super) fn tensors(
        &self,
        kv_heads: usize,
        dim: usize,
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let positions = self.keys.len() / (kv_heads * dim);
        let as_tensor = |data: &[f32]| -> candle_core::Result<Tensor> {
            Tensor::from_slice(data, (positions, kv_heads, dim), device)?
                .transpose(0, 1)?
                .contiguous()?
                .unsqueeze(0)
        };
        Ok((as_tensor(&self.keys)?, as_tensor(&self.values)?))
    }
}

/// Attention of one new token per sequence over that sequence's cached
/// positions, straight on the caches' vectors: at decode time the per-op
/// overhead of tensor matmuls and softmax is larger than the arithmetic. `q` is
/// (batch, heads, dim), `layers` one layer's cache per sequence; returns (batch,
/// heads * dim). Every (sequence, head) is computed on its own, the same way at
/// any batch size, so batching does not change a sequence's numbers.
pub(super) fn decode_attention(
    q: &[f32],
    layers: &[&LayerKv],
    heads: usize,
    kv_heads: usize,
    dim: usize,
) -> Vec<f32> {
    let group = heads / kv_heads;
    let scale = 1.0 / (dim as f32).sqrt();
    let head_output = |task: usize, out: &mut [f32]| {
        let (seq, h) = (task / heads, task % heads);
        let cache = layers[seq];
        let positions = cache.keys.len() / (kv_heads * dim);
        let kv = h / group;
        let qh = &q[task * dim..(task + 1) * dim];
        let at = |t: usize| (t * kv_heads + kv) * dim;
        let mut scores: Vec<f32> = (0..positions)
            .map(|t| dot_f32(qh, &cache.keys[at(t)..at(t) + dim]) * scale)
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0;
        for s in &mut scores {
            *s = (*s - max).exp();
            total += *s;
        }
        for (t, p) in scores.iter().enumerate() {
            let weight = p / total;
            for (o, v) in out.iter_mut().zip(&cache.values[at(t)..at(t) + dim]) {
                *o += weight * v;
            }
        }
    };
    let tasks = layers.len() * heads;
    let mut out = vec![0f32; tasks * dim];
    let work: usize = layers.iter().map(|l| l.keys.len()).sum::<usize>() * group;
    // Threads pay off only once the contexts are long.
    if work >= 1 << 18 {
        let shared = SharedOut::new(&mut out);
        HotPool::global().run(tasks, &|task| {
            // SAFETY: each task writes only its own head's `dim` outputs.
            head_output(task, unsafe { shared.range(task * dim, (task + 1) * dim) })
        });
    } else {
        for (task, chunk) in out.chunks_exact_mut(dim).enumerate() {
            head_output(task, chunk);
        }
    }
    out
}
