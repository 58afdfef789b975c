//! The codecs of Tally's compressed blocks, in one home: the ledger's
//! event log (`tally-store-embedded`'s blocks) and the instance log store
//! (`tally-logstore`'s blocks) both store a columnar body compressed as one
//! unit behind a header that names the [`Codec`] and the body's length
//! before compression. Each format keeps its own header and columns; this
//! crate owns what they share: the codec byte, compressing a body (falling
//! back to storing it as it is when that is not smaller), and
//! decompressing it back within the bounds its header declares.
//!
//! Codec bytes (one byte in each format's header):
//!
//! | byte | codec |
//! |---|---|
//! | 0 | [`Codec::None`]: the body as it is |
//! | 1 | [`Codec::Lz4`]: LZ4 block format (`lz4_flex`), no frame |
//! | 2 | [`Codec::Zstd`]: one zstd frame (the C library, level [`ZSTD_LEVEL`]) |
//!
//! **Never** trust a stored length: [`decompress`] refuses a declared
//! length over the caller's bound before allocating, allocates at most
//! that, and refuses a body that decompresses to any other length.

use std::cell::RefCell;

/// The zstd level [`compress`] writes at: the fastest of the regular
/// levels; blocks are written on the ingest path. [`compress_at`] takes
/// another (the ledger's blocks may trade CPU for size).
pub const ZSTD_LEVEL: i32 = 1;

/// How a block's body is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    None,
    Lz4,
    Zstd,
}

impl Codec {
    /// The codec's byte in a block header.
    pub fn byte(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Lz4 => 1,
            Codec::Zstd => 2,
        }
    }

    /// The codec of a header byte; `None` for an unknown byte.
    pub fn from_byte(b: u8) -> Option<Codec> {
        match b {
            0 => Some(Codec::None),
            1 => Some(Codec::Lz4),
            2 => Some(Codec::Zstd),
            _ => None,
        }
    }
}

/// Why a stored body could not be given back.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("declared body length {declared} is over the bound of {bound} bytes")]
    TooLong { declared: usize, bound: usize },
    #[error("{codec:?} body does not decompress: {why}")]
    Corrupt { codec: Codec, why: String },
    #[error("body decompresses to {actual} bytes, its header says {declared}")]
    Length { declared: usize, actual: usize },
}

/// A compressed body: the codec used and the bytes to store.
pub struct Compressed<'a> {
    pub codec: Codec,
    bytes: std::borrow::Cow<'a, [u8]>,
}

impl Compressed<'_> {
    /// The bytes to store after the header.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

thread_local! {
    static ZSTD_OUT: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static ZSTD_IN: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Compresses `body` with `codec`; the body as it is ([`Codec::None`]) when
/// the codec does not make it smaller or fails. zstd contexts are kept per
/// thread, so compressing many blocks allocates no context per block.
pub fn compress(codec: Codec, body: &[u8]) -> Compressed<'_> {
    compress_at(codec, ZSTD_LEVEL, body)
}

/// [`compress`], with zstd at `zstd_level` (ignored by the other codecs).
pub fn compress_at(codec: Codec, zstd_level: i32, body: &[u8]) -> Compressed<'_> {
    let packed = match codec {
        Codec::None => None,
        Codec::Lz4 => Some(lz4_flex::block::compress(body)),
        Codec::Zstd => zstd_compress(zstd_level, body),
    };
    match packed {
        Some(bytes) if bytes.len() < body.len() => Compressed {
            codec,
            bytes: bytes.into(),
        },
        _ => Compressed {
            codec: Codec::None,
            bytes: body.into(),
        },
    }
}

fn zstd_compress(level: i32, body: &[u8]) -> Option<Vec<u8>> {
    ZSTD_OUT.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = zstd::bulk::Compressor::new(level).ok().map(|c| (level, c));
        }
        let (_, compressor) = slot.as_mut()?;
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(body.len()));
        compressor.compress_to_buffer(body, &mut out).ok()?;
        Some(out)
    })
}

