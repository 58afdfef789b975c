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
    // Slabs of 4 events: the suite's queries read every level of the
    // pre-summed rollups, the samples past them and the events after.
    config.rollup_slab = 4;
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

/// A row count of the `gens` database.
async fn count(ch: &tally_store_cluster::ch::Ch, sql: &str) -> u64 {
    #[derive(serde::Deserialize)]
    struct Count {
        n: u64,
    }
    let rows: Vec<Count> = ch.select(sql).await.expect("a count");
    rows.first().map_or(0, |c| c.n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_generation_is_deleted_once_its_successor_is_backfilled() {
    use tally_ledger::ApplyMode;
    use tally_ledger_suite::{base_time, event, meter, value};
    let (Some(nats), Some(ch)) = (Nats::start(), ClickHouse::start()) else {
        return;
    };
    let mut config = config(&nats, &ch);
    config.database = "gens".into();
    config.rollups = false; // rolled here, step by step
    let ledger = ClusterLedger::connect(config).await.unwrap();
    let client =
        tally_store_cluster::ch::Ch::new(&ch.url(), "gens", Duration::from_secs(10)).unwrap();
    let t = base_time() + jiff::SignedDuration::from_hours(1);
    let (from, to) = (
        base_time(),
        base_time() + jiff::SignedDuration::from_hours(24),
    );
    ledger
        .apply(meter("g", "g.usage", "COUNT"), ApplyMode::Upsert)
        .await
        .unwrap();
    let events: Vec<_> = (0..10)
        .map(|i| {
            event(
                "s",
                &i.to_string(),
                "g.usage",
                "c",
                t,
                serde_json::json!({"value": 2}),
            )
        })
        .collect();
    ledger.ingest(events).await.unwrap();
    ledger.settle(Duration::from_secs(60)).await.unwrap();
    ledger.roll_up().await.unwrap();
    assert_eq!(value(&ledger, "g", from, to).await, 10.into());
    let generations = "SELECT uniqExact(gen) AS n FROM gens.rollups WHERE meter = 'g'";
    assert_eq!(count(&client, generations).await, 1);
    // An edit is a new generation: backfilled, then the old one deleted.
    ledger
        .apply(meter("g", "g.usage", "SUM"), ApplyMode::Upsert)
        .await
        .unwrap();
    let rolled = ledger.queries_from_rollups();
    ledger.roll_up().await.unwrap();
    assert_eq!(value(&ledger, "g", from, to).await, 20.into());
    assert!(
        ledger.queries_from_rollups() > rolled,
        "from the new rollups"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for table in ["samples", "rollups"] {
        let sql = format!("SELECT uniqExact(gen) AS n FROM gens.{table} WHERE meter = 'g'");
        while count(&client, &sql).await != 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "{table} kept the old generation"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let marks = "SELECT count() AS n FROM (SELECT gen, argMax(below, at) AS b \
                 FROM gens.rollup_marks GROUP BY gen, width) WHERE b > 0";
    let live = count(&client, marks).await;
    assert!(live >= 2, "the new generation's marks: {live}");
    assert_eq!(value(&ledger, "g", from, to).await, 20.into());
    // Nothing left to delete: rolling again changes nothing.
    ledger.roll_up().await.unwrap();
    assert_eq!(count(&client, marks).await, live);
}
