//! The embedded ledger against a naive reference model.
//!
//! Random usage events (duplicates, late and out-of-order arrivals, odd
//! seconds and sub-second times around DST transitions, numeric strings,
//! missing and invalid values) are ingested in random batches; every meter
//! (one per aggregation, applied before the events, and the same seven
//! applied after them so that they are built by backfill) is then queried
//! with random ranges, window sizes, time zones, subject filters, group-bys
//! and dimension filters, and each answer is compared row by row with a
//! reference that keeps the first event per (source, id) in a `Vec` and
//! aggregates it by brute force. Windows are computed here directly with
//! jiff; nothing of `tally_meter::window` or `QueryPlan` is used. Half of
//! the bounds are not on whole minutes (milliseconds off), so the partial
//! minutes at their edges come from the log (`tally_ledger::exact`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::str::FromStr;
use std::time::{Duration, Instant};

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, ToSpan};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::strategy::ValueTree;
use proptest::test_runner::{TestCaseError, TestRunner};
use rust_decimal::Decimal;
use serde_json::{Map, Value, json};
use tally_ledger::{
    ApplyMode, EventFilter, IngestOutcome, Ledger, LedgerError, MeterQuery, QueryResult,
    VoidRequest,
};
use tally_meter::WindowSize;
use tally_model::{CloudEvent, Manifest};
use tally_store_embedded::{EmbeddedLedger, StoreConfig};

// ---- vocabulary -------------------------------------------------------------

const SUBJECTS: [&str; 5] = ["acme", "globex", "initech", "umbrella", "hooli"];
const SOURCES: [&str; 2] = ["//meter/a", "//meter/b"];
const ZONES: [&str; 4] = ["UTC", "Europe/Berlin", "Asia/Kolkata", "America/New_York"];
const EVENT_TYPE: &str = "usage";
const OTHER_TYPE: &str = "other.usage";

/// Where events cluster: DST transitions and month boundaries.
const CENTERS: [&str; 5] = [
    "2026-03-29T01:00:00Z", // Europe/Berlin springs forward (02:00 CET -> 03:00 CEST)
    "2026-10-25T01:00:00Z", // Europe/Berlin falls back (03:00 CEST -> 02:00 CET)
    "2026-03-31T22:00:00Z", // April starts in Berlin (and March ends in UTC/New York 2 h later)
    "2026-03-08T07:00:00Z", // America/New_York springs forward
    "2026-11-01T06:00:00Z", // America/New_York falls back; November starts nearby everywhere
];
/// A range that covers every generated event.
const ALL_FROM: &str = "2026-03-01T00:00:00Z";
const ALL_TO: &str = "2026-11-04T00:00:00Z";

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Agg {
    Sum,
    Count,
    UniqueCount,
    Avg,
    Min,
    Max,
    Latest,
}

impl Agg {
    const ALL: [Agg; 7] = [
        Agg::Sum,
        Agg::Count,
        Agg::UniqueCount,
        Agg::Avg,
        Agg::Min,
        Agg::Max,
        Agg::Latest,
    ];

    fn yaml(self) -> &'static str {
        match self {
            Agg::Sum => "SUM",
            Agg::Count => "COUNT",
            Agg::UniqueCount => "UNIQUE_COUNT",
            Agg::Avg => "AVG",
            Agg::Min => "MIN",
            Agg::Max => "MAX",
            Agg::Latest => "LATEST",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Agg::Sum => "sum",
            Agg::Count => "count",
            Agg::UniqueCount => "unique",
            Agg::Avg => "avg",
            Agg::Min => "min",
            Agg::Max => "max",
            Agg::Latest => "latest",
        }
    }

    /// The meter applied before any event arrives.
    fn early(self) -> String {
        format!("m-{}", self.slug())
    }

    /// The meter applied after the events arrived, built by backfill.
    fn late(self) -> String {
        format!("late-{}", self.slug())
    }
}

/// An OpenMeter-style `MeterDefinition`: value at `$.value`, dimensions
/// `method` and `region` at the top of `data`.
fn meter_manifest(name: &str, agg: Agg) -> Manifest {
    let value = if agg == Agg::Count {
        String::new()
    } else {
        ", valueProperty: $.value".to_owned()
    };
    let yaml = format!(
        "apiVersion: billing.miloapis.com/v1alpha1\n\
         kind: MeterDefinition\n\
         metadata: {{name: {name}}}\n\
         spec: {{meterName: {name}, measurement: {{aggregation: {agg}}}, \
         event: {{type: {EVENT_TYPE}{value}, dimensions: {{method: $.method, region: $.region}}}}}}\n",
        agg = agg.yaml(),
    );
    let mut manifests = Manifest::parse_documents(&yaml).unwrap_or_else(|e| panic!("{yaml}\n{e}"));
    assert_eq!(manifests.len(), 1);
    manifests.remove(0)
}

// ---- generated input ------------------------------------------------------------

#[derive(Debug, Clone)]
enum GenValue {
    Int(i64),
    /// The integer as a JSON string, e.g. `"42"`.
    Str(i64),
    /// `mantissa / 10^scale` as a string with its trailing zeros, e.g. `"12.50"`.
    DecStr(i64, u32),
    Missing,
    Null,
    /// A string that is not a number.
    Junk,
}

