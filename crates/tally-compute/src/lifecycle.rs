//! The lifecycle of a compute instance: what the controllers report as
//! CloudEvents, and what an `Instance` resource's status change implies.
//!
//! A lifecycle CloudEvent has the type `com.datumapis.compute.instance.<kind>`
//! (`created`, `scheduled`, `started`, `stopped`, `crashed`, `oom_killed`,
//! `terminated`) and JSON `data`:
//!
//! | field | required | bound |
//! |---|---|---|
//! | `project` | yes | a Kubernetes name (≤ 253 bytes, `[a-z0-9.-]`) |
//! | `instance` | yes | a Kubernetes name |
//! | `namespace`, `workload`, `node` | no | Kubernetes names |
//! | `uid` | no | ≤ 128 bytes |
//! | `reason` | no | one of [`Reason`] |
//! | `message` | no | ≤ 1,024 bytes |
//!
//! Unknown `data` fields are refused, so a typo is not silently lost.
//!
//! `Instance` status (the shape [`observe`] reads): `status.conditions[]`
//! with `type`, `status` (`"True"`/`"False"`), `reason`, `message` and
//! `lastTransitionTime`, and `status.nodeName`. The first rule that holds
//! decides the instance's state:
//!
//! 1. a condition with reason `Terminating` → `terminated`;
//! 2. a condition with reason `InstanceCrashing` → `oom_killed` if its
//!    message names `OOMKilled`, else `crashed`;
//! 3. a condition with reason `ImageUnavailable`, `ConfigurationError` or
//!    `Failed` → `stopped` with that reason;
//! 4. condition `Available` is `True` → `started` (`Available`);
//! 5. a condition with reason `Stopping` → `stopped` (`Stopping`);
//! 6. condition `Scheduled` is `True`, or `status.nodeName` is set →
//!    `scheduled`;
//! 7. otherwise `created`.
//!
//! [`derive`] emits an event when that state (kind, reason, or the deciding
//! condition's `lastTransitionTime`) changes; the first sight of an
//! instance also emits `created`. Derived ids are deterministic
//! (`<uid>/<kind>/<time>`, source [`DERIVED_SOURCE`]), so deriving again
//! after a restart yields duplicates the store drops.
//!
//! **Never:** read a clock; accept a name that could break the store's key
//! layout (names are checked before an event exists).

use std::fmt;
use std::str::FromStr;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tally_model::event::{FieldError, error_code, field_error};
use tally_model::{CloudEvent, EventError, Manifest, parse_event};

/// Every lifecycle CloudEvent type starts with this.
pub const TYPE_PREFIX: &str = "com.datumapis.compute.instance.";
/// The CloudEvent source of events derived from `Instance` status changes.
pub const DERIVED_SOURCE: &str = "tally/instance-status";
/// Longest Kubernetes name accepted for a project, instance, namespace,
/// workload or node.
pub const MAX_NAME_BYTES: usize = 253;
/// Longest `uid`.
pub const MAX_UID_BYTES: usize = 128;
/// Longest `message`.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// What happened to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LifecycleKind {
    Created,
    Scheduled,
    Started,
    Stopped,
    Crashed,
    OomKilled,
    Terminated,
}

impl LifecycleKind {
    pub const ALL: [LifecycleKind; 7] = [
        LifecycleKind::Created,
        LifecycleKind::Scheduled,
        LifecycleKind::Started,
        LifecycleKind::Stopped,
        LifecycleKind::Crashed,
        LifecycleKind::OomKilled,
        LifecycleKind::Terminated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleKind::Created => "created",
            LifecycleKind::Scheduled => "scheduled",
            LifecycleKind::Started => "started",
            LifecycleKind::Stopped => "stopped",
            LifecycleKind::Crashed => "crashed",
            LifecycleKind::OomKilled => "oom_killed",
            LifecycleKind::Terminated => "terminated",
        }
    }

    /// The CloudEvent type of this kind.
    pub fn event_type(self) -> String {
        format!("{TYPE_PREFIX}{}", self.as_str())
    }

    /// The kind a CloudEvent type names; `None` for any other type.
    pub fn from_event_type(event_type: &str) -> Option<LifecycleKind> {
        let suffix = event_type.strip_prefix(TYPE_PREFIX)?;
        LifecycleKind::ALL
            .into_iter()
            .find(|k| k.as_str() == suffix)
    }
}

