//! The decode dot products of [`super::x86`] on 512-bit vectors (AVX-512 F and
//! BW). One `vpmaddwd` on a zmm multiplies a whole 32-weight group by its 32
//! 16-bit activations, where AVX2 needs two and an add, and the group's sums are
//! scaled by one f32 multiply-add; the weights are decoded to bytes by the same
//! helpers as the AVX2 kernels and widened in one step. Same contract as
//! `x86::dot`: each activation row's sums run in the same order whatever `R` is,
//! so a row's result is bit for bit the one it gets alone.
//!
//! Every function here requires AVX-512 F and BW plus AVX2, FMA and F16C (checked
//! by [`available`]) and a row of whole blocks matching `xq`.

use std::arch::x86_64::*;

use super::formats::{scale_min_k4, BlockFormat, GROUP};
use super::quads::{QuadFields, QUAD, QUAD_ACTIVATION_BYTES};
use super::quantized16::Quantized16;
use super::x86::{
    f16_at, five_bit_bytes, nibble_bytes, q45_k_block, q45_k_group_bytes, q6_k_group_bytes,
};

/// How far ahead of the block being read the weights are prefetched, in bytes.
const PREFETCH_AHEAD: usize = 1024;

/// Whether this CPU can run the kernels of this module.
pub fn available() -> bool {
    super::x86::available()
        && std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
}

/// Whether this CPU can run [`dot_quads`] (AVX-512 VNNI on top of [`available`]).
pub fn quads_available() -> bool {
    available() && std::is_x86_feature_detected!("avx512vnni")
}

/// Σ w·x of the quads of one weight row (the [`super::quads`] layout) with each
/// of `R` activation rows in the matching byte planes. Per quad: one load and
/// three or four byte operations decode four groups, four `vpdpbusd` multiply
/// them by both bytes of each 16-bit activation (exact integer sums, as
/// `vpmaddwd` gives), and one convert and one multiply-add scale them, the four
/// group scales broadcast from one F16C convert. Each row's sums run in the same
/// order whatever `R` is.
///
/// # Safety
/// The CPU must support what [`quads_available`] checks; `format` must have
/// quads, `row` be whole quads of it, and for every r `planes[r]` hold
/// `QUAD_ACTIVATION_BYTES` and `scales[r]`, `xsums[r]` four entries per quad.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[inline]
pub unsafe fn dot_quads<const R: usize>(
    format: BlockFormat,
    row: &[u8],
    planes: &[&[u8]; R],
    scales: &[&[f32]; R],
    xsums: &[&[f32]; R],
) -> [f32; R] {
    let fields = QuadFields::of(format).expect("a format with quads");
    let quads = row.len() / fields.bytes;
    for r in 0..R {
        debug_assert_eq!(row.len(), quads * fields.bytes);
        debug_assert_eq!(planes[r].len(), quads * QUAD_ACTIVATION_BYTES);
        debug_assert_eq!(scales[r].len(), quads * QUAD);
        debug_assert_eq!(xsums[r].len(), quads * QUAD);
    }
    // The offset per group: a multiple of d (Q4_0: −8d, Q5_0: −16d) or the min.
    match format {
        BlockFormat::Q4_0 => quad_loop::<R, false, false>(row, fields, planes, scales, xsums, -8.0),
        BlockFormat::Q4_1 => quad_loop::<R, true, false>(row, fields, planes, scales, xsums, 1.0),
        BlockFormat::Q5_0 => quad_loop::<R, false, true>(row, fields, planes, scales, xsums, -16.0),
        BlockFormat::Q5_1 => quad_loop::<R, true, true>(row, fields, planes, scales, xsums, 1.0),
        _ => unreachable!("QuadFields::of accepted {format:?}"),
    }
}

