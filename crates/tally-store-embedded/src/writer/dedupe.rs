//! The dedupe index rebuilt from the log when it is lost or damaged.
//!
//! Every batch that materialises dedupe entries also writes, in the
//! `dedupe` keyspace itself, the mark [`keys::DEDUPE_MARK`]: the log
//! position the entries include, the same as `meta` `materialised`. When
//! the store opens, a mark that is missing (the keyspace lost, or emptied)
//! while the log has materialised events, or that differs from the
//! materialised position, means the index cannot be trusted: it is
//! emptied and built again from the log before anything is accepted — in
//! bulk (the blocks' id, source and time columns, no JSON), in sorted
//! batches, the entry of the newest event of each (source, id) winning, as
//! when they were written one group at a time. Expired pairs are left out,
//! as pruning would have removed them. The part of the log past the
//! materialised position is the tail's, replayed as always.
//!
//! **Invariant:** after [`Writer::rebuild_dedupe_if_lost`] the index holds
//! the entry of every unexpired (source, id) in the log below the
//! materialised position, so a re-sent duplicate is refused.

use std::ops::ControlFlow;
use std::sync::Arc;

use fjall::PersistMode;
use jiff::Timestamp;
use tracing::{info, warn};

use super::Writer;
use crate::keys;
use crate::{Shared, StoreError};

/// Entries written per batch while rebuilding (about 50 bytes each).
const REBUILD_CHUNK: usize = 200_000;

/// The dedupe mark a store holds: `None` when it is missing.
fn mark(shared: &Shared) -> Result<Option<u64>, StoreError> {
    shared
        .keyspaces
        .dedupe
        .get(keys::DEDUPE_MARK)?
        .map(|raw| keys::read_u64(&raw))
        .transpose()
}

impl Writer {
    /// Checks the dedupe mark against the materialised position, and
    /// rebuilds the index from the log when they disagree (see the module
    /// docs). Runs at open, before the replay; returns whether it rebuilt.
    pub(crate) fn rebuild_dedupe_if_lost(&mut self) -> Result<bool, StoreError> {
        let shared = Arc::clone(&self.shared);
        let position = crate::tail::materialised(&shared.db.snapshot(), &shared.keyspaces.meta)?;
        let found = mark(&shared)?;
        if found == Some(position) || (found.is_none() && position == 0) {
            return Ok(false);
        }
        warn!(
            mark = ?found,
            materialised = position,
            "the dedupe index does not match the log; rebuilding it from the log"
        );
        let removed = self.empty_dedupe()?;
        let written = self.fill_dedupe(position)?;
        info!(
            removed,
            written,
            events = position,
            "dedupe index rebuilt from the log"
        );
        Ok(true)
    }

    /// Removes every entry of the dedupe index, in batches.
    fn empty_dedupe(&self) -> Result<u64, StoreError> {
        let dedupe = &self.shared.keyspaces.dedupe;
        let mut removed = 0;
        loop {
            let mut batch = self.shared.db.batch();
            let mut n = 0;
            for item in dedupe.iter().take(REBUILD_CHUNK) {
                batch.remove(dedupe, item.key()?);
                n += 1;
            }
            if n == 0 {
                return Ok(removed);
            }
            batch.commit()?;
            removed += n;
        }
    }

    /// Writes the entries of the log below `position`, then the mark.
    fn fill_dedupe(&self, position: u64) -> Result<u64, StoreError> {
        let shared = Arc::clone(&self.shared);
        let now = Timestamp::now().as_second();
        let snapshot = shared.db.snapshot();
        let mut entries = Vec::new();
        let mut written = 0;
        shared
            .log
            .scan(&snapshot, 0, position, false, &mut |block| {
                for seq in block.first..block.end().min(position) {
                    let i = (seq - block.first) as usize;
                    let expires = block
                        .ingested_at(i)
                        .as_second()
                        .max(block.time(i).as_second())
                        + self.horizon_seconds;
                    if expires <= now {
                        continue;
                    }
                    let key = keys::dedupe_key(block.source(i), block.id(i));
                    entries.push((key, keys::dedupe_value(seq, expires)));
                }
                if entries.len() >= REBUILD_CHUNK {
                    written += write_entries(&shared, &mut entries, None)?;
                }
                Ok(ControlFlow::Continue(()))
            })?;
        written += write_entries(&shared, &mut entries, Some(position))?;
        Ok(written)
    }
}

/// Writes `entries` (emptied) in key order, the newest of each key only;
/// with the mark when given, synced.
fn write_entries(
    shared: &Shared,
    entries: &mut Vec<(Vec<u8>, [u8; 16])>,
    mark: Option<u64>,
) -> Result<u64, StoreError> {
    // By key, then newest (highest seq, the value's first 8 bytes) first.
    entries.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(&a.1)));
    entries.dedup_by(|later, earlier| later.0 == earlier.0);
    let dedupe = &shared.keyspaces.dedupe;
    let mut batch = shared.db.batch();
    let written = entries.len() as u64;
    for (key, value) in entries.drain(..) {
        batch.insert(dedupe, key, value);
    }
    if let Some(position) = mark {
        batch.insert(dedupe, keys::DEDUPE_MARK, position.to_be_bytes());
        batch = batch.durability(Some(PersistMode::SyncAll));
    }
    batch.commit()?;
    Ok(written)
}
