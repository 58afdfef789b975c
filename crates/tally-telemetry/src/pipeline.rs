//! The exporters' runtime: one `tally-delivery` [`Sink`](tally_delivery::Sink) per (exporter, sink),
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
//!   [`EgressGuard`](tally_delivery::EgressGuard) built from [`PipelineOptions::egress`]: no loopback,
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
//!   the points ([`Sink::try_enqueue_marked`](tally_delivery::Sink::try_enqueue_marked)).
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
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use serde::Serialize;
use tally_delivery::{ComponentKind, ComponentMetrics, EgressGuard, Registry};
use tally_model::Manifest;
use tally_policy::Resolution;
use tally_policy::resolve::PolicyStatus;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::delta::DeltaConverter;
use crate::exporter::{
    Condition, Exporter, ExporterKey, Signal, SinkConfig, Temporality, accepted_condition,
};
use crate::feeder::{Feeder, now_unix_nano};
use crate::index::ResourceIndex;
use crate::otlp;
use crate::pull::Puller;
use crate::route::{RouteStats, Router};
use crate::routing::{Routing, SharedRouting, current};
use crate::shaping::{Shaped, Shaper};
use crate::sink::{SinkRuntime, SinkShared, resolve};
use crate::sync::{lock, write};
use crate::victoria::PullError;

pub use crate::options::{PipelineOptions, QueueStorage};
pub use crate::secret::Secrets;
pub use crate::sink::{DropReason, SinkStatus};

/// Everything the pipeline runs from.
#[derive(Clone)]
pub struct Snapshot {
    /// Every `Exporter` manifest (invalid ones included: they get a status).
    pub exporters: Vec<Manifest>,
    /// The values of every `Secret` exporters may reference.
    pub secrets: Secrets,
    /// Namespaces (project, labels) and resources' labels.
    pub index: Arc<dyn ResourceIndex>,
    /// Every `TelemetryPolicy`, resolved against the namespaces and gateways.
    pub policies: Arc<Resolution>,
}

/// What [`Pipeline::ingest_logs`] and [`Pipeline::ingest_traces`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShapeReport {
    /// Log records or spans read.
    pub read: u64,
    /// Of no known project: they go nowhere.
    pub unattributed: u64,
    /// Governed by a policy that did not keep them.
    pub filtered: u64,
    /// Kept by a policy.
    pub kept: u64,
    /// Handed to sinks (counted once per sink).
    pub handed: u64,
    /// Refused at once by sinks (full, secret missing, stopped).
    pub dropped: u64,
    /// Metric data points the policies made, handed to sinks.
    pub metric_points: u64,
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

/// The component id of an exporter's sink for `signal`: metrics keep the
/// sink's own id, logs and traces add `/logs` or `/traces`.
pub fn runtime_id(exporter: &ExporterKey, sink: &str, signal: Signal) -> String {
    match signal {
        Signal::Metrics => sink_component_id(exporter, sink),
        other => format!("{}/{}", sink_component_id(exporter, sink), other.as_str()),
    }
}

