//! Attention Residuals (Kimi, arXiv 2603.15031; docs/ARCHITECTURE.md, "Attention
//! Residuals", and the study in bench/attnres.md): each sublayer reads a
//! softmax-weighted mix of the token embedding and earlier sublayer outputs
//! instead of their running sum.
//!
//! For sublayer l with sources v_0..v_n (per token):
//! `h_l = Σ_i α_i v_i`, `α = softmax_i(w_lᵀ RMSNorm_l(v_i))`, in f32, no 1/√d.
//! The score is `r_i · (u · v_i)` with `u = w ⊙ g` (query times the norm's gain)
//! and `r_i = 1/rms(v_i)`, which is how every function here computes it.
//!
//! - [`DepthAttention`]: the fused op (one pass forward, one backward) used by
//!   both kernels of the tensor path; tests check it against the composition.
//! - [`depth_attend`]: the same arithmetic on plain vectors (decode step).
//! - [`phase_one`] / [`phase_two`]: Block AttnRes inference in two phases: a
//!   block's queries scored at once against the finished block sums, then each
//!   sublayer merges its block's partial sum by an online-softmax step.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows (tokens) of this many elements or more are split across threads.
const PAR_MIN: usize = 1 << 14;

fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: f32 only");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: the input must be contiguous"),
    }
}

fn inv_rms(v: &[f32], eps: f32) -> f32 {
    let mean_sq = v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32;
    1.0 / (mean_sq + eps).sqrt()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    super::kernels::dot_f32(a, b)
}

/// The depth-softmax weights of one token: `sources` holds n vectors of `u.len()`.
pub fn depth_weights(sources: &[f32], u: &[f32], eps: f32) -> Vec<f32> {
    let d = u.len();
    let scores: Vec<f32> = sources
        .chunks_exact(d)
        .map(|v| inv_rms(v, eps) * dot(u, v))
        .collect();
    softmax(&scores)
}

fn softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / total).collect()
}

/// The direct form for one token: `Σ_i α_i v_i` over `sources` (n vectors of d).
pub fn depth_attend(sources: &[f32], u: &[f32], eps: f32) -> Vec<f32> {
    let d = u.len();
    let alpha = depth_weights(sources, u, eps);
    let mut out = vec![0f32; d];
    for (a, v) in alpha.iter().zip(sources.chunks_exact(d)) {
        for (o, x) in out.iter_mut().zip(v) {
            *o += a * x;
        }
    }
    out
}

/// Online-softmax state of one query over some sources: running max `m`,
/// normaliser `l = Σ e^{s-m}` and unnormalised sum `o = Σ e^{s-m} v`.
#[derive(Debug, Clone)]
pub struct OnlineSoftmax {
    pub m: f32,
    pub l: f32,
    pub o: Vec<f32>,
}

/// Phase 1 of Block AttnRes inference: the queries `us` (one per sublayer of the
/// coming block, input-independent, so known in advance) against the finished
/// block sums `blocks` (n vectors of d, the embedding first), as one batch. Each
/// block's RMS is computed once for all queries, and each block is read once.
pub fn phase_one(blocks: &[f32], us: &[&[f32]], eps: f32) -> Vec<OnlineSoftmax> {
    let Some(d) = us.first().map(|u| u.len()) else {
        return Vec::new();
    };
    let inv: Vec<f32> = blocks.chunks_exact(d).map(|b| inv_rms(b, eps)).collect();
    us.iter()
        .map(|u| {
            let scores: Vec<f32> = blocks
                .chunks_exact(d)
                .zip(&inv)
                .map(|(b, r)| r * dot(u, b))
                .collect();
            let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut o = vec![0f32; d];
            let mut l = 0f32;
            for (s, b) in scores.iter().zip(blocks.chunks_exact(d)) {
                let e = (s - m).exp();
                l += e;
                for (ov, bv) in o.iter_mut().zip(b) {
                    *ov += e * bv;
                }
            }
            OnlineSoftmax { m, l, o }
        })
        .collect()
}

