//! Access-log lines through the `TelemetryPolicy`s in force, to the
//! projects' `logs` exporters (and the metrics the policies ask for to
//! their `metrics` exporters), on the same path as `tally serve`'s
//! receivers: each line becomes an OTLP log record whose body is the line,
//! handed to [`Pipeline::ingest_logs`].
//!
//! The lines are those the meters read, one batch per poll (at most the
//! input's `max_read_bytes`), shown after the aggregator saw them; what a
//! policy keeps or drops never reaches the aggregator, so usage counts
//! every line whatever the policies say. Export is at least once: lines
//! read again after a crash (behind the last checkpoint) are exported
//! again, as a collector's re-read would be.

use std::sync::Arc;

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value::Value as Any};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use tally_telemetry::Pipeline;

/// One input's lines on their way to the policies.
pub(crate) struct PolicyFeed {
    pipeline: Arc<Pipeline>,
    /// The `source` component the shaping is counted in.
    source_id: String,
    records: Vec<LogRecord>,
}

impl PolicyFeed {
    pub(crate) fn new(pipeline: Arc<Pipeline>, input: &str) -> PolicyFeed {
        PolicyFeed {
            pipeline,
            source_id: format!("policy:{input}"),
            records: Vec::new(),
        }
    }

    /// Keeps `line` for the next [`PolicyFeed::flush`]; a line that is not
    /// UTF-8 is no access-log record (the meters count it as malformed).
    pub(crate) fn push(&mut self, line: &[u8]) {
        let Ok(text) = std::str::from_utf8(line) else {
            return;
        };
        self.records.push(LogRecord {
            body: Some(AnyValue {
                value: Some(Any::StringValue(text.trim_end().to_owned())),
            }),
            ..LogRecord::default()
        });
    }

    /// Hands the lines kept since the last flush to the policies.
    pub(crate) fn flush(&mut self) {
        if self.records.is_empty() {
            return;
        }
        let request = ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                scope_logs: vec![ScopeLogs {
                    log_records: std::mem::take(&mut self.records),
                    ..ScopeLogs::default()
                }],
                ..ResourceLogs::default()
            }],
        };
        let report = self.pipeline.ingest_logs(&request);
        self.pipeline.count_shaped(&self.source_id, &report);
        if report.dropped > 0 {
            tracing::debug!(input = %self.source_id, dropped = report.dropped,
                "exporters' sinks refused shaped records (counted by the sinks)");
        }
    }
}
