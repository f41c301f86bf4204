//! The decode layout of the 32-weight nibble formats (Q4_0, Q4_1, Q5_0, Q5_1) on
//! CPUs with AVX-512 VNNI: each run of four blocks of a row is stored as one
//! *quad* of the same size with its fields gathered,
//!
//! ```text
//!   [4 × f16 d] [4 × f16 m: Q4_1, Q5_1] [u64, u64: Q5_0, Q5_1] [4 × 16 nibble bytes]
//! ```
//!
//! where the first u64 holds the fifth bits of weights 0..16 of the four groups
//! (16 bits a group, in group order) and the second those of weights 16..32. One
//! 512-bit load then holds the nibbles of four groups (byte j of group k, low
//! nibble weight j, high nibble weight j + 16, as in the GGUF block), a mask
//! register the fifth bits of 64 weights, and one F16C convert the four scales.
//!
//! Why: read as GGUF blocks, a Q5_0 group costs about 30 instructions to decode,
//! multiply and scale (scalar f16 loads, bit spreading, a widening, a scalar
//! scale per group), so decode ran at half the machine's streaming rate
//! (examples/bench_decode); a quad costs about 7 a group. The layout is lossless
//! and the same size: [`gguf_row`] gives the file's bytes back for the prompt
//! GEMM and dequantization. A row's last `groups % 4` groups stay GGUF blocks.
//!
//! The activations are read in a matching order ([`QuadActivations`]): per quad,
//! the high bytes of the 16-bit values for weights 0..16 of each group, then for
//! weights 16..32, then the low bytes likewise, so that `vpdpbusd` (unsigned
//! bytes times signed bytes) multiplies every weight by both halves of its
//! activation, and `256·Σw·hi + Σw·lo` is the exact 16-bit product.
//!
//! Q4_K, Q5_K and Q6_K need no new layout (a super-block already gathers its
//! fields), only activations in the order of their nibbles
//! ([`PlaneOrder::KQuantHalf`], [`PlaneOrder::Natural`]), for the same kind of
//! kernel.

use super::formats::{BlockFormat, GROUP};

/// Groups per quad.
pub const QUAD: usize = 4;

/// Activation bytes per quad: two planes (high and low bytes) of 128 values.
pub const QUAD_ACTIVATION_BYTES: usize = 2 * QUAD * GROUP;

/// Where a quad's fields start, for a format that has quads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuadFields {
    /// Offset of the four f16 mins (Q4_1, Q5_1).
    pub mins: Option<usize>,
    /// Offset of the two u64 fifth-bit masks (Q5_0, Q5_1).
    pub fifth: Option<usize>,
    /// Offset of the 64 nibble bytes.
    pub nibbles: usize,
    /// Bytes per quad (four blocks).
    pub bytes: usize,
}

impl QuadFields {
    pub fn of(format: BlockFormat) -> Option<Self> {
        let (mins, fifth) = match format {
            BlockFormat::Q4_0 => (false, false),
            BlockFormat::Q4_1 => (true, false),
            BlockFormat::Q5_0 => (false, true),
            BlockFormat::Q5_1 => (true, true),
            _ => return None,
        };
        let mut at = 2 * QUAD;
        let mins = mins.then(|| {
            at += 2 * QUAD;
            at - 2 * QUAD
        });
        let fifth = fifth.then(|| {
            at += 16;
            at - 16
        });
        Some(Self {
            mins,
            fifth,
            nibbles: at,
            bytes: at + QUAD * 16,
        })
    }
}

/// Groups of a `cols`-wide row that are stored in quads.
pub fn quad_groups(cols: usize) -> usize {
    cols / GROUP / QUAD * QUAD
}

/// Where a block's fields sit in the GGUF layout: (min, fifth bits, nibbles).
fn block_offsets(fields: &QuadFields) -> (usize, usize, usize) {
    let min = 2;
    let fifth = if fields.mins.is_some() { 4 } else { 2 };
    let nibbles = fifth + if fields.fifth.is_some() { 4 } else { 0 };
    (min, fifth, nibbles)
}

