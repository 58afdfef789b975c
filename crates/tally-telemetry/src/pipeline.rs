//! The exporters' runtime: one `tally-delivery` [`Sink`] per (exporter, sink),
//! fed in-stream with what each exporter selects.
//!
//! - [`Pipeline::update`] takes a [`Snapshot`] of the world (Exporter
//!   manifests, Secret values, the resource index) and diffs it against what
//!   runs: an unchanged sink keeps its queue and what it has in flight, a
//!   removed one drains (for [`PipelineOptions::shutdown_grace`]) and stops, a
//!   changed one is rebuilt. Headers are resolved from the secrets on every
//!   update and read at send time, so a rotated secret is used from the next
//!   request on, without a restart.
//! - [`Pipeline::ingest`] routes a request ([`Router::route_encoded`]) and
//!   hands each sink its share **without waiting**: a sink whose hand-off is
//!   full drops the share and counts it (`queue_full`).
//! - Each sink's own task batches shares by `batch.maxSize` data points and
//!   `batch.timeout`, converts to delta if the sink asks for it, and queues
//!   the batches in its `tally-delivery` sink, which sends, retries (OTLP
//!   rules: 429/502/503/504 and transport errors, with `Retry-After`) and
//!   gives up after `retry.maxAttempts` or `retry.maxElapsedTime` (default
//!   5m, a budget for a few minutes of faults). What is given up is dropped and
//!   counted with a reason; nothing is kept as a dead letter.
//! - Endpoints are the customer's choice, so every sink sends through one
//!   [`EgressGuard`] built from [`PipelineOptions::egress`]: no loopback,
//!   private, link-local... destination unless the operator allows it, no
//!   redirect followed, no proxy. A refused destination drops the batch at
//!   once (`destination_refused`, no retry) and says why in the status.
//! - [`Pipeline::status`] is an exporter's `status`: conditions `Accepted`,
//!   `Ready` and one `SinkHealthy` per sink, and counters per sink; with
//!   pull sources, one `SourceHealthy` per source and its counters.
//! - With [`PipelineOptions::pull`], every source of every exporter is also
//!   pulled from VictoriaMetrics (see [`crate::pull`]): what it reads goes to
//!   that exporter's sinks only, through the same router, and each sink
//!   records how far it has taken each source in the same atomic write as
//!   the points ([`Sink::try_enqueue_marked`]).
//!
//! Counters are data points and live in the shared [`Registry`] as component
//! `exporter/<namespace>/<name>/<sink>` (kind `sink`): `received_total` (taken
//! into the sink), `sent_total` (acknowledged by the endpoint),
//! `dropped_total{reason}`, `errors_total{stage}`, `retries_total`
//! (requests), `queue_depth` (points waiting). The router itself is the
//! `processor` component `exporters`.
//!
//! **Never:** wait in `ingest`; put a secret in a status, an error or a log
//! line (messages are scrubbed of the sink's secret values); put anything
//! an endpoint answered in a status (its body, an OTLP error or
//! partial-success message): a status carries the HTTP status code and a
//! reason Tally wrote, so a sink cannot be used to read another server.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use bytes::Bytes;
use jiff::Timestamp;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::{
    Metric, ResourceMetrics, ScopeMetrics, metric::Data,
};
use prost::Message as _;
use reqwest::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use serde::Serialize;
use tally_delivery::{
    Answer, AttemptReport, BatchOutcome, BatchResult, ComponentKind, ComponentMetrics,
    DESTINATION_REFUSED, EgressGuard, EgressPolicy, EncodeError, Encoder, HttpRequest, Item,
    Registry, Secret, Sink, Storage, Verdict,
};
use tally_model::Manifest;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::delta::DeltaConverter;
use crate::exporter::{
    Authentication, Compression, Condition, Encoding, Exporter, ExporterKey, HeaderValueSource,
    SinkConfig, Temporality, accepted_condition,
};
use crate::index::ResourceIndex;
use crate::otlp::{self, ExportOutcome};
use crate::pull::{PullOptions, Puller};
use crate::route::{RouteStats, Router};
use crate::secret::{SecretStore, SecretValue, resolve_headers};
use crate::victoria::{Checkpoint, PullError};

/// Why data points were dropped: the `reason` label of `dropped_total` and
/// the keys of [`SinkStatus::points_dropped`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DropReason {
    /// The sink's hand-off or queue was full.
    QueueFull,
    /// A secret the sink needs is missing.
    SecretMissing,
    /// The endpoint refused the points for good (partial success).
    RejectedByReceiver,
    /// The endpoint answered with a status that is not retried (4xx...).
    PermanentError,
    /// Every attempt failed with a retryable error.
    RetriesExhausted,
    /// The sink was stopped (removed, changed, shut down) before sending them.
    Shutdown,
    /// The sink could not start (e.g. its disk queue could not be opened).
    SinkNotStarted,
    /// The first point of a cumulative series: the baseline of delta conversion.
    DeltaBaseline,
    /// A batch could not be encoded.
    EncodeFailed,
    /// A batch larger than the queue could ever hold.
    TooLarge,
    /// The disk queue failed.
    StorageError,
    /// The egress policy refused the endpoint's address (loopback,
    /// private...): not sent, not retried.
    DestinationRefused,
}

impl DropReason {
    /// Every reason.
    pub const ALL: [DropReason; 12] = [
        DropReason::QueueFull,
        DropReason::SecretMissing,
        DropReason::RejectedByReceiver,
        DropReason::PermanentError,
        DropReason::RetriesExhausted,
        DropReason::Shutdown,
        DropReason::SinkNotStarted,
        DropReason::DeltaBaseline,
        DropReason::EncodeFailed,
        DropReason::TooLarge,
        DropReason::StorageError,
        DropReason::DestinationRefused,
    ];

    /// The snake_case label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::SecretMissing => "secret_missing",
            DropReason::RejectedByReceiver => "rejected_by_receiver",
            DropReason::PermanentError => "permanent_error",
            DropReason::RetriesExhausted => "retries_exhausted",
            DropReason::Shutdown => "shutdown",
            DropReason::SinkNotStarted => "sink_not_started",
            DropReason::DeltaBaseline => "delta_baseline",
            DropReason::EncodeFailed => "encode_failed",
            DropReason::TooLarge => "too_large",
            DropReason::StorageError => "storage_error",
            DropReason::DestinationRefused => "destination_refused",
        }
    }
}

/// Where sinks queue batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueStorage {
    /// In memory (lost on exit; counted as dropped with reason `shutdown`).
    Memory,
    /// One fjall directory per sink under `dir`; survives restarts.
    Disk {
        /// The parent directory.
        dir: PathBuf,
        /// fsync every append.
        sync: bool,
    },
}

