//! Model references a user can paste, fetched to disk on demand: `hf:OWNER/REPO[@REV][/FILE]`
//! from a Hugging Face hub into its shared cache, and `https://…` files into kiln's own.
//!
//! Owns parsing and checking a reference ([`reference`]), choosing the files a reference needs
//! ([`select`]), the hub cache layout ([`layout`]), HTTP ([`fetch`]) and the offline rule: with
//! [`HubConfig::offline`] set, or when the hub cannot be reached, a reference whose snapshot
//! holds every needed file is used as it is, and any other is an error naming the reference.
//! Never knows about cells, gRPC or the engine; the agent's `resolve` and the CLI call it with a
//! reference and get a path (a file, or a diffusers folder).
//!
//! A cell comes from the network: `hf:` references go only to the configured endpoint, and a
//! URL only when the worker's owner allows it ([`HubConfig::allow_urls`], or the agent's
//! `AnyPath` policy). Every download is bounded in size ([`HubConfig::max_bytes`]).

pub mod fetch;
pub mod layout;
pub mod reference;
pub mod select;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use self::fetch::{Client, FetchError};
use self::layout::RepoCache;
pub use self::reference::{HubRef, Reference, is_reference};

/// The default download bound: 16 GiB (an SD1.5 fp32 checkpoint is about 4).
pub const DEFAULT_MAX_BYTES: u64 = 16 << 30;
/// How long a resolved reference is reused before its revision is asked for again.
const REMEMBER: Duration = Duration::from_secs(3600);

/// Where and how references are fetched. Built by the binary from flags and the environment
/// (`HF_ENDPOINT`, `HF_TOKEN`, `HF_HOME`, `HF_HUB_CACHE`, `KILN_OFFLINE`, `HF_HUB_OFFLINE`).
#[derive(Clone)]
pub struct HubConfig {
    /// The hub, e.g. `https://huggingface.co`.
    pub endpoint: String,
    /// Sent as `Authorization: Bearer` to the endpoint (gated and private repos).
    pub token: Option<String>,
    /// The hub cache (`$HF_HUB_CACHE`, or `$HF_HOME/hub`).
    pub hub_cache: PathBuf,
    /// kiln's cache; URL downloads go to `urls/` under it.
    pub kiln_cache: PathBuf,
    /// Use cached files only, never the network.
    pub offline: bool,
    /// Take `*.fp16.safetensors` variants first (devices computing in f16).
    pub prefer_f16: bool,
    /// Fetch `https://` references named by cells.
    pub allow_urls: bool,
    /// The largest file fetched, bytes.
    pub max_bytes: u64,
}

impl std::fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConfig")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("hub_cache", &self.hub_cache)
            .field("kiln_cache", &self.kiln_cache)
            .field("offline", &self.offline)
            .field("prefer_f16", &self.prefer_f16)
            .field("allow_urls", &self.allow_urls)
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

/// Why a reference gave no file.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The reference is malformed or not allowed here.
    #[error("{reference} refused: {reason}")]
    Refused {
        /// As written.
        reference: String,
        /// Why.
        reason: String,
    },
    /// Offline (or the hub unreachable) and the reference is not cached whole.
    #[error("{reference} is not cached{why}: fetch it once on a machine with network, or copy the cache folder {}", .cache.display())]
    NotCached {
        /// As written.
        reference: String,
        /// Why the network was not used.
        why: String,
        /// Where it was looked for.
        cache: PathBuf,
        /// Offline by this machine's settings (not only unreachable).
        offline: bool,
    },
    /// The repo is not a model kiln reads.
    #[error("{reference}: {reason}")]
    Repo {
        /// As written.
        reference: String,
        /// What is missing.
        reason: String,
    },
    /// Fetching failed.
    #[error("{reference}: {source}")]
    Fetch {
        /// As written.
        reference: String,
        /// The request's error.
        source: FetchError,
    },
}

/// Fetches references and remembers what they resolved to.
#[derive(Debug)]
pub struct Hub {
    config: HubConfig,
    /// (reference, prefer f16) → path, and when it was resolved.
    resolved: Mutex<HashMap<String, (PathBuf, Instant)>>,
    /// One fetch at a time, so two cells of one model do not download it twice.
    fetching: tokio::sync::Mutex<()>,
}

impl Hub {
    /// A hub client with `config`.
    pub fn new(config: HubConfig) -> Self {
        Self {
            config,
            resolved: Mutex::default(),
            fetching: tokio::sync::Mutex::const_new(()),
        }
    }

