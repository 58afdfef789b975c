//! Starting `tally serve` and `tally export` for the integration tests.
// Each test binary uses some of these helpers.
#![allow(dead_code)]

pub mod billing;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

/// A `tally serve` or `tally export` child process; killed when dropped.
pub struct Server {
    pub child: Child,
    pub base: String,
    /// `host:port` of the OTLP/gRPC receiver, if it listens.
    pub grpc: Option<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `tally serve` on a free loopback port with its store in `dir` and
/// the extra environment `env`; returns once it prints where it listens.
pub fn serve(dir: &Path, env: &[(&str, &str)]) -> Server {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stderr(Stdio::inherit());
    spawn(command)
}

/// Starts `tally serve` on a free loopback port with `config_text` as its
/// config file and its store in `dir/data`.
pub fn serve_with_config(dir: &Path, config_text: &str) -> Server {
    let config = dir.join("tally.yaml");
    std::fs::write(&config, config_text).expect("write the config file");
    let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit());
    spawn(command)
}

/// Starts `tally serve` with `admin` as its admin token and a
/// `project:<name>` token for each (name, token) of `projects`.
pub fn serve_with_tokens(dir: &Path, admin: &str, projects: &[(&str, &str)]) -> Server {
    let mut config = format!("token: {admin}\ntokens:\n");
    for (name, token) in projects {
        config.push_str(&format!(
            "- {{name: {name}, token: {token}, scopes: [\"project:{name}\"]}}\n"
        ));
    }
    serve_with_config(dir, &config)
}

/// Starts `tally export` on a free loopback port with its data in `dir`,
/// the extra arguments `args` and environment `env`.
pub fn export(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
    command
        .args(["export", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .args(args)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stderr(Stdio::inherit());
    spawn(command)
}

/// Spawns a prepared `tally serve` or `tally export` command (stdout is
/// taken over) and waits for the line that says where it listens.
pub fn spawn(mut command: Command) -> Server {
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .expect("start tally serve");
    let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .expect("read the listening line");
    // Keep draining stdout so the server never writes into a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    let base = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    let grpc = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc://"))
        .map(str::to_owned);
    Server { child, base, grpc }
}

/// The standard output of a command that must have succeeded (else the
/// test fails, showing its standard error).
pub fn ok(output: Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Runs the `tally` CLI against the server at `base` with `token`, feeding
/// it `stdin`; returns what it printed and how it exited.
pub fn cli(base: &str, token: &str, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .env("TALLY_SERVER", base)
        .env("TALLY_TOKEN", token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

/// An HTTP client for the tests' requests (the delivery crate's builder,
/// 30 s timeout).
pub fn http() -> reqwest::Client {
    tally_delivery::client_builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// `GET base+path`, with `token` when given: the answer's text (e.g.
/// `/metrics`).
pub async fn get_text(base: &str, token: Option<&str>, path: &str) -> String {
    let mut request = http().get(format!("{base}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap().text().await.unwrap()
}

/// Acknowledged events not yet materialised (`tally_materialise_lag_events`
/// on `/metrics`, which needs no token).
pub async fn materialise_lag(base: &str) -> u64 {
    let text = get_text(base, None, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix("tally_materialise_lag_events "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no tally_materialise_lag_events in {text}"))
}

/// `POST base+path` of a protobuf `body` with `token` (an OTLP/HTTP
/// request), answered 200, or the test fails with the answer's text.
pub async fn post_protobuf(base: &str, token: &str, path: &str, body: Vec<u8>) -> Vec<u8> {
    let response = http()
        .post(format!("{base}{path}"))
        .bearer_auth(token)
        .header("content-type", "application/x-protobuf")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let answer = response.bytes().await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    answer.to_vec()
}

/// `GET base+path` with `token`: the status and the JSON answer (`null` if
/// it is not JSON).
pub async fn get(base: &str, token: &str, path: &str) -> (StatusCode, Value) {
    let r = http()
        .get(format!("{base}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}
