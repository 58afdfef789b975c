//! HTTPRoute identity: Envoy Gateway's `route_name` and the route key usage
//! is aggregated by.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The parts of an Envoy Gateway route name,
/// `httproute/<namespace>/<name>/rule/<i>[/match/<j>/<host>]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteName<'a> {
    /// The HTTPRoute's namespace.
    pub namespace: &'a str,
    /// The HTTPRoute's name.
    pub name: &'a str,
    /// Index of the rule in `spec.rules`.
    pub rule: u32,
    /// Index of the match in the rule, when named.
    pub matched: Option<u32>,
    /// The hostname of the match; `*` (or `*.example.com`) for wildcards.
    pub host: Option<&'a str>,
}

/// Parses a `route_name`. Anything that is not an HTTPRoute's route (other
/// route kinds, Envoy's own routes, malformed names) is `None`.
pub fn parse_route_name(route_name: &str) -> Option<RouteName<'_>> {
    let rest = route_name.strip_prefix("httproute/")?;
    let mut parts = rest.splitn(7, '/');
    let namespace = resource_name(parts.next())?;
    let name = resource_name(parts.next())?;
    if parts.next()? != "rule" {
        return None;
    }
    let rule = parts.next()?.parse().ok()?;
    let (matched, host) = match parts.next() {
        None => (None, None),
        Some("match") => {
            let matched = parts.next()?.parse().ok()?;
            let host = non_empty(parts.next()).filter(|h| !h.contains('/'))?;
            (Some(matched), Some(host))
        }
        Some(_) => return None,
    };
    Some(RouteName {
        namespace,
        name,
        rule,
        matched,
        host,
    })
}

fn non_empty(part: Option<&str>) -> Option<&str> {
    part.filter(|p| !p.is_empty())
}

/// A namespace, name or project as Kubernetes names them (at most 253
/// characters; [`tally_model::validate_name`]), so the usage event naming it
/// stays within the ledger's attribute limits.
fn resource_name(part: Option<&str>) -> Option<&str> {
    part.filter(|p| tally_model::validate_name(p).is_ok())
}

/// What usage is aggregated by: one HTTPRoute and the project it bills to.
/// The project is the route's namespace unless the record names one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RouteKey {
    /// The project billed (`subject` = `projects/<project>`).
    pub project: String,
    /// The HTTPRoute's namespace.
    pub namespace: String,
    /// The HTTPRoute's name.
    pub name: String,
}

impl RouteKey {
    /// Builds the key from a parsed route name and an optional
    /// `project_name` (absent, empty or `-` means "the namespace"); `None`
    /// when the project named is not a valid resource name.
    pub fn new(route: &RouteName<'_>, project_name: Option<&str>) -> Option<Self> {
        Self::from_parts(project_name, route.namespace, route.name)
    }

    /// The key of HTTPRoute `namespace`/`name` billed to `project_name`
    /// (absent, empty or `-` means "the namespace"); `None` unless each is
    /// a valid resource name.
    pub fn from_parts(project_name: Option<&str>, namespace: &str, name: &str) -> Option<Self> {
        let namespace = resource_name(Some(namespace))?;
        let name = resource_name(Some(name))?;
        let project = match project_name.filter(|p| !p.is_empty() && *p != "-") {
            Some(project) => resource_name(Some(project))?,
            None => namespace,
        };
        Some(RouteKey {
            project: project.to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl fmt::Display for RouteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.project, self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_only() {
        let r = parse_route_name("httproute/shop/api/rule/0").unwrap();
        assert_eq!((r.namespace, r.name, r.rule), ("shop", "api", 0));
        assert_eq!((r.matched, r.host), (None, None));
    }

    #[test]
    fn with_match_and_host() {
        let r = parse_route_name("httproute/shop/api/rule/2/match/1/api.example.com").unwrap();
        assert_eq!(
            (r.rule, r.matched, r.host),
            (2, Some(1), Some("api.example.com"))
        );
        let r = parse_route_name("httproute/shop/api/rule/0/match/0/*").unwrap();
        assert_eq!(r.host, Some("*"));
    }

    #[test]
    fn rejects_other_shapes() {
        for name in [
            "",
            "-",
            "grpcroute/shop/api/rule/0",
            "httproute/shop/api",
            "httproute/shop/api/rule/x",
            "httproute//api/rule/0",
            "httproute/shop//rule/0",
            "httproute/shop/api/rules/0",
            "httproute/shop/api/rule/0/match/1",
            "httproute/shop/api/rule/0/match/1/",
            "httproute/shop/api/rule/0/extra/1/h",
            "httproute/shop/api/rule/0/match/1/host/more",
        ] {
            assert_eq!(parse_route_name(name), None, "{name}");
        }
    }

    #[test]
    fn project_defaults_to_namespace() {
        let r = parse_route_name("httproute/ns/web/rule/0").unwrap();
        assert_eq!(RouteKey::new(&r, None).unwrap().project, "ns");
        assert_eq!(RouteKey::new(&r, Some("-")).unwrap().project, "ns");
        assert_eq!(RouteKey::new(&r, Some("p1")).unwrap().project, "p1");
        let long = "p".repeat(254);
        assert_eq!(RouteKey::new(&r, Some(long.as_str())), None);
        assert_eq!(RouteKey::new(&r, Some("Shop")), None);
        let long_namespace = format!("httproute/{}/web/rule/0", "n".repeat(254));
        assert_eq!(parse_route_name(&long_namespace), None);
    }
}
