//! The dedupe index: recent keys in memory, older ones in immutable sorted
//! runs with filters.
//!
//! Every (source, id) appended to the log at or past the index's *mark* is
//! in [`DedupeIndex`]'s `recent` map, exactly (its dedupe key, the log
//! position and expiry of its newest event). When that map passes its
//! memory budget, it is written in bulk as one immutable *run*: the keys'
//! hashes, cut to 32 bits, sorted, with the log position of each event, in
//! chunks of [`CHUNK_ENTRIES`]; the run's chunks, its header and the new
//! mark go in one synced batch, and only then is the run used and `recent`
//! emptied. In memory each run keeps a binary fuse filter of its hashes
//! (about 9 bits a key) and the first hash of each chunk, so most lookups
//! of a new key touch no run at all.
//!
//! A run only narrows the search: a hash match is confirmed by reading the
//! event at its position from the log ([`Confirm`]) and comparing its
//! (source, id), so a collision never refuses a new event. Of equal hashes
//! the newest event is tried first; the newest confirmed event decides (as
//! a per-key entry overwritten by each accepted copy did).
//!
//! Expiry: a run whose newest expiry has passed can refuse nothing and is
//! skipped; the oldest such runs are deleted ([`DedupeIndex::drop_expired`]),
//! and `\0dropped` records the position below which runs were dropped.
//! Entries already expired when a run is written are left out of it.
//!
//! Merges: neighbouring runs are merged into one (size-tiered: four runs
//! of similar size at once, see [`DedupeIndex::plan_merge`]), so the run
//! count stays near (unexpired keys ÷ the largest merged run) plus a few,
//! instead of growing by one per flush. A merge reads the runs' chunks,
//! leaves out runs already expired, sorts the rest as one run and builds
//! its filter, all without changing the index; then one synced batch
//! writes the merged run's chunks and header over the first old run's keys
//! and removes every other old key, and only then does memory swap the
//! runs. A crash leaves either the old runs or the merged one, never a mix.
//! A merged run holds at most half the key-filter budget ÷ 64 bytes of
//! entries, which bounds a merge's memory.
//!
//! Memory: `recent` is flushed at its budget; the filters together stay
//! under theirs — past it the oldest runs lose their filters and their
//! chunks are read instead (answers never depend on a filter, only cost).
//!
//! ## Layout in the `dedupe` keyspace
//!
//! | key | value |
//! |---|---|
//! | `\0runs` | layout version (u64 BE, [`RUNS_VERSION`]); a keyspace without it holds an older form and is rebuilt |
//! | `\0position` ([`keys::DEDUPE_MARK`]) | the mark (u64 BE): runs hold every key appended below it |
//! | `\0dropped` | position (u64 BE) below which expired runs were deleted (absent: 0) |
//! | `0x01`, run first position (u64 BE), chunk number (u32 BE) | a chunk, below |
//! | `0x02`, run first position (u64 BE) | run header: end position (u64 BE), newest expiry (i64 BE), entries (u64 BE), chunks (u32 BE) |
//!
//! A chunk: entries `n` (varint), smallest position `base` (varint),
//! position width `w` in bytes (1 byte, 1..=8), then the `n` hashes sorted
//! ascending as varint deltas (the first from 0), then `n` positions minus
//! `base`, `w` bytes little-endian each, in the hashes' order (of equal
//! hashes, the newest first). Decoding checks every count and length.
//!
//! **Invariants:** the runs tile `[dropped, mark)` (each starts where the
//! one before ends), and every key appended at or past the mark is in
//! `recent`; so the index holds the newest entry of every unexpired
//! (source, id) in the log. A run is referenced (its header and the mark
//! written) in the same synced batch as its chunks. Anything that does not
//! hold when the store opens (a missing chunk, a bad count, a mark that the
//! runs do not reach) rebuilds the index from the log
//! (`writer/dedupe.rs`).

use std::ops::Range;

use fjall::{Keyspace, PersistMode, Readable};
use rustc_hash::FxHashMap;
use xorf::{BinaryFuse8, Filter};

use crate::StoreError;
use crate::block::{Reader, put_varint};
use crate::keys;
use crate::log::BlockReader;

/// The key of the layout version.
pub(crate) const RUNS_KEY: &[u8] = b"\0runs";
/// The layout this build writes.
pub(crate) const RUNS_VERSION: u64 = 1;
/// The key of the position below which expired runs were deleted.
pub(crate) const DROPPED_KEY: &[u8] = b"\0dropped";
const CHUNK_TAG: u8 = 1;
const RUN_TAG: u8 = 2;
/// Entries per chunk: a lookup that passes a filter decodes one chunk.
pub(crate) const CHUNK_ENTRIES: usize = 4096;
/// What one entry of `recent` costs in memory, about (key, map slot).
const RECENT_ENTRY_BYTES: usize = 128;
/// What one entry costs a merge at its peak, about.
const MERGE_ENTRY_BYTES: usize = 64;
/// Runs of similar size merged at once.
const MERGE_FANOUT: usize = 4;
/// Past this many runs a merge no longer waits for runs of similar size.
pub(crate) const MAX_RUNS: usize = 24;

