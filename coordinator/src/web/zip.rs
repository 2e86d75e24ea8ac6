//! `GET /download.zip?q=FILTER&sort=SORT`: every completed cell the filter matches, as one
//! zip streamed while it is made (`{sweep}-{number:06}-{seed}.png`, stored uncompressed: PNGs
//! are compressed already), at most [`MAX_FILES`] images.
//!
//! Three stages joined by bounded channels, so memory stays bounded whatever the size of the
//! download: a task reads the cells a page of [`PAGE`] at a time and fetches their images
//! ([`FETCHES`] at once, checked against their sha256 by [`images::fetch`]); a blocking task
//! writes the zip (the `zip` crate is synchronous) into a writer that hands chunks to the
//! response body. A client that goes away closes the body, which stops the writer, which stops
//! the reader. Images that cannot be read are skipped and listed in a last `README.txt`, which
//! also says when the download was cut. A filter that does not parse, or that matches nothing,
//! is answered before the first byte; a query that fails later, or the coordinator stopping,
//! aborts the response, so a broken download never looks like a whole one.

use std::collections::HashSet;
use std::io::{self, BufWriter, Write};

use ::zip::write::SimpleFileOptions;
use ::zip::{CompressionMethod, ZipWriter};
use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::{mpsc, watch};

use super::auth::Caller;
use super::images::{self, Completed};
use super::state::{Web, WebError, WebResult};
use crate::domain::rows::CellRow;
use crate::domain::state::CellState;
use crate::store::CellQuery;

/// Cells read per query.
const PAGE: i64 = 200;
/// Most images in one zip.
pub(super) const MAX_FILES: usize = 100_000;
/// Images fetched at once (ahead of the writer).
const FETCHES: usize = 4;
/// Largest chunk handed to the body.
const CHUNK: usize = 64 << 10;
/// Most skipped images listed by name in `README.txt`.
const MAX_LISTED: usize = 10_000;

pub(super) fn routes() -> Router<Web> {
    Router::new().route("/download.zip", get(download))
}

#[derive(Deserialize)]
struct Params {
    #[serde(default)]
    q: String,
    #[serde(default)]
    sort: String,
}

async fn download(
    State(web): State<Web>,
    Caller(caller): Caller,
    Query(p): Query<Params>,
) -> WebResult<Response> {
    let mut q = web.cell_query(&caller, &p.q, &p.sort, PAGE, 0).await?;
    q.states = vec![CellState::Completed];
    let first = web.queue.query(&q).await?;
    if first.is_empty() {
        return Err(WebError::NotFound(
            "no completed cell matches this filter".into(),
        ));
    }
    let about = About {
        filter: p.q,
        sort: p.sort,
    };
    let (entries, entries_rx) = mpsc::channel(2);
    let (chunks, chunks_rx) = mpsc::channel(8);
    let stopping = web.stopping.clone();
    tokio::spawn(read_cells(web, q, first, entries));
    tokio::task::spawn_blocking(move || write_zip(entries_rx, chunks, &about));
    Ok((
        [
            (header::CONTENT_TYPE, "application/zip"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"kiln-results.zip\"",
            ),
        ],
        body(chunks_rx, stopping),
    )
        .into_response())
}

