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
use tally_model::secret::secret_data;
use tally_model::{Kind, KindClass, Manifest};
use tally_policy::{Resolution, World};
use tally_telemetry::{
    InMemoryResourceIndex, Pipeline, PipelineOptions, QueueStorage, SecretValue, Secrets, Snapshot,
};

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

/// What the pipeline needs of the stored resources.
/// `previous`: the policies as last resolved, whose unchanged versions are
/// not compiled again.
pub fn snapshot(set: &ResourceSet, previous: &Resolution) -> Snapshot {
    let exporters: Vec<Manifest> = set
        .list(Kind::Exporter, None)
        .map(|m| (**m).clone())
        .collect();
    let mut secrets = Secrets::new();
    for manifest in set.list(Kind::Secret, None) {
        let (Some(namespace), Ok(data)) = (&manifest.metadata.namespace, secret_data(manifest))
        else {
            continue;
        };
        secrets.insert(
            namespace.clone(),
            manifest.metadata.name.clone(),
            data.into_iter()
                .map(|(key, value)| (key, SecretValue::new(value)))
                .collect(),
        );
    }
    let mut index = InMemoryResourceIndex::new();
    for kind in Kind::ALL
        .into_iter()
        .filter(|k| k.class() == KindClass::Platform)
    {
        for manifest in set.list(kind, None) {
            // Only namespaces and namespaced resources are indexed; a
            // cluster-scoped one (GatewayClass) has no project.
            if let Err(e) = index.apply(manifest) {
                tracing::debug!(error = %e, "not indexed for exporters");
            }
        }
    }
    Snapshot {
        exporters,
        secrets,
        index: Arc::new(index),
        policies: Arc::new(policies(set, previous)),
    }
}

/// Every `TelemetryPolicy`, resolved against the stored namespaces (and
/// their projects) and gateways.
pub fn policies(set: &ResourceSet, previous: &Resolution) -> Resolution {
    let mut world = World::default();
    for ns in set.list(Kind::Namespace, None) {
        // The same rule as every other tenancy decision: the label, else the
        // namespace's own name.
        let project = set.project_of_namespace(&ns.metadata.name);
        world
            .namespaces
            .insert(ns.metadata.name.clone(), Some(project));
    }
    for gw in set.list(Kind::Gateway, None) {
        if let Some(namespace) = &gw.metadata.namespace {
            world
                .gateways
                .insert((namespace.clone(), gw.metadata.name.clone()));
        }
    }
    let manifests: Vec<&Manifest> = set
        .list(Kind::TelemetryPolicy, None)
        .map(|m| &**m)
        .collect();
    Resolution::resolve_again(manifests, &world, previous)
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
