//! CloudEvents 1.0 usage events and their structural validation.

use std::borrow::Cow;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::limits::{self, check_len};
use crate::wire::{Attr, RawEvent};

/// A structurally valid CloudEvent. `time` is always set: events that arrive
/// without one get their receipt time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudEvent {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub subject: String,
    pub time: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacontenttype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataschema: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// CloudEvents extension attributes, kept verbatim.
    #[serde(flatten)]
    pub extensions: Map<String, Value>,
}

/// One problem with one attribute of one event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    pub field: String,
    /// A stable, machine-readable code; one of the `error_code` constants.
    pub code: String,
    pub reason: String,
}

/// The codes of [`FieldError::code`]. The first four are the platform
/// ingestion contract's vocabulary (`POST /v1/usage/events`).
pub mod error_code {
    /// The event `id` is not a ULID (checked on the platform contract only).
    pub const INVALID_ULID: &str = "INVALID_ULID";
    /// A required attribute is absent, null or empty.
    pub const MISSING_REQUIRED_FIELD: &str = "MISSING_REQUIRED_FIELD";
    /// An attribute has the wrong JSON type, or a string that does not parse
    /// as the type it stands for (a timestamp, an integer).
    pub const INVALID_VALUE_TYPE: &str = "INVALID_VALUE_TYPE";
    /// `datacontenttype` is not a JSON media type.
    pub const INVALID_DATACONTENTTYPE: &str = "INVALID_DATACONTENTTYPE";
    /// A value of the right type that is not allowed (`specversion` other
    /// than 1.0, a bad extension name, binary data).
    pub const INVALID_VALUE: &str = "INVALID_VALUE";
    /// The event is older than the ledger's allowed lateness.
    pub const TOO_LATE: &str = "TOO_LATE";
    /// The event's time is further ahead of the receiver's clock than it
    /// allows.
    pub const TIME_IN_FUTURE: &str = "TIME_IN_FUTURE";
    /// A string is longer than its limit ([`crate::limits`]).
    pub const VALUE_TOO_LONG: &str = "VALUE_TOO_LONG";
}

/// Every problem found in one event, by its index in the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventError {
    pub index: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub errors: Vec<FieldError>,
}

/// A [`FieldError`] with one of the [`error_code`] codes.
pub fn field_error(field: &str, code: &str, reason: impl Into<String>) -> FieldError {
    FieldError {
        field: field.to_owned(),
        code: code.to_owned(),
        reason: reason.into(),
    }
}

/// Validates one JSON value as a CloudEvent and reports every problem at once.
///
/// `received` is used when the event carries no `time`.
pub fn parse_event(value: Value, received: Timestamp) -> Result<CloudEvent, Vec<FieldError>> {
    RawEvent::from_value(value).validate(received)
}

/// The string attributes of an event, taken: `None` where absent or wrong.
struct Strings {
    specversion: Option<String>,
    id: Option<String>,
    source: Option<String>,
    kind: Option<String>,
    subject: Option<String>,
    datacontenttype: Option<String>,
    dataschema: Option<String>,
    time: Option<String>,
}

/// The attribute as a string, or the problem with it.
fn take_string(
    attr: Attr<'_>,
    field: &str,
    required: bool,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    match attr {
        Attr::Str(s) if s.is_empty() && required => {
            errors.push(field_error(
                field,
                error_code::MISSING_REQUIRED_FIELD,
                "must not be empty",
            ));
            None
        }
        Attr::Str(s) => Some(s.into_owned()),
        Attr::Null | Attr::Absent if !required => None,
        Attr::Null | Attr::Absent => {
            errors.push(field_error(
                field,
                error_code::MISSING_REQUIRED_FIELD,
                "is required",
            ));
            None
        }
        Attr::Other(json_type) => {
            errors.push(field_error(
                field,
                error_code::INVALID_VALUE_TYPE,
                format!("must be a string, got {json_type}"),
            ));
            None
        }
    }
}

