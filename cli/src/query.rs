//! `kiln query` (results as a table, JSON or CSV) and what `kiln fetch` and `kiln grid` share
//! with it: reading matching cells page by page, opening the storages their results name. The
//! filter text goes to the coordinator as data; it never becomes SQL on this side or the other.

use kiln_proto::sampler::SamplerName;
use kiln_proto::v1 as pb;
use kiln_worker::upload::{S3Options, Storage, StorageUrl};

use crate::client::{Conn, status_error};
use crate::table::Table;

/// `kiln query --help` after the options: the language in brief, where the whole of it is,
/// and examples. The columns are the coordinator's own list.
pub fn help() -> String {
    // The columns, wrapped under the `fields` heading.
    let mut columns = String::new();
    let mut line = 0;
    for c in kiln_coordinator::query::Column::ALL {
        if line > 0 && line + c.name().len() > 64 {
            columns.push_str(",\n           ");
            line = 0;
        } else if line > 0 {
            columns.push_str(", ");
            line += 2;
        }
        columns.push_str(c.name());
        line += c.name().len();
    }
    format!(
        "The filter language (all of it, with examples: docs/query.md in kiln's source):\n  \
         fields   the columns {columns}\n           \
         and the bindings each cell recorded: axes (cfg, clip_skip, …), {{a|b}} lists (alt1, …),\n           \
         wildcards (animal, animal.alt1), <lora:name:w> tags (lora.name); `odd key` in backticks\n  \
         tests    = != < <= > >=   ~ !~ (contains)   between A and B   in (A, B)\n  \
         logic    not, and, or, ( )\n  \
         values   \"text\" or 'text', numbers; dates for finished (\"2026-11-26\")\n  \
         keepers  starred alone is a test (not starred, starred = false); rating is 0 to 5 \
         (kiln star)\n  \
         --sort   fields, comma-separated, - before one for descending: --sort -seed,cfg\n\
         A name that is neither a column nor a binding of the sweeps queried is an error listing both.\n\n\
         Examples:\n  \
         kiln query 'sweep = \"foxes\" and animal = \"barn owl\" and cfg >= 1.5'\n  \
         kiln query 'sweep = \"foxes\" and seed between 1000 and 1001 and prompt ~ \"forest\"'\n  \
         kiln query 'state = \"discarded\"' --format json\n  \
         kiln query 'sweep = \"foxes\" and starred and rating >= 4' --sort -rating\n  \
         kiln query 'sweep = \"foxes\"' --sort -seed --format csv > foxes.csv"
    )
}

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

/// A cell's sampler as the sweep file and filter spell it: `lcm`, `dpmpp_2m_karras`; `?` for
/// one this build does not know (a newer coordinator's).
pub fn sampler_name(c: &pb::RenderCell) -> String {
    SamplerName::from_proto(c.sampler, c.schedule).map_or_else(|_| "?".into(), |s| s.as_str())
}

/// The cell's hires fix as JSON (`null` when off): the settings as the cell holds them (a
/// scale of 0 means the width and height were asked for; steps 0, the first pass's; no
/// sampler, the first pass's).
fn hires_json(c: &pb::RenderCell) -> serde_json::Value {
    if c.hires_denoise == 0.0 {
        return serde_json::Value::Null;
    }
    let sampler = (c.hires_sampler != 0)
        .then(|| SamplerName::from_proto(c.hires_sampler, c.hires_schedule))
        .map(|s| s.map_or_else(|_| "?".into(), |s| s.as_str()));
    serde_json::json!({
        "scale": c.hires_scale, "width": c.hires_width, "height": c.hires_height,
        "upscaler": if c.hires_upscaler.is_empty() { "latent" } else { &c.hires_upscaler },
        "steps": c.hires_steps, "denoise": c.hires_denoise, "sampler": sampler,
    })
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
        "sampler": sampler_name(&c),
        "width": c.width, "height": c.height, "vae": c.vae, "clip_skip": c.clip_skip.max(1),
        "model_sha256": (!c.model_sha256.is_empty()).then_some(&c.model_sha256),
        "vae_sha256": (!c.vae_sha256.is_empty()).then_some(&c.vae_sha256),
        "loras": c.loras.iter().map(|l| serde_json::json!({
            "name": l.name, "strength": l.strength,
            "sha256": (!l.sha256.is_empty()).then_some(&l.sha256),
        })).collect::<Vec<_>>(),
        "hires": hires_json(&c),
        "init": (!c.init_image_sha256.is_empty()).then(|| serde_json::json!({
            "image": c.init_image_name, "sha256": c.init_image_sha256, "strength": c.strength,
        })),
        "bindings": c.bindings, "attempt": r.attempt, "worker": r.worker_id,
        "object_key": res.object_key, "storage": res.storage, "sha256": res.sha256,
        "finished_at_ms": r.finished_at_ms,
        "starred": r.starred, "rating": r.rating,
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
                "starred",
                "rating",
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
                "CELL", "SWEEP", "#", "STATE", "KEEP", "SEED", "CFG", "STEPS", "PROMPT",
                "BINDINGS", "OBJECT",
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
                    crate::star::keeper_text(r),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The keeper state shows in every format: `★ 4/5` in the table, fields in JSON and CSV.
    #[test]
    fn keeper_state_in_every_format() {
        let rows = [
            pb::CellRecord {
                cell_id: 7,
                starred: true,
                rating: 4,
                ..Default::default()
            },
            pb::CellRecord {
                cell_id: 8,
                ..Default::default()
            },
        ];
        let table = render(&rows, Format::Table);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].contains("STATE  KEEP "), "{table}");
        assert!(lines[1].contains(" ★ 4/5 "), "{table}");
        assert!(!lines[2].contains('★'), "{table}");
        let json: serde_json::Value = serde_json::from_str(&render(&rows, Format::Json)).unwrap();
        assert_eq!(json[0]["starred"], true);
        assert_eq!(json[0]["rating"], 4);
        assert_eq!(json[1]["starred"], false);
        let csv = render(&rows, Format::Csv);
        assert!(
            csv.lines()
                .next()
                .unwrap()
                .ends_with(",error,starred,rating"),
            "{csv}"
        );
        assert!(csv.lines().nth(1).unwrap().ends_with(",true,4"), "{csv}");
    }
}
