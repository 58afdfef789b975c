//! [`ClusterLogStore`]: instance logs in ClickHouse, shared by every node
//! of a cluster — the cluster's [`tally_logstore::LogStore`]. Records are
//! admitted by the embedded store's own [`tally_logstore::admit`] (same
//! bounds, same cut of long lines) and filtered by its
//! [`tally_logstore::LineFilter`]s; ClickHouse is the storage engine.
//!
//! ## Table `<db>.logs`
//!
//! | column     | type   | meaning                                          |
//! |------------|--------|--------------------------------------------------|
//! | `project`, `instance` | String | whose line                          |
//! | `workload` | String | the sender's workload label, `''` for none       |
//! | `stream`   | UInt8  | 0 stdout, 1 stderr                               |
//! | `time_ns`  | Int64  | when the line was written (sender's time)        |
//! | `block`    | UInt64 | arrival stamp of the write round (ns, `stamp.rs`)|
//! | `idx`      | UInt32 | the line's index in its round                    |
//! | `rid`      | String | the sender's record id, `''` for none            |
//! | `line`     | String | the text                                         |
//!
//! `MergeTree`, `PARTITION BY` the arrival day, `ORDER BY (project,
//! instance, time_ns, block, idx)`. A line's [`Position`] is `(block,
//! idx)`: it only grows on one node, so lines of one instance keep the
//! order in which the node took them.
//!
//! - **Writer.** One task per node takes every queued append, drops the
//!   records whose id is already stored (a query before the insert), writes
//!   the rest in **one** insert and only then answers. Pending text is
//!   bounded per instance and in all as in the embedded store
//!   ([`LogError::Busy`], 429).
//! - **Dedupe** by (project, instance, record id) is exact: reads keep the
//!   first copy (`LIMIT 1 BY`), so even a record that reached two nodes at
//!   the same moment is read once (both answers say `stored`).
//! - **Following across nodes.** Every node polls `count()` of the table
//!   every [`POLL`] and wakes its followers on a change. A read after a
//!   position (following) sees only lines stamped at least [`SETTLE`] ago
//!   on the reader's clock, so a line another node stamped earlier but
//!   inserted later is not skipped, provided its insert took less than
//!   `SETTLE` and the nodes' clocks agree within it. A new line is thus
//!   shown within `SETTLE + POLL` (+ one query) of its insert.
//! - **Retention** (`sweep`, ClickHouse 18.16 has no TTL): per project,
//!   `ALTER TABLE … DELETE` of the lines that arrived before its retention
//!   (projects without one: the default); only issued when such lines
//!   exist. `sweep` answers the number of lines deleted.
//!
//! **Never:** answer an append before ClickHouse accepted its insert; read
//! a line of another project than the one asked (every statement names the
//! project). Reads block on the runtime handle the store was opened on.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tally_logstore::{
    AppendReport, AppendTicket, InstanceInfo, LogError, LogLine, LogPage, LogQuery, LogRecord,
    LogStore, Position, Stats, StoreConfig, Stream, admit,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::ch::{Ch, ChError, lit};
use crate::stamp::{Stamps, now_nanos};

/// How often a node looks for lines other nodes wrote.
pub const POLL: Duration = Duration::from_millis(150);
/// How old a line's stamp must be before a follower reads it.
pub const SETTLE: Duration = Duration::from_millis(400);
/// How often the totals of `stats` are read again.
const STATS_EVERY: Duration = Duration::from_secs(10);

type InstanceId = (String, String);

struct Job {
    records: Vec<LogRecord>,
    bytes: usize,
    shares: Vec<(InstanceId, usize)>,
    truncated: u64,
    reply: oneshot::Sender<Result<AppendReport, LogError>>,
}

#[derive(Default)]
struct Pending {
    bytes: usize,
    per_instance: HashMap<InstanceId, usize>,
}