#[derive(Debug, Clone)]
struct GenEvent {
    source: usize,
    id: u16,
    /// Taken modulo the case's number of subjects.
    subject: usize,
    cluster: usize,
    offset_seconds: i64,
    nanos: u32,
    value: GenValue,
    method: Option<&'static str>,
    region: Option<&'static str>,
    other_type: bool,
    /// Write `time` with a +05:30 offset instead of `Z`.
    offset_text: bool,
}

#[derive(Debug, Clone)]
struct GenQuery {
    window: Option<WindowSize>,
    zone: usize,
    /// Indexes into `SUBJECTS` (possibly subjects without events).
    subjects: Vec<usize>,
    group_by: usize,
    filter_get: bool,
    whole: bool,
    c1: usize,
    c2: usize,
    /// Minutes before the first anchor (`from`) and after the last (`to`).
    m1: i64,
    m2: i64,
    /// Milliseconds added to `from` and to `to`: bounds of any precision,
    /// whose partial minutes are read from the log (`tally_ledger::exact`).
    ms1: i64,
    ms2: i64,
}

#[derive(Debug, Clone)]
struct Case {
    subjects: usize,
    /// Besides LATEST, the aggregation of the second meter applied after the events.
    late: Agg,
    events: Vec<GenEvent>,
    cuts: Vec<Index>,
    /// Append a changed copy of the first event to the first batch.
    in_batch_duplicate: bool,
    queries: Vec<GenQuery>,
    /// Events voided after ingest (indexes into the stored events).
    voids: Vec<Index>,
}

fn value_strategy() -> impl Strategy<Value = GenValue> {
    prop_oneof![
        8 => (-1000i64..1000).prop_map(GenValue::Int),
        2 => (-1_000_000_000_000_000i64..=1_000_000_000_000_000).prop_map(GenValue::Int),
        3 => (-1000i64..1000).prop_map(GenValue::Str),
        1 => (-1_000_000_000_000_000i64..=1_000_000_000_000_000).prop_map(GenValue::Str),
        1 => (-100_000i64..100_000, 1u32..4).prop_map(|(m, s)| GenValue::DecStr(m, s)),
        1 => Just(GenValue::Missing),
        1 => Just(GenValue::Null),
        1 => Just(GenValue::Junk),
    ]
}

fn event_strategy(id_space: u16) -> impl Strategy<Value = GenEvent> {
    (
        (0usize..2, 0..id_space, 0usize..5, 0usize..CENTERS.len()),
        prop_oneof![
            3 => -900i64..900,
            4 => -172_800i64..172_800,
            // On and next to window boundaries, and equal times (LATEST ties).
            1 => proptest::sample::select(vec![-3600i64, -61, -60, -1, 0, 1, 59, 60, 1800, 3600, 7200]),
        ],
        prop_oneof![3 => Just(0u32), 1 => 0u32..1_000_000_000],
        value_strategy(),
        prop_oneof![Just(Some("GET")), Just(Some("POST")), Just(None)],
        prop_oneof![6 => Just(Some("eu")), 6 => Just(Some("us")), 1 => Just(None)],
        proptest::bool::weighted(0.05),
        proptest::bool::weighted(0.2),
    )
        .prop_map(
            |((source, id, subject, cluster), offset_seconds, nanos, value, method, region, other_type, offset_text)| {
                GenEvent {
                    source,
                    id,
                    subject,
                    cluster,
                    offset_seconds,
                    nanos,
                    value,
                    method,
                    region,
                    other_type,
                    offset_text,
                }
            },
        )
}

fn query_strategy() -> impl Strategy<Value = GenQuery> {
    (
        prop_oneof![
            Just(None),
            Just(Some(WindowSize::Minute)),
            Just(Some(WindowSize::Hour)),
            Just(Some(WindowSize::Day)),
            Just(Some(WindowSize::Month)),
        ],
        0usize..ZONES.len(),
        prop_oneof![2 => Just(vec![]), 1 => proptest::sample::subsequence(vec![0usize, 1, 2, 3, 4], 1..=3)],
        0usize..3,
        proptest::bool::weighted(0.3),
        proptest::bool::weighted(0.4),
        (
            0usize..CENTERS.len(),
            0usize..CENTERS.len(),
            // Bounds sometimes right next to a centre, where events sit on
            // and beside whole minutes.
            prop_oneof![1 => 0i64..3, 2 => 0i64..5000],
            prop_oneof![1 => 0i64..3, 2 => 0i64..5000],
        ),
        (
            prop_oneof![1 => Just(0i64), 1 => -59_999i64..60_000],
            prop_oneof![1 => Just(0i64), 1 => -59_999i64..60_000],
        ),
    )
        .prop_map(|(window, zone, subjects, group_by, filter_get, whole, (c1, c2, m1, m2), (ms1, ms2))| GenQuery {
            ms1,
            ms2,
            window,
            zone,
            subjects,
            group_by,
            filter_get,
            whole,
            c1,
            c2,
            m1,
            m2,
        })
}

