//! Prompt-sized products (many activation rows) on AVX-512 VNNI.
//!
//! Why: reading a prompt is a GEMM, and f32 GEMM (the `gemm` crate, AVX2 on stable
//! Rust) peaks at 16 multiply-adds a cycle a core here, while `vpdpwssd` does 32
//! 16-bit multiply-adds an instruction at two a cycle: measured 171 vs 38 GMAC/s
//! on one core of this project's machines. Weights and activations stay the
//! integers they already are: a weight panel holds 32 weight rows decoded from
//! their GGUF blocks to i16 ([`super::formats::integer_row`]), the activations are
//! the decode path's 16-bit rows ([`super::quantized16::Quantized16`]), so the result agrees
//! with the f32 product as closely as decoding does (about 1e-4).
//!
//! Per 32-weight group (16 for Q6_K's half-scales) a 32-weight-row × `MR`-activation
//! tile sums exact integer products, then scales them once in f32 by the weight's
//! and the activation's scales and adds the format's offset times the group's Σx.
//! Each output's f32 operations are the same whatever the tile's row count, so a
//! row's result does not depend on the rows it is multiplied with.
//!
//! Every function here requires AVX-512 F, BW and VNNI (checked by [`available`]).

use std::arch::x86_64::*;

use super::formats::{integer_row, BlockFormat, GROUP};

/// Weight rows per panel: two 16-lane vectors.
pub const PANEL_ROWS: usize = 32;

/// Activation rows per tile: 4 rows × 2 vectors of integer sums and as many f32
/// sums stay in registers with the weights and scales. Callers pad the rows to
/// a multiple of it.
pub const TILE_ROWS: usize = 6;

/// Columns of the panel multiplied at a time: 256 × 32 rows × 2 bytes = 16 KiB.
const KC: usize = 256;

/// Whether this CPU can run the kernels of this module.
pub fn available() -> bool {
    super::x86::available()
        && std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512vnni")
}

/// Up to [`PANEL_ROWS`] weight rows decoded for the kernel. Rows past the
/// matrix's last are zero.
#[derive(Default)]
pub struct Panel {
    /// Weights 2p and 2p + 1 of row r as the two i16 halves (low first) of
    /// `[p * 32 + r]`: one i32 lane per row, as `vpdpwssd` reads them.
    weights: Vec<u32>,
    /// Scale of 16-weight half h of row r at `[h * 32 + r]`.
    scales: Vec<f32>,
    /// Offset of group g of row r at `[g * 32 + r]`.
    offsets: Vec<f32>,
    /// The rows' integers, row-major, before they are interleaved.
    rows_q: Vec<i16>,
    row_scales: Vec<f32>,
    row_offsets: Vec<f32>,
}

impl Panel {
    /// Decodes `rows` (each `cols` weights of `format`, at most [`PANEL_ROWS`]).
    ///
    /// # Safety
    /// The CPU must support this module's kernels ([`available`]).
    pub unsafe fn fill<'a>(
        &mut self,
        format: BlockFormat,
        cols: usize,
        rows: impl ExactSizeIterator<Item = &'a [u8]>,
    ) {
        assert!(rows.len() <= PANEL_ROWS, "a panel holds {PANEL_ROWS} rows");
        let (pairs, halves, groups) = (cols / 2, cols / 16, cols / GROUP);
        self.weights.resize(pairs * PANEL_ROWS, 0);
        self.scales.resize(halves * PANEL_ROWS, 0.0);
        self.offsets.resize(groups * PANEL_ROWS, 0.0);
        self.rows_q.resize(cols * PANEL_ROWS, 0);
        self.row_scales.resize(halves, 0.0);
        self.row_offsets.resize(groups, 0.0);
        let filled = rows.len();
        for (r, row) in rows.enumerate() {
            let q = &mut self.rows_q[r * cols..(r + 1) * cols];
            let (scales, offsets) = (&mut self.row_scales, &mut self.row_offsets);
            // SAFETY: `available` includes the AVX2 kernels' features; the
            // buffers are sized for `cols` weights above.
            if !super::x86::integer_row(format, row, q, scales, offsets) {
                integer_row(format, row, q, scales, offsets);
            }
            for (h, &s) in self.row_scales.iter().enumerate() {
                self.scales[h * PANEL_ROWS + r] = s;
            }
            for (g, &o) in self.row_offsets.iter().enumerate() {
                self.offsets[g * PANEL_ROWS + r] = o;
            }
        }
        // Rows past the matrix's end multiply as zeros.
        self.rows_q[filled * cols..].fill(0);
        for r in filled..PANEL_ROWS {
            for h in 0..halves {
                self.scales[h * PANEL_ROWS + r] = 0.0;
            }
            for g in 0..groups {
                self.offsets[g * PANEL_ROWS + r] = 0.0;
            }
        }
        // SAFETY: `rows_q` holds 32 rows of `cols` values and `weights` 32 lanes
        // per pair; the caller checked the CPU (see `fill`'s contract).
        unsafe { interleave(&self.rows_q, cols, &mut self.weights) };
    }
}

