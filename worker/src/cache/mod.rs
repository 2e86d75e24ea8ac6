//! Loaded models kept between renders, under a memory budget.
//!
//! Two levels, because users sweep LoRA strengths: a [`BaseModel`] per model folder (every
//! config and weight read once, f32 on the host) and the [`Pipeline`]s built from it, keyed by
//! (model folder, LoRA stack with strengths, device). A new LoRA stack or strength on a cached
//! base re-merges from memory instead of reading the checkpoint again. When over budget the
//! least recently used pipeline goes first, then bases no pipeline uses. Owned by the render
//! thread only, so it needs no locks.
//!
//! Cost: a base counts its f32 host bytes; a pipeline counts [`Model::resident_bytes`] (on the
//! CPU only the tensors its LoRAs replaced, since the rest shares the base's storage). Estimates
//! from element counts, not measurements. Host and device memory are budgeted apart
//! ([`Budget`]): bases and CPU pipelines count against the host's, GPU pipelines (every weight
//! copied to the card) against the device's, so a 24 GB card does not make the host keep 24 GB
//! of bases, nor a 64 GB host fill an 8 GB card. After the device runs out of memory the
//! worker drops every GPU pipeline ([`PipelineCache::clear_device`]); the bases stay, so the
//! next render rebuilds from host memory without reading the files again.
//!
//! [`Model::resident_bytes`]: crate::engine::Model::resident_bytes
//!
//! On disk: [`disk`], model files fetched by sha256 from the pool's model storage, and
//! [`hashes`], the remembered sha256 of local model files.

pub mod disk;
pub mod hashes;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::engine::{BaseModel, Device, EngineError, LoraSpec, Pipeline};

/// What identifies a loaded pipeline.
#[derive(Clone, Debug, PartialEq)]
pub struct PipelineKey {
    /// Model folder.
    pub model: PathBuf,
    /// LoRA files with strengths, in merge order.
    pub loras: Vec<LoraSpec>,
    /// A VAE file replacing the model's own.
    pub vae: Option<PathBuf>,
    /// Device.
    pub device: Device,
}

impl PipelineKey {
    /// The LoRA stack as the engine takes it.
    pub fn lora_specs(&self) -> Vec<LoraSpec> {
        self.loras.clone()
    }

    /// Builds this key's pipeline from `base` (which must be `self.model`'s).
    pub fn build(&self, base: &BaseModel) -> Result<Pipeline, EngineError> {
        Ok(Pipeline::new(base.build_with_vae(
            &self.lora_specs(),
            self.vae.as_deref(),
            self.device,
        )?))
    }
}

/// How [`PipelineCache::ensure`] found a pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// It was loaded.
    Hit,
    /// Its base was cached: only the LoRA merge and the build ran.
    Rebuilt,
    /// Nothing was cached: the model's files were read.
    Read,
}

/// Counters, for the worker's log and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Model folders read from disk.
    pub reads: u64,
    /// Pipelines built from a cached base (a LoRA stack or strength change).
    pub rebuilds: u64,
    /// Renders that found their pipeline loaded.
    pub hits: u64,
    /// Pipelines and bases evicted.
    pub evictions: u64,
}

/// The cache's byte budgets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Host memory for bases and CPU pipelines.
    pub host_bytes: u64,
    /// Device memory for GPU pipelines.
    pub device_bytes: u64,
}

impl Budget {
    /// The same number of bytes for host and device.
    pub fn both(bytes: u64) -> Self {
        Self {
            host_bytes: bytes,
            device_bytes: bytes,
        }
    }
}

/// Where an entry's bytes live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Cost {
    host: u64,
    device: u64,
}

impl Cost {
    fn of(key: &PipelineKey, pipeline: &Pipeline) -> Self {
        let bytes = pipeline.model().resident_bytes();
        if key.device.is_gpu() {
            Self {
                host: 0,
                device: bytes,
            }
        } else {
            Self {
                host: bytes,
                device: 0,
            }
        }
    }
}

/// An LRU of bases and pipelines under a byte budget.
pub struct PipelineCache {
    budget: Budget,
    /// Most recently used last.
    bases: Vec<Arc<BaseModel>>,
    /// Most recently used last.
    pipelines: Vec<(PipelineKey, Arc<Pipeline>)>,
    /// Counters.
    pub stats: CacheStats,
}

impl PipelineCache {
    /// An empty cache that keeps at most `budget_bytes` of host memory, and as much of device
    /// memory (always at least the pipeline in use and its base).
    pub fn new(budget_bytes: u64) -> Self {
        Self::with_budget(Budget::both(budget_bytes))
    }

    /// An empty cache under `budget` (always at least the pipeline in use and its base).
    pub fn with_budget(budget: Budget) -> Self {
        Self {
            budget,
            bases: Vec::new(),
            pipelines: Vec::new(),
            stats: CacheStats::default(),
        }
    }

