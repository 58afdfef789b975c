//! Reading instance logs, scoped to the caller's projects: Tally's own
//! `GET /api/v1/projects/{project}/instances/{instance}/logs` (what
//! `tally logs` calls; `follow=true` streams NDJSON), and the subset of
//! Loki's HTTP API Grafana's Loki datasource sends (`query_range`,
//! `labels`, `label/{name}/values`), with [`tally_logstore::logql`].
//!
//! A project the caller may not read answers 404, as if it had no logs;
//! operators read every project. Reads run off the async workers and stop
//! at the store's scan budget (`truncated`). Followers are bounded
//! (`InstanceLogs::followers`, 429 past it); a follower is woken by each
//! commit of the store and reads what is after its position, so a line is
//! shown as soon as it is durable.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Extension;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use jiff::Timestamp;
use serde_json::{Value, json};
use tally_logstore::logql::{self, LogQl};
use tally_logstore::{LineFilter, LogLine, LogPage, LogQuery, Position, Stream};

use crate::instance_logs::{InstanceLogs, problem};
use crate::problem::Problem;
use crate::query::Params;
use crate::{AppState, Principal};

/// Most lines one answer carries.
pub const MAX_LIMIT: usize = 10_000;
const DEFAULT_LIMIT: usize = 1000;
/// How often a follower with nothing new sends a heartbeat (an empty
/// line), so a gone client is noticed.
const HEARTBEAT: Duration = Duration::from_secs(10);

fn logs(state: &AppState) -> Result<&InstanceLogs, Problem> {
    state
        .logs
        .as_ref()
        .ok_or_else(|| Problem::new(StatusCode::NOT_FOUND, "this server keeps no instance logs"))
}

fn may_read(principal: &Principal, project: &str) -> bool {
    principal.is_admin() || principal.projects().any(|p| p == project)
}

fn not_found(project: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        format!("project {project:?} has no instance logs this token may read"),
    )
}

fn nanos(t: Timestamp) -> i64 {
    i64::try_from(t.as_nanosecond()).unwrap_or(i64::MAX)
}

/// `since`: a duration back from now (`1h`, `30m`) or an RFC 3339 time.
fn since(text: &str, now: Timestamp) -> Result<i64, Problem> {
    if let Ok(t) = text.parse::<Timestamp>() {
        return Ok(nanos(t));
    }
    let d: jiff::SignedDuration = text.parse().map_err(|_| {
        Problem::bad_request(format!(
            "since={text:?} is neither a duration (1h, 30m) nor an RFC 3339 time"
        ))
    })?;
    Ok(nanos(now).saturating_sub(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)))
}

