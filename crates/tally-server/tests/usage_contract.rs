//! The platform ingestion contract (`/v1/usage/events`, 207 and 429) and
//! scoped tokens, over real HTTP on a real embedded store.

use std::sync::Arc;

use futures::future::BoxFuture;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tally_ledger::{
    Applied, ApplyMode, EventFilter, EventPage, IngestOutcome, Ledger, LedgerError, LedgerStats,
    MeterQuery, QuarantineFilter, QuarantinePage, QueryResult, VoidOutcome, VoidPage, VoidRequest,
};
use tally_model::{CloudEvent, Kind, Manifest};
use tally_server::{AppState, TokenConfig, router};
use tally_store_embedded::{EmbeddedLedger, StoreConfig};
use tokio::sync::{Notify, Semaphore};

/// The real store, with ingest held at a gate the test opens: lets a test
/// keep a request in flight to observe overload deterministically.
struct GatedLedger {
    inner: EmbeddedLedger,
    gate: Arc<Semaphore>,
    /// Told each time an ingest reaches the gate.
    arrived: Arc<Notify>,
}

impl Ledger for GatedLedger {
    fn ingest(&self, events: Vec<CloudEvent>) -> BoxFuture<'_, Result<IngestOutcome, LedgerError>> {
        Box::pin(async move {
            self.arrived.notify_one();
            let _pass = self.gate.acquire().await.expect("gate open");
            self.inner.ingest(events).await
        })
    }
    fn apply(&self, m: Manifest, mode: ApplyMode) -> BoxFuture<'_, Result<Applied, LedgerError>> {
        self.inner.apply(m, mode)
    }
    fn delete(&self, kind: Kind, name: String) -> BoxFuture<'_, Result<(), LedgerError>> {
        self.inner.delete(kind, name)
    }
    fn get(&self, kind: Kind, name: String) -> BoxFuture<'_, Result<Manifest, LedgerError>> {
        self.inner.get(kind, name)
    }
    fn list(&self, kind: Kind) -> BoxFuture<'_, Result<Vec<Manifest>, LedgerError>> {
        self.inner.list(kind)
    }
    fn query(&self, m: String, q: MeterQuery) -> BoxFuture<'_, Result<QueryResult, LedgerError>> {
        self.inner.query(m, q)
    }
    fn query_states(
        &self,
        m: String,
        q: MeterQuery,
    ) -> BoxFuture<'_, Result<tally_ledger::StatefulResult, LedgerError>> {
        self.inner.query_states(m, q)
    }
    fn usage_span(
        &self,
        m: String,
    ) -> BoxFuture<'_, Result<Option<(jiff::Timestamp, jiff::Timestamp)>, LedgerError>> {
        self.inner.usage_span(m)
    }
    fn list_events(&self, f: EventFilter) -> BoxFuture<'_, Result<EventPage, LedgerError>> {
        self.inner.list_events(f)
    }
    fn list_quarantine(
        &self,
        f: QuarantineFilter,
    ) -> BoxFuture<'_, Result<QuarantinePage, LedgerError>> {
        self.inner.list_quarantine(f)
    }
    fn void(&self, r: VoidRequest) -> BoxFuture<'_, Result<VoidOutcome, LedgerError>> {
        self.inner.void(r)
    }
    fn list_voids(
        &self,
        limit: usize,
        cursor: Option<String>,
    ) -> BoxFuture<'_, Result<VoidPage, LedgerError>> {
        self.inner.list_voids(limit, cursor)
    }
    fn admission(&self) -> tally_ledger::Admission {
        self.inner.admission()
    }
    fn stats(&self) -> LedgerStats {
        self.inner.stats()
    }
    fn ready(&self) -> bool {
        self.inner.ready()
    }
}

/// The gate's size: each ingest passes with one permit, so holding them all
/// closes it (for far fewer concurrent ingests than this).
const GATE_PERMITS: u32 = 1024;

