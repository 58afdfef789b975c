//! Instance logs through the real binary: OTLP/gRPC and OTLP/HTTP in,
//! `tally logs` (with `--grep`, `--stream`, `--follow`) out, and kill -9 of
//! `tally serve` under an at-least-once sender with record ids: nothing
//! lost, nothing duplicated.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tally_telemetry::proto::collector::logs::v1::ExportLogsServiceRequest;
use tally_telemetry::proto::collector::logs::v1::logs_service_client::LogsServiceClient;

const ADMIN: &str = "admin-token";
const CONFIG: &str = "token: admin-token\ngrpcListen: 127.0.0.1:0\ntokens:\n  - {name: agents, token: ingest-token, scopes: [ingest]}\n  - {name: acme, token: acme-token, scopes: [\"project:acme\"]}\n";

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// An OTLP/JSON logs request of one instance of acme; `(stream, line, id)`.
fn request(instance: &str, lines: &[(&str, String, Option<String>)]) -> Value {
    let t = now_nanos();
    json!({"resourceLogs": [{
        "resource": {"attributes": [
            {"key": "project", "value": {"stringValue": "acme"}},
            {"key": "instance", "value": {"stringValue": instance}},
        ]},
        "scopeLogs": [{"logRecords": lines.iter().enumerate().map(|(i, (stream, line, id))| {
            let mut attributes = vec![json!({"key": "log.iostream", "value": {"stringValue": stream}})];
            if let Some(id) = id {
                attributes.push(json!({"key": "log.record.uid", "value": {"stringValue": id}}));
            }
            json!({"timeUnixNano": (t + i as u64).to_string(), "body": {"stringValue": line}, "attributes": attributes})
        }).collect::<Vec<_>>()}],
    }]})
}

async fn post(
    http: &reqwest::Client,
    base: &str,
    body: &Value,
) -> Result<reqwest::StatusCode, reqwest::Error> {
    Ok(http
        .post(format!("{base}/v1/logs"))
        .bearer_auth("ingest-token")
        .json(body)
        .send()
        .await?
        .status())
}

#[tokio::test]
async fn tally_logs_reads_greps_and_follows_what_grpc_and_http_sent() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::serve_with_config(dir.path(), CONFIG);
    let http = tally_delivery::client_builder().build().unwrap();
    let lines = [
        ("stdout", "listening on :8080".to_owned(), None),
        ("stderr", "warn: slow query\n  took 3s".to_owned(), None),
    ];
    assert_eq!(
        post(&http, &server.base, &request("web-0", &lines))
            .await
            .unwrap(),
        200
    );
    // The same path over gRPC.
    let grpc: ExportLogsServiceRequest = serde_json::from_value(request(
        "web-0",
        &[("stdout", "GET /healthz 200".to_owned(), None)],
    ))
    .unwrap();
    let mut client = LogsServiceClient::connect(format!("http://{}", server.grpc.clone().unwrap()))
        .await
        .unwrap();
    let mut call = tonic::Request::new(grpc);
    call.metadata_mut()
        .insert("authorization", "Bearer ingest-token".parse().unwrap());
    client.export(call).await.unwrap();

    let out = common::cli(
        &server.base,
        "acme-token",
        &["logs", "web-0", "--project", "acme", "--raw"],
        "",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "listening on :8080\nwarn: slow query\n  took 3s\nGET /healthz 200\n"
    );
    let out = common::cli(
        &server.base,
        "acme-token",
        &[
            "logs",
            "web-0",
            "--project",
            "acme",
            "--grep",
            "slow",
            "--stream",
            "stderr",
        ],
        "",
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(" stderr warn: slow query"), "{text}");
    assert_eq!(text.lines().count(), 2);
    // Another project's token: not found.
    let out = common::cli(
        &server.base,
        "acme-token",
        &["logs", "web-0", "--project", "globex"],
        "",
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("404"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut follow = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "logs",
            "web-0",
            "--project",
            "acme",
            "--follow",
            "--raw",
            "--since",
            "1s",
        ])
        .env("TALLY_SERVER", &server.base)
        .env("TALLY_TOKEN", "acme-token")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(follow.stdout.take().unwrap());
    // Keep sending until the follower prints the new line.
    let sender = {
        let http = http.clone();
        let base = server.base.clone();
        tokio::spawn(async move {
            for i in 0.. {
                let line = format!("new line {i}");
                let _ = post(&http, &base, &request("web-0", &[("stdout", line, None)])).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let got = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line.starts_with("new line") {
                return line;
            }
        }
    });
    let got = tokio::time::timeout(Duration::from_secs(60), got)
        .await
        .unwrap()
        .unwrap();
    sender.abort();
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(got.starts_with("new line "), "{got}");
    drop(server);
}

const BATCHES: usize = 400;
const PER_BATCH: usize = 20;

fn batch(k: usize) -> Value {
    let lines: Vec<(&str, String, Option<String>)> = (0..PER_BATCH)
        .map(|j| {
            let n = k * PER_BATCH + j;
            ("stdout", format!("record {n:06}"), Some(format!("uid-{n}")))
        })
        .collect();
    request("web-0", &lines)
}

/// Sends batches from `from` until one fails; returns the first batch not
/// acknowledged.
async fn send_until_error(http: &reqwest::Client, base: &str, from: usize) -> usize {
    for k in from..BATCHES {
        match post(http, base, &batch(k)).await {
            Ok(s) if s == 200 => {}
            _ => return k,
        }
    }
    BATCHES
}

