//! A hostile tenant against a real `tally serve` process: every route of
//! `/openapi.json` with every kind of token, compression bombs, oversized
//! and deeply nested bodies, invalid UTF-8, control characters and `../` in
//! names, oversized fields and far-future times. After each, the server
//! still answers, its memory stays bounded, errors are problem+json, and
//! nothing of a refused request is stored.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

mod common;

const ADMIN: &str = "root-token";
const INGEST: &str = "ingest-token";
const ACME: &str = "acme-token";
const GLOBEX: &str = "globex-token";
/// The server's body limit in this suite.
const MAX_BODY: usize = 1 << 20;
/// What the server may hold in memory at most after any of it.
const MAX_RSS_BYTES: u64 = 768 << 20;

fn start(dir: &Path) -> common::Server {
    common::serve_with_config(
        dir,
        &format!(
            "token: {ADMIN}\nmaxBodyBytes: {MAX_BODY}\ntokens:\n\
             - {{name: agents, token: {INGEST}, scopes: [ingest]}}\n\
             - {{name: acme, token: {ACME}, scopes: [\"project:acme\"]}}\n\
             - {{name: globex, token: {GLOBEX}, scopes: [\"project:globex\"]}}\n"
        ),
    )
}

struct Client {
    http: reqwest::Client,
    base: String,
}

/// An answer: status, content type and body.
struct Answer {
    status: StatusCode,
    content_type: String,
    body: Value,
}

