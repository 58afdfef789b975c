//! The billing runtime: one [`Forwarder`] per `BillingSink`, kept in step
//! with the resources (sinks, their API keys, forwarded meters, billing
//! accounts and bindings), run periodically, and asked for status, dead
//! letters and reconciliation. `tally serve` drives it from its resource
//! store and ledger; `tally forward` from a server over HTTP.
//!
//! Each sink's progress lives in `<dir>/<sink name>`, so a sink that is
//! removed and applied again resumes where it stopped.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use jiff::Timestamp;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tally_delivery::{EgressPolicy, Registry, Secret};
use tally_model::Manifest;
use tokio::sync::{Mutex, watch};

use crate::attribution::Attribution;
use crate::config::{BillingSink, ForwardedMeter, Provider};
use crate::forwarder::{Difference, ForwardError, Forwarder, ForwarderConfig, SinkStatus};
use crate::health::LastError;
use crate::progress::DeadLetterRecord;
use crate::source::UsageSource;

/// Why a sink is not forwarding, as a status condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Condition {
    /// A CamelCase reason (`InvalidSpec`, `SecretNotFound`, ...).
    pub reason: String,
    /// What to do about it. Never holds a secret value.
    pub message: String,
}

impl Condition {
    /// A condition with `reason` and `message`.
    pub fn new(reason: &str, message: impl Into<String>) -> Self {
        Condition {
            reason: reason.to_owned(),
            message: message.into(),
        }
    }
}

/// One BillingSink as the runtime is given it.
#[derive(Debug, Clone)]
pub struct SinkInput {
    /// `metadata.name`.
    pub name: String,
    /// The parsed sink and its API key, or why it cannot run.
    pub config: Result<(BillingSink, Secret), Condition>,
}

/// Everything the runtime forwards by.
#[derive(Debug, Clone, Default)]
pub struct BillingInputs {
    /// Every BillingSink.
    pub sinks: Vec<SinkInput>,
    /// The meters forwarded (Published or Deprecated, with their api names
    /// and dimensions).
    pub meters: Vec<ForwardedMeter>,
    /// Who owns which project's usage when.
    pub attribution: Attribution,
}

impl BillingInputs {
    /// Reads the sinks, their secrets, and the forwarded meters from
    /// manifests: `secret(namespace, name)` answers a Secret's values;
    /// `meter_definitions` and `resource_types` are the catalog (dimensions
    /// are compiled from it).
    pub fn from_manifests<'a>(
        sinks: impl IntoIterator<Item = &'a Manifest>,
        secret: impl Fn(&str, &str) -> Option<BTreeMap<String, String>>,
        meter_definitions: &[Manifest],
        resource_types: &[Manifest],
        attribution: Attribution,
    ) -> (BillingInputs, Vec<String>) {
        let mut problems = Vec::new();
        let sinks = sinks
            .into_iter()
            .map(|manifest| SinkInput {
                name: manifest.metadata.name.clone(),
                config: sink_config(manifest, &secret),
            })
            .collect();
        let catalog = tally_ledger::Catalog::load(
            meter_definitions
                .iter()
                .chain(resource_types)
                .cloned()
                .collect::<Vec<_>>(),
        );
        let mut meters = Vec::new();
        for manifest in meter_definitions {
            match ForwardedMeter::from_manifest(manifest) {
                Ok(Some(mut meter)) => {
                    let compiled = catalog
                        .as_ref()
                        .ok()
                        .and_then(|c| c.compile(&meter.meter))
                        .and_then(Result::ok);
                    match compiled {
                        Some(compiled) => {
                            meter.dimensions = compiled.dimensions().map(str::to_owned).collect();
                            meters.push(meter);
                        }
                        None => problems.push(format!(
                            "meter {:?} cannot be compiled; not forwarded",
                            meter.meter
                        )),
                    }
                }
                Ok(None) => {}
                Err(e) => problems.push(e.to_string()),
            }
        }
        (
            BillingInputs {
                sinks,
                meters,
                attribution,
            },
            problems,
        )
    }
}

