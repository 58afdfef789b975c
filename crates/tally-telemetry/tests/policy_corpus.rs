//! The corpus of Envoy access-log records against a table of policies,
//! with expectations computed by hand (record ids are the records'
//! `x-request-id`). The same eight records come as JSON lines
//! (`fixtures/access.ndjson`, what files and `tally collect` read) and as
//! one OTLP logs request (`fixtures/access.otlp.json`: r0–r3 with the
//! fields as attributes, as Envoy's OpenTelemetry sink sends them, r4–r5
//! as a key/value body, r6–r7 as a JSON text body), decoded from OTLP/JSON
//! and from protobuf by the receivers' decoder; every case must keep the
//! same records in all three.

use prost::Message as _;
use tally_model::Manifest;
use tally_policy::{AttrValue, Policy, Record};
use tally_telemetry::Encoding;
use tally_telemetry::otlp::decode_request;
use tally_telemetry::proto::collector::logs::v1::ExportLogsServiceRequest;
use tally_telemetry::shaping::record_of_log;

const CORPUS: &str = include_str!("fixtures/access.ndjson");
const OTLP_JSON: &str = include_str!("fixtures/access.otlp.json");

fn records() -> Vec<(String, Record<'static>)> {
    CORPUS
        .lines()
        .map(|line| {
            let json: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(line).unwrap();
            let id = json["x-request-id"].as_str().unwrap().to_owned();
            (id, Record::from_json(&json).into_owned())
        })
        .collect()
}

/// The corpus as OTLP records, decoded from `encoding`.
fn otlp_records(encoding: Encoding) -> Vec<(String, Record<'static>)> {
    let raw = match encoding {
        Encoding::Json => OTLP_JSON.as_bytes().to_vec(),
        Encoding::Protobuf => {
            let request: ExportLogsServiceRequest =
                decode_request(OTLP_JSON.as_bytes(), Encoding::Json).unwrap();
            request.encode_to_vec()
        }
    };
    let request: ExportLogsServiceRequest = decode_request(&raw, encoding).unwrap();
    let mut out = Vec::new();
    for rl in &request.resource_logs {
        let resource = &rl.resource.as_ref().unwrap().attributes;
        for log in rl.scope_logs.iter().flat_map(|s| &s.log_records) {
            let record = record_of_log(resource, log);
            let Some(AttrValue::Str(id)) = record.get(tally_policy::vocab::A::RequestId as usize)
            else {
                panic!("no x-request-id in {log:?}");
            };
            out.push((id.to_string(), record.clone().into_owned()));
        }
    }
    out
}

/// The corpus in each of its encodings.
fn encodings() -> [(&'static str, Vec<(String, Record<'static>)>); 3] {
    [
        ("JSON lines", records()),
        ("OTLP/JSON", otlp_records(Encoding::Json)),
        ("OTLP protobuf", otlp_records(Encoding::Protobuf)),
    ]
}

#[test]
fn the_three_encodings_read_the_same_records() {
    let [(_, lines), (_, json), (_, protobuf)] = encodings();
    assert_eq!(lines.len(), 8);
    assert_eq!(lines, json);
    assert_eq!(lines, protobuf);
}

/// The ids of the records `p` keeps, the same in every encoding.
fn kept(p: &Policy) -> Vec<String> {
    let [(_, lines), others @ ..] = encodings();
    let keep = |records: Vec<(String, Record<'static>)>| -> Vec<String> {
        records
            .into_iter()
            .filter(|(_, r)| p.keep_log(r).is_some())
            .map(|(id, _)| id)
            .collect()
    };
    let kept = keep(lines);
    for (name, records) in others {
        assert_eq!(keep(records), kept, "{name}");
    }
    kept
}

fn policy(spec: &str) -> Policy {
    let text = format!(
        "apiVersion: telemetry.datumapis.com/v1alpha1\nkind: TelemetryPolicy\nmetadata: {{name: p, namespace: shop}}\nspec:\n{spec}"
    );
    let manifest: Manifest = serde_norway::from_str(&text).unwrap();
    Policy::from_manifest(&manifest).unwrap()
}

const TARGET: &str =
    "  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: edge}]\n";

