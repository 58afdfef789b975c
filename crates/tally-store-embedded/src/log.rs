//! The log: the truth every other part of the store is derived from.
//!
//! [`EventLog`] is what the writer, the replay at open, backfill, voids and
//! quarantine re-evaluation need of a log: append one group commit's
//! events durably, say where it ends, and read positions in order. A
//! cluster backend can put a broker's stream behind it; [`BlockLog`] is the
//! embedded one, keeping events in compressed columnar blocks
//! ([`crate::block`]) in the `log` keyspace. Readers that must see the log
//! and other keyspaces at one instant (event listings, change feeds) read
//! [`BlockLog`] through a fjall snapshot ([`BlockLog::scan`]).
//!
//! **Invariants:** positions are dense and start at 0: an append at
//! position `p` follows one that ended at `p`, and nothing is ever
//! rewritten or removed (retention is not offered: dedupe, voids and
//! rebuilds read old events). When [`EventLog::append`] returns, the events
//! survive a crash (`kill -9`, power loss).
//! **Never** answer an event at a position the log does not hold.

use std::ops::ControlFlow;

use fjall::{PersistMode, Readable};
use jiff::Timestamp;
use tally_model::CloudEvent;

use crate::StoreError;
use crate::block::{self, Block, Record};

/// A position in the log: the sequence number of an event, from 0.
pub type LogPosition = u64;

/// One event as the log holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedEvent {
    pub seq: LogPosition,
    pub ingested_at: Timestamp,
    pub event: CloudEvent,
}

/// An append-only, durable log of events; see the module docs.
pub trait EventLog: Send + Sync {
    /// Appends `records` at positions `first ..`, and returns once they
    /// are synced to stable storage. `first` is where the log ends.
    fn append(&self, first: LogPosition, records: &[&Record]) -> Result<(), StoreError>;

    /// One past the last position held (0 for an empty log).
    fn end(&self) -> Result<LogPosition, StoreError>;

    /// Visits the events at positions `from .. to`, in order, until `visit`
    /// breaks; only those of `event_type` when it is given.
    fn read(
        &self,
        from: LogPosition,
        to: LogPosition,
        event_type: Option<&str>,
        visit: &mut dyn FnMut(LoggedEvent) -> Result<ControlFlow<()>, StoreError>,
    ) -> Result<(), StoreError>;

    /// The event at `seq`, if the log holds it.
    fn get(&self, seq: LogPosition) -> Result<Option<LoggedEvent>, StoreError>;
}

/// The embedded log: event blocks in a fjall keyspace.
#[derive(Clone)]
pub struct BlockLog {
    db: fjall::Database,
    keyspace: fjall::Keyspace,
}

/// A cursor over one snapshot of the log that keeps the last block it
/// decoded, so neighbouring lookups decode it once.
pub(crate) struct BlockReader<'a, R: Readable> {
    log: &'a BlockLog,
    view: &'a R,
    last: Option<Block>,
}

impl<'a, R: Readable> BlockReader<'a, R> {
    /// The block holding `seq`, if any.
    pub fn block(&mut self, seq: LogPosition) -> Result<Option<&Block>, StoreError> {
        if !self.last.as_ref().is_some_and(|b| b.holds(seq)) {
            self.last = self.log.block_at(self.view, seq)?;
        }
        Ok(self.last.as_ref().filter(|b| b.holds(seq)))
    }

    /// The event at `seq`, if the log holds it.
    pub fn get(&mut self, seq: LogPosition) -> Result<Option<LoggedEvent>, StoreError> {
        let Some(block) = self.block(seq)? else {
            return Ok(None);
        };
        let i = (seq - block.first) as usize;
        Ok(Some(LoggedEvent {
            seq,
            ingested_at: block.ingested_at(i),
            event: block.event(i)?,
        }))
    }
}

impl BlockLog {
    pub(crate) fn new(db: fjall::Database, keyspace: fjall::Keyspace) -> BlockLog {
        BlockLog { db, keyspace }
    }

    pub(crate) fn keyspace(&self) -> &fjall::Keyspace {
        &self.keyspace
    }

    /// A reader of `view` (a snapshot of the database).
    pub(crate) fn reader<'a, R: Readable>(&'a self, view: &'a R) -> BlockReader<'a, R> {
        BlockReader {
            log: self,
            view,
            last: None,
        }
    }

    /// The block whose first position is at or before `seq`.
    fn block_at(
        &self,
        view: &impl Readable,
        seq: LogPosition,
    ) -> Result<Option<Block>, StoreError> {
        let Some(item) = view.range(&self.keyspace, ..=seq.to_be_bytes()).next_back() else {
            return Ok(None);
        };
        let (key, value) = item.into_inner()?;
        Ok(Some(Block::decode(crate::keys::read_u64(&key)?, &value)?))
    }