/// [`dot_quads`] for one format: `MIN` when the quad has four f16 mins, `FIFTH`
/// when it has fifth-bit masks; `offset_factor` times the Σ (d or min)·Σx.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn quad_loop<const R: usize, const MIN: bool, const FIFTH: bool>(
    row: &[u8],
    fields: QuadFields,
    planes: &[&[u8]; R],
    scales: &[&[f32]; R],
    xsums: &[&[f32]; R],
    offset_factor: f32,
) -> [f32; R] {
    let low_nibbles = _mm512_set1_epi8(0x0F);
    let sixteen = _mm512_set1_epi8(16);
    // Lane k of four group scales to the 4 i32 sums of group k (128-bit lane k).
    let spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    let (mins_at, fifth_at) = (fields.mins.unwrap_or(0), fields.fifth.unwrap_or(0));
    let mut acc = [_mm512_setzero_ps(); R];
    let mut offsets = [_mm_setzero_ps(); R];
    for q in 0..row.len() / fields.bytes {
        let quad = row.as_ptr().add(q * fields.bytes);
        // A prefetch never faults, past the row's end included.
        _mm_prefetch::<_MM_HINT_T0>(quad.wrapping_add(PREFETCH_AHEAD) as *const i8);
        let nibbles = _mm512_loadu_si512(quad.add(fields.nibbles) as *const __m512i);
        // Weights 0..16 of each group, then 16..32, as unsigned bytes.
        let mut first = _mm512_and_si512(nibbles, low_nibbles);
        let mut second = _mm512_and_si512(_mm512_srli_epi16(nibbles, 4), low_nibbles);
        if FIFTH {
            let bits = quad.add(fifth_at) as *const u64;
            first = _mm512_mask_add_epi8(first, bits.read_unaligned(), first, sixteen);
            second = _mm512_mask_add_epi8(second, bits.add(1).read_unaligned(), second, sixteen);
        }
        let d = _mm_cvtph_ps(_mm_loadl_epi64(quad as *const __m128i));
        let m = if MIN {
            _mm_cvtph_ps(_mm_loadl_epi64(quad.add(mins_at) as *const __m128i))
        } else {
            d
        };
        for r in 0..R {
            let x = planes[r].as_ptr().add(q * QUAD_ACTIVATION_BYTES) as *const __m512i;
            // The weights are below 32, so they are valid as signed bytes too:
            // high bytes (signed) times weights, shifted, plus low bytes
            // (unsigned) times weights.
            let t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), first, _mm512_loadu_si512(x));
            let t = _mm512_dpbusd_epi32(t, second, _mm512_loadu_si512(x.add(1)));
            let t = _mm512_slli_epi32(t, 8);
            let t = _mm512_dpbusd_epi32(t, _mm512_loadu_si512(x.add(2)), first);
            let t = _mm512_dpbusd_epi32(t, _mm512_loadu_si512(x.add(3)), second);
            let s = _mm_mul_ps(d, _mm_loadu_ps(scales[r].as_ptr().add(q * QUAD)));
            let s = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(s));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), s, acc[r]);
            let xsum = _mm_loadu_ps(xsums[r].as_ptr().add(q * QUAD));
            offsets[r] = _mm_fmadd_ps(m, xsum, offsets[r]);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        let o = _mm_add_ps(offsets[r], _mm_movehl_ps(offsets[r], offsets[r]));
        let o = _mm_cvtss_f32(_mm_add_ss(o, _mm_shuffle_ps(o, o, 1)));
        out[r] = _mm512_reduce_add_ps(acc[r]) + offset_factor * o;
    }
    out
}

/// Σ w·x per i32 lane (four weights each) of 64 weight bytes below 128 and the
/// 16-bit activations whose high bytes are at `high` and low bytes at `low`:
/// the weights as unsigned times the high bytes (signed), shifted, plus the low
/// bytes (unsigned) times the weights as signed. Exact.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn exact_products(weights: __m512i, high: *const __m512i, low: *const __m512i) -> __m512i {
    let t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), weights, _mm512_loadu_si512(high));
    let t = _mm512_slli_epi32(t, 8);
    _mm512_dpbusd_epi32(t, _mm512_loadu_si512(low), weights)
}

/// The sum of the eight lanes of a 256-bit vector.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn sum256(v: __m256) -> f32 {
    let o = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let o = _mm_add_ps(o, _mm_movehl_ps(o, o));
    _mm_cvtss_f32(_mm_add_ss(o, _mm_shuffle_ps(o, o, 1)))
}

