//! What only Postgres does: the connection pool (prepared statements keep one generic plan),
//! bulk inserts by `COPY` ([`copy`]), a lease of a sorted id array, and a batch of leases or
//! completes as one `UPDATE … FROM unnest(…)`. Many connections write at once; every write is
//! a short transaction, and the fence in each `UPDATE … WHERE` makes stale writes match
//! nothing.

pub(super) mod copy;

use std::borrow::Cow;
use std::collections::HashSet;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Postgres};

use super::db::{Db, Row};
use super::filter;
use super::query::CellQuery;
use super::rows::{self, LEASED_COLUMNS};
use crate::clock::Millis;
use crate::domain::lease::{Completion, LeasePick, LeasedCell};
use crate::domain::rows::CellRow;
use crate::{Error, Result};

/// Connects a pool of at most `max_connections` to `url` and applies pending migrations.
pub(super) async fn connect(url: &str, max_connections: u32) -> Result<Db> {
    // The queue's statements (lease, complete, heartbeat, the dispatcher's read) have one
    // good plan whatever their parameters, and re-planning them on every execution took
    // about a tenth of the server's time under lease load (9.6 % in `perf`), and generic
    // plans took lease(1)+complete from 869 to 1,193 cycles/s.
    // So prepared statements keep their generic plan; result queries, whose best plan
    // depends on their values, ask for custom plans again (`cell_query`).
    let options: PgConnectOptions = url
        .parse::<PgConnectOptions>()?
        .options([("plan_cache_mode", "force_generic_plan")]);
    let pool = PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .connect_with(options)
        .await?;
    let db = Db::Postgres(pool);
    super::migrate::apply(&db, crate::clock::Clock::now(&crate::clock::SystemClock).0).await?;
    Ok(db)
}

/// Marks the picked cells that are still available running under a new attempt for
/// `p.worker`, and returns them.
///
/// Leases lock their cells in ascending id order: the ids are bound sorted and read through
/// the primary key, and the batch statement of [`lease_many`] joins its ids sorted the same
/// way. Two leases that want some of the same cells (two coordinators on one database) then
/// wait for each other in one order and cannot deadlock; in pick order they could, and did in
/// the two-coordinator test. (`FOR UPDATE SKIP LOCKED` would avoid the wait as well, but its
/// extra row lock cost about a fifth of the lease rate: 2,914–3,322 lease(1)+complete cycles/s
/// against 3,304–4,079 without it.)
pub(super) async fn lease(pool: &PgPool, p: &LeasePick, now: Millis) -> Result<Vec<LeasedCell>> {
    let expires = now.plus(p.lease_ttl_ms);
    let mut ids = p.ids.clone();
    ids.sort_unstable();
    let rows = sqlx::query(AssertSqlSafe(format!(
        "UPDATE cells SET state = 'running', attempt = attempt + 1, attempted_at = $2, \
         lease_owner = $3, lease_expires_at = $4, heartbeat_at = $2, progress_step = NULL, \
         progress_total = NULL WHERE id = ANY($1) AND state = 'available' \
         AND render_level <= $5 RETURNING {LEASED_COLUMNS}"
    )))
    .bind(ids)
    .bind(now.0)
    .bind(p.worker.0)
    .bind(expires.0)
    .bind(p.render_level)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            let r = Row::Postgres(r);
            rows::leased(&r, expires, p.head == Some(r.int("id")?))
        })
        .collect()
}

/// Several leases as one `UPDATE … FROM unnest(…)` with a row per picked cell: [`lease`] for
/// every pick at once; `d.pick` says which pick a leased cell answers. The rows go in id
/// order, so the join locks the cells in that order (see [`lease`]).
pub(super) async fn lease_many(
    pool: &PgPool,
    picks: &[(LeasePick, Millis)],
) -> Result<Vec<Vec<LeasedCell>>> {
    type LeaseRow = (i64, i64, i64, i64, i64, i64);
    let mut rows: Vec<LeaseRow> = Vec::new();
    for (i, (p, at)) in picks.iter().enumerate() {
        for id in &p.ids {
            rows.push((
                *id,
                i as i64,
                p.worker.0,
                at.0,
                at.plus(p.lease_ttl_ms).0,
                p.render_level,
            ));
        }
    }
    rows.sort_unstable();
    let column = |f: fn(&LeaseRow) -> i64| rows.iter().map(f).collect::<Vec<_>>();
    let found = sqlx::query(
        "UPDATE cells SET state = 'running', attempt = attempt + 1, attempted_at = d.at, \
         lease_owner = d.worker, lease_expires_at = d.expires, heartbeat_at = d.at, \
         progress_step = NULL, progress_total = NULL \
         FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], \
             $6::bigint[]) AS d(id, pick, worker, at, expires, render_level) \
         WHERE cells.id = d.id AND cells.state = 'available' \
             AND cells.render_level <= d.render_level \
         RETURNING cells.id, cells.sweep_id, cells.number, cells.attempt, cells.cell_key, \
             cells.affinity_key, cells.spec, d.pick, d.expires",
    )
    .bind(column(|r| r.0))
    .bind(column(|r| r.1))
    .bind(column(|r| r.2))
    .bind(column(|r| r.3))
    .bind(column(|r| r.4))
    .bind(column(|r| r.5))
    .fetch_all(pool)
    .await?;
    let mut out: Vec<Vec<LeasedCell>> = picks.iter().map(|_| Vec::new()).collect();
    for r in found {
        let r = Row::Postgres(r);
        let i = usize::try_from(r.int("pick")?)
            .ok()
            .filter(|i| *i < picks.len())
            .ok_or_else(|| Error::Corrupt("lease batch: pick index out of range".into()))?;
        let head = picks[i].0.head;
        let expires = Millis(r.int("expires")?);
        out[i].push(rows::leased(&r, expires, head == Some(r.int("id")?))?);
    }
    Ok(out)
}

