//! `application/problem+json` (RFC 9457) answers.

use axum::http::{HeaderValue, StatusCode, header};
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
    #[schema(value_type = Option<Object>)]
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
