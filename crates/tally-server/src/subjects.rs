//! OpenMeter's subjects (`/api/v1/subjects`), derived from stored usage.
//!
//! Tally keeps no subject records: a subject is a key that usage events
//! name. The listing is every subject with measured usage in some meter,
//! `createdAt` the start of its first day (UTC) with usage and `updatedAt`
//! the end of its last. Creating and deleting subjects is not served (501).

use std::collections::BTreeMap;

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde::Serialize;
use tally_ledger::MeterQuery;
use tally_meter::WindowSize;
use tally_model::Kind;

use crate::problem::Problem;
use crate::query::Params;
use crate::{AppState, Principal};

/// A subject as OpenMeter lists it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Subject {
    id: String,
    key: String,
    created_at: Timestamp,
    updated_at: Timestamp,
}

/// Every subject the caller may read with usage in some meter, by key.
async fn subjects(state: &AppState, principal: &Principal) -> Result<Vec<Subject>, Problem> {
    let mut readable = Vec::new();
    principal.restrict_subjects(&mut readable)?;
    let mut spans: BTreeMap<String, (Timestamp, Timestamp)> = BTreeMap::new();
    for meter in state.ledger.list(Kind::MeterDefinition).await? {
        let name = meter.metadata.name;
        let Some((first, last)) = state.ledger.usage_span(name.clone()).await? else {
            continue;
        };
        let query = MeterQuery {
            from: first,
            to: last,
            window_size: Some(WindowSize::Day),
            time_zone: TimeZone::UTC,
            subjects: readable.clone(),
            group_by: vec!["subject".into()],
            filter_group_by: BTreeMap::new(),
            limit: None,
            cursor: None,
        };
        for row in state.ledger.query(name, query).await?.rows {
            let Some(subject) = row.subject else { continue };
            let span = spans
                .entry(subject)
                .or_insert((row.window_start, row.window_end));
            span.0 = span.0.min(row.window_start);
            span.1 = span.1.max(row.window_end);
        }
    }
    Ok(spans
        .into_iter()
        .map(|(key, (created_at, updated_at))| Subject {
            id: key.clone(),
            key,
            created_at,
            updated_at,
        })
        .collect())
}

/// Subjects with usage, by key.
#[utoipa::path(get, path = "/api/v1/subjects", tag = "subjects",
    responses((status = 200, description = "Subjects with measured usage", body = Vec<crate::schemas::Subject>)))]
pub async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Vec<Subject>>, Problem> {
    Params::parse(raw.as_deref())?.only(&[])?;
    Ok(Json(subjects(&state, &principal).await?))
}

/// One subject with usage, by key (its id is its key).
#[utoipa::path(get, path = "/api/v1/subjects/{key}", tag = "subjects",
    params(("key" = String, Path, description = "The subject's key (or id, the same)")),
    responses((status = 200, description = "The subject", body = crate::schemas::Subject),
              (status = 404, description = "No usage names this subject", body = Problem, content_type = "application/problem+json")))]
pub async fn get(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(key): Path<String>,
) -> Result<Json<Subject>, Problem> {
    subjects(&state, &principal)
        .await?
        .into_iter()
        .find(|s| s.key == key)
        .map(Json)
        .ok_or_else(|| {
            Problem::new(
                StatusCode::NOT_FOUND,
                format!("no usage names subject {key:?}"),
            )
        })
}