/// Several fenced completes (`cells::COMPLETE_UPDATE` each) as one `UPDATE … FROM unnest(…)`.
/// `out[i]`: whether `done[i]`'s fence matched.
pub(super) async fn complete_many(pool: &PgPool, done: &[Completion<'_>]) -> Result<Vec<bool>> {
    let matched: Vec<i64> = sqlx::query_scalar(
        "UPDATE cells SET state = 'completed', finalized_at = d.at, result = d.result, \
         result_worker = lease_owner, lease_owner = NULL, lease_expires_at = NULL, \
         progress_step = progress_total \
         FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::bigint[]) \
             AS d(id, attempt, worker, result, at) \
         WHERE cells.id = d.id AND cells.state = 'running' AND cells.attempt = d.attempt \
             AND cells.lease_owner = d.worker \
         RETURNING cells.id",
    )
    .bind(done.iter().map(|d| d.fence.cell.0).collect::<Vec<_>>())
    .bind(
        done.iter()
            .map(|d| i64::from(d.fence.attempt.0))
            .collect::<Vec<_>>(),
    )
    .bind(done.iter().map(|d| d.fence.worker.0).collect::<Vec<_>>())
    .bind(done.iter().map(|d| d.result_json).collect::<Vec<_>>())
    .bind(done.iter().map(|d| d.at.0).collect::<Vec<_>>())
    .fetch_all(pool)
    .await?;
    let matched: HashSet<i64> = matched.into_iter().collect();
    Ok(done
        .iter()
        .map(|d| matched.contains(&d.fence.cell.0))
        .collect())
}

/// Cells matching `q`. A result query's best plan depends on its values (how much of the
/// table a sweep or a seed range is): it is planned on each execution, not once per
/// connection (see [`connect`]).
pub(super) async fn cell_query(pool: &PgPool, q: &CellQuery) -> Result<Vec<CellRow>> {
    let mut tx = pool.begin().await?;
    let q = resolved(&mut tx, q).await?;
    let found = filter::build::<Postgres>(&q)
        .build()
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    found
        .into_iter()
        .map(|r| rows::cell(&Row::Postgres(r)))
        .collect()
}

/// How many cells match `q` (planned on each execution, as [`cell_query`] is).
pub(super) async fn cell_count(pool: &PgPool, q: &CellQuery) -> Result<u64> {
    let mut tx = pool.begin().await?;
    let q = resolved(&mut tx, q).await?;
    let found = filter::build_count::<Postgres>(&q)
        .build()
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(rows::to_u64(Row::Postgres(found).int("n")?))
}

/// Asks for plans per execution in `tx`, then returns `q` with its sweep names resolved to ids
/// (`filter::with_sweep_ids`).
async fn resolved<'q>(
    tx: &mut sqlx::Transaction<'static, Postgres>,
    q: &'q CellQuery,
) -> Result<Cow<'q, CellQuery>> {
    sqlx::query("SET LOCAL plan_cache_mode = auto")
        .execute(&mut **tx)
        .await?;
    Ok(match filter::sweep_lookup::<Postgres>(q) {
        Some(mut lookup) => {
            let found = lookup.build().fetch_all(&mut **tx).await?;
            let found: Vec<Row> = found.into_iter().map(Row::Postgres).collect();
            Cow::Owned(filter::with_sweep_ids(q, &rows::sweep_names(&found)?))
        }
        None => Cow::Borrowed(q),
    })
}
