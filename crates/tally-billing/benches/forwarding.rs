//! Records forwarded per second and forwarding lag: 10k billing accounts
//! (one project each) × 4 meters × 1-minute windows, against the loopback
//! Amberflo test server.
//!
//! `cargo bench -p tally-billing --bench forwarding [-- WINDOWS]`
//! (`--profile dev` to skip a release build of the dependencies.)

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use support::{TestServer, at, config, sink};
use tally_billing::{Attribution, ForwardedMeter, Forwarder, MemoryUsageSource, Provider};
use tally_delivery::Registry;

const ACCOUNTS: usize = 10_000;
const METERS: [&str; 4] = ["requests", "bytes-in", "bytes-out", "duration"];

fn main() {
    let windows: i64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(run(windows));
}

async fn run(windows: i64) {
    let server = TestServer::start(support::API_KEY).await;
    let dir = tempfile::tempdir().expect("tempdir");
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
    let attribution: Attribution = support::one_account_per_project(ACCOUNTS);
    let meters: Vec<ForwardedMeter> = support::meters(&METERS);
    let mut sink = sink(&server.url, Provider::Amberflo, 0);
    sink.batch_size = 500;
    let config = config(sink, meters, dir.path());
    let mut forwarder = Forwarder::start(config, source, attribution, &Registry::new())
        .await
        .expect("start");

    let mut total_records = 0u64;
    let mut lags = Vec::new();
    let started = Instant::now();
    for w in 1..=windows {
        // Window w-1 closes now (no allowed lateness): plan, send, wait for all acks.
        let closed = Instant::now();
        let report = forwarder.run_once(at(w * 60)).await.expect("pass");
        let planned = closed.elapsed();
        assert!(
            forwarder
                .wait_idle(Duration::from_secs(600))
                .await
                .expect("idle")
        );
        let lag = closed.elapsed();
        total_records += report.records;
        lags.push(lag);
        println!(
            "window {w}: {} records, planned+committed in {:.2?}, acknowledged {:.2?} after close",
            report.records, planned, lag
        );
    }
    let elapsed = started.elapsed();
    let state = server.state();
    assert_eq!(
        state.accepted_records, total_records,
        "every record counted once"
    );
    println!(
        "{ACCOUNTS} accounts x {} meters x {windows} windows: {total_records} records in {:.2?} = {:.0} records/s; lag max {:.2?}",
        METERS.len(),
        elapsed,
        total_records as f64 / elapsed.as_secs_f64(),
        lags.iter().max().copied().unwrap_or_default()
    );
}
