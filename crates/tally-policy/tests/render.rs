//! `tally policy render --envoy-gateway`: the EnvoyProxy `spec.telemetry`
//! (gateway.envoyproxy.io/v1alpha1) of the issue's policy, field by field.

use tally_model::Manifest;
use tally_policy::render::{Collector, render};
use tally_policy::{Resolution, Target, World, keep_trace};

const POLICY: &str = r#"
apiVersion: telemetry.datumapis.com/v1alpha1
kind: TelemetryPolicy
metadata: {name: errors-and-tokens, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: edge}]
  accessLogs:
    matches: [{cel: "response.code >= 500 || request.duration > duration('2s')"}]
    fields: [start_time, request.method, request.path, response.code, gen_ai.usage.input_tokens]
  metrics:
    dimensions: [{name: tenant, from: Header, value: x-tenant-id}, {name: tier, from: Literal, value: gold}]
  tracing:
    mode: Enabled
    samplingRate: {numerator: 1, denominator: 10}
    attributes:
    - {name: gen_ai.request.model, from: Attribute, value: "gen_ai.request.model"}
    - {name: tenant, from: Header, value: x-tenant-id}
    - {name: env, from: Literal, value: prod}
  genAI: {}
"#;

fn world() -> World {
    let mut w = World::default();
    w.namespaces.insert("shop".into(), Some("shop".into()));
    w.gateways.insert(("shop".into(), "edge".into()));
    w
}

