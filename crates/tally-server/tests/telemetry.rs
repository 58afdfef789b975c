//! The metrics receivers over real HTTP: OTLP/HTTP (protobuf, JSON, gzip)
//! and Prometheus remote-write into the exporters' pipeline, out to an OTLP
//! test receiver built on the official protobuf definitions; scopes; and
//! the OpenTelemetry Python SDK's own OTLP/HTTP exporter as the sender.

use std::collections::BTreeMap;
use std::io::Write as _;
use tally_testkit::otlp_receiver as receiver;

use std::sync::Arc;
use std::time::Duration;
use tally_billing::testing::venv;

use prost::Message as _;
use receiver::Receiver;
use reqwest::StatusCode;
use tally_model::Manifest;
use tally_server::{AppState, TokenConfig};
use tally_store_embedded::{EmbeddedLedger, StoreConfig};
use tally_telemetry::proto::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use tally_telemetry::proto::metrics::v1::{
    AggregationTemporality, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    metric::Data, number_data_point,
};
use tally_telemetry::proto::resource::v1::Resource;
use tally_telemetry::remote_write::{Label, Sample, TimeSeries, WriteRequest};
use tally_telemetry::{
    InMemoryResourceIndex, Pipeline, PipelineOptions, ResourceIndex, SecretValue, Secrets, Snapshot,
};

const SINK_TOKEN: &str = "sink-token-xyz";
const WAIT: Duration = Duration::from_secs(20);

struct Server {
    base: String,
    client: reqwest::Client,
    receiver: Receiver,
    _dir: tempfile::TempDir,
}

fn token(name: &str, token: &str, scope: &str) -> TokenConfig {
    TokenConfig {
        name: name.into(),
        token: Some(token.into()),
        sha256: None,
        scopes: vec![scope.into()],
    }
}

/// Pipeline defaults, with the loopback test receiver allowed (sinks refuse
/// loopback by default).
fn loopback_allowed() -> PipelineOptions {
    PipelineOptions {
        egress: tally_delivery::EgressPolicy::parse(["127.0.0.0/8"]).unwrap(),
        ..PipelineOptions::default()
    }
}

/// A server whose pipeline has one exporter in ns-a taking every series to
/// the receiver's endpoint `a`, with a bearer token from a secret.
async fn start(with_pipeline: bool) -> Server {
    start_with(with_pipeline, false).await
}

