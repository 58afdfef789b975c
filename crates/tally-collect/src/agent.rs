//! The edge agent's runtime (`tally collect`): Envoy access logs (files,
//! OTLP logs over HTTP and gRPC), Envoy admin connection gauges and the
//! gateway controller's connection lifecycle events in, gateway usage
//! events out to the ledger, exactly once.
//!
//! The binary only maps its flags to [`AgentOptions`]; this module does the
//! rest: [`AgentOptions::resolve`] → [`AgentConfig`] → [`Agent::start`]
//! (binds the listeners, opens every input) → [`Agent::run`] until the given
//! shutdown future completes. The HTTP listener is served by
//! [`tally_http::Server`] under the config file's `http:` limits.
//!
//! # Design
//! Every input (one per access-log file, one for the OTLP receivers, one
//! for Envoy's admin gauges, one for connection lifecycle events) is a
//! [`Collector`](crate::Collector) on its own
//! thread, with its own state store under `state_dir`. The collector's
//! fsync'd **outbox is the only durable buffer**: its thread hands at most
//! `max_in_flight` outbox events at a time to a `tally-delivery`
//! [`Sink`] with a bounded *memory* queue, and removes them from the outbox
//! only when the sink's outcome hook says the ledger answered 200 or 207 for
//! their batch. A crash loses at most the in-memory copies; the outbox still
//! holds them and they are sent again (same ids, the ledger dedupes). A
//! ledger outage therefore grows the outbox on disk, never memory. A second
//! on-disk queue would only store every event twice.
//!
//! The OTLP receivers (HTTP `POST /v1/logs` and gRPC `LogsService/Export`)
//! share one path: each log record becomes the same JSON access-log line
//! the file inputs read ([`record_line`]), appended to a spool file under
//! `state_dir/otlp/` and fsync'd before the answer; the OTLP input tails
//! that spool like any other file, so all inputs share one exactly-once
//! path. While the OTLP input's outbox or unread spool is over its limit,
//! exports get a retryable refusal (HTTP 503, gRPC `UNAVAILABLE`).
//!
//! The Envoy admin input samples `GET /stats` every interval and integrates
//! each mapped listener's `downstream_cx_active` gauge over time
//! ([`Collector::push_gauges`](crate::Collector::push_gauges)); the last
//! sample is checkpointed with the outbox, so a restart neither repeats nor
//! double counts an interval.
//!
//! The connection lifecycle receiver (`POST /v1/connections`, `--connections`)
//! takes the gateway controller's `connection.opened`/`.closed` CloudEvents
//! ([`crate::lifecycle`]), validates a request whole (`400
//! application/problem+json` listing every bad event) and spools it like
//! OTLP (fsync'd before `202`, `503` over the limits). Its input applies
//! each (`source`, `id`) once ([`Collector::open_lifecycle`](crate::Collector::open_lifecycle)),
//! checkpointing open connections and applied pairs with its outbox, and
//! moves time on by the agent's [`Clock`]: a window closes once the clock is
//! the grace past its end, with open connections billed up to it, so long
//! connections are billed every window without new events.
//!
//! Compute instances (issue 18): `--instances` takes the node controllers'
//! instance lifecycle CloudEvents (`POST /v1/instances/events`) and
//! forwards them to `tally serve` through a durable `tally-delivery` queue
//! ([`instances`]); `--instance-log PATTERN` tails the instances' log files
//! and ships them as OTLP logs ([`instance_logs`]). Neither goes through a
//! collector: serve stores them, deduplicated by id.

mod clock;
mod config;
mod connections;
mod envoy_admin;
mod grpc;
mod input;
mod instance_logs;
mod instances;
mod ledger;
mod otlp;
mod policies;
mod resources;
mod spool;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tally_delivery::{ComponentKind, Registry, Sink, SinkConfig};
use tally_telemetry::{Pipeline, PipelineOptions, QueueStorage};
use tokio::sync::watch;

