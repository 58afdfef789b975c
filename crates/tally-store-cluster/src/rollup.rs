//! Rollups: each meter's measured events in ClickHouse (`samples`, layout
//! in [`crate::ch`]), so a query is summed, counted and picked by
//! ClickHouse per minute, hour or day instead of every event's JSON being
//! read back and measured.
//!
//! - **The roller** (one task per node that runs workers) walks, for each
//!   meter generation (a hash of its definition and retirement), the
//!   materialised events from its mark (`rollup_marks`) up to
//!   [`crate::ClusterLedger::materialised_below`], measures each with
//!   [`crate::measure::sample`] and inserts one `samples` row per measured
//!   event, then raises the mark. A meter applied or edited later starts a
//!   new generation at mark 0: that is its backfill.
//! - **Idempotent.** Of several stored copies of one (source, id) only the
//!   lowest stream sequence is rolled up (the copy `events FINAL` keeps), and
//!   every row is computed from that stored copy alone, so a range rolled
//!   twice (a roller killed before its mark, two nodes at once, a worker
//!   that inserted a batch twice) writes identical rows that
//!   `ReplacingMergeTree` keeps once; reads say `FINAL`.
//! - **Reads** ([`fold`]): rows with `seq < mark` come from `samples`,
//!   grouped by the largest of day, hour or minute on which every window
//!   boundary and billing-account change inside the range falls; the events
//!   at or after the mark are measured from `events` as before
//!   ([`crate::read`]). Voided events are left out by key, so voids subtract
//!   exactly. Every aggregation is served: SUM and AVG as `Decimal128(12)`
//!   sums (values with more than 12 decimals or of 10^15 or more, and sums
//!   that could reach 10^16, fall back to reading events: exact, never
//!   float), COUNT, MIN and MAX (the stored text of the extreme value),
//!   LATEST (by time, then sequence) and UNIQUE_COUNT (the distinct values
//!   of each bucket).
//!
//! **Never:** a query counts an event both from `samples` and from `events`
//! (the split is the mark, read once per query), nor a row of an older
//! generation (rows are read for the generation the catalog holds now).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use jiff::Timestamp;
use rust_decimal::Decimal;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tally_ledger::{LedgerError, MeterQuery};
use tally_meter::{AggState, CompiledMeter, SampleValue};
use tally_model::{Aggregation, CloudEvent};

use crate::ch::{ChError, lit};
use crate::keys;
use crate::ledger::{Inner, ch_error};
use crate::measure;
use crate::plan::{Plan, RowKey};

/// Events the roller reads per statement.
const CHUNK: usize = 20_000;
/// Keys one lookup of stored copies names.
const LOOKUP: usize = 2_000;
/// How often the roller looks for new events.
const PERIOD: Duration = Duration::from_millis(500);
/// Decimal places of `samples.num`.
const SCALE: u32 = 12;
const MINUTE_NS: i64 = 60_000_000_000;
const HOUR_NS: i64 = 60 * MINUTE_NS;
const DAY_NS: i64 = 24 * HOUR_NS;

