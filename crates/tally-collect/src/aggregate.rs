//! Aggregation of access records into per-(HTTPRoute, window) usage, with
//! deterministic window closing.
//!
//! # Closing rule
//! The *watermark* is the largest event time seen. Window `w` (covering
//! `[w·size, (w+1)·size)`) is closable once `(w+1)·size <= watermark −
//! allowed_lateness`. Closing happens in *rounds*: a round runs when the
//! closable boundary crosses into a new window, or on [`Aggregator::flush`]
//! (end of input, idle timeout). A round closes every closable bucket,
//! including buckets re-opened by lines that arrived after their window had
//! been emitted. Each round has a number, persisted with the state; a usage
//! amount is identified by (route, window, meter, round), so a late line
//! produces a *supplementary* amount in a later round carrying only the
//! addition. Given the same input (and the same flush points) the same rounds
//! happen, so the same amounts with the same identities come out.
//!
//! # Connection seconds
//! - Request records: the request's `duration` (ms), in the window of its
//!   `start_time` (a request is one use of a connection or stream).
//! - Periodic records of long-lived streams and connections — log lines
//!   with `access_log_type` `DownstreamPeriodic`/`DownstreamEnd` (keyed by
//!   `x-request-id`) or `TcpPeriodic`/`TcpConnectionEnd` (keyed by
//!   `connection_id`), or [`ConnectionRecord`]s — carry cumulative duration
//!   and bytes since the stream's `start_time`: each contributes only what
//!   was added since the previous record of the same stream (time split
//!   across the windows it spans, bytes in the window of the record's time
//!   `start_time + duration`), and the end record counts the request. Start
//!   and upstream-side records add nothing and are counted as skipped.
//! - [`ConnectionEvent`] open/close: an open connection is accounted up to the
//!   closing boundary at every round, so a week-long WebSocket is billed
//!   every window, not once at close. Rounds follow the watermark, which
//!   [`Aggregator::advance_to`] moves without an event (the agent's
//!   lifecycle input does so by its clock). A close at a time before what
//!   was already accounted adds nothing and is counted
//!   (`connection_closed_late`): the time between stays billed.
//! - A record whose `duration` is past [`MAX_RECORD_DURATION_MILLIS`] (a
//!   month) is refused and counted (`duration_too_long`): its time would
//!   otherwise be spread over as many windows as it spans.
//!
//! Milliseconds are summed exactly and emitted exactly: a connection-seconds
//! amount is its window's milliseconds, sent as a decimal number of seconds
//! ([`WindowUsage::amount`], `1.5`, `0.035`), which the ledger sums exactly.
//! Nothing waits for more traffic to make a whole second. (A checkpoint of
//! an older agent may hold a route's sub-second carry: it is added to that
//! route's next amount.)

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::record::{
    AccessRecord, LineDiagnostics, LineProblem, MAX_RECORD_DURATION_MILLIS, RecordKind,
    StartTimeParser, parse_access_line,
};
use crate::route::{RouteKey, parse_route_name};

/// The four gateway meters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Meter {
    /// `{request}`: request records.
    Requests,
    /// `By`: wire bytes received if logged, else body bytes received.
    IngressBytes,
    /// `By`: wire bytes sent if logged, else body bytes sent.
    EgressBytes,
    /// `s`: see the module documentation.
    ConnectionSeconds,
}

impl Meter {
    /// Every meter, in a fixed order.
    pub const ALL: [Meter; 4] = [
        Meter::Requests,
        Meter::IngressBytes,
        Meter::EgressBytes,
        Meter::ConnectionSeconds,
    ];

    /// The `MeterDefinition` `meterName`, used as the CloudEvent `type`.
    pub fn meter_name(self) -> &'static str {
        match self {
            Meter::Requests => "networking.datumapis.com/gateway/requests",
            Meter::IngressBytes => "networking.datumapis.com/gateway/ingress-bytes",
            Meter::EgressBytes => "networking.datumapis.com/gateway/egress-bytes",
            Meter::ConnectionSeconds => "networking.datumapis.com/gateway/connection-seconds",
        }
    }

    /// UCUM unit of the meter.
    pub fn unit(self) -> &'static str {
        match self {
            Meter::Requests => "{request}",
            Meter::IngressBytes | Meter::EgressBytes => "By",
            Meter::ConnectionSeconds => "s",
        }
    }
}

/// Exact usage sums. Connection time is kept in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Request records.
    pub requests: u64,
    /// Bytes received from clients.
    pub ingress_bytes: u128,
    /// Bytes sent to clients.
    pub egress_bytes: u128,
    /// Connection time in milliseconds (emitted exactly, as decimal seconds).
    pub connection_millis: u128,
}

impl Totals {
    /// Adds another total to this one.
    pub fn add(&mut self, other: &Totals) {
        self.requests += other.requests;
        self.ingress_bytes += other.ingress_bytes;
        self.egress_bytes += other.egress_bytes;
        self.connection_millis += other.connection_millis;
    }
}

/// Window size and allowed lateness, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowConfig {
    /// Window length; windows are aligned to the Unix epoch.
    pub window_millis: i64,
    /// How far behind the largest event time a window stays open.
    pub allowed_lateness_millis: i64,
    /// How far one record may move the watermark ahead. A record far in
    /// the future (a broken clock, a corrupt line) still counts in its own
    /// window, but cannot close every window at once: the watermark follows
    /// it at most this much per record. A real gap in traffic is caught up
    /// in a few records.
    #[serde(default = "default_max_watermark_step")]
    pub max_watermark_step_millis: i64,
}

