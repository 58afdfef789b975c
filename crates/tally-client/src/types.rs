//! Request parameters and answers of the Tally API that no other crate defines.

use std::collections::BTreeMap;

use jiff::Timestamp;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tally_ledger::ApplyAction;
use tally_meter::WindowSize;

/// Parameters of `GET /api/v1/meters/{slug}/query`. Every field is optional;
/// the server applies its defaults to the ones left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeterQueryParams {
    /// Start of the range, inclusive.
    pub from: Option<Timestamp>,
    /// End of the range, exclusive.
    pub to: Option<Timestamp>,
    /// Window size; without it the whole range is one row per group.
    pub window_size: Option<WindowSize>,
    /// IANA time zone the windows are aligned to (e.g. `Europe/Berlin`).
    pub window_time_zone: Option<String>,
    /// Only these subjects (all when empty).
    pub subjects: Vec<String>,
    /// Dimensions to group by; `subject` groups by subject.
    pub group_by: Vec<String>,
    /// Only rows whose dimension equals the value.
    pub filter_group_by: BTreeMap<String, String>,
    /// Most rows in one page.
    pub limit: Option<usize>,
    /// Where to continue, from a previous answer's `nextCursor`.
    pub cursor: Option<String>,
}

impl MeterQueryParams {
    /// The query string pairs, in the API's spelling.
    pub fn to_pairs(&self) -> Vec<(String, String)> {
        let mut pairs = Vec::new();
        let mut push = |key: &str, value: String| pairs.push((key.to_owned(), value));
        if let Some(from) = self.from {
            push("from", from.to_string());
        }
        if let Some(to) = self.to {
            push("to", to.to_string());
        }
        if let Some(size) = self.window_size {
            push("windowSize", size.to_string());
        }
        if let Some(tz) = &self.window_time_zone {
            push("windowTimeZone", tz.clone());
        }
        for subject in &self.subjects {
            push("subject", subject.clone());
        }
        for key in &self.group_by {
            push("groupBy", key.clone());
        }
        for (key, value) in &self.filter_group_by {
            push(&format!("filterGroupBy[{key}]"), value.clone());
        }
        if let Some(limit) = self.limit {
            push("limit", limit.to_string());
        }
        if let Some(cursor) = &self.cursor {
            push("cursor", cursor.clone());
        }
        pairs
    }
}

/// The answer of a meter query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeterQueryResponse {
    /// Start of the queried range, as the server understood it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Timestamp>,
    /// End of the queried range (exclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Timestamp>,
    /// Window size, when windows were asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_size: Option<WindowSize>,
    /// Time zone the windows are aligned to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_time_zone: Option<String>,
    /// The rows of this page.
    pub data: Vec<MeterQueryRow>,
    /// Present when more rows follow; pass it back as `cursor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// One row of a meter query: the value of one window (and group).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeterQueryRow {
    /// The aggregated value, read exactly from the JSON number's text.
    /// Serialized back as a JSON number: integers exactly, fractions as the
    /// nearest double (which is what the server sent).
    #[serde(with = "exact_number")]
    pub value: Decimal,
    /// Start of the window, inclusive.
    pub window_start: Timestamp,
    /// End of the window, exclusive.
    pub window_end: Timestamp,
    /// The subject, when rows are per subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Group-by dimension → value; `null` when events had no value for it.
    #[serde(default)]
    pub group_by: BTreeMap<String, Option<String>>,
}

/// Decimals as JSON numbers, read from the number's own text so that no
/// digit is lost on the way in.
mod exact_number {
    use std::str::FromStr;

    use rust_decimal::Decimal;
    use rust_decimal::prelude::ToPrimitive;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};
    use serde_json::value::RawValue;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        let text = raw.get().trim();
        let number = if text.starts_with('"') {
            serde_json::from_str::<String>(text).map_err(D::Error::custom)?
        } else {
            text.to_owned()
        };
        let number = number.trim();
        Decimal::from_str(number)
            .or_else(|_| Decimal::from_scientific(number))
            .map(|d| d.normalize())
            .map_err(|_| {
                D::Error::custom(format!(
                    "value {text} is not a number Tally can represent exactly"
                ))
            })
    }

    pub fn serialize<S: Serializer>(value: &Decimal, s: S) -> Result<S::Ok, S::Error> {
        let value = value.normalize();
        if value.scale() == 0 {
            if let Some(i) = value.to_i64() {
                return s.serialize_i64(i);
            }
            if let Some(u) = value.to_u64() {
                return s.serialize_u64(u);
            }
        }
        // The nearest double, correctly rounded from the decimal text.
        let float: f64 = value
            .to_string()
            .parse()
            .map_err(|e| serde::ser::Error::custom(format!("value {value}: {e}")))?;
        s.serialize_f64(float)
    }
}

/// Parameters of `GET /api/v1/events`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventListParams {
    /// Event time, inclusive.
    pub from: Option<Timestamp>,
    /// Event time, exclusive.
    pub to: Option<Timestamp>,
    /// CloudEvents `type`.
    pub event_type: Option<String>,
    /// CloudEvents `subject`.
    pub subject: Option<String>,
    /// CloudEvents `source`.
    pub source: Option<String>,
    /// CloudEvents `id`.
    pub id: Option<String>,
    /// Most events in one page.
    pub limit: Option<usize>,
    /// Where to continue, from a previous page's `nextCursor`.
    pub cursor: Option<String>,
}

