//! Kept access-log records written straight to the protobuf wire form of
//! an `ExportLogsServiceRequest` per project, from the borrowed record: no
//! `LogRecord`, `KeyValue` or `String` per record.
//!
//! Byte layout (field numbers of the OTLP protos; every length-delimited
//! field is key, varint length, body):
//!
//! ```text
//! ExportLogsServiceRequest { 1: ResourceLogs { (one per namespace)
//!     1: Resource { 1: KeyValue k8s.namespace.name, 1: KeyValue tally.project.name }
//!     2: ScopeLogs { 1: InstrumentationScope { 1: name }, 2: LogRecord... } } }
//! LogRecord { 1: time_unix_nano (fixed64, if not 0), 6: KeyValue... (the kept
//!             fields), 9: trace_id (if any), 10: span_id (if any),
//!             11: observed_time_unix_nano (fixed64, if not 0) }
//! KeyValue { 1: key (if not empty), 2: AnyValue { 1: string | 2: bool | 3: int64
//!            (varint) | 4: double (fixed64) } }
//! ```
//!
//! Fields come in the order prost writes them (by field number), so the
//! bytes are exactly prost's encoding of the same message (a test checks
//! it). Each record is written to a scratch buffer (its length goes
//! first), then appended to its (project, namespace) buffer; the levels
//! above are written once per namespace and request, so a record always
//! goes out under its own namespace.

use std::collections::BTreeMap;

use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
use tally_policy::AttrValue;

use crate::route::K8S_NAMESPACE;
use crate::wire::{length_delimited, string, string_len};

/// Field numbers of the OTLP protos written here.
const REQUEST_RESOURCE_LOGS: u32 = 1;
const RESOURCE_LOGS_RESOURCE: u32 = 1;
const RESOURCE_LOGS_SCOPE_LOGS: u32 = 2;
const RESOURCE_ATTRIBUTES: u32 = 1;
const SCOPE_LOGS_SCOPE: u32 = 1;
const SCOPE_LOGS_LOG_RECORDS: u32 = 2;
const SCOPE_NAME: u32 = 1;
const LOG_TIME: u32 = 1;
const LOG_OBSERVED_TIME: u32 = 11;
const LOG_ATTRIBUTES: u32 = 6;
const LOG_TRACE_ID: u32 = 9;
const LOG_SPAN_ID: u32 = 10;
const KEY_VALUE_KEY: u32 = 1;
const KEY_VALUE_VALUE: u32 = 2;
const ANY_STRING: u32 = 1;
const ANY_BOOL: u32 = 2;
const ANY_INT: u32 = 3;
const ANY_DOUBLE: u32 = 4;

/// What a kept record carries besides its fields (from the received OTLP
/// log record; a line of `tally collect` has none of them).
#[derive(Debug, Clone, Copy, Default)]
pub struct LogMeta<'a> {
    pub time_unix_nano: u64,
    pub observed_time_unix_nano: u64,
    pub trace_id: &'a [u8],
    pub span_id: &'a [u8],
}

/// An `AnyValue` as written.
#[derive(Debug, Clone, Copy)]
enum Any<'a> {
    Str(&'a str),
    Bool(bool),
    Int(i64),
    Double(f64),
}

impl Any<'_> {
    fn len(self) -> usize {
        match self {
            Any::Str(s) => key_len(ANY_STRING) + encoded_len_varint(s.len() as u64) + s.len(),
            Any::Bool(_) => key_len(ANY_BOOL) + 1,
            Any::Int(i) => key_len(ANY_INT) + encoded_len_varint(i as u64),
            Any::Double(_) => key_len(ANY_DOUBLE) + 8,
        }
    }

    fn write(self, out: &mut Vec<u8>) {
        match self {
            Any::Str(s) => {
                // A oneof member is written even when empty.
                length_delimited(ANY_STRING, s.len(), out);
                out.extend_from_slice(s.as_bytes());
            }
            Any::Bool(b) => {
                encode_key(ANY_BOOL, WireType::Varint, out);
                out.push(u8::from(b));
            }
            Any::Int(i) => {
                encode_key(ANY_INT, WireType::Varint, out);
                encode_varint(i as u64, out);
            }
            Any::Double(d) => {
                encode_key(ANY_DOUBLE, WireType::SixtyFourBit, out);
                out.extend_from_slice(&d.to_bits().to_le_bytes());
            }
        }
    }
}

