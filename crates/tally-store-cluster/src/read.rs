//! Reads: meter queries, events, quarantine, voids and the change feed.
//!
//! A meter query reads the materialised events of the meter's type in its
//! range (`FINAL`: each (source, id) once), measures each with the meter as
//! ingest does ([`crate::measure::sample`]) and folds its
//! [`AggState`] into the row of its window — the semantics are
//! `tally-meter`'s, not re-derived in SQL, for every aggregation, window and
//! time zone, and a meter applied after its events arrived answers for them
//! at once (its backfill is the read). Rows are ordered by (window, subject,
//! group values, billing account) like the embedded backend's; a cursor is
//! the hex of the last row's key.
//!
//! **Never:** an answer includes an event before the worker materialised
//! it; [`crate::ClusterLedger::materialised_below`] says how far that is.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use serde::Deserialize;
use tally_ledger::{
    ChangeCursor, ChangePage, EventFilter, EventPage, LedgerError, MeterQuery, QuarantineFilter,
    QuarantinePage, QuarantinedEvent, StatefulResult, StoredEvent, VoidPage,
};
use tally_meter::{AggState, CompiledMeter};
use tally_model::CloudEvent;

use crate::ch::lit;
use crate::keys;
use crate::ledger::{Inner, ch_error, storage};
use crate::measure;
use crate::plan::{Plan, RowKey, plan};

/// Most rows one page of a listing holds.
const MAX_PAGE: usize = 1_000;

/// Most events one quarantine page reads before it answers (with a cursor).
const QUARANTINE_SCAN: usize = 100_000;

fn page_limit(limit: usize) -> usize {
    if limit == 0 { 100 } else { limit.min(MAX_PAGE) }
}

fn bad_cursor(c: &str) -> LedgerError {
    LedgerError::Invalid(format!("cursor {c:?} is not one this server issued"))
}

/// A materialised event as read back.
#[derive(Deserialize)]
struct EventRow {
    seq: u64,
    ingested_ms: i64,
    event: String,
}

impl EventRow {
    fn stored(self, inner: &Inner) -> Result<StoredEvent, LedgerError> {
        let event: CloudEvent = serde_json::from_str(&self.event).map_err(storage)?;
        let voided = inner
            .voids()
            .by_key
            .get(&keys::dedupe_key(&event.source, &event.id))
            .cloned();
        Ok(StoredEvent {
            seq: self.seq,
            ingested_at: Timestamp::from_millisecond(self.ingested_ms).map_err(storage)?,
            event,
            voided,
        })
    }
}

pub(crate) fn ns(t: Timestamp) -> i64 {
    i64::try_from(t.as_nanosecond()).unwrap_or(if t < Timestamp::UNIX_EPOCH {
        i64::MIN
    } else {
        i64::MAX
    })
}

/// The stored event of (source, id), if materialised.
pub(crate) async fn find_event(
    inner: &Inner,
    source: &str,
    id: &str,
) -> Result<Option<StoredEvent>, LedgerError> {
    let sql = format!(
        "SELECT seq, ingested_ms, event FROM {}.events FINAL WHERE source = {} AND id = {}",
        inner.ch.database,
        lit(source),
        lit(id)
    );
    let rows: Vec<EventRow> = inner.ch.select(&sql).await.map_err(ch_error)?;
    rows.into_iter().next().map(|r| r.stored(inner)).transpose()
}

/// Stored events, newest first; the cursor is the last seq answered.
pub(crate) async fn list_events(inner: &Inner, f: &EventFilter) -> Result<EventPage, LedgerError> {
    f.validate()?;
    let limit = page_limit(f.limit);
    let mut clauses = vec!["1".to_owned()];
    if let Some(c) = &f.cursor {
        let seq: u64 = c.parse().map_err(|_| bad_cursor(c))?;
        clauses.push(format!("seq < {seq}"));
    }
    let text = [
        ("type", &f.event_type),
        ("subject", &f.subject),
        ("source", &f.source),
        ("id", &f.id),
    ];
    for (column, value) in text {
        if let Some(v) = value {
            clauses.push(format!("{column} = {}", lit(v)));
        }
    }
    if let Some(t) = f.from {
        clauses.push(format!("time_ns >= {}", ns(t)));
    }
    if let Some(t) = f.to {
        clauses.push(format!("time_ns < {}", ns(t)));
    }
    if let Some(t) = f.ingested_from {
        clauses.push(format!("ingested_ms >= {}", t.as_millisecond()));
    }
    if let Some(t) = f.ingested_to {
        clauses.push(format!("ingested_ms < {}", t.as_millisecond()));
    }
    let sql = format!(
        "SELECT seq, ingested_ms, event FROM {}.events FINAL WHERE {} ORDER BY seq DESC LIMIT {}",
        inner.ch.database,
        clauses.join(" AND "),
        limit + 1
    );
    let rows: Vec<EventRow> = inner.ch.select(&sql).await.map_err(ch_error)?;
    let more = rows.len() > limit;
    let items = rows
        .into_iter()
        .take(limit)
        .map(|r| r.stored(inner))
        .collect::<Result<Vec<_>, _>>()?;
    let next_cursor = more
        .then(|| items.last().map(|e| e.seq.to_string()))
        .flatten();
    Ok(EventPage { items, next_cursor })
}

