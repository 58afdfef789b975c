//! The writer's round, in stages: dedupe and group every job's records per
//! (project, instance); cut each group into blocks of at most
//! [`block::MAX_BLOCK_TEXT`] of text; compress the blocks on every core
//! (outside the commit lock: only a sweep waits on it); then, under the
//! commit lock, write blocks, index entries, dedupe entries, instances and
//! totals in one batch synced with `SyncAll`.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};

use fjall::PersistMode;

use super::{Inner, Job, TOTALS, encode_totals};
use crate::keys::{self, TimeEntry};
use crate::{AppendReport, LogError, block};

/// Text below which a round's blocks are compressed on the writer thread
/// alone: a thread's start costs more than compressing this little.
const PARALLEL_TEXT: usize = 256 << 10;

/// The lines of one instance in one round, in append order.
#[derive(Default)]
struct Group<'a> {
    workload: Option<&'a str>,
    entries: Vec<block::Entry<'a>>,
    /// (index in `entries`, record id) of the lines that carry an id.
    ids: Vec<(usize, &'a str)>,
}

/// One block to write: a run of one group's lines.
struct Planned<'a> {
    project: &'a str,
    instance: &'a str,
    workload: Option<&'a str>,
    entries: &'a [block::Entry<'a>],
    ids: Vec<&'a str>,
    text: usize,
}

impl Inner {
    /// Dedupes, groups and writes every job's records in one synced batch;
    /// the report of each job, in order.
    pub(super) fn write_round(&self, jobs: &VecDeque<Job>) -> Result<Vec<AppendReport>, LogError> {
        let (groups, reports) = self.group(jobs)?;
        let planned = plan(&groups);
        let encoded = encode_all(&planned);
        self.commit_blocks(&planned, encoded)?;
        let c = &self.counters;
        for r in &reports {
            c.appended.fetch_add(r.stored, Ordering::Relaxed);
            c.duplicates.fetch_add(r.duplicates, Ordering::Relaxed);
            c.truncated.fetch_add(r.truncated, Ordering::Relaxed);
        }
        Ok(reports)
    }

    /// Every job's fresh records per (project, instance), in append order;
    /// what each job stored and dropped as a duplicate.
    #[allow(clippy::type_complexity)]
    fn group<'a>(
        &self,
        jobs: &'a VecDeque<Job>,
    ) -> Result<(BTreeMap<(&'a str, &'a str), Group<'a>>, Vec<AppendReport>), LogError> {
        let mut groups: BTreeMap<(&str, &str), Group<'_>> = BTreeMap::new();
        let mut seen: HashSet<(&str, &str, &str)> = HashSet::new();
        let mut reports = Vec::with_capacity(jobs.len());
        for job in jobs {
            let mut report = AppendReport {
                truncated: job.truncated,
                ..AppendReport::default()
            };
            for r in &job.records {
                if let Some(id) = r.id.as_deref() {
                    let fresh = seen.insert((&r.project, &r.instance, id))
                        && !self.id_stored(&r.project, &r.instance, id)?;
                    if !fresh {
                        report.duplicates += 1;
                        continue;
                    }
                }
                let g = groups.entry((&r.project, &r.instance)).or_default();
                g.workload = r.workload.as_deref().or(g.workload);
                if let Some(id) = r.id.as_deref() {
                    g.ids.push((g.entries.len(), id));
                }
                g.entries.push(block::Entry {
                    time_nanos: r.time_nanos,
                    stream: r.stream,
                    line: &r.line,
                });
                report.stored += 1;
            }
            reports.push(report);
        }
        Ok((groups, reports))
    }

    fn id_stored(&self, project: &str, instance: &str, id: &str) -> Result<bool, LogError> {
        let key = keys::id_key(&keys::prefix(project, instance), id);
        self.spaces.ids.contains_key(key).map_err(self.err())
    }

    /// Writes the encoded blocks of `planned` (same order) in one synced
    /// batch with their index entries and the new totals.
    fn commit_blocks(
        &self,
        planned: &[Planned<'_>],
        encoded: Vec<Vec<u8>>,
    ) -> Result<(), LogError> {
        if planned.is_empty() {
            return Ok(());
        }
        let _commit = self.commit.lock().map_err(|_| LogError::Stopped)?;
        let s = &self.spaces;
        let c = &self.counters;
        let mut batch = s.db.batch().durability(Some(PersistMode::SyncAll));
        let mut next = c.next_block.load(Ordering::Relaxed);
        let (mut raw_total, mut stored_total, mut lines_total) = (0u64, 0u64, 0u64);
        let mut newest: BTreeMap<(&str, &str), (i64, Option<&str>)> = BTreeMap::new();
        for (p, bytes) in planned.iter().zip(encoded) {
            let seq = next;
            next += 1;
            let prefix = keys::prefix(p.project, p.instance);
            let min = p.entries.iter().map(|e| e.time_nanos).min().unwrap_or(0);
            let max = p.entries.iter().map(|e| e.time_nanos).max().unwrap_or(0);
            let entry = TimeEntry {
                min_nanos: min,
                raw: p.text as u32,
                stored: bytes.len() as u32,
                lines: p.entries.len() as u32,
            };
            raw_total += p.text as u64;
            stored_total += bytes.len() as u64;
            lines_total += p.entries.len() as u64;
            batch.insert(&s.times, keys::time_key(&prefix, max, seq), entry.encode());
            batch.insert(&s.blocks, keys::block_key(&prefix, seq), bytes);
            if !p.ids.is_empty() {
                for id in &p.ids {
                    batch.insert(&s.ids, keys::id_key(&prefix, id), seq.to_be_bytes());
                }
                batch.insert(&s.idblocks, keys::block_key(&prefix, seq), p.ids.join("\0"));
            }
            let n = newest.entry((p.project, p.instance)).or_insert((max, None));
            n.0 = n.0.max(max);
            n.1 = p.workload.or(n.1);
        }
        for ((project, instance), (max, workload)) in newest {
            self.touch_instance(&mut batch, project, instance, max, workload)?;
        }
        let totals = [
            next,
            c.raw.load(Ordering::Relaxed) + raw_total,
            c.stored.load(Ordering::Relaxed) + stored_total,
            c.lines.load(Ordering::Relaxed) + lines_total,
        ];
        batch.insert(&s.meta, TOTALS, encode_totals(totals));
        batch.commit().map_err(self.err())?;
        c.next_block.store(totals[0], Ordering::Relaxed);
        c.raw.store(totals[1], Ordering::Relaxed);
        c.stored.store(totals[2], Ordering::Relaxed);
        c.lines.store(totals[3], Ordering::Relaxed);
        Ok(())
    }

    fn touch_instance(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        project: &str,
        instance: &str,
        max: i64,
        workload: Option<&str>,
    ) -> Result<(), LogError> {
        let key = keys::instance_key(project, instance);
        let known = self.spaces.instances.get(&key).map_err(self.err())?;
        let old = known.as_deref().and_then(super::decode_instance);
        let newest = old.as_ref().map_or(max, |o| o.newest_nanos.max(max));
        let workload = workload.or(old.as_ref().and_then(|o| o.workload.as_deref()));
        if old
            .as_ref()
            .is_some_and(|o| o.newest_nanos == newest && o.workload.as_deref() == workload)
        {
            return Ok(());
        }
        let mut v = newest.to_le_bytes().to_vec();
        v.extend_from_slice(workload.unwrap_or("").as_bytes());
        batch.insert(&self.spaces.instances, key, v);
        Ok(())
    }
}

