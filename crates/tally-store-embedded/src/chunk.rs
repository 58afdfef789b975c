//! Rollup chunks: how the rollups are stored (format 8).
//!
//! Logically the rollups are one state per bucket key ([`RollupKey`], 18
//! bytes, sorted the way they are scanned: see [`crate::keys`]). They are
//! stored in *chunks*: runs of consecutive bucket keys of one meter
//! generation and level, at most [`MAX_ENTRIES`] buckets each, each stored
//! under the key where its range starts. A chunk covers every bucket key
//! from its own key up to the next chunk's key (or the end of its
//! generation and level), so the chunk that holds a bucket is the last
//! chunk key at or before it, and a range of buckets is that chunk and the
//! chunks keyed inside the range. One subject's minute or hour buckets over
//! a month are one or two values; a day of every subject's day buckets is
//! one value per [`MAX_ENTRIES`] subjects.
//!
//! Value layout (varint: LEB128; zigzag: 0, -1, 1, ... as 0, 1, 2, ...).
//! A bucket key's fields after generation and level are `(a, b, groups)`:
//! `(subject, bucket)` at minute and hour, `(bucket, subject)` at day; a
//! bucket counts in units of its level (minutes, hours, days):
//!
//! | bytes | |
//! |---|---|
//! | `0x20` | chunk tag (a format-7 or older value begins with 1–7 or 0x11–0x16) |
//! | per bucket, in key order: varint | `a` minus the previous bucket's (the chunk key's for the first), in units |
//! | zigzag varint | `b` minus the previous bucket's, in units |
//! | varint (minute and hour only) | groups id (day buckets are [`keys::ALL_GROUPS`]) |
//! | state | [`keys::push_chunk_state`] |
//!
//! A value that does not begin with `0x20` is one bucket's state at the
//! value's key (format 7 and before stored one key per bucket): it reads
//! as a one-bucket chunk, and the format-8 upgrade gathers such values
//! into chunks (`writer/upgrade.rs`).
//!
//! **Invariants:** a chunk never spans two (generation, level) prefixes;
//! its buckets lie in its range; it is never empty (a chunk left without
//! buckets is removed and the chunk before it covers its range, which holds
//! none). Writing ([`write`]) reads each chunk a run of deltas falls in,
//! merges the two sorted runs, splits what passes [`MAX_ENTRIES`] and puts
//! the result in the caller's batch, which also records the materialised
//! position: a crash leaves either every chunk of a bulk or none.

use std::ops::Bound;

use fjall::Readable;
use tally_meter::AggState;

use crate::StoreError;
use crate::keys::{self, ROLLUP_KEY_LEN, RollupKey};

/// Most buckets a chunk holds: a write of a chunk reads and rewrites at
/// most this many states.
pub const MAX_ENTRIES: usize = 128;
const CHUNK_TAG: u8 = 0x20;

/// Where a level's fields lie in a key, and their units.
#[derive(Clone, Copy)]
struct Shape {
    day: bool,
    /// Minutes per bucket.
    unit: u64,
}

fn be(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0, |v, b| (v << 8) | u64::from(*b))
}

fn put_be(out: &mut [u8], v: u64) {
    let len = out.len();
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = (v >> (8 * (len - 1 - i))) as u8;
    }
}

impl Shape {
    fn of(key: &[u8]) -> Result<Shape, StoreError> {
        let (day, unit) = match key.get(4) {
            Some(0) => (false, 1),
            Some(1) => (false, 60),
            Some(2) => (true, 1_440),
            _ => return Err(StoreError::Corrupt("rollup level")),
        };
        Ok(Shape { day, unit })
    }

    /// Units of `a` and `b`, and the widths of their bytes.
    fn units(self) -> ((u64, usize), (u64, usize)) {
        if self.day {
            ((self.unit, 5), (1, 4))
        } else {
            ((1, 4), (self.unit, 5))
        }
    }

