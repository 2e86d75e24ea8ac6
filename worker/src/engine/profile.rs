//! An opt-in wall-clock profile of the networks by operation kind, for the benchmark.
//!
//! Owns a process-wide table of seconds per [`OpKind`], filled only between [`start`] and
//! [`finish`] (one relaxed atomic load per operation otherwise). CPU tensor operations are
//! synchronous, so timing a call times its work; on a GPU the numbers would only measure
//! kernel launches.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

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
    /// Group and layer norms.
    Norm,
}

impl OpKind {
    /// A short name for tables.
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

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<Vec<(OpKind, f64)>> = Mutex::new(Vec::new());

/// Clears the table and starts recording.
pub fn start() {
    if let Ok(mut totals) = TOTALS.lock() {
        totals.clear();
    }
    ENABLED.store(true, Ordering::Relaxed);
}

/// Stops recording and returns seconds per kind, in [`OpKind`] order.
pub fn finish() -> Vec<(OpKind, f64)> {
    ENABLED.store(false, Ordering::Relaxed);
    let mut totals = TOTALS.lock().map(|t| t.clone()).unwrap_or_default();
    totals.sort_by_key(|(kind, _)| *kind);
    totals
}

/// Runs `f`, adding its wall time to `kind` while recording.
pub(crate) fn timed<T>(kind: OpKind, f: impl FnOnce() -> T) -> T {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    let start = Instant::now();
    let out = f();
    let elapsed = start.elapsed().as_secs_f64();
    if let Ok(mut totals) = TOTALS.lock() {
        match totals.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, total)) => *total += elapsed,
            None => totals.push((kind, elapsed)),
        }
    }
    out
}