fn case_strategy(events: std::ops::Range<usize>, queries: usize) -> impl Strategy<Value = Case> {
    (
        1usize..=5,
        prop_oneof![Just(40u16), Just(150u16), Just(1000u16)],
        proptest::collection::vec(any::<Index>(), 0..6),
        any::<bool>(),
        proptest::collection::vec(query_strategy(), queries),
        proptest::sample::select(&Agg::ALL[..6]),
        proptest::collection::vec(any::<Index>(), 0..8),
    )
        .prop_flat_map(
            move |(subjects, id_space, cuts, in_batch_duplicate, queries, late, voids)| {
                proptest::collection::vec(event_strategy(id_space), events.clone()).prop_map(
                    move |events| Case {
                        subjects,
                        late,
                        events,
                        cuts: cuts.clone(),
                        in_batch_duplicate,
                        queries: queries.clone(),
                        voids: voids.clone(),
                    },
                )
            },
        )
}

// ---- the reference model ----------------------------------------------------------

/// An event as the reference keeps it.
#[derive(Debug, Clone)]
struct RefEvent {
    /// Order of first arrival among distinct events (the ledger's seq order).
    seq: u64,
    source: String,
    id: String,
    subject: String,
    kind: String,
    time: Timestamp,
    /// `None`: no `value` key at all.
    value: Option<Value>,
    method: Option<String>,
    region: Option<String>,
}

impl RefEvent {
    fn dimension(&self, name: &str) -> Option<&str> {
        match name {
            "method" => self.method.as_deref(),
            "region" => self.region.as_deref(),
            other => panic!("no dimension {other}"),
        }
    }
}

/// The events of one batch: what is sent and what the reference knows of each.
struct Prepared {
    batches: Vec<Vec<(Value, RefEvent)>>,
}

fn event_json(g: &GenEvent, subjects: usize, id_prefix: &str) -> (Value, RefEvent) {
    let time = ts(CENTERS[g.cluster])
        .checked_add(SignedDuration::new(g.offset_seconds, g.nanos as i32))
        .unwrap();
    let time_text = if g.offset_text {
        time.display_with_offset(jiff::tz::Offset::from_seconds(5 * 3600 + 1800).unwrap())
            .to_string()
    } else {
        time.to_string()
    };
    let value = match &g.value {
        GenValue::Int(i) => Some(json!(i)),
        GenValue::Str(i) => Some(json!(i.to_string())),
        GenValue::DecStr(m, s) => {
            // Keep the trailing zero: "12.50" is a different UNIQUE_COUNT value from "12.5".
            let d = Decimal::new(*m, *s);
            Some(json!(format!("{d}0")))
        }
        GenValue::Missing => None,
        GenValue::Null => Some(Value::Null),
        GenValue::Junk => Some(json!("lots")),
    };
    let mut data = Map::new();
    if let Some(v) = &value {
        data.insert("value".into(), v.clone());
    }
    if let Some(m) = g.method {
        data.insert("method".into(), json!(m));
    }
    if let Some(r) = g.region {
        data.insert("region".into(), json!(r));
    }
    let subject = SUBJECTS[g.subject % subjects].to_owned();
    let kind = if g.other_type { OTHER_TYPE } else { EVENT_TYPE };
    let id = format!("{id_prefix}{}", g.id);
    let raw = json!({
        "specversion": "1.0",
        "id": id,
        "source": SOURCES[g.source],
        "type": kind,
        "subject": subject,
        "time": time_text,
        "data": Value::Object(data),
    });
    let r = RefEvent {
        seq: u64::MAX,
        source: SOURCES[g.source].to_owned(),
        id,
        subject,
        kind: kind.to_owned(),
        time,
        value,
        method: g.method.map(str::to_owned),
        region: g.region.map(str::to_owned),
    };
    (raw, r)
}

fn prepare(case: &Case, id_prefix: &str) -> Prepared {
    let all: Vec<(Value, RefEvent)> = case
        .events
        .iter()
        .map(|g| event_json(g, case.subjects, id_prefix))
        .collect();
    let mut cuts: Vec<usize> = case.cuts.iter().map(|i| i.index(all.len() + 1)).collect();
    cuts.push(0);
    cuts.push(all.len());
    cuts.sort_unstable();
    cuts.dedup();
    let mut batches: Vec<Vec<(Value, RefEvent)>> =
        cuts.windows(2).map(|w| all[w[0]..w[1]].to_vec()).collect();
    if case.in_batch_duplicate && !case.events.is_empty() {
        // Same (source, id) as the very first event, different everything else:
        // the first one must win.
        let mut g = case.events[0].clone();
        g.value = GenValue::Int(7_777_777);
        g.offset_seconds += 4321;
        g.subject += 1;
        g.method = Some("POST");
        batches[0].push(event_json(&g, case.subjects, id_prefix));
    }
    Prepared { batches }
}

/// The reference store: first (source, id) wins.
#[derive(Default, Clone)]
struct Reference {
    events: Vec<RefEvent>,
    index: HashMap<(String, String), usize>,
}

/// One expected quarantine notice: (index in request, id, meter, reason).
type Notice = (usize, String, String, String);

