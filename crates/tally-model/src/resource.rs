//! The Kubernetes-style envelope shared by every resource, and multi-document
//! YAML/JSON parsing.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    #[error("document {document}: {message}")]
    Parse { document: usize, message: String },
    #[error("unknown kind {0:?}; known kinds: MeterDefinition, MonitoredResourceType")]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    MeterDefinition,
    MonitoredResourceType,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::MeterDefinition, Kind::MonitoredResourceType];

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
            Kind::MonitoredResourceType => &["billing.miloapis.com/v1alpha1"],
        }
    }

    /// Lower-case plural, as used in URLs and `tally get`.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::MeterDefinition => "meterdefinitions",
            Kind::MonitoredResourceType => "monitoredresourcetypes",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::MeterDefinition => "MeterDefinition",
            Kind::MonitoredResourceType => "MonitoredResourceType",
        }
    }

    /// Whether resources of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        false
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = ResourceError;

    /// Accepts the kind, its plural, its singular, or its short name, in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        match lower.as_str() {
            "meterdefinition" | "meterdefinitions" | "meter" | "meters" | "md" => {
                Ok(Kind::MeterDefinition)
            }
            "monitoredresourcetype" | "monitoredresourcetypes" | "mrt" => {
                Ok(Kind::MonitoredResourceType)
            }
            _ => Err(ResourceError::UnknownKind(s.to_owned())),
        }
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
}

impl Manifest {
    /// Parses a multi-document YAML (or JSON, which is YAML) text. Empty
    /// documents are skipped; a `List` (`items: [...]`) is flattened.
    pub fn parse_documents(text: &str) -> Result<Vec<Manifest>, ResourceError> {
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

    /// The kind, checked against the API version.
    pub fn typed_kind(&self) -> Result<Kind, ResourceError> {
        let kind: Kind = self.kind.parse()?;
        if kind.as_str() != self.kind {
            return Err(ResourceError::UnknownKind(self.kind.clone()));
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
    fn checks_api_versions_and_names() {
        let m = Manifest {
            api_version: "v1".into(),
            kind: "MeterDefinition".into(),
            metadata: ObjectMeta::default(),
            spec: Value::Null,
            status: None,
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
