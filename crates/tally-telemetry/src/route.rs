//! In-stream selection: for each exporter, the data points of an OTLP metrics
//! request that it selects and may see, keeping resource/scope/metric structure.
//!
//! Tenancy is decided here and nowhere else. A series' identity (`project`,
//! `namespace`, `resource_group`, `resource_kind`, `resource_name`,
//! `service_name`) is read from OTLP resource attributes only. A resource is
//! exported only if its namespace is known to the [`ResourceIndex`], any
//! `project` attribute it carries agrees with the index, and the exporter's
//! namespace belongs to the same project. By default an exporter sees only its
//! own namespace; a resource selector's `namespaceSelector` adds other
//! namespaces of the same project whose labels match.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    ExponentialHistogram, Gauge, Histogram, Metric, ResourceMetrics, ScopeMetrics, Sum, Summary,
    metric::Data,
};

use crate::exporter::{Exporter, ResourceSelector, Selection};
use crate::index::{NamespaceInfo, ResourceIndex, ResourceRef};
use crate::otlp::data_point_count_of;
use crate::selector::{IDENTITY_LABELS, LabelPlace, Labels, MatcherSet, PlacedMatcher};
use crate::wire::{self, MetricSelection};

/// The OpenTelemetry semantic-convention name of a resource's namespace,
/// read when the resource has no `namespace` attribute.
pub const K8S_NAMESPACE: &str = "k8s.namespace.name";

const PROJECT: usize = 0;
const NAMESPACE: usize = 1;
const RESOURCE_GROUP: usize = 2;
const RESOURCE_KIND: usize = 3;
const RESOURCE_NAME: usize = 4;

/// What one exporter receives from one request.
#[derive(Debug, Clone)]
pub struct Routed {
    pub exporter: Arc<Exporter>,
    pub request: ExportMetricsServiceRequest,
}

/// Counts of resources no exporter could receive, for component metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteStats {
    /// Resources without a `namespace` (or `k8s.namespace.name`) attribute.
    pub without_namespace: u64,
    /// Resources whose namespace the index does not know.
    pub unknown_namespace: u64,
    /// Resources whose `project` attribute disagrees with their namespace's project.
    pub project_mismatch: u64,
    /// Data points of all those resources: no exporter may ever see them.
    pub unattributed_points: u64,
    /// Of those, per cause, in the order of [`RouteStats::refused`].
    refused_points: [u64; 3],
}

impl RouteStats {
    /// Data points refused, by cause: `no_namespace`, `unknown_namespace`,
    /// `project_mismatch`.
    pub fn refused(&self) -> [(&'static str, u64); 3] {
        let [none, unknown, mismatch] = self.refused_points;
        [
            ("no_namespace", none),
            ("unknown_namespace", unknown),
            ("project_mismatch", mismatch),
        ]
    }

    /// Counts a refused resource of `points` data points under `cause`
    /// (an index of [`RouteStats::refused`]).
    fn refuse(&mut self, cause: usize, points: u64) {
        match cause {
            0 => self.without_namespace += 1,
            1 => self.unknown_namespace += 1,
            _ => self.project_mismatch += 1,
        }
        self.refused_points[cause.min(2)] += points;
        self.unattributed_points += points;
    }
}

/// Routes requests to a fixed set of exporters. Build a new router when
/// exporters change; resource and namespace labels are read from the index
/// on every call, so relabelling takes effect at once.
#[derive(Debug, Clone, Default)]
pub struct Router {
    exporters: Vec<Arc<Exporter>>,
    /// Exporters by their own namespace.
    by_namespace: HashMap<String, Vec<usize>>,
    /// Exporters that may also see other namespaces of their project.
    widening: Vec<usize>,
}

impl Router {
    pub fn new(exporters: impl IntoIterator<Item = Exporter>) -> Router {
        let exporters: Vec<Arc<Exporter>> = exporters.into_iter().map(Arc::new).collect();
        let mut by_namespace: HashMap<String, Vec<usize>> = HashMap::new();
        let mut widening = Vec::new();
        for (i, e) in exporters.iter().enumerate() {
            by_namespace
                .entry(e.key.namespace.clone())
                .or_default()
                .push(i);
            let widens = e.sources.iter().any(|s| match &s.selection {
                Selection::Resources(selectors) => selectors.iter().any(|r| r.namespaces.is_some()),
                _ => false,
            });
            if widens {
                widening.push(i);
            }
        }
        Router {
            exporters,
            by_namespace,
            widening,
        }
    }

