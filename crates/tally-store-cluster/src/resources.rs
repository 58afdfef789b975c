//! The cluster's [`ResourceStore`]: every resource outside the meter catalog
//! in one JetStream key-value bucket that every node watches, so a manifest
//! applied on any node is visible on every node.
//!
//! Each node keeps the whole bucket in memory as a [`ResourceSet`] (the
//! snapshot every read answers from), brought forward by a watch of the
//! bucket, together with its *position*: the stream sequence of the last
//! bucket entry it has folded in.
//!
//! A write is planned by the same [`ResourceSet::plan_apply`] /
//! [`ResourceSet::plan_delete`] as on the embedded store, against the
//! snapshot at position `p`, and published with
//! `Nats-Expected-Last-Sequence: p`: JetStream stores it only if no other
//! write reached the bucket since, so every write was decided on the state
//! it lands on, as under the embedded store's single lock (rules that span
//! resources, such as a project's binding history, hold across nodes). A
//! refused publish means another node wrote first: the node catches up and
//! plans again (a bounded number of times). A write returns after the
//! stream's ack *and* after this node's watch has folded it in, so a node
//! reads its own writes.
//!
//! **Layout** (the bucket's stream is `KV_<bucket>`, one value per key):
//!
//! - key `<Kind>.<namespace>.<name>`: the manifest as stored, JSON
//!   ([`ResourceSet::encode`]); `<namespace>` is `_` for cluster-scoped
//!   kinds; a `.` inside a namespace or name is written `=` (names never
//!   hold `=`, nor start with `_`). A deletion is a `KV-Operation: DEL`
//!   marker on the key.
//! - key `_tally.format`: `1`, written when the bucket is made, so the
//!   stream's last sequence is never 0 (an expected last sequence of 0
//!   would not be checked).
//!
//! **Invariants:** the bucket keeps one entry per key (`history: 1`) and no
//! deletes are purged, so the stream's last message is always the newest
//! entry of its key and a watch of the last entry per key reaches the
//! stream's last sequence. A value is at most [`MAX_VALUE_BYTES`].
//!
//! **Never:** write to the bucket without the expected last sequence; trust
//! a stored value more than [`ResourceSet::insert`] does (values are written
//! only by nodes, after validation; whoever can write the bucket through NATS
//! is trusted like a node).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt as _;
use futures::future::BoxFuture;
use jiff::Timestamp;
use tally_ledger::{
    Applied, ApplyAction, ApplyMode, LedgerError, ResourceKey, ResourceSet, ResourceStore,
};
use tally_model::{Kind, Manifest};
use tokio::sync::watch;

/// The largest stored manifest: within NATS's default `max_payload` (1 MiB)
/// with room for headers.
pub const MAX_VALUE_BYTES: usize = 1_000_000;

/// The key of the bucket's format marker.
const FORMAT_KEY: &str = "_tally.format";
const FORMAT: &[u8] = b"1";

/// How often a write is planned again after another node wrote first.
const MAX_ATTEMPTS: usize = 16;
/// How long a write waits for this node's watch to see it (or the bucket's
/// last write), and how long `connect` waits for the first full read.
const CATCH_UP: Duration = Duration::from_secs(15);
/// Pause before watching again after the watch failed.
const REWATCH_PAUSE: Duration = Duration::from_millis(500);

/// Where the bucket is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvResourcesConfig {
    /// NATS server URL(s), comma-separated.
    pub nats_url: String,
    /// The bucket's name; every node of one cluster names the same.
    pub bucket: String,
    /// JetStream replicas of the bucket when this node creates it (1 on a
    /// single server, 3 on a NATS cluster).
    pub replicas: usize,
}

impl KvResourcesConfig {
    pub fn new(nats_url: impl Into<String>, bucket: impl Into<String>) -> KvResourcesConfig {
        KvResourcesConfig {
            nats_url: nats_url.into(),
            bucket: bucket.into(),
            replicas: 1,
        }
    }
}

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum KvResourcesError {
    #[error("connecting to NATS at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error(
        "opening the resources bucket {bucket:?} (is JetStream enabled, `nats-server -js`?): {message}"
    )]
    Bucket { bucket: String, message: String },
    #[error("reading the resources bucket {bucket:?}: {message}")]
    Read { bucket: String, message: String },
}

/// The bucket's resources as this node has folded them in.
struct Folded {
    set: Arc<ResourceSet>,
    /// Stream sequence of the last entry folded in.
    position: u64,
}

struct Shared {
    js: jetstream::Context,
    kv: kv::Store,
    /// `$KV.<bucket>.`
    subject_prefix: String,
    /// One write of this node at a time (other nodes are held off by the
    /// expected last sequence).
    write: tokio::sync::Mutex<()>,
    folded: watch::Sender<Arc<Folded>>,
    /// Ticks whenever the set changes ([`ResourceStore::subscribe`]).
    revision: watch::Sender<u64>,
}

