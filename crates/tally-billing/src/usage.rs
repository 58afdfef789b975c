//! The providers' own usage totals, read back for reconciliation: what the
//! provider *holds*, not what Tally recorded as acknowledged.
//!
//! - **Amberflo**: `POST {usageEndpoint}/usage` with `X-API-KEY`, body
//!   `{"meterApiName", "aggregation": "SUM", "timeGroupingInterval": "HOUR",
//!   "timeRange": {"startTimeInSeconds", "endTimeInSeconds"}, "groupBy":
//!   ["customerId"]}`; the answer's `clientMeters[]` hold per group
//!   (`group.groupInfo.customerId`) the `values[]` per time bucket
//!   (`secondsSinceEpochUtc`, `value`); `DAY` buckets instead of `HOUR`
//!   when the range is whole UTC days (24 times fewer values to read). As
//!   documented in Amberflo's API
//!   reference, "Query the usage data" (`https://docs.amberflo.io/reference/post_usage`)
//!   and its guide "Get Usage by Customer": the range is cut into buckets of
//!   `timeGroupingInterval` starting at the bucket that *contains* the start,
//!   so a range is asked in whole UTC hours and only buckets starting inside
//!   it are summed.
//! - **OpenMeter**: `GET {usageEndpoint}/api/v1/meters/{meterApiName}/query
//!   ?from&to&groupBy=subject` with the bearer token; `data[].subject` and
//!   `data[].value` (the OpenMeter meter reading Tally's records has the
//!   meter api name as its slug and event type).
//!
//! Records carry their window's start as their time, so the buckets that
//! start in `[from, to)` hold exactly the records of the windows starting
//! there. Errors carry the answer's status and Tally's words, never the
//! remote body; answers are read up to [`MAX_ANSWER_BYTES`].

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use jiff::Timestamp;
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::json;
use tally_delivery::{EgressPolicy, Secret};

use crate::config::Provider;

/// Most bytes of a usage answer read.
pub const MAX_ANSWER_BYTES: usize = 16 << 20;

/// Totals per (customer id, meter api name).
pub type CustomerTotals = BTreeMap<(String, String), Decimal>;

/// Why the provider's usage could not be read. Never holds the key nor
/// the provider's answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("reading the provider's usage of meter {meter:?}: {reason}")]
pub struct UsageQueryError {
    /// The meter api name asked about.
    pub meter: String,
    /// The answer's HTTP status, if one came.
    pub status: Option<u16>,
    /// What went wrong, in Tally's words.
    pub reason: String,
}

/// Reads a provider's usage totals.
#[derive(Clone)]
pub struct UsageReader {
    provider: Provider,
    endpoint: reqwest::Url,
    api_key: Secret,
    client: reqwest::Client,
    policy: EgressPolicy,
    timeout: Duration,
}

