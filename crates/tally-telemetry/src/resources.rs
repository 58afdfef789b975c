//! What the pipeline runs from, read from a [`ResourceSet`]: the one place
//! a process (`tally serve`, `tally export`, `tally collect`) turns its
//! stored or watched resources into a [`Snapshot`], so every process
//! routes, shapes and resolves policies from the same rules.

use std::sync::Arc;

use tally_ledger::ResourceSet;
use tally_model::secret::secret_data;
use tally_model::{Kind, KindClass, Manifest};
use tally_policy::{Resolution, World};

use crate::index::InMemoryResourceIndex;
use crate::pipeline::{Secrets, Snapshot};
use crate::secret::SecretValue;

impl Snapshot {
    /// What the pipeline needs of `set`. `previous`: the policies as last
    /// resolved, whose unchanged versions are not compiled again.
    pub fn of(set: &ResourceSet, previous: &Resolution) -> Snapshot {
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
}

/// Every `TelemetryPolicy` of `set`, resolved against its namespaces (and
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
