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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kiln_proto::SweepId;
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;

use super::holdings::MAX_PIPELINES;
use crate::clock::SharedClock;
use crate::store::{IntakeChunk, IntakeRow, Store};
use crate::sweep::{CellSpec, NewCell};
use crate::{Error, Result};

/// Largest uncompressed chunk a stored header may claim (a guard against a corrupt header).
const MAX_CHUNK_BYTES: usize = 256 << 20;

/// How long the mover waits after a database error before it tries again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// A submission's cells as they come, held compressed: numbered in order (with `dedup`,
/// repeats of a cell key are dropped, the first wins), the first `chunk` kept for the sweep's
/// own insert and every later `chunk` encoded into an intake chunk at once, so a million-cell
/// submission is held as its compressed chunks, not as cells. CPU work: off the async threads.
#[derive(Debug)]
pub struct Builder {
    chunk: usize,
    seen: Option<HashSet<[u8; 32]>>,
    first: Vec<NewCell>,
    pending: Vec<NewCell>,
    chunks: Vec<IntakeChunk>,
    count: u32,
    /// Pipelines (affinity keys) whose cells pin registry models, and those models: what the
    /// lease preference needs to know (`queue::holdings`), at most [`MAX_PIPELINES`] per build.
    pins: HashMap<String, Vec<String>>,
}

impl Builder {
    pub(super) fn new(chunk: usize, dedup: bool) -> Self {
        Builder {
            chunk: chunk.max(1),
            seen: dedup.then(HashSet::new),
            first: Vec::new(),
            pending: Vec::new(),
            chunks: Vec::new(),
            count: 0,
            pins: HashMap::new(),
        }
    }

    /// Cells so far (repeats not counted).
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// True before the first cell.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds `cell` as the next one (its number is set here), unless it repeats an earlier one.
    pub(super) fn push(&mut self, mut cell: NewCell) -> Result<()> {
        if let Some(seen) = &mut self.seen {
            let mut digest = [0u8; 32];
            hex::decode_to_slice(&cell.cell_key, &mut digest)
                .map_err(|e| Error::Corrupt(format!("cell key: {e}")))?;
            if !seen.insert(digest) {
                return Ok(());
            }
        }
        if self.pins.len() < MAX_PIPELINES && !self.pins.contains_key(&cell.affinity_key) {
            let pinned = cell.spec.pinned_models();
            if !pinned.is_empty() {
                self.pins.insert(cell.affinity_key.clone(), pinned);
            }
        }
        cell.number = self.count;
        self.count = self
            .count
            .checked_add(1)
            .ok_or_else(|| Error::TooLarge("cells".into()))?;
        if self.first.len() < self.chunk {
            self.first.push(cell);
        } else {
            self.pending.push(cell);
            if self.pending.len() == self.chunk {
                self.chunks.push(encode(&self.pending));
                self.pending.clear();
            }
        }
        Ok(())
    }

    /// The pinned models of the pipelines seen so far (taken out).
    pub(super) fn take_pins(&mut self) -> HashMap<String, Vec<String>> {
        std::mem::take(&mut self.pins)
    }

    /// The cells inserted with the sweep, and the intake chunks of the rest.
    pub(super) fn finish(mut self) -> (Vec<NewCell>, Vec<IntakeChunk>) {
        if !self.pending.is_empty() {
            self.chunks.push(encode(&self.pending));
        }
        (self.first, self.chunks)
    }
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

    fn split(cells: Vec<NewCell>, chunk: usize) -> (Vec<NewCell>, Vec<IntakeChunk>) {
        let mut b = Builder::new(chunk, true);
        for c in cells {
            b.push(c).unwrap();
        }
        b.finish()
    }

    #[test]
    fn repeats_are_dropped_and_the_rest_numbered_in_order() {
        let all = cells(5);
        let mut b = Builder::new(2, true);
        for c in [&all[0], &all[1], &all[0], &all[2], &all[1], &all[3]] {
            b.push(c.clone()).unwrap();
        }
        assert_eq!(b.len(), 4);
        let (direct, chunks) = b.finish();
        assert_eq!(direct.iter().map(|c| c.number).collect::<Vec<_>>(), [0, 1]);
        let back = decode(&row(&chunks[0])).unwrap();
        assert_eq!(back[0].cell_key, all[2].cell_key);
        assert_eq!((chunks[0].first_number, back[1].number), (2, 3));
        // Without `dedup` (planned cells, already distinct) every cell counts.
        let mut b = Builder::new(2, false);
        b.push(all[0].clone()).unwrap();
        b.push(all[0].clone()).unwrap();
        assert_eq!(b.len(), 2);
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