impl Reference {
    /// Records one request; returns what the ledger must answer.
    fn ingest(
        &mut self,
        batch: &[(Value, RefEvent)],
        meters_at_ingest: &[(String, Agg)],
    ) -> (IngestOutcome, Vec<Notice>) {
        let mut outcome = IngestOutcome::default();
        let mut notices = Vec::new();
        for (index, (_, e)) in batch.iter().enumerate() {
            let key = (e.source.clone(), e.id.clone());
            if self.index.contains_key(&key) {
                outcome.duplicates += 1;
                continue;
            }
            outcome.accepted += 1;
            let mut e = e.clone();
            e.seq = self.events.len() as u64;
            if e.kind != EVENT_TYPE {
                notices.push((
                    index,
                    e.id.clone(),
                    String::new(),
                    "UNKNOWN_METER".to_owned(),
                ));
            } else {
                for (meter, agg) in meters_at_ingest {
                    if let Err(reason) = sample(*agg, &e.value) {
                        notices.push((index, e.id.clone(), meter.clone(), reason.to_owned()));
                    }
                }
            }
            self.index.insert(key, self.events.len());
            self.events.push(e);
        }
        notices.sort();
        (outcome, notices)
    }
}

#[derive(Debug, Clone)]
enum Sample {
    None,
    Number(Decimal),
    Text(String),
}

/// What one event contributes to a meter of `agg`, or the quarantine reason.
fn sample(agg: Agg, value: &Option<Value>) -> Result<Sample, &'static str> {
    if agg == Agg::Count {
        return Ok(Sample::None);
    }
    let v = match value {
        None | Some(Value::Null) => return Err("MISSING_VALUE"),
        Some(v) => v,
    };
    if agg == Agg::UniqueCount {
        return match v {
            Value::String(s) => Ok(Sample::Text(s.clone())),
            Value::Number(n) => Ok(Sample::Text(n.to_string())),
            _ => Err("INVALID_VALUE"),
        };
    }
    match v {
        Value::Number(n) => Ok(Sample::Number(Decimal::from(
            n.as_i64().expect("integers only"),
        ))),
        Value::String(s) => Decimal::from_str(s.trim())
            .map(Sample::Number)
            .map_err(|_| "INVALID_VALUE"),
        _ => Err("INVALID_VALUE"),
    }
}

/// The window of size `size` in `tz` that holds `t`, computed directly.
fn window_of(t: Timestamp, size: WindowSize, tz: &TimeZone) -> (Timestamp, Timestamp) {
    let zoned = t.to_zoned(tz.clone());
    let fixed = |len: i64| {
        // The local clock floored to `len` seconds, with the offset in force at `t`.
        let second = t.as_second();
        assert!(second >= 0, "the reference floors positive times only");
        let local = second + i64::from(zoned.offset().seconds());
        let start = second - local.rem_euclid(len);
        // All zones used here change their offset by whole hours, so the
        // next local hour (minute) boundary is always exactly one hour
        // (minute) of absolute time later.
        (
            Timestamp::from_second(start).unwrap(),
            Timestamp::from_second(start + len).unwrap(),
        )
    };
    match size {
        WindowSize::Minute => fixed(60),
        WindowSize::Hour => fixed(3600),
        WindowSize::Day => {
            let start = zoned.start_of_day().unwrap().timestamp();
            let end = zoned
                .date()
                .tomorrow()
                .unwrap()
                .to_zoned(tz.clone())
                .unwrap()
                .start_of_day()
                .unwrap()
                .timestamp();
            (start, end)
        }
        WindowSize::Month => {
            let first = zoned.date().first_of_month();
            let start = first
                .to_zoned(tz.clone())
                .unwrap()
                .start_of_day()
                .unwrap()
                .timestamp();
            let next = first.checked_add(1.month()).unwrap();
            let end = next
                .to_zoned(tz.clone())
                .unwrap()
                .start_of_day()
                .unwrap()
                .timestamp();
            (start, end)
        }
    }
}

type Row = (
    Timestamp,
    Timestamp,
    Option<String>,
    BTreeMap<String, Option<String>>,
    Decimal,
);

fn aggregate(agg: Agg, samples: &[(Timestamp, u64, Sample)]) -> Decimal {
    let numbers = || {
        samples.iter().map(|(_, _, s)| match s {
            Sample::Number(d) => *d,
            other => panic!("{other:?} in a numeric meter"),
        })
    };
    match agg {
        Agg::Sum => numbers().fold(Decimal::ZERO, |a, b| a + b),
        Agg::Count => Decimal::from(samples.len()),
        Agg::UniqueCount => {
            let set: BTreeSet<&str> = samples
                .iter()
                .map(|(_, _, s)| match s {
                    Sample::Text(t) => t.as_str(),
                    other => panic!("{other:?} in UNIQUE_COUNT"),
                })
                .collect();
            Decimal::from(set.len())
        }
        Agg::Avg => {
            (numbers().fold(Decimal::ZERO, |a, b| a + b) / Decimal::from(samples.len())).normalize()
        }
        Agg::Min => numbers().min().unwrap(),
        Agg::Max => numbers().max().unwrap(),
        Agg::Latest => {
            let (_, _, s) = samples
                .iter()
                .max_by_key(|(t, seq, _)| (t.as_nanosecond(), *seq))
                .unwrap();
            match s {
                Sample::Number(d) => *d,
                other => panic!("{other:?} in LATEST"),
            }
        }
    }
}

