//! Instance logs: the stdout and stderr lines of compute instances, kept
//! per (project, instance) for a retention per project, read by the owning
//! project (`tally logs`, the HTTP and Loki-compatible APIs) and followed.
//!
//! The store is reached through [`LogStore`]: [`EmbeddedLogStore`] is the
//! default (one fjall database, the same shape as the ledger's log); a
//! cluster's store (ClickHouse, `tally-store-cluster`) implements the same
//! contract and admits records through the same [`admit`].
//!
//! - **Log first, in compressed blocks.** The writer takes every pending
//!   append, groups the lines per (project, instance) into one block each
//!   ([`block`]: columnar, zstd), writes the blocks, their index entries and
//!   the dedupe entries of their record ids in **one** fjall batch committed
//!   with `SyncAll`, and only then answers the appenders.
//! - **Order:** lines of one instance keep the order in which they were
//!   appended (within a request, and across requests in the order the
//!   writer took them); every line has a [`Position`] (block, index) that
//!   only grows per instance, which is the cursor of [`LogStore::read`] and
//!   of following.
//! - **Records are never split:** a record (a multi-line stack trace sent as
//!   one OTLP record) is one line of the store. A record longer than
//!   [`MAX_LINE_BYTES`] is cut at a UTF-8 boundary to that size and ends
//!   with [`TRUNCATED_MARKER`]; it is counted in [`Stats::truncated`].
//! - **Dedupe:** a record that carries an id (OTLP attribute
//!   `log.record.uid`, or the id `tally collect` derives from a file and
//!   offset) is stored at most once per (project, instance, id) while the
//!   block it was stored in is retained; records without an id are stored
//!   as often as they are sent. So a sender that retries until it gets an
//!   answer and gives ids has each record exactly once, across a kill -9 of
//!   the store (`tests/crash.rs`).
//! - **Retention:** [`LogStore::sweep`] deletes every block whose newest
//!   line is older than its project's retention (default 7 days), with the
//!   dedupe entries of its records.
//!
//! **Never:** answer an append before its batch is synced; return a line of
//! another project than the one asked for (every key starts with the
//! project); hold more than the configured pending bytes in memory (an
//! append over the bound is refused with [`LogError::Busy`]).

pub mod block;
mod embedded;
pub mod filter;
mod keys;
pub mod limits;
pub mod logql;

use std::time::Duration;

pub use embedded::{EmbeddedLogStore, StoreConfig};
pub use filter::{FilterError, LineFilter};

/// The longest line kept whole, in bytes; a longer record is cut to this
/// many bytes (at a UTF-8 boundary) and ends with [`TRUNCATED_MARKER`].
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// What ends a line that was cut to [`MAX_LINE_BYTES`].
pub const TRUNCATED_MARKER: &str = " …[truncated by tally]";

/// The longest project, instance, workload or record id accepted.
pub const MAX_NAME_BYTES: usize = 253;

/// The retention of a project that has none configured.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Which output of the instance a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }

    pub fn parse(s: &str) -> Option<Stream> {
        match s {
            "stdout" => Some(Stream::Stdout),
            "stderr" => Some(Stream::Stderr),
            _ => None,
        }
    }

    fn to_byte(self) -> u8 {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }

    fn from_byte(b: u8) -> Option<Stream> {
        match b {
            0 => Some(Stream::Stdout),
            1 => Some(Stream::Stderr),
            _ => None,
        }
    }
}

/// One record handed to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub project: String,
    pub instance: String,
    /// The instance's workload, if the sender named it (a label).
    pub workload: Option<String>,
    pub stream: Stream,
    /// When the line was written, in Unix nanoseconds (the arrival time if
    /// the sender gave none).
    pub time_nanos: i64,
    /// The sender's record id, for dedupe.
    pub id: Option<String>,
    pub line: String,
}

/// Where a stored line is: the block (store-wide sequence) and the line's
/// index in it. Ordered as lines were appended, per instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    pub block: u64,
    pub index: u32,
}

/// A stored line as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub instance: String,
    pub stream: Stream,
    pub time_nanos: i64,
    pub position: Position,
    pub line: String,
}

/// What an append did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AppendReport {
    /// Lines stored.
    pub stored: u64,
    /// Records not stored because their id was already stored.
    pub duplicates: u64,
    /// Stored lines that were cut to [`MAX_LINE_BYTES`].
    pub truncated: u64,
}

