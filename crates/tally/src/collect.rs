//! `tally collect`: the edge agent. Envoy access logs (files, OTLP/HTTP logs)
//! in, gateway usage events out to the ledger, exactly once.
//!
//! # Design
//! Every input (one per access-log file, plus one for the OTLP receiver) is a
//! [`tally_collect::Collector`] on its own thread, with its own state store
//! under `--state-dir`. The collector's fsync'd **outbox is the only durable
//! buffer**: its thread hands at most `--max-in-flight` outbox events at a
//! time to a `tally-delivery` [`Sink`] with a bounded *memory* queue, and
//! removes them from the outbox only when the sink's outcome hook says the
//! ledger answered 200 or 207 for their batch. A crash loses at most the
//! in-memory copies; the outbox still holds them and they are sent again
//! (same ids, the ledger dedupes). A ledger outage therefore grows the outbox
//! on disk, never memory. A second on-disk queue would only store every event
//! twice.
//!
//! The OTLP receiver appends each log record, turned into the same JSON
//! access-log line the file inputs read, to a spool file under
//! `--state-dir/otlp/` and fsyncs it before answering; the OTLP input tails
//! that spool like any other file, so both inputs share one exactly-once path.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, mpsc};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use clap::Args;
use serde::Deserialize;
use tally_collect::{
    AgentIdentity, CollectError, Collector, CollectorConfig, EnrichmentIndex, LineProblem,
    WindowConfig,
};
use tally_delivery::{
    Answer, BatchOutcome, BatchResult, ComponentKind, ComponentMetrics, EncodeError, Encoder,
    HttpRequest, Item, Registry, Secret, Sink, SinkConfig, Verdict,
};
use tally_model::Manifest;

mod otlp;

/// How connection seconds are attributed; shown by `tally collect --help`.
const CONNECTION_SECONDS_HELP: &str = "\
Connection seconds (networking.datumapis.com/gateway/connection-seconds):
  - Request lines (no access_log_type, or NotSet): the request's `duration` (ms) counts
    in the window of its start_time. Right for ordinary HTTP traffic, where a request
    is one use of a connection or stream.
  - Periodic lines of long-lived streams: with Envoy's access_log_flush_interval, lines
    with access_log_type DownstreamPeriodic/DownstreamEnd (keyed by x-request-id) or
    TcpPeriodic/TcpConnectionEnd (keyed by connection_id) carry cumulative duration and
    bytes; each line adds only what its stream gained since its previous line, with the
    time split over the windows it spans. Use this for WebSockets, gRPC streams and TCP
    routes, so a week-long connection is billed every window and not once at its end.
    Start and upstream-side records add nothing (counted as no_usage_record).
  - Without periodic logging a long-lived stream is billed once, when it ends, in the
    window it started in.
Milliseconds are summed exactly; each route carries its sub-second remainder, so the
seconds of a route always add up to floor(total ms / 1000).

Exactly once: event ids are derived from (agent id, input, route, window, meter, closing
round), so reading the same input again from its start yields the same ids and the
ledger drops the repeats. The outbox under --state-dir is the durable buffer; events
leave it only after the ledger answered 200 or 207 for them.";

/// Options of `tally collect`. Flags override the config file, which
/// overrides the defaults.
#[derive(Debug, Args)]
#[command(after_long_help = CONNECTION_SECONDS_HELP)]
pub struct CollectArgs {
    /// YAML config file with the same options in camelCase (logs, stateDir,
    /// ledger, token, agentId, listen, otlp, resources, windowSecs,
    /// allowedLatenessSecs, idleFlushSecs, batchSize, batchTimeoutMs,
    /// maxInFlight, maxBackoffSecs, requestTimeoutSecs, pollIntervalMs,
    /// resourcesPollSecs, diagnosticsEverySecs). Flags given here override it.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,

    /// An Envoy JSON access-log file to tail, through rename and copytruncate
    /// rotation (repeat for several files; rotated siblings are `FILE*`).
    #[arg(long = "log", value_name = "FILE")]
    logs: Vec<PathBuf>,