/// A GGUF row of `format` (whole blocks) in the quad layout.
///
/// # Panics
/// If `format` has no quad layout or `gguf` is not whole blocks.
pub fn interleave_row(format: BlockFormat, gguf: &[u8], out: &mut Vec<u8>) {
    let fields = QuadFields::of(format).expect("a 32-weight nibble format");
    let block = format.block_bytes();
    assert!(gguf.len().is_multiple_of(block), "whole blocks");
    let (min_at, fifth_at, nibbles_at) = block_offsets(&fields);
    let quads = gguf.len() / block / QUAD;
    for quad in gguf.chunks_exact(block * QUAD).take(quads) {
        let blocks: Vec<&[u8]> = quad.chunks_exact(block).collect();
        for b in &blocks {
            out.extend_from_slice(&b[..2]);
        }
        if fields.mins.is_some() {
            for b in &blocks {
                out.extend_from_slice(&b[min_at..min_at + 2]);
            }
        }
        if fields.fifth.is_some() {
            let (mut first, mut second) = (0u64, 0u64);
            for (k, b) in blocks.iter().enumerate() {
                let bits = u32::from_le_bytes([
                    b[fifth_at],
                    b[fifth_at + 1],
                    b[fifth_at + 2],
                    b[fifth_at + 3],
                ]);
                first |= u64::from(bits & 0xFFFF) << (16 * k);
                second |= u64::from(bits >> 16) << (16 * k);
            }
            out.extend_from_slice(&first.to_le_bytes());
            out.extend_from_slice(&second.to_le_bytes());
        }
        for b in &blocks {
            out.extend_from_slice(&b[nibbles_at..nibbles_at + 16]);
        }
    }
    out.extend_from_slice(&gguf[quads * QUAD * block..]);
}

/// The inverse of [`interleave_row`]: the row's GGUF bytes.
pub fn gguf_row(format: BlockFormat, quads: &[u8], out: &mut Vec<u8>) {
    let fields = QuadFields::of(format).expect("a 32-weight nibble format");
    let block = format.block_bytes();
    assert!(quads.len().is_multiple_of(block), "whole blocks");
    let (min_at, fifth_at, nibbles_at) = block_offsets(&fields);
    let count = quads.len() / block / QUAD;
    let start = out.len();
    out.resize(start + quads.len(), 0);
    let (whole, tail) = out[start..].split_at_mut(count * QUAD * block);
    for (quad, blocks) in quads
        .chunks_exact(fields.bytes)
        .zip(whole.chunks_exact_mut(QUAD * block))
    {
        for (k, b) in blocks.chunks_exact_mut(block).enumerate() {
            b[..2].copy_from_slice(&quad[2 * k..2 * k + 2]);
            if let Some(mins) = fields.mins {
                b[min_at..min_at + 2].copy_from_slice(&quad[mins + 2 * k..mins + 2 * k + 2]);
            }
            if let Some(fifth) = fields.fifth {
                let word =
                    |at: usize| u64::from_le_bytes(quad[at..at + 8].try_into().expect("8 bytes"));
                let first = (word(fifth) >> (16 * k)) as u32 & 0xFFFF;
                let second = (word(fifth + 8) >> (16 * k)) as u32 & 0xFFFF;
                b[fifth_at..fifth_at + 4].copy_from_slice(&(first | second << 16).to_le_bytes());
            }
            let nibbles = fields.nibbles + 16 * k;
            b[nibbles_at..nibbles_at + 16].copy_from_slice(&quad[nibbles..nibbles + 16]);
        }
    }
    tail.copy_from_slice(&quads[count * fields.bytes..]);
}

/// Which weight of a 128-weight unit each activation byte multiplies: a unit
/// is read as two 64-byte vectors of weights (`vpdpbusd` operands).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlaneOrder {
    /// A quad of a nibble format: vector 0 holds weights 0..16 of each of its
    /// four groups (the low nibbles), vector 1 weights 16..32 (the high ones).
    Quads,
    /// Half a Q4_K/Q5_K super-block (64 nibble bytes): vector 0 holds the low
    /// nibbles (groups 0 and 2 of the half), vector 1 the high ones (1 and 3).
    KQuantHalf,
    /// Half a Q6_K super-block: vector 0 holds weights 0..64, vector 1 64..128.
    /// Its activations come with their sums per 16 (the reach of a Q6_K scale).
    Natural,
}

impl PlaneOrder {
    /// The weight (0..128 within the unit) at byte `p` (0..64) of vector `v`.
    fn weight(self, v: usize, p: usize) -> usize {
        match self {
            Self::Quads => p / 16 * GROUP + v * 16 + p % 16,
            Self::KQuantHalf => (2 * (p / GROUP) + v) * GROUP + p % GROUP,
            Self::Natural => v * 64 + p,
        }
    }

