//! A sink's secret never reaches a status, an error or a log line, even
//! when the endpoint echoes it. In its own test binary: the log capture is a
//! thread-scoped tracing subscriber, which other tests running in parallel
//! in the same process could race.

use tally_testkit::{exporters, otlp_receiver as receiver};

use std::sync::Mutex;
use std::time::Duration;

use exporters::*;
use receiver::{Fault, Receiver};
use tally_telemetry::Pipeline;

#[test]
fn the_token_never_reaches_status_logs_or_errors() {
    // Every log line, at every level, goes to a file read at the end.
    let log_file = tempfile::NamedTempFile::new().unwrap();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(Mutex::new(log_file.reopen().unwrap()))
            .finish(),
    );
    let mut single_threaded = tokio::runtime::Builder::new_current_thread();
    single_threaded
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let receiver = Receiver::start().await;
            // A careless endpoint that echoes the Authorization header in its
            // errors, retryable and not.
            receiver.fail("a", [Fault::Echo(503), Fault::Echo(401)]);
            let pipeline = Pipeline::new(tally_delivery::Registry::new(), options()).unwrap();
            let extra = ", headers: [{name: x-api-key, secretRef: {name: otlp, key: token}}]";
            pipeline.update(snapshot(
                vec![exporter(
                    "ns-a",
                    "e",
                    "{metricsql: ''}",
                    &[sink("k", &receiver.endpoint("a"), extra)],
                )],
                secrets("ns-a", TOKEN),
            ));
            pipeline.ingest(&traffic(0));
            let started = std::time::Instant::now();
            while receiver.with("a", |e| e.requests) < 2 && started.elapsed() < WAIT {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let status = settled(&pipeline, "ns-a", "e").await;
            let sink = &status.sinks[0];
            assert_eq!(sink.points_dropped["permanent_error"], 3, "{sink:?}");
            let healthy = status
                .conditions
                .iter()
                .find(|c| c.kind == "SinkHealthy")
                .unwrap();
            assert_eq!(healthy.status, "False");
            assert!(
                healthy.message.contains("answered 401 Unauthorized"),
                "{}",
                healthy.message
            );
            // The status shows nothing of the endpoint's answer.
            assert!(
                !healthy.message.contains("invalid credentials"),
                "{}",
                healthy.message
            );
            let shown = format!(
                "{}\n{}\n{status:?}\n{pipeline:?}",
                serde_json::to_string(&status).unwrap(),
                serde_norway::to_string(&status).unwrap()
            );
            assert!(!shown.contains(TOKEN), "{shown}");
            receiver.with("a", |e| {
                assert!(
                    e.authorizations
                        .iter()
                        .all(|a| a == &format!("Bearer {TOKEN}"))
                );
            });
            pipeline.shutdown().await;
        });
    let logs = std::fs::read_to_string(log_file.path()).unwrap();
    assert!(logs.contains("exporter sink started"), "{logs}");
    assert!(
        logs.contains("retrying"),
        "the failures were logged: {logs}"
    );
    assert!(!logs.contains(TOKEN), "{logs}");
}
