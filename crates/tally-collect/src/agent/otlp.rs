//! The OTLP logs receivers' shared path and the OTLP/HTTP receiver
//! (`POST /v1/logs`); the gRPC service is in `grpc.rs` and calls [`store`]
//! too, and the spool is `spool.rs`.
//!
//! Envoy's OpenTelemetry access-log sink sends the access-log fields as log
//! record attributes (and/or a key-value body). Each record becomes the JSON
//! access-log line the file inputs read ([`record_line`]): attributes, then
//! the body's key-values (or the body string, when it holds a JSON object),
//! with `start_time` taken from the record's time when it is not an
//! attribute. The lines are appended to the spool and fsync'd before the
//! answer, so an answered request is never lost; the OTLP input tails the
//! spool. While the OTLP input's outbox or unread spool is over its limit,
//! exports are refused with a retryable answer (HTTP 503 with
//! `Retry-After`, gRPC `UNAVAILABLE`) and nothing is written.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use prost::Message as _;
use serde_json::{Map, Value};

use super::HttpState;
use super::spool::{MAX_BODY_BYTES, Spool, Unavailable, decode_body, media_type};

/// The one path of every OTLP logs export, whatever the transport: turns
/// its records into access-log lines, appends them to the spool durably,
/// and says how many records had nothing to make a line of.
pub(crate) async fn store(
    spool: &Arc<Spool>,
    request: &ExportLogsServiceRequest,
) -> Result<ExportLogsServiceResponse, Unavailable> {
    let (text, rejected) = access_log_lines(request);
    spool.store(text).await?;
    let partial_success = (rejected > 0).then(|| ExportLogsPartialSuccess {
        rejected_log_records: rejected,
        error_message: format!(
            "{rejected} log records carry no access-log fields (neither attributes nor a key-value or JSON body)"
        ),
    });
    Ok(ExportLogsServiceResponse { partial_success })
}

/// How an OTLP/HTTP logs request is encoded; the answer uses the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogsEncoding {
    Protobuf,
    Json,
}

impl LogsEncoding {
    /// The encoding a media type (lower case, without parameters) names.
    pub fn of_media_type(media_type: &str) -> Option<LogsEncoding> {
        match media_type {
            "application/x-protobuf" | "application/protobuf" => Some(LogsEncoding::Protobuf),
            "application/json" => Some(LogsEncoding::Json),
            _ => None,
        }
    }
}

/// Decodes an OTLP/HTTP logs body (already decompressed), as `POST
/// /v1/logs` does.
pub fn decode_logs_request(
    encoding: LogsEncoding,
    body: &[u8],
) -> Result<ExportLogsServiceRequest, String> {
    match encoding {
        LogsEncoding::Protobuf => ExportLogsServiceRequest::decode(body)
            .map_err(|e| format!("not an ExportLogsServiceRequest: {e}")),
        LogsEncoding::Json => serde_json::from_slice::<ExportLogsServiceRequest>(body)
            .map_err(|e| format!("not an ExportLogsServiceRequest in OTLP/JSON: {e}")),
    }
}

fn answer(
    encoding: LogsEncoding,
    status: StatusCode,
    response: &ExportLogsServiceResponse,
) -> Response {
    match encoding {
        LogsEncoding::Protobuf => (
            status,
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            response.encode_to_vec(),
        )
            .into_response(),
        LogsEncoding::Json => (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::to_vec(response).unwrap_or_else(|_| b"{}".to_vec()),
        )
            .into_response(),
    }
}

fn refuse(status: StatusCode, message: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain")], message).into_response()
}

/// `POST /v1/logs`.
pub(crate) async fn receive_logs(
    State(state): State<HttpState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(spool) = state.spool.clone() else {
        return refuse(
            StatusCode::NOT_FOUND,
            "the OTLP receiver is off; start tally collect with --otlp".to_owned(),
        );
    };
    let media_type = media_type(&headers);
    let Some(encoding) = LogsEncoding::of_media_type(&media_type) else {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "content type {media_type:?} is neither application/x-protobuf nor application/json"
            ),
        );
    };
    let body = match decode_body(&headers, body, MAX_BODY_BYTES) {
        Ok(body) => body,
        Err(message) => return refuse(StatusCode::BAD_REQUEST, message),
    };
    let request = match decode_logs_request(encoding, &body) {
        Ok(request) => request,
        Err(message) => return refuse(StatusCode::BAD_REQUEST, message),
    };
    match store(&spool, &request).await {
        Ok(response) => answer(encoding, StatusCode::OK, &response),
        Err(Unavailable(message)) => {
            let mut response = refuse(StatusCode::SERVICE_UNAVAILABLE, message);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            response
        }
    }
}

