//! The single writer. Every change to the log and the catalog, and every
//! dedupe decision, goes through this thread, so they are serialised
//! without locks on the data itself.
//!
//! Ingest requests that queue up while a commit is in flight are taken
//! together as one *group*: each event is decided new or a duplicate
//! (against the group, the tail's dedupe entries, then the store's), the
//! new ones appended to the log in one fjall batch, one fsync; what they
//! mean for derived state (rollup deltas sorted and merged once, dedupe
//! and quarantine entries, new dictionary entries) becomes one
//! [`TailChunk`] handed to the tail; then every request in the group is
//! answered. Rollups are not written
//! here but by the materialiser ([`crate::materialise`]), behind the
//! answer. When the tail holds more than `max_unmaterialised_events`, the
//! writer waits for it before taking the next group (backpressure).
//!
//! Catalog changes and voids are commands like ingest; each first drains
//! the tail (materialises it here, under the derived store's lock), so it
//! sees a materialised store and every acknowledged event is measured with
//! the catalog it was acknowledged under. When no command waits, the
//! thread runs one step of backfill, garbage collection or dedupe pruning,
//! so a long rebuild never holds up ingest. What needs no serialising is
//! done off the thread: events arrive [`Prepared`] and go back with the
//! answer to be freed by the caller; the thread only decides and merges.
//!
//! A void retracts the event from SUM, COUNT and AVG buckets and rebuilds
//! meters of other aggregations from the log, each under a generation of
//! its own. A Retired meter is rebuilt only up to
//! `MeterState::retired_from`; one Retired before that was recorded is not
//! rebuilt (it would lose its history): it keeps counting the event, and
//! the answer names it (`still_counted_by`).

use std::collections::HashMap;
use std::ops::ControlFlow;

use rustc_hash::FxHashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fjall::PersistMode;
use jiff::Timestamp;
use tally_ledger::{
    Applied, ApplyAction, ApplyMode, IngestOutcome, LedgerError, MetersByType, QuarantineNotice,
    VoidOutcome, VoidRecord, VoidRequest,
};
use tally_meter::{AggState, CompiledMeter, Level, Sample, Unmeterable};
use tally_model::{CloudEvent, Kind, Manifest, MeterPhase};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::block::Record;
use crate::dedupe::{DedupeIndex, LogConfirm};
use crate::dict::WriterDict;
use crate::keys::{self, MeterState, QuarantineEntry};
use crate::known::{KnownKeys, Scan};
use crate::log::EventLog;
use crate::materialise::{self, Deltas, FjallDerived};
use crate::tail::TailChunk;
use crate::{Shared, StoreError};

mod dedupe;
pub(crate) mod upgrade;

/// Most events taken into one group commit.
const MAX_GROUP_EVENTS: usize = 64 * 1024;
/// Log positions read per backfill step; ingest requests run between steps.
const BACKFILL_SPAN: u64 = 100_000;
/// Events per tail chunk when the log is replayed at open.
const REPLAY_CHUNK: usize = 50_000;
/// Keys removed per garbage-collection step.
const GARBAGE_CHUNK: usize = 50_000;
/// Keys added to a [`KnownKeys`] filter per step of its opening scan.
const KNOWN_SCAN_CHUNK: usize = 200_000;

/// A reply channel for an ingest request: the outcome, and the events
/// handed back, so that freeing them is the caller's work and not the
/// writer's.
pub(crate) type IngestReply = oneshot::Sender<(Result<IngestOutcome, LedgerError>, Vec<Prepared>)>;
/// One ingest request waiting for its group commit.
type IngestRequest = (Vec<Prepared>, IngestReply);

/// An event with what the writer needs of it computed beforehand, on the
/// caller's thread: its dedupe key, its log record, and what each meter of
/// its type samples of it. The writer, which serialises every change, only
/// decides and merges.
pub(crate) struct Prepared {
    pub event: CloudEvent,
    pub dedupe_key: Vec<u8>,
    pub ingested_at: Timestamp,
    pub record: Record,
    /// The meters the samples were taken with; the writer samples again if
    /// its meters have changed since.
    pub meters: Arc<MetersByType>,
    /// One per meter of the event's type, in `meters`' order.
    pub samples: Vec<Result<Sample, Unmeterable>>,
}

impl Prepared {
    pub fn new(
        event: CloudEvent,
        ingested_at: Timestamp,
        meters: &Arc<MetersByType>,
    ) -> Result<Prepared, StoreError> {
        let samples = meters
            .get(&event.kind)
            .map(|of_type| of_type.iter().map(|m| m.sample(&event)).collect())
            .unwrap_or_default();
        Ok(Prepared {
            dedupe_key: keys::dedupe_key(&event.source, &event.id),
            record: Record::new(ingested_at, &event)?,
            ingested_at,
            event,
            meters: Arc::clone(meters),
            samples,
        })
    }

    /// The sample the `index`th meter of the event's type in `meters` took
    /// beforehand; `None` when `meters` are not those it was taken with.
    fn sample(
        &self,
        meters: &Arc<MetersByType>,
        index: usize,
    ) -> Option<&Result<Sample, Unmeterable>> {
        self.samples
            .get(index)
            .filter(|_| Arc::ptr_eq(meters, &self.meters))
    }
}

pub(crate) enum Command {
    Ingest {
        events: Vec<Prepared>,
        reply: IngestReply,
    },
    Apply {
        manifest: Box<Manifest>,
        mode: ApplyMode,
        reply: oneshot::Sender<Result<Applied, LedgerError>>,
    },
    Void {
        request: VoidRequest,
        reply: oneshot::Sender<Result<VoidOutcome, LedgerError>>,
    },
    Delete {
        kind: Kind,
        name: String,
        reply: oneshot::Sender<Result<(), LedgerError>>,
    },
    /// Writes the dedupe keys held in memory as a run now.
    FlushDedupe {
        reply: oneshot::Sender<Result<(), LedgerError>>,
    },
    /// Panics the writer thread: how tests stand in for a writer bug.
    #[cfg(test)]
    Panic,
}

