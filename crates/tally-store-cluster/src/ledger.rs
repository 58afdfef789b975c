//! [`ClusterLedger`]: connecting, ingest, the catalog and voids. Reads are
//! in [`crate::read`], workers in [`crate::worker`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use tally_ledger::{
    Admission, Applied, ApplyMode, IngestOutcome, LedgerError, QuarantineNotice, ResourceStore,
    VoidOutcome, VoidRecord, VoidRequest,
};
use tally_model::{CloudEvent, Kind, Manifest};

use crate::ch::{Ch, ChError, valid_identifier};
use crate::keys;
use crate::measure;
use crate::mirror::{self, CatalogState, VoidState};

pub use crate::layout::{DEDUPE_BUCKET, STREAM};
/// The durable consumer workers share.
pub const CONSUMER: &str = "tally-materialiser";
/// The catalog's key-value bucket.
pub const CATALOG_BUCKET: &str = "tally-catalog";
/// The voids' key-value bucket.
pub const VOIDS_BUCKET: &str = "tally-voids";

/// How to reach the cluster, and its settings.
#[derive(Debug, Clone)]
pub struct ClusterLedgerConfig {
    /// `nats://host:port` of a JetStream-enabled NATS server.
    pub nats_url: String,
    /// `http://host:port` of ClickHouse's HTTP interface.
    pub clickhouse_url: String,
    /// The ClickHouse database (created when missing): `[A-Za-z0-9_]+`.
    pub database: String,
    /// The project token of events whose subject is not `projects/<p>`.
    pub default_project: String,
    /// JetStream's duplicate window: a re-sent event within it is answered
    /// `duplicate` by the stream itself, and a worker's re-published
    /// verdicts are dropped. Beyond it the dedupe bucket answers (exact
    /// over the horizon, `layout.rs`).
    pub duplicate_window: Duration,
    /// How long the stream keeps messages (ClickHouse keeps the events).
    pub stream_max_age: Duration,
    /// Workers this process runs (each a pull subscriber of the shared
    /// durable consumer); 0 leaves materialising to other processes.
    pub workers: usize,
    /// Messages a worker takes per batch.
    pub batch: usize,
    /// How long a delivered message may stay unacknowledged before it is
    /// delivered again (to any worker): how soon the work of a worker that
    /// died is taken over. Set by whichever node creates the consumer.
    pub ack_wait: Duration,
    pub max_lateness: SignedDuration,
    pub max_future: SignedDuration,
    /// Longest ClickHouse may stay silent within a request.
    pub clickhouse_timeout: Duration,
    /// Whether this process rolls meters up (`rollup.rs`) when it runs
    /// workers; off, queries read the events unless another node rolls.
    pub rollups: bool,
}

impl ClusterLedgerConfig {
    pub fn new(nats_url: impl Into<String>, clickhouse_url: impl Into<String>) -> Self {
        ClusterLedgerConfig {
            nats_url: nats_url.into(),
            clickhouse_url: clickhouse_url.into(),
            database: "tally".into(),
            default_project: "default".into(),
            duplicate_window: Duration::from_secs(10 * 60),
            stream_max_age: Duration::from_secs(7 * 24 * 3600),
            workers: 1,
            batch: 2_000,
            ack_wait: Duration::from_secs(30),
            max_lateness: SignedDuration::from_hours(32 * 24),
            max_future: tally_ledger::DEFAULT_MAX_FUTURE,
            clickhouse_timeout: Duration::from_secs(30),
            rollups: true,
        }
    }
}

/// Why the cluster ledger could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid cluster configuration: {0}")]
    Config(String),
    #[error("NATS at {url}: {message}")]
    Nats { url: String, message: String },
    #[error(transparent)]
    ClickHouse(#[from] ChError),
}

/// What a node publishes for one event.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    pub ingested_at: Timestamp,
    pub event: CloudEvent,
}

#[derive(Default)]
pub(crate) struct Stats {
    pub accepted: AtomicU64,
    pub duplicates: AtomicU64,
    pub quarantined: AtomicU64,
    pub batches: AtomicU64,
    pub ch_insert_errors: AtomicU64,
    /// Messages delivered to the consumer and not yet acknowledged, plus
    /// those not yet delivered (refreshed by the monitor).
    pub pending: AtomicU64,
    /// Milliseconds since the consumer last had nothing pending.
    pub lag_ms: AtomicU64,
    /// The stream sequence below which every event is materialised.
    pub materialised_below: AtomicU64,
    /// Meter queries answered partly from `samples`.
    pub rolled_queries: AtomicU64,
    /// Failed ClickHouse inserts by (table, reason).
    pub insert_errors: std::sync::Mutex<std::collections::BTreeMap<(String, String), u64>>,
}

