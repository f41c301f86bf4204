//! Fused operations with their own backward pass, for the training path.
//!
//! candle's fused rms_norm, rope and softmax have no backward, and their
//! compositions from differentiable primitives (`RmsNorm::forward_diff`,
//! `rope_slow`, mask-add + `softmax`) cost 5-7 ops each: every op allocates a
//! full activation that the graph keeps until backward, and synchronises the
//! thread pool. These do each in one pass forward and one backward, with the
//! gradient formulas written out; tests check values and gradients against the
//! compositions.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

pub(crate) fn f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: f32 only");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: the input must be contiguous"),
    }
}

/// The f32 elements of a contiguous CPU tensor, borrowed from its storage. The
/// backward passes read their inputs through this: copying them out first
/// (`to_vec1`) cost a single-threaded pass and a fresh allocation per input.
pub(crate) struct F32View<G> {
    /// The storage's read guard (candle's lock type is not public).
    storage: G,
    start: usize,
    end: usize,
}

/// A view of `t`'s elements; `t` must be contiguous (call `.contiguous()`
/// first where it may not be).
pub(crate) fn f32_view<'a>(
    t: &'a Tensor,
    op: &str,
) -> Result<F32View<impl std::ops::Deref<Target = Storage> + 'a>> {
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: the input must be contiguous");
    };
    match &*storage {
        Storage::Cpu(CpuStorage::F32(_)) => Ok(F32View {
            storage,
            start,
            end,
        }),
        _ => candle_core::bail!("{op}: f32 CPU tensors only"),
    }
}

impl<G: std::ops::Deref<Target = Storage>> std::ops::Deref for F32View<G> {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(data)) => &data[self.start..self.end],
            _ => unreachable!("checked in f32_view"),
        }
    }
}

/// Rows of this many elements or more are worth splitting across threads.
const PAR_MIN: usize = 1 << 14;

fn for_rows(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(width)
            .enumerate()
            .for_each(|(r, row)| f(r, row));
    } else {
        out.chunks_mut(width)
            .enumerate()
            .for_each(|(r, row)| f(r, row));
    }
}

/// y = x / sqrt(mean(x²) + eps) * w over the last dimension.
pub struct RmsNormOp {
    pub eps: f32,
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm-diff"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, self.name())?;
        let w = f32_slice(ws, wl, self.name())?;
        let d = w.len();
        let mut y = vec![0f32; x.len()];
        for_rows(&mut y, d, |r, out| {
            let row = &x[r * d..(r + 1) * d];
            let inv = inv_rms(row, self.eps);
            for ((o, v), wv) in out.iter_mut().zip(row).zip(w) {
                *o = v * inv * wv;
            }
        });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = w.elem_count();
        let grad = grad.contiguous()?;
        let xv = f32_view(x, self.name())?;
        let wv = f32_view(w, self.name())?;
        let gv = f32_view(&grad, self.name())?;
        let mut dx = vec![0f32; xv.len()];
        for_rows(&mut dx, d, |r, out| {
            let row = &xv[r * d..(r + 1) * d];
            let g = &gv[r * d..(r + 1) * d];
            let inv = inv_rms(row, self.eps);
            // u = g·w; dx = inv·u − x·inv³·mean(u·x)
            let dot: f32 = g
                .iter()
                .zip(wv.iter())
                .zip(row)
                .map(|((g, w), x)| g * w * x)
                .sum();
            let k = inv * inv * inv * dot / d as f32;
            for (((o, g), w), x) in out.iter_mut().zip(g).zip(wv.iter()).zip(row) {
                *o = inv * g * w - x * k;
            }
        });
        // dw = Σ_rows g·x·inv
        let rows = xv.len() / d.max(1);
        let dw = (0..rows)
            .into_par_iter()
            .fold(
                || vec![0f32; d],
                |mut acc, r| {
                    let row = &xv[r * d..(r + 1) * d];
                    let g = &gv[r * d..(r + 1) * d];
                    let inv = inv_rms(row, self.eps);
                    for ((a, g), x) in acc.iter_mut().zip(g).zip(row) {
                        *a += g * x * inv;
                    }
                    acc
                },
            )
            .reduce(
                || vec![0f32; d],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                    a
                },
            );
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
        ))
    }
}

