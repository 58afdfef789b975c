//! Byte layouts of the store's keyspaces. Every key sorts the way it is scanned.
//!
//! | keyspace     | key                                                        | value |
//! |--------------|------------------------------------------------------------|-------|
//! | `log`        | first seq of the block (u64 BE)                            | an event block: see [`crate::block`] |
//! | `dedupe`     | sorted runs of 32-bit key hashes with log positions, and their marks: see [`crate::dedupe`] | |
//! | `rollups`    | minute and hour: meter generation (u32 BE), level (u8), subject id (u32 BE), bucket start in minutes (40 bits, offset 2^39, BE), groups id (u32 BE): 18 bytes | the bucket's state: see [`encode_rollup_value`] |
//! | `rollups`    | day: meter generation (u32 BE), level (u8), bucket start (40 bits), subject id (u32 BE), [`ALL_GROUPS`] (u32 BE): 18 bytes | the state of every group: see [`encode_rollup_value`] |
//! | `quarantine` | meter (u16 len + bytes; empty = no meter), seq (u64 BE)    | JSON [`QuarantineEntry`] |
//! | `voids`      | seq (u64 BE) of the voided event                           | JSON [`tally_ledger::VoidRecord`] |
//! | `void_order` | void ordinal (u64 BE, 0, 1, ... in recording order)        | seq (u64 BE) of the voided event |
//! | `catalog`    | kind `/` name                                              | manifest JSON |
//! | `meta`       | `meter/<name>`                                             | JSON [`MeterState`] |
//! | `meta`       | `materialised`                                             | log position (u64 BE): rollups, quarantine and dictionary hold every event below it |
//! | `meta`       | `dict/i/` id (u32 BE)                                      | dictionary entry: `s` + subject, or `g` + count (u32 BE) + groups |
//! | `meta`       | `dict/n/` dictionary entry                                 | id (u32 BE) |

use jiff::Timestamp;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tally_meter::{AggState, Level};
use tally_model::{CloudEvent, Kind};

use crate::StoreError;

pub fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

pub fn read_u64(bytes: &[u8]) -> Result<u64, StoreError> {
    let arr: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or(StoreError::Corrupt("short u64"))?;
    Ok(u64::from_be_bytes(arr))
}

fn read_i64(bytes: &[u8]) -> Result<i64, StoreError> {
    read_u64(bytes).map(|u| u as i64)
}

fn push_str16(out: &mut Vec<u8>, s: &str) -> Result<(), StoreError> {
    let len = u16::try_from(s.len())
        .map_err(|_| StoreError::TooLong("a subject, type or meter name", 65_535))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn take_str16<'a>(bytes: &mut &'a [u8]) -> Result<&'a str, StoreError> {
    let len = bytes
        .get(..2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
        .ok_or(StoreError::Corrupt("short length"))?;
    let s = bytes
        .get(2..2 + len)
        .ok_or(StoreError::Corrupt("short string"))?;
    *bytes = &bytes[2 + len..];
    std::str::from_utf8(s).map_err(|_| StoreError::Corrupt("utf-8"))
}

// ---- events (format 5 and before) -------------------------------------------
//
// Up to format 5 the log was one key per event in the `events` keyspace:
// seq (u64 BE) → ingested_at ns (i64 BE), type (u16 len + bytes), event
// JSON. Read only to move such a log into blocks (`writer/upgrade.rs`).

pub fn decode_event(value: &[u8]) -> Result<(Timestamp, CloudEvent), StoreError> {
    let ingested = Timestamp::from_nanosecond(i128::from(read_i64(value)?))
        .map_err(|_| StoreError::Corrupt("ingest time"))?;
    let mut rest = value.get(8..).ok_or(StoreError::Corrupt("short event"))?;
    take_str16(&mut rest)?;
    let event = serde_json::from_slice(rest).map_err(|e| StoreError::Decode(e.to_string()))?;
    Ok((ingested, event))
}

// ---- dedupe ---------------------------------------------------------------

