//! Applies `migrations/{sqlite,postgres}/*.sql` (embedded at build time) in version order,
//! once each, recording them in `kiln_migrations`, all in one transaction; on Postgres an
//! advisory lock keeps two coordinators starting together from racing.

use super::db::{Db, Stmt};
use crate::{Error, Result};

/// One schema change.
struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

/// The migrations of `migrations/$dir/`, in version order.
macro_rules! migrations {
    ($dir:literal: $($version:literal $name:literal $file:literal),+ $(,)?) => {
        &[$(Migration {
            version: $version,
            name: $name,
            sql: include_str!(concat!("../../../migrations/", $dir, "/", $file)),
        }),+]
    };
}

const SQLITE: &[Migration] = migrations!("sqlite":
    1 "init" "0001_init.sql",
    2 "query_indexes" "0002_query_indexes.sql",
    3 "intake" "0003_intake.sql",
    4 "auth" "0004_auth.sql",
    5 "keepers" "0005_keepers.sql",
    6 "render_level" "0006_render_level.sql",
    7 "hires" "0007_hires.sql",
    8 "images" "0008_images.sql",
    9 "models" "0009_models.sql",
);

const POSTGRES: &[Migration] = migrations!("postgres":
    1 "init" "0001_init.sql",
    2 "query_indexes" "0002_query_indexes.sql",
    3 "intake" "0003_intake.sql",
    4 "auth" "0004_auth.sql",
    5 "keepers" "0005_keepers.sql",
    6 "render_level" "0006_render_level.sql",
    7 "hires" "0007_hires.sql",
    8 "images" "0008_images.sql",
    9 "models" "0009_models.sql",
);

const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS kiln_migrations (
    version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)";

/// Applies pending migrations, in one transaction (on Postgres under an advisory lock).
pub(super) async fn apply(db: &Db, now_ms: i64) -> Result<()> {
    let (backend, migrations) = match db {
        Db::Sqlite { .. } => ("sqlite", SQLITE),
        Db::Postgres(_) => ("postgres", POSTGRES),
    };
    let mut tx = db.begin().await?;
    if let Db::Postgres(_) = db {
        // Arbitrary constant: "kiln" in ASCII.
        tx.raw("SELECT pg_advisory_xact_lock(1801677934)").await?;
    }
    tx.raw(CREATE_TABLE).await?;
    for m in migrations {
        let done = Stmt::new("SELECT version FROM kiln_migrations WHERE version = $1")
            .bind(m.version)
            .fetch_optional(tx.on())
            .await?;
        if done.is_some() {
            continue;
        }
        tx.raw(m.sql)
            .await
            .map_err(|e| Error::Config(format!("migration {} {}: {e}", m.version, m.name)))?;
        Stmt::new("INSERT INTO kiln_migrations (version, name, applied_at) VALUES ($1, $2, $3)")
            .bind(m.version)
            .bind(m.name)
            .bind(now_ms)
            .execute(tx.on())
            .await?;
        tracing::info!(
            backend,
            version = m.version,
            name = m.name,
            "applied migration"
        );
    }
    tx.commit().await
}
