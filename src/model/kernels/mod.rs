//! Matrix products straight from GGUF blocks, with f32 activations in and out.
//!
//! Why our own kernels: candle 0.11 has SIMD paths for only some formats (none for
//! Q4_1 or Q5_0, which the default model and Qwen2.5's Q4_K_M files are mostly made
//! of), and like llama.cpp it rounds the activations to 8 bits first, which flips
//! some of SmolLM2-135M's greedy answers. Here the weights stay in their GGUF bytes
//! (what decode speed depends on) while activations are rounded to 16 bits per
//! 32-value group (or stay f32 for prompts on CPUs without AVX-512 VNNI): the
//! logits agree with the f32 dequantized model to about 5e-4 of the largest.
//!
//! - [`formats`]: the block layouts and their scalar dequantization.
//! - `x86`: the AVX2 dot products (runtime-detected; the portable path dequantizes).
//! - `avx512`: the same dot products on 512-bit vectors, where the CPU has AVX-512
//!   F and BW (runtime-detected; `CLAW_NO_AVX512=1` keeps the AVX2 ones).
//! - `vnni`: the AVX-512 VNNI GEMM for prompt chunks (runtime-detected; without it
//!   prompts expand the weights to f32 for candle's GEMM).
//! - [`quads`]: the layout Q4_0, Q4_1, Q5_0 and Q5_1 rows are stored in where the
//!   CPU has AVX-512 VNNI (four blocks' fields gathered, same bytes), and the
//!   activation order that `avx512`'s `vpdpbusd` decode kernels read with them
//!   and with Q4_K/Q5_K blocks, at several times the speed of the `vpmaddwd`
//!   ones (`CLAW_NO_VNNI_DECODE=1` keeps those, to compare the two).

#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod formats;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
mod quads;
mod quantized16;
#[cfg(target_arch = "x86_64")]
mod vnni;
#[cfg(target_arch = "x86_64")]
mod x86;

use rayon::prelude::*;

use super::pool::{HotPool, SharedOut};

use formats::dequantize_row;
pub use formats::{BlockFormat, GROUP};
use quantized16::Quantized16;

/// A (rows, cols) weight matrix kept as its GGUF blocks, row-major; on CPUs
/// with AVX-512 VNNI, rows of the 32-weight nibble formats are stored in the
/// [`quads`] layout instead (the same bytes, rearranged).
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
    /// The activation order of the `vpdpbusd` decode kernel that multiplies
    /// this matrix, `None` where the `vpmaddwd` ones do. `Quads`: each row's
    /// whole quads are stored in the [`quads`] layout.
    order: Option<quads::PlaneOrder>,
}

