//! The Kubernetes-style envelope shared by every resource, and multi-document
//! YAML/JSON parsing.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::nesting::{MAX_MANIFEST_DEPTH, yaml_too_deep};

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    #[error("document {document}: {message}")]
    Parse { document: usize, message: String },
    #[error("line {line}: the text nests deeper than {max} levels; flatten it")]
    TooDeep { line: usize, max: usize },
    #[error(
        "unknown kind {0:?}; known kinds: MeterDefinition, MonitoredResourceType, \
         BillingAccount, BillingAccountBinding, BillingSink, Exporter, TelemetryPolicy, Secret, Namespace, \
         GatewayClass, Gateway, HTTPRoute, Workload, Instance"
    )]
    UnknownKind(String),
    #[error("{kind} does not accept apiVersion {api_version:?}; use {expected}")]
    WrongApiVersion {
        kind: Kind,
        api_version: String,
        expected: &'static str,
    },
    #[error("{kind} {name:?}: {message}")]
    Invalid {
        kind: Kind,
        name: String,
        message: String,
    },
    #[error("{kind} {name:?}: {message}")]
    Conflict {
        kind: Kind,
        name: String,
        message: String,
    },
}

/// The resource kinds this build of Tally understands.
///
/// Catalog kinds (`MeterDefinition`, `MonitoredResourceType`) change what the
/// ledger measures and are applied by it; every other kind lives in the
/// resource store. Platform kinds (`Namespace`, Gateway API and compute
/// resources) are mirrored into Tally so that exporters and the edge agent
/// can read their labels and ownership.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    MeterDefinition,
    MonitoredResourceType,
    BillingAccount,
    BillingAccountBinding,
    BillingSink,
    Exporter,
    TelemetryPolicy,
    Secret,
    Namespace,
    GatewayClass,
    Gateway,
    HTTPRoute,
    Workload,
    Instance,
}

/// Who may write a kind, and what it is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KindClass {
    /// Meters and billable resource types: operators write, anyone reads.
    Catalog,
    /// Billing accounts and bindings: operators only.
    Billing,
    /// Exporters, policies and secrets: a project manages its own.
    Customer,
    /// Mirrors of the platform's own resources: operators write.
    Platform,
}

impl Kind {
    pub const ALL: [Kind; 14] = [
        Kind::MeterDefinition,
        Kind::MonitoredResourceType,
        Kind::BillingAccount,
        Kind::BillingAccountBinding,
        Kind::BillingSink,
        Kind::Exporter,
        Kind::TelemetryPolicy,
        Kind::Secret,
        Kind::Namespace,
        Kind::GatewayClass,
        Kind::Gateway,
        Kind::HTTPRoute,
        Kind::Workload,
        Kind::Instance,
    ];

