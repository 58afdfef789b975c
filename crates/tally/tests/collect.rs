//! `tally collect` end to end: a generated Envoy access-log corpus, written
//! live with rotation, is collected by the real agent and shipped to a real
//! `tally serve` with the example gateway meters applied. The meters' sums
//! per HTTPRoute must equal the corpus totals exactly, also when the agent
//! is SIGKILLed, when the ledger is down for a while, and when a file is
//! read again from its start with a fresh state directory. OTLP log records
//! arrive over HTTP and over gRPC (a real tonic client), and connection
//! seconds are sampled from a simulated Envoy admin `/stats` endpoint.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tally_collect::{CorpusConfig, CorpusGenerator, ExpectedTotals};

use tally_testkit::otlp_receiver as receiver;
use tally_testkit::progress::Progress;

const METERS: [&str; 4] = [
    "gateway-requests",
    "gateway-ingress-bytes",
    "gateway-egress-bytes",
    "gateway-connection-seconds",
];

/// A child process that is killed when dropped.
struct Process {
    child: Child,
    base: String,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and wait for a clean exit.
    fn stop(mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "tally collect exited with {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("tally collect did not stop on SIGTERM");
    }
}

/// Spawns `tally` listening on `port` and returns once `/healthz` answers.
fn spawn(args: &[&str], extra: &[&Path], port: u16) -> Process {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .args(extra)
        .env(
            "RUST_LOG",
            std::env::var("TALLY_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start tally");
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(&format!("{base}/healthz")).is_none_or(|(status, _)| status != 200) {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("tally {args:?} exited with {status}");
        }
        assert!(Instant::now() < deadline, "tally {args:?} never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    Process { child, base }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `tally serve` on a fixed port, so it can be restarted at the same address.
fn serve(dir: &Path, port: u16) -> Process {
    let listen = format!("127.0.0.1:{port}");
    spawn(&["serve", "--listen", &listen, "--data-dir"], &[dir], port)
}

/// A ledger in `dir/ledger` with the gateway meters applied.
fn ledger(dir: &Path) -> (Process, u16) {
    let port = free_port();
    (ledger_at(&dir.join("ledger"), port), port)
}

/// A ledger with its data in `data`, on `port`, with the gateway meters
/// applied.
fn ledger_at(data: &Path, port: u16) -> Process {
    let server = serve(data, port);
    apply_gateway_meters(&server.base);
    server
}

fn apply_gateway_meters(base: &str) {
    let manifests =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/gateway-meters.yaml");
    let output = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["apply", "--server", base, "-f"])
        .arg(&manifests)
        .output()
        .expect("run tally apply");
    assert!(
        output.status.success(),
        "tally apply failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The agent, reading `logs`, with quick idle flushes and retries.
fn collect(state: &Path, logs: &[&Path], ledger: &str) -> Process {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "collect",
        "--ledger",
        ledger,
        "--listen",
        &listen,
        "--idle-flush-secs",
        "3",
        "--max-backoff-secs",
        "1",
        "--batch-timeout-ms",
        "100",
        "--poll-interval-ms",
        "50",
        "--agent-id",
        "node-a",
        "--state-dir",
    ];
    let state = state.to_str().unwrap();
    args.push(state);
    let mut extra = Vec::new();
    for log in logs {
        extra.push(Path::new("--log"));
        extra.push(*log);
    }
    spawn(&args, &extra, port)
}

fn corpus_config(lines: u64) -> CorpusConfig {
    let now = jiff::Timestamp::now().as_millisecond();
    CorpusConfig {
        seed: 7,
        lines,
        routes: 40,
        projects: 8,
        // Whole minutes, three hours ago: well within the ledger's lateness.
        start_millis: now - now.rem_euclid(60_000) - 3 * 3_600_000,
        step_millis: 20,
        huge_per_mille: 3,
        ..CorpusConfig::default()
    }
}

/// Writes a corpus in chunks, rotating `path` by rename every
/// `rotate_every` lines, calling `between` after each chunk.
struct LiveWriter {
    path: PathBuf,
    generator: CorpusGenerator,
    file: File,
    in_file: u64,
    rotated: usize,
    rotate_every: Option<u64>,
}

impl LiveWriter {
    fn new(path: &Path, config: CorpusConfig, rotate_every: Option<u64>) -> Self {
        LiveWriter {
            path: path.to_owned(),
            generator: CorpusGenerator::new(config),
            file: File::create(path).unwrap(),
            in_file: 0,
            rotated: 0,
            rotate_every,
        }
    }

    /// Writes up to `lines` lines; false when the corpus is done.
    fn write(&mut self, lines: u64) -> bool {
        let mut chunk = String::new();
        for _ in 0..lines {
            let Some(line) = self.generator.next() else {
                self.file.write_all(chunk.as_bytes()).unwrap();
                return false;
            };
            if self.rotate_every.is_some_and(|n| self.in_file >= n) {
                self.file.write_all(chunk.as_bytes()).unwrap();
                chunk.clear();
                self.rotated += 1;
                let mut name = self.path.as_os_str().to_owned();
                name.push(format!(".{}", self.rotated));
                fs::rename(&self.path, PathBuf::from(name)).unwrap();
                self.file = File::create(&self.path).unwrap();
                self.in_file = 0;
            }
            chunk.push_str(&line);
            chunk.push('\n');
            self.in_file += 1;
        }
        self.file.write_all(chunk.as_bytes()).unwrap();
        true
    }

    fn expected(&self) -> ExpectedTotals {
        self.generator.expected().clone()
    }
}

/// (namespace, name) → [requests, ingress, egress, connection milliseconds].
type PerRoute = BTreeMap<(String, String), [u128; 4]>;

fn expected_per_route(expected: &ExpectedTotals) -> PerRoute {
    expected
        .per_route
        .iter()
        .map(|(route, t)| {
            (
                (route.namespace.clone(), route.name.clone()),
                [
                    u128::from(t.requests),
                    t.ingress_bytes,
                    t.egress_bytes,
                    t.connection_millis,
                ],
            )
        })
        .collect()
}

/// An exact decimal number of seconds as milliseconds (the ledger may
/// write more fractional digits; past the third they must be zeros).
fn millis(value: &Value) -> u128 {
    let text = match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let (whole, fraction) = text.split_once('.').unwrap_or((&text, ""));
    let (kept, rest) = fraction.split_at(fraction.len().min(3));
    assert!(
        rest.bytes().all(|b| b == b'0'),
        "finer than a millisecond: {text}"
    );
    tally_collect::seconds_as_millis(&format!("{whole}.{kept:0<3}"))
        .unwrap_or_else(|| panic!("not a decimal: {text}"))
}

/// Column `index` of a [`PerRoute`] from a ledger value.
fn amount(index: usize, value: &Value) -> u128 {
    if index == 3 {
        millis(value)
    } else {
        number(value)
    }
}

fn number(value: &Value) -> u128 {
    match value {
        Value::String(s) => s.parse().unwrap_or_else(|_| panic!("not an integer: {s}")),
        other => other
            .to_string()
            .parse()
            .unwrap_or_else(|_| panic!("not an integer: {other}")),
    }
}

/// GET `url`: status and body, `None` if the request failed.
fn get(url: &str) -> Option<(u16, String)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = tally_delivery::client_builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let response = client.get(url).send().await.ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.ok()?))
    })
}

