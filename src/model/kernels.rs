//! Matrix products straight from GGUF blocks, with f32 activations.
//!
//! Why our own kernel: candle 0.11 has no SIMD path for Q4_1 (the default model's
//! format), so its quantized matmul runs scalar code; and like llama.cpp it rounds
//! the activations to 8 bits first, which flips some of SmolLM2-135M's greedy
//! answers. Here each 32-weight block is expanded to f32 in registers and multiplied
//! with the unrounded activations: the result is the exact product of the stored
//! weights (what the f32 dequantized model computes), while the weights stay
//! 4- or 8-bit in memory, which is what decode speed depends on.

use half::f16;
use rayon::prelude::*;

/// Weights per GGUF block for the formats handled here.
pub const BLOCK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    /// f16 scale d, f16 min m, 16 bytes of nibbles: w = d * q + m.
    Q4_1,
    /// f16 scale d, 32 signed bytes: w = d * q.
    Q8_0,
}

impl BlockFormat {
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
}

/// A (rows, cols) weight matrix kept as GGUF blocks, row-major.
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl PackedMatrix {
    pub fn new(
        format: BlockFormat,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            cols.is_multiple_of(BLOCK),
            "{cols} columns is not a multiple of {BLOCK}"
        );
        let expected = rows * cols / BLOCK * format.block_bytes();
        anyhow::ensure!(
            data.len() == expected,
            "{format:?} matrix {rows}x{cols} needs {expected} bytes, got {}",
            data.len()
        );
        Ok(Self {
            format,
            rows,
            cols,
            data,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `out = x · Wᵀ` for `x` of shape (m, cols); `out` is (m, rows), row-major.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "activation shape mismatch");
        let row_bytes = self.cols / BLOCK * self.format.block_bytes();
        // Work is split by weight rows so each weight byte is read once per call.
        // Results are produced transposed (rows, m) so every task writes one
        // contiguous slice; m == 1 (decode) needs no transpose.
        let threads = rayon::current_num_threads().max(1);
        let rows_per_task = self.rows.div_ceil(threads * 4).max(16);
        let mut transposed = vec![0f32; self.rows * m];
        transposed
            .par_chunks_mut(rows_per_task * m)
            .zip(self.data.par_chunks(rows_per_task * row_bytes))
            .for_each(|(out, weights)| rows_kernel(self.format, weights, row_bytes, x, m, out));
        if m == 1 {
            return transposed;
        }
        let mut out = vec![0f32; m * self.rows];
        for r in 0..self.rows {
            for i in 0..m {
                out[i * self.rows + r] = transposed[r * m + i];
            }
        }
        out
    }
}

fn rows_kernel(
    format: BlockFormat,
    weights: &[u8],
    row_bytes: usize,
    x: &[f32],
    m: usize,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function is compiled for.
            unsafe { rows_kernel_avx2(format, weights, row_bytes, x, m, out) };
            return;
        }
    }
    rows_kernel_generic(format, weights, row_bytes, x, m, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_kernel_avx2(
    format: BlockFormat,
    weights: &[u8],
    row_bytes: usize,
    x: &[f32],
    m: usize,
    out: &mut [f32],
) {
    rows_kernel_generic(format, weights, row_bytes, x, m, out);
}

/// Written so that LLVM vectorises it: fixed-size arrays, element-wise updates,
/// one horizontal sum per output. Inlined into each target-feature variant.
#[inline(always)]
fn rows_kernel_generic(
    format: BlockFormat,
    weights: &[u8],
    row_bytes: usize,
    x: &[f32],
    m: usize,
    out: &mut [f32],
) {
    let cols = x.len() / m;
    let mut w = [0f32; BLOCK];
    let mut acc = vec![[0f32; BLOCK]; m];
    for (row, out_row) in weights.chunks_exact(row_bytes).zip(out.chunks_exact_mut(m)) {
        acc.iter_mut().for_each(|a| *a = [0.0; BLOCK]);
        for (b, block) in row.chunks_exact(format.block_bytes()).enumerate() {
            unpack(format, block, &mut w);
            for (i, a) in acc.iter_mut().enumerate() {
                let xs: &[f32; BLOCK] = x[i * cols + b * BLOCK..i * cols + (b + 1) * BLOCK]
                    .try_into()
                    .expect("block-sized slice");
                for j in 0..BLOCK {
                    a[j] += w[j] * xs[j];
                }
            }
        }
        for (o, a) in out_row.iter_mut().zip(&acc) {
            *o = a.iter().sum();
        }
    }
}

#[inline(always)]
fn unpack(format: BlockFormat, block: &[u8], w: &mut [f32; BLOCK]) {
    let d = f16::from_bits(u16::from_le_bytes([block[0], block[1]])).to_f32();
    match format {
        BlockFormat::Q4_1 => {
            let min = f16::from_bits(u16::from_le_bytes([block[2], block[3]])).to_f32();
            let qs: &[u8; 16] = block[4..20].try_into().expect("Q4_1 block");
            for j in 0..16 {
                w[j] = f32::from(qs[j] & 0x0F) * d + min;
                w[j + 16] = f32::from(qs[j] >> 4) * d + min;
            }
        }
        BlockFormat::Q8_0 => {
            let qs: &[u8; 32] = block[2..34].try_into().expect("Q8_0 block");
            for j in 0..BLOCK {
                w[j] = f32::from(qs[j] as i8) * d;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    #[test]
    fn matches_dequantized_matmul_for_q4_1_and_q8_0() {
        for (dtype, format) in [
            (GgmlDType::Q4_1, BlockFormat::Q4_1),
            (GgmlDType::Q8_0, BlockFormat::Q8_0),
        ] {
            let (rows, cols) = (70, 96);
            let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let dense = q.dequantize(&Device::Cpu).unwrap();
            let packed =
                PackedMatrix::new(format, rows, cols, q.data().unwrap().into_owned()).unwrap();
            for m in [1, 3] {
                let x = Tensor::randn(0f32, 1.0, (m, cols), &Device::Cpu).unwrap();
                let expected: Vec<f32> = x
                    .matmul(&dense.t().unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let got = packed.matmul(&x.flatten_all().unwrap().to_vec1().unwrap(), m);
                let worst = expected
                    .iter()
                    .zip(&got)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(worst < 1e-4, "{dtype:?} m={m}: max |difference| {worst}");
            }
        }
    }

    #[test]
    fn rejects_wrong_sizes() {
        assert!(PackedMatrix::new(BlockFormat::Q4_1, 2, 48, vec![0; 40]).is_err());
        assert!(PackedMatrix::new(BlockFormat::Q8_0, 2, 32, vec![0; 10]).is_err());
    }
}
