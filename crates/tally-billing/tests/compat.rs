//! The test server accepts what Amberflo's official Python client sends,
//! unchanged; and the API key never reaches a log line.

use tally_billing::testing as support;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rust_decimal::Decimal;
use support::{Fault, TestServer, at, config, meters, one_account_per_project, sink};
use tally_billing::{Forwarder, MemoryUsageSource, Provider};
use tally_delivery::Registry;

/// A Python with `amberflo-metering-python` installed (a venv made for the
/// test, or one named by `TALLY_AMBERFLO_PYTHON`), or why there is none.
fn python_with_amberflo() -> Result<String, String> {
    if let Ok(python) = std::env::var("TALLY_AMBERFLO_PYTHON") {
        return Ok(python);
    }
    support::venv::python_with(
        "tally-billing-amberflo-venv",
        &["amberflo-metering-python"],
        "import metering.ingest",
    )
}

/// Uses the package's own `create_ingest_payload` and `IngestApiClient`
/// (its session's `root_url` pointed at the test server).
const PYTHON_CLIENT: &str = r#"
import sys
from metering.ingest import IngestApiClient, create_ingest_payload
client = IngestApiClient(sys.argv[2])
client.client.root_url = sys.argv[1]
records = [
    create_ingest_payload(meter_api_name="api-requests", meter_value=5, meter_time_in_millis=1735689600000,
                          customer_id="uid-a0", dimensions={"region": "eu"}, unique_id="py-1"),
    create_ingest_payload(meter_api_name="api-requests", meter_value=2.25, meter_time_in_millis=1735689660000,
                          customer_id="uid-a0"),
    create_ingest_payload(meter_api_name="api-bytes", meter_value=7, meter_time_in_millis=1735689600000,
                          customer_id="uid-a1", unique_id="py-2"),
]
print(client.send(records))
print(client.send(records[:1]))  # same uniqueId: deduplicated
"#;

#[tokio::test]
async fn the_official_python_client_is_accepted_unchanged() {
    let Some(python) = support::venv::or_skip(python_with_amberflo(), "amberflo-metering-python")
    else {
        return;
    };
    let server = TestServer::start(support::API_KEY).await;
    let output = tokio::process::Command::new(python)
        .args(["-c", PYTHON_CLIENT, &server.url, support::API_KEY])
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let state = server.state();
    assert!(state.refused.is_empty(), "{:?}", state.refused);
    assert_eq!(state.requests, 2);
    assert_eq!(state.duplicates, 1);
    assert_eq!(
        state.sums,
        BTreeMap::from([
            (
                ("uid-a0".to_string(), "api-requests".to_string()),
                Decimal::new(725, 2)
            ),
            (
                ("uid-a1".to_string(), "api-bytes".to_string()),
                Decimal::from(7)
            ),
        ])
    );
}

#[tokio::test]
async fn the_test_server_refuses_what_amberflo_refuses() {
    let server = TestServer::start(support::API_KEY).await;
    let client = tally_delivery::client_builder().build().unwrap();
    let post = |body: &'static str, key: &'static str| {
        client
            .post(format!("{}/ingest", server.url))
            .header("x-api-key", key)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let good = r#"[{"customerId":"c","meterApiName":"m","meterValue":1,"meterTimeInMillis":1}]"#;
    assert_eq!(post(good, "wrong").await.unwrap().status(), 401);
    for bad in [
        r#"[{"meterApiName":"m","meterValue":1,"meterTimeInMillis":1}]"#,
        r#"[{"customerId":"c","meterApiName":"","meterValue":1,"meterTimeInMillis":1}]"#,
        r#"[{"customerId":"c","meterApiName":"m","meterValue":"1","meterTimeInMillis":1}]"#,
        r#"[{"customerId":"c","meterApiName":"m","meterValue":1,"meterTimeInMillis":-5}]"#,
        r#"[{"customerId":"c","meterApiName":"m","meterValue":1,"meterTimeInMillis":1,"dimensions":{"a":1}}]"#,
        r#"[{"customerId":"c","meterApiName":"m","meterValue":1,"meterTimeInMillis":1,"uniqueId":7}]"#,
        "not json",
    ] {
        assert_eq!(
            post(bad, support::API_KEY).await.unwrap().status(),
            400,
            "{bad}"
        );
    }
    assert_eq!(post(good, support::API_KEY).await.unwrap().status(), 200);
    assert_eq!(server.state().accepted_records, 1);
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn the_api_key_never_reaches_logs_debug_or_errors() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (shown, letter_id) = runtime.block_on(async {
        let server = TestServer::start(support::API_KEY).await;
        server.push_faults([Fault::Status(503, Some(0)), Fault::Status(400, None)]);
        let dir = tempfile::tempdir().unwrap();
        let source = Arc::new(MemoryUsageSource::new());
        for s in [10, 70, 130] {
            source.add("requests", "p0", at(s), BTreeMap::new(), Decimal::ONE);
        }
        let config = config(
            sink(&server.url, Provider::Amberflo, 0),
            meters(&["requests"]),
            dir.path(),
        );
        let shown_config = format!("{config:?}");
        let mut forwarder =
            Forwarder::start(config, source, one_account_per_project(1), &Registry::new())
                .await
                .unwrap();
        for now in [60, 120, 180] {
            forwarder.run_once(at(now)).await.unwrap();
            assert!(forwarder.wait_idle(Duration::from_secs(10)).await.unwrap());
        }
        // Kept by the forwarder (durably), with the provider's answer.
        let letters = forwarder.dead_letters().unwrap();
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].status, Some(400));
        assert_eq!(letters[0].answer, "injected fault");
        assert_eq!(forwarder.queue_depth(), 0);
        let status = serde_json::to_string(&forwarder.status(at(180))).unwrap();
        (
            format!("{shown_config} {forwarder:?} {letters:?} {status}"),
            letters[0].id,
        )
    });
    drop(_guard);
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("dead-lettered"),
        "the logs were captured: {logs}"
    );
    // Both the lane's log line and the forwarder's name the stored id, the
    // one `tally billing deadletters` shows; no other id is logged.
    let logged: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("dead-lettered"))
        .collect();
    assert!(logged.len() >= 2, "{logs}");
    for line in logged {
        assert!(line.contains(&format!("dead_letter={letter_id}")), "{line}");
    }
    assert!(!logs.contains(support::API_KEY), "key in logs");
    assert!(!shown.contains(support::API_KEY), "key in output: {shown}");
    std::io::stderr().flush().unwrap();
}
