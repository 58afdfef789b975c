//! Retention: every block whose newest line is older than its project's
//! retention is deleted with its index entry and its records' dedupe
//! entries; an instance with no line left is forgotten. The totals change
//! in the same batch.

use std::sync::atomic::Ordering;

use super::{Inner, encode_totals};
use crate::keys::{self, TimeEntry};
use crate::{InstanceInfo, LogError};

/// Blocks deleted per batch, so one sweep never builds a huge batch.
const BATCH_BLOCKS: usize = 4096;

impl Inner {
    pub(super) fn sweep(&self, now_nanos: i64) -> Result<u64, LogError> {
        let _commit = self.commit.lock().map_err(|_| LogError::Stopped)?;
        let mut deleted = 0;
        for (project, info) in self.instances_of(None)? {
            let retention = i64::try_from(self.retention(&project).as_nanos()).unwrap_or(i64::MAX);
            let cutoff = now_nanos.saturating_sub(retention);
            deleted += self.sweep_instance(&project, &info, cutoff)?;
        }
        self.counters.swept.fetch_add(deleted, Ordering::Relaxed);
        Ok(deleted)
    }

    fn sweep_instance(
        &self,
        project: &str,
        info: &InstanceInfo,
        cutoff: i64,
    ) -> Result<u64, LogError> {
        let s = &self.spaces;
        let prefix = keys::prefix(project, &info.instance);
        let from = keys::time_key(&prefix, i64::MIN, 0);
        let to = keys::time_key(&prefix, cutoff, 0);
        let mut old = Vec::new();
        for item in s.times.range(from..to).take(BATCH_BLOCKS) {
            let (key, value) = item.into_inner().map_err(self.err())?;
            if let (Some((_, seq)), Some(entry)) = (
                keys::split_time_key(&key, prefix.len()),
                TimeEntry::decode(&value),
            ) {
                old.push((key, seq, entry));
            }
        }
        let more = old.len() == BATCH_BLOCKS;
        let mut batch = s.db.batch();
        let (mut raw, mut stored, mut lines) = (0u64, 0u64, 0u64);
        for (key, seq, entry) in &old {
            let block_key = keys::block_key(&prefix, *seq);
            if let Some(ids) = s.idblocks.get(&block_key).map_err(self.err())? {
                for id in ids.split(|b| *b == 0) {
                    let mut k = prefix.clone();
                    k.extend_from_slice(id);
                    batch.remove(&s.ids, k);
                }
                batch.remove(&s.idblocks, block_key.clone());
            }
            batch.remove(&s.blocks, block_key);
            batch.remove(&s.times, key.clone());
            raw += u64::from(entry.raw);
            stored += u64::from(entry.stored);
            lines += u64::from(entry.lines);
        }
        if info.newest_nanos < cutoff && !more {
            batch.remove(&s.instances, keys::instance_key(project, &info.instance));
        }
        let c = &self.counters;
        let totals = [
            c.next_block.load(Ordering::Relaxed),
            c.raw.load(Ordering::Relaxed).saturating_sub(raw),
            c.stored.load(Ordering::Relaxed).saturating_sub(stored),
            c.lines.load(Ordering::Relaxed).saturating_sub(lines),
        ];
        batch.insert(&s.meta, super::TOTALS, encode_totals(totals));
        batch.commit().map_err(self.err())?;
        c.raw.store(totals[1], Ordering::Relaxed);
        c.stored.store(totals[2], Ordering::Relaxed);
        c.lines.store(totals[3], Ordering::Relaxed);
        let n = old.len() as u64;
        Ok(if more {
            n + self.sweep_instance(project, info, cutoff)?
        } else {
            n
        })
    }

    /// (project, info) of every instance with lines, of `project` or all.
    pub(super) fn instances_of(
        &self,
        project: Option<&str>,
    ) -> Result<Vec<(String, InstanceInfo)>, LogError> {
        let iter = match project {
            Some(p) => self.spaces.instances.prefix(keys::project_prefix(p)),
            None => self.spaces.instances.iter(),
        };
        let mut out = Vec::new();
        for item in iter {
            let (key, value) = item.into_inner().map_err(self.err())?;
            let (Some((project, instance)), Some(mut info)) = (
                keys::split_instance_key(&key),
                super::decode_instance(&value),
            ) else {
                continue;
            };
            info.instance = instance;
            out.push((project, info));
        }
        Ok(out)
    }
}
