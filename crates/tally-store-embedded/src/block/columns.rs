//! Column codings of layout-2 blocks: integer columns, dictionary indexes
//! and ids.
//!
//! ## Integer column
//!
//! One mode byte, then:
//!
//! | mode | content |
//! |---|---|
//! | 0, frame of reference | `min` (zigzag varint), bit width `w` (1 byte, 0..=64), then `n` × (value − `min`) in `w` bits each, least significant bit first, packed into ⌈`n`·`w`/8⌉ bytes |
//! | 1, deltas | `n` × zigzag(value − the previous value, the first against 0) |
//!
//! The encoder writes whichever is shorter: deltas win for times that come
//! in order, the frame for times spread at random over a month (22 bits
//! each instead of a 4-byte varint) and for constant columns (0 bits).
//!
//! ## Dictionary indexes
//!
//! `n` varints: 0 for the next string not yet used by the column (the
//! dictionary lists strings in the order they are first met), else the
//! index + 1. A column of mostly distinct subjects is then mostly zeros.
//!
//! ## Ids
//!
//! `n` headers (varints): 0 = a UUID in canonical lower-case form, its 16
//! bytes in the UUID stream; `h` ≥ 1 = the id shares its first `h` − 1
//! bytes with the previous id, and a varint suffix length follows. Then
//! the suffixes' bytes, concatenated, then the UUID stream.

use std::ops::Range;

use super::{Reader, put_varint, unzigzag, zigzag};
use crate::StoreError;

const MODE_FRAME: u8 = 0;
const MODE_DELTA: u8 = 1;

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Writes `values` as an integer column.
pub(crate) fn put_ints(out: &mut Vec<u8>, values: &[i64]) {
    let (mut min, mut max) = (i64::MAX, i64::MIN);
    let mut delta_len = 0;
    let mut previous = 0i64;
    for v in values {
        min = min.min(*v);
        max = max.max(*v);
        delta_len += varint_len(zigzag(v.wrapping_sub(previous)));
        previous = *v;
    }
    if values.is_empty() {
        min = 0;
        max = 0;
    }
    let span = max.wrapping_sub(min) as u64;
    let width = 64 - span.leading_zeros() as usize;
    let frame_len = (values.len() * width).div_ceil(8) + 1 + varint_len(zigzag(min));
    if frame_len <= delta_len {
        out.push(MODE_FRAME);
        put_varint(out, zigzag(min));
        out.push(width as u8);
        let mut acc = 0u128;
        let mut bits = 0usize;
        for v in values {
            acc |= u128::from(v.wrapping_sub(min) as u64) << bits;
            bits += width;
            while bits >= 8 {
                out.push(acc as u8);
                acc >>= 8;
                bits -= 8;
            }
        }
        if bits > 0 {
            out.push(acc as u8);
        }
    } else {
        out.push(MODE_DELTA);
        let mut previous = 0i64;
        for v in values {
            put_varint(out, zigzag(v.wrapping_sub(previous)));
            previous = *v;
        }
    }
}

/// Reads an integer column of `n` values.
pub(crate) fn read_ints(r: &mut Reader, n: usize) -> Result<Vec<i64>, StoreError> {
    const BAD: StoreError = StoreError::Corrupt("block: integer column");
    let mode = r.byte()?;
    let mut out = Vec::with_capacity(n.min(r.remaining()));
    match mode {
        MODE_FRAME => {
            let min = unzigzag(r.varint()?);
            let width = usize::from(r.byte()?);
            if width > 64 {
                return Err(BAD);
            }
            let packed = r.take(n.checked_mul(width).ok_or(BAD)?.div_ceil(8))?;
            let bytes = &r.bytes()[packed];
            let mask = if width == 64 {
                u64::MAX
            } else {
                (1u64 << width) - 1
            };
            let mut acc = 0u128;
            let mut bits = 0usize;
            let mut next = bytes.iter();
            for _ in 0..n {
                while bits < width {
                    acc |= u128::from(*next.next().ok_or(BAD)?) << bits;
                    bits += 8;
                }
                out.push(min.wrapping_add((acc as u64 & mask) as i64));
                acc = acc.checked_shr(width as u32).unwrap_or(0);
                bits -= width;
            }
        }
        MODE_DELTA => {
            let mut previous = 0i64;
            for _ in 0..n {
                previous = previous.wrapping_add(unzigzag(r.varint()?));
                out.push(previous);
            }
        }
        _ => return Err(BAD),
    }
    Ok(out)
}

