//! Causal self-attention for the training path as one op: RoPE on q and k,
//! grouped-query attention, the causal softmax and the product with v, from the
//! q/k/v projections' outputs to the input of the output projection.
//!
//! Composed from candle ops this is ~15 graph nodes per layer (reshapes,
//! transposes, copies, rope, two batched matmuls, softmax), and candle's
//! backward gives every node's input a fresh zero buffer plus an add: on
//! SmolLM2 that bookkeeping cost more than the attention arithmetic. Here the
//! graph keeps only q, k and v; the backward recomputes the attention
//! probabilities per head (as FlashAttention does) instead of keeping the
//! (batch, heads, seq, seq) tensors, so it also saves their memory.
//!
//! A long sequence can run as a fixed context (keys and values computed without
//! a graph, as a KV cache holds them) and the op over the positions after it:
//! the rows attend to the context too, but gradients flow only into the rows'
//! own q, k and v. That bounds training memory by the rows, not the sequence.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{gemm_into_on, Mat, Threads};
use super::ops::{f32_slice, f32_view, rotate_row};

/// Keys (RoPE applied) and values of the positions before the op's rows, held
/// fixed (no gradient reaches them): position-major, (positions, kv_heads·dim)
/// each, the layout of a KV cache.
#[derive(Debug, Clone)]
pub struct FixedContext {
    pub keys: Arc<Vec<f32>>,
    pub values: Arc<Vec<f32>>,
    pub positions: usize,
}

/// q (batch, seq, heads·dim), k and v (batch, seq, kv_heads·dim), contiguous,
/// positions 0..seq (or after `context`'s) → (batch, seq, heads·dim).
pub struct CausalAttention {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// RoPE tables, (positions, head_dim / 2) each.
    pub cos: Arc<Vec<f32>>,
    pub sin: Arc<Vec<f32>>,
    /// RoPE pairs (2i, 2i + 1) rather than (i, i + d/2).
    pub interleaved: bool,
    /// Applied to q·kᵀ before the softmax (1/√d).
    pub scale: f32,
    /// Positions before the rows, attended to but not differentiated (batch 1).
    pub context: Option<FixedContext>,
}

/// One sequence's q, k or v: (seq, n_heads·dim) rows.
struct Rows<'a> {
    data: &'a [f32],
    heads: usize,
    dim: usize,
}

impl<'a> Rows<'a> {
    /// Head `h` as a strided (seq, dim) view.
    fn head(&self, h: usize) -> Mat<'a> {
        let seq = self.data.len() / (self.heads * self.dim);
        Mat::strided(
            &self.data[h * self.dim..],
            seq,
            self.dim,
            self.heads * self.dim,
        )
    }
}