    /// Where checkpoints and the outbox of unacknowledged events live (one
    /// store per input) [default: ./tally-collect-state].
    #[arg(long, value_name = "DIR", env = "TALLY_COLLECT_STATE_DIR")]
    state_dir: Option<PathBuf>,

    /// URL of the ledger; events go to `{URL}/v1/usage/events:batchIngest`
    /// with `Authorization: Bearer` from --token / TALLY_TOKEN [default: --server].
    #[arg(long, value_name = "URL", env = "TALLY_LEDGER")]
    ledger: Option<String>,

    /// This agent's id (e.g. the node name): part of every event id and of
    /// the events' `source` (`tally-collect/<ID>`). Keep it stable for a node
    /// [default: $NODE_NAME, else $HOSTNAME, else `agent`].
    #[arg(long, value_name = "ID")]
    agent_id: Option<String>,

    /// Address of the HTTP listener: `POST /v1/logs` (OTLP/HTTP, when --otlp),
    /// `GET /metrics`, `GET /healthz` [default: 127.0.0.1:4318].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,

    /// Receive Envoy's OpenTelemetry access logs on `POST /v1/logs`
    /// (protobuf or JSON, optionally gzip). gRPC (4317) is not served.
    #[arg(long)]
    otlp: bool,

    /// Directory of Kubernetes manifests (`HTTPRoute`, `Gateway`,
    /// `GatewayClass`; *.yaml, *.yml, *.json) that give events their region,
    /// gateway and gateway class dimensions; reloaded when files change.
    #[arg(long, value_name = "DIR")]
    resources: Option<PathBuf>,

    /// Window size in seconds; must not change for a state directory [default: 60].
    #[arg(long, value_name = "N")]
    window_secs: Option<u64>,

    /// How far behind the newest event time a window stays open, in seconds [default: 60].
    #[arg(long, value_name = "N")]
    allowed_lateness_secs: Option<u64>,

    /// Close every open window after an input has had no new line for this
    /// many seconds [default: 30].
    #[arg(long, value_name = "N")]
    idle_flush_secs: Option<u64>,

    /// Most events per request to the ledger [default: 500].
    #[arg(long, value_name = "N")]
    batch_size: Option<usize>,

    /// Longest time a partial batch waits before it is sent, in ms [default: 500].
    #[arg(long, value_name = "MS")]
    batch_timeout_ms: Option<u64>,

    /// Most events of one input handed to the sender and not yet
    /// acknowledged; bounds memory during a ledger outage [default: 5000].
    #[arg(long, value_name = "N")]
    max_in_flight: Option<usize>,

    /// Upper bound of the backoff between retries (429, 5xx, timeouts,
    /// connection errors), in seconds; batches are retried until delivered [default: 30].
    #[arg(long, value_name = "N")]
    max_backoff_secs: Option<u64>,

    /// Timeout of one request to the ledger, in seconds [default: 30].
    #[arg(long, value_name = "N")]
    request_timeout_secs: Option<u64>,

    /// How long an input waits for new lines before looking again, in ms [default: 200].
    #[arg(long, value_name = "MS")]
    poll_interval_ms: Option<u64>,

    /// How often --resources is checked for changes, in seconds [default: 5].
    #[arg(long, value_name = "N")]
    resources_poll_secs: Option<u64>,

    /// How often unattributable and malformed lines are summarised in the
    /// log, with examples, in seconds [default: 60].
    #[arg(long, value_name = "N")]
    diagnostics_every_secs: Option<u64>,
}

/// The config file: every option of [`CollectArgs`], in camelCase.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    logs: Vec<PathBuf>,
    state_dir: Option<PathBuf>,
    ledger: Option<String>,
    token: Option<String>,
    agent_id: Option<String>,
    listen: Option<SocketAddr>,
    #[serde(default)]
    otlp: bool,
    resources: Option<PathBuf>,
    window_secs: Option<u64>,
    allowed_lateness_secs: Option<u64>,
    idle_flush_secs: Option<u64>,
    batch_size: Option<usize>,
    batch_timeout_ms: Option<u64>,
    max_in_flight: Option<usize>,
    max_backoff_secs: Option<u64>,
    request_timeout_secs: Option<u64>,
    poll_interval_ms: Option<u64>,
    resources_poll_secs: Option<u64>,
    diagnostics_every_secs: Option<u64>,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
