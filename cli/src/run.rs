//! `kiln run FILE`: the single-machine main job. An embedded coordinator on SQLite
//! (`./kiln.db`), one in-process worker on the local device, images in `./kiln-out/` (or S3),
//! a progress bar. Submission is idempotent by the file's contents, so after Ctrl-C (or a
//! crash) running the same command again resumes where it stopped.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_coordinator::config::Settings;
use kiln_coordinator::server::Coordinator;
use kiln_proto::v1 as pb;
use kiln_worker::agent::{self, AgentConfig};
use kiln_worker::upload::{RetryPolicy, Storage, StorageUrl};
use tokio::sync::watch;
use tokio_stream::StreamExt;

use crate::client::{Conn, S3Args, status_error};
use crate::submit::{SweepFile, submit_file};

pub const EXAMPLES: &str = "Examples:
  kiln run examples/tiny.toml                       # the README quick start
  kiln run sweep.toml --models D:\\sd\\models --device cuda:0
  kiln run sweep.toml --storage s3://renders/kiln --s3-endpoint http://nas:3900 --s3-path-style";

/// Flags of `kiln run`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The sweep file (TOML).
    file: PathBuf,
    /// Database of the embedded coordinator.
    #[arg(long, env = "KILN_DB", default_value = "sqlite://kiln.db")]
    db: String,
    /// Where images go: file://DIR or s3://BUCKET/PREFIX.
    #[arg(long, env = "KILN_STORAGE", default_value = "file://kiln-out")]
    storage: String,
    /// Folder searched for model and LoRA names (repeatable) [default: the sweep file's folder].
    #[arg(long = "models", env = "KILN_MODELS")]
    models: Vec<PathBuf>,
    /// A folder of textual-inversion embeddings (repeatable), after each models folder's
    /// `embeddings/` (see `kiln worker --embeddings`).
    #[arg(long = "embeddings", env = "KILN_EMBEDDINGS", value_name = "DIR")]
    embeddings: Vec<PathBuf>,
    /// Compute device: cpu, cuda:N or metal:N (`kiln devices` lists them).
    #[arg(long, env = "KILN_DEVICE", default_value = "cpu")]
    device: String,
    /// Memory budget for loaded pipelines, GiB.
    #[arg(long, default_value_t = 8.0)]
    cache_gb: f64,
    /// Render up to N alike cells as one UNet batch (see `kiln worker --batch`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    batch: u32,
    /// When the VAE decodes in tiles (see `kiln worker --vae-tiling`).
    #[arg(
        long,
        env = "KILN_VAE_TILING",
        default_value = "auto",
        value_name = "auto|on|off"
    )]
    vae_tiling: kiln_worker::engine::VaeTiling,
    /// Don't serve the web UI (by default it is at the printed http://127.0.0.1:PORT/).
    #[arg(long, env = "KILN_NO_WEB")]
    no_web: bool,
    #[command(flatten)]
    s3: S3Args,
}

