//! Throughput of the exporters' hot path: decode an OTLP/HTTP protobuf
//! request → select for 100 exporters with mixed selectors → encode every
//! exporter's request. Prints data points per second (one core) and the
//! memory a decoded data point takes.
//!
//! Run: `cargo bench -p tally-telemetry --bench pipeline`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message as _;
use tally_delivery::Registry;
use tally_model::Manifest;
use tally_telemetry::otlp::{data_point_count, decode_metrics_request, encode_metrics_request};
use tally_telemetry::proto::collector::metrics::v1::ExportMetricsServiceRequest;
use tally_telemetry::proto::common::v1::InstrumentationScope;
use tally_telemetry::proto::metrics::v1::{
    AggregationTemporality, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    metric::Data, number_data_point,
};
use tally_telemetry::proto::resource::v1::Resource;
use tally_telemetry::{
    Compression, Encoding, Exporter, InMemoryResourceIndex, Pipeline, PipelineOptions,
    ResourceIndex, ResourceRef, Router, Secrets, Snapshot,
};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const PROJECTS: usize = 10;
const NAMESPACES: usize = 50;
const RESOURCES_PER_REQUEST: usize = 100;
const METRICS_PER_RESOURCE: usize = 10;
const POINTS_PER_METRIC: usize = 5;
const GW: &str = "gateway.networking.k8s.io";

use tally_telemetry::otlp::string_attribute as kv;

fn exporter_manifest(i: usize, endpoint: &str, batch: &str) -> Manifest {
    let ns = format!("ns-{}", i % NAMESPACES);
    let metrics = match i % 10 {
        0..=3 => format!(
            r#"{{metricsql: '{{service_name="networking.datumapis.com", resource_kind="Gateway", __name__=~"network_bytes_.*|requests_{}"}}'}}"#,
            i % 7
        ),
        4 | 5 => r#"{metricsql: '{__name__="requests_total", code=~"5.."}'}"#.to_owned(),
        6 | 7 => format!(
            "{{resourceSelectors: [{{labelSelectors: {{matchLabels: {{app: app-{}}}}}, kinds: [{{apiGroups: [{GW}], resources: [gateways]}}]}}]}}",
            i % 3
        ),
        8 => "{resourceSelectors: [{namespaceSelector: {matchLabels: {environment: production}}, kinds: [{apiGroups: ['*'], resources: [httproutes]}]}]}".to_owned(),
        _ => "{metricsql: ''}".to_owned(),
    };
    let text = format!(
        "apiVersion: telemetry.datumapis.com/v1alpha1\nkind: Exporter\nmetadata: {{name: e{i}, namespace: {ns}}}\nspec:\n  sources: [{{name: s, metrics: {metrics}}}]\n  sinks: [{{name: k, otlp_http: {{endpoint: '{endpoint}'}}, batch: {batch}}}]\n"
    );
    Manifest::parse_documents(&text).expect("yaml").remove(0)
}

fn exporter(i: usize) -> Exporter {
    Exporter::from_manifest(&exporter_manifest(i, "http://127.0.0.1:4318", "{}")).expect("valid")
}

fn index() -> InMemoryResourceIndex {
    let mut index = InMemoryResourceIndex::new();
    for n in 0..NAMESPACES {
        let env = if n % 2 == 0 { "production" } else { "staging" };
        index.set_namespace(
            &format!("ns-{n}"),
            &format!("p{}", n % PROJECTS),
            [("environment".to_owned(), env.to_owned())].into(),
        );
        for r in 0..RESOURCES_PER_REQUEST {
            index.set_resource_labels(
                ResourceRef {
                    group: GW,
                    kind: "Gateway",
                    namespace: &format!("ns-{n}"),
                    name: &format!("gw-{r}"),
                },
                [("app".to_owned(), format!("app-{}", r % 4))].into(),
            );
        }
    }
    index
}

