//! Reads: the blocks of an instance that may hold lines of a query (from
//! the `times` index, or from a position on when following), decoded and
//! filtered; instances merged by time, each in its append order.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::Inner;
use crate::keys::{self, TimeEntry};
use crate::{LogError, LogLine, LogPage, LogQuery, Position, Stream, block};

struct Budget {
    left: u64,
    scanned: u64,
    truncated: bool,
}

impl Inner {
    pub(super) fn read(&self, q: &LogQuery) -> Result<LogPage, LogError> {
        let instances = if q.instances.is_empty() {
            self.instances_of(Some(&q.project))?
                .into_iter()
                .map(|(_, i)| i.instance)
                .collect()
        } else {
            q.instances.clone()
        };
        let mut budget = Budget {
            left: self.config.max_scan_bytes,
            scanned: 0,
            truncated: false,
        };
        let mut per_instance = Vec::with_capacity(instances.len());
        for instance in &instances {
            per_instance.push(self.read_instance(q, instance, &mut budget)?);
        }
        let lines = merge(per_instance, q.newest_first, q.limit);
        Ok(LogPage {
            lines,
            truncated: budget.truncated,
            scanned_bytes: budget.scanned,
        })
    }

    /// The blocks of `prefix` that may hold lines of `q`, ascending.
    fn candidate_blocks(&self, q: &LogQuery, prefix: &[u8]) -> Result<Vec<u64>, LogError> {
        let mut seqs = Vec::new();
        if let Some(after) = q.after {
            let from = keys::block_key(prefix, after.block);
            let to = keys::block_key(prefix, u64::MAX);
            for item in self.spaces.blocks.range(from..=to) {
                let key = item.key().map_err(self.err())?;
                if let Some(seq) = key
                    .get(prefix.len()..)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
                {
                    seqs.push(seq);
                }
            }
            return Ok(seqs);
        }
        let from = keys::time_key(prefix, q.since_nanos, 0);
        let to = keys::time_key(prefix, i64::MAX, u64::MAX);
        for item in self.spaces.times.range(from..=to) {
            let (key, value) = item.into_inner().map_err(self.err())?;
            let (Some((_, seq)), Some(entry)) = (
                keys::split_time_key(&key, prefix.len()),
                TimeEntry::decode(&value),
            ) else {
                continue;
            };
            if entry.min_nanos < q.until_nanos {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        Ok(seqs)
    }

    /// Lines of one instance, in append order (reversed if newest first),
    /// at most `q.limit`.
    fn read_instance(
        &self,
        q: &LogQuery,
        instance: &str,
        budget: &mut Budget,
    ) -> Result<Vec<LogLine>, LogError> {
        let prefix = keys::prefix(&q.project, instance);
        let mut seqs = self.candidate_blocks(q, &prefix)?;
        if q.newest_first {
            seqs.reverse();
        }
        let mut out = Vec::new();
        for (n, seq) in seqs.iter().enumerate() {
            if out.len() >= q.limit {
                budget.truncated |= n < seqs.len();
                break;
            }
            let Some(bytes) = self
                .spaces
                .blocks
                .get(keys::block_key(&prefix, *seq))
                .map_err(self.err())?
            else {
                continue; // swept since the index was read
            };
            let corrupt = |why: String| LogError::Corrupt {
                project: q.project.clone(),
                instance: instance.to_owned(),
                block: *seq,
                why,
            };
            let header = block::header(&bytes).map_err(corrupt)?;
            let raw = u64::from(header.raw_len);
            if raw > budget.left {
                budget.truncated = true;
                break;
            }
            budget.left -= raw;
            budget.scanned += raw;
            let lines = block::open(&bytes).map_err(corrupt)?;
            let order: Box<dyn Iterator<Item = usize>> = if q.newest_first {
                Box::new((0..lines.len()).rev())
            } else {
                Box::new(0..lines.len())
            };
            for i in order {
                if out.len() >= q.limit {
                    break;
                }
                let (time_nanos, stream, line) = lines.get(i);
                let position = Position {
                    block: *seq,
                    index: i as u32,
                };
                // Filters run on the block's text: only kept lines are copied.
                if keeps(q, time_nanos, stream, position, line) {
                    out.push(LogLine {
                        instance: instance.to_owned(),
                        stream,
                        time_nanos,
                        position,
                        line: line.to_owned(),
                    });
                }
            }
        }
        out.truncate(q.limit);
        Ok(out)
    }
}

fn keeps(q: &LogQuery, time: i64, stream: Stream, position: Position, line: &str) -> bool {
    time >= q.since_nanos
        && time < q.until_nanos
        && q.stream.is_none_or(|s| s == stream)
        && q.after.is_none_or(|a| position > a)
        && q.filters.iter().all(|f| f.keeps(line))
}

/// Merges per-instance lists (each in its own order) by time, oldest first
/// (newest first if asked), keeping each list's order; at most `limit`.
fn merge(lists: Vec<Vec<LogLine>>, newest_first: bool, limit: usize) -> Vec<LogLine> {
    if lists.len() == 1 {
        return lists.into_iter().next().unwrap_or_default();
    }
    let mut iters: Vec<std::vec::IntoIter<LogLine>> =
        lists.into_iter().map(Vec::into_iter).collect();
    let mut heads: Vec<Option<LogLine>> = iters.iter_mut().map(Iterator::next).collect();
    // Ordered by (time, list): ties keep a stable order.
    let mut heap: BinaryHeap<Reverse<(i64, usize)>> = BinaryHeap::new();
    let key = |t: i64| {
        if newest_first {
            -(t.saturating_add(1))
        } else {
            t
        }
    };
    for (i, h) in heads.iter().enumerate() {
        if let Some(l) = h {
            heap.push(Reverse((key(l.time_nanos), i)));
        }
    }
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(Reverse((_, i))) = heap.pop() else {
            break;
        };
        let Some(line) = heads[i].take() else {
            continue;
        };
        out.push(line);
        heads[i] = iters[i].next();
        if let Some(l) = &heads[i] {
            heap.push(Reverse((key(l.time_nanos), i)));
        }
    }
    out
}
