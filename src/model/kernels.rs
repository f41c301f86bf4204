//! Matrix products straight from GGUF blocks, with f32 activations.
//!
//! Why our own kernel: candle 0.11 has no SIMD path for Q4_1 (the default model's
//! format), so its quantized matmul runs scalar code; and like llama.cpp it rounds
//! the activations to 8 bits first, which flips some of SmolLM2-135M's greedy
//! answers. Here the weights stay 4- or 8-bit in memory (what decode speed depends
//! on) while activations keep 16 bits (one token) or full f32 (several tokens): the
//! logits agree with the f32 dequantized model to about 1e-4.

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

/// A (rows, cols) weight matrix kept as quantized blocks, row-major, with each
/// block's f16 scale (and min) widened to f32 once at load so the inner loop does
/// no half-precision conversion.
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    /// Per block: Q4_1 16 nibble bytes, Q8_0 32 signed bytes.
    quants: Vec<u8>,
    scales: Vec<f32>,
    /// Q4_1 only: per-block minimum.
    mins: Vec<f32>,
}

impl PackedMatrix {
    /// Takes the raw GGUF bytes of a (rows, cols) tensor.
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
        let blocks = rows * cols / BLOCK;
        let expected = blocks * format.block_bytes();
        anyhow::ensure!(
            data.len() == expected,
            "{format:?} matrix {rows}x{cols} needs {expected} bytes, got {}",
            data.len()
        );
        let half =
            |b: &[u8], at: usize| f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32();
        let (quant_bytes, mut quants, mut scales, mut mins) = match format {
            BlockFormat::Q4_1 => (
                16,
                Vec::with_capacity(blocks * 16),
                Vec::with_capacity(blocks),
                Vec::with_capacity(blocks),
            ),
            BlockFormat::Q8_0 => (
                32,
                Vec::with_capacity(blocks * 32),
                Vec::with_capacity(blocks),
                Vec::new(),
            ),
        };
        for block in data.chunks_exact(format.block_bytes()) {
            scales.push(half(block, 0));
            match format {
                BlockFormat::Q4_1 => {
                    mins.push(half(block, 2));
                    quants.extend_from_slice(&block[4..4 + quant_bytes]);
                }
                BlockFormat::Q8_0 => quants.extend_from_slice(&block[2..2 + quant_bytes]),
            }
        }
        Ok(Self {
            format,
            rows,
            cols,
            quants,
            scales,
            mins,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The whole matrix as dense f32, row-major (rows, cols), expanded in parallel.
    /// Prompt processing uses it: with many activation rows a tuned f32 GEMM on
    /// freshly expanded weights beats any block-at-a-time kernel.
    pub fn to_dense(&self) -> Vec<f32> {
        let blocks_per_row = self.cols / BLOCK;
        let mut dense = vec![0f32; self.rows * self.cols];
        dense
            .par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(r, out)| {
                let mut row = Vec::with_capacity(self.cols);
                dequantize_row(self.format, &self.row(r, blocks_per_row), &mut row);
                out.copy_from_slice(&row);
            });
        dense
    }

    /// Stacks matrices with the same format and width into one (their rows in
    /// order), so several projections of one input run as a single parallel pass.
    pub fn concat_rows(parts: &[&PackedMatrix]) -> Option<Self> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.format != first.format || p.cols != first.cols)
        {
            return None;
        }
        Some(Self {
            format: first.format,
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            quants: parts
                .iter()
                .flat_map(|p| p.quants.iter().copied())
                .collect(),
            scales: parts
                .iter()
                .flat_map(|p| p.scales.iter().copied())
                .collect(),
            mins: parts.iter().flat_map(|p| p.mins.iter().copied()).collect(),
        })
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `out = x · Wᵀ` for `x` of shape (m, cols); `out` is (m, rows), row-major.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "activation shape mismatch");
        let blocks_per_row = self.cols / BLOCK;
        // Σx per block of each activation row: the Q4_1 minimum multiplies it.
        let xsums: Vec<f32> = x.chunks_exact(BLOCK).map(|c| c.iter().sum()).collect();
        let x16 = Activations16::new(x);
        // Work is split by weight rows so each weight byte is read once per call.
        // Results are produced transposed (rows, m) so every task writes one
        // contiguous slice; m == 1 (decode) needs no transpose.
        let threads = rayon::current_num_threads().max(1);
        let rows_per_task = self.rows.div_ceil(threads * 4).max(16);
        let mut transposed = vec![0f32; self.rows * m];
        transposed
            .par_chunks_mut(rows_per_task * m)
            .enumerate()
            .for_each(|(task, out)| {
                let first_row = task * rows_per_task;
                if m < DENSE_ROW_MIN_M {
                    for (r, out_row) in out.chunks_exact_mut(m).enumerate() {
                        let row = self.row(first_row + r, blocks_per_row);
                        for (i, o) in out_row.iter_mut().enumerate() {
                            let xi = &x[i * self.cols..(i + 1) * self.cols];
                            let blocks = i * blocks_per_row..(i + 1) * blocks_per_row;
                            let xq = Quantized16 {
                                values: &x16.values[i * self.cols..(i + 1) * self.cols],
                                scales: &x16.scales[blocks.clone()],
                            };
                            *o = dot(self.format, &row, xi, &xq, &xsums[blocks]);
                        }
                    }
                } else {
                    // Many activation rows (prefill): expand four weight rows to f32
                    // once, then stream every activation row past all four, so each
                    // activation load feeds four dot products.
                    let rows_here = out.len() / m;
                    let mut dense: [Vec<f32>; 4] = Default::default();
                    for group_start in (0..rows_here).step_by(4) {
                        let group = (rows_here - group_start).min(4);
                        for (g, buffer) in dense.iter_mut().enumerate().take(group) {
                            let row = self.row(first_row + group_start + g, blocks_per_row);
                            dequantize_row(self.format, &row, buffer);
                        }
                        for (i, xi) in x.chunks_exact(self.cols).enumerate() {
                            if group == 4 {
                                let sums = dot4_f32(&dense, xi);
                                for (g, sum) in sums.into_iter().enumerate() {
                                    out[(group_start + g) * m + i] = sum;
                                }
                            } else {
                                for (g, buffer) in dense.iter().enumerate().take(group) {
                                    out[(group_start + g) * m + i] = dot_f32(buffer, xi);
                                }
                            }
                        }
                    }
                }
            });
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

    fn row(&self, r: usize, blocks_per_row: usize) -> Row<'_> {
        let blocks = r * blocks_per_row..(r + 1) * blocks_per_row;
        let quant_bytes = self.quants.len() / self.scales.len().max(1);
        Row {
            quants: &self.quants[blocks.start * quant_bytes..blocks.end * quant_bytes],
            scales: &self.scales[blocks.clone()],
            mins: if self.mins.is_empty() {
                &[]
            } else {
                &self.mins[blocks]
            },
        }
    }
}

