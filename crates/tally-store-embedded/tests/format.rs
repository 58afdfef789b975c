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
        // Format 3 kept one entry per event under the bare (source, id),
        // and no mark of the position they include.
        let keys: Vec<_> = dedupe.iter().map(|item| item.key().unwrap()).collect();
        assert!(!keys.is_empty());
        for key in keys {
            dedupe.remove(key).unwrap();
        }
        let far = i64::MAX / 2;
        for (seq, event) in events().iter().enumerate() {
            let mut key = (event.source.len() as u32).to_be_bytes().to_vec();
            key.extend_from_slice(event.source.as_bytes());
            key.extend_from_slice(event.id.as_bytes());
            let mut value = (seq as u64).to_be_bytes().to_vec();
            value.extend_from_slice(&far.to_be_bytes());
            dedupe.insert(key, value).unwrap();
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
    // The upgrade happened once; the store now opens in the current format.
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
        assert_eq!(u64::from_be_bytes(format[..].try_into().unwrap()), 7);
        let position = meta.get("materialised").unwrap().unwrap();
        assert_eq!(u64::from_be_bytes(position[..].try_into().unwrap()), 240);
    });
    let ledger = open(dir.path());
    assert_eq!(answers(&ledger).await, before);
}

/// The events the format-5 fixture holds (see `fixtures/format-5/README.md`).
fn format_5_events(part: i64) -> Vec<tally_model::CloudEvent> {
    (part * 80..part * 80 + 80)
        .map(|i: i64| {
            let at = jiff::Timestamp::from_second(1_767_268_800 + i * 1_499).unwrap();
            let (kind, value) = match i {
                _ if i % 17 == 0 => ("req", json!("not a number")),
                _ if i % 50 == 1 => ("other", json!(i)),
                _ => ("req", json!(i)),
            };
            let mut event = json!({"specversion": "1.0", "id": format!("e{i}"), "source": "s",
                "type": kind, "subject": format!("projects/p{}", i % 3), "time": at.to_string(),
                "data": {"value": value, "method": if i % 2 == 0 { "GET" } else { "PUT" }}});
            if i % 7 == 0 {
                event["datacontenttype"] = json!("application/json");
                event["traceparent"] = json!(format!("00-{i:032x}-{i:016x}-01"));
            }
            parse_event(event, jiff::Timestamp::now()).unwrap()
        })
        .collect()
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// What a store answers that the upgrade must keep: the meter's answers,
/// every event (newest first, with its void), and the quarantine.
async fn everything(
    ledger: &EmbeddedLedger,
) -> (
    Vec<tally_ledger::QueryResult>,
    Vec<(tally_model::CloudEvent, bool)>,
    Vec<(String, String, String)>,
) {
    let page = ledger
        .list_events(tally_ledger::EventFilter {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    let events = page
        .items
        .into_iter()
        .map(|e| (e.event, e.voided.is_some()))
        .collect();
    let quarantine = ledger
        .list_quarantine(tally_ledger::QuarantineFilter {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|q| (q.meter, q.reason, q.event.event.id))
        .collect();
    (answers(ledger).await, events, quarantine)
}

/// The fixtures' history (see `fixtures/format-5/README.md`) written by
/// this build, and what it answers.
async fn fixture_history(
    dir: &std::path::Path,
) -> (
    Vec<tally_ledger::QueryResult>,
    Vec<(tally_model::CloudEvent, bool)>,
    Vec<(String, String, String)>,
) {
    let ledger = open(dir);
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
    for part in 0..3 {
        ledger.ingest(format_5_events(part)).await.unwrap();
    }
    let void = tally_ledger::VoidRequest {
        source: "s".into(),
        id: "e4".into(),
        reason: "test".into(),
        voided_by: "fixture".into(),
    };
    ledger.void(void).await.unwrap();
    everything(&ledger).await
}

#[tokio::test]
async fn a_format_5_store_is_moved_into_event_blocks_when_opened() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format-5");
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture.join("fjall"), &dir.path().join("fjall"));
    // The same history written by this build, for comparison.
    let fresh_dir = tempfile::tempdir().unwrap();
    let expected = fixture_history(fresh_dir.path()).await;
    assert_eq!(expected.1.len(), 240);
    assert!(!expected.2.is_empty(), "the history has quarantined events");
    let ledger = open(dir.path());
    assert_eq!(everything(&ledger).await, expected);
    // Every event is still known to dedupe.
    for part in 0..3 {
        let again = ledger.ingest(format_5_events(part)).await.unwrap();
        assert_eq!((again.accepted, again.duplicates), (0, 80));
    }
    drop(ledger);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    {
        let db = fjall::Database::builder(dir.path().join("fjall"))
            .open()
            .unwrap();
        assert!(!db.keyspace_exists("events"), "the old log is dropped");
        let meta = db
            .keyspace("meta", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        let format = meta.get("format").unwrap().unwrap();
        assert_eq!(u64::from_be_bytes(format[..].try_into().unwrap()), 7);
    }
    // Opened again, in the new format, the same.
    let ledger = open(dir.path());
    assert_eq!(everything(&ledger).await, expected);
    let more = ledger.ingest(events()).await.unwrap();
    assert_eq!(more.accepted + more.duplicates, 240);
}

#[tokio::test]
async fn a_format_6_store_reads_its_rollups_and_writes_compact_ones() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format-6");
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture.join("fjall"), &dir.path().join("fjall"));
    let fresh_dir = tempfile::tempdir().unwrap();
    let expected = fixture_history(fresh_dir.path()).await;
    let ledger = open(dir.path());
    assert_eq!(everything(&ledger).await, expected);
    // Buckets written again (format-6 values merged with new events) and
    // new ones answer as in a store written by this build alone.
    let more = |i: i64| {
        let at = jiff::Timestamp::from_second(1_767_268_800 + i * 1_499).unwrap();
        parse_event(
            json!({"specversion": "1.0", "id": format!("more{i}"), "source": "s", "type": "req",
                "subject": format!("projects/p{}", i % 3), "time": at.to_string(),
                "data": {"value": i * 3, "method": "GET"}}),
            jiff::Timestamp::now(),
        )
        .unwrap()
    };
    let extra: Vec<_> = (0..300).step_by(7).map(more).collect();
    ledger.ingest(extra.clone()).await.unwrap();
    // The first handle on the fresh store was dropped; let it close.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let fresh = open(fresh_dir.path());
    fresh.ingest(extra).await.unwrap();
    let answers_after = answers(&fresh).await;
    drop(fresh);
    assert_eq!(answers(&ledger).await, answers_after);
    drop(ledger);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // Reopened (now format 7), it answers the same.
    let ledger = open(dir.path());
    assert_eq!(answers(&ledger).await, answers_after);
    drop(ledger);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let db = fjall::Database::builder(dir.path().join("fjall"))
        .open()
        .unwrap();
    let meta = db
        .keyspace("meta", fjall::KeyspaceCreateOptions::default)
        .unwrap();
    let format = meta.get("format").unwrap().unwrap();
    assert_eq!(u64::from_be_bytes(format[..].try_into().unwrap()), 7);
    // The fixture's values are format 6; the buckets written since are
    // compact (tag 0x11: a SUM).
    let rollups = db
        .keyspace("rollups", fjall::KeyspaceCreateOptions::default)
        .unwrap();
    let tags: std::collections::BTreeSet<u8> = rollups
        .iter()
        .map(|item| item.value().unwrap()[0])
        .collect();
    assert_eq!(
        tags,
        [1, 0x11].into_iter().collect(),
        "both layouts are read"
    );
}
