//! `TelemetryPolicy` applied to what the gateways send: access-log records
//! (OTLP logs) and spans (OTLP traces) become, per project, the log records
//! and spans its policies keep, and the request and GenAI metrics they ask
//! for ([`Shaper`]). The pipeline then hands logs and spans to the project's
//! `logs`/`traces` sinks ([`crate::Pipeline::ingest_signal`]) and metrics
//! to the router like any other metric.
//!
//! A record's project is its `project_name`, or its route namespace's
//! project; a record whose `project_name` is not its namespace's project, or
//! that names no namespace Tally knows, is unattributed and goes nowhere. A
//! record is governed by the policy in force on its Gateway (or its
//! namespace) only if that policy belongs to the same project
//! ([`Resolution::policy_for`]).
//!
//! Metrics are delta histograms of one request's records, by Gateway,
//! HTTPRoute, method and status code plus the policy's dimensions:
//! `http.server.request.duration` (s; its count is the request count),
//! `http.server.request.body.size` and `http.server.response.body.size`
//! (By); with `genAI`, `gen_ai.client.token.usage` ({token}, by
//! `gen_ai.token.type`) and `gen_ai.client.operation.duration` (s).
//!
//! **Never:** touch usage metering (billing reads the ledger, which no
//! policy sees); hand a record or span to a project other than its own.

use std::collections::BTreeMap;
use std::sync::Arc;

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, InstrumentationScope, KeyValue, any_value::Value as Any,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Histogram, HistogramDataPoint, Metric, ResourceMetrics, ScopeMetrics,
    metric::Data,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};
use tally_policy::vocab::A;
use tally_policy::{AttrValue, Field, JsonFields, Policy, Record, Resolution};

use crate::index::ResourceIndex;
use crate::otlp::string_attribute;
use crate::route::K8S_NAMESPACE;

/// The instrumentation scope of what policies produce.
pub const SCOPE: &str = "tally.telemetrypolicy";

/// Bucket bounds of duration histograms (s), as the semantic conventions advise.
const SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
/// Bucket bounds of size histograms (By).
const BYTES: &[f64] = &[
    0.0,
    100.0,
    1_000.0,
    10_000.0,
    100_000.0,
    1_000_000.0,
    10_000_000.0,
];
/// Bucket bounds of token histograms, as the semantic conventions advise.
const TOKENS: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];

/// What the policies made of one request, per project.
#[derive(Debug, Default)]
pub struct Shaped {
    /// Kept log records or spans, encoded as one OTLP request per project,
    /// with their count.
    pub signals: BTreeMap<String, (ExportLogsOrTraces, u64)>,
    /// Request and GenAI metrics, resources named by namespace.
    pub metrics: ExportMetricsServiceRequest,
    /// Records or spans read.
    pub read: u64,
    /// Records or spans of no known project.
    pub unattributed: u64,
    /// Records or spans governed by a policy that did not keep them.
    pub filtered: u64,
}

/// An OTLP logs or traces request.
#[derive(Debug)]
pub enum ExportLogsOrTraces {
    Logs(ExportLogsServiceRequest),
    Traces(ExportTraceServiceRequest),
}

/// Applies the policies in force.
#[derive(Clone)]
pub struct Shaper {
    resolution: Arc<Resolution>,
    index: Arc<dyn ResourceIndex>,
}

impl std::fmt::Debug for Shaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shaper").finish_non_exhaustive()
    }
}

/// Where a record belongs.
struct Place<'r> {
    project: Arc<str>,
    namespace: &'r str,
}

impl Shaper {
    pub fn new(resolution: Arc<Resolution>, index: Arc<dyn ResourceIndex>) -> Shaper {
        Shaper { resolution, index }
    }

    /// The policies it applies.
    pub fn resolution(&self) -> &Arc<Resolution> {
        &self.resolution
    }