pub fn main(args: Args) -> anyhow::Result<()> {
    let file = SweepFile::read(&args.file)?;
    let cache_bytes = (args.cache_gb.max(0.0) * (1u64 << 30) as f64) as u64;
    let opened = crate::devices::open(&args.device, None, None, cache_bytes)?;
    // The sweep file is the user's own: its URLs are fetched too.
    crate::hub::install(opened.device != kiln_worker::engine::Device::Cpu, true)?;
    let url: StorageUrl = args.storage.parse()?;
    let cfg = Settings {
        db: Some(args.db.clone()),
        listen: Some("127.0.0.1:0".into()),
        images: Some(vec![args.storage.clone()]),
        web: args.no_web.then_some(false),
        ..Default::default()
    }
    .validate()?;
    let models = if args.models.is_empty() {
        vec![
            args.file
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), PathBuf::from),
        ]
    } else {
        args.models.clone()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(async move {
        let coordinator = Coordinator::open(&cfg).await?;
        // Embedded mode has no other workers: attempts left running by an interrupted run
        // go straight back to the queue.
        let requeued = coordinator.queue().requeue_running().await?;
        if requeued > 0 {
            eprintln!("resuming: {requeued} interrupted cells queued again");
        }
        let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
        let addr = listener.local_addr()?;
        // The worker stops first, while the coordinator still answers it; then the coordinator.
        let (stop_worker, worker_rx) = watch::channel(false);
        let (stop_server, server_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let web = crate::coordinator::web_options(&cfg.web, &args.s3.options()).await?;
        if web.is_some() {
            eprintln!("watch and browse: http://{addr}/");
        }
        let server = tokio::spawn(
            coordinator
                .with_web(web)
                .serve(listener, stopped(server_rx)),
        );
        let conn = Conn {
            coordinator: format!("http://{addr}"),
            access: Default::default(),
        };
        let sweep_id = match submit_file(&conn, &file, &file.content_key(), 0, true).await? {
            Ok(sub) if sub.duplicate => {
                eprintln!("sweep {} (submitted before): resuming", sub.sweep_id);
                sub.sweep_id
            }
            Ok(sub) => {
                eprintln!("sweep {}: {} cells", sub.sweep_id, sub.cell_count);
                sub.sweep_id
            }
            // The file grew (seeds, axis values) since a run of the sweep of that name: only
            // the new cells are added, and the run resumes the rest.
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                crate::submit::extend_by_name(&conn, &file).await?
            }
            Err(s) => return Err(crate::client::status_error(s)),
        };
        let storage = Storage::open(&url, &args.s3.options()).await?;
        let agent_cfg = AgentConfig {
            coordinator: conn.coordinator.clone(),
            access: Default::default(),
            name: "local".into(),
            device: opened.device,
            models,
            embeddings: args.embeddings.clone(),
            // The sweep file is the user's own, and it names local paths.
            paths: kiln_worker::agent::resolve::PathPolicy::AnyPath,
            cache_bytes,
            device_cache_bytes: opened.device_cache_bytes,
            max_pixels: 4096 * 4096,
            memory_mib: u64::MAX >> 1,
            prefetch: 1,
            batch: args.batch,
            upload_retry: RetryPolicy::default(),
            idle_poll: Duration::from_millis(100),
            drain_timeout: WORKER_GRACE,
            metrics_addr: None,
            model_cache: Default::default(),
            yielding: Default::default(),
            vae_tiling: args.vae_tiling,
        };
        let mut worker = tokio::spawn(agent::run(agent_cfg, storage, stopped(worker_rx)));

        let followed = tokio::select! {
            r = follow(&conn, sweep_id) => Some(r),
            _ = crate::signal::shutdown() => None,
        };
        let _ = stop_worker.send(true);
        let worker_done = if followed.is_some() {
            Some((&mut worker).await)
        } else {
            // Interrupted: the render in flight may take minutes on a CPU. Wait a little for the
            // worker to finish what it holds, then give it up: the next run queues interrupted
            // cells again, so nothing is lost. A second Ctrl-C stops at once.
            eprintln!("stopping (Ctrl-C again to stop at once)");
            tokio::select! {
                r = tokio::time::timeout(WORKER_GRACE, &mut worker) => r.ok(),
                _ = crate::signal::shutdown() => {
                    eprintln!("stopped at once: run the same command again to resume");
                    std::process::exit(130);
                }
            }
        };
        match worker_done {
            Some(joined) => joined.context("worker task")??,
            None => {
                worker.abort();
                eprintln!("the render in flight was given up; the next run renders it again");
            }
        }
        let _ = stop_server.send(true);
        match tokio::time::timeout(SERVER_GRACE, server).await {
            Ok(joined) => joined.context("coordinator task")??,
            Err(_) => eprintln!("the coordinator did not stop in time; its database is safe"),
        }
        match followed {
            Some(result) => {
                result?;
                eprintln!("done: images under {url}/sweeps/{sweep_id}/");
                if !args.no_web {
                    eprintln!(
                        "browse them: kiln coordinator --db {} --images {url}  (web UI at http://127.0.0.1:7450/)",
                        args.db
                    );
                }
            }
            None => eprintln!("interrupted: run the same command again to resume"),
        }
        anyhow::Ok(())
    });
    // The render thread may still be inside a step it was not waited for; it holds nothing the
    // next run needs.
    rt.shutdown_timeout(Duration::from_millis(500));
    result
}

/// How long an interrupted `kiln run` waits for its worker to finish what it holds.
const WORKER_GRACE: Duration = Duration::from_secs(5);

/// How long an interrupted `kiln run` waits for its coordinator to stop.
const SERVER_GRACE: Duration = Duration::from_secs(3);

/// Shows a progress bar until the sweep is finished; errors if any cell failed for good.
async fn follow(conn: &Conn, sweep: u64) -> anyhow::Result<()> {
    let mut c = conn.sweeps().await?;
    let mut stream = c
        .watch_sweep(pb::SweepRequest { sweep_id: sweep })
        .await
        .map_err(status_error)?
        .into_inner();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("[{bar:30}] {pos}/{len} {msg}")?.progress_chars("=> "),
    );
    let mut last = None;
    while let Some(ev) = stream.next().await {
        let ev = ev.map_err(status_error)?;
        let Some(s) = ev.sweep else { continue };
        let n = s.counts.unwrap_or_default();
        bar.set_length(n.total);
        bar.set_position(n.completed + n.discarded + n.cancelled);
        bar.set_message(format!(
            "{} failed, {:.2} img/s",
            n.discarded, ev.cells_per_second
        ));
        last = Some(n);
    }
    bar.finish();
    if let Some(n) = last
        && n.discarded > 0
    {
        anyhow::bail!(
            "{} of {} cells failed; see `kiln query 'state = \"discarded\"'` against this database",
            n.discarded,
            n.total
        );
    }
    Ok(())
}
