//! Metrics receivers feeding the exporters' pipeline: OTLP/HTTP
//! `POST /v1/metrics` (protobuf or JSON, gzip or zstd), Prometheus
//! remote-write 1.0 `POST /api/v1/write` (snappy protobuf), and OTLP/gRPC
//! `MetricsService/Export` ([`crate::grpc`]), all through [`ingest`].
//!
//! All need the `ingest` or `admin` scope. Without a pipeline
//! ([`crate::AppState::with_telemetry`]) and without the compute service
//! they answer `404`. What a receiver
//! takes is routed in-stream to every exporter that selects it; the answer
//! never waits on a sink. Data points of resources no exporter can ever see
//! (no `namespace` resource attribute, an unknown namespace, a `project`
//! attribute that is not the namespace's) are refused: OTLP answers them as
//! a partial success. Before the pipeline has its first snapshot, and when
//! every sink a request was for had its hand-off full (nothing was taken),
//! the answer asks the sender to retry: `503` + `Retry-After`, gRPC
//! `UNAVAILABLE`.
//!
//! With the compute service on, every receiver also feeds the platform's
//! per-instance usage metrics (`datum_compute_instance_cpu_usage_seconds_total`,
//! `datum_compute_instance_memory_working_set_bytes`, keyed by the
//! `project` and `instance` attributes, with `namespace` or
//! `k8s.namespace.name` when given) to `tally_compute::InstanceUsage`
//! for `/metrics`, whether or not an exporter selects them, and whether or
//! not there is a pipeline at all: without one, a receiver takes the usage
//! samples and answers success (nothing else has anywhere to go).

use std::sync::Arc;

use axum::extract::{FromRef, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use prost::Message as _;
use tally_compute::{InstanceUsage, UsageKind};
use tally_delivery::ComponentKind;
use tally_telemetry::otlp::{self, JSON_CONTENT_TYPE, PROTOBUF_CONTENT_TYPE};
use tally_telemetry::proto::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use tally_telemetry::proto::metrics::v1::{metric, number_data_point};
use tally_telemetry::{Encoding, IngestReport, Pipeline, remote_write};

use crate::instance_logs::attr;

use crate::AppState;
use crate::body;
use crate::problem::Problem;

/// What the metrics receivers need: the pipeline and the body limit.
#[derive(Clone)]
pub(crate) struct Telemetry {
    pub(crate) pipeline: Option<Arc<Pipeline>>,
    pub(crate) max_body_bytes: usize,
    /// Where instance logs go (`crate::instance_logs`).
    pub(crate) logs: Option<crate::instance_logs::InstanceLogs>,
    /// Where instances' vCPU and memory use go (`crate::compute`).
    pub(crate) usage: Option<Arc<InstanceUsage>>,
}

impl FromRef<AppState> for Telemetry {
    fn from_ref(state: &AppState) -> Telemetry {
        Telemetry {
            pipeline: state.telemetry.clone(),
            max_body_bytes: state.max_body_bytes,
            logs: state.logs.clone(),
            usage: state.compute.as_ref().map(crate::compute::Compute::usage),
        }
    }
}

pub(crate) const NO_PIPELINE: &str =
    "this server has no telemetry pipeline: metrics receivers are off";

/// The pipeline, if any; `404` when there is neither a pipeline nor the
/// compute service's usage to feed.
fn pipeline(state: &Telemetry) -> Result<Option<&Pipeline>, Problem> {
    if state.pipeline.is_none() && state.usage.is_none() {
        return Err(Problem::new(StatusCode::NOT_FOUND, NO_PIPELINE));
    }
    Ok(state.pipeline.as_deref())
}

/// Why a receiver asks its sender to try again later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unavailable {
    /// The pipeline has not had its first snapshot, or is shutting down.
    NotReady,
    /// Every sink the request was for had its hand-off full.
    Overloaded,
}

impl Unavailable {
    pub(crate) fn message(self) -> &'static str {
        match self {
            Unavailable::NotReady => "the exporters' pipeline is not running yet; retry",
            Unavailable::Overloaded => {
                "every exporter sink this request is for is full; nothing was taken, retry later"
            }
        }
    }
}

impl From<Unavailable> for Problem {
    fn from(u: Unavailable) -> Problem {
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, u.message()).with_retry_after(1)
    }
}

/// The one ingest path of every metrics receiver: feeds `usage`, routes
/// `request` through `pipeline` (if there is one) and counts it in the
/// receiver's `source` component `source_id`.
pub(crate) fn ingest(
    pipeline: Option<&Pipeline>,
    usage: Option<&InstanceUsage>,
    source_id: &str,
    request: &ExportMetricsServiceRequest,
    native_histograms: u64,
) -> Result<IngestReport, Unavailable> {
    if let Some(usage) = usage {
        observe_usage(usage, request);
    }
    let Some(pipeline) = pipeline else {
        return Ok(IngestReport {
            points: otlp::data_point_count(request) as u64,
            ..IngestReport::default()
        });
    };
    if !pipeline.ready() {
        let source = pipeline
            .registry()
            .component(ComponentKind::Source, source_id);
        let points = otlp::data_point_count(request) as u64 + native_histograms;
        source.add_received(points);
        source.add_dropped("not_ready", points);
        return Err(Unavailable::NotReady);
    }
    let report = pipeline.ingest(request);
    count_source(pipeline, source_id, &report, native_histograms);
    if report.overloaded {
        return Err(Unavailable::Overloaded);
    }
    Ok(report)
}

