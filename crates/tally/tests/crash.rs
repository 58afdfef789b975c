//! Acknowledged means durable: `tally serve` is killed with SIGKILL in the
//! middle of a concurrent load, while materialisation is behind the log,
//! restarted, and every acknowledged event must be there, no event stored
//! twice, and the rollups must agree with the log: their total with the
//! events listed, and their answer per subject with that of a meter rebuilt
//! from the log after the restart.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

const WRITERS: usize = 8;
const BATCH: usize = 250;
const BATCHES_PER_WRITER: usize = 40;
const KILLS: usize = 3;

mod common;

fn start(dir: &Path) -> common::Server {
    common::serve(dir, &[])
}

/// Value of event `n`: distinct, so a double count changes the sum.
fn value(n: usize) -> u64 {
    1_000_003 * n as u64 + 7
}

fn batch(writer: usize, index: usize) -> Value {
    let now = jiff::Timestamp::now();
    Value::Array(
        (0..BATCH)
            .map(|i| {
                let n = (writer * BATCHES_PER_WRITER + index) * BATCH + i;
                json!({"specversion": "1.0", "id": format!("e{n}"), "source": "crash-test", "type": "load",
                       "subject": format!("customer-{}", n % 13), "time": now.to_string(), "data": {"v": value(n)}})
            })
            .collect(),
    )
}

/// Sends every batch of every writer; records the ids of acknowledged batches.
async fn load(base: String, acked: Arc<Mutex<HashSet<String>>>) {
    let client = tally_delivery::client_builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let (client, base, acked) = (client.clone(), base.clone(), Arc::clone(&acked));
        tasks.push(tokio::spawn(async move {
            for index in 0..BATCHES_PER_WRITER {
                let body = batch(writer, index);
                let sent = client
                    .post(format!("{base}/api/v1/events"))
                    .json(&body)
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => {
                        let mut acked = acked.lock().unwrap();
                        for e in body.as_array().unwrap() {
                            acked.insert(e["id"].as_str().unwrap().to_owned());
                        }
                    }
                    _ => return, // the server died
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Every stored event id and value, read back through the list API.
async fn stored(base: &str) -> HashMap<String, u64> {
    let client = tally_delivery::client_builder()
        .build()
        .expect("HTTP client");
    let mut out = HashMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{base}/api/v2/events?source=crash-test&limit=10000");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page: Value = client.get(url).send().await.unwrap().json().await.unwrap();
        for item in page["items"].as_array().unwrap() {
            let id = item["event"]["id"].as_str().unwrap().to_owned();
            let v = item["event"]["data"]["v"].as_u64().unwrap();
            assert!(
                out.insert(id.clone(), v).is_none(),
                "event {id} is stored twice"
            );
        }
        match page["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return out,
        }
    }
}

async fn metered_total(base: &str) -> u64 {
    by_subject(base, "load").await.values().sum()
}

/// A meter's total per subject, once it answers.
async fn by_subject(base: &str, meter: &str) -> HashMap<String, u64> {
    let client = tally_delivery::client_builder()
        .build()
        .expect("HTTP client");
    for _ in 0..500 {
        let r = client
            .get(format!(
                "{base}/api/v1/meters/{meter}/query?groupBy=subject"
            ))
            .send()
            .await
            .unwrap();
        if r.status() == 503 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let body: Value = r.json().await.unwrap();
        let mut totals = HashMap::new();
        for row in body["data"].as_array().unwrap() {
            let subject = row["subject"].as_str().unwrap().to_owned();
            *totals.entry(subject).or_default() += row["value"].as_u64().unwrap();
        }
        return totals;
    }
    panic!("meter never ready");
}

async fn create_meter(base: &str, slug: &str) {
    let meter =
        json!({"slug": slug, "eventType": "load", "aggregation": "SUM", "valueProperty": "$.v"});
    let r = tally_delivery::client_builder()
        .build()
        .expect("HTTP client")
        .post(format!("{base}/api/v1/meters"))
        .json(&meter)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_events_survive_sigkill_and_are_never_doubled() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path());
    create_meter(&server.base, "load").await;
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let mut killed_behind = 0;

    for round in 0..KILLS {
        let base = server.base.clone();
        let load = tokio::spawn(load(base, Arc::clone(&acked)));
        // Let the load run, then kill the server mid-flight, at a moment
        // when acknowledged events wait to be materialised.
        tokio::time::sleep(Duration::from_millis(300 + 200 * round as u64)).await;
        let mut lag = 0;
        for _ in 0..1_000 {
            lag = common::materialise_lag(&server.base).await;
            if lag > 0 {
                break;
            }
        }
        server.child.kill().expect("SIGKILL");
        killed_behind += usize::from(lag > 0);
        server.child.wait().unwrap();
        let _ = load.await;
        server = start(dir.path());
        let stored = stored(&server.base).await;
        let acked_now = acked.lock().unwrap().clone();
        let missing: Vec<_> = acked_now
            .iter()
            .filter(|id| !stored.contains_key(*id))
            .take(5)
            .collect();
        assert!(
            missing.is_empty(),
            "round {round}: acknowledged but lost: {missing:?} (of {})",
            acked_now.len()
        );
        let expected: u64 = stored.values().sum();
        assert_eq!(
            metered_total(&server.base).await,
            expected,
            "round {round}: rollups disagree with the log"
        );
        // A meter built from the log now answers as the one that lived
        // through the kill.
        let rebuilt = format!("rebuilt-{round}");
        create_meter(&server.base, &rebuilt).await;
        assert_eq!(
            by_subject(&server.base, "load").await,
            by_subject(&server.base, &rebuilt).await,
            "round {round}: rollups differ from a rebuild from the log"
        );
        eprintln!(
            "round {round}: killed with {lag} events not materialised; {} acknowledged, {} stored",
            acked_now.len(),
            stored.len()
        );
    }

    assert!(
        killed_behind > 0,
        "no kill came while materialisation was behind the log"
    );

    // Re-send everything: all of it lands exactly once.
    load(server.base.clone(), Arc::clone(&acked)).await;
    let stored = stored(&server.base).await;
    let all = WRITERS * BATCHES_PER_WRITER * BATCH;
    assert_eq!(stored.len(), all);
    let expected: u64 = (0..all).map(value).sum();
    assert_eq!(metered_total(&server.base).await, expected);
    server.child.kill().unwrap();
    server.child.wait().unwrap();
}
