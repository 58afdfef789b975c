//! The benchmark's report: printed for a reader, and as JSON (`--report-json`)
//! for `bench/compare-storage.py`, which puts it beside PostgreSQL and
//! ClickHouse and compares the query answers.

use std::time::Duration;

use jiff::Timestamp;
use serde_json::{Value, json};
use tally_ledger::LedgerStats;

use crate::{BenchOptions, Ingested, PREGENERATED_EVENTS, percentile, rss_kib};

/// The timed queries and the answers of their last run.
pub(crate) struct Queries {
    pub from: Timestamp,
    pub to: Timestamp,
    /// Q1: 30-day hourly SUM of one subject, over HTTP.
    pub hourly_times: Vec<Duration>,
    pub hourly_rows: Vec<Value>,
    /// Q2: 30-day daily SUM grouped by subject, over HTTP.
    pub daily_times: Vec<Duration>,
    pub daily_rows: Vec<Value>,
    /// Q2 on the ledger itself, without HTTP and JSON.
    pub store_times: Vec<Duration>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The window of events that "at the start" and "at the end" rates cover:
/// a million, or half the load when it is smaller.
fn window(events: u64) -> u64 {
    (events / 2).clamp(1, 1_000_000)
}

/// Events/s acknowledged and materialised over the first and the last
/// [`window`] events, from the sampled progress: whether ingest stays flat
/// as the store grows.
pub(crate) fn flatness(progress: &[(Duration, u64)], events: u64) -> Option<(f64, f64)> {
    let w = window(events);
    let reached = |n: u64| {
        progress
            .iter()
            .find(|(_, done)| *done >= n)
            .map(|(at, _)| *at)
    };
    let first = reached(w)?;
    let last_start = reached(events.saturating_sub(w))?;
    let end = reached(events)?;
    let rate = |d: Duration| w as f64 / d.as_secs_f64().max(1e-9);
    Some((rate(first), rate(end.saturating_sub(last_start))))
}

/// Prints the report, but for the disk after compaction.
pub(crate) fn print(
    o: &BenchOptions,
    ingested: Option<&Ingested>,
    q: &Queries,
    stats: &LedgerStats,
) {
    println!(
        "tally bench: {} events in {} order, batches of {}, {} connections, {} subjects{}",
        o.events,
        o.order,
        o.batch,
        o.connections,
        o.subjects,
        match (&o.events_file, o.events > PREGENERATED_EVENTS) {
            (Some(file), _) => format!(" (from {})", file.display()),
            (None, true) => " (bodies generated while sending)".to_owned(),
            (None, false) => String::new(),
        }
    );
    match ingested {
        None => println!("ingest: skipped (--queries-only on the store of an earlier run)"),
        Some(i) => print_ingest(o, i),
    }
    println!(
        "query 30-day hourly, one subject ({} rows): p50 {:.2} ms, p99 {:.2} ms",
        q.hourly_rows.len(),
        ms(percentile(&q.hourly_times, 0.5)),
        ms(percentile(&q.hourly_times, 0.99))
    );
    println!(
        "query 30-day daily grouped by subject ({} rows): p50 {:.1} ms, p99 {:.1} ms",
        q.daily_rows.len(),
        ms(percentile(&q.daily_times, 0.5)),
        ms(percentile(&q.daily_times, 0.99))
    );
    println!(
        "  the same on the ledger, without HTTP and JSON: p50 {:.1} ms, max {:.1} ms",
        ms(percentile(&q.store_times, 0.5)),
        ms(q.store_times.last().copied().unwrap_or_default())
    );
    let millions = o.events as f64 / 1e6;
    println!(
        "memory: peak RSS {} MiB (server process{}); disk: {:.1} MiB per million events ({:.1} MiB of it write-ahead journal, bounded and given back as memtables flush)",
        rss_kib("VmHWM:") / 1024,
        if o.load_process {
            String::new()
        } else {
            format!(
                ", includes the load generator's {} MiB of request bodies",
                ingested.map_or(0, |i| i.rss_before_kib) / 1024
            )
        },
        stats.disk_bytes as f64 / 1_048_576.0 / millions,
        stats.journal_bytes as f64 / 1_048_576.0 / millions,
    );
    println!(
        "disk without the journal: {:.0} bytes per event",
        stats.disk_bytes.saturating_sub(stats.journal_bytes) as f64 / o.events.max(1) as f64
    );
}

fn print_ingest(o: &BenchOptions, i: &Ingested) {
    let events = o.events.max(1) as f64;
    println!(
        "ingest: {:.0} events/s acknowledged and materialised ({:.1} s); {:.0} events/s acknowledged ({:.1} s, durable + deduplicated, {} group commits)",
        events / i.materialised.as_secs_f64(),
        i.materialised.as_secs_f64(),
        events / i.elapsed.as_secs_f64(),
        i.elapsed.as_secs_f64(),
        i.group_commits
    );
    if let Some((first, last)) = flatness(&i.progress, o.events as u64) {
        let w = window(o.events as u64);
        println!(
            "  flatness, acknowledged and materialised: first {w} events {first:.0} events/s, last {w} events {last:.0} events/s ({:+.0} %)",
            (last / first - 1.0) * 100.0
        );
    }
    println!(
        "ack to materialised (oldest unmaterialised event's age, sampled every 20 ms): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        ms(percentile(&i.lag_samples, 0.5)),
        ms(percentile(&i.lag_samples, 0.99)),
        ms(i.lag_samples.last().copied().unwrap_or_default())
    );
    let per_event = |ns: u64| ns as f64 / 1e3 / events;
    // The process's, without the load generator's thread (see `cpu()`).
    let server_ns = i.cpu.process_ns;
    println!(
        "cpu: writer thread {:.1} µs/event (+{:.1} µs/event waiting for a core), materialiser thread {:.1} µs/event, the rest of the server (HTTP, parsing, validation, sampling) {:.1} µs/event; server process {:.1} µs/event; load generator {:.1} µs/event ({})",
        per_event(i.cpu.writer_ns),
        per_event(i.cpu.writer_wait_ns),
        per_event(i.cpu.materialiser_ns),
        per_event(server_ns.saturating_sub(i.cpu.writer_ns + i.cpu.materialiser_ns)),
        per_event(server_ns),
        per_event(i.cpu.load_ns),
        if o.load_process {
            "its own process"
        } else {
            "its own thread in the server's process"
        }
    );
}

/// The rows of an answer as `[subject or null, windowStart, value]`, the
/// value as the JSON number the server wrote (exact decimal).
fn rows(answer: &[Value]) -> Vec<Value> {
    answer
        .iter()
        .map(|r| json!([r["subject"], r["windowStart"], r["value"]]))
        .collect()
}

fn latency(times: &[Duration]) -> Value {
    json!({
        "runs": times.len(),
        "p50_ms": ms(percentile(times, 0.5)),
        "p99_ms": ms(percentile(times, 0.99)),
    })
}

/// The report as JSON, with both answers in full.
pub(crate) fn json(
    o: &BenchOptions,
    ingested: Option<&Ingested>,
    q: &Queries,
    stats: &LedgerStats,
    disk: &[(String, u64)],
) -> anyhow::Result<Vec<u8>> {
    let ingest = ingested.map(|i| {
        let events = o.events.max(1) as f64;
        let flat = flatness(&i.progress, o.events as u64);
        json!({
            "materialised_events_per_s": events / i.materialised.as_secs_f64(),
            "acknowledged_events_per_s": events / i.elapsed.as_secs_f64(),
            "first_window_events_per_s": flat.map(|f| f.0),
            "last_window_events_per_s": flat.map(|f| f.1),
            "window_events": window(o.events as u64),
            "ack_to_materialised_p50_ms": ms(percentile(&i.lag_samples, 0.5)),
            "ack_to_materialised_p99_ms": ms(percentile(&i.lag_samples, 0.99)),
            "cpu_us_per_event": i.cpu.process_ns as f64 / 1e3 / events,
            "cpu_us_per_event_by_stage": {
                "writer": i.cpu.writer_ns as f64 / 1e3 / events,
                "materialiser": i.cpu.materialiser_ns as f64 / 1e3 / events,
                "rest_of_server": i.cpu.process_ns.saturating_sub(i.cpu.writer_ns + i.cpu.materialiser_ns) as f64 / 1e3 / events,
                "load_generator": i.cpu.load_ns as f64 / 1e3 / events,
            },
            "request_bodies_mib": i.rss_before_kib / 1024,
        })
    });
    let tables: u64 = disk.iter().map(|(_, b)| b).sum();
    let report = json!({
        "events": o.events,
        "from": q.from.to_string(),
        "to": q.to.to_string(),
        "ingest": ingest,
        "q1": latency(&q.hourly_times),
        "q2": latency(&q.daily_times),
        "q2_store": latency(&q.store_times),
        "peak_rss_mib": rss_kib("VmHWM:") / 1024,
        "disk_tables_bytes": tables,
        "disk_by_keyspace": disk.iter().map(|(n, b)| (n.clone(), json!(b))).collect::<serde_json::Map<_, _>>(),
        "journal_bytes_before_compaction": stats.journal_bytes,
        "q1_rows": rows(&q.hourly_rows),
        "q2_rows": rows(&q.daily_rows),
    });
    Ok(serde_json::to_vec(&report)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn flatness_compares_the_first_and_the_last_window() {
        // 4 M events: the first million in 2 s, the last (3 M → 4 M) in 4 s.
        let progress = [(s(2), 1_000_000), (s(6), 3_000_000), (s(10), 4_000_000)];
        let (first, last) = flatness(&progress, 4_000_000).unwrap();
        assert_eq!(first, 500_000.0);
        assert_eq!(last, 250_000.0);
        // A small load compares its two halves.
        let progress = [(s(1), 50), (s(3), 100)];
        assert_eq!(flatness(&progress, 100), Some((50.0, 25.0)));
        // Never reached: no figure.
        assert_eq!(flatness(&[(s(1), 10)], 100), None);
    }
}
