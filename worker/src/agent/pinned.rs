//! Models pinned by content: a cell whose model, VAE or LoRA carries a sha256 renders with a
//! file of exactly that content. Such a reference is planned with the disk model cache's path
//! for it ([`planned_path`]), so alike cells batch and a cached file is prepared at once; just
//! before the render the agent makes the key true ([`Pinned::fetch`]): the `--models` file the
//! reference names when its sha256 (remembered, [`crate::cache::hashes`]) matches, else the
//! cache's file, downloaded from the model storage when this machine lacks it. A download
//! reports as the cell's activity and counts as its load time.
//!
//! "In use": a cached file is held (its shared lock, [`Blob`]) from the fetch until the render
//! that needed it finished, and after that for as long as a loaded pipeline refers to it. The
//! engine reads weights into memory when it loads, but rebuilding a pipeline (a new LoRA
//! strength) reads the LoRA and VAE files again, so the files of loaded pipelines stay.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kiln_proto::v1 as pb;
use tokio::sync::watch;

use super::link::Link;
use super::remote;
use super::resolve::{self, PathPolicy};
use crate::cache::PipelineKey;
use crate::cache::disk::{Blob, DiskCache, DiskError, is_sha256};
use crate::cache::hashes::{HashMemo, SharedMemo};
use crate::upload::Storage;

/// Most sha256s a lease call reports (LeaseRequest.cached_models).
const MAX_REPORTED: usize = 4096;

/// Settings of the disk model cache.
#[derive(Clone, Debug)]
pub struct ModelCacheConfig {
    /// Folder; `None`: [`DiskCache::default_dir`].
    pub dir: Option<PathBuf>,
    /// Bytes of complete files kept at most.
    pub budget_bytes: u64,
    /// Where models are fetched from; `None`: the storage images go to.
    pub storage: Option<Storage>,
}

impl Default for ModelCacheConfig {
    fn default() -> Self {
        Self {
            dir: None,
            budget_bytes: crate::cache::disk::DEFAULT_BUDGET,
            storage: None,
        }
    }
}

impl ModelCacheConfig {
    /// The folder used.
    pub fn dir(&self) -> PathBuf {
        self.dir
            .clone()
            .or_else(DiskCache::default_dir)
            .unwrap_or_else(|| std::env::temp_dir().join("kiln-models"))
    }
}

/// The file name a pinned reference is given in the cache: its last part, `.safetensors`
/// added when it has no extension (the engine names a model after its file's stem); the
/// sha256 itself when the reference has no usable name.
pub fn file_name(reference: &str, hex: &str) -> String {
    let last = reference.rsplit(['/', '\\']).next().unwrap_or("");
    let last = last.strip_prefix("sha256:").unwrap_or(last);
    let plain = !last.is_empty() && last != "." && last != ".." && !last.contains(['\0', ':']);
    let stem = if plain { last } else { hex };
    if Path::new(stem).extension().is_some() {
        stem.to_string()
    } else {
        format!("{stem}.safetensors")
    }
}

/// Where a pinned reference is planned: the cache's named file of `hex`. Bad input when `hex`
/// is not a sha256.
pub fn planned_path(cache_dir: &Path, reference: &str, hex: &str) -> Result<PathBuf, String> {
    if !is_sha256(hex) {
        return Err(format!(
            "sha256 {hex:?} of {reference:?} is not 64 lower-case hex digits"
        ));
    }
    Ok(cache_dir
        .join("named")
        .join(hex)
        .join(file_name(reference, hex)))
}

/// Why a pinned file could not be had.
#[derive(Debug)]
pub enum FetchFailure {
    /// The cell can never render here as given (no such model in the storage, bad hash).
    BadInput(String),
    /// Storage trouble: retry later.
    Transient(String),
    /// This machine's disk failed, or the storage holds wrong bytes.
    Resource(String),
}

impl From<DiskError> for FetchFailure {
    fn from(e: DiskError) -> Self {
        match e {
            DiskError::BadHash(_) | DiskError::Missing { .. } | DiskError::BadName(_) => {
                FetchFailure::BadInput(e.to_string())
            }
            e if e.is_transient() => FetchFailure::Transient(e.to_string()),
            e => FetchFailure::Resource(e.to_string()),
        }
    }
}

/// The agent's pinned-model resolver: the disk cache, the hash memo, the model storage.
#[derive(Clone)]
pub struct Pinned {
    disk: DiskCache,
    memo: Arc<Mutex<HashMemo>>,
    storage: Storage,
    models: Vec<PathBuf>,
    paths: PathPolicy,
    /// Textual-inversion folders, in the order the render thread reads them.
    embedding_dirs: Vec<PathBuf>,
}

