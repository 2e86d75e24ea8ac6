//! `kiln`: the command line of the kiln render farm.
//!
//! Subcommands:
//! - `kiln coordinator`: the gRPC coordinator (SQLite by default, Postgres for scale).
//! - `kiln worker`: a render worker (one per PC).
//! - `kiln sweeps | status | watch | cancel | pause | resume | retry | workers`: talk to a
//!   coordinator (`--coordinator URL` or `KILN_COORDINATOR`).
//!
//! Configuration flows defaults → `--config FILE` (TOML) → `KILN_*` environment → flags, and is
//! validated once before anything starts.

mod client;
mod coordinator;
mod signal;
mod sweeps;
mod table;
mod worker;

use clap::{Parser, Subcommand};

/// The kiln render farm: Stable Diffusion 1.5 + LCM-LoRA sweeps across your PCs.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, long_about = None)]
struct Cli {
    /// Log filter, e.g. `info` or `kiln_coordinator=debug` (or RUST_LOG).
    #[arg(long, global = true, env = "KILN_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the coordinator: stores sweeps and leases cells to workers over gRPC.
    #[command(after_help = coordinator::EXAMPLES)]
    Coordinator(coordinator::Args),
    /// Run a render worker: leases cells, renders them, uploads the PNGs.
    #[command(after_help = worker::EXAMPLES)]
    Worker(worker::Args),
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
        /// Sweep id.
        sweep: Option<u64>,
    },
    /// Live progress bars until the sweep (or every unfinished sweep) finishes.
    #[command(
        after_help = "Examples:\n  kiln watch\n  kiln watch 12 --coordinator http://192.168.1.10:7450"
    )]
    Watch {
        #[command(flatten)]
        conn: client::Conn,
        /// Sweep id.
        sweep: Option<u64>,
    },
    /// Cancel a sweep: queued cells now, running ones at their next heartbeat.
    #[command(after_help = "Example:\n  kiln cancel 12")]
    Cancel {
        #[command(flatten)]
        conn: client::Conn,
        /// Sweep id.
        sweep: u64,
    },
    /// Pause a sweep: hold its queued cells; running ones finish.
    #[command(after_help = "Example:\n  kiln pause 12")]
    Pause {
        #[command(flatten)]
        conn: client::Conn,
        /// Sweep id.
        sweep: u64,
    },
    /// Resume a paused sweep.
    #[command(after_help = "Example:\n  kiln resume 12")]
    Resume {
        #[command(flatten)]
        conn: client::Conn,
        /// Sweep id.
        sweep: u64,
    },
    /// Queue a sweep's failed cells again with a fresh set of attempts.
    #[command(after_help = "Example:\n  kiln retry --failed 12")]
    Retry {
        #[command(flatten)]
        conn: client::Conn,
        /// Retry the failed (discarded) cells; required, so the intent is explicit.
        #[arg(long, required = true)]
        failed: bool,
        /// Sweep id.
        sweep: u64,
    },
    /// Connected workers: device, state, current task, images/s.
    #[command(after_help = "Example:\n  kiln workers")]
    Workers {
        #[command(flatten)]
        conn: client::Conn,
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
            Command::Status { conn, sweep } => sweeps::status(&conn, sweep).await,
            Command::Watch { conn, sweep } => sweeps::watch(&conn, sweep).await,
            Command::Cancel { conn, sweep } => {
                sweeps::change(&conn, sweep, sweeps::Change::Cancel).await
            }
            Command::Pause { conn, sweep } => {
                sweeps::change(&conn, sweep, sweeps::Change::Pause).await
            }
            Command::Resume { conn, sweep } => {
                sweeps::change(&conn, sweep, sweeps::Change::Resume).await
            }
            Command::Retry { conn, sweep, .. } => {
                sweeps::change(&conn, sweep, sweeps::Change::RetryFailed).await
            }
            Command::Workers { conn } => sweeps::workers(&conn).await,
            Command::Coordinator(_) | Command::Worker(_) => {
                unreachable!("long-running commands are dispatched in main")
            }
        }
    })
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| cli.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Coordinator(args) => coordinator::main(args),
        Command::Worker(args) => worker::main(args),
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
