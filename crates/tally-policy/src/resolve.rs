//! Which policy is in force where, and every policy's `status`.
//!
//! A policy targets Gateways (by name, in its own namespace) or Namespaces
//! (all of their gateways). For each target the candidates are ordered by
//! creation time (oldest first), then namespace/name; the first wins, the
//! others lose that target (`Conflicted`). Where a Gateway has a policy of
//! its own, it overrides a Namespace policy of the gateway's namespace
//! (more specific wins). A Namespace target must belong to the policy's own
//! project (`TargetNotPermitted` otherwise): a policy never governs another
//! project's records. The resolution is a pure function of the policies
//! and the world (namespaces and gateways), recomputed whenever either
//! changes, so status follows policies and targets as they appear, change
//! or go.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use jiff::Timestamp;
use serde::Serialize;
use tally_model::Manifest;

use crate::policy::{Policy, PolicyKey, TargetRef};

/// What policies are resolved against.
#[derive(Debug, Clone, Default)]
pub struct World {
    /// Every namespace and its project, if it has one.
    pub namespaces: BTreeMap<String, Option<String>>,
    /// Every Gateway, as (namespace, name).
    pub gateways: BTreeSet<(String, String)>,
}

/// Something a policy governs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(tag = "kind")]
pub enum Target {
    Gateway { namespace: String, name: String },
    Namespace { name: String },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Gateway { namespace, name } => write!(f, "Gateway {namespace}/{name}"),
            Target::Namespace { name } => write!(f, "Namespace {name}"),
        }
    }
}

pub use tally_model::Condition;

/// `status.ancestors[]`, as in Gateway API policies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Ancestor {
    pub ancestor_ref: AncestorRef,
    pub controller_name: String,
    pub conditions: Vec<Condition>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AncestorRef {
    pub group: String,
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
}

/// A policy's `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<u64>,
    pub conditions: Vec<Condition>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ancestors: Vec<Ancestor>,
    /// The targets the policy is in force on.
    pub governs: Vec<Target>,
}

impl PolicyStatus {
    /// `Accepted`, `Conflicted`, `Invalid`, `TargetNotFound` or
    /// `TargetNotPermitted`: the reason of the `Accepted` condition.
    pub fn reason(&self) -> &str {
        self.conditions.first().map_or("", |c| c.reason.as_str())
    }
}

/// The controller name in `status.ancestors[]`.
pub const CONTROLLER: &str = "telemetry.datumapis.com/tally";

/// The outcome of one target reference.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RefOutcome {
    Won,
    Lost(PolicyKey),
    NotFound,
    NotPermitted(String),
}

/// A manifest's compiled policy (or why it is invalid), kept with what it
/// was compiled from, so an unchanged policy is never compiled again.
#[derive(Debug, Clone)]
struct Compiled {
    spec: serde_json::Value,
    created: Option<Timestamp>,
    generation: Option<u64>,
    policy: Result<Arc<Policy>, String>,
}

/// Policies resolved against a world.
#[derive(Debug, Clone, Default)]
pub struct Resolution {
    compiled: BTreeMap<PolicyKey, Compiled>,
    valid: BTreeMap<PolicyKey, (Arc<Policy>, Option<String>)>,
    /// Gateway policies by the Gateway's namespace, then name (looked up
    /// per record without building a key).
    gateways: BTreeMap<String, BTreeMap<String, PolicyKey>>,
    namespaces: BTreeMap<String, PolicyKey>,
    statuses: BTreeMap<PolicyKey, PolicyStatus>,
}

