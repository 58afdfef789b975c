//! `POST /api/v1/events` and `GET /api/v1/events`.

use std::borrow::Cow;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use jiff::Timestamp;
use serde_json::Value;
use tally_ledger::{Admission, EventFilter, StoredEvent, VoidOutcome, VoidPage, VoidRequest};
use tally_model::{BatchError, CloudEvent, EventError, RawEvent, split_batch, split_events};

use crate::binary;
use crate::body;
use crate::problem::Problem;
use crate::query::Params;
use crate::{AppState, Principal};

/// Splits a request body into JSON values according to its media type
/// ([`tally_model::split_batch`]).
pub(crate) fn values(media_type: &str, body: &[u8]) -> Result<Vec<Value>, Problem> {
    split_batch(media_type, body).map_err(batch_problem)
}

/// Splits a request body into [`RawEvent`]s borrowing from it
/// ([`tally_model::split_events`]): what ingest reads, without a `Value`
/// of each event.
pub(crate) fn raw_events<'a>(
    media_type: &str,
    body: &'a [u8],
) -> Result<Vec<RawEvent<'a>>, Problem> {
    split_events(media_type, body).map_err(batch_problem)
}

fn batch_problem(e: BatchError) -> Problem {
    match e {
        BatchError::Malformed(detail) => Problem::bad_request(detail),
        BatchError::UnsupportedMediaType(detail) => {
            Problem::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, detail)
        }
    }
}

/// Ingest usage events (CloudEvents 1.0).
///
/// The request is validated whole: if any event is malformed nothing is
/// stored and the answer lists every bad event. The answer is sent only
/// after the events are durable. Duplicates (same `source` and `id`) are
/// acknowledged and counted, never stored twice. Structured mode (the event
/// or a batch in the body) and binary mode (`ce-*` headers, the body is
/// `data`) as the CloudEvents HTTP binding defines them. The answer is
/// `204`, as OpenMeter's; with `Prefer: return=representation` it is `200`
/// with what was stored (accepted, duplicates, quarantined, warnings).
/// While the ledger's backlog is full the request waits, a bounded time.
#[utoipa::path(
    post, path = "/api/v1/events", tag = "events",
    request_body(description = "One event, an array of events, or NDJSON; gzip or zstd Content-Encoding accepted. With a `ce-specversion` header and another content type, the body is one event's `data` (binary mode)",
        content((crate::schemas::Event = "application/cloudevents+json"), (Vec<crate::schemas::Event> = "application/cloudevents-batch+json"), (crate::schemas::Event = "application/json"), (String = "application/x-ndjson"))),
    params(("Prefer" = Option<String>, Header, description = "`return=representation`: answer 200 with what was stored")),
    responses(
        (status = 204, description = "Durably stored (or recognised as duplicates)"),
        (status = 200, description = "Durably stored, with `Prefer: return=representation`", body = crate::schemas::IngestOutcome),
        (status = 400, description = "Malformed request; nothing stored", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Unsupported Content-Type or Content-Encoding", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The ledger's materialisation backlog stayed full for `ingestWaitSeconds`; nothing stored, retry after `Retry-After`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn ingest(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    let limit = state.max_body_bytes;
    let admission = state.ledger.admission();
    let representation = wants_representation(&headers);
    let events = body::decoded_off_workers(headers, body, limit, move |headers, body| {
        let events = match binary::requested(headers) {
            true => vec![RawEvent::from_value(binary::event(headers, &body)?)],
            false => raw_events(&body::media_type(headers), &body)?,
        };
        parse_events(events, &admission)
    })
    .await?;
    let _permit = state.admit(events.len()).await?;
    state.wait_for_backlog().await?;
    let outcome = state.ledger.ingest(events).await?;
    Ok(if representation {
        Json(outcome).into_response()
    } else {
        StatusCode::NO_CONTENT.into_response()
    })
}

/// Whether the request asks for the stored result (`Prefer:
/// return=representation`, RFC 7240).
fn wants_representation(headers: &HeaderMap) -> bool {
    headers.get_all("prefer").iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split([',', ';'])
                .any(|p| p.trim().eq_ignore_ascii_case("return=representation"))
        })
    })
}

