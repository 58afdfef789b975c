//! Durable forwarding progress, in one fjall database per sink.
//!
//! Keyspaces:
//! - `records`: [`RecordKey::encode`] → JSON [`RecordProgress`]: every
//!   revision ever planned for the record, its value and whether the
//!   provider acknowledged it.
//! - `pending`: record key + revision (u32 BE) → the queued [`UsageRecord`]
//!   JSON, for revisions planned but not yet acknowledged or dead-lettered.
//!   They are queued again after a restart, with the same `uniqueId`.
//! - `meta`: `window_ms` → i64 BE, the window size the progress was made
//!   with (a sink's window size never changes); `cursor/<meter>` → JSON
//!   [`MeterCursor`]; `attribution` → the
//!   attribution the cursors were planned with; `counters` → JSON
//!   [`Counters`] (records sent, corrections, dead-lettered, events read,
//!   retries: they survive restarts); `next_dead_letter_id` → u64 BE, the
//!   id the next dead letter gets (ids are never reused);
//!   `unattributed/` + meter api name + NUL + window start (i64 BE, sign
//!   flipped) → JSON map project → usage of that window no binding covers.
//! - `dead`: dead-letter id (u64 BE) → JSON [`DeadLetterRecord`]: a batch the
//!   provider refused for good, with its answer. Stored in the same batch
//!   that marks its revisions dead-lettered; a retry moves them back to
//!   `pending` in one batch too.
//!
//! A pass's plan (new revisions, their pending entries, the cursors) is one
//! batch committed with `PersistMode::SyncAll` *before* anything is sent, so
//! what was sent is always known after a crash.

use std::collections::BTreeMap;
use std::path::Path;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use jiff::Timestamp;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::record::{RecordKey, UsageRecord, window_prefix};

/// The window size sinks had before sizes were kept with their progress.
const LEGACY_WINDOW_MS: i64 = 60_000;

/// A failure of the progress store.
#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    /// fjall failed.
    #[error("progress store: {0}")]
    Storage(#[from] fjall::Error),
    /// Stored bytes do not decode.
    #[error("progress store is corrupt: {0}")]
    Corrupt(String),
    /// The sink's window size differs from the one its progress was made
    /// with: its records would be counted twice under other windows.
    #[error(
        "this sink's progress was made with {stored} windows, but spec.windowSize is now \
         {configured}s; a sink's window size cannot change (its records would be counted \
         twice): keep the old size, or forward under a new sink name"
    )]
    WindowChanged {
        /// What the progress was made with (`Ns`, or `other` for a store
        /// older than the stored size whose windows do not fit).
        stored: String,
        /// The configured size, in seconds.
        configured: i64,
    },
}

/// The fate of one revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RevisionState {
    /// Planned (and queued), not yet answered.
    Pending,
    /// The provider acknowledged it.
    Acked,
    /// The provider refused it for good; it is in the sink's dead letters.
    DeadLettered,
}

/// One revision of a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revision {
    /// 0, 1, ...
    pub revision: u32,
    /// What it carried.
    pub value: Decimal,
    /// Its fate.
    pub state: RevisionState,
}

/// Every revision of one record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordProgress {
    /// In revision order.
    pub revisions: Vec<Revision>,
}

impl RecordProgress {
    /// The sum of every revision ever planned: what the provider holds once
    /// everything in flight is answered (dead letters included, so a refused
    /// record is not re-planned forever; reconciliation shows it).
    pub fn planned_total(&self) -> Decimal {
        self.revisions.iter().map(|r| r.value).sum()
    }

    /// The sum of acknowledged revisions: what the provider holds now.
    pub fn acked_total(&self) -> Decimal {
        self.revisions
            .iter()
            .filter(|r| r.state == RevisionState::Acked)
            .map(|r| r.value)
            .sum()
    }

    /// The next revision number.
    pub fn next_revision(&self) -> u32 {
        self.revisions.last().map_or(0, |r| r.revision + 1)
    }
}

/// Where a meter's forwarding stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterCursor {
    /// Windows starting before this were planned at least once.
    pub planned_until_ms: i64,
    /// Windows starting before this are never forwarded.
    pub start_ms: i64,
    /// The usage source's change cursor.
    pub source_cursor: crate::source::ChangeCursor,
    /// Windows from here up to `planned_until_ms` must be planned again (the
    /// attribution changed).
    pub rescan_from_ms: Option<i64>,
}