/// A `KeyValue` as field `field` of its parent.
fn key_value(field: u32, key: &str, value: Any<'_>, out: &mut Vec<u8>) {
    let any = value.len();
    let body = string_len(KEY_VALUE_KEY, key)
        + key_len(KEY_VALUE_VALUE)
        + encoded_len_varint(any as u64)
        + any;
    length_delimited(field, body, out);
    string(KEY_VALUE_KEY, key, out);
    length_delimited(KEY_VALUE_VALUE, any, out);
    value.write(out);
}

/// A kept field's value as its attribute carries it: durations in seconds
/// (a double), timestamps and headers as text (rendered into `text`).
fn any_of<'v>(value: &'v AttrValue<'_>, text: &'v mut String) -> Any<'v> {
    match value {
        AttrValue::Str(s) => Any::Str(s),
        AttrValue::Int(i) => Any::Int(*i),
        AttrValue::Uint(u) => Any::Int(i64::try_from(*u).unwrap_or(i64::MAX)),
        AttrValue::Bool(b) => Any::Bool(*b),
        AttrValue::Duration(ns) => Any::Double(*ns as f64 / 1e9),
        other => {
            text.clear();
            other.render_into(text);
            Any::Str(text)
        }
    }
}

/// One project's kept records so far: one resource per namespace, so each
/// record goes out under its own namespace.
#[derive(Default)]
struct ProjectLogs {
    /// `ScopeLogs.log_records` fields, by the records' namespace.
    namespaces: BTreeMap<String, Vec<u8>>,
    count: u64,
}

/// Kept records of one request, by project.
#[derive(Default)]
pub(super) struct LogsOut {
    projects: BTreeMap<String, ProjectLogs>,
    /// One record's body while it is written.
    scratch: Vec<u8>,
    /// A value rendered as text.
    text: String,
}

impl LogsOut {
    /// Appends a kept record of `project` in `namespace` (which names its
    /// resource): its start time, `meta` and `fields`.
    pub(super) fn push<'r>(
        &mut self,
        project: &str,
        namespace: &str,
        start: u64,
        meta: &LogMeta<'_>,
        fields: impl Iterator<Item = (&'static str, &'r AttrValue<'r>)>,
    ) {
        let scratch = &mut self.scratch;
        scratch.clear();
        if start != 0 {
            encode_key(LOG_TIME, WireType::SixtyFourBit, scratch);
            scratch.extend_from_slice(&start.to_le_bytes());
        }
        for (key, value) in fields {
            key_value(LOG_ATTRIBUTES, key, any_of(value, &mut self.text), scratch);
        }
        for (field, bytes) in [(LOG_TRACE_ID, meta.trace_id), (LOG_SPAN_ID, meta.span_id)] {
            if !bytes.is_empty() {
                length_delimited(field, bytes.len(), scratch);
                scratch.extend_from_slice(bytes);
            }
        }
        if meta.observed_time_unix_nano != 0 {
            encode_key(LOG_OBSERVED_TIME, WireType::SixtyFourBit, scratch);
            scratch.extend_from_slice(&meta.observed_time_unix_nano.to_le_bytes());
        }
        if !self.projects.contains_key(project) {
            self.projects
                .insert(project.to_owned(), ProjectLogs::default());
        }
        let Some(p) = self.projects.get_mut(project) else {
            return;
        };
        if !p.namespaces.contains_key(namespace) {
            p.namespaces.insert(namespace.to_owned(), Vec::new());
        }
        if let Some(records) = p.namespaces.get_mut(namespace) {
            length_delimited(SCOPE_LOGS_LOG_RECORDS, scratch.len(), records);
            records.extend_from_slice(scratch);
            p.count += 1;
        }
    }