    fn split(self, key: &RollupKey) -> (u64, u64, u32) {
        let ((_, wa), _) = self.units();
        let groups = u32::from_be_bytes([key[14], key[15], key[16], key[17]]);
        (be(&key[5..5 + wa]), be(&key[5 + wa..14]), groups)
    }

    fn join(self, prefix: &[u8], a: u64, b: u64, groups: u32) -> Result<RollupKey, StoreError> {
        let ((_, wa), (_, wb)) = self.units();
        if a >> (8 * wa) != 0 || b >> (8 * wb) != 0 {
            return Err(StoreError::Corrupt("rollup chunk key out of range"));
        }
        let mut key = [0u8; ROLLUP_KEY_LEN];
        key[..5].copy_from_slice(&prefix[..5]);
        put_be(&mut key[5..5 + wa], a);
        put_be(&mut key[5 + wa..14], b);
        key[14..].copy_from_slice(&groups.to_be_bytes());
        Ok(key)
    }
}

fn rollup_key(bytes: &[u8]) -> Result<RollupKey, StoreError> {
    bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("rollup key length"))
}

/// Appends the chunk of `entries` (sorted, each key once, none before
/// `chunk_key`, all of its generation and level) stored at `chunk_key`.
pub fn encode<S: std::borrow::Borrow<AggState>>(
    chunk_key: &RollupKey,
    entries: &[(RollupKey, S)],
    out: &mut Vec<u8>,
) -> Result<(), StoreError> {
    let shape = Shape::of(chunk_key)?;
    let ((ua, _), (ub, _)) = shape.units();
    let (mut pa, mut pb, _) = shape.split(chunk_key);
    let mut previous: Option<&RollupKey> = None;
    out.push(CHUNK_TAG);
    for (key, state) in entries {
        if key[..5] != chunk_key[..5] || key < chunk_key || previous.is_some_and(|p| p >= key) {
            return Err(StoreError::Corrupt("rollup chunk entries out of order"));
        }
        let (a, b, groups) = shape.split(key);
        let (da, db) = (a - pa, b as i64 - pb as i64);
        if da % ua != 0 || db % ub as i64 != 0 {
            return Err(StoreError::Corrupt(
                "rollup bucket not aligned to its level",
            ));
        }
        keys::push_varint(out, u128::from(da / ua));
        let db = db / ub as i64;
        keys::push_varint(out, ((db << 1) ^ (db >> 63)) as u64 as u128);
        if shape.day {
            if groups != keys::ALL_GROUPS {
                return Err(StoreError::Corrupt("a day bucket names groups"));
            }
        } else {
            keys::push_varint(out, u128::from(groups));
        }
        keys::push_chunk_state(state.borrow(), out);
        (pa, pb, previous) = (a, b, Some(key));
    }
    Ok(())
}

/// The buckets of a stored chunk, in key order, each with its encoded
/// state (for [`keys::decode_rollup_value`]).
pub struct Entries<'a> {
    shape: Shape,
    prefix: [u8; 5],
    a: u64,
    b: u64,
    rest: &'a [u8],
    /// A format-7 value: one bucket at the chunk's key.
    single: Option<(RollupKey, &'a [u8])>,
}

/// Reads the chunk stored at `key`.
pub fn entries<'a>(key: &[u8], value: &'a [u8]) -> Result<Entries<'a>, StoreError> {
    let chunk_key = rollup_key(key)?;
    let shape = Shape::of(&chunk_key)?;
    let (a, b, _) = shape.split(&chunk_key);
    let mut prefix = [0u8; 5];
    prefix.copy_from_slice(&chunk_key[..5]);
    let (rest, single) = match value.split_first() {
        Some((&CHUNK_TAG, rest)) => (rest, None),
        Some(_) => (&[][..], Some((chunk_key, value))),
        None => return Err(StoreError::Corrupt("empty rollup value")),
    };
    Ok(Entries {
        shape,
        prefix,
        a,
        b,
        rest,
        single,
    })
}

