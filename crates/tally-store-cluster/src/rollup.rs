//! Rollups: each meter's measured events in ClickHouse (`samples`, layout
//! in [`crate::ch`]) and their pre-summed slabs (`rollups`,
//! [`crate::presum`]), so a query is summed, counted and picked by
//! ClickHouse per minute, hour or day instead of every event's JSON being
//! read back and measured.
//!
//! - **The roller** (one task per node that runs workers) follows the
//!   workers' progress ([`crate::ClusterLedger::materialised_below`]): when
//!   it moved (or the catalog changed) it reads the materialised events
//!   from the lowest sample mark of the current meter generations (a
//!   generation is a hash of a meter's definition and retirement) up to
//!   it, in one pass for every meter, measures each with
//!   [`crate::measure::sample`], inserts one `samples` row per measured
//!   event and generation, raises the sample marks, then sums the slabs
//!   the marks allow ([`crate::presum::advance`]). Idle, it reads nothing.
//!   A meter applied or edited later starts a new generation at mark 0:
//!   that is its backfill.
//! - **Old generations.** Once a meter's current generation is rolled up
//!   to the workers' progress (its backfill is done), or the meter is gone,
//!   the rows of its other generations are deleted
//!   ([`crate::presum::drop_generation`]: marks to 0, then `ALTER …
//!   DELETE`).
//! - **Idempotent.** Of several stored copies of one (source, id) only the
//!   lowest stream sequence is measured (the copy `events FINAL` keeps),
//!   and every row is computed from that stored copy alone, so a range
//!   rolled twice (a roller killed before its mark, two nodes at once, a
//!   worker that inserted a batch twice) writes identical rows that
//!   `ReplacingMergeTree` keeps once; reads say `FINAL`.
//! - **Reads** ([`fold`]): the query's range on the largest of day, hour
//!   or minute on which its ends, every window boundary and billing-account
//!   change fall; the cover of [`crate::presum::cover`] reads pre-summed
//!   slabs, then `samples`, then the events after the marks
//!   ([`crate::read`]). Voided events are left out by key (buckets holding
//!   one are read from `samples`), so voids subtract exactly. Every
//!   aggregation is served: SUM and AVG as `Decimal128(12)` sums (values
//!   with more than 12 decimals or of 10^15 or more, and sums that could
//!   reach 10^16, fall back to reading events: exact, never float), COUNT,
//!   MIN and MAX (the stored text of the extreme value), LATEST (by time,
//!   then sequence) and UNIQUE_COUNT (the distinct values of each bucket).
//!
//! **Never:** a query counts an event from two sources (the cover's ranges
//! are disjoint; the marks are read once per query), nor a row of an older
//! generation (rows are read for the generation the catalog holds now).
//! Known gap: a meter edited back to an earlier definition while another
//! node's catalog still holds that definition as current may see that node
//! raise the old generation's marks again as its rows are being deleted.

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
use crate::presum::{Cover, Marks};

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
         \"subject\":{},\"gkey\":{},\"groups\":{groups},\"exact\":{},\"num\":{num},\"scale\":{scale},\"text\":{}}}\n",
        json(&meter.key),
        json(generation_id),
        i64::try_from(nanos).unwrap_or(i64::MAX),
        json(&event.source),
        json(&event.id),
        json(&event.subject),
        json(&groups),
        u8::from(ok),
        json(&text),
    ))
}

/// A meter generation the catalog holds now.
struct Current {
    meter: Arc<CompiledMeter>,
    retired_at: Option<Timestamp>,
    generation_id: String,
}

fn current(inner: &Inner) -> Vec<Current> {
    let catalog = inner.catalog();
    catalog
        .meters
        .values()
        .flatten()
        .map(|m| {
            let retired_at = catalog.retired_at.get(&m.key).copied();
            Current {
                meter: Arc::clone(m),
                retired_at,
                generation_id: generation(m, retired_at),
            }
        })
        .collect()
}

/// A mark row as read: the latest of each (meter, gen, width).
#[derive(Deserialize)]
struct MarkRow {
    meter: String,
    #[serde(rename = "gen")]
    generation: String,
    width: u64,
    below: u64,
}

