//! The in-memory store of running attempts' activities (see `activity.rs`): bounded, by cell.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use kiln_proto::CellId;

use crate::clock::Millis;

/// Longest activity, bytes.
pub const MAX_ACTIVITY_BYTES: usize = 128;

/// Most attempts with an activity at once.
pub(super) const MAX_ACTIVITIES: usize = 65_536;

/// Activities by cell: (attempt, text, when).
#[derive(Debug, Default)]
pub struct Activities {
    by_cell: Mutex<HashMap<CellId, (i32, String, Millis)>>,
}

impl Activities {
    pub(super) fn lock(&self) -> MutexGuard<'_, HashMap<CellId, (i32, String, Millis)>> {
        // Entries are replaced whole; a panic elsewhere leaves the map valid.
        self.by_cell.lock().unwrap_or_else(|e| e.into_inner())
    }
}
