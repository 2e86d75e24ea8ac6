//! `kiln`: the command line of the kiln render farm.
//!
//! Subcommands:
//! - `kiln coordinator`: the gRPC coordinator (SQLite by default, Postgres for scale).
//! - `kiln render`: one local image from a model folder.
//!
//! Configuration flows defaults → `--config FILE` (TOML) → `KILN_*` environment → flags, and is
//! validated once before anything starts.

mod coordinator;
mod render;

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
    /// Render one image locally from a model folder (no coordinator).
    #[command(after_help = render::EXAMPLES)]
    Render(render::Args),
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
        Command::Render(args) => render::main(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
