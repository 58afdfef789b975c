//! Two `tally serve` nodes of one cluster (a `cluster:` config section) on
//! a real `nats-server -js` and `clickhouse-server`: what one node
//! acknowledges, the other answers once the workers have materialised it.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use tally_ledger_suite::peers::{ClickHouse, Nats};

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
        .to_string_lossy()
        .into_owned()
}

/// The `llm-tokens` meter of `examples/meters.yaml` computed naively from
/// `examples/events.ndjson`: tokens of `prompt` events summed by
/// (subject, model), each (source, id) counted once.
fn expected_tokens() -> BTreeMap<(String, String), f64> {
    let text = std::fs::read_to_string(repo("examples/events.ndjson")).unwrap();
    let mut seen = HashSet::new();
    let mut sums = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let event: Value = serde_json::from_str(line).unwrap();
        let key = (event["source"].to_string(), event["id"].to_string());
        if event["type"] != "prompt" || !seen.insert(key) {
            continue;
        }
        let tokens = &event["data"]["tokens"];
        let tokens = tokens
            .as_f64()
            .or_else(|| tokens.as_str().and_then(|t| t.parse().ok()))
            .unwrap();
        let group = (
            event["subject"].as_str().unwrap().to_owned(),
            event["data"]["model"].as_str().unwrap().to_owned(),
        );
        *sums.entry(group).or_insert(0.0) += tokens;
    }
    sums
}

/// The node's answer for `llm-tokens` by (subject, model), summed over
/// windows; `None` while it cannot answer yet (meter unknown on this node).
async fn answered_tokens(
    http: &reqwest::Client,
    base: &str,
) -> Option<BTreeMap<(String, String), f64>> {
    let answer = http
        .get(format!(
            "{base}/api/v1/meters/llm-tokens/query?windowSize=DAY&groupBy=model&groupBy=subject"
        ))
        .bearer_auth("adm")
        .send()
        .await
        .ok()?;
    if !answer.status().is_success() {
        return None;
    }
    let answer: Value = answer.json().await.ok()?;
    let mut sums = BTreeMap::new();
    for row in answer["data"].as_array()? {
        let group = (
            row["subject"].as_str()?.to_owned(),
            row["groupBy"]["model"].as_str()?.to_owned(),
        );
        *sums.entry(group).or_insert(0.0) += row["value"].as_f64()?;
    }
    Some(sums)
}

#[tokio::test]
async fn what_one_node_acknowledges_the_other_answers() {
    let Some(nats) = Nats::start() else { return };
    let Some(clickhouse) = ClickHouse::start() else {
        return;
    };
    let config = format!(
        "token: adm\ncluster: {{nats: \"{}\", clickhouse: \"{}\", database: tally_nodes}}\n\
         billing: {{enabled: false}}\n",
        nats.url(),
        clickhouse.url()
    );
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = common::serve_with_config(dir_a.path(), &config);
    let b = common::serve_with_config(dir_b.path(), &config);
    let tally = |base: &str, args: &[&str]| common::ok(common::cli(base, "adm", args, ""));

    tally(&a.base, &["apply", "-f", &repo("examples/meters.yaml")]);
    let sent = tally(
        &a.base,
        &["events", "send", &repo("examples/events.ndjson")],
    );
    assert!(sent.contains("accepted 4"), "{sent}");
    assert!(sent.contains("duplicates 1"), "{sent}");

    // The meter reached node b through the catalog bucket, the events
    // through the stream and ClickHouse. Waiting is for the workers, not a
    // speed bound: the test fails only if they never get there.
    let expected = expected_tokens();
    assert!(!expected.is_empty());
    let http = tally_delivery::client_builder().build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = None;
    while Instant::now() < deadline {
        last = answered_tokens(&http, &b.base).await;
        if last.as_ref() == Some(&expected) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(last.as_ref(), Some(&expected), "node b's answer");
    // Both nodes give the same answer, and a re-send to node b counts
    // nothing twice.
    assert_eq!(
        answered_tokens(&http, &a.base).await,
        Some(expected.clone())
    );
    let again = tally(
        &b.base,
        &["events", "send", &repo("examples/events.ndjson")],
    );
    assert!(again.contains("accepted 0"), "{again}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(answered_tokens(&http, &a.base).await, Some(expected));
}
