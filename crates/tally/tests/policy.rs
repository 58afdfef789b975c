//! TelemetryPolicy end to end through a real `tally serve`: two projects,
//! each with a policy and an Exporter with `logs`, `metrics` and `traces`
//! sources to an OTLP test receiver built on the official protobuf
//! definitions. Access logs arrive over OTLP/HTTP and OTLP/gRPC, spans over
//! OTLP/HTTP and gRPC; each project receives exactly what its policy keeps,
//! never the other's; `tally get telemetrypolicies` shows status and
//! `tally policy render` the EnvoyProxy configuration.

use tally_testkit::otlp_receiver as receiver;

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use prost::Message as _;
use receiver::Receiver;
use tally_telemetry::otlp::string_attribute as kv;
use tally_telemetry::proto::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use tally_telemetry::proto::collector::trace::v1::ExportTraceServiceRequest;
use tally_telemetry::proto::common::v1::{AnyValue, KeyValue, any_value};
use tally_telemetry::proto::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use tally_telemetry::proto::trace::v1::{ResourceSpans, ScopeSpans, Span};

const TOKEN: &str = "policy-test-admin";
const WAIT: Duration = Duration::from_secs(30);

fn tally(base: &str, token: &str, args: &[&str], stdin: &str) -> (bool, String) {
    let output = common::cli(base, token, args, stdin);
    let out = String::from_utf8_lossy(&output.stdout).into_owned();
    let err = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.success(), out + &err)
}

fn apply(base: &str, token: &str, manifests: &str) {
    let (ok, out) = tally(base, token, &["apply", "-f", "-"], manifests);
    assert!(ok, "{out}");
}

fn world(receiver: &Receiver) -> String {
    let mut text = String::new();
    for (ns, project, gw) in [("shop", "shop", "edge"), ("acme", "acme", "gw")] {
        text += &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{resourcemanager.miloapis.com/project-name: {project}}}}}\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {gw}, namespace: {ns}}}\n---\n\
             apiVersion: telemetry.datumapis.com/v1alpha1\nkind: Exporter\nmetadata: {{name: otlp, namespace: {ns}}}\nspec:\n  sources:\n  - {{name: logs, logs: {{}}}}\n  - {{name: metrics, metrics: {{metricsql: ''}}}}\n  - {{name: traces, traces: {{}}}}\n  sinks: [{{name: r, otlp_http: {{endpoint: '{}'}}, batch: {{timeout: 50ms}}}}]\n---\n",
            receiver.endpoint(ns)
        );
    }
    text
}

/// The issue's policy for shop; acme keeps every log with two fields,
/// samples every trace and reports token usage.
const POLICIES: &str = r#"
apiVersion: telemetry.datumapis.com/v1alpha1
kind: TelemetryPolicy
metadata: {name: errors-and-tokens, namespace: shop}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: edge}]
  accessLogs:
    matches: [{cel: "response.code >= 500 || request.duration > duration('2s')"}]
    fields: [start_time, request.method, request.path, response.code, gen_ai.usage.input_tokens]
  metrics:
    dimensions: [{name: tenant, from: Header, value: x-tenant-id}, {name: tier, from: Literal, value: gold}]
  tracing:
    mode: Enabled
    samplingRate: {numerator: 1, denominator: 10}
    attributes: [{name: gen_ai.request.model, from: Attribute, value: "gen_ai.request.model"}]
  genAI: {}
"#;

const ACME_POLICY: &str = r#"
apiVersion: telemetry.datumapis.com/v1alpha1
kind: TelemetryPolicy
metadata: {name: everything, namespace: acme}
spec:
  targetRefs: [{group: "", kind: Namespace, name: acme}]
  accessLogs: {fields: [request.method, route.httproute]}
  tracing: {samplingRate: {numerator: 1, denominator: 1}}
  genAI: {}
"#;

