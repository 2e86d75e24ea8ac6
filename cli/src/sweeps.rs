//! Client commands about sweeps and workers: `sweeps`, `status`, `cancel`, `pause`, `resume`,
//! `retry --failed`, `watch`, `workers`. Each is a thin call to the coordinator plus output
//! formatting; no business logic lives here.

use std::collections::HashMap;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use kiln_proto::v1 as pb;
use tokio_stream::StreamExt;

use crate::client::{Conn, SweepClient, status_error};
use crate::table::Table;

/// `kiln sweeps`: the newest sweeps with their progress.
pub async fn list(conn: &Conn, limit: u32) -> anyhow::Result<()> {
    let mut c = conn.sweeps().await?;
    let r = c
        .list_sweeps(pb::ListSweepsRequest {
            limit,
            page_token: String::new(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut t = Table::new(&["ID", "NAME", "STATE", "DONE", "FAILED", "RUNNING", "TOTAL"]);
    for s in &r.sweeps {
        let c = s.counts.unwrap_or_default();
        t.row(vec![
            s.id.to_string(),
            s.name.clone(),
            sweep_state(s),
            c.completed.to_string(),
            c.discarded.to_string(),
            c.running.to_string(),
            c.total.to_string(),
        ]);
    }
    print!("{}", t.render());
    Ok(())
}

/// `kiln status [SWEEP]`: one sweep in detail, or every unfinished sweep.
pub async fn status(conn: &Conn, sweep: Option<u64>) -> anyhow::Result<()> {
    let mut c = conn.sweeps().await?;
    let sweeps = match sweep {
        Some(id) => vec![
            c.get_sweep(pb::GetSweepRequest { sweep_id: id })
                .await
                .map_err(status_error)?
                .into_inner(),
        ],
        None => c
            .list_sweeps(pb::ListSweepsRequest {
                limit: 100,
                page_token: String::new(),
            })
            .await
            .map_err(status_error)?
            .into_inner()
            .sweeps
            .into_iter()
            .filter(|s| !s.finished)
            .collect(),
    };
    if sweeps.is_empty() {
        println!("no unfinished sweeps");
    }
    for s in sweeps {
        let n = s.counts.unwrap_or_default();
        let failing = n.discarded + n.retryable;
        println!("sweep {} {:?} ({})", s.id, s.name, sweep_state(&s));
        println!(
            "  {} total: {} completed, {} running, {} queued, {} retrying, {} held, {} discarded, {} cancelled",
            n.total,
            n.completed,
            n.running,
            n.available + n.scheduled,
            n.retryable,
            n.held,
            n.discarded,
            n.cancelled
        );
        if failing > 0 {
            for line in failure_summary(&mut c, s.id).await? {
                println!("  {line}");
            }
        }
    }
    Ok(())
}

/// Why a sweep's cells fail: the last errors of its discarded and retrying cells (from up to
/// 500), alike ones counted together (the same failure on any worker or attempt), most
/// frequent first.
async fn failure_kinds(c: &mut SweepClient, sweep: u64) -> anyhow::Result<Vec<(String, usize)>> {
    let cells = c
        .query_results(pb::QueryResultsRequest {
            sweep_id: sweep,
            states: vec![
                pb::CellState::Discarded as i32,
                pb::CellState::Retryable as i32,
            ],
            limit: 500,
            ..Default::default()
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .cells;
    let mut kinds: Vec<(String, usize)> = Vec::new();
    for text in cells
        .iter()
        .filter_map(|r| r.errors.last())
        .map(crate::query::error_text)
    {
        match kinds.iter_mut().find(|(k, _)| *k == text) {
            Some((_, n)) => *n += 1,
            None => kinds.push((text, 1)),
        }
    }
    kinds.sort_by_key(|k| std::cmp::Reverse(k.1));
    Ok(kinds)
}

/// [`failure_kinds`] as lines: at most five kinds, then how many others.
async fn failure_summary(c: &mut SweepClient, sweep: u64) -> anyhow::Result<Vec<String>> {
    let kinds = failure_kinds(c, sweep).await?;
    let mut out: Vec<String> = kinds
        .iter()
        .take(5)
        .map(|(text, n)| format!("{n} × {text}"))
        .collect();
    if kinds.len() > 5 {
        out.push(format!(
            "… and {} other kinds of failure (kiln query 'state = \"discarded\"')",
            kinds.len() - 5
        ));
    }
    Ok(out)
}

/// The sweep-changing commands.
#[derive(Debug, Clone, Copy)]
pub enum Change {
    /// Cancel.
    Cancel,
    /// Pause.
    Pause,
    /// Resume.
    Resume,
    /// Retry failed (discarded) cells.
    RetryFailed,
}

/// `kiln cancel|pause|resume|retry --failed SWEEP`.
pub async fn change(conn: &Conn, sweep: u64, what: Change) -> anyhow::Result<()> {
    let mut c = conn.sweeps().await?;
    let req = pb::SweepRequest { sweep_id: sweep };
    match what {
        Change::Cancel => {
            let r = c
                .cancel_sweep(req)
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "sweep {sweep}: {} queued cells cancelled, {} running cells told to stop",
                r.cancelled, r.cancel_requested
            );
        }
        Change::Pause => {
            let r = c.pause_sweep(req).await.map_err(status_error)?.into_inner();
            println!("sweep {sweep}: paused, {} queued cells held", r.changed);
        }
        Change::Resume => {
            let r = c
                .resume_sweep(req)
                .await
                .map_err(status_error)?
                .into_inner();
            println!("sweep {sweep}: resumed, {} cells released", r.changed);
        }
        Change::RetryFailed => {
            let r = c
                .retry_failed(req)
                .await
                .map_err(status_error)?
                .into_inner();
            println!("sweep {sweep}: {} failed cells queued again", r.changed);
        }
    }
    Ok(())
}

/// `kiln watch [SWEEP]`: live progress bars (done/failed/total, images/s, ETA) until the
/// watched sweeps finish. Without a sweep, every unfinished sweep.
pub async fn watch(conn: &Conn, sweep: Option<u64>) -> anyhow::Result<()> {
    let mut c = conn.sweeps().await?;
    let ids: Vec<u64> = match sweep {
        Some(id) => vec![id],
        None => c
            .list_sweeps(pb::ListSweepsRequest {
                limit: 100,
                page_token: String::new(),
            })
            .await
            .map_err(status_error)?
            .into_inner()
            .sweeps
            .iter()
            .filter(|s| !s.finished)
            .map(|s| s.id)
            .collect(),
    };
    if ids.is_empty() {
        println!("no unfinished sweeps to watch");
        return Ok(());
    }
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg}")?
        .progress_chars("=> ");
    let mut tasks = Vec::new();
    for id in ids {
        let bar = multi.add(ProgressBar::new(0));
        bar.set_style(style.clone());
        bar.set_prefix(format!("sweep {id}"));
        bar.enable_steady_tick(Duration::from_millis(500));
        let mut client = c.clone();
        tasks.push(tokio::spawn(async move {
            // Each kind of failure is told once, when it first shows.
            let (mut failing, mut told) = (0, std::collections::HashSet::new());
            let mut stream = client
                .watch_sweep(pb::SweepRequest { sweep_id: id })
                .await
                .map_err(status_error)?
                .into_inner();
            while let Some(ev) = stream.next().await {
                let ev = ev.map_err(status_error)?;
                let Some(s) = ev.sweep else { continue };
                let n = s.counts.unwrap_or_default();
                bar.set_length(n.total);
                bar.set_position(n.completed + n.discarded + n.cancelled);
                let eta = match ev.eta_ms {
                    ms if ms < 0 => "ETA ?".to_string(),
                    ms => format!("ETA {}", human_duration(ms)),
                };
                bar.set_message(format!(
                    "{} failed, {} running, {:.2} img/s, {eta}",
                    n.discarded, n.running, ev.cells_per_second
                ));
                if n.discarded + n.retryable > failing {
                    failing = n.discarded + n.retryable;
                    for (kind, _) in failure_kinds(&mut client, id).await? {
                        if told.insert(kind.clone()) {
                            say(&bar, format!("sweep {id}: cells fail with {kind}"));
                        }
                    }
                }
                if s.finished {
                    bar.finish_with_message(format!(
                        "finished: {} done, {} failed, {} cancelled",
                        n.completed, n.discarded, n.cancelled
                    ));
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Prints `line` above the progress bars (or plainly, when they are hidden: not a terminal).
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        println!("{line}");
    } else {
        bar.println(line);
    }
}

/// `kiln workers`: who is connected, their device, current task and speed.
pub async fn workers(conn: &Conn) -> anyhow::Result<()> {
    let mut c = conn.sweeps().await?;
    let r = c
        .list_workers(pb::ListWorkersRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let mut t = Table::new(&[
        "ID",
        "NAME",
        "DEVICE",
        "LEVEL",
        "STATE",
        "RUNNING",
        "IMG/S",
        "LAST SEEN",
    ]);
    let kinds: HashMap<i32, &str> = [
        (pb::DeviceKind::Cpu as i32, "cpu"),
        (pb::DeviceKind::Cuda as i32, "cuda"),
        (pb::DeviceKind::Metal as i32, "metal"),
    ]
    .into();
    for w in &r.workers {
        let info = w.info.clone().unwrap_or_default();
        let running: Vec<String> = w
            .running
            .iter()
            .map(|p| match p.activity.as_str() {
                // What the worker does before sampling, e.g. downloading a model.
                "" => format!("cell {} step {}/{}", p.cell_id, p.step, p.total_steps),
                doing => format!("cell {} {doing}", p.cell_id),
            })
            .collect();
        t.row(vec![
            w.worker_id.to_string(),
            info.name,
            {
                // `cuda NVIDIA GeForce RTX 3060`, but `cpu`, not `cpu cpu`.
                let kind = kinds.get(&info.device_kind).unwrap_or(&"?");
                if info.device_model.starts_with(kind) {
                    info.device_model.clone()
                } else {
                    format!("{kind} {}", info.device_model)
                }
            },
            // The render features it understands: 0 for workers older than levels.
            info.render_level.to_string(),
            worker_state(w),
            if running.is_empty() {
                "-".into()
            } else {
                running.join(", ")
            },
            format!("{:.2}", w.cells_per_second),
            format!("{} ago", human_duration(now_ms() - w.last_seen_at_ms)),
        ]);
    }
    print!("{}", t.render());
    Ok(())
}

/// A worker's STATE: drained, offline, `paused: game.exe running` (why it yields to its
/// owner), `draining (admin)`, or online.
fn worker_state(w: &pb::WorkerRecord) -> String {
    let drain_ordered = w.control == pb::WorkerControl::Drain as i32;
    if w.drained {
        "drained".into()
    } else if !w.online {
        "offline".into()
    } else if drain_ordered {
        "draining (admin)".into()
    } else if !w.paused_reason.is_empty() {
        format!("paused: {}", w.paused_reason)
    } else if w.control == pb::WorkerControl::Pause as i32 {
        // Ordered, not yet heard back.
        "pausing (admin)".into()
    } else {
        "online".into()
    }
}

/// `kiln workers pause|resume|drain ID`: the admin's order, delivered in the worker's next
/// heartbeat.
pub async fn control(conn: &Conn, worker: u64, control: pb::WorkerControl) -> anyhow::Result<()> {
    let mut c = conn.sweeps().await?;
    c.control_worker(pb::ControlWorkerRequest {
        worker_id: worker,
        control: control as i32,
    })
    .await
    .map_err(status_error)?;
    let what = match control {
        pb::WorkerControl::Pause => "pause",
        pb::WorkerControl::Drain => "drain",
        _ => "resume",
    };
    println!("worker {worker}: {what} sent (it acts on its next heartbeat)");
    Ok(())
}

fn sweep_state(s: &pb::Sweep) -> String {
    let state = match pb::SweepState::try_from(s.state) {
        Ok(pb::SweepState::Paused) => "paused",
        Ok(pb::SweepState::Cancelled) => "cancelled",
        _ => "active",
    };
    if s.finished && state == "active" {
        "finished".into()
    } else {
        state.into()
    }
}

/// 3725000 ms → "1h02m".
/// Now, unix ms.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub fn human_duration(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(3_725_000), "1h02m");
        assert_eq!(human_duration(65_000), "1m05s");
        assert_eq!(human_duration(4_000), "4s");
    }
}