fn sink_config(
    manifest: &Manifest,
    secret: &impl Fn(&str, &str) -> Option<BTreeMap<String, String>>,
) -> Result<(BillingSink, Secret), Condition> {
    let sink = BillingSink::from_manifest(manifest)
        .map_err(|e| Condition::new("InvalidSpec", e.to_string()))?;
    let reference = &sink.api_key_secret_ref;
    let values = secret(&reference.namespace, &reference.name).ok_or_else(|| {
        Condition::new(
            "SecretNotFound",
            format!(
                "Secret {}/{} (spec.apiKeySecretRef) does not exist",
                reference.namespace, reference.name
            ),
        )
    })?;
    let key = values.get(&reference.key).ok_or_else(|| {
        Condition::new(
            "SecretKeyNotFound",
            format!(
                "Secret {}/{} has no key {:?}",
                reference.namespace, reference.name, reference.key
            ),
        )
    })?;
    let key = key.trim();
    if key.is_empty() {
        return Err(Condition::new(
            "SecretKeyNotFound",
            format!(
                "Secret {}/{} key {:?} is empty",
                reference.namespace, reference.name, reference.key
            ),
        ));
    }
    Ok((sink, Secret::new(key)))
}

/// One sink's state in a report.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SinkReport {
    /// The BillingSink's name.
    pub sink: String,
    /// Its provider, when its spec is valid.
    pub provider: Option<Provider>,
    /// Whether it forwards.
    pub ready: bool,
    /// Why (or why not).
    pub reason: String,
    /// Details.
    pub message: String,
    /// Since when the sink is in its current condition, where known (the
    /// first failed attempt of an error; when the lag passed `maxLag`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<Timestamp>,
    /// The provider error the sink is in: the answer's status and Tally's
    /// words (never the provider's answer), cleared once a batch is
    /// delivered again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<LastError>,
    /// When the last pass ended.
    pub last_pass: Option<Timestamp>,
    /// Where forwarding stands, per meter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<SinkStatus>,
}

/// One sink's dead letters.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SinkDeadLetters {
    /// The BillingSink's name.
    pub sink: String,
    /// Its dead-letter list, oldest first.
    pub dead_letters: Vec<DeadLetterRecord>,
}

/// A reconciliation of one sink.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SinkReconciliation {
    /// The BillingSink's name.
    pub sink: String,
    /// Every (billing account, meter) pair with usage: the ledger's total,
    /// the acknowledged one and the provider's own, and the drift.
    pub totals: Vec<Difference>,
    /// How many of them drift (the provider's total is not the ledger's).
    pub differences: usize,
}

/// Why a runtime request failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No such sink, or it is not running.
    #[error("billing sink {0:?} is not running")]
    NoSink(String),
    /// The forwarder failed.
    #[error(transparent)]
    Forward(#[from] ForwardError),
}

struct SinkRuntime {
    sink: Option<BillingSink>,
    /// SHA-256 of the API key: a rotated key restarts the forwarder.
    key_digest: [u8; 32],
    meters: Vec<ForwardedMeter>,
    forwarder: Option<Forwarder>,
    condition: Condition,
    last_pass: Option<Timestamp>,
}

/// Settings of a [`BillingRuntime`].
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where each sink keeps its progress (`<dir>/<sink>`).
    pub dir: PathBuf,
    /// How long a stopping forwarder waits for answers.
    pub shutdown_grace: Duration,
    /// Applied to each forwarder's configuration (tests shorten retries).
    pub tune: Option<fn(&mut ForwarderConfig)>,
    /// The operator's egress allow-list, for every sink's provider endpoint.
    pub egress: EgressPolicy,
}

/// Every sink's forwarder.
pub struct BillingRuntime {
    config: RuntimeConfig,
    registry: Registry,
    source: Arc<dyn UsageSource>,
    sinks: BTreeMap<String, SinkRuntime>,
    attribution: Attribution,
}

