//! The collector: tailer + aggregator + a durable outbox of usage events.
//! A collector opened with [`Collector::open_gauges`] reads no file: its
//! input is gauge samples of open connections ([`Collector::push_gauges`]),
//! and the last sample is part of the checkpoint. One opened with
//! [`Collector::open_lifecycle`] tails a file of [`LifecycleRecord`] lines
//! (connection lifecycle events) instead of access-log lines, applies each
//! (`source`, `id`) once, and moves time on with [`Collector::advance_to`].
//!
//! See the crate documentation for the exactly-once invariant. The state
//! store is one fjall database in `state_dir` with the keyspaces `outbox`
//! (event id → CloudEvent JSON, not yet acknowledged), `meta` (key
//! `state` → [`Checkpoint`] JSON) and, for lifecycle collectors, `seen`
//! (`source` NUL `id` → event time, Unix ms as 8 big-endian bytes: the
//! lifecycle events applied within the deduplication horizon), written in
//! the same batch as the checkpoint.
//!
//! [`LifecycleRecord`]: crate::lifecycle::LifecycleRecord

use std::path::{Path, PathBuf};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use serde::{Deserialize, Serialize};
use tally_model::CloudEvent;

use crate::aggregate::{Aggregator, AggregatorState, WindowConfig, WindowUsage};
use crate::enrich::EnrichmentIndex;
use crate::event::{AgentIdentity, usage_event};
use crate::lifecycle::LifecycleApplier;
use crate::record::LineDiagnostics;
use crate::route::RouteKey;
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
    /// The last gauge sample (collectors of gauges only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gauges: Option<GaugeSample>,
}

/// One sample of open-connection gauges, summed per route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GaugeSample {
    /// When the gauges were read, Unix ms.
    pub at_millis: i64,
    /// Open connections per route at that time.
    pub gauges: Vec<(RouteKey, u64)>,
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
    /// A `seen` entry is not an event time.
    #[error("the deduplication entry {key:?} in {path} is not an event time")]
    Seen { path: PathBuf, key: String },
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
    /// `tally_component_queue_depth`: events awaiting acknowledgement.
    pub outbox_depth: usize,
}

/// What a collector is opened to read.
enum Reads {
    AccessLog,
    Gauges,
    /// With this deduplication horizon, ms.
    Lifecycle(i64),
}

/// What a collector reads, and the state that needs.
enum Input {
    /// Access-log lines from a file.
    AccessLog,
    /// Gauge samples pushed by the caller.
    Gauges,
    /// Lifecycle record lines from a file, applied once per (source, id).
    Lifecycle {
        applier: LifecycleApplier,
        seen: Keyspace,
    },
}

/// Tails the access log into a durable outbox of usage events.
pub struct Collector {
    config: CollectorConfig,
    db: Database,
    outbox: Keyspace,
    meta: Keyspace,
    input: Input,
    tailer: Option<FileTailer>,
    aggregator: Aggregator,
    gauges: Option<GaugeSample>,
    outbox_len: usize,
    enrichment: EnrichmentIndex,
    committed_files: TailCheckpoint,
    uncommitted_lines: u64,
    stats: CollectorStats,
    poisoned: bool,
}

impl Collector {
    /// Opens the state store and resumes from its checkpoint.
    pub fn open(config: CollectorConfig) -> Result<Self, CollectError> {
        Self::open_input(config, Reads::AccessLog)
    }

    /// Opens a collector that reads no file (`config.log_path` is not
    /// used): its input is [`Collector::push_gauges`].
    pub fn open_gauges(config: CollectorConfig) -> Result<Self, CollectError> {
        Self::open_input(config, Reads::Gauges)
    }

    /// Opens a collector tailing `config.log_path` as lines of
    /// [`LifecycleRecord`](crate::lifecycle::LifecycleRecord)s, each
    /// (`source`, `id`) applied once while its event time is within
    /// `dedupe_horizon_millis` of the watermark. Time moves on with the
    /// records and with [`Collector::advance_to`].
    pub fn open_lifecycle(
        config: CollectorConfig,
        dedupe_horizon_millis: i64,
    ) -> Result<Self, CollectError> {
        Self::open_input(config, Reads::Lifecycle(dedupe_horizon_millis))
    }

