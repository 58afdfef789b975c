//! The OTLP traces receivers of `tally collect`: HTTP `POST /v1/traces`
//! (protobuf or JSON, gzip) and gRPC `TraceService/Export`, on the OTLP
//! listeners (`--otlp`), under the logs receivers' bounds (16 MiB decoded,
//! the HTTP listener's limits).
//!
//! Spans feed no meter, so they take no spool: each request goes straight
//! through the `TelemetryPolicy` in force on its gateway — head sampling by
//! trace id, span attributes — to its project's `traces` exporters, by
//! [`Pipeline::receive_traces`], the path `tally serve`'s receivers take
//! too. The exporters' sinks queue on disk under `state_dir`. Without
//! `--resources` there is no pipeline: HTTP answers 404, gRPC
//! `UNIMPLEMENTED`. Before the first resources are loaded, or while
//! stopping: 503 with `Retry-After` / `UNAVAILABLE`.
//!
//! Errors past the media type are OTLP `google.rpc.Status` bodies in the
//! request's encoding; an unsupported media type is
//! `application/problem+json`.
//!
//! **Never** shapes on the async workers: decoding and shaping run on the
//! blocking pool.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message as _;
use tally_telemetry::otlp::{self, JSON_CONTENT_TYPE, PROTOBUF_CONTENT_TYPE};
use tally_telemetry::{Encoding, Pipeline};
use tonic::codec::CompressionEncoding;
use tonic::{Request, Status};

use super::HttpState;
use super::connections::problem;
use super::spool::{MAX_BODY_BYTES, decode_body, media_type};

/// Why there is nowhere to send spans.
const NO_PIPELINE: &str =
    "no exporters on this agent: start tally collect with --resources DIR to receive spans";

/// The `source` component spans received over HTTP are counted in.
const HTTP_SOURCE: &str = "otlp_http_traces";
/// The `source` component spans received over gRPC are counted in.
const GRPC_SOURCE: &str = "otlp_grpc_traces";

/// `POST /v1/traces`.
pub(crate) async fn receive_traces(
    State(state): State<HttpState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let media_type = media_type(&headers);
    let encoding = match otlp::encoding_of_content_type(&media_type) {
        Ok(encoding) => encoding,
        Err(e) => return problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, e.to_string(), None),
    };
    let Some(pipeline) = state.traces.clone() else {
        return status(encoding, StatusCode::NOT_FOUND, NO_PIPELINE);
    };
    let outcome = tokio::task::spawn_blocking(move || {
        let raw = decode_body(&headers, body, MAX_BODY_BYTES)
            .map_err(|message| (StatusCode::BAD_REQUEST, message))?;
        let request: ExportTraceServiceRequest = otlp::decode_request(&raw, encoding)
            .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
        pipeline
            .receive_traces(HTTP_SOURCE, &request)
            .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
    })
    .await;
    match outcome {
        Ok(Ok(partial_success)) => {
            answer(encoding, &ExportTraceServiceResponse { partial_success })
        }
        Ok(Err((code, message))) => status(encoding, code, &message),
        Err(e) => status(
            encoding,
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("receiving spans: {e}"),
        ),
    }
}

fn answer(encoding: Encoding, response: &ExportTraceServiceResponse) -> Response {
    let (content_type, body) = match encoding {
        Encoding::Protobuf => (PROTOBUF_CONTENT_TYPE, response.encode_to_vec()),
        Encoding::Json => match serde_json::to_vec(response) {
            Ok(body) => (JSON_CONTENT_TYPE, body),
            Err(e) => {
                return status(
                    encoding,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("answer: {e}"),
                );
            }
        },
    };
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response()
}

/// An OTLP error answer: a `google.rpc.Status` in the request's encoding;
/// a 503 says when to retry.
fn status(encoding: Encoding, code: StatusCode, message: &str) -> Response {
    let content_type = match encoding {
        Encoding::Protobuf => PROTOBUF_CONTENT_TYPE,
        Encoding::Json => JSON_CONTENT_TYPE,
    };
    let body = otlp::encode_error_status(encoding, code.as_u16(), message);
    let mut response = (
        code,
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response();
    if code == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// Answers `TraceService/Export` calls.
pub(crate) struct TracesReceiver {
    pipeline: Option<Arc<Pipeline>>,
}

impl TracesReceiver {
    /// The tonic service, accepting gzip and messages up to the HTTP
    /// receiver's body limit.
    pub(crate) fn service(pipeline: Option<Arc<Pipeline>>) -> TraceServiceServer<TracesReceiver> {
        let limit = usize::try_from(MAX_BODY_BYTES).unwrap_or(usize::MAX);
        TraceServiceServer::new(TracesReceiver { pipeline })
            .accept_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(limit)
    }
}

#[tonic::async_trait]
impl TraceService for TracesReceiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, Status> {
        let pipeline = self
            .pipeline
            .clone()
            .ok_or_else(|| Status::unimplemented(NO_PIPELINE))?;
        let request = request.into_inner();
        let outcome =
            tokio::task::spawn_blocking(move || pipeline.receive_traces(GRPC_SOURCE, &request))
                .await
                .map_err(|e| Status::internal(format!("receiving spans: {e}")))?;
        match outcome {
            Ok(partial_success) => Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success,
            })),
            // UNAVAILABLE is retryable per the OTLP specification.
            Err(not_ready) => Err(Status::unavailable(not_ready.to_string())),
        }
    }
}