fn digest(key: &Secret) -> [u8; 32] {
    Sha256::digest(key.expose().as_bytes()).into()
}

impl BillingRuntime {
    /// A runtime with no sinks yet; forwarders report to `registry`.
    pub fn new(config: RuntimeConfig, registry: Registry, source: Arc<dyn UsageSource>) -> Self {
        BillingRuntime {
            config,
            registry,
            source,
            sinks: BTreeMap::new(),
            attribution: Attribution::default(),
        }
    }

    /// Starts, restarts and stops forwarders so that they match `inputs`:
    /// a changed spec, API key or meter list restarts a sink's forwarder
    /// (unanswered records are sent again, same `uniqueId`s); a changed
    /// attribution is handed to the running ones.
    pub async fn reconfigure(&mut self, inputs: BillingInputs, now: Timestamp) {
        let wanted: BTreeMap<String, SinkInput> = inputs
            .sinks
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        let gone: Vec<String> = self
            .sinks
            .keys()
            .filter(|name| !wanted.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            if let Some(runtime) = self.sinks.remove(&name) {
                self.stop(&name, runtime.forwarder).await;
                tracing::info!(sink = %name, "billing sink removed");
            }
        }
        for (name, input) in wanted {
            let (sink, key) = match input.config {
                Ok(config) => config,
                Err(condition) => {
                    self.park(&name, None, condition).await;
                    continue;
                }
            };
            if !sink.window_is_whole_minutes() {
                let condition = Condition::new(
                    "UnsupportedWindowSize",
                    format!(
                        "spec.windowSize is {}s; the ledger keeps minute buckets, so a billing \
                         window must be a whole number of minutes",
                        sink.window.as_secs_f64()
                    ),
                );
                self.park(&name, Some(sink), condition).await;
                continue;
            }
            let key_digest = digest(&key);
            let current = self.sinks.get(&name);
            let unchanged = current.is_some_and(|c| {
                c.forwarder.is_some()
                    && c.sink.as_ref() == Some(&sink)
                    && c.key_digest == key_digest
                    && c.meters == inputs.meters
            });
            if unchanged {
                if let Some(runtime) = self.sinks.get_mut(&name)
                    && let Some(forwarder) = runtime.forwarder.as_mut()
                    && let Err(e) = forwarder.set_attribution(inputs.attribution.clone())
                {
                    runtime.condition = Condition::new("ProgressFailed", e.to_string());
                }
                continue;
            }
            let previous = self.sinks.remove(&name).and_then(|r| r.forwarder);
            self.stop(&name, previous).await;
            let mut config = ForwarderConfig::new(
                sink.clone(),
                key,
                inputs.meters.clone(),
                self.config.dir.join(&name),
                sink.start_at.unwrap_or(now),
            );
            config.egress = self.config.egress.clone();
            if let Some(tune) = self.config.tune {
                tune(&mut config);
            }
            let started = Forwarder::start(
                config,
                Arc::clone(&self.source),
                inputs.attribution.clone(),
                &self.registry,
            )
            .await;
            let (forwarder, condition) = match started {
                Ok(forwarder) => {
                    tracing::info!(sink = %name, provider = ?sink.provider,
                        meters = inputs.meters.len(), "billing sink forwarding");
                    (
                        Some(forwarder),
                        Condition::new("Forwarding", "forwarding closed windows"),
                    )
                }
                Err(e) => {
                    tracing::warn!(sink = %name, error = %e, "billing sink could not start");
                    (None, Condition::new("StartFailed", e.to_string()))
                }
            };
            self.sinks.insert(
                name,
                SinkRuntime {
                    sink: Some(sink),
                    key_digest,
                    meters: inputs.meters.clone(),
                    forwarder,
                    condition,
                    last_pass: None,
                },
            );
        }
        self.attribution = inputs.attribution;
    }

