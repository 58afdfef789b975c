//! The bounded FIFO queue of one sink and its dead-letter list, in memory or
//! in a fjall database.
//!
//! One driver task consumes the queue, one batch at a time: a batch is always
//! a prefix of the queue, and it leaves the queue (delivered, or moved to the
//! dead-letter list) only once its fate is known. Limits count every item not
//! yet gone, the batch in flight included.
//!
//! Disk layout (keyspace `queue`): key = sequence number (u64 big-endian),
//! value = enqueue time (unix ms, u64 BE) · key length (u32 BE) · key · data.
//! Keyspace `dead`: key = dead-letter id (u64 BE), value = metadata length
//! (u32 BE) · metadata JSON · items, each as key length · key · data length ·
//! data (lengths u32 BE). Keyspace `marks`: the caller's own keys and values
//! (e.g. how far a source has read), written in the same atomic write as the
//! items they were appended with.

use std::collections::HashMap;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use tokio::sync::Notify;

use crate::{Item, QueueConfig, Storage};

/// Memtable size of a disk queue's keyspace.
const QUEUE_MEMTABLE_BYTES: u64 = 8 << 20;

/// A queue storage failure.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The embedded store failed.
    #[error("queue storage: {0}")]
    Storage(#[from] fjall::Error),
    /// Writing a group of appends failed.
    #[error("queue storage: writing failed: {0}")]
    Commit(String),
    /// A stored record could not be read back.
    #[error("queue storage holds an unreadable record: {0}")]
    Corrupt(String),
}

/// Why an item was not queued. [`EnqueueError::reason`] is the metrics label.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    /// The queue is at its item or byte limit (only from `try_enqueue`).
    #[error("queue full ({items} items, {bytes} bytes queued)")]
    Full {
        /// Items queued when refused.
        items: u64,
        /// Bytes queued when refused.
        bytes: u64,
    },
    /// The items are more than the queue's limits could ever hold.
    #[error("{items} items of {bytes} bytes can never fit the queue's limits")]
    TooLarge {
        /// Items offered.
        items: u64,
        /// Bytes offered.
        bytes: u64,
    },
    /// The sink is shutting down.
    #[error("the sink is shut down")]
    Closed,
    /// Writing to the queue failed.
    #[error(transparent)]
    Storage(#[from] QueueError),
}

impl EnqueueError {
    /// A snake_case reason for `tally_component_dropped_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            EnqueueError::Full { .. } => "queue_full",
            EnqueueError::TooLarge { .. } => "too_large",
            EnqueueError::Closed => "shutdown",
            EnqueueError::Storage(_) => "storage_error",
        }
    }
}

/// A batch that could not be delivered, kept for an operator to look at,
/// re-queue or delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Its id in the sink's dead-letter list.
    pub id: u64,
    /// Why: `permanent error`, `out of attempts`, `destination refused`,
    /// an encoding error...
    pub reason: String,
    /// The last HTTP status, if an answer came.
    pub status: Option<u16>,
    /// The first 4 KiB of the last answer's body (lossy UTF-8; the remote's
    /// words, so for operators' eyes only), the transport error, or the
    /// egress refusal.
    pub body: String,
    /// Attempts made.
    pub attempts: u32,
    /// When it was dead-lettered.
    pub at: jiff::Timestamp,
    /// The batch's items.
    pub items: Vec<Item>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct DeadLetterMeta {
    reason: String,
    status: Option<u16>,
    body: String,
    attempts: u32,
    at: jiff::Timestamp,
}

/// One queued item with its place and age.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub seq: u64,
    pub enqueued_ms: u64,
    pub item: Item,
}

/// A prefix of the queue.
pub(crate) struct Peeked {
    pub entries: Vec<Entry>,
    /// More items wait behind `entries` (the batch is full).
    #[cfg_attr(not(test), allow(dead_code))]
    pub more: bool,
}

struct Disk {
    db: Database,
    queue: Keyspace,
    dead: Keyspace,
    marks: Keyspace,
    sync: bool,
}

/// A caller's (key, value) written atomically with a group of items.
pub(crate) type Mark = (Bytes, Bytes);

