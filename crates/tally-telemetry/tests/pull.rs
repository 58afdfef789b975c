//! Pull sources inside the pipeline, against a real VictoriaMetrics on
//! loopback and the OTLP test receiver: each exporter gets exactly what its
//! own sources select of the namespaces it may see, once, also after the
//! pipeline is rebuilt on the same queues; another project's series and
//! another exporter's selection never arrive; a VictoriaMetrics that does
//! not answer shows in the status and the component metrics.

use tally_testkit::victoria_metrics;
use tally_testkit::{exporters, otlp_receiver as receiver};

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use exporters::*;
use receiver::Receiver;
use tally_delivery::Registry;
use tally_model::Manifest;
use tally_telemetry::{Pipeline, PipelineOptions, PullOptions, QueueStorage};
use victoria_metrics::{VictoriaMetrics, series};

/// (namespace, metric, time in ms) of a sample.
type Sample = (String, String, i64);

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

fn pull_options(url: &str) -> PullOptions {
    PullOptions {
        interval: Duration::from_millis(200),
        lag: Duration::from_secs(2),
        window: Duration::from_secs(20),
        backfill: Duration::from_secs(120),
        ..PullOptions::new(url)
    }
}

fn pipeline(dir: &std::path::Path, pull: PullOptions, registry: Registry) -> Pipeline {
    Pipeline::new(
        registry,
        PipelineOptions {
            storage: QueueStorage::Disk {
                dir: dir.to_owned(),
                sync: false,
            },
            pull: Some(pull),
            ..options()
        },
    )
    .unwrap()
}

fn exporters_of(receiver: &Receiver) -> Vec<Manifest> {
    let plain = |name: &str| {
        format!(
            "{{name: k, otlp_http: {{endpoint: '{}'}}, batch: {{timeout: 50ms, maxSize: 25}}, retry: {{maxAttempts: 6, backoff: 20ms}}}}",
            receiver.endpoint(name)
        )
    };
    vec![
        // One metric of its own namespace.
        exporter(
            "ns-a",
            "bytes",
            r#"{metricsql: '{__name__="network_bytes_sent"}'}"#,
            &[plain("bytes")],
        ),
        // Tries to read another project's namespace: gets nothing.
        exporter(
            "ns-a",
            "sneaky",
            r#"{metricsql: '{namespace="ns-x"}'}"#,
            &[plain("sneaky")],
        ),
        // Every production namespace of its project (ns-a and ns-c, not the
        // staging ns-b, not ns-x of another project).
        exporter(
            "ns-a",
            "wide",
            "{resourceSelectors: [{namespaceSelector: {matchLabels: {environment: production}}}]}",
            &[plain("wide")],
        ),
    ]
}

/// Samples of every series every 500 ms in `[from, to)`.
async fn import(vm: &VictoriaMetrics, from: i64, to: i64) -> Vec<(BTreeMap<String, String>, i64)> {
    let labelled: Vec<Vec<(&str, &str)>> = vec![
        vec![
            ("__name__", "network_bytes_sent"),
            ("namespace", "ns-a"),
            ("code", "200"),
        ],
        vec![("__name__", "requests_total"), ("namespace", "ns-a")],
        vec![("__name__", "network_bytes_sent"), ("namespace", "ns-b")],
        vec![("__name__", "network_bytes_sent"), ("namespace", "ns-c")],
        vec![("__name__", "network_bytes_sent"), ("namespace", "ns-x")],
        // Claims another project: never exported.
        vec![
            ("__name__", "network_bytes_sent"),
            ("namespace", "ns-a"),
            ("project", "p2"),
            ("code", "evil"),
        ],
        // No namespace: nobody's.
        vec![("__name__", "network_bytes_sent"), ("code", "orphan")],
    ];
    let times: Vec<i64> = (0..)
        .map(|i| from + i * 500)
        .take_while(|t| *t < to)
        .collect();
    let samples: Vec<(i64, f64)> = times.iter().map(|t| (*t, (*t % 1000) as f64)).collect();
    vm.import(
        &labelled
            .iter()
            .map(|labels| series(labels, &samples))
            .collect::<Vec<_>>(),
    )
    .await;
    let mut out = Vec::new();
    for labels in &labelled {
        for t in &times {
            out.push((
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                *t,
            ));
        }
    }
    out
}

/// What each exporter should have of `imported`.
fn expected(imported: &[(BTreeMap<String, String>, i64)]) -> BTreeMap<&'static str, Vec<Sample>> {
    let mut out: BTreeMap<&'static str, Vec<Sample>> = BTreeMap::new();
    for (labels, t) in imported {
        let (Some(ns), name) = (labels.get("namespace"), &labels["__name__"]) else {
            continue;
        };
        if labels.contains_key("project") {
            continue;
        }
        let sample = (ns.clone(), name.clone(), *t);
        if ns == "ns-a" && name == "network_bytes_sent" {
            out.entry("bytes").or_default().push(sample.clone());
        }
        if ns == "ns-a" || ns == "ns-c" {
            out.entry("wide").or_default().push(sample);
        }
    }
    out.entry("sneaky").or_default();
    for samples in out.values_mut() {
        samples.sort();
    }
    out
}

fn received(receiver: &Receiver, name: &str) -> Vec<Sample> {
    let mut samples: Vec<Sample> = receiver.with(name, |e| {
        e.points
            .iter()
            .map(|p| {
                assert_eq!(p.kind, "gauge");
                (
                    p.resource.get("namespace").cloned().unwrap_or_default(),
                    p.metric.clone(),
                    (p.time / 1_000_000) as i64,
                )
            })
            .collect()
    });
    samples.sort();
    samples
}

