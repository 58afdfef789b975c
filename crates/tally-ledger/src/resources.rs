//! The resource store: every kind that is not in the meter catalog
//! (billing accounts and bindings, exporters, policies, secrets, namespaces
//! and the platform resources mirrored into Tally).
//!
//! [`ResourceSet`] holds the rules every backend applies, so a manifest
//! applied by CLI, HTTP or a watched directory is validated the same way:
//!
//! - names and namespaces are checked; namespaced kinds need a namespace,
//!   cluster-scoped kinds lose one;
//! - a `Secret`'s values are read once (`data` base64, `stringData` text),
//!   stored as `data`, and never shown again ([`ResourceSet::shown`]);
//! - a `BillingAccount` keeps the `metadata.uid` it was created with (the
//!   provider's customer id);
//! - a `Workload` or `Instance` keeps the `status` it is applied with (the
//!   compute service's; lifecycle events are derived from it), or its
//!   previous one when applied without;
//! - a `BillingAccountBinding`'s spec is immutable, its
//!   `status.billingResponsibility.establishedAt` is taken from the manifest
//!   (to import history) or set when it is created, and it may not move usage
//!   that another binding already owns: it must take effect after the
//!   project's latest binding, or before its first (attributing usage that had
//!   no account). Bindings cannot be deleted. So history is never rewritten.

use imbl::OrdMap;
use std::sync::Arc;

use base64::Engine;
use futures::future::BoxFuture;
use jiff::Timestamp;
use serde_json::{Value, json};
use tally_model::billing::{Attribution, BillingAccount, BillingAccountBinding, effective_from};
use tally_model::secret::{SecretData, redact, secret_data};
use tally_model::{Kind, KindClass, Manifest, validate_name};

use crate::{Applied, ApplyAction, ApplyMode, LedgerError};

/// The label of a `Namespace` that names its project. A namespace without it
/// is a project of its own (project = namespace name).
pub const PROJECT_LABEL: &str = "resourcemanager.miloapis.com/project-name";

/// Identifies one resource.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceKey {
    pub kind: Kind,
    /// `None` for cluster-scoped kinds.
    pub namespace: Option<String>,
    pub name: String,
}

impl ResourceKey {
    pub fn new(kind: Kind, namespace: Option<&str>, name: &str) -> ResourceKey {
        ResourceKey {
            kind,
            namespace: namespace.filter(|_| kind.namespaced()).map(str::to_owned),
            name: name.to_owned(),
        }
    }

    fn of(kind: Kind, manifest: &Manifest) -> ResourceKey {
        ResourceKey::new(
            kind,
            manifest.metadata.namespace.as_deref(),
            &manifest.metadata.name,
        )
    }
}

impl std::fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// Where non-catalog resources are kept. Reads are answered from memory
/// (a [`ResourceSet`] snapshot); writes are durable before they return.
pub trait ResourceStore: Send + Sync + 'static {
    /// Validates and stores a manifest; returns it as shown.
    fn apply(
        &self,
        manifest: Manifest,
        mode: ApplyMode,
    ) -> BoxFuture<'_, Result<Applied, LedgerError>>;

    /// Deletes a resource.
    fn delete(&self, key: ResourceKey) -> BoxFuture<'_, Result<(), LedgerError>>;

    /// The current resources, secrets included: for Tally's own components,
    /// never to be shown as is (use [`ResourceSet::shown`]).
    fn snapshot(&self) -> Arc<ResourceSet>;

    /// Ticks whenever a resource changes.
    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64>;
}

/// Every stored resource, and the rules for changing them. Persistent maps
/// (structural sharing) make a clone O(1), so a store can publish a new
/// snapshot per write without copying every resource.
#[derive(Debug, Clone, Default)]
pub struct ResourceSet {
    items: OrdMap<ResourceKey, Arc<Manifest>>,
    /// project → (effective start, binding name) of its established
    /// bindings, sorted: the last one is Active.
    bindings: OrdMap<String, Vec<(Timestamp, String)>>,
}

