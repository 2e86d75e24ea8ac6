//! The coordinator's Prometheus metrics, served as `GET /metrics` (OpenMetrics text, through
//! the `prometheus-client` crate) on the coordinator's own port, beside the gRPC services and
//! whether or not the web UI is on.
//!
//! Two kinds of numbers:
//! - counters of events, counted where they happen ([`Counters`], held by the queue): cells
//!   leased, completes accepted, failures by class (an expired lease is a failure of class
//!   `lease_expired`, counted by the maintenance pass that rescues it). They start at zero
//!   when the coordinator starts, as Prometheus counters do; `rate()` copes with restarts.
//! - gauges of state, read from the store at scrape time by one [`Store::farm_snapshot`]
//!   (three aggregate reads): cells per state of the newest [`SWEEPS_SHOWN`] sweeps, workers
//!   per state, the age of the oldest available cell. Only the newest sweeps get series, so
//!   the number of series stays bounded (8 states × [`SWEEPS_SHOWN`] sweeps) however many
//!   sweeps the database holds, and a finished sweep keeps showing its final counts until
//!   newer sweeps push it out.
//!
//! Who may scrape: the callers who may read. On a coordinator without tokens, anyone who can
//! reach the port (loopback unless told otherwise); with `--require-tokens`, a caller with
//! `authorization: Bearer <token>` of any scope that reads (Prometheus's `authorization`
//! setting with a `read` token). A read token's scrape shows only its owner's sweeps, as
//! `kiln sweeps` does; an admin token's shows every sweep. Farm-wide counters show to every
//! reader. It never knows SQL or gRPC statuses.
//!
//! [`Store::farm_snapshot`]: crate::store::Store::farm_snapshot

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::domain::auth::Principal;
use crate::domain::rows::FarmSnapshot;
use crate::domain::state::{CellState, FailureClass, Scope};
use crate::queue::Queue;
use crate::{Error, Result};

/// How many of the newest sweeps get per-state series.
pub const SWEEPS_SHOWN: i64 = 20;

