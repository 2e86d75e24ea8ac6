//! Which of the next available cells a worker gets. Among the first `lookahead` cells it can
//! render (queue order: sweep priority, then age), it prefers those whose pipeline it has
//! loaded (tier 0), then those whose pinned registry models it holds on disk (or that pin
//! none; tier 1), then those it must download a model for that no other worker holds (tier 2),
//! then those needing a model another worker holds (tier 3: better rendered there), and last
//! those that just failed on it (tier 4). [`Warmth`] is `holdings`'. The head
//! of that window — the cell plain FIFO would hand out — may be passed over at most
//! `max_skips` times in a row by one worker; then it is taken first, so affinity can never
//! starve a cold cell. Only passing over the same head counts: a head that other workers keep
//! taking (each time a new cell, as when two workers split a sweep by model) is not starving,
//! and forcing it on this worker would only make it load or download that model too.
//!
//! [`choose`] applies the tiers to the window the dispatcher (`queue::dispatch`) reads ahead;
//! the conformance suite checks the rules on both backends.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

pub use super::holdings::Warmth;
pub use crate::domain::candidate::Candidate;

/// Per worker: the window head it last passed over, and how many of its leases in a row
/// passed over that same cell.
#[derive(Debug, Default)]
pub struct AffinityState {
    skips: Mutex<HashMap<i64, (Option<i64>, u32)>>,
}

impl AffinityState {
    /// Whether this worker's next lease must take the window head first.
    pub fn force_head(&self, worker: i64, max_skips: u32) -> bool {
        self.lock().get(&worker).map_or(0, |s| s.1) >= max_skips
    }

    /// Records whether a lease took the window head `head` (or found nothing, which is no
    /// skip); passing over a different head than last time starts the count again.
    pub fn record(&self, worker: i64, head: Option<i64>, head_taken_or_empty: bool) {
        let mut skips = self.lock();
        let entry = skips.entry(worker).or_insert((None, 0));
        if head_taken_or_empty {
            *entry = (None, 0);
        } else if entry.0 == head {
            entry.1 += 1;
        } else {
            *entry = (head, 1);
        }
    }

