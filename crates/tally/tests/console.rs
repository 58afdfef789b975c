//! The web console in a real headless browser: Debian's `chromium` driven
//! by Playwright for Python (`console/browser.py`, in a venv cached under
//! `target/`), against a real `tally serve`. Known events go in over HTTP;
//! the figures the page shows are read back and checked here. Screenshots
//! of every page are written to `target/tmp/console-screenshots/`.
//!
//! Without chromium or the Playwright wheel the browser test is skipped,
//! unless `TALLY_REQUIRE_PEERS` is set (CI), where it fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use tally_billing::testing::venv;

mod common;

const ADMIN: &str = "root-token";
const ACME: &str = "acme-token";
const GLOBEX: &str = "globex-token";
/// The Playwright wheel, pinned; it drives the system chromium.
const PLAYWRIGHT: &str = "playwright==1.55.0";

const CATALOG: &str = "\
apiVersion: billing.miloapis.com/v1alpha1
kind: MeterDefinition
metadata: {name: api-calls}
spec:
  meterName: api-calls
  phase: Published
  measurement: {aggregation: Sum, unit: '{call}', dimensions: [region]}
  event: {type: api}
---
apiVersion: billing.miloapis.com/v1alpha1
kind: MeterDefinition
metadata: {name: gpu-seconds}
spec:
  meterName: gpu-seconds
  measurement: {aggregation: Sum, unit: s, dimensions: [region]}
  event: {type: gpu}
";

/// The catalog fix the browser test applies: `zone` declared.
const GPU_FIX: &str = "\
apiVersion: billing.miloapis.com/v1alpha1
kind: MeterDefinition
metadata: {name: gpu-seconds}
spec:
  meterName: gpu-seconds
  measurement: {aggregation: Sum, unit: s, dimensions: [region, zone]}
  event: {type: gpu}
";

/// One NDJSON event an hour ago.
fn event(id: &str, kind: &str, subject: &str, value: u64, dims: &str) -> String {
    let hour_ago = (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1)).to_string();
    format!(
        "{{\"specversion\":\"1.0\",\"id\":\"{id}\",\"source\":\"t\",\"type\":\"{kind}\",\
         \"subject\":\"{subject}\",\"time\":\"{hour_ago}\",\
         \"data\":{{\"value\":{value},\"dimensions\":{dims}}}}}\n"
    )
}

