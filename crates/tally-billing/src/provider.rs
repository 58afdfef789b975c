//! Provider adapters: each turns a batch of [`UsageRecord`]s into one HTTP
//! request and nothing more (batching, retries, `Retry-After` and dead
//! letters are `tally-delivery`'s job).

use std::collections::BTreeMap;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName, HeaderValue};
use serde::Serialize;
use serde_json::value::RawValue;
use tally_delivery::{EncodeError, Encoder, HttpRequest, Item, Secret};

use crate::config::Provider;
use crate::record::UsageRecord;

/// The encoder of a provider, ready for `tally_delivery::Sink::builder`.
pub enum ProviderEncoder {
    /// Amberflo.
    Amberflo(AmberfloEncoder),
    /// OpenMeter.
    OpenMeter(OpenMeterEncoder),
}

impl ProviderEncoder {
    /// The encoder of `provider` at `endpoint`; `source` names the sender
    /// where the provider wants one (OpenMeter's CloudEvents `source`).
    pub fn new(
        provider: Provider,
        endpoint: &reqwest::Url,
        api_key: Secret,
        source: &str,
    ) -> Result<Self, EncodeError> {
        Ok(match provider {
            Provider::Amberflo => {
                ProviderEncoder::Amberflo(AmberfloEncoder::new(endpoint, api_key)?)
            }
            Provider::Openmeter => {
                ProviderEncoder::OpenMeter(OpenMeterEncoder::new(endpoint, api_key, source)?)
            }
        })
    }
}

impl Encoder for ProviderEncoder {
    fn encode(&self, items: &[Item]) -> Result<HttpRequest, EncodeError> {
        match self {
            ProviderEncoder::Amberflo(e) => e.encode(items),
            ProviderEncoder::OpenMeter(e) => e.encode(items),
        }
    }
}

fn join(endpoint: &reqwest::Url, path: &str) -> Result<reqwest::Url, EncodeError> {
    let base = endpoint.as_str().trim_end_matches('/');
    reqwest::Url::parse(&format!("{base}{path}"))
        .map_err(|e| EncodeError::new(format!("endpoint {base:?} + {path}: {e}")))
}

fn records(items: &[Item]) -> Result<Vec<UsageRecord>, EncodeError> {
    items
        .iter()
        .map(|item| {
            serde_json::from_slice(&item.data)
                .map_err(|e| EncodeError::new(format!("queued record is not a usage record: {e}")))
        })
        .collect()
}

/// A decimal as a JSON number, exactly as written.
fn number(value: rust_decimal::Decimal) -> Result<Box<RawValue>, EncodeError> {
    RawValue::from_string(value.normalize().to_string())
        .map_err(|e| EncodeError::new(format!("meter value {value}: {e}")))
}

/// Amberflo's ingest API: `POST {endpoint}/ingest`, a gzip'd JSON array of
/// meter records, the API key in `X-API-KEY`.
pub struct AmberfloEncoder {
    url: reqwest::Url,
    api_key: Secret,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AmberfloRecord<'a> {
    customer_id: &'a str,
    meter_api_name: &'a str,
    meter_value: Box<RawValue>,
    meter_time_in_millis: i64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    dimensions: &'a BTreeMap<String, String>,
    unique_id: &'a str,
}

impl AmberfloEncoder {
    /// An encoder for the Amberflo endpoint (e.g. `https://ingest.amberflo.io`).
    pub fn new(endpoint: &reqwest::Url, api_key: Secret) -> Result<Self, EncodeError> {
        Ok(AmberfloEncoder {
            url: join(endpoint, "/ingest")?,
            api_key,
        })
    }
}

impl Encoder for AmberfloEncoder {
    fn encode(&self, items: &[Item]) -> Result<HttpRequest, EncodeError> {
        let records = records(items)?;
        let wire = records
            .iter()
            .map(|r| {
                Ok(AmberfloRecord {
                    customer_id: &r.customer_id,
                    meter_api_name: &r.meter_api_name,
                    meter_value: number(r.meter_value)?,
                    meter_time_in_millis: r.window_start_ms,
                    dimensions: &r.dimensions,
                    unique_id: &r.unique_id,
                })
            })
            .collect::<Result<Vec<_>, EncodeError>>()?;
        let body = serde_json::to_vec(&wire)
            .map_err(|e| EncodeError::new(format!("encoding records: {e}")))?;
        HttpRequest::post(self.url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .secret_header(HeaderName::from_static("x-api-key"), &self.api_key)
            .map(|request| request.body(body).gzip(true))
    }
}

/// OpenMeter's event API: `POST {endpoint}/api/v1/events`, a CloudEvents
/// batch, one event per record (`id` = the uniqueId, `subject` = the
/// customer id, `type` = the meter api name, `time` = the window start,
/// `data` = `{value, dimensions}`), bearer token.
pub struct OpenMeterEncoder {
    url: reqwest::Url,
    bearer: Secret,
    source: String,
}

#[derive(Serialize)]
struct CloudEvent<'a> {
    specversion: &'static str,
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    subject: &'a str,
    time: String,
    datacontenttype: &'static str,
    data: EventData<'a>,
}

#[derive(Serialize)]
struct EventData<'a> {
    value: String,
    dimensions: &'a BTreeMap<String, String>,
}

