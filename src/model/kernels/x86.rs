//! AVX2 dot products of one GGUF weight row with `R` activation rows held as
//! 16-bit integers ([`super::quantized16::Quantized16`]). Each weight group is decoded once
//! and multiplied into every activation row (a batch of decode steps, a short
//! prompt chunk); each row's sums run in the same order whatever `R` is, so a
//! row's result is bit for bit the one it gets alone. Per 32-weight group the integer
//! products are summed by `madd_epi16` and scaled once, in f32, by the weight's
//! and the activation's scales; a format's offset (its min, or −8d for Q4_0)
//! multiplies the group's Σx. The weights are read as stored in the file, so
//! decode streams exactly the GGUF's bytes.
//!
//! Every function here requires AVX2, FMA and F16C (checked by the caller) and a
//! row of whole blocks matching `xq` (checked when the matrix is built).

use std::arch::x86_64::*;

use super::formats::{scale_min_k4, BlockFormat, GROUP};
use super::quantized16::Quantized16;

/// Whether this CPU can run the kernels of this module.
pub fn available() -> bool {
    std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
}

/// Σ w·x of one weight row with each of `R` activation rows. `xsums[r]` is Σx
/// per 32-weight group of row r.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C ([`available`]); `row` must hold
/// `xq[r].scales.len() * 32` weights of `format` for every r (all rows as wide)
/// and each `xsums[r]` one entry per group.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot<const R: usize>(
    format: BlockFormat,
    row: &[u8],
    xq: &[Quantized16; R],
    xsums: &[&[f32]; R],
) -> [f32; R] {
    for r in 0..R {
        debug_assert_eq!(
            row.len(),
            xq[r].scales.len() * GROUP / format.block_weights() * format.block_bytes()
        );
        debug_assert_eq!(xsums[r].len(), xq[r].scales.len());
    }
    match format {
        BlockFormat::Q4_0 => dot_q4_0(row, xq, xsums),
        BlockFormat::Q4_1 => dot_q4_1(row, xq, xsums),
        BlockFormat::Q5_0 => dot_q5_0(row, xq, xsums),
        BlockFormat::Q5_1 => dot_q5_1(row, xq, xsums),
        BlockFormat::Q8_0 => dot_q8_0(row, xq, xsums),
        BlockFormat::Q4K => dot_q45_k(row, xq, xsums, false),
        BlockFormat::Q5K => dot_q45_k(row, xq, xsums, true),
        BlockFormat::Q6K => dot_q6_k(row, xq),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn hsums<const R: usize>(acc: &[__m256; R], offsets: &[f32; R]) -> [f32; R] {
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum(acc[r]) + offsets[r];
    }
    out
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn f16_at(p: *const u8) -> f32 {
    // Written out because the intrinsics (`_mm_cvtsi32_si128` of the bits, or a
    // broadcast) compile to a `vpinsrw` merging into whichever register LLVM
    // likes, here the running offset sum: that chained every group of a dot
    // product to the one before it, 14 cycles a Q5_0 group instead of ~5
    // (examples/bench_decode). `vmovd` from a general register zeroes the rest.
    let x: __m128;
    std::arch::asm!(
        "movzx {bits:e}, word ptr [{p}]",
        "vmovd {x}, {bits:e}",
        "vcvtph2ps {x}, {x}",
        p = in(reg) p,
        bits = out(reg) _,
        x = out(xmm_reg) x,
        options(pure, readonly, nostack, preserves_flags),
    );
    _mm_cvtss_f32(x)
}

/// The integer products of 32 weights (as two vectors of 16 i16) with the 32
/// activations at `x`, as 8 i32 partial sums.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn madd32(lo: __m256i, hi: __m256i, x: *const i16) -> __m256i {
    let x_lo = _mm256_loadu_si256(x as *const __m256i);
    let x_hi = _mm256_loadu_si256(x.add(16) as *const __m256i);
    _mm256_add_epi32(_mm256_madd_epi16(lo, x_lo), _mm256_madd_epi16(hi, x_hi))
}

/// 16 bytes of nibbles as weights 0..16 (low nibbles) and 16..32 (high nibbles).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn nibbles16(p: *const u8) -> (__m256i, __m256i) {
    let bytes = _mm_loadu_si128(p as *const __m128i);
    let mask = _mm_set1_epi8(0x0F);
    (
        _mm256_cvtepu8_epi16(_mm_and_si128(bytes, mask)),
        _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask)),
    )
}

/// 16 bytes of nibbles as the 32 weights' bytes, in order: the low nibbles
/// (weights 0..16), then the high ones.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn nibble_bytes(p: *const u8) -> __m256i {
    let bytes = _mm_loadu_si128(p as *const __m128i);
    let mask = _mm_set1_epi8(0x0F);
    _mm256_set_m128i(
        _mm_and_si128(_mm_srli_epi16(bytes, 4), mask),
        _mm_and_si128(bytes, mask),
    )
}