    pub fn exporters(&self) -> &[Arc<Exporter>] {
        &self.exporters
    }

    /// Selects, for every exporter, what it receives of `request`.
    /// Exporters that receive nothing are not in the answer.
    pub fn route(
        &self,
        request: &ExportMetricsServiceRequest,
        index: &dyn ResourceIndex,
    ) -> (Vec<Routed>, RouteStats) {
        let mut outputs: Vec<Option<ExportMetricsServiceRequest>> =
            vec![None; self.exporters.len()];
        let stats = self.walk(request, index, |_, rm, attrs, i, verdict| {
            let selected = match verdict {
                Verdict::Nothing => return,
                Verdict::Everything => Some(rm.clone()),
                Verdict::Matching(alternatives) => select_metrics(rm, attrs, &alternatives),
            };
            if let Some(selected) = selected {
                outputs[i]
                    .get_or_insert_with(ExportMetricsServiceRequest::default)
                    .resource_metrics
                    .push(selected);
            }
        });
        let routed = outputs
            .into_iter()
            .enumerate()
            .filter_map(|(i, request)| {
                request.map(|request| Routed {
                    exporter: Arc::clone(&self.exporters[i]),
                    request,
                })
            })
            .collect();
        (routed, stats)
    }

    /// Like [`Router::route`], but writes every exporter's selection straight
    /// to the protobuf wire form of an `ExportMetricsServiceRequest`, from the
    /// borrowed request: nothing is cloned, and a resource or metric selected
    /// whole is encoded once however many exporters take it. The answer holds
    /// one [`EncodedRoute`] per exporter that receives something, in exporter
    /// order; decoding its bytes gives what [`Router::route`] gives.
    pub fn route_encoded(
        &self,
        request: &ExportMetricsServiceRequest,
        index: &dyn ResourceIndex,
    ) -> (Vec<EncodedRoute>, RouteStats) {
        let mut outputs: Vec<Option<EncodedRoute>> = Vec::new();
        outputs.resize_with(self.exporters.len(), || None);
        let mut cache = wire::ResourceCache::default();
        let mut current = usize::MAX;
        let stats = self.walk(request, index, |r, rm, attrs, i, verdict| {
            if r != current {
                cache.reset();
                current = r;
            }
            let out = outputs[i].get_or_insert_with(|| EncodedRoute {
                exporter: i,
                bytes: Vec::new(),
                points: 0,
            });
            match verdict {
                Verdict::Nothing => {}
                Verdict::Everything => {
                    out.points += cache.whole(rm, &mut out.bytes);
                }
                Verdict::Matching(alternatives) => {
                    out.points += cache.selected(rm, &mut out.bytes, |metric| {
                        metric_selection(metric, attrs, &alternatives)
                    });
                }
            }
        });
        let routed = outputs
            .into_iter()
            .flatten()
            .filter(|o| o.points > 0)
            .collect();
        (routed, stats)
    }

