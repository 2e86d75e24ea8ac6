//! Turning decoded VAE output into 8-bit RGB and PNG files with A1111-style metadata, and
//! 8-bit RGB back into VAE encoder input.
//!
//! Owns the pixel conversions diffusers uses (`(x/2 + 0.5).clamp(0, 1)`, `·255`, numpy's
//! round-half-to-even; and back, `x/255·2 − 1`), the A1111 "infotext" that A1111's PNG Info
//! and Civitai parse (`parameters` text chunk), and PNG encoding/decoding. It knows nothing of
//! models or sampling beyond the values it prints.

use std::io::Cursor;

use crate::engine::error::{EngineError, Result};
use crate::engine::load::weights::HostTensor;
use crate::engine::model::{LoadedLora, LoadedVae, UsedInversion};

/// An 8-bit RGB image, rows top to bottom, pixels `[r, g, b]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width · height · 3` bytes.
    pub pixels: Vec<u8>,
}

/// Converts one decoded image (`[3, h, w]`, planar, about [-1, 1]) to RGB8 exactly as
/// diffusers' `VaeImageProcessor.postprocess` + `numpy_to_pil` do.
pub fn to_rgb8(decoded: &[f32], width: u32, height: u32) -> Result<RgbImage> {
    let plane = width as usize * height as usize;
    if decoded.len() != 3 * plane {
        return Err(EngineError::InvalidRequest(format!(
            "{} values do not make a 3×{height}×{width} image",
            decoded.len()
        )));
    }
    let mut pixels = Vec::with_capacity(3 * plane);
    for i in 0..plane {
        for c in 0..3 {
            let x = (decoded[c * plane + i] / 2.0 + 0.5).clamp(0.0, 1.0);
            // `(images * 255).round().astype("uint8")`: float32, ties to even; x*255 is in
            // [0, 255], so the cast cannot wrap.
            pixels.push((x * 255.0).round_ties_even() as u8);
        }
    }
    Ok(RgbImage {
        width,
        height,
        pixels,
    })
}

/// Like [`to_rgb8`], but as A1111 turns a decoded picture into 8 bits before upscaling it for
/// the hires fix: `255 · clamp((x + 1) / 2, 0, 1)` in float32, truncated (`astype(np.uint8)`).
pub fn to_rgb8_truncating(decoded: &[f32], width: u32, height: u32) -> Result<RgbImage> {
    let plane = width as usize * height as usize;
    if decoded.len() != 3 * plane {
        return Err(EngineError::InvalidRequest(format!(
            "{} values do not make a 3×{height}×{width} image",
            decoded.len()
        )));
    }
    let mut pixels = Vec::with_capacity(3 * plane);
    for i in 0..plane {
        for c in 0..3 {
            let x = ((decoded[c * plane + i] + 1.0) / 2.0).clamp(0.0, 1.0);
            // In [0, 255]: the cast truncates and cannot wrap.
            pixels.push((255.0 * x) as u8);
        }
    }
    Ok(RgbImage {
        width,
        height,
        pixels,
    })
}

/// One image as the VAE encoder takes it (`[1, 3, h, w]`, planar, in [-1, 1]), exactly as
/// diffusers' `VaeImageProcessor.preprocess` makes it from a PIL image of a size that needs no
/// resizing (`np.array(img).astype(float32) / 255`, then `2x − 1`) and as A1111's img2img does
/// (`/ 255.0`, then `image * 2 - 1`). Resizing to a multiple of 8 is the caller's.
pub fn to_vae_input(image: &RgbImage) -> Result<HostTensor> {
    let (w, h) = (image.width as usize, image.height as usize);
    let plane = w * h;
    if image.pixels.len() != 3 * plane {
        return Err(EngineError::InvalidRequest(format!(
            "{} bytes do not make a {w}×{h} RGB image",
            image.pixels.len()
        )));
    }
    let mut data = vec![0f32; 3 * plane];
    for (i, px) in image.pixels.chunks_exact(3).enumerate() {
        for (c, &v) in px.iter().enumerate() {
            data[c * plane + i] = f32::from(v) / 255.0 * 2.0 - 1.0;
        }
    }
    Ok(HostTensor {
        shape: vec![1, 3, h, w],
        data,
    })
}

