//! Prompt embeddings kept per pipeline, so a seed sweep encodes each prompt once.
//!
//! Owns a small least-recently-used map from a prompt's key to its conditioning
//! (`[1, 77·k, hidden]`, f32, on the compute device, with what else the pipeline keeps of the
//! encode: the textual-inversion embeddings it used). The key is the parsed prompt, the clip
//! skip and the embedding database's identity (`conditioning::cache_key`), so prompts that parse
//! alike (`(a:1)` and `a`) share an entry and a changed embeddings folder is never served stale
//! vectors. It lives inside one pipeline, whose model and LoRA stack (text-encoder LoRAs
//! change the embeddings) are therefore part of the key implicitly. Each prompt is encoded
//! alone, as A1111 and diffusers encode the prompt and the negative prompt in separate calls,
//! so a cached embedding is exactly what a fresh encode returns.

use std::collections::VecDeque;

use candle_core::Tensor;

use crate::engine::error::Result;

/// How many prompts a pipeline keeps by default: at SD1.5's 77×768 f32 that is about 30 MB
/// (more for prompts longer than one 75-token chunk).
pub const DEFAULT_CAPACITY: usize = 128;

/// Hits and misses since the pipeline was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EmbeddingStats {
    /// Prompts found encoded.
    pub hits: u64,
    /// Prompts that had to be encoded.
    pub misses: u64,
}

/// An LRU of prompt embeddings (`V`: the conditioning and what comes with it).
#[derive(Debug)]
pub(crate) struct EmbeddingCache<V = Tensor> {
    capacity: usize,
    /// Most recently used last.
    entries: VecDeque<(String, V)>,
    pub(crate) stats: EmbeddingStats,
}

impl<V: Clone> EmbeddingCache<V> {
    /// A cache of at most `capacity` prompts; 0 keeps none (every prompt is encoded).
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: VecDeque::new(),
            stats: EmbeddingStats::default(),
        }
    }

    /// The embedding of the prompt whose key is `key`, from the cache or from `encode`.
    pub(crate) fn get_or_encode(
        &mut self,
        key: &str,
        encode: impl FnOnce() -> Result<V>,
    ) -> Result<V> {
        if let Some(i) = self.entries.iter().position(|(k, _)| k == key) {
            self.stats.hits += 1;
            let entry = self.entries.remove(i).expect("position is in range");
            let tensor = entry.1.clone();
            self.entries.push_back(entry);
            return Ok(tensor);
        }
        self.stats.misses += 1;
        let tensor = encode()?;
        if self.capacity > 0 {
            while self.entries.len() >= self.capacity {
                self.entries.pop_front();
            }
            self.entries.push_back((key.to_owned(), tensor.clone()));
        }
        Ok(tensor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn tensor(v: f32) -> Result<Tensor> {
        Ok(Tensor::new(&[v], &Device::Cpu)?)
    }

    fn value(t: &Tensor) -> f32 {
        t.to_vec1::<f32>().unwrap()[0]
    }

    #[test]
    fn encodes_each_prompt_once_and_evicts_the_least_recently_used() {
        let mut cache = EmbeddingCache::new(2);
        let mut encodes = 0;
        let mut get = |cache: &mut EmbeddingCache, p: &str, v: f32| {
            value(
                &cache
                    .get_or_encode(p, || {
                        encodes += 1;
                        tensor(v)
                    })
                    .unwrap(),
            )
        };
        assert_eq!(get(&mut cache, "a", 1.0), 1.0);
        assert_eq!(get(&mut cache, "b", 2.0), 2.0);
        // A hit returns the first encoding, not the new closure's value.
        assert_eq!(get(&mut cache, "a", 9.0), 1.0);
        // "b" is now the least recently used and goes when "c" arrives.
        assert_eq!(get(&mut cache, "c", 3.0), 3.0);
        assert_eq!(get(&mut cache, "a", 9.0), 1.0);
        assert_eq!(get(&mut cache, "b", 4.0), 4.0);
        assert_eq!(encodes, 4);
        assert_eq!(cache.stats, EmbeddingStats { hits: 2, misses: 4 });
    }

    #[test]
    fn capacity_zero_always_encodes() {
        let mut cache = EmbeddingCache::new(0);
        for _ in 0..3 {
            cache.get_or_encode("a", || tensor(1.0)).unwrap();
        }
        assert_eq!(cache.stats, EmbeddingStats { hits: 0, misses: 3 });
    }
}