impl fmt::Display for LifecycleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The platform's condition reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Reason {
    Available,
    Stopping,
    ImageUnavailable,
    ConfigurationError,
    InstanceCrashing,
    Failed,
    Terminating,
}

impl Reason {
    pub const ALL: [Reason; 7] = [
        Reason::Available,
        Reason::Stopping,
        Reason::ImageUnavailable,
        Reason::ConfigurationError,
        Reason::InstanceCrashing,
        Reason::Failed,
        Reason::Terminating,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Available => "Available",
            Reason::Stopping => "Stopping",
            Reason::ImageUnavailable => "ImageUnavailable",
            Reason::ConfigurationError => "ConfigurationError",
            Reason::InstanceCrashing => "InstanceCrashing",
            Reason::Failed => "Failed",
            Reason::Terminating => "Terminating",
        }
    }

    /// Whether the reason reports a failure (the alerts' error ratio).
    pub fn is_error(self) -> bool {
        matches!(
            self,
            Reason::ImageUnavailable
                | Reason::ConfigurationError
                | Reason::InstanceCrashing
                | Reason::Failed
        )
    }
}

impl FromStr for Reason {
    type Err = ();
    fn from_str(s: &str) -> Result<Reason, ()> {
        Reason::ALL.into_iter().find(|r| r.as_str() == s).ok_or(())
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One lifecycle event of one instance, as stored and listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LifecycleEvent {
    pub source: String,
    pub id: String,
    pub kind: LifecycleKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    pub time: Timestamp,
    pub project: String,
    pub instance: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The `data` of a lifecycle CloudEvent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Data {
    project: String,
    instance: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    workload: Option<String>,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// Whether `s` is a Kubernetes name Tally accepts as a key: 1–253 bytes of
/// `[a-z0-9.-]`, starting and ending with an alphanumeric.
pub fn is_name(s: &str) -> bool {
    let b = s.as_bytes();
    let edge = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= MAX_NAME_BYTES
        && b.first().is_some_and(edge)
        && b.last().is_some_and(edge)
        && b.iter().all(|c| edge(c) || *c == b'-' || *c == b'.')
}

fn check_name(field: &str, value: &str, problems: &mut Vec<FieldError>) {
    if !is_name(value) {
        problems.push(field_error(
            field,
            error_code::INVALID_VALUE,
            format!("must be a Kubernetes name (1–{MAX_NAME_BYTES} bytes of a-z, 0-9, '-', '.')"),
        ));
    }
}

fn check_max(field: &str, value: &str, max: usize, problems: &mut Vec<FieldError>) {
    if value.len() > max {
        problems.push(field_error(
            field,
            error_code::VALUE_TOO_LONG,
            format!("at most {max} bytes"),
        ));
    }
}

/// Reads a (validated) CloudEvent as a lifecycle event; all of its problems
/// at once.
pub fn from_cloud_event(event: &CloudEvent) -> Result<LifecycleEvent, Vec<FieldError>> {
    let mut problems = Vec::new();
    let kind = LifecycleKind::from_event_type(&event.kind);
    if kind.is_none() {
        problems.push(field_error(
            "type",
            error_code::INVALID_VALUE,
            format!("must be {TYPE_PREFIX}<created|scheduled|started|stopped|crashed|oom_killed|terminated>"),
        ));
    }
    let data = match event.data.clone().map(serde_json::from_value::<Data>) {
        Some(Ok(data)) => Some(data),
        Some(Err(e)) => {
            problems.push(field_error(
                "data",
                error_code::INVALID_VALUE,
                e.to_string(),
            ));
            None
        }
        None => {
            problems.push(field_error(
                "data",
                error_code::MISSING_REQUIRED_FIELD,
                "a lifecycle event names its project and instance in data",
            ));
            None
        }
    };
    let (Some(kind), Some(data)) = (kind, data) else {
        return Err(problems);
    };
    let reason = validate_data(&data, &mut problems);
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(LifecycleEvent {
        source: event.source.clone(),
        id: event.id.clone(),
        kind,
        reason,
        time: event.time,
        project: data.project,
        instance: data.instance,
        namespace: data.namespace,
        workload: data.workload,
        uid: data.uid,
        node: data.node,
        message: data.message,
    })
}

/// A request's CloudEvents as lifecycle events, validated whole: every
/// event, or every problem of every bad event (by index, with its `id`).
/// `received` stands in for a missing `time`. The one validation of
/// lifecycle ingest, shared by `tally serve` and the node agent
/// (`tally collect`), so the agent takes exactly what serve would.
pub fn from_values(
    values: Vec<Value>,
    received: Timestamp,
) -> Result<Vec<LifecycleEvent>, Vec<EventError>> {
    let mut events = Vec::with_capacity(values.len());
    let mut errors = Vec::new();
    for (index, value) in values.into_iter().enumerate() {
        let id = value.get("id").and_then(Value::as_str).map(str::to_owned);
        match parse_event(value, received).and_then(|e| from_cloud_event(&e)) {
            Ok(event) => events.push(event),
            Err(field_errors) => errors.push(EventError {
                index,
                id,
                errors: field_errors,
            }),
        }
    }
    if errors.is_empty() {
        Ok(events)
    } else {
        Err(errors)
    }
}

impl LifecycleEvent {
    /// The event as a lifecycle CloudEvent that [`from_values`] reads back
    /// as this same event: `source`, `id`, `type`, `time` and `data` carry
    /// every field; `subject` is `projects/<project>/instances/<instance>`
    /// (a CloudEvent needs one; Tally keeps none). What the node agent
    /// forwards, so a retry carries the time the agent first took.
    pub fn to_cloud_event(&self) -> Value {
        let mut data = serde_json::Map::new();
        data.insert("project".into(), self.project.clone().into());
        data.insert("instance".into(), self.instance.clone().into());
        let optional = [
            ("namespace", &self.namespace),
            ("workload", &self.workload),
            ("uid", &self.uid),
            ("node", &self.node),
            ("message", &self.message),
        ];
        for (field, value) in optional {
            if let Some(value) = value {
                data.insert(field.into(), value.clone().into());
            }
        }
        if let Some(reason) = self.reason {
            data.insert("reason".into(), reason.as_str().into());
        }
        serde_json::json!({
            "specversion": "1.0",
            "id": self.id,
            "source": self.source,
            "type": self.kind.event_type(),
            "subject": format!("projects/{}/instances/{}", self.project, self.instance),
            "time": self.time.to_string(),
            "data": data,
        })
    }
}

fn validate_data(data: &Data, problems: &mut Vec<FieldError>) -> Option<Reason> {
    check_name("data.project", &data.project, problems);
    check_name("data.instance", &data.instance, problems);
    for (field, value) in [
        ("data.namespace", &data.namespace),
        ("data.workload", &data.workload),
        ("data.node", &data.node),
    ] {
        if let Some(v) = value {
            check_name(field, v, problems);
        }
    }
    if let Some(uid) = &data.uid {
        check_max("data.uid", uid, MAX_UID_BYTES, problems);
    }
    if let Some(message) = &data.message {
        check_max("data.message", message, MAX_MESSAGE_BYTES, problems);
    }
    let reason = data.reason.as_deref().map(str::parse::<Reason>);
    if let Some(Err(())) = reason {
        problems.push(field_error(
            "data.reason",
            error_code::INVALID_VALUE,
            "must be one of Available, Stopping, ImageUnavailable, ConfigurationError, InstanceCrashing, Failed, Terminating",
        ));
    }
    reason.and_then(Result::ok)
}

/// An instance's state as its status shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub kind: LifecycleKind,
    pub reason: Option<Reason>,
    /// When the deciding condition last changed, if it says.
    pub since: Option<Timestamp>,
    pub message: Option<String>,
    pub node: Option<String>,
}

struct Condition<'a> {
    kind: &'a str,
    is_true: bool,
    reason: Option<Reason>,
    message: Option<&'a str>,
    since: Option<Timestamp>,
}

fn conditions(status: Option<&Value>) -> Vec<Condition<'_>> {
    let Some(list) = status
        .and_then(|s| s.get("conditions"))
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    list.iter()
        .map(|c| Condition {
            kind: c.get("type").and_then(Value::as_str).unwrap_or(""),
            is_true: c.get("status").and_then(Value::as_str) == Some("True"),
            reason: c
                .get("reason")
                .and_then(Value::as_str)
                .and_then(|r| r.parse().ok()),
            message: c.get("message").and_then(Value::as_str),
            since: c
                .get("lastTransitionTime")
                .and_then(Value::as_str)
                .and_then(|t| t.parse().ok()),
        })
        .collect()
}

/// The state an `Instance`'s status shows (the rules in the module doc).
pub fn observe(manifest: &Manifest) -> Observed {
    let status = manifest.status.as_ref();
    let node = status
        .and_then(|s| s.get("nodeName"))
        .and_then(Value::as_str)
        .filter(|n| is_name(n))
        .map(str::to_owned);
    let conds = conditions(status);
    let with = |r: &[Reason]| {
        conds
            .iter()
            .find(|c| c.reason.is_some_and(|x| r.contains(&x)))
    };
    let decided = |kind, c: &Condition<'_>| Observed {
        kind,
        reason: c.reason,
        since: c.since,
        message: c.message.map(|m| truncate(m, MAX_MESSAGE_BYTES)),
        node: node.clone(),
    };
    if let Some(c) = with(&[Reason::Terminating]) {
        return decided(LifecycleKind::Terminated, c);
    }
    if let Some(c) = with(&[Reason::InstanceCrashing]) {
        let oom = c.message.is_some_and(|m| m.contains("OOMKilled"));
        let kind = if oom {
            LifecycleKind::OomKilled
        } else {
            LifecycleKind::Crashed
        };
        return decided(kind, c);
    }
    if let Some(c) = with(&[
        Reason::ImageUnavailable,
        Reason::ConfigurationError,
        Reason::Failed,
    ]) {
        return decided(LifecycleKind::Stopped, c);
    }
    if let Some(c) = conds.iter().find(|c| c.kind == "Available" && c.is_true) {
        let mut o = decided(LifecycleKind::Started, c);
        o.reason = Some(Reason::Available);
        return o;
    }
    if let Some(c) = with(&[Reason::Stopping]) {
        return decided(LifecycleKind::Stopped, c);
    }
    let scheduled = conds.iter().find(|c| c.kind == "Scheduled" && c.is_true);
    let kind = if scheduled.is_some() || node.is_some() {
        LifecycleKind::Scheduled
    } else {
        LifecycleKind::Created
    };
    Observed {
        kind,
        reason: None,
        since: scheduled.and_then(|c| c.since),
        message: None,
        node,
    }
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// The lifecycle events a change of an `Instance` from `old` to `new`
/// implies (see the module doc). `project` owns the instance's namespace;
/// `now` stands in for a time the status does not give. An instance whose
/// name or namespace is not a Kubernetes name yields nothing.
pub fn derive(
    old: Option<&Manifest>,
    new: &Manifest,
    project: &str,
    now: Timestamp,
) -> Vec<LifecycleEvent> {
    let meta = &new.metadata;
    let namespace = meta.namespace.clone().filter(|n| is_name(n));
    if !is_name(&meta.name) || !is_name(project) || namespace.is_none() {
        return Vec::new();
    }
    let seen = observe(new);
    let mut out = Vec::new();
    let uid = meta.uid.clone().map(|u| truncate(&u, MAX_UID_BYTES));
    let key = uid
        .clone()
        .unwrap_or_else(|| format!("{}/{}", namespace.as_deref().unwrap_or(""), meta.name));
    let event = |kind: LifecycleKind, reason, time: Timestamp, message, node| LifecycleEvent {
        source: DERIVED_SOURCE.to_owned(),
        id: format!("{key}/{kind}/{time}"),
        kind,
        reason,
        time,
        project: project.to_owned(),
        instance: meta.name.clone(),
        namespace: namespace.clone(),
        workload: workload_of(new),
        uid: uid.clone(),
        node,
        message,
    };
    let before = old.map(observe);
    if before.is_none() {
        let created = meta.creation_timestamp.unwrap_or(now);
        out.push(event(LifecycleKind::Created, None, created, None, None));
    }
    let changed = before
        .as_ref()
        .is_none_or(|b| (b.kind, b.reason, b.since) != (seen.kind, seen.reason, seen.since));
    if changed && seen.kind != LifecycleKind::Created {
        let time = seen.since.or(meta.update_timestamp).unwrap_or(now);
        out.push(event(seen.kind, seen.reason, time, seen.message, seen.node));
    }
    out
}

/// The owning workload: `spec.workloadRef.name`, else the label
/// `compute.datumapis.com/workload`.
fn workload_of(m: &Manifest) -> Option<String> {
    m.spec
        .get("workloadRef")
        .and_then(|w| w.get("name"))
        .and_then(Value::as_str)
        .or_else(|| {
            m.metadata
                .labels
                .get("compute.datumapis.com/workload")
                .map(String::as_str)
        })
        .filter(|w| is_name(w))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cloud_event(kind: &str, data: Value) -> CloudEvent {
        serde_json::from_value(json!({
            "specversion": "1.0", "id": "e1", "source": "controller", "type": kind,
            "subject": "web-0", "time": "2026-12-06T10:00:00Z", "data": data,
        }))
        .unwrap()
    }

    #[test]
    fn a_lifecycle_cloud_event_is_read_whole() {
        let e = cloud_event(
            "com.datumapis.compute.instance.oom_killed",
            json!({"project": "acme", "instance": "web-0", "reason": "InstanceCrashing",
                   "workload": "web", "message": "OOMKilled"}),
        );
        let l = from_cloud_event(&e).unwrap();
        assert_eq!(l.kind, LifecycleKind::OomKilled);
        assert_eq!(l.reason, Some(Reason::InstanceCrashing));
        assert_eq!((l.project.as_str(), l.instance.as_str()), ("acme", "web-0"));
        assert_eq!(l.workload.as_deref(), Some("web"));
    }

    #[test]
    fn every_problem_is_reported_and_names_are_bounded() {
        let e = cloud_event(
            "com.datumapis.compute.instance.started",
            json!({"project": "Acme/..", "instance": "x".repeat(254), "reason": "Bored",
                   "message": "m".repeat(2000)}),
        );
        let problems = from_cloud_event(&e).unwrap_err();
        let fields: Vec<_> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "data.project",
                "data.instance",
                "data.message",
                "data.reason"
            ]
        );
        let wrong_type = cloud_event(
            "com.example.other",
            json!({"project": "a", "instance": "b"}),
        );
        assert_eq!(from_cloud_event(&wrong_type).unwrap_err()[0].field, "type");
        let unknown = cloud_event(
            "com.datumapis.compute.instance.started",
            json!({"project": "a", "instance": "b", "extra": 1}),
        );
        assert_eq!(from_cloud_event(&unknown).unwrap_err()[0].field, "data");
    }

    #[test]
    fn every_kind_round_trips_through_its_type() {
        for k in LifecycleKind::ALL {
            assert_eq!(LifecycleKind::from_event_type(&k.event_type()), Some(k));
        }
        assert_eq!(
            LifecycleKind::from_event_type("com.datumapis.compute.instance."),
            None
        );
    }

    #[test]
    fn a_request_is_validated_whole_and_the_canonical_form_reads_back_the_same() {
        let received: Timestamp = "2026-12-06T11:00:00Z".parse().unwrap();
        let good = json!({"specversion": "1.0", "id": "e1", "source": "ctrl",
            "type": "com.datumapis.compute.instance.crashed", "subject": "x",
            "data": {"project": "acme", "instance": "web-0", "reason": "InstanceCrashing",
                     "node": "n1", "uid": "u-1", "message": "exit 1", "namespace": "ns",
                     "workload": "web"}});
        let bad = json!({"specversion": "1.0", "id": "e2", "source": "ctrl",
            "type": "com.datumapis.compute.instance.started", "subject": "x",
            "data": {"project": "Acme"}});
        let errors = from_values(vec![good.clone(), bad], received).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!((errors[0].index, errors[0].id.as_deref()), (1, Some("e2")));
        let events = from_values(vec![good], received).unwrap();
        assert_eq!(
            events[0].time, received,
            "a missing time is the receive time"
        );
        // The form the agent forwards is read back as the very same event,
        // whenever it arrives.
        let later: Timestamp = "2026-12-06T12:00:00Z".parse().unwrap();
        let again = from_values(vec![events[0].to_cloud_event()], later).unwrap();
        assert_eq!(again, events);
        let mut minimal = events[0].clone();
        (minimal.reason, minimal.node, minimal.uid, minimal.message) = (None, None, None, None);
        (minimal.namespace, minimal.workload) = (None, None);
        let again = from_values(vec![minimal.to_cloud_event()], later).unwrap();
        assert_eq!(again, vec![minimal]);
    }

    fn instance(status: Value) -> Manifest {
        serde_json::from_value(json!({
            "apiVersion": "compute.datumapis.com/v1alpha1", "kind": "Instance",
            "metadata": {"name": "web-0", "namespace": "acme-prod", "uid": "u1",
                         "creationTimestamp": "2026-12-06T09:00:00Z"},
            "spec": {"workloadRef": {"name": "web"}},
            "status": status,
        }))
        .unwrap()
    }

    fn cond(kind: &str, status: &str, reason: &str, at: &str) -> Value {
        json!({"type": kind, "status": status, "reason": reason, "message": "",
               "lastTransitionTime": at})
    }

    #[test]
    fn status_changes_become_transitions_with_stable_ids() {
        let now: Timestamp = "2026-12-06T12:00:00Z".parse().unwrap();
        let pending = instance(json!({}));
        let first = derive(None, &pending, "acme", now);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].kind, LifecycleKind::Created);
        assert_eq!(first[0].id, "u1/created/2026-12-06T09:00:00Z");
        let scheduled = instance(json!({"nodeName": "node-7",
            "conditions": [cond("Scheduled", "True", "Available", "2026-12-06T09:00:01Z")]}));
        let s = derive(Some(&pending), &scheduled, "acme", now);
        assert_eq!(s[0].kind, LifecycleKind::Scheduled);
        assert_eq!(s[0].node.as_deref(), Some("node-7"));
        let running = instance(json!({"conditions": [
            cond("Available", "True", "Available", "2026-12-06T09:00:03Z")]}));
        let r = derive(Some(&scheduled), &running, "acme", now);
        assert_eq!(
            (r[0].kind, r[0].reason),
            (LifecycleKind::Started, Some(Reason::Available))
        );
        assert_eq!(r[0].workload.as_deref(), Some("web"));
        // The same status again implies nothing; seen afresh (a restart),
        // the ids are those already stored.
        assert!(derive(Some(&running), &running, "acme", now).is_empty());
        let again = derive(None, &running, "acme", now);
        assert_eq!(again[0].id, first[0].id);
        assert_eq!(again[1].id, r[0].id);
    }

    #[test]
    fn crashes_ooms_and_failures_are_told_apart() {
        let crash = |message: &str, at: &str| {
            let mut c = cond("Available", "False", "InstanceCrashing", at);
            c["message"] = json!(message);
            instance(json!({"conditions": [c]}))
        };
        assert_eq!(
            observe(&crash("exit 1", "2026-12-06T09:00:00Z")).kind,
            LifecycleKind::Crashed
        );
        assert_eq!(
            observe(&crash("OOMKilled", "2026-12-06T09:00:00Z")).kind,
            LifecycleKind::OomKilled
        );
        // A crash loop: the same reason at a new transition time is a new event.
        let a = crash("exit 1", "2026-12-06T09:00:00Z");
        let b = crash("exit 1", "2026-12-06T09:05:00Z");
        assert_eq!(derive(Some(&a), &b, "acme", Timestamp::UNIX_EPOCH).len(), 1);
        let failed = instance(json!({"conditions": [
            cond("Available", "False", "ImageUnavailable", "2026-12-06T09:00:00Z")]}));
        let o = observe(&failed);
        assert_eq!(
            (o.kind, o.reason),
            (LifecycleKind::Stopped, Some(Reason::ImageUnavailable))
        );
        let gone = instance(json!({"conditions": [
            cond("Available", "True", "Available", "2026-12-06T09:00:00Z"),
            cond("Ready", "False", "Terminating", "2026-12-06T09:10:00Z")]}));
        assert_eq!(observe(&gone).kind, LifecycleKind::Terminated);
    }
}
