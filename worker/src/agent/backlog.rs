//! The backlog: attempts leased ahead of the render, and the leasing task that keeps it full.
//!
//! Leasing runs beside the render, never between two renders: the render loop takes its next
//! cells from the backlog at once while the backlog is topped up. Top-ups ride on completes
//! when they can (`CompleteRequest.lease_next`, one round trip per image): while the next batch
//! is already queued and a finished image is on its way to the coordinator, the leasing task
//! leaves the top-up to that complete; it leases itself when the next batch is not secured
//! (start-up, a slow upload, an empty queue). Cells asked for but not yet arrived are
//! *claimed*, so the two never lease the same gap twice.
//!
//! Each leased cell is resolved to a pipeline key and a render request when it arrives, and a
//! pipeline that is not loaded yet is handed to the render thread to prepare while the current
//! cell renders.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_proto::v1 as pb;
use kiln_proto::{Attempt, CellId, SweepId};
use tokio::sync::{Notify, watch};

use super::link::Link;
use super::renderer::Renderer;
use super::tracked::{AttemptFlags, Tracked};
use crate::cache::PipelineKey;
use crate::engine::RenderRequest;
use crate::upload::object_key;

/// What a leased cell renders with, or why it cannot render.
pub(super) type Plan = Result<(PipelineKey, RenderRequest), String>;

/// One leased attempt the agent holds.
pub(super) struct Held {
    pub(super) task: pb::LeasedTask,
    pub(super) plan: Plan,
    /// What the heartbeat learned about it (cancelled, lost).
    pub(super) flags: Arc<AttemptFlags>,
}

impl Held {
    pub(super) fn attempt(&self) -> pb::AttemptRef {
        pb::AttemptRef {
            cell_id: self.task.cell_id,
            attempt: self.task.attempt,
        }
    }

    /// Where its image is stored; `None` when the coordinator sent ids it never assigns (0).
    pub(super) fn object_key(&self) -> Option<String> {
        let t = &self.task;
        Some(object_key(
            SweepId::from_wire(t.sweep_id)?,
            CellId::from_wire(t.cell_id)?,
            Attempt::from_wire(t.attempt)?,
        ))
    }

    pub(super) fn is_lost(&self) -> bool {
        self.flags.is_lost()
    }
}

/// Affinity keys of cells seen, with the pipeline each needs (most recent last).
pub(super) type Affinity = Arc<Mutex<Vec<(String, PipelineKey)>>>;

/// Leased attempts waiting to render.
pub(super) struct Backlog {
    queue: Mutex<VecDeque<Held>>,
    /// Attempts to hold: the cells of the next batch plus the prefetch.
    target: usize,
    /// Cells of one batch.
    batch: usize,
    /// Cells asked for by lease or complete calls in flight.
    claimed: Mutex<usize>,
    /// Rendered attempts being uploaded and completed.
    finishing: AtomicUsize,
    /// Set by the drain: claim nothing more.
    stopped: AtomicBool,
    /// Set while the worker yields to its owner: claim nothing until resumed.
    paused: AtomicBool,
    /// Signalled when attempts arrive.
    pub(super) arrived: Notify,
    /// Signalled when attempts leave, or a claim or a finish ends.
    pub(super) left: Notify,
}

impl Backlog {
    pub(super) fn new(batch: usize, prefetch: usize) -> Self {
        Self {
            queue: Mutex::default(),
            target: batch + prefetch,
            batch,
            claimed: Mutex::new(0),
            finishing: AtomicUsize::new(0),
            stopped: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            arrived: Notify::new(),
            left: Notify::new(),
        }
    }

    /// Claims the gap between what is held or asked for and the target; returns its size (0
    /// once draining, and while paused).
    pub(super) fn claim(&self) -> usize {
        if self.stopped.load(Ordering::SeqCst) || self.paused.load(Ordering::SeqCst) {
            return 0;
        }
        let mut claimed = self.claimed.lock().unwrap_or_else(|e| e.into_inner());
        let gap = self.target.saturating_sub(self.len() + *claimed);
        *claimed += gap;
        gap
    }

    /// Ends a claim of `n` (its cells have arrived or will not).
    pub(super) fn unclaim(&self, n: usize) {
        if n > 0 {
            *self.claimed.lock().unwrap_or_else(|e| e.into_inner()) -= n;
            self.left.notify_one();
        }
    }