fn reference_rows(events: &[RefEvent], agg: Agg, q: &MeterQuery) -> Vec<Row> {
    let by_subject = !q.subjects.is_empty() || q.group_by.iter().any(|g| g == "subject");
    let dims: Vec<&str> = q
        .group_by
        .iter()
        .map(String::as_str)
        .filter(|g| *g != "subject")
        .collect();
    // (window start, window end, subject, groups) -> (time, seq, sample) of each event.
    type RowKey = (
        Timestamp,
        Timestamp,
        Option<String>,
        BTreeMap<String, Option<String>>,
    );
    let mut acc: BTreeMap<RowKey, Vec<(Timestamp, u64, Sample)>> = BTreeMap::new();
    for e in events {
        if e.kind != EVENT_TYPE || e.time < q.from || e.time >= q.to {
            continue;
        }
        if !q.subjects.is_empty() && !q.subjects.contains(&e.subject) {
            continue;
        }
        if q.filter_group_by
            .iter()
            .any(|(k, v)| e.dimension(k) != Some(v.as_str()))
        {
            continue;
        }
        let Ok(s) = sample(agg, &e.value) else {
            continue;
        };
        let (start, end) = match q.window_size {
            None => (q.from, q.to),
            Some(size) => window_of(e.time, size, &q.time_zone),
        };
        let groups = dims
            .iter()
            .map(|d| ((*d).to_owned(), e.dimension(d).map(str::to_owned)))
            .collect();
        acc.entry((start, end, by_subject.then(|| e.subject.clone()), groups))
            .or_default()
            .push((e.time, e.seq, s));
    }
    acc.into_iter()
        .map(|((start, end, subject, groups), samples)| {
            (
                start,
                end,
                subject,
                groups,
                aggregate(agg, &samples).normalize(),
            )
        })
        .collect()
}

// ---- queries ----------------------------------------------------------------------

fn meter_query(g: &GenQuery) -> MeterQuery {
    let minutes = |m: i64| SignedDuration::from_mins(m);
    let (from, to) = if g.window == Some(WindowSize::Minute) {
        // At most a few days of minutes (a query may have 100 000 windows).
        let center = ts(CENTERS[g.c1]);
        (
            center - minutes(g.m1.min(2000)),
            center + minutes(g.m2.min(2000)),
        )
    } else {
        let (from, to) = if g.whole {
            (ts(ALL_FROM) - minutes(g.m1), ts(ALL_TO) + minutes(g.m2))
        } else {
            let (a, b) = (ts(CENTERS[g.c1]), ts(CENTERS[g.c2]));
            (a.min(b) - minutes(g.m1), a.max(b) + minutes(g.m2))
        };
        if g.window == Some(WindowSize::Hour) {
            // Months of hours are slow to plan in debug builds and add
            // nothing; 30 days still span the three March clusters.
            (from, to.min(from + SignedDuration::from_hours(30 * 24)))
        } else {
            (from, to)
        }
    };
    let (from, to) = (
        from + SignedDuration::from_millis(g.ms1),
        to + SignedDuration::from_millis(g.ms2),
    );
    let to = if to > from { to } else { from + minutes(1) };
    let group_by: Vec<String> = match g.group_by {
        0 => vec![],
        1 => vec!["method".into()],
        _ => vec!["subject".into(), "region".into()],
    };
    MeterQuery {
        from,
        to,
        window_size: g.window,
        time_zone: TimeZone::get(ZONES[g.zone]).unwrap(),
        subjects: g.subjects.iter().map(|i| SUBJECTS[*i].to_owned()).collect(),
        group_by,
        filter_group_by: if g.filter_get {
            BTreeMap::from([("method".into(), "GET".into())])
        } else {
            BTreeMap::new()
        },
        limit: None,
        cursor: None,
    }
}

fn describe(q: &MeterQuery) -> String {
    format!(
        "from={} to={} window={:?} tz={} subjects={:?} group_by={:?} filter_group_by={:?}",
        q.from,
        q.to,
        q.window_size,
        q.time_zone.iana_name().unwrap_or("?"),
        q.subjects,
        q.group_by,
        q.filter_group_by
    )
}

fn ledger_rows(result: &QueryResult) -> Vec<Row> {
    let mut rows: Vec<Row> = result
        .rows
        .iter()
        .map(|r| {
            (
                r.window_start,
                r.window_end,
                r.subject.clone(),
                r.group_by.clone(),
                r.value.normalize(),
            )
        })
        .collect();
    rows.sort();
    rows
}

fn show_rows(rows: &[Row]) -> String {
    let mut out = String::new();
    for (start, end, subject, groups, value) in rows {
        let _ = writeln!(
            out,
            "    [{start} .. {end}) subject={subject:?} groups={groups:?} value={value}"
        );
    }
    if rows.is_empty() {
        out.push_str("    (no rows)\n");
    }
    out
}

/// The stored events of the given windows, to explain a disagreement.
fn show_events(
    events: &[RefEvent],
    windows: &BTreeSet<(Timestamp, Timestamp)>,
    q: &MeterQuery,
) -> String {
    let mut out = String::from(
        "  distinct events in those windows (seq, time, in [from, to), subject, method, region, value):\n",
    );
    let in_windows = |e: &&RefEvent| {
        e.kind == EVENT_TYPE
            && windows
                .iter()
                .any(|(start, end)| e.time >= *start && e.time < *end)
    };
    for (shown, e) in events.iter().filter(in_windows).enumerate() {
        if shown == 60 {
            out.push_str("    ...\n");
            break;
        }
        let _ = writeln!(
            out,
            "    #{} {} {} {} {:?} {:?} {}",
            e.seq,
            e.time,
            q.from <= e.time && e.time < q.to,
            e.subject,
            e.method,
            e.region,
            e.value
                .as_ref()
                .map_or("<absent>".to_owned(), Value::to_string)
        );
    }
    out
}

