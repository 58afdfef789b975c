//! Event blocks: a run of consecutive log positions stored as one
//! compressed, columnar value (one key per block, not one per event).
//!
//! The writer turns a group commit's accepted events into one block, or a
//! few when the group is large ([`MAX_BLOCK_EVENTS`] events, or
//! [`MAX_BLOCK_BYTES`] of uncompressed columns, whichever comes first), so
//! that reading one event never decompresses more than a bounded block.
//!
//! ## Byte layout
//!
//! Key (`log` keyspace): the block's first log position (u64 BE). A block
//! holds positions `first .. first + count`, consecutive and never
//! overlapping another block's.
//!
//! Value: a 10-byte header, then the body.
//!
//! | bytes | field |
//! |---|---|
//! | 1 | layout version: [`BLOCK_VERSION`] (2) is written; 1 is still read |
//! | 4 | `count`: events in the block (u32 BE, 1 ..= [`MAX_BLOCK_EVENTS`]) |
//! | 4 | `raw_len`: body length before compression (u32 BE, ≤ [`MAX_RAW_BYTES`]) |
//! | 1 | codec: 0 = stored as is, 1 = LZ4 block format, 2 = a zstd frame (level 3) — `tally-block`'s codec bytes and codecs |
//! | … | the body, compressed with the codec |
//!
//! ### Layout 2 body
//!
//! Columns, one after the other; integers are unsigned LEB128 varints
//! (signed ones zigzag-coded) unless the table says otherwise; `n` is
//! `count`; *int column*, *indexes* and *ids* are the codings of
//! [`columns`]:
//!
//! | column | content |
//! |---|---|
//! | strings | `m`, then `m` × (length, UTF-8 bytes): the block's distinct specversion, source, type and subject values, then `data` field names and string values |
//! | specversion, source, type, subject | 4 × indexes (`n` each) into strings |
//! | time seconds, time nanoseconds, ingest time (ns) | 3 × int column of `n` |
//! | ids | ids of `n` |
//! | shapes | `k`, then `k` × (fields `f` ≤ 32, `f` × (name: index into strings, type: 1 byte, 0 = integer, 1 = string, 2 = boolean, 3 = null)) |
//! | data kinds | `n` × (0 = no `data`, 1 = JSON text, 2 + `s` = an object of shape `s`) |
//! | JSON lengths | one length per event of kind 1 |
//! | fields | for each shape, for each of its fields, over the events of that shape in order: integers as an int column, strings as indexes into strings (plain varints), booleans as 1 byte each (0 or 1), nulls as nothing |
//! | attribute lengths | `n` × length; 0 = no other attributes |
//! | JSON data | the kind-1 events' `data` as JSON, concatenated |
//! | attributes | each event's other attributes (`datacontenttype`, `dataschema`, extensions) as one JSON object, concatenated |
//!
//! Measured on gateway-style events (random times over 30 days, 10k
//! subjects, `data` of one integer and two short strings): 33 bytes an
//! event before compression, 10.5 after zstd level 3 (13.4 with LZ4;
//! layout 1 with LZ4 was about 25); see BENCHMARKS.md.
//!
//! ### Layout 1 body (read only)
//!
//! | column | content |
//! |---|---|
//! | strings | `m`, then `m` × (length, UTF-8 bytes): the block's distinct specversion, source, type and subject values |
//! | specversion, source, type, subject | 4 × `n` indexes into strings |
//! | time seconds | `n` × zigzag(seconds − the previous event's), the first against 0 |
//! | time nanoseconds | `n` × zigzag(signed sub-second nanoseconds, as jiff keeps them) |
//! | ingested | `n` × zigzag(ingest time in ns − the previous event's), the first against 0 |
//! | id lengths | `n` × length |
//! | data lengths | `n` × (length + 1); 0 = the event has no `data` |
//! | attribute lengths | `n` × length; 0 = no other attributes |
//! | ids | the ids' bytes, concatenated |
//! | data | each event's `data` as JSON, concatenated |
//! | attributes | each event's other attributes (`datacontenttype`, `dataschema`, extensions) as one JSON object, concatenated |
//!
//! In both layouts lengths precede the bytes they measure so that like
//! sits beside like (ids with ids, JSON with JSON), which is what the
//! compressor feeds on.
//!
//! **Invariant:** decoding a block gives back exactly the events encoded
//! (every attribute, the same JSON values) and their ingest times.
//! **Never** trust a stored length: every count, length and index is
//! checked against the bounds above and the bytes present before use.

