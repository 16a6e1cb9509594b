//! Throughput of the packed (quantized) matrix products on random weights
//! shaped like SmolLM2-135M's layers: `cargo run --release --example
//! packed_matvec -p silk-inference [-- ROWS_IN_BATCH...]`, on the kernels
//! `SILK_CPU_KERNELS` names (the widest this CPU runs by default).

use std::time::Instant;

use silk_inference::packed::{Activations, BlockFormat, PackedMatrix, BLOCK};
use silk_inference::CpuKernels;

fn random_bytes(len: usize, seed: &mut u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *seed as u8
        })
        .collect()
}

fn matrix(rows: usize, cols: usize, seed: &mut u64) -> PackedMatrix {
    let format = BlockFormat::Q4_1;
    let mut data = random_bytes(rows * cols / BLOCK * format.block_bytes(), seed);
    // Sane f16 scales (0.01) and minimums (-0.05) in every block.
    for block in data.chunks_exact_mut(format.block_bytes()) {
        block[..2].copy_from_slice(&0x211Fu16.to_le_bytes());
        block[2..4].copy_from_slice(&0xAA66u16.to_le_bytes());
    }
    PackedMatrix::new(format, rows, cols, data).expect("shape")
}

fn main() {
    let batches: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("batch size"))
        .collect();
    let batches = if batches.is_empty() {
        vec![1, 32]
    } else {
        batches
    };
    let kernels = CpuKernels::from_env().unwrap_or_else(|e| panic!("{e}"));
    println!("kernels: {kernels}");
    let mut seed = 0x9E37_79B9_7F4A_7C15;
    let (hidden, inter, kv) = (576, 1536, 192);
    let layers: Vec<[PackedMatrix; 4]> = (0..30)
        .map(|_| {
            [
                matrix(hidden + 2 * kv, hidden, &mut seed),
                matrix(hidden, hidden, &mut seed),
                matrix(2 * inter, hidden, &mut seed),
                matrix(hidden, inter, &mut seed),
            ]
        })
        .collect();
    let weights: usize = layers.iter().flatten().map(|m| m.rows() * m.cols()).sum();
    for n in batches {
        let x_h = vec![0.5f32; n * hidden];
        let x_i = vec![0.25f32; n * inter];
        let mut best = f64::MAX;
        for _ in 0..10 {
            let start = Instant::now();
            for [qkv, o, gate_up, down] in &layers {
                std::hint::black_box(qkv.matmul(&x_h, n, Activations::Int8, kernels));
                std::hint::black_box(o.matmul(&x_h, n, Activations::Int8, kernels));
                std::hint::black_box(gate_up.matmul(&x_h, n, Activations::Int8, kernels));
                std::hint::black_box(down.matmul(&x_i, n, Activations::Int8, kernels));
            }
            best = best.min(start.elapsed().as_secs_f64());
        }
        let bytes = weights as f64 * 20.0 / 32.0;
        println!(
            "n={n}: {:.2} ms per pass over {:.0} M weights ({:.1} GB/s of blocks, {:.1} GFLOP/s)",
            best * 1e3,
            weights as f64 / 1e6,
            bytes / best / 1e9,
            2.0 * weights as f64 * n as f64 / best / 1e9
        );
    }
}
