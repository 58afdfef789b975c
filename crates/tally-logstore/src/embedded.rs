//! [`EmbeddedLogStore`]: the log store on one fjall database (layouts in
//! `keys.rs`, blocks in `block.rs`), written by one writer thread.
//!
//! **Fairness and the bound on delay.** An append is refused with
//! [`LogError::Busy`] (the receivers answer 429 + `Retry-After`) when it
//! would take one (project, instance) past `max_pending_instance_bytes` of
//! queued text, or the store past `max_pending_bytes`. The writer takes
//! *everything* queued in one round, so a line of any instance is durable
//! after at most two rounds, each writing at most `max_pending_bytes`: a
//! noisy instance can fill only its own share of the queue, never make the
//! others wait for its backlog.
//!
//! **Invariant:** the totals in `meta` are written in the same batch as the
//! blocks they count, so they equal a recount of the store.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, KvSeparationOptions};
use tokio::sync::{oneshot, watch};

mod read;
mod sweep;
mod write;

use crate::{
    AppendReport, AppendTicket, DEFAULT_RETENTION, InstanceInfo, LogError, LogPage, LogQuery,
    LogRecord, LogStore, Stats, admit,
};

/// How the embedded store is opened.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub dir: PathBuf,
    /// Retention of a project without its own.
    pub default_retention: Duration,
    /// Retention per project.
    pub retention: BTreeMap<String, Duration>,
    /// Text queued for the writer, all instances together.
    pub max_pending_bytes: usize,
    /// Text queued for the writer for one (project, instance).
    pub max_pending_instance_bytes: usize,
    /// Raw bytes one read may decompress before it stops (`truncated`).
    pub max_scan_bytes: u64,
}

impl StoreConfig {
    pub fn new(dir: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            dir: dir.into(),
            default_retention: DEFAULT_RETENTION,
            retention: BTreeMap::new(),
            max_pending_bytes: 64 << 20,
            max_pending_instance_bytes: 8 << 20,
            max_scan_bytes: 4 << 30,
        }
    }
}

type InstanceId = (String, String);

struct Job {
    records: Vec<LogRecord>,
    shares: Vec<(InstanceId, usize)>,
    truncated: u64,
    reply: oneshot::Sender<Result<AppendReport, LogError>>,
}

#[derive(Default)]
struct Pending {
    jobs: VecDeque<Job>,
    bytes: usize,
    per_instance: HashMap<InstanceId, usize>,
    stopping: bool,
}

struct Spaces {
    db: Database,
    blocks: Keyspace,
    times: Keyspace,
    ids: Keyspace,
    idblocks: Keyspace,
    instances: Keyspace,
    meta: Keyspace,
}

#[derive(Default)]
struct Counters {
    next_block: AtomicU64,
    raw: AtomicU64,
    stored: AtomicU64,
    lines: AtomicU64,
    appended: AtomicU64,
    duplicates: AtomicU64,
    truncated: AtomicU64,
    swept: AtomicU64,
}

struct Inner {
    config: StoreConfig,
    spaces: Spaces,
    pending: Mutex<Pending>,
    wake: Condvar,
    counters: Counters,
    /// Held by the writer's commit and by a sweep: one of them changes
    /// the totals at a time.
    commit: Mutex<()>,
    notify: watch::Sender<u64>,
}

