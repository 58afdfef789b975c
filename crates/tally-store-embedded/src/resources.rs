//! The resource store on the embedded database: keyspace `resources`, key
//! `kind \0 namespace \0 name`, value the manifest as JSON. Reads come from an
//! in-memory [`ResourceSet`] snapshot; a write is planned, committed with
//! `SyncAll`, and only then published, under one lock, so two writers never
//! decide on the same state.

use std::sync::{Arc, Mutex, RwLock};

use fjall::{Database, Keyspace, PersistMode};
use futures::future::BoxFuture;
use jiff::Timestamp;
use tally_ledger::{Applied, ApplyMode, LedgerError, ResourceKey, ResourceSet, ResourceStore};
use tally_model::Manifest;
use tokio::sync::watch;

use crate::StoreError;

struct Inner {
    db: Database,
    keyspace: Keyspace,
    /// Held while a write is planned and committed.
    write: Mutex<()>,
    current: RwLock<Arc<ResourceSet>>,
    revision: watch::Sender<u64>,
}

/// The embedded [`ResourceStore`]. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedResources {
    inner: Arc<Inner>,
}

fn storage(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(e.to_string())
}

fn key_bytes(key: &ResourceKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(key.kind.as_str().as_bytes());
    out.push(0);
    out.extend_from_slice(key.namespace.as_deref().unwrap_or_default().as_bytes());
    out.push(0);
    out.extend_from_slice(key.name.as_bytes());
    out
}

impl EmbeddedResources {
    pub(crate) fn keyspace(&self) -> &Keyspace {
        &self.inner.keyspace
    }

    pub(crate) fn open(db: Database, keyspace: Keyspace) -> Result<EmbeddedResources, StoreError> {
        let mut manifests = Vec::new();
        for item in keyspace.iter() {
            let value = item.value()?;
            manifests.push(
                serde_json::from_slice::<Manifest>(&value)
                    .map_err(|e| StoreError::Decode(format!("a stored resource: {e}")))?,
            );
        }
        let set = ResourceSet::load(manifests)?;
        Ok(EmbeddedResources {
            inner: Arc::new(Inner {
                db,
                keyspace,
                write: Mutex::new(()),
                current: RwLock::new(Arc::new(set)),
                revision: watch::channel(0).0,
            }),
        })
    }

    fn current(&self) -> Arc<ResourceSet> {
        Arc::clone(
            &self
                .inner
                .current
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    /// Runs `change` on a copy of the current set under the write lock,
    /// commits what it returns, and publishes the copy.
    fn write<T>(
        &self,
        change: impl FnOnce(&mut ResourceSet, &mut fjall::OwnedWriteBatch) -> Result<T, LedgerError>,
    ) -> Result<T, LedgerError> {
        let inner = &self.inner;
        let _guard = inner
            .write
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut next = (*self.current()).clone();
        let mut batch = inner.db.batch().durability(Some(PersistMode::SyncAll));
        let answer = change(&mut next, &mut batch)?;
        batch.commit().map_err(storage)?;
        *inner
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(next);
        inner.revision.send_modify(|r| *r += 1);
        Ok(answer)
    }

    fn apply_now(&self, manifest: Manifest, mode: ApplyMode) -> Result<Applied, LedgerError> {
        let keyspace = self.inner.keyspace.clone();
        self.write(|set, batch| {
            let (stored, action) = set.plan_apply(manifest, mode, Timestamp::now())?;
            let kind = stored.typed_kind()?;
            let key = ResourceKey::new(
                kind,
                stored.metadata.namespace.as_deref(),
                &stored.metadata.name,
            );
            batch.insert(&keyspace, key_bytes(&key), ResourceSet::encode(&stored)?);
            set.insert(stored)?;
            let manifest = set
                .get(&key)
                .map(|stored| set.shown(stored))
                .ok_or_else(|| storage("a resource vanished while it was applied"))?;
            Ok(Applied { action, manifest })
        })
    }

    fn delete_now(&self, key: &ResourceKey) -> Result<(), LedgerError> {
        let keyspace = self.inner.keyspace.clone();
        self.write(|set, batch| {
            set.plan_delete(key)?;
            batch.remove(&keyspace, key_bytes(key));
            set.remove(key);
            Ok(())
        })
    }
}

impl ResourceStore for EmbeddedResources {
    fn apply(
        &self,
        manifest: Manifest,
        mode: ApplyMode,
    ) -> BoxFuture<'_, Result<Applied, LedgerError>> {
        let this = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || this.apply_now(manifest, mode))
                .await
                .map_err(|e| storage(format!("resource write task failed: {e}")))?
        })
    }

    fn delete(&self, key: ResourceKey) -> BoxFuture<'_, Result<(), LedgerError>> {
        let this = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || this.delete_now(&key))
                .await
                .map_err(|e| storage(format!("resource write task failed: {e}")))?
        })
    }

    fn snapshot(&self) -> Arc<ResourceSet> {
        self.current()
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.revision.subscribe()
    }
}
