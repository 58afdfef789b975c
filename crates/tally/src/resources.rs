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

/// The kinds, as `--help` lists them.
const KINDS_HELP: &str = "meterdefinitions (md), monitoredresourcetypes (mrt), billingaccounts (ba), \
billingaccountbindings (bab), billingsinks, exporters, telemetrypolicies, secrets, namespaces (ns), \
gatewayclasses, gateways, httproutes, workloads, instances; singular, plural or short name, any case";

#[derive(Debug, Args)]
pub struct GetArgs {
    /// Resource kind.
    #[arg(value_name = "KIND", value_parser = parse_kind, long_help = KINDS_HELP)]
    kind: Kind,

    /// Show only this resource; all of the kind when left out.
    #[arg(value_name = "NAME")]
    name: Option<String>,

    /// Namespace of a namespaced kind (exporters, telemetrypolicies, secrets,
    /// gateways, httproutes, workloads, instances). Required with NAME; when
    /// listing, all namespaces the token may see are shown without it.
    #[arg(short = 'n', long, value_name = "NAMESPACE")]
    namespace: Option<String>,

    /// Output format: a table for people, or the manifests (with status) as
    /// YAML or JSON; a `List` when no NAME is given.
    #[arg(short = 'o', long, value_enum, default_value_t = GetFormat::Table, value_name = "FORMAT")]
    output: GetFormat,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Resource kind.
    #[arg(value_name = "KIND", value_parser = parse_kind, long_help = KINDS_HELP)]
    kind: Kind,

    /// Name of the resource to delete.
    #[arg(value_name = "NAME")]
    name: String,

    /// Namespace of a namespaced kind (required for those).
    #[arg(short = 'n', long, value_name = "NAMESPACE")]
    namespace: Option<String>,
}