impl Client {
    fn new(server: &common::Server) -> Client {
        Client {
            http: tally_delivery::client_builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            base: server.base.clone(),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Answer {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let bytes = response.bytes().await.unwrap();
        Answer {
            status,
            content_type,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    async fn post(&self, path: &str, content_type: &str, body: impl Into<Vec<u8>>) -> Answer {
        let headers = [("content-type", content_type)];
        self.send(Method::POST, path, Some(ADMIN), &headers, body.into())
            .await
    }

    /// The server is alive and ready, and holds at most `MAX_RSS_BYTES`.
    async fn assert_healthy(&self, server: &common::Server, after: &str) {
        for path in ["/healthz", "/readyz"] {
            let answer = self.send(Method::GET, path, None, &[], vec![]).await;
            assert_eq!(answer.status, 200, "{path} after {after}");
        }
        let rss = rss_bytes(server.child.id());
        assert!(
            rss < MAX_RSS_BYTES,
            "resident memory {} MiB after {after}",
            rss >> 20
        );
    }

    /// How many events are stored.
    async fn stored_events(&self) -> usize {
        let answer = self
            .send(
                Method::GET,
                "/api/v2/events?limit=10000",
                Some(ADMIN),
                &[],
                vec![],
            )
            .await;
        assert_eq!(answer.status, 200);
        answer.body["events"]
            .as_array()
            .or_else(|| answer.body["items"].as_array())
            .map_or(0, Vec::len)
    }
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn assert_problem(answer: &Answer, status: u16, what: &str) {
    assert_eq!(answer.status, status, "{what}: {}", answer.body);
    assert_eq!(
        answer.content_type, "application/problem+json",
        "{what} answered {status} without problem+json"
    );
}

// ---- the access matrix -----------------------------------------------------

/// What a route lets a token do.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Rule {
    /// Anyone, no token needed.
    Public,
    /// Admin and ingest tokens.
    Ingest,
    /// Admin and project tokens (usage narrowed to the project).
    Read,
    /// Admin and the project that owns the namespace `acme`; another
    /// project is refused (403) or answered not found (404), never served.
    AcmeResource,
    /// Admin only.
    Admin,
}

/// Every route of `/openapi.json` with the rule it follows. A route missing
/// here fails the test: a new route needs a decision.
fn rule(method: &Method, path: &str) -> Option<Rule> {
    use Rule::*;
    let m = method.as_str();
    Some(match (m, path) {
        ("GET", "/healthz" | "/readyz") => Public,
        (
            "POST",
            "/api/v1/events"
            | "/v1/usage/events"
            | "/v1/usage/events:batchIngest"
            | "/v1/metrics"
            | "/v1/logs"
            | "/v1/traces"
            | "/api/v1/write"
            | "/api/v1/instances/events",
        ) => Ingest,
        (
            "GET",
            "/api/v1/events"
            | "/api/v2/events"
            | "/api/v1/meters"
            | "/api/v1/meters/{slug}"
            | "/api/v1/meters/{slug}/query"
            | "/api/v1/meters/{slug}/group-by/{key}/values"
            | "/api/v1/meters/{slug}/subjects"
            | "/api/v1/subjects"
            | "/api/v1/subjects/{key}"
            | "/openapi.json"
            | "/apis/{plural}"
            | "/apis/{plural}/{name}"
            | "/api/v1/instances"
            | "/api/v1/instances/{instance}/events",
        ) => Read,
        ("POST", "/api/v1/meters/{slug}/query") => Read,
        // Instance logs: narrowed to the caller's projects (another: 404).
        (
            "GET",
            "/api/v1/projects/{project}/instances/{instance}/logs"
            | "/loki/api/v1/query_range"
            | "/loki/api/v1/labels"
            | "/loki/api/v1/tail"
            | "/loki/api/v1/label/{name}/values",
        ) => Read,
        // The Prometheus query API, held to the caller's project.
        (
            "GET" | "POST",
            "/api/v1/query" | "/api/v1/query_range" | "/api/v1/labels" | "/api/v1/series",
        )
        | ("GET", "/api/v1/label/{name}/values") => Read,
        // OpenMeter features not served: 501 for every caller that reads.
        (_, p) if p.starts_with("/api/v") && not_served(p) => Read,
        ("POST", "/api/v1/subjects") | ("DELETE", "/api/v1/subjects/{key}") => Admin,
        ("PUT", "/api/v1/meters/{slug}") => Admin,
        ("POST", "/apis/apply") | (_, "/apis/{plural}/{namespace}/{name}") => AcmeResource,
        ("PUT" | "DELETE", "/apis/{plural}/{name}") => Admin,
        ("POST" | "DELETE", "/api/v1/meters" | "/api/v1/meters/{slug}" | "/api/v1/events/void") => {
            Admin
        }
        (
            "GET",
            "/api/v1/events/voids"
            | "/api/v1/quarantine"
            | "/metrics"
            | "/api/v1/billing/status"
            | "/api/v1/billing/deadletters"
            | "/api/v1/billing/reconcile"
            | "/api/v1/meters/{slug}/changes"
            | "/api/v1/meters/{slug}/validate",
        ) => Admin,
        (
            "POST",
            "/api/v1/billing/deadletters/{sink}/{id}/retry"
            | "/api/v1/billing/deadletters/{sink}/retry",
        ) => Admin,
        _ => return None,
    })
}

/// Whether `path` is one of OpenMeter's families Tally answers 501 for.
fn not_served(path: &str) -> bool {
    const FAMILIES: [&str; 18] = [
        "entitlements",
        "grants",
        "features",
        "plans",
        "addons",
        "subscriptions",
        "customers",
        "billing/invoices",
        "billing/profiles",
        "billing/customers",
        "notification",
        "apps",
        "marketplace",
        "stripe",
        "portal",
        "info",
        "debug",
        "subjects/{key}/entitlements",
    ];
    FAMILIES.iter().any(|f| {
        ["/api/v1/", "/api/v2/"]
            .iter()
            .any(|v| path == format!("{v}{f}") || path == format!("{v}{f}/{{rest}}"))
    })
}

/// A concrete request for a route: path and body.
fn request_for(method: &Method, template: &str) -> (String, Vec<u8>, &'static str) {
    let secret = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "matrix", "namespace": "acme"}, "stringData": {"k": "v"}});
    let path = match (method.as_str(), template) {
        (_, "/apis/{plural}") => "/apis/secrets".to_owned(),
        ("GET", "/apis/{plural}/{name}") => "/apis/meterdefinitions/matrix-none".to_owned(),
        (_, "/apis/{plural}/{name}") => "/apis/meterdefinitions/matrix-none".to_owned(),
        (_, "/apis/{plural}/{namespace}/{name}") => "/apis/secrets/acme/matrix".to_owned(),
        _ => template
            .replace("{slug}", "requests")
            .replace("{sink}", "none")
            .replace("{id}", "1")
            .replace("{key}", "model")
            .replace("{project}", "acme")
            .replace("{instance}", "web-0")
            .replace("{name}", "job")
            .replace("{rest}", "x/y"),
    };
    match (method.as_str(), template) {
        ("POST", "/apis/apply") | ("PUT", "/apis/{plural}/{namespace}/{name}") => {
            (path, secret.to_string().into_bytes(), "application/json")
        }
        ("POST", "/v1/metrics" | "/v1/logs" | "/v1/traces" | "/api/v1/write") => {
            (path, vec![], "application/x-protobuf")
        }
        _ => (path, b"{}".to_vec(), "application/json"),
    }
}

/// Whether `token` may pass `rule` (not refused with 401 or 403).
fn admitted(rule: Rule, token: Option<&str>) -> bool {
    matches!(
        (rule, token),
        (Rule::Public, _)
            | (_, Some(ADMIN))
            | (Rule::Ingest, Some(INGEST))
            | (Rule::Read, Some(ACME | GLOBEX))
            | (Rule::AcmeResource, Some(ACME))
    )
}

/// Every (method, path) of the API document, `/openapi.json` itself too.
async fn routes(client: &Client) -> Vec<(Method, String)> {
    let doc = client
        .send(Method::GET, "/openapi.json", Some(ADMIN), &[], vec![])
        .await;
    assert_eq!(doc.status, 200);
    let mut routes = vec![(Method::GET, "/openapi.json".to_owned())];
    for (path, item) in doc.body["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            routes.push((method, path.clone()));
        }
    }
    routes
}

