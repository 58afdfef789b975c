//! The cluster's resource store against a real `nats-server -js`: two stores
//! on one bucket are two nodes; what one applies or deletes, the other sees;
//! the rules of `ResourceSet` hold across them, concurrent writes included.

use std::sync::Arc;
use std::time::Duration;

use tally_ledger::{ApplyAction, ApplyMode, LedgerError, ResourceKey, ResourceStore};
use tally_model::{Kind, Manifest};
use tally_store_cluster::testing::NatsServer;
use tally_store_cluster::{KvResources, KvResourcesConfig};

fn manifest(text: &str) -> Manifest {
    Manifest::parse_documents(text).unwrap().remove(0)
}

fn namespace(name: &str, project: &str) -> Manifest {
    manifest(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: \
         {{resourcemanager.miloapis.com/project-name: {project}}}}}\n"
    ))
}

fn account(name: &str, uid: &str) -> Manifest {
    manifest(&format!(
        "apiVersion: billing.miloapis.com/v1alpha1\nkind: BillingAccount\n\
         metadata: {{name: {name}, uid: {uid}}}\nspec: {{currencyCode: USD}}\n"
    ))
}

fn binding(name: &str, account: &str, project: &str, at: &str) -> Manifest {
    manifest(&format!(
        "apiVersion: billing.miloapis.com/v1alpha1\nkind: BillingAccountBinding\n\
         metadata: {{name: {name}}}\nspec: {{billingAccountRef: {{name: {account}}}, \
         projectRef: {{name: {project}}}}}\n\
         status: {{billingResponsibility: {{establishedAt: \"{at}\"}}}}\n"
    ))
}

/// A node: a store on `bucket` of `nats`.
async fn node(nats: &NatsServer, bucket: &str) -> KvResources {
    let (store, _follower) = KvResources::connect(&KvResourcesConfig::new(nats.url(), bucket))
        .await
        .unwrap();
    store
}

/// Waits until `store`'s snapshot satisfies `done`.
async fn eventually(store: &KvResources, what: &str, done: impl Fn(&KvResources) -> bool) {
    let mut ticks = store.subscribe();
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        while !done(store) {
            let _ = tokio::time::timeout(Duration::from_millis(200), ticks.changed()).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "never: {what}");
}