/// How the pipeline runs its sinks. Every field has a default.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// Shares of requests waiting for a sink's task (each holds what one
    /// exporter selected of one request).
    pub handoff_capacity: usize,
    /// Batches a sink's queue holds at most.
    pub queue_max_batches: u64,
    /// Bytes (encoded protobuf) a sink's queue holds at most.
    pub queue_max_bytes: u64,
    /// Where the queues live.
    pub storage: QueueStorage,
    /// Timeout of one request to an endpoint.
    pub request_timeout: Duration,
    /// Longest backoff between retries.
    pub max_backoff: Duration,
    /// Longest `Retry-After` honoured.
    pub max_retry_after: Duration,
    /// How long a removed or changed sink may go on sending what it holds.
    pub shutdown_grace: Duration,
    /// Pull every exporter source from this VictoriaMetrics too (default:
    /// in-stream only).
    pub pull: Option<PullOptions>,
    /// Which addresses sinks may reach besides global unicast ones (the
    /// operator's allow-list; default: none).
    pub egress: EgressPolicy,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            handoff_capacity: 1024,
            queue_max_batches: 10_000,
            queue_max_bytes: 64 << 20,
            storage: QueueStorage::Memory,
            request_timeout: Duration::from_secs(10),
            max_backoff: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(5),
            pull: None,
            egress: EgressPolicy::default(),
        }
    }
}

/// Secret values by (namespace, secret name) and key.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    secrets: HashMap<(String, String), BTreeMap<String, SecretValue>>,
}

impl Secrets {
    /// No secrets.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the secret `name` of `namespace`.
    pub fn insert(
        &mut self,
        namespace: impl Into<String>,
        name: impl Into<String>,
        data: BTreeMap<String, SecretValue>,
    ) {
        self.secrets.insert((namespace.into(), name.into()), data);
    }
}

impl SecretStore for Secrets {
    fn secret_value(&self, namespace: &str, name: &str, key: &str) -> Option<SecretValue> {
        self.secrets
            .get(&(namespace.to_owned(), name.to_owned()))
            .and_then(|data| data.get(key))
            .cloned()
    }
}

/// Everything the pipeline runs from.
#[derive(Clone)]
pub struct Snapshot {
    /// Every `Exporter` manifest (invalid ones included: they get a status).
    pub exporters: Vec<Manifest>,
    /// The values of every `Secret` exporters may reference.
    pub secrets: Secrets,
    /// Namespaces (project, labels) and resources' labels.
    pub index: Arc<dyn ResourceIndex>,
}

/// What [`Pipeline::update`] did to the sinks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpdateReport {
    /// Sinks left running as they were (secrets re-read).
    pub kept: usize,
    /// Sinks started (new or changed).
    pub started: usize,
    /// Sinks stopped (removed or changed).
    pub stopped: usize,
    /// Exporters refused by validation.
    pub invalid: usize,
}

/// What [`Pipeline::ingest`] did with a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngestReport {
    /// Data points in the request.
    pub points: u64,
    /// Resources no exporter may see (no or unknown namespace, wrong project).
    pub route: RouteStats,
    /// Exporters that selected something.
    pub exporters: usize,
    /// Data points handed to sinks (counted once per sink).
    pub handed: u64,
    /// Data points sinks refused at once (full, secret missing, stopped).
    pub dropped: u64,
    /// Something was selected, and every sink it was for refused it because
    /// its hand-off was full: nothing was taken, so a sender may retry later.
    pub overloaded: bool,
}

/// The `status` of an `Exporter`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExporterStatus {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<u64>,
    pub conditions: Vec<Condition>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sinks: Vec<SinkStatus>,
    /// Sources pulled from VictoriaMetrics (none when pulling is off).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<crate::pull::SourceStatus>,
}

/// Counters and health of one sink.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SinkStatus {
    pub name: String,
    /// Data points taken into the sink.
    pub points_received: u64,
    /// Data points the endpoint acknowledged.
    pub points_exported: u64,
    /// Data points sent again after a retryable failure (once per retry).
    pub points_retried: u64,
    /// Requests sent again.
    pub requests_retried: u64,
    /// Data points lost, by reason.
    pub points_dropped: BTreeMap<String, u64>,
    /// Data points waiting to be sent.
    pub points_queued: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_success_time: Option<Timestamp>,
    /// The last failure, free of secrets; cleared by the next success.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When `last_error` happened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error_time: Option<Timestamp>,
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Headers of a sink, resolved from secrets: ready, or why not.
type HeaderState = Result<Arc<Vec<(HeaderName, Secret)>>, String>;

/// State of one (exporter, sink) that outlives rebuilds of its sink: counters
/// in the registry, health, and the current headers.
struct SinkShared {
    metrics: Arc<ComponentMetrics>,
    headers: RwLock<HeaderState>,
    /// Secret values to scrub from messages.
    redact: RwLock<Vec<String>>,
    queued: AtomicI64,
    points_retried: AtomicU64,
    failing: AtomicBool,
    last_success: Mutex<Option<Timestamp>>,
    last_error: Mutex<Option<(String, Timestamp)>>,
    start_error: Mutex<Option<String>>,
}

impl SinkShared {
    fn new(metrics: Arc<ComponentMetrics>) -> Self {
        SinkShared {
            metrics,
            headers: RwLock::new(Err("not resolved yet".into())),
            redact: RwLock::new(Vec::new()),
            queued: AtomicI64::new(0),
            points_retried: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            last_success: Mutex::new(None),
            last_error: Mutex::new(None),
            start_error: Mutex::new(None),
        }
    }

    fn headers(&self) -> HeaderState {
        self.headers
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn set_headers(&self, headers: HeaderState, redact: Vec<String>) {
        *self
            .headers
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = headers;
        *self
            .redact
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = redact;
    }

    /// `message` without any of the sink's secret values.
    fn scrub(&self, message: &str) -> String {
        let redact = self
            .redact
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut message = message.to_owned();
        for value in redact.iter() {
            if !value.is_empty() && message.contains(value.as_str()) {
                message = message.replace(value.as_str(), "[redacted]");
            }
        }
        message
    }

    fn queued_add(&self, points: i64) {
        let now = self.queued.fetch_add(points, Ordering::Relaxed) + points;
        self.metrics
            .set_queue_depth(u64::try_from(now).unwrap_or(0));
    }

    fn drop_points(&self, reason: DropReason, points: u64, was_queued: bool) {
        if points == 0 {
            return;
        }
        self.metrics.add_dropped(reason.as_str(), points);
        if was_queued {
            self.queued_add(-(points as i64));
        }
    }

    fn fail(&self, message: String) {
        let message = self.scrub(&message);
        tracing::debug!(sink = %self.metrics.id(), error = %message, "export failed");
        self.failing.store(true, Ordering::Relaxed);
        *lock(&self.last_error) = Some((message, Timestamp::now()));
    }

    /// A delivered batch; `clean` if the endpoint refused none of its points
    /// (a partial refusal stays the last error).
    fn succeed(&self, clean: bool) {
        self.failing.store(false, Ordering::Relaxed);
        if clean {
            *lock(&self.last_error) = None;
        }
        *lock(&self.last_success) = Some(Timestamp::now());
    }

    fn status(&self, name: &str) -> SinkStatus {
        let m = &self.metrics;
        let points_dropped = DropReason::ALL
            .iter()
            .filter_map(|r| {
                let n = m.dropped(r.as_str());
                (n > 0).then(|| (r.as_str().to_owned(), n))
            })
            .collect();
        let last_error = lock(&self.last_error).clone();
        SinkStatus {
            name: name.to_owned(),
            points_received: m.received(),
            points_exported: m.sent(),
            points_retried: self.points_retried.load(Ordering::Relaxed),
            requests_retried: m.retries(),
            points_dropped,
            points_queued: u64::try_from(self.queued.load(Ordering::Relaxed)).unwrap_or(0),
            last_success_time: *lock(&self.last_success),
            last_error_time: last_error.as_ref().map(|(_, at)| *at),
            last_error: last_error.map(|(message, _)| message),
        }
    }
}

/// One share of a request for one sink.
struct Fragment {
    bytes: Bytes,
    points: u64,
}

/// Why a sink did not take what a pull source handed it: nothing was
/// queued and its checkpoint did not move.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    /// More than the sink's queue could ever hold: pull a smaller window.
    #[error("{0}")]
    TooLarge(String),
    /// Anything else (full queue, missing secret, stopped sink...): try again later.
    #[error("{0}")]
    Other(String),
}