/// Σ w·x of one Q4_K or Q5_K row (GGUF blocks) with each of `R` activation
/// rows in the byte planes of [`super::quads::PlaneOrder::KQuantHalf`], as
/// [`dot_quads`] does for the nibble formats: per half super-block one load
/// and two or three byte operations per 64 weights, four `vpdpbusd`; the eight
/// 6-bit scales and mins of a super-block are unpacked at once (llama.cpp's
/// `utmp` shuffle) and scaled as one vector.
///
/// # Safety
/// As [`dot_quads`]; `format` is Q4_K or Q5_K, `row` whole super-blocks, and
/// for every r `planes[r]` holds `2 * QUAD_ACTIVATION_BYTES` and `scales[r]`,
/// `xsums[r]` eight entries per super-block.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[inline]
pub unsafe fn dot_k_quant<const R: usize>(
    format: BlockFormat,
    row: &[u8],
    planes: &[&[u8]; R],
    scales: &[&[f32]; R],
    xsums: &[&[f32]; R],
) -> [f32; R] {
    match format {
        BlockFormat::Q4K => k_quant_loop::<R, false>(row, planes, scales, xsums),
        BlockFormat::Q5K => k_quant_loop::<R, true>(row, planes, scales, xsums),
        _ => unreachable!("{format:?} is not Q4_K or Q5_K"),
    }
}

/// The eight 6-bit scales (first u64) and mins (second) of a Q4_K/Q5_K
/// super-block's 12 packed bytes, as llama.cpp unpacks them: the same values
/// as [`scale_min_k4`] for groups 0..8.
#[inline]
unsafe fn k_scales_mins(packed: *const u8) -> (u64, u64) {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let word = |i: usize| (packed.add(4 * i) as *const u32).read_unaligned();
    let (a, b, c) = (word(0), word(1), word(2));
    let scales_high = (c & LOW4) | (((a >> 6) & LOW2) << 4);
    let mins_high = ((c >> 4) & LOW4) | (((b >> 6) & LOW2) << 4);
    (
        u64::from(a & LOW6) | u64::from(scales_high) << 32,
        u64::from(b & LOW6) | u64::from(mins_high) << 32,
    )
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn k_quant_loop<const R: usize, const FIFTH: bool>(
    row: &[u8],
    planes: &[&[u8]; R],
    scales: &[&[f32]; R],
    xsums: &[&[f32]; R],
) -> [f32; R] {
    let bytes = if FIFTH { 176 } else { 144 };
    let low_nibbles = _mm512_set1_epi8(0x0F);
    let sixteen = _mm512_set1_epi8(16);
    // Group g of a super-block's eight scales to the lanes of its 32 weights:
    // the low-nibble vector of half h holds groups 4h and 4h + 2, the high one
    // 4h + 1 and 4h + 3 (eight i32 sums each).
    let spread = |a: i32, b: i32| _mm512_set_epi32(b, b, b, b, b, b, b, b, a, a, a, a, a, a, a, a);
    let spreads = [[spread(0, 2), spread(1, 3)], [spread(4, 6), spread(5, 7)]];
    // Q5_K: bit g of byte l of the 32 fifth-bit bytes is group g's weight l.
    let bit = |a: u32, b: u32| {
        let every_byte = |bit: u32| ((1u64 << bit) * 0x0101_0101_0101_0101) as i64;
        let (a, b) = (every_byte(a), every_byte(b));
        _mm512_set_epi64(b, b, b, b, a, a, a, a)
    };
    let bits = [[bit(0, 2), bit(1, 3)], [bit(4, 6), bit(5, 7)]];
    let mut acc = [_mm512_setzero_ps(); R];
    let mut offsets = [_mm256_setzero_ps(); R];
    for s in 0..row.len() / bytes {
        let block = row.as_ptr().add(s * bytes);
        _mm_prefetch::<_MM_HINT_T0>(block.wrapping_add(PREFETCH_AHEAD) as *const i8);
        let d = _mm256_set1_ps(f16_at(block));
        let dmin = _mm256_set1_ps(f16_at(block.add(2)));
        let (sc, m) = k_scales_mins(block.add(4));
        let to_f32 = |v: u64| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(v as i64)));
        let (d_sc, dmin_m) = (_mm256_mul_ps(d, to_f32(sc)), _mm256_mul_ps(dmin, to_f32(m)));
        let qs = block.add(if FIFTH { 48 } else { 16 });
        let fifth = if FIFTH {
            _mm512_broadcast_i64x4(_mm256_loadu_si256(block.add(16) as *const __m256i))
        } else {
            _mm512_setzero_si512()
        };
        for h in 0..2 {
            let nibbles = _mm512_loadu_si512(qs.add(64 * h) as *const __m512i);
            let mut low = _mm512_and_si512(nibbles, low_nibbles);
            let mut high = _mm512_and_si512(_mm512_srli_epi16(nibbles, 4), low_nibbles);
            if FIFTH {
                let (a, b) = (bits[h][0], bits[h][1]);
                low = _mm512_mask_add_epi8(low, _mm512_test_epi8_mask(fifth, a), low, sixteen);
                high = _mm512_mask_add_epi8(high, _mm512_test_epi8_mask(fifth, b), high, sixteen);
            }
            for r in 0..R {
                let x =
                    planes[r].as_ptr().add((2 * s + h) * QUAD_ACTIVATION_BYTES) as *const __m512i;
                let group_scales =
                    _mm256_mul_ps(d_sc, _mm256_loadu_ps(scales[r].as_ptr().add(8 * s)));
                let group_scales = _mm512_castps256_ps512(group_scales);
                for (v, weights) in [low, high].into_iter().enumerate() {
                    // Weights below 32: valid as unsigned and as signed bytes.
                    let t = exact_products(weights, x.add(v), x.add(2 + v));
                    let scale = _mm512_permutexvar_ps(spreads[h][v], group_scales);
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), scale, acc[r]);
                }
            }
        }
        for r in 0..R {
            let xsum = _mm256_loadu_ps(xsums[r].as_ptr().add(8 * s));
            offsets[r] = _mm256_fmadd_ps(dmin_m, xsum, offsets[r]);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = _mm512_reduce_add_ps(acc[r]) - sum256(offsets[r]);
    }
    out
}

