//! Workers yielding to their PCs' owners: the reason each one last gave in a heartbeat ("game.exe
//! running", "outside 22:00-08:00"), and the admin's standing order for each (pause, drain).
//! Both live in this coordinator's memory, beside the lease cache, not in the database: a
//! reason is as fresh as the worker's last heartbeat, and an order is repeated in every
//! heartbeat reply until it is changed (after a coordinator restart, the admin gives it again).

use std::collections::HashMap;
use std::sync::Mutex;

use kiln_proto::WorkerId;

use crate::{Error, Result};

/// Longest reason a worker may report, bytes.
pub const MAX_PAUSED_REASON_BYTES: usize = 128;

/// What the admin asked of a worker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Control {
    /// Nothing: the worker follows its own yield rules.
    #[default]
    None,
    /// Yield until told otherwise.
    Pause,
    /// Drain as on SIGTERM and exit.
    Drain,
}

/// Reasons and orders, per worker.
#[derive(Debug, Default)]
pub struct Pauses(Mutex<HashMap<WorkerId, (String, Control)>>);

impl Pauses {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<WorkerId, (String, Control)>> {
        // Each change is one insert: a poisoned map is still a consistent one.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records why `worker` is not rendering (empty: it is) and returns the admin's order for
    /// it. A reason past [`MAX_PAUSED_REASON_BYTES`] or with control characters is refused.
    pub fn report(&self, worker: WorkerId, reason: &str) -> Result<Control> {
        if reason.len() > MAX_PAUSED_REASON_BYTES {
            return Err(Error::invalid(format!(
                "paused_reason: at most {MAX_PAUSED_REASON_BYTES} bytes"
            )));
        }
        if reason.chars().any(char::is_control) {
            return Err(Error::invalid("paused_reason: control characters"));
        }
        let mut map = self.lock();
        let entry = map.entry(worker).or_default();
        entry.0 = reason.to_owned();
        Ok(entry.1)
    }

    /// Why `worker` is not rendering, as it last said, and the admin's order for it.
    pub fn get(&self, worker: WorkerId) -> (String, Control) {
        self.lock().get(&worker).cloned().unwrap_or_default()
    }

    /// Gives `worker` the admin's order (delivered in its heartbeat replies).
    pub(super) fn order(&self, worker: WorkerId, control: Control) {
        self.lock().entry(worker).or_default().1 = control;
    }
}