/// The ledger's sums per HTTPRoute; `None` while a meter is not ready.
fn metered(base: &str) -> Option<PerRoute> {
    let mut per_route = PerRoute::new();
    for (index, meter) in METERS.iter().enumerate() {
        let (status, body) = get(&format!(
            "{base}/api/v1/meters/{meter}/query?groupBy=httproute_namespace&groupBy=httproute_name"
        ))?;
        if status != 200 {
            return None;
        }
        let body: Value = serde_json::from_str(&body).ok()?;
        for row in body["data"].as_array()? {
            let group = &row["groupBy"];
            let key = (
                group["httproute_namespace"].as_str()?.to_owned(),
                group["httproute_name"].as_str()?.to_owned(),
            );
            per_route.entry(key).or_default()[index] += amount(index, &row["value"]);
        }
    }
    Some(per_route)
}

/// Waits until the ledger's sums equal the corpus's, or fails showing the
/// difference; then checks them by billing account and that nothing is
/// quarantined.
fn assert_metered(base: &str, expected: &ExpectedTotals, within: Duration) {
    wait_metered(base, &expected_per_route(expected), within);
    assert_metered_by_account(base, expected);
    let (_, quarantine) = get(&format!("{base}/api/v1/quarantine")).unwrap();
    let quarantine: Value = serde_json::from_str(&quarantine).unwrap();
    let entries = quarantine["data"]
        .as_array()
        .or_else(|| quarantine.as_array())
        .map_or(0, Vec::len);
    assert_eq!(entries, 0, "nothing may be quarantined: {quarantine}");
}

/// Waits until the ledger's sums per HTTPRoute equal `want`, or fails
/// showing the difference once they have not moved for `stall` (a loaded
/// host slows the agent down; a stuck one stops it).
fn wait_metered(base: &str, want: &PerRoute, stall: Duration) {
    let mut progress = Progress::new("the metered sums", stall);
    let mut last: Option<PerRoute>;
    loop {
        last = metered(base);
        if last.as_ref() == Some(want) {
            break;
        }
        if let Err(why) = progress.check(last.clone()) {
            eprintln!("{why}");
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let got = last.unwrap_or_default();
    let diff: Vec<_> = want
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k:?}: want {v:?}, got {:?}", got.get(k)))
        .take(5)
        .collect();
    assert!(
        got == *want,
        "ledger sums differ from the expected ({} of {} routes differ; {} routes metered): {diff:#?}",
        want.iter().filter(|(k, v)| got.get(*k) != Some(*v)).count(),
        want.len(),
        got.len()
    );
}

/// Binds every project of the corpus but the last to one of two billing
/// accounts, after the usage is stored (so attribution is retroactive),
/// and checks the meters grouped by billing account against the corpus: the
/// unbound project's usage is there, without an account.
fn assert_metered_by_account(base: &str, expected: &ExpectedTotals) {
    let projects: Vec<&String> = expected.per_project.keys().collect();
    let account_of = |project: &str| {
        let index = projects.iter().position(|p| *p == project)?;
        (index + 1 < projects.len()).then(|| format!("acct-{}", index % 2))
    };
    let mut manifests = String::new();
    for account in ["acct-0", "acct-1"] {
        manifests.push_str(&format!(
            "---\napiVersion: billing.miloapis.com/v1alpha1\nkind: BillingAccount\n\
             metadata: {{name: {account}, uid: uid-{account}}}\nspec: {{currencyCode: USD}}\n"
        ));
    }
    for project in &projects {
        if let Some(account) = account_of(project) {
            manifests.push_str(&format!(
                "---\napiVersion: billing.miloapis.com/v1alpha1\nkind: BillingAccountBinding\n\
                 metadata: {{name: bind-{project}}}\nspec: {{billingAccountRef: {{name: {account}}}, \
                 projectRef: {{name: {project}}}}}\n\
                 status: {{billingResponsibility: {{establishedAt: '2000-01-01T00:00:00Z'}}}}\n"
            ));
        }
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["apply", "--server", base, "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tally apply");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(manifests.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "applying bindings: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut want: BTreeMap<Option<String>, [u128; 4]> = BTreeMap::new();
    for (route, totals) in expected_per_route(expected) {
        let project = expected
            .per_route
            .keys()
            .find(|r| {
                (r.namespace.as_str(), r.name.as_str()) == (route.0.as_str(), route.1.as_str())
            })
            .map(|r| r.project.clone())
            .unwrap();
        let sums = want.entry(account_of(&project)).or_default();
        for (sum, value) in sums.iter_mut().zip(totals) {
            *sum += value;
        }
    }
    let mut got: BTreeMap<Option<String>, [u128; 4]> = BTreeMap::new();
    for (index, meter) in METERS.iter().enumerate() {
        let (status, body) = get(&format!(
            "{base}/api/v1/meters/{meter}/query?groupBy=billing_account"
        ))
        .unwrap();
        assert_eq!(status, 200, "{body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        for row in body["data"].as_array().unwrap() {
            let account = row["groupBy"]["billing_account"]
                .as_str()
                .map(str::to_owned);
            got.entry(account).or_default()[index] += amount(index, &row["value"]);
        }
    }
    assert_eq!(got, want, "usage per billing account");
}

/// `tally_component_*` samples of the agent whose name contains `filter`.
fn metric(base: &str, family: &str, filter: &str) -> u64 {
    let (_, text) = get(&format!("{base}/metrics")).unwrap();
    text.lines()
        .filter(|l| l.starts_with(&format!("tally_component_{family}{{")) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn agent_sigkilled_mid_corpus_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = ledger(dir.path());
    let log = dir.path().join("access.log");
    let state = dir.path().join("state");
    let mut writer = LiveWriter::new(&log, corpus_config(40_000), Some(9_000));
    let mut agent = collect(&state, &[&log], &server.base);
    let mut chunks = 0;
    while writer.write(1_000) {
        chunks += 1;
        std::thread::sleep(Duration::from_millis(40));
        if chunks % 9 == 0 {
            agent.kill();
            agent = collect(&state, &[&log], &server.base);
        }
    }
    let expected = writer.expected();
    assert!(writer.rotated >= 3, "the corpus was rotated mid-stream");
    assert_metered(&server.base, &expected, Duration::from_secs(120));
    // The last agent's metrics account for every unusable line.
    let malformed = ["invalid_json", "invalid_start_time", "missing_start_time"]
        .iter()
        .map(|r| metric(&agent.base, "dropped_total", &format!("reason=\"{r}\"")))
        .sum::<u64>();
    assert_eq!(malformed, expected.malformed);
    let unattributable = ["missing_route_name", "unknown_route_name"]
        .iter()
        .map(|r| metric(&agent.base, "dropped_total", &format!("reason=\"{r}\"")))
        .sum::<u64>();
    assert_eq!(unattributable, expected.unattributable);
    agent.stop();
}

#[test]
fn ledger_down_for_part_of_the_run_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let data = dir.path().join("ledger");
    let mut server = Some(ledger_at(&data, port));
    let base = server.as_ref().unwrap().base.clone();
    let log = dir.path().join("access.log");
    let state = dir.path().join("state");
    let mut writer = LiveWriter::new(&log, corpus_config(30_000), Some(12_000));
    let agent = collect(&state, &[&log], &base);
    let mut chunks = 0;
    while writer.write(1_000) {
        chunks += 1;
        std::thread::sleep(Duration::from_millis(40));
        if chunks == 8 {
            server.take().unwrap().kill();
        }
        if chunks == 22 {
            server = Some(serve(&data, port));
        }
    }
    let expected = writer.expected();
    assert_metered(&base, &expected, Duration::from_secs(120));
    assert!(
        metric(&agent.base, "retries_total", "component_id=\"ledger\"") > 0,
        "the agent retried while the ledger was down"
    );
    agent.stop();
}

#[test]
fn reading_a_file_again_from_its_start_counts_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = ledger(dir.path());
    let log = dir.path().join("access.log");
    let mut writer = LiveWriter::new(&log, corpus_config(20_000), None);
    while writer.write(20_000) {}
    let expected = writer.expected();
    let first = collect(&dir.path().join("state-1"), &[&log], &server.base);
    assert_metered(&server.base, &expected, Duration::from_secs(120));
    first.stop();
    // A fresh state directory: the whole file is read and shipped again,
    // with the same event ids.
    let second = collect(&dir.path().join("state-2"), &[&log], &server.base);
    wait_shipped_all(&second, Duration::from_secs(30));
    assert_metered(&server.base, &expected, Duration::from_secs(5));
    second.stop();
}

/// POSTs `body` to `url`; status and answer.
fn post(url: &str, content_type: &str, gzip: bool, body: Vec<u8>) -> (u16, Vec<u8>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = tally_delivery::client_builder().build().unwrap();
        let mut request = client
            .post(url)
            .header("content-type", content_type)
            .body(body);
        if gzip {
            request = request.header("content-encoding", "gzip");
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.bytes().await.unwrap().to_vec())
    })
}

