//! [`Ledger`] for [`ClusterLedger`]: each method hands over to the module
//! that does the work.

use std::sync::atomic::Ordering;

use futures::future::BoxFuture;
use jiff::Timestamp;
use tally_ledger::{
    Admission, Applied, ApplyMode, ChangeCursor, ChangePage, EventFilter, EventPage, IngestOutcome,
    Ledger, LedgerError, LedgerStats, MeterQuery, QuarantineFilter, QuarantinePage, QueryResult,
    StatefulResult, VoidOutcome, VoidPage, VoidRequest,
};
use tally_model::{CloudEvent, Kind, KindClass, Manifest};

use crate::ledger::{ClusterLedger, with_status};
use crate::read;

impl Ledger for ClusterLedger {
    fn ingest(&self, events: Vec<CloudEvent>) -> BoxFuture<'_, Result<IngestOutcome, LedgerError>> {
        Box::pin(self.ingest_events(events))
    }

    fn apply(
        &self,
        manifest: Manifest,
        mode: ApplyMode,
    ) -> BoxFuture<'_, Result<Applied, LedgerError>> {
        Box::pin(self.apply_manifest(manifest, mode))
    }

    fn delete(&self, kind: Kind, name: String) -> BoxFuture<'_, Result<(), LedgerError>> {
        Box::pin(self.delete_manifest(kind, name))
    }

    fn get(&self, kind: Kind, name: String) -> BoxFuture<'_, Result<Manifest, LedgerError>> {
        Box::pin(async move {
            let manifest = self.inner.catalog().catalog.get(kind, &name).cloned();
            manifest
                .map(with_status)
                .ok_or_else(|| LedgerError::not_found(kind, name))
        })
    }

    fn list(&self, kind: Kind) -> BoxFuture<'_, Result<Vec<Manifest>, LedgerError>> {
        Box::pin(async move {
            let manifests: Vec<Manifest> =
                self.inner.catalog().catalog.list(kind).cloned().collect();
            Ok(manifests.into_iter().map(with_status).collect())
        })
    }

    fn query(
        &self,
        meter: String,
        query: MeterQuery,
    ) -> BoxFuture<'_, Result<QueryResult, LedgerError>> {
        Box::pin(async move {
            let answer = read::query_states(&self.inner, &meter, &query).await?;
            Ok(QueryResult {
                rows: answer.rows,
                next_cursor: answer.next_cursor,
            })
        })
    }

    fn query_states(
        &self,
        meter: String,
        query: MeterQuery,
    ) -> BoxFuture<'_, Result<StatefulResult, LedgerError>> {
        Box::pin(async move { read::query_states(&self.inner, &meter, &query).await })
    }

    fn list_events(&self, filter: EventFilter) -> BoxFuture<'_, Result<EventPage, LedgerError>> {
        Box::pin(async move { read::list_events(&self.inner, &filter).await })
    }

    fn list_quarantine(
        &self,
        filter: QuarantineFilter,
    ) -> BoxFuture<'_, Result<QuarantinePage, LedgerError>> {
        Box::pin(async move { read::list_quarantine(&self.inner, &filter).await })
    }

    fn void(&self, request: VoidRequest) -> BoxFuture<'_, Result<VoidOutcome, LedgerError>> {
        Box::pin(self.void_event(request))
    }

    fn list_voids(
        &self,
        limit: usize,
        cursor: Option<String>,
    ) -> BoxFuture<'_, Result<VoidPage, LedgerError>> {
        Box::pin(async move { read::list_voids(&self.inner, limit, cursor.as_deref()) })
    }

    fn changes(
        &self,
        meter: String,
        cursor: ChangeCursor,
        limit: usize,
    ) -> BoxFuture<'_, Result<ChangePage, LedgerError>> {
        Box::pin(async move { read::changes(&self.inner, &meter, cursor, limit).await })
    }

    fn usage_span(
        &self,
        meter: String,
    ) -> BoxFuture<'_, Result<Option<(Timestamp, Timestamp)>, LedgerError>> {
        Box::pin(async move { read::usage_span(&self.inner, &meter).await })
    }

    fn admission(&self) -> Admission {
        self.inner.admission()
    }

    fn stats(&self) -> LedgerStats {
        let s = &self.inner.stats;
        let catalog = self.inner.catalog();
        LedgerStats {
            events_accepted_total: s.accepted.load(Ordering::Relaxed),
            events_duplicate_total: s.duplicates.load(Ordering::Relaxed),
            events_quarantined_total: s.quarantined.load(Ordering::Relaxed),
            group_commits_total: s.batches.load(Ordering::Relaxed),
            materialise_lag_events: s.pending.load(Ordering::Relaxed),
            materialise_lag_seconds: read::lag(&self.inner).as_secs_f64(),
            insert_errors: s.insert_errors_by_table(),
            kinds: Kind::ALL
                .into_iter()
                .filter(|k| k.class() == KindClass::Catalog)
                .map(|k| {
                    (
                        k.as_str().to_owned(),
                        catalog.catalog.list(k).count() as u64,
                    )
                })
                .collect(),
            ..LedgerStats::default()
        }
    }

    fn ready(&self) -> bool {
        self.inner.nats.connection_state() == async_nats::connection::State::Connected
    }
}