/// Queries (through `tally_ledger::exact`, so bounds of any precision are
/// answered exactly), waiting while the meter is still being built.
async fn query_ready(
    ledger: &EmbeddedLedger,
    meter: &str,
    q: &MeterQuery,
) -> Result<QueryResult, LedgerError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Whole minutes go to `Ledger::query` as they are.
        match tally_ledger::exact::query(ledger, meter.to_owned(), q.clone()).await {
            Err(LedgerError::NotReady { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

/// Every meter's answer to every query, checked against the reference.
async fn check_queries(
    ledger: &EmbeddedLedger,
    reference: &Reference,
    meters: &[(String, Agg)],
    queries: &[MeterQuery],
    stage: &str,
) -> Result<Vec<Vec<Row>>, String> {
    let mut answers = Vec::new();
    for (qi, q) in queries.iter().enumerate() {
        for (meter, agg) in meters {
            let result = query_ready(ledger, meter, q).await.map_err(|e| {
                format!(
                    "[{stage}] query #{qi} of {meter}: {e:?}\n  query: {}",
                    describe(q)
                )
            })?;
            if result.next_cursor.is_some() {
                return Err(format!(
                    "[{stage}] query #{qi} of {meter}: unexpected next_cursor without a limit"
                ));
            }
            let got = ledger_rows(&result);
            let want = reference_rows(&reference.events, *agg, q);
            if got != want {
                let only_ledger: Vec<Row> =
                    got.iter().filter(|r| !want.contains(r)).cloned().collect();
                let only_reference: Vec<Row> =
                    want.iter().filter(|r| !got.contains(r)).cloned().collect();
                let windows: BTreeSet<(Timestamp, Timestamp)> = only_ledger
                    .iter()
                    .chain(&only_reference)
                    .map(|r| (r.0, r.1))
                    .collect();
                return Err(format!(
                    "[{stage}] meter {meter} ({}) disagrees with the reference\n  query #{qi}: {}\n  ledger ({} rows):\n{}  reference ({} rows):\n{}  only in ledger:\n{}  only in reference:\n{}{}",
                    agg.yaml(),
                    describe(q),
                    got.len(),
                    show_rows(&got),
                    want.len(),
                    show_rows(&want),
                    show_rows(&only_ledger),
                    show_rows(&only_reference),
                    show_events(&reference.events, &windows, q),
                ));
            }
            answers.push(got);
        }
    }
    Ok(answers)
}

/// `list_events` returns exactly the distinct events, newest (highest seq) first.
async fn check_list_events(
    ledger: &EmbeddedLedger,
    reference: &Reference,
    stage: &str,
) -> Result<(), String> {
    let page = ledger
        .list_events(EventFilter {
            limit: 10_000,
            ..EventFilter::default()
        })
        .await
        .map_err(|e| format!("[{stage}] list_events: {e:?}"))?;
    if page.next_cursor.is_some() {
        return Err(format!("[{stage}] list_events: unexpected next_cursor"));
    }
    let got: Vec<(String, String, String, Timestamp, Option<Value>)> = page
        .items
        .iter()
        .map(|s| {
            let e = &s.event;
            (
                e.source.clone(),
                e.id.clone(),
                e.subject.clone(),
                e.time,
                e.data.as_ref().and_then(|d| d.get("value").cloned()),
            )
        })
        .collect();
    let want: Vec<(String, String, String, Timestamp, Option<Value>)> = reference
        .events
        .iter()
        .rev()
        .map(|e| {
            (
                e.source.clone(),
                e.id.clone(),
                e.subject.clone(),
                e.time,
                e.value.clone(),
            )
        })
        .collect();
    if got != want {
        let mut msg = format!(
            "[{stage}] list_events returned {} events, the reference has {} distinct ones (newest first)\n",
            got.len(),
            want.len()
        );
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            if g != w {
                let _ = writeln!(
                    msg,
                    "  first difference at #{i}:\n    ledger:    {g:?}\n    reference: {w:?}"
                );
                break;
            }
        }
        return Err(msg);
    }
    let seqs: Vec<u64> = page.items.iter().map(|s| s.seq).collect();
    if seqs.windows(2).any(|w| w[0] <= w[1]) {
        return Err(format!(
            "[{stage}] list_events: seqs not strictly decreasing: {seqs:?}"
        ));
    }
    Ok(())
}

fn parse_batch(batch: &[(Value, RefEvent)]) -> Vec<CloudEvent> {
    let received = ts("2026-11-20T00:00:00Z");
    batch
        .iter()
        .map(|(raw, _)| {
            tally_model::parse_event(raw.clone(), received)
                .unwrap_or_else(|e| panic!("{raw}: {e:?}"))
        })
        .collect()
}

/// Sends one batch and checks the outcome against the reference.
async fn ingest_checked(
    ledger: &EmbeddedLedger,
    reference: &mut Reference,
    batch: &[(Value, RefEvent)],
    meters_at_ingest: &[(String, Agg)],
    stage: &str,
) -> Result<(), String> {
    let outcome = ledger
        .ingest(parse_batch(batch))
        .await
        .map_err(|e| format!("[{stage}] ingest of {} events: {e:?}", batch.len()))?;
    let (want, want_notices) = reference.ingest(batch, meters_at_ingest);
    let mut got_notices: Vec<Notice> = outcome
        .quarantined
        .iter()
        .map(|n| (n.index, n.id.clone(), n.meter.clone(), n.reason.clone()))
        .collect();
    got_notices.sort();
    if (outcome.accepted, outcome.duplicates) != (want.accepted, want.duplicates)
        || got_notices != want_notices
    {
        return Err(format!(
            "[{stage}] ingest outcome differs: ledger accepted={} duplicates={}, reference accepted={} duplicates={}\n  ledger notices: {got_notices:?}\n  reference notices: {want_notices:?}",
            outcome.accepted, outcome.duplicates, want.accepted, want.duplicates
        ));
    }
    Ok(())
}

/// Re-sends every event of every batch at once: all duplicates, nothing changes.
async fn reingest_all(
    ledger: &EmbeddedLedger,
    batches: &[Vec<(Value, RefEvent)>],
    stage: &str,
) -> Result<(), String> {
    let all: Vec<(Value, RefEvent)> = batches.iter().flatten().cloned().collect();
    let outcome = ledger
        .ingest(parse_batch(&all))
        .await
        .map_err(|e| format!("[{stage}] re-ingest: {e:?}"))?;
    if outcome.accepted != 0
        || outcome.duplicates != all.len() as u64
        || !outcome.quarantined.is_empty()
    {
        return Err(format!(
            "[{stage}] re-ingest of {} events: accepted={} duplicates={} quarantined={}, expected 0/{}/0",
            all.len(),
            outcome.accepted,
            outcome.duplicates,
            outcome.quarantined.len(),
            all.len()
        ));
    }
    Ok(())
}

fn config(dir: &std::path::Path) -> StoreConfig {
    let century = SignedDuration::from_hours(100 * 365 * 24);
    let mut config = StoreConfig::new(dir);
    config.max_lateness = century;
    config.dedupe_horizon = century;
    config
}

async fn apply_meters(ledger: &EmbeddedLedger, meters: &[(String, Agg)]) -> Result<(), String> {
    for (name, agg) in meters {
        ledger
            .apply(meter_manifest(name, *agg), ApplyMode::Upsert)
            .await
            .map_err(|e| format!("applying {name}: {e:?}"))?;
    }
    Ok(())
}

fn early_meters() -> Vec<(String, Agg)> {
    Agg::ALL.iter().map(|a| (a.early(), *a)).collect()
}

fn late_meters() -> Vec<(String, Agg)> {
    Agg::ALL.iter().map(|a| (a.late(), *a)).collect()
}

// ---- the property -------------------------------------------------------------------

fn run_case(case: &Case) -> Result<(), String> {
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let prepared = prepare(case, "e");
    let queries: Vec<MeterQuery> = case.queries.iter().map(meter_query).collect();
    let result = rt.block_on(async {
        let ledger = EmbeddedLedger::open(config(dir.path())).map_err(|e| format!("open: {e}"))?;
        let early = early_meters();
        let late: Vec<(String, Agg)> = [Agg::Latest, case.late]
            .iter()
            .map(|a| (a.late(), *a))
            .collect();
        apply_meters(&ledger, &early).await?;

        let mut reference = Reference::default();
        for (i, batch) in prepared.batches.iter().enumerate() {
            ingest_checked(
                &ledger,
                &mut reference,
                batch,
                &early,
                &format!("batch {i}"),
            )
            .await?;
        }
        // Built from the log in the background.
        apply_meters(&ledger, &late).await?;

        let all_meters: Vec<(String, Agg)> = early.iter().chain(&late).cloned().collect();
        check_list_events(&ledger, &reference, "after ingest").await?;
        let before =
            check_queries(&ledger, &reference, &all_meters, &queries, "after ingest").await?;

        reingest_all(&ledger, &prepared.batches, "re-ingest").await?;
        let after = check_queries(
            &ledger,
            &reference,
            &all_meters,
            &queries,
            "after re-ingest",
        )
        .await?;
        if before != after {
            return Err("answers changed after re-ingesting duplicates".to_owned());
        }
        check_list_events(&ledger, &reference, "after re-ingest").await?;

        // Voiding: the answers become the reference's without those events,
        // now and after a restart.
        let mut remaining = reference.clone();
        let mut voided: Vec<(String, String)> = case
            .voids
            .iter()
            .filter(|_| !reference.events.is_empty())
            .map(|i| {
                let e = &reference.events[i.index(reference.events.len())];
                (e.source.clone(), e.id.clone())
            })
            .collect();
        voided.sort();
        voided.dedup();
        for (source, id) in &voided {
            let request = VoidRequest {
                source: source.clone(),
                id: id.clone(),
                reason: "test".into(),
                voided_by: "proptest".into(),
            };
            let first = ledger
                .void(request.clone())
                .await
                .map_err(|e| format!("void: {e}"))?;
            let again = ledger
                .void(request)
                .await
                .map_err(|e| format!("void: {e}"))?;
            if first.already_voided || !again.already_voided || first.record != again.record {
                return Err(format!("voiding twice: {first:?} then {again:?}"));
            }
        }
        remaining
            .events
            .retain(|e| !voided.contains(&(e.source.clone(), e.id.clone())));
        let voided_answers =
            check_queries(&ledger, &remaining, &all_meters, &queries, "after voids").await?;
        let listed = ledger
            .list_voids(1000, None)
            .await
            .map_err(|e| format!("list voids: {e}"))?;
        if listed.items.len() != voided.len() {
            return Err(format!(
                "{} voids listed, {} made",
                listed.items.len(),
                voided.len()
            ));
        }
        drop(ledger);
        let ledger = reopen(dir.path());
        let restarted = check_queries(
            &ledger,
            &remaining,
            &all_meters,
            &queries,
            "voids after restart",
        )
        .await?;
        if restarted != voided_answers {
            return Err("answers changed across a restart after voids".to_owned());
        }
        drop(ledger);
        Ok(())
    });
    drop(rt);
    result
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        // Keep the test to this one file: no proptest-regressions directory.
        failure_persistence: None,
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    })]

    #[test]
    fn embedded_ledger_matches_the_reference(case in case_strategy(1..300, 10)) {
        if let Err(message) = run_case(&case) {
            return Err(TestCaseError::fail(message));
        }
    }
}

