//! `kiln`: the command line of the kiln render farm.
//!
//! Subcommands:
//! - `kiln coordinator`: the gRPC coordinator (SQLite by default, Postgres for scale).
//! - `kiln worker`: a render worker (one per PC).
//! - `kiln run FILE`: everything on one machine (embedded coordinator + local worker).
//! - `kiln submit | plan | extend | query | fetch | grid | star | sweeps | status | watch | cancel |
//!   pause | resume | retry | workers`: talk to a coordinator (`--coordinator URL` or
//!   `KILN_COORDINATOR`).
//! - `kiln render`: one local image from a model file or folder.
//! - `kiln devices`: what this build can compute on here (CPU, CUDA cards, Metal).
//! - `kiln bench`: images/s, UNet ms/step, VAE ms and peak memory of a model on a device.
//!
//! Configuration flows defaults → `--config FILE` (TOML) → `KILN_*` environment → flags, and is
//! validated once before anything starts.

mod bench;
mod cert;
mod client;
mod coordinator;
mod devices;
mod fetch;
mod grid;
mod hub;
mod images;
mod init_image;
mod model;
mod query;
mod render;
mod run;
mod signal;
mod star;
mod submit;
mod sweeps;
mod table;
mod token;
mod worker;

use clap::{Parser, Subcommand};

/// The kiln render farm: Stable Diffusion 1.5 + LCM-LoRA sweeps across your PCs.
#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about,
    long_about = None,
    after_help = "Examples:\n  kiln run examples/tiny.toml                        # everything on this PC: the quick start\n  kiln coordinator                                   # a farm: the coordinator (127.0.0.1:7450)\n  kiln worker --coordinator http://PC:7450 --models D:\\sd\\models   # on each PC\n  kiln submit examples/foxes.toml && kiln watch foxes\n  kiln query 'sweep = \"foxes\" and cfg >= 1.5' --sort -seed\n  kiln render --model dreamshaper_8.safetensors --prompt 'a (fox:1.2)' --seed 1 -o fox.png\n\nEvery command has --help with examples; README.md has the rest."
)]
struct Cli {
    /// Log filter, e.g. `info` or `kiln_coordinator=debug` (or RUST_LOG) [default: info; warn
    /// for `kiln run`, whose progress bar it would interrupt].
    #[arg(long, global = true, env = "KILN_LOG")]
    log: Option<String>,
    /// How log lines are written to stderr: `text` for people, `json` (one JSON object per
    /// line: timestamp, level, target, fields, span) for a log collector.
    #[arg(long, global = true, env = "KILN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// CPU threads the engine computes with (rendering on the CPU, and the CPU parts of a GPU
    /// render) [default: RAYON_NUM_THREADS when set, else the physical core count]. Leave
    /// cores free for the PC's owner with fewer.
    #[arg(long, global = true, env = "KILN_THREADS", value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    #[command(subcommand)]
    command: Command,
}

