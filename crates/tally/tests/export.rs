//! Exporters through a real `tally serve`: manifests applied with the CLI,
//! metrics posted to `/v1/metrics`, points out at an OTLP test receiver
//! (built on the official protobuf definitions) with the bearer token of a
//! `Secret` — rotated without a restart, and never shown — and each
//! project's exporter sees only its own project's series.
//!
//! And through `tally export`, which runs without a ledger: series pulled
//! from a real VictoriaMetrics on loopback arrive once each, across a
//! SIGKILL and a restart, and never another project's; an OTLP/gRPC export
//! from a tonic client comes out at the sink.

use tally_testkit::otlp_receiver as receiver;
use tally_testkit::victoria_metrics;

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message as _;
use receiver::{Fault, Receiver};
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
    let output = common::cli(base, TOKEN, args, stdin);
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
    common::post_protobuf(base, TOKEN, "/v1/metrics", request.encode_to_vec()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exporters_ship_their_projects_metrics_with_a_rotating_secret() {
    let dir = tempfile::tempdir().unwrap();
    // The receiver is on loopback, which sinks may reach only if allowed.
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), "egress: {allow: [127.0.0.0/8]}\n").unwrap();
    let server = common::serve(
        dir.path(),
        &[
            ("TALLY_TOKEN", TOKEN),
            ("TALLY_CONFIG", config.path().to_str().unwrap()),
        ],
    );
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

const NAMESPACES: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: team-a, labels: \
    {resourcemanager.miloapis.com/project-name: acme}}\n---\n\
    apiVersion: v1\nkind: Namespace\nmetadata: {name: team-b, labels: \
    {resourcemanager.miloapis.com/project-name: globex}}\n";

/// An exporter with one source (`metrics` as YAML flow) and one sink.
fn pulling_exporter(namespace: &str, name: &str, metrics: &str, endpoint: &str) -> String {
    format!(
        "apiVersion: telemetry.datumapis.com/v1alpha1\nkind: Exporter\n\
         metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  sources:\n\
         \x20   - name: pulled\n      metrics: {metrics}\n\
         \x20 sinks:\n    - name: receiver\n      otlp_http:\n        endpoint: \"{endpoint}\"\n\
         \x20     batch: {{enabled: true, timeout: 100ms, maxSize: 50}}\n\
         \x20     retry: {{enabled: true, maxAttempts: 100, backoff: 50ms}}\n"
    )
}

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// Every sample a receiver endpoint holds: (namespace, metric, ms), sorted.
fn samples_at(receiver: &Receiver, name: &str) -> Vec<(String, String, i64)> {
    let mut samples: Vec<_> = receiver.with(name, |e| {
        e.points
            .iter()
            .map(|p| {
                assert!(!p.resource.contains_key("project"), "{p:?}");
                (
                    p.resource["namespace"].clone(),
                    p.metric.clone(),
                    (p.time / 1_000_000) as i64,
                )
            })
            .collect()
    });
    samples.sort();
    samples
}

