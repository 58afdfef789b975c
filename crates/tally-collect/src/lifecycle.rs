//! Connection lifecycle events: the gateway controller's view of
//! connections, as CloudEvents 1.0, turned into [`ConnectionEvent`]s once
//! per (`source`, `id`).
//!
//! # Event shapes
//! - `type` [`CONNECTION_OPENED`] (`networking.datumapis.com/gateway/connection.opened`)
//!   or [`CONNECTION_CLOSED`] (`….connection.closed`).
//! - `time` (required): the instant the connection opened or closed.
//! - `id`, `source`, `subject`, `specversion` as for every CloudEvent Tally
//!   takes ([`tally_model::parse_event`]); (`source`, `id`) identifies the
//!   event, so a retry carries the same pair.
//! - `data.connection_id` (required; a string, or a non-negative integer):
//!   names the connection until it closes. It must not repeat while the
//!   connection may be open, so ids that restart with their proxy (Envoy's
//!   `%CONNECTION_ID%`) need the proxy's identity as a prefix.
//! - The route, on `opened` (ignored on `closed`): `data.route_name` as
//!   Envoy Gateway names routes (`httproute/<namespace>/<name>/rule/<i>/…`),
//!   or `data.httproute_namespace` with `data.httproute_name`; optionally
//!   `data.project_name` (default: the route's namespace). An event naming
//!   no HTTPRoute is valid but unattributable: it is counted
//!   (`missing_route_name`, `unknown_route_name`), as access-log lines are.
//!
//! ```json
//! {"specversion": "1.0", "id": "01J0…", "source": "gateway-controller/edge-1",
//!  "type": "networking.datumapis.com/gateway/connection.opened",
//!  "subject": "projects/shop", "time": "2024-05-01T12:00:10.250Z",
//!  "data": {"connection_id": "envoy-7f9c/4711",
//!           "route_name": "httproute/shop/chat/rule/0/match/0/chat.example.com",
//!           "project_name": "shop"}}
//! ```
//!
//! [`LifecycleRecord::from_value`] validates one event and reports every
//! problem at once; the agent spools valid events as [`LifecycleRecord`]
//! JSON lines, and [`LifecycleApplier`] applies those lines to an
//! [`Aggregator`], skipping (`source`, `id`) pairs it applied before.
//!
//! # Deduplication horizon
//! An applied pair is remembered until its event time is more than the
//! horizon behind the watermark. A record older than that is not applied
//! (`too_late`): it could no longer be told from a retry. The agent refuses
//! such events when they arrive ([`LifecycleRecord::check_time`]), so only
//! a backlog read long after it was received can meet that rule.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tally_model::event::json_type;
use tally_model::{FieldError, error_code, field_error, parse_event};

use crate::aggregate::{Aggregator, ConnectionEvent, WindowUsage};
use crate::record::LineProblem;
use crate::route::{RouteKey, parse_route_name};

/// `type` of the event saying a connection opened.
pub const CONNECTION_OPENED: &str = "networking.datumapis.com/gateway/connection.opened";
/// `type` of the event saying a connection closed.
pub const CONNECTION_CLOSED: &str = "networking.datumapis.com/gateway/connection.closed";
/// How far ahead of the agent's clock an event's `time` may be.
pub const MAX_AHEAD_MILLIS: i64 = 3_600_000;

/// What happened to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// [`CONNECTION_OPENED`].
    Opened,
    /// [`CONNECTION_CLOSED`].
    Closed,
}

/// One valid lifecycle event, as the agent's spool holds it (one JSON
/// object per line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleRecord {
    /// The event's `source`.
    pub source: String,
    /// The event's `id`.
    pub id: String,
    /// Opened or closed.
    pub change: Change,
    /// `data.connection_id`.
    pub connection_id: String,
    /// The event's `time`, Unix ms.
    pub at_millis: i64,
    /// `data.route_name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_name: Option<String>,
    /// `data.httproute_namespace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub httproute_namespace: Option<String>,
    /// `data.httproute_name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub httproute_name: Option<String>,
    /// `data.project_name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_name: Option<String>,
}

