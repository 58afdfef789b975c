//! Selectors: MetricsQL series selectors, Kubernetes label selectors and kind
//! selectors, compiled once and evaluated without allocating.

use std::collections::BTreeMap;

use promql_parser::label::Matcher;
use promql_parser::parser::{self, Expr};

use crate::spec::{KindSelectorSpec, LabelSelectorSpec};

/// Resource attributes that carry a series' identity. They are read from the
/// OTLP resource only (never from data point attributes), so a data point can
/// never claim another tenant's identity.
pub const IDENTITY_LABELS: [&str; 6] = [
    "project",
    "namespace",
    "resource_group",
    "resource_kind",
    "resource_name",
    "service_name",
];

/// The label that names a metric.
pub const METRIC_NAME_LABEL: &str = "__name__";

/// Where a matcher's label is looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LabelPlace {
    /// One of [`IDENTITY_LABELS`]: read from the resource.
    Identity(usize),
    /// `__name__`: the metric name.
    MetricName,
    /// Any other label: data point attributes, then resource attributes.
    Attribute,
}

#[derive(Debug, Clone)]
pub(crate) struct PlacedMatcher {
    pub(crate) place: LabelPlace,
    pub(crate) matcher: Matcher,
}

/// One conjunction of matchers, split by where their labels live.
#[derive(Debug, Clone, Default)]
pub(crate) struct MatcherSet {
    pub(crate) identity: Vec<PlacedMatcher>,
    pub(crate) metric_name: Vec<PlacedMatcher>,
    pub(crate) attribute: Vec<PlacedMatcher>,
}

/// The longest series selector parsed, in bytes. promql-parser recurses
/// once per operator of a chain (`- - - x`, `x + x + x`), so a long enough
/// text overflows the stack, and its time grows with the square of the
/// chain; a plain selector is far shorter.
pub const MAX_SELECTOR_LEN: usize = 8192;

/// How deep brackets, braces and parentheses may nest in a selector text (a
/// plain selector nests one level); deeper texts are refused unread.
pub const MAX_SELECTOR_DEPTH: usize = 16;

/// A compiled MetricsQL/PromQL series selector: a disjunction (`or`) of
/// conjunctions of label matchers (`=`, `!=`, `=~`, `!~`).
#[derive(Debug, Clone)]
pub struct SeriesSelector {
    pub(crate) alternatives: Vec<MatcherSet>,
}

impl SeriesSelector {
    /// Parses a plain series selector such as
    /// `{service_name="networking.datumapis.com", __name__=~"network_bytes_.*"}`.
    /// Anything else (functions, aggregations, range or offset selectors,
    /// arithmetic) is refused with a reason fit for a status condition.
    pub fn parse(text: &str) -> Result<SeriesSelector, String> {
        let text = text.trim();
        if text.len() > MAX_SELECTOR_LEN {
            return Err(format!(
                "a series selector is at most {MAX_SELECTOR_LEN} bytes long"
            ));
        }
        if tally_model::nesting::nesting_exceeds(text.as_bytes(), MAX_SELECTOR_DEPTH) {
            return Err(format!(
                "brackets nest deeper than {MAX_SELECTOR_DEPTH} levels; write a plain series selector"
            ));
        }
        // promql-parser panics on some inputs (`offset 1e400`: a float
        // duration out of range); a tenant's selector must not end a task.
        let parsed = std::panic::catch_unwind(|| parser::parse(text))
            .map_err(|_| "cannot parse: a number or duration is out of range".to_owned())?;
        let expr = parsed.map_err(|e| format!("cannot parse: {e}"))?;
        let selector = match expr {
            Expr::VectorSelector(selector) => selector,
            Expr::MatrixSelector(_) => {
                return Err("a range selector ([...]) is not a series selector".into());
            }
            Expr::Paren(_) => {
                return Err("parentheses are not allowed: write a plain series selector".into());
            }
            other => {
                return Err(format!(
                    "only a plain series selector like {{label=\"value\"}} is allowed, not a {}",
                    expr_kind(&other)
                ));
            }
        };
        if selector.offset.is_some() || selector.at.is_some() {
            return Err("offset and @ modifiers are not allowed in a series selector".into());
        }
        let name_matcher = selector.name.as_deref().map(|name| {
            Matcher::new(
                promql_parser::label::MatchOp::Equal,
                METRIC_NAME_LABEL,
                name,
            )
        });
        let mut groups: Vec<Vec<Matcher>> = Vec::new();
        if !selector.matchers.matchers.is_empty() || selector.matchers.or_matchers.is_empty() {
            groups.push(selector.matchers.matchers.clone());
        }
        groups.extend(selector.matchers.or_matchers.iter().cloned());
        let alternatives = groups
            .into_iter()
            .map(|mut group| {
                if let Some(name) = &name_matcher
                    && !group.contains(name)
                {
                    group.push(name.clone());
                }
                place_matchers(group)
            })
            .collect();
        Ok(SeriesSelector { alternatives })
    }
}

