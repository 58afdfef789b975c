//! OTLP/HTTP metrics as `POST /v1/metrics` reads them
//! (`decode_metrics_request`: protobuf or JSON, gzip), then what the
//! pipeline does with a decoded request: routing to exporters (the cloning
//! `Router::route` and the encoding `Router::route_encoded`, whose outputs
//! must agree), cumulative-to-delta conversion, and encoding for a sink.

use std::io::Write as _;

use proptest::prelude::*;
use proptest::sample::select;
use prost::Message as _;
use tally_fuzz::{Input, fuzz, inputs, replay};
use tally_model::Manifest;
use tally_telemetry::otlp::{data_point_count, decode_metrics_request, encode_metrics_request};
use tally_telemetry::proto::collector::metrics::v1::ExportMetricsServiceRequest;
use tally_telemetry::proto::common::v1::{
    AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList, any_value,
};
use tally_telemetry::proto::metrics::v1::{
    Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics,
    Sum, metric::Data, number_data_point,
};
use tally_telemetry::proto::resource::v1::Resource;
use tally_telemetry::{
    Compression, DeltaConverter, Encoding, Exporter, InMemoryResourceIndex, Router,
};

const TARGET: &str = "otlp_metrics";
const LIMIT: usize = 1 << 20;

/// How a case's bytes reach the decoder (as protobuf, then as JSON).
#[derive(Debug, Clone, Copy)]
struct Params {
    /// The `Content-Encoding` header.
    content_encoding: Option<&'static str>,
    /// Gzip the bytes before decoding (so mutations hit what is inside).
    gzip_first: bool,
}

const CONTENT_ENCODINGS: &[Option<&str>] = &[
    None,
    Some("gzip"),
    Some(" GZIP "),
    Some("identity"),
    Some("br"),
];

struct World {
    router: Router,
    index: InMemoryResourceIndex,
}

fn world() -> World {
    let exporter = |name: &str, metrics: &str| {
        let text = format!(
            "apiVersion: telemetry.datumapis.com/v1alpha1\nkind: Exporter\n\
             metadata: {{name: {name}, namespace: ns-a}}\nspec:\n  sources:\n    - name: s\n      \
             metrics: {metrics}\n  sinks: [{{name: k, otlp_http: {{endpoint: 'http://127.0.0.1:4318'}}}}]\n"
        );
        let manifests = Manifest::parse_documents(&text).expect("exporter manifest");
        Exporter::from_manifest(&manifests[0]).expect("valid exporter")
    };
    let router = Router::new([
        exporter("all", "{}"),
        exporter(
            "named",
            r#"{metricsql: '{__name__=~"network_.*", code!="500" or resource_kind="Gateway"}'}"#,
        ),
        exporter(
            "widened",
            "{resourceSelectors: [{namespaceSelector: {matchLabels: {environment: production}}, \
             kinds: [{apiGroups: ['gateway.networking.k8s.io'], resources: [gateways]}]}]}",
        ),
    ]);
    let mut index = InMemoryResourceIndex::new();
    let labels = |env: &str| [("environment".to_owned(), env.to_owned())].into();
    index.set_namespace("ns-a", "p1", labels("production"));
    index.set_namespace("ns-c", "p1", labels("production"));
    index.set_namespace("ns-x", "p2", labels("production"));
    World { router, index }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = encoder.write_all(bytes);
    encoder.finish().unwrap_or_default()
}

fn check(world: &World, params: Params, bytes: &[u8]) -> Result<(), String> {
    let owned;
    let body = if params.gzip_first {
        owned = gzip(bytes);
        &owned[..]
    } else {
        bytes
    };
    for encoding in [Encoding::Protobuf, Encoding::Json] {
        match decode_metrics_request(body, encoding, params.content_encoding, LIMIT) {
            Ok(request) => check_request(world, &request)?,
            Err(e) if e.to_string().is_empty() => return Err("refused without a reason".into()),
            Err(_) => {}
        }
    }
    Ok(())
}

