//! The maintenance loop: every interval, rescue expired leases and promote due retries (see
//! [`super::Queue::maintain`]). One task per coordinator; it stops when `shutdown` resolves.

use std::time::Duration;

use super::Queue;

/// Runs maintenance passes every `interval` until `shutdown` completes. Errors are logged and
/// the loop goes on (the database may be briefly unreachable).
pub async fn run(
    queue: Queue,
    interval: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {
                match queue.maintain().await {
                    Ok(r) if r.rescued + r.promoted > 0 => {
                        tracing::info!(rescued = r.rescued, promoted = r.promoted, "maintenance");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "maintenance pass failed"),
                }
            }
        }
    }
}
