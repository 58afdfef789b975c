//! Prometheus remote-write 1.0: a snappy-compressed protobuf `WriteRequest`
//! (`prometheus/prompb` `remote.proto` and `types.proto`), turned into an
//! OTLP metrics request so it flows through the same exporters.
//!
//! - Identity labels ([`crate::selector::IDENTITY_LABELS`]) become resource
//!   attributes (`service_name` as `service.name`), one resource per
//!   identity; every other label but `__name__` becomes a data point
//!   attribute.
//! - A series is a counter (a cumulative monotonic sum) when the request's
//!   metadata says its family is a counter, or has no type for it and the
//!   name ends in `_total`; the `_bucket`, `_count` and `_sum` series of
//!   histograms and summaries are counters too. Everything else is a gauge.
//! - Stale markers (the special NaN Prometheus writes when a series
//!   disappears) carry no value and are skipped; native histograms are not
//!   supported and are counted as rejected.

use std::collections::{BTreeMap, HashMap};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    metric::Data, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message as _;

use crate::otlp::string_attribute;
use crate::selector::{IDENTITY_LABELS, METRIC_NAME_LABEL};

/// The instrumentation scope of converted series.
pub const SCOPE_NAME: &str = "tally/prometheus-remote-write";

/// The bit pattern of Prometheus' stale marker.
const STALE_NAN: u64 = 0x7ff0_0000_0000_0002;

/// `prometheus.WriteRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WriteRequest {
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
    #[prost(message, repeated, tag = "3")]
    pub metadata: Vec<MetricMetadata>,
}

/// `prometheus.TimeSeries`. Exemplars are not read; native histograms
/// (field 4) are kept opaque, only to be counted.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TimeSeries {
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
    #[prost(bytes = "vec", repeated, tag = "4")]
    pub histograms: Vec<Vec<u8>>,
}

/// `prometheus.Label`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Label {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `prometheus.Sample`: a value at a time in milliseconds since the epoch.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    #[prost(double, tag = "1")]
    pub value: f64,
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

/// `prometheus.MetricMetadata`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MetricMetadata {
    /// `MetricType`: 0 unknown, 1 counter, 2 gauge, 3 histogram, 4 gauge
    /// histogram, 5 summary, 6 info, 7 stateset.
    #[prost(int32, tag = "1")]
    pub r#type: i32,
    #[prost(string, tag = "2")]
    pub metric_family_name: String,
    #[prost(string, tag = "4")]
    pub help: String,
    #[prost(string, tag = "5")]
    pub unit: String,
}

const COUNTER: i32 = 1;
const HISTOGRAM: i32 = 3;
const SUMMARY: i32 = 5;

/// Why a remote-write body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RemoteWriteError {
    #[error("snappy body: {0}")]
    Snappy(#[from] snap::Error),
    #[error("the decompressed body would be {len} bytes, more than the limit of {limit}")]
    TooLarge { len: usize, limit: usize },
    #[error("remote-write protobuf body: {0}")]
    Protobuf(#[from] prost::DecodeError),
}

/// A converted request and what could not be converted.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Converted {
    pub request: ExportMetricsServiceRequest,
    /// Series in the write request.
    pub series: u64,
    /// Samples converted into data points.
    pub samples: u64,
    /// Stale markers skipped.
    pub stale: u64,
    /// Native histogram samples refused (not supported).
    pub rejected_histograms: u64,
}

/// Decompresses (snappy block format) and decodes a remote-write body.
pub fn decode_write_request(
    body: &[u8],
    max_decoded_len: usize,
) -> Result<WriteRequest, RemoteWriteError> {
    let len = snap::raw::decompress_len(body)?;
    if len > max_decoded_len {
        return Err(RemoteWriteError::TooLarge {
            len,
            limit: max_decoded_len,
        });
    }
    let raw = snap::raw::Decoder::new().decompress_vec(body)?;
    Ok(WriteRequest::decode(&raw[..])?)
}

/// Whether a series is a counter, from its name and the families' types.
fn is_counter(name: &str, types: &HashMap<&str, i32>) -> bool {
    if let Some(t) = types.get(name) {
        return *t == COUNTER;
    }
    for suffix in ["_total", "_bucket", "_count", "_sum"] {
        if let Some(family) = name.strip_suffix(suffix) {
            return match types.get(family) {
                Some(&t) => matches!(t, COUNTER | HISTOGRAM | SUMMARY),
                // Without metadata, only the counter convention is trusted.
                None => suffix == "_total",
            };
        }
    }
    false
}

