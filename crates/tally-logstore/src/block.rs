//! The block: every line one append round stored for one (project,
//! instance), columnar and zstd-compressed.
//!
//! Byte layout (all integers little-endian):
//!
//! ```text
//! 0      u8   format, 1
//! 1      u8   codec: 0 = none, 1 = zstd (one frame)
//! 2..6   u32  n, the number of lines
//! 6..10  u32  length of the payload before compression
//! 10..18 i64  min time (Unix ns)
//! 18..26 i64  max time (Unix ns)
//! 26..   the payload, compressed by the codec:
//!          n × u64  time − min time
//!          n × u8   stream (0 stdout, 1 stderr)
//!          n × u32  line length in bytes
//!          the lines' UTF-8 bytes, concatenated
//! ```
//!
//! Columns of like values (times, streams, lengths) compress to little;
//! the text compresses as one frame of similar lines.

use crate::Stream;

const FORMAT: u8 = 1;
const CODEC_NONE: u8 = 0;
const CODEC_ZSTD: u8 = 1;
const HEADER: usize = 26;

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
    let mut payload = Vec::with_capacity(entries.len() * 13 + text);
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
    let compressed = ruzstd::encoding::compress_to_vec(
        &payload[..],
        ruzstd::encoding::CompressionLevel::Fastest,
    );
    let (codec, body) = if compressed.len() < payload.len() {
        (CODEC_ZSTD, compressed)
    } else {
        (CODEC_NONE, payload.clone())
    };
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.push(FORMAT);
    out.push(codec);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&min.to_le_bytes());
    out.extend_from_slice(&max.to_le_bytes());
    out.extend_from_slice(&body);
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
    if block.len() < HEADER || block[0] != FORMAT {
        return Err("not a format-1 block".into());
    }
    let bad = || "truncated header".to_owned();
    Ok(Header {
        lines: u32_at(block, 2).ok_or_else(bad)?,
        raw_len: u32_at(block, 6).ok_or_else(bad)?,
        min_nanos: u64_at(block, 10).ok_or_else(bad)? as i64,
        max_nanos: u64_at(block, 18).ok_or_else(bad)? as i64,
    })
}

/// Decodes every line of a block.
pub fn decode(block: &[u8]) -> Result<Vec<Decoded>, String> {
    let h = header(block)?;
    let payload = match block[1] {
        CODEC_NONE => block[HEADER..].to_vec(),
        CODEC_ZSTD => {
            // Never trust the header for an allocation: read at most one
            // byte past what it announces.
            let mut out = Vec::with_capacity((h.raw_len as usize).min(1 << 20));
            let decoder = ruzstd::decoding::StreamingDecoder::new(&block[HEADER..])
                .map_err(|e| format!("zstd: {e}"))?;
            std::io::Read::read_to_end(
                &mut std::io::Read::take(decoder, u64::from(h.raw_len) + 1),
                &mut out,
            )
            .map_err(|e| format!("zstd: {e}"))?;
            out
        }
        c => return Err(format!("unknown codec {c}")),
    };
    if payload.len() != h.raw_len as usize {
        return Err("payload length does not match the header".into());
    }
    split(&payload, &h)
}

fn split(payload: &[u8], h: &Header) -> Result<Vec<Decoded>, String> {
    let n = h.lines as usize;
    let streams_at = n * 8;
    let lens_at = streams_at + n;
    let mut text_at = lens_at + n * 4;
    let short = || "payload shorter than its columns".to_owned();
    if n.saturating_mul(13) > payload.len() {
        return Err(short());
    }
    let mut lines = Vec::with_capacity(n);
    for i in 0..n {
        let delta = u64_at(payload, i * 8).ok_or_else(short)?;
        let stream = Stream::from_byte(*payload.get(streams_at + i).ok_or_else(short)?)
            .ok_or("unknown stream")?;
        let len = u32_at(payload, lens_at + i * 4).ok_or_else(short)? as usize;
        let text = payload.get(text_at..text_at + len).ok_or_else(short)?;
        text_at += len;
        lines.push(Decoded {
            time_nanos: h.min_nanos.wrapping_add(delta as i64),
            stream,
            line: String::from_utf8(text.to_vec()).map_err(|_| "a line is not UTF-8")?,
        });
    }
    Ok(lines)
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
}
