//! Thumbnail benchmark (not a test): what a gallery page of 100 thumbnails weighs, and how long
//! making them takes, for 512×512 renders (issue 17: "thumbnail bytes per page under 1.5 MB").
//!
//! No Stable Diffusion renders are at hand, so the images are synthetic and deterministic:
//! - **natural**: 100 images of fractal value noise (fBm: 7 octaves of smoothstep-interpolated
//!   lattice noise from a 4×4 grid up, each octave's amplitude the previous one's times a
//!   persistence), so that, as in photographs and renders, amplitude falls with frequency. Each
//!   image has its own seed, two colours blended by one noise field, a second field shading it
//!   (light and shadow), a vertical gradient (a sky-to-ground wash), and per-pixel grain of
//!   ±`grain` levels (the fine texture of a VAE decode). Persistence runs from 0.45 (soft) to
//!   0.75 (busy, like foliage or fur) and grain from 0 to 6 across the 100, so the set spans
//!   smooth to detailed.
//! - **noise**: 100 images of uniform random RGB per pixel, the worst case for any codec (no
//!   render looks like it).
//!
//! Each PNG goes through [`Thumbs::get`] (decode, Catmull-Rom to 256×256, JPEG quality 80,
//! written to the cache), as `/thumbs/{cell}` does on a miss; the bench reports the PNG and
//! JPEG bytes of the 100 and the time to make them, at most two at a time as the server does.
//!
//! Run: `cargo bench -p kiln-coordinator --bench thumbs --profile dev` (`-- DIR` also writes
//! the first images of each set there, to look at).

use std::io::Cursor;
use std::sync::Arc;
use std::time::Instant;

use image::{ImageFormat, Rgb, RgbImage};
use kiln_coordinator::web::Thumbs;
use sha2::{Digest, Sha256};

/// Thumbnails per gallery page.
const PAGE: u64 = 100;
/// Side of a render.
const SIDE: u32 = 512;
/// The goal for a page's thumbnails, in bytes.
const GOAL: usize = 1_500_000;