/// Writes dictionary indexes, the next new string as 0.
pub(crate) fn put_indexes(out: &mut Vec<u8>, indexes: &[u32]) {
    let mut next_new = 0u32;
    for index in indexes {
        if *index == next_new {
            out.push(0);
            next_new += 1;
        } else {
            put_varint(out, u64::from(*index) + 1);
            next_new = next_new.max(index + 1);
        }
    }
}

/// Reads `n` dictionary indexes into a dictionary of `m` strings.
pub(crate) fn read_indexes(r: &mut Reader, n: usize, m: usize) -> Result<Vec<u32>, StoreError> {
    let mut out = Vec::with_capacity(n.min(r.remaining()));
    let mut next_new = 0usize;
    for _ in 0..n {
        let index = match r.varint()? {
            0 => next_new,
            v => usize::try_from(v - 1).map_err(|_| StoreError::Corrupt("block: index"))?,
        };
        if index >= m {
            return Err(StoreError::Corrupt("block: string index"));
        }
        next_new = next_new.max(index + 1);
        out.push(index as u32);
    }
    Ok(out)
}

/// The 16 bytes of `id` when it is a UUID written as 36 lower-case hex
/// digits and hyphens (the form that prints back the same).
fn uuid_bytes(id: &str) -> Option<[u8; 16]> {
    let b = id.as_bytes();
    if b.len() != 36 || [8, 13, 18, 23].iter().any(|at| b[*at] != b'-') {
        return None;
    }
    let mut out = [0u8; 16];
    let mut digits = b
        .iter()
        .enumerate()
        .filter(|(at, _)| ![8, 13, 18, 23].contains(at));
    for byte in &mut out {
        let mut v = 0u8;
        for _ in 0..2 {
            let (_, c) = digits.next()?;
            let d = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                _ => return None,
            };
            v = (v << 4) | d;
        }
        *byte = v;
    }
    Some(out)
}

fn put_uuid(out: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, byte) in bytes.iter().enumerate() {
        if [4, 6, 8, 10].contains(&i) {
            out.push(b'-');
        }
        out.push(HEX[usize::from(byte >> 4)]);
        out.push(HEX[usize::from(byte & 15)]);
    }
}

/// Writes the ids column.
pub(crate) fn put_ids<'a>(out: &mut Vec<u8>, ids: impl Iterator<Item = &'a str> + Clone) {
    let mut previous: &[u8] = &[];
    let mut suffixes = Vec::new();
    let mut uuids = Vec::new();
    for id in ids {
        if let Some(bytes) = uuid_bytes(id) {
            out.push(0);
            uuids.extend_from_slice(&bytes);
        } else {
            let id = id.as_bytes();
            let shared = previous.iter().zip(id).take_while(|(a, b)| a == b).count();
            put_varint(out, shared as u64 + 1);
            put_varint(out, (id.len() - shared) as u64);
            suffixes.extend_from_slice(&id[shared..]);
        }
        previous = id.as_bytes();
    }
    out.extend_from_slice(&suffixes);
    out.extend_from_slice(&uuids);
}

