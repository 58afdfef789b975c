//! The `Exporter` resource as written by people (`telemetry.datumapis.com/v1alpha1`).
//!
//! These types only describe the YAML/JSON shape; [`crate::Exporter::from_manifest`]
//! validates them and compiles what the router runs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The API version of `Exporter`.
pub const API_VERSION: &str = "telemetry.datumapis.com/v1alpha1";
/// The kind name of `Exporter`.
pub const KIND: &str = "Exporter";

/// `spec` of an `Exporter`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExporterSpec {
    #[serde(default)]
    pub sources: Vec<SourceSpec>,
    #[serde(default)]
    pub sinks: Vec<SinkSpec>,
}

/// One telemetry source of an exporter.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsSourceSpec>,
}

/// Which metrics a source takes: a MetricsQL series selector, or resource
/// selectors (mutually exclusive). Neither means every metric the exporter may see.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricsSourceSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metricsql: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_selectors: Option<Vec<ResourceSelectorSpec>>,
}

/// Selects resources by their namespace's labels, their own labels and their kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceSelectorSpec {
    /// Widens the exporter's view to the namespaces of its own project whose
    /// labels match. Absent: the exporter's own namespace only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelectorSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_selectors: Option<LabelSelectorSpec>,
    /// Empty: every kind.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kinds: Vec<KindSelectorSpec>,
}

/// A Kubernetes label selector.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelectorSpec {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirementSpec>,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelectorRequirementSpec {
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// Kinds by API group and plural resource name or kind (`*` for any).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KindSelectorSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kinds: Vec<String>,
}

/// One destination of an exporter.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SinkSpec {
    pub name: String,
    #[serde(default, rename = "otlp_http", skip_serializing_if = "Option::is_none")]
    pub otlp_http: Option<OtlpHttpSpec>,
    /// Extra request headers (may also be given under `otlp_http`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderSpec>,
    /// `cumulative` (default) or `delta` (may also be given under `otlp_http`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temporality: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
}

/// An OTLP/HTTP endpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OtlpHttpSpec {
    /// The base URL; `/v1/metrics` is appended unless the path already ends with it.
    pub endpoint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<AuthenticationSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temporality: Option<String>,
    /// `protobuf` (default) or `json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
    /// `gzip` (default) or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// Timeout of one request, from sending to the end of the answer
    /// (default: the server's, 10s; at most 5m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// How the sink authenticates.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthenticationSpec {
    /// `bearerToken` or `basic`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRefSpec>,
}

/// A reference to one key of a `Secret` in the exporter's namespace.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretRefSpec {
    #[serde(default)]
    pub name: String,
    /// Required for `bearerToken` and headers; `basic` reads `username` and `password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// A request header whose value is a literal or comes from a secret.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRefSpec>,
}

/// `batch` settings of a sink.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BatchSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<u64>,
}

/// `retry` settings of a sink.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetrySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Attempts per batch, the first included (default: no limit but
    /// `maxElapsedTime`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// The first backoff (default 2s); it doubles up to the server's
    /// longest backoff (30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
    /// No retry starts later than this after a batch's first attempt
    /// (default 5m, at most 24h): the budget of a fault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_elapsed_time: Option<String>,
}