/// The marks of every generation (`only`: of one).
async fn read_marks(
    inner: &Inner,
    only: Option<(&str, &str)>,
) -> Result<HashMap<(String, String), Marks>, ChError> {
    let filter = only.map_or(String::new(), |(meter, generation_id)| {
        format!(
            "WHERE meter = {} AND gen = {}",
            lit(meter),
            lit(generation_id)
        )
    });
    let sql = format!(
        "SELECT meter, gen, width, argMax(below, at) AS below FROM {}.rollup_marks {filter} \
         GROUP BY meter, gen, width",
        inner.ch.database
    );
    let rows: Vec<MarkRow> = inner.ch.select(&sql).await?;
    let mut marks: HashMap<(String, String), Marks> = HashMap::new();
    for r in rows {
        marks
            .entry((r.meter, r.generation))
            .or_default()
            .insert(r.width, r.below);
    }
    Ok(marks)
}

/// Starts the roller of this node: it rolls when the workers' progress or
/// the catalog's generations moved, and reads nothing while idle.
pub(crate) fn start(inner: &Arc<Inner>, mut stopped: tokio::sync::watch::Receiver<bool>) {
    let inner = Arc::clone(inner);
    tokio::spawn(async move {
        let mut done: Option<(u64, Vec<String>)> = None;
        loop {
            let target = inner.stats.materialised_below.load(Ordering::Relaxed);
            let mut gens: Vec<String> = current(&inner)
                .into_iter()
                .map(|c| c.generation_id)
                .collect();
            gens.sort();
            let now = Some((target, gens));
            if now != done {
                match roll_all(&inner).await {
                    Ok(()) => done = now,
                    Err(e) => tracing::warn!(error = %e, "rolling up failed; trying again"),
                }
            }
            tokio::select! {
                _ = stopped.changed() => return,
                _ = tokio::time::sleep(PERIOD) => {}
            }
        }
    });
}

/// Rolls every meter of the catalog up to what is materialised now, sums
/// the slabs that allows, and deletes superseded generations.
pub(crate) async fn roll_all(inner: &Inner) -> Result<(), ChError> {
    let target = inner.stats.materialised_below.load(Ordering::Relaxed);
    let meters = current(inner);
    if target == 0 {
        return Ok(());
    }
    inner.ensure_schema().await?;
    let mut marks = read_marks(inner, None).await?;
    sample_all(inner, &meters, &mut marks, target).await?;
    for c in &meters {
        let key = (c.meter.key.clone(), c.generation_id.clone());
        let generation_marks = marks.entry(key).or_default();
        let slab = inner.config.rollup_slab;
        crate::presum::advance(inner, &c.meter, &c.generation_id, slab, generation_marks).await?;
    }
    drop_superseded(inner, &meters, &marks, target).await
}

/// Deletes the rows of every generation that is not current, once the
/// current generation of its meter is rolled up to `target`.
async fn drop_superseded(
    inner: &Inner,
    meters: &[Current],
    marks: &HashMap<(String, String), Marks>,
    target: u64,
) -> Result<(), ChError> {
    let sampled = |meter: &str, generation_id: &str| {
        marks
            .get(&(meter.to_owned(), generation_id.to_owned()))
            .and_then(|m| m.get(&0).copied())
            .unwrap_or(0)
    };
    let now: HashMap<&str, &str> = meters
        .iter()
        .map(|c| (c.meter.key.as_str(), c.generation_id.as_str()))
        .collect();
    for ((meter, generation_id), generation_marks) in marks {
        if generation_marks.values().all(|below| *below == 0) {
            continue; // nothing stored, or already deleted
        }
        match now.get(meter.as_str()) {
            Some(g) if *g == generation_id => continue,
            Some(g) if sampled(meter, g) < target => continue, // backfill running
            _ => {}
        }
        crate::presum::drop_generation(inner, meter, generation_id, generation_marks).await?;
    }
    Ok(())
}