/// The generation of a meter: its definition and retirement, hashed. Rows
/// of one generation were measured by one definition.
pub(crate) fn generation(meter: &CompiledMeter, retired_at: Option<Timestamp>) -> String {
    let mut hash = Sha256::new();
    hash.update(serde_json::to_vec(&meter.definition).unwrap_or_default());
    hash.update(retired_at.map(|t| t.to_string()).unwrap_or_default());
    hash.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `d` fits `samples.num` exactly.
fn exact(d: &Decimal) -> bool {
    d.scale() <= SCALE && d.abs() < Decimal::from(1_000_000_000_000_000i64)
}

/// One `samples` row as a `JSONEachRow` line (hand-written: `num` must be
/// a JSON number with every digit, which ClickHouse 18.16 requires).
fn sample_line(
    meter: &CompiledMeter,
    generation_id: &str,
    seq: u64,
    event: &CloudEvent,
    ingested_at: Timestamp,
    retired_at: Option<Timestamp>,
) -> Option<String> {
    let sample = measure::sample(meter, event, ingested_at, retired_at).ok()?;
    let nanos = event.time.as_nanosecond();
    AggState::of_sample(meter.aggregation(), &sample.value, nanos, seq)?;
    let (ok, num, scale, text) = match &sample.value {
        SampleValue::None => (true, "0".to_owned(), 0, String::new()),
        SampleValue::Text(s) => (true, "0".to_owned(), 0, s.clone()),
        SampleValue::Number(d) if exact(d) => (true, d.to_string(), d.scale(), d.to_string()),
        SampleValue::Number(d) => (false, "0".to_owned(), 0, d.to_string()),
    };
    let json = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let groups = serde_json::to_string(&sample.groups).unwrap_or_default();
    Some(format!(
        "{{\"meter\":{},\"gen\":{},\"time_ns\":{},\"source\":{},\"id\":{},\"seq\":{seq},\
         \"subject\":{},\"groups\":{groups},\"exact\":{},\"num\":{num},\"scale\":{scale},\"text\":{}}}\n",
        json(&meter.key),
        json(generation_id),
        i64::try_from(nanos).unwrap_or(i64::MAX),
        json(&event.source),
        json(&event.id),
        json(&event.subject),
        u8::from(ok),
        json(&text),
    ))
}

/// The rollup mark of a meter generation (0 when none).
async fn mark(inner: &Inner, meter: &str, generation_id: &str) -> Result<u64, ChError> {
    #[derive(Deserialize)]
    struct Mark {
        below: u64,
    }
    let sql = format!(
        "SELECT max(below) AS below FROM {}.rollup_marks WHERE meter = {} AND gen = {}",
        inner.ch.database,
        lit(meter),
        lit(generation_id)
    );
    let rows: Vec<Mark> = inner.ch.select(&sql).await?;
    Ok(rows.first().map_or(0, |m| m.below))
}

/// Starts the roller of this node.
pub(crate) fn start(inner: &Arc<Inner>, mut stopped: tokio::sync::watch::Receiver<bool>) {
    let inner = Arc::clone(inner);
    tokio::spawn(async move {
        loop {
            if let Err(e) = roll_all(&inner).await {
                tracing::warn!(error = %e, "rolling up failed; trying again");
            }
            tokio::select! {
                _ = stopped.changed() => return,
                _ = tokio::time::sleep(PERIOD) => {}
            }
        }
    });
}

/// Rolls every meter of the catalog up to what is materialised now.
pub(crate) async fn roll_all(inner: &Inner) -> Result<(), ChError> {
    let target = inner.stats.materialised_below.load(Ordering::Relaxed);
    let meters: Vec<(Arc<CompiledMeter>, Option<Timestamp>)> = {
        let catalog = inner.catalog();
        catalog
            .meters
            .values()
            .flatten()
            .map(|m| (Arc::clone(m), catalog.retired_at.get(&m.key).copied()))
            .collect()
    };
    if meters.is_empty() || target == 0 {
        return Ok(());
    }
    inner.ensure_schema().await?;
    for (meter, retired_at) in meters {
        let generation_id = generation(&meter, retired_at);
        let mut from = mark(inner, &meter.key, &generation_id).await?;
        while from < target {
            from = roll_range(inner, &meter, &generation_id, retired_at, from, target).await?;
        }
    }
    Ok(())
}

/// Rolls up to [`CHUNK`] events of `meter`'s type with `from <= seq <
/// target`, raises the mark, and answers the next `from`.
async fn roll_range(
    inner: &Inner,
    meter: &CompiledMeter,
    generation_id: &str,
    retired_at: Option<Timestamp>,
    from: u64,
    target: u64,
) -> Result<u64, ChError> {
    #[derive(Deserialize)]
    struct Row {
        seq: u64,
        ingested_ms: i64,
        event: String,
    }
    let db = &inner.ch.database;
    let sql = format!(
        "SELECT seq, ingested_ms, event FROM {db}.events WHERE type = {} AND seq >= {from} \
         AND seq < {target} ORDER BY seq LIMIT {CHUNK}",
        lit(meter.event_type())
    );
    let rows: Vec<Row> = inner.ch.select(&sql).await?;
    let next = match rows.last() {
        Some(last) if rows.len() == CHUNK => last.seq + 1,
        _ => target,
    };
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        let event: CloudEvent =
            serde_json::from_str(&row.event).map_err(|e| ChError::Decode(e.to_string()))?;
        let at = Timestamp::from_millisecond(row.ingested_ms)
            .map_err(|e| ChError::Decode(e.to_string()))?;
        events.push((row.seq, at, event));
    }
    let lower = lowest_copies(inner, &events).await?;
    let mut body = String::new();
    for (seq, at, event) in &events {
        let key = keys::dedupe_key(&event.source, &event.id);
        if lower.get(&key).is_some_and(|low| low < seq) {
            continue; // a later copy: the lowest one is rolled up instead
        }
        if let Some(line) = sample_line(meter, generation_id, *seq, event, *at, retired_at) {
            body.push_str(&line);
        }
    }
    if !body.is_empty() {
        inner
            .ch
            .insert("samples", body.into_bytes())
            .await
            .inspect_err(|e| inner.stats.insert_error("samples", e))?;
    }
    let mark_row = format!(
        "{{\"meter\":{},\"gen\":{},\"below\":{next}}}\n",
        serde_json::to_string(&meter.key).unwrap_or_default(),
        serde_json::to_string(generation_id).unwrap_or_default()
    );
    inner
        .ch
        .insert("rollup_marks", mark_row.into_bytes())
        .await
        .inspect_err(|e| inner.stats.insert_error("rollup_marks", e))?;
    Ok(next)
}

