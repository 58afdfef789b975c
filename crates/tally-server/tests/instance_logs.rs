//! Instance logs over real HTTP on a real embedded log store: OTLP/HTTP in
//! (split from access logs by the `instance` resource attribute), Tally's
//! read API and follow, the Loki subset as Grafana's Loki datasource sends
//! it, per-project ingest limits, and the tenancy matrix.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tally_ledger::ResourceStore;
use tally_logstore::limits::{IngestLimit, ProjectLimiter};
use tally_logstore::{EmbeddedLogStore, LogStore, StoreConfig as LogStoreConfig};
use tally_server::instance_logs::InstanceLogs;
use tally_server::{AppState, TokenConfig, router};
use tally_store_embedded::{EmbeddedLedger, StoreConfig};

struct Server {
    base: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

fn token(name: &str, scope: &str) -> TokenConfig {
    TokenConfig {
        name: name.into(),
        token: Some(format!("{name}-secret")),
        sha256: None,
        scopes: vec![scope.into()],
    }
}

async fn start(limit: IngestLimit) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let ledger = EmbeddedLedger::open(StoreConfig::new(dir.path().join("ledger"))).unwrap();
    let resources: Arc<dyn ResourceStore> = Arc::new(ledger.resources());
    let store: Arc<dyn LogStore> =
        Arc::new(EmbeddedLogStore::open(LogStoreConfig::new(dir.path().join("logs"))).unwrap());
    let tokens = [
        token("acme", "project:acme"),
        token("globex", "project:globex"),
        token("ingest", "ingest"),
    ];
    let state = AppState::new(Arc::new(ledger), 1 << 20, None)
        .with_resources(resources)
        .with_logs(InstanceLogs::new(
            store,
            ProjectLimiter::new(limit, HashMap::new()),
        ))
        .with_tokens(Some("root"), &tokens)
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(listener, router(state)).await.unwrap();
    });
    Server {
        base,
        http: tally_delivery::client_builder().build().unwrap(),
        _dir: dir,
    }
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// An OTLP/JSON logs request: one resource per (project, instance).
/// (project, instance, [(stream, line)]).
type Resource<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);