/// A 64-bit hash of `v` (splitmix64's finaliser): the bench's only source of randomness.
fn mix(mut v: u64) -> u64 {
    v = (v ^ (v >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    v = (v ^ (v >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    v ^ (v >> 31)
}

/// A number in [0, 1) from `seed` and a lattice point.
fn lattice(seed: u64, x: i64, y: i64) -> f32 {
    let h = mix(seed ^ mix((x as u64).wrapping_mul(0x9e37_79b9) ^ mix(y as u64)));
    (h >> 40) as f32 / (1u64 << 24) as f32
}

/// Value noise at (`x`, `y`) in lattice units, smoothstep-interpolated, in [0, 1).
fn value_noise(seed: u64, x: f32, y: f32) -> f32 {
    let (x0, y0) = (x.floor(), y.floor());
    let (fx, fy) = (x - x0, y - y0);
    let (sx, sy) = (fx * fx * (3.0 - 2.0 * fx), fy * fy * (3.0 - 2.0 * fy));
    let (ix, iy) = (x0 as i64, y0 as i64);
    let top = lattice(seed, ix, iy) * (1.0 - sx) + lattice(seed, ix + 1, iy) * sx;
    let bottom = lattice(seed, ix, iy + 1) * (1.0 - sx) + lattice(seed, ix + 1, iy + 1) * sx;
    top * (1.0 - sy) + bottom * sy
}

/// Fractal noise at (`u`, `v`) in [0, 1)², about [0, 1): 7 octaves from a 4×4 lattice.
fn fbm(seed: u64, u: f32, v: f32, persistence: f32) -> f32 {
    let (mut sum, mut norm, mut amp, mut freq) = (0.0, 0.0, 1.0, 4.0);
    for octave in 0..7 {
        sum += amp * value_noise(seed.wrapping_add(octave), u * freq, v * freq);
        norm += amp;
        amp *= persistence;
        freq *= 2.0;
    }
    sum / norm
}

/// `x` pushed away from 0.5 by `gain`, in [0, 1] (sums of octaves bunch up around the middle).
fn stretch(x: f32, gain: f32) -> f32 {
    (0.5 + (x - 0.5) * gain).clamp(0.0, 1.0)
}

/// Image `i` of the natural-looking set.
fn natural(i: u64) -> RgbImage {
    let seed = mix(i + 1);
    let persistence = 0.45 + 0.30 * (i % 10) as f32 / 9.0;
    let grain = (i / 10 % 7) as i64;
    let colour = |k: u64| -> [f32; 3] {
        let h = mix(seed ^ k);
        [0, 16, 32].map(|s| ((h >> s) & 0xff) as f32)
    };
    let [a, b, c, d, sky] = [1, 2, 3, 4, 5].map(colour);
    let lerp = |x: [f32; 3], y: [f32; 3], t: f32| -> [f32; 3] {
        std::array::from_fn(|k| x[k] * (1.0 - t) + y[k] * t)
    };
    RgbImage::from_fn(SIDE, SIDE, |x, y| {
        let (u, v) = (x as f32 / SIDE as f32, y as f32 / SIDE as f32);
        // Background: two colours blended by one field.
        let ground = lerp(a, b, stretch(fbm(seed, u, v, persistence), 2.5));
        // A subject: where a coarse field crosses the middle, edged over about 2 px, with
        // finer and busier texture of its own.
        let edge = stretch(fbm(seed ^ 0x51, u * 0.75, v * 0.75, 0.5), 60.0);
        let detail = (persistence + 0.1).min(0.85);
        let subject = lerp(
            c,
            d,
            stretch(fbm(seed ^ 0x52, u * 2.0, v * 2.0, detail), 3.0),
        );
        let base = lerp(ground, subject, edge);
        // Light and shadow over both, and a sky-to-ground wash.
        let shade = 0.3 + 0.9 * stretch(fbm(seed ^ 0x53, u, v, persistence), 2.0);
        let wash = (1.0 - v) * 0.3;
        let noise = mix(seed ^ (u64::from(y) << 32 | u64::from(x)));
        Rgb(std::array::from_fn(|k| {
            let value = base[k] * shade * (1.0 - wash) + sky[k] * wash;
            let jitter = if grain == 0 {
                0
            } else {
                ((noise >> (k * 8)) & 0xff) as i64 % (2 * grain + 1) - grain
            };
            (value as i64 + jitter).clamp(0, 255) as u8
        }))
    })
}

/// Image `i` of the uniform-noise set.
fn noise(i: u64) -> RgbImage {
    let seed = mix(i + 1_000);
    RgbImage::from_fn(SIDE, SIDE, |x, y| {
        let h = mix(seed ^ (u64::from(y) << 32 | u64::from(x)));
        Rgb([h as u8, (h >> 8) as u8, (h >> 16) as u8])
    })
}

fn png(image: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
        .unwrap();
    out
}

/// One page of thumbnails of `images`, made through a fresh cache, two at a time.
async fn page(name: &str, images: fn(u64) -> RgbImage) {
    let pngs: Vec<Arc<Vec<u8>>> = (0..PAGE).map(|i| Arc::new(png(&images(i)))).collect();
    let thumbs = Arc::new(Thumbs::temporary().unwrap());
    let t = Instant::now();
    let tasks: Vec<_> = pngs
        .iter()
        .map(|png| {
            let (thumbs, png) = (thumbs.clone(), png.clone());
            tokio::spawn(async move {
                let sha = hex::encode(Sha256::digest(png.as_slice()));
                thumbs
                    .get(&sha, || async move {
                        Ok::<_, std::convert::Infallible>(png.to_vec())
                    })
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut jpegs = Vec::with_capacity(tasks.len());
    for task in tasks {
        jpegs.push(task.await.unwrap().len());
    }
    let made = t.elapsed();
    let png_total: usize = pngs.iter().map(|p| p.len()).sum();
    let total: usize = jpegs.iter().sum();
    println!(
        "{name:8} PNGs {:>6} KB/page ({:>3}–{:>3} KB each); thumbnails {:>5} KB/page \
         ({:>2}–{:>2} KB each), {} the {} KB goal; made in {:.2} s ({:.0} ms each, 2 at a time)",
        png_total / 1000,
        pngs.iter().map(|p| p.len()).min().unwrap() / 1000,
        pngs.iter().map(|p| p.len()).max().unwrap() / 1000,
        total / 1000,
        jpegs.iter().min().unwrap() / 1000,
        jpegs.iter().max().unwrap() / 1000,
        if total < GOAL { "under" } else { "OVER" },
        GOAL / 1000,
        made.as_secs_f64(),
        made.as_secs_f64() * 1e3 * 2.0 / PAGE as f64,
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    if let Some(dir) = std::env::args().skip(1).find(|a| !a.starts_with('-')) {
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..10 {
            natural(i * 11)
                .save(format!("{dir}/natural-{:02}.png", i * 11))
                .unwrap();
        }
        noise(0).save(format!("{dir}/noise-00.png")).unwrap();
    }
    println!("{PAGE} thumbnails of {SIDE}×{SIDE} PNGs per page");
    page("natural", natural).await;
    page("noise", noise).await;
}
