//! The change feed of a meter's input (`Ledger::changes`): which event times
//! changed after a reader's cursor, for readers that keep their own
//! checkpoint (the billing forwarder re-reads those windows).
//!
//! Two orders make the cursor: the log (by seq) for stored events,
//! and `void_order` for voids, which touch old events. **Invariant:** the
//! writer inserts `void_order[n] = seq` in the same batch as `voids[seq]`,
//! with `n` one past the last ordinal, and only the writer writes; so every
//! void has exactly one ordinal, ordinals only grow, and a reader on one
//! snapshot sees a prefix of both orders, each already reflected in the
//! rollups of that snapshot.

use std::ops::ControlFlow;

use fjall::Readable;
use tally_ledger::{ChangeCursor, ChangePage, LedgerError, VoidRecord};

use crate::keys;
use crate::{Keyspaces, Shared, StoreError};

/// Most log entries plus voids one page reads.
pub const MAX_CHANGES: usize = 100_000;

fn storage(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(e.to_string())
}

/// The ordinal the next void gets (called by the writer only).
pub fn next_void_ordinal(keyspaces: &Keyspaces) -> Result<u64, StoreError> {
    match keyspaces.void_order.last_key_value() {
        Some(item) => Ok(keys::read_u64(&item.key()?)? + 1),
        None => Ok(0),
    }
}

/// Gives every void recorded before `void_order` existed an ordinal (in seq
/// order), once, at open.
pub fn order_unordered_voids(
    db: &fjall::Database,
    keyspaces: &Keyspaces,
) -> Result<(), StoreError> {
    if !keyspaces.void_order.is_empty()? || keyspaces.voids.is_empty()? {
        return Ok(());
    }
    let mut batch = db.batch().durability(Some(fjall::PersistMode::SyncAll));
    for (ordinal, item) in keyspaces.voids.iter().enumerate() {
        let seq = keys::read_u64(&item.key()?)?;
        batch.insert(
            &keyspaces.void_order,
            keys::seq_key(ordinal as u64),
            keys::seq_key(seq),
        );
    }
    batch.commit()?;
    Ok(())
}

/// The times of `meter`'s input that changed after `cursor`.
pub fn changes(
    shared: &Shared,
    meter: &str,
    cursor: ChangeCursor,
    limit: usize,
) -> Result<ChangePage, LedgerError> {
    let event_type = {
        let read = shared.read_state();
        match read.catalog.compile(meter) {
            None => return Err(LedgerError::not_found("meter", meter)),
            Some(Err(e)) => {
                return Err(LedgerError::Conflict(format!(
                    "meter {meter:?} cannot be compiled: {e}"
                )));
            }
            Some(Ok(m)) => m.event_type().to_owned(),
        }
    };
    let limit = limit.clamp(1, MAX_CHANGES);
    let snapshot = shared.db.snapshot();
    let ks = &shared.keyspaces;
    let mut page = ChangePage {
        times: Vec::new(),
        next: cursor,
        more: false,
    };
    let mut read = 0;
    shared
        .log
        .scan(&snapshot, cursor.log, u64::MAX, false, &mut |block| {
            for seq in cursor.log.max(block.first)..block.end() {
                if read == limit {
                    page.more = true;
                    return Ok(ControlFlow::Break(()));
                }
                read += 1;
                page.next.log = seq + 1;
                let i = (seq - block.first) as usize;
                if block.event_type(i) == event_type {
                    page.times.push(block.time(i));
                }
            }
            Ok(ControlFlow::Continue(()))
        })
        .map_err(storage)?;
    for item in snapshot.range(&ks.void_order, keys::seq_key(cursor.voids)..) {
        if read == limit {
            page.more = true;
            break;
        }
        let (key, value) = item.into_inner().map_err(storage)?;
        read += 1;
        page.next.voids = keys::read_u64(&key)? + 1;
        let seq = keys::read_u64(&value)?;
        let raw = snapshot
            .get(&ks.voids, keys::seq_key(seq))
            .map_err(storage)?
            .ok_or_else(|| storage(format!("void order names seq {seq}, which has no void")))?;
        let record: VoidRecord = serde_json::from_slice(&raw).map_err(storage)?;
        if record.event_type == event_type {
            page.times.push(record.event_time);
        }
    }
    Ok(page)
}