/// The dedupe key of (source, id): the exact pair, behind a 64-bit hash of
/// it. The hash decides almost every comparison in the memtable's skiplist
/// within its first bytes (fjall compares a 4-byte inline prefix before it
/// follows the key's pointer), where the bare pair begins with the same
/// source bytes in nearly every key. The pair itself keeps the index exact.
pub fn dedupe_key(source: &str, id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + source.len() + id.len());
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&(source.len() as u32).to_be_bytes());
    out.extend_from_slice(source.as_bytes());
    out.extend_from_slice(id.as_bytes());
    let hash = xxhash_rust::xxh3::xxh3_64(&out[8..]);
    out[..8].copy_from_slice(&hash.to_be_bytes());
    out
}

/// The key, in `dedupe`, of the log position its runs include (see
/// [`crate::dedupe`]).
pub const DEDUPE_MARK: &[u8] = b"\0position";

pub fn dedupe_value(seq: u64, expires_at: i64) -> [u8; 16] {
    let mut out = [0; 16];
    out[..8].copy_from_slice(&seq.to_be_bytes());
    out[8..].copy_from_slice(&expires_at.to_be_bytes());
    out
}

/// (seq, expires_at seconds)
pub fn decode_dedupe(value: &[u8]) -> Result<(u64, i64), StoreError> {
    Ok((
        read_u64(value)?,
        read_i64(value.get(8..).ok_or(StoreError::Corrupt("dedupe"))?)?,
    ))
}

// ---- rollups --------------------------------------------------------------
//
// A rollup key is 18 bytes: generation (u32 BE), level (u8), subject id
// (u32 BE), bucket start in minutes since the epoch (40-bit, offset by 2^39,
// BE), groups id (u32 BE). Subjects and group tuples are interned in the
// dictionary (`meta` keys `dict/i/<id>` and `dict/n/<entry>`, see
// [`crate::dict`]). A key of at most 20 bytes is stored inline by fjall's
// memtable, so comparing two keys never leaves the skiplist node: the
// writer's rollup lookups and inserts cost half the cache misses of a key
// that spells its subject and groups out.
//
// Minute and hour keys are subject-major: one subject's usage over a month
// is one short range. Day keys are time-major and hold every group of a
// subject's day in one state (groups id [`ALL_GROUPS`]): a daily question
// across all subjects reads exactly its days, one entry per subject and
// day, whatever the store's history and however many group values there
// are. Queries that need group values read hours instead.
//
// Invariant: every minute and hour bucket of a subject has the day bucket
// that contains it (they are written in the same batch, and voids and
// rebuilds change all three), so the day level tells which subjects have
// any usage on a day.

/// The groups id of day buckets: all of a subject's groups merged. Never
/// handed out by the dictionary.
pub const ALL_GROUPS: u32 = u32::MAX;

/// Length of a rollup key.
pub const ROLLUP_KEY_LEN: usize = 18;
/// A rollup key; see the layout above.
pub type RollupKey = [u8; ROLLUP_KEY_LEN];

const BUCKET_OFFSET: i64 = 1 << 39;

fn generation_bytes(generation: u64) -> Result<[u8; 4], StoreError> {
    u32::try_from(generation)
        .map(u32::to_be_bytes)
        .map_err(|_| StoreError::TooLong("a meter generation", u32::MAX as usize))
}

/// A bucket start (seconds) as 40-bit minutes; order preserving. Times
/// jiff can represent are far inside the range.
fn bucket_bytes(bucket: i64) -> Result<[u8; 5], StoreError> {
    let minutes = bucket.div_euclid(60) + BUCKET_OFFSET;
    if !(0..2 * BUCKET_OFFSET).contains(&minutes) {
        return Err(StoreError::Corrupt(
            "bucket outside the representable range",
        ));
    }
    let b = (minutes as u64).to_be_bytes();
    Ok([b[3], b[4], b[5], b[6], b[7]])
}

fn bucket_of(bytes: &[u8]) -> i64 {
    let mut b = [0u8; 8];
    b[3..].copy_from_slice(&bytes[..5]);
    (u64::from_be_bytes(b) as i64 - BUCKET_OFFSET) * 60
}

