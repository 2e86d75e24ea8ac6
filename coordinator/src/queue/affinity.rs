//! Which of the next available cells a worker gets. Among the first `lookahead` cells it can
//! render (queue order: sweep priority, then age), it prefers those whose pipeline it has
//! loaded, then any, and last those that just failed on it. A cold cell at the head of the
//! queue is passed over at most `max_skips` times in a row by one worker, so affinity can
//! never starve it.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

/// One available cell the worker could take, in queue order.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// Cell id.
    pub id: i64,
    /// Pipeline-reuse hash.
    pub affinity_key: String,
    /// Worker of the cell's last failed attempt, if any.
    pub last_failed_worker: Option<i64>,
}

/// Per-worker memory of how often the queue head was passed over.
#[derive(Debug, Default)]
pub struct AffinityState {
    skips: Mutex<HashMap<i64, u32>>,
}

impl AffinityState {
    /// Picks up to `n` of `candidates` for `worker`, returning ids in the order chosen.
    pub fn choose(
        &self,
        worker: i64,
        loaded: &HashSet<String>,
        candidates: &[Candidate],
        n: usize,
        max_skips: u32,
    ) -> Vec<i64> {
        let tier = |c: &Candidate| {
            if c.last_failed_worker == Some(worker) {
                2
            } else if loaded.contains(&c.affinity_key) {
                0
            } else {
                1
            }
        };
        let mut order: Vec<(u8, usize)> = candidates
            .iter()
            .enumerate()
            .map(|(i, c)| (tier(c), i))
            .collect();
        order.sort_unstable();
        let mut chosen: Vec<usize> = order.iter().take(n).map(|&(_, i)| i).collect();

        // The head is the first candidate in queue order that did not just fail here.
        let head = candidates.iter().position(|c| tier(c) != 2);
        if let Some(head) = head {
            let mut skips = self.skips.lock().unwrap_or_else(|e| e.into_inner());
            let count = skips.entry(worker).or_insert(0);
            if chosen.contains(&head) || chosen.is_empty() {
                *count = 0;
            } else if *count >= max_skips {
                chosen.pop();
                chosen.insert(0, head);
                *count = 0;
            } else {
                *count += 1;
            }
        }
        chosen.into_iter().map(|i| candidates[i].id).collect()
    }

    /// Forgets a worker (on drain).
    pub fn forget(&self, worker: i64) {
        self.skips
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&worker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: i64, key: &str) -> Candidate {
        Candidate {
            id,
            affinity_key: key.into(),
            last_failed_worker: None,
        }
    }

    #[test]
    fn prefers_loaded_then_queue_order() {
        let s = AffinityState::default();
        let loaded: HashSet<String> = ["b".to_string()].into();
        let cands = [c(1, "a"), c(2, "b"), c(3, "a"), c(4, "b")];
        assert_eq!(s.choose(7, &loaded, &cands, 3, 8), vec![2, 4, 1]);
    }

    #[test]
    fn failed_here_goes_last() {
        let s = AffinityState::default();
        let mut first = c(1, "a");
        first.last_failed_worker = Some(7);
        let cands = [first, c(2, "a")];
        assert_eq!(s.choose(7, &HashSet::new(), &cands, 2, 8), vec![2, 1]);
        assert_eq!(s.choose(8, &HashSet::new(), &cands, 2, 8), vec![1, 2]);
    }

    #[test]
    fn cold_head_is_taken_after_max_skips() {
        let s = AffinityState::default();
        let loaded: HashSet<String> = ["warm".to_string()].into();
        let cands = [c(1, "cold"), c(2, "warm"), c(3, "warm")];
        for _ in 0..3 {
            assert_eq!(s.choose(7, &loaded, &cands, 1, 3), vec![2]);
        }
        assert_eq!(s.choose(7, &loaded, &cands, 1, 3), vec![1]);
        assert_eq!(s.choose(7, &loaded, &cands, 1, 3), vec![2]);
    }
}