fn attr(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

/// An access-log record as Envoy Gateway's OpenTelemetry sink sends it.
fn record(
    route: &str,
    gateway: (&str, &str),
    code: i64,
    ms: i64,
    extra: &[(&str, &str)],
) -> LogRecord {
    use any_value::Value::{IntValue, StringValue};
    let mut attributes = vec![
        attr("start_time", StringValue("2026-03-01T10:00:00Z".into())),
        attr("method", StringValue("POST".into())),
        attr("path", StringValue("/v1/chat".into())),
        attr("response_code", IntValue(code)),
        attr("duration", IntValue(ms)),
        attr("bytes_received", IntValue(10)),
        attr("bytes_sent", IntValue(20)),
        attr("route_name", StringValue(route.into())),
        attr("gateway.namespace", StringValue(gateway.0.into())),
        attr("gateway.name", StringValue(gateway.1.into())),
    ];
    for (k, v) in extra {
        attributes.push(attr(k, StringValue((*v).into())));
    }
    LogRecord {
        attributes,
        ..Default::default()
    }
}

fn logs(records: Vec<LogRecord>) -> ExportLogsServiceRequest {
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

/// Shop's records: kept are the 503 (r1), the slow one (r2) and the 500
/// with tokens (r3); r0 is neither.
fn shop_records() -> Vec<LogRecord> {
    let route = "httproute/shop/llm/rule/0";
    let gw = ("shop", "edge");
    vec![
        record(route, gw, 200, 10, &[("x-tenant-id", "t0")]),
        record(route, gw, 503, 40, &[("x-tenant-id", "t1")]),
        record(route, gw, 200, 2500, &[]),
        record(
            route,
            gw,
            500,
            900,
            &[
                ("gen_ai.usage.input_tokens", "120"),
                ("gen_ai.usage.output_tokens", "30"),
                ("gen_ai.request.model", "gpt-4o"),
            ],
        ),
    ]
}

async fn post_logs(base: &str, request: &ExportLogsServiceRequest) -> ExportLogsServiceResponse {
    let answer = common::post_protobuf(base, TOKEN, "/v1/logs", request.encode_to_vec()).await;
    ExportLogsServiceResponse::decode(&answer[..]).unwrap()
}

fn spans(
    namespace: &str,
    gateway: &str,
    ids: impl Iterator<Item = u64>,
) -> ExportTraceServiceRequest {
    let spans = ids
        .map(|i| {
            let mut trace_id = [0u8; 16];
            trace_id[8..].copy_from_slice(&i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes());
            Span {
                trace_id: trace_id.to_vec(),
                span_id: i.to_be_bytes().to_vec(),
                name: format!("span-{i}"),
                attributes: vec![
                    kv("route_name", &format!("httproute/{namespace}/llm/rule/0")),
                    kv("gateway.namespace", namespace),
                    kv("gateway.name", gateway),
                    kv("gen_ai.request.model", "gpt-4o"),
                ],
                ..Default::default()
            }
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn start(dir: &std::path::Path) -> common::Server {
    common::serve_with_config(
        dir,
        &format!(
            "token: {TOKEN}\ngrpcListen: 127.0.0.1:0\negress: {{allow: [127.0.0.0/8]}}\ntokens:\n  - {{name: shop, token: shop-token, scopes: [\"project:shop\"]}}\n"
        ),
    )
}

/// Waits until the server's policies are resolved (status shown).
async fn wait_accepted(base: &str) {
    for _ in 0..300 {
        let (_, out) = tally(base, TOKEN, &["get", "telemetrypolicies", "-n", "shop"], "");
        if out.contains("Accepted") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the policy never became Accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_projects_receive_exactly_what_their_policies_keep() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let base = server.base.clone();
    let receiver = Receiver::start().await;
    apply(&base, TOKEN, &world(&receiver));
    apply(&base, "shop-token", POLICIES);
    apply(&base, TOKEN, ACME_POLICY);
    wait_accepted(&base).await;

    // Access logs: shop's over OTLP/HTTP, acme's over OTLP/gRPC, and one
    // record naming a namespace nobody knows (refused, partial success).
    let mut shop = shop_records();
    shop.push(record(
        "httproute/nowhere/x/rule/0",
        ("nowhere", "gw"),
        500,
        1,
        &[],
    ));
    let answer = post_logs(&base, &logs(shop)).await;
    assert_eq!(answer.partial_success.unwrap().rejected_log_records, 1);
    let acme = logs(vec![
        record("httproute/acme/api/rule/0", ("acme", "gw"), 200, 5, &[]),
        record(
            "httproute/acme/api/rule/0",
            ("acme", "gw"),
            404,
            5,
            &[("gen_ai.usage.input_tokens", "7")],
        ),
    ]);
    let grpc = format!("http://{}", server.grpc.clone().unwrap());
    let mut client = tally_telemetry::proto::collector::logs::v1::logs_service_client::LogsServiceClient::connect(grpc.clone()).await.unwrap();
    let mut request = tonic::Request::new(acme);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    client.export(request).await.unwrap();

    assert_eq!(
        receiver.wait_until("shop", 3, WAIT, |e| e.logs.len()).await,
        3
    );
    assert_eq!(
        receiver.wait_until("acme", 2, WAIT, |e| e.logs.len()).await,
        2
    );
    receiver.with("shop", |e| {
        let codes: Vec<&str> = e
            .logs
            .iter()
            .map(|l| l.attributes["http.response.status_code"].as_str())
            .collect();
        assert_eq!(codes, ["503", "200", "500"]);
        let keys: Vec<&String> = e.logs[2].attributes.keys().collect();
        assert_eq!(
            keys,
            [
                "gen_ai.usage.input_tokens",
                "http.request.method",
                "http.response.status_code",
                "tally.request.time",
                "url.path"
            ]
        );
        assert_eq!(e.logs[2].attributes["gen_ai.usage.input_tokens"], "120");
        assert!(
            e.logs
                .iter()
                .all(|l| l.resource["tally.project.name"] == "shop")
        );
        assert_eq!(e.logs[0].time, 1_772_359_200_000_000_000);
    });
    receiver.with("acme", |e| {
        assert!(e.logs.iter().all(|l| l.attributes.len() == 2 && l.attributes["gateway.httproute.name"] == "api"));
        assert!(e.logs.iter().all(|l| l.resource["tally.project.name"] == "acme"));
    });

    // Metrics: shop's request histograms with its dimensions, GenAI token
    // usage for both; never the other project's.
    let has = |name: &'static str| {
        move |e: &receiver::Endpoint| e.points.iter().filter(|p| p.metric == name).count()
    };
    assert!(
        receiver
            .wait_until("shop", 1, WAIT, has("gen_ai.client.token.usage"))
            .await
            >= 1
    );
    assert!(
        receiver
            .wait_until("acme", 1, WAIT, has("gen_ai.client.token.usage"))
            .await
            >= 1
    );
    receiver.with("shop", |e| {
        let requests: Vec<_> = e
            .points
            .iter()
            .filter(|p| p.metric == "http.server.request.duration")
            .collect();
        assert_eq!(
            requests.iter().map(|p| p.value).sum::<f64>(),
            4.0,
            "every governed request is counted"
        );
        let t1 = requests
            .iter()
            .find(|p| p.attributes.get("tenant").map(String::as_str) == Some("t1"))
            .unwrap();
        assert_eq!(t1.attributes["tier"], "gold");
        assert_eq!(t1.attributes["http.response.status_code"], "503");
        assert_eq!(t1.resource["k8s.namespace.name"], "shop");
        let tokens: BTreeMap<&str, f64> = e
            .points
            .iter()
            .filter(|p| p.metric == "gen_ai.client.token.usage")
            .map(|p| (p.attributes["gen_ai.token.type"].as_str(), p.value))
            .collect();
        assert_eq!(tokens, BTreeMap::from([("input", 1.0), ("output", 1.0)]));
        assert!(
            e.points
                .iter()
                .all(|p| p.resource["k8s.namespace.name"] == "shop")
        );
    });
    receiver.with("acme", |e| {
        // No metrics section: no request histograms; genAI: token usage.
        assert!(e.points.iter().all(|p| p.metric.starts_with("gen_ai.")));
        assert!(
            e.points
                .iter()
                .all(|p| p.resource["k8s.namespace.name"] == "acme")
        );
    });

    // Traces: 1 in 10 for shop (decided by trace id), all for acme.
    let expected_shop = (0..200u64)
        .filter(|i| {
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes());
            tally_policy::keep_trace(&id, 1, 10)
        })
        .count();
    assert!((5..=40).contains(&expected_shop), "{expected_shop}");
    let answer = tally_delivery::client_builder()
        .build()
        .unwrap()
        .post(format!("{base}/v1/traces"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/x-protobuf")
        .body(spans("shop", "edge", 0..200).encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let mut traces = tally_telemetry::proto::collector::trace::v1::trace_service_client::TraceServiceClient::connect(grpc).await.unwrap();
    let mut request = tonic::Request::new(spans("acme", "gw", 0..20));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    traces.export(request).await.unwrap();
    assert_eq!(
        receiver
            .wait_until("shop", expected_shop, WAIT, |e| e.spans.len())
            .await,
        expected_shop
    );
    assert_eq!(
        receiver
            .wait_until("acme", 20, WAIT, |e| e.spans.len())
            .await,
        20
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    receiver.with("shop", |e| {
        assert_eq!(e.spans.len(), expected_shop);
        assert!(
            e.spans
                .iter()
                .all(|s| s.attributes["gen_ai.request.model"] == "gpt-4o")
        );
    });

    // Status, and the rendered proxy configuration.
    let (ok, table) = tally(
        &base,
        "shop-token",
        &["get", "telemetrypolicies", "-n", "shop"],
        "",
    );
    assert!(ok, "{table}");
    assert!(
        table.contains("errors-and-tokens")
            && table.contains("Accepted")
            && table.contains("Gateway/shop/edge"),
        "{table}"
    );
    let (ok, yaml) = tally(
        &base,
        "shop-token",
        &["policy", "render", "-n", "shop", "--envoy-gateway"],
        "",
    );
    assert!(ok, "{yaml}");
    // Comment lines say what Tally applies itself (the CEL tracing attribute).
    assert!(
        yaml.contains("# tracing attribute gen_ai.request.model"),
        "{yaml}"
    );
    let body: Vec<&str> = yaml.lines().filter(|l| !l.starts_with('#')).collect();
    let rendered: serde_json::Value = serde_norway::from_str(&body.join("\n")).unwrap();
    assert_eq!(rendered["kind"], "EnvoyProxy");
    assert_eq!(
        rendered["spec"]["telemetry"]["tracing"]["samplingFraction"]["denominator"],
        10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_conflict_and_a_project_cannot_target_another_projects_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let base = server.base.clone();
    let receiver = Receiver::start().await;
    apply(&base, TOKEN, &world(&receiver));
    apply(&base, "shop-token", POLICIES);
    // A second policy on the same gateway, created later: Conflicted.
    apply(
        &base,
        "shop-token",
        &POLICIES.replace("errors-and-tokens", "later"),
    );
    wait_accepted(&base).await;
    let (_, table) = tally(
        &base,
        TOKEN,
        &["get", "telemetrypolicies", "-n", "shop"],
        "",
    );
    let later = table.lines().find(|l| l.contains("later")).unwrap();
    assert!(
        later.contains("Conflicted") && later.contains("shop/errors-and-tokens"),
        "{table}"
    );
    // An invalid one is stored with its reason.
    let invalid = POLICIES
        .replace("errors-and-tokens", "broken")
        .replace("response.code >= 500", "response.code == 'x'");
    apply(&base, "shop-token", &invalid);
    let mut shown = String::new();
    for _ in 0..100 {
        (_, shown) = tally(
            &base,
            TOKEN,
            &[
                "get",
                "telemetrypolicy",
                "broken",
                "-n",
                "shop",
                "-o",
                "yaml",
            ],
            "",
        );
        if shown.contains("Invalid") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        shown.contains("reason: Invalid") && shown.contains("takes (int, string)"),
        "{shown}"
    );
    // The winner goes: the later one is in force.
    let (ok, out) = tally(
        &base,
        "shop-token",
        &[
            "delete",
            "telemetrypolicy",
            "errors-and-tokens",
            "-n",
            "shop",
        ],
        "",
    );
    assert!(ok, "{out}");
    let mut now = String::new();
    for _ in 0..100 {
        (_, now) = tally(
            &base,
            TOKEN,
            &["get", "telemetrypolicies", "-n", "shop"],
            "",
        );
        if now
            .lines()
            .any(|l| l.contains("later") && l.contains("Accepted"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        now.lines()
            .any(|l| l.contains("later") && l.contains("Accepted")),
        "{now}"
    );
    // Targeting another project's namespace is refused with a clear error.
    let foreign = "apiVersion: telemetry.datumapis.com/v1alpha1\nkind: TelemetryPolicy\nmetadata: {name: spy, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Namespace, name: acme}]\n  accessLogs: {}\n";
    let (ok, out) = tally(&base, "shop-token", &["apply", "-f", "-"], foreign);
    assert!(!ok);
    assert!(
        out.contains("targets Namespace acme, which belongs to another project"),
        "{out}"
    );
}
