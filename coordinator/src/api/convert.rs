//! Conversions between `kiln.v1` messages and the coordinator's own types. Wire values that can
//! be wrong (zero ids, unknown enum numbers, missing fields) become `Error::Invalid` naming the
//! field.

use kiln_proto::hires::{UnknownUpscaler, Upscaler};
use kiln_proto::sampler::SamplerName;
use kiln_proto::v1 as pb;
use kiln_proto::{Attempt, CellId, SweepId, WorkerId};

use crate::domain::lease::Fence;
use crate::domain::rows::{
    CellRow, MAX_RATING, ProgressRow, StateCounts, SweepRow, WorkerRegistration,
};
use crate::domain::state::{CellState, DeviceKind, FailureClass, SweepState};
use crate::queue::pauses::Control;
use crate::result::RenderResult;
use crate::sweep::{CellSpec, DEFAULT_INIT_STRENGTH, HiresSpec, InitSpec, LoraSpec};
use crate::{Error, Result};

pub(super) fn sweep_id(v: u64) -> Result<SweepId> {
    SweepId::from_wire(v).ok_or_else(|| Error::invalid("sweep_id: must be a positive id"))
}

pub(super) fn worker_id(v: u64) -> Result<WorkerId> {
    WorkerId::from_wire(v).ok_or_else(|| Error::invalid("worker_id: must be a positive id"))
}

/// What a `SetKeeper` asks: the cell, its star and its rating (`None`: left as it is).
pub(super) fn keeper_from_wire(
    r: &pb::SetKeeperRequest,
) -> Result<(CellId, Option<bool>, Option<u8>)> {
    let cell = CellId::from_wire(r.cell_id)
        .ok_or_else(|| Error::invalid("cell_id: must be a positive id"))?;
    let rating = match r.rating {
        None => None,
        Some(v) => Some(
            u8::try_from(v)
                .ok()
                .filter(|v| *v <= MAX_RATING)
                .ok_or_else(|| {
                    Error::invalid(format!("rating {v}: 0 (not rated) to {MAX_RATING}"))
                })?,
        ),
    };
    Ok((cell, r.starred, rating))
}

pub(super) fn attempt_ref(a: Option<&pb::AttemptRef>) -> Result<(CellId, Attempt)> {
    let a = a.ok_or_else(|| Error::invalid("attempt: required"))?;
    let cell = CellId::from_wire(a.cell_id)
        .ok_or_else(|| Error::invalid("attempt.cell_id: must be a positive id"))?;
    let attempt = Attempt::from_wire(a.attempt)
        .ok_or_else(|| Error::invalid("attempt.attempt: must be >= 1"))?;
    Ok((cell, attempt))
}

pub(super) fn fence(worker: u64, a: Option<&pb::AttemptRef>) -> Result<Fence> {
    let worker = worker_id(worker)?;
    let (cell, attempt) = attempt_ref(a)?;
    Ok(Fence {
        cell,
        attempt,
        worker,
    })
}

pub(super) fn attempt_to_wire(cell: CellId, attempt: Attempt) -> pb::AttemptRef {
    pb::AttemptRef {
        cell_id: cell.0 as u64,
        attempt: attempt.0 as u32,
    }
}

pub(super) fn cell_from_wire(c: pb::RenderCell) -> Result<CellSpec> {
    let sampler = SamplerName::from_proto(c.sampler, c.schedule)
        .map_err(|e| Error::invalid(e.to_string()))?;
    let rng = match pb::RngSource::try_from(c.rng) {
        Ok(pb::RngSource::Unspecified | pb::RngSource::Cpu) => "cpu",
        Ok(pb::RngSource::Nv) => "nv",
        Err(_) => return Err(Error::invalid(format!("rng: {} is unknown", c.rng))),
    };
    let seed_resize_from = match (c.seed_resize_from_width, c.seed_resize_from_height) {
        (0, 0) => None,
        (w, h) => Some((w, h)),
    };
    let hires = hires_from_wire(&c)?;
    let init = init_from_wire(&c)?;
    Ok(CellSpec {
        model: c.model,
        loras: c
            .loras
            .into_iter()
            .map(|l| LoraSpec {
                name: l.name,
                strength: l.strength,
                sha256: l.sha256,
            })
            .collect(),
        prompt: c.prompt,
        negative_prompt: c.negative_prompt,
        seed: c.seed,
        steps: c.steps,
        cfg: c.cfg,
        sampler,
        width: c.width,
        height: c.height,
        rng: rng.into(),
        bindings: c.bindings.into_iter().collect(),
        min_memory_mib: c.min_memory_mib,
        vae: c.vae,
        clip_skip: c.clip_skip.max(1),
        subseed: c.subseed,
        subseed_strength: c.subseed_strength,
        seed_resize_from,
        hires,
        eta: c.eta,
        init,
        // A client that plans itself may pin by content; `validate` checks the form.
        model_sha256: c.model_sha256,
        vae_sha256: c.vae_sha256,
    })
}

