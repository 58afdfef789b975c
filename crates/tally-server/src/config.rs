//! `tally serve` and `tally export` configuration: a YAML file, overridden
//! by flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tally_delivery::EgressConfig;
use tally_http::HttpConfig;
use tally_telemetry::PullOptions;
use tally_telemetry::exporter::parse_duration;

use crate::auth::TokenConfig;

/// Everything `tally serve` needs. Every field has a default, so an empty
/// config file is valid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Where this process keeps its files: the embedded store's, and on a
    /// cluster node its own state (billing progress, exporter queues).
    pub data_dir: PathBuf,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// When set, every API call except `/healthz` and `/readyz` must send
    /// `Authorization: Bearer <token>`. Never logged.
    #[serde(skip_serializing)]
    pub token: Option<String>,
    /// Scoped bearer tokens (`admin`, `ingest`, `project:<name>`), besides
    /// `token`, which is an admin token.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<TokenConfig>,
    /// How many events may wait for the store at once; beyond that
    /// `/v1/usage/events*` answers 429 and `/api/v1/events` waits.
    pub max_pending_events: usize,
    /// Largest accepted request body, in bytes, after decompression.
    pub max_body_bytes: usize,
    /// How long (source, id) pairs are remembered for deduplication, in days.
    pub dedupe_horizon_days: u32,
    /// How old an event's time may be when it arrives, in days. Defaults to
    /// the dedupe horizon, so that every accepted event is still deduplicated.
    pub max_lateness_days: Option<u32>,
    /// How far ahead of the server's clock an event's time may be, in
    /// hours; later events are refused (`TIME_IN_FUTURE`).
    pub max_future_hours: u32,
    /// The embedded store's block cache, in MiB; absent: the store's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_cache_mib: Option<u64>,
    /// Run as a node of a cluster (NATS JetStream and ClickHouse) instead of
    /// on the embedded store; `tally serve --cluster` requires it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
    /// Most acknowledged events whose rollups are not yet materialised (a
    /// few hundred bytes of memory each); absent: the embedded store's
    /// default (500,000). At the bound, `/v1/usage/events*` answers 429 and
    /// `/api/v1/events` waits up to `ingestWaitSeconds`, then answers 503.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_unmaterialised_events: Option<u64>,
    /// How long acknowledged events may wait for a bulk worth
    /// materialising to gather, in milliseconds.
    pub materialise_patience_ms: u64,
    /// How long `/api/v1/events` waits for room in a full backlog (see
    /// `maxUnmaterialisedEvents`) before answering 503, in seconds.
    pub ingest_wait_seconds: f64,
    /// Directories whose `*.yaml`, `*.yml` and `*.json` manifests are applied
    /// at start and whenever a file changes (every 5 s), as by `tally apply`.
    /// Removing a file deletes nothing.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub manifest_dirs: Vec<PathBuf>,
    /// The billing forwarder (BillingSink resources).
    pub billing: BillingServeConfig,
    /// Where the OTLP/gRPC metrics receiver listens
    /// (`MetricsService/Export`); absent: no gRPC receiver.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_listen: Option<SocketAddr>,
    /// Pull exporter sources from this VictoriaMetrics too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub victoria_metrics: Option<VictoriaMetricsConfig>,
    /// Where Exporter sinks and BillingSink providers may send: `allow`
    /// lists CIDRs they may reach although loopback, private, link-local...
    pub egress: EgressConfig,
    /// Timeouts and the connection limit of the HTTP listener.
    pub http: HttpConfig,
    /// Instance logs (stdout/stderr of compute instances).
    pub logs: LogsConfig,
}

/// `logs:` in the serve config: the instance log store in
/// `<dataDir>/logs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct LogsConfig {
    /// Whether instance logs are kept (off: they are refused).
    pub enabled: bool,
    /// Days a project's lines are kept (default 7).
    pub retention_days: u32,
    /// Days kept, per project, where it differs.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub project_retention_days: std::collections::BTreeMap<String, u32>,
    /// Raw text one project may send per second, and its burst (429 +
    /// `Retry-After` beyond).
    pub ingest_bytes_per_second: u64,
    pub ingest_burst_bytes: u64,
    /// Text queued for the log writer for one instance, and for all; an
    /// append beyond either answers 429.
    pub max_pending_instance_bytes: usize,
    pub max_pending_bytes: usize,
    /// Seconds between retention sweeps.
    pub sweep_interval_seconds: u64,
}

