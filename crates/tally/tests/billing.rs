//! Billing forwarding end to end, with real processes: `tally serve` forwards
//! metered usage to the Amberflo test server (`tally_billing::testing`,
//! Amberflo's documented ingest API with injected 429/503/timeouts/400),
//! is SIGKILLed several times mid-forwarding, gets late events and a void
//! after windows were sent, and a dead letter is retried through the CLI.
//! Then the provider's sum per (account, meter) must equal the ledger's
//! `groupBy=billing_account` totals exactly, `tally billing reconcile` must
//! exit 0, and the API key must appear in no log line, CLI output or API
//! answer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use jiff::{Timestamp, ToSpan};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tally_billing::testing::{Fault, TestServer};
use tally_testkit::progress::Progress;

const API_KEY: &str = "af-e2e-key-3c9d7f1b";
const TOKEN: &str = "e2e-admin-token";
const PROJECTS: [(&str, &str); 4] = [
    ("p1", "acct-a"),
    ("p2", "acct-b"),
    ("p3", "acct-a"),
    ("p4", "acct-c"),
];
const METERS: [(&str, &str); 2] = [("requests", "gw-requests"), ("bytes", "gw-bytes")];
const WINDOWS: i64 = 8;

mod common;

use common::Server;

/// `tally serve` with a config file, its log (stderr) appended to `log`.
fn serve(dir: &Path, config: &Path, log: &Path) -> Server {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(config)
        .arg("--data-dir")
        .arg(dir)
        .env("TALLY_TOKEN", TOKEN)
        .env("RUST_LOG", "info,tally_billing=trace,tally_delivery=trace")
        .stderr(Stdio::from(log));
    common::spawn(command)
}

/// Runs the CLI against `base`; returns (success, stdout + stderr).
fn cli(base: &str, args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .env("TALLY_SERVER", base)
        .env("TALLY_TOKEN", TOKEN)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn manifests(provider_url: &str, t0: Timestamp) -> String {
    let bound = t0 - 1.hour();
    let mut text = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: amberflo-api, namespace: tally-system}}\n\
         stringData: {{apiKey: {API_KEY}}}\n---\n\
         apiVersion: billing.miloapis.com/v1alpha1\nkind: BillingSink\nmetadata: {{name: amberflo}}\n\
         spec: {{provider: amberflo, endpoint: '{provider_url}', apiKeySecretRef: {{name: amberflo-api}},\n\
         \x20 windowSize: 1m, allowedLateness: 2s, batchSize: 4, requestTimeout: 1s, startAt: '{t0}'}}\n---\n\
         apiVersion: billing.miloapis.com/v1alpha1\nkind: BillingSink\nmetadata: {{name: odd-window}}\n\
         spec: {{provider: openmeter, endpoint: '{provider_url}', apiKeySecretRef: {{name: amberflo-api}},\n\
         \x20 windowSize: 30s, startAt: '{t0}'}}\n"
    );
    for account in ["acct-a", "acct-b", "acct-c"] {
        text.push_str(&format!(
            "---\napiVersion: billing.miloapis.com/v1alpha1\nkind: BillingAccount\n\
             metadata: {{name: {account}, uid: uid-{account}}}\nspec: {{currencyCode: USD}}\n"
        ));
    }
    // p4 has no binding: its usage belongs to no account and is not forwarded.
    for (project, account) in &PROJECTS[..3] {
        text.push_str(&format!(
            "---\napiVersion: billing.miloapis.com/v1alpha1\nkind: BillingAccountBinding\n\
             metadata: {{name: {project}-{account}}}\n\
             spec: {{billingAccountRef: {{name: {account}}}, projectRef: {{name: {project}}}}}\n\
             status: {{billingResponsibility: {{establishedAt: '{bound}'}}}}\n"
        ));
    }
    for (meter, api_name) in METERS {
        text.push_str(&format!(
            "---\napiVersion: billing.miloapis.com/v1alpha1\nkind: MeterDefinition\n\
             metadata: {{name: {meter}}}\n\
             spec: {{meterName: gw/{meter}, phase: Published,\n\
             \x20 measurement: {{aggregation: Sum, unit: '1', dimensions: [region]}},\n\
             \x20 billing: {{meterApiName: {api_name}}}}}\n"
        ));
    }
    text
}

