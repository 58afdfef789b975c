//! Requests and answers of the [`crate::Ledger`].

use std::collections::BTreeMap;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tally_meter::WindowSize;
use tally_model::{CloudEvent, EventError, Manifest, ResourceError};

/// Why the ledger refused a request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LedgerError {
    /// The request was understood and is wrong; nothing changed.
    #[error("{0}")]
    Invalid(String),
    /// Some events of an ingest request are unacceptable; nothing was stored.
    #[error("{} event(s) refused", .0.len())]
    Rejected(Vec<EventError>),
    #[error(transparent)]
    Resource(#[from] ResourceError),
    #[error("{kind} {name:?} not found")]
    NotFound { kind: String, name: String },
    #[error("{0}")]
    Conflict(String),
    /// Temporarily unable to answer (e.g. a meter still backfilling).
    #[error("{message}")]
    NotReady {
        message: String,
        retry_after_seconds: u64,
    },
    /// Storage failed; the request may or may not have taken effect only if
    /// it was a write that the caller retries idempotently.
    #[error("storage error: {0}")]
    Storage(String),
}

impl LedgerError {
    pub fn not_found(kind: impl ToString, name: impl Into<String>) -> Self {
        LedgerError::NotFound {
            kind: kind.to_string(),
            name: name.into(),
        }
    }
}

/// Whether `apply` may replace an existing resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApplyMode {
    /// Create the resource or update it (`tally apply`, `POST /apis/apply`).
    #[default]
    Upsert,
    /// Create the resource; refuse with `Conflict` if it exists. Decided
    /// atomically with the write, so two concurrent creates of one name
    /// cannot both succeed.
    CreateOnly,
}

/// What happened to an ingest request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IngestOutcome {
    /// Events newly stored.
    pub accepted: u64,
    /// Events already stored before (same source and id); acknowledged, not stored again.
    pub duplicates: u64,
    /// Stored events that some meter cannot measure yet, with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quarantined: Vec<QuarantineNotice>,
    /// Things the sender should know, e.g. that a meter it feeds is Deprecated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// One event that was stored but put in quarantine for one meter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QuarantineNotice {
    pub index: usize,
    pub id: String,
    pub meter: String,
    pub reason: String,
    pub message: String,
}

/// The result of applying a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyAction {
    Created,
    Configured,
    Unchanged,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    pub action: ApplyAction,
    pub manifest: Manifest,
}

/// A meter query. `from` inclusive, `to` exclusive. [`crate::Ledger::query`]
/// takes whole minutes; [`crate::exact::query`] takes any precision.
#[derive(Debug, Clone)]
pub struct MeterQuery {
    pub from: Timestamp,
    pub to: Timestamp,
    pub window_size: Option<WindowSize>,
    pub time_zone: TimeZone,
    /// Only these subjects (all when empty). Rows are per subject when set.
    pub subjects: Vec<String>,
    /// Dimensions to group by; `subject` groups by subject.
    pub group_by: Vec<String>,
    /// Only rows whose dimension equals the value.
    pub filter_group_by: BTreeMap<String, String>,
    pub limit: Option<usize>,
    pub cursor: Option<String>,
}

/// One row of a meter query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueryRow {
    pub window_start: Timestamp,
    pub window_end: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default)]
    pub group_by: BTreeMap<String, Option<String>>,
    pub value: Decimal,
}

/// The answer of [`crate::Ledger::query_states`]: the rows, each with the
/// mergeable state its value is the result of (`states[i]` is `rows[i]`'s).
#[derive(Debug, Clone, PartialEq)]
pub struct StatefulResult {
    pub rows: Vec<QueryRow>,
    pub states: Vec<tally_meter::AggState>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueryResult {
    pub rows: Vec<QueryRow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Filters for listing stored events.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Event time, inclusive.
    pub from: Option<Timestamp>,
    /// Event time, exclusive.
    pub to: Option<Timestamp>,
    pub event_type: Option<String>,
    pub subject: Option<String>,
    pub source: Option<String>,
    pub id: Option<String>,
    /// Time stored, inclusive.
    pub ingested_from: Option<Timestamp>,
    /// Time stored, exclusive.
    pub ingested_to: Option<Timestamp>,
    pub limit: usize,
    pub cursor: Option<String>,
}

/// A request to void one stored event: a correction with an audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VoidRequest {
    pub source: String,
    pub id: String,
    /// Why; kept in the audit trail.
    pub reason: String,
    /// Who asked (the token's name); filled in by the server.
    #[serde(default)]
    pub voided_by: String,
}

