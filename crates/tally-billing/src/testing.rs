//! Loopback test servers that follow the providers' public ingest APIs.
//!
//! Amberflo (`POST /ingest`, as documented and as the official Python client
//! sends it to `/ingest/`): `X-API-KEY` required (401 otherwise), body
//! optionally gzip'd (`Content-Encoding: gzip`), a JSON array of meter
//! records (a single object is accepted too). Each record needs
//! `customerId` (non-empty string), `meterApiName` (non-empty string),
//! `meterValue` (number), `meterTimeInMillis` (positive integer); optional
//! `uniqueId` (string) and `dimensions` (object of strings). A request with
//! any invalid record is refused whole with 400 and the reasons. Records are
//! deduplicated by `uniqueId` and summed exactly per (customerId,
//! meterApiName).
//!
//! OpenMeter (`POST /api/v1/events`): bearer token, a CloudEvents batch;
//! deduplicated by (source, id); `data.value` summed per (subject, type).
//!
//! Usage queries, answered from the stored records (see [`usage`]):
//! Amberflo's `POST /usage` and OpenMeter's
//! `GET /api/v1/meters/{slug}/query`.
//!
//! [`ServerState::down`] makes every request answer 503 (a provider outage).
//!
//! Faults are injected per request, in order: a status (with optional
//! `Retry-After`) answered before anything is stored, or a slow answer given
//! after the records were stored (the client times out: a lost answer).
//!
//! [`venv`]: Python virtual environments for tests that drive real clients.
//! [`forwarder`]: forwarder fixtures for this crate's tests and benchmark
//! (re-exported here).

pub mod forwarder;
pub mod venv;

pub use forwarder::*;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io::Read as _;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rust_decimal::Decimal;
use serde_json::Value;

pub mod usage;

/// One injected fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer this status without storing anything.
    Status(u16, Option<u64>),
    /// Store the records, then wait this long before answering 200.
    SlowAnswer(Duration),
}

#[derive(Debug, Default)]
pub struct ServerState {
    pub api_key: String,
    pub faults: VecDeque<Fault>,
    /// Every request gets this delay before its answer (to slow a client).
    pub delay: Duration,
    /// (customerId, meterApiName) → sum.
    pub sums: BTreeMap<(String, String), Decimal>,
    pub seen: HashSet<String>,
    pub duplicates: u64,
    pub requests: u64,
    pub accepted_records: u64,
    pub refused: Vec<String>,
    /// Every accepted (not duplicate) record, in arrival order.
    pub records: Vec<StoredRecord>,
    /// Answer 503 to every request.
    pub down: bool,
}

/// A record as stored: what the usage queries read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub customer: String,
    pub meter: String,
    pub time_ms: i64,
    pub dimensions: BTreeMap<String, String>,
    pub value: Decimal,
}

#[derive(Clone)]
pub struct TestServer {
    state: Arc<Mutex<ServerState>>,
    pub url: String,
}

impl TestServer {
    pub async fn start(api_key: &str) -> TestServer {
        let state = Arc::new(Mutex::new(ServerState {
            api_key: api_key.to_owned(),
            ..ServerState::default()
        }));
        let app = Router::new()
            .route("/ingest", post(amberflo_ingest))
            .route("/ingest/", post(amberflo_ingest))
            .route("/api/v1/events", post(openmeter_events))
            .route("/usage", post(crate::testing::usage::amberflo_usage))
            .route(
                "/api/v1/meters/{slug}/query",
                get(crate::testing::usage::openmeter_query),
            )
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        TestServer { state, url }
    }

    pub fn state(&self) -> MutexGuard<'_, ServerState> {
        self.state.lock().unwrap()
    }

    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.state().faults.extend(faults);
    }

    pub fn sums(&self) -> BTreeMap<(String, String), Decimal> {
        self.state().sums.clone()
    }
}

fn refuse(state: &mut ServerState, status: StatusCode, message: String) -> Response {
    state.refused.push(message.clone());
    (status, message).into_response()
}

