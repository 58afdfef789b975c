//! Faults of the cluster backend, with real servers: every acknowledged
//! event is counted exactly once afterwards.
//!
//! - ClickHouse down: ingest keeps acknowledging, queries answer NotReady
//!   (503) naming ClickHouse; after it is back, the workers catch up.
//! - nats-server killed (`kill -9`) and restarted: the ledger reconnects.
//! - A worker process killed (`kill -9`) while materialising: another
//!   worker takes over its unacknowledged messages.
//! - An ingest node process killed (`kill -9`) under load: what it
//!   acknowledged is counted, and the client's re-send of everything
//!   counts nothing twice.

use std::process::{Command, Stdio};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use rust_decimal::Decimal;
use serde_json::json;
use tally_ledger::{ApplyMode, Ledger, LedgerError};
use tally_ledger_suite::peers::{ClickHouse, Nats};
use tally_ledger_suite::{base_time, event, meter, total, value};
use tally_model::CloudEvent;
use tally_store_cluster::ch::Ch;
use tally_store_cluster::{ClusterLedger, ClusterLedgerConfig};

fn config(nats_url: String, ch_url: String, workers: usize) -> ClusterLedgerConfig {
    let mut config = ClusterLedgerConfig::new(nats_url, ch_url);
    config.database = "faults".into();
    config.workers = workers;
    config.ack_wait = Duration::from_secs(2);
    config
}

fn events(kind: &str, ids: std::ops::Range<u32>) -> Vec<CloudEvent> {
    let t = base_time() + SignedDuration::from_hours(1);
    ids.map(|i| event("f", &i.to_string(), kind, "c", t, json!({"value": 1})))
        .collect()
}

fn day() -> (Timestamp, Timestamp) {
    (base_time(), base_time() + SignedDuration::from_hours(24))
}