#[test]
fn each_policy_keeps_exactly_the_records_computed_by_hand() {
    let cases: &[(&str, &[&str])] = &[
        // r4 has no duration: the failing side is absorbed by `||`; r5 has
        // no response code and a short duration: no match.
        (
            "response.code >= 500 || request.duration > duration('2s')",
            &["r1", "r2", "r4"],
        ),
        ("has(gen_ai.usage.input_tokens)", &["r3", "r4", "r7"]),
        ("request.headers['x-tenant-id'] == 'acme'", &["r0", "r6"]),
        (
            "route.httproute == 'llm' && gen_ai.request.model.startsWith('gpt')",
            &["r3", "r7"],
        ),
        (
            "project == 'shop' && request.method in ['POST', 'DELETE']",
            &["r1", "r3", "r4", "r6", "r7"],
        ),
        ("false", &[]),
        ("request.size > 500 && response.size < 1000", &["r4"]),
        ("route.rule == 1", &["r1", "r7"]),
        (
            "request.time >= timestamp('2026-03-01T10:00:06Z')",
            &["r6", "r7"],
        ),
        (
            "request.path.matches('^/v1/(chat|messages)')",
            &["r3", "r4", "r7"],
        ),
        (
            "response.code == 200 && !(request.protocol == 'HTTP/2')",
            &["r0", "r2", "r3"],
        ),
    ];
    for (cel, expected) in cases {
        let p = policy(&format!(
            "{TARGET}  accessLogs:\n    matches: [{{cel: {cel:?}}}]\n"
        ));
        assert_eq!(kept(&p), *expected, "{cel}");
    }
    // Matches are OR-ed; no matches keeps everything.
    let p = policy(&format!(
        "{TARGET}  accessLogs:\n    matches: [{{cel: \"response.code == 404\"}}, {{cel: \"request.path.startsWith('/slow')\"}}]\n"
    ));
    assert_eq!(kept(&p), ["r2", "r6"]);
    let p = policy(&format!("{TARGET}  accessLogs: {{}}\n"));
    assert_eq!(kept(&p).len(), 8);
    // No accessLogs section: nothing is exported.
    let p = policy(TARGET);
    assert!(kept(&p).is_empty());
}

#[test]
fn kept_records_carry_exactly_the_listed_fields_under_semantic_convention_names() {
    let p = policy(&format!(
        "{TARGET}  accessLogs:\n    matches: [{{cel: \"response.code >= 500 || request.duration > duration('2s')\"}}]\n    fields: [start_time, request.method, request.path, response.code, gen_ai.usage.input_tokens]\n"
    ));
    let all = records();
    let r4 = p.keep_log(&all[4].1).unwrap();
    assert_eq!(
        r4,
        vec![
            (
                "tally.request.time",
                AttrValue::Timestamp(1_772_359_204_000_000_000)
            ),
            ("http.request.method", AttrValue::Str("POST".into())),
            ("url.path", AttrValue::Str("/v1/messages".into())),
            ("http.response.status_code", AttrValue::Int(500)),
            ("gen_ai.usage.input_tokens", AttrValue::Int(55)),
        ]
    );
    // r1 has no token count: four fields.
    let r1 = p.keep_log(&all[1].1).unwrap();
    assert_eq!(r1.len(), 4);
    assert_eq!(r1[3], ("http.response.status_code", AttrValue::Int(503)));
}

#[test]
fn dimensions_come_from_headers_literals_and_attributes() {
    let p = policy(&format!(
        "{TARGET}  metrics:\n    dimensions: [{{name: tenant, from: Header, value: X-Tenant-Id}}, {{name: tier, from: Literal, value: gold}}, {{name: model, from: Attribute, value: gen_ai.request.model}}]\n"
    ));
    let all = records();
    let dims = |i: usize| p.dimensions(&all[i].1);
    let pair = |a: &str, b: &str| (a.to_owned(), b.to_owned());
    assert_eq!(dims(0), vec![pair("tenant", "acme"), pair("tier", "gold")]);
    assert_eq!(dims(2), vec![pair("tier", "gold")]);
    assert_eq!(dims(3), vec![pair("tier", "gold"), pair("model", "gpt-4o")]);
}

#[test]
fn token_usage_sums_equal_the_corpus_and_input_includes_cached_tokens() {
    let p = policy(&format!("{TARGET}  genAI: {{}}\n"));
    let (mut input, mut output) = (0, 0);
    for (_, r) in records() {
        for point in p.gen_ai_usage(&r) {
            match point.token_type {
                "input" => input += point.tokens,
                "output" => output += point.tokens,
                other => panic!("{other}"),
            }
        }
    }
    // r3 120 (of which 100 cached: included, not added), r4 55, r7 10.
    assert_eq!((input, output), (185, 35));
    let without = policy(TARGET);
    assert!(
        records()
            .iter()
            .all(|(_, r)| without.gen_ai_usage(r).is_empty())
    );
}