/// The generation parameters written into a PNG, in A1111's vocabulary.
#[derive(Clone, Debug)]
pub struct Infotext<'a> {
    /// The positive prompt.
    pub prompt: &'a str,
    /// The negative prompt ("" for none).
    pub negative_prompt: &'a str,
    /// Sampling steps.
    pub steps: usize,
    /// A1111's sampler name (`LCM`, `Euler a`).
    pub sampler: &'a str,
    /// Classifier-free guidance scale.
    pub cfg_scale: f32,
    /// The seed as requested (all 64 bits).
    pub seed: u64,
    /// Image width.
    pub width: u32,
    /// Image height.
    pub height: u32,
    /// Full sha256 of the model; A1111 prints its first 10 hex digits.
    pub model_hash: &'a str,
    /// Model name.
    pub model_name: &'a str,
    /// Merged LoRAs; A1111 prints the first 12 hex digits of each hash.
    pub loras: &'a [LoadedLora],
    /// A VAE file used instead of the model's own; A1111 prints its name and the first 10 hex
    /// digits of its hash.
    pub vae: Option<&'a LoadedVae>,
    /// Textual-inversion embeddings the prompt or negative prompt used; A1111 prints the first
    /// 12 hex digits of each file's sha256 (`TI hashes`).
    pub inversions: &'a [UsedInversion],
    /// A1111's "Clip skip", printed when above 1.
    pub clip_skip: usize,
    /// Whether the prompt's and negative prompt's conditionings were padded to the same number
    /// of chunks (A1111's `pad_cond_uncond` option, printed as `Pad conds: True`).
    pub pad_conds: bool,
    /// The generator's A1111 name (`CPU`, `NV`).
    pub rng: &'a str,
    /// The sampler's η when set (`Eta DDIM` for DDIM, as A1111 writes it; `Eta` otherwise).
    pub eta: Option<(&'static str, f32)>,
    /// Variation seed and strength, when the strength is above 0.
    pub variation: Option<(u64, f32)>,
    /// "Resize seed from" width and height.
    pub seed_resize_from: Option<(u32, u32)>,
    /// `Denoising strength` of an img2img render or of the hires pass.
    pub denoise: Option<f32>,
    /// The hires fix's settings, when it ran.
    pub hires: Option<HiresText>,
}

/// The hires fix as A1111 records it.
#[derive(Clone, Debug, PartialEq)]
pub struct HiresText {
    /// `Hires upscale: 2` when given as a scale, else `Hires resize: 1024x768`.
    pub size: HiresSize,
    /// `Hires steps`, printed when not 0 (0: the first pass's).
    pub steps: usize,
    /// `Hires upscaler`.
    pub upscaler: &'static str,
    /// `Hires sampler`, printed when it differs from the first pass's.
    pub sampler: Option<String>,
}

/// How the hires fix's size was asked for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum HiresSize {
    /// A scale of the first pass's size.
    Scale(f32),
    /// A width and height.
    Resize(u32, u32),
}

/// `name: hash, …` as A1111's `TI hashes` lists embeddings: `:` and `,` stripped from each name,
/// the hash cut to 12 hex digits.
fn name_hashes(inversions: &[UsedInversion]) -> String {
    let listed: Vec<String> = inversions
        .iter()
        .map(|i| {
            let name: String = i.name.chars().filter(|c| !matches!(c, ':' | ',')).collect();
            format!("{name}: {}", &i.hash[..i.hash.len().min(12)])
        })
        .collect();
    listed.join(", ")
}

/// A1111's `quote`: values with `,`, `:` or a newline become JSON strings.
fn quote(value: &str) -> String {
    if value.contains([',', ':', '\n']) {
        serde_json::Value::String(value.to_owned()).to_string()
    } else {
        value.to_owned()
    }
}

