//! The connection lifecycle receiver: `POST /v1/connections`, CloudEvents
//! 1.0 of the types [`CONNECTION_OPENED`] and [`CONNECTION_CLOSED`] from
//! the gateway controller (shapes in [`crate::lifecycle`]).
//!
//! A request is one event (`application/cloudevents+json`), an array
//! (`application/cloudevents-batch+json`), either (`application/json`) or
//! one event per line (`application/x-ndjson`), optionally gzip'd — as the
//! ledger takes them. It is validated whole: one bad event answers `400
//! application/problem+json` listing every bad event (`index`, `id`, and
//! each `field`, `code`, `reason`) and nothing is stored. Otherwise the
//! events are appended to the spool as [`LifecycleRecord`] lines and
//! fsync'd, and only then answered `202` with `{"accepted": n}`; the
//! lifecycle input tails the spool and applies each (`source`, `id`) once,
//! so a retried request is harmless. While the input's outbox or unread
//! spool is over its limit the answer is `503` with `Retry-After` and
//! nothing is stored.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};
use tally_model::{BatchError, EventError, split_batch};

use super::HttpState;
use super::clock::Clock;
use super::spool::{MAX_BODY_BYTES, Spool, Unavailable, decode_body, media_type};
use crate::lifecycle::{CONNECTION_CLOSED, CONNECTION_OPENED, LifecycleRecord};

/// What the handler needs: the spool, the clock, the horizon.
pub(crate) struct Receiver {
    pub(crate) spool: Arc<Spool>,
    pub(crate) clock: Clock,
    pub(crate) dedupe_horizon_millis: i64,
}

/// An `application/problem+json` (RFC 9457) answer.
pub(crate) fn problem(
    status: StatusCode,
    detail: impl Into<String>,
    errors: Option<Value>,
) -> Response {
    let mut body = json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail.into(),
    });
    if let (Some(errors), Some(object)) = (errors, body.as_object_mut()) {
        object.insert("errors".to_owned(), errors);
    }
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

/// The answer to a request whose body did not arrive whole within
/// `timeout` (`tally_http`'s body-read timeout), on every route of the
/// agent's listener.
pub(crate) fn body_timed_out(timeout: std::time::Duration) -> Response {
    problem(
        StatusCode::REQUEST_TIMEOUT,
        format!(
            "the request body did not arrive whole within {timeout:?} of its headers (http.bodyReadTimeout); nothing of it was stored"
        ),
        None,
    )
}

/// `POST /v1/connections`.
pub(crate) async fn receive(
    State(state): State<HttpState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(receiver) = state.connections.clone() else {
        return problem(
            StatusCode::NOT_FOUND,
            "the connection lifecycle receiver is off; start tally collect with --connections",
            None,
        );
    };
    let body = match decode_body(&headers, body, MAX_BODY_BYTES) {
        Ok(body) => body,
        Err(detail) => return problem(StatusCode::BAD_REQUEST, detail, None),
    };
    let values = match split_batch(&media_type(&headers), &body) {
        Ok(values) => values,
        Err(BatchError::Malformed(detail)) => {
            return problem(StatusCode::BAD_REQUEST, detail, None);
        }
        Err(BatchError::UnsupportedMediaType(detail)) => {
            return problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, detail, None);
        }
    };
    let now = match receiver.clock.now_millis() {
        Ok(now) => now,
        Err(error) => {
            tracing::error!(error = %error, "the clock cannot be read");
            return unavailable(format!("the agent's clock cannot be read: {error}"));
        }
    };
    let records = match validate(values, now, receiver.dedupe_horizon_millis) {
        Ok(records) => records,
        Err(errors) => {
            let detail = format!(
                "{} event(s) are invalid; nothing was stored (event types: {CONNECTION_OPENED}, {CONNECTION_CLOSED})",
                errors.len()
            );
            let errors = serde_json::to_value(&errors).unwrap_or_default();
            return problem(StatusCode::BAD_REQUEST, detail, Some(errors));
        }
    };
    let mut text = Vec::new();
    for record in &records {
        if let Err(e) = serde_json::to_writer(&mut text, record) {
            tracing::error!(error = %e, "encoding a lifecycle record");
            return problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding a lifecycle record: {e}"),
                None,
            );
        }
        text.push(b'\n');
    }
    match receiver.spool.store(text).await {
        Ok(()) => (
            StatusCode::ACCEPTED,
            [(header::CONTENT_TYPE, "application/json")],
            json!({ "accepted": records.len() }).to_string(),
        )
            .into_response(),
        Err(Unavailable(reason)) => unavailable(reason),
    }
}

/// Every event as a record, or every problem of every bad event.
fn validate(
    values: Vec<Value>,
    now_millis: i64,
    horizon_millis: i64,
) -> Result<Vec<LifecycleRecord>, Vec<EventError>> {
    let mut records = Vec::with_capacity(values.len());
    let mut errors = Vec::new();
    for (index, value) in values.into_iter().enumerate() {
        let id = value.get("id").and_then(Value::as_str).map(str::to_owned);
        let checked = LifecycleRecord::from_value(value).and_then(|record| {
            record
                .check_time(now_millis, horizon_millis)
                .map_err(|error| vec![error])?;
            Ok(record)
        });
        match checked {
            Ok(record) => records.push(record),
            Err(field_errors) => errors.push(EventError {
                index,
                id,
                errors: field_errors,
            }),
        }
    }
    if errors.is_empty() {
        Ok(records)
    } else {
        Err(errors)
    }
}

