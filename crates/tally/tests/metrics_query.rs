//! The consumer metrics API against a real VictoriaMetrics: the requests
//! Grafana's Prometheus datasource sends (form-encoded POSTs of
//! `/api/v1/query` and `/api/v1/query_range`, `/api/v1/labels`,
//! `/api/v1/label/<name>/values`, `/api/v1/series`), each held to the
//! token's project however the selector is crafted.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use tally_testkit::victoria_metrics;

mod common;

const ADMIN: &str = "admin-secret";
const ACME: &str = "acme-secret";
const GLOBEX: &str = "globex-secret";
const CPU: &str = "datum_compute_instance_cpu_usage_seconds_total";

struct Answer {
    status: u16,
    content_type: String,
    body: Value,
}

/// One request as Grafana sends it: GET with the query string, or POST
/// with the parameters form-encoded.
async fn call(
    base: &str,
    token: &str,
    method: &str,
    path: &str,
    params: &[(&str, &str)],
) -> Answer {
    let client = tally_delivery::client_builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let form = form_encode(params);
    let request = if method == "GET" {
        let sep = if path.contains('?') { '&' } else { '?' };
        client.get(format!("{base}{path}{sep}{form}"))
    } else {
        client
            .post(format!("{base}{path}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form)
    };
    let r = request.bearer_auth(token).send().await.unwrap();
    let status = r.status().as_u16();
    let content_type = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    Answer {
        status,
        content_type,
        body: r.json().await.unwrap_or(Value::Null),
    }
}

fn form_encode(params: &[(&str, &str)]) -> String {
    let mut s = String::new();
    for (i, (k, v)) in params.iter().enumerate() {
        if i > 0 {
            s.push('&');
        }
        let enc = |t: &str| -> String {
            t.bytes()
                .map(|b| match b {
                    b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect()
        };
        s.push_str(&enc(k));
        s.push('=');
        s.push_str(&enc(v));
    }
    s
}

/// The `namespace` labels of a query answer's series.
fn namespaces(answer: &Answer) -> BTreeSet<String> {
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["status"], "success", "{}", answer.body);
    let data = &answer.body["data"];
    let series = data["result"]
        .as_array()
        .or_else(|| data.as_array())
        .unwrap();
    series
        .iter()
        .map(|s| {
            let metric = if s.get("metric").is_some() {
                &s["metric"]
            } else {
                s
            };
            metric["namespace"].as_str().unwrap_or("<none>").to_owned()
        })
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn grafana_reads_only_its_projects_series() {
    let Some(vm) = victoria_metrics::start().await else {
        return;
    };
    let now_ms = jiff::Timestamp::now().as_millisecond();
    let samples: Vec<(i64, f64)> = (0..10)
        .map(|i| (now_ms - 60_000 * (9 - i), i as f64))
        .collect();
    let mut lines = Vec::new();
    for (ns, instance) in [
        ("acme", "web-0"),
        ("acme-prod", "web-1"),
        ("globex", "db-0"),
    ] {
        lines.push(victoria_metrics::series(
            &[("__name__", CPU), ("namespace", ns), ("instance", instance)],
            &samples,
        ));
        lines.push(victoria_metrics::series(
            &[
                (
                    "__name__",
                    "datum_compute_instance_memory_working_set_bytes",
                ),
                ("namespace", ns),
                ("instance", instance),
            ],
            &samples,
        ));
    }
    lines.push(victoria_metrics::series(
        &[("__name__", "node_load1"), ("node", "n1")],
        &samples,
    ));
    vm.import(&lines).await;

    let dir = tempfile::tempdir().unwrap();
    let server = common::serve_with_config(
        dir.path(),
        &format!(
            "token: {ADMIN}\nvictoriaMetrics: {{url: '{}'}}\ntokens:\n\
             - {{name: acme, token: {ACME}, scopes: [\"project:acme\"]}}\n\
             - {{name: globex, token: {GLOBEX}, scopes: [\"project:globex\"]}}\n",
            vm.base
        ),
    );
    let base = &server.base;
    let apply = tally_delivery::client_builder().build().unwrap()
        .post(format!("{base}/apis/apply"))
        .bearer_auth(ADMIN)
        .header("content-type", "application/yaml")
        .body("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: acme-prod\n  labels: {resourcemanager.miloapis.com/project-name: acme}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(apply.status(), 200);

    let now = (now_ms / 1000).to_string();
    let start = (now_ms / 1000 - 3600).to_string();
    let acme = set(&["acme", "acme-prod"]);
    // Instant and range queries, as Grafana POSTs them.
    let q = call(
        base,
        ACME,
        "POST",
        "/api/v1/query",
        &[("query", CPU), ("time", &now)],
    )
    .await;
    assert_eq!(namespaces(&q), acme);
    let r = call(
        base,
        ACME,
        "POST",
        "/api/v1/query_range",
        &[
            ("query", &format!("rate({CPU}[5m])")),
            ("start", &start),
            ("end", &now),
            ("step", "60"),
        ],
    )
    .await;
    assert_eq!(r.body["data"]["resultType"], "matrix");
    assert_eq!(namespaces(&r), acme);
    let g = call(
        base,
        GLOBEX,
        "GET",
        "/api/v1/query",
        &[("query", CPU), ("time", &now)],
    )
    .await;
    assert_eq!(namespaces(&g), set(&["globex"]));
    // Crafted selectors still see only the project's series.
    for crafted in [
        format!("{CPU}{{namespace=\"globex\"}}"),
        "{__name__=~\".+\", namespace!=\"acme\", namespace!=\"acme-prod\"}".to_owned(),
        "node_load1".to_owned(),
        format!("{CPU} or on() {CPU}{{namespace=\"globex\"}}"),
    ] {
        let a = call(
            base,
            ACME,
            "POST",
            "/api/v1/query",
            &[("query", &crafted), ("time", &now)],
        )
        .await;
        assert!(namespaces(&a).is_subset(&acme), "{crafted}: {}", a.body);
        assert!(!namespaces(&a).contains("globex"), "{crafted}");
    }
    let everything = call(
        base,
        ACME,
        "POST",
        "/api/v1/query",
        &[("query", "{__name__=~\".+\"}"), ("time", &now)],
    )
    .await;
    assert_eq!(namespaces(&everything), acme);
    // A caller's own extra filters are dropped, not ORed in.
    let sneaky = call(
        base,
        ACME,
        "POST",
        "/api/v1/query",
        &[
            ("query", CPU),
            ("time", &now),
            ("extra_filters[]", "{namespace=\"globex\"}"),
            ("extra_label", "namespace=globex"),
        ],
    )
    .await;
    assert_eq!(namespaces(&sneaky), acme);
    // Another project's name answers 404; the admin sees every series.
    let other = call(
        base,
        ACME,
        "GET",
        "/api/v1/query?project=globex",
        &[("query", CPU)],
    )
    .await;
    assert_eq!(other.status, 404);
    assert_eq!(other.content_type, "application/problem+json");
    let all = call(
        base,
        ADMIN,
        "POST",
        "/api/v1/query",
        &[("query", CPU), ("time", &now)],
    )
    .await;
    assert_eq!(namespaces(&all), set(&["acme", "acme-prod", "globex"]));

    // The metadata calls Grafana's query editor makes.
    let labels = call(
        base,
        ACME,
        "POST",
        "/api/v1/labels",
        &[("start", &start), ("end", &now)],
    )
    .await;
    assert_eq!(labels.status, 200, "{}", labels.body);
    let names: Vec<&str> = labels.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        names.contains(&"instance") && !names.contains(&"node"),
        "{names:?}"
    );
    let metric_names = call(
        base,
        ACME,
        "GET",
        "/api/v1/label/__name__/values",
        &[("start", &start), ("end", &now)],
    )
    .await;
    let metric_names: BTreeSet<&str> = metric_names.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        metric_names,
        BTreeSet::from([CPU, "datum_compute_instance_memory_working_set_bytes"])
    );
    let ns_values = call(
        base,
        ACME,
        "GET",
        "/api/v1/label/namespace/values",
        &[("start", &start), ("end", &now)],
    )
    .await;
    let ns_values: BTreeSet<String> = ns_values.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    assert_eq!(ns_values, acme);
    let series = call(
        base,
        ACME,
        "POST",
        "/api/v1/series",
        &[
            ("match[]", "{__name__=~\"datum_.*\"}"),
            ("start", &start),
            ("end", &now),
        ],
    )
    .await;
    assert_eq!(namespaces(&series), acme);
    assert_eq!(series.body["data"].as_array().unwrap().len(), 4);

    // Bounds answer problem+json before VictoriaMetrics is asked.
    let too_many_points = call(
        base,
        ACME,
        "POST",
        "/api/v1/query_range",
        &[
            ("query", CPU),
            ("start", &start),
            ("end", &now),
            ("step", "0.1"),
        ],
    )
    .await;
    assert_eq!(too_many_points.status, 400);
    assert_eq!(too_many_points.content_type, "application/problem+json");
    let deep = "(".repeat(200) + CPU + &")".repeat(200);
    let deep = call(base, ACME, "POST", "/api/v1/query", &[("query", &deep)]).await;
    assert_eq!(deep.status, 400);
    // VictoriaMetrics' own refusal reaches Grafana in Prometheus' format.
    let bad = call(base, ACME, "POST", "/api/v1/query", &[("query", "rate(")]).await;
    assert!(bad.status == 400 || bad.status == 422, "{}", bad.status);
    assert_eq!(bad.body["status"], "error");
}

async fn apply_yaml(base: &str, yaml: &str) -> reqwest::Response {
    tally_delivery::client_builder()
        .build()
        .unwrap()
        .post(format!("{base}/apis/apply"))
        .bearer_auth(ADMIN)
        .header("content-type", "application/yaml")
        .body(yaml.to_owned())
        .send()
        .await
        .unwrap()
}

fn instance_yaml(name: &str, namespace: &str, cpu: &str, memory: &str) -> String {
    format!(
        "apiVersion: compute.datumapis.com/v1alpha\nkind: Instance\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
         spec: {{runtime: {{resources: {{instanceType: datumcloud/d1-standard-2, requests: {{cpu: '{cpu}', memory: '{memory}'}}}}}}}}\n"
    )
}

/// Lifecycle CloudEvents as the compute controllers send them.
async fn post_lifecycle(base: &str, events: &[(&str, &str, &str, &str, i64)]) {
    let now = jiff::Timestamp::now();
    let batch: Vec<Value> = events
        .iter()
        .map(|(kind, project, namespace, instance, seconds_ago)| {
            let time = now - jiff::SignedDuration::from_secs(*seconds_ago);
            serde_json::json!({
                "specversion": "1.0", "id": format!("{instance}-{kind}"), "source": "controller", "subject": instance,
                "type": format!("com.datumapis.compute.instance.{kind}"), "time": time.to_string(),
                "data": {"project": project, "namespace": namespace, "instance": instance},
            })
        })
        .collect();
    let r = tally_delivery::client_builder()
        .build()
        .unwrap()
        .post(format!("{base}/api/v1/instances/events"))
        .bearer_auth(ADMIN)
        .header("content-type", "application/cloudevents-batch+json")
        .body(serde_json::to_vec(&batch).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

/// The series of an instant query straight to VictoriaMetrics, once it has
/// at least `want` of them.
async fn vm_series(vm: &victoria_metrics::VictoriaMetrics, query: &str, want: usize) -> Vec<Value> {
    let client = tally_delivery::client_builder().build().unwrap();
    let mut tries = 0;
    loop {
        vm.flush().await;
        let answer: Value = client
            .get(format!("{}/api/v1/query", vm.base))
            .query(&[("query", query)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let result = answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if result.len() >= want {
            return result;
        }
        tries += 1;
        assert!(tries < 300, "{query}: never {want} series; last {answer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn value(series: &Value) -> f64 {
    series["value"][1].as_str().unwrap().parse().unwrap()
}

/// Allocation (from `Instance` requests), use and uptime reach
/// VictoriaMetrics with the fleet metrics, pushed by `tally serve`; a
/// project's token reads its own instances' through the PromQL endpoint,
/// never another project's nor the fleet-wide series.
#[tokio::test]
async fn fleet_metrics_and_allocation_are_pushed_and_read_per_project() {
    let Some(vm) = victoria_metrics::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = common::serve_with_config(
        dir.path(),
        &format!(
            "token: {ADMIN}\nvictoriaMetrics: {{url: '{}', pushInterval: 200ms, pushNode: node-a}}\ntokens:\n\
             - {{name: acme, token: {ACME}, scopes: [\"project:acme\"]}}\n\
             - {{name: globex, token: {GLOBEX}, scopes: [\"project:globex\"]}}\n",
            vm.base
        ),
    );
    let base = &server.base;
    let namespaces_yaml = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: acme-prod\n  labels: {resourcemanager.miloapis.com/project-name: acme}\n---\n\
        apiVersion: v1\nkind: Namespace\nmetadata:\n  name: globex-prod\n  labels: {resourcemanager.miloapis.com/project-name: globex}\n";
    assert_eq!(apply_yaml(base, namespaces_yaml).await.status(), 200);
    for (name, ns, cpu, memory) in [
        ("web-1", "acme-prod", "1500m", "2Gi"),
        ("db-0", "globex-prod", "4", "8G"),
    ] {
        let r = apply_yaml(base, &instance_yaml(name, ns, cpu, memory)).await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    // Requests out of bounds are refused at apply, naming the field.
    let refused = apply_yaml(base, &instance_yaml("big", "acme-prod", "5000", "1Gi")).await;
    assert_eq!(refused.status(), 400);
    assert!(refused.text().await.unwrap().contains("requests.cpu"));
    post_lifecycle(
        base,
        &[
            ("scheduled", "acme", "acme-prod", "web-1", 30),
            ("started", "acme", "acme-prod", "web-1", 27),
            ("crashed", "globex", "globex-prod", "db-0", 5),
        ],
    )
    .await;

    // Operators: everything, straight from VictoriaMetrics, labelled by node.
    let vcpus = vm_series(&vm, "tally_compute_instance_cpu_allocated_vcpus", 2).await;
    let by_ns: BTreeSet<(String, String)> = vcpus
        .iter()
        .map(|s| {
            assert_eq!(s["metric"]["tally_node"], "node-a");
            (
                s["metric"]["namespace"].as_str().unwrap().to_owned(),
                value(s).to_string(),
            )
        })
        .collect();
    assert_eq!(
        by_ns,
        BTreeSet::from([
            ("acme-prod".into(), "1.5".into()),
            ("globex-prod".into(), "4".into())
        ])
    );
    let memory = vm_series(
        &vm,
        "tally_compute_instance_memory_allocated_bytes{namespace=\"globex-prod\"}",
        1,
    )
    .await;
    assert_eq!(value(&memory[0]), 8e9);
    let started = vm_series(
        &vm,
        "tally_compute_lifecycle_transitions_total{kind=\"started\"}",
        1,
    )
    .await;
    assert_eq!(value(&started[0]), 1.0);
    let crashes = vm_series(&vm, "tally_compute_instance_crashes_total", 1).await;
    assert_eq!(value(&crashes[0]), 1.0);
    let latency = vm_series(
        &vm,
        "tally_compute_scheduling_latency_seconds_bucket{le=\"5\"}",
        1,
    )
    .await;
    assert_eq!(value(&latency[0]), 1.0);
    let uptime = vm_series(&vm, "time() - tally_compute_instance_start_time_seconds", 1).await;
    assert!((25.0..600.0).contains(&value(&uptime[0])), "{uptime:?}");

    // Customers: their own instances only, through Tally's PromQL endpoint.
    let now = (jiff::Timestamp::now().as_second()).to_string();
    for (token, want) in [(ACME, "acme-prod"), (GLOBEX, "globex-prod")] {
        for query in [
            "tally_compute_instance_cpu_allocated_vcpus",
            "tally_compute_instance_memory_allocated_bytes",
            "{__name__=~\"tally_compute_instance_.+\", namespace!=\"acme-prod\"} or tally_compute_instance_cpu_allocated_vcpus",
        ] {
            let a = call(
                base,
                token,
                "POST",
                "/api/v1/query",
                &[("query", query), ("time", &now)],
            )
            .await;
            assert_eq!(namespaces(&a), set(&[want]), "{query}: {}", a.body);
        }
        let fleet = call(
            base,
            token,
            "POST",
            "/api/v1/query",
            &[
                ("query", "tally_compute_lifecycle_transitions_total"),
                ("time", &now),
            ],
        )
        .await;
        assert_eq!(namespaces(&fleet), BTreeSet::new(), "{}", fleet.body);
    }
    let uptime = call(
        base,
        ACME,
        "POST",
        "/api/v1/query",
        &[
            (
                "query",
                "time() - tally_compute_instance_start_time_seconds",
            ),
            ("time", &now),
        ],
    )
    .await;
    assert_eq!(namespaces(&uptime), set(&["acme-prod"]), "{}", uptime.body);
    let other = call(
        base,
        ACME,
        "GET",
        "/api/v1/query?project=globex",
        &[("query", "tally_compute_instance_cpu_allocated_vcpus")],
    )
    .await;
    assert_eq!(other.status, 404);

    // /metrics carries the same families for operators.
    let r = common::http()
        .get(format!("{base}/metrics"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let metrics = r.text().await.unwrap();
    assert!(metrics.contains(
        "tally_compute_instance_cpu_allocated_vcpus{project=\"acme\",instance=\"web-1\",namespace=\"acme-prod\"} 1.5\n"
    ), "{metrics:.3000}");
    assert!(metrics.contains("tally_component_sent_total{component_kind=\"sink\",component_id=\"victoriametrics_fleet\""), "{metrics:.3000}");
}