/// A pass's plan, committed at once.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub records: Vec<(RecordKey, RecordProgress)>,
    pub pending: Vec<(Vec<u8>, Vec<u8>)>,
    pub cursors: Vec<(String, MeterCursor)>,
    pub attribution: Option<Vec<u8>>,
    pub counters: Option<Counters>,
    /// (meter api name, window start ms) → unattributed usage per project
    /// (empty: none, the entry is removed).
    pub unattributed: Vec<(String, i64, Unattributed)>,
}

/// Usage of one window that no binding covers, per project.
pub(crate) type Unattributed = BTreeMap<String, Decimal>;

/// One meter's counters, kept across restarts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterCounters {
    /// Records acknowledged (corrections included).
    pub sent: u64,
    /// Of which corrections (revision > 0).
    pub corrections: u64,
    /// Records the provider refused for good.
    pub dead_lettered: u64,
    /// Events (and voids) of the meter read from the ledger's change feed.
    pub events_read: u64,
}

/// A sink's counters, kept across restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Per meter api name.
    pub meters: BTreeMap<String, MeterCounters>,
    /// Requests retried.
    pub retries: u64,
}

const UNATTRIBUTED: &[u8] = b"unattributed/";

fn unattributed_key(meter_api_name: &str, window_ms: i64) -> Vec<u8> {
    let mut key = UNATTRIBUTED.to_vec();
    key.extend_from_slice(&window_prefix(meter_api_name, ts(window_ms)));
    key
}

fn ts(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(ms).unwrap_or(Timestamp::MIN)
}

/// The key of a revision in `pending` and in queued items.
pub(crate) fn revision_key(record: &[u8], revision: u32) -> Vec<u8> {
    let mut key = Vec::with_capacity(record.len() + 4);
    key.extend_from_slice(record);
    key.extend_from_slice(&revision.to_be_bytes());
    key
}

/// Splits a revision key.
pub(crate) fn split_revision_key(key: &[u8]) -> Result<(RecordKey, u32), ProgressError> {
    let at = key
        .len()
        .checked_sub(4)
        .ok_or_else(|| ProgressError::Corrupt("revision key too short".into()))?;
    let mut revision = [0u8; 4];
    revision.copy_from_slice(&key[at..]);
    let record =
        RecordKey::decode(&key[..at]).map_err(|e| ProgressError::Corrupt(e.to_string()))?;
    Ok((record, u32::from_be_bytes(revision)))
}

fn json<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, ProgressError> {
    serde_json::from_slice(bytes).map_err(|e| ProgressError::Corrupt(e.to_string()))
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Our own types of strings, numbers and maps always serialise.
    serde_json::to_vec(value).unwrap_or_default()
}

/// A batch the provider refused for good, kept until an operator retries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterRecord {
    /// Its id in this sink's dead-letter list.
    pub id: u64,
    /// When it was refused.
    pub at: Timestamp,
    /// Why (`permanent error`, `destination refused`, ...).
    pub reason: String,
    /// The provider's last HTTP status, if it answered.
    pub status: Option<u16>,
    /// The provider's answer (first 4 KiB, the API key removed), the
    /// transport error, or why the egress policy refused the destination.
    /// Shown to operators only (BillingSinks and their dead letters are
    /// admin-only).
    pub answer: String,
    /// Attempts made.
    pub attempts: u32,
    /// The records of the batch.
    pub records: Vec<UsageRecord>,
}

pub(crate) struct ProgressStore {
    db: Database,
    records: Keyspace,
    pending: Keyspace,
    meta: Keyspace,
    dead: Keyspace,
}

impl ProgressStore {
    pub fn open(path: &Path) -> Result<Self, ProgressError> {
        let db = Database::builder(path).open()?;
        Ok(ProgressStore {
            records: db.keyspace("records", KeyspaceCreateOptions::default)?,
            pending: db.keyspace("pending", KeyspaceCreateOptions::default)?,
            meta: db.keyspace("meta", KeyspaceCreateOptions::default)?,
            dead: db.keyspace("dead", KeyspaceCreateOptions::default)?,
            db,
        })
    }

