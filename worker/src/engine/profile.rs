//! The networks' operations as `tracing` spans, for profiling.
//!
//! Every convolution, dense layer, norm, attention core and GEGLU gate runs inside a
//! trace-level span named `op` with a `kind` field ([`OpKind::name`]); a subscriber that
//! times spans (the engine benchmark's, `worker/benches/engine.rs`) turns them into seconds per
//! kind. With no subscriber interested in trace-level spans a span costs one relaxed atomic
//! load. CPU tensor operations are synchronous, so a span times its work; on a GPU it would
//! only time kernel launches.

/// The operation kinds the benchmark reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OpKind {
    /// 2-D convolutions (including 1×1 projections).
    Convolution,
    /// The attention core: `softmax(q·kᵀ)·v`.
    Attention,
    /// Dense layers (q/k/v/out projections, MLPs, time embedding).
    Linear,
    /// The GEGLU gate (`hidden · gelu(gate)`).
    Geglu,
    /// Group and layer norms (on the CPU in f32, with the SiLU that follows a resnet's group
    /// norm fused in).
    Norm,
}

impl OpKind {
    /// Every kind, in report order.
    pub const ALL: [OpKind; 5] = [
        Self::Convolution,
        Self::Attention,
        Self::Linear,
        Self::Geglu,
        Self::Norm,
    ];

    /// A short name for tables, and the `kind` field of its spans.
    pub fn name(self) -> &'static str {
        match self {
            Self::Convolution => "convolutions",
            Self::Attention => "attention",
            Self::Linear => "linear",
            Self::Geglu => "GEGLU",
            Self::Norm => "norms",
        }
    }
}

/// Runs `f` inside a trace-level span `op` with `kind`.
pub(crate) fn timed<T>(kind: OpKind, f: impl FnOnce() -> T) -> T {
    let _span = tracing::trace_span!("op", kind = kind.name()).entered();
    f()
}