// ---- restart --------------------------------------------------------------------------

/// Opens the store, retrying while the previous instance still holds it.
fn reopen(dir: &std::path::Path) -> EmbeddedLedger {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match EmbeddedLedger::open(config(dir)) {
            Ok(ledger) => return ledger,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("re-opening the store: {e}"),
        }
    }
}

/// A fixed, reproducible case.
fn fixed_case(events: std::ops::Range<usize>) -> Case {
    let mut runner = TestRunner::deterministic();
    case_strategy(events, 12)
        .new_tree(&mut runner)
        .unwrap()
        .current()
}

#[test]
fn answers_and_dedupe_survive_a_restart() {
    let case = fixed_case(200..260);
    let later = fixed_case(30..60);
    let prepared = prepare(&case, "e");
    // Events first sent after the restart: new ids, plus the old ones again.
    let mut more = prepare(&later, "post-");
    more.batches.push(
        prepared
            .batches
            .iter()
            .flatten()
            .take(20)
            .cloned()
            .collect(),
    );
    let queries: Vec<MeterQuery> = case.queries.iter().map(meter_query).collect();
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let early = early_meters();
    let late = late_meters();
    let all_meters: Vec<(String, Agg)> = early.iter().chain(&late).cloned().collect();
    let mut reference = Reference::default();

    let ledger = EmbeddedLedger::open(config(dir.path())).unwrap();
    let before = rt.block_on(async {
        apply_meters(&ledger, &early).await?;
        for (i, batch) in prepared.batches.iter().enumerate() {
            ingest_checked(
                &ledger,
                &mut reference,
                batch,
                &early,
                &format!("batch {i}"),
            )
            .await?;
        }
        let answers =
            check_queries(&ledger, &reference, &early, &queries, "before restart").await?;
        // Dropped right away: their backfill may be cut short by the restart.
        apply_meters(&ledger, &late).await?;
        Ok::<_, String>(answers)
    });
    let before = before.unwrap_or_else(|e| panic!("{e}"));
    drop(ledger);

    let ledger = reopen(dir.path());
    let result = rt.block_on(async {
        let answers = check_queries(&ledger, &reference, &early, &queries, "after restart").await?;
        if answers != before {
            return Err("answers changed across the restart".to_owned());
        }
        check_queries(
            &ledger,
            &reference,
            &late,
            &queries,
            "late meters after restart",
        )
        .await?;
        check_list_events(&ledger, &reference, "after restart").await?;
        reingest_all(&ledger, &prepared.batches, "re-ingest after restart").await?;
        // New events get sequence numbers after the recovered ones (LATEST
        // ties depend on it); the re-sent old ones are duplicates.
        for (i, batch) in more.batches.iter().enumerate() {
            ingest_checked(
                &ledger,
                &mut reference,
                batch,
                &all_meters,
                &format!("post-restart batch {i}"),
            )
            .await?;
        }
        check_queries(
            &ledger,
            &reference,
            &all_meters,
            &queries,
            "after post-restart ingest",
        )
        .await?;
        check_list_events(&ledger, &reference, "after post-restart ingest").await?;
        Ok(())
    });
    result.unwrap_or_else(|e| panic!("{e}"));
    drop(ledger);

    // And once more, with everything built.
    let ledger = reopen(dir.path());
    let result = rt.block_on(async {
        check_queries(
            &ledger,
            &reference,
            &all_meters,
            &queries,
            "after second restart",
        )
        .await?;
        reingest_all(&ledger, &prepared.batches, "re-ingest after second restart").await?;
        reingest_all(&ledger, &more.batches, "re-ingest after second restart").await?;
        check_list_events(&ledger, &reference, "after second restart").await?;
        Ok::<_, String>(())
    });
    result.unwrap_or_else(|e| panic!("{e}"));
    drop(ledger);
}
