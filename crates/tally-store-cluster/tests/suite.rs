//! The ledger's behavioural suite (`tally-ledger-suite`) against the
//! cluster backend, with a real `nats-server -js` and `clickhouse-server`
//! started for this test binary, and faults: ClickHouse down, a restart of
//! nats-server, a worker stopped mid-stream.

use std::time::Duration;

use futures::future::BoxFuture;
use tally_ledger::Ledger;
use tally_ledger_suite::peers::{ClickHouse, Nats};
use tally_ledger_suite::{Backend, run_all};
use tally_store_cluster::{ClusterLedger, ClusterLedgerConfig};

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
    run_all(&Cluster(ledger), "c").await;
}
