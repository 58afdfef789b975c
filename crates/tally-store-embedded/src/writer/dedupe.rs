//! Opening the dedupe index ([`crate::dedupe`]), and rebuilding it from
//! the log when it is lost or damaged.
//!
//! When the store opens, the runs are read back and checked (each chunk
//! decoded, counts and positions compared with the run's header, the runs
//! tiling the log up to the mark). If they hold, only the log past the mark
//! is read into memory. If the keyspace holds no index of this layout (a
//! store written before runs, or the keyspace lost or emptied) or a damaged
//! one, it is emptied and built again from the whole log before anything
//! is accepted — in bulk (the blocks' id, source and time columns, no
//! JSON), flushed as runs whenever memory reaches its budget. Expired pairs
//! are left out, as pruning would have removed them.
//!
//! **Invariant:** after [`Writer::rebuild_dedupe_if_lost`] the index holds
//! the newest entry of every unexpired (source, id) in the log, so a
//! re-sent duplicate is refused.

use std::ops::ControlFlow;
use std::sync::Arc;

use fjall::PersistMode;
use jiff::Timestamp;
use tracing::{info, warn};

use super::Writer;
use crate::StoreError;
use crate::dedupe::DedupeIndex;
use crate::keys;

/// Keys removed per batch while emptying the keyspace.
const REMOVE_CHUNK: usize = 200_000;

impl Writer {
    /// Loads the dedupe index, or rebuilds it from the log when it is
    /// missing or damaged (see the module docs), then reads the log past
    /// its mark. Runs at open, before the replay; returns whether it
    /// rebuilt.
    pub(crate) fn rebuild_dedupe_if_lost(&mut self) -> Result<bool, StoreError> {
        let shared = Arc::clone(&self.shared);
        let keyspace = &shared.keyspaces.dedupe;
        let budget = usize::try_from(self.key_filter_bytes).unwrap_or(usize::MAX);
        let (index, rebuilt) = match DedupeIndex::load(keyspace, budget)? {
            Some(index) if index.mark() <= self.next_seq => (index, false),
            found => {
                if !keyspace.is_empty()? || found.is_some() {
                    warn!(
                        "the dedupe index is missing, of an older layout or damaged; rebuilding it from the log"
                    );
                }
                let removed = self.empty_dedupe()?;
                info!(removed, "dedupe index emptied");
                (DedupeIndex::new(0, budget), true)
            }
        };
        let from = index.mark();
        *self.dedupe_index() = index;
        let read = self.fill_dedupe(from)?;
        if rebuilt {
            info!(events = read, "dedupe index rebuilt from the log");
        }
        Ok(rebuilt)
    }

    /// Removes every key of the dedupe keyspace, in batches.
    fn empty_dedupe(&self) -> Result<u64, StoreError> {
        let dedupe = &self.shared.keyspaces.dedupe;
        let mut removed = 0;
        loop {
            let mut batch = self.shared.db.batch();
            let mut n = 0;
            for item in dedupe.iter().take(REMOVE_CHUNK) {
                batch.remove(dedupe, item.key()?);
                n += 1;
            }
            if n == 0 {
                return Ok(removed);
            }
            batch.durability(Some(PersistMode::SyncAll)).commit()?;
            removed += n;
        }
    }

    /// Reads the keys of the log from `from` to its end into the index,
    /// flushing runs whenever memory is full. Returns the events read.
    fn fill_dedupe(&mut self, from: u64) -> Result<u64, StoreError> {
        let shared = Arc::clone(&self.shared);
        let now = Timestamp::now().as_second();
        let (end, horizon) = (self.next_seq, self.horizon_seconds);
        let snapshot = shared.db.snapshot();
        let mut index = self.dedupe_index();
        shared.log.scan(&snapshot, from, end, false, &mut |block| {
            for seq in block.first.max(from)..block.end().min(end) {
                let i = (seq - block.first) as usize;
                let expires = block
                    .ingested_at(i)
                    .as_second()
                    .max(block.time(i).as_second())
                    + horizon;
                if expires > now {
                    index.insert(
                        &keys::dedupe_key(block.source(i), block.id(i)),
                        seq,
                        expires,
                    );
                }
            }
            if index.is_full() {
                let at = block.end().min(end);
                index.flush(&shared.db, &shared.keyspaces.dedupe, at, now)?;
            }
            Ok(ControlFlow::Continue(()))
        })?;
        Ok(end - from)
    }
}

impl Writer {
    /// Merges one window of dedupe runs when the index has one to merge
    /// ([`DedupeIndex::plan_merge`]); whether it did. The merge is read and
    /// built under the read lock (lookups go on meanwhile); only its synced
    /// batch and the swap in memory hold the write lock.
    pub(crate) fn merge_dedupe_step(&mut self) -> Result<bool, StoreError> {
        let shared = Arc::clone(&self.shared);
        let now = Timestamp::now().as_second();
        let merge = {
            let index = shared
                .dedupe
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let Some(range) = index.plan_merge(now) else {
                return Ok(false);
            };
            index.prepare_merge(&shared.keyspaces.dedupe, range, now)?
        };
        self.dedupe_index()
            .install_merge(&shared.db, &shared.keyspaces.dedupe, merge)
    }
}
