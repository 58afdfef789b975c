//! `tally collect`: flags → [`tally_collect::agent`]. The agent itself
//! (receivers, inputs, the ledger sink) lives in `tally-collect`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tally_collect::agent::{
    self, Agent, AgentOptions, ConnectionsOptions, EnvoyAdminOptions, InstanceLogsOptions,
    InstancesOptions, ListenerMapping, LogFilesOptions,
};

/// Options of `tally collect`. Flags override the config file, which
/// overrides the defaults.
#[derive(Debug, Args)]
#[command(after_long_help = agent::CONNECTION_SECONDS_HELP)]
pub struct CollectArgs {
    /// YAML config file with the same options in camelCase (logs, stateDir,
    /// ledger, token, agentId, listen, otlp, otlpGrpc, otlpGrpcListen,
    /// otlpMaxOutboxEvents, otlpMaxSpoolBytes, resources, windowSecs,
    /// allowedLatenessSecs, idleFlushSecs, batchSize, batchTimeoutMs,
    /// maxInFlight, maxBackoffSecs, requestTimeoutSecs, pollIntervalMs,
    /// resourcesPollSecs, diagnosticsEverySecs, envoyAdmin: {url,
    /// intervalSecs, listeners: [{listener | stat, route: NS/NAME,
    /// project}]}, connections: {enabled, graceSecs, dedupeHorizonSecs,
    /// maxOutboxEvents, maxSpoolBytes}, instances: {enabled, url,
    /// maxQueuedEvents, maxQueuedBytes}, instanceLogs: {files: [{path,
    /// format: cri|plain, project}], url, maxFiles, maxQueuedBytes}, and,
    /// in the file only, http:
    /// {headerReadTimeout, idleTimeout, bodyReadTimeout, drainTimeout,
    /// maxConnections} and egress: {allow: [CIDR...]}, what exporters'
    /// sinks may reach besides public addresses). Flags given here override
    /// it.
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
    /// `POST /v1/connections` (when --connections), `POST
    /// /v1/instances/events` (when --instances), `GET /metrics`,
    /// `GET /healthz` [default: 127.0.0.1:4318].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,

    /// Receive Envoy's OpenTelemetry access logs: OTLP/gRPC
    /// `LogsService/Export` on --otlp-grpc-listen (what Envoy Gateway's
    /// OpenTelemetry sink speaks) and OTLP/HTTP `POST /v1/logs` on --listen
    /// (protobuf or JSON, optionally gzip).
    #[arg(long)]
    otlp: bool,

    /// Address of the OTLP/gRPC logs receiver [default: 127.0.0.1:4317].
    #[arg(long, value_name = "ADDR")]
    otlp_grpc_listen: Option<SocketAddr>,

    /// With --otlp, serve OTLP/HTTP only (no gRPC listener).
    #[arg(long)]
    no_otlp_grpc: bool,

    /// OTLP exports are refused with a retryable answer (HTTP 503, gRPC
    /// UNAVAILABLE) while the OTLP input's outbox holds more undelivered
    /// events than this, e.g. during a ledger outage [default: 1000000].
    #[arg(long, value_name = "N")]
    otlp_max_outbox_events: Option<u64>,

    /// Likewise while more received OTLP bytes than this wait to be
    /// aggregated [default: 268435456].
    #[arg(long, value_name = "BYTES")]
    otlp_max_spool_bytes: Option<u64>,

    /// Sample connection seconds from this Envoy admin interface (e.g.
    /// http://127.0.0.1:19000): `GET /stats`, the `downstream_cx_active`
    /// gauges of the listeners given with --envoy-listener.
    #[arg(long, value_name = "URL")]
    envoy_admin: Option<String>,

    /// Seconds between samples of --envoy-admin [default: 10].
    #[arg(long, value_name = "N")]
    envoy_admin_interval_secs: Option<u64>,