/// What the writer, the poller and the store share.
struct Shared {
    ch: Ch,
    /// Set once the table exists (ClickHouse may be down at start).
    schema: tokio::sync::OnceCell<()>,
    config: StoreConfig,
    pending: Mutex<Pending>,
    notify: watch::Sender<u64>,
    stats: Mutex<Stats>,
    appended: AtomicU64,
    duplicates: AtomicU64,
    truncated: AtomicU64,
    swept: AtomicU64,
}

/// The cluster's instance log store. Dropping it stops its writer (after
/// the queued appends) and its poller.
pub struct ClusterLogStore {
    shared: Arc<Shared>,
    queue: mpsc::UnboundedSender<Job>,
    runtime: tokio::runtime::Handle,
}

fn unavailable(e: ChError) -> LogError {
    LogError::Unavailable(e.to_string())
}

impl ClusterLogStore {
    /// The store on `ch`; starts the writer and the poller on the current
    /// runtime. The table is created when missing (now, or at the first
    /// call that finds ClickHouse up). `config.dir` is not used; its
    /// retention, pending bounds and scan budget are.
    pub async fn open(ch: Ch, config: StoreConfig) -> ClusterLogStore {
        let shared = Arc::new(Shared {
            ch,
            schema: tokio::sync::OnceCell::new(),
            config,
            pending: Mutex::new(Pending::default()),
            notify: watch::channel(0).0,
            stats: Mutex::new(Stats::default()),
            appended: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            truncated: AtomicU64::new(0),
            swept: AtomicU64::new(0),
        });
        let (queue, jobs) = mpsc::unbounded_channel();
        tokio::spawn(run_writer(Arc::clone(&shared), jobs));
        if let Err(e) = shared.ready().await {
            tracing::warn!(error = %e, "instance log table not created yet; retried at the first call");
        }
        tokio::spawn(run_poller(Arc::downgrade(&shared)));
        ClusterLogStore {
            shared,
            queue,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    fn block<T>(&self, f: impl Future<Output = Result<T, LogError>>) -> Result<T, LogError> {
        self.runtime.block_on(async {
            self.shared.ready().await.map_err(unavailable)?;
            f.await
        })
    }

    /// Takes the pending shares of `job`, or refuses it.
    fn reserve(&self, shares: &[(InstanceId, usize)], bytes: usize) -> Result<(), LogError> {
        let config = &self.shared.config;
        let mut pending = self.shared.pending.lock().map_err(|_| LogError::Stopped)?;
        let busy = |why: String| LogError::Busy {
            why,
            retry_after: Duration::from_secs(1),
        };
        if pending.bytes + bytes > config.max_pending_bytes && pending.bytes > 0 {
            return Err(busy(format!(
                "more than {} bytes of log text are waiting to be written",
                config.max_pending_bytes
            )));
        }
        for (id, share) in shares {
            let queued = pending.per_instance.get(id).copied().unwrap_or(0);
            if queued > 0 && queued + share > config.max_pending_instance_bytes {
                return Err(busy(format!(
                    "more than {} bytes of log text of instance {} are waiting to be written",
                    config.max_pending_instance_bytes, id.1
                )));
            }
        }
        pending.bytes += bytes;
        for (id, share) in shares {
            *pending.per_instance.entry(id.clone()).or_default() += share;
        }
        Ok(())
    }
}

impl Shared {
    async fn ready(&self) -> Result<(), ChError> {
        let db = &self.ch.database;
        let create = || async {
            self.ch
                .execute(&format!("CREATE DATABASE IF NOT EXISTS {db}"))
                .await?;
            self.ch
                .execute(&format!(
                    "CREATE TABLE IF NOT EXISTS {db}.logs (\
                     project String, instance String, workload String, stream UInt8, \
                     time_ns Int64, block UInt64, idx UInt32, rid String, line String) \
                     ENGINE = MergeTree \
                     PARTITION BY toYYYYMMDD(toDateTime(intDiv(block, 1000000000))) \
                     ORDER BY (project, instance, time_ns, block, idx)"
                ))
                .await
        };
        self.schema.get_or_try_init(create).await.map(|_| ())
    }

    fn release(&self, job: &Job) {
        let Ok(mut pending) = self.pending.lock() else {
            return;
        };
        pending.bytes = pending.bytes.saturating_sub(job.bytes);
        for (id, share) in &job.shares {
            if let Some(left) = pending.per_instance.get_mut(id) {
                *left = left.saturating_sub(*share);
                if *left == 0 {
                    pending.per_instance.remove(id);
                }
            }
        }
    }

    fn wake(&self) {
        self.notify.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// The writer: every queued job in one round, until the store is dropped.
async fn run_writer(shared: Arc<Shared>, mut jobs: mpsc::UnboundedReceiver<Job>) {
    let stamps = Stamps::default();
    while let Some(first) = jobs.recv().await {
        let mut round = vec![first];
        while let Ok(job) = jobs.try_recv() {
            round.push(job);
        }
        let result = write_round(&shared, &stamps, &round).await;
        for (job, result) in round.into_iter().zip(result) {
            shared.release(&job);
            let _ = job.reply.send(result);
        }
        shared.wake();
    }
}

/// `project`/`instance`/`rid` as one string no other triple gives.
fn rid_key(project: &str, instance: &str, rid: &str) -> String {
    format!(
        "{}:{project}{}:{instance}{rid}",
        project.len(),
        instance.len()
    )
}

const RID_KEY_SQL: &str = "concat(toString(length(project)), ':', project, \
                           toString(length(instance)), ':', instance, rid)";

#[derive(Deserialize)]
struct RidRow {
    project: String,
    instance: String,
    rid: String,
}

/// The record ids of `round` already stored.
async fn stored_ids(ch: &Ch, round: &[Job]) -> Result<HashSet<String>, ChError> {
    let mut keys = Vec::new();
    let mut projects = HashSet::new();
    for r in round.iter().flat_map(|j| &j.records) {
        if let Some(id) = &r.id {
            keys.push(lit(&rid_key(&r.project, &r.instance, id)));
            projects.insert(lit(&r.project));
        }
    }
    if keys.is_empty() {
        return Ok(HashSet::new());
    }
    let projects: Vec<String> = projects.into_iter().collect();
    let sql = format!(
        "SELECT project, instance, rid FROM {}.logs WHERE project IN ({}) AND rid != '' \
         AND {RID_KEY_SQL} IN ({})",
        ch.database,
        projects.join(","),
        keys.join(",")
    );
    let rows: Vec<RidRow> = ch.select(&sql).await?;
    Ok(rows
        .iter()
        .map(|r| rid_key(&r.project, &r.instance, &r.rid))
        .collect())
}

/// Writes one round; the answer of each job, in order.
async fn write_round(
    shared: &Shared,
    stamps: &Stamps,
    round: &[Job],
) -> Vec<Result<AppendReport, LogError>> {
    let fail = |e: ChError| {
        let message = e.to_string();
        tracing::warn!(error = %message, "writing instance logs to ClickHouse");
        round
            .iter()
            .map(|_| Err(LogError::Unavailable(message.clone())))
            .collect()
    };
    if let Err(e) = shared.ready().await {
        return fail(e);
    }
    let mut seen = match stored_ids(&shared.ch, round).await {
        Ok(seen) => seen,
        Err(e) => return fail(e),
    };
    let block = stamps.take(1);
    let mut rows = Vec::new();
    let mut reports = Vec::with_capacity(round.len());
    let mut idx: u32 = 0;
    for job in round {
        let mut report = AppendReport {
            truncated: job.truncated,
            ..AppendReport::default()
        };
        for r in &job.records {
            if let Some(id) = &r.id
                && !seen.insert(rid_key(&r.project, &r.instance, id))
            {
                report.duplicates += 1;
                continue;
            }
            let row = serde_json::json!({
                "project": r.project, "instance": r.instance,
                "workload": r.workload.as_deref().unwrap_or(""),
                "stream": u8::from(r.stream == Stream::Stderr), "time_ns": r.time_nanos,
                "block": block, "idx": idx, "rid": r.id.as_deref().unwrap_or(""), "line": r.line,
            });
            if serde_json::to_writer(&mut rows, &row).is_ok() {
                rows.push(b'\n');
                idx = idx.saturating_add(1);
                report.stored += 1;
            }
        }
        reports.push(report);
    }
    if !rows.is_empty()
        && let Err(e) = shared.ch.insert("logs", rows).await
    {
        return fail(e);
    }
    for r in &reports {
        shared.appended.fetch_add(r.stored, Ordering::Relaxed);
        shared.duplicates.fetch_add(r.duplicates, Ordering::Relaxed);
        shared.truncated.fetch_add(r.truncated, Ordering::Relaxed);
    }
    reports.into_iter().map(Ok).collect()
}

#[derive(Deserialize)]
struct Count {
    n: u64,
}

#[derive(Deserialize)]
struct Totals {
    lines: u64,
    raw: u64,
}

#[derive(Deserialize)]
struct Disk {
    bytes: u64,
}

/// Wakes followers when the table changed (any node's write), and once
/// more while a change may still be settling; refreshes the totals.
async fn run_poller(shared: Weak<Shared>) {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_count = None;
    let mut changed_at: Option<Instant> = None;
    let mut stats_at: Option<Instant> = None;
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let sql = format!("SELECT count() AS n FROM {}.logs", shared.ch.database);
        if let Ok(rows) = shared.ch.select::<Count>(&sql).await {
            let n = rows.first().map_or(0, |c| c.n);
            if last_count != Some(n) {
                last_count = Some(n);
                changed_at = Some(Instant::now());
            }
        }
        if changed_at.is_some_and(|at| at.elapsed() < SETTLE + 2 * POLL) {
            shared.wake();
        }
        if stats_at.is_none_or(|at| at.elapsed() >= STATS_EVERY) {
            stats_at = Some(Instant::now());
            refresh_stats(&shared).await;
        }
    }
}

async fn refresh_stats(shared: &Shared) {
    let db = &shared.ch.database;
    let totals = shared
        .ch
        .select::<Totals>(&format!(
            "SELECT count() AS lines, sum(length(line)) AS raw FROM {db}.logs"
        ))
        .await;
    let disk = shared
        .ch
        .select::<Disk>(&format!(
            "SELECT sum(bytes) AS bytes FROM system.parts \
             WHERE database = {} AND table = 'logs' AND active",
            lit(db)
        ))
        .await;
    let Ok(mut stats) = shared.stats.lock() else {
        return;
    };
    if let Ok(Some(t)) = totals.map(|t| t.into_iter().next()) {
        stats.lines = t.lines;
        stats.raw_bytes = t.raw;
    }
    if let Ok(Some(d)) = disk.map(|d| d.into_iter().next()) {
        stats.disk_bytes = d.bytes;
        stats.block_bytes = d.bytes;
    }
}

#[derive(Deserialize)]
struct LineRow {
    instance: String,
    stream: u8,
    time_ns: i64,
    block: u64,
    idx: u32,
    line: String,
}

/// The `SELECT` of `q`: every condition ClickHouse can decide; the line
/// filters are re-checked by [`tally_logstore::LineFilter::keeps`].
fn read_sql(db: &str, q: &LogQuery) -> String {
    let mut filter = format!(
        "project = {} AND time_ns >= {} AND time_ns < {}",
        lit(&q.project),
        q.since_nanos,
        q.until_nanos
    );
    if !q.instances.is_empty() {
        let names: Vec<String> = q.instances.iter().map(|i| lit(i)).collect();
        filter.push_str(&format!(" AND instance IN ({})", names.join(",")));
    }
    if let Some(s) = q.stream {
        filter.push_str(&format!(" AND stream = {}", u8::from(s == Stream::Stderr)));
    }
    if let Some(after) = q.after {
        let settled = now_nanos().saturating_sub(SETTLE.as_nanos() as u64);
        filter.push_str(&format!(
            " AND (block > {b} OR (block = {b} AND idx > {i})) AND block < {settled}",
            b = after.block,
            i = after.index
        ));
    }
    for f in &q.filters {
        match f {
            tally_logstore::LineFilter::Contains(t) => {
                filter.push_str(&format!(" AND position(line, {}) > 0", lit(t)));
            }
            tally_logstore::LineFilter::NotContains(t) => {
                filter.push_str(&format!(" AND position(line, {}) = 0", lit(t)));
            }
            _ => {}
        }
    }
    let order = if q.newest_first { "DESC" } else { "ASC" };
    // Without a regex every row ClickHouse sends is kept: one more than
    // the limit says whether the answer is truncated.
    let plain = q.filters.iter().all(|f| {
        matches!(
            f,
            tally_logstore::LineFilter::Contains(_) | tally_logstore::LineFilter::NotContains(_)
        )
    });
    let limit = if plain {
        format!(" LIMIT {}", q.limit.saturating_add(1))
    } else {
        String::new()
    };
    format!(
        "SELECT instance, stream, time_ns, block, idx, line FROM {db}.logs WHERE {filter} \
         ORDER BY block {order}, idx {order} \
         LIMIT 1 BY instance, if(rid = '', concat(toString(block), '.', toString(idx)), rid)\
         {limit}"
    )
}

/// Stops a streamed read early (not an error of ClickHouse).
const STOP: &str = "tally: read complete";

async fn read_async(shared: &Shared, q: &LogQuery) -> Result<LogPage, LogError> {
    let sql = read_sql(&shared.ch.database, q);
    let mut page = LogPage::default();
    let budget = shared.config.max_scan_bytes;
    let result = shared
        .ch
        .select_each(&sql, |row: LineRow| {
            if page.lines.len() >= q.limit || page.scanned_bytes >= budget {
                page.truncated = true;
                return Err(ChError::Decode(STOP.into()));
            }
            page.scanned_bytes += row.line.len() as u64;
            if !q.filters.iter().all(|f| f.keeps(&row.line)) {
                return Ok(());
            }
            page.lines.push(LogLine {
                instance: row.instance,
                stream: if row.stream == 1 {
                    Stream::Stderr
                } else {
                    Stream::Stdout
                },
                time_nanos: row.time_ns,
                position: Position {
                    block: row.block,
                    index: row.idx,
                },
                line: row.line,
            });
            Ok(())
        })
        .await;
    match result {
        Err(ChError::Decode(m)) if m == STOP => Ok(page),
        Err(e) => Err(unavailable(e)),
        Ok(()) => Ok(page),
    }
}

#[derive(Deserialize)]
struct InstanceRow {
    project: String,
    instance: String,
    workload: String,
    newest: i64,
}

async fn instances_async(
    shared: &Shared,
    project: Option<&str>,
) -> Result<Vec<(String, InstanceInfo)>, LogError> {
    let filter = project.map_or(String::new(), |p| format!("WHERE project = {}", lit(p)));
    let sql = format!(
        "SELECT project, instance, argMax(workload, block) AS workload, max(time_ns) AS newest \
         FROM {}.logs {filter} GROUP BY project, instance ORDER BY project, instance",
        shared.ch.database
    );
    let rows: Vec<InstanceRow> = shared.ch.select(&sql).await.map_err(unavailable)?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let info = InstanceInfo {
                instance: r.instance,
                workload: (!r.workload.is_empty()).then_some(r.workload),
                newest_nanos: r.newest,
            };
            (r.project, info)
        })
        .collect())
}