/// Materialised events of `types` with `from <= seq < target`, at most
/// [`CHUNK`], and the `from` after them.
async fn read_events(
    inner: &Inner,
    types: &BTreeSet<&str>,
    from: u64,
    target: u64,
) -> Result<(u64, Vec<(u64, Timestamp, CloudEvent)>), ChError> {
    #[derive(Deserialize)]
    struct Row {
        seq: u64,
        ingested_ms: i64,
        event: String,
    }
    let list: Vec<String> = types.iter().map(|t| lit(t)).collect();
    let sql = format!(
        "SELECT seq, ingested_ms, event FROM {}.events WHERE type IN ({}) AND seq >= {from} \
         AND seq < {target} ORDER BY seq LIMIT {CHUNK}",
        inner.ch.database,
        list.join(",")
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
    Ok((next, events))
}

/// Measures the events every current generation has not sampled yet, in
/// one pass from the lowest sample mark to `target`, and raises the
/// sample marks.
async fn sample_all(
    inner: &Inner,
    meters: &[Current],
    marks: &mut HashMap<(String, String), Marks>,
    target: u64,
) -> Result<(), ChError> {
    let mut pending: Vec<(&Current, u64)> = meters
        .iter()
        .map(|c| {
            let key = (c.meter.key.clone(), c.generation_id.clone());
            (
                c,
                marks
                    .get(&key)
                    .and_then(|m| m.get(&0).copied())
                    .unwrap_or(0),
            )
        })
        .filter(|(_, from)| *from < target)
        .collect();
    while let Some(from) = pending.iter().map(|(_, f)| *f).min() {
        let types: BTreeSet<&str> = pending.iter().map(|(c, _)| c.meter.event_type()).collect();
        let (next, events) = read_events(inner, &types, from, target).await?;
        let lower = lowest_copies(inner, &events).await?;
        let mut body = String::new();
        for (seq, at, event) in &events {
            let key = keys::dedupe_key(&event.source, &event.id);
            if lower.get(&key).is_some_and(|low| low < seq) {
                continue; // a later copy: the lowest one is measured instead
            }
            for (c, f) in &pending {
                if *f <= *seq && c.meter.event_type() == event.kind {
                    let line =
                        sample_line(&c.meter, &c.generation_id, *seq, event, *at, c.retired_at);
                    body.push_str(&line.unwrap_or_default());
                }
            }
        }
        if !body.is_empty() {
            inner
                .ch
                .insert("samples", body.into_bytes())
                .await
                .inspect_err(|e| inner.stats.insert_error("samples", e))?;
        }
        let raised: Vec<(&str, &str, u64, u64)> = pending
            .iter()
            .filter(|(_, f)| *f < next)
            .map(|(c, _)| (c.meter.key.as_str(), c.generation_id.as_str(), 0, next))
            .collect();
        crate::presum::write_marks(inner, &raised).await?;
        for (c, f) in &mut pending {
            if *f < next {
                *f = next;
                let key = (c.meter.key.clone(), c.generation_id.clone());
                marks.entry(key).or_default().insert(0, next);
            }
        }
        pending.retain(|(_, f)| *f < target);
    }
    Ok(())
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

/// The grid a query can be answered on from the rollups: the largest of
/// day, hour and minute on which its ends and every boundary inside the
/// range fall (window boundaries, and billing-account changes when
/// attributed).
/// `None` when some boundary is not on a whole minute, or times are
/// before 1970.
fn grid(plan: &Plan, q: &MeterQuery) -> Option<i64> {
    let mut inside: Vec<Timestamp> = plan.windows.iter().skip(1).map(|w| w.start).collect();
    inside.extend([q.from, q.to]);
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

/// The columns an aggregation needs of each bucket of `samples`.
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

/// What a query's statements share: the generation, the subjects and
/// group filters (`clauses`), and the keys it groups by.
struct Shape {
    clauses: Vec<String>,
    keys: Vec<String>,
    group_by: Vec<String>,
}

fn shape(meter: &CompiledMeter, generation_id: &str, plan: &Plan, q: &MeterQuery) -> Shape {
    let mut clauses = vec![
        format!("meter = {}", lit(&meter.key)),
        format!("gen = {}", lit(generation_id)),
    ];
    if !q.subjects.is_empty() {
        let list: Vec<String> = q.subjects.iter().map(|s| lit(s)).collect();
        clauses.push(format!("subject IN ({})", list.join(",")));
    }
    for (position, value) in &plan.filters {
        clauses.push(format!("groups[{}] = {}", position + 1, lit(value)));
    }
    let mut keys = Vec::new();
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
    Shape {
        clauses,
        keys,
        group_by,
    }
}

/// The `samples` statement of a query on grid `unit` for the sequences
/// `seqs` (a condition), leaving out voided events; `None` when no
/// sequence is to be read from `samples`.
fn samples_sql(
    inner: &Inner,
    meter: &CompiledMeter,
    shape: &Shape,
    q: &MeterQuery,
    unit: i64,
    seqs: Option<String>,
) -> Option<String> {
    let mut clauses = shape.clauses.clone();
    clauses.push(seqs?);
    clauses.push(format!("time_ns >= {}", crate::read::ns(q.from)));
    clauses.push(format!("time_ns < {}", crate::read::ns(q.to)));
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
    keys.extend(shape.keys.iter().cloned());
    Some(format!(
        "SELECT {}, count() AS n, min(exact) AS ok{} FROM {}.samples FINAL WHERE {} GROUP BY {}",
        keys.join(", "),
        value_columns(meter.aggregation()),
        inner.ch.database,
        clauses.join(" AND "),
        shape.group_by.join(", ")
    ))
}

/// The `rollups` statement of a query on grid `unit` over the cover's
/// slabs, without the buckets in `voided`.
fn rollups_sql(
    inner: &Inner,
    meter: &CompiledMeter,
    shape: &Shape,
    q: &MeterQuery,
    (unit, slabs): (i64, String),
    voided: &BTreeSet<i64>,
) -> String {
    let mut clauses = shape.clauses.clone();
    clauses.push(format!("unit = {unit}"));
    clauses.push(slabs);
    clauses.push(format!("bucket >= {}", crate::read::ns(q.from) / unit));
    clauses.push(format!("bucket < {}", crate::read::ns(q.to) / unit));
    if !voided.is_empty() {
        let list: Vec<String> = voided.iter().map(i64::to_string).collect();
        clauses.push(format!("bucket NOT IN ({})", list.join(",")));
    }
    let mut keys = vec!["bucket AS b".to_owned()];
    keys.extend(shape.keys.iter().cloned());
    format!(
        "SELECT {}, sum(rn) AS n, min(rok) AS ok{} FROM {}.rollups FINAL WHERE {} GROUP BY {}",
        keys.join(", "),
        crate::presum::read_columns(meter.aggregation()),
        inner.ch.database,
        clauses.join(" AND "),
        shape.group_by.join(", ")
    )
}

/// The sequences a query reads from `samples`: the cover's range, and the
/// buckets below it that hold a voided event.
fn samples_seqs(cover: &Cover, unit: i64, voided: &BTreeSet<i64>) -> Option<String> {
    let (from, to) = cover.samples;
    let mut parts = Vec::new();
    if from < to {
        parts.push(format!("(seq >= {from} AND seq < {to})"));
    }
    if from > 0 && !voided.is_empty() {
        let list: Vec<String> = voided.iter().map(i64::to_string).collect();
        parts.push(format!(
            "(seq < {from} AND intDiv(time_ns, {unit}) IN ({}))",
            list.join(",")
        ));
    }
    (!parts.is_empty()).then(|| format!("({})", parts.join(" OR ")))
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

/// Folds the rolled-up part of a query into `rows` and answers where it
/// ends: the events at or after it are the caller's to read from
/// `events`. `0` (nothing folded) when the query cannot be answered from
/// the rollups.
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
    let marks = read_marks(inner, Some((&meter.key, &generation_id)))
        .await
        .map_err(ch_error)?
        .into_values()
        .next()
        .unwrap_or_default();
    let cover = crate::presum::cover(&marks);
    if cover.events_from == 0 {
        return Ok(0);
    }
    let voided: BTreeSet<i64> = inner
        .voids()
        .by_key
        .values()
        .filter(|r| r.event_type == meter.event_type())
        .map(|r| crate::read::ns(r.event_time).div_euclid(unit))
        .collect();
    let shape = shape(meter, &generation_id, plan, q);
    let mut statements = Vec::new();
    if let Some(slabs) = crate::presum::slab_clause(&cover) {
        statements.push(rollups_sql(inner, meter, &shape, q, (unit, slabs), &voided));
    }
    let seqs = samples_seqs(&cover, unit, &voided);
    statements.extend(samples_sql(inner, meter, &shape, q, unit, seqs));
    let mut folded: BTreeMap<RowKey, AggState> = BTreeMap::new();
    for sql in statements {
        let buckets: Vec<Bucket> = inner.ch.select(&sql).await.map_err(ch_error)?;
        if !fold_buckets(meter, plan, q, unit, buckets, &mut folded)? {
            return Ok(0); // not exact in the rollups: the caller reads events
        }
    }
    for (key, state) in folded {
        merge(rows, key, state)?;
    }
    inner.stats.rolled_queries.fetch_add(1, Ordering::Relaxed);
    Ok(cover.events_from)
}

/// Folds rolled-up buckets into `folded`; `false` when some bucket's
/// value cannot be held exactly.
fn fold_buckets(
    meter: &CompiledMeter,
    plan: &Plan,
    q: &MeterQuery,
    unit: i64,
    buckets: Vec<Bucket>,
    folded: &mut BTreeMap<RowKey, AggState>,
) -> Result<bool, LedgerError> {
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
            return Ok(false);
        };
        merge(folded, key, state)?;
    }
    Ok(true)
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
