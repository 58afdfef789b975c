//! Access-log lines through the `TelemetryPolicy`s in force, to the
//! projects' `logs` exporters (and the metrics the policies ask for to
//! their `metrics` exporters), on the same path as `tally serve`'s
//! receivers: each line is read as an OTLP log record whose body is the
//! line ([`Pipeline::ingest_log_lines`], without building one).
//!
//! Byte layout of the batch: the lines' text (each `trim_end`ed) one after
//! another in one buffer, and the end offset of each in `ends`.
//!
//! The lines are those the meters read, one batch per poll (at most the
//! input's `max_read_bytes`), shown after the aggregator saw them; what a
//! policy keeps or drops never reaches the aggregator, so usage counts
//! every line whatever the policies say. Export is at least once: lines
//! read again after a crash (behind the last checkpoint) are exported
//! again, as a collector's re-read would be.

use std::sync::Arc;

use tally_telemetry::Pipeline;

/// One input's lines on their way to the policies.
pub(crate) struct PolicyFeed {
    pipeline: Arc<Pipeline>,
    /// The `source` component the shaping is counted in.
    source_id: String,
    /// The lines' text, back to back (reused from batch to batch).
    text: String,
    /// Where each line ends in `text`.
    ends: Vec<usize>,
}

impl PolicyFeed {
    pub(crate) fn new(pipeline: Arc<Pipeline>, input: &str) -> PolicyFeed {
        PolicyFeed {
            pipeline,
            source_id: format!("policy:{input}"),
            text: String::new(),
            ends: Vec::new(),
        }
    }

    /// Keeps `line` for the next [`PolicyFeed::flush`]; a line that is not
    /// UTF-8 is no access-log record (the meters count it as malformed).
    pub(crate) fn push(&mut self, line: &[u8]) {
        let Ok(text) = std::str::from_utf8(line) else {
            return;
        };
        self.text.push_str(text.trim_end());
        self.ends.push(self.text.len());
    }

    /// Hands the lines kept since the last flush to the policies.
    pub(crate) fn flush(&mut self) {
        if self.ends.is_empty() {
            return;
        }
        let text = &self.text;
        let lines = self.ends.iter().scan(0, |start, &end| {
            let line = text.get(*start..end).unwrap_or_default();
            *start = end;
            Some(line)
        });
        let report = self.pipeline.ingest_log_lines(lines);
        self.text.clear();
        self.ends.clear();
        self.pipeline.count_shaped(&self.source_id, &report);
        if report.dropped > 0 {
            tracing::debug!(input = %self.source_id, dropped = report.dropped,
                "exporters' sinks refused shaped records (counted by the sinks)");
        }
    }
}
