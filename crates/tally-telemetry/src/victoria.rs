//! Pull source: reads series from VictoriaMetrics' `/api/v1/export` (JSON
//! lines) in moving windows. A [`Checkpoint`] holds the first millisecond not
//! yet read; each pull reads `[checkpoint, end]` (both inclusive, as
//! VictoriaMetrics filters) and moves the checkpoint to `end + 1ms`, so a
//! restart from a saved checkpoint neither skips nor repeats samples. Windows
//! end `lag` before now, so samples that arrive up to `lag` late are still read.

use std::collections::BTreeMap;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1::{
    Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, metric::Data, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use serde::{Deserialize, Serialize};
use url::Url;

use crate::selector::{IDENTITY_LABELS, METRIC_NAME_LABEL};

/// Why a pull failed. Never holds credentials.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("VictoriaMetrics URL {url:?}: {message}")]
    Url { url: String, message: String },
    #[error("HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("export request to {url}: {source}")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("export request to {url} answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("export line {line}: {source}")]
    Line {
        line: usize,
        #[source]
        source: serde_json::Error,
    },
}

/// One series with its samples (milliseconds since the epoch, value).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ExportedSeries {
    #[serde(rename = "metric")]
    pub labels: BTreeMap<String, String>,
    pub values: Vec<Option<f64>>,
    pub timestamps: Vec<i64>,
}

/// The first millisecond a pull has not read yet. Persist it after the
/// samples of a pull are durably handed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoint {
    pub next_start_ms: i64,
}

/// A VictoriaMetrics single-node or `vmselect` base URL.
#[derive(Debug, Clone)]
pub struct VictoriaMetricsSource {
    client: reqwest::Client,
    export_url: Url,
    /// `export_url` without user and password, for messages.
    shown_url: String,
}

/// `url` without its user and password.
fn without_credentials(url: &Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.to_string()
}

