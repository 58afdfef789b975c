//! Exporter manifests: both shapes of the enhancement parse unchanged, invalid
//! ones are refused with the right condition, secrets resolve and stay hidden.

use std::collections::HashMap;
use std::time::Duration;

use tally_model::Manifest;
use tally_telemetry::exporter::{HeaderValueSource, Selection};
use tally_telemetry::{
    Authentication, Compression, Encoding, Exporter, SecretStore, SecretValue, Temporality,
    accepted_condition, resolve_headers,
};

fn load(name: &str) -> Vec<Manifest> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    Manifest::parse_documents(&text).unwrap()
}

fn one(name: &str) -> Exporter {
    Exporter::from_manifest(&load(name)[0]).unwrap()
}

#[test]
fn the_metricsql_shape_parses() {
    let e = one("exporter-metricsql.yaml");
    assert_eq!(e.key.to_string(), "ns-a/gateway-exporter");
    assert!(matches!(e.sources[0].selection, Selection::Series(_)));
    let sink = &e.sinks[0];
    assert_eq!(
        sink.metrics_url.as_str(),
        "https://otlp-gateway-prod-eu-west-0.grafana.net/otlp/v1/metrics"
    );
    assert_eq!(
        sink.authentication,
        Authentication::BearerToken(tally_telemetry::exporter::SecretRef {
            name: "grafana-api-key".into(),
            key: "token".into()
        })
    );
    assert_eq!(sink.batch.timeout, Duration::from_secs(5));
    assert_eq!(sink.batch.max_size, 500);
    assert!(sink.batch.enabled && sink.retry.enabled);
    assert_eq!(sink.retry.max_attempts, 3);
    assert_eq!(sink.retry.max_elapsed, Duration::from_secs(300));
    assert_eq!(sink.retry.backoff, Duration::from_secs(2));
    assert_eq!(sink.temporality, Temporality::Cumulative);
    assert_eq!(
        (sink.encoding, sink.compression),
        (Encoding::Protobuf, Compression::Gzip)
    );
}

#[test]
fn the_resource_selector_shape_parses() {
    let e = one("exporter-resource-selectors.yaml");
    let Selection::Resources(selectors) = &e.sources[0].selection else {
        panic!("expected resource selectors")
    };
    assert_eq!(selectors.len(), 1);
    assert!(selectors[0].namespaces.is_some());
    assert!(!selectors[0].labels.is_empty());
    assert!(selectors[0].kinds[0].matches("gateway.networking.k8s.io", "Gateway"));
    let condition = accepted_condition(&Ok(e), Some(4));
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("True", "Accepted")
    );
    let json = serde_json::to_value(&condition).unwrap();
    assert_eq!(json["type"], "Accepted");
    assert_eq!(json["observedGeneration"], 4);
}

#[test]
fn datadog_and_basic_auth_sinks_parse() {
    let e = one("exporter-datadog-grafana-basic.yaml");
    assert!(matches!(e.sources[0].selection, Selection::All));
    let datadog = &e.sinks[0];
    assert_eq!(datadog.temporality, Temporality::Delta);
    assert_eq!(
        (datadog.encoding, datadog.compression),
        (Encoding::Json, Compression::None)
    );
    assert_eq!(
        datadog.metrics_url.as_str(),
        "https://otlp.datadoghq.eu/v1/metrics"
    );
    assert_eq!(datadog.headers.len(), 2);
    assert!(matches!(
        datadog.headers[0].value,
        HeaderValueSource::Secret(_)
    ));
    assert_eq!(
        e.sinks[1].authentication,
        Authentication::Basic("grafana".into())
    );
}

#[test]
fn invalid_exporters_get_a_false_accepted_condition_with_reason_and_path() {
    let manifests = load("invalid-exporters.yaml");
    assert_eq!(manifests.len(), 13);
    for m in &manifests {
        let expected_reason = &m.metadata.annotations["expect-reason"];
        let expected_path = &m.metadata.annotations["expect-path"];
        let outcome = Exporter::from_manifest(m);
        let condition = accepted_condition(&outcome, None);
        assert_eq!(
            condition.status, "False",
            "{} was accepted",
            m.metadata.name
        );
        assert_eq!(
            &condition.reason, expected_reason,
            "{}: {}",
            m.metadata.name, condition.message
        );
        assert!(
            condition.message.contains(&format!("{expected_path}:")),
            "{}: {:?} does not name {expected_path}",
            m.metadata.name,
            condition.message
        );
    }
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = r#"
apiVersion: telemetry.datumapis.com/v1alpha1
kind: Exporter
metadata: {name: many, namespace: ns-a}
spec:
  sources: [{name: s, metrics: {metricsql: 'rate(x[1m])'}}]
  sinks:
    - name: k
      otlp_http: {endpoint: "ftp://x", authentication: {type: token}}
      batch: {timeout: soon}
"#;
    let err = Exporter::from_manifest(&Manifest::parse_documents(text).unwrap()[0]).unwrap_err();
    let reasons: Vec<_> = err.problems.iter().map(|p| p.reason.as_str()).collect();
    assert_eq!(
        reasons,
        [
            "InvalidMetricsQL",
            "InvalidEndpoint",
            "UnsupportedAuthentication",
            "InvalidDuration"
        ]
    );
}

