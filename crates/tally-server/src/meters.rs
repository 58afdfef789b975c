//! The OpenMeter meter API: `/api/v1/meters` and `/api/v1/meters/{slug}/query`.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use jiff::tz::TimeZone;
use jiff::{Timestamp, Unit};
use serde::Serialize;
use tally_ledger::{ApplyMode, LedgerError, MeterQuery, QueryRow};
use tally_meter::{WindowSize, decimal_to_json};
use tally_model::{Kind, Manifest, MeterDefinition, OpenMeterMeter};

use crate::problem::Problem;
use crate::query::Params;
use crate::{AppState, Principal};

fn view(manifest: &Manifest) -> Result<OpenMeterMeter, Problem> {
    let def = MeterDefinition::from_manifest(manifest).map_err(LedgerError::from)?;
    Ok(OpenMeterMeter::from_definition(&manifest.metadata, &def))
}

/// The meter named by its slug or by its id (the MeterDefinition's uid).
async fn resolve(state: &AppState, id_or_slug: &str) -> Result<Manifest, Problem> {
    match state
        .ledger
        .get(Kind::MeterDefinition, id_or_slug.to_owned())
        .await
    {
        Err(LedgerError::NotFound { .. }) => {
            let all = state.ledger.list(Kind::MeterDefinition).await?;
            all.into_iter()
                .find(|m| m.metadata.uid.as_deref() == Some(id_or_slug))
                .ok_or_else(|| LedgerError::not_found(Kind::MeterDefinition, id_or_slug).into())
        }
        other => Ok(other?),
    }
}

/// List meters (OpenMeter view of every `MeterDefinition`).
#[utoipa::path(get, path = "/api/v1/meters", tag = "meters",
    params(("page" = Option<usize>, Query, description = "Page, from 1 (with pageSize)"),
           ("pageSize" = Option<usize>, Query, description = "Meters per page, at most 1000 (default: all)"),
           ("order" = Option<String>, Query, description = "ASC (default) or DESC"),
           ("orderBy" = Option<String>, Query, description = "key (default), name, aggregation, createdAt, updatedAt"),
           ("includeDeleted" = Option<bool>, Query, description = "Only false: Tally keeps no deleted meters")),
    responses((status = 200, description = "Meters", body = Vec<crate::schemas::Meter>)))]
pub async fn list(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Vec<OpenMeterMeter>>, Problem> {
    let p = Params::parse(raw.as_deref())?;
    p.only(&["page", "pageSize", "order", "orderBy", "includeDeleted"])?;
    if p.parsed::<bool>("includeDeleted", "true or false")? == Some(true) {
        return Err(Problem::bad_request(
            "includeDeleted=true is not supported: Tally keeps no deleted meters",
        ));
    }
    let manifests = state.ledger.list(Kind::MeterDefinition).await?;
    let mut meters: Vec<OpenMeterMeter> = manifests.iter().map(view).collect::<Result<_, _>>()?;
    sort_meters(&mut meters, &p)?;
    let page = p.number("page")?.unwrap_or(1);
    if page == 0 {
        return Err(Problem::bad_request("page counts from 1"));
    }
    if let Some(size) = p.number("pageSize")? {
        let size = size.clamp(1, 1000);
        meters = meters
            .into_iter()
            .skip((page - 1).saturating_mul(size))
            .take(size)
            .collect();
    } else if page > 1 {
        meters.clear();
    }
    Ok(Json(meters))
}

/// Orders meters by `orderBy` (key, name, aggregation, createdAt,
/// updatedAt; default key) and `order` (ASC, DESC).
fn sort_meters(meters: &mut [OpenMeterMeter], p: &Params) -> Result<(), Problem> {
    let by = p.one("orderBy")?.unwrap_or_else(|| "key".into());
    match by.as_str() {
        "key" => meters.sort_by(|a, b| a.slug.cmp(&b.slug)),
        "name" => meters.sort_by(|a, b| (&a.name, &a.slug).cmp(&(&b.name, &b.slug))),
        "aggregation" => meters.sort_by_key(|m| (m.aggregation.to_string(), m.slug.clone())),
        "createdAt" => meters.sort_by_key(|m| (m.created_at, m.slug.clone())),
        "updatedAt" => meters.sort_by_key(|m| (m.updated_at, m.slug.clone())),
        other => {
            return Err(Problem::bad_request(format!(
                "orderBy={other:?}: use key, name, aggregation, createdAt or updatedAt"
            )));
        }
    }
    match p.one("order")?.map(|o| o.to_ascii_uppercase()).as_deref() {
        None | Some("ASC") => {}
        Some("DESC") => meters.reverse(),
        Some(other) => {
            return Err(Problem::bad_request(format!(
                "order={other:?}: use ASC or DESC"
            )));
        }
    }
    Ok(())
}

/// One meter, by slug or id.
#[utoipa::path(get, path = "/api/v1/meters/{slug}", tag = "meters",
    params(("slug" = String, Path, description = "The meter's slug (the MeterDefinition's name) or id (its uid)")),
    responses((status = 200, description = "The meter", body = crate::schemas::Meter),
              (status = 404, description = "No such meter", body = Problem, content_type = "application/problem+json")))]
