//! Bearer tokens with scopes.
//!
//! Three scopes: `ingest` (platform services write events), `admin`, and
//! `project:<name>` (a customer reads its own usage). A project's usage is
//! the usage whose subject is `projects/<name>`, the platform's convention
//! for usage events. Tokens are compared as SHA-256 digests in constant
//! time, and may be configured by digest so the config file need not hold
//! them. A server with no token configured is open (every caller is admin).
//!
//! The scope rules (SECURITY.md has the table):
//! - `admin`: every route.
//! - `ingest`: writes events and metrics (`POST /api/v1/events`,
//!   `/v1/usage/events*`, `/v1/metrics`, `/api/v1/write`) and nothing else:
//!   not the catalog, not `/openapi.json`, not usage. A leaked ingest token
//!   can add usage (deduplicated, attributed by subject) but read nothing.
//! - `project:<name>`: reads the catalog and `/openapi.json`, its own usage
//!   and events, and reads and writes its own namespaced customer resources
//!   (exporters, policies, secrets); it never sees another project's.
//!
//! **Invariant:** [`access`] names every route; a route it does not name is
//! admin-only, so a new route is closed until it is opened on purpose.
//! Outside it: `/healthz`, `/readyz` and the console's static files
//! (`console.rs`), which hold no data.

use std::fmt;
use std::str::FromStr;

use axum::http::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tally_model::{Kind, KindClass};

use crate::problem::Problem;

/// What a token may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Everything.
    Admin,
    /// Send usage events.
    Ingest,
    /// Read the usage of one project (subject `projects/<name>`) and the catalog.
    Project(String),
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Scope, String> {
        match s {
            "admin" => Ok(Scope::Admin),
            "ingest" => Ok(Scope::Ingest),
            _ => match s.strip_prefix("project:") {
                Some(project) if !project.is_empty() && !project.contains('/') => {
                    Ok(Scope::Project(project.to_owned()))
                }
                _ => Err(format!(
                    "unknown scope {s:?}; scopes are admin, ingest and project:<name>"
                )),
            },
        }
    }
}

/// One token of the `tokens:` list of the serve config.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds the token; appears in logs instead of the token.
    pub name: String,
    /// The token itself. Never serialised or logged.
    #[serde(default, skip_serializing)]
    pub token: Option<String>,
    /// Or its SHA-256 digest in hex (`printf %s TOKEN | sha256sum`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// `admin`, `ingest`, `project:<name>`.
    pub scopes: Vec<String>,
}

impl fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenConfig")
            .field("name", &self.name)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("sha256", &self.sha256)
            .field("scopes", &self.scopes)
            .finish()
    }
}

/// The caller of a request, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    scopes: Vec<Scope>,
}

impl Principal {
    fn admin(name: &str) -> Principal {
        Principal {
            name: name.to_owned(),
            scopes: vec![Scope::Admin],
        }
    }

    pub fn is_admin(&self) -> bool {
        self.scopes.contains(&Scope::Admin)
    }

    fn can_ingest(&self) -> bool {
        self.is_admin() || self.scopes.contains(&Scope::Ingest)
    }

    /// Whether this caller reads the catalog and the API document: admins
    /// and projects, not a token that may only ingest.
    fn can_read_catalog(&self) -> bool {
        self.is_admin() || self.projects().next().is_some()
    }

    /// The projects this caller acts for through `project:<name>` scopes.
    pub fn projects(&self) -> impl Iterator<Item = &str> {
        self.scopes.iter().filter_map(|s| match s {
            Scope::Project(p) => Some(p.as_str()),
            _ => None,
        })
    }

    /// Whether this caller may see a resource of `kind` that belongs to
    /// `project` (`None`: to no project). Admins and projects read the
    /// catalog; a project reads its own namespaced resources and namespaces.
    pub fn may_read(&self, kind: Kind, project: Option<&str>) -> bool {
        self.is_admin()
            || (kind.class() == KindClass::Catalog && self.can_read_catalog())
            || (matches!(kind.class(), KindClass::Customer | KindClass::Platform)
                && project.is_some_and(|p| self.projects().any(|mine| mine == p)))
    }

