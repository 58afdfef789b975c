//! The billing forwarder inside `tally serve`: its runtime is fed from the
//! resource store (BillingSinks, Secrets, BillingAccounts, bindings) and the
//! ledger's catalog (forwarded meters), and its API is
//! `/api/v1/billing/{status,deadletters,reconcile}` (admin only). The change
//! feed `/api/v1/meters/{slug}/changes` serves `tally forward`. A
//! BillingSink's `status` has a `Ready` condition that is `False` while the
//! provider refuses the sink (`ProviderRejected`), cannot be reached
//! (`ProviderUnreachable`) or the lag passed `maxLag` (`Backlogged`), with
//! `lastTransitionTime` (since when) and `lastError` (status code and
//! Tally's words, never the provider's answer).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use jiff::Timestamp;
use serde::Serialize;
use serde_json::{Value, json};
use tally_billing::runtime::{
    BillingHandle, BillingInputs, BillingRuntime, LoadInputs, RuntimeConfig, RuntimeError,
    SinkDeadLetters, SinkReconciliation, SinkReport,
};
use tally_billing::{LedgerUsageSource, UsageSource};
use tally_delivery::{EgressPolicy, Registry};
use tally_ledger::{ChangeCursor, ChangePage, Ledger, ResourceStore};
use tally_model::{Kind, Manifest};
use tokio::sync::watch;

use crate::problem::Problem;
use crate::query::Params;
use crate::{AppState, StatusSource};

impl From<RuntimeError> for Problem {
    fn from(e: RuntimeError) -> Self {
        match e {
            RuntimeError::NoSink(_) => Problem::new(StatusCode::NOT_FOUND, e.to_string()),
            RuntimeError::Forward(e) => {
                Problem::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
        }
    }
}

fn billing(state: &AppState) -> Result<&BillingHandle, Problem> {
    state.billing.as_ref().ok_or_else(|| {
        Problem::new(
            StatusCode::NOT_IMPLEMENTED,
            "billing forwarding is not running in this server (serve config billing.enabled)",
        )
    })
}

/// Loads the billing inputs from the resource store and the ledger's catalog.
async fn load(
    ledger: &Arc<dyn Ledger>,
    resources: &Arc<dyn ResourceStore>,
) -> Result<BillingInputs, String> {
    let definitions = ledger
        .list(Kind::MeterDefinition)
        .await
        .map_err(|e| format!("listing meters: {e}"))?;
    let resource_types = ledger
        .list(Kind::MonitoredResourceType)
        .await
        .map_err(|e| format!("listing monitored resource types: {e}"))?;
    let set = resources.snapshot();
    let sinks: Vec<&Arc<Manifest>> = set.list(Kind::BillingSink, None).collect();
    let (inputs, problems) = BillingInputs::from_manifests(
        sinks.into_iter().map(|m| m.as_ref()),
        |namespace, name| set.secret(namespace, name),
        &definitions,
        &resource_types,
        set.attribution(),
    );
    for problem in problems {
        tracing::debug!(%problem, "meter not forwarded");
    }
    Ok(inputs)
}

/// How the billing runtime of `tally serve` runs.
#[derive(Debug, Clone)]
pub struct BillingOptions {
    /// Where sinks keep their progress.
    pub dir: std::path::PathBuf,
    /// Time between passes.
    pub pass_interval: Duration,
    /// The process's component registry (each sink's delivery metrics).
    pub registry: Registry,
    /// What the providers' endpoints may be besides global unicast addresses.
    pub egress: EgressPolicy,
}

/// Starts the billing runtime on the current Tokio runtime; it stops (and
/// checkpoints) when `stop` turns true. The returned task ends after that.
pub fn start(
    ledger: Arc<dyn Ledger>,
    resources: Arc<dyn ResourceStore>,
    options: BillingOptions,
    stop: watch::Receiver<bool>,
) -> (BillingHandle, tokio::task::JoinHandle<()>) {
    let source: Arc<dyn UsageSource> = Arc::new(LedgerUsageSource::new(Arc::clone(&ledger)));
    let runtime = BillingRuntime::new(
        RuntimeConfig {
            dir: options.dir,
            shutdown_grace: Duration::from_secs(2),
            tune: None,
            egress: options.egress,
        },
        options.registry,
        source,
    );
    let handle = BillingHandle::new(runtime);
    let changed = resources.subscribe();
    let load: LoadInputs = Box::new(move || {
        let (ledger, resources) = (Arc::clone(&ledger), Arc::clone(&resources));
        Box::pin(async move { load(&ledger, &resources).await })
    });
    let task = tokio::spawn(
        handle
            .clone()
            .run(load, Some(changed), options.pass_interval, stop),
    );
    (handle, task)
}

/// A BillingSink's status: a `Ready` condition and where forwarding stands.
pub fn sink_status(report: &SinkReport) -> Value {
    let mut condition = json!({
        "type": "Ready",
        "status": if report.ready { "True" } else { "False" },
        "reason": report.reason,
        "message": report.message,
    });
    if let Some(since) = report.since {
        condition["lastTransitionTime"] = json!(since);
    }
    let mut status = json!({"conditions": [condition]});
    if let Some(error) = &report.last_error {
        status["lastError"] = json!(error);
    }
    if let Some(s) = &report.status {
        status["retries"] = json!(s.retries);
        status["deadLetters"] = json!(s.dead_letters);
        status["meters"] = json!(s.meters);
    }
    if let Some(t) = report.last_pass {
        status["lastPass"] = json!(t);
    }
    status
}

impl StatusSource for BillingHandle {
    fn status(&self, manifest: &Manifest) -> Option<Value> {
        if manifest.kind != Kind::BillingSink.as_str() {
            return None;
        }
        let report = self.sink_status(&manifest.metadata.name)?;
        Some(sink_status(&report))
    }
}

/// Every billing sink's state.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BillingStatus {
    /// Per sink: readiness, last pass, and per meter the last forwarded
    /// window, lag, records sent, retries and dead letters.
    #[schema(value_type = Vec<Object>)]
    pub sinks: Vec<SinkReport>,
}

