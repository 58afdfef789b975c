//! Compute instances' lifecycle: `POST /api/v1/instances/events` (the
//! controllers' CloudEvents), `GET /api/v1/instances` and
//! `GET /api/v1/instances/{instance}/events` (a project's own), and the
//! task that derives lifecycle events from `Instance` status changes
//! (applied through `/apis` or a watched directory).
//!
//! Events are stored in a `tally_compute::LifecycleEvents` store (durable
//! before the answer, deduplicated by source and id): the embedded
//! `LifecycleStore` in the data directory, or the one the backend gives
//! (a cluster's, shared by every node) and each new one is counted in
//! `FleetMetrics` for `/metrics`.
//!
//! Tenancy: a project token reads only its projects' instances; naming
//! another project, or an instance it does not own, answers 404. Admin
//! tokens read every project.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::{Extension, Json};
use bytes::Bytes;
use jiff::Timestamp;
use serde::Serialize;
use tally_compute::lifecycle::{self, LifecycleEvent};
use tally_compute::store::{InstanceSummary, Page};
use tally_compute::{FleetMetrics, InstanceUsage, LifecycleEvents, LifecycleStore};
use tally_ledger::ResourceKey;
use tally_model::instance::Allocation;
use tally_model::{Kind, Manifest};

use crate::body;
use crate::problem::Problem;
use crate::query::Params;
use crate::{AppState, Principal};

/// Where lifecycle events live and how they are counted.
#[derive(Clone)]
pub struct Compute {
    store: Arc<dyn LifecycleEvents>,
    metrics: Arc<FleetMetrics>,
    /// Per-instance vCPU and memory use, fed by the metrics receivers.
    usage: Arc<InstanceUsage>,
}

impl Compute {
    /// Opens (or creates) the embedded lifecycle store in `dir`.
    pub fn open(dir: &std::path::Path) -> anyhow::Result<Compute> {
        std::fs::create_dir_all(dir)?;
        Ok(Compute::new(Arc::new(LifecycleStore::open(dir)?)))
    }

    /// Lifecycle events in `store` (e.g. a cluster's).
    pub fn new(store: Arc<dyn LifecycleEvents>) -> Compute {
        Compute {
            store,
            metrics: Arc::new(FleetMetrics::new()),
            usage: Arc::new(InstanceUsage::default()),
        }
    }

    /// Stores `events` durably; counts and returns (new, duplicates).
    pub async fn record(&self, events: Vec<LifecycleEvent>) -> Result<(usize, usize), Problem> {
        if events.is_empty() {
            return Ok((0, 0));
        }
        let store = Arc::clone(&self.store);
        let (events, fresh) = tokio::task::spawn_blocking(move || {
            let fresh = store.append(&events);
            (events, fresh)
        })
        .await
        .map_err(|e| internal(&e))?;
        let fresh = fresh.map_err(store_error)?;
        let mut new = 0;
        for (event, fresh) in events.iter().zip(&fresh) {
            if *fresh {
                self.metrics.observe(event);
                self.usage.lifecycle(event);
                new += 1;
            }
        }
        Ok((new, fresh.len() - new))
    }

    pub fn render_metrics(&self, out: &mut String) {
        self.render_metrics_at(out, Timestamp::now());
    }

    /// The fleet and per-instance families, the crash-loop window ending
    /// at `now`.
    pub fn render_metrics_at(&self, out: &mut String, now: Timestamp) {
        self.metrics.render(out, now);
        self.usage.render(out);
    }

    /// Where the metrics receivers put instances' vCPU and memory use.
    pub(crate) fn usage(&self) -> Arc<InstanceUsage> {
        Arc::clone(&self.usage)
    }
}

fn internal(e: &dyn std::fmt::Display) -> Problem {
    tracing::error!(error = %e, "lifecycle store");
    Problem::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the lifecycle store failed",
    )
}

fn compute(state: &AppState) -> Result<&Compute, Problem> {
    state.compute.as_ref().ok_or_else(|| {
        Problem::new(
            StatusCode::NOT_IMPLEMENTED,
            "this server keeps no instance lifecycle",
        )
    })
}