impl<'a> Entries<'a> {
    fn next_entry(&mut self) -> Result<(RollupKey, &'a [u8]), StoreError> {
        let ((ua, _), (ub, _)) = self.shape.units();
        let too_far = || StoreError::Corrupt("rollup chunk key out of range");
        let da = u64::try_from(keys::take_varint(&mut self.rest)?).map_err(|_| too_far())?;
        let z = u64::try_from(keys::take_varint(&mut self.rest)?).map_err(|_| too_far())?;
        let db = ((z >> 1) as i64) ^ -((z & 1) as i64);
        self.a = da
            .checked_mul(ua)
            .and_then(|d| self.a.checked_add(d))
            .ok_or_else(too_far)?;
        self.b = db
            .checked_mul(ub as i64)
            .and_then(|d| self.b.checked_add_signed(d))
            .ok_or_else(too_far)?;
        let groups = if self.shape.day {
            keys::ALL_GROUPS
        } else {
            u32::try_from(keys::take_varint(&mut self.rest)?).map_err(|_| too_far())?
        };
        let key = self.shape.join(&self.prefix, self.a, self.b, groups)?;
        Ok((key, keys::take_chunk_state(&mut self.rest)?))
    }
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<(RollupKey, &'a [u8]), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(single) = self.single.take() {
            return Some(Ok(single));
        }
        if self.rest.is_empty() {
            return None;
        }
        let entry = self.next_entry();
        if entry.is_err() {
            // A damaged chunk is reported once, never misread further.
            self.rest = &[];
        }
        Some(entry)
    }
}

/// Every bucket of the chunk stored at `key`, decoded.
pub fn decode_all(key: &[u8], value: &[u8]) -> Result<Vec<(RollupKey, AggState)>, StoreError> {
    entries(key, value)?
        .map(|entry| {
            let (key, raw) = entry?;
            Ok((key, keys::decode_rollup_value(raw)?))
        })
        .collect()
}

/// Calls `f` with every stored bucket whose key is in `[start, end)`, in
/// key order; `start` begins with a generation and level. Stops at the
/// first error `f` returns.
pub fn each_in<E: From<StoreError>>(
    snapshot: &fjall::Snapshot,
    rollups: &fjall::Keyspace,
    start: &[u8],
    end: &[u8],
    mut f: impl FnMut(&RollupKey, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let prefix = start
        .get(..5)
        .ok_or(StoreError::Corrupt("a rollup range without its level"))?;
    // The chunk whose range `start` falls in, if it is keyed before it.
    let before = snapshot
        .range::<&[u8], _>(rollups, (Bound::Included(prefix), Bound::Excluded(start)))
        .next_back();
    for item in before
        .into_iter()
        .chain(snapshot.range(rollups, start..end))
    {
        let (key, value) = item.into_inner().map_err(StoreError::from)?;
        for entry in entries(&key, &value)? {
            let (key, raw) = entry?;
            if key.as_slice() < start {
                continue;
            }
            if key.as_slice() >= end {
                break;
            }
            f(&key, raw)?;
        }
    }
    Ok(())
}

/// The first and the last bucket key stored under `prefix` (a generation
/// and level).
pub fn first_and_last(
    snapshot: &fjall::Snapshot,
    rollups: &fjall::Keyspace,
    prefix: &[u8],
) -> Result<Option<(RollupKey, RollupKey)>, StoreError> {
    let mut chunks = snapshot.prefix(rollups, prefix);
    let Some(first) = chunks.next() else {
        return Ok(None);
    };
    let (key, value) = first.into_inner()?;
    let lo = entries(&key, &value)?
        .next()
        .ok_or(StoreError::Corrupt("an empty rollup chunk"))??
        .0;
    let hi = match chunks.next_back() {
        Some(last) => {
            let (key, value) = last.into_inner()?;
            entries(&key, &value)?
                .last()
                .ok_or(StoreError::Corrupt("an empty rollup chunk"))??
                .0
        }
        None => {
            entries(&key, &value)?
                .last()
                .ok_or(StoreError::Corrupt("an empty rollup chunk"))??
                .0
        }
    };
    Ok(Some((lo, hi)))
}

/// What [`write`] does with a run of deltas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Merge each delta into its bucket (a new bucket starts with it).
    Add,
    /// Take each delta back out of its bucket, which must exist; a bucket
    /// left with no event is removed.
    Retract,
}

