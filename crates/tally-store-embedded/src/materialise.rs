//! The materialiser: derived state built from the log behind the
//! acknowledgement, in bulk.
//!
//! Three parts, each behind its own seam so another backend can supply it
//! (a broker's stream as the log, a column store as the derived store):
//! - the log ([`crate::log::EventLog`]; here event blocks in the `log`
//!   keyspace), appended and synced by the writer before it answers
//!   ([`crate::writer`]), read by the replay at open and by backfill;
//! - the tail ([`crate::tail`]): what the log holds past the materialised
//!   position, already turned into rollup deltas, quarantine and dictionary
//!   entries, in memory;
//! - a [`DerivedStore`]: takes consecutive tail chunks and folds them in
//!   atomically with the position they end at. [`FjallDerived`] merges the
//!   chunks' deltas in key order (a k-way merge of their sorted runs),
//!   reads each bucket's stored state once (skipped for keys the filter
//!   knows are new; a bounded cache keeps day buckets and buckets read
//!   again), and writes rollups, quarantine and dictionary entries and the
//!   position in one batch (dedupe keys are the writer's: `crate::dedupe`).
//!
//! [`run`] is the materialiser thread: it waits for a bulk of chunks (or
//! for the oldest to have waited a little), folds them in, and trims the
//! tail. The writer drains the tail itself, under the same lock, before any
//! operation that reads or rewrites derived state (catalog changes, voids,
//! backfill), so those see a fully materialised store, exactly as when
//! rollups were written with the log.
//!
//! **Invariants:** only the holder of the [`FjallDerived`] lock writes
//! rollups; chunks are taken from the tail after that lock is taken and
//! trimmed before it is released, so no chunk is folded in twice. After a
//! crash, the store holds the rollups of exactly the log before its
//! recorded position (batches are atomic), and opening the store replays
//! the rest of the log into the tail: the answers equal a rebuild from the
//! log.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::collections::binary_heap::PeekMut;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustc_hash::FxHashMap;
use tally_meter::AggState;
use tracing::warn;

use crate::keys::{self, RollupKey};
use crate::known::{self, KnownKeys};
use crate::tail::{MATERIALISED_KEY, Tail, TailChunk};
use crate::{Shared, StoreError, dict};

/// Most rollup states kept in memory between read-modify-writes (about
/// 100 bytes each): two generations of at most half as many.
const ROLLUP_CACHE_ENTRIES: usize = 500_000;
/// A bulk worth materialising at once, in events.
const BULK_EVENTS: u64 = 100_000;
/// Most events folded in one batch.
const MAX_BULK_EVENTS: u64 = 400_000;

/// Where derived state is stored.
pub(crate) trait DerivedStore: Send {
    /// Folds `chunks` (consecutive, oldest first, none folded before) in,
    /// atomically with the position they end at; returns that position.
    fn materialise(&mut self, chunks: &[Arc<TailChunk>]) -> Result<u64, StoreError>;
}

/// Rollup deltas, merged before touching the store. They are collected as
/// they come, then sorted once and neighbours merged: cheaper than a hash
/// map when, as under most loads, few of a batch's keys repeat.
#[derive(Default)]
pub(crate) struct Deltas(pub Vec<(RollupKey, AggState)>);

impl Deltas {
    pub fn add(&mut self, key: RollupKey, state: AggState) -> Result<(), StoreError> {
        match self.0.last_mut() {
            // An event's bucket repeated by the next event: merged at once.
            Some((last, existing)) if *last == key => {
                existing.merge(&state).map_err(StoreError::State)
            }
            _ => {
                self.0.push((key, state));
                Ok(())
            }
        }
    }

    /// Every key once, in key order, with its deltas merged.
    pub fn merged(self) -> Result<Vec<(RollupKey, AggState)>, StoreError> {
        let mut deltas = self.0;
        deltas.sort_unstable_by_key(|(key, _)| *key);
        let mut failed = None;
        deltas.dedup_by(|later, earlier| {
            if later.0 != earlier.0 {
                return false;
            }
            if let Err(e) = earlier.1.merge(&later.1) {
                failed.get_or_insert(e);
            }
            true
        });
        match failed {
            Some(e) => Err(StoreError::State(e)),
            None => Ok(deltas),
        }
    }
}

