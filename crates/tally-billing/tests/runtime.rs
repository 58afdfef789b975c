//! The billing runtime follows its inputs: a sink whose Secret is missing or
//! whose window is not whole minutes does not forward (with the reason); a
//! rotated API key restarts the sink's forwarder with the new key, which
//! resumes from its progress; a removed sink stops.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rust_decimal::Decimal;
use support::{TestServer, at, meters, one_account_per_project, sink};
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
