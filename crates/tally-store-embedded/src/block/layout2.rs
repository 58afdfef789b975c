//! The body of a layout-2 block: columns by type (see the parent module's
//! table); `data` objects of scalar fields become typed columns.
//!
//! A `data` object whose fields are all integers (within i64), strings,
//! booleans or nulls, at most [`MAX_FIELDS`] of them, is stored by *shape*:
//! its field names and their types, listed once per block, then one column
//! per field over the events of that shape. Anything else (nested values,
//! fractions, larger integers) is stored as JSON text, as layout 1 does.
//! serde_json keeps object fields sorted by name, so a shape gives back the
//! same object.

use rustc_hash::FxHashMap;
use serde_json::{Map, Number, Value};

use super::columns::{put_ids, put_indexes, put_ints, read_ids, read_indexes, read_ints};
use super::{Block, Data, DataAt, Reader, Record, Scalar, ingest_ns, put_varint};
use crate::StoreError;

/// Most fields of a `data` object stored by shape.
pub(crate) const MAX_FIELDS: usize = 32;

const TAG_INT: u8 = 0;
const TAG_STR: u8 = 1;
const TAG_BOOL: u8 = 2;
const TAG_NULL: u8 = 3;

const DATA_NONE: u64 = 0;
const DATA_JSON: u64 = 1;

fn tag(s: &Scalar) -> u8 {
    match s {
        Scalar::Int(_) => TAG_INT,
        Scalar::Str(_) => TAG_STR,
        Scalar::Bool(_) => TAG_BOOL,
        Scalar::Null => TAG_NULL,
    }
}

/// The block's string dictionary, in the order strings are first met.
#[derive(Default)]
struct Strings<'a> {
    index: FxHashMap<&'a str, u32>,
    order: Vec<&'a str>,
}

impl<'a> Strings<'a> {
    fn of(&mut self, s: &'a str) -> u32 {
        let next = self.order.len() as u32;
        *self.index.entry(s).or_insert_with(|| {
            self.order.push(s);
            next
        })
    }
}

/// A shape: (field name, type tag) in field order.
type Shape<'a> = Vec<(&'a str, u8)>;

/// Encodes `records` as a layout-2 body.
pub(crate) fn encode_body(records: &[&Record]) -> Vec<u8> {
    let mut out = Vec::with_capacity(records.iter().map(|r| r.size()).sum::<usize>() / 2 + 64);
    let mut strings = Strings::default();
    // Column by column, so that each column's new strings come in a row.
    let columns: [Vec<u32>; 4] = [
        records.iter().map(|r| strings.of(&r.specversion)).collect(),
        records.iter().map(|r| strings.of(&r.source)).collect(),
        records.iter().map(|r| strings.of(&r.kind)).collect(),
        records.iter().map(|r| strings.of(&r.subject)).collect(),
    ];
    let (shapes, kinds) = shapes_of(records);
    let field_strings = fields_by_shape(records, &kinds, shapes.len(), &mut strings);
    let shape_keys: Vec<Vec<u32>> = shapes
        .iter()
        .map(|shape| shape.iter().map(|(key, _)| strings.of(key)).collect())
        .collect();
    put_varint(&mut out, strings.order.len() as u64);
    for s in &strings.order {
        put_varint(&mut out, s.len() as u64);
        out.extend_from_slice(s.as_bytes());
    }
    for column in &columns {
        put_indexes(&mut out, column);
    }
    let seconds: Vec<i64> = records.iter().map(|r| r.time.as_second()).collect();
    put_ints(&mut out, &seconds);
    let nanos: Vec<i64> = records
        .iter()
        .map(|r| i64::from(r.time.subsec_nanosecond()))
        .collect();
    put_ints(&mut out, &nanos);
    let ingested: Vec<i64> = records.iter().map(|r| ingest_ns(r.ingested_at)).collect();
    put_ints(&mut out, &ingested);
    put_ids(&mut out, records.iter().map(|r| r.id.as_str()));
    put_varint(&mut out, shapes.len() as u64);
    for (shape, keys) in shapes.iter().zip(&shape_keys) {
        put_varint(&mut out, shape.len() as u64);
        for ((_, tag), key) in shape.iter().zip(keys) {
            put_varint(&mut out, u64::from(*key));
            out.push(*tag);
        }
    }
    for kind in &kinds {
        put_varint(&mut out, *kind);
    }
    for r in records {
        if let Data::Json(json) = &r.data {
            put_varint(&mut out, json.len() as u64);
        }
    }
    put_fields(&mut out, records, &kinds, &shapes, &field_strings);
    for r in records {
        put_varint(&mut out, r.attributes.len() as u64);
    }
    for r in records {
        if let Data::Json(json) = &r.data {
            out.extend_from_slice(json);
        }
    }
    for r in records {
        out.extend_from_slice(&r.attributes);
    }
    out
}