#[test]
fn otlp_log_records_are_metered_like_file_lines() {
    use opentelemetry_proto::tonic::collector::logs::v1::{
        ExportLogsServiceRequest, ExportLogsServiceResponse,
    };
    use prost::Message;

    let dir = tempfile::tempdir().unwrap();
    let (server, _) = ledger(dir.path());
    let (agent, _) = otlp_agent(&dir.path().join("state"), &server.base, &[]);
    let nanos = (jiff::Timestamp::now().as_millisecond() - 2 * 3_600_000) as u128 * 1_000_000;
    let record = |bytes_sent: u64, duration: &str| {
        serde_json::json!({
            "timeUnixNano": nanos.to_string(),
            "attributes": [
                {"key": "route_name", "value": {"stringValue": "httproute/ns-otlp/api/rule/0"}},
                {"key": "bytes_received", "value": {"stringValue": "100"}},
                {"key": "bytes_sent", "value": {"intValue": bytes_sent.to_string()}},
                {"key": "duration", "value": {"stringValue": duration}},
            ]
        })
    };
    let request = serde_json::json!({"resourceLogs": [{"scopeLogs": [{"logRecords": [
        record(5_000_000_000, "1500"), record(7, "600"), {"timeUnixNano": nanos.to_string()}
    ]}]}]});
    let (status, answer) = post(
        &format!("{}/v1/logs", agent.base),
        "application/json",
        false,
        serde_json::to_vec(&request).unwrap(),
    );
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    // OTLP/JSON readers take int64 as a number or a string.
    let rejected = answer["partialSuccess"]["rejectedLogRecords"].to_string();
    assert_eq!(rejected.trim_matches('"'), "1", "{answer}");
    // The same kind of record again, as gzip'd protobuf.
    let proto: ExportLogsServiceRequest = serde_json::from_value(serde_json::json!(
        {"resourceLogs": [{"scopeLogs": [{"logRecords": [record(3, "900")]}]}]}
    ))
    .unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&proto.encode_to_vec()).unwrap();
    let (status, answer) = post(
        &format!("{}/v1/logs", agent.base),
        "application/x-protobuf",
        true,
        gz.finish().unwrap(),
    );
    assert_eq!(status, 200);
    let answer = ExportLogsServiceResponse::decode(&answer[..]).unwrap();
    assert_eq!(answer.partial_success, None);
    let expected = one_route_totals(
        "ns-otlp",
        "api",
        tally_collect::Totals {
            requests: 3,
            ingress_bytes: 300,
            egress_bytes: 5_000_000_010,
            connection_millis: 3_000,
        },
    );
    assert_metered(&server.base, &expected, Duration::from_secs(120));
    agent.stop();
}

/// Billing is never filtered, and `tally collect` shapes what it reads by
/// the policies of its resource directory, on the same path as `tally
/// serve`: ns-otlp's policy keeps nothing, ns-keep's keeps the 5xx records
/// with two fields. The agent still meters every record of both routes;
/// its exporters receive exactly ns-keep's two 5xx records, and nothing of
/// ns-otlp (counted as dropped by `policy`). The same records sent to the
/// server's own receiver under the same drop-everything policy are all
/// dropped there too.
#[test]
fn billing_counts_every_request_under_a_policy_that_drops_everything() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = ledger(dir.path());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let receiver = runtime.block_on(receiver::Receiver::start());
    let policy = "apiVersion: v1\nkind: Namespace\nmetadata: {name: ns-otlp}\n---\n\
                  apiVersion: telemetry.datumapis.com/v1alpha1\nkind: TelemetryPolicy\n\
                  metadata: {name: nothing, namespace: ns-otlp}\nspec:\n  \
                  targetRefs: [{group: '', kind: Namespace, name: ns-otlp}]\n  \
                  accessLogs: {matches: [{cel: 'false'}]}\n  tracing: {mode: Disabled}\n";
    let output = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["apply", "--server", &server.base, "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child.stdin.take().unwrap().write_all(policy.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let resources = dir.path().join("resources");
    fs::create_dir_all(&resources).unwrap();
    fs::write(
        resources.join("policies.yaml"),
        agent_policies(policy, &receiver),
    )
    .unwrap();
    let config = dir.path().join("collect.yaml");
    fs::write(&config, "egress: {allow: [127.0.0.0/8]}\n").unwrap();
    let (config, resources) = (config.to_str().unwrap(), resources.to_str().unwrap());
    let (agent, grpc_port) = otlp_agent(
        &dir.path().join("state"),
        &server.base,
        &["--config", config, "--resources", resources],
    );
    let nanos = (jiff::Timestamp::now().as_millisecond() - 2 * 3_600_000) as u64 * 1_000_000;
    let records = |route: &str| {
        (0..5)
            .map(|i| {
                let mut record = envoy_log_record(nanos, route, i, "10");
                record.attributes.push(attribute_int(
                    "response_code",
                    [200, 503, 200, 500, 404][i as usize],
                ));
                record
            })
            .collect::<Vec<_>>()
    };
    let mut both = records("httproute/ns-otlp/api/rule/0");
    both.extend(records("httproute/ns-keep/api/rule/0"));
    grpc_export(grpc_port, export_request(both)).unwrap();
    let totals = tally_collect::Totals {
        requests: 5,
        ingress_bytes: 500,
        egress_bytes: 10,
        connection_millis: 50,
    };
    let mut expected = one_route_totals("ns-otlp", "api", totals);
    expected
        .per_route
        .extend(one_route_totals("ns-keep", "api", totals).per_route);
    assert_metered(&server.base, &expected, Duration::from_secs(120));
    // The agent's exporters: exactly ns-keep's two 5xx records, two fields each.
    let kept = runtime
        .block_on(receiver.wait_until("ns-keep", 2, Duration::from_secs(30), |e| e.logs.len()));
    assert_eq!(kept, 2);
    let codes: Vec<_> = receiver.with("ns-keep", |e| {
        e.logs
            .iter()
            .map(|l| {
                assert_eq!(l.attributes.len(), 2, "{l:?}");
                l.attributes["http.response.status_code"].clone()
            })
            .collect()
    });
    assert_eq!(codes, ["503", "500"]);
    let agent_base = agent.base.clone();
    assert_eq!(
        metric(&agent_base, "dropped_total", "component_id=\"policy:otlp\""),
        8
    );
    assert_eq!(receiver.with("ns-otlp", |e| e.logs.len()), 0);
    // The server's own receiver applies the policy: every record dropped.
    let mut dropped = 0;
    for _ in 0..100 {
        let (status, _) = post(
            &format!("{}/v1/logs", server.base),
            "application/x-protobuf",
            false,
            prost::Message::encode_to_vec(&export_request(records("httproute/ns-otlp/api/rule/0"))),
        );
        assert_eq!(status, 200);
        dropped = metric(&server.base, "dropped_total", "reason=\"policy\"");
        if dropped > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(dropped % 5, 0);
    assert!(dropped >= 5, "the policy never applied");
    assert_eq!(
        metric(
            &server.base,
            "sent_total",
            "component_id=\"otlp_http_logs\""
        ),
        0
    );
    agent.stop();
}

/// The agent's resource directory: `ns_otlp` (the server's drop-everything
/// policy and its namespace), ns-keep with a policy keeping 5xx records,
/// and an Exporter with a `logs` source in each namespace.
fn agent_policies(ns_otlp: &str, receiver: &receiver::Receiver) -> String {
    let mut text = format!("{ns_otlp}---\n");
    text += "apiVersion: v1\nkind: Namespace\nmetadata: {name: ns-keep}\n---\n\
             apiVersion: telemetry.datumapis.com/v1alpha1\nkind: TelemetryPolicy\n\
             metadata: {name: errors, namespace: ns-keep}\nspec:\n  \
             targetRefs: [{group: '', kind: Namespace, name: ns-keep}]\n  \
             accessLogs: {matches: [{cel: 'response.code >= 500'}], fields: [response.code, route.httproute]}\n";
    for ns in ["ns-otlp", "ns-keep"] {
        text += &format!(
            "---\napiVersion: telemetry.datumapis.com/v1alpha1\nkind: Exporter\nmetadata: {{name: otlp, namespace: {ns}}}\n\
             spec:\n  sources: [{{name: logs, logs: {{}}}}]\n  \
             sinks: [{{name: r, otlp_http: {{endpoint: '{}'}}, batch: {{timeout: 50ms}}}}]\n",
            receiver.endpoint(ns)
        );
    }
    text
}

fn attribute_int(key: &str, value: i64) -> opentelemetry_proto::tonic::common::v1::KeyValue {
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value as V};
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(V::IntValue(value)),
        }),
        ..Default::default()
    }
}

