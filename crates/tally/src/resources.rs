//! `tally apply`, `tally get`, `tally delete`.

use std::io::Read as _;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde_json::Value;
use tally_client::{ApplyAction, TallyClient};
use tally_model::{Kind, Manifest};

use crate::output::{self, Cell, Column, Format, List, Table, or_none};
use crate::print;

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// A YAML or JSON file of manifests; several documents (`---`) and `List`s
    /// are allowed. `-` reads standard input. Repeat to apply several files in order.
    #[arg(short = 'f', long = "filename", value_name = "FILE", required = true)]
    files: Vec<PathBuf>,
}

/// The kinds, as `--help` lists them.
pub const KINDS_HELP: &str = "The kind, or KIND/NAME as `-o name` prints it. Kinds: meterdefinitions (md), monitoredresourcetypes (mrt), billingaccounts (ba), \
billingaccountbindings (bab), billingsinks, exporters, telemetrypolicies, secrets, namespaces (ns), \
gatewayclasses, gateways, httproutes, workloads, instances; singular, plural or short name, any case";

/// A kind, or `kind/name` as `-o name` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindRef {
    pub kind: Kind,
    pub name: Option<String>,
}

/// Reads KIND or KIND/NAME; completion offers every kind's plural.
#[derive(Debug, Clone, Copy)]
pub struct KindRefParser;

impl clap::builder::TypedValueParser for KindRefParser {
    type Value = KindRef;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<KindRef, clap::Error> {
        let text = value.to_str().ok_or_else(|| {
            clap::Error::raw(clap::error::ErrorKind::InvalidUtf8, "KIND is not UTF-8\n")
                .with_cmd(cmd)
        })?;
        parse_kind_ref(text).map_err(|message| {
            let name = arg.map_or("KIND".into(), ToString::to_string);
            clap::Error::raw(
                clap::error::ErrorKind::InvalidValue,
                format!("invalid value {text:?} for {name}: {message}\n"),
            )
            .with_cmd(cmd)
        })
    }

    fn possible_values(
        &self,
    ) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        Some(Box::new(Kind::ALL.into_iter().map(|k| {
            clap::builder::PossibleValue::new(k.plural()).hide(true)
        })))
    }
}

fn parse_kind_ref(text: &str) -> Result<KindRef, String> {
    let (kind, name) = match text.split_once('/') {
        Some((_, "")) => return Err("expected KIND/NAME, the name is empty".into()),
        Some((kind, name)) => (kind, Some(name.to_owned())),
        None => (text, None),
    };
    Ok(KindRef {
        kind: parse_kind(kind)?,
        name,
    })
}

/// The resource a command names: `KIND NAME` or `KIND/NAME`.
pub fn one_name(target: &KindRef, name: Option<&str>) -> anyhow::Result<Option<String>> {
    match (&target.name, name) {
        (Some(_), Some(_)) => anyhow::bail!(
            "give the name once: either {}/NAME or {} NAME",
            target.kind.plural(),
            target.kind.plural()
        ),
        (Some(n), None) => Ok(Some(n.clone())),
        (None, n) => Ok(n.map(str::to_owned)),
    }
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// Resource kind, or KIND/NAME.
    #[arg(value_name = "KIND", value_parser = KindRefParser, long_help = KINDS_HELP, hide_possible_values = true)]
    kind: KindRef,

    /// Show only this resource; all of the kind when left out.
    #[arg(value_name = "NAME")]
    name: Option<String>,

    /// Namespace of a namespaced kind (exporters, telemetrypolicies, secrets,
    /// gateways, httproutes, workloads, instances). Required with NAME; when
    /// listing, all namespaces the token may see are shown without it.
    #[arg(short = 'n', long, value_name = "NAMESPACE")]
    namespace: Option<String>,

    /// Output format. YAML and JSON are the manifests with status (a `List`
    /// when no NAME is given) and apply again as they are; `name` prints
    /// `kind/name`.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table, value_name = "FORMAT")]
    output: Format,

    /// Watch: after the current state, print each change (ADDED, MODIFIED,
    /// DELETED) as it happens, until Ctrl-C or the server goes away.
    #[arg(short = 'w', long)]
    watch: bool,

    /// How often --watch asks the server (the resource API has no change
    /// feed): 100ms to 1h, e.g. 500ms, 2s, 1m.
    #[arg(long, default_value = "2s", value_name = "DURATION", value_parser = crate::watch::parse_interval, requires = "watch")]
    interval: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Resource kind, or KIND/NAME.
    #[arg(value_name = "KIND", value_parser = KindRefParser, long_help = KINDS_HELP, hide_possible_values = true)]
    kind: KindRef,

    /// Name of the resource to delete (unless given as KIND/NAME).
    #[arg(value_name = "NAME")]
    name: Option<String>,

    /// Namespace of a namespaced kind (required for those).
    #[arg(short = 'n', long, value_name = "NAMESPACE")]
    namespace: Option<String>,
}

