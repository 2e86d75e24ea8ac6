//! Sweep-wide writes (cancel, pause, resume, retry) and single leases run again when Postgres
//! aborts them as the victim of a deadlock. A sweep-wide write locks many cells of a sweep in
//! the order of its index, while leases lock theirs by id and a batch of completes
//! (`queue::group`) in the order of its plan, so two of them can wait on each other; Postgres
//! then aborts one after `deadlock_timeout`. A batch that loses is written again one request
//! at a time by the group; a statement that loses is run again here (its transaction was
//! rolled back whole, so running it again is safe). SQLite has one writer and never
//! deadlocks.

use std::future::Future;

use crate::{Error, Result};

/// Runs of a statement Postgres aborted as a deadlock victim before its error is returned.
const TRIES: usize = 3;

/// Postgres' SQLSTATE for "deadlock detected".
const DEADLOCK: &str = "40P01";

/// Runs `write`, and again (up to [`TRIES`] in all) while it fails as a deadlock victim.
pub(super) async fn retried<T, F, Fut>(mut write: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut tries = 1;
    loop {
        match write().await {
            Err(e) if tries < TRIES && is_deadlock(&e) => {
                tracing::info!(error = %e, "deadlock victim; running the write again");
                tries += 1;
            }
            other => return other,
        }
    }
}

fn is_deadlock(e: &Error) -> bool {
    match e {
        Error::Database(e) => e
            .as_database_error()
            .and_then(|d| d.code())
            .is_some_and(|c| c == DEADLOCK),
        _ => false,
    }
}