/// The embedded log store. Dropping it stops the writer after the queued
/// appends are written.
pub struct EmbeddedLogStore {
    inner: Arc<Inner>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

const TOTALS: &[u8] = b"totals";

impl EmbeddedLogStore {
    pub fn open(config: StoreConfig) -> Result<EmbeddedLogStore, LogError> {
        let spaces = open_spaces(&config.dir)?;
        let counters = Counters::default();
        if let Some(v) = spaces.meta.get(TOTALS).map_err(store_err(&config.dir))? {
            let at = |i: usize| {
                v.get(i * 8..i * 8 + 8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_le_bytes)
                    .unwrap_or(0)
            };
            counters.next_block.store(at(0), Ordering::Relaxed);
            counters.raw.store(at(1), Ordering::Relaxed);
            counters.stored.store(at(2), Ordering::Relaxed);
            counters.lines.store(at(3), Ordering::Relaxed);
        }
        let inner = Arc::new(Inner {
            config,
            spaces,
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            counters,
            commit: Mutex::new(()),
            notify: watch::channel(0).0,
        });
        let for_writer = Arc::clone(&inner);
        let writer = std::thread::Builder::new()
            .name("tally-logstore-writer".into())
            .spawn(move || for_writer.run_writer())
            .map_err(|e| LogError::Invalid(format!("cannot start the log writer: {e}")))?;
        Ok(EmbeddedLogStore {
            inner,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// The configuration the store was opened with.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }
}

fn open_spaces(dir: &Path) -> Result<Spaces, LogError> {
    let err = store_err(dir);
    let db = Database::builder(dir).open().map_err(&err)?;
    let plain = KeyspaceCreateOptions::default;
    let blocks = db
        .keyspace("blocks", || {
            // Blocks are zstd already: fjall stores them as they are.
            KeyspaceCreateOptions::default().with_kv_separation(Some(
                KvSeparationOptions::default().compression(fjall::CompressionType::None),
            ))
        })
        .map_err(&err)?;
    Ok(Spaces {
        blocks,
        times: db.keyspace("times", plain).map_err(&err)?,
        ids: db.keyspace("ids", plain).map_err(&err)?,
        idblocks: db.keyspace("idblocks", plain).map_err(&err)?,
        instances: db.keyspace("instances", plain).map_err(&err)?,
        meta: db.keyspace("meta", plain).map_err(&err)?,
        db,
    })
}

fn store_err(dir: &Path) -> impl Fn(fjall::Error) -> LogError + '_ {
    move |source| LogError::Store {
        path: dir.display().to_string(),
        source,
    }
}

impl Drop for EmbeddedLogStore {
    fn drop(&mut self) {
        if let Ok(mut p) = self.inner.pending.lock() {
            p.stopping = true;
        }
        self.inner.wake.notify_all();
        if let Some(writer) = self.writer.lock().ok().and_then(|mut w| w.take()) {
            let _ = writer.join();
        }
    }
}

impl Inner {
    fn retention(&self, project: &str) -> Duration {
        self.config
            .retention
            .get(project)
            .copied()
            .unwrap_or(self.config.default_retention)
    }

    fn err(&self) -> impl Fn(fjall::Error) -> LogError + '_ {
        store_err(&self.config.dir)
    }

    /// Queues a job if the bounds allow it.
    fn enqueue(&self, job: Job, bytes: usize) -> Result<(), LogError> {
        let mut p = self.pending.lock().map_err(|_| LogError::Stopped)?;
        if p.stopping {
            return Err(LogError::Stopped);
        }
        if p.bytes + bytes > self.config.max_pending_bytes && p.bytes > 0 {
            return Err(busy("the log store's write queue is full".into()));
        }
        for (id, n) in &job.shares {
            let queued = p.per_instance.get(id).copied().unwrap_or(0);
            if queued + n > self.config.max_pending_instance_bytes && queued > 0 {
                return Err(busy(format!(
                    "instance {:?} of project {:?} has {queued} bytes of logs waiting to be written",
                    id.1, id.0
                )));
            }
        }
        for (id, n) in &job.shares {
            *p.per_instance.entry(id.clone()).or_default() += n;
        }
        p.bytes += bytes;
        p.jobs.push_back(job);
        drop(p);
        self.wake.notify_one();
        Ok(())
    }

    fn run_writer(&self) {
        loop {
            let jobs = {
                let Ok(mut p) = self.pending.lock() else {
                    return;
                };
                while p.jobs.is_empty() && !p.stopping {
                    p = match self.wake.wait(p) {
                        Ok(p) => p,
                        Err(_) => return,
                    };
                }
                if p.jobs.is_empty() {
                    return;
                }
                std::mem::take(&mut p.jobs)
            };
            let released: Vec<(InstanceId, usize)> =
                jobs.iter().flat_map(|j| j.shares.clone()).collect();
            let outcome = self.write_round(&jobs);
            self.release(&released);
            self.answer(jobs, outcome);
        }
    }

    fn release(&self, shares: &[(InstanceId, usize)]) {
        if let Ok(mut p) = self.pending.lock() {
            for (id, n) in shares {
                p.bytes = p.bytes.saturating_sub(*n);
                if let Some(q) = p.per_instance.get_mut(id) {
                    *q = q.saturating_sub(*n);
                    if *q == 0 {
                        p.per_instance.remove(id);
                    }
                }
            }
        }
    }

    fn answer(&self, jobs: VecDeque<Job>, outcome: Result<Vec<AppendReport>, LogError>) {
        match outcome {
            Ok(reports) => {
                // Followers first: whoever learns of an append from its
                // answer finds the change already announced.
                self.notify
                    .send_modify(|n| *n = self.counters.appended.load(Ordering::Relaxed));
                for (job, report) in jobs.into_iter().zip(reports) {
                    let _ = job.reply.send(Ok(report));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "writing instance logs failed; the appends are refused");
                let why = e.to_string();
                for job in jobs {
                    let _ = job.reply.send(Err(LogError::Invalid(why.clone())));
                }
            }
        }
    }
}

fn busy(why: String) -> LogError {
    LogError::Busy {
        why,
        retry_after: Duration::from_secs(1),
    }
}

fn encode_totals(t: [u64; 4]) -> Vec<u8> {
    t.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn decode_instance(v: &[u8]) -> Option<InstanceInfo> {
    let newest = i64::from_le_bytes(v.get(..8)?.try_into().ok()?);
    let workload = String::from_utf8(v[8..].to_vec()).ok()?;
    Some(InstanceInfo {
        instance: String::new(),
        workload: (!workload.is_empty()).then_some(workload),
        newest_nanos: newest,
    })
}

impl LogStore for EmbeddedLogStore {
    fn append(&self, mut records: Vec<LogRecord>) -> Result<AppendTicket, LogError> {
        let mut truncated = 0;
        for r in &mut records {
            truncated += u64::from(admit(r)?);
        }
        let mut shares: HashMap<(&str, &str), usize> = HashMap::new();
        for r in &records {
            // Each line costs its text and a fixed overhead, so a flood of
            // empty lines is bounded too.
            *shares.entry((&r.project, &r.instance)).or_default() += r.line.len() + 32;
        }
        let bytes = shares.values().sum();
        let shares: Vec<(InstanceId, usize)> = shares
            .into_iter()
            .map(|((p, i), n)| ((p.to_owned(), i.to_owned()), n))
            .collect();
        let (reply, ticket) = oneshot::channel();
        if records.is_empty() {
            let _ = reply.send(Ok(AppendReport::default()));
            return Ok(ticket);
        }
        let job = Job {
            records,
            shares,
            truncated,
            reply,
        };
        self.inner.enqueue(job, bytes)?;
        Ok(ticket)
    }

    fn read(&self, query: &LogQuery) -> Result<LogPage, LogError> {
        self.inner.read(query)
    }

    fn instances(&self, project: Option<&str>) -> Result<Vec<(String, InstanceInfo)>, LogError> {
        self.inner.instances_of(project)
    }

    fn sweep(&self, now_nanos: i64) -> Result<u64, LogError> {
        self.inner.sweep(now_nanos)
    }

    fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        Stats {
            disk_bytes: self.inner.spaces.db.disk_space().unwrap_or(0),
            raw_bytes: c.raw.load(Ordering::Relaxed),
            block_bytes: c.stored.load(Ordering::Relaxed),
            lines: c.lines.load(Ordering::Relaxed),
            appended_lines: c.appended.load(Ordering::Relaxed),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            truncated: c.truncated.load(Ordering::Relaxed),
            swept_blocks: c.swept.load(Ordering::Relaxed),
        }
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.notify.subscribe()
    }
}
