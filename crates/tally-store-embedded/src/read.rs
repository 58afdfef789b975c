//! Queries over acknowledged state. Each runs on one snapshot of the store
//! and the tail chunks that snapshot does not include ([`crate::tail`]), so
//! a query never sees half of a group commit, and sees every acknowledged
//! event whether or not it is materialised yet.
//!
//! The shape of [`query`] (stages [`plan`] → [`fold`] → [`order`] →
//! [`page`]):
//! - Day buckets (all groups merged, laid out by day) answer a question
//!   across all subjects that needs no group value, one range per run of
//!   days. Hour and minute buckets are read per subject and run; across all
//!   subjects, the subjects read are those with a day bucket in the run's
//!   days (every minute and hour bucket has one, see [`crate::keys`]).
//! - A question across all subjects is shared out, by days and by subjects,
//!   between up to `fold_threads` threads, each folding into its own
//!   `Folder`. A key may be folded twice (by two threads, or once appended
//!   and once hashed); the folds are merged by sorting on one packed
//!   `order_key` and merging neighbours, which is where such keys become one
//!   row. Rows and their strings are built only for the page answered.
//! - A query grouped or filtered by `billing_account` cuts its windows where
//!   a project changes account (whole minutes), so every bucket read has
//!   one owner per `projects/<p>` subject. Attribution is decided at query
//!   time: a binding that appears later attributes usage that had none.

use std::collections::{BTreeSet, HashMap};
use std::ops::{Bound, ControlFlow};

use fjall::Readable;
use jiff::Timestamp;
use rustc_hash::FxHashMap;
use tally_ledger::{
    EventFilter, EventPage, LedgerError, MeterQuery, QuarantineFilter, QuarantinePage,
    QuarantinedEvent, QueryResult, QueryRow, StatefulResult, StoredEvent, VoidPage, VoidRecord,
};
use tally_meter::{AggState, CompiledMeter, Level, QueryPlan, Window, window};
use tally_model::billing::{Attribution, Owner};

use crate::block::Block;
use crate::dict::{self, ReaderDict};
use crate::keys::{self, DictEntry, MeterState, QuarantineEntry};
use crate::log::LoggedEvent;
use crate::tail::TailChunk;
use crate::{Shared, StoreError};

/// Most rows or items one page may hold.
pub const MAX_PAGE: usize = 10_000;

fn storage(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(e.to_string())
}

impl From<StoreError> for LedgerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Ledger(e) => e,
            other => LedgerError::Storage(other.to_string()),
        }
    }
}

type GroupKey = (u32, Option<String>, Vec<Option<String>>);

/// (window, subject id, projection id, account id) while folding; in
/// sorting, the same with ranks in place of the ids.
type FoldKey = (u32, u32, u32, u32);

/// The subject part of a fold key when rows are not split by subject.
const NO_SUBJECT: u32 = u32::MAX;

/// The account part of a fold key when rows are not split by account.
const NO_ACCOUNT: u32 = u32::MAX;

/// Dictionary lookups for one query: the readers' copy, then the snapshot
/// for entries committed after that copy was taken.
/// The lock is taken per lookup (callers cache what they look up), so a
/// long query never holds up the writer.
struct Names<'a> {
    shared: &'a Shared,
    snapshot: &'a fjall::Snapshot,
    meta: &'a fjall::Keyspace,
}

impl<'a> Names<'a> {
    fn new(shared: &'a Shared, snapshot: &'a fjall::Snapshot, meta: &'a fjall::Keyspace) -> Self {
        Names {
            shared,
            snapshot,
            meta,
        }
    }

    fn dict(&self) -> std::sync::RwLockReadGuard<'a, ReaderDict> {
        self.shared
            .dict
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn entry(&self, id: u32) -> Result<DictEntry, LedgerError> {
        let known = self.dict().get(id).cloned();
        match known {
            Some(entry) => Ok(entry),
            None => Ok(dict::read_entry(self.snapshot, self.meta, id)?),
        }
    }

    fn groups(&self, id: u32) -> Result<Vec<Option<String>>, LedgerError> {
        match self.entry(id)? {
            DictEntry::Groups(groups) => Ok(groups),
            DictEntry::Subject(_) => Err(storage(StoreError::Corrupt(
                "a rollup's groups id names a subject",
            ))),
        }
    }

    fn subject(&self, id: u32) -> Result<String, LedgerError> {
        match self.entry(id)? {
            DictEntry::Subject(subject) => Ok(subject),
            DictEntry::Groups(_) => Err(storage(StoreError::Corrupt(
                "a rollup's subject id names groups",
            ))),
        }
    }

    fn subject_id(&self, subject: &str) -> Result<Option<u32>, LedgerError> {
        let known = self.dict().subject_id(subject);
        match known {
            Some(id) => Ok(Some(id)),
            None => Ok(dict::read_subject_id(self.snapshot, self.meta, subject)?),
        }
    }
}

/// The group key that attributes usage to billing accounts.
pub const BILLING_ACCOUNT: &str = "billing_account";

/// The account owning a subject's usage at `t`: subjects are `projects/<p>`;
/// `None` when no binding covers `t` or the subject is not a project.
fn account_at(attribution: &Attribution, subject: &str, t: Timestamp) -> Option<String> {
    let project = subject.strip_prefix("projects/")?;
    match attribution.owner_at(project, t) {
        Owner::Account { name, .. } | Owner::UnknownAccount(name) => Some(name.to_owned()),
        Owner::Unattributed => None,
    }
}

/// A meter that can answer now, with its state: not found, not compiling,
/// still being built or backfilling are errors.
fn ready_meter(
    shared: &Shared,
    meter_name: &str,
) -> Result<(CompiledMeter, MeterState), LedgerError> {
    let (meter, state) = {
        let read = shared.read_state();
        let meter = match read.catalog.compile(meter_name) {
            None => return Err(LedgerError::not_found("meter", meter_name)),
            Some(Err(e)) => {
                return Err(LedgerError::Conflict(format!(
                    "meter {meter_name:?} cannot be compiled: {e}"
                )));
            }
            Some(Ok(m)) => m,
        };
        let state = read
            .meters
            .get(meter_name)
            .copied()
            .ok_or_else(|| LedgerError::NotReady {
                message: format!("meter {meter_name:?} is being built"),
                retry_after_seconds: 1,
            })?;
        (meter, state)
    };
    if !state.ready() {
        return Err(LedgerError::NotReady {
            message: format!(
                "meter {meter_name:?} is backfilling from the log ({} of {} events read)",
                state.backfilled_to, state.backfill_until
            ),
            retry_after_seconds: 2,
        });
    }
    Ok((meter, state))
}

/// The days that hold a meter's stored usage: the start of the first and
/// the end of the last (UTC), or `None` when it has none.
pub fn usage_span(
    shared: &Shared,
    meter_name: &str,
) -> Result<Option<(Timestamp, Timestamp)>, LedgerError> {
    let (_, state) = ready_meter(shared, meter_name)?;
    let (snapshot, tail) = shared.tail.view(&shared.db, &shared.keyspaces.meta)?;
    let prefix = keys::rollup_level_prefix(state.generation, Level::Day)?;
    let mut days = snapshot.prefix(&shared.keyspaces.rollups, prefix);
    let day_of = |item: Option<fjall::Guard>| -> Result<Option<i64>, LedgerError> {
        match item {
            None => Ok(None),
            Some(item) => Ok(Some(
                keys::decode_rollup_key(&item.key().map_err(storage)?)?.bucket,
            )),
        }
    };
    let mut first = day_of(days.next())?;
    let mut last = day_of(days.next_back())?.or(first);
    for chunk in &tail {
        let in_tail = chunk.rollups_with_prefix(&prefix);
        if let (Some((lo, _)), Some((hi, _))) = (in_tail.first(), in_tail.last()) {
            let (lo, hi) = (
                keys::decode_rollup_key(lo)?.bucket,
                keys::decode_rollup_key(hi)?.bucket,
            );
            first = Some(first.map_or(lo, |f| f.min(lo)));
            last = Some(last.map_or(hi, |l| l.max(hi)));
        }
    }
    let (Some(first), Some(last)) = (first, last) else {
        return Ok(None);
    };
    let at = |second: i64| {
        Timestamp::from_second(second)
            .map_err(|e| LedgerError::Storage(format!("a day bucket out of range: {e}")))
    };
    Ok(Some((at(first)?, at(last + 86_400)?)))
}

