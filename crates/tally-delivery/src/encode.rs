//! What a sink supplies: how a batch becomes an HTTP request, and what an
//! answer means.

use std::collections::BTreeSet;
use std::fmt;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};

/// One queued record. The delivery machinery never looks inside: the caller
/// serialises `data`, and `key` (an event id, a log offset...) comes back in
/// [`crate::BatchOutcome`] so the caller can checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Item {
    /// The caller's identity for the item; may be empty.
    pub key: Bytes,
    /// The serialised record.
    pub data: Bytes,
}

impl Item {
    /// An item from a key and its data.
    pub fn new(key: impl Into<Bytes>, data: impl Into<Bytes>) -> Self {
        Item {
            key: key.into(),
            data: data.into(),
        }
    }

    /// Bytes this item counts for in queue and batch limits.
    pub fn size(&self) -> usize {
        self.key.len() + self.data.len()
    }
}

/// A string that must never be shown: `Debug` and `Display` print
/// `[redacted]`. Use it for API keys and tokens.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself; only for putting it where it is needed.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Why a sink could not build a request.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct EncodeError(String);

impl EncodeError {
    /// An error with a message (never put a secret in it).
    pub fn new(message: impl Into<String>) -> Self {
        EncodeError(message.into())
    }
}

/// The request a sink makes of a batch. Secret headers are marked sensitive,
/// so `Debug` shows `Sensitive` instead of their values; the body is shown
/// only by its length.
#[derive(Clone)]
pub struct HttpRequest {
    pub(crate) method: Method,
    pub(crate) url: reqwest::Url,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) gzip: bool,
}

impl fmt::Debug for HttpRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpRequest")
            .field("method", &self.method)
            .field("url", &self.url.as_str())
            .field("headers", &self.headers)
            .field("body_len", &self.body.len())
            .field("gzip", &self.gzip)
            .finish()
    }
}

impl HttpRequest {
    /// A `POST` to `url` with an empty body.
    pub fn post(url: reqwest::Url) -> Self {
        HttpRequest {
            method: Method::POST,
            url,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            gzip: false,
        }
    }

    /// Sets the method (default `POST`).
    pub fn method(mut self, method: Method) -> Self {
        self.method = method;
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.append(name, value);
        self
    }

    /// Adds a header whose value is secret (an API key, `Bearer ...`). The
    /// value is marked sensitive; it fails only if the value is not a valid
    /// header value, and the error does not repeat it.
    pub fn secret_header(mut self, name: HeaderName, value: &Secret) -> Result<Self, EncodeError> {
        let mut value = HeaderValue::from_str(value.expose()).map_err(|_| {
            EncodeError::new(format!(
                "the secret for header {name} is not a valid header value"
            ))
        })?;
        value.set_sensitive(true);
        self.headers.append(name, value);
        Ok(self)
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// Gzips the body when sending (and sets `Content-Encoding: gzip`).
    pub fn gzip(mut self, gzip: bool) -> Self {
        self.gzip = gzip;
        self
    }

    /// The URL.
    pub fn url(&self) -> &reqwest::Url {
        &self.url
    }

    /// The headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The body, before any gzip.
    pub fn body_bytes(&self) -> &Bytes {
        &self.body
    }
}

/// An HTTP answer, as shown to [`Encoder::classify`].
#[derive(Debug)]
pub struct Answer<'a> {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: &'a HeaderMap,
    /// The body (decompressed; cut at 1 MiB).
    pub body: &'a [u8],
    /// The statuses the sink's configuration says to retry.
    pub retryable_statuses: &'a BTreeSet<u16>,
}

impl Answer<'_> {
    /// The default meaning of an answer: 2xx delivered with nothing rejected;
    /// a status in the configured retryable set retryable; anything else
    /// permanent.
    pub fn default_verdict(&self) -> Verdict {
        if self.status.is_success() {
            Verdict::Delivered { rejected: 0 }
        } else if self.retryable_statuses.contains(&self.status.as_u16()) {
            Verdict::Retryable
        } else {
            Verdict::Permanent
        }
    }
}

/// What an answer means for the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The receiver took the batch; `rejected` of its items were refused for
    /// good by the receiver (e.g. OTLP partial success) and are counted as
    /// dropped, not retried.
    Delivered {
        /// Items the receiver refused.
        rejected: u64,
    },
    /// Try again later (honouring `Retry-After` if the answer has one).
    Retryable,
    /// Never going to work: dead-letter the batch.
    Permanent,
}

/// The only code a sink writes: turn a batch into a request, and (if the
/// default is not right) say what an answer means. Timeouts and connection
/// errors are always retryable.
pub trait Encoder: Send + Sync + 'static {
    /// The request carrying `items` (never empty). An error dead-letters the
    /// batch.
    fn encode(&self, items: &[Item]) -> Result<HttpRequest, EncodeError>;

    /// What `answer` means; by default [`Answer::default_verdict`].
    fn classify(&self, answer: &Answer<'_>) -> Verdict {
        answer.default_verdict()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::AUTHORIZATION;

    #[test]
    fn secrets_never_show_in_debug_or_display() {
        let secret = Secret::new("sk-live-123");
        assert_eq!(format!("{secret} {secret:?}"), "[redacted] [redacted]");
        let url = reqwest::Url::parse("http://127.0.0.1:1/ingest").unwrap();
        let request = HttpRequest::post(url)
            .secret_header(AUTHORIZATION, &Secret::new("Bearer sk-live-123"))
            .unwrap()
            .body("payload");
        let shown = format!("{request:?}");
        assert!(!shown.contains("sk-live-123"), "{shown}");
        assert!(shown.contains("Sensitive"), "{shown}");
    }

    #[test]
    fn an_invalid_secret_header_error_does_not_repeat_it() {
        let url = reqwest::Url::parse("http://127.0.0.1:1/").unwrap();
        let err = HttpRequest::post(url)
            .secret_header(AUTHORIZATION, &Secret::new("bad\nsk-live-123"))
            .unwrap_err();
        assert!(!err.to_string().contains("sk-live"));
    }

    #[test]
    fn default_verdicts() {
        let headers = HeaderMap::new();
        let default = crate::RetryConfig::default().retryable_statuses;
        let all_5xx = crate::RetryConfig::default()
            .retry_all_5xx()
            .retryable_statuses;
        let verdict = |status: u16, set: &BTreeSet<u16>| {
            Answer {
                status: StatusCode::from_u16(status).unwrap(),
                headers: &headers,
                body: b"",
                retryable_statuses: set,
            }
            .default_verdict()
        };
        assert_eq!(verdict(200, &default), Verdict::Delivered { rejected: 0 });
        assert_eq!(verdict(204, &default), Verdict::Delivered { rejected: 0 });
        for s in [429, 502, 503, 504] {
            assert_eq!(verdict(s, &default), Verdict::Retryable, "{s}");
        }
        for s in [400, 401, 404, 413, 500, 501] {
            assert_eq!(verdict(s, &default), Verdict::Permanent, "{s}");
        }
        assert_eq!(verdict(500, &all_5xx), Verdict::Retryable);
        assert_eq!(verdict(400, &all_5xx), Verdict::Permanent);
    }
}