/// The namespace a single-resource command needs, checked against the kind.
fn namespace_for(kind: Kind, namespace: Option<&str>) -> anyhow::Result<Option<&str>> {
    match (kind.namespaced(), namespace) {
        (true, None) => anyhow::bail!(
            "{} are namespaced: name one with -n NAMESPACE",
            kind.plural()
        ),
        (false, Some(_)) => anyhow::bail!("{} are cluster-scoped: leave out -n", kind.plural()),
        (_, namespace) => Ok(namespace),
    }
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

/// `kind/name`, as kubectl prints it, with the namespace when there is one.
fn reference(kind: &str, namespace: Option<&str>, name: &str) -> String {
    let kind = kind.to_ascii_lowercase();
    match namespace {
        Some(ns) => format!("{kind}/{name} -n {ns}"),
        None => format!("{kind}/{name}"),
    }
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
                reference(&result.kind, result.namespace.as_deref(), &result.name)
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
        Some(name) => {
            let namespace = namespace_for(args.kind, args.namespace.as_deref())?;
            vec![
                client
                    .get_resource(args.kind, namespace, name)
                    .await
                    .with_context(|| {
                        format!("getting {}", reference(args.kind.as_str(), namespace, name))
                    })?,
            ]
        }
        None => client
            .list_resources(args.kind, args.namespace.as_deref())
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
    let namespace = namespace_for(args.kind, args.namespace.as_deref())?;
    let reference = reference(args.kind.as_str(), namespace, &args.name);
    client
        .delete_resource(args.kind, namespace, &args.name)
        .await
        .with_context(|| format!("deleting {reference}"))?;
    print(&format!("{reference} deleted\n"))
}

/// The table `tally get` prints for a kind.
pub fn resource_table(kind: Kind, manifests: &[Manifest]) -> Table {
    match kind {
        Kind::MeterDefinition => meter_definition_table(manifests),
        Kind::MonitoredResourceType => resource_type_table(manifests),
        Kind::BillingAccount => columns(
            manifests,
            &[
                ("UID", &["metadata", "uid"]),
                ("PHASE", &["status", "phase"]),
            ],
        ),
        Kind::BillingAccountBinding => columns(
            manifests,
            &[
                ("PROJECT", &["spec", "projectRef", "name"]),
                ("ACCOUNT", &["spec", "billingAccountRef", "name"]),
                ("EFFECTIVE FROM", &["status", "effectiveFrom"]),
                ("PHASE", &["status", "phase"]),
            ],
        ),
        Kind::Namespace => columns(
            manifests,
            &[(
                "PROJECT",
                &[
                    "metadata",
                    "labels",
                    "resourcemanager.miloapis.com/project-name",
                ],
            )],
        ),
        Kind::TelemetryPolicy => policy_table(manifests),
        _ => generic_table(manifests),
    }
}

/// A TelemetryPolicy per row: whether it is in force (its `Accepted`
/// reason), what it governs and why not.
fn policy_table(manifests: &[Manifest]) -> Table {
    let mut table = Table::new(vec!["NAMESPACE", "NAME", "STATUS", "GOVERNS", "MESSAGE"]);
    for m in manifests {
        let status = m.status.as_ref();
        let accepted = status
            .and_then(|s| s.get("conditions"))
            .and_then(Value::as_array)
            .and_then(|c| c.iter().find(|c| text_at(c, &["type"]) == Some("Accepted")));
        let governs: Vec<String> = status
            .and_then(|s| s.get("governs"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|t| {
                let kind = text_at(t, &["kind"])?;
                let name = text_at(t, &["name"])?;
                Some(match text_at(t, &["namespace"]) {
                    Some(ns) => format!("{kind}/{ns}/{name}"),
                    None => format!("{kind}/{name}"),
                })
            })
            .collect();
        table.row(vec![
            or_none(m.metadata.namespace.as_deref()),
            m.metadata.name.clone(),
            or_none(accepted.and_then(|c| text_at(c, &["reason"]))),
            if governs.is_empty() {
                "<none>".into()
            } else {
                governs.join(",")
            },
            or_none(accepted.and_then(|c| text_at(c, &["message"]))),
        ]);
    }
    table
}

/// NAME (and NAMESPACE when any resource has one), then the given fields.
fn columns(manifests: &[Manifest], fields: &[(&str, &[&str])]) -> Table {
    let namespaced = manifests.iter().any(|m| m.metadata.namespace.is_some());
    let mut header = vec!["NAME"];
    if namespaced {
        header.insert(0, "NAMESPACE");
    }
    header.extend(fields.iter().map(|(title, _)| *title));
    let mut table = Table::new(header);
    for m in manifests {
        let value = serde_json::to_value(m).unwrap_or(Value::Null);
        let mut row = Vec::with_capacity(fields.len() + 2);
        if namespaced {
            row.push(or_none(m.metadata.namespace.as_deref()));
        }
        row.push(m.metadata.name.clone());
        row.extend(
            fields
                .iter()
                .map(|(_, path)| or_none(text_at(&value, path))),
        );
        table.row(row);
    }
    table
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

/// Name, kind, readiness (when the server reports it) and creation time.
fn generic_table(manifests: &[Manifest]) -> Table {
    let namespaced = manifests.iter().any(|m| m.metadata.namespace.is_some());
    let mut header = vec!["NAME", "KIND", "READY", "CREATED"];
    if namespaced {
        header.insert(0, "NAMESPACE");
    }
    let mut table = Table::new(header);
    for m in manifests {
        let created = m.metadata.creation_timestamp.map(|t| t.to_string());
        let mut row = Vec::with_capacity(5);
        if namespaced {
            row.push(or_none(m.metadata.namespace.as_deref()));
        }
        row.extend([
            m.metadata.name.clone(),
            m.kind.clone(),
            or_none(ready(m)),
            or_none(created.as_deref()),
        ]);
        table.row(row);
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
            "NAME       KIND              READY    CREATED\n\
             requests   MeterDefinition   True     2026-01-01T00:00:00Z\n\
             tokens     MeterDefinition   <none>   <none>\n"
        );
    }

    #[test]
    fn kinds_accept_every_spelling() {
        for text in ["md", "meters", "MeterDefinition", "meterdefinitions"] {
            assert_eq!(parse_kind(text).unwrap(), Kind::MeterDefinition);
        }
        assert!(parse_kind("pods").unwrap_err().contains("known kinds"));
        assert_eq!(
            reference("MeterDefinition", None, "requests"),
            "meterdefinition/requests"
        );
        assert_eq!(
            reference("Exporter", Some("team"), "grafana"),
            "exporter/grafana -n team"
        );
        assert!(namespace_for(Kind::Exporter, None).is_err());
        assert!(namespace_for(Kind::BillingAccount, Some("x")).is_err());
    }
}