/// The content type of the OpenMetrics text format, which Prometheus asks for first.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The event counters, shared by every clone of the queue.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    leases: Counter,
    completes: Counter,
    failures: Family<ClassLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SweepLabels {
    sweep: String,
    name: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

impl Counters {
    /// `n` cells were leased.
    pub fn leased(&self, n: usize) {
        self.leases.inc_by(n as u64);
    }

    /// A complete was accepted.
    pub fn completed(&self) {
        self.completes.inc();
    }

    /// `n` attempts failed with `class`.
    pub fn failed(&self, class: FailureClass, n: u64) {
        self.failures
            .get_or_create(&ClassLabel {
                class: class.as_str().to_owned(),
            })
            .inc_by(n);
    }

    /// The exposition of these counters and of `snapshot`, taken at `now_ms`.
    pub fn render(&self, snapshot: &FarmSnapshot, now_ms: i64) -> String {
        let mut r = Registry::with_prefix("kiln_coordinator");
        r.register("leases", "Cells leased to workers", self.leases.clone());
        r.register(
            "completes",
            "Completes accepted (cells rendered and recorded)",
            self.completes.clone(),
        );
        // Every class shows from the start, at zero, so `rate()` has a series to work on.
        for class in FailureClass::ALL {
            self.failed(*class, 0);
        }
        r.register(
            "failures",
            "Failed attempts by class (lease_expired: rescued by the coordinator)",
            self.failures.clone(),
        );
        let cells = Family::<SweepLabels, Gauge>::default();
        for s in &snapshot.sweeps {
            for state in CellState::ALL {
                let labels = SweepLabels {
                    sweep: s.id.0.to_string(),
                    name: s.name.clone(),
                    state: state.as_str().to_owned(),
                };
                cells
                    .get_or_create(&labels)
                    .set(s.counts.get(*state) as i64);
            }
        }
        r.register(
            "sweep_cells",
            format!("Cells per state of the newest {SWEEPS_SHOWN} sweeps (intake counted)"),
            cells,
        );
        let workers = Family::<StateLabel, Gauge>::default();
        let w = &snapshot.workers;
        for (state, n) in [
            ("online", w.online),
            ("offline", w.offline),
            ("drained", w.drained),
        ] {
            workers
                .get_or_create(&StateLabel {
                    state: state.to_owned(),
                })
                .set(n as i64);
        }
        r.register(
            "workers",
            "Workers per state (offline: not seen within a lease time-to-live)",
            workers,
        );
        let age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        age.set(
            snapshot
                .oldest_available_at
                .map_or(0.0, |t| (now_ms - t.0).max(0) as f64 / 1000.0),
        );
        r.register_with_unit(
            "oldest_available_age",
            "How long the oldest available cell has waited for a worker (0: none waits)",
            Unit::Seconds,
            age,
        );
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
}

/// The exposition for `caller`: the counters, and the snapshot of the sweeps it may see.
pub async fn scrape(queue: &Queue, caller: &Principal) -> Result<String> {
    caller.require(Scope::Read)?;
    let now = queue.now();
    let snapshot = queue
        .store()
        .farm_snapshot(
            SWEEPS_SHOWN,
            caller.only_owner(),
            now.plus(-queue.config().lease_ttl_ms),
        )
        .await?;
    Ok(queue.counters().render(&snapshot, now.0))
}

#[derive(Clone)]
struct Scraped {
    queue: Queue,
    require_tokens: bool,
}

/// The `/metrics` route, for [`crate::server`] to merge beside the gRPC services.
pub fn router(queue: Queue, require_tokens: bool) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(Scraped {
            queue,
            require_tokens,
        })
}

async fn metrics(State(s): State<Scraped>, headers: HeaderMap) -> Response {
    let caller = if s.require_tokens {
        match crate::api::bearer(&headers) {
            Some(token) => s.queue.principal(token).await,
            None => Err(Error::Unauthenticated("no bearer token".into())),
        }
    } else {
        Ok(Principal::open())
    };
    let out = match caller {
        Ok(p) => scrape(&s.queue, &p).await,
        Err(e) => Err(e),
    };
    match out {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(Error::Unauthenticated(_)) => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "this coordinator requires a token: authorization: Bearer <read token>\n",
        )
            .into_response(),
        Err(e @ Error::PermissionDenied(_)) => {
            (StatusCode::FORBIDDEN, format!("{e}\n")).into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics scrape failed");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use kiln_proto::SweepId;

    use super::*;
    use crate::clock::Millis;
    use crate::domain::rows::{StateCounts, SweepCounts, WorkerCounts};

    #[test]
    fn exposition_names_follow_prometheus_conventions() {
        let c = Counters::default();
        c.leased(3);
        c.completed();
        c.failed(FailureClass::BadInput, 1);
        let mut counts = StateCounts::default();
        counts.add(CellState::Completed, 2);
        counts.add(CellState::Available, 5);
        let snapshot = FarmSnapshot {
            sweeps: vec![SweepCounts {
                id: SweepId(7),
                name: "foxes".into(),
                counts,
            }],
            workers: WorkerCounts {
                online: 1,
                offline: 2,
                drained: 0,
            },
            oldest_available_at: Some(Millis(1_000)),
        };
        let text = c.render(&snapshot, 3_500);
        for line in [
            "kiln_coordinator_leases_total 3",
            "kiln_coordinator_completes_total 1",
            "kiln_coordinator_failures_total{class=\"bad_input\"} 1",
            "kiln_coordinator_failures_total{class=\"lease_expired\"} 0",
            "kiln_coordinator_sweep_cells{sweep=\"7\",name=\"foxes\",state=\"available\"} 5",
            "kiln_coordinator_sweep_cells{sweep=\"7\",name=\"foxes\",state=\"completed\"} 2",
            "kiln_coordinator_sweep_cells{sweep=\"7\",name=\"foxes\",state=\"held\"} 0",
            "kiln_coordinator_workers{state=\"offline\"} 2",
            "kiln_coordinator_oldest_available_age_seconds 2.5",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        // Every state of every shown sweep has a series: 8 per sweep.
        let series = text
            .lines()
            .filter(|l| l.starts_with("kiln_coordinator_sweep_cells{"))
            .count();
        assert_eq!(series, CellState::ALL.len());
    }

    #[test]
    fn no_available_cell_is_age_zero() {
        let text = Counters::default().render(&FarmSnapshot::default(), 10_000);
        assert!(
            text.contains("kiln_coordinator_oldest_available_age_seconds 0.0\n"),
            "{text}"
        );
        assert!(!text.contains("kiln_coordinator_sweep_cells{"), "{text}");
    }
}