/// A 32-weight group of 5-bit weights as two vectors of 16 i16 ([`five_bit_bytes`]).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn five_bit_group(nibbles: *const u8, fifth: *const u8) -> (__m256i, __m256i) {
    widen_u8(five_bit_bytes(nibbles, fifth))
}

/// A 32-weight group of 5-bit weights as 32 bytes: 16 bytes of nibbles (byte j:
/// weight j low, weight j + 16 high) and 32 fifth bits (bit j: weight j),
/// expanded in the byte domain as llama.cpp's `bytes_from_bits_32`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn five_bit_bytes(nibbles: *const u8, fifth: *const u8) -> __m256i {
    let packed = _mm_loadu_si128(nibbles as *const __m128i);
    let low_high = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
    let q = _mm256_and_si256(low_high, _mm256_set1_epi8(0x0F));
    // Byte j gets byte j/8 of the bits, then all of its bits but bit j%8 are set.
    let bits = std::ptr::read_unaligned(fifth as *const u32);
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0,
        ),
    );
    let others = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
    let set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1));
    _mm256_or_si256(q, _mm256_and_si256(set, _mm256_set1_epi8(16)))
}

/// Widens 32 bytes to two vectors of 16 i16 (weights 0..16 and 16..32).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn widen_u8(v: __m256i) -> (__m256i, __m256i) {
    (
        _mm256_cvtepu8_epi16(_mm256_castsi256_si128(v)),
        _mm256_cvtepu8_epi16(_mm256_extracti128_si256(v, 1)),
    )
}