/// Waits until endpoint `name` has a request in flight that hangs (a
/// `Fault::Hang` was queued): nothing it holds is delivered-but-unconfirmed.
async fn hung(receiver: &Receiver, name: &str) {
    let before = receiver.with(name, |e| e.requests);
    receiver.fail(name, [Fault::Hang(Duration::from_secs(20))]);
    let deadline = Instant::now() + WAIT;
    while receiver.with(name, |e| e.requests) == before {
        assert!(Instant::now() < deadline, "no request reached {name}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tally_export_pulls_each_sample_once_across_a_sigkill() {
    let Some(vm) = victoria_metrics::start().await else {
        return;
    };
    let vm = Arc::new(vm);
    let receiver = Receiver::start().await;
    let data = tempfile::tempdir().unwrap();
    let manifests = tempfile::tempdir().unwrap();
    std::fs::write(manifests.path().join("namespaces.yaml"), NAMESPACES).unwrap();
    std::fs::write(
        manifests.path().join("exporters.yaml"),
        format!(
            "{}---\n{}",
            pulling_exporter(
                "team-a",
                "hits",
                r#"{metricsql: '{__name__=~"hits.*"}'}"#,
                &receiver.endpoint("a"),
            ),
            // No selector: everything of its own namespace.
            pulling_exporter("team-b", "all", "{}", &receiver.endpoint("b")),
        ),
    )
    .unwrap();
    let config = manifests.path().join("tally-export.conf");
    std::fs::write(
        &config,
        format!(
            "victoriaMetrics: {{url: '{}', pullInterval: 200ms, lag: 2s, window: 3s, backfill: 30s}}\n\
             egress: {{allow: [127.0.0.0/8]}}\n",
            vm.base
        ),
    )
    .unwrap();
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--manifests",
        manifests.path().to_str().unwrap(),
    ];

    // Series of both projects, one sample each per import, time = now.
    let series: [&[(&str, &str)]; 4] = [
        &[("__name__", "hits_total"), ("namespace", "team-a")],
        &[("__name__", "misses_total"), ("namespace", "team-a")],
        &[("__name__", "hits_total"), ("namespace", "team-b")],
        // Claims globex in acme's namespace: nobody may have it.
        &[
            ("__name__", "hits_total"),
            ("namespace", "team-a"),
            ("project", "globex"),
        ],
    ];
    let imported: Arc<Mutex<Vec<i64>>> = Arc::default();
    let import_at = {
        let vm = Arc::clone(&vm);
        let imported = Arc::clone(&imported);
        move |t: i64| {
            let vm = Arc::clone(&vm);
            let imported = Arc::clone(&imported);
            async move {
                let lines: Vec<String> = series
                    .iter()
                    .map(|labels| victoria_metrics::series(labels, &[(t, (t % 1000) as f64)]))
                    .collect();
                vm.import(&lines).await;
                imported.lock().unwrap().push(t);
            }
        }
    };
    // Some history within the backfill, then live samples until told to stop.
    let start = now_ms();
    for t in (1..=20).map(|i| start - i * 500) {
        import_at(t).await;
    }
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let importer = tokio::spawn({
        let import_at = import_at.clone();
        async move {
            while !*stopped.borrow() {
                import_at(now_ms()).await;
                tokio::select! {
                    _ = stopped.changed() => {}
                    () = tokio::time::sleep(Duration::from_millis(150)) => {}
                }
            }
        }
    });

    let mut exporter = common::export(data.path(), &args, &[]);
    assert!(receiver.wait_for_points("a", 30, WAIT).await >= 30);
    assert!(receiver.wait_for_points("b", 15, WAIT).await >= 15);
    // SIGKILL while each endpoint holds a request that will never be
    // answered: what was queued (and the checkpoints written with it)
    // must survive, and be sent once.
    hung(&receiver, "a").await;
    hung(&receiver, "b").await;
    exporter.child.kill().unwrap();
    exporter.child.wait().unwrap();
    // Down for longer than the lag, while samples keep coming.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let exporter = common::export(data.path(), &args, &[]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.send(true).unwrap();
    importer.await.unwrap();

    let times = imported.lock().unwrap().clone();
    let expected = |pairs: &[(&str, &str)]| {
        let mut out: Vec<(String, String, i64)> = times
            .iter()
            .flat_map(|t| {
                pairs
                    .iter()
                    .map(move |(ns, metric)| ((*ns).to_owned(), (*metric).to_owned(), *t))
            })
            .collect();
        out.sort();
        out
    };
    let a = expected(&[("team-a", "hits_total")]);
    let b = expected(&[("team-b", "hits_total")]);
    // The last samples are read once they are `lag` old.
    receiver.wait_for_points("a", a.len(), WAIT).await;
    receiver.wait_for_points("b", b.len(), WAIT).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        samples_at(&receiver, "a"),
        a,
        "team-a: hits_total once each"
    );
    assert_eq!(
        samples_at(&receiver, "b"),
        b,
        "team-b: its own series once each"
    );

    // The source's health and counters are on the exporter's status.
    let shown = tally(
        &exporter.base,
        &["get", "exporter", "hits", "-n", "team-a", "-o", "yaml"],
        "",
    );
    assert!(
        shown.contains("SourceHealthy") && shown.contains("pointsSelected"),
        "{shown}"
    );
    let metrics = get(&exporter.base, "/metrics").await;
    assert!(
        metrics.contains(
            r#"component_kind="source",component_id="victoriametrics/team-a/hits/pulled""#
        ),
        "{metrics}"
    );
}