/// Converts a write request into an OTLP metrics request.
pub fn to_otlp(write: &WriteRequest) -> Converted {
    let types: HashMap<&str, i32> = write
        .metadata
        .iter()
        .map(|m| (m.metric_family_name.as_str(), m.r#type))
        .collect();
    let units: HashMap<&str, &str> = write
        .metadata
        .iter()
        .map(|m| (m.metric_family_name.as_str(), m.unit.as_str()))
        .collect();
    let mut converted = Converted {
        series: write.timeseries.len() as u64,
        ..Converted::default()
    };
    // Resource identity → (metric name, counter?) → points.
    type Metrics = BTreeMap<(String, bool), Vec<NumberDataPoint>>;
    let mut resources: BTreeMap<Vec<(usize, String)>, Metrics> = BTreeMap::new();
    for series in &write.timeseries {
        converted.rejected_histograms += series.histograms.len() as u64;
        let mut name = "";
        let mut identity = Vec::new();
        let mut attributes = Vec::new();
        for label in &series.labels {
            if label.name == METRIC_NAME_LABEL {
                name = &label.value;
            } else if let Some(i) = IDENTITY_LABELS.iter().position(|l| *l == label.name) {
                identity.push((i, label.value.clone()));
            } else {
                attributes.push(string_attribute(&label.name, &label.value));
            }
        }
        identity.sort();
        let counter = is_counter(name, &types);
        let points = resources
            .entry(identity)
            .or_default()
            .entry((name.to_owned(), counter))
            .or_default();
        for sample in &series.samples {
            if sample.value.to_bits() == STALE_NAN {
                converted.stale += 1;
                continue;
            }
            converted.samples += 1;
            points.push(NumberDataPoint {
                attributes: attributes.clone(),
                time_unix_nano: u64::try_from(sample.timestamp)
                    .unwrap_or(0)
                    .saturating_mul(1_000_000),
                value: Some(number_data_point::Value::AsDouble(sample.value)),
                ..Default::default()
            });
        }
    }
    for (identity, metrics) in resources {
        let attributes = identity
            .iter()
            .map(|(i, value)| {
                let key = match IDENTITY_LABELS[*i] {
                    "service_name" => "service.name",
                    other => other,
                };
                string_attribute(key, value)
            })
            .collect();
        let metrics: Vec<Metric> = metrics
            .into_iter()
            .filter(|(_, points)| !points.is_empty())
            .map(|((name, counter), data_points)| {
                let family = ["_total", "_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(&name);
                let unit = units
                    .get(name.as_str())
                    .or_else(|| units.get(family))
                    .copied()
                    .unwrap_or_default()
                    .to_owned();
                let data = if counter {
                    Data::Sum(Sum {
                        data_points,
                        aggregation_temporality: AggregationTemporality::Cumulative as i32,
                        is_monotonic: true,
                    })
                } else {
                    Data::Gauge(Gauge { data_points })
                };
                Metric {
                    name,
                    unit,
                    data: Some(data),
                    ..Default::default()
                }
            })
            .collect();
        if metrics.is_empty() {
            continue;
        }
        converted.request.resource_metrics.push(ResourceMetrics {
            resource: Some(Resource {
                attributes,
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: SCOPE_NAME.to_owned(),
                    ..Default::default()
                }),
                metrics,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        });
    }
    converted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(labels: &[(&str, &str)], samples: &[(f64, i64)]) -> TimeSeries {
        TimeSeries {
            labels: labels
                .iter()
                .map(|(n, v)| Label {
                    name: (*n).into(),
                    value: (*v).into(),
                })
                .collect(),
            samples: samples
                .iter()
                .map(|(value, timestamp)| Sample {
                    value: *value,
                    timestamp: *timestamp,
                })
                .collect(),
            histograms: vec![],
        }
    }

    #[test]
    fn converts_counters_gauges_and_identity() {
        let write = WriteRequest {
            timeseries: vec![
                series(
                    &[
                        ("__name__", "requests_total"),
                        ("namespace", "ns-a"),
                        ("service_name", "gw"),
                        ("code", "200"),
                    ],
                    &[(5.0, 1000), (7.0, 2000)],
                ),
                series(
                    &[
                        ("__name__", "temperature"),
                        ("namespace", "ns-a"),
                        ("service_name", "gw"),
                    ],
                    &[(21.5, 1000), (f64::from_bits(STALE_NAN), 2000)],
                ),
                series(
                    &[
                        ("__name__", "latency_bucket"),
                        ("namespace", "ns-b"),
                        ("le", "0.5"),
                    ],
                    &[(3.0, 1000)],
                ),
            ],
            metadata: vec![MetricMetadata {
                r#type: HISTOGRAM,
                metric_family_name: "latency".into(),
                help: String::new(),
                unit: "seconds".into(),
            }],
        };
        let c = to_otlp(&write);
        assert_eq!((c.series, c.samples, c.stale), (3, 4, 1));
        let rms = &c.request.resource_metrics;
        assert_eq!(rms.len(), 2);
        let a = &rms[0];
        let attrs = &a.resource.as_ref().unwrap().attributes;
        assert_eq!(attrs[0], string_attribute("namespace", "ns-a"));
        assert_eq!(attrs[1], string_attribute("service.name", "gw"));
        let metrics = &a.scope_metrics[0].metrics;
        let requests = metrics.iter().find(|m| m.name == "requests_total").unwrap();
        let Some(Data::Sum(sum)) = &requests.data else {
            panic!("a counter")
        };
        assert!(sum.is_monotonic);
        assert_eq!(sum.data_points.len(), 2);
        assert_eq!(sum.data_points[1].time_unix_nano, 2_000_000_000);
        assert_eq!(
            sum.data_points[0].attributes,
            vec![string_attribute("code", "200")]
        );
        let temperature = metrics.iter().find(|m| m.name == "temperature").unwrap();
        assert!(matches!(&temperature.data, Some(Data::Gauge(g)) if g.data_points.len() == 1));
        let bucket = &rms[1].scope_metrics[0].metrics[0];
        assert!(matches!(bucket.data, Some(Data::Sum(_))));
        assert_eq!(bucket.unit, "seconds");
    }

    #[test]
    fn decodes_snappy_bodies_with_a_limit() {
        let write = WriteRequest {
            timeseries: vec![series(&[("__name__", "up")], &[(1.0, 1)])],
            metadata: vec![],
        };
        let body = snap::raw::Encoder::new()
            .compress_vec(&write.encode_to_vec())
            .unwrap();
        assert_eq!(decode_write_request(&body, 1 << 20).unwrap(), write);
        assert!(matches!(
            decode_write_request(&body, 3),
            Err(RemoteWriteError::TooLarge { .. })
        ));
        assert!(decode_write_request(b"not snappy at all", 1 << 20).is_err());
    }
}
