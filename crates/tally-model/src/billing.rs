//! Which billing account owns a project's usage at a time. Pure: no I/O, no
//! clock.
//!
//! A project's bindings, ordered by `status.billingResponsibility.establishedAt`
//! (then by name, so ties are decided the same way everywhere), cut time into
//! intervals `[establishedAt, next binding's establishedAt)`; usage at `t`
//! belongs to the account of the interval containing `t`. Usage before a
//! project's first binding, or of a project without one, is *unattributed*;
//! it becomes attributed as soon as a binding covering it appears. A binding
//! whose responsibility is not yet established (no `establishedAt`) covers
//! nothing.
//!
//! Attribution has minute resolution: a binding takes effect at the first
//! whole UTC minute at or after its `establishedAt`. Usage is rolled up per
//! minute and forwarded in windows of whole minutes, so a minute always has
//! exactly one owner per project, and the ledger's queries and the billing
//! forwarder cut time at the same instants.

use std::collections::{BTreeMap, BTreeSet};

use crate::resource::Manifest;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The API group of the billing kinds.
pub const BILLING_API_VERSION: &str = "billing.miloapis.com/v1alpha1";

/// Why a billing manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BillingResourceError {
    /// The manifest is of another kind or API version.
    #[error("expected {expected} ({BILLING_API_VERSION}), got {kind} ({api_version})")]
    WrongKind {
        /// The kind wanted.
        expected: &'static str,
        /// The manifest's kind.
        kind: String,
        /// The manifest's apiVersion.
        api_version: String,
    },
    /// A required field is missing or malformed.
    #[error("{kind} {name:?}: {message}")]
    Invalid {
        /// The kind.
        kind: &'static str,
        /// The resource's name.
        name: String,
        /// What is wrong.
        message: String,
    },
}

/// A customer's account. Its `metadata.uid` is the provider's customer id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BillingAccount {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`: the customer id at the provider.
    pub uid: String,
    /// `status.phase` (Provisioning, Ready, Suspended, Archived), if known.
    pub phase: Option<String>,
}

/// A binding of a project to a billing account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BillingAccountBinding {
    /// `metadata.name`.
    pub name: String,
    /// `spec.billingAccountRef.name`.
    pub account: String,
    /// `spec.projectRef.name`.
    pub project: String,
    /// `status.billingResponsibility.establishedAt`; `None` until established.
    pub established_at: Option<Timestamp>,
}

fn check_kind(manifest: &Manifest, expected: &'static str) -> Result<(), BillingResourceError> {
    if manifest.kind != expected || manifest.api_version != BILLING_API_VERSION {
        return Err(BillingResourceError::WrongKind {
            expected,
            kind: manifest.kind.clone(),
            api_version: manifest.api_version.clone(),
        });
    }
    Ok(())
}

fn string_at<'a>(value: Option<&'a Value>, path: &[&str]) -> Option<&'a str> {
    path.iter()
        .try_fold(value?, |v, key| v.get(key))?
        .as_str()
        .filter(|s| !s.is_empty())
}

impl BillingAccount {
    /// Reads a `BillingAccount` manifest; `metadata.uid` is required.
    pub fn from_manifest(manifest: &Manifest) -> Result<Self, BillingResourceError> {
        check_kind(manifest, "BillingAccount")?;
        let uid = manifest
            .metadata
            .uid
            .clone()
            .filter(|uid| !uid.is_empty())
            .ok_or_else(|| BillingResourceError::Invalid {
                kind: "BillingAccount",
                name: manifest.metadata.name.clone(),
                message: "metadata.uid is required (it is the provider's customer id)".into(),
            })?;
        Ok(BillingAccount {
            name: manifest.metadata.name.clone(),
            uid,
            phase: string_at(manifest.status.as_ref(), &["phase"]).map(str::to_owned),
        })
    }
}