/// img2img of a wire cell: off when `init_image_sha256` is empty. A cell sent without a name
/// for its picture is named by its hash.
fn init_from_wire(c: &pb::RenderCell) -> Result<Option<InitSpec>> {
    if c.init_image_sha256.is_empty() {
        if c.strength != 0.0 || !c.init_image_name.is_empty() {
            return Err(Error::invalid(
                "strength/init_image_name: need init_image_sha256 (img2img's picture)",
            ));
        }
        return Ok(None);
    }
    Ok(Some(InitSpec {
        name: if c.init_image_name.is_empty() {
            format!("sha256:{}", c.init_image_sha256)
        } else {
            c.init_image_name.clone()
        },
        sha256: c.init_image_sha256.clone(),
        strength: if c.strength == 0.0 {
            DEFAULT_INIT_STRENGTH
        } else {
            c.strength
        },
    }))
}

/// The hires fix of a wire cell: off when `hires_denoise` is 0. What the values may be is
/// [`CellSpec::validate`]'s to say.
fn hires_from_wire(c: &pb::RenderCell) -> Result<Option<HiresSpec>> {
    if c.hires_denoise == 0.0 {
        return Ok(None);
    }
    let upscaler = match c.hires_upscaler.as_str() {
        "" => Upscaler::default(),
        name => name
            .parse()
            .map_err(|e: UnknownUpscaler| Error::invalid(format!("hires_upscaler: {e}")))?,
    };
    let sampler = match c.hires_sampler {
        0 => None,
        _ => Some(
            SamplerName::from_proto(c.hires_sampler, c.hires_schedule)
                .map_err(|e| Error::invalid(format!("hires_sampler: {e}")))?,
        ),
    };
    let size = match (c.hires_scale, c.hires_width, c.hires_height) {
        (s, _, _) if s != 0.0 => None,
        (_, w, h) => Some((w, h)),
    };
    Ok(Some(HiresSpec {
        scale: c.hires_scale,
        size,
        upscaler,
        steps: c.hires_steps,
        denoise: c.hires_denoise,
        sampler,
    }))
}

pub(super) fn cell_to_wire(s: CellSpec) -> pb::RenderCell {
    let (sampler, schedule) = s.sampler.to_proto();
    let hires = s.hires;
    let (hires_sampler, hires_schedule) = hires.and_then(|h| h.sampler).map_or((0, 0), |n| {
        let (m, s) = n.to_proto();
        (m as i32, s as i32)
    });
    let (hires_width, hires_height) = hires.and_then(|h| h.size).unwrap_or((0, 0));
    pb::RenderCell {
        model: s.model,
        loras: s
            .loras
            .into_iter()
            .map(|l| pb::LoraRef {
                name: l.name,
                strength: l.strength,
                sha256: l.sha256,
            })
            .collect(),
        prompt: s.prompt,
        negative_prompt: s.negative_prompt,
        seed: s.seed,
        steps: s.steps,
        cfg: s.cfg,
        sampler: sampler as i32,
        schedule: schedule as i32,
        width: s.width,
        height: s.height,
        rng: if s.rng == "nv" {
            pb::RngSource::Nv
        } else {
            pb::RngSource::Cpu
        } as i32,
        bindings: s.bindings.into_iter().collect(),
        min_memory_mib: s.min_memory_mib,
        vae: s.vae,
        clip_skip: s.clip_skip,
        subseed: s.subseed,
        subseed_strength: s.subseed_strength,
        seed_resize_from_width: s.seed_resize_from.map_or(0, |(w, _)| w),
        seed_resize_from_height: s.seed_resize_from.map_or(0, |(_, h)| h),
        hires_scale: hires.map_or(0.0, |h| h.scale),
        hires_width,
        hires_height,
        hires_upscaler: hires.map_or(String::new(), |h| h.upscaler.as_str().to_owned()),
        hires_steps: hires.map_or(0, |h| h.steps),
        hires_denoise: hires.map_or(0.0, |h| h.denoise),
        hires_sampler,
        hires_schedule,
        eta: s.eta,
        init_image_sha256: s.init.as_ref().map_or(String::new(), |i| i.sha256.clone()),
        init_image_name: s.init.as_ref().map_or(String::new(), |i| i.name.clone()),
        strength: s.init.as_ref().map_or(0.0, |i| i.strength),
        // Pinned at submit (`sweep::pins`). Embeddings are not pinned yet: a prompt's
        // embeddings are the worker's files.
        model_sha256: s.model_sha256,
        vae_sha256: s.vae_sha256,
        embedding_sha256: Default::default(),
    }
}

