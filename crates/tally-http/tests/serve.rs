//! `Server` on a real loopback listener, with timeouts of a second or two:
//! what it closes, when, and what it still serves.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tally_http::{ConnectionStats, Limits, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

fn limits(header: u64, idle: u64, max_connections: usize) -> Limits {
    Limits {
        header_read_timeout: Duration::from_millis(header),
        idle_timeout: Duration::from_millis(idle),
        body_read_timeout: Duration::from_secs(1),
        drain_timeout: Duration::from_secs(2),
        max_connections,
    }
}

fn timed_out(after: Duration) -> Response {
    (
        StatusCode::REQUEST_TIMEOUT,
        [("content-type", "application/problem+json")],
        format!("{{\"status\":408,\"detail\":\"{after:?}\"}}"),
    )
        .into_response()
}

/// A running server: its address, counters, the bodies its handler read
/// whole, and the switch that stops it.
struct Running {
    address: std::net::SocketAddr,
    stats: ConnectionStats,
    bodies: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(limits: Limits) -> Running {
    let bodies = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&bodies);
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(500)).await;
                "slow\n"
            }),
        )
        .route(
            "/stuck",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(600)).await;
                "never\n"
            }),
        )
        .route(
            "/body",
            post(move |body: Bytes| async move {
                counted.fetch_add(1, Ordering::SeqCst);
                format!("{}\n", body.len())
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let stats = ConnectionStats::new();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = Server::new(limits, timed_out).with_stats(stats.clone());
    let task = tokio::spawn(server.serve(listener, app, async {
        let _ = stopped.await;
    }));
    Running {
        address,
        stats,
        bodies,
        stop: Some(stop),
        task,
    }
}

/// Reads until the peer closes (or resets) the connection; what it sent
/// and how long it took, or `None` if it stays open past `bound`.
async fn until_closed(stream: &mut TcpStream, bound: Duration) -> Option<(String, Duration)> {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = bound.checked_sub(started.elapsed())?;
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Some((
                    String::from_utf8_lossy(&got).into_owned(),
                    started.elapsed(),
                ));
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends a request on `stream` and reads one response with a body of
/// `Content-Length` bytes.
async fn exchange(stream: &mut TcpStream, request: &str) -> String {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .and_then(|n| n.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if body.len() >= length {
                return text;
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, stream.read(&mut buf))
            .await
            .expect("a response within 10 s")
            .unwrap();
        assert!(n > 0, "closed before a whole response: {text:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

/// Whether `condition` holds within 5 s.
async fn until(condition: impl Fn() -> bool) -> bool {
    for _ in 0..250 {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    condition()
}

const HEALTHZ: &str = "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";

#[tokio::test]
async fn a_socket_that_sends_nothing_is_closed_at_the_header_timeout() {
    let server = start(limits(1000, 30_000, 64)).await;
    let mut idle = TcpStream::connect(server.address).await.unwrap();
    let (sent, after) = until_closed(&mut idle, Duration::from_secs(10))
        .await
        .expect("closed within 10 s");
    assert!(sent.is_empty(), "{sent:?}");
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}"
    );
    // A kept-alive connection that starts its next request and stalls is
    // closed at the header timeout from its first byte, not the idle one.
    let mut slow = TcpStream::connect(server.address).await.unwrap();
    assert!(
        exchange(&mut slow, HEALTHZ)
            .await
            .starts_with("HTTP/1.1 200")
    );
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let (_, after) = until_closed(&mut slow, Duration::from_secs(10))
        .await
        .expect("closed within 10 s");
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}"
    );
    let mut fresh = TcpStream::connect(server.address).await.unwrap();
    assert!(
        exchange(&mut fresh, HEALTHZ)
            .await
            .starts_with("HTTP/1.1 200")
    );
    let mut out = String::new();
    server.stats.render(&mut out);
    assert!(
        out.contains("tally_http_connections_timed_out_total{reason=\"header\"} 2\n"),
        "{out}"
    );
}

#[tokio::test]
async fn an_idle_kept_alive_connection_lives_until_the_idle_timeout() {
    let server = start(limits(1000, 2500, 64)).await;
    let mut kept = TcpStream::connect(server.address).await.unwrap();
    assert!(
        exchange(&mut kept, HEALTHZ)
            .await
            .starts_with("HTTP/1.1 200")
    );
    let (sent, after) = until_closed(&mut kept, Duration::from_secs(15))
        .await
        .expect("closed within 15 s");
    assert!(sent.is_empty(), "{sent:?}");
    // Past the header timeout: the idle timeout applies between requests.
    assert!(
        after >= Duration::from_millis(2400),
        "closed after {after:?}"
    );
    let mut out = String::new();
    server.stats.render(&mut out);
    assert!(
        out.contains("tally_http_connections_timed_out_total{reason=\"idle\"} 1\n"),
        "{out}"
    );
}

#[tokio::test]
async fn an_idle_http2_connection_is_sent_away() {
    let server = start(limits(1000, 1500, 64)).await;
    let stream = TcpStream::connect(server.address).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let driving = tokio::spawn(connection);
    let request = axum::http::Request::get(format!("http://{}/healthz", server.address))
        .body(axum::body::Body::empty())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), axum::http::Version::HTTP_2);
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(15), driving)
        .await
        .expect("the server closed the connection within 15 s")
        .unwrap()
        .ok();
    // The idle timeout, though the client may send frames after its request.
    assert!(started.elapsed() >= Duration::from_millis(1400));
    assert!(until(|| server.stats.open() == 0).await);
}

