//! Brownian-tree noise: the per-step noise of A1111's "DPM++ SDE" samplers, as
//! `k_diffusion.sampling.BrownianTreeNoiseSampler` draws it from `torchsde.BrownianTree`
//! (torchsde 0.2.6, `_brownian/brownian_interval.py`).
//!
//! Owns [`BrownianTree`] (one image's Brownian motion over `[σ_min, σ_max]`, queried for scaled
//! increments) and [`SeedSequence`], numpy's `numpy.random.SeedSequence` (`bit_generator.pyx`),
//! which torchsde uses to seed every node. Knows element counts only: never shapes, models or
//! samplers.
//!
//! # What torchsde does (read from the installed sources)
//!
//! - `BrownianTree(t0, w0, t1, entropy=seed)` is a `BrownianInterval` with `tol = 1e-6`,
//!   `pool_size = 24`, `halfway_tree = True`, no Lévy area, the dtype of `w0` (float32, as `x`)
//!   and `size = x[0].shape`. Times are Python floats: the float32 sigmas widened to f64.
//!   Every node boundary and query time goes through `round(t, 6)` (`ndigits = -int(log10 tol)`).
//! - Root: `SeedSequence(entropy, pool_size=24).generate_state(3)[0]` seeds
//!   `W = randn(size, generator=Generator().manual_seed(s)) * sqrt(t1 - t0)` (float32 tensor
//!   times a Python float, which torch rounds to float32 first; `t0`, `t1` here unrounded).
//! - Nodes form the dyadic tree: a node `[s, e]` splits at `round(0.5 (e + s), 6)`. A split
//!   node with spawn key `k` and depth `d` (root: 0, 0; children `2k` left, `2k + 1` right)
//!   draws its seeds from `SeedSequence(entropy, spawn_key=(k, d), pool_size=24)
//!   .generate_state(4)`; only the first (the `W` seed) is used without Lévy area.
//! - A child's increment is the Brownian bridge of its parent's `W` (all float32 tensor maths
//!   with Python-float scalars rounded to float32): `left = (W·(m−s))·(1/(e−s)) +
//!   sqrt((m−s)(e−m)/(e−s))·z` with `z = randn(parent's W seed)`, `right = W − left`.
//! - A query `tree(ta, tb)` clamps to the (rounded) ends, rounds, and sums (float32, left to
//!   right) the increments of the canonical dyadic cover of `[ta, tb]`, splitting halfway until
//!   node edges hit both times. The LRU cache and the search's starting node change only speed,
//!   never values, because the tree shape is fixed by the halfway rule.
//! - `BrownianTreeNoiseSampler(x, σ_min, σ_max, seed=[seeds])` (A1111's
//!   `create_noise_sampler`: smallest non-zero and largest sigma of the schedule) keeps one tree
//!   per image and answers `(σ, σ_next)` with `tree(min, max) · sign / sqrt(|σ_next − σ|)`, the
//!   sign −1 when `σ > σ_next`, the difference and square root in float32.
//!
//! On a CUDA device A1111's trees draw with `torch.Generator("cuda")` (Philox) instead: build
//! those with [`BrownianTree::with_source`].

use std::collections::HashMap;

use crate::engine::rng::TorchRng;

/// torchsde's `BrownianTree` default `pool_size`.
const POOL_SIZE: usize = 24;
/// `ndigits = -int(math.log10(tol))` for torchsde's `BrownianTree` default `tol = 1e-6`.
const NDIGITS: usize = 6;
/// Node increments kept between queries (torchsde keeps 45 in an LRU; values never depend on it).
const CACHE_NODES: usize = 64;

const INIT_A: u32 = 0x43b0_d7e5;
const MULT_A: u32 = 0x931e_8875;
const INIT_B: u32 = 0x8b51_f9dd;
const MULT_B: u32 = 0x58f3_8ded;
const MIX_MULT_L: u32 = 0xca01_f9dd;
const MIX_MULT_R: u32 = 0x4973_f715;
const XSHIFT: u32 = 16;

/// numpy's `SeedSequence`: entropy hashed into a pool of 32-bit words, from which
/// [`generate_state`](Self::generate_state) derives seeds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedSequence {
    pool: Vec<u32>,
}