    fn open_input(config: CollectorConfig, reads: Reads) -> Result<Self, CollectError> {
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
        let (files, aggregator, gauges) = match checkpoint {
            None => (Vec::new(), Aggregator::new(config.window), None),
            Some(c) => {
                // Window indexes in the state are in units of the stored
                // window size; lateness and watermark step may change.
                if c.window.window_millis != config.window.window_millis {
                    return Err(CollectError::WindowChanged {
                        stored: c.window,
                        configured: config.window,
                    });
                }
                (
                    c.files,
                    Aggregator::from_state(config.window, c.aggregator),
                    c.gauges,
                )
            }
        };
        let outbox_len = outbox.len().map_err(store)?;
        let input = match reads {
            Reads::AccessLog => Input::AccessLog,
            Reads::Gauges => Input::Gauges,
            Reads::Lifecycle(horizon) => {
                let seen = db
                    .keyspace("seen", KeyspaceCreateOptions::default)
                    .map_err(store)?;
                let mut remembered = Vec::new();
                for item in seen.iter() {
                    let (key, value) = item.into_inner().map_err(store)?;
                    let key = String::from_utf8_lossy(&key).into_owned();
                    let at = <[u8; 8]>::try_from(&value[..])
                        .map(i64::from_be_bytes)
                        .map_err(|_| CollectError::Seen {
                            path: config.state_dir.clone(),
                            key: key.clone(),
                        })?;
                    remembered.push((key.into_boxed_str(), at));
                }
                Input::Lifecycle {
                    applier: LifecycleApplier::new(horizon, remembered),
                    seen,
                }
            }
        };
        let tailer = match input {
            Input::Gauges => None,
            _ => Some(FileTailer::open(&config.log_path, &files)?),
        };
        tracing::info!(log = %config.log_path.display(), state = %config.state_dir.display(),
            files = files.len(), open_buckets = aggregator.open_buckets(), outbox = outbox_len,
            "collector resumed");
        Ok(Collector {
            config,
            db,
            outbox,
            meta,
            input,
            tailer,
            aggregator,
            gauges,
            outbox_len,
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
        self.poll_observed(|_| {})
    }

    /// [`Collector::poll`], showing each access-log line read to `observe`
    /// as well (the agent's telemetry policies see every line the meters
    /// see; lifecycle lines are not shown).
    pub fn poll_observed(
        &mut self,
        mut observe: impl FnMut(&[u8]),
    ) -> Result<PollReport, CollectError> {
        self.check()?;
        let mut closed = Vec::new();
        let aggregator = &mut self.aggregator;
        let max = self.config.max_read_bytes;
        let lines = match (&mut self.tailer, &mut self.input) {
            (Some(tailer), Input::Lifecycle { applier, .. }) => {
                tailer.read_lines(max, |line| applier.push_line(aggregator, line, &mut closed))?
            }
            (Some(tailer), _) => tailer.read_lines(max, |line| {
                observe(line);
                aggregator.push_line(line, &mut closed)
            })?,
            (None, _) => 0,
        };
        self.uncommitted_lines += lines;
        self.stats.received_lines += lines;
        let due = self.uncommitted_lines >= self.config.checkpoint_every_lines;
        let events = self.commit(due, &closed)?;
        Ok(PollReport { lines, events })
    }

    /// Integrates the previous gauge sample over the time up to `sample`
    /// (each route's open connections held until this sample), commits the
    /// windows that closes together with `sample` as the new last sample.
    /// A gap longer than `max_gap_millis` since the previous sample (the
    /// agent or Envoy's admin was away) is not billed; a sample not later
    /// than the previous one is ignored.
    pub fn push_gauges(
        &mut self,
        sample: GaugeSample,
        max_gap_millis: i64,
    ) -> Result<PollReport, CollectError> {
        self.check()?;
        let mut closed = Vec::new();
        if let Some(previous) = &self.gauges {
            let (from, to) = (previous.at_millis, sample.at_millis);
            if to <= from {
                tracing::warn!(
                    previous = from,
                    sample = to,
                    "a gauge sample is not later than the previous one; ignored"
                );
                return Ok(PollReport::default());
            }
            if to - from <= max_gap_millis {
                for (route, connections) in &previous.gauges {
                    self.aggregator.push_connection_gauge(
                        route,
                        from,
                        to,
                        *connections,
                        &mut closed,
                    );
                }
            } else {
                tracing::warn!(
                    gap_ms = to - from,
                    max_gap_ms = max_gap_millis,
                    "no gauge sample for too long; that time is not billed"
                );
            }
        }
        self.aggregator.advance_to(sample.at_millis, &mut closed);
        self.gauges = Some(sample);
        self.uncommitted_lines += 1;
        self.stats.received_lines += 1;
        let events = self.commit(true, &closed)?;
        Ok(PollReport { lines: 1, events })
    }

    /// Moves time on to `at_millis` (as a record of that time would),
    /// commits the windows that closes — for a lifecycle collector, with
    /// its open connections accounted up to the closing boundary.
    pub fn advance_to(&mut self, at_millis: i64) -> Result<PollReport, CollectError> {
        self.check()?;
        let mut closed = Vec::new();
        self.aggregator.advance_to(at_millis, &mut closed);
        let events = self.commit(false, &closed)?;
        Ok(PollReport { lines: 0, events })
    }

    /// The watermark (largest event time seen or advanced to), Unix ms.
    pub fn watermark(&self) -> Option<i64> {
        self.aggregator.watermark()
    }

    /// The last gauge sample committed or pushed.
    pub fn last_gauges(&self) -> Option<&GaugeSample> {
        self.gauges.as_ref()
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
        let mut removed = 0;
        for id in ids {
            if self
                .outbox
                .contains_key(id)
                .map_err(|e| self.store_error(e))?
            {
                batch.remove(&self.outbox, id);
                removed += 1;
            }
        }
        batch.commit().map_err(|e| self.store_error(e))?;
        self.outbox_len = self.outbox_len.saturating_sub(removed);
        Ok(())
    }

    /// Lines and inputs that could not be used, by reason.
    pub fn diagnostics(&self) -> &LineDiagnostics {
        self.aggregator.diagnostics()
    }

    /// Counters for the component metrics.
    pub fn stats(&self) -> CollectorStats {
        CollectorStats {
            outbox_depth: self.outbox_len,
            ..self.stats
        }
    }

    /// Checkpointed files that were gone when the collector opened: their
    /// unread lines could not be counted.
    pub fn lost_files(&self) -> &[crate::tail::FilePosition] {
        self.tailer.as_ref().map_or(&[], FileTailer::lost_files)
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
    /// A file the tailer started reading is committed at once, even without
    /// events: should the agent stop before its next commit and the file be
    /// rotated meanwhile, the checkpoint must know it to find it again.
    fn commit(&mut self, due: bool, closed: &[WindowUsage]) -> Result<usize, CollectError> {
        let files = self
            .tailer
            .as_ref()
            .map(FileTailer::checkpoint)
            .unwrap_or_default();
        let new_file = files.iter().any(|file| {
            !self
                .committed_files
                .iter()
                .any(|known| known.device == file.device && known.inode == file.inode)
        });
        if !due && !new_file && closed.is_empty() {
            return Ok(0);
        }
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
            gauges: self.gauges.clone(),
        };
        let state = serde_json::to_vec(&checkpoint).map_err(CollectError::Encode)?;
        batch.insert(&self.meta, STATE_KEY, state);
        if let Input::Lifecycle { applier, seen } = &mut self.input {
            if let Some(watermark) = self.aggregator.watermark() {
                applier.expire(watermark);
            }
            for (key, at) in applier.take_changes() {
                match at {
                    Some(at) => batch.insert(seen, &*key, at.to_be_bytes()),
                    None => batch.remove(seen, &*key),
                }
            }
        }
        batch.commit().map_err(|e| self.store_error(e))?;
        self.poisoned = false;
        self.committed_files = files;
        self.uncommitted_lines = 0;
        self.stats.emitted_events += closed.len() as u64;
        self.outbox_len += closed.len();
        if !closed.is_empty() {
            tracing::debug!(
                events = closed.len(),
                "usage events committed to the outbox"
            );
        }
        Ok(closed.len())
    }
}
