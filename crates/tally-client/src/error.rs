//! What can go wrong talking to a Tally server.

use std::fmt;

use serde_json::Value;

/// An error from [`crate::TallyClient`].
///
/// No variant ever holds the bearer token, so errors may be logged and shown
/// as they are.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClientError {
    /// The server URL given to [`crate::TallyClient::new`] is unusable.
    #[error("invalid server URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server could not be reached at all (refused, unresolvable, timed out).
    #[error("could not reach the Tally server at {url}: {reason}")]
    Connect {
        /// The URL of the request that could not be sent.
        url: String,
        /// The underlying cause, e.g. "Connection refused (os error 111)".
        reason: String,
    },
    /// The connection broke while sending a request or reading its answer.
    #[error("request to {url} failed: {reason}")]
    Transport {
        /// The URL of the request.
        url: String,
        /// The underlying cause.
        reason: String,
    },
    /// The server answered with an error (`application/problem+json`, or any
    /// other non-2xx answer).
    #[error("{}", ApiDisplay { status: *.status, title, detail: detail.as_deref(), errors: errors.as_ref() })]
    Api {
        /// HTTP status code.
        status: u16,
        /// Short summary of the problem.
        title: String,
        /// Explanation specific to this request, when the server gave one.
        detail: Option<String>,
        /// For refused events: `[{"index","id","errors":[{"field","reason"}]}]`.
        errors: Option<Value>,
    },
    /// The server answered 2xx with a body this client does not understand.
    #[error("unexpected answer from {url}: {reason}")]
    Decode {
        /// The URL of the request.
        url: String,
        /// Why the body could not be read.
        reason: String,
    },
    /// The request could not be built from the arguments given.
    #[error("{0}")]
    InvalidRequest(String),
}

impl ClientError {
    /// The HTTP status of an [`ClientError::Api`] error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Renders an API error: one summary line, then one line per field error of
/// every refused event.
struct ApiDisplay<'a> {
    status: u16,
    title: &'a str,
    detail: Option<&'a str>,
    errors: Option<&'a Value>,
}

impl fmt::Display for ApiDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (HTTP {})", self.title, self.status)?;
        if let Some(detail) = self.detail.filter(|d| !d.is_empty() && *d != self.title) {
            write!(f, ": {detail}")?;
        }
        match self.errors {
            None | Some(Value::Null) => Ok(()),
            Some(Value::Array(items)) => items
                .iter()
                .try_for_each(|item| write_event_errors(f, item)),
            Some(other) => write!(f, "\n  {other}"),
        }
    }
}

/// Writes `  event 3 (id "x"): field: reason` for each field error of one
/// refused event; anything of another shape is written as compact JSON.
fn write_event_errors(f: &mut fmt::Formatter<'_>, item: &Value) -> fmt::Result {
    let index = item.get("index").and_then(Value::as_u64);
    let id = item.get("id").and_then(Value::as_str);
    let field_errors = item.get("errors").and_then(Value::as_array);
    let (Some(index), Some(field_errors)) = (index, field_errors) else {
        return write!(f, "\n  {item}");
    };
    let label = match id {
        Some(id) => format!("event {index} (id {id:?})"),
        None => format!("event {index}"),
    };
    if field_errors.is_empty() {
        return write!(f, "\n  {label}: refused");
    }
    for error in field_errors {
        let field = error.get("field").and_then(Value::as_str).unwrap_or("");
        let reason = error.get("reason").and_then(Value::as_str);
        match (field, reason) {
            (_, None) => write!(f, "\n  {label}: {error}")?,
            ("", Some(reason)) => write!(f, "\n  {label}: {reason}")?,
            (field, Some(reason)) => write!(f, "\n  {label}: {field}: {reason}")?,
        }
    }
    Ok(())
}

/// Builds an [`ClientError::Api`] from a non-2xx answer's status and body.
pub(crate) fn api_error(status: reqwest::StatusCode, body: &[u8]) -> ClientError {
    let fallback_title = status.canonical_reason().unwrap_or("HTTP error").to_owned();
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(problem)) => {
            let text = |key: &str| problem.get(key).and_then(Value::as_str).map(str::to_owned);
            ClientError::Api {
                status: status.as_u16(),
                title: text("title").unwrap_or(fallback_title),
                detail: text("detail").or_else(|| text("message")),
                errors: problem.get("errors").filter(|e| !e.is_null()).cloned(),
            }
        }
        _ => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            ClientError::Api {
                status: status.as_u16(),
                title: fallback_title,
                detail: (!text.is_empty()).then(|| truncate(text, 500)),
                errors: None,
            }
        }
    }
}

fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// The innermost cause of an error, which says what actually happened
/// ("Connection refused (os error 111)") rather than where.
pub(crate) fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn api_errors_list_every_field_error() {
        let error = api_error(
            reqwest::StatusCode::UNPROCESSABLE_ENTITY,
            json!({
                "type": "about:blank", "title": "Events refused", "status": 422,
                "detail": "2 event(s) refused",
                "errors": [
                    {"index": 0, "id": "a", "errors": [
                        {"field": "time", "reason": "not an RFC 3339 timestamp"},
                        {"field": "subject", "reason": "is required"}]},
                    {"index": 4, "errors": [{"field": "", "reason": "an event must be a JSON object"}]}
                ]
            })
            .to_string()
            .as_bytes(),
        );
        assert_eq!(
            error.to_string(),
            "Events refused (HTTP 422): 2 event(s) refused\n  \
             event 0 (id \"a\"): time: not an RFC 3339 timestamp\n  \
             event 0 (id \"a\"): subject: is required\n  \
             event 4: an event must be a JSON object"
        );
        assert_eq!(error.status(), Some(422));
    }

    #[test]
    fn non_json_errors_keep_their_text() {
        let error = api_error(reqwest::StatusCode::BAD_GATEWAY, b"upstream down\n");
        assert_eq!(error.to_string(), "Bad Gateway (HTTP 502): upstream down");
        let error = api_error(reqwest::StatusCode::NOT_FOUND, b"");
        assert_eq!(error.to_string(), "Not Found (HTTP 404)");
    }

    #[test]
    fn long_bodies_are_cut() {
        assert_eq!(truncate("ééééé", 3), "ééé…");
        assert_eq!(truncate("abc", 3), "abc");
    }
}