impl LifecycleRecord {
    /// Validates one CloudEvent (a JSON value) as a lifecycle event and
    /// reports every problem at once, with fields named as in the event
    /// (`time`, `data.connection_id`, …).
    pub fn from_value(value: Value) -> Result<LifecycleRecord, Vec<FieldError>> {
        let mut errors = Vec::new();
        let data = value.get("data").cloned();
        let has_time = value.get("time").is_some_and(|t| !t.is_null());
        let envelope = parse_event(value, jiff::Timestamp::UNIX_EPOCH);
        if !has_time {
            errors.push(field_error(
                "time",
                error_code::MISSING_REQUIRED_FIELD,
                "is required: the instant the connection opened or closed",
            ));
        }
        let envelope = match envelope {
            Ok(event) => Some(event),
            Err(found) => {
                errors.extend(found);
                None
            }
        };
        let change = match envelope.as_ref().map(|e| e.kind.as_str()) {
            Some(CONNECTION_OPENED) => Some(Change::Opened),
            Some(CONNECTION_CLOSED) => Some(Change::Closed),
            Some(other) => {
                errors.push(field_error(
                    "type",
                    error_code::INVALID_VALUE,
                    format!(
                        "must be {CONNECTION_OPENED:?} or {CONNECTION_CLOSED:?}, got {other:?}"
                    ),
                ));
                None
            }
            None => None,
        };
        let data = match data {
            Some(Value::Object(map)) => map,
            None | Some(Value::Null) => {
                errors.push(field_error(
                    "data",
                    error_code::MISSING_REQUIRED_FIELD,
                    "is required: an object with connection_id (and the route on opened)",
                ));
                serde_json::Map::new()
            }
            // Reported by `parse_event`.
            Some(_) => serde_json::Map::new(),
        };
        let connection_id = match data.get("connection_id") {
            Some(Value::String(id)) if !id.is_empty() && id != "-" => Some(id.clone()),
            Some(Value::Number(n)) if n.is_u64() => Some(n.to_string()),
            None | Some(Value::Null) | Some(Value::String(_)) => {
                errors.push(field_error(
                    "data.connection_id",
                    error_code::MISSING_REQUIRED_FIELD,
                    "is required: the id of the connection, unique while it may be open",
                ));
                None
            }
            Some(other) => {
                errors.push(field_error(
                    "data.connection_id",
                    error_code::INVALID_VALUE_TYPE,
                    format!(
                        "must be a string or a non-negative integer, got {}",
                        json_type(other)
                    ),
                ));
                None
            }
        };
        let mut text = |field: &str| match data.get(field) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()).filter(|s| !s.is_empty() && s != "-"),
            Some(other) => {
                errors.push(field_error(
                    &format!("data.{field}"),
                    error_code::INVALID_VALUE_TYPE,
                    format!("must be a string, got {}", json_type(other)),
                ));
                None
            }
        };
        let route_name = text("route_name");
        let httproute_namespace = text("httproute_namespace");
        let httproute_name = text("httproute_name");
        let project_name = text("project_name");
        match (&httproute_namespace, &httproute_name) {
            (Some(_), None) | (None, Some(_)) => errors.push(field_error(
                if httproute_name.is_none() {
                    "data.httproute_name"
                } else {
                    "data.httproute_namespace"
                },
                error_code::MISSING_REQUIRED_FIELD,
                "httproute_namespace and httproute_name go together",
            )),
            (Some(namespace), Some(name)) => {
                if let Some(parsed) = route_name.as_deref().and_then(parse_route_name)
                    && (parsed.namespace, parsed.name) != (namespace.as_str(), name.as_str())
                {
                    errors.push(field_error(
                        "data.route_name",
                        error_code::INVALID_VALUE,
                        format!(
                            "names the HTTPRoute {}/{}, but httproute_namespace/httproute_name say {namespace}/{name}",
                            parsed.namespace, parsed.name
                        ),
                    ));
                }
            }
            (None, None) => {}
        }
        match (envelope, change, connection_id) {
            (Some(event), Some(change), Some(connection_id)) if errors.is_empty() => {
                Ok(LifecycleRecord {
                    source: event.source,
                    id: event.id,
                    change,
                    connection_id,
                    at_millis: event.time.as_millisecond(),
                    route_name,
                    httproute_namespace,
                    httproute_name,
                    project_name,
                })
            }
            _ => Err(errors),
        }
    }

    /// Whether the event's time may be taken at `now_millis` (the agent's
    /// clock): not older than the deduplication horizon (`TOO_LATE`), not
    /// more than [`MAX_AHEAD_MILLIS`] ahead (`TIME_IN_FUTURE`).
    pub fn check_time(&self, now_millis: i64, horizon_millis: i64) -> Result<(), FieldError> {
        if self.at_millis < now_millis.saturating_sub(horizon_millis) {
            return Err(field_error(
                "time",
                error_code::TOO_LATE,
                format!(
                    "is more than {} s behind the agent's clock, past its deduplication horizon",
                    horizon_millis / 1000
                ),
            ));
        }
        if self.at_millis > now_millis.saturating_add(MAX_AHEAD_MILLIS) {
            return Err(field_error(
                "time",
                error_code::TIME_IN_FUTURE,
                format!(
                    "is more than {} s ahead of the agent's clock",
                    MAX_AHEAD_MILLIS / 1000
                ),
            ));
        }
        Ok(())
    }

    /// The HTTPRoute the connection bills to: `httproute_namespace` +
    /// `httproute_name` if given, else `route_name`; the project is
    /// `project_name`, else the namespace.
    pub fn route(&self) -> Result<RouteKey, LineProblem> {
        let project = self.project_name.as_deref();
        if let (Some(namespace), Some(name)) = (&self.httproute_namespace, &self.httproute_name) {
            return RouteKey::from_parts(project, namespace, name)
                .ok_or(LineProblem::UnknownRouteName);
        }
        let route_name = self
            .route_name
            .as_deref()
            .ok_or(LineProblem::MissingRouteName)?;
        let parsed = parse_route_name(route_name).ok_or(LineProblem::UnknownRouteName)?;
        RouteKey::new(&parsed, project).ok_or(LineProblem::UnknownRouteName)
    }

    /// The aggregator's form of the event; `Err` if an opened connection
    /// names no HTTPRoute.
    pub fn connection_event(&self) -> Result<ConnectionEvent, LineProblem> {
        Ok(match self.change {
            Change::Opened => ConnectionEvent::Opened {
                connection_id: self.connection_id.clone(),
                route: self.route()?,
                at_millis: self.at_millis,
            },
            Change::Closed => ConnectionEvent::Closed {
                connection_id: self.connection_id.clone(),
                at_millis: self.at_millis,
            },
        })
    }

    /// The deduplication key: `source`, a NUL, `id`.
    pub fn dedupe_key(&self) -> String {
        format!("{}\0{}", self.source, self.id)
    }
}

