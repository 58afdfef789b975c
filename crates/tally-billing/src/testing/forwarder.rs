//! Forwarder fixtures shared by this crate's tests and its benchmark: a
//! sink, meters, accounts and bindings, a forwarder config against a
//! loopback test server, and the benchmark's measuring loop.

use std::time::Duration;

use super::TestServer;
use crate::{
    Attribution, BillingAccount, BillingAccountBinding, BillingSink, ForwardedMeter,
    ForwarderConfig, Provider, SecretKeyRef,
};

pub const API_KEY: &str = "af-test-key-5f2b9c";
pub const T0_MS: i64 = 1_735_689_600_000; // 2025-01-01T00:00:00Z

pub fn at(offset_secs: i64) -> jiff::Timestamp {
    jiff::Timestamp::from_millisecond(T0_MS + offset_secs * 1000).unwrap()
}

pub fn sink(url: &str, provider: Provider, lateness_secs: u64) -> BillingSink {
    BillingSink {
        name: "test".into(),
        provider,
        endpoint: reqwest::Url::parse(url).unwrap(),
        api_key_secret_ref: SecretKeyRef {
            name: "provider".into(),
            key: "apiKey".into(),
            namespace: crate::DEFAULT_SECRET_NAMESPACE.into(),
        },
        window: Duration::from_secs(60),
        window_explicit: true,
        allowed_lateness: Duration::from_secs(lateness_secs),
        batch_size: 50,
        request_timeout: Duration::from_secs(5),
        start_at: None,
        max_in_flight: 4,
        max_lag: Duration::from_secs(3600),
        usage_endpoint: reqwest::Url::parse(url).unwrap(),
    }
}

pub fn meters(names: &[&str]) -> Vec<ForwardedMeter> {
    names
        .iter()
        .map(|m| ForwardedMeter {
            meter: m.to_string(),
            api_name: format!("api-{m}"),
            dimensions: vec!["region".to_string()],
        })
        .collect()
}

/// The test providers' loopback addresses, which sinks refuse by default.
pub fn loopback() -> tally_delivery::EgressPolicy {
    tally_delivery::EgressPolicy::parse(["127.0.0.0/8", "::1"]).unwrap()
}

/// A config with fast retries for tests, allowed to reach the loopback
/// test providers.
pub fn config(
    sink: BillingSink,
    meters: Vec<ForwardedMeter>,
    dir: &std::path::Path,
) -> ForwarderConfig {
    let mut config = ForwarderConfig::new(
        sink,
        crate::Secret::new(API_KEY),
        meters,
        dir.to_path_buf(),
        at(0),
    );
    config.retry.initial_backoff = Duration::from_millis(2);
    config.retry.max_backoff = Duration::from_millis(20);
    config.retry.max_retry_after = Duration::from_secs(2);
    config.egress = loopback();
    config
}

pub fn account(name: &str) -> BillingAccount {
    BillingAccount {
        name: name.into(),
        uid: format!("uid-{name}"),
        phase: Some("Ready".into()),
    }
}

pub fn binding(account: &str, project: &str, established_secs: i64) -> BillingAccountBinding {
    BillingAccountBinding {
        name: format!("{project}-{account}-{established_secs}"),
        account: account.into(),
        project: project.into(),
        established_at: Some(at(established_secs)),
    }
}

/// Every project `p<i>` bound to account `a<i>` from T0 on.
pub fn one_account_per_project(n: usize) -> Attribution {
    let accounts: Vec<_> = (0..n).map(|i| account(&format!("a{i}"))).collect();
    let bindings: Vec<_> = (0..n)
        .map(|i| binding(&format!("a{i}"), &format!("p{i}"), 0))
        .collect();
    Attribution::new(&accounts, &bindings)
}

/// The benchmarks' loop: for each of `windows` windows, closes it (no
/// allowed lateness), plans, sends and waits for every acknowledgement;
/// prints records per second and the lag from close to last answer.
pub async fn measure(
    forwarder: &mut crate::Forwarder,
    server: &TestServer,
    windows: i64,
    label: &str,
) {
    let mut total_records = 0u64;
    let mut lags = Vec::new();
    let started = std::time::Instant::now();
    for w in 1..=windows {
        let closed = std::time::Instant::now();
        let report = forwarder.run_once(at(w * 60)).await.expect("pass");
        let planned = closed.elapsed();
        assert!(
            forwarder
                .wait_idle(Duration::from_secs(600))
                .await
                .expect("idle")
        );
        let lag = closed.elapsed();
        total_records += report.records;
        lags.push(lag);
        println!(
            "window {w}: {} records, planned+committed in {:.2?}, acknowledged {:.2?} after close",
            report.records, planned, lag
        );
    }
    let elapsed = started.elapsed();
    assert_eq!(
        server.state().accepted_records,
        total_records,
        "every record counted once"
    );
    println!(
        "{label} x {windows} windows: {total_records} records in {:.2?} = {:.0} records/s; lag max {:.2?}",
        elapsed,
        total_records as f64 / elapsed.as_secs_f64(),
        lags.iter().max().copied().unwrap_or_default()
    );
}
