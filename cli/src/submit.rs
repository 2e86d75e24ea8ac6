//! `kiln submit`, `kiln plan` and `kiln extend`: read a sweep file and every file it
//! references (the coordinator never reads the client's disk), send them, print the answer.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::Context;
use kiln_proto::v1 as pb;
use sha2::{Digest, Sha256};

use crate::client::{Conn, status_error};
use crate::init_image;
use crate::table::Table;

/// A sweep file and the files it references, read from disk.
pub struct SweepFile {
    /// The path as the user gave it.
    pub path: String,
    /// The TOML text.
    pub text: String,
    /// Referenced files, keyed as the sweep file spells them.
    pub files: HashMap<String, String>,
    /// Referenced pictures (`init_image`), keyed as the sweep file spells them: the sha256
    /// each is uploaded and named under.
    pub images: HashMap<String, String>,
    /// Where each picture is on disk, by sha256, read again when it is uploaded.
    pub pictures: BTreeMap<String, PathBuf>,
}

impl SweepFile {
    /// Reads `path` and, relative to its folder, every file it references.
    pub fn read(path: &Path) -> anyhow::Result<SweepFile> {
        let limits = kiln_coordinator::sweep::PlanLimits::default();
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        if size(path) > limits.max_sweep_bytes as u64 {
            anyhow::bail!(
                "sweep file {} is {:.1} MiB, at most {:.0} MiB",
                path.display(),
                mib(size(path)),
                mib(limits.max_sweep_bytes as u64)
            );
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading sweep file {}", path.display()))?;
        let shown = path.display().to_string();
        let names = kiln_coordinator::sweep::referenced_files(&shown, &text)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let dir = path.parent().unwrap_or(Path::new(""));
        let mut files = HashMap::new();
        let mut total = 0;
        for name in names {
            let full = dir.join(&name);
            let len = size(&full);
            if len > limits.max_file_bytes as u64 {
                anyhow::bail!(
                    "{shown}: referenced file {name:?} is {:.1} MiB, at most {:.0} MiB",
                    mib(len),
                    mib(limits.max_file_bytes as u64)
                );
            }
            total += len;
            if total > kiln_coordinator::api::MAX_SWEEP_FILES_BYTES as u64 {
                anyhow::bail!(
                    "{shown}: the referenced files come to more than {:.0} MiB together \
                     (at {name:?})",
                    mib(kiln_coordinator::api::MAX_SWEEP_FILES_BYTES as u64)
                );
            }
            let body = std::fs::read_to_string(&full).with_context(|| {
                format!(
                    "{shown}: referenced file {name:?} (looked at {})",
                    full.display()
                )
            })?;
            files.insert(name, body);
        }
        let mut images = HashMap::new();
        let mut pictures = BTreeMap::new();
        let named = kiln_coordinator::sweep::referenced_images(&shown, &text)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::ensure!(
            named.len() <= kiln_coordinator::api::MAX_SWEEP_IMAGES,
            "{shown}: {} init pictures, at most {}",
            named.len(),
            kiln_coordinator::api::MAX_SWEEP_IMAGES
        );
        for name in named {
            let full = dir.join(&name);
            let what = format!(
                "{shown}: init_image {name:?} (looked at {})",
                full.display()
            );
            let sha = init_image::check(&full, &what)?;
            pictures.insert(sha.clone(), full);
            images.insert(name, sha);
        }
        Ok(SweepFile {
            path: shown,
            text,
            files,
            images,
            pictures,
        })
    }

    /// Uploads every picture the sweep file names (the coordinator stores each once), checking
    /// that none changed on disk since [`SweepFile::read`].
    pub async fn upload_pictures(&self, conn: &Conn) -> anyhow::Result<()> {
        for (sha, path) in &self.pictures {
            let shown = format!("{}: init_image {}", self.path, path.display());
            let bytes = init_image::read_bytes(path, &shown)?;
            anyhow::ensure!(
                hex::encode(Sha256::digest(&bytes)) == *sha,
                "{shown}: the file changed while the sweep was being submitted"
            );
            let chunks: Vec<pb::ImageChunk> = bytes
                .chunks(kiln_coordinator::api::IMAGE_CHUNK_BYTES)
                .map(|c| pb::ImageChunk { data: c.to_vec() })
                .collect();
            let mut c = conn.sweeps().await?;
            let stored = c
                .put_image(tokio_stream::iter(chunks))
                .await
                .map_err(|s| anyhow::anyhow!("{shown}: {}", status_error(s)))?
                .into_inner();
            anyhow::ensure!(
                stored.sha256 == *sha,
                "{shown}: the coordinator stored it as sha256 {}, not {sha}",
                stored.sha256
            );
        }
        Ok(())
    }

    /// The default idempotency key: a hash of the contents, so submitting the same file again
    /// (even after editing and undoing) names the same sweep.
    pub fn content_key(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.text.as_bytes());
        let mut names: Vec<&String> = self.files.keys().collect();
        names.sort();
        for n in names {
            h.update([0]);
            h.update(n.as_bytes());
            h.update([0]);
            h.update(self.files[n].as_bytes());
        }
        let mut names: Vec<&String> = self.images.keys().collect();
        names.sort();
        for n in names {
            h.update([1]);
            h.update(n.as_bytes());
            h.update([0]);
            h.update(self.images[n].as_bytes());
        }
        format!("sha256:{}", hex::encode(h.finalize()))
    }

