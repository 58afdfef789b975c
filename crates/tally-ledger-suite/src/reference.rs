//! The semantic property test: random events (re-sent ids, missing values,
//! three subjects, two regions, times over two days) and random queries
//! (no/hour/day windows in UTC or Berlin, group by subject and region,
//! subject and region filters) against every aggregation, each answer
//! compared with a naive fold written here from the definitions.
//!
//! Cases come from proptest strategies (deterministic seed); a failing
//! case prints the case and the differing rows.

use std::collections::{BTreeMap, BTreeSet};

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use rust_decimal::Decimal;
use serde_json::json;
use tally_ledger::{ApplyMode, MeterQuery};
use tally_meter::WindowSize;

use crate::{Backend, base_time, event, meter, query_ready};

const AGGREGATIONS: [&str; 7] = [
    "SUM",
    "COUNT",
    "UNIQUE_COUNT",
    "AVG",
    "MIN",
    "MAX",
    "LATEST",
];
const SUBJECTS: [&str; 3] = ["acme", "globex", "initech"];
const REGIONS: [Option<&str>; 3] = [Some("eu"), Some("us"), None];

#[derive(Debug, Clone)]
struct GenEvent {
    id: u8,
    subject: usize,
    region: usize,
    /// Seconds after the base time (two days).
    offset: i64,
    value: Option<i64>,
}

#[derive(Debug, Clone)]
struct GenQuery {
    window: Option<WindowSize>,
    berlin: bool,
    by_subject: bool,
    by_region: bool,
    subject: Option<usize>,
    region: Option<usize>,
}

fn case() -> impl Strategy<Value = (Vec<GenEvent>, Vec<GenQuery>)> {
    let event = (
        0u8..40,
        0..SUBJECTS.len(),
        0..REGIONS.len(),
        0i64..2 * 86_400,
        prop::option::weighted(0.9, -1_000i64..1_000),
    )
        .prop_map(|(id, subject, region, offset, value)| GenEvent {
            id,
            subject,
            region,
            offset,
            value,
        });
    let window = prop_oneof![
        Just(None),
        Just(Some(WindowSize::Hour)),
        Just(Some(WindowSize::Day))
    ];
    let query = (
        window,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop::option::of(0..SUBJECTS.len()),
        prop::option::of(0..2usize),
    )
        .prop_map(
            |(window, berlin, by_subject, by_region, subject, region)| GenQuery {
                window,
                berlin,
                by_subject,
                by_region,
                subject,
                region,
            },
        );
    (
        prop::collection::vec(event, 1..60),
        prop::collection::vec(query, 1..4),
    )
}

/// A row: (window start, window end, subject, region group) → value.
type Rows = BTreeMap<(Timestamp, Timestamp, Option<String>, Option<Option<String>>), Decimal>;

/// One stored event as the model keeps it (the first copy of each id).
struct Stored {
    time: Timestamp,
    subject: &'static str,
    region: Option<&'static str>,
    value: Option<i64>,
}

fn fold(aggregation: &str, values: &[(Timestamp, i64)]) -> Decimal {
    let d = |v: i64| Decimal::from(v);
    match aggregation {
        "SUM" => values.iter().map(|(_, v)| d(*v)).sum(),
        "COUNT" => d(values.len() as i64),
        "UNIQUE_COUNT" => d(values
            .iter()
            .map(|(_, v)| *v)
            .collect::<BTreeSet<_>>()
            .len() as i64),
        "AVG" => {
            let sum: Decimal = values.iter().map(|(_, v)| d(*v)).sum();
            (sum / d(values.len() as i64)).normalize()
        }
        "MIN" => d(values.iter().map(|(_, v)| *v).min().unwrap_or(0)),
        "MAX" => d(values.iter().map(|(_, v)| *v).max().unwrap_or(0)),
        "LATEST" => d(values.iter().max_by_key(|(t, _)| *t).map_or(0, |(_, v)| *v)),
        other => panic!("no model for {other}"),
    }
}

/// The window of `t`: the hour or local day of `zone` holding it (which
/// may reach outside `[from, to)`: only usage inside counts); the whole
/// range without a window size.
fn window_of(t: Timestamp, q: &GenQuery, from: Timestamp, to: Timestamp) -> (Timestamp, Timestamp) {
    let zone = if q.berlin {
        TimeZone::get("Europe/Berlin").expect("Berlin")
    } else {
        TimeZone::UTC
    };
    let zoned = t.to_zoned(zone);
    let (start, end) = match q.window {
        None => return (from, to),
        Some(WindowSize::Hour) => {
            let s = t.as_second() - t.as_second().rem_euclid(3_600);
            let s = Timestamp::from_second(s).expect("an hour");
            (s, s + SignedDuration::from_hours(1))
        }
        Some(WindowSize::Day) => {
            let start = zoned.start_of_day().expect("a day");
            let end = start
                .tomorrow()
                .expect("a day")
                .start_of_day()
                .expect("a day");
            (start.timestamp(), end.timestamp())
        }
        Some(other) => panic!("no model for {other:?}"),
    };
    (start, end)
}

