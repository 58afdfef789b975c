//! Request bodies as every route of `tally serve` reads them before
//! parsing (`decode_request_body`): `Content-Encoding` gzip, x-gzip, zstd
//! or none, at most a limit of bytes after decompression.

use std::io::Write as _;

use axum::http::{HeaderMap, HeaderValue, header};
use bytes::Bytes;
use proptest::prelude::*;
use proptest::sample::select;
use tally_fuzz::{Input, fuzz, inputs, mutate, replay};
use tally_server::decode_request_body;

const TARGET: &str = "body";
const LIMIT: usize = 64 << 10;

/// How a case's bytes reach the decoder.
#[derive(Debug, Clone, Copy)]
struct Params {
    /// The `Content-Encoding` header, if any.
    content_encoding: Option<&'static str>,
    /// Compress the bytes this way first (so the body is valid, and
    /// mutations hit the content).
    compress_first: Option<Codec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    Gzip,
    Zstd,
}

const ENCODINGS: &[Option<&str>] = &[
    None,
    Some("gzip"),
    Some("x-gzip"),
    Some("zstd"),
    Some(" ZSTD "),
    Some("identity"),
    Some(""),
    Some("br"),
    Some("gzip, zstd"),
];

fn compress(codec: Codec, bytes: &[u8]) -> Vec<u8> {
    match codec {
        Codec::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            let _ = e.write_all(bytes);
            e.finish().unwrap_or_default()
        }
        Codec::Zstd => {
            ruzstd::encoding::compress_to_vec(bytes, ruzstd::encoding::CompressionLevel::Fastest)
        }
    }
}

fn codec_of(content_encoding: Option<&str>) -> Option<Codec> {
    match content_encoding
        .map(|e| e.trim().to_ascii_lowercase())
        .as_deref()
    {
        Some("gzip" | "x-gzip") => Some(Codec::Gzip),
        Some("zstd") => Some(Codec::Zstd),
        _ => None,
    }
}

fn check(params: Params, input: &[u8]) -> Result<(), String> {
    let body = match params.compress_first {
        Some(codec) => compress(codec, input),
        None => input.to_vec(),
    };
    let mut headers = HeaderMap::new();
    if let Some(encoding) = params.content_encoding {
        let value = HeaderValue::from_str(encoding).map_err(|e| e.to_string())?;
        headers.insert(header::CONTENT_ENCODING, value);
    }
    let identity = matches!(
        params.content_encoding.map(str::trim),
        None | Some("" | "identity")
    );
    let matching = params.compress_first.is_some()
        && params.compress_first == codec_of(params.content_encoding);
    match decode_request_body(&headers, Bytes::from(body.clone()), LIMIT) {
        Ok(decoded) => {
            if decoded.len() > LIMIT {
                return Err(format!("{} bytes decoded past the limit", decoded.len()));
            }
            if identity && decoded[..] != body[..] {
                return Err("an identity body changed".into());
            }
            if matching && decoded[..] != input[..] {
                return Err("a compressed body does not decode to what was compressed".into());
            }
            Ok(())
        }
        Err(problem) => {
            let expected = if matching || identity {
                if input.len() > LIMIT {
                    [413].as_slice()
                } else {
                    [].as_slice()
                }
            } else {
                &[400, 413, 415]
            };
            if !expected.contains(&problem.status) || problem.detail.is_empty() {
                return Err(format!(
                    "refused with {} {:?}",
                    problem.status, problem.detail
                ));
            }
            Ok(())
        }
    }
}

fn case() -> BoxedStrategy<(Params, Input)> {
    let params = (
        select(ENCODINGS),
        proptest::option::of(select(&[Codec::Gzip, Codec::Zstd][..])),
    )
        .prop_map(|(content_encoding, compress_first)| Params {
            content_encoding,
            compress_first,
        });
    let shaped = prop_oneof![
        mutate::raw_bytes(256),
        (any::<u8>(), 1usize..(LIMIT + 4096)).prop_map(|(b, n)| Input(vec![b; n])),
    ]
    .boxed();
    (params, inputs(TARGET, shaped)).boxed()
}

#[test]
fn fuzz_body() {
    fuzz(TARGET, case, |(params, input)| check(*params, input));
}

#[test]
fn corpus_body() {
    replay(TARGET, |bytes| {
        for content_encoding in ENCODINGS {
            check(
                Params {
                    content_encoding: *content_encoding,
                    compress_first: None,
                },
                bytes,
            )?;
        }
        for codec in [Codec::Gzip, Codec::Zstd] {
            let content_encoding = Some(if codec == Codec::Gzip { "gzip" } else { "zstd" });
            check(
                Params {
                    content_encoding,
                    compress_first: Some(codec),
                },
                bytes,
            )?;
        }
        Ok(())
    });
}