fn event(id: &str, meter: &str, project: &str, time: Timestamp, value: u64) -> Value {
    let region = if value.is_multiple_of(2) { "eu" } else { "us" };
    json!({"specversion": "1.0", "id": id, "source": "e2e", "type": format!("gw/{meter}"),
           "subject": format!("projects/{project}"), "time": time.to_string(),
           "data": {"value": value.to_string(), "dimensions": {"region": region}}})
}

struct Api {
    http: reqwest::Client,
}

impl Api {
    async fn get(&self, base: &str, path: &str) -> (u16, String) {
        let response = self
            .http
            .get(format!("{base}{path}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    async fn post(&self, base: &str, path: &str, body: &Value) -> (u16, String) {
        let response = self
            .http
            .post(format!("{base}{path}"))
            .bearer_auth(TOKEN)
            // Ingest answers what it stored (200) only when asked; else 204.
            .header("prefer", "return=representation")
            .json(body)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// The ledger's totals per (account uid, meter api name) over [from, to).
    async fn ledger_totals(
        &self,
        base: &str,
        from: Timestamp,
        to: Timestamp,
    ) -> BTreeMap<(String, String), Decimal> {
        let mut totals = BTreeMap::new();
        for (meter, api_name) in METERS {
            let (status, body) = self
                .get(
                    base,
                    &format!(
                        "/api/v1/meters/{meter}/query?from={from}&to={to}&groupBy=billing_account"
                    ),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            let answer: Value = serde_json::from_str(&body).unwrap();
            for row in answer["data"].as_array().unwrap() {
                let Some(account) = row["groupBy"]["billing_account"].as_str() else {
                    continue;
                };
                let value: Decimal = row["value"].to_string().parse().unwrap();
                *totals
                    .entry((format!("uid-{account}"), api_name.to_owned()))
                    .or_insert(Decimal::ZERO) += value;
            }
        }
        totals
    }
}

fn nonzero(map: BTreeMap<(String, String), Decimal>) -> BTreeMap<(String, String), Decimal> {
    map.into_iter().filter(|(_, v)| !v.is_zero()).collect()
}

/// How long the forwarder may show no progress (no request reaching the
/// provider, nothing else watched changing) before a wait fails. A loaded
/// host slows it down; only a stuck one stops it.
const STALL: Duration = Duration::from_secs(60);

/// A wait on the forwarder: progress is a request reaching the provider
/// (the first half of what it observes), or a change in the second half.
fn forwarding<T: PartialEq + std::fmt::Debug>(what: &str) -> Progress<(u64, T)> {
    Progress::new(what, STALL)
}

/// Waits until the provider's sums equal the ledger's (or panics once
/// neither the provider nor the ledger moves for `STALL`).
async fn wait_equal(api: &Api, base: &str, server: &TestServer, from: Timestamp, to: Timestamp) {
    let mut progress = forwarding("the provider's sums to equal the ledger's");
    loop {
        let ledger = api.ledger_totals(base, from, to).await;
        let provider = nonzero(server.sums());
        if ledger == provider {
            return;
        }
        progress.observe((server.state().requests, (provider, ledger)));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// `text` without ANSI colour sequences (`ESC [ ... m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// One sink's entry in a `sinks` list (null when absent).
fn sink_of(answer: &Value, name: &str) -> Value {
    answer["sinks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["sink"] == name)
        .cloned()
        .unwrap_or_default()
}

async fn dead_letter_ids(api: &Api, base: &str) -> Vec<u64> {
    let (status, body) = api.get(base, "/api/v1/billing/deadletters").await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    sink_of(&answer, "amberflo")["deadLetters"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| l["id"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forwarding_is_exact_through_faults_kills_late_events_and_voids() {
    let provider = TestServer::start(API_KEY).await;
    let work = tempfile::tempdir().unwrap();
    let data: PathBuf = work.path().join("data");
    let config = work.path().join("tally.yaml");
    let log = work.path().join("serve.log");
    // The provider test server is on loopback: allowed explicitly.
    std::fs::write(
        &config,
        "billing: {passIntervalSeconds: 0.2}\negress: {allow: [127.0.0.0/8]}\n",
    )
    .unwrap();
    let api = Api {
        http: tally_delivery::client_builder().build().unwrap(),
    };
    let mut outputs = String::new();

    let now = Timestamp::now();
    let t0 = Timestamp::from_second(now.as_second().div_euclid(60) * 60 - WINDOWS * 60).unwrap();
    let end = t0 + (WINDOWS * 60).seconds();
    let (from_arg, to_arg) = (t0.to_string(), end.to_string());
    let reconcile = |base: &str| {
        cli(
            base,
            &["billing", "reconcile", "--from", &from_arg, "--to", &to_arg],
        )
    };

    // Faults before anything is sent: the first batches meet a 429 with
    // Retry-After, 503s, a lost answer (stored, then too slow: re-sent and
    // deduplicated) and one 400 (dead-lettered).
    provider.push_faults([
        Fault::Status(429, Some(1)),
        Fault::Status(503, None),
        Fault::SlowAnswer(Duration::from_millis(1500)),
        Fault::Status(503, None),
        Fault::Status(400, None),
        Fault::Status(429, None),
    ]);
    // Every answer is slowed, so kills land mid-forwarding.
    provider.state().delay = Duration::from_millis(40);

    let mut server = serve(&data, &config, &log);
    let file = work.path().join("billing.yaml");
    std::fs::write(&file, manifests(&provider.url, t0)).unwrap();
    let (ok, text) = cli(&server.base, &["apply", "-f", file.to_str().unwrap()]);
    assert!(ok, "{text}");
    outputs.push_str(&text);

    // Usage in every window: distinct values, so a double count shows.
    let mut events = Vec::new();
    let mut n = 0u64;
    for w in 0..WINDOWS {
        for (project, _) in PROJECTS {
            for (meter, _) in METERS {
                for k in 0..3 {
                    n += 1;
                    let time = t0 + (w * 60 + k * 17 + 3).seconds();
                    events.push(event(&format!("e{n}"), meter, project, time, 1000 + n * 7));
                }
            }
        }
    }
    let (status, body) = api
        .post(&server.base, "/api/v1/events", &json!(events))
        .await;
    assert_eq!(status, 200, "{body}");

    // SIGKILL mid-forwarding, several times.
    for kill in 0..4 {
        tokio::time::sleep(Duration::from_millis(700 + kill * 300)).await;
        server.child.kill().unwrap();
        server.child.wait().unwrap();
        server = serve(&data, &config, &log);
    }

    // The 400 went to the dead letters, with the provider's answer; the
    // forwarder went on with the rest.
    let mut progress = forwarding("a dead letter");
    let ids = loop {
        let ids = dead_letter_ids(&api, &server.base).await;
        if !ids.is_empty() {
            break ids;
        }
        progress.observe((provider.state().requests, ()));
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(ids.len(), 1);
    let (ok, text) = cli(&server.base, &["billing", "deadletters"]);
    assert!(
        ok && text.contains("400") && text.contains("injected fault"),
        "{text}"
    );
    outputs.push_str(&text);
    let (ok, text) = cli(
        &server.base,
        &[
            "billing",
            "reconcile",
            "--from",
            &from_arg,
            "--to",
            &to_arg,
            "-o",
            "json",
        ],
    );
    // Not all acknowledged yet: the dead letter's records are not. The
    // provider's own total may still be complete (exit 0) when the batch the
    // 400 refused had already been accepted once, before a kill -9 made the
    // forwarder send it again; the ACKNOWLEDGED column must lag either way.
    outputs.push_str(&text);
    // stdout's JSON comes first; a non-zero exit appends its error line.
    let answer: Value = serde_json::Deserializer::from_str(&text)
        .into_iter::<Value>()
        .next()
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("reconcile -o json: {text}"));
    let lags = answer["sinks"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|sink| sink["totals"].as_array().into_iter().flatten())
        .any(|row| row["acknowledged"] != row["ledger"]);
    assert!(
        lags,
        "a dead letter is unsent: some acknowledged total must lag the ledger's (exit ok: {ok}): {text}"
    );
    let (ok, text) = cli(&server.base, &["billing", "retry", "amberflo", "--all"]);
    assert!(
        ok && text.contains(&format!("dead letters {} of billing sink amberflo", ids[0])),
        "{text}"
    );
    outputs.push_str(&text);
    wait_equal(&api, &server.base, &provider, t0, end).await;
    assert!(dead_letter_ids(&api, &server.base).await.is_empty());

    // Late events into windows already sent, and a void: corrections.
    let late: Vec<Value> = (0..6u64)
        .map(|i| {
            let (project, _) = PROJECTS[i as usize % 3];
            let (meter, _) = METERS[i as usize % 2];
            let time = t0 + ((i as i64 % WINDOWS) * 60 + 41).seconds();
            event(&format!("late{i}"), meter, project, time, 500 + i)
        })
        .collect();
    let (status, body) = api.post(&server.base, "/api/v1/events", &json!(late)).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = api
        .post(
            &server.base,
            "/api/v1/events/void",
            &json!({"source": "e2e", "id": "e5", "reason": "test"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    server = serve(&data, &config, &log);
    wait_equal(&api, &server.base, &provider, t0, end).await;

    // The provider holds it all; once its answers are checkpointed nothing
    // is pending and nothing was counted twice.
    let mut progress = forwarding("nothing pending");
    let (report, amberflo) = loop {
        let (status, body) = api.get(&server.base, "/api/v1/billing/status").await;
        assert_eq!(status, 200, "{body}");
        let report: Value = serde_json::from_str(&body).unwrap();
        let amberflo = sink_of(&report, "amberflo");
        let meters = amberflo["status"]["meters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if meters.len() == METERS.len() && meters.iter().all(|m| m["recordsPending"] == 0) {
            outputs.push_str(&body);
            break (report, amberflo);
        }
        progress.observe((provider.state().requests, amberflo.to_string()));
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(amberflo["ready"], true, "{amberflo}");
    // p4 has usage and no binding: it is counted, and the same after a
    // restart; so are the counters.
    let unattributed = |sink: &Value| -> Vec<(String, String, u64, u64)> {
        sink["status"]["meters"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                (
                    m["unattributed"].as_str().unwrap_or_default().to_owned(),
                    m["unattributedProjects"].to_string(),
                    m["recordsSent"].as_u64().unwrap_or_default(),
                    m["eventsRead"].as_u64().unwrap_or_default(),
                )
            })
            .collect()
    };
    let before = unattributed(&amberflo);
    assert!(
        before
            .iter()
            .all(|(u, p, _, _)| u != "0" && !u.is_empty() && p == "1"),
        "{amberflo}"
    );
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    server = serve(&data, &config, &log);
    let mut progress = forwarding(&format!("the counters {before:?} after a restart"));
    loop {
        let (_, body) = api.get(&server.base, "/api/v1/billing/status").await;
        let report: Value = serde_json::from_str(&body).unwrap_or_default();
        let after = unattributed(&sink_of(&report, "amberflo"));
        if after == before {
            break;
        }
        progress.observe((provider.state().requests, after));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let odd = sink_of(&report, "odd-window");
    assert_eq!(odd["ready"], false);
    assert_eq!(odd["reason"], "UnsupportedWindowSize");
    {
        let state = provider.state();
        assert!(state.duplicates >= 1, "the lost answer was re-sent");
        assert_eq!(state.accepted_records as usize, state.seen.len());
        assert!(
            !state
                .sums
                .keys()
                .any(|(customer, _)| customer == "uid-acct-c")
        );
    }
    let (ok, text) = reconcile(&server.base);
    assert!(ok, "{text}");
    assert!(
        text.contains("uid-acct-a") && text.contains("gw-bytes"),
        "{text}"
    );
    outputs.push_str(&text);
    for args in [
        &["billing", "status"][..],
        &["billing", "status", "-o", "json"],
        &["get", "billingsinks", "-o", "yaml"],
        &["get", "secrets", "-o", "yaml"],
        &[
            "get",
            "secret",
            "amberflo-api",
            "-n",
            "tally-system",
            "-o",
            "json",
        ],
    ] {
        let (ok, text) = cli(&server.base, args);
        assert!(ok, "{args:?}: {text}");
        outputs.push_str(&text);
    }
    assert!(outputs.contains("UnsupportedWindowSize"));
    for path in [
        "/metrics",
        "/api/v1/billing/status",
        "/api/v1/billing/deadletters",
        "/apis/billingsinks",
        "/apis/billingsinks/amberflo",
        "/apis/secrets/tally-system/amberflo-api",
    ] {
        let (status, body) = api.get(&server.base, path).await;
        assert_eq!(status, 200, "{path}: {body}");
        outputs.push_str(&body);
    }
    let (_, metrics) = api.get(&server.base, "/metrics").await;
    assert!(
        metrics.contains("tally_billing_records_sent_total{sink=\"amberflo\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("tally_billing_records_per_event{sink=\"amberflo\"}"),
        "{metrics}"
    );
    // Every family once (a valid exposition), the sinks' components in it.
    let mut families = std::collections::BTreeSet::new();
    for line in metrics.lines().filter(|l| l.starts_with("# TYPE ")) {
        assert!(families.insert(line.to_owned()), "{line} twice");
    }
    assert!(
        metrics.contains("component_id=\"billing-amberflo\""),
        "{metrics}"
    );
    drop(server);
    let logs = strip_ansi(&std::fs::read_to_string(&log).unwrap());
    assert!(logs.contains("dead-lettered"), "the log was captured");
    // The dead letter's id in the log is the one the CLI showed and retried.
    for line in logs.lines().filter(|l| l.contains("dead-lettered")) {
        assert!(line.contains(&format!("dead_letter={}", ids[0])), "{line}");
    }
    // A kill landed while records were planned and unanswered.
    assert!(
        logs.contains("re-queueing unanswered billing records"),
        "{logs}"
    );
    assert!(
        !logs.contains(API_KEY),
        "the API key is in the server's log"
    );
    assert!(!outputs.contains(API_KEY), "the API key is in an output");
}

/// `tally forward` on its own, against a server that does not forward
/// (`billing.enabled: false`), to an OpenMeter endpoint: the second adapter.
/// The key comes from a file; a late event is corrected by the next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tally_forward_alone_sends_openmeter_events_exactly() {
    let provider = TestServer::start(API_KEY).await;
    provider.push_faults([Fault::Status(503, None), Fault::Status(429, Some(0))]);
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("tally.yaml");
    std::fs::write(&config, "billing: {enabled: false}\n").unwrap();
    let log = work.path().join("serve.log");
    let server = serve(&work.path().join("data"), &config, &log);
    let api = Api {
        http: tally_delivery::client_builder().build().unwrap(),
    };
    let now = Timestamp::now();
    // The last window with usage closed (2 s lateness) over a minute ago.
    let t0 = Timestamp::from_second(now.as_second().div_euclid(60) * 60 - 4 * 60).unwrap();
    let end = t0 + 180.seconds();
    let yaml = manifests(&provider.url, t0)
        .replace("provider: amberflo", "provider: openmeter")
        .replace("name: amberflo}", "name: om}");
    let file = work.path().join("billing.yaml");
    std::fs::write(&file, yaml).unwrap();
    let (ok, text) = cli(&server.base, &["apply", "-f", file.to_str().unwrap()]);
    assert!(ok, "{text}");
    let events: Vec<Value> = (0..24u64)
        .map(|i| {
            let (project, _) = PROJECTS[i as usize % 4];
            let (meter, _) = METERS[i as usize % 2];
            let time = t0 + ((i as i64 % 3) * 60 + 5).seconds();
            event(&format!("f{i}"), meter, project, time, 10 + i)
        })
        .collect();
    let (status, body) = api
        .post(&server.base, "/api/v1/events", &json!(events))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = api.get(&server.base, "/api/v1/billing/status").await;
    assert_eq!(status, 501, "the server does not forward: {body}");

    let key_file = work.path().join("om.key");
    std::fs::write(&key_file, format!("{API_KEY}\n")).unwrap();
    let forward = |base: &str| {
        cli(
            base,
            &[
                "forward",
                "--sink",
                "om",
                "--once",
                "--data-dir",
                work.path().join("forward").to_str().unwrap(),
                "--api-key-file",
                key_file.to_str().unwrap(),
                "--egress-allow",
                "127.0.0.0/8",
            ],
        )
    };
    let (ok, first) = forward(&server.base);
    assert!(ok, "{first}");
    assert_eq!(
        nonzero(provider.sums()),
        api.ledger_totals(&server.base, t0, end).await
    );

    // Into a record already sent (acct-a, first window, region eu).
    let late = vec![event("late", "requests", "p1", t0 + 30.seconds(), 1000)];
    let (status, body) = api.post(&server.base, "/api/v1/events", &json!(late)).await;
    assert_eq!(status, 200, "{body}");
    let (ok, second) = forward(&server.base);
    assert!(ok, "{second}");
    assert_eq!(
        nonzero(provider.sums()),
        api.ledger_totals(&server.base, t0, end).await
    );
    assert!(second.contains("\"correctionsSent\": 1"), "{second}");
    assert!(!first.contains(API_KEY) && !second.contains(API_KEY));
}