struct Settings {
    logs: Vec<PathBuf>,
    state_dir: PathBuf,
    ledger: reqwest::Url,
    token: Option<Secret>,
    agent_id: String,
    listen: SocketAddr,
    otlp: bool,
    resources: Option<PathBuf>,
    window: WindowConfig,
    idle_flush: Duration,
    batch_size: usize,
    batch_timeout: Duration,
    max_in_flight: usize,
    max_backoff: Duration,
    request_timeout: Duration,
    poll_interval: Duration,
    resources_poll: Duration,
    diagnostics_every: Duration,
}

fn settings(args: CollectArgs, server: String, token: Option<String>) -> anyhow::Result<Settings> {
    let file: FileConfig = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the config file {}", path.display()))?;
            serde_norway::from_str(&text)
                .with_context(|| format!("parsing the config file {}", path.display()))?
        }
        None => FileConfig::default(),
    };
    let logs = if args.logs.is_empty() {
        file.logs
    } else {
        args.logs
    };
    let otlp = args.otlp || file.otlp;
    if logs.is_empty() && !otlp {
        anyhow::bail!("nothing to collect: give --log FILE (one or more) or --otlp");
    }
    let ledger = args.ledger.or(file.ledger).unwrap_or(server);
    let ledger = reqwest::Url::parse(ledger.trim_end_matches('/'))
        .with_context(|| format!("the ledger URL {ledger:?} is not a URL"))?;
    let agent_id = args
        .agent_id
        .or(file.agent_id)
        .or_else(|| std::env::var("NODE_NAME").ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| "agent".to_owned());
    let secs = |flag: Option<u64>, file: Option<u64>, default: u64| {
        Duration::from_secs(flag.or(file).unwrap_or(default))
    };
    let millis = |flag: Option<u64>, file: Option<u64>, default: u64| {
        Duration::from_millis(flag.or(file).unwrap_or(default))
    };
    let window_secs = args.window_secs.or(file.window_secs).unwrap_or(60).max(1);
    let lateness = args
        .allowed_lateness_secs
        .or(file.allowed_lateness_secs)
        .unwrap_or(60);
    let window = WindowConfig {
        window_millis: i64::try_from(window_secs.saturating_mul(1000)).unwrap_or(i64::MAX),
        allowed_lateness_millis: i64::try_from(lateness.saturating_mul(1000)).unwrap_or(i64::MAX),
        ..WindowConfig::default()
    };
    Ok(Settings {
        logs,
        state_dir: args
            .state_dir
            .or(file.state_dir)
            .unwrap_or_else(|| PathBuf::from("tally-collect-state")),
        ledger,
        token: token.or(file.token).map(Secret::new),
        agent_id,
        listen: args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 4318))),
        otlp,
        resources: args.resources.or(file.resources),
        window,
        idle_flush: secs(args.idle_flush_secs, file.idle_flush_secs, 30),
        batch_size: args.batch_size.or(file.batch_size).unwrap_or(500).max(1),
        batch_timeout: millis(args.batch_timeout_ms, file.batch_timeout_ms, 500),
        max_in_flight: args
            .max_in_flight
            .or(file.max_in_flight)
            .unwrap_or(5000)
            .max(1),
        max_backoff: secs(args.max_backoff_secs, file.max_backoff_secs, 30),
        request_timeout: secs(args.request_timeout_secs, file.request_timeout_secs, 30),
        poll_interval: millis(args.poll_interval_ms, file.poll_interval_ms, 200),
        resources_poll: secs(args.resources_poll_secs, file.resources_poll_secs, 5),
        diagnostics_every: secs(args.diagnostics_every_secs, file.diagnostics_every_secs, 60),
    })
}

/// Runs the agent until SIGINT or SIGTERM.
pub fn run(args: CollectArgs, server: String, token: Option<String>) -> anyhow::Result<()> {
    let settings = settings(args, server, token)?;
    init_logging()?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(collect(settings))
}

