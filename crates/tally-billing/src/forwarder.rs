//! The forwarder: plans window totals per (meter, account, window,
//! dimensions), records the plan durably, hands the records to its lanes
//! (`tally-delivery` sinks, `maxInFlight` requests at once), and
//! checkpoints what the provider acknowledged. One pass plans at most one
//! new revision per (customer, meter, window, dimension values): every late
//! event and void that touched a window since the last pass is coalesced
//! into that one correction, since every record is billed by the provider.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::Bytes;
use jiff::Timestamp;
use rust_decimal::Decimal;
use serde::Serialize;
use tally_delivery::{
    BatchOutcome, BatchResult, EgressPolicy, Item, Registry, RetryConfig, Secret,
};
use tokio::sync::mpsc;

use crate::attribution::{Attribution, Owner};
use crate::config::{BillingSink, ForwardedMeter};
use crate::health::{Health, LastError};
use crate::lanes::{LaneHooks, Lanes};
use crate::progress::{
    Counters, DeadLetterRecord, MeterCursor, Plan, ProgressError, ProgressStore, RecordProgress,
    Revision, RevisionState, Unattributed, revision_key, split_revision_key,
};
use crate::record::{RecordKey, UsageRecord};
use crate::source::{ChangeCursor, SourceError, UsageQuery, UsageSource};
use crate::usage::{UsageQueryError, UsageReader};

/// Why forwarding failed. Never carries the API key.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The progress store failed.
    #[error("billing sink {sink}: {source}")]
    Progress {
        /// The sink's name.
        sink: String,
        /// The failure.
        source: ProgressError,
    },
    /// The usage source failed.
    #[error("billing sink {sink}, meter {meter}: {source}")]
    Source {
        /// The sink's name.
        sink: String,
        /// The meter.
        meter: String,
        /// The failure.
        source: SourceError,
    },
    /// The delivery sink could not be started or refused records.
    #[error("billing sink {sink}: delivery: {message}")]
    Delivery {
        /// The sink's name.
        sink: String,
        /// What went wrong.
        message: String,
    },
    /// The provider's own usage could not be read (reconciliation).
    #[error("billing sink {sink}: {source}")]
    ProviderUsage {
        /// The sink's name.
        sink: String,
        /// The failure (status and Tally's words, never the answer).
        source: UsageQueryError,
    },
}

/// Everything a forwarder needs besides its usage source and attribution.
#[derive(Debug, Clone)]
pub struct ForwarderConfig {
    /// The sink's resource.
    pub sink: BillingSink,
    /// The provider's API key (from `apiKeySecretRef`).
    pub api_key: Secret,
    /// The meters to forward.
    pub meters: Vec<ForwardedMeter>,
    /// The sink's own directory for its progress store.
    pub data_dir: PathBuf,
    /// On a first start, windows before this are never forwarded.
    pub start_at: Timestamp,
    /// Retries; default: 429 and every 5xx retried (and timeouts), forever,
    /// with the sink's request timeout; other answers dead-letter the batch.
    pub retry: RetryConfig,
    /// Most records queued in memory for delivery.
    pub max_queued_records: u64,
    /// Most windows of one meter first planned in one pass (bounds a pass
    /// after a long stop).
    pub max_new_windows_per_pass: usize,
    /// Addresses the provider's endpoint may have besides global unicast
    /// ones (default: none): the sink sends through an [`EgressGuard`], and a
    /// refused destination dead-letters its batch (reason
    /// `destination refused`) until the operator allows it and retries.
    pub egress: EgressPolicy,
}