fn invalid(key: &ResourceKey, message: impl std::fmt::Display) -> LedgerError {
    LedgerError::Invalid(format!("{key}: {message}"))
}

fn storage(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(e.to_string())
}

impl ResourceSet {
    /// A set of already-validated, stored manifests.
    pub fn load(manifests: impl IntoIterator<Item = Manifest>) -> Result<ResourceSet, LedgerError> {
        let mut set = ResourceSet::default();
        for manifest in manifests {
            set.insert(manifest)?;
        }
        Ok(set)
    }

    /// One stored resource (secret values included).
    pub fn get(&self, key: &ResourceKey) -> Option<&Arc<Manifest>> {
        self.items.get(key)
    }

    /// Stored resources of a kind, optionally of one namespace, by
    /// (namespace, name).
    pub fn list<'a>(
        &'a self,
        kind: Kind,
        namespace: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Arc<Manifest>> + 'a {
        // Keys sort by kind first, and `None` before any namespace.
        let first = ResourceKey {
            kind,
            namespace: None,
            name: String::new(),
        };
        self.items
            .range(first..)
            .take_while(move |(key, _)| key.kind == kind)
            .filter(move |(key, _)| namespace.is_none_or(|ns| key.namespace.as_deref() == Some(ns)))
            .map(|(_, manifest)| manifest)
    }

    /// How many resources of a kind are stored.
    pub fn count(&self, kind: Kind) -> usize {
        self.list(kind, None).count()
    }

    /// The values of a Secret.
    pub fn secret(&self, namespace: &str, name: &str) -> Option<SecretData> {
        let manifest = self.get(&ResourceKey::new(Kind::Secret, Some(namespace), name))?;
        secret_data(manifest).ok()
    }

    /// The project a namespace belongs to: its [`PROJECT_LABEL`], or its own
    /// name when it has none or is not known.
    pub fn project_of_namespace(&self, namespace: &str) -> String {
        self.get(&ResourceKey::new(Kind::Namespace, None, namespace))
            .and_then(|ns| ns.metadata.labels.get(PROJECT_LABEL).cloned())
            .unwrap_or_else(|| namespace.to_owned())
    }

    /// The accounts and bindings that are valid.
    fn billing(&self) -> (Vec<BillingAccount>, Vec<BillingAccountBinding>) {
        let accounts = self
            .list(Kind::BillingAccount, None)
            .filter_map(|m| BillingAccount::from_manifest(m).ok())
            .collect();
        let bindings = self
            .list(Kind::BillingAccountBinding, None)
            .filter_map(|m| BillingAccountBinding::from_manifest(m).ok())
            .collect();
        (accounts, bindings)
    }

    /// Who owns each project's usage over time.
    pub fn attribution(&self) -> Attribution {
        let (accounts, bindings) = self.billing();
        Attribution::new(&accounts, &bindings)
    }

    /// A resource as it may leave Tally: secret values removed, computed
    /// status filled in.
    pub fn shown(&self, manifest: &Manifest) -> Manifest {
        let mut shown = manifest.clone();
        match manifest.kind.parse::<Kind>() {
            Ok(Kind::Secret) => {
                let keys = secret_data(manifest)
                    .map(|data| data.into_keys().collect::<Vec<_>>())
                    .unwrap_or_default();
                shown = redact(shown, keys);
            }
            Ok(Kind::BillingAccountBinding) => {
                if let Ok(binding) = BillingAccountBinding::from_manifest(manifest) {
                    let active = self
                        .bindings
                        .get(&binding.project)
                        .and_then(|starts| starts.last())
                        .is_some_and(|(_, name)| *name == binding.name);
                    let mut status = manifest.status.clone().unwrap_or_else(|| json!({}));
                    if let Some(map) = status.as_object_mut() {
                        map.insert(
                            "phase".into(),
                            json!(if active { "Active" } else { "Superseded" }),
                        );
                        if let Some(effective) = binding.established_at.and_then(effective_from) {
                            map.insert("effectiveFrom".into(), json!(effective));
                        }
                    }
                    shown.status = Some(status);
                }
            }
            _ => {}
        }
        shown
    }

    /// Decides whether `manifest` may be applied now; returns it as it is to
    /// be stored.
    pub fn plan_apply(
        &self,
        mut manifest: Manifest,
        mode: ApplyMode,
        now: Timestamp,
    ) -> Result<(Manifest, ApplyAction), LedgerError> {
        let kind = manifest.typed_kind()?;
        if kind.class() == KindClass::Catalog {
            return Err(LedgerError::Invalid(format!(
                "{kind} is applied by the ledger's catalog, not the resource store"
            )));
        }
        manifest.api_version = kind.api_version().to_owned();
        if !kind.namespaced() {
            manifest.metadata.namespace = None;
        }
        let key = ResourceKey::of(kind, &manifest);
        validate_name(&manifest.metadata.name).map_err(|e| invalid(&key, e))?;
        if kind.namespaced() {
            let namespace = key.namespace.as_deref().ok_or_else(|| {
                invalid(
                    &key,
                    format!("{kind} is namespaced: metadata.namespace is required"),
                )
            })?;
            validate_name(namespace)
                .map_err(|e| invalid(&key, e.replace("metadata.name", "metadata.namespace")))?;
        }
        let previous = self.get(&key);
        if mode == ApplyMode::CreateOnly && previous.is_some() {
            return Err(LedgerError::Conflict(format!("{key} already exists")));
        }
        // Status is Tally's to compute, except where the platform owns it.
        let given_status = manifest.status.take();
        match kind {
            Kind::Secret => {
                let data = secret_data(&manifest).map_err(|e| invalid(&key, e))?;
                let encoded: serde_json::Map<String, Value> = data
                    .into_iter()
                    .map(|(k, v)| {
                        let text = base64::engine::general_purpose::STANDARD.encode(v);
                        (k, Value::String(text))
                    })
                    .collect();
                manifest.extra.remove("stringData");
                manifest.extra.insert("data".into(), Value::Object(encoded));
            }
            Kind::BillingAccount => {
                manifest.status = given_status.or_else(|| previous.and_then(|p| p.status.clone()));
                if let (Some(old), Some(given)) = (previous, &manifest.metadata.uid)
                    && old.metadata.uid.as_ref() != Some(given)
                {
                    return Err(LedgerError::Conflict(format!(
                        "{key}: metadata.uid is the provider's customer id and cannot change \
                         (it is {:?})",
                        old.metadata.uid.as_deref().unwrap_or_default()
                    )));
                }
            }
            Kind::Workload | Kind::Instance => {
                if kind == Kind::Instance {
                    tally_model::instance::Allocation::of(&manifest)
                        .map_err(|e| invalid(&key, e))?;
                }
                manifest.status = given_status.or_else(|| previous.and_then(|p| p.status.clone()));
            }
            Kind::BillingAccountBinding => {
                self.plan_binding(&key, &mut manifest, given_status, previous, now)?;
            }
            _ => {}
        }
        let keep_given_uid = kind == Kind::BillingAccount;
        let action = stamp(&mut manifest, previous.map(|p| &**p), now, keep_given_uid);
        Ok((manifest, action))
    }

    fn plan_binding(
        &self,
        key: &ResourceKey,
        manifest: &mut Manifest,
        given_status: Option<Value>,
        previous: Option<&Arc<Manifest>>,
        now: Timestamp,
    ) -> Result<(), LedgerError> {
        let checked = |m: &Manifest| {
            BillingAccountBinding::from_manifest(m).map_err(|e| LedgerError::Invalid(e.to_string()))
        };
        if let Some(old) = previous {
            if old.spec != manifest.spec {
                return Err(LedgerError::Conflict(format!(
                    "{key}: spec is immutable; to move the project to another account, \
                     apply a new BillingAccountBinding"
                )));
            }
            manifest.status = old.status.clone();
            checked(manifest)?;
            return Ok(());
        }
        let established = given_status
            .as_ref()
            .and_then(|s| s.pointer("/billingResponsibility/establishedAt"))
            .cloned()
            .unwrap_or_else(|| json!(now));
        manifest.status = Some(json!({"billingResponsibility": {"establishedAt": established}}));
        let binding = checked(manifest)?;
        let at = binding
            .established_at
            .and_then(effective_from)
            .ok_or_else(|| invalid(key, "establishedAt is out of range"))?;
        let starts = self.bindings.get(&binding.project);
        let (Some((first, _)), Some((last, _))) = (
            starts.and_then(|s| s.first()),
            starts.and_then(|s| s.last()),
        ) else {
            return Ok(());
        };
        if at < *first || at > *last {
            return Ok(());
        }
        Err(LedgerError::Conflict(format!(
            "{key} would take effect at {at}, inside the history of project {:?} \
             (its bindings take effect from {first} to {last}); usage already attributed is \
             never moved: a new binding must take effect after {last}, or before {first} \
             where usage has no account",
            binding.project
        )))
    }

    /// Decides whether a resource may be deleted.
    pub fn plan_delete(&self, key: &ResourceKey) -> Result<(), LedgerError> {
        if self.get(key).is_none() {
            return Err(LedgerError::not_found(key.kind, key.name.clone()));
        }
        if key.kind == Kind::BillingAccountBinding {
            return Err(LedgerError::Conflict(format!(
                "{key}: bindings are the history of who owns a project's usage and cannot be \
                 deleted; apply a new binding to move the project"
            )));
        }
        Ok(())
    }

    /// Records a manifest that was made durable.
    pub fn insert(&mut self, manifest: Manifest) -> Result<(), LedgerError> {
        let kind = manifest.typed_kind()?;
        if kind == Kind::BillingAccountBinding
            && let Ok(binding) = BillingAccountBinding::from_manifest(&manifest)
            && let Some(at) = binding.established_at.and_then(effective_from)
        {
            let starts = self.bindings.entry(binding.project).or_default();
            starts.retain(|(_, name)| *name != binding.name);
            starts.push((at, binding.name));
            starts.sort();
        }
        self.items
            .insert(ResourceKey::of(kind, &manifest), Arc::new(manifest));
        Ok(())
    }

    /// Forgets a resource that was deleted durably.
    pub fn remove(&mut self, key: &ResourceKey) {
        self.items.remove(key);
        if key.kind == Kind::BillingAccountBinding {
            let projects: Vec<String> = self.bindings.keys().cloned().collect();
            for project in projects {
                if let Some(starts) = self.bindings.get_mut(&project) {
                    starts.retain(|(_, name)| *name != key.name);
                }
            }
        }
    }

    /// The stored bytes of a manifest.
    pub fn encode(manifest: &Manifest) -> Result<Vec<u8>, LedgerError> {
        serde_json::to_vec(manifest).map_err(storage)
    }
}