fn init_logging() -> anyhow::Result<()> {
    let directives = std::env::var("RUST_LOG")
        .ok()
        .filter(|d| !d.trim().is_empty())
        .unwrap_or_else(|| "info,fjall=warn,lsm_tree=warn".to_owned());
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .with_context(|| format!("invalid RUST_LOG {directives:?}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init()
        .map_err(|e| anyhow::anyhow!("setting up logging: {e}"))
}

/// The enrichment index every input uses, with a generation bumped on reload.
#[derive(Default)]
struct SharedIndex {
    generation: AtomicU64,
    index: RwLock<Arc<EnrichmentIndex>>,
}

impl SharedIndex {
    fn replace(&self, index: EnrichmentIndex) {
        *self
            .index
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(index);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn current(&self) -> (u64, Arc<EnrichmentIndex>) {
        let generation = self.generation.load(Ordering::SeqCst);
        let index = self
            .index
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        (generation, index)
    }
}

/// What the outcome hook tells an input about its events.
enum Ack {
    /// The ledger answered 200/207: forget them.
    Delivered(Vec<String>),
    /// Their batch failed for good (e.g. 401): keep them in the outbox and
    /// try again later.
    Failed { ids: Vec<String>, dead_letter: u64 },
}

/// One input: a name, the file it tails and where its state lives.
struct InputSpec {
    name: String,
    log_path: PathBuf,
    state_dir: PathBuf,
    agent_key: String,
}

/// The state directory of the input reading `path`: a readable, stable name.
fn input_dir(state_dir: &Path, path: &Path) -> PathBuf {
    let name: String = path
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    state_dir.join("inputs").join(name.trim_matches('_'))
}

async fn collect(settings: Settings) -> anyhow::Result<()> {
    let settings = Arc::new(settings);
    std::fs::create_dir_all(&settings.state_dir).with_context(|| {
        format!(
            "creating the state directory {}",
            settings.state_dir.display()
        )
    })?;
    let registry = Registry::new();
    let index = Arc::new(SharedIndex::default());
    if let Some(dir) = &settings.resources {
        let (loaded, stamp) = load_resources(dir);
        index.replace(loaded);
        tokio::spawn(watch_resources(
            dir.clone(),
            stamp,
            settings.resources_poll,
            index.clone(),
        ));
    }

    let mut specs: Vec<InputSpec> = settings
        .logs
        .iter()
        .map(|path| {
            let absolute = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            InputSpec {
                name: format!("file:{}", path.display()),
                log_path: path.clone(),
                state_dir: input_dir(&settings.state_dir, &absolute),
                agent_key: format!("file:{}", absolute.display()),
            }
        })
        .collect();
    let spool = if settings.otlp {
        let dir = settings.state_dir.join("otlp");
        let spool = otlp::Spool::open(&dir.join("spool"))?;
        specs.push(InputSpec {
            name: "otlp".to_owned(),
            log_path: spool.path().to_owned(),
            state_dir: dir.join("state"),
            agent_key: "otlp".to_owned(),
        });
        Some(Arc::new(spool))
    } else {
        None
    };

    // The sink; its outcome hook routes acknowledgements to their input.
    let senders: Arc<Mutex<Vec<mpsc::Sender<Ack>>>> = Arc::default();
    let hook_senders = senders.clone();
    let mut config = SinkConfig::new("ledger");
    config.batch.max_items = settings.batch_size;
    config.batch.timeout = settings.batch_timeout;
    config.retry.max_attempts = u32::MAX;
    config.retry.max_backoff = settings.max_backoff;
    config.retry.max_retry_after = settings.max_backoff.max(Duration::from_secs(1));
    config.retry.request_timeout = settings.request_timeout;
    config.retry = config.retry.retry_all_5xx();
    config.queue.max_items = (settings.max_in_flight * specs.len().max(1)) as u64;
    config.queue.max_bytes = u64::MAX;
    let url = settings
        .ledger
        .join("/v1/usage/events:batchIngest")
        .context("building the ingest URL")?;
    let encoder = LedgerEncoder {
        url,
        token: settings.token.clone(),
        rejected: registry.component(ComponentKind::Sink, "ledger"),
    };
    let sink = Arc::new(
        Sink::builder(config, encoder)
            .registry(&registry)
            .on_outcome(move |outcome| route_outcome(&hook_senders, outcome))
            .start()
            .context("starting the ledger sink")?,
    );

    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for (number, spec) in specs.into_iter().enumerate() {
        let (tx, rx) = mpsc::channel();
        senders
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(tx);
        let spool = if spec.agent_key == "otlp" {
            spool.clone()
        } else {
            None
        };
        let input = InputRunner {
            number,
            spec,
            settings: settings.clone(),
            registry: registry.clone(),
            index: index.clone(),
            sink: sink.clone(),
            runtime: tokio::runtime::Handle::current(),
            acks: rx,
            stop: stop.clone(),
            spool,
        };
        let name = input.spec.name.clone();
        let thread = std::thread::Builder::new()
            .name(format!("input-{number}"))
            .spawn(move || input.run())
            .with_context(|| format!("starting the thread of input {name}"))?;
        threads.push((name, thread));
    }

    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listening on {}", settings.listen))?;
    let address = listener.local_addr().context("reading the local address")?;
    let state = HttpState {
        registry: registry.clone(),
        spool,
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/logs", post(otlp::receive_logs))
        .with_state(state);
    println!(
        "tally collect listening on http://{address} (state dir {}, ledger {})",
        settings.state_dir.display(),
        settings.ledger
    );
    let _ = std::io::stdout().flush();
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown_signal());
    let failed = Arc::new(Mutex::new(None::<String>));
    let watcher = {
        let failed = failed.clone();
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || {
            for (name, thread) in threads {
                let result = thread.join();
                let message = match result {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(format!("input {name}: {e:#}")),
                    Err(_) => Some(format!("input {name} panicked")),
                };
                if let Some(message) = message {
                    tracing::error!(input = %name, error = %message, "input stopped");
                    *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(message);
                    stop.store(true, Ordering::SeqCst);
                }
            }
        })
    };
    let stop_for_server = stop.clone();
    tokio::select! {
        result = server => {
            result.context("serving HTTP")?;
        }
        () = wait_for_stop(stop_for_server) => {}
    }
    stop.store(true, Ordering::SeqCst);
    let _ = watcher.await;
    let report = sink.shutdown(Duration::from_secs(5)).await;
    tracing::info!(
        left_in_queue = report.left_in_queue,
        "stopped; unacknowledged events stay in the outbox"
    );
    let failure = failed.lock().unwrap_or_else(|p| p.into_inner()).take();
    match failure {
        Some(message) => Err(anyhow::anyhow!(message)),
        None => Ok(()),
    }
}

async fn wait_for_stop(stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
    tracing::info!("stopping");
}

fn route_outcome(senders: &Mutex<Vec<mpsc::Sender<Ack>>>, outcome: &BatchOutcome) {
    let mut by_input: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for key in &outcome.keys {
        let key = String::from_utf8_lossy(key);
        if let Some((input, id)) = key.split_once(':')
            && let Ok(input) = input.parse::<usize>()
        {
            by_input.entry(input).or_default().push(id.to_owned());
        }
    }
    let senders = senders.lock().unwrap_or_else(|p| p.into_inner());
    for (input, ids) in by_input {
        let ack = match &outcome.result {
            BatchResult::Delivered { .. } => Ack::Delivered(ids),
            BatchResult::DeadLettered { id, .. } => Ack::Failed {
                ids,
                dead_letter: *id,
            },
        };
        if let Some(sender) = senders.get(input) {
            // A stopped input forgets nothing: its outbox still holds them.
            let _ = sender.send(ack);
        }
    }
}

/// Turns outbox events into `POST /v1/usage/events:batchIngest`.
struct LedgerEncoder {
    url: reqwest::Url,
    token: Option<Secret>,
    rejected: Arc<ComponentMetrics>,
}

#[derive(Deserialize)]
struct UsageAnswer {
    #[serde(default)]
    rejected: Vec<RejectedEvent>,
}

#[derive(Deserialize)]
struct RejectedEvent {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    detail: String,
}

impl Encoder for LedgerEncoder {
    fn encode(&self, items: &[Item]) -> Result<HttpRequest, EncodeError> {
        let mut body =
            Vec::with_capacity(items.iter().map(|i| i.data.len() + 1).sum::<usize>() + 2);
        body.push(b'[');
        for (n, item) in items.iter().enumerate() {
            if n > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&item.data);
        }
        body.push(b']');
        let mut request = HttpRequest::post(self.url.clone())
            .header(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            )
            .body(body)
            .gzip(true);
        if let Some(token) = &self.token {
            let value = Secret::new(format!("Bearer {}", token.expose()));
            request = request.secret_header(header::AUTHORIZATION, &value)?;
        }
        Ok(request)
    }

    fn classify(&self, answer: &Answer<'_>) -> Verdict {
        if answer.status != StatusCode::MULTI_STATUS {
            return answer.default_verdict();
        }
        let rejected = match serde_json::from_slice::<UsageAnswer>(answer.body) {
            Ok(parsed) => parsed.rejected,
            Err(e) => {
                tracing::warn!(error = %e, "the ledger's 207 answer is not readable; counting none as rejected");
                Vec::new()
            }
        };
        for event in &rejected {
            tracing::warn!(
                id = event.id.as_deref().unwrap_or("-"),
                reason = %event.reason,
                detail = %event.detail,
                "the ledger rejected a usage event; it is not sent again"
            );
            self.rejected
                .add_error(&format!("rejected_{}", event.reason));
        }
        Verdict::Delivered {
            rejected: rejected.len() as u64,
        }
    }
}

/// Runs one input on its own thread.
struct InputRunner {
    number: usize,
    spec: InputSpec,
    settings: Arc<Settings>,
    registry: Registry,
    index: Arc<SharedIndex>,
    sink: Arc<Sink>,
    runtime: tokio::runtime::Handle,
    acks: mpsc::Receiver<Ack>,
    stop: Arc<AtomicBool>,
    spool: Option<Arc<otlp::Spool>>,
}

/// Counters already reported to the metrics registry.
#[derive(Default)]
struct Reported {
    lines: u64,
    events: u64,
    problems: HashMap<LineProblem, u64>,
    summarised: u64,
}

impl InputRunner {
    fn run(self) -> anyhow::Result<()> {
        let settings = &self.settings;
        let agent = AgentIdentity {
            agent_id: format!("{}/{}", settings.agent_id, self.spec.agent_key),
            source: format!("tally-collect/{}", settings.agent_id),
        };
        let mut config = CollectorConfig::new(
            self.spec.log_path.clone(),
            self.spec.state_dir.clone(),
            agent,
        );
        config.window = settings.window;
        std::fs::create_dir_all(&self.spec.state_dir).with_context(|| {
            format!(
                "creating the state directory {}",
                self.spec.state_dir.display()
            )
        })?;
        let mut collector = Collector::open(config)
            .with_context(|| format!("opening the collector of {}", self.spec.name))?;
        let source = self
            .registry
            .component(ComponentKind::Source, &self.spec.name);
        let aggregate = self.registry.component(
            ComponentKind::Processor,
            &format!("aggregate:{}", self.spec.name),
        );
        let mut reported = Reported::default();
        let mut in_flight: HashSet<String> = HashSet::new();
        let mut generation = u64::MAX;
        let mut last_line = Instant::now();
        let mut flushed = false;
        let mut dirty = true;
        let mut paused_until: Option<Instant> = None;
        let mut last_summary = Instant::now();
        while !self.stop.load(Ordering::SeqCst) {
            while let Ok(ack) = self.acks.try_recv() {
                self.handle_ack(ack, &mut collector, &mut in_flight, &mut paused_until)?;
                dirty = true;
            }
            let (current, index) = self.index.current();
            if current != generation {
                *collector.enrichment_mut() = (*index).clone();
                generation = current;
            }
            let report = match collector.poll() {
                Ok(report) => report,
                Err(CollectError::Tail(e)) => {
                    tracing::warn!(input = %self.spec.name, error = %e, "reading the log failed; trying again");
                    std::thread::sleep(settings.poll_interval);
                    continue;
                }
                Err(e) => return Err(e).context("collecting"),
            };
            if report.lines > 0 {
                last_line = Instant::now();
                flushed = false;
            } else if !flushed && last_line.elapsed() >= settings.idle_flush {
                let flush = collector.flush().context("closing idle windows")?;
                flushed = true;
                dirty |= flush.events > 0;
                if flush.events > 0 {
                    tracing::debug!(input = %self.spec.name, events = flush.events, "idle: closed every open window");
                }
            }
            dirty |= report.events > 0;
            if let Some(spool) = &self.spool {
                spool.rotate_if_read(&collector)?;
            }
            let paused = paused_until.is_some_and(|until| Instant::now() < until);
            if dirty && !paused && in_flight.len() < settings.max_in_flight {
                dirty = self.ship(&collector, &mut in_flight)?;
            }
            self.report(&collector, &source, &aggregate, &mut reported);
            if last_summary.elapsed() >= settings.diagnostics_every {
                last_summary = Instant::now();
                self.summarise(&collector, &mut reported);
            }
            if report.lines == 0 {
                match self.acks.recv_timeout(settings.poll_interval) {
                    Ok(ack) => {
                        self.handle_ack(ack, &mut collector, &mut in_flight, &mut paused_until)?;
                        dirty = true;
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        Ok(())
    }

    fn handle_ack(
        &self,
        ack: Ack,
        collector: &mut Collector,
        in_flight: &mut HashSet<String>,
        paused_until: &mut Option<Instant>,
    ) -> anyhow::Result<()> {
        match ack {
            Ack::Delivered(ids) => {
                collector
                    .acknowledge(ids.iter().map(String::as_str))
                    .context("removing acknowledged events from the outbox")?;
                for id in &ids {
                    in_flight.remove(id);
                }
            }
            Ack::Failed { ids, dead_letter } => {
                tracing::error!(input = %self.spec.name, events = ids.len(),
                    "the ledger refused a batch for good (see the sink's log); the events stay in the outbox and are sent again in 30 s");
                for id in &ids {
                    in_flight.remove(id);
                }
                let sink = self.sink.clone();
                let _ = self
                    .runtime
                    .block_on(async move { sink.delete_dead_letter(dead_letter).await });
                *paused_until = Some(Instant::now() + Duration::from_secs(30));
            }
        }
        Ok(())
    }

    /// Hands outbox events not yet in flight to the sink. Returns whether
    /// the outbox may hold more.
    fn ship(&self, collector: &Collector, in_flight: &mut HashSet<String>) -> anyhow::Result<bool> {
        let room = self.settings.max_in_flight - in_flight.len();
        let limit = in_flight.len() + room;
        let events = collector.pending(limit).context("reading the outbox")?;
        let more = events.len() >= limit;
        let mut items = Vec::new();
        for event in events {
            if in_flight.contains(&event.id) {
                continue;
            }
            let data = serde_json::to_vec(&event).context("encoding an event")?;
            items.push(Item::new(format!("{}:{}", self.number, event.id), data));
            in_flight.insert(event.id);
        }
        if items.is_empty() {
            return Ok(more);
        }
        let sink = self.sink.clone();
        let result = self
            .runtime
            .block_on(async move { sink.enqueue_all(items).await });
        if let Err(e) = result {
            // Only when the sink is stopping; the outbox keeps the events.
            tracing::debug!(input = %self.spec.name, error = %e, "the sink took no more events");
            self.stop.store(true, Ordering::SeqCst);
        }
        Ok(more)
    }

    fn report(
        &self,
        collector: &Collector,
        source: &ComponentMetrics,
        aggregate: &ComponentMetrics,
        reported: &mut Reported,
    ) {
        let stats = collector.stats();
        source.add_received(stats.received_lines.saturating_sub(reported.lines));
        aggregate.add_received(stats.received_lines.saturating_sub(reported.lines));
        reported.lines = stats.received_lines;
        aggregate.add_sent(stats.emitted_events.saturating_sub(reported.events));
        reported.events = stats.emitted_events;
        aggregate.set_queue_depth(stats.outbox_depth as u64);
        for (problem, count) in &collector.diagnostics().counts {
            let before = reported.problems.entry(*problem).or_default();
            if *count > *before {
                source.add_dropped(problem.as_str(), count - *before);
                *before = *count;
            }
        }
    }

    /// The periodic log line about lines that could not be used.
    fn summarise(&self, collector: &Collector, reported: &mut Reported) {
        let diagnostics = collector.diagnostics();
        let total = diagnostics.malformed() + diagnostics.unattributable();
        if total == reported.summarised {
            return;
        }
        reported.summarised = total;
        let examples: Vec<&str> = diagnostics
            .examples
            .iter()
            .filter(|(problem, _)| problem.is_unattributable())
            .flat_map(|(_, lines)| lines.iter().map(String::as_str))
            .take(3)
            .collect();
        let counts: Vec<String> = diagnostics
            .counts
            .iter()
            .map(|(problem, n)| format!("{}={n}", problem.as_str()))
            .collect();
        tracing::warn!(
            input = %self.spec.name,
            unattributable = diagnostics.unattributable(),
            malformed = diagnostics.malformed(),
            counts = %counts.join(","),
            examples = ?examples,
            "lines that could not be attributed to an HTTPRoute or parsed"
        );
    }
}

/// `(path, modified, length)` of every manifest file: reload when it changes.
type Stamp = Vec<(PathBuf, Option<SystemTime>, u64)>;

fn manifest_files(dir: &Path) -> Stamp {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Stamp = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            )
        })
        .filter_map(|p| {
            let meta = std::fs::metadata(&p).ok()?;
            meta.is_file()
                .then(|| (p, meta.modified().ok(), meta.len()))
        })
        .collect();
    files.sort();
    files
}

/// Loads every HTTPRoute, Gateway and GatewayClass of `dir`; other kinds
/// are skipped, unreadable files logged.
fn load_resources(dir: &Path) -> (EnrichmentIndex, Stamp) {
    let stamp = manifest_files(dir);
    let mut index = EnrichmentIndex::default();
    let mut loaded = 0;
    for (path, _, _) in &stamp {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read a resource file");
                continue;
            }
        };
        let manifests = match Manifest::parse_documents(&text) {
            Ok(manifests) => manifests,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot parse a resource file");
                continue;
            }
        };
        for manifest in manifests {
            if !matches!(
                manifest.kind.as_str(),
                "HTTPRoute" | "Gateway" | "GatewayClass"
            ) {
                continue;
            }
            match index.upsert(&manifest) {
                Ok(()) => loaded += 1,
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "skipping a resource");
                }
            }
        }
    }
    tracing::info!(dir = %dir.display(), resources = loaded, "gateway resources loaded");
    (index, stamp)
}

