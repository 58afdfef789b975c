//! The embedded usage ledger.
//!
//! One fjall database holds the event log (compressed columnar blocks
//! behind the [`EventLog`] trait, see [`log`]), the exact dedupe index, the
//! per-meter rollups, the quarantine and the catalog. The log is the truth:
//! one writer thread ([`writer`]) decides which events are duplicates
//! (against the dedupe index, [`dedupe`]: recent keys in memory, older ones
//! in immutable sorted runs written in bulk), appends the others in one
//! fsync'd batch and answers; rollups, quarantine and dictionary entries
//! are derived from the log behind
//! the answer, in bulk, by the materialiser ([`materialise`]), which records the
//! log position it included. What is acknowledged but not yet materialised
//! waits in memory ([`tail`]); reads merge a snapshot of the store with it,
//! so an acknowledged event is in the very next answer. After `kill -9` the
//! store opens at its recorded position and replays the rest of the log.

mod block;
mod changes;
mod dedupe;
mod dict;
mod keys;
mod known;
pub mod log;
mod materialise;
mod read;
mod resources;
mod tail;
mod writer;

pub use block::Record as LogRecord;
pub use log::{BlockLog, EventLog, LogPosition, LoggedEvent};
pub use resources::EmbeddedResources;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use fjall::{Database, Keyspace, KeyspaceCreateOptions};
use futures::future::BoxFuture;
use jiff::{SignedDuration, Timestamp};
use serde_json::json;
use tally_ledger::{
    Admission, Applied, ApplyMode, Catalog, ChangeCursor, ChangePage, EventFilter, EventPage,
    IngestOutcome, Ledger, LedgerError, LedgerStats, MeterQuery, QuarantineFilter, QuarantinePage,
    QueryResult, ResourceStore, StatefulResult, VoidOutcome, VoidPage, VoidRequest,
};
use tally_model::{CloudEvent, Kind, KindClass, Manifest};
use tokio::sync::{mpsc, oneshot};

use keys::MeterState;
use writer::{Command, Writer};

/// Storage-level failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("fjall: {0}")]
    Fjall(#[from] fjall::Error),
    #[error("corrupt store: {0}")]
    Corrupt(&'static str),
    #[error("encoding: {0}")]
    Encode(String),
    #[error("decoding: {0}")]
    Decode(String),
    #[error("{0} longer than {1} bytes")]
    TooLong(&'static str, usize),
    #[error(transparent)]
    State(tally_meter::StateError),
    #[error("{0}")]
    Ledger(#[from] LedgerError),
    #[error(
        "the data directory holds store format {found}, this build reads format {expected}; \
         re-ingest the events into a new data directory with this build"
    )]
    Format { found: u64, expected: u64 },
}

/// Settings of the embedded store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    /// How long (source, id) pairs are remembered.
    pub dedupe_horizon: SignedDuration,
    /// Events older than this when they arrive are refused.
    pub max_lateness: SignedDuration,
    /// Events dated further ahead of the clock than this are refused.
    pub max_future: SignedDuration,
    /// Bytes of fjall's block cache. Once a store outgrows it, the writer's
    /// read-modify-writes of rollup buckets read (and checksum) blocks from
    /// disk, which is what bounds ingest at a few million events.
    pub cache_bytes: u64,
    /// Most events acknowledged but not yet materialised (a few hundred
    /// bytes of memory each: rollup deltas and the dedupe entry). Past it,
    /// ingest waits for the materialiser.
    pub max_unmaterialised_events: u64,
    /// How long acknowledged events may wait for a bulk worth
    /// materialising to gather.
    pub materialise_patience: std::time::Duration,
    /// Most bytes each in-memory key filter (dedupe run filters, rollup
    /// keys) may take; past it the filter steps aside and reads go to the
    /// store. A quarter of it bounds the dedupe keys kept exactly in memory
    /// before they are written as a run, so the dedupe decision's memory
    /// is bounded whatever the horizon holds.
    pub key_filter_bytes: u64,
}

