//! The agent's options: a YAML file and flags of the same names, resolved
//! into an [`AgentConfig`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tally_delivery::{EgressConfig, EgressPolicy, Secret};
use tally_http::{HttpConfig, Limits};

use super::AgentError;
use super::clock::Clock;
use crate::aggregate::WindowConfig;
use crate::instance_log::{LogFormat, PathPattern};
use crate::route::RouteKey;

/// Every option of the agent, each optional: what a config file or the
/// command line says. [`AgentOptions::overlay`] puts flags over a file;
/// [`AgentOptions::resolve`] fills in the defaults.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentOptions {
    /// Envoy JSON access-log files to tail.
    #[serde(default)]
    pub logs: Vec<PathBuf>,
    /// Where checkpoints and outboxes live.
    pub state_dir: Option<PathBuf>,
    /// The ledger's base URL.
    pub ledger: Option<String>,
    /// Bearer token for the ledger.
    pub token: Option<String>,
    /// This agent's id, part of every event id.
    pub agent_id: Option<String>,
    /// The HTTP listener (`/v1/logs`, `/v1/connections`, `/metrics`,
    /// `/healthz`).
    pub listen: Option<SocketAddr>,
    /// Receive OTLP logs (HTTP on `listen`, gRPC on `otlpGrpcListen`).
    pub otlp: Option<bool>,
    /// Serve OTLP/gRPC too when `otlp` is on (default true).
    pub otlp_grpc: Option<bool>,
    /// Address of the OTLP/gRPC logs receiver.
    pub otlp_grpc_listen: Option<SocketAddr>,
    /// OTLP exports are refused (retryably) while the OTLP input's outbox
    /// holds more events than this.
    pub otlp_max_outbox_events: Option<u64>,
    /// OTLP exports are refused (retryably) while more than this many
    /// received bytes are not yet read into the outbox.
    pub otlp_max_spool_bytes: Option<u64>,
    /// Directory of manifests: HTTPRoutes, Gateways and GatewayClasses
    /// (enrichment), and Namespaces, `TelemetryPolicy`s, `Exporter`s and
    /// their `Secret`s (access logs through the policies to exporters).
    pub resources: Option<PathBuf>,
    /// Window size, seconds.
    pub window_secs: Option<u64>,
    /// How long a window stays open behind the newest event time, seconds.
    pub allowed_lateness_secs: Option<u64>,
    /// Close every open window after this long without input, seconds.
    pub idle_flush_secs: Option<u64>,
    /// Most events per request to the ledger.
    pub batch_size: Option<usize>,
    /// Longest wait of a partial batch, ms.
    pub batch_timeout_ms: Option<u64>,
    /// Most unacknowledged events per input handed to the sender.
    pub max_in_flight: Option<usize>,
    /// Upper bound of the retry backoff, seconds.
    pub max_backoff_secs: Option<u64>,
    /// Timeout of one request to the ledger, seconds.
    pub request_timeout_secs: Option<u64>,
    /// Wait between looks for new lines, ms.
    pub poll_interval_ms: Option<u64>,
    /// How often `resources` is checked for changes, seconds.
    pub resources_poll_secs: Option<u64>,
    /// How often unusable lines are summarised in the log, seconds.
    pub diagnostics_every_secs: Option<u64>,
    /// Connection seconds sampled from an Envoy admin endpoint.
    pub envoy_admin: Option<EnvoyAdminOptions>,
    /// Connection seconds from the gateway controller's connection
    /// lifecycle events (`POST /v1/connections`).
    pub connections: Option<ConnectionsOptions>,
    /// Forward compute instance lifecycle CloudEvents, which controllers on
    /// the node post to `POST /v1/instances/events`, to `tally serve`.
    pub instances: Option<InstancesOptions>,
    /// Tail instance log files (stdout/stderr of compute instances) and ship
    /// them to `tally serve` as OTLP logs.
    pub instance_logs: Option<InstanceLogsOptions>,
    /// Read "now" from this file (Unix ms or RFC 3339) instead of the
    /// system clock: for tests and replays of the lifecycle input.
    pub clock_file: Option<PathBuf>,
    /// Timeouts and the connection limit of the HTTP listener (config
    /// file only).
    pub http: Option<HttpConfig>,
    /// Addresses exporters may reach besides global unicast ones, as in
    /// `tally serve`'s config (config file only).
    pub egress: Option<EgressConfig>,
}

