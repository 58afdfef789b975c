//! Grouping usage by billing account: random events of several projects and
//! random bindings (some established mid-minute, some retroactive, some
//! refused because they would rewrite history), checked against a naive
//! model for every window size and a zone with a DST change.

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::json;
use tally_ledger::{ApplyMode, Ledger, LedgerError, MeterQuery, ResourceStore};
use tally_meter::WindowSize;
use tally_model::{Manifest, parse_event};
use tally_store_embedded::{EmbeddedLedger, StoreConfig};

/// 2026-03-28T00:00:00Z: the span covers Europe/Berlin's spring-forward.
const BASE: i64 = 1_774_656_000;
const SPAN: i64 = 3 * 86_400;
const PROJECTS: [&str; 3] = ["p0", "p1", "p2"];

#[derive(Debug, Clone)]
struct Event {
    project: usize,
    at: i64,
    value: i64,
}

#[derive(Debug, Clone)]
struct Binding {
    project: usize,
    account: usize,
    at: i64,
}

fn meter() -> Manifest {
    Manifest::parse_documents(
        "apiVersion: billing.miloapis.com/v1alpha1\nkind: MeterDefinition\nmetadata: {name: bytes}\n\
         spec: {meterName: bytes, measurement: {aggregation: Sum, unit: By}, \
         event: {type: t, valueProperty: $.value}}\n",
    )
    .unwrap()
    .remove(0)
}

fn binding_manifest(index: usize, b: &Binding) -> Manifest {
    let at = jiff::Timestamp::from_second(BASE + b.at).unwrap();
    Manifest::parse_documents(&format!(
        "apiVersion: billing.miloapis.com/v1alpha1\nkind: BillingAccountBinding\n\
         metadata: {{name: b{index}}}\nspec: {{billingAccountRef: {{name: a{}}}, \
         projectRef: {{name: {}}}}}\nstatus: {{billingResponsibility: {{establishedAt: '{at}'}}}}\n",
        b.account, PROJECTS[b.project]
    ))
    .unwrap()
    .remove(0)
}

/// The naive model's owner: the accepted binding with the latest effective
/// start (establishedAt rounded up to a whole minute) at or before `t`
/// (seconds after `BASE`, a whole minute).
fn owner(accepted: &[(usize, Binding)], project: usize, t: i64) -> Option<String> {
    let effective = |at: i64| (at + 59).div_euclid(60) * 60;
    accepted
        .iter()
        .filter(|(_, b)| b.project == project && effective(b.at) <= t)
        .max_by_key(|(index, b)| (effective(b.at), format!("b{index}")))
        .map(|(_, b)| format!("a{}", b.account))
}

/// Whether the store should accept `b`: it must start after the project's
/// latest binding or before its first.
fn acceptable(accepted: &[(usize, Binding)], b: &Binding) -> bool {
    let effective = |at: i64| (at + 59).div_euclid(60) * 60;
    let starts: Vec<i64> = accepted
        .iter()
        .filter(|(_, o)| o.project == b.project)
        .map(|(_, o)| effective(o.at))
        .collect();
    match (starts.iter().min(), starts.iter().max()) {
        (Some(first), Some(last)) => effective(b.at) < *first || effective(b.at) > *last,
        _ => true,
    }
}

type Row = (i64, Option<String>);

