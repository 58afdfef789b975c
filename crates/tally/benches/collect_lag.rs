//! End-to-end lag of gateway metering: from an access-log line being
//! appended to the file `tally collect` tails, to its usage being answered
//! by `tally serve`'s query API. Both run as real processes on loopback
//! (release build: `cargo bench -p tally --bench collect_lag`).
//!
//! A background writer appends `BENCH_LAG_RATE` lines/s (default 500) on 50
//! routes; every `BENCH_LAG_EVERY_MS` (default 250) a probe line for a
//! route of its own is appended and the query API is polled every 5 ms
//! until that route's request count appears. `BENCH_LAG_PROBES` probes
//! (default 200). The agent runs with `--window-secs 1
//! --allowed-lateness-secs 0` (`BENCH_LAG_WINDOW_SECS`), so a probe waits
//! for its one-second window to close; the report splits the lag into that
//! wait and the pipeline after it (tail → aggregate → fsync'd outbox →
//! delivery → ledger commit → query). With the default one-minute windows
//! and lateness, add up to two minutes of window wait.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A blocking GET over the workspace's HTTP client.
struct Http {
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
}

impl Http {
    fn new() -> Http {
        Http {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime"),
            client: tally_delivery::client_builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("an HTTP client"),
        }
    }

    /// Status and JSON body, `None` if the request failed.
    fn get(&self, url: &str) -> Option<(u16, serde_json::Value)> {
        self.runtime.block_on(async {
            let response = self.client.get(url).send().await.ok()?;
            let status = response.status().as_u16();
            let body = response.bytes().await.ok()?;
            Some((status, serde_json::from_slice(&body).unwrap_or_default()))
        })
    }
}

fn spawn(args: &[&str], health: &str) -> Process {
    let child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start tally");
    let process = Process(child);
    let http = Http::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.get(health).is_none_or(|(status, _)| status != 200) {
        assert!(Instant::now() < deadline, "tally {args:?} never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    process
}

fn line(at: jiff::Timestamp, route: &str) -> String {
    format!(
        r#"{{"start_time":"{}","method":"GET","path":"/","protocol":"HTTP/1.1","response_code":200,"bytes_received":100,"bytes_sent":1000,"duration":3,"route_name":"httproute/{route}/rule/0","request_id":"-"}}"#,
        at.strftime("%Y-%m-%dT%H:%M:%S%.3fZ")
    ) + "\n"
}

fn append(path: &Path, text: &str) {
    let mut file = OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .expect("open the access log");
    file.write_all(text.as_bytes()).expect("append to the log");
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn main() {
    // `cargo bench` passes `--bench`; a `cargo test` run of benches only
    // checks that this builds.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let probes = env_u64("BENCH_LAG_PROBES", 200);
    let every = Duration::from_millis(env_u64("BENCH_LAG_EVERY_MS", 250));
    let rate = env_u64("BENCH_LAG_RATE", 500).max(1);
    let window = env_u64("BENCH_LAG_WINDOW_SECS", 1).to_string();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let log = dir.path().join("access.log");
    append(&log, "");

    let server_port = free_port();
    let base = format!("http://127.0.0.1:{server_port}");
    let data = dir.path().join("ledger");
    let listen = format!("127.0.0.1:{server_port}");
    let data_arg = data.to_string_lossy().into_owned();
    let _server = spawn(
        &["serve", "--listen", &listen, "--data-dir", &data_arg],
        &format!("{base}/healthz"),
    );
    let meters = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/gateway-meters.yaml");
    let applied = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["apply", "--server", &base, "-f"])
        .arg(&meters)
        .output()
        .expect("run tally apply");
    assert!(applied.status.success(), "tally apply failed");

    let agent_port = free_port();
    let agent_listen = format!("127.0.0.1:{agent_port}");
    let state = dir.path().join("state").to_string_lossy().into_owned();
    let log_arg = log.to_string_lossy().into_owned();
    let _agent = spawn(
        &[
            "collect",
            "--log",
            &log_arg,
            "--ledger",
            &base,
            "--listen",
            &agent_listen,
            "--state-dir",
            &state,
            "--window-secs",
            &window,
            "--allowed-lateness-secs",
            "0",
            "--idle-flush-secs",
            "2",
            "--batch-timeout-ms",
            "50",
            "--poll-interval-ms",
            "20",
        ],
        &format!("http://127.0.0.1:{agent_port}/healthz"),
    );

    // Background traffic keeps event time moving, as on a busy gateway.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let log = log.clone();
        std::thread::spawn(move || {
            let tick = Duration::from_millis(20);
            let per_tick = (rate / 50).max(1);
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let now = jiff::Timestamp::now();
                let mut chunk = String::new();
                for _ in 0..per_tick {
                    chunk.push_str(&line(now, &format!("bg-{}/route-{}", n % 5, n % 50)));
                    n += 1;
                }
                append(&log, &chunk);
                std::thread::sleep(tick);
            }
        })
    };

    let http = Http::new();
    let window_ms = i64::try_from(env_u64("BENCH_LAG_WINDOW_SECS", 1) * 1000).unwrap_or(1000);
    let (mut total, mut after_close) = (Vec::new(), Vec::new());
    for probe in 0..probes {
        let name = format!("probe-{probe}");
        let written = jiff::Timestamp::now();
        let started = Instant::now();
        append(&log, &line(written, &format!("lag/{name}")));
        let url = format!(
            "{base}/api/v1/meters/gateway-requests/query?filterGroupBy%5Bhttproute_name%5D={name}"
        );
        let deadline = started + Duration::from_secs(60);
        loop {
            let seen = http
                .get(&url)
                .and_then(|(_, v)| v["data"].as_array().map(|rows| !rows.is_empty()))
                .unwrap_or(false);
            if seen {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "probe {probe} never became queryable"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let lag = started.elapsed().as_secs_f64() * 1000.0;
        let ms = written.as_millisecond();
        let window_end = ms - ms.rem_euclid(window_ms) + window_ms;
        total.push(lag);
        after_close.push(lag - (window_end - ms) as f64);
        std::thread::sleep(every.saturating_sub(started.elapsed()));
    }
    stop.store(true, Ordering::SeqCst);
    let _ = writer.join();
    for samples in [&mut total, &mut after_close] {
        samples.sort_by(f64::total_cmp);
    }
    println!(
        "collect lag over {probes} probes ({rate} lines/s background, {window} s windows, lateness 0): \
         write → queryable p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; \
         after the window closed p50 {:.0} ms, p99 {:.0} ms",
        percentile(&total, 50.0),
        percentile(&total, 99.0),
        percentile(&total, 100.0),
        percentile(&after_close, 50.0),
        percentile(&after_close, 99.0),
    );
}
