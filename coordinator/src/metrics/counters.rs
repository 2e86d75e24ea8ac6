//! The counters of events, incremented where the events happen (the queue holds one
//! [`Counters`]), and the exposition of them beside a store snapshot. Knows neither the queue
//! nor HTTP.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::domain::rows::FarmSnapshot;
use crate::domain::state::{CellState, FailureClass};

/// How many of the newest sweeps get per-state series.
pub const SWEEPS_SHOWN: i64 = 20;

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
