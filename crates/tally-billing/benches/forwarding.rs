//! Records forwarded per second and forwarding lag: 10k billing accounts
//! (one project each) × 4 meters × 1-minute windows, against the loopback
//! Amberflo test server; usage from an in-memory source, or (`ledger`) from
//! a real embedded ledger through `LedgerUsageSource`, as `tally serve`
//! reads it (`Ledger::query` per window, the meters' change feeds).
//!
//! `cargo bench -p tally-billing --bench forwarding [-- WINDOWS] [ledger]`
//! (`--profile dev` to skip a release build of the dependencies.)
//!
//! `-- cost MINUTES`: what forwarding costs in records (every record is a
//! billed meter event at the provider). Two hours of gateway-like usage
//! (300 projects × 4 meters × 3 events a minute, 432,000 events) in a real
//! embedded ledger, forwarded in MINUTES-long windows; then 1 % of that
//! again as late events into windows already sent, forwarded by one more
//! pass. Prints events read, records acknowledged, corrections, and
//! records per event.

use tally_billing::testing as support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use rust_decimal::Decimal;
use serde_json::json;
use support::{TestServer, at, config, sink};
use tally_billing::{Forwarder, LedgerUsageSource, MemoryUsageSource, Provider, UsageSource};
use tally_delivery::Registry;
use tally_ledger::{ApplyMode, Ledger};
use tally_model::CloudEvent;
use tally_model::{Manifest, parse_event};
use tally_store_embedded::{EmbeddedLedger, StoreConfig};

const ACCOUNTS: usize = 10_000;
const METERS: [&str; 4] = ["requests", "bytes-in", "bytes-out", "duration"];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number: Option<i64> = args.iter().find_map(|a| a.parse().ok());
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    if args.iter().any(|a| a == "cost") {
        runtime.block_on(cost(number.unwrap_or(60)));
        return;
    }
    let from_ledger = args.iter().any(|a| a == "ledger");
    runtime.block_on(run(number.unwrap_or(3), from_ledger));
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

/// An embedded ledger in `dir` with the bench's meters.
async fn open_ledger(dir: &std::path::Path) -> Arc<EmbeddedLedger> {
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
    Arc::new(ledger)
}

fn event(id: u64, meter: &str, project: usize, time: jiff::Timestamp, value: u64) -> CloudEvent {
    let event = json!({"specversion": "1.0", "id": id.to_string(), "source": "bench",
        "type": meter, "subject": format!("projects/p{project}"), "time": time.to_string(),
        "data": {"value": value.to_string(), "dimensions": {"region": "eu"}}});
    parse_event(event, jiff::Timestamp::now()).expect("event")
}

/// Ingests `events` in batches of 5,000.
async fn ingest(ledger: &EmbeddedLedger, events: impl Iterator<Item = CloudEvent>) {
    let mut batch = Vec::new();
    for event in events {
        batch.push(event);
        if batch.len() == 5000 {
            ledger
                .ingest(std::mem::take(&mut batch))
                .await
                .expect("ingest");
        }
    }
    ledger.ingest(batch).await.expect("ingest");
}

/// The same usage as events in an embedded ledger in `dir`.
async fn ledger_source(windows: i64, dir: &std::path::Path) -> Arc<dyn UsageSource> {
    let ledger = open_ledger(dir).await;
    let filled = Instant::now();
    let mut batch = Vec::new();
    let mut n = 0u64;
    for w in 0..windows {
        for p in 0..ACCOUNTS {
            for meter in METERS {
                n += 1;
                let time = at(w * 60 + (p % 60) as i64);
                batch.push(event(n, meter, p, time, p as u64 + 1));
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

    Arc::new(LedgerUsageSource::new(ledger))
}

/// See the module docs (`-- cost MINUTES`).
async fn cost(window_minutes: i64) {
    const PROJECTS: usize = 300;
    const MINUTES: i64 = 120;
    const PER_MINUTE: i64 = 3;
    let server = TestServer::start(support::API_KEY).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = open_ledger(dir.path()).await;
    let mut id = 0u64;
    let mut next = || {
        id += 1;
        id
    };
    let started = Instant::now();
    let mut usage = Vec::new();
    for minute in 0..MINUTES {
        for p in 0..PROJECTS {
            for (m, meter) in METERS.iter().enumerate() {
                for k in 0..PER_MINUTE {
                    let second = minute * 60 + (p as i64 * 7 + k * 13 + m as i64) % 60;
                    usage.push(event(next(), meter, p, at(second), (p as u64 % 9) + 1));
                }
            }
        }
    }
    let events = usage.len();
    ingest(&ledger, usage.into_iter()).await;
    println!("{events} events ingested in {:.2?}", started.elapsed());
    let source: Arc<dyn UsageSource> = Arc::new(LedgerUsageSource::new(ledger.clone()));
    let mut sink = sink(&server.url, Provider::Amberflo, 0);
    sink.window = std::time::Duration::from_secs(window_minutes as u64 * 60);
    sink.batch_size = 500;
    let config = config(
        sink,
        support::meters(&METERS),
        dir.path().join("progress").as_path(),
    );
    let attribution = support::one_account_per_project(PROJECTS);
    let mut forwarder = Forwarder::start(config, source, attribution, &Registry::new())
        .await
        .expect("start");
    let forwarding = Instant::now();
    forwarder.run_once(at(MINUTES * 60)).await.expect("pass");
    assert!(
        forwarder
            .wait_idle(std::time::Duration::from_secs(600))
            .await
            .expect("idle")
    );
    let first = forwarding.elapsed();
    // 1 % late: into windows already sent, spread over projects and meters.
    let late: Vec<CloudEvent> = (0..events / 100)
        .map(|i| {
            let second = (i as i64 * 97) % (MINUTES * 60);
            event(next(), METERS[i % 4], (i * 31) % PROJECTS, at(second), 1)
        })
        .collect();
    let late_events = late.len();
    ingest(&ledger, late.into_iter()).await;
    forwarder
        .run_once(at(MINUTES * 60 + 1))
        .await
        .expect("pass");
    assert!(
        forwarder
            .wait_idle(std::time::Duration::from_secs(600))
            .await
            .expect("idle")
    );
    let status = forwarder.status(at(MINUTES * 60 + 1));
    let read: u64 = status.meters.iter().map(|m| m.events_read).sum();
    let sent: u64 = status.meters.iter().map(|m| m.records_sent).sum();
    let corrections: u64 = status.meters.iter().map(|m| m.corrections_sent).sum();
    assert_eq!(read as usize, events + late_events);
    assert_eq!(
        server.state().accepted_records,
        sent,
        "every record counted once"
    );
    println!(
        "{window_minutes}-minute windows: {read} events read ({late_events} late), {sent} records \
         acknowledged ({corrections} corrections) = {:.5} records per event; first pass \
         {first:.2?}, total {:.2?}",
        sent as f64 / read as f64,
        forwarding.elapsed()
    );
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
