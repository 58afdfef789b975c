//! Request bodies of CloudEvents read straight from their bytes.
//!
//! A batch is read in one pass of `serde_json` into [`RawEvent`]s: the
//! attribute strings borrow from the body where they hold no escapes, and
//! no `serde_json::Value` is built for an event's envelope (only for its
//! `data` and extension attributes, which meters and the store read as
//! values). [`RawEvent::validate`] then applies the one set of CloudEvent
//! rules; [`crate::parse_event`] builds a [`RawEvent`] from a `Value` and
//! validates it the same way.
//!
//! **Invariant:** for any JSON text, reading it here and validating gives
//! what [`split_batch`] plus [`crate::parse_event`] gives: the same events,
//! the same errors in the same order, the same malformed-body answers
//! (including `serde_json`'s nesting limit, which applies to every value
//! read here because every value goes through the same deserializer). A
//! proptest holds the two paths to each other.

use std::borrow::Cow;
use std::fmt;

use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{self, Deserialize, Deserializer, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::event::BatchError;

/// One attribute of an event as the body holds it.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Attr<'a> {
    /// Not in the event.
    #[default]
    Absent,
    /// JSON `null`.
    Null,
    /// A string.
    Str(Cow<'a, str>),
    /// Any other JSON value, by its type name ([`crate::event::json_type`]).
    Other(&'static str),
}

impl<'a> Attr<'a> {
    fn from_value(value: Value) -> Attr<'a> {
        match value {
            Value::Null => Attr::Null,
            Value::String(s) => Attr::Str(Cow::Owned(s)),
            other => Attr::Other(crate::event::json_type(&other)),
        }
    }

    /// The string, if the attribute is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Attr::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One event of a request before validation: its attributes as the body
/// holds them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RawEvent<'a> {
    /// Whether the event is a JSON object at all.
    pub(crate) object: bool,
    pub(crate) specversion: Attr<'a>,
    pub(crate) id: Attr<'a>,
    pub(crate) source: Attr<'a>,
    pub(crate) kind: Attr<'a>,
    pub(crate) subject: Attr<'a>,
    pub(crate) datacontenttype: Attr<'a>,
    pub(crate) dataschema: Attr<'a>,
    pub(crate) time: Attr<'a>,
    /// `data` when present (`Value::Null` for `null`).
    pub(crate) data: Option<Value>,
    /// Every other member, `data_base64` included, as a `Value` object
    /// would hold it.
    pub(crate) extensions: Map<String, Value>,
}

impl<'a> RawEvent<'a> {
    /// The event of a JSON value (not an object: an event that is refused).
    pub fn from_value(value: Value) -> RawEvent<'a> {
        let Value::Object(object) = value else {
            return RawEvent::default();
        };
        let mut raw = RawEvent {
            object: true,
            ..RawEvent::default()
        };
        for (key, value) in object {
            if let Some(slot) = raw.attribute(&key) {
                *slot = Attr::from_value(value);
            } else if key == "data" {
                raw.data = Some(value);
            } else {
                raw.extensions.insert(key, value);
            }
        }
        raw
    }

    /// The slot of a context attribute Tally reads as a string.
    fn attribute(&mut self, name: &str) -> Option<&mut Attr<'a>> {
        Some(match name {
            "specversion" => &mut self.specversion,
            "id" => &mut self.id,
            "source" => &mut self.source,
            "type" => &mut self.kind,
            "subject" => &mut self.subject,
            "datacontenttype" => &mut self.datacontenttype,
            "dataschema" => &mut self.dataschema,
            "time" => &mut self.time,
            _ => return None,
        })
    }

    /// The event's `id`, if it is a string.
    pub fn id(&self) -> Option<&str> {
        self.id.as_str()
    }

    /// The event's `data`, if present (`null` included).
    pub fn data(&self) -> Option<&Value> {
        self.data.as_ref()
    }

    fn from_map<A: MapAccess<'a>>(mut map: A) -> Result<RawEvent<'a>, A::Error> {
        let mut raw = RawEvent {
            object: true,
            ..RawEvent::default()
        };
        while let Some(Key(key)) = map.next_key()? {
            if let Some(slot) = raw.attribute(&key) {
                *slot = map.next_value()?;
            } else if key == "data" {
                raw.data = Some(map.next_value()?);
            } else {
                raw.extensions.insert(key.into_owned(), map.next_value()?);
            }
        }
        Ok(raw)
    }
}