#[tokio::test]
async fn a_killed_server_loses_and_duplicates_no_record_of_an_at_least_once_sender() {
    let dir = tempfile::tempdir().unwrap();
    let http = tally_delivery::client_builder().build().unwrap();
    let mut next: usize = 0;
    let mut cut_short = 0;
    for round in 0..3u64 {
        let mut server = common::serve_with_config(dir.path(), CONFIG);
        let sending = {
            let (http, base) = (http.clone(), server.base.clone());
            // Re-send the last acknowledged batch too: an at-least-once
            // sender that missed the answer does.
            let from = next.saturating_sub(1);
            tokio::spawn(async move { send_until_error(&http, &base, from).await })
        };
        tokio::time::sleep(Duration::from_millis(300 + 170 * round)).await;
        server.child.kill().unwrap(); // SIGKILL
        server.child.wait().unwrap();
        next = sending.await.unwrap();
        cut_short += usize::from(next < BATCHES);
    }
    let server = common::serve_with_config(dir.path(), CONFIG);
    assert_eq!(
        send_until_error(&http, &server.base, next.saturating_sub(1)).await,
        BATCHES
    );
    let page: Value = http
        .get(format!(
            "{}/api/v1/projects/acme/instances/web-0/logs?limit=10000",
            server.base
        ))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let got: Vec<&str> = page["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["line"].as_str().unwrap())
        .collect();
    let want: Vec<String> = (0..BATCHES * PER_BATCH)
        .map(|n| format!("record {n:06}"))
        .collect();
    assert_eq!(got.len(), want.len(), "every record exactly once");
    let first_wrong = got.iter().zip(&want).position(|(g, w)| g != w);
    assert_eq!(first_wrong, None, "records out of order");
    assert!(
        next > 0,
        "nothing was acknowledged before the kills; the test did not test"
    );
    assert!(
        cut_short > 0,
        "every kill came after the last batch; the test did not test"
    );
}

/// What an OTLP/HTTP logs endpoint received: the bodies of each path.
type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, ExportLogsServiceRequest)>>>;

/// A loopback OTLP/HTTP logs receiver (protobuf), one path per project.
async fn otlp_receiver() -> (String, Received) {
    use axum::extract::{Path, State};
    use prost::Message as _;
    let received: Received = Default::default();
    let app = axum::Router::new()
        .route(
            "/{project}/v1/logs",
            axum::routing::post(
                |State(r): State<Received>,
                 Path(project): Path<String>,
                 headers: axum::http::HeaderMap,
                 body: axum::body::Bytes| async move {
                    let mut raw = Vec::new();
                    if headers.get("content-encoding").is_some_and(|v| v == "gzip") {
                        std::io::Read::read_to_end(
                            &mut flate2::read::GzDecoder::new(&body[..]),
                            &mut raw,
                        )
                        .unwrap();
                    } else {
                        raw = body.to_vec();
                    }
                    let request = ExportLogsServiceRequest::decode(&raw[..]).unwrap();
                    r.lock().unwrap().push((project, request));
                    axum::http::StatusCode::OK
                },
            ),
        )
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, received)
}

/// An Exporter with a `logs` source ships its project's instance logs, and
/// only its project's, to its OTLP endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exporters_with_a_logs_source_ship_their_projects_instance_logs() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::serve_with_config(
        dir.path(),
        &format!("{CONFIG}egress: {{allow: [127.0.0.0/8]}}\n"),
    );
    let (receiver, received) = otlp_receiver().await;
    let mut manifests = String::new();
    for project in ["acme", "globex"] {
        manifests += &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {project}, labels: {{resourcemanager.miloapis.com/project-name: {project}}}}}\n---\n\
             apiVersion: telemetry.datumapis.com/v1alpha1\nkind: Exporter\nmetadata: {{name: otlp, namespace: {project}}}\nspec:\n  sources:\n  - {{name: logs, logs: {{}}}}\n  sinks: [{{name: r, otlp_http: {{endpoint: '{receiver}/{project}'}}, batch: {{timeout: 50ms}}}}]\n---\n"
        );
    }
    let out = common::cli(&server.base, ADMIN, &["apply", "-f", "-"], &manifests);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let http = tally_delivery::client_builder().build().unwrap();
    // Until the exporters run, lines are stored but not shipped: keep
    // sending (with ids, so the store keeps each once).
    for i in 0..300 {
        let line = ("stdout", format!("shipped {i}"), Some(format!("ship-{i}")));
        assert_eq!(
            post(&http, &server.base, &request("web-0", &[line]))
                .await
                .unwrap(),
            200
        );
        if !received.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = received.lock().unwrap().clone();
    assert!(!got.is_empty(), "nothing reached the exporter");
    for (project, request) in &got {
        assert_eq!(
            project, "acme",
            "only acme's exporter receives acme's lines"
        );
        let resource = request.resource_logs[0].resource.as_ref().unwrap();
        assert!(resource.attributes.iter().any(|kv| kv.key == "instance"));
        let body = format!(
            "{:?}",
            request.resource_logs[0].scope_logs[0].log_records[0].body
        );
        assert!(body.contains("shipped"), "{body}");
    }
}
