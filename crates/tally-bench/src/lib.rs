//! `tally bench`: a reproducible load against a real server over loopback HTTP.
//!
//! Events look like the gateway's usage: 10,000 subjects (projects), four
//! event types (requests, ingress bytes, egress bytes, connection seconds),
//! each grouped by two properties (`region`, `method`), spread over the
//! last 30 days, at random times or replayed in time order ([`Order`]).
//! Request bodies of loads up to 10 M events are generated before the
//! clock starts, so the figure is the server's, not the generator's;
//! larger loads would not fit in memory and are generated as they are sent.
//!
//! The load generator runs in the server's process by default, sharing its
//! cores; `load_process` runs it as a child process (`tally bench
//! --load-only-to URL`), so the server's own CPU use can be told apart. The
//! report gives CPU time per event (the writer thread's, the materialiser's
//! and the server process's, from `/proc/self/task/*/schedstat`) and how
//! long the writer waited for a core: on a shared machine the rate alone
//! says little. Ingest is timed twice: until the last event is acknowledged,
//! and until it is also materialised (rollups written, no tail left); the
//! second is the figure that counts.
//!
//! For the side-by-side with other stores (`bench/compare-storage.py`),
//! `--write-events` writes the same events as NDJSON ([`write_events`]),
//! `--events-file` sends such a file instead of generated events, and
//! `--report-json` writes the report with both query answers in full.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use jiff::{SignedDuration, Timestamp};
use tally_ledger::Ledger;
use tally_server::AppState;
use tally_store_embedded::{EmbeddedLedger, StoreConfig};

mod events_file;
mod report;

pub use events_file::write as write_events;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Events to ingest.
    pub events: usize,
    /// Events per HTTP request.
    pub batch: usize,
    /// Concurrent HTTP connections.
    pub connections: usize,
    /// Distinct subjects.
    pub subjects: usize,
    /// Where the store lives; a temporary directory when `None`.
    pub data_dir: Option<PathBuf>,
    /// Repetitions of each query, for percentiles.
    pub query_runs: usize,
    /// Run the load generator as a separate process.
    pub load_process: bool,
    /// The order event times come in.
    pub order: Order,
    /// Skip ingest and time the queries on the store in `data_dir`, left
    /// by an earlier run of as many `events`.
    pub queries_only: bool,
    /// Event times are spread over the 30 days before this; now when `None`.
    pub now: Option<Timestamp>,
    /// Send the events of this NDJSON file (one CloudEvent a line, as
    /// [`write_events`] writes them) instead of generating them.
    pub events_file: Option<PathBuf>,
    /// Also write the report, with the answers of both queries, as JSON here.
    pub report_json: Option<PathBuf>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            events: 1_000_000,
            batch: 1_000,
            connections: 4,
            subjects: 10_000,
            data_dir: None,
            query_runs: 50,
            load_process: false,
            order: Order::Random,
            queries_only: false,
            now: None,
            events_file: None,
            report_json: None,
        }
    }
}

const TYPES: [&str; 4] = [
    "gateway.requests",
    "gateway.ingress-bytes",
    "gateway.egress-bytes",
    "gateway.connection-seconds",
];
const REGIONS: [&str; 3] = ["eu-west", "us-east", "ap-south"];
const METHODS: [&str; 5] = ["GET", "POST", "PUT", "DELETE", "PATCH"];

fn meters() -> String {
    TYPES
        .iter()
        .map(|t| {
            let slug = t.replace('.', "-");
            format!(
                "apiVersion: billing.miloapis.com/v1alpha1\nkind: MeterDefinition\nmetadata: {{name: {slug}}}\nspec:\n  meterName: {t}\n  measurement: {{aggregation: SUM}}\n  event: {{type: {t}, valueProperty: $.value, dimensions: {{region: $.region, method: $.method}}}}\n---\n"
            )
        })
        .collect()
}

/// A small deterministic generator (xorshift), so every run sends the same events.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The order event times come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Each event at a random time in the 30 days: every request touches
    /// buckets all over the month (the worst case for the writer).
    Random,
    /// A month of traffic replayed in time order, each event up to five
    /// minutes late: how a gateway's usage arrives.
    Time,
}

