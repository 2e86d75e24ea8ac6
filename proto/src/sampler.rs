//! Sampler names: what a sweep, `kiln render` and a PNG's metadata call each sampler.
//!
//! One [`SamplerName`] is a sampling method plus its noise schedule, spelled the way A1111
//! spelled its samplers before it split them ("DPM++ 2M Karras"), so one word in a sweep file,
//! one database column and one query filter say exactly what was run. kiln's own spelling is
//! snake case (`dpmpp_2m_karras`); A1111's ("DPM++ 2M Karras") and ComfyUI's
//! (`dpmpp_2s_ancestral`) parse too. The coordinator and the worker share this module, so a
//! name the coordinator accepts at submit time is one every worker of the same
//! [`RENDER_LEVEL`] renders.

use std::fmt;
use std::str::FromStr;

use crate::v1 as pb;

/// The render features this build understands, as one number: a worker sends it when it
/// registers and the coordinator never leases it a cell that needs more (see
/// [`SamplerName::render_level`]). Level 0: LCM and diffusers' Euler ancestral, CPU noise.
/// Level 1: the k-diffusion samplers, the Karras schedule, diffusers' DDIM, UniPC and TCD, the
/// sampler's eta, variation seeds, NV noise and the hires fix. Level 2: img2img (a cell's init
/// picture, fetched from the coordinator).
pub const RENDER_LEVEL: u32 = 2;

/// How a sampler walks from noise to image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    /// diffusers' `LCMScheduler`, for LCM-LoRA and LCM-distilled models (4–8 steps, CFG 1–2).
    #[default]
    Lcm,
    /// diffusers' `EulerAncestralDiscreteScheduler`, as InvokeAI and diffusers scripts run it.
    EulerADiffusers,
    /// k-diffusion's `sample_euler` (A1111 "Euler").
    Euler,
    /// k-diffusion's `sample_euler_ancestral` (A1111 "Euler a").
    EulerA,
    /// k-diffusion's `sample_heun` (A1111 "Heun"): two model passes a step.
    Heun,
    /// k-diffusion's `sample_dpmpp_2m` (A1111 "DPM++ 2M").
    Dpmpp2m,
    /// k-diffusion's `sample_dpmpp_2s_ancestral` (A1111 "DPM++ 2S a"): two passes a step.
    Dpmpp2sA,
    /// k-diffusion's `sample_dpmpp_sde` (A1111 "DPM++ SDE"): two passes a step, noise from a
    /// Brownian tree seeded by the image's seed.
    DpmppSde,
    /// diffusers' `DDIMScheduler` (A1111 "DDIM"); stochastic with eta > 0.
    Ddim,
    /// diffusers' `UniPCMultistepScheduler`, 2nd order, bh2 (A1111 "UniPC").
    UniPc,
    /// diffusers' `TCDScheduler`, for TCD-LoRA; its gamma (eta) defaults to 0.3.
    Tcd,
}

impl Method {
    /// Every method, in the order help texts list them.
    pub const ALL: [Method; 11] = [
        Method::Lcm,
        Method::Euler,
        Method::EulerA,
        Method::Heun,
        Method::Dpmpp2m,
        Method::Dpmpp2sA,
        Method::DpmppSde,
        Method::Ddim,
        Method::UniPc,
        Method::Tcd,
        Method::EulerADiffusers,
    ];

