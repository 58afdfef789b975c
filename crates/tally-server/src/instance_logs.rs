//! Instance logs arriving over OTLP (`/v1/logs`, `LogsService/Export`):
//! the stdout and stderr of compute instances, told apart from gateway
//! access logs by their resource.
//!
//! A `ResourceLogs` whose resource has an `instance` attribute is instance
//! logs; every other one goes on to the access-log path unchanged. Of an
//! instance's resource Tally reads (the keys of `docs/compute-logging.md`):
//!
//! | attribute | where | meaning |
//! |---|---|---|
//! | `project` | resource | the owning project (required) |
//! | `instance` | resource | the instance's name (required) |
//! | `workload` | resource | the owning workload (a label) |
//! | `log.iostream` | record, else resource | `stdout` (default) or `stderr` |
//! | `log.record.uid` | record | the record id Tally dedupes by |
//!
//! The line is the record's body (a string as is; another value as JSON);
//! its time is `timeUnixNano`, else `observedTimeUnixNano`, else arrival.
//! A record whose project or instance is missing or not a Kubernetes name
//! (at most 253 of `[a-z0-9.-]`) is rejected (partial success).
//!
//! Once stored, each project's instance logs go, as received, to the
//! `logs` sinks of its exporters ([`export`]), like its access logs.
//!
//! The answer waits until the records are durable
//! ([`tally_logstore::LogStore::append`]). A project over its ingest limit,
//! or an instance over its share of the writer's queue, is answered 429 +
//! `Retry-After` and nothing of the request is taken, so the sender retries
//! it whole.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::http::StatusCode;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::ResourceLogs;
use tally_compute::lifecycle::is_name;
use tally_logstore::limits::ProjectLimiter;
use tally_logstore::{AppendReport, LogError, LogRecord, LogStore, Stream};

use crate::problem::Problem;

/// The log store and what bounds writes and follows to it.
#[derive(Clone)]
pub struct InstanceLogs {
    pub store: Arc<dyn LogStore>,
    pub limiter: Arc<ProjectLimiter>,
    /// Followers (`follow=true`, Loki tail) at once.
    pub followers: Arc<tokio::sync::Semaphore>,
}

/// Most followers at once, store-wide, by default.
pub const DEFAULT_MAX_FOLLOWERS: usize = 256;

impl InstanceLogs {
    pub fn new(store: Arc<dyn LogStore>, limiter: ProjectLimiter) -> InstanceLogs {
        InstanceLogs {
            store,
            limiter: Arc::new(limiter),
            followers: Arc::new(tokio::sync::Semaphore::new(DEFAULT_MAX_FOLLOWERS)),
        }
    }
}

/// A logs request split in two.
#[derive(Debug, Default)]
pub(crate) struct Split {
    /// The instance logs, in request order.
    pub records: Vec<LogRecord>,
    /// Instance log records refused (no valid project or instance).
    pub rejected: u64,
    /// What is not instance logs: the access-log path's.
    pub rest: ExportLogsServiceRequest,
    /// The instance logs as received, per project: what the project's
    /// `logs` exporters are handed once they are stored.
    pub exports: std::collections::BTreeMap<String, (ExportLogsServiceRequest, u64)>,
}

pub(crate) fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| match v.value.as_ref() {
            Some(any_value::Value::StringValue(s)) => Some(s.as_str()),
            _ => None,
        })
}

fn line_of(body: Option<&AnyValue>) -> String {
    match body.and_then(|b| b.value.as_ref()) {
        None => String::new(),
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BytesValue(b)) => String::from_utf8_lossy(b).into_owned(),
        Some(other) => serde_json::to_string(other).unwrap_or_default(),
    }
}

/// Splits `request` into instance logs and the rest.
pub(crate) fn split(request: ExportLogsServiceRequest, now_nanos: i64) -> Split {
    let mut out = Split::default();
    for resource_logs in request.resource_logs {
        let attributes = resource_logs
            .resource
            .as_ref()
            .map_or(&[][..], |r| &r.attributes[..]);
        let Some(instance) = attr(attributes, "instance") else {
            out.rest.resource_logs.push(resource_logs);
            continue;
        };
        let project = attr(attributes, "project").unwrap_or("");
        let count = || -> u64 {
            resource_logs
                .scope_logs
                .iter()
                .map(|s| s.log_records.len() as u64)
                .sum()
        };
        if !is_name(project) || !is_name(instance) {
            out.rejected += count();
            continue;
        }
        let workload = attr(attributes, "workload").filter(|w| is_name(w));
        let resource_stream = attr(attributes, "log.iostream");
        let before = out.records.len();
        push_records(
            &mut out,
            &resource_logs,
            project,
            instance,
            workload,
            resource_stream,
            now_nanos,
        );
        let added = (out.records.len() - before) as u64;
        let export = out.exports.entry(project.to_owned()).or_default();
        export.0.resource_logs.push(resource_logs);
        export.1 += added;
    }
    out
}

/// Hands stored instance logs to the `logs` sinks of each project's
/// exporters (the access-log path's sinks: one mechanism), without
/// waiting; a full sink drops and counts them, as for access logs.
pub(crate) fn export(
    pipeline: &tally_telemetry::Pipeline,
    exports: std::collections::BTreeMap<String, (ExportLogsServiceRequest, u64)>,
) {
    use prost::Message as _;
    for (project, (request, records)) in exports {
        let bytes = bytes::Bytes::from(request.encode_to_vec());
        pipeline.ingest_signal(&project, tally_telemetry::Signal::Logs, bytes, records);
    }
}

