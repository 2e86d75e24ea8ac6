//! In-process change notifications. Every queue write that changes a cell's state bumps a
//! generation counter; sweep watchers wait on it instead of polling the database in a loop.
//! Cheap for writers (one atomic store), lossy by design: a watcher re-reads counts after a
//! wake-up, so it never needs the individual events.

use tokio::sync::watch;

/// The change counter.
#[derive(Debug, Clone)]
pub struct Events {
    tx: watch::Sender<u64>,
}

impl Default for Events {
    fn default() -> Self {
        Self {
            tx: watch::Sender::new(0),
        }
    }
}

impl Events {
    /// Records that something changed.
    pub fn changed(&self) {
        self.tx.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// A receiver that wakes on the next change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }
}
