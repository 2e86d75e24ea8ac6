//! Row-lock waits on Postgres (SQLite has one writer and cannot deadlock): a lease skips a
//! locked cell rather than wait for it, and a sweep-wide write that Postgres aborts as a
//! deadlock victim is run again (`store::deadlock`).
//!
//! The deadlock is real, made with a second connection: it holds a running cell's row, the
//! cancel locks the sweep's available cells and then waits for that row, and the connection
//! then asks for an available cell the cancel holds. Postgres runs its deadlock check in the
//! backend that has waited `deadlock_timeout` (1 s by default) first, the cancel's, and aborts
//! it; the connection then gets its row and commits, and the cancel's second run succeeds.

use std::time::Duration;

use kiln_coordinator::store::DatabaseUrl;

use crate::harness::{Backend, Fixture, cell, submission};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_chosen_as_deadlock_victim_is_run_again() {
    let fx = Fixture::new(Backend::Postgres).await;
    let sweep = fx
        .queue
        .submit(submission("dl", (0..3).map(cell).collect()))
        .await
        .unwrap()
        .id;
    let w = fx.worker("w").await;
    let running = fx.queue.lease(w, 1, None).await.unwrap().remove(0);
    let DatabaseUrl::Postgres(url) = &fx.db.url else {
        unreachable!()
    };
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let available: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM cells WHERE state = 'available' ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(available.len(), 2);
    let mut other = pool.begin().await.unwrap();
    let touch = "UPDATE cells SET heartbeat_at = heartbeat_at WHERE id = $1";
    sqlx::query(touch)
        .bind(running.id.0)
        .execute(&mut *other)
        .await
        .unwrap();

    let q = fx.queue.clone();
    let cancel = tokio::spawn(async move { q.cancel(sweep).await });
    // The cancel has locked the available cells and waits for the running one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!cancel.is_finished());
    // Closes the cycle; returns once Postgres has aborted the cancel's first run.
    sqlx::query(touch)
        .bind(available[0])
        .execute(&mut *other)
        .await
        .unwrap();
    other.commit().await.unwrap();
    let (cancelled, asked) = cancel.await.unwrap().unwrap();
    assert_eq!((cancelled, asked), (2, 1));
    let s = fx.queue.sweep(sweep).await.unwrap();
    assert_eq!((s.counts.cancelled, s.counts.running), (2, 1));
    pool.close().await;
    fx.finish().await;
}

/// A lease never waits for a row lock: a picked cell another transaction holds is left out,
/// and the lease takes the next one (`LEASE_UPDATE`'s `FOR UPDATE SKIP LOCKED`). Waiting let
/// two coordinators' leases deadlock. The timeout only guards against a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_skips_a_cell_another_transaction_holds() {
    let fx = Fixture::new(Backend::Postgres).await;
    fx.queue
        .submit(submission("skip", (0..2).map(cell).collect()))
        .await
        .unwrap();
    let DatabaseUrl::Postgres(url) = &fx.db.url else {
        unreachable!()
    };
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let first: i64 = sqlx::query_scalar("SELECT min(id) FROM cells")
        .fetch_one(&pool)
        .await
        .unwrap();
    let mut other = pool.begin().await.unwrap();
    sqlx::query("UPDATE cells SET heartbeat_at = heartbeat_at WHERE id = $1")
        .bind(first)
        .execute(&mut *other)
        .await
        .unwrap();
    let w = fx.worker("w").await;
    let got = tokio::time::timeout(Duration::from_secs(30), fx.queue.lease(w, 2, None))
        .await
        .expect("the lease waited for the locked cell")
        .unwrap();
    let ids: Vec<i64> = got.iter().map(|c| c.id.0).collect();
    assert_eq!(ids, [first + 1]);
    other.commit().await.unwrap();
    // The skipped cell left this coordinator's read-ahead with the pick, as a cell leased by
    // another coordinator does; it is seen again at the read-ahead's next refresh.
    fx.clock
        .advance(kiln_coordinator::queue::dispatch::REFRESH_MS);
    let got = fx.queue.lease(w, 2, None).await.unwrap();
    assert_eq!(got.iter().map(|c| c.id.0).collect::<Vec<_>>(), [first]);
    pool.close().await;
    fx.finish().await;
}
