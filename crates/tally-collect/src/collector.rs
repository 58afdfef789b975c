//! The collector: tailer + aggregator + a durable outbox of usage events.
//!
//! See the crate documentation for the exactly-once invariant. The state
//! store is one fjall database in `state_dir` with two keyspaces: `outbox`
//! (event id → CloudEvent JSON, not yet acknowledged) and `meta` (key
//! `state` → [`Checkpoint`] JSON).

use std::path::{Path, PathBuf};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use serde::{Deserialize, Serialize};
use tally_model::CloudEvent;

use crate::aggregate::{Aggregator, AggregatorState, WindowConfig, WindowUsage};
use crate::enrich::EnrichmentIndex;
use crate::event::{AgentIdentity, usage_event};
use crate::record::LineDiagnostics;
use crate::tail::{FileTailer, TailCheckpoint, TailError};

const STATE_KEY: &str = "state";

/// What the collector reads and where it keeps its state.
#[derive(Debug, Clone)]
pub struct CollectorConfig {
    /// The access-log file to tail (rotated siblings are `path*`).
    pub log_path: PathBuf,
    /// The directory of the state store.
    pub state_dir: PathBuf,
    /// Source and agent id of the events.
    pub agent: AgentIdentity,
    /// The window size must not change for a state directory (checked on
    /// open); lateness and watermark step may.
    pub window: WindowConfig,
    /// About how many bytes one [`Collector::poll`] reads.
    pub max_read_bytes: usize,
    /// Commit a checkpoint after this many lines even when no window
    /// closed (commits also happen whenever events are emitted). Fewer
    /// commits mean more lines read again after a crash, never a wrong count.
    pub checkpoint_every_lines: u64,
}

impl CollectorConfig {
    /// One-minute windows and lateness, 1 MiB reads, a checkpoint at least
    /// every 100,000 lines.
    pub fn new(log_path: PathBuf, state_dir: PathBuf, agent: AgentIdentity) -> Self {
        CollectorConfig {
            log_path,
            state_dir,
            agent,
            window: WindowConfig::default(),
            max_read_bytes: 1 << 20,
            checkpoint_every_lines: 100_000,
        }
    }
}

/// Everything that must be consistent with the outbox, stored in the same
/// batch as the events it produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The window settings the state was built with.
    pub window: WindowConfig,
    /// Where each tailed file stands.
    pub files: TailCheckpoint,
    /// Open windows, watermark, round, carries, open connections.
    pub aggregator: AggregatorState,
}

/// A failure of the collector. After any error but [`CollectError::Tail`]
/// the collector refuses to go on: open it again, which resumes from the last
/// durable checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    /// The fjall store failed.
    #[error("state store in {path}: {source}")]
    Store { path: PathBuf, source: fjall::Error },
    /// Reading the log failed; polling again may succeed.
    #[error(transparent)]
    Tail(#[from] TailError),
    /// The stored checkpoint is not readable by this version.
    #[error("checkpoint in {path} cannot be read: {source}")]
    Checkpoint {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// The window size differs from the checkpoint's.
    #[error(
        "the window size changed from {stored:?} to {configured:?}; keep the old size or start with a new state directory"
    )]
    WindowChanged {
        stored: WindowConfig,
        configured: WindowConfig,
    },
    /// An event or the checkpoint could not be encoded.
    #[error("encoding an event: {0}")]
    Encode(serde_json::Error),
    /// An outbox entry is not a readable event.
    #[error("outbox entry {id} cannot be read: {source}")]
    Outbox {
        id: String,
        source: serde_json::Error,
    },
    /// A commit failed earlier: memory is ahead of the disk.
    #[error("a previous commit failed; open the collector again")]
    Poisoned,
}

/// What one poll or flush did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PollReport {
    /// Lines handed to the aggregator.
    pub lines: u64,
    /// Events made durable in the outbox.
    pub events: usize,
}