pub async fn get(
    State(state): State<AppState>,
    Path(slug): Path<String>,
) -> Result<Json<OpenMeterMeter>, Problem> {
    Ok(Json(view(&resolve(&state, &slug).await?)?))
}

/// Create a meter. Events already stored are backfilled.
#[utoipa::path(post, path = "/api/v1/meters", tag = "meters",
    request_body(content = crate::schemas::MeterCreate, content_type = "application/json"),
    responses((status = 201, description = "Created", body = crate::schemas::Meter),
              (status = 400, description = "Invalid meter", body = Problem, content_type = "application/problem+json"),
              (status = 409, description = "A meter with this slug exists", body = Problem, content_type = "application/problem+json")))]
pub async fn create(
    State(state): State<AppState>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<OpenMeterMeter>), Problem> {
    let meter: OpenMeterMeter = serde_json::from_slice(&body)
        .map_err(|e| Problem::bad_request(format!("not a meter: {e}")))?;
    if let Some(field) = meter.unsupported() {
        return Err(Problem::bad_request(format!(
            "`{field}` is not supported by Tally; leave it out"
        )));
    }
    let applied = state
        .ledger
        .apply(meter.to_manifest(), ApplyMode::CreateOnly)
        .await?;
    Ok((StatusCode::CREATED, Json(view(&applied.manifest)?)))
}

/// What `PUT /api/v1/meters/{slug}` takes (OpenMeter's `MeterUpdate`).
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MeterUpdate {
    name: Option<String>,
    description: Option<String>,
    group_by: Option<std::collections::BTreeMap<String, String>>,
    metadata: Option<serde_json::Value>,
}

/// Update a meter's name, description and group-by (the catalog's rules
/// apply: a Published meter keeps its meaning).
#[utoipa::path(put, path = "/api/v1/meters/{slug}", tag = "meters",
    params(("slug" = String, Path, description = "The meter's slug or id")),
    request_body(content = crate::schemas::MeterUpdate, content_type = "application/json"),
    responses((status = 200, description = "The updated meter", body = crate::schemas::Meter),
              (status = 400, description = "Invalid update", body = Problem, content_type = "application/problem+json"),
              (status = 404, description = "No such meter", body = Problem, content_type = "application/problem+json"),
              (status = 409, description = "The catalog's rules refuse the change", body = Problem, content_type = "application/problem+json")))]
pub async fn update(
    State(state): State<AppState>,
    Path(slug): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<OpenMeterMeter>, Problem> {
    let change: MeterUpdate = serde_json::from_slice(&body)
        .map_err(|e| Problem::bad_request(format!("not a meter update: {e}")))?;
    if change
        .metadata
        .as_ref()
        .is_some_and(|m| !(m.is_null() || m.as_object().is_some_and(|o| o.is_empty())))
    {
        return Err(Problem::bad_request(
            "`metadata` is not supported by Tally; leave it out",
        ));
    }
    let mut manifest = resolve(&state, &slug).await?;
    let mut def = MeterDefinition::from_manifest(&manifest).map_err(LedgerError::from)?;
    def.display_name = change.name;
    def.description = change.description;
    if let Some(group_by) = change.group_by {
        def.event.dimensions = group_by;
    }
    manifest.spec = serde_json::to_value(&def)
        .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    manifest.status = None;
    let applied = state.ledger.apply(manifest, ApplyMode::Upsert).await?;
    Ok(Json(view(&applied.manifest)?))
}

/// Delete a meter (Draft or Retired only).
#[utoipa::path(delete, path = "/api/v1/meters/{slug}", tag = "meters",
    params(("slug" = String, Path, description = "The meter's slug or id")),
    responses((status = 204, description = "Deleted"),
              (status = 404, description = "No such meter", body = Problem, content_type = "application/problem+json"),
              (status = 409, description = "Published or Deprecated meters cannot be deleted", body = Problem, content_type = "application/problem+json")))]