/// Feeds the platform's per-instance usage metrics
/// ([`tally_compute::usage`]) to `usage`: `project` and `instance` are read
/// from the data point's attributes, else the resource's (remote-write puts
/// `project` on the resource and `instance` on the point).
fn observe_usage(usage: &InstanceUsage, request: &ExportMetricsServiceRequest) {
    for resource_metrics in &request.resource_metrics {
        let resource = resource_metrics
            .resource
            .as_ref()
            .map_or(&[][..], |r| &r.attributes[..]);
        for metric in resource_metrics
            .scope_metrics
            .iter()
            .flat_map(|s| &s.metrics)
        {
            let Some(kind) = UsageKind::of_metric(&metric.name) else {
                continue;
            };
            let points = match &metric.data {
                Some(metric::Data::Sum(sum)) => &sum.data_points[..],
                Some(metric::Data::Gauge(gauge)) => &gauge.data_points[..],
                _ => continue,
            };
            for point in points {
                let get = |key| {
                    attr(&point.attributes, key)
                        .or_else(|| attr(resource, key))
                        .unwrap_or("")
                };
                let value = match point.value {
                    Some(number_data_point::Value::AsDouble(v)) => v,
                    Some(number_data_point::Value::AsInt(v)) => v as f64,
                    None => continue,
                };
                let namespace = attr(&point.attributes, "namespace")
                    .or_else(|| attr(resource, "namespace"))
                    .or_else(|| attr(resource, "k8s.namespace.name"));
                usage.observe(get("project"), get("instance"), namespace, kind, value);
            }
        }
    }
}

/// Counts what a receiver took in its `source` component: data points
/// received, passed to the pipeline, and dropped (`unattributed`, and
/// `native_histogram` for what remote-write cannot convert).
fn count_source(pipeline: &Pipeline, id: &str, report: &IngestReport, native_histograms: u64) {
    let source = pipeline.registry().component(ComponentKind::Source, id);
    let unattributed = report.route.unattributed_points;
    source.add_received(report.points + native_histograms);
    source.add_sent(report.points - unattributed);
    for (reason, n) in report.route.refused() {
        if n > 0 {
            source.add_dropped(reason, n);
            warn_once(reason, n);
        }
    }
    if native_histograms > 0 {
        source.add_dropped("native_histogram", native_histograms);
    }
}

/// Logs the first refusal of each cause in this process; later ones are
/// only counted (`tally_component_dropped_total{reason}`).
fn warn_once(cause: &'static str, points: u64) {
    static WARNED: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let Ok(mut warned) = WARNED.lock() else {
        return;
    };
    if !warned.contains(&cause) {
        warned.push(cause);
        tracing::warn!(
            cause,
            points,
            "refusing data points whose resource names no known namespace of its project (`namespace` or `k8s.namespace.name`); further refusals of this cause are only counted in tally_component_dropped_total"
        );
    }
}

/// The partial success of an ingest, if anything was refused.
pub(crate) fn partial_success(report: &IngestReport) -> Option<ExportMetricsPartialSuccess> {
    let refused = report.route.unattributed_points;
    (refused > 0).then(|| ExportMetricsPartialSuccess {
        rejected_data_points: i64::try_from(refused).unwrap_or(i64::MAX),
        error_message: format!(
            "{refused} data point(s) refused: their resource has no `namespace` or `k8s.namespace.name` attribute ({}), a namespace Tally does not know ({}), or a `project` attribute that is not its namespace's ({})",
            report.route.without_namespace,
            report.route.unknown_namespace,
            report.route.project_mismatch
        ),
    })
}