    /// Bill a listener's open connections to an HTTPRoute:
    /// `LISTENER=NAMESPACE/NAME[@PROJECT]` for the gauge
    /// `listener.LISTENER.downstream_cx_active`, or a whole gauge name such as
    /// `http.PREFIX.downstream_cx_active=NAMESPACE/NAME` (repeat; the project
    /// defaults to the namespace).
    #[arg(long = "envoy-listener", value_name = "MAPPING", value_parser = ListenerMapping::parse_flag)]
    envoy_listeners: Vec<ListenerMapping>,

    /// Receive the gateway controller's connection lifecycle events on
    /// `POST /v1/connections` (CloudEvents 1.0 of type
    /// networking.datumapis.com/gateway/connection.opened and .closed; one
    /// event, a batch or NDJSON, as the ledger takes them) and bill each
    /// connection's time to its HTTPRoute every window while it is open
    /// (implied by the other --connections-* flags).
    #[arg(long)]
    connections: bool,

    /// How far the agent's clock must be past a window's end before the
    /// lifecycle input closes it, billing open connections up to it; a close
    /// arriving later cannot take that time back [default: --allowed-lateness-secs].
    #[arg(long, value_name = "N")]
    connections_grace_secs: Option<u64>,

    /// How long applied lifecycle events (source, id) are remembered to drop
    /// retries, in event time; older events are refused (TOO_LATE) [default: 86400].
    #[arg(long, value_name = "N")]
    connections_dedupe_horizon_secs: Option<u64>,

    /// Lifecycle requests are refused with 503 while that input's outbox
    /// holds more undelivered events than this [default: 1000000].
    #[arg(long, value_name = "N")]
    connections_max_outbox_events: Option<u64>,

    /// Likewise while more received lifecycle bytes than this wait to be
    /// applied [default: 268435456].
    #[arg(long, value_name = "BYTES")]
    connections_max_spool_bytes: Option<u64>,

    /// Receive compute instance lifecycle CloudEvents from the node's
    /// controllers on `POST /v1/instances/events` (validated as `tally serve`
    /// validates them; 202 once fsync'd) and forward them to
    /// `{--instances-url}/api/v1/instances/events`, retrying until serve
    /// takes them (implied by the other --instances-* flags).
    #[arg(long)]
    instances: bool,

    /// Base URL of `tally serve` for lifecycle events [default: --ledger].
    #[arg(long, value_name = "URL")]
    instances_url: Option<String>,

    /// Lifecycle requests are refused with 503 while this many events wait
    /// on disk to be forwarded [default: 100000].
    #[arg(long, value_name = "N")]
    instances_max_queued_events: Option<u64>,

    /// Tail instance log files matching PATTERN and ship them to `tally
    /// serve` (`{--ledger}/v1/logs`, OTLP) as the logs of the instance the
    /// path names: captures {project}, {instance}, {stream}, wildcard `*`,
    /// e.g. /var/log/pods/{project}_{instance}_*/*/*.log (kubelet's layout,
    /// CRI lines; `P` pieces are joined into one record). Repeat for
    /// several; the config file's instanceLogs section also takes plain
    /// files and a fixed project.
    #[arg(long = "instance-log", value_name = "PATTERN")]
    instance_logs: Vec<String>,

    /// Read "now" from this file (Unix ms or RFC 3339, read again on every
    /// look) instead of the system clock: for tests and replays.
    #[arg(long, value_name = "FILE", hide = true)]
    clock_file: Option<PathBuf>,

    /// Directory of Kubernetes manifests (*.yaml, *.yml, *.json), reloaded
    /// when files change: `HTTPRoute`, `Gateway` and `GatewayClass` give
    /// events their region, gateway and gateway class dimensions;
    /// `Namespace`, `TelemetryPolicy`, `Exporter` and `Secret` send the
    /// access-log lines read, shaped by the policies, to the exporters
    /// (metering still counts every line).
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

    /// How often unusable lines (one warning per cause) and events the
    /// ledger rejected (one per reason) are summarised in the log, in
    /// seconds [default: 60].
    #[arg(long, value_name = "N")]
    diagnostics_every_secs: Option<u64>,
}

