//! `POST /api/v1/events` and `GET /api/v1/events`.

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::{Extension, Json};
use bytes::Bytes;
use jiff::Timestamp;
use serde_json::Value;
use tally_ledger::{
    Admission, EventFilter, EventPage, IngestOutcome, VoidOutcome, VoidPage, VoidRequest,
};
use tally_model::{BatchError, CloudEvent, EventError, parse_event, split_batch};

use crate::body;
use crate::problem::Problem;
use crate::query::Params;
use crate::{AppState, Principal};

/// Splits a request body into JSON values according to its media type
/// ([`tally_model::split_batch`]).
pub(crate) fn values(media_type: &str, body: &[u8]) -> Result<Vec<Value>, Problem> {
    split_batch(media_type, body).map_err(|e| match e {
        BatchError::Malformed(detail) => Problem::bad_request(detail),
        BatchError::UnsupportedMediaType(detail) => {
            Problem::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, detail)
        }
    })
}

/// Ingest usage events (CloudEvents 1.0).
///
/// The request is validated whole: if any event is malformed nothing is
/// stored and the answer lists every bad event. The answer is sent only
/// after the events are durable. Duplicates (same `source` and `id`) are
/// acknowledged and counted, never stored twice.
#[utoipa::path(
    post, path = "/api/v1/events", tag = "events",
    request_body(description = "One event, an array of events, or NDJSON; gzip or zstd Content-Encoding accepted",
        content((Object = "application/cloudevents+json"), (Vec<Object> = "application/cloudevents-batch+json"), (Object = "application/json"), (String = "application/x-ndjson"))),
    responses(
        (status = 200, description = "Durably stored (or recognised as duplicates)", body = Object),
        (status = 400, description = "Malformed request; nothing stored", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Unsupported Content-Type or Content-Encoding", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn ingest(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<IngestOutcome>, Problem> {
    let limit = state.max_body_bytes;
    let admission = state.ledger.admission();
    let events = body::decoded_off_workers(headers, body, limit, move |headers, body| {
        parse_events(values(&body::media_type(headers), &body)?, &admission)
    })
    .await?;
    let _permit = state.admit(events.len()).await?;
    let outcome = state.ledger.ingest(events).await?;
    Ok(Json(outcome))
}

/// The events of a request, or the problems of every bad one: its
/// structure, and what the ledger would refuse it for (`admission`).
fn parse_events(values: Vec<Value>, admission: &Admission) -> Result<Vec<CloudEvent>, Problem> {
    let received = Timestamp::now();
    let mut events = Vec::with_capacity(values.len());
    let mut errors = Vec::new();
    for (index, value) in values.into_iter().enumerate() {
        let id = value.get("id").and_then(Value::as_str).map(str::to_owned);
        let field_errors = match parse_event(value, received) {
            Ok(event) => {
                let refused = admission.errors(&event, received);
                if refused.is_empty() {
                    events.push(event);
                    continue;
                }
                refused
            }
            Err(field_errors) => field_errors,
        };
        errors.push(EventError {
            index,
            id,
            errors: field_errors,
        });
    }
    if !errors.is_empty() {
        return Err(tally_ledger::LedgerError::Rejected(errors).into());
    }
    Ok(events)
}

/// List stored events, newest first.
#[utoipa::path(
    get, path = "/api/v1/events", tag = "events",
    params(
        ("from" = Option<String>, Query, description = "Event time, inclusive (RFC 3339)"),
        ("to" = Option<String>, Query, description = "Event time, exclusive (RFC 3339)"),
        ("type" = Option<String>, Query, description = "Event type"),
        ("subject" = Option<String>, Query, description = "Subject"),
        ("source" = Option<String>, Query, description = "Source"),
        ("id" = Option<String>, Query, description = "Event id"),
        ("limit" = Option<usize>, Query, description = "Page size, default 100, at most 10000"),
        ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of events", body = Object),
        (status = 400, description = "Bad parameters", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    RawQuery(query): RawQuery,
) -> Result<Json<EventPage>, Problem> {
    let p = Params::parse(query.as_deref())?;
    p.only(&[
        "from", "to", "type", "subject", "source", "id", "limit", "cursor",
    ])?;
    // A project token reads its own subjects only; with several, name one.
    let mut subjects: Vec<String> = p.one("subject")?.into_iter().collect();
    principal.restrict_subjects(&mut subjects)?;
    if subjects.len() > 1 {
        return Err(Problem::bad_request(
            "this token reads several projects; choose one with `subject`",
        ));
    }
    let (from, to) = (p.timestamp("from")?, p.timestamp("to")?);
    if let (Some(from), Some(to)) = (from, to)
        && from >= to
    {
        return Err(Problem::bad_request(format!(
            "`from` ({from}) must be before `to` ({to})"
        )));
    }
    let filter = EventFilter {
        from,
        to,
        event_type: p.one("type")?,
        subject: subjects.pop(),
        source: p.one("source")?,
        id: p.one("id")?,
        limit: p.number("limit")?.unwrap_or(100),
        cursor: p.one("cursor")?,
        ..EventFilter::default()
    };
    Ok(Json(state.ledger.list_events(filter).await?))
}

/// What `POST /api/v1/events/void` takes.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VoidBody {
    /// The event's `source`.
    source: String,
    /// The event's `id`.
    id: String,
    /// Why it is voided; kept in the audit trail.
    reason: String,
}

/// Void a stored event (a correction).
///
/// The event stops counting in every meter, durably, before the answer; it
/// stays in the log, marked voided, and its (source, id) stays taken, so a
/// re-send is a duplicate. Send a corrected event under a new id. Voiding
/// twice answers the first void record with `alreadyVoided: true`.
#[utoipa::path(
    post, path = "/api/v1/events/void", tag = "events",
    request_body(content = VoidBody, content_type = "application/json"),
    responses(
        (status = 200, description = "Voided (or voided before)", body = Object),
        (status = 400, description = "Bad body", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No stored event has this source and id", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn void(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Bytes,
) -> Result<Json<VoidOutcome>, Problem> {
    let body: VoidBody = serde_json::from_slice(&body)
        .map_err(|e| Problem::bad_request(format!("expected {{source, id, reason}}: {e}")))?;
    if body.reason.trim().is_empty() {
        return Err(Problem::bad_request(
            "give a reason; it is kept in the audit trail",
        ));
    }
    let request = VoidRequest {
        source: body.source,
        id: body.id,
        reason: body.reason,
        voided_by: principal.name,
    };
    Ok(Json(state.ledger.void(request).await?))
}

/// The audit trail of voided events, newest first.
#[utoipa::path(
    get, path = "/api/v1/events/voids", tag = "events",
    params(
        ("limit" = Option<usize>, Query, description = "Page size, default 100"),
        ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page"),
    ),
    responses((status = 200, description = "A page of void records", body = Object))
)]
pub async fn voids(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<VoidPage>, Problem> {
    let p = Params::parse(query.as_deref())?;
    p.only(&["limit", "cursor"])?;
    let limit = p.number("limit")?.unwrap_or(100);
    Ok(Json(
        state.ledger.list_voids(limit, p.one("cursor")?).await?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_bodies_by_media_type() {
        assert_eq!(values("application/json", b"{\"a\":1}").unwrap().len(), 1);
        assert_eq!(values("application/json", b"[{},{}]").unwrap().len(), 2);
        assert_eq!(
            values("application/x-ndjson", b"{}\n\n{}\n").unwrap().len(),
            2
        );
        assert!(values("application/cloudevents+json", b"[]").is_err());
        assert!(values("application/cloudevents-batch+json", b"{}").is_err());
        assert_eq!(values("text/plain", b"{}").unwrap_err().status, 415);
        let err = values("application/x-ndjson", b"{}\n{oops\n").unwrap_err();
        assert!(err.detail.contains("line 2"), "{}", err.detail);
    }

    #[test]
    fn lists_structural_and_admission_problems_of_every_event_at_once() {
        let admission = Admission {
            max_lateness: jiff::SignedDuration::from_hours(24),
            max_future: jiff::SignedDuration::from_hours(24),
        };
        let event = |id: &str, time: &str| {
            serde_json::json!({"specversion": "1.0", "id": id, "source": "s", "type": "t",
                               "subject": "c", "time": time})
        };
        let now = Timestamp::now();
        let values = vec![
            serde_json::json!({"id": "broken"}),
            event("late", "2000-01-01T00:00:00Z"),
            event("fine", &now.to_string()),
            event("future", "2999-01-01T00:00:00Z"),
        ];
        let problem = parse_events(values, &admission).unwrap_err();
        let errors = problem.errors.expect("every bad event listed");
        let listed: Vec<(u64, &str)> = errors
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["index"].as_u64().unwrap(),
                    e["errors"][0]["code"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            listed,
            [
                (0, "MISSING_REQUIRED_FIELD"),
                (1, "TOO_LATE"),
                (3, "TIME_IN_FUTURE")
            ]
        );
    }
}