impl Default for LogsConfig {
    fn default() -> Self {
        let limit = tally_logstore::limits::IngestLimit::default();
        let store = tally_logstore::StoreConfig::new("");
        LogsConfig {
            enabled: true,
            retention_days: 7,
            project_retention_days: std::collections::BTreeMap::new(),
            ingest_bytes_per_second: limit.bytes_per_second,
            ingest_burst_bytes: limit.burst_bytes,
            max_pending_instance_bytes: store.max_pending_instance_bytes,
            max_pending_bytes: store.max_pending_bytes,
            sweep_interval_seconds: 600,
        }
    }
}

impl LogsConfig {
    /// The store's configuration under `data_dir`.
    pub fn store_config(&self, data_dir: &std::path::Path) -> tally_logstore::StoreConfig {
        let days = |d: u32| Duration::from_secs(u64::from(d) * 86_400);
        let mut store = tally_logstore::StoreConfig::new(data_dir.join("logs"));
        store.default_retention = days(self.retention_days);
        store.retention = self
            .project_retention_days
            .iter()
            .map(|(p, d)| (p.clone(), days(*d)))
            .collect();
        store.max_pending_bytes = self.max_pending_bytes;
        store.max_pending_instance_bytes = self.max_pending_instance_bytes;
        store
    }

    /// The per-project ingest limiter.
    pub fn limiter(&self) -> tally_logstore::limits::ProjectLimiter {
        tally_logstore::limits::ProjectLimiter::new(
            tally_logstore::limits::IngestLimit {
                bytes_per_second: self.ingest_bytes_per_second,
                burst_bytes: self.ingest_burst_bytes,
            },
            std::collections::HashMap::new(),
        )
    }
}

/// `victoriaMetrics:` in the config: every Exporter source is also pulled
/// from this VictoriaMetrics (`/api/v1/export`, `match[]` = the source's
/// selector within the exporter's namespaces), in moving windows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VictoriaMetricsConfig {
    /// Base URL, e.g. `http://127.0.0.1:8428` (or a vmselect tenant prefix
    /// such as `http://vmselect:8481/select/0/prometheus`).
    pub url: String,
    /// Time between pulls once caught up (default `10s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_interval: Option<String>,
    /// How far behind now a window ends, so late samples are still read
    /// (default `30s`); a sample that arrives later than this is missed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<String>,
    /// The longest time range one request reads (default `5m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// How far back a source seen for the first time starts (default `0s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backfill: Option<String>,
    /// Where `tally serve` imports the compute fleet metrics
    /// (`<pushUrl>/api/v1/import/prometheus`; default `url`, e.g. a vminsert
    /// tenant prefix `http://vminsert:8480/insert/0/prometheus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_url: Option<String>,
    /// Time between fleet metrics pushes (default `15s`; `0s`: no push).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_interval: Option<String>,
    /// The `tally_node` label of pushed series (default: the host name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_node: Option<String>,
}

impl VictoriaMetricsConfig {
    /// Only the URL; every other setting at its default.
    pub fn new(url: impl Into<String>) -> Self {
        VictoriaMetricsConfig {
            url: url.into(),
            pull_interval: None,
            lag: None,
            window: None,
            backfill: None,
            push_url: None,
            push_interval: None,
            push_node: None,
        }
    }

    /// Where and how often `tally serve` pushes the fleet metrics; `None`
    /// when `pushInterval` is zero.
    pub fn fleet_push(&self) -> anyhow::Result<Option<crate::fleet_push::FleetPush>> {
        let interval = match &self.push_interval {
            None => Duration::from_secs(15),
            Some(text) if zero(text) => return Ok(None),
            Some(text) => parse_duration(text)
                .map_err(anyhow::Error::msg)
                .context("victoriaMetrics.pushInterval")?,
        };
        let node = match &self.push_node {
            Some(node) => node.clone(),
            None => host_name(),
        };
        let base = self.push_url.as_deref().unwrap_or(&self.url);
        crate::fleet_push::FleetPush::new(base, &node, interval.max(Duration::from_millis(100)))
            .map(Some)
    }

    /// The pipeline's pull options.
    pub fn pull_options(&self) -> anyhow::Result<PullOptions> {
        let mut options = PullOptions::new(self.url.clone());
        let field = |name: &str, text: &Option<String>, allow_zero: bool, into: &mut Duration| {
            let Some(text) = text else {
                return Ok(());
            };
            *into = if allow_zero && zero(text) {
                Duration::ZERO
            } else {
                parse_duration(text)
                    .map_err(anyhow::Error::msg)
                    .with_context(|| format!("victoriaMetrics.{name}"))?
            };
            anyhow::Ok(())
        };
        field(
            "pullInterval",
            &self.pull_interval,
            false,
            &mut options.interval,
        )?;
        field("lag", &self.lag, true, &mut options.lag)?;
        field("window", &self.window, false, &mut options.window)?;
        field("backfill", &self.backfill, true, &mut options.backfill)?;
        Ok(options)
    }
}