/// Runs `future` on a fresh current-thread runtime.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// An OTLP log record as Envoy's OpenTelemetry access-log sink sends it:
/// access-log fields as attributes.
fn envoy_log_record(
    nanos: u64,
    route: &str,
    bytes_sent: i64,
    duration_ms: &str,
) -> opentelemetry_proto::tonic::logs::v1::LogRecord {
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value as V};
    let attr = |key: &str, value: V| KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    };
    opentelemetry_proto::tonic::logs::v1::LogRecord {
        time_unix_nano: nanos,
        attributes: vec![
            attr("route_name", V::StringValue(route.into())),
            attr("bytes_received", V::StringValue("100".into())),
            attr("bytes_sent", V::IntValue(bytes_sent)),
            attr("duration", V::StringValue(duration_ms.into())),
        ],
        ..Default::default()
    }
}

fn export_request(
    records: Vec<opentelemetry_proto::tonic::logs::v1::LogRecord>,
) -> opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest {
    use opentelemetry_proto::tonic::logs::v1::{ResourceLogs, ScopeLogs};
    opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            scope_logs: vec![ScopeLogs {
                log_records: records,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// One `LogsService/Export` call over a new gRPC connection.
fn grpc_export(
    port: u16,
    request: opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest,
) -> Result<opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceResponse, tonic::Status>
{
    use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
    block_on(async move {
        let mut client = LogsServiceClient::connect(format!("http://127.0.0.1:{port}"))
            .await
            .map_err(|e| tonic::Status::unavailable(format!("connecting: {e}")))?;
        client
            .export(request)
            .await
            .map(tonic::Response::into_inner)
    })
}

fn one_route_totals(namespace: &str, name: &str, totals: tally_collect::Totals) -> ExpectedTotals {
    ExpectedTotals {
        per_route: [(
            tally_collect::RouteKey {
                project: namespace.into(),
                namespace: namespace.into(),
                name: name.into(),
            },
            totals,
        )]
        .into_iter()
        .collect(),
        ..ExpectedTotals::default()
    }
}

/// The agent with `inputs` (and further flags), quick batches and retries.
fn quick_agent(state: &Path, ledger: &str, inputs: &[&str]) -> Process {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["collect"];
    args.extend_from_slice(inputs);
    args.extend_from_slice(&[
        "--ledger",
        ledger,
        "--listen",
        &listen,
        "--batch-timeout-ms",
        "100",
        "--max-backoff-secs",
        "1",
        "--poll-interval-ms",
        "50",
        "--state-dir",
    ]);
    spawn(&args, &[state], port)
}

/// The agent with OTLP on, gRPC on a free port; returns it and that port.
fn otlp_agent(state: &Path, ledger: &str, extra: &[&str]) -> (Process, u16) {
    let grpc_port = free_port();
    let grpc = format!("127.0.0.1:{grpc_port}");
    let mut inputs = vec![
        "--otlp",
        "--otlp-grpc-listen",
        &grpc,
        "--idle-flush-secs",
        "1",
    ];
    inputs.extend_from_slice(extra);
    (quick_agent(state, ledger, &inputs), grpc_port)
}

#[test]
fn otlp_grpc_exports_are_metered_like_file_lines() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = ledger(dir.path());
    let (agent, grpc_port) = otlp_agent(&dir.path().join("state"), &server.base, &[]);
    let nanos = (jiff::Timestamp::now().as_millisecond() - 2 * 3_600_000) as u64 * 1_000_000;
    let route = "httproute/ns-grpc/api/rule/0/match/0/api.example.com";
    let answer = grpc_export(
        grpc_port,
        export_request(vec![
            envoy_log_record(nanos, route, 4_000_000_000, "2500"),
            envoy_log_record(nanos + 1_000_000, route, 11, "700"),
            // No access-log fields: rejected, the rest still taken.
            opentelemetry_proto::tonic::logs::v1::LogRecord {
                time_unix_nano: nanos,
                ..Default::default()
            },
        ]),
    )
    .expect("the export is answered");
    let partial = answer.partial_success.expect("one record was rejected");
    assert_eq!(partial.rejected_log_records, 1, "{}", partial.error_message);
    let answer = grpc_export(
        grpc_port,
        export_request(vec![envoy_log_record(nanos, route, 9, "1800")]),
    )
    .expect("the export is answered");
    assert_eq!(answer.partial_success, None);
    let expected = one_route_totals(
        "ns-grpc",
        "api",
        tally_collect::Totals {
            requests: 3,
            ingress_bytes: 300,
            egress_bytes: 4_000_000_020,
            connection_millis: 5_000,
        },
    );
    assert_metered(&server.base, &expected, Duration::from_secs(120));
    // Without --resources there is nowhere to send spans: 404 with an
    // OTLP status over HTTP, UNIMPLEMENTED over gRPC.
    let spans = gateway_spans("ns-grpc", 0..1);
    let (status, _) = post(
        &format!("{}/v1/traces", agent.base),
        "application/x-protobuf",
        false,
        prost::Message::encode_to_vec(&spans),
    );
    assert_eq!(status, 404);
    let code = block_on(async move {
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
        let mut client = TraceServiceClient::connect(format!("http://127.0.0.1:{grpc_port}"))
            .await
            .unwrap();
        client.export(spans).await.unwrap_err().code()
    });
    assert_eq!(code, tonic::Code::Unimplemented);
    agent.stop();
}

#[test]
fn otlp_grpc_answers_unavailable_while_the_outbox_is_full() {
    let dir = tempfile::tempdir().unwrap();
    // A ledger with the meters, then down while the agent fills its outbox.
    let port = free_port();
    let data = dir.path().join("ledger");
    let server = ledger_at(&data, port);
    let base = server.base.clone();
    server.kill();
    let (agent, grpc_port) = otlp_agent(
        &dir.path().join("state"),
        &base,
        &["--otlp-max-outbox-events", "2"],
    );
    let nanos = (jiff::Timestamp::now().as_millisecond() - 2 * 3_600_000) as u64 * 1_000_000;
    let route = "httproute/ns-full/api/rule/0";
    let mut accepted = 0u64;
    let mut refused = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while refused.is_none() && Instant::now() < deadline {
        let request = export_request(vec![envoy_log_record(nanos, route, 10, "1000")]);
        match grpc_export(grpc_port, request) {
            Ok(_) => accepted += 1,
            Err(status) => refused = Some(status),
        }
        // Longer than the idle flush (1 s): the window closes into the
        // outbox, four events (one per meter) each time.
        std::thread::sleep(Duration::from_millis(1_500));
    }
    let refused = refused.expect("the agent refused exports while the ledger was down");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused}");
    assert!(accepted > 0, "exports were taken before the outbox filled");
    // The ledger is back: the outbox drains and exports are taken again.
    let server = serve(&data, port);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let request = export_request(vec![envoy_log_record(nanos, route, 10, "1000")]);
        match grpc_export(grpc_port, request) {
            Ok(_) => {
                accepted += 1;
                break;
            }
            Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status}"),
        }
        assert!(Instant::now() < deadline, "exports were never taken again");
        std::thread::sleep(Duration::from_millis(300));
    }
    let expected = one_route_totals(
        "ns-full",
        "api",
        tally_collect::Totals {
            requests: accepted,
            ingress_bytes: 100 * u128::from(accepted),
            egress_bytes: 10 * u128::from(accepted),
            connection_millis: 1_000 * u128::from(accepted),
        },
    );
    assert_metered(&server.base, &expected, Duration::from_secs(120));
    agent.stop();
}

