//! `tally serve`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tally_delivery::EgressConfig;
use tally_server::{ServeConfig, VictoriaMetricsConfig};
use tracing_subscriber::EnvFilter;

/// Options of `tally serve`. Flags override the config file, which overrides
/// the defaults. The token comes from the global `--token` / `TALLY_TOKEN`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// YAML config file (camelCase keys: dataDir, listen, grpcListen, token,
    /// tokens, maxBodyBytes, maxPendingEvents, dedupeHorizonDays,
    /// maxLatenessDays, manifestDirs, billing, victoriaMetrics, egress, http,
    /// cluster). Flags given here override it.
    #[arg(long, short = 'c', value_name = "FILE", env = "TALLY_CONFIG")]
    config: Option<PathBuf>,

    /// Directory where the embedded store keeps its files (a cluster node: its
    /// own state, billing progress and exporter queues) [default: ./tally-data].
    #[arg(long, value_name = "DIR", env = "TALLY_DATA_DIR")]
    data_dir: Option<PathBuf>,

    /// Address and port to listen on, e.g. 0.0.0.0:8080 [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR", env = "TALLY_LISTEN")]
    listen: Option<SocketAddr>,

    /// Run as a node of a cluster (NATS JetStream and ClickHouse), as the
    /// config file's `cluster:` section says (nats, clickhouse, database,
    /// defaultProject, resourcesBucket), instead of on the embedded store.
    #[arg(long, env = "TALLY_CLUSTER")]
    cluster: bool,

    #[command(flatten)]
    telemetry: TelemetryArgs,

    /// Largest accepted request body in bytes, after decompression [default: 16777216].
    #[arg(long, value_name = "N")]
    max_body_bytes: Option<usize>,

    /// How long (source, id) pairs are remembered to drop duplicate events, in days [default: 32].
    #[arg(long, value_name = "N")]
    dedupe_horizon_days: Option<u32>,

    /// How old an event's time may be when it arrives, in days [default: the dedupe horizon].
    #[arg(long, value_name = "N")]
    max_lateness_days: Option<u32>,

    /// How far ahead of the server's clock an event's time may be, in hours
    /// [default: 24]; later events are refused (TIME_IN_FUTURE).
    #[arg(long, value_name = "N")]
    max_future_hours: Option<u32>,

    /// The embedded store's block cache in MiB [default: 256]. More keeps a
    /// large store's rollup buckets in memory; see BENCHMARKS.md.
    #[arg(long, value_name = "MIB")]
    store_cache_mib: Option<u64>,

    /// A directory of manifests (*.yaml, *.yml, *.json) applied at start and
    /// whenever a file changes, as by `tally apply`; removing a file deletes
    /// nothing. Repeat for several; adds to the config file's manifestDirs.
    #[arg(long = "manifests", value_name = "DIR")]
    manifest_dirs: Vec<PathBuf>,

    /// Log format. Levels come from RUST_LOG (default `info`, with the storage
    /// engine's internals at `warn`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, value_name = "FORMAT")]
    log_format: LogFormat,

    #[command(flatten)]
    egress: EgressArgs,
}

/// The metrics receivers and the pull source, shared by `serve` and `export`.
#[derive(Debug, Args)]
pub struct TelemetryArgs {
    /// Receive OTLP metrics over gRPC (MetricsService/Export) on this address,
    /// e.g. 127.0.0.1:4317 [default: off].
    #[arg(long, value_name = "ADDR")]
    grpc_listen: Option<SocketAddr>,

    /// Pull every Exporter source from this VictoriaMetrics too, e.g.
    /// http://127.0.0.1:8428 (interval, lag, window and backfill are set in
    /// the config file's victoriaMetrics).
    #[arg(long, value_name = "URL")]
    victoria_metrics: Option<String>,
}

impl TelemetryArgs {
    /// Applies the flags given over the config file's values.
    pub fn apply(
        &self,
        grpc_listen: &mut Option<SocketAddr>,
        victoria_metrics: &mut Option<VictoriaMetricsConfig>,
    ) {
        if let Some(address) = self.grpc_listen {
            *grpc_listen = Some(address);
        }
        if let Some(url) = &self.victoria_metrics {
            match victoria_metrics {
                Some(vm) => vm.url.clone_from(url),
                None => *victoria_metrics = Some(VictoriaMetricsConfig::new(url.clone())),
            }
        }
    }
}