/// The loop shared by the 32-weight formats: `$decode` turns the block at `$b`
/// into (low weights, high weights, scale, offset), once for all `R` rows.
macro_rules! dot_groups {
    ($row:expr, $xq:expr, $xsums:expr, $bytes:expr, |$b:ident| $decode:expr) => {{
        let (row, xq, xsums): (&[u8], &[Quantized16; R], &[&[f32]; R]) = ($row, $xq, $xsums);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut offsets = [0f32; R];
        for g in 0..row.len() / $bytes {
            let $b = row.as_ptr().add(g * $bytes);
            let (lo, hi, d, offset): (__m256i, __m256i, f32, f32) = $decode;
            for r in 0..R {
                let sums = madd32(lo, hi, xq[r].values.as_ptr().add(g * GROUP));
                let scale = d * xq[r].scales.get_unchecked(g);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(scale), acc[r]);
                offsets[r] += offset * xsums[r].get_unchecked(g);
            }
        }
        hsums(&acc, &offsets)
    }};
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_0<const R: usize>(
    row: &[u8],
    xq: &[Quantized16; R],
    xsums: &[&[f32]; R],
) -> [f32; R] {
    dot_groups!(row, xq, xsums, 18, |b| {
        let d = f16_at(b);
        let (lo, hi) = nibbles16(b.add(2));
        (lo, hi, d, -8.0 * d)
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_1<const R: usize>(
    row: &[u8],
    xq: &[Quantized16; R],
    xsums: &[&[f32]; R],
) -> [f32; R] {
    dot_groups!(row, xq, xsums, 20, |b| {
        let (lo, hi) = nibbles16(b.add(4));
        (lo, hi, f16_at(b), f16_at(b.add(2)))
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5_0<const R: usize>(
    row: &[u8],
    xq: &[Quantized16; R],
    xsums: &[&[f32]; R],
) -> [f32; R] {
    dot_groups!(row, xq, xsums, 22, |b| {
        let d = f16_at(b);
        let (lo, hi) = five_bit_group(b.add(6), b.add(2));
        (lo, hi, d, -16.0 * d)
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5_1<const R: usize>(
    row: &[u8],
    xq: &[Quantized16; R],
    xsums: &[&[f32]; R],
) -> [f32; R] {
    dot_groups!(row, xq, xsums, 24, |b| {
        let (lo, hi) = five_bit_group(b.add(8), b.add(4));
        (lo, hi, f16_at(b), f16_at(b.add(2)))
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_0<const R: usize>(
    row: &[u8],
    xq: &[Quantized16; R],
    xsums: &[&[f32]; R],
) -> [f32; R] {
    dot_groups!(row, xq, xsums, 34, |b| {
        let lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(b.add(2) as *const __m128i));
        let hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(b.add(18) as *const __m128i));
        (lo, hi, f16_at(b), 0.0)
    })
}

/// Group `g` (0..8) of a Q4K or (with `fifth`) Q5K super-block as 32 bytes of
/// weights: per 32 bytes of nibbles at `qs`, the low nibbles are group 2j and the
/// high nibbles group 2j+1; Q5K's fifth bits are bit g of each byte of `qh`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn q45_k_group_bytes(
    qs: *const u8,
    qh: __m256i,
    g: usize,
    fifth: bool,
) -> __m256i {
    let mask = _mm256_set1_epi8(0x0F);
    let packed = _mm256_loadu_si256(qs.add(32 * (g / 2)) as *const __m256i);
    let q = match g % 2 {
        0 => _mm256_and_si256(packed, mask),
        _ => _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask),
    };
    if !fifth {
        return q;
    }
    let bit = _mm256_set1_epi8(1 << g);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
    _mm256_or_si256(q, _mm256_and_si256(set, _mm256_set1_epi8(16)))
}

/// A Q4K/Q5K super-block at `b`: (d, dmin, its 12 bytes of 6-bit scales and
/// mins, Q5K's fifth bits, the nibbles).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn q45_k_block<'a>(
    b: *const u8,
    fifth: bool,
) -> (f32, f32, &'a [u8], __m256i, *const u8) {
    let scales = std::slice::from_raw_parts(b.add(4), 12);
    let (qh, qs) = match fifth {
        true => (_mm256_loadu_si256(b.add(16) as *const __m256i), b.add(48)),
        false => (_mm256_setzero_si256(), b.add(16)),
    };
    (f16_at(b), f16_at(b.add(2)), scales, qh, qs)
}

/// Q4K and (with `fifth`) Q5K: eight 32-weight groups per super-block, each with
/// its own 6-bit scale and min.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q45_k<const R: usize>(
    row: &[u8],
    xq: &[Quantized16; R],
    xsums: &[&[f32]; R],
    fifth: bool,
) -> [f32; R] {
    let bytes = if fifth { 176 } else { 144 };
    let mut acc = [_mm256_setzero_ps(); R];
    let mut offsets = [0f32; R];
    for s in 0..row.len() / bytes {
        let (d, dmin, scales, qh, qs) = q45_k_block(row.as_ptr().add(s * bytes), fifth);
        for g in 0..8 {
            let (sc, m) = scale_min_k4(g, scales);
            let group = s * 8 + g;
            let (lo, hi) = widen_u8(q45_k_group_bytes(qs, qh, g, fifth));
            let (dsc, dm) = (d * f32::from(sc), dmin * f32::from(m));
            for r in 0..R {
                let sums = madd32(lo, hi, xq[r].values.as_ptr().add(group * GROUP));
                let scale = dsc * xq[r].scales.get_unchecked(group);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(scale), acc[r]);
                offsets[r] -= dm * xsums[r].get_unchecked(group);
            }
        }
    }
    hsums(&acc, &offsets)
}

/// Group `g` (0..8) of the Q6K super-block at `b` as 32 bytes of unsigned
/// weights (0..64; the format subtracts 32): a low nibble from `ql`, two high
/// bits from `qh`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn q6_k_group_bytes(b: *const u8, g: usize) -> __m256i {
    let (half, which) = (g / 4, g % 4);
    let qh = _mm256_loadu_si256(b.add(128 + 32 * half) as *const __m256i);
    let ql = _mm256_loadu_si256(b.add(64 * half + 32 * (which % 2)) as *const __m256i);
    let mask = _mm256_set1_epi8(0x0F);
    let nibble = match which < 2 {
        true => _mm256_and_si256(ql, mask),
        false => _mm256_and_si256(_mm256_srli_epi16(ql, 4), mask),
    };
    let high = _mm256_and_si256(
        _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * which as i32)),
        _mm256_set1_epi8(3),
    );
    _mm256_or_si256(nibble, _mm256_slli_epi16(high, 4))
}

/// Q6K: a group's 32 weights are 6-bit values minus 32, with one signed 8-bit
/// scale per 16 weights (at byte 192 + 2g and 193 + 2g) and the f16 d at 208.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q6_k<const R: usize>(row: &[u8], xq: &[Quantized16; R]) -> [f32; R] {
    let thirty_two = _mm256_set1_epi16(32);
    let mut acc = [_mm256_setzero_ps(); R];
    for s in 0..row.len() / 210 {
        let b = row.as_ptr().add(s * 210);
        let d = f16_at(b.add(208));
        let scales = b.add(192) as *const i8;
        for g in 0..8 {
            let (lo, hi) = widen_u8(q6_k_group_bytes(b, g));
            let (lo, hi) = (
                _mm256_sub_epi16(lo, thirty_two),
                _mm256_sub_epi16(hi, thirty_two),
            );
            let group = s * 8 + g;
            let (s0, s1) = (
                f32::from(*scales.add(2 * g)),
                f32::from(*scales.add(2 * g + 1)),
            );
            for r in 0..R {
                let x = xq[r].values.as_ptr().add(group * GROUP);
                let lo = _mm256_madd_epi16(lo, _mm256_loadu_si256(x as *const __m256i));
                let hi = _mm256_madd_epi16(hi, _mm256_loadu_si256(x.add(16) as *const __m256i));
                let dx = d * xq[r].scales.get_unchecked(group);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_set1_ps(dx * s0), acc[r]);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_set1_ps(dx * s1), acc[r]);
            }
        }
    }
    hsums(&acc, &[0.0; R])
}