/// This host's name (`/proc/sys/kernel/hostname`, else `$HOSTNAME`, else
/// `tally`).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "tally".to_owned())
}

/// Whether a duration text says zero (`0`, `0s`, `0ms`...).
fn zero(text: &str) -> bool {
    text.trim()
        .trim_end_matches(|c: char| c.is_ascii_alphabetic())
        .parse::<f64>()
        .is_ok_and(|n| n == 0.0)
}

/// `billing:` in the serve config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct BillingServeConfig {
    /// Whether this server forwards usage to the BillingSinks' providers.
    /// Turn it off when a `tally forward` process does it instead: two
    /// forwarders of one sink would each correct the provider's totals.
    pub enabled: bool,
    /// Seconds between forwarding passes (each sends the windows that
    /// closed and the corrections of windows that changed).
    pub pass_interval_seconds: f64,
}

impl Default for BillingServeConfig {
    fn default() -> Self {
        BillingServeConfig {
            enabled: true,
            pass_interval_seconds: 5.0,
        }
    }
}

impl BillingServeConfig {
    /// The pass interval, at least 10 ms.
    pub fn pass_interval(&self) -> std::time::Duration {
        std::time::Duration::try_from_secs_f64(self.pass_interval_seconds)
            .unwrap_or(std::time::Duration::from_secs(5))
            .max(std::time::Duration::from_millis(10))
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            data_dir: PathBuf::from("./tally-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token: None,
            tokens: Vec::new(),
            max_pending_events: crate::DEFAULT_MAX_PENDING_EVENTS,
            max_body_bytes: 16 * 1024 * 1024,
            dedupe_horizon_days: 32,
            max_lateness_days: None,
            max_future_hours: 24,
            store_cache_mib: None,
            cluster: None,
            max_unmaterialised_events: None,
            materialise_patience_ms: 100,
            ingest_wait_seconds: crate::DEFAULT_INGEST_WAIT.as_secs_f64(),
            manifest_dirs: Vec::new(),
            billing: BillingServeConfig::default(),
            grpc_listen: None,
            victoria_metrics: None,
            egress: EgressConfig::default(),
            http: HttpConfig::default(),
            logs: LogsConfig::default(),
        }
    }
}

impl ServeConfig {
    /// `materialisePatienceMs`, at most a minute.
    pub fn materialise_patience(&self) -> Duration {
        Duration::from_millis(self.materialise_patience_ms.min(60_000))
    }

    /// `ingestWaitSeconds`, between 0 and 5 minutes (a bad value: the default).
    pub fn ingest_wait(&self) -> Duration {
        Duration::try_from_secs_f64(self.ingest_wait_seconds)
            .unwrap_or(crate::DEFAULT_INGEST_WAIT)
            .min(Duration::from_secs(300))
    }
}

/// Reads a YAML config file; an empty one is the defaults.
fn read_config<T: Default + serde::de::DeserializeOwned>(
    path: &std::path::Path,
) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    if text.trim().is_empty() {
        return Ok(T::default());
    }
    serde_norway::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
}

impl ServeConfig {
    /// Reads a YAML config file.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<ServeConfig> {
        read_config(path)
    }

    /// Checks what serde cannot (the egress list, the http section, settings
    /// that contradict each other, the cluster section), before anything is
    /// opened.
    pub fn check(&self) -> anyhow::Result<()> {
        self.egress.policy()?;
        self.http
            .limits()
            .context("the configuration's http section")?;
        if let Some(late) = self.max_lateness_days
            && late > self.dedupe_horizon_days
        {
            anyhow::bail!(
                "maxLatenessDays ({late}) must not exceed dedupeHorizonDays ({}): events older \
                 than the dedupe horizon could be stored twice",
                self.dedupe_horizon_days
            );
        }
        if let Some(cluster) = &self.cluster {
            cluster.check()?;
            if self.billing.enabled {
                anyhow::bail!(
                    "cluster: every node would forward usage to the billing providers; set \
                     billing.enabled: false and run one `tally forward` for the cluster"
                );
            }
            if self.store_cache_mib.is_some() {
                anyhow::bail!("storeCacheMib is a setting of the embedded store, not of a cluster");
            }
        }
        Ok(())
    }
}

