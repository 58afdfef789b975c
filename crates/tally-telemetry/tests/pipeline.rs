//! The exporters' runtime against a real OTLP/HTTP receiver (built on the
//! official protobuf definitions, see `tally_testkit::otlp_receiver`): exactly
//! the selected series, once each, with the bearer token, through injected
//! 429/503/timeouts; a dead sink does not hold up a healthy one;
//! secrets rotate without a restart.

use tally_testkit::{exporters, otlp_receiver as receiver};

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use exporters::*;
use receiver::{Fault, Receiver};
use tally_telemetry::{InMemoryResourceIndex, Pipeline, PipelineOptions, Secrets};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_the_selected_series_arrive_once_with_the_token_through_faults() {
    let receiver = Receiver::start().await;
    receiver.fail(
        "a",
        [
            Fault::Status(429, Some(1)),
            Fault::Status(503, None),
            Fault::Hang(Duration::from_millis(800)),
            Fault::Status(502, None),
        ],
    );
    let pipeline = Pipeline::new(tally_delivery::Registry::new(), options()).unwrap();
    let selector = r#"{metricsql: '{__name__=~"network_bytes_.*|requests_total", code!="500"}'}"#;
    let report = pipeline.update(snapshot(
        vec![exporter(
            "ns-a",
            "e",
            selector,
            &[sink("k", &receiver.endpoint("a"), "")],
        )],
        secrets("ns-a", TOKEN),
    ));
    assert_eq!((report.started, report.invalid), (1, 0));
    const REQUESTS: u64 = 100;
    for i in 0..REQUESTS {
        let r = pipeline.ingest(&traffic(i));
        assert_eq!(r.points, 6);
        assert_eq!(r.handed, 1, "only ns-a's network_bytes_sent{{code=200}}");
    }
    let got = receiver.wait_for_points("a", REQUESTS as usize, WAIT).await;
    assert_eq!(got, REQUESTS as usize);
    let status = settled(&pipeline, "ns-a", "e").await;
    receiver.with("a", |e| {
        // Exactly the selected series, each point once.
        let mut seen = BTreeSet::new();
        for p in &e.points {
            assert_eq!(p.metric, "network_bytes_sent");
            assert_eq!(p.resource["namespace"], "ns-a");
            assert_eq!(p.attributes["code"], "200");
            assert_eq!((p.kind, p.temporality, p.monotonic), ("sum", 2, true));
            assert!(seen.insert(p.time), "point {} arrived twice", p.time);
        }
        assert_eq!(seen.len(), REQUESTS as usize);
        // Every request carried the token; bodies were gzipped protobuf.
        assert!(
            e.authorizations
                .iter()
                .all(|a| a == &format!("Bearer {TOKEN}"))
        );
        assert!(
            e.content
                .iter()
                .all(|(ct, ce)| ct == "application/x-protobuf" && ce == "gzip")
        );
        // Batches never exceed batch.maxSize (40).
        assert!(
            e.batch_sizes.iter().all(|n| *n <= 40),
            "{:?}",
            e.batch_sizes
        );
        assert!(e.requests >= e.batch_sizes.len() + 4);
    });
    let sink = &status.sinks[0];
    assert_eq!(sink.points_exported, REQUESTS);
    assert_eq!(sink.points_received, REQUESTS);
    assert!(sink.requests_retried >= 4, "{sink:?}");
    assert!(sink.points_retried >= 1, "{sink:?}");
    assert!(sink.points_dropped.is_empty(), "{sink:?}");
    assert!(sink.last_success_time.is_some());
    let kinds: Vec<(&str, &str)> = status
        .conditions
        .iter()
        .map(|c| (c.kind.as_str(), c.status.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("Accepted", "True"),
            ("Ready", "True"),
            ("SinkHealthy", "True")
        ]
    );
    assert_eq!(status.observed_generation, Some(3));
    // The counters are on /metrics too, labelled by exporter and sink.
    let text = pipeline.registry().render();
    let line = format!(
        "tally_component_sent_total{{component_kind=\"sink\",component_id=\"exporter/ns-a/e/k\"}} {REQUESTS}"
    );
    assert!(text.lines().any(|l| l == line), "{text}");
    pipeline.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_errors_and_partial_success_are_counted_not_retried() {
    let receiver = Receiver::start().await;
    receiver.fail("a", [Fault::Status(400, None), Fault::Partial(1)]);
    let pipeline = Pipeline::new(tally_delivery::Registry::new(), options()).unwrap();
    let batch1 = "{name: k, otlp_http: {endpoint: 'ENDPOINT', compression: none, encoding: json}, batch: {enabled: false}}"
        .replace("ENDPOINT", &receiver.endpoint("a"));
    pipeline.update(snapshot(
        vec![exporter("ns-a", "e", "{metricsql: ''}", &[batch1])],
        Secrets::new(),
    ));
    for i in 0..3 {
        pipeline.ingest(&traffic(i));
    }
    // 3 requests of 3 points: the first refused (400), one point of the
    // second refused by partial success, the third whole.
    receiver.wait_for_points("a", 5, WAIT).await;
    let status = settled(&pipeline, "ns-a", "e").await;
    let sink = &status.sinks[0];
    assert_eq!(sink.points_exported, 5, "{sink:?}");
    assert_eq!(
        sink.points_dropped,
        BTreeMap::from([
            ("permanent_error".to_owned(), 3),
            ("rejected_by_receiver".to_owned(), 1)
        ])
    );
    assert_eq!(sink.requests_retried, 0);
    receiver.with("a", |e| {
        assert_eq!(e.requests, 3);
        assert!(
            e.content
                .iter()
                .all(|(ct, ce)| ct == "application/json" && ce.is_empty())
        );
    });
    pipeline.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_sink_does_not_block_a_healthy_one() {
    let receiver = Receiver::start().await;
    // An endpoint that accepts connections and never answers.
    let black_hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}", black_hole.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = black_hole.accept().await {
            held.push(socket);
        }
    });
    let pipeline = Pipeline::new(
        tally_delivery::Registry::new(),
        PipelineOptions {
            handoff_capacity: 64,
            queue_max_batches: 4,
            request_timeout: Duration::from_secs(30),
            ..options()
        },
    )
    .unwrap();
    pipeline.update(snapshot(
        vec![
            // One exporter with a dead and a live sink, and another exporter
            // with a live sink.
            exporter(
                "ns-a",
                "e",
                "{metricsql: ''}",
                &[
                    sink("dead", &dead, ""),
                    sink("live", &receiver.endpoint("a"), ""),
                ],
            ),
            exporter(
                "ns-a",
                "f",
                "{metricsql: ''}",
                &[sink("live", &receiver.endpoint("b"), "")],
            ),
        ],
        secrets("ns-a", TOKEN),
    ));
    const REQUESTS: u64 = 200;
    let started = std::time::Instant::now();
    for i in 0..REQUESTS {
        pipeline.ingest(&traffic(i));
        if i % 5 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // ingest never waits on the dead endpoint (30 s timeout): the whole loop
    // is far quicker than one of its requests.
    assert!(started.elapsed() < Duration::from_secs(15));
    for name in ["a", "b"] {
        let got = receiver
            .wait_for_points(name, 3 * REQUESTS as usize, WAIT)
            .await;
        assert_eq!(got, 3 * REQUESTS as usize, "endpoint {name}");
    }
    // The receiver records a batch just before it answers: wait for the
    // answer to be counted.
    let started = std::time::Instant::now();
    while pipeline.status("ns-a", "e").unwrap().sinks[1].points_exported < 3 * REQUESTS
        && started.elapsed() < WAIT
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = pipeline.status("ns-a", "e").unwrap();
    let dead = status.sinks.iter().find(|s| s.name == "dead").unwrap();
    let live = status.sinks.iter().find(|s| s.name == "live").unwrap();
    assert_eq!(live.points_exported, 3 * REQUESTS);
    assert_eq!(dead.points_exported, 0);
    // The dead sink's bounded queue overflowed: counted, not silent.
    let dropped = dead.points_dropped.get("queue_full").copied().unwrap_or(0);
    assert!(dropped > 0, "{dead:?}");
    assert_eq!(
        dead.points_exported + dead.points_dropped.values().sum::<u64>() + dead.points_queued,
        3 * REQUESTS,
        "every point is exported, queued or counted as dropped: {dead:?}"
    );
    drop(pipeline);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_is_used_without_a_restart_and_a_missing_one_is_reported() {
    let receiver = Receiver::start().await;
    let pipeline = Pipeline::new(tally_delivery::Registry::new(), options()).unwrap();
    let exporters = || {
        vec![exporter(
            "ns-a",
            "e",
            "{metricsql: ''}",
            &[sink("k", &receiver.endpoint("a"), "")],
        )]
    };
    pipeline.update(snapshot(exporters(), secrets("ns-a", "old-token-1")));
    pipeline.ingest(&traffic(0));
    receiver.wait_for_points("a", 3, WAIT).await;
    let report = pipeline.update(snapshot(exporters(), secrets("ns-a", "new-token-2")));
    assert_eq!((report.kept, report.started, report.stopped), (1, 0, 0));
    pipeline.ingest(&traffic(1));
    receiver.wait_for_points("a", 6, WAIT).await;
    receiver.with("a", |e| {
        assert_eq!(
            e.authorizations,
            ["Bearer old-token-1", "Bearer new-token-2"]
        );
    });
    // A secret in another namespace is not the exporter's.
    pipeline.update(snapshot(exporters(), secrets("ns-x", "other-project")));
    let r = pipeline.ingest(&traffic(2));
    assert_eq!((r.handed, r.dropped), (0, 3));
    let status = pipeline.status("ns-a", "e").unwrap();
    let ready = status
        .conditions
        .iter()
        .find(|c| c.kind == "Ready")
        .unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "SecretNotFound")
    );
    assert!(ready.message.contains("ns-a/otlp"), "{}", ready.message);
    assert_eq!(status.sinks[0].points_dropped["secret_missing"], 3);
    pipeline.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_sinks_get_deltas_and_projects_stay_apart() {
    let receiver = Receiver::start().await;
    let pipeline = Pipeline::new(tally_delivery::Registry::new(), options()).unwrap();
    let delta =
        "{name: d, temporality: delta, otlp_http: {endpoint: 'ENDPOINT'}, batch: {timeout: 20ms}}"
            .replace("ENDPOINT", &receiver.endpoint("d"));
    let other = "{name: k, otlp_http: {endpoint: 'ENDPOINT'}, batch: {timeout: 20ms}}"
        .replace("ENDPOINT", &receiver.endpoint("x"));
    pipeline.update(snapshot(
        vec![
            exporter(
                "ns-a",
                "e",
                r#"{metricsql: '{__name__="network_bytes_sent"}'}"#,
                &[delta],
            ),
            exporter("ns-x", "other", "{metricsql: ''}", &[other]),
        ],
        Secrets::new(),
    ));
    // Cumulative values 0, 1, 2, ... with start time 1 (before the
    // pipeline started): the first is the baseline.
    for i in 0..5 {
        pipeline.ingest(&traffic(i));
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    receiver.wait_for_points("d", 4, WAIT).await;
    receiver.wait_for_points("x", 15, WAIT).await;
    settled(&pipeline, "ns-a", "e").await;
    settled(&pipeline, "ns-x", "other").await;
    receiver.with("d", |e| {
        let values: Vec<(i32, f64)> = e.points.iter().map(|p| (p.temporality, p.value)).collect();
        assert_eq!(values, [(1, 1.0); 4]);
    });
    receiver.with("x", |e| {
        assert!(e.points.iter().all(|p| p.resource["namespace"] == "ns-x"));
        assert_eq!(e.points.len(), 15);
    });
    let status = pipeline.status("ns-a", "e").unwrap();
    assert_eq!(status.sinks[0].points_dropped["delta_baseline"], 1);
    pipeline.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_keep_unchanged_sinks_and_report_invalid_exporters() {
    let receiver = Receiver::start().await;
    let pipeline = Pipeline::new(tally_delivery::Registry::new(), options()).unwrap();
    let a = sink("k", &receiver.endpoint("a"), "");
    let invalid = manifest(
        "apiVersion: telemetry.datumapis.com/v1alpha1\nkind: Exporter\nmetadata: {name: bad, namespace: ns-a}\nspec:\n  sources: [{name: s, metrics: {metricsql: 'rate(x[5m])'}}]\n  sinks: [{name: k, otlp_http: {endpoint: 'http://127.0.0.1:1'}}]\n",
    );
    let first = pipeline.update(snapshot(
        vec![
            exporter("ns-a", "e", "{metricsql: ''}", std::slice::from_ref(&a)),
            invalid.clone(),
        ],
        secrets("ns-a", TOKEN),
    ));
    assert_eq!((first.started, first.invalid), (1, 1));
    let bad = pipeline.status("ns-a", "bad").unwrap();
    assert_eq!(bad.conditions[0].reason, "InvalidMetricsQL");
    assert_eq!(bad.conditions[1].reason, "NotAccepted");
    // Changing the batch size rebuilds the sink; removing it stops it.
    let b = a.replace("maxSize: 40", "maxSize: 10");
    let second = pipeline.update(snapshot(
        vec![exporter("ns-a", "e", "{metricsql: ''}", &[b])],
        secrets("ns-a", TOKEN),
    ));
    assert_eq!((second.kept, second.started, second.stopped), (0, 1, 1));
    assert!(pipeline.status("ns-a", "bad").is_none());
    pipeline.ingest(&traffic(0));
    assert_eq!(receiver.wait_for_points("a", 3, WAIT).await, 3);
    let third = pipeline.update(snapshot(vec![], Secrets::new()));
    assert_eq!((third.kept, third.started, third.stopped), (0, 0, 1));
    assert!(pipeline.status("ns-a", "e").is_none());
    let r = pipeline.ingest(&traffic(1));
    assert_eq!(r.exporters, 0);
    let _ = InMemoryResourceIndex::new();
}

#[tokio::test]
async fn a_full_hand_off_is_reported_as_overload_and_nothing_is_taken() {
    let receiver = Receiver::start().await;
    let pipeline = Pipeline::new(
        tally_delivery::Registry::new(),
        PipelineOptions {
            handoff_capacity: 1,
            ..options()
        },
    )
    .unwrap();
    assert!(!pipeline.ready(), "no snapshot yet");
    pipeline.update(snapshot(
        vec![exporter(
            "ns-a",
            "e",
            "{}",
            &[sink("k", &receiver.endpoint("a"), "")],
        )],
        secrets("ns-a", TOKEN),
    ));
    assert!(pipeline.ready());
    // On this single-threaded runtime the sink's task cannot run between
    // two calls: the second finds the hand-off (of one) full.
    let first = pipeline.ingest(&traffic(0));
    assert!(first.handed > 0 && !first.overloaded, "{first:?}");
    let second = pipeline.ingest(&traffic(1));
    assert!(second.overloaded, "{second:?}");
    assert_eq!((second.handed, second.dropped), (0, first.handed));
    // Nothing selected is no overload.
    let mut elsewhere = traffic(2);
    elsewhere.resource_metrics.remove(0);
    assert!(!pipeline.ingest(&elsewhere).overloaded);
    pipeline.shutdown().await;
    assert!(!pipeline.ready(), "shut down");
}