/// A stand-in for Envoy's admin interface: `GET /stats` answers with the
/// current gauges in Envoy's documented formats (`format=json`:
/// `{"stats":[{"name":…,"value":…}]}`, else `name: value` lines), keeping
/// only stats whose name matches `filter` (a literal here), and records
/// when it answered what. While `down`, it answers 503.
struct FakeEnvoyAdmin {
    port: u16,
    gauges: std::sync::Arc<std::sync::Mutex<AdminState>>,
}

#[derive(Default)]
struct AdminState {
    gauges: Vec<(String, u64)>,
    down: bool,
    /// (Unix ms, gauges) of every successful answer.
    served: Vec<(i64, Vec<(String, u64)>)>,
}

impl FakeEnvoyAdmin {
    fn start(gauges: &[(&str, u64)]) -> FakeEnvoyAdmin {
        use axum::extract::{Query, State};
        use std::sync::{Arc, Mutex};
        type Shared = Arc<Mutex<AdminState>>;
        async fn stats(
            State(state): State<Shared>,
            Query(query): Query<std::collections::HashMap<String, String>>,
        ) -> axum::response::Response {
            use axum::response::IntoResponse;
            let mut state = state.lock().unwrap();
            if state.down {
                return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
            }
            let filter = query.get("filter").cloned().unwrap_or_default();
            let mut all = state.gauges.clone();
            // Stats Envoy always has, which the agent must not bill.
            all.push(("http.admin.downstream_cx_active".into(), 1));
            all.push(("listener.0.0.0.0_10080.downstream_cx_total".into(), 977));
            all.push(("cluster.backend.upstream_cx_active".into(), 6));
            all.retain(|(name, _)| name.contains(&filter));
            let at = jiff::Timestamp::now().as_millisecond();
            let served = state.gauges.clone();
            state.served.push((at, served));
            if query.get("format").map(String::as_str) == Some("json") {
                let mut stats: Vec<Value> = all
                    .iter()
                    .map(|(name, value)| serde_json::json!({"name": name, "value": value}))
                    .collect();
                stats.push(serde_json::json!({"histograms": {
                    "supported_quantiles": [0, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 100],
                    "computed_quantiles": []}}));
                axum::Json(serde_json::json!({ "stats": stats })).into_response()
            } else {
                all.iter()
                    .map(|(name, value)| format!("{name}: {value}\n"))
                    .collect::<String>()
                    .into_response()
            }
        }
        let state: Shared = Arc::new(Mutex::new(AdminState {
            gauges: gauges.iter().map(|(n, v)| ((*n).to_owned(), *v)).collect(),
            ..AdminState::default()
        }));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new()
            .route("/stats", axum::routing::get(stats))
            .with_state(state.clone());
        std::thread::spawn(move || {
            block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let _ = axum::serve(listener, app).await;
            })
        });
        FakeEnvoyAdmin {
            port,
            gauges: state,
        }
    }

    fn set(&self, gauges: &[(&str, u64)]) {
        self.gauges.lock().unwrap().gauges =
            gauges.iter().map(|(n, v)| ((*n).to_owned(), *v)).collect();
    }

    fn set_down(&self) {
        self.gauges.lock().unwrap().down = true;
    }

    /// Connection ms per gauge, integrated as the agent does: each answer's
    /// gauges held until the next answer, gaps over `max_gap_ms` not billed.
    fn integrated_millis(&self, max_gap_ms: i64) -> BTreeMap<String, i64> {
        let state = self.gauges.lock().unwrap();
        let mut millis = BTreeMap::new();
        for pair in state.served.windows(2) {
            let ((from, gauges), (to, _)) = (&pair[0], &pair[1]);
            if to - from > max_gap_ms {
                continue;
            }
            for (name, open) in gauges {
                *millis.entry(name.clone()).or_default() += (to - from) * *open as i64;
            }
        }
        millis
    }
}

#[test]
fn envoy_admin_gauges_become_connection_seconds_once_across_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = ledger(dir.path());
    const WEB: &str = "listener.0.0.0.0_10080.downstream_cx_active";
    const API: &str = "http.eg-10443.downstream_cx_active";
    const OTHER: &str = "listener.0.0.0.0_8080.downstream_cx_active";
    let envoy = FakeEnvoyAdmin::start(&[(WEB, 3), (API, 2), (OTHER, 7)]);
    let admin = format!("http://127.0.0.1:{}", envoy.port);
    let state = dir.path().join("state");
    let start_agent = || {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let args = [
            "collect",
            "--envoy-admin",
            &admin,
            "--envoy-admin-interval-secs",
            "1",
            "--envoy-listener",
            "0.0.0.0_10080=ns-web/site",
            "--envoy-listener",
            &format!("{API}=ns-api/api@acme"),
            "--window-secs",
            "5",
            "--allowed-lateness-secs",
            "0",
            "--ledger",
            &server.base,
            "--listen",
            &listen,
            "--idle-flush-secs",
            "2",
            "--batch-timeout-ms",
            "100",
            "--poll-interval-ms",
            "50",
            "--state-dir",
        ];
        spawn(&args, &[&state], port)
    };
    let agent = start_agent();
    std::thread::sleep(Duration::from_secs(4));
    envoy.set(&[(WEB, 1), (API, 0), (OTHER, 7)]);
    std::thread::sleep(Duration::from_secs(3));
    // Killed and restarted while nothing is open (so how long the restart
    // takes does not matter): the open windows and the outbox survive and
    // nothing is counted twice. (The last sample's checkpoint is covered
    // by the collector's own tests.)
    envoy.set(&[(WEB, 0), (API, 0), (OTHER, 7)]);
    std::thread::sleep(Duration::from_millis(1_500));
    agent.kill();
    let agent = start_agent();
    std::thread::sleep(Duration::from_secs(2));
    envoy.set(&[(WEB, 4), (API, 5), (OTHER, 7)]);
    std::thread::sleep(Duration::from_secs(3));
    envoy.set_down();
    let millis = envoy.integrated_millis(3_000);
    let seconds = |gauge: &str| u128::try_from(millis.get(gauge).copied().unwrap_or(0)).unwrap();
    let want = [
        (("ns-web".to_owned(), "site".to_owned()), seconds(WEB)),
        (("ns-api".to_owned(), "api".to_owned()), seconds(API)),
    ];
    assert!(
        want.iter().all(|(_, ms)| *ms > 10_000),
        "the gauges were sampled: {want:?}"
    );
    // Agent and stand-in read the clock a few ms apart per sample, so the
    // billed milliseconds may differ from the stand-in's integral by a
    // little (at most a second).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = PerRoute::new();
    while Instant::now() < deadline {
        got = metered(&server.base).unwrap_or_default();
        let close = want.iter().all(|(route, seconds)| {
            got.get(route)
                .is_some_and(|v| v[3].abs_diff(*seconds) <= 1_000 && v[..3] == [0, 0, 0])
        });
        if close && got.len() == want.len() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    for (route, seconds) in &want {
        let billed = got.get(route).map(|v| v[3]);
        assert!(
            billed.is_some_and(|b| b.abs_diff(*seconds) <= 1_000),
            "{route:?}: want {seconds} ms (±1 s), got {billed:?}; all: {got:?}"
        );
    }
    assert_eq!(got.len(), 2, "only mapped listeners are billed: {got:?}");
    let (_, answer) = get(&format!(
        "{}/api/v1/meters/gateway-connection-seconds/query?groupBy=project_name",
        server.base
    ))
    .unwrap();
    assert!(
        answer.contains("\"acme\""),
        "the mapping's project is used: {answer}"
    );
    agent.stop();
}