/// Σ w·x of one Q6_K row (GGUF blocks) with each of `R` activation rows in the
/// byte planes of [`super::quads::PlaneOrder::Natural`] and their sums per 16:
/// per half super-block, 64 weights from one load of low nibbles and their
/// high bits moved into place by one variable shift, four `vpdpbusd` on the
/// unsigned 6-bit values; the −32 of every weight is taken off once per 16
/// weights through the activations' sums.
///
/// # Safety
/// As [`dot_quads`]; `row` is whole Q6_K super-blocks, and for every r
/// `planes[r]` holds `2 * QUAD_ACTIVATION_BYTES`, `scales[r]` eight entries and
/// `sums16[r]` sixteen per super-block.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[inline]
pub unsafe fn dot_q6_k_planes<const R: usize>(
    row: &[u8],
    planes: &[&[u8]; R],
    scales: &[&[f32]; R],
    sums16: &[&[f32]; R],
) -> [f32; R] {
    let low_nibbles = _mm512_set1_epi8(0x0F);
    let bits_4_5 = _mm512_set1_epi8(0x30);
    // High bits of weights 0..32 are bits 0-1 of the 32 high-bit bytes, of
    // 32..64 bits 2-3, of 64..96 bits 4-5, of 96..128 bits 6-7: shifted (per
    // 16-bit word) to bits 4-5 of each byte.
    let word_shifts = |a: i16, b: i16| {
        _mm512_set_epi64(
            b as i64 * 0x0001_0001_0001_0001,
            b as i64 * 0x0001_0001_0001_0001,
            b as i64 * 0x0001_0001_0001_0001,
            b as i64 * 0x0001_0001_0001_0001,
            a as i64 * 0x0001_0001_0001_0001,
            a as i64 * 0x0001_0001_0001_0001,
            a as i64 * 0x0001_0001_0001_0001,
            a as i64 * 0x0001_0001_0001_0001,
        )
    };
    let (left, right) = (word_shifts(4, 2), word_shifts(0, 2));
    // The 16-weight scale k of a half to the four i32 sums of its weights.
    let spread = |base: i32| {
        let (a, b, c, d) = (base, base + 1, base + 2, base + 3);
        _mm512_set_epi32(d, d, d, d, c, c, c, c, b, b, b, b, a, a, a, a)
    };
    let spreads = [spread(0), spread(4)];
    let pairs = _mm256_set_epi32(3, 3, 2, 2, 1, 1, 0, 0);
    let mut acc = [_mm512_setzero_ps(); R];
    let mut offsets = [_mm256_setzero_ps(); R];
    for s in 0..row.len() / 210 {
        let block = row.as_ptr().add(s * 210);
        _mm_prefetch::<_MM_HINT_T0>(block.wrapping_add(PREFETCH_AHEAD) as *const i8);
        let d = _mm256_set1_ps(f16_at(block.add(208)));
        for h in 0..2 {
            let low = _mm512_loadu_si512(block.add(64 * h) as *const __m512i);
            let high_bits = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                block.add(128 + 32 * h) as *const __m256i
            ));
            let first = _mm512_or_si512(
                _mm512_and_si512(low, low_nibbles),
                _mm512_and_si512(_mm512_sllv_epi16(high_bits, left), bits_4_5),
            );
            let second = _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi16(low, 4), low_nibbles),
                _mm512_and_si512(_mm512_srlv_epi16(high_bits, right), bits_4_5),
            );
            let sub = _mm_loadl_epi64(block.add(192 + 8 * h) as *const __m128i);
            let d_sc = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sub)));
            for r in 0..R {
                let unit = 2 * s + h;
                let x = planes[r].as_ptr().add(unit * QUAD_ACTIVATION_BYTES) as *const __m512i;
                // The activation scale of each 16-weight scale's group.
                let xs = _mm_loadu_ps(scales[r].as_ptr().add(4 * unit));
                let xs = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(xs), pairs);
                let products = _mm512_castps256_ps512(_mm256_mul_ps(d_sc, xs));
                for (v, weights) in [first, second].into_iter().enumerate() {
                    // 6-bit weights: valid as unsigned and as signed bytes.
                    let t = exact_products(weights, x.add(v), x.add(2 + v));
                    let scale = _mm512_permutexvar_ps(spreads[v], products);
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), scale, acc[r]);
                }
                let sums = _mm256_loadu_ps(sums16[r].as_ptr().add(8 * unit));
                offsets[r] = _mm256_fmadd_ps(d_sc, sums, offsets[r]);
            }
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = _mm512_reduce_add_ps(acc[r]) - 32.0 * sum256(offsets[r]);
    }
    out
}