impl std::str::FromStr for Order {
    type Err = String;
    fn from_str(s: &str) -> Result<Order, String> {
        match s {
            "random" => Ok(Order::Random),
            "time" => Ok(Order::Time),
            other => Err(format!("unknown order {other:?}: random or time")),
        }
    }
}

impl std::fmt::Display for Order {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Order::Random => "random",
            Order::Time => "time",
        })
    }
}

/// Request bodies up to this many events are generated before the clock
/// starts; larger loads generate each body as it is sent.
const PREGENERATED_EVENTS: usize = 10_000_000;
/// The span event times cover, in seconds.
const SPAN: u64 = 30 * 24 * 3600;
/// How late an event of [`Order::Time`] may be, in seconds.
const LATENESS: u64 = 300;

/// Request `b` of the load: the same bytes on every run, whichever task
/// or process makes it.
fn body(o: &LoadOptions, b: usize) -> Vec<u8> {
    let n = o.batch.min(o.events - b * o.batch);
    let mut out = Vec::with_capacity(n * 260);
    out.push(b'[');
    for_each_event(o, b, &mut out, |out, i| {
        if i > 0 {
            out.push(b',');
        }
    });
    out.push(b']');
    out
}

/// Writes the events of request `b` to `out`, calling `before(out, i)`
/// ahead of event `i`: the one generator of both the HTTP bodies and the
/// events file of [`write_events`].
fn for_each_event(
    o: &LoadOptions,
    b: usize,
    out: &mut Vec<u8>,
    mut before: impl FnMut(&mut Vec<u8>, usize),
) {
    use std::io::Write;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (b as u64 + 1).wrapping_mul(0xff51_afd7_ed55_8ccd));
    let n = o.batch.min(o.events - b * o.batch);
    let start = o.now - SignedDuration::from_secs(SPAN as i64 + 60);
    for i in 0..n {
        let kind = TYPES[rng.below(TYPES.len())];
        let offset = match o.order {
            Order::Random => rng.below(SPAN as usize) as u64,
            Order::Time => {
                let at = (b * o.batch + i) as u128 * SPAN as u128 / o.events.max(1) as u128;
                (at as u64).saturating_sub(rng.below(LATENESS as usize) as u64)
            }
        };
        let time = start + SignedDuration::from_secs(offset as i64);
        before(out, i);
        // Written by hand: at 50 M events the generator shares the cores.
        let _ = write!(
            out,
            r#"{{"specversion":"1.0","id":"{b}-{i}","source":"bench","type":"{kind}","subject":"projects/p{}","time":"{time}","data":{{"value":{},"region":"{}","method":"{}"}}}}"#,
            rng.below(o.subjects),
            rng.below(100_000),
            REGIONS[rng.below(REGIONS.len())],
            METHODS[rng.below(METHODS.len())],
        );
    }
}

/// The requests of a load, made before the clock starts or as they are sent.
pub(crate) enum Bodies {
    Made(Vec<Vec<u8>>),
    OnTheFly(LoadOptions),
}

impl Bodies {
    fn new(o: &LoadOptions) -> Bodies {
        if o.events <= PREGENERATED_EVENTS {
            Bodies::Made((0..o.requests()).map(|b| body(o, b)).collect())
        } else {
            Bodies::OnTheFly(o.clone())
        }
    }

    fn get(&self, b: usize) -> Option<Vec<u8>> {
        match self {
            Bodies::Made(made) => made.get(b).cloned(),
            Bodies::OnTheFly(o) => (b < o.requests()).then(|| body(o, b)),
        }
    }
}

/// What the load generator needs; the same in and out of process.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub events: usize,
    pub batch: usize,
    pub connections: usize,
    pub subjects: usize,
    /// Event times are spread over the 30 days before this.
    pub now: Timestamp,
    pub order: Order,
}

impl LoadOptions {
    fn requests(&self) -> usize {
        self.events.div_ceil(self.batch)
    }
}