    /// The header of a SubmitSweep stream that asks the coordinator to plan this file.
    pub fn header(&self, key: &str, priority: i32, unique_name: bool) -> pb::SweepHeader {
        pb::SweepHeader {
            name: String::new(),
            idempotency_key: key.to_string(),
            priority,
            max_attempts: 0,
            spec: self.text.clone(),
            spec_path: self.path.clone(),
            files: self.files.clone(),
            unique_name,
            images: self.images.clone(),
        }
    }
}

/// Submits a sweep file; returns (sweep id, cells, duplicate). With `unique_name`, a sweep of
/// the same name submitted from other contents is an `ALREADY_EXISTS` status.
pub async fn submit_file(
    conn: &Conn,
    file: &SweepFile,
    key: &str,
    priority: i32,
    unique_name: bool,
) -> anyhow::Result<Result<pb::SubmitSweepResponse, tonic::Status>> {
    file.upload_pictures(conn).await?;
    let mut c = conn.sweeps().await?;
    let msgs = vec![pb::SubmitSweepRequest {
        part: Some(pb::submit_sweep_request::Part::Header(file.header(
            key,
            priority,
            unique_name,
        ))),
    }];
    Ok(c.submit_sweep(tokio_stream::iter(msgs))
        .await
        .map(tonic::Response::into_inner))
}

/// What `kiln submit` does when a sweep of the file's name exists (from other contents).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnExisting {
    /// Refuse, saying how to extend it or start another.
    Refuse,
    /// Add the file's new cells to it (`--extend`).
    Extend,
    /// Start another sweep of the same name (`--new`).
    New,
}

/// `kiln submit FILE`.
pub async fn submit(
    conn: &Conn,
    path: &Path,
    key: Option<String>,
    priority: i32,
    on_existing: OnExisting,
) -> anyhow::Result<()> {
    let file = SweepFile::read(path)?;
    let key = key.unwrap_or_else(|| file.content_key());
    let unique = on_existing != OnExisting::New;
    let r = match submit_file(conn, &file, &key, priority, unique).await? {
        Ok(r) => r,
        Err(s) if s.code() == tonic::Code::AlreadyExists => {
            let name = plan_here(&file, 0)?.name;
            if on_existing == OnExisting::Extend {
                let id = crate::client::sweep_id(conn, &name).await?;
                return extend(conn, id, path).await;
            }
            let shown = path.display();
            anyhow::bail!(
                "{}.\n  To add this file's new cells to it: kiln submit --extend {shown}   \
                 (or: kiln extend {name} {shown})\n  To start another sweep of that name: \
                 kiln submit --new {shown}",
                s.message()
            );
        }
        Err(s) => return Err(status_error(s)),
    };
    if r.duplicate {
        println!(
            "sweep {} already submitted ({} cells); nothing added",
            r.sweep_id, r.cell_count
        );
    } else {
        println!("sweep {} submitted: {} cells", r.sweep_id, r.cell_count);
    }
    Ok(())
}

