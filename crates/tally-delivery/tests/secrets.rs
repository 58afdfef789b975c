//! Secrets in headers never reach logs, errors, dead letters or Debug output.
//! (Alone in its binary: it installs the process's tracing subscriber.)

use tally_testkit::line_receiver as support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{Fault, Lines, Receiver, item};
use tally_delivery::{EncodeError, Encoder, HttpRequest, Item, Secret, Sink, SinkConfig};

/// Sends an API key in a header.
struct WithKey(Lines, Secret);

impl Encoder for WithKey {
    fn encode(&self, items: &[Item]) -> Result<HttpRequest, EncodeError> {
        self.0
            .encode(items)?
            .secret_header("x-api-key".parse().unwrap(), &self.1)
    }
}

#[tokio::test]
async fn secrets_stay_out_of_logs_errors_and_dead_letters() {
    let logs = Arc::new(Mutex::new(Vec::<u8>::new()));
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || LogWriter(writer.clone()))
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let receiver = Receiver::start().await;
    receiver.push_faults([
        Fault::status(503),
        Fault::Hang(Duration::from_secs(2)),
        Fault::with_body(401, "unauthorized"),
    ]);
    let key = "sk-live-very-secret";
    let mut config = SinkConfig::new("secret");
    config.batch.timeout = Duration::from_millis(10);
    config.retry.initial_backoff = Duration::from_millis(5);
    config.retry.request_timeout = Duration::from_millis(300);
    let sink = Sink::builder(
        config,
        WithKey(Lines::new(receiver.url()), Secret::new(key)),
    )
    .start()
    .unwrap();
    sink.enqueue(item(0, 5)).await.unwrap();
    let start = Instant::now();
    while sink.dead_letters().await.unwrap().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let letters = format!("{:?}", sink.dead_letters().await.unwrap());
    sink.shutdown(Duration::from_secs(1)).await;
    let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("retrying"),
        "the failures were logged:\n{logs}"
    );
    assert!(!logs.contains(key), "{logs}");
    assert!(!letters.contains(key), "{letters}");
    assert!(!format!("{sink:?}").contains(key));
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