    /// The API version written on output; the first of `api_versions`.
    pub fn api_version(self) -> &'static str {
        self.api_versions()[0]
    }

    /// Every API version accepted on input.
    pub fn api_versions(self) -> &'static [&'static str] {
        match self {
            Kind::MeterDefinition => &[
                "billing.miloapis.com/v1alpha1",
                "services.miloapis.com/v1alpha1",
            ],
            Kind::MonitoredResourceType
            | Kind::BillingAccount
            | Kind::BillingAccountBinding
            | Kind::BillingSink => &["billing.miloapis.com/v1alpha1"],
            Kind::Exporter | Kind::TelemetryPolicy => &["telemetry.datumapis.com/v1alpha1"],
            Kind::Secret | Kind::Namespace => &["v1"],
            Kind::GatewayClass | Kind::Gateway | Kind::HTTPRoute => &[
                "gateway.networking.k8s.io/v1",
                "gateway.networking.k8s.io/v1beta1",
            ],
            Kind::Workload | Kind::Instance => &[
                "compute.datumapis.com/v1alpha",
                "compute.datumapis.com/v1alpha1",
            ],
        }
    }

    /// Lower-case plural, as used in URLs and `tally get`.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::MeterDefinition => "meterdefinitions",
            Kind::MonitoredResourceType => "monitoredresourcetypes",
            Kind::BillingAccount => "billingaccounts",
            Kind::BillingAccountBinding => "billingaccountbindings",
            Kind::BillingSink => "billingsinks",
            Kind::Exporter => "exporters",
            Kind::TelemetryPolicy => "telemetrypolicies",
            Kind::Secret => "secrets",
            Kind::Namespace => "namespaces",
            Kind::GatewayClass => "gatewayclasses",
            Kind::Gateway => "gateways",
            Kind::HTTPRoute => "httproutes",
            Kind::Workload => "workloads",
            Kind::Instance => "instances",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::MeterDefinition => "MeterDefinition",
            Kind::MonitoredResourceType => "MonitoredResourceType",
            Kind::BillingAccount => "BillingAccount",
            Kind::BillingAccountBinding => "BillingAccountBinding",
            Kind::BillingSink => "BillingSink",
            Kind::Exporter => "Exporter",
            Kind::TelemetryPolicy => "TelemetryPolicy",
            Kind::Secret => "Secret",
            Kind::Namespace => "Namespace",
            Kind::GatewayClass => "GatewayClass",
            Kind::Gateway => "Gateway",
            Kind::HTTPRoute => "HTTPRoute",
            Kind::Workload => "Workload",
            Kind::Instance => "Instance",
        }
    }

    /// Whether resources of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        matches!(
            self,
            Kind::Exporter
                | Kind::TelemetryPolicy
                | Kind::Secret
                | Kind::Gateway
                | Kind::HTTPRoute
                | Kind::Workload
                | Kind::Instance
        )
    }

    /// What the kind is for, which decides who may read and write it.
    pub fn class(self) -> KindClass {
        match self {
            Kind::MeterDefinition | Kind::MonitoredResourceType => KindClass::Catalog,
            Kind::BillingAccount | Kind::BillingAccountBinding | Kind::BillingSink => {
                KindClass::Billing
            }
            Kind::Exporter | Kind::TelemetryPolicy | Kind::Secret => KindClass::Customer,
            Kind::Namespace
            | Kind::GatewayClass
            | Kind::Gateway
            | Kind::HTTPRoute
            | Kind::Workload
            | Kind::Instance => KindClass::Platform,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = ResourceError;

    /// Accepts the kind, its plural, or a short name, in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        let short = match lower.as_str() {
            "meter" | "meters" | "md" => Some(Kind::MeterDefinition),
            "mrt" => Some(Kind::MonitoredResourceType),
            "ba" => Some(Kind::BillingAccount),
            "bab" | "binding" | "bindings" => Some(Kind::BillingAccountBinding),
            "ns" => Some(Kind::Namespace),
            _ => None,
        };
        short
            .or_else(|| {
                Kind::ALL
                    .into_iter()
                    .find(|k| lower == k.plural() || lower == k.as_str().to_ascii_lowercase())
            })
            .ok_or_else(|| ResourceError::UnknownKind(s.to_owned()))
    }
}

/// `metadata` of a resource.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// When the resource was last created or changed (set by the store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_timestamp: Option<Timestamp>,
}

/// A resource as written by people: `apiVersion`, `kind`, `metadata`, `spec`,
/// and (on output) `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Value>,
    /// Top-level fields other kinds carry besides `spec` (a `Secret`'s
    /// `data`, `stringData` and `type`).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