/// The pairs of 32 row-major rows to one line of 32 lanes per pair: two
/// 16-row gathers per pair.
#[target_feature(enable = "avx512f")]
unsafe fn interleave(rows_q: &[i16], cols: usize, weights: &mut [u32]) {
    assert!(rows_q.len() == cols * PANEL_ROWS && weights.len() == cols / 2 * PANEL_ROWS);
    let pairs = cols / 2;
    let lanes: [i32; 16] = std::array::from_fn(|r| (r * pairs) as i32);
    let index = _mm512_loadu_si512(lanes.as_ptr() as *const __m512i);
    let source = rows_q.as_ptr() as *const i32;
    let second_half = source.add(16 * pairs);
    for p in 0..pairs {
        let dst = weights.as_mut_ptr().add(p * PANEL_ROWS);
        let low = _mm512_i32gather_epi32::<4>(index, source.add(p));
        let high = _mm512_i32gather_epi32::<4>(index, second_half.add(p));
        _mm512_storeu_si512(dst as *mut __m512i, low);
        _mm512_storeu_si512(dst.add(16) as *mut __m512i, high);
    }
}

/// Activation rows as the kernel reads them: 16-bit values (row-major, `cols`
/// wide), one scale and one f32 Σx per 32-value group.
pub struct Activations<'a> {
    pub values: &'a [i16],
    pub scales: &'a [f32],
    pub sums: &'a [f32],
    pub cols: usize,
}

/// Where a panel's products go: `lanes` (1..=32) consecutive columns of `rows`
/// output rows `stride` values apart, starting at `at`.
pub struct Output {
    pub at: *mut f32,
    pub stride: usize,
    pub rows: usize,
    pub lanes: usize,
}

/// `out[i][l]` = activation row i · panel row l, for every activation row.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI ([`available`]); `panel` must have
/// been filled with `x.cols` columns of `format`, the activations must have a
/// multiple of [`TILE_ROWS`] rows, at least `out.rows`, and `out` must address
/// `out.rows` rows of `out.lanes` writable values no other thread touches.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn panel_product(format: BlockFormat, panel: &Panel, x: &Activations, out: &Output) {
    let m = x.values.len() / x.cols;
    assert!(
        m.is_multiple_of(TILE_ROWS) && out.rows <= m,
        "{m} activation rows"
    );
    assert!((1..=PANEL_ROWS).contains(&out.lanes));
    assert_eq!(panel.weights.len(), x.cols / 2 * PANEL_ROWS);
    let mask = if out.lanes == 32 {
        u32::MAX
    } else {
        (1u32 << out.lanes) - 1
    };
    let masks = [mask as u16, (mask >> 16) as u16];
    // The panel is read in slices of KC columns (16 KiB of weights, which stay in
    // L1 while every activation tile passes them); each output's f32 sums go
    // through `out` between slices, in the same order as without slicing.
    let groups = x.cols / GROUP;
    for start in (0..groups).step_by(KC / GROUP) {
        let range = start..(start + KC / GROUP).min(groups);
        for first in (0..out.rows).step_by(TILE_ROWS) {
            let tile_out = TileOut {
                at: out.at.add(first * out.stride),
                stride: out.stride,
                rows: (out.rows - first).min(TILE_ROWS),
                masks,
            };
            let g = range.clone();
            match (format.has_half_scales(), format.has_offsets()) {
                (false, false) => tile::<32, false>(panel, x, first, g, &tile_out),
                (false, true) => tile::<32, true>(panel, x, first, g, &tile_out),
                (true, _) => tile::<16, false>(panel, x, first, g, &tile_out),
            }
        }
    }
}