impl EventListParams {
    /// The query string pairs, in the API's spelling.
    pub fn to_pairs(&self) -> Vec<(String, String)> {
        let mut pairs = Vec::new();
        let timestamps = [("from", self.from), ("to", self.to)];
        for (key, value) in timestamps {
            if let Some(value) = value {
                pairs.push((key.to_owned(), value.to_string()));
            }
        }
        let texts = [
            ("type", &self.event_type),
            ("subject", &self.subject),
            ("source", &self.source),
            ("id", &self.id),
        ];
        for (key, value) in texts {
            if let Some(value) = value {
                pairs.push((key.to_owned(), value.clone()));
            }
        }
        if let Some(limit) = self.limit {
            pairs.push(("limit".to_owned(), limit.to_string()));
        }
        if let Some(cursor) = &self.cursor {
            pairs.push(("cursor".to_owned(), cursor.clone()));
        }
        pairs
    }
}

/// Parameters of `GET /api/v1/quarantine`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuarantineListParams {
    /// Only events quarantined for this meter.
    pub meter: Option<String>,
    /// Most events in one page.
    pub limit: Option<usize>,
    /// Where to continue, from a previous page's `nextCursor`.
    pub cursor: Option<String>,
}

impl QuarantineListParams {
    /// The query string pairs, in the API's spelling.
    pub fn to_pairs(&self) -> Vec<(String, String)> {
        let mut pairs = Vec::new();
        if let Some(meter) = &self.meter {
            pairs.push(("meter".to_owned(), meter.clone()));
        }
        if let Some(limit) = self.limit {
            pairs.push(("limit".to_owned(), limit.to_string()));
        }
        if let Some(cursor) = &self.cursor {
            pairs.push(("cursor".to_owned(), cursor.clone()));
        }
        pairs
    }
}

/// What `POST /apis/apply` did to one resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyResult {
    /// The resource kind, e.g. `MeterDefinition`.
    pub kind: String,
    /// The namespace of a namespaced resource.
    #[serde(default)]
    pub namespace: Option<String>,
    /// The resource name.
    pub name: String,
    /// Whether it was created, changed or left as it was.
    pub action: ApplyAction,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ApplyResponse {
    pub results: Vec<ApplyResult>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ManifestList {
    pub items: Vec<tally_model::Manifest>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn meter_query_params_use_the_api_spelling() {
        let params = MeterQueryParams {
            from: Some("2026-01-01T00:00:00Z".parse().unwrap()),
            to: Some("2026-02-01T00:00:00+01:00".parse().unwrap()),
            window_size: Some(WindowSize::Day),
            window_time_zone: Some("Europe/Berlin".into()),
            subjects: vec!["a".into(), "b".into()],
            group_by: vec!["method".into(), "subject".into()],
            filter_group_by: [("method".to_owned(), "GET".to_owned())].into(),
            limit: Some(10),
            cursor: Some("c1".into()),
        };
        let pairs: Vec<String> = params
            .to_pairs()
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        assert_eq!(
            pairs,
            [
                "from=2026-01-01T00:00:00Z",
                "to=2026-01-31T23:00:00Z",
                "windowSize=DAY",
                "windowTimeZone=Europe/Berlin",
                "subject=a",
                "subject=b",
                "groupBy=method",
                "groupBy=subject",
                "filterGroupBy[method]=GET",
                "limit=10",
                "cursor=c1",
            ]
        );
        assert!(MeterQueryParams::default().to_pairs().is_empty());
    }

    #[test]
    fn query_values_are_exact() {
        let text = r#"{"data":[
            {"value": 9007199254740993, "windowStart": "2026-01-01T00:00:00Z", "windowEnd": "2026-01-02T00:00:00Z"},
            {"value": 123456789012345678901234567, "windowStart": "2026-01-01T00:00:00Z", "windowEnd": "2026-01-02T00:00:00Z", "subject": "s"},
            {"value": 0.1, "windowStart": "2026-01-01T00:00:00Z", "windowEnd": "2026-01-02T00:00:00Z", "groupBy": {"m": "GET", "r": null}},
            {"value": "2.50", "windowStart": "2026-01-01T00:00:00Z", "windowEnd": "2026-01-02T00:00:00Z"},
            {"value": 1e3, "windowStart": "2026-01-01T00:00:00Z", "windowEnd": "2026-01-02T00:00:00Z"}
        ], "windowSize": "DAY", "nextCursor": "n"}"#;
        let response: MeterQueryResponse = serde_json::from_str(text).unwrap();
        let values: Vec<String> = response.data.iter().map(|r| r.value.to_string()).collect();
        assert_eq!(
            values,
            [
                "9007199254740993",
                "123456789012345678901234567",
                "0.1",
                "2.5",
                "1000"
            ]
        );
        assert_eq!(response.data[2].group_by["r"], None);
        assert_eq!(response.window_size, Some(WindowSize::Day));
        let back = serde_json::to_value(&response).unwrap();
        assert_eq!(back["data"][0]["value"], json!(9007199254740993_u64));
        assert_eq!(back["data"][2]["value"], json!(0.1));
        // Deserializing from a `Value` works too (through its text).
        let again: MeterQueryResponse = serde_json::from_value(back).unwrap();
        assert_eq!(again.data[0].value, response.data[0].value);
        assert!(serde_json::from_str::<MeterQueryRow>(
            r#"{"value": "ten", "windowStart": "2026-01-01T00:00:00Z", "windowEnd": "2026-01-02T00:00:00Z"}"#
        )
        .is_err());
    }
}

/// The part of `/openapi.json` the client reads.
#[derive(Debug, Deserialize)]
pub(crate) struct ApiDocument {
    pub info: ApiInfo,
}

/// `info` of an OpenAPI document.
#[derive(Debug, Deserialize)]
pub(crate) struct ApiInfo {
    pub version: String,
}
