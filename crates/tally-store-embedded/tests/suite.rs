//! The ledger's behavioural suite (`tally-ledger-suite`), shared with the
//! cluster backend, against the embedded store.

use futures::future::BoxFuture;
use tally_ledger::Ledger;
use tally_ledger_suite::{Backend, run_all, usage_is_attributed_to_billing_accounts};
use tally_store_embedded::{EmbeddedLedger, StoreConfig};

struct Embedded(EmbeddedLedger);

impl Backend for Embedded {
    fn ledger(&self) -> &dyn Ledger {
        &self.0
    }

    /// An acknowledged event is in the next answer already.
    fn settle(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_suite_passes_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = EmbeddedLedger::open(StoreConfig::new(dir.path())).unwrap();
    let resources = ledger.resources();
    let backend = Embedded(ledger);
    run_all(&backend, "e").await;
    usage_is_attributed_to_billing_accounts(&backend, &resources, "e").await;
}
