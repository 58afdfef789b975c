//! Two cluster nodes' `/apis` over real HTTP, their resources in one bucket
//! of a real `nats-server -js`: a manifest applied on one node is answered
//! by the other, with the same computed status; a delete on one is a 404 on
//! the other. (Each node's ledger here is an embedded store of its own: the
//! test is about the resources the nodes share.)

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tally_server::AppState;
use tally_store_cluster::testing::NatsServer;
use tally_store_cluster::{KvResources, KvResourcesConfig};
use tally_store_embedded::{EmbeddedLedger, StoreConfig};

struct Node {
    base: String,
    _dir: tempfile::TempDir,
}

async fn node(nats: &NatsServer) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let ledger = EmbeddedLedger::open(StoreConfig::new(dir.path())).unwrap();
    let (resources, _watch) =
        KvResources::connect(&KvResourcesConfig::new(nats.url(), "tally-resources"))
            .await
            .unwrap();
    let state = AppState::new(Arc::new(ledger), 1 << 20, Some("root".into()))
        .with_resources(Arc::new(resources));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(tally_server::serve_on(listener, state));
    Node { base, _dir: dir }
}

async fn call(method: reqwest::Method, url: String, body: Option<&str>) -> (u16, Value) {
    let http = tally_delivery::client_builder().build().unwrap();
    let mut request = http.request(method, url).bearer_auth("root");
    if let Some(body) = body {
        request = request
            .header("content-type", "application/yaml")
            .body(body.to_owned());
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// GETs `path` on `node` until it answers `status` (the watch is quick, not
/// instant).
async fn until(node: &Node, path: &str, status: u16) -> Value {
    for _ in 0..200 {
        let (got, body) = call(reqwest::Method::GET, format!("{}{path}", node.base), None).await;
        if got == status {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{path} never answered {status}");
}

const BILLING: &str = "apiVersion: billing.miloapis.com/v1alpha1
kind: BillingAccount
metadata: {name: acme, uid: cust-1}
spec: {currencyCode: USD}
---
apiVersion: billing.miloapis.com/v1alpha1
kind: BillingAccountBinding
metadata: {name: acme-web}
spec: {billingAccountRef: {name: acme}, projectRef: {name: web}}
---
apiVersion: v1
kind: Secret
metadata: {name: token, namespace: web}
stringData: {key: hunter2}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_applied_on_one_node_is_served_by_the_other() {
    let Some(nats) = NatsServer::start_or_skip() else {
        return;
    };
    let (a, b) = (node(&nats).await, node(&nats).await);
    let (status, body) = call(
        reqwest::Method::POST,
        format!("{}/apis/apply", a.base),
        Some(BILLING),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let binding = until(&b, "/apis/billingaccountbindings/acme-web", 200).await;
    assert_eq!(binding["status"]["phase"], "Active", "{binding}");
    let account = until(&b, "/apis/billingaccounts/acme", 200).await;
    assert_eq!(account["metadata"]["uid"], "cust-1");
    let secret = until(&b, "/apis/secrets/web/token", 200).await;
    assert!(!secret.to_string().contains("aHVudGVyMg"), "{secret}");

    // The rules hold on the other node: a binding's spec is immutable.
    let moved = BILLING.replace("projectRef: {name: web}", "projectRef: {name: other}");
    let (status, body) = call(
        reqwest::Method::POST,
        format!("{}/apis/apply", b.base),
        Some(&moved),
    )
    .await;
    assert_eq!(status, 409, "{body}");

    let (status, _) = call(
        reqwest::Method::DELETE,
        format!("{}/apis/secrets/web/token", b.base),
        None,
    )
    .await;
    assert!((200..300).contains(&status), "{status}");
    until(&a, "/apis/secrets/web/token", 404).await;
}