/// The stored chunk covering `key` (the last at or before it in its
/// generation and level), and the key of the chunk after it.
type Covering = (Option<(RollupKey, fjall::Slice)>, Option<RollupKey>);

fn covering(
    snapshot: &fjall::Snapshot,
    rollups: &fjall::Keyspace,
    key: &RollupKey,
) -> Result<Covering, StoreError> {
    let prefix = &key[..5];
    let chunk = match snapshot
        .range::<&[u8], _>(
            rollups,
            (Bound::Included(prefix), Bound::Included(&key[..])),
        )
        .next_back()
    {
        Some(item) => {
            let (k, v) = item.into_inner()?;
            Some((rollup_key(&k)?, v))
        }
        None => None,
    };
    let mut upper = [0xffu8; ROLLUP_KEY_LEN];
    upper[..5].copy_from_slice(prefix);
    let next = match snapshot
        .range::<&[u8], _>(
            rollups,
            (Bound::Excluded(&key[..]), Bound::Included(&upper[..])),
        )
        .next()
    {
        Some(item) => Some(rollup_key(&item.key()?)?),
        None => None,
    };
    Ok((chunk, next))
}

/// Merges `deltas` (sorted, each key once) into the chunks of `snapshot`
/// they fall in, adding the rewritten chunks to `batch`; chunks hold at
/// most `max` buckets. `encoded` is a reused buffer.
pub fn write(
    snapshot: &fjall::Snapshot,
    rollups: &fjall::Keyspace,
    batch: &mut fjall::OwnedWriteBatch,
    deltas: Vec<(RollupKey, AggState)>,
    op: Op,
    max: usize,
    encoded: &mut Vec<u8>,
) -> Result<(), StoreError> {
    let mut deltas = deltas.into_iter().peekable();
    while let Some((first, _)) = deltas.peek() {
        let first = *first;
        let (chunk, next) = covering(snapshot, rollups, &first)?;
        let mut run = Vec::new();
        while let Some((key, _)) = deltas.peek() {
            if key[..5] != first[..5] || next.is_some_and(|n| *key >= n) {
                break;
            }
            run.extend(deltas.next());
        }
        let (start, stored) = match &chunk {
            Some((key, value)) => (*key, decode_all(key, value)?),
            None => (first, Vec::new()),
        };
        let merged = merge(stored, run, op)?;
        put_pieces(
            batch,
            rollups,
            start,
            chunk.is_some(),
            &merged,
            max,
            encoded,
        )?;
    }
    Ok(())
}

/// Two sorted runs as one (see [`Op`]).
pub fn merge(
    stored: Vec<(RollupKey, AggState)>,
    deltas: Vec<(RollupKey, AggState)>,
    op: Op,
) -> Result<Vec<(RollupKey, AggState)>, StoreError> {
    let mut out = Vec::with_capacity(stored.len() + deltas.len());
    let mut stored = stored.into_iter().peekable();
    for (key, delta) in deltas {
        while let Some(s) = stored.next_if(|(k, _)| *k < key) {
            out.push(s);
        }
        match (stored.next_if(|(k, _)| *k == key), op) {
            (Some((_, mut state)), Op::Add) => {
                state.merge(&delta).map_err(StoreError::State)?;
                out.push((key, state));
            }
            (Some((_, mut state)), Op::Retract) => {
                if !state.retract(&delta).map_err(StoreError::State)? {
                    out.push((key, state));
                }
            }
            (None, Op::Add) => out.push((key, delta)),
            (None, Op::Retract) => {
                return Err(StoreError::Corrupt(
                    "a voided event's rollup bucket is missing",
                ));
            }
        }
    }
    out.extend(stored);
    Ok(out)
}

