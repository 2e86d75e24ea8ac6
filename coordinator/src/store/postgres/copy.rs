//! Sweep inserts by `COPY … FROM STDIN`: the text-format encoder of cell rows.

use crate::Result;
use crate::store::db::{BulkInsert, HiresColumns};

/// Cells per chunk of the COPY stream of a sweep insert.
const COPY_CHUNK: usize = 2_000;

/// Inserts `cells` as `b` says with one `COPY … FROM STDIN` (text format), sent in
/// chunks so that encoding the next chunk overlaps the server's work on the last. COPY inserts
/// heap rows in batches (one WAL record per page, not per row) and skips the executor; against
/// the former `INSERT … SELECT FROM UNNEST` a 100,000-cell submit was 8–13 % faster
/// (docs/perf-history.md, "Postgres submit by `COPY … FROM STDIN`").
pub(in crate::store) async fn insert_cells(
    conn: &mut sqlx::PgConnection,
    b: &BulkInsert<'_>,
    cells: &[crate::sweep::NewCell],
) -> Result<()> {
    if cells.is_empty() {
        return Ok(());
    }
    let mut copy = conn
        .copy_in_raw(
            "COPY cells (sweep_id, number, cell_key, spec, affinity_key, priority, pixels, \
             min_memory_mib, model, prompt, negative_prompt, seed, steps, cfg, sampler, width, \
             height, bindings, render_level, hires_scale, hires_width, hires_height, \
             hires_upscaler, hires_steps, hires_denoise, state, attempt, max_attempts, errors, \
             scheduled_at, created_at) \
             FROM STDIN",
        )
        .await?;
    // The columns every row shares, encoded once.
    let mut tail = String::new();
    for v in [
        b.state,
        "0",
        &b.max_attempts.to_string(),
        "[]",
        &b.now.0.to_string(),
    ] {
        tail.push('\t');
        copy_text(&mut tail, v);
    }
    tail.push('\t');
    tail.push_str(&b.now.0.to_string());
    tail.push('\n');
    let mut buf = String::with_capacity(COPY_CHUNK * 1024);
    for chunk in cells.chunks(COPY_CHUNK) {
        buf.clear();
        for c in chunk {
            copy_row(&mut buf, b.sweep, b.priority, c);
            buf.push_str(&tail);
        }
        if let Err(e) = copy.send(buf.as_bytes()).await {
            // Leave the connection usable for the rollback.
            let _ = copy.abort("kiln: insert failed").await;
            return Err(e.into());
        }
    }
    copy.finish().await?;
    Ok(())
}

/// Appends the per-cell columns of one COPY row (up to and excluding `state`).
fn copy_row(buf: &mut String, sweep: i64, priority: i64, c: &crate::sweep::NewCell) {
    use std::fmt::Write;
    let s = &c.spec;
    // Writing to a String cannot fail.
    let _ = write!(buf, "{sweep}\t{}\t", c.number);
    copy_text(buf, &c.cell_key);
    buf.push('\t');
    copy_text(buf, &c.spec_json);
    buf.push('\t');
    copy_text(buf, &c.affinity_key);
    let _ = write!(buf, "\t{priority}\t{}\t{}\t", s.pixels(), s.min_memory_mib);
    copy_text(buf, &s.model);
    buf.push('\t');
    copy_text(buf, &s.prompt);
    buf.push('\t');
    copy_text(buf, &s.negative_prompt);
    // `{}` of an f64 is its shortest round-trip decimal, which float8 parses back exactly.
    let _ = write!(
        buf,
        "\t{}\t{}\t{}\t",
        s.seed as i64,
        s.steps,
        s.cfg_decimal()
    );
    copy_text(buf, &s.sampler.as_str());
    let _ = write!(buf, "\t{}\t{}\t", s.width, s.height);
    copy_text(buf, &c.bindings_json);
    let _ = write!(buf, "\t{}", s.render_level());
    // `\N` is COPY's NULL: the hires columns of a cell without a hires fix.
    let hires = HiresColumns::of(s);
    let mut opt = |v: Option<String>| {
        buf.push('\t');
        match v {
            Some(v) => copy_text(buf, &v),
            None => buf.push_str("\\N"),
        }
    };
    opt(hires.scale.map(|v| v.to_string()));
    opt(hires.width.map(|v| v.to_string()));
    opt(hires.height.map(|v| v.to_string()));
    opt(hires.upscaler.map(str::to_owned));
    opt(hires.steps.map(|v| v.to_string()));
    opt(hires.denoise.map(|v| v.to_string()));
}

/// Appends `v` as one field of COPY's text format: backslash, tab, newline and carriage return
/// are escaped (a NULL is written as `\N` by the caller, never through here).
fn copy_text(buf: &mut String, v: &str) {
    if !v.contains(['\\', '\t', '\n', '\r']) {
        buf.push_str(v);
        return;
    }
    for ch in v.chars() {
        match ch {
            '\\' => buf.push_str("\\\\"),
            '\t' => buf.push_str("\\t"),
            '\n' => buf.push_str("\\n"),
            '\r' => buf.push_str("\\r"),
            other => buf.push(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::copy_text;

    #[test]
    fn copy_text_escapes_separators_and_backslashes() {
        let mut b = String::new();
        copy_text(&mut b, "a\tb\nc\rd\\e ✨");
        assert_eq!(b, "a\\tb\\nc\\rd\\\\e ✨");
        let mut b = String::new();
        copy_text(&mut b, "plain");
        assert_eq!(b, "plain");
    }
}
