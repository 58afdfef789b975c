//! OpenMeter's official SDKs, unmodified and pinned, against a real `tally
//! serve` on loopback: the JS SDK (`tests/sdk/js`, `@openmeter/sdk` from
//! npm, installed with `npm ci` into `target/tmp/sdk-js`) and the Python SDK
//! with the CloudEvents SDK (`tests/sdk/python/requirements.txt`, installed
//! into a venv). The suites call every method of the events, meters and
//! subjects families; the JS suite also validates every answer it recorded
//! against the server's `/openapi.json`. Where node, npm or Python are
//! missing the tests skip, unless `TALLY_REQUIRE_PEERS` is set (CI), where
//! they fail.
//!
//! Besides: CloudEvents binary mode with hand-built requests, and array
//! parameters in both of OpenMeter's encodings.

mod common;
#[path = "../../tally-billing/tests/support/venv.rs"]
mod venv;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};

const TOKEN: &str = "sdk-suite-admin-token";
const JSON_UTF8: &str = "application/json; charset=utf-8";

fn serve(dir: &Path) -> common::Server {
    common::serve(dir, &[("TALLY_TOKEN", TOKEN)])
}

fn sdk_dir(which: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sdk")
        .join(which)
}

/// The directory the JS suite runs in, its packages installed with `npm
/// ci` from the committed lock file (again whenever the lock changes).
fn js_suite() -> Result<String, String> {
    let source = sdk_dir("js");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sdk-js");
    let lock = std::fs::read(source.join("package-lock.json")).map_err(|e| e.to_string())?;
    let installed = std::fs::read(dir.join("package-lock.json")).ok();
    if installed.as_deref() != Some(lock.as_slice())
        || !dir.join("node_modules/@openmeter/sdk").exists()
    {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        for file in ["package.json", "package-lock.json"] {
            std::fs::copy(source.join(file), dir.join(file)).map_err(|e| e.to_string())?;
        }
        let npm = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .status()
            .map_err(|e| format!("npm: {e}"))?;
        if !npm.success() {
            let _ = std::fs::remove_file(dir.join("package-lock.json"));
            return Err("npm ci failed".into());
        }
    }
    // The suite imports its packages from where it runs.
    std::fs::copy(source.join("suite.mjs"), dir.join("suite.mjs")).map_err(|e| e.to_string())?;
    let node = Command::new("node")
        .arg("--version")
        .output()
        .map_err(|e| format!("node: {e}"))?;
    if !node.status.success() {
        return Err("node --version failed".into());
    }
    Ok(dir.to_string_lossy().into_owned())
}

/// Prints a suite's output and checks that it passed every check.
fn passed(output: &Output, checks: usize) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "the suite failed:\n{stdout}");
    let ok = stdout.lines().filter(|l| l.starts_with("ok ")).count();
    assert_eq!(ok, checks, "checks passed:\n{stdout}");
    stdout
}

