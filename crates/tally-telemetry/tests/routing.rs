//! Selection semantics through the router, and OTLP decode → select → encode
//! round trips checked by decoding with the prost types.

use prost::Message as _;
use tally_model::Manifest;
use tally_telemetry::otlp::{decode_metrics_request, encode_metrics_request};
use tally_telemetry::proto::collector::metrics::v1::ExportMetricsServiceRequest;
use tally_telemetry::proto::metrics::v1::metric::Data;
use tally_telemetry::{
    Compression, Encoding, Exporter, InMemoryResourceIndex, ResourceRef, Router,
};
use tally_testkit::otlp_metrics::*;

const GW_GROUP: &str = "gateway.networking.k8s.io";

fn exporter(namespace: &str, name: &str, metrics: &str) -> Exporter {
    let text = format!(
        "apiVersion: telemetry.datumapis.com/v1alpha1\nkind: Exporter\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  sources:\n    - name: s\n      metrics: {metrics}\n  sinks: [{{name: k, otlp_http: {{endpoint: 'http://127.0.0.1:4318'}}}}]\n"
    );
    Exporter::from_manifest(&Manifest::parse_documents(&text).unwrap()[0]).unwrap()
}

fn gateway(namespace: &str, name: &str) -> Who<'static> {
    Who {
        project: None,
        namespace: Box::leak(namespace.to_owned().into_boxed_str()),
        group: GW_GROUP,
        kind: "Gateway",
        name: Box::leak(name.to_owned().into_boxed_str()),
        service: "networking.datumapis.com",
    }
}

/// Traffic of gateways gw-1 in ns-a, gw-2 in ns-c (same project) and gw-9 in ns-x (other project).
fn traffic() -> ExportMetricsServiceRequest {
    let points = |code: &str| vec![number_point(attrs(&[("code", code)]), 1, 10, 100)];
    let metrics = || {
        vec![
            counter("network_bytes_sent", points("200")),
            counter("network.bytes.received", points("500")),
            gauge("connections_open", points("200")),
            histogram(
                "request_duration",
                attrs(&[("code", "200")]),
                10,
                vec![1, 2, 3],
            ),
        ]
    };
    request(vec![
        resource_metrics(&gateway("ns-a", "gw-1"), metrics()),
        resource_metrics(&gateway("ns-c", "gw-2"), metrics()),
        resource_metrics(&gateway("ns-x", "gw-9"), metrics()),
    ])
}

fn index() -> InMemoryResourceIndex {
    let mut index = two_project_index();
    for (ns, name, app) in [
        ("ns-a", "gw-1", "my-gateway"),
        ("ns-c", "gw-2", "my-gateway"),
        ("ns-x", "gw-9", "my-gateway"),
    ] {
        index.set_resource_labels(
            ResourceRef {
                group: GW_GROUP,
                kind: "Gateway",
                namespace: ns,
                name,
            },
            [("app".to_owned(), app.to_owned())].into(),
        );
    }
    index
}

fn routed_series(
    router: &Router,
    index: &InMemoryResourceIndex,
) -> Vec<Vec<(String, String, String)>> {
    let (routed, _) = router.route(&traffic(), index);
    // The encoding router selects the same, point for point, attribute for attribute.
    let (encoded, _) = router.route_encoded(&traffic(), index);
    assert_eq!(encoded.len(), routed.len());
    for (e, r) in encoded.iter().zip(&routed) {
        assert_eq!(router.exporters()[e.exporter].key, r.exporter.key);
        let decoded = ExportMetricsServiceRequest::decode(&e.bytes[..]).unwrap();
        assert_eq!(decoded, r.request);
        assert_eq!(
            e.points as usize,
            tally_telemetry::otlp::data_point_count(&r.request)
        );
    }
    let mut by_exporter: Vec<_> = routed
        .iter()
        .map(|r| (r.exporter.key.name.clone(), series(&r.request)))
        .collect();
    by_exporter.sort();
    by_exporter.into_iter().map(|(_, s)| s).collect()
}

fn names(series: &[(String, String, String)]) -> Vec<String> {
    series
        .iter()
        .map(|(ns, name, _)| format!("{ns}/{name}"))
        .collect()
}

#[test]
fn metricsql_selects_by_name_identity_and_point_labels_in_own_namespace_only() {
    let router = Router::new([exporter(
        "ns-a",
        "e",
        r#"{metricsql: '{service_name="networking.datumapis.com", resource_kind="Gateway", __name__=~"network_bytes_.*", code!="500"}'}"#,
    )]);
    let got = routed_series(&router, &index());
    assert_eq!(got.len(), 1);
    // network.bytes.received matches the name as network_bytes_received but its point has code=500.
    assert_eq!(names(&got[0]), ["ns-a/network_bytes_sent"]);
}