/// The access-log lines of a request as the spool holds them (each ends in
/// a newline), and how many records had nothing to make one of.
pub fn access_log_lines(request: &ExportLogsServiceRequest) -> (Vec<u8>, i64) {
    let mut text = Vec::new();
    let mut rejected = 0;
    for resource in &request.resource_logs {
        for scope in &resource.scope_logs {
            for record in &scope.log_records {
                match record_line(record) {
                    Some(line) => {
                        text.extend_from_slice(line.as_bytes());
                        text.push(b'\n');
                    }
                    None => rejected += 1,
                }
            }
        }
    }
    (text, rejected)
}

/// One OTLP log record as the JSON access-log line the file inputs read;
/// `None` if it has no access-log fields.
pub fn record_line(record: &LogRecord) -> Option<String> {
    let mut fields = Map::new();
    put_all(&mut fields, &record.attributes);
    match record.body.as_ref().and_then(|b| b.value.as_ref()) {
        Some(any_value::Value::KvlistValue(list)) => put_all(&mut fields, &list.values),
        Some(any_value::Value::StringValue(text)) => {
            if let Ok(Value::Object(object)) = serde_json::from_str::<Value>(text) {
                for (key, value) in object {
                    fields.entry(key).or_insert(value);
                }
            }
        }
        _ => {}
    }
    if fields.is_empty() {
        return None;
    }
    if !fields.contains_key("start_time") {
        let nanos = if record.time_unix_nano != 0 {
            record.time_unix_nano
        } else {
            record.observed_time_unix_nano
        };
        if nanos != 0
            && let Ok(at) = jiff::Timestamp::from_nanosecond(i128::from(nanos))
        {
            fields.insert(
                "start_time".into(),
                Value::String(at.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()),
            );
        }
    }
    serde_json::to_string(&Value::Object(fields)).ok()
}

fn put_all(fields: &mut Map<String, Value>, attributes: &[KeyValue]) {
    for attribute in attributes {
        if let Some(value) = attribute.value.as_ref().and_then(json_value) {
            fields.entry(attribute.key.clone()).or_insert(value);
        }
    }
}

fn json_value(value: &AnyValue) -> Option<Value> {
    Some(match value.value.as_ref()? {
        any_value::Value::StringValue(s) => Value::String(s.clone()),
        any_value::Value::BoolValue(b) => Value::Bool(*b),
        any_value::Value::IntValue(i) => Value::from(*i),
        any_value::Value::DoubleValue(d) => serde_json::Number::from_f64(*d).map(Value::Number)?,
        any_value::Value::ArrayValue(a) => {
            Value::Array(a.values.iter().filter_map(json_value).collect())
        }
        any_value::Value::KvlistValue(list) => {
            let mut map = Map::new();
            put_all(&mut map, &list.values);
            Value::Object(map)
        }
        any_value::Value::BytesValue(_) | any_value::Value::StringValueStrindex(_) => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(key: &str, value: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        }
    }

    #[test]
    fn a_record_becomes_the_same_line_as_the_file_format() {
        let record = LogRecord {
            time_unix_nano: 1_714_564_801_250_000_000,
            attributes: vec![
                attr(
                    "route_name",
                    any_value::Value::StringValue("httproute/shop/api/rule/0".into()),
                ),
                attr("bytes_sent", any_value::Value::IntValue(2048)),
                attr(
                    "bytes_received",
                    any_value::Value::StringValue("120".into()),
                ),
            ],
            ..Default::default()
        };
        let line = record_line(&record).unwrap();
        let parsed = crate::record::parse_access_line(line.as_bytes()).unwrap();
        assert_eq!(parsed.route(), Some("httproute/shop/api/rule/0"));
        assert_eq!((parsed.ingress_bytes(), parsed.egress_bytes()), (120, 2048));
        assert_eq!(
            parsed.start_time.as_deref(),
            Some("2024-05-01T12:00:01.250Z")
        );
        assert_eq!(record_line(&LogRecord::default()), None);
    }
}
