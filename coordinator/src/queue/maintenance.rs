//! The maintenance loop: every interval, rescue expired leases and promote due retries (see
//! [`super::Queue::maintain`]) and wake the intake's mover ([`super::Queue::wake_intake`]); at start and then hourly, refresh the planner's statistics
//! ([`crate::store::Store::analyze`]) so result queries use their indexes. One task per
//! coordinator; it stops when `shutdown` resolves.

use std::time::{Duration, Instant};

use super::Queue;

/// How often the planner's statistics are refreshed.
const ANALYZE_EVERY: Duration = Duration::from_secs(3600);

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
    let mut analyzed: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {
                queue.wake_intake();
                if analyzed.is_none_or(|t| t.elapsed() >= ANALYZE_EVERY) {
                    analyzed = Some(Instant::now());
                    if let Err(e) = queue.store().analyze().await {
                        tracing::warn!(error = %e, "analyze failed");
                    }
                }
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
