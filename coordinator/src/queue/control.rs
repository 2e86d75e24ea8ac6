//! The admin's remote control of workers (pause, resume, drain) and the reasons workers give
//! for yielding to their owners, kept in [`super::pauses`].

use kiln_proto::WorkerId;

use super::Queue;
use super::pauses::{Control, Pauses};
use crate::Result;

impl Queue {
    /// Why workers yield to their owners, and the admin's orders.
    pub fn pauses(&self) -> &Pauses {
        &self.pauses
    }

    /// Gives a registered `worker` the admin's order (delivered in its heartbeat replies).
    pub async fn control_worker(&self, worker: WorkerId, control: Control) -> Result<()> {
        // Refuses a worker that was never registered (NOT_FOUND).
        self.store.worker_credentials(worker).await?;
        tracing::info!(%worker, ?control, "worker order");
        self.pauses.order(worker, control);
        Ok(())
    }
}
