//! `tally export`: flags → `tally_server::ExportConfig`; the work is
//! `tally_server::export::export`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use tally_server::ExportConfig;

use crate::serve::{EgressArgs, LogFormat, TelemetryArgs, run_logged, server_config};

/// Options of `tally export`. Flags override the config file, which
/// overrides the defaults. The token comes from the global `--token` /
/// `TALLY_TOKEN`.
#[derive(Debug, Args)]
#[command(after_long_help = "\
Runs the exporters' pipeline alone: no ledger, no billing. Exporters, Secrets,
Namespaces and platform resources come from the --manifests directories
(read at start and every 5 s; kept in memory, so the directories are the
whole configuration). Metrics come in on POST /v1/metrics (OTLP/HTTP),
POST /api/v1/write (Prometheus remote-write), OTLP/gRPC with --grpc-listen,
and are pulled from VictoriaMetrics with --victoria-metrics. Sink queues and
the pull checkpoints live in --data-dir, so a restart neither repeats nor
skips pulled samples.

Also served: /metrics, /healthz, /readyz, and the Exporters with their
status at /apis/exporters (so `tally get exporters --server URL` works).

Example config file (every key optional):

  dataDir: /var/lib/tally-export
  listen: 127.0.0.1:8081
  grpcListen: 127.0.0.1:4317
  manifestDirs: [/etc/tally/exporters]
  victoriaMetrics:
    url: http://127.0.0.1:8428
    pullInterval: 10s   # between pulls once caught up
    lag: 30s            # windows end this far behind now
    window: 5m          # longest time range of one request
    backfill: 0s        # how far back a new source starts
  tokens:
    - {name: agents, sha256: <hex>, scopes: [ingest]}
  egress:
    allow: [10.0.0.0/8]  # sinks may reach these although private")]
pub struct ExportArgs {
    /// YAML config file (camelCase keys: dataDir, listen, grpcListen, token,
    /// tokens, maxBodyBytes, manifestDirs, victoriaMetrics, egress, http). Flags
    /// given here override it.
    #[arg(long, short = 'c', value_name = "FILE", env = "TALLY_EXPORT_CONFIG")]
    config: Option<PathBuf>,

    /// Directory of the sinks' queues and the pull checkpoints [default: ./tally-export-data].
    #[arg(long, value_name = "DIR", env = "TALLY_EXPORT_DATA_DIR")]
    data_dir: Option<PathBuf>,

    /// Address and port of the HTTP API, e.g. 0.0.0.0:8081 [default: 127.0.0.1:8081].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,

    #[command(flatten)]
    telemetry: TelemetryArgs,

    /// Largest accepted request body in bytes, after decompression [default: 16777216].
    #[arg(long, value_name = "N")]
    max_body_bytes: Option<usize>,

    /// A directory of manifests (*.yaml, *.yml, *.json): Exporters, Secrets,
    /// Namespaces, platform resources. Repeat for several; adds to the config
    /// file's manifestDirs.
    #[arg(long = "manifests", value_name = "DIR")]
    manifest_dirs: Vec<PathBuf>,

    /// Log format. Levels come from RUST_LOG (default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, value_name = "FORMAT")]
    log_format: LogFormat,

    #[command(flatten)]
    egress: EgressArgs,
}

/// The configuration `export` runs with: the file (or the defaults), then
/// every flag that was given.
pub fn config(args: &ExportArgs, token: Option<String>) -> anyhow::Result<ExportConfig> {
    Ok(server_config!(
        ExportConfig,
        args,
        token,
        [data_dir, listen, max_body_bytes]
    ))
}

/// Runs the exporters until stopped (SIGINT or SIGTERM).
pub fn run(args: ExportArgs, token: Option<String>) -> anyhow::Result<()> {
    let config = config(&args, token)?;
    run_logged(args.log_format, tally_server::export::export(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: ExportArgs,
    }

    #[test]
    fn flags_override_the_file() {
        let (_dir, file) = crate::serve::tests::config_file(
            "dataDir: /var/lib/x\nmanifestDirs: [/etc/a]\nvictoriaMetrics: {url: 'http://vm:1', window: 1m}\n",
        );
        let args = Wrapper::try_parse_from([
            "export",
            "--config",
            &file,
            "--manifests",
            "/etc/b",
            "--victoria-metrics",
            "http://vm:2",
            "--listen",
            "127.0.0.1:9",
        ])
        .unwrap()
        .args;
        let config = config(&args, Some("t".into())).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/var/lib/x"));
        assert_eq!(
            config.manifest_dirs,
            vec![PathBuf::from("/etc/a"), PathBuf::from("/etc/b")]
        );
        let vm = config.victoria_metrics.unwrap();
        assert_eq!(
            (vm.url.as_str(), vm.window.as_deref()),
            ("http://vm:2", Some("1m"))
        );
        assert_eq!(config.listen, "127.0.0.1:9".parse().unwrap());
        assert_eq!(config.token.as_deref(), Some("t"));
        assert_eq!(config.grpc_listen, None);
    }
}