/// The cluster [`ResourceStore`]. Cheap to clone.
#[derive(Clone)]
pub struct KvResources {
    shared: Arc<Shared>,
}

/// A URL as it may be shown: without user and password.
pub fn shown_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://…@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

fn storage(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(e.to_string())
}

fn unreachable(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::NotReady {
        message: format!("the resources bucket is not reachable: {e}"),
        retry_after_seconds: 5,
    }
}

/// The bucket key of a resource (see the module's layout).
pub fn kv_key(key: &ResourceKey) -> String {
    let part = |s: &str| s.replace('.', "=");
    format!(
        "{}.{}.{}",
        key.kind.as_str(),
        key.namespace
            .as_deref()
            .map_or_else(|| "_".to_owned(), part),
        part(&key.name)
    )
}

/// The resource of a bucket key; `None` for Tally's own keys (`_tally.*`)
/// and keys that name no resource.
pub fn resource_key(kv_key: &str) -> Option<ResourceKey> {
    let mut parts = kv_key.splitn(3, '.');
    let kind: Kind = parts.next()?.parse().ok()?;
    let namespace = parts.next()?;
    let name = parts.next()?.replace('=', ".");
    let namespace = (namespace != "_").then(|| namespace.replace('=', "."));
    Some(ResourceKey::new(kind, namespace.as_deref(), &name))
}

impl KvResources {
    /// Connects to NATS, opens (or makes) the bucket, reads it whole and
    /// starts watching it. The task returned keeps the snapshot in step with
    /// the bucket; it ends only if the store is dropped.
    pub async fn connect(
        config: &KvResourcesConfig,
    ) -> Result<(KvResources, tokio::task::JoinHandle<()>), KvResourcesError> {
        let client = async_nats::ConnectOptions::new()
            .name("tally resources")
            .connection_timeout(Duration::from_secs(5))
            .connect(config.nats_url.as_str())
            .await
            .map_err(|source| KvResourcesError::Connect {
                url: shown_url(&config.nats_url),
                source,
            })?;
        let js = jetstream::new(client);
        let kv = open_bucket(&js, config).await?;
        let read_error = |message: String| KvResourcesError::Read {
            bucket: config.bucket.clone(),
            message,
        };
        let last = kv
            .status()
            .await
            .map_err(|e| read_error(e.to_string()))?
            .info
            .state
            .last_sequence;
        let shared = Arc::new(Shared {
            subject_prefix: format!("$KV.{}.", config.bucket),
            js,
            kv,
            write: tokio::sync::Mutex::new(()),
            folded: watch::channel(Arc::new(Folded {
                set: Arc::default(),
                position: 0,
            }))
            .0,
            revision: watch::channel(0).0,
        });
        let follower = tokio::spawn(follow(Arc::downgrade(&shared)));
        let store = KvResources { shared };
        store
            .caught_up(last)
            .await
            .map_err(|e| read_error(e.to_string()))?;
        tracing::info!(bucket = %config.bucket, position = last, resources = store.snapshot_len(), "resources bucket read");
        Ok((store, follower))
    }

    fn snapshot_len(&self) -> usize {
        Kind::ALL
            .iter()
            .map(|kind| self.shared.folded.borrow().set.count(*kind))
            .sum()
    }

    fn folded(&self) -> Arc<Folded> {
        Arc::clone(&self.shared.folded.borrow())
    }

    /// Waits until this node has folded in the entry at `sequence`.
    async fn caught_up(&self, sequence: u64) -> Result<(), LedgerError> {
        let mut folded = self.shared.folded.subscribe();
        match tokio::time::timeout(CATCH_UP, folded.wait_for(|f| f.position >= sequence)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(storage("the watch of the resources bucket has stopped")),
            Err(_) => Err(unreachable(format!(
                "this node has not seen the bucket's entry {sequence} after {CATCH_UP:?}"
            ))),
        }
    }

    /// Waits until this node has folded in the bucket's last entry.
    async fn catch_up(&self) -> Result<(), LedgerError> {
        let last = self
            .shared
            .kv
            .status()
            .await
            .map_err(unreachable)?
            .info
            .state
            .last_sequence;
        self.caught_up(last).await
    }

