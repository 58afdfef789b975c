//! OTLP logs as `tally collect --otlp` reads them on `POST /v1/logs`
//! (`decode_logs_request`: protobuf or JSON), and the access-log lines it
//! spools for them (`access_log_lines`, `record_line`), which the file
//! inputs' parser then reads.

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, KeyValue, KeyValueList, any_value,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use proptest::prelude::*;
use proptest::sample::select;
use prost::Message as _;
use serde_json::Value;
use tally_collect::agent::{LogsEncoding, access_log_lines, decode_logs_request, record_line};
use tally_collect::parse_access_line;
use tally_collect::record::parse_start_time;
use tally_fuzz::{Input, fuzz, inputs, json, replay};

const TARGET: &str = "otlp_logs";

fn check(bytes: &[u8]) -> Result<(), String> {
    for encoding in [LogsEncoding::Protobuf, LogsEncoding::Json] {
        match decode_logs_request(encoding, bytes) {
            Ok(request) => check_lines(&request)?,
            Err(e) if e.is_empty() => return Err("refused without a reason".into()),
            Err(_) => {}
        }
    }
    Ok(())
}

/// One spool line per record with access-log fields, each a JSON object on
/// one line, `start_time` taken from the record's time when not given.
fn check_lines(request: &ExportLogsServiceRequest) -> Result<(), String> {
    let records: Vec<&LogRecord> = request
        .resource_logs
        .iter()
        .flat_map(|r| &r.scope_logs)
        .flat_map(|s| &s.log_records)
        .collect();
    let (text, rejected) = access_log_lines(request);
    let lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
    let (last, lines) = lines.split_last().ok_or("no text at all")?;
    if !last.is_empty() || lines.len() as i64 + rejected != records.len() as i64 {
        return Err(format!(
            "{} records gave {} lines and {rejected} rejections",
            records.len(),
            lines.len()
        ));
    }
    let made: Vec<(&LogRecord, String)> = records
        .iter()
        .filter_map(|r| record_line(r).map(|line| (*r, line)))
        .collect();
    for (line, (record, made)) in lines.iter().zip(&made) {
        if *line != made.as_bytes() {
            return Err(format!("spooled {line:?}, record_line says {made:?}"));
        }
        check_line(record, line)?;
    }
    Ok(())
}

fn check_line(record: &LogRecord, line: &[u8]) -> Result<(), String> {
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(line) else {
        return Err(format!("{line:?} is not a JSON object"));
    };
    let untimed = LogRecord {
        time_unix_nano: 0,
        observed_time_unix_nano: 0,
        ..record.clone()
    };
    let given = record_line(&untimed)
        .and_then(|l| serde_json::from_str::<Value>(&l).ok())
        .is_some_and(|v| v.get("start_time").is_some());
    let parsed = parse_access_line(line);
    if given || !fields.contains_key("start_time") || parsed.is_err() {
        return Ok(());
    }
    let nanos = match record.time_unix_nano {
        0 => record.observed_time_unix_nano,
        t => t,
    };
    let expected = i64::try_from(nanos / 1_000_000).unwrap_or(i64::MAX);
    let start = parsed
        .ok()
        .and_then(|r| r.start_time.map(|s| s.into_owned()));
    match parse_start_time(start.as_deref()) {
        Ok(millis) if millis == expected => Ok(()),
        other => Err(format!(
            "start_time {start:?} reads {other:?}, not {expected} ms"
        )),
    }
}

const KEYS: &[&str] = &[
    "start_time",
    "route_name",
    "bytes_received",
    "bytes_sent",
    "duration",
    "downstream_wire_bytes_sent",
    "access_log_type",
    "x-request-id",
    "connection_id",
    "project_name",
    "other",
];

fn any_value(depth: u32) -> BoxedStrategy<AnyValue> {
    let leaf = prop_oneof![
        3 => json::string().prop_map(any_value::Value::StringValue),
        1 => json::timestamp().prop_map(any_value::Value::StringValue),
        1 => any::<bool>().prop_map(any_value::Value::BoolValue),
        2 => any::<i64>().prop_map(any_value::Value::IntValue),
        1 => any::<f64>().prop_map(any_value::Value::DoubleValue),
        1 => proptest::collection::vec(any::<u8>(), 0..4).prop_map(any_value::Value::BytesValue),
    ];
    leaf.prop_map(|v| AnyValue { value: Some(v) })
        .prop_recursive(depth, 12, 3, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..3)
                    .prop_map(|values| any_value::Value::ArrayValue(ArrayValue { values })),
                proptest::collection::vec((select(KEYS), inner), 0..3).prop_map(|kvs| {
                    any_value::Value::KvlistValue(KeyValueList {
                        values: key_values(kvs),
                    })
                }),
            ]
            .prop_map(|v| AnyValue { value: Some(v) })
        })
        .boxed()
}

fn key_values(kvs: Vec<(&str, AnyValue)>) -> Vec<KeyValue> {
    kvs.into_iter()
        .map(|(key, value)| KeyValue {
            key: key.to_owned(),
            value: Some(value),
            ..Default::default()
        })
        .collect()
}

fn record() -> BoxedStrategy<LogRecord> {
    let body = prop_oneof![
        2 => any_value(2),
        1 => json::value(2).prop_map(|v| AnyValue {
            value: Some(any_value::Value::StringValue(v.to_string())),
        }),
    ];
    (
        proptest::collection::vec((select(KEYS), any_value(1)), 0..5),
        proptest::option::of(body),
        any::<u64>(),
        any::<u64>(),
        0u8..4,
    )
        .prop_map(|(attributes, body, time, observed, zeros)| LogRecord {
            attributes: key_values(attributes),
            body,
            time_unix_nano: if zeros & 1 == 0 { time } else { 0 },
            observed_time_unix_nano: if zeros & 2 == 0 { observed } else { 0 },
            ..Default::default()
        })
        .boxed()
}

fn request() -> BoxedStrategy<Input> {
    let scope = proptest::collection::vec(record(), 0..4).prop_map(|log_records| ScopeLogs {
        log_records,
        ..Default::default()
    });
    let resource = proptest::collection::vec(scope, 0..3).prop_map(|scope_logs| ResourceLogs {
        scope_logs,
        ..Default::default()
    });
    (proptest::collection::vec(resource, 0..3), any::<bool>())
        .prop_map(|(resource_logs, as_json)| {
            let request = ExportLogsServiceRequest { resource_logs };
            Input(if as_json {
                serde_json::to_vec(&request).unwrap_or_default()
            } else {
                request.encode_to_vec()
            })
        })
        .boxed()
}

#[test]
fn fuzz_otlp_logs() {
    fuzz(TARGET, || inputs(TARGET, request()), |input| check(input));
}

#[test]
fn corpus_otlp_logs() {
    replay(TARGET, check);
}
