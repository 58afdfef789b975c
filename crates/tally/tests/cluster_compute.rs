//! Compute observability on a cluster: two `tally serve` nodes (a
//! `cluster:` config section) on a real `nats-server -js` and
//! `clickhouse-server`. Lifecycle events and instance logs sent to node a
//! are answered by node b, with the same tenancy as one node; a re-send
//! through the other node counts nothing twice; a follower on b sees a
//! line sent to a; a kill -9 of the receiving node loses nothing it
//! acknowledged.

mod common;

use common::{get, http};

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tally_ledger_suite::peers::{ClickHouse, Nats};

const ADMIN: &str = "admin-secret";
const INGEST: &str = "agent-secret";
const ACME: &str = "acme-secret";
const GLOBEX: &str = "globex-secret";

fn config(nats: &Nats, clickhouse: &ClickHouse, database: &str) -> String {
    format!(
        "token: {ADMIN}\ntokens:\n\
         - {{name: agents, token: {INGEST}, scopes: [ingest]}}\n\
         - {{name: acme, token: {ACME}, scopes: [\"project:acme\"]}}\n\
         - {{name: globex, token: {GLOBEX}, scopes: [\"project:globex\"]}}\n\
         cluster: {{nats: \"{}\", clickhouse: \"{}\", database: {database}}}\n\
         billing: {{enabled: false}}\n",
        nats.url(),
        clickhouse.url()
    )
}

fn node(dir: &Path, config: &str) -> common::Server {
    common::serve_with_config(dir, config)
}

async fn post(base: &str, path: &str, content_type: &str, body: &Value) -> (StatusCode, Value) {
    let r = http()
        .post(format!("{base}{path}"))
        .bearer_auth(INGEST)
        .header("content-type", content_type)
        .body(body.to_string())
        .send()
        .await;
    match r {
        Ok(r) => {
            let status = r.status();
            (status, r.json().await.unwrap_or(Value::Null))
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, Value::Null),
    }
}

async fn post_events(base: &str, events: &Value) -> (StatusCode, Value) {
    let kind = "application/cloudevents-batch+json";
    post(base, "/api/v1/instances/events", kind, events).await
}

async fn post_logs(base: &str, body: &Value) -> StatusCode {
    post(base, "/v1/logs", "application/json", body).await.0
}

fn lifecycle(id: &str, kind: &str, project: &str, instance: &str) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "instance-controller",
           "type": format!("com.datumapis.compute.instance.{kind}"), "subject": instance,
           "time": jiff::Timestamp::now().to_string(),
           "data": {"project": project, "instance": instance, "workload": "web"}})
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// An OTLP/JSON logs request of one instance; `(line, record id)`.
fn logs_request(project: &str, instance: &str, lines: &[(String, Option<String>)]) -> Value {
    let t = now_nanos();
    let records: Vec<Value> = lines
        .iter()
        .enumerate()
        .map(|(i, (line, id))| {
            let mut attributes =
                vec![json!({"key": "log.iostream", "value": {"stringValue": "stdout"}})];
            if let Some(id) = id {
                attributes.push(json!({"key": "log.record.uid", "value": {"stringValue": id}}));
            }
            json!({"timeUnixNano": (t + i as u64).to_string(),
                   "body": {"stringValue": line}, "attributes": attributes})
        })
        .collect();
    json!({"resourceLogs": [{
        "resource": {"attributes": [
            {"key": "project", "value": {"stringValue": project}},
            {"key": "instance", "value": {"stringValue": instance}},
        ]},
        "scopeLogs": [{"logRecords": records}],
    }]})
}

fn items(page: &Value, field: &str) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|e| e[field].as_str().unwrap_or_default().to_owned())
        .collect()
}