/// Ingests, retrying while the ledger reconnects; re-sent events are
/// duplicates, so a retry never counts twice.
async fn ingest_retrying(ledger: &ClusterLedger, batch: Vec<CloudEvent>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match ledger.ingest(batch.clone()).await {
            Ok(_) => return,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "ingest: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_clickhouse_down_ingest_acknowledges_and_queries_say_why() {
    let (Some(nats), Some(mut ch)) = (Nats::start(), ClickHouse::start()) else {
        return;
    };
    let ledger = ClusterLedger::connect(config(nats.url(), ch.url(), 1))
        .await
        .unwrap();
    ledger
        .apply(meter("down", "down.usage", "SUM"), ApplyMode::Upsert)
        .await
        .unwrap();
    ch.kill();
    for start in (0..1_000).step_by(250) {
        let outcome = ledger
            .ingest(events("down.usage", start..start + 250))
            .await
            .unwrap();
        assert_eq!(outcome.accepted, 250);
    }
    let (from, to) = day();
    let Err(LedgerError::NotReady { message, .. }) =
        ledger.query("down".into(), total(from, to)).await
    else {
        panic!("a query without ClickHouse must answer NotReady");
    };
    assert!(message.contains("ClickHouse"), "{message}");
    ch.resume();
    ledger.settle(Duration::from_secs(60)).await.unwrap();
    assert_eq!(value(&ledger, "down", from, to).await, Decimal::from(1_000));
    assert!(ledger.insert_errors() > 0, "the failed inserts are counted");
    // ... on /metrics too, by table and reason.
    let by_table = ledger.stats().insert_errors;
    let unreachable = by_table
        .get("events")
        .and_then(|reasons| reasons.get("unreachable"))
        .copied()
        .unwrap_or(0);
    assert!(unreachable > 0, "{by_table:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_nats_server_loses_nothing_acknowledged() {
    let (Some(mut nats), Some(ch)) = (Nats::start(), ClickHouse::start()) else {
        return;
    };
    let ledger = ClusterLedger::connect(config(nats.url(), ch.url(), 1))
        .await
        .unwrap();
    ledger
        .apply(meter("restart", "restart.usage", "SUM"), ApplyMode::Upsert)
        .await
        .unwrap();
    ingest_retrying(&ledger, events("restart.usage", 0..500)).await;
    nats.kill();
    nats.resume();
    ingest_retrying(&ledger, events("restart.usage", 250..1_000)).await;
    ledger.settle(Duration::from_secs(60)).await.unwrap();
    let (from, to) = day();
    assert_eq!(
        value(&ledger, "restart", from, to).await,
        Decimal::from(1_000)
    );
    // The catalog survived in its bucket: a new node sees the meter.
    let other = ClusterLedger::connect(config(nats.url(), ch.url(), 0))
        .await
        .unwrap();
    assert_eq!(
        value(&other, "restart", from, to).await,
        Decimal::from(1_000)
    );
}

/// Set in the child process that runs one worker until it is killed.
const CHILD: &str = "TALLY_CLUSTER_FAULTS_WORKER";

/// Not a test of its own: the worker process that
/// `a_worker_killed_mid_batch_double_counts_nothing` starts and kills.
#[tokio::test]
#[ignore = "run as a child process by a_worker_killed_mid_batch_double_counts_nothing"]
async fn worker_process() {
    let Ok(urls) = std::env::var(CHILD) else {
        return;
    };
    let (nats, ch) = urls.split_once(' ').expect("two urls");
    let mut config = config(nats.into(), ch.into(), 1);
    config.batch = 500;
    let _ledger = ClusterLedger::connect(config).await.unwrap();
    tokio::time::sleep(Duration::from_secs(600)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_batch_double_counts_nothing() {
    let (Some(nats), Some(ch)) = (Nats::start(), ClickHouse::start()) else {
        return;
    };
    let ledger = ClusterLedger::connect(config(nats.url(), ch.url(), 0))
        .await
        .unwrap();
    ledger
        .apply(meter("kill", "kill.usage", "COUNT"), ApplyMode::Upsert)
        .await
        .unwrap();
    const N: u32 = 20_000;
    for start in (0..N).step_by(2_000) {
        ledger
            .ingest(events("kill.usage", start..start + 2_000))
            .await
            .unwrap();
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["worker_process", "--exact", "--ignored", "--nocapture"])
        .env(CHILD, format!("{} {}", nats.url(), ch.url()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once it has materialised some, not all.
    let client = Ch::new(&ch.url(), "faults", Duration::from_secs(5)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let rows = stored_rows(&client).await;
        if rows > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the worker materialised nothing"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        stored_rows(&client).await < u64::from(N),
        "killed before it was done"
    );
    let (from, to) = day();
    ledger.spawn_workers(1).await.unwrap();
    ledger.settle(Duration::from_secs(120)).await.unwrap();
    assert_eq!(value(&ledger, "kill", from, to).await, Decimal::from(N));
    // Each event is on `.valid` once: what the killed worker published
    // before its ack, the next one published again under the same ids,
    // and the broker dropped.
    let valid = ledger
        .subject_counts("billing.usage.*.valid")
        .await
        .unwrap();
    assert_eq!(valid.values().sum::<u64>(), u64::from(N), "{valid:?}");
    // The rollups count each event once too: the child's roller may have
    // died mid-range; rolling again, and even every row rolled twice (as a
    // roller killed before its mark would), changes nothing.
    ledger.roll_up().await.unwrap();
    let rolled = ledger.queries_from_rollups();
    assert_eq!(value(&ledger, "kill", from, to).await, Decimal::from(N));
    client
        .execute("INSERT INTO faults.samples SELECT * FROM faults.samples")
        .await
        .unwrap();
    assert_eq!(value(&ledger, "kill", from, to).await, Decimal::from(N));
    assert_eq!(
        ledger.queries_from_rollups(),
        rolled + 2,
        "answered from the rollups"
    );
}

/// The rows of `faults.events` as stored (before `FINAL`).
async fn stored_rows(ch: &Ch) -> u64 {
    #[derive(serde::Deserialize)]
    struct Count {
        n: u64,
    }
    ch.select::<Count>("SELECT count() AS n FROM faults.events")
        .await
        .ok()
        .and_then(|rows| rows.first().map(|c| c.n))
        .unwrap_or(0)
}

/// Set in the child process that ingests until it is killed.
const INGEST_CHILD: &str = "TALLY_CLUSTER_FAULTS_INGEST";

/// Not a test of its own: the ingest node that
/// `an_ingest_node_killed_under_load_loses_nothing_acknowledged` kills.
/// Prints `acked <n>` after each acknowledged request.
#[tokio::test]
#[ignore = "run as a child process by an_ingest_node_killed_under_load_loses_nothing_acknowledged"]
async fn ingest_process() {
    let Ok(urls) = std::env::var(INGEST_CHILD) else {
        return;
    };
    let (nats, ch) = urls.split_once(' ').expect("two urls");
    let ledger = ClusterLedger::connect(config(nats.into(), ch.into(), 0))
        .await
        .unwrap();
    for start in (0..INGESTED).step_by(500) {
        ledger
            .ingest(events("node.usage", start..start + 500))
            .await
            .unwrap();
        println!("acked {}", start + 500);
    }
    tokio::time::sleep(Duration::from_secs(600)).await;
}

const INGESTED: u32 = 50_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingest_node_killed_under_load_loses_nothing_acknowledged() {
    use std::io::BufRead;
    let (Some(nats), Some(ch)) = (Nats::start(), ClickHouse::start()) else {
        return;
    };
    let ledger = ClusterLedger::connect(config(nats.url(), ch.url(), 1))
        .await
        .unwrap();
    ledger
        .apply(meter("node", "node.usage", "COUNT"), ApplyMode::Upsert)
        .await
        .unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["ingest_process", "--exact", "--ignored", "--nocapture"])
        .env(INGEST_CHILD, format!("{} {}", nats.url(), ch.url()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let acked = tokio::task::spawn_blocking(move || {
        let mut acked = 0;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(n) = line.strip_prefix("acked ") {
                acked = n.parse().unwrap();
                if acked >= 5_000 {
                    break;
                }
            }
        }
        acked
    })
    .await
    .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        (5_000..INGESTED).contains(&acked),
        "killed mid-load at {acked}"
    );
    ledger.settle(Duration::from_secs(120)).await.unwrap();
    let (from, to) = day();
    let counted = value(&ledger, "node", from, to).await;
    assert!(
        counted >= Decimal::from(acked),
        "{counted} < {acked} acknowledged"
    );
    // The client re-sends everything; nothing is counted twice.
    for start in (0..INGESTED).step_by(2_500) {
        ledger
            .ingest(events("node.usage", start..start + 2_500))
            .await
            .unwrap();
    }
    ledger.settle(Duration::from_secs(120)).await.unwrap();
    assert_eq!(
        value(&ledger, "node", from, to).await,
        Decimal::from(INGESTED)
    );
}