pub(crate) fn unavailable(reason: String) -> Response {
    let mut response = problem(StatusCode::SERVICE_UNAVAILABLE, reason, None);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::spool::Limits;
    use tally_delivery::Registry;

    const NOW: i64 = 1_714_564_800_000; // 2024-05-01T12:00:00Z

    fn state(dir: &std::path::Path, max_outbox_events: u64) -> (HttpState, Arc<Spool>) {
        let limits = Limits {
            max_outbox_events,
            max_unread_bytes: 1 << 20,
        };
        let spool = Arc::new(Spool::open("test", dir, "connections.log", limits).unwrap());
        let clock_file = dir.join("now");
        std::fs::write(&clock_file, NOW.to_string()).unwrap();
        let receiver = Receiver {
            spool: spool.clone(),
            clock: Clock::File(clock_file),
            dedupe_horizon_millis: 3_600_000,
        };
        let state = HttpState {
            registry: Registry::new(),
            spool: None,
            connections: Some(Arc::new(receiver)),
            instances: None,
            http_stats: tally_http::ConnectionStats::new(),
        };
        (state, spool)
    }

    fn opened(id: &str, time: &str) -> Value {
        json!({"specversion": "1.0", "id": id, "source": "ctrl", "type": CONNECTION_OPENED,
               "subject": "projects/shop", "time": time,
               "data": {"connection_id": "c1", "route_name": "httproute/shop/chat/rule/0"}})
    }

    async fn post(
        state: &HttpState,
        content_type: &str,
        body: Vec<u8>,
    ) -> (StatusCode, HeaderMap, Value) {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_str(content_type).unwrap(),
        );
        let response = receive(State(state.clone()), headers, Bytes::from(body)).await;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, headers, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn a_request_with_a_bad_event_stores_nothing_and_lists_every_problem() {
        let dir = tempfile::tempdir().unwrap();
        let (state, spool) = state(dir.path(), 100);
        let mut too_old = opened("e3", "2024-05-01T10:59:59.999Z");
        too_old["data"]["connection_id"] = json!(7);
        let batch = json!([
            opened("e1", "2024-05-01T11:59:00Z"),
            {"specversion": "1.0", "id": "e2", "source": "ctrl", "type": CONNECTION_CLOSED,
             "subject": "s", "data": {"connection_id": ""}},
            too_old,
        ]);
        let (status, headers, answer) = post(
            &state,
            "application/cloudevents-batch+json",
            serde_json::to_vec(&batch).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
        assert_eq!(answer["status"], 400);
        let errors = answer["errors"].as_array().unwrap();
        // Every problem of every bad event: index, id, field, code.
        let summary: Vec<String> = errors
            .iter()
            .flat_map(|e| {
                e["errors"].as_array().unwrap().iter().map(move |f| {
                    format!("{} {} {} {}", e["index"], e["id"], f["field"], f["code"])
                })
            })
            .collect();
        assert_eq!(
            summary,
            [
                r#"1 "e2" "time" "MISSING_REQUIRED_FIELD""#,
                r#"1 "e2" "data.connection_id" "MISSING_REQUIRED_FIELD""#,
                r#"2 "e3" "time" "TOO_LATE""#,
            ]
        );
        assert!(errors.iter().all(|e| e["errors"][0]["reason"].is_string()));
        assert_eq!(std::fs::read(spool.path()).unwrap(), b"", "nothing stored");
    }

    #[tokio::test]
    async fn valid_events_are_spooled_in_every_media_type() {
        let dir = tempfile::tempdir().unwrap();
        let (state, spool) = state(dir.path(), 100);
        let one = serde_json::to_vec(&opened("e1", "2024-05-01T11:59:00Z")).unwrap();
        let (status, _, answer) = post(&state, "application/cloudevents+json", one.clone()).await;
        assert_eq!(
            (status, answer),
            (StatusCode::ACCEPTED, json!({"accepted": 1}))
        );
        let (status, _, _) = post(&state, "application/json; charset=utf-8", one.clone()).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        let mut lines = one.clone();
        lines.push(b'\n');
        lines
            .extend_from_slice(&serde_json::to_vec(&opened("e2", "2024-05-01T11:59:01Z")).unwrap());
        let (status, _, answer) = post(&state, "application/x-ndjson", lines).await;
        assert_eq!(
            (status, answer),
            (StatusCode::ACCEPTED, json!({"accepted": 2}))
        );
        let (status, _, answer) = post(&state, "text/plain", one.clone()).await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{answer}");
        let (status, _, _) = post(&state, "application/cloudevents+json", b"[{}]".to_vec()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let spooled = std::fs::read_to_string(spool.path()).unwrap();
        let records: Vec<LifecycleRecord> = spooled
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(records.len(), 4);
        assert_eq!(records[3].id, "e2");
        assert_eq!(records[0].at_millis, NOW - 60_000);
    }

    #[tokio::test]
    async fn a_full_outbox_answers_503_and_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (state, spool) = state(dir.path(), 0);
        // The input reported one event in its outbox; the limit is 0.
        spool.set_outbox_depth(1);
        let one = serde_json::to_vec(&opened("e1", "2024-05-01T11:59:00Z")).unwrap();
        let (status, headers, answer) = post(&state, "application/cloudevents+json", one).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
        assert_eq!(headers[header::RETRY_AFTER], "1");
        assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
        assert_eq!(std::fs::read(spool.path()).unwrap(), b"");
    }
}