    /// Whether this caller may create, change or delete a resource of
    /// `kind` belonging to `project`: operators anything, a project its own
    /// exporters, policies and secrets.
    pub fn may_write(&self, kind: Kind, project: Option<&str>) -> bool {
        self.is_admin()
            || (kind.class() == KindClass::Customer
                && project.is_some_and(|p| self.projects().any(|mine| mine == p)))
    }

    /// The subjects whose usage this caller may read; `None` means all.
    pub fn readable_subjects(&self) -> Option<Vec<String>> {
        if self.is_admin() {
            return None;
        }
        Some(
            self.scopes
                .iter()
                .filter_map(|s| match s {
                    Scope::Project(p) => Some(format!("projects/{p}")),
                    _ => None,
                })
                .collect(),
        )
    }

    /// Restricts a usage read to the caller's subjects: an empty request
    /// means all of them, and naming another subject is forbidden.
    pub fn restrict_subjects(&self, requested: &mut Vec<String>) -> Result<(), Problem> {
        let Some(allowed) = self.readable_subjects() else {
            return Ok(());
        };
        if requested.is_empty() {
            *requested = allowed;
            return Ok(());
        }
        match requested.iter().find(|s| !allowed.contains(s)) {
            Some(other) => Err(Problem::new(
                StatusCode::FORBIDDEN,
                format!("this token may not read the usage of subject {other:?}"),
            )),
            None => Ok(()),
        }
    }
}

/// What a route needs of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// `ingest` or `admin`.
    Ingest,
    /// `project:*` or `admin`: the catalog, resources and usage, which the
    /// handlers narrow to the caller's projects.
    Read,
    Admin,
}

fn access(method: &Method, route: &str) -> Access {
    match (method, route) {
        (
            &Method::POST,
            "/api/v1/events"
            | "/v1/usage/events"
            | "/v1/usage/events:batchIngest"
            | "/v1/metrics"
            | "/v1/logs"
            | "/v1/traces"
            | "/api/v1/write"
            | "/api/v1/instances/events",
        ) => Access::Ingest,
        // Usage (narrowed by the handler to the caller's projects), and the
        // catalog (meter definitions, resource types), cluster-scoped and
        // readable by every project.
        (
            &Method::GET,
            "/api/v1/events"
            | "/api/v2/events"
            | "/api/v1/meters/{slug}/query"
            | "/api/v1/meters/{slug}/group-by/{key}/values"
            | "/api/v1/meters/{slug}/subjects"
            | "/api/v1/meters"
            | "/api/v1/meters/{slug}"
            | "/api/v1/subjects"
            | "/api/v1/subjects/{key}"
            | "/api/v1/instances"
            | "/api/v1/instances/{instance}/events"
            | "/openapi.json",
        ) => Access::Read,
        // Instance logs: admins and projects; the handlers narrow to the
        // caller's projects (another project answers 404).
        (
            &Method::GET,
            "/api/v1/projects/{project}/instances/{instance}/logs"
            | "/loki/api/v1/query_range"
            | "/loki/api/v1/labels"
            | "/loki/api/v1/tail"
            | "/loki/api/v1/label/{name}/values",
        ) => Access::Read,
        // A query with its parameters in the body reads like the GET.
        (&Method::POST, "/api/v1/meters/{slug}/query") => Access::Read,
        // The Prometheus query API, held to the caller's project (`promql`).
        (method, route) if crate::promql::is_route(method, route) => Access::Read,
        // OpenMeter features Tally does not serve: every caller that may
        // read learns so (501).
        (_, route) if crate::unserved::is_unserved_route(route) => Access::Read,
        // Validation reads every subject's events: the catalog's owners only.
        (&Method::GET, "/api/v1/meters/{slug}/validate") => Access::Admin,
        // Resources: admins and projects; the handlers decide per kind and
        // project (`Principal::may_read`, `Principal::may_write`).
        (
            _,
            "/apis/apply"
            | "/apis/{plural}"
            | "/apis/{plural}/{name}"
            | "/apis/{plural}/{namespace}/{name}",
        ) => Access::Read,
        _ => Access::Admin,
    }
}

