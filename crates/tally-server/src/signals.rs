//! Access-log, instance-log and span receivers: OTLP/HTTP `POST /v1/logs` and
//! `POST /v1/traces` (protobuf or JSON, gzip or zstd) and OTLP/gRPC
//! `LogsService/Export` and `TraceService/Export` ([`crate::grpc`]), all
//! through [`ingest_logs`] / [`ingest_traces`]: each record or span goes
//! through the `TelemetryPolicy` in force on its gateway
//! ([`tally_telemetry::shaping`]) to its own project's `logs`/`traces`
//! exporters; the metrics the policies ask for go to the router. Instance
//! logs (a resource with an `instance` attribute) are split off first and
//! stored ([`crate::instance_logs`]) before the answer.
//!
//! They need the `ingest` or `admin` scope, like the metrics receivers, and
//! answer `404` without a pipeline. Records of no known project are
//! answered as a partial success (rejected); records a policy does not
//! keep are accepted (they were received; the policy chose not to export
//! them). Usage metering never sees these receivers: billing is fed by the
//! ledger, so no policy can filter it.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tally_telemetry::otlp::{self, JSON_CONTENT_TYPE, PROTOBUF_CONTENT_TYPE};
use tally_telemetry::{Encoding, NotReady, Pipeline};

use crate::body;
use crate::instance_logs;
use crate::problem::Problem;
use crate::telemetry::{NO_PIPELINE, Telemetry, Unavailable};

/// The one path of every access-log receiver
/// ([`Pipeline::receive_logs`], shared with `tally collect`).
pub(crate) fn ingest_logs(
    pipeline: &Pipeline,
    source_id: &str,
    request: &ExportLogsServiceRequest,
) -> Result<Option<ExportLogsPartialSuccess>, Unavailable> {
    pipeline
        .receive_logs(source_id, request)
        .map_err(|NotReady| Unavailable::NotReady)
}

/// The one path of every span receiver ([`Pipeline::receive_traces`],
/// shared with `tally collect`).
pub(crate) fn ingest_traces(
    pipeline: &Pipeline,
    source_id: &str,
    request: &ExportTraceServiceRequest,
) -> Result<Option<ExportTracePartialSuccess>, Unavailable> {
    pipeline
        .receive_traces(source_id, request)
        .map_err(|NotReady| Unavailable::NotReady)
}

/// Receive OTLP access logs.
///
/// The OTLP/HTTP logs receiver: an `ExportLogsServiceRequest` (protobuf
/// or JSON). Records of a resource with an `instance` attribute are
/// instance stdout/stderr, stored for `GET .../instances/{instance}/logs`
/// before the answer (429 + `Retry-After` over a project's ingest limit);
/// the rest are gateway access logs: each goes through the
/// `TelemetryPolicy` in force on its gateway to its project's `logs`
/// exporters.
#[utoipa::path(
    post, path = "/v1/logs", tag = "telemetry",
    request_body(description = "OTLP ExportLogsServiceRequest",
        content((String = "application/x-protobuf"), (Object = "application/json"))),
    responses(
        (status = 200, description = "Accepted (see `partialSuccess` for refused records)",
            content((String = "application/x-protobuf"), (Object = "application/json"))),
        (status = 400, description = "Not an OTLP logs request: a `google.rpc.Status`",
            content((String = "application/x-protobuf"), (Object = "application/json"))),
        (status = 404, description = "No telemetry pipeline on this server: a `google.rpc.Status`",
            content((String = "application/x-protobuf"), (Object = "application/json"))),
        (status = 415, description = "Unsupported Content-Type", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "A project is over its instance-log ingest limit; nothing was taken, retry after `Retry-After`: a `google.rpc.Status`",
            content((String = "application/x-protobuf"), (Object = "application/json"))),
        (status = 503, description = "Not running yet; retry after `Retry-After`: a `google.rpc.Status`",
            content((String = "application/x-protobuf"), (Object = "application/json"))),
    ),
    security(("bearer" = []))
)]
pub async fn otlp_logs(
    State(state): State<Telemetry>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    let media_type = body::media_type(&headers);
    let encoding = otlp::encoding_of_content_type(&media_type)
        .map_err(|e| Problem::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, e.to_string()))?;
    let outcome = async {
        let limit = state.max_body_bytes;
        let request: ExportLogsServiceRequest =
            body::decoded_off_workers(headers, body, limit, move |_, raw| {
                otlp::decode_request(&raw, encoding)
                    .map_err(|e| Problem::bad_request(e.to_string()))
            })
            .await?;
        let partial_success = receive_logs(&state, "otlp_http_logs", request).await?;
        answer(encoding, &ExportLogsServiceResponse { partial_success })
    }
    .await;
    Ok(outcome.unwrap_or_else(|problem| crate::telemetry::otlp_error(encoding, &problem)))
}