/// A member name, borrowed from the body when it holds no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// What a value is when it is not the string or object a reader wants:
/// read whole as a `Value` (so `serde_json`'s nesting limit applies as it
/// does to any value), then named by its type.
fn type_of_seq<'de, A: SeqAccess<'de>>(seq: A) -> Result<&'static str, A::Error> {
    Value::deserialize(SeqAccessDeserializer::new(seq)).map(|v| crate::event::json_type(&v))
}

impl<'de> Deserialize<'de> for Attr<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AttrVisitor;
        impl<'de> Visitor<'de> for AttrVisitor {
            type Value = Attr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Attr<'de>, E> {
                Ok(Attr::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Attr<'de>, E> {
                Ok(Attr::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Attr<'de>, E> {
                Ok(Attr::Str(Cow::Owned(v)))
            }
            fn visit_unit<E>(self) -> Result<Attr<'de>, E> {
                Ok(Attr::Null)
            }
            fn visit_none<E>(self) -> Result<Attr<'de>, E> {
                Ok(Attr::Null)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Attr<'de>, E> {
                Ok(Attr::Other("boolean"))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Attr<'de>, E> {
                Ok(Attr::Other("number"))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Attr<'de>, E> {
                Ok(Attr::Other("number"))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Attr<'de>, E> {
                Ok(Attr::Other("number"))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Attr<'de>, A::Error> {
                type_of_seq(seq).map(Attr::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Attr<'de>, A::Error> {
                Value::deserialize(MapAccessDeserializer::new(map))
                    .map(|v| Attr::Other(crate::event::json_type(&v)))
            }
        }
        deserializer.deserialize_any(AttrVisitor)
    }
}

/// What a body of events holds at its top level: an array, or one value.
enum Body<T> {
    Many(Vec<T>),
    One(T),
}

/// An item of a body: a `Value`, or a [`RawEvent`].
trait Item<'de>: Deserialize<'de> {
    fn is_object(&self) -> bool;
    /// The item of an object whose members `map` yields.
    fn from_map<A: MapAccess<'de>>(map: A) -> Result<Self, A::Error>;
    /// The item of a value that is neither an array nor an object.
    fn scalar<D: Deserializer<'de>>(value: D) -> Result<Self, D::Error>;
}

impl<'de> Item<'de> for Value {
    fn is_object(&self) -> bool {
        self.is_object()
    }
    fn from_map<A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        Value::deserialize(MapAccessDeserializer::new(map))
    }
    fn scalar<D: Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        Value::deserialize(value)
    }
}

impl<'de> Item<'de> for RawEvent<'de> {
    fn is_object(&self) -> bool {
        self.object
    }
    fn from_map<A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        RawEvent::from_map(map)
    }
    fn scalar<D: Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        // Read (and so checked) like any value; it is not an event.
        Value::deserialize(value).map(|_| RawEvent::default())
    }
}

impl<'de> Deserialize<'de> for RawEvent<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Body::<RawEvent<'de>>::deserialize(deserializer)? {
            Body::One(event) => Ok(event),
            // An array where an event should be: not an event.
            Body::Many(_) => Ok(RawEvent::default()),
        }
    }
}

impl<'de, T: Item<'de>> Deserialize<'de> for Body<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BodyVisitor<T>(std::marker::PhantomData<T>);
        macro_rules! scalar {
            ($name:ident, $t:ty) => {
                fn $name<E: de::Error>(self, v: $t) -> Result<Body<T>, E> {
                    T::scalar(v.into_deserializer()).map(Body::One)
                }
            };
        }
        impl<'de, T: Item<'de>> Visitor<'de> for BodyVisitor<T> {
            type Value = Body<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            scalar!(visit_bool, bool);
            scalar!(visit_i64, i64);
            scalar!(visit_u64, u64);
            scalar!(visit_f64, f64);
            scalar!(visit_str, &str);
            scalar!(visit_string, String);
            fn visit_unit<E: de::Error>(self) -> Result<Body<T>, E> {
                T::scalar(().into_deserializer()).map(Body::One)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Body<T>, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Body::Many(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Body<T>, A::Error> {
                T::from_map(map).map(Body::One)
            }
        }
        deserializer.deserialize_any(BodyVisitor(std::marker::PhantomData))
    }
}

/// The media types a request of CloudEvents may have, for messages.
pub const EVENT_MEDIA_TYPES: &str = "application/cloudevents+json, application/cloudevents-batch+json, application/json or application/x-ndjson";