/// Counters in the component vocabulary (`tally_component_*`), since the
/// collector was opened; `dropped` is in [`Collector::diagnostics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CollectorStats {
    /// `tally_component_received_total`: lines read.
    pub received_lines: u64,
    /// `tally_component_sent_total`: events made durable in the outbox.
    pub emitted_events: u64,
    /// `tally_component_queue_depth`: events awaiting acknowledgement
    /// (approximate).
    pub outbox_depth: usize,
}

/// Tails the access log into a durable outbox of usage events.
pub struct Collector {
    config: CollectorConfig,
    db: Database,
    outbox: Keyspace,
    meta: Keyspace,
    tailer: FileTailer,
    aggregator: Aggregator,
    enrichment: EnrichmentIndex,
    committed_files: TailCheckpoint,
    uncommitted_lines: u64,
    stats: CollectorStats,
    poisoned: bool,
}

impl Collector {
    /// Opens the state store and resumes from its checkpoint.
    pub fn open(config: CollectorConfig) -> Result<Self, CollectError> {
        let store = |source| CollectError::Store {
            path: config.state_dir.clone(),
            source,
        };
        let db = Database::builder(&config.state_dir).open().map_err(store)?;
        let outbox = db
            .keyspace("outbox", KeyspaceCreateOptions::default)
            .map_err(store)?;
        let meta = db
            .keyspace("meta", KeyspaceCreateOptions::default)
            .map_err(store)?;
        let checkpoint =
            match meta.get(STATE_KEY).map_err(store)? {
                Some(raw) => Some(serde_json::from_slice::<Checkpoint>(&raw).map_err(
                    |source| CollectError::Checkpoint {
                        path: config.state_dir.clone(),
                        source,
                    },
                )?),
                None => None,
            };
        let (files, aggregator) = match checkpoint {
            None => (Vec::new(), Aggregator::new(config.window)),
            Some(c) => {
                // Window indexes in the state are in units of the stored
                // window size; lateness and watermark step may change.
                if c.window.window_millis != config.window.window_millis {
                    return Err(CollectError::WindowChanged {
                        stored: c.window,
                        configured: config.window,
                    });
                }
                (c.files, Aggregator::from_state(config.window, c.aggregator))
            }
        };
        let tailer = FileTailer::open(&config.log_path, &files)?;
        tracing::info!(log = %config.log_path.display(), state = %config.state_dir.display(),
            files = files.len(), open_buckets = aggregator.open_buckets(), "collector resumed");
        Ok(Collector {
            config,
            db,
            outbox,
            meta,
            tailer,
            aggregator,
            enrichment: EnrichmentIndex::default(),
            committed_files: files,
            uncommitted_lines: 0,
            stats: CollectorStats::default(),
            poisoned: false,
        })
    }

    /// The enrichment index used for events built from now on.
    pub fn enrichment_mut(&mut self) -> &mut EnrichmentIndex {
        &mut self.enrichment
    }

    /// Reads what the log has (about `max_read_bytes`), aggregates it, and
    /// commits the events of closed windows with the new checkpoint.
    pub fn poll(&mut self) -> Result<PollReport, CollectError> {
        self.check()?;
        let mut closed = Vec::new();
        let aggregator = &mut self.aggregator;
        let lines = self.tailer.read_lines(self.config.max_read_bytes, |line| {
            aggregator.push_line(line, &mut closed)
        })?;
        self.uncommitted_lines += lines;
        self.stats.received_lines += lines;
        let due = self.uncommitted_lines >= self.config.checkpoint_every_lines;
        let events = self.commit(due, &closed)?;
        Ok(PollReport { lines, events })
    }

    /// Closes every open window (end of input, idle timeout) and commits.
    /// An idle flush makes the split of amounts into events depend on timing;
    /// totals and exactly-once delivery do not.
    pub fn flush(&mut self) -> Result<PollReport, CollectError> {
        self.check()?;
        let mut closed = Vec::new();
        self.aggregator.flush(&mut closed);
        let events = self.commit(true, &closed)?;
        Ok(PollReport { lines: 0, events })
    }

