//! The request and GenAI metrics of one request's records: delta
//! histograms by namespace, metric and attribute set.
//!
//! A series is found by its attribute set packed into one string (each
//! name and value as `<byte length>:<bytes>`, so different sets never
//! pack alike), built in a buffer reused from record to record: a record
//! allocates nothing once its series exist.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Histogram, HistogramDataPoint, Metric, ResourceMetrics, ScopeMetrics,
    metric::Data,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use tally_policy::vocab::A;
use tally_policy::{AttrValue, Policy, Record};

use crate::otlp::string_attribute;
use crate::route::K8S_NAMESPACE;

/// Bucket bounds of duration histograms (s), as the semantic conventions advise.
const SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
/// Bucket bounds of size histograms (By).
const BYTES: &[f64] = &[
    0.0,
    100.0,
    1_000.0,
    10_000.0,
    100_000.0,
    1_000_000.0,
    10_000_000.0,
];
/// Bucket bounds of token histograms, as the semantic conventions advise.
const TOKENS: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];

const UNITS: &[(&str, &str, &[f64])] = &[
    ("http.server.request.duration", "s", SECONDS),
    ("http.server.request.body.size", "By", BYTES),
    ("http.server.response.body.size", "By", BYTES),
    ("gen_ai.client.token.usage", "{token}", TOKENS),
    ("gen_ai.client.operation.duration", "s", SECONDS),
];

/// The attributes every series has, when the record has them.
const BASE: [(&str, A); 3] = [
    ("gateway.name", A::RouteGateway),
    ("gateway.namespace", A::RouteGatewayNamespace),
    ("gateway.httproute.name", A::RouteHttproute),
];

struct Hist {
    bounds: &'static [f64],
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Hist {
    fn new(bounds: &'static [f64]) -> Hist {
        Hist {
            bounds,
            counts: vec![0; bounds.len() + 1],
            count: 0,
            sum: 0.0,
        }
    }

    fn record(&mut self, value: f64) {
        let i = self.bounds.partition_point(|b| *b < value);
        self.counts[i] += 1;
        self.count += 1;
        self.sum += value;
    }
}

/// A metric's histograms by packed attribute set.
type Series = BTreeMap<String, Hist>;

/// Delta histograms of one request's records.
#[derive(Default)]
pub(super) struct MetricsBuilder {
    series: BTreeMap<String, BTreeMap<&'static str, Series>>,
    /// The attribute set being built.
    key: String,
    /// A value rendered as text.
    text: String,
}

/// Appends `name` = `value` to a packed attribute set.
fn pack(key: &mut String, name: &str, value: &str) {
    // Writing to a `String` cannot fail.
    let _ = write!(key, "{}:{name}{}:{value}", name.len(), value.len());
}

/// The (name, value) pairs of a packed attribute set.
fn unpack(mut key: &str) -> Vec<(&str, &str)> {
    let mut next = || {
        let (len, rest) = key.split_once(':')?;
        let len: usize = len.parse().ok()?;
        let (text, rest) = (rest.get(..len)?, rest.get(len..)?);
        key = rest;
        Some(text)
    };
    let mut out = Vec::new();
    while let (Some(name), Some(value)) = (next(), next()) {
        out.push((name, value));
    }
    out
}

impl MetricsBuilder {
    /// Appends attribute `name` of `record`'s attribute `a`, if it has it.
    fn pack_attr(&mut self, record: &Record<'_>, name: &str, a: A) {
        let Some(value) = record.get(a as usize) else {
            return;
        };
        match value {
            AttrValue::Str(s) => pack(&mut self.key, name, s),
            other => {
                self.text.clear();
                other.render_into(&mut self.text);
                pack(&mut self.key, name, &self.text);
            }
        }
    }

    fn observe(&mut self, ns: &str, name: &'static str, value: f64) {
        if !self.series.contains_key(ns) {
            self.series.insert(ns.to_owned(), BTreeMap::new());
        }
        let Some(by_name) = self.series.get_mut(ns) else {
            return;
        };
        let series = by_name.entry(name).or_default();
        if let Some(hist) = series.get_mut(self.key.as_str()) {
            hist.record(value);
            return;
        }
        let bounds = UNITS.iter().find(|u| u.0 == name).map_or(SECONDS, |u| u.2);
        let mut hist = Hist::new(bounds);
        hist.record(value);
        series.insert(self.key.clone(), hist);
    }