impl CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    /// Query heads per KV head.
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// The query heads that share KV head `kh`.
    fn heads_of(&self, kh: usize) -> std::ops::Range<usize> {
        kh * self.group()..(kh + 1) * self.group()
    }

    /// Positions before the rows (0 without a context).
    fn offset(&self) -> usize {
        self.context.as_ref().map_or(0, |c| c.positions)
    }

    /// What the task of sequence `b` and KV head `kh` reads: the sequence's q
    /// rows, and the head's keys (RoPE applied) and values over every position
    /// it attends to, the context's first, as contiguous (positions, dim) blocks.
    fn task_inputs<'a>(
        &self,
        b: usize,
        kh: usize,
        seq: usize,
        q: &'a [f32],
        k: &[f32],
        v: &[f32],
    ) -> (&'a [f32], Vec<f32>, Vec<f32>) {
        let d = self.head_dim;
        let (q_len, kv_len) = (seq * self.heads * d, seq * self.kv_heads * d);
        let own_k = self.rope_head(&k[b * kv_len..][..kv_len], self.kv_heads, kh, false);
        let (mut k_rot, mut v_head) = match &self.context {
            Some(c) => (
                head_rows(&c.keys, self.kv_heads, kh, d),
                head_rows(&c.values, self.kv_heads, kh, d),
            ),
            None => (Vec::new(), Vec::new()),
        };
        k_rot.extend_from_slice(&own_k);
        v_head.extend(head_rows(&v[b * kv_len..][..kv_len], self.kv_heads, kh, d));
        (&q[b * q_len..][..q_len], k_rot, v_head)
    }

    /// Head `h` of `rows` with RoPE applied (or undone: `inverse`) at the
    /// rows' positions (after the context), as a contiguous (seq, dim) block;
    /// `rows` is (seq, heads·dim).
    fn rope_head(&self, rows: &[f32], heads: usize, h: usize, inverse: bool) -> Vec<f32> {
        let d = self.head_dim;
        let half = d / 2;
        let seq = rows.len() / (heads * d);
        let mut out = vec![0f32; seq * d];
        for (i, o) in out.chunks_exact_mut(d).enumerate() {
            let row = &rows[i * heads * d + h * d..][..d];
            let t = self.offset() + i;
            let (cos, sin) = (
                &self.cos[t * half..(t + 1) * half],
                &self.sin[t * half..(t + 1) * half],
            );
            rotate_row(row, o, cos, sin, self.interleaved, inverse);
        }
        out
    }

    /// The attention probabilities of one head: softmax(scale·q·kᵀ) with the
    /// causal mask, (seq, total) rows, where row i sees the context and rows
    /// 0..=i (zero after). `k` holds all `total` positions, the context's first.
    fn probabilities(&self, q: &[f32], k: &[f32], seq: usize, total: usize) -> Vec<f32> {
        let d = self.head_dim;
        let context = total - seq;
        let mut p = vec![0f32; seq * total];
        let (q, k) = (Mat::rows(q, seq, d), Mat::rows(k, total, d));
        gemm_into_on(&mut p, q, k.t(), 1.0, false, Threads::Caller);
        for (i, row) in p.chunks_exact_mut(total).enumerate() {
            let (seen, masked) = row.split_at_mut(context + i + 1);
            let max = seen.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for v in seen.iter_mut() {
                *v = ((*v - max) * self.scale).exp();
                sum += *v;
            }
            let inv = 1.0 / sum;
            seen.iter_mut().for_each(|v| *v *= inv);
            masked.fill(0.0);
        }
        p
    }

    /// (batch, seq) of q, checking k and v against it.
    fn dims(&self, q: &Shape, k: &Shape, v: &Shape) -> Result<(usize, usize)> {
        let (b, t, width) = q.dims3()?;
        let kv_width = self.kv_heads * self.head_dim;
        if width != self.heads * self.head_dim
            || k.dims3()? != (b, t, kv_width)
            || v.dims3()? != (b, t, kv_width)
            || self.kv_heads == 0
            || !self.heads.is_multiple_of(self.kv_heads)
        {
            candle_core::bail!(
                "causal-attention: q {q:?}, k {k:?}, v {v:?} do not fit {} heads, {} kv heads of {}",
                self.heads,
                self.kv_heads,
                self.head_dim
            );
        }
        if let Some(c) = &self.context {
            if b != 1
                || c.keys.len() != c.positions * kv_width
                || c.values.len() != c.positions * kv_width
            {
                candle_core::bail!(
                    "causal-attention: a context of {} positions needs batch 1 and \
                     {kv_width} keys and values per position (batch {b}, {} keys, {} values)",
                    c.positions,
                    c.keys.len(),
                    c.values.len()
                );
            }
        }
        let positions = self.offset() + t;
        if positions * self.head_dim / 2 > self.cos.len() {
            candle_core::bail!("causal-attention: {positions} positions exceed the RoPE table");
        }
        Ok((b, t))
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        CausalAttention::name(self)
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, seq) = self.dims(ql.shape(), kl.shape(), vl.shape())?;
        let name = CausalAttention::name(self);
        let (q, k, v) = (
            f32_slice(qs, ql, name)?,
            f32_slice(ks, kl, name)?,
            f32_slice(vs, vl, name)?,
        );
        let (h_all, kv, d) = (self.heads, self.kv_heads, self.head_dim);
        let q_len = seq * h_all * d;
        let total = self.offset() + seq;
        // One task per (sequence, KV head), so that one long sequence still uses
        // every thread; each task's products are small, so they run serially in it.
        let blocks: Vec<Vec<f32>> = (0..batch * kv)
            .into_par_iter()
            .map(|task| {
                let (b, kh) = (task / kv, task % kv);
                let (q, k_rot, v) = self.task_inputs(b, kh, seq, q, k, v);
                // The group's heads one after another, each (seq, dim).
                let mut block = vec![0f32; self.group() * seq * d];
                for (h, o) in self.heads_of(kh).zip(block.chunks_exact_mut(seq * d)) {
                    let q_rot = self.rope_head(q, h_all, h, false);
                    let p = self.probabilities(&q_rot, &k_rot, seq, total);
                    let p = Mat::rows(&p, seq, total);
                    let v = Mat::rows(&v, total, d);
                    gemm_into_on(o, p, v, 1.0, false, Threads::Caller);
                }
                block
            })
            .collect();
        let mut out = vec![0f32; q.len()];
        for (task, block) in blocks.iter().enumerate() {
            let (b, kh) = (task / kv, task % kv);
            let out = &mut out[b * q_len..][..q_len];
            for (h, o) in self.heads_of(kh).zip(block.chunks_exact(seq * d)) {
                scatter_head(out, h_all, h, o, d);
            }
        }
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (batch, seq) = self.dims(q.shape(), k.shape(), v.shape())?;
        let name = CausalAttention::name(self);
        let grad = grad.contiguous()?;
        let (qv, kv_, vv, gv) = (
            f32_view(q, name)?,
            f32_view(k, name)?,
            f32_view(v, name)?,
            f32_view(&grad, name)?,
        );
        let (h_all, kv, d) = (self.heads, self.kv_heads, self.head_dim);
        let (q_len, kv_len) = (seq * h_all * d, seq * kv * d);
        let context = self.offset();
        let total = context + seq;
        // Per (sequence, KV head): dq of the group's heads, dk and dv of the
        // rows' own positions (the context takes none), each (seq, dim) blocks;
        // scattered into place afterwards.
        let blocks: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..batch * kv)
            .into_par_iter()
            .map(|task| {
                let (b, kh) = (task / kv, task % kv);
                let (q, k_rot, v) = self.task_inputs(b, kh, seq, &qv, &kv_, &vv);
                let g = Rows {
                    data: &gv[b * q_len..][..q_len],
                    heads: h_all,
                    dim: d,
                };
                let mut dp = vec![0f32; seq * total];
                let mut dq_rot = vec![0f32; seq * d];
                let mut dq_block = Vec::with_capacity(self.group() * seq * d);
                let mut dk_rot = vec![0f32; seq * d];
                let mut dv_head = vec![0f32; seq * d];
                let v_all = Mat::rows(&v, total, d);
                let k_all = Mat::rows(&k_rot, total, d);
                for h in self.heads_of(kh) {
                    let q_rot = self.rope_head(q, h_all, h, false);
                    let p = self.probabilities(&q_rot, &k_rot, seq, total);
                    // The columns of the rows' own keys: (seq, seq).
                    let p_own = Mat::strided(&p[context..], seq, seq, total);
                    // dv += pᵀ·do (own positions); dp = do·vᵀ (all positions)
                    gemm_into_on(
                        &mut dv_head,
                        p_own.t(),
                        g.head(h),
                        1.0,
                        true,
                        Threads::Caller,
                    );
                    gemm_into_on(&mut dp, g.head(h), v_all.t(), 1.0, false, Threads::Caller);
                    // ds = p ⊙ (dp − Σⱼ dp·p) per row, scaled like the logits.
                    for (p_row, dp_row) in p.chunks_exact(total).zip(dp.chunks_exact_mut(total)) {
                        let dot: f32 = p_row.iter().zip(dp_row.iter()).map(|(p, g)| p * g).sum();
                        for (g, p) in dp_row.iter_mut().zip(p_row) {
                            *g = self.scale * p * (*g - dot);
                        }
                    }
                    let ds = Mat::rows(&dp, seq, total);
                    gemm_into_on(&mut dq_rot, ds, k_all, 1.0, false, Threads::Caller);
                    let ds_own = Mat::strided(&dp[context..], seq, seq, total);
                    let q_rows = Mat::rows(&q_rot, seq, d);
                    gemm_into_on(&mut dk_rot, ds_own.t(), q_rows, 1.0, true, Threads::Caller);
                    dq_block.extend(self.rope_head(&dq_rot, 1, 0, true));
                }
                (dq_block, self.rope_head(&dk_rot, 1, 0, true), dv_head)
            })
            .collect();
        let mut dq = vec![0f32; qv.len()];
        let mut dk = vec![0f32; kv_.len()];
        let mut dv = vec![0f32; vv.len()];
        for (task, (dq_block, dk_head, dv_head)) in blocks.iter().enumerate() {
            let (b, kh) = (task / kv, task % kv);
            let dq = &mut dq[b * q_len..][..q_len];
            for (h, block) in self.heads_of(kh).zip(dq_block.chunks_exact(seq * d)) {
                scatter_head(dq, h_all, h, block, d);
            }
            scatter_head(&mut dk[b * kv_len..][..kv_len], kv, kh, dk_head, d);
            scatter_head(&mut dv[b * kv_len..][..kv_len], kv, kh, dv_head, d);
        }
        let tensor =
            |data: Vec<f32>, like: &Tensor| Tensor::from_vec(data, like.shape(), like.device());
        Ok((
            Some(tensor(dq, q)?),
            Some(tensor(dk, k)?),
            Some(tensor(dv, v)?),
        ))
    }
}

