//! Who is calling the queue: tokens resolved to a [`Principal`], and workers held to the session
//! credential they got at registration, and to the storage they registered with.

use std::collections::HashMap;

use kiln_proto::WorkerId;

use super::{Queue, WorkerCredentials};
use crate::domain::auth::{Principal, Secret};
use crate::domain::rows::WorkerRegistration;
use crate::result::RenderResult;
use crate::sweep::cell::check_text;
use crate::{Error, Result};

impl Queue {
    /// The caller a token secret names: its owner and scope, or UNAUTHENTICATED when no live
    /// token has it (unknown and revoked look the same). Looked up on every call, so a
    /// revoked token is refused at its next one.
    pub async fn principal(&self, secret: &str) -> Result<Principal> {
        let token = self
            .store
            .token_find(&Secret::from_given(secret).hash())
            .await?
            .ok_or_else(|| Error::Unauthenticated("unknown or revoked token".into()))?;
        Ok(Principal::token(token.owner, token.scope))
    }

    /// Registers a worker. Returns its id and the session credential every later call of it
    /// must carry (only its hash is stored).
    pub async fn register(&self, r: &WorkerRegistration) -> Result<(WorkerId, Secret)> {
        validate_registration(r)?;
        let session = Secret::generate();
        let hash = session.hash();
        let id = self.store.worker_register(r, &hash, self.now()).await?;
        self.credentials_lock().insert(
            id,
            WorkerCredentials {
                session_hash: Some(hash),
                storage: r.storage.clone(),
            },
        );
        Ok((id, session))
    }

    /// Refuses (UNAUTHENTICATED) a worker call without this worker's session credential, so no
    /// one can lease, report or release as another worker. An unknown worker is NOT_FOUND (it
    /// registers again).
    pub async fn authenticate_worker(&self, worker: WorkerId, session: Option<&str>) -> Result<()> {
        let creds = self.worker_credentials(worker).await?;
        let given = session.map(|s| Secret::from_given(s).hash());
        match (&creds.session_hash, given) {
            (Some(want), Some(got)) if *want == got => Ok(()),
            _ => Err(Error::Unauthenticated(
                "worker session missing or not this worker's; register again".into(),
            )),
        }
    }

    /// Refuses (INVALID_ARGUMENT) a result that names another storage than the one its worker
    /// registered with, or an object key outside `sweeps/`, so a result row can never point a
    /// reader (`kiln fetch`, the gallery) at anything else.
    pub async fn check_result(&self, worker: WorkerId, result: &RenderResult) -> Result<()> {
        let creds = self.worker_credentials(worker).await?;
        if result.storage != creds.storage {
            return Err(Error::invalid(
                "result.storage: not the storage this worker registered with",
            ));
        }
        let key = &result.object_key;
        let safe = key.starts_with("sweeps/")
            && key.ends_with(".png")
            && key
                .split('/')
                .all(|p| !p.is_empty() && p != "." && p != "..")
            && !key.contains('\\');
        if !safe {
            return Err(Error::invalid(
                "result.object_key: must be sweeps/SWEEP/CELL/ATTEMPT.png",
            ));
        }
        Ok(())
    }

    async fn worker_credentials(&self, worker: WorkerId) -> Result<WorkerCredentials> {
        if let Some(c) = self.credentials_lock().get(&worker) {
            return Ok(c.clone());
        }
        let (session_hash, storage) = self.store.worker_credentials(worker).await?;
        let c = WorkerCredentials {
            session_hash,
            storage,
        };
        self.credentials_lock().insert(worker, c.clone());
        Ok(c)
    }

    fn credentials_lock(&self) -> std::sync::MutexGuard<'_, HashMap<WorkerId, WorkerCredentials>> {
        // A poisoned cache is still a valid cache: entries are replaced whole.
        self.credentials.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn validate_registration(r: &WorkerRegistration) -> Result<()> {
    if r.name.trim().is_empty() || r.name.len() > 200 {
        return Err(Error::invalid("info.name: must be 1..=200 bytes"));
    }
    check_text("info.name", &r.name)?;
    check_text("info.device_model", &r.device_model)?;
    check_text("info.version", &r.version)?;
    for k in &r.loaded {
        check_text("info.loaded", k)?;
    }
    check_text("info.storage", &r.storage)?;
    if r.device_model.len() > 200 || r.version.len() > 100 || r.storage.len() > 1024 {
        return Err(Error::invalid(
            "info: device_model, version or storage too long",
        ));
    }
    if r.memory_mib < 0 || r.max_pixels < 0 {
        return Err(Error::invalid(
            "info: memory_mib and max_pixels must be >= 0",
        ));
    }
    if r.loaded.len() > 256 || r.loaded.iter().any(|k| k.len() > 128) {
        return Err(Error::invalid("info.loaded: at most 256 keys of 128 bytes"));
    }
    Ok(())
}