/// Phase 2: merges the current block's partial sum (None at a block's first
/// sublayer, which sees finished blocks only) into a phase-1 state and returns
/// the sublayer's input.
pub fn phase_two(state: &OnlineSoftmax, u: &[f32], partial: Option<&[f32]>, eps: f32) -> Vec<f32> {
    let Some(p) = partial else {
        let inv = 1.0 / state.l;
        return state.o.iter().map(|o| o * inv).collect();
    };
    let s = inv_rms(p, eps) * dot(u, p);
    let m = state.m.max(s);
    let (old, new) = ((state.m - m).exp(), (s - m).exp());
    let inv = 1.0 / (state.l * old + new);
    state
        .o
        .iter()
        .zip(p)
        .map(|(o, pv)| (o * old + new * pv) * inv)
        .collect()
}

/// `h = Σ_i softmax_i(r_i·(u·v_i)) v_i` with u = w ⊙ g, over sources
/// (rows, n, d), query w (d) and key-norm gain g (d): returns (rows, d).
/// Differentiable in all three inputs.
pub struct DepthAttention {
    pub eps: f32,
}

impl DepthAttention {
    fn fold(w: &[f32], g: &[f32]) -> Vec<f32> {
        w.iter().zip(g).map(|(a, b)| a * b).collect()
    }
}

impl CustomOp3 for DepthAttention {
    fn name(&self) -> &'static str {
        "depth-attention"
    }

    fn cpu_fwd(
        &self,
        vs: &CpuStorage,
        vl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let v = f32_slice(vs, vl, self.name())?;
        let w = f32_slice(ws, wl, self.name())?;
        let g = f32_slice(gs, gl, self.name())?;
        let dims = vl.shape().dims();
        if dims.len() != 3 || dims[2] != w.len() || g.len() != w.len() {
            candle_core::bail!(
                "depth-attention: sources {dims:?} do not match query {}",
                w.len()
            );
        }
        let (rows, n, d) = (dims[0], dims[1], dims[2]);
        let u = Self::fold(w, g);
        let mut out = vec![0f32; rows * d];
        let row = |r: usize, o: &mut [f32]| {
            o.copy_from_slice(&depth_attend(&v[r * n * d..(r + 1) * n * d], &u, self.eps));
        };
        if out.len() >= PAR_MIN {
            out.par_chunks_mut(d)
                .enumerate()
                .for_each(|(r, o)| row(r, o));
        } else {
            out.chunks_mut(d).enumerate().for_each(|(r, o)| row(r, o));
        }
        Ok((CpuStorage::F32(out), Shape::from((rows, d))))
    }

    fn bwd(
        &self,
        v: &Tensor,
        w: &Tensor,
        g: &Tensor,
        _h: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, n, d) = v.dims3()?;
        let vv: Vec<f32> = v.flatten_all()?.to_vec1()?;
        let wv: Vec<f32> = w.flatten_all()?.to_vec1()?;
        let gvec: Vec<f32> = g.flatten_all()?.to_vec1()?;
        let dh: Vec<f32> = grad.contiguous()?.flatten_all()?.to_vec1()?;
        let u = Self::fold(&wv, &gvec);
        let eps = self.eps;
        // Per row: s_i = r_i (u·v_i), α = softmax(s), h = Σ α_i v_i.
        //   dα_i = dh·v_i;  ds_i = α_i (dα_i − Σ_j α_j dα_j)
        //   dv_i = α_i dh + ds_i (r_i u − (u·v_i) r_i³ v_i / d)
        //   du  += ds_i r_i v_i;  dw = du ⊙ g;  dg = du ⊙ w
        let row_grad = |r: usize, dv: &mut [f32], du: &mut [f32]| {
            let src = &vv[r * n * d..(r + 1) * n * d];
            let dhr = &dh[r * d..(r + 1) * d];
            let inv: Vec<f32> = src.chunks_exact(d).map(|x| inv_rms(x, eps)).collect();
            let uv: Vec<f32> = src.chunks_exact(d).map(|x| dot(&u, x)).collect();
            let scores: Vec<f32> = inv.iter().zip(&uv).map(|(r, s)| r * s).collect();
            let alpha = softmax(&scores);
            let dalpha: Vec<f32> = src.chunks_exact(d).map(|x| dot(dhr, x)).collect();
            let mean: f32 = alpha.iter().zip(&dalpha).map(|(a, b)| a * b).sum();
            for i in 0..n {
                let ds = alpha[i] * (dalpha[i] - mean);
                let x = &src[i * d..(i + 1) * d];
                let k = uv[i] * inv[i] * inv[i] * inv[i] / d as f32;
                for c in 0..d {
                    dv[i * d + c] = alpha[i] * dhr[c] + ds * (inv[i] * u[c] - k * x[c]);
                    du[c] += ds * inv[i] * x[c];
                }
            }
        };
        let mut dv = vec![0f32; vv.len()];
        let du = if dv.len() >= PAR_MIN {
            dv.par_chunks_mut(n * d)
                .enumerate()
                .fold(
                    || vec![0f32; d],
                    |mut du, (r, dvr)| {
                        row_grad(r, dvr, &mut du);
                        du
                    },
                )
                .reduce(
                    || vec![0f32; d],
                    |mut a, b| {
                        a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                        a
                    },
                )
        } else {
            let mut du = vec![0f32; d];
            for (r, dvr) in dv.chunks_mut(n * d).enumerate() {
                row_grad(r, dvr, &mut du);
            }
            du
        };
        debug_assert_eq!(rows * n * d, dv.len());
        let dw: Vec<f32> = du.iter().zip(&gvec).map(|(a, b)| a * b).collect();
        let dg: Vec<f32> = du.iter().zip(&wv).map(|(a, b)| a * b).collect();
        Ok((
            Some(Tensor::from_vec(dv, v.shape(), v.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
            Some(Tensor::from_vec(dg, g.shape(), g.device())?),
        ))
    }
}

