//! The value checks shared by `[axes]` and top-level sweep keys: a TOML value's type, then
//! each render parameter's range, as errors that say what was expected and what was found
//! (the caller adds the place).

use kiln_proto::hires::Upscaler;
use kiln_proto::sampler::SamplerName;

use super::cell::{MAX_HIRES_SCALE, MAX_HIRES_STEPS, MAX_SUBSEED_STRENGTH, RNG_SOURCES};

pub(super) fn kind_of(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a datetime",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

pub(super) fn number(v: &toml::Value) -> Result<f64, String> {
    match v {
        toml::Value::Float(f) => Ok(*f),
        toml::Value::Integer(i) => Ok(*i as f64),
        other => Err(format!("expected a number, found {}", kind_of(other))),
    }
}

pub(super) fn integer(v: &toml::Value) -> Result<i64, String> {
    match v {
        toml::Value::Integer(i) => Ok(*i),
        other => Err(format!("expected an integer, found {}", kind_of(other))),
    }
}

pub(super) fn string(v: &toml::Value) -> Result<&str, String> {
    match v {
        toml::Value::String(s) => Ok(s),
        other => Err(format!("expected a string, found {}", kind_of(other))),
    }
}

/// Any spelling [`SamplerName`] parses (`dpmpp_2m_karras`, "DPM++ 2M Karras"); the error
/// lists kiln's names.
pub(super) fn sampler(s: &str) -> Result<SamplerName, String> {
    s.parse()
        .map_err(|e: kiln_proto::sampler::UnknownSampler| e.to_string())
}

/// A noise source: one of [`RNG_SOURCES`].
pub(super) fn rng(s: &str) -> Result<&'static str, String> {
    RNG_SOURCES
        .into_iter()
        .find(|r| *r == s)
        .ok_or_else(|| format!("unknown noise source `{s}` (rng: cpu, nv)"))
}

/// A variation seed: 0..=2^63-1 (TOML integers stop there).
pub(super) fn subseed(v: i64) -> Result<u64, String> {
    u64::try_from(v).map_err(|_| format!("{v} is outside 0..=2^63-1"))
}

/// A variation strength, 0..=1.
pub(super) fn subseed_strength(v: f64) -> Result<f32, String> {
    if v.is_finite() && (0.0..=f64::from(MAX_SUBSEED_STRENGTH)).contains(&v) {
        Ok(v as f32)
    } else {
        Err(format!("{v} is outside 0..=1"))
    }
}

/// A sampler's eta (DDIM's η, TCD's γ), 0..=1.
pub(super) fn eta(v: f64) -> Result<f32, String> {
    if v.is_finite() && (0.0..=1.0).contains(&v) {
        Ok(v as f32)
    } else {
        Err(format!("{v} is outside 0..=1"))
    }
}

/// A hires scale, 1..=4.
pub(super) fn hires_scale(v: f64) -> Result<f32, String> {
    if v.is_finite() && (1.0..=f64::from(MAX_HIRES_SCALE)).contains(&v) {
        Ok(v as f32)
    } else {
        Err(format!("{v} is outside 1..={MAX_HIRES_SCALE}"))
    }
}

/// A hires upscaler: kiln's names or A1111's.
pub(super) fn upscaler(s: &str) -> Result<Upscaler, String> {
    s.parse()
        .map_err(|e: kiln_proto::hires::UnknownUpscaler| e.to_string())
}

/// Hires steps, 0..=150 (0: the first pass's).
pub(super) fn hires_steps(v: i64) -> Result<u32, String> {
    match u32::try_from(v) {
        Ok(s) if s <= MAX_HIRES_STEPS => Ok(s),
        _ => Err(format!(
            "{v} is outside 0..={MAX_HIRES_STEPS} (0: as many as the first pass)"
        )),
    }
}

/// A hires denoising strength, above 0 and at most 1.
pub(super) fn hires_denoise(v: f64) -> Result<f32, String> {
    if v.is_finite() && v > 0.0 && v <= 1.0 {
        Ok(v as f32)
    } else {
        Err(format!("{v} is outside (0, 1] (above 0, at most 1)"))
    }
}

/// A hires sampler: any spelling of a k-diffusion sampler (the hires pass runs only those).
pub(super) fn hires_sampler(s: &str) -> Result<SamplerName, String> {
    let name = sampler(s)?;
    if name.method.is_k_diffusion() {
        Ok(name)
    } else {
        Err(format!(
            "`{name}` is not a k-diffusion sampler; the hires pass runs only those (euler, \
             euler_a, heun, dpmpp_2m, dpmpp_2s_a, each also _karras)"
        ))
    }
}

pub(super) fn clip_skip(v: i64) -> Result<u32, String> {
    if (1..=4).contains(&v) {
        Ok(v as u32)
    } else {
        Err(format!(
            "{v} is outside 1..=4 (1 is the last CLIP layer; A1111's \"Clip skip\")"
        ))
    }
}

pub(super) fn steps(v: i64) -> Result<u32, String> {
    match u32::try_from(v) {
        Ok(s) if (1..=150).contains(&s) => Ok(s),
        _ => Err(format!("{v} is outside 1..=150")),
    }
}

pub(super) fn cfg(v: f64) -> Result<f32, String> {
    if v.is_finite() && (0.0..=30.0).contains(&v) {
        Ok(v as f32)
    } else {
        Err(format!("{v} is outside 0..=30"))
    }
}

pub(super) fn strength(v: f64) -> Result<f32, String> {
    if v.is_finite() && v.abs() <= 100.0 {
        Ok(v as f32)
    } else {
        Err(format!("{v} is outside -100..=100"))
    }
}

pub(super) fn dimension(v: i64) -> Result<u32, String> {
    match u32::try_from(v) {
        Ok(d) if (64..=4096).contains(&d) && d % 8 == 0 => Ok(d),
        _ => Err(format!("{v} must be a multiple of 8 in 64..=4096")),
    }
}

/// `"512x768"` → (512, 768).
pub(super) fn size(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("`{s}` is not WIDTHxHEIGHT, e.g. \"512x768\"");
    let (w, h) = s.split_once(['x', 'X', '×']).ok_or_else(bad)?;
    let w: i64 = w.trim().parse().map_err(|_| bad())?;
    let h: i64 = h.trim().parse().map_err(|_| bad())?;
    Ok((dimension(w)?, dimension(h)?))
}