/// Stores `merged`, the buckets of the range starting at `start`, as
/// chunks of at most `max` (as even as can be); removes the chunk at
/// `start` (when `existed`) if no bucket is left.
fn put_pieces(
    batch: &mut fjall::OwnedWriteBatch,
    rollups: &fjall::Keyspace,
    start: RollupKey,
    existed: bool,
    merged: &[(RollupKey, AggState)],
    max: usize,
    encoded: &mut Vec<u8>,
) -> Result<(), StoreError> {
    if merged.is_empty() {
        if existed {
            batch.remove(rollups, start);
        }
        return Ok(());
    }
    let pieces = merged.len().div_ceil(max.max(1));
    for (i, piece) in merged.chunks(merged.len().div_ceil(pieces)).enumerate() {
        let key = if i == 0 { start } else { piece[0].0 };
        encoded.clear();
        encode(&key, piece, encoded)?;
        batch.insert(rollups, key, encoded.as_slice());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;
    use tally_meter::Level;

    use super::*;

    /// A bucket key from small numbers: generation 1 or 2, a level, a
    /// subject, the bucket's index at its level (negative too), groups.
    fn key((generation, level, subject, bucket, groups): (u64, u8, u32, i64, u32)) -> RollupKey {
        let level = [Level::Minute, Level::Hour, Level::Day][usize::from(level)];
        let groups = if level == Level::Day {
            keys::ALL_GROUPS
        } else {
            groups
        };
        keys::rollup_key(generation, level, subject, bucket * level.seconds(), groups).unwrap()
    }

    fn key_spec() -> impl Strategy<Value = (u64, u8, u32, i64, u32)> {
        (1u64..3, 0u8..3, 0u32..5, -20i64..40, 0u32..3)
    }

    /// Every chunk of the store: its key and buckets, in key order.
    fn stored(
        db: &fjall::Database,
        rollups: &fjall::Keyspace,
    ) -> Vec<(RollupKey, Vec<(RollupKey, AggState)>)> {
        let snapshot = db.snapshot();
        snapshot
            .iter(rollups)
            .map(|item| {
                let (k, v) = item.into_inner().unwrap();
                (rollup_key(&k).unwrap(), decode_all(&k, &v).unwrap())
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Rounds of additions and retractions written as chunks read back
        /// as a naive map of counts, by chunk and by any range; chunks keep
        /// their invariants (never empty, at most `max` buckets, buckets in
        /// their range, one generation and level each).
        #[test]
        fn chunks_hold_what_a_naive_map_holds(
            rounds in prop::collection::vec(
                prop::collection::vec((key_spec(), 1u64..4, any::<bool>()), 0..60),
                1..6,
            ),
            max in 1usize..9,
            ranges in prop::collection::vec((key_spec(), key_spec()), 4),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let db = fjall::Database::builder(dir.path()).open().unwrap();
            let rollups = db.keyspace("rollups", fjall::KeyspaceCreateOptions::default).unwrap();
            let mut model: BTreeMap<RollupKey, u64> = BTreeMap::new();
            let mut encoded = Vec::new();
            for round in rounds {
                let (mut adds, mut takes) = (BTreeMap::new(), BTreeMap::new());
                for (spec, n, retract) in round {
                    let k = key(spec);
                    let held = model.get(&k).copied().unwrap_or(0)
                        - takes.get(&k).copied().unwrap_or(0);
                    if retract && held > 0 && !adds.contains_key(&k) {
                        *takes.entry(k).or_insert(0) += n.min(held);
                    } else if !takes.contains_key(&k) {
                        *adds.entry(k).or_insert(0) += n;
                    }
                }
                for (ops, op) in [(adds, Op::Add), (takes, Op::Retract)] {
                    let deltas: Vec<_> = ops.iter().map(|(k, n)| (*k, AggState::Count(*n))).collect();
                    let mut batch = db.batch();
                    write(&db.snapshot(), &rollups, &mut batch, deltas, op, max, &mut encoded).unwrap();
                    batch.commit().unwrap();
                    for (k, n) in ops {
                        let held = model.entry(k).or_insert(0);
                        if op == Op::Add { *held += n } else { *held -= n }
                    }
                    model.retain(|_, n| *n > 0);
                }
            }
            let chunks = stored(&db, &rollups);
            let mut all = Vec::new();
            for (i, (chunk_key, buckets)) in chunks.iter().enumerate() {
                prop_assert!(!buckets.is_empty() && buckets.len() <= max);
                let next = chunks.get(i + 1).map(|(k, _)| *k);
                for (k, _) in buckets {
                    prop_assert!(k >= chunk_key && k[..5] == chunk_key[..5]);
                    prop_assert!(next.is_none_or(|n| *k < n));
                }
                all.extend(buckets.iter().cloned());
            }
            let expected: Vec<_> = model.iter().map(|(k, n)| (*k, AggState::Count(*n))).collect();
            prop_assert_eq!(&all, &expected);
            let snapshot = db.snapshot();
            for (a, b) in ranges {
                let (a, b) = (key(a), key(b));
                let (start, end) = (a.min(b), a.max(b));
                let mut read = Vec::new();
                each_in(&snapshot, &rollups, &start, &end, |k, raw| {
                    read.push((*k, keys::decode_rollup_value(raw)?));
                    Ok::<_, StoreError>(())
                }).unwrap();
                let want: Vec<_> = expected.iter().filter(|(k, _)| *k >= start && *k < end).cloned().collect();
                prop_assert_eq!(read, want);
            }
        }
    }

    #[test]
    fn every_state_round_trips_and_damage_is_refused() {
        let d = |s: &str| s.parse::<rust_decimal::Decimal>().unwrap();
        let states = [
            AggState::Sum {
                sum: d("-12.5"),
                count: 3,
            },
            AggState::Count(u64::MAX),
            AggState::UniqueCount(BTreeSet::from(["a".to_owned(), String::new()])),
            AggState::Latest {
                time_ns: -5,
                seq: 9,
                value: d("1.25"),
            },
            AggState::Min(rust_decimal::Decimal::MIN),
            AggState::Max(d("7")),
            AggState::Avg {
                sum: d("0.001"),
                count: 0,
            },
        ];
        let entries: Vec<_> = states
            .iter()
            .enumerate()
            .map(|(i, s)| (key((1, 1, 7, i as i64 * 3 - 4, i as u32 % 2)), s.clone()))
            .collect();
        let mut encoded = Vec::new();
        encode(&entries[0].0, &entries, &mut encoded).unwrap();
        assert_eq!(decode_all(&entries[0].0, &encoded).unwrap(), entries);
        // A format-7 value is one bucket at its key.
        let mut single = Vec::new();
        keys::encode_rollup_value(&states[0], &mut single);
        assert_eq!(
            decode_all(&entries[0].0, &single).unwrap(),
            vec![(entries[0].0, states[0].clone())]
        );
        // A cut inside the last bucket is refused, never misread.
        assert!(decode_all(&entries[0].0, &encoded[..encoded.len() - 1]).is_err());
        // Out of order, outside the chunk's level, or unaligned: refused.
        let swapped = [entries[1].clone(), entries[0].clone()];
        assert!(encode(&entries[0].0, &swapped, &mut Vec::new()).is_err());
        assert!(encode(&key((1, 0, 0, 0, 0)), &entries[..1], &mut Vec::new()).is_err());
        let mut unaligned = key((1, 1, 7, 0, 0));
        unaligned[13] ^= 1;
        assert!(
            encode(
                &entries[0].0,
                &[(unaligned, states[1].clone())],
                &mut Vec::new()
            )
            .is_err()
        );
    }
}
