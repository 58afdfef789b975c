//! One Envoy Gateway JSON access-log line, parsed without copying.
//!
//! Field names are the ones Envoy Gateway's default JSON access-log format
//! uses: the lower-cased command operator (`%BYTES_RECEIVED%` →
//! `bytes_received`) or the header name (`%REQ(:AUTHORITY)%` → `:authority`).
//! The wire-byte counters are therefore read from
//! `downstream_wire_bytes_received` (`%DOWNSTREAM_WIRE_BYTES_RECEIVED%`) and
//! `downstream_wire_bytes_sent` (`%DOWNSTREAM_WIRE_BYTES_SENT%`).
//!
//! Every numeric field may be a JSON number or a string holding one; the
//! string `-` (Envoy's "not available") and `null` mean absent.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

/// A request record borrowed from its line. Strings are borrowed unless the
/// line escaped them.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct AccessRecord<'a> {
    #[serde(borrow, default, deserialize_with = "text")]
    pub start_time: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "text")]
    pub method: Option<Cow<'a, str>>,
    #[serde(
        borrow,
        default,
        deserialize_with = "text",
        alias = "x-envoy-origin-path"
    )]
    pub path: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "text")]
    pub protocol: Option<Cow<'a, str>>,
    #[serde(default)]
    pub response_code: Number,
    #[serde(default)]
    pub bytes_received: Number,
    #[serde(default)]
    pub bytes_sent: Number,
    /// `%DOWNSTREAM_WIRE_BYTES_RECEIVED%`: bytes on the wire, headers and
    /// framing included. Preferred over `bytes_received` when present.
    #[serde(default)]
    pub downstream_wire_bytes_received: Number,
    /// `%DOWNSTREAM_WIRE_BYTES_SENT%`. Preferred over `bytes_sent`.
    #[serde(default)]
    pub downstream_wire_bytes_sent: Number,
    /// Request duration in milliseconds.
    #[serde(default)]
    pub duration: Number,
    #[serde(borrow, default, deserialize_with = "text")]
    pub route_name: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "text", rename = ":authority")]
    pub authority: Option<Cow<'a, str>>,
    #[serde(
        borrow,
        default,
        deserialize_with = "text",
        rename = "x-request-id",
        alias = "request_id"
    )]
    pub request_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "text")]
    pub upstream_host: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "text")]
    pub project_name: Option<Cow<'a, str>>,
    /// `%ACCESS_LOG_TYPE%`: absent or `NotSet` for plain per-request logs;
    /// `DownstreamPeriodic`/`DownstreamEnd` (and `TcpPeriodic`/
    /// `TcpConnectionEnd`) for long-lived streams logged periodically, whose
    /// byte counts and duration are cumulative since the stream started.
    #[serde(borrow, default, deserialize_with = "text")]
    pub access_log_type: Option<Cow<'a, str>>,
    /// `%CONNECTION_ID%`: identifies a TCP connection's periodic records.
    #[serde(default)]
    pub connection_id: Number,
}

/// What kind of record a line is, from `access_log_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// A whole request (no `access_log_type`, `NotSet`).
    Request,
    /// A periodic record of a long-lived stream or connection.
    Periodic,
    /// The last record of a long-lived stream or connection.
    End,
    /// A start or upstream-side record: no downstream usage of its own.
    NoUsage,
}

impl AccessRecord<'_> {
    /// The kind of record; `DownstreamEnd` of a stream never logged
    /// periodically is still a whole request with cumulative counters, so
    /// treating it as `End` gives the same sums.
    pub fn kind(&self) -> RecordKind {
        match self.access_log_type.as_deref() {
            None | Some("" | "-" | "NotSet") => RecordKind::Request,
            Some("DownstreamPeriodic" | "TcpPeriodic") => RecordKind::Periodic,
            Some("DownstreamEnd" | "TcpConnectionEnd") => RecordKind::End,
            Some(_) => RecordKind::NoUsage,
        }
    }
}

