//! The block: lines of one (project, instance) from one append round,
//! columnar and compressed. The codecs are the ledger's
//! (`tally_block`): one home for how Tally's blocks are compressed and
//! decompressed within bounds.
//!
//! Byte layout (all integers little-endian):
//!
//! ```text
//! 0      u8   format, 2 (1: the same layout, codec byte 1 meaning zstd)
//! 1      u8   codec, a `tally_block::Codec` byte: 0 none, 1 LZ4, 2 zstd
//! 2..6   u32  n, the number of lines
//! 6..10  u32  length of the payload before compression (≤ MAX_RAW_BYTES)
//! 10..18 i64  min time (Unix ns)
//! 18..26 i64  max time (Unix ns)
//! 26..   the payload, compressed by the codec:
//!          n × u64  time − min time
//!          n × u8   stream (0 stdout, 1 stderr)
//!          n × u32  line length in bytes
//!          the lines' UTF-8 bytes, concatenated (exactly the lengths' sum)
//! ```
//!
//! Columns of like values (times, streams, lengths) compress to little;
//! the text compresses as one zstd frame of similar lines. The writer
//! closes a block at [`MAX_BLOCK_TEXT`] bytes of text, so a block (and
//! what one read decompresses at once) stays small.
//!
//! **Never** trust a stored count or length: [`open`] checks every column
//! against the bytes present, every line against UTF-8 and its
//! boundaries, before a line is handed out.

use tally_block::Codec;

use crate::Stream;

const FORMAT: u8 = 2;
/// Blocks written before the codecs were shared: codec byte 1 was zstd.
const FORMAT_1: u8 = 1;
const HEADER: usize = 26;
/// Bytes per line in the fixed-width columns (time, stream, length).
const COLUMN_BYTES: usize = 13;
/// Text past which the writer closes a block and starts the next.
pub const MAX_BLOCK_TEXT: usize = 4 << 20;
/// The largest payload a stored block may declare: a full block, its
/// columns and one line of the largest size admitted, with room to spare.
pub const MAX_RAW_BYTES: usize = 64 << 20;

/// One line going into a block.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub time_nanos: i64,
    pub stream: Stream,
    pub line: &'a str,
}

/// A block's header, readable without decompressing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub lines: u32,
    pub raw_len: u32,
    pub min_nanos: i64,
    pub max_nanos: i64,
}

/// A decoded line of a block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub time_nanos: i64,
    pub stream: Stream,
    pub line: String,
}