/// Deletes what arrived before its project's retention; the lines deleted.
async fn sweep_async(shared: &Shared, now_nanos: i64) -> Result<u64, LogError> {
    let config = &shared.config;
    let cutoff = |keep: Duration| {
        let keep = i64::try_from(keep.as_nanos()).unwrap_or(i64::MAX);
        u64::try_from(now_nanos.saturating_sub(keep)).unwrap_or(0)
    };
    let mut scopes: Vec<String> = config
        .retention
        .iter()
        .map(|(p, keep)| format!("project = {} AND block < {}", lit(p), cutoff(*keep)))
        .collect();
    let named: Vec<String> = config.retention.keys().map(|p| lit(p)).collect();
    let others = if named.is_empty() {
        String::from("1")
    } else {
        format!("project NOT IN ({})", named.join(","))
    };
    scopes.push(format!(
        "{others} AND block < {}",
        cutoff(config.default_retention)
    ));
    let db = &shared.ch.database;
    let mut deleted = 0;
    for scope in scopes {
        let n: Vec<Count> = shared
            .ch
            .select(&format!("SELECT count() AS n FROM {db}.logs WHERE {scope}"))
            .await
            .map_err(unavailable)?;
        let n = n.first().map_or(0, |c| c.n);
        if n == 0 {
            continue;
        }
        shared
            .ch
            .execute(&format!("ALTER TABLE {db}.logs DELETE WHERE {scope}"))
            .await
            .map_err(unavailable)?;
        deleted += n;
    }
    shared.swept.fetch_add(deleted, Ordering::Relaxed);
    Ok(deleted)
}