async fn wait_for(receiver: &Receiver, expected: &BTreeMap<&'static str, Vec<Sample>>) {
    let deadline = Instant::now() + Duration::from_secs(40);
    for (name, samples) in expected {
        receiver
            .wait_for_points(name, samples.len(), deadline - Instant::now())
            .await;
    }
    // Whatever else was going to arrive has had the time to.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (name, samples) in expected {
        assert_eq!(&received(receiver, name), samples, "exporter {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_exporter_pulls_exactly_its_own_selection_once_across_a_rebuild() {
    let Some(vm) = victoria_metrics::start().await else {
        return;
    };
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let start = now_ms();
    // History the backfill reaches, and some it does not.
    let mut imported = import(&vm, start - 100_000, start - 5_000).await;
    import(&vm, start - 200_000, start - 150_000).await;

    let registry = Registry::new();
    let first = pipeline(dir.path(), pull_options(&vm.base), registry.clone());
    first.update(snapshot(exporters_of(&receiver), secrets("ns-a", TOKEN)));
    wait_for(&receiver, &expected(&imported)).await;
    let status = first.status("ns-a", "bytes").unwrap();
    let healthy = status
        .conditions
        .iter()
        .find(|c| c.kind == "SourceHealthy")
        .unwrap();
    assert_eq!(
        (
            healthy.status.as_str(),
            healthy.reason.as_str(),
            healthy.source.as_deref()
        ),
        ("True", "Pulling", Some("s")),
        "{status:?}"
    );
    assert_eq!(status.sources.len(), 1);
    assert!(status.sources[0].points_selected >= expected(&imported)["bytes"].len() as u64);
    let metrics = registry.render();
    assert!(
        metrics.contains(
            r#"tally_component_sent_total{component_kind="source",component_id="victoriametrics/ns-a/bytes/s"}"#
        ),
        "{metrics}"
    );

    // Rebuilt on the same queues (a restart), after a pause longer than the
    // lag, while samples kept coming: it goes on where each sink's checkpoint
    // says, so nothing is read twice (a lost checkpoint would start again
    // 120 s back) or skipped (one started at `now - lag` would miss the pause).
    first.shutdown().await;
    drop(first);
    let down = now_ms();
    imported.extend(import(&vm, down, down + 3_000).await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = pipeline(dir.path(), pull_options(&vm.base), Registry::new());
    second.update(snapshot(exporters_of(&receiver), secrets("ns-a", TOKEN)));
    let live_until = now_ms() + 2_000;
    imported.extend(import(&vm, down + 3_000, live_until).await);
    // Samples up to `live_until` are read once it is `lag` behind now.
    wait_for(&receiver, &expected(&imported)).await;

    // A changed selection restarts the source from the sink's checkpoint.
    let mut changed = exporters_of(&receiver);
    changed[0] = exporter(
        "ns-a",
        "bytes",
        r#"{metricsql: '{__name__="requests_total"}'}"#,
        &[format!(
            "{{name: k, otlp_http: {{endpoint: '{}'}}, batch: {{timeout: 50ms, maxSize: 25}}, retry: {{maxAttempts: 6, backoff: 20ms}}}}",
            receiver.endpoint("bytes")
        )],
    );
    second.update(snapshot(changed, secrets("ns-a", TOKEN)));
    let before = received(&receiver, "bytes").len();
    let from = now_ms();
    let requests: Vec<Sample> = import(&vm, from, from + 1_000)
        .await
        .into_iter()
        .filter(|(l, _)| l["__name__"] == "requests_total")
        .map(|(l, t)| (l["namespace"].clone(), l["__name__"].clone(), t))
        .collect();
    receiver
        .wait_for_points("bytes", before + requests.len(), Duration::from_secs(20))
        .await;
    let now_bytes = received(&receiver, "bytes");
    let new: Vec<&Sample> = now_bytes
        .iter()
        .filter(|s| s.1 == "requests_total")
        .collect();
    assert_eq!(new, requests.iter().collect::<Vec<_>>());
    let bytes = now_bytes.len() - new.len();
    assert_eq!(
        bytes,
        expected(&imported)["bytes"].len(),
        "the old selection stopped"
    );
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_victoria_metrics_that_does_not_answer_shows_in_status_and_metrics() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::new();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://tally:s3cret@{}", closed.local_addr().unwrap());
    drop(closed);
    let pipeline = pipeline(dir.path(), pull_options(&url), registry.clone());
    pipeline.update(snapshot(exporters_of(&receiver), secrets("ns-a", TOKEN)));
    let deadline = Instant::now() + Duration::from_secs(20);
    let condition = loop {
        let status = pipeline.status("ns-a", "bytes").unwrap();
        if let Some(c) = status
            .conditions
            .iter()
            .find(|c| c.kind == "SourceHealthy" && c.status == "False")
        {
            break c.clone();
        }
        assert!(Instant::now() < deadline, "{status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(condition.reason, "PullFailing");
    assert!(
        condition.message.contains("/api/v1/export"),
        "{}",
        condition.message
    );
    assert!(
        !condition.message.contains("s3cret"),
        "{}",
        condition.message
    );
    let metrics = registry.render();
    assert!(
        metrics.contains(
            r#"tally_component_errors_total{component_kind="source",component_id="victoriametrics/ns-a/bytes/s",stage="pull"}"#
        ),
        "{metrics}"
    );
    pipeline.shutdown().await;
}