/// Applies spooled [`LifecycleRecord`] lines to an [`Aggregator`] once per
/// (`source`, `id`), remembering applied pairs for the horizon. Pure: the
/// caller persists [`LifecycleApplier::take_changes`] with its checkpoint.
#[derive(Debug, Clone, Default)]
pub struct LifecycleApplier {
    horizon_millis: i64,
    /// Applied key → event time.
    seen: HashMap<Box<str>, i64>,
    /// The same, by event time, for expiry.
    by_time: BTreeSet<(i64, Box<str>)>,
    /// Key → `Some(time)` added, `None` forgotten, since the last take.
    changes: BTreeMap<Box<str>, Option<i64>>,
}

impl LifecycleApplier {
    /// An applier remembering `seen` (key → event time, as persisted).
    pub fn new(horizon_millis: i64, seen: impl IntoIterator<Item = (Box<str>, i64)>) -> Self {
        let seen: HashMap<Box<str>, i64> = seen.into_iter().collect();
        let by_time = seen.iter().map(|(k, t)| (*t, k.clone())).collect();
        LifecycleApplier {
            horizon_millis,
            seen,
            by_time,
            changes: BTreeMap::new(),
        }
    }

    /// Applies one spool line (without its newline). A line that cannot be
    /// used is counted in the aggregator's diagnostics.
    pub fn push_line(
        &mut self,
        aggregator: &mut Aggregator,
        line: &[u8],
        out: &mut Vec<WindowUsage>,
    ) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return aggregator.note(LineProblem::EmptyLine, line);
        }
        match serde_json::from_slice::<LifecycleRecord>(line) {
            Ok(record) => self.push_record(aggregator, &record, line, out),
            Err(_) => aggregator.note(LineProblem::InvalidJson, line),
        }
    }

    /// Applies one record unless its (`source`, `id`) was applied before or
    /// it is older than the horizon behind the watermark; `line` is the
    /// example kept if it cannot be used.
    pub fn push_record(
        &mut self,
        aggregator: &mut Aggregator,
        record: &LifecycleRecord,
        line: &[u8],
        out: &mut Vec<WindowUsage>,
    ) {
        if let Some(watermark) = aggregator.watermark()
            && record.at_millis < watermark.saturating_sub(self.horizon_millis)
        {
            return aggregator.note(LineProblem::TooLate, line);
        }
        let key: Box<str> = record.dedupe_key().into();
        if self.seen.contains_key(&key) {
            return aggregator.note(LineProblem::DuplicateEvent, line);
        }
        self.seen.insert(key.clone(), record.at_millis);
        self.by_time.insert((record.at_millis, key.clone()));
        self.changes.insert(key, Some(record.at_millis));
        match record.connection_event() {
            Ok(event) => aggregator.push_connection_event(&event, out),
            Err(problem) => aggregator.note(problem, line),
        }
    }

    /// Forgets pairs whose event time is more than the horizon behind
    /// `watermark`.
    pub fn expire(&mut self, watermark: i64) {
        let cutoff = watermark.saturating_sub(self.horizon_millis);
        while let Some((at, _)) = self.by_time.first()
            && *at < cutoff
        {
            if let Some((_, key)) = self.by_time.pop_first() {
                self.seen.remove(&key);
                self.changes.insert(key, None);
            }
        }
    }

    /// What changed since the last take: key → `Some(event time)` to store,
    /// `None` to delete.
    pub fn take_changes(&mut self) -> BTreeMap<Box<str>, Option<i64>> {
        std::mem::take(&mut self.changes)
    }

    /// How many pairs are remembered.
    pub fn remembered(&self) -> usize {
        self.seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{Meter, WindowConfig};
    use serde_json::json;

    const T0: i64 = 1_714_564_800_000; // 2024-05-01T12:00:00Z

    fn at(millis: i64) -> String {
        jiff::Timestamp::from_millisecond(T0 + millis)
            .unwrap()
            .to_string()
    }

    fn event(id: &str, kind: &str, millis: i64, data: Value) -> Value {
        json!({"specversion": "1.0", "id": id, "source": "ctrl", "type": kind,
               "subject": "projects/shop", "time": at(millis), "data": data})
    }

    fn opened(id: &str, connection: &str, millis: i64) -> Value {
        event(
            id,
            CONNECTION_OPENED,
            millis,
            json!({"connection_id": connection,
                   "route_name": "httproute/shop/chat/rule/0/match/0/chat.example.com"}),
        )
    }

    fn closed(id: &str, connection: &str, millis: i64) -> Value {
        event(
            id,
            CONNECTION_CLOSED,
            millis,
            json!({"connection_id": connection}),
        )
    }

    fn fields(errors: &[FieldError]) -> Vec<(&str, &str)> {
        errors
            .iter()
            .map(|e| (e.field.as_str(), e.code.as_str()))
            .collect()
    }

    #[test]
    fn valid_events_become_records() {
        let record = LifecycleRecord::from_value(opened("e1", "c1", 10_250)).unwrap();
        assert_eq!(record.change, Change::Opened);
        assert_eq!(record.at_millis, T0 + 10_250);
        assert_eq!(
            record.route().unwrap(),
            RouteKey {
                project: "shop".into(),
                namespace: "shop".into(),
                name: "chat".into()
            }
        );
        let explicit = event(
            "e2",
            CONNECTION_OPENED,
            0,
            json!({"connection_id": 4711, "httproute_namespace": "ns", "httproute_name": "ws",
                   "project_name": "acme", "route_name": "httproute/ns/ws/rule/1"}),
        );
        let record = LifecycleRecord::from_value(explicit).unwrap();
        assert_eq!(record.connection_id, "4711");
        assert_eq!(record.route().unwrap().project, "acme");
        let record = LifecycleRecord::from_value(closed("e3", "c1", 5)).unwrap();
        assert_eq!(record.change, Change::Closed);
        // Round trip through the spool's line format.
        let line = serde_json::to_string(&record).unwrap();
        assert_eq!(
            serde_json::from_str::<LifecycleRecord>(&line).unwrap(),
            record
        );
    }

    #[test]
    fn every_problem_of_an_event_is_reported() {
        let bad = json!({"specversion": "1.0", "id": "x", "source": "ctrl",
            "type": "networking.datumapis.com/gateway/connection.reset", "subject": "s",
            "data": {"connection_id": true, "route_name": 7, "httproute_namespace": "ns"}});
        let errors = LifecycleRecord::from_value(bad).unwrap_err();
        assert_eq!(
            fields(&errors),
            [
                ("time", error_code::MISSING_REQUIRED_FIELD),
                ("type", error_code::INVALID_VALUE),
                ("data.connection_id", error_code::INVALID_VALUE_TYPE),
                ("data.route_name", error_code::INVALID_VALUE_TYPE),
                ("data.httproute_name", error_code::MISSING_REQUIRED_FIELD),
            ]
        );
        let errors = LifecycleRecord::from_value(json!({"specversion": "1.0", "id": "",
            "type": CONNECTION_CLOSED, "time": "soon"}))
        .unwrap_err();
        assert_eq!(
            fields(&errors),
            [
                ("id", error_code::MISSING_REQUIRED_FIELD),
                ("source", error_code::MISSING_REQUIRED_FIELD),
                ("subject", error_code::MISSING_REQUIRED_FIELD),
                ("time", error_code::INVALID_VALUE_TYPE),
                ("data", error_code::MISSING_REQUIRED_FIELD),
                ("data.connection_id", error_code::MISSING_REQUIRED_FIELD),
            ]
        );
        let disagree = event(
            "e",
            CONNECTION_OPENED,
            0,
            json!({"connection_id": "c", "httproute_namespace": "ns", "httproute_name": "a",
                   "route_name": "httproute/ns/b/rule/0"}),
        );
        let errors = LifecycleRecord::from_value(disagree).unwrap_err();
        assert_eq!(
            fields(&errors),
            [("data.route_name", error_code::INVALID_VALUE)]
        );
        assert_eq!(
            fields(&LifecycleRecord::from_value(json!([1])).unwrap_err()),
            [
                ("time", error_code::MISSING_REQUIRED_FIELD),
                ("", error_code::INVALID_VALUE_TYPE),
                ("data", error_code::MISSING_REQUIRED_FIELD),
                ("data.connection_id", error_code::MISSING_REQUIRED_FIELD),
            ]
        );
    }

    #[test]
    fn times_far_from_the_clock_are_refused() {
        let record = LifecycleRecord::from_value(opened("e", "c", 0)).unwrap();
        let hour = 3_600_000;
        assert!(record.check_time(T0 + hour, hour).is_ok());
        assert_eq!(
            record.check_time(T0 + hour + 1, hour).unwrap_err().code,
            error_code::TOO_LATE
        );
        assert!(record.check_time(T0 - MAX_AHEAD_MILLIS, hour).is_ok());
        assert_eq!(
            record
                .check_time(T0 - MAX_AHEAD_MILLIS - 1, hour)
                .unwrap_err()
                .code,
            error_code::TIME_IN_FUTURE
        );
    }

    fn line(value: Value) -> Vec<u8> {
        serde_json::to_vec(&LifecycleRecord::from_value(value).unwrap()).unwrap()
    }

    fn seconds(out: &[WindowUsage]) -> u128 {
        out.iter()
            .filter(|u| u.meter == Meter::ConnectionSeconds)
            .map(|u| u.value)
            .sum()
    }

    #[test]
    fn retries_are_applied_once_and_unattributable_events_counted() {
        let mut aggregator = Aggregator::new(WindowConfig::default());
        let mut applier = LifecycleApplier::new(3_600_000, []);
        let mut out = Vec::new();
        let unrouted = event(
            "e9",
            CONNECTION_OPENED,
            0,
            json!({"connection_id": "c9", "route_name": "tcproute/shop/db/rule/0"}),
        );
        for value in [
            opened("e1", "c1", 10_000),
            opened("e1", "c1", 10_000),
            closed("e2", "c1", 70_500),
            // A retry of the opening after the close must not reopen it.
            opened("e1", "c1", 10_000),
            closed("e2", "c1", 70_500),
            unrouted,
        ] {
            applier.push_line(&mut aggregator, &line(value), &mut out);
        }
        applier.push_line(&mut aggregator, b"{oops", &mut out);
        aggregator.advance_to(T0 + 600_000, &mut out);
        aggregator.flush(&mut out);
        assert_eq!(seconds(&out), 60_500, "60.5 s, exactly");
        let counts = &aggregator.diagnostics().counts;
        assert_eq!(counts[&LineProblem::DuplicateEvent], 3);
        assert_eq!(counts[&LineProblem::UnknownRouteName], 1);
        assert_eq!(counts[&LineProblem::InvalidJson], 1);
        assert!(!counts.contains_key(&LineProblem::ConnectionUnknown));
        assert_eq!(applier.remembered(), 3);
        assert_eq!(applier.take_changes().len(), 3);
        assert!(applier.take_changes().is_empty());
    }

    #[test]
    fn pairs_past_the_horizon_are_forgotten_and_such_events_refused() {
        let hour = 3_600_000;
        let mut aggregator = Aggregator::new(WindowConfig::default());
        let mut applier = LifecycleApplier::new(hour, []);
        let mut out = Vec::new();
        applier.push_line(&mut aggregator, &line(opened("e1", "c1", 0)), &mut out);
        applier.push_line(&mut aggregator, &line(closed("e2", "c1", 1_000)), &mut out);
        aggregator.advance_to(T0 + hour + 500, &mut out);
        applier.expire(aggregator.watermark().unwrap());
        assert_eq!(applier.remembered(), 1, "e1 is forgotten, e2 is not");
        assert_eq!(
            applier.take_changes().into_iter().collect::<Vec<_>>(),
            [
                ("ctrl\0e1".into(), None),
                ("ctrl\0e2".into(), Some(T0 + 1_000))
            ]
        );
        // The forgotten event is refused as too late, not applied again.
        applier.push_line(&mut aggregator, &line(opened("e1", "c1", 0)), &mut out);
        applier.push_line(&mut aggregator, &line(closed("e2", "c1", 1_000)), &mut out);
        let counts = &aggregator.diagnostics().counts;
        assert_eq!(counts[&LineProblem::TooLate], 1);
        assert_eq!(counts[&LineProblem::DuplicateEvent], 1);
        // Reloaded from what was persisted, it still knows e2.
        let mut reloaded = LifecycleApplier::new(hour, [("ctrl\0e2".into(), T0 + 1_000)]);
        reloaded.push_line(&mut aggregator, &line(closed("e2", "c1", 1_000)), &mut out);
        assert_eq!(
            aggregator.diagnostics().counts[&LineProblem::DuplicateEvent],
            2
        );
    }
}