impl BillingAccountBinding {
    /// Reads a `BillingAccountBinding` manifest.
    pub fn from_manifest(manifest: &Manifest) -> Result<Self, BillingResourceError> {
        check_kind(manifest, "BillingAccountBinding")?;
        let invalid = |message: String| BillingResourceError::Invalid {
            kind: "BillingAccountBinding",
            name: manifest.metadata.name.clone(),
            message,
        };
        let spec = Some(&manifest.spec);
        let account = string_at(spec, &["billingAccountRef", "name"])
            .ok_or_else(|| invalid("spec.billingAccountRef.name is required".into()))?;
        let project = string_at(spec, &["projectRef", "name"])
            .ok_or_else(|| invalid("spec.projectRef.name is required".into()))?;
        let established_at = string_at(
            manifest.status.as_ref(),
            &["billingResponsibility", "establishedAt"],
        )
        .map(|text| {
            text.parse::<Timestamp>().map_err(|e| {
                invalid(format!(
                    "status.billingResponsibility.establishedAt {text:?}: {e}"
                ))
            })
        })
        .transpose()?;
        Ok(BillingAccountBinding {
            name: manifest.metadata.name.clone(),
            account: account.to_owned(),
            project: project.to_owned(),
            established_at,
        })
    }
}

/// The first whole UTC minute at or after `at`: when a binding established at
/// `at` takes effect. `None` only at the end of time.
pub fn effective_from(at: Timestamp) -> Option<Timestamp> {
    let second = at.as_second();
    if second.rem_euclid(60) == 0 && at.subsec_nanosecond() == 0 {
        return Some(at);
    }
    let minute = second.div_euclid(60).checked_add(1)?.checked_mul(60)?;
    Timestamp::from_second(minute).ok()
}

/// Who owns usage at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner<'a> {
    /// The account (its name and provider customer id).
    Account {
        /// The BillingAccount's name.
        name: &'a str,
        /// Its uid: the provider's customer id.
        customer_id: &'a str,
    },
    /// No binding covers the time.
    Unattributed,
    /// A binding covers it, but names an account that is unknown or has no uid.
    UnknownAccount(&'a str),
}

/// One established binding of a project, as an interval start.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct Start {
    at: Timestamp,
    binding: String,
    account: String,
}

/// The attribution of every project's usage, from bindings and accounts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attribution {
    /// project → interval starts, sorted.
    projects: BTreeMap<String, Vec<Start>>,
    /// account name → uid.
    accounts: BTreeMap<String, String>,
}

impl Attribution {
    /// The attribution the given accounts and bindings imply.
    pub fn new(accounts: &[BillingAccount], bindings: &[BillingAccountBinding]) -> Self {
        let mut projects: BTreeMap<String, Vec<Start>> = BTreeMap::new();
        for binding in bindings {
            if let Some(at) = binding.established_at.and_then(effective_from) {
                projects
                    .entry(binding.project.clone())
                    .or_default()
                    .push(Start {
                        at,
                        binding: binding.name.clone(),
                        account: binding.account.clone(),
                    });
            }
        }
        for starts in projects.values_mut() {
            starts.sort();
        }
        Attribution {
            projects,
            accounts: accounts
                .iter()
                .map(|a| (a.name.clone(), a.uid.clone()))
                .collect(),
        }
    }

    /// Every project that some binding names, sorted.
    pub fn projects(&self) -> impl Iterator<Item = &str> {
        self.projects.keys().map(String::as_str)
    }

    /// The provider customer id (uid) of every account, by account name.
    pub fn accounts(&self) -> &BTreeMap<String, String> {
        &self.accounts
    }

