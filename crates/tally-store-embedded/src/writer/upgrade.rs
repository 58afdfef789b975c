//! Upgrading stores of older formats when they are opened.
//!
//! Format 6 keeps the log in event blocks ([`crate::block`]) in the `log`
//! keyspace; formats up to 5 kept one key per event in `events` (key: seq
//! u64 BE; value: ingest time ns i64 BE, type as u16 length + bytes, the
//! event's JSON). [`log_into_blocks`] moves them over in batches, each
//! removing the old keys it wrote blocks for, so a move cut short by a
//! crash resumes where it stopped; the emptied keyspace is then dropped.
//! Nothing derived changes: positions stay as they were.
//!
//! Format 5 lets derived state lag the log: `meta` records the materialised
//! position. A format-3 or 4 store wrote its rollups with its log, so all of
//! its log is materialised: the position is set to the end of the log
//! ([`record_materialised`]), in the batch that marks a format-4 store 5.
//!
//! Format 4 changed two derived layouts, never the log: dedupe keys gained a
//! hash prefix, and day rollups became time-major with all groups merged.
//! Every meter is rebuilt from the log under a new generation, exactly as
//! when a Draft meter changes; the old generations become garbage. The
//! format mark is written in the batch that starts the rebuilds, so a store
//! is either still format 3 or fully switched.
//!
//! The dedupe index of any older store (one key per event) is not upgraded
//! here: the writer finds no index of the runs layout and rebuilds it from
//! the log (`crate::dedupe`, `writer/dedupe.rs`).

use fjall::PersistMode;
use tracing::info;

use super::Writer;
use crate::block::Record;
use crate::log::{BlockLog, EventLog};
use crate::tail::MATERIALISED_KEY;
use crate::{Keyspaces, StoreError, keys};

/// Records that a format-3 or 4 store's whole log (`next_seq` events) is
/// materialised, unless a position is already recorded (format 5 has one);
/// marks a format-4 or 5 store as ours. (A format-3 store is marked by
/// [`Writer::upgrade_from_format_3`], once its meters are rebuilt.)
pub(crate) fn record_materialised(
    db: &fjall::Database,
    keyspaces: &Keyspaces,
    next_seq: u64,
    format: u64,
) -> Result<(), StoreError> {
    let mut batch = db.batch().durability(Some(PersistMode::SyncAll));
    if keyspaces.meta.get(MATERIALISED_KEY)?.is_none() {
        batch.insert(&keyspaces.meta, MATERIALISED_KEY, next_seq.to_be_bytes());
    }
    // Older formats' dedupe entries are not runs: the index is rebuilt
    // from the log when the writer opens it (`crate::dedupe`).
    if format == 4 || format == 5 {
        batch.insert(
            &keyspaces.meta,
            keys::FORMAT_KEY,
            keys::FORMAT.to_be_bytes(),
        );
        info!(
            events = next_seq,
            from = format,
            to = keys::FORMAT,
            "store format upgraded"
        );
    }
    batch.commit()?;
    Ok(())
}

/// Events moved into blocks per batch.
const MOVE_CHUNK: usize = 64 * 1024;

/// The log of a store of format 5 or older (one key per event in the
/// `events` keyspace), with how many events it holds about; `None` for a
/// store without one. Opening it does not create it.
pub(crate) fn old_log(
    db: &fjall::Database,
) -> Result<Option<(fjall::Keyspace, usize)>, StoreError> {
    if !db.keyspace_exists(OLD_EVENTS) {
        return Ok(None);
    }
    let old = db.keyspace(OLD_EVENTS, fjall::KeyspaceCreateOptions::default)?;
    let len = if old.is_empty()? {
        0
    } else {
        old.approximate_len().max(1)
    };
    Ok(Some((old, len)))
}

/// Moves the log of a store of format 5 or older ([`old_log`]) into
/// blocks; see the module docs. The store's format was checked first.
pub(crate) fn log_into_blocks(
    db: &fjall::Database,
    log: &BlockLog,
    old: fjall::Keyspace,
) -> Result<(), StoreError> {
    let mut moved = 0u64;
    // Read on from the last key moved, not from the start: the removed
    // keys are tombstones until compaction.
    let mut next = 0u64;
    loop {
        let mut first = None;
        let mut old_keys = Vec::new();
        let mut records = Vec::new();
        for item in old.range(next.to_be_bytes()..).take(MOVE_CHUNK) {
            let (key, value) = item.into_inner()?;
            let seq = keys::read_u64(&key)?;
            let first = *first.get_or_insert(seq);
            if seq != first + old_keys.len() as u64 {
                return Err(StoreError::Corrupt("the format-5 log has a gap"));
            }
            let (ingested_at, event) = keys::decode_event(&value)?;
            records.push(Record::new(ingested_at, &event)?);
            old_keys.push(key);
        }
        let Some(first) = first else { break };
        if first != log.end()? {
            return Err(StoreError::Corrupt(
                "the format-5 log does not continue the blocks moved so far",
            ));
        }
        let mut batch = db.batch().durability(Some(PersistMode::SyncAll));
        log.append_to(&mut batch, first, &records.iter().collect::<Vec<_>>())?;
        for key in old_keys {
            batch.remove(&old, key);
        }
        batch.commit()?;
        moved += records.len() as u64;
        next = first + records.len() as u64;
    }
    db.delete_keyspace(old)?;
    if moved > 0 {
        info!(events = moved, "the log was moved into event blocks");
    }
    Ok(())
}

/// The keyspace of the log up to format 5.
const OLD_EVENTS: &str = "events";

impl Writer {
    /// Runs before the writer serves anything and before readers exist.
    pub(crate) fn upgrade_from_format_3(&mut self) -> Result<(), StoreError> {
        let shared = std::sync::Arc::clone(&self.shared);
        let ks = &shared.keyspaces;
        let mut batch = shared.db.batch().durability(Some(PersistMode::SyncAll));
        let meters: Vec<String> = shared.read_state().meters.keys().cloned().collect();
        let first = self.next_generations(&mut batch, meters.len() as u64)?;
        let mut states = Vec::with_capacity(meters.len());
        for (offset, meter) in meters.iter().enumerate() {
            let state = self.begin_rebuild(&mut batch, meter, first + offset as u64)?;
            states.push((meter.clone(), state));
        }
        batch.insert(&ks.meta, keys::FORMAT_KEY, keys::FORMAT.to_be_bytes());
        batch.commit()?;
        let mut state = shared.write_state();
        for (meter, meter_state) in states {
            state.meters.insert(meter, meter_state);
        }
        info!(
            meters = meters.len(),
            "store upgraded from format 3 to 4; meters are rebuilt from the log in the background"
        );
        Ok(())
    }
}