fn request(seed: usize) -> ExportMetricsServiceRequest {
    let names = [
        "network_bytes_sent",
        "network_bytes_received",
        "requests_total",
        "requests_3",
        "connections_open",
    ];
    let resource_metrics = (0..RESOURCES_PER_REQUEST)
        .map(|r| {
            let (group, kind, name) = if r % 3 == 0 {
                (GW, "HTTPRoute", format!("route-{r}"))
            } else {
                (GW, "Gateway", format!("gw-{r}"))
            };
            let metrics = (0..METRICS_PER_RESOURCE)
                .map(|m| {
                    let points = (0..POINTS_PER_METRIC)
                        .map(|p| NumberDataPoint {
                            attributes: vec![
                                kv("code", ["200", "404", "503"][p % 3]),
                                kv("method", "GET"),
                            ],
                            start_time_unix_nano: 1_700_000_000_000_000_000,
                            time_unix_nano: 1_700_000_060_000_000_000 + seed as u64,
                            value: Some(number_data_point::Value::AsInt((seed * 31 + p) as i64)),
                            ..Default::default()
                        })
                        .collect();
                    let data = if m % 2 == 0 {
                        Data::Sum(Sum {
                            data_points: points,
                            aggregation_temporality: AggregationTemporality::Cumulative as i32,
                            is_monotonic: true,
                        })
                    } else {
                        Data::Gauge(Gauge {
                            data_points: points,
                        })
                    };
                    Metric {
                        name: format!(
                            "{}{}",
                            names[m % names.len()],
                            if m < names.len() { "" } else { "_x" }
                        ),
                        unit: "1".into(),
                        data: Some(data),
                        ..Default::default()
                    }
                })
                .collect();
            ResourceMetrics {
                resource: Some(Resource {
                    attributes: vec![
                        kv(
                            "project",
                            &format!("p{}", (seed + r) % NAMESPACES % PROJECTS),
                        ),
                        kv("namespace", &format!("ns-{}", (seed + r) % NAMESPACES)),
                        kv("resource_group", group),
                        kv("resource_kind", kind),
                        kv("resource_name", &name),
                        kv("service.name", "networking.datumapis.com"),
                        kv("region", "eu-west"),
                    ],
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(InstrumentationScope {
                        name: "envoy".into(),
                        ..Default::default()
                    }),
                    metrics,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }
        })
        .collect();
    ExportMetricsServiceRequest { resource_metrics }
}

fn run(
    label: &str,
    bodies: &[Vec<u8>],
    router: &Router,
    index: &InMemoryResourceIndex,
    compression: Compression,
    rounds: usize,
) {
    let points_per_request = data_point_count(&request(0));
    let mut out_points = 0usize;
    let mut out_bytes = 0usize;
    let begin = Instant::now();
    for _ in 0..rounds {
        for body in bodies {
            let req =
                decode_metrics_request(body, Encoding::Protobuf, None, usize::MAX).expect("decode");
            let (routed, _) = router.route(&req, index);
            for r in &routed {
                out_points += data_point_count(&r.request);
                out_bytes += encode_metrics_request(&r.request, Encoding::Protobuf, compression)
                    .expect("encode")
                    .body
                    .len();
            }
        }
    }
    let elapsed = begin.elapsed().as_secs_f64();
    let points = (rounds * bodies.len() * points_per_request) as f64;
    println!(
        "{label:<28} {:>12.0} points/s in   {:>12.0} points/s out   {:>7.1} MB/s out   ({} points in, {:.2}s)",
        points / elapsed,
        out_points as f64 / elapsed,
        out_bytes as f64 / elapsed / 1e6,
        points,
        elapsed
    );
}

fn main() {
    let exporters: Vec<Exporter> = (0..100).map(exporter).collect();
    let router = Router::new(exporters);
    let index = index();
    let bodies: Vec<Vec<u8>> = (0..8).map(|s| request(s).encode_to_vec()).collect();
    let points_per_request = data_point_count(&request(0));
    println!(
        "100 exporters, {NAMESPACES} namespaces in {PROJECTS} projects; requests of {points_per_request} points ({} resources), {} bytes protobuf",
        RESOURCES_PER_REQUEST,
        bodies[0].len()
    );

    let before = LIVE.load(Ordering::Relaxed);
    let decoded =
        decode_metrics_request(&bodies[0], Encoding::Protobuf, None, usize::MAX).expect("decode");
    let after = LIVE.load(Ordering::Relaxed);
    println!(
        "memory: decoded request {:.0} bytes/point (wire {:.0} bytes/point)",
        (after - before) as f64 / points_per_request as f64,
        bodies[0].len() as f64 / points_per_request as f64
    );
    let (routed, _) = router.route(&decoded, &index);
    let after_route = LIVE.load(Ordering::Relaxed);
    let routed_points: usize = routed.iter().map(|r| data_point_count(&r.request)).sum();
    println!(
        "memory: selected copies {:.0} bytes/selected point ({routed_points} selected of {points_per_request}, {} exporters receive)",
        (after_route - after) as f64 / routed_points.max(1) as f64,
        routed.len()
    );
    drop((routed, decoded));

    let begin = Instant::now();
    let mut n = 0;
    while begin.elapsed().as_secs_f64() < 1.0 {
        for body in &bodies {
            n += data_point_count(
                &decode_metrics_request(body, Encoding::Protobuf, None, usize::MAX)
                    .expect("decode"),
            );
        }
    }
    println!(
        "{:<28} {:>12.0} points/s",
        "decode only",
        n as f64 / begin.elapsed().as_secs_f64()
    );
    run(
        "decode→select→encode",
        &bodies,
        &router,
        &index,
        Compression::None,
        20,
    );
    run(
        "decode→select→encode+gzip",
        &bodies,
        &router,
        &index,
        Compression::Gzip,
        10,
    );

    let decoded: Vec<ExportMetricsServiceRequest> = bodies
        .iter()
        .map(|b| decode_metrics_request(b, Encoding::Protobuf, None, usize::MAX).expect("decode"))
        .collect();
    encoded_runs(&bodies, &decoded, &router, &index, points_per_request);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(pipeline_runs(&decoded, points_per_request));
}

/// The selection written straight to protobuf ([`Router::route_encoded`]),
/// with and without decoding the request first.
fn encoded_runs(
    bodies: &[Vec<u8>],
    decoded: &[ExportMetricsServiceRequest],
    router: &Router,
    index: &InMemoryResourceIndex,
    points_per_request: usize,
) {
    for (label, decode) in [
        ("select+encode (borrowed)", false),
        ("decode→select+encode", true),
    ] {
        let (mut out_points, mut out_bytes, mut requests) = (0u64, 0usize, 0usize);
        let begin = Instant::now();
        while begin.elapsed().as_secs_f64() < 2.0 {
            for (body, request) in bodies.iter().zip(decoded) {
                let owned;
                let request = if decode {
                    owned = decode_metrics_request(body, Encoding::Protobuf, None, usize::MAX)
                        .expect("decode");
                    &owned
                } else {
                    request
                };
                let (routes, _) = router.route_encoded(request, index);
                for r in &routes {
                    out_points += r.points;
                    out_bytes += r.bytes.len();
                }
                requests += 1;
            }
        }
        let elapsed = begin.elapsed().as_secs_f64();
        println!(
            "{label:<28} {:>12.0} points/s in   {:>12.0} points/s out   {:>7.1} MB/s out",
            (requests * points_per_request) as f64 / elapsed,
            out_points as f64 / elapsed,
            out_bytes as f64 / elapsed / 1e6,
        );
    }
}

/// Pipeline defaults, with the loopback endpoints below allowed (sinks
/// refuse loopback by default).
fn loopback_allowed() -> PipelineOptions {
    PipelineOptions {
        egress: tally_delivery::EgressPolicy::parse(["127.0.0.0/8"]).expect("allow-list"),
        ..PipelineOptions::default()
    }
}

/// A loopback OTLP endpoint answering 200 at once, noting when each
/// request arrived; and one that accepts connections and never answers.
async fn endpoints() -> (String, String, Arc<Mutex<Vec<Instant>>>) {
    let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let seen = Arc::clone(&arrivals);
    let app = axum::Router::new().route(
        "/v1/metrics",
        axum::routing::post(move |_body: axum::body::Bytes| {
            let seen = Arc::clone(&seen);
            async move {
                seen.lock().expect("lock").push(Instant::now());
                ""
            }
        }),
    );
    let live = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let live_url = format!("http://{}", live.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(live, app).await });
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let dead_url = format!("http://{}", dead.local_addr().expect("addr"));
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = dead.accept().await {
            held.push(socket);
        }
    });
    (live_url, dead_url, arrivals)
}