/// The events of a request, or the problems of every bad one: its
/// structure, and what the ledger would refuse it for (`admission`).
fn parse_events(raw: Vec<RawEvent<'_>>, admission: &Admission) -> Result<Vec<CloudEvent>, Problem> {
    let received = Timestamp::now();
    let mut events = Vec::with_capacity(raw.len());
    let mut errors = Vec::new();
    for (index, raw) in raw.into_iter().enumerate() {
        let (id, field_errors) = match raw.validate_named(received) {
            Ok(event) => {
                let refused = admission.errors(&event, received);
                if refused.is_empty() {
                    events.push(event);
                    continue;
                }
                (Some(event.id), refused)
            }
            Err((id, field_errors)) => (id.map(Cow::into_owned), field_errors),
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

/// A stored event as OpenMeter lists it (`IngestedEvent`), with Tally's
/// log position and void record.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct IngestedEvent {
    #[serde(flatten)]
    stored: StoredEvent,
    /// Tally stores an event when it takes it.
    stored_at: Timestamp,
}

impl From<StoredEvent> for IngestedEvent {
    fn from(stored: StoredEvent) -> Self {
        IngestedEvent {
            stored_at: stored.ingested_at,
            stored,
        }
    }
}

/// A page of [`IngestedEvent`]s.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct IngestedEventPage {
    items: Vec<IngestedEvent>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

/// Filters both listings share, from their plain parameters.
fn plain_filter(p: &Params, principal: &Principal) -> Result<EventFilter, Problem> {
    p.refuse(
        "customerId",
        "Tally does not serve OpenMeter customers; filter by `subject`",
    )?;
    // A project token reads its own subjects only; with several, name one.
    let mut subjects: Vec<String> = p.one("subject")?.into_iter().collect();
    principal.restrict_subjects(&mut subjects)?;
    if subjects.len() > 1 {
        return Err(Problem::bad_request(
            "this token reads several projects; choose one with `subject`",
        ));
    }
    Ok(EventFilter {
        from: p.timestamp("from")?,
        to: p.timestamp("to")?,
        event_type: p.one("type")?,
        subject: subjects.pop(),
        source: p.one("source")?,
        id: p.one("id")?,
        ingested_from: p.timestamp("ingestedAtFrom")?,
        ingested_to: p.timestamp("ingestedAtTo")?,
        limit: p.number("limit")?.unwrap_or(100),
        cursor: p.one("cursor")?,
    })
}

/// Refuses empty ranges, as a query does.
fn check_ranges(filter: &EventFilter) -> Result<(), Problem> {
    for (what, from, to) in [
        ("", filter.from, filter.to),
        ("ingestedAt", filter.ingested_from, filter.ingested_to),
    ] {
        if let (Some(from), Some(to)) = (from, to)
            && from >= to
        {
            let (f, t) = if what.is_empty() {
                ("from".to_owned(), "to".to_owned())
            } else {
                (format!("{what}From"), format!("{what}To"))
            };
            return Err(Problem::bad_request(format!(
                "`{f}` ({from}) must be before `{t}` ({to})"
            )));
        }
    }
    Ok(())
}

/// Whether the caller asks only for events that failed validation (Tally
/// stores none: a bad event is refused at ingest).
fn only_errors(p: &Params) -> Result<bool, Problem> {
    Ok(p.parsed::<bool>("hasError", "true or false")?
        .unwrap_or(false))
}

/// List stored events, newest first (OpenMeter's v1 listing: an array).
#[utoipa::path(
    get, path = "/api/v1/events", tag = "events",
    params(
        ("from" = Option<String>, Query, description = "Event time, inclusive (RFC 3339)"),
        ("to" = Option<String>, Query, description = "Event time, exclusive (RFC 3339)"),
        ("ingestedAtFrom" = Option<String>, Query, description = "Time stored, inclusive (RFC 3339)"),
        ("ingestedAtTo" = Option<String>, Query, description = "Time stored, exclusive (RFC 3339)"),
        ("type" = Option<String>, Query, description = "Event type"),
        ("subject" = Option<String>, Query, description = "Subject"),
        ("source" = Option<String>, Query, description = "Source"),
        ("id" = Option<String>, Query, description = "Event id"),
        ("hasError" = Option<bool>, Query, description = "Only events that failed validation (Tally stores none)"),
        ("clientId" = Option<String>, Query, description = "Accepted and ignored"),
        ("limit" = Option<usize>, Query, description = "Most events, default 100, at most 10000"),
    ),
    responses(
        (status = 200, description = "Events, newest first", body = Vec<crate::schemas::IngestedEvent>),
        (status = 400, description = "Bad parameters", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    RawQuery(query): RawQuery,
) -> Result<Response, Problem> {
    let p = Params::parse(query.as_deref())?;
    p.only(&[
        "from",
        "to",
        "ingestedAtFrom",
        "ingestedAtTo",
        "type",
        "subject",
        "source",
        "id",
        "hasError",
        "clientId",
        "customerId",
        "limit",
    ])?;
    let filter = plain_filter(&p, &principal)?;
    check_ranges(&filter)?;
    if only_errors(&p)? {
        return Ok(Json(Vec::<IngestedEvent>::new()).into_response());
    }
    let page = state.ledger.list_events(filter).await?;
    let items: Vec<IngestedEvent> = page.items.into_iter().map(IngestedEvent::from).collect();
    Ok(Json(items).into_response())
}

/// List stored events, newest first, a page at a time (OpenMeter's v2).
///
/// `filter[FIELD][OP]=VALUE` takes `id`, `source`, `subject`, `type` with
/// `eq`, and `time`, `ingestedAt` with `gte`, `gt`, `lt`, `lte`; any other
/// filter is refused. Tally's plain parameters work too.
#[utoipa::path(
    get, path = "/api/v2/events", tag = "events",
    params(
        ("filter[field][op]" = Option<String>, Query, description = "`id`, `source`, `subject`, `type` with `eq`; `time`, `ingestedAt` with `gte`, `gt`, `lt`, `lte`"),
        ("from" = Option<String>, Query, description = "Event time, inclusive (RFC 3339)"),
        ("to" = Option<String>, Query, description = "Event time, exclusive (RFC 3339)"),
        ("ingestedAtFrom" = Option<String>, Query, description = "Time stored, inclusive"),
        ("ingestedAtTo" = Option<String>, Query, description = "Time stored, exclusive"),
        ("type" = Option<String>, Query, description = "Event type"),
        ("subject" = Option<String>, Query, description = "Subject"),
        ("source" = Option<String>, Query, description = "Source"),
        ("id" = Option<String>, Query, description = "Event id"),
        ("clientId" = Option<String>, Query, description = "Accepted and ignored"),
        ("limit" = Option<usize>, Query, description = "Page size, default 100, at most 10000"),
        ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of events", body = crate::schemas::IngestedEventPage),
        (status = 400, description = "Bad parameters", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_v2(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    RawQuery(query): RawQuery,
) -> Result<Json<serde_json::Value>, Problem> {
    let p = Params::parse(query.as_deref())?;
    p.only(&[
        "filter",
        "from",
        "to",
        "ingestedAtFrom",
        "ingestedAtTo",
        "type",
        "subject",
        "source",
        "id",
        "clientId",
        "customerId",
        "limit",
        "cursor",
    ])?;
    let mut filter = plain_filter(&p, &principal)?;
    for (name, value) in p.bracketed("filter")? {
        apply_v2_filter(&mut filter, &name, value, &principal)?;
    }
    // The filter as one JSON object, as OpenMeter documents it:
    // `filter={"subject":{"eq":"acme"},"time":{"gte":"..."}}`.
    if let Some(json) = p.one("filter")? {
        for (name, value) in json_filter(&json)? {
            apply_v2_filter(&mut filter, &name, value, &principal)?;
        }
    }
    check_ranges(&filter)?;
    let page = state.ledger.list_events(filter).await?;
    let page = IngestedEventPage {
        items: page.items.into_iter().map(IngestedEvent::from).collect(),
        next_cursor: page.next_cursor,
    };
    serde_json::to_value(page)
        .map(Json)
        .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// The (`field][op`, value) pairs of a JSON filter `{field: {op: value}}`.
fn json_filter(json: &str) -> Result<Vec<(String, String)>, Problem> {
    let bad =
        |why: &str| Problem::bad_request(format!("filter is not {{field: {{op: value}}}}: {why}"));
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| bad(&e.to_string()))?;
    let fields = value.as_object().ok_or_else(|| bad("not an object"))?;
    let mut out = Vec::new();
    for (field, ops) in fields {
        let ops = ops
            .as_object()
            .ok_or_else(|| bad(&format!("{field} is not an object")))?;
        for (op, value) in ops {
            let value = value.as_str().ok_or_else(|| {
                Problem::bad_request(format!(
                    "filter {field}.{op} is not supported: Tally compares with one string"
                ))
            })?;
            out.push((format!("{field}][{op}"), value.to_owned()));
        }
    }
    Ok(out)
}

/// Applies `filter[field][op]=value` (`name` is `field][op`).
fn apply_v2_filter(
    filter: &mut EventFilter,
    name: &str,
    value: String,
    principal: &Principal,
) -> Result<(), Problem> {
    let unsupported = || {
        Problem::bad_request(format!(
            "filter[{name}] is not supported; Tally filters id, source, subject and type with eq, and time and ingestedAt with gte, gt, lt and lte"
        ))
    };
    let (field, op) = name.split_once("][").ok_or_else(unsupported)?;
    let at = |value: &str| {
        value.parse::<Timestamp>().map_err(|e| {
            Problem::bad_request(format!("filter[{name}]={value:?} is not RFC 3339: {e}"))
        })
    };
    let just_after = |t: Timestamp| {
        t.checked_add(jiff::SignedDuration::from_nanos(1))
            .unwrap_or(t)
    };
    match (field, op) {
        ("id", "eq") => filter.id = Some(value),
        ("source", "eq") => filter.source = Some(value),
        ("type", "eq") => filter.event_type = Some(value),
        ("subject", "eq") => {
            let mut subjects = vec![value];
            principal.restrict_subjects(&mut subjects)?;
            filter.subject = subjects.pop();
        }
        ("time", "gte") => filter.from = Some(at(&value)?),
        ("time", "gt") => filter.from = Some(just_after(at(&value)?)),
        ("time", "lt") => filter.to = Some(at(&value)?),
        ("time", "lte") => filter.to = Some(just_after(at(&value)?)),
        ("ingestedAt", "gte") => filter.ingested_from = Some(at(&value)?),
        ("ingestedAt", "gt") => filter.ingested_from = Some(just_after(at(&value)?)),
        ("ingestedAt", "lt") => filter.ingested_to = Some(at(&value)?),
        ("ingestedAt", "lte") => filter.ingested_to = Some(just_after(at(&value)?)),
        _ => return Err(unsupported()),
    }
    Ok(())
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
        (status = 200, description = "Voided (or voided before)", body = crate::schemas::VoidOutcome),
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
    responses((status = 200, description = "A page of void records", body = crate::schemas::VoidPage))
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
        let raw = values.into_iter().map(RawEvent::from_value).collect();
        let problem = parse_events(raw, &admission).unwrap_err();
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
