//! The consumer metrics API: Prometheus' query API (`/api/v1/query`,
//! `/api/v1/query_range`, `/api/v1/labels`, `/api/v1/label/{name}/values`,
//! `/api/v1/series`), answered by the configured VictoriaMetrics
//! (`victoriaMetrics.url`), so a customer's Grafana can add Tally as a
//! Prometheus datasource with a project token.
//!
//! Tenancy is enforced here, never by the query: for a project token the
//! upstream request carries `extra_filters[]={namespace=~"<the project's
//! namespaces>"}`, which VictoriaMetrics ANDs with every selector of the
//! query, so a crafted selector (`{namespace="other"}`, `{__name__=~".+"}`)
//! still sees only the project's series. Only the parameters named in
//! [`ALLOWED`] are forwarded; a caller's own `extra_label`/`extra_filters[]`
//! are dropped. Admin tokens query unfiltered.
//!
//! Bounds: query ≤ [`MAX_QUERY_BYTES`] and nested at most
//! [`MAX_QUERY_DEPTH`]; a range ≤ [`MAX_RANGE_DAYS`] days of at most
//! [`MAX_POINTS`] steps; the upstream call ≤ [`UPSTREAM_TIMEOUT`]; the
//! answer ≤ [`MAX_ANSWER_BYTES`]. VictoriaMetrics' own answers (2xx and its
//! Prometheus-format errors) are passed through as Grafana expects them;
//! Tally's refusals are problem+json.

use std::time::Duration;

use axum::Extension;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tally_model::Kind;

use crate::problem::Problem;
use crate::{AppState, Principal};

/// Longest query text accepted.
pub const MAX_QUERY_BYTES: usize = 16 * 1024;
/// Deepest bracket nesting of a query.
pub const MAX_QUERY_DEPTH: usize = 64;
/// Longest `end - start`.
pub const MAX_RANGE_DAYS: i64 = 32;
/// Most points of a range query (`(end - start) / step`), as Prometheus'.
pub const MAX_POINTS: f64 = 11_000.0;
/// Longest wait for VictoriaMetrics.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer passed on.
pub const MAX_ANSWER_BYTES: usize = 16 << 20;
/// Most `match[]` selectors.
pub const MAX_MATCHERS: usize = 32;
/// Parameters forwarded upstream; every other one is dropped.
pub const ALLOWED: [&str; 8] = [
    "query", "time", "start", "end", "step", "match[]", "limit", "timeout",
];

/// Where the consumer metrics are read from.
#[derive(Clone)]
pub struct MetricsQuery {
    base: String,
    client: reqwest::Client,
}

impl MetricsQuery {
    /// Queries go to the VictoriaMetrics at `base` (its Prometheus API
    /// root, e.g. `http://vm:8428` or `http://vmselect:8481/select/0/prometheus`).
    pub fn new(base: &str) -> anyhow::Result<MetricsQuery> {
        let client = tally_delivery::client_builder()
            .timeout(UPSTREAM_TIMEOUT)
            .build()?;
        Ok(MetricsQuery {
            base: base.trim_end_matches('/').to_owned(),
            client,
        })
    }
}

/// The request's parameters: the query string, and a form body (Grafana
/// POSTs `application/x-www-form-urlencoded`).
fn params(raw: Option<&str>, headers: &HeaderMap, body: &[u8]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = form_urlencoded::parse(raw.unwrap_or("").as_bytes())
        .into_owned()
        .collect();
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if form {
        out.extend(form_urlencoded::parse(body).into_owned());
    }
    out
}

fn one<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// A Prometheus time: RFC 3339 or (fractional) Unix seconds.
fn seconds(text: &str, what: &str) -> Result<f64, Problem> {
    if let Ok(s) = text.parse::<f64>()
        && s.is_finite()
    {
        return Ok(s);
    }
    text.parse::<jiff::Timestamp>()
        .map(|t| t.as_millisecond() as f64 / 1000.0)
        .map_err(|_| Problem::bad_request(format!("{what} must be RFC 3339 or Unix seconds")))
}