    /// Up to `limit` durable events not yet acknowledged, oldest window first.
    pub fn pending(&self, limit: usize) -> Result<Vec<CloudEvent>, CollectError> {
        let mut events = Vec::new();
        for item in self.outbox.iter().take(limit) {
            let (key, value) = item.into_inner().map_err(|e| self.store_error(e))?;
            let event = serde_json::from_slice(&value).map_err(|source| CollectError::Outbox {
                id: String::from_utf8_lossy(&key).into_owned(),
                source,
            })?;
            events.push(event);
        }
        Ok(events)
    }

    /// Forgets shipped events. Not fsync'd: an acknowledgement lost in a
    /// crash only makes the event ship again, and the ledger drops repeats.
    pub fn acknowledge<'a>(
        &mut self,
        ids: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), CollectError> {
        let mut batch = self.db.batch();
        for id in ids {
            batch.remove(&self.outbox, id);
        }
        batch.commit().map_err(|e| self.store_error(e))
    }

    /// Lines and inputs that could not be used, by reason.
    pub fn diagnostics(&self) -> &LineDiagnostics {
        self.aggregator.diagnostics()
    }

    /// Counters for the component metrics.
    pub fn stats(&self) -> CollectorStats {
        CollectorStats {
            outbox_depth: self.outbox.approximate_len(),
            ..self.stats
        }
    }

    /// Checkpointed files that were gone when the collector opened: their
    /// unread lines could not be counted.
    pub fn lost_files(&self) -> &[crate::tail::FilePosition] {
        self.tailer.lost_files()
    }

    /// Where reading of each tailed file stands, as of the last durable
    /// checkpoint (oldest file first; the last one is the file at the path).
    pub fn positions(&self) -> &[crate::tail::FilePosition] {
        &self.committed_files
    }

    /// The state store's directory.
    pub fn state_dir(&self) -> &Path {
        &self.config.state_dir
    }

    fn check(&self) -> Result<(), CollectError> {
        if self.poisoned {
            Err(CollectError::Poisoned)
        } else {
            Ok(())
        }
    }

    fn store_error(&self, source: fjall::Error) -> CollectError {
        CollectError::Store {
            path: self.config.state_dir.clone(),
            source,
        }
    }

    /// One atomic, fsync'd batch: the new events and the checkpoint.
    fn commit(&mut self, due: bool, closed: &[WindowUsage]) -> Result<usize, CollectError> {
        if !due && closed.is_empty() {
            return Ok(0);
        }
        let files = self.tailer.checkpoint();
        if closed.is_empty() && self.uncommitted_lines == 0 && files == self.committed_files {
            return Ok(0);
        }
        // From here on the memory state is ahead of the disk until the
        // commit succeeds.
        self.poisoned = true;
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
        for usage in closed {
            let event = usage_event(&self.config.agent, usage, &self.enrichment);
            let json = serde_json::to_vec(&event).map_err(CollectError::Encode)?;
            batch.insert(&self.outbox, event.id.as_bytes(), json);
        }
        let checkpoint = Checkpoint {
            window: self.config.window,
            files: files.clone(),
            aggregator: self.aggregator.state(),
        };
        let state = serde_json::to_vec(&checkpoint).map_err(CollectError::Encode)?;
        batch.insert(&self.meta, STATE_KEY, state);
        batch.commit().map_err(|e| self.store_error(e))?;
        self.poisoned = false;
        self.committed_files = files;
        self.uncommitted_lines = 0;
        self.stats.emitted_events += closed.len() as u64;
        if !closed.is_empty() {
            tracing::debug!(
                events = closed.len(),
                "usage events committed to the outbox"
            );
        }
        Ok(closed.len())
    }
}
