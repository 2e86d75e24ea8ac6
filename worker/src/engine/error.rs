//! The engine's error type: one enum for loading, LoRA merging and rendering.
//!
//! Variants name what a caller (the CLI, the worker agent) can act on: a model folder missing a
//! part, a damaged weights file, a LoRA that does not fit the model, a request the engine
//! cannot render. Failures inside tensor maths are wrapped opaquely so that no candle type
//! crosses the engine boundary.

use std::path::PathBuf;

use crate::engine::scheduler::SchedulerError;
use crate::engine::text::tokenizer::TokenizerError;

/// Why a model could not be loaded or an image could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A diffusers model folder lacks a component (`unet/`, `vae/`, ...) or its weights.
    #[error("model folder {} has no {part}: expected {expected}", folder.display())]
    MissingPart {
        /// The model folder.
        folder: PathBuf,
        /// The component, e.g. `unet`.
        part: &'static str,
        /// What was looked for.
        expected: String,
    },
    /// A pickle file (a `.ckpt` checkpoint, a `.pt` embedding, …): unpickling runs code from the
    /// file.
    #[error(
        "{} is a pickle file: loading one can run any code it contains, so kiln never opens them. \
         Convert it once, on a machine you trust, to .safetensors (e.g. `{convert}`) or download \
         the .safetensors version its page offers",
        path.display()
    )]
    Pickle {
        /// The file.
        path: PathBuf,
        /// A command that converts it, for the message.
        convert: String,
    },
    /// A checkpoint of a model family the engine does not render (yet).
    #[error("{}: {detected} is not supported yet; kiln renders SD1.x models", path.display())]
    Unsupported {
        /// The file or folder.
        path: PathBuf,
        /// What was detected, e.g. "an SDXL checkpoint (conditioner.embedders.* keys)".
        detected: String,
    },
    /// No model folder or checkpoint file at a path.
    #[error("no model folder or checkpoint file at {}", path.display())]
    ModelNotFound {
        /// The path given.
        path: PathBuf,
    },
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file is truncated, corrupt or holds an unsupported dtype.
    #[error("{} is not a usable safetensors file (truncated or corrupt?): {reason}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the parser reported.
        reason: String,
    },
    /// A `config.json` is malformed or describes an architecture the engine does not implement.
    #[error("{}: {reason}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A weights file lacks a tensor the architecture needs.
    #[error("{file}: tensor `{name}` is missing")]
    MissingTensor {
        /// The weights file.
        file: String,
        /// The tensor's full name.
        name: String,
    },
    /// A tensor's shape does not match the architecture in `config.json`.
    #[error("{file}: tensor `{name}` has shape {found:?}, the config implies {expected:?}")]
    Shape {
        /// The weights file.
        file: String,
        /// The tensor's full name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// LoRA keys that match no module of the model. Never skipped silently.
    #[error("LoRA {}: {} key(s) match no module of the model: {}", path.display(), keys.len(), keys.join(", "))]
    LoraUnknownKeys {
        /// The LoRA file.
        path: PathBuf,
        /// Every unmatched key, sorted.
        keys: Vec<String>,
    },
    /// A LoRA file that is malformed (missing half of a pair, wrong shapes, bad strength).
    #[error("LoRA {}: {reason}", path.display())]
    Lora {
        /// The LoRA file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A textual-inversion embedding file that is malformed, or that does not fit the model it
    /// is used with (its width is not the text encoder's).
    #[error("embedding {}: {reason}", path.display())]
    Inversion {
        /// The embedding file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A prompt names an embedding whose file could not be loaded (a pickle, an SDXL
    /// embedding, a malformed file): rendering the name as plain words would silently give
    /// another image than A1111 gives.
    #[error("the prompt uses the embedding {name}, which cannot be used: {error}")]
    InversionRefused {
        /// The embedding's name (its file stem).
        name: String,
        /// Why its file was refused (in the message, not a `source`, so a chain printer does
        /// not say it twice).
        error: std::sync::Arc<EngineError>,
    },
    /// A render request the engine cannot honour (size, steps, CFG).
    #[error("invalid render request: {0}")]
    InvalidRequest(String),
    /// A prompt or negative prompt that does not parse (an unbalanced bracket, a bad weight,
    /// A1111 syntax kiln does not support).
    #[error("invalid {which}: {error}")]
    Prompt {
        /// `prompt` or `negative prompt`.
        which: &'static str,
        /// Why (in the message, not a `source`, so a chain printer does not say it twice).
        error: kiln_proto::prompt::PromptError,
    },
    /// The sampler rejected its schedule or a step.
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    /// The tokenizer could not be built.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The render was cancelled through its cancel flag.
    #[error("render cancelled")]
    Cancelled,
    /// The compute device could not be opened (e.g. a GPU backend not compiled in).
    #[error("cannot use device {device}: {reason}")]
    Device {
        /// The requested device.
        device: String,
        /// The backend's error (in the message, not a `source`, so that a chain printer
        /// does not say it twice).
        reason: ComputeError,
    },
    /// PNG encoding failed.
    #[error("PNG encoding failed: {0}")]
    Png(String),
    /// A tensor operation failed (a bug or out of memory, not bad input).
    #[error("tensor computation failed: {0}")]
    Compute(#[from] ComputeError),
}

/// An error from the tensor backend, kept opaque so candle stays inside the engine.
#[derive(Debug)]
pub struct ComputeError(candle_core::Error);

impl ComputeError {
    /// Whether the device ran out of memory: the CUDA driver's `OUT_OF_MEMORY`, cuBLAS's
    /// `ALLOC_FAILED`, or an allocator's "out of memory". Such a failure says nothing about the
    /// cell, only about what else the device holds.
    pub fn is_out_of_memory(&self) -> bool {
        let text = self.to_string();
        text.contains("OUT_OF_MEMORY")
            || text.contains("ALLOC_FAILED")
            || text.to_ascii_lowercase().contains("out of memory")
    }
}

/// candle's message without the backtrace it captures when `RUST_BACKTRACE` is set: a user
/// sees "DriverError(CUDA_ERROR_UNKNOWN, …)", not a list of unknown frames.
fn write_candle(e: &candle_core::Error, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => write_candle(inner, f),
        E::Context { inner, context } => {
            write!(f, "{context}: ")?;
            write_candle(inner, f)
        }
        E::WithPath { inner, path } => {
            write!(f, "{}: ", path.display())?;
            write_candle(inner, f)
        }
        other => std::fmt::Display::fmt(other, f),
    }
}

impl std::fmt::Display for ComputeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write_candle(&self.0, f)
    }
}