    /// The window size this sink forwards with, recorded on a first start
    /// and never changed after (its records would be counted twice under
    /// other windows). `configured_ms` is the spec's size; when the spec
    /// gives none (`explicit` false), a sink keeps the size its progress
    /// was made with, and a store written before sizes were kept keeps the
    /// former default of one minute. An explicit size that differs is
    /// refused, as is an old store whose cursors and records do not all sit
    /// on the size's boundaries.
    pub fn settle_window(&self, configured_ms: i64, explicit: bool) -> Result<i64, ProgressError> {
        let changed = |stored: String| ProgressError::WindowChanged {
            stored,
            configured: configured_ms / 1000,
        };
        if let Some(stored) = self.stored_window()? {
            return match stored == configured_ms || !explicit {
                true => Ok(stored),
                false => Err(changed(format!("{}s", stored / 1000))),
            };
        }
        let window_ms = match (self.has_progress()?, explicit) {
            (true, false) => LEGACY_WINDOW_MS,
            _ => configured_ms,
        };
        let fits = |ms: i64| ms.rem_euclid(window_ms) == 0;
        for guard in self.meta.prefix("cursor/") {
            let (_, value) = guard.into_inner()?;
            let cursor: MeterCursor = json(&value)?;
            if !fits(cursor.planned_until_ms) || !fits(cursor.start_ms) {
                return Err(changed("other".into()));
            }
        }
        for guard in self.records.iter() {
            let key = guard.key()?;
            let key = RecordKey::decode(&key).map_err(|e| ProgressError::Corrupt(e.to_string()))?;
            if !fits(key.window_start.as_millisecond()) {
                return Err(changed("other".into()));
            }
        }
        self.meta.insert("window_ms", window_ms.to_be_bytes())?;
        Ok(window_ms)
    }

    fn stored_window(&self) -> Result<Option<i64>, ProgressError> {
        let Some(value) = self.meta.get("window_ms")? else {
            return Ok(None);
        };
        let bytes: [u8; 8] = value
            .as_ref()
            .try_into()
            .map_err(|_| ProgressError::Corrupt("window_ms".into()))?;
        Ok(Some(i64::from_be_bytes(bytes)))
    }

    /// Whether any cursor or record was written.
    fn has_progress(&self) -> Result<bool, ProgressError> {
        if let Some(guard) = self.meta.prefix("cursor/").next() {
            guard.into_inner()?;
            return Ok(true);
        }
        if let Some(guard) = self.records.iter().next() {
            guard.key()?;
            return Ok(true);
        }
        Ok(false)
    }

    pub fn cursor(&self, meter: &str) -> Result<Option<MeterCursor>, ProgressError> {
        self.meta
            .get(format!("cursor/{meter}"))?
            .map(|v| json(&v))
            .transpose()
    }

    pub fn attribution(&self) -> Result<Option<Vec<u8>>, ProgressError> {
        Ok(self.meta.get("attribution")?.map(|v| v.to_vec()))
    }

    /// Every record of one meter and window.
    pub fn window(
        &self,
        meter_api_name: &str,
        window_start: Timestamp,
    ) -> Result<BTreeMap<RecordKey, RecordProgress>, ProgressError> {
        let mut out = BTreeMap::new();
        for guard in self
            .records
            .prefix(window_prefix(meter_api_name, window_start))
        {
            let (key, value) = guard.into_inner()?;
            let key = RecordKey::decode(&key).map_err(|e| ProgressError::Corrupt(e.to_string()))?;
            out.insert(key, json(&value)?);
        }
        Ok(out)
    }