/// `attribution` is needed when the query groups or filters by
/// [`BILLING_ACCOUNT`]. Four stages: [`plan`] (what to read, from the
/// query and the meter), [`fold`] (read the buckets into rows' states),
/// [`order`] (the rows in answer order, equal keys merged) and [`page`]
/// (the rows asked for, and the cursor to the next).
pub fn query(
    shared: &Shared,
    meter_name: &str,
    q: &MeterQuery,
    attribution: Option<&Attribution>,
) -> Result<QueryResult, LedgerError> {
    let (result, _) = query_rows(shared, meter_name, q, attribution, false)?;
    Ok(result)
}

/// [`query`], with each row's state (`Ledger::query_states`).
pub fn query_states(
    shared: &Shared,
    meter_name: &str,
    q: &MeterQuery,
    attribution: Option<&Attribution>,
) -> Result<StatefulResult, LedgerError> {
    let (result, states) = query_rows(shared, meter_name, q, attribution, true)?;
    Ok(StatefulResult {
        rows: result.rows,
        states,
        next_cursor: result.next_cursor,
    })
}

/// The rows of `q`, and their states when `keep_states`.
fn query_rows(
    shared: &Shared,
    meter_name: &str,
    q: &MeterQuery,
    attribution: Option<&Attribution>,
    keep_states: bool,
) -> Result<(QueryResult, Vec<AggState>), LedgerError> {
    let (meter, state) = ready_meter(shared, meter_name)?;
    let planned = plan(&meter, state.generation, q, attribution)?;
    let meta = &shared.keyspaces.meta;
    let (snapshot, tail) = shared.tail.view(&shared.db, meta)?;
    let view = RollupView {
        snapshot: &snapshot,
        rollups: &shared.keyspaces.rollups,
        tail: &tail,
    };
    let names = Names::new(shared, &snapshot, meta);
    let folded = fold(&planned, &view, &names)?;
    let ordered = order(folded, planned.by_account, |id| names.subject(id))?;
    page(
        &ordered,
        &planned,
        q.cursor.as_deref(),
        q.limit,
        keep_states,
    )
}

/// What a query reads and how its rows are keyed.
struct Planned<'q> {
    generation: u64,
    /// Names of the groups of a row: the meter's dimensions asked for, then
    /// [`BILLING_ACCOUNT`] when asked for.
    group_names: Vec<&'q str>,
    /// Positions of the dimensions asked for among the meter's.
    group_positions: Vec<usize>,
    /// (position, value) of each dimension filter.
    filters: Vec<(usize, &'q str)>,
    dimensions: usize,
    by_subject: bool,
    by_account: bool,
    account_filter: Option<&'q str>,
    attribution: Option<&'q Attribution>,
    /// The subjects asked for (each once, in order); empty for all.
    subjects: Vec<&'q str>,
    /// The answer's windows; `plan` covers pieces of them (`parent`).
    windows: Vec<Window>,
    parent: Vec<usize>,
    plan: QueryPlan,
    from: Timestamp,
}

/// Stage 1: what to read. Checks the query against the meter (dimensions,
/// billing attribution), cuts its windows where a project changes account,
/// and covers them with the fewest buckets: day buckets (all groups merged)
/// only for a question across all subjects that needs no group value.
fn plan<'q>(
    meter: &CompiledMeter,
    generation: u64,
    q: &'q MeterQuery,
    attribution: Option<&'q Attribution>,
) -> Result<Planned<'q>, LedgerError> {
    let position = |name: &str| meter.dimension_position(name).map_err(LedgerError::Invalid);
    let mut group_names: Vec<&str> = Vec::new();
    for g in &q.group_by {
        if g != "subject" && g != BILLING_ACCOUNT && !group_names.contains(&g.as_str()) {
            position(g)?;
            group_names.push(g);
        }
    }
    let by_account = q.group_by.iter().any(|g| g == BILLING_ACCOUNT);
    let account_filter = q.filter_group_by.get(BILLING_ACCOUNT).map(String::as_str);
    if attribution.is_none() && (by_account || account_filter.is_some()) {
        return Err(LedgerError::Invalid(
            "this ledger cannot attribute usage to billing accounts".into(),
        ));
    }
    let group_positions: Vec<usize> = group_names
        .iter()
        .map(|g| position(g))
        .collect::<Result<_, _>>()?;
    if by_account {
        group_names.push(BILLING_ACCOUNT);
    }
    let filters: Vec<(usize, &str)> = q
        .filter_group_by
        .iter()
        .filter(|(k, _)| *k != BILLING_ACCOUNT)
        .map(|(k, v)| position(k).map(|p| (p, v.as_str())))
        .collect::<Result<_, _>>()?;
    let windows = window::windows(q.from, q.to, q.window_size, &q.time_zone)
        .map_err(|e| LedgerError::Invalid(e.to_string()))?;
    // Where some project changes account, windows are cut, so each piece
    // (and each bucket read for it) has one owner per project.
    let (pieces, parent) = match attribution {
        Some(a) => split_windows(&windows, &a.changes_within(q.from, q.to)),
        None => (windows.clone(), (0..windows.len()).collect()),
    };
    let coarsest = if q.subjects.is_empty() && group_positions.is_empty() && filters.is_empty() {
        Level::Day
    } else {
        Level::Hour
    };
    let plan = QueryPlan::new(pieces, q.from, q.to, coarsest)
        .map_err(|e| LedgerError::Invalid(e.to_string()))?;
    let subjects: BTreeSet<&str> = q.subjects.iter().map(String::as_str).collect();
    Ok(Planned {
        generation,
        group_names,
        group_positions,
        filters,
        dimensions: meter.dimensions().len(),
        by_subject: !q.subjects.is_empty() || q.group_by.iter().any(|g| g == "subject"),
        by_account,
        account_filter,
        attribution,
        subjects: subjects.into_iter().collect(),
        windows,
        parent,
        plan,
        from: q.from,
    })
}

/// What the folds of a query hold: each bucket read, keyed by its row
/// (several entries may share a key), and the values their ids stand for.
struct Folded {
    folded: Vec<(FoldKey, AggState)>,
    accounts: Vec<Option<String>>,
    projections: Vec<Vec<Option<String>>>,
}

