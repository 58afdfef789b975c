//! Clients that stall or hoard connections cannot stop a real `tally serve`
//! (`http:` in its config, short timeouts): idle sockets, slowloris headers,
//! stalled bodies and idle kept-alive connections are closed, a body that
//! stalls stores nothing, connections past `maxConnections` are refused and
//! counted, and the server answers normally through all of it and stops
//! cleanly on SIGTERM.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

/// Starts `tally serve` with `http` as its config's `http:` section.
fn serve(dir: &Path, http: &str) -> common::Server {
    common::serve_with_config(dir, &format!("http: {http}\n"))
}

fn address(server: &common::Server) -> String {
    server.base.trim_start_matches("http://").to_owned()
}

fn connect(server: &common::Server) -> TcpStream {
    let stream = TcpStream::connect(address(server)).unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// Reads until the server closes (or resets) the connection: what it sent
/// and after how long, or `None` if it is still open after `bound`.
fn until_closed(stream: &mut TcpStream, bound: Duration) -> Option<(String, Duration)> {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = bound.checked_sub(started.elapsed())?;
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None;
            }
            Err(_) => break,
        }
    }
    Some((
        String::from_utf8_lossy(&got).into_owned(),
        started.elapsed(),
    ))
}

/// One response: status and body (`Content-Length` framed).
struct Answer {
    status: u16,
    body: String,
}

/// Sends `request` on `stream` and reads one response within 10 s.
fn exchange(stream: &mut TcpStream, request: &str) -> Answer {
    stream.write_all(request.as_bytes()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .and_then(|n| n.trim().parse::<usize>().ok())
                })
                .expect("a Content-Length");
            if body.len() >= length {
                let status = head[9..12].parse().unwrap();
                return Answer {
                    status,
                    body: body.to_owned(),
                };
            }
        }
        let n = stream.read(&mut buf).expect("a response within 10 s");
        assert!(n > 0, "closed before a whole response: {text:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

/// Whether `/healthz` answers 200 on a new connection within 5 s.
fn healthz(server: &common::Server) -> bool {
    let mut stream = connect(server);
    if stream.write_all(get("/healthz").as_bytes()).is_err() {
        return false;
    }
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 512];
    matches!(stream.read(&mut buf), Ok(n) if buf[..n].starts_with(b"HTTP/1.1 200"))
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: tally\r\n\r\n")
}

/// The value of the metric line starting with `series ` in `/metrics`.
fn metric(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
        .parse()
        .unwrap()
}

fn event(id: &str) -> String {
    format!(
        r#"{{"specversion":"1.0","id":"{id}","source":"limits-test","type":"probe","subject":"s","time":"{}","data":{{}}}}"#,
        jiff::Timestamp::now()
    )
}

fn post_event(body: &str) -> String {
    format!(
        "POST /api/v1/events HTTP/1.1\r\nHost: tally\r\nContent-Type: application/cloudevents+json\r\nPrefer: return=representation\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
}

/// A socket that never sends a byte is closed at the header timeout.
fn idle_socket(server: &common::Server) {
    idle_socket_at(&address(server));
}

/// The same, at `address` (`host:port`).
fn idle_socket_at(address: &str) {
    let mut idle = TcpStream::connect(address).unwrap();
    let (sent, after) = until_closed(&mut idle, Duration::from_secs(10)).expect("closed in 10 s");
    assert!(sent.is_empty(), "{sent:?}");
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}"
    );
}

/// A client sending its headers a byte every 200 ms is closed by the
/// header timeout, before it has sent them all.
fn slowloris(server: &common::Server) {
    let mut slow = connect(server);
    let started = Instant::now();
    let header = b"GET /healthz HTTP/1.1\r\nHost: tally\r\nX-Padding: 0123456789012345678901234567890123456789012345678901234567890123456789\r\n\r\n";
    let mut closed = false;
    for byte in header.iter().take(60) {
        if slow.write_all(&[*byte]).is_err() {
            closed = true;
            break;
        }
        if let Some((sent, _)) = until_closed(&mut slow, Duration::from_millis(200)) {
            assert!(sent.is_empty(), "{sent:?}");
            closed = true;
            break;
        }
    }
    assert!(closed, "a slowloris client was served for 12 s");
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}"
    );
}

/// A kept-alive connection is closed at the idle timeout, not the header
/// timeout.
fn idle_keep_alive(server: &common::Server) {
    let mut kept = connect(server);
    assert_eq!(exchange(&mut kept, &get("/healthz")).status, 200);
    let (sent, after) = until_closed(&mut kept, Duration::from_secs(12)).expect("closed in 12 s");
    assert!(sent.is_empty(), "{sent:?}");
    assert!(
        after >= Duration::from_millis(1900),
        "closed after {after:?}"
    );
}

