//! `kiln token create|list|revoke`: tokens for a coordinator that requires them
//! (`--require-tokens`). They are written to the coordinator's database directly (the same
//! `--db` / `--config` as `kiln coordinator`), so making the first admin token needs access to
//! the database, not a token. A token's secret is printed once; only its hash is stored.

use std::path::PathBuf;

use anyhow::Context;
use kiln_coordinator::clock::{Clock, SystemClock};
use kiln_coordinator::config::Settings;
use kiln_coordinator::domain::auth::Secret;
use kiln_coordinator::domain::state::Scope;
use kiln_coordinator::store::Store;

pub const EXAMPLES: &str = "Examples:
  kiln token create --owner alice --scope submit --name laptop
  kiln token create --owner farm --scope worker --name gaming-pc-2
  kiln token list --db postgres://kiln@db.lan/kiln
  kiln token revoke 3
Scopes: read (see the owner's sweeps and results), submit (and submit, cancel, pause...),
admin (everything, every owner), worker (run `kiln worker`).";

/// Where the coordinator's database is (as for `kiln coordinator`).
#[derive(Debug, clap::Args)]
pub struct Db {
    /// The coordinator's config file (its `db` key).
    #[arg(long, global = true, env = "KILN_CONFIG")]
    config: Option<PathBuf>,
    /// The coordinator's database [default: sqlite://kiln.db].
    #[arg(long, global = true, env = "KILN_DB")]
    db: Option<String>,
}

/// What to do.
#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Make a token and print its secret (once).
    Create {
        /// Who it acts for: the owner of the sweeps it submits and sees.
        #[arg(long)]
        owner: String,
        /// read, submit, admin or worker.
        #[arg(long)]
        scope: String,
        /// What it is for, shown by `kiln token list`.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token by id: its next call is refused.
    Revoke {
        /// Token id (`kiln token list`).
        id: i64,
    },
}

pub fn main(db: Db, action: Action) -> anyhow::Result<()> {
    let file = crate::coordinator::file_settings(db.config.as_ref())?;
    let settings = file.merge(Settings {
        db: db.db,
        ..Default::default()
    });
    let url = settings
        .db
        .as_deref()
        .unwrap_or(kiln_coordinator::config::DEFAULT_DB)
        .parse()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let store = Store::connect(&url, &Default::default())
            .await
            .context("opening the coordinator's database")?;
        let now = SystemClock.now();
        let out = match action {
            Action::Create { owner, scope, name } => {
                let scope: Scope = scope.parse().map_err(|_| {
                    anyhow::anyhow!("--scope {scope:?}: one of read, submit, admin, worker")
                })?;
                anyhow::ensure!(
                    !owner.trim().is_empty() && owner.len() <= 200,
                    "--owner: 1..=200 characters"
                );
                let secret = Secret::generate();
                let id = store
                    .token_insert(&name, owner.trim(), scope, &secret.hash(), now)
                    .await?;
                eprintln!(
                    "token {id} ({scope}, owner {}): shown only now:",
                    owner.trim()
                );
                println!("{}", secret.expose());
                Ok(())
            }
            Action::List => {
                println!(
                    "{:>4}  {:<8}  {:<16}  {:<9}  name",
                    "id", "scope", "owner", "state"
                );
                for t in store.token_list().await? {
                    let state = if t.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "live"
                    };
                    println!(
                        "{:>4}  {:<8}  {:<16}  {:<9}  {}",
                        t.id, t.scope, t.owner, state, t.name
                    );
                }
                Ok(())
            }
            Action::Revoke { id } => {
                store.token_revoke(id, now).await?;
                eprintln!("token {id} revoked");
                Ok(())
            }
        };
        store.close().await;
        out
    })
}