    /// Each project's `ExportLogsServiceRequest`, encoded, and its record
    /// count.
    pub(super) fn finish(self) -> BTreeMap<String, (Vec<u8>, u64)> {
        self.projects
            .into_iter()
            .map(|(project, logs)| {
                let request = request(&project, &logs);
                (project, (request, logs.count))
            })
            .collect()
    }
}

/// The request of one project's records: a `ResourceLogs` per namespace.
fn request(project: &str, logs: &ProjectLogs) -> Vec<u8> {
    let mut out = Vec::new();
    for (namespace, records) in &logs.namespaces {
        resource_logs(project, namespace, records, &mut out);
    }
    out
}

/// Appends one `ResourceLogs` (namespace and project as its resource) of
/// encoded `records` to `out`.
fn resource_logs(project: &str, namespace: &str, records: &[u8], out: &mut Vec<u8>) {
    let attributes = [(K8S_NAMESPACE, namespace), ("tally.project.name", project)];
    let mut resource = Vec::new();
    for (key, value) in attributes {
        key_value(RESOURCE_ATTRIBUTES, key, Any::Str(value), &mut resource);
    }
    let scope = string_len(SCOPE_NAME, super::SCOPE);
    let scope_logs =
        key_len(SCOPE_LOGS_SCOPE) + encoded_len_varint(scope as u64) + scope + records.len();
    let resource_logs = key_len(RESOURCE_LOGS_RESOURCE)
        + encoded_len_varint(resource.len() as u64)
        + resource.len()
        + key_len(RESOURCE_LOGS_SCOPE_LOGS)
        + encoded_len_varint(scope_logs as u64)
        + scope_logs;
    out.reserve(resource_logs + 16);
    length_delimited(REQUEST_RESOURCE_LOGS, resource_logs, out);
    length_delimited(RESOURCE_LOGS_RESOURCE, resource.len(), out);
    out.extend_from_slice(&resource);
    length_delimited(RESOURCE_LOGS_SCOPE_LOGS, scope_logs, out);
    length_delimited(SCOPE_LOGS_SCOPE, scope, out);
    string(SCOPE_NAME, super::SCOPE, out);
    out.extend_from_slice(records);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::otlp::string_attribute;
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{
        AnyValue, InstrumentationScope, KeyValue, any_value::Value,
    };
    use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use proptest::prelude::*;
    use prost::Message as _;
    use std::borrow::Cow;

    /// A kept record: its start time, metadata and fields.
    type Kept<'a> = (u64, LogMeta<'a>, Vec<(&'static str, AttrValue<'a>)>);

    /// The reference: the same request built as prost messages.
    fn reference(project: &str, namespace: &str, records: &[Kept<'_>]) -> Vec<u8> {
        let attribute = |key: &str, value: &AttrValue<'_>| {
            let value = match value {
                AttrValue::Str(s) => Value::StringValue(s.to_string()),
                AttrValue::Int(i) => Value::IntValue(*i),
                AttrValue::Uint(u) => Value::IntValue(i64::try_from(*u).unwrap_or(i64::MAX)),
                AttrValue::Bool(b) => Value::BoolValue(*b),
                AttrValue::Duration(ns) => Value::DoubleValue(*ns as f64 / 1e9),
                other => Value::StringValue(other.render()),
            };
            KeyValue {
                key: key.to_owned(),
                value: Some(AnyValue { value: Some(value) }),
                ..KeyValue::default()
            }
        };
        let log_records = records
            .iter()
            .map(|(start, meta, fields)| LogRecord {
                time_unix_nano: *start,
                observed_time_unix_nano: meta.observed_time_unix_nano,
                trace_id: meta.trace_id.to_vec(),
                span_id: meta.span_id.to_vec(),
                attributes: fields.iter().map(|(k, v)| attribute(k, v)).collect(),
                ..LogRecord::default()
            })
            .collect();
        ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(Resource {
                    attributes: vec![
                        string_attribute(K8S_NAMESPACE, namespace),
                        string_attribute("tally.project.name", project),
                    ],
                    ..Resource::default()
                }),
                scope_logs: vec![ScopeLogs {
                    scope: Some(InstrumentationScope {
                        name: super::super::SCOPE.into(),
                        ..InstrumentationScope::default()
                    }),
                    log_records,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
        .encode_to_vec()
    }

    fn value() -> impl Strategy<Value = AttrValue<'static>> {
        prop_oneof![
            "[a-z/é \"]{0,40}".prop_map(|s| AttrValue::Str(Cow::Owned(s))),
            any::<i64>().prop_map(AttrValue::Int),
            any::<u64>().prop_map(AttrValue::Uint),
            any::<bool>().prop_map(AttrValue::Bool),
            any::<i64>().prop_map(AttrValue::Duration),
            (0i64..4_000_000_000_000_000_000).prop_map(AttrValue::Timestamp),
            prop::collection::vec(("[a-z-]{1,8}", "[ -~]{0,8}"), 0..3).prop_map(|h| {
                AttrValue::Headers(
                    h.into_iter()
                        .map(|(k, v)| (Cow::Owned(k), Cow::Owned(v)))
                        .collect(),
                )
            }),
        ]
    }

    const KEYS: &[&str] = &["http.request.method", "url.path", "", "k"];

    proptest! {
        /// Any records, fields and metadata are written exactly as prost
        /// writes the same messages.
        #[test]
        fn writes_what_prost_writes(
            records in prop::collection::vec(
                (any::<u64>(), any::<u64>(), prop::collection::vec(any::<u8>(), 0..17),
                 prop::collection::vec(any::<u8>(), 0..9),
                 prop::collection::vec((0..KEYS.len(), value()), 0..12)),
                1..6),
        ) {
            let records: Vec<_> = records
                .iter()
                .map(|(start, observed, trace, span, fields)| {
                    let meta = LogMeta {
                        time_unix_nano: 0,
                        observed_time_unix_nano: *observed,
                        trace_id: trace,
                        span_id: span,
                    };
                    let fields: Vec<(&'static str, AttrValue<'_>)> =
                        fields.iter().map(|(k, v)| (KEYS[*k], v.clone())).collect();
                    (*start, meta, fields)
                })
                .collect();
            let mut out = LogsOut::default();
            for (start, meta, fields) in &records {
                out.push("p", "ns-1", *start, meta, fields.iter().map(|(k, v)| (*k, v)));
            }
            let mut requests = out.finish();
            let (bytes, count) = requests.remove("p").unwrap();
            prop_assert_eq!(count, records.len() as u64);
            prop_assert_eq!(bytes, reference("p", "ns-1", &records));
        }
    }

    #[test]
    fn each_project_gets_its_own_request() {
        let mut out = LogsOut::default();
        let code = AttrValue::Int(503);
        let meta = LogMeta::default();
        out.push(
            "a",
            "ns-a",
            1,
            &meta,
            [("http.response.status_code", &code)].into_iter(),
        );
        out.push("b", "ns-b", 2, &meta, std::iter::empty());
        out.push("a", "ns-a2", 3, &meta, std::iter::empty());
        out.push("a", "ns-a", 4, &meta, std::iter::empty());
        let requests = out.finish();
        assert_eq!(requests.len(), 2);
        let a = ExportLogsServiceRequest::decode(&requests["a"].0[..]).unwrap();
        assert_eq!(requests["a"].1, 3);
        // Each namespace is its own resource, with its own records in order.
        let by_namespace: Vec<(KeyValue, Vec<u64>)> = a
            .resource_logs
            .iter()
            .map(|r| {
                let namespace = r.resource.as_ref().unwrap().attributes[0].clone();
                let times = r.scope_logs[0].log_records.iter();
                (namespace, times.map(|l| l.time_unix_nano).collect())
            })
            .collect();
        assert_eq!(
            by_namespace,
            [
                (string_attribute(K8S_NAMESPACE, "ns-a"), vec![1, 4]),
                (string_attribute(K8S_NAMESPACE, "ns-a2"), vec![3]),
            ]
        );
    }
}