    /// Publishes `value` (or a deletion marker) at `key`, only if the
    /// bucket's last sequence is still `expected`. `Ok(None)`: another write
    /// came first.
    async fn publish(
        &self,
        key: &ResourceKey,
        value: Option<Bytes>,
        expected: u64,
    ) -> Result<Option<u64>, LedgerError> {
        use async_nats::jetstream::context::PublishErrorKind;
        let subject = format!("{}{}", self.shared.subject_prefix, kv_key(key));
        let mut message =
            jetstream::message::PublishMessage::build().expected_last_sequence(expected);
        message = match value {
            Some(value) => message.payload(value),
            None => message.header("KV-Operation", "DEL"),
        };
        let acked = match self.shared.js.send_publish(subject, message).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match acked {
            Ok(ack) => Ok(Some(ack.sequence)),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(None),
            Err(e) => Err(unreachable(e)),
        }
    }

    /// Plans a change on the newest snapshot with `plan`, publishes it, and
    /// answers from the snapshot that includes it; plans again when another
    /// node wrote first.
    async fn write<T>(
        &self,
        key_of: impl Fn(&ResourceSet) -> Result<Planned<T>, LedgerError>,
    ) -> Result<T, LedgerError> {
        let _one_at_a_time = self.shared.write.lock().await;
        for _ in 0..MAX_ATTEMPTS {
            let folded = self.folded();
            let planned = key_of(&folded.set)?;
            let Some(value) = planned.value else {
                return Ok((planned.answer)(&folded.set));
            };
            match self.publish(&planned.key, value, folded.position).await? {
                Some(sequence) => {
                    self.caught_up(sequence).await?;
                    return Ok((planned.answer)(&self.folded().set));
                }
                None => self.catch_up().await?,
            }
        }
        Err(LedgerError::NotReady {
            message: "the resources bucket changed during every attempt of this write; \
                      try again"
                .into(),
            retry_after_seconds: 1,
        })
    }

    async fn apply_now(&self, manifest: Manifest, mode: ApplyMode) -> Result<Applied, LedgerError> {
        self.write(|set| {
            let (stored, action) = set.plan_apply(manifest.clone(), mode, Timestamp::now())?;
            let kind = stored.typed_kind()?;
            let key = ResourceKey::new(
                kind,
                stored.metadata.namespace.as_deref(),
                &stored.metadata.name,
            );
            let bytes = ResourceSet::encode(&stored)?;
            if bytes.len() > MAX_VALUE_BYTES {
                return Err(LedgerError::Invalid(format!(
                    "{key}: {} bytes once stored; a cluster keeps resources of at most \
                     {MAX_VALUE_BYTES} bytes",
                    bytes.len()
                )));
            }
            // An unchanged resource is not written again (a watched
            // directory re-applies its files on every node).
            let value = (action != ApplyAction::Unchanged).then(|| Some(Bytes::from(bytes)));
            let answer: Box<dyn FnOnce(&ResourceSet) -> Applied + Send> =
                Box::new(move |set| Applied {
                    action,
                    manifest: set.shown(&stored),
                });
            Ok(Planned { key, value, answer })
        })
        .await
    }

    async fn delete_now(&self, key: ResourceKey) -> Result<(), LedgerError> {
        self.write(|set| {
            set.plan_delete(&key)?;
            Ok(Planned {
                key: key.clone(),
                value: Some(None),
                answer: Box::new(|_| ()),
            })
        })
        .await
    }
}

/// A write decided on a snapshot: what to publish at `key` (`None`: nothing
/// to write; `Some(None)`: a deletion), and the answer once it is folded in.
struct Planned<T> {
    key: ResourceKey,
    value: Option<Option<Bytes>>,
    answer: Box<dyn FnOnce(&ResourceSet) -> T + Send>,
}

/// Opens the bucket, or makes it (with its format marker) if it is not there.
async fn open_bucket(
    js: &jetstream::Context,
    config: &KvResourcesConfig,
) -> Result<kv::Store, KvResourcesError> {
    let failed = |message: String| KvResourcesError::Bucket {
        bucket: config.bucket.clone(),
        message,
    };
    let kv = match js.get_key_value(config.bucket.as_str()).await {
        Ok(kv) => kv,
        Err(_) => {
            // The bucket's stream as `create_key_value` would make it; made
            // directly, because that call first reads the account info in
            // a shape NATS 2.9 does not answer.
            let made = js.create_stream(bucket_stream(config)).await;
            match js.get_key_value(config.bucket.as_str()).await {
                Ok(kv) => kv,
                // Not made, not there: say why it was not made.
                Err(e) => {
                    return Err(failed(made.err().map_or(e.to_string(), |m| m.to_string())));
                }
            }
        }
    };
    if kv
        .get(FORMAT_KEY)
        .await
        .map_err(|e| failed(e.to_string()))?
        .is_none()
    {
        // Two nodes may race here: `create` lets one write it.
        let _ = kv.create(FORMAT_KEY, Bytes::from_static(FORMAT)).await;
    }
    match kv
        .get(FORMAT_KEY)
        .await
        .map_err(|e| failed(e.to_string()))?
    {
        Some(format) if format.as_ref() == FORMAT => Ok(kv),
        Some(other) => Err(failed(format!(
            "its format is {:?}; this version of Tally reads format {:?}",
            String::from_utf8_lossy(&other),
            String::from_utf8_lossy(FORMAT)
        ))),
        None => Err(failed("its format marker could not be written".into())),
    }
}

