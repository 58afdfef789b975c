//! One access-log record in the vocabulary's terms, read from an Envoy
//! Gateway JSON line or an OTLP log record's attributes (same field names).
//!
//! Field names are Envoy Gateway's access-log names (`start_time`, `method`,
//! `path`, `response_code`, `duration` in ms, `route_name`, `:authority`,
//! `x-request-id`, `project_name`...) and the AI gateway's `gen_ai.*` names.
//! Numbers may be strings; `-`, `""` and `null` mean absent. A field the
//! vocabulary does not know whose name is a lower-case header name is taken
//! as a request header (Envoy logs `%REQ(X-TENANT-ID)%` under the name the
//! format gives it).
//!
//! A record borrows its strings from what it was read from (`Record<'a>`;
//! a JSON string with an escape is the one copy), so reading one allocates
//! only its list of headers. `start_time` in Envoy's own format is read
//! without `jiff`'s general parser (same value; anything else goes to it).

use std::borrow::Cow;
use std::fmt::Write as _;

use crate::vocab::{A, AttrId, COUNT};

/// A value of a record's attribute; strings are borrowed from the source
/// text where it allows (`'a`).
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue<'a> {
    Str(Cow<'a, str>),
    Int(i64),
    Uint(u64),
    Bool(bool),
    /// Nanoseconds.
    Duration(i64),
    /// Nanoseconds since the Unix epoch.
    Timestamp(i64),
    /// Header (lower-case name, value) pairs.
    Headers(Vec<(Cow<'a, str>, Cow<'a, str>)>),
}

impl AttrValue<'_> {
    /// The value as text (a field or dimension's rendering): durations in
    /// seconds with a unit (`1.5s`), timestamps as RFC 3339.
    pub fn render(&self) -> String {
        match self {
            AttrValue::Str(s) => s.clone().into_owned(),
            other => {
                let mut out = String::new();
                other.render_into(&mut out);
                out
            }
        }
    }

    /// [`AttrValue::render`], appended to `out` (no allocation of its own).
    pub fn render_into(&self, out: &mut String) {
        // Writing to a `String` cannot fail.
        let _ = match self {
            AttrValue::Str(s) => {
                out.push_str(s);
                Ok(())
            }
            AttrValue::Int(i) => write!(out, "{i}"),
            AttrValue::Uint(u) => write!(out, "{u}"),
            AttrValue::Bool(b) => write!(out, "{b}"),
            AttrValue::Duration(ns) => write!(out, "{}s", *ns as f64 / 1e9),
            AttrValue::Timestamp(ns) => match jiff::Timestamp::from_nanosecond(i128::from(*ns)) {
                Ok(t) => write!(out, "{t}"),
                Err(_) => Ok(()),
            },
            AttrValue::Headers(h) => {
                for (i, (k, v)) in h.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(k);
                    out.push('=');
                    out.push_str(v);
                }
                Ok(())
            }
        };
    }

    /// The value owning its strings.
    pub fn into_owned(self) -> AttrValue<'static> {
        match self {
            AttrValue::Str(s) => AttrValue::Str(Cow::Owned(s.into_owned())),
            AttrValue::Int(i) => AttrValue::Int(i),
            AttrValue::Uint(u) => AttrValue::Uint(u),
            AttrValue::Bool(b) => AttrValue::Bool(b),
            AttrValue::Duration(ns) => AttrValue::Duration(ns),
            AttrValue::Timestamp(ns) => AttrValue::Timestamp(ns),
            AttrValue::Headers(h) => AttrValue::Headers(
                h.into_iter()
                    .map(|(k, v)| (Cow::Owned(k.into_owned()), Cow::Owned(v.into_owned())))
                    .collect(),
            ),
        }
    }
}

/// A field's value as a source gives it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Field<'a> {
    Str(&'a str),
    Int(i64),
    Double(f64),
    Bool(bool),
    Null,
}

