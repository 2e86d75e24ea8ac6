//! `kiln query` (results as a table, JSON or CSV) and `kiln fetch` (download the matching
//! images, checking each against its recorded sha256). The filter text goes to the
//! coordinator as data; it never becomes SQL on this side or the other.

use std::path::Path;

use anyhow::Context;
use kiln_proto::v1 as pb;
use kiln_worker::upload::{S3Options, Storage, StorageUrl};
use sha2::{Digest, Sha256};

use crate::client::{Conn, status_error};
use crate::table::Table;

/// Output formats of `kiln query`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// A JSON array of objects.
    Json,
    /// CSV with a header row (bindings as `key=value;…`).
    Csv,
}

/// Fetches up to `limit` cells matching `filter`, following pages.
pub async fn fetch_rows(
    conn: &Conn,
    filter: &str,
    sort: Option<&str>,
    limit: u32,
) -> anyhow::Result<Vec<pb::CellRecord>> {
    let mut c = conn.sweeps().await?;
    let mut rows = Vec::new();
    let mut token = String::new();
    while (rows.len() as u32) < limit {
        let r = c
            .query_results(pb::QueryResultsRequest {
                filter: filter.to_string(),
                sort_by: sort.unwrap_or_default().to_string(),
                limit: (limit - rows.len() as u32).min(1000),
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .map_err(status_error)?
            .into_inner();
        rows.extend(r.cells);
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    Ok(rows)
}

fn state_name(v: i32) -> &'static str {
    match pb::CellState::try_from(v) {
        Ok(pb::CellState::Available) => "available",
        Ok(pb::CellState::Scheduled) => "scheduled",
        Ok(pb::CellState::Running) => "running",
        Ok(pb::CellState::Retryable) => "retryable",
        Ok(pb::CellState::Held) => "held",
        Ok(pb::CellState::Completed) => "completed",
        Ok(pb::CellState::Cancelled) => "cancelled",
        Ok(pb::CellState::Discarded) => "discarded",
        _ => "?",
    }
}

fn bindings_text(c: &pb::RenderCell) -> String {
    let mut b: Vec<String> = c.bindings.iter().map(|(k, v)| format!("{k}={v}")).collect();
    b.sort();
    b.join(";")
}

fn class_name(v: i32) -> &'static str {
    match pb::FailureClass::try_from(v) {
        Ok(pb::FailureClass::BadInput) => "bad input",
        Ok(pb::FailureClass::Resource) => "resource",
        Ok(pb::FailureClass::Transient) => "transient",
        Ok(pb::FailureClass::Cancelled) => "cancelled",
        Ok(pb::FailureClass::LeaseExpired) => "lease expired",
        _ => "failed",
    }
}

/// A failed attempt as a person reads it: `bad input: LoRA not found: x`.
pub fn error_text(e: &pb::AttemptError) -> String {
    format!("{}: {}", class_name(e.class), e.message)
}

/// Why the cell's last attempt failed: `bad input: LoRA not found: x (worker 3, attempt 2)`.
/// `None` when no attempt failed.
pub fn last_error(r: &pb::CellRecord) -> Option<String> {
    let e = r.errors.last()?;
    Some(format!(
        "{} (worker {}, attempt {})",
        error_text(e),
        e.worker_id,
        e.attempt
    ))
}

fn record_json(r: &pb::CellRecord) -> serde_json::Value {
    let c = r.cell.clone().unwrap_or_default();
    let res = r.result.clone().unwrap_or_default();
    serde_json::json!({
        "cell": r.cell_id, "sweep": r.sweep_id, "number": r.number, "state": state_name(r.state),
        "model": c.model, "prompt": c.prompt, "negative_prompt": c.negative_prompt,
        "seed": c.seed, "steps": c.steps, "cfg": c.cfg,
        "sampler": match pb::Sampler::try_from(c.sampler) { Ok(pb::Sampler::EulerA) => "euler_a", _ => "lcm" },
        "width": c.width, "height": c.height, "vae": c.vae, "clip_skip": c.clip_skip.max(1),
        "loras": c.loras.iter().map(|l| serde_json::json!({"name": l.name, "strength": l.strength})).collect::<Vec<_>>(),
        "bindings": c.bindings, "attempt": r.attempt, "worker": r.worker_id,
        "object_key": res.object_key, "storage": res.storage, "sha256": res.sha256,
        "finished_at_ms": r.finished_at_ms,
        "error": last_error(r).unwrap_or_default(),
        "errors": r.errors.iter().map(|e| serde_json::json!({
            "attempt": e.attempt, "worker": e.worker_id, "class": class_name(e.class),
            "message": e.message, "at_ms": e.at_ms,
        })).collect::<Vec<_>>(),
    })
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Renders rows in `format`.
pub fn render(rows: &[pb::CellRecord], format: Format) -> String {
    match format {
        Format::Json => {
            let v: Vec<serde_json::Value> = rows.iter().map(record_json).collect();
            serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
        }
        Format::Csv => {
            let cols = [
                "cell",
                "sweep",
                "number",
                "state",
                "model",
                "prompt",
                "negative_prompt",
                "seed",
                "steps",
                "cfg",
                "sampler",
                "width",
                "height",
                "bindings",
                "attempt",
                "worker",
                "object_key",
                "storage",
                "sha256",
                "finished_at_ms",
                "error",
            ];
            let mut out = cols.join(",") + "\n";
            for r in rows {
                let v = record_json(r);
                let c = r.cell.clone().unwrap_or_default();
                let line: Vec<String> = cols
                    .iter()
                    .map(|k| match *k {
                        "bindings" => csv_field(&bindings_text(&c)),
                        k => match &v[k] {
                            serde_json::Value::String(s) => csv_field(s),
                            other => other.to_string(),
                        },
                    })
                    .collect();
                out += &(line.join(",") + "\n");
            }
            out
        }
        Format::Table => {
            // A column for why cells failed, when one did.
            let failed = rows
                .iter()
                .any(|r| !r.errors.is_empty() && r.result.is_none());
            let mut cols = vec![
                "CELL", "SWEEP", "#", "STATE", "SEED", "CFG", "STEPS", "PROMPT", "BINDINGS",
                "OBJECT",
            ];
            if failed {
                cols.push("LAST ERROR");
            }
            let mut t = Table::new(&cols);
            for r in rows {
                let c = r.cell.clone().unwrap_or_default();
                let prompt: String = if c.prompt.chars().count() > 48 {
                    c.prompt.chars().take(47).collect::<String>() + "…"
                } else {
                    c.prompt.clone()
                };
                let mut row = vec![
                    r.cell_id.to_string(),
                    r.sweep_id.to_string(),
                    r.number.to_string(),
                    state_name(r.state).into(),
                    c.seed.to_string(),
                    format!("{}", c.cfg),
                    c.steps.to_string(),
                    prompt,
                    bindings_text(&c),
                    r.result
                        .as_ref()
                        .map(|x| x.object_key.clone())
                        .unwrap_or_default(),
                ];
                if failed {
                    let e = if r.result.is_none() {
                        last_error(r)
                    } else {
                        None
                    };
                    row.push(e.unwrap_or_default());
                }
                t.row(row);
            }
            t.render()
        }
    }
}

/// `kiln query`.
pub async fn query(
    conn: &Conn,
    filter: &str,
    sort: Option<&str>,
    limit: u32,
    format: Format,
) -> anyhow::Result<()> {
    let rows = fetch_rows(conn, filter, sort, limit).await?;
    print!("{}", render(&rows, format));
    Ok(())
}

/// The storage a result's URL names, opened once per URL.
pub async fn open_storage(
    opened: &mut Vec<(String, Storage)>,
    url: &str,
    s3: &S3Options,
) -> anyhow::Result<Storage> {
    if let Some((_, s)) = opened.iter().find(|(u, _)| u == url) {
        return Ok(s.clone());
    }
    let parsed: StorageUrl = url.parse()?;
    let s = Storage::open(&parsed, s3).await?;
    opened.push((url.to_string(), s.clone()));
    Ok(s)
}

/// `kiln fetch`: downloads the images of matching completed cells into `dir` as
/// `{sweep}-{number:06}-{seed}.png`, verifying each sha256.
pub async fn fetch(
    conn: &Conn,
    filter: &str,
    limit: u32,
    dir: &Path,
    s3: &S3Options,
) -> anyhow::Result<()> {
    let filter = if filter.trim().is_empty() {
        "state = \"completed\"".to_string()
    } else {
        format!("({filter}) and state = \"completed\"")
    };
    let rows = fetch_rows(conn, &filter, None, limit).await?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut stores: Vec<(String, Storage)> = Vec::new();
    let (mut n, mut skipped) = (0, 0);
    for r in &rows {
        let Some(res) = &r.result else { continue };
        // One bad row (a storage that cannot be opened, a missing object, bytes that do not
        // match) is reported and skipped; the rest are fetched.
        match fetch_one(&mut stores, r, res, s3, dir).await {
            Ok(()) => n += 1,
            Err(e) => {
                eprintln!("kiln: skipped: {e:#}");
                skipped += 1;
            }
        }
    }
    println!("{n} images written to {}", dir.display());
    anyhow::ensure!(
        skipped == 0,
        "{skipped} images could not be fetched (see above)"
    );
    Ok(())
}

/// Whether `key` is what a worker writes: `sweeps/SWEEP/CELL/ATTEMPT.png`, nothing else (no
/// `..`, no absolute path), so a result row can only name an image.
fn image_key(key: &str) -> bool {
    let parts: Vec<&str> = key.split('/').collect();
    let number = |p: &str| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit());
    matches!(parts.as_slice(), ["sweeps", sweep, cell, file]
        if number(sweep) && number(cell) && file.strip_suffix(".png").is_some_and(number))
}

/// Fetches one result's image into `dir`, checking its key and sha256.
async fn fetch_one(
    stores: &mut Vec<(String, Storage)>,
    r: &pb::CellRecord,
    res: &pb::RenderResult,
    s3: &S3Options,
    dir: &Path,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        image_key(&res.object_key),
        "cell {}: object key {:?} is not an image key of kiln's",
        r.cell_id,
        res.object_key
    );
    let storage = open_storage(stores, &res.storage, s3).await?;
    let bytes = storage
        .get(&res.object_key)
        .await
        .with_context(|| format!("cell {}: {}", r.cell_id, res.object_key))?;
    let got = hex::encode(Sha256::digest(&bytes));
    anyhow::ensure!(
        got == res.sha256,
        "cell {}: {} has sha256 {got}, the result says {}",
        r.cell_id,
        res.object_key,
        res.sha256
    );
    let seed = r.cell.as_ref().map_or(0, |c| c.seed);
    let name = format!("{}-{:06}-{seed}.png", r.sweep_id, r.number);
    std::fs::write(dir.join(&name), &bytes)
        .with_context(|| format!("writing {}", dir.join(&name).display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::image_key;

    #[test]
    fn fetch_reads_only_image_keys() {
        assert!(image_key("sweeps/1/22/3.png"));
        for bad in [
            "etc/passwd",
            "sweeps/../../etc/passwd.png",
            "/sweeps/1/2/3.png",
            "sweeps/1/2/3.png/x",
            "sweeps/1/2/x.png",
            "sweeps/1/2/3.jpg",
            "sweeps//2/3.png",
            "sweeps/1/2/.png",
        ] {
            assert!(!image_key(bad), "{bad}");
        }
    }
}