fn push_records(
    out: &mut Split,
    resource_logs: &ResourceLogs,
    project: &str,
    instance: &str,
    workload: Option<&str>,
    resource_stream: Option<&str>,
    now_nanos: i64,
) {
    for scope in &resource_logs.scope_logs {
        for r in &scope.log_records {
            let stream = attr(&r.attributes, "log.iostream")
                .or(resource_stream)
                .and_then(Stream::parse)
                .unwrap_or(Stream::Stdout);
            let time = [r.time_unix_nano, r.observed_time_unix_nano]
                .into_iter()
                .find(|t| *t > 0)
                .map_or(now_nanos, |t| i64::try_from(t).unwrap_or(i64::MAX));
            out.records.push(LogRecord {
                project: project.to_owned(),
                instance: instance.to_owned(),
                workload: workload.map(str::to_owned),
                stream,
                time_nanos: time,
                id: attr(&r.attributes, "log.record.uid").map(str::to_owned),
                line: line_of(r.body.as_ref()),
            });
        }
    }
}

/// Stores `records` once the projects' ingest limits allow, answering when
/// they are durable.
pub(crate) async fn store(
    logs: &InstanceLogs,
    records: Vec<LogRecord>,
) -> Result<AppendReport, Problem> {
    if records.is_empty() {
        return Ok(AppendReport::default());
    }
    let mut wanted: HashMap<&str, u64> = HashMap::new();
    for r in &records {
        *wanted.entry(r.project.as_str()).or_default() += r.line.len() as u64 + 32;
    }
    if let Err(wait) = logs.limiter.take(&wanted, Instant::now()) {
        return Err(Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "a project of this request is over its instance-log ingest limit; nothing was taken, retry after Retry-After",
        )
        .with_retry_after(wait.as_secs().max(1)));
    }
    let ticket = logs.store.append(records).map_err(problem)?;
    ticket
        .await
        .map_err(|_| problem(LogError::Stopped))?
        .map_err(problem)
}

/// The answer to a log store error.
pub(crate) fn problem(e: LogError) -> Problem {
    match e {
        LogError::Busy { retry_after, .. } => {
            Problem::new(StatusCode::TOO_MANY_REQUESTS, e.to_string())
                .with_retry_after(retry_after.as_secs().max(1))
        }
        LogError::Invalid(_) => Problem::bad_request(e.to_string()),
        LogError::Stopped | LogError::Unavailable(_) => {
            Problem::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).with_retry_after(1)
        }
        LogError::Store { .. } | LogError::Corrupt { .. } => {
            tracing::error!(error = %e, "the instance log store failed");
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the instance log store failed; it has been logged",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::logs::v1::{LogRecord as OtlpRecord, ScopeLogs};
    use opentelemetry_proto::tonic::resource::v1::Resource;

    fn kv(k: &str, v: &str) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(v.into())),
            }),
            ..KeyValue::default()
        }
    }

    fn resource(attrs: Vec<KeyValue>, records: Vec<OtlpRecord>) -> ResourceLogs {
        ResourceLogs {
            resource: Some(Resource {
                attributes: attrs,
                ..Resource::default()
            }),
            scope_logs: vec![ScopeLogs {
                log_records: records,
                ..ScopeLogs::default()
            }],
            ..ResourceLogs::default()
        }
    }

    fn record(body: &str, attrs: Vec<KeyValue>, t: u64) -> OtlpRecord {
        OtlpRecord {
            time_unix_nano: t,
            body: Some(AnyValue {
                value: Some(any_value::Value::StringValue(body.into())),
            }),
            attributes: attrs,
            ..OtlpRecord::default()
        }
    }

    #[test]
    fn instance_resources_are_taken_the_rest_passes_on() {
        let request = ExportLogsServiceRequest {
            resource_logs: vec![
                resource(
                    vec![
                        kv("project", "acme"),
                        kv("instance", "web-0"),
                        kv("workload", "web"),
                    ],
                    vec![
                        record("hello", vec![], 5),
                        record(
                            "boom\n at x",
                            vec![kv("log.iostream", "stderr"), kv("log.record.uid", "u1")],
                            0,
                        ),
                    ],
                ),
                resource(
                    vec![kv("route_name", "httproute/ns/r/rule/0")],
                    vec![record("GET /", vec![], 1)],
                ),
                resource(
                    vec![kv("instance", "web-1")],
                    vec![record("no project", vec![], 1)],
                ),
                resource(
                    vec![kv("project", "Acme"), kv("instance", "web-1")],
                    vec![record("bad name", vec![], 1)],
                ),
            ],
        };
        let split = split(request, 99);
        assert_eq!(split.rest.resource_logs.len(), 1);
        assert_eq!(split.rejected, 2);
        assert_eq!(split.records.len(), 2);
        let (a, b) = (&split.records[0], &split.records[1]);
        assert_eq!(
            (
                a.project.as_str(),
                a.instance.as_str(),
                a.workload.as_deref()
            ),
            ("acme", "web-0", Some("web"))
        );
        assert_eq!(
            (a.stream, a.time_nanos, a.id.as_deref()),
            (Stream::Stdout, 5, None)
        );
        assert_eq!(
            (b.stream, b.time_nanos, b.id.as_deref()),
            (Stream::Stderr, 99, Some("u1"))
        );
        assert_eq!(b.line, "boom\n at x");
    }
}
