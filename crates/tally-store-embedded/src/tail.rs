//! The tail: what was acknowledged but is not yet materialised.
//!
//! A group commit appends its events to the log and is answered; what it
//! means for the rollups (each meter's deltas, merged and sorted by key),
//! its dedupe entries, its quarantine entries and the dictionary entries it
//! introduced wait here, as one [`TailChunk`], until the materialiser (see
//! [`crate::materialise`]) folds them into the store in bulk and records
//! the log position it included (`meta` key `materialised`).
//!
//! Readers answer from a store snapshot *and* the chunks that snapshot does
//! not include, so an acknowledged event is in the very next answer.
//!
//! **Invariants:**
//! - A chunk is pushed before its requests are answered, and removed only
//!   after a batch recording a position at or past its end is committed.
//! - [`Tail::view`] takes its snapshot while holding the lock that removal
//!   needs, so the chunks it keeps (those at or past the snapshot's
//!   position) are exactly those the snapshot lacks: nothing is missed and
//!   nothing counted twice.
//! - Materialised positions fall on chunk boundaries.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fjall::Readable;
use tally_meter::AggState;

use crate::StoreError;
use crate::keys::{self, DictEntry, RollupKey};

/// One group commit's derived state, waiting to be materialised.
pub(crate) struct TailChunk {
    /// The first log position it holds.
    pub first_seq: u64,
    /// One past the last log position it holds.
    pub end_seq: u64,
    /// Events it holds (accepted ones; duplicates are not in the log).
    pub events: u64,
    pub acked_at: Instant,
    /// Rollup deltas, each key once, in key order.
    pub rollups: Vec<(RollupKey, AggState)>,
    /// Dedupe entries (key, value), in key order.
    pub dedupe: Vec<(Vec<u8>, [u8; 16])>,
    /// Quarantine entries (key, value), in key order.
    pub quarantine: Vec<(Vec<u8>, Vec<u8>)>,
    /// Dictionary entries first named by this chunk.
    pub dict: Vec<(u32, DictEntry)>,
}

impl TailChunk {
    /// The deltas whose keys are in `[start, end)`.
    pub fn rollups_in(&self, start: &[u8], end: &[u8]) -> &[(RollupKey, AggState)] {
        let lo = self.rollups.partition_point(|(k, _)| k.as_slice() < start);
        let hi = self.rollups.partition_point(|(k, _)| k.as_slice() < end);
        &self.rollups[lo..hi.max(lo)]
    }

    /// The dedupe entry of `key`, if this chunk holds it.
    pub fn dedupe_entry(&self, key: &[u8]) -> Option<&[u8; 16]> {
        self.dedupe
            .binary_search_by(|(k, _)| k.as_slice().cmp(key))
            .ok()
            .map(|at| &self.dedupe[at].1)
    }

    /// The deltas whose keys start with `prefix`.
    pub fn rollups_with_prefix(&self, prefix: &[u8]) -> &[(RollupKey, AggState)] {
        let lo = self.rollups.partition_point(|(k, _)| k.as_slice() < prefix);
        let n = self.rollups[lo..].partition_point(|(k, _)| k.starts_with(prefix));
        &self.rollups[lo..lo + n]
    }
}

#[derive(Default)]
struct TailState {
    chunks: VecDeque<Arc<TailChunk>>,
    events: u64,
    closed: bool,
    /// The last materialised position trimmed to.
    position: u64,
}

/// The chunks not yet materialised; shared by the writer (which pushes),
/// the materialiser (which removes) and readers.
#[derive(Default)]
pub(crate) struct Tail {
    state: Mutex<TailState>,
    /// Signalled when a chunk is pushed or the tail is closed.
    work: Condvar,
    /// Signalled when chunks are removed.
    room: Condvar,
}

/// The `meta` key of the materialised log position (u64 BE): every event
/// with a lower seq is in the stored rollups and quarantine.
pub const MATERIALISED_KEY: &str = "materialised";