/// The one path of every logs receiver: instance logs to the log store
/// (answered once durable), the rest to the access-log path.
pub(crate) async fn receive_logs(
    state: &Telemetry,
    source_id: &str,
    request: ExportLogsServiceRequest,
) -> Result<Option<ExportLogsPartialSuccess>, Problem> {
    let now = jiff::Timestamp::now().as_nanosecond();
    let now = i64::try_from(now).unwrap_or(i64::MAX);
    let split = instance_logs::split(request, now);
    let pipeline = match (&state.pipeline, split.rest.resource_logs.is_empty()) {
        (Some(p), true) => Some(p).filter(|p| p.ready()),
        (None, true) => None,
        (Some(p), false) if !p.ready() => return Err(Unavailable::NotReady.into()),
        (Some(p), false) => Some(p),
        (None, false) => return Err(Problem::new(StatusCode::NOT_FOUND, NO_PIPELINE)),
    };
    let mut rejected = split.rejected;
    let mut messages = Vec::new();
    if split.rejected > 0 {
        messages.push(format!(
            "{} instance log record(s) refused: their resource needs `project` and `instance` attributes that are Kubernetes names",
            split.rejected
        ));
    }
    if !split.records.is_empty() {
        match &state.logs {
            Some(logs) => {
                instance_logs::store(logs, split.records).await?;
                if let Some(pipeline) = pipeline {
                    instance_logs::export(pipeline, split.exports);
                }
            }
            None => {
                rejected += split.records.len() as u64;
                messages.push(format!(
                    "{} instance log record(s) refused: this server keeps no instance logs",
                    split.records.len()
                ));
            }
        }
    }
    if let Some(pipeline) = pipeline.filter(|_| !split.rest.resource_logs.is_empty())
        && let Some(partial) = ingest_logs(pipeline, source_id, &split.rest)?
    {
        rejected += u64::try_from(partial.rejected_log_records).unwrap_or(0);
        messages.push(partial.error_message);
    }
    Ok((rejected > 0).then(|| ExportLogsPartialSuccess {
        rejected_log_records: i64::try_from(rejected).unwrap_or(i64::MAX),
        error_message: messages.join("; "),
    }))
}

/// Receive OTLP spans.
///
/// The OTLP/HTTP traces receiver: an `ExportTraceServiceRequest` (protobuf
/// or JSON). Spans are head-sampled by trace id at the rate of the
/// `TelemetryPolicy` in force on their gateway and go to their project's
/// `traces` exporters.
#[utoipa::path(
    post, path = "/v1/traces", tag = "telemetry",
    request_body(description = "OTLP ExportTraceServiceRequest",
        content((String = "application/x-protobuf"), (Object = "application/json"))),
    responses(
        (status = 200, description = "Accepted (see `partialSuccess` for refused spans)",
            content((String = "application/x-protobuf"), (Object = "application/json"))),
        (status = 400, description = "Not an OTLP traces request: a `google.rpc.Status`",
            content((String = "application/x-protobuf"), (Object = "application/json"))),
        (status = 404, description = "No telemetry pipeline on this server: a `google.rpc.Status`",
            content((String = "application/x-protobuf"), (Object = "application/json"))),
        (status = 415, description = "Unsupported Content-Type", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Not running yet; retry after `Retry-After`: a `google.rpc.Status`",
            content((String = "application/x-protobuf"), (Object = "application/json"))),
    ),
    security(("bearer" = []))
)]
pub async fn otlp_traces(
    State(state): State<Telemetry>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    receive(state, headers, body, |pipeline, raw, encoding| {
        let request: ExportTraceServiceRequest =
            otlp::decode_request(raw, encoding).map_err(|e| Problem::bad_request(e.to_string()))?;
        let partial_success = ingest_traces(pipeline, "otlp_http_traces", &request)?;
        answer(encoding, &ExportTraceServiceResponse { partial_success })
    })
    .await
}

fn answer<M: prost::Message + serde::Serialize>(
    encoding: Encoding,
    message: &M,
) -> Result<Response, Problem> {
    let (content_type, body) = match encoding {
        Encoding::Protobuf => (PROTOBUF_CONTENT_TYPE, message.encode_to_vec()),
        Encoding::Json => (
            JSON_CONTENT_TYPE,
            serde_json::to_vec(message).map_err(|e| {
                Problem::new(StatusCode::INTERNAL_SERVER_ERROR, format!("answer: {e}"))
            })?,
        ),
    };
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response())
}

/// Decodes the body off the async workers and hands it to `handle`;
/// errors past the media type are OTLP `google.rpc.Status` answers.
async fn receive(
    state: Telemetry,
    headers: HeaderMap,
    body: Bytes,
    handle: impl FnOnce(&Pipeline, &[u8], Encoding) -> Result<Response, Problem> + Send + 'static,
) -> Result<Response, Problem> {
    let media_type = body::media_type(&headers);
    let encoding = otlp::encoding_of_content_type(&media_type)
        .map_err(|e| Problem::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, e.to_string()))?;
    let outcome = async {
        let pipeline = state
            .pipeline
            .clone()
            .ok_or_else(|| Problem::new(StatusCode::NOT_FOUND, NO_PIPELINE))?;
        let limit = state.max_body_bytes;
        body::decoded_off_workers(headers, body, limit, move |_, raw| {
            handle(&pipeline, &raw, encoding)
        })
        .await
    }
    .await;
    Ok(outcome.unwrap_or_else(|problem| crate::telemetry::otlp_error(encoding, &problem)))
}
