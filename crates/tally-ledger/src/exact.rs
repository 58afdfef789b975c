//! Meter queries over ranges of any precision, for every backend.
//!
//! A backend keeps usage per minute, so [`crate::Ledger::query`] takes
//! whole minutes. [`query`] answers any `[from, to)` exactly: the whole
//! minutes inside the range from the backend's rollups
//! ([`crate::Ledger::query_states`]), and the partial minutes at its edges
//! from the event log ([`crate::Ledger::list_events`]), each event measured
//! by the meter as the backend would ([`CompiledMeter::sample`]) and its
//! state merged into the row of its window.
//!
//! **Invariant:** an answer equals the aggregation of every stored,
//! measurable, unvoided event with `from <= time < to`, whatever the
//! precision of `from` and `to`.
//!
//! The log is read newest first, and only back to events stored
//! `Admission::max_future` before the edge (no admitted event is dated
//! further ahead of its storing), so an edge costs the events stored since
//! then. (An event admitted under a larger `maxFutureHours` than today's
//! could lie before that point and be missed at an edge.) Usage by billing
//! account and Retired meters are answered for whole minutes only.
//!
//! Rows of such a query are ordered by (window, subject, group values) and
//! paged by position (`cursor` = `x<offset>`), since the backend's cursor
//! names rows of its own ranges.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use tally_meter::{AggState, CompiledMeter, window};
use tally_model::{Kind, MeterDefinition, MeterPhase, MonitoredResourceType};

use crate::{EventFilter, Ledger, LedgerError, MeterQuery, QueryResult, QueryRow};

/// The group-by name that attributes usage to billing accounts, which only
/// a backend can resolve.
const BILLING_ACCOUNT: &str = "billing_account";

/// Events read from the log per page.
const EDGE_PAGE: usize = 10_000;

/// Whether `t` falls on a whole minute.
pub fn on_minute(t: Timestamp) -> bool {
    t.as_second().rem_euclid(60) == 0 && t.subsec_nanosecond() == 0
}

/// The whole minute at or before `t`.
fn floor_minute(t: Timestamp) -> Timestamp {
    let second = t.as_second() - t.as_second().rem_euclid(60);
    let floor = Timestamp::from_second(second).unwrap_or(t);
    // A negative sub-second part belongs to the second before.
    if floor > t {
        floor
            .checked_sub(SignedDuration::from_secs(60))
            .unwrap_or(floor)
    } else {
        floor
    }
}

/// The whole minute at or after `t`.
fn ceil_minute(t: Timestamp) -> Timestamp {
    let floor = floor_minute(t);
    if floor == t {
        t
    } else {
        floor
            .checked_add(SignedDuration::from_secs(60))
            .unwrap_or(floor)
    }
}

/// Answers `q` exactly for any precision of `from` and `to` (see the
/// module docs). Whole-minute ranges go to the backend as they are.
pub async fn query(
    ledger: &dyn Ledger,
    meter: String,
    q: MeterQuery,
) -> Result<QueryResult, LedgerError> {
    if q.from >= q.to {
        return Err(LedgerError::Invalid(format!(
            "`from` ({}) must be before `to` ({})",
            q.from, q.to
        )));
    }
    if on_minute(q.from) && on_minute(q.to) {
        return ledger.query(meter, q).await;
    }
    if q.group_by.iter().any(|g| g == BILLING_ACCOUNT)
        || q.filter_group_by.contains_key(BILLING_ACCOUNT)
    {
        return Err(LedgerError::Invalid(
            "usage by billing account is answered for whole minutes only; give `from` and `to` on whole minutes".into(),
        ));
    }
    q.validate()?;
    let compiled = compile(ledger, &meter).await?;
    let shape = Shape::of(&compiled, &q)?;
    let mut rows = Rows::default();
    let (inner_from, inner_to) = (ceil_minute(q.from), floor_minute(q.to));
    if inner_from < inner_to {
        let inner = MeterQuery {
            from: inner_from,
            to: inner_to,
            limit: None,
            cursor: None,
            ..q.clone()
        };
        let answer = ledger.query_states(meter.clone(), inner).await?;
        for (mut row, state) in answer.rows.into_iter().zip(answer.states) {
            if q.window_size.is_none() {
                (row.window_start, row.window_end) = (q.from, q.to);
            }
            rows.merge(row, state)?;
        }
    } else {
        // Nothing comes from the rollups, but the meter must be ready.
        ledger.usage_span(meter.clone()).await?;
    }
    let edges = if inner_from < inner_to {
        vec![(q.from, inner_from), (inner_to, q.to)]
    } else {
        vec![(q.from, q.to)]
    };
    let max_future = ledger.admission().max_future;
    for (from, to) in edges.into_iter().filter(|(from, to)| from < to) {
        read_edge(
            ledger,
            &compiled,
            &shape,
            &q,
            (from, to),
            max_future,
            &mut rows,
        )
        .await?;
    }
    rows.page(&q)
}