impl Strings {
    /// Takes the string attributes of `raw`, required ones first, each
    /// within [`limits::MAX_ATTRIBUTE_BYTES`].
    fn take(raw: &mut RawEvent<'_>, errors: &mut Vec<FieldError>) -> Strings {
        let mut take = |attr: &mut Attr<'_>, field, required| {
            take_string(std::mem::take(attr), field, required, errors)
        };
        let strings = Strings {
            specversion: take(&mut raw.specversion, "specversion", true),
            id: take(&mut raw.id, "id", true),
            source: take(&mut raw.source, "source", true),
            kind: take(&mut raw.kind, "type", true),
            subject: take(&mut raw.subject, "subject", true),
            datacontenttype: take(&mut raw.datacontenttype, "datacontenttype", false),
            dataschema: take(&mut raw.dataschema, "dataschema", false),
            time: take(&mut raw.time, "time", false),
        };
        let attributes = [
            ("specversion", &strings.specversion),
            ("id", &strings.id),
            ("source", &strings.source),
            ("type", &strings.kind),
            ("subject", &strings.subject),
            ("datacontenttype", &strings.datacontenttype),
            ("dataschema", &strings.dataschema),
            ("time", &strings.time),
        ];
        for (field, value) in attributes {
            if let Some(value) = value
                && let Err(e) = check_len(field, value, limits::MAX_ATTRIBUTE_BYTES)
            {
                errors.push(e);
            }
        }
        strings
    }

    /// The values of `specversion` and `datacontenttype`, and `time` parsed
    /// (`received` when absent).
    fn check_values(
        &mut self,
        received: Timestamp,
        errors: &mut Vec<FieldError>,
    ) -> Option<Timestamp> {
        if let Some(v) = &self.specversion
            && v != "1.0"
        {
            errors.push(field_error(
                "specversion",
                error_code::INVALID_VALUE,
                format!("must be \"1.0\", got {v:?}"),
            ));
        }
        if let Some(ct) = &self.datacontenttype
            && !(ct.starts_with("application/json") || ct.ends_with("+json"))
        {
            errors.push(field_error(
                "datacontenttype",
                error_code::INVALID_DATACONTENTTYPE,
                format!("must be a JSON media type, got {ct:?}"),
            ));
        }
        match self.time.take() {
            None => Some(received),
            Some(t) => match t.parse::<Timestamp>() {
                Ok(t) => Some(t),
                Err(e) => {
                    errors.push(time_error(&t, &e));
                    None
                }
            },
        }
    }
}

impl<'a> RawEvent<'a> {
    /// [`RawEvent::validate`], naming a refused event by its `id` (when a
    /// string) as an answer does.
    pub fn validate_named(
        self,
        received: Timestamp,
    ) -> Result<CloudEvent, (Option<Cow<'a, str>>, Vec<FieldError>)> {
        // Free unless the id held escapes: it borrows from the body.
        let id = match &self.id {
            Attr::Str(s) => Some(s.clone()),
            _ => None,
        };
        self.validate(received).map_err(|errors| (id, errors))
    }

    /// Validates the event and reports every problem at once: the one set
    /// of CloudEvent rules, whichever way the event was read.
    ///
    /// `received` is used when the event carries no `time`.
    pub fn validate(mut self, received: Timestamp) -> Result<CloudEvent, Vec<FieldError>> {
        if !self.object {
            return Err(vec![field_error(
                "",
                error_code::INVALID_VALUE_TYPE,
                "an event must be a JSON object",
            )]);
        }
        let mut errors = Vec::new();
        let mut strings = Strings::take(&mut self, &mut errors);
        let time = strings.check_values(received, &mut errors);
        let data = check_data(self.data.take(), &self.extensions, &mut errors);
        check_extensions(&self.extensions, &mut errors);
        let Strings {
            specversion,
            id,
            source,
            kind,
            subject,
            datacontenttype,
            dataschema,
            time: _,
        } = strings;
        match (specversion, id, source, kind, subject, time) {
            (Some(specversion), Some(id), Some(source), Some(kind), Some(subject), Some(time))
                if errors.is_empty() =>
            {
                Ok(CloudEvent {
                    specversion,
                    id,
                    source,
                    kind,
                    subject,
                    time,
                    datacontenttype,
                    dataschema,
                    data,
                    extensions: self.extensions,
                })
            }
            _ => Err(errors),
        }
    }
}

