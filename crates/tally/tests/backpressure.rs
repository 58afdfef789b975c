//! Backpressure end to end, against a real `tally serve` whose tail (events
//! acknowledged but not yet materialised) holds at most three events and
//! is materialised only after a few seconds: once it is full, the platform
//! contract answers `429` with `Retry-After` and stores nothing of the
//! request; the OpenMeter API waits for room instead; and once the
//! materialiser has caught up, the refused request is accepted as sent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

mod common;

/// The tail's bound and how long acknowledged events wait for a bulk
/// (far more events than a test sends) before they are materialised anyway.
const CONFIG: &str =
    "maxUnmaterialisedEvents: 3\nmaterialisePatienceMs: 3000\ningestWaitSeconds: 60\n";
const PATIENCE: Duration = Duration::from_millis(3000);

fn platform_event(id: &str) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "gateway", "type": "api.calls",
        "subject": "projects/acme", "data": {"value": "1"}})
}

/// `n` ULIDs no other call of this test returned.
fn ids(n: usize) -> Vec<String> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    (0..n)
        .map(|_| {
            let random = u128::from(NEXT.fetch_add(1, Ordering::Relaxed));
            ulid::Ulid::from_parts(1_765_000_000_000, random).to_string()
        })
        .collect()
}

async fn batch(http: &reqwest::Client, base: &str, ids: &[String]) -> reqwest::Response {
    let events: Vec<Value> = ids.iter().map(|id| platform_event(id)).collect();
    http.post(format!("{base}/v1/usage/events:batchIngest"))
        .json(&events)
        .send()
        .await
        .unwrap()
}

/// The ids of every stored event.
async fn stored(http: &reqwest::Client, base: &str) -> Vec<String> {
    let listed: Value = http
        .get(format!("{base}/api/v1/events?limit=100"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut ids: Vec<String> = listed
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {listed}"))
        .iter()
        .map(|e| e["event"]["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn a_full_tail_answers_429_stores_nothing_and_accepts_the_retry() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::serve_with_config(dir.path(), CONFIG);
    let base = server.base.as_str();
    let http = tally_delivery::client_builder().build().unwrap();

    // Three acknowledged events fill the tail.
    let first = ids(3);
    let sent_at = Instant::now();
    let filled = batch(&http, base, &first).await;
    assert_eq!(filled.status(), StatusCode::OK);
    assert_eq!(filled.json::<Value>().await.unwrap()["accepted"], 3);
    assert_eq!(common::materialise_lag(base).await, 3);

    // The platform contract refuses the next request whole, at once.
    let refused_ids = ids(2);
    let refused = batch(&http, base, &refused_ids).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = refused.json().await.unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("maxUnmaterialisedEvents"),
        "{problem}"
    );
    let mut expected = first.clone();
    expected.sort();
    assert_eq!(
        stored(&http, base).await,
        expected,
        "nothing refused is stored"
    );

    // The OpenMeter API waits for room instead: it can only be answered
    // once the materialiser has folded the tail in, which it does when the
    // first events have waited its patience.
    let openmeter_id = ids(1).remove(0);
    let waited = http
        .post(format!("{base}/api/v1/events"))
        .header("content-type", "application/cloudevents+json")
        .json(
            &json!({"specversion": "1.0", "id": openmeter_id, "source": "openmeter",
            "type": "api.calls", "subject": "acme", "data": {"value": 1}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(waited.status(), StatusCode::NO_CONTENT);
    assert!(
        sent_at.elapsed() >= PATIENCE,
        "answered before the tail could be folded in"
    );

    // The materialiser has caught up: the same request is accepted, as
    // sent, after following Retry-After as often as needed.
    let deadline = Instant::now() + Duration::from_secs(60);
    let accepted = loop {
        let retried = batch(&http, base, &refused_ids).await;
        if retried.status() != StatusCode::TOO_MANY_REQUESTS {
            break retried;
        }
        assert!(Instant::now() < deadline, "still refused after 60 s");
        let wait: u64 = retried.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        tokio::time::sleep(Duration::from_secs(wait)).await;
    };
    assert_eq!(accepted.status(), StatusCode::OK);
    let answer: Value = accepted.json().await.unwrap();
    assert_eq!(
        (&answer["accepted"], &answer["duplicates"]),
        (&json!(2), &json!(0))
    );
    let mut expected = [first, refused_ids, vec![openmeter_id]].concat();
    expected.sort();
    assert_eq!(stored(&http, base).await, expected);
}
