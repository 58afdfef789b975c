//! A meter checked against real traffic: what its events look like, and
//! whether it is safe to publish.
//!
//! [`validate`] reads the events of a meter's type (already fetched by the
//! caller, who bounds how many: [`MAX_SCAN`]) and reports, exactly:
//! - the value distribution of the events whose value is a number: count,
//!   min, p50, p99, max (quantiles by **nearest rank**: the `q` quantile of
//!   `n` sorted values is the value of rank `⌈q·n⌉`, 1-based, so it is
//!   always one of the values), zeros, non-numeric and missing values;
//! - each dimension's cardinality, the events without it, and its top
//!   values ([`TOP_VALUES`], most frequent first, ties by value);
//! - `data.dimensions` keys the meter does not declare, and declared
//!   dimensions no event carries;
//! - required labels (of the meter's monitored resource types) missing;
//! - the events the meter would quarantine, by reason, with examples;
//! - unit warnings ([`unit_warnings`]: values that do not fit the unit);
//! - a [`Verdict`]: blocking reasons and advisory warnings.
//!
//! **Never:** I/O or a clock; the figures depend only on the events given.

use std::collections::{BTreeMap, BTreeSet};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tally_model::{CloudEvent, MeterPhase};

use crate::{CompiledMeter, decimal_from_json};

/// The most events a validation reads; a longer range is cut there and the
/// report says so (`capReached`).
pub const MAX_SCAN: usize = 100_000;
/// How many of a dimension's values the report names.
pub const TOP_VALUES: usize = 5;
/// How many example events each quarantine reason names.
pub const EXAMPLES: usize = 3;
/// How many undeclared dimension names the report names.
pub const MAX_UNDECLARED: usize = 20;

/// The server's answer to a validation: the range, the report, and what
/// the ledger already holds in quarantine for the meter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ValidationAnswer {
    pub from: jiff::Timestamp,
    pub to: jiff::Timestamp,
    #[serde(flatten)]
    pub report: ValidationReport,
    /// The ledger's quarantine for this meter (any event time), by reason.
    pub stored_quarantine: Vec<ReasonCount>,
    /// Whether the ledger holds more than were summed up.
    pub stored_quarantine_more: bool,
}

/// What the caller scanned, besides the events themselves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scan {
    /// The cap the scan was bounded by.
    pub cap: usize,
    /// Whether more events were in the range than the cap.
    pub cap_reached: bool,
    /// Voided events skipped (they count in no meter).
    pub voided: u64,
}

/// The report of [`validate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ValidationReport {
    pub meter: String,
    pub event_type: String,
    pub phase: MeterPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    pub events_seen: u64,
    pub events_voided: u64,
    pub scan_cap: u64,
    pub cap_reached: bool,
    /// `None` for a meter that reads no value (`COUNT` without a path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<ValueStats>,
    pub dimensions: Vec<DimensionStats>,
    /// `data.dimensions` keys not declared, most frequent first (at most
    /// [`MAX_UNDECLARED`]); `undeclaredDimensionNames` counts them all.
    pub undeclared_dimensions: Vec<Count>,
    pub undeclared_dimension_names: u64,
    pub declared_never_present: Vec<String>,
    /// `<resource type>/<label>` and the events lacking it.
    pub missing_labels: Vec<Count>,
    pub would_quarantine: Vec<ReasonCount>,
    pub unit_warnings: Vec<String>,
    pub verdict: Verdict,
}

/// The distribution of the numeric values. Decimals are exact, as text.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ValueStats {
    /// Events whose value is a number.
    pub count: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<String>,
    pub zeros: u64,
    /// A value is there but is not a number (or the path matches several nodes).
    pub non_numeric: u64,
    /// No value, or `null`.
    pub missing: u64,
}

/// One dimension of the meter as the events fill it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DimensionStats {
    pub name: String,
    /// Distinct values among the events scanned.
    pub cardinality: u64,
    /// Events without a value for it.
    pub absent: u64,
    pub top: Vec<Count>,
}

/// A name or value and how many events carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Count {
    pub name: String,
    pub events: u64,
}

/// Events the meter would quarantine for one reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonCount {
    pub reason: String,
    pub events: u64,
    /// Up to [`EXAMPLES`] `(event id, message)`.
    pub examples: Vec<Example>,
}

