//! The GGUF block layouts claw multiplies directly: their sizes and their scalar
//! dequantization (the reference the SIMD kernels are tested against, the portable
//! fallback, and the f32 expansion prompt processing multiplies with).
//!
//! Every format is read as 32-weight *groups*: a group's weights are
//! `scale · q + offset` with small integers `q`, which is how the kernels see them
//! (k-quants nest eight 32-weight groups, or sixteen 16-weight halves for Q6_K, in a
//! 256-weight super-block with 6- or 8-bit sub-scales).

use candle_core::quantized::GgmlDType;
use half::f16;

/// Weights per group: the activation blocks have the same size, so a group's
/// activation scale is one number.
pub const GROUP: usize = 32;

/// Weights per k-quant super-block.
pub const SUPER: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum BlockFormat {
    /// f16 d, 16 bytes of nibbles: w = d·(q − 8).
    Q4_0,
    /// f16 d, f16 m, 16 bytes of nibbles: w = d·q + m.
    Q4_1,
    /// f16 d, 32 high bits, 16 bytes of nibbles: w = d·(q − 16), q of 5 bits.
    Q5_0,
    /// f16 d, f16 m, 32 high bits, 16 bytes of nibbles: w = d·q + m.
    Q5_1,
    /// f16 d, 32 signed bytes: w = d·q.
    Q8_0,
    /// Super-block: f16 d, f16 dmin, 12 bytes of 6-bit (scale, min) pairs for 8
    /// groups, 128 bytes of nibbles: w = d·sc·q − dmin·m.
    Q4K,
    /// Q4K plus 32 bytes of fifth bits.
    Q5K,
    /// Super-block: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 signed
    /// 8-bit scales (one per 16 weights), f16 d: w = d·sc·(q − 32), q of 6 bits.
    Q6K,
}

impl BlockFormat {
    /// The formats with a kernel here; other GGUF types keep candle's matmul.
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::Q4_0 => Self::Q4_0,
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q5_1 => Self::Q5_1,
            GgmlDType::Q8_0 => Self::Q8_0,
            GgmlDType::Q4K => Self::Q4K,
            GgmlDType::Q5K => Self::Q5K,
            GgmlDType::Q6K => Self::Q6K,
            _ => return None,
        })
    }

    pub const ALL: [Self; 8] = [
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q4K,
        Self::Q5K,
        Self::Q6K,
    ];

    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q5_1 => GgmlDType::Q5_1,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
        }
    }

    /// Weights per block.
    pub fn block_weights(self) -> usize {
        match self {
            Self::Q4K | Self::Q5K | Self::Q6K => SUPER,
            _ => GROUP,
        }
    }

    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }
}

pub(super) fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// The 6-bit scale and min of group `j` (0..8) of a Q4K/Q5K super-block, packed
/// as in llama.cpp's `get_scale_min_k4`.
pub(super) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Appends the f32 values of a row of whole blocks to `out`: the integers of
/// [`integer_row`] times their scales plus their offsets, which is how candle
/// (and llama.cpp) dequantize too.
pub fn dequantize_row(format: BlockFormat, row: &[u8], out: &mut Vec<f32>) {
    let n = row.len() / format.block_bytes() * format.block_weights();
    let (mut q, mut scales, mut offsets) =
        (vec![0i16; n], vec![0f32; n / 16], vec![0f32; n / GROUP]);
    integer_row(format, row, &mut q, &mut scales, &mut offsets);
    out.extend(
        q.iter()
            .enumerate()
            .map(|(j, &q)| scales[j / 16] * f32::from(q) + offsets[j / GROUP]),
    );
}