/// The namespace a single-resource command needs, checked against the kind.
pub fn namespace_for(kind: Kind, namespace: Option<&str>) -> anyhow::Result<Option<&str>> {
    match (kind.namespaced(), namespace) {
        (true, None) => anyhow::bail!(
            "{} are namespaced: name one with -n NAMESPACE",
            kind.plural()
        ),
        (false, Some(_)) => anyhow::bail!("{} are cluster-scoped: leave out -n", kind.plural()),
        (_, namespace) => Ok(namespace),
    }
}

fn parse_kind(text: &str) -> Result<Kind, String> {
    text.parse()
        .map_err(|e: tally_model::ResourceError| e.to_string())
}

/// `kind/name`, as kubectl prints it, with the namespace when there is one.
pub fn reference(kind: &str, namespace: Option<&str>, name: &str) -> String {
    let kind = kind.to_ascii_lowercase();
    match namespace {
        Some(ns) => format!("{kind}/{name} -n {ns}"),
        None => format!("{kind}/{name}"),
    }
}

/// `kind/name` of a manifest, as `-o name` prints it.
pub fn name_of(manifest: &Manifest) -> String {
    format!(
        "{}/{}",
        manifest.kind.to_ascii_lowercase(),
        manifest.metadata.name
    )
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
    let kind = args.kind.kind;
    let name = one_name(&args.kind, args.name.as_deref())?;
    if args.watch {
        let target = crate::watch::Target {
            kind,
            namespace: args.namespace,
            name,
        };
        return crate::watch::run(client, target, args.output, args.interval).await;
    }
    let Some(name) = name else {
        let manifests = client
            .list_resources(kind, args.namespace.as_deref())
            .await
            .with_context(|| format!("listing {}", kind.plural()))?;
        let empty = format!("No {} found.", kind.plural());
        return output::print_listing(args.output, &List::new(&manifests), &empty, || {
            resource_table(kind, &manifests)
        });
    };
    let namespace = namespace_for(kind, args.namespace.as_deref())?;
    let manifest = client
        .get_resource(kind, namespace, &name)
        .await
        .with_context(|| format!("getting {}", reference(kind.as_str(), namespace, &name)))?;
    let manifests = std::slice::from_ref(&manifest);
    output::print_listing(args.output, &manifest, "", || {
        resource_table(kind, manifests)
    })
}

pub async fn delete(client: &TallyClient, args: DeleteArgs) -> anyhow::Result<()> {
    let kind = args.kind.kind;
    let Some(name) = one_name(&args.kind, args.name.as_deref())? else {
        anyhow::bail!("name the resource to delete: KIND NAME or KIND/NAME");
    };
    let namespace = namespace_for(kind, args.namespace.as_deref())?;
    let reference = reference(kind.as_str(), namespace, &name);
    client
        .delete_resource(kind, namespace, &name)
        .await
        .with_context(|| format!("deleting {reference}"))?;
    print(&format!("{reference} deleted\n"))
}

/// The table `tally get` prints for a kind: the kind's own columns, then
/// for `-o wide` the Ready condition's reason, the creation time and the
/// labels. Rows are named `kind/name`.
pub fn resource_table(kind: Kind, manifests: &[Manifest]) -> Table {
    let (columns, cells) = kind_columns(kind);
    let namespaced = manifests.iter().any(|m| m.metadata.namespace.is_some());
    let has_created = columns.iter().any(|c| c.csv_name() == "created");
    let mut all = Vec::with_capacity(columns.len() + 4);
    if namespaced {
        all.push(Column::new("NAMESPACE"));
    }
    all.extend(columns);
    all.push(Column::new("REASON").wide());
    if !has_created {
        all.push(Column::new("CREATED").wide());
    }
    all.push(Column::new("LABELS").wide());
    let mut table = Table::with_columns(all).named();
    for m in manifests {
        let value = serde_json::to_value(m).unwrap_or(Value::Null);
        let mut row = Vec::new();
        if namespaced {
            row.push(or_none(m.metadata.namespace.as_deref()));
        }
        row.extend(cells(m, &value));
        row.push(or_none(condition(m, "Ready", "reason")));
        if !has_created {
            row.push(output::time_cell(m.metadata.creation_timestamp));
        }
        row.push(labels(m));
        table.named_row(name_of(m), row);
    }
    table
}

