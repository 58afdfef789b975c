//! Tenancy property: a project's exporter never receives another project's
//! series, whatever the exporters, namespaces, labels and (spoofed) resource
//! attributes; and what it receives equals a naive model of visibility.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use prost::Message as _;
use tally_model::Manifest;
use tally_telemetry::proto::collector::metrics::v1::ExportMetricsServiceRequest;
use tally_telemetry::proto::common::v1::any_value;
use tally_telemetry::{Exporter, InMemoryResourceIndex, Router};
use tally_testkit::otlp_metrics::*;

const NAMESPACES: usize = 6;
const PROJECTS: [&str; 3] = ["p0", "p1", "p2"];

/// What an exporter selects; all select every series they may see, so the
/// naive model is exact.
#[derive(Debug, Clone, Copy)]
enum Template {
    EmptyMetricsql,
    NoSelector,
    /// namespaceSelector matching `environment=production`.
    Production,
    /// namespaceSelector `{}`: every namespace of the project.
    AnyNamespace,
}

const TEMPLATES: [(&str, Template); 4] = [
    ("{metricsql: ''}", Template::EmptyMetricsql),
    ("{}", Template::NoSelector),
    (
        "{resourceSelectors: [{namespaceSelector: {matchLabels: {environment: production}}}]}",
        Template::Production,
    ),
    (
        "{resourceSelectors: [{namespaceSelector: {}}]}",
        Template::AnyNamespace,
    ),
];

fn exporter(namespace: &str, name: &str, metrics: &str) -> Exporter {
    let text = format!(
        "apiVersion: telemetry.datumapis.com/v1alpha1\nkind: Exporter\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  sources: [{{name: s, metrics: {metrics}}}]\n  sinks: [{{name: k, otlp_http: {{endpoint: 'http://127.0.0.1:4318'}}}}]\n"
    );
    Exporter::from_manifest(&Manifest::parse_documents(&text).unwrap()[0]).unwrap()
}

#[derive(Debug, Clone)]
struct World {
    /// Per namespace: (project index, production?); `None`: unknown to the index.
    namespaces: Vec<Option<(usize, bool)>>,
    /// (namespace index, template index).
    exporters: Vec<(usize, usize)>,
    /// (namespace index, claimed project: None or a project index).
    resources: Vec<(usize, Option<usize>)>,
}

fn world() -> impl Strategy<Value = World> {
    (
        prop::collection::vec(
            prop::option::weighted(0.85, (0..PROJECTS.len(), any::<bool>())),
            NAMESPACES,
        ),
        prop::collection::vec((0..NAMESPACES, 0..TEMPLATES.len()), 1..12),
        prop::collection::vec(
            (
                0..NAMESPACES,
                prop::option::weighted(0.3, 0..PROJECTS.len()),
            ),
            1..30,
        ),
    )
        .prop_map(|(namespaces, exporters, resources)| World {
            namespaces,
            exporters,
            resources,
        })
}

fn ns_name(i: usize) -> String {
    format!("ns-{i}")
}

fn build(world: &World) -> (InMemoryResourceIndex, Router, Vec<Template>) {
    let mut index = InMemoryResourceIndex::new();
    for (i, ns) in world.namespaces.iter().enumerate() {
        if let Some((project, production)) = ns {
            let env = if *production { "production" } else { "staging" };
            index.set_namespace(
                &ns_name(i),
                PROJECTS[*project],
                [("environment".to_owned(), env.to_owned())].into(),
            );
        }
    }
    let exporters = world
        .exporters
        .iter()
        .enumerate()
        .map(|(j, (ns, t))| exporter(&ns_name(*ns), &format!("e{j}"), TEMPLATES[*t].0));
    let templates = world
        .exporters
        .iter()
        .map(|(_, t)| TEMPLATES[*t].1)
        .collect();
    (index, Router::new(exporters), templates)
}

fn naive_visible(world: &World, exporter: usize, template: Template, resource: usize) -> bool {
    let (rns, claimed) = world.resources[resource];
    let (ens, _) = world.exporters[exporter];
    let (Some((rproject, rprod)), Some((eproject, _))) =
        (world.namespaces[rns], world.namespaces[ens])
    else {
        return false;
    };
    if claimed.is_some_and(|c| c != rproject) || rproject != eproject {
        return false;
    }
    match template {
        Template::EmptyMetricsql | Template::NoSelector => rns == ens,
        Template::Production => rns == ens || rprod,
        Template::AnyNamespace => true,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn exporters_see_exactly_their_projects_visible_series(world in world()) {
        let (index, router, templates) = build(&world);
        let resources = world
            .resources
            .iter()
            .enumerate()
            .map(|(r, (ns, claimed))| {
                let who = Who {
                    project: claimed.map(|p| PROJECTS[p]),
                    namespace: Box::leak(ns_name(*ns).into_boxed_str()),
                    group: "g",
                    kind: "Gateway",
                    name: Box::leak(format!("r{r}").into_boxed_str()),
                    service: "s",
                };
                resource_metrics(&who, vec![gauge("m", vec![number_point(vec![], 0, 1, r as i64)])])
            })
            .collect();
        let request = request(resources);
        let (routed, _) = router.route(&request, &index);
        // The encoding router selects exactly the same, byte for byte decodable.
        let (encoded, _) = router.route_encoded(&request, &index);
        prop_assert_eq!(encoded.len(), routed.len());
        for (e, r) in encoded.iter().zip(&routed) {
            prop_assert_eq!(&router.exporters()[e.exporter].key, &r.exporter.key);
            let decoded = ExportMetricsServiceRequest::decode(&e.bytes[..]).unwrap();
            prop_assert_eq!(&decoded, &r.request);
        }
        let mut got: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
        for r in &routed {
            let entry = got.entry(r.exporter.key.name.clone()).or_default();
            for rm in &r.request.resource_metrics {
                let name = rm.resource.as_ref().unwrap().attributes.iter().find(|kv| kv.key == "resource_name").unwrap();
                let Some(any_value::Value::StringValue(name)) = &name.value.as_ref().unwrap().value else { panic!() };
                let resource: usize = name[1..].parse().unwrap();
                // The tenancy invariant, stated directly.
                let (rns, _) = world.resources[resource];
                let (ens, _) = world.exporters[r.exporter.key.name[1..].parse::<usize>().unwrap()];
                let rproject = world.namespaces[rns].map(|n| n.0);
                let eproject = world.namespaces[ens].map(|n| n.0);
                prop_assert!(rproject.is_some() && rproject == eproject, "{} got r{resource} of another project", r.exporter.key);
                entry.insert(resource);
            }
        }
        let mut expected: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
        for (e, template) in templates.iter().enumerate() {
            let visible: BTreeSet<usize> = (0..world.resources.len())
                .filter(|r| naive_visible(&world, e, *template, *r))
                .collect();
            if !visible.is_empty() {
                expected.insert(format!("e{e}"), visible);
            }
        }
        prop_assert_eq!(got, expected);
    }
}