/// Sets `uid`, `creationTimestamp`, `generation` and `updateTimestamp`
/// from the previous version, and says whether anything changed.
pub(crate) fn stamp(
    manifest: &mut Manifest,
    previous: Option<&Manifest>,
    now: Timestamp,
    keep_given_uid: bool,
) -> ApplyAction {
    match previous {
        None => {
            if !(keep_given_uid
                && manifest
                    .metadata
                    .uid
                    .as_ref()
                    .is_some_and(|u| !u.is_empty()))
            {
                manifest.metadata.uid =
                    Some(ulid::Ulid::generate().to_string().to_ascii_lowercase());
            }
            manifest.metadata.creation_timestamp = Some(now);
            manifest.metadata.update_timestamp = Some(now);
            manifest.metadata.generation = Some(1);
            ApplyAction::Created
        }
        Some(old) => {
            manifest.metadata.uid.clone_from(&old.metadata.uid);
            manifest.metadata.creation_timestamp = old.metadata.creation_timestamp;
            let generation = old.metadata.generation.unwrap_or(1);
            let same_spec = old.spec == manifest.spec && old.extra == manifest.extra;
            if same_spec
                && old.metadata.labels == manifest.metadata.labels
                && old.metadata.annotations == manifest.metadata.annotations
                && old.status == manifest.status
            {
                manifest.metadata.generation = Some(generation);
                manifest.metadata.update_timestamp = old.metadata.update_timestamp;
                return ApplyAction::Unchanged;
            }
            manifest.metadata.update_timestamp = Some(now);
            manifest.metadata.generation = Some(if same_spec {
                generation
            } else {
                generation + 1
            });
            ApplyAction::Configured
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn manifest(text: &str) -> Manifest {
        Manifest::parse_documents(text).unwrap().remove(0)
    }

    fn binding(name: &str, account: &str, project: &str, at: Option<&str>) -> Manifest {
        let status = at
            .map(|at| format!("status: {{billingResponsibility: {{establishedAt: \"{at}\"}}}}\n"))
            .unwrap_or_default();
        manifest(&format!(
            "apiVersion: billing.miloapis.com/v1alpha1\nkind: BillingAccountBinding\n\
             metadata: {{name: {name}}}\nspec: {{billingAccountRef: {{name: {account}}}, \
             projectRef: {{name: {project}}}}}\n{status}"
        ))
    }

    fn apply(set: &mut ResourceSet, m: Manifest, now: &str) -> Result<ApplyAction, LedgerError> {
        let (stored, action) = set.plan_apply(m, ApplyMode::Upsert, ts(now))?;
        set.insert(stored)?;
        Ok(action)
    }

    #[test]
    fn bindings_never_rewrite_history() {
        let mut set = ResourceSet::default();
        let now = "2025-06-01T00:00:00Z";
        apply(
            &mut set,
            binding("b1", "a", "p", Some("2025-02-01T00:00:00Z")),
            now,
        )
        .unwrap();
        apply(
            &mut set,
            binding("b2", "b", "p", Some("2025-03-01T00:00:00Z")),
            now,
        )
        .unwrap();
        // Inside [first, last]: refused, and nothing stored.
        let err = apply(
            &mut set,
            binding("b3", "c", "p", Some("2025-02-15T00:00:00Z")),
            now,
        )
        .unwrap_err();
        assert!(matches!(err, LedgerError::Conflict(_)), "{err}");
        assert!(
            set.get(&ResourceKey::new(Kind::BillingAccountBinding, None, "b3"))
                .is_none()
        );
        // Before the first: attributes usage that had no account.
        apply(
            &mut set,
            binding("b0", "c", "p", Some("2025-01-01T00:00:00Z")),
            now,
        )
        .unwrap();
        // After the last, defaulting to now.
        apply(&mut set, binding("b4", "d", "p", None), now).unwrap();
        let b4 = set
            .get(&ResourceKey::new(Kind::BillingAccountBinding, None, "b4"))
            .unwrap()
            .clone();
        assert_eq!(
            b4.status.as_ref().unwrap()["billingResponsibility"]["establishedAt"],
            json!(now)
        );
        let shown = set.shown(&b4);
        assert_eq!(shown.status.unwrap()["phase"], "Active");
        let b2 = set
            .get(&ResourceKey::new(Kind::BillingAccountBinding, None, "b2"))
            .unwrap()
            .clone();
        assert_eq!(set.shown(&b2).status.unwrap()["phase"], "Superseded");
        // Spec is immutable; re-applying the same is unchanged.
        let err = apply(&mut set, binding("b2", "z", "p", None), now).unwrap_err();
        assert!(matches!(err, LedgerError::Conflict(_)), "{err}");
        assert_eq!(
            apply(&mut set, binding("b2", "b", "p", None), now).unwrap(),
            ApplyAction::Unchanged
        );
        // Deleting is refused.
        assert!(matches!(
            set.plan_delete(&ResourceKey::new(Kind::BillingAccountBinding, None, "b2")),
            Err(LedgerError::Conflict(_))
        ));
        // Another project is independent.
        apply(
            &mut set,
            binding("q1", "a", "q", Some("2025-02-15T00:00:00Z")),
            now,
        )
        .unwrap();
    }

    #[test]
    fn secrets_are_stored_encoded_and_shown_without_values() {
        let mut set = ResourceSet::default();
        let m = manifest(
            "apiVersion: v1\nkind: Secret\nmetadata: {name: k, namespace: team}\n\
             stringData: {token: hunter2}\n",
        );
        apply(&mut set, m, "2025-01-01T00:00:00Z").unwrap();
        assert_eq!(set.secret("team", "k").unwrap()["token"], "hunter2");
        let stored = set.list(Kind::Secret, Some("team")).next().unwrap().clone();
        let shown = serde_json::to_string(&set.shown(&stored)).unwrap();
        assert!(
            !shown.contains("hunter2") && !shown.contains("aHVudGVyMg"),
            "{shown}"
        );
        // Namespaced kinds need a namespace.
        let err = apply(
            &mut set,
            manifest("apiVersion: v1\nkind: Secret\nmetadata: {name: k}\nstringData: {a: b}\n"),
            "2025-01-01T00:00:00Z",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("metadata.namespace is required"),
            "{err}"
        );
    }

    #[test]
    fn account_uid_is_kept_and_frozen() {
        let mut set = ResourceSet::default();
        let account = |uid: &str| {
            manifest(&format!(
                "apiVersion: billing.miloapis.com/v1alpha1\nkind: BillingAccount\n\
                 metadata: {{name: acme, uid: {uid}}}\nspec: {{currencyCode: USD}}\n"
            ))
        };
        apply(&mut set, account("cust-1"), "2025-01-01T00:00:00Z").unwrap();
        let stored = set
            .get(&ResourceKey::new(Kind::BillingAccount, None, "acme"))
            .unwrap();
        assert_eq!(stored.metadata.uid.as_deref(), Some("cust-1"));
        let err = apply(&mut set, account("cust-2"), "2025-01-01T00:00:00Z").unwrap_err();
        assert!(matches!(err, LedgerError::Conflict(_)), "{err}");
        let owner = set.attribution();
        assert_eq!(
            owner.owner_at("nobody", ts("2025-01-01T00:00:00Z")),
            tally_model::billing::Owner::Unattributed
        );
    }

    #[test]
    fn namespaces_name_their_project() {
        let mut set = ResourceSet::default();
        apply(
            &mut set,
            manifest(&format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: web, labels: {{{PROJECT_LABEL}: acme}}}}\n"
            )),
            "2025-01-01T00:00:00Z",
        )
        .unwrap();
        assert_eq!(set.project_of_namespace("web"), "acme");
        assert_eq!(set.project_of_namespace("other"), "other");
    }

    #[test]
    fn an_instance_keeps_the_status_the_platform_gives() {
        let mut set = ResourceSet::default();
        let text = |status: &str| {
            format!(
                "apiVersion: compute.datumapis.com/v1alpha1\nkind: Instance\nmetadata: {{name: web-0, namespace: web}}\n{status}"
            )
        };
        let key = ResourceKey::new(Kind::Instance, Some("web"), "web-0");
        let status = |set: &ResourceSet| set.get(&key).and_then(|m| m.status.clone());
        apply(
            &mut set,
            manifest(&text("status: {nodeName: n1}\n")),
            "2025-01-01T00:00:00Z",
        )
        .unwrap();
        assert_eq!(status(&set), Some(json!({"nodeName": "n1"})));
        apply(&mut set, manifest(&text("")), "2025-01-01T00:00:01Z").unwrap();
        assert_eq!(status(&set), Some(json!({"nodeName": "n1"})));
        apply(
            &mut set,
            manifest(&text("status: {nodeName: n2}\n")),
            "2025-01-01T00:00:02Z",
        )
        .unwrap();
        assert_eq!(status(&set), Some(json!({"nodeName": "n2"})));
    }
}
