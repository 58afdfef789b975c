//! `tally export`: the exporters' pipeline on its own — no ledger, no
//! billing. Its configuration is the manifests of watched directories
//! (Exporters, Secrets, Namespaces, platform resources), applied with the
//! same rules as `tally serve` applies them ([`ResourceSet`]) to a store
//! kept in memory: the directories are the source of truth, read again at
//! every start. It receives metrics on `POST /v1/metrics`,
//! `POST /api/v1/write` and OTLP/gRPC, pulls from VictoriaMetrics when
//! configured, and serves `/metrics`, `/healthz`, `/readyz` and the
//! Exporters with their status (`GET /apis/exporters[/{namespace}/{name}]`,
//! so `tally get exporters` works against it). Sink queues and pull
//! checkpoints live under its own `--data-dir`.

use std::sync::{Arc, Mutex, RwLock};

use anyhow::Context;
use axum::extract::{DefaultBodyLimit, FromRef, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures::future::BoxFuture;
use jiff::Timestamp;
use serde_json::{Value, json};
use tally_delivery::Registry;
use tally_ledger::{Applied, ApplyMode, LedgerError, ResourceKey, ResourceSet, ResourceStore};
use tally_model::{Kind, KindClass, Manifest};
use tally_telemetry::Pipeline;
use tokio::sync::watch;

use crate::auth::Authenticator;
use crate::config::ExportConfig;
use crate::problem::Problem;
use crate::resources::ListParams;
use crate::telemetry::{self, Telemetry};
use crate::watch::{Apply, POLL_INTERVAL, Watcher};
use crate::{Principal, RequestCounts, StatusSource, body, exporters};

/// A [`ResourceStore`] in memory, with the same rules as every other store
/// ([`ResourceSet`]): what `tally export` reads its watched directories into.
#[derive(Default)]
pub struct MemoryResources {
    current: RwLock<Arc<ResourceSet>>,
    /// Held while a change is planned and published.
    write: Mutex<()>,
    revision: watch::Sender<u64>,
}

impl MemoryResources {
    pub fn new() -> MemoryResources {
        MemoryResources::default()
    }

    fn change<T>(
        &self,
        change: impl FnOnce(&mut ResourceSet) -> Result<T, LedgerError>,
    ) -> Result<T, LedgerError> {
        let _guard = self
            .write
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut next = (*self.snapshot()).clone();
        let answer = change(&mut next)?;
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(next);
        self.revision.send_modify(|r| *r += 1);
        Ok(answer)
    }
}

impl ResourceStore for MemoryResources {
    fn apply(
        &self,
        manifest: Manifest,
        mode: ApplyMode,
    ) -> BoxFuture<'_, Result<Applied, LedgerError>> {
        let result = self.change(|set| {
            let (stored, action) = set.plan_apply(manifest, mode, Timestamp::now())?;
            set.insert(stored.clone())?;
            // Shown as the set now holds it (a binding's phase depends on the others).
            Ok(Applied {
                action,
                manifest: set.shown(&stored),
            })
        });
        Box::pin(std::future::ready(result))
    }

    fn delete(&self, key: ResourceKey) -> BoxFuture<'_, Result<(), LedgerError>> {
        let result = self.change(|set| {
            set.plan_delete(&key)?;
            set.remove(&key);
            Ok(())
        });
        Box::pin(std::future::ready(result))
    }

    fn snapshot(&self) -> Arc<ResourceSet> {
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }
}

/// Applies a watched manifest to `store`; catalog kinds (meter definitions,
/// resource types), which only a ledger keeps, are skipped.
fn apply_to(store: Arc<dyn ResourceStore>) -> Apply {
    Arc::new(move |manifest: Manifest, kind: Kind| {
        let store = Arc::clone(&store);
        Box::pin(async move {
            if kind.class() == KindClass::Catalog {
                tracing::debug!(%kind, name = %manifest.metadata.name, "not kept by tally export");
                return Ok(());
            }
            store
                .apply(manifest, ApplyMode::Upsert)
                .await
                .map(drop)
                .map_err(|e| Problem::from(e).detail)
        })
    })
}

