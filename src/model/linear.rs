//! A linear layer whose weight is either quantized (fast serving) or float
//! (training and exact log-probs), with an optional bias.
//!
//! This is the one place where a weight meets an activation, so LoRA deltas
//! (y = Wx + s·B(Ax)) plug in here for both serving and training.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Module, Result, Tensor};

use super::gemm::{gemm, gemm_into, Mat};
use super::kernels::{BlockFormat, PackedMatrix};
use super::ops::{f32_slice, f32_view};

/// From this many input rows on (prompt processing), a packed weight goes to the
/// prompt GEMM ([`PackedMatrix::prompt_matmul`], AVX-512 VNNI) or, on CPUs
/// without it, is expanded to f32 for candle's GEMM (3.5x faster than the block
/// kernel at 111 rows on SmolLM2); fewer rows (decode) stay on the block kernel.
const PROMPT_GEMM_MIN_ROWS: usize = 16;

#[derive(Debug, Clone)]
pub enum Weight {
    /// GGUF block-quantized weight, `(out, in)`, multiplied by candle's quantized
    /// matmul (activations rounded to 8 bits, as llama.cpp does).
    Quantized(Arc<QTensor>, QMatMul),
    /// GGUF blocks multiplied by our exact kernel (activations stay f32).
    Packed(Arc<QTensor>, Arc<PackedMatrix>),
    /// Dense `(out, in)` weight; matmul has a backward, so it can be trained.
    Float(Tensor),
}

#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
    /// A low-rank delta added to the output: y = Wx + b + scale·B(Ax).
    pub lora: Option<LoraDelta>,
}

/// The LoRA update of one linear layer. `a` is (rank, in), `b` is (out, rank). In
/// training they are views of candle `Var`s, so gradients reach them through the
/// tensor path; serving also keeps plain copies for the one-token decode step.
#[derive(Debug, Clone)]
pub struct LoraDelta {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    vectors: Option<Arc<(Vec<f32>, Vec<f32>)>>,
}

impl LoraDelta {
    /// A delta for the tensor path (training).
    pub fn new(a: Tensor, b: Tensor, scale: f64) -> Result<Self> {
        let (rank, _) = a.dims2()?;
        let (_, rank_b) = b.dims2()?;
        if rank != rank_b {
            candle_core::bail!("LoRA A has rank {rank} but B has rank {rank_b}");
        }
        Ok(Self {
            a,
            b,
            scale,
            vectors: None,
        })
    }

    /// A delta that also keeps plain-vector copies, for the serving decode step.
    pub fn for_serving(a: Tensor, b: Tensor, scale: f64) -> Result<Self> {
        let mut delta = Self::new(a.detach(), b.detach(), scale)?;
        let vectors = (
            delta.a.flatten_all()?.to_vec1()?,
            delta.b.flatten_all()?.to_vec1()?,
        );
        delta.vectors = Some(Arc::new(vectors));
        Ok(delta)
    }

    pub fn rank(&self) -> usize {
        self.a.dim(0).unwrap_or(0)
    }

    /// scale·B(Ax) for a batch of rows `x` (..., in). The scale is applied to the
    /// rank-r intermediate, which is `out / rank` times smaller than the output.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let down = (matmul_rows(x, &self.a)? * self.scale)?;
        matmul_rows(&down, &self.b)
    }

    /// Adds scale·B(Ax) to `y` for one input vector.
    fn add_to_vec(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        let Some(vectors) = &self.vectors else {
            let t = Tensor::from_slice(x, (1, x.len()), &candle_core::Device::Cpu)?;
            let delta: Vec<f32> = self.forward(&t)?.flatten_all()?.to_vec1()?;
            for (v, d) in y.iter_mut().zip(delta) {
                *v += d;
            }
            return Ok(());
        };
        let (a, b) = vectors.as_ref();
        let rank = self.rank();
        let down: Vec<f32> = a
            .chunks_exact(x.len())
            .map(|row| super::kernels::dot_f32(row, x) * self.scale as f32)
            .collect();
        for (v, row) in y.iter_mut().zip(b.chunks_exact(rank)) {
            *v += super::kernels::dot_f32(row, &down);
        }
        Ok(())
    }
}