struct Server {
    base: String,
    client: reqwest::Client,
    gate: Arc<Semaphore>,
    arrived: Arc<Notify>,
    _dir: tempfile::TempDir,
}

async fn start(tokens: &[TokenConfig], max_pending: usize) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mut config = StoreConfig::new(dir.path());
    config.max_lateness = jiff::SignedDuration::from_hours(24 * 30);
    let gate = Arc::new(Semaphore::new(GATE_PERMITS as usize));
    let arrived = Arc::new(Notify::new());
    let ledger = GatedLedger {
        inner: EmbeddedLedger::open(config).unwrap(),
        gate: Arc::clone(&gate),
        arrived: Arc::clone(&arrived),
    };
    let admin = (!tokens.is_empty()).then_some("root");
    let state = AppState::new(Arc::new(ledger), 1 << 20, None)
        .with_tokens(admin, tokens)
        .unwrap()
        .with_max_pending_events(max_pending);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router(state)).await });
    Server {
        base,
        client: tally_delivery::client_builder().build().unwrap(),
        gate,
        arrived,
        _dir: dir,
    }
}

impl Server {
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut r = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let r = r.send().await.unwrap();
        let (status, headers) = (r.status(), r.headers().clone());
        (status, headers, r.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        let (s, _, b) = self
            .send(reqwest::Method::POST, path, token, Some(body))
            .await;
        (s, b)
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        let (s, _, b) = self.send(reqwest::Method::GET, path, token, None).await;
        (s, b)
    }
}

fn usage(id: &str, project: &str, value: Value) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "gateway", "type": "networking.datumapis.com/gateway/requests",
           "subject": format!("projects/{project}"), "time": jiff::Timestamp::now().to_string(),
           "data": {"value": value, "dimensions": {}, "resource": {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": project, "name": "r"}}})
}

fn ulid() -> String {
    ulid::Ulid::generate().to_string()
}

const METER: &str = r#"{"apiVersion": "billing.miloapis.com/v1alpha1", "kind": "MeterDefinition",
  "metadata": {"name": "gateway-requests"},
  "spec": {"meterName": "networking.datumapis.com/gateway/requests", "phase": "Draft",
           "measurement": {"aggregation": "Sum", "unit": "{request}"}}}"#;

#[tokio::test]
async fn valid_events_are_stored_and_invalid_ones_listed_in_a_207() {
    let s = start(&[], 1000).await;
    let meter: Value = serde_json::from_str(METER).unwrap();
    assert_eq!(s.post("/apis/apply", None, meter).await.0, 200);

    let ok = ulid();
    let (status, body) = s
        .post("/v1/usage/events", None, usage(&ok, "acme", json!("5")))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 1);

    let good = ulid();
    let mut missing = usage(&ulid(), "acme", json!("1"));
    missing.as_object_mut().unwrap().remove("source");
    let mut bad_type = usage(&ulid(), "acme", json!("1"));
    bad_type["datacontenttype"] = json!("text/plain");
    let too_old = {
        let mut e = usage(&ulid(), "acme", json!("1"));
        e["time"] = json!("2001-01-01T00:00:00Z");
        e
    };
    let batch = json!([
        usage(&good, "acme", json!("7")),
        usage("not-a-ulid", "acme", json!("1")),
        // An exponent is not an exact decimal string.
        usage(&ulid(), "acme", json!("1.5e1")),
        missing,
        bad_type,
        too_old,
        usage(&ok, "acme", json!("5")),
        // Tally's extension: an exact decimal (the edge agent's seconds).
        usage(&ulid(), "acme", json!("0.25")),
    ]);
    let (status, body) = s.post("/v1/usage/events:batchIngest", None, batch).await;
    assert_eq!(status, 207, "{body}");
    assert_eq!(body["accepted"], 2, "{body}");
    assert_eq!(body["duplicates"], 1, "{body}");
    let reasons: Vec<(u64, &str)> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), r["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(
        reasons,
        [
            (1, "INVALID_ULID"),
            (2, "INVALID_VALUE_TYPE"),
            (3, "MISSING_REQUIRED_FIELD"),
            (4, "INVALID_DATACONTENTTYPE"),
            (5, "TOO_LATE"),
        ]
    );
    assert!(
        body["rejected"][2]["detail"]
            .as_str()
            .unwrap()
            .contains("source")
    );

    // Exactly the three valid events count, the decimal exactly.
    let (_, q) = s.get("/api/v1/meters/gateway-requests/query", None).await;
    assert_eq!(q["data"][0]["value"], 12.25, "{q}");

    // A lone invalid event is refused in a 207 too.
    let (status, body) = s
        .post("/v1/usage/events", None, usage("x", "acme", json!("1")))
        .await;
    assert_eq!(status, 207);
    assert_eq!(body["rejected"][0]["reason"], "INVALID_ULID");
}

