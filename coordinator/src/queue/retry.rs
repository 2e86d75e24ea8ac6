//! What happens after a failed attempt: retry after an exponential backoff with jitter, discard
//! (bad input, attempts exhausted, poison), or cancel. Pure functions of the cell's history and
//! an injected `now`, so every branch is tested without a database.

use sha2::{Digest, Sha256};

pub use crate::domain::failure::{Decision, ErrorEntry, FailContext};
use crate::domain::state::FailureClass;

/// Retry settings.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Backoff after the first failure, ms; doubles with each attempt.
    pub base_ms: i64,
    /// Longest backoff, ms.
    pub max_ms: i64,
    /// Relative jitter: the backoff is scaled by a factor in `1 ± jitter`.
    pub jitter: f64,
    /// A cell that failed with the same resource or lease-expiry error on this many different
    /// workers is discarded as poison, whatever attempts remain.
    pub poison_workers: usize,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base_ms: 2_000,
            max_ms: 10 * 60 * 1000,
            jitter: 0.2,
            poison_workers: 3,
        }
    }
}

impl RetryPolicy {
    /// Decides where a failed attempt's cell goes.
    pub fn decide(&self, cx: &FailContext<'_>) -> Decision {
        let Some(last) = cx.history.last() else {
            return Decision::Retry {
                at: cx.now.plus(self.backoff_ms(cx.cell, cx.attempt)),
            };
        };
        if cx.cancel_requested || last.class == FailureClass::Cancelled {
            return Decision::Cancel;
        }
        if last.class == FailureClass::BadInput {
            return Decision::Discard {
                reason: "bad input is not retried".into(),
            };
        }
        if cx.attempt >= cx.max_attempts {
            return Decision::Discard {
                reason: format!("{} of {} attempts used", cx.attempt, cx.max_attempts),
            };
        }
        // Poison is about the cell killing workers (crash, out of memory), not about passing
        // trouble such as storage being down, which must never discard work.
        let workers = if matches!(
            last.class,
            FailureClass::Resource | FailureClass::LeaseExpired
        ) {
            same_failure_workers(cx.history, last)
        } else {
            0
        };
        if workers >= self.poison_workers {
            return Decision::Discard {
                reason: format!("poison: failed the same way on {workers} different workers"),
            };
        }
        Decision::Retry {
            at: cx.now.plus(self.backoff_ms(cx.cell, cx.attempt)),
        }
    }

    /// Backoff before the attempt after `attempt`: `base · 2^(attempt-1)`, capped at `max`,
    /// scaled by a jitter factor in `1 ± jitter` derived from (cell, attempt).
    pub fn backoff_ms(&self, cell: i64, attempt: i32) -> i64 {
        let exp = u32::try_from(attempt.saturating_sub(1))
            .unwrap_or(0)
            .min(40);
        let raw = self.base_ms.saturating_mul(1i64 << exp).min(self.max_ms);
        let factor = 1.0 + self.jitter * (2.0 * unit_hash(cell, attempt) - 1.0);
        ((raw as f64) * factor).round() as i64
    }
}

/// Distinct workers whose failures match `last` in class and message.
fn same_failure_workers(history: &[ErrorEntry], last: &ErrorEntry) -> usize {
    let mut workers: Vec<i64> = history
        .iter()
        .filter(|e| e.class == last.class && e.message == last.message)
        .map(|e| e.worker)
        .collect();
    workers.sort_unstable();
    workers.dedup();
    workers.len()
}

/// A number in [0, 1) determined by (cell, attempt).
fn unit_hash(cell: i64, attempt: i32) -> f64 {
    let d = Sha256::new()
        .chain_update(cell.to_le_bytes())
        .chain_update(attempt.to_le_bytes())
        .finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Millis;

    fn entry(attempt: i32, worker: i64, class: FailureClass, msg: &str) -> ErrorEntry {
        ErrorEntry {
            attempt,
            worker,
            class,
            message: msg.into(),
            at: 0,
        }
    }

    fn cx<'a>(attempt: i32, history: &'a [ErrorEntry]) -> FailContext<'a> {
        FailContext {
            cell: 9,
            attempt,
            max_attempts: 5,
            cancel_requested: false,
            history,
            now: Millis(1_000_000),
        }
    }

    #[test]
    fn backoff_doubles_within_jitter_and_caps() {
        let p = RetryPolicy::default();
        for attempt in 1..=8 {
            let nominal = (2_000i64 << (attempt - 1)).min(600_000) as f64;
            for cell in 0..50 {
                let b = p.backoff_ms(cell, attempt) as f64;
                assert!(
                    b >= nominal * 0.8 - 1.0 && b <= nominal * 1.2 + 1.0,
                    "{b} vs {nominal}"
                );
            }
        }
        assert!(p.backoff_ms(1, 1000) <= 720_000);
        // Jitter spreads cells that fail together.
        let distinct: std::collections::HashSet<i64> =
            (0..20).map(|c| p.backoff_ms(c, 1)).collect();
        assert!(distinct.len() > 10);
    }

    #[test]
    fn transient_retries_until_attempts_run_out() {
        let p = RetryPolicy::default();
        let h = [entry(1, 1, FailureClass::Transient, "s3 down")];
        assert!(matches!(p.decide(&cx(1, &h)), Decision::Retry { at } if at.0 > 1_000_000));
        let h = [entry(5, 1, FailureClass::Transient, "s3 down")];
        assert!(matches!(p.decide(&cx(5, &h)), Decision::Discard { .. }));
    }

    #[test]
    fn bad_input_and_cancel_are_final() {
        let p = RetryPolicy::default();
        let h = [entry(1, 1, FailureClass::BadInput, "no such model")];
        assert!(matches!(p.decide(&cx(1, &h)), Decision::Discard { .. }));
        let h = [entry(1, 1, FailureClass::Transient, "x")];
        let mut c = cx(1, &h);
        c.cancel_requested = true;
        assert_eq!(p.decide(&c), Decision::Cancel);
    }

    #[test]
    fn same_failure_on_three_workers_is_poison() {
        let p = RetryPolicy {
            poison_workers: 3,
            ..Default::default()
        };
        let oom = |a, w| entry(a, w, FailureClass::Resource, "out of memory");
        // Same worker three times: not poison (that worker may be the problem).
        let h = [oom(1, 1), oom(2, 1), oom(3, 1)];
        let mut c = cx(3, &h);
        c.max_attempts = 10;
        assert!(matches!(p.decide(&c), Decision::Retry { .. }));
        // Three different workers: poison.
        let h = [oom(1, 1), oom(2, 2), oom(3, 3)];
        let mut c = cx(3, &h);
        c.max_attempts = 10;
        assert!(matches!(p.decide(&c), Decision::Discard { reason } if reason.contains("poison")));
        // Transient trouble on three workers is not the cell's fault.
        let down = |a, w| entry(a, w, FailureClass::Transient, "storage down");
        let h = [down(1, 1), down(2, 2), down(3, 3)];
        let mut c = cx(3, &h);
        c.max_attempts = 10;
        assert!(matches!(p.decide(&c), Decision::Retry { .. }));
    }
}