/// Every configured token, by digest.
#[derive(Clone, Default)]
pub struct Authenticator {
    grants: Vec<([u8; 32], Principal)>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = self.grants.iter().map(|(_, p)| &p.name).collect();
        f.debug_struct("Authenticator")
            .field("tokens", &names)
            .finish()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Authenticator {
    /// Builds the token table: `admin_token` (the `--token` flag) plus the
    /// configured list. Fails on a bad scope, a bad digest, or a token given
    /// both ways or neither.
    pub fn new(admin_token: Option<&str>, tokens: &[TokenConfig]) -> Result<Authenticator, String> {
        let mut grants = Vec::new();
        if let Some(token) = admin_token.filter(|t| !t.is_empty()) {
            grants.push((digest(token), Principal::admin("admin")));
        }
        for config in tokens {
            let scopes = config
                .scopes
                .iter()
                .map(|s| s.parse::<Scope>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("token {:?}: {e}", config.name))?;
            if scopes.is_empty() {
                return Err(format!("token {:?}: give at least one scope", config.name));
            }
            let digest = match (&config.token, &config.sha256) {
                (Some(token), None) if !token.is_empty() => digest(token),
                (None, Some(hex)) => parse_digest(hex).ok_or_else(|| {
                    format!("token {:?}: sha256 must be 64 hex digits", config.name)
                })?,
                _ => {
                    return Err(format!(
                        "token {:?}: give exactly one of `token` and `sha256`",
                        config.name
                    ));
                }
            };
            grants.push((
                digest,
                Principal {
                    name: config.name.clone(),
                    scopes,
                },
            ));
        }
        Ok(Authenticator { grants })
    }

    /// Whether any token is configured; without one the server is open.
    pub fn is_enabled(&self) -> bool {
        !self.grants.is_empty()
    }

    /// The caller presenting `bearer`, if it is a known token.
    fn identify(&self, bearer: &str) -> Option<Principal> {
        let presented = digest(bearer);
        // Look at every grant so the time taken does not tell which matched.
        let mut found = None;
        for (known, principal) in &self.grants {
            if bool::from(known.ct_eq(&presented)) {
                found = Some(principal);
            }
        }
        found.cloned()
    }

    /// Authenticates and authorises one request.
    pub(crate) fn check(
        &self,
        bearer: Option<&str>,
        method: &Method,
        route: &str,
    ) -> Result<Principal, Problem> {
        if !self.is_enabled() {
            return Ok(Principal::admin("anonymous"));
        }
        let principal = bearer
            .and_then(|b| self.identify(b))
            .ok_or_else(|| {
                Problem::new(
                    StatusCode::UNAUTHORIZED,
                    "this server requires `Authorization: Bearer <token>`; the token is missing or wrong",
                )
            })?;
        let allowed = match access(method, route) {
            Access::Ingest => principal.can_ingest(),
            Access::Read => principal.can_read_catalog(),
            Access::Admin => principal.is_admin(),
        };
        if allowed {
            Ok(principal)
        } else {
            Err(Problem::new(
                StatusCode::FORBIDDEN,
                format!("token {:?} may not {method} {route}", principal.name),
            ))
        }
    }
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Authenticator {
        let sha = Sha256::digest(b"agent-secret")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        Authenticator::new(
            Some("root"),
            &[
                TokenConfig {
                    name: "agents".into(),
                    token: None,
                    sha256: Some(sha),
                    scopes: vec!["ingest".into()],
                },
                TokenConfig {
                    name: "acme".into(),
                    token: Some("acme-secret".into()),
                    sha256: None,
                    scopes: vec!["project:acme".into()],
                },
            ],
        )
        .unwrap()
    }

    #[test]
    fn scopes_decide_what_a_token_may_do() {
        let a = auth();
        let post = Method::POST;
        let get = Method::GET;
        assert!(a.check(Some("root"), &post, "/apis/apply").is_ok());
        assert!(
            a.check(Some("agent-secret"), &post, "/v1/usage/events")
                .is_ok()
        );
        assert_eq!(
            a.check(Some("agent-secret"), &get, "/api/v1/meters/{slug}/query")
                .unwrap_err()
                .status,
            403
        );
        assert_eq!(
            a.check(Some("acme-secret"), &post, "/api/v1/events")
                .unwrap_err()
                .status,
            403
        );
        // Resources are decided per kind and project by the handlers.
        let acme = a.check(Some("acme-secret"), &post, "/apis/apply").unwrap();
        assert!(acme.may_write(Kind::Exporter, Some("acme")));
        assert!(!acme.may_write(Kind::Exporter, Some("other")));
        assert!(!acme.may_write(Kind::MeterDefinition, None));
        assert!(!acme.may_write(Kind::Namespace, Some("acme")));
        assert!(acme.may_read(Kind::MeterDefinition, None));
        assert!(acme.may_read(Kind::Namespace, Some("acme")));
        assert!(!acme.may_read(Kind::Secret, Some("other")));
        assert!(!acme.may_read(Kind::BillingAccountBinding, None));
        // An ingest token writes events and reads nothing, the catalog,
        // resources and the API document included.
        assert_eq!(
            a.check(Some("agent-secret"), &post, "/apis/apply")
                .unwrap_err()
                .status,
            403
        );
        for route in [
            "/api/v1/meters",
            "/api/v1/meters/{slug}",
            "/openapi.json",
            "/apis/{plural}",
            "/apis/{plural}/{name}",
        ] {
            assert_eq!(
                a.check(Some("agent-secret"), &get, route)
                    .unwrap_err()
                    .status,
                403,
                "{route}"
            );
            assert!(a.check(Some("acme-secret"), &get, route).is_ok(), "{route}");
        }
        let acme = a
            .check(Some("acme-secret"), &get, "/api/v1/meters/{slug}/query")
            .unwrap();
        assert_eq!(acme.name, "acme");
        assert_eq!(
            a.check(Some("nope"), &get, "/api/v1/meters")
                .unwrap_err()
                .status,
            401
        );
        assert_eq!(
            a.check(None, &get, "/api/v1/meters").unwrap_err().status,
            401
        );
    }

    #[test]
    fn a_project_reads_only_its_own_subjects() {
        let acme = auth()
            .check(Some("acme-secret"), &Method::GET, "/api/v1/events")
            .unwrap();
        let mut subjects = vec![];
        acme.restrict_subjects(&mut subjects).unwrap();
        assert_eq!(subjects, ["projects/acme"]);
        let mut other = vec!["projects/globex".to_owned()];
        assert_eq!(acme.restrict_subjects(&mut other).unwrap_err().status, 403);
    }

    #[test]
    fn bad_configs_are_refused_and_tokens_never_printed() {
        let bad = |scopes: &[&str], token: Option<&str>, sha: Option<&str>| {
            Authenticator::new(
                None,
                &[TokenConfig {
                    name: "x".into(),
                    token: token.map(Into::into),
                    sha256: sha.map(Into::into),
                    scopes: scopes.iter().map(|s| s.to_string()).collect(),
                }],
            )
            .unwrap_err()
        };
        assert!(bad(&["root"], Some("t"), None).contains("unknown scope"));
        assert!(bad(&[], Some("t"), None).contains("at least one scope"));
        assert!(bad(&["admin"], Some("t"), Some("ab")).contains("exactly one"));
        assert!(bad(&["admin"], None, Some("ab")).contains("64 hex"));
        let config = TokenConfig {
            name: "x".into(),
            token: Some("hunter2".into()),
            sha256: None,
            scopes: vec!["admin".into()],
        };
        assert!(!format!("{config:?}").contains("hunter2"));
        assert!(!serde_json::to_string(&config).unwrap().contains("hunter2"));
        assert!(!format!("{:?}", auth()).contains("secret"));
    }
}