/// The response body: the writer's chunks until the zip ends, or an error (which aborts the
/// response) when the coordinator stops, so shutdown never waits on a long download.
fn body(chunks: mpsc::Receiver<io::Result<Bytes>>, stopping: watch::Receiver<bool>) -> Body {
    let stream = futures::stream::unfold(Some((chunks, stopping)), |state| async move {
        let (mut chunks, mut stopping) = state?;
        let stopped = async {
            if stopping.wait_for(|s| *s).await.is_err() {
                // Nobody can stop it: the coordinator runs as long as the download.
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            chunk = chunks.recv() => chunk.map(|c| (c, Some((chunks, stopping)))),
            () = stopped => Some((Err(io::Error::other("the coordinator is stopping")), None)),
        }
    });
    Body::from_stream(stream)
}

/// What the reader hands the writer.
#[derive(Debug)]
enum Entry {
    /// An image.
    File {
        name: String,
        png: Vec<u8>,
        /// When the cell completed, unix ms.
        finished_at: Option<i64>,
    },
    /// An image that could not be had, and why.
    Skipped { name: String, why: String },
    /// More cells match than [`MAX_FILES`]; nothing follows.
    Cut,
    /// Every matching cell was read.
    End,
    /// A query failed: the zip must not look whole.
    Failed,
}

/// The request, for `README.txt`.
struct About {
    filter: String,
    sort: String,
}

/// Reads the cells of `q` from the page `page` (its first) on, fetches their images and hands
/// them to the writer, until every cell is read, [`MAX_FILES`] are sent or the writer is gone.
async fn read_cells(web: Web, mut q: CellQuery, mut page: Vec<CellRow>, out: mpsc::Sender<Entry>) {
    // Cells completing during the download shift later pages: a cell may come twice.
    let mut seen = HashSet::new();
    let mut files = 0;
    loop {
        let full = page.len() as i64 >= PAGE;
        let mut cells = Vec::with_capacity(page.len());
        for row in page {
            if !seen.insert(row.id) {
                continue;
            }
            let id = row.id;
            match Completed::from_row(row) {
                Ok(Some(c)) => cells.push(c),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(cell = %id, error = %e, "zip: skipping a corrupt cell");
                    let skipped = Entry::Skipped {
                        name: format!("cell {id}"),
                        why: "its stored result is corrupt".into(),
                    };
                    if out.send(skipped).await.is_err() {
                        return;
                    }
                }
            }
        }
        let source = web.images.as_ref();
        let mut fetched = futures::stream::iter(cells)
            .map(|c| async move {
                let png = images::fetch(source, &c).await;
                (c, png)
            })
            .buffered(FETCHES);
        while let Some((c, png)) = fetched.next().await {
            if files == MAX_FILES {
                let _ = out.send(Entry::Cut).await;
                return;
            }
            let entry = match png {
                Ok(png) => {
                    files += 1;
                    Entry::File {
                        name: c.file_name(),
                        png,
                        finished_at: c.cell.finalized_at,
                    }
                }
                Err(why) => Entry::Skipped {
                    name: c.file_name(),
                    why: why.to_string(),
                },
            };
            if out.send(entry).await.is_err() {
                return;
            }
        }
        drop(fetched);
        if !full {
            let _ = out.send(Entry::End).await;
            return;
        }
        q.offset += PAGE;
        page = match web.queue.query(&q).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "zip: reading cells failed; aborting the download");
                let _ = out.send(Entry::Failed).await;
                return;
            }
        };
    }
}

/// Writes the zip of what `entries` brings into `chunks` (blocking). On a failure it sends the
/// error, which aborts the response.
fn write_zip(
    mut entries: mpsc::Receiver<Entry>,
    chunks: mpsc::Sender<io::Result<Bytes>>,
    about: &About,
) {
    let sink = BufWriter::with_capacity(CHUNK, Chunks(chunks.clone()));
    if let Err(e) = write_entries(&mut entries, sink, about) {
        if e.kind() != io::ErrorKind::BrokenPipe {
            tracing::warn!(error = %e, "zip download failed");
        }
        let _ = chunks.blocking_send(Err(e));
    }
}

