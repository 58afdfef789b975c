//! Prometheus remote-write 1.0 as `POST /api/v1/write` reads it: a
//! snappy-compressed protobuf `WriteRequest` (`decode_write_request`),
//! converted to OTLP for the exporters (`to_otlp`).

use proptest::prelude::*;
use proptest::sample::select;
use prost::Message as _;
use tally_fuzz::{Input, fuzz, inputs, replay};
use tally_telemetry::otlp::{data_point_count, decode_metrics_request, encode_metrics_request};
use tally_telemetry::remote_write::{
    Label, MetricMetadata, Sample, TimeSeries, WriteRequest, decode_write_request, to_otlp,
};
use tally_telemetry::{Compression, Encoding};

const TARGET: &str = "remote_write";
const LIMIT: usize = 1 << 20;

/// Whether a case's bytes are the body as sent, or the protobuf the test
/// compresses first (so mutations hit what is inside).
#[derive(Debug, Clone, Copy)]
enum Framing {
    Wire,
    CompressFirst,
}

fn snappy(bytes: &[u8]) -> Vec<u8> {
    snap::raw::Encoder::new()
        .compress_vec(bytes)
        .unwrap_or_default()
}

fn check(framing: Framing, bytes: &[u8]) -> Result<(), String> {
    let body = match framing {
        Framing::Wire => bytes.to_vec(),
        Framing::CompressFirst => snappy(bytes),
    };
    let write = match decode_write_request(&body, LIMIT) {
        Ok(write) => write,
        Err(e) if e.to_string().is_empty() => return Err("refused without a reason".into()),
        Err(_) => return Ok(()),
    };
    let encoded = write.encode_to_vec();
    let again = decode_write_request(&snappy(&encoded), usize::MAX)
        .map_err(|e| format!("re-encoded request does not decode: {e}"))?;
    if again.encode_to_vec() != encoded {
        return Err("the request changed through snappy and protobuf".into());
    }
    check_conversion(&write)
}

/// Every sample is converted or counted as stale; histograms are counted;
/// the result is a request the exporters can encode and decode.
fn check_conversion(write: &WriteRequest) -> Result<(), String> {
    let converted = to_otlp(write);
    let samples: u64 = write
        .timeseries
        .iter()
        .map(|s| s.samples.len() as u64)
        .sum();
    let histograms: u64 = write
        .timeseries
        .iter()
        .map(|s| s.histograms.len() as u64)
        .sum();
    if converted.series != write.timeseries.len() as u64
        || converted.samples + converted.stale != samples
        || converted.rejected_histograms != histograms
        || data_point_count(&converted.request) as u64 != converted.samples
    {
        return Err(format!(
            "counts disagree: {samples} samples, {histograms} histograms, converted {converted:?}"
        ));
    }
    let encoded = encode_metrics_request(&converted.request, Encoding::Protobuf, Compression::None)
        .map_err(|e| e.to_string())?;
    decode_metrics_request(&encoded.body, Encoding::Protobuf, None, usize::MAX)
        .map(|_| ())
        .map_err(|e| format!("the converted request does not decode: {e}"))
}

const NAMES: &[&str] = &[
    "__name__",
    "__name__",
    "namespace",
    "project",
    "service_name",
    "resource_kind",
    "le",
    "quantile",
    "code",
    "",
    "é",
];
const VALUES: &[&str] = &[
    "http_requests_total",
    "rpc_duration_seconds_bucket",
    "rpc_duration_seconds_count",
    "rpc_duration_seconds_sum",
    "up",
    "ns-a",
    "p1",
    "+Inf",
    "0.5",
    "",
    "_total",
];

fn write_request() -> BoxedStrategy<WriteRequest> {
    let label = (select(NAMES), select(VALUES)).prop_map(|(name, value)| Label {
        name: name.to_owned(),
        value: value.to_owned(),
    });
    let value = prop_oneof![
        4 => any::<f64>(),
        1 => Just(f64::from_bits(0x7ff0_0000_0000_0002)),
        1 => select(&[f64::NAN, f64::INFINITY, -0.0, f64::MAX][..]),
    ];
    let sample = (value, any::<i64>()).prop_map(|(value, timestamp)| Sample { value, timestamp });
    let series = (
        proptest::collection::vec(label, 0..5),
        proptest::collection::vec(sample, 0..4),
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..6), 0..2),
    )
        .prop_map(|(labels, samples, histograms)| TimeSeries {
            labels,
            samples,
            histograms,
        });
    let metadata = (
        any::<i32>(),
        0i32..8,
        select(VALUES),
        select(&["", "seconds", "By"][..]),
    )
        .prop_map(|(raw, small, family, unit)| MetricMetadata {
            r#type: if raw % 4 == 0 { raw } else { small },
            metric_family_name: family.trim_end_matches("_total").to_owned(),
            help: String::new(),
            unit: unit.to_owned(),
        });
    (
        proptest::collection::vec(series, 0..5),
        proptest::collection::vec(metadata, 0..3),
    )
        .prop_map(|(timeseries, metadata)| WriteRequest {
            timeseries,
            metadata,
        })
        .boxed()
}

fn case() -> BoxedStrategy<(Framing, Input)> {
    let shaped = write_request()
        .prop_map(|w| Input(w.encode_to_vec()))
        .boxed();
    prop_oneof![
        1 => inputs(TARGET, shaped.clone()).prop_map(|i| (Framing::Wire, i)),
        2 => inputs(TARGET, shaped).prop_map(|i| (Framing::CompressFirst, i)),
    ]
    .boxed()
}

#[test]
fn fuzz_remote_write() {
    fuzz(TARGET, case, |(framing, input)| check(*framing, input));
}

#[test]
fn corpus_remote_write() {
    replay(TARGET, |bytes| {
        check(Framing::Wire, bytes)?;
        check(Framing::CompressFirst, bytes)
    });
}
