//! Manifests as `POST /apis/apply`, `tally apply` and watched directories
//! read them: multi-document YAML or JSON (`Manifest::parse_documents`),
//! each document's kind, the catalog's or the resource store's validation
//! (`plan_apply`), and the runtime readers of what was accepted (exporters,
//! billing sinks, forwarded meters, the agent's enrichment index). Also
//! `POST /api/v1/meters` bodies (`OpenMeterMeter`).
//!
//! Deeply nested inputs are not skipped: `parse_documents` refuses text
//! nested deeper than `tally_model::nesting::MAX_MANIFEST_DEPTH` before the
//! YAML parser reads it.

use jiff::Timestamp;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Value, json};
use tally_fuzz::{Input, fuzz, inputs, json as arb, replay};
use tally_ledger::{ApplyMode, Catalog, ResourceSet};
use tally_model::{Kind, KindClass, Manifest, OpenMeterMeter};

const TARGET: &str = "manifests";

fn now() -> Timestamp {
    Timestamp::from_second(1_767_225_600).unwrap_or_default()
}

fn check(bytes: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(bytes);
    if let Ok(meter) = serde_json::from_str::<OpenMeterMeter>(&text) {
        check_manifest(meter.to_manifest())?;
    }
    match Manifest::parse_documents(&text) {
        Ok(manifests) => manifests.into_iter().try_for_each(check_manifest),
        Err(e) if e.to_string().is_empty() => Err("refused without a reason".into()),
        Err(_) => Ok(()),
    }
}

/// Validates one manifest as the server would; one that is accepted must
/// read back the same from its YAML and JSON forms (as `tally get -o yaml`
/// writes them) and be readable by the runtime.
fn check_manifest(manifest: Manifest) -> Result<(), String> {
    let Ok(kind) = manifest.typed_kind() else {
        return Ok(());
    };
    let stored = if kind.class() == KindClass::Catalog {
        let catalog = Catalog::load([]).map_err(|e| e.to_string())?;
        catalog
            .plan_apply(manifest, ApplyMode::Upsert, now())
            .map(|plan| plan.manifest)
    } else {
        let set = ResourceSet::load([]).map_err(|e| e.to_string())?;
        set.plan_apply(manifest, ApplyMode::Upsert, now())
            .map(|(manifest, _)| manifest)
    };
    let stored = match stored {
        Ok(stored) => stored,
        Err(e) if e.to_string().is_empty() => return Err("refused without a reason".into()),
        Err(_) => return Ok(()),
    };
    check_round_trip(&stored)?;
    run_readers(kind, &stored);
    Ok(())
}

fn check_round_trip(stored: &Manifest) -> Result<(), String> {
    let yaml = serde_norway::to_string(stored).map_err(|e| format!("to YAML: {e}"))?;
    let json = serde_json::to_string(stored).map_err(|e| format!("to JSON: {e}"))?;
    for (form, text) in [("YAML", yaml), ("JSON", json)] {
        match Manifest::parse_documents(&text) {
            Ok(again) if again.len() == 1 && again[0] == *stored => {}
            other => {
                return Err(format!(
                    "{stored:?} written as {form}\n{text}\nreads back as {other:?}"
                ));
            }
        }
    }
    Ok(())
}

/// What reads accepted manifests at run time; none may panic.
fn run_readers(kind: Kind, stored: &Manifest) {
    match kind {
        Kind::Exporter => {
            let _ = tally_telemetry::Exporter::from_manifest(stored);
        }
        Kind::BillingSink => {
            let _ = tally_billing::BillingSink::from_manifest(stored);
        }
        Kind::MeterDefinition => {
            let _ = tally_billing::ForwardedMeter::from_manifest(stored);
            if let Ok(meter) = tally_model::MeterDefinition::from_manifest(stored) {
                let _ = OpenMeterMeter::from_definition(&stored.metadata, &meter);
            }
        }
        Kind::GatewayClass | Kind::Gateway | Kind::HTTPRoute => {
            let _ = tally_collect::EnrichmentIndex::default().upsert(stored);
        }
        _ => {}
    }
    let _ = tally_telemetry::InMemoryResourceIndex::new().apply(stored);
    let set = ResourceSet::load([stored.clone()]);
    if let Ok(set) = set {
        let _ = set.shown(stored);
        let _ = set.attribution();
    }
}

