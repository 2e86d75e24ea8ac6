//! Completes by group commit ([`super::group`]): the completes that arrive together are
//! written by one [`Store::cell_complete_many`], and each caller gets the answer it would have
//! got alone (`LeaseLost` for a stale attempt, `CellNotFound`). A batch names each cell once;
//! a repeated complete of a cell waits for the next batch and is answered `LeaseLost` there,
//! as before. If a batch's statement fails (say, a result the database refuses), its completes
//! are written one by one, so the bad one gets its own error and the rest succeed.

use crate::clock::Millis;
use crate::store::{Completion, Fence, Store};
use crate::{Error, Result};

use super::group::{Gone, Group};

struct Request {
    fence: Fence,
    result_json: String,
    at: Millis,
}

/// The handle the queue completes through.
#[derive(Debug)]
pub(super) struct Completer {
    group: Group<Request, Result<()>>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("fence", &self.fence)
            .finish()
    }
}

impl Completer {
    /// Starts the group on the current Tokio runtime.
    pub(super) fn start(store: Store) -> Self {
        let group = Group::start(
            move |batch: Vec<Request>| {
                let store = store.clone();
                async move { write(&store, batch).await }
            },
            |r: &Request| r.fence.cell.0,
        );
        Self { group }
    }

    /// Records the result of the fenced attempt, in whichever batch takes it.
    pub(super) async fn complete(
        &self,
        store: &Store,
        fence: Fence,
        result_json: &str,
        at: Millis,
    ) -> Result<()> {
        let request = Request {
            fence,
            result_json: result_json.to_owned(),
            at,
        };
        match self.group.call(request).await {
            Ok(out) => out,
            Err(Gone::Unsent(r)) => store.cell_complete(r.fence, &r.result_json, r.at).await,
            Err(Gone::Unanswered) => Err(Error::Conflict(format!(
                "complete of cell {} attempt {}: the coordinator stopped before answering",
                fence.cell, fence.attempt
            ))),
        }
    }
}

/// Writes one batch; `out[i]` answers `batch[i]`.
async fn write(store: &Store, batch: Vec<Request>) -> Vec<Result<()>> {
    if let [one] = batch.as_slice() {
        return vec![
            store
                .cell_complete(one.fence, &one.result_json, one.at)
                .await,
        ];
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
        Ok(out) => out,
        Err(e) => {
            tracing::warn!(error = %e, cells = batch.len(), "batched complete failed; writing one by one");
            let mut out = Vec::with_capacity(batch.len());
            for r in &batch {
                out.push(store.cell_complete(r.fence, &r.result_json, r.at).await);
            }
            out
        }
    }
}