impl Stats {
    /// Counts a failed insert into `table` (and in `ch_insert_errors`).
    pub fn insert_error(&self, table: &str, error: &ChError) {
        self.ch_insert_errors.fetch_add(1, Ordering::Relaxed);
        let mut by = self.insert_errors.lock().unwrap_or_else(|p| p.into_inner());
        *by.entry((table.to_owned(), error.reason().to_owned()))
            .or_default() += 1;
    }

    /// [`Stats::insert_errors`] as `LedgerStats` holds them.
    pub fn insert_errors_by_table(
        &self,
    ) -> std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>> {
        let by = self.insert_errors.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: std::collections::BTreeMap<_, std::collections::BTreeMap<_, _>> =
            Default::default();
        for ((table, reason), n) in by.iter() {
            out.entry(table.clone())
                .or_default()
                .insert(reason.clone(), *n);
        }
        out
    }
}

pub(crate) struct Inner {
    pub config: ClusterLedgerConfig,
    pub js: jetstream::Context,
    pub ch: Ch,
    pub catalog_kv: kv::Store,
    pub voids_kv: kv::Store,
    pub catalog: Arc<RwLock<CatalogState>>,
    pub voids: Arc<RwLock<VoidState>>,
    pub stats: Stats,
    pub schema_ready: AtomicBool,
    pub nats: async_nats::Client,
    pub resources: RwLock<Option<Arc<dyn ResourceStore>>>,
    /// One catalog change at a time from this node.
    pub apply_lock: tokio::sync::Mutex<()>,
}

impl Inner {
    pub fn catalog(&self) -> std::sync::RwLockReadGuard<'_, CatalogState> {
        self.catalog.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn voids(&self) -> std::sync::RwLockReadGuard<'_, VoidState> {
        self.voids.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates the ClickHouse schema once per process.
    pub async fn ensure_schema(&self) -> Result<(), ChError> {
        if !self.schema_ready.load(Ordering::Acquire) {
            self.ch.migrate().await?;
            self.schema_ready.store(true, Ordering::Release);
        }
        Ok(())
    }

    pub fn admission(&self) -> Admission {
        Admission {
            max_lateness: self.config.max_lateness,
            max_future: self.config.max_future,
        }
    }
}

/// A ledger on NATS JetStream and ClickHouse. Cheap to clone; the workers
/// and watches it started stop when the last clone is dropped.
#[derive(Clone)]
pub struct ClusterLedger {
    pub(crate) inner: Arc<Inner>,
    stop: Arc<StopOnDrop>,
}

struct StopOnDrop(tokio::sync::watch::Sender<bool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(true);
    }
}

fn nats_error(url: &str) -> impl Fn(String) -> ConnectError + '_ {
    move |message| ConnectError::Nats {
        url: url.to_owned(),
        message,
    }
}