/// The audit record of a voided event. Voiding takes the event out of every
/// meter; the event itself stays in the log and its (source, id) stays
/// taken, so a re-send is still a duplicate. A correction is a new event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VoidRecord {
    pub seq: u64,
    pub source: String,
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub subject: String,
    pub event_time: Timestamp,
    pub reason: String,
    pub voided_by: String,
    pub voided_at: Timestamp,
}

/// The answer to a void request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VoidOutcome {
    /// True when the event had been voided before; `record` is that first void.
    pub already_voided: bool,
    pub record: VoidRecord,
    /// Meters that still count the event: Retired meters of an aggregation
    /// that cannot take an event back out (MIN, MAX, LATEST, UNIQUE_COUNT),
    /// whose rebuild from the log would lose the history they keep.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub still_counted_by: Vec<String>,
}

/// Void records, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VoidPage {
    pub items: Vec<VoidRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// An event as the ledger keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredEvent {
    pub seq: u64,
    pub ingested_at: Timestamp,
    pub event: CloudEvent,
    /// Set when the event was voided: it no longer counts in any meter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voided: Option<VoidRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventPage {
    pub items: Vec<StoredEvent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct QuarantineFilter {
    pub meter: Option<String>,
    pub limit: usize,
    pub cursor: Option<String>,
}

/// A stored event that a meter cannot measure, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QuarantinedEvent {
    pub meter: String,
    pub reason: String,
    pub message: String,
    pub event: StoredEvent,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QuarantinePage {
    pub items: Vec<QuarantinedEvent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// How far a ledger's derived state lags its log, against the bound past
/// which ingest waits for it ([`crate::Ledger::backlog`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    /// Acknowledged events not yet materialised.
    pub events: u64,
    /// At or past this many, a new ingest waits for the backlog to shrink.
    pub max_events: u64,
}

impl Backlog {
    /// A ledger with nothing behind its acknowledgement.
    pub const NONE: Backlog = Backlog {
        events: 0,
        max_events: u64::MAX,
    };

    /// Whether an ingest now would wait for room.
    pub fn is_full(&self) -> bool {
        self.events >= self.max_events
    }
}

/// Counters a ledger exports on `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LedgerStats {
    pub events_accepted_total: u64,
    pub events_duplicate_total: u64,
    pub events_quarantined_total: u64,
    pub group_commits_total: u64,
    /// Everything the store occupies on disk, its journal included.
    pub disk_bytes: u64,
    /// The part of `disk_bytes` that is write-ahead journal: bounded, and
    /// given back as memtables are flushed to tables.
    #[serde(default)]
    pub journal_bytes: u64,
    /// Acknowledged events whose derived state (rollups, quarantine) is
    /// not yet materialised; queries count them all the same.
    #[serde(default)]
    pub materialise_lag_events: u64,
    /// How long ago the oldest of them was acknowledged.
    #[serde(default)]
    pub materialise_lag_seconds: f64,
    /// Failed inserts into a derived store (ClickHouse on a cluster), by
    /// table and then by reason; empty for the embedded backend.
    #[serde(default)]
    pub insert_errors: BTreeMap<String, BTreeMap<String, u64>>,
    pub kinds: BTreeMap<String, u64>,
}

/// A position in a meter's change feed: how far the event log and the
/// audit trail of voids were read. Voids get their own order (the order in
/// which they were recorded), because a void changes an old event whose log
/// position a reader has long passed. Written `<log>-<voids>`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChangeCursor {
    /// The next log sequence number to read.
    pub log: u64,
    /// The next void (in recording order) to read.
    pub voids: u64,
}

impl std::fmt::Display for ChangeCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.log, self.voids)
    }
}

impl std::str::FromStr for ChangeCursor {
    type Err = LedgerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || LedgerError::Invalid(format!("change cursor {s:?} is not <log>-<voids>"));
        let (log, voids) = s.split_once('-').ok_or_else(bad)?;
        Ok(ChangeCursor {
            log: log.parse().map_err(|_| bad())?,
            voids: voids.parse().map_err(|_| bad())?,
        })
    }
}

/// What changed a meter's input after a cursor: the event times of events
/// of the meter's type that were stored, and of those that were voided.
/// Anything listed is already reflected in a query asked afterwards.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChangePage {
    /// Event times; repeats allowed, in no particular order.
    pub times: Vec<Timestamp>,
    /// Where to continue.
    pub next: ChangeCursor,
    /// True when the page stopped at its limit: ask again from `next`.
    pub more: bool,
}
