//! Cumulative → delta conversion for sinks that take only delta temporality
//! (Datadog). State is kept per series: resource attributes, scope, metric
//! name and data point attributes.
//!
//! Rules, per series:
//! - Monotonic cumulative sums and cumulative histograms are converted;
//!   gauges, non-monotonic sums, exponential histograms and summaries pass
//!   unchanged.
//! - The first point of a series is a baseline and is dropped, unless its
//!   start time is at or after the converter's start (the series began while
//!   we watched), in which case its whole value is the first delta.
//! - A point not newer than the previous one is dropped (duplicate or out of order).
//! - A reset (start time changed, value or count went down, bucket layout
//!   changed, int/double switch) emits the point's whole value as the delta
//!   since its start time.
//! - Histogram deltas drop `min`/`max`, which cannot be subtracted.

use std::collections::HashMap;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, HistogramDataPoint, NumberDataPoint, metric::Data, number_data_point,
};
use prost::Message as _;

#[derive(Debug, Clone, PartialEq)]
enum Last {
    Int(i64),
    Double(f64),
    Histogram {
        count: u64,
        sum: Option<f64>,
        bounds: Vec<f64>,
        buckets: Vec<u64>,
    },
}

#[derive(Debug, Clone, PartialEq)]
struct SeriesState {
    start: u64,
    time: u64,
    last: Last,
}

/// Per-series state for converting one sink's stream to delta.
#[derive(Debug, Clone, Default)]
pub struct DeltaConverter {
    started_at_unix_nano: u64,
    series: HashMap<Vec<u8>, SeriesState>,
}

impl DeltaConverter {
    /// A converter that started watching at `started_at_unix_nano`.
    pub fn new(started_at_unix_nano: u64) -> DeltaConverter {
        DeltaConverter {
            started_at_unix_nano,
            series: HashMap::new(),
        }
    }

    /// How many series have state.
    pub fn series_count(&self) -> usize {
        self.series.len()
    }

    /// Forgets series whose last point is older than `time_unix_nano`; their
    /// next point is a new baseline.
    pub fn forget_older_than(&mut self, time_unix_nano: u64) {
        self.series.retain(|_, s| s.time >= time_unix_nano);
    }

    /// Converts a request in place; metrics, scopes and resources left without
    /// data points are removed.
    pub fn convert(&mut self, request: &mut ExportMetricsServiceRequest) {
        let mut key = Vec::new();
        for rm in &mut request.resource_metrics {
            key.clear();
            push_attributes(
                &mut key,
                rm.resource.as_ref().map_or(&[][..], |r| &r.attributes),
            );
            let resource_len = key.len();
            for sm in &mut rm.scope_metrics {
                key.truncate(resource_len);
                if let Some(scope) = &sm.scope {
                    push_str(&mut key, &scope.name);
                    push_str(&mut key, &scope.version);
                }
                let scope_len = key.len();
                for metric in &mut sm.metrics {
                    key.truncate(scope_len);
                    push_str(&mut key, &metric.name);
                    match &mut metric.data {
                        Some(Data::Sum(sum))
                            if sum.is_monotonic
                                && sum.aggregation_temporality
                                    == AggregationTemporality::Cumulative as i32 =>
                        {
                            let points = &mut sum.data_points;
                            self.convert_points(points, &mut key, |p| &p.attributes, Self::number);
                            sum.aggregation_temporality = AggregationTemporality::Delta as i32;
                        }
                        Some(Data::Histogram(h))
                            if h.aggregation_temporality
                                == AggregationTemporality::Cumulative as i32 =>
                        {
                            let points = &mut h.data_points;
                            self.convert_points(
                                points,
                                &mut key,
                                |p| &p.attributes,
                                Self::histogram,
                            );
                            h.aggregation_temporality = AggregationTemporality::Delta as i32;
                        }
                        _ => {}
                    }
                }
                sm.metrics.retain(|m| {
                    m.data
                        .as_ref()
                        .is_some_and(|d| crate::otlp::data_point_count_of(d) > 0)
                });
            }
            rm.scope_metrics.retain(|sm| !sm.metrics.is_empty());
        }
        request
            .resource_metrics
            .retain(|rm| !rm.scope_metrics.is_empty());
    }

    /// Converts the points of one metric whose key prefix is in `key`.
    fn convert_points<P>(
        &mut self,
        points: &mut Vec<P>,
        key: &mut Vec<u8>,
        attributes: fn(&P) -> &[KeyValue],
        convert: fn(&mut Self, &[u8], &mut P) -> bool,
    ) {
        let metric_len = key.len();
        points.retain_mut(|p| {
            key.truncate(metric_len);
            push_attributes(key, attributes(p));
            convert(self, key, p)
        });
        key.truncate(metric_len);
    }