/// What the export API's handlers share.
#[derive(Clone)]
struct ExportState {
    telemetry: Telemetry,
    pipeline: Arc<Pipeline>,
    resources: Arc<dyn ResourceStore>,
    status: Arc<exporters::ExporterStatusSource>,
    auth: Arc<Authenticator>,
    requests: Arc<Mutex<RequestCounts>>,
    registry: Registry,
    vital: crate::VitalTasks,
    /// What the HTTP listener counts (`tally_http_connections_*`).
    connections: tally_http::ConnectionStats,
}

impl FromRef<ExportState> for Telemetry {
    fn from_ref(state: &ExportState) -> Telemetry {
        state.telemetry.clone()
    }
}

fn router(state: ExportState) -> Router {
    let max_body_bytes = state.telemetry.max_body_bytes;
    let api = Router::new()
        .route("/v1/metrics", post(telemetry::otlp_metrics))
        .route("/v1/logs", post(crate::signals::otlp_logs))
        .route("/v1/traces", post(crate::signals::otlp_traces))
        .route("/api/v1/write", post(telemetry::remote_write))
        .route("/apis/{plural}", get(list))
        .route("/apis/{plural}/{namespace}/{name}", get(get_one))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state.auth),
            crate::authenticate,
        ));
    let app = Router::new()
        .merge(api)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(|| async {
            Problem::new(
                StatusCode::NOT_FOUND,
                "no such endpoint: tally export serves /v1/metrics, /api/v1/write, /apis/exporters, /metrics, /healthz and /readyz",
            )
        });
    crate::with_error_layers(app)
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state.requests),
            crate::count_requests,
        ))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(
            max_body_bytes,
            body::refuse_announced_oversize,
        ))
        .with_state(state)
}

/// The [`crate::VitalTasks`] name of the manifest directories' watcher.
const WATCHER_TASK: &str = "the manifest watcher";

/// Liveness: the pipeline's follower and the manifest watcher run.
async fn healthz(State(state): State<ExportState>) -> Response {
    crate::health(state.vital.ended())
}

/// Only Exporters are served; anything else is not kept here.
fn exporters_only(plural: &str) -> Result<(), Problem> {
    match plural.parse::<Kind>() {
        Ok(Kind::Exporter) => Ok(()),
        _ => Err(Problem::new(
            StatusCode::NOT_FOUND,
            format!("tally export serves only /apis/exporters, not /apis/{plural}"),
        )),
    }
}

impl ExportState {
    /// The exporter as the caller may see it (with its status), or `None`.
    fn shown(
        &self,
        principal: &Principal,
        set: &ResourceSet,
        manifest: &Manifest,
    ) -> Option<Manifest> {
        let project = manifest
            .metadata
            .namespace
            .as_deref()
            .map(|ns| set.project_of_namespace(ns));
        if !principal.may_read(Kind::Exporter, project.as_deref()) {
            return None;
        }
        let mut shown = set.shown(manifest);
        if let Some(status) = self.status.status(&shown) {
            shown.status = Some(status);
        }
        Some(shown)
    }
}

async fn list(
    State(state): State<ExportState>,
    Extension(principal): Extension<Principal>,
    Path(plural): Path<String>,
    Query(params): Query<ListParams>,
) -> Result<Json<Value>, Problem> {
    exporters_only(&plural)?;
    let set = state.resources.snapshot();
    let items: Vec<Manifest> = set
        .list(Kind::Exporter, params.namespace.as_deref())
        .filter_map(|m| state.shown(&principal, &set, m))
        .collect();
    Ok(Json(
        json!({"apiVersion": "v1", "kind": "List", "items": items}),
    ))
}

async fn get_one(
    State(state): State<ExportState>,
    Extension(principal): Extension<Principal>,
    Path((plural, namespace, name)): Path<(String, String, String)>,
) -> Result<Json<Manifest>, Problem> {
    exporters_only(&plural)?;
    let set = state.resources.snapshot();
    let key = ResourceKey::new(Kind::Exporter, Some(&namespace), &name);
    set.get(&key)
        .and_then(|m| state.shown(&principal, &set, m))
        .map(Json)
        .ok_or_else(|| Problem::new(StatusCode::NOT_FOUND, format!("{key} not found")))
}