/// From this many activation rows on, a weight row is expanded to f32 once and
/// reused, instead of being unpacked again for every activation row.
const DENSE_ROW_MIN_M: usize = 4;

fn dequantize_row(format: BlockFormat, row: &Row, out: &mut Vec<f32>) {
    out.clear();
    for (b, &d) in row.scales.iter().enumerate() {
        match format {
            BlockFormat::Q4_1 => {
                let qs = &row.quants[b * 16..(b + 1) * 16];
                let min = row.mins[b];
                out.extend(qs.iter().map(|q| f32::from(q & 0x0F) * d + min));
                out.extend(qs.iter().map(|q| f32::from(q >> 4) * d + min));
            }
            BlockFormat::Q8_0 => {
                let qs = &row.quants[b * 32..(b + 1) * 32];
                out.extend(qs.iter().map(|&q| f32::from(q as i8) * d));
            }
        }
    }
}

/// A dot product LLVM vectorises (eight independent partial sums).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut partial = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            partial[i] += x[i] * y[i];
        }
    }
    partial.iter().sum::<f32>() + tail
}

/// Four dot products of `x` with four equally long rows, sharing each load of `x`.
fn dot4_f32(rows: &[Vec<f32>; 4], x: &[f32]) -> [f32; 4] {
    let mut partial = [[0f32; 8]; 4];
    let chunks = x.len() / 8;
    for c in 0..chunks {
        let xs: &[f32; 8] = x[c * 8..c * 8 + 8].try_into().expect("8 values");
        for (p, row) in partial.iter_mut().zip(rows) {
            let ws: &[f32; 8] = row[c * 8..c * 8 + 8].try_into().expect("8 values");
            for j in 0..8 {
                p[j] += ws[j] * xs[j];
            }
        }
    }
    let mut sums = [0f32; 4];
    for ((sum, p), row) in sums.iter_mut().zip(&partial).zip(rows) {
        let tail: f32 = (chunks * 8..x.len()).map(|j| row[j] * x[j]).sum();
        *sum = p.iter().sum::<f32>() + tail;
    }
    sums
}

