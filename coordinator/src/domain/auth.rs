//! Who is calling: the [`Principal`] a request's token resolves to (or the open principal of a
//! coordinator that runs without tokens), what its [`Scope`] allows, and whose sweeps it may
//! see. Tokens themselves ([`TokenRow`]) are stored hashed; a [`Secret`] is made here.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::domain::state::Scope;
use crate::{Error, Result};

/// The caller of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The token's owner; `None` on a coordinator without tokens (everyone is everything).
    pub owner: Option<String>,
    /// What it may do.
    pub scope: Scope,
}

impl Principal {
    /// The caller of a coordinator that requires no tokens: any scope, every sweep.
    pub fn open() -> Self {
        Principal {
            owner: None,
            scope: Scope::Admin,
        }
    }

    /// A token's caller.
    pub fn token(owner: String, scope: Scope) -> Self {
        Principal {
            owner: Some(owner),
            scope,
        }
    }

    /// Whether this caller is open (no tokens required).
    fn is_open(&self) -> bool {
        self.owner.is_none()
    }

    /// Refuses (PERMISSION_DENIED) a caller whose scope does not cover `needed`.
    pub fn require(&self, needed: Scope) -> Result<()> {
        let ok = self.is_open()
            || match needed {
                Scope::Worker => self.scope == Scope::Worker,
                Scope::Read => matches!(self.scope, Scope::Read | Scope::Submit | Scope::Admin),
                Scope::Submit => matches!(self.scope, Scope::Submit | Scope::Admin),
                Scope::Admin => self.scope == Scope::Admin,
            };
        if ok {
            Ok(())
        } else {
            Err(Error::PermissionDenied(format!(
                "a {} token cannot do this (needs {needed})",
                self.scope
            )))
        }
    }

    /// The owner whose sweeps this caller is limited to: `None` for an admin (or an open
    /// coordinator), who sees every sweep.
    pub fn only_owner(&self) -> Option<&str> {
        match self.scope {
            Scope::Admin => None,
            _ => self.owner.as_deref(),
        }
    }

    /// Refuses (PERMISSION_DENIED) a sweep of another owner.
    pub fn may_see(&self, sweep_owner: Option<&str>) -> Result<()> {
        match self.only_owner() {
            Some(me) if sweep_owner != Some(me) => Err(Error::PermissionDenied(
                "this sweep belongs to another owner".into(),
            )),
            _ => Ok(()),
        }
    }
}

/// A stored token (its secret is not kept: only its hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRow {
    /// Id (`kiln token revoke ID`).
    pub id: i64,
    /// What it is for.
    pub name: String,
    /// Who it acts for.
    pub owner: String,
    /// What it may do.
    pub scope: Scope,
    /// Made, unix ms.
    pub created_at: i64,
    /// Revoked, unix ms.
    pub revoked_at: Option<i64>,
}

/// A secret handed out once (a token, a worker session): 32 random bytes, shown as
/// `kiln_` + 64 hex digits. Only its [`Secret::hash`] is stored.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A fresh random secret.
    pub fn generate() -> Self {
        let bytes: [u8; 32] = rand::random();
        Secret(format!("kiln_{}", hex::encode(bytes)))
    }

    /// The secret as given by a caller.
    pub fn from_given(s: &str) -> Self {
        Secret(s.trim().to_string())
    }

    /// What is stored and looked up: sha256 of the secret, hex.
    pub fn hash(&self) -> String {
        hex::encode(Sha256::digest(self.0.as_bytes()))
    }

    /// The secret itself, to hand out once.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    // Never print a secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_nest_for_sweeps_and_workers_stand_apart() {
        let p = |s| Principal::token("alice".into(), s);
        assert!(p(Scope::Read).require(Scope::Read).is_ok());
        assert!(p(Scope::Read).require(Scope::Submit).is_err());
        assert!(p(Scope::Submit).require(Scope::Read).is_ok());
        assert!(p(Scope::Admin).require(Scope::Submit).is_ok());
        assert!(p(Scope::Admin).require(Scope::Worker).is_err());
        assert!(p(Scope::Worker).require(Scope::Read).is_err());
        assert!(p(Scope::Worker).require(Scope::Worker).is_ok());
        assert!(Principal::open().require(Scope::Worker).is_ok());
    }

    #[test]
    fn non_admins_see_only_their_owners_sweeps() {
        let alice = Principal::token("alice".into(), Scope::Submit);
        assert!(alice.may_see(Some("alice")).is_ok());
        assert!(alice.may_see(Some("bob")).is_err());
        assert!(alice.may_see(None).is_err());
        let admin = Principal::token("root".into(), Scope::Admin);
        assert!(admin.may_see(Some("bob")).is_ok());
        assert!(Principal::open().may_see(Some("bob")).is_ok());
    }

    #[test]
    fn secrets_are_random_and_stored_as_their_hash() {
        let (a, b) = (Secret::generate(), Secret::generate());
        assert_ne!(a, b);
        assert!(a.expose().starts_with("kiln_") && a.expose().len() == 69);
        assert_eq!(
            a.hash(),
            Secret::from_given(&format!(" {} ", a.expose())).hash()
        );
        assert_ne!(a.hash(), b.hash());
        assert_eq!(format!("{a:?}"), "Secret(…)");
    }
}
