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
//! Per record little is allocated: a record borrows its strings from the
//! request (or from `tally collect`'s lines, [`Shaper::shape_log_lines`]),
//! kept log records are written straight to each project's protobuf
//! request (`logs`), and metric series are found by a key built in a
//! reused buffer (`metrics`).
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
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};
use prost::Message as _;
use tally_policy::vocab::A;
use tally_policy::{AttrValue, Field, JsonFields, Policy, Record, RecordBuilder, Resolution};

use crate::index::ResourceIndex;
use crate::otlp::string_attribute;

mod logs;
mod metrics;

pub use logs::LogMeta;

use logs::LogsOut;
use metrics::MetricsBuilder;

/// The instrumentation scope of what policies produce.
pub const SCOPE: &str = "tally.telemetrypolicy";

/// What the policies made of one request, per project.
#[derive(Debug, Default)]
pub struct Shaped {
    /// Kept log records or spans, as one encoded OTLP
    /// `ExportLogsServiceRequest` / `ExportTraceServiceRequest` (protobuf)
    /// per project, with their count.
    pub signals: BTreeMap<String, (Vec<u8>, u64)>,
    /// Request and GenAI metrics, resources named by namespace.
    pub metrics: ExportMetricsServiceRequest,
    /// Records or spans read.
    pub read: u64,
    /// Records or spans of no known project.
    pub unattributed: u64,
    /// Records or spans governed by a policy that did not keep them.
    pub filtered: u64,
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

/// One request's access-log records on their way out.
#[derive(Default)]
struct LogsShaping {
    shaped: Shaped,
    logs: LogsOut,
    metrics: MetricsBuilder,
}

impl LogsShaping {
    fn finish(mut self) -> Shaped {
        self.shaped.signals = self.logs.finish();
        self.shaped.metrics = self.metrics.finish();
        self.shaped
    }
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
    fn place<'r>(&self, record: &'r Record<'_>) -> Option<Place<'r>> {
        let namespace = record
            .text(A::RouteNamespace)
            .or(record.text(A::RouteGatewayNamespace))?;
        let info = self.index.namespace(namespace)?;
        if let Some(named) = record.text(A::Project)
            && named != &*info.project
        {
            return None;
        }
        Some(Place {
            project: info.project,
            namespace,
        })
    }

    fn policy(&self, record: &Record<'_>, place: &Place<'_>) -> Option<&Arc<Policy>> {
        let gateway = record
            .text(A::RouteGatewayNamespace)
            .zip(record.text(A::RouteGateway));
        self.resolution
            .policy_for(&place.project, gateway, Some(place.namespace))
    }

    /// Applies the policies to access-log records.
    pub fn shape_logs(&self, request: &ExportLogsServiceRequest) -> Shaped {
        let mut out = LogsShaping::default();
        for rl in &request.resource_logs {
            let resource = rl
                .resource
                .as_ref()
                .map(|r| &r.attributes[..])
                .unwrap_or_default();
            for log in rl.scope_logs.iter().flat_map(|sl| &sl.log_records) {
                let meta = LogMeta {
                    time_unix_nano: log.time_unix_nano,
                    observed_time_unix_nano: log.observed_time_unix_nano,
                    trace_id: &log.trace_id,
                    span_id: &log.span_id,
                };
                self.shape_log(&record_of_log(resource, log), &meta, &mut out);
            }
        }
        out.finish()
    }

    /// Applies the policies to access-log lines as `tally collect` reads
    /// them: each exactly as an OTLP log record whose body is the line
    /// (a JSON object, else a record with no fields), without building one.
    pub fn shape_log_lines<'l>(&self, lines: impl IntoIterator<Item = &'l str>) -> Shaped {
        let mut out = LogsShaping::default();
        for line in lines {
            let mut record = RecordBuilder::new();
            read_json_body(line, &mut record);
            self.shape_log(&record.finish(), &LogMeta::default(), &mut out);
        }
        out.finish()
    }

    /// One record through attribution, its policy, metrics and export.
    fn shape_log(&self, record: &Record<'_>, meta: &LogMeta<'_>, out: &mut LogsShaping) {
        out.shaped.read += 1;
        let Some(place) = self.place(record) else {
            out.shaped.unattributed += 1;
            return;
        };
        let Some(policy) = self.policy(record, &place) else {
            return;
        };
        out.metrics.add(policy, record, place.namespace);
        if !policy.keeps_log(record) {
            out.shaped.filtered += 1;
            return;
        }
        let start = match record.get(A::RequestTime as usize) {
            Some(AttrValue::Timestamp(ns)) => u64::try_from(*ns).unwrap_or(0),
            _ => meta.time_unix_nano,
        };
        let fields = policy.log_fields(record);
        out.logs
            .push(&place.project, place.namespace, start, meta, fields);
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
            shaped.signals.insert(project, (request.encode_to_vec(), n));
        }
        shaped
    }
}

/// OTLP attributes as record fields.
fn fields<'a>(
    attrs: impl Iterator<Item = &'a KeyValue>,
) -> impl Iterator<Item = (&'a str, Field<'a>)> {
    attrs.filter_map(|kv| Some((kv.key.as_str(), field(kv.value.as_ref()?)?)))
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

/// The fields of a text body that holds a JSON object (nothing otherwise).
fn read_json_body<'a>(text: &'a str, record: &mut RecordBuilder<'a>) {
    if text.trim_start().starts_with('{')
        && let Ok(object) = JsonFields::parse(text)
    {
        record.json(object);
    }
}

/// A log record as a record: resource attributes, then the body's fields
/// (a key/value list, or a JSON object as text), then its attributes. The
/// one reading of an OTLP access-log record (`tally serve`, `tally export`
/// and `tally collect`, whose lines arrive as JSON text bodies). Strings
/// are borrowed from the log record where they can be.
pub fn record_of_log<'a>(resource: &'a [KeyValue], log: &'a LogRecord) -> Record<'a> {
    let mut record = RecordBuilder::new();
    record.fields(fields(resource.iter()));
    match log.body.as_ref().and_then(|b| b.value.as_ref()) {
        Some(Any::KvlistValue(list)) => record.fields(fields(list.values.iter())),
        Some(Any::StringValue(s)) => read_json_body(s, &mut record),
        _ => {}
    }
    record.fields(fields(log.attributes.iter()));
    record.finish()
}

fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: SCOPE.into(),
        ..InstrumentationScope::default()
    }
}
