//! The billing runtime follows its inputs: a sink whose Secret is missing or
//! whose window is not whole minutes does not forward (with the reason); a
//! rotated API key restarts the sink's forwarder with the new key, which
//! resumes from its progress; a removed sink stops. Its status tells the
//! truth: not Ready while the provider refuses the key, is down, or the
//! lag exceeds `maxLag`, with the last error and since when, cleared on
//! recovery.

use tally_billing::testing as support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rust_decimal::Decimal;
use support::{TestServer, at, meters, one_account_per_project, sink};
use tally_billing::runtime::SinkReport;
use tally_billing::runtime::{
    BillingHandle, BillingInputs, BillingRuntime, Condition, RuntimeConfig, SinkInput,
};
use tally_billing::{ForwarderConfig, MemoryUsageSource, Provider, Secret};
use tally_delivery::Registry;

fn fast(config: &mut ForwarderConfig) {
    config.retry.initial_backoff = Duration::from_millis(2);
    config.retry.max_backoff = Duration::from_millis(20);
}

fn inputs(server: &TestServer, key: Result<&str, Condition>, window_secs: u64) -> BillingInputs {
    let mut sink = sink(&server.url, Provider::Amberflo, 0);
    sink.name = "af".into();
    sink.window = Duration::from_secs(window_secs);
    sink.start_at = Some(at(0));
    // Starting in 2025, the sink is years behind: not the point here.
    sink.max_lag = Duration::from_secs(1 << 40);
    BillingInputs {
        sinks: vec![SinkInput {
            name: "af".into(),
            config: key.map(|k| (sink, Secret::new(k))),
        }],
        meters: meters(&["requests"]),
        attribution: one_account_per_project(1),
    }
}

fn reason(handle: &BillingHandle) -> (bool, String) {
    let report = handle.sink_status("af").expect("the sink is reported");
    (report.ready, report.reason)
}

#[tokio::test]
async fn the_runtime_follows_secrets_windows_and_sinks() {
    let server = TestServer::start("key-one").await;
    let dir = tempfile::tempdir().unwrap();
    let source = Arc::new(MemoryUsageSource::new());
    source.add("requests", "p0", at(10), BTreeMap::new(), Decimal::from(3));
    let runtime = BillingRuntime::new(
        RuntimeConfig {
            dir: dir.path().to_path_buf(),
            shutdown_grace: Duration::from_secs(1),
            tune: Some(fast),
            egress: support::loopback(),
        },
        Registry::new(),
        source.clone(),
    );
    let handle = BillingHandle::new(runtime);

    let missing = Condition::new(
        "SecretNotFound",
        "Secret tally-system/provider does not exist",
    );
    handle.step(Some(inputs(&server, Err(missing), 60))).await;
    assert_eq!(reason(&handle), (false, "SecretNotFound".into()));

    handle.step(Some(inputs(&server, Ok("key-one"), 90))).await;
    assert_eq!(reason(&handle), (false, "UnsupportedWindowSize".into()));

    handle.step(Some(inputs(&server, Ok("key-one"), 60))).await;
    assert!(handle.wait_idle(Duration::from_secs(20)).await);
    assert_eq!(reason(&handle), (true, "Forwarding".into()));
    let customer = ("uid-a0".to_string(), "api-requests".to_string());
    assert_eq!(server.sums()[&customer], Decimal::from(3));

    // The provider's key is rotated, and so is the Secret: new usage goes
    // out with the new key (the old one would be refused with 401).
    server.state().api_key = "key-two".into();
    source.add("requests", "p0", at(70), BTreeMap::new(), Decimal::from(4));
    handle.step(Some(inputs(&server, Ok("key-two"), 60))).await;
    assert!(handle.wait_idle(Duration::from_secs(20)).await);
    assert_eq!(server.sums()[&customer], Decimal::from(7));
    let status = handle.sink_status("af").unwrap().status.unwrap();
    assert_eq!(status.dead_letters, 0);
    assert!(
        server.state().refused.is_empty(),
        "{:?}",
        server.state().refused
    );
    // Resumed from its progress: the first window was not sent again.
    assert_eq!(server.state().duplicates, 0);

    let reconciled = handle.reconcile(None, at(0), at(120)).await.unwrap();
    assert_eq!(reconciled[0].differences, 0);
    assert_eq!(reconciled[0].totals[0].ledger, Decimal::from(7));

    // The metrics say the same.
    let metrics = handle.render_metrics();
    assert!(
        metrics.contains("tally_billing_sink_ready{sink=\"af\"} 1"),
        "{metrics}"
    );
    assert!(!metrics.contains("key-two"));

    handle
        .step(Some(BillingInputs {
            sinks: Vec::new(),
            ..inputs(&server, Ok("key-two"), 60)
        }))
        .await;
    assert!(handle.status().is_empty());
}

fn runtime(dir: &std::path::Path, source: &Arc<MemoryUsageSource>) -> BillingHandle {
    BillingHandle::new(BillingRuntime::new(
        RuntimeConfig {
            dir: dir.to_path_buf(),
            shutdown_grace: Duration::from_secs(1),
            tune: Some(fast),
            egress: support::loopback(),
        },
        Registry::new(),
        source.clone(),
    ))
}