/// The egress allow-list, shared by `serve`, `export` and `forward`.
#[derive(Debug, Args)]
pub struct EgressArgs {
    /// Let Exporter sinks and BillingSink providers reach this CIDR (or
    /// address) although it is loopback, private, link-local..., e.g.
    /// 10.0.0.0/8. Repeat for several; adds to the config file's egress.allow.
    #[arg(long = "egress-allow", value_name = "CIDR")]
    pub allow: Vec<String>,
}

impl EgressArgs {
    /// Adds the flags' entries to the config file's.
    pub fn apply(&self, egress: &mut EgressConfig) {
        egress.allow.extend_from_slice(&self.allow);
    }
}

/// How `tally serve` writes its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The configuration a server command runs with: the file (or the
/// defaults), then every flag that was given. `$plain` are the flags that
/// replace the config field of the same name.
macro_rules! server_config {
    ($config:ty, $args:expr, $token:expr, [$($plain:ident),*]) => {{
        let args = $args;
        let mut config = match &args.config {
            Some(path) => <$config>::from_file(path)?,
            None => <$config>::default(),
        };
        $(
            if let Some(value) = &args.$plain {
                config.$plain = value.clone();
            }
        )*
        args.telemetry
            .apply(&mut config.grpc_listen, &mut config.victoria_metrics);
        if let Some(token) = $token {
            config.token = Some(token);
        }
        config.manifest_dirs.extend_from_slice(&args.manifest_dirs);
        args.egress.apply(&mut config.egress);
        config
    }};
}
pub(crate) use server_config;

/// The configuration `serve` runs with: the file (or the defaults), then
/// every flag that was given.
pub fn config(args: &ServeArgs, token: Option<String>) -> anyhow::Result<ServeConfig> {
    let mut config = server_config!(
        ServeConfig,
        args,
        token,
        [
            data_dir,
            listen,
            max_body_bytes,
            dedupe_horizon_days,
            max_future_hours
        ]
    );
    if let Some(days) = args.max_lateness_days {
        config.max_lateness_days = Some(days);
    }
    if let Some(mib) = args.store_cache_mib {
        config.store_cache_mib = Some(mib);
    }
    if args.cluster && config.cluster.is_none() {
        anyhow::bail!(
            "--cluster: the config file has no `cluster:` section; give one with --config, e.g. \
             cluster: {{nats: nats://127.0.0.1:4222, clickhouse: http://127.0.0.1:8123, \
             database: tally}}"
        );
    }
    config.check()?;
    Ok(config)
}

/// Runs the server until it is stopped (SIGINT or SIGTERM).
pub fn run(args: ServeArgs, token: Option<String>) -> anyhow::Result<()> {
    let config = config(&args, token)?;
    run_logged(args.log_format, async move {
        let backend = crate::backend::open(&config).await?;
        tally_server::serve(config, backend).await
    })
}

/// Runs a server process's work on a multi-threaded runtime, logging in `format`.
pub fn run_logged(
    format: LogFormat,
    work: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    init_tracing(format)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(work)
}