#[derive(Default)]
struct State {
    /// Items queued or reserved by an enqueue in progress.
    items: u64,
    bytes: u64,
    /// Sequence number of the first item still queued.
    head: u64,
    /// Enqueue time of the item at `head`, once read (disk queues).
    head_enqueued_ms: Option<u64>,
    next_seq: u64,
    closed: bool,
    memory: VecDeque<Entry>,
    memory_dead: BTreeMap<u64, DeadLetter>,
    memory_marks: BTreeMap<Bytes, Bytes>,
    next_dead_id: u64,
    /// The caller's dead-letter id counter ([`QueueConfig::dead_letter_ids`]).
    dead_ids: Option<Arc<AtomicU64>>,
}

/// An append waiting for its group's write.
struct PendingAppend {
    ticket: u64,
    items: Vec<Item>,
    from_dead: Option<u64>,
    marks: Vec<Mark>,
}

#[derive(Default)]
struct Commits {
    pending: Vec<PendingAppend>,
    next_ticket: u64,
    /// An appender is writing a group.
    writing: bool,
    /// Results of written groups, by ticket, until their appender reads them.
    done: HashMap<u64, Result<(), String>>,
}

pub(crate) struct Queue {
    max_items: u64,
    max_bytes: u64,
    state: Mutex<State>,
    disk: Option<Disk>,
    /// Group commit of disk appends: one write (and fsync) for every append
    /// that arrives while the previous one is being written.
    commits: Mutex<Commits>,
    committed: Condvar,
    space: Notify,
    data: Notify,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn items_size(items: &[Item]) -> u64 {
    items.iter().map(|i| i.size() as u64).sum()
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Reads a u32-length-prefixed field from the front of `input`.
fn take_bytes(input: &mut &[u8]) -> Result<Bytes, QueueError> {
    let corrupt = || QueueError::Corrupt("truncated field".into());
    let (len, rest) = input.split_first_chunk::<4>().ok_or_else(corrupt)?;
    let len = u32::from_be_bytes(*len) as usize;
    if rest.len() < len {
        return Err(corrupt());
    }
    let (field, rest) = rest.split_at(len);
    *input = rest;
    Ok(Bytes::copy_from_slice(field))
}

fn encode_entry(enqueued_ms: u64, item: &Item) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + item.size());
    out.extend_from_slice(&enqueued_ms.to_be_bytes());
    put_bytes(&mut out, &item.key);
    out.extend_from_slice(&item.data);
    out
}

fn decode_entry(key: &[u8], value: &[u8]) -> Result<Entry, QueueError> {
    let seq = u64::from_be_bytes(
        key.try_into()
            .map_err(|_| QueueError::Corrupt("queue key is not 8 bytes".into()))?,
    );
    let (ms, mut rest) = value
        .split_first_chunk::<8>()
        .ok_or_else(|| QueueError::Corrupt("queue value too short".into()))?;
    let item_key = take_bytes(&mut rest)?;
    Ok(Entry {
        seq,
        enqueued_ms: u64::from_be_bytes(*ms),
        item: Item {
            key: item_key,
            data: Bytes::copy_from_slice(rest),
        },
    })
}

fn encode_dead_letter(letter: &DeadLetter) -> Vec<u8> {
    let meta = DeadLetterMeta {
        reason: letter.reason.clone(),
        status: letter.status,
        body: letter.body.clone(),
        attempts: letter.attempts,
        at: letter.at,
    };
    // Serialising plain strings and numbers cannot fail.
    let meta = serde_json::to_vec(&meta).unwrap_or_default();
    let mut out = Vec::with_capacity(meta.len() + 8 + items_size(&letter.items) as usize);
    put_bytes(&mut out, &meta);
    for item in &letter.items {
        put_bytes(&mut out, &item.key);
        put_bytes(&mut out, &item.data);
    }
    out
}

fn decode_dead_letter(key: &[u8], value: &[u8]) -> Result<DeadLetter, QueueError> {
    let id = u64::from_be_bytes(
        key.try_into()
            .map_err(|_| QueueError::Corrupt("dead-letter key is not 8 bytes".into()))?,
    );
    let mut rest = value;
    let meta = take_bytes(&mut rest)?;
    let meta: DeadLetterMeta = serde_json::from_slice(&meta)
        .map_err(|e| QueueError::Corrupt(format!("dead-letter metadata: {e}")))?;
    let mut items = Vec::new();
    while !rest.is_empty() {
        let key = take_bytes(&mut rest)?;
        let data = take_bytes(&mut rest)?;
        items.push(Item { key, data });
    }
    Ok(DeadLetter {
        id,
        reason: meta.reason,
        status: meta.status,
        body: meta.body,
        attempts: meta.attempts,
        at: meta.at,
        items,
    })
}