pub async fn delete(
    State(state): State<AppState>,
    Path(slug): Path<String>,
) -> Result<StatusCode, Problem> {
    let manifest = resolve(&state, &slug).await?;
    state
        .ledger
        .delete(Kind::MeterDefinition, manifest.metadata.name)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A meter query as either form asks it.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct QueryInput {
    /// Accepted and ignored: OpenMeter tracks a query's progress by it.
    #[serde(default)]
    client_id: Option<String>,
    from: Option<Timestamp>,
    to: Option<Timestamp>,
    window_size: Option<String>,
    window_time_zone: Option<String>,
    #[serde(default)]
    subject: Vec<String>,
    #[serde(default)]
    group_by: Vec<String>,
    #[serde(default)]
    filter_group_by: std::collections::BTreeMap<String, Vec<String>>,
    #[serde(default)]
    filter_customer_id: Vec<String>,
    limit: Option<usize>,
    cursor: Option<String>,
    /// Tally's extension: only the `top` largest subjects, the rest merged.
    top: Option<usize>,
}

const QUERY_PARAMS: [&str; 12] = [
    "from",
    "to",
    "windowSize",
    "windowTimeZone",
    "subject",
    "groupBy",
    "filterGroupBy",
    "filterCustomerId",
    "clientId",
    "limit",
    "cursor",
    "top",
];

impl QueryInput {
    fn from_params(p: &Params) -> Result<QueryInput, Problem> {
        p.only(&QUERY_PARAMS)?;
        Ok(QueryInput {
            client_id: p.one("clientId")?,
            from: p.timestamp("from")?,
            to: p.timestamp("to")?,
            window_size: p.one("windowSize")?,
            window_time_zone: p.one("windowTimeZone")?,
            subject: p.list("subject"),
            group_by: p.list("groupBy"),
            filter_group_by: filter_group_by(p)?,
            filter_customer_id: p.list("filterCustomerId"),
            limit: p.number("limit")?,
            cursor: p.one("cursor")?,
            top: p.number("top")?,
        })
    }
}

/// `filterGroupBy[key]=value`, or one `filterGroupBy` holding the whole
/// map ([`crate::query::string_map`]); a key given both ways is refused.
fn filter_group_by(p: &Params) -> Result<std::collections::BTreeMap<String, Vec<String>>, Problem> {
    let mut filters = p.bracketed("filterGroupBy")?;
    if let Some(whole) = p.one("filterGroupBy")? {
        for (key, value) in crate::query::string_map("filterGroupBy", &whole)? {
            if filters.insert(key.clone(), value).is_some() {
                return Err(Problem::bad_request(format!(
                    "filterGroupBy names {key:?} twice"
                )));
            }
        }
    }
    Ok(filters.into_iter().map(|(k, v)| (k, vec![v])).collect())
}

/// Query a meter over windows.
#[utoipa::path(get, path = "/api/v1/meters/{slug}/query", tag = "meters",
    params(
        ("slug" = String, Path, description = "The meter's slug or id"),
        ("from" = Option<String>, Query, description = "Start, inclusive, RFC 3339 of any precision (default: the start of the first day, UTC, with stored usage; with none, 30 days before `to`)"),
        ("to" = Option<String>, Query, description = "End, exclusive, RFC 3339 of any precision (default: now, rounded up to the minute)"),
        ("windowSize" = Option<String>, Query, description = "MINUTE, HOUR, DAY or MONTH; without it the whole range is one window"),
        ("windowTimeZone" = Option<String>, Query, description = "IANA time zone of the windows (default UTC)"),
        ("subject" = Option<Vec<String>>, Query, description = "Only these subjects (repeated or comma-separated); rows are then per subject"),
        ("groupBy" = Option<Vec<String>>, Query, description = "Dimensions to group by (repeated or comma-separated); `subject` groups by subject"),
        ("filterGroupBy[key]" = Option<String>, Query, description = "Only usage whose dimension `key` has this value"),
        ("clientId" = Option<String>, Query, description = "Accepted and ignored"),
        ("limit" = Option<usize>, Query, description = "Most rows to return; `nextCursor` continues"),
        ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page"),
        ("top" = Option<usize>, Query, description = "Tally's extension, with `groupBy=subject` alone and whole minutes: only the rows of the `top` (1 to 100) subjects of largest total over the range, and per window the rest merged in `other`; `subjects` counts them all. No paging"),
    ),
    responses((status = 200, description = "Rows, one per window and group; windows without usage are omitted", body = crate::schemas::MeterQueryResult),
              (status = 400, description = "Bad parameters", body = Problem, content_type = "application/problem+json"),
              (status = 404, description = "No such meter", body = Problem, content_type = "application/problem+json"),
              (status = 503, description = "The meter is still backfilling; retry after Retry-After", body = Problem, content_type = "application/problem+json")))]
