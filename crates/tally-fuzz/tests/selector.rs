//! MetricsQL series selectors as Exporter sources carry them
//! (`SeriesSelector::parse`, through `Exporter::from_manifest`), and the
//! `match[]` selectors a pull source sends VictoriaMetrics for them
//! (`export_matchers`), which must parse again and render the same.

use proptest::prelude::*;
use proptest::sample::select;
use serde_json::json;
use tally_fuzz::{Input, fuzz, inputs, replay};
use tally_model::{Manifest, ObjectMeta};
use tally_telemetry::pull::export_matchers;
use tally_telemetry::selector::SeriesSelector;
use tally_telemetry::{Exporter, InMemoryResourceIndex};

const TARGET: &str = "selector";
const OWN: &str = "namespace=\"ns-a\"";

fn exporter(metricsql: &str) -> Option<Exporter> {
    let manifest = Manifest {
        api_version: "telemetry.datumapis.com/v1alpha1".into(),
        kind: "Exporter".into(),
        metadata: ObjectMeta {
            name: "e".into(),
            namespace: Some("ns-a".into()),
            ..ObjectMeta::default()
        },
        spec: json!({
            "sources": [{"name": "s", "metrics": {"metricsql": metricsql}}],
            "sinks": [{"name": "k", "otlp_http": {"endpoint": "http://127.0.0.1:4318"}}],
        }),
        status: None,
        extra: Default::default(),
    };
    Exporter::from_manifest(&manifest).ok()
}

fn check(bytes: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(bytes);
    match SeriesSelector::parse(&text) {
        Err(e) if e.is_empty() => return Err("refused without a reason".into()),
        Err(_) => return Ok(()),
        Ok(_) => {}
    }
    if SeriesSelector::parse(&format!(" \n{text}\t ")).is_err() {
        return Err("accepted, but not with surrounding whitespace".into());
    }
    let Some(exporter) = exporter(&text) else {
        return Ok(());
    };
    let index = InMemoryResourceIndex::new();
    for rendered in export_matchers(&exporter, &index) {
        check_rendered(&rendered, &index)?;
    }
    Ok(())
}

/// A `match[]` selector parses, and renders the same with the exporter's
/// namespace matcher put in front once more.
fn check_rendered(rendered: &str, index: &InMemoryResourceIndex) -> Result<(), String> {
    // Rendering escapes quotes and adds the namespace matcher, so a selector
    // near the length limit renders past it: the limit bounds what a project
    // writes, and a rendering goes to VictoriaMetrics, not back through it.
    if rendered.len() > tally_telemetry::selector::MAX_SELECTOR_LEN {
        return Ok(());
    }
    let expected = rendered.replacen('{', &format!("{{{OWN}, "), 1);
    let again = exporter(rendered)
        .ok_or_else(|| format!("the match[] selector {rendered:?} is not a valid selector"))?;
    match export_matchers(&again, index).as_slice() {
        [one] if *one == expected => Ok(()),
        other => Err(format!(
            "{rendered:?} renders as {other:?}, not [{expected:?}]"
        )),
    }
}

const LABELS: &[&str] = &[
    "__name__",
    "namespace",
    "project",
    "resource_kind",
    "service_name",
    "code",
    "a_b",
    "é",
    "0bad",
    "",
    "or",
];
const OPS: &[&str] = &["=", "!=", "=~", "!~", "==", "~"];
const VALUES: &[&str] = &[
    "network_bytes_.*",
    "ns-a",
    "",
    "a\\\"b",
    "\\\\",
    "a\\nb",
    "\\u00e9",
    "\\x41",
    "é",
    "(unclosed",
    ".*",
    "a|b",
    "[[:alpha:]]",
    "\\p{L}+",
    "x{1000}{1000}",
];
const EXPRESSIONS: &[&str] = &[
    "rate(x[5m])",
    "sum by (a) (x)",
    "x offset 5m",
    "x @ 10",
    "1 + x",
    "(x)",
    "x[5m]",
    "x or y",
    "-x",
    "\"s\"",
    "42",
    "{}",
    "x{}",
    "{a=\"b\"} offset -1h",
];

fn selector() -> BoxedStrategy<Input> {
    let quote = select(&["\"", "'", "`"][..]);
    let matcher = (select(LABELS), select(OPS), quote, select(VALUES))
        .prop_map(|(l, op, q, v)| format!("{l}{op}{q}{v}{q}"));
    let group = proptest::collection::vec(matcher, 0..4).prop_map(|m| m.join(", "));
    let selector = (
        select(&["", "network_bytes_sent", "x:y", "1x"][..]),
        proptest::collection::vec(group, 1..3),
        select(&[",", ""][..]),
    )
        .prop_map(|(name, groups, trailing)| {
            format!("{name}{{{}{trailing}}}", groups.join(" or "))
        });
    prop_oneof![
        4 => selector,
        1 => select(EXPRESSIONS).prop_map(str::to_owned),
    ]
    .prop_map(|text| Input(text.into_bytes()))
    .boxed()
}

#[test]
fn fuzz_selector() {
    fuzz(TARGET, || inputs(TARGET, selector()), |input| check(input));
}

#[test]
fn corpus_selector() {
    replay(TARGET, check);
}
