//! Causal attention for inference, straight on a KV cache's vectors, in the
//! blocked online-softmax form of FlashAttention: no (rows × positions) score
//! matrix is ever written out.
//!
//! Why: a prompt chunk of 512 rows after 10,000 cached positions made candle
//! materialise, scale, mask and softmax a 7×512 × 10,000 score tensor per KV
//! head and layer (~290 MB, four passes over it, one scalar `exp` per element):
//! on Qwen2.5-0.5B that was ~70% of a 10k-token prefill. Here each task holds a
//! block of query rows and walks the keys in blocks of [`KEY_BLOCK`], keeping a
//! running max, sum and output per row; keys past a row's position are skipped
//! or masked, never computed into the result.
//!
//! A row's result depends only on its absolute position and the cached keys and
//! values: key blocks start at absolute multiples of [`KEY_BLOCK`] and every row
//! runs the same operations in the same order whichever query block, chunk or
//! batch it is in. So a prompt read in one chunk or in several (a prefix-cache
//! hit, a long prompt) gets the same bits.
//!
//! The arithmetic is one generic body over a few vector operations ([`Lanes`]):
//! score and value tiles of 4 query rows × 4 vectors of accumulators that stay
//! in registers, instantiated for AVX-512 (16 lanes), AVX2 + FMA (8 lanes) and a
//! portable scalar fallback, picked at run time. The exponential is a
//! polynomial ([`exp`]) that LLVM vectorises. On Qwen2.5-0.5B's 2,781-token
//! prompt this took attention from ~35% of the prefill to ~17% (perf).

use super::pool::{HotPool, SharedOut};

/// Keys per block of the online softmax.
pub const KEY_BLOCK: usize = 64;
/// Query positions per task (times the query heads sharing a KV head).
const QUERY_BLOCK: usize = 16;

/// The shape of an attention layer.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub dim: usize,
}

impl Heads {
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// Causal attention of `seq` query rows at positions `offset..offset + seq`
/// over the keys and values of positions `0..offset + seq`.
///
/// `q` is head-major (heads, seq, dim) with RoPE applied; `keys` and `values`
/// are position-major (positions, kv_heads·dim), a KV cache's layout, holding
/// at least `offset + seq` positions (later ones are not read). Returns the
/// attended rows (seq, heads·dim), the input of the output projection.
pub fn causal_attention(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    shape: Heads,
    offset: usize,
) -> Vec<f32> {
    causal_attention_batch(
        &[Sequence {
            q,
            keys,
            values,
            offset,
        }],
        shape,
    )
}

/// One sequence's part of [`causal_attention_batch`]: the arguments of
/// [`causal_attention`].
#[derive(Clone, Copy)]
pub struct Sequence<'a> {
    pub q: &'a [f32],
    pub keys: &'a [f32],
    pub values: &'a [f32],
    pub offset: usize,
}

/// [`causal_attention`] of several sequences in one parallel job (a batch of
/// decode steps): their attended rows one after the other.
pub fn causal_attention_batch(sequences: &[Sequence], shape: Heads) -> Vec<f32> {
    batch_at(sequences, shape, best_level())
}

/// [`causal_attention_batch`] with the tiles of `level` (at most
/// [`best_level`]).
fn batch_at(sequences: &[Sequence], shape: Heads, level: Level) -> Vec<f32> {
    assert!(
        level <= best_level(),
        "{level:?} is not available on this CPU"
    );
    let Heads {
        heads,
        kv_heads,
        dim,
    } = shape;
    assert!(
        kv_heads > 0 && heads.is_multiple_of(kv_heads) && dim > 0,
        "{heads} heads over {kv_heads} KV heads of {dim}"
    );
    let kv_width = kv_heads * dim;
    let width = shape.group() * dim;
    // (sequence, its rows' first output row, KV head, query block) per task.
    let mut tasks = Vec::new();
    let mut rows_before = 0;
    let mut work = 0;
    for (index, s) in sequences.iter().enumerate() {
        let seq = s.q.len() / (heads * dim);
        assert_eq!(s.q.len(), seq * heads * dim, "q is not (heads, seq, dim)");
        let total = s.offset + seq;
        assert!(
            s.keys.len() >= total * kv_width && s.values.len() >= total * kv_width,
            "{total} positions need {} keys and values, got {} and {}",
            total * kv_width,
            s.keys.len(),
            s.values.len()
        );
        for kh in 0..kv_heads {
            for block in 0..seq.div_ceil(QUERY_BLOCK) {
                tasks.push((index, rows_before, kh, block));
            }
        }
        rows_before += seq;
        work += seq * total * heads * dim;
    }
    let mut out = vec![0f32; rows_before * heads * dim];
    let shared = SharedOut::new(&mut out);
    let task = |t: usize| {
        let (index, rows_before, kh, block) = tasks[t];
        let s = &sequences[index];
        let seq = s.q.len() / (heads * dim);
        let first = block * QUERY_BLOCK;
        let rows = (seq - first).min(QUERY_BLOCK);
        let input = TaskInput {
            q: s.q,
            keys: s.keys,
            values: s.values,
            shape,
            offset: s.offset,
            seq,
            kh,
            first,
            rows,
            level,
        };
        let mut attended = vec![0f32; rows * width];
        run_task(&input, &mut attended);
        for (i, row) in attended.chunks_exact(width).enumerate() {
            let start = (rows_before + first + i) * heads * dim + kh * width;
            // SAFETY: task (sequence, kh, block) alone writes the columns of KV
            // head kh's query heads in its own rows; the ranges of different
            // tasks are disjoint and inside `out`, which outlives the job.
            unsafe { shared.range(start, start + width) }.copy_from_slice(row);
        }
    };
    // Short contexts are cheaper on one thread than a pool wake-up.
    if work >= 1 << 18 {
        HotPool::global().run(tasks.len(), &task);
    } else {
        (0..tasks.len()).for_each(task);
    }
    out
}