/// The prefix of every rollup of one meter generation.
pub fn rollup_generation_prefix(generation: u64) -> Result<[u8; 4], StoreError> {
    generation_bytes(generation)
}

/// The prefix of every rollup of one meter generation at one level.
pub fn rollup_level_prefix(generation: u64, level: Level) -> Result<[u8; 5], StoreError> {
    let g = generation_bytes(generation)?;
    Ok([g[0], g[1], g[2], g[3], level.as_u8()])
}

/// The key range of a subject's buckets starting in `[lo, hi]` (seconds), at
/// the subject-major levels (minute and hour).
pub fn rollup_subject_range(
    generation: u64,
    level: Level,
    subject: u32,
    lo: i64,
    hi: i64,
) -> Result<(Vec<u8>, Vec<u8>), StoreError> {
    if level == Level::Day {
        return Err(StoreError::Corrupt("day buckets are time-major"));
    }
    let mut start = rollup_level_prefix(generation, level)?.to_vec();
    start.extend_from_slice(&subject.to_be_bytes());
    let mut end = start.clone();
    start.extend_from_slice(&bucket_bytes(lo)?);
    // The first bucket after `hi`: one minute later sorts after every key of `hi`.
    end.extend_from_slice(&bucket_bytes(hi.saturating_add(60))?);
    Ok((start, end))
}

/// The key range of every subject's day buckets starting in `[lo, hi]`
/// (seconds).
pub fn rollup_day_range(
    generation: u64,
    lo: i64,
    hi: i64,
) -> Result<(Vec<u8>, Vec<u8>), StoreError> {
    let prefix = rollup_level_prefix(generation, Level::Day)?;
    let mut start = prefix.to_vec();
    start.extend_from_slice(&bucket_bytes(lo)?);
    let mut end = prefix.to_vec();
    end.extend_from_slice(&bucket_bytes(hi.saturating_add(60))?);
    Ok((start, end))
}

/// The key of a bucket; `groups` must be [`ALL_GROUPS`] at [`Level::Day`].
pub fn rollup_key(
    generation: u64,
    level: Level,
    subject: u32,
    bucket: i64,
    groups: u32,
) -> Result<RollupKey, StoreError> {
    if (level == Level::Day) != (groups == ALL_GROUPS) {
        return Err(StoreError::Corrupt(
            "day buckets, and only they, merge all groups",
        ));
    }
    let mut out = [0u8; ROLLUP_KEY_LEN];
    out[..5].copy_from_slice(&rollup_level_prefix(generation, level)?);
    if level == Level::Day {
        out[5..10].copy_from_slice(&bucket_bytes(bucket)?);
        out[10..14].copy_from_slice(&subject.to_be_bytes());
    } else {
        out[5..9].copy_from_slice(&subject.to_be_bytes());
        out[9..14].copy_from_slice(&bucket_bytes(bucket)?);
    }
    out[14..].copy_from_slice(&groups.to_be_bytes());
    Ok(out)
}

/// Whether a rollup key is a day bucket's.
pub fn is_day_key(key: &RollupKey) -> bool {
    key[4] == Level::Day.as_u8()
}

/// A decoded rollup key (after the generation and level).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodedRollupKey {
    pub subject: u32,
    pub bucket: i64,
    pub groups: u32,
}

pub fn decode_rollup_key(key: &[u8]) -> Result<DecodedRollupKey, StoreError> {
    if key.len() != ROLLUP_KEY_LEN {
        return Err(StoreError::Corrupt("rollup key length"));
    }
    let groups = u32::from_be_bytes([key[14], key[15], key[16], key[17]]);
    if key[4] == Level::Day.as_u8() {
        Ok(DecodedRollupKey {
            subject: u32::from_be_bytes([key[10], key[11], key[12], key[13]]),
            bucket: bucket_of(&key[5..10]),
            groups,
        })
    } else {
        Ok(DecodedRollupKey {
            subject: u32::from_be_bytes([key[5], key[6], key[7], key[8]]),
            bucket: bucket_of(&key[9..14]),
            groups,
        })
    }
}

