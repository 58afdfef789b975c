//! The embedded store's change feed: cursors are exact log positions and
//! void ordinals, and the order of voids survives a reopen. What the feed
//! answers (log order, then voids; paging; unknown meters) is in the shared
//! ledger suite (`tally-ledger-suite`), run by both backends.

use std::collections::BTreeSet;

use jiff::Timestamp;
use serde_json::json;
use tally_ledger::{ApplyMode, ChangeCursor, ChangePage, Ledger, VoidRequest};
use tally_model::{Manifest, parse_event};
use tally_store_embedded::{EmbeddedLedger, StoreConfig};

fn meter(name: &str, event_type: &str) -> Manifest {
    let yaml = format!(
        "apiVersion: billing.miloapis.com/v1alpha1\nkind: MeterDefinition\nmetadata: {{name: {name}}}\n\
         spec: {{meterName: {name}, measurement: {{aggregation: Sum, unit: By}}, \
         event: {{type: {event_type}, valueProperty: $.value}}}}\n"
    );
    Manifest::parse_documents(&yaml).unwrap().remove(0)
}

fn minute(m: i64) -> Timestamp {
    Timestamp::from_second(1_767_225_600 + m * 60).unwrap() // 2026-01-01T00:00Z + m minutes
}

fn open(dir: &std::path::Path) -> EmbeddedLedger {
    let mut config = StoreConfig::new(dir);
    config.max_lateness = jiff::SignedDuration::from_hours(24 * 365 * 50);
    config.dedupe_horizon = config.max_lateness;
    EmbeddedLedger::open(config).unwrap()
}

async fn ingest(ledger: &EmbeddedLedger, id: &str, event_type: &str, at: Timestamp) {
    let event = json!({"specversion": "1.0", "id": id, "source": "s", "type": event_type,
                       "subject": "projects/p", "time": at.to_string(), "data": {"value": 1}});
    ledger
        .ingest(vec![parse_event(event, Timestamp::now()).unwrap()])
        .await
        .unwrap();
}

async fn void(ledger: &EmbeddedLedger, id: &str) {
    ledger
        .void(VoidRequest {
            source: "s".into(),
            id: id.into(),
            reason: "test".into(),
            voided_by: "test".into(),
        })
        .await
        .unwrap();
}

/// Reads the whole feed from `cursor` in pages of `limit`.
async fn read_all(
    ledger: &EmbeddedLedger,
    meter: &str,
    mut cursor: ChangeCursor,
    limit: usize,
) -> (Vec<Timestamp>, ChangeCursor, usize) {
    let mut times = Vec::new();
    let mut pages = 0;
    loop {
        let ChangePage {
            times: t,
            next,
            more,
        } = ledger.changes(meter.into(), cursor, limit).await.unwrap();
        pages += 1;
        times.extend(t);
        assert!(next >= cursor, "the cursor never goes back");
        cursor = next;
        if !more {
            return (times, cursor, pages);
        }
    }
}

#[tokio::test]
async fn cursors_are_log_positions_and_voids_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path());
    ledger
        .apply(meter("requests", "req"), ApplyMode::Upsert)
        .await
        .unwrap();
    ledger
        .apply(meter("bytes", "byt"), ApplyMode::Upsert)
        .await
        .unwrap();
    for i in 0..5 {
        ingest(&ledger, &format!("r{i}"), "req", minute(i)).await;
        ingest(&ledger, &format!("b{i}"), "byt", minute(10 + i)).await;
    }
    let (times, cursor, pages) = read_all(&ledger, "requests", ChangeCursor::default(), 3).await;
    assert_eq!(times, (0..5).map(minute).collect::<Vec<_>>());
    assert!(pages > 1, "a limit of 3 pages through 10 log entries");
    assert_eq!(cursor, ChangeCursor { log: 10, voids: 0 }, "log positions");

    // A late event and two voids of old events (in the other order than
    // their log positions): the reader past them still sees them.
    ingest(&ledger, "late", "req", minute(1)).await;
    void(&ledger, "r3").await;
    void(&ledger, "b0").await;
    void(&ledger, "r0").await;
    void(&ledger, "r0").await; // twice: one record, one entry
    let (times, after, _) = read_all(&ledger, "requests", cursor, 100).await;
    assert_eq!(times, vec![minute(1), minute(3), minute(0)]);
    assert_eq!(after, ChangeCursor { log: 11, voids: 3 });

    // Cursors print and parse as `log-voids`.
    assert!("12".parse::<ChangeCursor>().is_err());
    assert_eq!("11-3".parse::<ChangeCursor>().unwrap(), after);
    assert_eq!(after.to_string(), "11-3");

    // The order of voids is durable: after a reopen the feed reads the same,
    // and a new void gets the next ordinal.
    drop(ledger);
    let ledger = open(dir.path());
    let (again, _, _) = read_all(&ledger, "requests", cursor, 1).await;
    assert_eq!(again, vec![minute(1), minute(3), minute(0)]);
    void(&ledger, "r4").await;
    let (times, next, _) = read_all(&ledger, "requests", after, 100).await;
    assert_eq!(times, vec![minute(4)]);
    assert_eq!(next, ChangeCursor { log: 11, voids: 4 });

    // Everything reported is already in the rollups: the feed from the
    // beginning names every minute that holds usage.
    let (all, _, _) = read_all(&ledger, "requests", ChangeCursor::default(), 7).await;
    let minutes: BTreeSet<Timestamp> = all.into_iter().collect();
    assert_eq!(minutes, (0..5).map(minute).collect());
}