/// One weight row's blocks.
struct Row<'a> {
    quants: &'a [u8],
    scales: &'a [f32],
    mins: &'a [f32],
}

/// Activation rows rounded to 16-bit integers with one f32 scale per 32-value
/// block: the relative rounding error is below 2^-15 (llama.cpp's 8-bit activations
/// are at 2^-7, which is what moves SmolLM2's logits), and it lets the SIMD kernel
/// multiply with `madd_epi16`, half the instructions of widening to f32.
struct Activations16 {
    values: Vec<i16>,
    scales: Vec<f32>,
}

impl Activations16 {
    fn new(x: &[f32]) -> Self {
        let mut values = Vec::with_capacity(x.len());
        let mut scales = Vec::with_capacity(x.len() / BLOCK);
        for block in x.chunks_exact(BLOCK) {
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = max / f32::from(i16::MAX);
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            values.extend(block.iter().map(|v| (v * inv).round() as i16));
            scales.push(scale);
        }
        Self { values, scales }
    }
}

/// One activation row of [`Activations16`].
struct Quantized16<'a> {
    values: &'a [i16],
    scales: &'a [f32],
}

/// Dot product of one weight row with one activation row, given as f32 (`x`) and
/// as 16-bit blocks (`xq`); `xsums` is Σx per block.
fn dot(format: BlockFormat, row: &Row, x: &[f32], xq: &Quantized16, xsums: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features these functions are compiled for, and
            // the slices hold `scales.len()` whole blocks (checked in `new`).
            return unsafe {
                match format {
                    BlockFormat::Q4_1 => avx2::dot_q4_1(row, xq, xsums),
                    BlockFormat::Q8_0 => avx2::dot_q8_0(row, xq),
                }
            };
        }
    }
    let _ = xq;
    dot_portable(format, row, x, xsums)
}

