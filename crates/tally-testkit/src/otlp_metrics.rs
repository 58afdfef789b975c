//! Builders of OTLP metrics requests and resource indexes for the tests.

use tally_telemetry::InMemoryResourceIndex;
use tally_telemetry::proto::collector::metrics::v1::ExportMetricsServiceRequest;
use tally_telemetry::proto::common::v1::{InstrumentationScope, KeyValue, any_value};
use tally_telemetry::proto::metrics::v1::{
    AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum, metric::Data, number_data_point,
};
use tally_telemetry::proto::resource::v1::Resource;

pub fn kv(key: &str, value: &str) -> KeyValue {
    tally_telemetry::otlp::string_attribute(key, value)
}

pub fn attrs(pairs: &[(&str, &str)]) -> Vec<KeyValue> {
    pairs.iter().map(|(k, v)| kv(k, v)).collect()
}

/// A resource identity: (project, namespace, group, kind, name, service).
pub struct Who<'a> {
    pub project: Option<&'a str>,
    pub namespace: &'a str,
    pub group: &'a str,
    pub kind: &'a str,
    pub name: &'a str,
    pub service: &'a str,
}

pub fn resource(who: &Who<'_>) -> Resource {
    let mut attributes = attrs(&[
        ("namespace", who.namespace),
        ("resource_group", who.group),
        ("resource_kind", who.kind),
        ("resource_name", who.name),
        ("service.name", who.service),
    ]);
    if let Some(project) = who.project {
        attributes.push(kv("project", project));
    }
    Resource {
        attributes,
        ..Default::default()
    }
}

pub fn number_point(
    attributes: Vec<KeyValue>,
    start: u64,
    time: u64,
    value: i64,
) -> NumberDataPoint {
    NumberDataPoint {
        attributes,
        start_time_unix_nano: start,
        time_unix_nano: time,
        value: Some(number_data_point::Value::AsInt(value)),
        ..Default::default()
    }
}

pub fn counter(name: &str, points: Vec<NumberDataPoint>) -> Metric {
    Metric {
        name: name.into(),
        unit: "By".into(),
        data: Some(Data::Sum(Sum {
            data_points: points,
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        })),
        ..Default::default()
    }
}

pub fn gauge(name: &str, points: Vec<NumberDataPoint>) -> Metric {
    Metric {
        name: name.into(),
        data: Some(Data::Gauge(Gauge {
            data_points: points,
        })),
        ..Default::default()
    }
}

pub fn histogram(name: &str, attributes: Vec<KeyValue>, time: u64, buckets: Vec<u64>) -> Metric {
    let count = buckets.iter().sum();
    Metric {
        name: name.into(),
        unit: "s".into(),
        data: Some(Data::Histogram(Histogram {
            data_points: vec![HistogramDataPoint {
                attributes,
                start_time_unix_nano: 1,
                time_unix_nano: time,
                count,
                sum: Some(count as f64 * 0.5),
                explicit_bounds: (1..buckets.len()).map(|b| b as f64).collect(),
                bucket_counts: buckets,
                min: Some(0.1),
                max: Some(9.0),
                ..Default::default()
            }],
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
        })),
        ..Default::default()
    }
}

pub fn resource_metrics(who: &Who<'_>, metrics: Vec<Metric>) -> ResourceMetrics {
    ResourceMetrics {
        resource: Some(resource(who)),
        scope_metrics: vec![ScopeMetrics {
            scope: Some(InstrumentationScope {
                name: "tally.test".into(),
                version: "1".into(),
                ..Default::default()
            }),
            metrics,
            schema_url: String::new(),
        }],
        schema_url: String::new(),
    }
}

pub fn request(resources: Vec<ResourceMetrics>) -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest {
        resource_metrics: resources,
    }
}

/// Every (namespace, metric name, point attributes) triple in a request, sorted.
pub fn series(request: &ExportMetricsServiceRequest) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for rm in &request.resource_metrics {
        let ns = rm
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|kv| kv.key == "namespace"))
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| match &v.value {
                Some(any_value::Value::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for sm in &rm.scope_metrics {
            for m in &sm.metrics {
                let point_attrs: Vec<Vec<KeyValue>> = match &m.data {
                    Some(Data::Sum(s)) => {
                        s.data_points.iter().map(|p| p.attributes.clone()).collect()
                    }
                    Some(Data::Gauge(g)) => {
                        g.data_points.iter().map(|p| p.attributes.clone()).collect()
                    }
                    Some(Data::Histogram(h)) => {
                        h.data_points.iter().map(|p| p.attributes.clone()).collect()
                    }
                    _ => vec![],
                };
                for a in point_attrs {
                    let text = a
                        .iter()
                        .map(|kv| {
                            format!(
                                "{}={:?}",
                                kv.key,
                                kv.value.as_ref().and_then(|v| v.value.as_ref())
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(",");
                    out.push((ns.clone(), m.name.clone(), text));
                }
            }
        }
    }
    out.sort();
    out
}

/// Two projects: p1 owns ns-a (production) and ns-b (staging) and ns-c
/// (production); p2 owns ns-x (production).
pub fn two_project_index() -> InMemoryResourceIndex {
    let mut index = InMemoryResourceIndex::new();
    let labels = |env: &str| [("environment".to_owned(), env.to_owned())].into();
    index.set_namespace("ns-a", "p1", labels("production"));
    index.set_namespace("ns-b", "p1", labels("staging"));
    index.set_namespace("ns-c", "p1", labels("production"));
    index.set_namespace("ns-x", "p2", labels("production"));
    index
}