impl Resolution {
    /// Validates every `TelemetryPolicy` manifest and resolves them.
    pub fn resolve<'m>(
        manifests: impl IntoIterator<Item = &'m Manifest>,
        world: &World,
    ) -> Resolution {
        Resolution::resolve_again(manifests, world, &Resolution::default())
    }

    /// Like [`Resolution::resolve`], reusing what `previous` compiled of
    /// every manifest whose spec, creation time and generation are the
    /// same: a policy's CEL is compiled once per version.
    pub fn resolve_again<'m>(
        manifests: impl IntoIterator<Item = &'m Manifest>,
        world: &World,
        previous: &Resolution,
    ) -> Resolution {
        let mut invalid = BTreeMap::new();
        let mut valid = BTreeMap::new();
        let mut compiled = BTreeMap::new();
        for m in manifests {
            let key = PolicyKey {
                namespace: m.metadata.namespace.clone().unwrap_or_default(),
                name: m.metadata.name.clone(),
            };
            let c = match previous.compiled.get(&key) {
                Some(c)
                    if c.spec == m.spec
                        && c.created == m.metadata.creation_timestamp
                        && c.generation == m.metadata.generation =>
                {
                    c.clone()
                }
                _ => Compiled {
                    spec: m.spec.clone(),
                    created: m.metadata.creation_timestamp,
                    generation: m.metadata.generation,
                    policy: Policy::from_manifest(m).map(Arc::new),
                },
            };
            match &c.policy {
                Ok(p) => {
                    let project = world.namespaces.get(&key.namespace).cloned().flatten();
                    valid.insert(key.clone(), (Arc::clone(p), project));
                }
                Err(e) => {
                    invalid.insert(key.clone(), (e.clone(), m.metadata.generation));
                }
            }
            compiled.insert(key, c);
        }
        let mut r = Resolution {
            compiled,
            valid,
            ..Resolution::default()
        };
        let outcomes = r.elect(world);
        r.statuses = r.statuses_of(&outcomes, world);
        for (key, (message, generation)) in invalid {
            r.statuses.insert(key, invalid_status(message, generation));
        }
        r
    }

    /// Candidates per target in precedence order; the first of each wins.
    fn elect(&mut self, world: &World) -> BTreeMap<PolicyKey, Vec<(TargetRef, RefOutcome)>> {
        let mut candidates: BTreeMap<Target, Vec<(Rank, PolicyKey)>> = BTreeMap::new();
        let mut outcomes: BTreeMap<PolicyKey, Vec<(TargetRef, RefOutcome)>> = BTreeMap::new();
        for (key, (policy, project)) in &self.valid {
            for t in &policy.targets {
                match target_of(&policy.key, project.as_deref(), t, world) {
                    Ok(target) => candidates
                        .entry(target)
                        .or_default()
                        .push((rank(policy), key.clone())),
                    Err(outcome) => outcomes
                        .entry(key.clone())
                        .or_default()
                        .push((t.clone(), outcome)),
                }
            }
        }
        for (target, mut list) in candidates {
            list.sort();
            let winner = list[0].1.clone();
            for (_, key) in &list {
                let outcome = if *key == winner {
                    RefOutcome::Won
                } else {
                    RefOutcome::Lost(winner.clone())
                };
                outcomes
                    .entry(key.clone())
                    .or_default()
                    .push((to_ref(&target), outcome));
            }
            match target {
                Target::Gateway { namespace, name } => {
                    self.gateways
                        .entry(namespace)
                        .or_default()
                        .insert(name, winner);
                }
                Target::Namespace { name } => {
                    self.namespaces.insert(name, winner);
                }
            }
        }
        outcomes
    }

    /// What each policy governs: its Gateways, and the gateways of its
    /// Namespaces that have no Gateway policy of their own.
    fn governed(&self, world: &World) -> BTreeMap<PolicyKey, Vec<Target>> {
        let mut out: BTreeMap<PolicyKey, Vec<Target>> = BTreeMap::new();
        for (ns, key) in &self.namespaces {
            out.entry(key.clone())
                .or_default()
                .push(Target::Namespace { name: ns.clone() });
        }
        for (namespace, name) in &world.gateways {
            let key = self
                .gateway(namespace, name)
                .or_else(|| self.namespaces.get(namespace));
            if let Some(key) = key {
                out.entry(key.clone()).or_default().push(Target::Gateway {
                    namespace: namespace.clone(),
                    name: name.clone(),
                });
            }
        }
        for targets in out.values_mut() {
            targets.sort();
        }
        out
    }

    fn statuses_of(
        &self,
        outcomes: &BTreeMap<PolicyKey, Vec<(TargetRef, RefOutcome)>>,
        world: &World,
    ) -> BTreeMap<PolicyKey, PolicyStatus> {
        let governed = self.governed(world);
        let mut out = BTreeMap::new();
        for (key, (policy, _)) in &self.valid {
            let refs = outcomes.get(key).map(Vec::as_slice).unwrap_or_default();
            let governs = governed.get(key).cloned().unwrap_or_default();
            out.insert(key.clone(), status_of(policy, refs, governs));
        }
        out
    }

    /// The compiled policy `namespace/name`, if it is valid (the same `Arc`
    /// as long as its version does not change).
    pub fn policy(&self, namespace: &str, name: &str) -> Option<&Arc<Policy>> {
        let key = PolicyKey {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        self.valid.get(&key).map(|(p, _)| p)
    }

    /// The status of policy `namespace/name`, if it was resolved.
    pub fn status(&self, namespace: &str, name: &str) -> Option<&PolicyStatus> {
        self.statuses.get(&PolicyKey {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    /// The policy of Gateway `namespace/name`'s own, if it has one.
    fn gateway(&self, namespace: &str, name: &str) -> Option<&PolicyKey> {
        self.gateways.get(namespace)?.get(name)
    }

    /// The policy governing a record of `project` served by `gateway`
    /// (namespace, name) if known, else of routes in `namespace`: only
    /// ever a policy of the same project.
    pub fn policy_for(
        &self,
        project: &str,
        gateway: Option<(&str, &str)>,
        namespace: Option<&str>,
    ) -> Option<&Arc<Policy>> {
        let key = match gateway {
            Some((ns, name)) => self.gateway(ns, name).or_else(|| self.namespaces.get(ns)),
            None => self.namespaces.get(namespace?),
        }?;
        let (policy, owner) = self.valid.get(key)?;
        (owner.as_deref() == Some(project)).then_some(policy)
    }

    /// Every Gateway with the policy in force on it, in order.
    pub fn in_force(&self, world: &World) -> Vec<(Target, &Arc<Policy>)> {
        let mut out = Vec::new();
        for (namespace, name) in &world.gateways {
            let key = self
                .gateway(namespace, name)
                .or_else(|| self.namespaces.get(namespace));
            if let Some((policy, _)) = key.and_then(|k| self.valid.get(k)) {
                out.push((
                    Target::Gateway {
                        namespace: namespace.clone(),
                        name: name.clone(),
                    },
                    policy,
                ));
            }
        }
        out
    }
}

/// Precedence: the oldest first (a policy without a creation time last),
/// then namespace/name.
type Rank = (Timestamp, String, String);

fn rank(p: &Policy) -> Rank {
    (
        p.created.unwrap_or(Timestamp::MAX),
        p.key.namespace.clone(),
        p.key.name.clone(),
    )
}

fn target_of(
    key: &PolicyKey,
    project: Option<&str>,
    t: &TargetRef,
    world: &World,
) -> Result<Target, RefOutcome> {
    let Some(project) = project else {
        return Err(RefOutcome::NotPermitted(format!(
            "namespace {} belongs to no project",
            key.namespace
        )));
    };
    match t {
        TargetRef::Gateway(name) => {
            let gw = (key.namespace.clone(), name.clone());
            if world.gateways.contains(&gw) {
                Ok(Target::Gateway {
                    namespace: gw.0,
                    name: gw.1,
                })
            } else {
                Err(RefOutcome::NotFound)
            }
        }
        TargetRef::Namespace(ns) => match world.namespaces.get(ns) {
            None => Err(RefOutcome::NotFound),
            Some(Some(p)) if p == project => Ok(Target::Namespace { name: ns.clone() }),
            Some(_) => Err(RefOutcome::NotPermitted(format!(
                "namespace {ns} does not belong to project {project}"
            ))),
        },
    }
}

fn to_ref(target: &Target) -> TargetRef {
    match target {
        Target::Gateway { name, .. } => TargetRef::Gateway(name.clone()),
        Target::Namespace { name } => TargetRef::Namespace(name.clone()),
    }
}

fn condition(ok: bool, reason: &str, message: String, generation: Option<u64>) -> Condition {
    Condition {
        kind: "Accepted".into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        sink: None,
        source: None,
    }
}

fn invalid_status(message: String, generation: Option<u64>) -> PolicyStatus {
    PolicyStatus {
        observed_generation: generation,
        conditions: vec![condition(false, "Invalid", message, generation)],
        ancestors: Vec::new(),
        governs: Vec::new(),
    }
}

fn ref_name(policy: &Policy, t: &TargetRef) -> String {
    match t {
        TargetRef::Gateway(n) => format!("Gateway {}/{n}", policy.key.namespace),
        TargetRef::Namespace(n) => format!("Namespace {n}"),
    }
}

fn status_of(
    policy: &Policy,
    refs: &[(TargetRef, RefOutcome)],
    governs: Vec<Target>,
) -> PolicyStatus {
    let generation = policy.generation;
    let mut ancestors = Vec::new();
    let (mut won, mut lost, mut refused, mut missing) = (0, Vec::new(), Vec::new(), Vec::new());
    for (t, outcome) in refs {
        let name = ref_name(policy, t);
        let (ok, reason, message) = match outcome {
            RefOutcome::Won => {
                won += 1;
                (true, "Accepted", format!("in force on {name}"))
            }
            RefOutcome::Lost(winner) => {
                let m = format!("{name} is governed by policy {winner}, which takes precedence");
                lost.push(m.clone());
                (false, "Conflicted", m)
            }
            RefOutcome::NotFound => {
                let m = format!("{name} does not exist");
                missing.push(m.clone());
                (false, "TargetNotFound", m)
            }
            RefOutcome::NotPermitted(why) => {
                let m = format!("{name} may not be targeted: {why}");
                refused.push(m.clone());
                (false, "TargetNotPermitted", m)
            }
        };
        ancestors.push(Ancestor {
            ancestor_ref: ancestor_ref(policy, t),
            controller_name: CONTROLLER.into(),
            conditions: vec![condition(ok, reason, message, generation)],
        });
    }
    let accepted = if won > 0 {
        let list: Vec<String> = governs.iter().map(ToString::to_string).collect();
        condition(
            true,
            "Accepted",
            format!("in force on {}", list.join(", ")),
            generation,
        )
    } else if !lost.is_empty() {
        condition(false, "Conflicted", lost.join("; "), generation)
    } else if !refused.is_empty() {
        condition(false, "TargetNotPermitted", refused.join("; "), generation)
    } else {
        condition(false, "TargetNotFound", missing.join("; "), generation)
    };
    PolicyStatus {
        observed_generation: generation,
        conditions: vec![accepted],
        ancestors,
        governs: if won > 0 { governs } else { Vec::new() },
    }
}

fn ancestor_ref(policy: &Policy, t: &TargetRef) -> AncestorRef {
    match t {
        TargetRef::Gateway(n) => AncestorRef {
            group: "gateway.networking.k8s.io".into(),
            kind: "Gateway".into(),
            namespace: Some(policy.key.namespace.clone()),
            name: n.clone(),
        },
        TargetRef::Namespace(n) => AncestorRef {
            group: String::new(),
            kind: "Namespace".into(),
            namespace: None,
            name: n.clone(),
        },
    }
}
