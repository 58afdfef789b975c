//! Connection seconds from Envoy's admin interface: samples the
//! `downstream_cx_active` gauges of `GET /stats` and turns the mapped ones
//! into a [`GaugeSample`] per route.
//!
//! Envoy answers `/stats?format=json` with
//! `{"stats":[{"name":"listener.0.0.0.0_10080.downstream_cx_active","value":3},…]}`
//! (histograms and text readouts are other kinds of entries, skipped) and
//! plain `/stats` with one `name: value` line per stat; both are read.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::AgentError;
use super::config::EnvoyAdminConfig;
use crate::collector::GaugeSample;
use crate::route::RouteKey;

/// Reads the admin endpoint's gauges.
pub(crate) struct AdminSampler {
    client: reqwest::Client,
    stats_url: reqwest::Url,
    gauges: Vec<(String, RouteKey)>,
}

/// One sample: the mapped routes' open connections, and the gauges with
/// open connections that no mapping names.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Sampled {
    pub(crate) sample: GaugeSample,
    pub(crate) unmapped: Vec<(String, u64)>,
}

impl AdminSampler {
    pub(crate) fn new(config: &EnvoyAdminConfig, timeout: Duration) -> Result<Self, AgentError> {
        let mut stats_url = config
            .url
            .join("stats")
            .map_err(|e| AgentError::Config(format!("the Envoy admin URL {}: {e}", config.url)))?;
        stats_url
            .query_pairs_mut()
            .append_pair("filter", "downstream_cx_active")
            .append_pair("format", "json");
        let client = tally_delivery::client_builder()
            .timeout(timeout)
            .build()
            .map_err(|e| AgentError::Config(format!("building the Envoy admin client: {e}")))?;
        Ok(AdminSampler {
            client,
            stats_url,
            gauges: config.gauges.clone(),
        })
    }

    /// The admin endpoint sampled, for logs.
    pub(crate) fn url(&self) -> &reqwest::Url {
        &self.stats_url
    }

    /// Reads the gauges now.
    pub(crate) async fn sample(&self) -> Result<Sampled, String> {
        let response = self
            .client
            .get(self.stats_url.clone())
            .send()
            .await
            .map_err(|e| format!("GET {}: {e}", self.stats_url))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| format!("reading the answer of {}: {e}", self.stats_url))?;
        let at_millis = jiff::Timestamp::now().as_millisecond();
        if !status.is_success() {
            return Err(format!("GET {} answered {status}", self.stats_url));
        }
        let values = parse_stats(&body)?;
        Ok(self.map(at_millis, &values))
    }

    /// The mapped gauges summed per route.
    fn map(&self, at_millis: i64, values: &BTreeMap<String, u64>) -> Sampled {
        let mut per_route: BTreeMap<&RouteKey, u64> = BTreeMap::new();
        for (stat, route) in &self.gauges {
            let open = values.get(stat).copied().unwrap_or(0);
            *per_route.entry(route).or_default() += open;
        }
        let unmapped = values
            .iter()
            .filter(|(name, value)| {
                **value > 0
                    && !name.contains(".admin.")
                    && !self.gauges.iter().any(|(stat, _)| stat == *name)
            })
            .map(|(name, value)| (name.clone(), *value))
            .collect();
        Sampled {
            sample: GaugeSample {
                at_millis,
                gauges: per_route
                    .into_iter()
                    .map(|(route, open)| (route.clone(), open))
                    .collect(),
            },
            unmapped,
        }
    }
}

#[derive(Deserialize)]
struct JsonStats {
    stats: Vec<JsonStat>,
}

#[derive(Deserialize)]
struct JsonStat {
    name: Option<String>,
    value: Option<serde_json::Value>,
}