impl AccessRecord<'_> {
    /// Ingress bytes: wire bytes received when the proxy logs them, else
    /// `bytes_received` (body bytes), else 0.
    pub fn ingress_bytes(&self) -> u64 {
        self.downstream_wire_bytes_received
            .0
            .or(self.bytes_received.0)
            .unwrap_or(0)
    }

    /// Egress bytes: wire bytes sent when logged, else `bytes_sent`, else 0.
    pub fn egress_bytes(&self) -> u64 {
        self.downstream_wire_bytes_sent
            .0
            .or(self.bytes_sent.0)
            .unwrap_or(0)
    }

    /// `project_name` unless absent, empty or `-`.
    pub fn project(&self) -> Option<&str> {
        present(self.project_name.as_deref())
    }

    /// `route_name` unless absent, empty or `-`.
    pub fn route(&self) -> Option<&str> {
        present(self.route_name.as_deref())
    }
}

fn present(value: Option<&str>) -> Option<&str> {
    value.filter(|v| !v.is_empty() && *v != "-")
}

/// Deserialises an optional string, borrowing it from the line unless it
/// was escaped (serde's own `Option<Cow<str>>` always copies).
fn text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    deserializer.deserialize_option(TextVisitor)
}

struct TextVisitor;

impl<'de> Visitor<'de> for TextVisitor {
    type Value = Option<Cow<'de, str>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string or null")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Some(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(Cow::Owned(v.to_owned())))
    }
}

/// An unsigned integer that Envoy may log as a number, a numeric string, `-`
/// or `null`. `Number(None)` is absent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Number(pub Option<u64>);

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NumberVisitor)
    }
}

struct NumberVisitor;