    /// Forgets a worker (on drain).
    pub fn forget(&self, worker: i64) {
        self.lock().remove(&worker);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, (Option<i64>, u32)>> {
        // Counters stay meaningful after a panic elsewhere: each update is one integer.
        self.skips.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Picks up to `n` of `candidates` (in queue order) for `worker`; returns the ids in the order
/// chosen and whether the head (`candidates[0]`) is among them.
/// `warmth` says how far the worker is from a candidate's pinned models.
pub fn choose(
    worker: i64,
    loaded: &HashSet<String>,
    candidates: &[&Candidate],
    n: usize,
    force_head: bool,
    warmth: impl Fn(&Candidate) -> Warmth,
) -> (Vec<i64>, bool) {
    let tier = |i: usize, c: &&Candidate| -> i8 {
        if force_head && i == 0 {
            -1
        } else if c.last_failed_worker == Some(worker) {
            4
        } else if loaded.contains(&c.affinity_key) {
            0
        } else {
            match warmth(c) {
                Warmth::Holds => 1,
                Warmth::Fetch => 2,
                Warmth::HeldElsewhere => 3,
            }
        }
    };
    let base: Vec<i8> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| tier(i, c))
        .collect();
    // Picked one at a time: once a cell is picked, cells of its pipeline (same affinity key:
    // model, LoRAs, size) count as loaded, so one lease of several cells takes alike cells
    // rather than one of each model (each a download for a worker that holds nothing yet).
    let mut picked: Vec<usize> = Vec::with_capacity(n.min(candidates.len()));
    let mut keys: HashSet<&str> = HashSet::new();
    while picked.len() < n {
        let best = (0..candidates.len())
            .filter(|i| !picked.contains(i))
            .min_by_key(|&i| {
                let t = base[i];
                let alike =
                    (1..=3).contains(&t) && keys.contains(candidates[i].affinity_key.as_str());
                (if alike { 0 } else { t }, i)
            });
        let Some(i) = best else { break };
        keys.insert(candidates[i].affinity_key.as_str());
        picked.push(i);
    }
    let head_taken = picked.contains(&0);
    (
        picked.into_iter().map(|i| candidates[i].id).collect(),
        head_taken,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cold(_: &Candidate) -> Warmth {
        Warmth::Holds
    }

    fn c(id: i64, key: &str) -> Candidate {
        Candidate {
            id,
            affinity_key: key.into(),
            last_failed_worker: None,
        }
    }

    #[test]
    fn prefers_loaded_then_queue_order() {
        let loaded: HashSet<String> = ["b".to_string()].into();
        let cands = [c(1, "a"), c(2, "b"), c(3, "a"), c(4, "b")];
        let cands: Vec<&Candidate> = cands.iter().collect();
        assert_eq!(
            choose(7, &loaded, &cands, 3, false, cold),
            (vec![2, 4, 1], true)
        );
        assert_eq!(
            choose(7, &loaded, &cands, 2, false, cold),
            (vec![2, 4], false)
        );
    }

    /// A worker that holds nothing, leasing two: two cells of one model (one download), not
    /// one of each.
    #[test]
    fn one_lease_takes_alike_cells() {
        let cands = [c(1, "a"), c(2, "b"), c(3, "a"), c(4, "b")];
        let cands: Vec<&Candidate> = cands.iter().collect();
        let fetch = |_: &Candidate| Warmth::Fetch;
        assert_eq!(
            choose(7, &HashSet::new(), &cands, 2, false, fetch),
            (vec![1, 3], true)
        );
    }

    #[test]
    fn failed_here_goes_last() {
        let mut first = c(1, "a");
        first.last_failed_worker = Some(7);
        let cands = [first, c(2, "a")];
        let cands: Vec<&Candidate> = cands.iter().collect();
        assert_eq!(
            choose(7, &HashSet::new(), &cands, 2, false, cold).0,
            vec![2, 1]
        );
        assert_eq!(
            choose(8, &HashSet::new(), &cands, 2, false, cold).0,
            vec![1, 2]
        );
    }

    #[test]
    fn held_models_before_downloads_and_downloads_others_hold_last() {
        let cands = [
            c(1, "elsewhere"),
            c(2, "fetch"),
            c(3, "holds"),
            c(4, "fetch"),
        ];
        let cands: Vec<&Candidate> = cands.iter().collect();
        let warmth = |c: &Candidate| match c.affinity_key.as_str() {
            "holds" => Warmth::Holds,
            "fetch" => Warmth::Fetch,
            _ => Warmth::HeldElsewhere,
        };
        let got = choose(7, &HashSet::new(), &cands, 4, false, warmth);
        assert_eq!(got, (vec![3, 2, 4, 1], true), "never a refusal: all four");
        // The starvation guard still takes the head first.
        assert_eq!(
            choose(7, &HashSet::new(), &cands, 1, true, warmth).0,
            vec![1]
        );
    }

    #[test]
    fn cold_head_is_taken_after_max_skips() {
        let s = AffinityState::default();
        let loaded: HashSet<String> = ["warm".to_string()].into();
        let cands = [c(1, "cold"), c(2, "warm"), c(3, "warm")];
        let cands: Vec<&Candidate> = cands.iter().collect();
        let mut got = Vec::new();
        for _ in 0..5 {
            let (ids, head) = choose(7, &loaded, &cands, 1, s.force_head(7, 3), cold);
            s.record(7, Some(1), head);
            got.push(ids[0]);
        }
        assert_eq!(got, vec![2, 2, 2, 1, 2]);
    }

    #[test]
    fn a_head_that_others_keep_taking_is_not_starving() {
        let s = AffinityState::default();
        for head in 1..20 {
            assert!(!s.force_head(7, 3), "head {head}");
            s.record(7, Some(head), false);
        }
        s.record(7, Some(19), false);
        s.record(7, Some(19), false);
        assert!(s.force_head(7, 3), "the same head passed over three times");
    }
}