/// Every `*downstream_cx_active` gauge of a `/stats` answer, JSON or text.
pub(crate) fn parse_stats(body: &[u8]) -> Result<BTreeMap<String, u64>, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("the stats are not UTF-8: {e}"))?;
    let wanted = |name: &str| name.ends_with("downstream_cx_active");
    let mut values = BTreeMap::new();
    if text.trim_start().starts_with('{') {
        let stats: JsonStats = serde_json::from_str(text)
            .map_err(|e| format!("the JSON stats cannot be read: {e}"))?;
        for stat in stats.stats {
            let (Some(name), Some(value)) = (stat.name, stat.value) else {
                continue;
            };
            if wanted(&name)
                && let Some(value) = value.as_u64()
            {
                values.insert(name, value);
            }
        }
        return Ok(values);
    }
    for line in text.lines() {
        let Some((name, value)) = line.rsplit_once(": ") else {
            continue;
        };
        if wanted(name) {
            let value = value
                .trim()
                .parse()
                .map_err(|e| format!("the stat line {line:?} has no count: {e}"))?;
            values.insert(name.to_owned(), value);
        }
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str) -> RouteKey {
        RouteKey {
            project: "p".into(),
            namespace: "ns".into(),
            name: name.into(),
        }
    }

    #[test]
    fn json_and_text_stats_give_the_same_gauges() {
        let json = br#"{"stats":[
            {"name":"http.admin.downstream_cx_active","value":1},
            {"name":"listener.0.0.0.0_10080.downstream_cx_active","value":3},
            {"name":"listener.0.0.0.0_10080.downstream_cx_total","value":90},
            {"name":"listener.0.0.0.0_10443.worker_0.downstream_cx_active","value":2},
            {"name":"server.version_label","value":"abc/1.31.0/Clean/RELEASE/BoringSSL"},
            {"histograms":{"supported_quantiles":[0,25,50],"computed_quantiles":[]}}
        ]}"#;
        let text = "http.admin.downstream_cx_active: 1\n\
            listener.0.0.0.0_10080.downstream_cx_active: 3\n\
            listener.0.0.0.0_10080.downstream_cx_total: 90\n\
            listener.0.0.0.0_10443.worker_0.downstream_cx_active: 2\n\
            cluster.x.upstream_rq_time: P0(nan,1) P25(nan,2)\n";
        let from_json = parse_stats(json).unwrap();
        assert_eq!(from_json, parse_stats(text.as_bytes()).unwrap());
        assert_eq!(
            from_json.get("listener.0.0.0.0_10080.downstream_cx_active"),
            Some(&3)
        );
        assert_eq!(from_json.len(), 3);
        assert!(parse_stats(b"{\"stats\": 7}").is_err());
        assert!(parse_stats(b"listener.x.downstream_cx_active: many").is_err());
    }

    #[test]
    fn mapped_gauges_are_summed_per_route_and_the_rest_reported() {
        let config = EnvoyAdminConfig {
            url: reqwest::Url::parse("http://127.0.0.1:19000").unwrap(),
            interval: Duration::from_secs(10),
            gauges: vec![
                ("listener.a.downstream_cx_active".into(), route("api")),
                ("http.b.downstream_cx_active".into(), route("api")),
                ("listener.gone.downstream_cx_active".into(), route("old")),
            ],
        };
        let sampler = AdminSampler::new(&config, Duration::from_secs(1)).unwrap();
        assert_eq!(
            sampler.url().as_str(),
            "http://127.0.0.1:19000/stats?filter=downstream_cx_active&format=json"
        );
        let values: BTreeMap<String, u64> = [
            ("listener.a.downstream_cx_active", 2),
            ("http.b.downstream_cx_active", 5),
            ("listener.other.downstream_cx_active", 4),
            ("http.admin.downstream_cx_active", 1),
            ("listener.idle.downstream_cx_active", 0),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let sampled = sampler.map(42, &values);
        assert_eq!(sampled.sample.at_millis, 42);
        assert_eq!(
            sampled.sample.gauges,
            vec![(route("api"), 7), (route("old"), 0)]
        );
        assert_eq!(
            sampled.unmapped,
            vec![("listener.other.downstream_cx_active".to_owned(), 4)]
        );
    }
}
