//! The CLI's shared output formats, `tally get -w`, `tally describe`,
//! `tally version` and `tally completion`, against a real `tally serve`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const TOKEN: &str = "cli-output-token-4821";

mod common;

use common::Server;

fn serve(dir: &Path) -> Server {
    common::serve(dir, &[("TALLY_TOKEN", TOKEN)])
}

fn tally(base: &str, args: &[&str], stdin: &str) -> Output {
    common::cli(base, TOKEN, args, stdin)
}

fn ok(base: &str, args: &[&str], stdin: &str) -> String {
    let output = tally(base, args, stdin);
    assert!(
        output.status.success(),
        "tally {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

const METERS: &str = "\
apiVersion: billing.miloapis.com/v1alpha1
kind: MeterDefinition
metadata: {name: requests, labels: {team: edge}}
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
---
apiVersion: v1
kind: Namespace
metadata:
  name: acme-web
  labels: {resourcemanager.miloapis.com/project-name: acme}
---
apiVersion: telemetry.datumapis.com/v1alpha1
kind: Exporter
metadata: {name: grafana, namespace: acme-web}
spec:
  sources: [{name: all, metrics: {metricsql: '{__name__=~\"hits.*\"}'}}]
  sinks:
    - name: receiver
      otlp_http:
        endpoint: http://127.0.0.1:1/v1/metrics
        authentication: {type: bearerToken, secretRef: {name: missing, key: token}}
";

/// An event an hour ago; `value` may be missing (quarantined).
fn event(id: &str, method: &str, value: Option<&str>) -> String {
    let time = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1);
    let value = value.map_or(String::new(), |v| format!(r#""value":{v},"#));
    format!(
        r#"{{"specversion":"1.0","id":"{id}","source":"cli","type":"gw/requests","subject":"acme","time":"{time}","data":{{{value}"dimensions":{{"method":{}}}}}}}"#,
        serde_json::to_string(method).unwrap()
    )
}

/// Waits (at most 20 s) until meter `name` is Ready: a meter is built from
/// the log after it is applied.
fn wait_ready(base: &str, name: &str) {
    for _ in 0..200 {
        let json = ok(base, &["get", "md", name, "-o", "json"], "");
        let manifest: serde_json::Value = serde_json::from_str(&json).unwrap();
        if manifest["status"]["conditions"][0]["status"] == "True" {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("meter {name} never became Ready");
}

/// A table's header cells (split on runs of 3+ spaces).
fn header(table: &str) -> Vec<String> {
    let first = table.lines().next().unwrap_or_default();
    first
        .split("   ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect()
}

fn csv_records(text: &str) -> Vec<Vec<String>> {
    csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(text.as_bytes())
        .records()
        .map(|r| r.unwrap().iter().map(str::to_owned).collect())
        .collect()
}

/// Every listing command in every format: tables and wide tables with the
/// same first columns, CSV with one field per wide column, JSON and YAML
/// that parse, names as `kind/name` (or refused for rows without names).
#[test]
fn every_listing_speaks_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path());
    let base = server.base.as_str();
    ok(base, &["apply", "-f", "-"], METERS);
    let events = [
        event("e1", "GET", Some("1")),
        event("e2", "a,\"b\"", Some("2.5")),
        event("q1", "GET", None),
    ]
    .join("\n");
    ok(base, &["events", "send", "-"], &events);
    wait_ready(base, "requests");
    ok(
        base,
        &[
            "events", "void", "--source", "cli", "--id", "e1", "--reason", "test",
        ],
        "",
    );

    let listings: [(&[&str], Option<&str>); 9] = [
        (&["get", "md"], Some("meterdefinition/requests")),
        (
            &["get", "mrt", "httproute"],
            Some("monitoredresourcetype/httproute"),
        ),
        (&["get", "namespaces"], Some("namespace/acme-web")),
        (&["get", "exporters"], Some("exporter/grafana")),
        (&["meters", "list"], Some("meter/requests")),
        (&["events", "list"], Some("event/")),
        (&["quarantine", "list"], Some("event/")),
        (&["events", "voids"], Some("void/")),
        (
            &["meters", "query", "requests", "--group-by", "method"],
            None,
        ),
    ];
    for (args, name) in listings {
        let with = |format: &'static str| [args, &["-o", format]].concat();
        let table = ok(base, &with("table"), "");
        let wide = ok(base, &with("wide"), "");
        let (narrow, wide_header) = (header(&table), header(&wide));
        assert!(
            wide_header.starts_with(&narrow),
            "{args:?}: wide {wide_header:?} table {narrow:?}"
        );
        assert_eq!(table.lines().count(), wide.lines().count(), "{args:?}");
        let csv = csv_records(&ok(base, &with("csv"), ""));
        assert_eq!(csv.len(), table.lines().count(), "{args:?}: {csv:?}");
        assert!(
            csv.iter().all(|r| r.len() == wide_header.len()),
            "{args:?}: {csv:?} vs {wide_header:?}"
        );
        let json: serde_json::Value = serde_json::from_str(&ok(base, &with("json"), "")).unwrap();
        let yaml: serde_json::Value = serde_norway::from_str(&ok(base, &with("yaml"), "")).unwrap();
        assert_eq!(json, yaml, "{args:?}");
        let names = tally(base, &with("name"), "");
        match name {
            Some(prefix) => {
                assert!(names.status.success(), "{args:?}: {}", stderr(&names));
                let text = String::from_utf8(names.stdout).unwrap();
                assert!(
                    !text.is_empty() && text.lines().all(|l| l.starts_with(prefix)),
                    "{args:?}: {text}"
                );
            }
            None => {
                assert!(!names.status.success());
                assert!(stderr(&names).contains("no names"), "{}", stderr(&names));
            }
        }
    }

    // Times in tables are RFC 3339; CSV gives values back exactly, quotes
    // and commas included; an absent value is an empty field.
    let table = ok(base, &["events", "list", "-o", "wide"], "");
    let row = table.lines().nth(1).unwrap();
    let time = row.split_whitespace().nth(1).unwrap();
    assert!(time.parse::<jiff::Timestamp>().is_ok(), "{row}");
    assert!(
        row.split_whitespace()
            .any(|c| c.parse::<jiff::Timestamp>().is_ok())
    );
    let csv = csv_records(&ok(
        base,
        &[
            "meters",
            "query",
            "requests",
            "--group-by",
            "method",
            "-o",
            "csv",
        ],
        "",
    ));
    assert_eq!(csv[0], ["windowStart", "windowEnd", "method", "value"]);
    let mut rows: Vec<(String, String)> = csv[1..]
        .iter()
        .map(|r| (r[2].clone(), r[3].clone()))
        .collect();
    rows.sort();
    assert_eq!(rows, [("a,\"b\"".to_owned(), "2.5".to_owned())]);
    let csv = csv_records(&ok(base, &["get", "md", "-o", "csv"], ""));
    let index = csv[0].iter().position(|h| h == "ready").unwrap();
    assert_eq!(csv[1][index], "True");
    let index = csv[0].iter().position(|h| h == "uid").unwrap_or(usize::MAX);
    assert_eq!(index, usize::MAX);
}

/// What `get -o yaml|json` prints applies again unchanged, one resource or
/// a `List`, cluster-scoped or namespaced, status included.
#[test]
fn get_output_applies_again_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path());
    let base = server.base.as_str();
    ok(base, &["apply", "-f", "-"], METERS);
    for args in [
        &["get", "md", "requests", "-o", "yaml"][..],
        &["get", "md/requests", "-o", "json"],
        &["get", "mrt", "-o", "yaml"],
        &["get", "ns", "-o", "json"],
        &["get", "exporters", "-n", "acme-web", "-o", "yaml"],
        &["get", "exporter/grafana", "-n", "acme-web", "-o", "json"],
    ] {
        let shown = ok(base, args, "");
        let applied = ok(base, &["apply", "-f", "-"], &shown);
        assert!(
            !applied.is_empty() && applied.lines().all(|l| l.ends_with(" unchanged")),
            "{args:?}: {applied}"
        );
    }
    let output = tally(base, &["get", "md/requests", "other"], "");
    assert!(
        stderr(&output).contains("give the name once"),
        "{}",
        stderr(&output)
    );
}

/// Lines a child prints, as they come.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (send, receive) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if send.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    receive
}

fn watch(base: &str, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .env("TALLY_SERVER", base)
        .env("TALLY_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn next_line(lines: &mpsc::Receiver<String>) -> String {
    lines
        .recv_timeout(Duration::from_secs(20))
        .expect("a line from the watch")
}

/// The next line that `wanted` accepts. A meter's status may change on its
/// own (a backfill ending) between the steps of the test, so MODIFIED
/// lines before it are skipped; any other line is a failure.
fn line_where(lines: &mpsc::Receiver<String>, wanted: impl Fn(&str) -> bool) -> String {
    loop {
        let line = next_line(lines);
        if wanted(&line) {
            return line;
        }
        let modified = line.starts_with("MODIFIED") || line.starts_with(r#"{"type":"MODIFIED""#);
        assert!(modified, "unexpected watch line {line:?}");
    }
}

/// The exit status of a child, waiting at most 20 s.
fn exit_of(child: &mut Child) -> std::process::ExitStatus {
    for _ in 0..200 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    panic!("the watch did not end");
}

/// `get -w` prints the state, then every change as it happens; Ctrl-C ends
/// it cleanly, and a server that goes away ends it with a clear error.
#[test]
fn watch_prints_changes_until_ctrl_c_or_the_server_goes_away() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = serve(dir.path());
    let base = server.base.clone();
    ok(&base, &["apply", "-f", "-"], METERS);

    let mut names = watch(
        &base,
        &["get", "md", "-w", "--interval", "100ms", "-o", "name"],
    );
    let name_lines = lines_of(&mut names);
    let mut table = watch(
        &base,
        &["get", "md", "requests", "-w", "--interval", "100ms"],
    );
    let table_lines = lines_of(&mut table);
    let mut json = watch(
        &base,
        &[
            "get",
            "md/requests",
            "-w",
            "--interval",
            "100ms",
            "-o",
            "json",
        ],
    );
    let json_lines = lines_of(&mut json);

    assert_eq!(next_line(&name_lines), "ADDED meterdefinition/requests");
    assert!(next_line(&table_lines).starts_with("EVENT   NAME       METER NAME"));
    assert!(next_line(&table_lines).starts_with("ADDED   requests   gw/requests"));
    let first: serde_json::Value = serde_json::from_str(&next_line(&json_lines)).unwrap();
    assert_eq!(first["type"], "ADDED");
    assert_eq!(first["object"]["metadata"]["name"], "requests");

    let tokens = METERS
        .split("---\n")
        .next()
        .unwrap()
        .replace("name: requests", "name: tokens")
        .replace("gw/requests", "gw/tokens");
    ok(&base, &["apply", "-f", "-"], &tokens);
    line_where(&name_lines, |l| l == "ADDED meterdefinition/tokens");
    let changed = METERS
        .split("---\n")
        .next()
        .unwrap()
        .replace("team: edge", "team: core");
    // The label change: seen by each watch of `requests` as MODIFIED.
    let has_core = |l: &str| l.contains("team=core") || l.contains(r#""team":"core""#);
    let mut table_lines_wide = watch(
        &base,
        &[
            "get",
            "md",
            "requests",
            "-w",
            "--interval",
            "100ms",
            "-o",
            "wide",
        ],
    );
    let wide_lines = lines_of(&mut table_lines_wide);
    assert!(next_line(&wide_lines).starts_with("EVENT   NAME"));
    assert!(next_line(&wide_lines).starts_with("ADDED   requests"));
    ok(&base, &["apply", "-f", "-"], &changed);
    let line = line_where(&wide_lines, has_core);
    assert!(line.starts_with("MODIFIED   requests"), "{line}");
    line_where(&name_lines, |l| l == "MODIFIED meterdefinition/requests");
    let line = line_where(&table_lines, |l| l.starts_with("MODIFIED   requests"));
    assert!(line.contains("gw/requests"), "{line}");
    let modified: serde_json::Value =
        serde_json::from_str(&line_where(&json_lines, has_core)).unwrap();
    assert_eq!(modified["type"], "MODIFIED");
    assert_eq!(modified["object"]["metadata"]["labels"]["team"], "core");
    table_lines_wide.kill().unwrap();
    table_lines_wide.wait().unwrap();
    ok(&base, &["delete", "md/tokens"], "");
    line_where(&name_lines, |l| l == "DELETED meterdefinition/tokens");

    // Ctrl-C: a clean end.
    let status = Command::new("kill")
        .args(["-INT", &table.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(exit_of(&mut table).code(), Some(0));

    // The server goes away: an error that says so.
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    for child in [&mut names, &mut json] {
        assert_eq!(exit_of(child).code(), Some(1));
        let mut error = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut error).unwrap();
        assert!(
            error.contains(&format!("watch ended: the server at {base}/ went away")),
            "{error}"
        );
    }
    // A watch of something that is not there fails at once.
    let output = tally(&base, &["get", "md", "-w"], "");
    assert!(
        stderr(&output).contains("could not reach"),
        "{}",
        stderr(&output)
    );
}

/// `describe`: metadata, spec, conditions, and the events the server keeps
/// (a meter's quarantined events); for a kind without history it says so.
#[test]
fn describe_shows_spec_conditions_and_recorded_events() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path());
    let base = server.base.as_str();
    ok(base, &["apply", "-f", "-"], METERS);
    ok(base, &["events", "send", "-"], &event("q1", "GET", None));
    wait_ready(base, "requests");

    let text = ok(base, &["describe", "md", "requests"], "");
    assert!(
        text.starts_with("Name:        requests\nKind:        MeterDefinition\n"),
        "{text}"
    );
    assert!(text.contains("\nLabels:      team=edge\n"), "{text}");
    assert!(text.contains("\nSpec:\n  measurement:\n"), "{text}");
    let conditions = text.split("Conditions:\n").nth(1).unwrap();
    assert!(
        conditions.starts_with("  TYPE    STATUS   REASON"),
        "{text}"
    );
    assert!(
        conditions.contains("\n  Ready   True     Measuring"),
        "{text}"
    );
    let events = text.split("Events:\n").nth(1).unwrap();
    let row = events.lines().nth(1).unwrap();
    let time = row.split_whitespace().next().unwrap();
    assert!(time.parse::<jiff::Timestamp>().is_ok(), "{text}");
    assert!(
        row.contains("Warning   Quarantined   MISSING_VALUE"),
        "{text}"
    );
    assert!(row.contains("\"q1\""), "{text}");

    let text = ok(base, &["describe", "namespace/acme-web"], "");
    assert!(
        text.contains("Labels:      resourcemanager.miloapis.com/project-name=acme"),
        "{text}"
    );
    assert!(
        text.ends_with("Events:  <none>\n  The server keeps no event history for namespaces.\n"),
        "{text}"
    );

    let text = ok(
        base,
        &["describe", "exporter", "grafana", "-n", "acme-web"],
        "",
    );
    assert!(text.contains("Namespace:   acme-web\n"), "{text}");
    assert!(
        text.contains("  SinkHealthy (sink receiver)   False    SecretNotFound"),
        "{text}"
    );
    assert!(text.contains("\n  Ready "), "{text}");

    let output = tally(base, &["describe", "md", "missing"], "");
    assert!(
        stderr(&output).starts_with("error: getting meterdefinition/missing: Not Found (HTTP 404)"),
        "{}",
        stderr(&output)
    );
    let output = tally(base, &["describe", "exporter", "grafana"], "");
    assert!(
        stderr(&output).contains("-n NAMESPACE"),
        "{}",
        stderr(&output)
    );
}

/// `version` names the client's build and the server's version;
/// `--client` and an unreachable server need no server.
#[test]
fn version_names_client_and_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path());
    let text = ok(&server.base, &["version"], "");
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        text.starts_with(&format!("Client Version: {version}\nGit Commit:     ")),
        "{text}"
    );
    assert!(
        text.contains(&format!("\nTarget:         {}-", std::env::consts::ARCH)),
        "{text}"
    );
    assert!(
        text.ends_with(&format!("Server Version: {version} ({}/)\n", server.base)),
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&server.base, &["version", "-o", "json"], "")).unwrap();
    assert_eq!(json["serverVersion"]["version"], version);

    let output = tally("http://127.0.0.1:1", &["version"], "");
    assert!(output.status.success());
    assert!(!String::from_utf8_lossy(&output.stdout).contains("Server Version"));
    assert!(
        stderr(&output).contains("warning: no server version"),
        "{}",
        stderr(&output)
    );
    let output = tally("http://127.0.0.1:1", &["version", "--client"], "");
    assert!(output.status.success() && stderr(&output).is_empty());
    let long = ok(&server.base, &["--version"], "");
    assert!(
        long.starts_with(&format!("tally {version} (commit ")),
        "{long}"
    );
}

