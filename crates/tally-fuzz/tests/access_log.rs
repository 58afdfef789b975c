//! Envoy Gateway JSON access-log lines as `tally collect` reads them from
//! files and its OTLP spool: `Aggregator::push_line` (parsing, start times,
//! route attribution, per-window sums), and the usage events it emits,
//! which the ledger must accept.
//!
//! Inputs with a periodic record (`access_log_type` other than a plain
//! request) whose `duration` exceeds [`MAX_PERIODIC_MILLIS`] are skipped:
//! the aggregator spreads a periodic record's time over every window it
//! spans, one bucket each, so its work and memory grow with the duration
//! (`"duration": 1e12` is 16 million one-minute windows).

use proptest::prelude::*;
use proptest::sample::select;
use serde_json::Value;
use tally_collect::record::{RecordKind, StartTimeParser, parse_start_time};
use tally_collect::{
    AgentIdentity, Aggregator, EnrichmentIndex, Meter, WindowConfig, WindowUsage,
    parse_access_line, parse_route_name, usage_event,
};
use tally_fuzz::{Input, fuzz, inputs, json, replay};

const TARGET: &str = "access_log";

/// Longer periodic durations are skipped (see the module documentation).
const MAX_PERIODIC_MILLIS: u64 = 86_400_000;

/// Sums of the request lines the aggregator took.
#[derive(Debug, Default, PartialEq, Eq)]
struct Sums {
    requests: u128,
    ingress: u128,
    egress: u128,
}

fn check(bytes: &[u8]) -> Result<(), String> {
    let lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    if lines.iter().any(|line| spans_too_long(line)) {
        return Ok(());
    }
    // The agent's path, line by line.
    let mut aggregator = Aggregator::new(WindowConfig::default());
    let mut emitted = Vec::new();
    for line in &lines {
        aggregator.push_line(line, &mut emitted);
    }
    aggregator.flush(&mut emitted);
    let (expected, exact) = expected_sums(&lines, &emitted)?;
    if exact && sums(&emitted) != expected {
        return Err(format!(
            "emitted {:?}, the lines taken sum to {expected:?}",
            sums(&emitted)
        ));
    }
    check_start_times(&lines)?;
    check_events(&emitted)
}

fn spans_too_long(line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    parse_access_line(line).is_ok_and(|record| {
        record.kind() != RecordKind::Request
            && record.duration.0.is_some_and(|d| d > MAX_PERIODIC_MILLIS)
    })
}

/// What a second aggregator, fed the parsed records one by one, takes
/// (it must emit what the first did); `exact` is false when periodic
/// records were taken (they add differences of cumulative counters).
fn expected_sums(lines: &[&[u8]], emitted: &[WindowUsage]) -> Result<(Sums, bool), String> {
    let mut aggregator = Aggregator::new(WindowConfig::default());
    let mut out = Vec::new();
    let mut sums = Sums::default();
    let mut exact = true;
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Ok(record) = parse_access_line(line) else {
            continue;
        };
        if aggregator.push_record(&record, &mut out).is_err() {
            continue;
        }
        if record.kind() == RecordKind::Request {
            sums.requests += 1;
            sums.ingress += u128::from(record.ingress_bytes());
            sums.egress += u128::from(record.egress_bytes());
        } else {
            exact = false;
        }
    }
    aggregator.flush(&mut out);
    if out != emitted {
        return Err(format!(
            "push_line and push_record disagree: {emitted:?} vs {out:?}"
        ));
    }
    Ok((sums, exact))
}

fn sums(emitted: &[WindowUsage]) -> Sums {
    let mut sums = Sums::default();
    for usage in emitted {
        match usage.meter {
            Meter::Requests => sums.requests += usage.value,
            Meter::IngressBytes => sums.ingress += usage.value,
            Meter::EgressBytes => sums.egress += usage.value,
            Meter::ConnectionSeconds => {}
        }
    }
    sums
}