/// The format of log lines (`--log-format`).
/// What `kiln workers ORDER ID` asks of a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum WorkerOrder {
    Pause,
    Resume,
    Drain,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the coordinator: stores sweeps and leases cells to workers over gRPC.
    #[command(after_help = coordinator::EXAMPLES)]
    Coordinator(coordinator::Args),
    /// Render one image locally from a model file or folder (no coordinator).
    #[command(after_help = render::EXAMPLES)]
    Render(render::Args),
    /// Measure rendering speed and peak memory of a model on a device (images/s, UNet ms/step).
    #[command(after_help = bench::EXAMPLES)]
    Bench(bench::Args),
    /// List the devices this build of kiln can render on here: CPU, CUDA cards, Metal.
    #[command(after_help = devices::EXAMPLES)]
    Devices,
    /// Make, list and revoke tokens for a coordinator run with --require-tokens.
    #[command(after_help = token::EXAMPLES)]
    Token {
        #[command(flatten)]
        db: token::Db,
        #[command(subcommand)]
        action: token::Action,
    },
    /// Make a certificate authority and a server certificate for a TLS coordinator.
    #[command(after_help = cert::EXAMPLES)]
    Cert(cert::Args),
    /// Run a render worker: leases cells, renders them, uploads the PNGs.
    #[command(after_help = worker::EXAMPLES)]
    Worker(worker::Args),
    /// Render a sweep file on this machine: embedded coordinator (./kiln.db), one local
    /// worker, images in ./kiln-out. Ctrl-C is safe; run it again to resume.
    #[command(after_help = run::EXAMPLES)]
    Run(run::Args),
    /// Submit a sweep file (and the files it references); prints the sweep id and cell count.
    #[command(
        after_help = "A sweep of the same name submitted before from other contents (a file that grew: more seeds, axis values) is refused with how to go on: --extend adds only the new cells to it, --new starts another sweep of that name.\n\nExamples:\n  kiln submit examples/foxes.toml\n  kiln submit --extend examples/foxes.toml   # after adding seeds: only the new cells run\n  kiln submit sweep.toml --key overnight-2026-11-26 --priority 1"
    )]
    Submit {
        #[command(flatten)]
        conn: client::Conn,
        /// The sweep file (TOML).
        file: std::path::PathBuf,
        /// When a sweep of this name exists, add this file's new cells to it.
        #[arg(long, conflicts_with = "new")]
        extend: bool,
        /// When a sweep of this name exists, start another one anyway.
        #[arg(long)]
        new: bool,
        /// Idempotency key [default: a hash of the file and the files it references].
        #[arg(long)]
        key: Option<String>,
        /// Priority 0..=9, lower first.
        #[arg(long, default_value_t = 0)]
        priority: i32,
    },
    /// Plan a sweep file without submitting it (here, no coordinator needed): cell count and
    /// the first cells, exactly as `kiln submit` would store them.
    #[command(
        after_help = "Examples:\n  kiln plan examples/foxes.toml --show 10\n  kiln plan examples/foxes.toml --remote   # ask the coordinator (its limits)"
    )]
    Plan {
        #[command(flatten)]
        conn: client::Conn,
        /// The sweep file (TOML).
        file: std::path::PathBuf,
        /// How many cells to show.
        #[arg(long, default_value_t = 20)]
        show: u32,
        /// Ask the coordinator to plan it (with its own cell limit) instead of planning here.
        #[arg(long)]
        remote: bool,
    },
    /// Add the cells a grown sweep file has (more seeds, more axis values) to a sweep.
    #[command(after_help = "Example:\n  kiln extend 12 examples/foxes.toml")]
    Extend {
        #[command(flatten)]
        conn: client::Conn,
        /// Sweep id or name (the newest sweep of that name).
        sweep: String,
        /// The grown sweep file.
        file: std::path::PathBuf,
    },
    /// Query results with the filter language (docs/query.md).
    #[command(after_help = query::help())]
    Query {
        #[command(flatten)]
        conn: client::Conn,
        /// Filter, e.g. `cfg >= 1.5 and animal = "fox"` (empty: everything).
        #[arg(default_value = "")]
        filter: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: query::Format,
        /// Sort keys, e.g. `cfg,-seed` or `-seed` (`-`: descending).
        #[arg(long, allow_hyphen_values = true)]
        sort: Option<String>,
        /// Most rows.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Download the images of matching completed cells, verifying each sha256.
    #[command(after_help = fetch::EXAMPLES)]
    Fetch {
        #[command(flatten)]
        conn: client::Conn,
        #[command(flatten)]
        s3: client::S3Args,
        /// Filter (empty: every completed cell).
        #[arg(default_value = "")]
        filter: String,
        /// Output folder.
        #[arg(short = 'o', long = "out")]
        out: std::path::PathBuf,
        /// File names: text with {field} or {field:N}, `/` for folders (see below)
        /// [default: {sweep_id}-{number:6}-{seed}.png].
        #[arg(long, value_name = "PATTERN")]
        name: Option<String>,
        /// Most images.
        #[arg(long, default_value_t = 10_000)]
        limit: u32,
    },
    /// A labelled contact sheet (PNG) of matching images along one or two axes.
    #[command(
        after_help = "Each tile shows the first of its matches by cell number; kiln grid says how many matches that leaves out (narrow the filter, or add an axis).\n\nExamples:\n  kiln grid 'sweep = \"foxes\" and seed = 1' --x cfg --y animal -o foxes.png\n  kiln grid 'sweep = 3' --x lora.lcm.strength -o strength.png"
    )]
    Grid {
        #[command(flatten)]
        conn: client::Conn,
        #[command(flatten)]
        s3: client::S3Args,
        /// Filter (empty: every completed cell).
        #[arg(default_value = "")]
        filter: String,
        /// Column axis: a binding or seed, cfg, steps, sampler, model, prompt, negative, width,
        /// height, size (an axis no matched cell has is refused, listing those they have).
        #[arg(long)]
        x: String,
        /// Row axis (optional).
        #[arg(long)]
        y: Option<String>,
        /// Output PNG.
        #[arg(short = 'o', long = "out")]
        out: std::path::PathBuf,
        /// Most cells considered.
        #[arg(long, default_value_t = 2000)]
        limit: u32,
    },
    /// Mark cells as keepers (or not) and rate them; find them with `kiln query 'starred'`.
    #[command(after_help = star::EXAMPLES)]
    Star {
        #[command(flatten)]
        conn: client::Conn,
        /// Cell ids (the CELL column of `kiln query`).
        #[arg(required = true, value_name = "CELL")]
        cells: Vec<u64>,
        /// Take the star away instead.
        #[arg(long)]
        unstar: bool,
        /// Stars, 1 to 5; 0 clears the rating.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=5))]
        rating: Option<u32>,
    },
    /// List sweeps, newest first.
    #[command(after_help = "Example:\n  kiln sweeps --limit 20")]
    Sweeps {
        #[command(flatten)]
        conn: client::Conn,
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Show a sweep's counts, or every unfinished sweep.
    #[command(after_help = "Examples:\n  kiln status\n  kiln status 12")]
    Status {
        #[command(flatten)]
        conn: client::Conn,
        /// Sweep id or name (the newest sweep of that name).
        sweep: Option<String>,
    },
    /// Live progress bars until the sweep (or every unfinished sweep) finishes.
    #[command(
        after_help = "Examples:\n  kiln watch\n  kiln watch 12 --coordinator http://192.168.1.10:7450"
    )]
    Watch {
        #[command(flatten)]
        conn: client::Conn,
        /// Sweep id or name (the newest sweep of that name).
        sweep: Option<String>,
    },
    /// Cancel a sweep: queued cells now, running ones at their next heartbeat.
    #[command(after_help = "Example:\n  kiln cancel 12")]
    Cancel {
        #[command(flatten)]
        conn: client::Conn,
        /// Sweep id or name (the newest sweep of that name).
        sweep: String,
    },
    /// Pause a sweep: hold its queued cells; running ones finish.
    #[command(after_help = "Example:\n  kiln pause 12")]
    Pause {
        #[command(flatten)]
        conn: client::Conn,
        /// Sweep id or name (the newest sweep of that name).
        sweep: String,
    },
    /// Resume a paused sweep.
    #[command(after_help = "Example:\n  kiln resume 12")]
    Resume {
        #[command(flatten)]
        conn: client::Conn,
        /// Sweep id or name (the newest sweep of that name).
        sweep: String,
    },
    /// Queue a sweep's failed cells again with a fresh set of attempts.
    #[command(after_help = "Example:\n  kiln retry --failed 12")]
    Retry {
        #[command(flatten)]
        conn: client::Conn,
        /// Retry the failed (discarded) cells; required, so the intent is explicit.
        #[arg(long, required = true)]
        failed: bool,
        /// Sweep id or name (the newest sweep of that name).
        sweep: String,
    },
    /// The model registry: upload a model file once to the pool and name it (`add`), `list`,
    /// `rm`; sweeps then name it as `model = "NAME"` or `"sha256:…"`.
    #[command(after_help = model::EXAMPLES)]
    Model {
        #[command(flatten)]
        conn: client::Conn,
        #[command(subcommand)]
        action: model::Action,
    },
    /// Connected workers: device, state (with why a worker yields to its PC's owner), current
    /// task, images/s; with an order and a worker ID, pauses, resumes or drains that worker
    /// (admin token).
    #[command(
        after_help = "Examples:\n  kiln workers\n  kiln workers pause 3\n  kiln workers resume 3\n  kiln workers drain 3"
    )]
    Workers {
        #[command(flatten)]
        conn: client::Conn,
        /// pause: yield as to the owner until resumed; resume: undo pause or drain; drain:
        /// finish the render in flight, hand back the rest and exit.
        #[arg(value_enum, requires = "worker")]
        order: Option<WorkerOrder>,
        /// The worker's ID (first column of `kiln workers`).
        worker: Option<u64>,
    },
}

