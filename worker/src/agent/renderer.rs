//! The render thread: one dedicated OS thread owns the pipeline cache and runs every render,
//! so heavy compute never touches Tokio's async threads. A second thread prepares pipelines
//! (reads a model, merges its LoRAs, builds the networks) for cells waiting in the queue while
//! the current one renders, and hands them to the render thread's cache.
//!
//! The agent sends jobs of one or more cells (a UNet batch) over a channel and awaits each
//! answer; per-step progress flows back through watch channels, and each cell's cancel flag
//! reaches into the sampling loop (a batch stops only when all its cells are cancelled; a
//! cancelled cell in a running batch is dropped by the agent). The render thread also keeps the
//! textual-inversion embedding database ([`super::inversions`]) and hands it to each job's
//! pipeline.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{oneshot, watch};

use super::inversions::Inversions;
use crate::cache::{Budget, CacheStats, Found, PipelineCache, PipelineKey};
use crate::engine::pipeline::Cancel;
use crate::engine::{BaseModel, EngineError, InversionDb, PhaseTimes, Pipeline, RenderRequest};

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
    /// Milliseconds the render waited for its pipeline (0 on a cache hit or when it was
    /// prepared in time), this cell's share when batched.
    pub load_ms: f64,
    /// Text encode, sampling and decode, this cell's share when batched.
    pub times: PhaseTimes,
    /// Milliseconds of PNG encoding.
    pub encode_ms: f64,
}

/// Why a render produced no image.
#[derive(Debug, Clone, PartialEq)]
pub enum RenderFailure {
    /// The cell can never render as given (missing or corrupt file, unknown LoRA key, bad
    /// size): not worth retrying.
    BadInput(String),
    /// The device failed (NaN or constant output, a driver error): retry, preferably
    /// elsewhere.
    Resource(String),
    /// The device ran out of memory: a resource failure after which the render thread has
    /// dropped its GPU pipelines to give the next cell the whole card.
    OutOfMemory(String),
    /// The cancel flag was set.
    Cancelled,
}

/// One cell of a render job.
pub struct Item {
    /// What to render.
    pub request: RenderRequest,
    /// Set to stop this cell.
    pub cancel: Arc<AtomicBool>,
    /// (step, steps) after every step.
    pub progress: watch::Sender<(u32, u32)>,
}

struct Job {
    key: PipelineKey,
    items: Vec<Item>,
    /// Embedding files the cells pin by content, over the worker's own.
    embeddings: Vec<PathBuf>,
    reply: oneshot::Sender<Vec<Result<Rendered, RenderFailure>>>,
}

enum Msg {
    Render(Job),
    Prepare(PipelineKey),
    Prepared(PipelineKey, Arc<BaseModel>, Box<Pipeline>),
    PrepareFailed(PipelineKey),
    FreeDevice,
    Stop,
}

/// Sends [`Msg::Stop`] when the last [`Renderer`] handle goes.
struct StopOnDrop(Sender<Msg>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(Msg::Stop);
    }
}

/// What the render thread's pipeline cache holds and has done, as of its last job or
/// prepared pipeline (for the worker's metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheReport {
    /// Its counters.
    pub stats: CacheStats,
    /// Host bytes it holds.
    pub host_bytes: u64,
    /// Device bytes it holds (GPU pipelines).
    pub device_bytes: u64,
}

/// What the render thread publishes for the async side to read without asking it.
#[derive(Default)]
struct Published {
    loaded: Vec<PipelineKey>,
    cache: CacheReport,
}

/// Handle to the render thread.
#[derive(Clone)]
pub struct Renderer {
    tx: Sender<Msg>,
    published: Arc<Mutex<Published>>,
    _stop: Arc<StopOnDrop>,
}

impl Renderer {
    /// Starts the render and preparing threads with a pipeline cache under `budget`, and no
    /// textual-inversion embeddings.
    pub fn spawn(budget: Budget) -> Renderer {
        Self::spawn_with_inversions(budget, Vec::new())
    }