/// The reference implementation (and the path on CPUs without AVX2).
fn dot_portable(format: BlockFormat, row: &Row, x: &[f32], xsums: &[f32]) -> f32 {
    let mut total = 0f32;
    for (b, &d) in row.scales.iter().enumerate() {
        let xs = &x[b * BLOCK..(b + 1) * BLOCK];
        let block_sum: f32 = match format {
            BlockFormat::Q4_1 => {
                let qs = &row.quants[b * 16..(b + 1) * 16];
                let lo: f32 = (0..16).map(|j| f32::from(qs[j] & 0x0F) * xs[j]).sum();
                let hi: f32 = (0..16).map(|j| f32::from(qs[j] >> 4) * xs[j + 16]).sum();
                total += row.mins[b] * xsums[b];
                lo + hi
            }
            BlockFormat::Q8_0 => {
                let qs = &row.quants[b * 32..(b + 1) * 32];
                (0..32).map(|j| f32::from(qs[j] as i8) * xs[j]).sum()
            }
        };
        total += d * block_sum;
    }
    total
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Quantized16, Row, BLOCK};

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Σ_b d_b·sx_b·(q_b · xq_b) + m_b·Σx_b, the products summed as i32 by madd.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_q4_1(row: &Row, xq: &Quantized16, xsums: &[f32]) -> f32 {
        let mask = _mm_set1_epi8(0x0F);
        let mut acc = _mm256_setzero_ps();
        let mut min_part = 0f32;
        let q = row.quants.as_ptr();
        let xp = xq.values.as_ptr();
        for b in 0..row.scales.len() {
            let bytes = _mm_loadu_si128(q.add(b * 16) as *const __m128i);
            let lo = _mm256_cvtepu8_epi16(_mm_and_si128(bytes, mask));
            let hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask));
            let xb = xp.add(b * BLOCK);
            let x_lo = _mm256_loadu_si256(xb as *const __m256i);
            let x_hi = _mm256_loadu_si256(xb.add(16) as *const __m256i);
            let sums = _mm256_add_epi32(_mm256_madd_epi16(lo, x_lo), _mm256_madd_epi16(hi, x_hi));
            let scale = row.scales.get_unchecked(b) * xq.scales.get_unchecked(b);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(scale), acc);
            min_part += row.mins.get_unchecked(b) * xsums.get_unchecked(b);
        }
        hsum(acc) + min_part
    }

    /// Σ_b d_b·sx_b·(q_b · xq_b), the products summed as i32 by madd.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_q8_0(row: &Row, xq: &Quantized16) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let q = row.quants.as_ptr();
        let xp = xq.values.as_ptr();
        for b in 0..row.scales.len() {
            let first = _mm256_cvtepi8_epi16(_mm_loadu_si128(q.add(b * 32) as *const __m128i));
            let second =
                _mm256_cvtepi8_epi16(_mm_loadu_si128(q.add(b * 32 + 16) as *const __m128i));
            let xb = xp.add(b * BLOCK);
            let x_first = _mm256_loadu_si256(xb as *const __m256i);
            let x_second = _mm256_loadu_si256(xb.add(16) as *const __m256i);
            let sums = _mm256_add_epi32(
                _mm256_madd_epi16(first, x_first),
                _mm256_madd_epi16(second, x_second),
            );
            let scale = row.scales.get_unchecked(b) * xq.scales.get_unchecked(b);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(scale), acc);
        }
        hsum(acc)
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
            let (rows, cols) = (70, 96); // 70 rows: the 4-row groups end with a partial one
            let w = fixed_values(rows, cols, 1);
            let q = QTensor::quantize(&w, dtype).unwrap();
            let dense = q.dequantize(&Device::Cpu).unwrap();
            let packed =
                PackedMatrix::new(format, rows, cols, q.data().unwrap().into_owned()).unwrap();
            for m in [1, 3, 9, 4] {
                let x = fixed_values(m, cols, 2);
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
                let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
                // few rows: 16-bit activations; many: exact f32 rows
                let tolerance = if m < DENSE_ROW_MIN_M { 1e-4 } else { 1e-5 } * scale;
                assert!(
                    worst < tolerance,
                    "{dtype:?} m={m}: max |difference| {worst} (max |y| {scale})"
                );
            }
        }
    }

    /// Deterministic, roughly unit-scale values, so the tests cannot flake.
    fn fixed_values(rows: usize, cols: usize, seed: u32) -> Tensor {
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| ((i as f32 * 12.9898 + seed as f32 * 78.233).sin() * 43758.547).fract() * 3.0)
            .collect();
        Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap()
    }

    #[test]
    fn simd_and_portable_dot_agree() {
        for (dtype, format) in [
            (GgmlDType::Q4_1, BlockFormat::Q4_1),
            (GgmlDType::Q8_0, BlockFormat::Q8_0),
        ] {
            let cols = 256;
            let w = fixed_values(1, cols, 3);
            let q = QTensor::quantize(&w, dtype).unwrap();
            let packed =
                PackedMatrix::new(format, 1, cols, q.data().unwrap().into_owned()).unwrap();
            let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
            let xsums: Vec<f32> = x.chunks_exact(BLOCK).map(|c| c.iter().sum()).collect();
            let row = packed.row(0, cols / BLOCK);
            let x16 = Activations16::new(&x);
            let xq = Quantized16 {
                values: &x16.values,
                scales: &x16.scales,
            };
            let (a, b) = (
                dot(format, &row, &x, &xq, &xsums),
                dot_portable(format, &row, &x, &xsums),
            );
            // 16-bit rounding errors scale with the sum of |w·x| terms, not the result.
            let dense: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let magnitude: f32 = dense.iter().zip(&x).map(|(w, x)| (w * x).abs()).sum();
            assert!(
                (a - b).abs() < 1e-4 * magnitude.max(1.0),
                "{format:?}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn rejects_wrong_sizes() {
        assert!(PackedMatrix::new(BlockFormat::Q4_1, 2, 48, vec![0; 40]).is_err());
        assert!(PackedMatrix::new(BlockFormat::Q8_0, 2, 32, vec![0; 10]).is_err());
    }
}