/// The default block cache: 256 MiB.
pub const DEFAULT_CACHE_BYTES: u64 = 256 << 20;

/// The default budget of each key filter: 256 MiB (about 170 M keys).
pub const DEFAULT_KEY_FILTER_BYTES: u64 = 256 << 20;

/// The default bound of the tail: 500,000 events (under 200 MiB).
pub const DEFAULT_MAX_UNMATERIALISED_EVENTS: u64 = 500_000;

impl StoreConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            data_dir: data_dir.into(),
            dedupe_horizon: SignedDuration::from_hours(32 * 24),
            max_lateness: SignedDuration::from_hours(32 * 24),
            max_future: tally_ledger::DEFAULT_MAX_FUTURE,
            cache_bytes: DEFAULT_CACHE_BYTES,
            max_unmaterialised_events: DEFAULT_MAX_UNMATERIALISED_EVENTS,
            materialise_patience: std::time::Duration::from_millis(100),
            key_filter_bytes: DEFAULT_KEY_FILTER_BYTES,
        }
    }
}

pub(crate) struct Keyspaces {
    pub dedupe: Keyspace,
    pub rollups: Keyspace,
    pub quarantine: Keyspace,
    pub voids: Keyspace,
    /// Voids in the order they were recorded (see [`changes`]).
    pub void_order: Keyspace,
    pub catalog: Keyspace,
    pub meta: Keyspace,
}

#[derive(Default)]
pub(crate) struct Stats {
    pub accepted: AtomicU64,
    pub duplicates: AtomicU64,
    pub quarantined: AtomicU64,
    pub group_commits: AtomicU64,
}

/// What readers need to know about the catalog; changed only by the writer.
pub(crate) struct ReadState {
    pub catalog: Catalog,
    pub meters: HashMap<String, MeterState>,
    /// The catalog's meters by event type, compiled; replaced (never
    /// changed in place) by the writer whenever the catalog changes, so
    /// that events can be sampled before they reach the writer.
    pub meters_by_type: Arc<tally_ledger::MetersByType>,
}

impl ReadState {
    /// Compiles the catalog's meters again after it changed, and returns
    /// them for the writer to keep.
    pub(crate) fn compile_meters(&mut self) -> Arc<tally_ledger::MetersByType> {
        self.meters_by_type = Arc::new(self.catalog.meters_by_type());
        Arc::clone(&self.meters_by_type)
    }
}

pub(crate) struct Shared {
    pub db: Database,
    pub keyspaces: Keyspaces,
    /// The log: event blocks.
    pub log: BlockLog,
    state: RwLock<ReadState>,
    pub stats: Stats,
    pub writer_alive: AtomicBool,
    pub materialiser_alive: AtomicBool,
    /// Acknowledged events not yet materialised.
    pub tail: tail::Tail,
    /// Sequence numbers of voided events (rare; kept in memory so log scans
    /// skip them without a lookup). Changed only by the writer.
    pub voided: RwLock<HashSet<u64>>,
    /// Interned subjects and group values; extended only by the writer.
    pub dict: RwLock<dict::ReaderDict>,
    /// The dedupe index; changed only by the writer.
    pub dedupe: RwLock<dedupe::DedupeIndex>,
}

impl Shared {
    pub fn read_state(&self) -> RwLockReadGuard<'_, ReadState> {
        self.state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn is_voided(&self, seq: u64) -> bool {
        self.voided
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(&seq)
    }

    pub fn write_state(&self) -> RwLockWriteGuard<'_, ReadState> {
        self.state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A manifest with its `status` filled in.
    pub fn with_status(&self, mut manifest: Manifest) -> Manifest {
        if manifest.kind == Kind::MeterDefinition.as_str() {
            let state = self
                .read_state()
                .meters
                .get(&manifest.metadata.name)
                .copied();
            let (status, reason, message) = match state {
                Some(s) if s.ready() => (
                    "True",
                    "Measuring",
                    "rollups are up to date with the log".to_owned(),
                ),
                Some(s) => (
                    "False",
                    "Backfilling",
                    format!(
                        "reading the log: {} of {} events",
                        s.backfilled_to, s.backfill_until
                    ),
                ),
                None => ("Unknown", "Pending", "not yet built".to_owned()),
            };
            manifest.status = Some(json!({
                "conditions": [{"type": "Ready", "status": status, "reason": reason, "message": message}]
            }));
        }
        manifest
    }
}

