//! CPU per event of reading a request body of CloudEvents, two ways:
//! `split_batch` + `parse_event` (a `serde_json::Value` of each event
//! first, the way ingest read bodies before) and `split_events` +
//! `RawEvent::validate` (what ingest does now). Not a test: run with
//! `cargo bench -p tally-model --bench parse` and read the figures.
//!
//! The body is 1,000 events shaped like `tally bench`'s (gateway usage).

use jiff::Timestamp;
use tally_model::{parse_event, split_batch, split_events};

fn body(events: usize) -> Vec<u8> {
    let mut out = String::from("[");
    for i in 0..events {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            r#"{{"specversion":"1.0","id":"7-{i}","source":"bench","type":"gateway.requests","subject":"projects/p{}","time":"2026-11-20T10:{:02}:{:02}Z","data":{{"value":{},"region":"eu-west","method":"GET"}}}}"#,
            i % 10_000,
            i % 60,
            (i * 7) % 60,
            i * 31 % 100_000
        ));
    }
    out.push(']');
    out.into_bytes()
}

/// CPU time (ns) of this thread so far: on a shared host, wall time
/// would count other processes' turns.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Runs `f` over `body` until about a second of CPU has been used; CPU µs
/// per event.
fn per_event(name: &str, body: &[u8], events: usize, f: impl Fn(&[u8]) -> usize) {
    let mut rounds = 0usize;
    let start = thread_cpu_ns();
    while thread_cpu_ns() - start < 1_000_000_000 {
        assert_eq!(f(body), events);
        rounds += 1;
    }
    let us = (thread_cpu_ns() - start) as f64 / 1e3 / (rounds * events) as f64;
    println!("{name}: {us:.2} CPU µs/event ({rounds} bodies)");
}

fn main() {
    let events = 1_000;
    let body = body(events);
    let received = Timestamp::now();
    for _ in 0..2 {
        per_event("Value, then parse_event", &body, events, |b| {
            split_batch("application/json", b)
                .unwrap()
                .into_iter()
                .map(|v| parse_event(v, received))
                .filter(Result::is_ok)
                .count()
        });
        per_event(
            "RawEvent from the bytes, then validate",
            &body,
            events,
            |b| {
                split_events("application/json", b)
                    .unwrap()
                    .into_iter()
                    .map(|e| e.validate(received))
                    .filter(Result::is_ok)
                    .count()
            },
        );
    }
}