/// What a sink's task is asked to do.
enum Message {
    /// A share of an ingested request: batched with others.
    Share(Fragment),
    /// What a pull source read for this sink, with the first millisecond
    /// it has not read yet: queued (split as batches) together with that
    /// checkpoint, or refused whole.
    Pulled {
        source: String,
        fragment: Fragment,
        next_start_ms: i64,
        ack: oneshot::Sender<Result<(), Refusal>>,
    },
    /// How far this sink has taken a pull source (`None`: never).
    Cursor {
        source: String,
        reply: oneshot::Sender<Result<Option<i64>, Refusal>>,
    },
}

/// The key under which a sink's queue records a pull source's checkpoint.
fn mark_key(source: &str) -> Bytes {
    Bytes::from(format!("pull/{source}"))
}

/// A running (exporter, sink).
pub(crate) struct SinkRuntime {
    pub(crate) name: String,
    config: SinkConfig,
    shared: Arc<SinkShared>,
    tx: mpsc::Sender<Message>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl SinkRuntime {
    /// Hands a share to the sink's task without waiting; `None` if it was
    /// taken, else why its points were dropped.
    fn offer(&self, bytes: &Bytes, points: u64) -> Option<DropReason> {
        let shared = &self.shared;
        let refused = if self.shared.headers().is_err() {
            DropReason::SecretMissing
        } else {
            let fragment = Fragment {
                bytes: bytes.clone(),
                points,
            };
            match self.tx.try_send(Message::Share(fragment)) {
                Ok(()) => {
                    shared.metrics.add_received(points);
                    shared.queued_add(points as i64);
                    return None;
                }
                Err(mpsc::error::TrySendError::Full(_)) => DropReason::QueueFull,
                Err(mpsc::error::TrySendError::Closed(_)) => DropReason::Shutdown,
            }
        };
        shared.drop_points(refused, points, false);
        Some(refused)
    }

    async fn ask<T>(
        &self,
        message: impl FnOnce(oneshot::Sender<Result<T, Refusal>>) -> Message,
    ) -> Result<T, Refusal> {
        let stopped = || Refusal::Other(format!("sink {} is stopping", self.name));
        let (tx, rx) = oneshot::channel();
        self.tx.send(message(tx)).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Queues what pull source `source` read for this sink (possibly
    /// nothing) together with its new checkpoint `next_start_ms`; waits
    /// until both are written, or refused.
    pub(crate) async fn hand_pulled(
        &self,
        source: &str,
        bytes: Bytes,
        points: u64,
        next_start_ms: i64,
    ) -> Result<(), Refusal> {
        if let Err(missing) = self.shared.headers() {
            return Err(Refusal::Other(format!("sink {}: {missing}", self.name)));
        }
        self.ask(|ack| Message::Pulled {
            source: source.to_owned(),
            fragment: Fragment { bytes, points },
            next_start_ms,
            ack,
        })
        .await
    }

    /// The checkpoint of pull source `source` in this sink's queue.
    pub(crate) async fn pull_cursor(&self, source: &str) -> Result<Option<i64>, Refusal> {
        self.ask(|reply| Message::Cursor {
            source: source.to_owned(),
            reply,
        })
        .await
    }
}

/// What `ingest` routes with.
#[derive(Default)]
pub(crate) struct Routing {
    router: Router,
    pub(crate) index: Option<Arc<dyn ResourceIndex>>,
    /// Sinks of each of the router's exporters.
    sinks: Vec<Vec<Arc<SinkRuntime>>>,
    /// The router's position of each exporter.
    positions: HashMap<ExporterKey, usize>,
}

impl Routing {
    /// The running sinks of an exporter, if it is running.
    pub(crate) fn sinks_of(&self, key: &ExporterKey) -> Option<&[Arc<SinkRuntime>]> {
        self.positions.get(key).map(|&i| &self.sinks[i][..])
    }
}

/// The routing in use, shared with the pull tasks.
pub(crate) type SharedRouting = Arc<RwLock<Arc<Routing>>>;

pub(crate) fn current(routing: &SharedRouting) -> Arc<Routing> {
    routing
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
}

/// One exporter as last seen by `update`.
struct ExporterEntry {
    generation: Option<u64>,
    accepted: Condition,
    sinks: Vec<Arc<SinkRuntime>>,
}

/// The exporters' runtime. Create it inside a Tokio runtime.
pub struct Pipeline {
    registry: Registry,
    options: PipelineOptions,
    egress: EgressGuard,
    router_metrics: Arc<ComponentMetrics>,
    routing: SharedRouting,
    exporters: Mutex<BTreeMap<ExporterKey, ExporterEntry>>,
    shared: Mutex<HashMap<String, Arc<SinkShared>>>,
    /// The pull tasks, when pulling is on.
    puller: Option<Puller>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("exporters", &lock(&self.exporters).len())
            .finish_non_exhaustive()
    }
}

/// Why a pipeline could not be created.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("building the exporters' HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("the VictoriaMetrics pull source: {0}")]
    Pull(#[source] PullError),
}

/// The component id of an exporter's sink.
pub fn sink_component_id(exporter: &ExporterKey, sink: &str) -> String {
    format!("exporter/{}/{}/{sink}", exporter.namespace, exporter.name)
}

impl Pipeline {
    /// A pipeline with no exporters, reporting in `registry`.
    pub fn new(registry: Registry, options: PipelineOptions) -> Result<Pipeline, PipelineError> {
        let egress = EgressGuard::new(options.egress.clone()).map_err(PipelineError::Client)?;
        let router_metrics = registry.component(ComponentKind::Processor, "exporters");
        let routing: SharedRouting = Arc::default();
        let puller = match &options.pull {
            Some(pull) => Some(
                Puller::new(pull.clone(), Arc::clone(&routing), registry.clone())
                    .map_err(PipelineError::Pull)?,
            ),
            None => None,
        };
        Ok(Pipeline {
            registry,
            options,
            egress,
            router_metrics,
            routing,
            exporters: Mutex::new(BTreeMap::new()),
            shared: Mutex::new(HashMap::new()),
            puller,
        })
    }

    /// Whether the pipeline routes: it has had its first [`Snapshot`] and is
    /// not shut down. Before that, receivers should ask senders to retry.
    pub fn ready(&self) -> bool {
        self.routing().index.is_some()
    }

    /// The registry the pipeline reports in.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    fn routing(&self) -> Arc<Routing> {
        current(&self.routing)
    }

    /// Routes `request` to every exporter that selects part of it and hands
    /// each of their sinks its share. Never waits: a sink that cannot take
    /// its share now drops it and counts it.
    pub fn ingest(&self, request: &ExportMetricsServiceRequest) -> IngestReport {
        let points = otlp::data_point_count(request) as u64;
        self.router_metrics.add_received(points);
        let routing = self.routing();
        let Some(index) = &routing.index else {
            return IngestReport {
                points,
                ..IngestReport::default()
            };
        };
        let (routes, route) = routing.router.route_encoded(request, index.as_ref());
        if route.unattributed_points > 0 {
            self.router_metrics
                .add_dropped("unattributed", route.unattributed_points);
        }
        let mut report = IngestReport {
            points,
            route,
            exporters: routes.len(),
            ..IngestReport::default()
        };
        let mut refused_full = 0;
        for r in routes {
            let bytes = Bytes::from(r.bytes);
            for sink in &routing.sinks[r.exporter] {
                match sink.offer(&bytes, r.points) {
                    None => report.handed += r.points,
                    Some(why) => {
                        report.dropped += r.points;
                        if why == DropReason::QueueFull {
                            refused_full += r.points;
                        }
                    }
                }
            }
        }
        report.overloaded =
            report.handed == 0 && refused_full > 0 && refused_full == report.dropped;
        self.router_metrics.add_sent(report.handed);
        report
    }

    /// Makes the running exporters those of `snapshot`. Must be called
    /// inside a Tokio runtime (sinks start tasks).
    pub fn update(&self, snapshot: Snapshot) -> UpdateReport {
        let mut report = UpdateReport::default();
        let mut exporters = lock(&self.exporters);
        let mut old: HashMap<String, Arc<SinkRuntime>> = HashMap::new();
        for (key, entry) in exporters.iter() {
            for sink in &entry.sinks {
                old.insert(sink_component_id(key, &sink.name), Arc::clone(sink));
            }
        }
        let mut next = BTreeMap::new();
        let mut valid = Vec::new();
        for manifest in &snapshot.exporters {
            let outcome = Exporter::from_manifest(manifest);
            let generation = manifest.metadata.generation;
            let accepted = accepted_condition(&outcome, generation);
            let key = ExporterKey {
                namespace: manifest.metadata.namespace.clone().unwrap_or_default(),
                name: manifest.metadata.name.clone(),
            };
            let mut sinks = Vec::new();
            match outcome {
                Err(invalid) => {
                    report.invalid += 1;
                    tracing::info!(exporter = %key, error = %invalid, "exporter refused");
                }
                Ok(exporter) => {
                    for config in &exporter.sinks {
                        let id = sink_component_id(&key, &config.name);
                        let headers = resolve(config, &key.namespace, &snapshot.secrets);
                        let previous = old.remove(&id);
                        let runtime = match previous {
                            Some(running) if running.config == *config => {
                                report.kept += 1;
                                running
                            }
                            previous => {
                                if previous.is_some() {
                                    report.stopped += 1;
                                }
                                report.started += 1;
                                self.start_sink(&key, config, previous)
                            }
                        };
                        runtime.shared.set_headers(headers.0, headers.1);
                        sinks.push(runtime);
                    }
                    valid.push((exporter, sinks.clone()));
                }
            }
            next.insert(
                key,
                ExporterEntry {
                    generation,
                    accepted,
                    sinks,
                },
            );
        }
        report.stopped += old.len();
        for (id, _) in old {
            tracing::info!(sink = %id, "exporter sink removed");
        }
        let mut sinks = Vec::with_capacity(valid.len());
        let mut positions = HashMap::with_capacity(valid.len());
        let router = Router::new(valid.into_iter().enumerate().map(|(i, (exporter, s))| {
            sinks.push(s);
            positions.insert(exporter.key.clone(), i);
            exporter
        }));
        let routing = Arc::new(Routing {
            router,
            index: Some(snapshot.index),
            sinks,
            positions,
        });
        *exporters = next;
        *self
            .routing
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::clone(&routing);
        // After the routing, so a new pull task finds its exporter's sinks.
        if let Some(puller) = &self.puller {
            puller.update(routing.router.exporters().iter().map(|e| &**e));
        }
        report
    }

    /// The status of exporter `namespace/name`, if the last update had it.
    pub fn status(&self, namespace: &str, name: &str) -> Option<ExporterStatus> {
        let exporters = lock(&self.exporters);
        let entry = exporters.get(&ExporterKey {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })?;
        let generation = entry.generation;
        let condition = |kind: &str, ok: bool, reason: &str, message: String| Condition {
            kind: kind.to_owned(),
            status: if ok { "True" } else { "False" }.to_owned(),
            reason: reason.to_owned(),
            message,
            observed_generation: generation,
            sink: None,
            source: None,
        };
        let mut conditions = vec![entry.accepted.clone()];
        let mut sinks = Vec::new();
        let mut sink_conditions = Vec::new();
        let mut not_ready = Vec::new();
        for sink in &entry.sinks {
            let shared = &sink.shared;
            let status = shared.status(&sink.name);
            let start_error = lock(&shared.start_error).clone();
            let (ok, reason, message) = match (shared.headers(), start_error) {
                (Err(missing), _) => {
                    not_ready.push(("SecretNotFound", format!("sink {}: {missing}", sink.name)));
                    (false, "SecretNotFound", missing)
                }
                (_, Some(error)) => {
                    not_ready.push(("SinkNotStarted", format!("sink {}: {error}", sink.name)));
                    (false, "SinkNotStarted", error)
                }
                _ if shared.failing.load(Ordering::Relaxed) => {
                    let message = failing_message(&status);
                    not_ready.push(("ExportFailing", format!("sink {}: {message}", sink.name)));
                    (false, "ExportFailing", message)
                }
                _ => match status.last_success_time {
                    Some(at) => (true, "Exporting", format!("last export succeeded at {at}")),
                    None => (true, "Idle", "nothing exported yet".to_owned()),
                },
            };
            let mut c = condition("SinkHealthy", ok, reason, message);
            c.sink = Some(sink.name.clone());
            sink_conditions.push(c);
            sinks.push(status);
        }
        let accepted = entry.accepted.status == "True";
        conditions.push(if !accepted {
            condition(
                "Ready",
                false,
                "NotAccepted",
                "the exporter's spec was refused; see Accepted".into(),
            )
        } else if let Some((reason, _)) = not_ready.first() {
            let message = not_ready
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            condition("Ready", false, reason, message)
        } else {
            condition(
                "Ready",
                true,
                "Ready",
                format!("{} sink(s) running", entry.sinks.len()),
            )
        });
        conditions.extend(sink_conditions);
        let mut sources = Vec::new();
        if let Some(puller) = &self.puller {
            let key = ExporterKey {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            };
            for (source, condition) in puller.status(&key, generation) {
                conditions.push(condition);
                sources.push(source);
            }
        }
        Some(ExporterStatus {
            observed_generation: generation,
            conditions,
            sinks,
            sources,
        })
    }

    /// Stops every sink, letting each send what it holds for at most
    /// `options.shutdown_grace`.
    pub async fn shutdown(&self) {
        // No pull task hands anything on once the sinks start draining.
        if let Some(puller) = &self.puller {
            puller.stop_all().await;
        }
        let tasks: Vec<JoinHandle<()>> = {
            let mut exporters = lock(&self.exporters);
            let tasks = exporters
                .values()
                .flat_map(|e| &e.sinks)
                .filter_map(|s| lock(&s.task).take())
                .collect();
            exporters.clear();
            tasks
        };
        *self
            .routing
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(Routing::default());
        for task in tasks {
            let _ = task.await;
        }
    }

    fn shared(&self, id: &str) -> Arc<SinkShared> {
        lock(&self.shared)
            .entry(id.to_owned())
            .or_insert_with(|| {
                Arc::new(SinkShared::new(
                    self.registry.component(ComponentKind::Sink, id),
                ))
            })
            .clone()
    }

    fn start_sink(
        &self,
        exporter: &ExporterKey,
        config: &SinkConfig,
        previous: Option<Arc<SinkRuntime>>,
    ) -> Arc<SinkRuntime> {
        let id = sink_component_id(exporter, &config.name);
        let shared = self.shared(&id);
        *lock(&shared.start_error) = None;
        let (tx, rx) = mpsc::channel(self.options.handoff_capacity.max(1));
        // A disk queue is one directory: the new sink opens it once the old
        // one has let go of it.
        let wait_for = match (&self.options.storage, previous) {
            (QueueStorage::Disk { .. }, Some(previous)) => lock(&previous.task).take(),
            _ => None,
        };
        let feeder = Feeder {
            id: id.clone(),
            config: config.clone(),
            shared: Arc::clone(&shared),
            options: self.options.clone(),
            egress: self.egress.clone(),
            delta: (config.temporality == Temporality::Delta)
                .then(|| DeltaConverter::new(now_unix_nano())),
            batch: Vec::new(),
            batch_points: 0,
            batch_started: None,
        };
        let task = tokio::spawn(feeder.run(rx, wait_for));
        tracing::info!(sink = %id, endpoint = %config.metrics_url, "exporter sink started");
        Arc::new(SinkRuntime {
            name: config.name.clone(),
            config: config.clone(),
            shared,
            tx,
            task: Mutex::new(Some(task)),
        })
    }
}

/// The `SinkHealthy`/`Ready` message of a failing sink: its last error and when.
fn failing_message(status: &SinkStatus) -> String {
    match (&status.last_error, status.last_error_time) {
        (Some(error), Some(at)) => format!("last error at {at}: {error}"),
        _ => "last error: unknown".to_owned(),
    }
}

fn now_unix_nano() -> u64 {
    u64::try_from(Timestamp::now().as_nanosecond()).unwrap_or(0)
}

/// A sink's headers (or why they cannot be made) and the secret values to
/// scrub from its messages.
fn resolve(config: &SinkConfig, namespace: &str, secrets: &Secrets) -> (HeaderState, Vec<String>) {
    let mut redact = Vec::new();
    let mut note = |name: &str, key: &str| {
        if let Some(v) = secrets.secret_value(namespace, name, key) {
            redact.push(v.expose().to_owned());
        }
    };
    match &config.authentication {
        Authentication::None => {}
        Authentication::BearerToken(r) => note(&r.name, &r.key),
        Authentication::Basic(name) => {
            note(name, "username");
            note(name, "password");
        }
    }
    for header in &config.headers {
        if let HeaderValueSource::Secret(r) = &header.value {
            note(&r.name, &r.key);
        }
    }
    let headers = match resolve_headers(config, namespace, secrets) {
        Ok(headers) => {
            let mut out = Vec::with_capacity(headers.len());
            let mut error = None;
            for h in headers {
                redact.push(h.value.expose().to_owned());
                match HeaderName::from_bytes(h.name.as_bytes()) {
                    Ok(name) => out.push((name, Secret::new(h.value.expose()))),
                    Err(_) => error = Some(format!("{:?} is not a valid header name", h.name)),
                }
            }
            match error {
                Some(e) => Err(e),
                None => Ok(Arc::new(out)),
            }
        }
        Err(missing) => Err(missing.to_string()),
    };
    // Longest first, so a value containing another is scrubbed whole.
    redact.sort_by_key(|v| std::cmp::Reverse(v.len()));
    (headers, redact)
}

/// The task of one sink: batches shares, converts to delta, and queues
/// batches in its delivery sink.
struct Feeder {
    id: String,
    config: SinkConfig,
    shared: Arc<SinkShared>,
    options: PipelineOptions,
    egress: EgressGuard,
    delta: Option<DeltaConverter>,
    batch: Vec<u8>,
    batch_points: u64,
    batch_started: Option<tokio::time::Instant>,
}

/// Shared by one delivery sink's encoder and hooks: the batch being sent.
#[derive(Default)]
struct InFlight {
    points: AtomicU64,
    rejected: AtomicU64,
}

fn points_of(keys: &[Bytes]) -> u64 {
    keys.iter()
        .map(|k| <[u8; 8]>::try_from(&k[..]).map_or(0, u64::from_le_bytes))
        .sum()
}

impl Feeder {
    async fn run(mut self, mut rx: mpsc::Receiver<Message>, wait_for: Option<JoinHandle<()>>) {
        if let Some(previous) = wait_for {
            let _ = previous.await;
        }
        let (dead_tx, mut dead_rx) = mpsc::unbounded_channel::<u64>();
        let sink = match self.start(dead_tx) {
            Ok(sink) => sink,
            Err(e) => {
                tracing::error!(sink = %self.id, error = %e, "exporter sink could not start");
                let error = e.to_string();
                *lock(&self.shared.start_error) = Some(error.clone());
                let refusal = || Refusal::Other(format!("the sink could not start: {error}"));
                while let Some(message) = rx.recv().await {
                    match message {
                        Message::Share(f) => {
                            self.shared
                                .drop_points(DropReason::SinkNotStarted, f.points, true);
                        }
                        Message::Pulled { ack, .. } => {
                            let _ = ack.send(Err(refusal()));
                        }
                        Message::Cursor { reply, .. } => {
                            let _ = reply.send(Err(refusal()));
                        }
                    }
                }
                return;
            }
        };
        loop {
            let deadline = self.batch_started.map(|t| t + self.config.batch.timeout);
            tokio::select! {
                biased;
                Some(id) = dead_rx.recv() => {
                    // Counted as dropped by the outcome hook; nothing is kept.
                    let _ = sink.delete_dead_letter(id).await;
                }
                message = rx.recv() => match message {
                    Some(Message::Share(f)) => self.add(&sink, f).await,
                    Some(Message::Pulled { source, fragment, next_start_ms, ack }) => {
                        // What was batched before goes first.
                        self.flush(&sink).await;
                        let result = self.queue_pulled(&sink, &source, fragment, next_start_ms).await;
                        let _ = ack.send(result);
                    }
                    Some(Message::Cursor { source, reply }) => {
                        let _ = reply.send(self.cursor(&sink, &source).await);
                    }
                    None => break,
                },
                () = sleep_until(deadline), if deadline.is_some() => self.flush(&sink).await,
            }
        }
        self.flush(&sink).await;
        sink.shutdown(self.options.shutdown_grace).await;
        let left = self.shared.queued.swap(0, Ordering::Relaxed);
        self.shared.metrics.set_queue_depth(0);
        if left > 0 && !matches!(self.options.storage, QueueStorage::Disk { .. }) {
            self.shared.metrics.add_dropped(
                DropReason::Shutdown.as_str(),
                u64::try_from(left).unwrap_or(0),
            );
        }
        tracing::info!(sink = %self.id, "exporter sink stopped");
    }