/// A sink of one-minute windows from `start` on, closed at once.
fn live_inputs(server: &TestServer, key: &str, start: jiff::Timestamp) -> BillingInputs {
    let mut inputs = inputs(server, Ok(key), 60);
    if let Ok((sink, _)) = &mut inputs.sinks[0].config {
        sink.start_at = Some(start);
        sink.max_lag = Duration::from_secs(3600);
    }
    inputs
}

/// Steps until the sink's report satisfies `done` (or panics after 20 s).
async fn step_until(
    handle: &BillingHandle,
    inputs: &BillingInputs,
    done: impl Fn(&SinkReport) -> bool,
) -> SinkReport {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        handle.step(Some(inputs.clone())).await;
        handle.wait_idle(Duration::from_millis(50)).await;
        let report = handle.sink_status("af").unwrap();
        if done(&report) {
            return report;
        }
        assert!(std::time::Instant::now() < deadline, "{report:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn status_tells_the_truth_about_the_provider_and_clears_on_recovery() {
    let server = TestServer::start("the-right-key").await;
    let dir = tempfile::tempdir().unwrap();
    let source = Arc::new(MemoryUsageSource::new());
    let now = jiff::Timestamp::now();
    let start = jiff::Timestamp::from_second(now.as_second() / 60 * 60 - 300).unwrap();
    let minute = |m: i64| start + jiff::SignedDuration::from_secs(m * 60 + 5);
    source.add(
        "requests",
        "p0",
        minute(0),
        BTreeMap::new(),
        Decimal::from(3),
    );
    let handle = runtime(dir.path(), &source);

    // The provider refuses the key: not Ready, with the status code and
    // Tally's words (not the provider's body), and since when.
    let inputs = live_inputs(&server, "a-revoked-key", start);
    let before = jiff::Timestamp::now();
    let report = step_until(&handle, &inputs, |r| r.reason == "ProviderRejected").await;
    assert!(!report.ready);
    let error = report.last_error.clone().unwrap();
    assert_eq!(error.status, Some(401));
    assert!(error.message.contains("API key"), "{error:?}");
    assert!(report.since.is_some_and(|s| s >= before), "{report:?}");
    let shown = serde_json::to_string(&report).unwrap();
    assert!(!shown.contains("missing or wrong credentials"), "{shown}");
    assert!(!shown.contains("a-revoked-key"), "{shown}");
    assert!(
        handle
            .render_metrics()
            .contains("tally_billing_sink_ready{sink=\"af\"} 0")
    );

    // The provider takes the key again; every dead letter is retried and
    // delivered: the error clears.
    server.state().api_key = "a-revoked-key".into();
    let retried = handle.retry_all_dead_letters("af").await.unwrap();
    assert_eq!(retried.len(), 1);
    let report = step_until(&handle, &inputs, |r| r.ready).await;
    assert_eq!(
        (report.reason.as_str(), report.last_error),
        ("Forwarding", None)
    );
    assert_eq!(report.status.unwrap().dead_letters, 0);

    // The provider goes down while a correction is due: ProviderUnreachable
    // until it is back, then Ready, and the totals are exact.
    server.state().down = true;
    source.add(
        "requests",
        "p0",
        minute(1),
        BTreeMap::new(),
        Decimal::from(4),
    );
    let report = step_until(&handle, &inputs, |r| r.reason == "ProviderUnreachable").await;
    assert_eq!(report.last_error.unwrap().status, Some(503));
    server.state().down = false;
    step_until(&handle, &inputs, |r| r.ready).await;
    let customer = ("uid-a0".to_string(), "api-requests".to_string());
    assert_eq!(server.sums()[&customer], Decimal::from(7));
}

#[tokio::test]
async fn a_sink_far_behind_is_backlogged_until_it_caught_up() {
    let server = TestServer::start("key").await;
    let dir = tempfile::tempdir().unwrap();
    let source = Arc::new(MemoryUsageSource::new());
    let now = jiff::Timestamp::now();
    // Three days of one-minute windows; a pass plans at most a day of them.
    let start = jiff::Timestamp::from_second(now.as_second() / 60 * 60 - 3 * 86_400).unwrap();
    source.add("requests", "p0", start, BTreeMap::new(), Decimal::from(1));
    let handle = runtime(dir.path(), &source);
    let inputs = live_inputs(&server, "key", start);
    handle.step(Some(inputs.clone())).await;
    let report = handle.sink_status("af").unwrap();
    assert_eq!(
        (report.ready, report.reason.as_str()),
        (false, "Backlogged")
    );
    assert!(
        report.message.contains("exceeds maxLag 3600s"),
        "{report:?}"
    );
    // Since the oldest forwarded-until time plus maxLag.
    let status = report.status.clone().unwrap();
    let behind = status.meters[0].forwarded_until.unwrap();
    assert_eq!(
        report.since,
        Some(behind + jiff::SignedDuration::from_hours(1))
    );
    assert!(status.max_lag.unwrap() > Duration::from_secs(86_400));
    let report = step_until(&handle, &inputs, |r| r.ready).await;
    assert_eq!(report.reason, "Forwarding");
}