/// The pinned files of a group of cells, made real.
#[derive(Debug, Default)]
pub struct Fetched {
    /// Cached files, held in use while this lives.
    pub blobs: Vec<Blob>,
    /// Embedding files to put over the worker's own for the render.
    pub embeddings: Vec<PathBuf>,
}

/// One pinned file of a cell: the key's path to replace, the reference, the sha256.
struct Pin<'a> {
    slot: &'a mut PathBuf,
    reference: &'a str,
    hex: &'a str,
    what: &'static str,
}

impl Pinned {
    /// Opens the cache folder of `cfg` (reading models from `cfg.storage`, else `storage`);
    /// local files are looked for as the agent looks (`models`, `paths`, `embedding_dirs`).
    pub fn open(
        cfg: &ModelCacheConfig,
        storage: &Storage,
        models: Vec<PathBuf>,
        paths: PathPolicy,
        embedding_dirs: Vec<PathBuf>,
    ) -> Result<Self, DiskError> {
        let dir = cfg.dir();
        let disk = DiskCache::open(dir.clone(), cfg.budget_bytes)?;
        let memo = HashMemo::open(dir.join("hashes.json"));
        Ok(Self {
            disk,
            memo: Arc::new(Mutex::new(memo)),
            storage: cfg.storage.clone().unwrap_or_else(|| storage.clone()),
            models,
            paths,
            embedding_dirs,
        })
    }

    /// The disk cache.
    pub fn disk(&self) -> &DiskCache {
        &self.disk
    }

    /// The hash memo of the cache folder, shared.
    pub fn memo(&self) -> SharedMemo {
        SharedMemo(self.memo.clone())
    }