    /// Adds `record` (in namespace `ns`) as `policy` asks: the request
    /// metrics with its dimensions, and with `genAI` the token usage.
    pub(super) fn add(&mut self, policy: &Policy, record: &Record<'_>, ns: &str) {
        let int = |a: A| match record.get(a as usize) {
            Some(AttrValue::Int(i)) => Some(*i as f64),
            _ => None,
        };
        let duration = match record.get(A::RequestDuration as usize) {
            Some(AttrValue::Duration(ns)) => Some(*ns as f64 / 1e9),
            _ => None,
        };
        self.key.clear();
        for (name, a) in BASE {
            self.pack_attr(record, name, a);
        }
        let base = self.key.len();
        if policy.dimensions.is_some() {
            self.pack_attr(record, "http.request.method", A::RequestMethod);
            self.pack_attr(record, "http.response.status_code", A::ResponseCode);
            for (name, value) in policy.dimension_values(record) {
                pack(&mut self.key, name, &value);
            }
            if let Some(d) = duration {
                self.observe(ns, "http.server.request.duration", d);
            }
            if let Some(n) = int(A::RequestSize) {
                self.observe(ns, "http.server.request.body.size", n);
            }
            if let Some(n) = int(A::ResponseSize) {
                self.observe(ns, "http.server.response.body.size", n);
            }
        }
        let usage = policy.gen_ai_usage(record);
        if usage.is_empty() {
            return;
        }
        self.key.truncate(base);
        self.pack_attr(record, "gen_ai.request.model", A::GenAiRequestModel);
        self.pack_attr(record, "gen_ai.provider.name", A::GenAiProviderName);
        self.pack_attr(record, "gen_ai.operation.name", A::GenAiOperationName);
        let gen_ai = self.key.len();
        for point in usage {
            pack(&mut self.key, "gen_ai.token.type", point.token_type);
            self.observe(ns, "gen_ai.client.token.usage", point.tokens as f64);
            self.key.truncate(gen_ai);
        }
        if let Some(d) = duration {
            self.observe(ns, "gen_ai.client.operation.duration", d);
        }
    }

    pub(super) fn finish(self) -> ExportMetricsServiceRequest {
        let now = u64::try_from(jiff::Timestamp::now().as_nanosecond()).unwrap_or(0);
        let resource_metrics = self
            .series
            .into_iter()
            .map(|(ns, by_name)| {
                let metrics = by_name
                    .into_iter()
                    .map(|(name, series)| metric(name, series, now))
                    .collect();
                ResourceMetrics {
                    resource: Some(Resource {
                        attributes: vec![string_attribute(K8S_NAMESPACE, &ns)],
                        ..Resource::default()
                    }),
                    scope_metrics: vec![ScopeMetrics {
                        scope: Some(super::scope()),
                        metrics,
                        schema_url: String::new(),
                    }],
                    schema_url: String::new(),
                }
            })
            .collect();
        ExportMetricsServiceRequest { resource_metrics }
    }
}

fn metric(name: &'static str, series: Series, now: u64) -> Metric {
    let unit = UNITS.iter().find(|u| u.0 == name).map_or("", |u| u.1);
    let data_points = series
        .into_iter()
        .map(|(attrs, h)| HistogramDataPoint {
            attributes: unpack(&attrs)
                .into_iter()
                .map(|(k, v)| string_attribute(k, v))
                .collect(),
            start_time_unix_nano: now,
            time_unix_nano: now,
            count: h.count,
            sum: Some(h.sum),
            bucket_counts: h.counts,
            explicit_bounds: h.bounds.to_vec(),
            ..HistogramDataPoint::default()
        })
        .collect();
    Metric {
        name: name.into(),
        unit: unit.into(),
        data: Some(Data::Histogram(Histogram {
            data_points,
            aggregation_temporality: AggregationTemporality::Delta as i32,
        })),
        ..Metric::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Packing is reversible, so two different attribute sets never
        /// share a series.
        #[test]
        fn packed_sets_unpack_to_themselves(
            pairs in prop::collection::vec(("[a-z.:0-9]{0,6}", "[:0-9é a-z]{0,6}"), 0..6),
        ) {
            let mut key = String::new();
            for (k, v) in &pairs {
                pack(&mut key, k, v);
            }
            let back: Vec<(String, String)> = unpack(&key)
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            prop_assert_eq!(back, pairs);
        }
    }
}
