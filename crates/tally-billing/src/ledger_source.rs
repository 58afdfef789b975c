//! [`LedgerUsageSource`]: the forwarder's [`UsageSource`] over any
//! [`Ledger`]: totals through `Ledger::query`, changes through the ledger's
//! per-meter change feed (`Ledger::changes`, voids included).

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use jiff::tz::TimeZone;
use tally_ledger::{ChangeCursor, Ledger, LedgerError, MeterQuery};

use crate::source::{Changes, SourceError, UsageQuery, UsageSource, UsageTotal, follow_changes};

/// Rows per query page.
const PAGE: usize = 10_000;
/// Log entries and voids per change-feed page.
const CHANGES_PAGE: usize = 50_000;
/// Most change-feed pages read by one `changes_since` (the rest is read by
/// the next pass).
const CHANGES_PAGES: usize = 20;

fn source_error(meter: &str, e: LedgerError) -> SourceError {
    SourceError(format!("meter {meter:?}: {e}"))
}

/// Reads usage from a ledger. Subjects are `projects/<project>`; a query
/// reads every subject, so usage of a project no binding names is seen
/// (and counted as unattributed), not silently skipped.
#[derive(Clone)]
pub struct LedgerUsageSource {
    ledger: Arc<dyn Ledger>,
}

impl std::fmt::Debug for LedgerUsageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerUsageSource").finish_non_exhaustive()
    }
}

impl LedgerUsageSource {
    /// A source over `ledger`.
    pub fn new(ledger: Arc<dyn Ledger>) -> Self {
        LedgerUsageSource { ledger }
    }
}

impl UsageSource for LedgerUsageSource {
    fn totals(&self, query: UsageQuery) -> BoxFuture<'_, Result<Vec<UsageTotal>, SourceError>> {
        Box::pin(async move {
            let mut group_by = vec!["subject".to_owned()];
            group_by.extend(query.dimensions.iter().cloned());
            let mut out = Vec::new();
            let mut cursor = None;
            loop {
                let request = MeterQuery {
                    from: query.from,
                    to: query.to,
                    window_size: None,
                    time_zone: TimeZone::UTC,
                    subjects: Vec::new(),
                    group_by: group_by.clone(),
                    filter_group_by: BTreeMap::new(),
                    limit: Some(PAGE),
                    cursor: cursor.take(),
                };
                let page = self
                    .ledger
                    .query(query.meter.clone(), request)
                    .await
                    .map_err(|e| source_error(&query.meter, e))?;
                out.extend(page.rows.into_iter().filter_map(|row| {
                    UsageTotal::from_query_row(row.subject.as_deref(), row.group_by, row.value)
                }));
                match page.next_cursor {
                    Some(next) => cursor = Some(next),
                    None => return Ok(out),
                }
            }
        })
    }

    fn changes_since(
        &self,
        meter: &str,
        cursor: ChangeCursor,
    ) -> BoxFuture<'_, Result<Changes, SourceError>> {
        let meter = meter.to_owned();
        Box::pin(async move {
            follow_changes(cursor, CHANGES_PAGES, |at| {
                let meter = meter.clone();
                async move {
                    self.ledger
                        .changes(meter.clone(), at, CHANGES_PAGE)
                        .await
                        .map_err(|e| source_error(&meter, e))
                }
            })
            .await
        })
    }
}