/// The format of the store: ours, or format 3, 4, 5 or 6, which are
/// upgraded when the store opens. Refuses any other; marks a new store with
/// ours.
fn check_format(db: &Database, keyspaces: &Keyspaces, empty_log: bool) -> Result<u64, StoreError> {
    let found = match keyspaces.meta.get(keys::FORMAT_KEY)? {
        Some(raw) => keys::read_u64(&raw)?,
        None if empty_log && keyspaces.catalog.is_empty()? => {
            let mut batch = db.batch().durability(Some(fjall::PersistMode::SyncAll));
            batch.insert(
                &keyspaces.meta,
                keys::FORMAT_KEY,
                keys::FORMAT.to_be_bytes(),
            );
            batch.insert(&keyspaces.meta, tail::MATERIALISED_KEY, 0u64.to_be_bytes());
            batch.commit()?;
            return Ok(keys::FORMAT);
        }
        None => 1,
    };
    if found == keys::FORMAT || (3..=6).contains(&found) {
        Ok(found)
    } else {
        Err(StoreError::Format {
            found,
            expected: keys::FORMAT,
        })
    }
}

/// The embedded ledger. Cheap to clone; all clones share one writer.
#[derive(Clone)]
pub struct EmbeddedLedger {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Command>,
    config: Arc<StoreConfig>,
    resources: EmbeddedResources,
}

fn open_keyspace(db: &Database, name: &str) -> Result<Keyspace, StoreError> {
    Ok(db.keyspace(name, KeyspaceCreateOptions::default)?)
}

/// The `log` keyspace: its values are compressed blocks already, so fjall
/// does not compress them again.
fn open_log_keyspace(db: &Database) -> Result<Keyspace, StoreError> {
    let none = fjall::config::CompressionPolicy::all(fjall::CompressionType::None);
    Ok(db.keyspace("log", || {
        KeyspaceCreateOptions::default().data_block_compression_policy(none)
    })?)
}

/// Format 7 writes rollup values compactly and still reads format-6 values
/// (see [`keys::encode_rollup_value`]): a format-6 store only needs its
/// mark. Its values are rewritten as their buckets are written again.
fn upgrade_from_format_6(db: &Database, keyspaces: &Keyspaces) -> Result<(), StoreError> {
    let mut batch = db.batch().durability(Some(fjall::PersistMode::SyncAll));
    batch.insert(
        &keyspaces.meta,
        keys::FORMAT_KEY,
        keys::FORMAT.to_be_bytes(),
    );
    batch.commit()?;
    Ok(())
}

