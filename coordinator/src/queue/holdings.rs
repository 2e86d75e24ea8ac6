//! Which registry models the workers hold on disk, and which ones each pipeline needs, so a
//! lease can prefer cells whose pinned models the leasing worker already has over cells that
//! make it download gigabytes first ([`affinity`](super::affinity)'s model tiers).
//!
//! Both halves live in memory only and are bounded: a worker's set is what its last
//! `LeaseRequest.cached_models` said (at most [`MAX_CACHED_MODELS`], replaced whole each time,
//! forgotten on drain); a pipeline's needs (affinity key → pinned sha256s) are recorded as
//! sweeps are taken in, at most [`MAX_PIPELINES`] of them (later ones are not recorded). What is
//! not known — after a restart, past the bound — is treated as needing nothing, which is the
//! behaviour before the registry: a preference, never a refusal, so nothing can starve on it.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

/// Most hashes one worker's report may name (`LeaseRequest.cached_models`).
pub const MAX_CACHED_MODELS: usize = 4096;

/// Most pipelines whose pinned models are remembered.
pub const MAX_PIPELINES: usize = 65_536;

/// How far a worker is from rendering a cell's pinned models.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Warmth {
    /// It holds every pinned model (or the cell pins none).
    Holds,
    /// It must download one that no other worker holds either: someone has to.
    Fetch,
    /// It must download one that another worker holds: better left to that one.
    HeldElsewhere,
}

/// The workers' model holdings and the pipelines' needs.
#[derive(Debug, Default)]
pub struct Holdings {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_worker: HashMap<i64, HashSet<String>>,
    /// sha256 → how many workers hold it.
    holders: HashMap<String, u32>,
    /// Affinity key → the sha256s its cells pin.
    needs: HashMap<String, Vec<String>>,
}

impl Holdings {
    /// Replaces what `worker` holds with `cached` (already checked: hashes, at most
    /// [`MAX_CACHED_MODELS`]).
    pub fn report(&self, worker: i64, cached: &[String]) {
        let mut inner = self.lock();
        let new: HashSet<String> = cached.iter().cloned().collect();
        let old = inner
            .by_worker
            .insert(worker, new.clone())
            .unwrap_or_default();
        for sha in old.difference(&new) {
            if let Some(n) = inner.holders.get_mut(sha) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    inner.holders.remove(sha);
                }
            }
        }
        for sha in new.difference(&old) {
            *inner.holders.entry(sha.clone()).or_insert(0) += 1;
        }
    }

    /// Counts the models `worker` was just leased cells of as held by it: it is fetching them
    /// now, and its next report (which names them) comes a lease call later, after another
    /// worker's lease may have gone for the same model.
    pub fn leased<'a>(&self, worker: i64, affinity_keys: impl IntoIterator<Item = &'a str>) {
        let mut inner = self.lock();
        let Inner {
            by_worker,
            holders,
            needs,
        } = &mut *inner;
        let held = by_worker.entry(worker).or_default();
        for key in affinity_keys {
            for sha in needs.get(key).into_iter().flatten() {
                if held.insert(sha.clone()) {
                    *holders.entry(sha.clone()).or_insert(0) += 1;
                }
            }
        }
    }

    /// Forgets a worker (drained or gone).
    pub fn forget(&self, worker: i64) {
        self.report(worker, &[]);
        self.lock().by_worker.remove(&worker);
    }

    /// Records the models pipeline `affinity_key` pins (while there is room).
    pub fn need(&self, pipelines: HashMap<String, Vec<String>>) {
        let mut inner = self.lock();
        for (key, shas) in pipelines {
            if inner.needs.len() < MAX_PIPELINES || inner.needs.contains_key(&key) {
                inner.needs.insert(key, shas);
            }
        }
    }

    /// How far `worker` is from a cell of pipeline `affinity_key`.
    pub fn warmth(&self, worker: i64, affinity_key: &str) -> Warmth {
        let inner = self.lock();
        let Some(needs) = inner.needs.get(affinity_key) else {
            return Warmth::Holds;
        };
        let held = inner.by_worker.get(&worker);
        let missing: Vec<&String> = needs
            .iter()
            .filter(|sha| !held.is_some_and(|h| h.contains(*sha)))
            .collect();
        if missing.is_empty() {
            Warmth::Holds
        } else if missing.iter().all(|sha| inner.holders.contains_key(*sha)) {
            Warmth::HeldElsewhere
        } else {
            Warmth::Fetch
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Each update leaves the maps consistent; a panic elsewhere does not spoil them.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmth_follows_reports() {
        let h = Holdings::default();
        h.need(HashMap::from([
            ("p".to_string(), vec!["a".to_string()]),
            ("q".to_string(), vec!["a".to_string(), "b".to_string()]),
        ]));
        assert_eq!(h.warmth(1, "p"), Warmth::Fetch, "nobody holds a");
        assert_eq!(h.warmth(1, "unknown"), Warmth::Holds);
        h.report(2, &["a".into()]);
        assert_eq!(h.warmth(1, "p"), Warmth::HeldElsewhere);
        assert_eq!(h.warmth(2, "p"), Warmth::Holds);
        assert_eq!(h.warmth(2, "q"), Warmth::Fetch, "nobody holds b");
        h.report(2, &["b".into()]);
        assert_eq!(h.warmth(1, "p"), Warmth::Fetch, "2 no longer holds a");
        h.forget(2);
        assert_eq!(h.warmth(1, "q"), Warmth::Fetch);
    }

    #[test]
    fn a_lease_counts_as_holding_until_the_next_report() {
        let h = Holdings::default();
        h.need(HashMap::from([
            ("p".to_string(), vec!["a".to_string()]),
            ("q".to_string(), vec!["b".to_string()]),
        ]));
        h.leased(1, ["p", "unknown"]);
        assert_eq!(h.warmth(1, "p"), Warmth::Holds, "fetching it");
        assert_eq!(h.warmth(2, "p"), Warmth::HeldElsewhere, "left to worker 1");
        assert_eq!(h.warmth(2, "q"), Warmth::Fetch);
        h.leased(1, ["p"]);
        h.report(1, &[]);
        assert_eq!(
            h.warmth(2, "p"),
            Warmth::Fetch,
            "counted once, replaced by the report"
        );
    }
}
