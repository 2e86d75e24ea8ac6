//! `kiln model add|list|rm`: the coordinator's model registry. `add` hashes the file (sha256,
//! streamed on a blocking thread), uploads it once to the pool's model storage that the
//! coordinator names (`ModelStorage`; with this machine's own S3 credentials, resuming an
//! interrupted upload, skipped when the file is there already), then registers name → hash.
//! Sweeps then name it by `model = "NAME"` or `model = "sha256:HASH"`, pinned at submit.

use std::path::{Path, PathBuf};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_proto::v1 as pb;
use kiln_worker::upload::{Storage, StorageUrl, Uploaded};
use sha2::{Digest, Sha256};

use crate::client::{self, Conn, status_error};
use crate::table::Table;

pub const EXAMPLES: &str = "Examples:
  kiln model add dreamshaper_8.safetensors --name dreamshaper
  kiln model add detail.safetensors --kind lora
  kiln model add hf:latent-consistency/lcm-lora-sdv1-5 --kind lora
  kiln model list
  kiln model pull dreamshaper --model-cache D:\\kiln-cache
  kiln model rm dreamshaper
A sweep names a registered model by its name (model = \"dreamshaper\") or by its content
(model = \"sha256:…\"); each cell is pinned to the hash at submit, so re-pointing a name with
another `kiln model add --name` never changes a sweep already submitted.";

/// What a registered file is.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Kind {
    Checkpoint,
    Lora,
    Embedding,
    Vae,
}

/// What to do.
#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Upload a model file once to the pool's model storage and register it by name (an
    /// existing name is re-pointed to this file).
    Add {
        /// The model file (.safetensors, .ckpt, .pt).
        file: PathBuf,
        /// Registry name [default: the file name without its extension].
        #[arg(long)]
        name: Option<String>,
        /// What it is.
        #[arg(long, value_enum, default_value = "checkpoint")]
        kind: Kind,
        #[command(flatten)]
        s3: client::S3Args,
    },
    /// The registry: name, kind, size, sha256.
    List,
    /// Fetch registered models into this PC's model cache now, as a worker does when a cell
    /// needs them (resumed, verified, one download per machine): warm a PC before a night's
    /// sweep. Prints where each file is and how fast it came.
    Pull {
        /// Registry names or `sha256:HEX`.
        #[arg(required = true)]
        models: Vec<String>,
        /// The model cache [default: the OS cache folder, as `kiln worker`'s].
        #[arg(long, env = "KILN_MODEL_CACHE", value_name = "DIR")]
        model_cache: Option<PathBuf>,
        /// The model storage to read from [default: the coordinator's].
        #[arg(long, env = "KILN_MODEL_STORAGE", value_name = "URL")]
        model_storage: Option<String>,
        #[command(flatten)]
        s3: client::S3Args,
    },
    /// Remove a name (an admin token). The file stays in the model storage.
    Rm {
        /// Registry name.
        name: String,
    },
}

pub async fn main(conn: &Conn, action: Action) -> anyhow::Result<()> {
    match action {
        Action::Add {
            file,
            name,
            kind,
            s3,
        } => {
            // `hf:OWNER/REPO[/FILE]` and `https://…` references are fetched here first (into
            // the Hugging Face / kiln cache), then added as the file they name.
            let text = file.to_str().unwrap_or_default();
            if kiln_worker::hub::is_reference(text) {
                let hub = kiln_worker::hub::Hub::new(crate::hub::config_from_env(false, true)?);
                let local = hub.resolve(text, true).await?;
                anyhow::ensure!(
                    local.is_file(),
                    "{text} is a diffusers folder: the registry holds single files; name one \
                     file (hf:OWNER/REPO/FILE) or a single-file checkpoint"
                );
                let name = name.or_else(|| reference_name(text));
                add(conn, &local, name, kind, &s3).await
            } else {
                add(conn, &file, name, kind, &s3).await
            }
        }
        Action::List => list(conn).await,
        Action::Pull {
            models,
            model_cache,
            model_storage,
            s3,
        } => pull(conn, &models, model_cache, model_storage, &s3).await,
        Action::Rm { name } => rm(conn, &name).await,
    }
}