/// Void records, newest first by the voided event's seq.
pub(crate) fn list_voids(
    inner: &Inner,
    limit: usize,
    cursor: Option<&str>,
) -> Result<VoidPage, LedgerError> {
    let limit = page_limit(limit);
    let end = match cursor {
        Some(c) => c.parse::<u64>().map_err(|_| bad_cursor(c))?,
        None => u64::MAX,
    };
    let mut records: Vec<_> = inner
        .voids()
        .by_key
        .values()
        .filter(|r| r.seq < end)
        .cloned()
        .collect();
    records.sort_by_key(|r| std::cmp::Reverse(r.seq));
    let more = records.len() > limit;
    records.truncate(limit);
    let next_cursor = more
        .then(|| records.last().map(|r| r.seq.to_string()))
        .flatten();
    Ok(VoidPage {
        items: records,
        next_cursor,
    })
}

/// A meter as the catalog holds it now, compiled, with its retirement.
fn meter_of(inner: &Inner, name: &str) -> Result<(CompiledMeter, Option<Timestamp>), LedgerError> {
    let catalog = inner.catalog();
    match catalog.catalog.compile(name) {
        None => Err(LedgerError::not_found("meter", name)),
        Some(Err(e)) => Err(LedgerError::Conflict(format!(
            "meter {name:?} cannot be compiled: {e}"
        ))),
        Some(Ok(m)) => Ok((m, catalog.retired_at.get(name).copied())),
    }
}

/// The days holding a meter's materialised events of its type.
pub(crate) async fn usage_span(
    inner: &Inner,
    name: &str,
) -> Result<Option<(Timestamp, Timestamp)>, LedgerError> {
    #[derive(Deserialize)]
    struct Span {
        n: u64,
        first: i64,
        last: i64,
    }
    let (meter, _) = meter_of(inner, name)?;
    let sql = format!(
        "SELECT count() AS n, min(time_ns) AS first, max(time_ns) AS last FROM {}.events FINAL WHERE type = {}",
        inner.ch.database,
        lit(meter.event_type())
    );
    let spans: Vec<Span> = inner.ch.select(&sql).await.map_err(ch_error)?;
    let Some(span) = spans.into_iter().next().filter(|s| s.n > 0) else {
        return Ok(None);
    };
    const DAY: i64 = 86_400;
    let first = span.first.div_euclid(1_000_000_000);
    let last = span.last.div_euclid(1_000_000_000);
    let start = Timestamp::from_second(first - first.rem_euclid(DAY)).map_err(storage)?;
    let end = Timestamp::from_second(last - last.rem_euclid(DAY) + DAY).map_err(storage)?;
    Ok(Some((start, end)))
}

/// Answers a meter query with each row's state (see the module docs).
pub(crate) async fn query_states(
    inner: &Inner,
    name: &str,
    q: &MeterQuery,
) -> Result<StatefulResult, LedgerError> {
    q.validate()?;
    if q.from >= q.to {
        return Err(LedgerError::Invalid(format!(
            "`from` ({}) must be before `to` ({})",
            q.from, q.to
        )));
    }
    let (meter, retired_at) = meter_of(inner, name)?;
    let plan = plan(inner, &meter, q)?;
    let mut rows: BTreeMap<RowKey, AggState> = BTreeMap::new();
    // Below the rollup mark from `samples`, the rest from `events`.
    let mark = crate::rollup::fold(inner, &meter, retired_at, &plan, q, &mut rows).await?;
    let mut clauses = vec![
        format!("type = {}", lit(meter.event_type())),
        format!("time_ns >= {}", ns(q.from)),
        format!("time_ns < {}", ns(q.to)),
        format!("seq >= {mark}"),
    ];
    if !q.subjects.is_empty() {
        let list: Vec<String> = q.subjects.iter().map(|s| lit(s)).collect();
        clauses.push(format!("subject IN ({})", list.join(",")));
    }
    if mark > 0 && !any_event(inner, &clauses).await? {
        return page(&plan, rows, q);
    }
    let sql = format!(
        "SELECT seq, ingested_ms, event FROM {}.events FINAL WHERE {}",
        inner.ch.database,
        clauses.join(" AND ")
    );
    let voids = inner
        .voids()
        .by_key
        .keys()
        .cloned()
        .collect::<std::collections::HashSet<_>>();
    let mut failure: Option<LedgerError> = None;
    inner
        .ch
        .select_each(&sql, |row: EventRow| {
            if failure.is_some() {
                return Ok(());
            }
            if let Err(e) = fold_one(&meter, retired_at, &plan, &voids, row, &mut rows) {
                failure = Some(e);
            }
            Ok(())
        })
        .await
        .map_err(ch_error)?;
    if let Some(e) = failure {
        return Err(e);
    }
    page(&plan, rows, q)
}

