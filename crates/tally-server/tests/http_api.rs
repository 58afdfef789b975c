//! The HTTP API over real HTTP, on a real embedded store in a temporary directory.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tally_server::{AppState, router};
use tally_store_embedded::{EmbeddedLedger, StoreConfig};

struct Server {
    base: String,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn start(token: Option<&str>, max_body: usize) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mut config = StoreConfig::new(dir.path());
    // The fixtures are dated 2026; accept them whatever today's date is.
    config.max_lateness = jiff::SignedDuration::from_hours(24 * 365 * 50);
    let ledger = EmbeddedLedger::open(config).unwrap();
    let state = AppState::new(Arc::new(ledger), max_body, token.map(str::to_owned));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router(state)).await });
    Server {
        base,
        client: tally_delivery::client_builder()
            .build()
            .expect("HTTP client"),
        _dir: dir,
    }
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn post(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> (StatusCode, Value) {
        let r = self
            .client
            .post(self.url(path))
            .header("content-type", content_type)
            // Ingest answers what it stored only when asked (else 204).
            .header("prefer", "return=representation")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self.client.get(self.url(path)).send().await.unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Queries, retrying while the meter backfills.
    async fn query(&self, path: &str) -> (StatusCode, Value) {
        for _ in 0..200 {
            let (status, body) = self.get(path).await;
            if status != StatusCode::SERVICE_UNAVAILABLE {
                return (status, body);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("meter never became ready");
    }
}

fn event(id: &str, subject: &str, time: &str, data: Value) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "test", "type": "api-calls", "subject": subject, "time": time, "data": data})
}

const METERS: &str = r#"
apiVersion: billing.miloapis.com/v1alpha1
kind: MeterDefinition
metadata: {name: api-calls}
spec:
  meterName: example.com/api-calls
  measurement: {aggregation: SUM, unit: "{request}"}
  event: {type: api-calls, valueProperty: $.calls, dimensions: {method: $.method}}
---
apiVersion: billing.miloapis.com/v1alpha1
kind: MeterDefinition
metadata: {name: http-route-bytes}
spec:
  meterName: networking.datumapis.com/gateway/egress-bytes
  phase: Published
  monitoredResourceTypes: [networking.datumapis.com/HTTPRoute]
  measurement: {aggregation: Sum, unit: By, dimensions: [region]}
---
apiVersion: billing.miloapis.com/v1alpha1
kind: MonitoredResourceType
metadata: {name: httproute}
spec:
  resourceTypeName: networking.datumapis.com/HTTPRoute
  gvk: {group: gateway.networking.k8s.io, kind: HTTPRoute}
  labels: [{name: name, required: true}]
"#;