/// Stage 2: reads the buckets the plan names (store and tail) and folds
/// each into its row's state. A question across all subjects is shared out
/// between threads, by days and by subjects, each with its own `Folder`.
fn fold(p: &Planned, view: &RollupView, names: &Names) -> Result<Folded, LedgerError> {
    let ctx = FoldContext {
        plan: &p.plan,
        parent: &p.parent,
        attribution: p.attribution,
        account_filter: p.account_filter,
        by_account: p.by_account,
        by_subject: p.by_subject,
        group_positions: &p.group_positions,
        filters: &p.filters,
        dimensions: p.dimensions,
        from: p.from,
        names,
    };
    // Hour and minute buckets: one range per subject and run.
    let fine: Vec<(Level, i64, i64)> = [Level::Hour, Level::Minute]
        .into_iter()
        .flat_map(|level| {
            p.plan
                .spans(level)
                .into_iter()
                .map(move |(lo, hi)| (level, lo, hi))
        })
        .collect();
    let subject_ids = subjects_to_read(p, view, names, &fine)?;
    let all_subjects = p.subjects.is_empty();
    let shares = if all_subjects { fold_threads() } else { 1 };
    let day_shares = share_spans(&p.plan.spans(Level::Day), shares);
    let subject_shares: Vec<&[u32]> = subject_ids
        .chunks(subject_ids.len().div_ceil(shares).max(1))
        .collect();
    let fold_share = |share: usize| -> Result<Folder, LedgerError> {
        let mut folder = Folder::with_capacity(if all_subjects { 1 << 15 } else { 0 });
        for (lo, hi) in day_shares.get(share).map(Vec::as_slice).unwrap_or_default() {
            let (start, end) = keys::rollup_day_range(p.generation, *lo, *hi)?;
            view.each(&start, &end, |key, value| {
                folder.fold(&ctx, key, value, Level::Day)
            })?;
        }
        for subject in subject_shares.get(share).copied().unwrap_or_default() {
            for (level, lo, hi) in &fine {
                let (start, end) =
                    keys::rollup_subject_range(p.generation, *level, *subject, *lo, *hi)?;
                view.each(&start, &end, |key, value| {
                    folder.fold(&ctx, key, value, *level)
                })?;
            }
        }
        Ok(folder)
    };
    let mut folders = if shares == 1 {
        vec![fold_share(0)?]
    } else {
        std::thread::scope(|scope| {
            let others: Vec<_> = (1..shares)
                .map(|share| scope.spawn(move || fold_share(share)))
                .collect();
            let mut folders = vec![fold_share(0)?];
            for other in others {
                folders.push(
                    other
                        .join()
                        .map_err(|_| storage("a query thread panicked"))??,
                );
            }
            Ok::<_, LedgerError>(folders)
        })?
    };
    // The folds in one list, with the ids the first fold interned; a key
    // two folds share (a window across their shares) is merged once
    // sorted, where its entries are neighbours.
    let mut first = folders.remove(0);
    let mut folded = first.take_folded();
    for other in folders {
        first.absorb(other, &mut folded);
    }
    Ok(Folded {
        folded,
        accounts: first.accounts,
        projections: first.projections,
    })
}

/// The subjects whose hour and minute buckets `fine` names: those asked
/// for (a subject never seen has none), or, across all subjects, those
/// with a day bucket in the runs' days (every subject with usage in a run
/// has one, see [`crate::keys`]).
fn subjects_to_read(
    p: &Planned,
    view: &RollupView,
    names: &Names,
    fine: &[(Level, i64, i64)],
) -> Result<Vec<u32>, LedgerError> {
    if !p.subjects.is_empty() {
        let mut ids = Vec::new();
        for subject in &p.subjects {
            if let Some(id) = names.subject_id(subject)? {
                ids.push(id);
            }
        }
        return Ok(ids);
    }
    // Hour and minute runs at the same edge share their days: read each
    // run of days once.
    let mut days: Vec<(i64, i64)> = fine
        .iter()
        .map(|(_, lo, hi)| (Level::Day.bucket(*lo), Level::Day.bucket(*hi)))
        .collect();
    days.sort_unstable();
    days.dedup();
    let mut seen = BTreeSet::new();
    for (lo, hi) in days {
        let (start, end) = keys::rollup_day_range(p.generation, lo, hi)?;
        view.each(&start, &end, |key, _| {
            seen.insert(keys::decode_rollup_key(key)?.subject);
            Ok(())
        })?;
    }
    Ok(seen.into_iter().collect())
}

/// A query's rows in answer order, equal keys merged, with what their ids
/// stand for.
struct Ordered {
    entries: Vec<(FoldKey, AggState)>,
    /// Subject names with their ids, sorted by name.
    subjects: Vec<(String, u32)>,
    subject_rank: FxHashMap<u32, u32>,
    accounts: Vec<Option<String>>,
    projections: Vec<Vec<Option<String>>>,
    by_account: bool,
}

impl Ordered {
    /// The row key an entry's fold key stands for.
    fn group_key(&self, (window, subject, projected, account): FoldKey) -> GroupKey {
        let subject = (subject != NO_SUBJECT).then(|| {
            self.subjects[self.subject_rank.get(&subject).copied().unwrap_or(0) as usize]
                .0
                .clone()
        });
        let mut groups = self
            .projections
            .get(projected as usize)
            .cloned()
            .unwrap_or_default();
        if self.by_account {
            groups.push(self.accounts.get(account as usize).cloned().flatten());
        }
        (window, subject, groups)
    }
}

/// Stage 3: rows are ordered by (window, subject name, group values,
/// account). They are sorted by ranks of names computed once, not by the
/// strings: each fold's place is one integer ([`order_key`]); the small
/// (order, index) pairs are sorted on every core and the folds gathered in
/// that order, neighbours with the same key merged.
fn order(
    folded: Folded,
    by_account: bool,
    subject_name: impl Fn(u32) -> Result<String, LedgerError>,
) -> Result<Ordered, LedgerError> {
    let Folded {
        folded,
        accounts,
        projections,
    } = folded;
    let mut ids: Vec<u32> = folded
        .iter()
        .map(|(k, _)| k.1)
        .filter(|id| *id != NO_SUBJECT)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let mut subjects = Vec::with_capacity(ids.len());
    for id in ids {
        subjects.push((subject_name(id)?, id));
    }
    subjects.sort_unstable();
    let subject_rank: FxHashMap<u32, u32> = subjects
        .iter()
        .enumerate()
        .map(|(rank, (_, id))| (*id, rank as u32))
        .collect();
    let projection_rank = ranks(&projections);
    let account_rank = ranks(&accounts);
    let rank = |id: u32, ranks: &[u32]| {
        if id == NO_ACCOUNT {
            0
        } else {
            ranks[id as usize]
        }
    };
    let mut order: Vec<(u128, u32)> = folded
        .iter()
        .enumerate()
        .map(|(index, ((window, subject, projected, account), _))| {
            let order = order_key(
                *window,
                subject_rank.get(subject).copied().unwrap_or(0),
                rank(*projected, &projection_rank),
                rank(*account, &account_rank),
            );
            (order, index as u32)
        })
        .collect();
    sort_on_every_core(&mut order);
    Ok(Ordered {
        entries: gather(folded, &order)?,
        subjects,
        subject_rank,
        accounts,
        projections,
        by_account,
    })
}

/// Stage 4: the rows after the cursor, at most `limit` of them, and the
/// cursor to the next page when there are more; with `keep_states`, each
/// row's state too. Rows (and their strings) are built only for the page
/// answered.
fn page(
    ordered: &Ordered,
    p: &Planned,
    cursor: Option<&str>,
    limit: Option<usize>,
    keep_states: bool,
) -> Result<(QueryResult, Vec<AggState>), LedgerError> {
    let entries = &ordered.entries;
    let first = match cursor.map(decode_cursor).transpose()? {
        None => 0,
        Some(after) => entries.partition_point(|e| ordered.group_key(e.0) <= after),
    };
    let limit = limit.unwrap_or(usize::MAX);
    let page = &entries[first..];
    let more = page.len() > limit;
    let page = &page[..page.len().min(limit)];
    let row = |(key, state): &(FoldKey, AggState)| {
        let (window, subject, groups) = ordered.group_key(*key);
        let w = p.windows[window as usize];
        QueryRow {
            window_start: w.start,
            window_end: w.end,
            subject,
            group_by: p
                .group_names
                .iter()
                .zip(groups)
                .map(|(name, value)| ((*name).to_owned(), value))
                .collect(),
            value: state.result(),
        }
    };
    let rows = on_every_core(page, |part| part.iter().map(row).collect::<Vec<_>>())?
        .into_iter()
        .flatten()
        .collect();
    let next_cursor = match page.last() {
        Some((key, _)) if more => Some(encode_cursor(&ordered.group_key(*key))),
        _ => None,
    };
    let states = if keep_states {
        page.iter().map(|(_, state)| state.clone()).collect()
    } else {
        Vec::new()
    };
    Ok((QueryResult { rows, next_cursor }, states))
}