/// Reads the event at a log position, to confirm a hash match.
pub(crate) trait Confirm {
    /// The expiry (seconds) of the event at `seq` when it is (source, id);
    /// `None` when it is another event (or the log does not hold `seq`).
    fn confirm(&mut self, seq: u64, source: &str, id: &str) -> Result<Option<i64>, StoreError>;
}

/// Confirms through the log: the event's (source, id) read from its block.
pub(crate) struct LogConfirm<'a, R: Readable> {
    pub reader: BlockReader<'a, R>,
    pub horizon_seconds: i64,
}

impl<R: Readable> Confirm for LogConfirm<'_, R> {
    fn confirm(&mut self, seq: u64, source: &str, id: &str) -> Result<Option<i64>, StoreError> {
        let Some(block) = self.reader.block(seq)? else {
            return Ok(None);
        };
        let i = (seq - block.first) as usize;
        if block.source(i) != source || block.id(i) != id {
            return Ok(None);
        }
        let at = block
            .ingested_at(i)
            .as_second()
            .max(block.time(i).as_second());
        Ok(Some(at + self.horizon_seconds))
    }
}

/// A merge of neighbouring runs, built and not yet installed.
pub(crate) struct Merge {
    /// The runs merged, by index, oldest first.
    range: Range<usize>,
    /// Each merged run's first position, end and chunk count.
    old_chunks: Vec<(u64, u64, usize)>,
    run: Run,
    chunks: Vec<Vec<u8>>,
}

/// One immutable run, as memory keeps it.
struct Run {
    first: u64,
    end: u64,
    max_expires: i64,
    entries: u64,
    /// The first hash of each chunk.
    chunk_firsts: Vec<u32>,
    filter: Option<BinaryFuse8>,
}

impl Run {
    fn filter_bytes(&self) -> usize {
        self.filter
            .as_ref()
            .map_or(0, |f| f.fingerprints.len() + 32)
    }
}

/// The index; see the module docs.
pub(crate) struct DedupeIndex {
    recent: FxHashMap<Box<[u8]>, (u64, i64)>,
    /// Oldest first.
    runs: Vec<Run>,
    dropped: u64,
    mark: u64,
    /// Bits of hash kept (32; fewer in tests, to force collisions).
    hash_bits: u32,
    recent_budget: usize,
    filter_budget: usize,
    /// Runs merged at once, of similar size (see [`DedupeIndex::plan_merge`]).
    merge_fanout: usize,
    /// Most entries a merged run may hold: bounds a merge's memory.
    max_merge_entries: u64,
}

/// The hash, cut to `bits`, of a dedupe key (whose first 8 bytes are the
/// 64-bit hash of the pair, see [`keys::dedupe_key`]).
fn cut_hash(dkey: &[u8], bits: u32) -> u32 {
    let mut top = [0u8; 4];
    for (to, from) in top.iter_mut().zip(dkey) {
        *to = *from;
    }
    u32::from_be_bytes(top) >> (32 - bits)
}

fn u64_at(raw: &[u8], at: usize) -> Result<u64, StoreError> {
    raw.get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or(StoreError::Corrupt("dedupe run header"))
}

fn chunk_key(first: u64, chunk: u32) -> [u8; 13] {
    let mut key = [0u8; 13];
    key[0] = CHUNK_TAG;
    key[1..9].copy_from_slice(&first.to_be_bytes());
    key[9..].copy_from_slice(&chunk.to_be_bytes());
    key
}

fn run_key(first: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = RUN_TAG;
    key[1..].copy_from_slice(&first.to_be_bytes());
    key
}

/// Encodes sorted `(hash, seq)` entries as one chunk value.
fn encode_chunk(entries: &[(u32, u64)]) -> Vec<u8> {
    let base = entries.iter().map(|e| e.1).min().unwrap_or(0);
    let span = entries.iter().map(|e| e.1 - base).max().unwrap_or(0);
    let width = (8 - span.leading_zeros() as usize / 8).max(1);
    let mut out = Vec::with_capacity(entries.len() * (3 + width) + 12);
    put_varint(&mut out, entries.len() as u64);
    put_varint(&mut out, base);
    out.push(width as u8);
    let mut previous = 0u32;
    for (hash, _) in entries {
        put_varint(&mut out, u64::from(hash - previous));
        previous = *hash;
    }
    for (_, seq) in entries {
        out.extend_from_slice(&(seq - base).to_le_bytes()[..width]);
    }
    out
}

