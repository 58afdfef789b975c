//! Tally's HTTP API over any [`Ledger`].
//!
//! Routes: the OpenMeter-compatible `/api/v1/events` and `/api/v1/meters`
//! (and `/api/v1/meters/{slug}/validate`), resources under `/apis`,
//! `/api/v1/quarantine`, the web [`console`] at `/`, `/metrics`, `/healthz`,
//! `/readyz` and `/openapi.json` (generated from the handlers' annotations);
//! the metrics receivers (`/v1/metrics`, `/api/v1/write`, and OTLP/gRPC on
//! its own listener). [`export`] is `tally export`: the exporters' pipeline
//! alone, without a ledger.
//!
//! **Never:** open a store: [`serve`] runs on the [`Backend`] (ledger,
//! resource store, vital tasks) that the `tally` binary chose and opened.

mod auth;
mod backpressure;
pub mod billing;
mod binary;
mod body;
pub mod compute;
mod config;
pub mod console;
mod events;
pub mod export;
mod exporters;
pub mod fleet_push;
mod grpc;
pub mod instance_logs;
mod logs_api;
mod meters;
mod problem;
mod promql;
mod query;
mod resources;
mod schemas;
mod signals;
mod subjects;
mod telemetry;
mod unserved;
mod usage;
mod validate;
mod watch;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use axum::extract::{DefaultBodyLimit, FromRef, MatchedPath, RawQuery, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use tally_delivery::{ComponentKind, Registry};
use tally_ledger::{Ledger, QuarantineFilter, QuarantinePage, ResourceStore};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use utoipa::OpenApi;

pub use auth::{Principal, Scope, TokenConfig};
pub use backpressure::DEFAULT_INGEST_WAIT;
/// Request bodies as every route reads them: `Content-Encoding` (gzip,
/// zstd or none) decoded, refused past a limit after decompression.
pub use body::decode as decode_request_body;
pub use config::{
    BillingServeConfig, ClusterConfig, ExportConfig, ServeConfig, VictoriaMetricsConfig,
};
pub use problem::Problem;
pub use resources::StatusSource;

/// HTTP request counts by (method, route, status).
type RequestCounts = BTreeMap<(String, String, u16), u64>;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub ledger: Arc<dyn Ledger>,
    pub max_body_bytes: usize,
    auth: Arc<auth::Authenticator>,
    requests: Arc<Mutex<RequestCounts>>,
    /// Events accepted by a handler and not yet answered by the ledger.
    pending_events: Arc<Semaphore>,
    max_pending_events: usize,
    /// How long `/api/v1/events` waits for room in the ledger's backlog.
    ingest_wait: std::time::Duration,
    /// Every kind outside the meter catalog; `None`: only the catalog is kept.
    resources: Option<Arc<dyn ResourceStore>>,
    status_sources: Arc<Vec<Arc<dyn StatusSource>>>,
    /// The components running in this process (`tally_component_*`).
    registry: Registry,
    /// The ledger's (received, stored) totals already added to its component.
    ledger_seen: Arc<Mutex<(u64, u64)>>,
    /// The exporters' pipeline fed by `/v1/metrics` and `/api/v1/write`.
    telemetry: Option<Arc<tally_telemetry::Pipeline>>,
    /// Instance logs (`instance_logs`, `logs_api`); `None`: not kept.
    logs: Option<instance_logs::InstanceLogs>,
    /// The billing forwarder's runtime, when it runs in this server.
    billing: Option<tally_billing::runtime::BillingHandle>,
    /// Instance lifecycle events (`/api/v1/instances`), when kept.
    compute: Option<compute::Compute>,
    /// The VictoriaMetrics answering the Prometheus query API, if configured.
    metrics_query: Option<promql::MetricsQuery>,
    /// What the HTTP listener counts (`tally_http_connections_*`).
    connections: tally_http::ConnectionStats,
    /// Background tasks the process cannot do its job without.
    vital: VitalTasks,
}

/// Background tasks whose end, before the process is asked to stop, means
/// it can no longer do its job: `/healthz` fails once one has ended, so an
/// orchestrator restarts the process.
///
/// **Never:** register a task a tenant can end (a customer's exporter sink):
/// a tenant must not be able to fail the process's health.
#[derive(Clone, Default)]
pub(crate) struct VitalTasks(Arc<Mutex<Vec<VitalTask>>>);