/// The `connections` section: the connection lifecycle receiver
/// (`POST /v1/connections`) and its input.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionsOptions {
    /// Receive lifecycle events (default true when the section is given).
    pub enabled: Option<bool>,
    /// How far the agent's clock must be past a window's end before the
    /// window closes and open connections are billed up to it, seconds
    /// (default: `allowedLatenessSecs`). A close arriving later than this
    /// cannot take back time already billed.
    pub grace_secs: Option<u64>,
    /// How long, in event time behind the watermark, applied (source, id)
    /// pairs are remembered, seconds (default 86400); older events are
    /// refused (`TOO_LATE`).
    pub dedupe_horizon_secs: Option<u64>,
    /// Requests are refused (503) while the input's outbox holds more
    /// events than this.
    pub max_outbox_events: Option<u64>,
    /// Requests are refused (503) while more than this many received bytes
    /// are not yet read into the outbox.
    pub max_spool_bytes: Option<u64>,
}

/// The resolved connection lifecycle input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionsConfig {
    /// Window settings of this input: the agent's window size, with the
    /// grace as allowed lateness.
    pub window: WindowConfig,
    /// How long applied (source, id) pairs are remembered, ms.
    pub dedupe_horizon_millis: i64,
    /// Back-pressure threshold on the input's outbox, events.
    pub max_outbox_events: u64,
    /// Back-pressure threshold on received but unread bytes.
    pub max_spool_bytes: u64,
}

/// The `instances` section: the compute instance lifecycle receiver
/// (`POST /v1/instances/events`) and its forwarding to `tally serve`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InstancesOptions {
    /// Receive and forward lifecycle events (default true when the section
    /// is given).
    pub enabled: Option<bool>,
    /// Base URL of `tally serve`; events go to
    /// `{URL}/api/v1/instances/events` (default: the ledger URL).
    pub url: Option<String>,
    /// Requests are refused (503) while this many events wait on disk to be
    /// forwarded (default 100,000).
    pub max_queued_events: Option<u64>,
    /// Requests are refused (503) while this many bytes of events wait on
    /// disk to be forwarded (default 64 MiB).
    pub max_queued_bytes: Option<u64>,
}

/// The resolved lifecycle forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstancesConfig {
    /// `tally serve`'s base URL.
    pub url: reqwest::Url,
    /// Back-pressure threshold on the forwarding queue, events.
    pub max_queued_events: u64,
    /// Back-pressure threshold on the forwarding queue, bytes.
    pub max_queued_bytes: u64,
}

/// The `instanceLogs` section: which files hold which instance's logs,
/// and where they go.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InstanceLogsOptions {
    /// Path patterns ([`crate::instance_log`]), each with its format.
    #[serde(default)]
    pub files: Vec<LogFilesOptions>,
    /// Base URL of `tally serve`; records go to `{URL}/v1/logs` (default:
    /// the ledger URL).
    pub url: Option<String>,
    /// Most files followed at once (default 10,000).
    pub max_files: Option<usize>,
    /// Reading pauses while this many bytes of records wait on disk to be
    /// sent (default 256 MiB).
    pub max_queued_bytes: Option<u64>,
}

/// One pattern of the `instanceLogs` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LogFilesOptions {
    /// e.g. `/var/log/pods/{project}_{instance}_*/*/*.log`.
    pub path: String,
    /// `cri` (default) or `plain`.
    pub format: Option<LogFormat>,
    /// The project, when the path has no `{project}`.
    pub project: Option<String>,
}

/// One resolved pattern.
#[derive(Debug, Clone)]
pub struct LogSource {
    pub pattern: PathPattern,
    pub format: LogFormat,
    pub project: Option<String>,
}

/// The resolved `instanceLogs` section.
#[derive(Debug, Clone)]
pub struct InstanceLogsConfig {
    pub sources: Vec<LogSource>,
    /// `tally serve`'s base URL.
    pub url: reqwest::Url,
    pub max_files: usize,
    pub max_queued_bytes: u64,
}