/// The fast start-time parser agrees with the plain one, line after line;
/// route names parse into parts that spell the name again.
fn check_start_times(lines: &[&[u8]]) -> Result<(), String> {
    let mut fast = StartTimeParser::default();
    for line in lines {
        let Ok(record) = parse_access_line(line) else {
            continue;
        };
        let text = record.start_time.as_deref();
        let (a, b) = (fast.parse(text), parse_start_time(text));
        if a != b {
            return Err(format!("start_time {text:?}: fast {a:?}, plain {b:?}"));
        }
        if let Some(route) = record.route().and_then(parse_route_name) {
            let prefix = format!("httproute/{}/{}/rule/", route.namespace, route.name);
            if !record.route().is_some_and(|r| r.starts_with(&prefix)) {
                return Err(format!("{route:?} does not spell {:?}", record.route()));
            }
        }
    }
    Ok(())
}

/// Every usage event the agent would ship is one the ledger accepts.
fn check_events(emitted: &[WindowUsage]) -> Result<(), String> {
    let agent = AgentIdentity {
        agent_id: "node-a".into(),
        source: "tally-collect/node-a".into(),
    };
    let index = EnrichmentIndex::default();
    for usage in emitted {
        let event = usage_event(&agent, usage, &index);
        let value = serde_json::to_value(&event).map_err(|e| e.to_string())?;
        match tally_model::parse_event(value, jiff::Timestamp::UNIX_EPOCH) {
            Ok(parsed) if parsed == event => {}
            other => return Err(format!("{usage:?} makes {event:?}, read back as {other:?}")),
        }
    }
    Ok(())
}

const ROUTES: &[&str] = &[
    "httproute/shop/api/rule/0",
    "httproute/shop/api/rule/1/match/0/api.example.com",
    "httproute/shop/chat/rule/0/match/2/*.example.com",
    "httproute/a/b/rule/4294967296",
    "httproute//b/rule/0",
    "httproute/a/b/rule/0/match/x/h",
    "tcproute/shop/db/rule/0",
    "-",
    "",
];
const TYPES: &[&str] = &[
    "NotSet",
    "DownstreamPeriodic",
    "DownstreamEnd",
    "TcpPeriodic",
    "TcpConnectionEnd",
    "DownstreamStart",
    "UpstreamPoolReady",
    "-",
];

/// An Envoy-like number: a JSON number, a numeric string, `-` or null.
fn envoy_number() -> BoxedStrategy<Value> {
    let odd = &[
        "-",
        "",
        " 12 ",
        "18446744073709551615",
        "18446744073709551616",
        "-1",
        "1e3",
    ][..];
    prop_oneof![
        3 => (0u64..100_000).prop_map(Value::from),
        1 => json::number(),
        1 => (0u64..100_000).prop_map(|n| Value::String(n.to_string())),
        1 => select(odd).prop_map(|s| Value::String(s.to_owned())),
        1 => Just(Value::Null),
    ]
    .boxed()
}

fn line() -> BoxedStrategy<Value> {
    let minute = select(
        &[
            "2024-05-01T12:00:",
            "2024-05-01T12:01:",
            "2024-05-01T11:59:",
        ][..],
    );
    let start = prop_oneof![
        4 => (minute, 0u32..61, 0u32..1000)
            .prop_map(|(m, s, ms)| Value::String(format!("{m}{s:02}.{ms:03}Z"))),
        1 => json::timestamp().prop_map(Value::String),
        1 => json::value(1),
    ];
    json::object(vec![
        ("start_time", start.boxed()),
        ("route_name", json::mostly(ROUTES)),
        ("bytes_received", envoy_number()),
        ("bytes_sent", envoy_number()),
        ("downstream_wire_bytes_received", envoy_number()),
        ("downstream_wire_bytes_sent", envoy_number()),
        ("duration", envoy_number()),
        ("access_log_type", json::mostly(TYPES)),
        ("x-request-id", json::mostly(&["r-1", "r-2", "-"])),
        ("connection_id", envoy_number()),
        ("project_name", json::mostly(&["acme", "-", ""])),
        (":authority", json::mostly(&["api.example.com"])),
    ])
}

fn lines() -> BoxedStrategy<Input> {
    (
        proptest::collection::vec(line(), 1..8),
        select(&["\n", "\r\n"][..]),
    )
        .prop_map(|(lines, sep)| {
            let text: Vec<String> = lines.iter().map(Value::to_string).collect();
            Input(text.join(sep).into_bytes())
        })
        .boxed()
}

#[test]
fn fuzz_access_log() {
    fuzz(TARGET, || inputs(TARGET, lines()), |input| check(input));
}

#[test]
fn corpus_access_log() {
    replay(TARGET, check);
}
