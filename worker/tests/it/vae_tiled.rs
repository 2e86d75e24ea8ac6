//! The tiled VAE decode against diffusers' `AutoencoderKL.tiled_decode` (`vae.enable_tiling()`)
//! on tiny-sd15's VAE, a 19×14 latent cut into a 4×3 grid of 8×8-cell tiles
//! (`tools/reference/gen_vae_tiled.py`), and what tiling costs against the whole decode.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;

use kiln_worker::engine::{
    Device, HostTensor, Model, Pipeline, RenderOutput, RenderRequest, VaeTiling, read_safetensors,
};

use crate::fixture::{assert_tensor, path, relative_error};

/// The VAE parity bound of `model.rs`'s `vae_decode_matches_diffusers` (relative error, f32).
const TOL: f64 = 1e-4;

fn fixture() -> BTreeMap<String, HostTensor> {
    read_safetensors(&path("vae_tiled.safetensors")).expect("vae_tiled.safetensors")
}

fn model() -> Model {
    Model::load(&path("tiny-sd15"), &[], Device::Cpu).expect("tiny-sd15 loads")
}

/// Largest `|a − b|` in 8-bit levels: decoder output spans [-1, 1] over 0..=255.
fn max_levels(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| f64::from((x - y).abs()) * 127.5)
        .fold(0.0, f64::max)
}

#[test]
fn tiled_decode_matches_diffusers_tiled_decode() {
    let want = fixture();
    let model = model();
    let got = model
        .decode_with(&want["latents"], VaeTiling::On)
        .expect("tiled decode");
    assert_tensor("vae_tiled/tiled", &got, &want["tiled"], TOL);
    // `auto` tiles this image too: 152×112 px is past four times the VAE's 64² native area.
    let auto = model
        .decode_with(&want["latents"], VaeTiling::Auto)
        .expect("auto decode");
    assert_eq!(auto, got, "auto tiles past 4 × 64² px, like on");
}

#[test]
fn untiled_decode_of_the_same_latent_matches_diffusers() {
    let want = fixture();
    let got = model()
        .decode_with(&want["latents"], VaeTiling::Off)
        .expect("untiled decode");
    assert_tensor("vae_tiled/untiled", &got, &want["untiled"], TOL);
}

/// Tiling is not free: each tile's mid-block attention and group norms see only that tile.
/// On tiny-sd15's random-weight VAE, whose tiles are 64 px with 16 px seams, kiln's tiled
/// decode is 153.7/255 from its whole decode at worst (diffusers': the same, in
/// `vae_tiled.json`), and the test pins that kiln's gap is diffusers' gap. A real SD1.5 VAE
/// tiles at 512 px; `worker/benches/vae_tiled.rs DIR SIZE compare` prints its gap.
#[test]
fn tiling_differs_from_the_whole_decode_exactly_as_in_diffusers() {
    let want = fixture();
    let model = model();
    let tiled = model
        .decode_with(&want["latents"], VaeTiling::On)
        .expect("tiled");
    let whole = model
        .decode_with(&want["latents"], VaeTiling::Off)
        .expect("whole");
    let kiln = max_levels(&tiled.data, &whole.data);
    let diffusers = max_levels(&want["tiled"].data, &want["untiled"].data);
    eprintln!("tiled vs untiled max error: kiln {kiln:.2}/255, diffusers {diffusers:.2}/255");
    assert!(
        kiln > 0.0,
        "a tiled decode that equals the whole one did not tile"
    );
    assert!(
        (kiln - diffusers).abs() <= 0.05,
        "kiln's tiled-vs-whole gap {kiln}/255 is not diffusers' {diffusers}/255"
    );
    // Inside the first tile's kept region (up to 48 px from its corner, before any seam) only
    // the tile's own attention and norms differ; the seams are where the grid shows.
    assert!(relative_error(&tiled.data, &whole.data) > TOL);
}

/// The setting reaches the render's decode: `on` (and `auto`, past 4 × 64² px on this VAE)
/// decodes in tiles and says so in the image's notes; `off`, and `auto` at 64², do not.
#[test]
fn a_render_decodes_in_tiles_as_its_setting_says_and_notes_it() {
    let pipeline = Pipeline::new(model());
    let render = |tiling: VaeTiling, (width, height): (u32, u32)| -> RenderOutput {
        let request = RenderRequest {
            prompt: "a red fox in a forest".into(),
            seed: 7,
            width,
            height,
            vae_tiling: tiling,
            ..RenderRequest::default()
        };
        pipeline
            .render(&request, &mut |_| {}, &AtomicBool::new(false))
            .expect("render")
    };
    let says_tiled = |out: &RenderOutput| {
        out.notes
            .iter()
            .any(|n| n.starts_with("VAE decoded in tiles of 64x64 px"))
    };
    let large = (112, 152);
    let whole = render(VaeTiling::Off, large);
    let tiled = render(VaeTiling::On, large);
    let auto = render(VaeTiling::Auto, large);
    assert!(!says_tiled(&whole), "{:?}", whole.notes);
    assert!(says_tiled(&tiled), "{:?}", tiled.notes);
    assert_ne!(whole.image, tiled.image, "tiling changed nothing");
    assert_eq!(auto.image, tiled.image);
    let small = render(VaeTiling::Auto, (64, 64));
    assert!(!says_tiled(&small), "{:?}", small.notes);
    assert_eq!(small.image, render(VaeTiling::Off, (64, 64)).image);
}