use std::ops::Range;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tally_block::Codec;
use tally_model::CloudEvent;

use crate::StoreError;

mod columns;
mod layout2;

/// The layout version written in each block's first byte.
pub const BLOCK_VERSION: u8 = 2;
/// The first layout, still read.
const LAYOUT_1: u8 = 1;
/// Most events in one block.
pub const MAX_BLOCK_EVENTS: usize = 4096;
/// Uncompressed bytes past which a block is closed (one event may take it
/// past; the writer closes the block after it).
pub const MAX_BLOCK_BYTES: usize = 1 << 20;
/// Most uncompressed bytes a stored block may declare: a full block plus
/// one event of the largest size the server admits, with room to spare.
pub const MAX_RAW_BYTES: usize = 64 << 20;

const HEADER_LEN: usize = 10;
/// The codec new blocks are written with (chosen by measurement, see
/// BENCHMARKS.md). The codec bytes are `tally-block`'s, shared with the
/// instance log store.
const CODEC: Codec = Codec::Zstd;
/// zstd's level: 3 is ~2 % smaller than 1 for ~15 % more time.
const ZSTD_LEVEL: i32 = 3;

/// What the log needs of one event, encoded on the caller's thread before
/// the writer takes it (JSON serialisation is most of the work).
#[derive(Debug, Clone)]
pub struct Record {
    pub ingested_at: Timestamp,
    pub specversion: String,
    pub id: String,
    pub source: String,
    pub kind: String,
    pub subject: String,
    pub time: Timestamp,
    /// `data`, by shape when it has one (see [`layout2`]).
    pub data: Data,
    /// The other attributes as one JSON object; empty when there are none.
    pub attributes: Vec<u8>,
}

/// An event's `data` as a record holds it.
#[derive(Debug, Clone)]
pub enum Data {
    None,
    /// Stored as JSON text.
    Json(Vec<u8>),
    /// An object of scalar fields, in serde_json's (sorted) order.
    Fields(Vec<(String, Scalar)>),
}

/// A scalar field of a `data` object.
#[derive(Debug, Clone)]
pub enum Scalar {
    Int(i64),
    Str(String),
    Bool(bool),
    Null,
}

/// The attributes of an event that have no column of their own.
#[derive(Serialize, Deserialize, Default)]
struct Attributes<'a> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    datacontenttype: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dataschema: Option<std::borrow::Cow<'a, str>>,
    #[serde(flatten)]
    extensions: std::borrow::Cow<'a, Map<String, Value>>,
}

fn encode_error(e: serde_json::Error) -> StoreError {
    StoreError::Encode(e.to_string())
}

impl Record {
    pub fn new(ingested_at: Timestamp, event: &CloudEvent) -> Result<Record, StoreError> {
        let data = layout2::data_of(event.data.as_ref()).map_err(encode_error)?;
        let attributes = if event.datacontenttype.is_none()
            && event.dataschema.is_none()
            && event.extensions.is_empty()
        {
            Vec::new()
        } else {
            serde_json::to_vec(&Attributes {
                datacontenttype: event.datacontenttype.as_deref().map(Into::into),
                dataschema: event.dataschema.as_deref().map(Into::into),
                extensions: std::borrow::Cow::Borrowed(&event.extensions),
            })
            .map_err(encode_error)?
        };
        Ok(Record {
            ingested_at,
            specversion: event.specversion.clone(),
            id: event.id.clone(),
            source: event.source.clone(),
            kind: event.kind.clone(),
            subject: event.subject.clone(),
            time: event.time,
            data,
            attributes,
        })
    }

