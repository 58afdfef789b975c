//! `cargo bench -p tally-logstore --bench logstore [-- LINES]`: the
//! figures of BENCHMARKS.md "Instance logs".
//!
//! 1. Ingest: LINES lines of 200 bytes (default 5,000,000, ~1 GB of text;
//!    50,000,000 for 10 GB) from 20 instances, 16 appenders each sending
//!    batches of 1000 lines (what one OTLP request carries); lines per
//!    second of wall time and per CPU-second of the process (all threads:
//!    appenders, the writer and its compressing helpers, fjall's flushes
//!    and compactions). The lines are made once, before the clock starts
//!    ([`POOL`] batches, more than a round ever holds, so no block sees a
//!    line twice); each append clones a batch and sets its times, as a
//!    receiver builds records from a request.
//! 2. Disk: bytes on disk per GB of raw text once ingested.
//! 3. A 1-hour `--grep` of one instance (the lines span 10 hours), and
//!    of the whole project.
//! 4. Follow latency: time from `append` to a follower (woken by the
//!    store, reading after its position) having the line; p50 and p99
//!    over 2000 lines sent 5 ms apart while another appender keeps
//!    the writer busy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tally_logstore::{
    EmbeddedLogStore, LineFilter, LogQuery, LogRecord, LogStore, Position, StoreConfig, Stream,
};

const INSTANCES: usize = 20;
const BATCH: usize = 1000;
const APPENDERS: usize = 16;
const SPAN_NANOS: i64 = 10 * 3600 * 1_000_000_000;
/// Distinct batches of lines made before the clock starts.
const POOL: usize = 256;

use tally_testkit::cpu::cpu_seconds;

/// A 200-byte line like a web server's: a few templates, varying values.
fn line(n: usize) -> String {
    let mut l = match n % 4 {
        0 => format!(
            "2026-12-06T18:{:02}:{:02}.{:03}Z INFO  http request method=GET path=/api/v1/items/{} status=200 duration_ms={} bytes={} user_agent=\"Mozilla/5.0\" trace={:016x}",
            n / 60 % 60,
            n % 60,
            n % 1000,
            n % 5000,
            n % 97,
            512 + n % 4096,
            n.wrapping_mul(2654435761)
        ),
        1 => format!(
            "2026-12-06T18:{:02}:{:02}.{:03}Z WARN  cache miss key=session:{:08x} backend=redis-{} retry={} latency_ms={} pool_in_use={} pool_max=64 request_id={:016x}",
            n / 60 % 60,
            n % 60,
            n % 1000,
            n.wrapping_mul(40503),
            n % 3,
            n % 5,
            n % 250,
            n % 64,
            n.wrapping_mul(11400714819323198485)
        ),
        2 => format!(
            "2026-12-06T18:{:02}:{:02}.{:03}Z INFO  job finished queue=emails job_id={} attempts={} elapsed_ms={} worker=worker-{} result=ok next_run_in_s={} tenant=tenant-{}",
            n / 60 % 60,
            n % 60,
            n % 1000,
            n,
            n % 4,
            n % 10_000,
            n % 8,
            n % 3600,
            n % 300
        ),
        _ => format!(
            "2026-12-06T18:{:02}:{:02}.{:03}Z ERROR upstream failed service=payments endpoint=/v2/charge status=503 error=\"connection reset by peer\" attempt={} circuit=half-open id={:016x}",
            n / 60 % 60,
            n % 60,
            n % 1000,
            n % 5,
            n.wrapping_mul(6364136223846793005)
        ),
    };
    l.truncate(200);
    while l.len() < 200 {
        l.push(' ');
    }
    l
}

/// Line `n` of `total`: the lines span [`SPAN_NANOS`].
fn time_of(n: usize, total: usize) -> i64 {
    (n as i64).saturating_mul(SPAN_NANOS / total.max(1) as i64)
}

fn batch(start: usize, total: usize) -> Vec<LogRecord> {
    (start..start + BATCH)
        .map(|n| LogRecord {
            project: "acme".into(),
            instance: format!("web-{}", n / 7 % INSTANCES),
            workload: Some("web".into()),
            stream: if n % 10 == 0 {
                Stream::Stderr
            } else {
                Stream::Stdout
            },
            time_nanos: time_of(n, total),
            id: None,
            line: line(n),
        })
        .collect()
}

