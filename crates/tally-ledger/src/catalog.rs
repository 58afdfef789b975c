//! The resource catalog and the rules for changing it.
//!
//! Backends persist manifests; the catalog decides whether a change is
//! allowed and what it implies (a meter to rebuild, quarantined events to
//! look at again). One validation path for every way a manifest arrives.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use jiff::Timestamp;
use tally_meter::CompiledMeter;
use tally_model::{Kind, Manifest, MeterDefinition, MeterPhase, MonitoredResourceType};

use crate::{ApplyAction, ApplyMode, LedgerError};

/// Compiled meters by the event type they read.
pub type MetersByType = HashMap<String, Vec<Arc<CompiledMeter>>>;

/// What applying a manifest means.
#[derive(Debug, Clone)]
pub struct ApplyPlan {
    pub action: ApplyAction,
    /// The manifest to store: server-owned metadata filled in, no status.
    pub manifest: Manifest,
    /// A meter whose rollups must be (re)built from the log.
    pub rebuild_meter: Option<String>,
    /// Meters whose quarantined events may now be measurable.
    pub reprocess_meters: Vec<String>,
}

/// All resources, validated.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    resources: BTreeMap<(Kind, String), Manifest>,
    meters: BTreeMap<String, MeterDefinition>,
    resource_types: BTreeMap<String, MonitoredResourceType>,
}

impl Catalog {
    /// Rebuilds a catalog from stored manifests.
    pub fn load(manifests: impl IntoIterator<Item = Manifest>) -> Result<Catalog, LedgerError> {
        let mut catalog = Catalog::default();
        for manifest in manifests {
            catalog.commit(manifest)?;
        }
        Ok(catalog)
    }

    pub fn get(&self, kind: Kind, name: &str) -> Option<&Manifest> {
        self.resources.get(&(kind, name.to_owned()))
    }

    pub fn list(&self, kind: Kind) -> impl Iterator<Item = &Manifest> {
        self.resources
            .range((kind, String::new())..)
            .take_while(move |((k, _), _)| *k == kind)
            .map(|(_, m)| m)
    }

    pub fn meter(&self, name: &str) -> Option<&MeterDefinition> {
        self.meters.get(name)
    }