/// A kind's own columns, and the cells of one row of them.
fn kind_columns(kind: Kind) -> (Vec<Column>, RowCells) {
    match kind {
        Kind::MeterDefinition => (meter_definition_columns(), meter_definition_row),
        Kind::MonitoredResourceType => (
            ["NAME", "RESOURCE TYPE", "LABELS"].map(Column::new).into(),
            resource_type_row,
        ),
        Kind::BillingAccount => (["NAME", "UID", "PHASE"].map(Column::new).into(), |m, v| {
            fields(m, v, &[&["metadata", "uid"], &["status", "phase"]])
        }),
        Kind::BillingAccountBinding => (
            ["NAME", "PROJECT", "ACCOUNT", "EFFECTIVE FROM", "PHASE"]
                .map(Column::new)
                .into(),
            |m, v| {
                fields(
                    m,
                    v,
                    &[
                        &["spec", "projectRef", "name"],
                        &["spec", "billingAccountRef", "name"],
                        &["status", "effectiveFrom"],
                        &["status", "phase"],
                    ],
                )
            },
        ),
        Kind::Namespace => (["NAME", "PROJECT"].map(Column::new).into(), |m, v| {
            fields(m, v, &[&["metadata", "labels", PROJECT_LABEL]])
        }),
        Kind::BillingSink => (
            ["NAME", "PROVIDER", "WINDOW", "READY", "LAST PASS"]
                .map(Column::new)
                .into(),
            |m, v| {
                let mut row = fields(m, v, &[&["spec", "provider"], &["spec", "windowSize"]]);
                row.push(or_none(condition(m, "Ready", "status")));
                row.push(or_none(text_at(v, &["status", "lastPass"])));
                row
            },
        ),
        Kind::Exporter => (
            ["NAME", "SINKS", "READY", "CREATED"]
                .map(Column::new)
                .into(),
            |m, _| {
                let sinks = m.spec.get("sinks").and_then(Value::as_array);
                vec![
                    Cell::from(&m.metadata.name),
                    Cell::from(sinks.map(|s| s.len().to_string())),
                    or_none(condition(m, "Ready", "status")),
                    output::time_cell(m.metadata.creation_timestamp),
                ]
            },
        ),
        _ => (
            ["NAME", "KIND", "READY", "CREATED"].map(Column::new).into(),
            generic_row,
        ),
    }
}

/// The cells of one row of a kind's own columns.
type RowCells = fn(&Manifest, &Value) -> Vec<Cell>;

/// The label naming a namespace's project.
const PROJECT_LABEL: &str = "resourcemanager.miloapis.com/project-name";

/// NAME, then the fields at `paths`.
fn fields(m: &Manifest, value: &Value, paths: &[&[&str]]) -> Vec<Cell> {
    std::iter::once(Cell::from(&m.metadata.name))
        .chain(paths.iter().map(|path| or_none(text_at(value, path))))
        .collect()
}

fn labels(m: &Manifest) -> Cell {
    let labels: Vec<String> = m
        .metadata
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    or_none(Some(&labels.join(",")))
}

fn text_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(value, |v, key| v.get(key))?.as_str()
}

fn meter_definition_columns() -> Vec<Column> {
    [
        "NAME",
        "METER NAME",
        "PHASE",
        "AGGREGATION",
        "UNIT",
        "EVENT TYPE",
        "READY",
    ]
    .map(Column::new)
    .into()
}

fn meter_definition_row(m: &Manifest, _: &Value) -> Vec<Cell> {
    let spec = &m.spec;
    let meter_name = text_at(spec, &["meterName"]);
    let aggregation = text_at(spec, &["measurement", "aggregation"]).map(|a| {
        a.parse::<tally_model::Aggregation>()
            .map_or_else(|_| a.to_owned(), |a| a.to_string())
    });
    vec![
        Cell::from(&m.metadata.name),
        or_none(meter_name),
        text_at(spec, &["phase"]).unwrap_or("Draft").into(),
        or_none(aggregation.as_deref()),
        or_none(text_at(spec, &["measurement", "unit"])),
        // The event type defaults to the meter name.
        or_none(text_at(spec, &["event", "type"]).or(meter_name)),
        or_none(condition(m, "Ready", "status")),
    ]
}

fn resource_type_row(m: &Manifest, _: &Value) -> Vec<Cell> {
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
    vec![
        Cell::from(&m.metadata.name),
        or_none(text_at(&m.spec, &["resourceTypeName"])),
        or_none(Some(&labels.join(","))),
    ]
}

/// Name, kind, readiness (when the server reports it) and creation time.
fn generic_row(m: &Manifest, _: &Value) -> Vec<Cell> {
    vec![
        Cell::from(&m.metadata.name),
        Cell::from(&m.kind),
        or_none(condition(m, "Ready", "status")),
        output::time_cell(m.metadata.creation_timestamp),
    ]
}