#[test]
fn the_envoy_proxy_telemetry_is_equivalent_field_by_field() {
    let manifest: Manifest = serde_norway::from_str(POLICY).unwrap();
    let w = world();
    let r = Resolution::resolve([&manifest], &w);
    let in_force = r.in_force(&w);
    assert_eq!(in_force.len(), 1);
    let (target, policy) = &in_force[0];
    assert_eq!(
        *target,
        Target::Gateway {
            namespace: "shop".into(),
            name: "edge".into()
        }
    );
    let collector = Collector {
        host: "tally-collect.tally.svc".into(),
        port: 4317,
    };
    let out = render(target, policy, &collector).unwrap();
    let m = &out.manifest;
    assert_eq!(m["apiVersion"], "gateway.envoyproxy.io/v1alpha1");
    assert_eq!(m["kind"], "EnvoyProxy");
    assert_eq!(m["metadata"]["name"], "edge-telemetry");
    assert_eq!(m["metadata"]["namespace"], "shop");
    let telemetry = &m["spec"]["telemetry"];
    // accessLog.settings[0]: format, matches, sinks.
    let settings = telemetry["accessLog"]["settings"].as_array().unwrap();
    assert_eq!(settings.len(), 1);
    let s = &settings[0];
    assert_eq!(s["format"]["type"], "JSON");
    let json = s["format"]["json"].as_object().unwrap();
    let expected_format = [
        ("route_name", "%ROUTE_NAME%"),
        (
            "project_name",
            "%METADATA(ROUTE:gateway.envoyproxy.io:project_name)%",
        ),
        ("start_time", "%START_TIME%"),
        ("method", "%REQ(:METHOD)%"),
        ("x-envoy-origin-path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
        ("response_code", "%RESPONSE_CODE%"),
        (
            "gen_ai.usage.input_tokens",
            "%DYNAMIC_METADATA(io.envoy.ai_gateway:llm_input_token)%",
        ),
    ];
    assert_eq!(json.len(), expected_format.len(), "{json:?}");
    for (key, op) in expected_format {
        assert_eq!(json[key], op, "{key}");
    }
    assert_eq!(
        s["matches"],
        serde_json::json!(["response.code >= 500 || request.duration > duration('2s')"])
    );
    assert_eq!(s["sinks"][0]["type"], "OpenTelemetry");
    assert_eq!(
        s["sinks"][0]["openTelemetry"]["host"],
        "tally-collect.tally.svc"
    );
    assert_eq!(s["sinks"][0]["openTelemetry"]["port"], 4317);
    // tracing: samplingFraction, provider, customTags (Header and Literal).
    let t = &telemetry["tracing"];
    assert_eq!(t["samplingFraction"]["numerator"], 1);
    assert_eq!(t["samplingFraction"]["denominator"], 10);
    assert_eq!(t["provider"]["type"], "OpenTelemetry");
    assert_eq!(t["provider"]["host"], "tally-collect.tally.svc");
    assert_eq!(t["provider"]["port"], 4317);
    let tags = t["customTags"].as_object().unwrap();
    assert_eq!(tags.len(), 2);
    assert_eq!(tags["tenant"]["type"], "RequestHeader");
    assert_eq!(tags["tenant"]["requestHeader"]["name"], "x-tenant-id");
    assert_eq!(tags["env"]["type"], "Literal");
    assert_eq!(tags["env"]["literal"]["value"], "prod");
    // The CEL attribute is Tally's to add, and says so.
    assert_eq!(out.notes.len(), 1);
    assert!(
        out.notes[0].contains("gen_ai.request.model"),
        "{:?}",
        out.notes
    );
}

#[test]
fn a_match_envoy_cannot_evaluate_widens_the_proxy_to_log_everything() {
    let text = POLICY.replace(
        "response.code >= 500 || request.duration > duration('2s')",
        "has(gen_ai.usage.input_tokens)",
    );
    let manifest: Manifest = serde_norway::from_str(&text).unwrap();
    let w = world();
    let r = Resolution::resolve([&manifest], &w);
    let (target, policy) = &r.in_force(&w)[0];
    let out = render(
        target,
        policy,
        &Collector {
            host: "c".into(),
            port: 4317,
        },
    )
    .unwrap();
    let s = &out.manifest["spec"]["telemetry"]["accessLog"]["settings"][0];
    assert!(s.get("matches").is_none());
    assert!(
        out.notes
            .iter()
            .any(|n| n.contains("the proxy logs every request"))
    );
}

/// The policy in force for `policy_text` on the test world.
fn rendered(policy_text: &str) -> tally_policy::render::Rendered {
    let manifest: Manifest = serde_norway::from_str(policy_text).unwrap();
    let w = world();
    let r = Resolution::resolve([&manifest], &w);
    let (target, policy) = &r.in_force(&w)[0];
    let collector = Collector {
        host: "c".into(),
        port: 4317,
    };
    render(target, policy, &collector).unwrap()
}

#[test]
fn more_matches_than_envoy_allows_are_joined_into_one() {
    let many: Vec<String> = (0..12)
        .map(|i| format!("{{cel: \"response.code == {}\"}}", 500 + i))
        .collect();
    let text = POLICY.replace(
        "[{cel: \"response.code >= 500 || request.duration > duration('2s')\"}]",
        &format!("[{}]", many.join(", ")),
    );
    let out = rendered(&text);
    let s = &out.manifest["spec"]["telemetry"]["accessLog"]["settings"][0];
    let matches = s["matches"].as_array().unwrap();
    assert!(matches.len() <= tally_policy::render::ENVOY_MAX_MATCHES);
    let expected: Vec<String> = (0..12)
        .map(|i| format!("(response.code == {})", 500 + i))
        .collect();
    assert_eq!(matches, &[serde_json::json!(expected.join(" || "))]);
    // At the limit the list is kept as it is.
    let ten = POLICY.replace(
        "[{cel: \"response.code >= 500 || request.duration > duration('2s')\"}]",
        &format!("[{}]", many[..10].join(", ")),
    );
    let s = &rendered(&ten).manifest["spec"]["telemetry"]["accessLog"]["settings"][0];
    assert_eq!(s["matches"].as_array().unwrap().len(), 10);
}

#[test]
fn a_match_on_response_flags_is_left_to_tally() {
    // Envoy's CEL has `response.flags` as an integer bit set; Tally's is the
    // flags' text, so the proxy must not evaluate it.
    let text = POLICY.replace(
        "response.code >= 500 || request.duration > duration('2s')",
        "response.flags == 'UH'",
    );
    let out = rendered(&text);
    let s = &out.manifest["spec"]["telemetry"]["accessLog"]["settings"][0];
    assert!(s.get("matches").is_none(), "{s}");
}

#[test]
fn a_sampling_denominator_past_int32_is_refused() {
    let text = POLICY.replace(
        "samplingRate: {numerator: 1, denominator: 10}",
        "samplingRate: {numerator: 1, denominator: 2147483648}",
    );
    let manifest: Manifest = serde_norway::from_str(&text).unwrap();
    let w = world();
    let r = Resolution::resolve([&manifest], &w);
    assert!(r.in_force(&w).is_empty());
    let ok = POLICY.replace(
        "samplingRate: {numerator: 1, denominator: 10}",
        "samplingRate: {numerator: 1, denominator: 2147483647}",
    );
    let out = rendered(&ok);
    assert_eq!(
        out.manifest["spec"]["telemetry"]["tracing"]["samplingFraction"]["denominator"],
        2147483647
    );
}

#[test]
fn head_sampling_keeps_whole_traces_at_the_rate() {
    let id = |tail: [u8; 7]| {
        let mut id = [0xAB_u8; 16];
        id[9..].copy_from_slice(&tail);
        id
    };
    // R = 0: always kept (unless the rate is 0); R = 2^56 - 1: only at 1/1.
    assert!(keep_trace(&id([0; 7]), 1, 10));
    assert!(!keep_trace(&id([0; 7]), 0, 10));
    assert!(!keep_trace(&id([0xFF; 7]), 9, 10));
    assert!(keep_trace(&id([0xFF; 7]), 10, 10));
    // R = 2^55 is exactly one half: kept below it only.
    let half = id([0x80, 0, 0, 0, 0, 0, 0]);
    assert!(!keep_trace(&half, 1, 2));
    assert!(keep_trace(
        &id([0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]),
        1,
        2
    ));
    // The same id always gets the same answer, and 1 in 10 is kept.
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let mut kept = 0;
    for _ in 0..100_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let mut trace = [0u8; 16];
        trace[8..].copy_from_slice(&state.to_be_bytes());
        let k = keep_trace(&trace, 1, 10);
        assert_eq!(k, keep_trace(&trace, 1, 10));
        kept += usize::from(k);
    }
    assert!((9_500..10_500).contains(&kept), "{kept}");
}