async fn watch_resources(dir: PathBuf, mut stamp: Stamp, every: Duration, index: Arc<SharedIndex>) {
    let every = every.max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        let dir_for_scan = dir.clone();
        let Ok(current) = tokio::task::spawn_blocking(move || manifest_files(&dir_for_scan)).await
        else {
            continue;
        };
        if current == stamp {
            continue;
        }
        let dir_for_load = dir.clone();
        if let Ok((loaded, new_stamp)) =
            tokio::task::spawn_blocking(move || load_resources(&dir_for_load)).await
        {
            index.replace(loaded);
            stamp = new_stamp;
        }
    }
}

/// What the HTTP handlers share.
#[derive(Clone)]
pub(crate) struct HttpState {
    registry: Registry,
    spool: Option<Arc<otlp::Spool>>,
}

async fn metrics(State(state): State<HttpState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.registry.render(),
    )
        .into_response()
}

/// The body of a request, gunzipped if it says so, at most `limit` bytes.
pub(crate) fn decode_body(headers: &HeaderMap, body: Bytes, limit: u64) -> Result<Vec<u8>, String> {
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("gzip"));
    if !gzip {
        return Ok(body.to_vec());
    }
    let mut out = Vec::new();
    let decoder = flate2::read::GzDecoder::new(&body[..]);
    let read = std::io::Read::read_to_end(&mut std::io::Read::take(decoder, limit + 1), &mut out)
        .map_err(|e| format!("the gzip body cannot be decoded: {e}"))?;
    if read as u64 > limit {
        return Err(format!("the body is larger than {limit} bytes decoded"));
    }
    Ok(out)
}
