//! A meter's JSONPaths as `MeterDefinition`s carry them (`valueProperty`,
//! `event.dimensions`, declared `measurement.dimensions`), compiled
//! (`CompiledMeter::compile`) and evaluated on event data
//! (`CompiledMeter::sample`), and the sample folded into an aggregation
//! state as the ledger does (`AggState`). Corpus entries are paths, and
//! also names of declared dimensions.

use jiff::Timestamp;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Value, json};
use tally_fuzz::{Input, fuzz, inputs, json as arb, replay};
use tally_meter::{AggState, CompiledMeter, SampleValue};
use tally_model::{Aggregation, Manifest, MeterDefinition, ObjectMeta, parse_event};

const TARGET: &str = "jsonpath";
const AGGREGATIONS: [&str; 7] = [
    "SUM",
    "COUNT",
    "UNIQUE_COUNT",
    "AVG",
    "MIN",
    "MAX",
    "LATEST",
];

/// What a case evaluates besides its path: the aggregation, an event's
/// `data`, and the name of a declared dimension.
#[derive(Debug, Clone)]
struct Params {
    aggregation: &'static str,
    data: Value,
    dimension: String,
}

fn meter(aggregation: &str, path: &str, dimension: &str) -> Option<MeterDefinition> {
    let manifest = Manifest {
        api_version: "billing.miloapis.com/v1alpha1".into(),
        kind: "MeterDefinition".into(),
        metadata: ObjectMeta {
            name: "m".into(),
            ..ObjectMeta::default()
        },
        spec: json!({
            "meterName": "m",
            "measurement": {"aggregation": aggregation, "dimensions": [dimension]},
            "event": {"type": "t", "valueProperty": path, "dimensions": {"by_path": path}},
        }),
        status: None,
        extra: Default::default(),
    };
    MeterDefinition::from_manifest(&manifest).ok()
}

fn check(params: &Params, path: &[u8]) -> Result<(), String> {
    let path = String::from_utf8_lossy(path);
    let Some(definition) = meter(params.aggregation, &path, &params.dimension) else {
        return Ok(());
    };
    let meter = match CompiledMeter::compile("m", &definition, &[]) {
        Ok(meter) => meter,
        Err(e) if e.is_empty() => return Err("refused without a reason".into()),
        Err(_) => return Ok(()),
    };
    let event = json!({
        "specversion": "1.0", "id": "e", "source": "s", "type": "t", "subject": "c",
        "data": params.data,
    });
    let Ok(event) = parse_event(event, Timestamp::UNIX_EPOCH) else {
        return Ok(());
    };
    match meter.sample(&event) {
        Ok(sample) => check_sample(&meter, definition.measurement.aggregation, &sample),
        Err(u) if u.code().is_empty() || u.to_string().is_empty() => {
            Err(format!("an unmeterable reason without code or text: {u:?}"))
        }
        Err(_) => Ok(()),
    }
}

fn check_sample(
    meter: &CompiledMeter,
    aggregation: Aggregation,
    sample: &tally_meter::Sample,
) -> Result<(), String> {
    if sample.groups.len() != meter.dimensions().len() {
        return Err(format!("{sample:?}: one group per dimension expected"));
    }
    let fits = matches!(
        (aggregation, &sample.value),
        (Aggregation::Count, SampleValue::None)
            | (Aggregation::UniqueCount, SampleValue::Text(_))
            | (_, SampleValue::Number(_))
    );
    let state = AggState::of_sample(aggregation, &sample.value, 0, 0);
    let Some(mut state) = state.filter(|_| fits) else {
        return Err(format!("{aggregation:?} cannot fold {sample:?}"));
    };
    let bytes = state.to_bytes();
    match AggState::decode(&bytes) {
        Ok(decoded) if decoded == state => {}
        other => return Err(format!("{state:?} decodes as {other:?}")),
    }
    let copy = state.clone();
    // Twice the largest value overflows; that must be an error, not a panic.
    let _ = state.merge(&copy);
    let _ = state.result();
    Ok(())
}