    /// Stops all leasing (drain).
    pub(super) fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.left.notify_one();
    }

    /// Stops leasing while the worker yields to its owner (`true`), or lets it go on.
    pub(super) fn set_paused(&self, paused: bool) {
        if self.paused.swap(paused, Ordering::SeqCst) != paused {
            self.left.notify_one();
        }
    }

    /// Counts a rendered attempt on its way to the coordinator.
    pub(super) fn finishing_started(&self) {
        self.finishing.fetch_add(1, Ordering::SeqCst);
    }

    pub(super) fn finishing_ended(&self) {
        self.finishing.fetch_sub(1, Ordering::SeqCst);
        self.left.notify_one();
    }

    /// Whether the leasing task should leave the top-up to a complete: the next batch is
    /// queued and a complete is coming.
    fn complete_will_top_up(&self) -> bool {
        self.len() >= self.batch && self.finishing.load(Ordering::SeqCst) > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Held>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }

    /// The next attempt and up to `batch - 1` more that render with the same pipeline and
    /// settings (the cells of one UNet batch), in queue order.
    pub(super) fn take(&self, batch: usize) -> Vec<Held> {
        let mut queue = self.lock();
        let Some(first) = queue.pop_front() else {
            return Vec::new();
        };
        let mut group = vec![first];
        if let Ok((key, request)) = &group[0].plan {
            let (key, request) = (key.clone(), request.clone());
            let mut i = 0;
            while group.len() < batch && i < queue.len() {
                let alike = matches!(&queue[i].plan,
                    Ok((k, r)) if *k == key && r.batchable_with(&request));
                if alike && !queue[i].is_lost() {
                    group.push(queue.remove(i).expect("index is in range"));
                } else {
                    i += 1;
                }
            }
        }
        drop(queue);
        self.left.notify_one();
        group
    }

    /// Removes and returns every attempt (drain).
    pub(super) fn drain(&self) -> Vec<Held> {
        let all = self.lock().drain(..).collect();
        self.left.notify_one();
        all
    }

    /// Drops attempts whose lease the coordinator took back; returns them.
    pub(super) fn drop_lost(&self) -> Vec<pb::AttemptRef> {
        let mut queue = self.lock();
        let lost = queue
            .iter()
            .filter(|h| h.is_lost())
            .map(Held::attempt)
            .collect();
        queue.retain(|h| !h.is_lost());
        lost
    }

    fn push(&self, held: Held) {
        self.lock().push_back(held);
    }
}

/// What the leasing task needs.
pub(super) struct Leaser {
    pub(super) link: Link,
    pub(super) renderer: Renderer,
    pub(super) backlog: Arc<Backlog>,
    pub(super) tracked: Tracked,
    pub(super) affinity: Affinity,
    pub(super) idle_poll: Duration,
    /// Resolves a leased cell.
    pub(super) plan: Box<dyn Fn(&pb::LeasedTask) -> Plan + Send + Sync>,
}

impl Leaser {
    /// Keeps the backlog topped up until `stop` turns true. A lease call in flight is finished
    /// first, so every attempt the coordinator gave lands in the backlog (and is released by
    /// the drain).
    pub(super) async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            if *stop.borrow() {
                return;
            }
            let want = if self.backlog.complete_will_top_up() {
                0
            } else {
                self.backlog.claim()
            };
            if want == 0 {
                tokio::select! {
                    _ = self.backlog.left.notified() => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            tracing::debug!(want, "leasing");
            let tasks = self.link.lease(want as u32, self.loaded()).await;
            let empty = tasks.is_empty();
            self.admit(tasks);
            self.backlog.unclaim(want);
            if empty {
                tokio::select! {
                    _ = tokio::time::sleep(self.idle_poll) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }

    /// Resolves leased cells, starts preparing pipelines not loaded yet, and queues them.
    pub(super) fn admit(&self, tasks: Vec<pb::LeasedTask>) {
        if tasks.is_empty() {
            return;
        }
        // The models these cells pin count as this worker's from now on (it is fetching
        // them), so the next lease, which may come before the downloads end, prefers more cells
        // of them over cells whose models another worker fetches.
        self.link
            .expect_models(tasks.iter().filter_map(|t| t.cell.as_ref()));
        let loaded = self.renderer.loaded();
        for task in tasks {
            let plan = (self.plan)(&task);
            if let Ok((key, _)) = &plan {
                if !loaded.contains(key) {
                    self.renderer.prepare(key.clone());
                }
                remember(&self.affinity, &task.affinity_key, key);
            }
            let flags = self.tracked.add(pb::AttemptRef {
                cell_id: task.cell_id,
                attempt: task.attempt,
            });
            self.backlog.push(Held { task, plan, flags });
        }
        self.backlog.arrived.notify_one();
    }

    /// Affinity keys whose pipeline is loaded now.
    pub(super) fn loaded(&self) -> Vec<String> {
        let loaded = self.renderer.loaded();
        self.affinity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, k)| loaded.contains(k))
            .map(|(a, _)| a.clone())
            .collect()
    }
}

/// Records that cells of `affinity_key` render with `key` (keeps the last 64).
fn remember(affinity: &Affinity, affinity_key: &str, key: &PipelineKey) {
    let mut a = affinity.lock().unwrap_or_else(|e| e.into_inner());
    a.retain(|(k, _)| k != affinity_key);
    a.push((affinity_key.to_owned(), key.clone()));
    if a.len() > 64 {
        a.remove(0);
    }
}