/// `cluster:` in the serve config: this node shares its ledger and
/// resources with every other node through NATS JetStream (the log, and a
/// key-value bucket of resources) and ClickHouse (what queries read).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterConfig {
    /// NATS server URL(s), comma-separated: `nats://host:4222`.
    pub nats: String,
    /// ClickHouse's HTTP interface: `http://host:8123`.
    pub clickhouse: String,
    /// The ClickHouse database of the ledger's tables (default `tally`).
    #[serde(default = "ClusterConfig::default_database")]
    pub database: String,
    /// The project of an event whose subject names none (`projects/<p>`)
    /// (default `default`).
    #[serde(default = "ClusterConfig::default_project")]
    pub default_project: String,
    /// The JetStream key-value bucket of resources (default
    /// `tally-resources`); every node of one cluster names the same.
    #[serde(default = "ClusterConfig::default_resources_bucket")]
    pub resources_bucket: String,
    /// Workers this node runs to materialise the stream into ClickHouse
    /// (default 1; 0 leaves it to other nodes). At most 64.
    #[serde(default = "ClusterConfig::default_workers")]
    pub workers: usize,
}

impl ClusterConfig {
    fn default_database() -> String {
        "tally".into()
    }

    fn default_project() -> String {
        "default".into()
    }

    fn default_resources_bucket() -> String {
        "tally-resources".into()
    }

    fn default_workers() -> usize {
        1
    }

    /// A cluster on these servers, every other setting at its default.
    pub fn new(nats: impl Into<String>, clickhouse: impl Into<String>) -> ClusterConfig {
        ClusterConfig {
            nats: nats.into(),
            clickhouse: clickhouse.into(),
            database: Self::default_database(),
            default_project: Self::default_project(),
            resources_bucket: Self::default_resources_bucket(),
            workers: Self::default_workers(),
        }
    }

    /// Refuses what the servers would refuse later, or misread.
    pub fn check(&self) -> anyhow::Result<()> {
        for url in self.nats.split(',').map(str::trim) {
            let scheme_ok = ["nats://", "tls://", "ws://", "wss://"]
                .iter()
                .any(|scheme| url.starts_with(scheme));
            if !scheme_ok || url.len() > 2048 {
                anyhow::bail!(
                    "cluster.nats: {url:?} is not a NATS URL (nats://host:4222, tls://..., \
                     comma-separated for several)"
                );
            }
        }
        if !(self.clickhouse.starts_with("http://") || self.clickhouse.starts_with("https://"))
            || self.clickhouse.len() > 2048
        {
            anyhow::bail!(
                "cluster.clickhouse: {:?} is not ClickHouse's HTTP interface \
                 (http://host:8123)",
                self.clickhouse
            );
        }
        let identifier = |s: &str| {
            s.len() <= 64
                && s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        if !identifier(&self.database) {
            anyhow::bail!(
                "cluster.database: {:?} must be a plain identifier ([A-Za-z_][A-Za-z0-9_]*, \
                 at most 64 characters)",
                self.database
            );
        }
        if self.workers > 64 {
            anyhow::bail!("cluster.workers: {} is more than 64", self.workers);
        }
        tally_model::validate_name(&self.default_project).map_err(|e| {
            anyhow::anyhow!(
                "cluster.defaultProject: {}",
                e.replace("metadata.name", "the name")
            )
        })?;
        let bucket_ok = !self.resources_bucket.is_empty()
            && self.resources_bucket.len() <= 64
            && self
                .resources_bucket
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !bucket_ok {
            anyhow::bail!(
                "cluster.resourcesBucket: {:?} must be 1 to 64 letters, digits, '-' or '_'",
                self.resources_bucket
            );
        }
        Ok(())
    }
}

/// Everything `tally export` needs: the exporters' pipeline alone, fed by
/// the metrics receivers and VictoriaMetrics, configured from watched
/// manifest directories. No ledger, no billing. Every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ExportConfig {
    /// Where the sinks' queues (and with them the pull checkpoints) live.
    pub data_dir: PathBuf,
    /// Address of the HTTP API (`/v1/metrics`, `/api/v1/write`, `/metrics`,
    /// `/healthz`, `/readyz`, `/apis/exporters`).
    pub listen: SocketAddr,
    /// Where the OTLP/gRPC metrics receiver listens; absent: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_listen: Option<SocketAddr>,
    /// An admin token, as in `tally serve`. Never logged.
    #[serde(skip_serializing)]
    pub token: Option<String>,
    /// Scoped bearer tokens, as in `tally serve`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<TokenConfig>,
    /// Largest accepted request body, in bytes, after decompression.
    pub max_body_bytes: usize,
    /// Directories of Exporter, Secret, Namespace and platform resource
    /// manifests, applied at start and whenever a file changes. They are
    /// the only configuration: resources live in memory, and a file
    /// removed is forgotten at the next start.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub manifest_dirs: Vec<PathBuf>,
    /// Pull exporter sources from this VictoriaMetrics too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub victoria_metrics: Option<VictoriaMetricsConfig>,
    /// Where Exporter sinks may send, as in `tally serve`.
    pub egress: EgressConfig,
    /// Timeouts and the connection limit of the HTTP listener, as in
    /// `tally serve`.
    pub http: HttpConfig,
}