/// A field's value with its string owned or borrowed (a JSON string with
/// an escape is owned).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Input<'a> {
    Str(Cow<'a, str>),
    Int(i64),
    Double(f64),
    Bool(bool),
    Null,
}

impl<'a> From<Field<'a>> for Input<'a> {
    fn from(field: Field<'a>) -> Input<'a> {
        match field {
            Field::Str(s) => Input::Str(Cow::Borrowed(s)),
            Field::Int(i) => Input::Int(i),
            Field::Double(d) => Input::Double(d),
            Field::Bool(b) => Input::Bool(b),
            Field::Null => Input::Null,
        }
    }
}

impl<'a> Input<'a> {
    fn int(&self) -> Option<i64> {
        match self {
            Input::Int(i) => Some(*i),
            Input::Double(d) if d.is_finite() && d.fract() == 0.0 => Some(*d as i64),
            Input::Str(s) => s.trim().parse::<i64>().ok(),
            _ => None,
        }
    }

    /// The value as a string (numbers and booleans rendered).
    fn into_str(self) -> Cow<'a, str> {
        match self {
            Input::Str(s) => s,
            Input::Int(i) => Cow::Owned(i.to_string()),
            Input::Double(d) => Cow::Owned(d.to_string()),
            Input::Bool(b) => Cow::Borrowed(if b { "true" } else { "false" }),
            Input::Null => Cow::Borrowed(""),
        }
    }
}

/// Headers a record keeps at most (more are dropped, counted nowhere: a
/// proxy logs the headers its format names).
pub const MAX_HEADERS: usize = 64;

/// One record; its strings borrow from the source (`'a`) where they can.
#[derive(Debug, Clone, PartialEq)]
pub struct Record<'a> {
    values: [Option<AttrValue<'a>>; COUNT],
}

impl Default for Record<'_> {
    fn default() -> Self {
        Record {
            values: std::array::from_fn(|_| None),
        }
    }
}

/// Builds a [`Record`] from fields in order (a later field of an attribute
/// replaces an earlier one; headers are kept in order).
#[derive(Debug, Default)]
pub struct RecordBuilder<'a> {
    record: Record<'a>,
    headers: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

impl<'a> RecordBuilder<'a> {
    pub fn new() -> RecordBuilder<'a> {
        RecordBuilder::default()
    }

    /// Reads one field (an access-log line's key, an OTLP attribute).
    pub fn field(&mut self, key: &'a str, value: Field<'a>) {
        self.input(Cow::Borrowed(key), value.into());
    }

    /// Reads every field of `fields`.
    pub fn fields(&mut self, fields: impl IntoIterator<Item = (&'a str, Field<'a>)>) {
        for (key, value) in fields {
            self.field(key, value);
        }
    }

    /// Reads the fields of a JSON object, its strings moved into the record.
    pub fn json(&mut self, fields: crate::JsonFields<'a>) {
        for (key, value) in fields.into_inputs() {
            self.input(key, value);
        }
    }

    pub(crate) fn input(&mut self, key: Cow<'a, str>, value: Input<'a>) {
        let value = match value {
            Input::Str(s) if s.is_empty() || s == "-" => return,
            Input::Null => return,
            other => other,
        };
        let record = &mut self.record;
        match &*key {
            "start_time" => {
                if let Input::Str(t) = &value
                    && let Some(ns) = parse_time(t)
                {
                    record.set(A::RequestTime, AttrValue::Timestamp(ns));
                }
            }
            "duration" => {
                if let Some(ms) = value.int() {
                    record.set(
                        A::RequestDuration,
                        AttrValue::Duration(ms.saturating_mul(1_000_000)),
                    );
                }
            }
            "connection_id" => {
                if let Some(i) = value.int().and_then(|i| u64::try_from(i).ok()) {
                    record.set(A::ConnectionId, AttrValue::Uint(i));
                }
            }
            "downstream_peer_cert_presented" => {
                let b = match &value {
                    Input::Bool(b) => *b,
                    Input::Str(s) => s == "true",
                    _ => false,
                };
                record.set(A::ConnectionMtls, AttrValue::Bool(b));
            }
            "downstream_remote_address" => {
                record.address(value.into_str(), A::SourceAddress, A::SourcePort)
            }
            "downstream_local_address" => {
                record.address(value.into_str(), A::DestinationAddress, A::DestinationPort)
            }
            "route_name" => record.route(value.into_str()),
            name => {
                if let Some((a, number)) = simple(name) {
                    if !number {
                        record.set(a, AttrValue::Str(value.into_str()));
                    } else if let Some(i) = value.int() {
                        record.set(a, AttrValue::Int(i));
                    }
                } else if is_header_name(name) && self.headers.len() < MAX_HEADERS {
                    self.headers.push((key, value.into_str()));
                }
            }
        }
    }

    /// The record.
    pub fn finish(self) -> Record<'a> {
        let RecordBuilder {
            mut record,
            headers,
        } = self;
        if record.get(A::RequestHost as usize).is_none()
            && let Some((_, host)) = headers.iter().find(|(k, _)| k == "host")
        {
            record.set(A::RequestHost, AttrValue::Str(host.clone()));
        }
        if !headers.is_empty() {
            record.set(A::RequestHeaders, AttrValue::Headers(headers));
        }
        record
    }
}

