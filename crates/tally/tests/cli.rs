//! The `tally` command line against a real `tally serve`, as a person uses it.

use std::path::Path;
use std::process::Output;

const TOKEN: &str = "cli-test-token-0123";

mod common;

use common::Server;

fn serve(dir: &Path) -> Server {
    common::serve(dir, &[("TALLY_TOKEN", TOKEN)])
}

fn tally(server: &Server, args: &[&str], stdin: Option<&str>) -> Output {
    common::cli(&server.base, TOKEN, args, stdin.unwrap_or(""))
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}\n{}",
        stderr(&output),
        stdout(&output)
    );
    stdout(&output)
}

const MANIFESTS: &str = "\
apiVersion: billing.miloapis.com/v1alpha1
kind: MeterDefinition
metadata: {name: requests}
spec:
  meterName: gw/requests
  measurement: {aggregation: Sum, unit: '{request}', dimensions: [method]}
---
apiVersion: billing.miloapis.com/v1alpha1
kind: MonitoredResourceType
metadata: {name: httproute}
spec:
  resourceTypeName: networking.datumapis.com/HTTPRoute
  labels: [{name: name, required: true}]
";

/// Two recent days (the server refuses events older than its lateness limit).
fn days() -> [jiff::civil::Date; 2] {
    let today = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date();
    let first = today.checked_sub(jiff::Span::new().days(3)).unwrap();
    [first, first.tomorrow().unwrap()]
}

/// Odd ids fall on the first day, even ids on the second.
fn event(id: u32, value: &str, method: &str) -> String {
    let day = days()[(id % 2) as usize ^ 1];
    format!(
        r#"{{"specversion":"1.0","id":"e{id}","source":"cli","type":"gw/requests","subject":"acme","time":"{day}T10:00:00Z","data":{{"value":{value},"dimensions":{{"method":"{method}"}}}}}}"#
    )
}

/// Midnight of `date` in Berlin, RFC 3339 with its offset.
fn berlin_midnight(date: jiff::civil::Date) -> String {
    let zoned = date
        .to_zoned(jiff::tz::TimeZone::get("Europe/Berlin").unwrap())
        .unwrap();
    zoned
        .timestamp()
        .display_with_offset(zoned.offset())
        .to_string()
}

