//! `LifecycleStore`: lifecycle events, durable and deduplicated by
//! (`source`, `id`), in a fjall database of their own.
//!
//! Byte layout (all integers big-endian):
//!
//! | keyspace | key | value |
//! |---|---|---|
//! | `seen` | `u16 len(source)` · source · id | `u64` seq of the stored event |
//! | `events` | project · `0x00` · instance · `0x00` · `u64` seq | the event, JSON |
//! | `instances` | project · `0x00` · instance | [`InstanceSummary`], JSON |
//! | `meta` | `b"seq"` | `u64` last seq given |
//!
//! Project and instance names are Kubernetes names (checked before an
//! event exists, [`crate::lifecycle::is_name`]), so they hold no `0x00` and
//! the `events` and `instances` keys sort by project, then instance, then
//! arrival.
//!
//! **Invariants:** [`LifecycleStore::append`] returns only after one batch
//! holding the events, their dedupe entries, the summaries and the seq was
//! committed with `PersistMode::SyncAll`: an acknowledged event survives a
//! crash, and a re-sent one (same source and id) is a duplicate forever.
//! One writer at a time (a mutex), so seqs are unique and increasing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::lifecycle::{LifecycleEvent, LifecycleKind, Reason};

/// Largest page any listing answers.
pub const MAX_PAGE: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("lifecycle store at {path}: {source}")]
    Fjall {
        path: PathBuf,
        #[source]
        source: fjall::Error,
    },
    #[error("lifecycle store at {path}: a stored record does not decode: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("lifecycle store: the writer lock was poisoned by a panic")]
    Poisoned,
    #[error("cursor {0:?} is not one this server issued")]
    BadCursor(String),
    /// A store on other servers (a cluster's) did not answer.
    #[error("lifecycle store: {0}")]
    Unavailable(String),
}