/// A vital task: its name for `/healthz`, and its handle.
pub type VitalTask = (&'static str, tokio::task::JoinHandle<()>);

impl VitalTasks {
    /// Watches `task`, named for `/healthz` (e.g. "the billing forwarder").
    pub(crate) fn add(&self, name: &'static str, task: tokio::task::JoinHandle<()>) {
        if let Ok(mut tasks) = self.0.lock() {
            tasks.push((name, task));
        }
    }

    /// The names of the tasks that have ended.
    fn ended(&self) -> Vec<&'static str> {
        self.0.lock().map_or_else(
            |_| vec!["the task registry"],
            |tasks| {
                tasks
                    .iter()
                    .filter(|(_, t)| t.is_finished())
                    .map(|(name, _)| *name)
                    .collect()
            },
        )
    }

    /// Takes the task named `name` out, to stop it.
    fn take(&self, name: &str) -> Option<tokio::task::JoinHandle<()>> {
        let mut tasks = self.0.lock().ok()?;
        let at = tasks.iter().position(|(n, _)| *n == name)?;
        Some(tasks.remove(at).1)
    }
}

impl AppState {
    pub fn new(ledger: Arc<dyn Ledger>, max_body_bytes: usize, token: Option<String>) -> AppState {
        AppState {
            ledger,
            max_body_bytes,
            // An admin token alone cannot be refused.
            auth: Arc::new(auth::Authenticator::new(token.as_deref(), &[]).unwrap_or_default()),
            requests: Arc::default(),
            pending_events: Arc::new(Semaphore::new(DEFAULT_MAX_PENDING_EVENTS)),
            max_pending_events: DEFAULT_MAX_PENDING_EVENTS,
            ingest_wait: DEFAULT_INGEST_WAIT,
            resources: None,
            status_sources: Arc::default(),
            registry: Registry::new(),
            ledger_seen: Arc::default(),
            telemetry: None,
            logs: None,
            billing: None,
            compute: None,
            metrics_query: None,
            vital: VitalTasks::default(),
            connections: tally_http::ConnectionStats::new(),
        }
    }

    /// Shares `registry` with the components wired into this server, so
    /// `/metrics` shows every `tally_component_*` of the process.
    pub fn with_registry(mut self, registry: Registry) -> AppState {
        self.registry = registry;
        self
    }

    /// The registry `/metrics` renders.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Serves the billing API (`/api/v1/billing/*`) and metrics from
    /// `handle`, and shows each BillingSink's forwarding status.
    pub fn with_billing(self, handle: tally_billing::runtime::BillingHandle) -> AppState {
        let mut state = self.with_status_source(Arc::new(handle.clone()));
        state.billing = Some(handle);
        state
    }

    /// Keeps the resources outside the meter catalog (billing, exporters,
    /// secrets, namespaces, platform resources) in `store`.
    /// Serves instance lifecycle events from `compute`.
    pub fn with_compute(mut self, compute: compute::Compute) -> AppState {
        self.compute = Some(compute);
        self
    }

    /// Answers the Prometheus query API from the VictoriaMetrics at `url`.
    pub fn with_metrics_query(mut self, url: &str) -> anyhow::Result<AppState> {
        self.metrics_query = Some(promql::MetricsQuery::new(url)?);
        Ok(self)
    }

    pub fn with_resources(mut self, store: Arc<dyn ResourceStore>) -> AppState {
        self.resources = Some(store);
        self
    }

    /// Adds a source of runtime status (e.g. exporter health) shown on
    /// resources.
    pub fn with_status_source(mut self, source: Arc<dyn StatusSource>) -> AppState {
        let mut sources = (*self.status_sources).clone();
        sources.push(source);
        self.status_sources = Arc::new(sources);
        self
    }

    /// Feeds the metrics receivers (`/v1/metrics`, `/api/v1/write`) into
    /// `pipeline`, and shows its counters on `/metrics`: the pipeline's
    /// registry becomes the server's (build the pipeline with
    /// [`AppState::registry`] to share one).
    /// Keeps instance logs in `logs` (OTLP logs with an `instance`
    /// resource attribute) and serves them.
    pub fn with_logs(mut self, logs: instance_logs::InstanceLogs) -> AppState {
        self.logs = Some(logs);
        self
    }

    pub fn with_telemetry(mut self, pipeline: Arc<tally_telemetry::Pipeline>) -> AppState {
        self.registry = pipeline.registry().clone();
        self.telemetry = Some(pipeline);
        self
    }

    /// Adds scoped tokens (the serve config's `tokens:`) to the admin token.
    pub fn with_tokens(
        mut self,
        admin_token: Option<&str>,
        tokens: &[TokenConfig],
    ) -> Result<AppState, String> {
        self.auth = Arc::new(auth::Authenticator::new(admin_token, tokens)?);
        Ok(self)
    }