/// Weights of a row of whole blocks as small integers with their scales, the form
/// the prompt GEMM multiplies: weight j is `scales[j / 16] · q[j] + offsets[j / 32]`.
/// Every format's `q` fits in i16 (at most 8 bits); formats whose offset is a
/// multiple of the scale (Q4_0, Q5_0, Q6_K) fold it into `q`, leaving offset 0.
pub fn integer_row(
    format: BlockFormat,
    row: &[u8],
    q: &mut [i16],
    scales: &mut [f32],
    offsets: &mut [f32],
) {
    let blocks = row.chunks_exact(format.block_bytes());
    debug_assert_eq!(q.len(), blocks.len() * format.block_weights());
    debug_assert_eq!(scales.len(), q.len() / 16);
    debug_assert_eq!(offsets.len(), q.len() / GROUP);
    // One 32-weight group: byte j holds weight j (low nibble) and j + 16 (high
    // nibble); bit j of `high_bits` is weight j's fifth bit.
    let nibbles = |qs: &[u8], high_bits: u32, minus: i16, q: &mut [i16]| {
        for (j, &byte) in qs.iter().enumerate() {
            let lo = (byte & 0xF) | ((((high_bits >> j) & 1) << 4) as u8);
            let hi = (byte >> 4) | ((((high_bits >> (j + 16)) & 1) << 4) as u8);
            q[j] = i16::from(lo) - minus;
            q[j + 16] = i16::from(hi) - minus;
        }
    };
    let weights = format.block_weights();
    for (n, b) in blocks.enumerate() {
        let q = &mut q[n * weights..(n + 1) * weights];
        let scales = &mut scales[n * weights / 16..(n + 1) * weights / 16];
        let offsets = &mut offsets[n * weights / GROUP..(n + 1) * weights / GROUP];
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let (d, offset) = match format {
            BlockFormat::Q4_0 => {
                nibbles(&b[2..18], 0, 8, q);
                (f16_at(b, 0), 0.0)
            }
            BlockFormat::Q4_1 => {
                nibbles(&b[4..20], 0, 0, q);
                (f16_at(b, 0), f16_at(b, 2))
            }
            BlockFormat::Q5_0 => {
                nibbles(&b[6..22], u32_at(2), 16, q);
                (f16_at(b, 0), 0.0)
            }
            BlockFormat::Q5_1 => {
                nibbles(&b[8..24], u32_at(4), 0, q);
                (f16_at(b, 0), f16_at(b, 2))
            }
            BlockFormat::Q8_0 => {
                for (q, &byte) in q.iter_mut().zip(&b[2..34]) {
                    *q = i16::from(byte as i8);
                }
                (f16_at(b, 0), 0.0)
            }
            BlockFormat::Q4K | BlockFormat::Q5K => {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let (qh, qs) = match format {
                    BlockFormat::Q5K => (Some(&b[16..48]), &b[48..176]),
                    _ => (None, &b[16..144]),
                };
                for g in 0..8 {
                    let bytes = &qs[(g / 2) * 32..(g / 2) * 32 + 32];
                    for (l, q) in q[g * GROUP..(g + 1) * GROUP].iter_mut().enumerate() {
                        let nibble = if g % 2 == 0 {
                            bytes[l] & 0xF
                        } else {
                            bytes[l] >> 4
                        };
                        *q = i16::from(nibble | qh.map_or(0, |h| ((h[l] >> g) & 1) << 4));
                    }
                    let (sc, m) = scale_min_k4(g, &b[4..16]);
                    scales[2 * g] = d * f32::from(sc);
                    scales[2 * g + 1] = d * f32::from(sc);
                    offsets[g] = -dmin * f32::from(m);
                }
                continue;
            }
            BlockFormat::Q6K => {
                let (ql, qh, sc, d) = (&b[0..128], &b[128..192], &b[192..208], f16_at(b, 208));
                for g in 0..8 {
                    let (half, which) = (g / 4, g % 4);
                    let low = &ql[half * 64 + (which % 2) * 32..][..32];
                    let high = &qh[half * 32..][..32];
                    for (l, q) in q[g * GROUP..(g + 1) * GROUP].iter_mut().enumerate() {
                        let nibble = if which < 2 { low[l] & 0xF } else { low[l] >> 4 };
                        *q = i16::from(nibble | (((high[l] >> (2 * which)) & 3) << 4)) - 32;
                    }
                    for h in 0..2 {
                        scales[2 * g + h] = d * f32::from(sc[half * 8 + which * 2 + h] as i8);
                    }
                    offsets[g] = 0.0;
                }
                continue;
            }
        };
        scales.fill(d);
        offsets.fill(offset);
    }
}

impl BlockFormat {
    /// Whether [`integer_row`] gives this format non-zero offsets.
    pub fn has_offsets(self) -> bool {
        matches!(self, Self::Q4_1 | Self::Q5_1 | Self::Q4K | Self::Q5K)
    }

    /// Whether [`integer_row`]'s two 16-weight scales of a group can differ.
    pub fn has_half_scales(self) -> bool {
        self == Self::Q6K
    }
}
