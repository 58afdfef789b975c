//! `tally describe KIND NAME`: one resource for people — its metadata, its
//! spec, the rest of its status, its status conditions (with the last
//! transition as RFC 3339 and age when the server records it), and the
//! recent events the server keeps about it:
//!
//! - MeterDefinition: the most recent quarantined events of the meter
//!   (phase changes are not recorded, only the current phase);
//! - BillingSink: its dead letters (when and why the provider refused a
//!   batch), the end of the last forwarding pass, and its last error when
//!   the status carries one;
//! - Exporter: each sink's last success and last error (the server keeps
//!   only the last of each).
//!
//! For other kinds the server keeps no event history, and the output says
//! so. **Never** invents an event or a time the server did not give.

use std::fmt::Write as _;

use anyhow::Context;
use clap::Args;
use jiff::Timestamp;
use serde_json::Value;
use tally_client::{QuarantineListParams, TallyClient};
use tally_model::{Kind, Manifest};

use crate::output::{self, Cell, NONE, Table, age, or_none};
use crate::resources::{KINDS_HELP, KindRef, KindRefParser, namespace_for, one_name, reference};

/// At most this many recent events are shown.
const RECENT: usize = 10;

#[derive(Debug, Args)]
pub struct DescribeArgs {
    /// Resource kind, or KIND/NAME.
    #[arg(value_name = "KIND", value_parser = KindRefParser, long_help = KINDS_HELP, hide_possible_values = true)]
    kind: KindRef,

    /// Name of the resource (unless given as KIND/NAME).
    #[arg(value_name = "NAME")]
    name: Option<String>,

    /// Namespace of a namespaced kind (required for those).
    #[arg(short = 'n', long, value_name = "NAMESPACE")]
    namespace: Option<String>,
}

pub async fn run(client: &TallyClient, args: DescribeArgs) -> anyhow::Result<()> {
    let kind = args.kind.kind;
    let Some(name) = one_name(&args.kind, args.name.as_deref())? else {
        anyhow::bail!("name the resource to describe: KIND NAME or KIND/NAME");
    };
    let namespace = namespace_for(kind, args.namespace.as_deref())?;
    let manifest = client
        .get_resource(kind, namespace, &name)
        .await
        .with_context(|| format!("getting {}", reference(kind.as_str(), namespace, &name)))?;
    let history = history(client, kind, &manifest).await;
    crate::print(&render(&manifest, &history, Timestamp::now())?)
}

/// Something that happened to a resource, as the server recorded it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub time: Option<Timestamp>,
    pub warning: bool,
    pub reason: String,
    pub message: String,
}

/// The events of a resource, and notes on what the server does not keep.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    pub events: Vec<Event>,
    pub notes: Vec<String>,
}

/// What the server keeps about the resource: read, never made up.
async fn history(client: &TallyClient, kind: Kind, manifest: &Manifest) -> History {
    let name = &manifest.metadata.name;
    let mut history = History::default();
    match kind {
        Kind::MeterDefinition => {
            quarantined(client, name, &mut history).await;
            history
                .notes
                .push("Phase changes are not recorded; the spec shows the current phase.".into());
        }
        Kind::BillingSink => {
            dead_letters(client, name, &mut history).await;
            history.events.extend(billing_sink_events(manifest));
        }
        Kind::Exporter => {
            history.events.extend(exporter_events(manifest));
            history
                .notes
                .push("The server keeps each sink's last success and last error only.".into());
        }
        _ => history.notes.push(format!(
            "The server keeps no event history for {}.",
            kind.plural()
        )),
    }
    history.events.sort_by_key(|e| (e.time.is_none(), e.time));
    history
}

/// The most recent quarantined events of meter `name`.
async fn quarantined(client: &TallyClient, name: &str, history: &mut History) {
    let params = QuarantineListParams {
        meter: Some(name.to_owned()),
        limit: Some(RECENT),
        cursor: None,
    };
    match client.list_quarantine(&params).await {
        Ok(page) => {
            for q in &page.items {
                let e = &q.event.event;
                history.events.push(Event {
                    time: Some(q.event.ingested_at),
                    warning: true,
                    reason: "Quarantined".into(),
                    message: format!(
                        "{}: {} (event {:?} from {:?}, subject {:?})",
                        q.reason, q.message, e.id, e.source, e.subject
                    ),
                });
            }
            if page.next_cursor.is_some() {
                history.notes.push(format!(
                    "The {RECENT} most recent quarantined events are shown; \
                     all: tally quarantine list --meter {name} --all"
                ));
            }
        }
        Err(e) => history
            .notes
            .push(format!("Quarantined events could not be read: {e}")),
    }
}

