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
//!   chunks' deltas in key order, reads each bucket's stored state once,
//!   and writes rollups, quarantine and dictionary entries and the
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

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustc_hash::FxHashMap;
use tally_meter::AggState;
use tracing::warn;

use crate::keys::RollupKey;
use crate::known::{self, KnownKeys};
use crate::tail::{MATERIALISED_KEY, Tail, TailChunk};
use crate::{Shared, StoreError, dict};

/// Rollup states kept in memory between read-modify-writes (about 150
/// bytes each); the cache is emptied when it would grow past this.
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
    cache: FxHashMap<RollupKey, AggState>,
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
            cache: FxHashMap::default(),
            known_rollups,
        }
    }

    /// Adds to `batch` the new state of every bucket a delta touches (in key
    /// order, so consecutive memtable searches share most of their path);
    /// returns them, for [`FjallDerived::remember`] once committed.
    pub fn fold(
        &mut self,
        batch: &mut fjall::OwnedWriteBatch,
        deltas: Vec<(RollupKey, AggState)>,
    ) -> Result<Vec<(RollupKey, AggState)>, StoreError> {
        let rollups = &self.shared.keyspaces.rollups.clone();
        let mut merged_states = Vec::with_capacity(deltas.len());
        for (key, delta) in deltas {
            let Some(mut state) = self.current_state(&key)? else {
                batch.insert(rollups, key, delta.to_bytes());
                self.known_rollups.insert(&key);
                merged_states.push((key, delta));
                continue;
            };
            state.merge(&delta).map_err(StoreError::State)?;
            batch.insert(rollups, key, state.to_bytes());
            merged_states.push((key, state));
        }
        Ok(merged_states)
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
                batch.insert(rollups, key, state.to_bytes());
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
        if let Some(cached) = self.cache.remove(key) {
            return Ok(Some(cached));
        }
        self.shared
            .keyspaces
            .rollups
            .get(key)?
            .map(|raw| AggState::decode(&raw).map_err(StoreError::State))
            .transpose()
    }

    /// Caches states just committed, within the cache's bound.
    pub fn remember(&mut self, states: Vec<(RollupKey, AggState)>) {
        if self.cache.len() + states.len() > ROLLUP_CACHE_ENTRIES {
            self.cache.clear();
        }
        self.cache.extend(states);
    }
}

impl DerivedStore for FjallDerived {
    fn materialise(&mut self, chunks: &[Arc<TailChunk>]) -> Result<u64, StoreError> {
        let Some(last) = chunks.last() else {
            return Err(StoreError::Corrupt("nothing to materialise"));
        };
        let shared = Arc::clone(&self.shared);
        let ks = &shared.keyspaces;
        let deltas: Vec<(RollupKey, AggState)> = chunks
            .iter()
            .flat_map(|c| c.rollups.iter().cloned())
            .collect();
        let deltas = if chunks.len() == 1 {
            deltas
        } else {
            Deltas(deltas).merged()?
        };
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
