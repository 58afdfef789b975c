//! Request bodies: size limits, `Content-Encoding` (gzip, zstd), and
//! where they are parsed.
//!
//! **Never:** decompress or parse a large body on an async worker: one
//! such body would stall every connection that worker serves (`/healthz`
//! included). [`off_workers`] moves the work to the blocking pool.

use std::io::Read;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use crate::problem::Problem;

/// The decoded body, refusing more than `limit` bytes after decompression.
pub fn decode(headers: &HeaderMap, body: Bytes, limit: usize) -> Result<Bytes, Problem> {
    let encoding = content_encoding(headers).unwrap_or_else(|| "identity".to_owned());
    let too_large = || too_large(limit);
    let read_all = |reader: &mut dyn Read| -> Result<Bytes, Problem> {
        let mut out = Vec::new();
        reader
            .take(limit as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| Problem::bad_request(format!("the body is not valid {encoding}: {e}")))?;
        if out.len() > limit {
            return Err(too_large());
        }
        Ok(Bytes::from(out))
    };
    match encoding.as_str() {
        "identity" | "" => {
            if body.len() > limit {
                return Err(too_large());
            }
            Ok(body)
        }
        "gzip" | "x-gzip" => read_all(&mut flate2::read::MultiGzDecoder::new(&body[..])),
        "zstd" => {
            let mut decoder = ruzstd::decoding::StreamingDecoder::new(&body[..])
                .map_err(|e| Problem::bad_request(format!("the body is not valid zstd: {e}")))?;
            read_all(&mut decoder)
        }
        other => Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Encoding {other:?} is not supported; use gzip, zstd or none"),
        )),
    }
}

/// The answer to a body over `limit` bytes.
fn too_large(limit: usize) -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "the request body is larger than the limit of {limit} bytes (after decompression); send smaller batches"
        ),
    )
}

/// Middleware: a request whose `Content-Length` announces more than
/// `limit` bytes is answered 413 at once, before any of its body is read.
pub async fn refuse_announced_oversize(
    State(limit): State<usize>,
    request: Request,
    next: Next,
) -> Response {
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return too_large(limit).into_response();
    }
    next.run(request).await
}

/// The `Content-Encoding` of a request, lower case, if it has one.
pub fn content_encoding(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase())
}

/// The media type of a request, lower case, without parameters.
pub fn media_type(headers: &HeaderMap) -> String {
    tally_model::media_type(
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(""),
    )
}

/// Bodies smaller than this, and not compressed, are parsed where they
/// arrive: moving them would cost more than parsing them.
const INLINE_BODY_BYTES: usize = 64 * 1024;

/// Whether a request's body is compressed (`Content-Encoding` other than
/// `identity`).
pub fn is_compressed(headers: &HeaderMap) -> bool {
    content_encoding(headers).is_some_and(|e| e != "identity" && !e.is_empty())
}

/// Runs `parse` (the parsing of a request body of `body_len` bytes,
/// `compressed` or not) on the blocking pool, unless the body is small and
/// not compressed.
pub async fn off_workers<T: Send + 'static>(
    compressed: bool,
    body_len: usize,
    parse: impl FnOnce() -> Result<T, Problem> + Send + 'static,
) -> Result<T, Problem> {
    if body_len < INLINE_BODY_BYTES && !compressed {
        return parse();
    }
    tokio::task::spawn_blocking(parse).await.map_err(|e| {
        tracing::error!(error = %e, "parsing a request body failed");
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the server failed to read this request; it has been logged",
        )
    })?
}

/// Decodes `body` as `headers` say ([`decode`], at most `limit` bytes) and
/// hands it to `parse`, both [`off_workers`].
pub async fn decoded_off_workers<T: Send + 'static>(
    headers: HeaderMap,
    body: Bytes,
    limit: usize,
    parse: impl FnOnce(&HeaderMap, Bytes) -> Result<T, Problem> + Send + 'static,
) -> Result<T, Problem> {
    off_workers(is_compressed(&headers), body.len(), move || {
        let body = decode(&headers, body, limit)?;
        parse(&headers, body)
    })
    .await
}
