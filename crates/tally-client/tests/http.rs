//! `TallyClient` against a tiny in-process axum server on 127.0.0.1.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tally_client::{
    ApplyAction, ClientError, EventListParams, MeterQueryParams, TallyClient, WindowSize,
};
use tally_model::Kind;

/// What the test server saw of the last request.
#[derive(Debug, Default, Clone)]
struct Seen {
    authorization: Option<String>,
    content_type: Option<String>,
    uri: Option<String>,
    query: Option<String>,
    body: Vec<u8>,
}

type Shared = Arc<Mutex<Seen>>;

fn record(seen: &Shared, headers: &HeaderMap, uri: &Uri, query: Option<String>, body: &[u8]) {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &header::HeaderValue| v.to_str().ok())
            .map(str::to_owned)
    };
    let mut seen = seen.lock().unwrap();
    *seen = Seen {
        authorization: text(header::AUTHORIZATION),
        content_type: text(header::CONTENT_TYPE),
        uri: Some(uri.to_string()),
        query,
        body: body.to_vec(),
    };
}

fn json_response(status: StatusCode, content_type: &'static str, body: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, content_type)],
        body.to_string(),
    )
        .into_response()
}

async fn ingest(State(seen): State<Shared>, headers: HeaderMap, uri: Uri, body: Bytes) -> Response {
    record(&seen, &headers, &uri, None, &body);
    let events: Vec<Value> = serde_json::from_slice(&body).unwrap();
    if events.iter().any(|e| e.get("subject").is_none()) {
        return json_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            "application/problem+json",
            json!({
                "type": "https://tally.dev/problems/events-refused",
                "title": "Events refused",
                "status": 422,
                "detail": "2 of 3 events are not valid CloudEvents; nothing was stored",
                "errors": [
                    {"index": 0, "id": "e1", "errors": [
                        {"field": "subject", "reason": "is required"},
                        {"field": "time", "reason": "not an RFC 3339 timestamp"}]},
                    {"index": 2, "errors": [{"field": "id", "reason": "is required"}]}
                ]
            }),
        );
    }
    json_response(
        StatusCode::OK,
        "application/json",
        json!({"accepted": events.len(), "duplicates": 0, "quarantined": [
            {"index": 0, "id": "e1", "meter": "requests", "reason": "missing_value", "message": "no $.value"}
        ]}),
    )
}

async fn query(
    State(seen): State<Shared>,
    Path(slug): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    record(&seen, &headers, &uri, raw, &[]);
    let body = format!(
        r#"{{"from":"2026-01-01T00:00:00Z","to":"2026-01-03T00:00:00Z","windowSize":"DAY","windowTimeZone":"UTC","data":[
            {{"value": 9007199254740993, "windowStart":"2026-01-01T00:00:00Z","windowEnd":"2026-01-02T00:00:00Z","subject":"{slug}","groupBy":{{"method":"GET"}}}},
            {{"value": 0.3, "windowStart":"2026-01-02T00:00:00Z","windowEnd":"2026-01-03T00:00:00Z","groupBy":{{"method":null}}}}
        ]}}"#
    );
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

async fn apply(State(seen): State<Shared>, headers: HeaderMap, uri: Uri, body: Bytes) -> Response {
    record(&seen, &headers, &uri, None, &body);
    json_response(
        StatusCode::OK,
        "application/json",
        json!({"results": [
            {"kind": "MeterDefinition", "name": "requests", "action": "created"},
            {"kind": "MonitoredResourceType", "name": "httproute", "action": "unchanged"}
        ]}),
    )
}

fn manifest(name: &str) -> Value {
    json!({
        "apiVersion": "billing.miloapis.com/v1alpha1", "kind": "MeterDefinition",
        "metadata": {"name": name},
        "spec": {"meterName": "gw/requests", "measurement": {"aggregation": "SUM"}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}
    })
}

async fn resource(
    State(seen): State<Shared>,
    Path((plural, name)): Path<(String, String)>,
    method: axum::http::Method,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    record(&seen, &headers, &uri, None, &[]);
    if plural != "meterdefinitions" || name != "a b" {
        return json_response(
            StatusCode::NOT_FOUND,
            "application/problem+json",
            json!({"title": "Not Found", "status": 404, "detail": format!("{plural} {name:?} not found")}),
        );
    }
    if method == axum::http::Method::DELETE {
        return StatusCode::NO_CONTENT.into_response();
    }
    json_response(StatusCode::OK, "application/json", manifest(&name))
}

