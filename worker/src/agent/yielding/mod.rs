//! Yielding to the PC's owner: while a listed game runs, another process uses the GPU, the
//! clock is outside the allowed hours, or the coordinator's admin paused the worker, the worker
//! stops leasing, finishes or hands back its current cell, and frees its device memory; it
//! resumes by itself when allowed again.
//!
//! Every signal is a [`YieldSource`]; one monitor task ([`spawn_monitor`]) polls them off the
//! async threads and publishes the first reason found on a `watch` channel (`None`: render).

pub mod hours;
pub mod settings;
pub mod sources;

use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDateTime;
use tokio::sync::watch;

pub use self::hours::{Clock, Hours, LocalClock, Window};
pub use self::settings::YieldSettings;

/// The coordinator's admin's standing order for this worker (from heartbeat replies).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Order {
    /// None: follow the local rules.
    #[default]
    None,
    /// Yield as to the owner until resumed.
    Pause,
    /// Drain as on SIGTERM.
    Drain,
}

impl Order {
    /// From `HeartbeatResponse.control` (anything unknown is no order).
    pub fn from_wire(control: i32) -> Order {
        match kiln_proto::v1::WorkerControl::try_from(control) {
            Ok(kiln_proto::v1::WorkerControl::Pause) => Order::Pause,
            Ok(kiln_proto::v1::WorkerControl::Drain) => Order::Drain,
            _ => Order::None,
        }
    }
}

/// Longest reason kept and reported (`kiln workers` shows it).
pub const MAX_REASON_BYTES: usize = 128;

/// One signal the worker yields to.
pub trait YieldSource: Send {
    /// Why the worker must yield at `now` (local time), or `None`. May block briefly (it runs
    /// on a blocking thread).
    fn check(&mut self, now: NaiveDateTime) -> Option<String>;
}

/// When to yield (`kiln worker --yield-*`).
#[derive(Clone, Debug)]
pub struct YieldConfig {
    /// Programs (by name) whose running makes the worker yield.
    pub processes: Vec<String>,
    /// Yield while another process uses the GPU (NVML).
    pub gpu_busy: bool,
    /// NVML's index of the card watched by `gpu_busy`.
    pub gpu_index: u32,
    /// The hours rendering is allowed; `None`: any time.
    pub hours: Option<Hours>,
    /// How long a render in flight may take to finish once a reason appears; then it is
    /// cancelled and handed back.
    pub grace: Duration,
    /// How often the sources are read.
    pub poll: Duration,
}

impl Default for YieldConfig {
    fn default() -> Self {
        YieldConfig {
            processes: Vec::new(),
            gpu_busy: false,
            gpu_index: 0,
            hours: None,
            grace: Duration::from_secs(10),
            poll: Duration::from_secs(2),
        }
    }
}

impl YieldConfig {
    /// Checks the settings once, at start.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.poll.is_zero(),
            "the yield poll interval must not be 0"
        );
        for p in &self.processes {
            anyhow::ensure!(
                !p.trim().is_empty() && p.len() <= 64,
                "--yield-process {p:?}: a program name of 1 to 64 bytes"
            );
        }
        Ok(())
    }

    /// The sources these settings name, plus the admin's `remote` pause; in test builds also
    /// the fake busy GPU when `KILN_TEST_YIELD_GPU_BUSY_FILE` names a file to watch.
    pub fn sources(&self, remote: watch::Receiver<Order>) -> Vec<Box<dyn YieldSource>> {
        let mut out: Vec<Box<dyn YieldSource>> = vec![Box::new(sources::Remote(remote))];
        if !self.processes.is_empty() {
            out.push(Box::new(sources::Processes::new(&self.processes)));
        }
        if self.gpu_busy {
            out.push(Box::new(sources::GpuBusy::new(self.gpu_index)));
        }
        if let Some(h) = &self.hours {
            out.push(Box::new(hours::OutsideHours(h.clone())));
        }
        #[cfg(feature = "testing")]
        if let Some(file) = std::env::var_os("KILN_TEST_YIELD_GPU_BUSY_FILE") {
            out.push(Box::new(sources::FakeGpuBusy(file.into())));
        }
        out
    }

    /// The clock the hours are read on: local time; in test builds the file named by
    /// `KILN_TEST_YIELD_CLOCK_FILE` when set.
    pub fn clock(&self) -> Arc<dyn Clock> {
        #[cfg(feature = "testing")]
        if let Some(file) = std::env::var_os("KILN_TEST_YIELD_CLOCK_FILE") {
            return Arc::new(hours::FileClock(file.into()));
        }
        Arc::new(LocalClock)
    }
}