/// Completion scripts for each shell; bash's completes subcommands and kinds.
#[test]
fn completion_scripts_complete_commands_and_kinds() {
    for (shell, marker) in [
        ("bash", "complete -F _tally"),
        ("zsh", "#compdef tally"),
        ("fish", "complete -c tally"),
        ("powershell", "Register-ArgumentCompleter"),
    ] {
        let script = ok("http://127.0.0.1:1", &["completion", shell], "");
        assert!(script.contains(marker), "{shell}: {script:.300}");
    }
    let script = ok("http://127.0.0.1:1", &["completion", "bash"], "");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tally.bash");
    std::fs::write(&file, script).unwrap();
    let complete = |words: &str| {
        let program = format!(
            "source {}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
             COMP_LINE=\"${{COMP_WORDS[*]}}\"; COMP_POINT=${{#COMP_LINE}}; \
             _tally tally \"${{COMP_WORDS[-1]}}\" \"${{COMP_WORDS[-2]}}\"; echo \"${{COMPREPLY[*]}}\"",
            file.display()
        );
        let output = Command::new("bash")
            .args(["-c", &program])
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", stderr(&output));
        String::from_utf8(output.stdout).unwrap()
    };
    let commands = complete("tally de");
    assert!(
        commands.contains("describe") && commands.contains("delete"),
        "{commands}"
    );
    let kinds = complete("tally get me");
    assert_eq!(kinds.trim(), "meterdefinitions", "{kinds}");
}

