//! `GET /api/v1/meters/{slug}/validate`: a meter checked against the
//! events of its type before it is published.
//!
//! The report itself is [`tally_meter::validate`]'s (pure, exact); this
//! handler only fetches what it reads: the meter, the resource types, the
//! newest events of the meter's type in `[from, to)` through
//! [`Ledger::list_events`](tally_ledger::Ledger::list_events), at most
//! `limit` of them (default and ceiling [`MAX_SCAN`]; the answer says when
//! the cap was reached), and the first [`STORED_QUARANTINE`] events the
//! ledger holds in quarantine for the meter.
//!
//! Admin only: it reads every subject's events (`auth.rs`).

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use jiff::{SignedDuration, Timestamp};
use tally_ledger::{EventFilter, LedgerError, QuarantineFilter};
use tally_meter::CompiledMeter;
use tally_meter::validate::{EXAMPLES, Example, MAX_SCAN, ReasonCount, Scan, ValidationAnswer};
use tally_model::{CloudEvent, Kind, MeterDefinition, MonitoredResourceType};

use crate::AppState;
use crate::problem::Problem;
use crate::query::Params;

/// How many of the ledger's quarantined events for the meter are summed up.
pub const STORED_QUARANTINE: usize = 1_000;
/// The range validated when `from` is not given: this long before `to`.
const DEFAULT_RANGE: SignedDuration = SignedDuration::from_hours(7 * 24);
/// Events asked of the ledger per page.
const PAGE: usize = 10_000;

/// Validate a meter against the events of its type.
#[utoipa::path(get, path = "/api/v1/meters/{slug}/validate", tag = "meters",
    params(("slug" = String, Path, description = "Meter slug"),
           ("from" = Option<String>, Query, description = "Event time, inclusive (default: 7 days before `to`)"),
           ("to" = Option<String>, Query, description = "Event time, exclusive (default: now)"),
           ("limit" = Option<usize>, Query, description = "Most events read, newest first (default and maximum 100000)")),
    responses((status = 200, description = "The validation report and verdict", body = Object),
              (status = 404, description = "No such meter", body = Problem, content_type = "application/problem+json")))]
pub async fn validate(
    State(state): State<AppState>,
    Path(slug): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<ValidationAnswer>, Problem> {
    let p = Params::parse(raw.as_deref())?;
    p.only(&["from", "to", "limit"])?;
    let to = p.timestamp("to")?.unwrap_or_else(Timestamp::now);
    let from = match p.timestamp("from")? {
        Some(from) => from,
        None => to.checked_sub(DEFAULT_RANGE).unwrap_or(Timestamp::MIN),
    };
    if from >= to {
        return Err(Problem::bad_request(format!(
            "`from` ({from}) must be before `to` ({to})"
        )));
    }
    let cap = p.number("limit")?.unwrap_or(MAX_SCAN).clamp(1, MAX_SCAN);
    let meter = compile(&state, &slug).await?;
    let (events, scan) = read_events(&state, &meter, from, to, cap).await?;
    let report = tally_meter::validate::validate(&meter, &events, scan);
    let (stored_quarantine, stored_quarantine_more) = stored_quarantine(&state, &slug).await?;
    Ok(Json(ValidationAnswer {
        from,
        to,
        report,
        stored_quarantine,
        stored_quarantine_more,
    }))
}

async fn compile(state: &AppState, slug: &str) -> Result<CompiledMeter, Problem> {
    let manifest = state
        .ledger
        .get(Kind::MeterDefinition, slug.to_owned())
        .await?;
    let definition = MeterDefinition::from_manifest(&manifest).map_err(LedgerError::from)?;
    let mut types = Vec::new();
    for m in state.ledger.list(Kind::MonitoredResourceType).await? {
        types.push(MonitoredResourceType::from_manifest(&m).map_err(LedgerError::from)?);
    }
    CompiledMeter::compile(slug, &definition, &types).map_err(|e| {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the stored meter {slug:?} does not compile: {e}"),
        )
    })
}

/// The newest `cap` events of the meter's type in `[from, to)`, voided ones
/// left out (and counted).
async fn read_events(
    state: &AppState,
    meter: &CompiledMeter,
    from: Timestamp,
    to: Timestamp,
    cap: usize,
) -> Result<(Vec<CloudEvent>, Scan), Problem> {
    let mut events = Vec::new();
    let mut scan = Scan {
        cap,
        ..Scan::default()
    };
    let mut cursor = None;
    loop {
        let page = state
            .ledger
            .list_events(EventFilter {
                from: Some(from),
                to: Some(to),
                event_type: Some(meter.event_type().to_owned()),
                limit: PAGE,
                cursor,
                ..EventFilter::default()
            })
            .await?;
        for stored in page.items {
            if stored.voided.is_some() {
                scan.voided += 1;
            } else if events.len() == cap {
                scan.cap_reached = true;
                return Ok((events, scan));
            } else {
                events.push(stored.event);
            }
        }
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return Ok((events, scan)),
        }
    }
}

/// The ledger's quarantined events for the meter, by reason, with examples.
async fn stored_quarantine(
    state: &AppState,
    slug: &str,
) -> Result<(Vec<ReasonCount>, bool), Problem> {
    let page = state
        .ledger
        .list_quarantine(QuarantineFilter {
            meter: Some(slug.to_owned()),
            limit: STORED_QUARANTINE,
            cursor: None,
        })
        .await?;
    let mut by_reason: Vec<ReasonCount> = Vec::new();
    for q in page.items {
        let at = match by_reason.iter().position(|r| r.reason == q.reason) {
            Some(at) => at,
            None => {
                by_reason.push(ReasonCount {
                    reason: q.reason.clone(),
                    events: 0,
                    examples: Vec::new(),
                });
                by_reason.len() - 1
            }
        };
        let r = &mut by_reason[at];
        r.events += 1;
        if r.examples.len() < EXAMPLES {
            r.examples.push(Example {
                id: q.event.event.id,
                message: q.message,
            });
        }
    }
    Ok((by_reason, page.next_cursor.is_some()))
}
