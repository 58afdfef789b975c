//! TelemetryPolicy's hot path on one core: OTLP access-log records (as
//! Envoy's OpenTelemetry sink sends them) → record → attribution → policy
//! (CEL matches, fields, dimensions, GenAI) → kept records and metrics
//! encoded as the exporters' OTLP requests. Prints records per second with
//! a policy of 3 matches, 10 fields and 2 dimensions, and without any
//! policy (records read and attributed only), and the difference per
//! record.
//!
//! The second part is `tally collect`'s path: the same records as Envoy
//! Gateway JSON access-log lines, each wrapped as the agent's policy feed
//! wraps a line (an OTLP log record whose body is the line), shaped and
//! encoded; it reports records per CPU-second of this process (insensitive
//! to other processes' load), with and without the policy.
//!
//! Run: `cargo bench -p tally-telemetry --bench policy`

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use prost::Message as _;
use tally_model::Manifest;
use tally_policy::{Resolution, World};
use tally_telemetry::proto::collector::logs::v1::ExportLogsServiceRequest;
use tally_telemetry::proto::common::v1::{AnyValue, KeyValue, any_value::Value};
use tally_telemetry::proto::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use tally_telemetry::shaping::{ExportLogsOrTraces, Shaper};
use tally_telemetry::{InMemoryResourceIndex, ResourceIndex};

const POLICY: &str = r#"
apiVersion: telemetry.datumapis.com/v1alpha1
kind: TelemetryPolicy
metadata: {name: p, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: edge}]
  accessLogs:
    matches:
    - {cel: "response.code >= 500"}
    - {cel: "request.duration > duration('2s')"}
    - {cel: "request.headers['x-tenant-id'] == 'acme' && request.method == 'DELETE'"}
    fields: [start_time, request.method, request.path, request.host, response.code, request.duration,
             request.size, response.size, route.httproute, gen_ai.usage.input_tokens]
  metrics:
    dimensions: [{name: tenant, from: Header, value: x-tenant-id}, {name: tier, from: Literal, value: gold}]
  genAI: {}
"#;

