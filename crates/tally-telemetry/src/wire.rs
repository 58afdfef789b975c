//! Writes selections of a borrowed OTLP metrics request straight to the
//! protobuf wire form of an `ExportMetricsServiceRequest`, so routing to many
//! exporters never clones the request.
//!
//! A length-delimited message needs its length before its bytes. Data points
//! are encoded once into a scratch buffer; every level above them (metric,
//! scope, resource) has its length computed from the children's bytes and is
//! copied up. What is selected whole (a resource, a metric) is encoded once
//! per request however many exporters take it, then copied.

use std::collections::HashMap;
use std::ops::Range;

use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1::{Metric, ResourceMetrics, metric::Data};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use crate::otlp::data_point_count_of;

/// Field numbers of the OTLP metrics protos.
const REQUEST_RESOURCE_METRICS: u32 = 1;
const RESOURCE_METRICS_RESOURCE: u32 = 1;
const RESOURCE_METRICS_SCOPE_METRICS: u32 = 2;
const RESOURCE_METRICS_SCHEMA_URL: u32 = 3;
const SCOPE_METRICS_SCOPE: u32 = 1;
const SCOPE_METRICS_METRICS: u32 = 2;
const SCOPE_METRICS_SCHEMA_URL: u32 = 3;
const METRIC_NAME: u32 = 1;
const METRIC_DESCRIPTION: u32 = 2;
const METRIC_UNIT: u32 = 3;
const METRIC_GAUGE: u32 = 5;
const METRIC_SUM: u32 = 7;
const METRIC_HISTOGRAM: u32 = 9;
const METRIC_EXPONENTIAL_HISTOGRAM: u32 = 10;
const METRIC_SUMMARY: u32 = 11;
const METRIC_METADATA: u32 = 12;
const DATA_POINTS: u32 = 1;
const DATA_TEMPORALITY: u32 = 2;
const SUM_IS_MONOTONIC: u32 = 3;

/// What an exporter takes of one metric.
pub(crate) enum MetricSelection<K> {
    /// Nothing.
    None,
    /// Every data point.
    All,
    /// The data points whose attributes pass the filter.
    Points(K),
}

/// Encodings of one resource's parts shared by every exporter that selects
/// them. [`ResourceCache::reset`] before moving to the next resource.
#[derive(Default)]
pub(crate) struct ResourceCache {
    /// The whole resource as a request field, and its data points.
    whole: Option<(Vec<u8>, u64)>,
    /// Whole metrics (as `ScopeMetrics.metrics` fields) by (scope, metric)
    /// position: their range in `metric_bytes` and their data points.
    metrics: HashMap<(usize, usize), (Range<usize>, u64)>,
    metric_bytes: Vec<u8>,
    scratch: Scratch,
}

#[derive(Default)]
struct Scratch {
    points: Vec<u8>,
    extra: Vec<u8>,
    scope: Vec<u8>,
    resource: Vec<u8>,
}

impl ResourceCache {
    /// Forgets the previous resource (keeping the buffers' capacity).
    pub(crate) fn reset(&mut self) {
        self.whole = None;
        self.metrics.clear();
        self.metric_bytes.clear();
    }

    /// Appends all of `rm` to `out`; the data points appended.
    pub(crate) fn whole(&mut self, rm: &ResourceMetrics, out: &mut Vec<u8>) -> u64 {
        let (bytes, points) = self.whole.get_or_insert_with(|| {
            // `message::encode` would compute the (nested) length twice.
            let len = rm.encoded_len();
            let mut bytes = Vec::with_capacity(len + 8);
            length_delimited(REQUEST_RESOURCE_METRICS, len, &mut bytes);
            rm.encode_raw(&mut bytes);
            let points = rm
                .scope_metrics
                .iter()
                .flat_map(|sm| &sm.metrics)
                .filter_map(|m| m.data.as_ref())
                .map(|d| data_point_count_of(d) as u64)
                .sum();
            (bytes, points)
        });
        out.extend_from_slice(bytes);
        *points
    }

    /// Appends what `select` keeps of `rm`'s metrics to `out` (nothing if it
    /// keeps nothing); the data points appended.
    pub(crate) fn selected<K: Fn(&[KeyValue]) -> bool>(
        &mut self,
        rm: &ResourceMetrics,
        out: &mut Vec<u8>,
        mut select: impl FnMut(&Metric) -> MetricSelection<K>,
    ) -> u64 {
        let ResourceCache {
            metrics: cached,
            metric_bytes,
            scratch,
            ..
        } = self;
        let mut points = 0;
        scratch.resource.clear();
        for (s, sm) in rm.scope_metrics.iter().enumerate() {
            scratch.scope.clear();
            for (m, metric) in sm.metrics.iter().enumerate() {
                match select(metric) {
                    MetricSelection::None => {}
                    MetricSelection::All => {
                        let (range, n) = cached.entry((s, m)).or_insert_with(|| {
                            let start = metric_bytes.len();
                            prost::encoding::message::encode(
                                SCOPE_METRICS_METRICS,
                                metric,
                                metric_bytes,
                            );
                            let n = metric.data.as_ref().map_or(0, data_point_count_of) as u64;
                            (start..metric_bytes.len(), n)
                        });
                        scratch
                            .scope
                            .extend_from_slice(&metric_bytes[range.clone()]);
                        points += *n;
                    }
                    MetricSelection::Points(keep) => {
                        points += filtered_metric(metric, &keep, scratch);
                    }
                }
            }
            if scratch.scope.is_empty() {
                continue;
            }
            let scope_len = sm.scope.as_ref().map_or(0, |scope| {
                prost::encoding::message::encoded_len(SCOPE_METRICS_SCOPE, scope)
            });
            let body = scope_len
                + scratch.scope.len()
                + string_len(SCOPE_METRICS_SCHEMA_URL, &sm.schema_url);
            let into = &mut scratch.resource;
            length_delimited(RESOURCE_METRICS_SCOPE_METRICS, body, into);
            if let Some(scope) = &sm.scope {
                prost::encoding::message::encode(SCOPE_METRICS_SCOPE, scope, into);
            }
            into.extend_from_slice(&scratch.scope);
            string(SCOPE_METRICS_SCHEMA_URL, &sm.schema_url, into);
        }
        if scratch.resource.is_empty() {
            return 0;
        }
        let resource_len = rm.resource.as_ref().map_or(0, |resource| {
            prost::encoding::message::encoded_len(RESOURCE_METRICS_RESOURCE, resource)
        });
        let body = resource_len
            + scratch.resource.len()
            + string_len(RESOURCE_METRICS_SCHEMA_URL, &rm.schema_url);
        length_delimited(REQUEST_RESOURCE_METRICS, body, out);
        if let Some(resource) = &rm.resource {
            prost::encoding::message::encode(RESOURCE_METRICS_RESOURCE, resource, out);
        }
        out.extend_from_slice(&scratch.resource);
        string(RESOURCE_METRICS_SCHEMA_URL, &rm.schema_url, out);
        points
    }
}

