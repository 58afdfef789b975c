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
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use serde::Serialize;
use tally_delivery::{ComponentKind, ComponentMetrics, EgressGuard, Registry};
use tally_model::Manifest;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::delta::DeltaConverter;
use crate::exporter::{
    Condition, Exporter, ExporterKey, SinkConfig, Temporality, accepted_condition,
};
use crate::feeder::{Feeder, now_unix_nano};
use crate::index::ResourceIndex;
use crate::otlp;
use crate::pull::Puller;
use crate::route::{RouteStats, Router};
use crate::routing::{Routing, SharedRouting, current};
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
