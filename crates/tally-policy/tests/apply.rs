//! Apply-time checking: every type error, unknown name and bound is an
//! `Invalid` message when the policy is applied, never an evaluation error.

use tally_model::Manifest;
use tally_policy::{CompiledExpr, Policy, Record};

fn manifest(spec: &str) -> Manifest {
    let text = format!(
        "apiVersion: telemetry.datumapis.com/v1alpha1\nkind: TelemetryPolicy\nmetadata: {{name: p, namespace: shop}}\nspec:\n  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: edge}}]\n{spec}"
    );
    serde_norway::from_str(&text).unwrap()
}

fn invalid(cel: &str) -> String {
    let m = manifest(&format!("  accessLogs:\n    matches: [{{cel: {cel:?}}}]\n"));
    Policy::from_manifest(&m).expect_err(cel)
}

#[test]
fn type_errors_and_unknown_names_are_refused_with_their_reason() {
    let cases = [
        (
            "response.code == 'x'",
            "no overload of '==' takes (int, string)",
        ),
        (
            "request.method > 5",
            "no overload of '>' takes (string, int)",
        ),
        ("response.code", "a match must be a bool, this is a int"),
        ("foo == 1", "unknown identifier 'foo'"),
        ("request.nope == 1", "unknown attribute 'request.nope'"),
        (
            "gen_ai.usage > 1",
            "'gen_ai.usage' is a namespace of attributes",
        ),
        (
            "request.path.matches(request.method)",
            "must be a string literal",
        ),
        ("request.path.matches('(')", "the pattern does not compile"),
        (
            "request.duration > duration('2 parsecs')",
            "duration(\"2 parsecs\")",
        ),
        ("[1, 2].exists(x, x > 1)", "macros (all, exists"),
        (
            "lowerAscii(request.path) == 'a'",
            "function 'lowerAscii' is not supported",
        ),
        (
            "request.duration + 1 > request.duration",
            "no overload of '+' takes",
        ),
        ("response.code >=", "does not parse"),
        ("Foo{a: 1}", "message literals are not supported"),
        ("response.code.x == 1", "a int has no field 'x'"),
    ];
    for (cel, reason) in cases {
        let error = invalid(cel);
        assert!(
            error.starts_with("spec.accessLogs.matches[0].cel: "),
            "{error}"
        );
        assert!(error.contains(reason), "{cel}: {error}");
    }
}

#[test]
fn expressions_are_bounded_in_size_nesting_and_cost() {
    let long = format!("request.path == '{}'", "a".repeat(1100));
    assert!(invalid(&long).contains("more than 1024"));
    let deep = format!("{}true{}", "(".repeat(13), ")".repeat(13));
    assert!(invalid(&deep).contains("nests deeper than 12"));
    // Twelve levels of brackets (the generated parser's heaviest case) parse.
    let lists = format!("size({}1{}) > 0", "[".repeat(11), "]".repeat(11));
    assert!(CompiledExpr::compile_bool(&lists).is_ok());
    // Operator chains nest without brackets: the parser's recursion limit.
    let chain = format!("response.code{} > 0", " + 1".repeat(200));
    assert!(
        invalid(&chain).contains("nests deeper than 32 levels"),
        "{}",
        invalid(&chain)
    );
    let costly = vec!["request.path.matches('a')"; 21].join(" || ");
    assert!(invalid(&costly).contains("more than the limit 1000"));
    // Just under every bound is fine.
    let ok = vec!["request.path.matches('a')"; 15].join(" || ");
    assert!(CompiledExpr::compile_bool(&ok).is_ok());
}

#[test]
fn the_spec_is_refused_for_unknown_fields_bad_targets_and_bad_values() {
    let cases = [
        ("  acessLogs: {}\n", "unknown field `acessLogs`"),
        (
            "  accessLogs: {fields: [request.nope]}\n",
            "unknown field \"request.nope\"",
        ),
        (
            "  tracing: {mode: On}\n",
            "is not Enabled, Disabled or ImplementationDefault",
        ),
        (
            "  tracing: {samplingRate: {numerator: 3, denominator: 2}}\n",
            "exceeds the denominator",
        ),
        (
            "  tracing: {samplingRate: {numerator: 0, denominator: 0}}\n",
            "at least 1",
        ),
        (
            "  metrics: {dimensions: [{name: t, from: Cookie, value: x}]}\n",
            "not Header, Literal or Attribute",
        ),
        (
            "  metrics: {dimensions: [{name: t, from: Header, value: 'a b'}]}\n",
            "not a header name",
        ),
        (
            "  metrics: {dimensions: [{name: '1x', from: Literal, value: a}]}\n",
            "is not a name",
        ),
        (
            "  metrics: {dimensions: [{name: t, from: Attribute, value: request.headers}]}\n",
            "must be a scalar",
        ),
        (
            "  metrics: {dimensions: [{name: t, from: Literal, value: a}, {name: t, from: Literal, value: b}]}\n",
            "listed twice",
        ),
    ];
    for (spec, reason) in cases {
        let error = Policy::from_manifest(&manifest(spec)).expect_err(spec);
        assert!(error.contains(reason), "{spec}: {error}");
    }
    let text = "apiVersion: telemetry.datumapis.com/v1alpha1\nkind: TelemetryPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: web}]\n";
    let error = Policy::from_manifest(&serde_norway::from_str(text).unwrap()).unwrap_err();
    assert!(error.contains("a target is a Gateway"), "{error}");
}

#[test]
fn evaluation_never_fails_a_record() {
    // Value errors at evaluation mean "no match", never a failure.
    for cel in [
        "int(request.path) > 0",
        "response.code / 0 == 1",
        "request.headers[request.method] == 'x'",
        "response.code + 9223372036854775807 > 0",
    ] {
        let e = CompiledExpr::compile_bool(cel).unwrap();
        let r =
            Record::from_json_line(br#"{"path":"/x","method":"GET","response_code":200}"#).unwrap();
        assert!(!e.matches(&r), "{cel}");
        assert!(!e.matches(&Record::default()), "{cel}");
    }
}
