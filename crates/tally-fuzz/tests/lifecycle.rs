//! Connection lifecycle CloudEvents as `tally collect --connections` reads
//! them on `POST /v1/connections`: the body split by its media type, each
//! event validated (`LifecycleRecord::from_value`, `check_time` against the
//! agent's clock), spooled as a JSON line and applied once per
//! (`source`, `id`) (`LifecycleApplier::push_line`).

use std::collections::BTreeSet;

use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Value, json};
use tally_collect::lifecycle::{CONNECTION_CLOSED, CONNECTION_OPENED, LifecycleRecord};
use tally_collect::{Aggregator, LifecycleApplier, WindowConfig};
use tally_fuzz::{Input, fuzz, inputs, json as arb, replay};
use tally_model::{error_code, split_batch};

const TARGET: &str = "lifecycle";
const MEDIA_TYPES: [&str; 4] = [
    "application/cloudevents+json",
    "application/cloudevents-batch+json",
    "application/json",
    "application/x-ndjson",
];
const CODES: [&str; 7] = [
    error_code::MISSING_REQUIRED_FIELD,
    error_code::INVALID_VALUE_TYPE,
    error_code::INVALID_VALUE,
    error_code::INVALID_DATACONTENTTYPE,
    error_code::VALUE_TOO_LONG,
    error_code::TOO_LATE,
    error_code::TIME_IN_FUTURE,
];
/// The agent's clock in these cases: 2024-05-01T12:00:00Z.
const NOW_MILLIS: i64 = 1_714_564_800_000;
/// The default deduplication horizon, one day.
const HORIZON_MILLIS: i64 = 86_400_000;

fn check(media_type: &str, body: &[u8]) -> Result<(), String> {
    let Ok(values) = split_batch(media_type, body) else {
        return Ok(());
    };
    let mut records = Vec::new();
    for value in values {
        match LifecycleRecord::from_value(value) {
            Ok(record) => {
                check_record(&record)?;
                if record.check_time(NOW_MILLIS, HORIZON_MILLIS).is_ok() {
                    records.push(record);
                }
            }
            Err(errors) if errors.is_empty() => return Err("refused without a reason".into()),
            Err(errors) => {
                if let Some(e) = errors
                    .iter()
                    .find(|e| e.reason.is_empty() || !CODES.contains(&e.code.as_str()))
                {
                    return Err(format!("a refusal without a known code or a reason: {e:?}"));
                }
            }
        }
    }
    apply(&records)
}

/// A record reads back from its spool line, and is an aggregator event
/// exactly when it names its route (or is a close).
fn check_record(record: &LifecycleRecord) -> Result<(), String> {
    let line = serde_json::to_vec(record).map_err(|e| e.to_string())?;
    match serde_json::from_slice::<LifecycleRecord>(&line) {
        Ok(again) if again == *record => {}
        other => return Err(format!("{record:?} reads back as {other:?}")),
    }
    let is_open = record.change == tally_collect::lifecycle::Change::Opened;
    if record.connection_event().is_ok() != (!is_open || record.route().is_ok()) {
        return Err(format!("{record:?}: connection_event and route disagree"));
    }
    Ok(())
}

/// Applies the spool lines twice: the second time changes nothing.
fn apply(records: &[LifecycleRecord]) -> Result<(), String> {
    let mut aggregator = Aggregator::new(WindowConfig::default());
    let mut applier = LifecycleApplier::new(HORIZON_MILLIS, []);
    let mut out = Vec::new();
    aggregator.advance_to(NOW_MILLIS - HORIZON_MILLIS, &mut out);
    let lines: Vec<Vec<u8>> = records
        .iter()
        .map(|r| serde_json::to_vec(r).unwrap_or_default())
        .collect();
    for line in &lines {
        applier.push_line(&mut aggregator, line, &mut out);
    }
    let remembered = applier.remembered();
    let keys: BTreeSet<String> = records.iter().map(LifecycleRecord::dedupe_key).collect();
    if remembered > keys.len() {
        return Err(format!(
            "{remembered} pairs remembered of {} keys",
            keys.len()
        ));
    }
    let _ = applier.take_changes();
    for line in &lines {
        applier.push_line(&mut aggregator, line, &mut out);
    }
    if applier.remembered() != remembered || !applier.take_changes().is_empty() {
        return Err("applying the same lines again changed what is remembered".into());
    }
    aggregator.flush(&mut out);
    Ok(())
}

fn event() -> BoxedStrategy<Value> {
    let routes = &[
        "httproute/shop/chat/rule/0/match/0/chat.example.com",
        "httproute/shop/chat/rule/0",
        "httproute//x/rule/0",
        "-",
    ][..];
    let connection_id = prop_oneof![
        3 => select(&["edge-1/4711", "edge-1/4712", "-", ""][..]).prop_map(|s| json!(s)),
        1 => arb::number(),
        1 => arb::value(1),
    ];
    let data = arb::object(vec![
        ("connection_id", connection_id.boxed()),
        ("route_name", arb::mostly(routes)),
        ("httproute_namespace", arb::mostly(&["shop", "other"])),
        ("httproute_name", arb::mostly(&["chat"])),
        ("project_name", arb::mostly(&["shop", "acme"])),
    ]);
    let minute = select(
        &[
            "2024-05-01T11:59:",
            "2024-05-01T12:00:",
            "2024-04-30T11:00:",
        ][..],
    );
    let time = prop_oneof![
        3 => (minute, 0u32..60).prop_map(|(m, s)| json!(format!("{m}{s:02}.250Z"))),
        1 => arb::timestamp().prop_map(Value::String),
        1 => arb::value(1),
    ];
    arb::object(vec![
        ("specversion", arb::mostly(&["1.0"])),
        ("id", arb::mostly(&["01J0ZB7Q6S9X", "01J0ZB7Q6S9Y"])),
        ("source", arb::mostly(&["gateway-controller/edge-1"])),
        (
            "type",
            arb::mostly(&[CONNECTION_OPENED, CONNECTION_CLOSED, "other"]),
        ),
        ("subject", arb::mostly(&["projects/shop"])),
        ("time", time.boxed()),
        ("data", data),
    ])
}

fn body() -> BoxedStrategy<Input> {
    proptest::collection::vec(event(), 0..6)
        .prop_map(|events| Input(serde_json::to_vec(&Value::Array(events)).unwrap_or_default()))
        .boxed()
}

#[test]
fn fuzz_lifecycle() {
    let case = || (select(&MEDIA_TYPES[..]), inputs(TARGET, body()));
    fuzz(TARGET, case, |(media_type, body)| check(media_type, body));
}

#[test]
fn corpus_lifecycle() {
    replay(TARGET, |body| {
        MEDIA_TYPES
            .iter()
            .try_for_each(|media_type| check(media_type, body))
    });
}