/// Σ w·x of one weight row with each of `R` activation rows, as `x86::dot`.
///
/// # Safety
/// The CPU must support what [`available`] checks; `row` must hold
/// `xq[r].scales.len() * 32` weights of `format` for every r and each `xsums[r]`
/// one entry per group.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
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
        BlockFormat::Q4_0 => dot_groups(row, xq, xsums, 18, |b| {
            let d = f16_at(b);
            (nibble_bytes(b.add(2)), d, -8.0 * d)
        }),
        BlockFormat::Q4_1 => dot_groups(row, xq, xsums, 20, |b| {
            (nibble_bytes(b.add(4)), f16_at(b), f16_at(b.add(2)))
        }),
        BlockFormat::Q5_0 => dot_groups(row, xq, xsums, 22, |b| {
            let d = f16_at(b);
            (five_bit_bytes(b.add(6), b.add(2)), d, -16.0 * d)
        }),
        BlockFormat::Q5_1 => dot_groups(row, xq, xsums, 24, |b| {
            (
                five_bit_bytes(b.add(8), b.add(4)),
                f16_at(b),
                f16_at(b.add(2)),
            )
        }),
        BlockFormat::Q8_0 => dot_q8_0(row, xq),
        BlockFormat::Q4K => dot_q45_k(row, xq, xsums, false),
        BlockFormat::Q5K => dot_q45_k(row, xq, xsums, true),
        BlockFormat::Q6K => dot_q6_k(row, xq),
    }
}

/// The 32 activations of group `g` of row `x` times 32 i16 weights: 16 i32
/// sums, lane i holding weights 2i and 2i + 1.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
#[inline]
unsafe fn madd_group(weights: __m512i, x: &Quantized16, g: usize) -> __m512i {
    let x = _mm512_loadu_si512(x.values.as_ptr().add(g * GROUP) as *const __m512i);
    _mm512_madd_epi16(weights, x)
}

#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
#[inline]
unsafe fn finish<const R: usize>(acc: &[__m512; R], offsets: &[f32; R]) -> [f32; R] {
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = _mm512_reduce_add_ps(acc[r]) + offsets[r];
    }
    out
}

