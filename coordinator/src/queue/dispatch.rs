//! Which available cells a lease takes, chosen in memory. The dispatcher keeps a read-ahead:
//! the next available cells in queue order (sweep priority, then `scheduled_at`, then id), read
//! from the store a page at a time and continued from where the last page ended. A lease picks
//! from it by the rules of [`affinity`] and only then writes: the store marks exactly the picked
//! cells running, and only those still `available`. So a lease no longer scans the head of the
//! queue or locks a window of rows: on Postgres that scan walked past every cell leased since
//! the last vacuum (their index entries are dead until then) and past the windows other leasers
//! held, which made it the most expensive statement of a render cycle.
//!
//! The store stays the arbiter: a pick is only a proposal, and the fenced
//! `UPDATE … WHERE state = 'available'` decides. A read-ahead that is out of date can therefore
//! cost a retry, never a double lease (two coordinators on one database stay correct too).
//! It goes out of date when cells become available behind its position or change order; every
//! [`Queue`](super::Queue) call that can do that calls [`Dispatch::invalidate`], and the
//! read-ahead is re-read from the head at least every [`REFRESH_MS`] in any case, which bounds
//! how long a change made by anyone else can go unseen.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex as SyncMutex, MutexGuard};

use tokio::sync::Mutex;

use super::affinity::{self, Candidate};
use super::holdings::Holdings;
use crate::Result;
use crate::clock::Millis;
use crate::domain::lease::{AvailableCell, Caps, QueuePos};
use crate::store::Store;

/// Cells read from the store per page of the read-ahead.
const PAGE: usize = 256;
/// Most cells the read-ahead holds. A worker that can render none of them is served by a
/// filtered read past it instead.
const MAX_READ_AHEAD: usize = 4 * PAGE;
/// The read-ahead is re-read from the head of the queue at least this often, ms.
pub const REFRESH_MS: i64 = 1_000;

/// What the dispatcher needs to know about the leasing worker.
#[derive(Clone, Debug)]
pub struct Leaser<'a> {
    /// Worker id.
    pub worker: i64,
    /// What it can render.
    pub caps: Caps,
    /// Affinity keys of its loaded pipelines.
    pub loaded: &'a HashSet<String>,
    /// The registry models workers hold and pipelines need.
    pub holdings: &'a Holdings,
}

/// Cells chosen for one lease, in the order chosen. Until [`Pick::settle`] is called they
/// are in flight: a refill of the read-ahead does not read them back in. Dropped unsettled (the
/// lease's caller went away mid-call), it takes them out of flight and has the read-ahead
/// re-read, since they may still be available.
#[derive(Debug)]
pub struct Pick<'a> {
    /// Chosen cell ids.
    pub ids: Vec<i64>,
    /// The head of the worker's window (what plain FIFO would have handed out), if any.
    pub head: Option<i64>,
    dispatch: &'a Dispatch,
    settled: bool,
}

impl Pick<'_> {
    /// The store has answered: `leased` is whether it applied the lease (each picked cell is
    /// now leased or no longer available). When it did not (an error, a rejected complete),
    /// the picked cells may still be available and the read-ahead is re-read.
    pub fn settle(mut self, leased: bool) {
        self.finish(leased);
    }

    fn finish(&mut self, leased: bool) {
        if self.settled {
            return;
        }
        self.settled = true;
        let mut in_flight = self.dispatch.in_flight();
        for id in &self.ids {
            in_flight.remove(id);
        }
        drop(in_flight);
        if !leased && !self.ids.is_empty() {
            self.dispatch.invalidate();
        }
    }
}

impl Drop for Pick<'_> {
    fn drop(&mut self) {
        self.finish(false);
    }
}

/// The read-ahead and its validity.
#[derive(Debug, Default)]
pub struct Dispatch {
    ahead: Mutex<ReadAhead>,
    /// Bumped by [`Dispatch::invalidate`]; a read-ahead of an older generation is dropped.
    generation: AtomicU64,
    /// Picked, and the store has not yet answered: not to be read back in by a refill.
    in_flight: SyncMutex<HashSet<i64>>,
}

#[derive(Debug, Default)]
struct ReadAhead {
    /// Available cells in queue order, less those picked since they were read.
    cells: Vec<AvailableCell>,
    /// Position of the last cell read: the next page starts after it.
    end: Option<QueuePos>,
    /// The last page came back short: nothing was available past `end` when it was read.
    at_end: bool,
    generation: u64,
    /// When it was last read from the head.
    read_at: Option<Millis>,
}

impl ReadAhead {
    fn restart(&mut self, generation: u64, now: Millis) {
        self.cells.clear();
        self.end = None;
        self.at_end = false;
        self.generation = generation;
        self.read_at = Some(now);
    }

    /// Indexes of the first `n` cells `caps` allows.
    fn eligible(&self, caps: Caps, n: usize) -> Vec<usize> {
        self.cells
            .iter()
            .enumerate()
            .filter(|(_, c)| caps.allows(c))
            .map(|(i, _)| i)
            .take(n)
            .collect()
    }
}