pub(super) fn spec_from_json(json: &str) -> Result<CellSpec> {
    serde_json::from_str(json).map_err(|e| Error::Corrupt(format!("cells.spec: {e}")))
}

pub(super) fn cell_state_to_wire(s: CellState) -> i32 {
    (match s {
        CellState::Available => pb::CellState::Available,
        CellState::Scheduled => pb::CellState::Scheduled,
        CellState::Running => pb::CellState::Running,
        CellState::Retryable => pb::CellState::Retryable,
        CellState::Held => pb::CellState::Held,
        CellState::Completed => pb::CellState::Completed,
        CellState::Cancelled => pb::CellState::Cancelled,
        CellState::Discarded => pb::CellState::Discarded,
    }) as i32
}

pub(super) fn cell_state_from_wire(v: i32) -> Result<CellState> {
    Ok(match pb::CellState::try_from(v) {
        Ok(pb::CellState::Available) => CellState::Available,
        Ok(pb::CellState::Scheduled) => CellState::Scheduled,
        Ok(pb::CellState::Running) => CellState::Running,
        Ok(pb::CellState::Retryable) => CellState::Retryable,
        Ok(pb::CellState::Held) => CellState::Held,
        Ok(pb::CellState::Completed) => CellState::Completed,
        Ok(pb::CellState::Cancelled) => CellState::Cancelled,
        Ok(pb::CellState::Discarded) => CellState::Discarded,
        _ => return Err(Error::invalid(format!("states: {v} is not a cell state"))),
    })
}

pub(super) fn failure_class_from_wire(v: i32) -> Result<FailureClass> {
    Ok(match pb::FailureClass::try_from(v) {
        Ok(pb::FailureClass::BadInput) => FailureClass::BadInput,
        Ok(pb::FailureClass::Resource) => FailureClass::Resource,
        Ok(pb::FailureClass::Transient) => FailureClass::Transient,
        Ok(pb::FailureClass::Cancelled) => FailureClass::Cancelled,
        Ok(pb::FailureClass::LeaseExpired) => FailureClass::LeaseExpired,
        _ => return Err(Error::invalid(format!("class: {v} is not a failure class"))),
    })
}

fn failure_class_to_wire(c: FailureClass) -> i32 {
    (match c {
        FailureClass::BadInput => pb::FailureClass::BadInput,
        FailureClass::Resource => pb::FailureClass::Resource,
        FailureClass::Transient => pb::FailureClass::Transient,
        FailureClass::Cancelled => pb::FailureClass::Cancelled,
        FailureClass::LeaseExpired => pb::FailureClass::LeaseExpired,
    }) as i32
}

pub(super) fn counts_to_wire(c: &StateCounts) -> pb::SweepCounts {
    pb::SweepCounts {
        total: c.total(),
        available: c.available,
        scheduled: c.scheduled,
        running: c.running,
        retryable: c.retryable,
        held: c.held,
        completed: c.completed,
        cancelled: c.cancelled,
        discarded: c.discarded,
    }
}