/// h = silu(gate) · up, elementwise: the SwiGLU activation of the MLP. candle's
/// `silu` and `mul` run on one thread and their backward composes ~10 more
/// single-threaded ops over the (tokens, intermediate) activations, the largest
/// of a layer; this does forward and backward each in one parallel pass.
pub struct SiluMul;

fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

/// Elementwise work is split into chunks of this many elements.
const CHUNK: usize = 1 << 12;

/// Fills two equally long outputs chunk by chunk, across threads when large:
/// `f(start, a, b)` writes elements `start..start + a.len()` of both.
fn for_chunks2(
    a: &mut [f32],
    b: &mut [f32],
    f: impl Fn(usize, &mut [f32], &mut [f32]) + Sync + Send,
) {
    if a.len() >= PAR_MIN {
        a.par_chunks_mut(CHUNK)
            .zip(b.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(c, (a, b))| f(c * CHUNK, a, b));
    } else {
        f(0, a, b);
    }
}

/// Like [`for_chunks2`] for one output.
fn for_chunks(out: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, out)| f(c * CHUNK, out));
    } else {
        f(0, out);
    }
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(gs, gl, self.name())?;
        let u = f32_slice(us, ul, self.name())?;
        if gl.shape() != ul.shape() {
            candle_core::bail!(
                "silu-mul: gate {:?} and up {:?} differ",
                gl.shape(),
                ul.shape()
            );
        }
        let mut h = vec![0f32; g.len()];
        for_chunks(&mut h, |start, h| {
            let end = start + h.len();
            for ((h, g), u) in h.iter_mut().zip(&g[start..end]).zip(&u[start..end]) {
                *h = silu(*g) * u;
            }
        });
        Ok((CpuStorage::F32(h), gl.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _h: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let g = f32_view(gate, self.name())?;
        let u = f32_view(up, self.name())?;
        let dh = f32_view(&grad, self.name())?;
        let (mut dg, mut du) = (vec![0f32; g.len()], vec![0f32; g.len()]);
        // One pass for both: d silu(g)/dg = s·(1 + g·(1 − s)), s = sigmoid(g).
        for_chunks2(&mut dg, &mut du, |start, dg, du| {
            let end = start + dg.len();
            let (g, u, dh) = (&g[start..end], &u[start..end], &dh[start..end]);
            for i in 0..dg.len() {
                let s = 1.0 / (1.0 + (-g[i]).exp());
                du[i] = dh[i] * g[i] * s;
                dg[i] = dh[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            }
        });
        Ok((
            Some(Tensor::from_vec(dg, gate.shape(), gate.device())?),
            Some(Tensor::from_vec(du, up.shape(), up.device())?),
        ))
    }
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    1.0 / (mean_sq + eps).sqrt()
}

/// softmax(scale · x) over the last dimension with a causal mask: row r of each
/// `(seq, total)` block is query position `offset + r % seq` and sees keys
/// `0..=offset + r % seq`. For attention scores (b, kv, group·seq, total); the
/// 1/sqrt(d) scale is folded in to save a pass (and its backward) over them.
pub struct CausalSoftmax {
    pub seq: usize,
    pub offset: usize,
    /// Positive.
    pub scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let total = *l.shape().dims().last().unwrap_or(&1);
        let mut y = vec![0f32; x.len()];
        for_rows(&mut y, total, |r, out| {
            let visible = (self.offset + r % self.seq + 1).min(total);
            let row = &x[r * total..r * total + visible];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (o, v) in out.iter_mut().zip(row) {
                *o = ((v - max) * self.scale).exp();
                sum += *o;
            }
            let inv = 1.0 / sum;
            out[..visible].iter_mut().for_each(|o| *o *= inv);
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let total = y.dim(candle_core::D::Minus1)?;
        let grad = grad.contiguous()?;
        let yv = f32_view(y, self.name())?;
        let gv = f32_view(&grad, self.name())?;
        let mut dx = vec![0f32; yv.len()];
        for_rows(&mut dx, total, |r, out| {
            let y = &yv[r * total..(r + 1) * total];
            let g = &gv[r * total..(r + 1) * total];
            let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
            for ((o, y), g) in out.iter_mut().zip(y).zip(g) {
                *o = self.scale * y * (g - dot);
            }
        });
        Ok(Some(Tensor::from_vec(dx, y.shape(), y.device())?))
    }
}

/// RoPE on (batch, heads, seq, dim) in place of `rope_slow` / `rope_i_slow`:
/// pairs (i, i + d/2) (`interleaved` false) or (2i, 2i + 1), positions from
/// `offset`; `cos`/`sin` are (positions, d/2) tables.
pub struct RopeOp {
    pub cos: std::sync::Arc<Vec<f32>>,
    pub sin: std::sync::Arc<Vec<f32>>,
    pub offset: usize,
    pub interleaved: bool,
}

/// Rotates one head `row` into `out` by the angles whose cos/sin are `cos` and
/// `sin` (one position's half-width table rows), or by their negatives
/// (`inverse`: a rotation's transpose, for the backward pass).
pub(crate) fn rotate_row(
    row: &[f32],
    out: &mut [f32],
    cos: &[f32],
    sin: &[f32],
    interleaved: bool,
    inverse: bool,
) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = match interleaved {
            true => (2 * i, 2 * i + 1),
            false => (i, i + half),
        };
        let s = if inverse { -sin[i] } else { sin[i] };
        out[a] = row[a] * cos[i] - row[b] * s;
        out[b] = row[a] * s + row[b] * cos[i];
    }
}

