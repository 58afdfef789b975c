//! Instance lifecycle through the real binary: CloudEvents in over HTTP,
//! events derived from `Instance` status applied through `/apis`, the
//! tenancy matrix of the read API, `/metrics`, survival of a SIGKILL, and
//! `tally instances list|events`.

use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

mod common;

use common::{get, get_text, http};

const ADMIN: &str = "admin-secret";
const INGEST: &str = "agent-secret";
const ACME: &str = "acme-secret";
const GLOBEX: &str = "globex-secret";

fn start(dir: &Path) -> common::Server {
    common::serve_with_config(
        dir,
        &format!(
            "token: {ADMIN}\ntokens:\n\
             - {{name: agents, token: {INGEST}, scopes: [ingest]}}\n\
             - {{name: acme, token: {ACME}, scopes: [\"project:acme\"]}}\n\
             - {{name: globex, token: {GLOBEX}, scopes: [\"project:globex\"]}}\n"
        ),
    )
}

async fn post_events(base: &str, token: &str, events: &Value) -> (StatusCode, Value) {
    let r = http()
        .post(format!("{base}/api/v1/instances/events"))
        .bearer_auth(token)
        .header("content-type", "application/cloudevents-batch+json")
        .body(events.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn lifecycle(id: &str, kind: &str, project: &str, instance: &str, reason: Option<&str>) -> Value {
    let mut data = json!({"project": project, "instance": instance, "workload": "web"});
    if let Some(r) = reason {
        data["reason"] = json!(r);
    }
    json!({"specversion": "1.0", "id": id, "source": "instance-controller",
           "type": format!("com.datumapis.compute.instance.{kind}"), "subject": instance,
           "time": jiff::Timestamp::now().to_string(), "data": data})
}

fn kinds(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect()
}

fn names(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}/{}",
                e["project"].as_str().unwrap(),
                e["instance"].as_str().unwrap()
            )
        })
        .collect()
}

async fn seed(base: &str) {
    let events = json!([
        lifecycle("a1", "scheduled", "acme", "web-0", None),
        lifecycle("a2", "started", "acme", "web-0", Some("Available")),
        lifecycle("a3", "crashed", "acme", "web-0", Some("InstanceCrashing")),
        lifecycle(
            "g1",
            "oom_killed",
            "globex",
            "db-0",
            Some("InstanceCrashing")
        ),
    ]);
    let (status, body) = post_events(base, INGEST, &events).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"accepted": 4, "duplicates": 0}));
}

#[tokio::test]
async fn a_project_reads_only_its_own_instances() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let base = &server.base;
    seed(base).await;
    // (token, path) → status, and what is listed.
    let matrix: [(&str, &str, u16, &[&str]); 14] = [
        (ACME, "/api/v1/instances", 200, &["acme/web-0"]),
        (ACME, "/api/v1/instances?project=acme", 200, &["acme/web-0"]),
        (ACME, "/api/v1/instances?project=globex", 404, &[]),
        (GLOBEX, "/api/v1/instances", 200, &["globex/db-0"]),
        (
            ADMIN,
            "/api/v1/instances",
            200,
            &["acme/web-0", "globex/db-0"],
        ),
        (
            ADMIN,
            "/api/v1/instances?project=globex",
            200,
            &["globex/db-0"],
        ),
        (INGEST, "/api/v1/instances", 403, &[]),
        (
            ACME,
            "/api/v1/instances/web-0/events",
            200,
            &["scheduled", "started", "crashed"],
        ),
        (ACME, "/api/v1/instances/db-0/events", 404, &[]),
        (
            ACME,
            "/api/v1/instances/db-0/events?project=globex",
            404,
            &[],
        ),
        (GLOBEX, "/api/v1/instances/web-0/events", 404, &[]),
        (
            GLOBEX,
            "/api/v1/instances/db-0/events",
            200,
            &["oom_killed"],
        ),
        (
            ADMIN,
            "/api/v1/instances/web-0/events?project=acme",
            200,
            &["scheduled", "started", "crashed"],
        ),
        (ADMIN, "/api/v1/instances/web-0/events", 400, &[]),
    ];
    for (token, path, status, listed) in matrix {
        let (got, body) = get(base, token, path).await;
        assert_eq!(got.as_u16(), status, "{token} {path}: {body}");
        if status != 200 {
            continue;
        }
        let seen = if path.ends_with("/events") || path.contains("/events?") {
            kinds(&body)
        } else {
            names(&body)
        };
        assert_eq!(seen, listed, "{token} {path}");
    }
    // Customers may not write lifecycle events.
    let (status, _) = post_events(
        base,
        ACME,
        &json!([lifecycle("x", "started", "acme", "web-1", None)]),
    )
    .await;
    assert_eq!(status, 403);
    // Pages concatenate to the whole.
    let (_, first) = get(base, ACME, "/api/v1/instances/web-0/events?limit=2").await;
    assert_eq!(kinds(&first), ["scheduled", "started"]);
    let cursor = first["nextCursor"].as_str().unwrap();
    let (_, rest) = get(
        base,
        ACME,
        &format!("/api/v1/instances/web-0/events?limit=2&cursor={cursor}"),
    )
    .await;
    assert_eq!(kinds(&rest), ["crashed"]);
    assert!(rest.get("nextCursor").is_none());
    // The CLI, with a customer's token.
    let out = common::cli(base, ACME, &["instances", "list"], "");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        table.contains("web-0") && table.contains("crashed"),
        "{table}"
    );
    assert!(!table.contains("db-0"), "{table}");
    let out = common::cli(
        base,
        ACME,
        &["instances", "events", "web-0", "-o", "json"],
        "",
    );
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(kinds(&listed), ["scheduled", "started", "crashed"]);
    assert_eq!(listed["items"][2]["reason"], "InstanceCrashing");
    let out = common::cli(base, ACME, &["instances", "events", "db-0"], "");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}