fn attr(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

/// Records like a busy gateway's: 1 in 20 an error, 1 in 50 slow, 1 in 4
/// an AI call with token counts.
fn request(n: usize) -> ExportLogsServiceRequest {
    let methods = ["GET", "POST", "DELETE", "PUT"];
    let records = (0..n)
        .map(|i| {
            let code = if i % 20 == 0 { 503 } else { 200 };
            let ms = if i % 50 == 0 { 2500 } else { (i % 300) as i64 };
            let mut attributes = vec![
                attr(
                    "start_time",
                    Value::StringValue("2026-03-01T10:00:00.123Z".into()),
                ),
                attr("method", Value::StringValue(methods[i % 4].into())),
                attr(
                    "path",
                    Value::StringValue(format!("/api/v1/items/{}", i % 1000)),
                ),
                attr(":authority", Value::StringValue("shop.example.com".into())),
                attr("protocol", Value::StringValue("HTTP/2".into())),
                attr("response_code", Value::IntValue(code)),
                attr("duration", Value::IntValue(ms)),
                attr("bytes_received", Value::IntValue(120)),
                attr("bytes_sent", Value::IntValue(4096)),
                attr(
                    "route_name",
                    Value::StringValue(format!("httproute/shop/r{}/rule/0", i % 10)),
                ),
                attr("gateway.namespace", Value::StringValue("shop".into())),
                attr("gateway.name", Value::StringValue("edge".into())),
                attr("x-request-id", Value::StringValue(format!("req-{i}"))),
                attr(
                    "x-tenant-id",
                    Value::StringValue(["acme", "globex"][i % 2].into()),
                ),
            ];
            if i % 4 == 0 {
                attributes.push(attr("gen_ai.usage.input_tokens", Value::IntValue(120)));
                attributes.push(attr("gen_ai.usage.output_tokens", Value::IntValue(30)));
                attributes.push(attr(
                    "gen_ai.request.model",
                    Value::StringValue("gpt-4o".into()),
                ));
            }
            LogRecord {
                attributes,
                ..Default::default()
            }
        })
        .collect();
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            scope_logs: vec![ScopeLogs {
                log_records: records,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn shaper(policies: &[Manifest]) -> Shaper {
    let mut index = InMemoryResourceIndex::new();
    index.set_namespace("shop", "shop", BTreeMap::new());
    let mut world = World::default();
    world.namespaces.insert("shop".into(), Some("shop".into()));
    world.gateways.insert(("shop".into(), "edge".into()));
    let index: Arc<dyn ResourceIndex> = Arc::new(index);
    Shaper::new(Arc::new(Resolution::resolve(policies, &world)), index)
}

/// Records per second through shape + encode, best of `rounds`.
fn run(shaper: &Shaper, request: &ExportLogsServiceRequest, rounds: usize) -> (f64, u64, usize) {
    let n = request.resource_logs[0].scope_logs[0].log_records.len();
    let mut best = f64::MAX;
    let (mut kept, mut bytes) = (0, 0);
    for _ in 0..rounds {
        let started = Instant::now();
        let shaped = shaper.shape_logs(request);
        kept = 0;
        bytes = 0;
        for (request, n) in shaped.signals.values() {
            kept += n;
            bytes += match request {
                ExportLogsOrTraces::Logs(r) => r.encode_to_vec().len(),
                ExportLogsOrTraces::Traces(r) => r.encode_to_vec().len(),
            };
        }
        bytes += shaped.metrics.encode_to_vec().len();
        best = best.min(started.elapsed().as_secs_f64());
    }
    (n as f64 / best, kept, bytes)
}

/// The records as the JSON access-log lines Envoy Gateway writes.
fn lines(request: &ExportLogsServiceRequest) -> Vec<String> {
    request.resource_logs[0].scope_logs[0]
        .log_records
        .iter()
        .map(|r| {
            let object: serde_json::Map<String, serde_json::Value> = r
                .attributes
                .iter()
                .map(|kv| {
                    let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                        Some(Value::StringValue(s)) => serde_json::Value::from(s.as_str()),
                        Some(Value::IntValue(i)) => serde_json::Value::from(*i),
                        _ => serde_json::Value::Null,
                    };
                    (kv.key.clone(), value)
                })
                .collect();
            serde_json::Value::Object(object).to_string()
        })
        .collect()
}

/// `tally collect`'s policy feed: each line an OTLP log record whose body
/// is the line, shaped, kept records and metrics encoded. Records per
/// CPU-second over `rounds` passes.
fn run_lines(shaper: &Shaper, lines: &[String], rounds: usize) -> f64 {
    let started = tally_testkit::cpu::cpu_seconds();
    for _ in 0..rounds {
        let log_records = lines
            .iter()
            .map(|line| LogRecord {
                body: Some(AnyValue {
                    value: Some(Value::StringValue(line.trim_end().to_owned())),
                }),
                ..LogRecord::default()
            })
            .collect();
        let request = ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                scope_logs: vec![ScopeLogs {
                    log_records,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let shaped = shaper.shape_logs(&request);
        let mut bytes = shaped.metrics.encode_to_vec().len();
        for (request, _) in shaped.signals.values() {
            bytes += match request {
                ExportLogsOrTraces::Logs(r) => r.encode_to_vec().len(),
                ExportLogsOrTraces::Traces(r) => r.encode_to_vec().len(),
            };
        }
        std::hint::black_box(bytes);
    }
    let cpu = tally_testkit::cpu::cpu_seconds() - started;
    (lines.len() * rounds) as f64 / cpu.max(0.01)
}

fn main() {
    let request = request(100_000);
    let policy: Manifest = serde_norway::from_str(POLICY).expect("the policy parses");
    let with = shaper(std::slice::from_ref(&policy));
    let without = shaper(&[]);
    let (base, _, _) = run(&without, &request, 5);
    let (rate, kept, bytes) = run(&with, &request, 5);
    println!("no policy (read + attribute):   {:>10.0} records/s", base);
    println!(
        "3 matches, 10 fields, 2 dims:   {:>10.0} records/s ({kept} of 100000 kept, {bytes} bytes encoded)",
        rate
    );
    println!(
        "added per record:               {:>10.0} ns",
        (1.0 / rate - 1.0 / base) * 1e9
    );
    let lines = lines(&request);
    let rounds = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(10);
    let base = run_lines(&without, &lines, rounds);
    let rate = run_lines(&with, &lines, rounds);
    println!("collect lines, no policy:       {base:>10.0} records per CPU-second");
    println!("collect lines, the policy:      {rate:>10.0} records per CPU-second");
    println!(
        "added per record:               {:>10.0} ns of CPU",
        (1.0 / rate - 1.0 / base) * 1e9
    );
}