/// The loop of the unsigned 32-weight formats: `decode` turns the block at a
/// pointer into (32 weight bytes, scale, offset), once for all `R` rows.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
#[inline]
unsafe fn dot_groups<const R: usize>(
    row: &[u8],
    xq: &[Quantized16; R],
    xsums: &[&[f32]; R],
    bytes: usize,
    decode: impl Fn(*const u8) -> (__m256i, f32, f32),
) -> [f32; R] {
    let mut acc = [_mm512_setzero_ps(); R];
    let mut offsets = [0f32; R];
    for g in 0..row.len() / bytes {
        let block = row.as_ptr().add(g * bytes);
        // A prefetch never faults, past the row's end included.
        _mm_prefetch::<_MM_HINT_T0>(block.wrapping_add(PREFETCH_AHEAD) as *const i8);
        let (q, d, offset) = decode(block);
        let weights = _mm512_cvtepu8_epi16(q);
        for r in 0..R {
            let sums = madd_group(weights, &xq[r], g);
            let scale = _mm512_set1_ps(d * xq[r].scales.get_unchecked(g));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc[r]);
            offsets[r] += offset * xsums[r].get_unchecked(g);
        }
    }
    finish(&acc, &offsets)
}

/// Q8_0: signed bytes, no offset.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn dot_q8_0<const R: usize>(row: &[u8], xq: &[Quantized16; R]) -> [f32; R] {
    let mut acc = [_mm512_setzero_ps(); R];
    for g in 0..row.len() / 34 {
        let b = row.as_ptr().add(g * 34);
        _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(PREFETCH_AHEAD) as *const i8);
        let weights = _mm512_cvtepi8_epi16(_mm256_loadu_si256(b.add(2) as *const __m256i));
        let d = f16_at(b);
        for r in 0..R {
            let sums = madd_group(weights, &xq[r], g);
            let scale = _mm512_set1_ps(d * xq[r].scales.get_unchecked(g));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc[r]);
        }
    }
    finish(&acc, &[0.0; R])
}

/// Q4K and (with `fifth`) Q5K: eight 32-weight groups per super-block, each with
/// its own 6-bit scale and min.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn dot_q45_k<const R: usize>(
    row: &[u8],
    xq: &[Quantized16; R],
    xsums: &[&[f32]; R],
    fifth: bool,
) -> [f32; R] {
    let bytes = if fifth { 176 } else { 144 };
    let mut acc = [_mm512_setzero_ps(); R];
    let mut offsets = [0f32; R];
    for s in 0..row.len() / bytes {
        let (d, dmin, scales, qh, qs) = q45_k_block(row.as_ptr().add(s * bytes), fifth);
        for g in 0..8 {
            let (sc, m) = scale_min_k4(g, scales);
            let group = s * 8 + g;
            let weights = _mm512_cvtepu8_epi16(q45_k_group_bytes(qs, qh, g, fifth));
            let (dsc, dm) = (d * f32::from(sc), dmin * f32::from(m));
            for r in 0..R {
                let sums = madd_group(weights, &xq[r], group);
                let scale = _mm512_set1_ps(dsc * xq[r].scales.get_unchecked(group));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc[r]);
                offsets[r] -= dm * xsums[r].get_unchecked(group);
            }
        }
    }
    finish(&acc, &offsets)
}

/// Q6K: 6-bit weights minus 32, one signed 8-bit scale per 16 weights, so the
/// low 8 lanes of a group's sums (weights 0..16) and the high 8 take different
/// scales.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn dot_q6_k<const R: usize>(row: &[u8], xq: &[Quantized16; R]) -> [f32; R] {
    let thirty_two = _mm512_set1_epi16(32);
    let mut acc = [_mm512_setzero_ps(); R];
    for s in 0..row.len() / 210 {
        let b = row.as_ptr().add(s * 210);
        let d = f16_at(b.add(208));
        let scales = b.add(192) as *const i8;
        for g in 0..8 {
            let weights =
                _mm512_sub_epi16(_mm512_cvtepu8_epi16(q6_k_group_bytes(b, g)), thirty_two);
            let group = s * 8 + g;
            let (s0, s1) = (
                f32::from(*scales.add(2 * g)),
                f32::from(*scales.add(2 * g + 1)),
            );
            for r in 0..R {
                let sums = madd_group(weights, &xq[r], group);
                let dx = d * xq[r].scales.get_unchecked(group);
                let scale =
                    _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(dx * s0), _mm512_set1_ps(dx * s1));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc[r]);
            }
        }
    }
    finish(&acc, &[0.0; R])
}
