//! Group commit: concurrent writes of one kind gathered into batches, each batch one statement
//! and one commit. The queue writes completes and leases this way ([`Completes`],
//! [`Leases`]). Each caller gets its own answer, and only after the batch that carried its
//! write has committed, so what is acknowledged is durable as before. What changes is the
//! cost: on Postgres every commit waits for a WAL flush, and with many workers writing at once
//! most of a render cycle's time had been commits and per-statement work: with 64 workers
//! committing every lease and complete alone, 587 of 872 samples of active Postgres backends
//! waited on the WAL write lock, and batching both took lease(1)+complete from 1,193 to 3,711
//! cycles/s.
//!
//! No caller waits for a batch to fill: a batch is whatever is waiting when a write slot is
//! free, so a lone write goes at once (with the single-row statement). A task owns the
//! writing, so a caller that goes away (a gRPC client that hung up) cannot strand the others
//! of its batch. If a batch's statement fails (say, a result the database refuses), its writes
//! are made again one by one, so only the bad one fails.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::clock::Millis;
use crate::domain::lease::{Completion, Fence, LeasePick, LeasedCell};
use crate::store::Store;
use crate::{Error, Result};

/// Batches written at the same time. Two lets one batch gather while another commits.
const IN_FLIGHT: usize = 2;
/// Most writes in one batch.
const MAX_BATCH: usize = 256;

/// One kind of write that can be batched.
pub(super) trait Write: Send + Sync + 'static {
    /// One caller's write.
    type Req: Send + Sync + 'static;
    /// Its answer.
    type Out: Send + 'static;
    /// For logs and errors.
    const WHAT: &'static str;
    /// What a request writes: two requests with one key never share a batch.
    fn key(r: &Self::Req) -> i64;
    /// Writes one request alone.
    fn one(store: &Store, r: &Self::Req) -> impl Future<Output = Result<Self::Out>> + Send;
    /// Writes a batch in one statement; `out[i]` answers `batch[i]`. `Err`: nothing written.
    fn many(
        store: &Store,
        batch: &[Self::Req],
    ) -> impl Future<Output = Result<Vec<Result<Self::Out>>>> + Send;
}

type Envelope<W> = (
    <W as Write>::Req,
    oneshot::Sender<Result<<W as Write>::Out>>,
);

/// A running group commit of writes `W`.
pub(super) struct Group<W: Write> {
    requests: mpsc::UnboundedSender<Envelope<W>>,
    store: Store,
}

impl<W: Write> std::fmt::Debug for Group<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group").field("what", &W::WHAT).finish()
    }
}

impl<W: Write> Group<W> {
    /// Starts the writing task on the current Tokio runtime. It ends when the handle is
    /// dropped and every request has been answered.
    pub(super) fn start(store: Store) -> Self {
        let (requests, rx) = mpsc::unbounded_channel();
        tokio::spawn(run::<W>(rx, store.clone()));
        Self { requests, store }
    }

    /// Writes `r` in whichever batch takes it.
    pub(super) async fn call(&self, r: W::Req) -> Result<W::Out> {
        let (reply, answer) = oneshot::channel();
        if let Err(mpsc::error::SendError((r, _))) = self.requests.send((r, reply)) {
            // The task is gone (its runtime is shutting down): write alone.
            return W::one(&self.store, &r).await;
        }
        answer.await.unwrap_or_else(|_| {
            Err(Error::Conflict(format!(
                "{}: the coordinator stopped before answering",
                W::WHAT
            )))
        })
    }
}

async fn run<W: Write>(mut rx: mpsc::UnboundedReceiver<Envelope<W>>, store: Store) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    // Received but not yet in a batch.
    let mut waiting: Vec<Envelope<W>> = Vec::new();
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
        let mut keys = HashSet::new();
        let (batch, later): (Vec<_>, Vec<_>) = waiting
            .drain(..)
            .partition(|(r, _)| keys.len() < MAX_BATCH && keys.insert(W::key(r)));
        waiting = later;
        let store = store.clone();
        tokio::spawn(async move {
            let (requests, replies): (Vec<W::Req>, Vec<_>) = batch.into_iter().unzip();
            let out = write::<W>(&store, &requests).await;
            for (reply, o) in replies.into_iter().zip(out) {
                // A caller that went away no longer wants its answer; its write stands.
                let _ = reply.send(o);
            }
            drop(slot);
        });
    }
}

/// Writes one batch; `out[i]` answers `batch[i]`.
async fn write<W: Write>(store: &Store, batch: &[W::Req]) -> Vec<Result<W::Out>> {
    if let [one] = batch {
        return vec![W::one(store, one).await];
    }
    match W::many(store, batch).await {
        Ok(out) => out,
        Err(e) => {
            tracing::warn!(error = %e, what = W::WHAT, n = batch.len(), "batched write failed; writing one by one");
            let mut out = Vec::with_capacity(batch.len());
            for r in batch {
                out.push(W::one(store, r).await);
            }
            out
        }
    }
}