/// The rollups in the fjall database, with what makes their
/// read-modify-writes cheap.
pub(crate) struct FjallDerived {
    shared: Arc<Shared>,
    /// Recently merged states by key; only committed states.
    cache: StateCache,
    /// Reused to encode each state before it is copied into the batch.
    encoded: Vec<u8>,
    /// A filter of the rollup keys the store holds.
    pub known_rollups: KnownKeys,
}

/// Takes the lock of the derived store.
pub(crate) fn lock<D>(derived: &Mutex<D>) -> MutexGuard<'_, D> {
    derived
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl FjallDerived {
    /// `filter_budget`: most bytes the rollup key filter may take.
    pub fn new(shared: Arc<Shared>, filter_budget: usize) -> FjallDerived {
        let known_rollups = KnownKeys::new(
            shared.keyspaces.rollups.approximate_len(),
            known::hash_key,
            filter_budget,
        );
        FjallDerived {
            shared,
            cache: StateCache::default(),
            encoded: Vec::with_capacity(64),
            known_rollups,
        }
    }

    /// Adds to `batch` the new state of every bucket a delta touches (in key
    /// order, so consecutive memtable searches share most of their path);
    /// returns those worth caching, for [`FjallDerived::remember`] once
    /// committed: buckets that were read (they are written again), and day
    /// buckets (the coarsest: the next bulk most likely touches them again).
    /// A new minute or hour bucket is rarely touched again soon, and caching
    /// each would cost a hash-map insert per event.
    pub fn fold(
        &mut self,
        batch: &mut fjall::OwnedWriteBatch,
        deltas: Vec<(RollupKey, AggState)>,
    ) -> Result<Vec<(RollupKey, AggState)>, StoreError> {
        let rollups = &self.shared.keyspaces.rollups.clone();
        let mut worth_caching = Vec::new();
        for (key, delta) in deltas {
            let Some(mut state) = self.current_state(&key)? else {
                self.put(batch, rollups, key, &delta);
                self.known_rollups.insert(&key);
                if keys::is_day_key(&key) {
                    worth_caching.push((key, delta));
                }
                continue;
            };
            state.merge(&delta).map_err(StoreError::State)?;
            self.put(batch, rollups, key, &state);
            worth_caching.push((key, state));
        }
        Ok(worth_caching)
    }

    /// Adds a bucket's state to `batch`, encoded in the reused buffer (one
    /// allocation per bucket, the batch's own copy).
    fn put(
        &mut self,
        batch: &mut fjall::OwnedWriteBatch,
        rollups: &fjall::Keyspace,
        key: RollupKey,
        state: &AggState,
    ) {
        self.encoded.clear();
        keys::encode_rollup_value(state, &mut self.encoded);
        batch.insert(rollups, key, self.encoded.as_slice());
    }

    /// Like [`FjallDerived::fold`], but takes the states back out; a bucket
    /// left with no event is removed.
    pub fn retract(
        &mut self,
        batch: &mut fjall::OwnedWriteBatch,
        retractions: Vec<(RollupKey, AggState)>,
    ) -> Result<Vec<(RollupKey, AggState)>, StoreError> {
        let rollups = &self.shared.keyspaces.rollups.clone();
        let mut updated = Vec::with_capacity(retractions.len());
        for (key, retraction) in retractions {
            let mut state = self.current_state(&key)?.ok_or(StoreError::Corrupt(
                "a voided event's rollup bucket is missing",
            ))?;
            if state.retract(&retraction).map_err(StoreError::State)? {
                batch.remove(rollups, key);
            } else {
                self.put(batch, rollups, key, &state);
                updated.push((key, state));
            }
        }
        Ok(updated)
    }

    /// A bucket's current state: the cached one, else the stored one. Takes
    /// it out of the cache; [`FjallDerived::remember`] puts it back after
    /// the commit, so the cache never holds a state the store does not.
    fn current_state(&mut self, key: &RollupKey) -> Result<Option<AggState>, StoreError> {
        // A key the store has never held is not cached either: most keys
        // are new, and the filter answers sooner than the cache.
        if !self.known_rollups.may_contain(key) {
            return Ok(None);
        }
        if let Some(cached) = self.cache.take(key) {
            return Ok(Some(cached));
        }
        self.shared
            .keyspaces
            .rollups
            .get(key)?
            .map(|raw| keys::decode_rollup_value(&raw))
            .transpose()
    }

    /// Caches states just committed, within the cache's bound.
    pub fn remember(&mut self, states: Vec<(RollupKey, AggState)>) {
        for (key, state) in states {
            self.cache.put(key, state);
        }
    }
}

