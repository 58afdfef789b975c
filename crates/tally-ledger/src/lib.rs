//! The usage ledger's contract.
//!
//! [`Ledger`] is what the HTTP server and CLI talk to; the embedded store
//! (and, later, the cluster backend) implement it. [`Catalog`] holds the
//! rules for applying resources, so every backend validates the same way.

pub mod admission;
mod catalog;
pub mod exact;
pub mod resources;
pub mod top;
mod types;

pub use admission::{Admission, DEFAULT_MAX_FUTURE};
pub use catalog::{ApplyPlan, Catalog, MetersByType};
pub use resources::{ResourceKey, ResourceSet, ResourceStore};
pub use types::*;

use futures::future::BoxFuture;
use tally_model::{CloudEvent, Kind, Manifest};

/// A durable, deduplicating usage ledger with meters.
///
/// Every method is safe to call concurrently. `ingest` resolves only once
/// the events are durable.
pub trait Ledger: Send + Sync + 'static {
    /// Stores structurally valid events exactly once per (source, id).
    fn ingest(&self, events: Vec<CloudEvent>) -> BoxFuture<'_, Result<IngestOutcome, LedgerError>>;

    /// Creates or updates a resource (as `mode` allows); returns it as
    /// stored, with status.
    fn apply(
        &self,
        manifest: Manifest,
        mode: ApplyMode,
    ) -> BoxFuture<'_, Result<Applied, LedgerError>>;

    /// Deletes a resource.
    fn delete(&self, kind: Kind, name: String) -> BoxFuture<'_, Result<(), LedgerError>>;

    /// One resource, with status.
    fn get(&self, kind: Kind, name: String) -> BoxFuture<'_, Result<Manifest, LedgerError>>;

    /// All resources of a kind, by name, with status.
    fn list(&self, kind: Kind) -> BoxFuture<'_, Result<Vec<Manifest>, LedgerError>>;

    /// Aggregates a meter over windows.
    fn query(
        &self,
        meter: String,
        query: MeterQuery,
    ) -> BoxFuture<'_, Result<QueryResult, LedgerError>>;

    /// [`Ledger::query`], each row with its mergeable state, so that usage
    /// the rollups do not hold (the partial minutes at the edges of a range,
    /// read from the log by [`exact::query`]) can be merged into it.
    fn query_states(
        &self,
        meter: String,
        query: MeterQuery,
    ) -> BoxFuture<'_, Result<StatefulResult, LedgerError>>;

    /// Stored events, newest first (in the order they were stored). With
    /// `ingested_from`, a backend may stop reading at events stored well
    /// before it.
    fn list_events(&self, filter: EventFilter) -> BoxFuture<'_, Result<EventPage, LedgerError>>;

    /// Quarantined events, newest first.
    fn list_quarantine(
        &self,
        filter: QuarantineFilter,
    ) -> BoxFuture<'_, Result<QuarantinePage, LedgerError>>;

    /// Voids one stored event by (source, id): it stops counting in every
    /// meter, durably, and an audit record is kept. Voiding twice is
    /// harmless and answers the first record.
    fn void(&self, request: VoidRequest) -> BoxFuture<'_, Result<VoidOutcome, LedgerError>>;

    /// The audit trail of voided events, newest first.
    fn list_voids(
        &self,
        limit: usize,
        cursor: Option<String>,
    ) -> BoxFuture<'_, Result<VoidPage, LedgerError>>;

    /// The change feed of one meter's input after `cursor`, reading at most
    /// `limit` log entries and voids: what a downstream reader with its own
    /// checkpoint (the billing forwarder) needs to find windows that changed
    /// after it read them. The default answers that there is no feed.
    fn changes(
        &self,
        meter: String,
        cursor: ChangeCursor,
        limit: usize,
    ) -> BoxFuture<'_, Result<ChangePage, LedgerError>> {
        let _ = (meter, cursor, limit);
        Box::pin(async {
            Err(LedgerError::Invalid(
                "this ledger has no change feed".into(),
            ))
        })
    }

    /// Where a meter's stored usage lies: from the start of the first day
    /// (UTC) with usage to the end of the last, or `None` when it has none.
    /// A query that names no `from` starts there.
    fn usage_span(
        &self,
        meter: String,
    ) -> BoxFuture<'_, Result<Option<(jiff::Timestamp, jiff::Timestamp)>, LedgerError>>;

    /// What [`Ledger::ingest`] checks of each event beyond its structure,
    /// so a caller can report every problem of a request at once.
    fn admission(&self) -> Admission;

    /// Counters for `/metrics`.
    fn stats(&self) -> LedgerStats;

    /// The materialisation backlog, cheap enough to ask on every ingest
    /// request: the server answers `429` on the platform contract when it
    /// is full rather than queue behind it. The default has none.
    fn backlog(&self) -> Backlog {
        Backlog::NONE
    }

    /// Whether the ledger can take writes (for `/readyz`).
    fn ready(&self) -> bool;
}
