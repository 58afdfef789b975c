//! OTLP/HTTP metrics on the wire, as pure functions: decoding received
//! requests (protobuf or JSON, optionally gzip), encoding requests for a sink,
//! and reading a sink's answer (full success, partial success, or an error
//! with whether it may be retried).

use std::io::Read as _;

use bytes::Bytes;
use flate2::Compression as GzipLevel;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message as _;

use crate::exporter::{Compression, Encoding};

/// `Content-Type` of OTLP protobuf bodies.
pub const PROTOBUF_CONTENT_TYPE: &str = "application/x-protobuf";
/// `Content-Type` of OTLP JSON bodies.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// Longest error message kept from a sink's answer.
const MAX_MESSAGE_LEN: usize = 1024;

/// Why a received body could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unsupported content type {0:?}; use application/x-protobuf or application/json")]
    UnsupportedContentType(String),
    #[error("unsupported content encoding {0:?}; use gzip or identity")]
    UnsupportedContentEncoding(String),
    #[error("the decompressed body exceeds {limit} bytes")]
    TooLarge { limit: usize },
    #[error("gzip body: {0}")]
    Gzip(#[source] std::io::Error),
    #[error("OTLP protobuf body: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("OTLP JSON body: {0}")]
    Json(#[from] serde_json::Error),
}

/// Why a request could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("OTLP JSON encoding: {0}")]
    Json(#[from] serde_json::Error),
    #[error("gzip: {0}")]
    Gzip(#[from] std::io::Error),
}

/// The encoding named by a `Content-Type` header (parameters ignored).
pub fn encoding_of_content_type(content_type: &str) -> Result<Encoding, DecodeError> {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case(PROTOBUF_CONTENT_TYPE)
        || essence.eq_ignore_ascii_case("application/protobuf")
    {
        Ok(Encoding::Protobuf)
    } else if essence.eq_ignore_ascii_case(JSON_CONTENT_TYPE) {
        Ok(Encoding::Json)
    } else {
        Err(DecodeError::UnsupportedContentType(content_type.to_owned()))
    }
}

/// Decodes an OTLP/HTTP `ExportMetricsServiceRequest` body. `content_encoding`
/// is the `Content-Encoding` header (`gzip`, `identity` or none);
/// `max_decoded_len` bounds the decompressed size.
pub fn decode_metrics_request(
    body: &[u8],
    encoding: Encoding,
    content_encoding: Option<&str>,
    max_decoded_len: usize,
) -> Result<ExportMetricsServiceRequest, DecodeError> {
    let owned;
    let raw: &[u8] = match content_encoding.map(str::trim) {
        None | Some("") => body,
        Some(e) if e.eq_ignore_ascii_case("identity") => body,
        Some(e) if e.eq_ignore_ascii_case("gzip") => {
            owned = gunzip(body, max_decoded_len)?;
            &owned
        }
        Some(other) => return Err(DecodeError::UnsupportedContentEncoding(other.to_owned())),
    };
    if raw.len() > max_decoded_len {
        return Err(DecodeError::TooLarge {
            limit: max_decoded_len,
        });
    }
    match encoding {
        Encoding::Protobuf => Ok(ExportMetricsServiceRequest::decode(raw)?),
        Encoding::Json => Ok(serde_json::from_slice(raw)?),
    }
}

fn gunzip(body: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::new();
    let read_limit = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    GzDecoder::new(body)
        .take(read_limit)
        .read_to_end(&mut out)
        .map_err(DecodeError::Gzip)?;
    if out.len() > limit {
        return Err(DecodeError::TooLarge { limit });
    }
    Ok(out)
}

/// A request body ready to be sent, with its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedRequest {
    pub body: Bytes,
    pub content_type: &'static str,
    pub content_encoding: Option<&'static str>,
}

/// Encodes a request for a sink.
pub fn encode_metrics_request(
    request: &ExportMetricsServiceRequest,
    encoding: Encoding,
    compression: Compression,
) -> Result<EncodedRequest, EncodeError> {
    let (raw, content_type) = match encoding {
        Encoding::Protobuf => (request.encode_to_vec(), PROTOBUF_CONTENT_TYPE),
        Encoding::Json => (serde_json::to_vec(request)?, JSON_CONTENT_TYPE),
    };
    let (body, content_encoding) = match compression {
        Compression::None => (raw, None),
        Compression::Gzip => {
            let mut encoder = GzEncoder::new(Vec::with_capacity(raw.len() / 4), GzipLevel::fast());
            std::io::Write::write_all(&mut encoder, &raw)?;
            (encoder.finish()?, Some("gzip"))
        }
    };
    Ok(EncodedRequest {
        body: Bytes::from(body),
        content_type,
        content_encoding,
    })
}

/// What a sink answered to an export request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportOutcome {
    /// Every data point was accepted (a warning may come with it).
    Accepted { warning: Option<String> },
    /// Some data points were refused; they must not be retried.
    PartiallyAccepted {
        rejected_data_points: i64,
        message: String,
    },
    /// The request failed.
    Failed {
        status: u16,
        /// 429, 502, 503 and 504 may be retried (OTLP/HTTP spec); nothing else.
        retryable: bool,
        message: String,
    },
}