fn sink_with(fields: &str) -> Result<Exporter, tally_telemetry::InvalidExporter> {
    let text = format!(
        "apiVersion: telemetry.datumapis.com/v1alpha1\nkind: Exporter\nmetadata: {{name: t, namespace: ns-a}}\nspec:\n  sources: [{{name: s, metrics: {{metricsql: ''}}}}]\n  sinks: [{{name: k, {fields}}}]\n"
    );
    Exporter::from_manifest(&Manifest::parse_documents(&text).unwrap()[0])
}

#[test]
fn the_request_timeout_and_the_retry_budget_are_per_sink_and_bounded() {
    // Defaults: the server's timeout, no attempt limit, five minutes of retries.
    let e = sink_with("otlp_http: {endpoint: 'https://x'}").unwrap();
    let sink = &e.sinks[0];
    assert_eq!(sink.batch.max_size, 8192);
    assert_eq!(sink.request_timeout, None);
    assert_eq!(sink.retry.max_attempts, u32::MAX);
    assert_eq!(sink.retry.max_elapsed, Duration::from_secs(300));
    let e = sink_with(
        "otlp_http: {endpoint: 'https://x', timeout: 2500ms}, retry: {maxElapsedTime: 20m, maxAttempts: 50}",
    )
    .unwrap();
    let sink = &e.sinks[0];
    assert_eq!(sink.request_timeout, Some(Duration::from_millis(2500)));
    assert_eq!(sink.retry.max_elapsed, Duration::from_secs(1200));
    assert_eq!(sink.retry.max_attempts, 50);
    // Bounded: a request of an hour or a budget of two days is refused.
    let err =
        sink_with("otlp_http: {endpoint: 'https://x', timeout: 1h}, retry: {maxElapsedTime: 48h}")
            .unwrap_err();
    let paths: Vec<_> = err.problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "spec.sinks[0].retry.maxElapsedTime",
            "spec.sinks[0].otlp_http.timeout"
        ]
    );
    assert!(sink_with("otlp_http: {endpoint: 'https://x', timeout: 0s}").is_err());
}

struct Secrets(HashMap<(String, String, String), String>);

impl SecretStore for Secrets {
    fn secret_value(&self, namespace: &str, name: &str, key: &str) -> Option<SecretValue> {
        self.0
            .get(&(namespace.into(), name.into(), key.into()))
            .map(SecretValue::new)
    }
}

fn secrets() -> Secrets {
    let entries = [
        ("ns-a", "datadog", "api-key", "dd-SECRET-1"),
        ("ns-a", "grafana", "username", "123456"),
        ("ns-a", "grafana", "password", "glc-SECRET-2"),
        ("ns-a", "grafana-api-key", "token", "SECRET-3"),
        ("ns-b", "datadog", "api-key", "OTHER-NAMESPACE"),
    ];
    Secrets(
        entries
            .iter()
            .map(|(ns, n, k, v)| (((*ns).into(), (*n).into(), (*k).into()), (*v).into()))
            .collect(),
    )
}

#[test]
fn secrets_resolve_into_headers_and_never_print() {
    let e = one("exporter-datadog-grafana-basic.yaml");
    let store = secrets();
    let datadog = resolve_headers(&e.sinks[0], &e.key.namespace, &store).unwrap();
    assert_eq!(datadog[0].name, "dd-api-key");
    assert_eq!(datadog[0].value.expose(), "dd-SECRET-1");
    assert_eq!(datadog[1].value.expose(), "tally");
    let grafana = resolve_headers(&e.sinks[1], &e.key.namespace, &store).unwrap();
    assert_eq!(grafana[0].name, "authorization");
    // base64("123456:glc-SECRET-2")
    assert_eq!(
        grafana[0].value.expose(),
        "Basic MTIzNDU2OmdsYy1TRUNSRVQtMg=="
    );
    let bearer = one("exporter-metricsql.yaml");
    let headers = resolve_headers(&bearer.sinks[0], "ns-a", &store).unwrap();
    assert_eq!(headers[0].value.expose(), "Bearer SECRET-3");
    for printed in [
        format!("{datadog:?} {grafana:?} {headers:?}"),
        format!("{} {}", datadog[0].value, grafana[0].value),
    ] {
        assert!(!printed.contains("SECRET"), "leaked: {printed}");
        assert!(printed.contains("redacted"));
    }
}

#[test]
fn secrets_are_read_only_from_the_exporters_namespace() {
    let e = one("exporter-datadog-grafana-basic.yaml");
    let err = resolve_headers(&e.sinks[0], "ns-c", &secrets()).unwrap_err();
    assert_eq!(
        (err.namespace.as_str(), err.name.as_str()),
        ("ns-c", "datadog")
    );
    assert!(!err.to_string().contains("SECRET"));
}