async fn get(base: &str, path: &str) -> String {
    let response = tally_delivery::client_builder()
        .build()
        .unwrap()
        .get(format!("{base}{path}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{path}: {}",
        response.status()
    );
    response.text().await.unwrap()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tally_export_takes_otlp_grpc_without_a_ledger() {
    use tally_telemetry::proto::collector::metrics::v1::metrics_service_client::MetricsServiceClient;

    let receiver = Receiver::start().await;
    let data = tempfile::tempdir().unwrap();
    let manifests = tempfile::tempdir().unwrap();
    std::fs::write(
        manifests.path().join("all.yaml"),
        format!(
            "{NAMESPACES}---\n{}",
            exporter("team-a", &receiver.endpoint("g"), false)
        ),
    )
    .unwrap();
    let server = common::export(
        data.path(),
        &[
            "--grpc-listen",
            "127.0.0.1:0",
            "--manifests",
            manifests.path().to_str().unwrap(),
            "--egress-allow",
            "127.0.0.0/8",
        ],
        &[("TALLY_TOKEN", TOKEN)],
    );
    let grpc = format!("http://{}", server.grpc.clone().expect("a gRPC address"));
    let mut client = MetricsServiceClient::connect(grpc).await.unwrap();
    let call = |token: &str, request: ExportMetricsServiceRequest| {
        let mut call = tonic::Request::new(request);
        call.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        call
    };

    // A wrong token is refused, and says nothing of the right one.
    let refused = client
        .export(call("wrong", request("team-a", 1)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(!refused.message().contains(TOKEN));

    // The exporter's points arrive at its sink; an unknown namespace is a
    // partial success.
    let mut unknown = request("nowhere", 2);
    unknown
        .resource_metrics
        .extend(request("team-a", 3).resource_metrics);
    let answer = client
        .export(call(TOKEN, unknown))
        .await
        .unwrap()
        .into_inner();
    let partial = answer.partial_success.expect("a partial success");
    assert_eq!(partial.rejected_data_points, 2);
    assert_eq!(receiver.wait_for_points("g", 1, WAIT).await, 1);
    receiver.with("g", |g| {
        let p = &g.points[0];
        assert_eq!((p.metric.as_str(), p.value), ("hits_total", 3.0));
        assert_eq!(p.resource["namespace"], "team-a");
    });
    let metrics = get(&server.base, "/metrics").await;
    assert!(
        metrics.contains(
            r#"tally_component_received_total{component_kind="source",component_id="otlp_grpc_metrics"} 4"#
        ),
        "{metrics}"
    );

    // No ledger: only the exporters' queues in the data dir, and no usage API.
    assert_eq!(entries(data.path()), vec!["exporter-queues".to_owned()]);
    let events = tally_delivery::client_builder()
        .build()
        .unwrap()
        .get(format!("{}/api/v1/events", server.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 404);
    assert_eq!(get(&server.base, "/readyz").await, "ready\n");
}

#[test]
fn a_malformed_egress_allow_list_stops_the_server_at_start() {
    let data = tempfile::tempdir().unwrap();
    for command in ["serve", "export"] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args([command, "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data.path().join(command))
            .args(["--egress-allow", "10.0.0.0/8", "--egress-allow", "10.0.0/8"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{command}: {stderr}");
        assert!(
            stderr.contains("egress.allow[1]: \"10.0.0/8\" is not a CIDR or an IP address"),
            "{command}: {stderr}"
        );
    }
}