pub async fn query(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(slug): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, Problem> {
    let input = QueryInput::from_params(&Params::parse(raw.as_deref())?)?;
    answer_query(&state, &principal, &slug, input).await
}

/// Query a meter over windows, the parameters in a JSON body.
#[utoipa::path(post, path = "/api/v1/meters/{slug}/query", tag = "meters",
    params(("slug" = String, Path, description = "The meter's slug or id")),
    request_body(content = crate::schemas::MeterQueryRequest, content_type = "application/json"),
    responses((status = 200, description = "Rows, one per window and group", body = crate::schemas::MeterQueryResult),
              (status = 400, description = "Bad parameters", body = Problem, content_type = "application/problem+json"),
              (status = 404, description = "No such meter", body = Problem, content_type = "application/problem+json"),
              (status = 503, description = "The meter is still backfilling", body = Problem, content_type = "application/problem+json")))]
pub async fn query_post(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(slug): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, Problem> {
    let input: QueryInput = serde_json::from_slice(&body)
        .map_err(|e| Problem::bad_request(format!("not a meter query: {e}")))?;
    answer_query(&state, &principal, &slug, input).await
}

/// The ledger's question for `input`, and the answer's head.
async fn meter_query(
    state: &AppState,
    principal: &Principal,
    slug: &str,
    input: QueryInput,
) -> Result<(MeterQuery, AnswerHead), Problem> {
    let _ = input.client_id;
    if !input.filter_customer_id.is_empty() {
        return Err(Problem::bad_request(
            "`filterCustomerId` is not supported: Tally does not serve OpenMeter customers; filter by `subject`",
        ));
    }
    let zone_name = input.window_time_zone.unwrap_or_else(|| "UTC".into());
    let time_zone = TimeZone::get(&zone_name).map_err(|_| {
        Problem::bad_request(format!(
            "windowTimeZone {zone_name:?} is not an IANA time zone"
        ))
    })?;
    let window_size: Option<WindowSize> = input
        .window_size
        .map(|w| w.parse().map_err(Problem::bad_request))
        .transpose()?;
    let now = Timestamp::now();
    // Now, rounded up to a whole minute, so usage up to this moment counts.
    let default_to = now
        .round(
            jiff::TimestampRound::new()
                .smallest(Unit::Minute)
                .mode(jiff::RoundMode::Ceil),
        )
        .unwrap_or(now);
    let mut subjects = input.subject;
    principal.restrict_subjects(&mut subjects)?;
    let to = input.to.unwrap_or(default_to);
    let from = match input.from {
        Some(from) => from,
        None => default_from(state, slug, to).await?,
    };
    let mut filter_group_by = std::collections::BTreeMap::new();
    for (key, mut values) in input.filter_group_by {
        if values.len() != 1 {
            return Err(Problem::bad_request(format!(
                "filterGroupBy[{key}] takes one value; Tally cannot filter by several"
            )));
        }
        filter_group_by.insert(key, values.remove(0));
    }
    let query = MeterQuery {
        from,
        to,
        window_size,
        time_zone,
        subjects,
        group_by: input.group_by,
        filter_group_by,
        limit: input.limit,
        cursor: input.cursor,
    };
    let head = AnswerHead {
        from,
        to,
        window_size,
        window_time_zone: zone_name,
    };
    Ok((query, head))
}

/// Answers a meter query, encoded in parts (see [`encode_answer`]).
async fn answer_query(
    state: &AppState,
    principal: &Principal,
    id_or_slug: &str,
    input: QueryInput,
) -> Result<Response, Problem> {
    let slug = resolve(state, id_or_slug).await?.metadata.name;
    let top = input.top;
    let (query, head) = meter_query(state, principal, &slug, input).await?;
    if let Some(n) = top {
        return answer_top(state, slug, query, head, n).await;
    }
    let result = tally_ledger::exact::query(state.ledger.as_ref(), slug, query).await?;
    // A large answer is encoded off the async workers, in parts on every
    // core, and sent part by part: a few hundred thousand rows are neither
    // built as a tree of `serde_json::Value`s nor copied into one buffer.
    let parts = if result.rows.len() < ROWS_PER_PART {
        encode_answer(&head, &result).map_err(encoding_failed)?
    } else {
        tokio::task::spawn_blocking(move || encode_answer(&head, &result))
            .await
            .map_err(encoding_failed)?
            .map_err(encoding_failed)?
    };
    let length: usize = parts.iter().map(Bytes::len).sum();
    let body = axum::body::Body::from_stream(futures::stream::iter(
        parts.into_iter().map(Ok::<_, std::convert::Infallible>),
    ));
    Ok((
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (header::CONTENT_LENGTH, length.to_string()),
        ],
        body,
    )
        .into_response())
}