    /// kiln's name (without a schedule suffix).
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Lcm => "lcm",
            Method::EulerADiffusers => "euler_a_diffusers",
            Method::Euler => "euler",
            Method::EulerA => "euler_a",
            Method::Heun => "heun",
            Method::Dpmpp2m => "dpmpp_2m",
            Method::Dpmpp2sA => "dpmpp_2s_a",
            Method::DpmppSde => "dpmpp_sde",
            Method::Ddim => "ddim",
            Method::UniPc => "unipc",
            Method::Tcd => "tcd",
        }
    }

    /// A1111's name (without a schedule suffix).
    pub fn a1111_name(self) -> &'static str {
        match self {
            Method::Lcm => "LCM",
            // InvokeAI writes `euler_a`; A1111 readers know only "Euler a".
            Method::EulerADiffusers | Method::EulerA => "Euler a",
            Method::Euler => "Euler",
            Method::Heun => "Heun",
            Method::Dpmpp2m => "DPM++ 2M",
            Method::Dpmpp2sA => "DPM++ 2S a",
            Method::DpmppSde => "DPM++ SDE",
            Method::Ddim => "DDIM",
            Method::UniPc => "UniPC",
            Method::Tcd => "TCD",
        }
    }

    /// Whether the method is one of k-diffusion's, which step over a sigma schedule that can
    /// be [`Schedule::Karras`].
    pub fn is_k_diffusion(self) -> bool {
        !matches!(
            self,
            Method::Lcm | Method::EulerADiffusers | Method::Ddim | Method::UniPc | Method::Tcd
        )
    }

    /// Whether the method draws fresh noise during sampling.
    pub fn is_ancestral(self) -> bool {
        matches!(
            self,
            Method::EulerADiffusers
                | Method::EulerA
                | Method::Dpmpp2sA
                | Method::DpmppSde
                | Method::Lcm
                | Method::Tcd
        )
    }

    /// UNet evaluations per step (before classifier-free guidance doubles the batch); the
    /// last step of Heun and DPM++ 2S a takes one.
    pub fn passes_per_step(self) -> usize {
        match self {
            Method::Heun | Method::Dpmpp2sA | Method::DpmppSde => 2,
            _ => 1,
        }
    }
}

/// Which noise levels a k-diffusion sampler steps through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Schedule {
    /// The model's own timesteps, evenly spaced from the noisiest to the cleanest (A1111's
    /// default, k-diffusion's `get_sigmas`).
    #[default]
    Normal,
    /// Karras et al. (2022), ρ = 7 between the model's smallest and largest sigma.
    Karras,
}

/// A sampling method and its schedule: everything the word "sampler" means in a sweep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SamplerName {
    /// The method.
    pub method: Method,
    /// The schedule; always [`Schedule::Normal`] for methods that are not k-diffusion's.
    pub schedule: Schedule,
}

/// A sampler name nobody knows.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown sampler `{name}` (samplers: {known})")]
pub struct UnknownSampler {
    /// What was given (cut to 64 characters).
    pub name: String,
    /// The known kiln names, comma-separated.
    pub known: String,
}

impl SamplerName {
    /// LCM, kiln's default.
    pub const LCM: SamplerName = SamplerName::new(Method::Lcm);
    /// diffusers' Euler ancestral.
    pub const EULER_A_DIFFUSERS: SamplerName = SamplerName::new(Method::EulerADiffusers);

    /// `method` on its default schedule.
    pub const fn new(method: Method) -> Self {
        Self {
            method,
            schedule: Schedule::Normal,
        }
    }

    /// Every valid name, in kiln's spelling.
    pub fn all() -> Vec<SamplerName> {
        let mut all = Vec::new();
        for method in Method::ALL {
            all.push(SamplerName::new(method));
            if method.is_k_diffusion() {
                all.push(SamplerName {
                    method,
                    schedule: Schedule::Karras,
                });
            }
        }
        all
    }

    /// kiln's name: the method's, plus `_karras` on the Karras schedule.
    pub fn as_str(self) -> String {
        match self.schedule {
            Schedule::Normal => self.method.as_str().to_owned(),
            Schedule::Karras => format!("{}_karras", self.method.as_str()),
        }
    }

    /// The `Sampler:` value A1111 writes: "DPM++ 2M Karras", "Euler a".
    pub fn a1111_name(self) -> String {
        match self.schedule {
            Schedule::Normal => self.method.a1111_name().to_owned(),
            Schedule::Karras => format!("{} Karras", self.method.a1111_name()),
        }
    }

    /// The lowest [`RENDER_LEVEL`] that renders this sampler.
    pub fn render_level(self) -> u32 {
        match (self.method, self.schedule) {
            (Method::Lcm | Method::EulerADiffusers, Schedule::Normal) => 0,
            _ => 1,
        }
    }
}