impl CollectArgs {
    /// The options the flags set (unset flags are `None`).
    fn options(self, token: Option<String>) -> (Option<PathBuf>, AgentOptions) {
        let admin_given = self.envoy_admin.is_some()
            || self.envoy_admin_interval_secs.is_some()
            || !self.envoy_listeners.is_empty();
        let envoy_admin = admin_given.then_some(EnvoyAdminOptions {
            url: self.envoy_admin,
            interval_secs: self.envoy_admin_interval_secs,
            listeners: self.envoy_listeners,
        });
        let connections_given = self.connections
            || self.connections_grace_secs.is_some()
            || self.connections_dedupe_horizon_secs.is_some()
            || self.connections_max_outbox_events.is_some()
            || self.connections_max_spool_bytes.is_some();
        let connections = connections_given.then_some(ConnectionsOptions {
            enabled: self.connections.then_some(true),
            grace_secs: self.connections_grace_secs,
            dedupe_horizon_secs: self.connections_dedupe_horizon_secs,
            max_outbox_events: self.connections_max_outbox_events,
            max_spool_bytes: self.connections_max_spool_bytes,
        });
        let instances_given = self.instances
            || self.instances_url.is_some()
            || self.instances_max_queued_events.is_some();
        let instances = instances_given.then_some(InstancesOptions {
            enabled: self.instances.then_some(true),
            url: self.instances_url,
            max_queued_events: self.instances_max_queued_events,
            max_queued_bytes: None,
        });
        let instance_logs = (!self.instance_logs.is_empty()).then(|| InstanceLogsOptions {
            files: self
                .instance_logs
                .into_iter()
                .map(|path| LogFilesOptions {
                    path,
                    format: None,
                    project: None,
                })
                .collect(),
            ..InstanceLogsOptions::default()
        });
        let options = AgentOptions {
            logs: self.logs,
            state_dir: self.state_dir,
            ledger: self.ledger,
            token,
            agent_id: self.agent_id,
            listen: self.listen,
            otlp: self.otlp.then_some(true),
            otlp_grpc: self.no_otlp_grpc.then_some(false),
            otlp_grpc_listen: self.otlp_grpc_listen,
            otlp_max_outbox_events: self.otlp_max_outbox_events,
            otlp_max_spool_bytes: self.otlp_max_spool_bytes,
            resources: self.resources,
            window_secs: self.window_secs,
            allowed_lateness_secs: self.allowed_lateness_secs,
            idle_flush_secs: self.idle_flush_secs,
            batch_size: self.batch_size,
            batch_timeout_ms: self.batch_timeout_ms,
            max_in_flight: self.max_in_flight,
            max_backoff_secs: self.max_backoff_secs,
            request_timeout_secs: self.request_timeout_secs,
            poll_interval_ms: self.poll_interval_ms,
            resources_poll_secs: self.resources_poll_secs,
            diagnostics_every_secs: self.diagnostics_every_secs,
            envoy_admin,
            connections,
            instances,
            instance_logs,
            clock_file: self.clock_file,
            http: None,
            egress: None,
        };
        (self.config, options)
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub fn run(args: CollectArgs, server: String, token: Option<String>) -> anyhow::Result<()> {
    let (file, flags) = args.options(token);
    let options = match file {
        Some(path) => AgentOptions::load(&path)?.overlay(flags),
        None => flags,
    };
    let config = options.resolve(&server)?;
    init_logging()?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(async move {
            let state_dir = config.state_dir.clone();
            let ledger = config.ledger.clone();
            let agent = Agent::start(config).await?;
            let grpc = agent
                .grpc_addr()
                .map(|a| format!(", OTLP/gRPC on {a}"))
                .unwrap_or_default();
            println!(
                "tally collect listening on http://{}{grpc} (state dir {}, ledger {ledger})",
                agent.http_addr(),
                state_dir.display(),
            );
            agent.run(shutdown_signal()).await
        })?;
    Ok(())
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

/// SIGINT or SIGTERM.
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
}