/// Runs a command that talks to a coordinator, on a small runtime.
fn run_client(command: Command) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match command {
            Command::Sweeps { conn, limit } => sweeps::list(&conn, limit).await,
            Command::Status { conn, sweep } => {
                let sweep = client::maybe_sweep_id(&conn, sweep.as_deref()).await?;
                sweeps::status(&conn, sweep).await
            }
            Command::Watch { conn, sweep } => {
                let sweep = client::maybe_sweep_id(&conn, sweep.as_deref()).await?;
                sweeps::watch(&conn, sweep).await
            }
            Command::Cancel { conn, sweep } => {
                let sweep = client::sweep_id(&conn, &sweep).await?;
                sweeps::change(&conn, sweep, sweeps::Change::Cancel).await
            }
            Command::Pause { conn, sweep } => {
                let sweep = client::sweep_id(&conn, &sweep).await?;
                sweeps::change(&conn, sweep, sweeps::Change::Pause).await
            }
            Command::Resume { conn, sweep } => {
                let sweep = client::sweep_id(&conn, &sweep).await?;
                sweeps::change(&conn, sweep, sweeps::Change::Resume).await
            }
            Command::Retry { conn, sweep, .. } => {
                let sweep = client::sweep_id(&conn, &sweep).await?;
                sweeps::change(&conn, sweep, sweeps::Change::RetryFailed).await
            }
            Command::Workers {
                conn, order: None, ..
            } => sweeps::workers(&conn).await,
            Command::Workers {
                conn,
                order: Some(order),
                worker,
            } => {
                let worker = worker.expect("clap requires the worker with an order");
                let control = match order {
                    WorkerOrder::Pause => kiln_proto::v1::WorkerControl::Pause,
                    WorkerOrder::Resume => kiln_proto::v1::WorkerControl::Resume,
                    WorkerOrder::Drain => kiln_proto::v1::WorkerControl::Drain,
                };
                sweeps::control(&conn, worker, control).await
            }
            Command::Model { conn, action } => model::main(&conn, action).await,
            Command::Star {
                conn,
                cells,
                unstar,
                rating,
            } => star::star(&conn, &cells, unstar, rating).await,
            Command::Submit {
                conn,
                file,
                key,
                priority,
                extend,
                new,
            } => {
                let on_existing = match (extend, new) {
                    (true, _) => submit::OnExisting::Extend,
                    (_, true) => submit::OnExisting::New,
                    _ => submit::OnExisting::Refuse,
                };
                submit::submit(&conn, &file, key, priority, on_existing).await
            }
            Command::Plan {
                conn,
                file,
                show,
                remote,
            } => submit::plan(&conn, &file, show, remote).await,
            Command::Extend { conn, sweep, file } => {
                let sweep = client::sweep_id(&conn, &sweep).await?;
                submit::extend(&conn, sweep, &file).await
            }
            Command::Query {
                conn,
                filter,
                format,
                sort,
                limit,
            } => query::query(&conn, &filter, sort.as_deref(), limit, format).await,
            Command::Fetch {
                conn,
                s3,
                filter,
                out,
                name,
                limit,
            } => fetch::fetch(&conn, &filter, limit, &out, name.as_deref(), &s3.options()).await,
            Command::Grid {
                conn,
                s3,
                filter,
                x,
                y,
                out,
                limit,
            } => grid::grid(&conn, &filter, &x, y.as_deref(), limit, &out, &s3.options()).await,
            Command::Coordinator(_)
            | Command::Worker(_)
            | Command::Run(_)
            | Command::Render(_)
            | Command::Devices
            | Command::Token { .. }
            | Command::Cert(_)
            | Command::Bench(_) => {
                unreachable!("long-running commands are dispatched in main")
            }
        }
    })
}

