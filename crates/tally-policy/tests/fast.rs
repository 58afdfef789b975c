//! The native evaluator against the reference, the `cel` interpreter:
//! random expressions over comparisons of attributes, headers and literals
//! (types matching or not, attributes present or not), joined by `&&`,
//! `||` and `!`, on random records. Every expression the native evaluator
//! takes must match exactly the records the interpreter matches.

use proptest::prelude::*;
use tally_policy::{CompiledExpr, Field, Record};

/// One side of a comparison, with its type's name.
fn operand() -> impl Strategy<Value = (&'static str, String)> {
    prop_oneof![
        Just(("int", "response.code".to_owned())),
        Just(("int", "request.size".to_owned())),
        (-5i64..600).prop_map(|i| ("int", i.to_string())),
        Just(("string", "request.method".to_owned())),
        Just(("string", "request.headers['x-tenant-id']".to_owned())),
        Just(("string", "request.headers['X-Tenant-Id']".to_owned())),
        Just(("string", "response.flags".to_owned())),
        prop::sample::select(vec!["'GET'", "'POST'", "'acme'", "''", "'UH'"])
            .prop_map(|s| ("string", s.to_owned())),
        Just(("duration", "request.duration".to_owned())),
        prop::sample::select(vec![
            "duration('1s')",
            "duration('2500ms')",
            "duration('0s')"
        ])
        .prop_map(|s| ("duration", s.to_owned())),
        Just(("timestamp", "request.time".to_owned())),
        Just(("timestamp", "timestamp('2026-03-01T10:00:05Z')".to_owned())),
        Just(("uint", "connection.id".to_owned())),
        (0u64..10).prop_map(|u| ("uint", format!("{u}u"))),
        Just(("bool", "connection.mtls".to_owned())),
        prop::bool::ANY.prop_map(|b| ("bool", b.to_string())),
    ]
}

/// A comparison; mostly of one type (most others do not compile).
fn comparison() -> impl Strategy<Value = String> {
    let ops = prop::sample::select(vec!["==", "!=", "<", "<=", ">", ">="]);
    (operand(), operand(), ops, operand()).prop_map(|(l, r, op, other)| {
        let r = if l.0 == r.0 || l.0 == other.0 {
            if l.0 == r.0 { r } else { other }
        } else {
            r
        };
        format!("{} {op} {}", l.1, r.1)
    })
}

fn expression() -> impl Strategy<Value = String> {
    comparison().prop_recursive(3, 12, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) && ({b})")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) || ({b})")),
            inner.prop_map(|a| format!("!({a})")),
        ]
    })
}

/// A record with each attribute present or not.
fn record() -> impl Strategy<Value = Record<'static>> {
    (
        prop::option::of(prop::sample::select(vec![200i64, 404, 500, 503])),
        prop::option::of(0i64..1000),
        prop::option::of(prop::sample::select(vec!["GET", "POST", "DELETE"])),
        prop::option::of(prop::sample::select(vec!["acme", "globex", ""])),
        prop::option::of(prop::sample::select(vec!["UH", "-", "UF"])),
        prop::option::of(0i64..4000),
        prop::option::of(prop::sample::select(vec![
            "2026-03-01T10:00:00Z",
            "2026-03-01T10:00:05Z",
            "2026-03-01T10:00:09Z",
        ])),
        prop::option::of(0i64..10),
        prop::option::of(prop::bool::ANY),
    )
        .prop_map(
            |(code, size, method, tenant, flags, ms, time, conn, mtls)| {
                let mut fields: Vec<(&str, Field<'_>)> = Vec::new();
                if let Some(c) = code {
                    fields.push(("response_code", Field::Int(c)));
                }
                if let Some(s) = size {
                    fields.push(("bytes_received", Field::Int(s)));
                }
                if let Some(m) = method {
                    fields.push(("method", Field::Str(m)));
                }
                if let Some(t) = tenant {
                    fields.push(("x-tenant-id", Field::Str(t)));
                }
                if let Some(f) = flags {
                    fields.push(("response_flags", Field::Str(f)));
                }
                if let Some(ms) = ms {
                    fields.push(("duration", Field::Int(ms)));
                }
                if let Some(t) = time {
                    fields.push(("start_time", Field::Str(t)));
                }
                if let Some(c) = conn {
                    fields.push(("connection_id", Field::Int(c)));
                }
                if let Some(b) = mtls {
                    fields.push(("downstream_peer_cert_presented", Field::Bool(b)));
                }
                Record::from_fields(fields).into_owned()
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_native_evaluator_matches_what_the_interpreter_matches(
        source in expression(),
        records in prop::collection::vec(record(), 16),
    ) {
        let Ok(expr) = CompiledExpr::compile_bool(&source) else {
            return Ok(());
        };
        // Mixed numeric types compile but are left to the interpreter.
        for record in records.iter().filter(|_| expr.is_fast()) {
            prop_assert_eq!(
                expr.fast_matches(record),
                Some(expr.interpreted_matches(record)),
                "{} on {:?}", source, record
            );
        }
    }
}

#[test]
fn other_shapes_are_left_to_the_interpreter() {
    for source in [
        "has(gen_ai.usage.input_tokens)",
        "request.path.startsWith('/v1')",
        "response.code in [500, 503]",
        "request.size + 1 > 10",
        "request.path.matches('^/v1/(chat|messages)')",
    ] {
        let expr = CompiledExpr::compile_bool(source).unwrap();
        assert!(!expr.is_fast(), "{source}");
    }
    for source in [
        "response.code >= 500 || request.duration > duration('2s')",
        "request.headers['x-tenant-id'] == 'acme' && request.method == 'DELETE'",
        "!(route.httproute == 'llm')",
    ] {
        let expr = CompiledExpr::compile_bool(source).unwrap();
        assert!(expr.is_fast(), "{source}");
    }
}