fn decode_body(headers: &HeaderMap, body: &Bytes) -> Result<Vec<u8>, String> {
    let gzip = headers
        .get("content-encoding")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
    if !gzip {
        return Ok(body.to_vec());
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&body[..])
        .read_to_end(&mut out)
        .map_err(|e| format!("bad gzip body: {e}"))?;
    Ok(out)
}

/// Counts the request, checks its credential, and takes the next fault:
/// `Ok(delay before answering)` or the answer to give at once.
fn admit(
    state: &mut ServerState,
    credential: Option<&str>,
    expected: impl Fn(&ServerState) -> String,
) -> Result<Duration, Box<Response>> {
    state.requests += 1;
    if state.down {
        return Err(Box::new(
            (StatusCode::SERVICE_UNAVAILABLE, "down for maintenance").into_response(),
        ));
    }
    if credential != Some(expected(state).as_str()) {
        return Err(Box::new(refuse(
            state,
            StatusCode::UNAUTHORIZED,
            "missing or wrong credentials".into(),
        )));
    }
    match take_fault(state) {
        (Some(answer), _) => Err(Box::new(answer)),
        (None, wait) => Ok(wait),
    }
}

/// Takes the next fault; `Some(response)` if it answers at once.
fn take_fault(state: &mut ServerState) -> (Option<Response>, Duration) {
    let delay = state.delay;
    match state.faults.pop_front() {
        Some(Fault::Status(status, retry_after)) => {
            let status = StatusCode::from_u16(status).unwrap();
            let mut response = (status, "injected fault").into_response();
            if let Some(seconds) = retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", seconds.to_string().parse().unwrap());
            }
            (Some(response), delay)
        }
        Some(Fault::SlowAnswer(wait)) => (None, delay + wait),
        None => (None, delay),
    }
}

struct Parsed {
    unique_id: Option<String>,
    customer: String,
    meter: String,
    time_ms: i64,
    dimensions: BTreeMap<String, String>,
    value: Decimal,
}

fn non_empty_string(
    record: &serde_json::Map<String, Value>,
    field: &str,
) -> Result<String, String> {
    match record.get(field) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(_) => Err(format!("{field} must be a non-empty string")),
        None => Err(format!("{field} is required")),
    }
}

fn parse_amberflo_record(raw: &Value, raw_text: &str) -> Result<Parsed, String> {
    let record = raw.as_object().ok_or("a record must be an object")?;
    let customer = non_empty_string(record, "customerId")?;
    let meter = non_empty_string(record, "meterApiName")?;
    let time_ms = match record.get("meterTimeInMillis") {
        Some(Value::Number(n)) if n.as_u64().is_some_and(|v| v > 0) => {
            n.as_i64().ok_or("meterTimeInMillis is too large")?
        }
        Some(_) => return Err("meterTimeInMillis must be a positive integer".into()),
        None => return Err("meterTimeInMillis is required".into()),
    };
    let unique_id = match record.get("uniqueId") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("uniqueId must be a string".into()),
    };
    let dimensions = match record.get("dimensions") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(map)) if map.values().all(Value::is_string) => map
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
            .collect(),
        Some(_) => return Err("dimensions must be an object of strings".into()),
    };
    if !matches!(record.get("meterValue"), Some(Value::Number(_))) {
        return Err("meterValue must be a number".into());
    }
    // Exact value: read the number's own text from the raw record.
    let exact: BTreeMap<String, Box<serde_json::value::RawValue>> =
        serde_json::from_str(raw_text).map_err(|e| e.to_string())?;
    let text = exact.get("meterValue").map_or("", |v| v.get());
    let value = Decimal::from_str(text)
        .or_else(|_| Decimal::from_scientific(text))
        .map_err(|e| format!("meterValue {text}: {e}"))?;
    Ok(Parsed {
        unique_id,
        customer,
        meter,
        time_ms,
        dimensions,
        value,
    })
}

fn store(state: &mut ServerState, records: Vec<Parsed>) {
    for record in records {
        if let Some(id) = &record.unique_id
            && !state.seen.insert(id.clone())
        {
            state.duplicates += 1;
            continue;
        }
        state.accepted_records += 1;
        *state
            .sums
            .entry((record.customer.clone(), record.meter.clone()))
            .or_default() += record.value;
        state.records.push(StoredRecord {
            customer: record.customer,
            meter: record.meter,
            time_ms: record.time_ms,
            dimensions: record.dimensions,
            value: record.value,
        });
    }
}