impl RopeOp {
    fn rotate(&self, x: &[f32], dims: &[usize], inverse: bool) -> Vec<f32> {
        let (seq, dim) = (dims[2], dims[3]);
        let half = dim / 2;
        let mut out = vec![0f32; x.len()];
        for_rows(&mut out, dim, |r, o| {
            let pos = self.offset + r % seq;
            let cos = &self.cos[pos * half..(pos + 1) * half];
            let sin = &self.sin[pos * half..(pos + 1) * half];
            let row = &x[r * dim..(r + 1) * dim];
            rotate_row(row, o, cos, sin, self.interleaved, inverse);
        });
        out
    }
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "rope-diff"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let dims = l.shape().dims();
        if dims.len() != 4 {
            candle_core::bail!("rope-diff: expected (batch, heads, seq, dim), got {dims:?}");
        }
        Ok((
            CpuStorage::F32(self.rotate(x, dims, false)),
            l.shape().clone(),
        ))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // A rotation's transpose is the rotation by the opposite angle.
        let grad = grad.contiguous()?;
        let dx = self.rotate(&f32_view(&grad, self.name())?, grad.dims(), true);
        Ok(Some(Tensor::from_vec(dx, grad.shape(), grad.device())?))
    }
}

/// log softmax(logits)[id] for a few ids per row: logits (rows, vocab), ids
/// (rows, k) u32 → (rows, k). The scorer needs the log-prob of each response
/// token only; candle's `log_softmax` then `gather` keep several (rows, vocab)
/// tensors for the backward pass (100 MB each on SmolLM2 for 512 tokens) and
/// pass over them ~10 times. This keeps the logits only, and its backward,
/// dlogits = onehot(ids)·g − softmax·Σg, is one pass.
pub struct TokenLogProbs;

impl TokenLogProbs {
    /// max and log Σ exp(x − max) of a row: log softmax(x)[i] = x[i] − lse.
    pub(crate) fn log_sum_exp(row: &[f32]) -> f32 {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // Summed in f64: 49k terms in f32 drift by ~1e-6 relative.
        let sum: f64 = row.iter().map(|v| f64::from((v - max).exp())).sum();
        max + sum.ln() as f32
    }

    fn ids<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [u32]> {
        let CpuStorage::U32(data) = storage else {
            candle_core::bail!("token-logprobs: ids must be u32");
        };
        match layout.contiguous_offsets() {
            Some((start, end)) => Ok(&data[start..end]),
            None => candle_core::bail!("token-logprobs: ids must be contiguous"),
        }
    }
}