impl Manifest {
    /// Parses a multi-document YAML text, or one or more JSON documents.
    /// Empty documents are skipped; a `List` (`items: [...]`) is flattened.
    ///
    /// Text that nests deeper than [`MAX_MANIFEST_DEPTH`] is refused before
    /// it is parsed ([`crate::nesting`]). Text that reads as JSON is read as
    /// JSON: JSON is nearly YAML, but YAML limits an implicit key to 1,024
    /// characters, so a JSON document with a longer key (one `tally get -o
    /// json` may print) would not read back through the YAML parser.
    pub fn parse_documents(text: &str) -> Result<Vec<Manifest>, ResourceError> {
        if let Some(line) = yaml_too_deep(text, MAX_MANIFEST_DEPTH) {
            return Err(ResourceError::TooDeep {
                line,
                max: MAX_MANIFEST_DEPTH,
            });
        }
        if let Some(values) = json_documents(text) {
            let mut manifests = Vec::new();
            for (index, value) in values.into_iter().enumerate() {
                collect_manifests(value, index + 1, &mut manifests)?;
            }
            return Ok(manifests);
        }
        let mut manifests = Vec::new();
        for (index, document) in serde_norway::Deserializer::from_str(text).enumerate() {
            let document_number = index + 1;
            let value = Value::deserialize(document).map_err(|e| ResourceError::Parse {
                document: document_number,
                message: e.to_string(),
            })?;
            collect_manifests(value, document_number, &mut manifests)?;
        }
        Ok(manifests)
    }

    /// The kind, checked against the API version and the top-level fields
    /// the kind has (so a misspelt `spec` is refused, not ignored).
    pub fn typed_kind(&self) -> Result<Kind, ResourceError> {
        let kind: Kind = self.kind.parse()?;
        if kind.as_str() != self.kind {
            return Err(ResourceError::UnknownKind(self.kind.clone()));
        }
        let allowed: &[&str] = match kind {
            Kind::Secret => &["data", "stringData", "type", "immutable"],
            _ => &[],
        };
        if let Some(field) = self.extra.keys().find(|k| !allowed.contains(&k.as_str())) {
            let mut known = vec!["apiVersion", "kind", "metadata", "spec", "status"];
            known.extend_from_slice(allowed);
            return Err(ResourceError::Invalid {
                kind,
                name: self.metadata.name.clone(),
                message: format!(
                    "unknown top-level field {field:?}; a {kind} has: {}",
                    known.join(", ")
                ),
            });
        }
        if !kind.api_versions().contains(&self.api_version.as_str()) {
            return Err(ResourceError::WrongApiVersion {
                kind,
                api_version: self.api_version.clone(),
                expected: kind.api_version(),
            });
        }
        Ok(kind)
    }
}

/// The JSON values `text` holds, when it is wholly one or more JSON
/// documents (an object or array each); `None` when it is not JSON.
fn json_documents(text: &str) -> Option<Vec<Value>> {
    if !text.trim_start().starts_with(['{', '[']) {
        return None;
    }
    serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .collect::<Result<Vec<_>, _>>()
        .ok()
}

fn collect_manifests(
    value: Value,
    document: usize,
    out: &mut Vec<Manifest>,
) -> Result<(), ResourceError> {
    match value {
        Value::Null => Ok(()),
        Value::Array(items) => items
            .into_iter()
            .try_for_each(|item| collect_manifests(item, document, out)),
        Value::Object(ref map) if map.get("kind").and_then(Value::as_str) == Some("List") => {
            let items = map.get("items").cloned().unwrap_or(Value::Array(vec![]));
            collect_manifests(items, document, out)
        }
        value => {
            let manifest: Manifest =
                serde_json::from_value(value).map_err(|e| ResourceError::Parse {
                    document,
                    message: e.to_string(),
                })?;
            out.push(manifest);
            Ok(())
        }
    }
}