/// A BillingSink whose provider refuses a batch: `billing status` and
/// `billing deadletters` in the shared formats, and `describe` lists the
/// dead letter (when, the provider's status, the retry command) and the
/// last forwarding pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_a_billing_sink_lists_its_dead_letters() {
    use tally_billing::testing::{Fault, TestServer};
    const API_KEY: &str = "af-describe-key-81d2";
    let provider = TestServer::start(API_KEY).await;
    provider.push_faults([Fault::Status(400, None)]);
    let dir = tempfile::tempdir().unwrap();
    let server = common::serve_with_config(
        dir.path(),
        "billing: {passIntervalSeconds: 0.2}\negress: {allow: [127.0.0.0/8]}\n",
    );
    let base = server.base.clone();
    let now = jiff::Timestamp::now();
    let t0 = jiff::Timestamp::from_second(now.as_second().div_euclid(60) * 60 - 180).unwrap();
    let bound = t0 - jiff::SignedDuration::from_hours(1);
    let manifests = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: amberflo-api, namespace: tally-system}}\n\
         stringData: {{apiKey: {API_KEY}}}\n---\n\
         apiVersion: billing.miloapis.com/v1alpha1\nkind: BillingSink\nmetadata: {{name: amberflo}}\n\
         spec: {{provider: amberflo, endpoint: '{}', apiKeySecretRef: {{name: amberflo-api}},\n\
         \x20 windowSize: 1m, allowedLateness: 2s, requestTimeout: 2s, startAt: '{t0}'}}\n---\n\
         apiVersion: billing.miloapis.com/v1alpha1\nkind: BillingAccount\n\
         metadata: {{name: acct, uid: uid-acct}}\nspec: {{currencyCode: USD}}\n---\n\
         apiVersion: billing.miloapis.com/v1alpha1\nkind: BillingAccountBinding\n\
         metadata: {{name: p1-acct}}\n\
         spec: {{billingAccountRef: {{name: acct}}, projectRef: {{name: p1}}}}\n\
         status: {{billingResponsibility: {{establishedAt: '{bound}'}}}}\n---\n\
         apiVersion: billing.miloapis.com/v1alpha1\nkind: MeterDefinition\n\
         metadata: {{name: requests}}\n\
         spec: {{meterName: gw/requests, phase: Published,\n\
         \x20 measurement: {{aggregation: Sum, unit: '1'}}, billing: {{meterApiName: gw-requests}}}}\n",
        provider.url
    );
    ok(&base, &["apply", "-f", "-"], &manifests);
    let time = t0 + jiff::SignedDuration::from_secs(3);
    let event = format!(
        r#"{{"specversion":"1.0","id":"b1","source":"cli","type":"gw/requests","subject":"projects/p1","time":"{time}","data":{{"value":"5"}}}}"#
    );
    ok(&base, &["events", "send", "-"], &event);

    let mut names = String::new();
    for _ in 0..300 {
        names = ok(&base, &["billing", "deadletters", "-o", "name"], "");
        if !names.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let id = names
        .trim()
        .strip_prefix("deadletter/amberflo/")
        .unwrap_or_else(|| panic!("no dead letter: {names:?}"))
        .to_owned();
    let csv = csv_records(&ok(&base, &["billing", "deadletters", "-o", "csv"], ""));
    assert_eq!(
        csv[0],
        ["sink", "id", "at", "status", "records", "reason", "answer"]
    );
    assert_eq!(
        (csv[1][1].as_str(), csv[1][3].as_str()),
        (id.as_str(), "400")
    );
    let status = ok(&base, &["billing", "status", "-o", "name"], "");
    assert_eq!(status, "billingsink/amberflo\n");

    let text = ok(&base, &["describe", "billingsink/amberflo"], "");
    assert!(text.contains("\nConditions:\n  TYPE    STATUS"), "{text}");
    let events = text.split("Events:\n").nth(1).unwrap();
    assert!(events.starts_with("  TIME "), "{text}");
    let dead = events
        .lines()
        .find(|l| l.contains("Warning   DeadLetter"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(dead.contains("HTTP 400"), "{dead}");
    assert!(
        dead.contains(&format!("tally billing retry amberflo {id}")),
        "{dead}"
    );
    assert!(
        dead.split_whitespace()
            .next()
            .unwrap()
            .parse::<jiff::Timestamp>()
            .is_ok(),
        "{dead}"
    );
    assert!(events.contains("Normal    Forwarded"), "{text}");
    assert!(!text.contains(API_KEY), "{text}");
}