/// The lowest stored sequence of each key of `events` (by dedupe key).
async fn lowest_copies(
    inner: &Inner,
    events: &[(u64, Timestamp, CloudEvent)],
) -> Result<HashMap<String, u64>, ChError> {
    #[derive(Deserialize)]
    struct Found {
        source: String,
        id: String,
        seq: u64,
    }
    let mut lowest = HashMap::new();
    // A statement names at most LOOKUP keys (ClickHouse bounds its syntax tree).
    for part in events.chunks(LOOKUP) {
        let list: Vec<String> = part
            .iter()
            .map(|(_, _, e)| format!("({},{})", lit(&e.source), lit(&e.id)))
            .collect();
        let sql = format!(
            "SELECT source, id, min(seq) AS seq FROM {}.events WHERE (source, id) IN ({}) \
             GROUP BY source, id",
            inner.ch.database,
            list.join(",")
        );
        let found: Vec<Found> = inner.ch.select(&sql).await?;
        lowest.extend(
            found
                .into_iter()
                .map(|f| (keys::dedupe_key(&f.source, &f.id), f.seq)),
        );
    }
    Ok(lowest)
}

/// The grid a query can be answered on from `samples`: the largest of
/// day, hour and minute on which every boundary inside the range falls
/// (window boundaries, and billing-account changes when attributed).
/// `None` when some boundary is not on a whole minute, or times are
/// before 1970.
fn grid(plan: &Plan, q: &MeterQuery) -> Option<i64> {
    let mut inside: Vec<Timestamp> = plan.windows.iter().skip(1).map(|w| w.start).collect();
    if let Some(a) = &plan.attribution {
        inside.extend(a.changes_within(q.from, q.to));
    }
    if q.from < Timestamp::UNIX_EPOCH {
        return None;
    }
    let nanos: Vec<i128> = inside.iter().map(|t| t.as_nanosecond()).collect();
    [DAY_NS, HOUR_NS, MINUTE_NS]
        .into_iter()
        .find(|unit| nanos.iter().all(|n| n % i128::from(*unit) == 0))
}

/// One row of a rolled-up answer: a grid bucket of one subject and group.
#[derive(Deserialize)]
struct Bucket {
    b: i64,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    g: Vec<Option<String>>,
    n: u64,
    ok: u8,
    #[serde(default)]
    s: Option<String>,
    #[serde(default)]
    sc: u32,
    #[serde(default)]
    mx: Option<String>,
    #[serde(default)]
    v: Option<String>,
    #[serde(default)]
    lt: i64,
    #[serde(default)]
    ls: u64,
    #[serde(default)]
    u: Vec<String>,
}

