//! Enrichment: gateway dimensions of an HTTPRoute, from `HTTPRoute`,
//! `Gateway` and `GatewayClass` manifests.
//!
//! A pure data structure: callers upsert and remove manifests (from files, a
//! watch, the API); nothing here reads files.

use std::collections::HashMap;

use serde::Deserialize;
use tally_model::Manifest;

const GATEWAY_API_GROUP: &str = "gateway.networking.k8s.io";
/// The region label read by default.
pub const DEFAULT_REGION_LABEL: &str = "topology.kubernetes.io/region";

/// Why a manifest could not be indexed.
#[derive(Debug, thiserror::Error)]
pub enum EnrichError {
    #[error("{kind} is not HTTPRoute, Gateway or GatewayClass of {GATEWAY_API_GROUP}")]
    UnsupportedKind { kind: String },
    #[error("{kind} {name} has no namespace")]
    MissingNamespace { kind: String, name: String },
    #[error("{kind} {name}: invalid spec: {source}")]
    InvalidSpec {
        kind: String,
        name: String,
        source: serde_json::Error,
    },
}

/// The dimensions known about one route; `None` where unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteDimensions {
    /// The region label of the Gateway, else of its GatewayClass.
    pub region: Option<String>,
    /// The first Gateway `parentRef` of the route.
    pub gateway: Option<String>,
    /// Its namespace (the route's unless the ref names one).
    pub gateway_namespace: Option<String>,
    /// The Gateway's `spec.gatewayClassName`.
    pub gateway_class: Option<String>,
    /// The HTTPRoute's `metadata.uid`.
    pub route_uid: Option<String>,
}

#[derive(Debug, Clone)]
struct RouteEntry {
    gateway: Option<(String, String)>,
    uid: Option<String>,
}

#[derive(Debug, Clone)]
struct GatewayEntry {
    class: Option<String>,
    region: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RouteSpec {
    #[serde(default)]
    parent_refs: Vec<ParentRef>,
}

#[derive(Deserialize)]
struct ParentRef {
    group: Option<String>,
    kind: Option<String>,
    namespace: Option<String>,
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GatewaySpec {
    gateway_class_name: Option<String>,
}

/// Index from HTTPRoute to its gateway dimensions.
#[derive(Debug, Clone)]
pub struct EnrichmentIndex {
    region_label: String,
    routes: HashMap<(String, String), RouteEntry>,
    gateways: HashMap<(String, String), GatewayEntry>,
    class_regions: HashMap<String, Option<String>>,
}

impl Default for EnrichmentIndex {
    fn default() -> Self {
        EnrichmentIndex::new(DEFAULT_REGION_LABEL)
    }
}

impl EnrichmentIndex {
    /// An empty index reading the region from `region_label` (on the
    /// Gateway, else on its GatewayClass).
    pub fn new(region_label: &str) -> Self {
        EnrichmentIndex {
            region_label: region_label.to_owned(),
            routes: HashMap::new(),
            gateways: HashMap::new(),
            class_regions: HashMap::new(),
        }
    }

    /// Adds or replaces one `HTTPRoute`, `Gateway` or `GatewayClass`.
    pub fn upsert(&mut self, manifest: &Manifest) -> Result<(), EnrichError> {
        let meta = &manifest.metadata;
        let kind = manifest.kind.as_str();
        let invalid = |source| EnrichError::InvalidSpec {
            kind: kind.to_owned(),
            name: meta.name.clone(),
            source,
        };
        if !manifest.api_version.starts_with(GATEWAY_API_GROUP) {
            return Err(EnrichError::UnsupportedKind {
                kind: kind.to_owned(),
            });
        }
        let region = meta.labels.get(&self.region_label).cloned();
        match kind {
            "GatewayClass" => {
                self.class_regions.insert(meta.name.clone(), region);
            }
            "Gateway" => {
                let spec: GatewaySpec =
                    serde_json::from_value(manifest.spec.clone()).map_err(invalid)?;
                let key = (namespace_of(manifest)?, meta.name.clone());
                let entry = GatewayEntry {
                    class: spec.gateway_class_name,
                    region,
                };
                self.gateways.insert(key, entry);
            }
            "HTTPRoute" => {
                let spec: RouteSpec =
                    serde_json::from_value(manifest.spec.clone()).map_err(invalid)?;
                let namespace = namespace_of(manifest)?;
                let gateway = spec
                    .parent_refs
                    .into_iter()
                    .find(|p| {
                        p.group.as_deref().unwrap_or(GATEWAY_API_GROUP) == GATEWAY_API_GROUP
                            && p.kind.as_deref().unwrap_or("Gateway") == "Gateway"
                    })
                    .map(|p| (p.namespace.unwrap_or_else(|| namespace.clone()), p.name));
                let entry = RouteEntry {
                    gateway,
                    uid: meta.uid.clone(),
                };
                self.routes.insert((namespace, meta.name.clone()), entry);
            }
            other => {
                return Err(EnrichError::UnsupportedKind {
                    kind: other.to_owned(),
                });
            }
        }
        Ok(())
    }