impl<'de> Visitor<'de> for NumberVisitor {
    type Value = Number;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a non-negative integer, a string holding one, \"-\" or null")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Number, E> {
        Ok(Number(Some(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Number, E> {
        u64::try_from(v)
            .map(|v| Number(Some(v)))
            .map_err(|_| E::custom(format!("negative number {v}")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Number, E> {
        if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < u64::MAX as f64 {
            Ok(Number(Some(v as u64)))
        } else {
            Err(E::custom(format!("not a non-negative integer: {v}")))
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Number, E> {
        match v.trim() {
            "" | "-" => Ok(Number(None)),
            digits => digits
                .parse::<u64>()
                .map(|v| Number(Some(v)))
                .map_err(|_| E::custom(format!("not a non-negative integer: {v:?}"))),
        }
    }

    fn visit_unit<E: de::Error>(self) -> Result<Number, E> {
        Ok(Number(None))
    }

    fn visit_none<E: de::Error>(self) -> Result<Number, E> {
        Ok(Number(None))
    }
}

/// Why a line could not be used. Stable, low-cardinality reason codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LineProblem {
    /// Not a JSON object, or a field had the wrong type.
    InvalidJson,
    /// `start_time` absent or `-`.
    MissingStartTime,
    /// `start_time` is not an RFC 3339 timestamp.
    InvalidStartTime,
    /// `route_name` absent or `-` (e.g. a 404 that matched no route).
    MissingRouteName,
    /// `route_name` is not `httproute/<namespace>/<name>/rule/<n>...`.
    UnknownRouteName,
    /// A connection closed (or reopened) that was not known to be open.
    ConnectionUnknown,
    /// A periodic connection record older than one already seen.
    ConnectionOutOfOrder,
    /// A periodic or end record without `x-request-id` (streams) or
    /// `connection_id` (TCP) to tell its stream.
    MissingStreamId,
    /// A start or upstream-side record (`DownstreamStart`,
    /// `UpstreamPeriodic`, ...): no downstream usage of its own.
    NoUsageRecord,
    /// A lifecycle event whose (`source`, `id`) was applied before: a
    /// retry, skipped.
    DuplicateEvent,
    /// A lifecycle event older than its input's deduplication horizon behind
    /// the watermark: it could no longer be told from a retry, so it is not
    /// applied.
    TooLate,
    /// A connection closed at a time before the time it was already billed
    /// up to (its window had closed before the close arrived): the time in
    /// between stays billed.
    ConnectionClosedLate,
    /// A `duration` longer than [`MAX_RECORD_DURATION_MILLIS`]: no request
    /// or connection record of the gateway lasts that long, and its time
    /// would be spread over that many windows.
    DurationTooLong,
    /// An empty line, or one of whitespace only.
    EmptyLine,
}

/// The longest `duration` a record may carry: 31 days.
pub const MAX_RECORD_DURATION_MILLIS: u64 = 31 * 24 * 3_600_000;

impl LineProblem {
    pub fn as_str(self) -> &'static str {
        match self {
            LineProblem::InvalidJson => "invalid_json",
            LineProblem::MissingStartTime => "missing_start_time",
            LineProblem::InvalidStartTime => "invalid_start_time",
            LineProblem::MissingRouteName => "missing_route_name",
            LineProblem::UnknownRouteName => "unknown_route_name",
            LineProblem::ConnectionUnknown => "connection_unknown",
            LineProblem::ConnectionOutOfOrder => "connection_out_of_order",
            LineProblem::MissingStreamId => "missing_stream_id",
            LineProblem::NoUsageRecord => "no_usage_record",
            LineProblem::DuplicateEvent => "duplicate_event",
            LineProblem::TooLate => "too_late",
            LineProblem::ConnectionClosedLate => "connection_closed_late",
            LineProblem::DurationTooLong => "duration_too_long",
            LineProblem::EmptyLine => "empty_line",
        }
    }

    /// Well-formed lines that name no HTTPRoute.
    pub fn is_unattributable(self) -> bool {
        matches!(
            self,
            LineProblem::MissingRouteName | LineProblem::UnknownRouteName
        )
    }

    /// Broken input.
    pub fn is_malformed(self) -> bool {
        matches!(
            self,
            LineProblem::InvalidJson
                | LineProblem::EmptyLine
                | LineProblem::DurationTooLong
                | LineProblem::MissingStartTime
                | LineProblem::InvalidStartTime
                | LineProblem::MissingStreamId
        )
    }
}

/// How deep arrays and objects may nest in a line. Envoy's lines are flat
/// objects (metadata fields add a level or two); sonic-rs skips the values
/// of unknown fields by recursion without a limit, so a deeper line could
/// overflow the reading thread's stack and abort the agent.
pub const MAX_LINE_DEPTH: usize = 16;

/// Parses one line (without its newline) into a borrowed record, with
/// sonic-rs (SIMD JSON; about twice serde_json's speed on these lines).
/// Lines nested deeper than [`MAX_LINE_DEPTH`] are refused unread.
pub fn parse_access_line(line: &[u8]) -> Result<AccessRecord<'_>, sonic_rs::Error> {
    if nesting_depth_exceeds(line, MAX_LINE_DEPTH) {
        return Err(<sonic_rs::Error as de::Error>::custom(format!(
            "arrays and objects nest deeper than {MAX_LINE_DEPTH} levels"
        )));
    }
    sonic_rs::from_slice(line)
}

/// Whether brackets nest deeper than `limit`; a line with at most `limit`
/// brackets in all (every Envoy line) is not scanned.
fn nesting_depth_exceeds(line: &[u8], limit: usize) -> bool {
    memchr::memchr2_iter(b'[', b'{', line).nth(limit).is_some()
        && tally_model::nesting::nesting_exceeds(line, limit)
}

/// Parses an RFC 3339 `start_time` into Unix milliseconds.
pub fn parse_start_time(text: Option<&str>) -> Result<i64, LineProblem> {
    let text = present(text).ok_or(LineProblem::MissingStartTime)?;
    let ts: jiff::Timestamp = text.parse().map_err(|_| LineProblem::InvalidStartTime)?;
    Ok(ts.as_millisecond())
}

/// Parses `start_time`s fast: Envoy's `%START_TIME%` is
/// `YYYY-MM-DDTHH:MM:SS.mmmZ`, and consecutive lines share their minute, so
/// the minute is parsed once (by jiff) and only seconds and milliseconds per
/// line. Anything else goes to [`parse_start_time`].
#[derive(Debug, Clone, Default)]
pub struct StartTimeParser {
    minute: Option<([u8; 17], i64)>,
}

impl StartTimeParser {
    /// Same result as [`parse_start_time`].
    pub fn parse(&mut self, text: Option<&str>) -> Result<i64, LineProblem> {
        if let (Some(text), Some((prefix, minute_millis))) = (text, &self.minute)
            && let Some(within) = within_minute(text.as_bytes(), prefix)
        {
            return Ok(minute_millis + within);
        }
        let millis = parse_start_time(text)?;
        if let Some(bytes) = text.map(str::as_bytes)
            && let Some(prefix) = bytes.get(..17).and_then(|p| <[u8; 17]>::try_from(p).ok())
        {
            let minute_millis = millis - millis.rem_euclid(60_000);
            self.minute = Some((prefix, minute_millis));
            if within_minute(bytes, &prefix) != Some(millis - minute_millis) {
                self.minute = None; // not the plain UTC shape
            }
        }
        Ok(millis)
    }
}

/// Milliseconds into the minute of `text` if it is `<prefix>SS[.mmm]Z`.
fn within_minute(text: &[u8], prefix: &[u8; 17]) -> Option<i64> {
    let rest = text.strip_prefix(prefix.as_slice())?;
    let digit = |b: u8| b.is_ascii_digit().then(|| i64::from(b - b'0'));
    let (seconds, millis) = match rest {
        [s1, s2, b'Z'] => (digit(*s1)? * 10 + digit(*s2)?, 0),
        [s1, s2, b'.', m1, m2, m3, b'Z'] => (
            digit(*s1)? * 10 + digit(*s2)?,
            digit(*m1)? * 100 + digit(*m2)? * 10 + digit(*m3)?,
        ),
        _ => return None,
    };
    (seconds < 60).then_some(seconds * 1000 + millis)
}

/// How many example lines [`LineDiagnostics`] keeps per reason.
pub const EXAMPLES_PER_PROBLEM: usize = 3;
const EXAMPLE_MAX_BYTES: usize = 512;

/// Counts of lines that could not be used, by reason, with a few examples of
/// each for a diagnostic. Never stops processing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineDiagnostics {
    pub counts: BTreeMap<LineProblem, u64>,
    pub examples: BTreeMap<LineProblem, Vec<String>>,
}

impl LineDiagnostics {
    /// Counts one rejected line, keeping it (truncated) as an example while
    /// fewer than [`EXAMPLES_PER_PROBLEM`] are kept for its reason.
    pub fn record(&mut self, problem: LineProblem, line: &[u8]) {
        *self.counts.entry(problem).or_default() += 1;
        let examples = self.examples.entry(problem).or_default();
        if examples.len() < EXAMPLES_PER_PROBLEM {
            let end = line.len().min(EXAMPLE_MAX_BYTES);
            examples.push(String::from_utf8_lossy(&line[..end]).into_owned());
        }
    }

    /// Lines that were not valid access-log records.
    pub fn malformed(&self) -> u64 {
        self.sum(LineProblem::is_malformed)
    }

    /// Valid records that name no HTTPRoute.
    pub fn unattributable(&self) -> u64 {
        self.sum(LineProblem::is_unattributable)
    }

    /// Valid inputs that add nothing (start and upstream records, unknown
    /// connections, out-of-order periodic records, duplicate or too late
    /// lifecycle events) or less than they say (late closes).
    pub fn skipped(&self) -> u64 {
        self.sum(|p| !p.is_malformed() && !p.is_unattributable())
    }

    fn sum(&self, keep: impl Fn(LineProblem) -> bool) -> u64 {
        self.counts
            .iter()
            .filter(|(p, _)| keep(**p))
            .map(|(_, n)| n)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_may_be_strings_numbers_dash_or_null() {
        let line = br#"{"bytes_received":"12","bytes_sent":34,"duration":"-","response_code":null,"start_time":"2024-05-01T12:00:00.5Z"}"#;
        let r = parse_access_line(line).unwrap();
        assert_eq!(r.bytes_received, Number(Some(12)));
        assert_eq!(r.bytes_sent, Number(Some(34)));
        assert_eq!(r.duration, Number(None));
        assert_eq!(r.response_code, Number(None));
        assert_eq!(
            parse_start_time(r.start_time.as_deref()),
            Ok(1_714_564_800_500)
        );
    }

    #[test]
    fn missing_fields_are_absent_and_unknown_fields_ignored() {
        let r = parse_access_line(br#"{"route_name":"x","user-agent":"curl"}"#).unwrap();
        assert_eq!(r.route(), Some("x"));
        assert_eq!(r.bytes_sent, Number(None));
        assert_eq!(r.ingress_bytes(), 0);
        assert_eq!(r.project(), None);
        assert_eq!(
            parse_start_time(r.start_time.as_deref()),
            Err(LineProblem::MissingStartTime)
        );
    }

    #[test]
    fn wire_bytes_win_over_body_bytes() {
        let r = parse_access_line(
            br#"{"bytes_received":"10","downstream_wire_bytes_received":"150","bytes_sent":"7","downstream_wire_bytes_sent":"-"}"#,
        )
        .unwrap();
        assert_eq!(r.ingress_bytes(), 150);
        assert_eq!(r.egress_bytes(), 7);
    }

    #[test]
    fn header_named_fields_and_request_id_alias() {
        let r = parse_access_line(
            br#"{":authority":"api.example.com","request_id":"abc","x-envoy-origin-path":"/v1","project_name":"-"}"#,
        )
        .unwrap();
        assert_eq!(r.authority.as_deref(), Some("api.example.com"));
        assert_eq!(r.request_id.as_deref(), Some("abc"));
        assert_eq!(r.path.as_deref(), Some("/v1"));
        assert_eq!(r.project(), None);
        let r = parse_access_line(br#"{"x-request-id":"def"}"#).unwrap();
        assert_eq!(r.request_id.as_deref(), Some("def"));
    }

    #[test]
    fn strings_borrow_unless_escaped() {
        let r = parse_access_line(br#"{"path":"/a","method":"G\u0045T"}"#).unwrap();
        assert!(matches!(r.path, Some(Cow::Borrowed("/a"))));
        assert_eq!(r.method.as_deref(), Some("GET"));
    }

    #[test]
    fn huge_byte_counts_are_exact() {
        let r = parse_access_line(br#"{"bytes_sent":"18446744073709551615"}"#).unwrap();
        assert_eq!(r.egress_bytes(), u64::MAX);
    }

    #[test]
    fn malformed_lines_are_errors() {
        for line in [
            &b"not json"[..],
            br#"{"bytes_sent":"12x"}"#,
            br#"{"bytes_sent":-1}"#,
            br#"{"bytes_sent":1.5}"#,
            br#"{"route_name":5}"#,
            br#"[1,2]"#,
            br#"{"bytes_sent":"1""#,
            b"",
        ] {
            assert!(
                parse_access_line(line).is_err(),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        assert_eq!(
            parse_start_time(Some("yesterday")),
            Err(LineProblem::InvalidStartTime)
        );
    }

    #[test]
    fn deeply_nested_lines_are_refused_unread() {
        let nested = |depth: usize| {
            format!(
                r#"{{"route_name":"httproute/a/b/rule/0","x":{}1{}}}"#,
                "[".repeat(depth - 1),
                "]".repeat(depth - 1)
            )
        };
        assert!(parse_access_line(nested(MAX_LINE_DEPTH).as_bytes()).is_ok());
        let too_deep = nested(MAX_LINE_DEPTH + 1);
        let refused = parse_access_line(too_deep.as_bytes()).unwrap_err();
        assert!(refused.to_string().contains("nest deeper"), "{refused}");
        // A million levels would overflow any stack if read.
        assert!(parse_access_line(nested(1_000_000).as_bytes()).is_err());
        // Brackets inside strings do not count.
        let quoted = format!(r#"{{"path":"{}","route_name":"r"}}"#, "[{".repeat(100));
        assert_eq!(
            parse_access_line(quoted.as_bytes()).unwrap().route(),
            Some("r")
        );
        let escaped = format!(r#"{{"path":"\"{}","route_name":"r"}}"#, "[".repeat(100));
        assert!(parse_access_line(escaped.as_bytes()).is_ok());
    }

    #[test]
    fn fast_start_time_parser_agrees_with_jiff() {
        let mut parser = StartTimeParser::default();
        for text in [
            "2024-05-01T12:00:00.123Z",
            "2024-05-01T12:00:59.999Z",
            "2024-05-01T12:00:07Z",
            "2024-05-01T12:00:60.000Z",
            "2024-05-01T12:00:5x.000Z",
            "2024-05-01T12:00:05.5Z",
            "2024-05-01T12:00:05.123456Z",
            "2024-05-01T12:00:05.123+02:00",
            "2024-05-01T12:00:05.123Z",
            "2024-05-01T12:01:00.000Z",
            "1969-12-31T23:59:59.999Z",
            "1969-12-31T23:59:58.001Z",
        ] {
            assert_eq!(
                parser.parse(Some(text)),
                parse_start_time(Some(text)),
                "{text}"
            );
        }
    }

    #[test]
    fn diagnostics_count_every_line_and_keep_few_examples() {
        let mut d = LineDiagnostics::default();
        for i in 0..10 {
            d.record(LineProblem::InvalidJson, format!("bad {i}").as_bytes());
        }
        d.record(LineProblem::MissingRouteName, b"{}");
        assert_eq!(d.malformed(), 10);
        assert_eq!(d.unattributable(), 1);
        assert_eq!(
            d.examples[&LineProblem::InvalidJson],
            vec!["bad 0", "bad 1", "bad 2"]
        );
    }
}
