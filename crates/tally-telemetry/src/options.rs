//! How the exporters' runtime runs: queue sizes and storage, timeouts, the
//! egress allow-list and the optional VictoriaMetrics pull source.

use std::path::PathBuf;
use std::time::Duration;

use tally_delivery::EgressPolicy;

/// Where sinks queue batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueStorage {
    /// In memory (lost on exit; counted as dropped with reason `shutdown`).
    Memory,
    /// One fjall directory per sink under `dir`; survives restarts.
    Disk {
        /// The parent directory.
        dir: PathBuf,
        /// fsync every append.
        sync: bool,
    },
}

/// How the pipeline runs its sinks. Every field has a default.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// Shares of requests waiting for a sink's task (each holds what one
    /// exporter selected of one request).
    pub handoff_capacity: usize,
    /// Batches a sink's queue holds at most.
    pub queue_max_batches: u64,
    /// Bytes (encoded protobuf) a sink's queue holds at most.
    pub queue_max_bytes: u64,
    /// Where the queues live.
    pub storage: QueueStorage,
    /// Timeout of one request to an endpoint.
    pub request_timeout: Duration,
    /// Longest backoff between retries.
    pub max_backoff: Duration,
    /// Longest `Retry-After` honoured.
    pub max_retry_after: Duration,
    /// How long a removed or changed sink may go on sending what it holds.
    pub shutdown_grace: Duration,
    /// Pull every exporter source from this VictoriaMetrics too (default:
    /// in-stream only).
    pub pull: Option<PullOptions>,
    /// Which addresses sinks may reach besides global unicast ones (the
    /// operator's allow-list; default: none).
    pub egress: EgressPolicy,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            handoff_capacity: 1024,
            queue_max_batches: 10_000,
            queue_max_bytes: 64 << 20,
            storage: QueueStorage::Memory,
            request_timeout: Duration::from_secs(10),
            max_backoff: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(5),
            pull: None,
            egress: EgressPolicy::default(),
        }
    }
}

/// How sources are pulled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullOptions {
    /// The VictoriaMetrics base URL (single node, or a vmselect tenant prefix).
    pub url: String,
    /// Time between pulls once a source has caught up.
    pub interval: Duration,
    /// How far behind now windows end, so samples that arrive late are still read.
    pub lag: Duration,
    /// The longest window one request reads.
    pub window: Duration,
    /// How far back a source seen for the first time starts.
    pub backfill: Duration,
}

impl PullOptions {
    /// Defaults: every 10 s, 30 s behind now, windows of at most 5 min, no backfill.
    pub fn new(url: impl Into<String>) -> PullOptions {
        PullOptions {
            url: url.into(),
            interval: Duration::from_secs(10),
            lag: Duration::from_secs(30),
            window: Duration::from_secs(300),
            backfill: Duration::ZERO,
        }
    }
}