/// The attribute a field names directly, and whether it is a number
/// (else a string).
fn simple(key: &str) -> Option<(A, bool)> {
    Some(match key {
        "method" => (A::RequestMethod, false),
        "path" | "x-envoy-origin-path" => (A::RequestPath, false),
        ":authority" => (A::RequestHost, false),
        "scheme" | ":scheme" => (A::RequestScheme, false),
        "protocol" => (A::RequestProtocol, false),
        "x-request-id" | "request_id" => (A::RequestId, false),
        "user-agent" => (A::RequestUserAgent, false),
        "referer" => (A::RequestReferer, false),
        "bytes_received" => (A::RequestSize, true),
        "downstream_wire_bytes_received" => (A::RequestTotalSize, true),
        "response_code" => (A::ResponseCode, true),
        "response_code_details" => (A::ResponseCodeDetails, false),
        "response_flags" => (A::ResponseFlags, false),
        "bytes_sent" => (A::ResponseSize, true),
        "downstream_wire_bytes_sent" => (A::ResponseTotalSize, true),
        "requested_server_name" => (A::ConnectionSni, false),
        "downstream_tls_version" => (A::ConnectionTlsVersion, false),
        "upstream_host" => (A::XdsUpstreamHost, false),
        "gateway.name" | "gateway_name" => (A::RouteGateway, false),
        "gateway.namespace" | "gateway_namespace" => (A::RouteGatewayNamespace, false),
        "project_name" => (A::Project, false),
        "gen_ai.usage.input_tokens" => (A::GenAiInputTokens, true),
        "gen_ai.usage.output_tokens" => (A::GenAiOutputTokens, true),
        "gen_ai.usage.cache_read.input_tokens" | "gen_ai.usage.cache_read_input_tokens" => {
            (A::GenAiCacheReadTokens, true)
        }
        "gen_ai.usage.cache_creation.input_tokens" | "gen_ai.usage.cache_creation_input_tokens" => {
            (A::GenAiCacheCreationTokens, true)
        }
        "gen_ai.request.model" => (A::GenAiRequestModel, false),
        "gen_ai.response.model" => (A::GenAiResponseModel, false),
        "gen_ai.provider.name" | "gen_ai.system" => (A::GenAiProviderName, false),
        "gen_ai.operation.name" => (A::GenAiOperationName, false),
        _ => return None,
    })
}