impl Tail {
    fn lock(&self) -> MutexGuard<'_, TailState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn push(&self, chunk: Arc<TailChunk>) {
        let mut state = self.lock();
        state.events += chunk.events;
        state.chunks.push_back(chunk);
        drop(state);
        self.work.notify_all();
    }

    /// Every chunk, oldest first.
    pub fn all(&self) -> Vec<Arc<TailChunk>> {
        self.lock().chunks.iter().cloned().collect()
    }

    /// The oldest chunks, holding at most `max_events` events (at least one
    /// chunk when there is one).
    pub fn oldest(&self, max_events: u64) -> Vec<Arc<TailChunk>> {
        let state = self.lock();
        let mut out = Vec::new();
        let mut events = 0;
        for chunk in &state.chunks {
            if !out.is_empty() && events + chunk.events > max_events {
                break;
            }
            events += chunk.events;
            out.push(Arc::clone(chunk));
        }
        out
    }

    /// Removes the chunks that end at or before `position`, now materialised.
    pub fn trim(&self, position: u64) {
        let mut state = self.lock();
        state.position = state.position.max(position);
        while state
            .chunks
            .front()
            .is_some_and(|chunk| chunk.end_seq <= position)
        {
            if let Some(chunk) = state.chunks.pop_front() {
                state.events -= chunk.events;
            }
        }
        drop(state);
        self.room.notify_all();
    }

    /// Waits until there is work: chunks holding `enough` events, or any
    /// chunk once `patience` has passed since the first one arrived.
    /// Returns false once the tail is closed and empty.
    pub fn wait_for_work(&self, enough: u64, patience: Duration) -> bool {
        let mut state = self.lock();
        loop {
            if state.closed && state.chunks.is_empty() {
                return false;
            }
            match state.chunks.front() {
                None => {
                    state = self
                        .work
                        .wait(state)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                }
                Some(first) => {
                    let waited = first.acked_at.elapsed();
                    if state.events >= enough || waited >= patience || state.closed {
                        return true;
                    }
                    state = self
                        .work
                        .wait_timeout(state, patience - waited)
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .0;
                }
            }
        }
    }

    /// Waits (at most `timeout`) until fewer than `max_events` events are
    /// not yet materialised; returns whether they are.
    pub fn wait_for_room(&self, max_events: u64, timeout: Duration) -> bool {
        let state = self.lock();
        let (state, _) = self
            .room
            .wait_timeout_while(state, timeout, |s| s.events >= max_events)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        state.events < max_events
    }

    /// The position the tail was last trimmed to: everything before it is
    /// in the store.
    #[cfg(test)]
    pub fn position(&self) -> u64 {
        self.lock().position
    }

    /// No more chunks will come: the materialiser finishes what is left.
    pub fn close(&self) {
        self.lock().closed = true;
        self.work.notify_all();
    }

    /// Events not yet materialised, and how long ago the oldest of them
    /// was acknowledged.
    pub fn lag(&self) -> (u64, Duration) {
        let state = self.lock();
        let age = state
            .chunks
            .front()
            .map_or(Duration::ZERO, |c| c.acked_at.elapsed());
        (state.events, age)
    }

    /// A snapshot of the store and the chunks it does not include; see the
    /// module docs.
    pub fn view(
        &self,
        db: &fjall::Database,
        meta: &fjall::Keyspace,
    ) -> Result<(fjall::Snapshot, Vec<Arc<TailChunk>>), StoreError> {
        let state = self.lock();
        let snapshot = db.snapshot();
        let position = materialised(&snapshot, meta)?;
        let chunks = state
            .chunks
            .iter()
            .filter(|chunk| chunk.first_seq >= position)
            .cloned()
            .collect();
        Ok((snapshot, chunks))
    }
}

/// The materialised position a snapshot records.
pub(crate) fn materialised(
    snapshot: &fjall::Snapshot,
    meta: &fjall::Keyspace,
) -> Result<u64, StoreError> {
    match snapshot.get(meta, MATERIALISED_KEY)? {
        Some(raw) => keys::read_u64(&raw),
        None => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(first_seq: u64, end_seq: u64, keys: &[u8]) -> TailChunk {
        TailChunk {
            first_seq,
            end_seq,
            events: end_seq - first_seq,
            acked_at: Instant::now(),
            rollups: keys
                .iter()
                .map(|k| ([*k; keys::ROLLUP_KEY_LEN], AggState::Count(1)))
                .collect(),
            dedupe: keys.iter().map(|k| (vec![*k], [*k; 16])).collect(),
            quarantine: Vec::new(),
            dict: Vec::new(),
        }
    }

    #[test]
    fn ranges_and_prefixes_find_exactly_their_keys() {
        let c = chunk(0, 1, &[1, 3, 5, 7]);
        let firsts = |s: &[(RollupKey, AggState)]| s.iter().map(|(k, _)| k[0]).collect::<Vec<_>>();
        assert_eq!(firsts(c.rollups_in(&[3], &[7])), vec![3, 5]);
        assert_eq!(firsts(c.rollups_in(&[8], &[9])), Vec::<u8>::new());
        assert_eq!(firsts(c.rollups_in(&[7], &[2])), Vec::<u8>::new());
        assert_eq!(firsts(c.rollups_with_prefix(&[5, 5])), vec![5]);
        assert_eq!(firsts(c.rollups_with_prefix(&[4])), Vec::<u8>::new());
        assert_eq!(c.dedupe_entry(&[5]), Some(&[5; 16]));
        assert_eq!(c.dedupe_entry(&[4]), None);
    }

    #[test]
    fn trimming_keeps_what_is_not_materialised_and_makes_room() {
        let tail = Tail::default();
        tail.push(Arc::new(chunk(0, 3, &[])));
        tail.push(Arc::new(chunk(3, 5, &[])));
        assert_eq!(tail.lag().0, 5);
        assert!(!tail.wait_for_room(5, Duration::ZERO));
        assert_eq!(tail.oldest(1).len(), 1, "at least one chunk");
        assert_eq!(tail.oldest(5).len(), 2);
        tail.trim(3);
        assert_eq!(tail.position(), 3);
        assert_eq!(tail.lag().0, 2);
        assert!(tail.wait_for_room(5, Duration::ZERO));
        assert_eq!(tail.all()[0].first_seq, 3);
        tail.close();
        assert!(tail.wait_for_work(u64::MAX, Duration::from_secs(60)));
        tail.trim(5);
        assert!(!tail.wait_for_work(u64::MAX, Duration::from_secs(60)));
    }
}