impl Infotext<'_> {
    /// The `parameters` text, as A1111's `create_infotext` lays it out: the prompt, an optional
    /// `Negative prompt:` line, then `key: value` pairs joined by `, `.
    pub fn render(&self) -> String {
        let mut fields: Vec<(&str, String)> = vec![
            ("Steps", self.steps.to_string()),
            ("Sampler", self.sampler.to_owned()),
            ("CFG scale", self.cfg_scale.to_string()),
            ("Seed", self.seed.to_string()),
            ("Size", format!("{}x{}", self.width, self.height)),
            ("Model hash", self.model_hash.chars().take(10).collect()),
            ("Model", self.model_name.to_owned()),
        ];
        if let Some(vae) = self.vae {
            fields.push(("VAE hash", vae.hash.chars().take(10).collect()));
            fields.push(("VAE", vae.name.clone()));
        }
        if let Some((subseed, strength)) = self.variation {
            fields.push(("Variation seed", subseed.to_string()));
            fields.push(("Variation seed strength", strength.to_string()));
        }
        if let Some((w, h)) = self.seed_resize_from {
            fields.push(("Seed resize from", format!("{w}x{h}")));
        }
        if let Some((key, eta)) = self.eta {
            fields.push((key, eta.to_string()));
        }
        if let Some(denoise) = self.denoise {
            fields.push(("Denoising strength", denoise.to_string()));
        }
        if self.clip_skip > 1 {
            fields.push(("Clip skip", self.clip_skip.to_string()));
        }
        if !self.loras.is_empty() {
            // A1111 strips `:` and `,` from the alias so the list stays parseable.
            let hashes: Vec<String> = self
                .loras
                .iter()
                .map(|l| {
                    let alias: String =
                        l.name.chars().filter(|c| !matches!(c, ':' | ',')).collect();
                    format!("{alias}: {}", &l.hash[..l.hash.len().min(12)])
                })
                .collect();
            fields.push(("Lora hashes", hashes.join(", ")));
        }
        if !self.inversions.is_empty() {
            fields.push(("TI hashes", name_hashes(self.inversions)));
        }
        // A1111 writes the generator unless it is its default, the GPU's own; kiln's never is.
        fields.push(("RNG", self.rng.to_owned()));
        if let Some(hires) = &self.hires {
            match hires.size {
                HiresSize::Scale(scale) => fields.push(("Hires upscale", scale.to_string())),
                HiresSize::Resize(w, h) => fields.push(("Hires resize", format!("{w}x{h}"))),
            }
            if hires.steps > 0 {
                fields.push(("Hires steps", hires.steps.to_string()));
            }
            fields.push(("Hires upscaler", hires.upscaler.to_owned()));
            if let Some(sampler) = &hires.sampler {
                fields.push(("Hires sampler", sampler.clone()));
            }
        }
        // Like `Lora hashes`, one of A1111's extra generation parameters.
        if self.pad_conds {
            fields.push(("Pad conds", "True".to_owned()));
        }
        let params: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("{k}: {}", quote(v)))
            .collect();
        let negative = if self.negative_prompt.is_empty() {
            String::new()
        } else {
            format!("\nNegative prompt: {}", self.negative_prompt)
        };
        format!("{}{negative}\n{}", self.prompt_line(), params.join(", "))
            .trim()
            .to_owned()
    }
}

impl Infotext<'_> {
    /// The prompt with a `<lora:name:strength>` tag for each merged LoRA the prompt does not
    /// name itself (one given with `--lora` or a sweep's `[[loras]]`), as A1111 writes every
    /// LoRA: pasted back into A1111, the image's parameters load the same LoRAs.
    fn prompt_line(&self) -> String {
        let named: Vec<String> = kiln_proto::prompt::ParsedPrompt::parse(self.prompt)
            .map(|p| p.loras().into_iter().map(|l| l.name).collect())
            .unwrap_or_default();
        let mut line = self.prompt.to_owned();
        for lora in self.loras {
            if !named.contains(&lora.name) {
                let sep = if line.is_empty() { "" } else { " " };
                line.push_str(&format!("{sep}<lora:{}:{}>", lora.name, lora.strength));
            }
        }
        line
    }
}