fn last_key(keyspace: &Keyspace) -> Result<Option<u64>, QueueError> {
    match keyspace.last_key_value() {
        None => Ok(None),
        Some(guard) => {
            let key = guard.key()?;
            let key: [u8; 8] = key
                .as_ref()
                .try_into()
                .map_err(|_| QueueError::Corrupt("key is not 8 bytes".into()))?;
            Ok(Some(u64::from_be_bytes(key)))
        }
    }
}

impl Queue {
    /// Opens the queue; a disk queue gets back what it held.
    pub fn open(config: &QueueConfig) -> Result<Queue, QueueError> {
        let mut state = State {
            dead_ids: config.dead_letter_ids.clone(),
            ..State::default()
        };
        let disk = match &config.storage {
            Storage::Memory => None,
            Storage::Disk { path, sync } => {
                let db = Database::builder(path).open()?;
                // A small memtable: a long disk queue lives on disk, not in memory.
                let queue = db.keyspace("queue", || {
                    KeyspaceCreateOptions::default().max_memtable_size(QUEUE_MEMTABLE_BYTES)
                })?;
                let dead = db.keyspace("dead", KeyspaceCreateOptions::default)?;
                let marks = db.keyspace("marks", KeyspaceCreateOptions::default)?;
                let mut first = None;
                for guard in queue.iter() {
                    let (key, value) = guard.into_inner()?;
                    let entry = decode_entry(&key, &value)?;
                    first.get_or_insert(entry.seq);
                    state.items += 1;
                    state.bytes += entry.item.size() as u64;
                    state.next_seq = entry.seq + 1;
                }
                state.head = first.unwrap_or(state.next_seq);
                state.next_dead_id = last_key(&dead)?.map_or(0, |id| id + 1);
                if let Some(ids) = &state.dead_ids {
                    ids.fetch_max(state.next_dead_id, Ordering::SeqCst);
                }
                Some(Disk {
                    db,
                    queue,
                    dead,
                    marks,
                    sync: *sync,
                })
            }
        };
        Ok(Queue {
            max_items: config.max_items.max(1),
            max_bytes: config.max_bytes.max(1),
            state: Mutex::new(state),
            disk,
            commits: Mutex::new(Commits::default()),
            committed: Condvar::new(),
            space: Notify::new(),
            data: Notify::new(),
        })
    }

    pub fn is_disk(&self) -> bool {
        self.disk.is_some()
    }

    /// Items and bytes queued (the batch in flight included).
    pub fn depth(&self) -> (u64, u64) {
        let state = lock(&self.state);
        (state.items, state.bytes)
    }

    /// Waits for an item to be appended (a permit is kept if none waits).
    pub async fn appended(&self) {
        self.data.notified().await;
    }

    /// Refuses every later enqueue and wakes those waiting for space.
    pub fn close(&self) {
        lock(&self.state).closed = true;
        self.space.notify_waiters();
    }