    async fn park(&mut self, name: &str, sink: Option<BillingSink>, condition: Condition) {
        let previous = self.sinks.remove(name).and_then(|r| r.forwarder);
        self.stop(name, previous).await;
        tracing::warn!(sink = %name, reason = %condition.reason, message = %condition.message,
            "billing sink not forwarding");
        self.sinks.insert(
            name.to_owned(),
            SinkRuntime {
                sink,
                key_digest: [0; 32],
                meters: Vec::new(),
                forwarder: None,
                condition,
                last_pass: None,
            },
        );
    }

    async fn stop(&self, name: &str, forwarder: Option<Forwarder>) {
        if let Some(forwarder) = forwarder
            && let Err(e) = forwarder.shutdown(self.config.shutdown_grace).await
        {
            tracing::warn!(sink = %name, error = %e, "stopping a billing forwarder failed");
        }
    }

    /// One pass of every running forwarder at `now`.
    pub async fn pass(&mut self, now: Timestamp) {
        for (name, runtime) in &mut self.sinks {
            let Some(forwarder) = runtime.forwarder.as_mut() else {
                continue;
            };
            match forwarder.run_once(now).await {
                Ok(report) => {
                    runtime.condition = Condition::new("Forwarding", "forwarding closed windows");
                    runtime.last_pass = Some(Timestamp::now());
                    if report.records > 0 {
                        tracing::debug!(sink = %name, windows = report.windows,
                            records = report.records, "billing pass");
                    }
                }
                Err(e) => {
                    tracing::warn!(sink = %name, error = %e, "billing pass failed");
                    runtime.condition = Condition::new("PassFailed", e.to_string());
                }
            }
        }
    }

    /// Checkpoints every forwarder's answers; true once nothing is pending
    /// anywhere (or false after `timeout`).
    pub async fn wait_idle(&mut self, timeout: Duration) -> bool {
        let mut idle = true;
        for (name, runtime) in &mut self.sinks {
            if let Some(forwarder) = runtime.forwarder.as_mut() {
                match forwarder.wait_idle(timeout).await {
                    Ok(done) => idle &= done,
                    Err(e) => {
                        tracing::warn!(sink = %name, error = %e, "checkpointing failed");
                        idle = false;
                    }
                }
            }
        }
        idle
    }

    /// Every sink's state at `now`.
    pub fn report(&self, now: Timestamp) -> Vec<SinkReport> {
        self.sinks
            .iter()
            .map(|(name, runtime)| {
                let status = runtime.forwarder.as_ref().map(|f| f.status(now));
                let (ready, condition, since) = readiness(runtime, status.as_ref());
                SinkReport {
                    sink: name.clone(),
                    provider: runtime.sink.as_ref().map(|s| s.provider),
                    ready,
                    reason: condition.reason,
                    message: condition.message,
                    since,
                    last_error: status.as_ref().and_then(|s| s.last_error.clone()),
                    last_pass: runtime.last_pass,
                    status,
                }
            })
            .collect()
    }

    fn forwarder(&self, sink: &str) -> Result<&Forwarder, RuntimeError> {
        self.sinks
            .get(sink)
            .and_then(|r| r.forwarder.as_ref())
            .ok_or_else(|| RuntimeError::NoSink(sink.to_owned()))
    }

    fn selected<'a>(&'a self, sink: Option<&'a str>) -> Result<Vec<&'a str>, RuntimeError> {
        match sink {
            Some(name) => self.forwarder(name).map(|_| vec![name]),
            None => Ok(self
                .sinks
                .iter()
                .filter(|(_, r)| r.forwarder.is_some())
                .map(|(name, _)| name.as_str())
                .collect()),
        }
    }

    /// The dead letters of one sink or of all.
    pub fn dead_letters(&self, sink: Option<&str>) -> Result<Vec<SinkDeadLetters>, RuntimeError> {
        let mut out = Vec::new();
        for name in self.selected(sink)? {
            out.push(SinkDeadLetters {
                sink: name.to_owned(),
                dead_letters: self.forwarder(name)?.dead_letters()?,
            });
        }
        Ok(out)
    }