/// A complete: [`Store::cell_complete`], batched by [`Store::cell_complete_many`]. A batch
/// names each cell once, so a repeated complete waits for the next batch and is answered
/// `LeaseLost` there, as before.
#[derive(Debug)]
pub(super) struct Completes;

/// A request of [`Completes`].
#[derive(Debug)]
pub(super) struct Complete {
    pub(super) fence: Fence,
    pub(super) result_json: String,
    pub(super) at: Millis,
}

impl Write for Completes {
    type Req = Complete;
    type Out = ();
    const WHAT: &'static str = "complete";

    fn key(r: &Complete) -> i64 {
        r.fence.cell.0
    }

    async fn one(store: &Store, r: &Complete) -> Result<()> {
        store.cell_complete(r.fence, &r.result_json, r.at).await
    }

    async fn many(store: &Store, batch: &[Complete]) -> Result<Vec<Result<()>>> {
        let done: Vec<Completion<'_>> = batch
            .iter()
            .map(|r| Completion {
                fence: r.fence,
                result_json: &r.result_json,
                at: r.at,
            })
            .collect();
        store.cell_complete_many(&done).await
    }
}

/// A lease of the dispatcher's pick at a time: [`Store::cell_lease`], batched by
/// [`Store::cell_lease_many`]. Picks never share a cell (the dispatcher keeps picked cells in
/// flight), so a pick's first cell names it.
#[derive(Debug)]
pub(super) struct Leases;

impl Write for Leases {
    type Req = (LeasePick, Millis);
    type Out = Vec<LeasedCell>;
    const WHAT: &'static str = "lease";

    fn key((p, _): &(LeasePick, Millis)) -> i64 {
        p.ids.first().copied().unwrap_or(-1)
    }

    async fn one(store: &Store, (p, at): &(LeasePick, Millis)) -> Result<Vec<LeasedCell>> {
        store.cell_lease(p, *at).await
    }

    async fn many(
        store: &Store,
        batch: &[(LeasePick, Millis)],
    ) -> Result<Vec<Result<Vec<LeasedCell>>>> {
        Ok(store
            .cell_lease_many(batch)
            .await?
            .into_iter()
            .map(Ok)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::store::{DatabaseUrl, StoreOptions};

    /// Batches seen by [`Times10`].
    static BATCHES: Mutex<Vec<Vec<i64>>> = Mutex::new(Vec::new());
    /// Writes wait until this is set, so that calls pile up behind the first ones whatever
    /// the machine's speed (without it, on a slow machine each call could be written alone
    /// before the next arrived).
    static OPEN: AtomicBool = AtomicBool::new(false);

    async fn gate() {
        while !OPEN.load(Ordering::Acquire) {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// A write that touches no database: answers `r * 10`, keyed by `r % 100`.
    struct Times10;

    impl Write for Times10 {
        type Req = i64;
        type Out = i64;
        const WHAT: &'static str = "times10";

        fn key(r: &i64) -> i64 {
            r % 100
        }

        async fn one(_: &Store, r: &i64) -> Result<i64> {
            gate().await;
            BATCHES.lock().unwrap().push(vec![*r]);
            Ok(r * 10)
        }

        async fn many(_: &Store, batch: &[i64]) -> Result<Vec<Result<i64>>> {
            gate().await;
            BATCHES.lock().unwrap().push(batch.to_vec());
            Ok(batch.iter().map(|r| Ok(r * 10)).collect())
        }
    }

    /// Concurrent calls share batches, each gets its own answer, and two requests with one
    /// key are never in the same batch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn calls_are_batched_answered_in_order_and_keys_kept_apart() {
        let dir = tempfile::tempdir().unwrap();
        let url = DatabaseUrl::Sqlite(format!("sqlite://{}", dir.path().join("g.db").display()));
        let store = Store::connect(&url, &StoreOptions::default())
            .await
            .unwrap();
        let group = Arc::new(Group::<Times10>::start(store.clone()));
        let mut tasks = Vec::new();
        for r in 0..400 {
            let g = group.clone();
            tasks.push(tokio::spawn(async move { (r, g.call(r).await.unwrap()) }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        OPEN.store(true, Ordering::Release);
        for t in tasks {
            let (r, o) = t.await.unwrap();
            assert_eq!(o, r * 10);
        }
        let batches = BATCHES.lock().unwrap().clone();
        assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 400);
        assert!(batches.len() < 400, "some calls shared a batch");
        for b in &batches {
            let keys: HashSet<i64> = b.iter().map(|r| r % 100).collect();
            assert_eq!(keys.len(), b.len(), "a key twice in one batch: {b:?}");
        }
        store.close().await;
    }
}