/// The catalog and a known set of events: acme used 3 + 4 calls, globex
/// 100; three GPU events carry a `zone` the Draft meter does not declare.
fn load(server: &common::Server, dir: &Path) {
    common::ok(common::cli(
        &server.base,
        ADMIN,
        &["apply", "-f", "-"],
        CATALOG,
    ));
    let events = [
        event("a1", "api", "projects/acme", 3, r#"{"region":"eu"}"#),
        event("a2", "api", "projects/acme", 4, r#"{"region":"us"}"#),
        event("g1", "api", "projects/globex", 100, r#"{"region":"eu"}"#),
        event(
            "q1",
            "gpu",
            "projects/acme",
            5,
            r#"{"region":"eu","zone":"a"}"#,
        ),
        event(
            "q2",
            "gpu",
            "projects/acme",
            6,
            r#"{"region":"eu","zone":"b"}"#,
        ),
        event(
            "q3",
            "gpu",
            "projects/globex",
            7,
            r#"{"region":"us","zone":"a"}"#,
        ),
    ]
    .concat();
    let file = dir.join("events.ndjson");
    std::fs::write(&file, events).unwrap();
    common::ok(common::cli(
        &server.base,
        ADMIN,
        &["events", "send", file.to_str().unwrap()],
        "",
    ));
}

/// Python with Playwright, and the system chromium; or why not.
fn browser() -> Result<(String, String), String> {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or("Debian's chromium is not installed (apt-get install chromium)")?;
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let python = venv::python_in(
        root,
        "tally-console-playwright-venv",
        &[PLAYWRIGHT],
        "import playwright.sync_api",
    )?;
    Ok((python, chromium.to_owned()))
}

fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_console_shows_the_right_usage_to_each_token() {
    let found = browser().map(|(python, chromium)| format!("{python}\n{chromium}"));
    let Some(found) = venv::or_skip(found, "Playwright with Debian's chromium") else {
        return;
    };
    let (python, chromium) = found.split_once('\n').unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server =
        common::serve_with_tokens(dir.path(), ADMIN, &[("acme", ACME), ("globex", GLOBEX)]);
    load(&server, dir.path());
    let shots = screenshots();
    let tokens = serde_json::json!({"admin": ADMIN, "acme": ACME, "globex": GLOBEX});
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console/browser.py");
    let output = Command::new(python)
        .arg(&script)
        .args([&server.base, chromium, shots.to_str().unwrap()])
        .args([&tokens.to_string(), GPU_FIX])
        .output()
        .unwrap();
    let page: Value = serde_json::from_str(&common::ok(output)).unwrap();
    check(&page);
    for name in [
        "usage",
        "usage-dark",
        "catalog",
        "billing",
        "telemetry",
        "instances",
        "instances-logs",
    ] {
        let shot = shots.join(format!("{name}.png"));
        assert!(
            std::fs::metadata(&shot).is_ok_and(|m| m.len() > 1000),
            "{shot:?}"
        );
    }
}

/// What the page showed, against the events sent.
fn check(page: &Value) {
    assert_eq!(page["console_errors"], serde_json::json!([]), "{page:#}");
    let csp = page["csp"].as_str().unwrap_or_default();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
    ] {
        assert!(csp.contains(directive), "{csp}");
    }
    assert_eq!(page["token_in_page"], false);
    assert_eq!(page["local_storage_items"], 0);
    assert_eq!(page["wrong_token_stored"], 0);
    // Admin: every project's calls, by subject.
    assert_eq!(page["admin"]["total"], "107", "{page:#}");
    assert_eq!(
        page["admin"]["groups"],
        serde_json::json!(["projects/acme", "projects/globex"])
    );
    assert!(page["admin"]["bars"].as_u64().unwrap() >= 2);
    // A project token sees its own usage only.
    assert_eq!(page["acme"]["total"], "7", "{page:#}");
    assert_eq!(page["acme"]["groups"], serde_json::json!(["projects/acme"]));
    assert!(
        page["acme_validation"]
            .as_str()
            .unwrap()
            .contains("admin token")
    );
    // Quarantine: the undeclared `zone`, listed, then measured after the fix.
    assert_eq!(
        page["quarantine_before"],
        serde_json::json!([["gpu-seconds", "UNDECLARED_DIMENSION", "3"]]),
        "{page:#}"
    );
    assert_eq!(page["quarantine_after"], serde_json::json!([]), "{page:#}");
    assert!(
        page["recheck_summary"]
            .as_str()
            .unwrap()
            .contains("3 measured"),
        "{page:#}"
    );
    // The Draft meter's validation, before and after the fix.
    assert_eq!(page["verdict_before"], "gpu-seconds: NOT safe to publish");
    assert_eq!(page["verdict_after"], "gpu-seconds: safe to publish");
    assert_eq!(page["after_arrow"], "Catalog");
    check_instances(page);
}

/// The Instances page against the lifecycle events and log lines sent.
fn check_instances(page: &Value) {
    let acme_row = json!(["acme", "web-0", "started"]);
    let globex_row = json!(["globex", "db-0", "crashed (InstanceCrashing)"]);
    assert_eq!(
        page["admin_instances"],
        json!([acme_row, globex_row]),
        "{page:#}"
    );
    let acme = &page["instances_acme"];
    assert_eq!(acme["instances"], json!([acme_row]), "{page:#}");
    assert_eq!(acme["events"], json!(["created", "scheduled", "started"]));
    assert_eq!(
        acme["logs"],
        json!(["listening on :8080", "warn: slow query"])
    );
    assert_eq!(acme["stderr"], json!(["warn: slow query"]));
    assert_eq!(acme["grep"], json!(["listening on :8080"]));
    // Posted while following: it appears without a reload.
    assert_eq!(
        acme["followed"],
        json!(["listening on :8080", "warn: slow query", "GET /healthz 200"])
    );
    // Another project's token sees its own instance and none of acme's.
    let globex = &page["instances_globex"];
    assert_eq!(globex["instances"], json!([globex_row]), "{page:#}");
    assert_eq!(globex["events"], json!(["created", "crashed"]));
    assert_eq!(globex["logs"], json!(["globex only line"]));
    let text = globex["text"].as_str().unwrap();
    for acme_only in ["web-0", "listening", "slow query", "healthz"] {
        assert!(!text.contains(acme_only), "{acme_only:?} in {text:?}");
    }
}