/// Decodes a chunk value into `(hash, seq)` entries.
fn decode_chunk(value: &[u8], out: &mut Vec<(u32, u64)>) -> Result<(), StoreError> {
    const BAD: StoreError = StoreError::Corrupt("dedupe chunk");
    let mut r = Reader::new(value);
    let n = usize::try_from(r.varint()?).map_err(|_| BAD)?;
    if n == 0 || n > CHUNK_ENTRIES {
        return Err(BAD);
    }
    let base = r.varint()?;
    let width = usize::from(value[r.take(1)?.start]);
    if !(1..=8).contains(&width) {
        return Err(BAD);
    }
    let start = out.len();
    let mut hash = 0u64;
    for _ in 0..n {
        hash = hash.checked_add(r.varint()?).ok_or(BAD)?;
        out.push((u32::try_from(hash).map_err(|_| BAD)?, 0));
    }
    let seqs = r.take(n * width)?;
    if seqs.end != value.len() {
        return Err(BAD);
    }
    for (entry, raw) in out[start..].iter_mut().zip(value[seqs].chunks_exact(width)) {
        let mut le = [0u8; 8];
        le[..width].copy_from_slice(raw);
        entry.1 = base.checked_add(u64::from_le_bytes(le)).ok_or(BAD)?;
    }
    Ok(())
}

impl DedupeIndex {
    /// An empty index whose runs would start at `mark`.
    pub fn new(mark: u64, key_filter_bytes: usize) -> DedupeIndex {
        DedupeIndex {
            recent: FxHashMap::default(),
            runs: Vec::new(),
            dropped: mark,
            mark,
            hash_bits: 32,
            recent_budget: (key_filter_bytes / 4).max(RECENT_ENTRY_BYTES),
            filter_budget: key_filter_bytes,
            merge_fanout: MERGE_FANOUT,
            // A merge holds about 60 bytes an entry at its peak (entries,
            // hashes, the filter being built, the encoded chunks): at most
            // twice the `recent` budget.
            max_merge_entries: (key_filter_bytes / 2 / MERGE_ENTRY_BYTES).max(1) as u64,
        }
    }

    /// Merges `fanout` runs at once, into runs of at most `max_entries`.
    #[cfg(test)]
    pub fn with_merges(mut self, fanout: usize, max_entries: u64) -> DedupeIndex {
        self.merge_fanout = fanout.max(2);
        self.max_merge_entries = max_entries;
        self
    }

    /// Keeps only `bits` of each hash (tests force collisions with few).
    #[cfg(test)]
    pub fn with_hash_bits(mut self, bits: u32) -> DedupeIndex {
        self.hash_bits = bits.clamp(1, 32);
        self
    }

    /// The position the runs include.
    pub fn mark(&self) -> u64 {
        self.mark
    }

    /// The number of runs.
    pub fn runs(&self) -> usize {
        self.runs.len()
    }

    /// Entries in memory and in runs, and the filters' bytes.
    pub fn sizes(&self) -> (usize, u64, usize) {
        let in_runs = self.runs.iter().map(|r| r.entries).sum();
        let filters = self.runs.iter().map(Run::filter_bytes).sum();
        (self.recent.len(), in_runs, filters)
    }

    /// Notes that the event at `seq` (whose dedupe key is `dkey`) was
    /// appended; its entry expires at `expires`.
    pub fn insert(&mut self, dkey: &[u8], seq: u64, expires: i64) {
        match self.recent.get_mut(dkey) {
            Some(entry) => {
                if entry.0 <= seq {
                    *entry = (seq, expires);
                }
            }
            None => {
                self.recent.insert(dkey.into(), (seq, expires));
            }
        }
    }

    /// Whether `recent` has reached its memory budget.
    pub fn is_full(&self) -> bool {
        self.recent.len() * RECENT_ENTRY_BYTES >= self.recent_budget
    }

    /// The position and expiry of the newest event stored under `dkey`
    /// (that of (source, id)); runs whose newest expiry is at or before
    /// `alive_after` are skipped (pass `i64::MIN` to find expired events).
    /// Chunks are read from `keyspace` as it is (not a snapshot): they never
    /// change, and the lock on the index keeps a run from being dropped
    /// meanwhile.
    pub fn find(
        &self,
        keyspace: &Keyspace,
        pair: (&[u8], &str, &str),
        alive_after: i64,
        confirm: &mut dyn Confirm,
    ) -> Result<Option<(u64, i64)>, StoreError> {
        let (dkey, source, id) = pair;
        if let Some(entry) = self.recent.get(dkey) {
            return Ok(Some(*entry));
        }
        let hash = cut_hash(dkey, self.hash_bits);
        let mut entries = Vec::new();
        for run in self.runs.iter().rev() {
            if run.max_expires <= alive_after
                || run
                    .filter
                    .as_ref()
                    .is_some_and(|f| !f.contains(&u64::from(hash)))
            {
                continue;
            }
            entries.clear();
            read_candidates(keyspace, run, hash, &mut entries)?;
            for (_, seq) in entries.iter().filter(|e| e.0 == hash) {
                if let Some(expires) = confirm.confirm(*seq, source, id)? {
                    return Ok(Some((*seq, expires)));
                }
            }
        }
        Ok(None)
    }
}