/// The `envoyAdmin` section: which admin endpoint to sample and how its
/// listeners map to HTTPRoutes.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvoyAdminOptions {
    /// Base URL of Envoy's admin interface, e.g. `http://127.0.0.1:19000`.
    pub url: Option<String>,
    /// Seconds between samples (default 10).
    pub interval_secs: Option<u64>,
    /// Which gauge bills to which route.
    #[serde(default)]
    pub listeners: Vec<ListenerMapping>,
}

/// One gauge → route mapping of the `envoyAdmin` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerMapping {
    /// A listener's stat name: the gauge is
    /// `listener.<listener>.downstream_cx_active`.
    pub listener: Option<String>,
    /// Or the full name of any `downstream_cx_active` gauge, e.g.
    /// `http.<stat_prefix>.downstream_cx_active`.
    pub stat: Option<String>,
    /// The HTTPRoute the connection seconds bill to: `<namespace>/<name>`.
    pub route: String,
    /// The project; the route's namespace when absent.
    pub project: Option<String>,
}

impl ListenerMapping {
    /// Parses the flag form `LISTENER=NAMESPACE/NAME[@PROJECT]`; a
    /// `LISTENER` containing `downstream_cx_active` is a full stat name.
    pub fn parse_flag(text: &str) -> Result<ListenerMapping, String> {
        let (gauge, target) = text
            .split_once('=')
            .ok_or_else(|| format!("{text:?} is not LISTENER=NAMESPACE/NAME[@PROJECT]"))?;
        let (route, project) = match target.split_once('@') {
            Some((route, project)) => (route, Some(project.to_owned())),
            None => (target, None),
        };
        let (listener, stat) = if gauge.ends_with("downstream_cx_active") {
            (None, Some(gauge.to_owned()))
        } else {
            (Some(gauge.to_owned()), None)
        };
        let mapping = ListenerMapping {
            listener,
            stat,
            route: route.to_owned(),
            project,
        };
        mapping.resolve().map(|_| mapping)
    }

    /// The gauge's full stat name and the route it bills to.
    pub fn resolve(&self) -> Result<(String, RouteKey), String> {
        let stat = match (&self.listener, &self.stat) {
            (Some(listener), None) if !listener.is_empty() => {
                format!("listener.{listener}.downstream_cx_active")
            }
            (None, Some(stat)) if !stat.is_empty() => stat.clone(),
            _ => {
                return Err(format!(
                    "the mapping to {:?} needs exactly one of listener and stat",
                    self.route
                ));
            }
        };
        let (namespace, name) = self
            .route
            .split_once('/')
            .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
            .ok_or_else(|| format!("the route {:?} is not NAMESPACE/NAME", self.route))?;
        let project = self
            .project
            .clone()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| namespace.to_owned());
        Ok((
            stat,
            RouteKey {
                project,
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            },
        ))
    }
}

/// The resolved Envoy admin sampler.
#[derive(Debug, Clone)]
pub struct EnvoyAdminConfig {
    /// Base URL of the admin interface.
    pub url: reqwest::Url,
    /// Time between samples.
    pub interval: Duration,
    /// Full gauge name → route, in configuration order.
    pub gauges: Vec<(String, RouteKey)>,
}