impl Dispatch {
    /// Drops the read-ahead: cells may have become available out of queue order (submitted,
    /// resumed, retried, released, rescued, promoted) or stopped being available.
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Chooses up to `max` cells for `who` among the first `lookahead` available cells it can
    /// render, by the tiers of [`affinity::choose`] (`force_head`: the starvation guard). The
    /// picked cells leave the read-ahead; [`Pick::settle`] it once the store has answered.
    pub async fn pick(
        &self,
        store: &Store,
        who: &Leaser<'_>,
        max: usize,
        lookahead: usize,
        force_head: bool,
        now: Millis,
    ) -> Result<Pick<'_>> {
        let lookahead = lookahead.max(max).max(1);
        let mut ahead = self.ahead.lock().await;
        let generation = self.generation.load(Ordering::Acquire);
        // Concurrent leases read the clock before they queue for the read-ahead, so `now` is
        // often a little older than the last restart: that is not staleness (restarting on it
        // re-read the queue head on most calls under load).
        let stale = ahead
            .read_at
            .is_none_or(|t| now.0.saturating_sub(t.0) >= REFRESH_MS);
        if ahead.generation != generation || stale {
            ahead.restart(generation, now);
        }
        let mut eligible = ahead.eligible(who.caps, lookahead);
        while eligible.len() < lookahead && !ahead.at_end && ahead.cells.len() < MAX_READ_AHEAD {
            let page = store.cell_available(ahead.end, PAGE, None).await?;
            ahead.at_end = page.len() < PAGE;
            if let Some(last) = page.last() {
                ahead.end = Some(last.pos);
            }
            let in_flight = self.in_flight();
            ahead
                .cells
                .extend(page.into_iter().filter(|c| !in_flight.contains(&c.pos.id)));
            drop(in_flight);
            eligible = ahead.eligible(who.caps, lookahead);
        }
        // The read-ahead is full of cells this worker cannot render: look past it, for this
        // worker only (a small GPU among large jobs).
        let past: Vec<AvailableCell> = if eligible.len() < lookahead && !ahead.at_end {
            let page = store
                .cell_available(ahead.end, lookahead - eligible.len(), Some(who.caps))
                .await?;
            let in_flight = self.in_flight();
            page.into_iter()
                .filter(|c| !in_flight.contains(&c.pos.id))
                .collect()
        } else {
            Vec::new()
        };
        let window: Vec<&Candidate> = eligible
            .iter()
            .map(|&i| &ahead.cells[i].candidate)
            .chain(past.iter().map(|c| &c.candidate))
            .collect();
        let head = window.first().map(|c| c.id);
        let warmth = |c: &Candidate| who.holdings.warmth(who.worker, &c.affinity_key);
        let (ids, _) = affinity::choose(who.worker, who.loaded, &window, max, force_head, warmth);
        let picked: HashSet<i64> = ids.iter().copied().collect();
        ahead.cells.retain(|c| !picked.contains(&c.pos.id));
        self.in_flight().extend(&picked);
        Ok(Pick {
            ids,
            head,
            dispatch: self,
            settled: false,
        })
    }

    fn in_flight(&self) -> MutexGuard<'_, HashSet<i64>> {
        // Ids are inserted and removed whole; the set stays valid after a panic elsewhere.
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::clock::{ManualClock, Millis};
    use crate::domain::rows::WorkerRegistration;
    use crate::domain::state::DeviceKind;
    use crate::queue::{Queue, QueueConfig, Submission};
    use crate::store::{DatabaseUrl, Store, StoreOptions};
    use crate::sweep::cell::tests::spec;

    /// A lease call that goes away between the pick and the store's answer (a gRPC client
    /// that disconnects) must not strand its picked cells outside the read-ahead.
    #[tokio::test]
    async fn a_pick_dropped_before_the_store_answers_is_leased_later() {
        let dir = tempfile::tempdir().unwrap();
        let url = DatabaseUrl::Sqlite(format!("sqlite://{}", dir.path().join("q.db").display()));
        let store = Store::connect(&url, &StoreOptions::default())
            .await
            .unwrap();
        let clock = ManualClock::new(Millis(1_000));
        let queue = Queue::new(store.clone(), Arc::new(clock), QueueConfig::default());
        let sub = Submission {
            name: "s".into(),
            idempotency_key: "s".into(),
            priority: 0,
            max_attempts: None,
            spec: String::new(),
            cells: (0..3).map(spec).collect(),
            owner: None,
            unique_name: false,
        };
        queue.submit(sub).await.unwrap();
        let w = queue
            .register(&WorkerRegistration {
                name: "w".into(),
                device_kind: DeviceKind::Cpu,
                device_model: "test".into(),
                memory_mib: 8192,
                max_pixels: 1 << 20,
                loaded: vec![],
                version: "test".into(),
                storage: "file:///tmp/kiln-test".into(),
                render_level: 0,
            })
            .await
            .unwrap()
            .0;
        let now = queue.now();
        let known = queue.lease_worker(w, 1, None, now).await.unwrap();
        let pick = queue.pick(w, &known, 1, now).await.unwrap();
        assert_eq!(pick.ids.len(), 1);
        drop(pick);
        let leased = queue.lease(w, 3, None).await.unwrap();
        assert_eq!(
            leased.len(),
            3,
            "the dropped pick's cell is leased after all"
        );
        store.close().await;
    }
}
