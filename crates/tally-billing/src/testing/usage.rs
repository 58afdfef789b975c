//! The test servers' usage queries, answered from the stored records.
//!
//! **Amberflo** `POST /usage`, as its API reference documents it ("Query the
//! usage data", `https://docs.amberflo.io/reference/post_usage`, and the
//! guide "Get Usage by Customer"): `X-API-KEY` (401 otherwise); a JSON body
//! with `meterApiName` (required), `aggregation` (`SUM`, `COUNT`, `MIN`,
//! `MAX`; default `SUM`), `timeGroupingInterval` (required: `HOUR`, `DAY`,
//! `WEEK`, `MONTH`, any case), `timeRange.startTimeInSeconds` (required) and
//! `timeRange.endTimeInSeconds` (default: now), `groupBy` (`customerId` or
//! dimension names), `filter` (name → allowed values), `take` (`limit`,
//! `isAscending`, default descending by the group's value). The answer:
//! `metadata` (the query), `secondsSinceEpochIntervals` (the buckets, from
//! the one containing the start, gaps filled), and `clientMeters[]`:
//! `group.groupInfo` (absent without `groupBy`), `groupValue` (the
//! aggregate over the range) and `values[]` per bucket
//! (`secondsSinceEpochUtc`, `value`, `percentageFromPrevious`). Values are
//! written as exact JSON numbers. Weeks start on Monday 00:00 UTC (the
//! documentation does not say; Tally asks in hours).
//!
//! **OpenMeter** `GET /api/v1/meters/{slug}/query?from&to&groupBy`: bearer
//! token; records of event type `slug` with `from <= time < to`, one row per
//! group (`groupBy=subject` groups by customer, other names by dimension):
//! `{"data": [{"value", "windowStart", "windowEnd", "subject", "groupBy"}]}`.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::{ServerState, StoredRecord, refuse};

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageQuery {
    meter_api_name: String,
    #[serde(default)]
    aggregation: Option<String>,
    time_grouping_interval: String,
    time_range: TimeRange,
    #[serde(default)]
    group_by: Vec<String>,
    #[serde(default)]
    filter: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    take: Option<Take>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TimeRange {
    start_time_in_seconds: i64,
    end_time_in_seconds: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Take {
    limit: usize,
    #[serde(default)]
    is_ascending: bool,
}

/// The start of the bucket of `interval` holding `seconds`.
fn bucket_start(interval: &str, seconds: i64) -> Option<i64> {
    let t = Timestamp::from_second(seconds).ok()?;
    let date = t.to_zoned(TimeZone::UTC).date();
    let day_start = |d: jiff::civil::Date| {
        d.to_zoned(TimeZone::UTC)
            .ok()
            .map(|z| z.timestamp().as_second())
    };
    match interval {
        "HOUR" => Some(seconds.div_euclid(3600) * 3600),
        "DAY" => Some(seconds.div_euclid(86_400) * 86_400),
        "WEEK" => {
            let back = i64::from(date.weekday().to_monday_zero_offset());
            day_start(date.checked_sub(back.days()).ok()?)
        }
        "MONTH" => day_start(date.first_of_month()),
        _ => None,
    }
}

/// The start of the bucket after the one starting at `start`.
fn next_bucket(interval: &str, start: i64) -> Option<i64> {
    match interval {
        "HOUR" => Some(start + 3600),
        "DAY" => Some(start + 86_400),
        "WEEK" => Some(start + 7 * 86_400),
        "MONTH" => {
            let date = Timestamp::from_second(start)
                .ok()?
                .to_zoned(TimeZone::UTC)
                .date();
            let next = date.checked_add(1.month()).ok()?;
            Some(next.to_zoned(TimeZone::UTC).ok()?.timestamp().as_second())
        }
        _ => None,
    }
}

fn aggregate(aggregation: &str, values: &[Decimal]) -> Decimal {
    match aggregation {
        "COUNT" => Decimal::from(values.len()),
        "MIN" => values.iter().copied().min().unwrap_or_default(),
        "MAX" => values.iter().copied().max().unwrap_or_default(),
        _ => values.iter().copied().sum(),
    }
}

fn number(value: Decimal) -> Box<RawValue> {
    RawValue::from_string(value.normalize().to_string()).unwrap()
}

fn group_of(record: &StoredRecord, group_by: &[String]) -> BTreeMap<String, String> {
    group_by
        .iter()
        .map(|name| {
            let value = if name == "customerId" {
                record.customer.clone()
            } else {
                record.dimensions.get(name).cloned().unwrap_or_default()
            };
            (name.clone(), value)
        })
        .collect()
}

fn matches(record: &StoredRecord, filter: &BTreeMap<String, Vec<String>>) -> bool {
    filter.iter().all(|(name, allowed)| {
        let value = if name == "customerId" {
            Some(&record.customer)
        } else {
            record.dimensions.get(name)
        };
        value.is_some_and(|v| allowed.contains(v))
    })
}

/// Checks a query and returns its buckets, aggregation and end.
fn plan(query: &UsageQuery) -> Result<(Vec<i64>, String), String> {
    let interval = query.time_grouping_interval.to_ascii_uppercase();
    let aggregation = query
        .aggregation
        .as_deref()
        .unwrap_or("SUM")
        .to_ascii_uppercase();
    if !matches!(aggregation.as_str(), "SUM" | "COUNT" | "MIN" | "MAX") {
        return Err(format!("unknown aggregation {aggregation}"));
    }
    if query.meter_api_name.is_empty() {
        return Err("meterApiName is required".into());
    }
    let end = query
        .time_range
        .end_time_in_seconds
        .unwrap_or_else(|| Timestamp::now().as_second());
    let mut bucket = bucket_start(&interval, query.time_range.start_time_in_seconds)
        .ok_or_else(|| format!("invalid timeGroupingInterval {interval}"))?;
    let mut buckets = Vec::new();
    while bucket < end {
        buckets.push(bucket);
        if buckets.len() > 100_000 {
            return Err("too many buckets".into());
        }
        bucket = next_bucket(&interval, bucket).ok_or("bad bucket")?;
    }
    Ok((buckets, aggregation))
}

/// The Amberflo answer to `query` over `records`.
fn amberflo_answer(query: &UsageQuery, records: &[StoredRecord]) -> Result<Value, String> {
    let (buckets, aggregation) = plan(query)?;
    let end = buckets
        .last()
        .and_then(|b| next_bucket(&query.time_grouping_interval.to_ascii_uppercase(), *b))
        .unwrap_or(0);
    let first = buckets.first().copied().unwrap_or(0);
    // group → bucket index → values.
    let mut groups: BTreeMap<BTreeMap<String, String>, Vec<Vec<Decimal>>> = BTreeMap::new();
    for record in records {
        let seconds = record.time_ms.div_euclid(1000);
        if record.meter != query.meter_api_name
            || !(first..end).contains(&seconds)
            || !matches(record, &query.filter)
        {
            continue;
        }
        let index = buckets.partition_point(|b| *b <= seconds) - 1;
        groups
            .entry(group_of(record, &query.group_by))
            .or_insert_with(|| vec![Vec::new(); buckets.len()])[index]
            .push(record.value);
    }
    let mut meters: Vec<(Decimal, Value)> = groups
        .into_iter()
        .map(|(group, per_bucket)| {
            let all: Vec<Decimal> = per_bucket.iter().flatten().copied().collect();
            let group_value = aggregate(&aggregation, &all);
            let mut previous = Decimal::ZERO;
            let values: Vec<Value> = buckets
                .iter()
                .zip(&per_bucket)
                .map(|(start, values)| {
                    let value = aggregate(&aggregation, values);
                    let change = if previous.is_zero() {
                        if value.is_zero() { 0.0 } else { 100.0 }
                    } else {
                        ((value - previous) / previous * Decimal::from(100))
                            .to_string()
                            .parse()
                            .unwrap_or(0.0)
                    };
                    previous = value;
                    json!({"percentageFromPrevious": change, "value": number(value),
                           "secondsSinceEpochUtc": start})
                })
                .collect();
            let group = (!query.group_by.is_empty()).then(|| json!({"groupInfo": group}));
            let meter =
                json!({"group": group, "groupValue": number(group_value), "values": values});
            (group_value, meter)
        })
        .collect();
    if let Some(take) = &query.take {
        meters.sort_by(|a, b| {
            if take.is_ascending {
                a.0.cmp(&b.0)
            } else {
                b.0.cmp(&a.0)
            }
        });
        meters.truncate(take.limit);
    }
    Ok(json!({
        "metadata": {
            "meterApiName": query.meter_api_name,
            "aggregation": aggregation,
            "timeGroupingInterval": query.time_grouping_interval.to_ascii_uppercase(),
            "timeRange": {"startTimeInSeconds": query.time_range.start_time_in_seconds,
                          "endTimeInSeconds": query.time_range.end_time_in_seconds},
            "groupBy": query.group_by,
            "filter": query.filter,
        },
        "secondsSinceEpochIntervals": buckets,
        "clientMeters": meters.into_iter().map(|(_, m)| m).collect::<Vec<_>>(),
    }))
}

/// `POST /usage`.
pub async fn amberflo_usage(
    State(shared): State<Arc<Mutex<ServerState>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut state = shared.lock().unwrap();
    state.requests += 1;
    if state.down {
        return (StatusCode::SERVICE_UNAVAILABLE, "down for maintenance").into_response();
    }
    let key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    if key != Some(state.api_key.as_str()) {
        return refuse(
            &mut state,
            StatusCode::UNAUTHORIZED,
            "missing or wrong credentials".into(),
        );
    }
    let answer = serde_json::from_slice::<UsageQuery>(&body)
        .map_err(|e| format!("bad usage query: {e}"))
        .and_then(|query| amberflo_answer(&query, &state.records));
    match answer {
        Ok(answer) => Json(answer).into_response(),
        Err(message) => refuse(&mut state, StatusCode::BAD_REQUEST, message),
    }
}

/// `GET /api/v1/meters/{slug}/query`.
pub async fn openmeter_query(
    State(shared): State<Arc<Mutex<ServerState>>>,
    Path(slug): Path<String>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let mut state = shared.lock().unwrap();
    state.requests += 1;
    if state.down {
        return (StatusCode::SERVICE_UNAVAILABLE, "down for maintenance").into_response();
    }
    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok());
    if bearer != Some(format!("Bearer {}", state.api_key).as_str()) {
        return refuse(&mut state, StatusCode::UNAUTHORIZED, "unauthorized".into());
    }
    let query = format!("http://query/?{}", raw.unwrap_or_default());
    let pairs: Vec<(String, String)> = reqwest::Url::parse(&query)
        .map(|url| url.query_pairs().into_owned().collect())
        .unwrap_or_default();
    let time = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| Timestamp::from_str(v).ok())
    };
    let (Some(from), Some(to)) = (time("from"), time("to")) else {
        return refuse(&mut state, StatusCode::BAD_REQUEST, "from and to".into());
    };
    let group_by: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k == "groupBy")
        .map(|(_, v)| v.clone())
        .collect();
    let mut rows: BTreeMap<(Option<String>, BTreeMap<String, String>), Decimal> = BTreeMap::new();
    let range = from.as_millisecond()..to.as_millisecond();
    for record in state.records.iter().filter(|r| r.meter == slug) {
        if !range.contains(&record.time_ms) {
            continue;
        }
        let subject = group_by
            .iter()
            .any(|g| g == "subject")
            .then(|| record.customer.clone());
        let dims = group_by
            .iter()
            .filter(|g| *g != "subject")
            .map(|g| {
                (
                    g.clone(),
                    record.dimensions.get(g).cloned().unwrap_or_default(),
                )
            })
            .collect();
        *rows.entry((subject, dims)).or_default() += record.value;
    }
    let data: Vec<Value> = rows
        .into_iter()
        .map(|((subject, dims), value)| {
            json!({"value": number(value), "windowStart": from.to_string(),
                   "windowEnd": to.to_string(), "subject": subject, "groupBy": dims})
        })
        .collect();
    Json(json!({"from": from.to_string(), "to": to.to_string(), "data": data})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(customer: &str, seconds: i64, value: i64) -> StoredRecord {
        StoredRecord {
            customer: customer.into(),
            meter: "ApiCalls".into(),
            time_ms: seconds * 1000,
            dimensions: BTreeMap::from([("region".into(), "eu".into())]),
            value: Decimal::from(value),
        }
    }

    #[test]
    fn the_documented_example_query_is_answered_in_the_documented_shape() {
        // Amberflo's example: DAY buckets from the day holding 1619293642.
        let query: UsageQuery = serde_json::from_value(json!({
            "meterApiName": "ApiCalls", "aggregation": "SUM", "timeGroupingInterval": "Day",
            "timeRange": {"startTimeInSeconds": 1619293642, "endTimeInSeconds": 1619467650},
            "filter": {"customerId": ["xxx", "yyy"]}, "groupBy": ["customerId"],
            "take": {"limit": 10, "isAscending": false}
        }))
        .unwrap();
        let records = [
            record("xxx", 1_619_308_800, 4040),
            record("xxx", 1_619_395_300, 19605),
            record("yyy", 1_619_308_900, 2507),
            record("zzz", 1_619_308_900, 1),
        ];
        let answer = amberflo_answer(&query, &records).unwrap();
        assert_eq!(
            answer["secondsSinceEpochIntervals"],
            json!([1619222400, 1619308800, 1619395200])
        );
        let first = &answer["clientMeters"][0];
        assert_eq!(first["group"]["groupInfo"]["customerId"], "xxx");
        assert_eq!(first["groupValue"], json!(23645));
        assert_eq!(first["values"][1]["value"], json!(4040));
        assert_eq!(first["values"][1]["percentageFromPrevious"], json!(100.0));
        assert_eq!(answer["clientMeters"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn weeks_and_months_start_where_documented_or_assumed() {
        // 2021-04-28 (a Wednesday) 12:00 UTC.
        let t = 1_619_611_200;
        assert_eq!(bucket_start("WEEK", t), Some(1_619_395_200)); // Monday 04-26
        assert_eq!(bucket_start("MONTH", t), Some(1_617_235_200)); // 04-01
        assert_eq!(next_bucket("MONTH", 1_617_235_200), Some(1_619_827_200));
    }
}
