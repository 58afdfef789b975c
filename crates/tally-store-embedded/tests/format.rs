//! A data directory written in another store format is refused with a clear
//! error instead of being misread.

use serde_json::json;
use tally_ledger::Ledger;
use tally_model::parse_event;
use tally_store_embedded::{EmbeddedLedger, StoreConfig, StoreError};

#[tokio::test]
async fn a_store_without_this_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let ledger = EmbeddedLedger::open(StoreConfig::new(dir.path())).unwrap();
        let event =
            json!({"specversion": "1.0", "id": "1", "source": "s", "type": "t", "subject": "c"});
        let event = parse_event(event, jiff::Timestamp::now()).unwrap();
        ledger.ingest(vec![event]).await.unwrap();
    }
    // A fresh store reopens.
    drop(EmbeddedLedger::open(StoreConfig::new(dir.path())).unwrap());
    // Make it look like a store from before format versions were kept.
    {
        let db = fjall::Database::builder(dir.path().join("fjall"))
            .open()
            .unwrap();
        let meta = db
            .keyspace("meta", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        meta.remove("format").unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    match EmbeddedLedger::open(StoreConfig::new(dir.path())) {
        Err(e @ StoreError::Format { found: 1, .. }) => {
            assert!(e.to_string().contains("format 1"), "{e}");
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("an old-format store was opened"),
    }
}
