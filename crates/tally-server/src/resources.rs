//! Resources under `/apis`: apply, list, get, replace, delete.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use serde::Serialize;
use serde_json::{Value, json};
use tally_ledger::ApplyMode;
use tally_model::{Kind, Manifest, ResourceError};

use crate::AppState;
use crate::body;
use crate::problem::Problem;

fn kind(plural: &str) -> Result<Kind, Problem> {
    plural
        .parse::<Kind>()
        .map_err(|e: ResourceError| Problem::new(StatusCode::NOT_FOUND, e.to_string()))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ApplyResult {
    kind: String,
    name: String,
    /// `created`, `configured` or `unchanged`.
    action: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ApplyResults {
    results: Vec<ApplyResult>,
}

/// Apply manifests: multi-document YAML or JSON, Kubernetes-style.
///
/// Every document is parsed before any is applied; they are then applied in
/// order, stopping at the first refusal (earlier ones stay applied).
#[utoipa::path(post, path = "/apis/apply", tag = "resources",
    request_body(description = "Multi-document YAML or JSON manifests", content((String = "application/yaml"), (String = "application/json"))),
    responses((status = 200, description = "What happened to each resource", body = ApplyResults),
              (status = 400, description = "A manifest is invalid", body = Problem, content_type = "application/problem+json"),
              (status = 409, description = "A change is not allowed (e.g. a Published meter's unit)", body = Problem, content_type = "application/problem+json")))]
pub async fn apply(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<ApplyResults>, Problem> {
    let body = body::decode(&headers, body, state.max_body_bytes)?;
    let text =
        std::str::from_utf8(&body).map_err(|_| Problem::bad_request("manifests must be UTF-8"))?;
    let manifests =
        Manifest::parse_documents(text).map_err(|e| Problem::bad_request(e.to_string()))?;
    for m in &manifests {
        m.typed_kind()
            .map_err(|e| Problem::bad_request(e.to_string()))?;
    }
    let mut results = Vec::with_capacity(manifests.len());
    for manifest in manifests {
        let applied = state.ledger.apply(manifest, ApplyMode::Upsert).await?;
        results.push(ApplyResult {
            kind: applied.manifest.kind.clone(),
            name: applied.manifest.metadata.name.clone(),
            action: serde_json::to_value(applied.action)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
        });
    }
    Ok(Json(ApplyResults { results }))
}

/// List resources of a kind.
#[utoipa::path(get, path = "/apis/{plural}", tag = "resources",
    params(("plural" = String, Path, description = "meterdefinitions or monitoredresourcetypes")),
    responses((status = 200, description = "A List", body = Object)))]
pub async fn list(
    State(state): State<AppState>,
    Path(plural): Path<String>,
) -> Result<Json<Value>, Problem> {
    let items = state.ledger.list(kind(&plural)?).await?;
    Ok(Json(
        json!({"apiVersion": "v1", "kind": "List", "items": items}),
    ))
}

/// One resource, with status.
#[utoipa::path(get, path = "/apis/{plural}/{name}", tag = "resources",
    params(("plural" = String, Path, description = "Resource kind, plural"), ("name" = String, Path, description = "Name")),
    responses((status = 200, description = "The resource", body = Object),
              (status = 404, description = "Not found", body = Problem, content_type = "application/problem+json")))]
pub async fn get(
    State(state): State<AppState>,
    Path((plural, name)): Path<(String, String)>,
) -> Result<Json<Manifest>, Problem> {
    Ok(Json(state.ledger.get(kind(&plural)?, name).await?))
}

/// Create or replace one resource.
#[utoipa::path(put, path = "/apis/{plural}/{name}", tag = "resources",
    params(("plural" = String, Path, description = "Resource kind, plural"), ("name" = String, Path, description = "Name")),
    request_body(content = Object, description = "The manifest (JSON)"),
    responses((status = 200, description = "Applied", body = Object),
              (status = 400, description = "Invalid", body = Problem, content_type = "application/problem+json"),
              (status = 409, description = "Change not allowed", body = Problem, content_type = "application/problem+json")))]
pub async fn put(
    State(state): State<AppState>,
    Path((plural, name)): Path<(String, String)>,
    Json(manifest): Json<Manifest>,
) -> Result<Json<Manifest>, Problem> {
    let kind = kind(&plural)?;
    if manifest.metadata.name != name || manifest.kind != kind.as_str() {
        return Err(Problem::bad_request(format!(
            "the body describes {} {:?}, the URL {kind} {name:?}",
            manifest.kind, manifest.metadata.name
        )));
    }
    Ok(Json(
        state
            .ledger
            .apply(manifest, ApplyMode::Upsert)
            .await?
            .manifest,
    ))
}

/// Delete one resource.
#[utoipa::path(delete, path = "/apis/{plural}/{name}", tag = "resources",
    params(("plural" = String, Path, description = "Resource kind, plural"), ("name" = String, Path, description = "Name")),
    responses((status = 204, description = "Deleted"),
              (status = 404, description = "Not found", body = Problem, content_type = "application/problem+json"),
              (status = 409, description = "Not allowed", body = Problem, content_type = "application/problem+json")))]
pub async fn delete(
    State(state): State<AppState>,
    Path((plural, name)): Path<(String, String)>,
) -> Result<StatusCode, Problem> {
    state.ledger.delete(kind(&plural)?, name).await?;
    Ok(StatusCode::NO_CONTENT)
}