/// Cuts every group into runs of at most [`block::MAX_BLOCK_TEXT`] of
/// text (a longer line closes its block alone), in group order.
fn plan<'a>(groups: &'a BTreeMap<(&'a str, &'a str), Group<'a>>) -> Vec<Planned<'a>> {
    let mut planned = Vec::with_capacity(groups.len());
    for ((project, instance), g) in groups {
        let mut from = 0;
        while from < g.entries.len() {
            let mut to = from;
            let mut text = 0;
            while to < g.entries.len() && (to == from || text < block::MAX_BLOCK_TEXT) {
                text += g.entries[to].line.len();
                to += 1;
            }
            let first_id = g.ids.partition_point(|(i, _)| *i < from);
            let end_id = g.ids.partition_point(|(i, _)| *i < to);
            planned.push(Planned {
                project,
                instance,
                workload: g.workload,
                entries: &g.entries[from..to],
                ids: g.ids[first_id..end_id].iter().map(|(_, id)| *id).collect(),
                text,
            });
            from = to;
        }
    }
    planned
}

/// The blocks of `planned`, in its order; compressed on up to every core
/// when the round holds enough text to pay for it.
fn encode_all(planned: &[Planned<'_>]) -> Vec<Vec<u8>> {
    let text: usize = planned.iter().map(|p| p.text).sum();
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get().min(4))
        .min(planned.len());
    if workers <= 1 || text < PARALLEL_TEXT {
        return planned.iter().map(|p| block::encode(p.entries)).collect();
    }
    // Workers take the next block from a shared counter, so a round of
    // one large and many small blocks still spreads over the cores.
    let next = AtomicUsize::new(0);
    let work = || {
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(p) = planned.get(i) else {
                return done;
            };
            done.push((i, block::encode(p.entries)));
        }
    };
    let mut out: Vec<Vec<u8>> = vec![Vec::new(); planned.len()];
    std::thread::scope(|scope| {
        let others: Vec<_> = (1..workers).map(|_| scope.spawn(work)).collect();
        let mut all = work();
        for h in others {
            // A worker that panicked left its blocks undone; they are
            // encoded below on this thread.
            all.extend(h.join().unwrap_or_default());
        }
        for (i, bytes) in all {
            out[i] = bytes;
        }
    });
    for (i, p) in planned.iter().enumerate() {
        if out[i].is_empty() {
            out[i] = block::encode(p.entries);
        }
    }
    out
}