async fn metrics(State(state): State<ExportState>) -> impl IntoResponse {
    let mut out = state.registry.render();
    crate::render_requests(&state.requests, &mut out);
    state.connections.render(&mut out);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

async fn readyz(State(state): State<ExportState>) -> Response {
    crate::readiness(
        state.pipeline.ready(),
        "the exporters' pipeline is not running",
    )
}

/// Runs `tally export` until SIGINT or SIGTERM.
pub async fn export(config: ExportConfig) -> anyhow::Result<()> {
    let egress = config.egress.policy()?;
    let limits = config
        .http
        .limits()
        .context("the configuration's http section")?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data dir {}", config.data_dir.display()))?;
    let auth = Arc::new(
        Authenticator::new(config.token.as_deref(), &config.tokens)
            .map_err(|e| anyhow::anyhow!("tokens: {e}"))?,
    );
    let resources: Arc<dyn ResourceStore> = Arc::new(MemoryResources::new());
    // The directories are read once before anything runs, so the first
    // pipeline already has every exporter they declare.
    let mut watcher = Watcher::new(
        apply_to(Arc::clone(&resources)),
        config.manifest_dirs.clone(),
    );
    watcher.round().await;
    let registry = Registry::new();
    let (pipeline, follower) = exporters::start_pipeline(
        &config.data_dir,
        config.victoria_metrics.as_ref(),
        egress,
        &registry,
        &resources,
    )?;
    let watching = tokio::spawn(watcher.run(POLL_INTERVAL));
    let telemetry = Telemetry {
        pipeline: Some(Arc::clone(&pipeline)),
        max_body_bytes: config.max_body_bytes,
        // `tally export` keeps nothing: instance logs are refused.
        logs: None,
        // Nor does it keep instances' usage.
        usage: None,
    };
    let state = ExportState {
        telemetry: telemetry.clone(),
        pipeline: Arc::clone(&pipeline),
        resources,
        status: Arc::new(exporters::ExporterStatusSource(Arc::clone(&pipeline))),
        auth: Arc::clone(&auth),
        requests: Arc::default(),
        registry,
        vital: crate::VitalTasks::default(),
        connections: tally_http::ConnectionStats::new(),
    };
    state.vital.add(crate::EXPORTERS_TASK, follower);
    state.vital.add(WATCHER_TASK, watching);
    let vital = state.vital.clone();
    let listeners = crate::Listeners::open(
        "tally export",
        config.listen,
        config.grpc_listen,
        telemetry,
        auth,
        &config.data_dir,
    )
    .await?;
    tracing::info!(address = %listeners.address, data_dir = %config.data_dir.display(),
        pulling = config.victoria_metrics.is_some(), "exporting");
    let stats = state.connections.clone();
    listeners.serve(router(state), limits, stats).await;
    for task in [WATCHER_TASK, crate::EXPORTERS_TASK] {
        if let Some(task) = vital.take(task) {
            task.abort();
        }
    }
    pipeline.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_memory_store_applies_the_same_rules() {
        let store = MemoryResources::new();
        let mut changes = store.subscribe();
        let secret = |ns: &str| {
            Manifest::parse_documents(&format!(
                "apiVersion: v1\nkind: Secret\nmetadata: {{name: s{ns}}}\nstringData: {{k: v}}\n"
            ))
            .unwrap()
            .remove(0)
        };
        // A Secret needs a namespace, as in every store.
        assert!(store.apply(secret(""), ApplyMode::Upsert).await.is_err());
        let mut ok = secret("");
        ok.metadata.namespace = Some("web".into());
        let applied = store.apply(ok, ApplyMode::Upsert).await.unwrap();
        // Shown redacted.
        assert!(
            !serde_json::to_string(&applied.manifest)
                .unwrap()
                .contains("\"v\"")
        );
        assert!(changes.has_changed().unwrap());
        changes.borrow_and_update();
        let key = ResourceKey::new(Kind::Secret, Some("web"), "s");
        assert!(store.snapshot().get(&key).is_some());
        store.delete(key.clone()).await.unwrap();
        assert!(store.snapshot().get(&key).is_none());
        assert!(changes.has_changed().unwrap());
    }
}