/// `kiln plan FILE`: a dry run, planned here (the coordinator's planner, the same seeds as
/// `kiln submit` draws) or, with `remote`, by the coordinator.
pub async fn plan(conn: &Conn, path: &Path, show: u32, remote: bool) -> anyhow::Result<()> {
    let file = SweepFile::read(path)?;
    let r = if remote {
        let mut c = conn.sweeps().await?;
        c.plan_sweep(pb::PlanSweepRequest {
            spec_path: file.path.clone(),
            spec: file.text.clone(),
            files: file.files.clone(),
            idempotency_key: file.content_key(),
            preview: show,
            images: file.images.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner()
    } else {
        tokio::task::spawn_blocking(move || plan_here(&file, show as usize)).await??
    };
    println!(
        "sweep {:?}: {} cells ({} duplicates dropped), axes: [{}], {} seeds",
        r.name,
        r.cell_count,
        r.duplicates,
        r.axes.join(", "),
        r.seeds.len()
    );
    let mut t = Table::new(&["#", "SEED", "CFG", "STEPS", "SIZE", "PROMPT", "BINDINGS"]);
    for (i, cell) in r.cells.iter().enumerate() {
        let mut b: Vec<String> = cell
            .bindings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        b.sort();
        t.row(vec![
            i.to_string(),
            cell.seed.to_string(),
            format!("{}", cell.cfg),
            cell.steps.to_string(),
            format!("{}x{}", cell.width, cell.height),
            cell.prompt.clone(),
            b.join(" "),
        ]);
    }
    print!("{}", t.render());
    Ok(())
}

/// Plans `file` in this process, as the coordinator would for `kiln submit`, keeping the
/// first `show` cells.
fn plan_here(file: &SweepFile, show: usize) -> anyhow::Result<pb::PlanSweepResponse> {
    use kiln_coordinator::sweep::{PlanLimits, SweepSource, plan_into};
    let src = SweepSource {
        path: file.path.clone(),
        text: file.text.clone(),
        files: file.files.clone().into_iter().collect(),
        images: file.images.clone().into_iter().collect(),
        models: Default::default(),
    };
    let seed = kiln_coordinator::queue::random_seed_for(&file.content_key());
    let mut cells = Vec::new();
    let s = plan_into(&src, &PlanLimits::default(), seed, &mut |c| {
        if cells.len() < show {
            cells.push(c.spec);
        }
        Ok(())
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(pb::PlanSweepResponse {
        name: s.name,
        cell_count: s.cell_count,
        duplicates: s.duplicates,
        axes: s.axes,
        seeds: s.seeds,
        cells: cells
            .into_iter()
            .map(|c| pb::RenderCell {
                prompt: c.prompt,
                seed: c.seed,
                steps: c.steps,
                cfg: c.cfg,
                width: c.width,
                height: c.height,
                bindings: c.bindings.into_iter().collect(),
                ..Default::default()
            })
            .collect(),
    })
}

/// Extends the sweep named as `file` names its sweep with `file`'s new cells (`kiln run` of a
/// grown file); returns the sweep's id.
pub async fn extend_by_name(conn: &Conn, file: &SweepFile) -> anyhow::Result<u64> {
    let name = plan_here(file, 0)?.name;
    let id = crate::client::sweep_id(conn, &name).await?;
    let r = extend_file(conn, id, file).await?;
    eprintln!(
        "sweep {id} ({name}) grew: {} new cells added, {} cells in all; resuming",
        r.added, r.cell_count
    );
    Ok(id)
}

async fn extend_file(
    conn: &Conn,
    sweep: u64,
    file: &SweepFile,
) -> anyhow::Result<pb::ExtendSweepResponse> {
    file.upload_pictures(conn).await?;
    let mut c = conn.sweeps().await?;
    Ok(c.extend_sweep(pb::ExtendSweepRequest {
        sweep_id: sweep,
        spec_path: file.path.clone(),
        spec: file.text.clone(),
        files: file.files.clone(),
        images: file.images.clone(),
    })
    .await
    .map_err(status_error)?
    .into_inner())
}

/// `kiln extend SWEEP FILE`.
pub async fn extend(conn: &Conn, sweep: u64, path: &Path) -> anyhow::Result<()> {
    let file = SweepFile::read(path)?;
    let r = extend_file(conn, sweep, &file).await?;
    println!(
        "sweep {sweep}: {} new cells added, {} cells in all",
        r.added, r.cell_count
    );
    Ok(())
}
