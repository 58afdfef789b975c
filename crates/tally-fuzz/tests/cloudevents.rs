//! CloudEvents requests as `POST /api/v1/events`, the usage contract and
//! the agent's `/v1/connections` read them once decompressed: the media
//! type of a `Content-Type` (`media_type`), the body split by it
//! (`split_batch`), and every value validated (`parse_event`).

use jiff::Timestamp;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::Value;
use tally_fuzz::{Input, fuzz, inputs, json, replay};
use tally_model::{BatchError, error_code, media_type, parse_event, split_batch};

const TARGET: &str = "cloudevents";

const SINGLE: &str = "application/cloudevents+json";
const BATCH: &str = "application/cloudevents-batch+json";
const JSON: &str = "application/json";
const NDJSON: &str = "application/x-ndjson";
const ACCEPTED: [&str; 5] = [SINGLE, BATCH, JSON, NDJSON, "application/jsonl"];

const CODES: [&str; 8] = [
    error_code::INVALID_ULID,
    error_code::MISSING_REQUIRED_FIELD,
    error_code::INVALID_VALUE_TYPE,
    error_code::INVALID_DATACONTENTTYPE,
    error_code::INVALID_VALUE,
    error_code::VALUE_TOO_LONG,
    error_code::TOO_LATE,
    error_code::TIME_IN_FUTURE,
];

fn received() -> Timestamp {
    Timestamp::from_second(1_767_225_600).unwrap_or_default()
}

/// What the receivers do with a request once decompressed.
fn check(content_type: &str, body: &[u8]) -> Result<(), String> {
    let media = media_type(content_type);
    if media_type(&media) != media || media.contains(';') || media != media.to_ascii_lowercase() {
        return Err(format!(
            "media_type({content_type:?}) = {media:?} is not normal"
        ));
    }
    let values = match split_batch(&media, body) {
        Ok(values) => values,
        Err(e) => return check_refusal(&media, &e),
    };
    if !ACCEPTED.contains(&media.as_str()) {
        return Err(format!("{media:?} is not accepted, yet the body was split"));
    }
    check_split(&media, body, &values)?;
    values.into_iter().try_for_each(check_event)
}

fn check_refusal(media: &str, error: &BatchError) -> Result<(), String> {
    let accepted = ACCEPTED.contains(&media);
    match error {
        BatchError::Malformed(m) if accepted && !m.is_empty() => Ok(()),
        BatchError::UnsupportedMediaType(m) if !accepted && !m.is_empty() => Ok(()),
        other => Err(format!("{media:?}: wrong refusal {other:?}")),
    }
}

/// The media types agree with each other, and what was split splits the
/// same once written out again.
fn check_split(media: &str, body: &[u8], values: &[Value]) -> Result<(), String> {
    match media {
        SINGLE if values.len() != 1 || !values[0].is_object() => {
            return Err(format!("{SINGLE} gave {values:?}"));
        }
        SINGLE | BATCH if split_batch(JSON, body).as_deref() != Ok(values) => {
            return Err(format!("{JSON} splits the body otherwise than {media}"));
        }
        _ => {}
    }
    let lines: Vec<u8> = values
        .iter()
        .flat_map(|v| {
            let mut line = serde_json::to_vec(v).unwrap_or_default();
            line.extend_from_slice(b"\r\n\n");
            line
        })
        .collect();
    let again = split_batch(NDJSON, &lines).map_err(|e| format!("re-split as NDJSON: {e}"))?;
    let same = again.len() == values.len()
        && again.iter().zip(values).all(|(a, v)| {
            // Floats may come back an ulp off (serde_json's fast parser).
            json_shape(a) == json_shape(v) && (has_float(v) || a == v)
        });
    if !same {
        return Err(format!(
            "re-split as NDJSON gives {again:?}, not {values:?}"
        ));
    }
    Ok(())
}

fn json_shape(v: &Value) -> String {
    match v {
        Value::Array(items) => format!("[{}]", items.iter().map(json_shape).collect::<String>()),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("{k:?}:{}", json_shape(v)))
                .collect::<String>()
        ),
        other => tally_model::event::json_type(other).to_owned(),
    }
}