fn default_max_watermark_step() -> i64 {
    3_600_000
}

impl Default for WindowConfig {
    /// One-minute windows, one minute of allowed lateness, watermark steps
    /// of at most an hour.
    fn default() -> Self {
        WindowConfig {
            window_millis: 60_000,
            allowed_lateness_millis: 60_000,
            max_watermark_step_millis: default_max_watermark_step(),
        }
    }
}

/// One closed amount of one meter for one route and window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowUsage {
    /// The route and project it bills to.
    pub route: RouteKey,
    /// Start of the window, Unix ms (the event's `time`).
    pub window_start_millis: i64,
    /// Which of the four meters.
    pub meter: Meter,
    /// Exact amount: requests, bytes, or for connection seconds
    /// milliseconds (see [`WindowUsage::amount`]).
    pub value: u128,
    /// The closing round that emitted it; distinct amounts of the same
    /// (route, window, meter) always have distinct rounds.
    pub round: u64,
}

impl WindowUsage {
    /// The amount in the meter's unit, as the event's `value`: an integer,
    /// or for connection seconds the exact decimal of the milliseconds
    /// (`2`, `1.5`, `0.035`).
    pub fn amount(&self) -> String {
        match self.meter {
            Meter::ConnectionSeconds => millis_as_seconds(self.value),
            _ => self.value.to_string(),
        }
    }
}

/// `millis` as an exact decimal number of seconds, without trailing zeros.
pub fn millis_as_seconds(millis: u128) -> String {
    let (seconds, fraction) = (millis / 1000, millis % 1000);
    if fraction == 0 {
        return seconds.to_string();
    }
    let digits = format!("{fraction:03}");
    format!("{seconds}.{}", digits.trim_end_matches('0'))
}

/// The milliseconds of a decimal number of seconds with at most three
/// fractional digits (the inverse of [`millis_as_seconds`]); `None` for
/// anything else.
pub fn seconds_as_millis(text: &str) -> Option<u128> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || fraction.len() > 3 || !digits(fraction) {
        return None;
    }
    if text.ends_with('.') {
        return None;
    }
    let millis: u128 = format!("{fraction:0<3}").parse().ok()?;
    whole
        .parse::<u128>()
        .ok()?
        .checked_mul(1000)?
        .checked_add(millis)
}

/// A periodic record of a long-lived connection (Envoy's
/// `access_log_flush_interval` / `TcpPeriodic` records).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionRecord {
    /// Envoy's `%CONNECTION_ID%` (or a stream id): records of one
    /// connection share it.
    pub connection_id: String,
    /// The route the connection belongs to.
    pub route: RouteKey,
    /// When the connection started, Unix ms.
    pub start_millis: i64,
    /// Time since the connection started, ms (cumulative).
    pub duration_millis: u64,
    /// Bytes received since the connection started (cumulative).
    pub ingress_bytes: u64,
    /// Bytes sent since the connection started (cumulative).
    pub egress_bytes: u64,
    /// The connection's last record (`TcpConnectionEnd`).
    pub last: bool,
}

/// A connection lifecycle event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionEvent {
    /// A connection of `route` opened at `at_millis` (Unix ms).
    Opened {
        /// Identifies the connection until it closes.
        connection_id: String,
        /// The route the connection belongs to.
        route: RouteKey,
        /// When it opened, Unix ms.
        at_millis: i64,
    },
    /// The connection closed at `at_millis` (Unix ms).
    Closed {
        /// As given when it opened.
        connection_id: String,
        /// When it closed, Unix ms.
        at_millis: i64,
    },
}

type RouteId = u32;
const ROUTE_CACHE_LIMIT: usize = 1 << 20;

/// Cumulative counters of a stream at its last periodic record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct Cumulative {
    duration: u64,
    ingress: u64,
    egress: u64,
}

impl Cumulative {
    fn covers(&self, earlier: &Cumulative) -> bool {
        self.duration >= earlier.duration
            && self.ingress >= earlier.ingress
            && self.egress >= earlier.egress
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OpenConnection {
    route: RouteId,
    accounted_until: i64,
}

/// Turns records into closed [`WindowUsage`] amounts. Pure computation: no
/// I/O, no clock.
#[derive(Debug)]
pub struct Aggregator {
    config: WindowConfig,
    routes: Vec<RouteKey>,
    route_ids: HashMap<RouteKey, RouteId>,
    /// `route_name` + `\0` + `project_name` → route (None: unattributable).
    route_cache: HashMap<Box<str>, Option<RouteId>>,
    cache_key: String,
    start_times: StartTimeParser,
    open: BTreeMap<i64, HashMap<RouteId, Totals>>,
    watermark: Option<i64>,
    /// Windows with an index below this have been closed at least once.
    closed_below: i64,
    round: u64,
    carry_millis: HashMap<RouteId, u64>,
    lifecycle: BTreeMap<String, OpenConnection>,
    periodic: HashMap<String, Cumulative>,
    diagnostics: LineDiagnostics,
}

/// The aggregator's complete state, serialisable for a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AggregatorState {
    routes: Vec<RouteKey>,
    open: Vec<(i64, RouteId, Totals)>,
    watermark: Option<i64>,
    closed_below: i64,
    round: u64,
    carry_millis: Vec<(RouteId, u64)>,
    lifecycle: Vec<(String, RouteId, i64)>,
    periodic: Vec<(String, Cumulative)>,
    diagnostics: LineDiagnostics,
}

impl Aggregator {
    /// An empty aggregator.
    pub fn new(config: WindowConfig) -> Self {
        Aggregator {
            config,
            routes: Vec::new(),
            route_ids: HashMap::new(),
            route_cache: HashMap::new(),
            cache_key: String::new(),
            start_times: StartTimeParser::default(),
            open: BTreeMap::new(),
            watermark: None,
            closed_below: i64::MIN,
            round: 0,
            carry_millis: HashMap::new(),
            lifecycle: BTreeMap::new(),
            periodic: HashMap::new(),
            diagnostics: LineDiagnostics::default(),
        }
    }

