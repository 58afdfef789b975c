//! Data points per CPU-second through the exporters' ingest path with one
//! exporter and one sink to a loopback OTLP/HTTP endpoint: decode an
//! OTLP/HTTP protobuf request (what `/v1/metrics` does after reading the
//! body) → route → batch by `batch.maxSize` → encode, gzip and send. The
//! endpoint runs in a child process (this binary again), so the CPU counted
//! (user + system of this process, all threads, from `/proc/self/stat`) is
//! only the exporting side's. Not counted: the HTTP server reading the
//! request body.
//!
//! Run: `cargo bench -p tally-telemetry --bench export_cpu [-- SIZES...]`
//! (default sizes: 500, the default `batch.maxSize`, 5000).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message as _;
use tally_delivery::Registry;
use tally_model::Manifest;
use tally_telemetry::otlp::{data_point_count, decode_metrics_request, string_attribute as kv};
use tally_telemetry::proto::collector::metrics::v1::ExportMetricsServiceRequest;
use tally_telemetry::proto::metrics::v1::{
    AggregationTemporality, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    metric::Data, number_data_point,
};
use tally_telemetry::proto::resource::v1::Resource;
use tally_telemetry::{
    Encoding, InMemoryResourceIndex, Pipeline, PipelineOptions, ResourceIndex, Secrets, Snapshot,
};

const RECEIVER: &str = "TALLY_EXPORT_CPU_RECEIVER";
/// Points sent per batch size.
const POINTS: u64 = 4_000_000;

/// The endpoint: answers every POST 200 with an empty OTLP response.
fn receiver() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        println!("{}", listener.local_addr().expect("addr"));
        let app = axum::Router::new().route(
            "/v1/metrics",
            axum::routing::post(|_body: axum::body::Bytes| async { "" }),
        );
        let _ = axum::serve(listener, app).await;
    });
}

use tally_testkit::cpu::cpu_seconds;

/// A request of 100 resources × 10 counters × 5 points, in namespace ns-a.
fn request(seed: u64) -> Vec<u8> {
    let resource_metrics = (0..100)
        .map(|r| ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![
                    kv("namespace", "ns-a"),
                    kv("resource_kind", "Gateway"),
                    kv("resource_group", "gateway.networking.k8s.io"),
                    kv("resource_name", &format!("gw-{r}")),
                ],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                metrics: (0..10)
                    .map(|m| Metric {
                        name: format!("network_bytes_{m}"),
                        data: Some(Data::Sum(Sum {
                            data_points: (0..5)
                                .map(|p| NumberDataPoint {
                                    attributes: vec![kv(
                                        "code",
                                        ["200", "404", "503", "500", "201"][p],
                                    )],
                                    start_time_unix_nano: 1_700_000_000_000_000_000,
                                    time_unix_nano: 1_700_000_060_000_000_000 + seed,
                                    value: Some(number_data_point::Value::AsInt(
                                        (seed * 31) as i64,
                                    )),
                                    ..Default::default()
                                })
                                .collect(),
                            aggregation_temporality: AggregationTemporality::Cumulative as i32,
                            is_monotonic: true,
                        })),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .collect();
    ExportMetricsServiceRequest { resource_metrics }.encode_to_vec()
}

fn snapshot(endpoint: &str, max_size: Option<u64>) -> Snapshot {
    let batch = max_size.map_or(String::new(), |n| format!(", batch: {{maxSize: {n}}}"));
    let text = format!(
        "apiVersion: telemetry.datumapis.com/v1alpha1\nkind: Exporter\nmetadata: {{name: e, namespace: ns-a}}\nspec:\n  sources: [{{name: s, metrics: {{metricsql: ''}}}}]\n  sinks: [{{name: k, otlp_http: {{endpoint: '{endpoint}'}}{batch}}}]\n"
    );
    let mut index = InMemoryResourceIndex::new();
    index.set_namespace("ns-a", "p", Default::default());
    let index: Arc<dyn ResourceIndex> = Arc::new(index);
    Snapshot {
        exporters: Manifest::parse_documents(&text).expect("manifest"),
        secrets: Secrets::new(),
        index,
        policies: Default::default(),
    }
}

async fn run(endpoint: &str, bodies: &[Vec<u8>], max_size: Option<u64>) {
    let options = PipelineOptions {
        egress: tally_delivery::EgressPolicy::parse(["127.0.0.0/8"]).expect("allow-list"),
        ..PipelineOptions::default()
    };
    let pipeline = Pipeline::new(Registry::new(), options).expect("pipeline");
    pipeline.update(snapshot(endpoint, max_size));
    let exported = || {
        pipeline
            .status("ns-a", "e")
            .map_or(0, |s| s.sinks[0].points_exported)
    };
    let (cpu, wall) = (cpu_seconds(), Instant::now());
    let (mut handed, mut dropped) = (0u64, 0u64);
    for body in bodies.iter().cycle() {
        if handed >= POINTS {
            break;
        }
        let request =
            decode_metrics_request(body, Encoding::Protobuf, None, 64 << 20).expect("decode");
        let report = pipeline.ingest(&request);
        handed += report.handed;
        dropped += report.dropped;
        // Keep the sink's queue short: measure throughput, not drops.
        while handed - exported() > 200_000 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    while exported() + dropped < handed {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (cpu, wall) = (cpu_seconds() - cpu, wall.elapsed().as_secs_f64());
    let status = pipeline.status("ns-a", "e").expect("status");
    let sink = &status.sinks[0];
    println!(
        "batch.maxSize {:>6}: {:>5.2} M points per CPU-second ({} points exported, {} dropped, {:.2} CPU-s, {:.2} s wall, {:.2} M points/s)",
        max_size.map_or("default".to_owned(), |n| n.to_string()),
        sink.points_exported as f64 / cpu / 1e6,
        sink.points_exported,
        sink.points_dropped.values().sum::<u64>(),
        cpu,
        wall,
        sink.points_exported as f64 / wall / 1e6,
    );
    pipeline.shutdown().await;
}

fn main() {
    if std::env::var_os(RECEIVER).is_some() {
        return receiver();
    }
    let mut child = Command::new(std::env::current_exe().expect("this binary"))
        .env(RECEIVER, "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("the receiver");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the receiver's address");
    let endpoint = format!("http://{}", line.trim());
    let sizes: Vec<Option<u64>> = match std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect::<Vec<_>>()
    {
        args if args.is_empty() => vec![Some(500), None, Some(5_000)],
        args => args.iter().map(|a| a.parse().ok()).collect(),
    };
    let bodies: Vec<Vec<u8>> = (0..20).map(request).collect();
    let points = data_point_count(
        &decode_metrics_request(&bodies[0], Encoding::Protobuf, None, 64 << 20).expect("decode"),
    );
    println!(
        "{points} points per request; {POINTS} points per run; endpoint {endpoint} (child process)"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for size in sizes {
        runtime.block_on(run(&endpoint, &bodies, size));
    }
    let _ = child.kill();
    let _ = child.wait();
}