/// Answers a query with `top` ([`tally_ledger::top`]): at most 100
/// subjects' rows and one row per window, so encoded in one piece.
async fn answer_top(
    state: &AppState,
    slug: String,
    query: MeterQuery,
    head: AnswerHead,
    n: usize,
) -> Result<Response, Problem> {
    let result = tally_ledger::top::query(state.ledger.as_ref(), slug, query, n).await?;
    let mut body = serde_json::to_vec(&head).map_err(encoding_failed)?;
    // `{"from":…,"windowTimeZone":"…"}` becomes `{…,"data":[…]`.
    body.pop();
    body.extend_from_slice(b",\"data\":[");
    body.extend_from_slice(&encode_rows(&result.rows).map_err(encoding_failed)?);
    body.push(b']');
    if let Some(other) = &result.other {
        body.extend_from_slice(b",\"other\":[");
        body.extend_from_slice(&encode_rows(other).map_err(encoding_failed)?);
        body.push(b']');
    }
    body.extend_from_slice(format!(",\"subjects\":{}}}", result.subjects).as_bytes());
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// The values one dimension takes in a meter's usage.
#[utoipa::path(get, path = "/api/v1/meters/{slug}/group-by/{key}/values", tag = "meters",
    params(("slug" = String, Path, description = "The meter's slug or id"),
           ("key" = String, Path, description = "A dimension of the meter, or `subject`"),
           ("from" = Option<String>, Query, description = "Start, inclusive (default as for a query)"),
           ("to" = Option<String>, Query, description = "End, exclusive (default: now)")),
    responses((status = 200, description = "The values, sorted", body = Vec<String>),
              (status = 400, description = "Bad parameters", body = Problem, content_type = "application/problem+json"),
              (status = 404, description = "No such meter", body = Problem, content_type = "application/problem+json")))]
