//! Group commit of completes. Concurrent `Complete` calls are gathered and written together:
//! one statement and one commit for every complete that arrived while the previous batches
//! were being written ([`Store::cell_complete_many`]). Each caller still gets its own answer
//! (`LeaseLost` for a stale attempt, `CellNotFound`), and gets it only after its batch has
//! committed, so an acknowledged result is durable as before. What changes is the cost: on
//! Postgres every commit waits for a WAL flush, and with many workers completing at once most
//! of a cycle's time was commits and per-statement work (BENCHMARKS.md, "Session 4").
//!
//! No caller waits for a batch to fill: a batch is whatever is waiting when a write slot is
//! free, so a lone complete is written at once. A task owns the writing, so a caller that goes
//! away (a gRPC client that hung up) cannot strand the others of its batch. If a batch's
//! statement fails (say, a result the database refuses), its completes are written one by one,
//! so the bad one gets its own error and the rest succeed.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::clock::Millis;
use crate::store::{Completion, Fence, Store};
use crate::{Error, Result};

/// Batches written at the same time. Two lets one batch gather while another commits.
const IN_FLIGHT: usize = 2;
/// Most completes in one batch.
const MAX_BATCH: usize = 256;

struct Request {
    fence: Fence,
    result_json: String,
    at: Millis,
    reply: oneshot::Sender<Result<()>>,
}

/// The handle the queue completes through; started on the first complete.
#[derive(Debug)]
pub(super) struct Completer {
    requests: mpsc::UnboundedSender<Request>,
}

impl Completer {
    /// Starts the writing task on the current Tokio runtime; it ends when the handle is
    /// dropped and every request has been answered.
    pub(super) fn start(store: Store) -> Self {
        let (requests, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(store, rx));
        Self { requests }
    }

    /// Records the result of the fenced attempt, in whichever batch takes it.
    pub(super) async fn complete(
        &self,
        store: &Store,
        fence: Fence,
        result_json: &str,
        at: Millis,
    ) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        let request = Request {
            fence,
            result_json: result_json.to_owned(),
            at,
            reply,
        };
        if self.requests.send(request).is_err() {
            // The task is gone (its runtime shut down): write directly.
            return store.cell_complete(fence, result_json, at).await;
        }
        answer.await.unwrap_or_else(|_| {
            Err(Error::Conflict(format!(
                "complete of cell {} attempt {}: the coordinator stopped before answering",
                fence.cell, fence.attempt
            )))
        })
    }
}

async fn run(store: Store, mut rx: mpsc::UnboundedReceiver<Request>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    // Requests received but not yet in a batch: a second complete of a cell already in the
    // batch being formed waits for the next one (a batch names each cell once).
    let mut waiting: Vec<Request> = Vec::new();
    loop {
        if waiting.is_empty() {
            match rx.recv().await {
                Some(r) => waiting.push(r),
                None => return,
            }
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        while waiting.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => waiting.push(r),
                Err(_) => break,
            }
        }
        let mut cells = std::collections::HashSet::new();
        let (batch, later): (Vec<Request>, Vec<Request>) = waiting
            .drain(..)
            .partition(|r| cells.len() < MAX_BATCH && cells.insert(r.fence.cell));
        waiting = later;
        let store = store.clone();
        tokio::spawn(async move {
            write(&store, batch).await;
            drop(slot);
        });
    }
}

/// Writes one batch and answers its callers.
async fn write(store: &Store, batch: Vec<Request>) {
    if let [one] = batch.as_slice() {
        let out = store
            .cell_complete(one.fence, &one.result_json, one.at)
            .await;
        answer(batch, vec![out]);
        return;
    }
    let done: Vec<Completion<'_>> = batch
        .iter()
        .map(|r| Completion {
            fence: r.fence,
            result_json: &r.result_json,
            at: r.at,
        })
        .collect();
    match store.cell_complete_many(&done).await {
        Ok(out) => answer(batch, out),
        Err(e) => {
            tracing::warn!(error = %e, cells = batch.len(), "batched complete failed; writing one by one");
            let mut out = Vec::with_capacity(batch.len());
            for r in &batch {
                out.push(store.cell_complete(r.fence, &r.result_json, r.at).await);
            }
            answer(batch, out);
        }
    }
}

fn answer(batch: Vec<Request>, out: Vec<Result<()>>) {
    for (r, o) in batch.into_iter().zip(out) {
        // A caller that went away no longer wants its answer; its complete stands.
        let _ = r.reply.send(o);
    }
}