pub(crate) struct Writer {
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Command>,
    next_seq: u64,
    meters: Arc<MetersByType>,
    horizon_seconds: i64,
    /// The memory budget of in-memory key filters (see `StoreConfig`).
    key_filter_bytes: u64,
    last_prune: Timestamp,
    /// Interned subjects and group values.
    dict: WriterDict,
    /// The rollups; shared with the materialiser thread.
    derived: Arc<Mutex<FjallDerived>>,
    /// Most events acknowledged but not yet materialised; ingest waits
    /// beyond it.
    max_tail_events: u64,
    /// Whether the rollup key filter's opening scan is done.
    rollups_scanned: bool,
}

/// Whether an event is a duplicate of one the index holds that has not
/// expired by `now`.
fn is_duplicate<R: fjall::Readable>(
    shared: &Shared,
    index: &DedupeIndex,
    prepared: &Prepared,
    now: Timestamp,
    confirm: &mut LogConfirm<'_, R>,
) -> Result<bool, StoreError> {
    let event = &prepared.event;
    let pair = (
        prepared.dedupe_key.as_slice(),
        event.source.as_str(),
        event.id.as_str(),
    );
    let now = now.as_second();
    let found = index.find(&shared.keyspaces.dedupe, pair, now, confirm)?;
    Ok(found.is_some_and(|(_, expires)| expires > now))
}

/// What a group commit (or a stretch of the log replayed at open) means for
/// derived state, gathered for its [`TailChunk`].
struct ChunkBuilder {
    first_seq: u64,
    events: u64,
    deltas: Deltas,
    dedupe: Vec<(Vec<u8>, [u8; 16])>,
    quarantine: Vec<(Vec<u8>, Vec<u8>)>,
}

impl ChunkBuilder {
    fn new(first_seq: u64) -> ChunkBuilder {
        ChunkBuilder {
            first_seq,
            events: 0,
            deltas: Deltas::default(),
            dedupe: Vec::new(),
            quarantine: Vec::new(),
        }
    }
}

fn storage(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(e.to_string())
}

impl Writer {
    pub(crate) fn new(
        shared: Arc<Shared>,
        rx: mpsc::Receiver<Command>,
        next_seq: u64,
        config: &crate::StoreConfig,
        dict: WriterDict,
        derived: Arc<Mutex<FjallDerived>>,
    ) -> Writer {
        let meters = Arc::clone(&shared.read_state().meters_by_type);
        Writer {
            shared,
            rx,
            next_seq,
            meters,
            horizon_seconds: config.dedupe_horizon.as_secs(),
            key_filter_bytes: config.key_filter_bytes,
            last_prune: Timestamp::UNIX_EPOCH,
            dict,
            derived,
            max_tail_events: config.max_unmaterialised_events.max(1),
            rollups_scanned: false,
        }
    }

    /// Folds every acknowledged event into the store (on this thread, under
    /// the derived store's lock), so what follows sees a materialised store.
    fn drain(&mut self) -> Result<(), StoreError> {
        let derived = Arc::clone(&self.derived);
        let mut derived = materialise::lock(&derived);
        materialise::drain(&self.shared.tail, &mut *derived)?;
        Ok(())
    }

    /// The dedupe index, to change.
    fn dedupe_index(&self) -> std::sync::RwLockWriteGuard<'_, DedupeIndex> {
        self.shared
            .dedupe
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The expiry (seconds) an event's dedupe entry gets: the horizon from
    /// its ingest or its time, whichever is later. Computed from what the
    /// log holds, so a replay gives the same.
    fn dedupe_expiry(&self, ingested_at: Timestamp, event: &CloudEvent) -> i64 {
        ingested_at.as_second().max(event.time.as_second()) + self.horizon_seconds
    }