/// What one task reads: KV head `kh`, query positions `first..first + rows`.
struct TaskInput<'a> {
    q: &'a [f32],
    keys: &'a [f32],
    values: &'a [f32],
    shape: Heads,
    offset: usize,
    seq: usize,
    kh: usize,
    first: usize,
    rows: usize,
    level: Level,
}

/// Which compilation of the tiles runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Portable,
    Avx2,
    Avx512,
}

/// The widest level this CPU runs.
fn best_level() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static LEVEL: OnceLock<Level> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            let avx2 =
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
            match (avx2, std::is_x86_feature_detected!("avx512f")) {
                (true, true) => Level::Avx512,
                (true, false) => Level::Avx2,
                _ => Level::Portable,
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    Level::Portable
}

/// The task at its input's level, or the next one down that takes its head
/// dimension (the tiles need whole vectors of a head).
fn run_task(input: &TaskInput, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        let dim = input.shape.dim;
        // SAFETY: `input.level` is at most `best_level()`, so each wrapper
        // only enables features the CPU was found to have.
        unsafe {
            match input.level {
                Level::Avx512 if dim.is_multiple_of(x86::Avx512::LANES) => {
                    return x86::task_avx512(input, out)
                }
                Level::Avx512 | Level::Avx2 if dim.is_multiple_of(x86::Avx2::LANES) => {
                    return x86::task_avx2(input, out)
                }
                _ => {}
            }
        }
    }
    // SAFETY: the portable lanes need no CPU feature and take any dimension.
    unsafe { task_body::<Portable, 1>(input, out) }
}

/// The few vector operations the tiles need, on `LANES` f32 lanes.
///
/// # Safety
/// Implementations may require CPU features: only call them from code that
/// checked those features (the `x86` wrappers).
trait Lanes {
    const LANES: usize;
    type V: Copy;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    unsafe fn splat(x: f32) -> Self::V;
    /// `a·b + c`, fused.
    unsafe fn madd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;

    /// A whole block of keys transposed: `kt[d · KEY_BLOCK + j]` = dimension d
    /// of key j, where key j's `dim` values start at `keys + j · stride`.
    #[inline(always)]
    unsafe fn transpose_keys(keys: *const f32, stride: usize, dim: usize, kt: &mut [f32]) {
        for j in 0..KEY_BLOCK {
            let key = keys.add(j * stride);
            for d in 0..dim {
                *kt.get_unchecked_mut(d * KEY_BLOCK + j) = *key.add(d);
            }
        }
    }
}

/// One lane, no fusing: any CPU.
struct Portable;

