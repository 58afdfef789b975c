//! Exporter sinks cannot be used to reach or read another server: through
//! the real pipeline, a loopback endpoint (by address or by a name that
//! resolves to it) is refused before any connection unless the operator
//! allows it, a redirect is not followed, and a status never shows what an
//! endpoint answered — only the HTTP status and a reason Tally wrote.

use tally_testkit::{exporters, otlp_receiver as receiver};

use std::time::{Duration, Instant};

use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use exporters::*;
use receiver::Receiver;
use tally_telemetry::{ExporterStatus, Pipeline, PipelineOptions};

/// What an endpoint may not make a status show.
const MARK: &str = "metadata-token-4711";

/// Waits until `done` holds for exporter ns-a/e's status (or `WAIT` passed).
async fn status_when(
    pipeline: &Pipeline,
    done: impl Fn(&ExporterStatus) -> bool,
) -> ExporterStatus {
    let started = Instant::now();
    loop {
        let status = pipeline.status("ns-a", "e").unwrap();
        if done(&status) || started.elapsed() > WAIT {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn dropped(status: &ExporterStatus, reason: &str) -> u64 {
    status.sinks[0]
        .points_dropped
        .get(reason)
        .copied()
        .unwrap_or(0)
}

/// Runs exporter ns-a/e with one sink at `endpoint`, hands it one request
/// (3 points for ns-a), and returns its status once `reason` counts them.
async fn export_once(options: PipelineOptions, endpoint: &str, reason: &str) -> ExporterStatus {
    let pipeline = Pipeline::new(tally_delivery::Registry::new(), options).unwrap();
    pipeline.update(snapshot(
        vec![exporter(
            "ns-a",
            "e",
            "{metricsql: ''}",
            &[sink("k", endpoint, "")],
        )],
        secrets("ns-a", TOKEN),
    ));
    pipeline.ingest(&traffic(0));
    let status = status_when(&pipeline, |s| dropped(s, reason) == 3).await;
    pipeline.shutdown().await;
    status
}

/// The sink's `SinkHealthy` condition: (status, reason, message).
fn healthy(status: &ExporterStatus) -> (String, String, String) {
    let c = status
        .conditions
        .iter()
        .find(|c| c.kind == "SinkHealthy")
        .unwrap();
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_endpoint_is_refused_unless_the_operator_allows_it() {
    let receiver = Receiver::start().await;
    let strict = PipelineOptions {
        egress: tally_delivery::EgressPolicy::default(),
        ..options()
    };
    let status = export_once(strict, &receiver.endpoint("a"), "destination_refused").await;
    assert_eq!(dropped(&status, "destination_refused"), 3, "{status:?}");
    let reason = "destination 127.0.0.1 is a loopback address; refused (operators may allow \
                  it with egress.allow in the server config)";
    assert_eq!(
        status.sinks[0].last_error.as_deref(),
        Some(format!("request failed: {reason}").as_str())
    );
    let (ok, why, message) = healthy(&status);
    assert_eq!((ok.as_str(), why.as_str()), ("False", "ExportFailing"));
    assert!(message.contains(reason), "{message}");
    // Refused before connecting: not tried again, nothing arrived.
    assert_eq!(status.sinks[0].requests_retried, 0);
    assert_eq!(receiver.with("a", |e| e.requests), 0);

    // The allow-list (as in the other tests' `options()`) lets it through.
    let pipeline = Pipeline::new(tally_delivery::Registry::new(), options()).unwrap();
    pipeline.update(snapshot(
        vec![exporter(
            "ns-a",
            "e",
            "{metricsql: ''}",
            &[sink("k", &receiver.endpoint("a"), "")],
        )],
        secrets("ns-a", TOKEN),
    ));
    pipeline.ingest(&traffic(0));
    assert_eq!(receiver.wait_for_points("a", 3, WAIT).await, 3);
    pipeline.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_resolving_to_loopback_is_refused_when_connecting() {
    let receiver = Receiver::start().await;
    let by_name = receiver.endpoint("a").replace("127.0.0.1", "localhost");
    assert!(by_name.starts_with("http://localhost:"), "{by_name}");
    let strict = PipelineOptions {
        // Something allowed, but not loopback.
        egress: tally_delivery::EgressPolicy::parse(["10.0.0.0/8"]).unwrap(),
        ..options()
    };
    let status = export_once(strict, &by_name, "destination_refused").await;
    assert_eq!(dropped(&status, "destination_refused"), 3, "{status:?}");
    let (_, _, message) = healthy(&status);
    assert!(
        message.contains(
            "destination localhost resolves to a loopback address; refused (operators may \
             allow it with egress.allow in the server config)"
        ),
        "{message}"
    );
    assert_eq!(receiver.with("a", |e| e.requests), 0);
}

/// A loopback endpoint answering every export by `case`: `redirect` (307
/// to `target`), `plain` (500 with a text body), `status` (500 with an
/// OTLP JSON `Status`), `partial` (200 with a partial success whose message
/// is the endpoint's). Every body carries [`MARK`].
async fn answering(target: String) -> String {
    let app = axum::Router::new().route(
        "/{case}/v1/metrics",
        axum::routing::post(move |Path(case): Path<String>| async move {
            let json = [(header::CONTENT_TYPE, "application/json")];
            let response: Response = match case.as_str() {
                "redirect" => (
                    StatusCode::TEMPORARY_REDIRECT,
                    [(header::LOCATION, format!("{target}/v1/metrics"))],
                    format!("moved; {MARK}"),
                )
                    .into_response(),
                "plain" => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("<html>ami-id: {MARK}</html>"),
                )
                    .into_response(),
                "status" => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json,
                    format!(r#"{{"code": 13, "message": "{MARK}"}}"#),
                )
                    .into_response(),
                _ => (
                    StatusCode::OK,
                    json,
                    format!(
                        r#"{{"partialSuccess": {{"rejectedDataPoints": "3", "errorMessage": "{MARK}"}}}}"#
                    ),
                )
                    .into_response(),
            };
            response
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    base
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_not_followed_and_its_status_is_named() {
    // The redirect points at another server (another port), which would
    // take the points.
    let receiver = Receiver::start().await;
    let base = answering(receiver.endpoint("b")).await;
    let status = export_once(options(), &format!("{base}/redirect"), "permanent_error").await;
    assert_eq!(dropped(&status, "permanent_error"), 3, "{status:?}");
    assert_eq!(
        status.sinks[0].last_error.as_deref(),
        Some("the endpoint answered 307 Temporary Redirect (redirects are not followed)")
    );
    assert_eq!(
        receiver.with("b", |e| e.requests),
        0,
        "the redirect was followed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_never_shows_what_the_endpoint_answered() {
    let base = answering(String::new()).await;
    for (case, reason, expected) in [
        (
            "plain",
            "permanent_error",
            "the endpoint answered 500 Internal Server Error",
        ),
        (
            "status",
            "permanent_error",
            "the endpoint answered 500 Internal Server Error",
        ),
        (
            "partial",
            "rejected_by_receiver",
            "the endpoint answered 200 OK and rejected 3 data point(s)",
        ),
    ] {
        let status = export_once(options(), &format!("{base}/{case}"), reason).await;
        assert_eq!(dropped(&status, reason), 3, "{case}: {status:?}");
        assert_eq!(
            status.sinks[0].last_error.as_deref(),
            Some(expected),
            "{case}"
        );
        let shown = format!("{}\n{status:?}", serde_json::to_string(&status).unwrap());
        assert!(!shown.contains(MARK), "{case}: {shown}");
    }
}
