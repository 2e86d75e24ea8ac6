//! Leases on the queue: the worker's capabilities and loaded pipelines (kept between leases),
//! the dispatcher's pick (`dispatch`), the store's write of exactly the picked cells (by group
//! commit: concurrent leases share one statement, see `group`), and the affinity bookkeeping
//! after it. Also the complete-and-lease-next call.

use std::collections::HashMap;

use kiln_proto::WorkerId;

use super::dispatch::{Leaser, Pick};
use super::group::Group;
use super::{KnownWorker, Queue};
use crate::clock::Millis;
use crate::domain::lease::{Caps, Fence, LeasePick, LeasedCell};
use crate::{Error, Result};

impl Queue {
    /// Leases up to `max` cells the worker can render, preferring what it has `loaded`.
    pub async fn lease(
        &self,
        worker: WorkerId,
        max: usize,
        loaded: Option<&[String]>,
    ) -> Result<Vec<LeasedCell>> {
        let now = self.now();
        let w = self.lease_worker(worker, max, loaded, now).await?;
        // A picked cell may have stopped being available since the read-ahead saw it (then the
        // store leaves it out): pick again, a few times, rather than answer "nothing" while
        // cells wait.
        for _ in 0..4 {
            let pick = self.pick(worker, &w, max, now).await?;
            let head = pick.head;
            if pick.ids.is_empty() {
                self.leased(worker, &[], head);
                return Ok(Vec::new());
            }
            let out = self
                .write_lease(self.lease_pick(worker, &w, &pick), now)
                .await;
            pick.settle(out.is_ok());
            let leased = out?;
            if !leased.is_empty() {
                self.leased(worker, &leased, head);
                return Ok(leased);
            }
        }
        self.leased(worker, &[], None);
        Ok(Vec::new())
    }

    /// Records the result of the fenced attempt, then leases up to `next` cells for the same
    /// worker as [`Queue::lease`] would: one round trip per image for a worker that renders
    /// one cell at a time. `next` = 0 is a plain complete. A stale attempt is rejected as by
    /// [`Queue::complete`] (`LeaseLost`) and leases nothing.
    ///
    /// The two are separate writes: the complete goes through the group commit with every
    /// other complete, which on Postgres took this call from 702 to 1,870 cycles/s with 64
    /// workers and a pool of 32 (1,830 to 2,093 with 8) against one transaction of both. If
    /// the coordinator stops between them, the result is recorded and the worker's call fails;
    /// its retry of the complete is answered `LeaseLost`, as for any repeated complete, and
    /// nothing is lost.
    pub async fn complete_and_lease(
        &self,
        f: Fence,
        result_json: &str,
        next: usize,
        loaded: Option<&[String]>,
    ) -> Result<Vec<LeasedCell>> {
        if next > self.cfg.max_lease_batch {
            return Err(Error::invalid(format!(
                "lease_next: {next} is outside 0..={}",
                self.cfg.max_lease_batch
            )));
        }
        self.complete(f, result_json).await?;
        if next == 0 {
            return Ok(Vec::new());
        }
        self.lease(f.worker, next, loaded).await
    }

    /// Writes one pick, in whichever batch of the lease group takes it.
    async fn write_lease(&self, pick: LeasePick, now: Millis) -> Result<Vec<LeasedCell>> {
        self.leases
            .get_or_init(|| Group::start(self.store.clone()))
            .call((pick, now))
            .await
    }

    /// The leasing worker, checked: `max` within bounds, and known.
    pub(super) async fn lease_worker(
        &self,
        worker: WorkerId,
        max: usize,
        loaded: Option<&[String]>,
        now: Millis,
    ) -> Result<KnownWorker> {
        if max == 0 || max > self.cfg.max_lease_batch {
            return Err(Error::invalid(format!(
                "max_tasks: {max} is outside 1..={}",
                self.cfg.max_lease_batch
            )));
        }
        self.known_worker(worker, loaded, now).await
    }

    /// The dispatcher's choice of up to `max` cells for `worker`.
    pub(super) async fn pick(
        &self,
        worker: WorkerId,
        w: &KnownWorker,
        max: usize,
        now: Millis,
    ) -> Result<Pick<'_>> {
        let who = Leaser {
            worker: worker.0,
            caps: Caps {
                max_pixels: w.max_pixels,
                memory_mib: w.memory_mib,
                render_level: w.render_level,
            },
            loaded: &w.loaded,
            holdings: &self.holdings,
        };
        let force_head = self
            .affinity
            .force_head(worker.0, self.cfg.max_affinity_skips);
        self.dispatch
            .pick(&self.store, &who, max, self.cfg.lookahead, force_head, now)
            .await
    }

    pub(super) fn lease_pick(&self, worker: WorkerId, w: &KnownWorker, pick: &Pick) -> LeasePick {
        LeasePick {
            worker,
            ids: pick.ids.clone(),
            head: pick.head,
            lease_ttl_ms: self.cfg.lease_ttl_ms,
            render_level: w.render_level,
        }
    }

    /// Bookkeeping after a lease: the skip counter of window head `head`, the models the worker now
    /// fetches ([`holdings`](super::holdings)) and change events.
    pub(super) fn leased(&self, worker: WorkerId, leased: &[LeasedCell], head: Option<i64>) {
        self.counters.leased(leased.len());
        self.holdings
            .leased(worker.0, leased.iter().map(|c| c.affinity_key.as_str()));
        self.affinity.record(
            worker.0,
            head,
            leased.is_empty() || leased.iter().any(|c| c.was_head),
        );
        if !leased.is_empty() {
            self.events.changed();
        }
    }

    /// The worker's capabilities and loaded set. Writes `last_seen_at` (and a changed loaded
    /// set) at most every quarter lease TTL; an unknown worker is an error.
    pub(super) async fn known_worker(
        &self,
        worker: WorkerId,
        loaded: Option<&[String]>,
        now: Millis,
    ) -> Result<KnownWorker> {
        let cached = self.known_lock().get(&worker).cloned();
        if let Some(k) = cached {
            let same_loaded = loaded.is_none_or(|l| {
                l.len() == k.loaded.len() && l.iter().all(|x| k.loaded.contains(x))
            });
            if same_loaded && now.0 - k.written_at.0 < self.cfg.lease_ttl_ms / 4 {
                return Ok(k);
            }
        }
        let row = self.store.worker_seen(worker, loaded, now).await?;
        let k = KnownWorker {
            max_pixels: row.info.max_pixels,
            memory_mib: row.info.memory_mib,
            render_level: i64::from(row.info.render_level),
            loaded: row.info.loaded.into_iter().collect(),
            written_at: now,
        };
        self.known_lock().insert(worker, k.clone());
        Ok(k)
    }

    pub(super) fn known_lock(&self) -> std::sync::MutexGuard<'_, HashMap<WorkerId, KnownWorker>> {
        // A poisoned cache is still a valid cache: entries are replaced whole.
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }
}
