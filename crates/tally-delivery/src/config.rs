//! How a sink batches, retries and queues. Every field has a default.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// Everything the delivery machinery needs to know about one sink.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// The component id (the `component_id` metrics label); unique per sink.
    pub id: String,
    /// How items are grouped into requests.
    pub batch: BatchConfig,
    /// How failed requests are retried.
    pub retry: RetryConfig,
    /// Where items wait and how many may.
    pub queue: QueueConfig,
}

impl SinkConfig {
    /// Defaults for everything but the id.
    pub fn new(id: impl Into<String>) -> Self {
        SinkConfig {
            id: id.into(),
            batch: BatchConfig::default(),
            retry: RetryConfig::default(),
            queue: QueueConfig::default(),
        }
    }
}

/// A batch is sent when it holds `max_items` items, or when adding the next
/// item would pass `max_bytes`, or when its oldest item has waited `timeout`.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// Most items in one request (at least 1).
    pub max_items: usize,
    /// Most item bytes (keys + data) in one request; a single larger item is
    /// still sent, alone.
    pub max_bytes: usize,
    /// Longest time the oldest item of a partial batch waits.
    pub timeout: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_items: 1000,
            max_bytes: 1 << 20,
            timeout: Duration::from_secs(1),
        }
    }
}

/// Exponential backoff with full jitter, bounded by attempts and elapsed time.
#[derive(Debug, Clone)]
pub struct RetryConfig {
    /// Upper bound of the first backoff.
    pub initial_backoff: Duration,
    /// Upper bound of any backoff.
    pub max_backoff: Duration,
    /// Attempts per batch, the first included, before it is dead-lettered
    /// (at least 1).
    pub max_attempts: u32,
    /// If set, no retry starts later than this after the first attempt.
    pub max_elapsed: Option<Duration>,
    /// A `Retry-After` longer than this is cut to this.
    pub max_retry_after: Duration,
    /// Timeout of one request, from sending to the end of the answer's body.
    pub request_timeout: Duration,
    /// HTTP statuses worth retrying. Default 429, 502, 503, 504.
    pub retryable_statuses: BTreeSet<u16>,
}

impl RetryConfig {
    /// Adds every 5xx status to the retryable set (Amberflo asks for this).
    pub fn retry_all_5xx(mut self) -> Self {
        self.retryable_statuses.extend(500..=599);
        self
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            max_attempts: 10,
            max_elapsed: None,
            max_retry_after: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            retryable_statuses: [429, 502, 503, 504].into_iter().collect(),
        }
    }
}

/// Bounds of the queue (items not yet delivered or dead-lettered, the batch in
/// flight included) and where it lives.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Most items queued.
    pub max_items: u64,
    /// Most item bytes (keys + data) queued.
    pub max_bytes: u64,
    /// Memory or disk.
    pub storage: Storage,
    /// Where dead-letter ids come from: `None` (default), the queue's own
    /// sequence; `Some(counter)`, a counter the caller owns (and may share
    /// between sinks that feed one dead-letter list), so the id this crate
    /// logs and reports is the id the caller keeps and shows. A disk queue
    /// raises the counter past the ids it already holds.
    pub dead_letter_ids: Option<Arc<AtomicU64>>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_items: 100_000,
            max_bytes: 256 << 20,
            storage: Storage::Memory,
            dead_letter_ids: None,
        }
    }
}

/// Where queued items and dead letters live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storage {
    /// In memory: lost when the process ends.
    Memory,
    /// In a fjall database in `path` (one directory per sink). With `sync`, an
    /// item is fsync'd before `enqueue` returns, so it survives kill -9 and
    /// power loss; without, it is handed to the OS before `enqueue` returns,
    /// so it survives kill -9 but not power loss. Enqueues that arrive while
    /// a write is in progress share the next write (group commit).
    Disk {
        /// The sink's own directory.
        path: PathBuf,
        /// fsync before `enqueue` returns.
        sync: bool,
    },
}