/// The body stored as `stored` with `codec`, which its header declares to
/// be `raw_len` bytes long. `raw_len` over `bound` is refused before any
/// allocation; so is a body of another length once decompressed.
pub fn decompress(
    codec: Codec,
    stored: &[u8],
    raw_len: usize,
    bound: usize,
) -> Result<Vec<u8>, CodecError> {
    if raw_len > bound {
        return Err(CodecError::TooLong {
            declared: raw_len,
            bound,
        });
    }
    let corrupt = |why: String| CodecError::Corrupt { codec, why };
    let body = match codec {
        Codec::None => stored.to_vec(),
        Codec::Lz4 => {
            let mut body = vec![0; raw_len];
            let n = lz4_flex::block::decompress_into(stored, &mut body)
                .map_err(|e| corrupt(e.to_string()))?;
            body.truncate(n);
            body
        }
        Codec::Zstd => ZSTD_IN.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(zstd::bulk::Decompressor::new().map_err(|e| corrupt(e.to_string()))?);
            }
            let Some(d) = slot.as_mut() else {
                return Err(corrupt("no zstd context".into()));
            };
            // The capacity bounds the output: a frame that would grow
            // past `raw_len` is an error, not an allocation.
            let mut body = Vec::with_capacity(raw_len);
            d.decompress_to_buffer(stored, &mut body)
                .map_err(|e| corrupt(e.to_string()))?;
            Ok(body)
        })?,
    };
    if body.len() != raw_len {
        return Err(CodecError::Length {
            declared: raw_len,
            actual: body.len(),
        });
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CODECS: [Codec; 3] = [Codec::None, Codec::Lz4, Codec::Zstd];

    fn text(n: usize) -> Vec<u8> {
        (0..n)
            .flat_map(|i| {
                format!("line {i} status=200 path=/api/v1/items/{}\n", i % 7).into_bytes()
            })
            .collect()
    }

    #[test]
    fn codec_bytes_round_trip_and_stay_fixed() {
        for c in CODECS {
            assert_eq!(Codec::from_byte(c.byte()), Some(c));
        }
        // Stored blocks name their codec by these bytes: they never change.
        assert_eq!(
            CODECS.map(Codec::byte),
            [0, 1, 2],
            "codec bytes are part of stored layouts"
        );
        assert_eq!(Codec::from_byte(3), None);
    }

    #[test]
    fn text_compresses_and_comes_back() {
        let body = text(2000);
        for c in [Codec::Lz4, Codec::Zstd] {
            let packed = compress(c, &body);
            assert_eq!(packed.codec, c);
            assert!(packed.bytes().len() * 4 < body.len(), "{c:?}");
            let back = decompress(c, packed.bytes(), body.len(), 1 << 20).unwrap();
            assert_eq!(back, body);
        }
    }

    #[test]
    fn the_zstd_level_is_honoured_and_reads_the_same() {
        let body = text(2000);
        let fast = compress_at(Codec::Zstd, 1, &body).bytes().to_vec();
        let small = compress_at(Codec::Zstd, 19, &body).bytes().to_vec();
        assert!(
            small.len() < fast.len(),
            "{} >= {}",
            small.len(),
            fast.len()
        );
        for packed in [fast, small] {
            assert_eq!(
                decompress(Codec::Zstd, &packed, body.len(), body.len()).unwrap(),
                body
            );
        }
    }

    #[test]
    fn incompressible_bodies_are_stored_as_they_are() {
        let body: Vec<u8> = (0..64u8).collect();
        for c in CODECS {
            let packed = compress(c, &body);
            assert_eq!(packed.codec, Codec::None);
            assert_eq!(packed.bytes(), &body[..]);
        }
    }

    #[test]
    fn declared_lengths_are_checked() {
        let body = text(100);
        for c in [Codec::Lz4, Codec::Zstd] {
            let packed = compress(c, &body);
            // Over the caller's bound: refused before decompressing.
            assert_eq!(
                decompress(c, packed.bytes(), body.len(), body.len() - 1),
                Err(CodecError::TooLong {
                    declared: body.len(),
                    bound: body.len() - 1
                })
            );
            // A header claiming less than the body holds: never more
            // than the claim is produced.
            assert!(decompress(c, packed.bytes(), body.len() / 2, 1 << 20).is_err());
            // A header claiming more: the lengths differ.
            assert!(decompress(c, packed.bytes(), body.len() + 1, 1 << 20).is_err());
        }
        assert!(matches!(
            decompress(Codec::None, b"abc", 4, 10),
            Err(CodecError::Length { .. })
        ));
    }

    proptest! {
        #[test]
        fn every_codec_inverts(body in proptest::collection::vec(any::<u8>(), 0..4000), repeat in 1usize..4) {
            let body = body.repeat(repeat);
            for c in CODECS {
                let packed = compress(c, &body);
                let back = decompress(packed.codec, packed.bytes(), body.len(), body.len()).unwrap();
                prop_assert_eq!(&back, &body);
            }
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), raw_len in 0usize..5000) {
            for c in CODECS {
                let _ = decompress(c, &bytes, raw_len, 4096);
            }
        }
    }
}