/// The dead letters of billing sink `name`, the most recent first.
async fn dead_letters(client: &TallyClient, name: &str, history: &mut History) {
    let answer = match client.billing_dead_letters(Some(name)).await {
        Ok(answer) => answer,
        Err(e) => {
            history
                .notes
                .push(format!("Dead letters could not be read: {e}"));
            return;
        }
    };
    let letters: Vec<&Value> = answer["sinks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["sink"].as_str() == Some(name))
        .flat_map(|s| s["deadLetters"].as_array().into_iter().flatten())
        .collect();
    let skip = letters.len().saturating_sub(RECENT);
    if skip > 0 {
        history.notes.push(format!(
            "{skip} older dead letter(s) not shown: tally billing deadletters --sink {name}"
        ));
    }
    for letter in &letters[skip..] {
        let status = letter["status"]
            .as_u64()
            .map_or_else(|| "no answer".to_owned(), |s| format!("HTTP {s}"));
        let records = letter["records"].as_array().map_or(0, Vec::len);
        history.events.push(Event {
            time: time_at(letter, "at"),
            warning: true,
            reason: "DeadLetter".into(),
            message: format!(
                "{}: {status}; {records} record(s) kept as dead letter {} \
                 (tally billing retry {name} {})",
                text(&letter["reason"]),
                text(&letter["id"]),
                text(&letter["id"]),
            ),
        });
    }
}

/// The last pass and the last error a BillingSink's status carries.
fn billing_sink_events(manifest: &Manifest) -> Vec<Event> {
    let Some(status) = &manifest.status else {
        return Vec::new();
    };
    let mut events = Vec::new();
    if let Some(at) = time_at(status, "lastPass") {
        events.push(Event {
            time: Some(at),
            warning: false,
            reason: "Forwarded".into(),
            message: "a forwarding pass ended".into(),
        });
    }
    events.extend(last_error(status, "ProviderError", None));
    events
}

/// Each sink's last success and last error from an Exporter's status.
fn exporter_events(manifest: &Manifest) -> Vec<Event> {
    let sinks = manifest
        .status
        .as_ref()
        .and_then(|s| s.get("sinks"))
        .and_then(Value::as_array);
    let mut events = Vec::new();
    for sink in sinks.into_iter().flatten() {
        let name = text(&sink["name"]);
        if let Some(at) = time_at(sink, "lastSuccessTime") {
            events.push(Event {
                time: Some(at),
                warning: false,
                reason: "Exported".into(),
                message: format!("sink {name}: the endpoint acknowledged an export"),
            });
        }
        events.extend(last_error(sink, "ExportFailed", Some(&name)));
    }
    events
}

/// `lastError` of a status: a text (its time in `lastErrorTime`, when
/// given) or an object with a message (`message` or `reason`), a status
/// code (`status` or `code`) and a time (`at`, `since`, `time`).
fn last_error(status: &Value, reason: &str, sink: Option<&str>) -> Option<Event> {
    let error = status.get("lastError")?;
    let (message, time) = match error {
        Value::Null => return None,
        Value::String(text) => (text.clone(), time_at(status, "lastErrorTime")),
        Value::Object(_) => {
            let text = ["message", "reason"]
                .iter()
                .find_map(|k| error[*k].as_str())
                .unwrap_or_default();
            let code = ["status", "code"].iter().find_map(|k| error[*k].as_u64());
            let message = match code {
                Some(code) => format!("HTTP {code}: {text}"),
                None => text.to_owned(),
            };
            let time = ["at", "since", "time"]
                .iter()
                .find_map(|k| time_at(error, k));
            (message, time)
        }
        other => (other.to_string(), None),
    };
    let message = match sink {
        Some(sink) => format!("sink {sink}: {message}"),
        None => message,
    };
    Some(Event {
        time,
        warning: true,
        reason: reason.into(),
        message,
    })
}

fn time_at(value: &Value, key: &str) -> Option<Timestamp> {
    value.get(key)?.as_str()?.parse().ok()
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => NONE.to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A time as RFC 3339 with its age: `2026-01-01T00:00:00Z (5d ago)`.
fn time_and_age(t: Timestamp, now: Timestamp) -> String {
    format!("{t} ({} ago)", age(t, now))
}

/// The whole description.
pub fn render(manifest: &Manifest, history: &History, now: Timestamp) -> anyhow::Result<String> {
    let mut out = metadata(manifest, now);
    section(&mut out, "Spec", &manifest.spec)?;
    for (key, value) in &manifest.extra {
        section(&mut out, &title_case(key), value)?;
    }
    let mut status = manifest.status.clone().unwrap_or(Value::Null);
    let conditions = match &mut status {
        Value::Object(fields) => fields.remove("conditions"),
        _ => None,
    };
    if status.as_object().is_some_and(|s| !s.is_empty()) {
        section(&mut out, "Status", &status)?;
    }
    out.push_str("Conditions:");
    match conditions.as_ref().and_then(Value::as_array) {
        Some(list) if !list.is_empty() => {
            out.push('\n');
            out.push_str(&indent(&conditions_table(list, now).render(false)));
        }
        _ => out.push_str("  <none>\n"),
    }
    out.push_str("Events:");
    if history.events.is_empty() {
        out.push_str("  <none>\n");
    } else {
        out.push('\n');
        out.push_str(&indent(&events_table(&history.events, now).render(false)));
    }
    for note in &history.notes {
        let _ = writeln!(out, "  {note}");
    }
    Ok(out)
}

/// Name, namespace, kind, labels, annotations, uid, generation, creation.
fn metadata(manifest: &Manifest, now: Timestamp) -> String {
    let meta = &manifest.metadata;
    let mut out = String::new();
    let mut line = |key: &str, value: &str| {
        let key = if key.is_empty() {
            String::new()
        } else {
            format!("{key}:")
        };
        let _ = writeln!(out, "{key:<13}{value}");
    };
    line("Name", &meta.name);
    if let Some(namespace) = &meta.namespace {
        line("Namespace", namespace);
    }
    line("Kind", &manifest.kind);
    line("API Version", &manifest.api_version);
    for (key, map) in [("Labels", &meta.labels), ("Annotations", &meta.annotations)] {
        let pairs: Vec<String> = map.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if pairs.is_empty() {
            line(key, NONE);
        }
        for (index, pair) in pairs.iter().enumerate() {
            line(if index == 0 { key } else { "" }, pair);
        }
    }
    line("UID", meta.uid.as_deref().unwrap_or(NONE));
    let generation = meta.generation.map(|g| g.to_string());
    line("Generation", generation.as_deref().unwrap_or(NONE));
    let created = meta.creation_timestamp.map(|t| time_and_age(t, now));
    line("Created", created.as_deref().unwrap_or(NONE));
    out
}

/// `Title:` and the value: on the same line when it is a scalar, else as
/// YAML indented below.
fn section(out: &mut String, title: &str, value: &Value) -> anyhow::Result<()> {
    match value {
        Value::Null => {
            let _ = writeln!(out, "{title}:  {NONE}");
        }
        Value::Object(map) if map.is_empty() => {
            let _ = writeln!(out, "{title}:  {NONE}");
        }
        Value::Object(_) | Value::Array(_) => {
            let _ = writeln!(out, "{title}:");
            out.push_str(&indent(&output::to_yaml(value)?));
        }
        scalar => {
            let _ = writeln!(out, "{:<13}{}", format!("{title}:"), text(scalar));
        }
    }
    Ok(())
}

fn title_case(key: &str) -> String {
    let mut chars = key.chars();
    chars.next().map_or_else(String::new, |first| {
        first.to_uppercase().chain(chars).collect()
    })
}

fn indent(text: &str) -> String {
    text.lines().map(|line| format!("  {line}\n")).collect()
}

/// TYPE (with the sink or source a condition is about), STATUS, REASON,
/// MESSAGE, LAST TRANSITION (RFC 3339 and age, when the server gives it).
fn conditions_table(conditions: &[Value], now: Timestamp) -> Table {
    let mut table = Table::new(["type", "status", "reason", "message", "last transition"]);
    for c in conditions {
        let about = ["sink", "source"]
            .iter()
            .find_map(|k| c[*k].as_str().map(|v| format!(" ({k} {v})")))
            .unwrap_or_default();
        let transition = time_at(c, "lastTransitionTime").map(|t| time_and_age(t, now));
        table.row([
            Cell::from(format!("{}{about}", text(&c["type"]))),
            or_none(c["status"].as_str()),
            or_none(c["reason"].as_str()),
            or_none(c["message"].as_str()),
            Cell::from(transition),
        ]);
    }
    table
}

fn events_table(events: &[Event], now: Timestamp) -> Table {
    let mut table = Table::new(["time", "age", "type", "reason", "message"]);
    for e in events {
        table.row([
            output::time_cell(e.time),
            Cell::from(e.time.map(|t| age(t, now))),
            Cell::from(if e.warning { "Warning" } else { "Normal" }),
            Cell::from(&e.reason),
            Cell::from(&e.message),
        ]);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Manifest {
        Manifest::parse_documents(text).unwrap().remove(0)
    }

    const NOW: &str = "2026-01-02T00:00:00Z";

    #[test]
    fn describes_metadata_spec_status_conditions_and_events() {
        let manifest = parse(
            "apiVersion: telemetry.miloapis.com/v1alpha1\nkind: Exporter\n\
             metadata: {name: grafana, namespace: web, labels: {a: b, c: d}, \
             creationTimestamp: '2026-01-01T00:00:00Z', generation: 2}\n\
             spec: {sinks: [{name: otlp, target: {url: 'http://x'}}]}\n\
             status:\n  conditions:\n\
             \x20 - {type: Ready, status: 'False', reason: ExportFailing, message: 'sink otlp: 503', \
             lastTransitionTime: '2026-01-01T23:00:00Z'}\n\
             \x20 - {type: SinkHealthy, sink: otlp, status: 'False', reason: ExportFailing, message: '503'}\n\
             \x20 sinks: [{name: otlp, pointsReceived: 5, lastSuccessTime: '2026-01-01T22:00:00Z', \
             lastError: 'HTTP 503', lastErrorTime: '2026-01-01T23:59:00Z'}]\n",
        );
        let now: Timestamp = NOW.parse().unwrap();
        let history = History {
            events: exporter_events(&manifest),
            notes: vec!["a note".into()],
        };
        let text = render(&manifest, &history, now).unwrap();
        let expected = "\
Name:        grafana
Namespace:   web
Kind:        Exporter
API Version: telemetry.miloapis.com/v1alpha1
Labels:      a=b
             c=d
Annotations: <none>
UID:         <none>
Generation:  2
Created:     2026-01-01T00:00:00Z (24h ago)
Spec:
  sinks:
  - name: otlp
    target:
      url: http://x
Status:
  sinks:
  - lastError: HTTP 503
    lastErrorTime: 2026-01-01T23:59:00Z
    lastSuccessTime: 2026-01-01T22:00:00Z
    name: otlp
    pointsReceived: 5
Conditions:
  TYPE                      STATUS   REASON          MESSAGE          LAST TRANSITION
  Ready                     False    ExportFailing   sink otlp: 503   2026-01-01T23:00:00Z (60m ago)
  SinkHealthy (sink otlp)   False    ExportFailing   503              <none>
Events:
  TIME                   AGE   TYPE      REASON         MESSAGE
  2026-01-01T22:00:00Z   2h    Normal    Exported       sink otlp: the endpoint acknowledged an export
  2026-01-01T23:59:00Z   60s   Warning   ExportFailed   sink otlp: HTTP 503
  a note
";
        assert_eq!(text, expected, "\n{text}");
    }

    #[test]
    fn kinds_without_history_say_so_and_nothing_is_invented() {
        let manifest = parse("apiVersion: v1\nkind: Namespace\nmetadata: {name: web}\n");
        let history = History {
            events: vec![],
            notes: vec!["The server keeps no event history for namespaces.".into()],
        };
        let text = render(&manifest, &history, NOW.parse().unwrap()).unwrap();
        assert!(text.contains("Spec:  <none>\n"), "{text}");
        assert!(text.contains("Conditions:  <none>\n"), "{text}");
        assert!(
            text.ends_with(
                "Events:  <none>\n  The server keeps no event history for namespaces.\n"
            ),
            "{text}"
        );
        assert!(!text.contains("Status:"), "{text}");
    }

    #[test]
    fn billing_sinks_show_their_last_pass_and_last_error_in_either_shape() {
        let sink = parse(
            "apiVersion: billing.miloapis.com/v1alpha1\nkind: BillingSink\nmetadata: {name: amberflo}\n\
             spec: {}\nstatus: {lastPass: '2026-01-01T10:00:00Z', \
             lastError: {status: 401, reason: the provider refused the API key, since: '2026-01-01T09:00:00Z'}}\n",
        );
        let events = billing_sink_events(&sink);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].reason, "Forwarded");
        assert_eq!(
            events[1].message,
            "HTTP 401: the provider refused the API key"
        );
        assert_eq!(
            events[1].time,
            Some("2026-01-01T09:00:00Z".parse().unwrap())
        );
        let plain = serde_json::json!({"lastError": "connection refused"});
        let event = last_error(&plain, "ProviderError", None).unwrap();
        assert_eq!(
            (event.message.as_str(), event.time),
            ("connection refused", None)
        );
        assert!(last_error(&serde_json::json!({"lastError": null}), "x", None).is_none());
        assert!(last_error(&serde_json::json!({}), "x", None).is_none());
    }
}