/// Appends `metric` with only the data points `keep` accepts to
/// `scratch.scope` (nothing if it accepts none); the data points appended.
fn filtered_metric(
    metric: &Metric,
    keep: &impl Fn(&[KeyValue]) -> bool,
    scratch: &mut Scratch,
) -> u64 {
    fn points<P: Message>(
        points: &[P],
        attributes: fn(&P) -> &[KeyValue],
        keep: &impl Fn(&[KeyValue]) -> bool,
        out: &mut Vec<u8>,
    ) -> u64 {
        let mut n = 0;
        for p in points.iter().filter(|p| keep(attributes(p))) {
            prost::encoding::message::encode(DATA_POINTS, p, out);
            n += 1;
        }
        n
    }
    let Scratch {
        points: pts,
        extra,
        scope: out,
        ..
    } = scratch;
    pts.clear();
    extra.clear();
    let (field, n) = match &metric.data {
        None => return 0,
        Some(Data::Gauge(g)) => (
            METRIC_GAUGE,
            points(&g.data_points, |p| &p.attributes, keep, pts),
        ),
        Some(Data::Sum(s)) => {
            enumeration(DATA_TEMPORALITY, s.aggregation_temporality, extra);
            if s.is_monotonic {
                prost::encoding::bool::encode(SUM_IS_MONOTONIC, &true, extra);
            }
            let n = points(&s.data_points, |p| &p.attributes, keep, pts);
            (METRIC_SUM, n)
        }
        Some(Data::Histogram(h)) => {
            enumeration(DATA_TEMPORALITY, h.aggregation_temporality, extra);
            let n = points(&h.data_points, |p| &p.attributes, keep, pts);
            (METRIC_HISTOGRAM, n)
        }
        Some(Data::ExponentialHistogram(h)) => {
            enumeration(DATA_TEMPORALITY, h.aggregation_temporality, extra);
            let n = points(&h.data_points, |p| &p.attributes, keep, pts);
            (METRIC_EXPONENTIAL_HISTOGRAM, n)
        }
        Some(Data::Summary(s)) => (
            METRIC_SUMMARY,
            points(&s.data_points, |p| &p.attributes, keep, pts),
        ),
    };
    if n == 0 {
        return 0;
    }
    let data_len = pts.len() + extra.len();
    let metadata_len: usize = metric
        .metadata
        .iter()
        .map(|kv| prost::encoding::message::encoded_len(METRIC_METADATA, kv))
        .sum();
    let body = string_len(METRIC_NAME, &metric.name)
        + string_len(METRIC_DESCRIPTION, &metric.description)
        + string_len(METRIC_UNIT, &metric.unit)
        + key_len(field)
        + encoded_len_varint(data_len as u64)
        + data_len
        + metadata_len;
    length_delimited(SCOPE_METRICS_METRICS, body, out);
    string(METRIC_NAME, &metric.name, out);
    string(METRIC_DESCRIPTION, &metric.description, out);
    string(METRIC_UNIT, &metric.unit, out);
    length_delimited(field, data_len, out);
    out.extend_from_slice(pts);
    out.extend_from_slice(extra);
    for kv in &metric.metadata {
        prost::encoding::message::encode(METRIC_METADATA, kv, out);
    }
    n
}

/// The key and length of a length-delimited field whose body follows.
pub(crate) fn length_delimited(field: u32, len: usize, out: &mut Vec<u8>) {
    encode_key(field, WireType::LengthDelimited, out);
    encode_varint(len as u64, out);
}

/// A proto3 string field (absent when empty).
pub(crate) fn string(field: u32, value: &str, out: &mut Vec<u8>) {
    if !value.is_empty() {
        length_delimited(field, value.len(), out);
        out.extend_from_slice(value.as_bytes());
    }
}

pub(crate) fn string_len(field: u32, value: &str) -> usize {
    if value.is_empty() {
        0
    } else {
        key_len(field) + encoded_len_varint(value.len() as u64) + value.len()
    }
}

/// A proto3 enum field (absent when zero).
fn enumeration(field: u32, value: i32, out: &mut Vec<u8>) {
    if value != 0 {
        prost::encoding::int32::encode(field, &value, out);
    }
}