/// Read instance logs.
///
/// The lines of one instance of a project, oldest first: the newest
/// `limit` (default 1000, at most 10000) since `since` (a duration back
/// from now, default `1h`, or an RFC 3339 time) and before `until`,
/// of `stream` (`stdout`, `stderr`) containing every `grep` text. With
/// `follow=true` the answer is NDJSON (`application/x-ndjson`): those
/// lines, then every new line as it is stored, until the client leaves
/// (an empty line every 10 s keeps the connection alive). A project the
/// token may not read answers 404.
#[utoipa::path(
    get, path = "/api/v1/projects/{project}/instances/{instance}/logs", tag = "logs",
    params(
        ("project" = String, Path, description = "The project"),
        ("instance" = String, Path, description = "The instance's name"),
        ("since" = Option<String>, Query, description = "A duration back from now (`1h`) or an RFC 3339 time; default `1h`"),
        ("until" = Option<String>, Query, description = "An RFC 3339 time; default now (not with follow)"),
        ("stream" = Option<String>, Query, description = "`stdout` or `stderr`"),
        ("grep" = Option<Vec<String>>, Query, description = "Only lines containing this text (repeatable: all must hold)"),
        ("limit" = Option<usize>, Query, description = "At most this many lines (the newest), default 1000, at most 10000"),
        ("follow" = Option<bool>, Query, description = "Stream new lines as NDJSON"),
    ),
    responses(
        (status = 200, description = "`{lines: [{time, stream, line}], truncated}`, or NDJSON lines when following", content_type = "application/json"),
        (status = 400, description = "A bad parameter", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such project for this token, or no instance logs on this server", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many followers; retry after `Retry-After`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn instance_logs(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((project, instance)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, Problem> {
    let logs = logs(&state)?.clone();
    if !may_read(&principal, &project) {
        return Err(not_found(&project));
    }
    let p = Params::parse(raw.as_deref())?;
    p.only(&["since", "until", "stream", "grep", "limit", "follow"])?;
    let now = Timestamp::now();
    let follow = p
        .parsed::<bool>("follow", "true or false")?
        .unwrap_or(false);
    let query = LogQuery {
        project,
        instances: vec![instance],
        stream: p
            .one("stream")?
            .map(|s| {
                Stream::parse(&s).ok_or_else(|| Problem::bad_request("stream is stdout or stderr"))
            })
            .transpose()?,
        since_nanos: since(p.one("since")?.as_deref().unwrap_or("1h"), now)?,
        until_nanos: match p.timestamp("until")? {
            Some(_) if follow => {
                return Err(Problem::bad_request("until and follow exclude each other"));
            }
            Some(t) => nanos(t),
            None => i64::MAX,
        },
        filters: p
            .all("grep")
            .iter()
            .map(|g| LineFilter::text(g, false).map_err(|e| Problem::bad_request(e.to_string())))
            .collect::<Result<_, _>>()?,
        limit: p.number("limit")?.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT),
        newest_first: true,
        after: None,
    };
    let mut page = read(&logs, query.clone()).await?;
    page.lines.reverse();
    if follow {
        return follow_response(logs, query, page);
    }
    Ok(axum::Json(json!({
        "lines": page.lines.iter().map(line_json).collect::<Vec<_>>(),
        "truncated": page.truncated,
    }))
    .into_response())
}

fn line_json(l: &LogLine) -> Value {
    let time = Timestamp::from_nanosecond(i128::from(l.time_nanos))
        .map(|t| t.to_string())
        .unwrap_or_default();
    json!({"time": time, "instance": l.instance, "stream": l.stream.as_str(), "line": l.line})
}

/// Runs `query` on the blocking pool.
pub(crate) async fn read(logs: &InstanceLogs, query: LogQuery) -> Result<LogPage, Problem> {
    let store = std::sync::Arc::clone(&logs.store);
    tokio::task::spawn_blocking(move || store.read(&query))
        .await
        .map_err(|_| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "a log read failed"))?
        .map_err(problem)
}

/// A follower: the backlog, then new lines after the last position sent.
fn follow_response(
    logs: InstanceLogs,
    mut query: LogQuery,
    backlog: LogPage,
) -> Result<Response, Problem> {
    let permit = std::sync::Arc::clone(&logs.followers)
        .try_acquire_owned()
        .map_err(|_| {
            Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too many log followers at once",
            )
            .with_retry_after(5)
        })?;
    let mut changes = logs.store.subscribe();
    changes.borrow_and_update();
    query.after = Some(
        backlog
            .lines
            .last()
            .map_or(Position { block: 0, index: 0 }, |l| l.position),
    );
    query.newest_first = false;
    query.limit = MAX_LIMIT;
    let first = ndjson(&backlog.lines);
    let stream = futures::stream::unfold(
        (Some(first), logs, query, changes, permit),
        |(pending, logs, mut query, mut changes, permit)| async move {
            if let Some(first) = pending {
                return Some((
                    Ok::<_, std::io::Error>(first),
                    (None, logs, query, changes, permit),
                ));
            }
            let woken = tokio::time::timeout(HEARTBEAT, changes.changed()).await;
            if matches!(woken, Ok(Err(_))) {
                return None; // the store stopped
            }
            let chunk = match read(&logs, query.clone()).await {
                Ok(page) => {
                    if let Some(last) = page.lines.last() {
                        query.after = Some(last.position);
                    }
                    ndjson(&page.lines)
                }
                Err(_) => return None,
            };
            let chunk = if chunk.is_empty() {
                "\n".to_owned()
            } else {
                chunk
            };
            Some((Ok(chunk), (None, logs, query, changes, permit)))
        },
    );
    let mut response = Body::from_stream(stream).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(response)
}