fn otlp(resources: &[Resource<'_>]) -> Value {
    let t = now_nanos();
    json!({"resourceLogs": resources.iter().map(|(project, instance, lines)| json!({
        "resource": {"attributes": [
            {"key": "project", "value": {"stringValue": project}},
            {"key": "instance", "value": {"stringValue": instance}},
            {"key": "workload", "value": {"stringValue": "web"}},
        ]},
        "scopeLogs": [{"logRecords": lines.iter().enumerate().map(|(i, (stream, line))| json!({
            "timeUnixNano": (t + i as u64).to_string(),
            "body": {"stringValue": line},
            "attributes": [{"key": "log.iostream", "value": {"stringValue": stream}}],
        })).collect::<Vec<_>>()}],
    })).collect::<Vec<_>>()})
}

impl Server {
    async fn post(&self, token: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/logs", self.base))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    async fn get(&self, token: &str, path: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

fn lines(v: &Value) -> Vec<String> {
    v["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["line"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn instance_logs_are_stored_read_filtered_and_scoped() {
    let s = start(IngestLimit::default()).await;
    let trace = "panic: boom\n  at main.rs:3";
    let r = s
        .post(
            "ingest-secret",
            &otlp(&[
                (
                    "acme",
                    "web-0",
                    &[
                        ("stdout", "GET / 200"),
                        ("stderr", trace),
                        ("stdout", "GET /x 500"),
                    ],
                ),
                ("globex", "web-0", &[("stdout", "globex secret line")]),
            ]),
        )
        .await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let path = "/api/v1/projects/acme/instances/web-0/logs";
    let (status, all) = s.get("acme-secret", path).await;
    assert_eq!(status, 200);
    assert_eq!(lines(&all), ["GET / 200", trace, "GET /x 500"]);
    let (_, err) = s.get("acme-secret", &format!("{path}?stream=stderr")).await;
    assert_eq!(lines(&err), [trace]);
    let (_, grep) = s
        .get("acme-secret", &format!("{path}?grep=500&since=5m"))
        .await;
    assert_eq!(lines(&grep), ["GET /x 500"]);
    let (_, tail) = s.get("acme-secret", &format!("{path}?limit=1")).await;
    assert_eq!(lines(&tail), ["GET /x 500"]);

    // The tenancy matrix: (token, project) → status.
    for (token, project, want) in [
        ("acme-secret", "acme", 200),
        ("acme-secret", "globex", 404),
        ("globex-secret", "acme", 404),
        ("globex-secret", "globex", 200),
        ("root", "acme", 200),
        ("root", "globex", 200),
        ("ingest-secret", "acme", 403),
        ("wrong", "acme", 401),
    ] {
        let (status, body) = s
            .get(
                token,
                &format!("/api/v1/projects/{project}/instances/web-0/logs"),
            )
            .await;
        assert_eq!(status.as_u16(), want, "{token} reading {project}: {body}");
        if want == 200 {
            assert!(
                lines(&body)
                    .iter()
                    .all(|l| !l.contains("secret") || project == "globex")
            );
        }
    }
    // A project token may not write logs.
    assert_eq!(
        s.post("acme-secret", &otlp(&[("acme", "web-0", &[])]))
            .await
            .status(),
        403
    );
}

#[tokio::test]
async fn records_without_a_valid_project_are_a_partial_success() {
    let s = start(IngestLimit::default()).await;
    let body = otlp(&[("Not_A_Name", "web-0", &[("stdout", "x")])]);
    let r = s.post("ingest-secret", &body).await;
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["partialSuccess"]["rejectedLogRecords"], json!(1));
}

#[tokio::test]
async fn a_project_over_its_ingest_limit_gets_429_with_retry_after_others_do_not() {
    let s = start(IngestLimit {
        bytes_per_second: 1000,
        burst_bytes: 2000,
    })
    .await;
    let big = "x".repeat(1500);
    let noisy = otlp(&[("noisy", "web-0", &[("stdout", big.as_str())])]);
    assert_eq!(s.post("ingest-secret", &noisy).await.status(), 200);
    let r = s.post("ingest-secret", &noisy).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    let quiet = otlp(&[("quiet", "web-0", &[("stdout", "hello")])]);
    assert_eq!(s.post("ingest-secret", &quiet).await.status(), 200);
    // Nothing of the refused request was stored.
    let (_, got) = s
        .get("root", "/api/v1/projects/noisy/instances/web-0/logs")
        .await;
    assert_eq!(lines(&got).len(), 1);
}

#[tokio::test]
async fn follow_streams_new_lines_as_ndjson() {
    let s = start(IngestLimit::default()).await;
    s.post(
        "ingest-secret",
        &otlp(&[("acme", "web-0", &[("stdout", "before")])]),
    )
    .await;
    let mut r = s
        .http
        .get(format!(
            "{}/api/v1/projects/acme/instances/web-0/logs?follow=true",
            s.base
        ))
        .bearer_auth("acme-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let first = String::from_utf8(r.chunk().await.unwrap().unwrap().to_vec()).unwrap();
    assert!(first.contains("\"before\""), "{first}");
    s.post(
        "ingest-secret",
        &otlp(&[
            ("acme", "web-0", &[("stderr", "after")]),
            ("acme", "web-1", &[("stdout", "other instance")]),
        ]),
    )
    .await;
    let next = tokio::time::timeout(Duration::from_secs(30), r.chunk())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let next = String::from_utf8(next.to_vec()).unwrap();
    let line: Value = serde_json::from_str(next.trim()).unwrap();
    assert_eq!(
        (line["line"].as_str(), line["stream"].as_str()),
        (Some("after"), Some("stderr"))
    );
}

/// The requests Grafana's Loki datasource sends (Grafana 10/11): the
/// health check and label browser (`labels`, `label/{name}/values` with
/// `start`/`end` in ns), and `query_range` with `direction`, `limit`,
/// `step` and ns `start`/`end`.
#[tokio::test]
async fn grafana_loki_datasource_requests() {
    let s = start(IngestLimit::default()).await;
    s.post(
        "ingest-secret",
        &otlp(&[
            (
                "acme",
                "web-0",
                &[("stdout", "GET / 200"), ("stderr", "error: db timeout")],
            ),
            ("acme", "worker-0", &[("stdout", "job done")]),
            ("globex", "web-0", &[("stdout", "globex only")]),
        ]),
    )
    .await;
    let end = now_nanos() + 1_000_000_000;
    let start_ns = end - 3_600_000_000_000;
    let (status, labels) = s
        .get(
            "acme-secret",
            &format!("/loki/api/v1/labels?start={start_ns}&end={end}"),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(labels["status"], "success");
    assert!(
        labels["data"]
            .as_array()
            .unwrap()
            .contains(&json!("instance"))
    );
    let (_, values) = s
        .get(
            "acme-secret",
            &format!("/loki/api/v1/label/instance/values?start={start_ns}&end={end}"),
        )
        .await;
    assert_eq!(values["data"], json!(["web-0", "worker-0"]));

    let query = |q: &str| {
        let q: String = form_urlencoded::byte_serialize(q.as_bytes()).collect();
        format!(
            "/loki/api/v1/query_range?direction=backward&end={end}&limit=1000&query={q}&start={start_ns}&step=2000ms"
        )
    };
    let (status, answer) = s
        .get("acme-secret", &query(r#"{instance="web-0"} |= "error""#))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["data"]["resultType"], "streams");
    let result = answer["data"]["result"].as_array().unwrap();
    assert_eq!(result.len(), 1);
    assert_eq!(result[0]["stream"]["stream"], "stderr");
    assert_eq!(result[0]["stream"]["project"], "acme");
    assert_eq!(result[0]["values"][0][1], "error: db timeout");
    assert!(
        result[0]["values"][0][0]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .is_ok()
    );

    let (_, every) = s
        .get("acme-secret", &query(r#"{workload="web"} != "error""#))
        .await;
    let mut got: Vec<&str> = every["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| {
            s["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v[1].as_str().unwrap())
        })
        .collect();
    got.sort();
    assert_eq!(got, ["GET / 200", "job done"]);
    // Another project's selector: 404; LogQL outside the subset: 400.
    let (status, _) = s.get("acme-secret", &query(r#"{project="globex"}"#)).await;
    assert_eq!(status, 404);
    let (status, _) = s
        .get(
            "acme-secret",
            &query(r#"sum(rate({instance="web-0"}[1m]))"#),
        )
        .await;
    assert_eq!(status, 400);
    // An operator names the project.
    let (_, globex) = s.get("root", &query(r#"{project="globex"}"#)).await;
    assert_eq!(globex["data"]["result"][0]["values"][0][1], "globex only");
}

/// Grafana's live tail: a websocket to `/loki/api/v1/tail` with the
/// datasource's `Authorization` header; the backlog first, then each new
/// line as a Loki tail message.
#[tokio::test]
async fn loki_tail_over_a_websocket() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let s = start(IngestLimit::default()).await;
    s.post(
        "ingest-secret",
        &otlp(&[("acme", "web-0", &[("stdout", "backlog line")])]),
    )
    .await;
    let query: String =
        form_urlencoded::byte_serialize(br#"{instance="web-0"} != "noise""#).collect();
    let url = format!(
        "{}/loki/api/v1/tail?query={query}&limit=100",
        s.base.replace("http://", "ws://")
    );
    let mut request = url.clone().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", "Bearer acme-secret".parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let first = next_message(&mut socket).await;
    assert_eq!(first["streams"][0]["values"][0][1], "backlog line");
    assert_eq!(first["streams"][0]["stream"]["instance"], "web-0");
    s.post(
        "ingest-secret",
        &otlp(&[
            (
                "acme",
                "web-0",
                &[("stdout", "noise"), ("stderr", "live line")],
            ),
            ("globex", "web-0", &[("stdout", "not yours")]),
        ]),
    )
    .await;
    let second = next_message(&mut socket).await;
    assert_eq!(second["streams"].as_array().unwrap().len(), 1, "{second}");
    assert_eq!(second["streams"][0]["values"][0][1], "live line");
    assert_eq!(second["streams"][0]["stream"]["stream"], "stderr");

    // Another project's selector is refused before the upgrade.
    let query: String = form_urlencoded::byte_serialize(br#"{project="globex"}"#).collect();
    let mut request = format!(
        "{}/loki/api/v1/tail?query={query}",
        s.base.replace("http://", "ws://")
    )
    .into_client_request()
    .unwrap();
    request
        .headers_mut()
        .insert("authorization", "Bearer acme-secret".parse().unwrap());
    let refused = tokio_tungstenite::connect_async(request).await.unwrap_err();
    assert!(refused.to_string().contains("404"), "{refused}");
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next text message of a tail, as JSON.
async fn next_message(socket: &mut Socket) -> Value {
    use futures::StreamExt as _;
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
            return serde_json::from_str(&text).unwrap();
        }
    }
}