/// What the pipeline does with a decoded request; our own encodings must
/// decode again.
fn check_request(world: &World, request: &ExportMetricsServiceRequest) -> Result<(), String> {
    let bytes = request.encode_to_vec();
    for (encoding, compression) in [
        (Encoding::Protobuf, Compression::None),
        (Encoding::Protobuf, Compression::Gzip),
        (Encoding::Json, Compression::Gzip),
    ] {
        let encoded = encode_metrics_request(request, encoding, compression)
            .map_err(|e| format!("encoding as {encoding:?}: {e}"))?;
        let again = decode_metrics_request(
            &encoded.body,
            encoding,
            encoded.content_encoding,
            usize::MAX,
        )
        .map_err(|e| format!("our own {encoding:?} encoding does not decode: {e}"))?;
        if encoding == Encoding::Protobuf && again.encode_to_vec() != bytes {
            return Err(format!("{encoding:?} round trip changed the request"));
        }
    }
    check_routes(world, request)
}

fn check_routes(world: &World, request: &ExportMetricsServiceRequest) -> Result<(), String> {
    let (routed, _) = world.router.route(request, &world.index);
    let (encoded, _) = world.router.route_encoded(request, &world.index);
    let routed: Vec<_> = routed
        .into_iter()
        .filter(|r| data_point_count(&r.request) > 0)
        .collect();
    if routed.len() != encoded.len() {
        return Err(format!(
            "route gives {} exporters something, route_encoded {}",
            routed.len(),
            encoded.len()
        ));
    }
    for (r, e) in routed.iter().zip(&encoded) {
        let decoded = ExportMetricsServiceRequest::decode(&e.bytes[..])
            .map_err(|err| format!("route_encoded wrote undecodable bytes: {err}"))?;
        if decoded.encode_to_vec() != r.request.encode_to_vec() {
            return Err(format!(
                "exporter {}: route_encoded selects {decoded:?}, route {:?}",
                e.exporter, r.request
            ));
        }
        if e.points as usize != data_point_count(&r.request) {
            return Err(format!(
                "exporter {}: {} points counted",
                e.exporter, e.points
            ));
        }
        let mut converter = DeltaConverter::new(0);
        for _ in 0..2 {
            let mut copy = r.request.clone();
            converter.convert(&mut copy);
        }
    }
    Ok(())
}

fn any_value(depth: u32) -> BoxedStrategy<AnyValue> {
    let leaf = prop_oneof![
        3 => tally_fuzz::json::string().prop_map(any_value::Value::StringValue),
        1 => any::<bool>().prop_map(any_value::Value::BoolValue),
        1 => any::<i64>().prop_map(any_value::Value::IntValue),
        1 => any::<f64>().prop_map(any_value::Value::DoubleValue),
        1 => proptest::collection::vec(any::<u8>(), 0..8).prop_map(any_value::Value::BytesValue),
    ];
    leaf.prop_map(|v| AnyValue { value: Some(v) })
        .prop_recursive(depth, 16, 3, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..3)
                    .prop_map(|values| any_value::Value::ArrayValue(ArrayValue { values })),
                proptest::collection::vec(("[a-z]{1,3}", inner), 0..3).prop_map(|kvs| {
                    let values = kvs
                        .into_iter()
                        .map(|(key, value)| KeyValue {
                            key,
                            value: Some(value),
                            ..Default::default()
                        })
                        .collect();
                    any_value::Value::KvlistValue(KeyValueList { values })
                }),
            ]
            .prop_map(|v| AnyValue { value: Some(v) })
        })
        .boxed()
}

fn attributes(keys: &'static [&'static str]) -> BoxedStrategy<Vec<KeyValue>> {
    let value = prop_oneof![
        4 => select(&["ns-a", "ns-c", "ns-x", "p1", "Gateway", "gw-1", "200", "500", ""][..])
            .prop_map(|s| AnyValue { value: Some(any_value::Value::StringValue(s.to_owned())) }),
        1 => any_value(2),
    ];
    proptest::collection::vec((select(keys), proptest::option::weighted(0.9, value)), 0..5)
        .prop_map(|kvs| {
            kvs.into_iter()
                .map(|(key, value)| KeyValue {
                    key: key.to_owned(),
                    value,
                    ..Default::default()
                })
                .collect()
        })
        .boxed()
}

const RESOURCE_KEYS: &[&str] = &[
    "namespace",
    "namespace",
    "project",
    "resource_kind",
    "resource_group",
    "resource_name",
    "service.name",
    "service_name",
    "other",
];
const POINT_KEYS: &[&str] = &["code", "namespace", "project", "le", "x"];

