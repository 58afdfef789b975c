//! Exporters through a real `tally serve`: manifests applied with the CLI,
//! metrics posted to `/v1/metrics`, points out at an OTLP test receiver
//! (built on the official protobuf definitions) with the bearer token of a
//! `Secret` — rotated without a restart, and never shown — and each
//! project's exporter sees only its own project's series.

#[path = "../../tally-telemetry/tests/support/otlp_receiver.rs"]
mod receiver;

mod common;

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use prost::Message as _;
use receiver::Receiver;
use tally_telemetry::otlp::string_attribute as kv;
use tally_telemetry::proto::collector::metrics::v1::ExportMetricsServiceRequest;
use tally_telemetry::proto::metrics::v1::{
    AggregationTemporality, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    metric::Data, number_data_point,
};
use tally_telemetry::proto::resource::v1::Resource;

const TOKEN: &str = "export-test-admin";
const WAIT: Duration = Duration::from_secs(30);

fn tally(base: &str, args: &[&str], stdin: &str) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .env("TALLY_SERVER", base)
        .env("TALLY_TOKEN", TOKEN)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&output.stdout).into_owned();
    let err = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "tally {args:?}: {err}{out}");
    out + &err
}

fn secret(token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: otlp-token, namespace: team-a}}\n\
         stringData: {{token: {token}}}\n"
    )
}

fn exporter(namespace: &str, endpoint: &str, auth: bool) -> String {
    let auth = if auth {
        "        authentication: {type: bearerToken, secretRef: {name: otlp-token, key: token}}\n"
    } else {
        ""
    };
    format!(
        "apiVersion: telemetry.datumapis.com/v1alpha1\nkind: Exporter\n\
         metadata: {{name: hits, namespace: {namespace}}}\nspec:\n  sources:\n\
         \x20   - name: hits\n      metrics: {{metricsql: '{{__name__=~\"hits.*\"}}'}}\n\
         \x20 sinks:\n    - name: receiver\n      otlp_http:\n        endpoint: \"{endpoint}\"\n{auth}\
         \x20     batch: {{enabled: true, timeout: 100ms, maxSize: 100}}\n\
         \x20     retry: {{enabled: true, maxAttempts: 5, backoff: 100ms}}\n"
    )
}

/// One counter point and one gauge point for a resource in `namespace`.
fn request(namespace: &str, value: i64) -> ExportMetricsServiceRequest {
    let point = NumberDataPoint {
        time_unix_nano: 1_700_000_000_000_000_000 + value as u64,
        value: Some(number_data_point::Value::AsInt(value)),
        ..Default::default()
    };
    let metric = |name: &str| Metric {
        name: name.into(),
        data: Some(Data::Sum(Sum {
            data_points: vec![point.clone()],
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        })),
        ..Default::default()
    };
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![kv("namespace", namespace), kv("service.name", "svc")],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![metric("hits_total"), metric("misses_total")],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

async fn post(base: &str, request: &ExportMetricsServiceRequest) {
    let response = tally_delivery::client_builder()
        .build()
        .unwrap()
        .post(format!("{base}/v1/metrics"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/x-protobuf")
        .body(request.encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exporters_ship_their_projects_metrics_with_a_rotating_secret() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::serve(dir.path(), &[("TALLY_TOKEN", TOKEN)]);
    let base = server.base.clone();
    let receiver = Receiver::start().await;
    let namespaces = "apiVersion: v1\nkind: Namespace\nmetadata: {name: team-a, labels: \
                      {resourcemanager.miloapis.com/project-name: acme}}\n---\n\
                      apiVersion: v1\nkind: Namespace\nmetadata: {name: team-b, labels: \
                      {resourcemanager.miloapis.com/project-name: globex}}\n";
    let manifests = format!(
        "{namespaces}---\n{}---\n{}---\n{}",
        secret("tok-1"),
        exporter("team-a", &receiver.endpoint("a"), true),
        exporter("team-b", &receiver.endpoint("b"), false)
    );
    tally(&base, &["apply", "-f", "-"], &manifests);

    // The pipeline follows the store; send until the exporter is in place.
    let mut sent = 0;
    while receiver.with("a", |e| e.points.len()) == 0 {
        assert!(sent < 300, "no point reached the exporter");
        sent += 1;
        post(&base, &request("team-a", sent)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    post(&base, &request("team-b", 1000)).await;
    assert!(receiver.wait_for_points("b", 1, WAIT).await >= 1);
    receiver.with("a", |a| {
        assert!(
            a.points.iter().all(|p| p.metric == "hits_total"),
            "selector"
        );
        assert!(a.points.iter().all(|p| p.resource["namespace"] == "team-a"));
        assert!(
            a.authorizations.iter().all(|h| h == "Bearer tok-1"),
            "{:?}",
            a.authorizations
        );
    });
    receiver.with("b", |b| {
        assert!(
            b.points.iter().all(|p| p.resource["namespace"] == "team-b"),
            "isolation"
        );
        assert_eq!(b.points.len(), 1);
    });

    // Rotating the secret takes effect without a restart.
    tally(&base, &["apply", "-f", "-"], &secret("tok-2"));
    let mut rotated = false;
    for value in 2000..2300 {
        post(&base, &request("team-a", value)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if receiver.with("a", |a| {
            a.authorizations.iter().any(|h| h == "Bearer tok-2")
        }) {
            rotated = true;
            break;
        }
    }
    assert!(rotated, "the new token was never used");

    // Status on `tally get`, with counters and health, never the token.
    let mut shown = String::new();
    for _ in 0..100 {
        shown = tally(
            &base,
            &["get", "exporter", "hits", "-n", "team-a", "-o", "yaml"],
            "",
        );
        if shown.contains("pointsExported") && shown.contains("SinkHealthy") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        shown.contains("SinkHealthy") && shown.contains("pointsExported"),
        "{shown}"
    );
    let table = tally(&base, &["get", "exporters"], "");
    assert!(
        table.contains("team-a") && table.contains("team-b"),
        "{table}"
    );
    for text in [
        &shown,
        &table,
        &tally(&base, &["get", "secrets", "-o", "json"], ""),
    ] {
        assert!(!text.contains("tok-1") && !text.contains("tok-2"), "{text}");
    }
}
