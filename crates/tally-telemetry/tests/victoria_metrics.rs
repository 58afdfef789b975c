//! The pull source against a real VictoriaMetrics started on loopback
//! (Debian's `victoria-metrics` package). Windows with restarts in between
//! must neither skip nor repeat a sample.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tally_telemetry::victoria::{Checkpoint, VictoriaMetricsSource};

struct Server {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn binary() -> Option<&'static str> {
    [
        "/usr/bin/victoria-metrics",
        "/usr/bin/victoria-metrics-prod",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
}

async fn start(binary: &str) -> Server {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(binary)
        .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
        .arg(format!("-storageDataPath={}", dir.path().display()))
        .arg("-retentionPeriod=100y")
        .arg("-search.disableCache")
        .arg("-loggerLevel=ERROR")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server {
        child,
        base: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    };
    let client = tally_delivery::client_builder().build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get(format!("{}/health", server.base)).send().await
            && r.status().is_success()
        {
            return server;
        }
        assert!(Instant::now() < deadline, "VictoriaMetrics did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_and_restarts_neither_skip_nor_repeat_samples() {
    let Some(binary) = binary() else {
        // CI (`.ci/run`) installs the server and sets this, so there the
        // test can never pass by skipping.
        assert!(
            std::env::var_os("TALLY_REQUIRE_PEERS").is_none(),
            "victoria-metrics is not installed (apt-get install -y victoria-metrics)"
        );
        eprintln!(
            "SKIPPED: victoria-metrics is not installed (apt-get install -y victoria-metrics)"
        );
        return;
    };
    let server = start(binary).await;
    let client = tally_delivery::client_builder().build().unwrap();
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let base = now_ms - 3_600_000;
    // Samples every 250 ms for 100 s in two namespaces, some on exact window edges.
    let timestamps: Vec<i64> = (0..400).map(|i| base + i * 250).collect();
    let mut lines = String::new();
    for ns in ["ns-a", "ns-b"] {
        for series in ["network_bytes_sent", "requests_total"] {
            let values: Vec<usize> = (0..timestamps.len()).collect();
            lines.push_str(
                &serde_json::json!({
                    "metric": {"__name__": series, "namespace": ns, "resource_kind": "Gateway"},
                    "values": values,
                    "timestamps": timestamps,
                })
                .to_string(),
            );
            lines.push('\n');
        }
    }
    let r = client
        .post(format!("{}/api/v1/import", server.base))
        .body(lines)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "import: {}", r.status());
    client
        .get(format!("{}/internal/force_flush", server.base))
        .send()
        .await
        .unwrap();

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
