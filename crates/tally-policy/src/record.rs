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

use crate::vocab::{A, AttrId, COUNT};

/// A value of a record's attribute.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
    Uint(u64),
    Bool(bool),
    /// Nanoseconds.
    Duration(i64),
    /// Nanoseconds since the Unix epoch.
    Timestamp(i64),
    /// Header (lower-case name, value) pairs.
    Headers(Vec<(String, String)>),
}

impl AttrValue {
    /// The value as text (a field or dimension's rendering): durations in
    /// seconds with a unit (`1.5s`), timestamps as RFC 3339.
    pub fn render(&self) -> String {
        match self {
            AttrValue::Str(s) => s.clone(),
            AttrValue::Int(i) => i.to_string(),
            AttrValue::Uint(u) => u.to_string(),
            AttrValue::Bool(b) => b.to_string(),
            AttrValue::Duration(ns) => format!("{}s", *ns as f64 / 1e9),
            AttrValue::Timestamp(ns) => jiff::Timestamp::from_nanosecond(i128::from(*ns))
                .map(|t| t.to_string())
                .unwrap_or_default(),
            AttrValue::Headers(h) => h
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
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

/// Headers a record keeps at most (more are dropped, counted nowhere: a
/// proxy logs the headers its format names).
pub const MAX_HEADERS: usize = 64;

/// One record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    values: Vec<Option<AttrValue>>,
}

impl Default for Record {
    fn default() -> Self {
        Record {
            values: vec![None; COUNT],
        }
    }
}

impl Record {
    /// The value of attribute `id`, if the record has it.
    pub fn get(&self, id: AttrId) -> Option<&AttrValue> {
        self.values.get(id).and_then(Option::as_ref)
    }

    /// Sets attribute `a`.
    pub fn set(&mut self, a: A, value: AttrValue) {
        self.values[a as usize] = Some(value);
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
            AttrValue::Headers(h) => h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()),
            _ => None,
        }
    }

    /// Reads a record from its fields (an access-log line's keys, an OTLP
    /// log record's attributes).
    pub fn from_fields<'a>(fields: impl IntoIterator<Item = (&'a str, Field<'a>)>) -> Record {
        let mut record = Record::default();
        let mut headers = Vec::new();
        for (key, value) in fields {
            record.field(key, value, &mut headers);
        }
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

