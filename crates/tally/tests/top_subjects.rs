//! Usage by subject at 100,000 subjects, against a real `tally serve`:
//! `top=N` answers the N subjects of largest total over the range and, per
//! window, the rest merged as `other`, checked against a naive reference
//! computed here from the events sent; an aggregation that cannot be split
//! (MAX) answers no `other`.

use std::collections::BTreeMap;

use serde_json::Value;

mod common;

const SUBJECTS: usize = 100_000;
const TOP: usize = 4;

const CATALOG: &str = "\
apiVersion: billing.miloapis.com/v1alpha1
kind: MeterDefinition
metadata: {name: calls}
spec:
  meterName: calls
  phase: Published
  measurement: {aggregation: Sum, unit: '{call}'}
  event: {type: call}
---
apiVersion: billing.miloapis.com/v1alpha1
kind: MeterDefinition
metadata: {name: largest-call}
spec:
  meterName: largest-call
  phase: Published
  measurement: {aggregation: Max, unit: '{call}'}
  event: {type: call}
";

/// (subject, hour window 0..3, value): every subject once, small; a few
/// large ones, two of them tied.
fn events() -> Vec<(String, usize, i64)> {
    let mut events: Vec<(String, usize, i64)> = (0..SUBJECTS)
        .map(|i| (format!("c{i:06}"), i % 3, 1 + (i % 7) as i64))
        .collect();
    for (subject, window, value) in [
        (10, 0, 3_000),
        (10, 2, 10),
        (20, 1, 2_000),
        (30, 2, 500),
        (40, 0, 497), // ties with c000030 at 503: the smaller name ranks first
        (50, 1, 400),
    ] {
        events.push((format!("c{subject:06}"), window, value));
    }
    events
}

fn value(row: &Value) -> i64 {
    match &row["value"] {
        Value::Number(n) => n.as_i64().unwrap(),
        Value::String(s) => s.parse().unwrap(),
        other => panic!("not a value: {other}"),
    }
}

async fn get(http: &reqwest::Client, url: &str) -> Value {
    let answer = http.get(url).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    answer.json().await.unwrap()
}

#[tokio::test]
async fn the_top_subjects_and_the_rest_at_100k_subjects() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::serve(dir.path(), &[]);
    let applied = common::cli(&server.base, "", &["apply", "-f", "-"], CATALOG);
    assert!(applied.status.success(), "{applied:?}");

    let start = jiff::Timestamp::now()
        .checked_sub(jiff::SignedDuration::from_hours(4))
        .unwrap()
        .round(jiff::Unit::Hour)
        .unwrap();
    let hour = |w: usize| start + jiff::SignedDuration::from_hours(w as i64);
    let events = events();
    let lines: Vec<String> = events
        .iter()
        .enumerate()
        .map(|(n, (subject, window, value))| {
            let time = hour(*window) + jiff::SignedDuration::from_mins(10);
            format!(
                "{{\"specversion\":\"1.0\",\"id\":\"e{n}\",\"source\":\"t\",\"type\":\"call\",\
                 \"subject\":\"{subject}\",\"time\":\"{time}\",\"data\":{{\"value\":{value}}}}}\n"
            )
        })
        .collect();
    let http = tally_delivery::client_builder().build().unwrap();
    for batch in lines.chunks(10_000) {
        let sent = http
            .post(format!("{}/api/v1/events", server.base))
            .header("content-type", "application/x-ndjson")
            .body(batch.concat())
            .send()
            .await
            .unwrap();
        assert_eq!(sent.status(), 204, "{}", sent.text().await.unwrap());
    }

    // The reference: totals by subject, ranked (largest, then by name).
    let mut totals: BTreeMap<&str, i64> = BTreeMap::new();
    let mut cells: BTreeMap<(usize, &str), i64> = BTreeMap::new();
    let mut windows: BTreeMap<usize, i64> = BTreeMap::new();
    for (subject, window, value) in &events {
        *totals.entry(subject).or_default() += value;
        *cells.entry((*window, subject)).or_default() += value;
        *windows.entry(*window).or_default() += value;
    }
    let mut ranked: Vec<(&str, i64)> = totals.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let top: Vec<&str> = ranked.iter().take(TOP).map(|(s, _)| *s).collect();
    assert_eq!(top, ["c000010", "c000020", "c000030", "c000040"]);

    let url = |meter: &str| {
        format!(
            "{}/api/v1/meters/{meter}/query?from={}&to={}&windowSize=HOUR&groupBy=subject&top={TOP}",
            server.base,
            hour(0),
            hour(3)
        )
    };
    let answer = get(&http, &url("calls")).await;
    assert_eq!(answer["subjects"], SUBJECTS, "{answer}");
    let got: Vec<(String, String, i64)> = answer["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let start = r["windowStart"].as_str().unwrap().to_owned();
            (start, r["subject"].as_str().unwrap().to_owned(), value(r))
        })
        .collect();
    // Ordered by window, then by rank.
    let mut want = Vec::new();
    for w in 0..3 {
        for subject in &top {
            if let Some(v) = cells.get(&(w, *subject)) {
                want.push((hour(w).to_string(), subject.to_string(), *v));
            }
        }
    }
    assert_eq!(got, want);
    let other: Vec<(String, i64)> = answer["other"]
        .as_array()
        .unwrap_or_else(|| panic!("no other in {answer}"))
        .iter()
        .map(|r| {
            assert!(r["subject"].is_null(), "{r}");
            (r["windowStart"].as_str().unwrap().to_owned(), value(r))
        })
        .collect();
    let want_other: Vec<(String, i64)> = windows
        .iter()
        .map(|(w, total)| {
            let shown: i64 = top.iter().filter_map(|s| cells.get(&(*w, *s))).sum();
            (hour(*w).to_string(), total - shown)
        })
        .collect();
    assert_eq!(other, want_other);

    // MAX cannot be split: the top subjects' rows, and no `other`.
    let answer = get(&http, &url("largest-call")).await;
    assert_eq!(answer["data"][0]["subject"], "c000010", "{answer}");
    assert_eq!(value(&answer["data"][0]), 3_000);
    assert!(answer.get("other").is_none(), "{answer}");

    // Grouping by more than the subject is refused.
    let refused = http
        .get(url("calls").replace("groupBy=subject", "groupBy=subject,source"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
}
