//! Unit tests' meter definitions, built as a manifest would declare them.

use serde_json::Value;
use tally_model::{Manifest, MeterDefinition};

/// The `MeterDefinition` named `m` with `spec`.
pub fn definition(spec: Value) -> MeterDefinition {
    let manifest = Manifest {
        api_version: "billing.miloapis.com/v1alpha1".into(),
        kind: "MeterDefinition".into(),
        metadata: tally_model::ObjectMeta {
            name: "m".into(),
            ..Default::default()
        },
        spec,
        status: None,
        extra: Default::default(),
    };
    MeterDefinition::from_manifest(&manifest).unwrap()
}