impl std::fmt::Debug for UsageReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageReader")
            .field("provider", &self.provider)
            .field("endpoint", &self.endpoint.as_str())
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AmberfloAnswer {
    #[serde(default)]
    client_meters: Vec<ClientMeter>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClientMeter {
    group: Option<Group>,
    #[serde(default)]
    values: Vec<Bucket>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Group {
    #[serde(default)]
    group_info: BTreeMap<String, Option<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Bucket {
    seconds_since_epoch_utc: i64,
    value: serde_json::Number,
}

#[derive(Deserialize)]
struct OpenMeterAnswer {
    data: Vec<OpenMeterRow>,
}

#[derive(Deserialize)]
struct OpenMeterRow {
    subject: Option<String>,
    value: serde_json::Number,
}

fn decimal(number: &serde_json::Number) -> Option<Decimal> {
    let text = number.to_string();
    Decimal::from_str(&text)
        .or_else(|_| Decimal::from_scientific(&text))
        .ok()
}

impl UsageReader {
    /// A reader of `provider`'s usage at `endpoint`, through `client` (an
    /// [`tally_delivery::EgressGuard`]'s) and `policy` (for IP literals).
    pub fn new(
        provider: Provider,
        endpoint: reqwest::Url,
        api_key: Secret,
        client: reqwest::Client,
        policy: EgressPolicy,
        timeout: Duration,
    ) -> Self {
        UsageReader {
            provider,
            endpoint,
            api_key,
            client,
            policy,
            timeout,
        }
    }

    /// The provider's totals per customer of each meter, over the buckets
    /// starting in `[from, to)`; both must be whole UTC hours.
    pub async fn totals(
        &self,
        meters: &[String],
        from: Timestamp,
        to: Timestamp,
    ) -> Result<CustomerTotals, UsageQueryError> {
        let mut out = CustomerTotals::new();
        for meter in meters {
            let rows = match self.provider {
                Provider::Amberflo => self.amberflo(meter, from, to).await?,
                Provider::Openmeter => self.openmeter(meter, from, to).await?,
            };
            for (customer, value) in rows {
                *out.entry((customer, meter.clone())).or_default() += value;
            }
        }
        Ok(out)
    }

    fn url(&self, meter: &str, path: &[&str]) -> Result<reqwest::Url, UsageQueryError> {
        let mut url = self.endpoint.clone();
        url.path_segments_mut()
            .map_err(|()| error(meter, None, "the usage endpoint cannot take a path"))?
            .pop_if_empty()
            .extend(path);
        self.policy
            .check_url(&url)
            .map_err(|refusal| error(meter, None, &refusal.to_string()))?;
        Ok(url)
    }

    async fn amberflo(
        &self,
        meter: &str,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<(String, Decimal)>, UsageQueryError> {
        let (from_s, to_s) = (from.as_second(), to.as_second());
        let interval = if from_s % 86_400 == 0 && to_s % 86_400 == 0 {
            "DAY"
        } else {
            "HOUR"
        };
        let body = json!({
            "meterApiName": meter,
            "aggregation": "SUM",
            "timeGroupingInterval": interval,
            "timeRange": {"startTimeInSeconds": from_s, "endTimeInSeconds": to_s},
            "groupBy": ["customerId"],
        });
        let request = self
            .client
            .post(self.url(meter, &["usage"])?)
            .header("x-api-key", self.key(meter, self.api_key.expose())?)
            .header("accept", "application/json")
            .json(&body);
        let answer: AmberfloAnswer = self.send(meter, request).await?;
        let mut rows = Vec::new();
        for client_meter in answer.client_meters {
            let customer = client_meter
                .group
                .and_then(|g| g.group_info.get("customerId").cloned().flatten())
                .ok_or_else(|| error(meter, Some(200), "a usage group has no customerId"))?;
            for bucket in client_meter.values {
                if !(from_s..to_s).contains(&bucket.seconds_since_epoch_utc) {
                    continue;
                }
                let value = decimal(&bucket.value)
                    .ok_or_else(|| error(meter, Some(200), "a usage value is not a number"))?;
                rows.push((customer.clone(), value));
            }
        }
        Ok(rows)
    }

    async fn openmeter(
        &self,
        meter: &str,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<(String, Decimal)>, UsageQueryError> {
        let mut url = self.url(meter, &["api", "v1", "meters", meter, "query"])?;
        url.query_pairs_mut()
            .append_pair("from", &from.to_string())
            .append_pair("to", &to.to_string())
            .append_pair("groupBy", "subject");
        let bearer = format!("Bearer {}", self.api_key.expose());
        let request = self
            .client
            .get(url)
            .header("authorization", self.key(meter, &bearer)?)
            .header("accept", "application/json");
        let answer: OpenMeterAnswer = self.send(meter, request).await?;
        answer
            .data
            .into_iter()
            .map(|row| {
                let subject = row
                    .subject
                    .ok_or_else(|| error(meter, Some(200), "a usage row has no subject"))?;
                let value = decimal(&row.value)
                    .ok_or_else(|| error(meter, Some(200), "a usage value is not a number"))?;
                Ok((subject, value))
            })
            .collect()
    }

    fn key(
        &self,
        meter: &str,
        value: &str,
    ) -> Result<reqwest::header::HeaderValue, UsageQueryError> {
        let mut value = reqwest::header::HeaderValue::from_str(value)
            .map_err(|_| error(meter, None, "the API key is not a valid header value"))?;
        value.set_sensitive(true);
        Ok(value)
    }

    async fn send<T: for<'de> Deserialize<'de>>(
        &self,
        meter: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<T, UsageQueryError> {
        let response = request.timeout(self.timeout).send().await.map_err(|e| {
            let reason = if e.is_timeout() {
                "no answer in time"
            } else {
                "the provider could not be reached"
            };
            error(meter, None, reason)
        })?;
        let status = response.status().as_u16();
        if !response.status().is_success() {
            let reason = match status {
                401 | 403 => "the provider refused the API key",
                404 => "the provider does not know this meter or endpoint",
                429 => "the provider is throttling requests",
                500..=599 => "the provider failed",
                _ => "the provider refused the query",
            };
            return Err(error(meter, Some(status), reason));
        }
        let body = tally_delivery::read_capped(response, MAX_ANSWER_BYTES + 1)
            .await
            .map_err(|_| error(meter, Some(status), "the answer broke off"))?;
        if body.len() > MAX_ANSWER_BYTES {
            return Err(error(meter, Some(status), "the answer is too large"));
        }
        serde_json::from_slice(&body).map_err(|_| {
            error(
                meter,
                Some(status),
                "the answer is not the documented usage answer",
            )
        })
    }
}

fn error(meter: &str, status: Option<u16>, reason: &str) -> UsageQueryError {
    UsageQueryError {
        meter: meter.to_owned(),
        status,
        reason: match status {
            Some(status) => format!("{reason} (HTTP {status})"),
            None => reason.to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amberflo_answer_as_documented_parses() {
        // The shape of the example answer in Amberflo's "Get Usage by Customer".
        let answer: AmberfloAnswer = serde_json::from_str(
            r#"{"metadata": {"meterApiName": "ApiCalls", "aggregation": "SUM",
                 "timeGroupingInterval": "DAY", "groupBy": ["customerId"]},
                "secondsSinceEpochIntervals": [1619222400, 1619308800],
                "clientMeters": [{"group": {"groupInfo": {"customerId": "xxx"}},
                  "groupValue": 4040.0,
                  "values": [{"percentageFromPrevious": 0.0, "value": 0.0, "secondsSinceEpochUtc": 1619222400},
                             {"percentageFromPrevious": 100.0, "value": 4040.5, "secondsSinceEpochUtc": 1619308800}]}]}"#,
        )
        .unwrap();
        let meter = &answer.client_meters[0];
        assert_eq!(
            meter.group.as_ref().unwrap().group_info["customerId"].as_deref(),
            Some("xxx")
        );
        assert_eq!(
            decimal(&meter.values[1].value),
            Some(Decimal::new(40405, 1))
        );
    }
}
