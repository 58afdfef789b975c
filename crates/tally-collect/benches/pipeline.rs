//! Throughput of tail → parse → attribute → aggregate on one core (file in
//! the page cache), compared with a
//! plain `jq` reduction of the same file, and memory at 100k distinct routes.
//!
//! `cargo bench -p tally-collect --bench pipeline` (env `BENCH_LINES`,
//! default 1,000,000; `BENCH_ROUTES_LINES` for the memory run).

use std::fs;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use tally_collect::tail::FileTailer;
use tally_collect::{
    AgentIdentity, Aggregator, Collector, CollectorConfig, CorpusConfig, CorpusGenerator,
    WindowConfig,
};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Resident set size of this process, bytes.
fn rss_bytes() -> u64 {
    let statm = fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn throughput(lines: u64) -> std::io::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("access.log");
    let corpus = CorpusConfig {
        lines,
        routes: 2_000,
        projects: 200,
        step_millis: 1,
        ..CorpusConfig::default()
    };
    let mut file = std::io::BufWriter::new(fs::File::create(&path)?);
    for line in CorpusGenerator::new(corpus) {
        file.write_all(line.as_bytes())?;
        file.write_all(b"\n")?;
    }
    file.flush()?;
    drop(file);
    let bytes = fs::metadata(&path)?.len();
    println!(
        "corpus: {lines} lines, {:.1} MiB, 2000 routes",
        bytes as f64 / (1 << 20) as f64
    );

    let mut best = f64::MAX;
    let mut events = 0;
    for _ in 0..3 {
        let start = Instant::now();
        let mut aggregator = Aggregator::new(WindowConfig::default());
        let mut closed = Vec::new();
        let mut tailer = FileTailer::open(&path, &[]).map_err(std::io::Error::other)?;
        tailer
            .read_lines(usize::MAX, |line| aggregator.push_line(line, &mut closed))
            .map_err(std::io::Error::other)?;
        aggregator.flush(&mut closed);
        best = best.min(start.elapsed().as_secs_f64());
        events = closed.len();
    }
    println!(
        "tally-collect tail→parse→attribute→aggregate: {:.0} lines/s on one core ({:.0} MiB/s, {events} amounts)",
        lines as f64 / best,
        bytes as f64 / (1 << 20) as f64 / best
    );

    // jq's `reduce` into an object copies the accumulator per line (about
    // 1,000 lines/s here), so the comparison is the cheapest jq pass that
    // still reads every line: extract the fields a reduction needs.
    let filter = r#"fromjson? | select(.route_name != null and .route_name != "-")
        | [.route_name, .start_time[0:16], .bytes_received, .bytes_sent, .duration]"#;
    let start = Instant::now();
    let jq = Command::new("jq")
        .args(["-c", "-R", filter])
        .stdin(fs::File::open(&path)?)
        .stdout(Stdio::null())
        .status();
    match jq {
        Ok(status) if status.success() => {
            let secs = start.elapsed().as_secs_f64();
            println!(
                "jq field extraction (no aggregation): {:.0} lines/s ({secs:.1} s) → tally-collect is {:.1}× faster",
                lines as f64 / secs,
                secs / best
            );
        }
        _ => println!("jq not available (apt-get install -y jq): comparison skipped"),
    }
    collector(&path, lines, dir.path())
}

/// The whole collector on the same file: tail, aggregate, and durable
/// (fsync'd) commits of the outbox and checkpoint.
fn collector(path: &std::path::Path, lines: u64, dir: &std::path::Path) -> std::io::Result<()> {
    let agent = AgentIdentity {
        agent_id: "bench".into(),
        source: "tally-collect/bench".into(),
    };
    let config = CollectorConfig::new(path.to_owned(), dir.join("state"), agent);
    let start = Instant::now();
    let mut collector = Collector::open(config).map_err(std::io::Error::other)?;
    let mut events = 0;
    loop {
        let report = collector.poll().map_err(std::io::Error::other)?;
        events += report.events;
        if report.lines == 0 {
            break;
        }
    }
    events += collector.flush().map_err(std::io::Error::other)?.events;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "collector (tail, aggregate, fsync'd outbox + checkpoint commits): {:.0} lines/s, {events} events",
        lines as f64 / secs
    );
    Ok(())
}

fn memory(lines: u64) {
    let corpus = CorpusConfig {
        lines,
        routes: 100_000,
        projects: 5_000,
        step_millis: 0,
        late_per_mille: 0,
        ..CorpusConfig::default()
    };
    let before = rss_bytes();
    let mut aggregator = Aggregator::new(WindowConfig::default());
    let mut closed = Vec::new();
    for line in CorpusGenerator::new(corpus) {
        aggregator.push_line(line.as_bytes(), &mut closed);
    }
    let after = rss_bytes();
    let start = Instant::now();
    let state = serde_json::to_vec(&aggregator.state())
        .map(|s| s.len())
        .unwrap_or(0);
    let encode_ms = start.elapsed().as_secs_f64() * 1000.0;
    println!(
        "100k routes: {} routes, {} open buckets, RSS +{:.1} MiB ({:.0} bytes/route), checkpoint {:.1} MiB encoded in {encode_ms:.0} ms",
        aggregator.route_count(),
        aggregator.open_buckets(),
        after.saturating_sub(before) as f64 / (1 << 20) as f64,
        after.saturating_sub(before) as f64 / aggregator.route_count().max(1) as f64,
        state as f64 / (1 << 20) as f64
    );
}

fn main() -> std::io::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    throughput(env_u64("BENCH_LINES", 1_000_000))?;
    memory(env_u64("BENCH_ROUTES_LINES", 1_000_000));
    Ok(())
}