#[tokio::test]
async fn a_body_that_stalls_is_answered_408_and_never_handled() {
    let server = start(limits(1000, 30_000, 64)).await;
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    stream
        .write_all(b"POST /body HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let (answer, after) = until_closed(&mut stream, Duration::from_secs(10))
        .await
        .expect("answered and closed within 10 s");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(
        after >= Duration::from_millis(900),
        "answered after {after:?}"
    );
    assert_eq!(server.bodies.load(Ordering::SeqCst), 0);
    // A body that arrives in time is handled.
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    let answer = exchange(
        &mut stream,
        "POST /body HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc",
    )
    .await;
    assert!(answer.ends_with("\r\n\r\n3\n"), "{answer}");
    assert_eq!(server.bodies.load(Ordering::SeqCst), 1);
    let mut out = String::new();
    server.stats.render(&mut out);
    assert!(
        out.contains("tally_http_request_body_timeouts_total 1\n"),
        "{out}"
    );
}

#[tokio::test]
async fn past_the_limit_new_connections_are_closed_and_counted() {
    let server = start(limits(1500, 30_000, 2)).await;
    // One kept alive and in use, one idle: the limit.
    let mut kept = TcpStream::connect(server.address).await.unwrap();
    assert!(
        exchange(&mut kept, HEALTHZ)
            .await
            .starts_with("HTTP/1.1 200")
    );
    let mut idle = TcpStream::connect(server.address).await.unwrap();
    assert!(until(|| server.stats.open() == 2).await);
    let mut third = TcpStream::connect(server.address).await.unwrap();
    let mut sent = String::new();
    if third.write_all(HEALTHZ.as_bytes()).await.is_ok() {
        (sent, _) = until_closed(&mut third, Duration::from_secs(10))
            .await
            .expect("closed within 10 s");
    }
    assert!(!sent.contains("HTTP/1.1"), "{sent:?}");
    assert_eq!(server.stats.refused(), 1);
    // The open connection still answers.
    assert!(
        exchange(&mut kept, HEALTHZ)
            .await
            .starts_with("HTTP/1.1 200")
    );
    // Once the idle one is closed there is room again.
    until_closed(&mut idle, Duration::from_secs(10))
        .await
        .expect("the idle connection closed within 10 s");
    let mut fresh = TcpStream::connect(server.address).await.unwrap();
    assert!(
        exchange(&mut fresh, HEALTHZ)
            .await
            .starts_with("HTTP/1.1 200")
    );
}

#[tokio::test]
async fn stopping_finishes_requests_in_flight_within_the_drain_timeout() {
    let mut server = start(limits(1000, 30_000, 64)).await;
    let mut slow = TcpStream::connect(server.address).await.unwrap();
    slow.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut stuck = TcpStream::connect(server.address).await.unwrap();
    stuck
        .write_all(b"GET /stuck HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    assert!(until(|| server.stats.open() == 2).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    server.stop.take().unwrap().send(()).unwrap();
    // The slow request is answered, then its connection closed.
    let (answer, _) = until_closed(&mut slow, Duration::from_secs(10))
        .await
        .expect("closed within 10 s");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("slow\n"), "{answer}");
    // The stuck one is cut at the drain timeout, and serve returns.
    let (answer, _) = until_closed(&mut stuck, Duration::from_secs(10))
        .await
        .expect("closed within 10 s");
    assert!(answer.is_empty(), "{answer}");
    tokio::time::timeout(Duration::from_secs(10), &mut server.task)
        .await
        .expect("serve returned within 10 s")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(1900));
    assert!(until(|| server.stats.open() == 0).await);
}
