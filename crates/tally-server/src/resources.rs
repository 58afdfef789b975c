//! Resources under `/apis`: apply, list, get, replace, delete.
//!
//! Catalog kinds (`MeterDefinition`, `MonitoredResourceType`) go to the
//! ledger, every other kind to the resource store; both are one surface.
//! Cluster-scoped resources live at `/apis/{plural}/{name}`, namespaced ones
//! at `/apis/{plural}/{namespace}/{name}`. Who may read or write what is
//! decided here, per kind and project ([`Principal::may_read`],
//! [`Principal::may_write`]); a resource the caller may not read is
//! answered as not found, so its existence does not leak.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::{Extension, Json};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tally_ledger::{Applied, ApplyMode, ResourceKey, ResourceSet, ResourceStore};
use tally_model::{Kind, KindClass, Manifest, ResourceError};

use crate::body;
use crate::problem::Problem;
use crate::{AppState, Principal};

/// Fills in the runtime part of a resource's `status` (e.g. an exporter's
/// sink health). Registered with [`AppState::with_status_source`].
pub trait StatusSource: Send + Sync + 'static {
    /// The status to show for `manifest`, or `None` to leave it as it is.
    fn status(&self, manifest: &Manifest) -> Option<Value>;
}

fn kind(plural: &str) -> Result<Kind, Problem> {
    plural
        .parse::<Kind>()
        .map_err(|e: ResourceError| Problem::new(StatusCode::NOT_FOUND, e.to_string()))
}

impl AppState {
    fn resource_store(&self) -> Result<&Arc<dyn ResourceStore>, Problem> {
        self.resources.as_ref().ok_or_else(|| {
            Problem::new(
                StatusCode::NOT_IMPLEMENTED,
                "this server keeps only the meter catalog",
            )
        })
    }

    pub(crate) fn snapshot(&self) -> Arc<ResourceSet> {
        self.resources
            .as_ref()
            .map_or_else(Arc::default, |r| r.snapshot())
    }

    /// The resource as the caller may see it, with runtime status.
    fn present(&self, set: &ResourceSet, manifest: &Manifest) -> Manifest {
        let mut shown = set.shown(manifest);
        for source in self.status_sources.iter() {
            if let Some(status) = source.status(&shown) {
                shown.status = Some(status);
            }
        }
        shown
    }
}

/// The project a resource belongs to, for access decisions.
fn project_of(
    set: &ResourceSet,
    kind: Kind,
    namespace: Option<&str>,
    name: &str,
) -> Option<String> {
    match kind {
        Kind::Namespace => Some(set.project_of_namespace(name)),
        k if k.namespaced() => namespace.map(|ns| set.project_of_namespace(ns)),
        _ => None,
    }
}

fn forbidden(principal: &Principal, verb: &str, key: &ResourceKey) -> Problem {
    Problem::new(
        StatusCode::FORBIDDEN,
        format!("token {:?} may not {verb} {key}", principal.name),
    )
}

fn not_found(key: &ResourceKey) -> Problem {
    Problem::new(StatusCode::NOT_FOUND, format!("{key} not found"))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ApplyResult {
    kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
    name: String,
    /// `created`, `configured` or `unchanged`.
    action: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ApplyResults {
    results: Vec<ApplyResult>,
}

pub(crate) async fn apply_one(
    state: &AppState,
    manifest: Manifest,
    kind: Kind,
    mode: ApplyMode,
) -> Result<Applied, Problem> {
    if kind.class() == KindClass::Catalog {
        Ok(state.ledger.apply(manifest, mode).await?)
    } else {
        let mut applied = state.resource_store()?.apply(manifest, mode).await?;
        applied.manifest = state.present(&state.snapshot(), &applied.manifest);
        Ok(applied)
    }
}

/// Apply manifests: multi-document YAML or JSON, Kubernetes-style.
///
/// Every document is parsed and authorised before any is applied; they are
/// then applied in order, stopping at the first refusal (earlier ones stay
/// applied).
#[utoipa::path(post, path = "/apis/apply", tag = "resources",
    request_body(description = "Multi-document YAML or JSON manifests", content((String = "application/yaml"), (String = "application/json"))),
    responses((status = 200, description = "What happened to each resource", body = ApplyResults),
              (status = 400, description = "A manifest is invalid", body = Problem, content_type = "application/problem+json"),
              (status = 403, description = "The token may not write one of the resources", body = Problem, content_type = "application/problem+json"),
              (status = 409, description = "A change is not allowed (e.g. a Published meter's unit)", body = Problem, content_type = "application/problem+json")))]