/// The block's distinct shapes, and each event's data kind: none, JSON,
/// or 2 + its shape's index.
fn shapes_of<'a>(records: &[&'a Record]) -> (Vec<Shape<'a>>, Vec<u64>) {
    let mut shapes: Vec<Shape<'a>> = Vec::new();
    let mut known: FxHashMap<Shape<'a>, u64> = FxHashMap::default();
    let kinds = records
        .iter()
        .map(|r| match &r.data {
            Data::None => DATA_NONE,
            Data::Json(_) => DATA_JSON,
            Data::Fields(fields) => {
                let shape: Shape = fields.iter().map(|(k, v)| (k.as_str(), tag(v))).collect();
                let next = shapes.len() as u64 + 2;
                *known.entry(shape).or_insert_with_key(|shape| {
                    shapes.push(shape.clone());
                    next
                })
            }
        })
        .collect();
    (shapes, kinds)
}

/// The dictionary index of every string field value, by shape, field and
/// row (`None` for fields of other types).
fn fields_by_shape<'a>(
    records: &[&'a Record],
    kinds: &[u64],
    shapes: usize,
    strings: &mut Strings<'a>,
) -> Vec<Vec<Vec<u32>>> {
    let mut out: Vec<Vec<Vec<u32>>> = vec![Vec::new(); shapes];
    for (r, kind) in records.iter().zip(kinds) {
        let Data::Fields(fields) = &r.data else {
            continue;
        };
        let columns = &mut out[(*kind - 2) as usize];
        columns.resize_with(fields.len(), Vec::new);
        for ((_, v), column) in fields.iter().zip(columns.iter_mut()) {
            if let Scalar::Str(s) = v {
                column.push(strings.of(s));
            }
        }
    }
    out
}

/// The typed columns: for each shape, each field over its rows.
fn put_fields(
    out: &mut Vec<u8>,
    records: &[&Record],
    kinds: &[u64],
    shapes: &[Shape],
    field_strings: &[Vec<Vec<u32>>],
) {
    for (s, shape) in shapes.iter().enumerate() {
        let rows: Vec<&[(String, Scalar)]> = records
            .iter()
            .zip(kinds)
            .filter(|(_, kind)| **kind == s as u64 + 2)
            .filter_map(|(r, _)| match &r.data {
                Data::Fields(fields) => Some(fields.as_slice()),
                _ => None,
            })
            .collect();
        for (f, (_, tag)) in shape.iter().enumerate() {
            match *tag {
                TAG_INT => {
                    let ints: Vec<i64> = rows
                        .iter()
                        .map(|fields| match fields[f].1 {
                            Scalar::Int(v) => v,
                            _ => 0,
                        })
                        .collect();
                    put_ints(out, &ints);
                }
                TAG_STR => {
                    for index in &field_strings[s][f] {
                        put_varint(out, u64::from(*index));
                    }
                }
                TAG_BOOL => out.extend(
                    rows.iter()
                        .map(|fields| u8::from(matches!(fields[f].1, Scalar::Bool(true)))),
                ),
                _ => {}
            }
        }
    }
}

/// One decoded field column.
pub(crate) enum Column {
    Int(Vec<i64>),
    Str(Vec<u32>),
    Bool(Vec<bool>),
    Null,
}

/// One decoded shape: field names (dictionary indexes) and their columns.
pub(crate) struct DecodedShape {
    pub(crate) fields: Vec<(u32, Column)>,
}