    /// Sends every dead letter of a sink again; returns their ids.
    pub async fn retry_all_dead_letters(&mut self, sink: &str) -> Result<Vec<u64>, RuntimeError> {
        let forwarder = self
            .sinks
            .get_mut(sink)
            .and_then(|r| r.forwarder.as_mut())
            .ok_or_else(|| RuntimeError::NoSink(sink.to_owned()))?;
        Ok(forwarder.retry_all_dead_letters().await?)
    }

    /// Sends a dead letter again; false if the sink has no such letter.
    pub async fn retry_dead_letter(&mut self, sink: &str, id: u64) -> Result<bool, RuntimeError> {
        let forwarder = self
            .sinks
            .get_mut(sink)
            .and_then(|r| r.forwarder.as_mut())
            .ok_or_else(|| RuntimeError::NoSink(sink.to_owned()))?;
        Ok(forwarder.retry_dead_letter(id).await?)
    }

    /// Compares the ledger's totals with the acknowledged ones and with the
    /// provider's own (its usage API) over the windows starting in
    /// `[from, to)` widened to whole UTC hours, for one sink or all.
    pub async fn reconcile(
        &self,
        sink: Option<&str>,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<SinkReconciliation>, RuntimeError> {
        let mut out = Vec::new();
        for name in self.selected(sink)? {
            let totals = self.forwarder(name)?.compare(from, to).await?;
            let differences = totals.iter().filter(|d| d.drifts()).count();
            out.push(SinkReconciliation {
                sink: name.to_owned(),
                totals,
                differences,
            });
        }
        Ok(out)
    }

    /// Stops every forwarder (answers are checkpointed for at most the grace
    /// period; what is left is sent again after the next start).
    pub async fn shutdown(&mut self) {
        let sinks = std::mem::take(&mut self.sinks);
        for (name, runtime) in sinks {
            self.stop(&name, runtime.forwarder).await;
        }
    }
}

/// Loads the inputs afresh (from a resource store, or over HTTP).
pub type LoadInputs =
    Box<dyn Fn() -> BoxFuture<'static, Result<BillingInputs, String>> + Send + Sync>;

/// A running runtime, shared with the API: status is answered from the last
/// pass's report without waiting for a pass in progress.
#[derive(Clone)]
pub struct BillingHandle {
    runtime: Arc<Mutex<BillingRuntime>>,
    reports: Arc<RwLock<Vec<SinkReport>>>,
    registry: Registry,
}

impl std::fmt::Debug for BillingHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BillingHandle").finish_non_exhaustive()
    }
}

impl BillingHandle {
    /// A handle on `runtime`.
    pub fn new(runtime: BillingRuntime) -> Self {
        let registry = runtime.registry.clone();
        BillingHandle {
            runtime: Arc::new(Mutex::new(runtime)),
            reports: Arc::default(),
            registry,
        }
    }