/// Whether any stored row of `events` matches `clauses`, read without
/// `FINAL` (which in 18.16 merges the whole table's keys even for an empty
/// answer): no row without `FINAL` means none with it.
async fn any_event(inner: &Inner, clauses: &[String]) -> Result<bool, LedgerError> {
    #[derive(Deserialize)]
    struct Count {
        n: u64,
    }
    let sql = format!(
        "SELECT count() AS n FROM {}.events WHERE {}",
        inner.ch.database,
        clauses.join(" AND ")
    );
    let rows: Vec<Count> = inner.ch.select(&sql).await.map_err(ch_error)?;
    Ok(rows.first().is_some_and(|c| c.n > 0))
}

fn fold_one(
    meter: &CompiledMeter,
    retired_at: Option<Timestamp>,
    plan: &Plan,
    voids: &std::collections::HashSet<String>,
    row: EventRow,
    rows: &mut BTreeMap<RowKey, AggState>,
) -> Result<(), LedgerError> {
    let event: CloudEvent = serde_json::from_str(&row.event).map_err(storage)?;
    if voids.contains(&keys::dedupe_key(&event.source, &event.id)) {
        return Ok(());
    }
    let ingested_at = Timestamp::from_millisecond(row.ingested_ms).map_err(storage)?;
    let Ok(sample) = measure::sample(meter, &event, ingested_at, retired_at) else {
        return Ok(()); // quarantined: not measured
    };
    let Some(key) = plan.key(&event, &sample.groups) else {
        return Ok(());
    };
    let Some(state) = AggState::of_sample(
        meter.aggregation(),
        &sample.value,
        event.time.as_nanosecond(),
        row.seq,
    ) else {
        return Ok(());
    };
    crate::rollup::merge(rows, key, state)
}

fn page(
    plan: &Plan,
    rows: BTreeMap<RowKey, AggState>,
    q: &MeterQuery,
) -> Result<StatefulResult, LedgerError> {
    let after: Option<RowKey> = q.cursor.as_deref().map(decode_cursor).transpose()?;
    let limit = q.limit.unwrap_or(usize::MAX);
    let mut out = StatefulResult {
        rows: Vec::new(),
        states: Vec::new(),
        next_cursor: None,
    };
    let mut last = None;
    let remaining = rows
        .into_iter()
        .filter(|(k, _)| after.as_ref().is_none_or(|a| k > a));
    for (key, state) in remaining {
        if out.rows.len() == limit {
            out.next_cursor = last.as_ref().map(encode_cursor);
            break;
        }
        out.rows.push(plan.row(&key, &state));
        out.states.push(state);
        last = Some(key);
    }
    Ok(out)
}