/// The resolved configuration of the agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Access-log files to tail.
    pub logs: Vec<PathBuf>,
    /// Where checkpoints and outboxes live.
    pub state_dir: PathBuf,
    /// The ledger's base URL.
    pub ledger: reqwest::Url,
    /// Bearer token for the ledger; never logged.
    pub token: Option<Secret>,
    /// This agent's id.
    pub agent_id: String,
    /// The HTTP listener.
    pub listen: SocketAddr,
    /// Whether OTLP logs are received.
    pub otlp: bool,
    /// Where OTLP/gRPC is served, when `otlp` is on; `None`: not served.
    pub otlp_grpc_listen: Option<SocketAddr>,
    /// Back-pressure threshold on the OTLP input's outbox, events.
    pub otlp_max_outbox_events: u64,
    /// Back-pressure threshold on received but unread OTLP bytes.
    pub otlp_max_spool_bytes: u64,
    /// Directory of gateway manifests.
    pub resources: Option<PathBuf>,
    /// Window size and lateness.
    pub window: WindowConfig,
    /// Close every open window after this long without input.
    pub idle_flush: Duration,
    /// Most events per request to the ledger.
    pub batch_size: usize,
    /// Longest wait of a partial batch.
    pub batch_timeout: Duration,
    /// Most unacknowledged events per input handed to the sender.
    pub max_in_flight: usize,
    /// Upper bound of the retry backoff.
    pub max_backoff: Duration,
    /// Timeout of one request to the ledger.
    pub request_timeout: Duration,
    /// Wait between looks for new lines.
    pub poll_interval: Duration,
    /// How often `resources` is checked for changes.
    pub resources_poll: Duration,
    /// How often unusable lines are summarised in the log.
    pub diagnostics_every: Duration,
    /// Connection seconds from Envoy's admin `/stats`.
    pub envoy_admin: Option<EnvoyAdminConfig>,
    /// Connection seconds from lifecycle events, when received.
    pub connections: Option<ConnectionsConfig>,
    /// Lifecycle events forwarded to `tally serve`, when received.
    pub instances: Option<InstancesConfig>,
    /// Instance log files shipped to `tally serve`, when configured.
    pub instance_logs: Option<InstanceLogsConfig>,
    /// Where "now" is read (the lifecycle input's clock).
    pub clock: Clock,
    /// What the HTTP listener enforces.
    pub http: Limits,
    /// What exporters' sinks may reach.
    pub egress: EgressPolicy,
}

impl AgentOptions {
    /// Reads a YAML config file.
    pub fn load(path: &Path) -> Result<AgentOptions, AgentError> {
        let text = std::fs::read_to_string(path).map_err(|error| AgentError::Io {
            context: format!("reading the config file {}", path.display()),
            error,
        })?;
        serde_norway::from_str(&text).map_err(|e| {
            AgentError::Config(format!("parsing the config file {}: {e}", path.display()))
        })
    }

