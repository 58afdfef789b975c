//! A sink's health as its exporter's status tells it, and the default retry
//! budget, against a real OTLP/HTTP receiver with injected faults: a failing
//! sink makes the exporter not Ready, with the time of its last error, until
//! it recovers; the README's retry settings lose nothing under 30 % faults.

use tally_testkit::{exporters, otlp_receiver as receiver};

use std::collections::BTreeSet;
use std::time::Duration;

use exporters::*;
use receiver::{Fault, Receiver};
use tally_telemetry::{ExporterStatus, Pipeline};

fn condition<'a>(status: &'a ExporterStatus, kind: &str) -> (&'a str, &'a str, &'a str) {
    let c = status.conditions.iter().find(|c| c.kind == kind).unwrap();
    (c.status.as_str(), c.reason.as_str(), c.message.as_str())
}

/// Waits until `done` holds for the exporter's status (or the limit).
async fn until(pipeline: &Pipeline, done: impl Fn(&ExporterStatus) -> bool) -> ExporterStatus {
    let started = std::time::Instant::now();
    loop {
        let status = pipeline.status("ns-a", "e").unwrap();
        if done(&status) || started.elapsed() > WAIT {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_sink_makes_its_exporter_not_ready_until_it_recovers() {
    let receiver = Receiver::start().await;
    receiver.fail("a", [Fault::Status(400, None)]);
    let pipeline = Pipeline::new(tally_delivery::Registry::new(), options()).unwrap();
    pipeline.update(snapshot(
        vec![exporter(
            "ns-a",
            "e",
            "{metricsql: ''}",
            &[
                sink("k", &receiver.endpoint("a"), ""),
                sink("ok", &receiver.endpoint("b"), ""),
            ],
        )],
        secrets("ns-a", TOKEN),
    ));
    let before = jiff::Timestamp::now();
    pipeline.ingest(&traffic(0));
    let status = until(&pipeline, |s| !s.sinks[0].points_dropped.is_empty()).await;
    let failing = &status.sinks[0];
    assert_eq!(failing.points_dropped.get("permanent_error"), Some(&3));
    let at = failing.last_error_time.expect("the error's time");
    assert!(at >= before && at <= jiff::Timestamp::now(), "{at}");
    assert!(failing.last_error.as_deref().unwrap().contains("400"));
    // Not Ready, naming the sink, though the other sink is healthy.
    let (ready, reason, message) = condition(&status, "Ready");
    assert_eq!((ready, reason), ("False", "ExportFailing"), "{message}");
    assert!(
        message.contains("sink k") && message.contains(&at.to_string()),
        "{message}"
    );
    let healthy: Vec<_> = status
        .conditions
        .iter()
        .filter(|c| c.kind == "SinkHealthy")
        .map(|c| (c.sink.as_deref().unwrap(), c.status.as_str()))
        .collect();
    assert_eq!(healthy, [("k", "False"), ("ok", "True")]);

    // The next batch goes through: Ready again, the error cleared.
    pipeline.ingest(&traffic(1));
    let status = until(&pipeline, |s| s.sinks[0].points_exported == 3).await;
    assert_eq!(status.sinks[0].points_exported, 3);
    assert_eq!(condition(&status, "Ready").0, "True");
    assert_eq!(status.sinks[0].last_error, None);
    assert_eq!(status.sinks[0].last_error_time, None);
    pipeline.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_retry_settings_lose_nothing_under_30_percent_faults() {
    let receiver = Receiver::start().await;
    receiver.fail_at_random("a", 300, 0x5eed_1234);
    let pipeline = Pipeline::new(tally_delivery::Registry::new(), options()).unwrap();
    // The README's sink, with small batches for many requests and a short
    // first backoff for a quick test; the retry budget is the default one.
    let sink = format!(
        "{{name: k, otlp_http: {{endpoint: '{}'}}, batch: {{enabled: true, timeout: 50ms, maxSize: 5}}, retry: {{enabled: true, backoff: 10ms}}}}",
        receiver.endpoint("a")
    );
    pipeline.update(snapshot(
        vec![exporter("ns-a", "e", "{metricsql: ''}", &[sink])],
        secrets("ns-a", TOKEN),
    ));
    const REQUESTS: u64 = 300;
    for i in 0..REQUESTS {
        pipeline.ingest(&traffic(i));
    }
    let want = 3 * REQUESTS as usize;
    assert_eq!(receiver.wait_for_points("a", want, WAIT * 3).await, want);
    let status = settled(&pipeline, "ns-a", "e").await;
    let sink = &status.sinks[0];
    assert_eq!(sink.points_exported, want as u64, "{sink:?}");
    assert!(sink.points_dropped.is_empty(), "{sink:?}");
    receiver.with("a", |e| {
        let unique: BTreeSet<_> = e.points.iter().map(|p| (&p.metric, p.time)).collect();
        assert_eq!(unique.len(), want, "each point once");
        // About 30 % of requests failed, so there was something to retry.
        let failed = e.requests - e.batch_sizes.len();
        assert!(failed * 10 >= e.requests * 2, "{failed} of {}", e.requests);
    });
    pipeline.shutdown().await;
}