impl Default for ExportConfig {
    fn default() -> Self {
        let serve = ServeConfig::default();
        ExportConfig {
            data_dir: PathBuf::from("./tally-export-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            grpc_listen: None,
            token: None,
            tokens: Vec::new(),
            max_body_bytes: serve.max_body_bytes,
            manifest_dirs: Vec::new(),
            victoria_metrics: None,
            egress: EgressConfig::default(),
            http: HttpConfig::default(),
        }
    }
}

impl ExportConfig {
    /// Reads a YAML config file.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<ExportConfig> {
        read_config(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn victoria_metrics_durations_are_read_with_defaults() {
        let config: ServeConfig = serde_norway::from_str(
            "victoriaMetrics: {url: 'http://vm:8428', lag: 5s, backfill: 0s, window: 1m}
grpcListen: 127.0.0.1:4317
",
        )
        .unwrap();
        let vm = config.victoria_metrics.unwrap();
        let options = vm.pull_options().unwrap();
        assert_eq!(options.url, "http://vm:8428");
        assert_eq!(options.lag, Duration::from_secs(5));
        assert_eq!(options.window, Duration::from_secs(60));
        assert_eq!(options.backfill, Duration::ZERO);
        assert_eq!(options.interval, PullOptions::new("").interval);
        assert_eq!(config.grpc_listen, Some("127.0.0.1:4317".parse().unwrap()));
        let mut bad = VictoriaMetricsConfig::new("http://vm");
        bad.pull_interval = Some("0s".into());
        let err = bad.pull_options().unwrap_err();
        assert!(
            format!("{err:#}").contains("victoriaMetrics.pullInterval"),
            "{err:#}"
        );
        let export: ExportConfig = serde_norway::from_str(
            "dataDir: /var/lib/x
manifestDirs: [/etc/x]
http: {idleTimeout: 5s}
",
        )
        .unwrap();
        assert_eq!(export.listen, ExportConfig::default().listen);
        let limits = export.http.limits().unwrap();
        assert_eq!(limits.idle_timeout, Duration::from_secs(5));
        assert_eq!(limits.header_read_timeout, Duration::from_secs(10));
        assert_eq!(config.http, HttpConfig::default());
        assert!(
            serde_norway::from_str::<ExportConfig>(
                "dedupeHorizonDays: 3
"
            )
            .is_err()
        );
    }

    #[test]
    fn the_egress_allow_list_is_read_and_validated() {
        let empty: ServeConfig = serde_norway::from_str("egress: {}\n").unwrap();
        for config in [empty, ServeConfig::default()] {
            let policy = config.egress.policy().unwrap();
            assert!(policy.allowed().is_empty(), "none by default");
        }
        let config: ServeConfig =
            serde_norway::from_str("egress: {allow: [10.0.0.0/8, '127.0.0.1', 'fd00::/8']}\n")
                .unwrap();
        let policy = config.egress.policy().unwrap();
        assert_eq!(policy.allowed().len(), 3);
        assert_eq!(policy.check("10.1.2.3".parse().unwrap()), Ok(()));
        let export: ExportConfig =
            serde_norway::from_str("egress: {allow: [10.0.0.0/8, 10.0.0/8]}\n").unwrap();
        let err = export.egress.policy().unwrap_err();
        assert!(
            err.to_string()
                .starts_with("egress.allow[1]: \"10.0.0/8\" is not a CIDR"),
            "{err}"
        );
        assert!(serde_norway::from_str::<ServeConfig>("egress: {deny: []}\n").is_err());
    }
}