    /// Reserves room for `items`, waiting for space if `wait`.
    pub async fn reserve(&self, items: u64, bytes: u64, wait: bool) -> Result<(), EnqueueError> {
        if items > self.max_items || bytes > self.max_bytes {
            return Err(EnqueueError::TooLarge { items, bytes });
        }
        loop {
            let notified = self.space.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = lock(&self.state);
                if state.closed {
                    return Err(EnqueueError::Closed);
                }
                if state.items + items <= self.max_items && state.bytes + bytes <= self.max_bytes {
                    state.items += items;
                    state.bytes += bytes;
                    return Ok(());
                }
                if !wait {
                    return Err(EnqueueError::Full {
                        items: state.items,
                        bytes: state.bytes,
                    });
                }
            }
            notified.await;
        }
    }

    fn release(&self, items: u64, bytes: u64) {
        let mut state = lock(&self.state);
        state.items -= items;
        state.bytes -= bytes;
        drop(state);
        self.space.notify_waiters();
    }

    /// Appends `items` for which room was reserved (blocking on disk). On
    /// failure the reservation is released. With `from_dead`, that dead
    /// letter is removed in the same atomic write; `marks` are written in it
    /// too.
    pub fn append(
        &self,
        items: Vec<Item>,
        from_dead: Option<u64>,
        marks: Vec<Mark>,
    ) -> Result<(), QueueError> {
        let Some(disk) = &self.disk else {
            let enqueued_ms = now_ms();
            let mut state = lock(&self.state);
            if let Some(id) = from_dead {
                state.memory_dead.remove(&id);
            }
            state.memory_marks.extend(marks);
            let first = state.next_seq;
            state.next_seq += items.len() as u64;
            state
                .memory
                .extend((first..).zip(items).map(|(seq, item)| Entry {
                    seq,
                    enqueued_ms,
                    item,
                }));
            drop(state);
            self.data.notify_one();
            return Ok(());
        };
        let mut commits = lock(&self.commits);
        let ticket = commits.next_ticket;
        commits.next_ticket += 1;
        commits.pending.push(PendingAppend {
            ticket,
            items,
            from_dead,
            marks,
        });
        loop {
            if let Some(result) = commits.done.remove(&ticket) {
                return result.map_err(QueueError::Commit);
            }
            if commits.writing {
                commits = self
                    .committed
                    .wait(commits)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                continue;
            }
            // Lead: write everything pending as one group.
            commits.writing = true;
            let group = std::mem::take(&mut commits.pending);
            drop(commits);
            let result = self.write_group(disk, &group).map_err(|e| e.to_string());
            commits = lock(&self.commits);
            commits.writing = false;
            for append in &group {
                commits.done.insert(append.ticket, result.clone());
            }
            self.committed.notify_all();
        }
    }

    fn write_group(&self, disk: &Disk, group: &[PendingAppend]) -> Result<(), QueueError> {
        let first = lock(&self.state).next_seq;
        let enqueued_ms = now_ms();
        let mode = if disk.sync {
            PersistMode::SyncAll
        } else {
            PersistMode::Buffer
        };
        let mut batch = disk.db.batch().durability(Some(mode));
        let items = group.iter().flat_map(|append| &append.items);
        let mut next = first;
        for item in items {
            batch.insert(
                &disk.queue,
                next.to_be_bytes(),
                encode_entry(enqueued_ms, item),
            );
            next += 1;
        }
        for id in group.iter().filter_map(|append| append.from_dead) {
            batch.remove(&disk.dead, id.to_be_bytes());
        }
        for (key, value) in group.iter().flat_map(|append| &append.marks) {
            batch.insert(&disk.marks, key.as_ref(), value.as_ref());
        }
        if let Err(e) = batch.commit() {
            let count = next - first;
            let bytes = group.iter().map(|a| items_size(&a.items)).sum();
            self.release(count, bytes);
            return Err(e.into());
        }
        lock(&self.state).next_seq = next;
        self.data.notify_one();
        Ok(())
    }

    /// The first items of the queue, as many as `max_items` and `max_bytes`
    /// allow (the first item always).
    pub fn peek(&self, max_items: usize, max_bytes: usize) -> Result<Peeked, QueueError> {
        let mut entries: Vec<Entry> = Vec::new();
        let mut bytes = 0usize;
        let mut more = false;
        let mut offer = |entry: Entry| {
            let size = entry.item.size();
            if !entries.is_empty() && (entries.len() >= max_items || bytes + size > max_bytes) {
                more = true;
                return false;
            }
            bytes += size;
            entries.push(entry);
            true
        };
        match &self.disk {
            None => {
                let state = lock(&self.state);
                for entry in &state.memory {
                    if !offer(entry.clone()) {
                        break;
                    }
                }
            }
            Some(disk) => {
                let head = lock(&self.state).head;
                for guard in disk.queue.range(head.to_be_bytes()..) {
                    let (key, value) = guard.into_inner()?;
                    if !offer(decode_entry(&key, &value)?) {
                        break;
                    }
                }
            }
        }
        Ok(Peeked { entries, more })
    }

    /// The enqueue time of the oldest queued item.
    pub fn oldest_ms(&self) -> Result<Option<u64>, QueueError> {
        let (head, cached) = {
            let state = lock(&self.state);
            match &self.disk {
                None => return Ok(state.memory.front().map(|e| e.enqueued_ms)),
                Some(_) => (state.head, state.head_enqueued_ms),
            }
        };
        if cached.is_some() {
            return Ok(cached);
        }
        let Some(disk) = &self.disk else {
            return Ok(None);
        };
        let Some(guard) = disk.queue.range(head.to_be_bytes()..).next() else {
            return Ok(None);
        };
        let (key, value) = guard.into_inner()?;
        let entry = decode_entry(&key, &value)?;
        let mut state = lock(&self.state);
        // Cache it unless a take moved the head meanwhile.
        if state.head == head {
            state.head = entry.seq;
            state.head_enqueued_ms = Some(entry.enqueued_ms);
        }
        Ok(Some(entry.enqueued_ms))
    }

    /// Takes `entries` (a prefix of the queue, as peeked) out of the queue; if
    /// `dead` is given they become that dead letter, in the same write.
    /// Returns the dead letter's id.
    pub fn take(
        &self,
        entries: &[Entry],
        dead: Option<DeadLetter>,
    ) -> Result<Option<u64>, QueueError> {
        let Some(last) = entries.last() else {
            return Ok(None);
        };
        let count = entries.len() as u64;
        let bytes: u64 = entries.iter().map(|e| e.item.size() as u64).sum();
        let dead_id = dead.as_ref().map(|_| {
            let mut state = lock(&self.state);
            if let Some(ids) = &state.dead_ids {
                return ids.fetch_add(1, Ordering::SeqCst);
            }
            let id = state.next_dead_id;
            state.next_dead_id += 1;
            id
        });
        if let Some(disk) = &self.disk {
            let mut batch = disk.db.batch();
            for entry in entries {
                batch.remove(&disk.queue, entry.seq.to_be_bytes());
            }
            if let (Some(id), Some(letter)) = (dead_id, &dead) {
                batch = batch.durability(Some(PersistMode::SyncAll));
                batch.insert(&disk.dead, id.to_be_bytes(), encode_dead_letter(letter));
            }
            batch.commit()?;
        }
        let mut state = lock(&self.state);
        if self.disk.is_none() {
            for _ in 0..count {
                state.memory.pop_front();
            }
            if let (Some(id), Some(mut letter)) = (dead_id, dead) {
                letter.id = id;
                state.memory_dead.insert(id, letter);
            }
        }
        state.head = last.seq + 1;
        state.head_enqueued_ms = None;
        state.items -= count;
        state.bytes -= bytes;
        drop(state);
        self.space.notify_waiters();
        Ok(dead_id)
    }

    /// The value of a mark written with [`Queue::append`].
    pub fn mark(&self, key: &[u8]) -> Result<Option<Bytes>, QueueError> {
        match &self.disk {
            None => Ok(lock(&self.state).memory_marks.get(key).cloned()),
            Some(disk) => Ok(disk
                .marks
                .get(key)?
                .map(|value| Bytes::copy_from_slice(&value))),
        }
    }

    /// Every dead letter, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, QueueError> {
        match &self.disk {
            None => Ok(lock(&self.state).memory_dead.values().cloned().collect()),
            Some(disk) => disk
                .dead
                .iter()
                .map(|guard| {
                    let (key, value) = guard.into_inner()?;
                    decode_dead_letter(&key, &value)
                })
                .collect(),
        }
    }

    /// One dead letter.
    pub fn dead_letter(&self, id: u64) -> Result<Option<DeadLetter>, QueueError> {
        match &self.disk {
            None => Ok(lock(&self.state).memory_dead.get(&id).cloned()),
            Some(disk) => disk
                .dead
                .get(id.to_be_bytes())?
                .map(|value| decode_dead_letter(&id.to_be_bytes(), &value))
                .transpose(),
        }
    }

    /// Deletes a dead letter; false if there was none with that id.
    pub fn delete_dead_letter(&self, id: u64) -> Result<bool, QueueError> {
        match &self.disk {
            None => Ok(lock(&self.state).memory_dead.remove(&id).is_some()),
            Some(disk) => {
                if disk.dead.get(id.to_be_bytes())?.is_none() {
                    return Ok(false);
                }
                let mut batch = disk.db.batch().durability(Some(PersistMode::SyncAll));
                batch.remove(&disk.dead, id.to_be_bytes());
                batch.commit()?;
                Ok(true)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn item(n: u32, len: usize) -> Item {
        Item::new(n.to_string(), vec![b'x'; len])
    }

    #[test]
    fn entry_and_dead_letter_encodings_round_trip() {
        let it = Item::new("k1", "data");
        let e = decode_entry(&7u64.to_be_bytes(), &encode_entry(99, &it)).unwrap();
        assert_eq!((e.seq, e.enqueued_ms, e.item), (7, 99, it.clone()));
        let letter = DeadLetter {
            id: 3,
            reason: "permanent error".into(),
            status: Some(400),
            body: "bad".into(),
            attempts: 1,
            at: jiff::Timestamp::from_second(1_700_000_000).unwrap(),
            items: vec![it, Item::new("", "")],
        };
        let back = decode_dead_letter(&3u64.to_be_bytes(), &encode_dead_letter(&letter)).unwrap();
        assert_eq!(back, letter);
        assert!(decode_entry(&[0; 8], &[0; 10]).is_err());
    }

    #[test]
    fn dead_letter_ids_come_from_the_callers_counter() {
        let ids = Arc::new(AtomicU64::new(41));
        let dir = tempfile::tempdir().unwrap();
        for storage in [
            Storage::Memory,
            Storage::Disk {
                path: dir.path().to_path_buf(),
                sync: false,
            },
        ] {
            let queue = Queue::open(&QueueConfig {
                storage,
                dead_letter_ids: Some(ids.clone()),
                ..QueueConfig::default()
            })
            .unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            rt.block_on(queue.reserve(1, item(1, 3).size() as u64, false))
                .unwrap();
            queue.append(vec![item(1, 3)], None, Vec::new()).unwrap();
            let entries = queue.peek(10, 1 << 20).unwrap().entries;
            let letter = DeadLetter {
                id: 0,
                reason: "permanent error".into(),
                status: Some(400),
                body: String::new(),
                attempts: 1,
                at: jiff::Timestamp::UNIX_EPOCH,
                items: vec![item(1, 3)],
            };
            let id = queue.take(&entries, Some(letter)).unwrap().unwrap();
            assert_eq!(queue.dead_letters().unwrap()[0].id, id);
        }
        assert_eq!(ids.load(Ordering::SeqCst), 43, "41 and 42 were handed out");
    }

    #[test]
    fn concurrent_disk_appends_are_group_committed_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let config = QueueConfig {
            max_items: 10_000,
            max_bytes: 1 << 20,
            storage: Storage::Disk {
                path: dir.path().to_path_buf(),
                sync: true,
            },
            dead_letter_ids: None,
        };
        let queue = Queue::open(&config).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        std::thread::scope(|scope| {
            for t in 0..8u32 {
                let queue = &queue;
                let rt = &rt;
                scope.spawn(move || {
                    for i in 0..40u32 {
                        let items = vec![item(t * 1000 + i, 3), item(t * 1000 + i, 4)];
                        rt.block_on(queue.reserve(2, items_size(&items), false))
                            .unwrap();
                        queue.append(items, None, vec![]).unwrap();
                    }
                });
            }
        });
        drop(queue);
        let queue = Queue::open(&config).unwrap();
        let entries = queue.peek(usize::MAX, usize::MAX).unwrap().entries;
        assert_eq!(entries.len(), 8 * 40 * 2);
        let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (0..640).collect::<Vec<u64>>());
        // Each append's two items are adjacent; each thread's appends in order.
        let mut last = std::collections::HashMap::new();
        for pair in entries.chunks(2) {
            assert_eq!(pair[0].item.key, pair[1].item.key);
            assert_eq!((pair[0].item.data.len(), pair[1].item.data.len()), (3, 4));
            let n: u32 = std::str::from_utf8(&pair[0].item.key)
                .unwrap()
                .parse()
                .unwrap();
            if let Some(previous) = last.insert(n / 1000, n) {
                assert!(previous < n);
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(Vec<usize>),
        Deliver { max_items: usize, max_bytes: usize },
        DeadLetter { max_items: usize, max_bytes: usize },
        Requeue,
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => prop::collection::vec(0usize..40, 1..5).prop_map(Op::Push),
            3 => (1usize..6, 1usize..100).prop_map(|(max_items, max_bytes)| Op::Deliver { max_items, max_bytes }),
            1 => (1usize..6, 1usize..100).prop_map(|(max_items, max_bytes)| Op::DeadLetter { max_items, max_bytes }),
            1 => Just(Op::Requeue),
            1 => Just(Op::Reopen),
        ]
    }

    /// The naive model: a list of items and a list of dead letters.
    #[derive(Default)]
    struct Model {
        queue: VecDeque<Item>,
        dead: Vec<Vec<Item>>,
    }

    impl Model {
        fn batch(&self, max_items: usize, max_bytes: usize) -> Vec<Item> {
            let mut out: Vec<Item> = Vec::new();
            let mut bytes = 0;
            for it in &self.queue {
                if !out.is_empty() && (out.len() == max_items || bytes + it.size() > max_bytes) {
                    break;
                }
                bytes += it.size();
                out.push(it.clone());
            }
            out
        }
    }

    fn run_ops(ops: Vec<Op>, disk: bool) -> Result<(), TestCaseError> {
        let dir = tempfile::tempdir().unwrap();
        let config = QueueConfig {
            max_items: 12,
            max_bytes: 200,
            storage: if disk {
                Storage::Disk {
                    path: dir.path().join("q"),
                    sync: false,
                }
            } else {
                Storage::Memory
            },
            dead_letter_ids: None,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut queue = Queue::open(&config).unwrap();
        let mut model = Model::default();
        let mut next = 0u32;
        for op in ops {
            match op {
                Op::Push(sizes) => {
                    let items: Vec<Item> = sizes
                        .iter()
                        .map(|&len| {
                            next += 1;
                            item(next, len)
                        })
                        .collect();
                    let (n, b) = (items.len() as u64, items_size(&items));
                    let fits = model.queue.len() as u64 + n <= 12
                        && items_size(model.queue.make_contiguous()) + b <= 200;
                    let reserved = rt.block_on(queue.reserve(n, b, false));
                    prop_assert_eq!(reserved.is_ok(), fits);
                    if reserved.is_ok() {
                        queue.append(items.clone(), None, vec![]).unwrap();
                        model.queue.extend(items);
                    }
                }
                Op::Deliver {
                    max_items,
                    max_bytes,
                }
                | Op::DeadLetter {
                    max_items,
                    max_bytes,
                } => {
                    let peeked = queue.peek(max_items, max_bytes).unwrap();
                    let expected = model.batch(max_items, max_bytes);
                    let got: Vec<Item> = peeked.entries.iter().map(|e| e.item.clone()).collect();
                    prop_assert_eq!(&got, &expected);
                    prop_assert_eq!(peeked.more, expected.len() < model.queue.len());
                    let dead = matches!(op, Op::DeadLetter { .. }) && !expected.is_empty();
                    let letter = dead.then(|| DeadLetter {
                        id: 0,
                        reason: "test".into(),
                        status: Some(400),
                        body: String::new(),
                        attempts: 1,
                        at: jiff::Timestamp::UNIX_EPOCH,
                        items: got.clone(),
                    });
                    queue.take(&peeked.entries, letter).unwrap();
                    model.queue.drain(..expected.len());
                    if dead {
                        model.dead.push(expected);
                    }
                }
                Op::Requeue => {
                    let letters = queue.dead_letters().unwrap();
                    if let Some(letter) = letters.first() {
                        let (n, b) = (letter.items.len() as u64, items_size(&letter.items));
                        if rt.block_on(queue.reserve(n, b, false)).is_ok() {
                            queue
                                .append(letter.items.clone(), Some(letter.id), vec![])
                                .unwrap();
                            let items = model.dead.remove(0);
                            model.queue.extend(items);
                        }
                    }
                }
                Op::Reopen => {
                    if disk {
                        drop(queue);
                        queue = Queue::open(&config).unwrap();
                    }
                }
            }
            let (items, bytes) = queue.depth();
            prop_assert_eq!(
                queue.oldest_ms().unwrap().is_some(),
                !model.queue.is_empty()
            );
            prop_assert_eq!(items, model.queue.len() as u64);
            prop_assert_eq!(bytes, items_size(model.queue.make_contiguous()));
            let dead: Vec<Vec<Item>> = queue
                .dead_letters()
                .unwrap()
                .into_iter()
                .map(|d| d.items)
                .collect();
            prop_assert_eq!(&dead, &model.dead);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn memory_queue_matches_the_model(ops in prop::collection::vec(op(), 1..60)) {
            run_ops(ops, false)?;
        }

        #[test]
        fn disk_queue_matches_the_model_across_reopens(ops in prop::collection::vec(op(), 1..60)) {
            run_ops(ops, true)?;
        }
    }
}