pub async fn group_by_values(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((id_or_slug, key)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Vec<String>>, Problem> {
    let p = Params::parse(raw.as_deref())?;
    p.only(&["from", "to"])?;
    let slug = resolve(&state, &id_or_slug).await?.metadata.name;
    let input = QueryInput {
        from: p.timestamp("from")?,
        to: p.timestamp("to")?,
        group_by: vec![key.clone()],
        ..QueryInput::default()
    };
    let (query, _) = meter_query(&state, &principal, &slug, input).await?;
    let result = tally_ledger::exact::query(state.ledger.as_ref(), slug, query).await?;
    let values: std::collections::BTreeSet<String> = result
        .rows
        .into_iter()
        .filter_map(|row| {
            if key == "subject" {
                row.subject
            } else {
                row.group_by.get(&key).cloned().flatten()
            }
        })
        .collect();
    Ok(Json(values.into_iter().collect()))
}

/// The subjects with usage of a meter.
#[utoipa::path(get, path = "/api/v1/meters/{slug}/subjects", tag = "meters",
    params(("slug" = String, Path, description = "The meter's slug or id"),
           ("from" = Option<String>, Query, description = "Start, inclusive (default as for a query)"),
           ("to" = Option<String>, Query, description = "End, exclusive (default: now)")),
    responses((status = 200, description = "The subjects, sorted", body = Vec<String>),
              (status = 404, description = "No such meter", body = Problem, content_type = "application/problem+json")))]
pub async fn subjects(
    state: State<AppState>,
    principal: Extension<Principal>,
    Path(id_or_slug): Path<String>,
    raw: RawQuery,
) -> Result<Json<Vec<String>>, Problem> {
    group_by_values(state, principal, Path((id_or_slug, "subject".into())), raw).await
}

/// Where a query without `from` starts: the first day (UTC) of the meter's
/// stored usage, or, with none stored, 30 days before `to`; never after
/// `to`. Never the Unix epoch, whose minute and hour windows no answer
/// could hold.
async fn default_from(state: &AppState, meter: &str, to: Timestamp) -> Result<Timestamp, Problem> {
    let month_before = to
        .checked_sub(jiff::SignedDuration::from_hours(30 * 24))
        .unwrap_or(to);
    let span = state.ledger.usage_span(meter.to_owned()).await?;
    Ok(span
        .map(|(first, _)| first)
        .filter(|first| *first < to)
        .unwrap_or(month_before))
}

fn encoding_failed(e: impl std::fmt::Display) -> Problem {
    Problem::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("encoding the answer: {e}"),
    )
}

/// A meter query's answer, in OpenMeter's shape, but for its rows.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AnswerHead {
    from: Timestamp,
    to: Timestamp,
    window_size: Option<WindowSize>,
    window_time_zone: String,
}

/// Rows encoded per part below this many are not worth a thread.
const ROWS_PER_PART: usize = 16_384;

/// The answer `{...head, "data": [rows], "nextCursor": ...}` as parts to
/// send in order; the rows are encoded in parts on up to four threads.
fn encode_answer(
    head: &AnswerHead,
    result: &tally_ledger::QueryResult,
) -> Result<Vec<Bytes>, serde_json::Error> {
    let mut open = serde_json::to_vec(head)?;
    // `{"from":…,"windowTimeZone":"…"}` becomes `{…,"data":[`.
    open.pop();
    open.extend_from_slice(b",\"data\":[");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let per_part = result
        .rows
        .len()
        .div_ceil(threads)
        .max(ROWS_PER_PART)
        .max(1);
    let chunks: Vec<&[QueryRow]> = result.rows.chunks(per_part).collect();
    let encoded: Vec<Result<Bytes, serde_json::Error>> = if chunks.len() <= 1 {
        chunks.iter().map(|rows| encode_rows(rows)).collect()
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = chunks
                .iter()
                .map(|rows| scope.spawn(move || encode_rows(rows)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(serde::ser::Error::custom("an encoding thread panicked"))
                    })
                })
                .collect()
        })
    };
    let mut parts = Vec::with_capacity(encoded.len() * 2 + 2);
    parts.push(Bytes::from(open));
    for (i, part) in encoded.into_iter().enumerate() {
        if i > 0 {
            parts.push(Bytes::from_static(b","));
        }
        parts.push(part?);
    }
    let mut close = b"]".to_vec();
    if let Some(cursor) = &result.next_cursor {
        close.extend_from_slice(b",\"nextCursor\":");
        serde_json::to_writer(&mut close, cursor)?;
    }
    close.push(b'}');
    parts.push(Bytes::from(close));
    Ok(parts)
}