    /// Its settings.
    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    /// The local path of `reference`: a file, or a diffusers folder. Fetches what is missing
    /// (unless offline). `allow_urls` adds to [`HubConfig::allow_urls`] (the caller's owner
    /// submits every reference). Blocks: runs its own runtime on its own thread, so it may be
    /// called from anywhere, async code included (it tells Tokio it blocks).
    pub fn resolve_blocking(&self, reference: &str, allow_urls: bool) -> Result<PathBuf, HubError> {
        self.check(reference, allow_urls)?;
        if let Some(path) = self.remembered(reference) {
            return Ok(path);
        }
        let run = || {
            std::thread::scope(|s| {
                s.spawn(|| {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| HubError::Refused {
                            reference: reference.to_owned(),
                            reason: format!("no runtime: {e}"),
                        })?;
                    rt.block_on(self.resolve(reference, allow_urls))
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(HubError::Refused {
                        reference: reference.to_owned(),
                        reason: "the fetch panicked".into(),
                    })
                })
            })
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(run)
            }
            _ => run(),
        }
    }

    /// Where `reference` will be, without the network: its path when resolved within the
    /// last hour or (offline) cached; otherwise a placeholder path that names nothing on disk
    /// and that [`Hub::pending_reference`] maps back, for the agent to fetch just before the
    /// render ([`Hub::resolve_blocking`]) rather than while it plans a lease. Errors as
    /// [`Hub::resolve`] would give them without fetching (refused, offline and not cached).
    pub fn planned(&self, reference: &str, allow_urls: bool) -> Result<PathBuf, HubError> {
        let parsed = self.check(reference, allow_urls)?;
        if let Some(path) = self.remembered(reference) {
            return Ok(path);
        }
        if let (true, Reference::Hub(hub)) = (self.config.offline, &parsed) {
            let cache = RepoCache::new(&self.config.hub_cache, &hub.cache_folder());
            let why = " (offline: KILN_OFFLINE or HF_HUB_OFFLINE)";
            return self.cached(reference, hub, &cache, why);
        }
        // The reference itself, hex-encoded, names the placeholder: nothing to remember, so
        // however many references cells name, the hub holds no more for them.
        Ok(self.pending_dir().join(hex::encode(reference.as_bytes())))
    }

    /// The reference a placeholder path of [`Hub::planned`] stands for.
    pub fn pending_reference(&self, path: &std::path::Path) -> Option<String> {
        if path.parent()? != self.pending_dir() {
            return None;
        }
        let bytes = hex::decode(path.file_name()?.to_str()?).ok()?;
        String::from_utf8(bytes).ok().filter(|r| is_reference(r))
    }

    /// Where placeholder paths point: a folder nothing is written to.
    fn pending_dir(&self) -> PathBuf {
        self.config.kiln_cache.join("pending")
    }

    /// [`Hub::resolve_blocking`] for async callers (`kiln model add`).
    pub async fn resolve(&self, reference: &str, allow_urls: bool) -> Result<PathBuf, HubError> {
        let parsed = self.check(reference, allow_urls)?;
        if let Some(path) = self.remembered(reference) {
            return Ok(path);
        }
        let path = match parsed {
            Reference::Hub(hub) => self.hub(reference, &hub).await?,
            Reference::Url(url) => self.url(reference, &url).await?,
        };
        self.resolved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.memo_key(reference), (path.clone(), Instant::now()));
        Ok(path)
    }

    /// `reference` parsed, if it is well formed and allowed.
    fn check(&self, reference: &str, allow_urls: bool) -> Result<Reference, HubError> {
        let refused = |reason: String| HubError::Refused {
            reference: reference.to_owned(),
            reason,
        };
        let parsed = Reference::parse(reference).map_err(refused)?;
        if matches!(parsed, Reference::Url(_)) && !(allow_urls || self.config.allow_urls) {
            return Err(refused(
                "this worker does not fetch URLs named by cells (its owner allows it with \
                 --allow-url-models)"
                    .into(),
            ));
        }
        Ok(parsed)
    }

    fn memo_key(&self, reference: &str) -> String {
        format!("{}:{reference}", self.config.prefer_f16)
    }

    fn remembered(&self, reference: &str) -> Option<PathBuf> {
        let memo = self.resolved.lock().unwrap_or_else(|e| e.into_inner());
        let (path, at) = memo.get(&self.memo_key(reference))?;
        (at.elapsed() < REMEMBER && path.exists()).then(|| path.clone())
    }

    fn client(&self) -> Result<Client, FetchError> {
        Client::new(
            &self.config.endpoint,
            self.config.token.clone(),
            self.config.max_bytes,
        )
    }

    /// `hf:` references: the revision's commit and file list from the hub, then each needed
    /// file not in the snapshot yet; offline or unreachable, the cached snapshot.
    async fn hub(&self, reference: &str, hub: &HubRef) -> Result<PathBuf, HubError> {
        let cache = RepoCache::new(&self.config.hub_cache, &hub.cache_folder());
        let fetch_err = |source| HubError::Fetch {
            reference: reference.to_owned(),
            source,
        };
        if self.config.offline {
            return self.cached(
                reference,
                hub,
                &cache,
                " (offline: KILN_OFFLINE or HF_HUB_OFFLINE)",
            );
        }
        let client = self.client().map_err(fetch_err)?;
        let info = match client.repo_info(&hub.repo, &hub.revision).await {
            Ok(info) => info,
            Err(e) if e.is_unreachable() => {
                let why = format!(" and the hub cannot be reached ({e})");
                return self.cached(reference, hub, &cache, &why);
            }
            Err(e) => return Err(fetch_err(e)),
        };
        let commit = info.sha;
        if !reference::is_safe_name(&commit) {
            return Err(HubError::Repo {
                reference: reference.to_owned(),
                reason: format!("the hub named the commit {commit:?}"),
            });
        }
        let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
        let selection = select::select(&files, hub.file.as_deref(), self.config.prefer_f16)
            .map_err(|reason| HubError::Repo {
                reference: reference.to_owned(),
                reason,
            })?;
        let _one = self.fetching.lock().await;
        for file in &selection.files {
            if cache.snapshot_file(&commit, file).is_file() {
                continue;
            }
            tracing::info!(reference, file, "fetching");
            let blob_of = |meta: &fetch::FileMeta| {
                let blob = cache.blob(&meta.etag);
                (!blob.is_file()).then_some(blob)
            };
            let meta = client
                .hub_file(&hub.repo, &commit, file, blob_of)
                .await
                .map_err(fetch_err)?;
            if !reference::is_safe_name(&meta.etag) {
                return Err(HubError::Repo {
                    reference: reference.to_owned(),
                    reason: format!("the hub named the file {file} {:?}", meta.etag),
                });
            }
            cache.link(&commit, file, &meta.etag).map_err(|source| {
                fetch_err(FetchError::Io {
                    path: cache.snapshot_file(&commit, file),
                    source,
                })
            })?;
        }
        if let Err(source) = cache.write_ref(&hub.revision, &commit) {
            tracing::warn!(reference, error = %source, "revision not recorded in the cache");
        }
        Ok(entry(&cache, &commit, &selection))
    }

    /// The cached snapshot of `hub`, when it holds every file the reference needs.
    fn cached(
        &self,
        reference: &str,
        hub: &HubRef,
        cache: &RepoCache,
        why: &str,
    ) -> Result<PathBuf, HubError> {
        let not_cached = || HubError::NotCached {
            reference: reference.to_owned(),
            why: why.to_owned(),
            cache: self.config.hub_cache.join(hub.cache_folder()),
            offline: self.config.offline,
        };
        let commit = cache.commit_of(&hub.revision).ok_or_else(not_cached)?;
        let files = cache.snapshot_files(&commit);
        let selection = select::select(&files, hub.file.as_deref(), self.config.prefer_f16)
            .map_err(|_| not_cached())?;
        Ok(entry(cache, &commit, &selection))
    }

    /// `https://` references: `urls/<sha256 of the URL>/<its file name>` in kiln's cache.
    async fn url(&self, reference: &str, url: &str) -> Result<PathBuf, HubError> {
        let folder = self
            .config
            .kiln_cache
            .join("urls")
            .join(hex::encode(Sha256::digest(url.as_bytes())));
        let dest = folder.join(url_file_name(url));
        if dest.is_file() {
            return Ok(dest);
        }
        if self.config.offline {
            return Err(HubError::NotCached {
                reference: reference.to_owned(),
                why: " (offline: KILN_OFFLINE or HF_HUB_OFFLINE)".into(),
                cache: folder,
                offline: true,
            });
        }
        let fetch_err = |source| HubError::Fetch {
            reference: reference.to_owned(),
            source,
        };
        let _one = self.fetching.lock().await;
        tracing::info!(reference, "fetching");
        let client = self.client().map_err(fetch_err)?;
        match client.url_file(url, &dest).await {
            Ok(()) => Ok(dest),
            Err(e) if e.is_unreachable() => Err(HubError::NotCached {
                reference: reference.to_owned(),
                why: format!(" and it cannot be reached ({e})"),
                cache: folder,
                offline: false,
            }),
            Err(e) => Err(fetch_err(e)),
        }
    }
}