impl VictoriaMetricsSource {
    /// `base_url` like `http://127.0.0.1:8428` (or a vmselect tenant prefix).
    pub fn new(base_url: &str) -> Result<VictoriaMetricsSource, PullError> {
        let url_error = |message: String| PullError::Url {
            // It may hold a password.
            url: if base_url.contains('@') {
                "[redacted]".to_owned()
            } else {
                base_url.to_owned()
            },
            message,
        };
        let base = Url::parse(base_url).map_err(|e| url_error(e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(url_error("scheme must be http or https".into()));
        }
        let path = format!("{}/api/v1/export", base.path().trim_end_matches('/'));
        let mut export_url = base;
        export_url.set_path(&path);
        let client = tally_delivery::client_builder()
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(PullError::Client)?;
        let shown_url = without_credentials(&export_url);
        Ok(VictoriaMetricsSource {
            client,
            export_url,
            shown_url,
        })
    }

    /// Every series matching any of `matchers` with samples in
    /// `[start_ms, end_ms]` (both inclusive).
    pub async fn export(
        &self,
        matchers: &[String],
        start_ms: i64,
        end_ms: i64,
    ) -> Result<Vec<ExportedSeries>, PullError> {
        let mut query: Vec<(&str, String)> =
            matchers.iter().map(|m| ("match[]", m.clone())).collect();
        query.push(("start", seconds(start_ms)));
        query.push(("end", seconds(end_ms)));
        let url = self.shown_url.clone();
        let response = self
            .client
            .get(self.export_url.clone())
            .query(&query)
            .send()
            .await
            .map_err(|source| PullError::Request {
                url: url.clone(),
                source: source.without_url(),
            })?;
        let status = response.status().as_u16();
        let body = response
            .bytes()
            .await
            .map_err(|source| PullError::Request {
                url: url.clone(),
                source: source.without_url(),
            })?;
        if status != 200 {
            let text = String::from_utf8_lossy(&body);
            return Err(PullError::Status {
                url,
                status,
                body: text.chars().take(512).collect(),
            });
        }
        parse_export_lines(&body)
    }

    /// Reads the next window: from the checkpoint to at most `window` later,
    /// ending no later than `now_ms - lag`. Returns `None` (checkpoint
    /// unchanged) when no complete millisecond is ready yet.
    pub async fn pull(
        &self,
        matchers: &[String],
        checkpoint: &mut Checkpoint,
        now_ms: i64,
        window: Duration,
        lag: Duration,
    ) -> Result<Option<Vec<ExportedSeries>>, PullError> {
        let Some(end_ms) = window_end(checkpoint.next_start_ms, now_ms, window, lag) else {
            return Ok(None);
        };
        let series = self
            .export(matchers, checkpoint.next_start_ms, end_ms)
            .await?;
        tracing::debug!(
            start_ms = checkpoint.next_start_ms,
            end_ms,
            series = series.len(),
            "pulled from VictoriaMetrics"
        );
        checkpoint.next_start_ms = end_ms + 1;
        Ok(Some(series))
    }
}

/// The inclusive end of the next window, or `None` if nothing is ready.
pub fn window_end(next_start_ms: i64, now_ms: i64, window: Duration, lag: Duration) -> Option<i64> {
    let millis = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let ready_until = now_ms.saturating_sub(millis(lag));
    let end = next_start_ms
        .saturating_add(millis(window).max(1))
        .saturating_sub(1)
        .min(ready_until);
    (end >= next_start_ms).then_some(end)
}

fn seconds(ms: i64) -> String {
    format!("{}.{:03}", ms.div_euclid(1000), ms.rem_euclid(1000))
}

/// Parses `/api/v1/export` JSON lines.
pub fn parse_export_lines(body: &[u8]) -> Result<Vec<ExportedSeries>, PullError> {
    body.split(|b| *b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
        .map(|(i, line)| {
            serde_json::from_slice(line).map_err(|source| PullError::Line {
                line: i + 1,
                source,
            })
        })
        .collect()
}

/// Turns exported series into an OTLP request the router understands: the
/// identity labels become resource attributes, `__name__` the metric name,
/// every other label a data point attribute; samples become gauge points
/// (the export API does not say whether a series is a counter).
pub fn series_to_request(series: &[ExportedSeries]) -> ExportMetricsServiceRequest {
    let mut resources: BTreeMap<Vec<(String, String)>, Vec<Metric>> = BTreeMap::new();
    for s in series {
        let identity: Vec<(String, String)> = s
            .labels
            .iter()
            .filter(|(k, _)| IDENTITY_LABELS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let attributes: Vec<KeyValue> = s
            .labels
            .iter()
            .filter(|(k, _)| {
                k.as_str() != METRIC_NAME_LABEL && !IDENTITY_LABELS.contains(&k.as_str())
            })
            .map(|(k, v)| crate::otlp::string_attribute(k, v))
            .collect();
        let data_points = s
            .timestamps
            .iter()
            .zip(&s.values)
            .filter_map(|(t, v)| {
                Some(NumberDataPoint {
                    attributes: attributes.clone(),
                    time_unix_nano: u64::try_from(*t).ok()?.checked_mul(1_000_000)?,
                    value: Some(number_data_point::Value::AsDouble((*v)?)),
                    ..Default::default()
                })
            })
            .collect();
        resources.entry(identity).or_default().push(Metric {
            name: s.labels.get(METRIC_NAME_LABEL).cloned().unwrap_or_default(),
            data: Some(Data::Gauge(Gauge { data_points })),
            ..Default::default()
        });
    }
    ExportMetricsServiceRequest {
        resource_metrics: resources
            .into_iter()
            .map(|(identity, metrics)| ResourceMetrics {
                resource: Some(Resource {
                    attributes: identity
                        .iter()
                        .map(|(k, v)| crate::otlp::string_attribute(k, v))
                        .collect(),
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    metrics,
                    ..Default::default()
                }],
                schema_url: String::new(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_contiguous_and_lag_behind_now() {
        let w = Duration::from_secs(60);
        let lag = Duration::from_secs(30);
        assert_eq!(window_end(0, 1_000_000, w, lag), Some(59_999));
        assert_eq!(window_end(960_000, 1_000_000, w, lag), Some(970_000));
        assert_eq!(window_end(970_001, 1_000_000, w, lag), None);
        assert_eq!(seconds(1_700_000_000_123), "1700000000.123");
    }

    #[test]
    fn messages_never_show_the_urls_credentials() {
        let source =
            VictoriaMetricsSource::new("http://vm:s3cret@127.0.0.1:1/select/0/prometheus").unwrap();
        assert_eq!(
            source.shown_url,
            "http://127.0.0.1:1/select/0/prometheus/api/v1/export"
        );
        let bad = VictoriaMetricsSource::new("ftp://vm:s3cret@host").unwrap_err();
        assert!(!bad.to_string().contains("s3cret"), "{bad}");
        let unparsed = VictoriaMetricsSource::new("vm:s3cret@ho st").unwrap_err();
        assert!(!unparsed.to_string().contains("s3cret"), "{unparsed}");
    }

    #[test]
    fn parses_export_lines_and_builds_gauges() {
        let body = br#"{"metric":{"__name__":"up","namespace":"ns-a","job":"x"},"values":[1,0],"timestamps":[1000,2000]}

{"metric":{"__name__":"down","namespace":"ns-a"},"values":[5],"timestamps":[3000]}
"#;
        let series = parse_export_lines(body).unwrap();
        assert_eq!(series.len(), 2);
        let req = series_to_request(&series);
        assert_eq!(req.resource_metrics.len(), 1);
        let metrics = &req.resource_metrics[0].scope_metrics[0].metrics;
        assert_eq!(metrics.len(), 2);
        assert_eq!(crate::otlp::data_point_count(&req), 3);
        assert!(parse_export_lines(b"{not json}\n").is_err());
    }
}