impl SeedSequence {
    /// `SeedSequence(entropy, spawn_key=spawn_key, pool_size=pool_size)` for non-negative
    /// integers, each split into little-endian 32-bit words as numpy's `_int_to_uint32_array`.
    pub fn new(entropy: u128, spawn_key: &[u128], pool_size: usize) -> Self {
        let mut assembled = int_words(entropy);
        let spawn: Vec<u32> = spawn_key.iter().flat_map(|&k| int_words(k)).collect();
        // numpy >= 1.19 pads run entropy to the pool size when there is a spawn key (gh-16539).
        if !spawn.is_empty() && assembled.len() < pool_size {
            assembled.resize(pool_size, 0);
        }
        assembled.extend(spawn);
        Self {
            pool: mix_entropy(pool_size, &assembled),
        }
    }

    /// `generate_state(n_words)` with the default `dtype=np.uint32`.
    pub fn generate_state(&self, n_words: usize) -> Vec<u32> {
        let mut hash_const = INIT_B;
        self.pool
            .iter()
            .cycle()
            .take(n_words)
            .map(|&word| {
                let mut value = word ^ hash_const;
                hash_const = hash_const.wrapping_mul(MULT_B);
                value = value.wrapping_mul(hash_const);
                value ^ (value >> XSHIFT)
            })
            .collect()
    }
}

/// `_int_to_uint32_array`: 0 is one zero word, otherwise the little-endian words up to the top.
fn int_words(mut n: u128) -> Vec<u32> {
    if n == 0 {
        return vec![0];
    }
    let mut words = Vec::new();
    while n > 0 {
        words.push((n & 0xffff_ffff) as u32);
        n >>= 32;
    }
    words
}

fn hashmix(value: u32, hash_const: &mut u32) -> u32 {
    let mut value = value ^ *hash_const;
    *hash_const = hash_const.wrapping_mul(MULT_A);
    value = value.wrapping_mul(*hash_const);
    value ^ (value >> XSHIFT)
}

fn mix(x: u32, y: u32) -> u32 {
    let result = MIX_MULT_L
        .wrapping_mul(x)
        .wrapping_sub(MIX_MULT_R.wrapping_mul(y));
    result ^ (result >> XSHIFT)
}

/// `SeedSequence.mix_entropy` into a fresh pool of `pool_size` words.
fn mix_entropy(pool_size: usize, entropy: &[u32]) -> Vec<u32> {
    let mut hash_const = INIT_A;
    let mut pool: Vec<u32> = (0..pool_size)
        .map(|i| hashmix(entropy.get(i).copied().unwrap_or(0), &mut hash_const))
        .collect();
    for src in 0..pool_size {
        for dst in 0..pool_size {
            if src != dst {
                let hashed = hashmix(pool[src], &mut hash_const);
                pool[dst] = mix(pool[dst], hashed);
            }
        }
    }
    for &word in entropy.iter().skip(pool_size) {
        for slot in pool.iter_mut() {
            *slot = mix(*slot, hashmix(word, &mut hash_const));
        }
    }
    pool
}

/// Python's `round(t, 6)`: the nearest 6-decimal value (ties to even on the exact binary
/// value), back as the nearest double. Rust's fixed-precision formatting rounds the same way.
fn round_time(t: f64) -> f64 {
    if !t.is_finite() {
        return t;
    }
    format!("{t:.NDIGITS$}").parse().unwrap_or(t)
}

/// Gaussian float32 values for a node seed: `torch.randn(n, generator=manual_seed(seed))`.
pub type NoiseSource = fn(u64, usize) -> Vec<f32>;

fn torch_cpu_randn(seed: u64, numel: usize) -> Vec<f32> {
    TorchRng::new(seed).randn(numel)
}

/// One interval of the dyadic tree.
#[derive(Clone, Debug)]
struct Node {
    start: f64,
    end: f64,
    /// torchsde's `_spawn_key`: 0 at the root, `2k` / `2k + 1` for the left / right child.
    key: u128,
    depth: u32,
    /// The parent and whether this is its left child; `None` at the root.
    parent: Option<(usize, bool)>,
    split: Option<Split>,
}

#[derive(Clone, Copy, Debug)]
struct Split {
    midway: f64,
    /// Seed of the bridge noise both children share (`_W_seed`).
    w_seed: u32,
    left: usize,
    right: usize,
}