impl Lanes for Portable {
    const LANES: usize = 1;
    type V = f32;
    #[inline(always)]
    unsafe fn load(p: *const f32) -> f32 {
        *p
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: f32) {
        *p = v
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    unsafe fn madd(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{task_body, Lanes, TaskInput};

    pub struct Avx512;
    pub struct Avx2;

    impl Lanes for Avx512 {
        const LANES: usize = 16;
        type V = __m512;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn madd(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }

        /// 16 × 16 tiles transposed in registers: element by element, LLVM
        /// made 64-bit-indexed gathers of it, half of a decode step's
        /// attention at 2,800 positions.
        #[inline(always)]
        unsafe fn transpose_keys(keys: *const f32, stride: usize, dim: usize, kt: &mut [f32]) {
            debug_assert!(dim.is_multiple_of(16) && kt.len() >= dim * super::KEY_BLOCK);
            for j0 in (0..super::KEY_BLOCK).step_by(16) {
                for d0 in (0..dim).step_by(16) {
                    let rows: [__m512; 16] =
                        std::array::from_fn(|j| _mm512_loadu_ps(keys.add((j0 + j) * stride + d0)));
                    let columns = transpose16(rows);
                    for (d, column) in columns.iter().enumerate() {
                        let at = kt.as_mut_ptr().add((d0 + d) * super::KEY_BLOCK + j0);
                        _mm512_storeu_ps(at, *column);
                    }
                }
            }
        }
    }

    /// The transpose of 16 rows of 16 floats: element d of row j becomes
    /// element j of row d.
    #[inline(always)]
    unsafe fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        // Pairs of rows interleaved by 32-bit, then 64-bit elements: each
        // 128-bit lane of t[4k + i] holds a 4 × 4 block's column.
        let mut a = [_mm512_setzero_ps(); 16];
        for k in 0..8 {
            a[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
            a[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
        }
        let mut b = [_mm512_setzero_ps(); 16];
        for k in 0..4 {
            let (x0, x1, y0, y1) = (a[4 * k], a[4 * k + 1], a[4 * k + 2], a[4 * k + 3]);
            b[4 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(
                _mm512_castps_pd(x0),
                _mm512_castps_pd(y0),
            ));
            b[4 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(
                _mm512_castps_pd(x0),
                _mm512_castps_pd(y0),
            ));
            b[4 * k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(
                _mm512_castps_pd(x1),
                _mm512_castps_pd(y1),
            ));
            b[4 * k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(
                _mm512_castps_pd(x1),
                _mm512_castps_pd(y1),
            ));
        }
        // b[4k + i], lane l: rows 4k..4k + 4, column 4l + i. Gather the 128-bit
        // lanes: first across row groups (0,1) and (2,3), then across pairs.
        let mut c = [_mm512_setzero_ps(); 16];
        for i in 0..4 {
            c[i] = _mm512_shuffle_f32x4::<0x88>(b[i], b[4 + i]);
            c[4 + i] = _mm512_shuffle_f32x4::<0xdd>(b[i], b[4 + i]);
            c[8 + i] = _mm512_shuffle_f32x4::<0x88>(b[8 + i], b[12 + i]);
            c[12 + i] = _mm512_shuffle_f32x4::<0xdd>(b[8 + i], b[12 + i]);
        }
        let mut out = [_mm512_setzero_ps(); 16];
        for i in 0..4 {
            out[i] = _mm512_shuffle_f32x4::<0x88>(c[i], c[8 + i]);
            out[8 + i] = _mm512_shuffle_f32x4::<0xdd>(c[i], c[8 + i]);
            out[4 + i] = _mm512_shuffle_f32x4::<0x88>(c[4 + i], c[12 + i]);
            out[12 + i] = _mm512_shuffle_f32x4::<0xdd>(c[4 + i], c[12 + i]);
        }
        out
    }

    impl Lanes for Avx2 {
        const LANES: usize = 8;
        type V = __m256;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn madd(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
    }

    /// # Safety
    /// The CPU must have AVX-512 F, AVX2 and FMA; the head dimension must be a
    /// multiple of 16.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn task_avx512(input: &TaskInput, out: &mut [f32]) {
        task_body::<Avx512, 4>(input, out)
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA; the head dimension must be a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn task_avx2(input: &TaskInput, out: &mut [f32]) {
        task_body::<Avx2, 2>(input, out)
    }
}

/// Vectors of `L` per pass of a tile over its columns: `R` rows times this
/// many accumulators stay in registers.
const VECTORS: usize = 4;

/// Scores of `R` query rows against a block of keys: `s[r][j] = q_r · k_j` for
/// the [`KEY_BLOCK`] keys of `kt`, transposed (dim, KEY_BLOCK). Each score is a
/// chain of fused multiply-adds over the head's dimensions in order, whatever
/// `R` or `L` (row-independent bits).
///
/// # Safety
/// `L`'s features must be present; `queries[r]` and `kt` hold `dim` and
/// `dim · KEY_BLOCK` values.
#[inline(always)]
unsafe fn score_tile<L: Lanes, const R: usize>(
    queries: [&[f32]; R],
    kt: &[f32],
    dim: usize,
    s: &mut [[f32; KEY_BLOCK]; R],
) {
    let width = VECTORS * L::LANES;
    for c in (0..KEY_BLOCK).step_by(width) {
        let mut acc = [[L::splat(0.0); VECTORS]; R];
        for d in 0..dim {
            let k = kt.as_ptr().add(d * KEY_BLOCK + c);
            let keys: [L::V; VECTORS] = std::array::from_fn(|v| L::load(k.add(v * L::LANES)));
            for (row, query) in acc.iter_mut().zip(&queries) {
                let q = L::splat(*query.get_unchecked(d));
                for (a, k) in row.iter_mut().zip(&keys) {
                    *a = L::madd(q, *k, *a);
                }
            }
        }
        for (row, scores) in acc.iter().zip(s.iter_mut()) {
            for (v, a) in row.iter().enumerate() {
                L::store(scores.as_mut_ptr().add(c + v * L::LANES), *a);
            }
        }
    }
}

/// `o_r += Σ_j p[r][j] · v_j` over the first `keys` keys of a block of values
/// (`values[j · stride..][..dim]` is key j's), for `R` output rows. Each output
/// is a chain of fused multiply-adds over the keys in order (a row's zero
/// weights past its own visible keys add exact zeros), whatever `R` or `L`.
///
/// # Safety
/// As [`score_tile`]; `values` holds `keys` rows; each `o[r]` holds `dim`
/// values, a multiple of `L::LANES`.
#[inline(always)]
unsafe fn value_tile<L: Lanes, const R: usize>(
    p: [&[f32; KEY_BLOCK]; R],
    values: &[f32],
    stride: usize,
    dim: usize,
    keys: usize,
    o: [&mut [f32]; R],
) {
    debug_assert!(keys == 0 || values.len() >= (keys - 1) * stride + dim);
    let mut c = 0;
    while c < dim {
        let vectors = ((dim - c) / L::LANES).min(VECTORS);
        macro_rules! pass {
            ($n:literal) => {{
                let mut acc: [[L::V; $n]; R] = std::array::from_fn(|r| {
                    std::array::from_fn(|v| L::load(o[r].as_ptr().add(c + v * L::LANES)))
                });
                for j in 0..keys {
                    let at = values.as_ptr().add(j * stride + c);
                    let values: [L::V; $n] = std::array::from_fn(|v| L::load(at.add(v * L::LANES)));
                    for r in 0..R {
                        let w = L::splat(*p[r].get_unchecked(j));
                        for v in 0..$n {
                            acc[r][v] = L::madd(w, values[v], acc[r][v]);
                        }
                    }
                }
                for r in 0..R {
                    for v in 0..$n {
                        L::store(o[r].as_ptr().add(c + v * L::LANES) as *mut f32, acc[r][v]);
                    }
                }
            }};
        }
        match vectors {
            4 => pass!(4),
            3 => pass!(3),
            2 => pass!(2),
            _ => pass!(1),
        }
        c += vectors * L::LANES;
    }
}

/// The online softmax of one task: rows ordered position-major (row
/// `i·group + g` is query head `kh·group + g` at position `first + i`), taken
/// `R` at a time through the tiles.
///
/// # Safety
/// `L`'s features must be present and the head dimension a multiple of
/// `L::LANES`.
#[inline(always)]
unsafe fn task_body<L: Lanes, const R: usize>(input: &TaskInput, out: &mut [f32]) {
    let TaskInput {
        q,
        keys,
        values,
        shape,
        offset,
        seq,
        kh,
        first,
        rows,
        level: _,
    } = *input;
    let (dim, group) = (shape.dim, shape.group());
    let kv_width = shape.kv_heads * dim;
    let scale = 1.0 / (dim as f32).sqrt();
    let n = rows * group;
    // The block's query rows, pre-scaled by 1/√d.
    let mut queries = vec![0f32; n * dim];
    for i in 0..rows {
        for g in 0..group {
            let h = kh * group + g;
            let src = &q[(h * seq + first + i) * dim..][..dim];
            let dst = &mut queries[(i * group + g) * dim..][..dim];
            dst.iter_mut().zip(src).for_each(|(d, s)| *d = s * scale);
        }
    }
    let position = |r: usize| offset + first + r / group;
    let mut max = vec![f32::NEG_INFINITY; n];
    let mut sum = vec![0f32; n];
    out.fill(0.0);
    // A block's keys, transposed (dim, KEY_BLOCK).
    let mut kt = vec![0f32; dim * KEY_BLOCK];
    let mut s = [[0f32; KEY_BLOCK]; R];
    let mut p = [[0f32; KEY_BLOCK]; R];
    let last_position = offset + first + rows - 1;
    for block_start in (0..=last_position).step_by(KEY_BLOCK) {
        let present = (last_position + 1 - block_start).min(KEY_BLOCK);
        // Keys transposed so a score tile reads KEY_BLOCK of them per dimension
        // (zeros past the last present position); values are read in place.
        let base = block_start * kv_width + kh * dim;
        if present == KEY_BLOCK {
            L::transpose_keys(keys.as_ptr().add(base), kv_width, dim, &mut kt);
        } else {
            for d in 0..dim {
                let row = &mut kt[d * KEY_BLOCK..][..KEY_BLOCK];
                for (j, slot) in row[..present].iter_mut().enumerate() {
                    // SAFETY: positions block_start..block_start + present
                    // exist (checked against `keys.len()` by the caller).
                    *slot = *keys.get_unchecked(base + j * kv_width + d);
                }
                row[present..].fill(0.0);
            }
        }
        let block_values = &values[base..base + (present - 1) * kv_width + dim];
        // The first row that sees this block; rows are in position order.
        let start = (0..n).find(|&r| position(r) >= block_start).unwrap_or(n);
        let mut r0 = start;
        while r0 < n {
            let tile = (n - r0).min(R);
            // Keys each row of the tile may see in the block (0 for a row before it).
            let visible: [usize; R] = std::array::from_fn(|t| {
                let r = (r0 + t).min(n - 1);
                (position(r) + 1).saturating_sub(block_start).min(KEY_BLOCK)
            });
            if tile == R {
                let qs: [&[f32]; R] = std::array::from_fn(|t| &queries[(r0 + t) * dim..][..dim]);
                score_tile::<L, R>(qs, &kt, dim, &mut s);
            } else {
                for t in 0..tile {
                    let one: &mut [[f32; KEY_BLOCK]; 1] =
                        (&mut s[t..t + 1]).try_into().expect("one row");
                    score_tile::<L, 1>([&queries[(r0 + t) * dim..][..dim]], &kt, dim, one);
                }
            }
            for t in 0..tile {
                let r = r0 + t;
                let seen = visible[t];
                let block_max = s[t][..seen]
                    .iter()
                    .copied()
                    .fold(f32::NEG_INFINITY, f32::max);
                let new_max = max[r].max(block_max);
                let correction = exp(max[r] - new_max);
                max[r] = new_max;
                for j in 0..KEY_BLOCK {
                    let e = exp(s[t][j] - new_max);
                    p[t][j] = if j < seen { e } else { 0.0 };
                }
                let mut block_sum = 0f32;
                for &pj in &p[t] {
                    block_sum += pj;
                }
                sum[r] = sum[r] * correction + block_sum;
                out[r * dim..][..dim]
                    .iter_mut()
                    .for_each(|v| *v *= correction);
            }
            let keys_here = visible[..tile].iter().copied().max().unwrap_or(0);
            let (_, rest) = out.split_at_mut(r0 * dim);
            if tile == R {
                let mut rows_out = rest.chunks_exact_mut(dim);
                let os: [&mut [f32]; R] = std::array::from_fn(|_| rows_out.next().expect("R rows"));
                let ps: [&[f32; KEY_BLOCK]; R] = std::array::from_fn(|t| &p[t]);
                value_tile::<L, R>(ps, block_values, kv_width, dim, keys_here, os);
            } else {
                for (t, o) in rest.chunks_exact_mut(dim).take(tile).enumerate() {
                    value_tile::<L, 1>([&p[t]], block_values, kv_width, dim, visible[t], [o]);
                }
            }
            r0 += tile;
        }
    }
    for (o, &total) in out.chunks_exact_mut(dim).zip(&sum) {
        let inv = 1.0 / total;
        o.iter_mut().for_each(|v| *v *= inv);
    }
}

/// e^x to about 2 ulp, in a form LLVM vectorises (no libm call): x = n·ln2 + r
/// with |r| ≤ ln2/2, a degree-7 polynomial for e^r, and 2^n built in the
/// exponent bits. Inputs below -87.3 (e^x under f32's normal range, -∞
/// included) give 0; the attention only ever passes x ≤ 0.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5·2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let underflow = x < -87.3;
    let x = x.clamp(-87.3, 88.7);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    // Cephes' expf coefficients.
    let p = 1.0
        + r
        + r * r
            * (0.5
                + r * (1.666_666_5e-1
                    + r * (4.166_579_6e-2
                        + r * (8.333_452e-3 + r * (1.398_2e-3 + r * 1.987_569_2e-4)))));
    let exponent = (shifted.to_bits() as i32).wrapping_sub(0x4B40_0000) + 127;
    let value = p * f32::from_bits((exponent << 23) as u32);
    if underflow {
        0.0
    } else {
        value
    }
}

#[cfg(test)]
mod tests;
