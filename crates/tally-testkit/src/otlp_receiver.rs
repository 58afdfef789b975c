//! An OTLP/HTTP metrics, logs and traces receiver for tests, built on the official protobuf
//! definitions (opentelemetry-proto's types, generated from the
//! opentelemetry-proto `.proto` files) and decoded with prost directly: it
//! never calls Tally's own decoder. Each path prefix (`/a`, `/b`...) is its
//! own endpoint, with its own injected faults and its own record of what
//! it accepted.

use std::collections::{BTreeMap, VecDeque};
use std::io::Read as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prost::Message as _;
use tally_telemetry::proto::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use tally_telemetry::proto::common::v1::{AnyValue, any_value};
use tally_telemetry::proto::metrics::v1::metric::Data;

/// One answer to inject instead of a 200.
#[derive(Debug, Clone)]
pub enum Fault {
    /// This status, with `Retry-After` seconds if given; nothing recorded.
    Status(u16, Option<u64>),
    /// Wait this long, then answer 503 (the client has timed out by then).
    Hang(Duration),
    /// Record the request, and answer 200 with a partial success refusing
    /// this many data points.
    Partial(i64),
    /// Answer this status with a body echoing the request's Authorization
    /// header (a careless endpoint): nothing recorded.
    Echo(u16),
}

/// One data point as received.
#[derive(Debug, Clone, PartialEq, PartialOrd)]
pub struct Point {
    pub resource: BTreeMap<String, String>,
    pub scope: String,
    pub metric: String,
    /// `gauge`, `sum`, `histogram`...
    pub kind: &'static str,
    /// Sums: temporality (1 delta, 2 cumulative) and monotonicity.
    pub temporality: i32,
    pub monotonic: bool,
    pub attributes: BTreeMap<String, String>,
    pub time: u64,
    pub start: u64,
    /// Number value, or a histogram's count.
    pub value: f64,
    pub buckets: Vec<u64>,
}

#[derive(Debug, Default)]
pub struct Endpoint {
    pub faults: VecDeque<Fault>,
    /// Every accepted data point.
    pub points: Vec<Point>,
    /// `Authorization` header of every request (accepted or not).
    pub authorizations: Vec<String>,
    /// Content-Type and Content-Encoding of every request.
    pub content: Vec<(String, String)>,
    pub requests: usize,
    /// Data points per accepted request.
    pub batch_sizes: Vec<usize>,
    pub refused: Vec<String>,
    /// Once `faults` is empty: this share of requests (per mille) answers
    /// 503, drawn from a seeded xorshift (reproducible).
    pub fault_rate: Option<(u64, u64)>,
    /// Every accepted log record: resource attributes, then the record's.
    pub logs: Vec<LogEntry>,
    /// Every accepted span.
    pub spans: Vec<SpanEntry>,
}

impl Endpoint {
    /// The next fault: a queued one, else a random one at `fault_rate`.
    fn next_fault(&mut self) -> Option<Fault> {
        if let Some(fault) = self.faults.pop_front() {
            return Some(fault);
        }
        let (per_mille, state) = self.fault_rate.as_mut()?;
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        (*state % 1000 < *per_mille).then_some(Fault::Status(503, None))
    }
}

/// One log record as received.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEntry {
    pub resource: BTreeMap<String, String>,
    pub scope: String,
    pub time: u64,
    pub attributes: BTreeMap<String, String>,
}

/// One span as received.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanEntry {
    pub trace_id: Vec<u8>,
    pub name: String,
    pub attributes: BTreeMap<String, String>,
}

/// Decodes an OTLP body (protobuf or JSON, maybe gzip) with the official types.
fn decode<M: prost::Message + Default + serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<M, String> {
    let header = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let raw = if header(header::CONTENT_ENCODING) == "gzip" {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(body)
            .read_to_end(&mut out)
            .map_err(|e| e.to_string())?;
        out
    } else {
        body.to_vec()
    };
    if header(header::CONTENT_TYPE).starts_with("application/json") {
        serde_json::from_slice(&raw).map_err(|e| e.to_string())
    } else {
        M::decode(&raw[..]).map_err(|e| e.to_string())
    }
}