fn ndjson(lines: &[LogLine]) -> String {
    let mut out = String::new();
    for l in lines {
        out.push_str(&line_json(l).to_string());
        out.push('\n');
    }
    out
}

/// Loki's times: RFC 3339, float seconds, or an integer (seconds if at
/// most 10 digits, else nanoseconds), as Loki reads them.
fn loki_time(text: &str) -> Result<i64, Problem> {
    if let Ok(t) = text.parse::<Timestamp>() {
        return Ok(nanos(t));
    }
    if text.contains('.') {
        let secs: f64 = text
            .parse()
            .map_err(|_| Problem::bad_request(format!("{text:?} is not a time")))?;
        return Ok((secs * 1e9) as i64);
    }
    let n: i64 = text
        .parse()
        .map_err(|_| Problem::bad_request(format!("{text:?} is not a time")))?;
    Ok(if text.trim_start_matches('-').len() <= 10 {
        n.saturating_mul(1_000_000_000)
    } else {
        n
    })
}

fn parse_logql(text: &str) -> Result<LogQl, Problem> {
    logql::parse(text).map_err(|e| Problem::bad_request(e.to_string()))
}

/// The project a Loki request reads: its selector's `project="..."`, else
/// the token's only project.
fn loki_project(principal: &Principal, selector: Option<&LogQl>) -> Result<String, Problem> {
    if let Some(p) = selector.and_then(|s| s.equal("project")) {
        return if may_read(principal, p) {
            Ok(p.to_owned())
        } else {
            Err(not_found(p))
        };
    }
    let mut mine = principal.projects();
    match (mine.next(), mine.next()) {
        (Some(p), None) => Ok(p.to_owned()),
        _ => Err(Problem::bad_request(
            "name the project in the selector: {project=\"...\", ...}",
        )),
    }
}

/// The labels of an instance's streams.
fn labels<'a>(
    project: &'a str,
    instance: &'a str,
    workload: &'a str,
    stream: &'a str,
) -> [(&'a str, &'a str); 4] {
    [
        ("project", project),
        ("instance", instance),
        ("workload", workload),
        ("stream", stream),
    ]
}