/// `data` if it is an object (`None` when absent or null), refusing
/// `data_base64` and oversized dimension values.
fn check_data(
    data: Option<Value>,
    extensions: &Map<String, Value>,
    errors: &mut Vec<FieldError>,
) -> Option<Value> {
    let data = match data {
        None | Some(Value::Null) => None,
        Some(Value::Object(map)) => Some(Value::Object(map)),
        Some(other) => {
            errors.push(field_error(
                "data",
                error_code::INVALID_VALUE_TYPE,
                format!("must be a JSON object, got {}", json_type(&other)),
            ));
            None
        }
    };
    if extensions.contains_key("data_base64") {
        errors.push(field_error(
            "data_base64",
            error_code::INVALID_VALUE,
            "binary data is not supported for usage events",
        ));
    }
    if let Some(Value::Object(data)) = &data {
        check_dimension_values(data, errors);
    }
    data
}

/// Extension attribute names, and string values within
/// [`limits::MAX_DIMENSION_VALUE_BYTES`].
fn check_extensions(extensions: &Map<String, Value>, errors: &mut Vec<FieldError>) {
    for (key, value) in extensions {
        if !is_valid_extension_name(key) {
            errors.push(field_error(
                key,
                error_code::INVALID_VALUE,
                "extension attribute names must be 1-20 lower-case letters or digits",
            ));
        } else if let Value::String(s) = value
            && let Err(e) = check_len(key, s, limits::MAX_DIMENSION_VALUE_BYTES)
        {
            errors.push(e);
        }
    }
}

/// Refuses string dimension values of the platform's event shape
/// (`data.dimensions.<name>`) longer than
/// [`limits::MAX_DIMENSION_VALUE_BYTES`]. What a meter's own JSONPath
/// selects is bounded when the meter samples the event.
fn check_dimension_values(data: &Map<String, Value>, errors: &mut Vec<FieldError>) {
    let Some(Value::Object(dimensions)) = data.get("dimensions") else {
        return;
    };
    for (name, value) in dimensions {
        if let Value::String(s) = value
            && s.len() > limits::MAX_DIMENSION_VALUE_BYTES
        {
            let field = format!("data.dimensions.{name}");
            errors.extend(check_len(&field, s, limits::MAX_DIMENSION_VALUE_BYTES).err());
        }
    }
}

/// Why `time` does not parse: not RFC 3339 at all, or a well-formed date
/// outside the range of instants every time zone can represent.
fn time_error(text: &str, error: &jiff::Error) -> FieldError {
    match jiff::fmt::temporal::Pieces::parse(text) {
        Ok(pieces) => {
            let future = pieces.date().year() > 1970;
            field_error(
                "time",
                if future {
                    error_code::TIME_IN_FUTURE
                } else {
                    error_code::TOO_LATE
                },
                format!(
                    "{text:?} is outside the range of times Tally stores ({} to {})",
                    Timestamp::MIN,
                    Timestamp::MAX
                ),
            )
        }
        Err(_) => field_error(
            "time",
            error_code::INVALID_VALUE_TYPE,
            format!("not an RFC 3339 timestamp: {error}"),
        ),
    }
}

fn is_valid_extension_name(name: &str) -> bool {
    // CloudEvents 1.0 says SHOULD be at most 20 characters; we accept longer
    // names but keep the character rule, which is a MUST.
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Why a request body could not be split into events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// The body does not hold what its media type says (HTTP 400).
    #[error("{0}")]
    Malformed(String),
    /// The media type is absent or not one of [`crate::EVENT_MEDIA_TYPES`] (HTTP 415).
    #[error("{0}")]
    UnsupportedMediaType(String),
}