/// The position of the newest event stored under (source, id) (`pair`
/// starts with its dedupe key), expired or not, for readers; the event is
/// confirmed in `view`'s log.
pub(crate) fn find_stored<R: Readable>(
    shared: &crate::Shared,
    view: &R,
    pair: (&[u8], &str, &str),
) -> Result<Option<u64>, StoreError> {
    let mut confirm = LogConfirm {
        reader: shared.log.reader(view),
        horizon_seconds: 0,
    };
    let index = shared
        .dedupe
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let found = index.find(&shared.keyspaces.dedupe, pair, i64::MIN, &mut confirm)?;
    Ok(found.map(|(seq, _)| seq))
}

/// The entries of `run`'s chunks that may hold `hash`, in order.
fn read_candidates(
    keyspace: &Keyspace,
    run: &Run,
    hash: u32,
    out: &mut Vec<(u32, u64)>,
) -> Result<(), StoreError> {
    // Equal hashes may straddle a chunk boundary: start at the last chunk
    // that begins before `hash`, go on while chunks begin at or before it.
    let at = run.chunk_firsts.partition_point(|first| *first < hash);
    for chunk in at.saturating_sub(1)..run.chunk_firsts.len() {
        if run.chunk_firsts[chunk] > hash {
            break;
        }
        let key = chunk_key(run.first, chunk as u32);
        let value = keyspace
            .get(key)?
            .ok_or(StoreError::Corrupt("dedupe chunk missing"))?;
        decode_chunk(&value, out)?;
    }
    Ok(())
}

// ---- writing and loading runs ---------------------------------------------

impl DedupeIndex {
    /// Writes `recent` (less what has expired by `now`) as a run covering
    /// the log up to `end`, synced, then uses it and empties `recent`.
    /// `end` must be where the log ends: every key appended below it is in
    /// `recent` or an older run.
    pub fn flush(
        &mut self,
        db: &fjall::Database,
        keyspace: &Keyspace,
        end: u64,
        now: i64,
    ) -> Result<(), StoreError> {
        if end == self.mark {
            return Ok(());
        }
        let bits = self.hash_bits;
        let mut max_expires = i64::MIN;
        let mut entries: Vec<(u32, u64)> = Vec::with_capacity(self.recent.len());
        for (dkey, (seq, expires)) in &self.recent {
            if *expires > now {
                max_expires = max_expires.max(*expires);
                entries.push((cut_hash(dkey, bits), *seq));
            }
        }
        // By hash, then newest first.
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        let first = self.mark;
        let mut batch = db.batch().durability(Some(PersistMode::SyncAll));
        let mut chunk_firsts = Vec::with_capacity(entries.len() / CHUNK_ENTRIES + 1);
        for (n, chunk) in entries.chunks(CHUNK_ENTRIES).enumerate() {
            chunk_firsts.push(chunk[0].0);
            batch.insert(keyspace, chunk_key(first, n as u32), encode_chunk(chunk));
        }
        let run = Run {
            first,
            end,
            max_expires,
            entries: entries.len() as u64,
            filter: None,
            chunk_firsts,
        };
        let joined = if !entries.is_empty() {
            batch.insert(keyspace, run_key(first), header(&run));
            None
        } else if let Some(last) = self.runs.last() {
            // An empty stretch joins the run before it.
            let mut last = Run {
                chunk_firsts: last.chunk_firsts.clone(),
                filter: None,
                ..*last
            };
            last.end = end;
            batch.insert(keyspace, run_key(last.first), header(&last));
            Some(end)
        } else {
            // Nothing unexpired below `end`: the runs start there.
            batch.insert(keyspace, DROPPED_KEY, end.to_be_bytes());
            None
        };
        batch.insert(keyspace, RUNS_KEY, RUNS_VERSION.to_be_bytes());
        batch.insert(keyspace, keys::DEDUPE_MARK, end.to_be_bytes());
        batch.commit()?;
        if !entries.is_empty() {
            self.runs.push(Run {
                filter: build_filter(&entries),
                ..run
            });
        } else if let (Some(end), Some(last)) = (joined, self.runs.last_mut()) {
            last.end = end;
        } else {
            self.dropped = end;
        }
        self.mark = end;
        let (recent, in_runs, filters) = self.sizes();
        tracing::debug!(
            written = recent,
            runs = self.runs.len(),
            in_runs,
            filter_bytes = filters,
            mark = end,
            "dedupe keys written as a run"
        );
        self.recent.clear();
        self.recent
            .shrink_to(self.recent_budget / RECENT_ENTRY_BYTES / 4);
        self.keep_filters_in_budget();
        Ok(())
    }