/// The default registry name of a reference: the repository's name for `hf:OWNER/REPO…`
/// (`lcm-lora-sdv1-5`), the file's stem for a URL.
fn reference_name(reference: &str) -> Option<String> {
    let name = match reference.strip_prefix("hf:") {
        Some(rest) => rest.split('/').nth(1)?.split('@').next()?,
        None => {
            let file = reference.split(['?', '#']).next()?.rsplit('/').next()?;
            file.rsplit_once('.').map_or(file, |(stem, _)| stem)
        }
    };
    (!name.is_empty()).then(|| name.to_string())
}

fn bar(len: u64, what: &str) -> anyhow::Result<ProgressBar> {
    let bar = ProgressBar::new(len);
    bar.set_style(ProgressStyle::with_template(
        "{prefix:>9} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    )?);
    bar.set_prefix(what.to_string());
    Ok(bar)
}

async fn add(
    conn: &Conn,
    file: &Path,
    name: Option<String>,
    kind: Kind,
    s3: &client::S3Args,
) -> anyhow::Result<()> {
    let size = std::fs::metadata(file)
        .with_context(|| format!("reading {}", file.display()))?
        .len();
    anyhow::ensure!(size > 0, "{} is empty", file.display());
    let name = match name {
        Some(n) => n,
        None => file
            .file_stem()
            .and_then(|s| s.to_str())
            .context("--name: the file name is not UTF-8; give a name")?
            .to_string(),
    };
    kiln_coordinator::sweep::check_model_name(&name)
        .map_err(|e| anyhow::anyhow!("model name {name:?}: {e}"))?;
    let mut models = conn.models().await?;
    let place = models
        .model_storage(pb::ModelStorageRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    anyhow::ensure!(
        !place.url.is_empty(),
        "the coordinator has no model storage (start it with --model-storage URL, or \
         model_storage in its config)"
    );
    let url: StorageUrl = place
        .url
        .parse()
        .with_context(|| format!("the coordinator's model storage {:?}", place.url))?;
    let storage = Storage::open(&url, &s3.options())
        .await
        .with_context(|| format!("opening {url}"))?;
    let sha256 = hash(file, size).await?;
    let key = format!("{}{sha256}", place.key_prefix);
    let bar = bar(size, "upload")?;
    let done = storage
        .put_file(&key, file, size, None, &|n| bar.set_position(n))
        .await
        .with_context(|| format!("uploading {} to {url}", file.display()))?;
    bar.finish_and_clear();
    match done {
        Uploaded::Present => println!("{url}/{key} is stored already: not uploaded again"),
        Uploaded::Sent { resumed: 0 } => println!("uploaded {size} bytes to {url}/{key}"),
        Uploaded::Sent { resumed } => println!(
            "resumed an interrupted upload: {resumed} of {size} bytes were there already; \
             stored at {url}/{key}"
        ),
        Uploaded::Stopped { .. } => anyhow::bail!("the upload stopped unfinished"),
    }
    let kind = match kind {
        Kind::Checkpoint => pb::ModelKind::Checkpoint,
        Kind::Lora => pb::ModelKind::Lora,
        Kind::Embedding => pb::ModelKind::Embedding,
        Kind::Vae => pb::ModelKind::Vae,
    };
    let r = models
        .add_model(pb::AddModelRequest {
            name: name.clone(),
            sha256: sha256.clone(),
            size,
            kind: kind as i32,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!("registered {name} -> sha256:{sha256}");
    if !r.previous_sha256.is_empty() && r.previous_sha256 != sha256 {
        println!(
            "re-pointed {name} (was sha256:{}); sweeps already submitted keep rendering that one",
            r.previous_sha256
        );
    }
    Ok(())
}

/// The sha256 of the file, read in 1 MiB blocks on a blocking thread.
async fn hash(file: &Path, size: u64) -> anyhow::Result<String> {
    use std::io::Read;
    let bar = bar(size, "sha256")?;
    let (path, shown) = (file.to_path_buf(), bar.clone());
    let hex = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        let mut f =
            std::fs::File::open(&path).with_context(|| format!("reading {}", path.display()))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f
                .read(&mut buf)
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            shown.inc(n as u64);
        }
        Ok(hex::encode(h.finalize()))
    })
    .await??;
    bar.finish_and_clear();
    Ok(hex)
}

async fn list(conn: &Conn) -> anyhow::Result<()> {
    let r = conn
        .models()
        .await?
        .list_models(pb::ListModelsRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let mut t = Table::new(&["NAME", "KIND", "SIZE", "SHA256"]);
    for m in r.models {
        let kind = pb::ModelKind::try_from(m.kind).map_or("?", |k| match k {
            pb::ModelKind::Lora => "lora",
            pb::ModelKind::Embedding => "embedding",
            pb::ModelKind::Vae => "vae",
            _ => "checkpoint",
        });
        t.row(vec![m.name, kind.into(), m.size.to_string(), m.sha256]);
    }
    print!("{}", t.render());
    Ok(())
}

async fn pull(
    conn: &Conn,
    wanted: &[String],
    cache_dir: Option<PathBuf>,
    model_storage: Option<String>,
    s3: &client::S3Args,
) -> anyhow::Result<()> {
    use kiln_worker::cache::disk::{DEFAULT_BUDGET, DiskCache};
    let mut models = conn.models().await?;
    let registry = models
        .list_models(pb::ListModelsRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .models;
    let url = match model_storage {
        Some(url) => url,
        None => {
            models
                .model_storage(pb::ModelStorageRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .url
        }
    };
    anyhow::ensure!(
        !url.is_empty(),
        "no model storage: the coordinator names none; give --model-storage URL"
    );
    let url: StorageUrl = url
        .parse()
        .with_context(|| format!("model storage {url:?}"))?;
    let storage = Storage::open(&url, &s3.options())
        .await
        .with_context(|| format!("opening {url}"))?;
    let dir = cache_dir
        .or_else(DiskCache::default_dir)
        .context("no cache folder for this OS user: give --model-cache DIR")?;
    let cache = DiskCache::open(dir, DEFAULT_BUDGET)?;
    for want in wanted {
        let entry = registry
            .iter()
            .find(|m| &m.name == want || want.strip_prefix("sha256:") == Some(m.sha256.as_str()))
            .with_context(|| format!("{want:?} is not in the registry (kiln model list)"))?;
        let bar = bar(entry.size, "download")?;
        let before = cache.stats().downloaded_bytes;
        let start = std::time::Instant::now();
        let blob = cache
            .ensure(
                &entry.sha256,
                &format!("{}.safetensors", entry.name),
                &storage,
                &|n, _| bar.set_position(n),
            )
            .await
            .with_context(|| format!("fetching {}", entry.name))?;
        bar.finish_and_clear();
        let got = cache.stats().downloaded_bytes - before;
        let secs = start.elapsed().as_secs_f64();
        if got == 0 {
            println!("{}: cached at {}", entry.name, blob.path().display());
        } else {
            println!(
                "{}: {} bytes in {secs:.2} s ({:.1} MB/s), at {}",
                entry.name,
                got,
                got as f64 / secs.max(1e-9) / 1e6,
                blob.path().display()
            );
        }
    }
    Ok(())
}

async fn rm(conn: &Conn, name: &str) -> anyhow::Result<()> {
    let r = conn
        .models()
        .await?
        .remove_model(pb::RemoveModelRequest {
            name: name.to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!(
        "removed {name} (was sha256:{}). The file stays in the model storage: sweeps pinned to \
         it keep rendering, and sha256:{} still names it",
        r.sha256, r.sha256
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::reference_name;

    #[test]
    fn references_are_named_after_their_repository_or_file() {
        for (r, want) in [
            (
                "hf:latent-consistency/lcm-lora-sdv1-5",
                Some("lcm-lora-sdv1-5"),
            ),
            ("hf:o/repo@v2/unet/x.safetensors", Some("repo")),
            (
                "https://h.example/a/dreamshaper_8.safetensors?download=1",
                Some("dreamshaper_8"),
            ),
            ("https://h.example/models/detail", Some("detail")),
            ("https://h.example/", None),
        ] {
            assert_eq!(reference_name(r).as_deref(), want, "{r}");
        }
    }
}