impl LoadOptions {
    fn of(o: &BenchOptions, now: Timestamp) -> LoadOptions {
        LoadOptions {
            events: o.events,
            batch: o.batch,
            connections: o.connections,
            subjects: o.subjects,
            now,
            order: o.order,
        }
    }
}

/// Sends the pre-generated bodies over `connections` connections.
async fn send_all(
    client: &reqwest::Client,
    base: &str,
    bodies: Arc<Bodies>,
    connections: usize,
) -> anyhow::Result<()> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (client, url, bodies, next) = (
            client.clone(),
            format!("{base}/api/v1/events"),
            bodies.clone(),
            next.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(body) = bodies.get(i) else {
                    return Ok::<_, anyhow::Error>(());
                };
                // A full backlog answers 503 after a bounded wait: retry as
                // asked, as a real sender does.
                loop {
                    let r = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await?;
                    if r.status().is_success() {
                        break;
                    }
                    if r.status() != reqwest::StatusCode::SERVICE_UNAVAILABLE {
                        bail!("ingest failed: {}", r.text().await?);
                    }
                    let wait = r
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok()?.parse().ok())
                        .unwrap_or(1);
                    tokio::time::sleep(Duration::from_secs(wait)).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// `tally bench --load-only-to URL`: the load generator alone, for a
/// server started by `tally bench --load-process`. Prints `ready` once the
/// bodies are generated, waits for a line on standard input, sends, and
/// prints `done`.
pub async fn run_load(o: LoadOptions, base: String) -> anyhow::Result<()> {
    let bodies = Arc::new(Bodies::new(&o));
    println!("ready");
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| ())
    })
    .await?
    .context("waiting for the go signal")?;
    let client = tally_delivery::client_builder().build()?;
    send_all(&client, &base, bodies, o.connections).await?;
    println!("done");
    Ok(())
}

/// CPU time of this process's threads (nanoseconds on a core, and waiting
/// for one), from `/proc/self/task/*/schedstat`.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    process_ns: u64,
    writer_ns: u64,
    writer_wait_ns: u64,
    materialiser_ns: u64,
}

fn cpu() -> Cpu {
    let mut total = Cpu::default();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return total;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(path.join("schedstat")).unwrap_or_default();
        let mut fields = stat
            .split_whitespace()
            .map(|f| f.parse::<u64>().unwrap_or(0));
        let (on_cpu, waiting) = (fields.next().unwrap_or(0), fields.next().unwrap_or(0));
        total.process_ns += on_cpu;
        match comm.trim() {
            "tally-writer" => {
                total.writer_ns += on_cpu;
                total.writer_wait_ns += waiting;
            }
            "tally-material" => total.materialiser_ns += on_cpu,
            _ => {}
        }
    }
    total
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Times `runs` GETs of `url`, and returns the rows of the last answer.
async fn timed_queries(
    client: &reqwest::Client,
    url: &str,
    runs: usize,
) -> anyhow::Result<(Vec<Duration>, Vec<serde_json::Value>)> {
    #[derive(serde::Deserialize)]
    struct Answer {
        data: Vec<serde_json::Value>,
    }
    let mut times = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        // Timed: the request and its whole answer, as bytes. Parsing the
        // answer is the client's work, not the ledger's.
        let start = Instant::now();
        let r = client.get(url).send().await.context("query")?;
        let status = r.status();
        let body = r.bytes().await.context("query body")?;
        times.push(start.elapsed());
        if !status.is_success() {
            bail!(
                "query {url} failed: {status} {}",
                String::from_utf8_lossy(&body)
            );
        }
        last = Some(body);
    }
    times.sort();
    let last = last.as_deref().unwrap_or(b"{\"data\":[]}");
    let answer: Answer = serde_json::from_slice(last).context("query answer")?;
    Ok((times, answer.data))
}

/// What the ingest phase measured.
pub(crate) struct Ingested {
    /// Until the last event was acknowledged.
    elapsed: Duration,
    /// Until the last event was also materialised.
    materialised: Duration,
    /// The oldest unmaterialised event's age, sampled while ingesting.
    lag_samples: Vec<Duration>,
    /// (time since the start, events materialised), sampled while ingesting.
    progress: Vec<(Duration, u64)>,
    group_commits: u64,
    cpu: Cpu,
    /// Resident memory before sending: the load generator's bodies.
    rss_before_kib: u64,
}