    /// The sha256 of what this machine holds: cached files, then remembered local files (at
    /// most [`MAX_REPORTED`]). Reads folders and stats files on a blocking thread.
    pub async fn held(&self) -> Vec<String> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut held = this.disk.held();
            held.extend(this.memo.lock().unwrap_or_else(|e| e.into_inner()).held());
            held.sort();
            held.dedup();
            held.truncate(MAX_REPORTED);
            held
        })
        .await
        .unwrap_or_default()
    }

    /// Makes the pinned files of `cells` (one batch, alike) real in `key` (planned by
    /// [`planned_path`] from the first cell): a matching `--models` file, else the cache's,
    /// fetched when missing; and finds their pinned embeddings likewise. `activity` hears
    /// what a download is doing. The cached files stay held while the answer lives.
    pub async fn fetch(
        &self,
        cells: &[&pb::RenderCell],
        key: &mut PipelineKey,
        activity: &watch::Sender<String>,
    ) -> Result<Fetched, FetchFailure> {
        let Some(cell) = cells.first() else {
            return Ok(Fetched::default());
        };
        let mut pins = Vec::new();
        let mut loras = key.loras.iter_mut();
        if !cell.model_sha256.is_empty() {
            pins.push(Pin {
                slot: &mut key.model,
                reference: &cell.model,
                hex: &cell.model_sha256,
                what: "model",
            });
        }
        if let (false, Some(vae)) = (cell.vae_sha256.is_empty(), key.vae.as_mut()) {
            pins.push(Pin {
                slot: vae,
                reference: &cell.vae,
                hex: &cell.vae_sha256,
                what: "VAE",
            });
        }
        // The cell's own LoRAs come first in the key, in order (prompt LoRAs follow).
        for lora in &cell.loras {
            let Some(spec) = loras.next() else { break };
            if !lora.sha256.is_empty() {
                pins.push(Pin {
                    slot: &mut spec.path,
                    reference: &lora.name,
                    hex: &lora.sha256,
                    what: "LoRA",
                });
            }
        }
        let mut fetched = Fetched::default();
        for pin in pins {
            let found = resolve::resolve(pin.reference, &self.models, pin.what, self.paths).ok();
            if let Some(local) = self.local_match(found, pin.hex).await {
                *pin.slot = local;
                continue;
            }
            let name = file_name(pin.reference, pin.hex);
            let blob = self.ensure(pin.hex, &name, pin.reference, activity).await?;
            *pin.slot = blob.path().to_path_buf();
            fetched.blobs.push(blob);
        }
        // Each embedding once, in name order.
        let embeddings: std::collections::BTreeMap<&String, &String> = cells
            .iter()
            .flat_map(|c| c.embedding_sha256.iter())
            .collect();
        for (name, hex) in embeddings {
            let file = format!("{name}.safetensors");
            if file_name(name, hex) != file {
                return Err(FetchFailure::BadInput(format!(
                    "embedding name {name:?} is not a plain name"
                )));
            }
            let found = self
                .embedding_dirs
                .iter()
                .rev()
                .map(|d| d.join(&file))
                .find(|p| p.is_file());
            if let Some(local) = self.local_match(found, hex).await {
                fetched.embeddings.push(local);
                continue;
            }
            let blob = self.ensure(hex, &file, name, activity).await?;
            fetched.embeddings.push(blob.path().to_path_buf());
            fetched.blobs.push(blob);
        }
        activity.send_replace(String::new());
        Ok(fetched)
    }

    /// Makes the group's key real: its `hf:`/URL references fetched ([`remote`]) and its
    /// pinned files had ([`Self::fetch`]), telling the
    /// coordinator about a download as the attempts' activity. The files, held, and the
    /// milliseconds it took (a download, or hashing a local file the first time, is load
    /// time); 0 when the cells pin nothing.
    pub(super) async fn fetch_reporting(
        &self,
        link: &Link,
        cells: &[&pb::RenderCell],
        key: &mut PipelineKey,
        attempts: Vec<pb::AttemptRef>,
    ) -> Result<(Fetched, f64), FetchFailure> {
        let pins = |c: &&pb::RenderCell| {
            !c.model_sha256.is_empty()
                || !c.vae_sha256.is_empty()
                || !c.embedding_sha256.is_empty()
                || c.loras.iter().any(|l| !l.sha256.is_empty())
        };
        if !cells.iter().any(pins) && remote::pending(key) == 0 {
            return Ok((Fetched::default(), 0.0));
        }
        let t = std::time::Instant::now();
        let (activity, activity_rx) = watch::channel(String::new());
        let reporter = link.spawn_activity(attempts, activity_rx);
        let allow_urls = self.paths == PathPolicy::AnyPath;
        let fetched = match remote::fetch(key, allow_urls, &activity).await {
            Ok(()) => self.fetch(cells, key, &activity).await,
            Err(e) => Err(e),
        };
        reporter.abort();
        Ok((fetched?, t.elapsed().as_secs_f64() * 1000.0))
    }

    /// The cache's file of `hex` named `name`, its download told to `activity` as `label`'s.
    async fn ensure(
        &self,
        hex: &str,
        name: &str,
        label: &str,
        activity: &watch::Sender<String>,
    ) -> Result<Blob, FetchFailure> {
        let report = |done: u64, size: u64| {
            let pct = (done * 100).checked_div(size).unwrap_or(100);
            let mut text = format!("downloading {label} ({pct}%)");
            text.truncate(text.floor_char_boundary(128));
            activity.send_if_modified(|a| {
                let changed = *a != text;
                if changed {
                    a.clone_from(&text);
                }
                changed
            });
        };
        Ok(self.disk.ensure(hex, name, &self.storage, &report).await?)
    }

    /// `found` (the local file a reference names) when its content is `hex` (hashed on a
    /// blocking thread, once per file version).
    async fn local_match(&self, found: Option<PathBuf>, hex: &str) -> Option<PathBuf> {
        let path = found?;
        if !path.is_file() {
            return None;
        }
        let memo = self.memo.clone();
        let candidate = path.clone();
        let hashed = tokio::task::spawn_blocking(move || {
            memo.lock()
                .unwrap_or_else(|e| e.into_inner())
                .hash(&candidate)
        })
        .await
        .ok()?;
        match hashed {
            Ok(h) if h == hex => Some(path),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "hashing a model file");
                None
            }
        }
    }
}

