//! The OTLP/gRPC receivers:
//! `opentelemetry.proto.collector.metrics.v1.MetricsService/Export`,
//! `...logs.v1.LogsService/Export` and `...trace.v1.TraceService/Export`, on
//! their own listener (`grpcListen`). Each shares everything with its HTTP
//! route (`/v1/metrics`, `/v1/logs`, `/v1/traces`) but the transport: the bearer token in the `authorization` metadata
//! (same tokens, same `ingest`/`admin` scope), the ingest path
//! ([`telemetry::ingest`]) and the answer (a partial success for data
//! points no exporter may ever see). Per the OTLP specification, a request
//! to retry later is `UNAVAILABLE`, a bad token `UNAUTHENTICATED`, a token
//! without the scope `PERMISSION_DENIED`.

use std::future::Future;
use std::sync::Arc;

use axum::http::{Method, StatusCode};
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};

use crate::auth::Authenticator;
use crate::signals;
use crate::telemetry::{self, NO_PIPELINE, Telemetry};

/// Answers `Export` calls of the three services.
pub(crate) struct MetricsReceiver {
    telemetry: Telemetry,
    auth: Arc<Authenticator>,
}

impl MetricsReceiver {
    /// The tonic service, accepting gzip and messages up to the HTTP
    /// receivers' body limit.
    fn service(telemetry: Telemetry, auth: Arc<Authenticator>) -> MetricsServiceServer<Self> {
        let limit = telemetry.max_body_bytes;
        MetricsServiceServer::new(MetricsReceiver { telemetry, auth })
            .accept_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(limit)
    }
}

#[tonic::async_trait]
impl MetricsService for MetricsReceiver {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        self.authorize(request.metadata(), "/v1/metrics")?;
        let pipeline = self.telemetry.pipeline.as_deref();
        if pipeline.is_none() && self.telemetry.usage.is_none() {
            return Err(Status::unimplemented(NO_PIPELINE));
        }
        match telemetry::ingest(
            pipeline,
            self.telemetry.usage.as_deref(),
            "otlp_grpc_metrics",
            request.get_ref(),
            0,
        ) {
            Ok(report) => Ok(Response::new(ExportMetricsServiceResponse {
                partial_success: telemetry::partial_success(&report),
            })),
            Err(unavailable) => Err(Status::unavailable(unavailable.message())),
        }
    }
}

impl MetricsReceiver {
    /// The pipeline, if the caller may use `route` (the HTTP route's rule:
    /// `ingest` or `admin`).
    fn admit(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        route: &str,
    ) -> Result<&tally_telemetry::Pipeline, Status> {
        self.authorize(metadata, route)?;
        self.telemetry
            .pipeline
            .as_deref()
            .ok_or_else(|| Status::unimplemented(NO_PIPELINE))
    }

    /// Whether the caller may use `route` (the HTTP route's rule).
    fn authorize(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        route: &str,
    ) -> Result<(), Status> {
        let bearer = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if let Err(problem) = self.auth.check(bearer, &Method::POST, route) {
            return Err(if problem.status == StatusCode::UNAUTHORIZED.as_u16() {
                Status::unauthenticated(problem.detail)
            } else {
                Status::permission_denied(problem.detail)
            });
        }
        Ok(())
    }
}

/// The gRPC status of an HTTP problem, as the OTLP specification maps
/// them: what may be retried (429, 503) is `UNAVAILABLE`.
fn status_of(problem: &crate::problem::Problem) -> Status {
    match problem.status {
        429 | 503 => Status::unavailable(problem.detail.clone()),
        404 => Status::unimplemented(problem.detail.clone()),
        400 | 413 => Status::invalid_argument(problem.detail.clone()),
        _ => Status::internal(problem.detail.clone()),
    }
}

#[tonic::async_trait]
impl LogsService for MetricsReceiver {
    async fn export(
        &self,
        request: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        self.authorize(request.metadata(), "/v1/logs")?;
        match signals::receive_logs(&self.telemetry, "otlp_grpc_logs", request.into_inner()).await {
            Ok(partial_success) => Ok(Response::new(ExportLogsServiceResponse { partial_success })),
            Err(problem) => Err(status_of(&problem)),
        }
    }
}

#[tonic::async_trait]
impl TraceService for MetricsReceiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let pipeline = self.admit(request.metadata(), "/v1/traces")?;
        match signals::ingest_traces(pipeline, "otlp_grpc_traces", request.get_ref()) {
            Ok(partial_success) => Ok(Response::new(ExportTraceServiceResponse {
                partial_success,
            })),
            Err(unavailable) => Err(Status::unavailable(unavailable.message())),
        }
    }
}

/// Serves `MetricsService/Export` on `listener` under `limits` (gRPC is
/// HTTP/2: the same timeouts and connection limit as the HTTP listener),
/// counting into `stats`, until `shutdown` completes.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    telemetry: Telemetry,
    auth: Arc<Authenticator>,
    limits: tally_http::Limits,
    stats: tally_http::ConnectionStats,
    shutdown: impl Future<Output = ()> + Send,
) {
    let limit = telemetry.max_body_bytes;
    let receiver = || MetricsReceiver {
        telemetry: telemetry.clone(),
        auth: Arc::clone(&auth),
    };
    let logs = LogsServiceServer::new(receiver())
        .accept_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(limit);
    let traces = TraceServiceServer::new(receiver())
        .accept_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(limit);
    let app = tonic::service::Routes::new(MetricsReceiver::service(telemetry, auth))
        .add_service(logs)
        .add_service(traces)
        .prepare()
        .into_axum_router();
    tally_http::Server::new(limits, crate::problem::body_timed_out)
        .with_stats(stats)
        .serve(listener, app, shutdown)
        .await;
}