    /// Drops the filters of the oldest runs while they pass the budget.
    fn keep_filters_in_budget(&mut self) {
        let mut total: usize = self.runs.iter().map(Run::filter_bytes).sum();
        for run in &mut self.runs {
            if total <= self.filter_budget {
                break;
            }
            total -= run.filter_bytes();
            run.filter = None;
        }
    }

    /// Deletes the oldest runs whose every entry has expired by `now`;
    /// returns whether it deleted any.
    pub fn drop_expired(
        &mut self,
        db: &fjall::Database,
        keyspace: &Keyspace,
        now: i64,
    ) -> Result<bool, StoreError> {
        let expired = self
            .runs
            .iter()
            .take_while(|run| run.max_expires <= now)
            .count();
        if expired == 0 {
            return Ok(false);
        }
        let mut batch = db.batch().durability(Some(PersistMode::SyncAll));
        for run in &self.runs[..expired] {
            for chunk in 0..run.chunk_firsts.len() {
                batch.remove(keyspace, chunk_key(run.first, chunk as u32));
            }
            batch.remove(keyspace, run_key(run.first));
        }
        let dropped = self.runs[expired - 1].end;
        batch.insert(keyspace, DROPPED_KEY, dropped.to_be_bytes());
        batch.commit()?;
        self.runs.drain(..expired);
        self.dropped = dropped;
        Ok(true)
    }

    /// The runs to merge next, oldest first, if any: the cheapest window of
    /// `merge_fanout` neighbours of similar size (none more than twice the
    /// smallest, runs already expired by `now` counting as empty) whose
    /// entries fit one merged run; past [`MAX_RUNS`] runs, the cheapest
    /// pair that fits.
    pub fn plan_merge(&self, now: i64) -> Option<Range<usize>> {
        let size = |run: &Run| {
            if run.max_expires <= now {
                0
            } else {
                run.entries
            }
        };
        let fits = |window: &[Run]| window.iter().map(size).sum::<u64>() <= self.max_merge_entries;
        let cheapest = |width: usize, similar: bool| {
            (0..self.runs.len().saturating_sub(width - 1))
                .map(|at| at..at + width)
                .filter(|range| {
                    let window = &self.runs[range.clone()];
                    let smallest = window.iter().map(size).min().unwrap_or(0);
                    fits(window)
                        && (!similar || window.iter().all(|r| size(r) <= 2 * smallest.max(1)))
                })
                .min_by_key(|range| self.runs[range.clone()].iter().map(size).sum::<u64>())
        };
        cheapest(self.merge_fanout, true).or_else(|| {
            (self.runs.len() > MAX_RUNS)
                .then(|| cheapest(2, false))
                .flatten()
        })
    }

    /// Reads the runs of `range` and builds their merge: every entry of the
    /// runs not expired by `now`, sorted as one run. Reads only: the index
    /// is unchanged until [`DedupeIndex::install_merge`].
    pub fn prepare_merge(
        &self,
        keyspace: &Keyspace,
        range: Range<usize>,
        now: i64,
    ) -> Result<Merge, StoreError> {
        let window = &self.runs[range.clone()];
        let live: Vec<&Run> = window.iter().filter(|r| r.max_expires > now).collect();
        let mut entries = Vec::with_capacity(live.iter().map(|r| r.entries as usize).sum());
        for run in &live {
            for chunk in 0..run.chunk_firsts.len() {
                let value = keyspace
                    .get(chunk_key(run.first, chunk as u32))?
                    .ok_or(StoreError::Corrupt("dedupe chunk missing"))?;
                decode_chunk(&value, &mut entries)?;
            }
        }
        // By hash, then newest first, as a run written at once.
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        let mut chunks = Vec::with_capacity(entries.len() / CHUNK_ENTRIES + 1);
        let mut chunk_firsts = Vec::with_capacity(chunks.capacity());
        for chunk in entries.chunks(CHUNK_ENTRIES) {
            chunk_firsts.push(chunk[0].0);
            chunks.push(encode_chunk(chunk));
        }
        let run = Run {
            first: window[0].first,
            end: window[window.len() - 1].end,
            max_expires: live.iter().map(|r| r.max_expires).max().unwrap_or(i64::MIN),
            entries: entries.len() as u64,
            filter: build_filter(&entries),
            chunk_firsts,
        };
        Ok(Merge {
            range,
            old_chunks: window
                .iter()
                .map(|r| (r.first, r.end, r.chunk_firsts.len()))
                .collect(),
            run,
            chunks,
        })
    }