    fn field(&mut self, key: &str, value: Field<'_>, headers: &mut Vec<(String, String)>) {
        let text = match value {
            Field::Str(s) if s.is_empty() || s == "-" => return,
            Field::Null => return,
            Field::Str(s) => Some(s),
            _ => None,
        };
        let int = || match value {
            Field::Int(i) => Some(i),
            Field::Double(d) if d.is_finite() && d.fract() == 0.0 => Some(d as i64),
            Field::Str(s) => s.trim().parse::<i64>().ok(),
            _ => None,
        };
        let str_of = || match value {
            Field::Str(s) => s.to_owned(),
            Field::Int(i) => i.to_string(),
            Field::Double(d) => d.to_string(),
            Field::Bool(b) => b.to_string(),
            Field::Null => String::new(),
        };
        let string = |record: &mut Record, a: A| record.set(a, AttrValue::Str(str_of()));
        let number = |record: &mut Record, a: A| {
            if let Some(i) = int() {
                record.set(a, AttrValue::Int(i));
            }
        };
        match key {
            "start_time" => {
                if let Some(t) = text.and_then(|t| t.parse::<jiff::Timestamp>().ok()) {
                    let ns = i64::try_from(t.as_nanosecond()).unwrap_or(i64::MAX);
                    self.set(A::RequestTime, AttrValue::Timestamp(ns));
                }
            }
            "method" => string(self, A::RequestMethod),
            "path" | "x-envoy-origin-path" => string(self, A::RequestPath),
            ":authority" => string(self, A::RequestHost),
            "scheme" | ":scheme" => string(self, A::RequestScheme),
            "protocol" => string(self, A::RequestProtocol),
            "x-request-id" | "request_id" => string(self, A::RequestId),
            "user-agent" => string(self, A::RequestUserAgent),
            "referer" => string(self, A::RequestReferer),
            "duration" => {
                if let Some(ms) = int() {
                    self.set(
                        A::RequestDuration,
                        AttrValue::Duration(ms.saturating_mul(1_000_000)),
                    );
                }
            }
            "bytes_received" => number(self, A::RequestSize),
            "downstream_wire_bytes_received" => number(self, A::RequestTotalSize),
            "response_code" => number(self, A::ResponseCode),
            "response_code_details" => string(self, A::ResponseCodeDetails),
            "response_flags" => string(self, A::ResponseFlags),
            "bytes_sent" => number(self, A::ResponseSize),
            "downstream_wire_bytes_sent" => number(self, A::ResponseTotalSize),
            "connection_id" => {
                if let Some(i) = int().and_then(|i| u64::try_from(i).ok()) {
                    self.set(A::ConnectionId, AttrValue::Uint(i));
                }
            }
            "requested_server_name" => string(self, A::ConnectionSni),
            "downstream_tls_version" => string(self, A::ConnectionTlsVersion),
            "downstream_peer_cert_presented" => {
                let b = matches!(value, Field::Bool(true)) || text == Some("true");
                self.set(A::ConnectionMtls, AttrValue::Bool(b));
            }
            "downstream_remote_address" => self.address(str_of(), A::SourceAddress, A::SourcePort),
            "downstream_local_address" => {
                self.address(str_of(), A::DestinationAddress, A::DestinationPort)
            }
            "upstream_host" => string(self, A::XdsUpstreamHost),
            "route_name" => self.route(&str_of()),
            "gateway.name" | "gateway_name" => string(self, A::RouteGateway),
            "gateway.namespace" | "gateway_namespace" => string(self, A::RouteGatewayNamespace),
            "project_name" => string(self, A::Project),
            "gen_ai.usage.input_tokens" => number(self, A::GenAiInputTokens),
            "gen_ai.usage.output_tokens" => number(self, A::GenAiOutputTokens),
            "gen_ai.usage.cache_read.input_tokens" | "gen_ai.usage.cache_read_input_tokens" => {
                number(self, A::GenAiCacheReadTokens)
            }
            "gen_ai.usage.cache_creation.input_tokens"
            | "gen_ai.usage.cache_creation_input_tokens" => {
                number(self, A::GenAiCacheCreationTokens)
            }
            "gen_ai.request.model" => string(self, A::GenAiRequestModel),
            "gen_ai.response.model" => string(self, A::GenAiResponseModel),
            "gen_ai.provider.name" | "gen_ai.system" => string(self, A::GenAiProviderName),
            "gen_ai.operation.name" => string(self, A::GenAiOperationName),
            other if is_header_name(other) && headers.len() < MAX_HEADERS => {
                headers.push((other.to_owned(), str_of()));
            }
            _ => {}
        }
    }

    /// `ip:port` (or `[v6]:port`) into an address and a port.
    fn address(&mut self, text: String, address: A, port: A) {
        match text.rsplit_once(':') {
            Some((host, p)) if p.parse::<u16>().is_ok() => {
                let host = host.trim_start_matches('[').trim_end_matches(']');
                self.set(address, AttrValue::Str(host.to_owned()));
                if let Ok(p) = p.parse::<i64>() {
                    self.set(port, AttrValue::Int(p));
                }
            }
            _ => self.set(address, AttrValue::Str(text)),
        }
    }

    /// `httproute/<namespace>/<name>/rule/<n>[/...]`.
    fn route(&mut self, text: &str) {
        self.set(A::RouteName, AttrValue::Str(text.to_owned()));
        let mut parts = text.split('/');
        if parts.next() != Some("httproute") {
            return;
        }
        if let (Some(ns), Some(name)) = (parts.next(), parts.next())
            && !ns.is_empty()
            && !name.is_empty()
        {
            self.set(A::RouteNamespace, AttrValue::Str(ns.to_owned()));
            self.set(A::RouteHttproute, AttrValue::Str(name.to_owned()));
            if parts.next() == Some("rule")
                && let Some(rule) = parts.next().and_then(|r| r.parse::<i64>().ok())
            {
                self.set(A::RouteRule, AttrValue::Int(rule));
            }
        }
    }

    /// Reads an Envoy Gateway JSON access-log line.
    pub fn from_json_line(line: &[u8]) -> Result<Record, serde_json::Error> {
        let fields = crate::JsonFields::parse_slice(line)?;
        Ok(Record::from_fields(fields.iter()))
    }

    /// Reads a parsed JSON object.
    pub fn from_json(object: &serde_json::Map<String, serde_json::Value>) -> Record {
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