#[test]
fn apply_get_send_query_and_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path());

    let applied = ok(tally(&server, &["apply", "-f", "-"], Some(MANIFESTS)));
    assert_eq!(
        applied,
        "meterdefinition/requests created\nmonitoredresourcetype/httproute created\n"
    );
    let file = dir.path().join("manifests.yaml");
    std::fs::write(&file, MANIFESTS).unwrap();
    let again = ok(tally(
        &server,
        &["apply", "-f", file.to_str().unwrap()],
        None,
    ));
    assert!(
        again.contains("meterdefinition/requests unchanged"),
        "{again}"
    );

    let table = ok(tally(&server, &["get", "md"], None));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0],
        "NAME       METER NAME    PHASE   AGGREGATION   UNIT        EVENT TYPE    READY"
    );
    assert!(
        lines[1]
            .starts_with("requests   gw/requests   Draft   SUM           {request}   gw/requests"),
        "{table}"
    );
    let yaml = ok(tally(
        &server,
        &["get", "meterdefinitions", "-o", "yaml"],
        None,
    ));
    assert!(
        yaml.starts_with("apiVersion: v1\nkind: List\nitems:\n"),
        "{yaml}"
    );
    let json = ok(tally(
        &server,
        &["get", "mrt", "httproute", "-o", "json"],
        None,
    ));
    let manifest: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        manifest["spec"]["resourceTypeName"],
        "networking.datumapis.com/HTTPRoute"
    );

    // Five good lines, then a bad one: the first batch of two lands, the
    // second batch (lines 3-4) does too, the batch with line 6 is not sent.
    let events = [
        event(1, "1", "GET"),
        event(2, "2", "GET"),
        event(3, "0.1", "POST"),
        event(4, "0.2", "POST"),
        event(5, "5", "GET"),
        "{not json".to_owned(),
    ]
    .join("\n");
    let output = tally(
        &server,
        &["events", "send", "-", "--batch-size", "2"],
        Some(&events),
    );
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "accepted 4, duplicates 0, quarantined 0\n",
        "{}",
        stderr(&output)
    );
    let error = stderr(&output);
    assert!(
        error.starts_with("error: sending events from standard input: line 6: "),
        "{error}"
    );

    let all_good = events.lines().take(5).collect::<Vec<_>>().join("\n");
    let sent = ok(tally(&server, &["events", "send", "-"], Some(&all_good)));
    assert_eq!(sent, "accepted 1, duplicates 4, quarantined 0\n");

    let listed = ok(tally(
        &server,
        &["events", "list", "--limit", "2", "--all"],
        None,
    ));
    assert_eq!(listed.lines().count(), 6, "{listed}");
    assert!(listed.starts_with("SEQ   TIME"), "{listed}");

    let [day1, day2] = days();
    let day3 = day2.tomorrow().unwrap();
    let (from, to) = (day1.to_string(), day3.to_string());
    let csv = ok(tally(
        &server,
        &[
            "meters",
            "query",
            "requests",
            "--from",
            &from,
            "--to",
            &to,
            "--window",
            "day",
            "--tz",
            "Europe/Berlin",
            "--group-by",
            "method",
            "-o",
            "csv",
        ],
        None,
    ));
    let (m1, m2, m3) = (
        berlin_midnight(day1),
        berlin_midnight(day2),
        berlin_midnight(day3),
    );
    let mut rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.remove(0), "windowStart,windowEnd,method,value");
    rows.sort();
    assert_eq!(
        rows,
        [
            format!("{m1},{m2},GET,6"),
            format!("{m1},{m2},POST,0.1"),
            format!("{m2},{m3},GET,2"),
            format!("{m2},{m3},POST,0.2"),
        ]
    );

    let meters = ok(tally(&server, &["meters", "list"], None));
    assert!(
        meters.starts_with("SLUG       EVENT TYPE    AGGREGATION   VALUE PROPERTY   GROUP BY\n"),
        "{meters}"
    );

    // Errors: the server's problem, the URL that could not be reached, and
    // never the token.
    let output = tally(&server, &["get", "md", "missing"], None);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).starts_with("error: getting meterdefinition/missing: Not Found (HTTP 404)")
    );
    let output = tally(
        &server,
        &["--server", "http://127.0.0.1:1", "meters", "list"],
        None,
    );
    assert_eq!(output.status.code(), Some(1));
    let error = stderr(&output);
    assert!(
        error.contains("could not reach the Tally server at http://127.0.0.1:1/api/v1/meters"),
        "{error}"
    );
    let output = tally(&server, &["--token", "wrong", "get", "md"], None);
    assert!(stderr(&output).contains("HTTP 401"), "{}", stderr(&output));
    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["events", "send", "--help"],
    ] {
        let help = ok(tally(&server, args, None));
        assert!(!help.contains(TOKEN), "{help}");
        assert!(help.contains("--token"), "{help}");
    }
}