/// Encodes `entries` (at least one) as a block.
pub fn encode(entries: &[Entry<'_>]) -> Vec<u8> {
    let min = entries.iter().map(|e| e.time_nanos).min().unwrap_or(0);
    let max = entries.iter().map(|e| e.time_nanos).max().unwrap_or(0);
    let text: usize = entries.iter().map(|e| e.line.len()).sum();
    let mut payload = Vec::with_capacity(entries.len() * COLUMN_BYTES + text);
    for e in entries {
        payload.extend_from_slice(&(e.time_nanos.wrapping_sub(min) as u64).to_le_bytes());
    }
    payload.extend(entries.iter().map(|e| e.stream.to_byte()));
    for e in entries {
        payload.extend_from_slice(&(e.line.len() as u32).to_le_bytes());
    }
    for e in entries {
        payload.extend_from_slice(e.line.as_bytes());
    }
    let packed = tally_block::compress(Codec::Zstd, &payload);
    let mut out = Vec::with_capacity(HEADER + packed.bytes().len());
    out.push(FORMAT);
    out.push(packed.codec.byte());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&min.to_le_bytes());
    out.extend_from_slice(&max.to_le_bytes());
    out.extend_from_slice(packed.bytes());
    out
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The header of a block.
pub fn header(block: &[u8]) -> Result<Header, String> {
    if block.len() < HEADER || !matches!(block[0], FORMAT | FORMAT_1) {
        return Err("not a format-1 or format-2 block".into());
    }
    let bad = || "truncated header".to_owned();
    Ok(Header {
        lines: u32_at(block, 2).ok_or_else(bad)?,
        raw_len: u32_at(block, 6).ok_or_else(bad)?,
        min_nanos: u64_at(block, 10).ok_or_else(bad)? as i64,
        max_nanos: u64_at(block, 18).ok_or_else(bad)? as i64,
    })
}

fn codec(block: &[u8]) -> Result<Codec, String> {
    match (block[0], block[1]) {
        (FORMAT_1, 0) => Ok(Codec::None),
        (FORMAT_1, 1) => Ok(Codec::Zstd),
        (FORMAT, b) => Codec::from_byte(b).ok_or_else(|| format!("unknown codec {b}")),
        (_, b) => Err(format!("unknown codec {b}")),
    }
}

/// A decompressed, checked block: its lines are borrowed from it, so a
/// reader filters them before copying any.
pub struct Lines {
    header: Header,
    columns: Vec<u8>,
    text: String,
    /// Where each line starts in `text`, and where the last ends.
    bounds: Vec<u32>,
}

/// Decompresses and checks a block.
pub fn open(block: &[u8]) -> Result<Lines, String> {
    let h = header(block)?;
    let mut payload = tally_block::decompress(
        codec(block)?,
        &block[HEADER..],
        h.raw_len as usize,
        MAX_RAW_BYTES,
    )
    .map_err(|e| e.to_string())?;
    let n = h.lines as usize;
    let text_at = n
        .checked_mul(COLUMN_BYTES)
        .filter(|at| *at <= payload.len())
        .ok_or("payload shorter than its columns")?;
    let text = String::from_utf8(payload.split_off(text_at)).map_err(|_| "text is not UTF-8")?;
    let columns = payload;
    let mut bounds = Vec::with_capacity(n + 1);
    let mut at = 0usize;
    bounds.push(0);
    for i in 0..n {
        if Stream::from_byte(columns[n * 8 + i]).is_none() {
            return Err("unknown stream".into());
        }
        let len = u32_at(&columns, n * 9 + i * 4).ok_or("short length column")? as usize;
        at = at.checked_add(len).ok_or("line lengths overflow")?;
        if at > text.len() || !text.is_char_boundary(at) {
            return Err("a line is past the text or splits a character".into());
        }
        bounds.push(at as u32);
    }
    if at != text.len() {
        return Err("the text is longer than its lines".into());
    }
    Ok(Lines {
        header: h,
        columns,
        text,
        bounds,
    })
}

impl Lines {
    pub fn len(&self) -> usize {
        self.header.lines as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Line `i` (below [`Lines::len`]): its time, stream and text.
    pub fn get(&self, i: usize) -> (i64, Stream, &str) {
        let n = self.len();
        let delta = u64_at(&self.columns, i * 8).unwrap_or(0);
        let stream = self
            .columns
            .get(n * 8 + i)
            .and_then(|b| Stream::from_byte(*b))
            .unwrap_or(Stream::Stdout);
        let (from, to) = (
            self.bounds.get(i).copied().unwrap_or(0) as usize,
            self.bounds.get(i + 1).copied().unwrap_or(0) as usize,
        );
        let line = self.text.get(from..to).unwrap_or("");
        (
            self.header.min_nanos.wrapping_add(delta as i64),
            stream,
            line,
        )
    }
}

/// Decodes every line of a block.
pub fn decode(block: &[u8]) -> Result<Vec<Decoded>, String> {
    let lines = open(block)?;
    Ok((0..lines.len())
        .map(|i| {
            let (time_nanos, stream, line) = lines.get(i);
            Decoded {
                time_nanos,
                stream,
                line: line.to_owned(),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn decode_inverts_encode(lines in proptest::collection::vec((any::<i64>(), any::<bool>(), ".{0,300}"), 1..40)) {
            let entries: Vec<Entry<'_>> = lines.iter().map(|(t, err, l)| Entry {
                time_nanos: *t,
                stream: if *err { Stream::Stderr } else { Stream::Stdout },
                line: l,
            }).collect();
            let block = encode(&entries);
            let decoded = decode(&block).unwrap();
            prop_assert_eq!(decoded.len(), entries.len());
            for (d, e) in decoded.iter().zip(&entries) {
                prop_assert_eq!(d.time_nanos, e.time_nanos);
                prop_assert_eq!(d.stream, e.stream);
                prop_assert_eq!(&d.line, e.line);
            }
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn similar_lines_compress() {
        let lines: Vec<String> = (0..1000)
            .map(|i| format!("2026-12-06T18:00:{:02}Z INFO request served path=/api/v1/items/{i} status=200 bytes=512", i % 60))
            .collect();
        let entries: Vec<Entry<'_>> = lines
            .iter()
            .enumerate()
            .map(|(i, l)| Entry {
                time_nanos: 1_000_000 * i as i64,
                stream: Stream::Stdout,
                line: l,
            })
            .collect();
        let raw: usize = lines.iter().map(String::len).sum();
        let block = encode(&entries);
        assert!(block.len() * 4 < raw, "{} of {raw}", block.len());
    }

    #[test]
    fn format_1_blocks_stay_readable() {
        // Written by the format-1 encoder (pure-Rust zstd, codec byte 1).
        let block = include_bytes!("../tests/fixtures/block-format1.bin");
        assert_eq!(&block[..2], &[1, 1]);
        let lines = decode(block).unwrap();
        let text: Vec<&str> = lines.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(text.len(), 4);
        assert_eq!(text[..3], ["first line", "second line: ünïcode", ""]);
        assert!(text[3].starts_with("2026-12-06T18:00:00Z INFO request served"));
        assert_eq!(lines[1].stream, Stream::Stderr);
        assert_eq!(lines[3].time_nanos - lines[0].time_nanos, 21);
    }

    #[test]
    fn new_blocks_are_format_2_zstd() {
        let line = "x=1 y=2 z=3 ".repeat(20);
        let entries = [Entry {
            time_nanos: 5,
            stream: Stream::Stdout,
            line: &line,
        }];
        let block = encode(&entries);
        assert_eq!(&block[..2], &[2, Codec::Zstd.byte()]);
    }

    #[test]
    fn lengths_that_disagree_with_the_text_are_refused() {
        let entries = [
            Entry {
                time_nanos: 1,
                stream: Stream::Stdout,
                line: "é",
            },
            Entry {
                time_nanos: 2,
                stream: Stream::Stdout,
                line: "ab",
            },
        ];
        let good = encode(&entries);
        assert_eq!(good[1], Codec::None.byte(), "too short to compress");
        let lens_at = HEADER + 2 * 9;
        // A boundary inside "é".
        let mut split = good.clone();
        split[lens_at] = 1;
        split[lens_at + 4] = 3;
        assert!(open(&split).is_err());
        // Lengths summing past the text, and short of it.
        let mut long = good.clone();
        long[lens_at + 4] = 9;
        assert!(open(&long).is_err());
        let mut short = good.clone();
        short[lens_at + 4] = 1;
        assert!(open(&short).is_err());
        // A count the columns cannot hold.
        let mut many = good;
        many[2] = 200;
        assert!(open(&many).is_err());
    }
}