pub(super) fn sweep_to_wire(s: &SweepRow) -> pb::Sweep {
    pb::Sweep {
        id: s.id.0 as u64,
        name: s.name.clone(),
        idempotency_key: s.idempotency_key.clone(),
        priority: s.priority,
        max_attempts: s.max_attempts as u32,
        state: (match s.state {
            SweepState::Active => pb::SweepState::Active,
            SweepState::Paused => pb::SweepState::Paused,
            SweepState::Cancelled => pb::SweepState::Cancelled,
        }) as i32,
        created_at_ms: s.created_at,
        counts: Some(counts_to_wire(&s.counts)),
        finished: s.counts.finished(),
    }
}

pub(super) fn progress_to_wire(p: &ProgressRow) -> pb::CellProgress {
    pb::CellProgress {
        cell_id: p.cell.0 as u64,
        number: p.number as u32,
        attempt: p.attempt as u32,
        worker_id: p.worker.0 as u64,
        step: p.step as u32,
        total_steps: p.total as u32,
        activity: p.activity.clone(),
    }
}

pub(super) fn result_from_wire(r: pb::RenderResult) -> RenderResult {
    RenderResult {
        object_key: r.object_key,
        storage: r.storage,
        sha256: r.sha256.to_ascii_lowercase(),
        bytes: r.bytes,
        width: r.width,
        height: r.height,
        device: r.device,
        timings_ms: r.timings_ms.into_iter().collect(),
        parameters: r.parameters,
        notes: r.notes,
    }
}

fn result_to_wire(r: RenderResult) -> pb::RenderResult {
    pb::RenderResult {
        object_key: r.object_key,
        storage: r.storage,
        sha256: r.sha256,
        bytes: r.bytes,
        width: r.width,
        height: r.height,
        device: r.device,
        timings_ms: r.timings_ms.into_iter().collect(),
        parameters: r.parameters,
        notes: r.notes,
    }
}

pub(super) fn cell_record_to_wire(c: CellRow) -> Result<pb::CellRecord> {
    let errors: Vec<crate::domain::failure::ErrorEntry> = serde_json::from_str(&c.errors_json)
        .map_err(|e| Error::Corrupt(format!("cells.errors: {e}")))?;
    let result = c
        .result_json
        .as_deref()
        .map(RenderResult::from_json)
        .transpose()?
        .map(result_to_wire);
    Ok(pb::CellRecord {
        cell_id: c.id.0 as u64,
        sweep_id: c.sweep_id.0 as u64,
        number: c.number as u32,
        cell_key: c.cell_key,
        cell: Some(cell_to_wire(spec_from_json(&c.spec_json)?)),
        state: cell_state_to_wire(c.state),
        attempt: c.attempt as u32,
        max_attempts: c.max_attempts as u32,
        result,
        worker_id: c.worker.map_or(0, |w| w.0 as u64),
        finished_at_ms: c.finalized_at.unwrap_or(0),
        starred: c.starred,
        rating: u32::from(c.rating),
        errors: errors
            .into_iter()
            .map(|e| pb::AttemptError {
                attempt: e.attempt as u32,
                worker_id: e.worker as u64,
                class: failure_class_to_wire(e.class),
                message: e.message,
                at_ms: e.at,
            })
            .collect(),
    })
}

pub(super) fn registration_from_wire(info: Option<pb::WorkerInfo>) -> Result<WorkerRegistration> {
    let info = info.ok_or_else(|| Error::invalid("info: required"))?;
    let device_kind = match pb::DeviceKind::try_from(info.device_kind) {
        Ok(pb::DeviceKind::Unspecified) => DeviceKind::Unspecified,
        Ok(pb::DeviceKind::Cpu) => DeviceKind::Cpu,
        Ok(pb::DeviceKind::Cuda) => DeviceKind::Cuda,
        Ok(pb::DeviceKind::Metal) => DeviceKind::Metal,
        Err(_) => {
            return Err(Error::invalid(format!(
                "info.device_kind: {} is unknown",
                info.device_kind
            )));
        }
    };
    Ok(WorkerRegistration {
        name: info.name,
        device_kind,
        device_model: info.device_model,
        memory_mib: i64::try_from(info.memory_mib)
            .map_err(|_| Error::invalid("info.memory_mib: too large"))?,
        max_pixels: i64::try_from(info.max_pixels)
            .map_err(|_| Error::invalid("info.max_pixels: too large"))?,
        loaded: info.loaded,
        version: info.version,
        storage: info.storage,
        render_level: info.render_level,
    })
}