    fn start(
        &self,
        dead_tx: mpsc::UnboundedSender<u64>,
    ) -> Result<Sink, tally_delivery::StartError> {
        let mut config = tally_delivery::SinkConfig::new(self.id.clone());
        // Batching by data points happens here; every item is one request.
        config.batch.max_items = 1;
        config.batch.max_bytes = usize::MAX;
        config.batch.timeout = Duration::ZERO;
        let retry = &self.config.retry;
        config.retry.max_attempts = if retry.enabled {
            retry.max_attempts.max(1)
        } else {
            1
        };
        config.retry.initial_backoff = retry.backoff;
        config.retry.max_backoff = self.options.max_backoff.max(retry.backoff);
        config.retry.max_retry_after = self.options.max_retry_after;
        config.retry.max_elapsed = Some(retry.max_elapsed);
        config.retry.request_timeout = self
            .config
            .request_timeout
            .unwrap_or(self.options.request_timeout);
        config.queue.max_items = self.options.queue_max_batches.max(1);
        config.queue.max_bytes = self.options.queue_max_bytes.max(1);
        config.queue.storage = match &self.options.storage {
            QueueStorage::Memory => Storage::Memory,
            QueueStorage::Disk { dir, sync } => Storage::Disk {
                path: dir.join(self.id.replace('/', "_")),
                sync: *sync,
            },
        };
        let in_flight = Arc::new(InFlight::default());
        let encoder = OtlpEncoder {
            url: self.config.metrics_url.clone(),
            encoding: self.config.encoding,
            gzip: self.config.compression == Compression::Gzip,
            shared: Arc::clone(&self.shared),
            in_flight: Arc::clone(&in_flight),
        };
        let on_outcome = {
            let shared = Arc::clone(&self.shared);
            let in_flight = Arc::clone(&in_flight);
            move |outcome: &BatchOutcome| {
                let points = points_of(&outcome.keys);
                match &outcome.result {
                    BatchResult::Delivered { .. } => {
                        let rejected = in_flight.rejected.swap(0, Ordering::Relaxed).min(points);
                        shared.metrics.add_sent(points - rejected);
                        shared.queued_add(-((points - rejected) as i64));
                        shared.drop_points(DropReason::RejectedByReceiver, rejected, true);
                        shared.succeed(rejected == 0);
                    }
                    BatchResult::DeadLettered { id, reason: why } => {
                        let why = match why.as_str() {
                            "permanent error" => DropReason::PermanentError,
                            "encoding failed" => DropReason::EncodeFailed,
                            DESTINATION_REFUSED => DropReason::DestinationRefused,
                            _ => DropReason::RetriesExhausted,
                        };
                        shared.drop_points(why, points, true);
                        let _ = dead_tx.send(*id);
                    }
                }
            }
        };
        let on_attempt = {
            let shared = Arc::clone(&self.shared);
            let in_flight = Arc::clone(&in_flight);
            move |attempt: &AttemptReport<'_>| {
                if attempt.will_retry {
                    shared.metrics.add_retry();
                    shared
                        .points_retried
                        .fetch_add(in_flight.points.load(Ordering::Relaxed), Ordering::Relaxed);
                }
                match attempt.status {
                    None => {
                        shared.metrics.add_error("send");
                        shared.fail(format!("request failed: {}", attempt.detail));
                    }
                    // The classifier recorded what the answer meant.
                    Some(_) if !matches!(attempt.verdict, Verdict::Delivered { .. }) => {
                        shared.metrics.add_error("response");
                    }
                    Some(_) => {}
                }
            }
        };
        // Delivery metrics count batches: a private registry keeps them apart
        // from the data point counters of this component.
        Sink::builder(config, encoder)
            .egress(self.egress.clone())
            .on_outcome(on_outcome)
            .on_attempt(on_attempt)
            .start()
    }