pub use clock::Clock;
pub use config::{
    AgentConfig, AgentOptions, ConnectionsConfig, ConnectionsOptions, EnvoyAdminConfig,
    EnvoyAdminOptions, InstanceLogsConfig, InstanceLogsOptions, InstancesConfig, InstancesOptions,
    ListenerMapping, LogFilesOptions, LogSource,
};
pub use otlp::{LogsEncoding, access_log_lines, decode_logs_request, record_line};

use crate::collector::CollectError;
use envoy_admin::AdminSampler;
use input::{InputKind, InputRunner, InputSpec, input_dir};
use ledger::{Ack, LedgerEncoder, WarnOnce, route_outcome};
use resources::{SharedIndex, load_resources, update_pipeline, watch_resources};
use spool::{Limits, Spool};

/// What each way of metering connection seconds attributes, and when to
/// use which; `tally collect --help` shows it.
pub const CONNECTION_SECONDS_HELP: &str = "\
Connection seconds (networking.datumapis.com/gateway/connection-seconds) come from one of:
  - Request lines (no access_log_type, or NotSet): the request's `duration` (ms) counts
    in the window of its start_time, for the request's HTTPRoute. Right for ordinary
    HTTP traffic, where a request is one use of a connection or stream.
  - Periodic lines of long-lived streams: with Envoy's access_log_flush_interval, lines
    with access_log_type DownstreamPeriodic/DownstreamEnd (keyed by x-request-id) or
    TcpPeriodic/TcpConnectionEnd (keyed by connection_id) carry cumulative duration and
    bytes; each line adds only what its stream gained since its previous line, with the
    time split over the windows it spans. Use this for WebSockets, gRPC streams and TCP
    routes, so a week-long connection is billed every window and not once at its end.
    Start and upstream-side records add nothing (counted as no_usage_record).
    Without periodic logging a long-lived stream is billed once, when it ends, in the
    window it started in.
  - Envoy admin gauges (--envoy-admin URL with --envoy-listener LISTENER=NS/NAME): every
    interval the agent reads the downstream_cx_active gauge of each mapped listener
    (GET /stats) and bills gauge x interval to the mapped HTTPRoute and project: all
    connections open on a listener, whatever their requests, held at the last sampled
    value until the next sample; a gap over 3 intervals (agent or Envoy away) is not
    billed. Use it when access logs cannot carry connection time (no periodic logging,
    TCP/TLS passthrough listeners) or a listener belongs to one route. Do not combine it
    with request or periodic lines for the same route, or its time is counted twice.
  - Connection lifecycle events (--connections): the gateway controller, which sees
    connections open and close, POSTs CloudEvents to http://LISTEN/v1/connections
    (application/cloudevents+json, cloudevents-batch+json, json or x-ndjson, as the
    ledger takes them) of type networking.datumapis.com/gateway/connection.opened or
    .closed; `time` is the instant, `data.connection_id` names the connection (unique
    while it may be open), and an opened event names its route: `data.route_name`
    (httproute/NS/NAME/rule/I/...) or `data.httproute_namespace` + `data.httproute_name`,
    optionally `data.project_name`. Each connection bills open-to-close to its route.
    While open it is billed up to each window's end as the agent's clock passes that end
    by --connections-grace-secs, with or without new events, so a week-long WebSocket is
    billed every minute, not once at close; a close arriving later than the grace cannot
    take back time already billed (counted as connection_closed_late). A request is
    validated whole (400 application/problem+json lists every bad event; nothing is
    stored) and answered 202 only once fsync'd; retries are dropped by (source, id) for
    --connections-dedupe-horizon-secs (older events: 400 TOO_LATE). Events naming no
    HTTPRoute are counted (unknown_route_name, missing_route_name). Use it when the
    controller sees connections the access log cannot time (WebSockets, TCP/TLS
    passthrough) and per-connection attribution matters; not together with periodic
    lines or admin gauges for the same connections, and note that request lines of the
    same connections (a WebSocket's upgrade request logs its whole duration) would add
    their time again.
Milliseconds are summed exactly and sent exactly, as decimal seconds (1.5, 0.035); the
ledger sums decimals exactly, so no sub-second remainder waits for more traffic.

Exactly once: event ids are derived from (agent id, input, route, window, meter, closing
round), so reading the same input again from its start yields the same ids and the
ledger drops the repeats; the admin input checkpoints its last sample with its outbox,
the lifecycle input its open connections and the (source, id) pairs it applied.
The outbox under --state-dir is the durable buffer; events leave it only after the
ledger answered 200 or 207 for them.";

/// A failure of the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The options are not usable.
    #[error("{0}")]
    Config(String),
    /// A file, directory or socket operation failed.
    #[error("{context}: {error}")]
    Io {
        /// What the agent was doing.
        context: String,
        /// Why it failed.
        error: std::io::Error,
    },
    /// A collector failed.
    #[error("{context}: {error}")]
    Collect {
        /// Which input, doing what.
        context: String,
        /// Why it failed.
        error: CollectError,
    },
    /// The ledger sink did not start.
    #[error("starting the ledger sink: {0}")]
    Sink(String),
    /// An event could not be encoded.
    #[error("encoding an event: {0}")]
    Encode(serde_json::Error),
    /// A listener failed while serving.
    #[error("serving {what}: {error}")]
    Serve {
        /// Which listener.
        what: &'static str,
        /// Why it failed.
        error: String,
    },
    /// An input thread stopped with an error or panicked.
    #[error("input {input}: {message}")]
    Input {
        /// The input's name.
        input: String,
        /// What happened.
        message: String,
    },
}