/// The agent with the connection lifecycle receiver on, reading "now" from
/// `clock` (so time moves only when the test says).
fn connections_agent(state: &Path, ledger: &str, clock: &Path) -> Process {
    let clock = clock.to_str().unwrap();
    let inputs = [
        "--connections",
        "--clock-file",
        clock,
        "--agent-id",
        "node-a",
    ];
    quick_agent(state, ledger, &inputs)
}

/// Sets the agent's clock, atomically (a reader never sees half a file).
fn set_clock(clock: &Path, millis: i64) {
    let next = clock.with_extension("next");
    fs::write(&next, millis.to_string()).unwrap();
    fs::rename(&next, clock).unwrap();
}

/// One connection of the lifecycle test: where it bills, when it opened
/// and closed (ms after the test's start minute).
struct Connection {
    id: &'static str,
    route: tally_collect::RouteKey,
    opened: i64,
    closed: Option<i64>,
}

/// What the ledger must hold once the agent accounted connections up to
/// `until` (ms after the start minute): per route, the exact milliseconds
/// of its connections (sent as exact decimal seconds, summed exactly by
/// the ledger: no remainder waits for more traffic).
fn lifecycle_expected(connections: &[Connection], until: i64) -> ExpectedTotals {
    let mut expected = ExpectedTotals::default();
    for connection in connections {
        let end = connection.closed.unwrap_or(until).min(until);
        let millis = u128::try_from((end - connection.opened).max(0)).unwrap();
        let totals = tally_collect::Totals {
            connection_millis: millis,
            ..tally_collect::Totals::default()
        };
        expected
            .per_route
            .entry(connection.route.clone())
            .or_default()
            .add(&totals);
        expected
            .per_project
            .entry(connection.route.project.clone())
            .or_default()
            .add(&totals);
    }
    expected
}

