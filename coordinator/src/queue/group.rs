//! Group commit: concurrent writes of one kind gathered into batches, each batch one statement
//! and one commit. The queue writes completes ([`super::completer`]) and leases
//! ([`super::lease`]) this way. Each caller gets its own answer, and only after the batch that
//! carried its write has committed, so what is acknowledged is durable as before. What
//! changes is the cost: on Postgres every commit waits for a WAL flush, and with many workers
//! writing at once most of a render cycle's time had been commits and per-statement work
//! (BENCHMARKS.md, "Session 4").
//!
//! No caller waits for a batch to fill: a batch is whatever is waiting when a write slot is
//! free, so a lone write goes at once. A task owns the writing, so a caller that goes away (a
//! gRPC client that hung up) cannot strand the others of its batch.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

/// Batches written at the same time. Two lets one batch gather while another commits.
const IN_FLIGHT: usize = 2;
/// Most writes in one batch.
pub(super) const MAX_BATCH: usize = 256;

type Envelope<R, O> = (R, oneshot::Sender<O>);

/// A running group commit for requests `R` answered with `O`.
#[derive(Debug)]
pub(super) struct Group<R, O> {
    requests: mpsc::UnboundedSender<Envelope<R, O>>,
}

/// The group's task has stopped (its runtime is shutting down): the request comes back
/// unwritten, or the answer was lost.
#[derive(Debug)]
pub(super) enum Gone<R> {
    /// Never handed to a batch: the caller may write it itself.
    Unsent(R),
    /// Handed to a batch whose answer never came: its outcome is unknown.
    Unanswered,
}

impl<R: Send + 'static, O: Send + 'static> Group<R, O> {
    /// Starts the writing task on the current Tokio runtime. `write` writes one batch and
    /// answers each request, in order. `key` names what a request writes: two requests with
    /// the same key never share a batch (the later waits for the next). The task ends when
    /// the handle is dropped and every request has been answered.
    pub(super) fn start<W, F>(write: W, key: fn(&R) -> i64) -> Self
    where
        W: Fn(Vec<R>) -> F + Send + Sync + 'static,
        F: Future<Output = Vec<O>> + Send + 'static,
    {
        let (requests, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, Arc::new(write), key));
        Self { requests }
    }

    /// Writes `r` in whichever batch takes it.
    pub(super) async fn call(&self, r: R) -> Result<O, Gone<R>> {
        let (reply, answer) = oneshot::channel();
        if let Err(mpsc::error::SendError((r, _))) = self.requests.send((r, reply)) {
            return Err(Gone::Unsent(r));
        }
        answer.await.map_err(|_| Gone::Unanswered)
    }
}

async fn run<R, O, W, F>(
    mut rx: mpsc::UnboundedReceiver<Envelope<R, O>>,
    write: Arc<W>,
    key: fn(&R) -> i64,
) where
    R: Send + 'static,
    O: Send + 'static,
    W: Fn(Vec<R>) -> F + Send + Sync + 'static,
    F: Future<Output = Vec<O>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    // Received but not yet in a batch.
    let mut waiting: Vec<Envelope<R, O>> = Vec::new();
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
            .partition(|(r, _)| keys.len() < MAX_BATCH && keys.insert(key(r)));
        waiting = later;
        let write = write.clone();
        tokio::spawn(async move {
            let (requests, replies): (Vec<R>, Vec<oneshot::Sender<O>>) = batch.into_iter().unzip();
            let out = write(requests).await;
            for (reply, o) in replies.into_iter().zip(out) {
                // A caller that went away no longer wants its answer; its write stands.
                let _ = reply.send(o);
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Concurrent calls share batches, each gets its own answer, and two requests with one
    /// key are never in the same batch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn calls_are_batched_answered_in_order_and_keys_kept_apart() {
        let batches: Arc<Mutex<Vec<Vec<i64>>>> = Arc::default();
        let seen = batches.clone();
        let group: Arc<Group<i64, i64>> = Arc::new(Group::start(
            move |reqs: Vec<i64>| {
                seen.lock().unwrap().push(reqs.clone());
                async move {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    reqs.iter().map(|r| r * 10).collect()
                }
            },
            |r| r % 100,
        ));
        let mut tasks = Vec::new();
        for r in 0..400 {
            let g = group.clone();
            tasks.push(tokio::spawn(async move { (r, g.call(r).await.unwrap()) }));
        }
        for t in tasks {
            let (r, o) = t.await.unwrap();
            assert_eq!(o, r * 10);
        }
        let batches = batches.lock().unwrap();
        assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 400);
        assert!(batches.len() < 400, "some calls shared a batch");
        for b in batches.iter() {
            let keys: HashSet<i64> = b.iter().map(|r| r % 100).collect();
            assert_eq!(keys.len(), b.len(), "a key twice in one batch: {b:?}");
        }
    }
}