fn write_entries<W: Write>(
    entries: &mut mpsc::Receiver<Entry>,
    sink: W,
    about: &About,
) -> io::Result<()> {
    let mut zip = ZipWriter::new_stream(sink);
    let mut files = 0usize;
    let mut skipped = Vec::new();
    let mut unlisted = 0usize;
    let mut cut = false;
    loop {
        match entries.blocking_recv() {
            Some(Entry::File {
                name,
                png,
                finished_at,
            }) => {
                zip.start_file(name, options(finished_at))
                    .map_err(io::Error::other)?;
                zip.write_all(&png)?;
                files += 1;
            }
            Some(Entry::Skipped { name, why }) if skipped.len() < MAX_LISTED => {
                skipped.push(format!("  {name}: {why}"));
            }
            Some(Entry::Skipped { .. }) => unlisted += 1,
            Some(Entry::Cut) => {
                cut = true;
                break;
            }
            Some(Entry::End) => break,
            Some(Entry::Failed) => return Err(io::Error::other("reading the cells failed")),
            None => return Err(io::Error::other("the cell reader stopped")),
        }
    }
    if cut || !skipped.is_empty() {
        let text = readme(about, files, cut, &skipped, unlisted);
        zip.start_file("README.txt", options(None))
            .map_err(io::Error::other)?;
        zip.write_all(text.as_bytes())?;
    }
    zip.finish().map_err(io::Error::other)?.flush()
}

/// `README.txt`: what the zip holds and what it lacks.
fn readme(about: &About, files: usize, cut: bool, skipped: &[String], unlisted: usize) -> String {
    let mut s = String::from("kiln-results.zip: the completed cells matching\n");
    let or_none = |t: &str| {
        if t.trim().is_empty() {
            "(none)".to_string()
        } else {
            t.to_string()
        }
    };
    s += &format!(
        "  filter: {}\n  sort:   {}\n",
        or_none(&about.filter),
        or_none(&about.sort)
    );
    s += &format!("{files} images.\n");
    if cut {
        s += &format!(
            "\nCut at {MAX_FILES} images: more cells match. Narrow the filter (for example \
             by sweep, or seed < N and seed >= N) to download the rest.\n"
        );
    }
    if !skipped.is_empty() {
        s += &format!(
            "\nSkipped {} images that could not be read:\n",
            skipped.len() + unlisted
        );
        for line in skipped {
            s += line;
            s.push('\n');
        }
        if unlisted > 0 {
            s += &format!("  … and {unlisted} more\n");
        }
    }
    s
}

/// A stored (uncompressed) entry dated when its cell completed.
fn options(finished_at: Option<i64>) -> SimpleFileOptions {
    let options = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Stored)
        .unix_permissions(0o644);
    match finished_at.and_then(zip_time) {
        Some(t) => options.last_modified_time(t),
        None => options,
    }
}

/// Unix ms as a zip timestamp (UTC; zip has no zone), if zip can hold it (1980..=2107).
fn zip_time(ms: i64) -> Option<::zip::DateTime> {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    ::zip::DateTime::from_date_and_time(
        u16::try_from(year).ok()?,
        month as u8,
        day as u8,
        (rem / 3600) as u8,
        (rem / 60 % 60) as u8,
        (rem % 60) as u8,
    )
    .ok()
}

/// A writer whose bytes become chunks of the response body.
struct Chunks(mpsc::Sender<io::Result<Bytes>>);

impl Write for Chunks {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(CHUNK);
        self.0
            .blocking_send(Ok(Bytes::copy_from_slice(&buf[..n])))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the download was closed"))?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Cursor, Read};

    use super::*;

    fn about() -> About {
        About {
            filter: "seed < 3".into(),
            sort: String::new(),
        }
    }

    /// Runs the writer on `entries` as the route does; the bytes it streamed.
    async fn zip_of(entries: Vec<Entry>) -> io::Result<Vec<u8>> {
        let (tx, rx) = mpsc::channel(2);
        let (chunks, mut chunks_rx) = mpsc::channel(8);
        let writer = tokio::task::spawn_blocking(move || write_zip(rx, chunks, &about()));
        tokio::spawn(async move {
            for e in entries {
                if tx.send(e).await.is_err() {
                    break;
                }
            }
        });
        let mut out = Vec::new();
        while let Some(chunk) = chunks_rx.recv().await {
            let chunk = chunk?;
            assert!(chunk.len() <= CHUNK);
            out.extend_from_slice(&chunk);
        }
        writer.await.unwrap();
        Ok(out)
    }