    /// Who owns `project`'s usage at `t`.
    pub fn owner_at(&self, project: &str, t: Timestamp) -> Owner<'_> {
        let Some(starts) = self.projects.get(project) else {
            return Owner::Unattributed;
        };
        // The last start at or before t.
        let covering = starts.partition_point(|s| s.at <= t);
        let Some(start) = covering.checked_sub(1).map(|i| &starts[i]) else {
            return Owner::Unattributed;
        };
        match self.accounts.get_key_value(&start.account) {
            Some((name, uid)) => Owner::Account {
                name,
                customer_id: uid,
            },
            None => Owner::UnknownAccount(&start.account),
        }
    }

    /// Times strictly inside `(from, to)` at which some project changes owner:
    /// a window cut at these points has one owner per project in each piece.
    pub fn changes_within(&self, from: Timestamp, to: Timestamp) -> BTreeSet<Timestamp> {
        self.projects
            .values()
            .flatten()
            .map(|s| s.at)
            .filter(|at| *at > from && *at < to)
            .collect()
    }

    /// The earliest time from which `self` and `other` may attribute some
    /// usage differently, `None` if they attribute everything alike.
    pub fn first_difference(&self, other: &Attribution) -> Option<Timestamp> {
        let projects: BTreeSet<&String> =
            self.projects.keys().chain(other.projects.keys()).collect();
        let mut earliest: Option<Timestamp> = None;
        let mut note = |t: Timestamp| earliest = Some(earliest.map_or(t, |e| e.min(t)));
        for project in projects {
            let mine = self.projects.get(project).map(Vec::as_slice).unwrap_or(&[]);
            let theirs = other
                .projects
                .get(project)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let first_unequal = mine.iter().zip(theirs).position(|(a, b)| a != b);
            let index = first_unequal.unwrap_or(mine.len().min(theirs.len()));
            if let Some(start) = [mine.get(index), theirs.get(index)]
                .into_iter()
                .flatten()
                .map(|s| s.at)
                .min()
            {
                note(start);
            }
        }
        // An account's uid changing changes every interval it owns.
        let names: BTreeSet<&String> = self.accounts.keys().chain(other.accounts.keys()).collect();
        for name in names {
            if self.accounts.get(name) == other.accounts.get(name) {
                continue;
            }
            let starts = self
                .projects
                .values()
                .chain(other.projects.values())
                .flatten();
            starts
                .filter(|s| &s.account == name)
                .for_each(|s| note(s.at));
        }
        earliest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn account(name: &str) -> BillingAccount {
        BillingAccount {
            name: name.into(),
            uid: format!("uid-{name}"),
            phase: None,
        }
    }

    fn binding(
        name: &str,
        account: &str,
        project: &str,
        at: Option<&str>,
    ) -> BillingAccountBinding {
        BillingAccountBinding {
            name: name.into(),
            account: account.into(),
            project: project.into(),
            established_at: at.map(ts),
        }
    }

    fn owner(a: &Attribution, project: &str, t: &str) -> Option<String> {
        match a.owner_at(project, ts(t)) {
            Owner::Account { customer_id, .. } => Some(customer_id.to_owned()),
            Owner::Unattributed => None,
            Owner::UnknownAccount(name) => Some(format!("unknown:{name}")),
        }
    }

    #[test]
    fn intervals_are_half_open_and_moves_keep_history() {
        let accounts = [account("a"), account("b")];
        let bindings = [
            binding("p-b", "b", "p", Some("2025-01-01T12:00:00Z")),
            binding("p-a", "a", "p", Some("2025-01-01T10:00:00Z")),
        ];
        let attribution = Attribution::new(&accounts, &bindings);
        assert_eq!(owner(&attribution, "p", "2025-01-01T09:59:59.999Z"), None);
        assert_eq!(
            owner(&attribution, "p", "2025-01-01T10:00:00Z").as_deref(),
            Some("uid-a")
        );
        assert_eq!(
            owner(&attribution, "p", "2025-01-01T11:59:59.999Z").as_deref(),
            Some("uid-a")
        );
        assert_eq!(
            owner(&attribution, "p", "2025-01-01T12:00:00Z").as_deref(),
            Some("uid-b")
        );
        assert_eq!(
            owner(&attribution, "p", "2030-01-01T00:00:00Z").as_deref(),
            Some("uid-b")
        );
        assert_eq!(owner(&attribution, "other", "2025-01-01T12:00:00Z"), None);
    }

    #[test]
    fn unestablished_bindings_and_unknown_accounts() {
        let bindings = [
            binding("x", "a", "p", None),
            binding("y", "ghost", "q", Some("2025-01-01T00:00:00Z")),
        ];
        let attribution = Attribution::new(&[account("a")], &bindings);
        assert_eq!(owner(&attribution, "p", "2026-01-01T00:00:00Z"), None);
        assert_eq!(
            owner(&attribution, "q", "2026-01-01T00:00:00Z").as_deref(),
            Some("unknown:ghost")
        );
    }

    #[test]
    fn a_new_binding_attributes_retroactively_and_says_from_when() {
        let accounts = [account("a"), account("b")];
        let before = Attribution::new(&accounts, &[]);
        let after = Attribution::new(
            &accounts,
            &[binding("p-a", "a", "p", Some("2025-01-01T10:00:00Z"))],
        );
        assert_eq!(owner(&before, "p", "2025-01-01T10:30:00Z"), None);
        assert_eq!(
            owner(&after, "p", "2025-01-01T10:30:00Z").as_deref(),
            Some("uid-a")
        );
        assert_eq!(
            before.first_difference(&after),
            Some(ts("2025-01-01T10:00:00Z"))
        );
        assert_eq!(after.first_difference(&after), None);
        let moved = Attribution::new(
            &accounts,
            &[
                binding("p-a", "a", "p", Some("2025-01-01T10:00:00Z")),
                binding("p-b", "b", "p", Some("2025-01-02T00:00:00Z")),
            ],
        );
        assert_eq!(
            after.first_difference(&moved),
            Some(ts("2025-01-02T00:00:00Z"))
        );
        assert_eq!(
            moved.first_difference(&after),
            Some(ts("2025-01-02T00:00:00Z"))
        );
    }

    #[test]
    fn ties_are_decided_by_binding_name() {
        let accounts = [account("a"), account("b")];
        let t = "2025-01-01T10:00:00Z";
        let one = Attribution::new(
            &accounts,
            &[
                binding("1", "a", "p", Some(t)),
                binding("2", "b", "p", Some(t)),
            ],
        );
        let two = Attribution::new(
            &accounts,
            &[
                binding("2", "b", "p", Some(t)),
                binding("1", "a", "p", Some(t)),
            ],
        );
        assert_eq!(one, two);
        assert_eq!(owner(&one, "p", t).as_deref(), Some("uid-b"));
    }

    #[test]
    fn changes_within_is_strict() {
        let bindings = [
            binding("1", "a", "p", Some("2025-01-01T10:00:00Z")),
            binding("2", "a", "q", Some("2025-01-01T10:00:30Z")),
        ];
        let attribution = Attribution::new(&[account("a")], &bindings);
        // q's binding takes effect at the next whole minute.
        let cuts =
            attribution.changes_within(ts("2025-01-01T10:00:00Z"), ts("2025-01-01T10:02:00Z"));
        assert_eq!(
            cuts.into_iter().collect::<Vec<_>>(),
            vec![ts("2025-01-01T10:01:00Z")]
        );
        assert_eq!(owner(&attribution, "q", "2025-01-01T10:00:59Z"), None);
        assert_eq!(
            owner(&attribution, "q", "2025-01-01T10:01:00Z").as_deref(),
            Some("uid-a")
        );
    }

    #[test]
    fn bindings_take_effect_at_whole_minutes() {
        assert_eq!(
            effective_from(ts("2025-01-01T10:00:00Z")),
            Some(ts("2025-01-01T10:00:00Z"))
        );
        assert_eq!(
            effective_from(ts("2025-01-01T10:00:00.001Z")),
            Some(ts("2025-01-01T10:01:00Z"))
        );
        assert_eq!(
            effective_from(ts("1969-12-31T23:59:30Z")),
            Some(ts("1970-01-01T00:00:00Z"))
        );
    }

    #[test]
    fn manifests_parse() {
        let text = r#"
apiVersion: billing.miloapis.com/v1alpha1
kind: BillingAccount
metadata: {name: acme, uid: 6f1c0a4e-0000-4000-8000-000000000001}
spec: {currencyCode: USD}
status: {phase: Ready}
---
apiVersion: billing.miloapis.com/v1alpha1
kind: BillingAccountBinding
metadata: {name: acme-web}
spec:
  billingAccountRef: {name: acme}
  projectRef: {name: web}
status:
  phase: Active
  billingResponsibility: {establishedAt: "2025-03-01T00:00:00Z"}
"#;
        let manifests = Manifest::parse_documents(text).unwrap();
        let account = BillingAccount::from_manifest(&manifests[0]).unwrap();
        assert_eq!(account.uid, "6f1c0a4e-0000-4000-8000-000000000001");
        assert_eq!(account.phase.as_deref(), Some("Ready"));
        let binding = BillingAccountBinding::from_manifest(&manifests[1]).unwrap();
        assert_eq!(binding.account, "acme");
        assert_eq!(binding.project, "web");
        assert_eq!(binding.established_at, Some(ts("2025-03-01T00:00:00Z")));
        assert!(matches!(
            BillingAccount::from_manifest(&manifests[1]),
            Err(BillingResourceError::WrongKind { .. })
        ));
        let mut no_uid = manifests[0].clone();
        no_uid.metadata.uid = None;
        assert!(BillingAccount::from_manifest(&no_uid).is_err());
        let mut bad_time = manifests[1].clone();
        bad_time.status =
            Some(serde_json::json!({"billingResponsibility": {"establishedAt": "yesterday"}}));
        assert!(BillingAccountBinding::from_manifest(&bad_time).is_err());
    }
}