/// `acc` plus the sums of the products of `a`'s and `b`'s i16 pairs: one
/// `vpdpwssd`, written out because LLVM's generic tuning splits the intrinsic
/// into `vpmaddwd` + `vpaddd` (10 of the tile loop's 12), twice the instructions.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn dpwssd(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
    let mut acc = acc;
    std::arch::asm!(
        "vpdpwssd {acc}, {a}, {b}",
        acc = inout(zmm_reg) acc,
        a = in(zmm_reg) a,
        b = in(zmm_reg) b,
        options(pure, nomem, nostack, preserves_flags),
    );
    acc
}

/// One tile's output rows, with the lanes of its two vectors that are kept.
struct TileOut {
    at: *mut f32,
    stride: usize,
    rows: usize,
    masks: [u16; 2],
}

/// Runs `$body` once for each of the tile's rows with `$i` a constant, so every
/// array index below is known at compile time and the arrays live in registers.
macro_rules! each_row {
    ($i:ident => $body:block) => {{
        {
            const $i: usize = 0;
            $body
        }
        {
            const $i: usize = 1;
            $body
        }
        {
            const $i: usize = 2;
            $body
        }
        {
            const $i: usize = 3;
            $body
        }
        {
            const $i: usize = 4;
            $body
        }
        {
            const $i: usize = 5;
            $body
        }
    }};
}

/// [`TILE_ROWS`] activation rows from `first` times the panel's 32 rows over
/// `groups`, added to `out` (set when the range starts at group 0); `SUB` weights
/// share a weight scale (32, or 16 for Q6_K); `OFFSETS`: the format has mins.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn tile<const SUB: usize, const OFFSETS: bool>(
    panel: &Panel,
    x: &Activations,
    first: usize,
    groups: std::ops::Range<usize>,
    out: &TileOut,
) {
    let cols = x.cols;
    let per_row = cols / GROUP;
    let w = panel.weights.as_ptr();
    let base = x.values.as_ptr().add(first * cols);
    let rows: [*const i16; TILE_ROWS] = std::array::from_fn(|i| base.add(i * cols));
    // sums[2i + j]: activation row i, weight rows 16j..16j + 16.
    let mut sums = [_mm512_setzero_ps(); 2 * TILE_ROWS];
    if groups.start > 0 {
        for i in 0..out.rows {
            for j in 0..2 {
                let at = out.at.add(i * out.stride + 16 * j);
                sums[2 * i + j] = _mm512_maskz_loadu_ps(out.masks[j], at);
            }
        }
    }
    for g in groups {
        for sub in 0..GROUP / SUB {
            let start = g * GROUP + sub * SUB;
            let mut ints = [_mm512_setzero_si512(); 2 * TILE_ROWS];
            let mut weights = w.add(start / 2 * PANEL_ROWS);
            let mut at = start;
            for _ in 0..SUB / 2 {
                let w0 = _mm512_loadu_si512(weights as *const __m512i);
                let w1 = _mm512_loadu_si512(weights.add(16) as *const __m512i);
                each_row!(I => {
                    let pair =
                        _mm512_set1_epi32(std::ptr::read_unaligned(rows[I].add(at) as *const i32));
                    ints[2 * I] = dpwssd(ints[2 * I], w0, pair);
                    ints[2 * I + 1] = dpwssd(ints[2 * I + 1], w1, pair);
                });
                weights = weights.add(PANEL_ROWS);
                at += 2;
            }
            // Scales are stored per 16-weight half; a 32-weight SUB uses the first.
            let s = panel.scales.as_ptr().add(start / 16 * PANEL_ROWS);
            let scale = [_mm512_loadu_ps(s), _mm512_loadu_ps(s.add(16))];
            each_row!(I => {
                let dx = _mm512_set1_ps(*x.scales.get_unchecked((first + I) * per_row + g));
                for j in 0..2 {
                    sums[2 * I + j] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(ints[2 * I + j]),
                        _mm512_mul_ps(scale[j], dx),
                        sums[2 * I + j],
                    );
                }
            });
        }
        if OFFSETS {
            let p = panel.offsets.as_ptr().add(g * PANEL_ROWS);
            let offset = [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))];
            each_row!(I => {
                let sx = _mm512_set1_ps(*x.sums.get_unchecked((first + I) * per_row + g));
                for j in 0..2 {
                    sums[2 * I + j] = _mm512_fmadd_ps(offset[j], sx, sums[2 * I + j]);
                }
            });
        }
    }
    for i in 0..out.rows {
        for j in 0..2 {
            let at = out.at.add(i * out.stride + 16 * j);
            _mm512_mask_storeu_ps(at, out.masks[j], sums[2 * i + j]);
        }
    }
}
