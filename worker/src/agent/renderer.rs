//! The render thread: one dedicated OS thread owns the pipeline cache and runs every render,
//! so heavy compute never touches Tokio's async threads. The agent sends it jobs over a
//! channel and awaits each answer; per-step progress flows back through a watch channel and a
//! cancel flag reaches into the sampling loop.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{oneshot, watch};

use crate::cache::{PipelineCache, PipelineKey};
use crate::engine::{EngineError, RenderRequest};

/// A rendered image and how long each phase took.
#[derive(Debug)]
pub struct Rendered {
    /// PNG bytes with the A1111 `parameters` chunk.
    pub png: Vec<u8>,
    /// The `parameters` text.
    pub parameters: String,
    /// Notes (e.g. negative prompt ignored).
    pub notes: Vec<String>,
    /// Image size.
    pub width: u32,
    /// Image size.
    pub height: u32,
    /// Milliseconds spent loading the pipeline (0 on a cache hit).
    pub load_ms: u64,
    /// Milliseconds of text encoding, sampling and decoding.
    pub render_ms: u64,
    /// Milliseconds of PNG encoding.
    pub encode_ms: u64,
}

/// Why a render produced no image.
#[derive(Debug, Clone, PartialEq)]
pub enum RenderFailure {
    /// The cell can never render as given (missing or corrupt file, unknown LoRA key, bad
    /// size): not worth retrying.
    BadInput(String),
    /// The device failed (out of memory, NaN or constant output): retry, preferably elsewhere.
    Resource(String),
    /// The cancel flag was set.
    Cancelled,
}

struct Job {
    key: PipelineKey,
    request: RenderRequest,
    cancel: Arc<AtomicBool>,
    progress: watch::Sender<(u32, u32)>,
    reply: oneshot::Sender<Result<Rendered, RenderFailure>>,
}

/// Handle to the render thread.
#[derive(Clone)]
pub struct Renderer {
    tx: std::sync::mpsc::Sender<Job>,
    loaded: Arc<Mutex<Vec<PipelineKey>>>,
}

impl Renderer {
    /// Starts the render thread with a pipeline cache of `cache_bytes`.
    pub fn spawn(cache_bytes: u64) -> Renderer {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let loaded = Arc::new(Mutex::new(Vec::new()));
        let shared = loaded.clone();
        std::thread::Builder::new()
            .name("kiln-render".into())
            .spawn(move || {
                let mut cache = PipelineCache::new(cache_bytes);
                while let Ok(job) = rx.recv() {
                    let out = run_job(&mut cache, &job);
                    *shared.lock().unwrap_or_else(|e| e.into_inner()) =
                        cache.keys().cloned().collect();
                    let _ = job.reply.send(out);
                }
            })
            .expect("spawning the render thread");
        Renderer { tx, loaded }
    }

    /// Renders `request` with the pipeline `key`, reporting (step, steps) on `progress`.
    pub async fn render(
        &self,
        key: PipelineKey,
        request: RenderRequest,
        cancel: Arc<AtomicBool>,
        progress: watch::Sender<(u32, u32)>,
    ) -> Result<Rendered, RenderFailure> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Job {
                key,
                request,
                cancel,
                progress,
                reply,
            })
            .map_err(|_| RenderFailure::Resource("the render thread has stopped".into()))?;
        answer
            .await
            .map_err(|_| RenderFailure::Resource("the render thread panicked".into()))?
    }

    /// Pipelines loaded now.
    pub fn loaded(&self) -> Vec<PipelineKey> {
        self.loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn run_job(cache: &mut PipelineCache, job: &Job) -> Result<Rendered, RenderFailure> {
    let t0 = Instant::now();
    // A panic inside candle (a bug, or an allocation failure) must not take the worker down.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let loaded_now = cache.ensure(&job.key).map_err(classify)?;
        let load_ms = if loaded_now {
            t0.elapsed().as_millis() as u64
        } else {
            0
        };
        let pipeline = cache.get(&job.key).map_err(classify)?;
        let t1 = Instant::now();
        let mut on_step = |p: crate::engine::Progress<'_>| {
            let _ = job.progress.send((p.step as u32, p.steps as u32));
        };
        let out = pipeline
            .render(&job.request, &mut on_step, &job.cancel)
            .map_err(classify)?;
        let render_ms = t1.elapsed().as_millis() as u64;
        let px = &out.image.pixels;
        if px.is_empty() || px.iter().all(|&b| b == px[0]) {
            return Err(RenderFailure::Resource(
                "the device produced a constant image (NaN or overflow?)".into(),
            ));
        }
        let t2 = Instant::now();
        let png = out.to_png().map_err(classify)?;
        Ok(Rendered {
            png,
            parameters: out.parameters.clone(),
            notes: out.notes.clone(),
            width: out.image.width,
            height: out.image.height,
            load_ms,
            render_ms,
            encode_ms: t2.elapsed().as_millis() as u64,
        })
    }));
    match result {
        Ok(r) => r,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(RenderFailure::Resource(format!("render panicked: {msg}")))
        }
    }
}

/// Bad input is anything about the files or the request; the rest is the device's fault.
fn classify(e: EngineError) -> RenderFailure {
    match e {
        EngineError::Cancelled => RenderFailure::Cancelled,
        EngineError::Device { .. } | EngineError::Compute(_) => {
            RenderFailure::Resource(e.to_string())
        }
        other => RenderFailure::BadInput(other.to_string()),
    }
}