    /// Parses, attributes and aggregates one line (without its newline).
    /// Amounts closed because of it are appended to `out`. A line that
    /// cannot be used is counted in [`Aggregator::diagnostics`].
    pub fn push_line(&mut self, line: &[u8], out: &mut Vec<WindowUsage>) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return self.diagnostics.record(LineProblem::EmptyLine, line);
        }
        let record = match parse_access_line(line) {
            Ok(record) => record,
            Err(_) => return self.diagnostics.record(LineProblem::InvalidJson, line),
        };
        if let Err(problem) = self.push_record(&record, out) {
            self.diagnostics.record(problem, line);
        }
    }

    /// Aggregates one parsed request record.
    pub fn push_record(
        &mut self,
        record: &AccessRecord<'_>,
        out: &mut Vec<WindowUsage>,
    ) -> Result<(), LineProblem> {
        let at = self.start_times.parse(record.start_time.as_deref())?;
        if record
            .duration
            .0
            .is_some_and(|d| d > MAX_RECORD_DURATION_MILLIS)
        {
            return Err(LineProblem::DurationTooLong);
        }
        let kind = record.kind();
        if kind == RecordKind::NoUsage {
            return Err(LineProblem::NoUsageRecord);
        }
        let route = self.attribute(record)?;
        if kind != RecordKind::Request {
            let stream = match (record.access_log_type.as_deref(), &record.request_id) {
                (Some(t), _) if t.starts_with("Tcp") => {
                    record.connection_id.0.map(|c| format!("tcp:{c}"))
                }
                (_, Some(id)) if !id.is_empty() && id != "-" => Some(format!("req:{id}")),
                _ => None,
            };
            let stream = stream.ok_or(LineProblem::MissingStreamId)?;
            let now = Cumulative {
                duration: record.duration.0.unwrap_or(0),
                ingress: record.ingress_bytes(),
                egress: record.egress_bytes(),
            };
            self.push_cumulative(route, &stream, at, now, kind == RecordKind::End, out);
            return Ok(());
        }
        let totals = self.bucket(route, at);
        totals.requests += 1;
        totals.ingress_bytes += u128::from(record.ingress_bytes());
        totals.egress_bytes += u128::from(record.egress_bytes());
        totals.connection_millis += u128::from(record.duration.0.unwrap_or(0));
        self.advance(at, out);
        Ok(())
    }

    /// Aggregates one periodic connection record.
    pub fn push_connection_record(
        &mut self,
        record: &ConnectionRecord,
        out: &mut Vec<WindowUsage>,
    ) {
        if record.duration_millis > MAX_RECORD_DURATION_MILLIS {
            return self.diagnostics.record(
                LineProblem::DurationTooLong,
                record.connection_id.as_bytes(),
            );
        }
        let route = self.intern(&record.route);
        let now = Cumulative {
            duration: record.duration_millis,
            ingress: record.ingress_bytes,
            egress: record.egress_bytes,
        };
        let stream = format!("conn:{}", record.connection_id);
        self.push_cumulative(route, &stream, record.start_millis, now, record.last, out);
    }

    /// Adds what a stream's cumulative counters gained since its previous
    /// record; the last record also counts the request.
    fn push_cumulative(
        &mut self,
        route: RouteId,
        stream: &str,
        start: i64,
        now: Cumulative,
        last: bool,
        out: &mut Vec<WindowUsage>,
    ) {
        let previous = self.periodic.get(stream).copied().unwrap_or_default();
        if last {
            self.periodic.remove(stream);
        } else if now.covers(&previous) {
            self.periodic.insert(stream.to_owned(), now);
        }
        let end = start.saturating_add(to_i64(now.duration));
        if now.covers(&previous) {
            self.add_interval(route, start.saturating_add(to_i64(previous.duration)), end);
            let totals = self.bucket(route, end);
            totals.ingress_bytes += u128::from(now.ingress - previous.ingress);
            totals.egress_bytes += u128::from(now.egress - previous.egress);
        } else {
            self.diagnostics
                .record(LineProblem::ConnectionOutOfOrder, stream.as_bytes());
        }
        if last {
            self.bucket(route, end).requests += 1;
        }
        self.advance(end, out);
    }

    /// Adds a sampled gauge of concurrently open connections: `connections`
    /// were open for `route` during `[from_millis, to_millis)`, so
    /// `connections × overlap` milliseconds go to each window the interval
    /// spans. Time then advances to `to_millis`.
    pub fn push_connection_gauge(
        &mut self,
        route: &RouteKey,
        from_millis: i64,
        to_millis: i64,
        connections: u64,
        out: &mut Vec<WindowUsage>,
    ) {
        let route = self.intern(route);
        self.add_interval_times(route, from_millis, to_millis, connections);
        self.advance(to_millis, out);
    }

    /// Moves event time to `at_millis` (as a record of that time would),
    /// closing the windows that closes.
    pub fn advance_to(&mut self, at_millis: i64, out: &mut Vec<WindowUsage>) {
        self.advance(at_millis, out);
    }

    /// Applies one connection lifecycle event.
    pub fn push_connection_event(&mut self, event: &ConnectionEvent, out: &mut Vec<WindowUsage>) {
        match event {
            ConnectionEvent::Opened {
                connection_id,
                route,
                at_millis,
            } => {
                let route = self.intern(route);
                let previous = self.lifecycle.insert(
                    connection_id.clone(),
                    OpenConnection {
                        route,
                        accounted_until: *at_millis,
                    },
                );
                if let Some(previous) = previous {
                    // Reopened without a close: keep what was accounted.
                    self.diagnostics
                        .record(LineProblem::ConnectionUnknown, connection_id.as_bytes());
                    self.lifecycle.insert(connection_id.clone(), previous);
                }
                self.advance(*at_millis, out);
            }
            ConnectionEvent::Closed {
                connection_id,
                at_millis,
            } => {
                match self.lifecycle.remove(connection_id) {
                    Some(open) if open.accounted_until > *at_millis => self
                        .diagnostics
                        .record(LineProblem::ConnectionClosedLate, connection_id.as_bytes()),
                    Some(open) => self.add_interval(open.route, open.accounted_until, *at_millis),
                    None => self
                        .diagnostics
                        .record(LineProblem::ConnectionUnknown, connection_id.as_bytes()),
                }
                self.advance(*at_millis, out);
            }
        }
    }

    /// Closes every open bucket (end of input, idle timeout). Open
    /// lifecycle connections are accounted up to the watermark.
    pub fn flush(&mut self, out: &mut Vec<WindowUsage>) {
        let until = self.watermark.unwrap_or(i64::MIN);
        self.run_round(until, i64::MAX, out);
    }

    /// Counts an input that could not be used (or not wholly), keeping it
    /// as an example: for inputs parsed outside the aggregator, such as
    /// [`crate::lifecycle`] records.
    pub fn note(&mut self, problem: LineProblem, input: &[u8]) {
        self.diagnostics.record(problem, input);
    }

    /// Counts of lines and inputs that could not be used.
    pub fn diagnostics(&self) -> &LineDiagnostics {
        &self.diagnostics
    }

    /// Distinct routes seen.
    pub fn route_count(&self) -> usize {
        self.routes.len()
    }

    /// Open (not yet emitted) route-window buckets.
    pub fn open_buckets(&self) -> usize {
        self.open.values().map(HashMap::len).sum()
    }

    /// The largest event time seen, Unix ms.
    pub fn watermark(&self) -> Option<i64> {
        self.watermark
    }

    /// A serialisable copy of the whole state. Routes that nothing refers
    /// to any more (no open bucket, no carried milliseconds, no open
    /// connection) are left out, so the checkpoint does not grow with route
    /// churn.
    pub fn state(&self) -> AggregatorState {
        let mut kept = HashMap::new();
        let mut routes = Vec::new();
        let mut keep = |id: RouteId| -> RouteId {
            *kept.entry(id).or_insert_with(|| {
                routes.push(self.routes[id as usize].clone());
                (routes.len() - 1) as RouteId
            })
        };
        let mut open = Vec::new();
        for (window, buckets) in &self.open {
            let mut ids: Vec<_> = buckets.keys().copied().collect();
            ids.sort_unstable();
            open.extend(ids.into_iter().map(|id| (*window, keep(id), buckets[&id])));
        }
        let mut carry_millis: Vec<_> = self
            .carry_millis
            .iter()
            .filter(|(_, c)| **c > 0)
            .map(|(r, c)| (*r, *c))
            .collect();
        carry_millis.sort_unstable();
        let carry_millis = carry_millis
            .into_iter()
            .map(|(r, c)| (keep(r), c))
            .collect();
        let lifecycle = self
            .lifecycle
            .iter()
            .map(|(id, c)| (id.clone(), keep(c.route), c.accounted_until))
            .collect();
        let mut periodic: Vec<_> = self.periodic.iter().map(|(c, d)| (c.clone(), *d)).collect();
        periodic.sort_unstable();
        AggregatorState {
            routes,
            open,
            watermark: self.watermark,
            closed_below: self.closed_below,
            round: self.round,
            carry_millis,
            lifecycle,
            periodic,
            diagnostics: self.diagnostics.clone(),
        }
    }

    /// Rebuilds an aggregator from a checkpointed state.
    pub fn from_state(config: WindowConfig, state: AggregatorState) -> Self {
        let mut aggregator = Aggregator::new(config);
        for route in &state.routes {
            aggregator.intern(route);
        }
        for (window, route, totals) in state.open {
            aggregator
                .open
                .entry(window)
                .or_default()
                .insert(route, totals);
        }
        aggregator.watermark = state.watermark;
        aggregator.closed_below = state.closed_below;
        aggregator.round = state.round;
        aggregator.carry_millis = state.carry_millis.into_iter().collect();
        aggregator.lifecycle = state
            .lifecycle
            .into_iter()
            .map(|(id, route, accounted_until)| {
                (
                    id,
                    OpenConnection {
                        route,
                        accounted_until,
                    },
                )
            })
            .collect();
        aggregator.periodic = state.periodic.into_iter().collect();
        aggregator.diagnostics = state.diagnostics;
        aggregator
    }

    fn attribute(&mut self, record: &AccessRecord<'_>) -> Result<RouteId, LineProblem> {
        let route_name = record.route().ok_or(LineProblem::MissingRouteName)?;
        let project = record.project();
        self.cache_key.clear();
        self.cache_key.push_str(route_name);
        self.cache_key.push('\0');
        self.cache_key.push_str(project.unwrap_or(""));
        if let Some(cached) = self.route_cache.get(self.cache_key.as_str()) {
            return cached.ok_or(LineProblem::UnknownRouteName);
        }
        let id = parse_route_name(route_name)
            .and_then(|name| RouteKey::new(&name, project))
            .map(|key| self.intern(&key));
        if self.route_cache.len() >= ROUTE_CACHE_LIMIT {
            self.route_cache.clear();
        }
        self.route_cache.insert(self.cache_key.as_str().into(), id);
        id.ok_or(LineProblem::UnknownRouteName)
    }

    fn intern(&mut self, route: &RouteKey) -> RouteId {
        if let Some(id) = self.route_ids.get(route) {
            return *id;
        }
        let id = RouteId::try_from(self.routes.len()).unwrap_or(RouteId::MAX);
        self.routes.push(route.clone());
        self.route_ids.insert(route.clone(), id);
        id
    }

    fn window_of(&self, at: i64) -> i64 {
        at.div_euclid(self.config.window_millis)
    }

    fn bucket(&mut self, route: RouteId, at: i64) -> &mut Totals {
        let window = self.window_of(at);
        self.open
            .entry(window)
            .or_default()
            .entry(route)
            .or_default()
    }

    /// Adds `[from, to)` of connection time, split at window boundaries.
    fn add_interval(&mut self, route: RouteId, from: i64, to: i64) {
        self.add_interval_times(route, from, to, 1);
    }

    /// Adds `times` connections over `[from, to)`, split at window
    /// boundaries.
    fn add_interval_times(&mut self, route: RouteId, from: i64, to: i64, times: u64) {
        if times == 0 {
            return;
        }
        let size = self.config.window_millis;
        let mut start = from;
        while start < to {
            let window = self.window_of(start);
            let end = to.min((window + 1).saturating_mul(size));
            let millis = u128::try_from(end - start).unwrap_or(0);
            self.bucket(route, start).connection_millis += millis * u128::from(times);
            start = end;
        }
    }

    fn advance(&mut self, at: i64, out: &mut Vec<WindowUsage>) {
        let step = self.config.max_watermark_step_millis;
        let watermark = self
            .watermark
            .map_or(at, |w| w.max(at.min(w.saturating_add(step))));
        self.watermark = Some(watermark);
        let boundary =
            self.window_of(watermark.saturating_sub(self.config.allowed_lateness_millis));
        if boundary > self.closed_below {
            let until = boundary.saturating_mul(self.config.window_millis);
            self.run_round(until, boundary, out);
            self.closed_below = boundary;
        }
    }

    /// One closing round: accounts open lifecycle connections up to `until`
    /// and emits every bucket of a window below `close_below`.
    fn run_round(&mut self, until: i64, close_below: i64, out: &mut Vec<WindowUsage>) {
        self.round += 1;
        let accounted: Vec<(RouteId, i64)> = self
            .lifecycle
            .values_mut()
            .filter(|c| c.accounted_until < until)
            .map(|c| (c.route, std::mem::replace(&mut c.accounted_until, until)))
            .collect();
        for (route, from) in accounted {
            self.add_interval(route, from, until);
        }
        let still_open = self.open.split_off(&close_below);
        let closing = std::mem::replace(&mut self.open, still_open);
        for (window, buckets) in closing {
            let mut buckets: Vec<_> = buckets.into_iter().collect();
            buckets
                .sort_unstable_by(|a, b| self.routes[a.0 as usize].cmp(&self.routes[b.0 as usize]));
            for (route, totals) in buckets {
                self.emit(route, window, &totals, out);
            }
        }
    }

    fn emit(&mut self, route: RouteId, window: i64, totals: &Totals, out: &mut Vec<WindowUsage>) {
        // Only a checkpoint of an older agent carries milliseconds.
        let carried = self.carry_millis.remove(&route).unwrap_or(0);
        let millis = totals.connection_millis + u128::from(carried);
        let values = [
            (Meter::Requests, u128::from(totals.requests)),
            (Meter::IngressBytes, totals.ingress_bytes),
            (Meter::EgressBytes, totals.egress_bytes),
            (Meter::ConnectionSeconds, millis),
        ];
        for (meter, value) in values {
            if value > 0 {
                out.push(WindowUsage {
                    route: self.routes[route as usize].clone(),
                    window_start_millis: window.saturating_mul(self.config.window_millis),
                    meter,
                    value,
                    round: self.round,
                });
            }
        }
    }
}