pub async fn apply(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<ApplyResults>, Problem> {
    let limit = state.max_body_bytes;
    let manifests = body::decoded_off_workers(headers, body, limit, |_, body| {
        let text = std::str::from_utf8(&body)
            .map_err(|_| Problem::bad_request("manifests must be UTF-8"))?;
        Manifest::parse_documents(text).map_err(|e| Problem::bad_request(e.to_string()))
    })
    .await?;
    let set = state.snapshot();
    let mut typed = Vec::with_capacity(manifests.len());
    for manifest in manifests {
        let kind = manifest
            .typed_kind()
            .map_err(|e| Problem::bad_request(e.to_string()))?;
        let meta = &manifest.metadata;
        let namespace = meta.namespace.as_deref();
        let key = ResourceKey::new(kind, namespace, &meta.name);
        if !principal.may_write(
            kind,
            project_of(&set, kind, namespace, &meta.name).as_deref(),
        ) {
            return Err(forbidden(&principal, "write", &key));
        }
        policy_targets_allowed(&set, &principal, &manifest)?;
        typed.push((manifest, kind));
    }
    let mut results = Vec::with_capacity(typed.len());
    for (manifest, kind) in typed {
        let applied = apply_one(&state, manifest, kind, ApplyMode::Upsert).await?;
        results.push(ApplyResult {
            kind: applied.manifest.kind.clone(),
            namespace: applied.manifest.metadata.namespace.clone(),
            name: applied.manifest.metadata.name.clone(),
            action: serde_json::to_value(applied.action)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
        });
    }
    Ok(Json(ApplyResults { results }))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct ListParams {
    /// Only resources of this namespace (namespaced kinds).
    pub(crate) namespace: Option<String>,
}

/// List resources of a kind that the caller may see.
#[utoipa::path(get, path = "/apis/{plural}", tag = "resources",
    params(("plural" = String, Path, description = "The kind's plural, e.g. meterdefinitions, exporters, secrets"), ListParams),
    responses((status = 200, description = "A List", body = crate::schemas::ResourceList)))]
pub async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(plural): Path<String>,
    Query(params): Query<ListParams>,
) -> Result<Json<Value>, Problem> {
    let kind = kind(&plural)?;
    let items: Vec<Manifest> = if kind.class() == KindClass::Catalog {
        if !principal.may_read(kind, None) {
            return Err(Problem::new(
                StatusCode::FORBIDDEN,
                format!("token {:?} may not read {plural}", principal.name),
            ));
        }
        state.ledger.list(kind).await?
    } else {
        let set = state.resource_store()?.snapshot();
        set.list(kind, params.namespace.as_deref())
            .filter(|m| {
                let meta = &m.metadata;
                let project = project_of(&set, kind, meta.namespace.as_deref(), &meta.name);
                principal.may_read(kind, project.as_deref())
            })
            .map(|m| state.present(&set, m))
            .collect()
    };
    Ok(Json(
        json!({"apiVersion": "v1", "kind": "List", "items": items}),
    ))
}

/// The target of a single-resource request, once its scope is checked.
fn target(plural: &str, namespace: Option<String>, name: String) -> Result<ResourceKey, Problem> {
    let kind = kind(plural)?;
    match (kind.namespaced(), namespace) {
        (true, None) => Err(Problem::new(
            StatusCode::NOT_FOUND,
            format!("{kind} is namespaced: use /apis/{plural}/{{namespace}}/{{name}}"),
        )),
        (false, Some(_)) => Err(Problem::new(
            StatusCode::NOT_FOUND,
            format!("{kind} is cluster-scoped: use /apis/{plural}/{{name}}"),
        )),
        (_, namespace) => Ok(ResourceKey {
            kind,
            namespace,
            name,
        }),
    }
}