/// A (sampler, schedule) pair off the wire that names no [`SamplerName`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadWireSampler {
    /// Not a `kiln.v1.Sampler` value this build knows (or `SAMPLER_UNSPECIFIED`).
    #[error("sampler: unknown value {0}")]
    Sampler(i32),
    /// Not a `kiln.v1.Schedule` value this build knows.
    #[error("schedule: unknown value {0}")]
    Schedule(i32),
    /// A Karras schedule on a method that is not k-diffusion's.
    #[error("schedule: `{0}` has no Karras schedule")]
    NoKarras(&'static str),
}

impl SamplerName {
    /// The wire form: `kiln.v1.Sampler` and `kiln.v1.Schedule`. The normal schedule is sent
    /// as `SCHEDULE_UNSPECIFIED`, which is what a client that never heard of schedules sends.
    pub fn to_proto(self) -> (pb::Sampler, pb::Schedule) {
        let sampler = match self.method {
            Method::Lcm => pb::Sampler::Lcm,
            Method::EulerADiffusers => pb::Sampler::EulerADiffusers,
            Method::Euler => pb::Sampler::Euler,
            Method::EulerA => pb::Sampler::EulerA,
            Method::Heun => pb::Sampler::Heun,
            Method::Dpmpp2m => pb::Sampler::Dpmpp2m,
            Method::Dpmpp2sA => pb::Sampler::Dpmpp2sA,
            Method::DpmppSde => pb::Sampler::DpmppSde,
            Method::Ddim => pb::Sampler::Ddim,
            Method::UniPc => pb::Sampler::Unipc,
            Method::Tcd => pb::Sampler::Tcd,
        };
        let schedule = match self.schedule {
            Schedule::Normal => pb::Schedule::Unspecified,
            Schedule::Karras => pb::Schedule::Karras,
        };
        (sampler, schedule)
    }

    /// Reads the wire form (the raw `i32`s of a message's `sampler` and `schedule`).
    pub fn from_proto(sampler: i32, schedule: i32) -> Result<Self, BadWireSampler> {
        let method = match pb::Sampler::try_from(sampler) {
            Ok(pb::Sampler::Lcm) => Method::Lcm,
            Ok(pb::Sampler::EulerADiffusers) => Method::EulerADiffusers,
            Ok(pb::Sampler::Euler) => Method::Euler,
            Ok(pb::Sampler::EulerA) => Method::EulerA,
            Ok(pb::Sampler::Heun) => Method::Heun,
            Ok(pb::Sampler::Dpmpp2m) => Method::Dpmpp2m,
            Ok(pb::Sampler::Dpmpp2sA) => Method::Dpmpp2sA,
            Ok(pb::Sampler::DpmppSde) => Method::DpmppSde,
            Ok(pb::Sampler::Ddim) => Method::Ddim,
            Ok(pb::Sampler::Unipc) => Method::UniPc,
            Ok(pb::Sampler::Tcd) => Method::Tcd,
            Ok(pb::Sampler::Unspecified) | Err(_) => return Err(BadWireSampler::Sampler(sampler)),
        };
        let schedule = match pb::Schedule::try_from(schedule) {
            Ok(pb::Schedule::Unspecified | pb::Schedule::Normal) => Schedule::Normal,
            Ok(pb::Schedule::Karras) => Schedule::Karras,
            Err(_) => return Err(BadWireSampler::Schedule(schedule)),
        };
        if schedule == Schedule::Karras && !method.is_k_diffusion() {
            return Err(BadWireSampler::NoKarras(method.as_str()));
        }
        Ok(SamplerName { method, schedule })
    }
}

impl fmt::Display for SamplerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str())
    }
}

impl FromStr for SamplerName {
    type Err = UnknownSampler;

