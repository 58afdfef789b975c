//! `tally get KIND [NAME] -w`: the current state, then each change.
//!
//! The resource API has no change feed, so the watch asks again every
//! `--interval` (100 ms to 1 h) and compares what it gets with what it saw:
//! a resource that appears is ADDED, one that differs in any field (spec,
//! metadata or status) MODIFIED, one that is gone DELETED. A change that is
//! undone between two polls is not seen.
//!
//! Every format says which change a row is: the table and CSV put it in a
//! first `EVENT` column (the table's header is printed once), JSON prints
//! one `{"type": ..., "object": ...}` per line, YAML the same as documents
//! separated by `---`, and `name` prints `TYPE kind/name`.
//!
//! It ends without an error on Ctrl-C or when standard output is closed,
//! and with one when the server cannot be reached or takes longer than
//! [`POLL_TIMEOUT`] to answer.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use tally_client::{ClientError, TallyClient};
use tally_model::{Kind, Manifest};

use crate::output::{self, Column, Format, Table};
use crate::resources::{self, name_of, namespace_for, reference};

/// The shortest and longest `--interval`.
const INTERVAL_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(3600));

/// How long one poll may take before the watch gives up on the server.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads `--interval`: `500ms`, `2s`, `1m` (jiff's friendly durations).
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let span: jiff::SignedDuration = text
        .parse()
        .map_err(|e| format!("expected a duration such as 500ms, 2s or 1m: {e}"))?;
    let interval = Duration::try_from(span).map_err(|_| "the interval must be positive")?;
    let (min, max) = INTERVAL_RANGE;
    if interval < min || interval > max {
        return Err(format!("the interval must be between {min:?} and {max:?}"));
    }
    Ok(interval)
}

/// What is watched: all of a kind (in one namespace, or all visible), or one resource.
#[derive(Debug, Clone)]
pub struct Target {
    pub kind: Kind,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

/// The Kubernetes watch event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Change {
    Added,
    Modified,
    Deleted,
}

impl Change {
    fn as_str(self) -> &'static str {
        match self {
            Change::Added => "ADDED",
            Change::Modified => "MODIFIED",
            Change::Deleted => "DELETED",
        }
    }
}

/// Resources by (namespace, name).
type Snapshot = BTreeMap<(Option<String>, String), Manifest>;

/// The changes from `before` to `after`, in (namespace, name) order.
pub fn diff(before: &Snapshot, after: &Snapshot) -> Vec<(Change, Manifest)> {
    let mut changes: Vec<(Change, Manifest)> = Vec::new();
    for (key, manifest) in after {
        match before.get(key) {
            None => changes.push((Change::Added, manifest.clone())),
            Some(old) if old != manifest => changes.push((Change::Modified, manifest.clone())),
            Some(_) => {}
        }
    }
    for (key, manifest) in before {
        if !after.contains_key(key) {
            changes.push((Change::Deleted, manifest.clone()));
        }
    }
    changes.sort_by(|a, b| {
        let key = |m: &Manifest| (m.metadata.namespace.clone(), m.metadata.name.clone());
        key(&a.1).cmp(&key(&b.1))
    });
    changes
}

/// Watches until Ctrl-C, a closed standard output, or an error.
pub async fn run(
    client: &TallyClient,
    target: Target,
    format: Format,
    interval: Duration,
) -> anyhow::Result<()> {
    if target.name.is_some() {
        namespace_for(target.kind, target.namespace.as_deref())?;
    }
    tokio::select! {
        result = watch(client, &target, format, interval) => result,
        signal = tokio::signal::ctrl_c() => signal.context("waiting for Ctrl-C"),
    }
}

async fn watch(
    client: &TallyClient,
    target: &Target,
    format: Format,
    interval: Duration,
) -> anyhow::Result<()> {
    let mut seen = Snapshot::new();
    let mut printer = Printer::new(target.kind, format);
    let mut first = true;
    loop {
        let now = poll(client, target, first).await?;
        let changes = diff(&seen, &now);
        if first && changes.is_empty() && matches!(format, Format::Table | Format::Wide) {
            eprintln!("No {} found; watching.", target.kind.plural());
        }
        if !printer.print(&changes)? {
            return Ok(());
        }
        seen = now;
        first = false;
        tokio::time::sleep(interval).await;
    }
}