/// Receive OTLP metrics.
///
/// The OTLP/HTTP metrics receiver: an `ExportMetricsServiceRequest` in
/// protobuf (`application/x-protobuf`) or JSON (`application/json`),
/// optionally gzip or zstd encoded. The answer is an
/// `ExportMetricsServiceResponse` in the request's encoding;
/// `partialSuccess` counts the data points refused because their resource
/// cannot be attributed to a namespace of a project.
#[utoipa::path(
    post, path = "/v1/metrics", tag = "telemetry",
    request_body(description = "OTLP ExportMetricsServiceRequest",
        content((String = "application/x-protobuf"), (Object = "application/json"))),
    responses(
        (status = 200, description = "Accepted (see `partialSuccess` for refused data points)",
            content((String = "application/x-protobuf"), (Object = "application/json"))),
        (status = 400, description = "The body is not an OTLP metrics request: a `google.rpc.Status` in the request's encoding",
            content((String = "application/x-protobuf"), (Object = "application/json"))),
        (status = 404, description = "No telemetry pipeline on this server: a `google.rpc.Status`",
            content((String = "application/x-protobuf"), (Object = "application/json"))),
        (status = 415, description = "Unsupported Content-Type (not OTLP, so answered as a problem)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Not running yet, or every sink the request is for is full; retry after `Retry-After`: a `google.rpc.Status`",
            content((String = "application/x-protobuf"), (Object = "application/json"))),
    ),
    security(("bearer" = []))
)]
pub async fn otlp_metrics(
    State(state): State<Telemetry>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    let media_type = body::media_type(&headers);
    let encoding = otlp::encoding_of_content_type(&media_type)
        .map_err(|e| Problem::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, e.to_string()))?;
    // Past this point the request speaks OTLP, so its errors are answered
    // as the OTLP/HTTP specification says: a `google.rpc.Status` in the
    // request's encoding (with `Retry-After` kept on a 503).
    match receive_metrics(&state, headers, body, encoding).await {
        Ok(response) => Ok(response),
        Err(problem) => Ok(otlp_error(encoding, &problem)),
    }
}

/// An error of a request that speaks OTLP, as the OTLP/HTTP specification
/// says: a `google.rpc.Status` in the request's encoding (with
/// `Retry-After` kept on a 503).
pub(crate) fn otlp_error(encoding: Encoding, problem: &Problem) -> Response {
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let content_type = match encoding {
        Encoding::Protobuf => PROTOBUF_CONTENT_TYPE,
        Encoding::Json => JSON_CONTENT_TYPE,
    };
    let body = otlp::encode_error_status(encoding, problem.status, &problem.detail);
    let mut response = (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response();
    if let Some(seconds) = problem.retry_after() {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

async fn receive_metrics(
    state: &Telemetry,
    headers: HeaderMap,
    body: Bytes,
    encoding: Encoding,
) -> Result<Response, Problem> {
    let pipeline = pipeline(state)?;
    let limit = state.max_body_bytes;
    let request = body::decoded_off_workers(headers, body, limit, move |_, raw| {
        otlp::decode_metrics_request(&raw, encoding, None, limit)
            .map_err(|e| Problem::bad_request(e.to_string()))
    })
    .await?;
    let report = ingest(
        pipeline,
        state.usage.as_deref(),
        "otlp_http_metrics",
        &request,
        0,
    )?;
    let answer = ExportMetricsServiceResponse {
        partial_success: partial_success(&report),
    };
    let (content_type, body) = match encoding {
        Encoding::Protobuf => (PROTOBUF_CONTENT_TYPE, answer.encode_to_vec()),
        Encoding::Json => (
            JSON_CONTENT_TYPE,
            serde_json::to_vec(&answer).map_err(|e| {
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

/// Receive Prometheus remote-write.
///
/// Prometheus remote-write 1.0: a snappy-compressed protobuf
/// `WriteRequest`. Series become OTLP metrics (counters as cumulative
/// monotonic sums, the rest as gauges; identity labels such as `namespace`
/// as resource attributes) and go to the exporters. Native histograms are
/// not supported: they are counted as dropped, and the rest is accepted.
#[utoipa::path(
    post, path = "/api/v1/write", tag = "telemetry",
    request_body(description = "snappy-compressed prometheus.WriteRequest", content((String = "application/x-protobuf"))),
    responses(
        (status = 204, description = "Accepted"),
        (status = 400, description = "The body is not a snappy-compressed WriteRequest", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No telemetry pipeline on this server", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The decompressed body is larger than the limit", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Not running yet, or every sink the request is for is full; retry after `Retry-After`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn remote_write(
    State(state): State<Telemetry>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    let pipeline = pipeline(&state)?;
    let encoding = body::content_encoding(&headers).unwrap_or_else(|| "snappy".to_owned());
    if encoding != "snappy" {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "Content-Encoding {encoding:?} is not supported; remote-write bodies are snappy"
            ),
        ));
    }
    let limit = state.max_body_bytes;
    // Snappy expands a body at most about 21 times: a small one is read
    // where it arrives, like an uncompressed one.
    let converted = body::off_workers(body::is_compressed(&headers), body.len(), move || {
        let write = remote_write::decode_write_request(&body, limit).map_err(|e| match e {
            remote_write::RemoteWriteError::TooLarge { .. } => {
                Problem::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
            }
            e => Problem::bad_request(e.to_string()),
        })?;
        Ok(remote_write::to_otlp(&write))
    })
    .await?;
    ingest(
        pipeline,
        state.usage.as_deref(),
        "prometheus_remote_write",
        &converted.request,
        converted.rejected_histograms,
    )?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