    /// kiln's names, A1111's ("DPM++ 2M Karras", any case) and ComfyUI's method names
    /// (`euler_ancestral`, `dpmpp_2s_ancestral`, with `_karras`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || UnknownSampler {
            name: s.chars().take(64).collect(),
            known: SamplerName::all()
                .iter()
                .map(|n| n.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        };
        let lower = s.trim().to_ascii_lowercase();
        let (base, schedule) = if let Some(base) = lower
            .strip_suffix("_karras")
            .or_else(|| lower.strip_suffix(" karras"))
        {
            (base, Schedule::Karras)
        } else {
            (lower.as_str(), Schedule::Normal)
        };
        let method = match base {
            "lcm" => Method::Lcm,
            "euler_a_diffusers" => Method::EulerADiffusers,
            "euler" => Method::Euler,
            "euler_a" | "euler a" | "euler_ancestral" => Method::EulerA,
            "heun" => Method::Heun,
            "dpmpp_2m" | "dpm++ 2m" => Method::Dpmpp2m,
            "dpmpp_2s_a" | "dpm++ 2s a" | "dpmpp_2s_ancestral" => Method::Dpmpp2sA,
            "dpmpp_sde" | "dpm++ sde" => Method::DpmppSde,
            "ddim" => Method::Ddim,
            "unipc" | "uni_pc" => Method::UniPc,
            "tcd" => Method::Tcd,
            _ => return Err(unknown()),
        };
        if schedule == Schedule::Karras && !method.is_k_diffusion() {
            return Err(unknown());
        }
        Ok(SamplerName { method, schedule })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_round_trips_in_both_spellings() {
        for name in SamplerName::all() {
            assert_eq!(name.as_str().parse::<SamplerName>(), Ok(name));
            if name.method != Method::EulerADiffusers {
                assert_eq!(name.a1111_name().parse::<SamplerName>(), Ok(name), "{name}");
            }
        }
    }

    #[test]
    fn a1111_and_comfyui_spellings_parse() {
        let karras = |method| SamplerName {
            method,
            schedule: Schedule::Karras,
        };
        assert_eq!("DPM++ 2S a Karras".parse(), Ok(karras(Method::Dpmpp2sA)));
        assert_eq!(
            "dpmpp_2s_ancestral_karras".parse(),
            Ok(karras(Method::Dpmpp2sA))
        );
        assert_eq!(" Euler A ".parse(), Ok(SamplerName::new(Method::EulerA)));
        assert_eq!(karras(Method::Dpmpp2m).a1111_name(), "DPM++ 2M Karras");
        assert_eq!(karras(Method::Dpmpp2m).as_str(), "dpmpp_2m_karras");
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        for bad in ["ddpm", "lcm_karras", "euler_a_diffusers_karras", ""] {
            let err = bad.parse::<SamplerName>().unwrap_err();
            let text = err.to_string();
            assert!(text.contains("dpmpp_2s_a_karras"), "{text}");
            assert!(text.contains(&format!("`{bad}`")), "{text}");
        }
    }

    #[test]
    fn every_name_round_trips_through_the_wire() {
        for name in SamplerName::all() {
            let (sampler, schedule) = name.to_proto();
            assert_eq!(
                SamplerName::from_proto(sampler as i32, schedule as i32),
                Ok(name),
                "{name}"
            );
        }
        // Value 2 is what SAMPLER_EULER_A meant before k-diffusion: diffusers' Euler a.
        assert_eq!(
            SamplerName::from_proto(2, 0),
            Ok(SamplerName::EULER_A_DIFFUSERS)
        );
        assert_eq!(
            SamplerName::from_proto(pb::Sampler::Heun as i32, pb::Schedule::Normal as i32),
            Ok(SamplerName::new(Method::Heun))
        );
    }

    #[test]
    fn bad_wire_values_are_refused() {
        assert_eq!(
            SamplerName::from_proto(0, 0),
            Err(BadWireSampler::Sampler(0))
        );
        assert_eq!(
            SamplerName::from_proto(99, 0),
            Err(BadWireSampler::Sampler(99))
        );
        assert_eq!(
            SamplerName::from_proto(pb::Sampler::Euler as i32, 7),
            Err(BadWireSampler::Schedule(7))
        );
        assert_eq!(
            SamplerName::from_proto(pb::Sampler::Lcm as i32, pb::Schedule::Karras as i32),
            Err(BadWireSampler::NoKarras("lcm"))
        );
    }

    #[test]
    fn levels_say_what_an_older_worker_can_render() {
        assert_eq!(SamplerName::new(Method::Lcm).render_level(), 0);
        assert_eq!(SamplerName::new(Method::EulerADiffusers).render_level(), 0);
        for name in SamplerName::all() {
            assert!(name.render_level() <= RENDER_LEVEL);
        }
        assert_eq!(SamplerName::new(Method::EulerA).render_level(), 1);
    }
}