#[tokio::test]
async fn bad_events_store_nothing_and_duplicates_are_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let base = &server.base;
    let bad = json!([
        lifecycle("b1", "started", "acme", "web-0", Some("Available")),
        lifecycle("b2", "exploded", "acme", "web-0", None),
        lifecycle("b3", "started", "acme", "WEB/../0", Some("Sleepy")),
    ]);
    let (status, body) = post_events(base, INGEST, &bad).await;
    assert_eq!(status, 400, "{body}");
    let indexes: Vec<u64> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, [1, 2]);
    let (_, listed) = get(base, ADMIN, "/api/v1/instances").await;
    assert_eq!(names(&listed), Vec::<String>::new());
    seed(base).await;
    let again = json!([lifecycle("a1", "scheduled", "acme", "web-0", None)]);
    let (_, body) = post_events(base, INGEST, &again).await;
    assert_eq!(body, json!({"accepted": 0, "duplicates": 1}));
    let metrics = get_text(base, Some(ADMIN), "/metrics").await;
    for line in [
        "tally_compute_lifecycle_transitions_total{kind=\"scheduled\",reason=\"\"} 1",
        "tally_compute_lifecycle_transitions_total{kind=\"crashed\",reason=\"InstanceCrashing\"} 1",
        "tally_compute_instance_crashes_total 1",
        "tally_compute_instance_oom_kills_total 1",
        "tally_compute_scheduling_latency_seconds_count 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} not in /metrics");
    }
}

