//! The OTLP/gRPC logs receiver: `opentelemetry.proto.collector.logs.v1.
//! LogsService/Export`, the only transport of Envoy Gateway's OpenTelemetry
//! access-log sink. Records take the same path as OTLP/HTTP ([`store`]).

use std::sync::Arc;

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};

use super::otlp::store;
use super::spool::{MAX_BODY_BYTES, Spool, Unavailable};

/// Answers `Export` calls from the spool.
pub(crate) struct LogsReceiver {
    spool: Arc<Spool>,
}

impl LogsReceiver {
    /// The tonic service, accepting gzip and messages up to the HTTP
    /// receiver's body limit.
    pub(crate) fn service(spool: Arc<Spool>) -> LogsServiceServer<LogsReceiver> {
        let limit = usize::try_from(MAX_BODY_BYTES).unwrap_or(usize::MAX);
        LogsServiceServer::new(LogsReceiver { spool })
            .accept_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(limit)
    }
}

#[tonic::async_trait]
impl LogsService for LogsReceiver {
    async fn export(
        &self,
        request: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        match store(&self.spool, request.get_ref()).await {
            Ok(response) => Ok(Response::new(response)),
            // UNAVAILABLE is retryable per the OTLP specification.
            Err(Unavailable(message)) => Err(Status::unavailable(message)),
        }
    }
}