impl Linear {
    pub fn quantized(qtensor: QTensor, bias: Option<Tensor>) -> Result<Self> {
        let qtensor = Arc::new(qtensor);
        let matmul = QMatMul::from_arc(qtensor.clone())?;
        Ok(Self {
            weight: Weight::Quantized(qtensor, matmul),
            bias,
            lora: None,
        })
    }

    pub fn float(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: Weight::Float(weight),
            bias,
            lora: None,
        }
    }

    /// The same layer with its weight dequantized to f32 (for exact log-probs and
    /// as the starting point of training).
    pub fn to_float(&self) -> Result<Self> {
        let weight = match &self.weight {
            Weight::Quantized(q, _) | Weight::Packed(q, _) => {
                q.dequantize(&candle_core::Device::Cpu)?
            }
            Weight::Float(w) => w.clone(),
        };
        Ok(Self {
            lora: self.lora.clone(),
            ..Self::float(weight, self.bias.clone())
        })
    }

    /// The same layer multiplied by our exact block kernels, when its GGUF format
    /// has one (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K); other layers are
    /// returned unchanged.
    pub fn to_packed(&self) -> Result<Self> {
        let Weight::Quantized(q, _) = &self.weight else {
            return Ok(self.clone());
        };
        let Some(format) = BlockFormat::from_ggml(q.dtype()) else {
            return Ok(self.clone());
        };
        let (rows, cols) = q.shape().dims2()?;
        let packed = PackedMatrix::new(format, rows, cols, q.data()?.into_owned())
            .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        Ok(Self {
            weight: Weight::Packed(q.clone(), Arc::new(packed)),
            bias: self.bias.clone(),
            lora: self.lora.clone(),
        })
    }

    /// The same layer with its weight stored as `dtype` (F32 gives a dense float
    /// weight; anything else re-quantizes). Used to trade speed for accuracy.
    pub fn convert(&self, dtype: candle_core::quantized::GgmlDType) -> Result<Self> {
        use candle_core::quantized::GgmlDType;
        if let Weight::Quantized(q, _) | Weight::Packed(q, _) = &self.weight {
            if q.dtype() == dtype {
                return Ok(self.clone());
            }
        }
        let float = self.to_float()?;
        let Weight::Float(w) = &float.weight else {
            unreachable!("to_float returns a float weight")
        };
        if dtype == GgmlDType::F32 {
            return Ok(float);
        }
        Ok(Self {
            lora: self.lora.clone(),
            ..Self::quantized(QTensor::quantize(w, dtype)?, self.bias.clone())?
        })
    }

    /// The same layer multiplied by candle's quantized matmul (undoes `to_packed`).
    pub fn to_ggml(&self) -> Result<Self> {
        match &self.weight {
            Weight::Packed(q, _) => Ok(Self {
                weight: Weight::Quantized(q.clone(), QMatMul::from_arc(q.clone())?),
                bias: self.bias.clone(),
                lora: self.lora.clone(),
            }),
            _ => Ok(self.clone()),
        }
    }

    /// Several packed layers of the same input stacked into one (outputs
    /// concatenated in order), or None when they are not all packed alike.
    pub fn fuse(layers: &[&Linear]) -> Option<Linear> {
        let packed: Option<Vec<&PackedMatrix>> = layers
            .iter()
            .map(|l| match &l.weight {
                Weight::Packed(_, p) => Some(p.as_ref()),
                _ => None,
            })
            .collect();
        let fused = PackedMatrix::concat_rows(&packed?)?;
        let bias = match layers
            .iter()
            .map(|l| l.bias.clone())
            .collect::<Option<Vec<_>>>()
        {
            Some(biases) => Some(Tensor::cat(&biases, 0).ok()?),
            None if layers.iter().all(|l| l.bias.is_none()) => None,
            None => return None,
        };
        let Weight::Packed(q, _) = &layers[0].weight else {
            return None;
        };
        // The QTensor handle is kept only for dequantizing; the fused layer is used
        // for inference and never converted back.
        // The fused layer carries no LoRA: `forward_many` adds each part's own delta.
        Some(Self {
            weight: Weight::Packed(q.clone(), Arc::new(fused)),
            bias,
            lora: None,
        })
    }

    /// Output features.
    pub fn out_dim(&self) -> Result<usize> {
        match &self.weight {
            Weight::Quantized(q, _) | Weight::Packed(q, _) => q.shape().dims2().map(|(out, _)| out),
            Weight::Float(w) => w.dims2().map(|(out, _)| out),
        }
    }

    /// Adds the bias and the LoRA delta to the base product `y` of input `x`.
    fn finish(&self, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        match &self.lora {
            Some(lora) => y + lora.forward(x)?,
            None => Ok(y),
        }
    }

    /// Adds the LoRA delta of input vector `x` to the output slice `y` (for the
    /// decode step, where fused layers are split by hand).
    pub fn add_lora_vec(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        match &self.lora {
            Some(lora) => lora.add_to_vec(x, y),
            None => Ok(()),
        }
    }

    /// Several projections of the same input (q/k/v, gate/up). A `fused` layer
    /// (see [`Linear::fuse`]) computes them in one pass and is split; for a single
    /// token with ggml weights of one dtype, candle's fused gemv is used; otherwise
    /// they run one by one.
    pub fn forward_many(
        layers: &[&Linear],
        fused: Option<&Linear>,
        x: &Tensor,
    ) -> Result<Vec<Tensor>> {
        if let Some(fused) = fused {
            let y = fused.forward(x)?;
            let mut start = 0;
            let mut outs = Vec::with_capacity(layers.len());
            for l in layers {
                let width = l.out_dim()?;
                let part = y.narrow(candle_core::D::Minus1, start, width)?;
                outs.push(match &l.lora {
                    Some(lora) => (part + lora.forward(x)?)?,
                    None => part,
                });
                start += width;
            }
            return Ok(outs);
        }
        let quantized: Option<Vec<&QTensor>> = layers
            .iter()
            .map(|l| match &l.weight {
                Weight::Quantized(q, _) => Some(q.as_ref()),
                Weight::Packed(..) | Weight::Float(_) => None,
            })
            .collect();
        if let Some(qs) = quantized {
            let same_dtype = qs.windows(2).all(|w| w[0].dtype() == w[1].dtype());
            let rows: usize = x.dims()[..x.rank().saturating_sub(1)].iter().product();
            if same_dtype && rows == 1 && x.is_contiguous() {
                if let Some(outs) = QTensor::gemv_fused_shared_lhs(&qs, x)? {
                    return layers
                        .iter()
                        .zip(outs)
                        .map(|(l, y)| l.finish(x, y))
                        .collect();
                }
            }
        }
        layers.iter().map(|l| l.forward(x)).collect()
    }
}

