//! The `tally-delivery` encoder of exporter sinks: a batch (concatenated
//! protobuf shares) becomes one OTLP/HTTP request; answers are read per the
//! OTLP specification (partial success, retryable statuses).
//!
//! **Never:** put what an endpoint answered in a status (only its HTTP status
//! and Tally's words; its message goes to the operator's debug log, scrubbed).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use prost::Message as _;
use reqwest::header::{CONTENT_TYPE, HeaderValue};
use tally_delivery::{Answer, EncodeError, Encoder, HttpRequest, Item, Verdict};

use crate::exporter::Encoding;
use crate::otlp::{self, ExportOutcome};
use crate::sink::SinkShared;

/// Shared by one delivery sink's encoder and hooks: the batch being sent.
#[derive(Default)]
pub(crate) struct InFlight {
    pub(crate) points: AtomicU64,
    pub(crate) rejected: AtomicU64,
}

pub(crate) fn points_of(keys: &[Bytes]) -> u64 {
    keys.iter()
        .map(|k| <[u8; 8]>::try_from(&k[..]).map_or(0, u64::from_le_bytes))
        .sum()
}

/// Turns a batch (concatenated protobuf shares) into an OTLP/HTTP request,
/// and reads answers per the OTLP spec.
pub(crate) struct OtlpEncoder {
    pub(crate) url: url::Url,
    pub(crate) encoding: Encoding,
    pub(crate) gzip: bool,
    pub(crate) shared: Arc<SinkShared>,
    pub(crate) in_flight: Arc<InFlight>,
}

/// `500 Internal Server Error`: an answer's status as a status may show it.
pub(crate) fn answered(status: reqwest::StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => format!("HTTP {}", status.as_u16()),
    }
}

impl Encoder for OtlpEncoder {
    fn encode(&self, items: &[Item]) -> Result<HttpRequest, EncodeError> {
        let keys: Vec<Bytes> = items.iter().map(|i| i.key.clone()).collect();
        self.in_flight
            .points
            .store(points_of(&keys), Ordering::Relaxed);
        self.in_flight.rejected.store(0, Ordering::Relaxed);
        let headers = self.shared.headers().map_err(EncodeError::new)?;
        let protobuf: Bytes = match items {
            [one] => one.data.clone(),
            many => many
                .iter()
                .flat_map(|i| i.data.iter().copied())
                .collect::<Vec<u8>>()
                .into(),
        };
        let (body, content_type) = match self.encoding {
            Encoding::Protobuf => (protobuf, otlp::PROTOBUF_CONTENT_TYPE),
            Encoding::Json => {
                let request = ExportMetricsServiceRequest::decode(&protobuf[..])
                    .map_err(|e| EncodeError::new(format!("re-reading a batch: {e}")))?;
                let json = serde_json::to_vec(&request)
                    .map_err(|e| EncodeError::new(format!("OTLP JSON encoding: {e}")))?;
                (Bytes::from(json), otlp::JSON_CONTENT_TYPE)
            }
        };
        let url = reqwest::Url::parse(self.url.as_str())
            .map_err(|e| EncodeError::new(format!("endpoint URL: {e}")))?;
        let mut request = HttpRequest::post(url)
            .header(CONTENT_TYPE, HeaderValue::from_static(content_type))
            .body(body)
            .gzip(self.gzip);
        for (name, value) in headers.iter() {
            request = request.secret_header(name.clone(), value)?;
        }
        Ok(request)
    }

    fn classify(&self, answer: &Answer<'_>) -> Verdict {
        let content_type = answer
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        match otlp::parse_export_response(answer.status.as_u16(), content_type, answer.body) {
            ExportOutcome::Accepted { .. } => Verdict::Delivered { rejected: 0 },
            ExportOutcome::PartiallyAccepted {
                rejected_data_points,
                message,
            } => {
                let rejected = u64::try_from(rejected_data_points).unwrap_or(0);
                self.in_flight.rejected.store(rejected, Ordering::Relaxed);
                // Its message is the endpoint's words: the operator's log only.
                tracing::debug!(sink = %self.shared.metrics.id(),
                    message = %self.shared.scrub(&message), "partial success");
                self.shared.fail(format!(
                    "the endpoint answered {} and rejected {rejected} data point(s)",
                    answered(answer.status)
                ));
                // The points were refused for good: counted by the outcome
                // hook in data points, not retried.
                Verdict::Delivered { rejected: 0 }
            }
            ExportOutcome::Failed {
                retryable, message, ..
            } => {
                tracing::debug!(sink = %self.shared.metrics.id(), status = answer.status.as_u16(),
                    message = %self.shared.scrub(&message), "the endpoint refused an export");
                let redirect = if answer.status.is_redirection() {
                    " (redirects are not followed)"
                } else {
                    ""
                };
                self.shared.fail(format!(
                    "the endpoint answered {}{redirect}",
                    answered(answer.status)
                ));
                if retryable {
                    Verdict::Retryable
                } else {
                    Verdict::Permanent
                }
            }
        }
    }
}