impl ClusterLedger {
    /// Connects to NATS and ClickHouse, creates the stream, buckets and
    /// tables when missing, loads the catalog and voids, follows them, and
    /// starts `config.workers` workers. ClickHouse may be down: ingest
    /// still works and workers wait for it.
    pub async fn connect(config: ClusterLedgerConfig) -> Result<ClusterLedger, ConnectError> {
        if !valid_identifier(&config.database) {
            return Err(ConnectError::Config(format!(
                "database {:?} must be letters, digits and `_`",
                config.database
            )));
        }
        if !keys::valid_token(&config.default_project) {
            return Err(ConnectError::Config(format!(
                "default project {:?} must be letters, digits, `_` and `-`",
                config.default_project
            )));
        }
        let url = crate::ch::without_credentials(&config.nats_url);
        let err = nats_error(&url);
        let nats = async_nats::connect(&config.nats_url)
            .await
            .map_err(|e| err(e.kind().to_string()))?;
        let js = jetstream::new(nats.clone());
        crate::layout::prepare(&js, &config).await.map_err(&err)?;
        let catalog_kv = bucket(&js, CATALOG_BUCKET, None).await.map_err(&err)?;
        let voids_kv = bucket(&js, VOIDS_BUCKET, None).await.map_err(&err)?;
        let horizon = crate::layout::dedupe_horizon(&config);
        bucket(&js, DEDUPE_BUCKET, Some(horizon))
            .await
            .map_err(&err)?;
        let ch = Ch::new(
            &config.clickhouse_url,
            &config.database,
            config.clickhouse_timeout,
        )?;
        let inner = Arc::new(Inner {
            config,
            js,
            ch,
            catalog_kv,
            voids_kv,
            catalog: Arc::default(),
            voids: Arc::default(),
            stats: Stats::default(),
            schema_ready: AtomicBool::new(false),
            nats,
            resources: RwLock::new(None),
            apply_lock: tokio::sync::Mutex::new(()),
        });
        if let Err(e) = inner.ensure_schema().await {
            tracing::warn!(error = %e, "ClickHouse is not ready; ingest goes on, queries wait for it");
        }
        let (stop, stopped) = tokio::sync::watch::channel(false);
        start_mirrors(&inner, &stopped).await.map_err(&err)?;
        crate::worker::start(&inner, &stopped).await.map_err(&err)?;
        if inner.config.workers > 0 && inner.config.rollups {
            crate::rollup::start(&inner, stopped.clone());
        }
        Ok(ClusterLedger {
            inner,
            stop: Arc::new(StopOnDrop(stop)),
        })
    }

    /// Starts `n` more workers in this process.
    pub async fn spawn_workers(&self, n: usize) -> Result<(), String> {
        let stopped = self.stop.0.subscribe();
        for _ in 0..n {
            crate::worker::spawn_one(&self.inner, stopped.clone()).await?;
        }
        Ok(())
    }

    /// The resource store whose billing accounts and bindings attribute
    /// usage to billing accounts (`groupBy=billing_account`).
    pub fn set_resources(&self, resources: Arc<dyn ResourceStore>) {
        *self
            .inner
            .resources
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(resources);
    }

    /// The stream sequence below which every event is materialised (and
    /// so in every node's answers).
    pub fn materialised_below(&self) -> u64 {
        self.inner.stats.materialised_below.load(Ordering::Relaxed)
    }

    /// Rolls every meter up to what the workers materialised, now (nodes
    /// that run workers also do this every half second).
    pub async fn roll_up(&self) -> Result<(), LedgerError> {
        crate::rollup::roll_all(&self.inner).await.map_err(ch_error)
    }

    /// Meter queries this process answered partly from the rollups.
    pub fn queries_from_rollups(&self) -> u64 {
        self.inner.stats.rolled_queries.load(Ordering::Relaxed)
    }

    /// Batches this process's workers failed to insert into ClickHouse.
    pub fn insert_errors(&self) -> u64 {
        self.inner.stats.ch_insert_errors.load(Ordering::Relaxed)
    }

    /// Messages per subject of stream `billing-usage` among the subjects
    /// `filter` (a NATS subject, wildcards allowed) matches.
    pub async fn subject_counts(
        &self,
        filter: &str,
    ) -> Result<std::collections::BTreeMap<String, u64>, LedgerError> {
        use futures::TryStreamExt;
        let stream = self
            .inner
            .js
            .get_stream(STREAM)
            .await
            .map_err(|e| storage(format!("opening stream {STREAM}: {e}")))?;
        let subjects = stream
            .info_with_subjects(filter)
            .await
            .map_err(|e| storage(format!("reading stream {STREAM}: {e}")))?;
        subjects
            .map_ok(|(subject, n)| (subject, n as u64))
            .try_collect()
            .await
            .map_err(|e| storage(format!("reading stream {STREAM}: {e}")))
    }