fn to_i64(millis: u64) -> i64 {
    i64::try_from(millis).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(at: &str, route: &str, sent: u64, duration: u64) -> Vec<u8> {
        format!(
            r#"{{"start_time":"{at}","route_name":"{route}","bytes_received":"10","bytes_sent":{sent},"duration":"{duration}"}}"#
        )
        .into_bytes()
    }

    fn sum(out: &[WindowUsage], meter: Meter) -> u128 {
        out.iter()
            .filter(|u| u.meter == meter)
            .map(|u| u.value)
            .sum()
    }

    const R: &str = "httproute/ns/api/rule/0/match/0/api.example.com";

    #[test]
    fn window_closes_after_watermark_passes_lateness() {
        let mut agg = Aggregator::new(WindowConfig::default());
        let mut out = Vec::new();
        agg.push_line(&line("2024-05-01T12:00:10Z", R, 5, 1500), &mut out);
        agg.push_line(&line("2024-05-01T12:01:59Z", R, 5, 0), &mut out);
        assert!(
            out.is_empty(),
            "12:00 closes only once the watermark reaches 12:02"
        );
        agg.push_line(&line("2024-05-01T12:02:00Z", R, 5, 0), &mut out);
        assert_eq!(sum(&out, Meter::Requests), 1);
        assert_eq!(sum(&out, Meter::EgressBytes), 5);
        assert_eq!(sum(&out, Meter::ConnectionSeconds), 1500);
        assert!(
            out.iter()
                .all(|u| u.window_start_millis == 1_714_564_800_000)
        );
        assert_eq!(out[0].route.project, "ns");
    }

    #[test]
    fn late_line_becomes_a_supplement_in_a_later_round() {
        let mut agg = Aggregator::new(WindowConfig::default());
        let mut out = Vec::new();
        agg.push_line(&line("2024-05-01T12:00:10Z", R, 5, 0), &mut out);
        agg.push_line(&line("2024-05-01T12:02:00Z", R, 5, 0), &mut out);
        let first_round = out[0].round;
        agg.push_line(&line("2024-05-01T12:00:20Z", R, 7, 0), &mut out);
        agg.flush(&mut out);
        let window_12_00: Vec<_> = out
            .iter()
            .filter(|u| u.window_start_millis == 1_714_564_800_000 && u.meter == Meter::EgressBytes)
            .collect();
        assert_eq!(window_12_00.len(), 2);
        assert_eq!(window_12_00[1].value, 7, "only the addition");
        assert!(window_12_00[1].round > first_round);
    }

    #[test]
    fn a_far_future_line_moves_the_watermark_one_step_only() {
        let mut agg = Aggregator::new(WindowConfig::default());
        let mut out = Vec::new();
        agg.push_line(&line("2024-05-01T12:00:10Z", R, 5, 0), &mut out);
        agg.push_line(&line("2099-01-01T00:00:00Z", R, 7, 0), &mut out);
        assert_eq!(agg.watermark(), Some(1_714_564_810_000 + 3_600_000));
        // 12:00 closed early; the line after it is a supplement, not stuck.
        agg.push_line(&line("2024-05-01T12:00:20Z", R, 1, 0), &mut out);
        agg.push_line(&line("2024-05-01T13:05:00Z", R, 1, 0), &mut out);
        assert_eq!(sum(&out, Meter::EgressBytes), 6);
        agg.flush(&mut out);
        assert_eq!(
            sum(&out, Meter::EgressBytes),
            14,
            "the 2099 line counts too"
        );
    }

    #[test]
    fn seconds_are_exact_and_nothing_waits_for_a_whole_second() {
        let mut agg = Aggregator::new(WindowConfig::default());
        let mut out = Vec::new();
        for minute in 0..5 {
            agg.push_line(
                &line(&format!("2024-05-01T12:0{minute}:00Z"), R, 0, 700),
                &mut out,
            );
        }
        agg.flush(&mut out);
        let seconds: Vec<String> = out
            .iter()
            .filter(|u| u.meter == Meter::ConnectionSeconds)
            .map(WindowUsage::amount)
            .collect();
        assert_eq!(seconds, ["0.7"; 5], "each window's 700 ms, as they close");
        assert!(agg.state().carry_millis.is_empty());
    }

    #[test]
    fn an_older_checkpoints_carry_is_sent_once_with_the_next_amount() {
        let mut agg = Aggregator::new(WindowConfig::default());
        let mut out = Vec::new();
        agg.push_line(&line("2024-05-01T12:00:00Z", R, 0, 250), &mut out);
        let mut state = agg.state();
        state.carry_millis = vec![(0, 900)];
        let mut agg = Aggregator::from_state(WindowConfig::default(), state);
        agg.flush(&mut out);
        agg.push_line(&line("2024-05-01T12:03:00Z", R, 0, 100), &mut out);
        agg.flush(&mut out);
        let seconds: Vec<String> = out
            .iter()
            .filter(|u| u.meter == Meter::ConnectionSeconds)
            .map(WindowUsage::amount)
            .collect();
        assert_eq!(seconds, ["1.15", "0.1"]);
    }

    #[test]
    fn unattributable_and_malformed_are_counted() {
        let mut agg = Aggregator::new(WindowConfig::default());
        let mut out = Vec::new();
        agg.push_line(&line("2024-05-01T12:00:00Z", "-", 1, 1), &mut out);
        agg.push_line(
            &line("2024-05-01T12:00:00Z", "tcproute/a/b/rule/0", 1, 1),
            &mut out,
        );
        agg.push_line(
            &line("2024-05-01T12:00:00Z", "tcproute/a/b/rule/0", 1, 1),
            &mut out,
        );
        agg.push_line(b"{oops", &mut out);
        agg.push_line(&line("soon", R, 1, 1), &mut out);
        agg.push_line(b"  ", &mut out);
        agg.push_line(b"", &mut out);
        let d = agg.diagnostics();
        assert_eq!(d.counts[&LineProblem::EmptyLine], 2);
        assert_eq!(d.counts[&LineProblem::MissingRouteName], 1);
        assert_eq!(d.counts[&LineProblem::UnknownRouteName], 2);
        assert_eq!(d.counts[&LineProblem::InvalidJson], 1);
        assert_eq!(d.counts[&LineProblem::InvalidStartTime], 1);
        assert_eq!((d.malformed(), d.unattributable()), (4, 3));
    }

    #[test]
    fn milliseconds_are_written_as_exact_decimal_seconds() {
        for (millis, text) in [
            (0, "0"),
            (35, "0.035"),
            (1500, "1.5"),
            (60_000, "60"),
            (1_001, "1.001"),
        ] {
            assert_eq!(millis_as_seconds(millis), text);
            assert_eq!(seconds_as_millis(text), Some(millis));
        }
        for bad in ["", ".5", "1.", "1.0001", "-1", "1e3", "a"] {
            assert_eq!(seconds_as_millis(bad), None, "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn decimal_seconds_round_trip(millis in 0u128..u128::MAX / 1000) {
            proptest::prop_assert_eq!(seconds_as_millis(&millis_as_seconds(millis)), Some(millis));
        }
    }

    fn key(name: &str) -> RouteKey {
        RouteKey {
            project: "p".into(),
            namespace: "ns".into(),
            name: name.into(),
        }
    }

    #[test]
    fn open_connection_is_billed_every_window() {
        let mut agg = Aggregator::new(WindowConfig::default());
        let mut out = Vec::new();
        let opened = ConnectionEvent::Opened {
            connection_id: "c1".into(),
            route: key("ws"),
            at_millis: 30_000,
        };
        agg.push_connection_event(&opened, &mut out);
        // Other traffic moves the watermark to 10 minutes later.
        for minute in 1..=10 {
            let at = minute * 60_000;
            let other = ConnectionEvent::Opened {
                connection_id: format!("tick{minute}"),
                route: key("other"),
                at_millis: at,
            };
            agg.push_connection_event(&other, &mut out);
            agg.push_connection_event(
                &ConnectionEvent::Closed {
                    connection_id: format!("tick{minute}"),
                    at_millis: at,
                },
                &mut out,
            );
        }
        let ws: Vec<_> = out.iter().filter(|u| u.route.name == "ws").collect();
        assert_eq!(ws.len(), 9, "windows 0..9 closed while still open");
        assert_eq!(ws[0].value, 30_000);
        assert!(ws[1..].iter().all(|u| u.value == 60_000));
        agg.push_connection_event(
            &ConnectionEvent::Closed {
                connection_id: "c1".into(),
                at_millis: 600_000,
            },
            &mut out,
        );
        agg.flush(&mut out);
        let total: u128 = out
            .iter()
            .filter(|u| u.route.name == "ws")
            .map(|u| u.value)
            .sum();
        assert_eq!(total, 570_000);
    }

    #[test]
    fn a_connection_gauge_adds_connections_times_time_per_window() {
        let mut agg = Aggregator::new(WindowConfig::default());
        let mut out = Vec::new();
        // 3 connections from 0:50 to 1:10: 30 s in window 0, 30 s in window 1.
        agg.push_connection_gauge(&key("gw"), 50_000, 70_000, 3, &mut out);
        // None open: nothing is added, time still advances.
        agg.push_connection_gauge(&key("gw"), 70_000, 80_000, 0, &mut out);
        agg.push_connection_gauge(&key("gw"), 80_000, 180_000, 2, &mut out);
        let closed: Vec<_> = out
            .iter()
            .filter(|u| u.meter == Meter::ConnectionSeconds)
            .map(|u| (u.window_start_millis, u.value))
            .collect();
        // Watermark 3:00 less a minute of lateness: windows 0 and 1 close;
        // window 1 has 3 × 10 s and 2 × 40 s.
        assert_eq!(closed, vec![(0, 30_000), (60_000, 110_000)]);
        agg.flush(&mut out);
        assert_eq!(sum(&out, Meter::ConnectionSeconds), 260_000);
        assert_eq!(sum(&out, Meter::Requests), 0);
    }

    #[test]
    fn periodic_records_contribute_time_since_previous() {
        let mut agg = Aggregator::new(WindowConfig::default());
        let mut out = Vec::new();
        for (duration, last) in [
            (50_000, false),
            (110_000, false),
            (100_000, false),
            (200_000, true),
        ] {
            let record = ConnectionRecord {
                connection_id: "c".into(),
                route: key("tcp"),
                start_millis: 0,
                duration_millis: duration,
                ingress_bytes: 0,
                egress_bytes: 0,
                last,
            };
            agg.push_connection_record(&record, &mut out);
        }
        agg.flush(&mut out);
        assert_eq!(sum(&out, Meter::ConnectionSeconds), 200_000);
        assert_eq!(sum(&out, Meter::Requests), 1);
        assert_eq!(
            agg.diagnostics().counts[&LineProblem::ConnectionOutOfOrder],
            1
        );
        let per_window: Vec<_> = out
            .iter()
            .filter(|u| u.meter == Meter::ConnectionSeconds)
            .map(|u| (u.window_start_millis, u.value))
            .collect();
        assert_eq!(
            per_window,
            [
                (0, 60_000),
                (60_000, 60_000),
                (120_000, 60_000),
                (180_000, 20_000)
            ]
        );
    }

    #[test]
    fn records_longer_than_a_month_are_refused_not_spread() {
        let mut agg = Aggregator::new(WindowConfig::default());
        let mut out = Vec::new();
        let line = |kind: &str, duration: u64| {
            format!(
                r#"{{"start_time":"2024-05-01T12:00:30Z","route_name":"{R}","access_log_type":"{kind}","x-request-id":"r","duration":{duration},"bytes_sent":1}}"#
            )
        };
        for duration in [u64::MAX, MAX_RECORD_DURATION_MILLIS + 1] {
            agg.push_line(line("DownstreamPeriodic", duration).as_bytes(), &mut out);
        }
        agg.push_line(
            line("DownstreamEnd", MAX_RECORD_DURATION_MILLIS + 1).as_bytes(),
            &mut out,
        );
        agg.push_line(
            format!(
                r#"{{"start_time":"2024-05-01T12:00:30Z","route_name":"{R}","duration":{}}}"#,
                u64::MAX
            )
            .as_bytes(),
            &mut out,
        );
        agg.flush(&mut out);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(agg.diagnostics().counts[&LineProblem::DurationTooLong], 4);
    }

    #[test]
    fn periodic_log_lines_add_only_what_their_stream_gained() {
        let mut agg = Aggregator::new(WindowConfig::default());
        let mut out = Vec::new();
        let record = |kind: &str, id: &str, duration: u64, sent: u64| {
            format!(
                r#"{{"start_time":"2024-05-01T12:00:30Z","route_name":"{R}","access_log_type":"{kind}","x-request-id":"{id}","connection_id":"7","duration":{duration},"bytes_received":"5","bytes_sent":{sent}}}"#
            )
        };
        for line in [
            record("DownstreamStart", "ws1", 0, 0),
            record("DownstreamPeriodic", "ws1", 60_000, 1_000),
            record("DownstreamPeriodic", "ws1", 120_000, 3_000),
            record("DownstreamEnd", "ws1", 150_000, 3_500),
            record("DownstreamPeriodic", "", 1, 1),
            record("TcpPeriodic", "", 10_000, 10),
            record("TcpConnectionEnd", "", 20_000, 25),
            record("UpstreamEnd", "ws1", 150_000, 3_500),
        ] {
            agg.push_line(line.as_bytes(), &mut out);
        }
        agg.flush(&mut out);
        assert_eq!(
            sum(&out, Meter::Requests),
            2,
            "one stream, one TCP connection"
        );
        assert_eq!(sum(&out, Meter::EgressBytes), 3_525);
        assert_eq!(sum(&out, Meter::IngressBytes), 10);
        assert_eq!(sum(&out, Meter::ConnectionSeconds), 170_000);
        let d = agg.diagnostics();
        assert_eq!(d.counts[&LineProblem::MissingStreamId], 1);
        assert_eq!(d.counts[&LineProblem::NoUsageRecord], 2);
        assert_eq!((d.malformed(), d.skipped()), (1, 2));
        let egress: Vec<_> = out
            .iter()
            .filter(|u| u.meter == Meter::EgressBytes && u.route.name == "api")
            .map(|u| (u.window_start_millis % 3_600_000 / 60_000, u.value))
            .collect();
        // The TCP records are late for minute 0, so it closes after minute 1.
        assert_eq!(egress, [(1, 1_000), (0, 25), (2, 2_000), (3, 500)]);
    }

    #[test]
    fn state_round_trips() {
        let mut agg = Aggregator::new(WindowConfig::default());
        let mut out = Vec::new();
        agg.push_line(&line("2024-05-01T12:00:10Z", R, 5, 1500), &mut out);
        let state = agg.state();
        let json = serde_json::to_string(&state).unwrap();
        let back = Aggregator::from_state(
            WindowConfig::default(),
            serde_json::from_str(&json).unwrap(),
        );
        assert_eq!(back.state(), state);
    }

    #[test]
    fn checkpoint_leaves_out_routes_nothing_refers_to() {
        let mut agg = Aggregator::new(WindowConfig::default());
        let mut out = Vec::new();
        let other = "httproute/ns/other/rule/0";
        agg.push_line(&line("2024-05-01T12:00:10Z", R, 5, 1000), &mut out);
        agg.push_line(&line("2024-05-01T12:00:10Z", other, 5, 1500), &mut out);
        agg.flush(&mut out);
        agg.push_line(&line("2024-05-01T12:05:10Z", R, 5, 0), &mut out);
        let state = agg.state();
        // `api` has an open bucket; `other` carries nothing (its 1.5 s
        // were sent exactly).
        assert_eq!(state.routes.len(), 1);
        agg.push_line(&line("2024-05-01T12:05:10Z", other, 0, 500), &mut out);
        agg.flush(&mut out);
        assert_eq!(agg.state().routes.len(), 0);
    }
}
