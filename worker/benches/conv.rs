//! CPU f32 convolutions: candle's `conv2d` + bias (the engine's path before, and still on GPUs)
//! against `kiln_kernels::conv::conv2d` (the engine's CPU f32 path now) on SD1.5's UNet and VAE
//! shapes.
//!
//! Each round times candle then kiln on the same tensors, so both see the same machine load;
//! prints the median of the rounds per side, GFLOP/s, the speed-up, the largest difference
//! between the two outputs relative to the largest output, and the load average before and
//! after. The thread count is candle's (`RAYON_NUM_THREADS`).
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo bench -p kiln-worker --bench conv --profile dev [-- ROUNDS [FILTER]]
//! ```

mod shared;

use shared::{alternate, loadavg, print_header, print_row, relative_diff};

use candle_core::{Device, Tensor};
use kiln_kernels::conv::{Conv2dGeometry, conv2d};

/// One convolution of the networks: name, then batch, in, height, width, out, kernel, stride,
/// padding.
type Case = (&'static str, [usize; 8]);

const CASES: [Case; 11] = [
    ("unet conv_in 4->320 64x64", [1, 4, 64, 64, 320, 3, 1, 1]),
    ("unet 320->320 3x3 64x64", [1, 320, 64, 64, 320, 3, 1, 1]),
    ("unet 640->640 3x3 32x32", [1, 640, 32, 32, 640, 3, 1, 1]),
    (
        "unet 1280->1280 3x3 16x16",
        [1, 1280, 16, 16, 1280, 3, 1, 1],
    ),
    ("unet 2560->1280 3x3 8x8", [1, 2560, 8, 8, 1280, 3, 1, 1]),
    ("unet 640->320 1x1 64x64", [1, 640, 64, 64, 320, 1, 1, 0]),
    ("unet 320->320 1x1 64x64 b2", [2, 320, 64, 64, 320, 1, 1, 0]),
    ("unet down 320 3x3/2 64x64", [1, 320, 64, 64, 320, 3, 2, 1]),
    ("unet 320->320 3x3 64x64 b2", [2, 320, 64, 64, 320, 3, 1, 1]),
    ("vae 256->256 3x3 256x256", [1, 256, 256, 256, 256, 3, 1, 1]),
    ("vae 128->128 3x3 512x512", [1, 128, 512, 512, 128, 3, 1, 1]),
];

fn run(case: &Case, rounds: usize, threads: usize) -> candle_core::Result<()> {
    let (name, [b, c, h, w, o, k, s, p]) = *case;
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?;
    let wt = Tensor::randn(0f32, 1.0 / (c * k * k) as f32, (o, c, k, k), &dev)?;
    let bias = Tensor::randn(0f32, 1.0, o, &dev)?;
    let bias4 = bias.reshape((1, o, 1, 1))?;
    let (xv, wv, bv) = (
        x.flatten_all()?.to_vec1::<f32>()?,
        wt.flatten_all()?.to_vec1::<f32>()?,
        bias.to_vec1::<f32>()?,
    );
    let g = Conv2dGeometry {
        batch: b,
        in_channels: c,
        height: h,
        width: w,
        out_channels: o,
        kernel: k,
        stride: s,
        padding: p,
    };
    let strides = [c * h * w, h * w, w, 1];
    let candle = || x.conv2d(&wt, p, s, 1, 1)?.broadcast_add(&bias4);
    let kiln =
        || conv2d(&xv, strides, &wv, Some(&bv), &g, threads).map_err(candle_core::Error::wrap);
    // Warm-up, and the check that both compute the same thing.
    let want = candle()?.flatten_all()?.to_vec1::<f32>()?;
    let got = kiln()?;
    let rel = relative_diff(&want, &got);
    let (mc, mk) = alternate(rounds, candle, kiln)?;
    let flop = 2.0 * (o * c * k * k * g.out_height() * g.out_width() * b) as f64;
    print_row(name, flop, mc, mk, rel);
    Ok(())
}

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = shared::args();
    let rounds = args.first().and_then(|a| a.parse().ok()).unwrap_or(5);
    let filter = args.get(1).cloned().unwrap_or_default();
    let threads = candle_core::utils::get_num_threads();
    println!(
        "threads {threads}, rounds {rounds}, loadavg {} (before)",
        loadavg()
    );
    print_header();
    for case in CASES.iter().filter(|c| c.0.contains(&filter)) {
        run(case, rounds, threads)?;
    }
    println!("loadavg {} (after)", loadavg());
    Ok(())
}