/// `examples/llm-token-meters.yaml` meters the corpus's AI records (each
/// sent as a CloudEvent whose data is the JSON line) to the same sums, per
/// HTTPRoute, model and token type, as a policy's
/// `gen_ai.client.token.usage` shaped from the same records over OTLP.
#[test]
fn the_example_llm_token_meters_sum_what_the_exporter_sends() {
    use std::collections::BTreeMap;
    use tally_meter::{CompiledMeter, SampleValue};
    use tally_model::{CloudEvent, MeterDefinition};

    type Sums = BTreeMap<(String, String, String), i64>;
    let text = include_str!("../../../examples/llm-token-meters.yaml");
    let mut metered = Sums::new();
    for manifest in Manifest::parse_documents(text).unwrap() {
        let definition = MeterDefinition::from_manifest(&manifest).unwrap();
        let meter = CompiledMeter::compile(&manifest.metadata.name, &definition, &[]).unwrap();
        let token_type = match manifest.metadata.name.as_str() {
            "llm-input-tokens" => "input",
            "llm-output-tokens" => "output",
            other => panic!("{other}"),
        };
        let names: Vec<&str> = meter.dimensions().collect();
        for line in CORPUS.lines().filter(|l| l.contains("gen_ai.usage")) {
            let event = CloudEvent {
                specversion: "1.0".into(),
                id: "e".into(),
                source: "test".into(),
                kind: "gateway.envoyproxy.io/ai-gateway/access-log".into(),
                subject: "projects/shop".into(),
                time: "2026-03-01T10:00:00Z".parse().unwrap(),
                datacontenttype: None,
                dataschema: None,
                data: Some(serde_json::from_str(line).unwrap()),
                extensions: Default::default(),
            };
            let sample = meter.sample(&event).unwrap();
            let group = |name: &str| {
                let at = names.iter().position(|n| *n == name).unwrap();
                sample.groups[at].clone().unwrap()
            };
            // The route as logged: httproute/<namespace>/<name>/rule/<n>.
            let route = group("route").split('/').nth(2).unwrap().to_owned();
            let SampleValue::Number(n) = sample.value else {
                panic!("{:?}", sample.value)
            };
            *metered
                .entry((route, group("model"), token_type.to_owned()))
                .or_default() += n.to_string().parse::<i64>().unwrap();
        }
    }
    let exported = exported_token_usage();
    assert_eq!(metered, exported);
    let total = |t: &str| -> i64 {
        exported
            .iter()
            .filter(|(k, _)| k.2 == t)
            .map(|(_, v)| v)
            .sum()
    };
    assert_eq!((total("input"), total("output")), (185, 35));
}

/// Σ `gen_ai.client.token.usage` by (HTTPRoute, model, token type), as a
/// policy with `genAI` shapes it from the OTLP corpus.
fn exported_token_usage() -> std::collections::BTreeMap<(String, String, String), i64> {
    use std::sync::Arc;
    use tally_policy::{Resolution, World};
    use tally_telemetry::InMemoryResourceIndex;
    use tally_telemetry::proto::metrics::v1::metric::Data;
    use tally_telemetry::shaping::Shaper;

    let manifest: Manifest = serde_norway::from_str(
        "apiVersion: telemetry.datumapis.com/v1alpha1\nkind: TelemetryPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Namespace, name: shop}]\n  genAI: {}\n",
    )
    .unwrap();
    let mut world = World::default();
    world.namespaces.insert("shop".into(), Some("shop".into()));
    let resolution = Resolution::resolve([&manifest], &world);
    let mut index = InMemoryResourceIndex::new();
    index.set_namespace("shop", "shop", Default::default());
    let shaper = Shaper::new(Arc::new(resolution), Arc::new(index));
    let request: ExportLogsServiceRequest =
        decode_request(OTLP_JSON.as_bytes(), Encoding::Json).unwrap();
    let shaped = shaper.shape_logs(&request);
    let mut sums = std::collections::BTreeMap::new();
    let metrics = shaped.metrics.resource_metrics.iter();
    for metric in metrics
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
    {
        let (name, Some(Data::Histogram(h))) = (&metric.name, &metric.data) else {
            continue;
        };
        if name != "gen_ai.client.token.usage" {
            continue;
        }
        for point in &h.data_points {
            let attr = |key: &str| {
                point
                    .attributes
                    .iter()
                    .find(|a| a.key == key)
                    .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                        tally_telemetry::proto::common::v1::any_value::Value::StringValue(s) => {
                            Some(s.clone())
                        }
                        _ => None,
                    })
                    .unwrap()
            };
            let key = (
                attr("gateway.httproute.name"),
                attr("gen_ai.request.model"),
                attr("gen_ai.token.type"),
            );
            *sums.entry(key).or_default() += point.sum.unwrap() as i64;
        }
    }
    sums
}