/// Checks a resource name: 1 to 253 characters of lower-case letters, digits,
/// `-`, `_` and `.`, starting and ending with a letter or digit.
pub fn validate_name(name: &str) -> Result<(), String> {
    let bytes = name.as_bytes();
    let edge_ok = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if name.is_empty() || name.len() > 253 {
        return Err("metadata.name must be 1 to 253 characters".into());
    }
    if !edge_ok(bytes.first()) || !edge_ok(bytes.last()) {
        return Err(format!(
            "metadata.name {name:?} must start and end with a lower-case letter or digit"
        ));
    }
    if !bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(format!(
            "metadata.name {name:?} may hold only lower-case letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_multi_document_yaml_and_lists() {
        let text = "---\napiVersion: billing.miloapis.com/v1alpha1\nkind: MeterDefinition\nmetadata: {name: a}\nspec: {}\n---\n---\nkind: List\nitems:\n- apiVersion: billing.miloapis.com/v1alpha1\n  kind: MonitoredResourceType\n  metadata: {name: b}\n";
        let manifests = Manifest::parse_documents(text).unwrap();
        assert_eq!(manifests.len(), 2);
        assert_eq!(manifests[0].typed_kind().unwrap(), Kind::MeterDefinition);
        assert_eq!(manifests[1].metadata.name, "b");
    }

    #[test]
    fn reads_json_with_keys_longer_than_yaml_allows() {
        let key = "k".repeat(2_000);
        let text = format!(
            r#"{{"apiVersion":"v1","kind":"Secret","metadata":{{"name":"a","labels":{{"{key}":"v"}}}}}}
            {{"apiVersion":"v1","kind":"Secret","metadata":{{"name":"b"}}}}"#
        );
        let manifests = Manifest::parse_documents(&text).unwrap();
        assert_eq!(manifests.len(), 2);
        assert_eq!(manifests[0].metadata.labels[&key], "v");
        assert_eq!(manifests[1].metadata.name, "b");
        // Flow-style YAML that is not JSON still reads as YAML.
        let flow = Manifest::parse_documents("{apiVersion: v1, kind: Secret, metadata: {name: c}}")
            .unwrap();
        assert_eq!(flow[0].metadata.name, "c");
    }

    #[test]
    fn reports_the_document_that_failed() {
        let err =
            Manifest::parse_documents("kind: X\nmetadata: {name: a}\napiVersion: v\n---\n[: bad")
                .unwrap_err();
        assert!(
            matches!(err, ResourceError::Parse { document: 2, .. }),
            "{err}"
        );
    }

    #[test]
    fn misspelt_top_level_fields_are_refused() {
        let m = Manifest::parse_documents(
            "apiVersion: billing.miloapis.com/v1alpha1\nkind: MeterDefinition\nmetadata: {name: a}\nsepc: {}\n",
        )
        .unwrap()
        .remove(0);
        let err = m.typed_kind().unwrap_err().to_string();
        assert!(err.contains("\"sepc\""), "{err}");
        let secret = Manifest::parse_documents(
            "apiVersion: v1\nkind: Secret\nmetadata: {name: a}\ntype: Opaque\nstringData: {k: v}\n",
        )
        .unwrap()
        .remove(0);
        assert_eq!(secret.typed_kind().unwrap(), Kind::Secret);
    }

    #[test]
    fn checks_api_versions_and_names() {
        let m = Manifest {
            api_version: "v1".into(),
            kind: "MeterDefinition".into(),
            metadata: ObjectMeta::default(),
            spec: Value::Null,
            status: None,
            extra: Default::default(),
        };
        assert!(matches!(
            m.typed_kind(),
            Err(ResourceError::WrongApiVersion { .. })
        ));
        assert!(validate_name("gateway-requests.v1_x").is_ok());
        assert!(validate_name("Gateway").is_err());
        assert!(validate_name("-a").is_err());
        assert!(validate_name("").is_err());
    }
}

#[cfg(test)]
mod hostile_tests {
    use super::*;

    #[test]
    fn alias_bombs_and_deep_nesting_are_refused() {
        let bomb = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n\
                    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n\
                    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n\
                    g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]\nh: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]\n\
                    i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]\n";
        // The YAML parser bounds how often aliases may repeat a node.
        let err = Manifest::parse_documents(bomb).unwrap_err();
        assert!(err.to_string().contains("repetition limit"), "{err}");
        let deep = format!("{}{}", "- ".repeat(50_000), "x");
        let err = Manifest::parse_documents(&deep).unwrap_err();
        assert!(matches!(err, ResourceError::TooDeep { line: 1, max: 64 }));
    }
}
