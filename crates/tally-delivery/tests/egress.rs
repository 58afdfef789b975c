//! A sink built with an egress guard over real HTTP on loopback: a refused
//! destination (an IP literal, or a name resolving to loopback) is never
//! connected to and dead-letters its batch at once with a Tally-written
//! reason; an allow-list entry lets it through; a redirect is never followed.

use tally_testkit::line_receiver as support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use support::{Lines, Receiver, item};
use tally_delivery::{
    DESTINATION_REFUSED, DeadLetter, EgressGuard, EgressPolicy, Sink, SinkConfig, Verdict,
};

const LIMIT: Duration = Duration::from_secs(20);

fn config(id: &str) -> SinkConfig {
    let mut config = SinkConfig::new(id);
    config.batch.timeout = Duration::from_millis(10);
    config.retry.initial_backoff = Duration::from_millis(5);
    config.retry.max_backoff = Duration::from_millis(20);
    config.retry.request_timeout = Duration::from_secs(5);
    config.retry.max_attempts = 50;
    config
}

fn guard(allow: &[&str]) -> EgressGuard {
    EgressGuard::new(EgressPolicy::parse(allow).unwrap()).unwrap()
}

async fn dead_letter(sink: &Sink) -> DeadLetter {
    let started = Instant::now();
    loop {
        if let Some(letter) = sink.dead_letters().await.unwrap().pop() {
            return letter;
        }
        assert!(started.elapsed() < LIMIT, "no dead letter in {LIMIT:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends two items to `url` through `guard` and returns the dead letter
/// they became, and every attempt's (status, verdict, will_retry).
async fn refused(
    url: reqwest::Url,
    guard: EgressGuard,
) -> (DeadLetter, Vec<(Option<u16>, Verdict, bool)>) {
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&attempts);
    let sink = Sink::builder(config("guarded"), Lines::new(url))
        .egress(guard)
        .on_attempt(move |a| {
            seen.lock()
                .unwrap()
                .push((a.status, a.verdict, a.will_retry))
        })
        .start()
        .unwrap();
    sink.enqueue_all(vec![item(0, 8), item(1, 8)])
        .await
        .unwrap();
    let letter = dead_letter(&sink).await;
    assert_eq!(sink.metrics().errors("egress"), 1);
    assert_eq!(sink.metrics().errors("send"), 0);
    sink.shutdown(Duration::from_secs(1)).await;
    let attempts = attempts.lock().unwrap().clone();
    (letter, attempts)
}

#[tokio::test]
async fn an_ip_literal_the_policy_refuses_is_never_connected_to() {
    let receiver = Receiver::start().await;
    let (letter, attempts) = refused(receiver.url(), guard(&[])).await;
    assert_eq!(letter.reason, DESTINATION_REFUSED);
    assert_eq!(letter.status, None);
    assert_eq!(letter.attempts, 1, "a refusal is not retried");
    assert_eq!(letter.items.len(), 2);
    assert_eq!(
        letter.body,
        "destination 127.0.0.1 is a loopback address; refused (operators may allow it with \
         egress.allow in the server config)"
    );
    assert_eq!(attempts, vec![(None, Verdict::Permanent, false)]);
    assert!(receiver.seen().is_empty(), "nothing reached the receiver");
}

#[tokio::test]
async fn a_name_resolving_to_loopback_is_refused_at_connect_time() {
    let receiver = Receiver::start().await;
    let url =
        reqwest::Url::parse(&format!("http://localhost:{}/ingest", receiver.addr.port())).unwrap();
    let (letter, attempts) = refused(url, guard(&["10.0.0.0/8"])).await;
    assert_eq!(letter.reason, DESTINATION_REFUSED);
    assert_eq!(letter.attempts, 1);
    assert_eq!(
        letter.body,
        "destination localhost resolves to a loopback address; refused (operators may allow \
         it with egress.allow in the server config)"
    );
    assert_eq!(attempts, vec![(None, Verdict::Permanent, false)]);
    assert!(receiver.seen().is_empty(), "nothing reached the receiver");
}

#[tokio::test]
async fn the_allow_list_lets_loopback_through_by_address_and_by_name() {
    let receiver = Receiver::start().await;
    let by_name =
        reqwest::Url::parse(&format!("http://localhost:{}/ingest", receiver.addr.port())).unwrap();
    for (i, url) in [receiver.url(), by_name].into_iter().enumerate() {
        // `localhost` may resolve to ::1 too, where nothing listens: allowed,
        // it is tried and the connection falls back to 127.0.0.1.
        let sink = Sink::builder(config("allowed"), Lines::new(url))
            .egress(guard(&["127.0.0.0/8", "::1"]))
            .start()
            .unwrap();
        sink.enqueue(item(i, 8)).await.unwrap();
        receiver.wait_for_unique(i + 1, LIMIT).await;
        sink.shutdown(Duration::from_secs(1)).await;
        assert!(sink.dead_letters().await.unwrap().is_empty());
    }
}

/// A loopback server whose `/ingest` redirects (307, method and body kept)
/// to `/elsewhere` on itself, which counts what reaches it.
async fn redirecting() -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let elsewhere = Arc::new(AtomicU64::new(0));
    let hits = Arc::clone(&elsewhere);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route(
            "/ingest",
            axum::routing::post(move || async move {
                (
                    StatusCode::TEMPORARY_REDIRECT,
                    [(header::LOCATION, format!("http://{addr}/elsewhere"))],
                    "moved",
                )
                    .into_response()
            }),
        )
        .route(
            "/elsewhere",
            axum::routing::post(move || async move {
                hits.fetch_add(1, Ordering::SeqCst);
                StatusCode::OK
            }),
        );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, elsewhere)
}

#[tokio::test]
async fn a_redirect_is_not_followed() {
    let (addr, elsewhere) = redirecting().await;
    let url = reqwest::Url::parse(&format!("http://{addr}/ingest")).unwrap();
    let sink = Sink::builder(config("redirected"), Lines::new(url))
        .egress(guard(&["127.0.0.1"]))
        .start()
        .unwrap();
    sink.enqueue(item(0, 8)).await.unwrap();
    let letter = dead_letter(&sink).await;
    sink.shutdown(Duration::from_secs(1)).await;
    assert_eq!(letter.status, Some(307));
    assert_eq!(letter.reason, "permanent error");
    assert_eq!(
        elsewhere.load(Ordering::SeqCst),
        0,
        "the redirect was followed"
    );
}