#[tokio::test]
async fn ingest_in_every_content_type_and_query() {
    let s = start(None, 1 << 20).await;
    let (status, body) = s.post("/apis/apply", "application/yaml", METERS).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["action"], "created");

    let one = event(
        "1",
        "acme",
        "2026-01-01T10:00:00Z",
        json!({"calls": 1, "method": "GET"}),
    );
    assert_eq!(
        s.post(
            "/api/v1/events",
            "application/cloudevents+json",
            one.to_string()
        )
        .await
        .0,
        200
    );
    let batch = json!([event(
        "2",
        "acme",
        "2026-01-01T10:30:00Z",
        json!({"calls": "2", "method": "POST"})
    )]);
    assert_eq!(
        s.post(
            "/api/v1/events",
            "application/cloudevents-batch+json",
            batch.to_string()
        )
        .await
        .0,
        200
    );
    let plain = event(
        "3",
        "globex",
        "2026-01-01T11:00:00Z",
        json!({"calls": 4, "method": "GET"}),
    );
    assert_eq!(
        s.post("/api/v1/events", "application/json", plain.to_string())
            .await
            .0,
        200
    );
    let ndjson = format!(
        "{}\n{}\n",
        event("4", "acme", "2026-01-02T00:10:00Z", json!({"calls": 8})),
        event("1", "acme", "2026-01-01T10:00:00Z", json!({"calls": 100}))
    );
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(ndjson.as_bytes()).unwrap();
    let r = s
        .client
        .post(s.url("/api/v1/events"))
        .header("content-type", "application/x-ndjson")
        .header("content-encoding", "gzip")
        .header("prefer", "return=representation")
        .body(gz.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let outcome: Value = r.json().await.unwrap();
    assert_eq!(outcome["accepted"], 1);
    assert_eq!(outcome["duplicates"], 1, "the re-sent id 1 is a duplicate");

    let (status, q) = s.query("/api/v1/meters/api-calls/query?from=2026-01-01T00:00:00Z&to=2026-01-03T00:00:00Z&windowSize=DAY&groupBy=subject").await;
    assert_eq!(status, 200, "{q}");
    let rows: Vec<(String, String, i64)> = q["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["windowStart"].as_str().unwrap().to_owned(),
                r["subject"].as_str().unwrap().to_owned(),
                r["value"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("2026-01-01T00:00:00Z".into(), "acme".into(), 3),
            ("2026-01-01T00:00:00Z".into(), "globex".into(), 4),
            ("2026-01-02T00:00:00Z".into(), "acme".into(), 8),
        ]
    );
    // Berlin days: 2026-01-01T23:00Z starts Berlin's 2 January, so event 4 (00:10Z) falls in it.
    let (_, q) = s.query("/api/v1/meters/api-calls/query?from=2025-12-31T23:00:00Z&to=2026-01-02T23:00:00Z&windowSize=DAY&windowTimeZone=Europe/Berlin&groupBy=method&filterGroupBy%5Bmethod%5D=GET").await;
    assert_eq!(q["data"].as_array().unwrap().len(), 1, "{q}");
    assert_eq!(q["data"][0]["value"], 5);
    assert_eq!(q["data"][0]["groupBy"]["method"], "GET");

    // Cursor paging returns every row once.
    let (_, page1) = s.query("/api/v1/meters/api-calls/query?from=2026-01-01T00:00:00Z&to=2026-01-03T00:00:00Z&windowSize=HOUR&limit=2").await;
    assert_eq!(page1["data"].as_array().unwrap().len(), 2);
    let cursor = page1["nextCursor"].as_str().unwrap();
    let (_, page2) = s.query(&format!("/api/v1/meters/api-calls/query?from=2026-01-01T00:00:00Z&to=2026-01-03T00:00:00Z&windowSize=HOUR&limit=2&cursor={cursor}")).await;
    assert_eq!(page2["data"].as_array().unwrap().len(), 1);
    assert!(page2.get("nextCursor").is_none());
    // The answer says how long it is.
    let r = s
        .client
        .get(s.url("/api/v1/meters/api-calls/query?from=2026-01-01T00:00:00Z&to=2026-01-03T00:00:00Z&windowSize=HOUR"))
        .send()
        .await
        .unwrap();
    let length = r.content_length();
    let body = r.bytes().await.unwrap();
    assert_eq!(length, Some(body.len() as u64));

    let (_, events) = s.get("/api/v2/events?subject=acme").await;
    assert_eq!(events["items"].as_array().unwrap().len(), 3);
    let (_, metrics) = (
        StatusCode::OK,
        s.client
            .get(s.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    assert!(
        metrics.contains("tally_events_duplicate_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tally_events_accepted_total 4"),
        "{metrics}"
    );
    // Acknowledged events are in the journal, which is part of the disk use.
    let gauge = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {metrics}"))
    };
    let (disk, journal) = (
        gauge("tally_store_disk_bytes"),
        gauge("tally_store_journal_bytes"),
    );
    assert!(
        0 < journal && journal <= disk,
        "journal {journal}, disk {disk}"
    );
    // The ledger reports as a component, once per family.
    for line in [
        "tally_component_received_total{component_kind=\"sink\",component_id=\"ledger\"} 5",
        "tally_component_sent_total{component_kind=\"sink\",component_id=\"ledger\"} 4",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    assert_eq!(
        metrics
            .matches("# TYPE tally_component_received_total counter")
            .count(),
        1
    );
}

#[tokio::test]
async fn a_bad_event_rejects_the_whole_request() {
    let s = start(None, 1 << 20).await;
    let batch = json!([
        event("1", "acme", "2026-01-01T10:00:00Z", json!({})),
        {"specversion": "1.0", "id": "2", "type": "x"},
        event("3", "acme", "not a time", json!({})),
    ]);
    let (status, body) = s
        .post("/api/v1/events", "application/json", batch.to_string())
        .await;
    assert_eq!(status, 400);
    let errors = body["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2);
    assert_eq!(errors[0]["index"], 1);
    assert_eq!(errors[0]["errors"][0]["field"], "source");
    assert_eq!(errors[1]["index"], 2);
    assert_eq!(errors[1]["errors"][0]["field"], "time");
    let (_, events) = s.get("/api/v2/events").await;
    assert_eq!(
        events["items"].as_array().unwrap().len(),
        0,
        "nothing stored"
    );
}

#[tokio::test]
async fn bad_input_gets_clear_errors() {
    let s = start(None, 1000).await;
    let r = s
        .client
        .post(s.url("/api/v1/events"))
        .header("content-type", "application/json")
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert_eq!(s.post("/api/v1/events", "text/csv", "a,b").await.0, 415);
    let huge = format!(
        "[{}]",
        vec![event("1", "a", "2026-01-01T00:00:00Z", json!({})).to_string(); 20].join(",")
    );
    assert_eq!(
        s.post("/api/v1/events", "application/json", huge).await.0,
        413
    );
    assert_eq!(s.get("/api/v1/meters/nope/query").await.0, 404);
    s.post("/apis/apply", "application/yaml", METERS).await;
    let (status, body) = s
        .query("/api/v1/meters/api-calls/query?windowTimeZone=Mars/Olympus")
        .await;
    assert_eq!(status, 400);
    assert!(body["detail"].as_str().unwrap().contains("Mars/Olympus"));
    let (status, body) = s
        .query("/api/v1/meters/api-calls/query?from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z")
        .await;
    assert_eq!(status, 400);
    assert!(
        body["detail"].as_str().unwrap().contains("before"),
        "{body}"
    );
    let (status, body) = s
        .query("/api/v1/meters/api-calls/query?groupBy=colour")
        .await;
    assert_eq!(status, 400);
    assert!(
        body["detail"].as_str().unwrap().contains("colour"),
        "{body}"
    );
    assert_eq!(
        s.get("/api/v1/meters/api-calls/query?windowsize=DAY")
            .await
            .0,
        400,
        "misspelt parameters are refused"
    );
}

#[tokio::test]
async fn published_meters_are_frozen_and_labels_are_enforced() {
    let s = start(None, 1 << 20).await;
    s.post("/apis/apply", "application/yaml", METERS).await;
    let changed = METERS.replace("unit: By", "unit: KiBy");
    let (status, body) = s.post("/apis/apply", "application/yaml", changed).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("spec.measurement.unit"),
        "{body}"
    );

    let ev = |id: &str, resource: Value| {
        json!({"specversion": "1.0", "id": id, "source": "gw", "type": "networking.datumapis.com/gateway/egress-bytes",
        "subject": "projects/p1", "time": "2026-01-01T00:00:00Z", "data": {"value": "1000", "dimensions": {"region": "eu"}, "resource": resource}})
    };
    let (status, outcome) = s
        .post(
            "/api/v1/events",
            "application/json",
            json!([ev("a", json!({"name": "r1"})), ev("b", json!({}))]).to_string(),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(outcome["accepted"], 2);
    assert_eq!(
        outcome["quarantined"][0]["reason"],
        "MISSING_REQUIRED_LABEL"
    );
    assert!(
        outcome["quarantined"][0]["message"]
            .as_str()
            .unwrap()
            .contains("\"name\"")
    );
    let (_, q) = s.query("/api/v1/meters/http-route-bytes/query?from=2026-01-01T00:00:00Z&to=2026-01-02T00:00:00Z").await;
    assert_eq!(q["data"][0]["value"], 1000);
    // Making the label optional releases the quarantined event.
    let relaxed = METERS.replace("required: true", "required: false");
    assert_eq!(
        s.post("/apis/apply", "application/yaml", relaxed.clone())
            .await
            .0,
        200
    );
    let (_, q) = s.query("/api/v1/meters/http-route-bytes/query?from=2026-01-01T00:00:00Z&to=2026-01-02T00:00:00Z").await;
    assert_eq!(q["data"][0]["value"], 2000);
    let (_, quarantine) = s.get("/api/v1/quarantine?meter=http-route-bytes").await;
    assert_eq!(quarantine["items"].as_array().unwrap().len(), 0);

    // A Deprecated meter still measures, and says so.
    let deprecated = relaxed.replace("phase: Published", "phase: Deprecated");
    assert_eq!(
        s.post("/apis/apply", "application/yaml", deprecated)
            .await
            .0,
        200
    );
    let (status, outcome) = s
        .post(
            "/api/v1/events",
            "application/json",
            json!([ev("c", json!({"name": "r1"}))]).to_string(),
        )
        .await;
    assert_eq!(status, 200);
    assert!(
        outcome["warnings"][0]
            .as_str()
            .unwrap()
            .contains("Deprecated"),
        "{outcome}"
    );
    let (_, q) = s.query("/api/v1/meters/http-route-bytes/query?from=2026-01-01T00:00:00Z&to=2026-01-02T00:00:00Z").await;
    assert_eq!(q["data"][0]["value"], 3000);
}

#[tokio::test]
async fn meters_created_later_backfill_and_openmeter_api_works() {
    let s = start(None, 1 << 20).await;
    let events: Vec<Value> = (0..500).map(|i| json!({"specversion": "1.0", "id": i.to_string(), "source": "s", "type": "prompt",
        "subject": format!("c{}", i % 7), "time": "2026-02-01T12:00:00Z", "data": {"tokens": i, "model": if i % 2 == 0 {"a"} else {"b"}}})).collect();
    let (_, outcome) = s
        .post(
            "/api/v1/events",
            "application/json",
            Value::Array(events).to_string(),
        )
        .await;
    assert_eq!(outcome["quarantined"][0]["reason"], "UNKNOWN_METER");
    let meter = json!({"slug": "tokens", "eventType": "prompt", "aggregation": "SUM", "valueProperty": "$.tokens", "groupBy": {"model": "$.model"}});
    let (status, created) = s
        .post("/api/v1/meters", "application/json", meter.to_string())
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["aggregation"], "SUM");
    assert_eq!(
        s.post("/api/v1/meters", "application/json", meter.to_string())
            .await
            .0,
        409
    );
    let (_, q) = s.query("/api/v1/meters/tokens/query?groupBy=model").await;
    let total: i64 = q["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["value"].as_i64().unwrap())
        .sum();
    assert_eq!(total, (0..500).sum::<i64>(), "{q}");
    let (_, unknown) = s.get("/api/v1/quarantine?meter=").await;
    assert_eq!(
        unknown["items"].as_array().unwrap().len(),
        0,
        "events now have a meter"
    );
    let (_, list) = s.get("/api/v1/meters").await;
    assert_eq!(list[0]["slug"], "tokens");
    let r = s
        .client
        .delete(s.url("/api/v1/meters/tokens"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(s.get("/api/v1/meters/tokens").await.0, 404);
}

#[tokio::test]
async fn concurrent_creates_of_one_meter_let_exactly_one_win() {
    let s = start(None, 1 << 20).await;
    for round in 0..10 {
        let creates = (0..8).map(|i| {
            // Same slug, different definitions: only one may be stored.
            let meter = json!({"slug": format!("race{round}"), "eventType": format!("t{i}"), "aggregation": "COUNT"});
            s.post("/api/v1/meters", "application/json", meter.to_string())
        });
        let answers = futures::future::join_all(creates).await;
        let created: Vec<_> = answers.iter().filter(|(st, _)| *st == 201).collect();
        let conflicts = answers.iter().filter(|(st, _)| *st == 409).count();
        assert_eq!(created.len(), 1, "{answers:?}");
        assert_eq!(conflicts, 7, "{answers:?}");
        let (_, stored) = s.get(&format!("/api/v1/meters/race{round}")).await;
        assert_eq!(stored["eventType"], created[0].1["eventType"]);
    }
}

#[tokio::test]
async fn events_older_than_the_lateness_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = EmbeddedLedger::open(StoreConfig::new(dir.path())).unwrap();
    let state = AppState::new(Arc::new(ledger), 1 << 20, None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let s = Server {
        base: format!("http://{}", listener.local_addr().unwrap()),
        client: tally_delivery::client_builder()
            .build()
            .expect("HTTP client"),
        _dir: dir,
    };
    tokio::spawn(async move { axum::serve(listener, router(state)).await });
    let now = jiff::Timestamp::now();
    let old = now - jiff::SignedDuration::from_hours(24 * 40);
    let batch = json!([
        event("new", "a", &now.to_string(), json!({})),
        event("old", "a", &old.to_string(), json!({}))
    ]);
    let (status, body) = s
        .post("/api/v1/events", "application/json", batch.to_string())
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["errors"][0]["index"], 1);
    assert!(
        body["errors"][0]["errors"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("lateness")
    );
    let (_, events) = s.get("/api/v2/events").await;
    assert_eq!(
        events["items"].as_array().unwrap().len(),
        0,
        "nothing stored"
    );
}

#[tokio::test]
async fn tokens_are_required_when_configured() {
    let s = start(Some("s3cret"), 1 << 20).await;
    let r = s.client.get(s.url("/api/v1/meters")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body = r.text().await.unwrap();
    assert!(!body.contains("s3cret"));
    let r = s
        .client
        .get(s.url("/api/v1/meters"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = s
        .client
        .get(s.url("/api/v1/meters"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        s.client
            .get(s.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        s.client
            .get(s.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn openapi_document_lists_the_routes() {
    let s = start(None, 1 << 20).await;
    let (status, doc) = s.get("/openapi.json").await;
    assert_eq!(status, 200);
    for path in [
        "/api/v1/events",
        "/api/v1/meters/{slug}/query",
        "/apis/apply",
        "/metrics",
    ] {
        assert!(doc["paths"].get(path).is_some(), "missing {path}");
    }
}

#[tokio::test]
async fn a_query_without_from_starts_at_the_first_day_of_stored_usage() {
    let s = start(None, 1 << 20).await;
    s.post("/apis/apply", "application/yaml", METERS).await;
    // No usage yet: the last 30 days, in hours, answer empty.
    let (status, body) = s
        .query("/api/v1/meters/api-calls/query?windowSize=HOUR")
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"], json!([]));
    let from: jiff::Timestamp = body["from"].as_str().unwrap().parse().unwrap();
    let to: jiff::Timestamp = body["to"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        to.duration_since(from),
        jiff::SignedDuration::from_hours(30 * 24)
    );
    let batch = json!([
        event("a", "acme", "2026-03-02T10:15:00Z", json!({"calls": 2})),
        event("b", "acme", "2026-03-04T23:59:00Z", json!({"calls": 3})),
    ]);
    let (status, body) = s
        .post("/api/v1/events", "application/json", batch.to_string())
        .await;
    assert_eq!(status, 200, "{body}");
    for window in ["MINUTE", "HOUR", "DAY"] {
        let (status, body) = s
            .query(&format!(
                "/api/v1/meters/api-calls/query?windowSize={window}&to=2026-03-05T00:00:00Z"
            ))
            .await;
        assert_eq!(status, 200, "{window}: {body}");
        assert_eq!(body["from"], "2026-03-02T00:00:00Z", "{window}");
        let rows = body["data"].as_array().unwrap();
        let total: u64 = rows
            .iter()
            .map(|r| {
                r["value"]
                    .as_str()
                    .map_or_else(|| r["value"].as_u64().unwrap(), |v| v.parse().unwrap())
            })
            .sum();
        assert_eq!(total, 5, "{window}: {body}");
        assert!(
            rows.iter()
                .all(|r| r["windowStart"].as_str().unwrap() >= "2026-03-02T00:00:00Z"),
            "{window}: {body}"
        );
    }
}
