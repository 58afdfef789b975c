//! The other commands against a cluster: `tally forward` (billing
//! forwarding to the Amberflo test server, `tally_billing::testing`) reads
//! the usage two `tally serve --cluster` nodes took, over a real
//! nats-server and clickhouse-server, and sends each (account, meter,
//! window) exactly once — whichever node it asks, and however often the
//! events were re-sent through the other node.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::billing::{API_KEY, Api, METERS, PROJECTS, TOKEN, event, manifests, nonzero};
use jiff::{Timestamp, ToSpan};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tally_billing::testing::TestServer;
use tally_ledger_suite::peers::{ClickHouse, Nats};

/// The events, and what a naive recount says each (account uid, meter api
/// name) must be billed: bound projects only (p4 has no account).
fn usage(t0: Timestamp) -> (Vec<Value>, BTreeMap<(String, String), Decimal>) {
    let mut events = Vec::new();
    let mut expected = BTreeMap::new();
    for i in 0..24u64 {
        let (project, account) = PROJECTS[i as usize % 4];
        let (meter, api_name) = METERS[i as usize % 2];
        let time = t0 + ((i as i64 % 3) * 60 + 5).seconds();
        events.push(event(&format!("c{i}"), meter, project, time, 10 + i));
        if project != "p4" {
            *expected
                .entry((format!("uid-{account}"), api_name.to_owned()))
                .or_insert(Decimal::ZERO) += Decimal::from(10 + i);
        }
    }
    (events, expected)
}

/// Runs `tally forward --once` off the async workers (the test server
/// answering it runs on them).
async fn forward(base: &str, dir: &std::path::Path) -> String {
    let (base, dir) = (base.to_owned(), dir.to_owned());
    tokio::task::spawn_blocking(move || forward_blocking(&base, &dir))
        .await
        .unwrap()
}

fn forward_blocking(base: &str, dir: &std::path::Path) -> String {
    let key_file = dir.join("amberflo.key");
    std::fs::write(&key_file, format!("{API_KEY}\n")).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["forward", "--sink", "amberflo", "--once", "--data-dir"])
        .arg(dir.join("forward"))
        .arg("--api-key-file")
        .arg(&key_file)
        .args(["--egress-allow", "127.0.0.0/8"])
        .env("TALLY_SERVER", base)
        .env("TALLY_TOKEN", TOKEN)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tally_forward_bills_a_clusters_usage_exactly_once() {
    let Some(nats) = Nats::start() else { return };
    let Some(clickhouse) = ClickHouse::start() else {
        return;
    };
    let provider = TestServer::start(API_KEY).await;
    let config = format!(
        "token: {TOKEN}\ncluster: {{nats: \"{}\", clickhouse: \"{}\", database: tally_forward}}\n\
         billing: {{enabled: false}}\n",
        nats.url(),
        clickhouse.url()
    );
    let work = tempfile::tempdir().unwrap();
    let (dir_a, dir_b) = (work.path().join("a"), work.path().join("b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let a = common::serve_with_config(&dir_a, &config);
    let b = common::serve_with_config(&dir_b, &config);
    let api = Api {
        http: tally_delivery::client_builder().build().unwrap(),
    };
    let now = Timestamp::now();
    // The last window with usage closed (2 s lateness) over a minute ago.
    let t0 = Timestamp::from_second(now.as_second().div_euclid(60) * 60 - 4 * 60).unwrap();
    let end = t0 + 180.seconds();
    let file = work.path().join("billing.yaml");
    std::fs::write(&file, manifests(&provider.url, t0)).unwrap();
    common::ok(common::cli(
        &a.base,
        TOKEN,
        &["apply", "-f", file.to_str().unwrap()],
        "",
    ));

    // Half the events through each node.
    let (events, expected) = usage(t0);
    let (to_a, to_b): (Vec<_>, Vec<_>) = events
        .iter()
        .cloned()
        .enumerate()
        .partition(|(i, _)| i % 2 == 0);
    for (node, part) in [(&a.base, to_a), (&b.base, to_b)] {
        let part: Vec<Value> = part.into_iter().map(|(_, e)| e).collect();
        let (status, body) = api.post(node, "/api/v1/events", &json!(part)).await;
        assert_eq!(status, 200, "{body}");
    }
    // Waiting is for the workers and the resources' watch, not a speed
    // bound: the test fails only if node b never answers the recount.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut answered = BTreeMap::new();
    while Instant::now() < deadline {
        answered = nonzero(api.ledger_totals(&b.base, t0, end).await);
        if answered == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(answered, expected, "node b's totals");

    let first = forward(&b.base, work.path()).await;
    assert_eq!(nonzero(provider.sums()), expected, "{first}");

    // Every event again through node a: duplicates, so nothing changes,
    // and forwarding from node a (same progress) sends nothing new.
    let (status, body) = api.post(&a.base, "/api/v1/events", &json!(events)).await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(nonzero(api.ledger_totals(&a.base, t0, end).await), expected);
    let second = forward(&a.base, work.path()).await;
    assert_eq!(nonzero(provider.sums()), expected, "{second}");
    assert!(!first.contains(API_KEY) && !second.contains(API_KEY));
}