/// Query logs (Loki).
///
/// Loki's `query_range` for Grafana: `query` is a stream selector over the
/// labels `project`, `instance`, `workload`, `stream` with line filters
/// (`|=`, `!=`, `|~`, `!~`); `start`, `end` (ns, s or RFC 3339; default the
/// last hour), `limit` (default 100, at most 10000), `direction`
/// (`backward`, default, or `forward`). The project is the selector's
/// `project="..."` or the token's only project. Answers `streams`.
#[utoipa::path(
    get, path = "/loki/api/v1/query_range", tag = "logs",
    params(
        ("query" = String, Query, description = "LogQL subset: selector and line filters"),
        ("start" = Option<String>, Query, description = "Start (ns, s or RFC 3339)"),
        ("end" = Option<String>, Query, description = "End (ns, s or RFC 3339)"),
        ("limit" = Option<usize>, Query, description = "Most lines"),
        ("direction" = Option<String>, Query, description = "`backward` or `forward`"),
    ),
    responses(
        (status = 200, description = "Loki's `{status, data: {resultType: streams, result}}`", content_type = "application/json"),
        (status = 400, description = "Not in the subset, or a bad parameter", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "A project this token may not read", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn loki_query_range(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    RawQuery(raw): RawQuery,
) -> Result<Response, Problem> {
    let logs = logs(&state)?.clone();
    let p = Params::parse(raw.as_deref())?;
    let text = p
        .one("query")?
        .ok_or_else(|| Problem::bad_request("query is required"))?;
    let selector = parse_logql(&text)?;
    let project = loki_project(&principal, Some(&selector))?;
    let now = nanos(Timestamp::now());
    let end = p
        .one("end")?
        .map(|t| loki_time(&t))
        .transpose()?
        .unwrap_or(now);
    let start = p
        .one("start")?
        .map(|t| loki_time(&t))
        .transpose()?
        .unwrap_or(end.saturating_sub(3_600_000_000_000));
    let backward = p.one("direction")?.is_none_or(|d| d != "forward");
    let (selected, workloads) = select(&logs, &project, &selector).await?;
    let page = if selected.is_empty() {
        LogPage::default()
    } else {
        read(
            &logs,
            LogQuery {
                project: project.clone(),
                instances: selected,
                stream: None,
                since_nanos: start,
                until_nanos: end,
                after: None,
                filters: selector.filters.clone(),
                limit: p.number("limit")?.unwrap_or(100).min(MAX_LIMIT),
                newest_first: backward,
            },
        )
        .await?
    };
    let result = streams(&project, &selector, &workloads, &page.lines);
    Ok(axum::Json(json!({
        "status": "success",
        "data": {"resultType": "streams", "result": result, "stats": {}},
    }))
    .into_response())
}

/// The instances of `project` the selector may match, and each one's
/// workload.
async fn select(
    logs: &InstanceLogs,
    project: &str,
    selector: &LogQl,
) -> Result<(Vec<String>, BTreeMap<String, String>), Problem> {
    let store = std::sync::Arc::clone(&logs.store);
    let scoped = project.to_owned();
    let instances = tokio::task::spawn_blocking(move || store.instances(Some(&scoped)))
        .await
        .map_err(|_| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "a log read failed"))?
        .map_err(problem)?;
    let selected = instances
        .iter()
        .filter(|(_, i)| {
            let w = i.workload.as_deref().unwrap_or("");
            // Streams are told apart line by line; any stream may match here.
            ["stdout", "stderr"]
                .iter()
                .any(|s| selector.selects(&labels(project, &i.instance, w, s)))
        })
        .map(|(_, i)| i.instance.clone())
        .collect();
    let workloads = instances
        .into_iter()
        .map(|(_, i)| (i.instance, i.workload.unwrap_or_default()))
        .collect();
    Ok((selected, workloads))
}

/// Lines grouped into Loki streams (one per label set), in the order given.
fn streams(
    project: &str,
    selector: &LogQl,
    workloads: &BTreeMap<String, String>,
    lines: &[LogLine],
) -> Vec<Value> {
    let mut order: Vec<(String, Stream)> = Vec::new();
    let mut values: BTreeMap<(String, Stream), Vec<Value>> = BTreeMap::new();
    for l in lines {
        let workload = workloads.get(&l.instance).map_or("", String::as_str);
        if !selector.selects(&labels(project, &l.instance, workload, l.stream.as_str())) {
            continue;
        }
        let key = (l.instance.clone(), l.stream);
        let entry = values.entry(key.clone()).or_default();
        if entry.is_empty() {
            order.push(key);
        }
        entry.push(json!([l.time_nanos.to_string(), l.line]));
    }
    order
        .into_iter()
        .map(|key| {
            let workload = workloads.get(&key.0).map_or("", String::as_str);
            let mut stream =
                json!({"project": project, "instance": key.0, "stream": key.1.as_str()});
            if !workload.is_empty() {
                stream["workload"] = json!(workload);
            }
            json!({"stream": stream, "values": values.remove(&key).unwrap_or_default()})
        })
        .collect()
}

/// Label names (Loki).
///
/// The label names of instance log streams: `project`, `instance`,
/// `workload`, `stream`.
#[utoipa::path(
    get, path = "/loki/api/v1/labels", tag = "logs",
    responses((status = 200, description = "Loki's `{status, data: [names]}`", content_type = "application/json")),
    security(("bearer" = []))
)]
pub async fn loki_labels(State(state): State<AppState>) -> Result<Response, Problem> {
    logs(&state)?;
    Ok(axum::Json(json!({
        "status": "success",
        "data": ["instance", "project", "stream", "workload"],
    }))
    .into_response())
}