    /// The project and namespace of `record`, if it has a known one.
    fn place<'r>(&self, record: &'r Record) -> Option<Place<'r>> {
        let text = |a: A| match record.get(a as usize) {
            Some(AttrValue::Str(s)) => Some(s.as_str()),
            _ => None,
        };
        let namespace = text(A::RouteNamespace).or(text(A::RouteGatewayNamespace))?;
        let info = self.index.namespace(namespace)?;
        if let Some(named) = text(A::Project)
            && named != &*info.project
        {
            return None;
        }
        Some(Place {
            project: info.project,
            namespace,
        })
    }

    fn policy(&self, record: &Record, place: &Place<'_>) -> Option<&Arc<Policy>> {
        let text = |a: A| match record.get(a as usize) {
            Some(AttrValue::Str(s)) => Some(s.as_str()),
            _ => None,
        };
        let gateway = text(A::RouteGatewayNamespace).zip(text(A::RouteGateway));
        self.resolution
            .policy_for(&place.project, gateway, Some(place.namespace))
    }

    /// Applies the policies to access-log records.
    pub fn shape_logs(&self, request: &ExportLogsServiceRequest) -> Shaped {
        let mut shaped = Shaped::default();
        let mut logs: BTreeMap<String, ResourceLogs> = BTreeMap::new();
        let mut metrics = MetricsBuilder::default();
        for rl in &request.resource_logs {
            let resource = rl
                .resource
                .as_ref()
                .map(|r| &r.attributes[..])
                .unwrap_or_default();
            for sl in &rl.scope_logs {
                for log in &sl.log_records {
                    shaped.read += 1;
                    let record = record_of_log(resource, log);
                    let Some(place) = self.place(&record) else {
                        shaped.unattributed += 1;
                        continue;
                    };
                    let Some(policy) = self.policy(&record, &place) else {
                        continue;
                    };
                    metrics.add(policy, &record, &place);
                    match policy.keep_log(&record) {
                        Some(fields) => {
                            if !logs.contains_key(&*place.project) {
                                logs.insert(place.project.to_string(), resource_logs(&place));
                            }
                            if let Some(out) = logs.get_mut(&*place.project) {
                                out.scope_logs[0]
                                    .log_records
                                    .push(log_record(log, &record, fields));
                            }
                        }
                        None => shaped.filtered += 1,
                    }
                }
            }
        }
        for (project, rl) in logs {
            let n = rl.scope_logs[0].log_records.len() as u64;
            let request = ExportLogsServiceRequest {
                resource_logs: vec![rl],
            };
            shaped
                .signals
                .insert(project, (ExportLogsOrTraces::Logs(request), n));
        }
        shaped.metrics = metrics.finish();
        shaped
    }

    /// Applies the policies' head sampling and attributes to spans.
    pub fn shape_traces(&self, request: &ExportTraceServiceRequest) -> Shaped {
        let mut shaped = Shaped::default();
        let mut out: BTreeMap<String, Vec<ResourceSpans>> = BTreeMap::new();
        for rs in &request.resource_spans {
            let resource = rs
                .resource
                .as_ref()
                .map(|r| &r.attributes[..])
                .unwrap_or_default();
            for ss in &rs.scope_spans {
                for span in &ss.spans {
                    shaped.read += 1;
                    let record =
                        Record::from_fields(fields(resource.iter().chain(&span.attributes)));
                    let Some(place) = self.place(&record) else {
                        shaped.unattributed += 1;
                        continue;
                    };
                    let Some(policy) = self.policy(&record, &place) else {
                        continue;
                    };
                    if !policy.keep_trace(&span.trace_id) {
                        shaped.filtered += 1;
                        continue;
                    }
                    let mut kept = span.clone();
                    for (k, v) in policy.span_attributes(&record) {
                        kept.attributes.retain(|a| a.key != k);
                        kept.attributes.push(string_attribute(&k, &v));
                    }
                    let list = out.entry(place.project.to_string()).or_default();
                    let same = list.last().is_some_and(|last: &ResourceSpans| {
                        last.resource == rs.resource && last.scope_spans[0].scope == ss.scope
                    });
                    if !same {
                        list.push(ResourceSpans {
                            resource: rs.resource.clone(),
                            scope_spans: vec![ScopeSpans {
                                scope: ss.scope.clone(),
                                spans: Vec::new(),
                                schema_url: ss.schema_url.clone(),
                            }],
                            schema_url: rs.schema_url.clone(),
                        });
                    }
                    if let Some(last) = list.last_mut() {
                        last.scope_spans[0].spans.push(kept);
                    }
                }
            }
        }
        for (project, resource_spans) in out {
            let n = resource_spans
                .iter()
                .map(|r| r.scope_spans[0].spans.len() as u64)
                .sum();
            let request = ExportTraceServiceRequest { resource_spans };
            shaped
                .signals
                .insert(project, (ExportLogsOrTraces::Traces(request), n));
        }
        shaped
    }
}

/// OTLP attributes as record fields.
fn fields<'a>(attrs: impl Iterator<Item = &'a KeyValue>) -> Vec<(&'a str, Field<'a>)> {
    attrs
        .filter_map(|kv| Some((kv.key.as_str(), field(kv.value.as_ref()?)?)))
        .collect()
}

fn field(value: &AnyValue) -> Option<Field<'_>> {
    Some(match value.value.as_ref()? {
        Any::StringValue(s) => Field::Str(s),
        Any::IntValue(i) => Field::Int(*i),
        Any::DoubleValue(d) => Field::Double(*d),
        Any::BoolValue(b) => Field::Bool(*b),
        _ => Field::Null,
    })
}