#[test]
fn the_official_js_sdk_works_unmodified() {
    let Some(dir) = venv::or_skip(js_suite(), "OpenMeter's JS SDK (node and npm)") else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let server = serve(data.path());
    let output = Command::new("node")
        .args(["suite.mjs", &server.base, TOKEN])
        .current_dir(&dir)
        .output()
        .unwrap();
    let stdout = passed(&output, 17);
    let validated: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("validated "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the suite says how many answers it validated");
    assert!(validated > 30, "{validated} answers validated");
}

#[test]
fn the_official_python_sdk_works_unmodified() {
    let requirements = sdk_dir("python").join("requirements.txt");
    let requirements = requirements.to_string_lossy();
    let found = venv::python_with(
        "tally-sdk-openmeter-1.0.0b236-venv",
        &["-r", &requirements],
        "import openmeter, cloudevents",
    );
    let Some(python) = venv::or_skip(found, "OpenMeter's Python SDK") else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let server = serve(data.path());
    let output = Command::new(python)
        .arg(sdk_dir("python").join("suite.py"))
        .args([&server.base, TOKEN])
        .output()
        .unwrap();
    passed(&output, 10);
}

/// A client for the hand-built requests.
struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(server: &common::Server) -> Api {
        Api {
            http: tally_delivery::client_builder().build().unwrap(),
            base: server.base.clone(),
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> (u16, String, Value) {
        let r = request.bearer_auth(TOKEN).send().await.unwrap();
        let status = r.status().as_u16();
        let content_type = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let text = r.text().await.unwrap();
        (
            status,
            content_type,
            serde_json::from_str(&text).unwrap_or(Value::Null),
        )
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let (status, _, body) = self
            .send(self.http.get(format!("{}{path}", self.base)))
            .await;
        (status, body)
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(format!("{}{path}", self.base))
    }
}

#[tokio::test]
async fn cloudevents_binary_mode_as_the_http_binding_defines_it() {
    let data = tempfile::tempdir().unwrap();
    let server = serve(data.path());
    let api = Api::new(&server);
    let meter = json!({"slug": "bin", "aggregation": "SUM", "eventType": "bin.t",
                       "valueProperty": "$.n", "groupBy": {"region": "$.region"}});
    let (status, _, body) = api.send(api.post("/api/v1/meters").json(&meter)).await;
    assert_eq!(status, 201, "{body}");
    let now = jiff::Timestamp::now().to_string();
    let binary = |id: &str, content_type: &str| {
        api.post("/api/v1/events")
            .header("ce-specversion", "1.0")
            .header("ce-id", id)
            .header("ce-source", "hand%2Fbuilt")
            .header("ce-type", "bin.t")
            .header("ce-subject", "acme%20%E2%82%AC%25")
            .header("ce-time", &now)
            .header("ce-tier", "gold")
            .header("content-type", content_type)
            .body(r#"{"n": 4, "region": "eu"}"#)
    };
    // 204, as OpenMeter answers.
    let (status, _, body) = api.send(binary("b-1", JSON_UTF8)).await;
    assert_eq!(status, 204, "{body}");
    // With Prefer: return=representation, what was stored.
    let (status, _, body) = api
        .send(binary("b-1", JSON_UTF8).header("prefer", "return=representation"))
        .await;
    assert_eq!(
        (status, &body),
        (200, &json!({"accepted": 0, "duplicates": 1}))
    );
    let (status, listed) = api.get("/api/v1/events?id=b-1").await;
    assert_eq!(status, 200, "{listed}");
    let event = &listed[0]["event"];
    assert_eq!(event["subject"], "acme €%");
    assert_eq!(event["source"], "hand/built");
    assert_eq!(event["tier"], "gold", "extensions are kept: {event}");
    assert_eq!(event["datacontenttype"], "application/json; charset=utf-8");
    assert_eq!(event["data"], json!({"n": 4, "region": "eu"}));
    let (status, answer) = api
        .get("/api/v1/meters/bin/query?groupBy=region&subject=acme%20%E2%82%AC%25")
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["data"][0]["value"], 4);
    assert_eq!(answer["data"][0]["groupBy"]["region"], "eu");

    // A missing attribute is listed as in structured mode, nothing stored.
    let no_type = api
        .post("/api/v1/events")
        .header("ce-specversion", "1.0")
        .header("ce-id", "b-2")
        .header("ce-source", "s")
        .header("ce-subject", "acme")
        .header("content-type", "application/json")
        .body("{}");
    let (status, content_type, body) = api.send(no_type).await;
    assert_eq!(
        (status, content_type.as_str()),
        (400, "application/problem+json")
    );
    assert_eq!(body["errors"][0]["errors"][0]["field"], "type", "{body}");
    // Data that is neither JSON nor text cannot be metered.
    let octets = binary("b-3", "application/octet-stream");
    assert_eq!(api.send(octets).await.0, 415);
    // A structured content type is structured mode, whatever the headers say.
    let structured = api
        .post("/api/v1/events")
        .header("ce-specversion", "1.0")
        .header("ce-id", "ignored")
        .header("content-type", "application/cloudevents+json")
        .body(
            json!({"specversion": "1.0", "id": "s-1", "source": "s", "type": "bin.t",
                   "subject": "acme", "data": {"n": 1}})
            .to_string(),
        );
    assert_eq!(api.send(structured).await.0, 204);
    let (_, listed) = api.get("/api/v1/events?id=s-1").await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    // The platform contract's single-event route takes binary mode too.
    let platform = api
        .post("/v1/usage/events")
        .header("ce-specversion", "1.0")
        .header("ce-id", "01JD0000000000000000000099")
        .header("ce-source", "gateway")
        .header("ce-type", "bin.t")
        .header("ce-subject", "projects/acme")
        .header("content-type", "application/json")
        .body(r#"{"value": "3", "n": 3}"#);
    let (status, _, body) = api.send(platform).await;
    assert_eq!(status, 200, "{body}");
    let (_, listed) = api
        .get("/api/v1/events?id=01JD0000000000000000000099")
        .await;
    assert_eq!(listed[0]["event"]["data"]["value"], "3", "{listed}");
}

#[tokio::test]
async fn array_parameters_in_both_encodings_and_unhonoured_ones_refused() {
    let data = tempfile::tempdir().unwrap();
    let server = serve(data.path());
    let api = Api::new(&server);
    let meter = json!({"slug": "arr", "aggregation": "COUNT", "eventType": "arr.t",
                       "groupBy": {"model": "$.model", "tier": "$.tier"}});
    assert_eq!(
        api.send(api.post("/api/v1/meters").json(&meter)).await.0,
        201
    );
    let events: Vec<Value> = ["a", "b", "c", "a"]
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"specversion": "1.0", "id": i.to_string(), "source": "s", "type": "arr.t",
                   "subject": s, "data": {"model": if i % 2 == 0 { "x" } else { "y" }, "tier": "t"}})
        })
        .collect();
    let ingest = api
        .post("/api/v1/events")
        .header("content-type", "application/cloudevents-batch+json")
        .body(Value::Array(events).to_string());
    assert_eq!(api.send(ingest).await.0, 204);
    let query = "/api/v1/meters/arr/query";
    let (status, repeated) = api
        .get(&format!(
            "{query}?subject=a&subject=b&groupBy=model&groupBy=tier"
        ))
        .await;
    assert_eq!(status, 200, "{repeated}");
    let (_, commas) = api
        .get(&format!("{query}?subject=a,b&groupBy=model,tier"))
        .await;
    assert_eq!(repeated["data"], commas["data"]);
    let rows = repeated["data"].as_array().unwrap();
    // (a, x), (a, y), (b, y): per subject and group.
    assert_eq!(rows.len(), 3, "{repeated}");
    let total: u64 = rows.iter().map(|r| r["value"].as_u64().unwrap()).sum();
    assert_eq!(total, 3);
    for refused in [
        "filterCustomerId=c",
        "advancedMeterGroupByFilters%5Bmodel%5D%5Beq%5D=x",
        "groupBy%5B0%5D=model",
        "filterGroupBy=not-a-map",
        "unknown=1",
    ] {
        let (status, body) = api.get(&format!("{query}?{refused}")).await;
        assert_eq!(status, 400, "{refused}: {body}");
        assert!(body["detail"].as_str().is_some(), "{refused}: {body}");
    }
    let (status, body) = api.get("/api/v1/events?customerId=c").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = api
        .get("/api/v2/events?filter=%7B%22subject%22%3A%7B%22in%22%3A%5B%22a%22%5D%7D%7D")
        .await;
    assert_eq!(status, 400, "{body}");
}
