//! Byte-level mutations of valid inputs: flipped bits, inserted tokens
//! (structure, control characters, invalid UTF-8, huge numbers), deleted
//! and repeated runs, deep nesting, truncation and splices from other
//! inputs. Applied in order; proptest shrinks a failing case by dropping
//! mutations and simplifying their parameters.

use std::sync::Arc;

use proptest::prelude::*;
use proptest::sample::select;

use crate::Input;

/// Tokens worth inserting anywhere: structure of JSON, YAML, PromQL and
/// JSONPath, escapes, control characters, invalid or unusual UTF-8.
const TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"(",
    b")",
    b",",
    b":",
    b"\"",
    b"'",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"\\udfff\\ud800",
    b"\\u",
    b"\0",
    b"\x1b",
    b"\x7f",
    b"\r",
    b"\n",
    b"\r\n",
    b"\t",
    b" ",
    b"-",
    b"- ",
    b"---\n",
    b"...\n",
    b"#",
    b"&a ",
    b"*a",
    b"<<: *a",
    b"!!binary ",
    b"!tag ",
    b"%YAML 1.2\n",
    b"? ",
    b"|",
    b">",
    b"~",
    b"null",
    b"true",
    b"=~",
    b"!~",
    b"!=",
    b" or ",
    b"$",
    b"$.",
    b"..",
    b"[*]",
    b"[?(@.a)]",
    b"@",
    b"*",
    b"\xff",
    b"\xfe",
    b"\x80",
    b"\xc0\x80",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"\xe2\x80\xa8",
    b"\xef\xbb\xbf",
    "é".as_bytes(),
    "\u{1F600}".as_bytes(),
    b"\x08",
    b"\x0c",
];

/// Numbers at or past the edges of what parsers hold.
const NUMBERS: &[&str] = &[
    "0",
    "-0",
    "1e400",
    "-1e400",
    "1e-400",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775808",
    "-9223372036854775809",
    "9223372036854775807",
    "340282366920938463463374607431768211456",
    "79228162514264337593543950335",
    "79228162514264337593543950336",
    "0.0000000000000000000000000001",
    "1e28",
    "1e29",
    "123456789012345678901234567890.123456789",
    "NaN",
    "-Infinity",
    "Inf",
    "0x10",
    "1_000",
    "00001",
    "1.",
    ".5",
    "+1",
    "1e",
    "9999-12-31T23:59:59Z",
    "0000-01-01T00:00:00Z",
];

/// Open and close of nesting, for deep nesting.
const PAIRS: &[(&str, &str)] = &[
    ("[", "]"),
    ("{\"a\":", "}"),
    ("{a: ", "}"),
    ("(", ")"),
    ("- ", ""),
    ("a:\n ", ""),
    ("$[", "]"),
];

/// A position in an input of any length: a fraction of it, in 2⁻⁶⁴ units
/// (as proptest's `Index`, but constructible). Shrinks toward the start.
#[derive(Debug, Clone, Copy)]
pub struct Pos(pub u64);

impl Pos {
    /// The position `at` of `size` (`at < size`).
    pub fn of_size(at: usize, size: usize) -> Pos {
        let raw = ((at as u128) << 64).div_ceil(size.max(1) as u128);
        Pos(u64::try_from(raw).unwrap_or(u64::MAX))
    }

    /// The position in a range of `size` (`0` if it is empty).
    pub fn index(self, size: usize) -> usize {
        ((size as u128 * u128::from(self.0)) >> 64) as usize
    }
}

