//! The resource surface (`/apis`) over real HTTP on a real embedded store:
//! every kind, namespaces, secrets that are never shown, per-project access,
//! billing bindings that never rewrite history, and persistence across a
//! restart.

use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tally_ledger::ResourceStore;
use tally_server::{AppState, TokenConfig, router};
use tally_store_embedded::{EmbeddedLedger, StoreConfig};

struct Server {
    base: String,
    http: reqwest::Client,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(dir: &std::path::Path) -> Server {
        // A server stopped just before may still hold the store for a moment
        // (its connections end asynchronously).
        let mut attempts = 0;
        let ledger = loop {
            match EmbeddedLedger::open(StoreConfig::new(dir)) {
                Ok(ledger) => break ledger,
                Err(e) if format!("{e:?}").contains("Locked") && attempts < 200 => {
                    attempts += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(25)).await;
                }
                Err(e) => panic!("opening the store: {e}"),
            }
        };
        let resources: Arc<dyn ResourceStore> = Arc::new(ledger.resources());
        let tokens = [
            TokenConfig {
                name: "acme".into(),
                token: Some("acme-secret".into()),
                sha256: None,
                scopes: vec!["project:acme".into()],
            },
            TokenConfig {
                name: "globex".into(),
                token: Some("globex-secret".into()),
                sha256: None,
                scopes: vec!["project:globex".into()],
            },
        ];
        let state = AppState::new(Arc::new(ledger), 1 << 20, None)
            .with_resources(resources)
            .with_tokens(Some("root"), &tokens)
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, router(state)).await.unwrap();
        });
        Server {
            base,
            http: tally_delivery::client_builder().build().unwrap(),
            task,
        }
    }

    async fn apply(&self, token: &str, yaml: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .post(format!("{}/apis/apply", self.base))
            .bearer_auth(token)
            .header("content-type", "application/yaml")
            .body(yaml.to_owned())
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn call(&self, method: reqwest::Method, token: &str, path: &str) -> (StatusCode, String) {
        let response = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.text().await.unwrap())
    }

    async fn get(&self, token: &str, path: &str) -> (StatusCode, Value) {
        let (status, text) = self.call(reqwest::Method::GET, token, path).await;
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

const PLATFORM: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: acme-web, labels: {resourcemanager.miloapis.com/project-name: acme}}
---
apiVersion: v1
kind: Namespace
metadata: {name: globex-api, labels: {resourcemanager.miloapis.com/project-name: globex}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shop, namespace: acme-web, labels: {app: shop}}
spec: {parentRefs: [{name: edge}]}
---
apiVersion: billing.miloapis.com/v1alpha1
kind: BillingAccount
metadata: {name: acme-billing, uid: cust-acme}
spec: {currencyCode: USD}
";

fn secret(namespace: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: grafana, namespace: {namespace}}}\n\
         stringData: {{token: {value}}}\n"
    )
}