    /// Every sink's state after the last pass.
    pub fn status(&self) -> Vec<SinkReport> {
        self.reports
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// One sink's state after the last pass.
    pub fn sink_status(&self, sink: &str) -> Option<SinkReport> {
        self.status().into_iter().find(|r| r.sink == sink)
    }

    async fn publish(&self, runtime: &BillingRuntime) {
        let report = runtime.report(Timestamp::now());
        *self
            .reports
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = report;
    }

    /// See [`BillingRuntime::dead_letters`].
    pub async fn dead_letters(
        &self,
        sink: Option<&str>,
    ) -> Result<Vec<SinkDeadLetters>, RuntimeError> {
        self.runtime.lock().await.dead_letters(sink)
    }

    /// See [`BillingRuntime::retry_all_dead_letters`].
    pub async fn retry_all_dead_letters(&self, sink: &str) -> Result<Vec<u64>, RuntimeError> {
        let mut runtime = self.runtime.lock().await;
        let retried = runtime.retry_all_dead_letters(sink).await?;
        self.publish(&runtime).await;
        Ok(retried)
    }

    /// See [`BillingRuntime::retry_dead_letter`].
    pub async fn retry_dead_letter(&self, sink: &str, id: u64) -> Result<bool, RuntimeError> {
        let mut runtime = self.runtime.lock().await;
        let retried = runtime.retry_dead_letter(sink, id).await?;
        self.publish(&runtime).await;
        Ok(retried)
    }

    /// See [`BillingRuntime::reconcile`].
    pub async fn reconcile(
        &self,
        sink: Option<&str>,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<SinkReconciliation>, RuntimeError> {
        self.runtime.lock().await.reconcile(sink, from, to).await
    }

    /// One reload and pass, then the report is published.
    pub async fn step(&self, inputs: Option<BillingInputs>) {
        let mut runtime = self.runtime.lock().await;
        let now = Timestamp::now();
        if let Some(inputs) = inputs {
            runtime.reconfigure(inputs, now).await;
        }
        runtime.pass(now).await;
        self.publish(&runtime).await;
    }

    /// Checkpoints answers until nothing is pending or `timeout` passed.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let mut runtime = self.runtime.lock().await;
        let idle = runtime.wait_idle(timeout).await;
        self.publish(&runtime).await;
        idle
    }

    /// Reloads the inputs and runs a pass every `interval`, and at once when
    /// `changed` ticks, until `stop` turns true; then stops the forwarders.
    pub async fn run(
        self,
        load: LoadInputs,
        mut changed: Option<watch::Receiver<u64>>,
        interval: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let inputs = match load().await {
                Ok(inputs) => Some(inputs),
                Err(e) => {
                    tracing::warn!(error = %e, "reading the billing configuration failed");
                    None
                }
            };
            self.step(inputs).await;
            let resources_changed = async {
                match changed.as_mut() {
                    Some(rx) => {
                        if rx.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = resources_changed => {}
                _ = stop.changed() => {}
            }
            if *stop.borrow() {
                break;
            }
        }
        self.runtime.lock().await.shutdown().await;
    }

    /// The billing metrics in the Prometheus text format: each sink's
    /// delivery component metrics, and per sink and meter the last forwarded
    /// window, lag, records sent, retries and dead letters.
    pub fn render_metrics(&self) -> String {
        let mut out = self.registry.render();
        out.push_str(&self.render_status_metrics());
        out
    }

    /// The `tally_billing_*` families alone: for a process whose component
    /// registry (shared with this runtime) is rendered elsewhere. Counters
    /// are kept across restarts.
    pub fn render_status_metrics(&self) -> String {
        use std::fmt::Write as _;
        let reports = self.status();
        let mut out = String::new();
        for (name, kind, help, value) in SINK_FAMILIES {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for report in &reports {
                if let Some(value) = value(report) {
                    let _ = writeln!(out, "{name}{{sink=\"{}\"}} {value}", escape(&report.sink));
                }
            }
        }
        for (name, kind, help, value) in METER_FAMILIES {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for report in &reports {
                for meter in report.status.iter().flat_map(|s| &s.meters) {
                    if let Some(value) = value(meter) {
                        let _ = writeln!(
                            out,
                            "{name}{{sink=\"{}\",meter=\"{}\",meter_api_name=\"{}\"}} {value}",
                            escape(&report.sink),
                            escape(&meter.meter),
                            escape(&meter.meter_api_name)
                        );
                    }
                }
            }
        }
        out
    }
}

/// A metric family: name, type, help, and the sample of one sink or meter.
type Family<T> = (
    &'static str,
    &'static str,
    &'static str,
    fn(&T) -> Option<String>,
);

const SINK_FAMILIES: [Family<SinkReport>; 4] = [
    (
        "tally_billing_sink_ready",
        "gauge",
        "1 when the billing sink forwards and the provider accepts what it sends.",
        |r| Some(u8::from(r.ready).to_string()),
    ),
    (
        "tally_billing_retries_total",
        "counter",
        "Requests to the provider retried.",
        |r| r.status.as_ref().map(|s| s.retries.to_string()),
    ),
    (
        "tally_billing_dead_letters",
        "gauge",
        "Batches in the dead-letter list.",
        |r| r.status.as_ref().map(|s| s.dead_letters.to_string()),
    ),
    (
        "tally_billing_records_per_event",
        "gauge",
        "Records acknowledged by the provider per event read from the ledger (each record is billed by the provider).",
        |r| {
            let meters = &r.status.as_ref()?.meters;
            let sent: u64 = meters.iter().map(|m| m.records_sent).sum();
            let events: u64 = meters.iter().map(|m| m.events_read).sum();
            (events > 0).then(|| format!("{:.6}", sent as f64 / events as f64))
        },
    ),
];

const METER_FAMILIES: [Family<crate::forwarder::MeterStatus>; 8] = [
    (
        "tally_billing_forwarded_until_seconds",
        "gauge",
        "Every window ending at or before this Unix time is acknowledged by the provider.",
        |m| m.forwarded_until.map(|t| t.as_second().to_string()),
    ),
    (
        "tally_billing_lag_seconds",
        "gauge",
        "Now minus the forwarded-until time.",
        |m| m.lag.map(|l| l.as_secs().to_string()),
    ),
    (
        "tally_billing_records_sent_total",
        "counter",
        "Records acknowledged by the provider (corrections included).",
        |m| Some(m.records_sent.to_string()),
    ),
    (
        "tally_billing_corrections_sent_total",
        "counter",
        "Correction records (revisions after the first) acknowledged by the provider.",
        |m| Some(m.corrections_sent.to_string()),
    ),
    (
        "tally_billing_records_pending",
        "gauge",
        "Records sent or queued, not yet answered.",
        |m| Some(m.records_pending.to_string()),
    ),
    (
        "tally_billing_events_read_total",
        "counter",
        "Events and voids of the meter read from the ledger.",
        |m| Some(m.events_read.to_string()),
    ),
    (
        "tally_billing_unattributed",
        "gauge",
        "Usage in planned windows that no binding covered at its time.",
        |m| Some(m.unattributed.normalize().to_string()),
    ),
    (
        "tally_billing_unattributed_projects",
        "gauge",
        "Projects with usage that no binding covered at its time.",
        |m| Some(m.unattributed_projects.to_string()),
    ),
];

/// Whether a sink is Ready, its condition, and since when: not while its
/// forwarder does not run or its last pass failed, nor while the provider
/// refuses it (`ProviderRejected`) or cannot be reached (`ProviderUnreachable`,
/// both until a batch is delivered again), nor while a meter's lag exceeds
/// `maxLag` (`Backlogged`).
fn readiness(
    runtime: &SinkRuntime,
    status: Option<&SinkStatus>,
) -> (bool, Condition, Option<Timestamp>) {
    let condition = runtime.condition.clone();
    let (Some(status), Some(sink)) = (status, runtime.sink.as_ref()) else {
        return (false, condition, None);
    };
    if runtime.forwarder.is_none() || condition.reason != "Forwarding" {
        return (false, condition, None);
    }
    if let Some(error) = &status.last_error {
        let message = format!("{} (last seen {})", error.message, error.at);
        return (
            false,
            Condition::new(&error.reason, message),
            Some(error.since),
        );
    }
    if let Some(lag) = status.max_lag.filter(|lag| *lag > sink.max_lag) {
        let pending: u64 = status.meters.iter().map(|m| m.records_pending).sum();
        let behind = status.meters.iter().filter_map(|m| m.forwarded_until).min();
        let since = behind.and_then(|t| {
            jiff::SignedDuration::try_from(sink.max_lag)
                .ok()
                .and_then(|d| t.checked_add(d).ok())
        });
        let message = format!(
            "lag {}s exceeds maxLag {}s; {pending} records pending",
            lag.as_secs(),
            sink.max_lag.as_secs()
        );
        return (false, Condition::new("Backlogged", message), since);
    }
    (true, condition, None)
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
