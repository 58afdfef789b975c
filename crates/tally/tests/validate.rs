//! `tally meters validate` and the verdict of `tally apply` against a real
//! `tally serve`: figures from real events, admin only, and a Draft meter
//! published with traffic that does not fit its unit is said to be unsafe.

use std::path::Path;

use serde_json::Value;

mod common;

const ADMIN: &str = "root-token";
const ACME: &str = "acme-token";

fn meter(phase: &str) -> String {
    format!(
        "apiVersion: billing.miloapis.com/v1alpha1\nkind: MeterDefinition\n\
         metadata: {{name: cpu-seconds}}\nspec:\n  meterName: cpu-seconds\n  phase: {phase}\n  \
         measurement: {{aggregation: Sum, unit: s, dimensions: [region, zone]}}\n  \
         event: {{type: cpu}}\n"
    )
}

/// NDJSON events of type `cpu`, one per value, an hour ago.
fn events(prefix: &str, values: &[(u64, &str)]) -> String {
    let hour_ago = (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1)).to_string();
    values
        .iter()
        .enumerate()
        .map(|(i, (value, region))| {
            format!(
                "{{\"specversion\":\"1.0\",\"id\":\"{prefix}{i}\",\"source\":\"t\",\"type\":\"cpu\",\
                 \"subject\":\"projects/acme\",\"time\":\"{hour_ago}\",\
                 \"data\":{{\"value\":{value},\"dimensions\":{{\"region\":\"{region}\"}}}}}}\n"
            )
        })
        .collect()
}

fn send(server: &common::Server, dir: &Path, name: &str, text: &str) {
    let file = dir.join(name);
    std::fs::write(&file, text).unwrap();
    common::ok(common::cli(
        &server.base,
        ADMIN,
        &["events", "send", file.to_str().unwrap()],
        "",
    ));
}

fn validate(server: &common::Server) -> Value {
    let out = common::ok(common::cli(
        &server.base,
        ADMIN,
        &["meters", "validate", "cpu-seconds", "-o", "json"],
        "",
    ));
    serde_json::from_str(&out).unwrap()
}

#[test]
fn a_draft_meter_is_validated_against_real_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::serve_with_tokens(dir.path(), ADMIN, &[("acme", ACME)]);
    common::ok(common::cli(
        &server.base,
        ADMIN,
        &["apply", "-f", "-"],
        &meter("Draft"),
    ));
    let clean: Vec<(u64, &str)> = (1..=10)
        .map(|v| (v, if v % 3 == 0 { "us" } else { "eu" }))
        .collect();
    send(&server, dir.path(), "clean.ndjson", &events("a", &clean));

    let r = validate(&server);
    assert_eq!(r["eventsSeen"], 10);
    assert_eq!(r["values"]["count"], 10);
    assert_eq!(r["values"]["min"], "1");
    assert_eq!(r["values"]["p50"], "5");
    assert_eq!(r["values"]["p99"], "10");
    assert_eq!(r["values"]["max"], "10");
    let region = &r["dimensions"][0];
    assert_eq!(region["name"], "region");
    assert_eq!(region["cardinality"], 2);
    assert_eq!(
        region["top"][0],
        serde_json::json!({"name": "eu", "events": 7})
    );
    assert_eq!(r["declaredNeverPresent"], serde_json::json!(["zone"]));
    assert_eq!(r["verdict"]["safeToPublish"], true, "{r:#}");

    // A project token may not read every subject's events through it.
    let refused = common::cli(
        &server.base,
        ACME,
        &["meters", "validate", "cpu-seconds"],
        "",
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("403"));

    // Byte counts sent as seconds: publishing would be unsafe, and `apply` says so.
    send(
        &server,
        dir.path(),
        "bytes.ndjson",
        &events("b", &[(4_294_967_296, "eu")]),
    );
    let r = validate(&server);
    assert_eq!(r["eventsSeen"], 11);
    assert_eq!(r["verdict"]["safeToPublish"], false);
    assert!(
        r["unitWarnings"][0]
            .as_str()
            .unwrap()
            .contains("look like bytes"),
        "{r:#}"
    );
    let table = common::ok(common::cli(
        &server.base,
        ADMIN,
        &["meters", "validate", "cpu-seconds"],
        "",
    ));
    assert!(table.contains("dimension region"), "{table}");
    assert!(table.contains("NOT safe to publish"), "{table}");

    let applied = common::ok(common::cli(
        &server.base,
        ADMIN,
        &["apply", "-f", "-"],
        &meter("Published"),
    ));
    assert!(applied.contains("configured"), "{applied}");
    assert!(
        applied.contains("meter cpu-seconds: NOT safe to publish"),
        "{applied}"
    );
    assert!(applied.contains("look like bytes"), "{applied}");
    // Once Published, applying it again validates nothing.
    let again = common::ok(common::cli(
        &server.base,
        ADMIN,
        &["apply", "-f", "-"],
        &meter("Published"),
    ));
    assert!(!again.contains("safe to publish"), "{again}");
}