/// What the HTTP handlers share.
#[derive(Clone)]
pub(crate) struct HttpState {
    registry: Registry,
    /// The OTLP receivers' spool, when `--otlp`.
    spool: Option<Arc<Spool>>,
    /// The lifecycle receiver, when `--connections`.
    connections: Option<Arc<connections::Receiver>>,
    /// The instance lifecycle forwarder, when `--instances`.
    instances: Option<instances::SharedForwarder>,
    /// What the HTTP listener counts (`tally_http_connections_*`).
    http_stats: tally_http::ConnectionStats,
}

/// A started agent: listeners bound, inputs running.
pub struct Agent {
    config: Arc<AgentConfig>,
    http: tokio::net::TcpListener,
    http_addr: SocketAddr,
    grpc: Option<(tokio::net::TcpListener, SocketAddr)>,
    state: HttpState,
    sink: Arc<Sink>,
    /// The telemetry pipeline, when `resources` is given.
    pipeline: Option<Arc<Pipeline>>,
    stop: Arc<AtomicBool>,
    threads: Vec<(String, std::thread::JoinHandle<Result<(), AgentError>>)>,
}

impl Agent {
    /// Opens every input, starts the ledger sink and binds the listeners.
    /// Must be called inside a multi-threaded tokio runtime.
    pub async fn start(config: AgentConfig) -> Result<Agent, AgentError> {
        let config = Arc::new(config);
        std::fs::create_dir_all(&config.state_dir).map_err(|error| AgentError::Io {
            context: format!(
                "creating the state directory {}",
                config.state_dir.display()
            ),
            error,
        })?;
        let registry = Registry::new();
        let index = Arc::new(SharedIndex::default());
        let mut pipeline = None;
        if let Some(dir) = &config.resources {
            let (loaded, stamp) = load_resources(dir);
            index.replace(loaded.index);
            let started = start_pipeline(&config, &registry)?;
            update_pipeline(&started, &loaded.set);
            pipeline = Some(started);
            tokio::spawn(watch_resources(
                dir.clone(),
                stamp,
                config.resources_poll,
                index.clone(),
                pipeline.clone(),
            ));
        }
        let Inputs {
            specs,
            spool,
            connections,
        } = input_specs(&config)?;
        // Bound before any input starts, so a taken port stops nothing.
        let (http, http_addr) = bind(config.listen).await?;
        let grpc = match (&spool, config.otlp_grpc_listen) {
            (Some(_), Some(address)) => Some(bind(address).await?),
            _ => None,
        };
        let (sink, senders) = start_sink(&config, &registry, specs.len())?;
        let instances = match &config.instances {
            Some(instances) => Some(Arc::new(instances::Forwarder::start(
                &config, instances, &registry,
            )?)),
            None => None,
        };
        let sink = Arc::new(sink);
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (number, spec) in specs.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            senders
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(tx);
            let name = spec.name.clone();
            let input = InputRunner {
                number,
                spec,
                config: config.clone(),
                registry: registry.clone(),
                index: index.clone(),
                sink: sink.clone(),
                pipeline: pipeline.clone(),
                runtime: tokio::runtime::Handle::current(),
                acks: rx,
                stop: stop.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("input-{number}"))
                .spawn(move || input.run())
                .map_err(|error| AgentError::Io {
                    context: format!("starting the thread of input {name}"),
                    error,
                })?;
            threads.push((name, thread));
        }
        if let Some(logs) = &config.instance_logs {
            let reader = instance_logs::InstanceLogs::start(&config, logs, &registry)?;
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name("instance-logs".to_owned())
                .spawn(move || reader.run(stop))
                .map_err(|error| AgentError::Io {
                    context: "starting the instance log reader".to_owned(),
                    error,
                })?;
            threads.push(("instance-logs".to_owned(), thread));
        }
        Ok(Agent {
            config,
            http,
            http_addr,
            grpc,
            state: HttpState {
                registry,
                spool,
                connections,
                instances,
                http_stats: tally_http::ConnectionStats::new(),
            },
            sink,
            pipeline,
            stop,
            threads,
        })
    }

    /// Where `/metrics`, `/healthz`, OTLP/HTTP `/v1/logs` and
    /// `/v1/connections` are served.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Where OTLP/gRPC is served, if it is.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc.as_ref().map(|(_, address)| *address)
    }

    /// Serves until `shutdown` completes or an input fails, then stops the
    /// inputs and the sink; unacknowledged events stay in the outboxes.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), AgentError> {
        let (stopping, stopped) = watch::channel(false);
        let until_stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(|| async { "ok" }))
            .route("/v1/logs", post(otlp::receive_logs))
            .route("/v1/connections", post(connections::receive))
            .route("/v1/instances/events", post(instances::receive))
            .with_state(self.state.clone());
        let server = tally_http::Server::new(self.config.http, connections::body_timed_out)
            .with_stats(self.state.http_stats.clone());
        let http = tokio::spawn(server.serve(self.http, app, until_stopped(stopped.clone())));
        let grpc = match (self.grpc, &self.state.spool) {
            (Some((listener, _)), Some(spool)) => {
                // Served under the same limits as HTTP: gRPC is HTTP/2.
                let app = tonic::service::Routes::new(grpc::LogsReceiver::service(spool.clone()))
                    .prepare()
                    .into_axum_router();
                let server = tally_http::Server::new(self.config.http, connections::body_timed_out)
                    .with_stats(self.state.http_stats.clone());
                Some(tokio::spawn(server.serve(
                    listener,
                    app,
                    until_stopped(stopped.clone()),
                )))
            }
            _ => None,
        };
        tracing::info!(http = %self.http_addr, state_dir = %self.config.state_dir.display(),
            ledger = %self.config.ledger, "collecting");
        let failed = Arc::new(Mutex::new(None::<AgentError>));
        let watcher = {
            let failed = failed.clone();
            let stop = self.stop.clone();
            let threads = self.threads;
            tokio::task::spawn_blocking(move || {
                for (name, thread) in threads {
                    let error = match thread.join() {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(AgentError::Input {
                            input: name.clone(),
                            message: e.to_string(),
                        }),
                        Err(_) => Some(AgentError::Input {
                            input: name.clone(),
                            message: "panicked".to_owned(),
                        }),
                    };
                    if let Some(error) = error {
                        tracing::error!(input = %name, error = %error, "input stopped");
                        *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
                        stop.store(true, Ordering::SeqCst);
                    }
                }
            })
        };
        let serving = async {
            match grpc {
                Some(grpc) => {
                    tokio::select! {
                        result = http => served("HTTP", result.map(Ok)),
                        result = grpc => served("OTLP/gRPC", result.map(Ok)),
                    }
                }
                None => served("HTTP", http.await.map(Ok)),
            }
        };
        let outcome = tokio::select! {
            () = shutdown => {
                tracing::info!("stopping");
                Ok(())
            }
            () = wait_for_stop(self.stop.clone()) => Ok(()),
            result = serving => result,
        };
        self.stop.store(true, Ordering::SeqCst);
        let _ = stopping.send(true);
        let _ = watcher.await;
        let report = self.sink.shutdown(Duration::from_secs(5)).await;
        if let Some(instances) = &self.state.instances {
            instances.shutdown(Duration::from_secs(5)).await;
        }
        if let Some(pipeline) = &self.pipeline {
            pipeline.shutdown().await;
        }
        tracing::info!(
            left_in_queue = report.left_in_queue,
            "stopped; unacknowledged events stay in the outbox"
        );
        outcome?;
        let failure = failed.lock().unwrap_or_else(|p| p.into_inner()).take();
        match failure {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// Starts an agent and runs it until `shutdown` completes.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    Agent::start(config).await?.run(shutdown).await
}