fn expr_kind(expr: &Expr) -> &'static str {
    match expr {
        Expr::Aggregate(_) => "aggregation",
        Expr::Unary(_) => "unary expression",
        Expr::Binary(_) => "binary expression",
        Expr::Subquery(_) => "subquery",
        Expr::NumberLiteral(_) => "number",
        Expr::StringLiteral(_) => "string",
        Expr::Call(_) => "function call",
        _ => "expression",
    }
}

fn place_matchers(group: Vec<Matcher>) -> MatcherSet {
    let mut set = MatcherSet::default();
    for matcher in group {
        if matcher.name == METRIC_NAME_LABEL {
            set.metric_name.push(PlacedMatcher {
                place: LabelPlace::MetricName,
                matcher,
            });
        } else if let Some(i) = IDENTITY_LABELS.iter().position(|l| *l == matcher.name) {
            set.identity.push(PlacedMatcher {
                place: LabelPlace::Identity(i),
                matcher,
            });
        } else {
            set.attribute.push(PlacedMatcher {
                place: LabelPlace::Attribute,
                matcher,
            });
        }
    }
    set
}

/// Labels of a namespace or resource.
pub type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A compiled Kubernetes label selector (`matchLabels` and `matchExpressions`
/// with `In`, `NotIn`, `Exists`, `DoesNotExist`). The empty selector matches
/// everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

impl LabelSelector {
    /// Compiles a selector; the error says which expression is wrong.
    pub fn compile(spec: &LabelSelectorSpec) -> Result<LabelSelector, String> {
        let mut requirements: Vec<Requirement> = spec
            .match_labels
            .iter()
            .map(|(k, v)| Requirement::In(k.clone(), vec![v.clone()]))
            .collect();
        for (i, expr) in spec.match_expressions.iter().enumerate() {
            if expr.key.is_empty() {
                return Err(format!("matchExpressions[{i}].key must not be empty"));
            }
            let key = expr.key.clone();
            let requirement = match expr.operator.as_str() {
                "In" | "NotIn" if expr.values.is_empty() => {
                    return Err(format!(
                        "matchExpressions[{i}]: operator {} needs at least one value",
                        expr.operator
                    ));
                }
                "Exists" | "DoesNotExist" if !expr.values.is_empty() => {
                    return Err(format!(
                        "matchExpressions[{i}]: operator {} takes no values",
                        expr.operator
                    ));
                }
                "In" => Requirement::In(key, expr.values.clone()),
                "NotIn" => Requirement::NotIn(key, expr.values.clone()),
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                other => {
                    return Err(format!(
                        "matchExpressions[{i}]: unknown operator {other:?} (use In, NotIn, Exists or DoesNotExist)"
                    ));
                }
            };
            requirements.push(requirement);
        }
        Ok(LabelSelector { requirements })
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::In(k, values) => labels.get(k).is_some_and(|v| values.contains(v)),
            Requirement::NotIn(k, values) => labels.get(k).is_none_or(|v| !values.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }

    /// Whether this selector has requirements at all.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }
}

/// A compiled kind selector: API groups (`*` or omitted: any; `""`: core) and
/// plural resources or kinds (`*` or both omitted: any).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KindSelector {
    groups: Option<Vec<String>>,
    /// Lower-case kind names, from `kinds` and from `resources` (plural or singular).
    kinds: Option<Vec<String>>,
}

impl KindSelector {
    /// Compiles a selector.
    pub fn compile(spec: &KindSelectorSpec) -> KindSelector {
        let groups = if spec.api_groups.is_empty() || spec.api_groups.iter().any(|g| g == "*") {
            None
        } else {
            Some(spec.api_groups.clone())
        };
        let any_kind = (spec.resources.is_empty() && spec.kinds.is_empty())
            || spec.resources.iter().chain(&spec.kinds).any(|k| k == "*");
        let kinds = (!any_kind).then(|| {
            let mut kinds: Vec<String> =
                spec.kinds.iter().map(|k| k.to_ascii_lowercase()).collect();
            for resource in &spec.resources {
                let resource = resource.to_ascii_lowercase();
                match kind_of_plural(&resource) {
                    Some(kind) => kinds.push(kind.to_ascii_lowercase()),
                    None => kinds.push(resource),
                }
            }
            kinds
        });
        KindSelector { groups, kinds }
    }

    /// Whether a resource of `group`/`kind` is selected.
    pub fn matches(&self, group: &str, kind: &str) -> bool {
        let group_ok = self
            .groups
            .as_ref()
            .is_none_or(|groups| groups.iter().any(|g| g == group));
        group_ok
            && self.kinds.as_ref().is_none_or(|kinds| {
                kinds.iter().any(|k| {
                    k.eq_ignore_ascii_case(kind) || plural_of_kind(kind).eq_ignore_ascii_case(k)
                })
            })
    }
}

/// Kinds whose plural is not the English rule, and the common kinds of the platform.
const KINDS: [(&str, &str); 22] = [
    ("Namespace", "namespaces"),
    ("Service", "services"),
    ("Endpoints", "endpoints"),
    ("ConfigMap", "configmaps"),
    ("Secret", "secrets"),
    ("Pod", "pods"),
    ("Gateway", "gateways"),
    ("GatewayClass", "gatewayclasses"),
    ("HTTPRoute", "httproutes"),
    ("GRPCRoute", "grpcroutes"),
    ("TLSRoute", "tlsroutes"),
    ("TCPRoute", "tcproutes"),
    ("UDPRoute", "udproutes"),
    ("BackendTLSPolicy", "backendtlspolicies"),
    ("HTTPProxy", "httpproxies"),
    ("Workload", "workloads"),
    ("WorkloadDeployment", "workloaddeployments"),
    ("Instance", "instances"),
    ("Network", "networks"),
    ("Domain", "domains"),
    ("Exporter", "exporters"),
    ("TelemetryPolicy", "telemetrypolicies"),
];

/// The kind for a lower-case plural resource name, for the common kinds.
pub fn kind_of_plural(plural: &str) -> Option<&'static str> {
    KINDS
        .iter()
        .find(|(_, p)| p.eq_ignore_ascii_case(plural))
        .map(|(k, _)| *k)
}