/// The resources watched, as the server has them now. A named resource
/// that is gone is an empty snapshot, except on the first poll.
async fn poll(client: &TallyClient, target: &Target, first: bool) -> anyhow::Result<Snapshot> {
    let kind = target.kind;
    let request = async {
        match &target.name {
            Some(name) => client
                .get_resource(kind, target.namespace.as_deref(), name)
                .await
                .map(|m| vec![m]),
            None => {
                client
                    .list_resources(kind, target.namespace.as_deref())
                    .await
            }
        }
    };
    let what = match &target.name {
        Some(name) => format!(
            "getting {}",
            reference(kind.as_str(), target.namespace.as_deref(), name)
        ),
        None => format!("listing {}", kind.plural()),
    };
    let answer = match tokio::time::timeout(POLL_TIMEOUT, request).await {
        Ok(answer) => answer,
        Err(_) => bail!(
            "watch ended: the server at {} did not answer within {POLL_TIMEOUT:?}",
            client.base_url()
        ),
    };
    let manifests = match answer {
        Ok(manifests) => manifests,
        Err(ClientError::Api { status: 404, .. }) if target.name.is_some() && !first => Vec::new(),
        Err(e @ (ClientError::Connect { .. } | ClientError::Transport { .. })) if !first => {
            return Err(anyhow::Error::new(e).context(format!(
                "watch ended: the server at {} went away",
                client.base_url()
            )));
        }
        Err(e) => return Err(anyhow::Error::new(e).context(what)),
    };
    Ok(manifests
        .into_iter()
        .map(|m| ((m.metadata.namespace.clone(), m.metadata.name.clone()), m))
        .collect())
}

/// One watch event as JSON and YAML print it.
#[derive(Serialize)]
struct WatchEvent<'a> {
    #[serde(rename = "type")]
    change: Change,
    object: &'a Manifest,
}

/// Prints changes in one format; the table's and CSV's header once.
struct Printer {
    kind: Kind,
    format: Format,
    header_printed: bool,
}

impl Printer {
    fn new(kind: Kind, format: Format) -> Printer {
        Printer {
            kind,
            format,
            header_printed: false,
        }
    }

    /// Prints `changes`; false once standard output is closed.
    fn print(&mut self, changes: &[(Change, Manifest)]) -> anyhow::Result<bool> {
        if changes.is_empty() {
            return Ok(true);
        }
        let text = self.render(changes)?;
        self.header_printed = true;
        crate::print_open(&text)
    }

    fn render(&self, changes: &[(Change, Manifest)]) -> anyhow::Result<String> {
        let mut out = String::new();
        match self.format {
            Format::Json => {
                for (change, object) in changes {
                    let event = WatchEvent {
                        change: *change,
                        object,
                    };
                    out.push_str(&serde_json::to_string(&event).context("formatting JSON")?);
                    out.push('\n');
                }
            }
            Format::Yaml => {
                for (change, object) in changes {
                    let event = WatchEvent {
                        change: *change,
                        object,
                    };
                    out.push_str("---\n");
                    out.push_str(&output::to_yaml(&event)?);
                }
            }
            Format::Name => {
                for (change, manifest) in changes {
                    out.push_str(&format!("{} {}\n", change.as_str(), name_of(manifest)));
                }
            }
            Format::Table | Format::Wide | Format::Csv => {
                let manifests: Vec<Manifest> = changes.iter().map(|(_, m)| m.clone()).collect();
                let mut table = resources::resource_table(self.kind, &manifests);
                let events = changes.iter().map(|(c, _)| c.as_str().into()).collect();
                table.prepend(Column::new("EVENT"), events);
                out = self.rows(&table)?;
            }
        }
        Ok(out)
    }

