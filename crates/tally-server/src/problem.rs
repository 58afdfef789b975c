//! `application/problem+json` (RFC 9457) answers.
//!
//! **Invariant:** every error a route answers is problem+json. Handlers
//! answer [`Problem`]s; what the framework answers by itself (a body over
//! the size limit, a method a route does not have, an extractor's
//! rejection) and a handler's panic are turned into one by
//! [`problem_json_errors`] and [`panic_answer`]. The one exception is
//! OTLP/HTTP, whose errors are `google.rpc.Status` in the request's
//! encoding, as the OTLP specification requires.

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;
use tally_ledger::LedgerError;
use tally_model::ResourceError;

/// An HTTP error as `application/problem+json`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    /// Every bad event of a rejected ingest request: index, id, and the
    /// problems with its fields.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<crate::schemas::EventProblem>>, nullable = false)]
    pub errors: Option<Box<Value>>,
    #[serde(skip)]
    retry_after: Option<u64>,
}

impl Problem {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Problem {
        Problem {
            kind: "about:blank",
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail: detail.into(),
            errors: None,
            retry_after: None,
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, detail)
    }

    /// Asks the client to retry after `seconds` (`Retry-After`).
    pub fn with_retry_after(mut self, seconds: u64) -> Problem {
        self.retry_after = Some(seconds);
        self
    }

    /// The `Retry-After` seconds asked for, if any.
    pub fn retry_after(&self) -> Option<u64> {
        self.retry_after
    }

    pub fn with_errors(mut self, errors: Value) -> Problem {
        self.errors = Some(Box::new(errors));
        self
    }
}

/// The answer to a request whose body did not arrive whole within
/// `timeout` (`tally_http`'s body-read timeout).
pub(crate) fn body_timed_out(timeout: std::time::Duration) -> Response {
    Problem::new(
        StatusCode::REQUEST_TIMEOUT,
        format!(
            "the request body did not arrive whole within {timeout:?} of its headers (http.bodyReadTimeout); nothing of it was stored"
        ),
    )
    .into_response()
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<LedgerError> for Problem {
    fn from(e: LedgerError) -> Problem {
        match e {
            LedgerError::Invalid(m) => Problem::bad_request(m),
            LedgerError::Rejected(errors) => Problem::bad_request(format!(
                "{} event(s) are invalid; nothing was stored",
                errors.len()
            ))
            .with_errors(serde_json::to_value(errors).unwrap_or_default()),
            LedgerError::Resource(ResourceError::Conflict { .. }) => {
                Problem::new(StatusCode::CONFLICT, e.to_string())
            }
            LedgerError::Resource(r) => Problem::bad_request(r.to_string()),
            e @ LedgerError::NotFound { .. } => Problem::new(StatusCode::NOT_FOUND, e.to_string()),
            LedgerError::Conflict(m) => Problem::new(StatusCode::CONFLICT, m),
            LedgerError::NotReady {
                message,
                retry_after_seconds,
            } => Problem::new(StatusCode::SERVICE_UNAVAILABLE, message)
                .with_retry_after(retry_after_seconds),
            LedgerError::Storage(m) => {
                tracing::error!(error = %m, "storage failure");
                Problem::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("storage failure: {m}"),
                )
            }
        }
    }
}

/// The most bytes of a framework error's plain-text body kept as `detail`.
const MAX_PLAIN_DETAIL: usize = 1024;

/// Middleware: an error answer without a body, or with a plain-text one
/// (axum's own rejections), becomes problem+json with the same status and
/// headers; its text, if any, is the `detail`.
pub async fn problem_json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let plain = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.starts_with("text/plain"));
    if !(status.is_client_error() || status.is_server_error()) || !plain {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_PLAIN_DETAIL)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let detail = match (text.is_empty(), status) {
        (false, _) => text,
        (true, StatusCode::METHOD_NOT_ALLOWED) => {
            let allowed = parts
                .headers
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            format!("this route does not take this method; it takes {allowed}")
        }
        (true, _) => status.canonical_reason().unwrap_or("error").to_owned(),
    };
    let problem = Problem::new(status, detail).into_response();
    parts.headers.remove(header::CONTENT_LENGTH);
    let (problem_parts, body) = problem.into_parts();
    parts.headers.extend(problem_parts.headers);
    Response::from_parts(parts, body)
}

/// What a request whose handler panicked is answered (with
/// `tower_http::catch_panic`): a 500 that says nothing of the panic.
pub fn panic_answer(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    Problem::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the server failed to answer this request; it has been logged",
    )
    .into_response()
}
