//! Packed-kernel throughput per format and activation-row count: how much a
//! batch of decode steps (or a short prompt chunk) gains from decoding each
//! weight block once for several rows. Prints ms per product and the cost per
//! activation row relative to one row.
//!
//!   cargo run --release --example bench_matmul -- [ROWS COLS]   (default 4864 896)

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use claw::model::kernels::{BlockFormat, PackedMatrix};

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().context("ROWS and COLS are numbers"))
        .collect::<Result<_>>()?;
    let (rows, cols) = match args.as_slice() {
        [r, c] => (*r, *c),
        _ => (4864, 896),
    };
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| ((i as f32 * 0.618).sin() * 1.7).fract())
        .collect();
    let w = Tensor::from_vec(values, (rows, cols), &Device::Cpu)?;
    println!(
        "weight {rows}x{cols}, {} threads",
        claw::model::pool::HotPool::global().threads()
    );
    println!(
        "{:<6} {:>4} {:>10} {:>12}",
        "format", "m", "ms", "per row vs 1"
    );
    for format in [
        BlockFormat::Q4_0,
        BlockFormat::Q4_1,
        BlockFormat::Q8_0,
        BlockFormat::Q4K,
        BlockFormat::Q6K,
    ] {
        if cols % format.block_weights() != 0 {
            continue;
        }
        let q = QTensor::quantize(&w, format.ggml())?;
        let packed = PackedMatrix::new(format, rows, cols, q.data()?.into_owned())?;
        let mut single = 0.0;
        for m in [1, 2, 4, 8, 16] {
            let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.37).cos()).collect();
            let reps = 200 / m + 5;
            packed.matmul(&x, m);
            let start = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(packed.matmul(&x, m));
            }
            let ms = start.elapsed().as_secs_f64() * 1e3 / reps as f64;
            if m == 1 {
                single = ms;
            }
            println!(
                "{:<6} {m:>4} {ms:>10.3} {:>12.2}",
                format!("{format:?}"),
                ms / m as f64 / single
            );
        }
        // Prompt chunks: the VNNI panel GEMM against expanding the weights to f32
        // for candle's GEMM (what prompts use without VNNI).
        for m in [16, 64, 256, 512] {
            let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.37).cos()).collect();
            let reps = 2048 / m + 2;
            let time = |f: &dyn Fn()| {
                f();
                let start = Instant::now();
                for _ in 0..reps {
                    f();
                }
                start.elapsed().as_secs_f64() * 1e3 / reps as f64
            };
            let dense = time(&|| {
                let w = Tensor::from_vec(packed.to_dense(), (rows, cols), &Device::Cpu).unwrap();
                let xt = Tensor::from_slice(&x, (m, cols), &Device::Cpu).unwrap();
                std::hint::black_box(xt.matmul(&w.t().unwrap()).unwrap());
            });
            if packed.prompt_matmul(&x, m).is_none() {
                println!("{format:?} m={m}: dense {dense:.2} ms (no AVX-512 VNNI)");
                continue;
            }
            let vnni = time(&|| {
                std::hint::black_box(packed.prompt_matmul(&x, m));
            });
            let gmacs = (m * rows * cols) as f64 / vnni / 1e6;
            println!(
                "{:<6} prompt m={m:>3}: vnni {vnni:>8.2} ms ({gmacs:.0} GMAC/s), dense f32 {dense:>8.2} ms, {:.2}x",
                format!("{format:?}"),
                dense / vnni
            );
        }
    }
    Ok(())
}