/// Applies the meters and sends the load; checks every event was stored.
async fn ingest(
    o: &BenchOptions,
    ledger: &EmbeddedLedger,
    client: &reqwest::Client,
    base: &str,
    now: Timestamp,
    from_file: Option<Bodies>,
) -> anyhow::Result<Ingested> {
    let r = client
        .post(format!("{base}/apis/apply"))
        .header("content-type", "application/yaml")
        .body(meters())
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("applying meters: {}", r.text().await?);
    }
    let load = LoadOptions::of(o, now);
    eprintln!(
        "generating {} events in batches of {}{}...",
        o.events,
        o.batch,
        if o.load_process {
            " in a separate process"
        } else {
            ""
        }
    );
    let mut child = None;
    let mut bodies_in_process = None;
    if o.load_process {
        child = Some(LoadProcess::start(&load, base).await?);
    } else {
        bodies_in_process = Some(Arc::new(from_file.unwrap_or_else(|| Bodies::new(&load))));
    }
    let rss_before_kib = rss_kib("VmRSS:");
    eprintln!("ingesting over {} connections...", o.connections);
    let cpu_before = cpu();
    let start = Instant::now();
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sampler = tokio::spawn(sample_lag(ledger.clone(), start, Arc::clone(&samples)));
    match (&mut child, bodies_in_process.take()) {
        (Some(child), _) => child.go().await?,
        (None, Some(bodies)) => send_all(client, base, bodies, o.connections).await?,
        (None, None) => bail!("no load generator"),
    }
    let elapsed = start.elapsed();
    while ledger.stats().materialise_lag_events > 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let materialised = start.elapsed();
    sampler.abort();
    let sampled = samples.lock().map(|s| s.clone()).unwrap_or_default();
    let mut lag_samples: Vec<Duration> = sampled.iter().map(|s| s.2).collect();
    lag_samples.sort();
    let mut progress: Vec<(Duration, u64)> = sampled
        .into_iter()
        .map(|(at, done, _)| (at, done))
        .collect();
    progress.push((materialised, o.events as u64));
    let cpu_after = cpu();
    let stats = ledger.stats();
    if stats.events_accepted_total != o.events as u64 {
        bail!(
            "expected {} events stored, the ledger says {}",
            o.events,
            stats.events_accepted_total
        );
    }
    Ok(Ingested {
        elapsed,
        materialised,
        lag_samples,
        progress,
        group_commits: stats.group_commits_total,
        cpu: Cpu {
            materialiser_ns: cpu_after
                .materialiser_ns
                .saturating_sub(cpu_before.materialiser_ns),
            writer_ns: cpu_after.writer_ns.saturating_sub(cpu_before.writer_ns),
            writer_wait_ns: cpu_after
                .writer_wait_ns
                .saturating_sub(cpu_before.writer_wait_ns),
            process_ns: cpu_after.process_ns.saturating_sub(cpu_before.process_ns),
        },
        rss_before_kib,
    })
}