    /// Queues a pulled fragment, cut in batches of `batch.maxSize` points,
    /// and its checkpoint, in one atomic write; or nothing.
    async fn queue_pulled(
        &mut self,
        sink: &Sink,
        source: &str,
        fragment: Fragment,
        next_start_ms: i64,
    ) -> Result<(), Refusal> {
        let refused = |e: String| Refusal::Other(format!("sink {}: {e}", self.config.name));
        let checkpoint = serde_json::to_vec(&Checkpoint { next_start_ms })
            .map_err(|e| refused(e.to_string()))?;
        let points = fragment.points;
        let max = self.config.batch.max_size.max(1) as u64;
        let item = |bytes: Bytes, points: u64| {
            Item::new(Bytes::copy_from_slice(&points.to_le_bytes()), bytes)
        };
        let items = if points == 0 {
            Vec::new()
        } else if !self.config.batch.enabled || points <= max {
            vec![item(fragment.bytes, points)]
        } else {
            let request = ExportMetricsServiceRequest::decode(&fragment.bytes[..])
                .map_err(|e| refused(format!("a pulled share does not decode: {e}")))?;
            split(request, max)
                .into_iter()
                .map(|part| {
                    let n = otlp::data_point_count(&part) as u64;
                    item(Bytes::from(part.encode_to_vec()), n)
                })
                .collect()
        };
        // Counted as queued before the write, so a fast delivery never
        // makes the depth negative.
        self.shared.queued_add(points as i64);
        match sink
            .try_enqueue_marked(items, vec![(mark_key(source), Bytes::from(checkpoint))])
            .await
        {
            Ok(()) => {
                self.shared.metrics.add_received(points);
                Ok(())
            }
            Err(e) => {
                self.shared.queued_add(-(points as i64));
                let message = format!("sink {}: {e}", self.config.name);
                Err(match e {
                    tally_delivery::EnqueueError::TooLarge { .. } => Refusal::TooLarge(message),
                    _ => Refusal::Other(message),
                })
            }
        }
    }