pub(super) fn registration_to_wire(r: WorkerRegistration) -> pb::WorkerInfo {
    pb::WorkerInfo {
        name: r.name,
        device_kind: (match r.device_kind {
            DeviceKind::Unspecified => pb::DeviceKind::Unspecified,
            DeviceKind::Cpu => pb::DeviceKind::Cpu,
            DeviceKind::Cuda => pb::DeviceKind::Cuda,
            DeviceKind::Metal => pb::DeviceKind::Metal,
        }) as i32,
        device_model: r.device_model,
        memory_mib: r.memory_mib.max(0) as u64,
        max_pixels: r.max_pixels.max(0) as u64,
        loaded: r.loaded,
        version: r.version,
        storage: r.storage,
        render_level: r.render_level,
    }
}

/// The admin's order for a worker, as the wire's.
pub fn control_to_wire(c: Control) -> pb::WorkerControl {
    match c {
        Control::None => pb::WorkerControl::Unspecified,
        Control::Pause => pb::WorkerControl::Pause,
        Control::Drain => pb::WorkerControl::Drain,
    }
}

/// The admin's order from the wire (RESUME clears any order).
pub fn control_from_wire(c: i32) -> Result<Control> {
    match pb::WorkerControl::try_from(c) {
        Ok(pb::WorkerControl::Pause) => Ok(Control::Pause),
        Ok(pb::WorkerControl::Drain) => Ok(Control::Drain),
        Ok(pb::WorkerControl::Resume) => Ok(Control::None),
        _ => Err(Error::invalid("control: PAUSE, RESUME or DRAIN")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire() -> pb::RenderCell {
        pb::RenderCell {
            model: "m".into(),
            prompt: "a fox".into(),
            seed: 1,
            steps: 20,
            cfg: 7.0,
            sampler: pb::Sampler::Dpmpp2m as i32,
            schedule: pb::Schedule::Karras as i32,
            width: 512,
            height: 512,
            rng: pb::RngSource::Nv as i32,
            subseed: 5,
            subseed_strength: 0.5,
            seed_resize_from_width: 640,
            seed_resize_from_height: 448,
            ..Default::default()
        }
    }

    #[test]
    fn new_cell_fields_round_trip() {
        let spec = cell_from_wire(wire()).unwrap();
        assert_eq!(spec.sampler.as_str(), "dpmpp_2m_karras");
        assert_eq!(spec.rng, "nv");
        assert_eq!(
            (spec.subseed, spec.subseed_strength, spec.seed_resize_from),
            (5, 0.5, Some((640, 448)))
        );
        let back = cell_to_wire(spec);
        let w = wire();
        assert_eq!(
            (back.sampler, back.schedule, back.rng, back.subseed),
            (w.sampler, w.schedule, w.rng, w.subseed)
        );
        assert_eq!(
            (back.seed_resize_from_width, back.seed_resize_from_height),
            (640, 448)
        );
        // An older client's cell: value 2 is diffusers' Euler a, no schedule, CPU noise.
        let old = pb::RenderCell {
            sampler: 2,
            schedule: 0,
            rng: 0,
            subseed: 0,
            subseed_strength: 0.0,
            seed_resize_from_width: 0,
            seed_resize_from_height: 0,
            ..wire()
        };
        let spec = cell_from_wire(old).unwrap();
        assert_eq!(spec.sampler, SamplerName::EULER_A_DIFFUSERS);
        assert_eq!((spec.rng.as_str(), spec.seed_resize_from), ("cpu", None));
        assert_eq!(spec.render_level(), 0);
    }

    #[test]
    fn bad_wire_samplers_name_the_field() {
        for (sampler, schedule, want) in [(0, 0, "sampler"), (99, 0, "sampler"), (1, 2, "Karras")] {
            let c = pb::RenderCell {
                sampler,
                schedule,
                ..wire()
            };
            let e = cell_from_wire(c).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
