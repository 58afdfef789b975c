//! The one receiving path of access logs and spans, whatever the server
//! (`tally serve`, `tally collect`) and the transport (OTLP/HTTP, gRPC):
//! refuse while the pipeline is not ready, shape ([`Pipeline::ingest_logs`]
//! / [`Pipeline::ingest_traces`]), count what shaping did in the receiver's
//! `source` component, and answer records of no known project as an OTLP
//! partial success. Records a policy does not keep are accepted: they were
//! received; the policy chose not to export them.
//!
//! **Never** waits: shaping hands each sink its share without waiting.

use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest,
};

use crate::pipeline::Pipeline;

/// The pipeline has not had its first snapshot, or is shutting down: the
/// sender should retry (HTTP 503, gRPC `UNAVAILABLE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the exporters' pipeline is not running yet; retry")]
pub struct NotReady;

impl Pipeline {
    /// Receives access-log records for the policies, counted in `source_id`.
    pub fn receive_logs(
        &self,
        source_id: &str,
        request: &ExportLogsServiceRequest,
    ) -> Result<Option<ExportLogsPartialSuccess>, NotReady> {
        let unattributed = self.receive(source_id, |p| p.ingest_logs(request))?;
        Ok((unattributed > 0).then(|| ExportLogsPartialSuccess {
            rejected_log_records: i64::try_from(unattributed).unwrap_or(i64::MAX),
            error_message: unattributed_message(unattributed, "log record"),
        }))
    }

    /// Receives spans for the policies' head sampling, counted in
    /// `source_id`.
    pub fn receive_traces(
        &self,
        source_id: &str,
        request: &ExportTraceServiceRequest,
    ) -> Result<Option<ExportTracePartialSuccess>, NotReady> {
        let unattributed = self.receive(source_id, |p| p.ingest_traces(request))?;
        Ok((unattributed > 0).then(|| ExportTracePartialSuccess {
            rejected_spans: i64::try_from(unattributed).unwrap_or(i64::MAX),
            error_message: unattributed_message(unattributed, "span"),
        }))
    }

    /// Shapes, counts, and says how many records were of no known project.
    fn receive(
        &self,
        source_id: &str,
        ingest: impl FnOnce(&Pipeline) -> crate::ShapeReport,
    ) -> Result<u64, NotReady> {
        if !self.ready() {
            return Err(NotReady);
        }
        let report = ingest(self);
        self.count_shaped(source_id, &report);
        Ok(report.unattributed)
    }
}

fn unattributed_message(n: u64, what: &str) -> String {
    format!(
        "{n} {what}(s) refused: no route namespace Tally knows (`route_name` httproute/<namespace>/..., or `gateway.namespace`), or a `project_name` that is not the namespace's project"
    )
}