/// Threads a query across all subjects is shared out between.
fn fold_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// `spans` of buckets cut into `shares` runs of about as many days each.
fn share_spans(spans: &[(i64, i64)], shares: usize) -> Vec<Vec<(i64, i64)>> {
    let step = Level::Day.seconds();
    let days = |(lo, hi): (i64, i64)| (hi - lo) / step + 1;
    let total: i64 = spans.iter().map(|s| days(*s)).sum();
    let per_share = (total + shares as i64 - 1) / shares as i64;
    let mut out = vec![Vec::new(); shares];
    let (mut share, mut taken) = (0, 0);
    for &(lo, hi) in spans {
        let mut lo = lo;
        while lo <= hi {
            let room = (per_share - taken).max(1);
            let end = hi.min(lo + (room - 1) * step);
            out[share].push((lo, end));
            taken += days((lo, end));
            if taken >= per_share && share + 1 < shares {
                share += 1;
                taken = 0;
            }
            lo = end + step;
        }
    }
    out
}

/// The rollups a query reads: a snapshot of the store, and the tail chunks
/// it does not include.
struct RollupView<'a> {
    snapshot: &'a fjall::Snapshot,
    rollups: &'a fjall::Keyspace,
    tail: &'a [std::sync::Arc<TailChunk>],
}

/// A bucket's state as read: encoded in the store, or a tail delta.
/// Decoded (or copied) only when folded.
#[derive(Clone, Copy)]
enum Value<'a> {
    Stored(&'a [u8]),
    Tail(&'a AggState),
}

impl Value<'_> {
    fn state(self) -> Result<AggState, LedgerError> {
        match self {
            Value::Stored(raw) => Ok(keys::decode_rollup_value(raw)?),
            Value::Tail(state) => Ok(state.clone()),
        }
    }
}

impl RollupView<'_> {
    /// Calls `f` with every bucket whose key is in `[start, end)`: the
    /// store's, then the tail's. A key may come more than once (stored and
    /// in the tail, or in two chunks); its states add up.
    fn each(
        &self,
        start: &[u8],
        end: &[u8],
        mut f: impl FnMut(&[u8], Value) -> Result<(), LedgerError>,
    ) -> Result<(), LedgerError> {
        for item in self.snapshot.range(self.rollups, start..end) {
            let (key, value) = item.into_inner().map_err(storage)?;
            f(&key, Value::Stored(&value))?;
        }
        for chunk in self.tail {
            for (key, state) in chunk.rollups_in(start, end) {
                f(key, Value::Tail(state))?;
            }
        }
        Ok(())
    }
}

/// What folding a bucket needs to know of the query.
struct FoldContext<'a> {
    plan: &'a QueryPlan,
    parent: &'a [usize],
    attribution: Option<&'a Attribution>,
    account_filter: Option<&'a str>,
    by_account: bool,
    by_subject: bool,
    group_positions: &'a [usize],
    filters: &'a [(usize, &'a str)],
    dimensions: usize,
    from: Timestamp,
    names: &'a Names<'a>,
}

/// Buckets folded into (window, subject id or NO_SUBJECT, projection id,
/// account id), with the accounts and projections met so far interned.
struct Folder {
    /// Folded buckets while their keys only grow (a scan of day buckets
    /// comes in (day, subject) order): appended, or merged into the last,
    /// with no hashing. The first key out of order sends the rest to `acc`;
    /// a key in both is merged when the folds are sorted.
    run: Vec<(FoldKey, AggState)>,
    acc: FxHashMap<FoldKey, AggState>,
    /// The last groups id projected, and its projection.
    last_projection: Option<(u32, Option<u32>)>,
    accounts: Vec<Option<String>>,
    account_ids: HashMap<Option<String>, u32>,
    /// Per (subject id, piece): its account id.
    account_of: FxHashMap<(u32, usize), u32>,
    /// Per groups id: its projection onto `group_positions`, or `None` when
    /// the filters leave it out.
    projection_of: FxHashMap<u32, Option<u32>>,
    projections: Vec<Vec<Option<String>>>,
    projection_ids: HashMap<Vec<Option<String>>, u32>,
}

/// The id of `value` in `values`, added if new.
fn intern<T: Clone + Eq + std::hash::Hash>(
    values: &mut Vec<T>,
    ids: &mut HashMap<T, u32>,
    value: &T,
) -> u32 {
    if let Some(id) = ids.get(value) {
        return *id;
    }
    let id = values.len() as u32;
    values.push(value.clone());
    ids.insert(value.clone(), id);
    id
}

impl Folder {
    fn with_capacity(capacity: usize) -> Folder {
        Folder {
            run: Vec::with_capacity(capacity),
            acc: FxHashMap::default(),
            last_projection: None,
            accounts: Vec::new(),
            account_ids: HashMap::new(),
            account_of: FxHashMap::default(),
            projection_of: FxHashMap::default(),
            projections: Vec::new(),
            projection_ids: HashMap::new(),
        }
    }

    fn fold(
        &mut self,
        ctx: &FoldContext,
        key: &[u8],
        value: Value,
        level: Level,
    ) -> Result<(), LedgerError> {
        let k = keys::decode_rollup_key(key)?;
        let Some(piece) = ctx.plan.window_of(level, k.bucket) else {
            return Ok(());
        };
        let window = ctx.parent[piece];
        // The account owning this subject's usage in this piece, interned.
        let account = match ctx.attribution {
            None => NO_ACCOUNT,
            Some(a) => match self.account_of.get(&(k.subject, piece)) {
                Some(id) => *id,
                None => {
                    let subject = ctx.names.subject(k.subject)?;
                    let at = ctx.plan.windows[piece].start.max(ctx.from);
                    let account = account_at(a, &subject, at);
                    let id = intern(&mut self.accounts, &mut self.account_ids, &account);
                    self.account_of.insert((k.subject, piece), id);
                    id
                }
            },
        };
        if let Some(wanted) = ctx.account_filter
            && self
                .accounts
                .get(account as usize)
                .and_then(Option::as_deref)
                != Some(wanted)
        {
            return Ok(());
        }
        let account = if ctx.by_account { account } else { NO_ACCOUNT };
        let projected = match self.last_projection {
            Some((groups, p)) if groups == k.groups => p,
            _ => {
                let p = match self.projection_of.get(&k.groups) {
                    Some(p) => *p,
                    None => {
                        let p = self.project(ctx, k.groups)?;
                        self.projection_of.insert(k.groups, p);
                        p
                    }
                };
                self.last_projection = Some((k.groups, p));
                p
            }
        };
        let Some(projected) = projected else {
            return Ok(());
        };
        let state = value.state()?;
        let subject = if ctx.by_subject {
            k.subject
        } else {
            NO_SUBJECT
        };
        self.add((window as u32, subject, projected, account), state)
    }