impl OpenMeterEncoder {
    /// An encoder for an OpenMeter endpoint; `source` is the CloudEvents
    /// `source` of every event (OpenMeter dedupes by source and id).
    pub fn new(
        endpoint: &reqwest::Url,
        api_key: Secret,
        source: &str,
    ) -> Result<Self, EncodeError> {
        Ok(OpenMeterEncoder {
            url: join(endpoint, "/api/v1/events")?,
            bearer: Secret::new(format!("Bearer {}", api_key.expose())),
            source: source.to_owned(),
        })
    }
}

impl Encoder for OpenMeterEncoder {
    fn encode(&self, items: &[Item]) -> Result<HttpRequest, EncodeError> {
        let records = records(items)?;
        let events = records
            .iter()
            .map(|r| {
                let time = jiff::Timestamp::from_millisecond(r.window_start_ms)
                    .map_err(|e| EncodeError::new(format!("window start: {e}")))?;
                Ok(CloudEvent {
                    specversion: "1.0",
                    id: &r.unique_id,
                    source: &self.source,
                    event_type: &r.meter_api_name,
                    subject: &r.customer_id,
                    time: time.to_string(),
                    datacontenttype: "application/json",
                    data: EventData {
                        value: r.meter_value.normalize().to_string(),
                        dimensions: &r.dimensions,
                    },
                })
            })
            .collect::<Result<Vec<_>, EncodeError>>()?;
        let body = serde_json::to_vec(&events)
            .map_err(|e| EncodeError::new(format!("encoding events: {e}")))?;
        HttpRequest::post(self.url.clone())
            .header(
                CONTENT_TYPE,
                HeaderValue::from_static("application/cloudevents-batch+json"),
            )
            .secret_header(AUTHORIZATION, &self.bearer)
            .map(|request| request.body(body).gzip(true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RecordKey;
    use rust_decimal::Decimal;

    fn item(value: Decimal, revision: u32) -> (Item, String) {
        let key = RecordKey {
            meter_api_name: "meter-1".into(),
            window_start: jiff::Timestamp::from_millisecond(1_735_689_600_000).unwrap(),
            customer_id: "cust-1".into(),
            dimensions: BTreeMap::from([("region".into(), "eu".into())]),
        };
        let end = jiff::Timestamp::from_millisecond(1_735_689_660_000).unwrap();
        let record = UsageRecord::new(&key, end, revision, value);
        let id = record.unique_id.clone();
        (
            Item::new(id.clone(), serde_json::to_vec(&record).unwrap()),
            id,
        )
    }

    #[test]
    fn amberflo_wire_format() {
        let url = reqwest::Url::parse("http://127.0.0.1:9/").unwrap();
        let encoder = AmberfloEncoder::new(&url, Secret::new("key-123")).unwrap();
        let (a, id_a) = item(Decimal::new(12_500, 3), 0);
        let (b, _) = item(Decimal::from(-3), 1);
        let request = encoder.encode(&[a, b]).unwrap();
        assert_eq!(request.url().as_str(), "http://127.0.0.1:9/ingest");
        assert_eq!(request.headers()["x-api-key"], "key-123");
        assert!(request.headers()["x-api-key"].is_sensitive());
        assert!(!format!("{request:?}").contains("key-123"));
        let body: serde_json::Value = serde_json::from_slice(request.body_bytes()).unwrap();
        assert_eq!(
            body[0],
            serde_json::json!({"customerId": "cust-1", "meterApiName": "meter-1", "meterValue": 12.5,
                "meterTimeInMillis": 1_735_689_600_000i64, "dimensions": {"region": "eu"}, "uniqueId": id_a})
        );
        assert_eq!(body[1]["meterValue"], serde_json::json!(-3));
    }

    #[test]
    fn openmeter_wire_format() {
        let url = reqwest::Url::parse("http://127.0.0.1:9").unwrap();
        let encoder =
            OpenMeterEncoder::new(&url, Secret::new("om-token"), "tally/billing").unwrap();
        let (a, id) = item(Decimal::from(7), 0);
        let request = encoder.encode(&[a]).unwrap();
        assert_eq!(request.url().as_str(), "http://127.0.0.1:9/api/v1/events");
        assert_eq!(request.headers()[AUTHORIZATION], "Bearer om-token");
        assert!(!format!("{request:?}").contains("om-token"));
        let body: serde_json::Value = serde_json::from_slice(request.body_bytes()).unwrap();
        assert_eq!(body[0]["id"], serde_json::json!(id));
        assert_eq!(body[0]["subject"], "cust-1");
        assert_eq!(body[0]["type"], "meter-1");
        assert_eq!(body[0]["time"], "2025-01-01T00:00:00Z");
        assert_eq!(
            body[0]["data"],
            serde_json::json!({"value": "7", "dimensions": {"region": "eu"}})
        );
    }

    #[test]
    fn garbage_items_are_refused() {
        let url = reqwest::Url::parse("http://127.0.0.1:9").unwrap();
        let encoder = AmberfloEncoder::new(&url, Secret::new("k")).unwrap();
        assert!(encoder.encode(&[Item::new("x", "not json")]).is_err());
    }
}
