//! A real VictoriaMetrics (Debian's `victoria-metrics` package) started on
//! loopback for a test, with its data in a temporary directory, and the
//! JSON-lines import the tests feed it with.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running VictoriaMetrics; killed when dropped.
pub struct VictoriaMetrics {
    child: Child,
    pub base: String,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Drop for VictoriaMetrics {
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

/// Starts VictoriaMetrics, or `None` (and a SKIPPED line) when it is not
/// installed. CI (`.ci/run`) installs it and sets `TALLY_REQUIRE_PEERS`, so
/// there a test can never pass by skipping.
pub async fn start() -> Option<VictoriaMetrics> {
    let Some(binary) = binary() else {
        assert!(
            std::env::var_os("TALLY_REQUIRE_PEERS").is_none(),
            "victoria-metrics is not installed (apt-get install -y victoria-metrics)"
        );
        eprintln!(
            "SKIPPED: victoria-metrics is not installed (apt-get install -y victoria-metrics)"
        );
        return None;
    };
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
        // Fresh samples are visible at once; the default 30 s offset made
        // every instant query of a just-pushed series wait half a minute.
        .arg("-search.latencyOffset=0s")
        .arg("-loggerLevel=ERROR")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = VictoriaMetrics {
        child,
        base: format!("http://127.0.0.1:{port}"),
        client: tally_delivery::client_builder().build().unwrap(),
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = server
            .client
            .get(format!("{}/health", server.base))
            .send()
            .await
            && r.status().is_success()
        {
            return Some(server);
        }
        assert!(Instant::now() < deadline, "VictoriaMetrics did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One series to import: labels (with `__name__`) and (ms, value) samples.
pub fn series(labels: &[(&str, &str)], samples: &[(i64, f64)]) -> String {
    let metric: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
        .collect();
    let values: Vec<f64> = samples.iter().map(|(_, v)| *v).collect();
    let timestamps: Vec<i64> = samples.iter().map(|(t, _)| *t).collect();
    serde_json::json!({"metric": metric, "values": values, "timestamps": timestamps}).to_string()
}

impl VictoriaMetrics {
    /// Imports JSON lines (`/api/v1/import`) and makes them searchable at once.
    pub async fn import(&self, lines: &[String]) {
        let r = self
            .client
            .post(format!("{}/api/v1/import", self.base))
            .body(lines.join("\n") + "\n")
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "import: {}", r.status());
        self.flush().await;
    }

    /// Makes what was imported searchable.
    pub async fn flush(&self) {
        let r = self
            .client
            .get(format!("{}/internal/force_flush", self.base))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "force_flush: {}", r.status());
    }

    /// Samples `/api/v1/export` has for `selector` in `[start_ms, end_ms]`.
    pub async fn count(&self, selector: &str, start_ms: i64, end_ms: i64) -> usize {
        let source = tally_telemetry::victoria::VictoriaMetricsSource::new(&self.base).unwrap();
        source
            .export(&[selector.to_owned()], start_ms, end_ms)
            .await
            .unwrap()
            .iter()
            .map(|s| s.timestamps.len())
            .sum()
    }
}