    /// [`Self::spawn`], the render thread first reading the textual-inversion embeddings under
    /// `inversion_dirs` (and again whenever they change).
    pub fn spawn_with_inversions(budget: Budget, inversion_dirs: Vec<PathBuf>) -> Renderer {
        let (tx, rx) = std::sync::mpsc::channel::<Msg>();
        let published = Arc::new(Mutex::new(Published::default()));
        let shared = published.clone();
        let back = tx.clone();
        std::thread::Builder::new()
            .name("kiln-render".into())
            .spawn(move || {
                let inversions = Inversions::load(inversion_dirs);
                RenderThread::new(budget, back, shared, inversions).run(rx)
            })
            .expect("spawning the render thread");
        Renderer {
            tx: tx.clone(),
            published,
            _stop: Arc::new(StopOnDrop(tx)),
        }
    }

    /// Asks for `key`'s pipeline to be built in the background if it is not loaded.
    pub fn prepare(&self, key: PipelineKey) {
        let _ = self.tx.send(Msg::Prepare(key));
    }

    /// Renders `items` with the pipeline `key` as one batch; one answer per item, in order.
    pub async fn render(
        &self,
        key: PipelineKey,
        items: Vec<Item>,
    ) -> Vec<Result<Rendered, RenderFailure>> {
        self.render_with_embeddings(key, items, Vec::new()).await
    }

    /// [`Self::render`] with the textual-inversion embedding files `embeddings` over the
    /// worker's own (each named after its file's stem).
    pub async fn render_with_embeddings(
        &self,
        key: PipelineKey,
        items: Vec<Item>,
        embeddings: Vec<PathBuf>,
    ) -> Vec<Result<Rendered, RenderFailure>> {
        let n = items.len();
        let (reply, answer) = oneshot::channel();
        let failed = |why: &str| failed_all(n, RenderFailure::Resource(why.into()));
        if self
            .tx
            .send(Msg::Render(Job {
                key,
                items,
                embeddings,
                reply,
            }))
            .is_err()
        {
            return failed("the render thread has stopped");
        }
        answer
            .await
            .unwrap_or_else(|_| failed("the render thread panicked"))
    }

    /// Drops every pipeline held in device memory (the worker yields its GPU to the PC's
    /// owner); after the render in flight, if any. Host copies of the models stay.
    pub fn free_device(&self) {
        let _ = self.tx.send(Msg::FreeDevice);
    }

    /// Pipelines loaded now.
    pub fn loaded(&self) -> Vec<PipelineKey> {
        self.published().loaded.clone()
    }

    /// The pipeline cache's counters and bytes.
    pub fn cache_report(&self) -> CacheReport {
        self.published().cache
    }

    fn published(&self) -> std::sync::MutexGuard<'_, Published> {
        // Replaced whole by the render thread: a poisoned value is still a valid one.
        self.published.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The render thread's state.
struct RenderThread {
    cache: PipelineCache,
    /// Keys the preparing thread is building now.
    pending: Vec<PipelineKey>,
    /// Messages to the render thread (the preparing thread answers through it).
    back: Sender<Msg>,
    /// Work for the preparing thread: a key and the cached base, if any.
    prepare: Option<Sender<(PipelineKey, Option<Arc<BaseModel>>)>>,
    published: Arc<Mutex<Published>>,
    inversions: Inversions,
}

impl RenderThread {
    fn new(
        budget: Budget,
        back: Sender<Msg>,
        published: Arc<Mutex<Published>>,
        inversions: Inversions,
    ) -> Self {
        Self {
            cache: PipelineCache::with_budget(budget),
            pending: Vec::new(),
            back,
            prepare: None,
            published,
            inversions,
        }
    }

