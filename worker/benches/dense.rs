//! CPU f32 dense layers: candle's `Linear` (matmul through `gemm`, then the bias added, the
//! engine's path before, and still on GPUs) against `kiln_kernels::dense::linear` (the
//! engine's CPU f32 path now) on SD1.5's UNet and text-encoder shapes.
//!
//! Each round times candle then kiln on the same tensors, so both see the same machine load;
//! prints the median of the rounds per side, GFLOP/s, the speed-up, the largest difference
//! between the two outputs relative to the largest output, and the load average before and
//! after. The thread count is candle's (`RAYON_NUM_THREADS`).
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo bench -p kiln-worker --bench dense --profile release [-- ROUNDS [FILTER]]
//! ```

mod shared;

use shared::{alternate, loadavg, print_header, print_row, relative_diff};

use candle_core::{Device, Module, Tensor};

/// One dense layer of the networks: name, then rows (tokens), inputs, outputs.
type Case = (&'static str, [usize; 3]);

const CASES: [Case; 12] = [
    ("unet attn q/k/v/out 64x64 320", [4096, 320, 320]),
    ("unet GEGLU proj 64x64 320", [4096, 320, 2560]),
    ("unet ff out 64x64 1280->320", [4096, 1280, 320]),
    ("unet cross k/v 77 768->320", [77, 768, 320]),
    ("unet attn q 32x32 640", [1024, 640, 640]),
    ("unet GEGLU proj 32x32 640", [1024, 640, 5120]),
    ("unet attn q 16x16 1280", [256, 1280, 1280]),
    ("unet ff out 8x8 5120->1280", [64, 5120, 1280]),
    ("unet attn q 64x64 320 b2", [8192, 320, 320]),
    ("clip q/k/v/out 77 768", [77, 768, 768]),
    ("clip fc1 77 768->3072", [77, 768, 3072]),
    ("clip fc2 77 3072->768", [77, 3072, 768]),
];

fn run(case: &Case, rounds: usize) -> candle_core::Result<()> {
    let (name, [m, k, n]) = *case;
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1, m, k), &dev)?;
    let w = Tensor::randn(0f32, 1.0 / k as f32, (n, k), &dev)?;
    let b = Tensor::randn(0f32, 1.0, n, &dev)?;
    let layer = candle_nn::Linear::new(w.clone(), Some(b.clone()));
    let (xv, wv, bv) = (
        x.flatten_all()?.to_vec1::<f32>()?,
        w.flatten_all()?.to_vec1::<f32>()?,
        b.to_vec1::<f32>()?,
    );
    let candle = || layer.forward(&x);
    let kiln = || {
        let mut out = vec![0f32; m * n];
        kiln_kernels::dense::linear(&xv, &wv, Some(&bv), k, n, &mut out)
            .map_err(candle_core::Error::wrap)?;
        Ok::<_, candle_core::Error>(out)
    };
    // Warm-up, and the check that both compute the same thing.
    let want = candle()?.flatten_all()?.to_vec1::<f32>()?;
    let got = kiln()?;
    let rel = relative_diff(&want, &got);
    let (mc, mk) = alternate(rounds, candle, kiln)?;
    let flop = 2.0 * (m * n * k) as f64;
    print_row(name, flop, mc, mk, rel);
    Ok(())
}

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = shared::args();
    let rounds = args.first().and_then(|a| a.parse().ok()).unwrap_or(9);
    let filter = args.get(1).cloned().unwrap_or_default();
    println!(
        "threads {}, rounds {rounds}, loadavg {} (before)",
        candle_core::utils::get_num_threads(),
        loadavg()
    );
    print_header();
    for case in CASES.iter().filter(|c| c.0.contains(&filter)) {
        run(case, rounds)?;
    }
    println!("loadavg {} (after)", loadavg());
    Ok(())
}