    /// Sets how many events may wait for the ledger at once; beyond that the
    /// platform contract answers `429` and the OpenMeter API waits.
    pub fn with_max_pending_events(mut self, max: usize) -> AppState {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        self.pending_events = Arc::new(Semaphore::new(max));
        self.max_pending_events = max;
        self
    }

    fn permits(&self, events: usize) -> u32 {
        // A request larger than the whole budget takes all of it, alone.
        u32::try_from(events.clamp(1, self.max_pending_events)).unwrap_or(u32::MAX)
    }

    /// Admits `events` events now, or `None` when the ledger is saturated.
    fn try_admit(&self, events: usize) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.pending_events)
            .try_acquire_many_owned(self.permits(events))
            .ok()
    }

    /// Admits `events` events, waiting for room.
    async fn admit(&self, events: usize) -> Result<OwnedSemaphorePermit, Problem> {
        Arc::clone(&self.pending_events)
            .acquire_many_owned(self.permits(events))
            .await
            .map_err(|_| Problem::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"))
    }
}

/// Default of [`AppState::with_max_pending_events`].
pub const DEFAULT_MAX_PENDING_EVENTS: usize = 262_144;

#[derive(OpenApi)]
#[openapi(
    info(title = "Tally", description = "Usage metering: CloudEvents ingest with exact dedupe, meters and windowed queries (OpenMeter-compatible)."),
    paths(
        events::ingest, events::list, events::list_v2, events::void, events::voids, usage::ingest_one, usage::ingest_batch,
        meters::list, meters::get, meters::create, meters::update, meters::delete, meters::query, meters::query_post,
        meters::group_by_values, meters::subjects, subjects::list, subjects::get, validate::validate,
        resources::apply, resources::list, resources::get, resources::put, resources::delete,
        resources::get_namespaced, resources::put_namespaced, resources::delete_namespaced,
        quarantine, metrics, healthz, readyz, telemetry::otlp_metrics, telemetry::remote_write,
        signals::otlp_logs, signals::otlp_traces,
        logs_api::instance_logs, logs_api::loki_query_range, logs_api::loki_labels, logs_api::loki_label_values, logs_api::loki_tail,
        compute::ingest, compute::list, compute::events,
        promql::query_get, promql::query_post, promql::range_get, promql::range_post,
        promql::labels_get, promql::labels_post, promql::series_get, promql::series_post, promql::label_values,
        billing::status, billing::dead_letters, billing::retry_dead_letter, billing::retry_all_dead_letters, billing::reconcile, billing::changes,
    ),
    components(schemas(schemas::Meter, schemas::MeterCreate, schemas::MeterUpdate, schemas::MeterAggregation,
        schemas::WindowSize, schemas::MeterQueryRequest, schemas::MeterQueryResult, schemas::MeterQueryRow,
        schemas::Event, schemas::VoidRecord, schemas::IngestedEvent, schemas::IngestedEventPage,
        schemas::QuarantineNotice, schemas::IngestOutcome, schemas::Subject,
        schemas::FieldProblem, schemas::EventProblem, schemas::ObjectMeta, schemas::Resource,
        schemas::ResourceList, schemas::VoidOutcome, schemas::VoidPage, schemas::QuarantinedEvent,
        schemas::StoredEvent, schemas::QuarantinePage,
        billing::BillingStatus, billing::DeadLetters, billing::Reconciliation, Problem, resources::ApplyResult, resources::ApplyResults, usage::UsageAnswer, usage::Rejected, events::VoidBody,
        compute::LifecycleIngested, schemas::InstancePage, schemas::InstanceSummary, schemas::LifecycleEventPage, schemas::LifecycleEvent)),
    modifiers(&BearerAuth, &UnservedDocument),
)]
struct ApiDoc;

use unserved::Document as UnservedDocument;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