    /// Visits, in `view`, the blocks holding positions `from .. to`: in
    /// order, or newest first when `reverse`, until `visit` breaks. Blocks
    /// are decoded whole; the visitor picks the events it wants.
    pub(crate) fn scan(
        &self,
        view: &impl Readable,
        from: LogPosition,
        to: LogPosition,
        reverse: bool,
        visit: &mut dyn FnMut(&Block) -> Result<ControlFlow<()>, StoreError>,
    ) -> Result<(), StoreError> {
        if from >= to {
            return Ok(());
        }
        // The block holding `from` may begin before it.
        let start = match view
            .range(&self.keyspace, ..=from.to_be_bytes())
            .next_back()
        {
            Some(item) => item.key()?.to_vec(),
            None => from.to_be_bytes().to_vec(),
        };
        let range = view.range(&self.keyspace, start..to.to_be_bytes().to_vec());
        let mut step = |item: fjall::Guard| -> Result<ControlFlow<()>, StoreError> {
            let (key, value) = item.into_inner()?;
            let block = Block::decode(crate::keys::read_u64(&key)?, &value)?;
            if block.end() <= from {
                return Ok(ControlFlow::Continue(()));
            }
            visit(&block)
        };
        if reverse {
            for item in range.rev() {
                if step(item)?.is_break() {
                    break;
                }
            }
        } else {
            for item in range {
                if step(item)?.is_break() {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Appends blocks to `batch` for `records` at positions `first ..`.
    pub(crate) fn append_to(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        first: LogPosition,
        records: &[&Record],
    ) -> Result<(), StoreError> {
        let mut at = first;
        let mut flush = |part: &[&Record]| -> Result<(), StoreError> {
            batch.insert(&self.keyspace, at.to_be_bytes(), block::encode(part)?);
            at += part.len() as u64;
            Ok(())
        };
        // A block closes before the event that would take it past either
        // bound, so a large event never drags a full block with it.
        let mut start = 0;
        let mut bytes = 0;
        for (i, record) in records.iter().enumerate() {
            let size = record.size();
            if i > start
                && (i - start == block::MAX_BLOCK_EVENTS || bytes + size > block::MAX_BLOCK_BYTES)
            {
                flush(&records[start..i])?;
                start = i;
                bytes = 0;
            }
            bytes += size;
        }
        if start < records.len() {
            flush(&records[start..])?;
        }
        Ok(())
    }
}

impl EventLog for BlockLog {
    fn append(&self, first: LogPosition, records: &[&Record]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
        self.append_to(&mut batch, first, records)?;
        batch.commit()?;
        Ok(())
    }

    fn end(&self) -> Result<LogPosition, StoreError> {
        match self.keyspace.last_key_value() {
            Some(item) => {
                let (key, value) = item.into_inner()?;
                Ok(crate::keys::read_u64(&key)? + block::count_of(&value)?)
            }
            None => Ok(0),
        }
    }

    fn read(
        &self,
        from: LogPosition,
        to: LogPosition,
        event_type: Option<&str>,
        visit: &mut dyn FnMut(LoggedEvent) -> Result<ControlFlow<()>, StoreError>,
    ) -> Result<(), StoreError> {
        let snapshot = self.db.snapshot();
        self.scan(&snapshot, from, to, false, &mut |block| {
            let lo = from.max(block.first);
            let hi = to.min(block.end());
            for seq in lo..hi {
                let i = (seq - block.first) as usize;
                if event_type.is_some_and(|t| t != block.event_type(i)) {
                    continue;
                }
                let event = LoggedEvent {
                    seq,
                    ingested_at: block.ingested_at(i),
                    event: block.event(i)?,
                };
                if visit(event)?.is_break() {
                    return Ok(ControlFlow::Break(()));
                }
            }
            Ok(ControlFlow::Continue(()))
        })
    }

    fn get(&self, seq: LogPosition) -> Result<Option<LoggedEvent>, StoreError> {
        let snapshot = self.db.snapshot();
        self.reader(&snapshot).get(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u64, data_bytes: usize) -> Record {
        let event = serde_json::json!({"specversion": "1.0", "id": format!("e{i}"),
            "source": "s", "type": if i.is_multiple_of(3) { "a" } else { "b" }, "subject": "p",
            "time": "2026-01-01T00:00:00Z", "data": {"pad": "x".repeat(data_bytes)}});
        let event = tally_model::parse_event(event, Timestamp::now()).unwrap();
        Record::new(Timestamp::now(), &event).unwrap()
    }

    #[test]
    fn groups_split_into_bounded_blocks_and_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = fjall::Database::builder(dir.path()).open().unwrap();
        let keyspace = db
            .keyspace("log", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        let log = BlockLog::new(db.clone(), keyspace);
        assert_eq!(log.end().unwrap(), 0);
        // Many small events, then a few larger than a block's byte bound.
        let mut records: Vec<Record> = (0..10_000).map(|i| record(i, 10)).collect();
        records.extend((10_000..10_003).map(|i| record(i, block::MAX_BLOCK_BYTES)));
        log.append(0, &records[..5].iter().collect::<Vec<_>>())
            .unwrap();
        log.append(5, &records[5..].iter().collect::<Vec<_>>())
            .unwrap();
        assert_eq!(log.end().unwrap(), 10_003);
        let snapshot = db.snapshot();
        let mut sizes = Vec::new();
        log.scan(&snapshot, 0, u64::MAX, false, &mut |b| {
            sizes.push(b.len());
            Ok(ControlFlow::Continue(()))
        })
        .unwrap();
        assert_eq!(sizes, vec![5, 4096, 4096, 1803, 1, 1, 1]);
        // In order, from the middle of a block, filtered by type.
        let mut seen = Vec::new();
        log.read(4000, 9000, Some("a"), &mut |e| {
            assert_eq!(e.event.id, format!("e{}", e.seq));
            seen.push(e.seq);
            Ok(ControlFlow::Continue(()))
        })
        .unwrap();
        let expected: Vec<u64> = (4000u64..9000).filter(|i| i.is_multiple_of(3)).collect();
        assert_eq!(seen, expected);
        // Newest first, and single events.
        let mut newest = None;
        log.scan(&snapshot, 0, 10_002, true, &mut |b| {
            newest = Some(b.end());
            Ok(ControlFlow::Break(()))
        })
        .unwrap();
        assert_eq!(newest, Some(10_002));
        for seq in [0, 4, 5, 4100, 10_002] {
            assert_eq!(log.get(seq).unwrap().unwrap().event.id, format!("e{seq}"));
        }
        assert!(log.get(10_003).unwrap().is_none());
    }
}
