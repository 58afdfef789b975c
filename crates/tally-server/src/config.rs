//! `tally serve` configuration: a YAML file, overridden by flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::auth::TokenConfig;

/// Everything `tally serve` needs. Every field has a default, so an empty
/// config file is valid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Where the embedded store keeps its files.
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
    /// Directories whose `*.yaml`, `*.yml` and `*.json` manifests are applied
    /// at start and whenever a file changes (every 5 s), as by `tally apply`.
    /// Removing a file deletes nothing.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub manifest_dirs: Vec<PathBuf>,
    /// The billing forwarder (BillingSink resources).
    pub billing: BillingServeConfig,
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
            manifest_dirs: Vec::new(),
            billing: BillingServeConfig::default(),
        }
    }
}

impl ServeConfig {
    /// Reads a YAML config file.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<ServeConfig> {
        use anyhow::Context;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        if text.trim().is_empty() {
            return Ok(ServeConfig::default());
        }
        serde_norway::from_str(&text)
            .with_context(|| format!("parsing config file {}", path.display()))
    }
}