    /// The 128-weight units of a `cols`-wide row read in this order.
    fn units(self, cols: usize) -> usize {
        match self {
            Self::Quads => quad_groups(cols) / QUAD,
            Self::KQuantHalf | Self::Natural => cols / (QUAD * GROUP),
        }
    }
}

/// 16-bit activation rows re-laid for the VNNI decode kernels (see the
/// module's doc): [`QUAD_ACTIVATION_BYTES`] per 128-weight unit of each row,
/// the high-byte plane of both vectors, then the low-byte plane.
pub struct QuadActivations {
    bytes: Vec<u8>,
    per_row: usize,
    /// [`PlaneOrder::Natural`]: Σ of each 16 values as multiplied (their group's
    /// scale times the sum of the 16-bit integers), `cols / 16` a row.
    sums16: Vec<f32>,
    cols: usize,
}

impl QuadActivations {
    /// `values`: rows of `cols` 16-bit activations, row-major, with `scales`,
    /// one per 32 values.
    pub fn new(values: &[i16], scales: &[f32], cols: usize, order: PlaneOrder) -> Self {
        let units = order.units(cols);
        let per_row = units * QUAD_ACTIVATION_BYTES;
        let unit = QUAD * GROUP;
        let mut bytes = Vec::with_capacity(values.len() / cols * per_row);
        for row in values.chunks_exact(cols) {
            for unit in row.chunks_exact(unit).take(units) {
                for high in [true, false] {
                    for v in 0..2 {
                        bytes.extend((0..64).map(|p| {
                            let x = unit[order.weight(v, p)];
                            if high {
                                (x >> 8) as u8
                            } else {
                                x as u8
                            }
                        }));
                    }
                }
            }
        }
        let sums16 = match order {
            PlaneOrder::Natural => values
                .chunks_exact(16)
                .zip(scales.iter().flat_map(|&s| [s, s]))
                .map(|(c, s)| s * c.iter().map(|&v| i32::from(v)).sum::<i32>() as f32)
                .collect(),
            _ => Vec::new(),
        };
        Self {
            bytes,
            per_row,
            sums16,
            cols,
        }
    }

    /// The sums per 16 values of activation row `i` ([`PlaneOrder::Natural`];
    /// empty for the other orders).
    pub fn sums16(&self, i: usize) -> &[f32] {
        if self.sums16.is_empty() {
            return &[];
        }
        let n = self.cols / 16;
        &self.sums16[i * n..(i + 1) * n]
    }