/// A dimension declared by name reads `data.dimensions[name]`, whatever
/// the name.
fn check_declared(params: &Params) -> Result<(), String> {
    let name = &params.dimension;
    if name == "by_path" {
        return Ok(());
    }
    let Some(definition) = meter("COUNT", "$.n", name) else {
        return Ok(());
    };
    let Ok(meter) = CompiledMeter::compile("m", &definition, &[]) else {
        return Err(format!(
            "a meter declaring dimension {name:?} does not compile"
        ));
    };
    let event = json!({
        "specversion": "1.0", "id": "e", "source": "s", "type": "t", "subject": "c",
        "data": {"dimensions": {name.as_str(): "v"}, "n": 1},
    });
    let event = parse_event(event, Timestamp::UNIX_EPOCH).map_err(|e| format!("{e:?}"))?;
    let sample = meter.sample(&event).map_err(|e| e.to_string())?;
    let at = meter.dimensions().position(|d| d == name);
    match at.map(|i| &sample.groups[i]) {
        Some(Some(v)) if v == "v" => Ok(()),
        other => Err(format!("dimension {name:?} reads {other:?}")),
    }
}

fn path() -> BoxedStrategy<Input> {
    let segment = prop_oneof![
        select(
            &[
                ".tokens",
                ".model",
                "..*",
                "[*]",
                "[0]",
                "[-1]",
                "['a b']",
                "[\"q\"]",
                ".value",
                "[1:3:2]",
                "[?@.x > 1]",
                "[?length(@) == 2]",
                "[?match(@.m, 'a.*')]",
                "['\\u00e9']",
                ".dimensions"
            ][..]
        )
        .prop_map(str::to_owned),
        "[a-z]{1,4}".prop_map(|s| format!(".{s}")),
    ];
    proptest::collection::vec(segment, 0..5)
        .prop_map(|segments| Input(format!("${}", segments.concat()).into_bytes()))
        .boxed()
}

fn params() -> BoxedStrategy<Params> {
    let data = prop_oneof![
        2 => arb::object(vec![
            ("tokens", arb::number()),
            ("value", arb::mostly(&["12.5", "1e-28", "79228162514264337593543950335", "-0", "1e400", "NaN", " 7 "])),
            ("model", arb::scalar()),
            ("dimensions", arb::value(2)),
            ("m", arb::value(3)),
        ]),
        1 => arb::value(4),
    ];
    let names = &[
        "model",
        "a'b",
        "a\\",
        "a\\'b",
        "'",
        "\\",
        "é",
        "with space",
        "$",
        "*",
        "]",
    ][..];
    let dimension = prop_oneof![
        3 => select(names).prop_map(str::to_owned),
        1 => arb::string(),
    ];
    (select(&AGGREGATIONS[..]), data, dimension)
        .prop_map(|(aggregation, data, dimension)| Params {
            aggregation,
            data,
            dimension,
        })
        .boxed()
}

#[test]
fn fuzz_jsonpath() {
    fuzz(
        TARGET,
        || (params(), inputs(TARGET, path())),
        |(params, path)| {
            check_declared(params)?;
            check(params, path)
        },
    );
}

#[test]
fn corpus_jsonpath() {
    let data = json!({"tokens": 10, "model": "small", "value": "79228162514264337593543950335",
        "dimensions": {"region": "eu", "a'b": 1}, "m": [{"x": 2, "m": "abc"}, {"x": 0}]});
    replay(TARGET, |text| {
        // Each entry is tried as a path, and as the name of a dimension.
        let dimension = String::from_utf8_lossy(text).into_owned();
        check_declared(&Params {
            aggregation: "COUNT",
            data: Value::Null,
            dimension,
        })?;
        AGGREGATIONS.iter().try_for_each(|aggregation| {
            let params = Params {
                aggregation,
                data: data.clone(),
                dimension: "region".into(),
            };
            check(&params, text)
        })
    });
}