/// A log record as a record: resource attributes, then the body's fields
/// (a key/value list, or a JSON object as text), then its attributes. The
/// one reading of an OTLP access-log record (`tally serve`, `tally export`
/// and `tally collect`, whose lines arrive as JSON text bodies).
pub fn record_of_log(resource: &[KeyValue], log: &LogRecord) -> Record {
    let mut all = fields(resource.iter());
    let body = log.body.as_ref().and_then(|b| b.value.as_ref());
    let json = match body {
        Some(Any::StringValue(s)) if s.trim_start().starts_with('{') => JsonFields::parse(s).ok(),
        _ => None,
    };
    if let Some(Any::KvlistValue(list)) = body {
        all.extend(fields(list.values.iter()));
    }
    if let Some(object) = &json {
        all.extend(object.iter().filter(|(_, f)| *f != Field::Null));
    }
    all.extend(fields(log.attributes.iter()));
    Record::from_fields(all)
}

fn resource_logs(place: &Place<'_>) -> ResourceLogs {
    ResourceLogs {
        resource: Some(Resource {
            attributes: vec![
                string_attribute(K8S_NAMESPACE, place.namespace),
                string_attribute("tally.project.name", &place.project),
            ],
            ..Resource::default()
        }),
        scope_logs: vec![ScopeLogs {
            scope: Some(scope()),
            log_records: Vec::new(),
            schema_url: String::new(),
        }],
        schema_url: String::new(),
    }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: SCOPE.into(),
        ..InstrumentationScope::default()
    }
}

/// The exported log record: its times, and exactly the kept fields.
fn log_record(
    log: &LogRecord,
    record: &Record,
    fields: Vec<(&'static str, AttrValue)>,
) -> LogRecord {
    let start = match record.get(A::RequestTime as usize) {
        Some(AttrValue::Timestamp(ns)) => u64::try_from(*ns).unwrap_or(0),
        _ => log.time_unix_nano,
    };
    LogRecord {
        time_unix_nano: start,
        observed_time_unix_nano: log.observed_time_unix_nano,
        trace_id: log.trace_id.clone(),
        span_id: log.span_id.clone(),
        attributes: fields.into_iter().map(|(k, v)| attribute(k, v)).collect(),
        ..LogRecord::default()
    }
}

fn attribute(key: &str, value: AttrValue) -> KeyValue {
    let value = match value {
        AttrValue::Str(s) => Any::StringValue(s),
        AttrValue::Int(i) => Any::IntValue(i),
        AttrValue::Uint(u) => Any::IntValue(i64::try_from(u).unwrap_or(i64::MAX)),
        AttrValue::Bool(b) => Any::BoolValue(b),
        AttrValue::Duration(ns) => Any::DoubleValue(ns as f64 / 1e9),
        other => Any::StringValue(other.render()),
    };
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..KeyValue::default()
    }
}

/// Delta histograms of one request's records, by namespace, metric and
/// attribute set; attribute names are borrowed from the policies (`'p`).
#[derive(Default)]
struct MetricsBuilder<'p> {
    series: BTreeMap<String, BTreeMap<&'static str, Series<'p>>>,
}

/// A metric's histograms by attribute set.
type Series<'p> = BTreeMap<Vec<(&'p str, String)>, Hist>;