    /// The quads of activation row `i`.
    pub fn row(&self, i: usize) -> &[u8] {
        &self.bytes[i * self.per_row..(i + 1) * self.per_row]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_row(format: BlockFormat, blocks: usize, seed: u64) -> Vec<u8> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..blocks * format.block_bytes())
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 33) as u8
            })
            .collect()
    }

    #[test]
    fn quads_are_the_size_of_four_blocks() {
        for format in BlockFormat::ALL {
            match QuadFields::of(format) {
                Some(fields) => assert_eq!(fields.bytes, QUAD * format.block_bytes(), "{format:?}"),
                None => assert!(format.block_weights() != GROUP || format == BlockFormat::Q8_0),
            }
        }
    }

    #[test]
    fn interleaving_is_lossless_with_and_without_a_tail() {
        for format in [
            BlockFormat::Q4_0,
            BlockFormat::Q4_1,
            BlockFormat::Q5_0,
            BlockFormat::Q5_1,
        ] {
            for blocks in [4, 6, 8, 3] {
                let gguf = random_row(format, blocks, blocks as u64);
                let mut quads = Vec::new();
                interleave_row(format, &gguf, &mut quads);
                assert_eq!(quads.len(), gguf.len());
                if blocks >= QUAD {
                    assert_ne!(quads, gguf, "{format:?}: the quads were rearranged");
                }
                let mut back = vec![7u8];
                gguf_row(format, &quads, &mut back);
                assert_eq!(&back[1..], gguf.as_slice(), "{format:?} {blocks} blocks");
            }
        }
    }

    #[test]
    fn a_quad_gathers_its_blocks_fields() {
        // Q5_1: d, m, fifth bits and nibbles of block k land where the kernel reads them.
        let format = BlockFormat::Q5_1;
        let gguf = random_row(format, 4, 9);
        let mut quad = Vec::new();
        interleave_row(format, &gguf, &mut quad);
        let fields = QuadFields::of(format).unwrap();
        for k in 0..QUAD {
            let b = &gguf[k * 24..(k + 1) * 24];
            assert_eq!(&quad[2 * k..2 * k + 2], &b[0..2]);
            let mins = fields.mins.unwrap();
            assert_eq!(&quad[mins + 2 * k..mins + 2 * k + 2], &b[2..4]);
            let bits = u32::from_le_bytes(b[4..8].try_into().unwrap());
            let fifth = fields.fifth.unwrap();
            let first = u64::from_le_bytes(quad[fifth..fifth + 8].try_into().unwrap());
            let second = u64::from_le_bytes(quad[fifth + 8..fifth + 16].try_into().unwrap());
            assert_eq!((first >> (16 * k)) as u32 & 0xFFFF, bits & 0xFFFF);
            assert_eq!((second >> (16 * k)) as u32 & 0xFFFF, bits >> 16);
            let nibbles = fields.nibbles + 16 * k;
            assert_eq!(&quad[nibbles..nibbles + 16], &b[8..24]);
        }
    }

    #[test]
    fn activation_planes_rebuild_every_value() {
        let cols = 6 * GROUP; // one quad and a two-group tail
        let values: Vec<i16> = (0..2 * cols as i32)
            .map(|i| (i.wrapping_mul(2654435761u32 as i32) >> 16) as i16)
            .collect();
        let planes = QuadActivations::new(&values, &[1.0; 12], cols, PlaneOrder::Quads);
        for (r, row) in values.chunks_exact(cols).enumerate() {
            let quad = planes.row(r);
            assert_eq!(quad.len(), QUAD_ACTIVATION_BYTES);
            for k in 0..QUAD {
                for j in 0..GROUP {
                    let (half, within) = (j / 16, j % 16);
                    let at = half * 64 + k * 16 + within;
                    let rebuilt = i16::from(quad[at] as i8) * 256 + i16::from(quad[128 + at]);
                    assert_eq!(rebuilt, row[k * GROUP + j], "row {r} group {k} value {j}");
                }
            }
        }
    }

    #[test]
    fn natural_planes_come_with_sums_per_16() {
        let cols = 256;
        let values: Vec<i16> = (0..cols as i16).map(|i| 1000 - i * 7).collect();
        let scales: Vec<f32> = (0..8).map(|g| 0.5 + g as f32).collect();
        let planes = QuadActivations::new(&values, &scales, cols, PlaneOrder::Natural);
        let row = planes.row(0);
        for (w, &v) in values.iter().enumerate() {
            let (unit, v_in, p) = (w / 128, w % 128 / 64, w % 64);
            let at = unit * QUAD_ACTIVATION_BYTES + v_in * 64 + p;
            assert_eq!(i16::from(row[at] as i8) * 256 + i16::from(row[at + 128]), v);
        }
        for (k, &sum) in planes.sums16(0).iter().enumerate() {
            let want: i32 = values[16 * k..16 * k + 16]
                .iter()
                .map(|&v| i32::from(v))
                .sum();
            assert_eq!(sum, scales[k / 2] * want as f32, "sum {k}");
        }
    }

    #[test]
    fn k_quant_planes_follow_the_nibbles() {
        // Byte p of the low-nibble vector multiplies group 2·(p / 32), weight p % 32;
        // of the high-nibble vector group 2·(p / 32) + 1.
        let cols = 256;
        let values: Vec<i16> = (0..cols as i16).map(|i| i * 3 - 300).collect();
        let planes = QuadActivations::new(&values, &[1.0; 8], cols, PlaneOrder::KQuantHalf);
        let row = planes.row(0);
        assert_eq!(row.len(), 2 * QUAD_ACTIVATION_BYTES);
        for half in 0..2 {
            let unit = &row[half * QUAD_ACTIVATION_BYTES..];
            for v in 0..2 {
                for p in 0..64 {
                    let weight = half * 128 + (2 * (p / 32) + v) * 32 + p % 32;
                    let at = v * 64 + p;
                    let rebuilt = i16::from(unit[at] as i8) * 256 + i16::from(unit[128 + at]);
                    assert_eq!(rebuilt, values[weight], "half {half} vector {v} byte {p}");
                }
            }
        }
    }
}