impl EmbeddedLedger {
    /// Opens (or creates) the store in `config.data_dir`, recovers it, and
    /// starts its writer thread.
    pub fn open(config: StoreConfig) -> Result<EmbeddedLedger, StoreError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            StoreError::Encode(format!("creating {}: {e}", config.data_dir.display()))
        })?;
        let db = Database::builder(config.data_dir.join("fjall"))
            .cache_size(config.cache_bytes)
            .open()?;
        let keyspaces = Keyspaces {
            dedupe: open_keyspace(&db, "dedupe")?,
            rollups: open_keyspace(&db, "rollups")?,
            quarantine: open_keyspace(&db, "quarantine")?,
            voids: open_keyspace(&db, "voids")?,
            void_order: open_keyspace(&db, "void_order")?,
            catalog: open_keyspace(&db, "catalog")?,
            meta: open_keyspace(&db, "meta")?,
        };
        let resources = EmbeddedResources::open(db.clone(), open_keyspace(&db, "resources")?)?;
        let mut manifests = Vec::new();
        for item in keyspaces.catalog.iter() {
            let value = item.value()?;
            manifests.push(
                serde_json::from_slice::<Manifest>(&value)
                    .map_err(|e| StoreError::Decode(e.to_string()))?,
            );
        }
        let catalog = Catalog::load(manifests)?;
        let mut meters = HashMap::new();
        for (name, _) in catalog.meters() {
            if let Some(raw) = keyspaces.meta.get(keys::meter_state_key(name))? {
                let state: MeterState =
                    serde_json::from_slice(&raw).map_err(|e| StoreError::Decode(e.to_string()))?;
                meters.insert(name.to_owned(), state);
            }
        }
        let log = BlockLog::new(db.clone(), open_log_keyspace(&db)?);
        let old_log = writer::upgrade::old_log(&db)?;
        let empty = log.end()? == 0 && old_log.as_ref().is_none_or(|(_, len)| *len == 0);
        let format = check_format(&db, &keyspaces, empty)?;
        // A store of format 5 or older keeps one key per event: into blocks.
        if let Some((old_log, _)) = old_log {
            writer::upgrade::log_into_blocks(&db, &log, old_log)?;
        }
        let next_seq = log.end()?;
        if format != keys::FORMAT {
            writer::upgrade::record_materialised(&db, &keyspaces, next_seq, format)?;
        }
        if format == 6 {
            upgrade_from_format_6(&db, &keyspaces)?;
        }
        let mut voided = HashSet::new();
        for item in keyspaces.voids.iter() {
            voided.insert(keys::read_u64(&item.key()?)?);
        }
        let dict_entries = dict::load(&keyspaces.meta)?;
        let writer_dict = dict::WriterDict::new(&dict_entries);
        changes::order_unordered_voids(&db, &keyspaces)?;
        let shared = Arc::new(Shared {
            voided: RwLock::new(voided),
            dict: RwLock::new(dict::ReaderDict::new(dict_entries)),
            db,
            keyspaces,
            log,
            state: RwLock::new(ReadState {
                meters_by_type: Arc::new(catalog.meters_by_type()),
                catalog,
                meters,
            }),
            stats: Stats::default(),
            writer_alive: AtomicBool::new(true),
            materialiser_alive: AtomicBool::new(true),
            tail: tail::Tail::default(),
            dedupe: RwLock::new(dedupe::DedupeIndex::new(
                0,
                usize::try_from(config.key_filter_bytes).unwrap_or(usize::MAX),
            )),
        });
        let filter_budget = usize::try_from(config.key_filter_bytes).unwrap_or(usize::MAX);
        let derived = Arc::new(Mutex::new(materialise::FjallDerived::new(
            Arc::clone(&shared),
            filter_budget,
        )));
        let (tx, rx) = mpsc::channel(1024);
        let mut writer = Writer::new(
            Arc::clone(&shared),
            rx,
            next_seq,
            &config,
            writer_dict,
            Arc::clone(&derived),
        );
        if format == 3 {
            writer.upgrade_from_format_3()?;
        }
        writer.rebuild_dedupe_if_lost()?;
        let replayed = writer.replay_tail()?;
        if replayed > 0 {
            tracing::info!(
                events = replayed,
                "replayed the log past the materialised position"
            );
        }
        start_threads(&shared, writer, derived, config.materialise_patience)?;
        Ok(EmbeddedLedger {
            shared,
            tx,
            config: Arc::new(config),
            resources,
        })
    }

    /// The resource store kept in the same database.
    pub fn resources(&self) -> EmbeddedResources {
        self.resources.clone()
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    /// The keyspaces, by name.
    fn named_keyspaces(&self) -> [(&'static str, &Keyspace); 9] {
        let ks = &self.shared.keyspaces;
        [
            ("log", self.shared.log.keyspace()),
            ("dedupe", &ks.dedupe),
            ("rollups", &ks.rollups),
            ("quarantine", &ks.quarantine),
            ("voids", &ks.voids),
            ("void_order", &ks.void_order),
            ("catalog", &ks.catalog),
            ("meta", &ks.meta),
            ("resources", self.resources.keyspace()),
        ]
    }

    /// Bytes of tables on disk by keyspace (the journal and memtables not
    /// counted), for benchmarks and diagnostics.
    pub fn disk_by_keyspace(&self) -> Vec<(&'static str, u64)> {
        self.named_keyspaces()
            .into_iter()
            .map(|(name, keyspace)| (name, keyspace.disk_space()))
            .collect()
    }

    /// Flushes every keyspace's memtable to tables and compacts each into
    /// one run, waiting for both: what the store takes once compaction has
    /// caught up. For benchmarks: it rewrites every table.
    /// Writes the dedupe keys held in memory as a run now (they are
    /// otherwise written when memory reaches its budget, and at shutdown).
    pub async fn flush_dedupe(&self) -> Result<(), LedgerError> {
        self.call(|reply| Command::FlushDedupe { reply }).await
    }

    /// The dedupe index's keys held in memory and in runs, and the bytes
    /// of the runs' filters.
    pub fn dedupe_sizes(&self) -> (usize, u64, usize) {
        self.shared
            .dedupe
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .sizes()
    }

    /// The dedupe index's number of runs.
    pub fn dedupe_runs(&self) -> usize {
        self.shared
            .dedupe
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .runs()
    }

    pub fn compact(&self) -> Result<(), StoreError> {
        for (_, keyspace) in self.named_keyspaces() {
            keyspace.rotate_memtable_and_wait()?;
            keyspace.major_compact()?;
        }
        Ok(())
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, LedgerError>>) -> Command,
    ) -> Result<T, LedgerError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| LedgerError::Storage("the writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| LedgerError::Storage("the writer stopped before answering".into()))?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Shared) -> Result<T, LedgerError> + Send + 'static,
    ) -> Result<T, LedgerError> {
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || f(&shared))
            .await
            .map_err(|e| LedgerError::Storage(format!("read task failed: {e}")))?
    }
}