async fn list(
    State(seen): State<Shared>,
    Path(plural): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    record(&seen, &headers, &uri, None, &[]);
    json_response(
        StatusCode::OK,
        "application/json",
        json!({"apiVersion": "v1", "kind": "List", "items": [manifest(&format!("{plural}-1"))]}),
    )
}

async fn events(
    State(seen): State<Shared>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    record(&seen, &headers, &uri, raw, &[]);
    json_response(
        StatusCode::OK,
        "application/json",
        json!({"items": [{"seq": 7, "ingestedAt": "2026-01-01T00:00:01Z", "event": {
            "specversion": "1.0", "id": "e1", "source": "gw", "type": "requests", "subject": "acme",
            "time": "2026-01-01T00:00:00Z", "data": {"value": 1}}}], "nextCursor": "next"}),
    )
}

async fn protected(State(seen): State<Shared>, headers: HeaderMap, uri: Uri) -> Response {
    record(&seen, &headers, &uri, None, &[]);
    json_response(
        StatusCode::UNAUTHORIZED,
        "application/problem+json",
        json!({"title": "Unauthorized", "status": 401, "detail": "missing or wrong bearer token"}),
    )
}

async fn broken() -> Response {
    (StatusCode::BAD_GATEWAY, "upstream went away").into_response()
}

/// Starts the test server; returns its base URL and what it saw.
async fn start() -> (String, Shared) {
    let seen = Shared::default();
    let app = Router::new()
        .route("/api/v1/events", post(ingest))
        .route("/api/v2/events", get(events))
        .route("/api/v1/meters/{slug}/query", get(query))
        .route("/apis/apply", post(apply))
        .route("/apis/{plural}", get(list))
        .route("/apis/{plural}/{name}", get(resource).delete(resource))
        .route("/api/v1/quarantine", get(protected))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(broken))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{address}"), seen)
}

fn event(id: &str, subject: Option<&str>) -> Value {
    let mut event = json!({"specversion": "1.0", "id": id, "source": "gw", "type": "requests"});
    if let Some(subject) = subject {
        event["subject"] = json!(subject);
    }
    event
}

#[tokio::test]
async fn sends_the_bearer_token_and_the_batch_media_type() {
    let (base, seen) = start().await;
    let client = TallyClient::new(&base, Some("s3cret-token".into())).unwrap();
    let outcome = client
        .send_events(&[event("e1", Some("acme")), event("e2", Some("acme"))])
        .await
        .unwrap();
    assert_eq!(outcome.accepted, 2);
    assert_eq!(outcome.quarantined[0].meter, "requests");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.authorization.as_deref(), Some("Bearer s3cret-token"));
    assert_eq!(
        seen.content_type.as_deref(),
        Some("application/cloudevents-batch+json")
    );
    let body: Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(body.as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn sends_no_authorization_without_a_token() {
    let (base, seen) = start().await;
    let client = TallyClient::new(&base, None).unwrap();
    client.health().await.unwrap();
    assert_eq!(seen.lock().unwrap().authorization, None);
}

#[tokio::test]
async fn problem_json_lists_every_refused_event() {
    let (base, _) = start().await;
    let client = TallyClient::new(&base, None).unwrap();
    let err = client
        .send_events(&[
            event("e1", None),
            event("e2", Some("a")),
            event("", Some("a")),
        ])
        .await
        .unwrap_err();
    let ClientError::Api {
        status,
        title,
        detail,
        errors,
    } = &err
    else {
        panic!("expected an API error, got {err:?}");
    };
    assert_eq!(*status, 422);
    assert_eq!(title, "Events refused");
    assert_eq!(
        detail.as_deref(),
        Some("2 of 3 events are not valid CloudEvents; nothing was stored")
    );
    assert_eq!(
        errors.as_ref().and_then(Value::as_array).map(Vec::len),
        Some(2)
    );
    let message = err.to_string();
    for line in [
        "Events refused (HTTP 422): 2 of 3 events are not valid CloudEvents; nothing was stored",
        "  event 0 (id \"e1\"): subject: is required",
        "  event 0 (id \"e1\"): time: not an RFC 3339 timestamp",
        "  event 2: id: is required",
    ] {
        assert!(
            message.lines().any(|l| l == line),
            "missing {line:?} in\n{message}"
        );
    }
}

#[tokio::test]
async fn non_problem_errors_become_api_errors() {
    let (base, _) = start().await;
    let client = TallyClient::new(&base, None).unwrap();
    let err = client.ready().await.unwrap_err();
    assert_eq!(err.status(), Some(502));
    assert_eq!(
        err.to_string(),
        "Bad Gateway (HTTP 502): upstream went away"
    );
}

#[tokio::test]
async fn connection_refused_names_the_url() {
    // A port that was just free: nothing listens there any more.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let base = format!("http://{address}");
    let client = TallyClient::new(&base, Some("s3cret-token".into())).unwrap();
    let err = client.list_meters().await.unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains(&format!("{base}/api/v1/meters")),
        "{message}"
    );
    assert!(
        message.starts_with("could not reach the Tally server at "),
        "{message}"
    );
    assert!(!message.contains("s3cret-token") && !format!("{err:?}").contains("s3cret-token"));
}

