//! The KV cache of one sequence, what a forward pass continues from ([`Past`]),
//! and the attention of prompt chunks and decode steps over a cache ([`flash`]).

use candle_core::{Device, Tensor};

use crate::model::flash;

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

    /// Appends a chunk's keys and values, (1, kv_heads, seq, dim) each, and
    /// attends its queries `q`, (1, heads, seq, dim) with RoPE applied, over
    /// every cached position ([`flash`]): the attended rows (seq, heads·dim).
    pub(super) fn append_and_attend(
        &mut self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
    ) -> candle_core::Result<Vec<f32>> {
        let (_, kv_heads, seq, dim) = k.dims4()?;
        self.append(k, v)?;
        let total = self.keys.len() / (kv_heads * dim);
        let shape = flash::Heads {
            heads,
            kv_heads,
            dim,
        };
        let q: Vec<f32> = q.flatten_all()?.to_vec1()?;
        Ok(flash::causal_attention(
            &q,
            &self.keys,
            &self.values,
            shape,
            total - seq,
        ))
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
/// positions (the token's own key and value already appended), straight on the
/// caches' vectors: at decode time the per-op overhead of tensor matmuls and
/// softmax is larger than the arithmetic. `q` is (batch, heads, dim), `layers`
/// one layer's cache per sequence; returns (batch, heads * dim). It is the
/// prompt's blocked attention ([`flash`]) with one query row, so a sequence's
/// numbers are the same at any batch size, and the same as when its position
/// is read as part of a prompt.
pub(super) fn decode_attention(
    q: &[f32],
    layers: &[&LayerKv],
    heads: usize,
    kv_heads: usize,
    dim: usize,
) -> Vec<f32> {
    let (width, kv_width) = (heads * dim, kv_heads * dim);
    let sequences: Vec<flash::Sequence> = layers
        .iter()
        .enumerate()
        .map(|(r, layer)| flash::Sequence {
            q: &q[r * width..(r + 1) * width],
            keys: &layer.keys,
            values: &layer.values,
            offset: layer.keys.len() / kv_width - 1,
        })
        .collect();
    flash::causal_attention_batch(
        &sequences,
        flash::Heads {
            heads,
            kv_heads,
            dim,
        },
    )
}

/// What a forward pass continues from.
pub(super) enum Past<'a> {
    /// Nothing: positions start at 0.
    None,
    /// A cache the pass appends its keys and values to (inference).
    Cache(&'a mut KvCache),
    /// Keys and values the pass attends to without extending them; with
    /// differentiable kernels no gradient reaches them.
    Fixed(&'a KvCache),
}

impl<'a> Past<'a> {
    pub(super) fn of(cache: Option<&'a mut KvCache>, context: Option<&'a KvCache>) -> Self {
        match (cache, context) {
            (Some(cache), _) => Past::Cache(cache),
            (None, Some(context)) => Past::Fixed(context),
            (None, None) => Past::None,
        }
    }

    pub(super) fn split(self) -> (Option<&'a mut KvCache>, Option<&'a KvCache>) {
        match self {
            Past::None => (None, None),
            Past::Cache(cache) => (Some(cache), None),
            Past::Fixed(context) => (None, Some(context)),
        }
    }
}