impl Linear {
    /// One input vector to one output vector.
    pub fn forward_vec(&self, x: &[f32]) -> Result<Vec<f32>> {
        self.forward_rows(x, 1)
    }

    /// `rows` input vectors (row-major in `x`) to as many output vectors, for
    /// the decode step: packed weights go straight to the block kernel, which
    /// reads each weight once for all rows, with no tensor in between. Each
    /// row's result is the same whatever `rows` is (other weights run row by
    /// row for that reason), so a batched request gets its unbatched numbers.
    pub fn forward_rows(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let width = x.len() / rows.max(1);
        let mut y = match &self.weight {
            Weight::Packed(_, packed) => packed.matmul(x, rows),
            _ => {
                let mut y = Vec::new();
                for row in x.chunks_exact(width) {
                    let t = Tensor::from_slice(row, (1, width), &candle_core::Device::Cpu)?;
                    y.extend(self.forward(&t)?.flatten_all()?.to_vec1::<f32>()?);
                }
                return Ok(y);
            }
        };
        let out = y.len() / rows.max(1);
        if let Some(bias) = &self.bias {
            let bias = bias.to_vec1::<f32>()?;
            for row in y.chunks_exact_mut(out) {
                row.iter_mut().zip(&bias).for_each(|(v, b)| *v += b);
            }
        }
        if self.lora.is_some() {
            for (xi, yi) in x.chunks_exact(width).zip(y.chunks_exact_mut(out)) {
                self.add_lora_vec(xi, yi)?;
            }
        }
        Ok(y)
    }
}