    /// The checkpoint of pull source `source` recorded in the sink's queue.
    async fn cursor(&self, sink: &Sink, source: &str) -> Result<Option<i64>, Refusal> {
        let refused = |e: String| {
            Refusal::Other(format!(
                "sink {}: reading the checkpoint of source {source}: {e}",
                self.config.name
            ))
        };
        match sink.mark(mark_key(source)).await {
            Ok(None) => Ok(None),
            Ok(Some(bytes)) => serde_json::from_slice::<Checkpoint>(&bytes)
                .map(|c| Some(c.next_start_ms))
                .map_err(|e| refused(e.to_string())),
            Err(e) => Err(refused(e.to_string())),
        }
    }

    async fn add(&mut self, sink: &Sink, fragment: Fragment) {
        let max = self.config.batch.max_size.max(1) as u64;
        let batching = self.config.batch.enabled;
        if self.delta.is_none() && (!batching || fragment.points <= max) {
            return self.add_part(sink, &fragment.bytes, fragment.points).await;
        }
        // The slow path: decode our own encoding to convert or split it.
        let mut request = match ExportMetricsServiceRequest::decode(&fragment.bytes[..]) {
            Ok(request) => request,
            Err(e) => {
                tracing::error!(sink = %self.id, error = %e, "a routed share does not decode");
                self.shared.metrics.add_error("encode");
                self.shared
                    .drop_points(DropReason::EncodeFailed, fragment.points, true);
                return;
            }
        };
        if let Some(delta) = &mut self.delta {
            delta.convert(&mut request);
            let left = otlp::data_point_count(&request) as u64;
            self.shared.drop_points(
                DropReason::DeltaBaseline,
                fragment.points.saturating_sub(left),
                true,
            );
        }
        let limit = if batching { max } else { u64::MAX };
        for part in split(request, limit) {
            let points = otlp::data_point_count(&part) as u64;
            self.add_part(sink, &part.encode_to_vec(), points).await;
        }
    }