struct Hist {
    bounds: &'static [f64],
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Hist {
    fn new(bounds: &'static [f64]) -> Hist {
        Hist {
            bounds,
            counts: vec![0; bounds.len() + 1],
            count: 0,
            sum: 0.0,
        }
    }

    fn record(&mut self, value: f64) {
        let i = self.bounds.partition_point(|b| *b < value);
        self.counts[i] += 1;
        self.count += 1;
        self.sum += value;
    }
}

const UNITS: &[(&str, &str, &[f64])] = &[
    ("http.server.request.duration", "s", SECONDS),
    ("http.server.request.body.size", "By", BYTES),
    ("http.server.response.body.size", "By", BYTES),
    ("gen_ai.client.token.usage", "{token}", TOKENS),
    ("gen_ai.client.operation.duration", "s", SECONDS),
];

impl<'p> MetricsBuilder<'p> {
    fn observe(&mut self, ns: &str, name: &'static str, attrs: &[(&'p str, String)], value: f64) {
        if !self.series.contains_key(ns) {
            self.series.insert(ns.to_owned(), BTreeMap::new());
        }
        let Some(by_name) = self.series.get_mut(ns) else {
            return;
        };
        let series = by_name.entry(name).or_default();
        if let Some(hist) = series.get_mut(attrs) {
            hist.record(value);
            return;
        }
        let bounds = UNITS.iter().find(|u| u.0 == name).map_or(SECONDS, |u| u.2);
        let mut hist = Hist::new(bounds);
        hist.record(value);
        series.insert(attrs.to_vec(), hist);
    }

    fn add(&mut self, policy: &'p Policy, record: &Record, place: &Place<'_>) {
        let text = |a: A| record.get(a as usize).map(AttrValue::render);
        let int = |a: A| match record.get(a as usize) {
            Some(AttrValue::Int(i)) => Some(*i as f64),
            _ => None,
        };
        let duration = match record.get(A::RequestDuration as usize) {
            Some(AttrValue::Duration(ns)) => Some(*ns as f64 / 1e9),
            _ => None,
        };
        let mut base: Vec<(&'p str, String)> = Vec::with_capacity(8);
        for (key, a) in [
            ("gateway.name", A::RouteGateway),
            ("gateway.namespace", A::RouteGatewayNamespace),
            ("gateway.httproute.name", A::RouteHttproute),
        ] {
            if let Some(v) = text(a) {
                base.push((key, v));
            }
        }
        if policy.dimensions.is_some() {
            let mut attrs = base.clone();
            for (key, a) in [
                ("http.request.method", A::RequestMethod),
                ("http.response.status_code", A::ResponseCode),
            ] {
                if let Some(v) = text(a) {
                    attrs.push((key, v));
                }
            }
            attrs.extend(policy.dimension_values(record));
            if let Some(d) = duration {
                self.observe(place.namespace, "http.server.request.duration", &attrs, d);
            }
            if let Some(n) = int(A::RequestSize) {
                self.observe(place.namespace, "http.server.request.body.size", &attrs, n);
            }
            if let Some(n) = int(A::ResponseSize) {
                self.observe(place.namespace, "http.server.response.body.size", &attrs, n);
            }
        }
        let usage = policy.gen_ai_usage(record);
        if usage.is_empty() {
            return;
        }
        let mut attrs = base;
        for (key, a) in [
            ("gen_ai.request.model", A::GenAiRequestModel),
            ("gen_ai.provider.name", A::GenAiProviderName),
            ("gen_ai.operation.name", A::GenAiOperationName),
        ] {
            if let Some(v) = text(a) {
                attrs.push((key, v));
            }
        }
        for point in usage {
            let mut a = attrs.clone();
            a.push(("gen_ai.token.type", point.token_type.into()));
            self.observe(
                place.namespace,
                "gen_ai.client.token.usage",
                &a,
                point.tokens as f64,
            );
        }
        if let Some(d) = duration {
            self.observe(
                place.namespace,
                "gen_ai.client.operation.duration",
                &attrs,
                d,
            );
        }
    }

    fn finish(self) -> ExportMetricsServiceRequest {
        let now = u64::try_from(jiff::Timestamp::now().as_nanosecond()).unwrap_or(0);
        let mut by_ns: BTreeMap<String, Vec<Metric>> = BTreeMap::new();
        let all = self.series.into_iter().flat_map(|(ns, by_name)| {
            by_name
                .into_iter()
                .map(move |(name, series)| (ns.clone(), name, series))
        });
        for (ns, name, series) in all {
            let unit = UNITS.iter().find(|u| u.0 == name).map_or("", |u| u.1);
            let data_points = series
                .into_iter()
                .map(|(attrs, h)| HistogramDataPoint {
                    attributes: attrs.iter().map(|(k, v)| string_attribute(k, v)).collect(),
                    start_time_unix_nano: now,
                    time_unix_nano: now,
                    count: h.count,
                    sum: Some(h.sum),
                    bucket_counts: h.counts,
                    explicit_bounds: h.bounds.to_vec(),
                    ..HistogramDataPoint::default()
                })
                .collect();
            by_ns.entry(ns).or_default().push(Metric {
                name: name.into(),
                unit: unit.into(),
                data: Some(Data::Histogram(Histogram {
                    data_points,
                    aggregation_temporality: AggregationTemporality::Delta as i32,
                })),
                ..Metric::default()
            });
        }
        ExportMetricsServiceRequest {
            resource_metrics: by_ns
                .into_iter()
                .map(|(ns, metrics)| ResourceMetrics {
                    resource: Some(Resource {
                        attributes: vec![string_attribute(K8S_NAMESPACE, &ns)],
                        ..Resource::default()
                    }),
                    scope_metrics: vec![ScopeMetrics {
                        scope: Some(scope()),
                        metrics,
                        schema_url: String::new(),
                    }],
                    schema_url: String::new(),
                })
                .collect(),
        }
    }
}