#[tokio::test]
async fn every_kind_is_stored_and_each_project_sees_only_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;

    // Platform kinds are the operators'.
    let (status, _) = server.apply("acme-secret", PLATFORM).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = server.apply("root", PLATFORM).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["results"][2]["namespace"], "acme-web");

    // A project writes its own secrets, never another project's.
    let (status, body) = server
        .apply("acme-secret", &secret("acme-web", "hunter2"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = server
        .apply("acme-secret", &secret("globex-api", "stolen"))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Secret values never leave: not for the owner, not for the operator.
    for token in ["acme-secret", "root"] {
        let (status, text) = server
            .call(
                reqwest::Method::GET,
                token,
                "/apis/secrets/acme-web/grafana",
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{text}");
        assert!(
            !text.contains("hunter2") && !text.contains("aHVudGVyMg"),
            "{text}"
        );
        assert!(text.contains("\"keys\":[\"token\"]"), "{text}");
        let (_, list) = server
            .call(reqwest::Method::GET, token, "/apis/secrets")
            .await;
        assert!(
            !list.contains("hunter2") && !list.contains("aHVudGVyMg"),
            "{list}"
        );
    }
    // Another project cannot even tell it exists.
    let (status, _) = server
        .get("globex-secret", "/apis/secrets/acme-web/grafana")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, list) = server.get("globex-secret", "/apis/secrets").await;
    assert_eq!(list["items"], json!([]));
    let (_, list) = server.get("globex-secret", "/apis/httproutes").await;
    assert_eq!(list["items"], json!([]));
    let (_, list) = server.get("acme-secret", "/apis/httproutes").await;
    assert_eq!(list["items"][0]["metadata"]["name"], "shop");
    let (_, list) = server.get("acme-secret", "/apis/namespaces").await;
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["acme-web"]);
    // Billing is for operators only.
    let (_, list) = server.get("acme-secret", "/apis/billingaccounts").await;
    assert_eq!(list["items"], json!([]));
    let (status, account) = server
        .get("root", "/apis/billingaccounts/acme-billing")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(account["metadata"]["uid"], "cust-acme");

    // Scope mistakes are explained.
    let (status, text) = server
        .call(reqwest::Method::GET, "root", "/apis/secrets/grafana")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(text.contains("namespaced"), "{text}");
    assert!(text.contains("application/problem+json") || text.contains("\"status\":404"));

    // Deleting: the owner may; the other project sees nothing to delete.
    let (status, _) = server
        .call(
            reqwest::Method::DELETE,
            "globex-secret",
            "/apis/secrets/acme-web/grafana",
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = server
        .call(
            reqwest::Method::DELETE,
            "acme-secret",
            "/apis/secrets/acme-web/grafana",
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = server
        .get("acme-secret", "/apis/secrets/acme-web/grafana")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    server.task.abort();
}

fn binding(name: &str, account: &str, at: Option<&str>) -> String {
    let status = at
        .map(|at| format!("status: {{billingResponsibility: {{establishedAt: '{at}'}}}}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: billing.miloapis.com/v1alpha1\nkind: BillingAccountBinding\n\
         metadata: {{name: {name}}}\nspec: {{billingAccountRef: {{name: {account}}}, \
         projectRef: {{name: acme}}}}\n{status}"
    )
}

#[tokio::test]
async fn bindings_keep_history_and_everything_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let server = Server::start(dir.path()).await;
        server.apply("root", PLATFORM).await;
        let (status, body) = server
            .apply(
                "root",
                &binding("b1", "acme-billing", Some("2025-01-01T00:00:00Z")),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (status, body) = server.apply("root", &binding("b2", "other", None)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        // Inside the history: refused with the reason.
        let (status, body) = server
            .apply(
                "root",
                &binding("b3", "third", Some("2025-06-01T00:00:00Z")),
            )
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert!(
            body["detail"].as_str().unwrap().contains("never moved"),
            "{body}"
        );
        let (status, _) = server
            .call(
                reqwest::Method::DELETE,
                "root",
                "/apis/billingaccountbindings/b1",
            )
            .await;
        assert_eq!(status, StatusCode::CONFLICT);
        server.task.abort();
    }
    let server = Server::start(dir.path()).await;
    let (status, b1) = server.get("root", "/apis/billingaccountbindings/b1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(b1["status"]["phase"], "Superseded");
    assert_eq!(
        b1["status"]["billingResponsibility"]["establishedAt"],
        "2025-01-01T00:00:00Z"
    );
    let (_, b2) = server.get("root", "/apis/billingaccountbindings/b2").await;
    assert_eq!(b2["status"]["phase"], "Active");
    let (_, route) = server.get("root", "/apis/httproutes/acme-web/shop").await;
    assert_eq!(route["metadata"]["labels"]["app"], "shop");
    assert_eq!(route["metadata"]["generation"], 1);
    server.task.abort();
}

/// The Exporter shapes of the platform's enhancement (and invalid ones,
/// whose problems are reported as status conditions, not refusals) are
/// stored unchanged.
#[tokio::test]
async fn exporter_manifests_apply_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let fixtures = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tally-telemetry/tests/fixtures"
    );
    for file in [
        "exporter-metricsql.yaml",
        "exporter-resource-selectors.yaml",
        "exporter-datadog-grafana-basic.yaml",
        "invalid-exporters.yaml",
    ] {
        let text = std::fs::read_to_string(format!("{fixtures}/{file}")).unwrap();
        for manifest in tally_model::Manifest::parse_documents(&text).unwrap() {
            let yaml = serde_json::to_string(&manifest).unwrap();
            let (status, body) = server.apply("root", &yaml).await;
            let Some(namespace) = manifest.metadata.namespace.as_deref() else {
                // Without a namespace there is nowhere to keep it.
                assert_eq!(status, StatusCode::BAD_REQUEST, "{file}: {body}");
                assert!(body["detail"].as_str().unwrap().contains("namespace"));
                continue;
            };
            assert_eq!(status, StatusCode::OK, "{file}: {body}");
            let path = format!("/apis/exporters/{namespace}/{}", manifest.metadata.name);
            let (status, stored) = server.get("root", &path).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert_eq!(stored["spec"], manifest.spec, "{file}: {path}");
        }
    }
}