#[test]
fn metricsql_or_groups_and_normalized_names() {
    let router = Router::new([exporter(
        "ns-a",
        "e",
        r#"{metricsql: '{__name__="network_bytes_received" or __name__="connections_open"}'}"#,
    )]);
    let got = routed_series(&router, &index());
    assert_eq!(
        names(&got[0]),
        ["ns-a/connections_open", "ns-a/network.bytes.received"]
    );
}

#[test]
fn identity_mismatch_selects_nothing() {
    let router = Router::new([exporter(
        "ns-a",
        "e",
        r#"{metricsql: '{resource_kind="HTTPRoute"}'}"#,
    )]);
    assert!(router.route(&traffic(), &index()).0.is_empty());
}

#[test]
fn empty_metricsql_takes_every_series_of_the_own_namespace() {
    let router = Router::new([exporter("ns-a", "e", "{metricsql: ''}")]);
    let got = routed_series(&router, &index());
    assert_eq!(got[0].len(), 4);
    assert!(got[0].iter().all(|(ns, _, _)| ns == "ns-a"));
}

const SELECTOR: &str = "{resourceSelectors: [{namespaceSelector: {matchLabels: {environment: production}}, labelSelectors: {matchLabels: {app: my-gateway}}, kinds: [{apiGroups: [gateway.networking.k8s.io], resources: [gateways]}]}]}";

#[test]
fn namespace_selector_widens_within_the_project_only() {
    let router = Router::new([exporter("ns-a", "e", SELECTOR)]);
    let got = routed_series(&router, &index());
    let namespaces: std::collections::BTreeSet<_> =
        got[0].iter().map(|(ns, _, _)| ns.as_str()).collect();
    // ns-c is production in p1; ns-x is production too, but in p2.
    assert_eq!(namespaces.into_iter().collect::<Vec<_>>(), ["ns-a", "ns-c"]);
}

#[test]
fn relabelling_a_resource_or_namespace_changes_what_is_exported() {
    let router = Router::new([exporter("ns-a", "e", SELECTOR)]);
    let mut index = index();
    index.set_resource_labels(
        ResourceRef {
            group: GW_GROUP,
            kind: "Gateway",
            namespace: "ns-c",
            name: "gw-2",
        },
        [("app".to_owned(), "other".to_owned())].into(),
    );
    let got = routed_series(&router, &index);
    assert!(got[0].iter().all(|(ns, _, _)| ns == "ns-a"));
    index.set_namespace(
        "ns-a",
        "p1",
        [("environment".to_owned(), "staging".to_owned())].into(),
    );
    // The own namespace stays visible whatever its labels.
    assert!(
        routed_series(&router, &index)[0]
            .iter()
            .all(|(ns, _, _)| ns == "ns-a")
    );
    index.set_resource_labels(
        ResourceRef {
            group: GW_GROUP,
            kind: "Gateway",
            namespace: "ns-a",
            name: "gw-1",
        },
        [("app".to_owned(), "renamed".to_owned())].into(),
    );
    assert!(router.route(&traffic(), &index).0.is_empty());
}

#[test]
fn kind_and_label_expressions_filter_resources() {
    let router = Router::new([
        exporter(
            "ns-a",
            "routes",
            "{resourceSelectors: [{kinds: [{apiGroups: ['*'], kinds: [HTTPRoute]}]}]}",
        ),
        exporter(
            "ns-a",
            "not-mine",
            "{resourceSelectors: [{labelSelectors: {matchExpressions: [{key: app, operator: NotIn, values: [my-gateway]}]}}]}",
        ),
        exporter(
            "ns-a",
            "has-app",
            "{resourceSelectors: [{labelSelectors: {matchExpressions: [{key: app, operator: Exists}]}}]}",
        ),
    ]);
    let (routed, _) = router.route(&traffic(), &index());
    let names: Vec<_> = routed
        .iter()
        .map(|r| r.exporter.key.name.as_str())
        .collect();
    assert_eq!(names, ["has-app"]);
}

#[test]
fn spoofed_or_unknown_identities_reach_no_one() {
    let router = Router::new([exporter("ns-a", "e", "{metricsql: ''}")]);
    let mut spoofed = gateway("ns-a", "gw-1");
    spoofed.project = Some("p2");
    let unknown = gateway("ns-zzz", "gw");
    let req = request(vec![
        resource_metrics(
            &spoofed,
            vec![gauge("g", vec![number_point(vec![], 0, 1, 1)])],
        ),
        resource_metrics(
            &unknown,
            vec![gauge("g", vec![number_point(vec![], 0, 1, 1)])],
        ),
    ]);
    let (routed, stats) = router.route(&req, &index());
    assert!(routed.is_empty());
    assert_eq!((stats.project_mismatch, stats.unknown_namespace), (1, 1));
    // A data point attribute cannot move a series into another namespace.
    let sneaky = request(vec![resource_metrics(
        &gateway("ns-x", "gw-9"),
        vec![gauge(
            "g",
            vec![number_point(attrs(&[("namespace", "ns-a")]), 0, 1, 1)],
        )],
    )]);
    assert!(router.route(&sneaky, &index()).0.is_empty());
}