/// Splits a request body into JSON values, one per event, by its media type
/// (lower case, without parameters): `application/cloudevents+json` holds
/// one event object, `application/cloudevents-batch+json` an array,
/// `application/json` either, `application/x-ndjson` (or
/// `application/jsonl`) one event per non-blank line.
pub fn split_batch(media_type: &str, body: &[u8]) -> Result<Vec<Value>, BatchError> {
    split(media_type, body)
}

/// [`split_batch`], reading each event into a [`RawEvent`] that borrows
/// from `body`: what ingest validates with [`RawEvent::validate`].
pub fn split_events<'a>(media_type: &str, body: &'a [u8]) -> Result<Vec<RawEvent<'a>>, BatchError> {
    split(media_type, body)
}

fn split<'a, T: Item<'a>>(media_type: &str, body: &'a [u8]) -> Result<Vec<T>, BatchError> {
    let malformed =
        |e: serde_json::Error| BatchError::Malformed(format!("the body is not valid JSON: {e}"));
    let whole = || serde_json::from_slice::<Body<T>>(body).map_err(malformed);
    match media_type {
        "application/cloudevents+json" => match whole()? {
            Body::One(v) if v.is_object() => Ok(vec![v]),
            _ => Err(BatchError::Malformed(
                "application/cloudevents+json carries one event object; send arrays as application/cloudevents-batch+json".to_owned(),
            )),
        },
        "application/cloudevents-batch+json" => match whole()? {
            Body::Many(items) => Ok(items),
            Body::One(_) => Err(BatchError::Malformed(
                "application/cloudevents-batch+json must be a JSON array of events".to_owned(),
            )),
        },
        "application/json" => match whole()? {
            Body::Many(items) => Ok(items),
            Body::One(v) => Ok(vec![v]),
        },
        "application/x-ndjson" | "application/jsonl" => {
            let text = std::str::from_utf8(body)
                .map_err(|_| BatchError::Malformed("the body is not UTF-8".to_owned()))?;
            text.lines()
                .enumerate()
                .filter(|(_, line)| !line.trim().is_empty())
                .map(|(n, line)| {
                    serde_json::from_str::<T>(line).map_err(|e| {
                        BatchError::Malformed(format!("line {} is not valid JSON: {e}", n + 1))
                    })
                })
                .collect()
        }
        "" => Err(BatchError::UnsupportedMediaType(format!(
            "Content-Type is required: {EVENT_MEDIA_TYPES}"
        ))),
        other => Err(BatchError::UnsupportedMediaType(format!(
            "Content-Type {other:?} is not accepted; use {EVENT_MEDIA_TYPES}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{CloudEvent, FieldError};
    use crate::{media_type, parse_event};
    use jiff::Timestamp;
    use proptest::prelude::*;

    fn now() -> Timestamp {
        "2026-01-01T00:00:00Z".parse().unwrap()
    }

    #[test]
    fn splits_bodies_by_media_type() {
        assert_eq!(
            split_batch("application/json", b"{\"a\":1}").unwrap().len(),
            1
        );
        assert_eq!(
            split_batch("application/json", b"[{},{}]").unwrap().len(),
            2
        );
        assert_eq!(
            split_batch("application/x-ndjson", b"{}\n\n{}\n")
                .unwrap()
                .len(),
            2
        );
        assert!(split_batch("application/cloudevents+json", b"[]").is_err());
        assert!(split_batch("application/cloudevents-batch+json", b"{}").is_err());
        assert!(matches!(
            split_batch("text/plain", b"{}"),
            Err(BatchError::UnsupportedMediaType(_))
        ));
        assert_eq!(
            media_type(" Application/JSON; charset=utf-8"),
            "application/json"
        );
        let err = split_batch("application/x-ndjson", b"{}\n{oops\n").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn attribute_strings_borrow_from_the_body_unless_escaped() {
        let body = br#"{"id":"plain","source":"a\"b","i\u0064":"last"}"#;
        let events = split_events("application/json", body).unwrap();
        assert!(matches!(&events[0].source, Attr::Str(Cow::Owned(s)) if s == "a\"b"));
        // An escaped member name is the same name; the last one wins, as in
        // a `Value`.
        assert!(matches!(&events[0].id, Attr::Str(Cow::Borrowed("last"))));
    }

    type Outcome = Result<Vec<(Option<String>, Result<CloudEvent, Vec<FieldError>>)>, BatchError>;

    /// The reference: a `Value` of each event, then `parse_event`.
    fn by_values(media_type: &str, body: &[u8]) -> Outcome {
        split_batch(media_type, body).map(|values| {
            values
                .into_iter()
                .map(|v| {
                    let id = v.get("id").and_then(Value::as_str).map(str::to_owned);
                    (id, parse_event(v, now()))
                })
                .collect()
        })
    }

    fn by_raw_events(media_type: &str, body: &[u8]) -> Outcome {
        split_events(media_type, body).map(|events| {
            events
                .into_iter()
                .map(|e| (e.id().map(str::to_owned), e.validate(now())))
                .collect()
        })
    }

    const NAMES: [&str; 15] = [
        "specversion",
        "id",
        "source",
        "type",
        "subject",
        "datacontenttype",
        "dataschema",
        "time",
        "data",
        "data_base64",
        "traceparent",
        "Bad-Name",
        "i\\u0064",
        "",
        "x1",
    ];
    const VALUES: [&str; 22] = [
        "\"1.0\"",
        "\"0.3\"",
        "\"\"",
        "\"a\\\"b\\n\"",
        "\"e1\"",
        "null",
        "5",
        "-1.5e3",
        "true",
        "[]",
        "[1,[2]]",
        "{}",
        "{\"value\":1}",
        "{\"dimensions\":{\"region\":\"eu\",\"n\":1}}",
        "\"application/json\"",
        "\"text/plain\"",
        "\"2026-01-01T10:00:00.5+02:00\"",
        "\"yesterday\"",
        "\"9999-12-31T23:59:59Z\"",
        "\"2025-12-31T23:00:00Z\"",
        "\"projects/p1\"",
        "\"\\u00e9t\\u00e9\"",
    ];

    /// The text of one event: members with names and values drawn from
    /// `NAMES` and `VALUES` (repeats included), or a value that is not an
    /// object.
    fn event_text() -> impl Strategy<Value = String> {
        let member = (0..NAMES.len(), 0..VALUES.len())
            .prop_map(|(n, v)| format!("\"{}\":{}", NAMES[n], VALUES[v]));
        let complete = proptest::collection::vec(member.clone(), 0..6).prop_map(|extra| {
            let mut members = vec![
                "\"specversion\":\"1.0\"".to_owned(),
                "\"id\":\"e1\"".to_owned(),
                "\"source\":\"s\"".to_owned(),
                "\"type\":\"t\"".to_owned(),
                "\"subject\":\"c\"".to_owned(),
            ];
            members.extend(extra);
            format!("{{{}}}", members.join(","))
        });
        let any = proptest::collection::vec(member, 0..12)
            .prop_map(|members| format!("{{{}}}", members.join(",")));
        prop_oneof![
            4 => complete,
            4 => any,
            1 => (0..VALUES.len()).prop_map(|v| VALUES[v].to_owned()),
        ]
    }

    /// A body of events, in one of the media types, sometimes cut short.
    fn body() -> impl Strategy<Value = (&'static str, String)> {
        let types = prop_oneof![
            Just("application/json"),
            Just("application/cloudevents+json"),
            Just("application/cloudevents-batch+json"),
            Just("application/x-ndjson"),
        ];
        (
            types,
            proptest::collection::vec(event_text(), 0..4),
            any::<bool>(),
            0..3usize,
            any::<proptest::sample::Index>(),
        )
            .prop_map(|(media_type, events, as_array, cut, at)| {
                let mut text = match media_type {
                    "application/x-ndjson" => events.join("\n"),
                    _ if as_array || events.len() != 1 => format!("[{}]", events.join(",")),
                    _ => events[0].clone(),
                };
                if cut == 0 && !text.is_empty() {
                    let mut end = at.index(text.len());
                    while !text.is_char_boundary(end) {
                        end -= 1;
                    }
                    text.truncate(end);
                }
                (media_type, text)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Reading events from the bytes gives exactly what a `Value` of
        /// each event and `parse_event` give: events, errors, ids, and
        /// malformed bodies alike.
        #[test]
        fn raw_events_agree_with_values((media_type, text) in body()) {
            prop_assert_eq!(
                by_raw_events(media_type, text.as_bytes()),
                by_values(media_type, text.as_bytes())
            );
        }
    }

    #[test]
    fn nesting_past_serde_json_limit_is_malformed_either_way() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        for text in [
            format!(r#"{{"id":"1","x":{deep}}}"#),
            format!(r#"{{"id":{deep}}}"#),
            format!(r#"[{deep}]"#),
            format!(r#"{{"data":{{"a":{deep}}}}}"#),
        ] {
            let raw = by_raw_events("application/json", text.as_bytes());
            assert!(matches!(raw, Err(BatchError::Malformed(_))), "{raw:?}");
            assert_eq!(raw, by_values("application/json", text.as_bytes()));
        }
    }
}