impl ForwarderConfig {
    /// A configuration with the default retry policy and limits.
    pub fn new(
        sink: BillingSink,
        api_key: Secret,
        meters: Vec<ForwardedMeter>,
        data_dir: PathBuf,
        start_at: Timestamp,
    ) -> Self {
        let retry = RetryConfig {
            max_attempts: u32::MAX,
            request_timeout: sink.request_timeout,
            ..RetryConfig::default().retry_all_5xx()
        };
        ForwarderConfig {
            sink,
            api_key,
            meters,
            data_dir,
            start_at,
            retry,
            max_queued_records: 200_000,
            max_new_windows_per_pass: 1440,
            egress: EgressPolicy::default(),
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PassReport {
    /// Windows planned (new, late-changed or re-attributed).
    pub windows: u64,
    /// Records queued (first sends and corrections).
    pub records: u64,
}

/// Per sink and meter, where forwarding stands: what the server and CLI print.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeterStatus {
    /// The MeterDefinition's name.
    pub meter: String,
    /// The provider's meter api name.
    pub meter_api_name: String,
    /// Every window ending at or before this is acknowledged by the provider.
    pub forwarded_until: Option<Timestamp>,
    /// `now − forwarded_until`.
    pub lag: Option<Duration>,
    /// Records acknowledged (corrections included), over the sink's life
    /// (kept across restarts).
    pub records_sent: u64,
    /// Of which corrections (revision > 0).
    pub corrections_sent: u64,
    /// Records queued, not yet answered.
    pub records_pending: u64,
    /// Records the provider refused for good, over the sink's life.
    pub records_dead_lettered: u64,
    /// Events (and voids) of the meter read from the ledger, over the
    /// sink's life: `recordsSent / eventsRead` is what forwarding costs.
    pub events_read: u64,
    /// Usage in the planned windows that no binding covered at its time
    /// (every project with usage counts; kept across restarts).
    pub unattributed: Decimal,
    /// How many projects that usage belongs to.
    pub unattributed_projects: u64,
}

/// A sink's status.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SinkStatus {
    /// The BillingSink's name.
    pub sink: String,
    /// Its provider.
    pub provider: crate::config::Provider,
    /// Retried requests, over the sink's life.
    pub retries: u64,
    /// Batches in the dead-letter list (kept across restarts until retried).
    pub dead_letters: u64,
    /// The error the sink is in (until a batch is delivered again).
    pub last_error: Option<LastError>,
    /// The largest lag of its meters.
    pub max_lag: Option<Duration>,
    /// Per meter.
    pub meters: Vec<MeterStatus>,
}

/// One (billing account, meter): the ledger's total, what Tally recorded
/// as acknowledged, and what the provider itself holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Difference {
    /// The provider's customer id.
    pub customer_id: String,
    /// The provider's meter api name.
    pub meter_api_name: String,
    /// What the ledger holds (attributed to this account).
    pub ledger: Decimal,
    /// What the provider acknowledged, by Tally's checkpoints.
    pub acknowledged: Decimal,
    /// What the provider's own usage API answers.
    pub provider: Decimal,
    /// `provider − ledger`: positive, the provider holds more (over-billing);
    /// negative, less (under-billing).
    pub drift: Decimal,
}

impl Difference {
    /// Whether the provider's total differs from the ledger's.
    pub fn drifts(&self) -> bool {
        !self.drift.is_zero()
    }
}

/// Totals per (customer id, meter api name).
type CustomerTotals = BTreeMap<(String, String), Decimal>;

/// Every (customer, meter) pair of any of the three totals (a pair missing
/// on one side counts as zero there).
pub fn compare_totals(
    ledger: &CustomerTotals,
    acknowledged: &CustomerTotals,
    provider: &CustomerTotals,
) -> Vec<Difference> {
    let keys: BTreeSet<&(String, String)> = ledger
        .keys()
        .chain(acknowledged.keys())
        .chain(provider.keys())
        .collect();
    let get = |map: &CustomerTotals, key| map.get(key).copied().unwrap_or_default();
    keys.into_iter()
        .map(|key| {
            let (ledger, provider) = (get(ledger, key), get(provider, key));
            Difference {
                customer_id: key.0.clone(),
                meter_api_name: key.1.clone(),
                ledger,
                acknowledged: get(acknowledged, key),
                provider,
                drift: (provider - ledger).normalize(),
            }
        })
        .filter(|d| !(d.ledger.is_zero() && d.acknowledged.is_zero() && d.provider.is_zero()))
        .collect()
}

#[derive(Debug, Default)]
struct MeterState {
    cursor: Option<MeterCursor>,
    /// window start ms → pending records.
    pending: BTreeMap<i64, u64>,
    /// window start ms → unattributed usage per project.
    unattributed: BTreeMap<i64, Unattributed>,
}

/// One window's totals per (customer, dims), and what no account owns.
struct WindowTotals {
    owned: BTreeMap<(String, BTreeMap<String, String>), Decimal>,
    unattributed: Unattributed,
}

const HOUR_MS: i64 = 3_600_000;

/// A running forwarder for one billing sink.
pub struct Forwarder {
    config: ForwarderConfig,
    source: Arc<dyn UsageSource>,
    attribution: Attribution,
    store: ProgressStore,
    lanes: Lanes,
    outcomes: mpsc::UnboundedReceiver<(usize, BatchOutcome)>,
    meters: BTreeMap<String, MeterState>,
    /// Dead-lettered batches (lane, dead-letter id, item keys) not yet stored.
    dead: Vec<(usize, u64, Vec<Vec<u8>>)>,
    /// Batches in the stored dead-letter list.
    dead_letters: u64,
    /// Counters over the sink's life, as stored.
    counters: Counters,
    /// Retries stored before this process started.
    retries_before: u64,
    health: Arc<Health>,
    usage: UsageReader,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("sink", &self.config.sink.name)
            .field("meters", &self.config.meters)
            .finish_non_exhaustive()
    }
}

