//! A Kubernetes-style status condition, as `Exporter`s and
//! `TelemetryPolicy`s report them.

use serde::Serialize;

/// One condition of a resource's `status.conditions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: String,
    /// `"True"`, `"False"` or `"Unknown"`.
    pub status: String,
    pub reason: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<u64>,
    /// The sink a per-sink condition (`SinkHealthy`) is about.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sink: Option<String>,
    /// The source a per-source condition (`SourceHealthy`) is about.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}