/// `x` (..., in) times `w` (out, in) transposed, as one 2-D GEMM over all rows:
/// one large multiplication parallelises (and differentiates) better than a
/// batch of small ones.
fn matmul_rows(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() == 2 {
        return x.matmul(&w.t()?);
    }
    let inner = dims[dims.len() - 1];
    let rows = x.elem_count() / inner.max(1);
    let y = x.reshape((rows, inner))?.matmul(&w.t()?)?;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("rank >= 1") = w.dim(0)?;
    y.reshape(out_dims)
}

/// x·Wᵀ for a frozen W, straight on the storages (no copy of the input or the
/// output): the base product of [`FrozenMatmul`] and [`FrozenLoraMatmul`].
struct FrozenProduct {
    /// (m, n) rows.
    y: candle_core::CpuStorage,
    /// x as (m, k) rows.
    x_rows: candle_core::Layout,
    /// x's shape with the last dimension n.
    out_shape: candle_core::Shape,
}

impl FrozenProduct {
    fn new(
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        w: &Tensor,
        op: &str,
    ) -> Result<Self> {
        use candle_core::backend::BackendStorage;
        let Some((start, _)) = xl.contiguous_offsets() else {
            candle_core::bail!("{op}: the input must be contiguous");
        };
        let dims = xl.shape().dims();
        let k = dims[dims.len() - 1];
        let m = xl.shape().elem_count() / k.max(1);
        let (n, in_dim) = w.dims2()?;
        if in_dim != k {
            candle_core::bail!("{op}: input has {k} features, the weight {in_dim}");
        }
        let (w_storage, w_layout) = w.storage_and_layout();
        let candle_core::Storage::Cpu(w) = &*w_storage else {
            candle_core::bail!("{op}: the weight must be on the CPU");
        };
        let x_rows = candle_core::Layout::contiguous_with_offset((m, k), start);
        let y = xs.matmul(w, (1, m, n, k), &x_rows, &w_layout.transpose(0, 1)?)?;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank >= 1") = n;
        Ok(Self {
            y,
            x_rows,
            out_shape: out_dims.into(),
        })
    }
}

/// y = x·Wᵀ for a frozen W, differentiable in x only. candle's matmul backward
/// always computes the gradient of both operands; for a frozen weight that is a
/// wasted GEMM per linear plus a weight-sized buffer per step (with LoRA on
/// SmolLM2 it was about half the backward time). This op's backward is just
/// grad_x = grad_y·W.
struct FrozenMatmul {
    /// (out, in).
    w: Tensor,
}

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let product = FrozenProduct::new(storage, layout, &self.w, self.name())?;
        Ok((product.y, product.out_shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let dims = grad_res.dims();
        let out = dims[dims.len() - 1];
        let rows = grad_res.elem_count() / out.max(1);
        let grad = grad_res.reshape((rows, out))?.matmul(&self.w)?;
        let mut in_dims = dims.to_vec();
        *in_dims.last_mut().expect("rank >= 1") = self.w.dim(1)?;
        Ok(Some(grad.reshape(in_dims)?))
    }
}