/// Column block `h` of (positions, heads·dim) rows as a contiguous
/// (positions, dim) block.
fn head_rows(rows: &[f32], heads: usize, h: usize, dim: usize) -> Vec<f32> {
    rows.chunks_exact(heads * dim)
        .flat_map(|row| &row[h * dim..(h + 1) * dim])
        .copied()
        .collect()
}

/// Writes a contiguous (seq, dim) head block into column block `h` of
/// (seq, heads·dim) rows.
fn scatter_head(rows: &mut [f32], heads: usize, h: usize, block: &[f32], dim: usize) {
    for (t, src) in block.chunks_exact(dim).enumerate() {
        rows[t * heads * dim + h * dim..][..dim].copy_from_slice(src);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    use crate::model::ops::{CausalSoftmax, RopeOp};
    use crate::model::testing::max_abs_diff;

    /// The same attention from the separate differentiable ops (the path this
    /// op replaces in the decoder).
    fn composed(op: &CausalAttention, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let (b, t, _) = q.dims3().unwrap();
        let (h, kv, d) = (op.heads, op.kv_heads, op.head_dim);
        let split = |x: &Tensor, n: usize| {
            x.reshape((b, t, n, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let rope = |x: Tensor| {
            x.apply_op1(RopeOp {
                cos: op.cos.clone(),
                sin: op.sin.clone(),
                offset: 0,
                interleaved: op.interleaved,
            })
            .unwrap()
        };
        let q = rope(split(q, h)).reshape((b, kv, (h / kv) * t, d)).unwrap();
        let k = rope(split(k, kv));
        let v = split(v, kv);
        let probs = q
            .matmul(&k.t().unwrap())
            .unwrap()
            .apply_op1(CausalSoftmax {
                seq: t,
                offset: 0,
                scale: op.scale,
            })
            .unwrap();
        probs
            .matmul(&v)
            .unwrap()
            .reshape((b, h, t, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, h * d))
            .unwrap()
    }

    fn attention(
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        interleaved: bool,
    ) -> CausalAttention {
        let positions = 16;
        let half = head_dim / 2;
        let angles: Vec<f32> = (0..positions * half)
            .map(|i| (i / half) as f32 * 0.3 / (1 + i % half) as f32)
            .collect();
        CausalAttention {
            heads,
            kv_heads,
            head_dim,
            cos: Arc::new(angles.iter().map(|a| a.cos()).collect()),
            sin: Arc::new(angles.iter().map(|a| a.sin()).collect()),
            interleaved,
            scale: 1.0 / (head_dim as f32).sqrt(),
            context: None,
        }
    }

    /// Keys at positions 0..t with RoPE applied, position-major (t, kv·d), as
    /// a KV cache holds them.
    fn rotated_keys(op: &CausalAttention, k: &Tensor) -> Vec<f32> {
        let (_, t, _) = k.dims3().unwrap();
        k.reshape((1, t, op.kv_heads, op.head_dim))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .apply_op1(RopeOp {
                cos: op.cos.clone(),
                sin: op.sin.clone(),
                offset: 0,
                interleaved: op.interleaved,
            })
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn rows_after_a_fixed_context_match_the_whole_sequence() {
        let dev = Device::Cpu;
        for (heads, kv_heads, interleaved) in [(6, 2, false), (4, 4, true)] {
            let (context, rows, d) = (9, 5, 8);
            let fixed = |n: usize| Tensor::randn(0f32, 1.0, (1, context, n * d), &dev).unwrap();
            let var = |n: usize| Var::randn(0f32, 1.0, (1, rows, n * d), &dev).unwrap();
            let (q0, k0, v0) = (fixed(heads), fixed(kv_heads), fixed(kv_heads));
            let (q, k, v) = (var(heads), var(kv_heads), var(kv_heads));
            let whole = |a: &Tensor, b: &Var| Tensor::cat(&[a, b.as_tensor()], 1).unwrap();
            let op = attention(heads, kv_heads, d, interleaved);
            let reference = composed(&op, &whole(&q0, &q), &whole(&k0, &k), &whole(&v0, &v))
                .narrow(1, context, rows)
                .unwrap();
            let mut with_context = attention(heads, kv_heads, d, interleaved);
            with_context.context = Some(FixedContext {
                keys: Arc::new(rotated_keys(&op, &k0)),
                values: Arc::new(v0.flatten_all().unwrap().to_vec1().unwrap()),
                positions: context,
            });
            let fused = q
                .as_tensor()
                .apply_op3(k.as_tensor(), v.as_tensor(), with_context)
                .unwrap();
            let diff = max_abs_diff(&fused, &reference);
            assert!(
                diff < 1e-5,
                "{heads}/{kv_heads} heads: values differ by {diff}"
            );
            let w = Tensor::randn(0f32, 1.0, fused.shape(), &dev).unwrap();
            let grads = |y: &Tensor| (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let (gf, gr) = (grads(&fused), grads(&reference));
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let diff = max_abs_diff(gf.get(x).unwrap(), gr.get(x).unwrap());
                assert!(
                    diff < 1e-4,
                    "{heads}/{kv_heads} heads: d{name} differs by {diff}"
                );
            }
        }
    }

    #[test]
    fn values_and_gradients_match_the_composed_ops() {
        let dev = Device::Cpu;
        for (heads, kv_heads, interleaved) in [(6, 2, false), (4, 4, true), (3, 1, false)] {
            let op = attention(heads, kv_heads, 8, interleaved);
            let (b, t) = (3, 7);
            let var = |n: usize| Var::randn(0f32, 1.0, (b, t, n * 8), &dev).unwrap();
            let (q, k, v) = (var(heads), var(kv_heads), var(kv_heads));
            let fused = q
                .as_tensor()
                .apply_op3(
                    k.as_tensor(),
                    v.as_tensor(),
                    attention(heads, kv_heads, 8, interleaved),
                )
                .unwrap();
            let reference = composed(&op, q.as_tensor(), k.as_tensor(), v.as_tensor());
            let d = max_abs_diff(&fused, &reference);
            assert!(d < 1e-5, "{heads}/{kv_heads} heads: values differ by {d}");
            // A weighted sum, so that every output position matters.
            let w = Tensor::randn(0f32, 1.0, fused.shape(), &dev).unwrap();
            let grads = |y: &Tensor| (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let (gf, gr) = (grads(&fused), grads(&reference));
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let d = max_abs_diff(gf.get(x).unwrap(), gr.get(x).unwrap());
                assert!(d < 1e-4, "{heads}/{kv_heads} heads: d{name} differs by {d}");
            }
        }
    }

    #[test]
    fn mismatched_shapes_are_refused() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 4, 6 * 8), candle_core::DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 4, 3 * 8), candle_core::DType::F32, &dev).unwrap();
        let err = q.apply_op3(&k, &k, attention(6, 2, 8, false)).unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
        // A context must hold kv_heads·dim keys and values per position.
        let k = Tensor::zeros((1, 4, 2 * 8), candle_core::DType::F32, &dev).unwrap();
        let mut op = attention(6, 2, 8, false);
        op.context = Some(FixedContext {
            keys: Arc::new(vec![0.0; 3 * 16]),
            values: Arc::new(vec![0.0; 2 * 16]),
            positions: 3,
        });
        let err = q.apply_op3(&k, &k, op).unwrap_err();
        assert!(err.to_string().contains("context of 3 positions"), "{err}");
    }
}