/// Cuts `reason` to [`MAX_REASON_BYTES`] at a character boundary.
pub fn clip(mut reason: String) -> String {
    if reason.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}

/// The first reason any source gives at `now`.
pub fn first_reason(sources: &mut [Box<dyn YieldSource>], now: NaiveDateTime) -> Option<String> {
    // Every source is read, so each keeps its own state fresh (and logs its trouble once).
    let mut first = None;
    for s in sources.iter_mut() {
        let r = s.check(now);
        if first.is_none() {
            first = r;
        }
    }
    first.map(clip)
}

/// Reads `sources` once on a blocking thread; gives them back with the reason, or `None`
/// when one panicked.
async fn read(
    mut sources: Vec<Box<dyn YieldSource>>,
    clock: Arc<dyn Clock>,
) -> Option<(Vec<Box<dyn YieldSource>>, Option<String>)> {
    let checked = tokio::task::spawn_blocking(move || {
        let reason = first_reason(&mut sources, clock.now());
        (sources, reason)
    })
    .await;
    if checked.is_err() {
        tracing::error!("a yield source panicked: yielding is off");
    }
    checked.ok()
}

/// Starts the monitor: it reads `sources` once before returning (so nothing is leased before
/// the first answer), then every `every` on a blocking thread, and publishes the reason to
/// yield (`None`: render), logging each change. It ends when every receiver is gone.
pub async fn spawn_monitor(
    sources: Vec<Box<dyn YieldSource>>,
    clock: Arc<dyn Clock>,
    every: Duration,
) -> watch::Receiver<Option<String>> {
    let Some((mut sources, first)) = read(sources, clock.clone()).await else {
        return watch::channel(None).1;
    };
    if let Some(r) = &first {
        tracing::info!(reason = %r, "yielding to the owner");
    }
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some((back, reason)) = read(sources, clock.clone()).await else {
                tx.send_replace(None);
                return;
            };
            sources = back;
            tx.send_if_modified(|current| {
                if *current == reason {
                    return false;
                }
                match &reason {
                    Some(r) => tracing::info!(reason = %r, "yielding to the owner"),
                    None => tracing::info!("allowed again: resuming"),
                }
                *current = reason;
                true
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A clock the test sets.
    struct SetClock(Mutex<NaiveDateTime>);

    impl Clock for SetClock {
        fn now(&self) -> NaiveDateTime {
            *self.0.lock().unwrap()
        }
    }

    #[tokio::test]
    async fn the_monitor_publishes_the_hours_reason_on_an_injected_clock() {
        let at = |s: &str| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M").unwrap();
        let clock = Arc::new(SetClock(Mutex::new(at("2026-12-07 23:00"))));
        let cfg = YieldConfig {
            hours: Some(Hours {
                weekdays: "22:00-08:00".parse().unwrap(),
                weekends: None,
            }),
            poll: Duration::from_millis(10),
            ..YieldConfig::default()
        };
        let (_admin, remote) = watch::channel(Order::None);
        let mut rx = spawn_monitor(cfg.sources(remote), clock.clone(), cfg.poll).await;
        assert_eq!(*rx.borrow_and_update(), None);
        *clock.0.lock().unwrap() = at("2026-12-08 09:00");
        let r = rx.wait_for(Option::is_some).await.unwrap().clone();
        assert_eq!(r.as_deref(), Some("outside 22:00-08:00"));
        *clock.0.lock().unwrap() = at("2026-12-08 22:30");
        rx.wait_for(Option::is_none).await.unwrap();
    }

    #[tokio::test]
    async fn the_admin_pause_is_a_source_and_reasons_are_clipped() {
        let (admin, remote) = watch::channel(Order::None);
        let mut sources = YieldConfig::default().sources(remote);
        let now = LocalClock.now();
        assert_eq!(first_reason(&mut sources, now), None);
        admin.send_replace(Order::Pause);
        assert_eq!(
            first_reason(&mut sources, now).as_deref(),
            Some("paused by the admin")
        );
        admin.send_replace(Order::Drain);
        assert_eq!(first_reason(&mut sources, now), None, "a drain is no pause");
        let long = clip("é".repeat(100));
        assert!(long.len() <= MAX_REASON_BYTES && long.chars().all(|c| c == 'é'));
        assert_eq!(long.len(), MAX_REASON_BYTES);
    }
}