/// One quarantined event, named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    pub id: String,
    pub message: String,
}

/// Whether the meter may be published: `safeToPublish` iff `reasons` is empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Verdict {
    pub safe_to_publish: bool,
    /// What blocks publishing.
    pub reasons: Vec<String>,
    /// What is worth a look but does not block.
    pub warnings: Vec<String>,
}

/// Everything counted in one pass over the events.
#[derive(Default)]
struct Tally {
    seen: u64,
    numbers: Vec<Decimal>,
    stats: ValueStats,
    dims: Vec<(BTreeMap<String, u64>, u64)>,
    undeclared: BTreeMap<String, u64>,
    labels: BTreeMap<String, u64>,
    quarantine: BTreeMap<&'static str, (u64, Vec<Example>)>,
}

/// Validates `meter` against `events` (those of its type in the range, in
/// any order, voided ones already left out).
pub fn validate<'e>(
    meter: &CompiledMeter,
    events: impl IntoIterator<Item = &'e CloudEvent>,
    scan: Scan,
) -> ValidationReport {
    let mut tally = Tally {
        dims: vec![(BTreeMap::new(), 0); meter.dimensions().len()],
        ..Tally::default()
    };
    for event in events {
        count_event(meter, event, &mut tally);
    }
    report(meter, tally, scan)
}

fn count_event(meter: &CompiledMeter, event: &CloudEvent, t: &mut Tally) {
    t.seen += 1;
    let data = event.data.as_ref().unwrap_or(&Value::Null);
    match meter.value_node(data) {
        None => {}
        Some(Err(_)) => t.stats.non_numeric += 1,
        Some(Ok(None | Some(Value::Null))) => t.stats.missing += 1,
        Some(Ok(Some(node))) => match decimal_from_json(node) {
            Ok(d) => t.numbers.push(d),
            Err(_) => t.stats.non_numeric += 1,
        },
    }
    for ((values, absent), value) in t.dims.iter_mut().zip(meter.group_values(data)) {
        match value {
            Some(v) => *values.entry(v).or_default() += 1,
            None => *absent += 1,
        }
    }
    if let Some(Value::Object(keys)) = data.get("dimensions") {
        let declared: BTreeSet<&str> = meter.dimensions().collect();
        for key in keys.keys().filter(|k| !declared.contains(k.as_str())) {
            *t.undeclared.entry(key.clone()).or_default() += 1;
        }
    }
    for label in meter.missing_required_labels(data) {
        *t.labels.entry(label).or_default() += 1;
    }
    if let Err(why) = meter.sample_in_any_phase(event) {
        let (n, examples) = t.quarantine.entry(why.code()).or_default();
        *n += 1;
        if examples.len() < EXAMPLES {
            examples.push(Example {
                id: event.id.clone(),
                message: why.to_string(),
            });
        }
    }
}

fn report(meter: &CompiledMeter, mut t: Tally, scan: Scan) -> ValidationReport {
    let unit = meter.definition.measurement.unit.clone();
    let values = meter.definition.value_property().map(|_| {
        let mut stats = std::mem::take(&mut t.stats);
        distribution(&mut t.numbers, &mut stats);
        stats
    });
    let dimensions: Vec<DimensionStats> = meter
        .dimensions()
        .zip(&t.dims)
        .map(|(name, (values, absent))| DimensionStats {
            name: name.to_owned(),
            cardinality: values.len() as u64,
            absent: *absent,
            top: most_frequent(values, TOP_VALUES),
        })
        .collect();
    let declared_never_present = dimensions
        .iter()
        .filter(|d| d.cardinality == 0)
        .map(|d| d.name.clone())
        .collect();
    let unit_warnings = unit_warnings(unit.as_deref(), &t.numbers);
    let mut report = ValidationReport {
        meter: meter.key.clone(),
        event_type: meter.event_type().to_owned(),
        phase: meter.phase(),
        unit,
        events_seen: t.seen,
        events_voided: scan.voided,
        scan_cap: scan.cap as u64,
        cap_reached: scan.cap_reached,
        values,
        dimensions,
        undeclared_dimension_names: t.undeclared.len() as u64,
        undeclared_dimensions: most_frequent(&t.undeclared, MAX_UNDECLARED),
        declared_never_present,
        missing_labels: most_frequent(&t.labels, usize::MAX),
        would_quarantine: t
            .quarantine
            .into_iter()
            .map(|(reason, (events, examples))| ReasonCount {
                reason: reason.to_owned(),
                events,
                examples,
            })
            .collect(),
        unit_warnings,
        verdict: Verdict {
            safe_to_publish: false,
            reasons: Vec::new(),
            warnings: Vec::new(),
        },
    };
    report.verdict = verdict(&report, meter.definition.strict_dimensions());
    report
}

