//! The node agent's compute inputs through the real binaries: `tally
//! collect --instances` takes lifecycle CloudEvents from a node's
//! controllers and forwards them to a real `tally serve`, durably, across a
//! serve restart and a kill -9 of the agent while it holds events; `tally
//! collect --instance-log PATTERN` tails kubelet-style CRI log files through
//! rename and copytruncate rotation (Debian's `logrotate`) and kill -9 of
//! the agent, and serve holds every record once, whole and in order.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

mod common;

use common::http;

const ADMIN: &str = "admin-secret";
const INGEST: &str = "agent-secret";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `tally serve` on `port` (so it can come back at the same address) with
/// its data in `dir/data`.
fn serve(dir: &Path, port: u16) -> common::Server {
    std::fs::create_dir_all(dir).unwrap();
    let config = dir.join("tally.yaml");
    std::fs::write(
        &config,
        format!("token: {ADMIN}\ntokens:\n- {{name: agents, token: {INGEST}, scopes: [ingest]}}\n"),
    )
    .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
    command
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--config",
        ])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit());
    common::spawn(command)
}

/// `tally collect --instances` forwarding to `serve_base`.
fn agent(state: &Path, serve_base: &str) -> common::Server {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
    command
        .args(["--token", INGEST, "collect", "--instances", "--listen"])
        .args(["127.0.0.1:0", "--ledger", serve_base])
        .args(["--max-backoff-secs", "1", "--batch-timeout-ms", "50"])
        .arg("--state-dir")
        .arg(state)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit());
    common::spawn(command)
}

fn lifecycle(id: &str, kind: &str, instance: &str) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "node-7/instance-controller",
           "type": format!("com.datumapis.compute.instance.{kind}"), "subject": instance,
           "time": jiff::Timestamp::now().to_string(),
           "data": {"project": "acme", "instance": instance, "node": "node-7"}})
}

async fn post(agent: &str, events: &[Value]) -> (StatusCode, Value) {
    let r = http()
        .post(format!("{agent}/v1/instances/events"))
        .header("content-type", "application/cloudevents-batch+json")
        .body(Value::from(events.to_vec()).to_string())
        .send()
        .await
        .unwrap();
    let status = r.status();
    let content_type = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let body: Value = r.json().await.unwrap_or(Value::Null);
    if status != StatusCode::ACCEPTED {
        assert_eq!(content_type.as_deref(), Some("application/problem+json"));
    }
    (status, body)
}

