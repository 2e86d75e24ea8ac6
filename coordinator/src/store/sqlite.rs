//! What only SQLite does: the connection (one file in WAL mode; every write through a single
//! connection, so transactions never race for SQLite's one writer lock and never hit
//! `SQLITE_BUSY` upgrades; reads through a separate pool that WAL lets run beside the writer),
//! bulk inserts as multi-row `INSERT`s, a lease by a JSON list of ids, and result queries.
//! `synchronous = NORMAL`: a committed transaction survives the process being killed (it is in
//! the WAL); a power cut may lose the last few.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Sqlite};

use super::db::{BulkInsert, HiresColumns};
use super::db::{Db, Row, Stmt};
use super::filter;
use super::query::CellQuery;
use super::rows::{self, LEASED_COLUMNS};
use crate::clock::Millis;
use crate::domain::lease::{LeasePick, LeasedCell};
use crate::domain::rows::CellRow;
use crate::sweep::NewCell;
use crate::{Error, Result};

/// Rows per multi-row INSERT (31 columns each stays far below SQLite's variable limit).
const INSERT_BATCH: usize = 400;

/// Opens (creating) the database file at `url`.
pub(super) async fn connect(url: &str) -> Result<Db> {
    let opts = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(10))
        // 64 MiB page cache per connection: a 100,000-cell insert touches five B-trees.
        .pragma("cache_size", "-65536");
    let writer = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(opts.clone())
        .await?;
    // The schema first: the read-only connections cannot create the file's WAL.
    super::migrate::apply(
        &Db::Sqlite {
            writer: writer.clone(),
            reader: writer.clone(),
        },
        crate::clock::Clock::now(&crate::clock::SystemClock).0,
    )
    .await?;
    let reader = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(opts.read_only(true))
        .await?;
    Ok(Db::Sqlite { writer, reader })
}

/// Inserts `cells` as `b` says, in batches.
pub(super) async fn insert_cells(
    conn: &mut SqliteConnection,
    b: &BulkInsert<'_>,
    cells: &[NewCell],
) -> Result<()> {
    for chunk in cells.chunks(INSERT_BATCH) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO cells (sweep_id, number, cell_key, spec, affinity_key, priority, \
             pixels, min_memory_mib, model, prompt, negative_prompt, seed, steps, cfg, \
             sampler, width, height, bindings, render_level, hires_scale, hires_width, \
             hires_height, hires_upscaler, hires_steps, hires_denoise, state, attempt, \
             max_attempts, errors, scheduled_at, created_at) ",
        );
        qb.push_values(chunk, |mut q, c| {
            let s = &c.spec;
            let hires = HiresColumns::of(s);
            q.push_bind(b.sweep)
                .push_bind(i64::from(c.number))
                .push_bind(c.cell_key.clone())
                .push_bind(c.spec_json.clone())
                .push_bind(c.affinity_key.clone())
                .push_bind(b.priority)
                .push_bind(s.pixels() as i64)
                .push_bind(s.min_memory_mib as i64)
                .push_bind(s.model.clone())
                .push_bind(s.prompt.clone())
                .push_bind(s.negative_prompt.clone())
                .push_bind(s.seed as i64)
                .push_bind(i64::from(s.steps))
                .push_bind(s.cfg_decimal())
                .push_bind(s.sampler.as_str())
                .push_bind(i64::from(s.width))
                .push_bind(i64::from(s.height))
                .push_bind(c.bindings_json.clone())
                .push_bind(i64::from(s.render_level()))
                .push_bind(hires.scale)
                .push_bind(hires.width)
                .push_bind(hires.height)
                .push_bind(hires.upscaler)
                .push_bind(hires.steps)
                .push_bind(hires.denoise)
                .push_bind(b.state.to_string())
                .push_bind(0i64)
                .push_bind(b.max_attempts)
                .push_bind("[]")
                .push_bind(b.now.0)
                .push_bind(b.now.0);
        });
        qb.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// Marks the picked cells that are still available running for `p.worker`, on the writer
/// connection `conn`.
pub(super) async fn lease(
    conn: &mut SqliteConnection,
    p: &LeasePick,
    now: Millis,
) -> Result<Vec<LeasedCell>> {
    let expires = now.plus(p.lease_ttl_ms);
    let ids_json = serde_json::to_string(&p.ids).map_err(|e| Error::Corrupt(e.to_string()))?;
    // The render level is the store's word, not only the dispatcher's: a cell a worker cannot
    // render stays available for another, whatever was picked.
    // `+state`: the state test must not use an index. Without statistics SQLite otherwise
    // walks every available cell through `cells_state_finished` (state = ?) and tests each id
    // against the list, instead of looking the few ids up by rowid: O(queue) per lease.
    let rows = Stmt::new(format!(
        "UPDATE cells SET state = 'running', attempt = attempt + 1, attempted_at = $1, \
         lease_owner = $2, lease_expires_at = $3, heartbeat_at = $1, progress_step = NULL, \
         progress_total = NULL \
         WHERE id IN (SELECT value FROM json_each($4)) AND +state = 'available' \
         AND render_level <= $5 RETURNING {LEASED_COLUMNS}"
    ))
    .bind(now.0)
    .bind(p.worker.0)
    .bind(expires.0)
    .bind(ids_json)
    .bind(p.render_level)
    .fetch_all(super::db::On::Sqlite(conn))
    .await?;
    rows.iter()
        .map(|r| rows::leased(r, expires, p.head == Some(r.int("id")?)))
        .collect()
}

/// Several leases in one transaction on the writer: one commit for the batch.
pub(super) async fn lease_many(
    writer: &SqlitePool,
    picks: &[(LeasePick, Millis)],
) -> Result<Vec<Vec<LeasedCell>>> {
    let mut tx = writer.begin().await?;
    let mut out = Vec::with_capacity(picks.len());
    for (p, at) in picks {
        out.push(lease(&mut tx, p, *at).await?);
    }
    tx.commit().await?;
    Ok(out)
}

/// `q` with its sweep names resolved to ids (`filter::with_sweep_ids`), read on `reader`.
async fn resolved<'q>(reader: &SqlitePool, q: &'q CellQuery) -> Result<Cow<'q, CellQuery>> {
    Ok(match filter::sweep_lookup::<Sqlite>(q) {
        Some(mut lookup) => {
            let found = lookup.build().fetch_all(reader).await?;
            let found: Vec<Row> = found.into_iter().map(Row::Sqlite).collect();
            Cow::Owned(filter::with_sweep_ids(q, &rows::sweep_names(&found)?))
        }
        None => Cow::Borrowed(q),
    })
}

/// Cells matching `q`, read on `reader`.
pub(super) async fn cell_query(reader: &SqlitePool, q: &CellQuery) -> Result<Vec<CellRow>> {
    let q = resolved(reader, q).await?;
    let found = filter::build::<Sqlite>(&q)
        .build()
        .fetch_all(reader)
        .await?;
    found
        .into_iter()
        .map(|r| rows::cell(&Row::Sqlite(r)))
        .collect()
}

/// How many cells match `q`, read on `reader`.
pub(super) async fn cell_count(reader: &SqlitePool, q: &CellQuery) -> Result<u64> {
    let q = resolved(reader, q).await?;
    let found = filter::build_count::<Sqlite>(&q)
        .build()
        .fetch_one(reader)
        .await?;
    Ok(rows::to_u64(Row::Sqlite(found).int("n")?))
}