/// Starts the writer and the materialiser threads.
fn start_threads(
    shared: &Arc<Shared>,
    writer: Writer,
    derived: Arc<Mutex<materialise::FjallDerived>>,
    patience: std::time::Duration,
) -> Result<(), StoreError> {
    let stopped = WriterStopped(Arc::clone(shared));
    std::thread::Builder::new()
        .name("tally-writer".into())
        .spawn(move || {
            let _stopped = stopped;
            writer.run();
        })
        .map_err(|e| StoreError::Encode(format!("starting the writer thread: {e}")))?;
    let materialiser = Arc::clone(shared);
    std::thread::Builder::new()
        .name("tally-material".into())
        .spawn(move || {
            let _stopped = MaterialiserStopped(Arc::clone(&materialiser));
            materialise::run(&materialiser.tail, &derived, patience);
        })
        .map_err(|e| StoreError::Encode(format!("starting the materialiser thread: {e}")))?;
    Ok(())
}

/// Marks the materialiser stopped when its thread ends; the writer then
/// refuses events it could not bound, and [`Ledger::ready`] is false.
struct MaterialiserStopped(Arc<Shared>);

impl Drop for MaterialiserStopped {
    fn drop(&mut self) {
        self.0.materialiser_alive.store(false, Ordering::SeqCst);
        if std::thread::panicking() {
            tracing::error!(
                "the ledger's materialiser panicked; the ledger takes no more writes until the process restarts"
            );
        }
    }
}

/// Marks the writer stopped when its thread ends, by returning or by a
/// panic, so [`Ledger::ready`] (and with it `/healthz` and `/readyz`) tells
/// an orchestrator to restart the process.
struct WriterStopped(Arc<Shared>);

