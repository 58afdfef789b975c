//! Names the cluster derives from events: the dedupe key sent as
//! `Nats-Msg-Id`, the project token of a subject, and key-value keys.
//!
//! The dedupe key is base64url (no padding) of
//! `u32 big-endian length of source ‖ source ‖ id`: unambiguous for any
//! source and id, and made only of characters a NATS header value and a
//! key-value key may hold.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tally_model::CloudEvent;

/// Longest project token put in a subject; a longer project publishes on
/// the default project.
const MAX_PROJECT_TOKEN: usize = 128;

/// The dedupe key of (source, id).
pub fn dedupe_key(source: &str, id: &str) -> String {
    let mut raw = Vec::with_capacity(4 + source.len() + id.len());
    raw.extend_from_slice(&(source.len() as u32).to_be_bytes());
    raw.extend_from_slice(source.as_bytes());
    raw.extend_from_slice(id.as_bytes());
    URL_SAFE_NO_PAD.encode(raw)
}

/// The subject token of the project an event belongs to: `p` of a subject
/// `projects/<p>`, else `default`. Characters a subject token may not hold
/// (`.`, `*`, `>`, whitespace, anything outside `[A-Za-z0-9_-]`) are written
/// `~XX` (hex of each byte), so no project can publish on another's subject.
pub fn project_token(event: &CloudEvent, default: &str) -> String {
    let Some(project) = event.subject.strip_prefix("projects/") else {
        return default.to_owned();
    };
    let project = project.split('/').next().unwrap_or_default();
    if project.is_empty() {
        return default.to_owned();
    }
    let mut token = String::with_capacity(project.len());
    for b in project.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            token.push(b as char);
        } else {
            token.push_str(&format!("~{b:02X}"));
        }
        if token.len() > MAX_PROJECT_TOKEN {
            return default.to_owned();
        }
    }
    token
}

/// Whether `token` is a valid single subject token of ours.
pub fn valid_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= MAX_PROJECT_TOKEN
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'~')
}

/// The subject that claims a dedupe key in the dedupe bucket. At most
/// about 2.8 KB for the longest source and id, so its `HPUB` line stays
/// under nats-server's 4 KB `max_control_line` (a longer one would close
/// the connection).
pub fn dedupe_subject(bucket: &str, key: &str) -> String {
    format!("$KV.{bucket}.{key}")
}

/// The subject an event is published on.
pub fn ingest_subject(project: &str) -> String {
    format!("billing.usage.{project}.ingest")
}

/// The subject a materialised event every meter measures is published on.
pub fn valid_subject(project: &str) -> String {
    format!("billing.usage.{project}.valid")
}

/// The subject a quarantined event is published on; `reason` is an
/// [`tally_meter::Unmeterable::code`] (upper case and `_` only).
pub fn quarantine_subject(project: &str, reason: &str) -> String {
    format!("billing.usage.{project}.quarantine.{reason}")
}

/// The key of a catalog resource in the catalog bucket: `<Kind>.<name>`,
/// the name base64url-encoded so any name is a valid key.
pub fn catalog_key(kind: &str, name: &str) -> String {
    format!("{kind}.{}", URL_SAFE_NO_PAD.encode(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(subject: &str) -> CloudEvent {
        tally_model::parse_event(
            json!({"specversion":"1.0","id":"1","source":"s","type":"t","subject":subject,"time":"2026-01-01T00:00:00Z"}),
            jiff::Timestamp::now(),
        )
        .unwrap()
    }

    #[test]
    fn dedupe_keys_are_unambiguous() {
        assert_ne!(dedupe_key("ab", "c"), dedupe_key("a", "bc"));
        assert!(
            dedupe_key("s/ü", "x y\n")
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
    }

    #[test]
    fn the_longest_dedupe_subject_fits_a_control_line() {
        let longest = "x".repeat(tally_model::limits::MAX_ATTRIBUTE_BYTES);
        let subject = dedupe_subject("tally-dedupe", &dedupe_key(&longest, &longest));
        // `HPUB <subject> <reply inbox> <header bytes> <total bytes>\r\n`
        assert!(subject.len() + 200 < 4096, "{}", subject.len());
    }

    #[test]
    fn projects_never_leave_their_token() {
        assert_eq!(project_token(&event("projects/p-1"), "default"), "p-1");
        assert_eq!(project_token(&event("projects/a.b>"), "d"), "a~2Eb~3E");
        assert_eq!(project_token(&event("projects/p/x"), "d"), "p");
        assert_eq!(project_token(&event("customer"), "d"), "d");
        assert_eq!(project_token(&event("projects/"), "d"), "d");
        let long = format!("projects/{}", "x".repeat(200));
        assert_eq!(project_token(&event(&long), "d"), "d");
        assert!(valid_token(&project_token(&event("projects/*"), "d")));
    }
}