fn encode_cursor(key: &RowKey) -> String {
    let json = serde_json::to_vec(key).unwrap_or_default();
    json.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_cursor(cursor: &str) -> Result<RowKey, LedgerError> {
    if !cursor.len().is_multiple_of(2) || !cursor.is_ascii() {
        return Err(bad_cursor(cursor));
    }
    let bytes = (0..cursor.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&cursor[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| bad_cursor(cursor))?;
    serde_json::from_slice(&bytes).map_err(|_| bad_cursor(cursor))
}

/// Quarantined events by (meter, seq): first those no meter reads (meter
/// `""`, `UNKNOWN_METER`), then each meter's events it cannot measure now.
/// A page reads at most [`QUARANTINE_SCAN`] events and then answers what it
/// found with a cursor (`<meter>:<seq>`), so a page may be short.
pub(crate) async fn list_quarantine(
    inner: &Inner,
    f: &QuarantineFilter,
) -> Result<QuarantinePage, LedgerError> {
    let limit = page_limit(f.limit);
    let (start_meter, start_seq) = match &f.cursor {
        Some(c) => {
            let (m, s) = c.rsplit_once(':').ok_or_else(|| bad_cursor(c))?;
            (
                m.to_owned(),
                s.parse::<u64>().map_err(|_| bad_cursor(c))? + 1,
            )
        }
        None => (String::new(), 0),
    };
    let (types, mut meters): (Vec<String>, Vec<String>) = {
        let catalog = inner.catalog();
        catalog
            .catalog
            .meters()
            .map(|(name, def)| (lit(def.event_type()), name.to_owned()))
            .unzip()
    };
    meters.insert(0, String::new());
    meters.retain(|name| f.meter.as_deref().is_none_or(|m| m == name) && *name >= start_meter);
    let mut items = Vec::new();
    let mut scanned = 0;
    for name in meters {
        let from_seq = if name == start_meter { start_seq } else { 0 };
        let (which, meter) = if name.is_empty() {
            let which = match types.is_empty() {
                true => "1".to_owned(),
                false => format!("type NOT IN ({})", types.join(",")),
            };
            (which, None)
        } else {
            let (meter, retired_at) = meter_of(inner, &name)?;
            (
                format!("type = {}", lit(meter.event_type())),
                Some((meter, retired_at)),
            )
        };
        let sql = format!(
            "SELECT seq, ingested_ms, event FROM {}.events FINAL WHERE {which} AND seq >= {from_seq} ORDER BY seq LIMIT {}",
            inner.ch.database,
            QUARANTINE_SCAN - scanned
        );
        let rows: Vec<EventRow> = inner.ch.select(&sql).await.map_err(ch_error)?;
        scanned += rows.len();
        for row in rows {
            let stored = row.stored(inner)?;
            let seq = stored.seq;
            let verdict = match &meter {
                None => Some((
                    measure::UNKNOWN_METER.to_owned(),
                    format!("no meter reads events of type {:?}", stored.event.kind),
                )),
                Some((meter, retired_at)) => {
                    measure::sample(meter, &stored.event, stored.ingested_at, *retired_at)
                        .err()
                        .map(|reason| (reason.code().to_owned(), reason.to_string()))
                }
            };
            if let Some((reason, message)) = verdict {
                items.push(QuarantinedEvent {
                    meter: name.clone(),
                    reason,
                    message,
                    event: stored,
                });
            }
            if items.len() == limit || scanned >= QUARANTINE_SCAN {
                return Ok(QuarantinePage {
                    items,
                    next_cursor: Some(format!("{name}:{seq}")),
                });
            }
        }
    }
    Ok(QuarantinePage {
        items,
        next_cursor: None,
    })
}

/// The change feed of a meter's input: materialised events of its type
/// with `cursor.log <= seq < materialised_below`, then voids in the order
/// the voids bucket recorded them.
pub(crate) async fn changes(
    inner: &Inner,
    name: &str,
    cursor: ChangeCursor,
    limit: usize,
) -> Result<ChangePage, LedgerError> {
    #[derive(Deserialize)]
    struct Change {
        seq: u64,
        time_ns: i64,
    }
    let (meter, _) = meter_of(inner, name)?;
    let limit = limit.clamp(1, 100_000);
    let below = inner
        .stats
        .materialised_below
        .load(std::sync::atomic::Ordering::Relaxed);
    let sql = format!(
        "SELECT seq, time_ns FROM {}.events FINAL WHERE type = {} AND seq >= {} AND seq < {below} ORDER BY seq LIMIT {limit}",
        inner.ch.database,
        lit(meter.event_type()),
        cursor.log
    );
    let rows: Vec<Change> = inner.ch.select(&sql).await.map_err(ch_error)?;
    let mut page = ChangePage {
        times: Vec::new(),
        next: cursor,
        more: rows.len() == limit,
    };
    page.next.log = match rows.last() {
        Some(last) if page.more => last.seq + 1,
        _ => below.max(cursor.log),
    };
    for row in rows {
        page.times
            .push(Timestamp::from_nanosecond(i128::from(row.time_ns)).map_err(storage)?);
    }
    if page.more {
        return Ok(page);
    }
    let voids = inner.voids();
    for (revision, key) in voids.by_revision.range(cursor.voids..) {
        if page.times.len() >= limit {
            page.more = true;
            break;
        }
        if let Some(record) = voids.by_key.get(key)
            && record.event_type == meter.event_type()
        {
            page.times.push(record.event_time);
        }
        page.next.voids = revision + 1;
    }
    Ok(page)
}

/// How long ago the consumer last had nothing pending.
pub(crate) fn lag(inner: &Inner) -> SignedDuration {
    SignedDuration::from_millis(
        inner
            .stats
            .lag_ms
            .load(std::sync::atomic::Ordering::Relaxed) as i64,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let key: RowKey = (
            3,
            Some("projects/p".into()),
            vec![None, Some("eu".into())],
            None,
        );
        assert_eq!(decode_cursor(&encode_cursor(&key)).unwrap(), key);
        for bad in ["", "zz", "abc", "ü0", "7b7d"] {
            assert!(decode_cursor(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn nanoseconds_saturate() {
        assert_eq!(ns(Timestamp::MAX), i64::MAX);
        assert_eq!(ns(Timestamp::MIN), i64::MIN);
        assert_eq!(ns(Timestamp::UNIX_EPOCH), 0);
    }
}
