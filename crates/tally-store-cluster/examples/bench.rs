//! The cluster backend's benchmark (figures in BENCHMARKS.md): starts a
//! real `nats-server -js` and `clickhouse-server` on loopback, loads
//! `EVENTS` gateway-like events over 30 days (1,000 subjects) through
//! `NODES` ledger nodes in this process, each with one worker, and reports
//! ingest events/s, CPU per event per component, the lag from an ingest's
//! acknowledgement to the event being in answers (probes under load), and
//! Q1 (30-day hourly, one subject) / Q2 (30-day daily by subject).
//!
//! `cargo run --release -p tally-store-cluster --example bench -- EVENTS NODES`

use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};
use serde_json::json;
use tally_ledger::{ApplyMode, EventFilter, Ledger, MeterQuery};
use tally_ledger_suite::peers::{ClickHouse, Nats};
use tally_ledger_suite::{event, meter};
use tally_meter::WindowSize;
use tally_model::CloudEvent;
use tally_store_cluster::{ClusterLedger, ClusterLedgerConfig};

const SUBJECTS: u64 = 1_000;
const BATCH: u64 = 1_000;
const DAYS: i64 = 30;
const REGIONS: [&str; 3] = ["eu", "us", "ap"];

/// Resident bytes of a process (Linux `/proc`).
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// What exact duplicates cost nats-server: the dedupe bucket's bytes per
/// key on disk, and the server's resident memory growth per event.
async fn dedupe_cost(nats: &Nats, rss_before: u64, events: u64) {
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("nats"));
    let mut bucket = js
        .get_stream(format!("KV_{}", tally_store_cluster::DEDUPE_BUCKET))
        .await
        .expect("the dedupe bucket");
    let state = bucket.info().await.expect("bucket info").state.clone();
    let rss = nats.pid().map_or(0, rss_bytes);
    println!(
        "dedupe bucket: {} keys, {:.0} bytes/key on disk; nats-server RSS +{:.0} bytes/event ({:.0} MiB now)",
        state.messages,
        state.bytes as f64 / state.messages.max(1) as f64,
        rss.saturating_sub(rss_before) as f64 / events as f64,
        rss as f64 / (1 << 20) as f64
    );
}

/// User + system CPU seconds a process used so far (Linux `/proc`).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split(' ').collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn batch(start: u64, now: Timestamp) -> Vec<CloudEvent> {
    let span = (DAYS * 86_400 - 3_600) as u64;
    (start..start + BATCH)
        .map(|i| {
            let t = now - SignedDuration::from_secs((i * 7_919 % span) as i64 + 3_600);
            event(
                "//gateway",
                &format!("e{i}"),
                "bench.request",
                &format!("projects/p{}", i % SUBJECTS),
                t,
                json!({"value": i % 100, "region": REGIONS[(i % 3) as usize]}),
            )
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn load(nodes: &[ClusterLedger], events: u64, now: Timestamp) -> Duration {
    let started = Instant::now();
    let mut tasks = Vec::new();
    let lanes = nodes.len() as u64 * 2;
    for lane in 0..lanes {
        let node = nodes[(lane as usize) % nodes.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut start = lane * BATCH;
            while start < events {
                node.ingest(batch(start, now)).await.expect("ingest");
                start += lanes * BATCH;
            }
        }));
    }
    for t in tasks {
        t.await.expect("a load lane");
    }
    started.elapsed()
}