fn has(store: &KvResources, key: &ResourceKey) -> bool {
    store.snapshot().get(key).is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_node_applies_or_deletes_every_node_sees() {
    let Some(nats) = NatsServer::start_or_skip() else {
        return;
    };
    let a = node(&nats, "tally-resources").await;
    let b = node(&nats, "tally-resources").await;
    let web = ResourceKey::new(Kind::Namespace, None, "web.prod");
    let applied = a
        .apply(namespace("web.prod", "acme"), ApplyMode::Upsert)
        .await
        .unwrap();
    assert_eq!(applied.action, ApplyAction::Created);
    assert!(has(&a, &web), "a node reads its own write at once");
    eventually(&b, "b sees a's namespace", |b| has(b, &web)).await;
    assert_eq!(b.snapshot().project_of_namespace("web.prod"), "acme");

    // A secret applied on b: stored as data, redacted when shown, on a too.
    let secret = a
        .apply(
            manifest(
                "apiVersion: v1\nkind: Secret\nmetadata: {name: token, namespace: web.prod}\n\
                 stringData: {key: hunter2}\n",
            ),
            ApplyMode::Upsert,
        )
        .await
        .unwrap();
    assert!(
        !serde_json::to_string(&secret.manifest)
            .unwrap()
            .contains("aHVudGVyMg")
    );
    eventually(&b, "b reads a's secret", |b| {
        b.snapshot()
            .secret("web.prod", "token")
            .is_some_and(|data| data.get("key").map(String::as_str) == Some("hunter2"))
    })
    .await;

    // Unchanged: nothing written, the same answer.
    let again = b
        .apply(namespace("web.prod", "acme"), ApplyMode::Upsert)
        .await
        .unwrap();
    assert_eq!(again.action, ApplyAction::Unchanged);

    // A change on b, then a delete on b: a follows.
    let changed = b
        .apply(namespace("web.prod", "other"), ApplyMode::Upsert)
        .await
        .unwrap();
    assert_eq!(changed.action, ApplyAction::Configured);
    eventually(&a, "a sees b's change", |a| {
        a.snapshot().project_of_namespace("web.prod") == "other"
    })
    .await;
    b.delete(web.clone()).await.unwrap();
    assert!(!has(&b, &web));
    eventually(&a, "a sees b's delete", |a| !has(a, &web)).await;
    let err = a.delete(web.clone()).await.unwrap_err();
    assert!(matches!(err, LedgerError::NotFound { .. }), "{err}");

    // A node that starts later reads the bucket whole.
    let c = node(&nats, "tally-resources").await;
    assert!(c.snapshot().secret("web.prod", "token").is_some());
    assert!(!has(&c, &web));
    // Another bucket is another cluster.
    let other = node(&nats, "elsewhere").await;
    assert!(other.snapshot().secret("web.prod", "token").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rules_hold_across_nodes() {
    let Some(nats) = NatsServer::start_or_skip() else {
        return;
    };
    let a = node(&nats, "rules").await;
    let b = node(&nats, "rules").await;
    a.apply(account("acme", "cust-1"), ApplyMode::Upsert)
        .await
        .unwrap();
    // b decides on the newest state even before its watch has shown it:
    // the publish is refused, b catches up and plans again.
    let err = b
        .apply(account("acme", "cust-2"), ApplyMode::Upsert)
        .await
        .unwrap_err();
    assert!(matches!(err, LedgerError::Conflict(_)), "{err}");
    let err = b
        .apply(account("acme", "cust-1"), ApplyMode::CreateOnly)
        .await
        .unwrap_err();
    assert!(matches!(err, LedgerError::Conflict(_)), "{err}");

    a.apply(
        binding("b1", "acme", "p", "2025-02-01T00:00:00Z"),
        ApplyMode::Upsert,
    )
    .await
    .unwrap();
    a.apply(
        binding("b2", "acme", "p", "2025-04-01T00:00:00Z"),
        ApplyMode::Upsert,
    )
    .await
    .unwrap();
    // Inside the project's history: refused on the other node too.
    let err = b
        .apply(
            binding("b3", "acme", "p", "2025-03-01T00:00:00Z"),
            ApplyMode::Upsert,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, LedgerError::Conflict(_)), "{err}");
    let key = ResourceKey::new(Kind::BillingAccountBinding, None, "b1");
    let err = b.delete(key).await.unwrap_err();
    assert!(matches!(err, LedgerError::Conflict(_)), "{err}");
    // Status is computed the same on every node.
    let shown = |store: &KvResources, name: &str| {
        let set = store.snapshot();
        let key = ResourceKey::new(Kind::BillingAccountBinding, None, name);
        set.get(&key)
            .map(|m| set.shown(m).status.unwrap()["phase"].clone())
    };
    assert_eq!(shown(&b, "b2"), Some(serde_json::json!("Active")));
    assert_eq!(shown(&b, "b1"), Some(serde_json::json!("Superseded")));
    // Too large a resource is refused before it reaches NATS.
    let big = "x".repeat(tally_store_cluster::resources::MAX_VALUE_BYTES);
    let err = a
        .apply(
            manifest(&format!(
                "apiVersion: v1\nkind: Secret\nmetadata: {{name: big, namespace: t}}\n\
                 stringData: {{v: {big}}}\n"
            )),
            ApplyMode::Upsert,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, LedgerError::Invalid(_)), "{err}");
}

/// Racing writes from two nodes are decided one after the other: of many
/// creates of one name exactly one wins, and of bindings racing into one
/// project's history none lands inside another's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writes_from_two_nodes_are_serialised() {
    let Some(nats) = NatsServer::start_or_skip() else {
        return;
    };
    let a = Arc::new(node(&nats, "race").await);
    let b = Arc::new(node(&nats, "race").await);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = Arc::clone(if i % 2 == 0 { &a } else { &b });
        tasks.push(tokio::spawn(async move {
            store
                .apply(account("acme", &format!("cust-{i}")), ApplyMode::CreateOnly)
                .await
        }));
    }
    let mut created = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(applied) => {
                assert_eq!(applied.action, ApplyAction::Created);
                created += 1;
            }
            Err(LedgerError::Conflict(_)) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(created, 1);

    // Two bindings of one project taking effect at the same time, each
    // valid alone, from two nodes at once: the second is planned on the
    // first's result, inside the history it made, so exactly one lands.
    for round in 0..6 {
        let project = format!("q{round}");
        let at = "2025-03-01T00:00:00Z";
        let (x, y) = tokio::join!(
            a.apply(
                binding(&format!("x{round}"), "acme", &project, at),
                ApplyMode::Upsert
            ),
            b.apply(
                binding(&format!("y{round}"), "acme", &project, at),
                ApplyMode::Upsert
            ),
        );
        assert!(x.is_ok() != y.is_ok(), "round {round}: {x:?} {y:?}");
        let refused = x.err().or(y.err()).unwrap();
        assert!(matches!(refused, LedgerError::Conflict(_)), "{refused}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_carry_on_after_nats_server_restarts() {
    let Some(mut nats) = NatsServer::start_or_skip() else {
        return;
    };
    let a = node(&nats, "restart").await;
    let b = node(&nats, "restart").await;
    a.apply(namespace("before", "p"), ApplyMode::Upsert)
        .await
        .unwrap();
    nats.restart();
    let after = ResourceKey::new(Kind::Namespace, None, "after");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match a.apply(namespace("after", "p"), ApplyMode::Upsert).await {
            Ok(_) => break,
            Err(LedgerError::NotReady { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    eventually(&b, "b sees a write made after the restart", |b| {
        has(b, &after)
    })
    .await;
    assert!(has(&b, &ResourceKey::new(Kind::Namespace, None, "before")));
}
