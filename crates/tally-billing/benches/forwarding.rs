//! Records forwarded per second and forwarding lag: 10k billing accounts
//! (one project each) × 4 meters × 1-minute windows, against the loopback
//! Amberflo test server; usage from an in-memory source, or (`ledger`) from
//! a real embedded ledger through `LedgerUsageSource`, as `tally serve`
//! reads it (`Ledger::query` per window, the meters' change feeds).
//!
//! `cargo bench -p tally-billing --bench forwarding [-- WINDOWS] [ledger]`
//! (`--profile dev` to skip a release build of the dependencies.)

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use rust_decimal::Decimal;
use serde_json::json;
use support::{TestServer, at, config, sink};
use tally_billing::{Forwarder, LedgerUsageSource, MemoryUsageSource, Provider, UsageSource};
use tally_delivery::Registry;
use tally_ledger::{ApplyMode, Ledger};
use tally_model::{Manifest, parse_event};
use tally_store_embedded::{EmbeddedLedger, StoreConfig};

const ACCOUNTS: usize = 10_000;
const METERS: [&str; 4] = ["requests", "bytes-in", "bytes-out", "duration"];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let windows: i64 = args.iter().find_map(|a| a.parse().ok()).unwrap_or(3);
    let from_ledger = args.iter().any(|a| a == "ledger");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(run(windows, from_ledger));
}

/// The bench's usage in memory.
fn memory_source(windows: i64) -> Arc<dyn UsageSource> {
    let source = Arc::new(MemoryUsageSource::new());
    let region = BTreeMap::from([("region".to_string(), "eu".to_string())]);
    for w in 0..windows {
        for p in 0..ACCOUNTS {
            for meter in METERS {
                let second = w * 60 + (p % 60) as i64;
                source.add(
                    meter,
                    &format!("p{p}"),
                    at(second),
                    region.clone(),
                    Decimal::from(p as i64 + 1),
                );
            }
        }
    }
    source
}

/// The same usage as events in an embedded ledger in `dir`.
async fn ledger_source(windows: i64, dir: &std::path::Path) -> Arc<dyn UsageSource> {
    let mut store = StoreConfig::new(dir.join("ledger"));
    store.max_lateness = jiff::SignedDuration::from_hours(24 * 365 * 30);
    store.dedupe_horizon = store.max_lateness;
    let ledger = EmbeddedLedger::open(store).expect("open the ledger");
    for meter in METERS {
        let yaml = format!(
            "apiVersion: billing.miloapis.com/v1alpha1\nkind: MeterDefinition\nmetadata: {{name: {meter}}}\n\
             spec: {{meterName: {meter}, phase: Published, measurement: {{aggregation: Sum, unit: '1', dimensions: [region]}}}}\n"
        );
        let manifest = Manifest::parse_documents(&yaml)
            .expect("manifest")
            .remove(0);
        ledger
            .apply(manifest, ApplyMode::Upsert)
            .await
            .expect("apply");
    }
    let filled = Instant::now();
    let mut batch = Vec::new();
    let mut n = 0u64;
    for w in 0..windows {
        for p in 0..ACCOUNTS {
            for meter in METERS {
                n += 1;
                let time = at(w * 60 + (p % 60) as i64);
                let event = json!({"specversion": "1.0", "id": n.to_string(), "source": "bench",
                    "type": meter, "subject": format!("projects/p{p}"), "time": time.to_string(),
                    "data": {"value": (p + 1).to_string(), "dimensions": {"region": "eu"}}});
                batch.push(parse_event(event, jiff::Timestamp::now()).expect("event"));
                if batch.len() == 5000 {
                    ledger
                        .ingest(std::mem::take(&mut batch))
                        .await
                        .expect("ingest");
                }
            }
        }
    }
    ledger.ingest(batch).await.expect("ingest");
    println!("ledger filled with {n} events in {:.2?}", filled.elapsed());

    Arc::new(LedgerUsageSource::new(Arc::new(ledger)))
}

async fn run(windows: i64, from_ledger: bool) {
    let server = TestServer::start(support::API_KEY).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let source = if from_ledger {
        ledger_source(windows, dir.path()).await
    } else {
        memory_source(windows)
    };
    let attribution = support::one_account_per_project(ACCOUNTS);
    let mut sink = sink(&server.url, Provider::Amberflo, 0);
    sink.batch_size = 500;
    let config = config(
        sink,
        support::meters(&METERS),
        dir.path().join("progress").as_path(),
    );
    let mut forwarder = Forwarder::start(config, source, attribution, &Registry::new())
        .await
        .expect("start");
    let label = format!(
        "{ACCOUNTS} accounts x {} meters{}",
        METERS.len(),
        if from_ledger { ", from the ledger" } else { "" }
    );
    support::measure(&mut forwarder, &server, windows, &label).await;
}
