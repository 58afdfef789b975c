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
//! - **Duplicates in the answer.** `duplicates` counts the events the
//!   stream answered `duplicate` (a re-send within JetStream's duplicate
//!   window, `duplicate_window`) plus those ClickHouse already holds (asked
//!   before publishing, for at most a second; those are not published). A
//!   re-send after the window whose first copy is not yet materialised (or
//!   while ClickHouse is down) is answered `accepted` — but stored and
//!   counted once all the same: the dedupe decision that counts is the
//!   workers' and ClickHouse's, exact over the whole horizon.
//! - **Workers** (`worker.rs`): pull subscribers of one durable consumer,
//!   any number per process ([`ClusterLedgerConfig::workers`],
//!   [`ClusterLedger::spawn_workers`]) and per cluster. They write raw
//!   events to ClickHouse idempotently ([`ch`]: keyed by (source, id), the
//!   lowest stream sequence wins, read `FINAL`), publish quarantined events
//!   on `billing.usage.<project>.quarantine.<reason>` (stream
//!   `billing-usage-quarantine`), then acknowledge.
//! - **Rollups** (`rollup.rs`, `presum.rs`): a roller on each node that
//!   runs workers follows the workers' progress and measures the new
//!   materialised events of every meter into ClickHouse's `samples`
//!   (exact `Decimal128`, one row per meter generation and event,
//!   idempotent), then sums aligned slabs of stream sequences into
//!   `rollups` (per minute, hour and day; five levels, 16:1), each up to
//!   a per-generation mark; a meter applied or edited later is backfilled
//!   as a new generation, and the old generation's rows are deleted.
//! - **Reads** (`read.rs`): below the marks, ClickHouse sums, counts and
//!   picks pre-summed slabs, then `samples`, per day, hour or minute;
//!   above them (and where a value
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
//! Quarantined events are published to a stream of their own, because
//! nats-server 2.9 scans its store on each fetch of a wildcard-filtered
//! consumer; valid events are not republished on `.valid`.
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
mod ledger;
pub mod lifecycle;
pub mod logs;
mod measure;
pub mod mirror;
mod plan;
mod presum;
mod read;
pub mod resources;
mod rollup;
mod stamp;
mod worker;

pub use ledger::{
    CATALOG_BUCKET, CONSUMER, ClusterLedger, ClusterLedgerConfig, ConnectError, QUARANTINE_STREAM,
    STREAM, VOIDS_BUCKET,
};
pub use lifecycle::ClusterLifecycle;
pub use logs::ClusterLogStore;
pub use resources::{KvResources, KvResourcesConfig, KvResourcesError};