impl CustomOp2 for TokenLogProbs {
    fn name(&self) -> &'static str {
        "token-logprobs"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        is: &CpuStorage,
        il: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let logits = f32_slice(ls, ll, self.name())?;
        let ids = Self::ids(is, il)?;
        let (rows, vocab) = ll.shape().dims2()?;
        let (id_rows, k) = il.shape().dims2()?;
        if id_rows != rows {
            candle_core::bail!("token-logprobs: {rows} rows of logits, {id_rows} of ids");
        }
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            candle_core::bail!("token-logprobs: id {bad} is outside the vocabulary of {vocab}");
        }
        let mut out = vec![0f32; rows * k];
        out.par_chunks_mut(k.max(1))
            .enumerate()
            .for_each(|(r, out)| {
                let row = &logits[r * vocab..(r + 1) * vocab];
                let lse = Self::log_sum_exp(row);
                for (o, &id) in out.iter_mut().zip(&ids[r * k..(r + 1) * k]) {
                    *o = row[id as usize] - lse;
                }
            });
        Ok((CpuStorage::F32(out), il.shape().clone()))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        ids: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, vocab) = logits.dims2()?;
        let k = ids.dim(1)?;
        let grad = grad.contiguous()?;
        let (ids, ids_layout) = ids.storage_and_layout();
        let Storage::Cpu(ids) = &*ids else {
            candle_core::bail!("token-logprobs: CPU tensors only");
        };
        let ids = Self::ids(ids, ids_layout)?;
        let x = f32_view(logits, self.name())?;
        let g = f32_view(&grad, self.name())?;
        let mut dx = vec![0f32; rows * vocab];
        for_rows(&mut dx, vocab, |r, out| {
            let row = &x[r * vocab..(r + 1) * vocab];
            let g = &g[r * k..(r + 1) * k];
            let lse = Self::log_sum_exp(row);
            let total: f32 = g.iter().sum();
            for (o, v) in out.iter_mut().zip(row) {
                *o = -(v - lse).exp() * total;
            }
            for (&id, g) in ids[r * k..(r + 1) * k].iter().zip(g) {
                out[id as usize] += g;
            }
        });
        Ok((
            Some(Tensor::from_vec(dx, (rows, vocab), logits.device())?),
            None,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    use crate::model::testing::max_abs_diff as max_diff;

    /// Values and gradients (of a weighted sum, so every output matters) of a
    /// fused op against its composition.
    fn check(
        x: &Var,
        fused: impl Fn(&Tensor) -> Tensor,
        composed: impl Fn(&Tensor) -> Tensor,
        extra: Option<&Var>,
    ) {
        let (a, b) = (fused(x.as_tensor()), composed(x.as_tensor()));
        assert!(
            max_diff(&a, &b) < 1e-5,
            "values differ by {}",
            max_diff(&a, &b)
        );
        let weights = Tensor::randn(0f32, 1.0, a.shape(), &Device::Cpu).unwrap();
        let ga = (a * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gb = (b * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let d = max_diff(ga.get(x).unwrap(), gb.get(x).unwrap());
        assert!(d < 1e-4, "input gradients differ by {d}");
        if let Some(w) = extra {
            let d = max_diff(ga.get(w).unwrap(), gb.get(w).unwrap());
            assert!(d < 1e-3, "weight gradients differ by {d}");
        }
    }

    #[test]
    fn rms_norm_matches_the_composition() {
        let x =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 5, 32), &Device::Cpu).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.1, 32, &Device::Cpu).unwrap()).unwrap();
        let eps = 1e-5;
        check(
            &x,
            |x| x.apply_op2(w.as_tensor(), RmsNormOp { eps }).unwrap(),
            |x| {
                let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                x.broadcast_div(&(ms + eps as f64).unwrap().sqrt().unwrap())
                    .unwrap()
                    .broadcast_mul(w.as_tensor())
                    .unwrap()
            },
            Some(&w),
        );
    }

    #[test]
    fn silu_mul_matches_the_composition() {
        let gate =
            Var::from_tensor(&Tensor::randn(0f32, 2.0, (3, 7, 40), &Device::Cpu).unwrap()).unwrap();
        let up =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 7, 40), &Device::Cpu).unwrap()).unwrap();
        check(
            &gate,
            |g| g.apply_op2(up.as_tensor(), SiluMul).unwrap(),
            |g| (candle_nn::ops::silu(g).unwrap() * up.as_tensor()).unwrap(),
            Some(&up),
        );
    }

    #[test]
    fn silu_mul_splits_large_inputs_across_threads_alike() {
        // Above PAR_MIN the parallel chunks must cover every element once.
        let n = PAR_MIN * 2 + 123;
        let gate = Tensor::randn(0f32, 2.0, n, &Device::Cpu).unwrap();
        let up = Tensor::randn(0f32, 1.0, n, &Device::Cpu).unwrap();
        let fused = gate.apply_op2(&up, SiluMul).unwrap();
        let composed = (candle_nn::ops::silu(&gate).unwrap() * &up).unwrap();
        assert!(max_diff(&fused, &composed) < 1e-6);
    }

    #[test]
    fn causal_softmax_matches_mask_plus_softmax() {
        let (seq, offset, total) = (4, 2, 6);
        // (batch 2, kv 1, group 2 * seq 4, total 6)
        let x = Var::from_tensor(
            &Tensor::randn(0f32, 1.0, (2, 1, 2 * seq, total), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let mask: Vec<f32> = (0..seq)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    if j > offset + i {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (seq, total), &Device::Cpu).unwrap();
        check(
            &x,
            |x| {
                x.apply_op1(CausalSoftmax {
                    seq,
                    offset,
                    scale: 0.7,
                })
                .unwrap()
            },
            |x| {
                let masked = (x * 0.7)
                    .unwrap()
                    .reshape((2, 1, 2, seq, total))
                    .unwrap()
                    .broadcast_add(&mask)
                    .unwrap()
                    .reshape((2, 1, 2 * seq, total))
                    .unwrap();
                candle_nn::ops::softmax(&masked, D::Minus1).unwrap()
            },
            None,
        );
    }

    #[test]
    fn token_logprobs_match_log_softmax_and_gather() {
        let logits =
            Var::from_tensor(&Tensor::randn(0f32, 3.0, (5, 11), &Device::Cpu).unwrap()).unwrap();
        // Two ids per row, one repeated, so both gradient terms are exercised.
        let ids = Tensor::from_vec(
            vec![0u32, 3, 10, 10, 2, 5, 7, 1, 4, 4],
            (5, 2),
            &Device::Cpu,
        )
        .unwrap();
        check(
            &logits,
            |x| x.apply_op2(&ids, TokenLogProbs).unwrap(),
            |x| {
                candle_nn::ops::log_softmax(x, D::Minus1)
                    .unwrap()
                    .gather(&ids, 1)
                    .unwrap()
            },
            None,
        );
    }

    #[test]
    fn token_logprobs_refuse_an_id_outside_the_vocabulary() {
        let logits = Tensor::zeros((2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let ids = Tensor::from_vec(vec![1u32, 4], (2, 1), &Device::Cpu).unwrap();
        let err = logits.apply_op2(&ids, TokenLogProbs).unwrap_err();
        assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    }

    #[test]
    fn rope_matches_the_slow_kernels() {
        let (seq, dim, offset) = (5, 8, 3);
        let positions = offset + seq;
        let half = dim / 2;
        let angles: Vec<f32> = (0..positions * half)
            .map(|k| (k / half) as f32 * 0.1 * (1 + k % half) as f32)
            .collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let table = |v: &Vec<f32>| {
            Tensor::from_slice(v, (positions, half), &Device::Cpu)
                .unwrap()
                .narrow(0, offset, seq)
                .unwrap()
        };
        let (cos_t, sin_t) = (table(&cos), table(&sin));
        let x =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, seq, dim), &Device::Cpu).unwrap())
                .unwrap();
        for interleaved in [false, true] {
            let op = || RopeOp {
                cos: std::sync::Arc::new(cos.clone()),
                sin: std::sync::Arc::new(sin.clone()),
                offset,
                interleaved,
            };
            check(
                &x,
                |x| x.apply_op1(op()).unwrap(),
                |x| match interleaved {
                    true => candle_nn::rotary_emb::rope_i_slow(x, &cos_t, &sin_t).unwrap(),
                    false => candle_nn::rotary_emb::rope_slow(x, &cos_t, &sin_t).unwrap(),
                },
                None,
            );
        }
    }
}