/// What `ingest`, `ingest_logs` and `ingest_traces` route with, from the
/// valid exporters and their running sinks.
fn routing_of(
    valid: Vec<(Exporter, Vec<Arc<SinkRuntime>>)>,
    index: Arc<dyn ResourceIndex>,
) -> Routing {
    let mut sinks = Vec::with_capacity(valid.len());
    let mut positions = HashMap::with_capacity(valid.len());
    let mut signals = Vec::new();
    let router = Router::new(valid.into_iter().enumerate().map(|(i, (exporter, s))| {
        let project = index.namespace(&exporter.key.namespace).map(|n| n.project);
        let (metrics, others): (Vec<_>, Vec<_>) =
            s.into_iter().partition(|r| r.signal == Signal::Metrics);
        if let Some(project) = project {
            signals.extend(others.into_iter().map(|r| (Arc::clone(&project), r)));
        }
        sinks.push(metrics);
        positions.insert(exporter.key.clone(), i);
        exporter
    }));
    Routing {
        router,
        index: Some(index),
        sinks,
        positions,
        signals,
        shaper: None,
    }
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

    /// Applies the policies in force to access-log records: what they keep
    /// goes to the `logs` sinks of each record's project, their metrics to
    /// the router. Never waits.
    pub fn ingest_logs(&self, request: &ExportLogsServiceRequest) -> ShapeReport {
        self.shaped(|s| s.shape_logs(request), Signal::Logs)
    }

    /// [`Pipeline::ingest_logs`] for access-log lines (`tally collect`'s
    /// files), each read as an OTLP log record whose body is the line.
    pub fn ingest_log_lines<'l>(&self, lines: impl IntoIterator<Item = &'l str>) -> ShapeReport {
        self.shaped(|s| s.shape_log_lines(lines), Signal::Logs)
    }

    /// Applies the policies in force to spans (head sampling by trace id,
    /// attributes): what they keep goes to the `traces` sinks of each
    /// span's project. Never waits.
    pub fn ingest_traces(&self, request: &ExportTraceServiceRequest) -> ShapeReport {
        self.shaped(|s| s.shape_traces(request), Signal::Traces)
    }

    fn shaped(&self, shape: impl FnOnce(&Shaper) -> Shaped, signal: Signal) -> ShapeReport {
        let routing = self.routing();
        let Some(shaper) = &routing.shaper else {
            return ShapeReport::default();
        };
        let shaped = shape(shaper);
        let mut report = ShapeReport {
            read: shaped.read,
            unattributed: shaped.unattributed,
            filtered: shaped.filtered,
            ..ShapeReport::default()
        };
        for (project, (request, n)) in shaped.signals {
            let handed = self.ingest_signal(&project, signal, Bytes::from(request), n);
            report.kept += n;
            report.handed += handed.handed;
            report.dropped += handed.dropped;
        }
        if !shaped.metrics.resource_metrics.is_empty() {
            report.metric_points = self.ingest(&shaped.metrics).handed;
        }
        report
    }

    /// Counts what shaping did in the `source_id` source component: read,
    /// kept (sent), and dropped as `unattributed` or by `policy`.
    pub fn count_shaped(&self, source_id: &str, report: &ShapeReport) {
        let source = self
            .registry
            .component(tally_delivery::ComponentKind::Source, source_id);
        source.add_received(report.read);
        source.add_sent(report.kept);
        if report.unattributed > 0 {
            source.add_dropped("unattributed", report.unattributed);
        }
        if report.filtered > 0 {
            source.add_dropped("policy", report.filtered);
        }
    }

    /// The status of `TelemetryPolicy` `namespace/name` as last resolved.
    pub fn policy_status(&self, namespace: &str, name: &str) -> Option<PolicyStatus> {
        self.routing()
            .shaper
            .as_ref()?
            .resolution()
            .status(namespace, name)
            .cloned()
    }

    /// The policies as last resolved.
    pub fn policies(&self) -> Option<Arc<Resolution>> {
        self.routing()
            .shaper
            .as_ref()
            .map(|s| Arc::clone(s.resolution()))
    }

    /// Hands an encoded OTLP logs or traces request (`items` log records or
    /// spans, all of `project`) to every logs or traces sink of the
    /// project's exporters, without waiting. Only exporters of `project`
    /// ever see it.
    pub fn ingest_signal(
        &self,
        project: &str,
        signal: Signal,
        request: Bytes,
        items: u64,
    ) -> IngestReport {
        let routing = self.routing();
        let mut report = IngestReport {
            points: items,
            ..IngestReport::default()
        };
        let mut refused_full = 0;
        for (owner, sink) in &routing.signals {
            if sink.signal != signal || &**owner != project {
                continue;
            }
            report.exporters += 1;
            match sink.offer(&request, items) {
                None => report.handed += items,
                Some(why) => {
                    report.dropped += items;
                    if why == DropReason::QueueFull {
                        refused_full += items;
                    }
                }
            }
        }
        report.overloaded =
            report.handed == 0 && refused_full > 0 && refused_full == report.dropped;
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
                old.insert(
                    runtime_id(key, &sink.config.name, sink.signal),
                    Arc::clone(sink),
                );
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
                    sinks =
                        self.exporter_sinks(&exporter, &snapshot.secrets, &mut old, &mut report);
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
        let mut routing = routing_of(valid, Arc::clone(&snapshot.index));
        routing.shaper = Some(Shaper::new(Arc::clone(&snapshot.policies), snapshot.index));
        let routing = Arc::new(routing);
        *exporters = next;
        *write(&self.routing) = Arc::clone(&routing);
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
                    let message = status.failing_message();
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
        *write(&self.routing) = Arc::new(Routing::default());
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

    /// The running sinks of `exporter`, one per (sink, signal): kept when
    /// unchanged (taken out of `old`), else started.
    fn exporter_sinks(
        &self,
        exporter: &Exporter,
        secrets: &crate::secret::Secrets,
        old: &mut HashMap<String, Arc<SinkRuntime>>,
        report: &mut UpdateReport,
    ) -> Vec<Arc<SinkRuntime>> {
        let key = &exporter.key;
        let mut signals = vec![Signal::Metrics];
        if exporter.logs {
            signals.push(Signal::Logs);
        }
        if exporter.traces {
            signals.push(Signal::Traces);
        }
        let mut sinks = Vec::new();
        for config in &exporter.sinks {
            let headers = resolve(config, &key.namespace, secrets);
            for &signal in &signals {
                let id = runtime_id(key, &config.name, signal);
                let runtime = match old.remove(&id) {
                    Some(running) if running.config == *config => {
                        report.kept += 1;
                        running
                    }
                    previous => {
                        if previous.is_some() {
                            report.stopped += 1;
                        }
                        report.started += 1;
                        self.start_sink(key, config, signal, previous)
                    }
                };
                runtime
                    .shared
                    .set_headers(headers.0.clone(), headers.1.clone());
                sinks.push(runtime);
            }
        }
        sinks
    }

    fn start_sink(
        &self,
        exporter: &ExporterKey,
        config: &SinkConfig,
        signal: Signal,
        previous: Option<Arc<SinkRuntime>>,
    ) -> Arc<SinkRuntime> {
        let id = runtime_id(exporter, &config.name, signal);
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
            signal,
            id: id.clone(),
            config: config.clone(),
            shared: Arc::clone(&shared),
            options: self.options.clone(),
            egress: self.egress.clone(),
            delta: (signal == Signal::Metrics && config.temporality == Temporality::Delta)
                .then(|| DeltaConverter::new(now_unix_nano())),
            batch: Vec::new(),
            batch_points: 0,
            batch_started: None,
        };
        let task = tokio::spawn(feeder.run(rx, wait_for));
        tracing::info!(sink = %id, endpoint = %config.metrics_url, "exporter sink started");
        Arc::new(SinkRuntime {
            signal,
            name: match signal {
                Signal::Metrics => config.name.clone(),
                other => format!("{}/{}", config.name, other.as_str()),
            },
            config: config.clone(),
            shared,
            tx,
            task: Mutex::new(Some(task)),
        })
    }
}
