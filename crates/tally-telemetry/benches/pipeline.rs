//! Throughput of the exporters' hot path: decode an OTLP/HTTP protobuf
//! request → select for 100 exporters with mixed selectors → encode every
//! exporter's request. Prints data points per second (one core) and the
//! memory a decoded data point takes.
//!
//! Run: `cargo bench -p tally-telemetry --bench pipeline`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use prost::Message as _;
use tally_model::Manifest;
use tally_telemetry::otlp::{data_point_count, decode_metrics_request, encode_metrics_request};
use tally_telemetry::proto::collector::metrics::v1::ExportMetricsServiceRequest;
use tally_telemetry::proto::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use tally_telemetry::proto::metrics::v1::{
    AggregationTemporality, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    metric::Data, number_data_point,
};
use tally_telemetry::proto::resource::v1::Resource;
use tally_telemetry::{
    Compression, Encoding, Exporter, InMemoryResourceIndex, ResourceRef, Router,
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

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

fn exporter(i: usize) -> Exporter {
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
        "apiVersion: telemetry.datumapis.com/v1alpha1\nkind: Exporter\nmetadata: {{name: e{i}, namespace: {ns}}}\nspec:\n  sources: [{{name: s, metrics: {metrics}}}]\n  sinks: [{{name: k, otlp_http: {{endpoint: 'http://127.0.0.1:4318'}}}}]\n"
    );
    Exporter::from_manifest(&Manifest::parse_documents(&text).expect("yaml")[0]).expect("valid")
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
}