/// A server task ended by itself: an error, or a stop it was not asked for.
fn served(
    what: &'static str,
    result: Result<Result<(), String>, tokio::task::JoinError>,
) -> Result<(), AgentError> {
    let error = match result {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(e)) => e,
        Err(e) => e.to_string(),
    };
    Err(AgentError::Serve { what, error })
}

async fn bind(address: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), AgentError> {
    let io = |error| AgentError::Io {
        context: format!("listening on {address}"),
        error,
    };
    let listener = tokio::net::TcpListener::bind(address).await.map_err(io)?;
    let local = listener.local_addr().map_err(io)?;
    Ok((listener, local))
}

/// The inputs, and what the receivers write to.
struct Inputs {
    specs: Vec<InputSpec>,
    spool: Option<Arc<Spool>>,
    connections: Option<Arc<connections::Receiver>>,
}

/// One input per log file, one for the OTLP spool, one for Envoy's admin,
/// one for the lifecycle spool.
fn input_specs(config: &AgentConfig) -> Result<Inputs, AgentError> {
    let mut specs: Vec<InputSpec> = config
        .logs
        .iter()
        .map(|path| {
            let absolute = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            InputSpec {
                name: format!("file:{}", path.display()),
                kind: InputKind::File(path.clone()),
                state_dir: input_dir(&config.state_dir, &absolute),
                agent_key: format!("file:{}", absolute.display()),
            }
        })
        .collect();
    let spool = if config.otlp {
        let limits = Limits {
            max_outbox_events: config.otlp_max_outbox_events,
            max_unread_bytes: config.otlp_max_spool_bytes,
        };
        let (spec, spool) = spool_input(
            config,
            "otlp",
            "OTLP",
            "access.log",
            limits,
            InputKind::Otlp,
        )?;
        specs.push(spec);
        Some(spool)
    } else {
        None
    };
    if let Some(admin) = &config.envoy_admin {
        let sampler = AdminSampler::new(admin, config.request_timeout.min(admin.interval))?;
        tracing::info!(url = %sampler.url(), gauges = admin.gauges.len(), "sampling Envoy's admin stats");
        specs.push(InputSpec {
            name: "envoy-admin".to_owned(),
            kind: InputKind::EnvoyAdmin(sampler),
            state_dir: config.state_dir.join("envoy-admin"),
            agent_key: "envoy-admin".to_owned(),
        });
    }
    let connections = match &config.connections {
        Some(input) => {
            let limits = Limits {
                max_outbox_events: input.max_outbox_events,
                max_unread_bytes: input.max_spool_bytes,
            };
            let (spec, spool) = spool_input(
                config,
                "connections",
                "connection lifecycle",
                "connections.log",
                limits,
                InputKind::Connections,
            )?;
            specs.push(spec);
            Some(Arc::new(connections::Receiver {
                spool,
                clock: config.clock.clone(),
                dedupe_horizon_millis: input.dedupe_horizon_millis,
            }))
        }
        None => None,
    };
    Ok(Inputs {
        specs,
        spool,
        connections,
    })
}