/// The columns an aggregation needs of each bucket.
fn value_columns(aggregation: Aggregation) -> &'static str {
    match aggregation {
        Aggregation::Count => "",
        Aggregation::Sum | Aggregation::Avg => {
            ", toString(sum(num)) AS s, max(scale) AS sc, toString(max(abs(num))) AS mx"
        }
        Aggregation::Min => ", argMin(text, num) AS v",
        Aggregation::Max => ", argMax(text, num) AS v",
        Aggregation::Latest => {
            ", argMax(text, (time_ns, seq)) AS v, argMax(time_ns, (time_ns, seq)) AS lt, \
             argMax(seq, (time_ns, seq)) AS ls"
        }
        Aggregation::UniqueCount => ", groupUniqArray(text) AS u",
    }
}

/// The `samples` statement of a query on grid `unit` below `mark`.
fn bucket_sql(
    inner: &Inner,
    meter: &CompiledMeter,
    generation_id: &str,
    plan: &Plan,
    q: &MeterQuery,
    unit: i64,
    mark: u64,
) -> String {
    let mut clauses = vec![
        format!("meter = {}", lit(&meter.key)),
        format!("gen = {}", lit(generation_id)),
        format!("time_ns >= {}", crate::read::ns(q.from)),
        format!("time_ns < {}", crate::read::ns(q.to)),
        format!("seq < {mark}"),
    ];
    if !q.subjects.is_empty() {
        let list: Vec<String> = q.subjects.iter().map(|s| lit(s)).collect();
        clauses.push(format!("subject IN ({})", list.join(",")));
    }
    for (position, value) in &plan.filters {
        clauses.push(format!("groups[{}] = {}", position + 1, lit(value)));
    }
    let voided: Vec<String> = inner
        .voids()
        .by_key
        .values()
        .filter(|r| r.event_type == meter.event_type())
        .map(|r| format!("({},{})", lit(&r.source), lit(&r.id)))
        .collect();
    if !voided.is_empty() {
        clauses.push(format!("(source, id) NOT IN ({})", voided.join(",")));
    }
    let mut keys = vec![format!("intDiv(time_ns, {unit}) AS b")];
    let mut group_by = vec!["b".to_owned()];
    if plan.by_subject || plan.attribution.is_some() {
        keys.push("subject".into());
        group_by.push("subject".into());
    }
    if !plan.groups.is_empty() {
        let items: Vec<String> = plan
            .groups
            .iter()
            .map(|(_, p)| format!("groups[{}]", p + 1))
            .collect();
        keys.push(format!("[{}] AS g", items.join(",")));
        group_by.push("g".into());
    }
    format!(
        "SELECT {}, count() AS n, min(exact) AS ok{} FROM {}.samples FINAL WHERE {} GROUP BY {}",
        keys.join(", "),
        value_columns(meter.aggregation()),
        inner.ch.database,
        clauses.join(" AND "),
        group_by.join(", ")
    )
}

/// A bucket's state, or `None` when `samples` cannot hold it exactly.
fn state_of(aggregation: Aggregation, b: Bucket) -> Option<AggState> {
    let number = |s: &Option<String>| s.as_deref().and_then(|s| Decimal::from_str(s).ok());
    let exact_sum = || -> Option<Decimal> {
        let sum = number(&b.s)?;
        let largest = number(&b.mx)?;
        // No partial sum of the bucket can pass n × the largest value.
        let bound = largest.checked_mul(Decimal::from(b.n))?;
        (b.ok == 1 && bound < Decimal::from(10_000_000_000_000_000i64)).then(|| {
            let mut sum = sum.normalize();
            sum.rescale(b.sc);
            sum
        })
    };
    Some(match aggregation {
        Aggregation::Count => AggState::Count(b.n),
        Aggregation::Sum => AggState::Sum {
            sum: exact_sum()?,
            count: b.n,
        },
        Aggregation::Avg => AggState::Avg {
            sum: exact_sum()?,
            count: b.n,
        },
        Aggregation::Min if b.ok == 1 => AggState::Min(number(&b.v)?),
        Aggregation::Max if b.ok == 1 => AggState::Max(number(&b.v)?),
        Aggregation::Min | Aggregation::Max => return None,
        Aggregation::Latest => AggState::Latest {
            time_ns: i128::from(b.lt),
            seq: b.ls,
            value: number(&b.v)?,
        },
        Aggregation::UniqueCount => AggState::UniqueCount(b.u.into_iter().collect::<BTreeSet<_>>()),
    })
}