// ---- rollup values ----------------------------------------------------------
//
// A rollup value is its bucket's [`AggState`]. Format 7 writes the common
// states compactly (varint: LEB128, 7 bits a byte, low first; zigzag:
// 0, -1, 1, -2, ... as 0, 1, 2, 3, ...):
//
// | tag    | state              | then |
// |--------|--------------------|------|
// | `0x11` | SUM                | scale (u8), zigzag varint mantissa (i128), varint count |
// | `0x12` | COUNT              | varint count |
// | `0x14` | AVG                | scale (u8), zigzag varint mantissa (i128), varint count |
// | `0x15` | MIN                | scale (u8), zigzag varint mantissa (i128) |
// | `0x16` | MAX                | scale (u8), zigzag varint mantissa (i128) |
// | 1–7    | any (format 6 and before; still written for UNIQUE_COUNT and LATEST) | [`AggState::encode`] |
//
// Both are read: a value written before format 7 keeps its layout until its
// bucket is written again.

const SUM_TAG: u8 = 0x11;
const COUNT_TAG: u8 = 0x12;
const AVG_TAG: u8 = 0x14;
const MIN_TAG: u8 = 0x15;
const MAX_TAG: u8 = 0x16;
/// A varint of a u128 is at most this long.
const MAX_VARINT_LEN: usize = 19;

fn push_varint(out: &mut Vec<u8>, mut v: u128) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn take_varint(bytes: &mut &[u8]) -> Result<u128, StoreError> {
    let mut v: u128 = 0;
    for (i, &b) in bytes.iter().take(MAX_VARINT_LEN).enumerate() {
        v |= u128::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            *bytes = &bytes[i + 1..];
            return Ok(v);
        }
    }
    Err(StoreError::Corrupt("rollup value varint"))
}

fn push_decimal(out: &mut Vec<u8>, d: &Decimal) {
    let m = d.mantissa();
    // Scales are 0..=28.
    out.push(d.scale() as u8);
    push_varint(out, ((m << 1) ^ (m >> 127)) as u128);
}

fn take_decimal(bytes: &mut &[u8]) -> Result<Decimal, StoreError> {
    let (&scale, rest) = bytes
        .split_first()
        .ok_or(StoreError::Corrupt("short rollup value"))?;
    *bytes = rest;
    let z = take_varint(bytes)?;
    let m = ((z >> 1) as i128) ^ -((z & 1) as i128);
    Decimal::try_from_i128_with_scale(m, u32::from(scale))
        .map_err(|_| StoreError::Corrupt("rollup value decimal"))
}

fn take_count(bytes: &mut &[u8]) -> Result<u64, StoreError> {
    u64::try_from(take_varint(bytes)?).map_err(|_| StoreError::Corrupt("rollup value count"))
}

/// Appends a rollup value (see the table above).
pub fn encode_rollup_value(state: &AggState, out: &mut Vec<u8>) {
    match state {
        AggState::Sum { sum, count } | AggState::Avg { sum, count } => {
            out.push(if matches!(state, AggState::Sum { .. }) {
                SUM_TAG
            } else {
                AVG_TAG
            });
            push_decimal(out, sum);
            push_varint(out, u128::from(*count));
        }
        AggState::Count(n) => {
            out.push(COUNT_TAG);
            push_varint(out, u128::from(*n));
        }
        AggState::Min(d) => {
            out.push(MIN_TAG);
            push_decimal(out, d);
        }
        AggState::Max(d) => {
            out.push(MAX_TAG);
            push_decimal(out, d);
        }
        AggState::UniqueCount(_) | AggState::Latest { .. } => state.encode(out),
    }
}

