//! `tally apply`, `tally get`, `tally delete`.

use std::io::Read as _;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde_json::Value;
use tally_client::{ApplyAction, TallyClient};
use tally_model::{Kind, Manifest};

use crate::output::{self, List, Table, or_none};
use crate::print;

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// A YAML or JSON file of manifests; several documents (`---`) and `List`s
    /// are allowed. `-` reads standard input. Repeat to apply several files in order.
    #[arg(short = 'f', long = "filename", value_name = "FILE", required = true)]
    files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// Resource kind: meterdefinitions (md, meter) or monitoredresourcetypes
    /// (mrt); singular, plural or short name, any case.
    #[arg(value_name = "KIND", value_parser = parse_kind)]
    kind: Kind,

    /// Show only this resource; all of the kind when left out.
    #[arg(value_name = "NAME")]
    name: Option<String>,

    /// Output format: a table for people, or the manifests (with status) as
    /// YAML or JSON; a `List` when no NAME is given.
    #[arg(short = 'o', long, value_enum, default_value_t = GetFormat::Table, value_name = "FORMAT")]
    output: GetFormat,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Resource kind: meterdefinitions (md, meter) or monitoredresourcetypes (mrt).
    #[arg(value_name = "KIND", value_parser = parse_kind)]
    kind: Kind,

    /// Name of the resource to delete.
    #[arg(value_name = "NAME")]
    name: String,
}

/// Output formats of `tally get`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GetFormat {
    /// Aligned columns.
    Table,
    /// Manifests as YAML.
    Yaml,
    /// Manifests as JSON.
    Json,
}

fn parse_kind(text: &str) -> Result<Kind, String> {
    text.parse()
        .map_err(|e: tally_model::ResourceError| e.to_string())
}

/// `kind/name`, as kubectl prints it.
fn reference(kind: &str, name: &str) -> String {
    format!("{}/{name}", kind.to_ascii_lowercase())
}

pub async fn apply(client: &TallyClient, args: ApplyArgs) -> anyhow::Result<()> {
    for file in &args.files {
        let (label, text) = read_input(file)?;
        let results = client
            .apply(&text)
            .await
            .with_context(|| format!("applying {label}"))?;
        let mut out = String::new();
        for result in results {
            let action = match result.action {
                ApplyAction::Created => "created",
                ApplyAction::Configured => "configured",
                ApplyAction::Unchanged => "unchanged",
            };
            out.push_str(&format!(
                "{} {action}\n",
                reference(&result.kind, &result.name)
            ));
        }
        print(&out)?;
    }
    Ok(())
}

/// The text of a file, or of standard input for `-`, with a label for messages.
fn read_input(path: &PathBuf) -> anyhow::Result<(String, String)> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading manifests from standard input")?;
        return Ok(("standard input".into(), text));
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok((path.display().to_string(), text))
}

pub async fn get(client: &TallyClient, args: GetArgs) -> anyhow::Result<()> {
    let manifests = match &args.name {
        Some(name) => vec![
            client
                .get_resource(args.kind, name)
                .await
                .with_context(|| format!("getting {}", reference(args.kind.as_str(), name)))?,
        ],
        None => client
            .list_resources(args.kind)
            .await
            .with_context(|| format!("listing {}", args.kind.plural()))?,
    };
    let text = match (args.output, &args.name) {
        (GetFormat::Table, _) => {
            if manifests.is_empty() {
                eprintln!("No {} found.", args.kind.plural());
                return Ok(());
            }
            resource_table(args.kind, &manifests).render()
        }
        (GetFormat::Yaml, Some(_)) => output::to_yaml(&manifests[0])?,
        (GetFormat::Json, Some(_)) => output::to_json(&manifests[0])?,
        (GetFormat::Yaml, None) => output::to_yaml(&List::new(&manifests))?,
        (GetFormat::Json, None) => output::to_json(&List::new(&manifests))?,
    };
    print(&text)
}

pub async fn delete(client: &TallyClient, args: DeleteArgs) -> anyhow::Result<()> {
    let reference = reference(args.kind.as_str(), &args.name);
    client
        .delete_resource(args.kind, &args.name)
        .await
        .with_context(|| format!("deleting {reference}"))?;
    print(&format!("{reference} deleted\n"))
}

/// The table `tally get` prints for a kind.
pub fn resource_table(kind: Kind, manifests: &[Manifest]) -> Table {
    match kind.as_str() {
        "MeterDefinition" => meter_definition_table(manifests),
        "MonitoredResourceType" => resource_type_table(manifests),
        _ => generic_table(manifests),
    }
}

fn text_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(value, |v, key| v.get(key))?.as_str()
}

