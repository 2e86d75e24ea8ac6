//! The intake of large submissions. A submit of more cells than one chunk stores the first
//! chunk in `cells`, so leasing starts at once, and the rest as intake chunks (the store's
//! `intake` table): a few compressed rows instead of one row and nine index entries per cell,
//! so a sweep of 100,000 cells commits in a fraction of the time. The [`Mover`] then takes the
//! chunks into `cells` in the background, one chunk per transaction, oldest sweep first. On
//! SQLite this also leaves the one writer free for leases and completes between chunks, where
//! a whole sweep's insert used to hold it for seconds.
//!
//! A chunk is the cells' spec JSON, one per line, LZ4-compressed (block format, uncompressed
//! size prepended). Moving it re-derives each cell with [`NewCell::new`] from its JSON and its
//! number, so its keys and columns are exactly those a direct insert writes.

use std::sync::Arc;
use std::time::Duration;

use kiln_proto::SweepId;
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;

use crate::clock::SharedClock;
use crate::store::{IntakeChunk, IntakeRow, Store};
use crate::sweep::{CellSpec, NewCell};
use crate::{Error, Result};

/// Largest uncompressed chunk a stored header may claim (a guard against a corrupt header).
const MAX_CHUNK_BYTES: usize = 256 << 20;

/// How long the mover waits after a database error before it tries again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Splits prepared cells into those inserted with the sweep (the first `chunk`) and intake
/// chunks of `chunk` cells each for the rest, encoded on up to as many threads as there are
/// cores. CPU work: call it off the async threads.
pub(super) fn split(mut cells: Vec<NewCell>, chunk: usize) -> (Vec<NewCell>, Vec<IntakeChunk>) {
    let chunk = chunk.max(1);
    if cells.len() <= chunk {
        return (cells, Vec::new());
    }
    let rest = cells.split_off(chunk);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let per_thread = rest.len().div_ceil(chunk).div_ceil(threads).max(1) * chunk;
    let encoded: Vec<Vec<IntakeChunk>> = std::thread::scope(|scope| {
        let handles: Vec<_> = rest
            .chunks(per_thread)
            .map(|part| scope.spawn(move || part.chunks(chunk).map(encode).collect()))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    (cells, encoded.into_iter().flatten().collect())
}

/// One chunk of consecutively numbered cells.
fn encode(cells: &[NewCell]) -> IntakeChunk {
    let mut text = String::with_capacity(cells.iter().map(|c| c.spec_json.len() + 1).sum());
    for c in cells {
        // Compact JSON never holds a raw newline (serde escapes them inside strings).
        text.push_str(&c.spec_json);
        text.push('\n');
    }
    IntakeChunk {
        first_number: cells[0].number,
        cell_count: cells.len() as u32,
        cells: lz4_flex::compress_prepend_size(text.as_bytes()),
    }
}

/// The cells of a stored chunk, numbered from its first number. A chunk that does not decode
/// to exactly its count of valid cells is `Error::Corrupt`.
pub(super) fn decode(row: &IntakeRow) -> Result<Vec<NewCell>> {
    let corrupt = |why: String| {
        Error::Corrupt(format!(
            "intake chunk of sweep {} at cell {}: {why}",
            row.sweep_id, row.first_number
        ))
    };
    let claimed = row
        .cells
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| corrupt("shorter than its header".into()))?;
    if claimed > MAX_CHUNK_BYTES {
        return Err(corrupt(format!("claims {claimed} bytes")));
    }
    let bytes =
        lz4_flex::decompress_size_prepended(&row.cells).map_err(|e| corrupt(e.to_string()))?;
    let text = std::str::from_utf8(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() != row.cell_count as usize {
        return Err(corrupt(format!(
            "{} cells, {} expected",
            lines.len(),
            row.cell_count
        )));
    }
    lines
        .into_iter()
        .enumerate()
        .map(|(i, line)| {
            let spec: CellSpec = serde_json::from_str(line).map_err(|e| corrupt(e.to_string()))?;
            NewCell::new(row.first_number + i as u32, spec).map_err(|e| corrupt(e.to_string()))
        })
        .collect()
}

/// Moves every chunk waiting in the intake (of sweep `only` when given) into `cells`, in
/// (sweep, number) order, calling `moved` after each. A chunk that does not decode is logged
/// and left where it is (nothing is lost; it is tried again on the next pass); a database error
/// ends the pass. Returns the cells moved.
///
/// The next chunk is read and decoded (on a blocking thread) while the current one is written,
/// so the coordinator's CPU work overlaps the database's. `one_at_a_time` is held for the whole
/// pass: a pass that overlaps another (a `take_in` during the mover's) waits for it, then finds
/// what is left, instead of decoding the same chunks again. Correctness does not rest on it:
/// a chunk is claimed by [`Store::intake_move`] deleting it.
pub(super) async fn move_all(
    store: &Store,
    clock: &SharedClock,
    one_at_a_time: &Mutex<()>,
    only: Option<SweepId>,
    moved: &(dyn Fn() + Sync),
) -> Result<u64> {
    let _turn = one_at_a_time.lock().await;
    let mut after = None;
    let mut total = 0;
    let mut next = read_next(store, &mut after, only).await?;
    while let Some((row, decoding)) = next.take() {
        let decoded = decoding
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        next = read_next(store, &mut after, only).await?;
        let cells = match decoded {
            Ok(cells) => cells,
            Err(e) => {
                tracing::error!(error = %e, "intake chunk left in place");
                continue;
            }
        };
        if let Some(state) = store.intake_move(&row, &cells, clock.now()).await? {
            total += cells.len() as u64;
            tracing::debug!(
                sweep = %row.sweep_id,
                first = row.first_number,
                cells = cells.len(),
                state = state.as_str(),
                "intake chunk moved"
            );
            moved();
        }
    }
    Ok(total)
}

/// A chunk being decoded.
type Decoding = (Arc<IntakeRow>, JoinHandle<Result<Vec<NewCell>>>);

/// Reads the chunk after `after` (and advances it) and starts decoding it.
async fn read_next(
    store: &Store,
    after: &mut Option<(SweepId, u32)>,
    only: Option<SweepId>,
) -> Result<Option<Decoding>> {
    let Some(row) = store.intake_next(*after, only).await? else {
        return Ok(None);
    };
    *after = Some(row.key());
    let row = Arc::new(row);
    let decoding = {
        let row = Arc::clone(&row);
        tokio::task::spawn_blocking(move || decode(&row))
    };
    Ok(Some((row, decoding)))
}

/// The background mover: one task that runs [`move_all`] whenever it is woken (after a submit
/// with intake chunks, and on every maintenance tick, which covers chunks left by a stopped
/// coordinator). It ends when the last [`Mover`] handle is dropped.
#[derive(Debug)]
pub(super) struct Mover {
    wake: mpsc::Sender<()>,
}

impl Mover {
    /// Starts the task on the current runtime.
    pub(super) fn start(
        store: Store,
        clock: SharedClock,
        one_at_a_time: Arc<Mutex<()>>,
        moved: Box<dyn Fn() + Send + Sync>,
    ) -> Self {
        // One pending wake-up is enough: a pass started after it sees every chunk stored before.
        let (wake, mut rx) = mpsc::channel(1);
        tokio::spawn(async move {
            while rx.recv().await.is_some() {
                while let Err(e) = move_all(&store, &clock, &one_at_a_time, None, &*moved).await {
                    tracing::warn!(error = %e, "intake pass failed; trying again");
                    tokio::time::sleep(RETRY_AFTER).await;
                }
            }
        });
        Self { wake }
    }

    /// Asks for a pass (a no-op when one is already asked for).
    pub(super) fn wake(&self) {
        let _ = self.wake.try_send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::cell::tests::spec;

    fn cells(n: u32) -> Vec<NewCell> {
        (0..n)
            .map(|i| NewCell::new(i, spec(u64::from(i))).unwrap())
            .collect()
    }

    fn row(c: &IntakeChunk) -> IntakeRow {
        IntakeRow {
            sweep_id: SweepId(7),
            first_number: c.first_number,
            cell_count: c.cell_count,
            created_at: crate::clock::Millis(0),
            cells: c.cells.clone(),
        }
    }

    #[test]
    fn split_keeps_the_first_chunk_and_encodes_the_rest_in_order() {
        let all = cells(2_345);
        let (direct, chunks) = split(all.clone(), 1_000);
        assert_eq!(direct.len(), 1_000);
        let firsts: Vec<_> = chunks
            .iter()
            .map(|c| (c.first_number, c.cell_count))
            .collect();
        assert_eq!(firsts, [(1_000, 1_000), (2_000, 345)]);
        let back: Vec<NewCell> = chunks
            .iter()
            .flat_map(|c| decode(&row(c)).unwrap())
            .collect();
        assert_eq!(back.len(), 1_345);
        for (b, a) in back.iter().zip(&all[1_000..]) {
            assert_eq!(b.number, a.number);
            assert_eq!(b.cell_key, a.cell_key);
            assert_eq!(b.affinity_key, a.affinity_key);
            assert_eq!(b.spec_json, a.spec_json);
            assert_eq!(b.bindings_json, a.bindings_json);
        }
        // Repetitive JSON compresses well; the point of the chunks.
        let raw: usize = all[1_000..].iter().map(|c| c.spec_json.len()).sum();
        let stored: usize = chunks.iter().map(|c| c.cells.len()).sum();
        assert!(stored * 4 < raw, "{stored} bytes stored for {raw}");
    }

    #[test]
    fn a_small_submission_has_no_intake() {
        let (direct, chunks) = split(cells(10), 10);
        assert_eq!(direct.len(), 10);
        assert!(chunks.is_empty());
    }

    #[test]
    fn a_damaged_chunk_is_corrupt_not_a_panic() {
        let (_, chunks) = split(cells(30), 10);
        let good = row(&chunks[0]);
        let mut short = good.clone();
        short.cell_count += 1;
        let mut flipped = good.clone();
        let mid = flipped.cells.len() / 2;
        flipped.cells[mid] ^= 0xff;
        flipped.cells.truncate(mid + 3);
        let mut huge = good.clone();
        huge.cells[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let empty = IntakeRow {
            cells: Vec::new(),
            ..good.clone()
        };
        for bad in [short, flipped, huge, empty] {
            match decode(&bad) {
                Err(Error::Corrupt(m)) => assert!(m.contains("sweep 7 at cell 10"), "{m}"),
                other => panic!("expected Corrupt, got {other:?}"),
            }
        }
        assert_eq!(decode(&good).unwrap().len(), 10);
    }
}