impl std::error::Error for ComputeError {}

impl From<candle_core::Error> for ComputeError {
    fn from(err: candle_core::Error) -> Self {
        Self(err)
    }
}

impl From<candle_core::Error> for EngineError {
    fn from(err: candle_core::Error) -> Self {
        Self::Compute(ComputeError(err))
    }
}

impl EngineError {
    /// Whether the device ran out of memory ([`ComputeError::is_out_of_memory`]).
    pub fn is_out_of_memory(&self) -> bool {
        match self {
            Self::Compute(e) | Self::Device { reason: e, .. } => e.is_out_of_memory(),
            _ => false,
        }
    }
}

/// The engine's result type.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    // A CUDA out-of-memory cannot be caused without a GPU: these build the error as cudarc
    // words it (`DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")`) inside candle's
    // wrappers, and check what a user and the worker see of it.
    fn wrapped(msg: &str) -> EngineError {
        let inner = candle_core::Error::Msg(msg.into());
        let bt = candle_core::Error::WithBacktrace {
            inner: Box::new(inner),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        EngineError::from(bt.context("conv2d"))
    }

    #[test]
    fn device_out_of_memory_is_recognised_through_candle_wrappers() {
        let oom = wrapped(r#"DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")"#);
        assert!(oom.is_out_of_memory());
        assert!(wrapped("CUBLAS_STATUS_ALLOC_FAILED").is_out_of_memory());
        assert!(!wrapped("shape mismatch in matmul").is_out_of_memory());
        assert!(!EngineError::InvalidRequest("out of memory".into()).is_out_of_memory());
    }

    #[test]
    fn a_backtrace_never_reaches_the_message() {
        let e = wrapped(r#"DriverError(CUDA_ERROR_UNKNOWN, "unknown error")"#);
        assert_eq!(
            e.to_string(),
            r#"tensor computation failed: conv2d: DriverError(CUDA_ERROR_UNKNOWN, "unknown error")"#
        );
    }
}
