//! What a worker is doing for a running attempt before (or besides) its sampling steps, as its
//! last `ReportProgress.activity` said ("downloading dreamshaper (41%)"): kept in memory per
//! attempt, shown with the attempt's progress (`kiln workers`, a sweep's watch), never stored.
//! Bounded: at most [`MAX_ACTIVITIES`] attempts, an entry dropped when its attempt reports an
//! empty activity, and entries older than two lease times dropped when the map is full.

use super::Queue;
use super::activities::{MAX_ACTIVITIES, MAX_ACTIVITY_BYTES};
use crate::domain::lease::Fence;
use crate::domain::rows::ProgressRow;
use crate::{Error, Result};

impl Queue {
    /// Records attempt `f`'s activity; empty clears it. Shown only while `f` is the cell's
    /// running attempt.
    pub fn report_activity(&self, f: Fence, activity: &str) -> Result<()> {
        if activity.len() > MAX_ACTIVITY_BYTES || activity.chars().any(char::is_control) {
            return Err(Error::invalid(format!(
                "activity: at most {MAX_ACTIVITY_BYTES} bytes, no control characters"
            )));
        }
        let now = self.now();
        let mut map = self.activities.lock();
        if activity.is_empty() {
            map.remove(&f.cell);
            return Ok(());
        }
        if map.len() >= MAX_ACTIVITIES && !map.contains_key(&f.cell) {
            let stale = now.0 - 2 * self.cfg.lease_ttl_ms;
            map.retain(|_, (_, _, at)| at.0 >= stale);
            if map.len() >= MAX_ACTIVITIES {
                return Ok(());
            }
        }
        map.insert(f.cell, (f.attempt.0, activity.to_string(), now));
        Ok(())
    }

    /// `rows` with the activity their attempts last reported.
    pub(super) fn with_activity(&self, mut rows: Vec<ProgressRow>) -> Vec<ProgressRow> {
        let map = self.activities.lock();
        for r in &mut rows {
            if let Some((attempt, text, _)) = map.get(&r.cell)
                && *attempt == r.attempt
            {
                r.activity.clone_from(text);
            }
        }
        rows
    }
}