    /// Replaces the merged runs by their merge in one synced batch, then in
    /// memory. Refused (nothing changes) if the runs are no longer those
    /// the merge was prepared from.
    pub fn install_merge(
        &mut self,
        db: &fjall::Database,
        keyspace: &Keyspace,
        merge: Merge,
    ) -> Result<bool, StoreError> {
        let current = self.runs.get(merge.range.clone()).map(|runs| {
            runs.iter()
                .map(|r| (r.first, r.end, r.chunk_firsts.len()))
                .collect::<Vec<_>>()
        });
        if current.as_ref() != Some(&merge.old_chunks) {
            return Ok(false);
        }
        let first = merge.run.first;
        let mut batch = db.batch().durability(Some(PersistMode::SyncAll));
        // One write per key: the merged run's chunks and header overwrite
        // those of the first old run; every other old key is removed.
        for (run_first, _, chunks) in &merge.old_chunks {
            let kept = if *run_first == first {
                merge.chunks.len()
            } else {
                batch.remove(keyspace, run_key(*run_first));
                0
            };
            for chunk in kept..*chunks {
                batch.remove(keyspace, chunk_key(*run_first, chunk as u32));
            }
        }
        for (n, chunk) in merge.chunks.into_iter().enumerate() {
            batch.insert(keyspace, chunk_key(first, n as u32), chunk);
        }
        batch.insert(keyspace, run_key(first), header(&merge.run));
        batch.commit()?;
        tracing::debug!(
            merged = merge.range.len(),
            entries = merge.run.entries,
            runs = self.runs.len() + 1 - merge.range.len(),
            "dedupe runs merged"
        );
        self.runs.splice(merge.range, [merge.run]);
        self.keep_filters_in_budget();
        Ok(true)
    }

    /// Plans, prepares and installs one merge; whether it merged.
    #[cfg(test)]
    pub fn merge_step(
        &mut self,
        db: &fjall::Database,
        keyspace: &Keyspace,
        now: i64,
    ) -> Result<bool, StoreError> {
        let Some(range) = self.plan_merge(now) else {
            return Ok(false);
        };
        let merge = self.prepare_merge(keyspace, range, now)?;
        self.install_merge(db, keyspace, merge)
    }

    /// The index the keyspace holds, every run read back and checked;
    /// `None` when it holds no index of this layout, or a damaged one.
    pub fn load(keyspace: &Keyspace, key_filter_bytes: usize) -> Result<Option<Self>, StoreError> {
        let version = keyspace.get(RUNS_KEY)?;
        if version.as_deref() != Some(&RUNS_VERSION.to_be_bytes()[..]) {
            return Ok(None);
        }
        let Some(mark) = keyspace.get(keys::DEDUPE_MARK)? else {
            return Ok(None);
        };
        let mark = keys::read_u64(&mark)?;
        let dropped = match keyspace.get(DROPPED_KEY)? {
            Some(raw) => keys::read_u64(&raw)?,
            None => 0,
        };
        let mut index = DedupeIndex::new(mark, key_filter_bytes);
        index.dropped = dropped;
        let mut at = dropped;
        for item in keyspace.prefix([RUN_TAG]) {
            let (key, header) = item.into_inner()?;
            let first = u64_at(&key, 1)?;
            match load_run(keyspace, first, &header)? {
                Some(run) if run.first == at && run.end <= mark => {
                    at = run.end;
                    index.runs.push(run);
                }
                _ => return Ok(None),
            }
        }
        if at != mark {
            return Ok(None);
        }
        index.keep_filters_in_budget();
        Ok(Some(index))
    }
}

/// A run's header value (see the layout in the module docs).
fn header(run: &Run) -> Vec<u8> {
    let mut header = Vec::with_capacity(28);
    header.extend_from_slice(&run.end.to_be_bytes());
    header.extend_from_slice(&run.max_expires.to_be_bytes());
    header.extend_from_slice(&run.entries.to_be_bytes());
    header.extend_from_slice(&(run.chunk_firsts.len() as u32).to_be_bytes());
    header
}

/// One run read back from its header and chunks; `None` when they do not
/// agree.
fn load_run(keyspace: &Keyspace, first: u64, header: &[u8]) -> Result<Option<Run>, StoreError> {
    if header.len() != 28 {
        return Ok(None);
    }
    let end = u64_at(header, 0)?;
    let max_expires = u64_at(header, 8)? as i64;
    let entries = u64_at(header, 16)?;
    let chunks = u32::from_be_bytes([header[24], header[25], header[26], header[27]]);
    let mut all = Vec::new();
    let mut chunk_firsts = Vec::with_capacity(chunks as usize);
    for (n, item) in keyspace.prefix(&chunk_key(first, 0)[..9]).enumerate() {
        let (key, value) = item.into_inner()?;
        if key[..] != chunk_key(first, n as u32) {
            return Ok(None);
        }
        let before = all.len();
        if decode_chunk(&value, &mut all).is_err() {
            return Ok(None);
        }
        chunk_firsts.push(all[before].0);
    }
    let sorted = all.windows(2).all(|w| w[0].0 <= w[1].0);
    if chunk_firsts.len() != chunks as usize || all.len() as u64 != entries || !sorted {
        return Ok(None);
    }
    if all.iter().any(|(_, seq)| *seq < first || *seq >= end) {
        return Ok(None);
    }
    Ok(Some(Run {
        first,
        end,
        max_expires,
        entries,
        chunk_firsts,
        filter: build_filter(&all),
    }))
}