/// Rollup states by key, at most [`ROLLUP_CACHE_ENTRIES`]: new states go to
/// the young generation; when it is full it becomes the old one (the old
/// one is dropped). A state read again is taken out, so it lives as long as
/// it keeps being used, and memory never passes the bound.
#[derive(Default)]
struct StateCache {
    young: FxHashMap<RollupKey, AggState>,
    old: FxHashMap<RollupKey, AggState>,
}

impl StateCache {
    fn take(&mut self, key: &RollupKey) -> Option<AggState> {
        self.young.remove(key).or_else(|| self.old.remove(key))
    }

    fn put(&mut self, key: RollupKey, state: AggState) {
        if self.young.len() >= ROLLUP_CACHE_ENTRIES / 2 {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(key, state);
    }
}

impl DerivedStore for FjallDerived {
    fn materialise(&mut self, chunks: &[Arc<TailChunk>]) -> Result<u64, StoreError> {
        let Some(last) = chunks.last() else {
            return Err(StoreError::Corrupt("nothing to materialise"));
        };
        let shared = Arc::clone(&self.shared);
        let ks = &shared.keyspaces;
        let deltas = merge_chunks(chunks)?;
        let mut batch = shared.db.batch();
        let states = self.fold(&mut batch, deltas)?;
        for chunk in chunks {
            for (key, value) in &chunk.quarantine {
                batch.insert(&ks.quarantine, key.as_slice(), value.as_slice());
            }
            dict::write_entries(&mut batch, &ks.meta, &chunk.dict);
        }
        batch.insert(&ks.meta, MATERIALISED_KEY, last.end_seq.to_be_bytes());
        batch.commit()?;
        self.remember(states);
        Ok(last.end_seq)
    }
}

/// The chunks' rollup deltas (each chunk's in key order, each key once) as
/// one run in key order, each key once: a k-way merge, so nothing is
/// sorted and a state is copied once per key, not once per chunk.
fn merge_chunks(chunks: &[Arc<TailChunk>]) -> Result<Vec<(RollupKey, AggState)>, StoreError> {
    if let [only] = chunks {
        return Ok(only.rollups.clone());
    }
    let total = chunks.iter().map(|c| c.rollups.len()).sum();
    let mut merged: Vec<(RollupKey, AggState)> = Vec::with_capacity(total);
    // (next key, chunk, its index in the chunk), smallest key on top.
    let mut heads: BinaryHeap<Reverse<(RollupKey, usize, usize)>> = chunks
        .iter()
        .enumerate()
        .filter_map(|(c, chunk)| chunk.rollups.first().map(|(key, _)| Reverse((*key, c, 0))))
        .collect();
    while let Some(mut head) = heads.peek_mut() {
        let Reverse((key, c, at)) = *head;
        let rollups = &chunks[c].rollups;
        let state = &rollups[at].1;
        match merged.last_mut() {
            Some((last, existing)) if *last == key => {
                existing.merge(state).map_err(StoreError::State)?;
            }
            _ => merged.push((key, state.clone())),
        }
        match rollups.get(at + 1) {
            Some((next, _)) => *head = Reverse((*next, c, at + 1)),
            None => {
                PeekMut::pop(head);
            }
        }
    }
    Ok(merged)
}

/// Folds every chunk of the tail in; the caller holds the derived store's
/// lock (that is what `derived` being borrowed mutably means).
pub(crate) fn drain(tail: &Tail, derived: &mut impl DerivedStore) -> Result<(), StoreError> {
    let chunks = tail.all();
    if chunks.is_empty() {
        return Ok(());
    }
    let position = derived.materialise(&chunks)?;
    tail.trim(position);
    Ok(())
}

/// The materialiser thread: folds the tail in, in bulks (or once the oldest
/// chunk has waited `patience`), until the tail is closed and empty.
pub(crate) fn run(tail: &Tail, derived: &Mutex<impl DerivedStore>, patience: Duration) {
    while tail.wait_for_work(BULK_EVENTS, patience) {
        let mut derived = lock(derived);
        // Taken under the lock: the writer may have drained the tail.
        let chunks = tail.oldest(MAX_BULK_EVENTS);
        if chunks.is_empty() {
            continue;
        }
        match derived.materialise(&chunks) {
            Ok(position) => tail.trim(position),
            Err(e) => {
                drop(derived);
                warn!(error = %e, "materialising failed; retrying in 1 s");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Instant;

    use proptest::prelude::*;

    use super::*;

    fn key(k: u16) -> RollupKey {
        let mut key = [0u8; keys::ROLLUP_KEY_LEN];
        key[16..].copy_from_slice(&k.to_be_bytes());
        key
    }

    /// A tail chunk holding `counts` (made sorted, each key once, as the
    /// writer hands them over).
    fn chunk(counts: &[(u16, u64)]) -> Arc<TailChunk> {
        let mut rollups = Deltas::default();
        let mut sorted = counts.to_vec();
        sorted.sort_unstable();
        for (k, n) in sorted {
            rollups.add(key(k), AggState::Count(n)).unwrap();
        }
        Arc::new(TailChunk {
            first_seq: 0,
            end_seq: 1,
            events: 1,
            acked_at: Instant::now(),
            rollups: rollups.merged().unwrap(),
            dedupe: Vec::new(),
            quarantine: Vec::new(),
            dict: Vec::new(),
        })
    }

    proptest! {
        /// Merging chunks equals adding every delta into a map.
        #[test]
        fn merged_chunks_are_the_naive_sum(
            chunks in prop::collection::vec(
                prop::collection::vec((0u16..64, 1u64..5), 0..20),
                0..12,
            ),
        ) {
            let mut naive: BTreeMap<RollupKey, u64> = BTreeMap::new();
            for (k, n) in chunks.iter().flatten() {
                *naive.entry(key(*k)).or_default() += n;
            }
            let tail: Vec<_> = chunks.iter().map(|c| chunk(c)).collect();
            let merged = merge_chunks(&tail).unwrap();
            let expected: Vec<_> = naive
                .into_iter()
                .map(|(k, n)| (k, AggState::Count(n)))
                .collect();
            prop_assert_eq!(merged, expected);
        }
    }

    #[test]
    fn the_state_cache_keeps_what_is_used_within_its_bound() {
        let mut cache = StateCache::default();
        let half = ROLLUP_CACHE_ENTRIES / 2;
        cache.put(key(0), AggState::Count(7));
        for k in 1..=half as u64 {
            let mut other = [1u8; keys::ROLLUP_KEY_LEN];
            other[..8].copy_from_slice(&k.to_be_bytes());
            cache.put(other, AggState::Count(k));
        }
        // The first state went to the old generation, not away.
        assert_eq!(cache.young.len() + cache.old.len(), half + 1);
        assert_eq!(cache.take(&key(0)), Some(AggState::Count(7)));
        assert_eq!(cache.take(&key(0)), None, "taken out when read");
        for k in 0..(2 * half) as u64 {
            let mut other = [2u8; keys::ROLLUP_KEY_LEN];
            other[..8].copy_from_slice(&k.to_be_bytes());
            cache.put(other, AggState::Count(k));
            assert!(cache.young.len() + cache.old.len() <= ROLLUP_CACHE_ENTRIES);
        }
    }
}