#[tokio::test]
async fn overload_answers_429_with_retry_after_and_stores_nothing() {
    let s = start(&[], 1).await;
    // Hold ingest at the gate so one event stays pending.
    let held = s.gate.acquire_many(GATE_PERMITS).await.unwrap();
    let first = {
        let (client, base) = (s.client.clone(), s.base.clone());
        tokio::spawn(async move {
            client
                .post(format!("{base}/v1/usage/events"))
                .header("content-type", "application/json")
                .body(usage(&ulid(), "acme", json!("1")).to_string())
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    // The first request holds the only permit once it reaches the ledger.
    s.arrived.notified().await;
    let second_id = ulid();
    // Admitted by mistake, it would wait at the gate: time out instead.
    let (status, headers, body) = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        s.send(
            reqwest::Method::POST,
            "/v1/usage/events",
            None,
            Some(usage(&second_id, "acme", json!("1"))),
        ),
    )
    .await
    .expect("a saturated ledger answers at once");
    assert_eq!(status, 429, "{body}");
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(body["status"], 429);
    drop(held);
    assert_eq!(first.await.unwrap(), 200);
    let (_, events) = s.get(&format!("/api/v2/events?id={second_id}"), None).await;
    assert_eq!(
        events["items"].as_array().unwrap().len(),
        0,
        "the 429'd event was not stored"
    );
    // Retried after the overload, it is stored.
    let (status, _) = s
        .post(
            "/v1/usage/events",
            None,
            usage(&second_id, "acme", json!("1")),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn scoped_tokens_limit_what_each_caller_does_and_sees() {
    let token = |name: &str, secret: &str, scope: &str| TokenConfig {
        name: name.into(),
        token: Some(secret.into()),
        sha256: None,
        scopes: vec![scope.into()],
    };
    let s = start(
        &[
            token("agents", "ingest-secret", "ingest"),
            token("acme", "acme-secret", "project:acme"),
        ],
        1000,
    )
    .await;
    let meter: Value = serde_json::from_str(METER).unwrap();
    assert_eq!(
        s.post("/apis/apply", Some("acme-secret"), meter.clone())
            .await
            .0,
        403
    );
    assert_eq!(
        s.post("/apis/apply", Some("ingest-secret"), meter.clone())
            .await
            .0,
        403
    );
    assert_eq!(s.post("/apis/apply", Some("root"), meter).await.0, 200);

    let batch = json!([
        usage(&ulid(), "acme", json!("3")),
        usage(&ulid(), "globex", json!("40"))
    ]);
    assert_eq!(
        s.post(
            "/v1/usage/events:batchIngest",
            Some("acme-secret"),
            batch.clone()
        )
        .await
        .0,
        403
    );
    assert_eq!(
        s.post("/v1/usage/events:batchIngest", Some("ingest-secret"), batch)
            .await
            .0,
        200
    );

    // The ingest token cannot read usage; acme reads only its own.
    let query = "/api/v1/meters/gateway-requests/query";
    assert_eq!(s.get(query, Some("ingest-secret")).await.0, 403);
    let (status, mine) = s.get(query, Some("acme-secret")).await;
    assert_eq!(status, 200, "{mine}");
    let rows = mine["data"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{mine}");
    assert_eq!(rows[0]["subject"], "projects/acme");
    assert_eq!(rows[0]["value"], 3);
    let (status, _) = s
        .get(
            &format!("{query}?subject=projects/globex"),
            Some("acme-secret"),
        )
        .await;
    assert_eq!(status, 403);
    let (_, all) = s.get(query, Some("root")).await;
    assert_eq!(all["data"][0]["value"], 43, "{all}");

    let (status, events) = s.get("/api/v2/events", Some("acme-secret")).await;
    assert_eq!(status, 200, "{events}");
    let subjects: Vec<&str> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"]["subject"].as_str().unwrap())
        .collect();
    assert_eq!(subjects, ["projects/acme"]);
    // The catalog is readable by every caller; operations data is admin-only.
    assert_eq!(s.get("/api/v1/meters", Some("acme-secret")).await.0, 200);
    assert_eq!(
        s.get("/api/v1/quarantine", Some("acme-secret")).await.0,
        403
    );
    assert_eq!(s.get("/metrics", Some("ingest-secret")).await.0, 403);
    assert_eq!(s.get("/api/v1/meters", Some("wrong")).await.0, 401);
}

#[tokio::test]
async fn voiding_takes_an_event_out_of_its_meters_with_an_audit_record() {
    let s = start(&[], 1000).await;
    let meter: Value = serde_json::from_str(METER).unwrap();
    assert_eq!(s.post("/apis/apply", None, meter).await.0, 200);
    let (keep, wrong) = (ulid(), ulid());
    let batch = json!([
        usage(&keep, "acme", json!("5")),
        usage(&wrong, "acme", json!("500"))
    ]);
    assert_eq!(
        s.post("/v1/usage/events:batchIngest", None, batch).await.0,
        200
    );
    let query = "/api/v1/meters/gateway-requests/query";
    assert_eq!(s.get(query, None).await.1["data"][0]["value"], 505);

    let void = json!({"source": "gateway", "id": wrong, "reason": "double-billed in incident 42"});
    let (status, outcome) = s.post("/api/v1/events/void", None, void.clone()).await;
    assert_eq!(status, 200, "{outcome}");
    assert_eq!(outcome["alreadyVoided"], false);
    assert_eq!(outcome["record"]["voidedBy"], "anonymous");
    assert_eq!(s.get(query, None).await.1["data"][0]["value"], 5);
    let (_, again) = s.post("/api/v1/events/void", None, void).await;
    assert_eq!(again["alreadyVoided"], true);
    assert_eq!(again["record"], outcome["record"]);

    // The event stays listed, marked; a re-send is a duplicate, not a comeback.
    let (_, listed) = s
        .get(&format!("/api/v2/events?source=gateway&id={wrong}"), None)
        .await;
    assert_eq!(
        listed["items"][0]["voided"]["reason"],
        "double-billed in incident 42"
    );
    let (_, resent) = s
        .post(
            "/v1/usage/events",
            None,
            usage(&wrong, "acme", json!("500")),
        )
        .await;
    assert_eq!(resent["duplicates"], 1);
    assert_eq!(s.get(query, None).await.1["data"][0]["value"], 5);
    let (_, trail) = s.get("/api/v1/events/voids", None).await;
    assert_eq!(trail["items"].as_array().unwrap().len(), 1);
    assert_eq!(trail["items"][0]["id"], wrong.as_str());

    let missing = json!({"source": "gateway", "id": ulid(), "reason": "x"});
    assert_eq!(s.post("/api/v1/events/void", None, missing).await.0, 404);
    let no_reason = json!({"source": "gateway", "id": keep, "reason": " "});
    assert_eq!(s.post("/api/v1/events/void", None, no_reason).await.0, 400);
}