/// Billing forwarding: per sink and meter, the last forwarded window, lag,
/// records sent, retries and dead letters.
#[utoipa::path(get, path = "/api/v1/billing/status", tag = "billing",
    params(("sink" = Option<String>, Query, description = "Only this BillingSink")),
    responses((status = 200, description = "Status per sink", body = BillingStatus),
              (status = 501, description = "Billing is not running", body = Problem, content_type = "application/problem+json")))]
pub async fn status(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Json<BillingStatus>, Problem> {
    let p = Params::parse(raw.as_deref())?;
    p.only(&["sink"])?;
    let sink: Option<String> = p.one("sink")?;
    let mut sinks = billing(&state)?.status();
    if let Some(name) = &sink {
        sinks.retain(|s| &s.sink == name);
        if sinks.is_empty() {
            return Err(Problem::new(
                StatusCode::NOT_FOUND,
                format!("no billing sink {name:?}"),
            ));
        }
    }
    Ok(Json(BillingStatus { sinks }))
}

/// Dead letters per sink.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetters {
    /// Per sink, its refused batches with the provider's answer and records.
    #[schema(value_type = Vec<Object>)]
    pub sinks: Vec<SinkDeadLetters>,
}

/// Batches the provider refused for good (a 4xx other than 429), with its
/// answer; they stay until retried.
#[utoipa::path(get, path = "/api/v1/billing/deadletters", tag = "billing",
    params(("sink" = Option<String>, Query, description = "Only this BillingSink")),
    responses((status = 200, description = "Dead letters per sink", body = DeadLetters),
              (status = 404, description = "No such running sink", body = Problem, content_type = "application/problem+json")))]
pub async fn dead_letters(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Json<DeadLetters>, Problem> {
    let p = Params::parse(raw.as_deref())?;
    p.only(&["sink"])?;
    let sink: Option<String> = p.one("sink")?;
    let sinks = billing(&state)?.dead_letters(sink.as_deref()).await?;
    Ok(Json(DeadLetters { sinks }))
}

/// Sends a dead letter's records again, with the same `uniqueId`s.
#[utoipa::path(post, path = "/api/v1/billing/deadletters/{sink}/{id}/retry", tag = "billing",
    params(("sink" = String, Path, description = "The BillingSink"),
           ("id" = u64, Path, description = "The dead letter's id")),
    responses((status = 202, description = "Queued again"),
              (status = 404, description = "No such sink or dead letter", body = Problem, content_type = "application/problem+json")))]
pub async fn retry_dead_letter(
    State(state): State<AppState>,
    Path((sink, id)): Path<(String, u64)>,
) -> Result<(StatusCode, Json<Value>), Problem> {
    if billing(&state)?.retry_dead_letter(&sink, id).await? {
        Ok((
            StatusCode::ACCEPTED,
            Json(json!({"sink": sink, "id": id, "queued": true})),
        ))
    } else {
        Err(Problem::new(
            StatusCode::NOT_FOUND,
            format!("billing sink {sink:?} has no dead letter {id}"),
        ))
    }
}

/// Sends every dead letter of a sink again, with the same `uniqueId`s.
#[utoipa::path(post, path = "/api/v1/billing/deadletters/{sink}/retry", tag = "billing",
    params(("sink" = String, Path, description = "The BillingSink")),
    responses((status = 202, description = "The ids queued again (possibly none)"),
              (status = 404, description = "No such running sink", body = Problem, content_type = "application/problem+json")))]