/// Folds the rolled-up part of a query into `rows` and answers the mark:
/// the events at or after it are the caller's to read from `events`. `0`
/// (nothing folded) when the query cannot be answered from `samples`.
pub(crate) async fn fold(
    inner: &Inner,
    meter: &CompiledMeter,
    retired_at: Option<Timestamp>,
    plan: &Plan,
    q: &MeterQuery,
    rows: &mut BTreeMap<RowKey, AggState>,
) -> Result<u64, LedgerError> {
    let Some(unit) = grid(plan, q) else {
        return Ok(0);
    };
    let generation_id = generation(meter, retired_at);
    let mark = mark(inner, &meter.key, &generation_id)
        .await
        .map_err(ch_error)?;
    if mark == 0 {
        return Ok(0);
    }
    let sql = bucket_sql(inner, meter, &generation_id, plan, q, unit, mark);
    let buckets: Vec<Bucket> = inner.ch.select(&sql).await.map_err(ch_error)?;
    let mut folded: BTreeMap<RowKey, AggState> = BTreeMap::new();
    for b in buckets {
        let start = i128::from(b.b) * i128::from(unit);
        let at = Timestamp::from_nanosecond(start)
            .map_err(crate::ledger::storage)?
            .max(q.from);
        let subject = b.subject.clone().unwrap_or_default();
        let mut groups = vec![None; meter.dimensions().len()];
        for ((_, p), v) in plan.groups.iter().zip(&b.g) {
            if let Some(slot) = groups.get_mut(*p) {
                slot.clone_from(v);
            }
        }
        for (p, v) in &plan.filters {
            if let Some(slot) = groups.get_mut(*p) {
                *slot = Some(v.clone());
            }
        }
        let Some(key) = plan.key_at(at, &subject, &groups) else {
            continue;
        };
        let Some(state) = state_of(meter.aggregation(), b) else {
            return Ok(0); // not exact in `samples`: the caller reads events
        };
        merge(&mut folded, key, state)?;
    }
    for (key, state) in folded {
        merge(rows, key, state)?;
    }
    inner.stats.rolled_queries.fetch_add(1, Ordering::Relaxed);
    Ok(mark)
}

/// Merges `state` into the row `key`.
pub(crate) fn merge(
    rows: &mut BTreeMap<RowKey, AggState>,
    key: RowKey,
    state: AggState,
) -> Result<(), LedgerError> {
    match rows.get_mut(&key) {
        Some(merged) => merged
            .merge(&state)
            .map_err(|e| crate::ledger::storage(format!("merging a query row: {e}"))),
        None => {
            rows.insert(key, state);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_exact_values_go_to_num() {
        assert!(exact(&Decimal::from_str("12.500000000000").unwrap()));
        assert!(!exact(&Decimal::from_str("0.0000000000001").unwrap()));
        assert!(exact(&Decimal::from_str("-999999999999999").unwrap()));
        assert!(!exact(&Decimal::from_str("1000000000000000").unwrap()));
    }

    fn bucket(n: u64, s: &str, sc: u32, mx: &str) -> Bucket {
        Bucket {
            b: 0,
            subject: None,
            g: Vec::new(),
            n,
            ok: 1,
            s: Some(s.into()),
            sc,
            mx: Some(mx.into()),
            v: None,
            lt: 0,
            ls: 0,
            u: Vec::new(),
        }
    }

    #[test]
    fn sums_keep_the_inputs_scale_and_refuse_what_could_overflow() {
        let Some(AggState::Sum { sum, count }) = state_of(
            Aggregation::Sum,
            bucket(2, "4.000000000000", 2, "2.500000000000"),
        ) else {
            panic!("a sum")
        };
        assert_eq!((sum.to_string().as_str(), count), ("4.00", 2));
        assert!(state_of(Aggregation::Sum, bucket(11, "1", 0, "999999999999999")).is_none());
        let mut inexact = bucket(1, "0", 0, "0");
        inexact.ok = 0;
        assert!(state_of(Aggregation::Sum, inexact).is_none());
    }
}