    /// Waits until the workers have materialised everything published so
    /// far: the consumer has nothing pending or unacknowledged.
    pub async fn settle(&self, timeout: Duration) -> Result<(), LedgerError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let info = crate::worker::consumer_info(&self.inner).await?;
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                crate::worker::record_progress(&self.inner, &info);
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(LedgerError::NotReady {
                    message: format!(
                        "{} events not yet materialised",
                        info.num_pending + info.num_ack_pending as u64
                    ),
                    retry_after_seconds: 1,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Opens key-value bucket `name`, creating it when missing (its keys expire
/// after `max_age`, when given).
async fn bucket(
    js: &jetstream::Context,
    name: &str,
    max_age: Option<Duration>,
) -> Result<kv::Store, String> {
    if let Ok(store) = js.get_key_value(name).await {
        return Ok(store);
    }
    // The bucket's stream, as `create_key_value` would make it; made here
    // because that call first asks for account details in a form that
    // nats-server 2.9 (Debian's) does not answer.
    js.create_or_update_stream(stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        max_age: max_age.unwrap_or_default(),
        ..Default::default()
    })
    .await
    .map_err(|e| format!("creating bucket {name}: {e}"))?;
    js.get_key_value(name)
        .await
        .map_err(|e| format!("opening bucket {name}: {e}"))
}

/// Loads the catalog and voids, then follows both buckets.
async fn start_mirrors(
    inner: &Arc<Inner>,
    stopped: &tokio::sync::watch::Receiver<bool>,
) -> Result<(), String> {
    let catalog = Arc::clone(&inner.catalog);
    mirror::load(&inner.catalog_kv, |e| {
        mirror::apply_catalog_entry(&catalog, e)
    })
    .await?;
    let voids = Arc::clone(&inner.voids);
    mirror::load(&inner.voids_kv, |e| mirror::apply_void_entry(&voids, e)).await?;
    let catalog = Arc::clone(&inner.catalog);
    tokio::spawn(mirror::follow(
        inner.catalog_kv.clone(),
        move |e| mirror::apply_catalog_entry(&catalog, e),
        stopped.clone(),
    ));
    let voids = Arc::clone(&inner.voids);
    tokio::spawn(mirror::follow(
        inner.voids_kv.clone(),
        move |e| mirror::apply_void_entry(&voids, e),
        stopped.clone(),
    ));
    Ok(())
}

pub(crate) fn storage(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(e.to_string())
}

/// NATS not answering is temporary: 503 with the reason. What the request
/// published before is deduplicated when the client sends it again.
fn unavailable(message: String) -> LedgerError {
    LedgerError::NotReady {
        message: format!("the event stream is unavailable: {message}"),
        retry_after_seconds: 1,
    }
}

/// ClickHouse being unreachable is temporary: 503 with the reason.
pub(crate) fn ch_error(e: ChError) -> LedgerError {
    match e {
        ChError::Unreachable { .. } => LedgerError::NotReady {
            message: format!("materialised usage is unavailable: {e}"),
            retry_after_seconds: 5,
        },
        other => LedgerError::Storage(other.to_string()),
    }
}

impl ClusterLedger {
    /// Publishes structurally valid events and answers how many were new;
    /// see [`ClusterLedger::claim`] for how duplicates are counted.
    pub(crate) async fn ingest_events(
        &self,
        events: Vec<CloudEvent>,
    ) -> Result<IngestOutcome, LedgerError> {
        if events.is_empty() {
            return Ok(IngestOutcome::default());
        }
        let now = Timestamp::now();
        self.inner.admission().check(&events, now)?;
        let messages = self.envelopes(&events, now)?;
        let mut acks = Vec::with_capacity(messages.len());
        for (index, key, subject, publish) in messages {
            let ack = self
                .inner
                .js
                .send_publish(subject, publish)
                .await
                .map_err(|e| unavailable(format!("publishing to {STREAM}: {e}")))?;
            acks.push((index, key, ack));
        }
        let mut claims = Vec::with_capacity(acks.len());
        for (index, key, ack) in acks {
            let ack = ack
                .await
                .map_err(|e| unavailable(format!("no acknowledgement from {STREAM}: {e}")))?;
            claims.push((index, ack.duplicate, self.claim(&key, ack.sequence).await?));
        }
        let mut outcome = IngestOutcome::default();
        for (index, stream_duplicate, claim) in claims {
            let first = match claim.await {
                Ok(_) => true,
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => false,
                Err(e) => return Err(unavailable(format!("claiming a dedupe key: {e}"))),
            };
            if stream_duplicate || !first {
                outcome.duplicates += 1;
            } else {
                outcome.accepted += 1;
                self.quarantine_notices(&events[index], index, now, &mut outcome);
            }
        }
        {
            let catalog = self.inner.catalog();
            for event in &events {
                deprecation_warnings(&catalog, event, &mut outcome.warnings);
            }
        }
        let stats = &self.inner.stats;
        stats
            .accepted
            .fetch_add(outcome.accepted, Ordering::Relaxed);
        stats
            .duplicates
            .fetch_add(outcome.duplicates, Ordering::Relaxed);
        stats
            .quarantined
            .fetch_add(outcome.quarantined.len() as u64, Ordering::Relaxed);
        Ok(outcome)
    }

    /// Claims `key` in the dedupe bucket: a create at subject sequence 0,
    /// sent after the event's PubAck. The create that finds the key taken
    /// (`WrongLastSequence`) marks the event a duplicate.
    ///
    /// Exact over the horizon: the bucket keeps a key for
    /// [`crate::layout::dedupe_horizon`], longer than two admitted copies can
    /// be apart. Claiming after the PubAck means a key never exists without
    /// its event in the stream; a node killed between the two leaves the key
    /// unclaimed, and the next copy (its client's retry) claims it, answered
    /// `duplicate` if the stream still knew the id, else `accepted` — the
    /// first copy never had an answer. Either way the workers store one.
    async fn claim(&self, key: &str, seq: u64) -> Result<PublishAckFuture, LedgerError> {
        let publish = jetstream::message::PublishMessage::build()
            .payload(Bytes::from(seq.to_string()))
            .expected_last_subject_sequence(0);
        self.inner
            .js
            .send_publish(keys::dedupe_subject(DEDUPE_BUCKET, key), publish)
            .await
            .map_err(|e| unavailable(format!("claiming a dedupe key: {e}")))
    }

    /// Adds the quarantine notices of an accepted event.
    fn quarantine_notices(
        &self,
        event: &CloudEvent,
        index: usize,
        now: Timestamp,
        outcome: &mut IngestOutcome,
    ) {
        let catalog = self.inner.catalog();
        for verdict in measure::verdicts(&catalog, event, now) {
            outcome.quarantined.push(QuarantineNotice {
                index,
                id: event.id.clone(),
                meter: verdict.meter,
                reason: verdict.reason,
                message: verdict.message,
            });
        }
    }

    /// The message of each event to publish, with its dedupe key. Refuses
    /// the whole request, before anything is published, if an event exceeds
    /// the server's payload limit.
    fn envelopes(
        &self,
        events: &[CloudEvent],
        now: Timestamp,
    ) -> Result<Vec<(usize, String, String, jetstream::message::PublishMessage)>, LedgerError> {
        let max_payload = self.inner.nats.server_info().max_payload;
        let mut out = Vec::with_capacity(events.len());
        for (index, event) in events.iter().enumerate() {
            let key = keys::dedupe_key(&event.source, &event.id);
            let payload = serde_json::to_vec(&Envelope {
                ingested_at: now,
                event: event.clone(),
            })
            .map_err(storage)?;
            // Headers (the dedupe key) travel in the same message.
            if payload.len() + key.len() + 64 > max_payload {
                return Err(LedgerError::Invalid(format!(
                    "event {index} is larger than the NATS server's max_payload ({max_payload} bytes)"
                )));
            }
            let project = keys::project_token(event, &self.inner.config.default_project);
            let publish = jetstream::message::PublishMessage::build()
                .payload(Bytes::from(payload))
                .message_id(&key);
            out.push((index, key, keys::ingest_subject(&project), publish));
        }
        Ok(out)
    }
}

/// Adds a warning for each Deprecated meter `event` feeds, once per meter.
fn deprecation_warnings(catalog: &CatalogState, event: &CloudEvent, warned: &mut Vec<String>) {
    for meter in catalog.meters.get(&event.kind).into_iter().flatten() {
        if meter.phase() == tally_model::MeterPhase::Deprecated {
            let warning = format!(
                "meter {:?} is Deprecated: it still measures events of type {:?}, but will be retired",
                meter.key,
                meter.event_type()
            );
            if !warned.contains(&warning) {
                warned.push(warning);
            }
        }
    }
}

impl ClusterLedger {
    /// Applies a catalog manifest: planned against the bucket's current
    /// entry, written at its revision.
    pub(crate) async fn apply_manifest(
        &self,
        manifest: Manifest,
        mode: ApplyMode,
    ) -> Result<Applied, LedgerError> {
        let _one = self.inner.apply_lock.lock().await;
        let kind = manifest.typed_kind()?;
        let key = keys::catalog_key(kind.as_str(), &manifest.metadata.name);
        let current = self
            .inner
            .catalog_kv
            .entry(key.clone())
            .await
            .map_err(|e| storage(format!("reading the catalog: {e}")))?;
        if let Some(entry) = &current {
            mirror::apply_catalog_entry(&self.inner.catalog, entry);
        }
        let plan = self
            .inner
            .catalog()
            .catalog
            .plan_apply(manifest, mode, Timestamp::now())?;
        if plan.action != tally_ledger::ApplyAction::Unchanged {
            let value = Bytes::from(serde_json::to_vec(&plan.manifest).map_err(storage)?);
            let kv = &self.inner.catalog_kv;
            let written = match current
                .as_ref()
                .filter(|e| e.operation == kv::Operation::Put)
            {
                Some(entry) => kv
                    .update(&key, value, entry.revision)
                    .await
                    .map_err(|e| e.to_string()),
                None => kv.create(&key, value).await.map_err(|e| e.to_string()),
            };
            written.map_err(|e| {
                LedgerError::Conflict(format!(
                    "{kind} {:?} changed on another node while applying; apply again ({e})",
                    plan.manifest.metadata.name
                ))
            })?;
            self.inner
                .catalog
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .put(plan.manifest.clone(), Timestamp::now());
        }
        Ok(Applied {
            action: plan.action,
            manifest: with_status(plan.manifest),
        })
    }

    pub(crate) async fn delete_manifest(
        &self,
        kind: Kind,
        name: String,
    ) -> Result<(), LedgerError> {
        let _one = self.inner.apply_lock.lock().await;
        self.inner.catalog().catalog.plan_delete(kind, &name)?;
        self.inner
            .catalog_kv
            .delete(keys::catalog_key(kind.as_str(), &name))
            .await
            .map_err(|e| storage(format!("deleting from the catalog: {e}")))?;
        self.inner
            .catalog
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(kind, &name);
        Ok(())
    }

    /// Voids an event: the first void of (source, id) is created in the
    /// voids bucket; a later one answers it.
    pub(crate) async fn void_event(
        &self,
        request: VoidRequest,
    ) -> Result<VoidOutcome, LedgerError> {
        request.validate()?;
        let key = keys::dedupe_key(&request.source, &request.id);
        if let Some(record) = self.inner.voids().by_key.get(&key).cloned() {
            return Ok(VoidOutcome {
                already_voided: true,
                record,
                still_counted_by: vec![],
            });
        }
        let stored = crate::read::find_event(&self.inner, &request.source, &request.id)
            .await?
            .ok_or_else(|| {
                LedgerError::not_found("event", format!("{}/{}", request.source, request.id))
            })?;
        let record = VoidRecord {
            seq: stored.seq,
            source: request.source,
            id: request.id,
            event_type: stored.event.kind.clone(),
            subject: stored.event.subject.clone(),
            event_time: stored.event.time,
            reason: request.reason,
            voided_by: request.voided_by,
            voided_at: Timestamp::now(),
        };
        let value = Bytes::from(serde_json::to_vec(&record).map_err(storage)?);
        match self.inner.voids_kv.create(&key, value).await {
            Ok(revision) => {
                self.inner
                    .voids
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .put(key, revision, record.clone());
                Ok(VoidOutcome {
                    already_voided: false,
                    record,
                    still_counted_by: vec![],
                })
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let entry = self
                    .inner
                    .voids_kv
                    .entry(key)
                    .await
                    .map_err(storage)?
                    .ok_or_else(|| storage("a void vanished while being read"))?;
                mirror::apply_void_entry(&self.inner.voids, &entry);
                let record = serde_json::from_slice(&entry.value).map_err(storage)?;
                Ok(VoidOutcome {
                    already_voided: true,
                    record,
                    still_counted_by: vec![],
                })
            }
            Err(e) => Err(storage(format!("recording a void: {e}"))),
        }
    }
}

/// A catalog manifest with its status: meters are answered from the
/// materialised events as they are, so a meter is Ready once stored.
pub(crate) fn with_status(mut manifest: Manifest) -> Manifest {
    if manifest.kind == Kind::MeterDefinition.as_str() {
        manifest.status = Some(serde_json::json!({
            "conditions": [{
                "type": "Ready",
                "status": "True",
                "reason": "Measuring",
                "message": "answers are computed from the materialised events",
            }]
        }));
    }
    manifest
}