    /// The pipeline for `key`, reading or building it (and evicting others) when absent.
    pub fn get(&mut self, key: &PipelineKey) -> Result<(Arc<Pipeline>, Found), EngineError> {
        if let Some(i) = self.pipelines.iter().position(|(k, _)| k == key) {
            self.stats.hits += 1;
            let entry = self.pipelines.remove(i);
            let pipeline = entry.1.clone();
            self.pipelines.push(entry);
            self.touch_base(&key.model);
            return Ok((pipeline, Found::Hit));
        }
        let (base, found) = match self.base(&key.model) {
            Some(base) => (base, Found::Rebuilt),
            None => {
                let base = Arc::new(BaseModel::read(&key.model)?);
                self.stats.reads += 1;
                (base, Found::Read)
            }
        };
        let pipeline = key.build(&base)?;
        if found == Found::Rebuilt {
            self.stats.rebuilds += 1;
        }
        Ok((self.insert(key.clone(), base, pipeline), found))
    }

    /// Whether `key`'s pipeline is loaded.
    pub fn contains(&self, key: &PipelineKey) -> bool {
        self.pipelines.iter().any(|(k, _)| k == key)
    }

    /// The cached base of the model folder `model`, if any.
    pub fn base(&self, model: &Path) -> Option<Arc<BaseModel>> {
        self.bases.iter().find(|b| b.path() == model).cloned()
    }

    /// Adds a pipeline built elsewhere (the preparing thread) with the base it came from,
    /// making both most recently used.
    pub fn insert(
        &mut self,
        key: PipelineKey,
        base: Arc<BaseModel>,
        pipeline: Pipeline,
    ) -> Arc<Pipeline> {
        self.pipelines.retain(|(k, _)| k != &key);
        let mut incoming = Cost::of(&key, &pipeline);
        if self.base(&key.model).is_none() {
            incoming.host += base.bytes();
        }
        self.make_room(incoming, Some(&key.model));
        if self.base(&key.model).is_none() {
            self.bases.push(base);
        }
        self.touch_base(&key.model);
        let pipeline = Arc::new(pipeline);
        self.pipelines.push((key, pipeline.clone()));
        pipeline
    }

    /// Keys of the loaded pipelines, most recent last.
    pub fn keys(&self) -> impl Iterator<Item = &PipelineKey> {
        self.pipelines.iter().map(|(k, _)| k)
    }

    /// Bytes held now, host and device together, by the estimate in the module header.
    pub fn used_bytes(&self) -> u64 {
        let used = self.used();
        used.host + used.device
    }

    /// Device bytes held now by GPU pipelines.
    pub fn used_device_bytes(&self) -> u64 {
        self.used().device
    }

    /// Drops every GPU pipeline (after the device ran out of memory); bases stay. Returns how
    /// many were dropped.
    pub fn clear_device(&mut self) -> usize {
        let before = self.pipelines.len();
        self.pipelines.retain(|(k, _)| !k.device.is_gpu());
        let dropped = before - self.pipelines.len();
        self.stats.evictions += dropped as u64;
        dropped
    }

    fn used(&self) -> Cost {
        let mut used = Cost {
            host: self.bases.iter().map(|b| b.bytes()).sum(),
            device: 0,
        };
        for (key, pipeline) in &self.pipelines {
            let cost = Cost::of(key, pipeline);
            used.host += cost.host;
            used.device += cost.device;
        }
        used
    }

    fn touch_base(&mut self, model: &Path) {
        if let Some(i) = self.bases.iter().position(|b| b.path() == model) {
            let b = self.bases.remove(i);
            self.bases.push(b);
        }
    }

    /// Evicts until `incoming` more bytes fit in both budgets: for the host, first bases no
    /// pipeline uses, then the least recently used pipeline; for the device, the least
    /// recently used GPU pipeline. Never the base of `keep`.
    fn make_room(&mut self, incoming: Cost, keep: Option<&Path>) {
        loop {
            let used = self.used();
            let gpu_lru = self.pipelines.iter().position(|(k, _)| k.device.is_gpu());
            if used.device + incoming.device > self.budget.device_bytes
                && let Some(i) = gpu_lru
            {
                self.pipelines.remove(i);
                self.stats.evictions += 1;
                continue;
            }
            if used.host + incoming.host <= self.budget.host_bytes {
                break;
            }
            let unused = self.bases.iter().position(|b| {
                Some(b.path()) != keep && !self.pipelines.iter().any(|(k, _)| k.model == b.path())
            });
            if let Some(i) = unused {
                self.bases.remove(i);
            } else if !self.pipelines.is_empty() {
                self.pipelines.remove(0);
            } else {
                break;
            }
            self.stats.evictions += 1;
        }
    }
}