async fn get_key(
    state: &AppState,
    principal: &Principal,
    key: ResourceKey,
) -> Result<Json<Manifest>, Problem> {
    if key.kind.class() == KindClass::Catalog {
        if !principal.may_read(key.kind, None) {
            return Err(forbidden(principal, "read", &key));
        }
        return Ok(Json(state.ledger.get(key.kind, key.name).await?));
    }
    let set = state.resource_store()?.snapshot();
    let project = project_of(&set, key.kind, key.namespace.as_deref(), &key.name);
    match set.get(&key) {
        Some(manifest) if principal.may_read(key.kind, project.as_deref()) => {
            Ok(Json(state.present(&set, manifest)))
        }
        _ => Err(not_found(&key)),
    }
}

/// Replaces the resource at `key` with the manifest in `body`, once the
/// caller is known to be allowed to write it: an unauthorised body is
/// never parsed.
async fn put_key(
    state: &AppState,
    principal: &Principal,
    key: ResourceKey,
    body: Bytes,
) -> Result<Json<Manifest>, Problem> {
    let set = state.snapshot();
    let project = project_of(&set, key.kind, key.namespace.as_deref(), &key.name);
    if !principal.may_write(key.kind, project.as_deref()) {
        return Err(forbidden(principal, "write", &key));
    }
    let manifest: Manifest = body::off_workers(false, body.len(), move || {
        serde_json::from_slice(&body)
            .map_err(|e| Problem::bad_request(format!("the body is not a JSON manifest: {e}")))
    })
    .await?;
    policy_targets_allowed(&set, principal, &manifest)?;
    let meta = &manifest.metadata;
    if meta.name != key.name
        || manifest.kind != key.kind.as_str()
        || (key.kind.namespaced() && meta.namespace != key.namespace)
    {
        return Err(Problem::bad_request(format!(
            "the body describes {} {}{:?}, the URL {key}",
            manifest.kind,
            meta.namespace
                .as_deref()
                .map(|ns| format!("{ns}/"))
                .unwrap_or_default(),
            meta.name
        )));
    }
    Ok(Json(
        apply_one(state, manifest, key.kind, ApplyMode::Upsert)
            .await?
            .manifest,
    ))
}

/// A project's `TelemetryPolicy` targets only its own gateways (its
/// namespace's, by construction) and namespaces: a Namespace target that
/// belongs to another project is refused. (Operators may write any policy;
/// the resolution still never lets it govern another project.)
fn policy_targets_allowed(
    set: &ResourceSet,
    principal: &Principal,
    manifest: &Manifest,
) -> Result<(), Problem> {
    if manifest.kind != Kind::TelemetryPolicy.as_str() || principal.is_admin() {
        return Ok(());
    }
    let refs = manifest.spec.get("targetRefs").and_then(Value::as_array);
    for target in refs.into_iter().flatten() {
        if target.get("kind").and_then(Value::as_str) != Some("Namespace") {
            continue;
        }
        let Some(name) = target.get("name").and_then(Value::as_str) else {
            continue;
        };
        let owner = project_of(set, Kind::Namespace, None, name);
        if let Some(owner) = owner
            && !principal.projects().any(|mine| mine == owner)
        {
            return Err(Problem::new(
                StatusCode::FORBIDDEN,
                format!(
                    "TelemetryPolicy {}/{} targets Namespace {name}, which belongs to another project: a project's policies may target only its own gateways and namespaces",
                    manifest.metadata.namespace.as_deref().unwrap_or_default(),
                    manifest.metadata.name
                ),
            ));
        }
    }
    Ok(())
}

async fn delete_key(
    state: &AppState,
    principal: &Principal,
    key: ResourceKey,
) -> Result<StatusCode, Problem> {
    let set = state.snapshot();
    let project = project_of(&set, key.kind, key.namespace.as_deref(), &key.name);
    if !principal.may_write(key.kind, project.as_deref()) {
        return Err(if principal.may_read(key.kind, project.as_deref()) {
            forbidden(principal, "delete", &key)
        } else {
            not_found(&key)
        });
    }
    if key.kind.class() == KindClass::Catalog {
        state.ledger.delete(key.kind, key.name).await?;
    } else {
        state.resource_store()?.delete(key).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// One cluster-scoped resource, with status.
#[utoipa::path(get, path = "/apis/{plural}/{name}", tag = "resources",
    params(("plural" = String, Path, description = "Resource kind, plural"), ("name" = String, Path, description = "Name")),
    responses((status = 200, description = "The resource", body = crate::schemas::Resource),
              (status = 404, description = "Not found", body = Problem, content_type = "application/problem+json")))]