/// The OpenAPI document of this API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The router, for embedding and tests.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/api/v1/events", post(events::ingest).get(events::list))
        .route("/api/v1/events/void", post(events::void))
        .route("/api/v1/events/voids", get(events::voids))
        .route("/v1/usage/events", post(usage::ingest_one))
        .route("/v1/usage/events:batchIngest", post(usage::ingest_batch))
        .route("/api/v2/events", get(events::list_v2))
        .route("/api/v1/meters", get(meters::list).post(meters::create))
        .route(
            "/api/v1/meters/{slug}",
            get(meters::get).put(meters::update).delete(meters::delete),
        )
        .route(
            "/api/v1/meters/{slug}/query",
            get(meters::query).post(meters::query_post),
        )
        .route(
            "/api/v1/meters/{slug}/group-by/{key}/values",
            get(meters::group_by_values),
        )
        .route("/api/v1/meters/{slug}/subjects", get(meters::subjects))
        .route(
            "/api/v1/subjects",
            get(subjects::list).post(unserved::not_served),
        )
        .route(
            "/api/v1/subjects/{key}",
            get(subjects::get).delete(unserved::not_served),
        )
        .route("/api/v1/meters/{slug}/changes", get(billing::changes))
        .route("/api/v1/meters/{slug}/validate", get(validate::validate))
        .route("/api/v1/billing/status", get(billing::status))
        .route("/api/v1/billing/deadletters", get(billing::dead_letters))
        .route(
            "/api/v1/billing/deadletters/{sink}/{id}/retry",
            post(billing::retry_dead_letter),
        )
        .route(
            "/api/v1/billing/deadletters/{sink}/retry",
            post(billing::retry_all_dead_letters),
        )
        .route("/api/v1/billing/reconcile", get(billing::reconcile))
        .route("/api/v1/quarantine", get(quarantine))
        .route("/api/v1/instances", get(compute::list))
        .route("/api/v1/instances/events", post(compute::ingest))
        .route("/api/v1/instances/{instance}/events", get(compute::events))
        .route(
            "/api/v1/query",
            get(promql::query_get).post(promql::query_post),
        )
        .route(
            "/api/v1/query_range",
            get(promql::range_get).post(promql::range_post),
        )
        .route(
            "/api/v1/labels",
            get(promql::labels_get).post(promql::labels_post),
        )
        .route(
            "/api/v1/series",
            get(promql::series_get).post(promql::series_post),
        )
        .route("/api/v1/label/{name}/values", get(promql::label_values))
        .route("/v1/metrics", post(telemetry::otlp_metrics))
        .route("/v1/logs", post(signals::otlp_logs))
        .route("/v1/traces", post(signals::otlp_traces))
        .route("/api/v1/write", post(telemetry::remote_write))
        .route("/apis/apply", post(resources::apply))
        .route("/apis/{plural}", get(resources::list))
        .route(
            "/apis/{plural}/{name}",
            get(resources::get)
                .put(resources::put)
                .delete(resources::delete),
        )
        .route(
            "/apis/{plural}/{namespace}/{name}",
            get(resources::get_namespaced)
                .put(resources::put_namespaced)
                .delete(resources::delete_namespaced),
        )
        .route(
            "/api/v1/projects/{project}/instances/{instance}/logs",
            get(logs_api::instance_logs),
        )
        .route("/loki/api/v1/query_range", get(logs_api::loki_query_range))
        .route("/loki/api/v1/labels", get(logs_api::loki_labels))
        .route("/loki/api/v1/tail", get(logs_api::loki_tail))
        .route(
            "/loki/api/v1/label/{name}/values",
            get(logs_api::loki_label_values),
        )
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json));
    let api = unserved::FAMILIES
        .iter()
        .fold(api, |api, (prefix, _)| {
            api.route(prefix, any(unserved::not_served))
                .route(&format!("{prefix}/{{*rest}}"), any(unserved::not_served))
        })
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state.auth),
            authenticate,
        ));
    let app = Router::new()
        .merge(api)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(console::routes())
        .fallback(|| async {
            Problem::new(StatusCode::NOT_FOUND, "no such endpoint; see /openapi.json")
        });
    with_error_layers(app)
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state.requests),
            count_requests,
        ))
        // Compressed bodies may expand; the decoded size is checked again in `body::decode`.
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            state.max_body_bytes,
            body::refuse_announced_oversize,
        ))
        .with_state(state)
}

/// What every router of a server process wraps itself in: every error is
/// problem+json, and a panicking handler answers 500 instead of dropping
/// the connection.
fn with_error_layers<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    router
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            problem::panic_answer,
        ))
        .layer(middleware::from_fn(problem::problem_json_errors))
}

async fn authenticate(
    State(auth): State<Arc<auth::Authenticator>>,
    mut request: Request,
    next: Next,
) -> Response {
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("", MatchedPath::as_str);
    match auth.check(bearer, request.method(), route) {
        Ok(principal) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Err(problem) => {
            let unauthorized = problem.status == StatusCode::UNAUTHORIZED;
            let mut response = problem.into_response();
            if unauthorized {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
            }
            response
        }
    }
}

async fn count_requests(
    State(requests): State<Arc<Mutex<RequestCounts>>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().to_string();
    let response = next.run(request).await;
    if let Ok(mut counts) = requests.lock() {
        *counts
            .entry((method, route, response.status().as_u16()))
            .or_default() += 1;
    }
    response
}