fn ingest(store: &Arc<EmbeddedLogStore>, total: usize) {
    let batches = total / BATCH;
    let pool: Arc<Vec<Vec<LogRecord>>> =
        Arc::new((0..POOL).map(|b| batch(b * BATCH, total)).collect());
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let threads: Vec<_> = (0..APPENDERS)
        .map(|_| {
            let (store, next, pool) = (Arc::clone(store), Arc::clone(&next), Arc::clone(&pool));
            std::thread::spawn(move || {
                loop {
                    let b = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if b >= batches {
                        return;
                    }
                    loop {
                        let mut records = pool[b % POOL].clone();
                        for (i, r) in records.iter_mut().enumerate() {
                            r.time_nanos = time_of(b * BATCH + i, total);
                        }
                        match store.append(records) {
                            Ok(ticket) => {
                                ticket.blocking_recv().unwrap().unwrap();
                                break;
                            }
                            Err(tally_logstore::LogError::Busy { .. }) => {
                                std::thread::sleep(Duration::from_millis(1))
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds() - cpu0);
    let lines = (batches * BATCH) as f64;
    println!(
        "ingest: {} lines of 200 B in {wall:.2} s wall, {cpu:.2} CPU-s",
        batches * BATCH
    );
    println!(
        "  {:.0} lines/s wall, {:.0} lines/s per CPU-second ({:.1} MB/s of text per core)",
        lines / wall,
        lines / cpu,
        lines * 200.0 / cpu / 1e6
    );
}

fn grep(store: &EmbeddedLogStore, instances: Vec<String>, text: &str, what: &str) {
    let hour = 3600 * 1_000_000_000i64;
    let query = LogQuery {
        project: "acme".into(),
        instances,
        since_nanos: SPAN_NANOS - hour,
        until_nanos: SPAN_NANOS,
        filters: vec![LineFilter::text(text, false).unwrap()],
        limit: 1000,
        newest_first: true,
        ..LogQuery::default()
    };
    let mut times = Vec::new();
    let mut page = None;
    for _ in 0..5 {
        let t = Instant::now();
        page = Some(store.read(&query).unwrap());
        times.push(t.elapsed());
    }
    times.sort();
    let page = page.unwrap();
    println!(
        "grep 1 h for {text:?}, {what}: median {:.1} ms (min {:.1}), {} lines, {:.0} MB of text scanned",
        times[2].as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        page.lines.len(),
        page.scanned_bytes as f64 / 1e6
    );
}

fn follow_latency(store: Arc<EmbeddedLogStore>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy = {
        let (store, stop) = (Arc::clone(&store), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(t) = store.append(batch(n, 1 << 30)) {
                    let _ = t.blocking_recv();
                }
                n += BATCH;
            }
        })
    };
    let mut latencies = runtime.block_on(async {
        let mut changes = store.subscribe();
        changes.borrow_and_update();
        let mut after = Position {
            block: u64::MAX - 1,
            index: 0,
        };
        // Start after what is stored now.
        let page = store
            .read(&LogQuery {
                project: "follow".into(),
                since_nanos: i64::MIN,
                until_nanos: i64::MAX,
                limit: usize::MAX,
                ..LogQuery::default()
            })
            .unwrap();
        if let Some(l) = page.lines.last() {
            after = l.position;
        } else {
            after.block = 0;
        }
        let mut latencies = Vec::new();
        for i in 0..2000 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let sent = Instant::now();
            let record = LogRecord {
                project: "follow".into(),
                instance: "f-0".into(),
                workload: None,
                stream: Stream::Stdout,
                time_nanos: i,
                id: None,
                line: format!("follow {i}"),
            };
            let _ticket = store.append(vec![record]).unwrap();
            loop {
                changes.changed().await.unwrap();
                let page = store
                    .read(&LogQuery {
                        project: "follow".into(),
                        after: Some(after),
                        since_nanos: i64::MIN,
                        until_nanos: i64::MAX,
                        limit: usize::MAX,
                        ..LogQuery::default()
                    })
                    .unwrap();
                if let Some(l) = page.lines.last() {
                    after = l.position;
                    latencies.push(sent.elapsed());
                    break;
                }
            }
        }
        latencies
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    busy.join().unwrap();
    latencies.sort();
    let at = |q: f64| {
        latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)].as_secs_f64()
            * 1e3
    };
    println!(
        "follow: append → follower has the line: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (writer busy with 1000-line batches)",
        at(0.5),
        at(0.99),
        at(1.0)
    );
}

fn main() {
    let total: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5_000_000);
    let dir = std::env::var("TALLY_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let dir = tempfile::tempdir_in(dir).unwrap();
    let store = Arc::new(EmbeddedLogStore::open(StoreConfig::new(dir.path())).unwrap());
    ingest(&store, total);
    let stats = store.stats();
    println!(
        "disk: {:.1} MB on disk for {:.1} MB of text ({:.1} MB of blocks): {:.0} MB per GB of text",
        stats.disk_bytes as f64 / 1e6,
        stats.raw_bytes as f64 / 1e6,
        stats.block_bytes as f64 / 1e6,
        stats.disk_bytes as f64 / stats.raw_bytes as f64 * 1e3
    );
    grep(&store, vec!["web-3".into()], "status=503", "one instance");
    grep(&store, Vec::new(), "status=503", "all 20 instances");
    // Matches nothing: the whole hour is read.
    grep(&store, Vec::new(), "no-such-text", "all 20 instances");
    follow_latency(store);
}