/// Which sources sublayer `j` (0-based, attention and MLP counted separately)
/// reads, as indices into the list [embedding, v_0, v_1, ...] of raw outputs,
/// grouped into summed sources. Used by tests to state Eq. 6 plainly.
pub fn block_sources(j: usize, size: usize) -> Vec<Vec<usize>> {
    // Finished blocks: outputs [n·S, (n+1)·S) for every block that ends at or before j.
    let mut out = vec![vec![0]];
    let finished = j / size;
    for b in 0..finished {
        out.push((b * size..(b + 1) * size).map(|i| i + 1).collect());
    }
    let partial: Vec<usize> = (finished * size..j).map(|i| i + 1).collect();
    if !partial.is_empty() {
        out.push(partial);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    use crate::model::testing::max_abs_diff as max_diff;

    /// The composition of differentiable candle ops the fused op replaces.
    fn composed(v: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> Tensor {
        let ms = v.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let k = v
            .broadcast_div(&(ms + eps).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(g)
            .unwrap();
        let s = k.broadcast_mul(w).unwrap().sum(D::Minus1).unwrap();
        let a = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
        a.unsqueeze(D::Minus1)
            .unwrap()
            .broadcast_mul(v)
            .unwrap()
            .sum(1)
            .unwrap()
    }

    #[test]
    fn fused_op_matches_the_composition_in_value_and_gradient() {
        let dev = Device::Cpu;
        for rows in [3, 400] {
            let (n, d) = (5, 48);
            // Sources of very different scales: the norm must make that not matter.
            let scales = Tensor::new(&[0.1f32, 1.0, 10.0, 3.0, 0.5], &dev)
                .unwrap()
                .reshape((1, n, 1))
                .unwrap();
            let v = Var::from_tensor(
                &Tensor::randn(0f32, 1.0, (rows, n, d), &dev)
                    .unwrap()
                    .broadcast_mul(&scales)
                    .unwrap(),
            )
            .unwrap();
            let w = Var::from_tensor(&Tensor::randn(0f32, 0.5, d, &dev).unwrap()).unwrap();
            let g = Var::from_tensor(&Tensor::randn(1f32, 0.2, d, &dev).unwrap()).unwrap();
            let eps = 1e-6;
            let fused = v
                .as_tensor()
                .apply_op3(
                    w.as_tensor(),
                    g.as_tensor(),
                    DepthAttention { eps: eps as f32 },
                )
                .unwrap();
            let reference = composed(v.as_tensor(), w.as_tensor(), g.as_tensor(), eps);
            assert!(max_diff(&fused, &reference) < 1e-4);
            let weights = Tensor::randn(0f32, 1.0, fused.shape(), &dev).unwrap();
            let ga = (fused * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gb = (reference * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (var, tol) in [(&v, 1e-4), (&w, 2e-3), (&g, 2e-3)] {
                let (a, b) = (ga.get(var).unwrap(), gb.get(var).unwrap());
                let scale: f32 = b.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                let diff = max_diff(a, b);
                assert!(
                    diff <= tol * scale.max(1.0),
                    "gradient differs by {diff} (scale {scale})"
                );
            }
        }
    }

    #[test]
    fn zero_query_gives_the_plain_average() {
        let sources = [1.0f32, 2.0, 3.0, 4.0, -5.0, 0.0];
        let h = depth_attend(&sources, &[0.0, 0.0], 1e-6);
        assert!((h[0] - (1.0 + 3.0 - 5.0) / 3.0).abs() < 1e-6, "{h:?}");
        assert!((h[1] - 2.0).abs() < 1e-6, "{h:?}");
        assert_eq!(
            depth_weights(&sources, &[0.0, 0.0], 1e-6),
            vec![1.0 / 3.0; 3]
        );
    }

    #[test]
    fn two_phase_equals_the_direct_softmax() {
        let d = 32;
        let mut rng = 17u64;
        let mut next = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((rng >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 4.0
        };
        let blocks: Vec<f32> = (0..4 * d).map(|i| next() * (1 + i / d) as f32).collect();
        let partial: Vec<f32> = (0..d).map(|_| next() * 7.0).collect();
        let queries: Vec<Vec<f32>> = (0..3).map(|_| (0..d).map(|_| next()).collect()).collect();
        let us: Vec<&[f32]> = queries.iter().map(Vec::as_slice).collect();
        let eps = 1e-6;
        let states = phase_one(&blocks, &us, eps);
        for (u, state) in us.iter().zip(&states) {
            let direct = depth_attend(&blocks, u, eps);
            let two = phase_two(state, u, None, eps);
            let all: Vec<f32> = blocks.iter().chain(&partial).copied().collect();
            let direct_p = depth_attend(&all, u, eps);
            let two_p = phase_two(state, u, Some(&partial), eps);
            for (a, b) in direct.iter().zip(&two).chain(direct_p.iter().zip(&two_p)) {
                assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn block_sources_follow_eq_6() {
        // S = 2: sublayer 0 sees the embedding only; 1 sees [b0, partial{0}];
        // 2 (first of block 1) sees [b0, b1] with no partial; 3 adds partial {2}.
        assert_eq!(block_sources(0, 2), vec![vec![0]]);
        assert_eq!(block_sources(1, 2), vec![vec![0], vec![1]]);
        assert_eq!(block_sources(2, 2), vec![vec![0], vec![1, 2]]);
        assert_eq!(block_sources(3, 2), vec![vec![0], vec![1, 2], vec![3]]);
        // S = 1 is Full: every output its own source.
        assert_eq!(
            block_sources(3, 1),
            vec![vec![0], vec![1], vec![2], vec![3]]
        );
    }
}