/// Label values (Loki).
///
/// The values of one label among the streams the token may read (for the
/// project named by `query`'s selector, or the token's only project; an
/// operator without either sees every project's).
#[utoipa::path(
    get, path = "/loki/api/v1/label/{name}/values", tag = "logs",
    params(
        ("name" = String, Path, description = "A label name"),
        ("query" = Option<String>, Query, description = "A stream selector narrowing the streams"),
    ),
    responses(
        (status = 200, description = "Loki's `{status, data: [values]}`", content_type = "application/json"),
        (status = 404, description = "A project this token may not read", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn loki_label_values(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, Problem> {
    let logs = logs(&state)?.clone();
    let p = Params::parse(raw.as_deref())?;
    let selector = p.one("query")?.map(|q| parse_logql(&q)).transpose()?;
    let project = match loki_project(&principal, selector.as_ref()) {
        Ok(p) => Some(p),
        Err(_) if principal.is_admin() => None,
        Err(e) => return Err(e),
    };
    let store = std::sync::Arc::clone(&logs.store);
    let instances = tokio::task::spawn_blocking(move || store.instances(project.as_deref()))
        .await
        .map_err(|_| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "a log read failed"))?
        .map_err(problem)?;
    let mut values = std::collections::BTreeSet::new();
    for (project, i) in &instances {
        for stream in ["stdout", "stderr"] {
            let w = i.workload.as_deref().unwrap_or("");
            let l = labels(project, &i.instance, w, stream);
            if selector.as_ref().is_some_and(|s| !s.selects(&l)) {
                continue;
            }
            if let Some((_, v)) = l.iter().find(|(n, _)| *n == name)
                && !v.is_empty()
            {
                values.insert((*v).to_owned());
            }
        }
    }
    Ok(axum::Json(json!({"status": "success", "data": values})).into_response())
}

/// Tail logs (Loki, websocket).
///
/// Loki's live tail as Grafana opens it: a websocket upgrade of
/// `GET /loki/api/v1/tail?query=...&start=...&limit=...`; each message is
/// `{"streams": [{"stream": {labels}, "values": [[ns, line]]}]}`: first
/// the lines since `start` (default: the last hour; at most `limit`,
/// default 100), then new ones as they are stored.
#[utoipa::path(
    get, path = "/loki/api/v1/tail", tag = "logs",
    params(
        ("query" = String, Query, description = "LogQL subset: selector and line filters"),
        ("start" = Option<String>, Query, description = "Start (ns, s or RFC 3339)"),
        ("limit" = Option<usize>, Query, description = "Most lines of the first message"),
        ("delay_for" = Option<String>, Query, description = "Accepted and ignored: lines are sent once durable"),
    ),
    responses(
        (status = 101, description = "A websocket of Loki tail messages"),
        (status = 400, description = "Not in the subset, or a bad parameter", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "A project this token may not read", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many followers; retry after `Retry-After`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn loki_tail(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    RawQuery(raw): RawQuery,
    upgrade: axum::extract::ws::WebSocketUpgrade,
) -> Result<Response, Problem> {
    let logs = logs(&state)?.clone();
    let p = Params::parse(raw.as_deref())?;
    let text = p
        .one("query")?
        .ok_or_else(|| Problem::bad_request("query is required"))?;
    let selector = parse_logql(&text)?;
    let project = loki_project(&principal, Some(&selector))?;
    let now = nanos(Timestamp::now());
    let start = p
        .one("start")?
        .map(|t| loki_time(&t))
        .transpose()?
        .unwrap_or(now.saturating_sub(3_600_000_000_000));
    let limit = p.number("limit")?.unwrap_or(100).min(MAX_LIMIT);
    let permit = std::sync::Arc::clone(&logs.followers)
        .try_acquire_owned()
        .map_err(|_| {
            Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too many log followers at once",
            )
            .with_retry_after(5)
        })?;
    let tail = Tail {
        logs,
        project,
        selector,
        start,
        limit,
    };
    Ok(upgrade.on_upgrade(move |socket| async move {
        let _permit = permit;
        if let Err(e) = tail.run(socket).await {
            tracing::debug!(error = %e.detail, "a log tail ended");
        }
    }))
}

/// One live tail.
struct Tail {
    logs: InstanceLogs,
    project: String,
    selector: LogQl,
    start: i64,
    limit: usize,
}

impl Tail {
    async fn run(self, mut socket: axum::extract::ws::WebSocket) -> Result<(), Problem> {
        use axum::extract::ws::Message;
        let mut changes = self.logs.store.subscribe();
        changes.borrow_and_update();
        let (instances, workloads) = select(&self.logs, &self.project, &self.selector).await?;
        let mut query = LogQuery {
            project: self.project.clone(),
            instances,
            stream: None,
            since_nanos: self.start,
            until_nanos: i64::MAX,
            after: None,
            filters: self.selector.filters.clone(),
            limit: self.limit,
            newest_first: true,
        };
        let mut page = if query.instances.is_empty() {
            LogPage::default()
        } else {
            read(&self.logs, query.clone()).await?
        };
        page.lines.reverse();
        let mut after = page
            .lines
            .iter()
            .map(|l| l.position)
            .max()
            .unwrap_or_default();
        let mut workloads = workloads;
        let mut lines = page.lines;
        query.newest_first = false;
        query.limit = MAX_LIMIT;
        query.since_nanos = i64::MIN;
        loop {
            if !lines.is_empty() {
                let result = streams(&self.project, &self.selector, &workloads, &lines);
                let message = json!({"streams": result, "dropped_entries": null}).to_string();
                let sent = socket.send(Message::Text(message.into())).await;
                if sent.is_err() {
                    return Ok(());
                }
            }
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
                incoming = socket.recv() => match incoming {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Ok(()),
                    Some(Ok(_)) => {
                        lines = Vec::new();
                        continue;
                    }
                },
                () = tokio::time::sleep(HEARTBEAT) => {
                    if socket.send(Message::Ping(Vec::new().into())).await.is_err() {
                        return Ok(());
                    }
                    lines = Vec::new();
                    continue;
                }
            }
            // Instances that appeared since are followed too.
            let (instances, now_workloads) =
                select(&self.logs, &self.project, &self.selector).await?;
            query.instances = instances;
            workloads = now_workloads;
            query.after = Some(after);
            lines = if query.instances.is_empty() {
                Vec::new()
            } else {
                read(&self.logs, query.clone()).await?.lines
            };
            if let Some(last) = lines.iter().map(|l| l.position).max() {
                after = after.max(last);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loki_times_read_like_loki() {
        assert_eq!(loki_time("1700000000").unwrap(), 1_700_000_000_000_000_000);
        assert_eq!(
            loki_time("1700000000000000000").unwrap(),
            1_700_000_000_000_000_000
        );
        assert_eq!(
            loki_time("1700000000.5").unwrap(),
            1_700_000_000_500_000_000
        );
        assert_eq!(
            loki_time("2023-11-14T22:13:20Z").unwrap(),
            1_700_000_000_000_000_000
        );
        assert!(loki_time("yesterday").is_err());
    }
}