/// The ids serve holds for `instance`, in arrival order.
async fn stored(serve: &str, instance: &str) -> Vec<String> {
    let Ok(r) = http()
        .get(format!(
            "{serve}/api/v1/instances/{instance}/events?project=acme&limit=100"
        ))
        .bearer_auth(ADMIN)
        .send()
        .await
    else {
        return Vec::new();
    };
    if r.status() != StatusCode::OK {
        return Vec::new();
    }
    let page: Value = r.json().await.unwrap();
    let mut ids: Vec<String> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

async fn wait_for(serve: &str, instance: &str, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let have = stored(serve, instance).await;
        if have == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "serve holds {have:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn lifecycle_events_reach_serve_through_a_serve_restart_and_an_agent_kill() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = serve(&dir.path().join("serve"), port);
    let state = dir.path().join("agent");
    let node = agent(&state, &server.base);

    // Validated as serve validates: one bad event refuses the request whole.
    let mut bad = lifecycle("bad", "started", "web-0");
    bad["data"]["project"] = json!("Not A Name");
    bad["type"] = json!("com.datumapis.compute.instance.exploded");
    let (status, problem) = post(&node.base, &[lifecycle("x1", "created", "web-0"), bad]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}");
    let fields: Vec<&str> = problem["errors"][0]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        (problem["errors"][0]["index"].as_u64(), fields),
        (Some(1), vec!["type"])
    );

    let (status, body) = post(
        &node.base,
        &[
            lifecycle("e1", "created", "web-0"),
            lifecycle("e2", "scheduled", "web-0"),
        ],
    )
    .await;
    assert_eq!(
        (status, body),
        (StatusCode::ACCEPTED, json!({"accepted": 2}))
    );
    wait_for(&server.base, "web-0", &["e1", "e2"]).await;

    // Serve goes away: the agent still takes events, keeps them on disk,
    // and survives a kill -9 while it holds them.
    drop(server);
    let (status, _) = post(
        &node.base,
        &[
            lifecycle("e3", "started", "web-0"),
            lifecycle("e4", "crashed", "web-0"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    drop(node); // SIGKILL
    let node = agent(&state, &format!("http://127.0.0.1:{port}"));
    // A controller's retry of an event already forwarded is harmless.
    let (status, _) = post(
        &node.base,
        &[
            lifecycle("e5", "stopped", "web-0"),
            lifecycle("e1", "created", "web-0"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let server = serve(&dir.path().join("serve"), port);
    wait_for(&server.base, "web-0", &["e1", "e2", "e3", "e4", "e5"]).await;

    // The agent reports what it forwarded.
    let metrics = http()
        .get(format!("{}/metrics", node.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tally_component_sent_total{")
                && l.contains("component_id=\"instances\"")
                && !l.ends_with(" 0")),
        "{metrics}"
    );
}

/// `tally collect --instance-log PATTERN` forwarding to `serve_base`.
fn log_agent(state: &Path, pattern: &str, serve_base: &str) -> common::Server {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
    command
        .args(["--token", INGEST, "collect", "--instance-log", pattern])
        .args(["--listen", "127.0.0.1:0", "--ledger", serve_base])
        .args(["--max-backoff-secs", "1", "--batch-timeout-ms", "50"])
        .args(["--poll-interval-ms", "20"])
        .arg("--state-dir")
        .arg(state)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit());
    common::spawn(command)
}

/// Writes records `range` to `log` as CRI lines: every 7th record is split
/// in three `P`/`P`/`F` pieces, every 5th goes to stderr, record 13 is
/// 100 KiB (past the 64 KiB limit) and record 14 is 60 KiB in three pieces
/// (kept whole). Returns each record's expected text.
fn write_records(log: &Path, range: std::ops::Range<usize>, base: jiff::Timestamp) -> Vec<String> {
    let mut text = String::new();
    let mut expected = Vec::new();
    for n in range {
        let time = base + jiff::SignedDuration::from_micros(n as i64);
        let stream = if n % 5 == 0 { "stderr" } else { "stdout" };
        let record = if n == 13 {
            "x".repeat(100 * 1024)
        } else if n == 14 {
            "y".repeat(60 * 1024)
        } else {
            format!("record {n} of instance web-0 with some text")
        };
        if n % 7 == 0 || n == 14 {
            let (a, rest) = record.split_at(record.len() / 3);
            let (b, c) = rest.split_at(rest.len() / 2);
            text.push_str(&format!("{time} {stream} P {a}\n{time} {stream} P {b}\n"));
            text.push_str(&format!("{time} {stream} F {c}\n"));
        } else {
            text.push_str(&format!("{time} {stream} F {record}\n"));
        }
        let marker = " …[truncated by tally]";
        expected.push(if record.len() > 65_536 {
            format!("{}{marker}", &record[..65_536 - marker.len()])
        } else {
            record
        });
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file.sync_all().unwrap();
    expected
}

/// The lines serve holds for acme/web-0, oldest first.
async fn log_lines(serve: &str) -> Vec<String> {
    let Ok(r) = http()
        .get(format!(
            "{serve}/api/v1/projects/acme/instances/web-0/logs?since=24h&limit=10000"
        ))
        .bearer_auth(ADMIN)
        .send()
        .await
    else {
        return Vec::new();
    };
    let page: Value = r.json().await.unwrap_or(Value::Null);
    page["lines"]
        .as_array()
        .map(|lines| {
            lines
                .iter()
                .map(|l| l["line"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

async fn wait_for_lines(serve: &str, want: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let have = log_lines(serve).await;
        if have == want {
            return;
        }
        if Instant::now() > deadline {
            let short: Vec<String> = have.iter().map(|l| l.chars().take(40).collect()).collect();
            panic!(
                "serve holds {} lines, expected {}: {short:?}",
                have.len(),
                want.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn instance_log_files_arrive_whole_once_and_in_order_through_rotation_and_kill_9() {
    let Some(logrotate) = tally_testkit::logrotate::binary() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = serve(&dir.path().join("serve"), free_port());
    let pods = dir.path().join("pods");
    let container = pods.join("acme_web-0_0f3c").join("app");
    std::fs::create_dir_all(&container).unwrap();
    let log = container.join("0.log");
    let pattern = format!("{}/{{project}}_{{instance}}_*/*/*.log", pods.display());
    let state = dir.path().join("agent");
    let base = jiff::Timestamp::now() - jiff::SignedDuration::from_mins(30);
    let mut expected = write_records(&log, 0..200, base);
    let agent = log_agent(&state, &pattern, &server.base);
    wait_for_lines(&server.base, &expected).await;

    // Rotation by rename while the agent runs, then kill -9 mid-stream.
    expected.extend(write_records(&log, 200..300, base));
    std::fs::rename(&log, container.join("0.log.20261206-1")).unwrap();
    expected.extend(write_records(&log, 300..5300, base));
    // SIGKILL once serve holds some of those 5,000 (most likely not all):
    // a checkpoint inside the new file. (A file the agent never read
    // into, copied and truncated while it is down, is the documented gap
    // of `tally_collect::tail`: there is no fingerprint to find its copy by.)
    let deadline = Instant::now() + Duration::from_secs(90);
    while log_lines(&server.base).await.len() <= 300 {
        assert!(Instant::now() < deadline, "none of the new file arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(agent);
    expected.extend(write_records(&log, 5300..5400, base));

    // copytruncate by Debian's logrotate while the agent is down.
    let config = dir.path().join("logrotate.conf");
    std::fs::write(
        &config,
        format!(
            "{} {{\n  rotate 5\n  copytruncate\n  nocompress\n  missingok\n}}\n",
            log.display()
        ),
    )
    .unwrap();
    let rotated = Command::new(&logrotate)
        .arg("-f")
        .arg("-s")
        .arg(dir.path().join("logrotate.state"))
        .arg(&config)
        .output()
        .unwrap();
    assert!(rotated.status.success(), "{rotated:?}");
    expected.extend(write_records(&log, 5400..5500, base));
    let _agent = log_agent(&state, &pattern, &server.base);
    wait_for_lines(&server.base, &expected).await;
}
