//! How the agent yields to the PC's owner ([`super::yielding`] says when): the backlog stops
//! leasing, a render in flight gets the configured grace to finish and is otherwise stopped
//! and handed back (released, so another worker takes it without an attempt counted), the
//! cells leased ahead are handed back, and the render thread drops its pipelines from device
//! memory; once allowed again, leasing resumes.

use std::time::Duration;

use kiln_proto::v1 as pb;
use tokio::sync::watch;

use super::backlog::{Backlog, Held};
use super::link::Link;
use super::renderer::Renderer;
use super::tracked::Tracked;

/// Waits until `reason` holds a reason to yield; returns it.
pub(super) async fn reason(mut reason: watch::Receiver<Option<String>>) -> String {
    // The borrow ends here, before any other await (it is not Send).
    let got = reason
        .wait_for(Option::is_some)
        .await
        .map(|r| r.clone().unwrap_or_default());
    match got {
        Ok(r) => r,
        // The monitor is gone: never yield.
        Err(_) => std::future::pending().await,
    }
}

/// Lets a render in flight (`rendering`, of `group`) finish within `grace`; past it, stops its
/// cells as yielded (the render loop hands them back) and waits for the render to notice.
pub(super) async fn within_grace<F: std::future::Future>(
    rendering: std::pin::Pin<&mut F>,
    group: &[Held],
    grace: Duration,
) -> F::Output {
    let mut rendering = rendering;
    match tokio::time::timeout(grace, rendering.as_mut()).await {
        Ok(out) => out,
        Err(_) => {
            tracing::info!(
                cells = group.len(),
                "yield grace over: handing the render back"
            );
            for held in group {
                held.flags.mark_yielded();
            }
            rendering.await
        }
    }
}

/// Hands an attempt stopped by a yield back to the coordinator.
pub(super) async fn hand_back(link: &Link, held: &Held) {
    let a = held.attempt();
    tracing::info!(
        cell = a.cell_id,
        attempt = a.attempt,
        "handed back to yield to the owner"
    );
    link.release(vec![a], false).await;
}

/// What holding still needs.
pub(super) struct Hold<'a> {
    pub(super) link: &'a Link,
    pub(super) backlog: &'a Backlog,
    pub(super) tracked: &'a Tracked,
    pub(super) renderer: &'a Renderer,
}

impl Hold<'_> {
    /// Yields until `reason` clears or `shutdown` resolves (then returns true): no leasing, the
    /// backlog (and whatever a lease call in flight brings) handed back, device memory freed.
    pub(super) async fn hold(
        &self,
        reason: &mut watch::Receiver<Option<String>>,
        shutdown: &mut (impl std::future::Future<Output = ()> + Unpin),
    ) -> bool {
        self.backlog.set_paused(true);
        self.renderer.free_device();
        loop {
            let rest: Vec<pb::AttemptRef> =
                self.backlog.drain().iter().map(Held::attempt).collect();
            if !rest.is_empty() {
                for a in &rest {
                    self.tracked.remove(*a);
                }
                tracing::info!(
                    cells = rest.len(),
                    "leased cells handed back to yield to the owner"
                );
                self.link.release(rest, false).await;
            }
            tokio::select! {
                // Allowed again (or the monitor is gone: then never yield again).
                _ = reason.wait_for(Option::is_none) => break,
                _ = self.backlog.arrived.notified() => {}
                _ = &mut *shutdown => return true,
            }
        }
        self.backlog.set_paused(false);
        false
    }
}
