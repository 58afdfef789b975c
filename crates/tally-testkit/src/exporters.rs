//! Exporters, secrets, snapshots and traffic for the pipeline tests.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::otlp_metrics::*;
use tally_model::Manifest;
use tally_telemetry::proto::collector::metrics::v1::ExportMetricsServiceRequest;
use tally_telemetry::{
    ExporterStatus, Pipeline, PipelineOptions, ResourceIndex, SecretValue, Secrets, Snapshot,
};

pub const TOKEN: &str = "tok-abcdef-123456";
pub const WAIT: Duration = Duration::from_secs(20);

pub fn manifest(text: &str) -> Manifest {
    Manifest::parse_documents(text).unwrap().remove(0)
}

/// An exporter with one source and the given sinks (YAML flow items).
pub fn exporter(namespace: &str, name: &str, metrics: &str, sinks: &[String]) -> Manifest {
    manifest(&format!(
        "apiVersion: telemetry.datumapis.com/v1alpha1\nkind: Exporter\nmetadata: {{name: {name}, namespace: {namespace}, generation: 3}}\nspec:\n  sources: [{{name: s, metrics: {metrics}}}]\n  sinks: [{}]\n",
        sinks.join(", ")
    ))
}

pub fn sink(name: &str, endpoint: &str, extra: &str) -> String {
    format!(
        "{{name: {name}, otlp_http: {{endpoint: '{endpoint}', authentication: {{type: bearerToken, secretRef: {{name: otlp, key: token}}}}}}, batch: {{timeout: 50ms, maxSize: 40}}, retry: {{maxAttempts: 6, backoff: 20ms}}{extra}}}"
    )
}

pub fn secrets(namespace: &str, token: &str) -> Secrets {
    let mut secrets = Secrets::new();
    secrets.insert(
        namespace,
        "otlp",
        BTreeMap::from([("token".to_owned(), SecretValue::new(token))]),
    );
    secrets
}

pub fn snapshot(exporters: Vec<Manifest>, secrets: Secrets) -> Snapshot {
    let index: Arc<dyn ResourceIndex> = Arc::new(two_project_index());
    Snapshot {
        exporters,
        secrets,
        index,
        policies: Default::default(),
    }
}

/// Quick timeouts, and the test receivers' loopback addresses allowed
/// (sinks refuse them by default).
pub fn options() -> PipelineOptions {
    PipelineOptions {
        request_timeout: Duration::from_millis(300),
        max_retry_after: Duration::from_secs(1),
        shutdown_grace: Duration::from_millis(500),
        egress: tally_delivery::EgressPolicy::parse(["127.0.0.0/8", "::1"]).unwrap(),
        ..PipelineOptions::default()
    }
}

/// Request `i`: gateway gw-1 in ns-a and gw-9 in ns-x (another project),
/// each with two counters and a gauge, one point each, time `i`.
pub fn traffic(i: u64) -> ExportMetricsServiceRequest {
    let metrics = || {
        vec![
            counter(
                "network_bytes_sent",
                vec![number_point(
                    attrs(&[("code", "200")]),
                    1,
                    100 + i,
                    i as i64,
                )],
            ),
            counter(
                "requests_total",
                vec![number_point(
                    attrs(&[("code", "500")]),
                    1,
                    100 + i,
                    i as i64,
                )],
            ),
            gauge(
                "connections_open",
                vec![number_point(vec![], 1, 100 + i, 7)],
            ),
        ]
    };
    let who = |ns: &'static str, name: &'static str| Who {
        project: None,
        namespace: ns,
        group: "gateway.networking.k8s.io",
        kind: "Gateway",
        name,
        service: "networking.datumapis.com",
    };
    request(vec![
        resource_metrics(&who("ns-a", "gw-1"), metrics()),
        resource_metrics(&who("ns-x", "gw-9"), metrics()),
    ])
}

/// The exporter's status once every sink has sent or dropped all it took.
pub async fn settled(pipeline: &Pipeline, namespace: &str, name: &str) -> ExporterStatus {
    let started = std::time::Instant::now();
    loop {
        let status = pipeline.status(namespace, name).unwrap();
        if status.sinks.iter().all(|s| s.points_queued == 0) || started.elapsed() > WAIT {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