/// A field of `status.conditions[type=kind]`, when the server reported it.
pub fn condition<'a>(manifest: &'a Manifest, kind: &str, field: &str) -> Option<&'a str> {
    manifest
        .status
        .as_ref()?
        .get("conditions")?
        .as_array()?
        .iter()
        .find(|c| text_at(c, &["type"]) == Some(kind))
        .and_then(|c| text_at(c, &[field]))
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
        let table = resource_table(Kind::MeterDefinition, &manifests()[..2]).render(false);
        assert_eq!(
            table,
            "NAME       METER NAME    PHASE       AGGREGATION    UNIT        EVENT TYPE    READY\n\
             requests   gw/requests   Published   SUM            {request}   gw/requests   True\n\
             tokens     llm/tokens    Draft       UNIQUE_COUNT   <none>      prompt        <none>\n"
        );
    }

    #[test]
    fn resource_types_list_their_labels() {
        let table = resource_table(Kind::MonitoredResourceType, &manifests()[2..]).render(false);
        assert_eq!(
            table,
            "NAME        RESOURCE TYPE                        LABELS\n\
             httproute   networking.datumapis.com/HTTPRoute   name,namespace\n"
        );
    }

    #[test]
    fn other_kinds_get_name_kind_and_creation_time() {
        let table = resource_table(Kind::Gateway, &manifests()[..2]).render(false);
        assert_eq!(
            table,
            "NAME       KIND              READY    CREATED\n\
             requests   MeterDefinition   True     2026-01-01T00:00:00Z\n\
             tokens     MeterDefinition   <none>   <none>\n"
        );
    }

    #[test]
    fn wide_adds_reason_creation_and_labels_and_rows_have_names() {
        let mut manifests = manifests();
        manifests[1]
            .metadata
            .labels
            .insert("team".into(), "edge".into());
        manifests[1].metadata.namespace = Some("web".into());
        let table = resource_table(Kind::MeterDefinition, &manifests[..2]);
        let wide = table.render(true);
        let lines: Vec<&str> = wide.lines().collect();
        assert!(
            lines[0].starts_with("NAMESPACE   NAME       METER NAME"),
            "{wide}"
        );
        assert!(
            lines[0].ends_with("READY    REASON   CREATED                LABELS"),
            "{wide}"
        );
        assert!(
            lines[1].ends_with("True     <none>   2026-01-01T00:00:00Z   <none>"),
            "{wide}"
        );
        assert!(lines[2].starts_with("web         tokens"), "{wide}");
        assert!(
            lines[2].ends_with("<none>   <none>   <none>                 team=edge"),
            "{wide}"
        );
        assert_eq!(
            table.names().unwrap(),
            "meterdefinition/requests\nmeterdefinition/tokens\n"
        );
        let csv = table.csv().unwrap();
        assert!(
            csv.starts_with("namespace,name,meterName,phase,aggregation,unit,eventType,ready,reason,created,labels\n"),
            "{csv}"
        );
        assert!(csv.contains("\n,requests,gw/requests,Published,SUM,{request},gw/requests,True,,2026-01-01T00:00:00Z,\n"), "{csv}");
    }

    #[test]
    fn billing_sinks_and_exporters_have_their_own_columns() {
        let manifests = Manifest::parse_documents(
            "apiVersion: billing.miloapis.com/v1alpha1\nkind: BillingSink\nmetadata: {name: am}\n\
             spec: {provider: amberflo, windowSize: 1h}\n\
             status: {lastPass: '2026-01-01T00:00:00Z', conditions: [{type: Ready, status: 'True'}]}\n\
             ---\napiVersion: telemetry.datumapis.com/v1alpha1\nkind: Exporter\n\
             metadata: {name: g, namespace: web}\nspec: {sinks: [{name: a}, {name: b}]}\n",
        )
        .unwrap();
        assert_eq!(
            resource_table(Kind::BillingSink, &manifests[..1]).render(false),
            "NAME   PROVIDER   WINDOW   READY   LAST PASS\n\
             am     amberflo   1h       True    2026-01-01T00:00:00Z\n"
        );
        assert_eq!(
            resource_table(Kind::Exporter, &manifests[1..]).render(false),
            "NAMESPACE   NAME   SINKS   READY    CREATED\n\
             web         g      2       <none>   <none>\n"
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
        let with_name = parse_kind_ref("md/requests").unwrap();
        assert_eq!(with_name.kind, Kind::MeterDefinition);
        assert_eq!(with_name.name.as_deref(), Some("requests"));
        assert_eq!(parse_kind_ref("ns").unwrap().name, None);
        assert!(parse_kind_ref("md/").is_err());
        assert!(
            parse_kind_ref("pods/x")
                .unwrap_err()
                .contains("known kinds")
        );
        assert_eq!(
            one_name(&with_name, None).unwrap().as_deref(),
            Some("requests")
        );
        assert!(one_name(&with_name, Some("other")).is_err());
    }
}
