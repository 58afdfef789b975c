//! Lifecycle events per second: CloudEvent → validated `LifecycleEvent`
//! (one core), and durable appends to `LifecycleStore` (fsync per batch)
//! at several batch sizes; and `derive` over `Instance` status changes.
//!
//! `cargo bench -p tally-compute --bench lifecycle` (env `BENCH_EVENTS`,
//! default 200,000).

use std::time::Instant;

use tally_compute::lifecycle::{self, LifecycleEvent};
use tally_compute::{FleetMetrics, LifecycleStore};
use tally_model::{CloudEvent, Manifest};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const KINDS: [&str; 4] = ["scheduled", "started", "crashed", "stopped"];

fn cloud_event(n: usize) -> serde_json::Value {
    serde_json::json!({
        "specversion": "1.0", "id": format!("ev-{n}"), "source": "instance-controller",
        "type": format!("com.datumapis.compute.instance.{}", KINDS[n % KINDS.len()]),
        "subject": format!("i-{}", n % 10_000), "time": "2026-12-06T10:00:00Z",
        "data": {"project": format!("p-{}", n % 100), "instance": format!("i-{}", n % 10_000),
                 "workload": "web", "node": "node-7", "reason": "Available"},
    })
}

fn main() {
    let n = env_usize("BENCH_EVENTS", 200_000);
    let values: Vec<serde_json::Value> = (0..n).map(cloud_event).collect();
    let started = Instant::now();
    let events: Vec<LifecycleEvent> = values
        .into_iter()
        .map(|v| {
            let e: CloudEvent = serde_json::from_value(v).expect("a CloudEvent");
            lifecycle::from_cloud_event(&e).expect("valid")
        })
        .collect();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "parse+validate: {n} events in {secs:.3} s = {:.0} events/s",
        n as f64 / secs
    );

    for batch in [1usize, 100, 1000] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LifecycleStore::open(dir.path()).expect("open");
        let metrics = FleetMetrics::new();
        let take = if batch == 1 { n.min(2_000) } else { n };
        let started = Instant::now();
        for chunk in events[..take].chunks(batch) {
            let fresh = store.append(chunk).expect("append");
            for (e, f) in chunk.iter().zip(fresh) {
                if f {
                    metrics.observe(e);
                }
            }
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "append, batches of {batch:>4}: {take} events in {secs:.3} s = {:.0} events/s (fsync'd)",
            take as f64 / secs
        );
    }

    let instance = |i: usize, status: &str| -> Manifest {
        serde_json::from_str(&format!(
            r#"{{"apiVersion":"compute.datumapis.com/v1alpha1","kind":"Instance",
               "metadata":{{"name":"i-{i}","namespace":"ns","uid":"u{i}"}},"spec":{{}},
               "status":{{"conditions":[{{"type":"Available","status":"{status}","reason":"Available","lastTransitionTime":"2026-12-06T10:00:00Z"}}]}}}}"#
        ))
        .expect("manifest")
    };
    let pairs: Vec<(Manifest, Manifest)> = (0..n.min(100_000))
        .map(|i| (instance(i, "False"), instance(i, "True")))
        .collect();
    let now = jiff::Timestamp::UNIX_EPOCH;
    let started = Instant::now();
    let derived: usize = pairs
        .iter()
        .map(|(old, new)| lifecycle::derive(Some(old), new, "p", now).len())
        .sum();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "derive: {} status changes → {derived} events in {secs:.3} s = {:.0} changes/s",
        pairs.len(),
        pairs.len() as f64 / secs
    );
}
