//! The dictionary: subjects and group tuples interned as `u32` ids, so a
//! rollup key is 18 bytes (see [`crate::keys`]).
//!
//! Entries live in `meta` (`dict/i/<id>` → entry, `dict/n/<entry>` → id) and
//! are written in the same batch as the first rollup that uses them (for
//! ingest, the materialiser's batch of the tail chunk that introduced them),
//! so a stored key never names an id the store does not hold. Entries are never
//! removed: subjects and group values are few next to events.
//!
//! The writer keeps its own maps ([`WriterDict`]); ids it hands out are
//! *fresh* until their batch commits, and handed out again if it does not.
//! Readers use [`ReaderDict`], which the writer extends after each commit
//! (for ingest: before it pushes the tail chunk naming the new ids) and
//! before it answers; a reader whose snapshot is newer than its copy
//! reads the missing entries from the snapshot.

use std::collections::HashMap;

use fjall::Readable;

use crate::StoreError;
use crate::keys::{self, DictEntry};

/// The writer's dictionary.
#[derive(Default)]
pub(crate) struct WriterDict {
    subjects: rustc_hash::FxHashMap<String, u32>,
    groups: rustc_hash::FxHashMap<Vec<Option<String>>, u32>,
    next_id: u32,
    /// Ids handed out since the last commit, in order.
    fresh: Vec<(u32, DictEntry)>,
}

impl WriterDict {
    pub fn new(entries: &[(u32, DictEntry)]) -> WriterDict {
        let mut dict = WriterDict::default();
        for (id, entry) in entries {
            dict.next_id = dict.next_id.max(id.saturating_add(1));
            match entry {
                DictEntry::Subject(s) => {
                    dict.subjects.insert(s.clone(), *id);
                }
                DictEntry::Groups(g) => {
                    dict.groups.insert(g.clone(), *id);
                }
            }
        }
        dict
    }

    fn allocate(&mut self, entry: DictEntry) -> Result<u32, StoreError> {
        let id = self.next_id;
        // The last id is `keys::ALL_GROUPS`, never an entry's.
        if id == keys::ALL_GROUPS {
            return Err(StoreError::TooLong("the dictionary", u32::MAX as usize));
        }
        self.next_id = id + 1;
        self.fresh.push((id, entry));
        Ok(id)
    }

    pub fn subject(&mut self, subject: &str) -> Result<u32, StoreError> {
        if let Some(id) = self.subjects.get(subject) {
            return Ok(*id);
        }
        let id = self.allocate(DictEntry::Subject(subject.to_owned()))?;
        self.subjects.insert(subject.to_owned(), id);
        Ok(id)
    }

    pub fn groups(&mut self, groups: &[Option<String>]) -> Result<u32, StoreError> {
        if let Some(id) = self.groups.get(groups) {
            return Ok(*id);
        }
        let id = self.allocate(DictEntry::Groups(groups.to_vec()))?;
        self.groups.insert(groups.to_vec(), id);
        Ok(id)
    }

    /// Adds the fresh entries to a batch that is about to be committed.
    pub fn write_fresh(&self, batch: &mut fjall::OwnedWriteBatch, meta: &fjall::Keyspace) {
        write_entries(batch, meta, &self.fresh);
    }

    /// The fresh entries were committed: they are ordinary entries now.
    pub fn take_committed(&mut self) -> Vec<(u32, DictEntry)> {
        std::mem::take(&mut self.fresh)
    }

    /// Forgets the fresh entries (their batch was not committed).
    pub fn roll_back(&mut self) {
        let Some(first) = self.fresh.first().map(|(id, _)| *id) else {
            return;
        };
        for (_, entry) in std::mem::take(&mut self.fresh) {
            match entry {
                DictEntry::Subject(s) => {
                    self.subjects.remove(&s);
                }
                DictEntry::Groups(g) => {
                    self.groups.remove(&g);
                }
            }
        }
        self.next_id = first;
    }
}

/// Adds entries to a batch: both directions of each.
pub(crate) fn write_entries(
    batch: &mut fjall::OwnedWriteBatch,
    meta: &fjall::Keyspace,
    entries: &[(u32, DictEntry)],
) {
    for (id, entry) in entries {
        let encoded = entry.encode();
        batch.insert(meta, keys::dict_name_key(&encoded), id.to_be_bytes());
        batch.insert(meta, keys::dict_id_key(*id), encoded);
    }
}

/// The readers' dictionary.
#[derive(Default)]
pub(crate) struct ReaderDict {
    by_id: HashMap<u32, DictEntry>,
    subjects: HashMap<String, u32>,
}

impl ReaderDict {
    pub fn new(entries: Vec<(u32, DictEntry)>) -> ReaderDict {
        let mut dict = ReaderDict::default();
        dict.extend(entries);
        dict
    }

    pub fn extend(&mut self, entries: Vec<(u32, DictEntry)>) {
        for (id, entry) in entries {
            if let DictEntry::Subject(s) = &entry {
                self.subjects.insert(s.clone(), id);
            }
            self.by_id.insert(id, entry);
        }
    }

    pub fn get(&self, id: u32) -> Option<&DictEntry> {
        self.by_id.get(&id)
    }

    pub fn subject_id(&self, subject: &str) -> Option<u32> {
        self.subjects.get(subject).copied()
    }
}

/// Every stored entry, read at open.
pub(crate) fn load(meta: &fjall::Keyspace) -> Result<Vec<(u32, DictEntry)>, StoreError> {
    let mut entries = Vec::new();
    for item in meta.prefix(keys::DICT_ID_PREFIX) {
        let (key, value) = item.into_inner()?;
        let id = key
            .get(keys::DICT_ID_PREFIX.len()..)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_be_bytes)
            .ok_or(StoreError::Corrupt("dictionary id"))?;
        entries.push((id, DictEntry::decode(&value)?));
    }
    Ok(entries)
}

/// An entry the reader's copy lacks, from the snapshot.
pub(crate) fn read_entry(
    snapshot: &fjall::Snapshot,
    meta: &fjall::Keyspace,
    id: u32,
) -> Result<DictEntry, StoreError> {
    let raw = snapshot
        .get(meta, keys::dict_id_key(id))?
        .ok_or(StoreError::Corrupt(
            "a rollup names an unknown dictionary id",
        ))?;
    DictEntry::decode(&raw)
}

/// A subject's id, if it has one in the snapshot.
pub(crate) fn read_subject_id(
    snapshot: &fjall::Snapshot,
    meta: &fjall::Keyspace,
    subject: &str,
) -> Result<Option<u32>, StoreError> {
    snapshot
        .get(meta, keys::dict_name_key(&keys::subject_entry(subject)))?
        .map(|raw| {
            <[u8; 4]>::try_from(&raw[..])
                .map(u32::from_be_bytes)
                .map_err(|_| StoreError::Corrupt("dictionary id"))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_roll_back_frees_the_fresh_ids() {
        let mut dict = WriterDict::new(&[(4, DictEntry::Subject("a".into()))]);
        assert_eq!(dict.subject("a").unwrap(), 4);
        assert_eq!(dict.subject("b").unwrap(), 5);
        assert_eq!(dict.groups(&[None]).unwrap(), 6);
        assert_eq!(dict.groups(&[None]).unwrap(), 6);
        dict.roll_back();
        assert_eq!(dict.groups(&[Some("x".into())]).unwrap(), 5);
        assert_eq!(dict.subject("b").unwrap(), 6);
        assert_eq!(dict.take_committed().len(), 2);
        assert_eq!(dict.subject("b").unwrap(), 6);
        assert!(dict.take_committed().is_empty());
    }
}
