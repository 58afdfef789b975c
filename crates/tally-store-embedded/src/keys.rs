//! Byte layouts of the store's keyspaces. Every key sorts the way it is scanned.
//!
//! | keyspace     | key                                                        | value |
//! |--------------|------------------------------------------------------------|-------|
//! | `events`     | seq (u64 BE)                                               | ingested_at ns (i64 BE), type (u16 len + bytes), event JSON |
//! | `dedupe`     | source (u32 len + bytes), id                               | seq (u64 BE), expires_at s (i64 BE) |
//! | `rollups`    | meter generation (u64 BE), level (u8), subject (u16 len + bytes), bucket start s (i64 BE, sign flipped), groups | [`tally_meter::AggState`] |
//! | `quarantine` | meter (u16 len + bytes; empty = no meter), seq (u64 BE)    | JSON [`QuarantineEntry`] |
//! | `voids`      | seq (u64 BE) of the voided event                           | JSON [`tally_ledger::VoidRecord`] |
//! | `void_order` | void ordinal (u64 BE, 0, 1, ... in recording order)        | seq (u64 BE) of the voided event |
//! | `catalog`    | kind `/` name                                              | manifest JSON |
//! | `meta`       | `meter/<name>`                                             | JSON [`MeterState`] |

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tally_meter::Level;
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

// ---- events ---------------------------------------------------------------

pub fn encode_event(ingested_at: Timestamp, event: &CloudEvent) -> Result<Vec<u8>, StoreError> {
    let json = serde_json::to_vec(event).map_err(|e| StoreError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(10 + event.kind.len() + json.len());
    out.extend_from_slice(&(ingested_at.as_nanosecond() as i64).to_be_bytes());
    push_str16(&mut out, &event.kind)?;
    out.extend_from_slice(&json);
    Ok(out)
}

/// The event type of an encoded event, without parsing its JSON.
pub fn event_type_of(value: &[u8]) -> Result<&str, StoreError> {
    let mut rest = value.get(8..).ok_or(StoreError::Corrupt("short event"))?;
    take_str16(&mut rest)
}

pub fn decode_event(value: &[u8]) -> Result<(Timestamp, CloudEvent), StoreError> {
    let ingested = Timestamp::from_nanosecond(i128::from(read_i64(value)?))
        .map_err(|_| StoreError::Corrupt("ingest time"))?;
    let mut rest = &value[8..];
    take_str16(&mut rest)?;
    let event = serde_json::from_slice(rest).map_err(|e| StoreError::Decode(e.to_string()))?;
    Ok((ingested, event))
}

// ---- dedupe ---------------------------------------------------------------

pub fn dedupe_key(source: &str, id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + source.len() + id.len());
    out.extend_from_slice(&(source.len() as u32).to_be_bytes());
    out.extend_from_slice(source.as_bytes());
    out.extend_from_slice(id.as_bytes());
    out
}

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

fn flip(bucket: i64) -> [u8; 8] {
    ((bucket as u64) ^ (1 << 63)).to_be_bytes()
}

fn unflip(bytes: &[u8]) -> Result<i64, StoreError> {
    Ok((read_u64(bytes)? ^ (1 << 63)) as i64)
}

/// The prefix of every rollup of one meter generation at one level.
pub fn rollup_level_prefix(generation: u64, level: Level) -> Vec<u8> {
    let mut out = Vec::with_capacity(9);
    out.extend_from_slice(&generation.to_be_bytes());
    out.push(level.as_u8());
    out
}

/// The prefix of a subject's rollups at one level.
pub fn rollup_subject_prefix(
    generation: u64,
    level: Level,
    subject: &str,
) -> Result<Vec<u8>, StoreError> {
    let mut out = rollup_level_prefix(generation, level);
    push_str16(&mut out, subject)?;
    Ok(out)
}

/// The key of a subject's bucket up to (not including) its groups.
pub fn rollup_bucket_prefix(mut subject_prefix: Vec<u8>, bucket: i64) -> Vec<u8> {
    subject_prefix.extend_from_slice(&flip(bucket));
    subject_prefix
}

pub fn rollup_key(
    generation: u64,
    level: Level,
    subject: &str,
    bucket: i64,
    groups: &[Option<String>],
) -> Result<Vec<u8>, StoreError> {
    let mut out = rollup_bucket_prefix(rollup_subject_prefix(generation, level, subject)?, bucket);
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
    Ok(out)
}

/// A decoded rollup key (after the generation and level).
pub struct RollupKey<'a> {
    pub subject: &'a str,
    pub bucket: i64,
    pub groups: Vec<Option<&'a str>>,
}

pub fn decode_rollup_key(key: &[u8], dimensions: usize) -> Result<RollupKey<'_>, StoreError> {
    let mut rest = key
        .get(9..)
        .ok_or(StoreError::Corrupt("short rollup key"))?;
    let subject = take_str16(&mut rest)?;
    let bucket = unflip(rest)?;
    rest = &rest[8..];
    let mut groups = Vec::with_capacity(dimensions);
    for _ in 0..dimensions {
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
                    std::str::from_utf8(raw).map_err(|_| StoreError::Corrupt("utf-8"))?,
                ));
                rest = &rest[5 + len..];
            }
            _ => return Err(StoreError::Corrupt("group tag")),
        }
    }
    Ok(RollupKey {
        subject,
        bucket,
        groups,
    })
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
/// their event count (`AggState::Sum { sum, count }`).
pub const FORMAT: u64 = 2;
pub const GARBAGE_PREFIX: &str = "garbage/";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollup_keys_round_trip_and_sort_by_bucket() {
        let groups = vec![Some("GET".to_owned()), None];
        let a = rollup_key(7, Level::Hour, "acme", -3600, &groups).unwrap();
        let b = rollup_key(7, Level::Hour, "acme", 0, &groups).unwrap();
        let c = rollup_key(7, Level::Hour, "acme", 3600, &[None, None]).unwrap();
        assert!(a < b && b < c);
        let k = decode_rollup_key(&a, 2).unwrap();
        assert_eq!((k.subject, k.bucket), ("acme", -3600));
        assert_eq!(k.groups, vec![Some("GET"), None]);
    }

    #[test]
    fn dedupe_keys_do_not_collide_across_the_boundary() {
        assert_ne!(dedupe_key("ab", "c"), dedupe_key("a", "bc"));
    }
}