    /// Visits, for every resource of `request` and every exporter that may
    /// see it, what that exporter selects of it.
    fn walk<'r, 's>(
        &'s self,
        request: &'r ExportMetricsServiceRequest,
        index: &dyn ResourceIndex,
        mut visit: impl FnMut(usize, &'r ResourceMetrics, &'r [KeyValue], usize, Verdict<'s>),
    ) -> RouteStats {
        let mut stats = RouteStats::default();
        // Project of each widening exporter's namespace, looked up once per call.
        let mut widening_projects: HashMap<usize, Option<Arc<str>>> = HashMap::new();
        let mut candidates = Vec::new();
        for (r, rm) in request.resource_metrics.iter().enumerate() {
            let attrs = rm.resource.as_ref().map_or(&[][..], |r| &r.attributes[..]);
            let identity = Identity::of(attrs);
            let Some(namespace) = identity.get(NAMESPACE) else {
                stats.refuse(0, resource_point_count(rm));
                continue;
            };
            let Some(ns_info) = index.namespace(namespace) else {
                stats.refuse(1, resource_point_count(rm));
                continue;
            };
            if identity
                .get(PROJECT)
                .is_some_and(|p| p != &*ns_info.project)
            {
                stats.refuse(2, resource_point_count(rm));
                continue;
            }
            candidates.clear();
            if let Some(own) = self.by_namespace.get(namespace) {
                candidates.extend_from_slice(own);
            }
            for &i in &self.widening {
                let exporter_namespace = &self.exporters[i].key.namespace;
                if exporter_namespace == namespace {
                    continue;
                }
                let project = widening_projects
                    .entry(i)
                    .or_insert_with(|| index.namespace(exporter_namespace).map(|n| n.project));
                if project.as_deref() == Some(&*ns_info.project) {
                    candidates.push(i);
                }
            }
            if candidates.is_empty() {
                continue;
            }
            let mut view = ResourceView {
                identity: &identity,
                namespace,
                ns_info: &ns_info,
                index,
                resource_labels: None,
            };
            for &i in &candidates {
                let verdict = view.verdict(&self.exporters[i]);
                visit(r, rm, attrs, i, verdict);
            }
        }
        stats
    }
}

/// One exporter's selection of a request, encoded (see [`Router::route_encoded`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedRoute {
    /// The exporter's position in [`Router::exporters`].
    pub exporter: usize,
    /// An `ExportMetricsServiceRequest` in protobuf. Concatenating two such
    /// encodings gives the request holding both selections.
    pub bytes: Vec<u8>,
    /// The data points it holds.
    pub points: u64,
}

fn resource_point_count(rm: &ResourceMetrics) -> u64 {
    rm.scope_metrics
        .iter()
        .flat_map(|sm| &sm.metrics)
        .filter_map(|m| m.data.as_ref())
        .map(|d| data_point_count_of(d) as u64)
        .sum()
}

/// Identity labels of a resource, read from its attributes.
struct Identity<'a> {
    values: [Option<Cow<'a, str>>; IDENTITY_LABELS.len()],
}

impl<'a> Identity<'a> {
    fn of(attrs: &'a [KeyValue]) -> Identity<'a> {
        let mut values: [Option<Cow<'a, str>>; IDENTITY_LABELS.len()] = Default::default();
        let mut k8s_namespace = None;
        for kv in attrs {
            if let Some(i) = IDENTITY_LABELS.iter().position(|l| label_eq(&kv.key, l))
                && values[i].is_none()
            {
                values[i] = Some(value_str(kv.value.as_ref()));
            } else if kv.key == K8S_NAMESPACE && k8s_namespace.is_none() {
                k8s_namespace = Some(value_str(kv.value.as_ref()));
            }
        }
        // `namespace` wins over the semantic-convention name.
        if values[NAMESPACE].is_none() {
            values[NAMESPACE] = k8s_namespace;
        }
        Identity { values }
    }

    fn get(&self, i: usize) -> Option<&str> {
        self.values[i].as_deref()
    }
}

enum Verdict<'e> {
    Nothing,
    Everything,
    /// Data points matching any of these matcher sets (identity matchers already hold).
    Matching(Vec<&'e MatcherSet>),
}

struct ResourceView<'a> {
    identity: &'a Identity<'a>,
    namespace: &'a str,
    ns_info: &'a NamespaceInfo,
    index: &'a dyn ResourceIndex,
    resource_labels: Option<Option<Arc<Labels>>>,
}

impl ResourceView<'_> {
    fn verdict<'e>(&mut self, exporter: &'e Exporter) -> Verdict<'e> {
        let own = exporter.key.namespace == self.namespace;
        let mut alternatives = Vec::new();
        for source in &exporter.sources {
            match &source.selection {
                Selection::All if own => return Verdict::Everything,
                Selection::All => {}
                Selection::Series(selector) if own => {
                    alternatives.extend(
                        selector
                            .alternatives
                            .iter()
                            .filter(|set| set.identity.iter().all(|m| self.identity_matches(m))),
                    );
                }
                Selection::Series(_) => {}
                Selection::Resources(selectors) => {
                    if selectors.iter().any(|s| self.resource_selected(s, own)) {
                        return Verdict::Everything;
                    }
                }
            }
        }
        if alternatives.is_empty() {
            Verdict::Nothing
        } else {
            Verdict::Matching(alternatives)
        }
    }

    fn identity_matches(&self, m: &PlacedMatcher) -> bool {
        match m.place {
            LabelPlace::Identity(i) => m.matcher.is_match(self.identity.get(i).unwrap_or("")),
            _ => true,
        }
    }

    /// The router only offers a resource to exporters of its own project;
    /// this decides the namespace scope within the project.
    fn resource_selected(&mut self, selector: &ResourceSelector, own: bool) -> bool {
        let in_scope = own
            || selector
                .namespaces
                .as_ref()
                .is_some_and(|ns| ns.matches(&self.ns_info.labels));
        if !in_scope {
            return false;
        }
        let group = self.identity.get(RESOURCE_GROUP).unwrap_or("");
        let kind = self.identity.get(RESOURCE_KIND).unwrap_or("");
        if !selector.kinds.is_empty() && !selector.kinds.iter().any(|k| k.matches(group, kind)) {
            return false;
        }
        if selector.labels.is_empty() {
            return true;
        }
        let labels = self.resource_labels.get_or_insert_with(|| {
            let name = self.identity.get(RESOURCE_NAME)?;
            if kind.is_empty() || name.is_empty() {
                return None;
            }
            self.index.resource_labels(ResourceRef {
                group,
                kind,
                namespace: self.namespace,
                name,
            })
        });
        match labels {
            Some(labels) => selector.labels.matches(labels),
            None => selector.labels.matches(&Labels::new()),
        }
    }
}