const KINDS: &[(&str, &str)] = &[
    ("billing.miloapis.com/v1alpha1", "MeterDefinition"),
    ("billing.miloapis.com/v1alpha1", "MonitoredResourceType"),
    ("billing.miloapis.com/v1alpha1", "BillingAccount"),
    ("billing.miloapis.com/v1alpha1", "BillingAccountBinding"),
    ("billing.miloapis.com/v1alpha1", "BillingSink"),
    ("telemetry.datumapis.com/v1alpha1", "Exporter"),
    ("telemetry.datumapis.com/v1alpha1", "TelemetryPolicy"),
    ("v1", "Secret"),
    ("v1", "Namespace"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
    ("gateway.networking.k8s.io/v1", "Gateway"),
    ("v1", "List"),
];

/// A manifest of a known kind whose fields are mostly plausible.
fn manifest() -> BoxedStrategy<Value> {
    let names = &["a", "acme", "my-meter.v1", "-bad", "UPPER", "", "x_y"][..];
    (
        select(KINDS),
        arb::object(vec![
            ("name", arb::mostly(names)),
            (
                "namespace",
                arb::mostly(&["team-a", "tally-system", "Bad NS"]),
            ),
            ("uid", arb::mostly(&["cust-0001"])),
            ("labels", arb::value(2)),
        ]),
        spec(),
        arb::value(2),
    )
        .prop_map(|((api_version, kind), metadata, spec, other)| {
            json!({
                "apiVersion": api_version, "kind": kind, "metadata": metadata,
                "spec": spec, "status": other.clone(), "stringData": other.clone(),
                "items": [other],
            })
        })
        .boxed()
}

/// A spec with the fields of the kinds above, each perhaps odd.
fn spec() -> BoxedStrategy<Value> {
    arb::object(vec![
        ("meterName", arb::mostly(&["llm-tokens", "x"])),
        (
            "phase",
            arb::mostly(&["Draft", "Published", "Retired", "Gone"]),
        ),
        (
            "measurement",
            arb::object(vec![
                (
                    "aggregation",
                    arb::mostly(&["SUM", "COUNT", "UNIQUE_COUNT", "MAX"]),
                ),
                ("unit", arb::mostly(&["tokens", "By"])),
            ]),
        ),
        (
            "event",
            arb::object(vec![
                ("type", arb::mostly(&["prompt"])),
                (
                    "valueProperty",
                    arb::mostly(&["$.tokens", "$..x", "$[", "$.a[?@.b]"]),
                ),
                ("dimensions", arb::value(2)),
            ]),
        ),
        (
            "billingAccountRef",
            json!({"name": "acme-corp"}).into_strategy(),
        ),
        (
            "projectRef",
            arb::object(vec![("name", arb::mostly(&["acme"]))]),
        ),
        ("provider", arb::mostly(&["amberflo", "openmeter", "nope"])),
        (
            "endpoint",
            arb::mostly(&["https://app.amberflo.io", "http://[::1", "ftp://x"]),
        ),
        (
            "windowSize",
            arb::mostly(&["1m", "90s", "0m", "99999999999h", "-1m"]),
        ),
        ("allowedLateness", arb::mostly(&["5m", "1e9h"])),
        ("batchSize", arb::number()),
        ("startAt", arb::timestamp().prop_map(Value::String).boxed()),
        ("sources", arb::value(3)),
        ("sinks", arb::value(3)),
    ])
}

trait IntoStrategy {
    fn into_strategy(self) -> BoxedStrategy<Value>;
}

impl IntoStrategy for Value {
    fn into_strategy(self) -> BoxedStrategy<Value> {
        prop_oneof![4 => Just(self), 1 => arb::value(2)].boxed()
    }
}

fn text() -> BoxedStrategy<Input> {
    (proptest::collection::vec(manifest(), 1..4), any::<bool>())
        .prop_map(|(documents, as_json)| {
            let text = if as_json {
                serde_json::to_string(&Value::Array(documents)).unwrap_or_default()
            } else {
                documents
                    .iter()
                    .map(|d| serde_norway::to_string(d).unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join("---\n")
            };
            Input(text.into_bytes())
        })
        .boxed()
}

#[test]
fn fuzz_manifests() {
    fuzz(TARGET, || inputs(TARGET, text()), |input| check(input));
}

#[test]
fn corpus_manifests() {
    replay(TARGET, check);
}
