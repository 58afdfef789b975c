//! The YAML/JSON shape of a `TelemetryPolicy`'s `spec`. Unknown fields are
//! refused (the policy is `Invalid`), so a misspelt section never silently
//! does nothing.

use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySpec {
    #[serde(default)]
    pub target_refs: Vec<TargetRefSpec>,
    #[serde(default)]
    pub access_logs: Option<AccessLogsSpec>,
    #[serde(default)]
    pub metrics: Option<MetricsSpec>,
    #[serde(default)]
    pub tracing: Option<TracingSpec>,
    #[serde(default, rename = "genAI")]
    pub gen_ai: Option<GenAiSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRefSpec {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLogsSpec {
    #[serde(default)]
    pub matches: Vec<MatchSpec>,
    #[serde(default)]
    pub fields: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MatchSpec {
    pub cel: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricsSpec {
    #[serde(default)]
    pub dimensions: Vec<KeyValueSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyValueSpec {
    pub name: String,
    pub from: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingSpec {
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub sampling_rate: Option<FractionSpec>,
    #[serde(default)]
    pub attributes: Vec<KeyValueSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FractionSpec {
    pub numerator: u32,
    #[serde(default = "hundred")]
    pub denominator: u32,
}

fn hundred() -> u32 {
    100
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GenAiSpec {}
