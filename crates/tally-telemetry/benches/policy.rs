//! TelemetryPolicy's hot path on one core, in records per CPU-second of
//! this process (`/proc/self/stat`: other processes' load on a shared host
//! does not count), with a policy of 3 CEL matches, 10 fields and 2
//! dimensions (plus `genAI`), and without any policy (records read and
//! attributed only); the difference is the policy's cost per record.
//!
//! 1. `tally collect`'s path, the issue's: Envoy Gateway JSON access-log
//!    lines in batches of the agent's read size (1 MiB), gathered as its
//!    policy feed gathers them, then read, attributed, filtered by CEL,
//!    shaped, and encoded as the exporters' OTLP requests (kept log
//!    records as `ExportLogsServiceRequest` bytes, metrics as
//!    `ExportMetricsServiceRequest` bytes).
//! 2. `tally serve`'s receivers: the same records as the OTLP log records
//!    Envoy's OpenTelemetry sink sends (attributes), shaped and encoded.
//!
//! Run: `cargo bench -p tally-telemetry --bench policy` (`BENCH_ROUNDS`,
//! default 10: passes over the 100,000 records).

use std::collections::BTreeMap;
use std::sync::Arc;

use prost::Message as _;
use tally_model::Manifest;
use tally_policy::{Resolution, World};
use tally_telemetry::proto::collector::logs::v1::ExportLogsServiceRequest;
use tally_telemetry::proto::common::v1::{AnyValue, KeyValue, any_value::Value};
use tally_telemetry::proto::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use tally_telemetry::shaping::{Shaped, Shaper};
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

/// The exporters' bytes of what shaping made: the logs requests (already
/// encoded) and the metrics request, encoded.
fn encoded(shaped: &Shaped) -> (u64, usize) {
    let mut kept = 0;
    let mut bytes = shaped.metrics.encode_to_vec().len();
    for (request, n) in shaped.signals.values() {
        kept += n;
        bytes += request.len();
    }
    (kept, bytes)
}

/// Records per CPU-second through shape + encode over `rounds` passes;
/// the records kept and bytes encoded by one pass.
fn run(shaper: &Shaper, request: &ExportLogsServiceRequest, rounds: usize) -> (f64, u64, usize) {
    let n = request.resource_logs[0].scope_logs[0].log_records.len();
    let (mut kept, mut bytes) = (0, 0);
    let started = tally_testkit::cpu::cpu_seconds();
    for _ in 0..rounds {
        (kept, bytes) = encoded(&shaper.shape_logs(request));
    }
    let cpu = tally_testkit::cpu::cpu_seconds() - started;
    ((n * rounds) as f64 / cpu.max(0.01), kept, bytes)
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

/// The agent's read size: a policy feed batch holds at most this much.
const READ_BYTES: usize = 1 << 20;

/// `tally collect`'s path: the lines read in batches of [`READ_BYTES`],
/// each batch gathered as the agent's policy feed gathers it (one buffer
/// of `trim_end`ed lines and their ends), shaped, and encoded. Records
/// per CPU-second over `rounds` passes; the records kept and bytes
/// encoded by one pass.
fn run_lines(shaper: &Shaper, lines: &[String], rounds: usize) -> (f64, u64, usize) {
    let (mut text, mut ends) = (String::new(), Vec::new());
    let (mut kept, mut bytes) = (0, 0);
    let started = tally_testkit::cpu::cpu_seconds();
    for _ in 0..rounds {
        (kept, bytes) = (0, 0);
        let mut rest = lines;
        while !rest.is_empty() {
            let mut size = 0;
            let batch = rest
                .iter()
                .take_while(|l| {
                    size += l.len() + 1;
                    size <= READ_BYTES
                })
                .count()
                .max(1);
            for line in &rest[..batch] {
                text.push_str(line.trim_end());
                ends.push(text.len());
            }
            rest = &rest[batch..];
            let batch_text = &text;
            let lines = ends.iter().scan(0, |start, &end| {
                let line = &batch_text[*start..end];
                *start = end;
                Some(line)
            });
            let (k, b) = encoded(&shaper.shape_log_lines(lines));
            (kept, bytes) = (kept + k, bytes + b);
            std::hint::black_box(bytes);
            ends.clear();
            text.clear();
        }
    }
    let cpu = tally_testkit::cpu::cpu_seconds() - started;
    ((lines.len() * rounds) as f64 / cpu.max(0.01), kept, bytes)
}

fn report(what: &str, (base, _, _): (f64, u64, usize), (rate, kept, bytes): (f64, u64, usize)) {
    println!("{what}");
    println!("  no policy (read + attribute):  {base:>10.0} records per CPU-second");
    println!(
        "  3 matches, 10 fields, 2 dims:  {rate:>10.0} records per CPU-second ({kept} of 100000 kept, {bytes} bytes encoded)"
    );
    println!(
        "  added by the policy:           {:>10.3} µs of CPU per record",
        (1.0 / rate - 1.0 / base) * 1e6
    );
}

fn main() {
    let request = request(100_000);
    let policy: Manifest = serde_norway::from_str(POLICY).expect("the policy parses");
    let with = shaper(std::slice::from_ref(&policy));
    let without = shaper(&[]);
    let rounds = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(10);
    let lines = lines(&request);
    let bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
    println!(
        "100000 records, {:.0} bytes per JSON line; {rounds} rounds",
        bytes as f64 / 1e5
    );
    report(
        "tally collect: JSON lines -> policy -> OTLP encode",
        run_lines(&without, &lines, rounds),
        run_lines(&with, &lines, rounds),
    );
    report(
        "tally serve: OTLP log records -> policy -> OTLP encode",
        run(&without, &request, rounds),
        run(&with, &request, rounds),
    );
}
