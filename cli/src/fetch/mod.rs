//! `kiln fetch`: downloads the images of matching completed cells into a folder, checking each
//! against its recorded sha256, under names from a pattern (`name`) made unique (`unique`).
//!
//! The default names (`{sweep_id}-{number:6}-{seed}.png`) are unique per cell. Cells are
//! fetched in cell-id order, so a name two cells share goes to the older cell, the newer gets
//! `-2`, and fetching again gives every image the name it had, replacing the file there.

mod name;
mod unique;

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::path::Path;

use anyhow::Context;
use kiln_proto::v1 as pb;
use kiln_worker::upload::{S3Options, Storage};
use sha2::{Digest, Sha256};

use crate::client::{Conn, status_error};
use crate::query::{fetch_rows, open_storage};
use name::{Pattern, Source};
use unique::Names;

/// `kiln fetch --help`, after the options.
pub const EXAMPLES: &str = "\
Names (--name PATTERN): text with {field} or {field:N} in it; `/` makes folders; .png is added
when the pattern does not end in it.
  fields: sweep (its name), sweep_id, cell (its id), number (in its sweep), seed, prompt,
          negative, model, cfg, steps, sampler, width, height, attempt, rating (0-5, from
          kiln star), b.NAME (a binding)
  {prompt:40}: the first 40 characters; {number:6}: whole numbers zero-padded to 6 digits
  {{ and }}: literal braces; A1111's [seed]-[prompt] is {seed}-{prompt} here
Every name works on Windows, macOS and Linux: / \\ : * ? \" < > | and control characters in a
value become _, a name Windows reserves (CON, NUL, COM1 ...) gets a leading _, no folder ends
in a dot or a space, names stop at 200 bytes. Files never land outside -o (no .., no absolute
path). Two images given one name: the later cell (by id) gets -2, -3 ... before .png (names
compared ignoring case, as Windows and macOS compare them); put {cell} in the pattern for
names that are unique by themselves. The default, {sweep_id}-{number:6}-{seed}.png, is.

Examples:
  kiln fetch 'sweep = \"foxes\" and cfg = 1.5' -o best/
  kiln fetch 'sweep = \"foxes\"' -o out/ --name '{sweep}/{b.animal}/{seed}-{prompt:40}'
  kiln fetch 'sweep = 3' -o out/ --name '{cfg}-{steps}-{sampler}-{seed}.png'
  kiln fetch 'sweep = 3' -o out/ --name '{model}/{cell}-{prompt:60}.png'";

/// `kiln fetch`: downloads the images of matching completed cells into `dir`, named by
/// `pattern` (default [`name::DEFAULT`]), verifying each sha256.
pub async fn fetch(
    conn: &Conn,
    filter: &str,
    limit: u32,
    dir: &Path,
    pattern: Option<&str>,
    s3: &S3Options,
) -> anyhow::Result<()> {
    let given = pattern.unwrap_or(name::DEFAULT);
    let pattern: Pattern = given.parse().with_context(|| format!("--name {given:?}"))?;
    let filter = if filter.trim().is_empty() {
        "state = \"completed\"".to_string()
    } else {
        format!("({filter}) and state = \"completed\"")
    };
    let rows = fetch_rows(conn, &filter, Some("id"), limit).await?;
    check_bindings(&pattern, &rows)?;
    let sweep_names = if pattern.uses_sweep_name() {
        sweep_names(conn, &rows).await?
    } else {
        BTreeMap::new()
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut stores: Vec<(String, Storage)> = Vec::new();
    let mut names = Names::default();
    let (mut n, mut skipped, mut renamed) = (0, 0, 0);
    for r in &rows {
        let Some(res) = &r.result else { continue };
        let src = Source {
            record: r,
            sweep_name: sweep_names.get(&r.sweep_id).map_or("", String::as_str),
        };
        let (rel, changed) = names.place(&pattern.render(&src))?;
        renamed += usize::from(changed);
        // One bad row (a storage that cannot be opened, a missing object, bytes that do not
        // match) is reported and skipped; the rest are fetched.
        match fetch_one(&mut stores, r, res, s3, &dir.join(&rel)).await {
            Ok(()) => n += 1,
            Err(e) => {
                eprintln!("kiln: skipped: {e:#}");
                skipped += 1;
            }
        }
    }
    println!("{n} images written to {}", dir.display());
    if renamed > 0 {
        println!(
            "{renamed} of them share a name with an earlier image and got -2, -3 ... before \
             .png; put {{cell}} in --name for names unique by themselves"
        );
    }
    if rows.len() as u32 >= limit {
        println!("(stopped at --limit {limit}: more cells may match)");
    }
    anyhow::ensure!(
        skipped == 0,
        "{skipped} images could not be fetched (see above)"
    );
    Ok(())
}

/// Refuses a `{b.NAME}` that none of the matched cells binds, listing those they do.
fn check_bindings(pattern: &Pattern, rows: &[pb::CellRecord]) -> anyhow::Result<()> {
    let mut known: Vec<&String> = rows
        .iter()
        .filter_map(|r| r.cell.as_ref())
        .flat_map(|c| c.bindings.keys())
        .collect();
    known.sort();
    known.dedup();
    for b in pattern.bindings() {
        if !rows.is_empty() && !known.iter().any(|k| *k == b) {
            let list: Vec<String> = known.iter().map(|k| format!("{{b.{k}}}")).collect();
            anyhow::bail!(
                "--name: no matched cell has the binding {b:?} ({{b.{b}}}); theirs: {}",
                if list.is_empty() {
                    "none".to_string()
                } else {
                    list.join(", ")
                }
            );
        }
    }
    Ok(())
}

/// The names of the sweeps `rows` belong to, by id.
async fn sweep_names(
    conn: &Conn,
    rows: &[pb::CellRecord],
) -> anyhow::Result<BTreeMap<u64, String>> {
    let mut client = conn.sweeps().await?;
    let mut out = BTreeMap::new();
    for r in rows {
        if let Entry::Vacant(slot) = out.entry(r.sweep_id) {
            let sweep = client
                .get_sweep(pb::GetSweepRequest {
                    sweep_id: r.sweep_id,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            slot.insert(sweep.name);
        }
    }
    Ok(out)
}

/// Whether `key` is what a worker writes: `sweeps/SWEEP/CELL/ATTEMPT.png`, nothing else (no
/// `..`, no absolute path), so a result row can only name an image.
fn image_key(key: &str) -> bool {
    let parts: Vec<&str> = key.split('/').collect();
    let number = |p: &str| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit());
    matches!(parts.as_slice(), ["sweeps", sweep, cell, file]
        if number(sweep) && number(cell) && file.strip_suffix(".png").is_some_and(number))
}

/// Fetches one result's image to `path`, checking its key and sha256.
async fn fetch_one(
    stores: &mut Vec<(String, Storage)>,
    r: &pb::CellRecord,
    res: &pb::RenderResult,
    s3: &S3Options,
    path: &Path,
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
    if let Some(folder) = path.parent() {
        std::fs::create_dir_all(folder)
            .with_context(|| format!("creating {}", folder.display()))?;
    }
    std::fs::write(path, &bytes).with_context(|| format!("writing {}", path.display()))?;
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