    /// These options with every option `flags` sets put over them.
    pub fn overlay(self, flags: AgentOptions) -> AgentOptions {
        let admin = match (self.envoy_admin, flags.envoy_admin) {
            (Some(file), Some(flags)) => Some(EnvoyAdminOptions {
                url: flags.url.or(file.url),
                interval_secs: flags.interval_secs.or(file.interval_secs),
                listeners: if flags.listeners.is_empty() {
                    file.listeners
                } else {
                    flags.listeners
                },
            }),
            (file, flags) => flags.or(file),
        };
        let connections = match (self.connections, flags.connections) {
            (Some(file), Some(flags)) => Some(ConnectionsOptions {
                enabled: flags.enabled.or(file.enabled),
                grace_secs: flags.grace_secs.or(file.grace_secs),
                dedupe_horizon_secs: flags.dedupe_horizon_secs.or(file.dedupe_horizon_secs),
                max_outbox_events: flags.max_outbox_events.or(file.max_outbox_events),
                max_spool_bytes: flags.max_spool_bytes.or(file.max_spool_bytes),
            }),
            (file, flags) => flags.or(file),
        };
        let instances = match (self.instances, flags.instances) {
            (Some(file), Some(flags)) => Some(InstancesOptions {
                enabled: flags.enabled.or(file.enabled),
                url: flags.url.or(file.url),
                max_queued_events: flags.max_queued_events.or(file.max_queued_events),
                max_queued_bytes: flags.max_queued_bytes.or(file.max_queued_bytes),
            }),
            (file, flags) => flags.or(file),
        };
        let instance_logs = match (self.instance_logs, flags.instance_logs) {
            (Some(file), Some(flags)) => Some(InstanceLogsOptions {
                files: if flags.files.is_empty() {
                    file.files
                } else {
                    flags.files
                },
                url: flags.url.or(file.url),
                max_files: flags.max_files.or(file.max_files),
                max_queued_bytes: flags.max_queued_bytes.or(file.max_queued_bytes),
            }),
            (file, flags) => flags.or(file),
        };
        AgentOptions {
            logs: if flags.logs.is_empty() {
                self.logs
            } else {
                flags.logs
            },
            state_dir: flags.state_dir.or(self.state_dir),
            ledger: flags.ledger.or(self.ledger),
            token: flags.token.or(self.token),
            agent_id: flags.agent_id.or(self.agent_id),
            listen: flags.listen.or(self.listen),
            otlp: flags.otlp.or(self.otlp),
            otlp_grpc: flags.otlp_grpc.or(self.otlp_grpc),
            otlp_grpc_listen: flags.otlp_grpc_listen.or(self.otlp_grpc_listen),
            otlp_max_outbox_events: flags.otlp_max_outbox_events.or(self.otlp_max_outbox_events),
            otlp_max_spool_bytes: flags.otlp_max_spool_bytes.or(self.otlp_max_spool_bytes),
            resources: flags.resources.or(self.resources),
            window_secs: flags.window_secs.or(self.window_secs),
            allowed_lateness_secs: flags.allowed_lateness_secs.or(self.allowed_lateness_secs),
            idle_flush_secs: flags.idle_flush_secs.or(self.idle_flush_secs),
            batch_size: flags.batch_size.or(self.batch_size),
            batch_timeout_ms: flags.batch_timeout_ms.or(self.batch_timeout_ms),
            max_in_flight: flags.max_in_flight.or(self.max_in_flight),
            max_backoff_secs: flags.max_backoff_secs.or(self.max_backoff_secs),
            request_timeout_secs: flags.request_timeout_secs.or(self.request_timeout_secs),
            poll_interval_ms: flags.poll_interval_ms.or(self.poll_interval_ms),
            resources_poll_secs: flags.resources_poll_secs.or(self.resources_poll_secs),
            diagnostics_every_secs: flags.diagnostics_every_secs.or(self.diagnostics_every_secs),
            envoy_admin: admin,
            connections,
            instances,
            instance_logs,
            clock_file: flags.clock_file.or(self.clock_file),
            http: flags.http.or(self.http),
            egress: flags.egress.or(self.egress),
        }
    }