/// What an ingest stored.
#[derive(Serialize, utoipa::ToSchema)]
pub struct LifecycleIngested {
    /// Events stored now.
    accepted: usize,
    /// Events already stored (same `source` and `id`), not stored again.
    duplicates: usize,
}

/// Ingest instance lifecycle CloudEvents from the compute controllers.
///
/// Types `com.datumapis.compute.instance.<created|scheduled|started|stopped|crashed|oom_killed|terminated>`;
/// `data` names `project` and `instance` (and optionally `namespace`,
/// `workload`, `uid`, `node`, `reason`, `message`). Validated whole: one bad
/// event stores nothing. The answer is sent once the events are durable;
/// a re-sent event (same `source` and `id`) is a duplicate.
#[utoipa::path(post, path = "/api/v1/instances/events", tag = "compute",
    request_body(description = "One CloudEvent, a batch, or NDJSON", content((crate::schemas::Event = "application/cloudevents+json"), (Vec<crate::schemas::Event> = "application/cloudevents-batch+json"), (String = "application/x-ndjson"))),
    responses((status = 200, description = "Stored (or recognised as duplicates)", body = LifecycleIngested),
              (status = 400, description = "An event is invalid; nothing stored", body = Problem, content_type = "application/problem+json")))]
pub async fn ingest(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<LifecycleIngested>, Problem> {
    let compute = compute(&state)?.clone();
    let events = body::decoded_off_workers(headers, body, state.max_body_bytes, |headers, body| {
        let values = crate::events::values(&body::media_type(headers), &body)?;
        parse_lifecycle(values)
    })
    .await?;
    let (accepted, duplicates) = compute.record(events).await?;
    Ok(Json(LifecycleIngested {
        accepted,
        duplicates,
    }))
}

fn parse_lifecycle(values: Vec<serde_json::Value>) -> Result<Vec<LifecycleEvent>, Problem> {
    lifecycle::from_values(values, Timestamp::now())
        .map_err(|errors| tally_ledger::LedgerError::Rejected(errors).into())
}

/// The project a read names: `?project=`, or the token's only project.
/// `None` for an admin naming none (every project). Another project than
/// the token's answers 404, as if it did not exist.
fn project_to_read(principal: &Principal, p: &Params) -> Result<Option<String>, Problem> {
    let requested = p.one("project")?;
    if principal.is_admin() {
        return Ok(requested);
    }
    let mine: Vec<&str> = principal.projects().collect();
    match requested {
        Some(r) if mine.contains(&r.as_str()) => Ok(Some(r)),
        Some(r) => Err(Problem::new(
            StatusCode::NOT_FOUND,
            format!("project {r:?} not found"),
        )),
        None => match mine.as_slice() {
            [only] => Ok(Some((*only).to_owned())),
            _ => Err(Problem::bad_request(
                "this token reads several projects: name one with ?project=",
            )),
        },
    }
}

fn store_error(e: tally_compute::StoreError) -> Problem {
    match e {
        tally_compute::StoreError::BadCursor(_) => Problem::bad_request(e.to_string()),
        tally_compute::StoreError::Unavailable(_) => {
            tracing::warn!(error = %e, "lifecycle store");
            Problem::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).with_retry_after(1)
        }
        other => internal(&other),
    }
}

/// Instances with lifecycle events, with their latest state.
#[utoipa::path(get, path = "/api/v1/instances", tag = "compute",
    params(("project" = Option<String>, Query, description = "The project (default: the token's only project; admins: every project)"),
           ("limit" = Option<usize>, Query, description = "Page size (at most 1000)"),
           ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page")),
    responses((status = 200, description = "A page of instances", body = crate::schemas::InstancePage),
              (status = 404, description = "The project is not the token's", body = Problem, content_type = "application/problem+json")))]
pub async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Page<InstanceSummary>>, Problem> {
    let p = Params::parse(raw.as_deref())?;
    p.only(&["project", "limit", "cursor"])?;
    let project = project_to_read(&principal, &p)?;
    let limit = p.number("limit")?.unwrap_or(100);
    let cursor = p.one("cursor")?;
    let store = Arc::clone(&compute(&state)?.store);
    let page = tokio::task::spawn_blocking(move || {
        store.instances(project.as_deref(), limit, cursor.as_deref())
    })
    .await
    .map_err(|e| internal(&e))?
    .map_err(store_error)?;
    Ok(Json(page))
}

