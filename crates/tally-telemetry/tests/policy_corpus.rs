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

fn records() -> Vec<(String, Record)> {
    CORPUS
        .lines()
        .map(|line| {
            let json: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(line).unwrap();
            let id = json["x-request-id"].as_str().unwrap().to_owned();
            (id, Record::from_json(&json))
        })
        .collect()
}

/// The corpus as OTLP records, decoded from `encoding`.
fn otlp_records(encoding: Encoding) -> Vec<(String, Record)> {
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
            out.push((id.clone(), record));
        }
    }
    out
}

/// The corpus in each of its encodings.
fn encodings() -> [(&'static str, Vec<(String, Record)>); 3] {
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
    let keep = |records: Vec<(String, Record)>| -> Vec<String> {
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
