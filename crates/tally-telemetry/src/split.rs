//! Cutting an OTLP metrics request into requests of at most N data points,
//! keeping resource, scope and metric structure.

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::{
    Metric, ResourceMetrics, ScopeMetrics, metric::Data,
};

/// Splits a request into requests of at most `max` data points, keeping
/// resource, scope and metric structure (a metric may be cut in parts).
pub(crate) fn split(
    request: ExportMetricsServiceRequest,
    max: u64,
) -> Vec<ExportMetricsServiceRequest> {
    let max = usize::try_from(max).unwrap_or(usize::MAX).max(1);
    let mut parts = Vec::new();
    let mut current = ExportMetricsServiceRequest::default();
    let mut room = max;
    for rm in request.resource_metrics {
        let mut out_rm = ResourceMetrics {
            resource: rm.resource.clone(),
            scope_metrics: Vec::new(),
            schema_url: rm.schema_url.clone(),
        };
        for sm in rm.scope_metrics {
            let mut out_sm = ScopeMetrics {
                scope: sm.scope.clone(),
                metrics: Vec::new(),
                schema_url: sm.schema_url.clone(),
            };
            for metric in sm.metrics {
                let mut rest = Some(metric);
                while let Some(metric) = rest.take() {
                    let (head, tail) = cut_metric(metric, room);
                    room -= head
                        .data
                        .as_ref()
                        .map_or(0, crate::otlp::data_point_count_of)
                        .min(room);
                    out_sm.metrics.push(head);
                    rest = tail;
                    if room == 0 {
                        // Close the current part and start the next one with
                        // the same resource and scope.
                        let mut closed_sm = ScopeMetrics {
                            scope: out_sm.scope.clone(),
                            metrics: Vec::new(),
                            schema_url: out_sm.schema_url.clone(),
                        };
                        std::mem::swap(&mut closed_sm, &mut out_sm);
                        let mut closed_rm = ResourceMetrics {
                            resource: out_rm.resource.clone(),
                            scope_metrics: Vec::new(),
                            schema_url: out_rm.schema_url.clone(),
                        };
                        std::mem::swap(&mut closed_rm, &mut out_rm);
                        closed_rm.scope_metrics.push(closed_sm);
                        current.resource_metrics.push(closed_rm);
                        parts.push(std::mem::take(&mut current));
                        room = max;
                    }
                }
            }
            if !out_sm.metrics.is_empty() {
                out_rm.scope_metrics.push(out_sm);
            }
        }
        if !out_rm.scope_metrics.is_empty() {
            current.resource_metrics.push(out_rm);
        }
    }
    if !current.resource_metrics.is_empty() {
        parts.push(current);
    }
    parts
}

/// The first `room` data points of `metric`, and the rest if any.
pub(crate) fn cut_metric(mut metric: Metric, room: usize) -> (Metric, Option<Metric>) {
    fn cut<P>(points: &mut Vec<P>, room: usize) -> Option<Vec<P>> {
        (points.len() > room).then(|| points.split_off(room))
    }
    let tail = match &mut metric.data {
        None => None,
        Some(Data::Gauge(g)) => cut(&mut g.data_points, room).map(|p| {
            Data::Gauge(opentelemetry_proto::tonic::metrics::v1::Gauge { data_points: p })
        }),
        Some(Data::Sum(s)) => cut(&mut s.data_points, room).map(|p| {
            Data::Sum(opentelemetry_proto::tonic::metrics::v1::Sum {
                data_points: p,
                aggregation_temporality: s.aggregation_temporality,
                is_monotonic: s.is_monotonic,
            })
        }),
        Some(Data::Histogram(h)) => cut(&mut h.data_points, room).map(|p| {
            Data::Histogram(opentelemetry_proto::tonic::metrics::v1::Histogram {
                data_points: p,
                aggregation_temporality: h.aggregation_temporality,
            })
        }),
        Some(Data::ExponentialHistogram(h)) => cut(&mut h.data_points, room).map(|p| {
            Data::ExponentialHistogram(
                opentelemetry_proto::tonic::metrics::v1::ExponentialHistogram {
                    data_points: p,
                    aggregation_temporality: h.aggregation_temporality,
                },
            )
        }),
        Some(Data::Summary(s)) => cut(&mut s.data_points, room).map(|p| {
            Data::Summary(opentelemetry_proto::tonic::metrics::v1::Summary { data_points: p })
        }),
    };
    let rest = tail.map(|data| Metric {
        name: metric.name.clone(),
        description: metric.description.clone(),
        unit: metric.unit.clone(),
        metadata: metric.metadata.clone(),
        data: Some(data),
    });
    (metric, rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::otlp;
    use opentelemetry_proto::tonic::metrics::v1::{Gauge, NumberDataPoint};

    fn metric(name: &str, points: usize) -> Metric {
        Metric {
            name: name.into(),
            data: Some(Data::Gauge(Gauge {
                data_points: (0..points)
                    .map(|i| NumberDataPoint {
                        time_unix_nano: i as u64,
                        ..Default::default()
                    })
                    .collect(),
            })),
            ..Default::default()
        }
    }

    #[test]
    fn split_keeps_every_point_once_in_parts_of_at_most_max() {
        let request = ExportMetricsServiceRequest {
            resource_metrics: (0..3)
                .map(|r| ResourceMetrics {
                    scope_metrics: vec![ScopeMetrics {
                        metrics: vec![metric(&format!("a{r}"), 7), metric(&format!("b{r}"), 2)],
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .collect(),
        };
        for max in [1, 3, 4, 9, 100] {
            let parts = split(request.clone(), max);
            let mut seen = Vec::new();
            for part in &parts {
                let n = otlp::data_point_count(part) as u64;
                assert!(n >= 1 && n <= max, "{n} > {max}");
                for rm in &part.resource_metrics {
                    for sm in &rm.scope_metrics {
                        for m in &sm.metrics {
                            let Some(Data::Gauge(g)) = &m.data else {
                                panic!()
                            };
                            assert!(!g.data_points.is_empty());
                            for p in &g.data_points {
                                seen.push((m.name.clone(), p.time_unix_nano));
                            }
                        }
                    }
                }
            }
            let mut expected: Vec<_> = (0..3)
                .flat_map(|r| {
                    (0..7)
                        .map(move |i| (format!("a{r}"), i))
                        .chain((0..2).map(move |i| (format!("b{r}"), i)))
                })
                .collect();
            expected.sort();
            seen.sort();
            assert_eq!(seen, expected, "max {max}");
        }
    }
}