pub async fn get(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((plural, name)): Path<(String, String)>,
) -> Result<Json<Manifest>, Problem> {
    get_key(&state, &principal, target(&plural, None, name)?).await
}

/// One namespaced resource, with status.
#[utoipa::path(get, path = "/apis/{plural}/{namespace}/{name}", tag = "resources",
    params(("plural" = String, Path, description = "Resource kind, plural"), ("namespace" = String, Path, description = "Namespace"), ("name" = String, Path, description = "Name")),
    responses((status = 200, description = "The resource", body = crate::schemas::Resource),
              (status = 404, description = "Not found", body = Problem, content_type = "application/problem+json")))]
pub async fn get_namespaced(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((plural, namespace, name)): Path<(String, String, String)>,
) -> Result<Json<Manifest>, Problem> {
    get_key(&state, &principal, target(&plural, Some(namespace), name)?).await
}

/// Create or replace one cluster-scoped resource.
#[utoipa::path(put, path = "/apis/{plural}/{name}", tag = "resources",
    params(("plural" = String, Path, description = "Resource kind, plural"), ("name" = String, Path, description = "Name")),
    request_body(content = crate::schemas::Resource, description = "The manifest (JSON)"),
    responses((status = 200, description = "Applied", body = crate::schemas::Resource),
              (status = 400, description = "Invalid", body = Problem, content_type = "application/problem+json"),
              (status = 409, description = "Change not allowed", body = Problem, content_type = "application/problem+json")))]
pub async fn put(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((plural, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Manifest>, Problem> {
    put_key(&state, &principal, target(&plural, None, name)?, body).await
}

/// Create or replace one namespaced resource.
#[utoipa::path(put, path = "/apis/{plural}/{namespace}/{name}", tag = "resources",
    params(("plural" = String, Path, description = "Resource kind, plural"), ("namespace" = String, Path, description = "Namespace"), ("name" = String, Path, description = "Name")),
    request_body(content = crate::schemas::Resource, description = "The manifest (JSON)"),
    responses((status = 200, description = "Applied", body = crate::schemas::Resource),
              (status = 400, description = "Invalid", body = Problem, content_type = "application/problem+json"),
              (status = 409, description = "Change not allowed", body = Problem, content_type = "application/problem+json")))]
pub async fn put_namespaced(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((plural, namespace, name)): Path<(String, String, String)>,
    body: Bytes,
) -> Result<Json<Manifest>, Problem> {
    let key = target(&plural, Some(namespace), name)?;
    put_key(&state, &principal, key, body).await
}

/// Delete one cluster-scoped resource.
#[utoipa::path(delete, path = "/apis/{plural}/{name}", tag = "resources",
    params(("plural" = String, Path, description = "Resource kind, plural"), ("name" = String, Path, description = "Name")),
    responses((status = 204, description = "Deleted"),
              (status = 404, description = "Not found", body = Problem, content_type = "application/problem+json"),
              (status = 409, description = "Not allowed", body = Problem, content_type = "application/problem+json")))]
pub async fn delete(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((plural, name)): Path<(String, String)>,
) -> Result<StatusCode, Problem> {
    delete_key(&state, &principal, target(&plural, None, name)?).await
}

/// Delete one namespaced resource.
#[utoipa::path(delete, path = "/apis/{plural}/{namespace}/{name}", tag = "resources",
    params(("plural" = String, Path, description = "Resource kind, plural"), ("namespace" = String, Path, description = "Namespace"), ("name" = String, Path, description = "Name")),
    responses((status = 204, description = "Deleted"),
              (status = 404, description = "Not found", body = Problem, content_type = "application/problem+json"),
              (status = 409, description = "Not allowed", body = Problem, content_type = "application/problem+json")))]
pub async fn delete_namespaced(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((plural, namespace, name)): Path<(String, String, String)>,
) -> Result<StatusCode, Problem> {
    delete_key(&state, &principal, target(&plural, Some(namespace), name)?).await
}