fn window_ms(config: &ForwarderConfig) -> i64 {
    config.sink.window.as_millis() as i64
}

fn floor_ms(t: i64, size: i64) -> i64 {
    t.div_euclid(size) * size
}

/// `[from, to)` widened to whole UTC hours: the providers answer usage in
/// hourly buckets, the one that contains a range's start first.
fn whole_hours(from: Timestamp, to: Timestamp) -> (Timestamp, Timestamp) {
    let from_ms = floor_ms(from.as_millisecond(), HOUR_MS);
    let to_ms = to.as_millisecond();
    let to_ms = floor_ms(to_ms, HOUR_MS) + if to_ms % HOUR_MS == 0 { 0 } else { HOUR_MS };
    (ts(from_ms), ts(to_ms))
}

fn ts(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(ms).unwrap_or(Timestamp::MIN)
}

impl Forwarder {
    /// Opens the sink's progress store, starts its lanes (on the current
    /// Tokio runtime) and queues again every revision that was planned but
    /// not answered before the last stop.
    pub async fn start(
        mut config: ForwarderConfig,
        source: Arc<dyn UsageSource>,
        attribution: Attribution,
        registry: &Registry,
    ) -> Result<Forwarder, ForwardError> {
        let name = config.sink.name.clone();
        let progress = |source| ForwardError::Progress {
            sink: name.clone(),
            source,
        };
        let store = ProgressStore::open(&config.data_dir).map_err(progress)?;
        let window = store
            .settle_window(window_ms(&config), config.sink.window_explicit)
            .map_err(progress)?;
        config.sink.window = Duration::from_millis(window.unsigned_abs());
        let counters = store.counters().map_err(progress)?;
        let dead_ids = Arc::new(AtomicU64::new(
            store.next_dead_letter_id().map_err(progress)?,
        ));
        let health = Arc::new(Health::default());
        let (tx, outcomes) = mpsc::unbounded_channel();
        let observed = Arc::clone(&health);
        let hooks = LaneHooks {
            outcomes: tx,
            attempt: Arc::new(move |report| observed.observe(report, Timestamp::now())),
            dead_ids,
        };
        let (lanes, guard) =
            Lanes::start(&config, registry, hooks).map_err(|e| ForwardError::Delivery {
                sink: name.clone(),
                message: e.to_string(),
            })?;
        let usage = UsageReader::new(
            config.sink.provider,
            config.sink.usage_endpoint.clone(),
            config.api_key.clone(),
            guard.client().clone(),
            guard.policy().clone(),
            config.sink.request_timeout,
        );
        let meters = Self::meter_states(&config, &store).map_err(progress)?;
        let dead_letters = store.dead_letter_count().map_err(progress)?;
        let mut forwarder = Forwarder {
            source,
            attribution: Attribution::default(),
            store,
            lanes,
            outcomes,
            meters,
            config,
            dead: Vec::new(),
            dead_letters,
            retries_before: counters.retries,
            counters,
            health,
            usage,
        };
        // Bindings may have changed while we were stopped.
        let planned_with = match forwarder.store.attribution().map_err(progress)? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                progress(ProgressError::Corrupt(format!("stored attribution: {e}")))
            })?,
            None => Attribution::default(),
        };
        forwarder.attribution = planned_with;
        forwarder.set_attribution(attribution)?;
        forwarder.requeue_pending().await?;
        Ok(forwarder)
    }

    /// Each forwarded meter's cursor and stored unattributed usage.
    fn meter_states(
        config: &ForwarderConfig,
        store: &ProgressStore,
    ) -> Result<BTreeMap<String, MeterState>, ProgressError> {
        let mut meters = BTreeMap::new();
        for meter in &config.meters {
            let state = MeterState {
                cursor: store.cursor(&meter.meter)?,
                ..MeterState::default()
            };
            meters.insert(meter.api_name.clone(), state);
        }
        for (api_name, window, projects) in store.unattributed()? {
            if let Some(state) = meters.get_mut(&api_name) {
                state.unattributed.insert(window, projects);
            }
        }
        Ok(meters)
    }

    /// Queues every revision planned but not answered before the last stop.
    async fn requeue_pending(&mut self) -> Result<(), ForwardError> {
        let pending = self.store.pending().map_err(|e| self.progress_error(e))?;
        let mut items = Vec::with_capacity(pending.len());
        for (key, record) in pending {
            self.note_pending(&record.meter_api_name, record.window_start_ms);
            items.push(record_item(key, &record));
        }
        if !items.is_empty() {
            tracing::info!(sink = %self.config.sink.name, records = items.len(),
                "re-queueing unanswered billing records");
        }
        self.enqueue(items).await
    }

    fn progress_error(&self, source: ProgressError) -> ForwardError {
        ForwardError::Progress {
            sink: self.config.sink.name.clone(),
            source,
        }
    }

    fn note_pending(&mut self, api_name: &str, window: i64) {
        if let Some(state) = self.meters.get_mut(api_name) {
            *state.pending.entry(window).or_default() += 1;
        }
    }

    async fn enqueue(&self, items: Vec<Item>) -> Result<(), ForwardError> {
        self.lanes
            .enqueue(items)
            .await
            .map_err(|e| ForwardError::Delivery {
                sink: self.config.sink.name.clone(),
                message: e.to_string(),
            })
    }

    /// Replaces the attribution (bindings or accounts changed). Windows
    /// already planned from the first time the two differ are planned again
    /// by the next pass, so usage that became attributed is sent. Durable:
    /// a crash before that pass still re-plans them.
    pub fn set_attribution(&mut self, attribution: Attribution) -> Result<(), ForwardError> {
        let Some(from) = self.attribution.first_difference(&attribution) else {
            self.attribution = attribution;
            return Ok(());
        };
        let mut plan = Plan {
            attribution: Some(serde_json::to_vec(&attribution).unwrap_or_default()),
            ..Plan::default()
        };
        for meter in &self.config.meters {
            let Some(state) = self.meters.get_mut(&meter.api_name) else {
                continue;
            };
            if let Some(cursor) = &mut state.cursor {
                let from = from.as_millisecond();
                cursor.rescan_from_ms = Some(cursor.rescan_from_ms.map_or(from, |r| r.min(from)));
                plan.cursors.push((meter.meter.clone(), *cursor));
            }
        }
        self.store
            .commit(&plan)
            .map_err(|e| self.progress_error(e))?;
        tracing::info!(sink = %self.config.sink.name, from = %from, "billing attribution changed");
        self.attribution = attribution;
        Ok(())
    }

    /// Checkpoints every acknowledgement received so far. Dead-lettered
    /// batches are checkpointed by [`Forwarder::checkpoint`], which also
    /// keeps the provider's answer.
    pub fn apply_outcomes(&mut self) -> Result<(), ForwardError> {
        let mut answers = Vec::new();
        while let Ok((lane, outcome)) = self.outcomes.try_recv() {
            match outcome.result {
                BatchResult::Delivered { .. } => answers.extend(
                    outcome
                        .keys
                        .iter()
                        .map(|k| (k.to_vec(), RevisionState::Acked)),
                ),
                BatchResult::DeadLettered { id, .. } => {
                    let keys = outcome.keys.iter().map(|k| k.to_vec()).collect();
                    self.dead.push((lane, id, keys));
                }
            }
        }
        self.settle(&answers, &[])
    }

    /// Checkpoints every answer received so far, dead letters included:
    /// a refused batch is stored, under the id its lane logged, with the
    /// provider's answer in the same batch that marks its records
    /// dead-lettered.
    pub async fn checkpoint(&mut self) -> Result<(), ForwardError> {
        self.apply_outcomes()?;
        if self.dead.is_empty() {
            return Ok(());
        }
        let mut answers = Vec::new();
        let mut records = Vec::new();
        for (lane, id, keys) in std::mem::take(&mut self.dead) {
            let letter =
                self.lanes
                    .dead_letter(lane, id)
                    .await
                    .map_err(|e| ForwardError::Delivery {
                        sink: self.config.sink.name.clone(),
                        message: format!("reading dead letters: {e}"),
                    })?;
            let letter = self.dead_letter_record(id, letter.as_ref());
            tracing::warn!(sink = %self.config.sink.name, dead_letter = id,
                reason = %letter.reason, status = ?letter.status, records = keys.len(),
                "billing records dead-lettered");
            records.push((lane, letter));
            answers.extend(keys.into_iter().map(|k| (k, RevisionState::DeadLettered)));
        }
        let letters: Vec<DeadLetterRecord> = records.iter().map(|(_, l)| l.clone()).collect();
        self.settle(&answers, &letters)?;
        self.dead_letters += letters.len() as u64;
        for (lane, letter) in records {
            // Kept by us now; the lane's in-memory copy can go.
            self.lanes.forget_dead_letter(lane, letter.id).await;
        }
        Ok(())
    }

    /// The stored form of dead letter `id` (the lane's copy, if it has it).
    fn dead_letter_record(
        &self,
        id: u64,
        letter: Option<&tally_delivery::DeadLetter>,
    ) -> DeadLetterRecord {
        DeadLetterRecord {
            id,
            at: letter.map_or_else(Timestamp::now, |l| l.at),
            reason: letter.map_or_else(|| "refused".to_owned(), |l| l.reason.clone()),
            status: letter.and_then(|l| l.status),
            answer: letter.map_or_else(String::new, |l| {
                l.body.replace(self.config.api_key.expose(), "<redacted>")
            }),
            attempts: letter.map_or(0, |l| l.attempts),
            records: letter
                .map(|l| {
                    l.items
                        .iter()
                        .filter_map(|i| serde_json::from_slice(&i.data).ok())
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    fn settle(
        &mut self,
        answers: &[(Vec<u8>, RevisionState)],
        letters: &[DeadLetterRecord],
    ) -> Result<(), ForwardError> {
        if answers.is_empty() && letters.is_empty() {
            return Ok(());
        }
        let mut counters = std::mem::take(&mut self.counters);
        counters.retries = self.retries_before + self.lanes.retries();
        let settled = self.store.settle(answers, letters, &mut counters);
        self.counters = counters;
        let changed = settled.map_err(|e| self.progress_error(e))?;
        for (record, _) in changed {
            let Some(state) = self.meters.get_mut(&record.meter_api_name) else {
                continue;
            };
            let window = record.window_start.as_millisecond();
            if let Some(count) = state.pending.get_mut(&window) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    state.pending.remove(&window);
                }
            }
        }
        Ok(())
    }

    /// Records queued and not yet answered, over all meters.
    pub fn pending_records(&self) -> u64 {
        self.meters.values().flat_map(|m| m.pending.values()).sum()
    }

    /// Applies answers until nothing is pending or `timeout` passed; true if
    /// nothing is pending.
    pub async fn wait_idle(&mut self, timeout: Duration) -> Result<bool, ForwardError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.checkpoint().await?;
            if self.pending_records() == 0 {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// One forwarding pass at time `now`: checkpoints answers, then plans
    /// every window that closed (ended at least the allowed lateness ago),
    /// every planned window that late usage touched, and every window a
    /// changed attribution affects; commits the plan and queues its records.
    pub async fn run_once(&mut self, now: Timestamp) -> Result<PassReport, ForwardError> {
        self.checkpoint().await?;
        let size = window_ms(&self.config);
        let lateness = self.config.sink.allowed_lateness.as_millis() as i64;
        let close_limit = now.as_millisecond().saturating_sub(lateness);
        let mut plan = Plan::default();
        let mut items = Vec::new();
        let mut report = PassReport::default();
        for meter in self.config.meters.clone() {
            let mut cursor = self
                .meters
                .get(&meter.api_name)
                .and_then(|s| s.cursor)
                .unwrap_or(MeterCursor {
                    planned_until_ms: floor_ms(self.config.start_at.as_millisecond(), size),
                    start_ms: floor_ms(self.config.start_at.as_millisecond(), size),
                    source_cursor: ChangeCursor::default(),
                    rescan_from_ms: None,
                });
            let changes = self
                .source
                .changes_since(&meter.meter, cursor.source_cursor)
                .await
                .map_err(|source| self.source_error(&meter, source))?;
            self.counters
                .meters
                .entry(meter.api_name.clone())
                .or_default()
                .events_read += changes.times.len() as u64;
            let mut windows: BTreeSet<i64> = changes
                .times
                .iter()
                .map(|t| floor_ms(t.as_millisecond(), size))
                .filter(|w| *w >= cursor.start_ms && *w < cursor.planned_until_ms)
                .collect();
            if let Some(from) = cursor.rescan_from_ms {
                let mut w = floor_ms(from, size).max(cursor.start_ms);
                while w < cursor.planned_until_ms {
                    windows.insert(w);
                    w += size;
                }
            }
            let mut w = cursor.planned_until_ms;
            let mut new_windows = 0;
            while w + size <= close_limit && new_windows < self.config.max_new_windows_per_pass {
                windows.insert(w);
                w += size;
                new_windows += 1;
            }
            for window in &windows {
                let records = self.plan_window(&meter, *window, &mut plan).await?;
                for (key, record) in records {
                    self.note_pending(&meter.api_name, *window);
                    items.push(record_item(key, &record));
                    report.records += 1;
                }
            }
            report.windows += windows.len() as u64;
            cursor.planned_until_ms = w;
            cursor.source_cursor = changes.cursor;
            cursor.rescan_from_ms = None;
            plan.cursors.push((meter.meter.clone(), cursor));
            if let Some(state) = self.meters.get_mut(&meter.api_name) {
                state.cursor = Some(cursor);
            }
        }
        plan.pending = items
            .iter()
            .map(|i| (i.key.to_vec(), i.data.to_vec()))
            .collect();
        self.counters.retries = self.retries_before + self.lanes.retries();
        plan.counters = Some(self.counters.clone());
        self.store
            .commit(&plan)
            .map_err(|e| self.progress_error(e))?;
        if report.records > 0 {
            tracing::debug!(sink = %self.config.sink.name, windows = report.windows,
                records = report.records, "billing records planned");
        }
        self.enqueue(items).await?;
        Ok(report)
    }

    fn source_error(&self, meter: &ForwardedMeter, source: SourceError) -> ForwardError {
        ForwardError::Source {
            sink: self.config.sink.name.clone(),
            meter: meter.meter.clone(),
            source,
        }
    }

    /// The window's totals per owner, from the source, cut where an owner changes.
    async fn window_totals(
        &self,
        meter: &ForwardedMeter,
        window: i64,
    ) -> Result<WindowTotals, ForwardError> {
        let (start, end) = (ts(window), ts(window + window_ms(&self.config)));
        let mut cuts: Vec<Timestamp> = vec![start];
        cuts.extend(self.attribution.changes_within(start, end));
        cuts.push(end);
        let mut totals = WindowTotals {
            owned: BTreeMap::new(),
            unattributed: Unattributed::new(),
        };
        for piece in cuts.windows(2) {
            let query = UsageQuery {
                meter: meter.meter.clone(),
                dimensions: meter.dimensions.iter().cloned().collect(),
                from: piece[0],
                to: piece[1],
            };
            let rows = self
                .source
                .totals(query)
                .await
                .map_err(|source| self.source_error(meter, source))?;
            for row in rows {
                match self.attribution.owner_at(&row.project, piece[0]) {
                    Owner::Account { customer_id, .. } => {
                        *totals
                            .owned
                            .entry((customer_id.to_owned(), row.dimensions))
                            .or_default() += row.value;
                    }
                    Owner::Unattributed | Owner::UnknownAccount(_) => {
                        *totals.unattributed.entry(row.project).or_default() += row.value;
                    }
                }
            }
        }
        Ok(totals)
    }

    /// Plans the corrections that make the provider's view of one window
    /// equal the ledger's; returns the new revisions' keys and records.
    async fn plan_window(
        &mut self,
        meter: &ForwardedMeter,
        window: i64,
        plan: &mut Plan,
    ) -> Result<Vec<(Vec<u8>, UsageRecord)>, ForwardError> {
        let mut totals = self.window_totals(meter, window).await?;
        totals.unattributed.retain(|_, value| !value.is_zero());
        if let Some(state) = self.meters.get_mut(&meter.api_name) {
            let before = state.unattributed.get(&window);
            if before.is_some() || !totals.unattributed.is_empty() {
                if totals.unattributed.is_empty() {
                    state.unattributed.remove(&window);
                } else {
                    state
                        .unattributed
                        .insert(window, totals.unattributed.clone());
                }
                plan.unattributed
                    .push((meter.api_name.clone(), window, totals.unattributed));
            }
        }
        let mut stored = self
            .store
            .window(&meter.api_name, ts(window))
            .map_err(|e| self.progress_error(e))?;
        let mut wanted: BTreeMap<RecordKey, Decimal> = BTreeMap::new();
        for ((customer_id, dimensions), value) in totals.owned {
            let key = RecordKey {
                meter_api_name: meter.api_name.clone(),
                window_start: ts(window),
                customer_id,
                dimensions,
            };
            if key.is_encodable() {
                wanted.insert(key, value);
            } else {
                tracing::warn!(sink = %self.config.sink.name, meter = %meter.meter,
                    "customer id or meter api name contains NUL; usage not forwarded");
            }
        }
        let keys: BTreeSet<RecordKey> = wanted.keys().chain(stored.keys()).cloned().collect();
        let end = ts(window + window_ms(&self.config));
        let mut out = Vec::new();
        for key in keys {
            let progress = stored.remove(&key).unwrap_or_else(RecordProgress::default);
            let want = wanted.get(&key).copied().unwrap_or_default();
            let delta = want - progress.planned_total();
            if delta.is_zero() {
                continue;
            }
            let mut progress = progress;
            let revision = progress.next_revision();
            progress.revisions.push(Revision {
                revision,
                value: delta,
                state: RevisionState::Pending,
            });
            let record = UsageRecord::new(&key, end, revision, delta);
            out.push((revision_key(&key.encode(), revision), record));
            plan.records.push((key, progress));
        }
        Ok(out)
    }

    /// Where forwarding stands, per meter, at `now`.
    pub fn status(&self, now: Timestamp) -> SinkStatus {
        let meters: Vec<MeterStatus> = self
            .config
            .meters
            .iter()
            .map(|meter| self.meter_status(meter, now))
            .collect();
        SinkStatus {
            sink: self.config.sink.name.clone(),
            provider: self.config.sink.provider,
            retries: self.retries_before + self.lanes.retries(),
            dead_letters: self.dead_letters,
            last_error: self.health.last_error(),
            max_lag: meters.iter().filter_map(|m| m.lag).max(),
            meters,
        }
    }

    fn meter_status(&self, meter: &ForwardedMeter, now: Timestamp) -> MeterStatus {
        let size = window_ms(&self.config);
        let state = self.meters.get(&meter.api_name);
        let planned = state.and_then(|s| s.cursor).map(|c| c.planned_until_ms);
        let oldest_pending = state.and_then(|s| s.pending.keys().next().copied());
        let forwarded_until = match (planned, oldest_pending) {
            (Some(p), Some(o)) => Some(p.min(o)),
            (p, _) => p,
        }
        .map(|ms| ts(ms.min(i64::MAX - size)));
        let counters = self
            .counters
            .meters
            .get(&meter.api_name)
            .copied()
            .unwrap_or_default();
        let unattributed = state.map(|s| &s.unattributed);
        let projects: BTreeSet<&String> = unattributed
            .into_iter()
            .flat_map(|windows| windows.values().flat_map(|p| p.keys()))
            .collect();
        MeterStatus {
            meter: meter.meter.clone(),
            meter_api_name: meter.api_name.clone(),
            forwarded_until,
            lag: forwarded_until
                .map(|f| Duration::try_from(now.duration_since(f)).unwrap_or(Duration::ZERO)),
            records_sent: counters.sent,
            corrections_sent: counters.corrections,
            records_pending: state.map_or(0, |s| s.pending.values().sum()),
            records_dead_lettered: counters.dead_lettered,
            events_read: counters.events_read,
            unattributed: unattributed
                .into_iter()
                .flat_map(|windows| windows.values().flat_map(|p| p.values()))
                .sum(),
            unattributed_projects: projects.len() as u64,
        }
    }

    /// Per (billing account, meter) that differs, over the windows starting
    /// in `[from, to)` widened to whole UTC hours: the ledger's total, the
    /// acknowledged one, and the provider's own (read from its usage API),
    /// with the drift `provider − ledger`. Lists only pairs that drift.
    pub async fn reconcile(
        &self,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<Difference>, ForwardError> {
        let mut all = self.compare(from, to).await?;
        all.retain(Difference::drifts);
        Ok(all)
    }

    /// Like [`Forwarder::reconcile`], but every pair with usage, drifting or
    /// not.
    pub async fn compare(
        &self,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<Difference>, ForwardError> {
        let (from, to) = whole_hours(from, to);
        let (ledger, acknowledged) = self.totals_between(from, to).await?;
        let api_names: Vec<String> = self
            .config
            .meters
            .iter()
            .map(|m| m.api_name.clone())
            .collect();
        let provider = self
            .usage
            .totals(&api_names, from, to)
            .await
            .map_err(|source| ForwardError::ProviderUsage {
                sink: self.config.sink.name.clone(),
                source,
            })?;
        Ok(compare_totals(&ledger, &acknowledged, &provider))
    }

    /// Per (customer, meter api name): the ledger's attributed totals and the
    /// acknowledged ones, over the windows starting in `[from, to)` (and not
    /// before the sink's first window: earlier usage is never forwarded).
    async fn totals_between(
        &self,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<(CustomerTotals, CustomerTotals), ForwardError> {
        let size = window_ms(&self.config);
        let mut ledger: CustomerTotals = BTreeMap::new();
        let mut acknowledged: CustomerTotals = BTreeMap::new();
        let to_ms = to.as_millisecond();
        for meter in &self.config.meters {
            let start = self
                .meters
                .get(&meter.api_name)
                .and_then(|s| s.cursor)
                .map_or(self.config.start_at.as_millisecond(), |c| c.start_ms);
            let from_ms = floor_ms(from.as_millisecond().max(start), size);
            let mut w = from_ms;
            while w < to_ms {
                for ((customer, _), value) in self.window_totals(meter, w).await?.owned {
                    *ledger
                        .entry((customer, meter.api_name.clone()))
                        .or_default() += value;
                }
                w += size;
            }
            let records = self
                .store
                .records_between(&meter.api_name, ts(from_ms), ts(w))
                .map_err(|e| self.progress_error(e))?;
            for (key, progress) in records {
                *acknowledged
                    .entry((key.customer_id, meter.api_name.clone()))
                    .or_default() += progress.acked_total();
            }
        }
        Ok((ledger, acknowledged))
    }

    /// Records queued in the lanes, batches in flight included.
    pub fn queue_depth(&self) -> u64 {
        self.lanes.queue_depth()
    }

    /// The stored dead-letter list, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<DeadLetterRecord>, ForwardError> {
        self.store
            .dead_letters()
            .map_err(|e| self.progress_error(e))
    }

    /// Sends a dead letter's records again (same `uniqueId`s): they become
    /// pending, durably, and are queued. False if there is no such letter.
    pub async fn retry_dead_letter(&mut self, id: u64) -> Result<bool, ForwardError> {
        let Some(letter) = self
            .store
            .retry_dead_letter(id)
            .map_err(|e| self.progress_error(e))?
        else {
            return Ok(false);
        };
        self.dead_letters = self.dead_letters.saturating_sub(1);
        let mut items = Vec::with_capacity(letter.records.len());
        for record in &letter.records {
            let Ok(key) = record.key() else { continue };
            self.note_pending(&record.meter_api_name, record.window_start_ms);
            items.push(record_item(
                revision_key(&key.encode(), record.revision),
                record,
            ));
        }
        tracing::info!(sink = %self.config.sink.name, dead_letter = id,
            records = items.len(), "dead letter queued again");
        self.enqueue(items).await?;
        Ok(true)
    }

    /// Sends every stored dead letter again; returns their ids.
    pub async fn retry_all_dead_letters(&mut self) -> Result<Vec<u64>, ForwardError> {
        let ids: Vec<u64> = self.dead_letters()?.iter().map(|l| l.id).collect();
        for id in &ids {
            self.retry_dead_letter(*id).await?;
        }
        Ok(ids)
    }

    /// Checkpoints answers, then stops the delivery sink after at most
    /// `grace`; unanswered records are sent again after the next start.
    pub async fn shutdown(mut self, grace: Duration) -> Result<(), ForwardError> {
        let _ = self.wait_idle(grace).await?;
        self.lanes.shutdown(Duration::from_millis(100)).await;
        self.checkpoint().await
    }
}

fn record_item(key: Vec<u8>, record: &UsageRecord) -> Item {
    // A record of strings, integers and a decimal always serialises.
    let data = serde_json::to_vec(record).unwrap_or_default();
    Item::new(Bytes::from(key), Bytes::from(data))
}

/// Splits an item key back into record key and revision (for tools reading
/// dead letters).
pub fn parse_item_key(key: &[u8]) -> Option<(RecordKey, u32)> {
    split_revision_key(key).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_shows_drift_in_either_direction() {
        let d = |n: i64| Decimal::from(n);
        let k = |c: &str| (c.to_string(), "m".to_string());
        let ledger = BTreeMap::from([(k("a"), d(5)), (k("b"), d(3)), (k("c"), d(1))]);
        let acked = BTreeMap::from([(k("a"), d(5)), (k("b"), d(3)), (k("c"), d(1))]);
        // b: the provider lost 1 (under-billing); z: it holds usage the
        // ledger has not (over-billing), though Tally never acknowledged it.
        let provider = BTreeMap::from([
            (k("a"), d(5)),
            (k("b"), d(2)),
            (k("c"), d(1)),
            (k("z"), d(9)),
        ]);
        let rows = compare_totals(&ledger, &acked, &provider);
        let drifting: Vec<(String, Decimal)> = rows
            .iter()
            .filter(|r| r.drifts())
            .map(|r| (r.customer_id.clone(), r.drift))
            .collect();
        assert_eq!(drifting, vec![("b".into(), d(-1)), ("z".into(), d(9))]);
        assert_eq!(rows.len(), 4);
    }

    #[test]
    fn ranges_widen_to_whole_hours() {
        let t = |s: i64| Timestamp::from_second(s).unwrap();
        assert_eq!(whole_hours(t(3600), t(7200)), (t(3600), t(7200)));
        assert_eq!(whole_hours(t(3660), t(7201)), (t(3600), t(10800)));
    }

    #[test]
    fn floor_handles_negative_times() {
        assert_eq!(floor_ms(-1, 60_000), -60_000);
        assert_eq!(floor_ms(60_000, 60_000), 60_000);
        assert_eq!(floor_ms(119_999, 60_000), 60_000);
    }
}
