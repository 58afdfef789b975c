//! The CloudEvents HTTP protocol binding's binary content mode (1.0, §3.1):
//! the event's attributes are `ce-<name>` headers, their values
//! percent-encoded; `Content-Type` is `datacontenttype`; the body is `data`.
//!
//! The attributes are gathered into a structured event and validated like
//! any other ([`tally_model::parse_event`]), so both modes share one set of
//! rules. A JSON body (`application/json`, `*+json`, or no content type)
//! becomes JSON `data`; a `text/*` body becomes a string; any other media
//! type is refused (415): a meter reads values out of JSON.

use axum::http::{HeaderMap, StatusCode};
use percent_encoding::percent_decode_str;
use serde_json::{Map, Value};

use crate::problem::Problem;

/// Most `ce-*` headers one request may carry.
const MAX_ATTRIBUTES: usize = 64;

/// Whether a request is in the binary content mode: it names
/// `ce-specversion` and its content type is not a structured one
/// (`application/cloudevents*`).
pub fn requested(headers: &HeaderMap) -> bool {
    headers.contains_key("ce-specversion")
        && !crate::body::media_type(headers).starts_with("application/cloudevents")
}

/// The structured form of the binary-mode event in `headers` and `body`.
pub fn event(headers: &HeaderMap, body: &[u8]) -> Result<Value, Problem> {
    let mut object = Map::new();
    for (name, value) in headers {
        let Some(attribute) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        if object.len() == MAX_ATTRIBUTES {
            return Err(Problem::bad_request(format!(
                "more than {MAX_ATTRIBUTES} ce-* headers"
            )));
        }
        let raw = value.to_str().map_err(|_| {
            Problem::bad_request(format!("header {name} is not ASCII; percent-encode it"))
        })?;
        let decoded = percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| Problem::bad_request(format!("header {name} does not decode to UTF-8")))?;
        if object
            .insert(attribute.to_owned(), Value::String(decoded.into_owned()))
            .is_some()
        {
            return Err(Problem::bad_request(format!(
                "header {name} may be given once"
            )));
        }
    }
    if object.contains_key("datacontenttype") || object.contains_key("data") {
        return Err(Problem::bad_request(
            "in binary mode, datacontenttype is the Content-Type header and data is the body",
        ));
    }
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let media_type = content_type
        .as_deref()
        .map(tally_model::media_type)
        .unwrap_or_default();
    let data = if body.is_empty() {
        None
    } else if media_type.is_empty()
        || media_type == "application/json"
        || media_type.ends_with("+json")
    {
        Some(
            serde_json::from_slice(body)
                .map_err(|e| Problem::bad_request(format!("the body (data) is not JSON: {e}")))?,
        )
    } else if media_type.starts_with("text/") {
        Some(Value::String(String::from_utf8(body.to_vec()).map_err(
            |_| Problem::bad_request("a text/* body must be UTF-8"),
        )?))
    } else {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("binary-mode data of type {media_type:?} cannot be metered; send JSON or text"),
        ));
    };
    if let Some(content_type) = content_type {
        object.insert("datacontenttype".into(), Value::String(content_type));
    }
    if let Some(data) = data {
        object.insert("data".into(), data);
    }
    Ok(Value::Object(object))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn headers_become_attributes_and_the_body_data() {
        let h = headers(&[
            ("ce-specversion", "1.0"),
            ("ce-id", "e-1"),
            ("ce-source", "s"),
            ("ce-type", "prompt"),
            ("ce-subject", "acme%20%E2%82%AC%25"),
            ("ce-time", "2026-01-01T00:00:00.5Z"),
            ("ce-region", "eu"),
            ("content-type", "application/json; charset=utf-8"),
        ]);
        let event = event(&h, br#"{"tokens": 10}"#).unwrap();
        assert_eq!(
            event,
            json!({"specversion": "1.0", "id": "e-1", "source": "s", "type": "prompt",
                   "subject": "acme €%", "time": "2026-01-01T00:00:00.5Z", "region": "eu",
                   "datacontenttype": "application/json; charset=utf-8", "data": {"tokens": 10}})
        );
        let text = super::event(
            &headers(&[("ce-id", "x"), ("content-type", "text/plain")]),
            b"hi",
        )
        .unwrap();
        assert_eq!(text["data"], "hi");
    }

    #[test]
    fn refuses_what_the_binding_does_not_allow() {
        let bad_json = event(&headers(&[("ce-id", "x")]), b"{oops").unwrap_err();
        assert_eq!(bad_json.status, 400);
        let binary = event(
            &headers(&[("ce-id", "x"), ("content-type", "application/octet-stream")]),
            b"\x00",
        )
        .unwrap_err();
        assert_eq!(binary.status, 415);
        let bad_utf8 = event(&headers(&[("ce-id", "%FF")]), b"").unwrap_err();
        assert_eq!(bad_utf8.status, 400);
        let data_header = event(&headers(&[("ce-data", "1")]), b"").unwrap_err();
        assert_eq!(data_header.status, 400);
    }
}