    fn file(name: &str, png: &[u8]) -> Entry {
        Entry::File {
            name: name.into(),
            png: png.to_vec(),
            finished_at: Some(1_764_979_200_000 + 3_723_000), // 2025-12-06 01:02:03 UTC
        }
    }

    fn read(zip: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut archive = ::zip::ZipArchive::new(Cursor::new(zip)).unwrap();
        (0..archive.len())
            .map(|i| {
                let mut f = archive.by_index(i).unwrap();
                let mut b = Vec::new();
                f.read_to_end(&mut b).unwrap();
                (f.name().unwrap().to_string(), b)
            })
            .collect()
    }

    #[tokio::test]
    async fn a_stream_of_images_is_a_readable_zip() {
        let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let zip = zip_of(vec![
            file("1-000000-7.png", b"first"),
            file("1-000001-8.png", &big),
            Entry::End,
        ])
        .await
        .unwrap();
        let files = read(&zip);
        assert_eq!(files.len(), 2, "no README when nothing is missing");
        assert_eq!(files[0], ("1-000000-7.png".into(), b"first".to_vec()));
        assert_eq!(files[1].1, big);
        let mut archive = ::zip::ZipArchive::new(Cursor::new(&zip)).unwrap();
        let f = archive.by_index(1).unwrap();
        assert_eq!(f.compression(), CompressionMethod::Stored);
        let t = f.last_modified().unwrap();
        assert_eq!(
            (
                t.year(),
                t.month(),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            ),
            (2025, 12, 6, 1, 2, 2),
            "zip keeps even seconds"
        );
    }

    #[tokio::test]
    async fn skipped_images_and_cuts_are_listed_last() {
        let zip = zip_of(vec![
            file("1-000000-7.png", b"a"),
            Entry::Skipped {
                name: "1-000001-8.png".into(),
                why: "the image is missing from storage file:///srv".into(),
            },
            Entry::Cut,
        ])
        .await
        .unwrap();
        let files = read(&zip);
        assert_eq!(files.len(), 2);
        assert_eq!(files[1].0, "README.txt");
        let readme = String::from_utf8(files[1].1.clone()).unwrap();
        assert!(readme.contains("filter: seed < 3"), "{readme}");
        assert!(readme.contains("1 images."), "{readme}");
        assert!(readme.contains("Cut at 100000 images"), "{readme}");
        assert!(
            readme.contains("  1-000001-8.png: the image is missing from storage file:///srv"),
            "{readme}"
        );
    }

    #[tokio::test]
    async fn a_failed_read_aborts_the_body() {
        let e = zip_of(vec![file("1-000000-7.png", b"a"), Entry::Failed])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("reading the cells failed"));
        // A reader that vanishes without saying it is done is a failure too.
        assert!(zip_of(vec![file("a.png", b"a")]).await.is_err());
    }

    #[tokio::test]
    async fn a_closed_download_stops_the_writer() {
        let (tx, rx) = mpsc::channel(2);
        let (chunks, chunks_rx) = mpsc::channel(1);
        drop(chunks_rx);
        let writer = tokio::task::spawn_blocking(move || write_zip(rx, chunks, &about()));
        let big = vec![1u8; 4 * CHUNK];
        // The writer stops at the first image; the sender then sees it gone.
        let _ = tx.send(file("a.png", &big)).await;
        writer.await.unwrap();
        assert!(tx.send(Entry::End).await.is_err());
    }

    #[test]
    fn zip_times() {
        assert!(zip_time(0).is_none(), "1970 is before zip's epoch");
        let t = zip_time(951_782_400_000).unwrap(); // 2000-02-29 00:00:00
        assert_eq!((t.year(), t.month(), t.day()), (2000, 2, 29));
    }
}