/// One image's Brownian motion over `[σ_min, σ_max]`, as torchsde's `BrownianTree` with the
/// sampler's sign and scaling on top (k-diffusion's `BrownianTreeNoiseSampler` for one seed).
#[derive(Clone, Debug)]
pub struct BrownianTree {
    numel: usize,
    entropy: u128,
    /// `BatchedBrownianTree`'s own sign: −1 when built with `σ_min == σ_max` (its `sort`).
    sign: f32,
    root_w: Vec<f32>,
    nodes: Vec<Node>,
    cache: HashMap<usize, Vec<f32>>,
    source: NoiseSource,
}

impl BrownianTree {
    /// The tree A1111 builds for image seed `seed` and a latent of `numel` values over
    /// `[sigma_min, sigma_max]`, drawing with torch's CPU generator.
    pub fn new(seed: u64, numel: usize, sigma_min: f32, sigma_max: f32) -> Self {
        Self::with_source(seed, numel, sigma_min, sigma_max, torch_cpu_randn)
    }

    /// A1111's `create_noise_sampler` for one image: the interval from the smallest non-zero
    /// to the largest sigma of `sigmas`.
    pub fn for_schedule(seed: u64, numel: usize, sigmas: &[f32]) -> Self {
        let sigma_min = sigmas
            .iter()
            .copied()
            .filter(|&s| s > 0.0)
            .fold(f32::INFINITY, f32::min);
        let sigma_max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        Self::new(seed, numel, sigma_min, sigma_max)
    }

    /// Like [`new`](Self::new), drawing each node's Gaussian values from `source`.
    pub fn with_source(
        seed: u64,
        numel: usize,
        sigma_min: f32,
        sigma_max: f32,
        source: NoiseSource,
    ) -> Self {
        // `BatchedBrownianTree.sort`: (a, b, 1) if a < b else (b, a, -1).
        let (lo, hi, sign) = if sigma_min < sigma_max {
            (sigma_min, sigma_max, 1.0)
        } else {
            (sigma_max, sigma_min, -1.0)
        };
        let (t0, t1) = (f64::from(lo), f64::from(hi));
        let entropy = u128::from(seed);
        let root_seed = SeedSequence::new(entropy, &[], POOL_SIZE).generate_state(3)[0];
        let scale = (t1 - t0).sqrt() as f32;
        let root_w = source(u64::from(root_seed), numel)
            .into_iter()
            .map(|z| z * scale)
            .collect();
        let root = Node {
            start: round_time(t0),
            end: round_time(t1),
            key: 0,
            depth: 0,
            parent: None,
            split: None,
        };
        Self {
            numel,
            entropy,
            sign,
            root_w,
            nodes: vec![root],
            cache: HashMap::new(),
            source,
        }
    }

    /// The number of values of each answer.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// The noise for a step from `sigma` to `sigma_next`:
    /// `W(σ_next) − W(σ)` divided by `sqrt(|σ_next − σ|)`, a standard normal per value.
    pub fn noise(&mut self, sigma: f32, sigma_next: f32) -> Vec<f32> {
        let scale = (sigma_next - sigma).abs().sqrt();
        self.increment(sigma, sigma_next)
            .into_iter()
            .map(|w| w / scale)
            .collect()
    }

    /// `BatchedBrownianTree.__call__(σ, σ_next)`: the increment `W(σ_next) − W(σ)`, computed
    /// as `tree(min, max)` times the sign of the direction.
    pub fn increment(&mut self, sigma: f32, sigma_next: f32) -> Vec<f32> {
        let (lo, hi, sign) = if sigma < sigma_next {
            (sigma, sigma_next, 1.0)
        } else {
            (sigma_next, sigma, -1.0)
        };
        let factor: f32 = self.sign * sign;
        self.interval_w(f64::from(lo), f64::from(hi))
            .into_iter()
            .map(|w| w * factor)
            .collect()
    }

    /// `BrownianInterval.__call__(ta, tb)`: the increment `W(tb) − W(ta)`.
    fn interval_w(&mut self, ta: f64, tb: f64) -> Vec<f32> {
        let (start, end) = (self.nodes[0].start, self.nodes[0].end);
        // Clamped (torchsde warns) before rounding, in torchsde's order.
        let ta = if ta < start { start } else { ta.min(end) };
        let tb = if tb < start { start } else { tb.min(end) };
        if ta >= tb {
            return vec![0.0; self.numel];
        }
        let (ta, tb) = (round_time(ta), round_time(tb));
        let mut cover = Vec::new();
        self.locate(0, ta, tb, &mut cover);
        if self.cache.len() > CACHE_NODES {
            self.cache.clear();
        }
        let mut total = self.node_w(cover[0]);
        for &node in &cover[1..] {
            let w = self.node_w(node);
            for (t, w) in total.iter_mut().zip(&w) {
                *t += w;
            }
        }
        total
    }

