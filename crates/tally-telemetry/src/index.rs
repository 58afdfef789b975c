//! The resource index: which project a namespace belongs to, and the labels of
//! namespaces and resources. Exporters read labels from here at selection
//! time, so relabelling a resource changes what is exported without touching
//! any exporter.

use std::collections::HashMap;
use std::sync::Arc;

use tally_model::Manifest;

use crate::selector::Labels;

/// The namespace label that names the namespace's project. A namespace
/// without it is a project of its own (project = namespace name).
pub const PROJECT_LABEL: &str = "resourcemanager.miloapis.com/project-name";

/// What the index knows of a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub project: Arc<str>,
    pub labels: Arc<Labels>,
}

/// Identifies a resource: API group (`""` for the core group), kind, namespace, name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResourceRef<'a> {
    pub group: &'a str,
    pub kind: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
}

/// Read access to namespaces and resource labels. Implementations must be
/// cheap to query: the router calls them once per OTLP resource.
pub trait ResourceIndex: Send + Sync {
    /// The namespace's project and labels; `None` for an unknown namespace
    /// (whose series are then exported to no one).
    fn namespace(&self, namespace: &str) -> Option<NamespaceInfo>;
    /// The labels of a resource; `None` if the index does not know it.
    fn resource_labels(&self, resource: ResourceRef<'_>) -> Option<Arc<Labels>>;
    /// Every namespace the index knows. Pull sources use it to find the
    /// namespaces a `namespaceSelector` widens to; an index that cannot list
    /// them (the default) limits pulling to each exporter's own namespace.
    fn namespaces(&self) -> Vec<(String, NamespaceInfo)> {
        Vec::new()
    }
}

/// Why a manifest could not be indexed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    #[error("{kind} {name:?} has no metadata.namespace; only namespaced resources are indexed")]
    NotNamespaced { kind: String, name: String },
}

type ResourceKey = (String, String, String, String);

/// An in-memory [`ResourceIndex`] fed with manifests (`Namespace`, `Gateway`,
/// `HTTPRoute`, `Workload`, ...).
#[derive(Debug, Clone, Default)]
pub struct InMemoryResourceIndex {
    namespaces: HashMap<String, NamespaceInfo>,
    resources: HashMap<ResourceKey, Arc<Labels>>,
}

impl InMemoryResourceIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces what a manifest says: a `Namespace` (project from
    /// [`PROJECT_LABEL`]) or any namespaced resource (its labels).
    pub fn apply(&mut self, manifest: &Manifest) -> Result<(), IndexError> {
        let meta = &manifest.metadata;
        if manifest.kind == "Namespace" && api_group(&manifest.api_version).is_empty() {
            self.set_namespace(
                &meta.name,
                meta.labels.get(PROJECT_LABEL).unwrap_or(&meta.name),
                meta.labels.clone(),
            );
            return Ok(());
        }
        let namespace = meta
            .namespace
            .as_deref()
            .ok_or_else(|| IndexError::NotNamespaced {
                kind: manifest.kind.clone(),
                name: meta.name.clone(),
            })?;
        self.resources.insert(
            (
                api_group(&manifest.api_version).to_owned(),
                manifest.kind.clone(),
                namespace.to_owned(),
                meta.name.clone(),
            ),
            Arc::new(meta.labels.clone()),
        );
        Ok(())
    }

    /// Removes what a manifest added.
    pub fn delete(&mut self, manifest: &Manifest) {
        let meta = &manifest.metadata;
        if manifest.kind == "Namespace" {
            self.namespaces.remove(&meta.name);
        } else if let Some(namespace) = &meta.namespace {
            self.resources.remove(&(
                api_group(&manifest.api_version).to_owned(),
                manifest.kind.clone(),
                namespace.clone(),
                meta.name.clone(),
            ));
        }
    }

    /// Declares a namespace directly.
    pub fn set_namespace(&mut self, namespace: &str, project: &str, labels: Labels) {
        self.namespaces.insert(
            namespace.to_owned(),
            NamespaceInfo {
                project: Arc::from(project),
                labels: Arc::new(labels),
            },
        );
    }

    /// Sets a resource's labels directly.
    pub fn set_resource_labels(&mut self, resource: ResourceRef<'_>, labels: Labels) {
        self.resources.insert(
            (
                resource.group.to_owned(),
                resource.kind.to_owned(),
                resource.namespace.to_owned(),
                resource.name.to_owned(),
            ),
            Arc::new(labels),
        );
    }
}

impl ResourceIndex for InMemoryResourceIndex {
    fn namespace(&self, namespace: &str) -> Option<NamespaceInfo> {
        self.namespaces.get(namespace).cloned()
    }

    fn resource_labels(&self, r: ResourceRef<'_>) -> Option<Arc<Labels>> {
        // The tuple key needs owned strings; this allocation is per OTLP
        // resource, not per data point.
        self.resources
            .get(&(
                r.group.to_owned(),
                r.kind.to_owned(),
                r.namespace.to_owned(),
                r.name.to_owned(),
            ))
            .cloned()
    }

    fn namespaces(&self) -> Vec<(String, NamespaceInfo)> {
        self.namespaces
            .iter()
            .map(|(name, info)| (name.clone(), info.clone()))
            .collect()
    }
}

/// The API group of an `apiVersion` (`""` for `v1`).
fn api_group(api_version: &str) -> &str {
    api_version.rsplit_once('/').map_or("", |(group, _)| group)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_namespaces_and_resources_from_manifests() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns-a\n  labels: {resourcemanager.miloapis.com/project-name: p1, environment: production}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: lonely}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: gw, namespace: ns-a, labels: {app: my-gateway}}\n";
        let mut index = InMemoryResourceIndex::new();
        for m in Manifest::parse_documents(text).unwrap() {
            index.apply(&m).unwrap();
        }
        let ns = index.namespace("ns-a").unwrap();
        assert_eq!(&*ns.project, "p1");
        assert_eq!(ns.labels.get("environment").unwrap(), "production");
        assert_eq!(&*index.namespace("lonely").unwrap().project, "lonely");
        let gw = ResourceRef {
            group: "gateway.networking.k8s.io",
            kind: "Gateway",
            namespace: "ns-a",
            name: "gw",
        };
        assert_eq!(
            index.resource_labels(gw).unwrap().get("app").unwrap(),
            "my-gateway"
        );
        let m = &Manifest::parse_documents(text).unwrap()[2];
        index.delete(m);
        assert!(index.resource_labels(gw).is_none());
    }

    #[test]
    fn refuses_cluster_scoped_non_namespace_resources() {
        let m = &Manifest::parse_documents("apiVersion: x/v1\nkind: Thing\nmetadata: {name: t}\n")
            .unwrap()[0];
        assert!(matches!(
            InMemoryResourceIndex::new().apply(m),
            Err(IndexError::NotNamespaced { .. })
        ));
    }
}
