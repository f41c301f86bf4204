//! Decode products (one activation row) per GGUF format, as weight bytes read
//! per second: against the machine's streaming bandwidth (a plain sum over the
//! same number of bytes on the same threads) for a matrix far larger than the
//! caches, and for one that stays in L2. Tells whether a format's kernel is
//! bound by memory or by its own instructions.
//!
//!   cargo run --release --example bench_decode -- [MB]   (default 128)

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use claw::model::kernels::{BlockFormat, PackedMatrix};
use claw::model::pool::{HotPool, SharedOut};

fn main() -> Result<()> {
    let megabytes: usize = match std::env::args().nth(1) {
        Some(a) => a.parse().context("MB is a number")?,
        None => 128,
    };
    let pool = HotPool::global();
    println!("{} threads", pool.threads());
    let cols = 1024;
    // The machine's streaming rate over `bytes` bytes, on the pool's threads.
    let stream = |bytes: usize| -> f64 {
        let data = vec![1u64; bytes / 8];
        let tasks = pool.threads() * 8;
        let per = data.len() / tasks;
        let mut sums = vec![0u64; tasks];
        let run = |sums: &mut [u64]| {
            let shared = SharedOut::new(sums);
            pool.run(tasks, &|t| {
                let s: u64 = data[t * per..(t + 1) * per]
                    .iter()
                    .fold(0u64, |a, &b| a.wrapping_add(b));
                // SAFETY: task t writes only element t.
                let slot = unsafe { shared.range(t, t + 1) };
                slot[0] = s;
            });
        };
        time_gbs(bytes, || run(&mut sums))
    };
    println!(
        "streaming sum: {:.1} GB/s ({megabytes} MB), {:.1} GB/s (1 MB)",
        stream(megabytes << 20),
        stream(1 << 20)
    );
    println!(
        "{:<6} {:>14} {:>14}",
        "format", "GB/s (large)", "GB/s (1 MB)"
    );
    for format in BlockFormat::ALL {
        let per_row = cols / format.block_weights() * format.block_bytes();
        let mut rates = Vec::new();
        for bytes in [megabytes << 20, 1 << 20] {
            let rows = bytes / per_row;
            // Quantize one 256-row slab and repeat its bytes: quantizing 100+ MB
            // with candle takes longer than the measurement.
            let slab = 256.min(rows);
            let values: Vec<f32> = (0..slab * cols)
                .map(|i| ((i as f32 * 0.618).sin() * 1.7).fract())
                .collect();
            let w = Tensor::from_vec(values, (slab, cols), &Device::Cpu)?;
            let q = QTensor::quantize(&w, format.ggml())?;
            let slab_bytes = q.data()?.into_owned();
            let data: Vec<u8> = slab_bytes
                .iter()
                .copied()
                .cycle()
                .take(rows * per_row)
                .collect();
            let packed = PackedMatrix::new(format, rows, cols, data)?;
            let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).cos()).collect();
            rates.push(time_gbs(rows * per_row, || {
                std::hint::black_box(packed.matmul(&x, 1));
            }));
        }
        println!(
            "{:<6} {:>14.1} {:>14.1}",
            format!("{format:?}"),
            rates[0],
            rates[1]
        );
    }
    Ok(())
}

/// GB/s of `bytes` per call of `f`: the best of several timed rounds after a
/// warm-up (the best round is the least disturbed by other work).
fn time_gbs(bytes: usize, mut f: impl FnMut()) -> f64 {
    f();
    let reps = (512 << 20) / bytes + 3;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..reps {
            f();
        }
        best = best.min(start.elapsed().as_secs_f64() / reps as f64);
    }
    bytes as f64 / best / 1e9
}