/// A Prometheus duration or float seconds (`step`).
fn duration_seconds(text: &str) -> Result<f64, Problem> {
    if let Ok(s) = text.parse::<f64>()
        && s.is_finite()
    {
        return Ok(s);
    }
    tally_telemetry::exporter::parse_duration(text)
        .map(|d| d.as_secs_f64())
        .map_err(|_| Problem::bad_request("step must be a duration (30s, 1m) or seconds"))
}

/// Refuses what is unbounded: long or deep queries, long ranges, too many
/// points or selectors.
fn check_bounds(params: &[(String, String)], range: bool) -> Result<(), Problem> {
    for (k, v) in params {
        if (k == "query" || k == "match[]") && v.len() > MAX_QUERY_BYTES {
            return Err(Problem::bad_request(format!(
                "{k} is longer than {MAX_QUERY_BYTES} bytes"
            )));
        }
        if (k == "query" || k == "match[]")
            && tally_model::nesting::nesting_exceeds(v.as_bytes(), MAX_QUERY_DEPTH)
        {
            return Err(Problem::bad_request(format!(
                "{k} nests deeper than {MAX_QUERY_DEPTH}"
            )));
        }
    }
    if params.iter().filter(|(k, _)| k == "match[]").count() > MAX_MATCHERS {
        return Err(Problem::bad_request(format!(
            "at most {MAX_MATCHERS} match[] selectors"
        )));
    }
    let (start, end) = (one(params, "start"), one(params, "end"));
    if let (Some(start), Some(end)) = (start, end) {
        let span = seconds(end, "end")? - seconds(start, "start")?;
        if span < 0.0 {
            return Err(Problem::bad_request("end is before start"));
        }
        if span > (MAX_RANGE_DAYS * 86_400) as f64 {
            return Err(Problem::bad_request(format!(
                "a range spans at most {MAX_RANGE_DAYS} days"
            )));
        }
        if range {
            let step = duration_seconds(one(params, "step").unwrap_or(""))?;
            if step <= 0.0 || span / step > MAX_POINTS {
                return Err(Problem::bad_request(format!(
                    "a range query has a positive step and at most {MAX_POINTS} points"
                )));
            }
        }
    } else if range {
        return Err(Problem::bad_request(
            "a range query needs start, end and step",
        ));
    }
    Ok(())
}