/// The common path of both APIs: admit, decode, parse whole, store, answer.
async fn ingest(
    shared: &Mutex<ServerState>,
    headers: &HeaderMap,
    body: &Bytes,
    expected_credential: impl Fn(&ServerState) -> String,
    parse: impl Fn(&[u8]) -> Result<Vec<Parsed>, String>,
) -> Result<(Duration, usize), Response> {
    let mut state = shared.lock().unwrap();
    let credential_header = if headers.contains_key("x-api-key") {
        "x-api-key"
    } else {
        "authorization"
    };
    let credential = headers.get(credential_header).and_then(|v| v.to_str().ok());
    let wait = admit(&mut state, credential, expected_credential).map_err(|answer| *answer)?;
    match decode_body(headers, body).and_then(|bytes| parse(&bytes)) {
        Err(message) => Err(refuse(&mut state, StatusCode::BAD_REQUEST, message)),
        Ok(records) => {
            let n = records.len();
            store(&mut state, records);
            Ok((wait, n))
        }
    }
}

fn parse_amberflo_body(bytes: &[u8]) -> Result<Vec<Parsed>, String> {
    let raws: Vec<Box<serde_json::value::RawValue>> = match serde_json::from_slice(bytes) {
        Ok(list) => list,
        Err(_) => {
            vec![serde_json::from_slice(bytes).map_err(|e| format!("body is not JSON: {e}"))?]
        }
    };
    raws.iter()
        .enumerate()
        .map(|(i, raw)| {
            let value: Value = serde_json::from_str(raw.get()).map_err(|e| e.to_string())?;
            parse_amberflo_record(&value, raw.get()).map_err(|e| format!("record {i}: {e}"))
        })
        .collect()
}

fn parse_cloudevents_body(bytes: &[u8]) -> Result<Vec<Parsed>, String> {
    let events: Vec<Value> = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    events
        .iter()
        .map(|event| {
            let field = |name: &str| {
                event[name]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .ok_or(format!("{name} is required"))
            };
            if field("specversion")? != "1.0" {
                return Err("specversion must be 1.0".to_string());
            }
            let value = event["data"]["value"]
                .as_str()
                .ok_or("data.value must be a string")?;
            let time: jiff::Timestamp = field("time")?.parse().map_err(|e| format!("time: {e}"))?;
            let dimensions =
                serde_json::from_value(event["data"]["dimensions"].clone()).unwrap_or_default();
            Ok(Parsed {
                unique_id: Some(format!("{}\0{}", field("source")?, field("id")?)),
                customer: field("subject")?,
                meter: field("type")?,
                time_ms: time.as_millisecond(),
                dimensions,
                value: Decimal::from_str(value).map_err(|e| e.to_string())?,
            })
        })
        .collect()
}

async fn amberflo_ingest(
    State(shared): State<Arc<Mutex<ServerState>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match ingest(
        &shared,
        &headers,
        &body,
        |s| s.api_key.clone(),
        parse_amberflo_body,
    )
    .await
    {
        Err(answer) => answer,
        Ok((wait, n)) => {
            tokio::time::sleep(wait).await;
            (StatusCode::OK, format!("{n} records were ingested")).into_response()
        }
    }
}

async fn openmeter_events(
    State(shared): State<Arc<Mutex<ServerState>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok());
    if content_type != Some("application/cloudevents-batch+json") {
        let mut state = shared.lock().unwrap();
        return refuse(
            &mut state,
            StatusCode::BAD_REQUEST,
            "want a CloudEvents batch".into(),
        );
    }
    let bearer = |s: &ServerState| format!("Bearer {}", s.api_key);
    match ingest(&shared, &headers, &body, bearer, parse_cloudevents_body).await {
        Err(answer) => answer,
        Ok((wait, _)) => {
            tokio::time::sleep(wait).await;
            StatusCode::NO_CONTENT.into_response()
        }
    }
}