#[tokio::test]
async fn every_route_answers_every_token_as_the_scope_rules_say() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let client = Client::new(&server);
    let routes = routes(&client).await;
    assert!(routes.len() > 25, "only {} routes documented", routes.len());
    let tokens = [
        None,
        Some("wrong-token"),
        Some(INGEST),
        Some(ACME),
        Some(GLOBEX),
        Some(ADMIN),
    ];
    for (method, template) in &routes {
        let rule = rule(method, template)
            .unwrap_or_else(|| panic!("{method} {template} has no rule in this matrix"));
        let (path, body, content_type) = request_for(method, template);
        for token in tokens {
            let headers = [("content-type", content_type)];
            let answer = client
                .send(method.clone(), &path, token, &headers, body.clone())
                .await;
            let what = format!("{method} {path} with {token:?}");
            let refused = matches!(answer.status.as_u16(), 401 | 403);
            if admitted(rule, token) {
                assert!(!refused, "{what} was refused: {}", answer.body);
            } else if rule == Rule::AcmeResource && token == Some(GLOBEX) {
                assert!(
                    refused || answer.status == 404,
                    "{what} answered {}",
                    answer.status
                );
            } else {
                let expected = if matches!(token, Some(INGEST | ACME | GLOBEX | ADMIN)) {
                    403
                } else {
                    401
                };
                assert_eq!(answer.status, expected, "{what}: {}", answer.body);
            }
            let otlp =
                matches!(template.as_str(), "/v1/metrics" | "/v1/logs" | "/v1/traces") && !refused;
            if answer.status.as_u16() >= 400 && !otlp {
                assert_eq!(
                    answer.content_type, "application/problem+json",
                    "{what} answered {} without problem+json",
                    answer.status
                );
            }
        }
    }
    // What acme wrote, globex never sees.
    let listed = client
        .send(Method::GET, "/apis/secrets", Some(GLOBEX), &[], vec![])
        .await;
    assert_eq!(listed.body["items"], json!([]));
    client.assert_healthy(&server, "the matrix").await;
}

#[tokio::test]
async fn methods_and_paths_no_route_has_answer_problem_json() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let client = Client::new(&server);
    let cases = [
        (Method::PATCH, "/api/v1/events", 405),
        (Method::DELETE, "/api/v1/events", 405),
        (Method::GET, "/api/v1/nowhere", 404),
        (Method::PUT, "/apis/apply", 405),
    ];
    for (method, path, status) in cases {
        let answer = client
            .send(method.clone(), path, Some(ADMIN), &[], vec![])
            .await;
        assert_problem(&answer, status, &format!("{method} {path}"));
    }
    let answer = client
        .send(
            Method::PUT,
            "/apis/secrets/acme/s",
            Some(ADMIN),
            &[("content-type", "application/json")],
            b"{not json".to_vec(),
        )
        .await;
    assert!(answer.status.is_client_error(), "{}", answer.status);
    assert_eq!(answer.content_type, "application/problem+json");
    client.assert_healthy(&server, "unknown methods").await;
}

// ---- bombs and malformed bodies ---------------------------------------------

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// A batch of one event whose JSON is padded with `n` spaces: compresses to
/// almost nothing and expands past any limit.
fn padded_batch(n: usize) -> Vec<u8> {
    let mut body = b"[".to_vec();
    body.extend(std::iter::repeat_n(b' ', n));
    body.extend_from_slice(b"]");
    body
}