    /// `_loc_inner` from the root: the dyadic intervals covering `[ta, tb]`, left to right.
    fn locate(&mut self, node: usize, ta: f64, tb: f64, out: &mut Vec<usize>) {
        let (start, end) = (self.nodes[node].start, self.nodes[node].end);
        if ta == start && tb == end {
            out.push(node);
            return;
        }
        let split = self.split(node);
        if tb <= split.midway {
            self.locate(split.left, ta, tb, out);
        } else if ta >= split.midway {
            self.locate(split.right, ta, tb, out);
        } else {
            self.locate(split.left, ta, split.midway, out);
            self.locate(split.right, split.midway, tb, out);
        }
    }

    /// `_split_exact(0.5 (end + start))`: the node's children, created on first use.
    fn split(&mut self, node: usize) -> Split {
        if let Some(split) = self.nodes[node].split {
            return split;
        }
        let Node {
            start,
            end,
            key,
            depth,
            ..
        } = self.nodes[node];
        let midway = round_time(0.5 * (end + start));
        let w_seed = SeedSequence::new(self.entropy, &[key, u128::from(depth)], POOL_SIZE)
            .generate_state(4)[0];
        let (left, right) = (self.nodes.len(), self.nodes.len() + 1);
        for (is_left, (s, e)) in [(true, (start, midway)), (false, (midway, end))] {
            self.nodes.push(Node {
                start: s,
                end: e,
                key: 2 * key + u128::from(!is_left),
                depth: depth + 1,
                parent: Some((node, is_left)),
                split: None,
            });
        }
        let split = Split {
            midway,
            w_seed,
            left,
            right,
        };
        self.nodes[node].split = Some(split);
        split
    }

    /// A node's increment: the root's own draw, or the Brownian bridge of its parent's.
    fn node_w(&mut self, node: usize) -> Vec<f32> {
        let Some((parent, is_left)) = self.nodes[node].parent else {
            return self.root_w.clone();
        };
        if let Some(w) = self.cache.get(&node) {
            return w.clone();
        }
        let parent_w = self.node_w(parent);
        let Node { start, end, .. } = self.nodes[parent];
        let split = self.nodes[parent].split.expect("a child's parent is split");
        let h_reciprocal = 1.0 / (end - start);
        let left_diff = split.midway - start;
        let right_diff = end - split.midway;
        let (mean_diff, mean_h) = (left_diff as f32, h_reciprocal as f32);
        let std = (left_diff * right_diff * h_reciprocal).sqrt() as f32;
        let z = (self.source)(u64::from(split.w_seed), self.numel);
        let w: Vec<f32> = parent_w
            .iter()
            .zip(&z)
            .map(|(&w, &z)| {
                let left = w * mean_diff * mean_h + std * z;
                if is_left { left } else { w - left }
            })
            .collect();
        self.cache.insert(node, w.clone());
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int_words_are_little_endian_and_zero_is_one_word() {
        assert_eq!(int_words(0), vec![0]);
        assert_eq!(int_words(42), vec![42]);
        assert_eq!(int_words((1 << 32) + 5), vec![5, 1]);
    }

    #[test]
    fn round_time_is_pythons_round_to_six_digits() {
        // Exact binary ties go to even, as Python's correctly rounded `round` does.
        assert_eq!(round_time(0.0078125), 0.007812);
        assert_eq!(round_time(0.0234375), 0.023438);
        assert_eq!(round_time(14.614643096923828), 14.614643);
        assert_eq!(round_time(0.029167521744966507), 0.029168);
    }

    #[test]
    fn queries_of_the_same_interval_agree_in_any_order() {
        let mut a = BrownianTree::new(7, 20, 0.03, 14.6);
        let mut b = BrownianTree::new(7, 20, 0.03, 14.6);
        let first = a.noise(3.0, 1.0);
        b.noise(0.5, 0.1);
        assert_eq!(b.noise(3.0, 1.0), first);
        // Reversing the direction flips the sign only.
        let back: Vec<f32> = a.noise(1.0, 3.0).iter().map(|v| -v).collect();
        assert_eq!(back, first);
    }
}