async fn log_lines(base: &str, token: &str, project: &str, instance: &str) -> Vec<String> {
    let path = format!("/api/v1/projects/{project}/instances/{instance}/logs?limit=10000");
    let (status, page) = get(base, token, &path).await;
    assert_eq!(status, 200, "{page}");
    page["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["line"].as_str().unwrap().to_owned())
        .collect()
}

/// Lifecycle: what a receives, b lists with the same tenancy, and a
/// re-send through b is a duplicate.
async fn lifecycle_across_nodes(a: &str, b: &str) {
    let events = json!([
        lifecycle("a1", "scheduled", "acme", "web-0"),
        lifecycle("a2", "started", "acme", "web-0"),
        lifecycle("a3", "crashed", "acme", "web-0"),
        lifecycle("g1", "oom_killed", "globex", "db-0"),
    ]);
    let (status, body) = post_events(a, &events).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"accepted": 4, "duplicates": 0}));
    let (status, body) = post_events(b, &events).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"accepted": 0, "duplicates": 4}));

    // (token, path) → status, and the instances or kinds answered, on b.
    let matrix = [
        (ACME, "/api/v1/instances", 200, vec!["web-0"]),
        (GLOBEX, "/api/v1/instances", 200, vec!["db-0"]),
        (ADMIN, "/api/v1/instances", 200, vec!["web-0", "db-0"]),
        (ACME, "/api/v1/instances?project=globex", 404, vec![]),
        (
            GLOBEX,
            "/api/v1/instances/web-0/events?project=acme",
            404,
            vec![],
        ),
        (ACME, "/api/v1/instances/db-0/events", 404, vec![]),
        (
            ADMIN,
            "/api/v1/instances/web-0/events?project=globex",
            404,
            vec![],
        ),
        (
            ACME,
            "/api/v1/instances/web-0/events",
            200,
            vec!["scheduled", "started", "crashed"],
        ),
    ];
    for (token, path, want_status, want) in matrix {
        let (status, page) = get(b, token, path).await;
        assert_eq!(status, want_status, "{path}: {page}");
        if status == 200 {
            let field = if path.ends_with("/events") {
                "kind"
            } else {
                "instance"
            };
            assert_eq!(items(&page, field), want, "{path}");
        }
    }
    let (_, listed) = get(b, ADMIN, "/api/v1/instances?project=acme").await;
    assert_eq!(listed["items"][0]["state"], "crashed", "{listed}");
    assert_eq!(listed["items"][0]["events"], 3, "{listed}");
    // Pages across nodes: one instance per page, the cursor from b read on a.
    let (_, first) = get(b, ADMIN, "/api/v1/instances?limit=1").await;
    let cursor = first["nextCursor"].as_str().unwrap();
    let (_, second) = get(
        a,
        ADMIN,
        &format!("/api/v1/instances?limit=1&cursor={cursor}"),
    )
    .await;
    // By project, then instance: acme's before globex's.
    assert_eq!(items(&first, "instance"), ["web-0"]);
    assert_eq!(items(&second, "instance"), ["db-0"]);
    assert!(second["nextCursor"].is_null(), "{second}");
}

/// Logs: what a receives, b reads; a re-send through b is stored once.
async fn logs_across_nodes(a: &str, b: &str) {
    let lines: Vec<(String, Option<String>)> = (0..5)
        .map(|n| (format!("line {n}"), Some(format!("uid-{n}"))))
        .collect();
    let body = logs_request("acme", "web-0", &lines);
    assert_eq!(post_logs(a, &body).await, 200);
    assert_eq!(post_logs(b, &body).await, 200);
    let other = logs_request("globex", "db-0", &[("secret".to_owned(), None)]);
    assert_eq!(post_logs(a, &other).await, 200);
    let want: Vec<String> = (0..5).map(|n| format!("line {n}")).collect();
    assert_eq!(log_lines(b, ACME, "acme", "web-0").await, want);
    assert_eq!(log_lines(a, ADMIN, "acme", "web-0").await, want);
    assert_eq!(log_lines(b, GLOBEX, "globex", "db-0").await, ["secret"]);
    for (token, project, instance) in [
        (ACME, "globex", "db-0"),
        (GLOBEX, "acme", "web-0"),
        (ACME, "globex", "web-0"),
    ] {
        let path = format!("/api/v1/projects/{project}/instances/{instance}/logs");
        let (status, body) = get(b, token, &path).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
}

/// A follower on b shows a line sent to a.
async fn follow_across_nodes(a: &str, b: &str) {
    let mut response = http()
        .get(format!(
            "{b}/api/v1/projects/acme/instances/web-1/logs?follow=true"
        ))
        .bearer_auth(ACME)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let follower = tokio::spawn(async move {
        let mut text = Vec::new();
        // Bounded so a failure ends the test, not a speed bound.
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let next = tokio::time::timeout(Duration::from_secs(5), response.chunk()).await;
            match next {
                Ok(Ok(Some(chunk))) => text.extend_from_slice(&chunk),
                Ok(_) => break,
                Err(_) => continue,
            }
            if String::from_utf8_lossy(&text).contains("followed across nodes") {
                return true;
            }
        }
        false
    });
    let body = logs_request("acme", "web-1", &[("followed across nodes".into(), None)]);
    assert_eq!(post_logs(a, &body).await, 200);
    assert!(
        follower.await.unwrap(),
        "node b's follower never showed the line sent to a"
    );
}

