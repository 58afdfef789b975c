//! The cluster backend: the same [`tally_ledger::Ledger`] on many machines.
//!
//! NATS JetStream is the log, workers are the materialisers, ClickHouse is
//! the derived store, and JetStream key-value buckets hold the catalog and
//! the voids ([`mirror`]) and the resources ([`resources`]: [`KvResources`],
//! every node watches the bucket).
//!
//! - **Ingest** ([`ClusterLedger`]): a node validates events on the one
//!   path every backend shares ([`tally_ledger::Admission`]) and publishes
//!   each to stream `billing-usage` on `billing.usage.<project>.ingest`
//!   (project from subject `projects/<p>`, else the configured default; see
//!   [`keys`]), `Nats-Msg-Id` = the dedupe key of (source, id), and answers
//!   only after every PubAck.
//! - **Duplicates in the answer** are exact over the whole horizon, at
//!   any node, without ClickHouse: after its PubAck each event claims its
//!   dedupe key in the key-value bucket `tally-dedupe` (a create at subject
//!   sequence 0); a claim that finds the key taken, or a PubAck saying
//!   `duplicate` (JetStream's window), answers `duplicate`. The bucket
//!   keeps keys longer than any two admitted copies of an event can be
//!   apart (`max_lateness + max_future` + a day; [`dedupe_horizon`]).
//!   Cost: one more small JetStream publish per event, and nats-server
//!   holds one subject per event of the horizon (figures in BENCHMARKS.md).
//!   Layout, subjects and ids: `layout.rs`.
//! - **Workers** (`worker.rs`): pull subscribers of one durable consumer,
//!   any number per process ([`ClusterLedgerConfig::workers`],
//!   [`ClusterLedger::spawn_workers`]) and per cluster. They write raw
//!   events to ClickHouse idempotently ([`ch`]: keyed by (source, id), the
//!   lowest stream sequence wins, read `FINAL`), publish each new event on
//!   `billing.usage.<project>.valid` or, once per meter that cannot measure
//!   it, on `.quarantine.<reason>` (same stream, `Nats-Msg-Id` set, so a
//!   worker's re-publish after a crash is dropped), then acknowledge.
//! - **Rollups** (`rollup.rs`): a roller on each node that runs workers
//!   measures the materialised events of every meter into ClickHouse's
//!   `samples` (exact `Decimal128`, one row per meter generation and
//!   event, idempotent), up to a per-generation mark; a meter applied or
//!   edited later is backfilled as a new generation.
//! - **Reads** (`read.rs`): below the mark, ClickHouse sums, counts and
//!   picks `samples` per day, hour or minute; above it (and where a value
//!   cannot be held exactly) meters are evaluated at read time over the
//!   materialised events with `tally-meter`'s own sampling and mergeable
//!   states, so every aggregation and window answers as the embedded
//!   backend's, and a meter applied late answers for its events at once. An answer
//!   includes what workers materialised: [`ClusterLedger::materialised_below`]
//!   (a stream sequence) and `LedgerStats::materialise_lag_*` say how far.
//!   While ClickHouse is down, ingest keeps acknowledging (the stream
//!   buffers) and reads answer `NotReady` (503) naming ClickHouse; failed
//!   inserts are counted by table and reason (`LedgerStats::insert_errors`,
//!   `tally_store_insert_errors_total` on `/metrics`).
//!
//! Known differences from the embedded backend: a Retired
//! meter measures the events stored before the catalog entry that retired
//! it was written (a later edit of the Retired meter moves that point);
//! `still_counted_by` is always empty (read-time evaluation takes a void out
//! of every meter); a void needs its event materialised (`NotFound` before);
//! `usage_span` spans every materialised event of the meter's type.
//! The quarantine listing evaluates the materialised events at read time
//! (a catalog edit releases events at once), so it does not read the
//! `.quarantine.<reason>` subjects: those are the notifications the
//! platform subscribes to, as of materialisation.
//!
//! Compute observability on a cluster: [`ClusterLifecycle`] (instance
//! lifecycle events, `tally_compute::LifecycleEvents`) and
//! [`ClusterLogStore`] (instance logs, `tally_logstore::LogStore`) keep
//! their data in the same ClickHouse database, so every node answers
//! what any node received (tables and guarantees in their module docs).
//!
//! Entry point: [`ClusterLedger::connect`] with a [`ClusterLedgerConfig`]
//! (starts `workers` workers in-process); [`ClusterLedger::set_resources`]
//! gives it the resource store that attributes usage to billing accounts.

mod api;
pub mod ch;
pub mod keys;
mod layout;
mod ledger;
pub mod lifecycle;
pub mod logs;
mod measure;
pub mod mirror;
mod plan;
mod read;
pub mod resources;
mod rollup;
mod stamp;
mod worker;

pub use layout::{LEGACY_QUARANTINE_STREAM, SUBJECTS, dedupe_horizon};
pub use ledger::{
    CATALOG_BUCKET, CONSUMER, ClusterLedger, ClusterLedgerConfig, ConnectError, DEDUPE_BUCKET,
    STREAM, VOIDS_BUCKET,
};
pub use lifecycle::ClusterLifecycle;
pub use logs::ClusterLogStore;
pub use resources::{KvResources, KvResourcesConfig, KvResourcesError};