/// Reads a rollup value of either layout.
pub fn decode_rollup_value(bytes: &[u8]) -> Result<AggState, StoreError> {
    let (&tag, mut rest) = bytes
        .split_first()
        .ok_or(StoreError::Corrupt("empty rollup value"))?;
    let state = match tag {
        SUM_TAG => AggState::Sum {
            sum: take_decimal(&mut rest)?,
            count: take_count(&mut rest)?,
        },
        AVG_TAG => AggState::Avg {
            sum: take_decimal(&mut rest)?,
            count: take_count(&mut rest)?,
        },
        COUNT_TAG => AggState::Count(take_count(&mut rest)?),
        MIN_TAG => AggState::Min(take_decimal(&mut rest)?),
        MAX_TAG => AggState::Max(take_decimal(&mut rest)?),
        _ => return AggState::decode(bytes).map_err(StoreError::State),
    };
    if !rest.is_empty() {
        return Err(StoreError::Corrupt("trailing rollup value bytes"));
    }
    Ok(state)
}

// ---- dictionary -------------------------------------------------------------

/// `meta` prefix of id → entry.
pub const DICT_ID_PREFIX: &[u8] = b"dict/i/";
/// `meta` prefix of entry → id.
pub const DICT_NAME_PREFIX: &[u8] = b"dict/n/";

pub fn dict_id_key(id: u32) -> Vec<u8> {
    let mut out = DICT_ID_PREFIX.to_vec();
    out.extend_from_slice(&id.to_be_bytes());
    out
}

pub fn dict_name_key(entry: &[u8]) -> Vec<u8> {
    let mut out = DICT_NAME_PREFIX.to_vec();
    out.extend_from_slice(entry);
    out
}

const SUBJECT_TAG: u8 = b's';
const GROUPS_TAG: u8 = b'g';

/// One interned value: a subject, or the group values of one sample.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DictEntry {
    Subject(String),
    Groups(Vec<Option<String>>),
}

impl DictEntry {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            DictEntry::Subject(s) => subject_entry(s),
            DictEntry::Groups(groups) => groups_entry(groups),
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<DictEntry, StoreError> {
        match bytes.split_first() {
            Some((&SUBJECT_TAG, rest)) => Ok(DictEntry::Subject(
                std::str::from_utf8(rest)
                    .map_err(|_| StoreError::Corrupt("utf-8"))?
                    .to_owned(),
            )),
            Some((&GROUPS_TAG, rest)) => {
                let count = rest
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
                    .ok_or(StoreError::Corrupt("short group count"))?;
                let mut rest = &rest[4..];
                let mut groups = Vec::with_capacity(count.min(64));
                for _ in 0..count {
                    match rest.first() {
                        Some(0) => {
                            groups.push(None);
                            rest = &rest[1..];
                        }
                        Some(1) => {
                            let len = read_u32(&rest[1..])? as usize;
                            let raw = rest
                                .get(5..5 + len)
                                .ok_or(StoreError::Corrupt("short group"))?;
                            groups.push(Some(
                                std::str::from_utf8(raw)
                                    .map_err(|_| StoreError::Corrupt("utf-8"))?
                                    .to_owned(),
                            ));
                            rest = &rest[5 + len..];
                        }
                        _ => return Err(StoreError::Corrupt("group tag")),
                    }
                }
                if !rest.is_empty() {
                    return Err(StoreError::Corrupt("trailing group bytes"));
                }
                Ok(DictEntry::Groups(groups))
            }
            _ => Err(StoreError::Corrupt("dictionary entry tag")),
        }
    }
}

pub fn subject_entry(subject: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + subject.len());
    out.push(SUBJECT_TAG);
    out.extend_from_slice(subject.as_bytes());
    out
}

pub fn groups_entry(groups: &[Option<String>]) -> Vec<u8> {
    let mut out = vec![GROUPS_TAG];
    out.extend_from_slice(&(groups.len() as u32).to_be_bytes());
    for g in groups {
        match g {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                out.extend_from_slice(v.as_bytes());
            }
        }
    }
    out
}

fn read_u32(bytes: &[u8]) -> Result<u32, StoreError> {
    bytes
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(StoreError::Corrupt("short u32"))
}

// ---- quarantine -----------------------------------------------------------

pub fn quarantine_prefix(meter: &str) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(2 + meter.len() + 8);
    push_str16(&mut out, meter)?;
    Ok(out)
}