#[test]
fn decode_select_encode_round_trips_keep_structure() {
    let router = Router::new([exporter(
        "ns-a",
        "e",
        r#"{metricsql: '{__name__=~"network_bytes_sent|request_duration|connections_open"}'}"#,
    )]);
    let original = traffic();
    for (encoding, compression) in [
        (Encoding::Protobuf, Compression::Gzip),
        (Encoding::Json, Compression::None),
        (Encoding::Json, Compression::Gzip),
        (Encoding::Protobuf, Compression::None),
    ] {
        let wire = encode_metrics_request(&original, encoding, compression).unwrap();
        let received =
            decode_metrics_request(&wire.body, encoding, wire.content_encoding, 1 << 20).unwrap();
        assert_eq!(received, original, "{encoding:?} {compression:?}");
        let (routed, _) = router.route(&received, &index());
        let out = encode_metrics_request(&routed[0].request, Encoding::Protobuf, Compression::None)
            .unwrap();
        assert_eq!(out.content_type, "application/x-protobuf");
        let sent = ExportMetricsServiceRequest::decode(out.body).unwrap();
        assert_eq!(sent.resource_metrics.len(), 1);
        let rm = &sent.resource_metrics[0];
        assert_eq!(rm.resource, original.resource_metrics[0].resource);
        assert_eq!(
            rm.scope_metrics[0].scope,
            original.resource_metrics[0].scope_metrics[0].scope
        );
        let kept: Vec<_> = rm.scope_metrics[0].metrics.iter().collect();
        let expected: Vec<_> = original.resource_metrics[0].scope_metrics[0]
            .metrics
            .iter()
            .filter(|m| m.name != "network.bytes.received")
            .collect();
        assert_eq!(kept, expected);
        assert!(
            matches!(&kept[0].data, Some(Data::Sum(s)) if s.is_monotonic && s.aggregation_temporality == 2)
        );
        assert!(matches!(&kept[1].data, Some(Data::Gauge(_))));
        assert!(matches!(&kept[2].data, Some(Data::Histogram(_))));
    }
}

#[test]
fn decodes_the_otlp_json_encoding_written_by_others() {
    // As the OTLP spec writes it: camelCase, int64 as strings, enums as numbers.
    let json = br#"{"resourceMetrics":[{"resource":{"attributes":[{"key":"namespace","value":{"stringValue":"ns-a"}}]},
      "scopeMetrics":[{"scope":{"name":"s"},"metrics":[{"name":"requests","unit":"1",
        "sum":{"aggregationTemporality":2,"isMonotonic":true,"dataPoints":[
          {"asInt":"42","startTimeUnixNano":"1000","timeUnixNano":"2000","attributes":[{"key":"code","value":{"intValue":"200"}}]}]}}]}]}]}"#;
    let req = decode_metrics_request(json, Encoding::Json, None, 1 << 20).unwrap();
    let router = Router::new([exporter("ns-a", "e", r#"{metricsql: '{code="200"}'}"#)]);
    let (routed, _) = router.route(&req, &index());
    assert_eq!(routed.len(), 1);
    assert_eq!(routed[0].request, req);
}

#[test]
fn the_semantic_convention_namespace_attribute_routes_too_and_refusals_count_by_cause() {
    let router = Router::new([exporter("ns-a", "e", "{metricsql: ''}")]);
    let point = || vec![gauge("g", vec![number_point(vec![], 0, 1, 1)])];
    // The resource names its namespace only as `k8s.namespace.name`.
    let mut conventional = resource_metrics(&gateway("ns-a", "gw-1"), point());
    let resource = conventional.resource.as_mut().unwrap();
    for kv in &mut resource.attributes {
        if kv.key == "namespace" {
            kv.key = "k8s.namespace.name".into();
        }
    }
    // And one that names none at all.
    let mut nameless = resource_metrics(&gateway("ns-a", "gw-1"), point());
    let resource = nameless.resource.as_mut().unwrap();
    resource.attributes.retain(|kv| kv.key != "namespace");
    let unknown = resource_metrics(&gateway("ns-zzz", "gw"), point());
    let (routed, stats) = router.route(&request(vec![conventional, nameless, unknown]), &index());
    assert_eq!(routed.len(), 1);
    assert_eq!(series(&routed[0].request).len(), 1);
    assert_eq!(
        stats.refused(),
        [
            ("no_namespace", 1),
            ("unknown_namespace", 1),
            ("project_mismatch", 0)
        ]
    );
    assert_eq!(stats.unattributed_points, 2);
}
