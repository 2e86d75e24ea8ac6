//! Loaded pipelines kept between renders, keyed by (model files, LoRA stack with strengths,
//! device), under a memory budget; the least recently used is evicted first. Owned by the
//! render thread only, so it needs no locks.
//!
//! Cost of an entry: the bytes of the weight files it was loaded from (f32 on CPU, so about
//! their size in memory; an estimate, not a measurement).

use std::path::{Path, PathBuf};

use crate::engine::{Device, EngineError, LoraSpec, Pipeline};

/// What identifies a loaded pipeline.
#[derive(Clone, Debug, PartialEq)]
pub struct PipelineKey {
    /// Model folder.
    pub model: PathBuf,
    /// LoRA files with strengths, in merge order.
    pub loras: Vec<(PathBuf, f32)>,
    /// Device.
    pub device: Device,
}

/// An LRU of pipelines under a byte budget.
pub struct PipelineCache {
    budget_bytes: u64,
    entries: Vec<(PipelineKey, Pipeline, u64)>,
    /// Loads and hits, for the worker's log and benchmarks.
    pub stats: CacheStats,
}

/// Counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct CacheStats {
    /// Pipelines loaded from disk.
    pub loads: u64,
    /// Renders that found their pipeline loaded.
    pub hits: u64,
    /// Pipelines evicted.
    pub evictions: u64,
}

impl PipelineCache {
    /// An empty cache that keeps at most `budget_bytes` of pipelines (always at least one).
    pub fn new(budget_bytes: u64) -> Self {
        Self {
            budget_bytes,
            entries: Vec::new(),
            stats: CacheStats::default(),
        }
    }

    /// The pipeline for `key`, loading it (and evicting others) when absent.
    pub fn get(&mut self, key: &PipelineKey) -> Result<&Pipeline, EngineError> {
        self.ensure(key)?;
        Ok(&self.entries.last().expect("ensure leaves the entry last").1)
    }

    /// Makes `key` loaded and most recently used; returns whether it had to be loaded.
    pub fn ensure(&mut self, key: &PipelineKey) -> Result<bool, EngineError> {
        if let Some(i) = self.entries.iter().position(|(k, _, _)| k == key) {
            self.stats.hits += 1;
            let e = self.entries.remove(i);
            self.entries.push(e);
            Ok(false)
        } else {
            let loras: Vec<LoraSpec> = key
                .loras
                .iter()
                .map(|(path, strength)| LoraSpec {
                    path: path.clone(),
                    strength: *strength,
                })
                .collect();
            let cost = weight_bytes(&key.model);
            while !self.entries.is_empty()
                && self.entries.iter().map(|e| e.2).sum::<u64>() + cost > self.budget_bytes
            {
                self.entries.remove(0);
                self.stats.evictions += 1;
            }
            let pipeline = Pipeline::load(&key.model, &loras, key.device)?;
            self.stats.loads += 1;
            self.entries.push((key.clone(), pipeline, cost));
            Ok(true)
        }
    }

    /// Keys of the loaded pipelines, most recent last.
    pub fn keys(&self) -> impl Iterator<Item = &PipelineKey> {
        self.entries.iter().map(|(k, _, _)| k)
    }
}

/// Sum of the sizes of the `.safetensors` files under a model folder (or the file itself).
fn weight_bytes(model: &Path) -> u64 {
    fn walk(p: &Path, depth: u32) -> u64 {
        let Ok(meta) = std::fs::metadata(p) else {
            return 0;
        };
        if meta.is_file() {
            return if p.extension().is_some_and(|e| e == "safetensors") {
                meta.len()
            } else {
                0
            };
        }
        if depth > 2 {
            return 0;
        }
        std::fs::read_dir(p)
            .map(|rd| rd.flatten().map(|e| walk(&e.path(), depth + 1)).sum())
            .unwrap_or(0)
    }
    walk(model, 0)
}