/// The MetricsQL string literal of `s`.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A regex matching exactly the given names.
fn alternation(names: &[String]) -> String {
    names
        .iter()
        .map(|n| {
            n.chars()
                .flat_map(|c| {
                    let special = "\\.+*?()|[]{}^$".contains(c);
                    special
                        .then_some('\\')
                        .into_iter()
                        .chain(std::iter::once(c))
                })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("|")
}

/// The series filter a caller is held to: `None` for an admin.
fn tenancy_filter(
    state: &AppState,
    principal: &Principal,
    requested: Option<&str>,
) -> Result<Option<String>, Problem> {
    if principal.is_admin() {
        return Ok(None);
    }
    let mine: Vec<&str> = principal.projects().collect();
    let project = match (requested, mine.as_slice()) {
        (Some(r), _) if mine.contains(&r) => r.to_owned(),
        (Some(r), _) => {
            return Err(Problem::new(
                StatusCode::NOT_FOUND,
                format!("project {r:?} not found"),
            ));
        }
        (None, [only]) => (*only).to_owned(),
        (None, _) => {
            return Err(Problem::bad_request(
                "this token reads several projects: name one with ?project=",
            ));
        }
    };
    let set = state.snapshot();
    let mut namespaces: Vec<String> = set
        .list(Kind::Namespace, None)
        .map(|ns| ns.metadata.name.clone())
        .filter(|ns| set.project_of_namespace(ns) == project)
        .collect();
    // A namespace Tally does not know belongs to the project of its name.
    if !namespaces.contains(&project) && set.project_of_namespace(&project) == project {
        namespaces.push(project);
    }
    Ok(Some(format!(
        "{{namespace=~{}}}",
        quoted(&alternation(&namespaces))
    )))
}

/// Forwards one query API call (see the module doc).
async fn forward(
    state: AppState,
    principal: Principal,
    api: String,
    raw: Option<String>,
    headers: HeaderMap,
    body: Bytes,
    range: bool,
) -> Result<Response, Problem> {
    let Some(upstream) = state.metrics_query.clone() else {
        return Err(Problem::new(
            StatusCode::NOT_IMPLEMENTED,
            "no VictoriaMetrics is configured (victoriaMetrics.url) to answer metric queries",
        ));
    };
    let given = params(raw.as_deref(), &headers, &body);
    check_bounds(&given, range)?;
    let needs_query = api == "/api/v1/query" || api == "/api/v1/query_range";
    if needs_query && one(&given, "query").is_none_or(str::is_empty) {
        return Err(Problem::bad_request("query is required"));
    }
    let filter = tenancy_filter(&state, &principal, one(&given, "project"))?;
    let mut form: Vec<(String, String)> = given
        .into_iter()
        .filter(|(k, _)| ALLOWED.contains(&k.as_str()))
        .collect();
    if let Some(filter) = filter {
        form.push(("extra_filters[]".to_owned(), filter));
    }
    let encoded = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(&form)
        .finish();
    let answer = upstream
        .client
        .post(format!("{}{api}", upstream.base))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(encoded)
        .send()
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, api, "metrics query upstream");
            Problem::new(StatusCode::BAD_GATEWAY, "VictoriaMetrics did not answer")
        })?;
    relay(answer).await
}

/// VictoriaMetrics' answer, status and JSON body, read up to the bound.
async fn relay(mut answer: reqwest::Response) -> Result<Response, Problem> {
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut body = Vec::new();
    loop {
        let chunk = answer.chunk().await.map_err(|_| {
            Problem::new(StatusCode::BAD_GATEWAY, "VictoriaMetrics' answer broke off")
        })?;
        let Some(chunk) = chunk else { break };
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "the answer is larger than {MAX_ANSWER_BYTES} bytes: narrow the query or the range"
                ),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((
        status,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(body),
    )
        .into_response())
}

macro_rules! query_routes {
    ($get:ident, $post:ident, $path:literal, $summary:literal, $range:expr) => {
        #[doc = $summary]
        #[utoipa::path(get, path = $path, tag = "metrics",
            params(("project" = Option<String>, Query, description = "The project (default: the token's only project)")),
            responses((status = 200, description = "Prometheus query API answer (from VictoriaMetrics)", content_type = "application/json"),
                      (status = 400, description = "Out of bounds, or VictoriaMetrics refused the query", body = Problem, content_type = "application/problem+json"),
                      (status = 404, description = "The project is not the token's", body = Problem, content_type = "application/problem+json"),
                      (status = 501, description = "No VictoriaMetrics configured", body = Problem, content_type = "application/problem+json")))]
        pub async fn $get(
            State(state): State<AppState>,
            Extension(principal): Extension<Principal>,
            RawQuery(raw): RawQuery,
        ) -> Result<Response, Problem> {
            let api = $path.to_owned();
            forward(state, principal, api, raw, HeaderMap::new(), Bytes::new(), $range).await
        }

        #[doc = $summary]
        /// Parameters may also come in a form body, as Grafana sends them.
        #[utoipa::path(post, path = $path, tag = "metrics",
            request_body(description = "The parameters, form-encoded", content((String = "application/x-www-form-urlencoded"))),
            params(("project" = Option<String>, Query, description = "The project (default: the token's only project)")),
            responses((status = 200, description = "Prometheus query API answer (from VictoriaMetrics)", content_type = "application/json"),
                      (status = 400, description = "Out of bounds, or VictoriaMetrics refused the query", body = Problem, content_type = "application/problem+json"),
                      (status = 404, description = "The project is not the token's", body = Problem, content_type = "application/problem+json"),
                      (status = 501, description = "No VictoriaMetrics configured", body = Problem, content_type = "application/problem+json")))]
        pub async fn $post(
            State(state): State<AppState>,
            Extension(principal): Extension<Principal>,
            RawQuery(raw): RawQuery,
            headers: HeaderMap,
            body: Bytes,
        ) -> Result<Response, Problem> {
            let api = $path.to_owned();
            forward(state, principal, api, raw, headers, body, $range).await
        }
    };
}