pub async fn retry_all_dead_letters(
    State(state): State<AppState>,
    Path(sink): Path<String>,
) -> Result<(StatusCode, Json<Value>), Problem> {
    let ids = billing(&state)?.retry_all_dead_letters(&sink).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"sink": sink, "ids": ids, "queued": ids.len()})),
    ))
}

/// A reconciliation report.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Reconciliation {
    /// Windows starting at or after this.
    #[schema(value_type = String)]
    pub from: Timestamp,
    /// Windows starting before this.
    #[schema(value_type = String)]
    pub to: Timestamp,
    /// Pairs whose totals differ, over every sink.
    pub differences: usize,
    /// Per sink, every (billing account, meter) pair: the ledger's total,
    /// the acknowledged one, the provider's own (its usage API) and the
    /// drift `provider − ledger`.
    #[schema(value_type = Vec<Object>)]
    pub sinks: Vec<SinkReconciliation>,
}

fn time(p: &Params, name: &str) -> Result<Timestamp, Problem> {
    p.timestamp(name)?
        .ok_or_else(|| Problem::bad_request(format!("`{name}` is required (RFC 3339)")))
}

/// Compares, per billing account and meter, the ledger's totals with what
/// the provider acknowledged and with the provider's own usage totals (its
/// usage API), over the windows starting in `[from, to)` widened to whole
/// UTC hours; 503 with the provider's status when it cannot be read.
#[utoipa::path(get, path = "/api/v1/billing/reconcile", tag = "billing",
    params(("from" = String, Query, description = "Start, inclusive, RFC 3339"),
           ("to" = String, Query, description = "End, exclusive, RFC 3339"),
           ("sink" = Option<String>, Query, description = "Only this BillingSink")),
    responses((status = 200, description = "Totals per account and meter", body = Reconciliation),
              (status = 400, description = "Bad range", body = Problem, content_type = "application/problem+json")))]
pub async fn reconcile(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Reconciliation>, Problem> {
    let p = Params::parse(raw.as_deref())?;
    p.only(&["from", "to", "sink"])?;
    let (from, to) = (time(&p, "from")?, time(&p, "to")?);
    if from >= to {
        return Err(Problem::bad_request("`from` must be before `to`"));
    }
    let sink: Option<String> = p.one("sink")?;
    let sinks = billing(&state)?
        .reconcile(sink.as_deref(), from, to)
        .await?;
    Ok(Json(Reconciliation {
        from,
        to,
        differences: sinks.iter().map(|s| s.differences).sum(),
        sinks,
    }))
}

/// The change feed of a meter: event times of its events stored, and of
/// those voided, after a cursor (`<log>-<voids>`); for readers that keep
/// their own checkpoint (`tally forward`).
#[utoipa::path(get, path = "/api/v1/meters/{slug}/changes", tag = "meters",
    params(("slug" = String, Path, description = "Meter slug"),
           ("after" = Option<String>, Query, description = "Cursor `<log>-<voids>` (`next` of the previous answer; default: the beginning)"),
           ("limit" = Option<usize>, Query, description = "Most log entries and voids read")),
    responses((status = 200, description = "Times, the next cursor, and whether more follow", body = Object),
              (status = 404, description = "No such meter", body = Problem, content_type = "application/problem+json")))]
pub async fn changes(
    State(state): State<AppState>,
    Path(slug): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<ChangePage>, Problem> {
    let p = Params::parse(raw.as_deref())?;
    p.only(&["after", "limit"])?;
    let after: Option<String> = p.one("after")?;
    let cursor = match after {
        Some(text) => text.parse::<ChangeCursor>()?,
        None => ChangeCursor::default(),
    };
    let limit = p.number("limit")?.unwrap_or(10_000);
    Ok(Json(state.ledger.changes(slug, cursor, limit).await?))
}

/// Splits the samples of metric family `name` out of a Prometheus text
/// exposition: (its sample lines, the text without the family).
pub fn take_family(text: &str, name: &str) -> (Vec<String>, String) {
    let mut samples = Vec::new();
    let mut rest = String::with_capacity(text.len());
    for line in text.lines() {
        let of_family = line
            .strip_prefix("# HELP ")
            .or_else(|| line.strip_prefix("# TYPE "))
            .unwrap_or(line)
            .split(['{', ' '])
            .next()
            == Some(name);
        if !of_family {
            rest.push_str(line);
            rest.push('\n');
        } else if !line.starts_with('#') {
            samples.push(line.to_owned());
        }
    }
    (samples, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_family_is_taken_out_whole() {
        let text = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 1\n\
                    # HELP a_total_more B.\n# TYPE a_total_more gauge\na_total_more 2\n";
        let (samples, rest) = take_family(text, "a_total");
        assert_eq!(samples, vec!["a_total{x=\"1\"} 1"]);
        assert_eq!(
            rest,
            "# HELP a_total_more B.\n# TYPE a_total_more gauge\na_total_more 2\n"
        );
    }
}