/// The meter, compiled as its backend compiles it.
async fn compile(ledger: &dyn Ledger, meter: &str) -> Result<CompiledMeter, LedgerError> {
    let manifest = ledger.get(Kind::MeterDefinition, meter.to_owned()).await?;
    let definition = MeterDefinition::from_manifest(&manifest)?;
    if definition.phase == MeterPhase::Retired {
        // Which events it measured depends on when it retired, which the
        // log does not say.
        return Err(LedgerError::Invalid(format!(
            "meter {meter:?} is Retired; it answers for whole minutes only"
        )));
    }
    let types = ledger
        .list(Kind::MonitoredResourceType)
        .await?
        .iter()
        .map(MonitoredResourceType::from_manifest)
        .collect::<Result<Vec<_>, _>>()?;
    CompiledMeter::compile(meter, &definition, &types)
        .map_err(|e| LedgerError::Conflict(format!("meter {meter:?} cannot be compiled: {e}")))
}

/// What a row of `q` is keyed by, as positions in the meter's dimensions.
struct Shape {
    /// Group names (not `subject`) in the query's order, each with its
    /// position in the sample's groups.
    groups: Vec<(String, usize)>,
    filters: Vec<(usize, String)>,
    by_subject: bool,
}

impl Shape {
    fn of(meter: &CompiledMeter, q: &MeterQuery) -> Result<Shape, LedgerError> {
        let position = |name: &str| meter.dimension_position(name).map_err(LedgerError::Invalid);
        let mut groups: Vec<(String, usize)> = Vec::new();
        for g in &q.group_by {
            if g != "subject" && !groups.iter().any(|(name, _)| name == g) {
                groups.push((g.clone(), position(g)?));
            }
        }
        let filters = q
            .filter_group_by
            .iter()
            .map(|(k, v)| position(k).map(|p| (p, v.clone())))
            .collect::<Result<_, _>>()?;
        Ok(Shape {
            groups,
            filters,
            by_subject: !q.subjects.is_empty() || q.group_by.iter().any(|g| g == "subject"),
        })
    }
}

