//! The platform's ingestion-gateway contract: `POST /v1/usage/events` and
//! `POST /v1/usage/events:batchIngest`.
//!
//! Unlike the OpenMeter API, a request is not all-or-nothing: the
//! structurally valid events are stored and the invalid ones are listed in a
//! `207` answer, because the agents that speak this contract (Vector's http
//! sink, the emission SDK) retry whole batches and must not loop on one bad
//! event. Under overload (the server's ingest budget, or the ledger's
//! materialisation backlog, full) the answer is `429` with `Retry-After`,
//! and nothing of that request is stored ([`crate::backpressure`]).

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use jiff::Timestamp;
use serde::Serialize;
use serde_json::Value;
use tally_ledger::{IngestOutcome, LedgerError, QuarantineNotice};
use tally_model::{CloudEvent, FieldError, RawEvent, error_code, field_error};

use crate::AppState;
use crate::backpressure;
use crate::body;
use crate::problem::Problem;

/// One event refused by the platform contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Rejected {
    /// Position in the request.
    pub index: usize,
    /// The event's `id`, when it had a string one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `INVALID_ULID`, `MISSING_REQUIRED_FIELD`, `INVALID_VALUE_TYPE`,
    /// `INVALID_DATACONTENTTYPE`, `INVALID_VALUE`, `VALUE_TOO_LONG`,
    /// `TOO_LATE` or `TIME_IN_FUTURE`: the code of the first problem found.
    pub reason: String,
    /// Every problem of the event, as `field: reason`.
    pub detail: String,
}

/// The answer of the platform contract.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageAnswer {
    /// Events newly stored.
    pub accepted: u64,
    /// Events stored before (same source and id); acknowledged, not stored again.
    pub duplicates: u64,
    /// Stored events a meter cannot measure yet (quarantined, not lost).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<Object>)]
    pub quarantined: Vec<QuarantineNotice>,
    /// Things the sender should know (e.g. a Deprecated meter).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Events refused; present only on `207`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<Rejected>,
}