query_routes!(
    query_get,
    query_post,
    "/api/v1/query",
    "Instant PromQL/MetricsQL query, limited to the token's project.",
    false
);
query_routes!(
    range_get,
    range_post,
    "/api/v1/query_range",
    "Range query, limited to the token's project.",
    true
);
query_routes!(
    labels_get,
    labels_post,
    "/api/v1/labels",
    "Label names of the project's series.",
    false
);
query_routes!(
    series_get,
    series_post,
    "/api/v1/series",
    "Series of the project matching `match[]`.",
    false
);

/// Values of one label over the project's series.
#[utoipa::path(get, path = "/api/v1/label/{name}/values", tag = "metrics",
    params(("name" = String, Path, description = "Label name"),
           ("project" = Option<String>, Query, description = "The project (default: the token's only project)")),
    responses((status = 200, description = "Prometheus label values answer", content_type = "application/json"),
              (status = 404, description = "The project is not the token's", body = Problem, content_type = "application/problem+json")))]
pub async fn label_values(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, Problem> {
    let valid = !name.is_empty()
        && name.len() <= 256
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid {
        return Err(Problem::bad_request("a label name is [a-zA-Z0-9_]{1,256}"));
    }
    let api = format!("/api/v1/label/{name}/values");
    forward(
        state,
        principal,
        api,
        raw,
        HeaderMap::new(),
        Bytes::new(),
        false,
    )
    .await
}

/// Whether `method` on `route` is one of this module's.
pub fn is_route(method: &Method, route: &str) -> bool {
    match route {
        "/api/v1/query" | "/api/v1/query_range" | "/api/v1/labels" | "/api/v1/series" => {
            method == Method::GET || method == Method::POST
        }
        "/api/v1/label/{name}/values" => method == Method::GET,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn ranges_steps_and_sizes_are_bounded() {
        let ok = p(&[
            ("query", "up"),
            ("start", "0"),
            ("end", "3600"),
            ("step", "15s"),
        ]);
        assert!(check_bounds(&ok, true).is_ok());
        let rfc = p(&[
            ("query", "up"),
            ("start", "2026-01-01T00:00:00Z"),
            ("end", "2026-01-01T01:00:00Z"),
            ("step", "1m"),
        ]);
        assert!(check_bounds(&rfc, true).is_ok());
        for bad in [
            p(&[
                ("query", "up"),
                ("start", "0"),
                ("end", "3600"),
                ("step", "0.1"),
            ]),
            p(&[
                ("query", "up"),
                ("start", "0"),
                ("end", "99999999"),
                ("step", "3600"),
            ]),
            p(&[
                ("query", "up"),
                ("start", "10"),
                ("end", "0"),
                ("step", "1"),
            ]),
            p(&[("query", "up"), ("start", "0"), ("end", "60")]),
            p(&[("query", &"(".repeat(100))]),
            p(&[("query", &"x".repeat(MAX_QUERY_BYTES + 1))]),
        ] {
            assert!(check_bounds(&bad, true).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_namespace_regex_matches_only_the_names() {
        let names = vec!["acme".to_owned(), "acme.prod".to_owned()];
        assert_eq!(quoted(&alternation(&names)), r#""acme|acme\\.prod""#);
    }
}
