//! kiln's CPU f32 kernels: blocked ("flash") attention, fused elementwise passes, a 2-D
//! convolution and dense layers, over plain slices.
//!
//! Owns the arithmetic only: [`attention`] (`softmax(q·kᵀ/√d + mask)·v` without the full score
//! matrix), [`elementwise`] (the GEGLU gate, CLIP's quick GELU and group norm + SiLU in one
//! pass each) and the vectorised math they share (`simd`: a fast `exp`, `erfc`, per-CPU code
//! paths), and [`conv`] (a 2-D convolution as blocked matrix products, bias and NCHW output in
//! the same pass; 1.3–6× candle's on SD1.5's shapes in `worker/benches/conv.rs`), and
//! [`dense`] (`x·Wᵀ + b` on `nn.Linear`'s weight as stored). Where the CPU has AVX-512F both
//! run on `blocked`, a register-blocked product that packs its right operand panel by panel
//! from where it lies; elsewhere they call `gemm`. It knows nothing of
//! tensors, devices or models: the worker's engine checks shapes and dtypes, hands contiguous
//! `f32` slices here, and keeps its own (candle) path for GPUs and other dtypes.
//!
//! Work is spread over rayon's global pool, whose size the worker fixes through
//! `RAYON_NUM_THREADS` (`kiln_worker::engine::threads`). This crate is built optimised even
//! in dev and test builds (`[profile.dev.package.kiln-kernels]` in the workspace manifest).

pub mod attention;
mod blocked;
pub mod conv;
pub mod dense;
pub mod elementwise;
mod simd;

pub use attention::{AttentionMask, AttentionShape, attention};
pub use elementwise::{GroupNormShape, geglu, group_norm, quick_gelu};

/// A kernel called with slices or sizes that do not fit together.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    /// A slice's length is not what the shape says.
    #[error("{what}: expected {expected} elements, got {got}")]
    Length {
        /// Which argument.
        what: &'static str,
        /// Elements the shape implies.
        expected: usize,
        /// Elements given.
        got: usize,
    },
    /// A shape that no kernel can run (a zero or inconsistent size).
    #[error("invalid shape: {0}")]
    Shape(String),
}

/// Checks that `slice` holds exactly `expected` elements.
fn check_len(what: &'static str, slice: &[f32], expected: usize) -> Result<(), KernelError> {
    if slice.len() == expected {
        Ok(())
    } else {
        Err(KernelError::Length {
            what,
            expected,
            got: slice.len(),
        })
    }
}
