//! `hf:` and `https://` references fetched just before the render, not while a lease is
//! planned: planning gives such a reference a placeholder path ([`crate::hub::Hub::planned`])
//! so that it never waits on the network while leases run out; here, with the cells' other
//! pre-render work ([`super::pinned`]), each placeholder in a pipeline key is fetched (or
//! found in the hub cache) and replaced by the real path. The fetch shows as the attempts'
//! activity and counts as load time; its failures are classed as a retry would see them.

use std::path::PathBuf;

use tokio::sync::watch;

use super::pinned::FetchFailure;
use crate::cache::PipelineKey;
use crate::hub;

/// How many paths of `key` stand for references still to fetch.
pub fn pending(key: &PipelineKey) -> usize {
    let Some(hub) = hub::installed() else {
        return 0;
    };
    slots(key)
        .filter(|p| hub.pending_reference(p).is_some())
        .count()
}

/// Fetches every placeholder of `key` and puts the real path in its place, telling
/// `activity`. `allow_urls`: the worker's owner submits every cell (`kiln run`).
pub async fn fetch(
    key: &mut PipelineKey,
    allow_urls: bool,
    activity: &watch::Sender<String>,
) -> Result<(), FetchFailure> {
    let Some(hub) = hub::installed() else {
        return Ok(());
    };
    let slots: Vec<&mut PathBuf> = std::iter::once(&mut key.model)
        .chain(key.vae.as_mut())
        .chain(key.loras.iter_mut().map(|l| &mut l.path))
        .collect();
    for slot in slots {
        let Some(reference) = hub.pending_reference(slot) else {
            continue;
        };
        let mut text = format!("fetching {reference}");
        text.truncate(text.floor_char_boundary(128));
        activity.send_replace(text);
        let r = reference.clone();
        let got = tokio::task::spawn_blocking(move || hub.resolve_blocking(&r, allow_urls))
            .await
            .map_err(|e| FetchFailure::Resource(format!("fetching {reference}: {e}")))?;
        *slot = got.map_err(|e| {
            if e.is_transient() {
                FetchFailure::Transient(e.to_string())
            } else if e.is_local() {
                FetchFailure::Resource(e.to_string())
            } else {
                FetchFailure::BadInput(e.to_string())
            }
        })?;
    }
    activity.send_replace(String::new());
    Ok(())
}

fn slots(key: &PipelineKey) -> impl Iterator<Item = &PathBuf> {
    std::iter::once(&key.model)
        .chain(key.vae.as_ref())
        .chain(key.loras.iter().map(|l| &l.path))
}
