//! CEL expressions as TelemetryPolicy matches, dimensions and tags carry
//! them: `CompiledExpr::compile` (bounds, the `cel` parser, Tally's type
//! checker) and evaluation against access-log records. An expression is
//! refused with a reason, or accepted within every bound; an accepted one
//! compiles the same again and evaluates on any record, complete or empty,
//! without failing (a value or no value, a match or not).

use proptest::prelude::*;
use proptest::sample::select;
use tally_fuzz::{Input, fuzz, inputs, replay};
use tally_policy::check::MAX_COST;
use tally_policy::expr::MAX_EXPRESSION_BYTES;
use tally_policy::{CompiledExpr, Record};

const TARGET: &str = "cel";

const RECORDS: &[&str] = &[
    r#"{"start_time":"2026-03-01T10:00:01Z","method":"POST","path":"/v1/chat","response_code":"503","duration":40,"bytes_received":"128","route_name":"httproute/shop/web/rule/1","project_name":"shop","x-tenant-id":"acme","gen_ai.usage.input_tokens":12,"gen_ai.request.model":"gpt-4o"}"#,
    r#"{"method":"GET","response_code":-1,"duration":9223372036854775807,"path":""}"#,
    "{}",
];

fn check(bytes: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(bytes);
    let compiled = match CompiledExpr::compile(&text) {
        Err(reason) if reason.is_empty() => return Err("refused without a reason".into()),
        Err(_) => return Ok(()),
        Ok(c) => c,
    };
    if text.len() > MAX_EXPRESSION_BYTES {
        return Err(format!("accepted {} bytes", text.len()));
    }
    if compiled.cost() > MAX_COST {
        return Err(format!("accepted a cost of {}", compiled.cost()));
    }
    let again =
        CompiledExpr::compile(&text).map_err(|e| format!("compiles once, not twice: {e}"))?;
    if again.ty() != compiled.ty() {
        return Err("two compilations disagree on the type".into());
    }
    for line in RECORDS {
        let record = Record::from_json_line(line.as_bytes()).map_err(|e| e.to_string())?;
        let value = compiled.eval(&record);
        if compiled.matches(&record) && !matches!(value, Some(cel::Value::Bool(true))) {
            return Err("matches without being true".into());
        }
        let _ = compiled.render(&record);
    }
    Ok(())
}

const ATOMS: &[&str] = &[
    "response.code",
    "request.duration",
    "request.path",
    "request.method",
    "request.headers['x-tenant-id']",
    "request.headers",
    "request.time",
    "gen_ai.usage.input_tokens",
    "gen_ai.request.model",
    "route.rule",
    "project",
    "source.port",
    "connection.id",
    "duration('2s')",
    "timestamp('2026-01-01T00:00:00Z')",
    "500",
    "2u",
    "1.5",
    "'gpt'",
    "b'x'",
    "true",
    "null",
    "[1, 'a']",
    "{'k': 1}",
    "request",
    "gen_ai.usage",
    "nope",
];
const BINARY: &[&str] = &[
    " >= ", " < ", " == ", " != ", " + ", " - ", " * ", " / ", " % ", " && ", " || ", " in ",
];
const CALLS: &[&str] = &[
    "size",
    "int",
    "uint",
    "double",
    "string",
    "duration",
    "timestamp",
    "has",
    "lowerAscii",
];
const METHODS: &[&str] = &[
    ".startsWith('a')",
    ".contains('/')",
    ".matches('^a+$')",
    ".size()",
    ".endsWith(1)",
];

fn expression() -> BoxedStrategy<Input> {
    let atom = select(ATOMS).prop_map(str::to_owned);
    let expr = atom.prop_recursive(5, 48, 3, |inner| {
        prop_oneof![
            (inner.clone(), select(BINARY), inner.clone())
                .prop_map(|(a, op, b)| format!("{a}{op}{b}")),
            inner.clone().prop_map(|a| format!("!({a})")),
            inner.clone().prop_map(|a| format!("({a})")),
            (select(CALLS), inner.clone()).prop_map(|(f, a)| format!("{f}({a})")),
            (inner.clone(), select(METHODS)).prop_map(|(a, m)| format!("{a}{m}")),
            (inner.clone(), inner.clone(), inner).prop_map(|(c, a, b)| format!("{c} ? {a} : {b}")),
        ]
    });
    expr.prop_map(|text| Input(text.into_bytes())).boxed()
}

#[test]
fn fuzz_cel() {
    fuzz(
        TARGET,
        || inputs(TARGET, expression()),
        |input| check(input),
    );
}

#[test]
fn corpus_cel() {
    replay(TARGET, check);
}