/// The shipped billing example, secrets, and usage grouped by billing
/// account through the CLI: unattributed usage is attributed retroactively
/// when a binding covering it is applied, and secrets never come back.
#[test]
fn billing_accounts_attribute_usage_and_secrets_stay_secret() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path());
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/");
    ok(tally(
        &server,
        &["apply", "-f", &format!("{examples}billing.yaml")],
        None,
    ));
    let meter = "apiVersion: billing.miloapis.com/v1alpha1\nkind: MeterDefinition\n\
                 metadata: {name: bytes}\nspec: {meterName: bytes, measurement: \
                 {aggregation: Sum, unit: By}, event: {type: bytes, valueProperty: $.n}}\n";
    ok(tally(&server, &["apply", "-f", "-"], Some(meter)));
    let hour_ago = (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1)).to_string();
    let events: String = [
        ("projects/acme", 3),
        ("projects/globex", 5),
        ("projects/globex", 2),
    ]
    .iter()
    .enumerate()
    .map(|(i, (subject, n))| {
        format!(
            "{{\"specversion\":\"1.0\",\"id\":\"b{i}\",\"source\":\"cli\",\"type\":\"bytes\",\
                 \"subject\":\"{subject}\",\"time\":\"{hour_ago}\",\"data\":{{\"n\":{n}}}}}\n"
        )
    })
    .collect();
    let file = dir.path().join("usage.ndjson");
    std::fs::write(&file, events).unwrap();
    ok(tally(
        &server,
        &["events", "send", file.to_str().unwrap()],
        None,
    ));

    let from = (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(24))
        .round(jiff::Unit::Hour)
        .unwrap()
        .to_string();
    let to = (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(2))
        .round(jiff::Unit::Hour)
        .unwrap()
        .to_string();
    let by_account = || {
        let csv = ok(tally(
            &server,
            &[
                "meters",
                "query",
                "bytes",
                "--from",
                &from,
                "--to",
                &to,
                "--group-by",
                "billing_account",
                "-o",
                "csv",
            ],
            None,
        ));
        let mut rows: Vec<String> = csv
            .lines()
            .skip(1)
            .map(|row| row.split(',').skip(2).collect::<Vec<_>>().join(","))
            .collect();
        rows.sort();
        rows
    };
    // globex has no binding yet: its usage is kept, without an account.
    assert_eq!(by_account(), [",7", "acme-corp,3"]);
    let globex = "apiVersion: billing.miloapis.com/v1alpha1\nkind: BillingAccountBinding\n\
                  metadata: {name: globex-to-acme-eu}\nspec: {billingAccountRef: {name: acme-eu}, \
                  projectRef: {name: globex}}\nstatus: {billingResponsibility: \
                  {establishedAt: '2025-01-01T00:00:00Z'}}\n";
    ok(tally(&server, &["apply", "-f", "-"], Some(globex)));
    assert_eq!(by_account(), ["acme-corp,3", "acme-eu,7"]);
    // Before a project's first binding is allowed (that time had no
    // account); between two bindings would move attributed usage: refused.
    let acme = |name: &str, at: &str| {
        globex
            .replace("globex-to-acme-eu", name)
            .replace("projectRef: {name: globex}", "projectRef: {name: acme}")
            .replace("2025-01-01T00:00:00Z", at)
    };
    let earlier = ok(tally(
        &server,
        &["apply", "-f", "-"],
        Some(&acme("acme-earlier", "2024-12-01T00:00:00Z")),
    ));
    assert_eq!(earlier, "billingaccountbinding/acme-earlier created\n");
    let output = tally(
        &server,
        &["apply", "-f", "-"],
        Some(&acme("acme-inside", "2024-12-15T00:00:00Z")),
    );
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("never moved"),
        "{}",
        stderr(&output)
    );
    let table = ok(tally(&server, &["get", "bab"], None));
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("globex-to-acme-eu   globex    acme-eu"),
        "{table}"
    );

    // Secrets: applied, listed by key, never shown.
    let secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: grafana, namespace: acme-web}\n\
                  stringData: {token: correct-horse-battery}\n";
    let applied = ok(tally(&server, &["apply", "-f", "-"], Some(secret)));
    assert_eq!(applied, "secret/grafana -n acme-web created\n");
    for args in [
        &["get", "secrets", "-n", "acme-web", "-o", "yaml"][..],
        &["get", "secret", "grafana", "-n", "acme-web", "-o", "json"][..],
        &["get", "secrets"][..],
    ] {
        let shown = ok(tally(&server, args, None));
        assert!(!shown.contains("correct-horse"), "{shown}");
        assert!(!shown.contains("Y29ycmVjdC1ob3Jz"), "{shown}");
    }
    let output = tally(&server, &["get", "secret", "grafana"], None);
    assert!(
        stderr(&output).contains("-n NAMESPACE"),
        "{}",
        stderr(&output)
    );
    ok(tally(
        &server,
        &["delete", "secret", "grafana", "-n", "acme-web"],
        None,
    ));
}
