//! The model registry as the queue sees it: names checked once and pointed at uploaded
//! content (the client uploaded the file to the pool's model storage under its sha256 before
//! it registers it; workers verify the hash when they fetch it), listed, removed; and the pins
//! of a sweep: each registry reference its file makes looked up once, at submit, and kept with
//! the sweep ([`SweepSource::models`]) so its cells render exactly what was planned.

use std::collections::BTreeMap;

use kiln_proto::WorkerId;
use kiln_proto::picture::is_sha256_hex;

use super::Queue;
use super::holdings::MAX_CACHED_MODELS;
use super::pins::{MAX_MODEL_BYTES, MAX_MODELS, MAX_SWEEP_MODEL_REFS};
use crate::domain::rows::ModelRow;
use crate::domain::state::ModelKind;
use crate::sweep::{CellSpec, SweepSource, check_model_name, pin, referenced_models, sha256_ref};
use crate::{Error, Result};

impl Queue {
    /// Points registry name `name` at the uploaded file `sha256` of `bytes` bytes. Returns the
    /// entry and the hash the name pointed at before, if it existed (a re-point).
    pub async fn add_model(
        &self,
        name: &str,
        sha256: &str,
        bytes: u64,
        kind: ModelKind,
    ) -> Result<(ModelRow, Option<String>)> {
        check_model_name(name).map_err(|e| Error::invalid(format!("name: {e}")))?;
        if !is_sha256_hex(sha256) {
            return Err(Error::invalid("sha256: not 64 lowercase hex digits"));
        }
        if bytes == 0 || bytes > MAX_MODEL_BYTES {
            return Err(Error::invalid(format!(
                "size: {bytes} is outside 1..={MAX_MODEL_BYTES}"
            )));
        }
        if self.store.model_get(name).await?.is_none()
            && self.store.model_count().await? >= MAX_MODELS as u64
        {
            return Err(Error::TooLarge(format!(
                "the registry has {MAX_MODELS} names, its most; remove one first"
            )));
        }
        self.store
            .model_put(name, sha256, bytes, kind, self.now())
            .await
    }

    /// The registry, by name.
    pub async fn models(&self) -> Result<Vec<ModelRow>> {
        self.store.models_list(MAX_MODELS).await
    }

    /// Removes registry name `name`; returns the hash it pointed at. The stored file stays
    /// (cells pinned to it keep rendering).
    pub async fn remove_model(&self, name: &str) -> Result<String> {
        check_model_name(name).map_err(|e| Error::invalid(format!("name: {e}")))?;
        self.store
            .model_remove(name)
            .await?
            .ok_or_else(|| Error::ModelNotFound(name.to_string()))
    }

    /// Replaces what `worker` holds on disk (`LeaseRequest.cached_models`): at most
    /// [`MAX_CACHED_MODELS`] sha256s, each 64 lowercase hex digits.
    pub fn report_cached_models(&self, worker: WorkerId, cached: &[String]) -> Result<()> {
        if cached.len() > MAX_CACHED_MODELS {
            return Err(Error::TooLarge(format!(
                "cached_models: at most {MAX_CACHED_MODELS}"
            )));
        }
        if !cached.iter().all(|s| is_sha256_hex(s)) {
            return Err(Error::invalid(
                "cached_models: each must be 64 lowercase hex digits",
            ));
        }
        self.holdings.report(worker.0, cached);
        Ok(())
    }

    /// Fills `src.models` with the sweep file's registry references and their hashes:
    /// `kept`'s pins first (an extended sweep keeps what it was planned with), then the
    /// registry's names, and `sha256:HEX` of a registered file. An unknown `sha256:` is refused;
    /// any other unknown reference stays a worker-local file name. A file that does not parse
    /// is left to the planner, which says where.
    pub async fn pin_models(
        &self,
        src: &mut SweepSource,
        kept: &BTreeMap<String, String>,
    ) -> Result<()> {
        src.models.clear();
        let Ok(refs) = referenced_models(&src.path, &src.text) else {
            return Ok(());
        };
        if refs.len() > MAX_SWEEP_MODEL_REFS {
            return Err(too_many_refs());
        }
        for r in refs {
            let sha = match kept.get(&r) {
                Some(sha) => Some(sha.clone()),
                None => self.registry_ref(&r).await?,
            };
            if let Some(sha) = sha {
                src.models.insert(r, sha);
            }
        }
        Ok(())
    }

    /// Pins cells a client sent (not a sweep file): each reference looked up once per
    /// submission in `seen` (reference → its hash, `None`: a worker-local file), at most
    /// [`MAX_SWEEP_MODEL_REFS`] of them.
    pub async fn pin_cells(
        &self,
        specs: &mut [CellSpec],
        seen: &mut BTreeMap<String, Option<String>>,
    ) -> Result<()> {
        for spec in specs.iter_mut() {
            let new: Vec<String> = spec
                .model_refs()
                .filter(|r| !seen.contains_key(*r))
                .map(str::to_owned)
                .collect();
            for r in new {
                if seen.len() >= MAX_SWEEP_MODEL_REFS {
                    return Err(too_many_refs());
                }
                let sha = self.registry_ref(&r).await?;
                seen.insert(r, sha);
            }
            let found: BTreeMap<String, String> = spec
                .model_refs()
                .filter_map(|r| Some((r.to_owned(), seen.get(r)?.clone()?)))
                .collect();
            pin(spec, &found);
        }
        Ok(())
    }

    /// What registry reference `r` pins: a name's hash, a registered `sha256:`'s, `None` for a
    /// worker-local file. An unknown `sha256:` is refused.
    async fn registry_ref(&self, r: &str) -> Result<Option<String>> {
        if let Some(hex) = sha256_ref(r) {
            if !is_sha256_hex(&hex) {
                return Err(Error::invalid(format!(
                    "{r:?}: a sha256: reference needs 64 hex digits"
                )));
            }
            if self.store.model_blob(&hex).await?.is_none() {
                return Err(Error::ModelNotFound(format!("sha256:{hex}")));
            }
            return Ok(Some(hex));
        }
        if check_model_name(r).is_err() {
            return Ok(None);
        }
        Ok(self.store.model_get(r).await?.map(|m| m.sha256))
    }
}

fn too_many_refs() -> Error {
    Error::TooLarge(format!(
        "a sweep may name at most {MAX_SWEEP_MODEL_REFS} models, VAEs and LoRAs"
    ))
}
