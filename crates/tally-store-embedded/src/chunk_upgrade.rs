//! Upgrading a store's rollups to chunks (format 8, [`crate::chunk`]).
//!
//! Formats 4 to 7 stored one rollup key per bucket, with the same 18-byte
//! keys format 8 uses. Such a value already reads as a one-bucket chunk, so
//! nothing is rebuilt from the log: [`rollups_into_chunks`] walks the
//! rollups in key order and gathers runs of consecutive values of one
//! generation and level (at most [`chunk::MAX_ENTRIES`] buckets) into one
//! chunk stored at the first value's key, removing the others. A chunk
//! covers the same buckets the values it replaces covered, so every batch
//! leaves a store that answers the same; a cut-short upgrade is done again
//! at the next open (chunks read like any value), and the format mark is
//! written last.

use fjall::PersistMode;
use tally_meter::AggState;
use tracing::info;

use crate::keys::{self, RollupKey};
use crate::{Keyspaces, StoreError, chunk};

/// Stored values rewritten per batch.
const VALUES_PER_BATCH: usize = 50_000;

/// Gathers the rollups into chunks, then marks the store as ours.
pub(crate) fn rollups_into_chunks(
    db: &fjall::Database,
    keyspaces: &Keyspaces,
    from: u64,
) -> Result<(), StoreError> {
    let rollups = &keyspaces.rollups;
    let mut run = Run::default();
    let mut batch = db.batch().durability(Some(PersistMode::SyncAll));
    let (mut in_batch, mut values, mut chunks) = (0usize, 0u64, 0u64);
    for item in rollups.iter() {
        let (key, value) = item.into_inner()?;
        let key: RollupKey = key[..]
            .try_into()
            .map_err(|_| StoreError::Corrupt("rollup key length"))?;
        let entries = chunk::decode_all(&key, &value)?;
        if run.keys.first().is_some_and(|first| first[..5] != key[..5])
            || run.entries.len() + entries.len() > chunk::MAX_ENTRIES
        {
            chunks += run.flush(&mut batch, rollups)?;
        }
        run.keys.push(key);
        run.entries.extend(entries);
        values += 1;
        in_batch += 1;
        if in_batch >= VALUES_PER_BATCH && run.keys.len() == 1 {
            // The run just begun stays for the next batch: only whole runs
            // are committed.
            let begun = std::mem::take(&mut run);
            batch.commit()?;
            batch = db.batch().durability(Some(PersistMode::SyncAll));
            run = begun;
            in_batch = 1;
        }
    }
    chunks += run.flush(&mut batch, rollups)?;
    batch.insert(
        &keyspaces.meta,
        keys::FORMAT_KEY,
        keys::FORMAT.to_be_bytes(),
    );
    batch.commit()?;
    info!(
        values,
        chunks,
        from,
        to = keys::FORMAT,
        "store format upgraded: rollups gathered into chunks"
    );
    Ok(())
}

/// Consecutive stored values of one generation and level, and their buckets.
#[derive(Default)]
struct Run {
    keys: Vec<RollupKey>,
    entries: Vec<(RollupKey, AggState)>,
}

impl Run {
    /// Stores the run as one chunk at its first key; returns the chunks
    /// written (0 or 1).
    fn flush(
        &mut self,
        batch: &mut fjall::OwnedWriteBatch,
        rollups: &fjall::Keyspace,
    ) -> Result<u64, StoreError> {
        let Some(first) = self.keys.first().copied() else {
            return Ok(0);
        };
        let mut encoded = Vec::new();
        chunk::encode(&first, &self.entries, &mut encoded)?;
        batch.insert(rollups, first, encoded);
        for key in &self.keys[1..] {
            batch.remove(rollups, *key);
        }
        self.keys.clear();
        self.entries.clear();
        Ok(1)
    }
}
