//! The README's five-minute tour, command by command, against a real
//! `tally serve`: its examples must work as written (queries without
//! `from`, in every window size, and the curl requests).

mod common;

use std::path::Path;

use serde_json::Value;

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
        .to_string_lossy()
        .into_owned()
}

#[tokio::test]
async fn the_readme_tour_works_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::serve(dir.path(), &[]);
    let tally = |args: &[&str]| common::ok(common::cli(&server.base, "", args, ""));
    tally(&["apply", "-f", &repo("examples/meters.yaml")]);
    let sent = tally(&["events", "send", &repo("examples/events.ndjson")]);
    assert!(sent.contains("accepted 4"), "{sent}");
    assert!(sent.contains("duplicates 1"), "{sent}");
    let by_model = tally(&[
        "meters",
        "query",
        "llm-tokens",
        "--window",
        "day",
        "--tz",
        "Europe/Berlin",
        "--group-by",
        "model",
    ]);
    assert!(
        by_model.contains("small") && by_model.contains("large"),
        "{by_model}"
    );
    // Without `from`, every window size answers, starting on the day of
    // the stored usage, never at 1970.
    for window in ["hour", "minute", "month"] {
        let answer = tally(&["meters", "query", "llm-tokens", "--window", window]);
        assert!(!answer.contains("1970"), "--window {window}: {answer}");
        assert!(answer.lines().count() >= 2, "--window {window}: {answer}");
    }
    let csv = tally(&[
        "meters",
        "query",
        "gateway-requests",
        "--group-by",
        "region",
        "-o",
        "csv",
    ]);
    assert!(csv.lines().count() >= 2, "{csv}");
    let listed = tally(&["events", "list", "--subject", "acme"]);
    assert!(listed.contains("01JD0000000000000000000001"), "{listed}");
    tally(&["quarantine", "list"]);

    // "Any HTTP client works too."
    let http = tally_delivery::client_builder().build().unwrap();
    let sent = http
        .post(format!("{}/api/v1/events", server.base))
        .header("content-type", "application/cloudevents+json")
        .body(
            r#"{"specversion": "1.0", "id": "e-1", "source": "billing-test", "type": "prompt",
                "subject": "acme", "data": {"tokens": 10, "model": "small"}}"#,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 204);
    let answer: Value = http
        .get(format!(
            "{}/api/v1/meters/llm-tokens/query?windowSize=HOUR&windowTimeZone=Asia/Kolkata&groupBy=model&subject=acme",
            server.base
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let small: f64 = answer["data"]
        .as_array()
        .unwrap_or_else(|| panic!("{answer}"))
        .iter()
        .filter(|row| row["groupBy"]["model"] == "small" && row["subject"] == "acme")
        .map(|row| row["value"].as_f64().unwrap())
        .sum();
    assert_eq!(small, 1210.0, "{answer}");
    let doc = http
        .get(format!("{}/openapi.json", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(doc.status(), 200);
}