/// The filter of a run's hashes; `None` (every lookup reads chunks) if it
/// cannot be built.
fn build_filter(entries: &[(u32, u64)]) -> Option<BinaryFuse8> {
    let mut hashes: Vec<u64> = entries.iter().map(|e| u64::from(e.0)).collect();
    hashes.dedup();
    BinaryFuse8::try_from(&hashes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// A log in memory: (source, expiry) per position; ids are empty.
    struct VecLog(Vec<(String, i64)>);

    impl Confirm for &VecLog {
        fn confirm(&mut self, seq: u64, source: &str, id: &str) -> Result<Option<i64>, StoreError> {
            Ok(self
                .0
                .get(seq as usize)
                .filter(|(s, _)| s == source && id.is_empty())
                .map(|(_, expires)| *expires))
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Offer the event of key `k`, expiring `ttl` seconds from now.
        Offer(u8, i64),
        Advance(i64),
        Flush,
        DropExpired,
        /// Close and open again: the runs read back, the log past the
        /// mark read into memory, as the writer does.
        Reopen,
        /// A merge as the writer plans it.
        Merge,
        /// A merge of `width` runs from the `at`th (modulo the runs), of
        /// any sizes.
        MergeAt(u8, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (0u8..40, 1i64..50).prop_map(|(k, ttl)| Op::Offer(k, ttl)),
            2 => (1i64..30).prop_map(Op::Advance),
            1 => Just(Op::Flush),
            1 => Just(Op::DropExpired),
            1 => Just(Op::Reopen),
            1 => Just(Op::Merge),
            1 => (any::<u8>(), 2u8..5).prop_map(|(at, width)| Op::MergeAt(at, width)),
        ]
    }

    fn open_keyspace(dir: &std::path::Path) -> (fjall::Database, Keyspace) {
        let db = fjall::Database::builder(dir).open().unwrap();
        let ks = db
            .keyspace("dedupe", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        (db, ks)
    }

    /// Opens the index as the writer does: load (it must read back once a
    /// run was written), else start empty, then read the log past the mark.
    fn reopen(ks: &Keyspace, log: &VecLog, bits: u32, now: i64, written: bool) -> DedupeIndex {
        let loaded = DedupeIndex::load(ks, 1 << 20).unwrap();
        assert!(loaded.is_some() || !written, "the index reads back");
        let mut index = loaded
            .unwrap_or_else(|| DedupeIndex::new(0, 1 << 20))
            .with_hash_bits(bits)
            .with_merges(2, 12);
        for seq in index.mark()..log.0.len() as u64 {
            let (source, expires) = &log.0[seq as usize];
            if *expires > now {
                index.insert(&keys::dedupe_key(source, ""), seq, *expires);
            }
        }
        index
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The runs and memory together answer as a map of each key's
        /// newest expiry does, whatever the flushes, merges (expired runs
        /// left out of them), drops and reopenings, with hashes cut to a
        /// few bits so that most lookups collide.
        #[test]
        fn runs_answer_as_a_naive_model(bits in 1u32..6, ops in prop::collection::vec(op(), 1..160)) {
            let dir = tempfile::tempdir().unwrap();
            let (mut db, mut ks) = open_keyspace(dir.path());
            let mut index = DedupeIndex::new(0, 1 << 20).with_hash_bits(bits).with_merges(2, 12);
            let mut written = false;
            let mut log = VecLog(Vec::new());
            let mut model: HashMap<String, (u64, i64)> = HashMap::new();
            let mut now = 100i64;
            for op in ops {
                match op {
                    Op::Offer(k, ttl) => {
                        let source = format!("s{k}");
                        let dkey = keys::dedupe_key(&source, "");
                        let expected = model.get(&source).is_some_and(|(_, e)| *e > now);
                        let found = index.find(&ks, (&dkey, &source, ""), now, &mut &log).unwrap();
                        let duplicate = found.is_some_and(|(_, e)| e > now);
                        prop_assert_eq!(duplicate, expected, "key {} at {}", source, now);
                        if let Some((seq, e)) = model.get(&source).filter(|(_, e)| *e > now) {
                            prop_assert_eq!(found, Some((*seq, *e)));
                        }
                        if !duplicate {
                            let seq = log.0.len() as u64;
                            log.0.push((source.clone(), now + ttl));
                            index.insert(&dkey, seq, now + ttl);
                            model.insert(source, (seq, now + ttl));
                        }
                    }
                    Op::Advance(dt) => now += dt,
                    Op::Flush => {
                        index.flush(&db, &ks, log.0.len() as u64, now).unwrap();
                        written |= !log.0.is_empty();
                    }
                    Op::DropExpired => {
                        index.drop_expired(&db, &ks, now).unwrap();
                    }
                    Op::Merge => {
                        index.merge_step(&db, &ks, now).unwrap();
                    }
                    Op::MergeAt(at, width) => {
                        let runs = index.runs();
                        let width = usize::from(width).min(runs);
                        if width >= 2 {
                            let at = usize::from(at) % (runs - width + 1);
                            let merge = index.prepare_merge(&ks, at..at + width, now).unwrap();
                            prop_assert!(index.install_merge(&db, &ks, merge).unwrap());
                            prop_assert_eq!(index.runs(), runs + 1 - width);
                        }
                    }
                    Op::Reopen => {
                        drop(ks);
                        drop(db);
                        (db, ks) = open_keyspace(dir.path());
                        index = reopen(&ks, &log, bits, now, written);
                    }
                }
            }
        }
    }

    #[test]
    fn merges_keep_the_run_count_bounded_and_every_key() {
        let dir = tempfile::tempdir().unwrap();
        let (db, ks) = open_keyspace(dir.path());
        // Runs of 100 keys, merged 4 at a time up to 1,600 keys a run.
        let mut index = DedupeIndex::new(0, 1 << 20).with_merges(4, 1600);
        let mut most = 0;
        for run in 0..200u64 {
            for seq in run * 100..(run + 1) * 100 {
                index.insert(&keys::dedupe_key("s", &seq.to_string()), seq, 1000);
            }
            index.flush(&db, &ks, (run + 1) * 100, 0).unwrap();
            while index.merge_step(&db, &ks, 0).unwrap() {}
            most = most.max(index.runs());
        }
        // 20,000 keys: 12 runs of 1,600 and what is left below them.
        assert!(most <= 12 + 3 + 3, "{most} runs");
        assert_eq!(index.sizes().1, 20_000);
        let index = DedupeIndex::load(&ks, 1 << 20).unwrap().unwrap();
        assert_eq!(index.sizes().1, 20_000);
        assert!(index.runs() <= 18);
        // Expired runs are left out of a merge.
        let mut index = index.with_merges(2, u64::MAX);
        while index.merge_step(&db, &ks, 1000).unwrap() {}
        assert_eq!((index.runs(), index.sizes().1), (1, 0));
        let index = DedupeIndex::load(&ks, 1 << 20).unwrap().unwrap();
        assert_eq!((index.runs(), index.sizes().1), (1, 0));
    }

    #[test]
    fn a_merge_of_runs_that_changed_meanwhile_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (db, ks) = open_keyspace(dir.path());
        let mut index = DedupeIndex::new(0, 1 << 20).with_merges(2, u64::MAX);
        for run in 0..3u64 {
            index.insert(&keys::dedupe_key("s", &run.to_string()), run, 1000);
            index.flush(&db, &ks, run + 1, 0).unwrap();
        }
        let stale = index.prepare_merge(&ks, 0..2, 0).unwrap();
        let fresh = index.prepare_merge(&ks, 1..3, 0).unwrap();
        assert!(index.install_merge(&db, &ks, fresh).unwrap());
        assert!(!index.install_merge(&db, &ks, stale).unwrap());
        assert_eq!((index.runs(), index.sizes().1), (2, 3));
    }

    #[test]
    fn a_damaged_run_is_not_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let (db, ks) = open_keyspace(dir.path());
        let mut index = DedupeIndex::new(0, 1 << 20);
        for seq in 0..10_000u64 {
            index.insert(&keys::dedupe_key("s", &seq.to_string()), seq, 1000);
        }
        index.flush(&db, &ks, 10_000, 0).unwrap();
        assert!(DedupeIndex::load(&ks, 1 << 20).unwrap().is_some());
        ks.remove(chunk_key(0, 1)).unwrap();
        assert!(DedupeIndex::load(&ks, 1 << 20).unwrap().is_none());
    }

    #[test]
    fn chunks_round_trip_and_refuse_damage() {
        let entries: Vec<(u32, u64)> = (0..1000u32)
            .map(|i| (i * 7919 % 100_003 / 3 * 3, u64::from(i) * 13 + 5))
            .collect();
        let mut sorted = entries.clone();
        sorted.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        let value = encode_chunk(&sorted);
        let mut back = Vec::new();
        decode_chunk(&value, &mut back).unwrap();
        assert_eq!(back, sorted);
        for cut in 0..value.len() {
            let mut out = Vec::new();
            assert!(
                decode_chunk(&value[..cut], &mut out).is_err(),
                "cut at {cut}"
            );
        }
        let mut longer = value.clone();
        longer.push(0);
        assert!(decode_chunk(&longer, &mut Vec::new()).is_err());
    }
}
