//! Resizing latents for the hires fix, as `torch.nn.functional.interpolate` does on the CPU.
//!
//! Owns [`resize_latents`]: bilinear (`align_corners=False`, no antialiasing), nearest and
//! nearest-exact, on `[channels, height, width]` float32 latents, with torch's index and weight
//! arithmetic (float32 scale `in / out`, source index `max(scale·(o + ½) − ½, 0)` for bilinear,
//! `floor(o·scale)` / `floor((o + ½)·scale)` for the nearest modes), so a latent upscale matches
//! A1111's "Latent", "Latent (nearest)" and "Latent (nearest-exact)" upscalers.

use kiln_proto::hires::LatentMode;

/// Resizes `x` (`[channels, h, w]`, row-major) to `[channels, out_h, out_w]`.
pub fn resize_latents(
    x: &[f32],
    [channels, h, w]: [usize; 3],
    [out_h, out_w]: [usize; 2],
    mode: LatentMode,
) -> Vec<f32> {
    assert_eq!(x.len(), channels * h * w, "latent shape");
    let mut out = Vec::with_capacity(channels * out_h * out_w);
    match mode {
        LatentMode::Bilinear => {
            let rows = linear_taps(h, out_h);
            let cols = linear_taps(w, out_w);
            for plane in x.chunks_exact(h * w) {
                for &(r0, r1, h0, h1) in &rows {
                    for &(c0, c1, w0, w1) in &cols {
                        let top = plane[r0 * w + c0] * w0 + plane[r0 * w + c1] * w1;
                        let bottom = plane[r1 * w + c0] * w0 + plane[r1 * w + c1] * w1;
                        out.push(top * h0 + bottom * h1);
                    }
                }
            }
        }
        LatentMode::Nearest | LatentMode::NearestExact => {
            let exact = mode == LatentMode::NearestExact;
            let rows: Vec<usize> = (0..out_h).map(|o| nearest(o, h, out_h, exact)).collect();
            let cols: Vec<usize> = (0..out_w).map(|o| nearest(o, w, out_w, exact)).collect();
            for plane in x.chunks_exact(h * w) {
                for &r in &rows {
                    for &c in &cols {
                        out.push(plane[r * w + c]);
                    }
                }
            }
        }
    }
    out
}

/// For each output index along one axis: the two source indices and their weights
/// (`compute_indices_weights_linear`).
fn linear_taps(input: usize, output: usize) -> Vec<(usize, usize, f32, f32)> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|o| {
            let real = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
            // Non-negative, so truncation is floor, as torch's cast.
            let i0 = real as usize;
            let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
            let lambda1 = real - i0 as f32;
            (i0, i1, 1.0 - lambda1, lambda1)
        })
        .collect()
}

/// `nearest_idx` / `nearest_exact_idx`.
fn nearest(o: usize, input: usize, output: usize, exact: bool) -> usize {
    if !exact && output == input {
        return o;
    }
    if !exact && output == 2 * input {
        return o >> 1;
    }
    let scale = input as f32 / output as f32;
    let offset = if exact { 0.5 } else { 0.0 };
    (((o as f32 + offset) * scale).floor() as usize).min(input - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_doubling_matches_torchs_known_values() {
        // torch.nn.functional.interpolate(torch.tensor([[[[0., 1.], [2., 3.]]]]), size=(4, 4),
        // mode="bilinear") — the classic align_corners=False example.
        let out = resize_latents(
            &[0.0, 1.0, 2.0, 3.0],
            [1, 2, 2],
            [4, 4],
            LatentMode::Bilinear,
        );
        let want = [
            0.0, 0.25, 0.75, 1.0, 0.5, 0.75, 1.25, 1.5, 1.5, 1.75, 2.25, 2.5, 2.0, 2.25, 2.75, 3.0,
        ];
        assert_eq!(out, want);
    }

    #[test]
    fn nearest_modes_pick_torchs_sources() {
        let x: Vec<f32> = (0..3).map(|v| v as f32).collect();
        // 1×3 → 1×5: nearest floors o·0.6 (0,0,1,1,2); nearest-exact floors (o+½)·0.6
        // (0,0,1,2,2).
        let near = resize_latents(&x, [1, 1, 3], [1, 5], LatentMode::Nearest);
        assert_eq!(near, [0.0, 0.0, 1.0, 1.0, 2.0]);
        let exact = resize_latents(&x, [1, 1, 3], [1, 5], LatentMode::NearestExact);
        assert_eq!(exact, [0.0, 0.0, 1.0, 2.0, 2.0]);
    }

    #[test]
    fn same_size_is_the_identity_and_channels_stay_apart() {
        let x: Vec<f32> = (0..2 * 3 * 4).map(|v| v as f32 * 0.5).collect();
        for mode in [
            LatentMode::Bilinear,
            LatentMode::Nearest,
            LatentMode::NearestExact,
        ] {
            assert_eq!(resize_latents(&x, [2, 3, 4], [3, 4], mode), x, "{mode:?}");
        }
    }
}