/// Whether `key` uses `path` (its model, VAE or a LoRA).
pub fn uses(key: &PipelineKey, path: &Path) -> bool {
    key.model == path
        || key.vae.as_deref() == Some(path)
        || key.loras.iter().any(|l| l.path == path)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use sha2::{Digest, Sha256};

    use super::*;
    use crate::agent::renderer::{Item, Renderer};
    use crate::cache::Budget;
    use crate::cache::disk::model_key;
    use crate::upload::StorageUrl;

    /// A cell with a LoRA and an embedding pinned under names this worker does not have: both
    /// come from the model storage, and the image is the one the local files give.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pinned_files_are_fetched_and_render_as_the_local_files_do() {
        let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference");
        let dir = tempfile::tempdir().unwrap();
        let pool = StorageUrl::File(dir.path().join("pool"));
        let storage = Storage::open(&pool, &Default::default()).await.unwrap();
        let pin = |file: &Path| {
            let bytes = std::fs::read(file).unwrap();
            let hex = hex::encode(Sha256::digest(&bytes));
            (bytes, hex)
        };
        let (lora, lora_hex) = pin(&fixtures.join("lora_kohya.safetensors"));
        let (emb, emb_hex) = pin(&fixtures.join("embeddings/kiln.safetensors"));
        for (bytes, hex) in [(lora, &lora_hex), (emb, &emb_hex)] {
            storage.put(&model_key(hex), bytes).await.unwrap();
        }
        let mut cfg = super::super::tests::config(fixtures.clone());
        cfg.model_cache.dir = Some(dir.path().join("cache"));
        let cell = |lora: &str, sha256: &str, prompt: &str| pb::LeasedTask {
            cell: Some(pb::RenderCell {
                model: "tiny-sd15".into(),
                prompt: prompt.into(),
                steps: 2,
                cfg: 1.0,
                sampler: pb::Sampler::Lcm as i32,
                width: 64,
                height: 64,
                loras: vec![pb::LoraRef {
                    name: lora.into(),
                    strength: 0.7,
                    sha256: sha256.into(),
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut pinned_task = cell("from-registry", &lora_hex, "a pinnedkiln fox");
        let c = pinned_task.cell.as_mut().unwrap();
        c.embedding_sha256
            .insert("pinnedkiln".into(), emb_hex.clone());
        let (mut key, request) = super::super::cell::plan(&cfg, &pinned_task).unwrap();
        let cache_dir = cfg.model_cache.dir();
        assert_eq!(
            key.loras[0].path,
            planned_path(&cache_dir, "from-registry", &lora_hex).unwrap()
        );
        // The worker's embeddings folder is the models folder's own, which has no such name.
        let pinned = Pinned::open(
            &cfg.model_cache,
            &storage,
            cfg.models.clone(),
            cfg.paths,
            cfg.inversion_dirs(),
        )
        .unwrap();
        let (activity, _rx) = watch::channel(String::new());
        let cells = [pinned_task.cell.as_ref().unwrap()];
        let fetched = pinned.fetch(&cells, &mut key, &activity).await.unwrap();
        assert_eq!(pinned.disk().stats().downloads, 2);
        assert_eq!(fetched.blobs.len(), 2);
        assert_eq!(key.loras[0].path, fetched.blobs[0].path());
        assert_eq!(
            fetched.embeddings,
            [cache_dir
                .join("named")
                .join(&emb_hex)
                .join("pinnedkiln.safetensors")]
        );
        let held = pinned.held().await;
        assert!(
            held.contains(&lora_hex) && held.contains(&emb_hex),
            "{held:?}"
        );

        let renderer = Renderer::spawn_with_inversions(Budget::both(1 << 30), cfg.inversion_dirs());
        let render = |key: PipelineKey, request: crate::engine::RenderRequest, extra| {
            let (progress, _rx) = watch::channel((0, 0));
            let item = Item {
                request,
                cancel: Arc::new(AtomicBool::new(false)),
                progress,
            };
            let renderer = renderer.clone();
            async move {
                let out = renderer
                    .render_with_embeddings(key, vec![item], extra)
                    .await;
                out.into_iter().next().unwrap().expect("renders")
            }
        };
        let fetched_image = render(key, request, fetched.embeddings.clone()).await;
        let (local_key, local_request) =
            super::super::cell::plan(&cfg, &cell("lora_kohya", "", "a kiln fox")).unwrap();
        let local_image = render(local_key, local_request, Vec::new()).await;
        let pixels = |png: &[u8]| crate::engine::image::decode_png(png).unwrap().image;
        assert_eq!(
            pixels(&fetched_image.png),
            pixels(&local_image.png),
            "the fetched LoRA and embedding are the local files' content"
        );

        // Pinned under the local file's name and content: the --models file, no download.
        let named = cell("lora_kohya", &lora_hex, "a fox");
        let (mut key, _) = super::super::cell::plan(&cfg, &named).unwrap();
        let cells = [named.cell.as_ref().unwrap()];
        let again = pinned.fetch(&cells, &mut key, &activity).await.unwrap();
        assert!(again.blobs.is_empty());
        assert_eq!(key.loras[0].path, fixtures.join("lora_kohya.safetensors"));
        assert_eq!(pinned.disk().stats().downloads, 2);
    }

    #[test]
    fn cached_files_are_named_after_their_reference() {
        let hex = "a".repeat(64);
        assert_eq!(file_name("dreamshaper", &hex), "dreamshaper.safetensors");
        assert_eq!(file_name("sd15/x.safetensors", &hex), "x.safetensors");
        assert_eq!(
            file_name(&format!("sha256:{hex}"), &hex),
            format!("{hex}.safetensors")
        );
        assert_eq!(file_name("..", &hex), format!("{hex}.safetensors"));
        let dir = Path::new("cache");
        assert_eq!(
            planned_path(dir, "m", &hex).unwrap(),
            dir.join("named").join(&hex).join("m.safetensors")
        );
        assert!(
            planned_path(dir, "m", "ABC")
                .unwrap_err()
                .contains("not 64")
        );
    }
}
