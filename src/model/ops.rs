//! Fused operations with their own backward pass, for the training path.
//!
//! candle's fused rms_norm, rope and softmax have no backward, and their
//! compositions from differentiable primitives (`RmsNorm::forward_diff`,
//! `rope_slow`, mask-add + `softmax`) cost 5-7 ops each: every op allocates a
//! full activation that the graph keeps until backward, and synchronises the
//! thread pool. These do each in one pass forward and one backward, with the
//! gradient formulas written out; tests check values and gradients against the
//! compositions.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: f32 only");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: the input must be contiguous"),
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
        let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let wv: Vec<f32> = w.flatten_all()?.to_vec1()?;
        let gv: Vec<f32> = grad.contiguous()?.flatten_all()?.to_vec1()?;
        let mut dx = vec![0f32; xv.len()];
        for_rows(&mut dx, d, |r, out| {
            let row = &xv[r * d..(r + 1) * d];
            let g = &gv[r * d..(r + 1) * d];
            let inv = inv_rms(row, self.eps);
            // u = g·w; dx = inv·u − x·inv³·mean(u·x)
            let dot: f32 = g
                .iter()
                .zip(&wv)
                .zip(row)
                .map(|((g, w), x)| g * w * x)
                .sum();
            let k = inv * inv * inv * dot / d as f32;
            for i in 0..d {
                out[i] = inv * g[i] * wv[i] - row[i] * k;
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
                    let inv = inv_rms(row, self.eps);
                    for i in 0..d {
                        acc[i] += gv[r * d + i] * row[i] * inv;
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

/// Applies `f(i)` to each element of `out` in chunks across threads.
fn for_elements(out: &mut [f32], f: impl Fn(usize) -> f32 + Sync + Send) {
    const CHUNK: usize = 1 << 12;
    let fill = |(c, chunk): (usize, &mut [f32])| {
        for (j, o) in chunk.iter_mut().enumerate() {
            *o = f(c * CHUNK + j);
        }
    };
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(CHUNK).enumerate().for_each(fill);
    } else {
        out.chunks_mut(CHUNK).enumerate().for_each(fill);
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
        for_elements(&mut h, |i| silu(g[i]) * u[i]);
        Ok((CpuStorage::F32(h), gl.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _h: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g: Vec<f32> = gate.flatten_all()?.to_vec1()?;
        let u: Vec<f32> = up.flatten_all()?.to_vec1()?;
        let dh: Vec<f32> = grad.contiguous()?.flatten_all()?.to_vec1()?;
        // d silu(g)/dg = s·(1 + g·(1 − s)), s = sigmoid(g)
        let mut dg = vec![0f32; g.len()];
        for_elements(&mut dg, |i| {
            let s = 1.0 / (1.0 + (-g[i]).exp());
            dh[i] * u[i] * s * (1.0 + g[i] * (1.0 - s))
        });
        let mut du = vec![0f32; g.len()];
        for_elements(&mut du, |i| dh[i] * silu(g[i]));
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
        let yv: Vec<f32> = y.flatten_all()?.to_vec1()?;
        let gv: Vec<f32> = grad.contiguous()?.flatten_all()?.to_vec1()?;
        let mut dx = vec![0f32; yv.len()];
        for_rows(&mut dx, total, |r, out| {
            let y = &yv[r * total..(r + 1) * total];
            let g = &gv[r * total..(r + 1) * total];
            let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
            for i in 0..total {
                out[i] = self.scale * y[i] * (g[i] - dot);
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
            for i in 0..half {
                let (a, b) = match self.interleaved {
                    true => (2 * i, 2 * i + 1),
                    false => (i, i + half),
                };
                let s = if inverse { -sin[i] } else { sin[i] };
                o[a] = row[a] * cos[i] - row[b] * s;
                o[b] = row[a] * s + row[b] * cos[i];
            }
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
        let g: Vec<f32> = grad.contiguous()?.flatten_all()?.to_vec1()?;
        let dx = self.rotate(&g, grad.dims(), true);
        Ok(Some(Tensor::from_vec(dx, grad.shape(), grad.device())?))
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