#[test]
fn connection_lifecycle_events_bill_open_connections_every_minute_once_across_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = ledger(dir.path());
    let state = dir.path().join("state");
    let clock = dir.path().join("now");
    // A whole minute three hours ago: within the ledger's lateness, and
    // the agent's clock (the file) starts one minute after it.
    let now = jiff::Timestamp::now().as_millisecond();
    let t0 = now - now.rem_euclid(60_000) - 3 * 3_600_000;
    set_clock(&clock, t0 + 60_000);
    let route = |project: &str, namespace: &str, name: &str| tally_collect::RouteKey {
        project: project.into(),
        namespace: namespace.into(),
        name: name.into(),
    };
    let chat = route("ns-ws", "ns-ws", "chat");
    let stream = route("acme", "ns-api", "stream");
    let feed = route("ns-ws", "ns-ws", "feed");
    let mut connections = vec![
        Connection {
            id: "edge-1/1",
            route: chat.clone(),
            opened: 10_000,
            closed: None,
        },
        Connection {
            id: "edge-1/2",
            route: stream.clone(),
            opened: 20_000,
            closed: None,
        },
        Connection {
            id: "edge-1/3",
            route: chat.clone(),
            opened: 30_000,
            closed: Some(75_500),
        },
        // Never closed: billed every minute, without further events.
        Connection {
            id: "edge-2/1",
            route: feed.clone(),
            opened: 5_000,
            closed: None,
        },
    ];
    let time = |offset: i64| {
        jiff::Timestamp::from_millisecond(t0 + offset)
            .unwrap()
            .to_string()
    };
    let event = |id: &str, kind: &str, offset: i64, data: Value| {
        serde_json::json!({"specversion": "1.0", "id": id, "source": "gateway-controller/edge",
            "type": format!("networking.datumapis.com/gateway/connection.{kind}"),
            "subject": "connections", "time": time(offset), "data": data})
    };
    let opened = |id: &str, c: &Connection| {
        let data = if c.route.namespace == "ns-api" {
            // The route named explicitly, with its project.
            serde_json::json!({"connection_id": c.id, "httproute_namespace": c.route.namespace,
                "httproute_name": c.route.name, "project_name": c.route.project})
        } else {
            serde_json::json!({"connection_id": c.id,
                "route_name": format!("httproute/{}/{}/rule/0/match/0/{}.example.com",
                    c.route.namespace, c.route.name, c.route.name)})
        };
        event(id, "opened", c.opened, data)
    };
    let closed = |id: &str, c: &Connection, at: i64| {
        event(id, "closed", at, serde_json::json!({"connection_id": c.id}))
    };
    let mut agent = connections_agent(&state, &server.base, &clock);
    let endpoint = |agent: &Process| format!("{}/v1/connections", agent.base);
    let send = |agent: &Process, content_type: &str, body: Vec<u8>| {
        let (status, answer) = post(&endpoint(agent), content_type, false, body);
        (status, serde_json::from_slice::<Value>(&answer).unwrap())
    };

    // Opened and closed events, then the same batch again (a retry).
    let batch = serde_json::json!([
        opened("o1", &connections[0]),
        opened("o2", &connections[1]),
        opened("o3", &connections[2]),
        opened("o4", &connections[3]),
        closed("x3", &connections[2], 75_500),
    ]);
    let batch = serde_json::to_vec(&batch).unwrap();
    for _ in 0..2 {
        let (status, answer) = send(&agent, "application/cloudevents-batch+json", batch.clone());
        assert_eq!((status, answer), (202, serde_json::json!({"accepted": 5})));
    }
    // One bad event refuses the whole request: the good one is not stored.
    let stray = Connection {
        id: "edge-1/9",
        route: chat.clone(),
        opened: 1_000,
        closed: None,
    };
    let bad = serde_json::json!([
        opened("o9", &stray),
        event(
            "x9",
            "closed",
            2_000,
            serde_json::json!({"route_name": "httproute/ns-ws/chat/rule/0"})
        ),
    ]);
    let (status, problem) = send(
        &agent,
        "application/json",
        serde_json::to_vec(&bad).unwrap(),
    );
    assert_eq!(status, 400, "{problem}");
    assert_eq!(problem["errors"][0]["index"], 1, "{problem}");
    assert_eq!(
        problem["errors"][0]["errors"][0]["field"],
        "data.connection_id"
    );
    // A connection of a TCPRoute: taken, counted as unattributable.
    let tcp = event(
        "o10",
        "opened",
        3_000,
        serde_json::json!({"connection_id": "edge-3/1", "route_name": "tcproute/ns-ws/db/rule/0"}),
    );
    let (status, _) = send(
        &agent,
        "application/cloudevents+json",
        serde_json::to_vec(&tcp).unwrap(),
    );
    assert_eq!(status, 202);
    // Retries as NDJSON.
    let mut ndjson = serde_json::to_vec(&opened("o1", &connections[0])).unwrap();
    ndjson.push(b'\n');
    ndjson.extend(serde_json::to_vec(&closed("x3", &connections[2], 75_500)).unwrap());
    let (status, _) = send(&agent, "application/x-ndjson", ndjson);
    assert_eq!(status, 202);

    // Four minutes in (a minute of grace): minutes 0-2 close, and the open
    // connections are billed up to 3:00 though no event said so.
    set_clock(&clock, t0 + 240_000);
    let within = Duration::from_secs(30);
    wait_metered(
        &server.base,
        &expected_per_route(&lifecycle_expected(&connections, 180_000)),
        within,
    );

    // SIGKILLed; the clock moves on while the agent is away. After the
    // restart the connections opened before the kill are still billed
    // every minute (to 6:00), and nothing is billed twice.
    agent.kill();
    set_clock(&clock, t0 + 420_000);
    agent = connections_agent(&state, &server.base, &clock);
    wait_metered(
        &server.base,
        &expected_per_route(&lifecycle_expected(&connections, 360_000)),
        within,
    );
    // They close; retries of events applied before the kill are dropped.
    connections[0].closed = Some(390_250);
    connections[1].closed = Some(419_999);
    let batch = serde_json::json!([
        closed("x1", &connections[0], 390_250),
        opened("o1", &connections[0]),
        closed("x2", &connections[1], 419_999),
        closed("x3", &connections[2], 75_500),
    ]);
    let (status, _) = send(
        &agent,
        "application/cloudevents-batch+json",
        serde_json::to_vec(&batch).unwrap(),
    );
    assert_eq!(status, 202);
    set_clock(&clock, t0 + 600_000);
    let expected = lifecycle_expected(&connections, 540_000);
    // chat: 380.25 s + 45.5 s; stream: 399.999 s; feed: 535 s.
    assert_eq!(
        expected_per_route(&expected)
            .values()
            .map(|v| v[3])
            .collect::<Vec<_>>(),
        [399_999, 425_750, 535_000]
    );
    assert_metered(&server.base, &expected, within);

    // The connection left open was billed every minute it was open.
    let (status, body) = get(&format!(
        "{}/api/v1/meters/gateway-connection-seconds/query?windowSize=MINUTE&groupBy=httproute_name&from={}&to={}",
        server.base,
        time(0),
        time(600_000)
    ))
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let feed_minutes: Vec<u128> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| row["groupBy"]["httproute_name"] == "feed")
        .map(|row| millis(&row["value"]))
        .collect();
    assert_eq!(
        feed_minutes,
        [
            55_000, 60_000, 60_000, 60_000, 60_000, 60_000, 60_000, 60_000, 60_000
        ]
    );
    // Retries: five, two, then two after the restart (the applied pairs
    // are checkpointed); the TCPRoute connection is reported.
    let dropped = |reason: &str| {
        metric(
            &agent.base,
            "dropped_total",
            &format!("reason=\"{reason}\""),
        )
    };
    assert_eq!(dropped("duplicate_event"), 9);
    assert_eq!(dropped("unknown_route_name"), 1);
    assert_eq!(dropped("connection_unknown"), 0);
    assert_eq!(dropped("connection_closed_late"), 0);
    agent.stop();
}

/// The agent's resources for spans: ns-a's policy samples 1 in 4 traces of
/// its Gateway `edge` and adds the model as a span attribute; ns-b's
/// samples 3 in 5 of its Namespace's; an Exporter with a `traces` source
/// in each.
fn span_policies(receiver: &receiver::Receiver) -> String {
    let mut text = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: ns-a}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: ns-b}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: edge, namespace: ns-a}\nspec: {gatewayClassName: eg}\n---\n\
         apiVersion: telemetry.datumapis.com/v1alpha1\nkind: TelemetryPolicy\n\
         metadata: {name: quarter, namespace: ns-a}\nspec:\n  \
         targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: edge}]\n  \
         tracing:\n    mode: Enabled\n    samplingRate: {numerator: 1, denominator: 4}\n    \
         attributes: [{name: llm.model, from: Attribute, value: gen_ai.request.model}]\n---\n\
         apiVersion: telemetry.datumapis.com/v1alpha1\nkind: TelemetryPolicy\n\
         metadata: {name: most, namespace: ns-b}\nspec:\n  \
         targetRefs: [{group: '', kind: Namespace, name: ns-b}]\n  \
         tracing: {samplingRate: {numerator: 3, denominator: 5}}\n",
    );
    for ns in ["ns-a", "ns-b"] {
        text += &format!(
            "---\napiVersion: telemetry.datumapis.com/v1alpha1\nkind: Exporter\nmetadata: {{name: otlp, namespace: {ns}}}\n\
             spec:\n  sources: [{{name: traces, traces: {{}}}}]\n  \
             sinks: [{{name: r, otlp_http: {{endpoint: '{}'}}, batch: {{timeout: 50ms}}}}]\n",
            receiver.endpoint(ns)
        );
    }
    text
}

/// The trace id of trace `i` of a namespace: distinct per namespace.
fn trace_id(namespace: &str, i: u64) -> Vec<u8> {
    let mut id = [0u8; 16];
    id[0] = namespace.len() as u8;
    id[1] = namespace.as_bytes().last().copied().unwrap_or(0);
    id[8..].copy_from_slice(&i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes());
    id.to_vec()
}

/// Two spans (a server span and its child) of each trace in `ids`, from
/// Gateway `edge` of `namespace`.
fn gateway_spans(
    namespace: &str,
    ids: std::ops::Range<u64>,
) -> opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest {
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value as V};
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    let attr = |key: &str, value: &str| KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(V::StringValue(value.into())),
        }),
        ..Default::default()
    };
    let spans = ids
        .flat_map(|i| (0..2u64).map(move |part| (i, part)))
        .map(|(i, part)| Span {
            trace_id: trace_id(namespace, i),
            span_id: (i * 2 + part + 1).to_be_bytes().to_vec(),
            name: format!("{namespace}-{i}-{part}"),
            attributes: vec![
                attr("route_name", &format!("httproute/{namespace}/llm/rule/0")),
                attr("gateway.namespace", namespace),
                attr("gateway.name", "edge"),
                attr("gen_ai.request.model", "gpt-4o"),
            ],
            ..Default::default()
        })
        .collect();
    opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Spans on `tally collect`: two projects, each with a policy and an