/// Rows as JSON values separated by commas, without the brackets:
/// `{"value":…,"windowStart":"…","windowEnd":"…","subject":"…","groupBy":{…}}`
/// (`subject` null when rows are not per subject). Written field by field:
/// each window's bounds are encoded once for all its rows (rows come sorted
/// by window), and strings go through `serde_json`, which escapes them.
fn encode_rows(rows: &[QueryRow]) -> Result<Bytes, serde_json::Error> {
    // About what a row without group values takes, so that the buffer
    // seldom grows (and is copied) while it is written.
    let mut out = Vec::with_capacity(rows.len() * 128);
    let mut window: Option<(Timestamp, Timestamp, Vec<u8>)> = None;
    for (i, row) in rows.iter().enumerate() {
        let bounds = match &window {
            Some((start, end, bounds)) if *start == row.window_start && *end == row.window_end => {
                bounds
            }
            _ => {
                let mut bounds = b"\"windowStart\":".to_vec();
                serde_json::to_writer(&mut bounds, &row.window_start)?;
                bounds.extend_from_slice(b",\"windowEnd\":");
                serde_json::to_writer(&mut bounds, &row.window_end)?;
                &window.insert((row.window_start, row.window_end, bounds)).2
            }
        };
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"value\":");
        serde_json::to_writer(&mut out, &decimal_to_json(row.value))?;
        out.push(b',');
        out.extend_from_slice(bounds);
        // OpenMeter's rows always carry `subject`, null when not per subject.
        out.extend_from_slice(b",\"subject\":");
        serde_json::to_writer(&mut out, &row.subject)?;
        out.extend_from_slice(b",\"groupBy\":");
        serde_json::to_writer(&mut out, &row.group_by)?;
        out.push(b'}');
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};
    use std::collections::BTreeMap;

    fn row(i: usize) -> QueryRow {
        // Ten rows per window, so parts begin and end inside windows.
        let start = Timestamp::from_second(1_767_225_600 + (i / 10) as i64 * 60).unwrap();
        QueryRow {
            window_start: start,
            window_end: start + jiff::SignedDuration::from_secs(60),
            subject: (!i.is_multiple_of(3)).then(|| format!("projects/p{i}")),
            group_by: BTreeMap::from([
                ("method".to_owned(), Some(format!("M\"{}", i % 7))),
                ("region".to_owned(), None),
            ]),
            value: rust_decimal::Decimal::new(i as i64 * 3 - 7, (i % 3) as u32),
        }
    }

    /// The answer as one JSON value, built row by row as a tree.
    fn expected(head: &AnswerHead, result: &tally_ledger::QueryResult) -> Value {
        let mut answer = serde_json::to_value(head).unwrap();
        let rows: Vec<Value> = result
            .rows
            .iter()
            .map(|row| {
                let mut value = json!({
                    "value": decimal_to_json(row.value),
                    "windowStart": row.window_start.to_string(),
                    "windowEnd": row.window_end.to_string(),
                    "groupBy": row.group_by,
                });
                value["subject"] = json!(row.subject);
                value
            })
            .collect();
        answer["data"] = Value::Array(rows);
        if let Some(cursor) = &result.next_cursor {
            answer["nextCursor"] = json!(cursor);
        }
        answer
    }

    #[test]
    fn answers_in_parts_are_the_whole_answer() {
        let head = AnswerHead {
            from: Timestamp::UNIX_EPOCH,
            to: Timestamp::from_second(86_400).unwrap(),
            window_size: Some(WindowSize::Minute),
            window_time_zone: "Europe/Berlin".to_owned(),
        };
        for (rows, cursor) in [
            (0, None),
            (1, Some("0a\"ff")),
            (ROWS_PER_PART - 1, None),
            (ROWS_PER_PART * 2 + 5, Some("c")),
            (ROWS_PER_PART * 5 + 1, None),
        ] {
            let result = tally_ledger::QueryResult {
                rows: (0..rows).map(row).collect(),
                next_cursor: cursor.map(str::to_owned),
            };
            let parts = encode_answer(&head, &result).unwrap();
            let body: Vec<u8> = parts.concat();
            let answer: Value = serde_json::from_slice(&body)
                .unwrap_or_else(|e| panic!("{rows} rows: {e}: {}", String::from_utf8_lossy(&body)));
            assert_eq!(answer, expected(&head, &result), "{rows} rows");
            assert_eq!(answer["data"].as_array().unwrap().len(), rows);
        }
    }
}