/// As [`start`], with the compute service (`/metrics` then carries
/// instances' vCPU and memory use) when `with_compute`.
async fn start_with(with_pipeline: bool, with_compute: bool) -> Server {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ledger = EmbeddedLedger::open(StoreConfig::new(dir.path())).unwrap();
    let mut state = AppState::new(Arc::new(ledger), 1 << 20, None)
        .with_tokens(
            Some("root"),
            &[
                token("agent", "ingest-token", "ingest"),
                token("customer", "project-token", "project:p1"),
            ],
        )
        .unwrap();
    if with_pipeline {
        let pipeline = Pipeline::new(tally_delivery::Registry::new(), loopback_allowed()).unwrap();
        let exporter = format!(
            "apiVersion: telemetry.datumapis.com/v1alpha1\nkind: Exporter\nmetadata: {{name: e, namespace: ns-a}}\nspec:\n  sources: [{{name: all, metrics: {{metricsql: ''}}}}]\n  sinks: [{{name: k, otlp_http: {{endpoint: '{}', authentication: {{type: bearerToken, secretRef: {{name: s, key: token}}}}}}, batch: {{timeout: 50ms}}}}]\n",
            receiver.endpoint("a")
        );
        let mut index = InMemoryResourceIndex::new();
        index.set_namespace("ns-a", "p1", BTreeMap::new());
        let index: Arc<dyn ResourceIndex> = Arc::new(index);
        let mut secrets = Secrets::new();
        secrets.insert(
            "ns-a",
            "s",
            BTreeMap::from([("token".to_owned(), SecretValue::new(SINK_TOKEN))]),
        );
        pipeline.update(Snapshot {
            exporters: Manifest::parse_documents(&exporter).unwrap(),
            secrets,
            index,
            policies: Default::default(),
        });
        state = state.with_telemetry(Arc::new(pipeline));
    }
    if with_compute {
        let compute = tally_server::compute::Compute::open(&dir.path().join("compute")).unwrap();
        state = state.with_compute(compute);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(tally_server::serve_on(listener, state));
    Server {
        base: format!("http://{address}"),
        client: tally_delivery::client_builder().build().unwrap(),
        receiver,
        _dir: dir,
    }
}

use tally_telemetry::otlp::string_attribute as kv;

/// One counter point for a resource in `namespace`.
fn request(namespace: &str, value: i64) -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![kv("namespace", namespace), kv("service.name", "svc")],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![Metric {
                    name: "hits_total".into(),
                    data: Some(Data::Sum(Sum {
                        data_points: vec![NumberDataPoint {
                            attributes: vec![kv("code", "200")],
                            time_unix_nano: 1_700_000_000_000_000_000 + value as u64,
                            value: Some(number_data_point::Value::AsInt(value)),
                            ..Default::default()
                        }],
                        aggregation_temporality: AggregationTemporality::Cumulative as i32,
                        is_monotonic: true,
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

impl Server {
    async fn get(&self, path: &str) -> reqwest::Response {
        let url = format!("{}{path}", self.base);
        self.client
            .get(url)
            .bearer_auth("root")
            .send()
            .await
            .unwrap()
    }

    async fn post(
        &self,
        path: &str,
        bearer: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> reqwest::Response {
        let mut request = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(bearer)
            .body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_protobuf_and_json_reach_the_sink_with_partial_success_for_the_unattributable() {
    let server = start(true).await;
    // Protobuf, gzip: one point of ns-a and one of an unknown namespace.
    let mut both = request("ns-a", 1);
    both.resource_metrics
        .extend(request("ns-unknown", 2).resource_metrics);
    let response = server
        .post(
            "/v1/metrics",
            "ingest-token",
            &[
                ("content-type", "application/x-protobuf"),
                ("content-encoding", "gzip"),
            ],
            gzip(&both.encode_to_vec()),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/x-protobuf");
    let answer = ExportMetricsServiceResponse::decode(response.bytes().await.unwrap()).unwrap();
    let partial = answer.partial_success.unwrap();
    assert_eq!(partial.rejected_data_points, 1);
    assert!(
        partial.error_message.contains("namespace"),
        "{}",
        partial.error_message
    );
    // JSON, as OTLP/JSON writes it.
    let json = serde_json::to_vec(&request("ns-a", 3)).unwrap();
    let response = server
        .post(
            "/v1/metrics",
            "ingest-token",
            &[("content-type", "application/json")],
            json,
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert!(
        answer.get("partialSuccess").is_none_or(|p| p.is_null()),
        "{answer}"
    );
    assert_eq!(server.receiver.wait_for_points("a", 2, WAIT).await, 2);
    server.receiver.with("a", |e| {
        let values: Vec<f64> = e.points.iter().map(|p| p.value).collect();
        assert_eq!(values, [1.0, 3.0]);
        assert!(e.points.iter().all(|p| p.resource["namespace"] == "ns-a"));
        assert!(
            e.authorizations
                .iter()
                .all(|a| a == &format!("Bearer {SINK_TOKEN}"))
        );
    });
    // The counters are on /metrics, next to the ledger's.
    // (The receiver records a batch just before it answers: poll.)
    let sent =
        "tally_component_sent_total{component_kind=\"sink\",component_id=\"exporter/ns-a/e/k\"} 2";
    let started = std::time::Instant::now();
    let mut metrics = String::new();
    while !metrics.contains(sent) && started.elapsed() < WAIT {
        tokio::time::sleep(Duration::from_millis(20)).await;
        metrics = server.get("/metrics").await.text().await.unwrap();
    }
    assert!(metrics.contains(sent), "{metrics}");
    assert!(metrics.contains(
        "tally_component_received_total{component_kind=\"sink\",component_id=\"ledger\"}"
    ));
    assert_eq!(
        metrics
            .matches("# TYPE tally_component_received_total counter")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_need_the_ingest_scope_and_a_pipeline() {
    let server = start(true).await;
    let body = request("ns-a", 1).encode_to_vec();
    let pb = [("content-type", "application/x-protobuf")];
    for (bearer, status) in [
        ("project-token", StatusCode::FORBIDDEN),
        ("wrong", StatusCode::UNAUTHORIZED),
        ("ingest-token", StatusCode::OK),
        ("root", StatusCode::OK),
    ] {
        let response = server.post("/v1/metrics", bearer, &pb, body.clone()).await;
        assert_eq!(response.status(), status, "{bearer}");
        let response = server.post("/api/v1/write", bearer, &[], vec![]).await;
        let expected = if status == StatusCode::OK {
            StatusCode::BAD_REQUEST
        } else {
            status
        };
        assert_eq!(response.status(), expected, "{bearer}");
    }
    let response = server
        .post(
            "/v1/metrics",
            "root",
            &[("content-type", "text/plain")],
            body.clone(),
        )
        .await;
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    // Errors of an OTLP request are `google.rpc.Status` in its encoding.
    let response = server
        .post("/v1/metrics", "root", &pb, b"\xff\xff".to_vec())
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(response.headers()["content-type"], "application/x-protobuf");
    assert!(!response.bytes().await.unwrap().is_empty());
    let response = server
        .post(
            "/v1/metrics",
            "root",
            &[("content-type", "application/json")],
            b"{not json".to_vec(),
        )
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(response.headers()["content-type"], "application/json");
    let status: serde_json::Value = response.json().await.unwrap();
    assert_eq!(status["code"], 3, "INVALID_ARGUMENT: {status}");
    assert!(status["message"].as_str().is_some_and(|m| !m.is_empty()));

    let without = start(false).await;
    let response = without.post("/v1/metrics", "root", &pb, body).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(response.headers()["content-type"], "application/x-protobuf");
    // Both receivers are in the OpenAPI document.
    let doc: serde_json::Value = without.get("/openapi.json").await.json().await.unwrap();
    assert!(doc["paths"]["/v1/metrics"]["post"].is_object());
    assert!(doc["paths"]["/api/v1/write"]["post"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_remote_write_reaches_the_sink() {
    let server = start(true).await;
    let label = |name: &str, value: &str| Label {
        name: name.into(),
        value: value.into(),
    };
    let write = WriteRequest {
        timeseries: vec![
            TimeSeries {
                labels: vec![
                    label("__name__", "http_requests_total"),
                    label("namespace", "ns-a"),
                    label("method", "GET"),
                ],
                samples: vec![Sample {
                    value: 42.0,
                    timestamp: 1_700_000_000_000,
                }],
                histograms: vec![],
            },
            TimeSeries {
                labels: vec![label("__name__", "queue_size"), label("namespace", "ns-a")],
                samples: vec![Sample {
                    value: 5.0,
                    timestamp: 1_700_000_000_000,
                }],
                histograms: vec![],
            },
        ],
        metadata: vec![],
    };
    let body = snap::raw::Encoder::new()
        .compress_vec(&write.encode_to_vec())
        .unwrap();
    let response = server
        .post(
            "/api/v1/write",
            "ingest-token",
            &[
                ("content-type", "application/x-protobuf"),
                ("content-encoding", "snappy"),
                ("x-prometheus-remote-write-version", "0.1.0"),
            ],
            body,
        )
        .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(server.receiver.wait_for_points("a", 2, WAIT).await, 2);
    server.receiver.with("a", |e| {
        let mut got: Vec<(String, &str, bool, f64, u64)> = e
            .points
            .iter()
            .map(|p| (p.metric.clone(), p.kind, p.monotonic, p.value, p.time))
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            got,
            [
                (
                    "http_requests_total".to_owned(),
                    "sum",
                    true,
                    42.0,
                    1_700_000_000_000_000_000
                ),
                (
                    "queue_size".to_owned(),
                    "gauge",
                    false,
                    5.0,
                    1_700_000_000_000_000_000
                ),
            ]
        );
        let requests = e.points.iter().find(|p| p.metric == "http_requests_total");
        assert_eq!(requests.unwrap().attributes["method"], "GET");
    });
}

/// A Python with the OpenTelemetry SDK and its OTLP/HTTP exporter (a venv
/// made for the test, or one named by `TALLY_OTEL_PYTHON`), or why there is none.
fn python_with_otel() -> Result<String, String> {
    if let Ok(python) = std::env::var("TALLY_OTEL_PYTHON") {
        return Ok(python);
    }
    venv::python_with(
        "tally-server-otel-venv",
        &[
            "opentelemetry-sdk",
            "opentelemetry-exporter-otlp-proto-http",
        ],
        "import opentelemetry.sdk.metrics, opentelemetry.exporter.otlp.proto.http.metric_exporter",
    )
}

/// Records a counter, a gauge and a histogram with the SDK and exports them
/// once (at shutdown) with the SDK's OTLP/HTTP exporter, gzip on.
const PYTHON_SENDER: &str = r#"
import sys
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

base, token = sys.argv[1], sys.argv[2]
exporter = OTLPMetricExporter(
    endpoint=base + "/v1/metrics",
    headers={"Authorization": "Bearer " + token},
    compression=Compression.Gzip,
)
reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
resource = Resource.create({"service.name": "py-svc", "namespace": "ns-a", "resource_kind": "Workload", "resource_name": "w1"})
provider = MeterProvider(resource=resource, metric_readers=[reader])
meter = provider.get_meter("tally.interop", "1.0")
counter = meter.create_counter("py_requests", unit="{request}")
counter.add(3, {"route": "/a"})
counter.add(4, {"route": "/a"})
meter.create_observable_gauge("py_temperature", callbacks=[lambda options: [Observation(21.5, {"room": "lab"})]])
latency = meter.create_histogram("py_latency", unit="s")
for value in (0.1, 0.2, 3.0):
    latency.record(value)
provider.shutdown()
print("exported")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_opentelemetry_python_sdk_sends_comes_out_at_a_sink() {
    let Some(python) = venv::or_skip(python_with_otel(), "the OpenTelemetry Python SDK") else {
        return;
    };
    let server = start(true).await;
    let output = tokio::process::Command::new(python)
        .args(["-c", PYTHON_SENDER, &server.base, "ingest-token"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    // The SDK logs failed exports instead of failing.
    assert!(!stderr.contains("Failed to export"), "{stderr}");
    assert_eq!(server.receiver.wait_for_points("a", 3, WAIT).await, 3);
    server.receiver.with("a", |e| {
        let by_name: BTreeMap<&str, &receiver::Point> =
            e.points.iter().map(|p| (p.metric.as_str(), p)).collect();
        let counter = by_name["py_requests"];
        assert_eq!(
            (
                counter.kind,
                counter.temporality,
                counter.monotonic,
                counter.value
            ),
            ("sum", 2, true, 7.0)
        );
        assert_eq!(counter.attributes["route"], "/a");
        assert_eq!(counter.resource["service.name"], "py-svc");
        assert_eq!(counter.scope, "tally.interop");
        let gauge = by_name["py_temperature"];
        assert_eq!((gauge.kind, gauge.value), ("gauge", 21.5));
        assert_eq!(gauge.attributes["room"], "lab");
        let histogram = by_name["py_latency"];
        assert_eq!((histogram.kind, histogram.value), ("histogram", 3.0));
        assert_eq!(histogram.buckets.iter().sum::<u64>(), 3);
        assert_eq!(e.points.len(), 3);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_without_its_first_snapshot_asks_senders_to_retry() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ledger = EmbeddedLedger::open(StoreConfig::new(dir.path())).unwrap();
    let pipeline = Pipeline::new(tally_delivery::Registry::new(), loopback_allowed()).unwrap();
    let state = AppState::new(Arc::new(ledger), 1 << 20, None).with_telemetry(Arc::new(pipeline));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(tally_server::serve_on(listener, state));
    let server = Server {
        base: format!("http://{address}"),
        client: tally_delivery::client_builder().build().unwrap(),
        receiver,
        _dir: dir,
    };
    let answer = server
        .post(
            "/v1/metrics",
            "none",
            &[("content-type", "application/x-protobuf")],
            request("ns-a", 1).encode_to_vec(),
        )
        .await;
    assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.headers()["retry-after"], "1");
    assert_eq!(answer.headers()["content-type"], "application/x-protobuf");
    let metrics = server
        .client
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            r#"tally_component_dropped_total{component_kind="source",component_id="otlp_http_metrics",reason="not_ready"} 1"#
        ),
        "{metrics}"
    );
}

/// A snappy remote-write body: one `datum_compute_instance_cpu_usage_seconds_total`
/// sample with `labels`.
fn cpu_usage_write(labels: &[(&str, &str)], value: f64) -> Vec<u8> {
    let label = |name: &str, value: &str| Label {
        name: name.into(),
        value: value.into(),
    };
    let write = WriteRequest {
        timeseries: vec![TimeSeries {
            labels: std::iter::once(label("__name__", tally_compute::usage::CPU_METRIC))
                .chain(labels.iter().map(|(n, v)| label(n, v)))
                .collect(),
            samples: vec![Sample {
                value,
                timestamp: 1_700_000_000_000,
            }],
            histograms: vec![],
        }],
        metadata: vec![],
    };
    snap::raw::Encoder::new()
        .compress_vec(&write.encode_to_vec())
        .unwrap()
}

/// An OTLP request of `datum_compute_instance_memory_working_set_bytes`
/// gauge `points` under one resource with `attributes`.
fn memory_gauges(
    attributes: Vec<tally_telemetry::proto::common::v1::KeyValue>,
    points: Vec<NumberDataPoint>,
) -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes,
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![Metric {
                    name: tally_compute::usage::MEMORY_METRIC.into(),
                    data: Some(Data::Gauge(tally_telemetry::proto::metrics::v1::Gauge {
                        data_points: points,
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// The headers of a remote-write request.
const SNAPPY: [(&str, &str); 2] = [
    ("content-type", "application/x-protobuf"),
    ("content-encoding", "snappy"),
];

/// The platform's per-instance usage metrics, received over remote-write
/// and OTLP, come out as gauges on `/metrics`; instances are capped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_usage_from_remote_write_and_otlp_is_on_metrics_and_capped() {
    use tally_compute::usage::MAX_INSTANCES;
    let server = start_with(true, true).await;
    let body = cpu_usage_write(&[("project", "p1"), ("instance", "vm-a")], 12.5);
    let response = server
        .post("/api/v1/write", "ingest-token", &SNAPPY, body)
        .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let cpu =
        "tally_compute_instance_cpu_usage_seconds_total{project=\"p1\",instance=\"vm-a\"} 12.5\n";
    let metrics = server.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains(cpu), "{metrics:.2000}");
    // OTLP: the memory gauge of vm-a, then more instances than the cap.
    let gauge = |instance: String, value: i64| NumberDataPoint {
        attributes: vec![kv("instance", &instance)],
        value: Some(number_data_point::Value::AsInt(value)),
        ..Default::default()
    };
    let points: Vec<_> = std::iter::once(gauge("vm-a".into(), 4096))
        .chain((0..MAX_INSTANCES + 50).map(|i| gauge(format!("vm-{i:05}"), i as i64)))
        .collect();
    let otlp = memory_gauges(vec![kv("project", "p1")], points);
    let pb = [("content-type", "application/x-protobuf")];
    let response = server
        .post("/v1/metrics", "ingest-token", &pb, otlp.encode_to_vec())
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let metrics = server.get("/metrics").await.text().await.unwrap();
    // vm-a was updated first, so the cap evicted it with the 50 oldest.
    assert!(!metrics.contains(cpu), "vm-a should be evicted");
    let memory_lines = metrics
        .lines()
        .filter(|l| l.starts_with("tally_compute_instance_memory_working_set_bytes{"))
        .count();
    assert_eq!(memory_lines, MAX_INSTANCES);
    assert!(metrics.contains(&format!(
        "tally_compute_instance_memory_working_set_bytes{{project=\"p1\",instance=\"vm-{:05}\"}} {}\n",
        MAX_INSTANCES + 49,
        MAX_INSTANCES + 49
    )));
    assert!(metrics.contains("tally_compute_instance_usage_evicted_total 51\n"));
    // Updated again, vm-a comes back with its CPU time.
    let body = cpu_usage_write(&[("project", "p1"), ("instance", "vm-a")], 12.5);
    server
        .post("/api/v1/write", "ingest-token", &SNAPPY, body)
        .await;
    let metrics = server.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains(cpu), "{metrics:.2000}");
}

/// Without an exporters' pipeline, the compute service still takes the
/// platform's usage metrics over remote-write and OTLP (with the
/// `namespace` a project's PromQL view filters on); with neither, the
/// receivers answer 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_usage_arrives_without_a_pipeline() {
    let server = start_with(false, true).await;
    let body = cpu_usage_write(
        &[
            ("project", "p1"),
            ("namespace", "p1-prod"),
            ("instance", "vm-a"),
        ],
        3.25,
    );
    let response = server
        .post("/api/v1/write", "ingest-token", &SNAPPY, body.clone())
        .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let otlp = memory_gauges(
        vec![kv("project", "p1"), kv("k8s.namespace.name", "p1-prod")],
        vec![NumberDataPoint {
            attributes: vec![kv("instance", "vm-a")],
            value: Some(number_data_point::Value::AsInt(8192)),
            ..Default::default()
        }],
    );
    let pb = [("content-type", "application/x-protobuf")];
    let response = server
        .post("/v1/metrics", "ingest-token", &pb, otlp.encode_to_vec())
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer = ExportMetricsServiceResponse::decode(response.bytes().await.unwrap()).unwrap();
    assert_eq!(answer.partial_success, None);
    let metrics = server.get("/metrics").await.text().await.unwrap();
    let labels = "{project=\"p1\",instance=\"vm-a\",namespace=\"p1-prod\"}";
    for line in [
        format!("tally_compute_instance_cpu_usage_seconds_total{labels} 3.25\n"),
        format!("tally_compute_instance_memory_working_set_bytes{labels} 8192\n"),
    ] {
        assert!(
            metrics.contains(&line),
            "{line} missing from {metrics:.3000}"
        );
    }
    // A customer token still may not write metrics.
    let response = server
        .post("/api/v1/write", "project-token", &SNAPPY, body.clone())
        .await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let neither = start_with(false, false).await;
    let response = neither
        .post("/api/v1/write", "ingest-token", &SNAPPY, body)
        .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}