    async fn add_part(&mut self, sink: &Sink, bytes: &[u8], points: u64) {
        if points == 0 {
            return;
        }
        if !self.config.batch.enabled {
            self.batch.extend_from_slice(bytes);
            self.batch_points = points;
            return self.flush(sink).await;
        }
        let max = self.config.batch.max_size.max(1) as u64;
        if self.batch_points > 0 && self.batch_points + points > max {
            self.flush(sink).await;
        }
        if self.batch_started.is_none() {
            self.batch_started = Some(tokio::time::Instant::now());
        }
        self.batch.extend_from_slice(bytes);
        self.batch_points += points;
        if self.batch_points >= max {
            self.flush(sink).await;
        }
    }

    async fn flush(&mut self, sink: &Sink) {
        self.batch_started = None;
        let points = std::mem::take(&mut self.batch_points);
        let data = std::mem::take(&mut self.batch);
        if points == 0 {
            return;
        }
        let item = Item::new(Bytes::copy_from_slice(&points.to_le_bytes()), data);
        if let Err(e) = sink.try_enqueue(item).await {
            tracing::debug!(sink = %self.id, error = %e, points, "batch not queued");
            let why = match e.reason() {
                "queue_full" => DropReason::QueueFull,
                "too_large" => DropReason::TooLarge,
                "shutdown" => DropReason::Shutdown,
                _ => DropReason::StorageError,
            };
            self.shared.drop_points(why, points, true);
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Splits a request into requests of at most `max` data points, keeping
/// resource, scope and metric structure (a metric may be cut in parts).
fn split(request: ExportMetricsServiceRequest, max: u64) -> Vec<ExportMetricsServiceRequest> {
    let max = usize::try_from(max).unwrap_or(usize::MAX).max(1);
    let mut parts = Vec::new();
    let mut current = ExportMetricsServiceRequest::default();
    let mut room = max;
    for rm in request.resource_metrics {
        let mut out_rm = ResourceMetrics {
            resource: rm.resource.clone(),
            scope_metrics: Vec::new(),
            schema_url: rm.schema_url.clone(),
        };
        for sm in rm.scope_metrics {
            let mut out_sm = ScopeMetrics {
                scope: sm.scope.clone(),
                metrics: Vec::new(),
                schema_url: sm.schema_url.clone(),
            };
            for metric in sm.metrics {
                let mut rest = Some(metric);
                while let Some(metric) = rest.take() {
                    let (head, tail) = cut_metric(metric, room);
                    room -= head
                        .data
                        .as_ref()
                        .map_or(0, crate::route::data_point_count)
                        .min(room);
                    out_sm.metrics.push(head);
                    rest = tail;
                    if room == 0 {
                        // Close the current part and start the next one with
                        // the same resource and scope.
                        let mut closed_sm = ScopeMetrics {
                            scope: out_sm.scope.clone(),
                            metrics: Vec::new(),
                            schema_url: out_sm.schema_url.clone(),
                        };
                        std::mem::swap(&mut closed_sm, &mut out_sm);
                        let mut closed_rm = ResourceMetrics {
                            resource: out_rm.resource.clone(),
                            scope_metrics: Vec::new(),
                            schema_url: out_rm.schema_url.clone(),
                        };
                        std::mem::swap(&mut closed_rm, &mut out_rm);
                        closed_rm.scope_metrics.push(closed_sm);
                        current.resource_metrics.push(closed_rm);
                        parts.push(std::mem::take(&mut current));
                        room = max;
                    }
                }
            }
            if !out_sm.metrics.is_empty() {
                out_rm.scope_metrics.push(out_sm);
            }
        }
        if !out_rm.scope_metrics.is_empty() {
            current.resource_metrics.push(out_rm);
        }
    }
    if !current.resource_metrics.is_empty() {
        parts.push(current);
    }
    parts
}

/// The first `room` data points of `metric`, and the rest if any.
fn cut_metric(mut metric: Metric, room: usize) -> (Metric, Option<Metric>) {
    fn cut<P>(points: &mut Vec<P>, room: usize) -> Option<Vec<P>> {
        (points.len() > room).then(|| points.split_off(room))
    }
    let tail = match &mut metric.data {
        None => None,
        Some(Data::Gauge(g)) => cut(&mut g.data_points, room).map(|p| {
            Data::Gauge(opentelemetry_proto::tonic::metrics::v1::Gauge { data_points: p })
        }),
        Some(Data::Sum(s)) => cut(&mut s.data_points, room).map(|p| {
            Data::Sum(opentelemetry_proto::tonic::metrics::v1::Sum {
                data_points: p,
                aggregation_temporality: s.aggregation_temporality,
                is_monotonic: s.is_monotonic,
            })
        }),
        Some(Data::Histogram(h)) => cut(&mut h.data_points, room).map(|p| {
            Data::Histogram(opentelemetry_proto::tonic::metrics::v1::Histogram {
                data_points: p,
                aggregation_temporality: h.aggregation_temporality,
            })
        }),
        Some(Data::ExponentialHistogram(h)) => cut(&mut h.data_points, room).map(|p| {
            Data::ExponentialHistogram(
                opentelemetry_proto::tonic::metrics::v1::ExponentialHistogram {
                    data_points: p,
                    aggregation_temporality: h.aggregation_temporality,
                },
            )
        }),
        Some(Data::Summary(s)) => cut(&mut s.data_points, room).map(|p| {
            Data::Summary(opentelemetry_proto::tonic::metrics::v1::Summary { data_points: p })
        }),
    };
    let rest = tail.map(|data| Metric {
        name: metric.name.clone(),
        description: metric.description.clone(),
        unit: metric.unit.clone(),
        metadata: metric.metadata.clone(),
        data: Some(data),
    });
    (metric, rest)
}

/// Turns a batch (concatenated protobuf shares) into an OTLP/HTTP request,
/// and reads answers per the OTLP spec.
struct OtlpEncoder {
    url: url::Url,
    encoding: Encoding,
    gzip: bool,
    shared: Arc<SinkShared>,
    in_flight: Arc<InFlight>,
}

/// `500 Internal Server Error`: an answer's status as a status may show it.
fn answered(status: reqwest::StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => format!("HTTP {}", status.as_u16()),
    }
}

impl Encoder for OtlpEncoder {
    fn encode(&self, items: &[Item]) -> Result<HttpRequest, EncodeError> {
        let keys: Vec<Bytes> = items.iter().map(|i| i.key.clone()).collect();
        self.in_flight
            .points
            .store(points_of(&keys), Ordering::Relaxed);
        self.in_flight.rejected.store(0, Ordering::Relaxed);
        let headers = self.shared.headers().map_err(EncodeError::new)?;
        let protobuf: Bytes = match items {
            [one] => one.data.clone(),
            many => many
                .iter()
                .flat_map(|i| i.data.iter().copied())
                .collect::<Vec<u8>>()
                .into(),
        };
        let (body, content_type) = match self.encoding {
            Encoding::Protobuf => (protobuf, otlp::PROTOBUF_CONTENT_TYPE),
            Encoding::Json => {
                let request = ExportMetricsServiceRequest::decode(&protobuf[..])
                    .map_err(|e| EncodeError::new(format!("re-reading a batch: {e}")))?;
                let json = serde_json::to_vec(&request)
                    .map_err(|e| EncodeError::new(format!("OTLP JSON encoding: {e}")))?;
                (Bytes::from(json), otlp::JSON_CONTENT_TYPE)
            }
        };
        let url = reqwest::Url::parse(self.url.as_str())
            .map_err(|e| EncodeError::new(format!("endpoint URL: {e}")))?;
        let mut request = HttpRequest::post(url)
            .header(CONTENT_TYPE, HeaderValue::from_static(content_type))
            .body(body)
            .gzip(self.gzip);
        for (name, value) in headers.iter() {
            request = request.secret_header(name.clone(), value)?;
        }
        Ok(request)
    }

    fn classify(&self, answer: &Answer<'_>) -> Verdict {
        let content_type = answer
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        match otlp::parse_export_response(answer.status.as_u16(), content_type, answer.body) {
            ExportOutcome::Accepted { .. } => Verdict::Delivered { rejected: 0 },
            ExportOutcome::PartiallyAccepted {
                rejected_data_points,
                message,
            } => {
                let rejected = u64::try_from(rejected_data_points).unwrap_or(0);
                self.in_flight.rejected.store(rejected, Ordering::Relaxed);
                // Its message is the endpoint's words: the operator's log only.
                tracing::debug!(sink = %self.shared.metrics.id(),
                    message = %self.shared.scrub(&message), "partial success");
                self.shared.fail(format!(
                    "the endpoint answered {} and rejected {rejected} data point(s)",
                    answered(answer.status)
                ));
                // The points were refused for good: counted by the outcome
                // hook in data points, not retried.
                Verdict::Delivered { rejected: 0 }
            }
            ExportOutcome::Failed {
                retryable, message, ..
            } => {
                tracing::debug!(sink = %self.shared.metrics.id(), status = answer.status.as_u16(),
                    message = %self.shared.scrub(&message), "the endpoint refused an export");
                let redirect = if answer.status.is_redirection() {
                    " (redirects are not followed)"
                } else {
                    ""
                };
                self.shared.fail(format!(
                    "the endpoint answered {}{redirect}",
                    answered(answer.status)
                ));
                if retryable {
                    Verdict::Retryable
                } else {
                    Verdict::Permanent
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::metrics::v1::{Gauge, NumberDataPoint};

    fn metric(name: &str, points: usize) -> Metric {
        Metric {
            name: name.into(),
            data: Some(Data::Gauge(Gauge {
                data_points: (0..points)
                    .map(|i| NumberDataPoint {
                        time_unix_nano: i as u64,
                        ..Default::default()
                    })
                    .collect(),
            })),
            ..Default::default()
        }
    }

    #[test]
    fn split_keeps_every_point_once_in_parts_of_at_most_max() {
        let request = ExportMetricsServiceRequest {
            resource_metrics: (0..3)
                .map(|r| ResourceMetrics {
                    scope_metrics: vec![ScopeMetrics {
                        metrics: vec![metric(&format!("a{r}"), 7), metric(&format!("b{r}"), 2)],
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .collect(),
        };
        for max in [1, 3, 4, 9, 100] {
            let parts = split(request.clone(), max);
            let mut seen = Vec::new();
            for part in &parts {
                let n = otlp::data_point_count(part) as u64;
                assert!(n >= 1 && n <= max, "{n} > {max}");
                for rm in &part.resource_metrics {
                    for sm in &rm.scope_metrics {
                        for m in &sm.metrics {
                            let Some(Data::Gauge(g)) = &m.data else {
                                panic!()
                            };
                            assert!(!g.data_points.is_empty());
                            for p in &g.data_points {
                                seen.push((m.name.clone(), p.time_unix_nano));
                            }
                        }
                    }
                }
            }
            let mut expected: Vec<_> = (0..3)
                .flat_map(|r| {
                    (0..7)
                        .map(move |i| (format!("a{r}"), i))
                        .chain((0..2).map(move |i| (format!("b{r}"), i)))
                })
                .collect();
            expected.sort();
            seen.sort();
            assert_eq!(seen, expected, "max {max}");
        }
    }

    #[test]
    fn scrubbing_removes_every_secret_value() {
        let shared = SinkShared::new(Registry::new().component(ComponentKind::Sink, "x"));
        shared.set_headers(
            Err("none".into()),
            vec!["Bearer tok-123".into(), "tok-123".into()],
        );
        assert_eq!(
            shared.scrub("bad Bearer tok-123 and tok-123"),
            "bad [redacted] and [redacted]"
        );
    }
}
