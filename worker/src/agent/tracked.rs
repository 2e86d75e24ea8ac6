//! The attempts a worker holds (leased and queued, rendering, or uploading) and what the
//! coordinator has said about each: the leaser adds an attempt when it is leased, the render
//! loop and the uploads remove it when they are done with it, and the heartbeat task reads the
//! set afresh every beat and raises an attempt's flags.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kiln_proto::v1 as pb;

/// What the heartbeat learned about one attempt. Both flags only ever go from false to true.
#[derive(Debug, Default)]
pub struct AttemptFlags {
    /// Stop working on it: the user cancelled it, or its lease is lost. Shared with the
    /// render, whose sampling loop checks it between steps.
    pub cancel: Arc<AtomicBool>,
    /// The coordinator no longer holds it for this worker: never complete or fail it.
    lost: AtomicBool,
    /// Stopped because the worker yields to its PC's owner: hand it back, do not fail it.
    yielded: AtomicBool,
}

impl AttemptFlags {
    /// Whether the lease is lost.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Whether it should stop (cancelled or lost).
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// The coordinator gave the lease to someone else: stop, and report nothing.
    pub fn mark_lost(&self) {
        self.lost.store(true, Ordering::SeqCst);
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Whether it was stopped to yield to the owner.
    pub fn is_yielded(&self) -> bool {
        self.yielded.load(Ordering::SeqCst)
    }

    /// The worker yields to its owner: stop, and hand it back.
    pub fn mark_yielded(&self) {
        self.yielded.store(true, Ordering::SeqCst);
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// The user cancelled its sweep: stop.
    pub fn mark_cancelled(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }
}

/// One held attempt and its flags.
pub type Held = (pb::AttemptRef, Arc<AttemptFlags>);

/// The held attempts, each with its flags. Cloning shares the set.
#[derive(Clone, Debug, Default)]
pub struct Tracked(Arc<Mutex<Vec<Held>>>);

impl Tracked {
    /// Starts tracking `attempt` and returns its flags.
    pub fn add(&self, attempt: pb::AttemptRef) -> Arc<AttemptFlags> {
        let flags = Arc::new(AttemptFlags::default());
        self.lock().push((attempt, flags.clone()));
        flags
    }

    /// Stops tracking `attempt` (done, failed, released or lost).
    pub fn remove(&self, attempt: pb::AttemptRef) {
        self.lock().retain(|(a, _)| *a != attempt);
    }

    /// The attempts held now, for one heartbeat.
    pub fn snapshot(&self) -> Vec<Held> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Held>> {
        // The set stays consistent whatever a panicking holder was doing: each change is one
        // push or retain.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_shared_and_removal_is_by_attempt() {
        let tracked = Tracked::default();
        let a = pb::AttemptRef {
            cell_id: 1,
            attempt: 1,
        };
        let b = pb::AttemptRef {
            cell_id: 1,
            attempt: 2,
        };
        let fa = tracked.add(a);
        let fb = tracked.add(b);
        for (attempt, flags) in tracked.snapshot() {
            if attempt == a {
                flags.mark_lost();
            } else {
                flags.mark_cancelled();
            }
        }
        assert!(fa.is_lost() && fa.is_cancelled());
        assert!(!fb.is_lost() && fb.is_cancelled());
        tracked.remove(a);
        assert_eq!(tracked.snapshot().len(), 1);
        assert_eq!(tracked.snapshot()[0].0, b);
    }
}
