//! The top-level fields of a JSON access-log object (an Envoy Gateway line,
//! or an OTLP log record's JSON text body), read without building a
//! `serde_json::Value`: keys and strings are borrowed from the text unless
//! they hold an escape, nested objects and arrays are skipped (bounded by
//! `serde_json`'s recursion limit), and nothing else is allocated but the
//! list of fields.
//!
//! **Invariant:** [`JsonFields::iter`] yields what iterating a parsed
//! `serde_json::Map` would: keys in sorted order, a repeated key once with
//! its last value, numbers as `Int` when they fit an `i64` and `Double`
//! otherwise, `null` and nested values as [`Field::Null`] (which
//! [`Record::from_fields`](crate::Record::from_fields) ignores).

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::record::{Field, Input};

/// A JSON object's top-level fields.
#[derive(Debug, Default)]
pub struct JsonFields<'a> {
    fields: Vec<(Cow<'a, str>, Scalar<'a>)>,
}

/// A top-level value.
#[derive(Debug)]
enum Scalar<'a> {
    Str(Cow<'a, str>),
    Int(i64),
    Double(f64),
    Bool(bool),
    /// `null`, an object or an array.
    Other,
}

impl<'a> JsonFields<'a> {
    /// Reads the fields of the JSON object `text`.
    pub fn parse(text: &'a str) -> Result<JsonFields<'a>, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Reads the fields of the JSON object `bytes`.
    pub fn parse_slice(bytes: &'a [u8]) -> Result<JsonFields<'a>, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The fields as a record reads them, keys sorted.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Field<'_>)> {
        self.fields.iter().map(|(key, value)| {
            let field = match value {
                Scalar::Str(s) => Field::Str(s),
                Scalar::Int(i) => Field::Int(*i),
                Scalar::Double(d) => Field::Double(*d),
                Scalar::Bool(b) => Field::Bool(*b),
                Scalar::Other => Field::Null,
            };
            (&**key, field)
        })
    }

    /// The fields as [`crate::RecordBuilder`] takes them, strings moved.
    pub(crate) fn into_inputs(self) -> impl Iterator<Item = (Cow<'a, str>, Input<'a>)> {
        self.fields.into_iter().map(|(key, value)| {
            let input = match value {
                Scalar::Str(s) => Input::Str(s),
                Scalar::Int(i) => Input::Int(i),
                Scalar::Double(d) => Input::Double(d),
                Scalar::Bool(b) => Input::Bool(b),
                Scalar::Other => Input::Null,
            };
            (key, input)
        })
    }

    /// Sorted by key, the last of a repeated key kept (as a map would), in
    /// place.
    fn settle(mut self) -> Self {
        // Stable: of a repeated key, the last value stays last.
        self.fields.sort_by(|a, b| a.0.cmp(&b.0));
        // `dedup_by` removes the later of two equal keys: give the kept,
        // earlier one the later value first.
        self.fields.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                std::mem::swap(&mut later.1, &mut kept.1);
            }
            same
        });
        self
    }
}

impl<'de> Deserialize<'de> for JsonFields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Object;
        impl<'de> Visitor<'de> for Object {
            type Value = JsonFields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some(Text(key)) = map.next_key()? {
                    let value: Scalar<'de> = map.next_value()?;
                    fields.push((key, value));
                }
                Ok(JsonFields { fields }.settle())
            }
        }
        deserializer.deserialize_map(Object)
    }
}

/// A key or string, borrowed when the text allows.
struct Text<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Str;
        impl<'de> Visitor<'de> for Str {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(Str)
    }
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v)))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Scalar::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(match i64::try_from(v) {
            Ok(i) => Scalar::Int(i),
            Err(_) => Scalar::Double(v as f64),
        })
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Scalar::Double(v))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Bool(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }
    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Self::Value, S::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What iterating a parsed `serde_json::Map` yields (the reference).
    fn reference(text: &str) -> Option<Vec<(String, String)>> {
        let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text).ok()?;
        Some(
            object
                .iter()
                .map(|(k, v)| {
                    let field = match v {
                        serde_json::Value::String(s) => format!("{:?}", Field::Str(s)),
                        serde_json::Value::Number(n) => match n.as_i64() {
                            Some(i) => format!("{:?}", Field::Int(i)),
                            None => format!("{:?}", Field::Double(n.as_f64().unwrap_or(f64::NAN))),
                        },
                        serde_json::Value::Bool(b) => format!("{:?}", Field::Bool(*b)),
                        _ => format!("{:?}", Field::Null),
                    };
                    (k.clone(), field)
                })
                .collect(),
        )
    }

    fn ours(text: &str) -> Option<Vec<(String, String)>> {
        let fields = JsonFields::parse(text).ok()?;
        Some(
            fields
                .iter()
                .map(|(k, f)| (k.to_owned(), format!("{f:?}")))
                .collect(),
        )
    }

    #[test]
    fn reads_a_line_like_a_map_does() {
        let line = r#"{"path":"/a\"b","response_code":503,"duration":"35","x":{"y":[1,{"z":2}]},
            "n":null,"big":18446744073709551615,"f":1.5,"ok":true,"path":"/last","k\u0041":"v"}"#;
        assert_eq!(ours(line), reference(line));
        let fields = JsonFields::parse(line).unwrap();
        let path = fields.iter().find(|(k, _)| *k == "path").map(|(_, f)| f);
        assert_eq!(path, Some(Field::Str("/last")));
        assert!(JsonFields::parse("[1]").is_err());
        assert!(JsonFields::parse("{\"a\":").is_err());
    }

    fn scalar() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            (-1e9f64..1e9).prop_map(serde_json::Value::from),
            any::<bool>().prop_map(serde_json::Value::from),
            "[a-z\"\\\\/é -]{0,8}".prop_map(serde_json::Value::from),
            Just(serde_json::Value::Null),
            Just(serde_json::json!({"a": [1, {"b": null}]})),
        ]
    }

    proptest! {
        /// Any object (keys repeated, escapes, nesting) reads as the map.
        #[test]
        fn matches_the_map_reading(fields in prop::collection::vec(("[a-c\"é]{1,3}", scalar()), 0..12)) {
            let body: Vec<String> = fields
                .iter()
                .map(|(k, v)| format!("{}:{}", serde_json::Value::from(k.as_str()), v))
                .collect();
            let text = format!("{{{}}}", body.join(","));
            prop_assert_eq!(ours(&text), reference(&text));
        }
    }
}