/// Samples into `samples`, every 20 ms until aborted, the time since
/// `start`, the events materialised, and how long the oldest acknowledged
/// but unmaterialised event has waited.
async fn sample_lag(
    ledger: EmbeddedLedger,
    start: Instant,
    samples: Arc<std::sync::Mutex<Vec<(Duration, u64, Duration)>>>,
) {
    loop {
        let stats = ledger.stats();
        let done = stats
            .events_accepted_total
            .saturating_sub(stats.materialise_lag_events);
        let lag = Duration::from_secs_f64(stats.materialise_lag_seconds.max(0.0));
        if let Ok(mut s) = samples.lock() {
            s.push((start.elapsed(), done, lag));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (up to twenty minutes) until the writer thread used under 2 % of
/// a core for a quarter of a second: on a store just opened, it first scans
/// the dedupe and rollup keys into its filters, minutes at 50 M events.
async fn wait_for_an_idle_writer() {
    let quarter = Duration::from_millis(250);
    for _ in 0..4_800 {
        let before = cpu().writer_ns;
        tokio::time::sleep(quarter).await;
        if cpu().writer_ns.saturating_sub(before) < quarter.as_nanos() as u64 / 50 {
            return;
        }
    }
}

/// Runs the benchmark and prints a report (and writes it as JSON to
/// `report_json` when given).
pub async fn run(mut o: BenchOptions) -> anyhow::Result<()> {
    let temp = tempfile::tempdir().context("creating a temporary directory")?;
    let dir = match (&o.data_dir, o.queries_only) {
        (Some(dir), _) => dir.clone(),
        (None, false) => temp.path().to_owned(),
        (None, true) => bail!("--queries-only needs the --data-dir of an earlier run"),
    };
    let from_file = match &o.events_file {
        Some(_) if o.load_process => {
            bail!("--events-file is sent in process, not with --load-process")
        }
        Some(path) => {
            let (bodies, events) = events_file::read(path, o.batch)?;
            o.events = events;
            Some(bodies)
        }
        None => None,
    };
    let ledger = Arc::new(
        tokio::task::spawn_blocking({
            let dir = dir.clone();
            move || EmbeddedLedger::open(StoreConfig::new(dir))
        })
        .await??,
    );
    let state = AppState::new(ledger.clone(), 64 << 20, None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(tally_server::serve_on(listener, state));
    let client = tally_delivery::client_builder().build()?;
    let now = o.now.unwrap_or_else(Timestamp::now);
    let ingested = if o.queries_only {
        // A store just opened scans its keys into filters in the
        // background; time the queries after that, as after ingest.
        wait_for_an_idle_writer().await;
        None
    } else {
        Some(ingest(&o, &ledger, &client, &base, now, from_file).await?)
    };
    let queries = time_queries(&o, &ledger, &client, &base, now).await?;
    let stats = ledger.stats();
    report::print(&o, ingested.as_ref(), &queries, &stats);
    let disk = disk_after_compaction(&ledger, o.events.max(1) as f64).await?;
    if let Some(path) = &o.report_json {
        let json = report::json(&o, ingested.as_ref(), &queries, &stats, &disk)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Q1 and Q2 of the issue, timed over HTTP (and Q2 also on the ledger
/// itself), with the answer of the last run of each.
async fn time_queries(
    o: &BenchOptions,
    ledger: &EmbeddedLedger,
    client: &reqwest::Client,
    base: &str,
    now: Timestamp,
) -> anyhow::Result<report::Queries> {
    let (from, to) = query_range(now);
    let hourly = format!(
        "{base}/api/v1/meters/gateway-requests/query?from={from}&to={to}&windowSize=HOUR&subject=projects/p42"
    );
    let daily = format!(
        "{base}/api/v1/meters/gateway-requests/query?from={from}&to={to}&windowSize=DAY&groupBy=subject"
    );
    // Wait for nothing: meters existed before the events, so they are ready.
    let (hourly_times, hourly_rows) = timed_queries(client, &hourly, o.query_runs).await?;
    let (daily_times, daily_rows) = timed_queries(client, &daily, o.query_runs).await?;
    // The same grouped query on the ledger itself: what the store takes,
    // without the JSON answer and HTTP.
    let mut store_times = Vec::new();
    for _ in 0..o.query_runs.min(10) {
        let query = tally_ledger::MeterQuery {
            from,
            to,
            window_size: Some(tally_meter::WindowSize::Day),
            time_zone: jiff::tz::TimeZone::UTC,
            subjects: Vec::new(),
            group_by: vec!["subject".to_owned()],
            filter_group_by: Default::default(),
            limit: None,
            cursor: None,
        };
        let started = Instant::now();
        let result = ledger.query("gateway-requests".to_owned(), query).await?;
        store_times.push(started.elapsed());
        if result.rows.len() != daily_rows.len() {
            bail!(
                "the store answered {} rows, HTTP {}",
                result.rows.len(),
                daily_rows.len()
            );
        }
    }
    store_times.sort();
    Ok(report::Queries {
        from,
        to,
        hourly_times,
        hourly_rows,
        daily_times,
        daily_rows,
        store_times,
    })
}

/// The range of both queries: from 31 days before `now` to a day after,
/// on whole hours (the events lie in the 30 days before `now`).
pub fn query_range(now: Timestamp) -> (Timestamp, Timestamp) {
    let day = |d: i64| {
        (now - SignedDuration::from_hours(24 * d))
            .round(jiff::Unit::Hour)
            .unwrap_or(now)
    };
    (day(31), day(-1))
}

/// Flushes and compacts every keyspace, then prints the tables' bytes per
/// event, by keyspace: what the store keeps once compaction caught up.
async fn disk_after_compaction(
    ledger: &Arc<EmbeddedLedger>,
    events: f64,
) -> anyhow::Result<Vec<(String, u64)>> {
    let (in_memory, in_runs, filters) = ledger.dedupe_sizes();
    println!(
        "dedupe index before its last run: {in_memory} keys in memory, {in_runs} in {} runs, {:.1} MiB of run filters",
        ledger.dedupe_runs(),
        filters as f64 / 1_048_576.0
    );
    ledger.flush_dedupe().await?;
    let start = Instant::now();
    let compacting = Arc::clone(ledger);
    tokio::task::spawn_blocking(move || compacting.compact()).await??;
    let by_keyspace: Vec<(String, u64)> = ledger
        .disk_by_keyspace()
        .into_iter()
        .map(|(name, bytes)| (name.to_string(), bytes))
        .collect();
    let total: u64 = by_keyspace.iter().map(|(_, bytes)| bytes).sum();
    let parts: Vec<String> = by_keyspace
        .iter()
        .filter(|(_, bytes)| *bytes > 0)
        .map(|(name, bytes)| format!("{name} {:.1}", *bytes as f64 / events))
        .collect();
    println!(
        "disk after compaction ({:.1} s to compact): {:.1} bytes per event in tables ({}); journal apart",
        start.elapsed().as_secs_f64(),
        total as f64 / events,
        parts.join(", ")
    );
    Ok(by_keyspace)
}

/// The load generator as a child process (`tally bench --load-only-to`).
struct LoadProcess {
    child: tokio::process::Child,
    stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl LoadProcess {
    async fn start(o: &LoadOptions, base: &str) -> anyhow::Result<LoadProcess> {
        let exe = std::env::current_exe().context("finding this executable")?;
        let mut child = tokio::process::Command::new(exe)
            .arg("bench")
            .args(["--events", &o.events.to_string()])
            .args(["--batch", &o.batch.to_string()])
            .args(["--connections", &o.connections.to_string()])
            .args(["--subjects", &o.subjects.to_string()])
            .args(["--load-now", &o.now.to_string()])
            .args(["--order", &o.order.to_string()])
            .args(["--load-only-to", base])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the load generator process")?;
        let stdout = child
            .stdout
            .take()
            .context("the load generator's standard output")?;
        let mut process = LoadProcess {
            child,
            stdout: tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout)),
        };
        process.expect("ready").await?;
        Ok(process)
    }

    async fn expect(&mut self, word: &str) -> anyhow::Result<()> {
        match self.stdout.next_line().await? {
            Some(line) if line.trim() == word => Ok(()),
            Some(line) => bail!("the load generator said {line:?}, expected {word:?}"),
            None => {
                let status = self.child.wait().await?;
                bail!("the load generator exited ({status}) before saying {word:?}")
            }
        }
    }

    /// Starts the load and waits until every request was answered.
    async fn go(&mut self) -> anyhow::Result<()> {
        use tokio::io::AsyncWriteExt;
        let stdin = self
            .child
            .stdin
            .as_mut()
            .context("the load generator's standard input")?;
        stdin.write_all(b"go\n").await?;
        stdin.flush().await?;
        self.expect("done").await?;
        let status = self.child.wait().await?;
        if !status.success() {
            bail!("the load generator failed: {status}");
        }
        Ok(())
    }
}