    /// Bytes the record adds to a block's body, about.
    pub fn size(&self) -> usize {
        let data = match &self.data {
            Data::None => 0,
            Data::Json(json) => json.len(),
            Data::Fields(fields) => fields
                .iter()
                .map(|(k, v)| k.len() + if let Scalar::Str(s) = v { s.len() } else { 8 })
                .sum(),
        };
        self.id.len() + data + self.attributes.len() + 24
    }
}

// ---- varints ----------------------------------------------------------------

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// A reader of the body that refuses to run past its end.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, at: 0 }
    }

    /// All the bytes read from, for the ranges [`Reader::take`] gives.
    pub(crate) fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Bytes not yet read.
    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    pub(crate) fn byte(&mut self) -> Result<u8, StoreError> {
        let range = self.take(1)?;
        Ok(self.bytes[range.start])
    }

    pub(crate) fn varint(&mut self) -> Result<u64, StoreError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .bytes
                .get(self.at)
                .ok_or(StoreError::Corrupt("block: short varint"))?;
            self.at += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Ok(v);
            }
        }
        Err(StoreError::Corrupt("block: varint too long"))
    }

    fn len(&mut self) -> Result<usize, StoreError> {
        usize::try_from(self.varint()?).map_err(|_| StoreError::Corrupt("block: length"))
    }

    pub(crate) fn take(&mut self, len: usize) -> Result<Range<usize>, StoreError> {
        let end = self
            .at
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len())
            .ok_or(StoreError::Corrupt("block: short bytes"))?;
        let range = self.at..end;
        self.at = end;
        Ok(range)
    }
}

// ---- encoding ---------------------------------------------------------------

/// Encodes `records` (1 ..= [`MAX_BLOCK_EVENTS`]) as one block value.
pub fn encode(records: &[&Record]) -> Result<Vec<u8>, StoreError> {
    encode_with(records, CODEC)
}

fn encode_with(records: &[&Record], codec: Codec) -> Result<Vec<u8>, StoreError> {
    if records.is_empty() || records.len() > MAX_BLOCK_EVENTS {
        return Err(StoreError::Encode(format!(
            "a block holds 1 to {MAX_BLOCK_EVENTS} events, not {}",
            records.len()
        )));
    }
    let body = layout2::encode_body(records);
    let raw_len = u32::try_from(body.len())
        .ok()
        .filter(|len| *len as usize <= MAX_RAW_BYTES)
        .ok_or(StoreError::TooLong("an event block", MAX_RAW_BYTES))?;
    // The body as it is when the codec does not make it smaller.
    let packed = tally_block::compress_at(codec, ZSTD_LEVEL, &body);
    let mut out = Vec::with_capacity(HEADER_LEN + packed.bytes().len());
    out.push(BLOCK_VERSION);
    out.extend_from_slice(&(records.len() as u32).to_be_bytes());
    out.extend_from_slice(&raw_len.to_be_bytes());
    out.push(packed.codec.byte());
    out.extend_from_slice(packed.bytes());
    Ok(out)
}

/// Ingest times are the server's clock: within i64 nanoseconds (years
/// 1678 to 2262) for any clock this code runs under.
fn ingest_ns(at: Timestamp) -> i64 {
    i64::try_from(at.as_nanosecond()).unwrap_or(if at < Timestamp::UNIX_EPOCH {
        i64::MIN
    } else {
        i64::MAX
    })
}

// ---- decoding ---------------------------------------------------------------