fn meter_definition_table(manifests: &[Manifest]) -> Table {
    let mut table = Table::new([
        "NAME",
        "METER NAME",
        "PHASE",
        "AGGREGATION",
        "UNIT",
        "EVENT TYPE",
        "READY",
    ]);
    for m in manifests {
        let spec = &m.spec;
        let meter_name = text_at(spec, &["meterName"]);
        let aggregation = text_at(spec, &["measurement", "aggregation"]).map(|a| {
            a.parse::<tally_model::Aggregation>()
                .map_or_else(|_| a.to_owned(), |a| a.to_string())
        });
        table.row([
            m.metadata.name.clone(),
            or_none(meter_name),
            text_at(spec, &["phase"]).unwrap_or("Draft").to_owned(),
            or_none(aggregation.as_deref()),
            or_none(text_at(spec, &["measurement", "unit"])),
            // The event type defaults to the meter name.
            or_none(text_at(spec, &["event", "type"]).or(meter_name)),
            or_none(ready(m)),
        ]);
    }
    table
}

fn resource_type_table(manifests: &[Manifest]) -> Table {
    let mut table = Table::new(["NAME", "RESOURCE TYPE", "LABELS"]);
    for m in manifests {
        let labels: Vec<&str> = m
            .spec
            .get("labels")
            .and_then(Value::as_array)
            .map(|labels| {
                labels
                    .iter()
                    .filter_map(|l| text_at(l, &["name"]))
                    .collect()
            })
            .unwrap_or_default();
        table.row([
            m.metadata.name.clone(),
            or_none(text_at(&m.spec, &["resourceTypeName"])),
            if labels.is_empty() {
                output::NONE.to_owned()
            } else {
                labels.join(",")
            },
        ]);
    }
    table
}

fn generic_table(manifests: &[Manifest]) -> Table {
    let mut table = Table::new(["NAME", "KIND", "CREATED"]);
    for m in manifests {
        let created = m.metadata.creation_timestamp.map(|t| t.to_string());
        table.row([
            m.metadata.name.clone(),
            m.kind.clone(),
            or_none(created.as_deref()),
        ]);
    }
    table
}

/// `status.conditions[type=Ready].status`, when the server reported it.
fn ready(manifest: &Manifest) -> Option<&str> {
    manifest
        .status
        .as_ref()?
        .get("conditions")?
        .as_array()?
        .iter()
        .find(|c| text_at(c, &["type"]) == Some("Ready"))
        .and_then(|c| text_at(c, &["status"]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESOURCES: &str = "
apiVersion: billing.miloapis.com/v1alpha1
kind: MeterDefinition
metadata: {name: requests, creationTimestamp: '2026-01-01T00:00:00Z'}
spec:
  meterName: gw/requests
  phase: Published
  measurement: {aggregation: Sum, unit: '{request}'}
status:
  conditions: [{type: Synced, status: 'False'}, {type: Ready, status: 'True'}]
---
apiVersion: billing.miloapis.com/v1alpha1
kind: MeterDefinition
metadata: {name: tokens}
spec:
  meterName: llm/tokens
  measurement: {aggregation: unique_count}
  event: {type: prompt}
---
apiVersion: billing.miloapis.com/v1alpha1
kind: MonitoredResourceType
metadata: {name: httproute}
spec:
  resourceTypeName: networking.datumapis.com/HTTPRoute
  labels: [{name: name, required: true}, {name: namespace}]
";

    fn manifests() -> Vec<Manifest> {
        Manifest::parse_documents(RESOURCES).unwrap()
    }

    #[test]
    fn meter_definitions_show_phase_unit_event_type_and_readiness() {
        let table = resource_table(Kind::MeterDefinition, &manifests()[..2]).render();
        assert_eq!(
            table,
            "NAME       METER NAME    PHASE       AGGREGATION    UNIT        EVENT TYPE    READY\n\
             requests   gw/requests   Published   SUM            {request}   gw/requests   True\n\
             tokens     llm/tokens    Draft       UNIQUE_COUNT   <none>      prompt        <none>\n"
        );
    }

    #[test]
    fn resource_types_list_their_labels() {
        let table = resource_table(Kind::MonitoredResourceType, &manifests()[2..]).render();
        assert_eq!(
            table,
            "NAME        RESOURCE TYPE                        LABELS\n\
             httproute   networking.datumapis.com/HTTPRoute   name,namespace\n"
        );
    }

    #[test]
    fn other_kinds_get_name_kind_and_creation_time() {
        let table = generic_table(&manifests()[..2]).render();
        assert_eq!(
            table,
            "NAME       KIND              CREATED\n\
             requests   MeterDefinition   2026-01-01T00:00:00Z\n\
             tokens     MeterDefinition   <none>\n"
        );
    }

    #[test]
    fn kinds_accept_every_spelling() {
        for text in ["md", "meters", "MeterDefinition", "meterdefinitions"] {
            assert_eq!(parse_kind(text).unwrap(), Kind::MeterDefinition);
        }
        assert!(parse_kind("pods").unwrap_err().contains("known kinds"));
        assert_eq!(
            reference("MeterDefinition", "requests"),
            "meterdefinition/requests"
        );
    }
}