pub fn quarantine_key(meter: &str, seq: u64) -> Result<Vec<u8>, StoreError> {
    let mut out = quarantine_prefix(meter)?;
    out.extend_from_slice(&seq.to_be_bytes());
    Ok(out)
}

/// (meter, seq)
pub fn decode_quarantine_key(key: &[u8]) -> Result<(&str, u64), StoreError> {
    let mut rest = key;
    let meter = take_str16(&mut rest)?;
    Ok((meter, read_u64(rest)?))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuarantineEntry {
    pub reason: String,
    pub message: String,
    #[serde(rename = "type")]
    pub event_type: String,
}

// ---- catalog and meta -----------------------------------------------------

pub fn catalog_key(kind: Kind, name: &str) -> String {
    format!("{}/{name}", kind.as_str())
}

pub fn meter_state_key(name: &str) -> String {
    format!("meter/{name}")
}

/// Where a meter's rollups live and how far its backfill got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeterState {
    /// Rollup key prefix; a new generation on every rebuild.
    pub generation: u64,
    /// Events with a lower seq existed before the meter and are backfilled.
    pub backfill_until: u64,
    /// The next seq the backfill reads.
    pub backfilled_to: u64,
    /// The first seq that arrived after the meter was Retired: events before
    /// it were measured, later ones refused. A rebuild honours the same line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_from: Option<u64>,
}

impl MeterState {
    pub fn ready(&self) -> bool {
        self.backfilled_to >= self.backfill_until
    }
}

pub const GENERATION_COUNTER: &str = "generation";

/// `meta` key of the store's format version (u64 BE). Absent in stores
/// written before versions were kept (format 1).
pub const FORMAT_KEY: &str = "format";