    /// A table's or CSV's rows, with the header the first time only.
    fn rows(&self, table: &Table) -> anyhow::Result<String> {
        let text = match self.format {
            Format::Csv => table.csv()?,
            format => table.render(format == Format::Wide),
        };
        if !self.header_printed {
            return Ok(text);
        }
        Ok(text
            .split_once('\n')
            .map_or(String::new(), |(_, rows)| rows.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(name: &str, ready: &str) -> Manifest {
        let text = format!(
            "apiVersion: billing.miloapis.com/v1alpha1\nkind: MeterDefinition\nmetadata: {{name: {name}}}\n\
             spec: {{meterName: {name}, measurement: {{aggregation: Sum}}}}\n\
             status: {{conditions: [{{type: Ready, status: '{ready}'}}]}}\n"
        );
        Manifest::parse_documents(&text).unwrap().remove(0)
    }

    fn snapshot(manifests: &[Manifest]) -> Snapshot {
        manifests
            .iter()
            .map(|m| ((None, m.metadata.name.clone()), m.clone()))
            .collect()
    }

    #[test]
    fn diff_names_added_modified_and_deleted() {
        let before = snapshot(&[manifest("a", "True"), manifest("b", "True")]);
        let after = snapshot(&[manifest("b", "False"), manifest("c", "True")]);
        let changes: Vec<(Change, String)> = diff(&before, &after)
            .into_iter()
            .map(|(c, m)| (c, m.metadata.name))
            .collect();
        assert_eq!(
            changes,
            [
                (Change::Deleted, "a".into()),
                (Change::Modified, "b".into()),
                (Change::Added, "c".into())
            ]
        );
        assert!(diff(&after, &after).is_empty());
    }

    #[test]
    fn every_format_says_which_change_and_tables_print_one_header() {
        let changes = vec![
            (Change::Added, manifest("a", "True")),
            (Change::Deleted, manifest("bb", "False")),
        ];
        let mut printer = Printer::new(Kind::MeterDefinition, Format::Table);
        let first = printer.render(&changes).unwrap();
        assert!(first.starts_with("EVENT     NAME   METER NAME"), "{first}");
        assert!(first.contains("\nADDED     a      a "), "{first}");
        printer.header_printed = true;
        let next = printer.render(&changes[1..]).unwrap();
        assert!(next.starts_with("DELETED   bb "), "{next}");
        assert_eq!(next.lines().count(), 1);

        let json = Printer::new(Kind::MeterDefinition, Format::Json)
            .render(&changes)
            .unwrap();
        let lines: Vec<serde_json::Value> = json
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["type"], "ADDED");
        assert_eq!(lines[1]["type"], "DELETED");
        assert_eq!(lines[1]["object"]["metadata"]["name"], "bb");
        let yaml = Printer::new(Kind::MeterDefinition, Format::Yaml)
            .render(&changes)
            .unwrap();
        assert!(yaml.starts_with("---\ntype: ADDED\nobject:\n"), "{yaml}");
        let names = Printer::new(Kind::MeterDefinition, Format::Name)
            .render(&changes)
            .unwrap();
        assert_eq!(
            names,
            "ADDED meterdefinition/a\nDELETED meterdefinition/bb\n"
        );
        let csv = Printer::new(Kind::MeterDefinition, Format::Csv)
            .render(&changes)
            .unwrap();
        assert!(csv.starts_with("event,name,meterName,"), "{csv}");
        assert!(csv.contains("\nDELETED,bb,bb,"), "{csv}");
    }

    #[test]
    fn intervals_are_bounded() {
        assert_eq!(parse_interval("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_interval("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_interval("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_interval("10ms").is_err());
        assert!(parse_interval("2h").is_err());
        assert!(parse_interval("-1s").is_err());
        assert!(parse_interval("soon").is_err());
    }

    proptest::proptest! {
        /// Replaying the diff on the old state gives the new one, and a
        /// resource is named only when it was added, removed or changed.
        #[test]
        fn the_diff_replays_to_the_new_state(
            before in proptest::collection::btree_map("[a-e]", "[TF]", 0..5),
            after in proptest::collection::btree_map("[a-e]", "[TF]", 0..5),
        ) {
            let state = |m: &BTreeMap<String, String>| -> Snapshot {
                m.iter().map(|(n, r)| ((None, n.clone()), manifest(n, r))).collect()
            };
            let (old, new) = (state(&before), state(&after));
            let changes = diff(&old, &new);
            let mut replayed = old.clone();
            for (change, m) in &changes {
                let key = (None, m.metadata.name.clone());
                match change {
                    Change::Added => {
                        proptest::prop_assert!(!old.contains_key(&key));
                        replayed.insert(key, m.clone());
                    }
                    Change::Modified => {
                        proptest::prop_assert!(old[&key] != new[&key]);
                        replayed.insert(key, m.clone());
                    }
                    Change::Deleted => {
                        proptest::prop_assert!(!new.contains_key(&key));
                        replayed.remove(&key);
                    }
                }
            }
            proptest::prop_assert_eq!(&replayed, &new);
            let changed = before.iter().filter(|(k, v)| after.get(*k) != Some(v)).count()
                + after.keys().filter(|k| !before.contains_key(*k)).count();
            proptest::prop_assert_eq!(changes.len(), changed);
        }
    }
}