fn reference(
    stored: &[Stored],
    aggregation: &str,
    q: &GenQuery,
    from: Timestamp,
    to: Timestamp,
) -> Rows {
    let mut groups: BTreeMap<_, Vec<(Timestamp, i64)>> = BTreeMap::new();
    for e in stored {
        let value = match (aggregation, e.value) {
            ("COUNT", v) => v.unwrap_or(0),
            (_, Some(v)) => v,
            (_, None) => continue, // quarantined
        };
        if q.subject.is_some_and(|s| SUBJECTS[s] != e.subject)
            || q.region.is_some_and(|r| REGIONS[r] != e.region)
            || e.time < from
            || e.time >= to
        {
            continue;
        }
        let (start, end) = window_of(e.time, q, from, to);
        let subject = (q.by_subject || q.subject.is_some()).then(|| e.subject.to_owned());
        let region = q.by_region.then(|| e.region.map(str::to_owned));
        groups
            .entry((start, end, subject, region))
            .or_default()
            .push((e.time, value));
    }
    groups
        .into_iter()
        .map(|(k, values)| (k, fold(aggregation, &values)))
        .collect()
}

fn meter_query(q: &GenQuery, from: Timestamp, to: Timestamp) -> MeterQuery {
    let mut group_by = Vec::new();
    if q.by_subject {
        group_by.push("subject".to_owned());
    }
    if q.by_region {
        group_by.push("region".to_owned());
    }
    MeterQuery {
        from,
        to,
        window_size: q.window,
        time_zone: if q.berlin {
            TimeZone::get("Europe/Berlin").expect("Berlin")
        } else {
            TimeZone::UTC
        },
        subjects: q
            .subject
            .map(|s| vec![SUBJECTS[s].to_owned()])
            .unwrap_or_default(),
        group_by,
        filter_group_by: q
            .region
            .and_then(|r| REGIONS[r])
            .map(|r| BTreeMap::from([("region".to_owned(), r.to_owned())]))
            .unwrap_or_default(),
        limit: None,
        cursor: None,
    }
}

/// Runs `cases` generated cases: each ingests its events (in two requests)
/// under a fresh event type, applies one meter per aggregation (half of
/// them after the events: backfill) and compares every query.
pub async fn aggregations_match_the_reference(b: &dyn Backend, prefix: &str, cases: usize) {
    let mut runner = TestRunner::deterministic();
    let strategy = case();
    for n in 0..cases {
        let (events, queries) = strategy.new_tree(&mut runner).expect("a case").current();
        run_case(b, &format!("{prefix}-{n}"), &events, &queries).await;
    }
}

async fn run_case(b: &dyn Backend, prefix: &str, events: &[GenEvent], queries: &[GenQuery]) {
    let ledger = b.ledger();
    let kind = format!("{prefix}.usage");
    let base = base_time();
    let names: Vec<String> = AGGREGATIONS
        .iter()
        .map(|a| format!("{prefix}-{}", a.to_lowercase().replace('_', "")))
        .collect();
    let (early, late) = names.split_at(AGGREGATIONS.len() / 2);
    for (name, agg) in early.iter().zip(AGGREGATIONS) {
        ledger
            .apply(meter(name, &kind, agg), ApplyMode::Upsert)
            .await
            .unwrap();
    }
    let mut stored: Vec<Stored> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut cloud = Vec::new();
    for (i, e) in events.iter().enumerate() {
        // Distinct nanoseconds keep LATEST free of ties.
        let time =
            base + SignedDuration::from_secs(e.offset) + SignedDuration::from_nanos(i as i64);
        let mut data = json!({});
        if let Some(v) = e.value {
            data["value"] = json!(v);
        }
        if let Some(r) = REGIONS[e.region] {
            data["region"] = json!(r);
        }
        let subject = SUBJECTS[e.subject];
        cloud.push(event(
            "ref",
            &format!("{prefix}-{}", e.id),
            &kind,
            subject,
            time,
            data,
        ));
        if seen.insert(e.id) {
            stored.push(Stored {
                time,
                subject,
                region: REGIONS[e.region],
                value: e.value,
            });
        }
    }
    let half = cloud.len() / 2;
    let second = cloud.split_off(half);
    let mut accepted = 0;
    for batch in [cloud, second] {
        accepted += ledger.ingest(batch).await.unwrap().accepted;
        b.settle().await;
    }
    assert_eq!(accepted, stored.len() as u64);
    for (name, agg) in late.iter().zip(&AGGREGATIONS[AGGREGATIONS.len() / 2..]) {
        ledger
            .apply(meter(name, &kind, agg), ApplyMode::Upsert)
            .await
            .unwrap();
    }
    let (from, to) = (base, base + SignedDuration::from_hours(48));
    for (name, agg) in names.iter().zip(AGGREGATIONS) {
        for q in queries {
            let expected = reference(&stored, agg, q, from, to);
            let answer = query_ready(ledger, name, meter_query(q, from, to)).await;
            let got: Rows = answer
                .rows
                .iter()
                .map(|r| {
                    let region = q
                        .by_region
                        .then(|| r.group_by.get("region").cloned().flatten());
                    (
                        (r.window_start, r.window_end, r.subject.clone(), region),
                        r.value,
                    )
                })
                .collect();
            assert_eq!(got, expected, "{agg} {q:?}\nevents: {events:?}");
        }
    }
}