    fn run(mut self, rx: Receiver<Msg>) {
        let mut deferred: Vec<Job> = Vec::new();
        while let Ok(msg) = rx.recv() {
            match msg {
                Msg::Render(job) => {
                    // Wait for a pipeline being prepared rather than building it twice.
                    while self.pending.contains(&job.key) {
                        match rx.recv() {
                            Ok(Msg::Render(other)) => deferred.push(other),
                            Ok(Msg::Stop) | Err(_) => return,
                            Ok(other) => self.handle(other),
                        }
                    }
                    self.render(job);
                    for job in std::mem::take(&mut deferred) {
                        self.render(job);
                    }
                }
                Msg::Stop => return,
                other => self.handle(other),
            }
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Prepare(key) => {
                if self.cache.contains(&key) || self.pending.contains(&key) {
                    return;
                }
                let base = self.cache.base(&key.model);
                let sender = self
                    .prepare
                    .get_or_insert_with(|| spawn_preparer(self.back.clone()));
                if sender.send((key.clone(), base)).is_ok() {
                    self.pending.push(key);
                }
            }
            Msg::Prepared(key, base, pipeline) => {
                self.pending.retain(|k| k != &key);
                self.cache.insert(key, base, *pipeline);
                self.publish();
            }
            // The render that needs it loads it itself and reports the real error.
            Msg::PrepareFailed(key) => self.pending.retain(|k| k != &key),
            Msg::FreeDevice => {
                let dropped = self.cache.clear_device();
                tracing::info!(dropped, "device memory freed for the owner");
                self.publish();
            }
            Msg::Render(_) | Msg::Stop => unreachable!("handled by run"),
        }
    }

    fn publish(&self) {
        let published = Published {
            loaded: self.cache.keys().cloned().collect(),
            cache: CacheReport {
                stats: self.cache.stats,
                host_bytes: self.cache.used_bytes() - self.cache.used_device_bytes(),
                device_bytes: self.cache.used_device_bytes(),
            },
        };
        *self.published.lock().unwrap_or_else(|e| e.into_inner()) = published;
    }

    fn render(&mut self, job: Job) {
        let mut inversions = self.inversions.current();
        if !job.embeddings.is_empty() {
            match inversions.with_files(&job.embeddings) {
                Ok(db) => inversions = Arc::new(db),
                Err(e) => tracing::warn!(error = %e, "pinned embeddings not loaded"),
            }
        }
        let out = run_job(&mut self.cache, &job.key, &job.items, inversions);
        if out
            .iter()
            .any(|r| matches!(r, Err(RenderFailure::OutOfMemory(_))))
        {
            let dropped = self.cache.clear_device();
            tracing::warn!(
                device = %job.key.device,
                dropped,
                "device out of memory: cached GPU pipelines dropped, going on with the next cell"
            );
        }
        self.publish();
        let _ = job.reply.send(out);
    }
}

/// The preparing thread: builds pipelines and sends them back to the render thread. It ends
/// when the render thread drops its sender.
fn spawn_preparer(back: Sender<Msg>) -> Sender<(PipelineKey, Option<Arc<BaseModel>>)> {
    let (tx, rx) = std::sync::mpsc::channel::<(PipelineKey, Option<Arc<BaseModel>>)>();
    std::thread::Builder::new()
        .name("kiln-prepare".into())
        .spawn(move || {
            while let Ok((key, base)) = rx.recv() {
                let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let base = match base {
                        Some(b) => b,
                        None => Arc::new(BaseModel::read(&key.model)?),
                    };
                    let pipeline = key.build(&base)?;
                    Ok::<_, EngineError>((base, pipeline))
                }));
                let msg = match built {
                    Ok(Ok((base, pipeline))) => Msg::Prepared(key, base, Box::new(pipeline)),
                    _ => Msg::PrepareFailed(key),
                };
                if back.send(msg).is_err() {
                    return;
                }
            }
        })
        .expect("spawning the preparing thread");
    tx
}

/// The same failure for each of `n` cells.
fn failed_all(n: usize, failure: RenderFailure) -> Vec<Result<Rendered, RenderFailure>> {
    (0..n).map(|_| Err(failure.clone())).collect()
}

/// A batch stops when every cell in it is cancelled.
struct AllCancelled<'a>(&'a [&'a Item]);

impl Cancel for AllCancelled<'_> {
    fn is_cancelled(&self) -> bool {
        self.0.iter().all(|i| i.cancel.load(Ordering::Relaxed))
    }
}