/// What the alternatives select of `metric` (of a resource with `resource_attrs`).
fn metric_selection<'a>(
    metric: &Metric,
    resource_attrs: &'a [KeyValue],
    alternatives: &'a [&'a MatcherSet],
) -> MetricSelection<impl Fn(&[KeyValue]) -> bool + use<'a>> {
    let name = normalized(&metric.name);
    let named = Named::of(alternatives, |set| {
        set.metric_name.iter().all(|m| m.matcher.is_match(&name))
    });
    if named.is_empty() {
        return MetricSelection::None;
    }
    if named.any(|set| set.attribute.is_empty()) {
        return MetricSelection::All;
    }
    MetricSelection::Points(move |point_attrs: &[KeyValue]| {
        named.any(|set| {
            set.attribute.iter().all(|m| {
                m.matcher.is_match(&attribute_value(
                    &m.matcher.name,
                    point_attrs,
                    resource_attrs,
                ))
            })
        })
    })
}

/// The alternatives whose metric name matchers hold, without allocating
/// when there are at most 64 of them (a bit per alternative).
enum Named<'a> {
    Mask(u64, &'a [&'a MatcherSet]),
    List(Vec<&'a MatcherSet>),
}

impl<'a> Named<'a> {
    fn of(alternatives: &'a [&'a MatcherSet], keep: impl Fn(&MatcherSet) -> bool) -> Named<'a> {
        if alternatives.len() > 64 {
            return Named::List(alternatives.iter().copied().filter(|s| keep(s)).collect());
        }
        let mut mask = 0u64;
        for (i, set) in alternatives.iter().enumerate() {
            if keep(set) {
                mask |= 1 << i;
            }
        }
        Named::Mask(mask, alternatives)
    }

    fn is_empty(&self) -> bool {
        match self {
            Named::Mask(mask, _) => *mask == 0,
            Named::List(list) => list.is_empty(),
        }
    }

    fn any(&self, f: impl Fn(&MatcherSet) -> bool) -> bool {
        match self {
            Named::Mask(mask, alternatives) => alternatives
                .iter()
                .enumerate()
                .any(|(i, set)| mask & (1 << i) != 0 && f(set)),
            Named::List(list) => list.iter().any(|set| f(set)),
        }
    }
}

/// The metrics of `rm` that match any alternative, or `None` if none does.
fn select_metrics(
    rm: &ResourceMetrics,
    resource_attrs: &[KeyValue],
    alternatives: &[&MatcherSet],
) -> Option<ResourceMetrics> {
    let mut scopes = Vec::new();
    for sm in &rm.scope_metrics {
        let mut metrics = Vec::new();
        for metric in &sm.metrics {
            let keep = match metric_selection(metric, resource_attrs, alternatives) {
                MetricSelection::None => continue,
                MetricSelection::All => {
                    metrics.push(metric.clone());
                    continue;
                }
                MetricSelection::Points(keep) => keep,
            };
            if let Some(data) = metric.data.as_ref().and_then(|d| filter_data(d, keep)) {
                metrics.push(Metric {
                    name: metric.name.clone(),
                    description: metric.description.clone(),
                    unit: metric.unit.clone(),
                    metadata: metric.metadata.clone(),
                    data: Some(data),
                });
            }
        }
        if !metrics.is_empty() {
            scopes.push(ScopeMetrics {
                scope: sm.scope.clone(),
                metrics,
                schema_url: sm.schema_url.clone(),
            });
        }
    }
    (!scopes.is_empty()).then(|| ResourceMetrics {
        resource: rm.resource.clone(),
        scope_metrics: scopes,
        schema_url: rm.schema_url.clone(),
    })
}