/// Quarantined events: stored, but not measurable by a meter yet, with the reason.
#[utoipa::path(get, path = "/api/v1/quarantine", tag = "events",
    params(("meter" = Option<String>, Query, description = "Only this meter (empty string: events no meter reads)"),
           ("limit" = Option<usize>, Query, description = "Page size"),
           ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page")),
    responses((status = 200, description = "A page of quarantined events", body = crate::schemas::QuarantinePage)))]
async fn quarantine(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Json<QuarantinePage>, Problem> {
    let p = query::Params::parse(raw.as_deref())?;
    p.only(&["meter", "limit", "cursor"])?;
    let filter = QuarantineFilter {
        meter: p.one("meter")?,
        limit: p.number("limit")?.unwrap_or(100),
        cursor: p.one("cursor")?,
    };
    Ok(Json(state.ledger.list_quarantine(filter).await?))
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let s = state.ledger.stats();
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, kind: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    counter(
        "tally_events_accepted_total",
        "Events stored.",
        "counter",
        s.events_accepted_total,
    );
    counter(
        "tally_events_duplicate_total",
        "Events acknowledged as duplicates of stored events (same source and id).",
        "counter",
        s.events_duplicate_total,
    );
    counter(
        "tally_events_quarantined_total",
        "Event-meter pairs put in quarantine.",
        "counter",
        s.events_quarantined_total,
    );
    counter(
        "tally_group_commits_total",
        "Durable group commits of the ledger.",
        "counter",
        s.group_commits_total,
    );
    counter(
        "tally_store_disk_bytes",
        "Bytes the store occupies on disk, its journal included.",
        "gauge",
        s.disk_bytes,
    );
    counter(
        "tally_store_journal_bytes",
        "Bytes of the store's write-ahead journal (part of tally_store_disk_bytes; bounded, given back as memtables flush).",
        "gauge",
        s.journal_bytes,
    );
    counter(
        "tally_materialise_lag_events",
        "Acknowledged events not yet materialised into rollups (queries count them all the same).",
        "gauge",
        s.materialise_lag_events,
    );
    let _ = writeln!(
        out,
        "# HELP tally_materialise_lag_seconds Age of the oldest acknowledged event not yet materialised.\n# TYPE tally_materialise_lag_seconds gauge\ntally_materialise_lag_seconds {:.3}",
        s.materialise_lag_seconds
    );
    let _ = writeln!(
        out,
        "# HELP tally_store_insert_errors_total Failed inserts into the derived store (ClickHouse on a cluster), by table and reason.\n# TYPE tally_store_insert_errors_total counter"
    );
    for (table, reasons) in &s.insert_errors {
        for (reason, n) in reasons {
            let _ = writeln!(
                out,
                "tally_store_insert_errors_total{{table=\"{table}\",reason=\"{reason}\"}} {n}"
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP tally_resources Resources in the catalog.\n# TYPE tally_resources gauge"
    );
    for (kind, n) in &s.kinds {
        let _ = writeln!(out, "tally_resources{{kind=\"{kind}\"}} {n}");
    }
    // The ledger is a component too: received = stored + duplicates.
    if let Ok(mut seen) = state.ledger_seen.lock() {
        let ledger = state.registry.component(ComponentKind::Sink, "ledger");
        let received = s.events_accepted_total + s.events_duplicate_total;
        ledger.add_received(received.saturating_sub(seen.0));
        ledger.add_sent(s.events_accepted_total.saturating_sub(seen.1));
        *seen = (received.max(seen.0), s.events_accepted_total.max(seen.1));
    }
    out.push_str(&state.registry.render());
    if let Some(billing) = &state.billing {
        out.push_str(&billing.render_status_metrics());
    }
    if let Some(logs) = &state.logs {
        render_log_store(&logs.store.stats(), &mut out);
    }
    if let Some(compute) = &state.compute {
        compute.render_metrics(&mut out);
    }
    render_requests(&state.requests, &mut out);
    state.connections.render(&mut out);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

/// The instance log store's gauges and counters.
fn render_log_store(s: &tally_logstore::Stats, out: &mut String) {
    for (name, help, kind, value) in [
        (
            "tally_logs_disk_bytes",
            "Bytes the instance log store occupies on disk.",
            "gauge",
            s.disk_bytes,
        ),
        (
            "tally_logs_raw_bytes",
            "Bytes of raw text of the instance log lines retained.",
            "gauge",
            s.raw_bytes,
        ),
        (
            "tally_logs_block_bytes",
            "Bytes of the compressed blocks holding the retained lines.",
            "gauge",
            s.block_bytes,
        ),
        (
            "tally_logs_lines",
            "Instance log lines retained.",
            "gauge",
            s.lines,
        ),
        (
            "tally_logs_appended_lines_total",
            "Instance log lines stored.",
            "counter",
            s.appended_lines,
        ),
        (
            "tally_logs_duplicate_lines_total",
            "Instance log records not stored again: their record id was stored.",
            "counter",
            s.duplicates,
        ),
        (
            "tally_logs_truncated_lines_total",
            "Instance log lines cut to the longest line kept.",
            "counter",
            s.truncated,
        ),
        (
            "tally_logs_swept_blocks_total",
            "Blocks deleted past their project's retention.",
            "counter",
            s.swept_blocks,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
}

/// `tally_http_requests_total`.
fn render_requests(requests: &Mutex<RequestCounts>, out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP tally_http_requests_total HTTP requests by method, route and status.\n# TYPE tally_http_requests_total counter"
    );
    if let Ok(counts) = requests.lock() {
        for ((method, route, status), n) in counts.iter() {
            let _ = writeln!(
                out,
                "tally_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
    }
}

/// Liveness: this process can do its job. Fails (503) once the ledger's
/// writer, the exporters' pipeline or the billing forwarder has stopped, so
/// an orchestrator restarts the process.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive"), (status = 503, description = "A vital part has stopped", body = Problem, content_type = "application/problem+json")))]
async fn healthz(State(state): State<AppState>) -> Response {
    let mut stopped = state.vital.ended();
    if !state.ledger.ready() {
        stopped.insert(0, "the ledger's writer");
    }
    health(stopped)
}

/// `/healthz`'s answer: `ok`, or `503` naming what has `stopped`.
fn health(stopped: Vec<&'static str>) -> Response {
    if stopped.is_empty() {
        "ok\n".into_response()
    } else {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stopped: {}; restart the process", stopped.join(", ")),
        )
        .into_response()
    }
}

/// Readiness: the ledger takes writes.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "Ready"), (status = 503, description = "Not ready", body = Problem, content_type = "application/problem+json")))]
async fn readyz(State(state): State<AppState>) -> Response {
    readiness(state.ledger.ready(), "the ledger's writer has stopped")
}

/// `/readyz`'s answer: `ready`, or `503` saying why not.
fn readiness(ready: bool, why_not: &'static str) -> Response {
    if ready {
        "ready\n".into_response()
    } else {
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, why_not).into_response()
    }
}

async fn openapi_json() -> Response {
    match openapi().to_pretty_json() {
        Ok(text) => ([(header::CONTENT_TYPE, "application/json")], text).into_response(),
        Err(e) => Problem::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Serves the API on a bound listener, under the default HTTP limits,
/// until the process ends.
pub async fn serve_on(listener: tokio::net::TcpListener, state: AppState) {
    let server = tally_http::Server::new(tally_http::Limits::default(), problem::body_timed_out)
        .with_stats(state.connections.clone());
    server
        .serve(listener, router(state), std::future::pending())
        .await;
}

/// [`VitalTasks`] names of `tally serve`'s background tasks.
const EXPORTERS_TASK: &str = "the exporters' pipeline";
const BILLING_TASK: &str = "the billing forwarder";

/// What `tally serve` runs on: the backend the binary chose and opened.
/// The server never opens a store itself, so it depends on no backend.
pub struct Backend {
    pub ledger: Arc<dyn Ledger>,
    pub resources: Arc<dyn ResourceStore>,
    /// The backend's background tasks (name for `/healthz`, task) whose end
    /// means this process can no longer do its job, e.g. a watch of shared
    /// resources; `/healthz` fails once one has ended.
    pub vital: Vec<VitalTask>,
    /// Where instance lifecycle events live; `None`: the embedded store in
    /// the data directory.
    pub lifecycle: Option<Arc<dyn tally_compute::LifecycleEvents>>,
    /// Where instance logs live (when `logs.enabled`); `None`: the
    /// embedded store in the data directory.
    pub logs: Option<Arc<dyn tally_logstore::LogStore>>,
}

/// Runs `tally serve` on `backend` until SIGINT or SIGTERM. `config.data_dir`
/// holds this process's own state (billing progress, exporter queues).
pub async fn serve(config: ServeConfig, backend: Backend) -> anyhow::Result<()> {
    let egress = config.egress.policy()?;
    let limits = config
        .http
        .limits()
        .context("the configuration's http section")?;
    config.check()?;
    let Backend {
        ledger,
        resources,
        vital: backend_tasks,
        lifecycle,
        logs: logs_store,
    } = backend;
    let registry = Registry::new();
    let (pipeline, exporters) = exporters::start_pipeline(
        &config.data_dir,
        config.victoria_metrics.as_ref(),
        egress.clone(),
        &registry,
        &resources,
    )?;
    let billing_dir = config.data_dir.join("billing");
    let (stop_billing, billing_stopped) = tokio::sync::watch::channel(false);
    let billing = config.billing.enabled.then(|| {
        billing::start(
            Arc::clone(&ledger),
            Arc::clone(&resources),
            billing::BillingOptions {
                dir: billing_dir,
                pass_interval: config.billing.pass_interval(),
                registry: registry.clone(),
                egress,
            },
            billing_stopped,
        )
    });
    let mut state = AppState::new(ledger, config.max_body_bytes, None)
        .with_registry(registry)
        .with_resources(resources)
        .with_telemetry(Arc::clone(&pipeline))
        .with_status_source(Arc::new(exporters::ExporterStatusSource(Arc::clone(
            &pipeline,
        ))))
        .with_status_source(Arc::new(exporters::PolicyStatusSource(Arc::clone(
            &pipeline,
        ))))
        .with_tokens(config.token.as_deref(), &config.tokens)
        .map_err(|e| anyhow::anyhow!("tokens: {e}"))?
        .with_max_pending_events(config.max_pending_events)
        .with_ingest_wait(config.ingest_wait());
    state.vital.add(EXPORTERS_TASK, exporters);
    let mut sweeper = None;
    if config.logs.enabled {
        let (logs, task) = open_logs(&config, logs_store).await?;
        state = state.with_logs(logs);
        sweeper = Some(task);
    }
    let compute = match lifecycle {
        Some(store) => compute::Compute::new(store),
        None => compute::Compute::open(&config.data_dir.join("compute")).with_context(|| {
            format!(
                "opening the lifecycle store in {}",
                config.data_dir.display()
            )
        })?,
    };
    state = state.with_compute(compute.clone());
    let mut fleet_push = None;
    if let Some(vm) = &config.victoria_metrics {
        state = state.with_metrics_query(&vm.url)?;
        if let Some(push) = vm.fleet_push()? {
            fleet_push = Some(fleet_push::start(compute.clone(), push, state.registry())?);
        }
    }
    let derive = tokio::spawn(compute::derive_from_instances(state.clone(), compute));
    for (name, task) in backend_tasks {
        state.vital.add(name, task);
    }
    if let Some((handle, task)) = billing {
        state = state.clone().with_billing(handle);
        state.vital.add(BILLING_TASK, task);
    }
    let listeners = Listeners::open(
        "tally",
        config.listen,
        config.grpc_listen,
        telemetry::Telemetry::from_ref(&state),
        Arc::clone(&state.auth),
        &config.data_dir,
    )
    .await?;
    tracing::info!(address = %listeners.address, data_dir = %config.data_dir.display(), auth = state.auth.is_enabled(), "serving");
    let watcher = (!config.manifest_dirs.is_empty()).then(|| {
        tokio::spawn(watch::watch(
            state.clone(),
            config.manifest_dirs.clone(),
            watch::POLL_INTERVAL,
        ))
    });
    let vital = state.vital.clone();
    let stats = state.connections.clone();
    listeners.serve(router(state), limits, stats).await;
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    if let Some(sweeper) = sweeper {
        sweeper.abort();
    }
    derive.abort();
    if let Some((sink, task)) = fleet_push {
        task.abort();
        sink.shutdown(std::time::Duration::from_secs(2)).await;
    }
    if let Some(exporters) = vital.take(EXPORTERS_TASK) {
        exporters.abort();
    }
    pipeline.shutdown().await;
    let _ = stop_billing.send(true);
    if let Some(task) = vital.take(BILLING_TASK) {
        let _ = task.await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Opens the instance log store (the embedded one unless the backend gave
/// one) and starts its retention sweeps.
async fn open_logs(
    config: &ServeConfig,
    given: Option<Arc<dyn tally_logstore::LogStore>>,
) -> anyhow::Result<(instance_logs::InstanceLogs, tokio::task::JoinHandle<()>)> {
    let store = match given {
        Some(store) => store,
        None => open_embedded_logs(config).await?,
    };
    let every = std::time::Duration::from_secs(config.logs.sweep_interval_seconds.max(1));
    let sweeping = Arc::clone(&store);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let store = Arc::clone(&sweeping);
            let now = i64::try_from(jiff::Timestamp::now().as_nanosecond()).unwrap_or(i64::MAX);
            match tokio::task::spawn_blocking(move || store.sweep(now)).await {
                Ok(Ok(n)) if n > 0 => {
                    tracing::info!(blocks = n, "instance logs past retention deleted")
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "sweeping instance logs failed; retried at the next sweep")
                }
                Err(e) => tracing::warn!(error = %e, "sweeping instance logs failed"),
            }
        }
    });
    Ok((
        instance_logs::InstanceLogs::new(store, config.logs.limiter()),
        task,
    ))
}

async fn open_embedded_logs(
    config: &ServeConfig,
) -> anyhow::Result<Arc<dyn tally_logstore::LogStore>> {
    let store_config = config.logs.store_config(&config.data_dir);
    let dir = store_config.dir.clone();
    let store =
        tokio::task::spawn_blocking(move || tally_logstore::EmbeddedLogStore::open(store_config))
            .await
            .context("opening the instance log store")?
            .with_context(|| format!("opening the instance log store in {}", dir.display()))?;
    Ok(Arc::new(store))
}

/// The listeners of a server process: HTTP, and OTLP/gRPC when configured.
struct Listeners {
    http: tokio::net::TcpListener,
    /// Where HTTP is served.
    address: std::net::SocketAddr,
    /// The OTLP/gRPC metrics receiver's listener, and what it serves.
    grpc: Option<(
        tokio::net::TcpListener,
        telemetry::Telemetry,
        Arc<auth::Authenticator>,
    )>,
}

impl Listeners {
    /// Binds `listen`, and `grpc_listen` for the OTLP/gRPC metrics receiver
    /// if set; prints the line saying where `program` listens (the only
    /// line on standard output).
    async fn open(
        program: &str,
        listen: std::net::SocketAddr,
        grpc_listen: Option<std::net::SocketAddr>,
        telemetry: telemetry::Telemetry,
        auth: Arc<auth::Authenticator>,
        data_dir: &std::path::Path,
    ) -> anyhow::Result<Listeners> {
        let http = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        let address = http.local_addr().context("reading the listen address")?;
        let mut grpc_line = String::new();
        let grpc = match grpc_listen {
            None => None,
            Some(grpc_listen) => {
                let listener = tokio::net::TcpListener::bind(grpc_listen)
                    .await
                    .with_context(|| format!("listening for OTLP/gRPC on {grpc_listen}"))?;
                let grpc_address = listener
                    .local_addr()
                    .context("reading the gRPC listen address")?;
                grpc_line = format!(" and grpc://{grpc_address}");
                Some((listener, telemetry, auth))
            }
        };
        println!(
            "{program} listening on http://{address}{grpc_line} (data dir {})",
            data_dir.display()
        );
        Ok(Listeners {
            http,
            address,
            grpc,
        })
    }

    /// Serves `app`, and the gRPC receiver, both under `limits` and
    /// counting into `stats`, until SIGINT or SIGTERM; then drains both.
    async fn serve(
        self,
        app: Router,
        limits: tally_http::Limits,
        stats: tally_http::ConnectionStats,
    ) {
        let (stop_grpc, mut stopped) = tokio::sync::watch::channel(false);
        let grpc = self.grpc.map(|(listener, telemetry, auth)| {
            let stopped = async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            tokio::spawn(grpc::serve(
                listener,
                telemetry,
                auth,
                limits,
                stats.clone(),
                stopped,
            ))
        });
        tally_http::Server::new(limits, problem::body_timed_out)
            .with_stats(stats)
            .serve(self.http, app, shutdown_signal())
            .await;
        let _ = stop_grpc.send(true);
        if let Some(task) = grpc
            && let Err(e) = task.await
        {
            tracing::error!(error = %e, "OTLP/gRPC receiver task failed");
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = terminate => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_store_embedded::{EmbeddedLedger, StoreConfig};

    #[tokio::test]
    async fn healthz_fails_once_a_vital_task_has_ended() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = EmbeddedLedger::open(StoreConfig::new(dir.path())).unwrap();
        let state = AppState::new(Arc::new(ledger), 1 << 20, None);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        state.vital.add(
            BILLING_TASK,
            tokio::spawn(async move {
                let _ = stopped.await;
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/healthz", listener.local_addr().unwrap());
        tokio::spawn(serve_on(listener, state));
        let client = tally_delivery::client_builder().build().unwrap();
        assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
        stop.send(()).unwrap();
        let mut last = None;
        for _ in 0..200 {
            let r = client.get(&url).send().await.unwrap();
            if r.status() == 503 {
                last = Some(r);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let r = last.expect("/healthz never failed");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        let body: serde_json::Value = r.json().await.unwrap();
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.contains("the billing forwarder"), "{detail}");
    }
}
