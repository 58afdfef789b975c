//! `tally serve`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tally_server::ServeConfig;
use tracing_subscriber::EnvFilter;

/// Options of `tally serve`. Flags override the config file, which overrides
/// the defaults. The token comes from the global `--token` / `TALLY_TOKEN`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// YAML config file (camelCase keys: dataDir, listen, token, tokens,
    /// maxBodyBytes, maxPendingEvents, dedupeHorizonDays, maxLatenessDays,
    /// manifestDirs). Flags given here override it.
    #[arg(long, short = 'c', value_name = "FILE", env = "TALLY_CONFIG")]
    config: Option<PathBuf>,

    /// Directory where the embedded store keeps its files [default: ./tally-data].
    #[arg(long, value_name = "DIR", env = "TALLY_DATA_DIR")]
    data_dir: Option<PathBuf>,

    /// Address and port to listen on, e.g. 0.0.0.0:8080 [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR", env = "TALLY_LISTEN")]
    listen: Option<SocketAddr>,

    /// Largest accepted request body in bytes, after decompression [default: 16777216].
    #[arg(long, value_name = "N")]
    max_body_bytes: Option<usize>,

    /// How long (source, id) pairs are remembered to drop duplicate events, in days [default: 32].
    #[arg(long, value_name = "N")]
    dedupe_horizon_days: Option<u32>,

    /// How old an event's time may be when it arrives, in days [default: the dedupe horizon].
    #[arg(long, value_name = "N")]
    max_lateness_days: Option<u32>,

    /// A directory of manifests (*.yaml, *.yml, *.json) applied at start and
    /// whenever a file changes, as by `tally apply`; removing a file deletes
    /// nothing. Repeat for several; adds to the config file's manifestDirs.
    #[arg(long = "manifests", value_name = "DIR")]
    manifest_dirs: Vec<PathBuf>,

    /// Log format. Levels come from RUST_LOG (default `info`, with the storage
    /// engine's internals at `warn`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, value_name = "FORMAT")]
    log_format: LogFormat,
}

/// How `tally serve` writes its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The configuration `serve` runs with: the file (or the defaults), then
/// every flag that was given.
pub fn config(args: &ServeArgs, token: Option<String>) -> anyhow::Result<ServeConfig> {
    let mut config = match &args.config {
        Some(path) => ServeConfig::from_file(path)?,
        None => ServeConfig::default(),
    };
    if let Some(dir) = &args.data_dir {
        config.data_dir.clone_from(dir);
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(token) = token {
        config.token = Some(token);
    }
    if let Some(bytes) = args.max_body_bytes {
        config.max_body_bytes = bytes;
    }
    if let Some(days) = args.dedupe_horizon_days {
        config.dedupe_horizon_days = days;
    }
    if let Some(days) = args.max_lateness_days {
        config.max_lateness_days = Some(days);
    }
    config
        .manifest_dirs
        .extend(args.manifest_dirs.iter().cloned());
    Ok(config)
}

/// Runs the server until it is stopped (SIGINT or SIGTERM).
pub fn run(args: ServeArgs, token: Option<String>) -> anyhow::Result<()> {
    let config = config(&args, token)?;
    init_tracing(args.log_format)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(tally_server::serve(config))
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
mod tests {
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

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tally.yaml");
        std::fs::write(
            &file,
            "dataDir: /var/lib/tally\nlisten: 0.0.0.0:9000\nmaxBodyBytes: 1024\n",
        )
        .unwrap();
        let file = file.to_str().unwrap();
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
}