    pub fn meters(&self) -> impl Iterator<Item = (&str, &MeterDefinition)> {
        self.meters.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Compiles one meter against the current resource types.
    pub fn compile(&self, name: &str) -> Option<Result<CompiledMeter, String>> {
        let types: Vec<_> = self.resource_types.values().cloned().collect();
        self.meters
            .get(name)
            .map(|def| CompiledMeter::compile(name, def, &types))
    }

    /// Every meter, compiled, by event type.
    pub fn meters_by_type(&self) -> MetersByType {
        let types: Vec<_> = self.resource_types.values().cloned().collect();
        let mut out: MetersByType = HashMap::new();
        for (name, def) in &self.meters {
            // Definitions were validated on apply, so compiling cannot fail
            // unless a resource type label path is broken; such meters are
            // skipped here and reported in their status.
            if let Ok(meter) = CompiledMeter::compile(name, def, &types) {
                out.entry(def.event_type().to_owned())
                    .or_default()
                    .push(Arc::new(meter));
            }
        }
        out
    }

    /// Decides whether `manifest` may be applied now, and what it implies.
    pub fn plan_apply(
        &self,
        mut manifest: Manifest,
        mode: ApplyMode,
        now: Timestamp,
    ) -> Result<ApplyPlan, LedgerError> {
        let kind = manifest.typed_kind()?;
        manifest.api_version = kind.api_version().to_owned();
        manifest.status = None;
        if !kind.namespaced() {
            manifest.metadata.namespace = None;
        }
        let name = manifest.metadata.name.clone();
        let previous = self.get(kind, &name);
        if mode == ApplyMode::CreateOnly && previous.is_some() {
            return Err(LedgerError::Conflict(format!(
                "{kind} {name:?} already exists"
            )));
        }
        let mut rebuild_meter = None;
        let mut reprocess_meters = Vec::new();
        match kind {
            Kind::MeterDefinition => {
                let next = MeterDefinition::from_manifest(&manifest)?;
                // Normalise the spec so stored manifests compare equal.
                manifest.spec =
                    serde_json::to_value(&next).map_err(|e| LedgerError::Storage(e.to_string()))?;
                let types: Vec<_> = self.resource_types.values().cloned().collect();
                CompiledMeter::compile(&name, &next, &types).map_err(LedgerError::Invalid)?;
                if let Some(duplicate) = self
                    .meters
                    .iter()
                    .find(|(other, def)| **other != name && def.meter_name == next.meter_name)
                {
                    return Err(LedgerError::Conflict(format!(
                        "meterName {:?} is already used by MeterDefinition {:?}",
                        next.meter_name, duplicate.0
                    )));
                }
                match self.meters.get(&name) {
                    None => rebuild_meter = Some(name.clone()),
                    Some(old) => {
                        old.check_update(&next).map_err(|message| {
                            LedgerError::Conflict(format!("MeterDefinition {name:?}: {message}"))
                        })?;
                        if old.measures_differently(&next) {
                            rebuild_meter = Some(name.clone());
                        } else if old.phase != next.phase {
                            reprocess_meters.push(name.clone());
                        }
                    }
                }
            }
            Kind::MonitoredResourceType => {
                let next = MonitoredResourceType::from_manifest(&manifest)?;
                manifest.spec =
                    serde_json::to_value(&next).map_err(|e| LedgerError::Storage(e.to_string()))?;
                let old_name = self
                    .resource_types
                    .get(&name)
                    .map(|t| t.resource_type_name.clone());
                reprocess_meters = self
                    .meters
                    .iter()
                    .filter(|(_, def)| {
                        def.monitored_resource_types
                            .iter()
                            .any(|t| *t == next.resource_type_name || Some(t) == old_name.as_ref())
                    })
                    .map(|(meter, _)| meter.clone())
                    .collect();
            }
            other => {
                return Err(LedgerError::Invalid(format!(
                    "{other} is kept by the resource store, not the meter catalog"
                )));
            }
        }
        let action = crate::resources::stamp(&mut manifest, previous, now, false);
        if action == ApplyAction::Unchanged {
            return Ok(ApplyPlan {
                action,
                manifest,
                rebuild_meter: None,
                reprocess_meters: vec![],
            });
        }
        Ok(ApplyPlan {
            action,
            manifest,
            rebuild_meter,
            reprocess_meters,
        })
    }

    /// Decides whether a resource may be deleted.
    pub fn plan_delete(&self, kind: Kind, name: &str) -> Result<(), LedgerError> {
        if self.get(kind, name).is_none() {
            return Err(LedgerError::not_found(kind, name));
        }
        if let Some(meter) = self
            .meters
            .get(name)
            .filter(|_| kind == Kind::MeterDefinition)
            && matches!(meter.phase, MeterPhase::Published | MeterPhase::Deprecated)
        {
            return Err(LedgerError::Conflict(format!(
                "MeterDefinition {name:?} is {:?}; only Draft and Retired meters can be deleted (retire it first)",
                meter.phase
            )));
        }
        Ok(())
    }

    /// Records a manifest that was made durable.
    pub fn commit(&mut self, manifest: Manifest) -> Result<(), LedgerError> {
        let kind = manifest.typed_kind()?;
        let name = manifest.metadata.name.clone();
        match kind {
            Kind::MeterDefinition => {
                self.meters
                    .insert(name.clone(), MeterDefinition::from_manifest(&manifest)?);
            }
            Kind::MonitoredResourceType => {
                self.resource_types.insert(
                    name.clone(),
                    MonitoredResourceType::from_manifest(&manifest)?,
                );
            }
            other => {
                return Err(LedgerError::Invalid(format!(
                    "{other} is kept by the resource store, not the meter catalog"
                )));
            }
        }
        self.resources.insert((kind, name), manifest);
        Ok(())
    }

    /// Forgets a resource that was deleted durably.
    pub fn remove(&mut self, kind: Kind, name: &str) {
        self.resources.remove(&(kind, name.to_owned()));
        match kind {
            Kind::MeterDefinition => {
                self.meters.remove(name);
            }
            Kind::MonitoredResourceType => {
                self.resource_types.remove(name);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Manifest {
        Manifest::parse_documents(text).unwrap().remove(0)
    }

    const METER: &str = "apiVersion: billing.miloapis.com/v1alpha1\nkind: MeterDefinition\nmetadata: {name: requests}\nspec:\n  meterName: gw/requests\n  phase: PHASE\n  measurement: {aggregation: Sum, unit: UNIT}\n";

    fn meter(phase: &str, unit: &str) -> Manifest {
        parse(&METER.replace("PHASE", phase).replace("UNIT", unit))
    }

    fn now() -> Timestamp {
        Timestamp::UNIX_EPOCH
    }

    #[test]
    fn create_update_and_unchanged() {
        let mut c = Catalog::default();
        let plan = c
            .plan_apply(meter("Draft", "s"), ApplyMode::Upsert, now())
            .unwrap();
        assert_eq!(plan.action, ApplyAction::Created);
        assert_eq!(plan.rebuild_meter.as_deref(), Some("requests"));
        let uid = plan.manifest.metadata.uid.clone();
        c.commit(plan.manifest).unwrap();
        let plan = c
            .plan_apply(meter("Draft", "s"), ApplyMode::Upsert, now())
            .unwrap();
        assert_eq!(plan.action, ApplyAction::Unchanged);
        let plan = c
            .plan_apply(meter("Published", "s"), ApplyMode::Upsert, now())
            .unwrap();
        assert_eq!(plan.action, ApplyAction::Configured);
        assert_eq!(plan.manifest.metadata.uid, uid);
        assert_eq!(plan.manifest.metadata.generation, Some(2));
        assert!(plan.rebuild_meter.is_none());
        c.commit(plan.manifest).unwrap();
        let err = c
            .plan_apply(meter("Published", "By"), ApplyMode::Upsert, now())
            .unwrap_err();
        assert!(err.to_string().contains("unit"), "{err}");
        let err = c
            .plan_apply(meter("Draft", "s"), ApplyMode::Upsert, now())
            .unwrap_err();
        assert!(err.to_string().contains("forward"), "{err}");
        assert!(c.plan_delete(Kind::MeterDefinition, "requests").is_err());
    }

    #[test]
    fn meter_names_are_unique() {
        let mut c = Catalog::default();
        c.commit(
            c.plan_apply(meter("Draft", "s"), ApplyMode::Upsert, now())
                .unwrap()
                .manifest,
        )
        .unwrap();
        let mut other = meter("Draft", "s");
        other.metadata.name = "other".into();
        assert!(matches!(
            c.plan_apply(other, ApplyMode::Upsert, now()),
            Err(LedgerError::Conflict(_))
        ));
    }

    #[test]
    fn resource_type_changes_reprocess_their_meters() {
        let mut c = Catalog::default();
        let mut m = meter("Draft", "s");
        m.spec["monitoredResourceTypes"] =
            serde_json::json!(["networking.datumapis.com/HTTPRoute"]);
        c.commit(c.plan_apply(m, ApplyMode::Upsert, now()).unwrap().manifest)
            .unwrap();
        let t = parse(
            "apiVersion: billing.miloapis.com/v1alpha1\nkind: MonitoredResourceType\nmetadata: {name: httproute}\nspec:\n  resourceTypeName: networking.datumapis.com/HTTPRoute\n  labels: [{name: name, required: true}]\n",
        );
        let plan = c.plan_apply(t, ApplyMode::Upsert, now()).unwrap();
        assert_eq!(plan.reprocess_meters, vec!["requests".to_owned()]);
    }
}
