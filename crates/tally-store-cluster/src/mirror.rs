//! What every node keeps in memory from JetStream key-value buckets: the
//! catalog (bucket `tally-catalog`, key [`crate::keys::catalog_key`], value
//! the manifest as JSON) and the voids (bucket `tally-voids`, key the dedupe
//! key, value the [`VoidRecord`] as JSON). Each node loads a bucket when it
//! connects and then follows it with a watch, so a change made on any node
//! reaches every node.
//!
//! **Invariant:** a write goes to the bucket first (create, or update at the
//! revision read), and only then into the writing node's memory; the
//! bucket's revision decides between concurrent writers.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use async_nats::jetstream::kv::{Entry, Operation, Store};
use futures::StreamExt;
use jiff::Timestamp;
use tally_ledger::{Catalog, MetersByType, VoidRecord};
use tally_model::{Kind, Manifest, MeterPhase};

/// The catalog as this node knows it, its meters compiled.
#[derive(Default)]
pub struct CatalogState {
    pub catalog: Catalog,
    pub meters: Arc<MetersByType>,
    /// When each Retired meter was retired (the time of the bucket entry
    /// that holds its current definition): it measures events stored before.
    pub retired_at: HashMap<String, Timestamp>,
}

impl CatalogState {
    /// Records a manifest read from the bucket (written at `at`).
    pub fn put(&mut self, manifest: Manifest, at: Timestamp) {
        let name = manifest.metadata.name.clone();
        let retired = manifest.kind == Kind::MeterDefinition.as_str()
            && manifest.spec.get("phase").and_then(|p| p.as_str()) == Some("Retired");
        if let Err(e) = self.catalog.commit(manifest) {
            tracing::warn!(resource = %name, error = %e, "skipping a catalog entry that does not load");
            return;
        }
        if retired {
            self.retired_at.entry(name).or_insert(at);
        } else if self
            .catalog
            .meter(&name)
            .is_some_and(|m| m.phase != MeterPhase::Retired)
        {
            self.retired_at.remove(&name);
        }
        self.meters = Arc::new(self.catalog.meters_by_type());
    }

    pub fn remove(&mut self, kind: Kind, name: &str) {
        self.catalog.remove(kind, name);
        self.retired_at.remove(name);
        self.meters = Arc::new(self.catalog.meters_by_type());
    }
}

/// Voids by dedupe key, and in the order the bucket recorded them.
#[derive(Default)]
pub struct VoidState {
    pub by_key: HashMap<String, VoidRecord>,
    /// Bucket revision → dedupe key.
    pub by_revision: BTreeMap<u64, String>,
}

impl VoidState {
    pub fn put(&mut self, key: String, revision: u64, record: VoidRecord) {
        if self.by_key.contains_key(&key) {
            return; // the first void stays
        }
        self.by_revision.insert(revision, key.clone());
        self.by_key.insert(key, record);
    }
}

fn entry_time(entry: &Entry) -> Timestamp {
    Timestamp::from_second(entry.created.unix_timestamp())
        .ok()
        .and_then(|t| {
            t.checked_add(jiff::SignedDuration::from_nanos(i64::from(
                entry.created.nanosecond(),
            )))
            .ok()
        })
        .unwrap_or_else(Timestamp::now)
}

/// Applies one catalog bucket entry.
pub fn apply_catalog_entry(state: &RwLock<CatalogState>, entry: &Entry) {
    let mut state = state.write().unwrap_or_else(|p| p.into_inner());
    match entry.operation {
        Operation::Put => match serde_json::from_slice::<Manifest>(&entry.value) {
            Ok(manifest) => state.put(manifest, entry_time(entry)),
            Err(e) => tracing::warn!(key = %entry.key, error = %e, "undecodable catalog entry"),
        },
        Operation::Delete | Operation::Purge => {
            let Some((kind, _)) = entry.key.split_once('.') else {
                return;
            };
            let Ok(kind) = kind.parse::<Kind>() else {
                return;
            };
            // The entry of a delete carries no value; find the name by key.
            let name = state
                .catalog
                .list(kind)
                .find(|m| crate::keys::catalog_key(kind.as_str(), &m.metadata.name) == entry.key)
                .map(|m| m.metadata.name.clone());
            if let Some(name) = name {
                state.remove(kind, &name);
            }
        }
    }
}

/// Applies one voids bucket entry.
pub fn apply_void_entry(state: &RwLock<VoidState>, entry: &Entry) {
    if entry.operation != Operation::Put {
        return;
    }
    match serde_json::from_slice::<VoidRecord>(&entry.value) {
        Ok(record) => state.write().unwrap_or_else(|p| p.into_inner()).put(
            entry.key.clone(),
            entry.revision,
            record,
        ),
        Err(e) => tracing::warn!(key = %entry.key, error = %e, "undecodable void entry"),
    }
}

/// Reads every current entry of `store` into memory with `apply`.
pub async fn load(store: &Store, apply: impl Fn(&Entry)) -> Result<(), String> {
    let mut keys = store
        .keys()
        .await
        .map_err(|e| format!("listing a bucket: {e}"))?;
    let mut names = Vec::new();
    while let Some(key) = keys.next().await {
        names.push(key.map_err(|e| format!("listing a bucket: {e}"))?);
    }
    for key in names {
        if let Some(entry) = store
            .entry(key)
            .await
            .map_err(|e| format!("reading a bucket: {e}"))?
        {
            apply(&entry);
        }
    }
    Ok(())
}

/// Follows `store` until `stop` fires, re-watching after errors.
pub async fn follow(
    store: Store,
    apply: impl Fn(&Entry) + Send + 'static,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let mut watch = match store.watch_with_history(">").await {
            Ok(watch) => watch,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch a bucket; retrying");
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                next = watch.next() => match next {
                    Some(Ok(entry)) => apply(&entry),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "a bucket watch failed; watching again");
                        break;
                    }
                    None => break,
                },
            }
        }
    }
}