/// A receiver's spool, `state_dir/<name>/spool/<file_name>`, and the input
/// `name` tailing it with its state in `state_dir/<name>/state`.
fn spool_input(
    config: &AgentConfig,
    name: &str,
    what: &'static str,
    file_name: &str,
    limits: Limits,
    kind: fn(Arc<Spool>) -> InputKind,
) -> Result<(InputSpec, Arc<Spool>), AgentError> {
    let dir = config.state_dir.join(name);
    let spool = Arc::new(Spool::open(what, &dir.join("spool"), file_name, limits)?);
    let spec = InputSpec {
        name: name.to_owned(),
        kind: kind(spool.clone()),
        state_dir: dir.join("state"),
        agent_key: name.to_owned(),
    };
    Ok((spec, spool))
}

/// Where the sink's outcome hook sends each input's acknowledgements.
type AckSenders = Arc<Mutex<Vec<mpsc::Sender<Ack>>>>;

/// The ledger sink, sized for `inputs` inputs.
fn start_sink(
    config: &AgentConfig,
    registry: &Registry,
    inputs: usize,
) -> Result<(Sink, AckSenders), AgentError> {
    let senders: AckSenders = Arc::default();
    let hook_senders = senders.clone();
    let mut sink_config = SinkConfig::new("ledger");
    sink_config.batch.max_items = config.batch_size;
    sink_config.batch.timeout = config.batch_timeout;
    sink_config.retry.max_attempts = u32::MAX;
    sink_config.retry.max_backoff = config.max_backoff;
    sink_config.retry.max_retry_after = config.max_backoff.max(Duration::from_secs(1));
    sink_config.retry.request_timeout = config.request_timeout;
    sink_config.retry = sink_config.retry.retry_all_5xx();
    sink_config.queue.max_items = (config.max_in_flight * inputs.max(1)) as u64;
    sink_config.queue.max_bytes = u64::MAX;
    let url = config
        .ledger
        .join("/v1/usage/events:batchIngest")
        .map_err(|e| AgentError::Config(format!("building the ingest URL: {e}")))?;
    let encoder = LedgerEncoder {
        url,
        token: config.token.clone(),
        rejected: registry.component(ComponentKind::Sink, "ledger"),
        warnings: WarnOnce::new(config.diagnostics_every),
    };
    let sink = Sink::builder(sink_config, encoder)
        .registry(registry)
        .on_outcome(move |outcome| route_outcome(&hook_senders, outcome))
        .start()
        .map_err(|e| AgentError::Sink(e.to_string()))?;
    Ok((sink, senders))
}

/// The telemetry pipeline: sinks queue on disk under
/// `state_dir/exporter-queues` and reach only what `egress` allows.
fn start_pipeline(config: &AgentConfig, registry: &Registry) -> Result<Arc<Pipeline>, AgentError> {
    let options = PipelineOptions {
        storage: QueueStorage::Disk {
            dir: config.state_dir.join("exporter-queues"),
            sync: false,
        },
        egress: config.egress.clone(),
        ..PipelineOptions::default()
    };
    Pipeline::new(registry.clone(), options)
        .map(Arc::new)
        .map_err(|e| AgentError::Sink(format!("starting the exporters' pipeline: {e}")))
}

async fn wait_for_stop(stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn metrics(State(state): State<HttpState>) -> Response {
    let mut out = state.registry.render();
    state.http_stats.render(&mut out);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}