impl Drop for WriterStopped {
    fn drop(&mut self) {
        self.0.writer_alive.store(false, Ordering::SeqCst);
        if std::thread::panicking() {
            tracing::error!(
                "the ledger's writer panicked; the ledger takes no more writes until the process restarts"
            );
        }
    }
}

impl EmbeddedLedger {
    /// The attribution of usage to billing accounts, when `query` needs it.
    fn attribution_for(&self, query: &MeterQuery) -> Option<tally_model::billing::Attribution> {
        let attributes = [
            query.group_by.iter().any(|g| g == read::BILLING_ACCOUNT),
            query.filter_group_by.contains_key(read::BILLING_ACCOUNT),
        ];
        attributes
            .contains(&true)
            .then(|| self.resources.snapshot().attribution())
    }
}

impl Ledger for EmbeddedLedger {
    fn admission(&self) -> Admission {
        Admission {
            max_lateness: self.config.max_lateness,
            max_future: self.config.max_future,
        }
    }

    fn ingest(&self, events: Vec<CloudEvent>) -> BoxFuture<'_, Result<IngestOutcome, LedgerError>> {
        Box::pin(async move {
            if events.is_empty() {
                return Ok(IngestOutcome::default());
            }
            self.admission().check(&events, Timestamp::now())?;
            let now = Timestamp::now();
            let meters = Arc::clone(&self.shared.read_state().meters_by_type);
            let events = events
                .into_iter()
                .map(|event| writer::Prepared::new(event, now, &meters))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| LedgerError::Storage(e.to_string()))?;
            let (reply, answer) = oneshot::channel();
            self.tx
                .send(Command::Ingest { events, reply })
                .await
                .map_err(|_| LedgerError::Storage("the writer has stopped".into()))?;
            let (outcome, events) = answer
                .await
                .map_err(|_| LedgerError::Storage("the writer stopped before answering".into()))?;
            drop(events);
            outcome
        })
    }

    fn apply(
        &self,
        manifest: Manifest,
        mode: ApplyMode,
    ) -> BoxFuture<'_, Result<Applied, LedgerError>> {
        Box::pin(self.call(move |reply| Command::Apply {
            manifest: Box::new(manifest),
            mode,
            reply,
        }))
    }

    fn delete(&self, kind: Kind, name: String) -> BoxFuture<'_, Result<(), LedgerError>> {
        Box::pin(self.call(move |reply| Command::Delete { kind, name, reply }))
    }

    fn get(&self, kind: Kind, name: String) -> BoxFuture<'_, Result<Manifest, LedgerError>> {
        Box::pin(async move {
            let manifest = self.shared.read_state().catalog.get(kind, &name).cloned();
            manifest
                .map(|m| self.shared.with_status(m))
                .ok_or_else(|| LedgerError::not_found(kind, name))
        })
    }

    fn list(&self, kind: Kind) -> BoxFuture<'_, Result<Vec<Manifest>, LedgerError>> {
        Box::pin(async move {
            let manifests: Vec<Manifest> = self
                .shared
                .read_state()
                .catalog
                .list(kind)
                .cloned()
                .collect();
            Ok(manifests
                .into_iter()
                .map(|m| self.shared.with_status(m))
                .collect())
        })
    }

    fn query(
        &self,
        meter: String,
        query: MeterQuery,
    ) -> BoxFuture<'_, Result<QueryResult, LedgerError>> {
        let attribution = self.attribution_for(&query);
        Box::pin(async move {
            query.validate()?;
            self.read(move |shared| read::query(shared, &meter, &query, attribution.as_ref()))
                .await
        })
    }

    fn query_states(
        &self,
        meter: String,
        query: MeterQuery,
    ) -> BoxFuture<'_, Result<StatefulResult, LedgerError>> {
        let attribution = self.attribution_for(&query);
        Box::pin(async move {
            query.validate()?;
            self.read(move |shared| {
                read::query_states(shared, &meter, &query, attribution.as_ref())
            })
            .await
        })
    }

    fn usage_span(
        &self,
        meter: String,
    ) -> BoxFuture<'_, Result<Option<(Timestamp, Timestamp)>, LedgerError>> {
        Box::pin(self.read(move |shared| read::usage_span(shared, &meter)))
    }

    fn list_events(&self, filter: EventFilter) -> BoxFuture<'_, Result<EventPage, LedgerError>> {
        Box::pin(async move {
            filter.validate()?;
            self.read(move |shared| read::list_events(shared, &filter))
                .await
        })
    }

    fn list_quarantine(
        &self,
        filter: QuarantineFilter,
    ) -> BoxFuture<'_, Result<QuarantinePage, LedgerError>> {
        Box::pin(self.read(move |shared| read::list_quarantine(shared, &filter)))
    }

    fn void(&self, request: VoidRequest) -> BoxFuture<'_, Result<VoidOutcome, LedgerError>> {
        Box::pin(async move {
            request.validate()?;
            self.call(move |reply| Command::Void { request, reply })
                .await
        })
    }

    fn list_voids(
        &self,
        limit: usize,
        cursor: Option<String>,
    ) -> BoxFuture<'_, Result<VoidPage, LedgerError>> {
        Box::pin(self.read(move |shared| read::list_voids(shared, limit, cursor.as_deref())))
    }

    fn changes(
        &self,
        meter: String,
        cursor: ChangeCursor,
        limit: usize,
    ) -> BoxFuture<'_, Result<ChangePage, LedgerError>> {
        Box::pin(self.read(move |shared| changes::changes(shared, &meter, cursor, limit)))
    }

    fn stats(&self) -> LedgerStats {
        let s = &self.shared.stats;
        let state = self.shared.read_state();
        // Read before the total, so that a write in between (which grows
        // both) cannot leave the journal larger than the total.
        let journal_bytes = self.shared.db.journal_disk_space().unwrap_or(0);
        let (lag_events, lag) = self.shared.tail.lag();
        LedgerStats {
            materialise_lag_events: lag_events,
            materialise_lag_seconds: lag.as_secs_f64(),
            events_accepted_total: s.accepted.load(Ordering::Relaxed),
            events_duplicate_total: s.duplicates.load(Ordering::Relaxed),
            events_quarantined_total: s.quarantined.load(Ordering::Relaxed),
            group_commits_total: s.group_commits.load(Ordering::Relaxed),
            disk_bytes: self.shared.db.disk_space().unwrap_or(0),
            journal_bytes,
            // No derived store outside this one: nothing to fail inserting.
            insert_errors: Default::default(),
            kinds: {
                let resources = self.resources.snapshot();
                Kind::ALL
                    .into_iter()
                    .map(|k| {
                        let count = match k.class() {
                            KindClass::Catalog => state.catalog.list(k).count(),
                            _ => resources.count(k),
                        };
                        (k.as_str().to_owned(), count as u64)
                    })
                    .collect()
            },
        }
    }

    fn backlog(&self) -> tally_ledger::Backlog {
        tally_ledger::Backlog {
            events: self.shared.tail.lag().0,
            // The writer waits while the tail holds this many (at least 1).
            max_events: self.config.max_unmaterialised_events.max(1),
        }
    }

    fn ready(&self) -> bool {
        self.shared.writer_alive.load(Ordering::SeqCst)
            && self.shared.materialiser_alive.load(Ordering::SeqCst)
            && !self.tx.is_closed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_writer_that_panics_is_not_ready_and_answers_errors() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = EmbeddedLedger::open(StoreConfig::new(dir.path())).unwrap();
        assert!(ledger.ready());
        ledger.tx.send(Command::Panic).await.unwrap();
        for _ in 0..500 {
            if !ledger.ready() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(!ledger.ready());
        let void = VoidRequest {
            source: "s".into(),
            id: "1".into(),
            reason: "r".into(),
            voided_by: "test".into(),
        };
        let Err(LedgerError::Storage(message)) = ledger.void(void).await else {
            panic!("a stopped writer must answer a storage error");
        };
        assert!(message.contains("writer"), "{message}");
    }
}