/// y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ for a frozen W and a trainable LoRA pair (A, B), as
/// one op. Composed from candle ops this is five tensors of the output's size
/// (base product, low-rank product, scaled, sum) that the graph keeps until the
/// backward pass, and two gradient contributions to x; here the op keeps only
/// its inputs, and the backward recomputes the rank-r intermediate (cheap).
struct FrozenLoraMatmul {
    /// (out, in), no gradient.
    w: Tensor,
    scale: f64,
    /// Whether x needs a gradient (not for the first layer's input).
    input_grad: bool,
}

impl candle_core::CustomOp3 for FrozenLoraMatmul {
    fn name(&self) -> &'static str {
        "frozen-lora-matmul"
    }

    fn cpu_fwd(
        &self,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        a_s: &candle_core::CpuStorage,
        al: &candle_core::Layout,
        b_s: &candle_core::CpuStorage,
        bl: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        let FrozenProduct {
            y: base,
            x_rows,
            out_shape,
        } = FrozenProduct::new(xs, xl, &self.w, self.name())?;
        let (m, k) = x_rows.shape().dims2()?;
        let n = self.w.dim(0)?;
        let (rank, a_in) = al.shape().dims2()?;
        let (b_out, b_rank) = bl.shape().dims2()?;
        if a_in != k || b_out != n || b_rank != rank {
            candle_core::bail!(
                "frozen-lora-matmul: x (.., {k}), W ({n}, {k}), A ({rank}, {a_in}), B ({b_out}, {b_rank}) do not fit"
            );
        }
        let name = self.name();
        let x = Mat::rows(f32_slice(xs, &x_rows, name)?, m, k);
        let a = Mat::rows(f32_slice(a_s, al, name)?, rank, k);
        let b = Mat::rows(f32_slice(b_s, bl, name)?, n, rank);
        let CpuStorage::F32(mut y) = base else {
            candle_core::bail!("frozen-lora-matmul: f32 only");
        };
        // y += (s·x·Aᵀ)·Bᵀ, into the base product: no second output-sized buffer.
        let down = gemm(x, a.t(), self.scale as f32);
        gemm_into(&mut y, Mat::rows(&down, m, rank), b.t(), 1.0, true);
        Ok((CpuStorage::F32(y), out_shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let (n, k) = self.w.dims2()?;
        let (rank, _) = a.dims2()?;
        let m = grad.elem_count() / n.max(1);
        let grad = grad.contiguous()?;
        let (gy, xv) = (f32_view(&grad, name)?, f32_view(x, name)?);
        let (av, bv, wv) = (
            f32_view(a, name)?,
            f32_view(b, name)?,
            f32_view(&self.w, name)?,
        );
        let (gy, x2) = (Mat::rows(&gy, m, n), Mat::rows(&xv, m, k));
        let (am, bm) = (Mat::rows(&av, rank, k), Mat::rows(&bv, n, rank));
        let s = self.scale as f32;
        // g_down = s·gy·B is the gradient at the rank-r intermediate s·x·Aᵀ.
        let g_down = gemm(gy, bm, s);
        let down = gemm(x2, am.t(), s);
        let grad_b = gemm(gy.t(), Mat::rows(&down, m, rank), 1.0);
        let grad_a = gemm(Mat::rows(&g_down, m, rank).t(), x2, 1.0);
        let grad_x = match self.input_grad {
            true => {
                let mut gx = gemm(gy, Mat::rows(&wv, n, k), 1.0);
                gemm_into(&mut gx, Mat::rows(&g_down, m, rank), am, 1.0, true);
                Some(Tensor::from_vec(gx, x.shape(), x.device())?)
            }
            false => None,
        };
        Ok((
            grad_x,
            Some(Tensor::from_vec(grad_a, a.shape(), a.device())?),
            Some(Tensor::from_vec(grad_b, b.shape(), b.device())?),
        ))
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let (Weight::Float(w), Some(lora)) = (&self.weight, &self.lora) {
            let trains_lora = lora.a.track_op() || lora.b.track_op();
            if !w.track_op() && (trains_lora || x.track_op()) {
                let y = x.contiguous()?.apply_op3(
                    &lora.a,
                    &lora.b,
                    FrozenLoraMatmul {
                        w: w.clone(),
                        scale: lora.scale,
                        input_grad: x.track_op(),
                    },
                )?;
                return match &self.bias {
                    Some(bias) => y.broadcast_add(bias),
                    None => Ok(y),
                };
            }
        }
        let y = match &self.weight {
            Weight::Quantized(_, matmul) => matmul.forward(x)?,
            Weight::Packed(_, packed) => {
                let dims = x.dims();
                let k = dims[dims.len() - 1];
                let m = x.elem_count() / k.max(1);
                let input: Vec<f32> = x.flatten_all()?.to_vec1()?;
                let mut out_dims = dims.to_vec();
                *out_dims.last_mut().expect("rank >= 1") = packed.rows();
                let y = match m >= PROMPT_GEMM_MIN_ROWS {
                    true => match packed.prompt_matmul(&input, m) {
                        Some(y) => y,
                        None => {
                            let w = Tensor::from_vec(
                                packed.to_dense(),
                                (packed.rows(), k),
                                x.device(),
                            )?;
                            return self.finish(x, x.broadcast_matmul(&w.t()?)?);
                        }
                    },
                    false => packed.matmul(&input, m),
                };
                Tensor::from_vec(y, out_dims, x.device())?
            }
            // In training a frozen weight needs no gradient of its own.
            Weight::Float(w) if x.track_op() && !w.track_op() => {
                x.contiguous()?.apply_op1(FrozenMatmul { w: w.clone() })?
            }
            Weight::Float(w) => matmul_rows(x, w)?,
        };
        self.finish(x, y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    use crate::model::testing::max_abs_diff as max_diff;

    #[test]
    fn frozen_lora_matmul_matches_the_composition() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.3, (24, 40), &dev).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 40), &dev).unwrap()).unwrap();
        let a = Var::from_tensor(&Tensor::randn(0f32, 0.2, (4, 40), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.2, (24, 4), &dev).unwrap()).unwrap();
        let weights = Tensor::randn(0f32, 1.0, (2, 5, 24), &dev).unwrap();
        let run = |fused: bool| {
            let mut layer = Linear::float(w.clone(), None);
            layer.lora =
                Some(LoraDelta::new(a.as_tensor().clone(), b.as_tensor().clone(), 2.0).unwrap());
            let y = match fused {
                true => layer.forward(x.as_tensor()).unwrap(),
                // The composition: base product plus the LoRA delta, as before.
                false => (matmul_rows(x.as_tensor(), &w).unwrap()
                    + layer.lora.as_ref().unwrap().forward(x.as_tensor()).unwrap())
                .unwrap(),
            };
            let grads = (&y * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
            (y, g(&x), g(&a), g(&b))
        };
        let (y1, gx1, ga1, gb1) = run(true);
        let (y2, gx2, ga2, gb2) = run(false);
        assert!(max_diff(&y1, &y2) < 1e-5, "values");
        assert!(max_diff(&gx1, &gx2) < 1e-4, "input gradient");
        assert!(max_diff(&ga1, &ga2) < 1e-4, "A gradient");
        assert!(max_diff(&gb1, &gb2) < 1e-4, "B gradient");
    }

    #[test]
    fn a_first_layer_input_gets_no_gradient_but_the_adapter_does() {
        // x without a graph (the embedding output): only A and B are trained.
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 8), &dev).unwrap();
        let a = Var::from_tensor(&Tensor::randn(0f32, 0.2, (2, 8), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.2, (6, 2), &dev).unwrap()).unwrap();
        let mut layer = Linear::float(Tensor::randn(0f32, 0.3, (6, 8), &dev).unwrap(), None);
        layer.lora =
            Some(LoraDelta::new(a.as_tensor().clone(), b.as_tensor().clone(), 1.0).unwrap());
        let grads = layer
            .forward(&x)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(a.as_tensor()).is_some() && grads.get(b.as_tensor()).is_some());
        assert!(grads.get(&x).is_none());
    }
}