/// The lower-case plural resource name of a kind: the known table, else the
/// English rule Kubernetes uses (`-s`, `-es` after s/x/z/ch/sh, `-ies` after a consonant + y).
pub fn plural_of_kind(kind: &str) -> String {
    if let Some((_, plural)) = KINDS.iter().find(|(k, _)| k.eq_ignore_ascii_case(kind)) {
        return (*plural).to_owned();
    }
    let lower = kind.to_ascii_lowercase();
    let bytes = lower.as_bytes();
    let consonant_y = bytes.len() >= 2
        && bytes[bytes.len() - 1] == b'y'
        && !b"aeiou".contains(&bytes[bytes.len() - 2]);
    if consonant_y {
        format!("{}ies", &lower[..lower.len() - 1])
    } else if ["s", "x", "z", "ch", "sh"]
        .iter()
        .any(|e| lower.ends_with(e))
    {
        format!("{lower}es")
    } else {
        format!("{lower}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::LabelSelectorRequirementSpec;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn parses_plain_selectors_and_places_labels() {
        let s = SeriesSelector::parse(
            r#"{service_name="networking.datumapis.com", resource_kind="Gateway", __name__=~"network_bytes_.*", code!~"5.."}"#,
        )
        .unwrap();
        assert_eq!(s.alternatives.len(), 1);
        let set = &s.alternatives[0];
        assert_eq!(set.identity.len(), 2);
        assert_eq!(set.metric_name.len(), 1);
        assert_eq!(set.attribute.len(), 1);
        assert!(set.metric_name[0].matcher.is_match("network_bytes_sent"));
        assert!(!set.metric_name[0].matcher.is_match("xnetwork_bytes_sent"));
    }

    #[test]
    fn a_metric_name_becomes_a_name_matcher() {
        let s = SeriesSelector::parse(r#"http_requests_total{code="200"}"#).unwrap();
        let set = &s.alternatives[0];
        assert_eq!(set.metric_name.len(), 1);
        assert!(set.metric_name[0].matcher.is_match("http_requests_total"));
    }

    #[test]
    fn or_groups_become_alternatives() {
        let s = SeriesSelector::parse(r#"{a="1" or b="2"}"#).unwrap();
        assert_eq!(s.alternatives.len(), 2);
    }

    #[test]
    fn refuses_what_is_not_a_series_selector() {
        for (text, needle) in [
            ("rate(x[5m])", "function call"),
            ("sum(x)", "aggregation"),
            ("x[5m]", "range selector"),
            ("x offset 5m", "offset"),
            ("a + b", "binary"),
            ("(x)", "parentheses"),
            ("{", "cannot parse"),
            ("1", "number"),
        ] {
            let err = SeriesSelector::parse(text).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn refuses_what_would_overflow_the_parser_unread() {
        // Each of these, 100 000 levels or terms long, aborts the process
        // inside promql-parser (stack overflow).
        let long = [
            format!("{}x{}", "(".repeat(100_000), ")".repeat(100_000)),
            format!("{}x{}", "abs(".repeat(100_000), ")".repeat(100_000)),
            format!("{}x", "-".repeat(100_000)),
            vec!["x"; 100_000].join(" + "),
        ];
        for text in &long {
            let err = SeriesSelector::parse(text).unwrap_err();
            assert!(err.contains("at most 8192 bytes"), "{err}");
        }
        let deep = format!("{}x{}", "abs(".repeat(17), ")".repeat(17));
        let err = SeriesSelector::parse(&deep).unwrap_err();
        assert!(err.contains("nest deeper than 16"), "{err}");
        let quoted = format!("{{a=\"{}\"}}", "(".repeat(100));
        assert!(SeriesSelector::parse(&quoted).is_ok());
    }

    #[test]
    fn label_selectors_follow_kubernetes_semantics() {
        let spec = LabelSelectorSpec {
            match_labels: [("app".to_owned(), "gw".to_owned())].into(),
            match_expressions: vec![
                LabelSelectorRequirementSpec {
                    key: "tier".into(),
                    operator: "NotIn".into(),
                    values: vec!["dev".into()],
                },
                LabelSelectorRequirementSpec {
                    key: "team".into(),
                    operator: "Exists".into(),
                    values: vec![],
                },
                LabelSelectorRequirementSpec {
                    key: "legacy".into(),
                    operator: "DoesNotExist".into(),
                    values: vec![],
                },
            ],
        };
        let s = LabelSelector::compile(&spec).unwrap();
        assert!(s.matches(&labels(&[("app", "gw"), ("team", "a")])));
        assert!(s.matches(&labels(&[("app", "gw"), ("team", "a"), ("tier", "prod")])));
        assert!(!s.matches(&labels(&[("app", "gw"), ("team", "a"), ("tier", "dev")])));
        assert!(!s.matches(&labels(&[("app", "gw")])));
        assert!(!s.matches(&labels(&[("app", "gw"), ("team", "a"), ("legacy", "")])));
        assert!(!s.matches(&labels(&[("app", "other"), ("team", "a")])));
        assert!(LabelSelector::default().matches(&Labels::new()));
    }

    #[test]
    fn label_selector_errors_name_the_expression() {
        let bad = |op: &str, values: Vec<String>| LabelSelectorSpec {
            match_labels: BTreeMap::new(),
            match_expressions: vec![LabelSelectorRequirementSpec {
                key: "k".into(),
                operator: op.into(),
                values,
            }],
        };
        assert!(LabelSelector::compile(&bad("In", vec![])).is_err());
        assert!(LabelSelector::compile(&bad("Exists", vec!["x".into()])).is_err());
        let err = LabelSelector::compile(&bad("Equals", vec!["x".into()])).unwrap_err();
        assert!(err.contains("matchExpressions[0]"), "{err}");
    }

    #[test]
    fn kind_selectors_accept_plurals_kinds_and_wildcards() {
        let by_resource = KindSelector::compile(&KindSelectorSpec {
            api_groups: vec!["gateway.networking.k8s.io".into()],
            resources: vec!["gateways".into()],
            kinds: vec![],
        });
        assert!(by_resource.matches("gateway.networking.k8s.io", "Gateway"));
        assert!(!by_resource.matches("gateway.networking.k8s.io", "HTTPRoute"));
        assert!(!by_resource.matches("networking.datumapis.com", "Gateway"));
        let by_kind = KindSelector::compile(&KindSelectorSpec {
            api_groups: vec!["*".into()],
            resources: vec![],
            kinds: vec!["HTTPRoute".into()],
        });
        assert!(by_kind.matches("anything", "HTTPRoute"));
        let any = KindSelector::compile(&KindSelectorSpec {
            api_groups: vec![],
            resources: vec!["*".into()],
            kinds: vec![],
        });
        assert!(any.matches("x", "Y"));
        let unknown_plural = KindSelector::compile(&KindSelectorSpec {
            api_groups: vec![],
            resources: vec!["widgetpolicies".into()],
            kinds: vec![],
        });
        assert!(unknown_plural.matches("g", "WidgetPolicy"));
    }

    #[test]
    fn plurals_follow_the_english_rule() {
        assert_eq!(plural_of_kind("HTTPRoute"), "httproutes");
        assert_eq!(plural_of_kind("NetworkPolicy"), "networkpolicies");
        assert_eq!(plural_of_kind("Ingress"), "ingresses");
        assert_eq!(plural_of_kind("Gateway"), "gateways");
        assert_eq!(plural_of_kind("Endpoints"), "endpoints");
        assert_eq!(kind_of_plural("httproutes"), Some("HTTPRoute"));
        assert_eq!(kind_of_plural("nope"), None);
    }
}