    /// Every record of a meter with a window in `[from, to)`.
    pub fn records_between(
        &self,
        meter_api_name: &str,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<(RecordKey, RecordProgress)>, ProgressError> {
        let range = window_prefix(meter_api_name, from)..window_prefix(meter_api_name, to);
        let mut out = Vec::new();
        for guard in self.records.range(range) {
            let (key, value) = guard.into_inner()?;
            let key = RecordKey::decode(&key).map_err(|e| ProgressError::Corrupt(e.to_string()))?;
            out.push((key, json(&value)?));
        }
        Ok(out)
    }

    /// Commits a plan durably.
    pub fn commit(&self, plan: &Plan) -> Result<(), ProgressError> {
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
        for (key, progress) in &plan.records {
            batch.insert(&self.records, key.encode(), to_json(progress));
        }
        for (key, data) in &plan.pending {
            batch.insert(&self.pending, key.as_slice(), data.as_slice());
        }
        for (meter, cursor) in &plan.cursors {
            batch.insert(&self.meta, format!("cursor/{meter}"), to_json(cursor));
        }
        if let Some(attribution) = &plan.attribution {
            batch.insert(&self.meta, "attribution", attribution.as_slice());
        }
        if let Some(counters) = &plan.counters {
            batch.insert(&self.meta, "counters", to_json(counters));
        }
        for (meter, window, projects) in &plan.unattributed {
            let key = unattributed_key(meter, *window);
            if projects.is_empty() {
                batch.remove(&self.meta, key);
            } else {
                batch.insert(&self.meta, key, to_json(projects));
            }
        }
        batch.commit()?;
        Ok(())
    }

    /// The stored counters (zero on a first start).
    pub fn counters(&self) -> Result<Counters, ProgressError> {
        self.meta
            .get("counters")?
            .map_or(Ok(Counters::default()), |v| json(&v))
    }

    /// Every stored window's unattributed usage: (meter api name, window
    /// start ms) → per project.
    pub fn unattributed(&self) -> Result<Vec<(String, i64, Unattributed)>, ProgressError> {
        let mut out = Vec::new();
        for guard in self.meta.prefix(UNATTRIBUTED) {
            let (key, value) = guard.into_inner()?;
            let rest = &key[UNATTRIBUTED.len()..];
            let corrupt = || ProgressError::Corrupt("unattributed key".into());
            let nul = rest.iter().position(|b| *b == 0).ok_or_else(corrupt)?;
            let meter = std::str::from_utf8(&rest[..nul]).map_err(|_| corrupt())?;
            let window: [u8; 8] = rest[nul + 1..].try_into().map_err(|_| corrupt())?;
            let window = (u64::from_be_bytes(window) ^ (1 << 63)) as i64;
            out.push((meter.to_owned(), window, json(&value)?));
        }
        Ok(out)
    }

    /// Every pending revision, as queued.
    pub fn pending(&self) -> Result<Vec<(Vec<u8>, UsageRecord)>, ProgressError> {
        let mut out = Vec::new();
        for guard in self.pending.iter() {
            let (key, value) = guard.into_inner()?;
            out.push((key.to_vec(), json(&value)?));
        }
        Ok(out)
    }

    /// Every stored dead letter, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<DeadLetterRecord>, ProgressError> {
        let mut out = Vec::new();
        for guard in self.dead.iter() {
            let (_, value) = guard.into_inner()?;
            out.push(json(&value)?);
        }
        Ok(out)
    }

    /// How many dead letters are stored.
    pub fn dead_letter_count(&self) -> Result<u64, ProgressError> {
        Ok(self.dead.len()? as u64)
    }

    /// The id the next dead letter gets: past every id ever stored (a
    /// retried letter's id is not given again), at least 1.
    pub fn next_dead_letter_id(&self) -> Result<u64, ProgressError> {
        let corrupt = || ProgressError::Corrupt("dead letter id".into());
        let last = match self.dead.last_key_value() {
            Some(guard) => {
                let key = guard.key()?;
                let bytes: [u8; 8] = key.as_ref().try_into().map_err(|_| corrupt())?;
                u64::from_be_bytes(bytes) + 1
            }
            None => 1,
        };
        let stored = match self.meta.get("next_dead_letter_id")? {
            Some(value) => {
                let bytes: [u8; 8] = value.as_ref().try_into().map_err(|_| corrupt())?;
                u64::from_be_bytes(bytes)
            }
            None => 1,
        };
        Ok(last.max(stored))
    }

    /// Takes a dead letter out and makes its revisions pending again, in
    /// one durable batch; `None` if there is no such letter.
    pub fn retry_dead_letter(&self, id: u64) -> Result<Option<DeadLetterRecord>, ProgressError> {
        let Some(raw) = self.dead.get(id.to_be_bytes())? else {
            return Ok(None);
        };
        let letter: DeadLetterRecord = json(&raw)?;
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
        let mut touched: BTreeMap<Vec<u8>, RecordProgress> = BTreeMap::new();
        for record in &letter.records {
            let key = record
                .key()
                .map_err(|e| ProgressError::Corrupt(e.to_string()))?;
            let encoded = key.encode();
            if !touched.contains_key(&encoded) {
                let Some(stored) = self.records.get(&encoded)? else {
                    continue;
                };
                touched.insert(encoded.clone(), json(&stored)?);
            }
            if let Some(progress) = touched.get_mut(&encoded)
                && let Some(revision) = progress
                    .revisions
                    .iter_mut()
                    .find(|r| r.revision == record.revision)
                && revision.state == RevisionState::DeadLettered
            {
                revision.state = RevisionState::Pending;
                batch.insert(
                    &self.pending,
                    revision_key(&encoded, record.revision),
                    to_json(record),
                );
            }
        }
        for (key, progress) in &touched {
            batch.insert(&self.records, key.as_slice(), to_json(progress));
        }
        batch.remove(&self.dead, id.to_be_bytes());
        batch.commit()?;
        Ok(Some(letter))
    }