/// A read of one project's lines.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    pub project: String,
    /// The instances to read; empty: every instance of the project.
    pub instances: Vec<String>,
    /// Only lines of this stream.
    pub stream: Option<Stream>,
    /// Lines at or after this time (Unix nanoseconds).
    pub since_nanos: i64,
    /// Lines before this time (Unix nanoseconds).
    pub until_nanos: i64,
    /// Only lines strictly after this position (following).
    pub after: Option<Position>,
    /// Every filter must hold.
    pub filters: Vec<LineFilter>,
    /// At most this many lines (the newest if `newest_first`, else the
    /// oldest).
    pub limit: usize,
    pub newest_first: bool,
}

/// The answer to a [`LogQuery`].
#[derive(Debug, Clone, Default)]
pub struct LogPage {
    /// Lines in append order per instance, instances interleaved by time
    /// (newest first if asked).
    pub lines: Vec<LogLine>,
    /// Whether the scan stopped at its byte budget or at `limit` before the
    /// range was read whole.
    pub truncated: bool,
    /// Raw bytes of the blocks read.
    pub scanned_bytes: u64,
}

/// An instance a project has logs of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    pub instance: String,
    pub workload: Option<String>,
    pub newest_nanos: i64,
}

/// Totals for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes of the store's directory on disk.
    pub disk_bytes: u64,
    /// Raw text bytes of the lines retained.
    pub raw_bytes: u64,
    /// Compressed bytes of the blocks retained.
    pub block_bytes: u64,
    pub lines: u64,
    pub appended_lines: u64,
    pub duplicates: u64,
    pub truncated: u64,
    pub swept_blocks: u64,
}

/// Why the store refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log store at {path}: {source}")]
    Store {
        path: String,
        #[source]
        source: fjall::Error,
    },
    #[error("log store: corrupt block {block} of {project}/{instance}: {why}")]
    Corrupt {
        project: String,
        instance: String,
        block: u64,
        why: String,
    },
    #[error("invalid log record: {0}")]
    Invalid(String),
    /// Too much is pending: the caller should retry after `retry_after`.
    #[error("{why}; retry in {} s", retry_after.as_secs().max(1))]
    Busy { why: String, retry_after: Duration },
    #[error("the log store's writer has stopped")]
    Stopped,
    /// A store on other servers (a cluster's ClickHouse) did not answer.
    #[error("log store: {0}")]
    Unavailable(String),
}

/// Waits for an append's answer.
pub type AppendTicket = tokio::sync::oneshot::Receiver<Result<AppendReport, LogError>>;

/// The contract of a log backend: the embedded store here, a cluster's
/// (ClickHouse) in `tally-store-cluster`. Reads block (run them off the
/// async workers).
pub trait LogStore: Send + Sync {
    /// Queues `records` for the writer; the ticket answers once they are
    /// durable (or refused). Refuses at once with [`LogError::Busy`] when
    /// the pending bound of an instance or of the store would be exceeded,
    /// and with [`LogError::Invalid`] for a record breaking a bound.
    fn append(&self, records: Vec<LogRecord>) -> Result<AppendTicket, LogError>;
    /// Lines of one project, per `query`.
    fn read(&self, query: &LogQuery) -> Result<LogPage, LogError>;
    /// The instances `project` has lines of (every project's: `None`).
    fn instances(&self, project: Option<&str>) -> Result<Vec<(String, InstanceInfo)>, LogError>;
    /// Deletes what is past its project's retention at `now_nanos`; returns
    /// the blocks deleted.
    fn sweep(&self, now_nanos: i64) -> Result<u64, LogError>;
    fn stats(&self) -> Stats;
    /// Changes after every committed append (the number of lines stored):
    /// followers wait on it, then read after their position.
    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64>;
}

/// Checks a record's bounds; cuts a long line. Returns whether it was cut.
/// Every backend admits records through this, so the bounds are one.
pub fn admit(record: &mut LogRecord) -> Result<bool, LogError> {
    for (what, value) in [
        ("project", Some(record.project.as_str())),
        ("instance", Some(record.instance.as_str())),
        ("workload", record.workload.as_deref()),
        ("record id", record.id.as_deref()),
    ] {
        if let Some(v) = value
            && (v.len() > MAX_NAME_BYTES || v.contains('\0'))
        {
            return Err(LogError::Invalid(format!(
                "{what} longer than {MAX_NAME_BYTES} bytes or containing NUL"
            )));
        }
    }
    if record.project.is_empty() || record.instance.is_empty() {
        return Err(LogError::Invalid(
            "a log record needs a project and an instance".into(),
        ));
    }
    if record.line.len() <= MAX_LINE_BYTES {
        return Ok(false);
    }
    let mut cut = MAX_LINE_BYTES - TRUNCATED_MARKER.len();
    while !record.line.is_char_boundary(cut) {
        cut -= 1;
    }
    record.line.truncate(cut);
    record.line.push_str(TRUNCATED_MARKER);
    Ok(true)
}