async fn query(ledger: &EmbeddedLedger, size: WindowSize, zone: &str) -> BTreeMap<Row, i64> {
    let q = MeterQuery {
        from: jiff::Timestamp::from_second(BASE).unwrap(),
        to: jiff::Timestamp::from_second(BASE + SPAN).unwrap(),
        window_size: Some(size),
        time_zone: jiff::tz::TimeZone::get(zone).unwrap(),
        subjects: vec![],
        group_by: vec!["billing_account".into()],
        filter_group_by: Default::default(),
        limit: None,
        cursor: None,
    };
    for _ in 0..500 {
        match ledger.query("bytes".into(), q.clone()).await {
            Err(LedgerError::NotReady { .. }) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Ok(result) => {
                return result
                    .rows
                    .into_iter()
                    .map(|row| {
                        let account = row.group_by.get("billing_account").cloned().flatten();
                        let value: i64 = row.value.try_into().unwrap();
                        ((row.window_start.as_second(), account), value)
                    })
                    .filter(|(_, v)| *v != 0)
                    .collect();
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("the meter never became ready")
}

fn expected(
    events: &[Event],
    accepted: &[(usize, Binding)],
    size: WindowSize,
    zone: &str,
) -> BTreeMap<Row, i64> {
    let tz = jiff::tz::TimeZone::get(zone).unwrap();
    let mut out: BTreeMap<Row, i64> = BTreeMap::new();
    for e in events {
        let t = BASE + e.at;
        let local = jiff::Timestamp::from_second(t)
            .unwrap()
            .to_zoned(tz.clone());
        let start = match size {
            // Zones here have whole-hour offsets.
            WindowSize::Minute => t / 60 * 60,
            WindowSize::Hour => local
                .with()
                .minute(0)
                .second(0)
                .subsec_nanosecond(0)
                .build()
                .unwrap()
                .timestamp()
                .as_second(),
            WindowSize::Day => local.start_of_day().unwrap().timestamp().as_second(),
            WindowSize::Month => local
                .first_of_month()
                .unwrap()
                .start_of_day()
                .unwrap()
                .timestamp()
                .as_second(),
        };
        *out.entry((start, owner(accepted, e.project, e.at)))
            .or_default() += e.value;
    }
    out.retain(|_, v| *v != 0);
    out
}

fn case() -> impl Strategy<Value = (Vec<Event>, Vec<Binding>)> {
    let event = (0..PROJECTS.len(), 0..SPAN, 1..1_000i64).prop_map(|(project, at, value)| Event {
        project,
        at,
        value,
    });
    let binding =
        (0..PROJECTS.len(), 0..3usize, 0..SPAN).prop_map(|(project, account, at)| Binding {
            project,
            account,
            at,
        });
    (
        proptest::collection::vec(event, 1..60),
        proptest::collection::vec(binding, 0..6),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn usage_by_billing_account_matches_a_naive_model((events, bindings) in case()) {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let dir = tempfile::tempdir().unwrap();
            let mut config = StoreConfig::new(dir.path());
            config.max_lateness = jiff::SignedDuration::from_hours(24 * 365 * 50);
            config.dedupe_horizon = config.max_lateness;
            let ledger = EmbeddedLedger::open(config).unwrap();
            let resources = ledger.resources();
            ledger.apply(meter(), ApplyMode::Upsert).await.unwrap();
            let cloud_events = events
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let time = jiff::Timestamp::from_second(BASE + e.at).unwrap();
                    let event = json!({"specversion": "1.0", "id": i.to_string(), "source": "s",
                        "type": "t", "subject": format!("projects/{}", PROJECTS[e.project]),
                        "time": time.to_string(), "data": {"value": e.value}});
                    parse_event(event, jiff::Timestamp::now()).unwrap()
                })
                .collect();
            ledger.ingest(cloud_events).await.unwrap();
            // Bindings arrive after the usage: attribution is decided at
            // query time, so usage with no account yet is attributed later.
            let mut accepted: Vec<(usize, Binding)> = Vec::new();
            for (index, b) in bindings.iter().enumerate() {
                let answer = resources.apply(binding_manifest(index, b), ApplyMode::Upsert).await;
                let expect_ok = acceptable(&accepted, b);
                prop_assert_eq!(answer.is_ok(), expect_ok, "binding {:?}: {:?}", b, answer.err());
                if expect_ok {
                    accepted.push((index, b.clone()));
                }
            }
            for size in [WindowSize::Minute, WindowSize::Hour, WindowSize::Day, WindowSize::Month] {
                for zone in ["UTC", "Europe/Berlin"] {
                    let got = query(&ledger, size, zone).await;
                    let want = expected(&events, &accepted, size, zone);
                    prop_assert_eq!(got, want, "{:?} {}", size, zone);
                }
            }
            Ok(())
        })?;
    }
}
