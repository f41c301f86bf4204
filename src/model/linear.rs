//! A linear layer whose weight is either quantized (fast serving) or float
//! (training and exact log-probs), with an optional bias.
//!
//! This is the one place where a weight meets an activation, so LoRA deltas
//! (y = Wx + s·B(Ax)) plug in here for both serving and training.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Module, Result, Tensor};

use super::kernels::{BlockFormat, PackedMatrix};

/// From this many input rows on (prompt processing), a packed weight is expanded
/// to f32 and multiplied by candle's GEMM: 3.5x faster than the block kernel at
/// 111 rows on SmolLM2 (69 -> 245 tok/s), while decode (1 row) stays on the block kernel.
const DENSE_GEMM_MIN_ROWS: usize = 16;

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
}

impl Linear {
    pub fn quantized(qtensor: QTensor, bias: Option<Tensor>) -> Result<Self> {
        let qtensor = Arc::new(qtensor);
        let matmul = QMatMul::from_arc(qtensor.clone())?;
        Ok(Self {
            weight: Weight::Quantized(qtensor, matmul),
            bias,
        })
    }

    pub fn float(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: Weight::Float(weight),
            bias,
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
        Ok(Self::float(weight, self.bias.clone()))
    }

    /// The same layer multiplied by our exact block kernel, when its GGUF format
    /// has one (Q4_1, Q8_0); other layers are returned unchanged.
    pub fn to_packed(&self) -> Result<Self> {
        let Weight::Quantized(q, _) = &self.weight else {
            return Ok(self.clone());
        };
        let format = match q.dtype() {
            candle_core::quantized::GgmlDType::Q4_1 => BlockFormat::Q4_1,
            candle_core::quantized::GgmlDType::Q8_0 => BlockFormat::Q8_0,
            _ => return Ok(self.clone()),
        };
        let (rows, cols) = q.shape().dims2()?;
        let packed = PackedMatrix::new(format, rows, cols, q.data()?.into_owned())
            .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        Ok(Self {
            weight: Weight::Packed(q.clone(), Arc::new(packed)),
            bias: self.bias.clone(),
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
        Self::quantized(QTensor::quantize(w, dtype)?, self.bias.clone())
    }

    /// The same layer multiplied by candle's quantized matmul (undoes `to_packed`).
    pub fn to_ggml(&self) -> Result<Self> {
        match &self.weight {
            Weight::Packed(q, _) => Ok(Self {
                weight: Weight::Quantized(q.clone(), QMatMul::from_arc(q.clone())?),
                bias: self.bias.clone(),
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
        Some(Self {
            weight: Weight::Packed(q.clone(), Arc::new(fused)),
            bias,
        })
    }

    /// Output features.
    pub fn out_dim(&self) -> Result<usize> {
        match &self.weight {
            Weight::Quantized(q, _) | Weight::Packed(q, _) => q.shape().dims2().map(|(out, _)| out),
            Weight::Float(w) => w.dims2().map(|(out, _)| out),
        }
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
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
                outs.push(y.narrow(candle_core::D::Minus1, start, width)?);
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
                        .map(|(l, y)| l.add_bias(y))
                        .collect();
                }
            }
        }
        layers.iter().map(|l| l.forward(x)).collect()
    }
}

impl Linear {
    /// One input vector to one output vector, for the decode step: packed weights
    /// go straight to the block kernel with no tensor allocation in between.
    pub fn forward_vec(&self, x: &[f32]) -> Result<Vec<f32>> {
        let mut y = match &self.weight {
            Weight::Packed(_, packed) => packed.matmul(x, 1),
            _ => {
                let t = Tensor::from_slice(x, (1, x.len()), &candle_core::Device::Cpu)?;
                return self.forward(&t)?.flatten_all()?.to_vec1();
            }
        };
        if let Some(bias) = &self.bias {
            for (v, b) in y.iter_mut().zip(bias.to_vec1::<f32>()?) {
                *v += b;
            }
        }
        Ok(y)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            Weight::Quantized(_, matmul) => matmul.forward(x)?,
            Weight::Packed(_, packed) => {
                let dims = x.dims();
                let k = dims[dims.len() - 1];
                let m = x.elem_count() / k.max(1);
                if m >= DENSE_GEMM_MIN_ROWS {
                    let w = Tensor::from_vec(packed.to_dense(), (packed.rows(), k), x.device())?;
                    return self.add_bias(x.broadcast_matmul(&w.t()?)?);
                }
                let input: Vec<f32> = x.flatten_all()?.to_vec1()?;
                let mut out_dims = dims.to_vec();
                *out_dims.last_mut().expect("rank >= 1") = packed.rows();
                Tensor::from_vec(packed.matmul(&input, m), out_dims, x.device())?
            }
            Weight::Float(w) => x.broadcast_matmul(&w.t()?)?,
        };
        self.add_bias(y)
    }
}