/// Fills min, quantiles, max and zeros from the numbers (sorted in place).
fn distribution(numbers: &mut [Decimal], stats: &mut ValueStats) {
    numbers.sort_unstable();
    let n = numbers.len();
    stats.count = n as u64;
    stats.zeros = numbers.iter().filter(|d| d.is_zero()).count() as u64;
    let text = |d: &Decimal| d.normalize().to_string();
    stats.min = numbers.first().map(text);
    stats.max = numbers.last().map(text);
    stats.p50 = nearest_rank(numbers, 50).map(text);
    stats.p99 = nearest_rank(numbers, 99).map(text);
}

/// The `percent` quantile of sorted values by nearest rank: rank
/// `⌈percent·n/100⌉` (at least 1), 1-based.
pub fn nearest_rank<T>(sorted: &[T], percent: usize) -> Option<&T> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let rank = (percent * n).div_ceil(100).max(1);
    sorted.get(rank - 1)
}

/// The `k` most frequent names, most frequent first, ties by name.
fn most_frequent(counts: &BTreeMap<String, u64>, k: usize) -> Vec<Count> {
    let mut all: Vec<Count> = counts
        .iter()
        .map(|(name, &events)| Count {
            name: name.clone(),
            events,
        })
        .collect();
    // Stable sort keeps the map's name order among equal counts.
    all.sort_by_key(|c| std::cmp::Reverse(c.events));
    all.truncate(k);
    all
}

/// Values that do not fit the meter's unit:
/// - seconds (`s`, `sec`, `second`, `seconds`): a value over a year
///   (31,536,000) looks like bytes or milliseconds;
/// - milliseconds (`ms`, `millisecond(s)`): a value over a year of them;
/// - bytes (`B`, `By`, `byte(s)`): a fractional value;
/// - percent (`%`, `percent`): a value outside 0–100;
/// - any unit: negative values.
pub fn unit_warnings(unit: Option<&str>, numbers: &[Decimal]) -> Vec<String> {
    let mut warnings = Vec::new();
    let year_s = Decimal::from(31_536_000u64);
    let count = |f: &dyn Fn(&Decimal) -> bool| numbers.iter().filter(|d| f(d)).count();
    let rule: Option<(usize, &str)> = match unit.map(str::trim) {
        Some("s" | "sec" | "second" | "seconds") => Some((
            count(&|d| *d > year_s),
            "exceed a year in seconds: they look like bytes or milliseconds",
        )),
        Some("ms" | "millisecond" | "milliseconds") => Some((
            count(&|d| *d > year_s * Decimal::from(1000)),
            "exceed a year in milliseconds: they look like bytes or microseconds",
        )),
        Some("B" | "By" | "byte" | "bytes") => Some((
            count(&|d| !d.fract().is_zero()),
            "are fractional: bytes come whole (is the unit really bytes?)",
        )),
        Some("%" | "percent") => Some((
            count(&|d| *d < Decimal::ZERO || *d > Decimal::from(100)),
            "lie outside 0–100",
        )),
        _ => None,
    };
    if let Some((n, what)) = rule.filter(|(n, _)| *n > 0) {
        warnings.push(format!("{n} of {} values {what}", numbers.len()));
    }
    let negative = count(&|d| d.is_sign_negative() && !d.is_zero());
    if negative > 0 {
        warnings.push(format!(
            "{negative} of {} values are negative",
            numbers.len()
        ));
    }
    warnings
}

