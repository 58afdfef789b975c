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

fn open(dir: &std::path::Path) -> EmbeddedLedger {
    let mut config = StoreConfig::new(dir);
    config.max_lateness = jiff::SignedDuration::from_hours(24 * 365 * 50);
    config.dedupe_horizon = config.max_lateness;
    EmbeddedLedger::open(config).unwrap()
}

fn events() -> Vec<tally_model::CloudEvent> {
    // Three subjects, two methods, spread over four days from mid-day.
    (0..240)
        .map(|i: i64| {
            let at = jiff::Timestamp::from_second(1_767_268_800 + i * 1_499).unwrap();
            let event = json!({"specversion": "1.0", "id": format!("e{i}"), "source": "s",
                "type": "req", "subject": format!("projects/p{}", i % 3), "time": at.to_string(),
                "data": {"value": i, "method": if i % 2 == 0 { "GET" } else { "PUT" }}});
            parse_event(event, jiff::Timestamp::now()).unwrap()
        })
        .collect()
}

/// The answers the upgrade must preserve: daily across subjects (day
/// buckets), daily by method (hours), hourly for one subject.
async fn answers(ledger: &EmbeddedLedger) -> Vec<tally_ledger::QueryResult> {
    let from = jiff::Timestamp::from_second(1_767_268_800 - 7_200).unwrap();
    let to = jiff::Timestamp::from_second(1_767_268_800 + 5 * 86_400).unwrap();
    let query = |group_by: Vec<&str>, subjects: Vec<&str>, size| tally_ledger::MeterQuery {
        from,
        to,
        window_size: Some(size),
        time_zone: jiff::tz::TimeZone::UTC,
        subjects: subjects.into_iter().map(str::to_owned).collect(),
        group_by: group_by.into_iter().map(str::to_owned).collect(),
        filter_group_by: Default::default(),
        limit: None,
        cursor: None,
    };
    let mut out = Vec::new();
    for q in [
        query(vec!["subject"], vec![], tally_meter::WindowSize::Day),
        query(vec!["method"], vec![], tally_meter::WindowSize::Day),
        query(vec![], vec!["projects/p1"], tally_meter::WindowSize::Hour),
    ] {
        let result = loop {
            match ledger.query("requests".into(), q.clone()).await {
                Err(tally_ledger::LedgerError::NotReady { .. }) => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                other => break other.unwrap(),
            }
        };
        assert!(!result.rows.is_empty());
        out.push(result);
    }
    out
}

#[tokio::test]
async fn a_format_3_store_is_upgraded_when_opened() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let ledger = open(dir.path());
        let yaml = "apiVersion: billing.miloapis.com/v1alpha1\nkind: MeterDefinition\n\
                    metadata: {name: requests}\nspec: {meterName: requests, \
                    measurement: {aggregation: Sum, unit: '{request}'}, \
                    event: {type: req, valueProperty: $.value, dimensions: {method: $.method}}}\n";
        let meter = tally_model::Manifest::parse_documents(yaml)
            .unwrap()
            .remove(0);
        ledger
            .apply(meter, tally_ledger::ApplyMode::Upsert)
            .await
            .unwrap();
        assert_eq!(ledger.ingest(events()).await.unwrap().accepted, 240);
        answers(&ledger).await
    };
    // Turn it into what format 3 wrote: bare dedupe keys, the format mark.
    {
        let db = fjall::Database::builder(dir.path().join("fjall"))
            .open()
            .unwrap();
        let ks = |name| {
            db.keyspace(name, fjall::KeyspaceCreateOptions::default)
                .unwrap()
        };
        let (meta, dedupe) = (ks("meta"), ks("dedupe"));
        let keys: Vec<_> = dedupe
            .iter()
            .map(|item| item.into_inner().unwrap())
            .collect();
        assert_eq!(keys.len(), 240);
        for (key, value) in keys {
            dedupe.remove(key.clone()).unwrap();
            dedupe.insert(key[8..].to_vec(), value).unwrap();
        }
        meta.insert("format", 3u64.to_be_bytes()).unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let ledger = open(dir.path());
    assert_eq!(answers(&ledger).await, before);
    // Every event is still known: nothing is stored twice.
    let again = ledger.ingest(events()).await.unwrap();
    assert_eq!((again.accepted, again.duplicates), (0, 240));
    drop(ledger);
    // The upgrade happened once; the store now opens as format 4.
    let ledger = open(dir.path());
    assert_eq!(answers(&ledger).await, before);
}

#[tokio::test]
async fn a_format_4_store_is_upgraded_when_opened() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let ledger = open(dir.path());
        let yaml = "apiVersion: billing.miloapis.com/v1alpha1\nkind: MeterDefinition\n\
                    metadata: {name: requests}\nspec: {meterName: requests, \
                    measurement: {aggregation: Sum, unit: '{request}'}, \
                    event: {type: req, valueProperty: $.value, dimensions: {method: $.method}}}\n";
        let meter = tally_model::Manifest::parse_documents(yaml)
            .unwrap()
            .remove(0);
        ledger
            .apply(meter, tally_ledger::ApplyMode::Upsert)
            .await
            .unwrap();
        assert_eq!(ledger.ingest(events()).await.unwrap().accepted, 240);
        answers(&ledger).await
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let raw_meta = |f: &dyn Fn(&fjall::Keyspace)| {
        let db = fjall::Database::builder(dir.path().join("fjall"))
            .open()
            .unwrap();
        let meta = db
            .keyspace("meta", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        f(&meta);
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    };
    // What format 4 wrote: rollups with the log, so no materialised
    // position (format 4 materialised everything in the acknowledged batch).
    raw_meta(&|meta| {
        assert!(meta.get("materialised").unwrap().is_some());
        meta.remove("materialised").unwrap();
        meta.insert("format", 4u64.to_be_bytes()).unwrap();
    });
    {
        let ledger = open(dir.path());
        assert_eq!(ledger.stats().materialise_lag_events, 0);
        assert_eq!(answers(&ledger).await, before);
        let again = ledger.ingest(events()).await.unwrap();
        assert_eq!((again.accepted, again.duplicates), (0, 240));
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    raw_meta(&|meta| {
        let format = meta.get("format").unwrap().unwrap();
        assert_eq!(u64::from_be_bytes(format[..].try_into().unwrap()), 5);
        let position = meta.get("materialised").unwrap().unwrap();
        assert_eq!(u64::from_be_bytes(position[..].try_into().unwrap()), 240);
    });
    let ledger = open(dir.path());
    assert_eq!(answers(&ledger).await, before);
}