pub fn init_tracing(format: LogFormat) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::try_new(&directives)
            .with_context(|| format!("invalid RUST_LOG {directives:?}"))?,
        // The storage engine's own info lines are about its internals.
        _ => EnvFilter::new("info,fjall=warn,lsm_tree=warn"),
    };
    // Logs go to stderr; stdout carries only the "listening on" line.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("setting up logging: {e}"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn args(flags: &[&str]) -> ServeArgs {
        Wrapper::try_parse_from(std::iter::once("serve").chain(flags.iter().copied()))
            .unwrap()
            .args
    }

    /// A config file holding `text`, and its path.
    pub(crate) fn config_file(text: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tally.yaml");
        std::fs::write(&file, text).unwrap();
        let file = file.to_str().unwrap().to_owned();
        (dir, file)
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let (_dir, file) =
            config_file("dataDir: /var/lib/tally\nlisten: 0.0.0.0:9000\nmaxBodyBytes: 1024\n");
        let file = file.as_str();
        let config = config(
            &args(&["--config", file, "--listen", "127.0.0.1:7000"]),
            None,
        )
        .unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/var/lib/tally"));
        assert_eq!(config.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(config.max_body_bytes, 1024);
        assert_eq!(
            config.dedupe_horizon_days,
            ServeConfig::default().dedupe_horizon_days
        );
        assert_eq!(config.token, None);

        std::fs::write(
            file,
            "victoriaMetrics: {url: 'http://vm:1', lag: 5s}\ngrpcListen: 0.0.0.0:4317\n",
        )
        .unwrap();
        let telemetry = super::config(
            &args(&[
                "--config",
                file,
                "--victoria-metrics",
                "http://vm:2",
                "--grpc-listen",
                "127.0.0.1:4318",
            ]),
            None,
        )
        .unwrap();
        let vm = telemetry.victoria_metrics.unwrap();
        assert_eq!(
            (vm.url.as_str(), vm.lag.as_deref()),
            ("http://vm:2", Some("5s"))
        );
        assert_eq!(
            telemetry.grpc_listen,
            Some("127.0.0.1:4318".parse().unwrap())
        );

        let config = config_with_token(&["--max-lateness-days", "3", "--dedupe-horizon-days", "9"]);
        assert_eq!(config.max_lateness_days, Some(3));
        assert_eq!(config.dedupe_horizon_days, 9);
        assert_eq!(config.token.as_deref(), Some("t"));
        assert_eq!(config.data_dir, ServeConfig::default().data_dir);
    }

    fn config_with_token(flags: &[&str]) -> ServeConfig {
        config(&args(flags), Some("t".into())).unwrap()
    }

    #[test]
    fn a_missing_config_file_is_named() {
        let err = config(&args(&["--config", "/nonexistent/tally.yaml"]), None).unwrap_err();
        assert!(
            format!("{err:#}").contains("/nonexistent/tally.yaml"),
            "{err:#}"
        );
    }

    #[test]
    fn the_cluster_section_is_read_and_its_errors_are_clear() {
        let err = |flags: &[&str]| format!("{:#}", config(&args(flags), None).unwrap_err());
        let no_section = err(&["--cluster"]);
        assert!(no_section.contains("no `cluster:` section"), "{no_section}");
        let (_dir, file) = config_file(
            "cluster: {nats: 'nats://a:4222,nats://b:4222', clickhouse: 'http://ch:8123'}\n\
             billing: {enabled: false}\n",
        );
        let cluster = config(&args(&["--config", &file, "--cluster"]), None)
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(
            (cluster.database.as_str(), cluster.default_project.as_str()),
            ("tally", "default")
        );
        assert_eq!(cluster.resources_bucket, "tally-resources");
        let cases = [
            (
                "cluster: {nats: 'http://a', clickhouse: 'http://ch'}\nbilling: {enabled: false}\n",
                "cluster.nats",
            ),
            (
                "cluster: {nats: 'nats://a', clickhouse: 'ch:8123'}\nbilling: {enabled: false}\n",
                "cluster.clickhouse",
            ),
            (
                "cluster: {nats: 'nats://a', clickhouse: 'http://ch', database: 'a;b'}\nbilling: {enabled: false}\n",
                "cluster.database",
            ),
            (
                "cluster: {nats: 'nats://a', clickhouse: 'http://ch', defaultProject: 'A'}\nbilling: {enabled: false}\n",
                "cluster.defaultProject",
            ),
            (
                "cluster: {nats: 'nats://a', clickhouse: 'http://ch', resourcesBucket: 'a.b'}\nbilling: {enabled: false}\n",
                "cluster.resourcesBucket",
            ),
            (
                "cluster: {nats: 'nats://a', clickhouse: 'http://ch'}\n",
                "tally forward",
            ),
            (
                "cluster: {nats: 'nats://a', clickhouse: 'http://ch'}\nbilling: {enabled: false}\nstoreCacheMib: 64\n",
                "storeCacheMib",
            ),
            ("cluster: {nats: 'nats://a'}\n", "clickhouse"),
            (
                "cluster: {nats: 'nats://a', clickhouse: 'http://ch', stream: x}\n",
                "stream",
            ),
        ];
        for (text, named) in cases {
            std::fs::write(&file, text).unwrap();
            let message = err(&["--config", &file]);
            assert!(message.contains(named), "{text}: {message}");
        }
    }

    #[test]
    fn egress_allow_flags_add_to_the_files_list() {
        let (_dir, file) = config_file("egress: {allow: [10.0.0.0/8]}\n");
        let config = config(
            &args(&[
                "--config",
                &file,
                "--egress-allow",
                "127.0.0.1",
                "--egress-allow",
                "fd00::/8",
            ]),
            None,
        )
        .unwrap();
        assert_eq!(config.egress.allow, ["10.0.0.0/8", "127.0.0.1", "fd00::/8"]);
        assert_eq!(config.egress.policy().unwrap().allowed().len(), 3);
    }
}