/// The number of events a block value holds, from its header alone.
pub fn count_of(value: &[u8]) -> Result<u64, StoreError> {
    let header = value
        .get(..HEADER_LEN)
        .ok_or(StoreError::Corrupt("block: short header"))?;
    if header[0] != BLOCK_VERSION && header[0] != LAYOUT_1 {
        return Err(StoreError::Corrupt("block: unknown layout version"));
    }
    let count = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if count == 0 || count > MAX_BLOCK_EVENTS {
        return Err(StoreError::Corrupt("block: event count out of bounds"));
    }
    Ok(count as u64)
}

/// A decoded block: its columns, with JSON left as bytes until an event is
/// asked for.
pub struct Block {
    /// The block's first log position.
    pub first: u64,
    /// The decompressed body: strings, JSON data and attributes are
    /// ranges of it.
    body: Vec<u8>,
    strings: Vec<Range<usize>>,
    /// specversion, source, type, subject: indexes into `strings`.
    indexes: [Vec<u32>; 4],
    times: Vec<Timestamp>,
    ingested: Vec<Timestamp>,
    /// The ids, whole (layout 2 stores them front-coded).
    ids_text: Vec<u8>,
    ids: Vec<Range<usize>>,
    data: Vec<DataAt>,
    /// Layout 2's `data` shapes and their columns.
    shapes: Vec<layout2::DecodedShape>,
    attributes: Vec<Range<usize>>,
}

/// Where an event's `data` is in a decoded block.
pub(crate) enum DataAt {
    None,
    Json(Range<usize>),
    /// (shape, row within the shape's columns).
    Row(u32, u32),
}

const SPECVERSION: usize = 0;
const SOURCE: usize = 1;
const TYPE: usize = 2;
const SUBJECT: usize = 3;

impl Block {
    /// Decodes the block stored under position `first`.
    pub fn decode(first: u64, value: &[u8]) -> Result<Block, StoreError> {
        let count = count_of(value)? as usize;
        let raw_len = u32::from_be_bytes([value[5], value[6], value[7], value[8]]) as usize;
        if raw_len > MAX_RAW_BYTES {
            return Err(StoreError::Corrupt("block: declared size out of bounds"));
        }
        let stored = &value[HEADER_LEN..];
        let codec = Codec::from_byte(value[9]).ok_or(StoreError::Corrupt("block: codec"))?;
        let body = tally_block::decompress(codec, stored, raw_len, MAX_RAW_BYTES)
            .map_err(|_| StoreError::Corrupt("block: body differs from its header"))?;
        if value[0] == LAYOUT_1 {
            Block::layout1(first, count, body)
        } else {
            layout2::decode(first, count, body)
        }
    }