fn run_job(
    cache: &mut PipelineCache,
    key: &PipelineKey,
    items: &[Item],
    inversions: Arc<InversionDb>,
) -> Vec<Result<Rendered, RenderFailure>> {
    let n = items.len();
    let t0 = Instant::now();
    // A panic inside candle (a bug, or an allocation failure) must not take the worker down.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (pipeline, found) = cache.get(key).map_err(classify)?;
        pipeline.set_inversions(inversions);
        let load_ms = match found {
            Found::Hit => 0.0,
            Found::Rebuilt | Found::Read => t0.elapsed().as_secs_f64() * 1000.0,
        };
        Ok(render_batch(&pipeline, items, load_ms))
    }));
    match result {
        Ok(Ok(out)) => out,
        Ok(Err(failure)) => failed_all(n, failure),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            failed_all(
                n,
                RenderFailure::Resource(format!("render panicked: {msg}")),
            )
        }
    }
}

/// Renders the valid requests of `items` as one batch; an invalid one fails alone.
fn render_batch(
    pipeline: &Pipeline,
    items: &[Item],
    load_ms: f64,
) -> Vec<Result<Rendered, RenderFailure>> {
    let mut answers: Vec<Option<Result<Rendered, RenderFailure>>> = items
        .iter()
        .map(|i| {
            pipeline
                .validate(&i.request)
                .err()
                .map(|e| Err(classify(e)))
        })
        .collect();
    // The agent only batches alike cells; one that is not alike the first fails rather than
    // rendering with someone else's settings.
    let head = (0..items.len()).find(|&i| answers[i].is_none());
    let mut valid = Vec::with_capacity(items.len());
    for i in 0..items.len() {
        if answers[i].is_some() {
            continue;
        }
        let alike = head.is_some_and(|h| items[h].request.batchable_with(&items[i].request));
        if alike {
            valid.push(i);
        } else {
            answers[i] = Some(Err(RenderFailure::BadInput(
                "cells in one batch must share steps, CFG scale, sampler and size".into(),
            )));
        }
    }
    let members: Vec<&Item> = valid.iter().map(|&i| &items[i]).collect();
    let requests: Vec<RenderRequest> = members.iter().map(|i| i.request.clone()).collect();
    let share = load_ms / members.len().max(1) as f64;
    let mut on_step = |p: crate::engine::Progress<'_>| {
        let _ = members[p.image]
            .progress
            .send((p.step as u32, p.steps as u32));
    };
    let cancel = AllCancelled(&members);
    match pipeline.render_batch(&requests, &mut on_step, &cancel) {
        Ok(outputs) => {
            for (&i, out) in valid.iter().zip(outputs) {
                answers[i] = Some(if items[i].cancel.load(Ordering::Relaxed) {
                    Err(RenderFailure::Cancelled)
                } else {
                    package(out, share)
                });
            }
        }
        Err(e) => {
            let failure = classify(e);
            for &i in &valid {
                answers[i] = Some(Err(failure.clone()));
            }
        }
    }
    finish(answers)
}

fn finish(
    answers: Vec<Option<Result<Rendered, RenderFailure>>>,
) -> Vec<Result<Rendered, RenderFailure>> {
    answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err(RenderFailure::Resource("not rendered".into()))))
        .collect()
}

/// Checks the image and encodes the PNG.
fn package(out: crate::engine::RenderOutput, load_ms: f64) -> Result<Rendered, RenderFailure> {
    let px = &out.image.pixels;
    if px.is_empty() || px.iter().all(|&b| b == px[0]) {
        return Err(RenderFailure::Resource(
            "the device produced a constant image (NaN or overflow?)".into(),
        ));
    }
    let t = Instant::now();
    let png = out.to_png().map_err(classify)?;
    Ok(Rendered {
        png,
        parameters: out.parameters,
        notes: out.notes,
        width: out.image.width,
        height: out.image.height,
        load_ms,
        times: out.times,
        encode_ms: t.elapsed().as_secs_f64() * 1000.0,
    })
}

/// Bad input is anything about the files or the request; the rest is the device's fault.
pub(crate) fn classify(e: EngineError) -> RenderFailure {
    match e {
        EngineError::Cancelled => RenderFailure::Cancelled,
        e if e.is_out_of_memory() => RenderFailure::OutOfMemory(e.to_string()),
        EngineError::Device { .. } | EngineError::Compute(_) => {
            RenderFailure::Resource(e.to_string())
        }
        other => RenderFailure::BadInput(other.to_string()),
    }
}