/// `google.rpc.Status`, the body of OTLP/HTTP error answers (details ignored).
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

#[derive(serde::Deserialize)]
struct JsonStatus {
    #[serde(default)]
    message: String,
}

/// The body of an OTLP/HTTP error answer: a `google.rpc.Status` in the
/// request's encoding, as the OTLP/HTTP specification requires of a
/// receiver, with the gRPC code that corresponds to the HTTP status.
pub fn encode_error_status(encoding: Encoding, http_status: u16, message: &str) -> Vec<u8> {
    let code = match http_status {
        400 | 413 | 415 => 3, // INVALID_ARGUMENT
        401 => 16,            // UNAUTHENTICATED
        403 => 7,             // PERMISSION_DENIED
        404 => 5,             // NOT_FOUND
        429 => 8,             // RESOURCE_EXHAUSTED
        502..=504 => 14,      // UNAVAILABLE
        _ => 13,              // INTERNAL
    };
    match encoding {
        Encoding::Protobuf => RpcStatus {
            code,
            message: message.to_owned(),
        }
        .encode_to_vec(),
        Encoding::Json => {
            serde_json::to_vec(&serde_json::json!({"code": code, "message": message}))
                .unwrap_or_default()
        }
    }
}

/// Reads a sink's answer: HTTP status, `Content-Type` and (decompressed) body.
pub fn parse_export_response(
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
) -> ExportOutcome {
    let encoding = content_type.and_then(|ct| encoding_of_content_type(ct).ok());
    if (200..300).contains(&status) {
        let partial = match encoding {
            Some(Encoding::Json) => json_partial_success(body),
            _ => ExportMetricsServiceResponse::decode(body)
                .ok()
                .and_then(|r| r.partial_success),
        };
        let Some(partial) = partial else {
            return ExportOutcome::Accepted { warning: None };
        };
        let message = bounded(partial.error_message);
        return if partial.rejected_data_points > 0 {
            ExportOutcome::PartiallyAccepted {
                rejected_data_points: partial.rejected_data_points,
                message,
            }
        } else {
            ExportOutcome::Accepted {
                warning: (!message.is_empty()).then_some(message),
            }
        };
    }
    let message = match encoding {
        Some(Encoding::Protobuf) => RpcStatus::decode(body).ok().map(|s| s.message),
        Some(Encoding::Json) => serde_json::from_slice::<JsonStatus>(body)
            .ok()
            .map(|s| s.message),
        None => None,
    }
    .filter(|m| !m.is_empty())
    .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned());
    ExportOutcome::Failed {
        status,
        retryable: matches!(status, 429 | 502 | 503 | 504),
        message: bounded(message),
    }
}

/// Reads `partialSuccess` of a JSON answer; protobuf JSON writes int64 as a
/// string, some servers as a number: both are accepted.
fn json_partial_success(body: &[u8]) -> Option<ExportMetricsPartialSuccess> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let partial = value.get("partialSuccess")?;
    let rejected = match partial.get("rejectedDataPoints") {
        Some(serde_json::Value::String(s)) => s.parse().ok()?,
        Some(v) => v.as_i64()?,
        None => 0,
    };
    let message = partial
        .get("errorMessage")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default();
    Some(ExportMetricsPartialSuccess {
        rejected_data_points: rejected,
        error_message: message.to_owned(),
    })
}