/// The byte layouts this build reads and writes. 2: SUM rollup states carry
/// their event count (`AggState::Sum { sum, count }`). 3: rollup keys are
/// 18 bytes, with subjects and group values interned in the dictionary. 4:
/// day buckets are time-major and merge all groups; dedupe keys begin with
/// a hash. 5: rollups, dedupe, quarantine and dictionary entries may lag
/// the log; `meta` `materialised` (u64 BE) is the log position they
/// include. 6: the log is event blocks in `log` (format 3, 4 and 5 stores
/// are upgraded when opened: see `writer/upgrade.rs`). 7: rollup values
/// are compact (see [`encode_rollup_value`]); format-6 values stay readable,
/// so a format-6 store is only marked 7 when opened.
pub const FORMAT: u64 = 7;
pub const GARBAGE_PREFIX: &str = "garbage/";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollup_keys_round_trip_and_sort_by_bucket() {
        let a = rollup_key(7, Level::Hour, 3, -3600, 9).unwrap();
        let b = rollup_key(7, Level::Hour, 3, 0, 9).unwrap();
        let c = rollup_key(7, Level::Hour, 3, 3600, 1).unwrap();
        let other_subject = rollup_key(7, Level::Hour, 4, -7200, 0).unwrap();
        assert!(a < b && b < c && c < other_subject);
        let k = decode_rollup_key(&a).unwrap();
        assert_eq!((k.subject, k.bucket, k.groups), (3, -3600, 9));
        // A range covers exactly the buckets asked for.
        let (start, end) = rollup_subject_range(7, Level::Hour, 3, 0, 3600).unwrap();
        assert!(a.as_slice() < start.as_slice());
        assert!(start.as_slice() <= b.as_slice() && b.as_slice() < end.as_slice());
        assert!(start.as_slice() <= c.as_slice() && c.as_slice() < end.as_slice());
        let next = rollup_key(7, Level::Hour, 3, 7200, 0).unwrap();
        assert!(next.as_slice() >= end.as_slice());
        // Far past and future times still fit.
        let old = Timestamp::MIN.as_second();
        let new = Timestamp::MAX.as_second();
        for t in [old, new] {
            let bucket = Level::Minute.bucket(t);
            let key = rollup_key(1, Level::Minute, 0, bucket, 0).unwrap();
            assert_eq!(decode_rollup_key(&key).unwrap().bucket, bucket);
        }
        assert!(rollup_key(u64::from(u32::MAX) + 1, Level::Day, 0, 0, ALL_GROUPS).is_err());
        assert!(rollup_key(1, Level::Day, 0, 0, 0).is_err());
        assert!(rollup_key(1, Level::Hour, 0, 0, ALL_GROUPS).is_err());
    }

    #[test]
    fn day_keys_sort_by_day_then_subject() {
        let day = 86_400;
        let a = rollup_key(7, Level::Day, 9, 0, ALL_GROUPS).unwrap();
        let b = rollup_key(7, Level::Day, 2, day, ALL_GROUPS).unwrap();
        let c = rollup_key(7, Level::Day, 3, day, ALL_GROUPS).unwrap();
        let d = rollup_key(7, Level::Day, 0, 2 * day, ALL_GROUPS).unwrap();
        assert!(a < b && b < c && c < d);
        let k = decode_rollup_key(&c).unwrap();
        assert_eq!((k.subject, k.bucket, k.groups), (3, day, ALL_GROUPS));
        let (start, end) = rollup_day_range(7, day, day).unwrap();
        assert!(a.as_slice() < start.as_slice());
        for inside in [b, c] {
            assert!(start.as_slice() <= inside.as_slice() && inside.as_slice() < end.as_slice());
        }
        assert!(d.as_slice() >= end.as_slice());
    }

    #[test]
    fn rollup_values_round_trip_in_either_layout() {
        use std::collections::BTreeSet;
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        for state in [
            AggState::Sum {
                sum: d("99999"),
                count: 1,
            },
            AggState::Sum {
                sum: d("-0.000000000000000000000000001"),
                count: u64::MAX,
            },
            AggState::Sum {
                sum: Decimal::MAX,
                count: 3,
            },
            AggState::Avg {
                sum: Decimal::MIN,
                count: 0,
            },
            AggState::Count(0),
            AggState::Count(u64::MAX),
            AggState::Min(d("-12.5")),
            AggState::Max(d("79228162514264337593543950335")),
            AggState::UniqueCount(BTreeSet::from(["a".to_owned(), String::new()])),
            AggState::Latest {
                time_ns: -5,
                seq: 9,
                value: d("1.25"),
            },
        ] {
            let mut compact = Vec::new();
            encode_rollup_value(&state, &mut compact);
            assert_eq!(decode_rollup_value(&compact).unwrap(), state);
            // Values written before format 7 read the same.
            assert_eq!(decode_rollup_value(&state.to_bytes()).unwrap(), state);
            // Every cut is refused, never misread.
            for cut in 0..compact.len() {
                assert!(
                    decode_rollup_value(&compact[..cut]).is_err(),
                    "{state:?} cut at {cut}"
                );
            }
        }
        let mut small = Vec::new();
        encode_rollup_value(
            &AggState::Sum {
                sum: d("99999"),
                count: 1,
            },
            &mut small,
        );
        assert_eq!(small.len(), 6, "a small SUM takes 6 bytes, not 25");
        assert!(
            decode_rollup_value(&[SUM_TAG, 0, 0, 1, 0]).is_err(),
            "trailing bytes"
        );
        assert!(decode_rollup_value(&[COUNT_TAG, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn dictionary_entries_round_trip() {
        for entry in [
            DictEntry::Subject("projects/p1".into()),
            DictEntry::Subject(String::new()),
            DictEntry::Groups(vec![Some("GET".into()), None, Some(String::new())]),
            DictEntry::Groups(Vec::new()),
        ] {
            assert_eq!(DictEntry::decode(&entry.encode()).unwrap(), entry);
        }
        assert_ne!(
            DictEntry::Subject("g".into()).encode(),
            DictEntry::Groups(Vec::new()).encode()
        );
        assert!(DictEntry::decode(b"x").is_err());
    }

    #[test]
    fn dedupe_keys_do_not_collide_across_the_boundary() {
        assert_ne!(dedupe_key("ab", "c"), dedupe_key("a", "bc"));
    }
}