async fn handle_logs(
    State(receiver): State<Receiver>,
    Path(prefix): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    use tally_telemetry::proto::collector::logs::v1::{
        ExportLogsServiceRequest, ExportLogsServiceResponse,
    };
    let request: ExportLogsServiceRequest = match decode(&headers, &body) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    let mut endpoints = receiver.endpoints.lock().unwrap();
    let endpoint = endpoints.entry(prefix).or_default();
    endpoint.requests += 1;
    endpoint.authorizations.push(
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned(),
    );
    for rl in &request.resource_logs {
        let resource = map(rl.resource.as_ref().map_or(&[][..], |r| &r.attributes));
        for sl in &rl.scope_logs {
            let scope = sl
                .scope
                .as_ref()
                .map(|s| s.name.clone())
                .unwrap_or_default();
            for log in &sl.log_records {
                endpoint.logs.push(LogEntry {
                    resource: resource.clone(),
                    scope: scope.clone(),
                    time: log.time_unix_nano,
                    attributes: map(&log.attributes),
                });
            }
        }
    }
    (
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        ExportLogsServiceResponse::default().encode_to_vec(),
    )
        .into_response()
}

async fn handle_traces(
    State(receiver): State<Receiver>,
    Path(prefix): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    use tally_telemetry::proto::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    let request: ExportTraceServiceRequest = match decode(&headers, &body) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    let mut endpoints = receiver.endpoints.lock().unwrap();
    let endpoint = endpoints.entry(prefix).or_default();
    endpoint.requests += 1;
    for rs in &request.resource_spans {
        for ss in &rs.scope_spans {
            for span in &ss.spans {
                endpoint.spans.push(SpanEntry {
                    trace_id: span.trace_id.clone(),
                    name: span.name.clone(),
                    attributes: map(&span.attributes),
                });
            }
        }
    }
    (
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
        .into_response()
}

#[derive(Clone, Default)]
pub struct Receiver {
    endpoints: Arc<Mutex<BTreeMap<String, Endpoint>>>,
    pub url: String,
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

fn map(attrs: &[tally_telemetry::proto::common::v1::KeyValue]) -> BTreeMap<String, String> {
    attrs
        .iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

/// Flattens a request into points.
pub fn points_of(request: &ExportMetricsServiceRequest) -> Vec<Point> {
    use tally_telemetry::proto::metrics::v1::number_data_point::Value;
    let mut out = Vec::new();
    for rm in &request.resource_metrics {
        let resource = map(rm.resource.as_ref().map_or(&[][..], |r| &r.attributes));
        for sm in &rm.scope_metrics {
            let scope = sm
                .scope
                .as_ref()
                .map(|s| s.name.clone())
                .unwrap_or_default();
            for m in &sm.metrics {
                let base = Point {
                    resource: resource.clone(),
                    scope: scope.clone(),
                    metric: m.name.clone(),
                    kind: "",
                    temporality: 0,
                    monotonic: false,
                    attributes: BTreeMap::new(),
                    time: 0,
                    start: 0,
                    value: 0.0,
                    buckets: vec![],
                };
                let number = |p: &tally_telemetry::proto::metrics::v1::NumberDataPoint,
                              kind,
                              temporality,
                              monotonic| Point {
                    kind,
                    temporality,
                    monotonic,
                    attributes: map(&p.attributes),
                    time: p.time_unix_nano,
                    start: p.start_time_unix_nano,
                    value: match p.value {
                        Some(Value::AsInt(i)) => i as f64,
                        Some(Value::AsDouble(d)) => d,
                        None => f64::NAN,
                    },
                    ..base.clone()
                };
                match &m.data {
                    Some(Data::Gauge(g)) => {
                        out.extend(g.data_points.iter().map(|p| number(p, "gauge", 0, false)))
                    }
                    Some(Data::Sum(s)) => out.extend(
                        s.data_points
                            .iter()
                            .map(|p| number(p, "sum", s.aggregation_temporality, s.is_monotonic)),
                    ),
                    Some(Data::Histogram(h)) => out.extend(h.data_points.iter().map(|p| Point {
                        kind: "histogram",
                        temporality: h.aggregation_temporality,
                        attributes: map(&p.attributes),
                        time: p.time_unix_nano,
                        start: p.start_time_unix_nano,
                        value: p.count as f64,
                        buckets: p.bucket_counts.clone(),
                        ..base.clone()
                    })),
                    other => out.push(Point {
                        kind: if other.is_some() { "other" } else { "none" },
                        ..base.clone()
                    }),
                }
            }
        }
    }
    out
}

async fn handle(
    State(receiver): State<Receiver>,
    Path(prefix): Path<String>,
    request: axum::extract::Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let headers: HeaderMap = parts.headers;
    let Ok(body) = axum::body::to_bytes(body, 64 << 20).await else {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    };
    let header = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let authorization = header(header::AUTHORIZATION);
    let content_type = header(header::CONTENT_TYPE);
    let encoding = header(header::CONTENT_ENCODING);
    let fault = {
        let mut endpoints = receiver.endpoints.lock().unwrap();
        let endpoint = endpoints.entry(prefix.clone()).or_default();
        endpoint.requests += 1;
        endpoint.authorizations.push(authorization.clone());
        endpoint
            .content
            .push((content_type.clone(), encoding.clone()));
        endpoint.next_fault()
    };
    let partial = match fault {
        Some(Fault::Status(status, retry_after)) => {
            let mut response = StatusCode::from_u16(status).unwrap().into_response();
            if let Some(seconds) = retry_after {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, seconds.into());
            }
            return response;
        }
        Some(Fault::Hang(delay)) => {
            tokio::time::sleep(delay).await;
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
        Some(Fault::Echo(status)) => {
            return (
                StatusCode::from_u16(status).unwrap(),
                format!("invalid credentials: {authorization}"),
            )
                .into_response();
        }
        Some(Fault::Partial(n)) => n,
        None => 0,
    };
    let raw = if encoding == "gzip" {
        let mut out = Vec::new();
        if flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut out)
            .is_err()
        {
            return (StatusCode::BAD_REQUEST, "bad gzip").into_response();
        }
        out
    } else {
        body.to_vec()
    };
    let request = if content_type.starts_with("application/json") {
        serde_json::from_slice::<ExportMetricsServiceRequest>(&raw).map_err(|e| e.to_string())
    } else {
        ExportMetricsServiceRequest::decode(&raw[..]).map_err(|e| e.to_string())
    };
    let request = match request {
        Ok(request) => request,
        Err(e) => {
            let mut endpoints = receiver.endpoints.lock().unwrap();
            endpoints.entry(prefix).or_default().refused.push(e.clone());
            return (StatusCode::BAD_REQUEST, e).into_response();
        }
    };
    let mut points = points_of(&request);
    {
        let mut endpoints = receiver.endpoints.lock().unwrap();
        let endpoint = endpoints.entry(prefix).or_default();
        endpoint.batch_sizes.push(points.len());
        // A partial success refuses the last `partial` points for good.
        let keep = points
            .len()
            .saturating_sub(usize::try_from(partial).unwrap_or(0));
        points.truncate(keep);
        endpoint.points.extend(points);
    }
    let response = ExportMetricsServiceResponse {
        partial_success: (partial > 0).then(|| ExportMetricsPartialSuccess {
            rejected_data_points: partial,
            error_message: "some points were too old".into(),
        }),
    };
    (
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        response.encode_to_vec(),
    )
        .into_response()
}

impl Receiver {
    /// Starts a receiver on a loopback port.
    pub async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let receiver = Receiver {
            endpoints: Arc::default(),
            url,
        };
        let app = axum::Router::new()
            .route("/{prefix}/v1/metrics", axum::routing::post(handle))
            .route("/{prefix}/v1/logs", axum::routing::post(handle_logs))
            .route("/{prefix}/v1/traces", axum::routing::post(handle_traces))
            .with_state(receiver.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        receiver
    }

    /// The base endpoint of prefix `name`.
    pub fn endpoint(&self, name: &str) -> String {
        format!("{}/{name}", self.url)
    }

    /// Queues faults for endpoint `name`.
    pub fn fail(&self, name: &str, faults: impl IntoIterator<Item = Fault>) {
        self.endpoints
            .lock()
            .unwrap()
            .entry(name.to_owned())
            .or_default()
            .faults
            .extend(faults);
    }

    /// Fails `per_mille` of endpoint `name`'s requests with a 503, at random
    /// from `seed` (non-zero), after any queued faults.
    pub fn fail_at_random(&self, name: &str, per_mille: u64, seed: u64) {
        self.endpoints
            .lock()
            .unwrap()
            .entry(name.to_owned())
            .or_default()
            .fault_rate = Some((per_mille, seed.max(1)));
    }

    /// Runs `f` on what endpoint `name` saw.
    pub fn with<T>(&self, name: &str, f: impl FnOnce(&Endpoint) -> T) -> T {
        let mut endpoints = self.endpoints.lock().unwrap();
        f(endpoints.entry(name.to_owned()).or_default())
    }

    /// Waits (up to `limit`) until `count` of endpoint `name` reaches `n`.
    pub async fn wait_until(
        &self,
        name: &str,
        n: usize,
        limit: Duration,
        count: impl Fn(&Endpoint) -> usize,
    ) -> usize {
        let started = std::time::Instant::now();
        loop {
            let got = self.with(name, &count);
            if got >= n || started.elapsed() > limit {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (up to `limit`) until endpoint `name` holds at least `n` points.
    pub async fn wait_for_points(&self, name: &str, n: usize, limit: Duration) -> usize {
        let started = std::time::Instant::now();
        loop {
            let got = self.with(name, |e| e.points.len());
            if got >= n || started.elapsed() > limit {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
