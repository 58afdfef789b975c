//! Structure-aware JSON: values with the strings, numbers and timestamps
//! parsers trip on, and objects with a target's own fields.

use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Map, Number, Value};

/// Strings that mean something to some parser, or to none.
const STRINGS: &[&str] = &[
    "",
    " ",
    "-",
    "1.0",
    "1",
    "0",
    "-1",
    "1e400",
    "NaN",
    "null",
    "true",
    "\0",
    "\u{7f}",
    "\u{1b}[31m",
    "a\nb",
    "a\r\nb",
    "\t",
    "\u{2028}",
    "\u{feff}",
    "é",
    "\u{1F600}",
    "ünïcödé",
    "projects/acme",
    "httproute/shop/api/rule/0",
    "httproute///rule/0",
    "httproute/a/b",
    "$.value",
    "$..*",
    "$[?(@.a > 1)]",
    "{",
    "\"",
    "\\",
    "%",
    "a/../b",
    "18446744073709551616",
    "-9223372036854775809",
    "123.456",
    " 42 ",
    "0x1f",
    "99999999999999999999999999999",
    "0.00000000000000000000000000001",
    "application/json",
    "application/cloudevents+json",
    "text/plain",
    "UPPER",
];

/// Timestamps in and around RFC 3339.
const TIMESTAMPS: &[&str] = &[
    "2024-05-01T12:00:01.250Z",
    "2024-05-01T12:00:01Z",
    "2024-05-01T12:00:01.123456789Z",
    "2024-05-01T12:00:01.1234567891Z",
    "2024-05-01T12:00:60Z",
    "2024-05-01T12:00:01+05:30",
    "2024-05-01T12:00:01-23:59",
    "2024-05-01t12:00:01z",
    "2024-05-01 12:00:01Z",
    "2024-02-30T00:00:00Z",
    "0000-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999Z",
    "-009999-01-01T00:00:00Z",
    "+010000-01-01T00:00:00Z",
    "1970-01-01T00:00:00Z",
    "1969-12-31T23:59:59.999Z",
    "2024-05-01T12:00:01",
    "2024-05-01",
    "2024-05-01T12:00:01.250ZZ",
    "yesterday",
];

/// One of a list of tricky strings, a timestamp, or any short string.
pub fn string() -> BoxedStrategy<String> {
    prop_oneof![
        3 => select(STRINGS).prop_map(str::to_owned),
        1 => select(TIMESTAMPS).prop_map(str::to_owned),
        2 => any::<String>().prop_map(|s| s.chars().take(24).collect()),
        1 => ("[a-z0-9/._-]{1,3}", 1usize..300).prop_map(|(s, n)| s.repeat(n)),
    ]
    .boxed()
}

/// A timestamp text, valid or nearly so.
pub fn timestamp() -> BoxedStrategy<String> {
    prop_oneof![
        3 => select(TIMESTAMPS).prop_map(str::to_owned),
        1 => (0i64..=253_402_300_799_999, 0u8..4).prop_map(|(millis, shape)| {
            let at = jiff::Timestamp::from_millisecond(millis).unwrap_or_default();
            match shape {
                0 => at.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
                1 => at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
                2 => at.strftime("%Y-%m-%dT%H:%M:%S%.9f+00:00").to_string(),
                _ => at.to_string(),
            }
        }),
    ]
    .boxed()
}

/// Numbers at the edges of `i64`, `u64` and `f64`.
pub fn number() -> BoxedStrategy<Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        select(
            &[
                0u64,
                1,
                59,
                60,
                999,
                1000,
                60_000,
                u64::MAX,
                i64::MAX as u64
            ][..]
        )
        .prop_map(Value::from),
        select(&[i64::MIN, -1, -60_000][..]).prop_map(Value::from),
        any::<f64>().prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
        select(&[0.5, -0.0, 1e308, -1e308, 5e-324, 1e28, 7.9e28, 1.5e19][..])
            .prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
    ]
    .boxed()
}

/// A JSON scalar.
pub fn scalar() -> BoxedStrategy<Value> {
    prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        3 => number(),
        4 => string().prop_map(Value::String),
    ]
    .boxed()
}

/// Any JSON value, up to about `depth` levels deep.
pub fn value(depth: u32) -> BoxedStrategy<Value> {
    scalar()
        .prop_recursive(depth, 64, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::vec((key(), inner), 0..6)
                    .prop_map(|fields| Value::Object(fields.into_iter().collect())),
            ]
        })
        .boxed()
}

fn key() -> BoxedStrategy<String> {
    prop_oneof![
        3 => "[a-z_]{1,8}",
        1 => string(),
    ]
    .boxed()
}

/// An object holding each of `fields` or not (its value drawn from its
/// strategy), plus a few arbitrary fields.
pub fn object(fields: Vec<(&'static str, BoxedStrategy<Value>)>) -> BoxedStrategy<Value> {
    let each: Vec<BoxedStrategy<Option<(&'static str, Value)>>> = fields
        .into_iter()
        .map(|(name, strategy)| {
            proptest::option::weighted(0.8, strategy.prop_map(move |v| (name, v))).boxed()
        })
        .collect();
    (each, proptest::collection::vec((key(), value(2)), 0..3))
        .prop_map(|(known, extra)| {
            let mut map = Map::new();
            for (name, v) in extra {
                map.insert(name, v);
            }
            for (name, v) in known.into_iter().flatten() {
                map.insert(name.to_owned(), v);
            }
            Value::Object(map)
        })
        .boxed()
}

/// Mostly one of `good` (as JSON strings), sometimes any value.
pub fn mostly(good: &'static [&'static str]) -> BoxedStrategy<Value> {
    prop_oneof![
        4 => select(good).prop_map(|s| Value::String(s.to_owned())),
        1 => value(2),
    ]
    .boxed()
}
