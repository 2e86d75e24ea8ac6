//! What the coordinator knows about failed attempts, shared by the queue (which decides), the
//! store (which records) and the API (which reports): each failure as kept in a cell's error
//! history, the facts a decision is made from, and the decision itself. The policy that maps
//! one to the other is `queue::retry`.

use serde::{Deserialize, Serialize};

use super::state::FailureClass;
use crate::clock::Millis;

/// One failed attempt, as kept in `cells.errors`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorEntry {
    /// The attempt that failed.
    pub attempt: i32,
    /// The worker it ran on.
    pub worker: i64,
    /// Why it failed.
    pub class: FailureClass,
    /// The worker's (or coordinator's) message.
    pub message: String,
    /// When, unix ms.
    pub at: i64,
}

/// Where a failed cell goes next.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Back to the queue at `at`.
    Retry {
        /// When it becomes available again.
        at: Millis,
    },
    /// Failed for good.
    Discard {
        /// Why no retry (kept in the log, the error history has the details).
        reason: String,
    },
    /// Cancelled by a user.
    Cancel,
}

/// What the policy needs to know about a failed attempt.
#[derive(Clone, Debug)]
pub struct FailContext<'a> {
    /// Cell id (seeds the jitter, so cells failing together spread out).
    pub cell: i64,
    /// The attempt that failed.
    pub attempt: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// A user asked for the cell to be cancelled.
    pub cancel_requested: bool,
    /// Every failure so far, the new one last.
    pub history: &'a [ErrorEntry],
    /// Now.
    pub now: Millis,
}