    /// Updates state for one point; the point becomes its delta. `false`: drop it.
    fn step(
        &mut self,
        key: &[u8],
        start: u64,
        time: u64,
        last: Last,
        is_reset: impl FnOnce(&Last) -> bool,
    ) -> Step {
        let started_at = self.started_at_unix_nano;
        let Some(state) = self.series.get_mut(key) else {
            self.series
                .insert(key.to_vec(), SeriesState { start, time, last });
            return (start != 0 && start >= started_at).then_some((start, None));
        };
        if time <= state.time {
            return None;
        }
        let restarted = start != 0 && state.start != 0 && start != state.start;
        let step = if restarted || is_reset(&state.last) {
            (if start != 0 { start } else { state.time }, None)
        } else {
            let previous = std::mem::replace(&mut state.last, Last::Int(0));
            (state.time, Some(previous))
        };
        *state = SeriesState { start, time, last };
        Some(step)
    }

    fn number(&mut self, key: &[u8], p: &mut NumberDataPoint) -> bool {
        let last = match p.value {
            Some(number_data_point::Value::AsInt(v)) => Last::Int(v),
            Some(number_data_point::Value::AsDouble(v)) => Last::Double(v),
            None => return false,
        };
        let current = last.clone();
        let step = self.step(
            key,
            p.start_time_unix_nano,
            p.time_unix_nano,
            last,
            |prev| match (prev, &current) {
                (Last::Int(a), Last::Int(b)) => b < a,
                (Last::Double(a), Last::Double(b)) => b < a,
                _ => true,
            },
        );
        let Some((start, previous)) = step else {
            return false;
        };
        p.start_time_unix_nano = start;
        p.value = match (previous, p.value) {
            (Some(Last::Int(a)), Some(number_data_point::Value::AsInt(b))) => {
                Some(number_data_point::Value::AsInt(b.wrapping_sub(a)))
            }
            (Some(Last::Double(a)), Some(number_data_point::Value::AsDouble(b))) => {
                Some(number_data_point::Value::AsDouble(b - a))
            }
            (_, value) => value,
        };
        true
    }

    fn histogram(&mut self, key: &[u8], p: &mut HistogramDataPoint) -> bool {
        let last = Last::Histogram {
            count: p.count,
            sum: p.sum,
            bounds: p.explicit_bounds.clone(),
            buckets: p.bucket_counts.clone(),
        };
        let (count, bounds, buckets) = (p.count, &p.explicit_bounds, &p.bucket_counts);
        let step = self.step(
            key,
            p.start_time_unix_nano,
            p.time_unix_nano,
            last,
            |prev| {
                let Last::Histogram {
                    count: c0,
                    bounds: b0,
                    buckets: k0,
                    ..
                } = prev
                else {
                    return true;
                };
                count < *c0
                    || b0 != bounds
                    || k0.len() != buckets.len()
                    || k0.iter().zip(buckets).any(|(a, b)| b < a)
            },
        );
        let Some((start, previous)) = step else {
            return false;
        };
        p.start_time_unix_nano = start;
        if let Some(Last::Histogram {
            count,
            sum,
            buckets,
            ..
        }) = previous
        {
            p.count -= count;
            p.sum = match (p.sum, sum) {
                (Some(now), Some(before)) => Some(now - before),
                _ => None,
            };
            for (b, before) in p.bucket_counts.iter_mut().zip(buckets) {
                *b -= before;
            }
            p.min = None;
            p.max = None;
        }
        true
    }
}

/// What to emit for a point: `None` drops it; `Some((start, None))` emits its
/// whole value from `start`; `Some((start, Some(previous)))` emits it minus `previous`.
type Step = Option<(u64, Option<Last>)>;

fn push_str(key: &mut Vec<u8>, s: &str) {
    key.extend_from_slice(&(s.len() as u64).to_le_bytes());
    key.extend_from_slice(s.as_bytes());
}

/// Appends attributes in key order, so their order on the wire does not matter.
fn push_attributes(key: &mut Vec<u8>, attrs: &[KeyValue]) {
    let mut sorted: Vec<&KeyValue> = attrs.iter().collect();
    sorted.sort_by(|a, b| a.key.cmp(&b.key));
    key.extend_from_slice(&(sorted.len() as u64).to_le_bytes());
    for kv in sorted {
        push_str(key, &kv.key);
        let value = kv
            .value
            .as_ref()
            .map(|v| v.encode_to_vec())
            .unwrap_or_default();
        key.extend_from_slice(&(value.len() as u64).to_le_bytes());
        key.extend_from_slice(&value);
    }
}