/// One edit of an input.
#[derive(Debug, Clone)]
pub enum Mutation {
    FlipBit(Pos, u8),
    SetByte(Pos, u8),
    Insert(Pos, &'static [u8]),
    InsertBytes(Pos, Vec<u8>),
    Delete(Pos, usize),
    /// Repeats the run at the index `times` times.
    Repeat(Pos, usize, usize),
    /// Wraps the span between two indexes in `depth` levels of a pair.
    Nest(Pos, Pos, usize, usize),
    /// Replaces the number (or run of digits) at the index by one of
    /// [`NUMBERS`], or inserts one.
    Number(Pos, &'static str),
    /// Copies `len` bytes from a donor input into this one.
    Splice(Pos, Pos, usize, Pos),
    Truncate(Pos),
}

fn mutation() -> BoxedStrategy<Mutation> {
    let index = || any::<u64>().prop_map(Pos);
    prop_oneof![
        2 => (index(), 0u8..8).prop_map(|(i, bit)| Mutation::FlipBit(i, bit)),
        1 => (index(), any::<u8>()).prop_map(|(i, b)| Mutation::SetByte(i, b)),
        3 => (index(), select(TOKENS)).prop_map(|(i, t)| Mutation::Insert(i, t)),
        1 => (index(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| Mutation::InsertBytes(i, b)),
        2 => (index(), 1usize..16).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => (index(), 1usize..48, 2usize..96).prop_map(|(i, n, t)| Mutation::Repeat(i, n, t)),
        1 => (index(), index(), 0..PAIRS.len(), 1usize..2000)
            .prop_map(|(a, b, p, d)| Mutation::Nest(a, b, p, d)),
        2 => (index(), select(NUMBERS)).prop_map(|(i, n)| Mutation::Number(i, n)),
        1 => (index(), index(), 1usize..256, index())
            .prop_map(|(d, f, n, t)| Mutation::Splice(d, f, n, t)),
        1 => index().prop_map(Mutation::Truncate),
    ]
    .boxed()
}

/// Applies one mutation; `donors` are inputs to splice from.
pub fn apply(bytes: &mut Vec<u8>, mutation: &Mutation, donors: &[Vec<u8>]) {
    let len = bytes.len();
    let at = |i: &Pos| i.index(len + 1);
    match mutation {
        Mutation::FlipBit(i, bit) if len > 0 => bytes[i.index(len)] ^= 1 << bit,
        Mutation::SetByte(i, b) if len > 0 => bytes[i.index(len)] = *b,
        Mutation::FlipBit(..) | Mutation::SetByte(..) => {}
        Mutation::Insert(i, token) => insert(bytes, at(i), token),
        Mutation::InsertBytes(i, new) => insert(bytes, at(i), new),
        Mutation::Delete(i, n) => {
            let start = at(i).min(len);
            bytes.drain(start..(start + n).min(len));
        }
        Mutation::Repeat(i, n, times) => {
            let start = at(i).min(len);
            let run = bytes[start..(start + n).min(len)].to_vec();
            let copies = run.repeat(*times);
            insert(bytes, (start + run.len()).min(len), &copies);
        }
        Mutation::Nest(a, b, pair, depth) => {
            let (lo, hi) = (at(a).min(at(b)), at(a).max(at(b)));
            let (open, close) = PAIRS[*pair];
            insert(bytes, hi, close.repeat(*depth).as_bytes());
            insert(bytes, lo, open.repeat(*depth).as_bytes());
        }
        Mutation::Number(i, number) => {
            let start = at(i);
            let end = start
                + bytes[start..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+'))
                    .count();
            bytes.splice(start..end, number.bytes());
        }
        Mutation::Splice(donor, from, n, to) => {
            if donors.is_empty() {
                return;
            }
            let donor = &donors[donor.index(donors.len())];
            let start = from.index(donor.len() + 1);
            let run = &donor[start..(start + n).min(donor.len())];
            insert(bytes, at(to), run);
        }
        Mutation::Truncate(i) => bytes.truncate(at(i)),
    }
}

fn insert(bytes: &mut Vec<u8>, at: usize, new: &[u8]) {
    bytes.splice(at..at, new.iter().copied());
}

/// Up to `max` mutations applied to each input of `inner`.
pub fn mutate(
    inner: BoxedStrategy<Input>,
    donors: Arc<Vec<Vec<u8>>>,
    max: usize,
) -> BoxedStrategy<Input> {
    (inner, proptest::collection::vec(mutation(), 0..=max))
        .prop_map(move |(Input(mut bytes), mutations)| {
            for m in &mutations {
                apply(&mut bytes, m, &donors);
            }
            Input(bytes)
        })
        .boxed()
}

/// One of `seeds` with one to eight mutations (splicing from the others).
pub fn mutated(seeds: Vec<Vec<u8>>) -> BoxedStrategy<Input> {
    let donors = Arc::new(seeds.clone());
    let picked = select(seeds).prop_map(Input).boxed();
    (
        picked,
        proptest::collection::vec(mutation(), 1..=8),
        Just(donors),
    )
        .prop_map(|(Input(mut bytes), mutations, donors)| {
            for m in &mutations {
                apply(&mut bytes, m, &donors);
            }
            Input(bytes)
        })
        .boxed()
}

/// Arbitrary bytes, up to `max_len`.
pub fn raw_bytes(max_len: usize) -> BoxedStrategy<Input> {
    proptest::collection::vec(any::<u8>(), 0..=max_len)
        .prop_map(Input)
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index_at(position: usize, len: usize) -> Pos {
        Pos::of_size(position, len + 1)
    }

    #[test]
    fn mutations_edit_where_they_say() {
        let mut bytes = b"{\"a\": 12}".to_vec();
        apply(&mut bytes, &Mutation::Number(index_at(6, 9), "1e400"), &[]);
        assert_eq!(bytes, b"{\"a\": 1e400}");
        apply(
            &mut bytes,
            &Mutation::Nest(index_at(0, 12), index_at(12, 12), 0, 2),
            &[],
        );
        assert_eq!(bytes, b"[[{\"a\": 1e400}]]");
        apply(&mut bytes, &Mutation::Truncate(index_at(3, 16)), &[]);
        assert_eq!(bytes, b"[[{");
        apply(
            &mut bytes,
            &Mutation::Splice(index_at(0, 0), index_at(1, 2), 5, index_at(3, 3)),
            &[b"xyz".to_vec()],
        );
        assert_eq!(bytes, b"[[{yz");
    }
}