    /// Fills in the defaults; `default_ledger` is used when no ledger is
    /// given.
    pub fn resolve(self, default_ledger: &str) -> Result<AgentConfig, AgentError> {
        let otlp = self.otlp.unwrap_or(false);
        let envoy_admin = self.envoy_admin.map(resolve_admin).transpose()?;
        let window_secs = self.window_secs.unwrap_or(60).max(1);
        let lateness = self.allowed_lateness_secs.unwrap_or(60);
        let window = WindowConfig {
            window_millis: millis_of(window_secs),
            allowed_lateness_millis: millis_of(lateness),
            ..WindowConfig::default()
        };
        let connections = self
            .connections
            .filter(|c| c.enabled.unwrap_or(true))
            .map(|c| ConnectionsConfig {
                window: WindowConfig {
                    allowed_lateness_millis: c
                        .grace_secs
                        .map_or(window.allowed_lateness_millis, millis_of),
                    ..window
                },
                dedupe_horizon_millis: millis_of(c.dedupe_horizon_secs.unwrap_or(86_400).max(60)),
                max_outbox_events: c.max_outbox_events.unwrap_or(1_000_000).max(1),
                max_spool_bytes: c.max_spool_bytes.unwrap_or(256 << 20).max(1),
            });
        let ledger = self.ledger.unwrap_or_else(|| default_ledger.to_owned());
        let ledger = reqwest::Url::parse(ledger.trim_end_matches('/'))
            .map_err(|e| AgentError::Config(format!("the ledger URL {ledger:?}: {e}")))?;
        let instances = self
            .instances
            .filter(|i| i.enabled.unwrap_or(true))
            .map(|i| resolve_instances(i, &ledger))
            .transpose()?;
        let instance_logs = self
            .instance_logs
            .filter(|l| !l.files.is_empty())
            .map(|l| resolve_instance_logs(l, &ledger))
            .transpose()?;
        if self.logs.is_empty()
            && !otlp
            && envoy_admin.is_none()
            && connections.is_none()
            && instances.is_none()
            && instance_logs.is_none()
        {
            return Err(AgentError::Config(
                "nothing to collect: give --log FILE (one or more), --otlp, --envoy-admin URL, --connections, --instances or --instance-logs"
                    .to_owned(),
            ));
        }
        let agent_id = self
            .agent_id
            .or_else(|| std::env::var("NODE_NAME").ok())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| "agent".to_owned());
        let secs = |value: Option<u64>, default: u64| Duration::from_secs(value.unwrap_or(default));
        let millis =
            |value: Option<u64>, default: u64| Duration::from_millis(value.unwrap_or(default));
        let http = (self.http.unwrap_or_default().limits())
            .map_err(|e| AgentError::Config(e.to_string()))?;
        let egress = (self.egress.unwrap_or_default().policy())
            .map_err(|e| AgentError::Config(e.to_string()))?;
        let otlp_grpc_listen = (otlp && self.otlp_grpc.unwrap_or(true)).then(|| {
            self.otlp_grpc_listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 4317)))
        });
        Ok(AgentConfig {
            logs: self.logs,
            state_dir: self
                .state_dir
                .unwrap_or_else(|| PathBuf::from("tally-collect-state")),
            ledger,
            token: self.token.map(Secret::new),
            agent_id,
            listen: self
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 4318))),
            otlp,
            otlp_grpc_listen,
            otlp_max_outbox_events: self.otlp_max_outbox_events.unwrap_or(1_000_000).max(1),
            otlp_max_spool_bytes: self.otlp_max_spool_bytes.unwrap_or(256 << 20).max(1),
            resources: self.resources,
            window,
            idle_flush: secs(self.idle_flush_secs, 30),
            batch_size: self.batch_size.unwrap_or(500).max(1),
            batch_timeout: millis(self.batch_timeout_ms, 500),
            max_in_flight: self.max_in_flight.unwrap_or(5000).max(1),
            max_backoff: secs(self.max_backoff_secs, 30),
            request_timeout: secs(self.request_timeout_secs, 30),
            poll_interval: millis(self.poll_interval_ms, 200),
            resources_poll: secs(self.resources_poll_secs, 5),
            diagnostics_every: secs(self.diagnostics_every_secs, 60),
            envoy_admin,
            connections,
            instances,
            instance_logs,
            clock: self.clock_file.map_or(Clock::System, Clock::File),
            http,
            egress,
        })
    }
}

/// Seconds as milliseconds, saturating.
fn millis_of(secs: u64) -> i64 {
    i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)
}

fn resolve_instances(
    options: InstancesOptions,
    ledger: &reqwest::Url,
) -> Result<InstancesConfig, AgentError> {
    let url = match options.url {
        Some(url) => reqwest::Url::parse(url.trim_end_matches('/'))
            .map_err(|e| AgentError::Config(format!("the tally serve URL {url:?}: {e}")))?,
        None => ledger.clone(),
    };
    Ok(InstancesConfig {
        url,
        max_queued_events: options.max_queued_events.unwrap_or(100_000).max(1),
        max_queued_bytes: options.max_queued_bytes.unwrap_or(64 << 20).max(1),
    })
}

fn resolve_instance_logs(
    options: InstanceLogsOptions,
    ledger: &reqwest::Url,
) -> Result<InstanceLogsConfig, AgentError> {
    let url = match options.url {
        Some(url) => reqwest::Url::parse(url.trim_end_matches('/'))
            .map_err(|e| AgentError::Config(format!("the instance logs URL {url:?}: {e}")))?,
        None => ledger.clone(),
    };
    let mut sources = Vec::new();
    for files in options.files {
        let pattern = PathPattern::new(&files.path).map_err(AgentError::Config)?;
        let project = files.project.filter(|p| !p.is_empty());
        if !files.path.contains("{project}") && project.is_none() {
            return Err(AgentError::Config(format!(
                "the log path pattern {:?} has no {{project}}: give its project",
                files.path
            )));
        }
        sources.push(LogSource {
            pattern,
            format: files.format.unwrap_or_default(),
            project,
        });
    }
    Ok(InstanceLogsConfig {
        sources,
        url,
        max_files: options.max_files.unwrap_or(10_000).max(1),
        // At least 64 MiB: one read (256 KiB of text, at worst 128 Ki
        // one-byte records of about 170 bytes queued) always fits.
        max_queued_bytes: options.max_queued_bytes.unwrap_or(256 << 20).max(64 << 20),
    })
}

