//! PIL's Lanczos resize (`lanczos.json`, written by `tools/reference/gen_lanczos.py`): every
//! case's output must equal the bytes of `Image.resize((w, h), resample=Image.LANCZOS)`, the
//! call A1111's "Lanczos" hires-fix upscaler makes. Cases: two smooth 64×64 / 96×64 patterns and
//! a high-contrast 48×40 one, upscaled ×1.25, ×1.5 and ×2, downscaled, up in one axis and down
//! in the other, and resized along y only.

use kiln_worker::engine::image::{RgbImage, decode_png};
use kiln_worker::engine::lanczos::resize_lanczos;
use serde::Deserialize;

use crate::fixture::{load, path};

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    source: String,
    width: u32,
    height: u32,
    expected: String,
}

fn png(name: &str) -> RgbImage {
    let bytes = std::fs::read(path(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    decode_png(&bytes)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .image
}

#[test]
fn lanczos_matches_pil_byte_for_byte() {
    let reference: Reference = load("lanczos.json");
    assert!(!reference.cases.is_empty(), "lanczos.json has no cases");
    for case in &reference.cases {
        let source = png(&case.source);
        let want = png(&case.expected);
        assert_eq!(
            (want.width, want.height),
            (case.width, case.height),
            "{}",
            case.name
        );
        let got = resize_lanczos(&source, case.width, case.height);
        assert_eq!(
            (got.width, got.height),
            (want.width, want.height),
            "{}",
            case.name
        );
        if let Some(i) = got
            .pixels
            .iter()
            .zip(&want.pixels)
            .position(|(g, w)| g != w)
        {
            let differing = got.pixels.iter().zip(&want.pixels).filter(|(g, w)| g != w);
            let (pixel, width) = (i / 3, case.width as usize);
            panic!(
                "{} ({}×{} → {}×{}): first differing pixel at x {}, y {}: got {:?}, PIL {:?}; \
                 {} of {} bytes differ",
                case.name,
                source.width,
                source.height,
                case.width,
                case.height,
                pixel % width,
                pixel / width,
                &got.pixels[pixel * 3..][..3],
                &want.pixels[pixel * 3..][..3],
                differing.count(),
                got.pixels.len()
            );
        }
        assert_eq!(got.pixels, want.pixels, "{}", case.name);
    }
}