/// The contract of a lifecycle backend: [`LifecycleStore`] here (one
/// process), a cluster's shared store in `tally-store-cluster`. Both give
/// the same answers: dedupe by (`source`, `id`), listings by project then
/// instance (cursor [`hex`] of `project · 0x00 · instance`), events in
/// arrival order, summaries made by [`summarise`]. Calls block (run them
/// off the async workers).
pub trait LifecycleEvents: Send + Sync {
    /// Stores the events not stored before, durably, before answering;
    /// per event whether it was new.
    fn append(&self, events: &[LifecycleEvent]) -> Result<Vec<bool>, StoreError>;
    /// Instances with any lifecycle event, by project then name; only
    /// `project`'s when given.
    fn instances(
        &self,
        project: Option<&str>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<InstanceSummary>, StoreError>;
    /// One instance's events in arrival order; `None` when the project has
    /// no such instance.
    fn events(
        &self,
        project: &str,
        instance: &str,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Option<Page<LifecycleEvent>>, StoreError>;
}

impl LifecycleEvents for LifecycleStore {
    fn append(&self, events: &[LifecycleEvent]) -> Result<Vec<bool>, StoreError> {
        LifecycleStore::append(self, events)
    }

    fn instances(
        &self,
        project: Option<&str>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<InstanceSummary>, StoreError> {
        LifecycleStore::instances(self, project, limit, cursor)
    }

    fn events(
        &self,
        project: &str,
        instance: &str,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Option<Page<LifecycleEvent>>, StoreError> {
        LifecycleStore::events(self, project, instance, limit, cursor)
    }
}

/// What is known of one instance: its latest lifecycle event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceSummary {
    pub project: String,
    pub instance: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The kind of the latest event (by event time).
    pub state: LifecycleKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    pub since: Timestamp,
    pub events: u64,
}

/// A page of a listing; `next_cursor` asks for the rest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Page<T> {
    pub items: Vec<T>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

pub struct LifecycleStore {
    path: PathBuf,
    db: Database,
    seen: Keyspace,
    events: Keyspace,
    instances: Keyspace,
    meta: Keyspace,
    writer: Mutex<u64>,
}

const SEQ_KEY: &[u8] = b"seq";

fn seen_key(source: &str, id: &str) -> Vec<u8> {
    let len = u16::try_from(source.len()).unwrap_or(u16::MAX);
    let mut k = Vec::with_capacity(2 + source.len() + id.len());
    k.extend_from_slice(&len.to_be_bytes());
    k.extend_from_slice(source.as_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// `project · 0x00 · instance`: the key of an instance, and (in [`hex`])
/// the cursor of an instance listing.
pub fn instance_key(project: &str, instance: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(project.len() + instance.len() + 1);
    k.extend_from_slice(project.as_bytes());
    k.push(0);
    k.extend_from_slice(instance.as_bytes());
    k
}

fn event_key(project: &str, instance: &str, seq: u64) -> Vec<u8> {
    let mut k = instance_key(project, instance);
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

impl LifecycleStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<LifecycleStore, StoreError> {
        let path = dir.to_path_buf();
        let fj = |source| StoreError::Fjall {
            path: path.clone(),
            source,
        };
        let db = Database::builder(dir).open().map_err(fj)?;
        let ks = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(fj)
        };
        let (seen, events, instances, meta) =
            (ks("seen")?, ks("events")?, ks("instances")?, ks("meta")?);
        let last = match meta.get(SEQ_KEY).map_err(fj)? {
            Some(raw) => u64::from_be_bytes(<[u8; 8]>::try_from(&raw[..]).map_err(|_| {
                StoreError::Corrupt {
                    path: path.clone(),
                    message: "seq is not 8 bytes".into(),
                }
            })?),
            None => 0,
        };
        Ok(LifecycleStore {
            path,
            db,
            seen,
            events,
            instances,
            meta,
            writer: Mutex::new(last),
        })
    }

    fn fjall(&self, source: fjall::Error) -> StoreError {
        StoreError::Fjall {
            path: self.path.clone(),
            source,
        }
    }

    fn corrupt(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Stores the events not stored before, in one durable batch; answers,
    /// per event, whether it was new (`false`: a duplicate by source and id,
    /// also of an earlier event in the same call).
    pub fn append(&self, events: &[LifecycleEvent]) -> Result<Vec<bool>, StoreError> {
        let mut last = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        let mut seq = *last;
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
        let mut fresh = Vec::with_capacity(events.len());
        let mut in_batch = HashMap::new();
        let mut summaries: HashMap<Vec<u8>, InstanceSummary> = HashMap::new();
        for event in events {
            let key = seen_key(&event.source, &event.id);
            let known = in_batch.contains_key(&key)
                || self.seen.contains_key(&key).map_err(|e| self.fjall(e))?;
            fresh.push(!known);
            if known {
                continue;
            }
            seq += 1;
            in_batch.insert(key.clone(), ());
            batch.insert(&self.seen, key, seq.to_be_bytes());
            let json = serde_json::to_vec(event).map_err(|e| self.corrupt(e))?;
            batch.insert(
                &self.events,
                event_key(&event.project, &event.instance, seq),
                json,
            );
            let ikey = instance_key(&event.project, &event.instance);
            let current = match summaries.remove(&ikey) {
                Some(s) => Some(s),
                None => self.summary(&ikey)?,
            };
            summaries.insert(ikey, summarise(current, event));
        }
        if seq == *last {
            return Ok(fresh);
        }
        for (key, summary) in summaries {
            let json = serde_json::to_vec(&summary).map_err(|e| self.corrupt(e))?;
            batch.insert(&self.instances, key, json);
        }
        batch.insert(&self.meta, SEQ_KEY, seq.to_be_bytes());
        batch.commit().map_err(|e| self.fjall(e))?;
        *last = seq;
        Ok(fresh)
    }

    fn summary(&self, key: &[u8]) -> Result<Option<InstanceSummary>, StoreError> {
        self.instances
            .get(key)
            .map_err(|e| self.fjall(e))?
            .map(|raw| serde_json::from_slice(&raw).map_err(|e| self.corrupt(e)))
            .transpose()
    }

    /// Instances with any lifecycle event, by project then name; only
    /// `project`'s when given. `cursor` is the `next_cursor` of the page
    /// before.
    pub fn instances(
        &self,
        project: Option<&str>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<InstanceSummary>, StoreError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let prefix = project.map(|p| {
            let mut k = p.as_bytes().to_vec();
            k.push(0);
            k
        });
        // The smallest key after the cursor's is the cursor's with a 0x00.
        let start = match cursor {
            Some(c) => {
                let mut k = cursor_key(c)?;
                k.push(0);
                k
            }
            None => prefix.clone().unwrap_or_default(),
        };
        let mut items = Vec::new();
        for guard in self.instances.range(start..) {
            let (key, value) = guard.into_inner().map_err(|e| self.fjall(e))?;
            if prefix.as_ref().is_some_and(|p| !key.starts_with(p)) {
                break;
            }
            if items.len() == limit {
                let next_cursor = Some(hex(&last_key(&items)));
                return Ok(Page { items, next_cursor });
            }
            items.push(serde_json::from_slice(&value).map_err(|e| self.corrupt(e))?);
        }
        Ok(Page {
            items,
            next_cursor: None,
        })
    }

    /// One instance's events in arrival order; `None` when the project has
    /// no such instance.
    pub fn events(
        &self,
        project: &str,
        instance: &str,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Option<Page<LifecycleEvent>>, StoreError> {
        let ikey = instance_key(project, instance);
        if self.summary(&ikey)?.is_none() {
            return Ok(None);
        }
        let limit = limit.clamp(1, MAX_PAGE);
        let after = match cursor {
            Some(c) => c
                .parse::<u64>()
                .map_err(|_| StoreError::BadCursor(c.to_owned()))?,
            None => 0,
        };
        let from = event_key(project, instance, after.saturating_add(1));
        let to = event_key(project, instance, u64::MAX);
        let mut items = Vec::new();
        let mut last = after;
        for guard in self.events.range(from..=to) {
            let (key, value) = guard.into_inner().map_err(|e| self.fjall(e))?;
            if items.len() == limit {
                return Ok(Some(Page {
                    items,
                    next_cursor: Some(last.to_string()),
                }));
            }
            items.push(serde_json::from_slice(&value).map_err(|e| self.corrupt(e))?);
            last = seq_of(&key);
        }
        Ok(Some(Page {
            items,
            next_cursor: None,
        }))
    }

    /// How many distinct events are stored.
    pub fn len(&self) -> Result<u64, StoreError> {
        Ok(*self.writer.lock().map_err(|_| StoreError::Poisoned)?)
    }

    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }
}

fn seq_of(key: &[u8]) -> u64 {
    key.len()
        .checked_sub(8)
        .and_then(|at| <[u8; 8]>::try_from(&key[at..]).ok())
        .map_or(0, u64::from_be_bytes)
}

fn last_key(items: &[InstanceSummary]) -> Vec<u8> {
    items
        .last()
        .map(|s| instance_key(&s.project, &s.instance))
        .unwrap_or_default()
}

/// Lower-case hex of `bytes` (listing cursors).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The instance key a listing cursor names; [`StoreError::BadCursor`] for
/// anything [`hex`] of an instance key cannot be.
pub fn cursor_key(cursor: &str) -> Result<Vec<u8>, StoreError> {
    let bad = || StoreError::BadCursor(cursor.to_owned());
    if !cursor.len().is_multiple_of(2)
        || cursor.len() > 2 * (2 * crate::lifecycle::MAX_NAME_BYTES + 1)
    {
        return Err(bad());
    }
    (0..cursor.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(cursor.get(i..i + 2).ok_or_else(bad)?, 16).map_err(|_| bad()))
        .collect()
}

/// The summary after `event`: the latest event by time decides the state
/// (ties: the later arrival). Every backend folds an instance's events in
/// arrival order through this.
pub fn summarise(current: Option<InstanceSummary>, event: &LifecycleEvent) -> InstanceSummary {
    let mut s = current.unwrap_or_else(|| InstanceSummary {
        project: event.project.clone(),
        instance: event.instance.clone(),
        namespace: None,
        workload: None,
        node: None,
        state: event.kind,
        reason: event.reason,
        since: event.time,
        events: 0,
    });
    s.events += 1;
    if s.events == 1 || event.time >= s.since {
        s.state = event.kind;
        s.reason = event.reason;
        s.since = event.time;
    }
    for (mine, theirs) in [
        (&mut s.namespace, &event.namespace),
        (&mut s.workload, &event.workload),
        (&mut s.node, &event.node),
    ] {
        if theirs.is_some() {
            mine.clone_from(theirs);
        }
    }
    s
}