fn pipeline_snapshot(exporters: Vec<Manifest>) -> Snapshot {
    let index: Arc<dyn ResourceIndex> = Arc::new(index());
    Snapshot {
        exporters,
        secrets: Secrets::new(),
        index,
        policies: Default::default(),
    }
}

/// The exporters' runtime: `Pipeline::ingest` on the calling thread (the
/// ingestion path) with 100 exporters, memory per queued point, and the
/// latency a point gains from `ingest` to a loopback endpoint.
async fn pipeline_runs(decoded: &[ExportMetricsServiceRequest], points_per_request: usize) {
    let (live, dead, arrivals) = endpoints().await;
    let manifests = |endpoint: &str, batch: &str| -> Vec<Manifest> {
        (0..100)
            .map(|i| exporter_manifest(i, endpoint, batch))
            .collect()
    };
    // 1. ingest throughput, sinks to a dead endpoint with roomy queues.
    let options = PipelineOptions {
        handoff_capacity: 1 << 20,
        queue_max_batches: 1 << 20,
        queue_max_bytes: 8 << 30,
        request_timeout: Duration::from_secs(600),
        ..loopback_allowed()
    };
    let pipeline = Pipeline::new(Registry::new(), options).expect("pipeline");
    pipeline.update(pipeline_snapshot(manifests(
        &dead,
        "{maxSize: 100000, timeout: 600s}",
    )));
    let before = LIVE.load(Ordering::Relaxed);
    let (mut handed, mut requests) = (0u64, 0usize);
    let begin = Instant::now();
    let mut latencies = Vec::new();
    while begin.elapsed().as_secs_f64() < 2.0 {
        for request in decoded {
            let started = Instant::now();
            handed += pipeline.ingest(request).handed;
            latencies.push(started.elapsed());
            requests += 1;
        }
    }
    let elapsed = begin.elapsed().as_secs_f64();
    latencies.sort();
    println!(
        "{:<28} {:>12.0} points/s in   {:>12.0} points/s to sinks   ingest() p50 {:?} p99 {:?} per request of {points_per_request} points",
        "Pipeline::ingest",
        (requests * points_per_request) as f64 / elapsed,
        handed as f64 / elapsed,
        latencies[latencies.len() / 2],
        latencies[latencies.len() * 99 / 100],
    );
    // Let the sinks' tasks take every share into their queues.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = LIVE.load(Ordering::Relaxed);
    let queued: u64 = (0..100)
        .filter_map(|i| pipeline.status(&format!("ns-{}", i % NAMESPACES), &format!("e{i}")))
        .flat_map(|s| s.sinks)
        .map(|s| s.points_queued)
        .sum();
    println!(
        "memory: {:.0} bytes per queued point ({queued} points queued in 100 sinks)",
        after.saturating_sub(before) as f64 / queued.max(1) as f64
    );
    drop(pipeline);
    // 2. latency from ingest to a loopback endpoint, batching off.
    let pipeline = Pipeline::new(Registry::new(), loopback_allowed()).expect("pipeline");
    pipeline.update(pipeline_snapshot(vec![exporter_manifest(
        9,
        &live,
        "{enabled: false}",
    )]));
    let mut added = Vec::new();
    for request in decoded.iter().cycle().take(400) {
        let seen = arrivals.lock().expect("lock").len();
        let started = Instant::now();
        if pipeline.ingest(request).handed == 0 {
            continue;
        }
        loop {
            if let Some(at) = arrivals.lock().expect("lock").get(seen) {
                added.push(at.duration_since(started));
                break;
            }
            tokio::time::sleep(Duration::from_micros(50)).await;
        }
    }
    added.sort();
    if !added.is_empty() {
        println!(
            "latency ingest → loopback endpoint (batching off, protobuf+gzip): p50 {:?} p99 {:?} ({} requests)",
            added[added.len() / 2],
            added[added.len() * 99 / 100],
            added.len()
        );
    }
    pipeline.shutdown().await;
}
