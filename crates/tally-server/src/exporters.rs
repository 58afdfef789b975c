//! Wires the exporters' pipeline to the resource store: every change of an
//! `Exporter`, a `Secret`, a `Namespace` or a labelled platform resource
//! hands the pipeline a new snapshot (unchanged sinks keep their queues;
//! a rotated secret is used from the next request on), and an Exporter's
//! `status` is the pipeline's. The same snapshot resolves every
//! `TelemetryPolicy` against the namespaces and gateways, so a policy's
//! status follows policies and targets as they appear, change or go. `tally serve` and `tally export` build the
//! pipeline the same way ([`start_pipeline`]), its sinks guarded by the
//! config's egress allow-list.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use serde_json::Value;
use tally_delivery::{EgressPolicy, Registry};
use tally_ledger::{ResourceSet, ResourceStore};
use tally_model::{Kind, Manifest};
use tally_policy::Resolution;
use tally_telemetry::{Pipeline, PipelineOptions, QueueStorage, Snapshot};

use crate::StatusSource;
use crate::config::VictoriaMetricsConfig;

/// The exporters' pipeline of a process, and the task that keeps it in step
/// with `store` ([`follow`]): sinks queue on disk under
/// `<data_dir>/exporter-queues` (where pull checkpoints live too), sources
/// are pulled from `victoria_metrics` if given, sinks reach only what
/// `egress` allows, and it runs `store`'s exporters before this returns, so
/// receivers can take metrics at once.
pub(crate) fn start_pipeline(
    data_dir: &Path,
    victoria_metrics: Option<&VictoriaMetricsConfig>,
    egress: EgressPolicy,
    registry: &Registry,
    store: &Arc<dyn ResourceStore>,
) -> anyhow::Result<(Arc<Pipeline>, tokio::task::JoinHandle<()>)> {
    let options = PipelineOptions {
        storage: QueueStorage::Disk {
            dir: data_dir.join("exporter-queues"),
            sync: false,
        },
        pull: victoria_metrics.map(|vm| vm.pull_options()).transpose()?,
        egress,
        ..PipelineOptions::default()
    };
    let pipeline =
        Pipeline::new(registry.clone(), options).context("starting the exporters' pipeline")?;
    pipeline.update(snapshot(&store.snapshot(), &Resolution::default()));
    let pipeline = Arc::new(pipeline);
    let follower = tokio::spawn(follow(Arc::clone(store), Arc::clone(&pipeline)));
    Ok((pipeline, follower))
}

/// What the pipeline needs of the stored resources
/// ([`Snapshot::of`], shared with `tally collect`).
pub fn snapshot(set: &ResourceSet, previous: &Resolution) -> Snapshot {
    Snapshot::of(set, previous)
}

/// A TelemetryPolicy's status: Accepted, Conflicted or Invalid and why,
/// per target, and the targets it governs (from the pipeline's last
/// resolution).
pub struct PolicyStatusSource(pub Arc<Pipeline>);

impl StatusSource for PolicyStatusSource {
    fn status(&self, manifest: &Manifest) -> Option<Value> {
        if manifest.kind != Kind::TelemetryPolicy.as_str() {
            return None;
        }
        let namespace = manifest.metadata.namespace.as_deref()?;
        let status = self.0.policy_status(namespace, &manifest.metadata.name)?;
        serde_json::to_value(status).ok()
    }
}

/// Keeps `pipeline` in step with `store` until the store goes away.
pub async fn follow(store: Arc<dyn ResourceStore>, pipeline: Arc<Pipeline>) {
    let mut changes = store.subscribe();
    loop {
        let previous = pipeline.policies().unwrap_or_default();
        let report = pipeline.update(snapshot(&store.snapshot(), &previous));
        tracing::debug!(?report, "exporters updated");
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// An Exporter's status, from the pipeline.
pub struct ExporterStatusSource(pub Arc<Pipeline>);

impl StatusSource for ExporterStatusSource {
    fn status(&self, manifest: &Manifest) -> Option<Value> {
        if manifest.kind != Kind::Exporter.as_str() {
            return None;
        }
        let namespace = manifest.metadata.namespace.as_deref()?;
        let status = self.0.status(namespace, &manifest.metadata.name)?;
        serde_json::to_value(status).ok()
    }
}