/// Ingest one platform usage event.
///
/// Same rules as the batch form; the body is one CloudEvent, or, in the
/// CloudEvents binary mode (`ce-*` headers), its `data`.
#[utoipa::path(
    post, path = "/v1/usage/events", tag = "events",
    request_body(description = "One platform usage event (CloudEvents 1.0, `id` a ULID, `data.value` an int64 as a string, or an exact decimal string with at most 9 fractional digits)",
        content((Object = "application/json"), (Object = "application/cloudevents+json"))),
    responses(
        (status = 200, description = "Stored durably (or recognised as a duplicate)", body = UsageAnswer),
        (status = 207, description = "The event was refused; `rejected` says why", body = UsageAnswer),
        (status = 429, description = "Overloaded; retry after `Retry-After` seconds. Nothing was stored", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn ingest_one(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    let limit = state.max_body_bytes;
    let value: Value = body::decoded_off_workers(headers, body, limit, |headers, body| {
        if crate::binary::requested(headers) {
            return crate::binary::event(headers, &body);
        }
        serde_json::from_slice(&body)
            .map_err(|e| Problem::bad_request(format!("the body is not valid JSON: {e}")))
    })
    .await?;
    if !value.is_object() {
        return Err(Problem::bad_request(
            "POST /v1/usage/events takes one event object; send arrays to /v1/usage/events:batchIngest",
        ));
    }
    ingest(&state, vec![RawEvent::from_value(value)]).await
}

/// Ingest a batch of platform usage events.
///
/// Valid events are stored durably before the answer; invalid ones are
/// listed in a `207` answer and not stored. The body is a JSON array,
/// NDJSON, or one object.
#[utoipa::path(
    post, path = "/v1/usage/events:batchIngest", tag = "events",
    request_body(description = "Platform usage events: a JSON array or NDJSON; gzip or zstd Content-Encoding accepted",
        content((Vec<Object> = "application/json"), (Vec<Object> = "application/cloudevents-batch+json"), (String = "application/x-ndjson"))),
    responses(
        (status = 200, description = "Every event stored durably (or recognised as a duplicate)", body = UsageAnswer),
        (status = 207, description = "Some events were refused and are listed in `rejected`; the others were stored", body = UsageAnswer),
        (status = 429, description = "Overloaded; retry after `Retry-After` seconds. Nothing was stored", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn ingest_batch(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    let limit = state.max_body_bytes;
    // Read and validated off the async workers: the events borrow from
    // the body, which lives only there.
    let (valid, rejected) = body::decoded_off_workers(headers, body, limit, |headers, body| {
        let media_type = body::media_type(headers);
        let media_type = if media_type.is_empty() {
            "application/json"
        } else {
            media_type.as_str()
        };
        Ok(validate(crate::events::raw_events(media_type, &body)?))
    })
    .await?;
    store(&state, valid, rejected).await
}

/// (index in the request, event) of the events to store.
type Valid = Vec<(usize, CloudEvent)>;

/// The events to store, and those refused.
fn validate(raw: Vec<RawEvent<'_>>) -> (Valid, Vec<Rejected>) {
    let received = Timestamp::now();
    let mut rejected = Vec::new();
    let mut valid = Vec::with_capacity(raw.len());
    for (index, raw) in raw.into_iter().enumerate() {
        let mut errors = platform_errors(&raw);
        match raw.validate_named(received) {
            Ok(event) if errors.is_empty() => valid.push((index, event)),
            Ok(event) => rejected.push(rejection(index, Some(event.id), &errors)),
            Err((id, mut structural)) => {
                structural.append(&mut errors);
                rejected.push(rejection(index, id.map(Into::into), &structural));
            }
        }
    }
    (valid, rejected)
}

async fn ingest(state: &AppState, raw: Vec<RawEvent<'_>>) -> Result<Response, Problem> {
    let (valid, rejected) = validate(raw);
    store(state, valid, rejected).await
}

/// Stores the valid events and answers for the whole request.
async fn store(
    state: &AppState,
    mut valid: Valid,
    mut rejected: Vec<Rejected>,
) -> Result<Response, Problem> {
    // A request with nothing to store needs no room in the ledger; one that
    // has is refused whole rather than queued (see `backpressure`).
    let _permit = if valid.is_empty() {
        None
    } else {
        state.refuse_if_backlogged()?;
        let permit = state.try_admit(valid.len()).ok_or_else(|| {
            backpressure::overloaded("the server's ingest budget is full (maxPendingEvents)")
        })?;
        Some(permit)
    };

    let mut answer = UsageAnswer::default();
    while !valid.is_empty() {
        let events = valid.iter().map(|(_, e)| e.clone()).collect();
        match state.ledger.ingest(events).await {
            Ok(outcome) => {
                record(&mut answer, outcome, &valid);
                break;
            }
            // Events older than the allowed lateness: refuse those, store the rest.
            Err(LedgerError::Rejected(late)) if !late.is_empty() => {
                let mut late_positions: Vec<usize> = late.iter().map(|e| e.index).collect();
                late_positions.sort_unstable();
                late_positions.dedup();
                for error in &late {
                    if let Some((index, event)) = valid.get(error.index) {
                        rejected.push(rejection(*index, Some(event.id.clone()), &error.errors));
                    }
                }
                let before = valid.len();
                for position in late_positions.into_iter().rev() {
                    if position < valid.len() {
                        valid.remove(position);
                    }
                }
                if valid.len() == before {
                    return Err(LedgerError::Rejected(late).into());
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    rejected.sort_by_key(|r| r.index);
    let status = if rejected.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::MULTI_STATUS
    };
    answer.rejected = rejected;
    Ok((status, Json(answer)).into_response())
}

/// Folds an ingest outcome into the answer, mapping positions back to the request.
fn record(answer: &mut UsageAnswer, outcome: IngestOutcome, stored: &[(usize, CloudEvent)]) {
    answer.accepted += outcome.accepted;
    answer.duplicates += outcome.duplicates;
    for warning in outcome.warnings {
        if !answer.warnings.contains(&warning) {
            answer.warnings.push(warning);
        }
    }
    answer
        .quarantined
        .extend(outcome.quarantined.into_iter().map(|mut notice| {
            if let Some((index, _)) = stored.get(notice.index) {
                notice.index = *index;
            }
            notice
        }));
}

fn rejection(index: usize, id: Option<String>, errors: &[FieldError]) -> Rejected {
    Rejected {
        index,
        id,
        reason: errors
            .first()
            .map_or_else(|| error_code::INVALID_VALUE.to_owned(), |e| e.code.clone()),
        detail: errors
            .iter()
            .map(|e| {
                if e.field.is_empty() {
                    e.reason.clone()
                } else {
                    format!("{}: {}", e.field, e.reason)
                }
            })
            .collect::<Vec<_>>()
            .join("; "),
    }
}

/// The checks the platform contract adds to CloudEvents: `id` is a ULID and
/// `data.value` is an int64 (as a string, or a JSON integer), or — Tally's
/// extension, for amounts finer than the unit such as the edge agent's
/// connection seconds — a decimal string of an int64 and at most
/// [`MAX_FRACTION_DIGITS`] fractional digits, summed exactly.
fn platform_errors(event: &RawEvent<'_>) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if let Some(id) = event.id()
        && !id.is_empty()
        && ulid::Ulid::from_string(id).is_err()
    {
        errors.push(field_error(
            "id",
            error_code::INVALID_ULID,
            format!("{id:?} is not a ULID (26 characters of Crockford base32)"),
        ));
    }
    let Some(data) = event.data().filter(|d| d.is_object()) else {
        // A missing or non-object `data` is reported by `validate` or below.
        if event.data().is_none_or(Value::is_null) {
            errors.push(field_error(
                "data",
                error_code::MISSING_REQUIRED_FIELD,
                "is required: {\"value\": \"<int64>\", ...}",
            ));
        }
        return errors;
    };
    match data.get("value") {
        None | Some(Value::Null) => errors.push(field_error(
            "data.value",
            error_code::MISSING_REQUIRED_FIELD,
            "is required",
        )),
        Some(Value::String(s)) if s.parse::<i64>().is_ok() || is_exact_decimal(s) => {}
        Some(Value::Number(n)) if n.is_i64() => {}
        Some(other) => errors.push(field_error(
            "data.value",
            error_code::INVALID_VALUE_TYPE,
            format!("must be an int64 (or an exact decimal) as a string, got {other}"),
        )),
    }
    errors
}

/// Fractional digits a platform `data.value` may carry (nanoseconds of a
/// second); the ledger's decimals hold them exactly.
const MAX_FRACTION_DIGITS: usize = 9;

/// `<int64>.<1 to 9 digits>`, no exponent, no `+`.
fn is_exact_decimal(text: &str) -> bool {
    let Some((whole, fraction)) = text.split_once('.') else {
        return false;
    };
    let digits = whole.strip_prefix('-').unwrap_or(whole);
    !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && whole.parse::<i64>().is_ok()
        && (1..=MAX_FRACTION_DIGITS).contains(&fraction.len())
        && fraction.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(id: &str, value: Value) -> Value {
        json!({"specversion": "1.0", "id": id, "source": "s", "type": "t", "subject": "projects/p", "data": {"value": value}})
    }

    #[test]
    fn platform_checks_ulids_and_int64_values() {
        let platform_errors = |v: &Value| platform_errors(&RawEvent::from_value(v.clone()));
        let ok = event("01JD4ZQ7Y9T5X3W2V1S0R9Q8P7", json!("42"));
        assert!(platform_errors(&ok).is_empty());
        assert!(platform_errors(&event("01JD4ZQ7Y9T5X3W2V1S0R9Q8P7", json!(42))).is_empty());
        let codes =
            |v: &Value| -> Vec<String> { platform_errors(v).into_iter().map(|e| e.code).collect() };
        assert_eq!(codes(&event("nope", json!("1"))), ["INVALID_ULID"]);
        // Exact decimals (the edge agent's connection seconds) are taken;
        // floats, exponents and more than nanoseconds are not.
        for exact in ["1.5", "0.035", "-2.000000001", "9223372036854775807.5"] {
            assert!(
                platform_errors(&event("01JD4ZQ7Y9T5X3W2V1S0R9Q8P7", json!(exact))).is_empty(),
                "{exact}"
            );
        }
        for inexact in [
            "1.",
            ".5",
            "1.5.5",
            "1e3",
            "1.0000000001",
            "+1.5",
            "9223372036854775808.5",
            "- 1.5",
        ] {
            assert_eq!(
                codes(&event("01JD4ZQ7Y9T5X3W2V1S0R9Q8P7", json!(inexact))),
                ["INVALID_VALUE_TYPE"],
                "{inexact}"
            );
        }
        assert_eq!(
            codes(&event("01JD4ZQ7Y9T5X3W2V1S0R9Q8P7", json!(1.5))),
            ["INVALID_VALUE_TYPE"]
        );
        assert_eq!(
            codes(&event(
                "01JD4ZQ7Y9T5X3W2V1S0R9Q8P7",
                json!("99999999999999999999")
            )),
            ["INVALID_VALUE_TYPE"]
        );
        assert_eq!(
            codes(&event("01JD4ZQ7Y9T5X3W2V1S0R9Q8P7", Value::Null)),
            ["MISSING_REQUIRED_FIELD"]
        );
    }

    #[test]
    fn a_rejection_names_the_first_code_and_every_problem() {
        let r = rejection(
            3,
            None,
            &[
                field_error("source", error_code::MISSING_REQUIRED_FIELD, "is required"),
                field_error("time", error_code::INVALID_VALUE_TYPE, "not a time"),
            ],
        );
        assert_eq!(r.reason, "MISSING_REQUIRED_FIELD");
        assert_eq!(r.detail, "source: is required; time: not a time");
    }
}
