//! The ledger's behavioural suite (`tally-ledger-suite`) against the
//! cluster backend, with a real `nats-server -js` and `clickhouse-server`
//! started for this test binary, and faults: ClickHouse down, a restart of
//! nats-server, a worker stopped mid-stream.

use std::time::Duration;

use futures::future::BoxFuture;
use tally_ledger::Ledger;
use tally_ledger_suite::peers::{ClickHouse, Nats};
use tally_ledger_suite::{Backend, run_all, usage_is_attributed_to_billing_accounts};
use tally_store_cluster::{ClusterLedger, ClusterLedgerConfig, STREAM};

struct Cluster(ClusterLedger);

impl Backend for Cluster {
    fn ledger(&self) -> &dyn Ledger {
        &self.0
    }

    fn settle(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {
            self.0
                .settle(Duration::from_secs(60))
                .await
                .expect("workers materialise what was acknowledged");
            // Queries then read rollups below the mark and events above.
            self.0.roll_up().await.expect("rolling up");
        })
    }
}

fn config(nats: &Nats, ch: &ClickHouse) -> ClusterLedgerConfig {
    let mut config = ClusterLedgerConfig::new(nats.url(), ch.url());
    config.database = "suite".into();
    config.workers = 2;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_suite_passes_on_the_cluster() {
    let (Some(nats), Some(ch)) = (Nats::start(), ClickHouse::start()) else {
        return;
    };
    let ledger = ClusterLedger::connect(config(&nats, &ch)).await.unwrap();
    // Billing accounts and bindings come from a resource store; the
    // embedded one stands in for the cluster's here.
    let dir = tempfile::tempdir().unwrap();
    let store = tally_store_embedded::EmbeddedLedger::open(tally_store_embedded::StoreConfig::new(
        dir.path(),
    ))
    .unwrap();
    let resources = store.resources();
    ledger.set_resources(std::sync::Arc::new(resources.clone()));
    let backend = Cluster(ledger);
    run_all(&backend, "c").await;
    usage_is_attributed_to_billing_accounts(&backend, &resources, "c").await;
    assert!(
        backend.0.queries_from_rollups() > 0,
        "the suite's queries read the rollups"
    );
    // The workers published the quarantined events, each on its reason,
    // and the others on `.valid`, all in the one stream.
    let quarantine = backend
        .0
        .subject_counts("billing.usage.*.quarantine.*")
        .await
        .unwrap();
    assert!(quarantine.len() >= 2, "{quarantine:?}");
    let valid = backend
        .0
        .subject_counts("billing.usage.*.valid")
        .await
        .unwrap();
    assert!(valid.values().sum::<u64>() > 0, "{valid:?}");
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let stream = js.get_stream(STREAM).await.unwrap();
    let missing = stream
        .get_last_raw_message_by_subject("billing.usage.default.quarantine.MISSING_VALUE")
        .await
        .unwrap();
    let message: serde_json::Value = serde_json::from_slice(&missing.payload).unwrap();
    assert_eq!(message["reason"], "MISSING_VALUE", "{message}");
    assert!(message["event"]["id"].is_string(), "{message}");
    assert!(message["seq"].is_u64(), "{message}");
    let subject = valid.keys().next().unwrap();
    let ok = stream
        .get_last_raw_message_by_subject(subject)
        .await
        .unwrap();
    let message: serde_json::Value = serde_json::from_slice(&ok.payload).unwrap();
    assert!(message["event"]["id"].is_string(), "{message}");
    assert!(message["ingestedAt"].is_string(), "{message}");
    assert!(js.get_stream("billing-usage-quarantine").await.is_err());
}