/// A body that stalls is answered 408 and stores nothing; one that
/// arrives whole is stored.
fn stalled_body(server: &common::Server) {
    let whole = event("whole-1");
    let mut stream = connect(server);
    let answer = exchange(&mut stream, &(post_event(&whole) + &whole));
    assert_eq!(answer.status, 200, "{}", answer.body);
    let stalled = event("stalled-1");
    let mut stream = connect(server);
    let half = &stalled[..stalled.len() / 2];
    stream
        .write_all((post_event(&stalled) + half).as_bytes())
        .unwrap();
    let (answer, after) =
        until_closed(&mut stream, Duration::from_secs(10)).expect("answered in 10 s");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    assert!(answer.contains("bodyReadTimeout"), "{answer}");
    assert!(
        after >= Duration::from_millis(900),
        "answered after {after:?}"
    );
    let mut stream = connect(server);
    let listed = exchange(&mut stream, &get("/api/v1/events?source=limits-test"));
    assert_eq!(listed.status, 200);
    assert!(listed.body.contains("whole-1"), "{}", listed.body);
    assert!(!listed.body.contains("stalled-1"), "{}", listed.body);
}

#[test]
fn stalling_clients_are_closed_and_the_server_answers_throughout() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(
        dir.path(),
        "{headerReadTimeout: 1s, idleTimeout: 2s, bodyReadTimeout: 1s}",
    );
    std::thread::scope(|scope| {
        scope.spawn(|| idle_socket(&server));
        scope.spawn(|| slowloris(&server));
        scope.spawn(|| idle_keep_alive(&server));
        scope.spawn(|| stalled_body(&server));
        // Meanwhile the server answers.
        for _ in 0..5 {
            let mut stream = connect(&server);
            assert_eq!(exchange(&mut stream, &get("/healthz")).status, 200);
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let mut stream = connect(&server);
    let metrics = exchange(&mut stream, &get("/metrics")).body;
    assert!(
        metric(
            &metrics,
            "tally_http_connections_timed_out_total{reason=\"header\"}"
        ) >= 2,
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            "tally_http_connections_timed_out_total{reason=\"idle\"}"
        ) >= 1
    );
    assert_eq!(
        metric(&metrics, "tally_http_request_body_timeouts_total"),
        1
    );
    assert_eq!(metric(&metrics, "tally_http_connections_refused_total"), 0);
    // SIGTERM with a connection open: the server drains it and exits.
    let mut child = server;
    let stopped = Command::new("kill")
        .arg(child.child.id().to_string())
        .status()
        .unwrap();
    assert!(stopped.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.child.try_wait().unwrap() {
            assert!(status.success(), "tally serve exited with {status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tally serve did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(stream);
}

#[test]
fn the_grpc_listener_has_the_same_limits() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::serve_with_config(
        dir.path(),
        "grpcListen: 127.0.0.1:0\nhttp: {headerReadTimeout: 1s, idleTimeout: 2s}\n",
    );
    let grpc = server.grpc.clone().expect("the gRPC receiver listens");
    idle_socket_at(&grpc);
    let mut stream = connect(&server);
    let metrics = exchange(&mut stream, &get("/metrics")).body;
    assert!(
        metric(
            &metrics,
            "tally_http_connections_timed_out_total{reason=\"header\"}"
        ) >= 1,
        "{metrics}"
    );
}

#[test]
fn past_max_connections_new_clients_are_refused_until_others_close() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(
        dir.path(),
        "{headerReadTimeout: 10s, idleTimeout: 60s, maxConnections: 8}",
    );
    // One connection in use, seven that never send: the limit.
    let mut kept = connect(&server);
    assert_eq!(exchange(&mut kept, &get("/healthz")).status, 200);
    let mut idle: Vec<TcpStream> = (0..7).map(|_| connect(&server)).collect();
    let open = |kept: &mut TcpStream| {
        let metrics = exchange(kept, &get("/metrics")).body;
        metric(&metrics, "tally_http_connections_open")
    };
    let started = Instant::now();
    while open(&mut kept) < 8 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "7 sockets not accepted in 5 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A ninth connection is closed without an answer...
    let mut ninth = connect(&server);
    let mut sent = String::new();
    if ninth.write_all(get("/healthz").as_bytes()).is_ok() {
        (sent, _) = until_closed(&mut ninth, Duration::from_secs(5)).expect("refused in 5 s");
    }
    assert!(!sent.contains("HTTP/1.1"), "{sent:?}");
    // ...while the open one still answers, and counts it.
    assert_eq!(exchange(&mut kept, &get("/healthz")).status, 200);
    let metrics = exchange(&mut kept, &get("/metrics")).body;
    assert!(metric(&metrics, "tally_http_connections_refused_total") >= 1);
    // Once one closes, a new client is served.
    drop(idle.pop());
    let started = Instant::now();
    while !healthz(&server) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no room after a client left"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(kept);
    // The others are closed at the header timeout; then /healthz answers on
    // a fresh connection.
    for socket in &mut idle {
        until_closed(socket, Duration::from_secs(20)).expect("closed at the header timeout");
    }
    assert!(healthz(&server));
    let mut stream = connect(&server);
    let metrics = exchange(&mut stream, &get("/metrics")).body;
    assert!(
        metric(
            &metrics,
            "tally_http_connections_timed_out_total{reason=\"header\"}"
        ) >= 6
    );
}

#[test]
fn a_bad_http_section_stops_the_server_before_it_listens() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tally.yaml");
    std::fs::write(&config, "http: {idleTimeout: 0s}\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("http.idleTimeout"), "{stderr}");
    assert!(output.stdout.is_empty());
    assert!(!dir.path().join("data").exists(), "the store was opened");
}
