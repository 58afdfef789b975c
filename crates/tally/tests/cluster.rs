//! `tally serve --cluster` as the binary runs it, and the Kubernetes
//! manifests of `deploy/`: checked strictly against Kubernetes's OpenAPI
//! schemas (PyPI's `kubernetes-validate`, which refuses unknown fields),
//! their serve config read by the real binary, their tokens consistent.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::Digest as _;
use tally_billing::testing::venv;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// Every document of every manifest file in `deploy/`, with its file.
fn documents() -> Vec<(PathBuf, serde_json::Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    let mut documents = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for document in serde_norway::Deserializer::from_str(&text) {
            let value: serde_json::Value = serde::Deserialize::deserialize(document).unwrap();
            if !value.is_null() {
                documents.push((file.clone(), value));
            }
        }
    }
    documents
}

fn find<'a>(
    documents: &'a [(PathBuf, serde_json::Value)],
    kind: &str,
    name: &str,
) -> &'a serde_json::Value {
    documents
        .iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("deploy/ has no {kind} {name}"))
}

#[test]
fn the_manifests_pass_a_strict_kubernetes_schema_check() {
    let found = venv::python_with(
        "tally-kubernetes-validate-1.37.0-venv",
        &["kubernetes-validate==1.37.0"],
        "import kubernetes_validate",
    );
    let Some(python) = venv::or_skip(found, "kubernetes-validate (PyPI)") else {
        return;
    };
    let validate = Path::new(&python).with_file_name("kubernetes-validate");
    let files: Vec<PathBuf> = documents()
        .into_iter()
        .map(|(file, _)| file)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let output = Command::new(&validate)
        .args(["--strict", "--kubernetes-version", "1.30.0"])
        .args(&files)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let kinds = [
        "Namespace",
        "Secret",
        "ConfigMap",
        "Deployment",
        "DaemonSet",
        "Service",
    ];
    for kind in kinds {
        assert!(
            said.contains(&format!("for resource {}", kind.to_lowercase())),
            "{kind}: {said}"
        );
    }

    // The check is strict: an unknown field fails it.
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong.yaml");
    let serve = std::fs::read_to_string(deploy_dir().join("serve.yaml")).unwrap();
    std::fs::write(&wrong, serve.replace("readinessProbe:", "readynessProbe:")).unwrap();
    let output = Command::new(&validate)
        .args(["--strict", "--kubernetes-version", "1.30.0"])
        .arg(&wrong)
        .output()
        .unwrap();
    assert!(!output.status.success(), "a misspelt field passed");
}

#[test]
fn the_manifests_serve_config_and_tokens_agree() {
    let documents = documents();
    let config = find(&documents, "ConfigMap", "tally-serve")["data"]["tally.yaml"]
        .as_str()
        .unwrap();
    let config: tally_server::ServeConfig = serde_norway::from_str(config).unwrap();
    config.check().unwrap();
    assert!(config.cluster.is_some());
    let secret = &find(&documents, "Secret", "tally-tokens")["stringData"];
    let ingest = secret["ingest-token"].as_str().unwrap();
    let digest: String = sha2::Sha256::digest(ingest.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let collect = config.tokens.iter().find(|t| t.name == "collect").unwrap();
    assert_eq!(collect.sha256.as_deref(), Some(digest.as_str()));
    assert_eq!(collect.scopes, ["ingest"]);
    // Every secretKeyRef names a key the Secret has.
    let text =
        serde_json::to_string(&documents.iter().map(|(_, d)| d).collect::<Vec<_>>()).unwrap();
    for key in text.split("\"key\":\"").skip(1) {
        let key = &key[..key.find('"').unwrap()];
        assert!(secret.get(key).is_some(), "the Secret has no {key}");
    }
}

/// Runs `tally serve` with `args` and the config `text`; returns its exit
/// status and standard error once it has exited (at most 30 s).
fn serve_until_exit(args: &[&str], text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tally.yaml");
    std::fs::write(&config, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("tally serve did not exit");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn serve_cluster_names_what_it_cannot_reach_without_its_password() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (ok, stderr) = serve_until_exit(
        &["--cluster"],
        &format!(
            "cluster: {{nats: 'nats://tally:hunter2@127.0.0.1:{port}', clickhouse: 'http://127.0.0.1:{port}'}}\n\
             billing: {{enabled: false}}\n"
        ),
    );
    assert!(!ok);
    assert!(
        stderr.contains(&format!("connecting to NATS at nats://…@127.0.0.1:{port}")),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");

    let (ok, stderr) = serve_until_exit(&["--cluster"], "");
    assert!(!ok);
    assert!(stderr.contains("no `cluster:` section"), "{stderr}");
}