    /// Records the answers for revisions (by revision key) and stores dead
    /// letters, in one batch; returns the revisions whose state changed,
    /// with their new state.
    /// `counters` are brought up to date with the changes and written in
    /// the same batch (left as they were if the write fails).
    pub fn settle(
        &self,
        answers: &[(Vec<u8>, RevisionState)],
        letters: &[DeadLetterRecord],
        counters: &mut Counters,
    ) -> Result<Vec<(RecordKey, Revision)>, ProgressError> {
        let mut changed = Vec::new();
        let mut touched: BTreeMap<Vec<u8>, RecordProgress> = BTreeMap::new();
        let mut batch = self.db.batch();
        if !letters.is_empty() {
            batch = batch.durability(Some(PersistMode::SyncAll));
        }
        for letter in letters {
            batch.insert(&self.dead, letter.id.to_be_bytes(), to_json(letter));
        }
        if let Some(next) = letters.iter().map(|l| l.id + 1).max() {
            let next = next.max(self.next_dead_letter_id()?);
            batch.insert(&self.meta, "next_dead_letter_id", next.to_be_bytes());
        }
        for (revision_key, state) in answers {
            let (record, revision) = split_revision_key(revision_key)?;
            let encoded = record.encode();
            let progress = match touched.get_mut(&encoded) {
                Some(progress) => progress,
                None => {
                    let Some(stored) = self.records.get(&encoded)? else {
                        continue;
                    };
                    touched.entry(encoded.clone()).or_insert(json(&stored)?)
                }
            };
            let Some(entry) = progress
                .revisions
                .iter_mut()
                .find(|r| r.revision == revision)
            else {
                continue;
            };
            if entry.state != *state && entry.state != RevisionState::Acked {
                entry.state = *state;
                changed.push((record, entry.clone()));
            }
            batch.remove(&self.pending, revision_key.as_slice());
        }
        for (key, progress) in &touched {
            batch.insert(&self.records, key.as_slice(), to_json(progress));
        }
        let mut updated = counters.clone();
        for (record, revision) in &changed {
            let meter = updated
                .meters
                .entry(record.meter_api_name.clone())
                .or_default();
            match revision.state {
                RevisionState::Acked => {
                    meter.sent += 1;
                    meter.corrections += u64::from(revision.revision > 0);
                }
                RevisionState::DeadLettered => meter.dead_lettered += 1,
                RevisionState::Pending => {}
            }
        }
        batch.insert(&self.meta, "counters", to_json(&updated));
        batch.commit()?;
        *counters = updated;
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor_at(ms: i64) -> MeterCursor {
        MeterCursor {
            planned_until_ms: ms,
            start_ms: 0,
            source_cursor: crate::source::ChangeCursor::default(),
            rescan_from_ms: None,
        }
    }

    #[test]
    fn a_sinks_window_size_never_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = ProgressStore::open(dir.path()).unwrap();
        // A store from before the size was kept, at a minute boundary.
        let plan = Plan {
            cursors: vec![("requests".into(), cursor_at(120_000))],
            ..Plan::default()
        };
        store.commit(&plan).unwrap();
        assert!(matches!(
            store.settle_window(3_600_000, true),
            Err(ProgressError::WindowChanged { .. })
        ));
        // Without an explicit size it keeps the former default.
        assert_eq!(store.settle_window(3_600_000, false).unwrap(), 60_000);
        assert_eq!(store.settle_window(60_000, true).unwrap(), 60_000);
        assert_eq!(store.settle_window(3_600_000, false).unwrap(), 60_000);
        let refused = store
            .settle_window(3_600_000, true)
            .unwrap_err()
            .to_string();
        assert!(refused.contains("made with 60s windows"), "{refused}");
        assert!(refused.contains("now 3600s"), "{refused}");
    }

    #[test]
    fn a_new_sink_takes_the_configured_size() {
        let dir = tempfile::tempdir().unwrap();
        let store = ProgressStore::open(dir.path()).unwrap();
        assert_eq!(store.settle_window(3_600_000, false).unwrap(), 3_600_000);
        assert!(store.settle_window(60_000, true).is_err());
        assert_eq!(store.settle_window(60_000, false).unwrap(), 3_600_000);
    }
}