/// One instance's lifecycle events, in arrival order.
#[utoipa::path(get, path = "/api/v1/instances/{instance}/events", tag = "compute",
    params(("instance" = String, Path, description = "The instance's name"),
           ("project" = Option<String>, Query, description = "The project (default: the token's only project; required for admins)"),
           ("limit" = Option<usize>, Query, description = "Page size (at most 1000)"),
           ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page")),
    responses((status = 200, description = "A page of lifecycle events", body = crate::schemas::LifecycleEventPage),
              (status = 404, description = "No such instance in the project, or not the token's project", body = Problem, content_type = "application/problem+json")))]
pub async fn events(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(instance): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Page<LifecycleEvent>>, Problem> {
    let p = Params::parse(raw.as_deref())?;
    p.only(&["project", "limit", "cursor"])?;
    let project = project_to_read(&principal, &p)?
        .ok_or_else(|| Problem::bad_request("name the instance's project with ?project="))?;
    let not_found = || {
        Problem::new(
            StatusCode::NOT_FOUND,
            format!("instance {instance:?} not found"),
        )
    };
    if !lifecycle::is_name(&project) || !lifecycle::is_name(&instance) {
        return Err(not_found());
    }
    let limit = p.number("limit")?.unwrap_or(100);
    let cursor = p.one("cursor")?;
    let store = Arc::clone(&compute(&state)?.store);
    let name = instance.clone();
    let page = tokio::task::spawn_blocking(move || {
        store.events(&project, &name, limit, cursor.as_deref())
    })
    .await
    .map_err(|e| internal(&e))?
    .map_err(store_error)?;
    page.map(Json).ok_or_else(not_found)
}

/// Derives lifecycle events from `Instance` status changes in the resource
/// store until the store's sender is gone. The first pass sees every
/// instance afresh; the ids it derives are deterministic, so what was
/// stored before a restart is a duplicate.
pub(crate) async fn derive_from_instances(state: AppState, compute: Compute) {
    let Some(resources) = state.resources.clone() else {
        return;
    };
    let mut changes = resources.subscribe();
    let mut seen: BTreeMap<ResourceKey, Arc<Manifest>> = BTreeMap::new();
    loop {
        let set = resources.snapshot();
        let mut derived = Vec::new();
        let mut now_seen = BTreeMap::new();
        for manifest in set.list(Kind::Instance, None) {
            let meta = &manifest.metadata;
            let key = ResourceKey::new(Kind::Instance, meta.namespace.as_deref(), &meta.name);
            let old = seen.get(&key);
            let namespace = meta.namespace.as_deref().unwrap_or("");
            let changed = old.is_none_or(|o| !Arc::ptr_eq(o, manifest));
            if changed {
                let project = set.project_of_namespace(namespace);
                // Checked at apply; a manifest stored before that check
                // counts as requesting nothing.
                let allocation = Allocation::of(manifest).ok().flatten();
                compute
                    .usage
                    .allocate(&project, namespace, &meta.name, allocation);
            }
            if changed && old.is_none_or(|o| o.status != manifest.status) {
                let project = set.project_of_namespace(namespace);
                derived.extend(lifecycle::derive(
                    old.map(|o| &**o),
                    manifest,
                    &project,
                    Timestamp::now(),
                ));
            }
            now_seen.insert(key, Arc::clone(manifest));
        }
        for (key, gone) in &seen {
            if !now_seen.contains_key(key) {
                let namespace = gone.metadata.namespace.as_deref().unwrap_or("");
                let project = set.project_of_namespace(namespace);
                compute.usage.forget(&project, &gone.metadata.name);
            }
        }
        // What failed to be stored is derived again on the next change.
        match compute.record(derived).await {
            Ok(_) => seen = now_seen,
            Err(e) => {
                tracing::warn!(detail = %e.detail, "deriving lifecycle events from Instance status");
            }
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}