/// Reads the events of `[from, to)` (a part of one minute) from the log
/// and merges what the meter measures of them into `rows`.
async fn read_edge(
    ledger: &dyn Ledger,
    meter: &CompiledMeter,
    shape: &Shape,
    q: &MeterQuery,
    (from, to): (Timestamp, Timestamp),
    max_future: SignedDuration,
    rows: &mut Rows,
) -> Result<(), LedgerError> {
    // No admitted event is dated further ahead of its storing than
    // `max_future`, so none of this edge was stored before this.
    let ingested_from = from.checked_sub(max_future).ok();
    let mut cursor = None;
    loop {
        let page = ledger
            .list_events(EventFilter {
                from: Some(from),
                to: Some(to),
                event_type: Some(meter.event_type().to_owned()),
                subject: match q.subjects.as_slice() {
                    [one] => Some(one.clone()),
                    _ => None,
                },
                ingested_from,
                limit: EDGE_PAGE,
                cursor,
                ..EventFilter::default()
            })
            .await?;
        for stored in &page.items {
            let event = &stored.event;
            if stored.voided.is_some()
                || (!q.subjects.is_empty() && !q.subjects.contains(&event.subject))
            {
                continue;
            }
            let Ok(sample) = meter.sample(event) else {
                continue; // quarantined: not measured
            };
            if shape
                .filters
                .iter()
                .any(|(p, v)| sample.groups.get(*p).cloned().flatten().as_ref() != Some(v))
            {
                continue;
            }
            let time_ns = event.time.as_nanosecond();
            let Some(state) =
                AggState::of_sample(meter.aggregation(), &sample.value, time_ns, stored.seq)
            else {
                continue;
            };
            let (window_start, window_end) = match q.window_size {
                None => (q.from, q.to),
                Some(size) => {
                    let minute = floor_minute(event.time);
                    let w = window::windows(
                        minute,
                        ceil_minute(minute + SignedDuration::from_nanos(1)),
                        Some(size),
                        &q.time_zone,
                    )
                    .map_err(|e| LedgerError::Invalid(e.to_string()))?;
                    let w = w.first().ok_or_else(|| {
                        LedgerError::Invalid(format!("no window holds {}", event.time))
                    })?;
                    (w.start, w.end)
                }
            };
            let row = QueryRow {
                window_start,
                window_end,
                subject: shape.by_subject.then(|| event.subject.clone()),
                group_by: shape
                    .groups
                    .iter()
                    .map(|(name, p)| (name.clone(), sample.groups.get(*p).cloned().flatten()))
                    .collect(),
                value: state.result(),
            };
            rows.merge(row, state)?;
        }
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return Ok(()),
        }
    }
}

/// (window start, subject, group values in name order).
type RowKey = (Timestamp, Option<String>, Vec<(String, Option<String>)>);

/// Rows merged by key.
#[derive(Default)]
struct Rows(BTreeMap<RowKey, (QueryRow, AggState)>);

impl Rows {
    fn merge(&mut self, row: QueryRow, state: AggState) -> Result<(), LedgerError> {
        let key = (
            row.window_start,
            row.subject.clone(),
            row.group_by
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        );
        match self.0.get_mut(&key) {
            Some((_, merged)) => merged
                .merge(&state)
                .map_err(|e| LedgerError::Storage(format!("merging a query row: {e}")))?,
            None => {
                self.0.insert(key, (row, state));
            }
        }
        Ok(())
    }

    /// The page `q.limit` and `q.cursor` ask for, values computed.
    fn page(self, q: &MeterQuery) -> Result<QueryResult, LedgerError> {
        let offset = match &q.cursor {
            None => 0,
            Some(c) => c
                .strip_prefix('x')
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| {
                    LedgerError::Invalid(format!("cursor {c:?} is not one this server issued"))
                })?,
        };
        let total = self.0.len();
        let limit = q.limit.unwrap_or(usize::MAX);
        let rows: Vec<QueryRow> = self
            .0
            .into_values()
            .skip(offset)
            .take(limit)
            .map(|(mut row, state)| {
                row.value = state.result();
                row
            })
            .collect();
        let end = offset.saturating_add(rows.len());
        Ok(QueryResult {
            rows,
            next_cursor: (end < total).then(|| format!("x{end}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_around_any_instant() {
        let t = |s: &str| s.parse::<Timestamp>().unwrap();
        assert_eq!(
            floor_minute(t("2026-01-01T10:00:30.5Z")),
            t("2026-01-01T10:00:00Z")
        );
        assert_eq!(
            ceil_minute(t("2026-01-01T10:00:30.5Z")),
            t("2026-01-01T10:01:00Z")
        );
        assert_eq!(
            ceil_minute(t("2026-01-01T10:00:00Z")),
            t("2026-01-01T10:00:00Z")
        );
        assert_eq!(
            floor_minute(t("1969-12-31T23:59:59.5Z")),
            t("1969-12-31T23:59:00Z")
        );
        assert!(on_minute(t("2026-01-01T10:00:00Z")));
        assert!(!on_minute(t("2026-01-01T10:00:00.001Z")));
    }
}