    /// The projection id of a groups id, or `None` when the filters leave
    /// it out.
    fn project(&mut self, ctx: &FoldContext, groups: u32) -> Result<Option<u32>, LedgerError> {
        let groups = if groups == keys::ALL_GROUPS {
            if !ctx.group_positions.is_empty() || !ctx.filters.is_empty() {
                return Err(storage(StoreError::Corrupt(
                    "a day bucket was read for a question about groups",
                )));
            }
            vec![None; ctx.dimensions]
        } else {
            ctx.names.groups(groups)?
        };
        if groups.len() != ctx.dimensions {
            return Err(storage(StoreError::Corrupt(
                "a rollup's groups do not match its meter's dimensions",
            )));
        }
        if ctx
            .filters
            .iter()
            .any(|(p, v)| groups[*p].as_deref() != Some(*v))
        {
            return Ok(None);
        }
        let projected: Vec<Option<String>> = ctx
            .group_positions
            .iter()
            .map(|p| groups[*p].clone())
            .collect();
        Ok(Some(intern(
            &mut self.projections,
            &mut self.projection_ids,
            &projected,
        )))
    }

    fn add(&mut self, key: FoldKey, state: AggState) -> Result<(), LedgerError> {
        if self.acc.is_empty() {
            match self.run.last_mut() {
                Some((last, folded)) if *last == key => {
                    return folded.merge(&state).map_err(storage);
                }
                Some((last, _)) if *last > key => {}
                _ => {
                    self.run.push((key, state));
                    return Ok(());
                }
            }
        }
        match self.acc.entry(key) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                e.get_mut().merge(&state).map_err(storage)
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(state);
                Ok(())
            }
        }
    }

    /// Everything folded, in no particular order; a key may appear twice.
    fn take_folded(&mut self) -> Vec<(FoldKey, AggState)> {
        let mut folded = std::mem::take(&mut self.run);
        folded.extend(std::mem::take(&mut self.acc));
        folded
    }

    /// Moves another thread's fold into `into`, its interned ids mapped
    /// onto this one's.
    fn absorb(&mut self, mut other: Folder, into: &mut Vec<(FoldKey, AggState)>) {
        let accounts: Vec<u32> = other
            .accounts
            .iter()
            .map(|a| intern(&mut self.accounts, &mut self.account_ids, a))
            .collect();
        let projections: Vec<u32> = other
            .projections
            .iter()
            .map(|p| intern(&mut self.projections, &mut self.projection_ids, p))
            .collect();
        let folded = other.take_folded();
        into.reserve(folded.len());
        into.extend(
            folded
                .into_iter()
                .map(|((window, subject, projected, account), state)| {
                    let account = if account == NO_ACCOUNT {
                        NO_ACCOUNT
                    } else {
                        accounts[account as usize]
                    };
                    (
                        (window, subject, projections[projected as usize], account),
                        state,
                    )
                }),
        );
    }
}

/// A row's place in the answer as one integer: the ranks of its window,
/// subject name, group values and account, 32 bits each.
fn order_key(window: u32, subject: u32, projection: u32, account: u32) -> u128 {
    (u128::from(window) << 96)
        | (u128::from(subject) << 64)
        | (u128::from(projection) << 32)
        | u128::from(account)
}

/// Items below this many are not worth another thread.
const ITEMS_PER_THREAD: usize = 32_768;

/// Threads to split `items` items over: one per core (at most
/// [`fold_threads`]), each with at least [`ITEMS_PER_THREAD`].
fn threads_for(items: usize) -> usize {
    fold_threads().min(items / ITEMS_PER_THREAD).max(1)
}

/// `f` of `items` in parts ([`threads_for`]), in the order of the parts.
fn on_every_core<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(&[T]) -> R + Sync,
) -> Result<Vec<R>, LedgerError> {
    let threads = threads_for(items.len());
    if threads == 1 {
        return Ok(vec![f(items)]);
    }
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(items.len().div_ceil(threads))
            .map(|part| scope.spawn(move || f(part)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| storage("a query thread panicked")))
            .collect()
    })
}

/// Sorts `(order, index)` pairs by order: parts sorted on every core, then
/// merged.
fn sort_on_every_core(pairs: &mut Vec<(u128, u32)>) {
    let threads = threads_for(pairs.len());
    if threads == 1 {
        pairs.sort_unstable();
        return;
    }
    let per_part = pairs.len().div_ceil(threads);
    std::thread::scope(|scope| {
        for part in pairs.chunks_mut(per_part) {
            scope.spawn(move || part.sort_unstable());
        }
    });
    let mut parts: Vec<&[(u128, u32)]> = pairs.chunks(per_part).collect();
    let mut merged = Vec::with_capacity(pairs.len());
    // Few parts: the smallest head is found by a scan.
    while let Some((at, _)) = parts
        .iter()
        .enumerate()
        .filter_map(|(at, part)| part.first().map(|head| (at, head)))
        .min_by_key(|(_, head)| **head)
    {
        merged.push(parts[at][0]);
        parts[at] = &parts[at][1..];
    }
    *pairs = merged;
}

/// The folds in `order` (pairs of order and index into `folded`), entries
/// with the same key, now neighbours, merged into one.
///
/// `order` is a permutation of `folded`'s indices; each state is moved out
/// once, an empty count left in its place.
fn gather(
    mut folded: Vec<(FoldKey, AggState)>,
    order: &[(u128, u32)],
) -> Result<Vec<(FoldKey, AggState)>, LedgerError> {
    let mut entries: Vec<(FoldKey, AggState)> = Vec::with_capacity(order.len());
    for (_, index) in order {
        let Some((key, state)) = folded.get_mut(*index as usize) else {
            return Err(storage("a folded bucket out of range was gathered"));
        };
        let (key, state) = (*key, std::mem::replace(state, AggState::Count(0)));
        match entries.last_mut() {
            Some((last, merged)) if *last == key => merged.merge(&state).map_err(storage)?,
            _ => entries.push((key, state)),
        }
    }
    Ok(entries)
}

/// The rank of each value in sorted order, by index.
fn ranks<T: Ord>(values: &[T]) -> Vec<u32> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_unstable_by(|a, b| values[*a].cmp(&values[*b]));
    let mut ranks = vec![0; values.len()];
    for (rank, index) in order.into_iter().enumerate() {
        ranks[index] = rank as u32;
    }
    ranks
}

/// Cuts windows at `cuts`; returns the pieces and, per piece, its window.
fn split_windows(windows: &[Window], cuts: &BTreeSet<Timestamp>) -> (Vec<Window>, Vec<usize>) {
    let mut pieces = Vec::with_capacity(windows.len() + cuts.len());
    let mut parent = Vec::with_capacity(windows.len() + cuts.len());
    for (index, w) in windows.iter().enumerate() {
        let mut start = w.start;
        for cut in cuts.range((Bound::Excluded(w.start), Bound::Excluded(w.end))) {
            pieces.push(Window { start, end: *cut });
            parent.push(index);
            start = *cut;
        }
        pieces.push(Window { start, end: w.end });
        parent.push(index);
    }
    (pieces, parent)
}