#[tokio::test]
async fn compression_bombs_are_refused_within_the_body_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let client = Client::new(&server);
    let plain = padded_batch(64 * MAX_BODY);
    let gz = gzip(&plain);
    let zst =
        ruzstd::encoding::compress_to_vec(&plain[..], ruzstd::encoding::CompressionLevel::Fastest);
    assert!(gz.len() < MAX_BODY && zst.len() < MAX_BODY);
    for (encoding, body) in [("gzip", gz), ("zstd", zst)] {
        for path in [
            "/api/v1/events",
            "/v1/usage/events:batchIngest",
            "/apis/apply",
        ] {
            let headers = [
                ("content-type", "application/json"),
                ("content-encoding", encoding),
            ];
            let answer = client
                .send(Method::POST, path, Some(ADMIN), &headers, body.clone())
                .await;
            assert_problem(&answer, 413, &format!("{encoding} bomb to {path}"));
        }
        client.assert_healthy(&server, encoding).await;
    }
    // Snappy, as remote-write sends it.
    // Snappy expands at most about 21 times: 16 times the limit still
    // arrives in a body under it, so the refusal is the decompressor's.
    let snappy = snap::raw::Encoder::new()
        .compress_vec(&vec![0u8; 16 * MAX_BODY])
        .unwrap();
    assert!(snappy.len() < MAX_BODY, "{} bytes", snappy.len());
    let headers = [
        ("content-type", "application/x-protobuf"),
        ("content-encoding", "snappy"),
    ];
    let answer = client
        .send(Method::POST, "/api/v1/write", Some(ADMIN), &headers, snappy)
        .await;
    assert_problem(&answer, 413, "snappy bomb");
    // A plain body over the limit is refused from its Content-Length,
    // before it is read: the answer comes while the client would still be
    // sending, so ask over a raw socket and send no body.
    let (status, content_type) = announce_oversized_body(&server.base, "/api/v1/events");
    assert_eq!(
        (status, content_type.as_str()),
        (413, "application/problem+json")
    );
    client.assert_healthy(&server, "the bombs").await;
    assert_eq!(client.stored_events().await, 0);
}

/// Sends only the headers of a POST announcing a body twice the limit;
/// the status and content type of the answer.
fn announce_oversized_body(base: &str, path: &str) -> (u16, String) {
    use std::io::{BufRead, BufReader};
    let address = base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: tally\r\nAuthorization: Bearer {ADMIN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        2 * MAX_BODY
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut content_type = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap() == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-type")
        {
            content_type = value.trim().to_owned();
        }
    }
    (status, content_type)
}

fn event(id: &str) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "hostile", "type": "requests",
           "subject": "projects/acme", "time": jiff::Timestamp::now().to_string(),
           "data": {"value": "1"}})
}

#[tokio::test]
async fn deep_nesting_invalid_text_and_bad_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let client = Client::new(&server);
    // Deep JSON inside an event, and deep YAML and JSON manifests.
    let deep_json = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let mut deep_event = event("deep").to_string();
    deep_event.insert_str(deep_event.len() - 1, &format!(",\"x\":{deep_json}"));
    let answer = client
        .post("/api/v1/events", "application/json", deep_event)
        .await;
    assert_problem(&answer, 400, "deeply nested event");
    let mut deep_yaml = String::from(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: d, namespace: acme}\nstringData:\n",
    );
    for level in 1..1_000 {
        deep_yaml.push_str(&" ".repeat(level));
        deep_yaml.push_str("- a:\n");
    }
    for (body, content_type) in [
        (deep_yaml.clone(), "application/yaml"),
        (deep_json.clone(), "application/json"),
        ("- ".repeat(200_000), "application/yaml"),
    ] {
        let answer = client.post("/apis/apply", content_type, body).await;
        assert_problem(&answer, 400, "deeply nested manifest");
    }
    // Invalid UTF-8.
    let mut bad = event("utf8").to_string().into_bytes();
    bad.extend_from_slice(b"\n\xff\xfe{\n");
    let answer = client
        .post("/api/v1/events", "application/x-ndjson", bad.clone())
        .await;
    assert_problem(&answer, 400, "invalid UTF-8 in NDJSON");
    let answer = client.post("/apis/apply", "application/yaml", bad).await;
    assert_problem(&answer, 400, "invalid UTF-8 in YAML");
    // Names that would be paths, or carry control characters.
    for name in ["../etc", "a/../../b", "nul\u{0}", "bell\u{7}", "..", "A..B"] {
        let secret = json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": "acme"}, "stringData": {"k": "v"}});
        let answer = client
            .post("/apis/apply", "application/json", secret.to_string())
            .await;
        assert_problem(&answer, 400, &format!("Secret named {name:?}"));
        let secret = json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "ok", "namespace": name}, "stringData": {"k": "v"}});
        let answer = client
            .post("/apis/apply", "application/json", secret.to_string())
            .await;
        assert_problem(&answer, 400, &format!("namespace {name:?}"));
    }
    let answer = client
        .send(
            Method::GET,
            "/apis/secrets/..%2F..%2Fetc/passwd",
            Some(ADMIN),
            &[],
            vec![],
        )
        .await;
    assert!(
        answer.status == 404 || answer.status == 400,
        "{}",
        answer.status
    );
    let listed = client
        .send(Method::GET, "/apis/secrets", Some(ADMIN), &[], vec![])
        .await;
    assert_eq!(
        listed.body["items"],
        json!([]),
        "a refused manifest was stored"
    );
    client.assert_healthy(&server, "malformed bodies").await;
    assert_eq!(client.stored_events().await, 0);
}