fn resolve_admin(options: EnvoyAdminOptions) -> Result<EnvoyAdminConfig, AgentError> {
    let url = options.url.ok_or_else(|| {
        AgentError::Config("envoyAdmin needs the url of Envoy's admin interface".to_owned())
    })?;
    let url = reqwest::Url::parse(&url)
        .map_err(|e| AgentError::Config(format!("the Envoy admin URL {url:?}: {e}")))?;
    let mut gauges = Vec::new();
    for mapping in &options.listeners {
        let (stat, route) = mapping.resolve().map_err(AgentError::Config)?;
        if gauges.iter().any(|(known, _)| *known == stat) {
            return Err(AgentError::Config(format!(
                "the gauge {stat} is mapped twice"
            )));
        }
        gauges.push((stat, route));
    }
    if gauges.is_empty() {
        return Err(AgentError::Config(
            "envoyAdmin needs at least one listener mapping (--envoy-listener LISTENER=NAMESPACE/NAME)"
                .to_owned(),
        ));
    }
    Ok(EnvoyAdminConfig {
        url,
        interval: Duration::from_secs(options.interval_secs.unwrap_or(10).max(1)),
        gauges,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() {
        let file: AgentOptions = serde_norway::from_str(
            "logs: [/var/log/a.log]\nledger: http://file:1\nwindowSecs: 120\notlp: true\n\
             envoyAdmin:\n  url: http://127.0.0.1:19000\n  listeners:\n  - listener: 0.0.0.0_10080\n    route: shop/api\n",
        )
        .unwrap();
        let flags = AgentOptions {
            ledger: Some("http://flag:2/".into()),
            otlp_grpc: Some(false),
            ..AgentOptions::default()
        };
        let config = file.overlay(flags).resolve("http://default:3").unwrap();
        assert_eq!(config.ledger.as_str(), "http://flag:2/");
        assert_eq!(config.logs, vec![PathBuf::from("/var/log/a.log")]);
        assert_eq!(config.window.window_millis, 120_000);
        assert!(config.otlp);
        assert_eq!(config.otlp_grpc_listen, None);
        let admin = config.envoy_admin.unwrap();
        assert_eq!(admin.interval, Duration::from_secs(10));
        assert_eq!(
            admin.gauges,
            vec![(
                "listener.0.0.0.0_10080.downstream_cx_active".to_owned(),
                RouteKey {
                    project: "shop".into(),
                    namespace: "shop".into(),
                    name: "api".into()
                }
            )]
        );
        let grpc = AgentOptions {
            otlp: Some(true),
            ..AgentOptions::default()
        }
        .resolve("http://default:3")
        .unwrap();
        assert_eq!(
            grpc.otlp_grpc_listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 4317)))
        );
        assert!(AgentOptions::default().resolve("http://x").is_err());
        assert_eq!(config.connections, None);
        assert_eq!(config.clock, Clock::System);
    }

    #[test]
    fn the_http_section_is_read_and_checked() {
        let options = |text: &str| -> AgentOptions { serde_norway::from_str(text).unwrap() };
        let config = options("otlp: true\nhttp: {idleTimeout: 5s, maxConnections: 16}\n")
            .overlay(AgentOptions::default())
            .resolve("http://x")
            .unwrap();
        assert_eq!(config.http.idle_timeout, Duration::from_secs(5));
        assert_eq!(config.http.max_connections, 16);
        assert_eq!(config.http.header_read_timeout, Duration::from_secs(10));
        let error = options("otlp: true\nhttp: {headerReadTimeout: 0s}\n")
            .resolve("http://x")
            .unwrap_err();
        assert!(
            error.to_string().contains("http.headerReadTimeout"),
            "{error}"
        );
    }

    #[test]
    fn the_connections_section_takes_flags_over_the_file() {
        let file: AgentOptions = serde_norway::from_str(
            "allowedLatenessSecs: 30\nconnections:\n  dedupeHorizonSecs: 7200\n  maxOutboxEvents: 9\n",
        )
        .unwrap();
        let config = file
            .clone()
            .overlay(AgentOptions::default())
            .resolve("http://x")
            .unwrap();
        let connections = config.connections.unwrap();
        assert_eq!(
            connections.window.allowed_lateness_millis, 30_000,
            "the grace defaults to the lateness"
        );
        assert_eq!(connections.window.window_millis, 60_000);
        assert_eq!(connections.dedupe_horizon_millis, 7_200_000);
        assert_eq!(connections.max_outbox_events, 9);
        let flags = AgentOptions {
            connections: Some(ConnectionsOptions {
                grace_secs: Some(5),
                ..ConnectionsOptions::default()
            }),
            clock_file: Some(PathBuf::from("/tmp/now")),
            ..AgentOptions::default()
        };
        let config = file.overlay(flags).resolve("http://x").unwrap();
        let connections = config.connections.unwrap();
        assert_eq!(connections.window.allowed_lateness_millis, 5_000);
        assert_eq!(connections.dedupe_horizon_millis, 7_200_000);
        assert_eq!(config.clock, Clock::File(PathBuf::from("/tmp/now")));
        let off: AgentOptions = serde_norway::from_str("connections:\n  enabled: false\n").unwrap();
        assert!(
            off.clone().resolve("http://x").is_err(),
            "nothing to collect"
        );
        let instances: AgentOptions =
            serde_norway::from_str("instances:\n  maxQueuedEvents: 7\n").unwrap();
        let resolved = instances.resolve("http://serve:1/").unwrap().instances;
        assert_eq!(
            resolved,
            Some(InstancesConfig {
                url: reqwest::Url::parse("http://serve:1").unwrap(),
                max_queued_events: 7,
                max_queued_bytes: 64 << 20,
            }),
            "forwarded to the ledger URL by default"
        );
        assert!(off.resolve("http://x").is_err(), "nothing to collect");
    }

    #[test]
    fn instance_log_patterns_are_checked_when_resolved() {
        let options = |text: &str| -> AgentOptions { serde_norway::from_str(text).unwrap() };
        let config = options(
            "ledger: http://serve:1\ninstanceLogs:\n  files:\n  - path: /var/log/pods/{project}_{instance}_*/*/*.log\n  - {path: '/srv/{instance}.log', format: plain, project: acme}\n",
        )
        .resolve("http://x")
        .unwrap();
        let logs = config.instance_logs.unwrap();
        assert_eq!(logs.url.as_str(), "http://serve:1/");
        assert_eq!(logs.sources[1].format, LogFormat::Plain);
        assert_eq!(logs.max_queued_bytes, 256 << 20);
        for bad in [
            "instanceLogs:\n  files:\n  - path: /srv/{instance}.log\n",
            "instanceLogs:\n  files:\n  - path: 'relative/{project}/{instance}'\n",
            "instanceLogs:\n  files:\n  - path: /srv/{project}.log\n",
        ] {
            assert!(options(bad).resolve("http://x").is_err(), "{bad}");
        }
    }

    #[test]
    fn listener_flags_name_a_listener_or_a_whole_gauge() {
        let listener = ListenerMapping::parse_flag("0.0.0.0_443=shop/api@acme").unwrap();
        let (stat, route) = listener.resolve().unwrap();
        assert_eq!(stat, "listener.0.0.0.0_443.downstream_cx_active");
        assert_eq!(
            (route.project.as_str(), route.name.as_str()),
            ("acme", "api")
        );
        let http = ListenerMapping::parse_flag("http.eg-10080.downstream_cx_active=ns/r").unwrap();
        assert_eq!(
            http.resolve().unwrap().0,
            "http.eg-10080.downstream_cx_active"
        );
        for bad in ["no-equals", "l=ns", "l=ns/a/b", "=ns/a", "l=/a"] {
            assert!(ListenerMapping::parse_flag(bad).is_err(), "{bad}");
        }
    }
}