/// `start_time` as nanoseconds since the epoch: Envoy's own format
/// (`2026-03-01T10:00:00.123Z`) read directly, anything else by `jiff`'s
/// RFC 3339 parser (which also reads Envoy's format, to the same value).
fn parse_time(text: &str) -> Option<i64> {
    if let Some(ns) = envoy_time(text.as_bytes()) {
        return Some(ns);
    }
    let t = text.parse::<jiff::Timestamp>().ok()?;
    Some(i64::try_from(t.as_nanosecond()).unwrap_or(i64::MAX))
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (Envoy's `%START_TIME%` default), UTC, with
/// every field in range; `None` for anything else.
fn envoy_time(b: &[u8]) -> Option<i64> {
    if b.len() != 24
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'.'
        || b[23] != b'Z'
    {
        return None;
    }
    let num = |at: usize, len: usize| -> Option<i64> {
        b[at..at + len].iter().try_fold(0i64, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0'))
        })
    };
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, minute, second, milli) = (num(11, 2)?, num(14, 2)?, num(17, 2)?, num(20, 3)?);
    // jiff's range starts at year -9999; a 4-digit year starting at 1 fits.
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
        || year < 1
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3_600 + minute * 60 + second;
    // Past the range of i64 nanoseconds (1677–2262): jiff's path decides.
    seconds
        .checked_mul(1_000_000_000)?
        .checked_add(milli * 1_000_000)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl<'a> Record<'a> {
    /// The value of attribute `id`, if the record has it.
    pub fn get(&self, id: AttrId) -> Option<&AttrValue<'a>> {
        self.values.get(id).and_then(Option::as_ref)
    }

    /// The value of attribute `a` as a string, if it is one.
    pub fn text(&self, a: A) -> Option<&str> {
        match self.get(a as usize)? {
            AttrValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Sets attribute `a`.
    pub fn set(&mut self, a: A, value: AttrValue<'a>) {
        self.values[a as usize] = Some(value);
    }

    /// The record owning its strings.
    pub fn into_owned(self) -> Record<'static> {
        Record {
            values: self.values.map(|v| v.map(AttrValue::into_owned)),
        }
    }

    /// Whether the record has every attribute of the bit set `required`.
    pub fn has_all(&self, required: u64) -> bool {
        let mut bits = required;
        while bits != 0 {
            let id = bits.trailing_zeros() as usize;
            if self.get(id).is_none() {
                return false;
            }
            bits &= bits - 1;
        }
        true
    }

    /// The value of header `name` (lower case) of the request or response.
    pub fn header(&self, response: bool, name: &str) -> Option<&str> {
        let a = if response {
            A::ResponseHeaders
        } else {
            A::RequestHeaders
        };
        match self.get(a as usize)? {
            AttrValue::Headers(h) => h.iter().find(|(k, _)| k == name).map(|(_, v)| &**v),
            _ => None,
        }
    }

    /// Reads a record from its fields (an access-log line's keys, an OTLP
    /// log record's attributes).
    pub fn from_fields(fields: impl IntoIterator<Item = (&'a str, Field<'a>)>) -> Record<'a> {
        let mut builder = RecordBuilder::new();
        builder.fields(fields);
        builder.finish()
    }

    /// `ip:port` (or `[v6]:port`) into an address and a port.
    fn address(&mut self, text: Cow<'a, str>, address: A, port: A) {
        let split = match text.rsplit_once(':') {
            Some((host, p)) if p.parse::<u16>().is_ok() => {
                let host = host.trim_start_matches('[').trim_end_matches(']');
                Some((
                    host.len(),
                    host.as_ptr() as usize - text.as_ptr() as usize,
                    p,
                ))
            }
            _ => None,
        };
        let Some((len, at, p)) = split else {
            self.set(address, AttrValue::Str(text));
            return;
        };
        if let Ok(p) = p.parse::<i64>() {
            self.set(port, AttrValue::Int(p));
        }
        self.set(address, AttrValue::Str(sub(text, at, len)));
    }

    /// `httproute/<namespace>/<name>/rule/<n>[/...]`.
    fn route(&mut self, text: Cow<'a, str>) {
        let mut parts = text.split('/');
        let mut parsed = None;
        if parts.next() == Some("httproute")
            && let (Some(ns), Some(name)) = (parts.next(), parts.next())
            && !ns.is_empty()
            && !name.is_empty()
        {
            let rule = match parts.next() {
                Some("rule") => parts.next().and_then(|r| r.parse::<i64>().ok()),
                _ => None,
            };
            // "httproute/" is 10 bytes; the name follows the namespace's '/'.
            parsed = Some((10, ns.len(), 11 + ns.len(), name.len(), rule));
        }
        if let Some((ns_at, ns_len, name_at, name_len, rule)) = parsed {
            self.set(
                A::RouteNamespace,
                AttrValue::Str(sub(text.clone(), ns_at, ns_len)),
            );
            self.set(
                A::RouteHttproute,
                AttrValue::Str(sub(text.clone(), name_at, name_len)),
            );
            if let Some(rule) = rule {
                self.set(A::RouteRule, AttrValue::Int(rule));
            }
        }
        self.set(A::RouteName, AttrValue::Str(text));
    }

    /// Reads an Envoy Gateway JSON access-log line.
    pub fn from_json_line(line: &'a [u8]) -> Result<Record<'a>, serde_json::Error> {
        let fields = crate::JsonFields::parse_slice(line)?;
        let mut builder = RecordBuilder::new();
        builder.json(fields);
        Ok(builder.finish())
    }

    /// Reads a parsed JSON object.
    pub fn from_json(object: &'a serde_json::Map<String, serde_json::Value>) -> Record<'a> {
        use serde_json::Value;
        Record::from_fields(object.iter().map(|(k, v)| {
            let field = match v {
                Value::String(s) => Field::Str(s),
                Value::Number(n) => match n.as_i64() {
                    Some(i) => Field::Int(i),
                    None => Field::Double(n.as_f64().unwrap_or(f64::NAN)),
                },
                Value::Bool(b) => Field::Bool(*b),
                _ => Field::Null,
            };
            (k.as_str(), field)
        }))
    }
}

/// `text[at..at + len]`, borrowed if `text` is.
fn sub(text: Cow<'_, str>, at: usize, len: usize) -> Cow<'_, str> {
    match text {
        Cow::Borrowed(s) => Cow::Borrowed(&s[at..at + len]),
        Cow::Owned(s) => Cow::Owned(s[at..at + len].to_owned()),
    }
}

/// A lower-case HTTP header name (RFC 9110 token characters, no dots or
/// underscores, which Envoy's own field names use).
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.contains('-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The reference: `jiff`'s reading, saturated as `parse_time` does.
    fn jiff_ns(text: &str) -> Option<i64> {
        let t = text.parse::<jiff::Timestamp>().ok()?;
        Some(i64::try_from(t.as_nanosecond()).unwrap_or(i64::MAX))
    }

    proptest! {
        /// Envoy's format read directly gives what `jiff` gives, and every
        /// valid time in it is read directly.
        #[test]
        fn envoy_times_read_as_jiff_reads_them(
            year in 0i64..10_000, month in 0i64..14, day in 0i64..33,
            hour in 0i64..25, minute in 0i64..61, second in 0i64..62, milli in 0i64..1000,
        ) {
            let text = format!(
                "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{milli:03}Z"
            );
            let ours = envoy_time(text.as_bytes());
            let theirs = jiff_ns(&text);
            if ours.is_some() {
                prop_assert_eq!(ours, theirs, "{}", text);
            } else if (1678..=2261).contains(&year) && second <= 59 {
                prop_assert!(theirs.is_none(), "{} read by jiff only", text);
            }
            prop_assert_eq!(parse_time(&text), theirs);
        }
    }

    #[test]
    fn other_time_formats_go_to_jiff() {
        for text in [
            "2026-03-01T10:00:00Z",
            "2026-03-01T10:00:00.123456+02:00",
            "x",
        ] {
            assert_eq!(envoy_time(text.as_bytes()), None);
            assert_eq!(parse_time(text), jiff_ns(text), "{text}");
        }
        assert_eq!(parse_time("1970-01-01T00:00:01.500Z"), Some(1_500_000_000));
    }
}
