//! A sweep-wide write that Postgres aborts as a deadlock victim is run again
//! (`store::deadlock`). Postgres only: SQLite has one writer and cannot deadlock.
//!
//! The deadlock is real, made with a second connection: it holds a running cell's row, the
//! cancel locks the sweep's available cells and then waits for that row, and the connection
//! then asks for an available cell the cancel holds. Postgres runs its deadlock check in the
//! backend that has waited `deadlock_timeout` (1 s by default) first, the cancel's, and aborts
//! it; the connection then gets its row and commits, and the cancel's second run succeeds.

use std::time::Duration;

use kiln_coordinator::domain::lease::LeasePick;

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

/// Leases lock their cells in id order, whatever order they were picked in, so a lease that
/// waits for a locked cell holds none of the later ones meanwhile. Here a transaction holds
/// the first cell, a lease picked "second, first" waits for it, and the transaction then
/// takes the second cell: in pick order the lease would hold it and the two would deadlock.
/// Both the single lease and the batch statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_lock_in_id_order_whatever_the_pick_order() {
    let fx = Fixture::new(Backend::Postgres).await;
    fx.queue
        .submit(submission("order", (0..4).map(cell).collect()))
        .await
        .unwrap();
    let DatabaseUrl::Postgres(url) = &fx.db.url else {
        unreachable!()
    };
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM cells ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    let w = fx.worker("w").await;
    let touch = "UPDATE cells SET heartbeat_at = heartbeat_at WHERE id = $1";
    for (batch, pair) in [(false, [ids[0], ids[1]]), (true, [ids[2], ids[3]])] {
        let [first, second] = pair;
        let mut other = pool.begin().await.unwrap();
        sqlx::query(touch)
            .bind(first)
            .execute(&mut *other)
            .await
            .unwrap();
        let store = fx.queue.store().clone();
        let pick = LeasePick {
            worker: w,
            ids: vec![second, first],
            head: None,
            lease_ttl_ms: 60_000,
            render_level: 0,
        };
        let now = fx.queue.now();
        let lease = tokio::spawn(async move {
            if batch {
                store
                    .cell_lease_many(&[(pick, now)])
                    .await
                    .map(|mut v| v.remove(0))
            } else {
                store.cell_lease(&pick, now).await
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!lease.is_finished(), "the lease waits for the held cell");
        // Would wait for the lease (and deadlock) if it held `second` already.
        sqlx::query(touch)
            .bind(second)
            .execute(&mut *other)
            .await
            .unwrap();
        other.commit().await.unwrap();
        let got: Vec<i64> = lease
            .await
            .unwrap()
            .unwrap()
            .iter()
            .map(|c| c.id.0)
            .collect();
        assert_eq!(got, [second, first], "batch: {batch}");
    }
    pool.close().await;
    fx.finish().await;
}