impl HubError {
    /// Whether trying again later may work: the hub or URL unreachable, a broken transfer,
    /// or the server busy or failing (HTTP 408, 429, 5xx).
    pub fn is_transient(&self) -> bool {
        match self {
            HubError::NotCached { offline, .. } => !offline,
            HubError::Fetch { source, .. } => match source {
                FetchError::Network { .. } => true,
                FetchError::Status { status, .. } => {
                    status.is_server_error() || matches!(status.as_u16(), 408 | 429)
                }
                _ => false,
            },
            _ => false,
        }
    }

    /// Whether this machine, not the reference, is at fault: its offline setting, or its disk.
    pub fn is_local(&self) -> bool {
        match self {
            HubError::NotCached { offline, .. } => *offline,
            HubError::Fetch { source, .. } => matches!(source, FetchError::Io { .. }),
            _ => false,
        }
    }
}

/// The selection's model path in the snapshot of `commit`.
fn entry(cache: &RepoCache, commit: &str, selection: &select::Selection) -> PathBuf {
    match &selection.entry {
        Some(file) => cache.snapshot_file(commit, file),
        None => cache.snapshot(commit),
    }
}

/// The URL's last path segment when it is a safe file name, else `model.safetensors`.
fn url_file_name(url: &str) -> String {
    let name = reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.path_segments()?.next_back().map(str::to_owned))
        .unwrap_or_default();
    if reference::is_safe_name(&name) {
        name
    } else {
        "model.safetensors".into()
    }
}