    pub(crate) fn run(mut self) {
        let mut held: Option<Command> = None;
        loop {
            let command = match held.take() {
                Some(c) => c,
                None => match self.rx.try_recv() {
                    Ok(c) => c,
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        match self.background_step() {
                            Ok(true) => continue,
                            Ok(false) => {}
                            Err(e) => {
                                // Retry soon rather than wait for the next
                                // command: a stalled backfill keeps a meter
                                // unanswerable.
                                warn!(error = %e, "background maintenance step failed; retrying in 1 s");
                                std::thread::sleep(std::time::Duration::from_secs(1));
                                continue;
                            }
                        }
                        match self.rx.blocking_recv() {
                            Some(c) => c,
                            None => break,
                        }
                    }
                },
            };
            // Dictionary ids handed out by an operation that failed before
            // its commit are free again.
            self.dict.roll_back();
            match command {
                Command::Ingest { events, reply } => {
                    let mut group = vec![(events, reply)];
                    let mut size = group[0].0.len();
                    while size < MAX_GROUP_EVENTS {
                        match self.rx.try_recv() {
                            Ok(Command::Ingest { events, reply }) => {
                                size += events.len();
                                group.push((events, reply));
                            }
                            Ok(other) => {
                                held = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.ingest_group(group);
                }
                Command::Apply {
                    manifest,
                    mode,
                    reply,
                } => {
                    let _ = reply.send(self.apply(*manifest, mode));
                }
                Command::Void { request, reply } => {
                    let _ = reply.send(self.void(request));
                }
                Command::Delete { kind, name, reply } => {
                    let _ = reply.send(self.delete(kind, &name));
                }
                Command::FlushDedupe { reply } => {
                    let shared = Arc::clone(&self.shared);
                    let (end, now) = (self.next_seq, Timestamp::now().as_second());
                    let flushed =
                        self.dedupe_index()
                            .flush(&shared.db, &shared.keyspaces.dedupe, end, now);
                    let _ = reply.send(flushed.map_err(storage));
                }
                #[cfg(test)]
                Command::Panic => panic!("the writer was asked to panic"),
            }
        }
        // What was acknowledged is folded in before the store is let go.
        if let Err(e) = self.drain() {
            warn!(error = %e, "materialising the tail at shutdown failed; it is replayed from the log when the store opens");
        }
        self.shared.tail.close();
        // Recent dedupe keys go into a run, so the next open reads less log.
        let (end, now) = (self.next_seq, Timestamp::now().as_second());
        let shared = Arc::clone(&self.shared);
        if let Err(e) = self
            .dedupe_index()
            .flush(&shared.db, &shared.keyspaces.dedupe, end, now)
        {
            warn!(error = %e, "writing the recent dedupe keys at shutdown failed; they are read from the log when the store opens");
        }
        if let Err(e) = self.shared.db.persist(PersistMode::SyncAll) {
            warn!(error = %e, "final persist failed");
        }
    }

    // ---- ingest -----------------------------------------------------------

    fn ingest_group(&mut self, group: Vec<IngestRequest>) {
        let start_seq = self.next_seq;
        let results: Vec<Result<IngestOutcome, LedgerError>> =
            match self.wait_for_room().and_then(|()| self.write_group(&group)) {
                Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
                Err(e) => {
                    self.next_seq = start_seq;
                    self.dict.roll_back();
                    warn!(error = %e, "group commit failed; requests answered with an error");
                    let err = storage(e);
                    group.iter().map(|_| Err(err.clone())).collect()
                }
            };
        for (result, (events, reply)) in results.into_iter().zip(group) {
            let _ = reply.send((result, events));
        }
    }

    /// Backpressure: waits while the materialiser is too far behind, so
    /// the tail's memory stays bounded. Requests queue meanwhile (and the
    /// server's admission budget answers `429` on the platform contract).
    fn wait_for_room(&self) -> Result<(), StoreError> {
        let tail = &self.shared.tail;
        while !tail.wait_for_room(self.max_tail_events, Duration::from_secs(1)) {
            if !self.shared.materialiser_alive.load(Ordering::SeqCst) {
                return Err(StoreError::Corrupt(
                    "the materialiser has stopped; the ledger takes no more events",
                ));
            }
        }
        Ok(())
    }

    /// Decides which of a group's events are new, appends them to the log,
    /// syncs, and hands what they mean for derived state (their dedupe
    /// entries among it) to the tail. Only then are the requests answered.
    fn write_group(&mut self, group: &[IngestRequest]) -> Result<Vec<IngestOutcome>, StoreError> {
        let shared = Arc::clone(&self.shared);
        let now = Timestamp::now();
        let mut records: Vec<&Record> = Vec::new();
        let mut chunk = ChunkBuilder::new(self.next_seq);
        let mut seen: FxHashSet<&[u8]> = FxHashSet::default();
        let mut outcomes = Vec::with_capacity(group.len());
        let generations = self.generations();
        let snapshot = shared.db.snapshot();
        let mut confirm = LogConfirm {
            reader: shared.log.reader(&snapshot),
            horizon_seconds: self.horizon_seconds,
        };
        let dedupe = shared
            .dedupe
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (events, _) in group {
            let mut outcome = IngestOutcome::default();
            for (index, prepared) in events.iter().enumerate() {
                let (event, dkey) = (&prepared.event, prepared.dedupe_key.as_slice());
                if seen.contains(dkey)
                    || is_duplicate(&shared, &dedupe, prepared, now, &mut confirm)?
                {
                    outcome.duplicates += 1;
                    continue;
                }
                let seq = self.next_seq;
                self.next_seq += 1;
                let expires = self.dedupe_expiry(prepared.ingested_at, event);
                records.push(&prepared.record);
                chunk
                    .dedupe
                    .push((dkey.to_vec(), keys::dedupe_value(seq, expires)));
                seen.insert(dkey);
                outcome.accepted += 1;
                self.measure_accepted(
                    event,
                    seq,
                    Some(prepared),
                    &generations,
                    &mut chunk,
                    |meter, entry| {
                        outcome.quarantined.push(notice(index, event, meter, entry));
                    },
                )?;
            }
            outcome.warnings = self.deprecation_warnings(events);
            outcomes.push(outcome);
        }
        drop(dedupe);
        shared.log.append(chunk.first_seq, &records)?;
        self.push_chunk(chunk)?;
        // The events are acknowledged whatever happens here: a run that
        // cannot be written now is written with a later group.
        let mut index = self.dedupe_index();
        if index.is_full()
            && let Err(e) = index.flush(
                &shared.db,
                &shared.keyspaces.dedupe,
                self.next_seq,
                now.as_second(),
            )
        {
            warn!(error = %e, "writing a dedupe run failed; the keys stay in memory");
        }
        let too_many = index.runs() > crate::dedupe::MAX_RUNS;
        drop(index);
        // Merges wait for an idle writer, unless runs pile up past the
        // bound because the writer is never idle.
        if too_many && let Err(e) = self.merge_dedupe_step() {
            warn!(error = %e, "merging dedupe runs failed; they stay as they are");
        }
        let stats = &shared.stats;
        let mut counters = (0, 0, 0);
        for o in &outcomes {
            counters.0 += o.accepted;
            counters.1 += o.duplicates;
            counters.2 += o.quarantined.len() as u64;
        }
        stats.accepted.fetch_add(counters.0, Ordering::Relaxed);
        stats.duplicates.fetch_add(counters.1, Ordering::Relaxed);
        stats.quarantined.fetch_add(counters.2, Ordering::Relaxed);
        stats.group_commits.fetch_add(1, Ordering::Relaxed);
        Ok(outcomes)
    }

    /// Warnings for the Deprecated meters a request's events feed, one per
    /// meter.
    fn deprecation_warnings(&self, events: &[Prepared]) -> Vec<String> {
        let mut deprecated: Vec<&Arc<CompiledMeter>> = Vec::new();
        for prepared in events {
            for meter in self.meters.get(&prepared.event.kind).into_iter().flatten() {
                if meter.phase() == MeterPhase::Deprecated
                    && !deprecated.iter().any(|m| Arc::ptr_eq(m, meter))
                {
                    deprecated.push(meter);
                }
            }
        }
        deprecated
            .iter()
            .map(|meter| {
                format!(
                    "meter {:?} is Deprecated: it still measures events of type {:?}, but will be retired",
                    meter.key,
                    meter.event_type()
                )
            })
            .collect()
    }

    /// Measures an event just appended at `seq` with every meter of its
    /// type, into `chunk`; `quarantined` is told each (meter, entry) the
    /// event is quarantined with (meter "" when no meter reads its type).
    /// Uses the samples taken beforehand when `prepared` has them.
    fn measure_accepted(
        &mut self,
        event: &CloudEvent,
        seq: u64,
        prepared: Option<&Prepared>,
        generations: &HashMap<String, u64>,
        chunk: &mut ChunkBuilder,
        mut quarantined: impl FnMut(&str, &QuarantineEntry),
    ) -> Result<(), StoreError> {
        chunk.events += 1;
        let Some(meters) = self.meters.get(&event.kind) else {
            let entry = QuarantineEntry {
                reason: "UNKNOWN_METER".into(),
                message: format!("no meter reads events of type {:?}", event.kind),
                event_type: event.kind.clone(),
            };
            chunk
                .quarantine
                .push((keys::quarantine_key("", seq)?, json(&entry)?));
            quarantined("", &entry);
            return Ok(());
        };
        for (meter_index, meter) in meters.iter().enumerate() {
            let Some(generation) = generations.get(meter.key.as_str()) else {
                continue;
            };
            let sampled_now;
            let sampled = match prepared.and_then(|p| p.sample(&self.meters, meter_index)) {
                Some(sampled) => sampled,
                None => {
                    sampled_now = meter.sample(event);
                    &sampled_now
                }
            };
            if let Some(entry) = measure_sample(
                sampled,
                meter,
                *generation,
                event,
                seq,
                &mut chunk.deltas,
                &mut self.dict,
            )? {
                chunk
                    .quarantine
                    .push((keys::quarantine_key(&meter.key, seq)?, json(&entry)?));
                quarantined(&meter.key, &entry);
            }
        }
        Ok(())
    }

    /// Hands a chunk to the tail, with the dictionary entries it introduced
    /// (readers learn them first). Nothing is pushed for no events.
    fn push_chunk(&mut self, chunk: ChunkBuilder) -> Result<(), StoreError> {
        if chunk.events == 0 {
            return Ok(());
        }
        let dict = self.dict.take_committed();
        if !dict.is_empty() {
            self.shared
                .dict
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .extend(dict.clone());
        }
        let mut quarantine = chunk.quarantine;
        quarantine.sort_unstable();
        let mut dedupe = chunk.dedupe;
        let mut index = self.dedupe_index();
        for (key, value) in &dedupe {
            let (seq, expires) = keys::decode_dedupe(value)?;
            index.insert(key, seq, expires);
        }
        drop(index);
        dedupe.sort_unstable();
        let chunk = Arc::new(TailChunk {
            first_seq: chunk.first_seq,
            end_seq: self.next_seq,
            events: chunk.events,
            acked_at: Instant::now(),
            rollups: chunk.deltas.merged()?,
            dedupe,
            quarantine,
            dict,
        });
        self.shared.tail.push(chunk);
        Ok(())
    }

    /// Puts the log past the materialised position back into the tail, as
    /// the group commits that wrote it did (when the store opens). Every
    /// event there was acknowledged under the catalog the store holds:
    /// catalog changes and voids materialise the whole tail first.
    pub(crate) fn replay_tail(&mut self) -> Result<u64, StoreError> {
        let shared = Arc::clone(&self.shared);
        let from = crate::tail::materialised(&shared.db.snapshot(), &shared.keyspaces.meta)?;
        let generations = self.generations();
        let end = self.next_seq;
        let mut chunk = ChunkBuilder::new(from);
        shared.log.read(from, end, None, &mut |logged| {
            let (seq, event) = (logged.seq, &logged.event);
            let expires = self.dedupe_expiry(logged.ingested_at, event);
            chunk.dedupe.push((
                keys::dedupe_key(&event.source, &event.id),
                keys::dedupe_value(seq, expires),
            ));
            self.measure_accepted(event, seq, None, &generations, &mut chunk, |_, _| {})?;
            if chunk.events as usize == REPLAY_CHUNK {
                let next = seq + 1;
                self.push_replayed(std::mem::replace(&mut chunk, ChunkBuilder::new(next)), next)?;
            }
            Ok(ControlFlow::Continue(()))
        })?;
        self.push_replayed(chunk, end)?;
        Ok(end - from)
    }

    fn push_replayed(&mut self, chunk: ChunkBuilder, end_seq: u64) -> Result<(), StoreError> {
        let next_seq = std::mem::replace(&mut self.next_seq, end_seq);
        let pushed = self.push_chunk(chunk);
        self.next_seq = next_seq;
        pushed
    }

    fn generations(&self) -> HashMap<String, u64> {
        self.shared
            .read_state()
            .meters
            .iter()
            .map(|(name, state)| (name.clone(), state.generation))
            .collect()
    }

    /// Folds rollup deltas into their stored states (see
    /// [`FjallDerived::fold`]) and commits the batch. The tail must have
    /// been drained: the batch may name dictionary ids.
    fn commit_with_deltas(
        &mut self,
        mut batch: fjall::OwnedWriteBatch,
        deltas: Deltas,
    ) -> Result<(), StoreError> {
        let derived = Arc::clone(&self.derived);
        let mut derived = materialise::lock(&derived);
        let merged_states = derived.fold(&mut batch, deltas.merged()?)?;
        self.commit(batch)?;
        derived.remember(merged_states);
        Ok(())
    }

    /// Commits a batch with the dictionary entries it introduces, then
    /// hands those entries to readers.
    fn commit(&mut self, mut batch: fjall::OwnedWriteBatch) -> Result<(), StoreError> {
        self.dict
            .write_fresh(&mut batch, &self.shared.keyspaces.meta);
        batch.commit()?;
        let committed = self.dict.take_committed();
        if !committed.is_empty() {
            self.shared
                .dict
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .extend(committed);
        }
        Ok(())
    }

    // ---- catalog ----------------------------------------------------------

    fn apply(&mut self, manifest: Manifest, mode: ApplyMode) -> Result<Applied, LedgerError> {
        let shared = Arc::clone(&self.shared);
        // Every acknowledged event is measured with the catalog it was
        // acknowledged under, and what follows sees a materialised store.
        self.drain().map_err(storage)?;
        let ks = &shared.keyspaces;
        let plan = shared
            .read_state()
            .catalog
            .plan_apply(manifest, mode, Timestamp::now())?;
        if plan.action == ApplyAction::Unchanged {
            let manifest = shared.with_status(plan.manifest);
            return Ok(Applied {
                action: plan.action,
                manifest,
            });
        }
        let kind = plan.manifest.typed_kind()?;
        let name = plan.manifest.metadata.name.clone();
        let mut batch = shared.db.batch().durability(Some(PersistMode::SyncAll));
        batch.insert(
            &ks.catalog,
            keys::catalog_key(kind, &name),
            json(&plan.manifest).map_err(storage)?,
        );
        let mut new_state = None;
        let mut retired = None;
        // Retiring a meter: remember where in the log it stopped accepting
        // events, so a rebuild measures what came before.
        if kind == Kind::MeterDefinition
            && plan.rebuild_meter.is_none()
            && let Some(mut meter_state) = shared.read_state().meters.get(&name).copied()
            && meter_state.retired_from.is_none()
            && tally_model::MeterDefinition::from_manifest(&plan.manifest)?.phase
                == MeterPhase::Retired
        {
            meter_state.retired_from = Some(self.next_seq);
            batch.insert(
                &ks.meta,
                keys::meter_state_key(&name),
                json(&meter_state).map_err(storage)?,
            );
            retired = Some((name.clone(), meter_state));
        }
        if let Some(meter) = &plan.rebuild_meter {
            let generation = self.next_generations(&mut batch, 1).map_err(storage)?;
            let state = self
                .begin_rebuild(&mut batch, meter, generation)
                .map_err(storage)?;
            // Events that had no meter before may belong to this one now; the
            // backfill reads them from the log.
            let event_type = tally_model::MeterDefinition::from_manifest(&plan.manifest)?
                .event_type()
                .to_owned();
            self.clear_unknown_meter_entries(&mut batch, &event_type)
                .map_err(storage)?;
            new_state = Some((meter.clone(), state));
        }
        batch.commit().map_err(storage)?;
        {
            let mut state = shared.write_state();
            state.catalog.commit(plan.manifest.clone())?;
            if let Some((meter, meter_state)) = new_state {
                info!(meter = %meter, generation = meter_state.generation, events = meter_state.backfill_until, "meter (re)built from the log");
                state.meters.insert(meter, meter_state);
            }
            if let Some((meter, meter_state)) = retired {
                info!(meter = %meter, from_seq = ?meter_state.retired_from, "meter retired");
                state.meters.insert(meter, meter_state);
            }
            self.meters = state.compile_meters();
        }
        for meter in &plan.reprocess_meters {
            self.reprocess_quarantine(meter).map_err(storage)?;
        }
        let manifest = shared.with_status(plan.manifest);
        Ok(Applied {
            action: plan.action,
            manifest,
        })
    }

    fn delete(&mut self, kind: Kind, name: &str) -> Result<(), LedgerError> {
        let shared = Arc::clone(&self.shared);
        self.drain().map_err(storage)?;
        let ks = &shared.keyspaces;
        shared.read_state().catalog.plan_delete(kind, name)?;
        let mut batch = shared.db.batch().durability(Some(PersistMode::SyncAll));
        batch.remove(&ks.catalog, keys::catalog_key(kind, name));
        let meter_state = (kind == Kind::MeterDefinition)
            .then(|| shared.read_state().meters.get(name).copied())
            .flatten();
        if let Some(state) = meter_state {
            batch.remove(&ks.meta, keys::meter_state_key(name));
            batch.insert(
                &ks.meta,
                format!("{}{}", keys::GARBAGE_PREFIX, state.generation),
                [],
            );
            self.clear_quarantine(&mut batch, name).map_err(storage)?;
        }
        batch.commit().map_err(storage)?;
        let mut state = shared.write_state();
        state.catalog.remove(kind, name);
        if kind == Kind::MeterDefinition {
            state.meters.remove(name);
        }
        self.meters = state.compile_meters();
        Ok(())
    }

    /// Starts building `meter` anew under a fresh generation, read from the
    /// log by the background backfill; the old generation becomes garbage.
    fn begin_rebuild(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        meter: &str,
        generation: u64,
    ) -> Result<MeterState, StoreError> {
        let ks = &self.shared.keyspaces;
        let retired_from = self
            .shared
            .read_state()
            .meters
            .get(meter)
            .and_then(|old| old.retired_from);
        let state = MeterState {
            generation,
            backfill_until: self.next_seq,
            backfilled_to: 0,
            retired_from,
        };
        batch.insert(&ks.meta, keys::meter_state_key(meter), json(&state)?);
        if let Some(old) = self.shared.read_state().meters.get(meter) {
            batch.insert(
                &ks.meta,
                format!("{}{}", keys::GARBAGE_PREFIX, old.generation),
                [],
            );
        }
        self.clear_quarantine(batch, meter)?;
        Ok(state)
    }

    // ---- voiding ----------------------------------------------------------

    /// Takes one event out of every meter, durably, with an audit record.
    /// SUM, COUNT and AVG buckets subtract it in the same batch; a meter of
    /// another aggregation is rebuilt from the log, which skips voided events.
    fn void(&mut self, request: VoidRequest) -> Result<VoidOutcome, LedgerError> {
        let shared = Arc::clone(&self.shared);
        // The event's buckets and quarantine entries are in the store.
        self.drain().map_err(storage)?;
        let ks = &shared.keyspaces;
        let not_found = || {
            LedgerError::not_found(
                "event",
                format!("source {:?} id {:?}", request.source, request.id),
            )
        };
        let dkey = keys::dedupe_key(&request.source, &request.id);
        let snapshot = shared.db.snapshot();
        let mut confirm = LogConfirm {
            reader: shared.log.reader(&snapshot),
            horizon_seconds: self.horizon_seconds,
        };
        let pair = (
            dkey.as_slice(),
            request.source.as_str(),
            request.id.as_str(),
        );
        let (seq, _) = self
            .dedupe_index()
            .find(&ks.dedupe, pair, i64::MIN, &mut confirm)
            .map_err(storage)?
            .ok_or_else(not_found)?;
        if let Some(raw) = ks.voids.get(keys::seq_key(seq)).map_err(storage)? {
            let record = serde_json::from_slice(&raw).map_err(storage)?;
            return Ok(VoidOutcome {
                already_voided: true,
                record,
                still_counted_by: Vec::new(),
            });
        }
        let event = shared
            .log
            .get(seq)
            .map_err(storage)?
            .ok_or_else(not_found)?
            .event;
        let record = VoidRecord {
            seq,
            source: event.source.clone(),
            id: event.id.clone(),
            event_type: event.kind.clone(),
            subject: event.subject.clone(),
            event_time: event.time,
            reason: request.reason,
            voided_by: request.voided_by,
            voided_at: Timestamp::now(),
        };
        let mut batch = shared.db.batch().durability(Some(PersistMode::SyncAll));
        batch.insert(
            &ks.voids,
            keys::seq_key(seq),
            json(&record).map_err(storage)?,
        );
        // The change feed reads voids in the order they were recorded.
        let ordinal = crate::changes::next_void_ordinal(ks).map_err(storage)?;
        batch.insert(&ks.void_order, keys::seq_key(ordinal), keys::seq_key(seq));
        batch.remove(
            &ks.quarantine,
            keys::quarantine_key("", seq).map_err(storage)?,
        );
        let mut retractions = Deltas::default();
        let mut rebuilds = Vec::new();
        let mut still_counted_by = Vec::new();
        let meters = self.meters.get(&event.kind).cloned().unwrap_or_default();
        for meter in meters {
            let quarantine_key = keys::quarantine_key(&meter.key, seq).map_err(storage)?;
            // A quarantined event was never rolled up by this meter.
            let quarantined = ks
                .quarantine
                .get(&quarantine_key)
                .map_err(storage)?
                .is_some();
            batch.remove(&ks.quarantine, quarantine_key);
            let Some(state) = shared.read_state().meters.get(&meter.key).copied() else {
                continue;
            };
            // A backfill that has not reached the event will skip it.
            let pending =
                !state.ready() && seq >= state.backfilled_to && seq < state.backfill_until;
            if quarantined || pending {
                continue;
            }
            if !AggState::invertible(meter.aggregation()) {
                // A rebuild measures only what the meter accepts now, and a
                // Retired meter accepts nothing: it would lose its history.
                if meter.phase() == MeterPhase::Retired && state.retired_from.is_none() {
                    still_counted_by.push(meter.key.clone());
                } else {
                    rebuilds.push(meter.key.clone());
                }
                continue;
            }
            // What the meter rolled up, Retired since or not. Should that no
            // longer be computable, rebuilding is the exact way out.
            match meter.sample_in_any_phase(&event) {
                Ok(sample) => add_sample(
                    &meter,
                    state.generation,
                    &event,
                    seq,
                    &sample,
                    &mut retractions,
                    &mut self.dict,
                )
                .map_err(storage)?,
                Err(_) if meter.phase() == MeterPhase::Retired => {
                    still_counted_by.push(meter.key.clone());
                }
                Err(_) => rebuilds.push(meter.key.clone()),
            }
        }
        let mut rebuilt = Vec::new();
        if !rebuilds.is_empty() {
            // Every rebuilt meter needs a generation of its own.
            let first = self
                .next_generations(&mut batch, rebuilds.len() as u64)
                .map_err(storage)?;
            for (generation, meter) in (first..).zip(&rebuilds) {
                let state = self
                    .begin_rebuild(&mut batch, meter, generation)
                    .map_err(storage)?;
                rebuilt.push((meter.clone(), state));
            }
        }
        self.commit_with_retractions(batch, retractions)
            .map_err(storage)?;
        shared
            .voided
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(seq);
        {
            let mut state = shared.write_state();
            for (meter, meter_state) in rebuilt {
                info!(meter = %meter, generation = meter_state.generation, "meter rebuilt from the log after a void");
                state.meters.insert(meter, meter_state);
            }
        }
        info!(seq, source = %record.source, id = %record.id, by = %record.voided_by, "event voided");
        Ok(VoidOutcome {
            already_voided: false,
            record,
            still_counted_by,
        })
    }

    /// Like [`Writer::commit_with_deltas`], but takes the states back out;
    /// a bucket left with no event is removed.
    fn commit_with_retractions(
        &mut self,
        mut batch: fjall::OwnedWriteBatch,
        retractions: Deltas,
    ) -> Result<(), StoreError> {
        let derived = Arc::clone(&self.derived);
        let mut derived = materialise::lock(&derived);
        let updated = derived.retract(&mut batch, retractions.merged()?)?;
        self.commit(batch)?;
        derived.remember(updated);
        Ok(())
    }

    /// Reserves `count` new meter generations in `batch`; returns the first.
    /// Reserve all of a batch's generations in one call: the counter is read
    /// from the store, which does not see the batch.
    fn next_generations(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        count: u64,
    ) -> Result<u64, StoreError> {
        let meta = &self.shared.keyspaces.meta;
        let current = match meta.get(keys::GENERATION_COUNTER)? {
            Some(v) => keys::read_u64(&v)?,
            None => 0,
        };
        batch.insert(
            meta,
            keys::GENERATION_COUNTER,
            (current + count).to_be_bytes(),
        );
        Ok(current + 1)
    }

    fn clear_quarantine(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        meter: &str,
    ) -> Result<(), StoreError> {
        let ks = &self.shared.keyspaces;
        for item in ks.quarantine.prefix(keys::quarantine_prefix(meter)?) {
            batch.remove(&ks.quarantine, item.key()?);
        }
        Ok(())
    }

    fn clear_unknown_meter_entries(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        event_type: &str,
    ) -> Result<(), StoreError> {
        let ks = &self.shared.keyspaces;
        for item in ks.quarantine.prefix(keys::quarantine_prefix("")?) {
            let (key, value) = item.into_inner()?;
            let entry: QuarantineEntry =
                serde_json::from_slice(&value).map_err(|e| StoreError::Decode(e.to_string()))?;
            if entry.event_type == event_type {
                batch.remove(&ks.quarantine, key);
            }
        }
        Ok(())
    }

    /// Looks again at a meter's quarantined events after the catalog changed;
    /// those now measurable are rolled up and leave the quarantine.
    fn reprocess_quarantine(&mut self, meter_name: &str) -> Result<(), StoreError> {
        let shared = Arc::clone(&self.shared);
        let ks = &shared.keyspaces;
        let Some(meter) = self.compiled(meter_name) else {
            return Ok(());
        };
        let Some(generation) = shared
            .read_state()
            .meters
            .get(meter_name)
            .map(|s| s.generation)
        else {
            return Ok(());
        };
        let mut batch = shared.db.batch().durability(Some(PersistMode::SyncAll));
        let mut deltas = Deltas::default();
        let mut released = 0u64;
        // Quarantine keys sort by seq within a meter: neighbours share blocks.
        let snapshot = shared.db.snapshot();
        let mut log = shared.log.reader(&snapshot);
        for item in ks.quarantine.prefix(keys::quarantine_prefix(meter_name)?) {
            let (key, value) = item.into_inner()?;
            let (_, seq) = keys::decode_quarantine_key(&key)?;
            let Some(logged) = log.get(seq)? else {
                continue;
            };
            let event = logged.event;
            match measure(&meter, generation, &event, seq, &mut deltas, &mut self.dict)? {
                None => {
                    batch.remove(&ks.quarantine, key);
                    released += 1;
                }
                Some(entry) => {
                    let old: QuarantineEntry = serde_json::from_slice(&value)
                        .map_err(|e| StoreError::Decode(e.to_string()))?;
                    if old != entry {
                        batch.insert(&ks.quarantine, key, json(&entry)?);
                    }
                }
            }
        }
        self.commit_with_deltas(batch, deltas)?;
        if released > 0 {
            info!(
                meter = meter_name,
                released, "quarantined events now measured"
            );
        }
        Ok(())
    }

    fn compiled(&self, name: &str) -> Option<Arc<CompiledMeter>> {
        self.meters
            .values()
            .flatten()
            .find(|m| m.key == name)
            .cloned()
    }

    // ---- background work ----------------------------------------------------

    /// One step of backfill, garbage collection, dedupe merging or pruning. Returns
    /// whether there may be more to do right away.
    fn background_step(&mut self) -> Result<bool, StoreError> {
        self.dict.roll_back();
        if self.known_step()? {
            return Ok(true);
        }
        if self.backfill_step()? {
            return Ok(true);
        }
        if self.garbage_step()? {
            return Ok(true);
        }
        if self.merge_dedupe_step()? {
            return Ok(true);
        }
        self.prune_step()
    }

    /// A step of the scan that puts the keys present at open into the
    /// [`KnownKeys`] filters; until it is done they answer "maybe".
    fn known_step(&mut self) -> Result<bool, StoreError> {
        let shared = Arc::clone(&self.shared);
        let ks = &shared.keyspaces;
        if !self.rollups_scanned {
            let derived = Arc::clone(&self.derived);
            let mut derived = materialise::lock(&derived);
            scan_step("rollups", &ks.rollups, &mut derived.known_rollups)?;
            self.rollups_scanned = *derived.known_rollups.scan() == Scan::Done;
            return Ok(true);
        }
        Ok(false)
    }

    fn backfill_step(&mut self) -> Result<bool, StoreError> {
        let shared = Arc::clone(&self.shared);
        let ks = &shared.keyspaces;
        let pending = shared
            .read_state()
            .meters
            .iter()
            .find(|(_, s)| !s.ready())
            .map(|(n, s)| (n.clone(), *s));
        let Some((name, mut state)) = pending else {
            return Ok(false);
        };
        let Some(meter) = self.compiled(&name) else {
            return Ok(false);
        };
        // The batch may name dictionary ids the tail introduced.
        self.drain()?;
        let mut batch = shared.db.batch();
        let mut deltas = Deltas::default();
        // A step reads a bounded stretch of the log, whatever share of it
        // is the meter's type.
        let next = state
            .backfill_until
            .min(state.backfilled_to.saturating_add(BACKFILL_SPAN));
        let mut quarantined = Vec::new();
        shared.log.read(
            state.backfilled_to,
            next,
            Some(meter.event_type()),
            &mut |logged| {
                let (seq, event) = (logged.seq, &logged.event);
                if shared.is_voided(seq) {
                    return Ok(ControlFlow::Continue(()));
                }
                // Before the meter was Retired, it measured events in any phase.
                let sampled = if state.retired_from.is_some_and(|from| seq < from) {
                    meter.sample_in_any_phase(event)
                } else {
                    meter.sample(event)
                };
                let entry = measure_sample(
                    &sampled,
                    &meter,
                    state.generation,
                    event,
                    seq,
                    &mut deltas,
                    &mut self.dict,
                )?;
                if let Some(entry) = entry {
                    quarantined.push((keys::quarantine_key(&name, seq)?, json(&entry)?));
                }
                Ok(ControlFlow::Continue(()))
            },
        )?;
        for (key, value) in quarantined {
            batch.insert(&ks.quarantine, key, value);
        }
        state.backfilled_to = next;
        batch.insert(&ks.meta, keys::meter_state_key(&name), json(&state)?);
        self.commit_with_deltas(batch, deltas)?;
        if state.ready() {
            info!(meter = %name, "backfill complete");
        }
        shared.write_state().meters.insert(name, state);
        Ok(true)
    }

    fn garbage_step(&mut self) -> Result<bool, StoreError> {
        let ks = &self.shared.keyspaces;
        let Some(item) = ks.meta.prefix(keys::GARBAGE_PREFIX).next() else {
            return Ok(false);
        };
        let key = item.key()?;
        let generation: u64 = std::str::from_utf8(&key[keys::GARBAGE_PREFIX.len()..])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(StoreError::Corrupt("garbage key"))?;
        let mut batch = self.shared.db.batch();
        let mut removed = 0;
        for item in ks
            .rollups
            .prefix(keys::rollup_generation_prefix(generation)?)
            .take(GARBAGE_CHUNK)
        {
            batch.remove(&ks.rollups, item.key()?);
            removed += 1;
        }
        if removed < GARBAGE_CHUNK {
            batch.remove(&ks.meta, key);
        }
        batch.commit()?;
        Ok(true)
    }

    /// Deletes the dedupe runs that have wholly expired, at most hourly.
    fn prune_step(&mut self) -> Result<bool, StoreError> {
        let now = Timestamp::now();
        if now.as_second() - self.last_prune.as_second() < 3600 {
            return Ok(false);
        }
        self.last_prune = now;
        let shared = Arc::clone(&self.shared);
        self.dedupe_index()
            .drop_expired(&shared.db, &shared.keyspaces.dedupe, now.as_second())?;
        Ok(false)
    }
}

/// Adds the next keys of `keyspace` to `known`, past its scan's cursor.
fn scan_step(
    name: &str,
    keyspace: &fjall::Keyspace,
    known: &mut KnownKeys,
) -> Result<(), StoreError> {
    let Scan::From(cursor) = known.scan().clone() else {
        return Ok(());
    };
    let keys = match cursor {
        None => keyspace.iter(),
        Some(from) => keyspace.range(from..),
    };
    let mut last = None;
    let mut read = 0;
    for item in keys.take(KNOWN_SCAN_CHUNK) {
        let key = item.key()?;
        known.insert(&key);
        last = Some(key);
        read += 1;
    }
    match last {
        Some(last) if read == KNOWN_SCAN_CHUNK => {
            // The first key after `last`.
            let mut next = last.to_vec();
            next.push(0);
            known.set_scan(Scan::From(Some(next)));
        }
        _ => {
            known.set_scan(Scan::Done);
            info!(
                keyspace = name,
                bytes = known.bytes(),
                saturated = known.saturated(),
                "key filter ready"
            );
        }
    }
    Ok(())
}

/// Measures one event with one meter: adds its rollup deltas, or returns
/// the quarantine entry saying why it cannot be measured.
fn measure(
    meter: &CompiledMeter,
    generation: u64,
    event: &CloudEvent,
    seq: u64,
    deltas: &mut Deltas,
    dict: &mut WriterDict,
) -> Result<Option<QuarantineEntry>, StoreError> {
    measure_sample(
        &meter.sample(event),
        meter,
        generation,
        event,
        seq,
        deltas,
        dict,
    )
}

/// [`measure`] with the sampling already done (e.g. in any phase, for the
/// part of the log a meter read before it was Retired).
fn measure_sample(
    sampled: &Result<Sample, Unmeterable>,
    meter: &CompiledMeter,
    generation: u64,
    event: &CloudEvent,
    seq: u64,
    deltas: &mut Deltas,
    dict: &mut WriterDict,
) -> Result<Option<QuarantineEntry>, StoreError> {
    let sample = match sampled {
        Ok(sample) => sample,
        Err(reason) => {
            return Ok(Some(QuarantineEntry {
                reason: reason.code().into(),
                message: reason.to_string(),
                event_type: event.kind.clone(),
            }));
        }
    };
    add_sample(meter, generation, event, seq, sample, deltas, dict)?;
    Ok(None)
}

/// Adds one measured event's state to its minute, hour and day buckets.
fn add_sample(
    meter: &CompiledMeter,
    generation: u64,
    event: &CloudEvent,
    seq: u64,
    sample: &tally_meter::Sample,
    deltas: &mut Deltas,
    dict: &mut WriterDict,
) -> Result<(), StoreError> {
    let time_ns = event.time.as_nanosecond();
    let Some(state) = AggState::of_sample(meter.aggregation(), &sample.value, time_ns, seq) else {
        return Err(StoreError::Corrupt("sample does not fit aggregation"));
    };
    // Floor, not truncate: a pre-1970 time with a fraction belongs to the
    // earlier second's minute.
    let second = event.time.as_second() - i64::from(event.time.subsec_nanosecond() < 0);
    let subject = dict.subject(&event.subject)?;
    let groups = dict.groups(&sample.groups)?;
    for level in Level::ALL {
        let groups = if level == Level::Day {
            keys::ALL_GROUPS
        } else {
            groups
        };
        let key = keys::rollup_key(generation, level, subject, level.bucket(second), groups)?;
        deltas.add(key, state.clone())?;
    }
    Ok(())
}

fn notice(
    index: usize,
    event: &CloudEvent,
    meter: &str,
    entry: &QuarantineEntry,
) -> QuarantineNotice {
    QuarantineNotice {
        index,
        id: event.id.clone(),
        meter: meter.to_owned(),
        reason: entry.reason.clone(),
        message: entry.message.clone(),
    }
}

fn json(value: &impl serde::Serialize) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Encode(e.to_string()))
}