/// Blocking reasons: no traffic, events the meter would quarantine, unit
/// warnings. Warnings: the cap was reached, dimensions never or wrongly
/// used, no unit, a meter already past Draft.
fn verdict(r: &ValidationReport, strict: bool) -> Verdict {
    let mut reasons = Vec::new();
    let mut warnings = Vec::new();
    if r.events_seen == 0 {
        reasons.push(format!(
            "no events of type {:?} in the range: nothing to validate against",
            r.event_type
        ));
    }
    if !r.would_quarantine.is_empty() {
        let by: Vec<String> = r
            .would_quarantine
            .iter()
            .map(|q| format!("{} ×{}", q.reason, q.events))
            .collect();
        let n: u64 = r.would_quarantine.iter().map(|q| q.events).sum();
        reasons.push(format!(
            "{n} of {} events would be quarantined ({})",
            r.events_seen,
            by.join(", ")
        ));
    }
    reasons.extend(r.unit_warnings.iter().cloned());
    if r.cap_reached {
        warnings.push(format!(
            "only the first {} events of the range were read",
            r.scan_cap
        ));
    }
    if !r.declared_never_present.is_empty() && r.events_seen > 0 {
        warnings.push(format!(
            "declared dimensions no event carries: {}",
            r.declared_never_present.join(", ")
        ));
    }
    if !r.undeclared_dimensions.is_empty() && !strict {
        let names: Vec<&str> = r
            .undeclared_dimensions
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        warnings.push(format!(
            "events carry dimensions the meter does not declare: {}",
            names.join(", ")
        ));
    }
    if r.unit.is_none() && r.values.is_some() {
        warnings.push("the meter declares no unit".into());
    }
    if r.phase != MeterPhase::Draft {
        warnings.push(format!("the meter is already {:?}", r.phase));
    }
    Verdict {
        safe_to_publish: reasons.is_empty(),
        reasons,
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;
    use serde_json::json;
    use tally_model::{MonitoredResourceType, parse_event};

    use super::*;

    fn meter(spec: Value) -> CompiledMeter {
        let def = crate::test_meter::definition(spec);
        let route: MonitoredResourceType = serde_json::from_value(json!({
            "resourceTypeName": "r/Route",
            "gvk": {"group": "r", "kind": "Route"},
            "labels": [{"name": "name", "required": true}]
        }))
        .unwrap();
        CompiledMeter::compile("m", &def, &[route]).unwrap()
    }

    fn seconds_meter() -> CompiledMeter {
        meter(
            json!({"meterName": "t", "measurement": {"aggregation": "SUM", "unit": "s",
            "dimensions": ["region", "zone"]}, "monitoredResourceTypes": ["r/Route"]}),
        )
    }

    fn event(i: usize, data: Value) -> CloudEvent {
        parse_event(
            json!({"specversion":"1.0","id":format!("e{i}"),"source":"s","type":"t","subject":"c","data":data}),
            "2026-01-01T00:00:00Z".parse().unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn clean_traffic_is_safe() {
        let events: Vec<_> = (1..=100)
            .map(|i| event(i, json!({"value": i, "dimensions": {"region": "eu", "zone": "a"}, "resource": {"name": "x"}})))
            .collect();
        let r = validate(&seconds_meter(), &events, Scan::default());
        let v = r.values.as_ref().unwrap();
        assert_eq!(
            (v.count, v.min.as_deref(), v.max.as_deref()),
            (100, Some("1"), Some("100"))
        );
        assert_eq!(
            (v.p50.as_deref(), v.p99.as_deref()),
            (Some("50"), Some("99"))
        );
        assert!(r.verdict.safe_to_publish, "{:?}", r.verdict);
        assert_eq!(
            r.dimensions[0].top,
            vec![Count {
                name: "eu".into(),
                events: 100
            }]
        );
    }

    #[test]
    fn bytes_on_a_seconds_meter_block_publishing() {
        let events: Vec<_> = (0..10)
            .map(|i| event(i, json!({"value": 1_073_741_824u64, "dimensions": {"region": "eu"}, "resource": {"name": "x"}})))
            .collect();
        let r = validate(&seconds_meter(), &events, Scan::default());
        assert!(!r.verdict.safe_to_publish);
        assert!(
            r.unit_warnings[0].contains("look like bytes"),
            "{:?}",
            r.unit_warnings
        );
        assert_eq!(r.declared_never_present, vec!["zone".to_owned()]);
    }

    #[test]
    fn no_traffic_is_not_safe_and_problems_are_named() {
        let r = validate(&seconds_meter(), &[], Scan::default());
        assert!(!r.verdict.safe_to_publish);
        let events = vec![
            event(1, json!({"value": "lots", "resource": {"name": "x"}})),
            event(
                2,
                json!({"value": 1, "dimensions": {"color": "red"}, "resource": {"name": "x"}}),
            ),
            event(3, json!({"value": 1})),
        ];
        let r = validate(&seconds_meter(), &events, Scan::default());
        let reasons: Vec<_> = r
            .would_quarantine
            .iter()
            .map(|q| (q.reason.as_str(), q.events))
            .collect();
        assert_eq!(
            reasons,
            vec![
                ("INVALID_VALUE", 1),
                ("MISSING_REQUIRED_LABEL", 1),
                ("UNDECLARED_DIMENSION", 1)
            ]
        );
        assert_eq!(r.would_quarantine[0].examples[0].id, "e1");
        assert_eq!(
            r.missing_labels,
            vec![Count {
                name: "r/Route/name".into(),
                events: 1
            }]
        );
        assert_eq!(r.values.unwrap().non_numeric, 1);
    }

    #[test]
    fn nearest_rank_is_a_value_of_the_set() {
        assert_eq!(nearest_rank::<u32>(&[], 50), None);
        assert_eq!(nearest_rank(&[7], 99), Some(&7));
        assert_eq!(nearest_rank(&[1, 2], 50), Some(&1));
        assert_eq!(nearest_rank(&[1, 2, 3], 50), Some(&2));
        assert_eq!(nearest_rank(&[1, 2, 3], 99), Some(&3));
    }

    /// What an event's data holds, drawn small so values and names repeat.
    fn data() -> impl Strategy<Value = Value> {
        let value = prop_oneof![
            (-3i64..50).prop_map(|n| json!(n)),
            Just(json!(0)),
            (0u32..20).prop_map(|n| json!(format!("{n}.5"))),
            Just(json!("many")),
            Just(json!(true)),
            Just(Value::Null),
            Just(json!({"nested": 1})),
        ];
        let dims = proptest::collection::btree_map(
            prop_oneof![Just("region"), Just("zone"), Just("color")],
            prop_oneof![
                Just(json!("eu")),
                Just(json!("us")),
                Just(json!(3)),
                Just(Value::Null)
            ],
            0..3,
        );
        (proptest::option::of(value), dims, any::<bool>()).prop_map(|(value, dims, named)| {
            let mut data = serde_json::Map::new();
            if let Some(v) = value {
                data.insert("value".into(), v);
            }
            data.insert("dimensions".into(), json!(dims));
            if named {
                data.insert("resource".into(), json!({"name": "x"}));
            }
            Value::Object(data)
        })
    }

    /// The naive model: each figure computed straight from the definitions.
    struct Reference {
        numbers: Vec<Decimal>,
        non_numeric: u64,
        missing: u64,
        cardinality: HashMap<&'static str, HashMap<String, u64>>,
        undeclared: HashMap<String, u64>,
        reasons: HashMap<&'static str, u64>,
        unlabelled: u64,
    }

    fn reference(datas: &[Value]) -> Reference {
        let mut r = Reference {
            numbers: vec![],
            non_numeric: 0,
            missing: 0,
            cardinality: HashMap::new(),
            undeclared: HashMap::new(),
            reasons: HashMap::new(),
            unlabelled: 0,
        };
        for d in datas {
            let number = match d.get("value") {
                None | Some(Value::Null) => {
                    r.missing += 1;
                    None
                }
                Some(Value::Number(n)) => Some(n.to_string().parse::<Decimal>().unwrap()),
                Some(Value::String(s)) => match s.parse::<Decimal>() {
                    Ok(x) => Some(x),
                    Err(_) => {
                        r.non_numeric += 1;
                        None
                    }
                },
                Some(_) => {
                    r.non_numeric += 1;
                    None
                }
            };
            if let Some(x) = number {
                r.numbers.push(x);
            }
            let dims = d["dimensions"].as_object().unwrap();
            for name in ["region", "zone"] {
                let set = r.cardinality.entry(name).or_default();
                match dims.get(name) {
                    Some(Value::String(s)) => *set.entry(s.clone()).or_default() += 1,
                    Some(Value::Number(n)) => *set.entry(n.to_string()).or_default() += 1,
                    _ => {}
                }
            }
            if dims.contains_key("color") {
                *r.undeclared.entry("color".into()).or_default() += 1;
            }
            let labelled = d.get("resource").is_some();
            r.unlabelled += u64::from(!labelled);
            // The order the meter checks in: labels, dimensions, value.
            let reason = if !labelled {
                Some("MISSING_REQUIRED_LABEL")
            } else if dims.contains_key("color") {
                Some("UNDECLARED_DIMENSION")
            } else if matches!(d.get("value"), None | Some(Value::Null)) {
                Some("MISSING_VALUE")
            } else if number.is_none() {
                Some("INVALID_VALUE")
            } else {
                None
            };
            if let Some(reason) = reason {
                *r.reasons.entry(reason).or_default() += 1;
            }
        }
        r.numbers.sort();
        r
    }

    /// The smallest value with at least `p`% of the values at or below it.
    fn quantile_by_definition(sorted: &[Decimal], p: u64) -> Option<String> {
        let n = sorted.len() as u64;
        sorted
            .iter()
            .find(|v| sorted.iter().filter(|x| x <= v).count() as u64 * 100 >= p * n)
            .map(|v| v.normalize().to_string())
    }

    proptest! {
        #[test]
        fn figures_match_the_naive_reference(datas in proptest::collection::vec(data(), 0..60)) {
            let events: Vec<_> = datas.iter().enumerate().map(|(i, d)| event(i, d.clone())).collect();
            let got = validate(&seconds_meter(), &events, Scan::default());
            let want = reference(&datas);
            let v = got.values.clone().unwrap();
            prop_assert_eq!(got.events_seen, datas.len() as u64);
            prop_assert_eq!(v.count, want.numbers.len() as u64);
            prop_assert_eq!(v.non_numeric, want.non_numeric);
            prop_assert_eq!(v.missing, want.missing);
            prop_assert_eq!(v.zeros, want.numbers.iter().filter(|d| d.is_zero()).count() as u64);
            prop_assert_eq!(v.min, want.numbers.first().map(|d| d.normalize().to_string()));
            prop_assert_eq!(v.max, want.numbers.last().map(|d| d.normalize().to_string()));
            prop_assert_eq!(v.p50, quantile_by_definition(&want.numbers, 50));
            prop_assert_eq!(v.p99, quantile_by_definition(&want.numbers, 99));
            for d in &got.dimensions {
                let counts = want.cardinality.get(d.name.as_str()).cloned().unwrap_or_default();
                prop_assert_eq!(d.cardinality, counts.len() as u64);
                prop_assert_eq!(d.absent, datas.len() as u64 - counts.values().sum::<u64>());
                let mut top: Vec<(String, u64)> = counts.into_iter().collect();
                top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                top.truncate(TOP_VALUES);
                let got_top: Vec<(String, u64)> = d.top.iter().map(|c| (c.name.clone(), c.events)).collect();
                prop_assert_eq!(got_top, top);
            }
            let undeclared: HashMap<String, u64> =
                got.undeclared_dimensions.iter().map(|c| (c.name.clone(), c.events)).collect();
            prop_assert_eq!(undeclared, want.undeclared);
            let reasons: HashMap<&str, u64> =
                got.would_quarantine.iter().map(|q| (q.reason.as_str(), q.events)).collect();
            let want_reasons: HashMap<&str, u64> = want.reasons.clone();
            prop_assert_eq!(reasons, want_reasons);
            let unlabelled: u64 = got.missing_labels.iter().map(|c| c.events).sum();
            prop_assert_eq!(unlabelled, want.unlabelled);
            prop_assert_eq!(got.verdict.safe_to_publish, !datas.is_empty() && want.reasons.is_empty()
                && !want.numbers.iter().any(|d| d.is_sign_negative() && !d.is_zero()));
        }
    }
}
