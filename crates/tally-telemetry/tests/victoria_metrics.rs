//! The pull source against a real VictoriaMetrics started on loopback
//! (Debian's `victoria-metrics` package). Windows with restarts in between
//! must neither skip nor repeat a sample.

use tally_testkit::victoria_metrics;

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tally_telemetry::victoria::{Checkpoint, VictoriaMetricsSource};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_and_restarts_neither_skip_nor_repeat_samples() {
    let Some(server) = victoria_metrics::start().await else {
        return;
    };
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let base = now_ms - 3_600_000;
    // Samples every 250 ms for 100 s in two namespaces, some on exact window edges.
    let timestamps: Vec<i64> = (0..400).map(|i| base + i * 250).collect();
    let mut lines = Vec::new();
    for ns in ["ns-a", "ns-b"] {
        for name in ["network_bytes_sent", "requests_total"] {
            let samples: Vec<(i64, f64)> = timestamps
                .iter()
                .enumerate()
                .map(|(i, t)| (*t, i as f64))
                .collect();
            lines.push(victoria_metrics::series(
                &[
                    ("__name__", name),
                    ("namespace", ns),
                    ("resource_kind", "Gateway"),
                ],
                &samples,
            ));
        }
    }
    server.import(&lines).await;

    let matchers = vec![r#"{namespace="ns-a", __name__=~"network_.*|requests_.*"}"#.to_owned()];
    let mut checkpoint = Checkpoint {
        next_start_ms: base,
    };
    let pull_now = base + 100_000 + 5_000;
    let mut seen = Vec::new();
    let mut pulls = 0;
    // VictoriaMetrics may need a moment to make imported samples searchable.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let source = VictoriaMetricsSource::new(&server.base).unwrap();
        let first = source.export(&matchers, base, pull_now).await.unwrap();
        if first.iter().map(|s| s.timestamps.len()).sum::<usize>() == 2 * timestamps.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "imported samples never became visible"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    loop {
        // Every third pull restarts from the persisted checkpoint with a new client.
        let saved = serde_json::to_string(&checkpoint).unwrap();
        checkpoint = serde_json::from_str(&saved).unwrap();
        let source = VictoriaMetricsSource::new(&server.base).unwrap();
        let mut more = false;
        for _ in 0..3 {
            match source
                .pull(
                    &matchers,
                    &mut checkpoint,
                    pull_now,
                    Duration::from_millis(7_000),
                    Duration::from_secs(2),
                )
                .await
                .unwrap()
            {
                None => break,
                Some(series) => {
                    more = true;
                    pulls += 1;
                    for s in series {
                        assert_eq!(s.labels["namespace"], "ns-a");
                        for t in &s.timestamps {
                            seen.push((s.labels["__name__"].clone(), *t));
                        }
                    }
                }
            }
        }
        if !more {
            break;
        }
    }
    assert!(pulls >= 14, "{pulls} pulls");
    let unique: BTreeSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "a sample was read twice");
    let expected: BTreeSet<_> = ["network_bytes_sent", "requests_total"]
        .iter()
        .flat_map(|n| timestamps.iter().map(move |t| (n.to_string(), *t)))
        .collect();
    assert_eq!(unique, expected, "a sample was skipped");
    assert_eq!(checkpoint.next_start_ms, pull_now - 2_000 + 1);
}