#[tokio::test]
async fn debug_and_errors_never_show_the_token() {
    let (base, seen) = start().await;
    let client = TallyClient::new(&base, Some("s3cret-token".into())).unwrap();
    let debug = format!("{client:?} {client:#?}");
    assert!(!debug.contains("s3cret-token"), "{debug}");
    assert!(debug.contains("<redacted>"), "{debug}");
    let err = client
        .list_quarantine(&Default::default())
        .await
        .unwrap_err();
    assert_eq!(
        seen.lock().unwrap().authorization.as_deref(),
        Some("Bearer s3cret-token")
    );
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(!text.contains("s3cret-token"), "{text}");
    }
    assert_eq!(
        err.to_string(),
        "Unauthorized (HTTP 401): missing or wrong bearer token"
    );
}

#[tokio::test]
async fn meter_queries_encode_every_parameter_and_keep_values_exact() {
    let (base, seen) = start().await;
    let client = TallyClient::new(&base, None).unwrap();
    let params = MeterQueryParams {
        from: Some("2026-01-01T00:00:00Z".parse().unwrap()),
        to: Some("2026-01-03T00:00:00Z".parse().unwrap()),
        window_size: Some(WindowSize::Day),
        window_time_zone: Some("Europe/Berlin".into()),
        subjects: vec!["a".into(), "b c".into()],
        group_by: vec!["method".into()],
        filter_group_by: [("method".to_owned(), "GET".to_owned())].into(),
        limit: Some(5),
        cursor: None,
    };
    let response = client.query_meter("api/requests", &params).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen.query.as_deref(),
        Some(
            "from=2026-01-01T00%3A00%3A00Z&to=2026-01-03T00%3A00%3A00Z&windowSize=DAY\
             &windowTimeZone=Europe%2FBerlin&subject=a&subject=b+c&groupBy=method\
             &filterGroupBy%5Bmethod%5D=GET&limit=5"
        )
    );
    assert!(
        seen.uri
            .unwrap()
            .starts_with("/api/v1/meters/api%2Frequests/query?")
    );
    assert_eq!(response.data[0].value.to_string(), "9007199254740993");
    assert_eq!(response.data[0].subject.as_deref(), Some("api/requests"));
    assert_eq!(response.data[1].value.to_string(), "0.3");
    assert_eq!(response.data[1].group_by["method"], None);
}

#[tokio::test]
async fn resources_apply_list_get_and_delete() {
    let (base, seen) = start().await;
    let client = TallyClient::new(&base, None).unwrap();
    let yaml = "apiVersion: billing.miloapis.com/v1alpha1\nkind: MeterDefinition\n---\nkind: X\n";
    let results = client.apply(yaml).await.unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0].action, ApplyAction::Created);
    assert_eq!(results[1].action, ApplyAction::Unchanged);
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.content_type.as_deref(), Some("application/yaml"));
        assert_eq!(seen.body, yaml.as_bytes());
    }
    let items = client
        .list_resources(Kind::MonitoredResourceType, None)
        .await
        .unwrap();
    assert_eq!(items[0].metadata.name, "monitoredresourcetypes-1");
    let one = client
        .get_resource(Kind::MeterDefinition, None, "a b")
        .await
        .unwrap();
    assert_eq!(one.metadata.name, "a b");
    assert!(one.status.is_some());
    client
        .delete_resource(Kind::MeterDefinition, None, "a b")
        .await
        .unwrap();
    let err = client
        .get_resource(Kind::MeterDefinition, None, "nope")
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(404));
    assert!(err.to_string().contains("not found"), "{err}");
}

#[tokio::test]
async fn event_lists_pass_filters() {
    let (base, seen) = start().await;
    let client = TallyClient::new(&base, None).unwrap();
    let page = client
        .list_events(&EventListParams {
            event_type: Some("requests".into()),
            subject: Some("acme".into()),
            limit: Some(2),
            cursor: Some("c".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.items[0].seq, 7);
    assert_eq!(page.next_cursor.as_deref(), Some("next"));
    assert_eq!(
        seen.lock().unwrap().query.as_deref(),
        Some("type=requests&subject=acme&limit=2&cursor=c")
    );
}
