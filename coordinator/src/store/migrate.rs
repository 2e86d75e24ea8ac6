//! Applies `migrations/{sqlite,postgres}/*.sql` (embedded at build time) in version order,
//! once each, recording them in `kiln_migrations`. Each migration runs in its own transaction;
//! on Postgres an advisory lock keeps two coordinators starting together from racing.

use sqlx::{Postgres, Sqlite, Transaction};

use crate::{Error, Result};

/// One schema change.
pub(super) struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

pub(super) const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../../../migrations/sqlite/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "query_indexes",
        sql: include_str!("../../../migrations/sqlite/0002_query_indexes.sql"),
    },
    Migration {
        version: 3,
        name: "intake",
        sql: include_str!("../../../migrations/sqlite/0003_intake.sql"),
    },
];

pub(super) const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../../../migrations/postgres/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "query_indexes",
        sql: include_str!("../../../migrations/postgres/0002_query_indexes.sql"),
    },
    Migration {
        version: 3,
        name: "intake",
        sql: include_str!("../../../migrations/postgres/0003_intake.sql"),
    },
];

const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS kiln_migrations (
    version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)";

/// Applies pending SQLite migrations.
pub(super) async fn sqlite(pool: &sqlx::SqlitePool, now_ms: i64) -> Result<()> {
    sqlx::raw_sql(CREATE_TABLE).execute(pool).await?;
    for m in SQLITE {
        let mut tx: Transaction<'_, Sqlite> = pool.begin().await?;
        let done: Option<i64> =
            sqlx::query_scalar("SELECT version FROM kiln_migrations WHERE version = ?")
                .bind(m.version)
                .fetch_optional(&mut *tx)
                .await?;
        if done.is_some() {
            continue;
        }
        sqlx::raw_sql(m.sql)
            .execute(&mut *tx)
            .await
            .map_err(|e| Error::Config(format!("migration {} {}: {e}", m.version, m.name)))?;
        sqlx::query("INSERT INTO kiln_migrations (version, name, applied_at) VALUES (?, ?, ?)")
            .bind(m.version)
            .bind(m.name)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(
            version = m.version,
            name = m.name,
            "applied sqlite migration"
        );
    }
    Ok(())
}

/// Applies pending Postgres migrations under an advisory lock.
pub(super) async fn postgres(pool: &sqlx::PgPool, now_ms: i64) -> Result<()> {
    let mut tx: Transaction<'_, Postgres> = pool.begin().await?;
    // Arbitrary constant: "kiln" in ASCII.
    sqlx::query("SELECT pg_advisory_xact_lock(1801677934)")
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(CREATE_TABLE).execute(&mut *tx).await?;
    for m in POSTGRES {
        let done: Option<i64> =
            sqlx::query_scalar("SELECT version FROM kiln_migrations WHERE version = $1")
                .bind(m.version)
                .fetch_optional(&mut *tx)
                .await?;
        if done.is_some() {
            continue;
        }
        sqlx::raw_sql(m.sql)
            .execute(&mut *tx)
            .await
            .map_err(|e| Error::Config(format!("migration {} {}: {e}", m.version, m.name)))?;
        sqlx::query("INSERT INTO kiln_migrations (version, name, applied_at) VALUES ($1, $2, $3)")
            .bind(m.version)
            .bind(m.name)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        tracing::info!(
            version = m.version,
            name = m.name,
            "applied postgres migration"
        );
    }
    tx.commit().await?;
    Ok(())
}