#[tokio::test]
async fn what_one_node_receives_of_compute_the_other_answers() {
    let Some(nats) = Nats::start() else { return };
    let Some(clickhouse) = ClickHouse::start() else {
        return;
    };
    let config = config(&nats, &clickhouse, "tally_compute_nodes");
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = node(dir_a.path(), &config);
    let b = node(dir_b.path(), &config);
    lifecycle_across_nodes(&a.base, &b.base).await;
    logs_across_nodes(&a.base, &b.base).await;
    follow_across_nodes(&a.base, &b.base).await;
    // `tally instances` and `tally logs` on b answer what a received.
    let listed = common::ok(common::cli(&b.base, ACME, &["instances", "list"], ""));
    assert!(listed.contains("web-0"), "{listed}");
    assert!(!listed.contains("db-0"), "{listed}");
    let logs = common::ok(common::cli(
        &b.base,
        ACME,
        &["logs", "web-0", "--project", "acme"],
        "",
    ));
    assert!(logs.contains("line 4"), "{logs}");
}

const BATCHES: usize = 60;
const PER_BATCH: usize = 20;

/// Batch `k`: a lifecycle event and `PER_BATCH` log records, with ids.
async fn send_batch(base: &str, k: usize) -> bool {
    let event = json!([lifecycle(&format!("e{k}"), "started", "acme", "web-0")]);
    let (status, _) = post_events(base, &event).await;
    if status != 200 {
        return false;
    }
    let lines: Vec<(String, Option<String>)> = (0..PER_BATCH)
        .map(|j| {
            let n = k * PER_BATCH + j;
            (format!("record {n:06}"), Some(format!("uid-{n}")))
        })
        .collect();
    post_logs(base, &logs_request("acme", "web-0", &lines)).await == 200
}

/// Sends batches from `from` until one fails; the first not acknowledged.
async fn send_until_error(base: &str, from: usize) -> usize {
    for k in from..BATCHES {
        if !send_batch(base, k).await {
            return k;
        }
    }
    BATCHES
}

#[tokio::test]
async fn a_killed_node_loses_and_duplicates_nothing_it_acknowledged() {
    let Some(nats) = Nats::start() else { return };
    let Some(clickhouse) = ClickHouse::start() else {
        return;
    };
    let config = config(&nats, &clickhouse, "tally_compute_kill");
    let mut next: usize = 0;
    let mut cut_short = 0;
    let mut dirs = Vec::new();
    for round in 0..3u64 {
        let dir = tempfile::tempdir().unwrap();
        let mut server = node(dir.path(), &config);
        dirs.push(dir);
        // Re-send the last acknowledged batch too: an at-least-once sender
        // that missed the answer does.
        let from = next.saturating_sub(1);
        let base = server.base.clone();
        let sending = tokio::spawn(async move { send_until_error(&base, from).await });
        tokio::time::sleep(Duration::from_millis(400 + 200 * round)).await;
        server.child.kill().unwrap(); // SIGKILL
        server.child.wait().unwrap();
        next = sending.await.unwrap();
        cut_short += usize::from(next < BATCHES);
    }
    // Another node finishes the sending and answers.
    let dir = tempfile::tempdir().unwrap();
    let b = node(dir.path(), &config);
    assert_eq!(
        send_until_error(&b.base, next.saturating_sub(1)).await,
        BATCHES
    );
    let got = log_lines(&b.base, ADMIN, "acme", "web-0").await;
    let want: Vec<String> = (0..BATCHES * PER_BATCH)
        .map(|n| format!("record {n:06}"))
        .collect();
    assert_eq!(got.len(), want.len(), "every record exactly once");
    let first_wrong = got.iter().zip(&want).position(|(g, w)| g != w);
    assert_eq!(first_wrong, None, "records out of order");
    let (_, listed) = get(&b.base, ADMIN, "/api/v1/instances?project=acme").await;
    assert_eq!(listed["items"][0]["events"], BATCHES, "{listed}");
    assert!(next > 0, "nothing was acknowledged before the kills");
    assert!(cut_short > 0, "every kill came after the last batch");
}
