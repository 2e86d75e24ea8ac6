//! The farm at a glance, for the metrics scrape ([`crate::metrics`]): cells by state of the
//! newest sweeps, workers by state, and when the oldest available cell became available. Three
//! aggregate reads, each answered from an index (`cells_sweep_state`, the workers table, and
//! `cells_fetch`), so a scrape costs about what the sweep list of the web overview costs.

use kiln_proto::SweepId;

use super::Store;
use super::db::Stmt;
use super::rows::to_u64;
use crate::Result;
use crate::clock::Millis;
use crate::domain::rows::{FarmSnapshot, SweepCounts, WorkerCounts};
use crate::domain::state::CellState;

impl Store {
    /// The counts of the newest `sweeps` sweeps (of `owner` only, when given), of the workers
    /// (online: seen since `online_since`), and the `scheduled_at` of the oldest available
    /// cell. Cells still in a sweep's intake count as the state they will enter, as in
    /// [`Store::sweep_get`].
    pub async fn farm_snapshot(
        &self,
        sweeps: i64,
        owner: Option<&str>,
        online_since: Millis,
    ) -> Result<FarmSnapshot> {
        const NEWEST: &str = "SELECT id, name, state FROM sweeps \
             WHERE ($2 IS NULL OR owner = $2) ORDER BY id DESC LIMIT $1";
        let rows = Stmt::new(format!(
            "SELECT s.id, s.name, c.state, count(*) AS n FROM ({NEWEST}) s \
             JOIN cells c ON c.sweep_id = s.id GROUP BY s.id, s.name, c.state \
             UNION ALL \
             SELECT s.id, s.name, CASE s.state WHEN 'active' THEN 'available' \
             WHEN 'paused' THEN 'held' ELSE 'cancelled' END AS state, \
             CAST(sum(i.cell_count) AS BIGINT) AS n FROM ({NEWEST}) s \
             JOIN intake i ON i.sweep_id = s.id GROUP BY s.id, s.name, s.state"
        ))
        .bind(sweeps)
        .bind(owner)
        .fetch_all(self.db.reader())
        .await?;
        let mut out: Vec<SweepCounts> = Vec::new();
        for r in &rows {
            let id = SweepId(r.int("id")?);
            let state: CellState = r.text("state")?.parse()?;
            let n = to_u64(r.int("n")?);
            match out.iter_mut().find(|s| s.id == id) {
                Some(s) => s.counts.add(state, n),
                None => {
                    let mut s = SweepCounts {
                        id,
                        name: r.text("name")?,
                        counts: Default::default(),
                    };
                    s.counts.add(state, n);
                    out.push(s);
                }
            }
        }
        out.sort_by_key(|s| s.id.0);
        let rows = Stmt::new(
            "SELECT CASE WHEN state = 'drained' THEN 'drained' \
             WHEN last_seen_at >= $1 THEN 'online' ELSE 'offline' END AS s, count(*) AS n \
             FROM workers GROUP BY 1",
        )
        .bind(online_since.0)
        .fetch_all(self.db.reader())
        .await?;
        let mut workers = WorkerCounts::default();
        for r in &rows {
            let n = to_u64(r.int("n")?);
            match r.text("s")?.as_str() {
                "drained" => workers.drained += n,
                "online" => workers.online += n,
                _ => workers.offline += n,
            }
        }
        let oldest = Stmt::new("SELECT min(scheduled_at) FROM cells WHERE state = 'available'")
            .fetch_one(self.db.reader())
            .await?
            .opt_int(0)?;
        Ok(FarmSnapshot {
            sweeps: out,
            workers,
            oldest_available_at: oldest.map(Millis),
        })
    }
}