#[tokio::test]
async fn oversized_fields_and_far_future_times_are_refused_and_the_writer_lives() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let client = Client::new(&server);
    let long = "x".repeat(70_000);
    let mut cases = Vec::new();
    for field in ["id", "source", "subject", "type"] {
        let mut e = event(&ulid::Ulid::generate().to_string());
        e[field] = json!(long);
        cases.push((field.to_owned(), e));
    }
    let mut e = event(&ulid::Ulid::generate().to_string());
    e["data"]["dimensions"] = json!({"region": long});
    cases.push(("data.dimensions.region".to_owned(), e));
    for (field, e) in &cases {
        let answer = client
            .post("/api/v1/events", "application/json", e.to_string())
            .await;
        assert_problem(&answer, 400, field);
        let errors = answer.body["errors"][0]["errors"].as_array().unwrap();
        assert!(
            errors
                .iter()
                .any(|err| err["field"] == *field && err["code"] == "VALUE_TOO_LONG"),
            "{field}: {errors:?}"
        );
        for path in ["/v1/usage/events", "/v1/usage/events:batchIngest"] {
            let answer = client.post(path, "application/json", e.to_string()).await;
            assert_eq!(answer.status, 207, "{path} {field}: {}", answer.body);
            assert_eq!(answer.body["rejected"][0]["reason"], "VALUE_TOO_LONG");
        }
    }
    let void = json!({"source": long, "id": "1", "reason": "hostile"});
    let answer = client
        .post("/api/v1/events/void", "application/json", void.to_string())
        .await;
    assert_problem(&answer, 400, "void with a long source");
    let answer = client
        .send(
            Method::GET,
            &format!("/api/v1/events?id={}", "y".repeat(8_000)),
            Some(ADMIN),
            &[],
            vec![],
        )
        .await;
    assert_problem(&answer, 400, "a long id filter");
    // Far-future times, on both APIs.
    for time in [
        "9999-06-01T00:00:00Z",
        "9999-12-31T23:59:59Z",
        "2126-01-01T00:00:00Z",
    ] {
        let mut e = event(&ulid::Ulid::generate().to_string());
        e["time"] = json!(time);
        let answer = client
            .post("/api/v1/events", "application/json", e.to_string())
            .await;
        assert_problem(&answer, 400, time);
        assert_eq!(
            answer.body["errors"][0]["errors"][0]["code"],
            "TIME_IN_FUTURE"
        );
        let answer = client
            .post("/v1/usage/events", "application/json", e.to_string())
            .await;
        assert_eq!(
            answer.body["rejected"][0]["reason"], "TIME_IN_FUTURE",
            "{time}"
        );
    }
    client.assert_healthy(&server, "oversized fields").await;
    assert_eq!(client.stored_events().await, 0);
    // The writer still takes events.
    let answer = client
        .post(
            "/api/v1/events",
            "application/json",
            event("fine").to_string(),
        )
        .await;
    assert_eq!(answer.status, 204, "{}", answer.body);
    assert_eq!(client.stored_events().await, 1);
}