    /// Decodes a layout-1 body (see the layout-1 table in the module docs).
    fn layout1(first: u64, count: usize, body: Vec<u8>) -> Result<Block, StoreError> {
        let mut r = Reader::new(&body);
        let m = r.len()?;
        if m > 4 * count {
            return Err(StoreError::Corrupt("block: too many strings"));
        }
        let strings = read_strings(&mut r, &body, m)?;
        let mut indexes: [Vec<u32>; 4] = Default::default();
        for column in &mut indexes {
            column.reserve(count);
            for _ in 0..count {
                let index = r.len()?;
                if index >= m {
                    return Err(StoreError::Corrupt("block: string index"));
                }
                column.push(index as u32);
            }
        }
        let times = decode_times(&mut r, count)?;
        let ingested = decode_ingested(&mut r, count)?;
        let lengths = |r: &mut Reader| (0..count).map(|_| r.len()).collect::<Result<Vec<_>, _>>();
        let (id_lens, data_lens, attr_lens) =
            (lengths(&mut r)?, lengths(&mut r)?, lengths(&mut r)?);
        let mut ids_text = Vec::new();
        let ids = id_lens
            .into_iter()
            .map(|len| {
                let range = r.take(len)?;
                std::str::from_utf8(&body[range.clone()])
                    .map_err(|_| StoreError::Corrupt("block: utf-8"))?;
                let start = ids_text.len();
                ids_text.extend_from_slice(&body[range]);
                Ok(start..ids_text.len())
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let data = data_lens
            .into_iter()
            .map(|len| match len.checked_sub(1) {
                Some(len) => r.take(len).map(DataAt::Json),
                None => Ok(DataAt::None),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let attributes = attr_lens
            .into_iter()
            .map(|len| r.take(len))
            .collect::<Result<Vec<_>, _>>()?;
        if r.at != body.len() {
            return Err(StoreError::Corrupt("block: trailing bytes"));
        }
        Ok(Block {
            first,
            strings,
            indexes,
            times,
            ingested,
            ids_text,
            ids,
            data,
            shapes: Vec::new(),
            attributes,
            body,
        })
    }

    pub fn len(&self) -> usize {
        self.times.len()
    }

    /// One past the block's last log position.
    pub fn end(&self) -> u64 {
        self.first + self.len() as u64
    }

    /// Whether the block holds log position `seq`.
    pub fn holds(&self, seq: u64) -> bool {
        (self.first..self.end()).contains(&seq)
    }

    /// String `index` of the dictionary.
    fn dict(&self, index: usize) -> &str {
        // Checked to be UTF-8 when decoded.
        std::str::from_utf8(&self.body[self.strings[index].clone()]).unwrap_or_default()
    }

    fn string(&self, column: usize, i: usize) -> &str {
        self.dict(self.indexes[column][i] as usize)
    }

    /// The type of the `i`th event.
    pub fn event_type(&self, i: usize) -> &str {
        self.string(TYPE, i)
    }

    /// The subject of the `i`th event.
    pub fn subject(&self, i: usize) -> &str {
        self.string(SUBJECT, i)
    }

    /// The source of the `i`th event.
    pub fn source(&self, i: usize) -> &str {
        self.string(SOURCE, i)
    }

    /// The id of the `i`th event.
    pub fn id(&self, i: usize) -> &str {
        // Checked to be UTF-8 when decoded.
        std::str::from_utf8(&self.ids_text[self.ids[i].clone()]).unwrap_or_default()
    }

    /// The time of the `i`th event.
    pub fn time(&self, i: usize) -> Timestamp {
        self.times[i]
    }

    /// When the `i`th event was stored.
    pub fn ingested_at(&self, i: usize) -> Timestamp {
        self.ingested[i]
    }

    /// The `i`th event, whole.
    pub fn event(&self, i: usize) -> Result<CloudEvent, StoreError> {
        let decode_error = |e: serde_json::Error| StoreError::Decode(e.to_string());
        let data = match &self.data[i] {
            DataAt::None => None,
            DataAt::Json(range) => {
                Some(serde_json::from_slice(&self.body[range.clone()]).map_err(decode_error)?)
            }
            DataAt::Row(shape, row) => Some(self.shaped(*shape, *row)),
        };
        let attributes: Attributes = if self.attributes[i].is_empty() {
            Attributes::default()
        } else {
            serde_json::from_slice(&self.body[self.attributes[i].clone()]).map_err(decode_error)?
        };
        Ok(CloudEvent {
            specversion: self.string(SPECVERSION, i).to_owned(),
            id: self.id(i).to_owned(),
            source: self.string(SOURCE, i).to_owned(),
            kind: self.string(TYPE, i).to_owned(),
            subject: self.string(SUBJECT, i).to_owned(),
            time: self.times[i],
            datacontenttype: attributes.datacontenttype.map(Into::into),
            dataschema: attributes.dataschema.map(Into::into),
            data,
            extensions: attributes.extensions.into_owned(),
        })
    }
}

/// The dictionary's `m` strings, each checked to be UTF-8: their ranges.
fn read_strings(r: &mut Reader, body: &[u8], m: usize) -> Result<Vec<Range<usize>>, StoreError> {
    let mut strings = Vec::with_capacity(m.min(body.len()));
    for _ in 0..m {
        let len = r.len()?;
        let range = r.take(len)?;
        std::str::from_utf8(&body[range.clone()])
            .map_err(|_| StoreError::Corrupt("block: utf-8"))?;
        strings.push(range);
    }
    Ok(strings)
}

fn decode_times(r: &mut Reader, count: usize) -> Result<Vec<Timestamp>, StoreError> {
    let mut seconds = Vec::with_capacity(count);
    let mut previous = 0i64;
    for _ in 0..count {
        previous = previous.wrapping_add(unzigzag(r.varint()?));
        seconds.push(previous);
    }
    seconds
        .into_iter()
        .map(|s| {
            let nanos = i32::try_from(unzigzag(r.varint()?))
                .map_err(|_| StoreError::Corrupt("block: nanoseconds"))?;
            Timestamp::new(s, nanos).map_err(|_| StoreError::Corrupt("block: event time"))
        })
        .collect()
}

fn decode_ingested(r: &mut Reader, count: usize) -> Result<Vec<Timestamp>, StoreError> {
    let mut previous = 0i64;
    (0..count)
        .map(|_| {
            previous = previous.wrapping_add(unzigzag(r.varint()?));
            Timestamp::from_nanosecond(i128::from(previous))
                .map_err(|_| StoreError::Corrupt("block: ingest time"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(i: i64) -> CloudEvent {
        event_at(i, Timestamp::now())
    }

    pub(super) fn event_at(i: i64, now: Timestamp) -> CloudEvent {
        let mut e = json!({"specversion": "1.0", "id": format!("id-{i}"), "source": "gw",
            "type": if i % 2 == 0 { "req" } else { "tok" }, "subject": format!("p{}", i % 3),
            "time": Timestamp::from_second(1_767_268_800 + i * 37).unwrap().to_string(),
            "data": {"value": i, "method": "GET", "big": 1e300}});
        if i % 3 == 0 {
            e["datacontenttype"] = json!("application/json");
            e["traceparent"] = json!("00-abc-def-01");
            e["nested"] = json!({"a": [1, 2, {"b": null}]});
        }
        if i % 5 == 0 {
            e.as_object_mut().unwrap().remove("data");
        }
        tally_model::parse_event(e, now).unwrap()
    }

    #[test]
    fn blocks_give_back_every_event_exactly() {
        let base = Timestamp::now();
        let events: Vec<CloudEvent> = (0..200).map(event).collect();
        let records: Vec<Record> = events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let at = base - jiff::SignedDuration::from_millis(i as i64 % 7);
                Record::new(at, e).unwrap()
            })
            .collect();
        let value = encode(&records.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(count_of(&value).unwrap(), 200);
        let block = Block::decode(1000, &value).unwrap();
        assert_eq!((block.first, block.end(), block.len()), (1000, 1200, 200));
        assert!(block.holds(1199) && !block.holds(1200) && !block.holds(999));
        for (i, (e, r)) in events.iter().zip(&records).enumerate() {
            assert_eq!(&block.event(i).unwrap(), e);
            assert_eq!(block.event_type(i), e.kind);
            assert_eq!(
                (block.subject(i), block.source(i), block.id(i)),
                (e.subject.as_str(), e.source.as_str(), e.id.as_str())
            );
            assert_eq!(block.time(i), e.time);
            assert_eq!(block.ingested_at(i), r.ingested_at);
        }
    }

    #[test]
    fn times_before_1970_and_subsecond_parts_round_trip() {
        let mut e = event(1);
        for t in [
            "1969-12-31T23:59:59.25Z",
            "1900-01-01T00:00:00.000000001Z",
            "2300-06-01T00:00:00.5Z",
        ] {
            e.time = t.parse().unwrap();
            let r = Record::new(Timestamp::now(), &e).unwrap();
            let block = Block::decode(0, &encode(&[&r]).unwrap()).unwrap();
            assert_eq!(block.event(0).unwrap().time, e.time, "{t}");
        }
    }

    #[test]
    fn damaged_blocks_are_refused_not_misread() {
        let records: Vec<Record> = (0..50)
            .map(|i| Record::new(Timestamp::now(), &event(i)).unwrap())
            .collect();
        let value = encode(&records.iter().collect::<Vec<_>>()).unwrap();
        // Every truncation is refused.
        for len in 0..value.len() {
            assert!(Block::decode(0, &value[..len]).is_err(), "{len}");
        }
        // A header that lies about its count or size is refused.
        let mut lying = value.clone();
        lying[1..5].copy_from_slice(&(MAX_BLOCK_EVENTS as u32 + 1).to_be_bytes());
        assert!(Block::decode(0, &lying).is_err());
        let mut lying = value.clone();
        lying[5..9].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Block::decode(0, &lying).is_err());
        let mut lying = value;
        lying[0] = 9;
        assert!(Block::decode(0, &lying).is_err());
        assert!(encode(&[]).is_err());
    }
}

#[cfg(test)]
mod layouts {
    use super::tests::event_at;
    use super::*;
    use serde_json::json;

    #[test]
    fn layout_1_blocks_still_read() {
        // Written by the layout-1 encoder: 60 events of `event_at`, the
        // `i`th ingested 17·i µs after `base`.
        let value = include_bytes!("../tests/fixtures/block-v1.bin");
        assert_eq!(value[0], LAYOUT_1);
        let base: Timestamp = "2026-03-01T12:00:00.123456789Z".parse().unwrap();
        let block = Block::decode(7, value).unwrap();
        assert_eq!(block.len(), 60);
        for i in 0..60 {
            let e = event_at(i as i64, base);
            assert_eq!(block.event(i).unwrap(), e);
            assert_eq!(block.id(i), e.id);
            assert_eq!(
                block.ingested_at(i),
                base + jiff::SignedDuration::from_micros(i as i64 * 17)
            );
        }
    }

    fn round_trip(data: Vec<serde_json::Value>) {
        let events: Vec<CloudEvent> = data
            .into_iter()
            .enumerate()
            .map(|(i, d)| {
                let mut e = event_at(i as i64, Timestamp::now());
                e.data = Some(d);
                e
            })
            .collect();
        let records: Vec<Record> = events
            .iter()
            .map(|e| Record::new(Timestamp::now(), e).unwrap())
            .collect();
        for codec in [Codec::None, Codec::Lz4, Codec::Zstd] {
            let value = encode_with(&records.iter().collect::<Vec<_>>(), codec).unwrap();
            let block = Block::decode(0, &value).unwrap();
            for (i, e) in events.iter().enumerate() {
                let back = block.event(i).unwrap();
                assert_eq!(back, *e);
                // The same text, not only an equal value.
                assert_eq!(
                    serde_json::to_string(&back.data).unwrap(),
                    serde_json::to_string(&e.data).unwrap()
                );
            }
        }
    }

    #[test]
    fn data_of_every_kind_comes_back_exactly() {
        let parsed = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        let mut wide = serde_json::Map::new();
        for k in 0..layout2::MAX_FIELDS + 1 {
            wide.insert(format!("k{k}"), json!(k));
        }
        round_trip(vec![
            json!({"value": 5, "region": "eu", "ok": true, "gone": null}),
            json!({"value": -5, "region": "us", "ok": false, "gone": null}),
            json!({"value": i64::MIN, "region": "", "ok": true, "gone": null}),
            json!({"value": u64::MAX, "region": "eu"}),
            json!({"value": 1.5, "region": "eu"}),
            parsed(r#"{"value": -0}"#),
            parsed(r#"{"value": 1e3}"#),
            parsed(r#"{"value": 10.0}"#),
            json!({"nested": {"a": 1}}),
            json!({"list": [1, 2]}),
            json!({}),
            json!([1, 2, 3]),
            json!("text"),
            json!(7),
            json!(null),
            json!({"é": "ü", "b": "eu", "a": 0}),
            serde_json::Value::Object(wide),
        ]);
    }

    #[test]
    fn damaged_layout_2_blocks_are_refused_not_misread() {
        let records: Vec<Record> = (0..40)
            .map(|i| Record::new(Timestamp::now(), &event_at(i, Timestamp::now())).unwrap())
            .collect();
        let refs: Vec<&Record> = records.iter().collect();
        for codec in [Codec::None, Codec::Zstd] {
            let value = encode_with(&refs, codec).unwrap();
            for len in 0..value.len() {
                assert!(Block::decode(0, &value[..len]).is_err(), "{codec:?} {len}");
            }
        }
        // Every single-byte change of a stored body is refused or decodes
        // to a block without panicking.
        let value = encode_with(&refs, Codec::None).unwrap();
        for at in HEADER_LEN..value.len() {
            let mut bad = value.clone();
            bad[at] ^= 0x5a;
            if let Ok(block) = Block::decode(0, &bad) {
                for i in 0..block.len() {
                    let _ = block.event(i);
                }
            }
        }
    }

    /// Bytes per event of bench-like blocks, by layout and codec. Run with
    /// `cargo test -p tally-store-embedded --release --lib block::layouts::measure -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn measure() {
        let (blocks, per) = (200usize, 1000usize);
        let base: Timestamp = "2026-03-01T00:00:00Z".parse().unwrap();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let types = [
            "gateway.requests",
            "gateway.ingress-bytes",
            "gateway.egress-bytes",
            "gateway.connection-seconds",
        ];
        let regions = ["eu-west", "us-east", "ap-south"];
        let methods = ["GET", "POST", "PUT", "DELETE", "PATCH"];
        let groups: Vec<Vec<Record>> = (0..blocks)
            .map(|b| {
                let at = base + jiff::SignedDuration::from_millis(b as i64 * 9);
                (0..per)
                    .map(|i| {
                        let time = base - jiff::SignedDuration::from_secs(next(30 * 86_400) as i64);
                        let e = json!({"specversion": "1.0", "id": format!("{b}-{i}"), "source": "bench",
                            "type": types[next(4) as usize], "subject": format!("projects/p{}", next(10_000)),
                            "time": time.to_string(),
                            "data": {"value": next(100_000), "region": regions[next(3) as usize], "method": methods[next(5) as usize]}});
                        let e = tally_model::parse_event(e, at).unwrap();
                        Record::new(at + jiff::SignedDuration::from_micros(i as i64 / 250), &e).unwrap()
                    })
                    .collect()
            })
            .collect();
        let events = (blocks * per) as f64;
        if let Ok(dir) = std::env::var("TALLY_DUMP_BODIES") {
            for (b, g) in groups.iter().enumerate() {
                let body = layout2::encode_body(&g.iter().collect::<Vec<_>>());
                std::fs::write(format!("{dir}/{b}.bin"), body).unwrap();
            }
        }
        for (name, codec) in [
            ("none", Codec::None),
            ("lz4", Codec::Lz4),
            ("zstd 3", Codec::Zstd),
        ] {
            let start = std::time::Instant::now();
            let values: Vec<Vec<u8>> = groups
                .iter()
                .map(|g| encode_with(&g.iter().collect::<Vec<_>>(), codec).unwrap())
                .collect();
            let encode_us = start.elapsed().as_secs_f64() * 1e6 / events;
            let start = std::time::Instant::now();
            for (b, v) in values.iter().enumerate() {
                Block::decode(b as u64, v).unwrap();
            }
            let decode_us = start.elapsed().as_secs_f64() * 1e6 / events;
            let bytes: usize = values.iter().map(Vec::len).sum();
            println!(
                "layout 2, {name}: {:.2} B/event, encode {encode_us:.2} µs/event, decode {decode_us:.2} µs/event",
                bytes as f64 / events
            );
        }
    }
}
