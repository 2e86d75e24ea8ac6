//! Tokens: made, listed and revoked by `kiln token` (on the database directly), and looked up by
//! the hash of a request's secret on every call.

use super::Store;
use super::db::{Row, Stmt};
use crate::clock::Millis;
use crate::domain::auth::TokenRow;
use crate::domain::state::Scope;
use crate::{Error, Result};

const TOKEN_COLUMNS: &str = "id, name, owner, scope, created_at, revoked_at";

fn token(r: &Row) -> Result<TokenRow> {
    Ok(TokenRow {
        id: r.int("id")?,
        name: r.text("name")?,
        owner: r.text("owner")?,
        scope: r.text("scope")?.parse()?,
        created_at: r.int("created_at")?,
        revoked_at: r.opt_int("revoked_at")?,
    })
}

impl Store {
    /// Stores a token by the hash of its secret. Returns its id.
    pub async fn token_insert(
        &self,
        name: &str,
        owner: &str,
        scope: Scope,
        hash: &str,
        now: Millis,
    ) -> Result<i64> {
        Stmt::new(
            "INSERT INTO tokens (name, owner, scope, hash, created_at) \
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(name)
        .bind(owner)
        .bind(scope.as_str())
        .bind(hash)
        .bind(now.0)
        .fetch_one(self.db.writer())
        .await?
        .int(0)
    }

    /// Every token, oldest first.
    pub async fn token_list(&self) -> Result<Vec<TokenRow>> {
        let rows = Stmt::new(format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY id"))
            .fetch_all(self.db.reader())
            .await?;
        rows.iter().map(token).collect()
    }

    /// Revokes a token; its next call is refused. Revoking twice keeps the first time.
    pub async fn token_revoke(&self, id: i64, now: Millis) -> Result<()> {
        let n = Stmt::new("UPDATE tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2")
            .bind(now.0)
            .bind(id)
            .execute(self.db.writer())
            .await?;
        if n == 0 {
            return Err(Error::invalid(format!("no token with id {id}")));
        }
        Ok(())
    }

    /// The live (not revoked) token with this secret hash.
    pub async fn token_find(&self, hash: &str) -> Result<Option<TokenRow>> {
        let row = Stmt::new(format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = $1 AND revoked_at IS NULL"
        ))
        .bind(hash)
        .fetch_optional(self.db.reader())
        .await?;
        row.as_ref().map(token).transpose()
    }
}