impl LogStore for ClusterLogStore {
    fn append(&self, mut records: Vec<LogRecord>) -> Result<AppendTicket, LogError> {
        let mut truncated = 0;
        let mut shares: HashMap<InstanceId, usize> = HashMap::new();
        for r in &mut records {
            truncated += u64::from(admit(r)?);
            *shares
                .entry((r.project.clone(), r.instance.clone()))
                .or_default() += r.line.len();
        }
        let shares: Vec<(InstanceId, usize)> = shares.into_iter().collect();
        let bytes = shares.iter().map(|(_, n)| n).sum();
        self.reserve(&shares, bytes)?;
        let (reply, ticket) = oneshot::channel();
        let job = Job {
            records,
            bytes,
            shares,
            truncated,
            reply,
        };
        if let Err(refused) = self.queue.send(job) {
            self.shared.release(&refused.0);
            return Err(LogError::Stopped);
        }
        Ok(ticket)
    }

    fn read(&self, query: &LogQuery) -> Result<LogPage, LogError> {
        self.block(read_async(&self.shared, query))
    }

    fn instances(&self, project: Option<&str>) -> Result<Vec<(String, InstanceInfo)>, LogError> {
        self.block(instances_async(&self.shared, project))
    }

    fn sweep(&self, now_nanos: i64) -> Result<u64, LogError> {
        self.block(sweep_async(&self.shared, now_nanos))
    }

    fn stats(&self) -> Stats {
        let mut stats = self.shared.stats.lock().map(|s| *s).unwrap_or_default();
        stats.appended_lines = self.shared.appended.load(Ordering::Relaxed);
        stats.duplicates = self.shared.duplicates.load(Ordering::Relaxed);
        stats.truncated = self.shared.truncated.load(Ordering::Relaxed);
        stats.swept_blocks = self.shared.swept.load(Ordering::Relaxed);
        stats
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.notify.subscribe()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rid_keys_do_not_collide() {
        assert_ne!(
            super::rid_key("a", "bc", "d"),
            super::rid_key("ab", "c", "d")
        );
        assert_ne!(
            super::rid_key("a", "b", "cd"),
            super::rid_key("a", "bc", "d")
        );
    }
}