/// Encodes `image` as a PNG with text chunks (`(keyword, text)`): tEXt when the text is
/// Latin-1, iTXt otherwise, as PIL's `PngInfo.add_text` does.
pub fn encode_png(image: &RgbImage, text: &[(&str, &str)]) -> Result<Vec<u8>> {
    let png_error = |e: png::EncodingError| EngineError::Png(e.to_string());
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, image.width, image.height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        for (keyword, value) in text {
            if value.chars().all(|c| u32::from(c) < 256) {
                encoder.add_text_chunk((*keyword).to_owned(), (*value).to_owned())
            } else {
                encoder.add_itxt_chunk((*keyword).to_owned(), (*value).to_owned())
            }
            .map_err(png_error)?;
        }
        let mut writer = encoder.write_header().map_err(png_error)?;
        writer.write_image_data(&image.pixels).map_err(png_error)?;
        writer.finish().map_err(png_error)?;
    }
    Ok(out)
}

/// A decoded 8-bit PNG with its text chunks (tEXt, zTXt and iTXt, in that order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedPng {
    /// The pixels, as RGB.
    pub image: RgbImage,
    /// `(keyword, text)` pairs.
    pub text: Vec<(String, String)>,
}

/// Decodes an 8-bit RGB or RGBA PNG (alpha is dropped).
pub fn decode_png(bytes: &[u8]) -> Result<DecodedPng> {
    let bad = |e: png::DecodingError| EngineError::Png(e.to_string());
    let mut reader = png::Decoder::new(Cursor::new(bytes))
        .read_info()
        .map_err(bad)?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| EngineError::Png("image too large".to_owned()))?;
    let mut buf = vec![0; size];
    let frame = reader.next_frame(&mut buf).map_err(bad)?;
    let channels = match (frame.color_type, frame.bit_depth) {
        (png::ColorType::Rgb, png::BitDepth::Eight) => 3,
        (png::ColorType::Rgba, png::BitDepth::Eight) => 4,
        other => {
            return Err(EngineError::Png(format!(
                "unsupported PNG format {other:?}"
            )));
        }
    };
    let pixels = buf[..frame.buffer_size()]
        .chunks_exact(channels)
        .flat_map(|p| [p[0], p[1], p[2]])
        .collect();
    let info = reader.info();
    let mut text: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|c| (c.keyword.clone(), c.text.clone()))
        .collect();
    for chunk in &info.compressed_latin1_text {
        if let Ok(t) = chunk.get_text() {
            text.push((chunk.keyword.clone(), t));
        }
    }
    for chunk in &info.utf8_text {
        if let Ok(t) = chunk.get_text() {
            text.push((chunk.keyword.clone(), t));
        }
    }
    Ok(DecodedPng {
        image: RgbImage {
            width: frame.width,
            height: frame.height,
            pixels,
        },
        text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample<'a>(loras: &'a [LoadedLora]) -> Infotext<'a> {
        Infotext {
            prompt: "a photograph of an astronaut riding a horse",
            negative_prompt: "",
            steps: 4,
            sampler: "LCM",
            cfg_scale: 1.0,
            seed: 42,
            width: 64,
            height: 64,
            model_hash: "0123456789abcdef",
            model_name: "tiny-sd15",
            loras,
            vae: None,
            inversions: &[],
            clip_skip: 1,
            pad_conds: false,
            rng: "CPU",
            eta: None,
            variation: None,
            seed_resize_from: None,
            denoise: None,
            hires: None,
        }
    }

    #[test]
    fn variation_seeds_and_the_hires_fix_are_recorded_as_a1111_does() {
        let mut info = sample(&[]);
        info.sampler = "DPM++ 2S a Karras";
        info.variation = Some((7, 0.3));
        info.seed_resize_from = Some((512, 768));
        info.rng = "NV";
        info.hires = Some(HiresText {
            size: HiresSize::Scale(1.5),
            steps: 4,
            upscaler: "Latent",
            sampler: Some("Euler".to_owned()),
        });
        info.denoise = Some(0.55);
        assert_eq!(
            info.render(),
            "a photograph of an astronaut riding a horse\n\
             Steps: 4, Sampler: DPM++ 2S a Karras, CFG scale: 1, Seed: 42, Size: 64x64, \
             Model hash: 0123456789, Model: tiny-sd15, Variation seed: 7, \
             Variation seed strength: 0.3, Seed resize from: 512x768, Denoising strength: 0.55, \
             RNG: NV, Hires upscale: 1.5, Hires steps: 4, Hires upscaler: Latent, \
             Hires sampler: Euler"
        );
    }

    #[test]
    fn embeddings_are_listed_as_a1111_writes_ti_hashes() {
        let used = [
            UsedInversion {
                name: "EasyNegative".to_owned(),
                hash: "c74b4e810b030bb2fb1a2a8d1b2c3d4e".to_owned(),
            },
            UsedInversion {
                name: "odd:name,v2".to_owned(),
                hash: "0123456789abcdef".to_owned(),
            },
        ];
        let mut info = sample(&[]);
        info.inversions = &used;
        let text = info.render();
        assert!(
            text.ends_with(
                "Model: tiny-sd15, \
                 TI hashes: \"EasyNegative: c74b4e810b03, oddnamev2: 0123456789ab\", RNG: CPU"
            ),
            "{text}"
        );
    }

    #[test]
    fn infotext_has_a1111_layout() {
        let loras = [LoadedLora {
            name: "lcm-lora".to_owned(),
            hash: "abcdef0123456789abcdef".to_owned(),
            strength: 1.0,
        }];
        assert_eq!(
            sample(&loras).render(),
            "a photograph of an astronaut riding a horse <lora:lcm-lora:1>\n\
             Steps: 4, Sampler: LCM, CFG scale: 1, Seed: 42, Size: 64x64, \
             Model hash: 0123456789, Model: tiny-sd15, \
             Lora hashes: \"lcm-lora: abcdef012345\", RNG: CPU"
        );
        let mut with_negative = sample(&[]);
        with_negative.negative_prompt = "blurry, low quality";
        with_negative.cfg_scale = 1.5;
        with_negative.sampler = "Euler a";
        assert_eq!(
            with_negative.render(),
            "a photograph of an astronaut riding a horse\n\
             Negative prompt: blurry, low quality\n\
             Steps: 4, Sampler: Euler a, CFG scale: 1.5, Seed: 42, Size: 64x64, \
             Model hash: 0123456789, Model: tiny-sd15, RNG: CPU"
        );
        // Clip skip follows the model, as in A1111; Pad conds is an extra parameter at the end.
        let mut skipped = sample(&[]);
        skipped.clip_skip = 2;
        skipped.pad_conds = true;
        assert!(
            skipped
                .render()
                .ends_with("Model: tiny-sd15, Clip skip: 2, RNG: CPU, Pad conds: True"),
            "{}",
            skipped.render()
        );
    }

    #[test]
    fn pixels_round_half_to_even_like_numpy() {
        // x/2+0.5 = 0.5 → 127.5 → 128 (even); clamping keeps the ends.
        let decoded = [0.0, -3.0, 3.0];
        let img = to_rgb8(&decoded, 1, 1).expect("rgb");
        assert_eq!(img.pixels, vec![128, 0, 255]);
    }

    #[test]
    fn png_round_trips_pixels_and_text() {
        let image = RgbImage {
            width: 2,
            height: 1,
            pixels: vec![1, 2, 3, 250, 251, 252],
        };
        let bytes =
            encode_png(&image, &[("parameters", "p\nSteps: 4"), ("kiln", "東京")]).expect("encode");
        let decoded = decode_png(&bytes).expect("decode");
        assert_eq!(decoded.image, image);
        assert_eq!(
            decoded.text,
            vec![
                ("parameters".to_owned(), "p\nSteps: 4".to_owned()),
                ("kiln".to_owned(), "東京".to_owned())
            ]
        );
    }
}