impl PackedMatrix {
    /// Takes the raw GGUF bytes of a (rows, cols) tensor.
    pub fn new(
        format: BlockFormat,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> anyhow::Result<Self> {
        let per_block = format.block_weights();
        anyhow::ensure!(
            cols.is_multiple_of(per_block),
            "{format:?} needs rows of whole {per_block}-weight blocks, got {cols} columns"
        );
        let expected = rows * cols / per_block * format.block_bytes();
        anyhow::ensure!(
            data.len() == expected,
            "{format:?} matrix {rows}x{cols} needs {expected} bytes, got {}",
            data.len()
        );
        Ok(Self::with_kernel(
            format,
            rows,
            cols,
            data,
            vnni_decode_enabled(),
        ))
    }

    /// The matrix of GGUF bytes `data` (checked by the caller), to be decoded
    /// by the `vpdpbusd` kernels where `vnni` and the format has one (its rows
    /// then stored in quads if it is a nibble format).
    fn with_kernel(
        format: BlockFormat,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
        vnni: bool,
    ) -> Self {
        use quads::PlaneOrder;
        let nibbles = quads::QuadFields::of(format).is_some() && quads::quad_groups(cols) > 0;
        let order = match (vnni, format) {
            (false, _) => None,
            (true, _) if nibbles => Some(PlaneOrder::Quads),
            (true, BlockFormat::Q4K | BlockFormat::Q5K) => Some(PlaneOrder::KQuantHalf),
            (true, BlockFormat::Q6K) => Some(PlaneOrder::Natural),
            _ => None,
        };
        let data = match order {
            Some(PlaneOrder::KQuantHalf | PlaneOrder::Natural) | None => data,
            Some(PlaneOrder::Quads) => {
                let mut stored = Vec::with_capacity(data.len());
                for row in data.chunks_exact(cols / GROUP * format.block_bytes()) {
                    quads::interleave_row(format, row, &mut stored);
                }
                stored
            }
        };
        Self {
            format,
            rows,
            cols,
            data,
            order,
        }
    }

    /// Whether the rows are stored in quads.
    fn quads(&self) -> bool {
        self.order == Some(quads::PlaneOrder::Quads)
    }

    pub fn format(&self) -> BlockFormat {
        self.format
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.format.block_weights() * self.format.block_bytes()
    }

    /// Row `r` as stored (GGUF blocks or quads).
    fn row(&self, r: usize) -> &[u8] {
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
    }

    /// Rows `range` as GGUF blocks whatever the stored layout: the stored bytes,
    /// or the rows rebuilt from their quads in `scratch`.
    fn gguf_rows<'a>(
        &'a self,
        range: std::ops::Range<usize>,
        scratch: &'a mut Vec<u8>,
    ) -> std::slice::ChunksExact<'a, u8> {
        let n = self.row_bytes();
        let stored = &self.data[range.start * n..range.end * n];
        if !self.quads() {
            return stored.chunks_exact(n);
        }
        scratch.clear();
        for row in stored.chunks_exact(n) {
            quads::gguf_row(self.format, row, scratch);
        }
        scratch.chunks_exact(n)
    }

    /// The whole matrix as dense f32, row-major (rows, cols), expanded in parallel.
    /// Prompt processing uses it: with many activation rows a tuned f32 GEMM on
    /// freshly expanded weights beats any block-at-a-time kernel.
    pub fn to_dense(&self) -> Vec<f32> {
        let mut dense = vec![0f32; self.rows * self.cols];
        dense.par_chunks_mut(self.cols).enumerate().for_each_init(
            || (Vec::with_capacity(self.cols), Vec::new()),
            |(row, scratch), (r, out)| {
                row.clear();
                let bytes = self.gguf_rows(r..r + 1, scratch).next().expect("one row");
                dequantize_row(self.format, bytes, row);
                out.copy_from_slice(row);
            },
        );
        dense
    }

    /// Stacks matrices with the same format and width into one (their rows in
    /// order), so several projections of one input run as a single parallel pass.
    pub fn concat_rows(parts: &[&PackedMatrix]) -> Option<Self> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.format != first.format || p.cols != first.cols || p.order != first.order)
        {
            return None;
        }
        Some(Self {
            format: first.format,
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            data: parts.iter().flat_map(|p| p.data.iter().copied()).collect(),
            order: first.order,
        })
    }

    /// `out = x · Wᵀ` for `x` of shape (m, cols); `out` is (m, rows), row-major.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "activation shape mismatch");
        let groups_per_row = self.cols / GROUP;
        // Σx per group of each activation row: a format's offset multiplies it.
        let x16 = Activations16::new(x);
        let simd = simd_available();
        // Work is split by weight rows so each weight byte is read once per call.
        // Results are produced transposed (rows, m) so every task writes one
        // contiguous slice; m == 1 (decode) needs no transpose.
        let rows: Vec<Quantized16> = (0..m).map(|i| x16.row(i, self.cols)).collect();
        let sums: Vec<&[f32]> = x16.sums.chunks_exact(groups_per_row).collect();
        let planes = self
            .order
            .map(|order| quads::QuadActivations::new(&x16.values, &x16.scales, self.cols, order));
        let planes: Option<Vec<(&[u8], &[f32])>> = planes
            .as_ref()
            .map(|p| (0..m).map(|i| (p.row(i), p.sums16(i))).collect());
        let pool = HotPool::global();
        let rows_per_task = self.rows.div_ceil(pool.threads() * 4).max(16);
        let mut transposed = vec![0f32; self.rows * m];
        let shared = SharedOut::new(&mut transposed);
        pool.run(self.rows.div_ceil(rows_per_task), &|task| {
            let first_row = task * rows_per_task;
            let last_row = (first_row + rows_per_task).min(self.rows);
            // SAFETY: task t writes only the outputs of its own weight rows.
            let out = unsafe { shared.range(first_row * m, last_row * m) };
            if let Some(planes) = &planes {
                let n = self.row_bytes();
                let stored = StoredRows {
                    format: self.format,
                    bytes: &self.data[first_row * n..last_row * n],
                    row_bytes: n,
                };
                vnni_rows(&stored, &rows, &sums, planes, out);
            } else if simd {
                for (r, out_row) in out.chunks_exact_mut(m).enumerate() {
                    let row = self.row(first_row + r);
                    dot_rows(self.format, row, &rows, &sums, out_row);
                }
            } else {
                // No SIMD kernel: expand four weight rows to f32 once, then stream
                // every activation row past all four, so each activation load
                // feeds four dot products.
                let rows_here = out.len() / m;
                let mut dense: [Vec<f32>; 4] = Default::default();
                let mut scratch = Vec::new();
                for group_start in (0..rows_here).step_by(4) {
                    let group = (rows_here - group_start).min(4);
                    let first = first_row + group_start;
                    let gguf = self.gguf_rows(first..first + group, &mut scratch);
                    for (buffer, bytes) in dense.iter_mut().zip(gguf) {
                        buffer.clear();
                        dequantize_row(self.format, bytes, buffer);
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

    /// `out = x · Wᵀ` for a prompt chunk of `m` rows, on CPUs with AVX-512 VNNI
    /// (`None` elsewhere: the caller expands the weights to f32 instead). The
    /// weights are decoded to 16-bit integers once per call, 32 rows at a time
    /// into a panel that stays in cache while every activation row passes it.
    pub fn prompt_matmul(&self, x: &[f32], m: usize) -> Option<Vec<f32>> {
        #[cfg(target_arch = "x86_64")]
        {
            use std::cell::RefCell;
            use vnni::PANEL_ROWS;
            static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            if !*AVAILABLE.get_or_init(vnni::available) {
                return None;
            }
            assert_eq!(x.len(), m * self.cols, "activation shape mismatch");
            // Zero rows pad the activations to whole tiles; their outputs are dropped.
            let padded = m.next_multiple_of(vnni::TILE_ROWS);
            let x16 = Activations16::padded(x, padded * self.cols);
            let activations = vnni::Activations {
                values: &x16.values,
                scales: &x16.scales,
                sums: &x16.sums,
                cols: self.cols,
            };
            let panels = self.rows.div_ceil(PANEL_ROWS);
            let mut out = vec![0f32; m * self.rows];
            let shared = SharedOut::new(&mut out);
            thread_local! {
                static PANEL: RefCell<vnni::Panel> = RefCell::default();
                static GGUF_ROWS: RefCell<Vec<u8>> = RefCell::default();
            }
            HotPool::global().run(panels, &|p| {
                let first = p * PANEL_ROWS;
                let last = (first + PANEL_ROWS).min(self.rows);
                let out = vnni::Output {
                    // SAFETY: column `first` of row 0 is inside the buffer, which
                    // outlives the job.
                    at: unsafe { shared.ptr().add(first) },
                    stride: self.rows,
                    rows: m,
                    lanes: last - first,
                };
                // SAFETY: `vnni::available` was checked above; the panel is filled
                // with rows as wide as the activations, which are padded to whole
                // tiles, and task p alone writes columns first..last of the m
                // output rows.
                GGUF_ROWS.with_borrow_mut(|scratch| {
                    PANEL.with_borrow_mut(|panel| unsafe {
                        let rows = self.gguf_rows(first..last, scratch);
                        panel.fill(self.format, self.cols, rows);
                        vnni::panel_product(self.format, panel, &activations, &out);
                    })
                });
            });
            Some(out)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (x, m);
            None
        }
    }
}

fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(x86::available)
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the decode dot products run on AVX-512 ([`avx512`]): where the CPU has
/// it, unless `CLAW_NO_AVX512` is set (to compare the two on one machine).
#[cfg(target_arch = "x86_64")]
fn avx512_dots() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        avx512::available() && std::env::var_os("CLAW_NO_AVX512").is_none_or(|v| v.is_empty())
    })
}

/// Whether decode products run on the `vpdpbusd` kernels (rows of the nibble
/// formats stored in [`quads`]): where the CPU has AVX-512 VNNI and the
/// AVX-512 kernels are on, unless `CLAW_NO_VNNI_DECODE` is set (to compare the
/// two on one machine).
fn vnni_decode_enabled() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ENABLED.get_or_init(|| {
            simd_available()
                && avx512_dots()
                && avx512::quads_available()
                && std::env::var_os("CLAW_NO_VNNI_DECODE").is_none_or(|v| v.is_empty())
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// How many activation rows one pass over a weight row serves: the decoded
/// weights are reused from registers for each of them.
const ROWS_PER_PASS: usize = 4;

/// One weight row times each 16-bit activation row in `rows` into `out` (one
/// value per row), [`ROWS_PER_PASS`] rows per pass over the weights; only called
/// when [`simd_available`].
fn dot_rows(
    format: BlockFormat,
    row: &[u8],
    rows: &[Quantized16],
    xsums: &[&[f32]],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        fn pass<const R: usize>(
            format: BlockFormat,
            row: &[u8],
            xq: &[Quantized16],
            xsums: &[&[f32]],
            out: &mut [f32],
        ) {
            let xq: &[Quantized16; R] = xq.try_into().expect("R activation rows");
            let xsums: &[&[f32]; R] = xsums.try_into().expect("R activation sums");
            // SAFETY: callers check `simd_available` (the CPU has AVX2, FMA and
            // F16C), `avx512_dots` checked AVX-512 F and BW, and `row` holds the
            // whole blocks of one row of `format` as wide as every activation row
            // (all sliced by `PackedMatrix::matmul` from a checked matrix and
            // activations of its width).
            let sums = unsafe {
                match avx512_dots() {
                    true => avx512::dot::<R>(format, row, xq, xsums),
                    false => x86::dot::<R>(format, row, xq, xsums),
                }
            };
            out.copy_from_slice(&sums);
        }
        let chunks = rows
            .chunks(ROWS_PER_PASS)
            .zip(xsums.chunks(ROWS_PER_PASS))
            .zip(out.chunks_mut(ROWS_PER_PASS));
        for ((xq, sums), out) in chunks {
            match xq.len() {
                4 => pass::<4>(format, row, xq, sums, out),
                3 => pass::<3>(format, row, xq, sums, out),
                2 => pass::<2>(format, row, xq, sums, out),
                _ => pass::<1>(format, row, xq, sums, out),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (format, row, rows, xsums, out);
        unreachable!("no SIMD kernels on this architecture")
    }
}

/// Consecutive weight rows as stored, `row_bytes` each.
struct StoredRows<'a> {
    format: BlockFormat,
    bytes: &'a [u8],
    row_bytes: usize,
}

/// Weight rows times the 16-bit activation rows `xq` (and their byte
/// `planes`) into `out` ((weight rows, activation rows), row-major) by the
/// `vpdpbusd` kernels, [`ROWS_PER_PASS`] activation rows per pass over the
/// weights. The loop over weight rows runs inside one kernel call per pass: a
/// row of Qwen2.5-0.5B is only seven quads, and a call per row cost as much as
/// a fifth of the product. Only called for matrices with a
/// `PackedMatrix::order`, which needs [`vnni_decode_enabled`].
fn vnni_rows(
    stored: &StoredRows,
    xq: &[Quantized16],
    xsums: &[&[f32]],
    planes: &[(&[u8], &[f32])],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        fn pass<const R: usize>(
            stored: &StoredRows,
            xq: &[Quantized16],
            xsums: &[&[f32]],
            planes: &[(&[u8], &[f32])],
            out: &mut [f32],
            first: usize,
        ) {
            let xq: &[Quantized16; R] = xq.try_into().expect("R activation rows");
            let xsums: &[&[f32]; R] = xsums.try_into().expect("R activation sums");
            assert_eq!(planes.len(), R, "R activation planes");
            let sums16: [&[f32]; R] = std::array::from_fn(|r| planes[r].1);
            let planes: [&[u8]; R] = std::array::from_fn(|r| planes[r].0);
            // SAFETY: `vnni_decode_enabled` checked the CPU's AVX-512 VNNI (and
            // what the other kernels need); `stored` holds whole rows (in quads
            // for the nibble formats), as wide as every activation row, whose
            // planes were built from those activations in the order of the
            // format (all by `PackedMatrix::matmul`).
            unsafe { vnni_pass::<R>(stored, xq, xsums, &planes, &sums16, out, first) }
        }
        let passes = xq
            .chunks(ROWS_PER_PASS)
            .zip(xsums.chunks(ROWS_PER_PASS))
            .zip(planes.chunks(ROWS_PER_PASS))
            .enumerate();
        for (i, ((xq, sums), planes)) in passes {
            let first = i * ROWS_PER_PASS;
            match xq.len() {
                4 => pass::<4>(stored, xq, sums, planes, out, first),
                3 => pass::<3>(stored, xq, sums, planes, out, first),
                2 => pass::<2>(stored, xq, sums, planes, out, first),
                _ => pass::<1>(stored, xq, sums, planes, out, first),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (stored, xq, xsums, planes, out);
        unreachable!("no quads on this architecture")
    }
}

/// One pass of [`vnni_rows`]: activation rows `first..first + R`, every weight
/// row. Q4_K/Q5_K rows go to [`avx512::dot_k_quant`], Q6_K rows to
/// [`avx512::dot_q6_k_planes`]; a nibble format's quads
/// to [`avx512::dot_quads`], its tail of fewer than four groups (stored as GGUF
/// blocks) to [`avx512::dot`].
///
/// # Safety
/// As [`avx512::dot_quads`]; `stored` is whole rows in quads as wide as every
/// `xq[r]`, `planes` their quad planes, `out` one value per (weight row,
/// activation row) with `first + R` at most its activation rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn vnni_pass<const R: usize>(
    stored: &StoredRows,
    xq: &[Quantized16; R],
    xsums: &[&[f32]; R],
    planes: &[&[u8]; R],
    sums16: &[&[f32]; R],
    out: &mut [f32],
    first: usize,
) {
    let format = stored.format;
    let rows = stored.bytes.chunks_exact(stored.row_bytes);
    let m = out.len() / rows.len();
    let scales: [&[f32]; R] = std::array::from_fn(|r| xq[r].scales);
    match format {
        BlockFormat::Q4K | BlockFormat::Q5K => {
            for (row, out) in rows.zip(out.chunks_exact_mut(m)) {
                let sums = avx512::dot_k_quant::<R>(format, row, planes, &scales, xsums);
                out[first..first + R].copy_from_slice(&sums);
            }
            return;
        }
        BlockFormat::Q6K => {
            for (row, out) in rows.zip(out.chunks_exact_mut(m)) {
                let sums = avx512::dot_q6_k_planes::<R>(row, planes, &scales, sums16);
                out[first..first + R].copy_from_slice(&sums);
            }
            return;
        }
        _ => {}
    }
    let fields = quads::QuadFields::of(format).expect("a format with quads");
    let groups = quads::quad_groups(xq[0].values.len());
    let split = groups / quads::QUAD * fields.bytes;
    let scales: [&[f32]; R] = std::array::from_fn(|r| &xq[r].scales[..groups]);
    let head_sums: [&[f32]; R] = std::array::from_fn(|r| &xsums[r][..groups]);
    let xq_tail: [Quantized16; R] = std::array::from_fn(|r| Quantized16 {
        values: &xq[r].values[groups * GROUP..],
        scales: &xq[r].scales[groups..],
    });
    let tail_sums: [&[f32]; R] = std::array::from_fn(|r| &xsums[r][groups..]);
    for (row, out) in rows.zip(out.chunks_exact_mut(m)) {
        let (head, tail) = row.split_at(split);
        let mut sums = avx512::dot_quads::<R>(format, head, planes, &scales, &head_sums);
        if !tail.is_empty() {
            let tail = avx512::dot::<R>(format, tail, &xq_tail, &tail_sums);
            for (s, t) in sums.iter_mut().zip(tail) {
                *s += t;
            }
        }
        out[first..first + R].copy_from_slice(&sums);
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

/// Activation rows rounded to 16-bit integers with one f32 scale per 32-value
/// group: the relative rounding error is below 2^-15 (llama.cpp's 8-bit activations
/// are at 2^-7, which is what moves SmolLM2's logits), and it lets the SIMD kernel
/// multiply with `madd_epi16`, half the instructions of widening to f32.
struct Activations16 {
    values: Vec<i16>,
    scales: Vec<f32>,
    /// Σx per group (of the f32 values): a format's offset multiplies it.
    sums: Vec<f32>,
}

impl Activations16 {
    /// Activation row `i` of rows `cols` wide.
    fn row(&self, i: usize, cols: usize) -> Quantized16<'_> {
        Quantized16 {
            values: &self.values[i * cols..(i + 1) * cols],
            scales: &self.scales[i * cols / GROUP..(i + 1) * cols / GROUP],
        }
    }

    fn new(x: &[f32]) -> Self {
        Self::padded(x, x.len())
    }

    /// The rows of `x` followed by zero rows up to `len` values in all.
    fn padded(x: &[f32], len: usize) -> Self {
        let mut values = vec![0i16; len];
        let mut scales = vec![0f32; len / GROUP];
        let mut sums = vec![0f32; len / GROUP];
        let groups = x
            .chunks_exact(GROUP)
            .zip(values.chunks_exact_mut(GROUP))
            .zip(scales.iter_mut().zip(sums.iter_mut()));
        let simd = simd_available();
        for ((block, out), (scale, sum)) in groups {
            let block: &[f32; GROUP] = block.try_into().expect("whole groups");
            let out: &mut [i16; GROUP] = out.try_into().expect("whole groups");
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: `simd_available` checked the CPU's AVX2, FMA and F16C.
                (*scale, *sum) = unsafe { x86::quantize_group(block, out) };
                continue;
            }
            let _ = simd;
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            *sum = block.iter().sum();
            *scale = max / f32::from(i16::MAX);
            let inv = if *scale > 0.0 { 1.0 / *scale } else { 0.0 };
            for (q, v) in out.iter_mut().zip(block) {
                *q = (v * inv).round() as i16;
            }
        }
        Self {
            values,
            scales,
            sums,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// Deterministic, roughly unit-scale values, so the tests cannot flake.
    fn fixed_values(rows: usize, cols: usize, seed: u32) -> Tensor {
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| ((i as f32 * 12.9898 + seed as f32 * 78.233).sin() * 43758.547).fract() * 3.0)
            .collect();
        Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap()
    }

    /// A (rows, cols) matrix quantized by candle to `format`, with candle's own
    /// dequantization of the same blocks.
    /// The matrix is stored as `PackedMatrix::new` chooses for this CPU.
    fn quantized(format: BlockFormat, rows: usize, cols: usize) -> (PackedMatrix, Tensor) {
        let q = QTensor::quantize(&fixed_values(rows, cols, 1), format.ggml()).unwrap();
        let dense = q.dequantize(&Device::Cpu).unwrap();
        let packed = PackedMatrix::new(format, rows, cols, q.data().unwrap().into_owned()).unwrap();
        (packed, dense)
    }

    /// [`quantized`] stored as GGUF blocks (for the tests that read rows raw).
    fn gguf_layout(format: BlockFormat, rows: usize, cols: usize) -> PackedMatrix {
        let (packed, _) = quantized(format, rows, cols);
        let mut scratch = Vec::new();
        let data = packed
            .gguf_rows(0..rows, &mut scratch)
            .flatten()
            .copied()
            .collect();
        PackedMatrix::with_kernel(format, rows, cols, data, false)
    }

    #[test]
    fn dequantization_matches_candle_for_every_format() {
        for format in BlockFormat::ALL {
            let (packed, dense) = quantized(format, 5, 512);
            let expected: Vec<f32> = dense.flatten_all().unwrap().to_vec1().unwrap();
            let got = packed.to_dense();
            let worst = expected
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-6, "{format:?}: max |difference| {worst}");
        }
    }

    /// The largest |difference| between `product(x, m)` and the f32 product with
    /// the same blocks dequantized, and the largest |y|, for a (70, 512) matrix
    /// (70 rows: the last 4-row pass and the last 32-row panel are partial).
    /// `None` when `product` is not available on this CPU.
    fn gap_to_dequantized(
        format: BlockFormat,
        m: usize,
        product: impl Fn(&PackedMatrix, &[f32], usize) -> Option<Vec<f32>>,
    ) -> Option<(f32, f32)> {
        let (packed, dense) = quantized(format, 70, 512);
        let x = fixed_values(m, 512, 2);
        let expected: Vec<f32> = x
            .matmul(&dense.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got = product(&packed, &x.flatten_all().unwrap().to_vec1().unwrap(), m)?;
        let worst = expected
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        Some((worst, expected.iter().fold(0f32, |m, v| m.max(v.abs()))))
    }

    #[test]
    fn matmul_matches_the_dequantized_matmul_for_every_format() {
        for format in BlockFormat::ALL {
            for m in [1, 3, 9, 4] {
                let (worst, scale) =
                    gap_to_dequantized(format, m, |p, x, m| Some(p.matmul(x, m))).unwrap();
                // 16-bit activations with SIMD; exact f32 rows without.
                let tolerance = if simd_available() { 1e-4 } else { 1e-5 } * scale;
                assert!(
                    worst < tolerance,
                    "{format:?} m={m}: max |difference| {worst} (max |y| {scale})"
                );
            }
        }
    }

    #[test]
    fn simd_dot_matches_the_exact_dot_for_every_format() {
        if !simd_available() {
            eprintln!("SKIP simd_dot_matches_the_exact_dot_for_every_format: no AVX2/FMA/F16C");
            return;
        }
        for format in BlockFormat::ALL {
            let cols = 1024;
            let (_, dense) = quantized(format, 1, cols);
            let packed = gguf_layout(format, 1, cols);
            let w: Vec<f32> = dense.flatten_all().unwrap().to_vec1().unwrap();
            // Activations of very different sizes per group, as in a real layer.
            let x: Vec<f32> = (0..cols)
                .map(|i| (i as f32 * 0.37).sin() * (1.0 + (i / 32) as f32).powi(2))
                .collect();
            let xsums: Vec<f32> = x.chunks_exact(GROUP).map(|c| c.iter().sum()).collect();
            let x16 = Activations16::new(&x);
            let mut simd = [0f32];
            dot_rows(
                format,
                packed.row(0),
                &[x16.row(0, cols)],
                &[&xsums],
                &mut simd,
            );
            let simd = simd[0];
            let exact: f64 = w.iter().zip(&x).map(|(w, x)| f64::from(w * x)).sum();
            // 16-bit rounding errors scale with the sum of |w·x| terms, not the result.
            let magnitude: f32 = w.iter().zip(&x).map(|(w, x)| (w * x).abs()).sum();
            assert!(
                (f64::from(simd) - exact).abs() < 1e-4 * f64::from(magnitude),
                "{format:?}: simd {simd} vs exact {exact} (Σ|w·x| {magnitude})"
            );
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_or_among_others() {
        // Batched decoding relies on it: a request's log-probs must not depend on
        // which other requests share its forward pass.
        for format in BlockFormat::ALL {
            let (packed, _) = quantized(format, 37, 512);
            let x: Vec<f32> = fixed_values(9, 512, 3)
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let alone: Vec<Vec<f32>> = x.chunks(512).map(|xi| packed.matmul(xi, 1)).collect();
            for m in 2..=9 {
                let together = packed.matmul(&x[..m * 512], m);
                for (i, row) in together.chunks(37).enumerate() {
                    assert_eq!(row, alone[i].as_slice(), "{format:?}: row {i} of {m}");
                }
            }
        }
    }

    /// The `vpdpbusd` decode kernels (nibble formats in quads, k-quants as
    /// stored) against the `vpmaddwd` ones on the same blocks, on CPUs that
    /// have them: the same dense weights and prompt products bit for bit,
    /// decode products equal but for the order of f32 additions, and a row's
    /// bits the same alone or among others. 192 columns: one quad and a
    /// two-group tail; 512: four quads or two super-blocks.
    #[test]
    fn vnni_decode_multiplies_like_the_madd_kernels() {
        if !vnni_decode_enabled() {
            eprintln!(
                "SKIP vnni_decode_multiplies_like_the_madd_kernels: no AVX-512 VNNI (or CLAW_NO_VNNI_DECODE)"
            );
            return;
        }
        let cases = [
            (BlockFormat::Q4_0, 192),
            (BlockFormat::Q4_1, 192),
            (BlockFormat::Q5_0, 192),
            (BlockFormat::Q5_1, 192),
            (BlockFormat::Q4_0, 512),
            (BlockFormat::Q4_1, 512),
            (BlockFormat::Q5_0, 512),
            (BlockFormat::Q5_1, 512),
            (BlockFormat::Q4K, 512),
            (BlockFormat::Q5K, 512),
            (BlockFormat::Q6K, 512),
        ];
        for (format, cols) in cases {
            let (vnni, _) = quantized(format, 37, cols);
            assert!(vnni.order.is_some(), "{format:?} has a vnni kernel");
            let gguf = gguf_layout(format, 37, cols);
            if vnni.quads() {
                assert_ne!(vnni.data, gguf.data, "{format:?}: rearranged");
            }
            assert_eq!(vnni.to_dense(), gguf.to_dense(), "{format:?} {cols}");
            let x: Vec<f32> = fixed_values(9, cols, 5)
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            if let (Some(a), Some(b)) = (vnni.prompt_matmul(&x, 9), gguf.prompt_matmul(&x, 9)) {
                assert_eq!(a, b, "{format:?} {cols}: prompt product");
            }
            let alone: Vec<Vec<f32>> = x.chunks(cols).map(|xi| vnni.matmul(xi, 1)).collect();
            for m in 1..=9 {
                let (a, b) = (
                    vnni.matmul(&x[..m * cols], m),
                    gguf.matmul(&x[..m * cols], m),
                );
                let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
                for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * scale,
                        "{format:?} {cols} m={m} output {i}: {a} vs {b}"
                    );
                }
                for (i, row) in a.chunks(37).enumerate() {
                    assert_eq!(row, alone[i].as_slice(), "{format:?}: row {i} of {m}");
                }
            }
        }
    }

    #[test]
    fn integer_rows_are_the_dequantized_rows() {
        for format in BlockFormat::ALL {
            let (_, dense) = quantized(format, 3, 512);
            let packed = gguf_layout(format, 3, 512);
            let expected: Vec<f32> = dense.flatten_all().unwrap().to_vec1().unwrap();
            let (mut q, mut scales, mut offsets) =
                (vec![0i16; 512], vec![0f32; 32], vec![0f32; 16]);
            for r in 0..3 {
                formats::integer_row(format, packed.row(r), &mut q, &mut scales, &mut offsets);
                for j in 0..512 {
                    let w = scales[j / 16] * f32::from(q[j]) + offsets[j / 32];
                    let want = expected[r * 512 + j];
                    assert!(
                        (w - want).abs() <= 1e-6 * want.abs().max(1.0),
                        "{format:?} row {r} weight {j}: {w} vs {want}"
                    );
                }
                if !format.has_offsets() {
                    assert!(offsets.iter().all(|&o| o == 0.0), "{format:?}");
                }
                if !format.has_half_scales() {
                    assert!(scales.chunks(2).all(|s| s[0] == s[1]), "{format:?}");
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_dots_agree_with_the_avx2_ones() {
        if !avx512::available() {
            eprintln!("SKIP avx512_dots_agree_with_the_avx2_ones: no AVX-512 F/BW");
            return;
        }
        for format in BlockFormat::ALL {
            let packed = gguf_layout(format, 5, 1024);
            let x: Vec<f32> = fixed_values(4, 1024, 11)
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let x16 = Activations16::new(&x);
            let rows: Vec<Quantized16> = (0..4).map(|i| x16.row(i, 1024)).collect();
            let rows: &[Quantized16; 4] = rows.as_slice().try_into().unwrap();
            let sums: Vec<&[f32]> = x16.sums.chunks_exact(1024 / GROUP).collect();
            let sums: &[&[f32]; 4] = sums.as_slice().try_into().unwrap();
            for r in 0..5 {
                let row = packed.row(r);
                // SAFETY: both kernels' features were checked; the row and the
                // activations are 1024 wide.
                let (wide, narrow) = unsafe {
                    (
                        avx512::dot::<4>(format, row, rows, sums),
                        x86::dot::<4>(format, row, rows, sums),
                    )
                };
                for (a, b) in wide.iter().zip(&narrow) {
                    // Only the order of the f32 additions differs.
                    assert!(
                        (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                        "{format:?} row {r}: {wide:?} vs {narrow:?}"
                    );
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_integer_rows_equal_the_scalar_ones() {
        if !simd_available() {
            eprintln!("SKIP simd_integer_rows_equal_the_scalar_ones: no AVX2/FMA/F16C");
            return;
        }
        for format in BlockFormat::ALL {
            let packed = gguf_layout(format, 2, 512);
            let scalar = |r| {
                let (mut q, mut s, mut o) = (vec![0i16; 512], vec![0f32; 32], vec![0f32; 16]);
                formats::integer_row(format, packed.row(r), &mut q, &mut s, &mut o);
                (q, s, o)
            };
            for r in 0..2 {
                let (mut q, mut s, mut o) = (vec![0i16; 512], vec![0f32; 32], vec![0f32; 16]);
                // SAFETY: checked above; the buffers fit a 512-weight row.
                let done =
                    unsafe { x86::integer_row(format, packed.row(r), &mut q, &mut s, &mut o) };
                assert_eq!(done, format.block_weights() == GROUP, "{format:?}");
                if done {
                    assert_eq!((q, s, o), scalar(r), "{format:?} row {r}");
                }
            }
        }
    }

    #[test]
    fn prompt_matmul_matches_the_dequantized_matmul_for_every_format() {
        for format in BlockFormat::ALL {
            for m in [1, 6, 37] {
                let Some((worst, scale)) =
                    gap_to_dequantized(format, m, |p, x, m| p.prompt_matmul(x, m))
                else {
                    eprintln!("SKIP prompt_matmul_matches_the_dequantized_matmul_for_every_format: no AVX-512 VNNI");
                    return;
                };
                assert!(
                    worst < 1e-4 * scale,
                    "{format:?} m={m}: max |difference| {worst} (max |y| {scale})"
                );
            }
        }
    }

    #[test]
    fn a_prompt_row_gets_the_same_bits_alone_or_among_others() {
        for format in BlockFormat::ALL {
            let (packed, _) = quantized(format, 40, 256);
            let x: Vec<f32> = fixed_values(9, 256, 3)
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let Some(together) = packed.prompt_matmul(&x, 9) else {
                eprintln!(
                    "SKIP a_prompt_row_gets_the_same_bits_alone_or_among_others: no AVX-512 VNNI"
                );
                return;
            };
            for (i, row) in together.chunks(40).enumerate() {
                let alone = packed.prompt_matmul(&x[i * 256..(i + 1) * 256], 1).unwrap();
                assert_eq!(row, alone.as_slice(), "{format:?}: row {i}");
            }
        }
    }

    #[test]
    fn fused_rows_multiply_like_their_parts() {
        let (a, _) = quantized(BlockFormat::Q6K, 8, 256);
        let (b, _) = quantized(BlockFormat::Q6K, 3, 256);
        let fused = PackedMatrix::concat_rows(&[&a, &b]).unwrap();
        let x: Vec<f32> = fixed_values(1, 256, 5)
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut parts = a.matmul(&x, 1);
        parts.extend(b.matmul(&x, 1));
        assert_eq!(fused.matmul(&x, 1), parts);
        let (other, _) = quantized(BlockFormat::Q8_0, 3, 256);
        assert!(
            PackedMatrix::concat_rows(&[&a, &other]).is_none(),
            "formats differ"
        );
    }

    #[test]
    fn rejects_wrong_sizes() {
        assert!(PackedMatrix::new(BlockFormat::Q4_1, 2, 48, vec![0; 40]).is_err());
        assert!(PackedMatrix::new(BlockFormat::Q8_0, 2, 32, vec![0; 10]).is_err());
        let err = PackedMatrix::new(BlockFormat::Q4K, 2, 896, vec![0; 10]).unwrap_err();
        assert!(err.to_string().contains("256-weight blocks"), "{err}");
    }
}
