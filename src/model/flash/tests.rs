use super::*;

#[test]
fn exp_matches_libm() {
    let mut worst = 0f32;
    for i in 0..=200_000 {
        let x = -87.0 + i as f32 * (87.0 + 88.0) / 200_000.0;
        let (got, want) = (exp(x), x.exp());
        worst = worst.max(((got - want) / want).abs());
    }
    assert!(worst < 4e-7, "max relative error {worst}");
    assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp(-100.0), 0.0);
    assert_eq!(exp(0.0), 1.0);
}

/// Deterministic values in about [-1.5, 1.5].
fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 12.9898 + seed as f32 * 78.233).sin() * 43758.547).fract() * 3.0)
        .collect()
}

/// The textbook computation in f64: softmax over every visible key.
fn reference(q: &[f32], keys: &[f32], values: &[f32], shape: Heads, offset: usize) -> Vec<f32> {
    let Heads {
        heads,
        kv_heads,
        dim,
    } = shape;
    let seq = q.len() / (heads * dim);
    let group = heads / kv_heads;
    let mut out = vec![0f32; seq * heads * dim];
    for h in 0..heads {
        let kh = h / group;
        for i in 0..seq {
            let qi = &q[(h * seq + i) * dim..][..dim];
            let visible = offset + i + 1;
            let scores: Vec<f64> = (0..visible)
                .map(|t| {
                    let k = &keys[(t * kv_heads + kh) * dim..][..dim];
                    qi.iter().zip(k).map(|(a, b)| f64::from(a * b)).sum::<f64>()
                        / (dim as f64).sqrt()
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for d in 0..dim {
                let v: f64 = (0..visible)
                    .map(|t| weights[t] * f64::from(values[(t * kv_heads + kh) * dim + d]))
                    .sum();
                out[i * heads * dim + h * dim + d] = (v / total) as f32;
            }
        }
    }
    out
}

/// The levels this CPU runs.
fn levels() -> Vec<Level> {
    [Level::Portable, Level::Avx2, Level::Avx512]
        .into_iter()
        .filter(|&l| l <= best_level())
        .collect()
}

#[test]
fn matches_the_textbook_softmax_with_and_without_a_cached_prefix() {
    // Head sizes of one AVX2 vector, one and several AVX-512 tiles (the
    // register transpose of whole key blocks), and one no vector fits.
    let shapes = [(6, 2, 16), (4, 1, 64), (2, 2, 128), (3, 3, 8), (2, 1, 12)];
    // Cached prefixes shorter and longer than a key block, partial blocks,
    // query blocks that straddle a key block.
    let cases = [
        (0, 1),
        (0, 37),
        (5, 20),
        (60, 20),
        (70, 3),
        (130, 40),
        (0, 150),
    ];
    for (heads, kv_heads, dim) in shapes {
        let shape = Heads {
            heads,
            kv_heads,
            dim,
        };
        for (offset, seq) in cases {
            let total = offset + seq;
            let q = values(heads * seq * dim, 1);
            let keys = values(total * kv_heads * dim, 2);
            let vals = values(total * kv_heads * dim, 3);
            let want = reference(&q, &keys, &vals, shape, offset);
            for level in levels() {
                let one = [Sequence {
                    q: &q,
                    keys: &keys,
                    values: &vals,
                    offset,
                }];
                let got = batch_at(&one, shape, level);
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst < 2e-5,
                    "{level:?} {shape:?}, offset {offset}, seq {seq}: max |gap| {worst}"
                );
            }
        }
    }
}

#[test]
fn a_row_gets_the_same_bits_in_any_chunking() {
    // The prefix cache relies on it: a prompt read as 150 rows at once or as
    // 100 + 50 after a cache hit attends identically, and so does a decode
    // step (one row) at the same position.
    for dim in [8, 64] {
        let shape = Heads {
            heads: 4,
            kv_heads: 1,
            dim,
        };
        let total = 150;
        let q = values(shape.heads * total * dim, 4);
        let keys = values(total * dim, 5);
        let vals = values(total * dim, 6);
        let head_rows = |from: usize, to: usize| -> Vec<f32> {
            (0..shape.heads)
                .flat_map(|h| q[(h * total + from) * dim..(h * total + to) * dim].to_vec())
                .collect()
        };
        for level in levels() {
            let run = |from: usize, to: usize| {
                let rows = head_rows(from, to);
                let one = [Sequence {
                    q: &rows,
                    keys: &keys,
                    values: &vals,
                    offset: from,
                }];
                batch_at(&one, shape, level)
            };
            let whole = run(0, total);
            let split: Vec<f32> = run(0, 100).into_iter().chain(run(100, 150)).collect();
            let width = shape.heads * dim;
            for (i, (a, b)) in whole.chunks(width).zip(split.chunks(width)).enumerate() {
                assert!(a == b, "{level:?} dim {dim} row {i}: {a:?} vs {b:?}");
            }
            for position in [0, 63, 64, 149] {
                let step = run(position, position + 1);
                let row = &whole[position * width..(position + 1) * width];
                assert_eq!(step, row, "{level:?} dim {dim}: decode at {position}");
            }
        }
    }
}