/// Reads `n` ids into `text` (each checked to be UTF-8); their ranges in it.
pub(crate) fn read_ids(
    r: &mut Reader,
    n: usize,
    text: &mut Vec<u8>,
) -> Result<Vec<Range<usize>>, StoreError> {
    const BAD: StoreError = StoreError::Corrupt("block: ids");
    // (shared, suffix length), or None for a UUID.
    let mut heads = Vec::with_capacity(n.min(r.remaining()));
    let (mut suffix_total, mut uuid_total) = (0usize, 0usize);
    for _ in 0..n {
        match r.varint()? {
            0 => {
                heads.push(None);
                uuid_total += 16;
            }
            h => {
                let shared = usize::try_from(h - 1).map_err(|_| BAD)?;
                let len = usize::try_from(r.varint()?).map_err(|_| BAD)?;
                suffix_total = suffix_total.checked_add(len).ok_or(BAD)?;
                heads.push(Some((shared, len)));
            }
        }
    }
    let suffixes = r.take(suffix_total)?;
    let uuids = r.take(uuid_total)?;
    let (mut suffix_at, mut uuid_at) = (suffixes.start, uuids.start);
    let mut out = Vec::with_capacity(n);
    let mut previous = 0..0;
    for head in heads {
        let start = text.len();
        match head {
            None => {
                put_uuid(text, &r.bytes()[uuid_at..uuid_at + 16]);
                uuid_at += 16;
            }
            Some((shared, len)) => {
                if shared > previous.len() {
                    return Err(BAD);
                }
                text.extend_from_within(previous.start..previous.start + shared);
                text.extend_from_slice(&r.bytes()[suffix_at..suffix_at + len]);
                suffix_at += len;
            }
        }
        std::str::from_utf8(&text[start..]).map_err(|_| StoreError::Corrupt("block: utf-8"))?;
        previous = start..text.len();
        out.push(previous.clone());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn ints_round_trip(values in prop::collection::vec(any::<i64>(), 0..50),
                           small in prop::collection::vec(-300i64..300, 0..50)) {
            for values in [values, small] {
                let mut out = Vec::new();
                put_ints(&mut out, &values);
                let mut r = Reader::new(&out);
                prop_assert_eq!(read_ints(&mut r, values.len()).unwrap(), values);
                prop_assert_eq!(r.remaining(), 0);
            }
        }

        #[test]
        fn ids_and_indexes_round_trip(ids in prop::collection::vec("[a-f0-9-]{0,40}|é{0,3}x", 0..30),
                                      indexes in prop::collection::vec(0u32..20, 0..30)) {
            let mut out = Vec::new();
            put_ids(&mut out, ids.iter().map(String::as_str));
            put_indexes(&mut out, &indexes);
            let mut r = Reader::new(&out);
            let mut text = Vec::new();
            let ranges = read_ids(&mut r, ids.len(), &mut text).unwrap();
            let back: Vec<&str> = ranges.iter().map(|x| std::str::from_utf8(&text[x.clone()]).unwrap()).collect();
            prop_assert_eq!(back, ids.iter().map(String::as_str).collect::<Vec<_>>());
            prop_assert_eq!(read_indexes(&mut r, indexes.len(), 20).unwrap(), indexes);
            prop_assert_eq!(r.remaining(), 0);
        }
    }

    #[test]
    fn uuids_take_16_bytes_and_print_back_the_same() {
        let ids = [
            "0191c2f0-7d3e-7c1a-9f00-aa55aa55aa55",
            "0191C2F0-7D3E-7C1A-9F00-AA55AA55AA55",
        ];
        let mut out = Vec::new();
        put_ids(&mut out, ids.iter().copied());
        // The lower-case one as 1 header byte + 16; the upper-case one as text.
        assert!(out.len() < 17 + 2 + 36 + 2);
        let mut text = Vec::new();
        let ranges = read_ids(&mut Reader::new(&out), 2, &mut text).unwrap();
        assert_eq!(&text[ranges[0].clone()], ids[0].as_bytes());
        assert_eq!(&text[ranges[1].clone()], ids[1].as_bytes());
    }
}