    /// Removes one object; `namespace` is ignored for `GatewayClass`.
    /// Returns whether it was indexed.
    pub fn remove(&mut self, kind: &str, namespace: &str, name: &str) -> bool {
        let key = (namespace.to_owned(), name.to_owned());
        match kind {
            "GatewayClass" => self.class_regions.remove(name).is_some(),
            "Gateway" => self.gateways.remove(&key).is_some(),
            "HTTPRoute" => self.routes.remove(&key).is_some(),
            _ => false,
        }
    }

    /// What is known about the HTTPRoute `namespace/name`.
    pub fn dimensions(&self, namespace: &str, name: &str) -> RouteDimensions {
        let Some(route) = self.routes.get(&(namespace.to_owned(), name.to_owned())) else {
            return RouteDimensions::default();
        };
        let mut dims = RouteDimensions {
            route_uid: route.uid.clone(),
            ..RouteDimensions::default()
        };
        let Some((gw_namespace, gw_name)) = &route.gateway else {
            return dims;
        };
        dims.gateway = Some(gw_name.clone());
        dims.gateway_namespace = Some(gw_namespace.clone());
        if let Some(gateway) = self.gateways.get(&(gw_namespace.clone(), gw_name.clone())) {
            dims.gateway_class = gateway.class.clone();
            let class_region = gateway
                .class
                .as_ref()
                .and_then(|c| self.class_regions.get(c).cloned().flatten());
            dims.region = gateway.region.clone().or(class_region);
        }
        dims
    }
}

fn namespace_of(manifest: &Manifest) -> Result<String, EnrichError> {
    manifest
        .metadata
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| EnrichError::MissingNamespace {
            kind: manifest.kind.clone(),
            name: manifest.metadata.name.clone(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFESTS: &str = include_str!("../tests/fixtures/gateway-api.yaml");

    fn index() -> EnrichmentIndex {
        let mut index = EnrichmentIndex::default();
        for manifest in Manifest::parse_documents(MANIFESTS).unwrap() {
            index.upsert(&manifest).unwrap();
        }
        index
    }

    #[test]
    fn route_gets_gateway_class_and_region() {
        let dims = index().dimensions("ns-0", "route-0");
        assert_eq!(dims.gateway.as_deref(), Some("edge"));
        assert_eq!(dims.gateway_namespace.as_deref(), Some("infra"));
        assert_eq!(dims.gateway_class.as_deref(), Some("envoy"));
        assert_eq!(dims.region.as_deref(), Some("us-east-1"), "from the class");
        assert_eq!(dims.route_uid.as_deref(), Some("4b1c"));
        assert_eq!(
            index().dimensions("ns-0", "other"),
            RouteDimensions::default()
        );
    }

    #[test]
    fn gateway_label_wins_and_remove_forgets() {
        let mut index = index();
        let mut gateway = Manifest::parse_documents(MANIFESTS).unwrap().remove(1);
        gateway
            .metadata
            .labels
            .insert(DEFAULT_REGION_LABEL.into(), "eu-west-1".into());
        index.upsert(&gateway).unwrap();
        assert_eq!(
            index.dimensions("ns-0", "route-0").region.as_deref(),
            Some("eu-west-1")
        );
        assert!(index.remove("Gateway", "infra", "edge"));
        let dims = index.dimensions("ns-0", "route-0");
        assert_eq!(
            (dims.gateway.as_deref(), dims.gateway_class),
            (Some("edge"), None)
        );
        assert!(index.remove("HTTPRoute", "ns-0", "route-0"));
        assert_eq!(
            index.dimensions("ns-0", "route-0"),
            RouteDimensions::default()
        );
    }

    #[test]
    fn other_kinds_are_refused() {
        let doc = "apiVersion: v1\nkind: Service\nmetadata:\n  name: x\n  namespace: y\nspec: {}\n";
        let manifest = Manifest::parse_documents(doc).unwrap().remove(0);
        assert!(matches!(
            EnrichmentIndex::default().upsert(&manifest),
            Err(EnrichError::UnsupportedKind { .. })
        ));
    }
}