fn main() -> std::process::ExitCode {
    // Parsing the flags starts no thread.
    let cli = Cli::parse();
    // SAFETY: before any thread is started.
    unsafe { kiln_worker::engine::threads::fix_thread_count(cli.threads.map(usize::from)) };
    let quiet = matches!(cli.command, Command::Run(_));
    let filter = std::env::var("RUST_LOG")
        .ok()
        .or_else(|| cli.log.clone())
        .unwrap_or_else(|| if quiet { "warn" } else { "info" }.into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let result = match cli.command {
        Command::Coordinator(args) => coordinator::main(args),
        Command::Worker(args) => worker::main(args),
        Command::Run(args) => run::main(args),
        Command::Render(args) => render::main(args),
        Command::Devices => devices::main(),
        Command::Bench(args) => bench::main(args),
        Command::Token { db, action } => token::main(db, action),
        Command::Cert(args) => cert::main(args),
        client_command => run_client(client_command),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Command};

    /// `--sort -seed` takes `-seed` as the value (a descending key), not as a flag.
    #[test]
    fn sort_keys_may_start_with_a_hyphen() {
        for args in [
            &["kiln", "query", "seed > 1", "--sort", "-seed"][..],
            &["kiln", "query", "seed > 1", "--sort=-seed"],
            &["kiln", "query", "--sort", "-seed", "seed > 1"],
        ] {
            let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            let Command::Query { sort, filter, .. } = cli.command else {
                panic!("{args:?}: not a query");
            };
            assert_eq!(
                (sort.as_deref(), filter.as_str()),
                (Some("-seed"), "seed > 1")
            );
        }
        let cli = Cli::try_parse_from(["kiln", "query", "--sort", "-cfg,seed"]).unwrap();
        assert!(matches!(cli.command, Command::Query { sort: Some(s), .. } if s == "-cfg,seed"));
    }

    /// `kiln star` takes one or more cells, and a rating of 0 to 5 only.
    #[test]
    fn star_takes_cells_and_a_bounded_rating() {
        let cli = Cli::try_parse_from(["kiln", "star", "3", "7", "--rating", "5"]).unwrap();
        let Command::Star {
            cells,
            unstar,
            rating,
            ..
        } = cli.command
        else {
            panic!("not a star");
        };
        assert_eq!((cells, unstar, rating), (vec![3, 7], false, Some(5)));
        let cli = Cli::try_parse_from(["kiln", "star", "--unstar", "3"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Star {
                unstar: true,
                rating: None,
                ..
            }
        ));
        for bad in [
            &["kiln", "star"][..],
            &["kiln", "star", "3", "--rating", "6"],
            &["kiln", "star", "x"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?} parsed");
        }
    }
}