/// The stream of a key-value bucket (what NATS's clients make for one):
/// `KV_<bucket>` on `$KV.<bucket>.>`, one entry per key, rollups allowed,
/// no deletes of messages, direct gets.
fn bucket_stream(config: &KvResourcesConfig) -> jetstream::stream::Config {
    use jetstream::stream::{Config, DiscardPolicy, StorageType};
    Config {
        name: format!("KV_{}", config.bucket),
        description: Some("Tally's resources (one manifest per key)".into()),
        subjects: vec![format!("$KV.{}.>", config.bucket)],
        max_messages_per_subject: 1,
        max_message_size: i32::try_from(MAX_VALUE_BYTES).unwrap_or(i32::MAX),
        storage: StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        num_replicas: config.replicas.max(1),
        discard: DiscardPolicy::New,
        ..Default::default()
    }
}

/// Keeps the snapshot in step with the bucket until the store is dropped:
/// watches the last entry of every key, then every new entry; after an
/// error, watches again from the entry after the last one folded in.
async fn follow(shared: std::sync::Weak<Shared>) {
    loop {
        let Some(live) = shared.upgrade() else { return };
        let position = live.folded.borrow().position;
        let watched = if position == 0 {
            live.kv.watch_with_history(">").await
        } else {
            live.kv.watch_all_from_revision(position + 1).await
        };
        drop(live);
        match watched {
            Ok(mut entries) => {
                while let Some(entry) = entries.next().await {
                    let Some(live) = shared.upgrade() else { return };
                    match entry {
                        Ok(entry) => fold(&live, &entry),
                        Err(e) => {
                            tracing::warn!(error = %e, "the watch of the resources bucket failed; watching again");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the resources bucket; trying again");
            }
        }
        tokio::time::sleep(REWATCH_PAUSE).await;
    }
}

/// Folds one bucket entry into the snapshot.
fn fold(shared: &Shared, entry: &kv::Entry) {
    let current = Arc::clone(&shared.folded.borrow());
    if entry.revision <= current.position {
        return;
    }
    let mut set = (*current.set).clone();
    let changed = match (resource_key(&entry.key), entry.operation) {
        (None, _) => false,
        (Some(key), kv::Operation::Put) => match serde_json::from_slice::<Manifest>(&entry.value)
        {
            Ok(manifest) => set.insert(manifest).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
        .map_or_else(
            |e| {
                tracing::warn!(key = %key, revision = entry.revision, error = %e, "skipping an unreadable resource in the bucket");
                false
            },
            |()| true,
        ),
        (Some(key), kv::Operation::Delete | kv::Operation::Purge) => {
            set.remove(&key);
            true
        }
    };
    let set = if changed {
        Arc::new(set)
    } else {
        Arc::clone(&current.set)
    };
    shared.folded.send_replace(Arc::new(Folded {
        set,
        position: entry.revision,
    }));
    if changed {
        shared.revision.send_modify(|r| *r += 1);
    }
}

impl ResourceStore for KvResources {
    fn apply(
        &self,
        manifest: Manifest,
        mode: ApplyMode,
    ) -> BoxFuture<'_, Result<Applied, LedgerError>> {
        Box::pin(self.apply_now(manifest, mode))
    }

    fn delete(&self, key: ResourceKey) -> BoxFuture<'_, Result<(), LedgerError>> {
        Box::pin(self.delete_now(key))
    }

    fn snapshot(&self) -> Arc<ResourceSet> {
        Arc::clone(&self.shared.folded.borrow().set)
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.revision.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_stay_valid_bucket_keys() {
        for key in [
            ResourceKey::new(Kind::Secret, Some("team.a"), "api.key..v2"),
            ResourceKey::new(Kind::Namespace, None, "prod"),
            ResourceKey::new(Kind::BillingAccount, Some("ignored"), "acme_1"),
        ] {
            let text = kv_key(&key);
            assert!(
                text.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_=.".contains(c)),
                "{text}"
            );
            assert!(!text.contains(".."), "{text}");
            assert_eq!(resource_key(&text), Some(key));
        }
        assert_eq!(resource_key(FORMAT_KEY), None);
        assert_eq!(resource_key("Nope.x.y"), None);
    }

    #[test]
    fn credentials_never_show_in_a_url() {
        assert_eq!(
            shown_url("nats://user:secret@nats:4222"),
            "nats://…@nats:4222"
        );
        assert_eq!(shown_url("nats://nats:4222"), "nats://nats:4222");
    }
}