fn number_point() -> BoxedStrategy<NumberDataPoint> {
    (
        attributes(POINT_KEYS),
        any::<u64>(),
        any::<u64>(),
        prop_oneof![
            any::<f64>().prop_map(number_data_point::Value::AsDouble),
            any::<i64>().prop_map(number_data_point::Value::AsInt),
        ],
    )
        .prop_map(|(attributes, start, time, value)| NumberDataPoint {
            attributes,
            start_time_unix_nano: start % 4,
            time_unix_nano: time % 8,
            value: Some(value),
            ..Default::default()
        })
        .boxed()
}

fn histogram_point() -> BoxedStrategy<HistogramDataPoint> {
    (
        attributes(POINT_KEYS),
        any::<u64>(),
        proptest::collection::vec(any::<u64>(), 0..4),
        proptest::collection::vec(any::<f64>(), 0..4),
        proptest::option::of(any::<f64>()),
    )
        .prop_map(
            |(attributes, count, bucket_counts, explicit_bounds, sum)| HistogramDataPoint {
                attributes,
                time_unix_nano: count % 8,
                count,
                bucket_counts,
                explicit_bounds,
                sum,
                ..Default::default()
            },
        )
        .boxed()
}

fn metric() -> BoxedStrategy<Metric> {
    let points = || proptest::collection::vec(number_point(), 0..3);
    let data = prop_oneof![
        points().prop_map(|data_points| Data::Gauge(Gauge { data_points })),
        (points(), 0i32..4, any::<bool>()).prop_map(|(data_points, t, is_monotonic)| {
            Data::Sum(Sum {
                data_points,
                aggregation_temporality: t,
                is_monotonic,
            })
        }),
        (proptest::collection::vec(histogram_point(), 0..3), 0i32..4).prop_map(
            |(data_points, t)| {
                Data::Histogram(Histogram {
                    data_points,
                    aggregation_temporality: t,
                })
            }
        ),
    ];
    let names = &[
        "network_bytes_sent",
        "network.bytes.received",
        "connections_open",
        "",
        "é",
    ][..];
    (select(names), proptest::option::weighted(0.9, data))
        .prop_map(|(name, data)| Metric {
            name: name.to_owned(),
            data,
            ..Default::default()
        })
        .boxed()
}

fn request() -> BoxedStrategy<ExportMetricsServiceRequest> {
    let scope = (
        proptest::option::of(Just(InstrumentationScope {
            name: "s".into(),
            ..Default::default()
        })),
        proptest::collection::vec(metric(), 0..4),
    )
        .prop_map(|(scope, metrics)| ScopeMetrics {
            scope,
            metrics,
            ..Default::default()
        });
    let resource = (
        proptest::option::weighted(0.9, attributes(RESOURCE_KEYS)),
        proptest::collection::vec(scope, 0..3),
    )
        .prop_map(|(attributes, scope_metrics)| ResourceMetrics {
            resource: attributes.map(|attributes| Resource {
                attributes,
                ..Default::default()
            }),
            scope_metrics,
            ..Default::default()
        });
    proptest::collection::vec(resource, 0..4)
        .prop_map(|resource_metrics| ExportMetricsServiceRequest { resource_metrics })
        .boxed()
}

fn case() -> BoxedStrategy<(Params, Input)> {
    let params =
        (select(CONTENT_ENCODINGS), any::<bool>()).prop_map(|(content_encoding, gzip_first)| {
            Params {
                content_encoding,
                gzip_first: gzip_first
                    && content_encoding.is_some_and(|e| e.trim().eq_ignore_ascii_case("gzip")),
            }
        });
    let shaped = (request(), any::<bool>())
        .prop_map(|(request, json)| {
            let bytes = if json {
                serde_json::to_vec(&request).unwrap_or_default()
            } else {
                request.encode_to_vec()
            };
            Input(bytes)
        })
        .boxed();
    (params, inputs(TARGET, shaped)).boxed()
}

#[test]
fn fuzz_otlp_metrics() {
    let world = world();
    fuzz(TARGET, case, |(params, input)| {
        check(&world, *params, input)
    });
}

#[test]
fn corpus_otlp_metrics() {
    let world = world();
    replay(TARGET, |bytes| {
        [(None, false), (Some("gzip"), false), (Some("gzip"), true)]
            .into_iter()
            .try_for_each(|(content_encoding, gzip_first)| {
                check(
                    &world,
                    Params {
                        content_encoding,
                        gzip_first,
                    },
                    bytes,
                )
            })
    });
}