/// Keeps the data points whose attributes pass `keep`; `None` if none does.
fn filter_data(data: &Data, keep: impl Fn(&[KeyValue]) -> bool) -> Option<Data> {
    fn points<P: Clone>(
        points: &[P],
        attrs: fn(&P) -> &[KeyValue],
        keep: impl Fn(&[KeyValue]) -> bool,
    ) -> Vec<P> {
        points.iter().filter(|p| keep(attrs(p))).cloned().collect()
    }
    let data = match data {
        Data::Gauge(g) => Data::Gauge(Gauge {
            data_points: points(&g.data_points, |p| &p.attributes, keep),
        }),
        Data::Sum(s) => Data::Sum(Sum {
            data_points: points(&s.data_points, |p| &p.attributes, keep),
            aggregation_temporality: s.aggregation_temporality,
            is_monotonic: s.is_monotonic,
        }),
        Data::Histogram(h) => Data::Histogram(Histogram {
            data_points: points(&h.data_points, |p| &p.attributes, keep),
            aggregation_temporality: h.aggregation_temporality,
        }),
        Data::ExponentialHistogram(h) => Data::ExponentialHistogram(ExponentialHistogram {
            data_points: points(&h.data_points, |p| &p.attributes, keep),
            aggregation_temporality: h.aggregation_temporality,
        }),
        Data::Summary(s) => Data::Summary(Summary {
            data_points: points(&s.data_points, |p| &p.attributes, keep),
        }),
    };
    (data_point_count_of(&data) > 0).then_some(data)
}

/// A label's value for a data point: its attributes first, then the
/// resource's (identity labels never come from data points). Missing: `""`.
fn attribute_value<'a>(
    label: &str,
    point: &'a [KeyValue],
    resource: &'a [KeyValue],
) -> Cow<'a, str> {
    point
        .iter()
        .chain(resource)
        .find(|kv| label_eq(&kv.key, label))
        .map_or(Cow::Borrowed(""), |kv| value_str(kv.value.as_ref()))
}

/// Whether an attribute key names a Prometheus label: equal after replacing
/// every character that is not a letter, digit or `_` in the key by `_`
/// (`service.name` is `service_name`).
fn label_eq(key: &str, label: &str) -> bool {
    key.len() == label.len()
        && key
            .bytes()
            .zip(label.bytes())
            .all(|(k, l)| k == l || (l == b'_' && !k.is_ascii_alphanumeric()))
}

/// A metric name as a Prometheus-style label value (`a.b` is `a_b`).
fn normalized(name: &str) -> Cow<'_, str> {
    if name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
    {
        Cow::Borrowed(name)
    } else {
        Cow::Owned(
            name.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == ':' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect(),
        )
    }
}

/// An attribute value as a label value.
fn value_str(value: Option<&AnyValue>) -> Cow<'_, str> {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => Cow::Borrowed(s),
        Some(any_value::Value::IntValue(i)) => Cow::Owned(i.to_string()),
        Some(any_value::Value::DoubleValue(d)) => Cow::Owned(d.to_string()),
        Some(any_value::Value::BoolValue(b)) => Cow::Borrowed(if *b { "true" } else { "false" }),
        _ => Cow::Borrowed(""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_keys_compare_as_label_names() {
        assert!(label_eq("service.name", "service_name"));
        assert!(label_eq("service_name", "service_name"));
        assert!(!label_eq("service_name", "service.name"));
        assert!(!label_eq("servicename", "service_name"));
        assert_eq!(normalized("network.bytes"), "network_bytes");
        assert!(matches!(normalized("ok_name:x"), Cow::Borrowed(_)));
    }
}
