//! Compute lifecycle input as `POST /api/v1/instances/events` reads it (a
//! CloudEvents batch, each event read by `lifecycle::from_cloud_event`),
//! and `Instance` manifests whose status `lifecycle::derive` reads.
//! Whatever comes in, nothing panics; an accepted event names a project and
//! an instance that are Kubernetes names and stays within its bounds, and a
//! refusal says why with a known code.

use jiff::Timestamp;
use proptest::prelude::*;
use serde_json::Value;
use tally_compute::lifecycle::{self, LifecycleEvent, LifecycleKind};
use tally_fuzz::{Input, fuzz, inputs, json, replay};
use tally_model::{Manifest, error_code, parse_event, split_batch};

const TARGET: &str = "compute_lifecycle";

fn now() -> Timestamp {
    Timestamp::from_second(1_767_225_600).unwrap_or_default()
}

fn bounded(e: &LifecycleEvent) -> Result<(), String> {
    let names = [
        Some(&e.project),
        Some(&e.instance),
        e.namespace.as_ref(),
        e.workload.as_ref(),
        e.node.as_ref(),
    ];
    if names.iter().flatten().any(|n| !lifecycle::is_name(n)) {
        return Err(format!("a name that is not a Kubernetes name: {e:?}"));
    }
    if e.message
        .as_ref()
        .is_some_and(|m| m.len() > lifecycle::MAX_MESSAGE_BYTES)
        || e.uid
            .as_ref()
            .is_some_and(|u| u.len() > lifecycle::MAX_UID_BYTES)
    {
        return Err(format!("out of bounds: {e:?}"));
    }
    Ok(())
}

fn check_event(value: Value) -> Result<(), String> {
    let Ok(event) = parse_event(value, now()) else {
        return Ok(());
    };
    match lifecycle::from_cloud_event(&event) {
        Ok(l) => {
            if LifecycleKind::from_event_type(&event.kind) != Some(l.kind) {
                return Err(format!("{:?} read as {:?}", event.kind, l.kind));
            }
            bounded(&l)
        }
        Err(errors) if errors.is_empty() => Err("refused without a reason".into()),
        Err(errors) => errors
            .iter()
            .find(|e| {
                ![
                    error_code::INVALID_VALUE,
                    error_code::MISSING_REQUIRED_FIELD,
                    error_code::VALUE_TOO_LONG,
                ]
                .contains(&e.code.as_str())
            })
            .map_or(Ok(()), |e| Err(format!("unknown code: {e:?}"))),
    }
}

fn check_instance(value: &Value) -> Result<(), String> {
    let Ok(manifest) = serde_json::from_value::<Manifest>(value.clone()) else {
        return Ok(());
    };
    let fresh = lifecycle::derive(None, &manifest, "acme", now());
    let again = lifecycle::derive(Some(&manifest), &manifest, "acme", now());
    if !again.is_empty() {
        return Err(format!("an unchanged status implies {again:?}"));
    }
    fresh.iter().try_for_each(bounded)
}

fn check(body: &[u8]) -> Result<(), String> {
    let Ok(values) = split_batch("application/cloudevents-batch+json", body) else {
        return Ok(());
    };
    for value in values {
        check_instance(&value)?;
        check_event(value)?;
    }
    Ok(())
}

fn shaped() -> BoxedStrategy<Input> {
    use json::{mostly, object, timestamp, value};
    let data = object(vec![
        ("project", mostly(&["acme", "Acme", "a.b-c", ""])),
        ("instance", mostly(&["web-0", "-x", "web/0"])),
        ("namespace", mostly(&["acme-prod"])),
        (
            "reason",
            mostly(&["Available", "InstanceCrashing", "Bored"]),
        ),
        ("message", value(1)),
        ("uid", value(1)),
    ]);
    object(vec![
        ("specversion", mostly(&["1.0"])),
        ("id", mostly(&["e-1"])),
        ("source", mostly(&["instance-controller"])),
        (
            "type",
            mostly(&[
                "com.datumapis.compute.instance.started",
                "com.datumapis.compute.instance.oom_killed",
                "x",
            ]),
        ),
        ("subject", mostly(&["web-0"])),
        ("time", timestamp().prop_map(Value::String).boxed()),
        ("data", data),
    ])
    .prop_map(|e| Input(serde_json::to_vec(&Value::Array(vec![e])).unwrap_or_default()))
    .boxed()
}

#[test]
fn fuzz_compute_lifecycle() {
    fuzz(TARGET, || inputs(TARGET, shaped()), |body| check(&body.0));
}

#[test]
fn corpus_compute_lifecycle() {
    replay(TARGET, check);
}