fn encode_cursor(key: &GroupKey) -> String {
    let json = serde_json::to_vec(key).unwrap_or_default();
    json.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_cursor(cursor: &str) -> Result<GroupKey, LedgerError> {
    let bad = || LedgerError::Invalid(format!("cursor {cursor:?} is not one this server issued"));
    if !cursor.len().is_multiple_of(2) {
        return Err(bad());
    }
    let bytes = (0..cursor.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(cursor.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| bad())?;
    serde_json::from_slice(&bytes).map_err(|_| bad())
}

fn page_limit(limit: usize) -> usize {
    if limit == 0 { 100 } else { limit.min(MAX_PAGE) }
}

/// How far the log's order (of storing) may stray from the order of the
/// events' `ingested_at` (taken before the writer orders them): reading
/// newest first, events stored this long before `ingested_from` end the scan.
const INGEST_ORDER_SLACK: jiff::SignedDuration = jiff::SignedDuration::from_secs(600);

pub fn list_events(shared: &Shared, f: &EventFilter) -> Result<EventPage, LedgerError> {
    let end = match &f.cursor {
        Some(c) => c.parse::<u64>().map_err(|_| {
            LedgerError::Invalid(format!("cursor {c:?} is not one this server issued"))
        })?,
        None => u64::MAX,
    };
    // With both source and id the dedupe index finds the event directly.
    if let (Some(source), Some(id)) = (&f.source, &f.id) {
        return event_by_id(shared, f, source, id, end);
    }
    scan_events(shared, f, end)
}

/// Whether a stored event passes the filter's attribute tests.
fn event_matches(f: &EventFilter, block: &Block, i: usize) -> bool {
    let time = block.time(i);
    let at = block.ingested_at(i);
    f.from.is_none_or(|from| time >= from)
        && f.to.is_none_or(|to| time < to)
        && f.ingested_from.is_none_or(|from| at >= from)
        && f.ingested_to.is_none_or(|to| at < to)
        && f.event_type
            .as_ref()
            .is_none_or(|t| t == block.event_type(i))
        && f.subject.as_ref().is_none_or(|s| s == block.subject(i))
        && f.source.as_ref().is_none_or(|s| s == block.source(i))
        && f.id.as_ref().is_none_or(|id| id == block.id(i))
}

/// The one event stored under (source, id), found through the dedupe
/// entry: the tail's, the newest, else the store's.
fn event_by_id(
    shared: &Shared,
    f: &EventFilter,
    source: &str,
    id: &str,
    end: u64,
) -> Result<EventPage, LedgerError> {
    let (snapshot, tail) = shared.tail.view(&shared.db, &shared.keyspaces.meta)?;
    let key = keys::dedupe_key(source, id);
    let entry = match tail.iter().rev().find_map(|chunk| chunk.dedupe_entry(&key)) {
        Some(value) => Some(keys::decode_dedupe(value)?.0),
        None => crate::dedupe::find_stored(shared, &snapshot, (&key, source, id))?,
    };
    let mut items = Vec::new();
    let mut log = shared.log.reader(&snapshot);
    if let Some(seq) = entry
        && seq < end
        && let Some(block) = log.block(seq)?
    {
        let i = (seq - block.first) as usize;
        if event_matches(f, block, i) {
            items.push(StoredEvent {
                seq,
                ingested_at: block.ingested_at(i),
                event: block.event(i)?,
                voided: void_record(shared, &snapshot, seq)?,
            });
        }
    }
    Ok(EventPage {
        items,
        next_cursor: None,
    })
}

/// Events before `end` that pass the filter, newest first, a page of them.
fn scan_events(shared: &Shared, f: &EventFilter, end: u64) -> Result<EventPage, LedgerError> {
    let limit = page_limit(f.limit);
    let snapshot = shared.db.snapshot();
    let scan_until = f
        .ingested_from
        .and_then(|from| from.checked_sub(INGEST_ORDER_SLACK).ok());
    let mut items: Vec<StoredEvent> = Vec::new();
    let mut next_cursor = None;
    shared
        .log
        .scan(&snapshot, 0, end, true, &mut |block| {
            for seq in (block.first..block.end().min(end)).rev() {
                let i = (seq - block.first) as usize;
                if scan_until.is_some_and(|until| block.ingested_at(i) < until) {
                    return Ok(ControlFlow::Break(()));
                }
                if !event_matches(f, block, i) {
                    continue;
                }
                if items.len() == limit {
                    next_cursor = items.last().map(|e| e.seq.to_string());
                    return Ok(ControlFlow::Break(()));
                }
                items.push(StoredEvent {
                    seq,
                    ingested_at: block.ingested_at(i),
                    event: block.event(i)?,
                    voided: void_record(shared, &snapshot, seq)?,
                });
            }
            Ok(ControlFlow::Continue(()))
        })
        .map_err(storage)?;
    Ok(EventPage { items, next_cursor })
}

/// The void record of an event, if it was voided.
fn void_record(
    shared: &Shared,
    snapshot: &fjall::Snapshot,
    seq: u64,
) -> Result<Option<VoidRecord>, LedgerError> {
    if !shared.is_voided(seq) {
        return Ok(None);
    }
    snapshot
        .get(&shared.keyspaces.voids, keys::seq_key(seq))
        .map_err(storage)?
        .map(|raw| serde_json::from_slice(&raw).map_err(storage))
        .transpose()
}

/// Void records, newest first; the cursor is the last seq of the previous page.
pub fn list_voids(
    shared: &Shared,
    limit: usize,
    cursor: Option<&str>,
) -> Result<VoidPage, LedgerError> {
    let limit = page_limit(limit);
    let end = match cursor {
        Some(c) => c.parse::<u64>().map_err(|_| {
            LedgerError::Invalid(format!("cursor {c:?} is not one this server issued"))
        })?,
        None => u64::MAX,
    };
    let snapshot = shared.db.snapshot();
    let mut items: Vec<VoidRecord> = Vec::new();
    let mut next_cursor = None;
    for item in snapshot
        .range(&shared.keyspaces.voids, ..keys::seq_key(end))
        .rev()
    {
        let value = item.value().map_err(storage)?;
        if items.len() == limit {
            next_cursor = items.last().map(|r| r.seq.to_string());
            break;
        }
        items.push(serde_json::from_slice(&value).map_err(storage)?);
    }
    Ok(VoidPage { items, next_cursor })
}

pub fn list_quarantine(
    shared: &Shared,
    f: &QuarantineFilter,
) -> Result<QuarantinePage, LedgerError> {
    let limit = page_limit(f.limit);
    let ks = &shared.keyspaces;
    let (snapshot, tail) = shared.tail.view(&shared.db, &ks.meta)?;
    let start: Vec<u8> = match &f.cursor {
        Some(c) => {
            let (meter, seq) = c
                .rsplit_once(':')
                .and_then(|(m, s)| Some((m, s.parse::<u64>().ok()?)))
                .ok_or_else(|| {
                    LedgerError::Invalid(format!("cursor {c:?} is not one this server issued"))
                })?;
            keys::quarantine_key(meter, seq.saturating_add(1))?
        }
        None => f
            .meter
            .as_deref()
            .map(keys::quarantine_prefix)
            .transpose()?
            .unwrap_or_default(),
    };
    let prefix = f
        .meter
        .as_deref()
        .map(keys::quarantine_prefix)
        .transpose()?;
    let mut items = Vec::new();
    let mut next_cursor = None;
    let mut log = shared.log.reader(&snapshot);
    for entry in quarantine_entries(&snapshot, &ks.quarantine, &tail, start, prefix) {
        let (key, value) = entry?;
        let (meter, seq) = keys::decode_quarantine_key(&key)?;
        if items.len() == limit {
            next_cursor = items
                .last()
                .map(|q: &QuarantinedEvent| format!("{}:{}", q.meter, q.event.seq));
            break;
        }
        let entry: QuarantineEntry = serde_json::from_slice(&value).map_err(storage)?;
        let Some(LoggedEvent {
            ingested_at, event, ..
        }) = log.get(seq)?
        else {
            continue;
        };
        items.push(QuarantinedEvent {
            meter: meter.to_owned(),
            reason: entry.reason,
            message: entry.message,
            event: StoredEvent {
                seq,
                ingested_at,
                event,
                voided: None,
            },
        });
    }
    Ok(QuarantinePage { items, next_cursor })
}

/// Quarantine entries from `start` on (those within `prefix`), in key
/// order: the store's and the tail's, merged.
fn quarantine_entries<'a>(
    snapshot: &'a fjall::Snapshot,
    keyspace: &'a fjall::Keyspace,
    tail: &[std::sync::Arc<TailChunk>],
    start: Vec<u8>,
    prefix: Option<Vec<u8>>,
) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), LedgerError>> + 'a {
    let within = move |key: &[u8]| prefix.as_ref().is_none_or(|p| key.starts_with(p));
    let mut from_tail: Vec<(Vec<u8>, Vec<u8>)> = tail
        .iter()
        .flat_map(|chunk| chunk.quarantine.iter())
        .filter(|(key, _)| key.as_slice() >= start.as_slice() && within(key))
        .cloned()
        .collect();
    from_tail.sort_unstable();
    let stored = snapshot
        .range(keyspace, start..)
        .map(|item| {
            item.into_inner()
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .map_err(storage)
        })
        .take_while(move |entry| entry.as_ref().map_or(true, |(key, _)| within(key)));
    merge_sorted(stored, from_tail.into_iter())
}

