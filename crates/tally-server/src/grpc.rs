//! The OTLP/gRPC metrics receiver:
//! `opentelemetry.proto.collector.metrics.v1.MetricsService/Export`, on its
//! own listener (`grpcListen`). It shares everything with `POST /v1/metrics`
//! but the transport: the bearer token in the `authorization` metadata
//! (same tokens, same `ingest`/`admin` scope), the ingest path
//! ([`telemetry::ingest`]) and the answer (a partial success for data
//! points no exporter may ever see). Per the OTLP specification, a request
//! to retry later is `UNAVAILABLE`, a bad token `UNAUTHENTICATED`, a token
//! without the scope `PERMISSION_DENIED`.

use std::future::Future;
use std::sync::Arc;

use axum::http::{Method, StatusCode};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};

use crate::auth::Authenticator;
use crate::telemetry::{self, NO_PIPELINE, Telemetry};

/// Answers `Export` calls.
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
        let bearer = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // The same rule as the HTTP route: `ingest` or `admin`.
        if let Err(problem) = self.auth.check(bearer, &Method::POST, "/v1/metrics") {
            return Err(if problem.status == StatusCode::UNAUTHORIZED.as_u16() {
                Status::unauthenticated(problem.detail)
            } else {
                Status::permission_denied(problem.detail)
            });
        }
        let Some(pipeline) = self.telemetry.pipeline.as_deref() else {
            return Err(Status::unimplemented(NO_PIPELINE));
        };
        match telemetry::ingest(pipeline, "otlp_grpc_metrics", request.get_ref(), 0) {
            Ok(report) => Ok(Response::new(ExportMetricsServiceResponse {
                partial_success: telemetry::partial_success(&report),
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
    let app = tonic::service::Routes::new(MetricsReceiver::service(telemetry, auth))
        .prepare()
        .into_axum_router();
    tally_http::Server::new(limits, crate::problem::body_timed_out)
        .with_stats(stats)
        .serve(listener, app, shutdown)
        .await;
}