fn has_float(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.is_f64(),
        Value::Array(items) => items.iter().any(has_float),
        Value::Object(map) => map.values().any(has_float),
        _ => false,
    }
}

/// An accepted event has its required attributes and reads the same again
/// from its stored form; a refused one says why, with known codes.
fn check_event(value: Value) -> Result<(), String> {
    let had_time = value.get("time").is_some_and(|t| !t.is_null());
    match parse_event(value, received()) {
        Ok(event) => {
            let required = [&event.id, &event.source, &event.kind, &event.subject];
            if event.specversion != "1.0" || required.iter().any(|s| s.is_empty()) {
                return Err(format!("accepted without its attributes: {event:?}"));
            }
            if !had_time && event.time != received() {
                return Err(format!("no time, yet not the receipt time: {event:?}"));
            }
            let stored = serde_json::to_value(&event).map_err(|e| e.to_string())?;
            match parse_event(stored, received()) {
                Ok(again) if again == event => Ok(()),
                other => Err(format!("{event:?} reads back as {other:?}")),
            }
        }
        Err(errors) if errors.is_empty() => Err("refused without a reason".into()),
        Err(errors) => errors
            .iter()
            .find(|e| !CODES.contains(&e.code.as_str()) || e.reason.is_empty())
            .map_or(Ok(()), |e| {
                Err(format!("a refusal without code or reason: {e:?}"))
            }),
    }
}

fn event() -> BoxedStrategy<Value> {
    use json::{mostly, object, timestamp, value};
    object(vec![
        ("specversion", mostly(&["1.0"])),
        ("id", mostly(&["e-1", "01J0ZB7Q6S9XABCDEFGHJKMNPQ"])),
        ("source", mostly(&["billing-test", "tally-collect/node-a"])),
        ("type", mostly(&["prompt", "gateway.requests"])),
        ("subject", mostly(&["acme", "projects/shop"])),
        ("time", timestamp().prop_map(Value::String).boxed()),
        (
            "datacontenttype",
            mostly(&[
                "application/json",
                "application/cloudevents+json",
                "text/plain",
            ]),
        ),
        ("dataschema", mostly(&["https://example.com/schema"])),
        ("data", value(4)),
        ("data_base64", mostly(&["aGVsbG8="])),
        ("tallyext1", value(1)),
        ("Bad-Ext", value(1)),
    ])
}

fn body() -> BoxedStrategy<Input> {
    let to_vec = |v: &Value| serde_json::to_vec(v).unwrap_or_default();
    prop_oneof![
        event().prop_map(move |e| Input(to_vec(&e))),
        proptest::collection::vec(event(), 0..5)
            .prop_map(move |events| Input(to_vec(&Value::Array(events)))),
        (
            proptest::collection::vec(event(), 0..5),
            select(&["\n", "\r\n", "\n\n  \n"][..])
        )
            .prop_map(move |(events, sep)| {
                let lines: Vec<String> = events
                    .iter()
                    .map(|e| String::from_utf8_lossy(&to_vec(e)).into_owned())
                    .collect();
                Input(lines.join(sep).into_bytes())
            }),
    ]
    .boxed()
}

fn content_type() -> BoxedStrategy<String> {
    let params = select(&["", "; charset=utf-8", " ;q=1", "  ", ";"][..]);
    prop_oneof![
        4 => (select(&ACCEPTED[..]), params, any::<bool>()).prop_map(|(m, p, upper)| {
            let m = if upper { m.to_ascii_uppercase() } else { m.to_owned() };
            format!("{m}{p}")
        }),
        1 => select(&["", "text/plain", "application/cloudevents+yaml", ";", "application/json\0"][..])
            .prop_map(str::to_owned),
        1 => json::string(),
    ]
    .boxed()
}

#[test]
fn fuzz_cloudevents() {
    fuzz(
        TARGET,
        || (content_type(), inputs(TARGET, body())),
        |(ct, body)| check(ct, body),
    );
}

#[test]
fn corpus_cloudevents() {
    replay(TARGET, |body| {
        ACCEPTED.iter().try_for_each(|media| check(media, body))
    });
}