/// Rounds 32 activations to i16 with one scale (max |x| maps to 32767, rounding
/// to nearest) into `out`; returns (scale, Σx).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_group(x: &[f32; GROUP], out: &mut [i16; GROUP]) -> (f32, f32) {
    let p = x.as_ptr();
    let v = [
        _mm256_loadu_ps(p),
        _mm256_loadu_ps(p.add(8)),
        _mm256_loadu_ps(p.add(16)),
        _mm256_loadu_ps(p.add(24)),
    ];
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let max = _mm256_max_ps(
        _mm256_max_ps(_mm256_and_ps(v[0], abs), _mm256_and_ps(v[1], abs)),
        _mm256_max_ps(_mm256_and_ps(v[2], abs), _mm256_and_ps(v[3], abs)),
    );
    let max = _mm_max_ps(_mm256_castps256_ps128(max), _mm256_extractf128_ps(max, 1));
    let max = _mm_max_ps(max, _mm_movehl_ps(max, max));
    let max = _mm_cvtss_f32(_mm_max_ss(max, _mm_shuffle_ps(max, max, 1)));
    let sum = hsum(_mm256_add_ps(
        _mm256_add_ps(v[0], v[1]),
        _mm256_add_ps(v[2], v[3]),
    ));
    let scale = max / f32::from(i16::MAX);
    let inv = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
    let q: [__m256i; 4] = std::array::from_fn(|i| _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv)));
    // packs works within 128-bit lanes; the permute puts the values back in order.
    let lo = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0b11_01_10_00);
    let hi = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0b11_01_10_00);
    _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, lo);
    _mm256_storeu_si256(out.as_mut_ptr().add(16) as *mut __m256i, hi);
    (scale, sum)
}

/// [`super::formats::integer_row`] with AVX2 for the 32-weight formats (the bulk
/// of Q4_0, Q4_1 and Q4_K_M files); returns false, leaving the outputs alone, for
/// the k-quants.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C ([`available`]); `row` must hold whole
/// blocks of `format`, `q` one value per weight, `scales` one per 16 and
/// `offsets` one per 32.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn integer_row(
    format: BlockFormat,
    row: &[u8],
    q: &mut [i16],
    scales: &mut [f32],
    offsets: &mut [f32],
) -> bool {
    let bytes = format.block_bytes();
    let groups = row.len() / bytes;
    if format.block_weights() != GROUP {
        return false;
    }
    assert!(q.len() == groups * GROUP && scales.len() == 2 * groups && offsets.len() == groups);
    let eight = _mm256_set1_epi16(8);
    let sixteen = _mm256_set1_epi16(16);
    for g in 0..groups {
        let b = row.as_ptr().add(g * bytes);
        let (lo, hi, d, offset) = match format {
            BlockFormat::Q4_0 => {
                let (lo, hi) = nibbles16(b.add(2));
                (
                    _mm256_sub_epi16(lo, eight),
                    _mm256_sub_epi16(hi, eight),
                    f16_at(b),
                    0.0,
                )
            }
            BlockFormat::Q4_1 => {
                let (lo, hi) = nibbles16(b.add(4));
                (lo, hi, f16_at(b), f16_at(b.add(2)))
            }
            BlockFormat::Q5_0 => {
                let (lo, hi) = five_bit_group(b.add(6), b.add(2));
                (
                    _mm256_sub_epi16(lo, sixteen),
                    _mm256_sub_epi16(hi, sixteen),
                    f16_at(b),
                    0.0,
                )
            }
            BlockFormat::Q5_1 => {
                let (lo, hi) = five_bit_group(b.add(8), b.add(4));
                (lo, hi, f16_at(b), f16_at(b.add(2)))
            }
            BlockFormat::Q8_0 => (
                _mm256_cvtepi8_epi16(_mm_loadu_si128(b.add(2) as *const __m128i)),
                _mm256_cvtepi8_epi16(_mm_loadu_si128(b.add(18) as *const __m128i)),
                f16_at(b),
                0.0,
            ),
            BlockFormat::Q4K | BlockFormat::Q5K | BlockFormat::Q6K => return false,
        };
        let out = q.as_mut_ptr().add(g * GROUP);
        _mm256_storeu_si256(out as *mut __m256i, lo);
        _mm256_storeu_si256(out.add(16) as *mut __m256i, hi);
        scales[2 * g] = d;
        scales[2 * g + 1] = d;
        offsets[g] = offset;
    }
    true
}
