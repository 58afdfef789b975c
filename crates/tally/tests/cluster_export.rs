//! Exporters on a cluster: two `tally serve --cluster` nodes on a real
//! `nats-server -js` and `clickhouse-server`. An `Exporter` applied on node
//! A reaches node B through the resources bucket, and the metrics posted to
//! node B are shipped by node B's pipeline to the OTLP test receiver —
//! each point exactly once, none by node A (the node that receives a point
//! exports it; nodes never forward points to each other).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use prost::Message as _;
use tally_ledger_suite::peers::{ClickHouse, Nats};
use tally_telemetry::otlp::string_attribute as kv;
use tally_telemetry::proto::collector::metrics::v1::ExportMetricsServiceRequest;
use tally_telemetry::proto::metrics::v1::{
    Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, metric::Data, number_data_point,
};
use tally_telemetry::proto::resource::v1::Resource;
use tally_testkit::otlp_receiver::Receiver;
use tally_testkit::progress::Progress;

const TOKEN: &str = "adm";
const WAIT: Duration = Duration::from_secs(60);
/// Longer than the sinks' batch timeout (100 ms) and retry backoff: what
/// was sent has arrived after it.
const SETTLE: Duration = Duration::from_secs(2);

fn manifests(endpoint: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: team-a, labels: \
         {{resourcemanager.miloapis.com/project-name: acme}}}}\n---\n\
         apiVersion: telemetry.datumapis.com/v1alpha1\nkind: Exporter\n\
         metadata: {{name: hits, namespace: team-a}}\nspec:\n  sources:\n\
         \x20   - name: hits\n      metrics: {{metricsql: '{{__name__=~\"hits.*\"}}'}}\n\
         \x20 sinks:\n    - name: receiver\n      otlp_http:\n        endpoint: \"{endpoint}\"\n\
         \x20     batch: {{enabled: true, timeout: 100ms, maxSize: 100}}\n\
         \x20     retry: {{enabled: true, maxAttempts: 5, backoff: 100ms}}\n"
    )
}

/// `count` gauge points of `hits_now` for team-a, one per series
/// (`probe=<first + i>`), valued `first + i`.
fn request(first: u64, count: u64) -> ExportMetricsServiceRequest {
    let points = (first..first + count)
        .map(|i| NumberDataPoint {
            attributes: vec![kv("probe", &i.to_string())],
            time_unix_nano: 1_700_000_000_000_000_000 + i,
            value: Some(number_data_point::Value::AsInt(i as i64)),
            ..Default::default()
        })
        .collect();
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![kv("namespace", "team-a"), kv("service.name", "svc")],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![Metric {
                    name: "hits_now".into(),
                    data: Some(Data::Gauge(Gauge {
                        data_points: points,
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

async fn post(base: &str, request: &ExportMetricsServiceRequest) {
    common::post_protobuf(base, TOKEN, "/v1/metrics", request.encode_to_vec()).await;
}

/// Points the receiver got, by `probe`.
fn received(receiver: &Receiver) -> BTreeMap<u64, Vec<f64>> {
    receiver.with("a", |a| {
        let mut by = BTreeMap::<u64, Vec<f64>>::new();
        for p in &a.points {
            assert_eq!(p.metric, "hits_now");
            assert_eq!(p.resource["namespace"], "team-a");
            by.entry(p.attributes["probe"].parse().unwrap())
                .or_default()
                .push(p.value);
        }
        by
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exporter_applied_on_one_node_ships_what_another_node_receives_once() {
    let Some(nats) = Nats::start() else { return };
    let Some(clickhouse) = ClickHouse::start() else {
        return;
    };
    let receiver = Receiver::start().await;
    let config = format!(
        "token: {TOKEN}\ncluster: {{nats: \"{}\", clickhouse: \"{}\", database: tally_export}}\n\
         billing: {{enabled: false}}\negress: {{allow: [127.0.0.0/8]}}\n",
        nats.url(),
        clickhouse.url()
    );
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = common::serve_with_config(dir_a.path(), &config);
    let b = common::serve_with_config(dir_b.path(), &config);
    common::ok(common::cli(
        &a.base,
        TOKEN,
        &["apply", "-f", "-"],
        &manifests(&receiver.endpoint("a")),
    ));

    // Node B learns of the exporter through the resources bucket; until
    // then its points go nowhere. Probe with one point at a time (probes
    // count from 1,000,000, apart from the exact run below).
    let mut probe = 1_000_000;
    while received(&receiver).is_empty() {
        assert!(probe < 1_000_600, "node B never exported a point");
        post(&b.base, &request(probe, 1)).await;
        probe += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Probes still in node B's batch arrive, then the count stands still.
    tokio::time::sleep(SETTLE).await;
    let probes = received(&receiver).len();

    // The exact run: 1,000 points in 10 requests to node B, plus 0 to A.
    for first in (0..1_000).step_by(100) {
        post(&b.base, &request(first, 100)).await;
    }
    let mut progress = Progress::new("node B exporting 1,000 points", WAIT);
    loop {
        let got = received(&receiver);
        let exact = got.keys().filter(|p| **p < 1_000_000).count();
        if exact == 1_000 {
            break;
        }
        progress.observe(exact);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Room for a second copy to arrive, were there one.
    tokio::time::sleep(SETTLE).await;
    let got = received(&receiver);
    for i in 0..1_000u64 {
        assert_eq!(got.get(&i), Some(&vec![i as f64]), "probe {i}");
    }
    // Nothing else arrived: no second copy from node A or from node B.
    assert_eq!(got.len(), 1_000 + probes, "{} points", got.len());
    assert!(got.values().all(|v| v.len() == 1), "a point exported twice");

    // Points posted to node A are exported once too, by node A.
    post(&a.base, &request(2_000, 10)).await;
    let mut progress = Progress::new("node A exporting 10 points", WAIT);
    while received(&receiver).range(2_000..2_010).count() < 10 {
        progress.observe(received(&receiver).len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(SETTLE).await;
    let got = received(&receiver);
    assert_eq!(got.len(), 1_010 + probes);
    assert!(got.values().all(|v| v.len() == 1), "a point exported twice");
}
