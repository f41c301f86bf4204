//! The decode step on plain vectors: one new token for each sequence of a
//! batch, through the whole network. The same arithmetic as the tensor path; at
//! a few tokens, the per-op cost of ~30 small tensor operations a layer
//! (allocation, dispatch) was about a third of decode time.
//!
//! A batch shares every weight read: each linear layer multiplies all the
//! batch's rows in one pass over its packed weights (decode is bound by memory
//! bandwidth, so a batch of 8 costs far less than 8 steps), while norms, RoPE
//! and attention run per sequence against its own cache. Each sequence's
//! numbers are the same at any batch size (see `PackedMatrix::matmul`), so a
//! batched request records the log-probs it would have alone.

use anyhow::Result;

use super::attnres;
use super::cache::{decode_attention, KvCache, LayerKv};
use super::{Decoder, Kernels};
use crate::model::config::Residual;

impl Decoder {
    /// Next-token logits of a batch of sequences, each extended by its one new
    /// token: `tokens[r]` is fed after `caches[r]`, which gains that position.
    /// Returns one vocabulary-sized row per sequence.
    pub fn decode(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Vec<Vec<f32>>> {
        anyhow::ensure!(
            tokens.len() == caches.len(),
            "{} tokens for {} caches",
            tokens.len(),
            caches.len()
        );
        for cache in caches.iter() {
            anyhow::ensure!(
                cache.len() < self.config.context_length,
                "sequence of {} tokens exceeds the model's context length {}",
                cache.len() + 1,
                self.config.context_length
            );
        }
        let vocab = self.config.vocab_size;
        if self.kernels != Kernels::Fused {
            // The differentiable kernels exist for training; decode them one by one.
            let device = self.device().clone();
            return tokens
                .iter()
                .zip(caches.iter_mut())
                .map(|(&t, cache)| {
                    let ids = candle_core::Tensor::new(&[t], &device)?.unsqueeze(0)?;
                    Ok(self.forward_last(&ids, cache)?.squeeze(0)?.to_vec1()?)
                })
                .collect();
        }
        let hidden = self.decode_hidden(tokens, caches)?;
        let logits = self.head.forward_rows(&hidden, tokens.len())?;
        Ok(logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }

    /// The final-norm hidden states (batch, hidden) of one new token per sequence.
    pub(super) fn decode_hidden(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<f32>> {
        let hidden = self.config.hidden_size;
        if self.config.residual.is_attnres() {
            let mut out = Vec::with_capacity(tokens.len() * hidden);
            for (&token, cache) in tokens.iter().zip(caches.iter_mut()) {
                out.extend(self.decode_step_attnres(token, cache)?);
            }
            return Ok(out);
        }
        let mut x = Vec::with_capacity(tokens.len() * hidden);
        for &token in tokens {
            x.extend(self.embedding.get(token as usize)?.to_vec1::<f32>()?);
        }
        for i in 0..self.blocks.len() {
            let a = self.attention_rows(i, &x, caches)?;
            x.iter_mut().zip(a).for_each(|(xv, o)| *xv += o);
            let m = self.mlp_rows(i, &x)?;
            x.iter_mut().zip(m).for_each(|(xv, d)| *xv += d);
        }
        for cache in caches.iter_mut() {
            cache.len += 1;
        }
        for row in x.chunks_exact_mut(hidden) {
            self.final_norm.forward_in_place(row);
        }
        Ok(x)
    }

    /// The decode step with Attention Residuals, for one sequence. Depth
    /// attention is per token, so the KV cache is the ordinary one and only this
    /// token's sources are held. Block AttnRes runs the two-phase schedule: at
    /// each block start the block's queries are scored at once against the
    /// finished block sums ([`attnres::phase_one`]); each sublayer then merges
    /// the running partial sum by an online-softmax step ([`attnres::phase_two`]).
    fn decode_step_attnres(&self, token: u32, cache: &mut KvCache) -> Result<Vec<f32>> {
        let pos = cache.len;
        let total = 2 * self.blocks.len();
        let eps = self.config.rms_norm_eps as f32;
        let embedding: Vec<f32> = self.embedding.get(token as usize)?.to_vec1()?;
        let sublayer = |j: usize, h: &[f32], cache: &mut KvCache| -> Result<Vec<f32>> {
            match j % 2 {
                0 => self.attention_rows(j / 2, h, &mut [cache]),
                _ => self.mlp_rows(j / 2, h),
            }
        };
        let out = match self.config.residual {
            Residual::Block { size } => {
                let mut blocks = embedding;
                let mut partial: Option<Vec<f32>> = None;
                let mut states = Vec::new();
                let mut first = 0;
                for j in 0..total {
                    if j % size == 0 {
                        if let Some(p) = partial.take() {
                            blocks.extend_from_slice(&p);
                        }
                        // Phase 1 for the ops of sublayers j..j+size (sublayer 0 has none).
                        first = j.max(1);
                        let us: Vec<&[f32]> = (first..(j + size).min(total))
                            .map(|k| self.depth[k - 1].u.as_slice())
                            .collect();
                        states = attnres::phase_one(&blocks, &us, eps);
                    }
                    let h = match j {
                        0 => blocks.clone(),
                        _ => attnres::phase_two(
                            &states[j - first],
                            &self.depth[j - 1].u,
                            partial.as_deref(),
                            eps,
                        ),
                    };
                    let v = sublayer(j, &h, cache)?;
                    partial = Some(match partial.take() {
                        Some(mut p) => {
                            p.iter_mut().zip(&v).for_each(|(a, b)| *a += b);
                            p
                        }
                        None => v,
                    });
                }
                let readout = &self.depth[total - 1].u;
                let state = attnres::phase_one(&blocks, &[readout], eps);
                attnres::phase_two(&state[0], readout, partial.as_deref(), eps)
            }
            _ => {
                let mut sources = embedding;
                for j in 0..total {
                    let h = match j {
                        0 => sources.clone(),
                        _ => attnres::depth_attend(&sources, &self.depth[j - 1].u, eps),
                    };
                    let v = sublayer(j, &h, cache)?;
                    sources.extend_from_slice(&v);
                }
                attnres::depth_attend(&sources, &self.depth[total - 1].u, eps)
            }
        };
        debug_assert_eq!(cache.len, pos);
        cache.len = pos + 1;
        Ok(self.final_norm.forward_vec(&out))
    }

    /// Block `i`'s attention sublayer (PreNorm included) for one token per
    /// sequence (`x` is (batch, hidden)), each at its cache's next position,
    /// appending its key and value to that cache.
    fn attention_rows(&self, i: usize, x: &[f32], caches: &mut [&mut KvCache]) -> Result<Vec<f32>> {
        let cfg = &self.config;
        let (heads, kv_heads, dim) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let (q_width, kv_width) = (heads * dim, kv_heads * dim);
        let rows = caches.len();
        let block = &self.blocks[i];
        let h = self.norm_rows(&block.attn_norm, x);
        let a = &block.attn;
        let (mut q, mut k, v) = match &a.qkv {
            Some(fused) => {
                let qkv = fused.forward_rows(&h, rows)?;
                let mut q = Vec::with_capacity(rows * q_width);
                let mut k = Vec::with_capacity(rows * kv_width);
                let mut v = Vec::with_capacity(rows * kv_width);
                let width = q_width + 2 * kv_width;
                for (row, (hr, qkv)) in h
                    .chunks_exact(cfg.hidden_size)
                    .zip(qkv.chunks_exact(width))
                    .enumerate()
                {
                    q.extend_from_slice(&qkv[..q_width]);
                    k.extend_from_slice(&qkv[q_width..q_width + kv_width]);
                    v.extend_from_slice(&qkv[q_width + kv_width..]);
                    a.q.add_lora_vec(hr, &mut q[row * q_width..(row + 1) * q_width])?;
                    a.k.add_lora_vec(hr, &mut k[row * kv_width..(row + 1) * kv_width])?;
                    a.v.add_lora_vec(hr, &mut v[row * kv_width..(row + 1) * kv_width])?;
                }
                (q, k, v)
            }
            None => (
                a.q.forward_rows(&h, rows)?,
                a.k.forward_rows(&h, rows)?,
                a.v.forward_rows(&h, rows)?,
            ),
        };
        if let Some(norm) = &a.q_norm {
            norm.forward_heads_vec(&mut q);
        }
        if let Some(norm) = &a.k_norm {
            norm.forward_heads_vec(&mut k);
        }
        for (r, cache) in caches.iter_mut().enumerate() {
            let pos = cache.len;
            self.rope
                .apply_vec(&mut q[r * q_width..(r + 1) * q_width], pos, dim);
            let kr = &mut k[r * kv_width..(r + 1) * kv_width];
            self.rope.apply_vec(kr, pos, dim);
            let layer_kv = cache.layer(i);
            layer_kv.keys.extend_from_slice(kr);
            layer_kv
                .values
                .extend_from_slice(&v[r * kv_width..(r + 1) * kv_width]);
        }
        let layers: Vec<&LayerKv> = caches.iter().map(|c| &c.layers[i]).collect();
        let attended = decode_attention(&q, &layers, heads, kv_heads, dim);
        Ok(a.o.forward_rows(&attended, rows)?)
    }

    /// Block `i`'s MLP sublayer (PreNorm included) for the rows of `x`.
    fn mlp_rows(&self, i: usize, x: &[f32]) -> Result<Vec<f32>> {
        let rows = x.len() / self.config.hidden_size;
        let width = self.config.intermediate_size;
        let block = &self.blocks[i];
        let h = self.norm_rows(&block.mlp_norm, x);
        let m = &block.mlp;
        let (gate, up) = match &m.gate_up {
            Some(fused) => {
                let gu = fused.forward_rows(&h, rows)?;
                let mut gate = Vec::with_capacity(rows * width);
                let mut up = Vec::with_capacity(rows * width);
                for (row, (hr, gu)) in h
                    .chunks_exact(self.config.hidden_size)
                    .zip(gu.chunks_exact(2 * width))
                    .enumerate()
                {
                    gate.extend_from_slice(&gu[..width]);
                    up.extend_from_slice(&gu[width..]);
                    m.gate
                        .add_lora_vec(hr, &mut gate[row * width..(row + 1) * width])?;
                    m.up.add_lora_vec(hr, &mut up[row * width..(row + 1) * width])?;
                }
                (gate, up)
            }
            None => (m.gate.forward_rows(&h, rows)?, m.up.forward_rows(&h, rows)?),
        };
        let act: Vec<f32> = gate
            .iter()
            .zip(&up)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        Ok(m.down.forward_rows(&act, rows)?)
    }

    /// `norm` applied to each hidden-sized row of `x`.
    fn norm_rows(&self, norm: &super::RmsNorm, x: &[f32]) -> Vec<f32> {
        let mut h = x.to_vec();
        for row in h.chunks_exact_mut(self.config.hidden_size) {
            norm.forward_in_place(row);
        }
        h
    }
}