/// Decodes a layout-2 body of `n` events.
pub(crate) fn decode(first: u64, n: usize, body: Vec<u8>) -> Result<Block, StoreError> {
    let mut r = Reader::new(&body);
    let m = r.len()?;
    if m > body.len() {
        return Err(StoreError::Corrupt("block: too many strings"));
    }
    let strings = super::read_strings(&mut r, &body, m)?;
    let mut indexes: [Vec<u32>; 4] = Default::default();
    for column in &mut indexes {
        *column = read_indexes(&mut r, n, m)?;
    }
    let seconds = read_ints(&mut r, n)?;
    let nanos = read_ints(&mut r, n)?;
    let times = seconds
        .into_iter()
        .zip(nanos)
        .map(|(s, ns)| {
            let ns = i32::try_from(ns).map_err(|_| StoreError::Corrupt("block: nanoseconds"))?;
            jiff::Timestamp::new(s, ns).map_err(|_| StoreError::Corrupt("block: event time"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ingested = read_ints(&mut r, n)?
        .into_iter()
        .map(|ns| {
            jiff::Timestamp::from_nanosecond(i128::from(ns))
                .map_err(|_| StoreError::Corrupt("block: ingest time"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut ids_text = Vec::new();
    let ids = read_ids(&mut r, n, &mut ids_text)?;
    let (mut shapes, data) = read_shapes_and_kinds(&mut r, n, m)?;
    read_fields(&mut r, &mut shapes, &data, m)?;
    let attr_lens = (0..n).map(|_| r.len()).collect::<Result<Vec<_>, _>>()?;
    let data = data
        .into_iter()
        .map(|d| match d {
            Pending::Json(len) => r.take(len).map(DataAt::Json),
            Pending::Ready(d) => Ok(d),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let attributes = attr_lens
        .into_iter()
        .map(|len| r.take(len))
        .collect::<Result<Vec<_>, _>>()?;
    if r.remaining() != 0 {
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
        shapes,
        attributes,
        body,
    })
}

/// An event's data as known before the JSON bytes are reached.
enum Pending {
    Json(usize),
    Ready(DataAt),
}

fn read_shapes_and_kinds(
    r: &mut Reader,
    n: usize,
    m: usize,
) -> Result<(Vec<DecodedShape>, Vec<Pending>), StoreError> {
    const BAD: StoreError = StoreError::Corrupt("block: data shapes");
    let k = r.len()?;
    if k > n {
        return Err(BAD);
    }
    let mut shapes = Vec::with_capacity(k);
    for _ in 0..k {
        let fields = r.len()?;
        if fields > MAX_FIELDS {
            return Err(BAD);
        }
        let mut shape = DecodedShape {
            fields: Vec::with_capacity(fields),
        };
        for _ in 0..fields {
            let key = r.len()?;
            if key >= m {
                return Err(BAD);
            }
            let column = match r.byte()? {
                TAG_INT => Column::Int(Vec::new()),
                TAG_STR => Column::Str(Vec::new()),
                TAG_BOOL => Column::Bool(Vec::new()),
                TAG_NULL => Column::Null,
                _ => return Err(BAD),
            };
            shape.fields.push((key as u32, column));
        }
        shapes.push(shape);
    }
    let mut rows = vec![0u32; k];
    let mut kinds = Vec::with_capacity(n.min(r.remaining()));
    for _ in 0..n {
        kinds.push(match r.varint()? {
            DATA_NONE => Pending::Ready(DataAt::None),
            DATA_JSON => Pending::Json(0),
            kind => {
                let shape = usize::try_from(kind - 2).map_err(|_| BAD)?;
                let row = rows.get_mut(shape).ok_or(BAD)?;
                *row += 1;
                Pending::Ready(DataAt::Row(shape as u32, *row - 1))
            }
        });
    }
    for kind in &mut kinds {
        if let Pending::Json(len) = kind {
            *len = r.len()?;
        }
    }
    for (shape, rows) in shapes.iter_mut().zip(rows) {
        for (_, column) in &mut shape.fields {
            match column {
                Column::Int(v) => v.reserve(rows as usize),
                Column::Str(v) => v.reserve(rows as usize),
                Column::Bool(v) => v.reserve(rows as usize),
                Column::Null => {}
            }
        }
    }
    Ok((shapes, kinds))
}

/// Reads every shape's columns; their lengths are the shapes' row counts.
fn read_fields(
    r: &mut Reader,
    shapes: &mut [DecodedShape],
    kinds: &[Pending],
    m: usize,
) -> Result<(), StoreError> {
    let mut rows = vec![0usize; shapes.len()];
    for kind in kinds {
        if let Pending::Ready(DataAt::Row(shape, _)) = kind {
            rows[*shape as usize] += 1;
        }
    }
    for (shape, n) in shapes.iter_mut().zip(rows) {
        for (_, column) in &mut shape.fields {
            match column {
                Column::Int(v) => *v = read_ints(r, n)?,
                Column::Str(v) => {
                    for _ in 0..n {
                        let index = r.len()?;
                        if index >= m {
                            return Err(StoreError::Corrupt("block: string index"));
                        }
                        v.push(index as u32);
                    }
                }
                Column::Bool(v) => {
                    let bytes = r.take(n)?;
                    for b in &r.bytes()[bytes] {
                        v.push(match b {
                            0 => false,
                            1 => true,
                            _ => return Err(StoreError::Corrupt("block: boolean")),
                        });
                    }
                }
                Column::Null => {}
            }
        }
    }
    Ok(())
}

impl Block {
    /// The `data` object of the `row`th event of shape `shape`.
    pub(crate) fn shaped(&self, shape: u32, row: u32) -> Value {
        let row = row as usize;
        let mut map = Map::new();
        for (key, column) in &self.shapes[shape as usize].fields {
            let value = match column {
                Column::Int(v) => Value::Number(Number::from(v[row])),
                Column::Str(v) => Value::String(self.dict(v[row] as usize).to_owned()),
                Column::Bool(v) => Value::Bool(v[row]),
                Column::Null => Value::Null,
            };
            map.insert(self.dict(*key as usize).to_owned(), value);
        }
        Value::Object(map)
    }
}

/// `data` as a record keeps it: by shape when it has one.
pub(crate) fn data_of(value: Option<&Value>) -> Result<Data, serde_json::Error> {
    let Some(value) = value else {
        return Ok(Data::None);
    };
    if let Value::Object(map) = value
        && map.len() <= MAX_FIELDS
    {
        let fields: Option<Vec<(String, Scalar)>> = map
            .iter()
            .map(|(k, v)| {
                let scalar = match v {
                    Value::Number(n) => Scalar::Int(n.as_i64()?),
                    Value::String(s) => Scalar::Str(s.clone()),
                    Value::Bool(b) => Scalar::Bool(*b),
                    Value::Null => Scalar::Null,
                    _ => return None,
                };
                Some((k.clone(), scalar))
            })
            .collect();
        if let Some(fields) = fields {
            return Ok(Data::Fields(fields));
        }
    }
    serde_json::to_vec(value).map(Data::Json)
}