fn bounded(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_LEN {
        let mut end = MAX_MESSAGE_LEN;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

/// A string-valued attribute.
pub fn string_attribute(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
        ..Default::default()
    }
}

/// The number of data points in a request.
pub fn data_point_count(request: &ExportMetricsServiceRequest) -> usize {
    request
        .resource_metrics
        .iter()
        .flat_map(|rm| &rm.scope_metrics)
        .flat_map(|sm| &sm.metrics)
        .filter_map(|m| m.data.as_ref())
        .map(crate::otlp::data_point_count_of)
        .sum()
}

/// How many data points one metric's `data` holds.
pub(crate) fn data_point_count_of(
    data: &opentelemetry_proto::tonic::metrics::v1::metric::Data,
) -> usize {
    match data {
        opentelemetry_proto::tonic::metrics::v1::metric::Data::Gauge(g) => g.data_points.len(),
        opentelemetry_proto::tonic::metrics::v1::metric::Data::Sum(s) => s.data_points.len(),
        opentelemetry_proto::tonic::metrics::v1::metric::Data::Histogram(h) => h.data_points.len(),
        opentelemetry_proto::tonic::metrics::v1::metric::Data::ExponentialHistogram(h) => {
            h.data_points.len()
        }
        opentelemetry_proto::tonic::metrics::v1::metric::Data::Summary(s) => s.data_points.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_partial_success_in_both_encodings() {
        let response = ExportMetricsServiceResponse {
            partial_success: Some(ExportMetricsPartialSuccess {
                rejected_data_points: 3,
                error_message: "bad points".into(),
            }),
        };
        let expected = ExportOutcome::PartiallyAccepted {
            rejected_data_points: 3,
            message: "bad points".into(),
        };
        let pb = response.encode_to_vec();
        assert_eq!(
            parse_export_response(200, Some(PROTOBUF_CONTENT_TYPE), &pb),
            expected
        );
        for json in [
            &br#"{"partialSuccess":{"rejectedDataPoints":"3","errorMessage":"bad points"}}"#[..],
            br#"{"partialSuccess":{"rejectedDataPoints":3,"errorMessage":"bad points"}}"#,
        ] {
            let ct = Some("application/json; charset=utf-8");
            assert_eq!(parse_export_response(200, ct, json), expected);
        }
        assert_eq!(
            parse_export_response(200, Some(PROTOBUF_CONTENT_TYPE), b""),
            ExportOutcome::Accepted { warning: None }
        );
        let warning = ExportMetricsServiceResponse {
            partial_success: Some(ExportMetricsPartialSuccess {
                rejected_data_points: 0,
                error_message: "deprecated".into(),
            }),
        };
        assert_eq!(
            parse_export_response(200, Some(PROTOBUF_CONTENT_TYPE), &warning.encode_to_vec()),
            ExportOutcome::Accepted {
                warning: Some("deprecated".into())
            }
        );
    }

    #[test]
    fn error_answers_are_rpc_statuses_in_the_request_encoding() {
        let body = encode_error_status(Encoding::Protobuf, 503, "full");
        assert_eq!(
            RpcStatus::decode(body.as_slice()).unwrap(),
            RpcStatus {
                code: 14,
                message: "full".into()
            }
        );
        let body = encode_error_status(Encoding::Json, 400, "bad");
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
            serde_json::json!({"code": 3, "message": "bad"})
        );
        // What a sink reads back.
        assert_eq!(
            parse_export_response(503, Some(JSON_CONTENT_TYPE), &body),
            ExportOutcome::Failed {
                status: 503,
                retryable: true,
                message: "bad".into()
            }
        );
    }

    #[test]
    fn reads_errors_and_retryability() {
        let status = RpcStatus {
            code: 8,
            message: "slow down".into(),
        };
        assert_eq!(
            parse_export_response(429, Some(PROTOBUF_CONTENT_TYPE), &status.encode_to_vec()),
            ExportOutcome::Failed {
                status: 429,
                retryable: true,
                message: "slow down".into()
            }
        );
        assert_eq!(
            parse_export_response(
                400,
                Some("application/json"),
                br#"{"code":3,"message":"bad"}"#
            ),
            ExportOutcome::Failed {
                status: 400,
                retryable: false,
                message: "bad".into()
            }
        );
        let ExportOutcome::Failed {
            retryable, message, ..
        } = parse_export_response(503, Some("text/plain"), &vec![b'x'; 5000])
        else {
            panic!("a 503 is a failure")
        };
        assert!(retryable);
        assert!(message.len() <= MAX_MESSAGE_LEN + '…'.len_utf8());
    }

    #[test]
    fn refuses_bombs_and_unknown_encodings() {
        let big = ExportMetricsServiceRequest::default();
        let encoded = encode_metrics_request(&big, Encoding::Json, Compression::Gzip).unwrap();
        assert!(decode_metrics_request(&encoded.body, Encoding::Json, Some("gzip"), 1).is_err());
        assert!(matches!(
            decode_metrics_request(b"", Encoding::Protobuf, Some("br"), 100),
            Err(DecodeError::UnsupportedContentEncoding(_))
        ));
        assert!(matches!(
            encoding_of_content_type("text/plain"),
            Err(DecodeError::UnsupportedContentType(_))
        ));
        assert!(decode_metrics_request(b"\xff\xff", Encoding::Protobuf, None, 100).is_err());
    }
}