/// The hub client of this process, installed once by the binary ([`install`]).
static INSTALLED: OnceLock<Hub> = OnceLock::new();

/// Makes `hub` the one [`resolve`] uses; a second install is ignored.
pub fn install(hub: Hub) {
    let _ = INSTALLED.set(hub);
}

/// The installed hub client, if any.
pub fn installed() -> Option<&'static Hub> {
    INSTALLED.get()
}

/// [`Hub::planned`] through the installed hub client, as the agent plans a lease: a path, or
/// an error saying what is wrong and naming `what`.
pub fn planned(reference: &str, what: &str, allow_urls: bool) -> Result<PathBuf, String> {
    let hub = installed().ok_or_else(|| {
        format!("{what} {reference}: hf: and URL references are not enabled in this process")
    })?;
    hub.planned(reference, allow_urls)
        .map_err(|e| format!("{what} {e}"))
}

/// `reference` (an `hf:` or `https://` reference) through the installed hub client, as the
/// agent's `resolve` needs it: a path, or an error saying what is wrong and naming `what`.
pub fn resolve(reference: &str, what: &str, allow_urls: bool) -> Result<PathBuf, String> {
    let hub = installed().ok_or_else(|| {
        format!("{what} {reference}: hf: and URL references are not enabled in this process")
    })?;
    hub.resolve_blocking(reference, allow_urls)
        .map_err(|e| format!("{what} {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_placeholder_names_its_reference_and_nothing_else() {
        let hub = Hub::new(HubConfig {
            endpoint: "http://127.0.0.1:9".into(),
            token: None,
            hub_cache: "/nonexistent/hub".into(),
            kiln_cache: "/nonexistent/kiln".into(),
            offline: false,
            prefer_f16: false,
            allow_urls: false,
            max_bytes: DEFAULT_MAX_BYTES,
        });
        let reference = "hf:owner/repo@main/model.safetensors";
        let planned = hub.planned(reference, false).unwrap();
        assert!(!planned.exists());
        assert_eq!(hub.pending_reference(&planned).as_deref(), Some(reference));
        let elsewhere = PathBuf::from("/models").join(planned.file_name().unwrap());
        assert_eq!(hub.pending_reference(&elsewhere), None);
        assert_eq!(hub.pending_reference(&planned.with_file_name("zz")), None);
        assert!(
            hub.planned("https://example.com/a.safetensors", false)
                .is_err()
        );
    }
}