/// Two sequences sorted by key, merged in key order (an error first).
fn merge_sorted<K: Ord, V>(
    a: impl Iterator<Item = Result<(K, V), LedgerError>>,
    b: impl Iterator<Item = (K, V)>,
) -> impl Iterator<Item = Result<(K, V), LedgerError>> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    std::iter::from_fn(move || {
        let take_b = match (a.peek(), b.peek()) {
            (_, None) | (Some(Err(_)), _) => false,
            (None, Some(_)) => true,
            (Some(Ok((ka, _))), Some((kb, _))) => kb < ka,
        };
        if take_b { b.next().map(Ok) } else { a.next() }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const DAY: i64 = 86_400;

    #[test]
    fn merged_sequences_are_in_key_order() {
        let a = vec![Ok((1, 'a')), Ok((4, 'a')), Ok((6, 'a'))];
        let b = vec![(0, 'b'), (2, 'b'), (5, 'b'), (9, 'b')];
        let merged: Vec<(i32, char)> = merge_sorted(a.into_iter(), b.into_iter())
            .map(Result::unwrap)
            .collect();
        let keys: Vec<i32> = merged.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, vec![0, 1, 2, 4, 5, 6, 9]);
    }

    /// Every day of every span, in order.
    fn days(spans: &[(i64, i64)]) -> Vec<i64> {
        spans
            .iter()
            .flat_map(|(lo, hi)| (*lo..=*hi).step_by(DAY as usize))
            .collect()
    }

    /// A fold of (key, count) additions: runs of growing keys, keys out of
    /// order and repeats, many more than one thread takes; sorted and
    /// gathered, it is the naive sum per key, in key order.
    fn folds_like_a_map(additions: &[(FoldKey, u64)]) {
        let mut folder = Folder::with_capacity(0);
        let mut naive = std::collections::BTreeMap::new();
        for (key, n) in additions {
            folder.add(*key, AggState::Count(*n)).unwrap();
            *naive.entry(*key).or_insert(0) += n;
        }
        let folded = folder.take_folded();
        let mut order: Vec<(u128, u32)> = folded
            .iter()
            .enumerate()
            .map(|(i, ((w, s, p, a), _))| (order_key(*w, *s, *p, *a), i as u32))
            .collect();
        let mut expected_order = order.clone();
        expected_order.sort_unstable();
        sort_on_every_core(&mut order);
        assert_eq!(order, expected_order);
        let entries = gather(folded, &order).unwrap();
        let got: Vec<(FoldKey, u64)> = entries
            .into_iter()
            .map(|(k, state)| match state {
                AggState::Count(n) => (k, n),
                other => panic!("unexpected state {other:?}"),
            })
            .collect();
        let want: Vec<(FoldKey, u64)> = naive.into_iter().collect();
        assert_eq!(got, want);
    }

    #[test]
    fn folds_sorted_on_every_core_are_the_naive_fold() {
        // Growing keys only (a day scan), more than one thread sorts.
        let growing: Vec<(FoldKey, u64)> = (0..100_000u32)
            .map(|i| ((i / 5_000, i % 5_000, 0, NO_ACCOUNT), 1))
            .collect();
        folds_like_a_map(&growing);
        // Growing with repeats, then out of order, then keys seen before.
        let mut mixed = growing.clone();
        mixed.extend(growing.iter().rev().step_by(3).map(|(k, _)| (*k, 2)));
        mixed.extend((0..50_000u32).map(|i| ((i % 7, (i * 7_919) % 3_001, i % 3, 0), 3)));
        folds_like_a_map(&mixed);
        folds_like_a_map(&[]);
    }

    // ---- the stages of `query` --------------------------------------------

    fn meter() -> CompiledMeter {
        let yaml = "apiVersion: billing.miloapis.com/v1alpha1\nkind: MeterDefinition\n\
                    metadata: {name: requests}\nspec: {meterName: requests, \
                    measurement: {aggregation: Sum, unit: '{request}'}, \
                    event: {type: req, valueProperty: $.value, dimensions: {method: $.method}}}\n";
        let manifest = tally_model::Manifest::parse_documents(yaml)
            .unwrap()
            .remove(0);
        let catalog = tally_ledger::Catalog::load(vec![manifest]).unwrap();
        catalog.compile("requests").unwrap().unwrap()
    }

    const T0: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z

    fn question(days: i64, group_by: &[&str], subjects: &[&str]) -> MeterQuery {
        MeterQuery {
            from: Timestamp::from_second(T0).unwrap(),
            to: Timestamp::from_second(T0 + days * DAY).unwrap(),
            window_size: Some(tally_meter::WindowSize::Day),
            time_zone: jiff::tz::TimeZone::UTC,
            subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
            group_by: group_by.iter().map(|g| (*g).to_owned()).collect(),
            filter_group_by: Default::default(),
            limit: None,
            cursor: None,
        }
    }

    #[test]
    fn the_plan_reads_day_buckets_only_for_all_subjects_without_groups() {
        let meter = meter();
        let all = question(3, &["subject"], &[]);
        let p = plan(&meter, 7, &all, None).unwrap();
        assert_eq!(days(&p.plan.spans(Level::Day)).len(), 3);
        assert!(p.plan.spans(Level::Hour).is_empty());
        assert!(p.by_subject && !p.by_account);
        assert_eq!(p.windows.len(), 3);
        for q in [
            question(3, &["method"], &[]),
            question(3, &[], &["b", "a", "b"]),
        ] {
            let p = plan(&meter, 7, &q, None).unwrap();
            assert!(p.plan.spans(Level::Day).is_empty(), "{:?}", q.group_by);
            assert!(!p.plan.spans(Level::Hour).is_empty());
        }
        let twice = question(1, &[], &["b", "a", "b"]);
        let p = plan(&meter, 7, &twice, None).unwrap();
        assert_eq!(p.subjects, vec!["a", "b"], "each subject once, in order");
        assert_eq!(
            plan(&meter, 7, &question(1, &["method", "method"], &[]), None)
                .unwrap()
                .group_names,
            vec!["method"]
        );
    }

    #[test]
    fn the_plan_refuses_what_the_meter_cannot_answer() {
        let meter = meter();
        let Err(LedgerError::Invalid(message)) =
            plan(&meter, 7, &question(1, &["region"], &[]), None)
        else {
            panic!("an unknown dimension must be refused");
        };
        assert!(message.contains("subject, method"), "{message}");
        assert!(matches!(
            plan(&meter, 7, &question(1, &[BILLING_ACCOUNT], &[]), None),
            Err(LedgerError::Invalid(_))
        ));
    }

    /// Folds of (window, subject, projection) keys, out of order and with
    /// repeats, for subjects 0 ("zeta") and 1 ("alpha") and projections
    /// 0 (GET) and 1 (DEL).
    fn folded() -> Folded {
        let key = |w, s, p| (w, s, p, NO_ACCOUNT);
        let folded = vec![
            (key(1, 0, 0), AggState::Count(1)),
            (key(0, 0, 1), AggState::Count(2)),
            (key(0, 1, 0), AggState::Count(3)),
            (key(1, 0, 0), AggState::Count(4)),
            (key(0, 0, 0), AggState::Count(5)),
            (key(0, 1, 0), AggState::Count(6)),
        ];
        Folded {
            folded,
            accounts: Vec::new(),
            projections: vec![vec![Some("GET".into())], vec![Some("DEL".into())]],
        }
    }

    fn names(id: u32) -> Result<String, LedgerError> {
        Ok(["zeta", "alpha"][id as usize].to_owned())
    }

    #[test]
    fn ordering_sorts_by_window_subject_name_and_groups_and_merges_equal_keys() {
        let ordered = order(folded(), false, names).unwrap();
        let rows: Vec<(GroupKey, u64)> = ordered
            .entries
            .iter()
            .map(|(key, state)| {
                let AggState::Count(n) = state else {
                    panic!("{state:?}")
                };
                (ordered.group_key(*key), *n)
            })
            .collect();
        let row = |w, s: &str, g: &str| (w, Some(s.to_owned()), vec![Some(g.to_owned())]);
        assert_eq!(
            rows,
            vec![
                (row(0, "alpha", "GET"), 9),
                (row(0, "zeta", "DEL"), 2),
                (row(0, "zeta", "GET"), 5),
                (row(1, "zeta", "GET"), 5),
            ]
        );
    }

    #[test]
    fn pages_follow_their_cursor_to_the_whole_answer() {
        let meter = meter();
        let q = question(2, &["subject", "method"], &[]);
        let p = plan(&meter, 7, &q, None).unwrap();
        let ordered = order(folded(), false, names).unwrap();
        let (whole, states) = page(&ordered, &p, None, None, true).unwrap();
        let merged: Vec<&AggState> = ordered.entries.iter().map(|(_, state)| state).collect();
        assert_eq!(states.iter().collect::<Vec<_>>(), merged);
        assert_eq!(whole.rows.len(), 4);
        assert_eq!(whole.next_cursor, None);
        let mut rows = Vec::new();
        let mut cursor = None;
        loop {
            let (part, states) = page(&ordered, &p, cursor.as_deref(), Some(3), false).unwrap();
            assert!(states.is_empty());
            assert!(part.rows.len() <= 3);
            rows.extend(part.rows);
            match part.next_cursor {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(rows, whole.rows);
        assert_eq!(whole.rows[0].subject.as_deref(), Some("alpha"));
        assert_eq!(whole.rows[0].window_start, q.from);
        assert_eq!(
            whole.rows[0].group_by.get("method"),
            Some(&Some("GET".to_owned()))
        );
        assert!(matches!(
            page(&ordered, &p, Some("zz"), None, false),
            Err(LedgerError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn folding_reads_the_store_and_the_tail_alike() {
        use tally_ledger::Ledger;
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::StoreConfig::new(dir.path());
        config.max_lateness = jiff::SignedDuration::from_hours(24 * 365 * 50);
        config.materialise_patience = std::time::Duration::from_secs(3_600);
        let ledger = crate::EmbeddedLedger::open(config).unwrap();
        let manifest = |name: &str, kind: &str| {
            let yaml = format!(
                "apiVersion: billing.miloapis.com/v1alpha1\nkind: MeterDefinition\n\
                 metadata: {{name: {name}}}\nspec: {{meterName: {name}, \
                 measurement: {{aggregation: Sum, unit: By}}, \
                 event: {{type: {kind}, valueProperty: $.value, dimensions: {{method: $.method}}}}}}\n"
            );
            tally_model::Manifest::parse_documents(&yaml)
                .unwrap()
                .remove(0)
        };
        let apply = |m| ledger.apply(m, tally_ledger::ApplyMode::Upsert);
        apply(manifest("requests", "req")).await.unwrap();
        let event = |i: i64| {
            let at = Timestamp::from_second(T0 + i * 3_601).unwrap();
            let json = serde_json::json!({"specversion": "1.0", "id": format!("e{i}"),
                "source": "s", "type": "req", "subject": format!("p{}", i % 2),
                "time": at.to_string(), "data": {"value": i, "method": "GET"}});
            tally_model::parse_event(json, Timestamp::now()).unwrap()
        };
        ledger.ingest((0..30).map(event).collect()).await.unwrap();
        // A catalog change materialises the first 30; the rest stay in the tail.
        apply(manifest("unused", "nothing")).await.unwrap();
        // Its backfill (which materialises first as well) is done.
        while ledger.usage_span("unused".into()).await.is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        ledger.ingest((30..60).map(event).collect()).await.unwrap();
        assert_eq!(ledger.stats().materialise_lag_events, 30);
        let shared = &ledger.shared;
        let meter = shared
            .read_state()
            .catalog
            .compile("requests")
            .unwrap()
            .unwrap();
        let generation = shared.read_state().meters["requests"].generation;
        for (group_by, subjects) in [
            (vec!["subject"], vec![]),
            (vec!["subject", "method"], vec![]),
            (vec![], vec!["p0", "p1"]),
        ] {
            let q = question(3, &group_by, &subjects);
            let p = plan(&meter, generation, &q, None).unwrap();
            let (snapshot, tail) = shared
                .tail
                .view(&shared.db, &shared.keyspaces.meta)
                .unwrap();
            assert_eq!(tail.len(), 1);
            let view = RollupView {
                snapshot: &snapshot,
                rollups: &shared.keyspaces.rollups,
                tail: &tail,
            };
            let names = Names::new(shared, &snapshot, &shared.keyspaces.meta);
            let folded = fold(&p, &view, &names).unwrap();
            let ordered = order(folded, false, |id| names.subject(id)).unwrap();
            let mut total = BTreeMap::new();
            for (key, state) in &ordered.entries {
                let subject = ordered.group_key(*key).1.unwrap_or_default();
                *total.entry(subject).or_insert(0) +=
                    state.result().to_string().parse::<i64>().unwrap();
            }
            let mut naive = BTreeMap::new();
            for i in 0..60i64 {
                let subject = if p.by_subject {
                    format!("p{}", i % 2)
                } else {
                    String::new()
                };
                *naive.entry(subject).or_insert(0) += i;
            }
            assert_eq!(total, naive, "{group_by:?} {subjects:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_fold_sorted_and_gathered_is_the_naive_fold(
            additions in proptest::collection::vec(((0u32..4, 0u32..6, 0u32..3, 0u32..2), 1u64..5), 0..200),
        ) {
            folds_like_a_map(&additions);
        }
    }

    #[test]
    fn shares_cover_every_day_once_in_order_and_evenly() {
        let cases: [&[(i64, i64)]; 5] = [
            &[],
            &[(0, 0)],
            &[(0, 29 * DAY)],
            &[(-3 * DAY, DAY), (5 * DAY, 5 * DAY), (9 * DAY, 20 * DAY)],
            &[(0, DAY), (3 * DAY, 3 * DAY)],
        ];
        for spans in cases {
            for shares in 1..=4 {
                let out = share_spans(spans, shares);
                assert_eq!(out.len(), shares);
                let flat: Vec<(i64, i64)> = out.iter().flatten().copied().collect();
                assert_eq!(days(&flat), days(spans), "{spans:?} in {shares}");
                let sizes: Vec<usize> = out.iter().map(|s| days(s).len()).collect();
                let total = days(spans).len();
                assert!(
                    sizes.iter().all(|n| *n <= total.div_ceil(shares)),
                    "{spans:?} in {shares}: {sizes:?}"
                );
            }
        }
    }
}