async fn apply(base: &str, yaml: &str) {
    let r = http()
        .post(format!("{base}/apis/apply"))
        .bearer_auth(ADMIN)
        .header("content-type", "application/yaml")
        .body(yaml.to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

fn instance(status: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: acme-prod\n  labels: {{resourcemanager.miloapis.com/project-name: acme}}\n---\n\
         apiVersion: compute.datumapis.com/v1alpha1\nkind: Instance\nmetadata: {{name: web-1, namespace: acme-prod}}\n\
         spec: {{workloadRef: {{name: web}}}}\nstatus: {status}\n"
    )
}

/// Waits until `path` lists `want` kinds (the derivation runs behind the apply).
async fn wait_kinds(base: &str, path: &str, want: &[&str]) {
    let mut last = Value::Null;
    for _ in 0..200 {
        let (status, body) = get(base, ACME, path).await;
        if status == 200 && kinds(&body) == want {
            return;
        }
        last = body;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{path} never listed {want:?}; last: {last}");
}

#[tokio::test]
async fn instance_status_changes_become_events_once_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = "/api/v1/instances/web-1/events";
    let scheduled = "{nodeName: node-7, conditions: [{type: Scheduled, status: 'True', reason: Available, lastTransitionTime: '2026-12-06T09:00:01Z'}]}";
    let running = "{conditions: [{type: Available, status: 'True', reason: Available, lastTransitionTime: '2026-12-06T09:00:04Z'}]}";
    {
        let server = start(dir.path());
        apply(&server.base, &instance("{}")).await;
        wait_kinds(&server.base, path, &["created"]).await;
        apply(&server.base, &instance(scheduled)).await;
        wait_kinds(&server.base, path, &["created", "scheduled"]).await;
        apply(&server.base, &instance(running)).await;
        wait_kinds(&server.base, path, &["created", "scheduled", "started"]).await;
        let (_, page) = get(&server.base, ACME, path).await;
        assert_eq!(page["items"][2]["reason"], "Available");
        assert_eq!(page["items"][2]["workload"], "web");
    }
    // A restart sees every instance afresh: what it derives is a duplicate.
    let server = start(dir.path());
    apply(&server.base, &instance(running)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    wait_kinds(&server.base, path, &["created", "scheduled", "started"]).await;
    let (_, other) = get(&server.base, GLOBEX, path).await;
    assert!(
        other["items"].is_null(),
        "globex must not see acme's instance"
    );
}

fn numbered(n: usize) -> Value {
    lifecycle(
        &format!("k{n}"),
        "started",
        "acme",
        &format!("i-{}", n % 7),
        None,
    )
}

#[tokio::test]
async fn acknowledged_lifecycle_events_survive_sigkill() {
    const BATCH: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let base = server.base.clone();
    // Batches keep arriving until the process is killed under them; the
    // sender counts what was acknowledged and what was attempted.
    let sender = tokio::spawn(async move {
        let client = http();
        let (mut acked, mut attempted) = (0, 0);
        for b in 0..100_000 {
            let batch: Vec<Value> = (b * BATCH..(b + 1) * BATCH).map(numbered).collect();
            attempted += BATCH;
            let answer = client
                .post(format!("{base}/api/v1/instances/events"))
                .bearer_auth(INGEST)
                .header("content-type", "application/cloudevents-batch+json")
                .body(Value::Array(batch).to_string())
                .send()
                .await;
            match answer {
                Ok(r) if r.status() == 200 => acked += BATCH,
                _ => break,
            }
        }
        (acked, attempted)
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut server = server;
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();
    let (acknowledged, attempted) = sender.await.unwrap();
    assert!(acknowledged > 0, "nothing was acknowledged before the kill");
    assert!(attempted > acknowledged, "the kill did not land mid-stream");
    let server = start(dir.path());
    let mut stored = 0;
    let mut cursor: Option<String> = None;
    loop {
        let q = cursor
            .as_ref()
            .map_or(String::new(), |c| format!("&cursor={c}"));
        let (_, page) = get(
            &server.base,
            ADMIN,
            &format!("/api/v1/instances?limit=3{q}"),
        )
        .await;
        for item in page["items"].as_array().unwrap() {
            stored += item["events"].as_u64().unwrap() as usize;
        }
        match page["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert!(
        (acknowledged..=attempted).contains(&stored),
        "{acknowledged} acknowledged, {attempted} attempted, {stored} stored"
    );
    // Re-sending everything attempted stores nothing twice.
    let all: Vec<Value> = (0..attempted).map(numbered).collect();
    let (_, body) = post_events(&server.base, INGEST, &Value::Array(all)).await;
    assert_eq!(body["duplicates"].as_u64().unwrap() as usize, stored);
    assert_eq!(
        body["accepted"].as_u64().unwrap() as usize + stored,
        attempted
    );
}

/// `/metrics` once it has `line`.
async fn wait_metrics_line(base: &str, line: &str) -> String {
    let mut last = String::new();
    for _ in 0..300 {
        let r = http()
            .get(format!("{base}/metrics"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        last = r.text().await.unwrap();
        if last.lines().any(|l| l == line) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/metrics never had {line}; last:\n{last:.4000}");
}

/// An `Instance` in a watched manifest directory gives its lifecycle events
/// and its allocation as one applied through `/apis` does; a change of its
/// requests changes the gauges, and a deleted instance leaves them.
#[tokio::test]
async fn watched_instances_give_events_and_allocation_gauges() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    let with_requests = |cpu: &str| {
        instance("{nodeName: node-7, conditions: [{type: Scheduled, status: 'True', reason: Available, lastTransitionTime: '2026-12-06T09:00:01Z'}]}")
            .replace(
                "spec: {workloadRef: {name: web}}",
                &format!("spec: {{workloadRef: {{name: web}}, runtime: {{resources: {{instanceType: datumcloud/d1-standard-2, requests: {{cpu: '{cpu}', memory: 512Mi}}}}}}}}"),
            )
    };
    std::fs::write(manifests.join("acme.yaml"), with_requests("250m")).unwrap();
    let server = common::serve_with_config(
        dir.path(),
        &format!(
            "token: {ADMIN}\nmanifestDirs: ['{}']\ntokens:\n- {{name: acme, token: {ACME}, scopes: [\"project:acme\"]}}\n",
            manifests.display()
        ),
    );
    let base = &server.base;
    wait_kinds(
        base,
        "/api/v1/instances/web-1/events",
        &["created", "scheduled"],
    )
    .await;
    let labels = "{project=\"acme\",instance=\"web-1\",namespace=\"acme-prod\"}";
    let metrics = wait_metrics_line(
        base,
        &format!("tally_compute_instance_cpu_allocated_vcpus{labels} 0.25"),
    )
    .await;
    assert!(
        metrics.contains(&format!(
            "tally_compute_instance_memory_allocated_bytes{labels} 536870912\n"
        )),
        "{metrics:.4000}"
    );
    std::fs::write(manifests.join("acme.yaml"), with_requests("2")).unwrap();
    wait_metrics_line(
        base,
        &format!("tally_compute_instance_cpu_allocated_vcpus{labels} 2"),
    )
    .await;
    let r = http()
        .delete(format!("{base}/apis/instances/acme-prod/web-1"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    std::fs::remove_file(manifests.join("acme.yaml")).unwrap();
    for _ in 0..300 {
        let text = get_text(base, Some(ADMIN), "/metrics").await;
        if !text.contains("tally_compute_instance_cpu_allocated_vcpus{") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the deleted instance's allocation stayed on /metrics");
}