/// The media type of a `Content-Type` value: lower case, without
/// parameters (`Application/JSON; charset=utf-8` → `application/json`).
pub fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// The JSON type name of a value, for error messages.
pub fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> Timestamp {
        "2026-01-01T00:00:00Z".parse().unwrap()
    }

    #[test]
    fn accepts_a_minimal_event_and_defaults_time() {
        let e = parse_event(
            json!({"specversion":"1.0","id":"1","source":"s","type":"t","subject":"c"}),
            now(),
        )
        .unwrap();
        assert_eq!(e.time, now());
        assert_eq!(e.data, None);
    }

    #[test]
    fn reports_every_problem() {
        let errors = parse_event(
            json!({"specversion":"0.3","id":5,"type":"","time":"yesterday","data":[1]}),
            now(),
        )
        .unwrap_err();
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "id",
                "source",
                "type",
                "subject",
                "specversion",
                "time",
                "data"
            ]
        );
    }

    #[test]
    fn keeps_extensions_and_round_trips() {
        let e = parse_event(
            json!({"specversion":"1.0","id":"1","source":"s","type":"t","subject":"c",
                   "time":"2026-01-01T10:00:00.5+02:00","traceparent":"x","data":{"v":1}}),
            now(),
        )
        .unwrap();
        assert_eq!(e.extensions["traceparent"], "x");
        let back: CloudEvent = serde_json::from_value(serde_json::to_value(&e).unwrap()).unwrap();
        assert_eq!(back, e);
        assert_eq!(e.time.to_string(), "2026-01-01T08:00:00.5Z");
    }

    #[test]
    fn refuses_bad_extension_names() {
        let errors = parse_event(
            json!({"specversion":"1.0","id":"1","source":"s","type":"t","subject":"c","Bad-Name":1}),
            now(),
        )
        .unwrap_err();
        assert_eq!(errors[0].field, "Bad-Name");
    }

    #[test]
    fn refuses_oversized_attributes_naming_field_and_limit() {
        let long = "x".repeat(70_000);
        let errors = parse_event(
            json!({"specversion":"1.0","id":long,"source":long,"type":long,"subject":long,
                   "dataschema":long,"ext":long,"data":{"dimensions":{"region":long,"n":1}}}),
            now(),
        )
        .unwrap_err();
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "id",
                "source",
                "type",
                "subject",
                "dataschema",
                "data.dimensions.region",
                "ext"
            ]
        );
        assert!(errors.iter().all(|e| e.code == error_code::VALUE_TOO_LONG));
        assert!(errors[0].reason.contains("1024"), "{}", errors[0].reason);
        assert!(errors[5].reason.contains("4096"), "{}", errors[5].reason);
    }

    #[test]
    fn times_out_of_range_say_so() {
        let errors = parse_event(
            json!({"specversion":"1.0","id":"1","source":"s","type":"t","subject":"c",
                   "time":"9999-12-31T23:59:59Z"}),
            now(),
        )
        .unwrap_err();
        assert_eq!(errors[0].code, error_code::TIME_IN_FUTURE);
        assert!(
            errors[0].reason.contains("outside the range"),
            "{}",
            errors[0].reason
        );
    }

    #[test]
    fn accepts_attributes_at_their_limits() {
        let at = "x".repeat(limits::MAX_ATTRIBUTE_BYTES);
        let dim = "y".repeat(limits::MAX_DIMENSION_VALUE_BYTES);
        let e = parse_event(
            json!({"specversion":"1.0","id":at,"source":at,"type":at,"subject":at,
                   "ext":dim,"data":{"dimensions":{"region":dim}}}),
            now(),
        )
        .unwrap();
        assert_eq!(e.id.len(), limits::MAX_ATTRIBUTE_BYTES);
    }
}