/// Ingests single probe events while `nodes[0]` is loaded, and times each
/// from its acknowledgement until another node lists it.
async fn probes(nodes: &[ClusterLedger], n: usize) -> Vec<Duration> {
    let reader = nodes.last().expect("a node");
    let mut lags = Vec::new();
    for i in 0..n {
        let e = event(
            "//probe",
            &format!("p{i}"),
            "bench.probe",
            "projects/p0",
            Timestamp::now(),
            json!({}),
        );
        nodes[0].ingest(vec![e]).await.expect("probe");
        let acked = Instant::now();
        loop {
            let page = reader
                .list_events(EventFilter {
                    source: Some("//probe".into()),
                    id: Some(format!("p{i}")),
                    limit: 1,
                    ..EventFilter::default()
                })
                .await;
            if page.is_ok_and(|p| !p.items.is_empty()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        lags.push(acked.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lags.sort();
    lags
}

async fn timed(ledger: &ClusterLedger, q: MeterQuery, runs: usize) -> (Vec<Duration>, usize) {
    let mut times = Vec::new();
    let mut rows = 0;
    for _ in 0..runs {
        let started = Instant::now();
        rows = ledger
            .query("bench".into(), q.clone())
            .await
            .expect("query")
            .rows
            .len();
        times.push(started.elapsed());
    }
    times.sort();
    (times, rows)
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let events: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let node_count: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let (Some(nats), Some(ch)) = (Nats::start(), ClickHouse::start()) else {
        return;
    };
    let mut nodes = Vec::new();
    for _ in 0..node_count {
        let mut config = ClusterLedgerConfig::new(nats.url(), ch.url());
        config.database = "bench".into();
        config.max_lateness = SignedDuration::from_hours(24 * 32);
        // Q1/Q2 are timed over the events first, then over the rollups.
        config.rollups = false;
        nodes.push(ClusterLedger::connect(config).await.expect("connect"));
    }
    nodes[0]
        .apply(meter("bench", "bench.request", "SUM"), ApplyMode::Upsert)
        .await
        .expect("meter");
    let now = Timestamp::now();
    let pids = [
        ("nats-server", nats.pid()),
        ("clickhouse-server", ch.pid()),
        ("tally (nodes + workers)", Some(std::process::id())),
    ];
    let cpu_before: Vec<f64> = pids
        .iter()
        .map(|(_, p)| p.map_or(0.0, cpu_seconds))
        .collect();
    let rss_before = nats.pid().map_or(0, rss_bytes);
    let took = load(&nodes, events, now).await;
    println!(
        "ingest: {events} events through {node_count} node(s) in {took:.1?}: {:.0} events/s (acknowledged)",
        events as f64 / took.as_secs_f64()
    );
    let settle_start = Instant::now();
    nodes[0]
        .settle(Duration::from_secs(3_600))
        .await
        .expect("settle");
    let total = took + settle_start.elapsed();
    println!(
        "materialised all in {total:.1?}: {:.0} events/s end to end",
        events as f64 / total.as_secs_f64()
    );
    for ((name, pid), before) in pids.iter().zip(&cpu_before) {
        let used = pid.map_or(0.0, cpu_seconds) - before;
        println!(
            "cpu {name}: {used:.1} s, {:.1} µs/event",
            used * 1e6 / events as f64
        );
    }
    dedupe_cost(&nats, rss_before, events).await;
    let load_nodes = nodes.clone();
    let background = tokio::spawn(async move {
        load(&load_nodes, events / 4, now + SignedDuration::from_secs(1)).await
    });
    let lags = probes(&nodes, 50).await;
    println!(
        "ack -> listed on another node, under load: p50 {:.1?}, p99 {:.1?}",
        percentile(&lags, 0.5),
        percentile(&lags, 0.99)
    );
    let _ = background.await;
    nodes[0]
        .settle(Duration::from_secs(3_600))
        .await
        .expect("settle");
    let day = |t: Timestamp| {
        Timestamp::from_second(t.as_second() - t.as_second().rem_euclid(86_400)).expect("a day")
    };
    let to = day(now) + SignedDuration::from_hours(24);
    let from = to - SignedDuration::from_hours(24 * DAYS);
    let q = |window, subjects: Vec<String>, group_by: Vec<String>| MeterQuery {
        from,
        to,
        window_size: Some(window),
        time_zone: jiff::tz::TimeZone::UTC,
        subjects,
        group_by,
        filter_group_by: Default::default(),
        limit: None,
        cursor: None,
    };
    let q1 = q(WindowSize::Hour, vec!["projects/p7".into()], vec![]);
    let q2 = q(WindowSize::Day, vec![], vec!["subject".into()]);
    let raw = (
        queries(&nodes[0], &q1, &q2, "events").await,
        nodes[0].queries_from_rollups(),
    );
    let started = Instant::now();
    nodes[0].roll_up().await.expect("roll up");
    println!(
        "rolled {} events up in {:.1?}",
        events + events / 4 + 50,
        started.elapsed()
    );
    let rolled = queries(&nodes[0], &q1, &q2, "rollups").await;
    assert_eq!(raw.1, 0, "the first answers read the events");
    assert!(nodes[0].queries_from_rollups() > 0, "then the rollups");
    assert_eq!(raw.0, rolled, "the same answers from events and rollups");
}

/// Times Q1 and Q2 and answers their rows.
async fn queries(
    node: &ClusterLedger,
    q1: &MeterQuery,
    q2: &MeterQuery,
    what: &str,
) -> Vec<tally_ledger::QueryRow> {
    let (t1, rows1) = timed(node, q1.clone(), 10).await;
    println!(
        "Q1 30-day hourly, one subject, from {what} ({rows1} rows): p50 {:.1?}, p99 {:.1?}",
        percentile(&t1, 0.5),
        percentile(&t1, 0.99)
    );
    let (t2, rows2) = timed(node, q2.clone(), 3).await;
    println!(
        "Q2 30-day daily by subject, from {what} ({rows2} rows): p50 {:.1?}, max {:.1?}",
        percentile(&t2, 0.5),
        percentile(&t2, 1.0)
    );
    let mut rows = node
        .query("bench".into(), q1.clone())
        .await
        .expect("q1")
        .rows;
    rows.extend(
        node.query("bench".into(), q2.clone())
            .await
            .expect("q2")
            .rows,
    );
    rows
}