/// Exporter to a test OTLP receiver, spans over OTLP/HTTP (protobuf and
/// JSON) and gRPC. Each project's receiver gets exactly the traces its
/// sampling rate keeps (whole: both spans of a kept trace), with the
/// policy's attributes, and nothing of the other project's; spans of no
/// known project are answered as a partial success.
#[test]
fn spans_on_the_agent_are_sampled_by_each_projects_policy() {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = ledger(dir.path());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let receiver = runtime.block_on(receiver::Receiver::start());
    let resources = dir.path().join("resources");
    fs::create_dir_all(&resources).unwrap();
    fs::write(resources.join("policies.yaml"), span_policies(&receiver)).unwrap();
    let config = dir.path().join("collect.yaml");
    fs::write(&config, "egress: {allow: [127.0.0.0/8]}\n").unwrap();
    let (config, resources) = (config.to_str().unwrap(), resources.to_str().unwrap());
    let (agent, grpc_port) = otlp_agent(
        &dir.path().join("state"),
        &server.base,
        &["--config", config, "--resources", resources],
    );
    let url = format!("{}/v1/traces", agent.base);
    // OTLP/HTTP protobuf: ns-a traces 0..120 and ns-b 0..40, one request.
    let mut request = gateway_spans("ns-a", 0..120);
    request
        .resource_spans
        .extend(gateway_spans("ns-b", 0..40).resource_spans);
    let (status, body) = post(
        &url,
        "application/x-protobuf",
        false,
        request.encode_to_vec(),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let answer = ExportTraceServiceResponse::decode(&body[..]).unwrap();
    assert_eq!(answer.partial_success, None);
    // OTLP/HTTP JSON: ns-b 40..60 and two spans of a namespace nobody knows.
    let mut request = gateway_spans("ns-b", 40..60);
    request
        .resource_spans
        .extend(gateway_spans("ns-x", 0..1).resource_spans);
    let (status, body) = post(
        &url,
        "application/json",
        false,
        serde_json::to_vec(&request).unwrap(),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let answer: ExportTraceServiceResponse = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer.partial_success.unwrap().rejected_spans, 2);
    // gRPC: ns-a 120..200 and ns-b 60..100.
    let mut request = gateway_spans("ns-a", 120..200);
    request
        .resource_spans
        .extend(gateway_spans("ns-b", 60..100).resource_spans);
    let answer = block_on(async move {
        let mut client = TraceServiceClient::connect(format!("http://127.0.0.1:{grpc_port}"))
            .await
            .unwrap();
        client.export(request).await.unwrap().into_inner()
    });
    assert_eq!(answer.partial_success, None);
    // Exactly the kept traces, both spans each, per project.
    let mut kept = 0;
    for (ns, traces, (numerator, denominator)) in [("ns-a", 200, (1, 4)), ("ns-b", 100, (3, 5))] {
        let want: std::collections::BTreeSet<(Vec<u8>, String)> = (0..traces)
            .filter(|i| tally_policy::keep_trace(&trace_id(ns, *i), numerator, denominator))
            .flat_map(|i| (0..2).map(move |part| (trace_id(ns, i), format!("{ns}-{i}-{part}"))))
            .collect();
        let share = want.len() as u64 * denominator as u64 / 2;
        assert!(
            share > traces * numerator as u64 / 2 && share < traces * numerator as u64 * 2,
            "{ns}: {} spans kept of {traces} traces",
            want.len()
        );
        let got =
            runtime.block_on(
                receiver.wait_until(ns, want.len(), Duration::from_secs(30), |e| e.spans.len()),
            );
        assert_eq!(got, want.len(), "{ns}");
        std::thread::sleep(Duration::from_millis(300));
        let spans = receiver.with(ns, |e| e.spans.clone());
        let got: std::collections::BTreeSet<_> = spans
            .iter()
            .map(|s| (s.trace_id.clone(), s.name.clone()))
            .collect();
        assert_eq!(spans.len(), want.len(), "{ns}: a span arrived twice");
        assert_eq!(got, want, "{ns}");
        kept += spans.len() as u64;
        for span in &spans {
            assert!(span.name.starts_with(ns), "{ns} got {}", span.name);
            let model = span.attributes.get("llm.model").map(String::as_str);
            assert_eq!(model, (ns == "ns-a").then_some("gpt-4o"), "{ns}");
        }
    }
    // What the policies dropped is counted per receiver.
    let read = metric(&agent.base, "received_total", "component_id=\"otlp_");
    assert_eq!(read, 2 * (300 + 1));
    let sent = metric(&agent.base, "sent_total", "component_id=\"otlp_");
    assert_eq!(sent, kept);
    let dropped = metric(&agent.base, "dropped_total", "reason=\"policy\"");
    assert_eq!(dropped, 2 * 300 - kept);
    let unattributed = metric(&agent.base, "dropped_total", "reason=\"unattributed\"");
    assert_eq!(unattributed, 2);
    assert_eq!(receiver.with("ns-x", |e| e.spans.len()), 0);
    agent.stop();
}

/// A cluster node (`cluster:` over `nats` and `clickhouse`) on `port`,
/// with its own data in `dir`.
fn cluster_node(dir: &Path, cluster: &str, port: u16) -> Process {
    fs::create_dir_all(dir).unwrap();
    let config = dir.join("tally.yaml");
    fs::write(&config, cluster).unwrap();
    let listen = format!("127.0.0.1:{port}");
    let data = dir.join("data");
    let args = ["serve", "--listen", &listen, "--config"];
    spawn(&args, &[&config, Path::new("--data-dir"), &data], port)
}

#[test]
fn an_agent_shipping_to_one_cluster_node_is_metered_exactly_by_another() {
    use tally_ledger_suite::peers::{ClickHouse, Nats};
    let Some(nats) = Nats::start() else { return };
    let Some(clickhouse) = ClickHouse::start() else {
        return;
    };
    let cluster = format!(
        "cluster: {{nats: \"{}\", clickhouse: \"{}\", database: tally_collect}}\n\
         billing: {{enabled: false}}\n",
        nats.url(),
        clickhouse.url()
    );
    let dir = tempfile::tempdir().unwrap();
    let a = cluster_node(&dir.path().join("a"), &cluster, free_port());
    let b = cluster_node(&dir.path().join("b"), &cluster, free_port());
    apply_gateway_meters(&a.base);
    let log = dir.path().join("access.log");
    let state = dir.path().join("state");
    let mut writer = LiveWriter::new(&log, corpus_config(20_000), Some(8_000));
    let mut agent = collect(&state, &[&log], &a.base);
    let mut chunks = 0;
    while writer.write(1_000) {
        chunks += 1;
        std::thread::sleep(Duration::from_millis(40));
        if chunks == 7 {
            agent.kill();
            agent = collect(&state, &[&log], &a.base);
        }
    }
    let expected = writer.expected();
    assert_metered(&b.base, &expected, Duration::from_secs(120));
    agent.stop();
    // The whole file again, from a fresh state, through node b: the same
    // event ids, so the cluster counts nothing twice.
    let again = collect(&dir.path().join("state-2"), &[&log], &b.base);
    wait_shipped_all(&again, Duration::from_secs(60));
    // Past the workers' materialisation, still the naive totals on both.
    std::thread::sleep(Duration::from_secs(3));
    assert_metered(&a.base, &expected, Duration::from_secs(5));
    assert_metered(&b.base, &expected, Duration::from_secs(5));
    again.stop();
}

/// Waits until `agent` has shipped (acknowledged) every event it emitted:
/// past its idle flush (3 s), at most `bound`.
fn wait_shipped_all(agent: &Process, bound: Duration) {
    let started = Instant::now();
    let (mut emitted, mut shipped) = (0, 0);
    while started.elapsed() < bound {
        emitted = metric(&agent.base, "sent_total", "component_id=\"aggregate:");
        shipped = metric(&agent.base, "sent_total", "component_kind=\"sink\"");
        if started.elapsed() > Duration::from_secs(5) && emitted > 0 && shipped == emitted {
            return;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!("the agent shipped {shipped} of the {emitted} events it emitted");
}
