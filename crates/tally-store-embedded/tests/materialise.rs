//! Derived state lags the log but never the answers: acknowledged events are
//! answered (queries, usage span, quarantine) before they are materialised,
//! the answers do not change when they are, and rollups, dedupe entries and
//! quarantine that are lost are rebuilt from the log when the store opens.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use tally_ledger::{
    ApplyMode, Ledger, LedgerError, MeterQuery, QuarantineFilter, QuarantinePage, QueryResult,
};
use tally_meter::WindowSize;
use tally_model::{CloudEvent, Manifest, parse_event};
use tally_store_embedded::{EmbeddedLedger, StoreConfig};

const START: i64 = 1_767_268_800; // 2026-01-01T12:00:00Z

fn config(dir: &Path, patience: Duration) -> StoreConfig {
    let mut config = StoreConfig::new(dir);
    config.max_lateness = jiff::SignedDuration::from_hours(24 * 365 * 50);
    config.dedupe_horizon = config.max_lateness;
    config.materialise_patience = patience;
    config
}

fn meter(name: &str, event_type: &str) -> Manifest {
    let yaml = format!(
        "apiVersion: billing.miloapis.com/v1alpha1\nkind: MeterDefinition\n\
         metadata: {{name: {name}}}\nspec: {{meterName: {name}, \
         measurement: {{aggregation: Sum, unit: '{{request}}'}}, \
         event: {{type: {event_type}, valueProperty: $.value, dimensions: {{method: $.method}}}}}}\n"
    );
    Manifest::parse_documents(&yaml).unwrap().remove(0)
}

/// Three subjects over four days; every 17th value unusable (quarantined),
/// and a few events of a type no meter reads.
fn events() -> Vec<CloudEvent> {
    (0..300)
        .map(|i: i64| {
            let at = jiff::Timestamp::from_second(START + i * 1_201).unwrap();
            let (kind, value) = match i {
                _ if i % 17 == 0 => ("req", json!("not a number")),
                _ if i % 50 == 1 => ("other", json!(i)),
                _ => ("req", json!(i)),
            };
            let event = json!({"specversion": "1.0", "id": format!("e{i}"), "source": "s",
                "type": kind, "subject": format!("projects/p{}", i % 3), "time": at.to_string(),
                "data": {"value": value, "method": if i % 2 == 0 { "GET" } else { "PUT" }}});
            parse_event(event, jiff::Timestamp::now()).unwrap()
        })
        .collect()
}

/// Each subject's total, by brute force.
fn expected_by_subject() -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for i in 0..300i64 {
        if i % 17 != 0 && i % 50 != 1 {
            *out.entry(format!("projects/p{}", i % 3)).or_default() += i;
        }
    }
    out
}

async fn query(ledger: &EmbeddedLedger, q: MeterQuery) -> QueryResult {
    query_meter(ledger, "requests", q).await
}

/// A meter's answer, once it is built.
async fn query_meter(ledger: &EmbeddedLedger, meter: &str, q: MeterQuery) -> QueryResult {
    loop {
        match ledger.query(meter.into(), q.clone()).await {
            Err(LedgerError::NotReady { .. }) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => break other.unwrap(),
        }
    }
}

/// Everything a reader can ask of the derived state.
#[derive(Debug, PartialEq)]
struct Answers {
    queries: Vec<QueryResult>,
    span: Option<(jiff::Timestamp, jiff::Timestamp)>,
    quarantine: Vec<QuarantinePage>,
}

async fn answers(ledger: &EmbeddedLedger) -> Answers {
    let from = jiff::Timestamp::from_second(START - 7_200).unwrap();
    let to = jiff::Timestamp::from_second(START + 5 * 86_400).unwrap();
    let q = |group_by: Vec<&str>, subjects: Vec<&str>, size| MeterQuery {
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
    let mut queries = Vec::new();
    for q in [
        q(vec!["subject"], vec![], WindowSize::Day),
        q(vec!["method"], vec![], WindowSize::Day),
        q(vec![], vec!["projects/p1"], WindowSize::Hour),
    ] {
        queries.push(query(ledger, q).await);
    }
    // Quarantine in pages of 5, the cursor crossing store and tail.
    let mut quarantine = Vec::new();
    let mut cursor = None;
    loop {
        let filter = QuarantineFilter {
            meter: None,
            limit: 5,
            cursor: cursor.take(),
        };
        let page = ledger.list_quarantine(filter).await.unwrap();
        cursor = page.next_cursor.clone();
        quarantine.push(page);
        if cursor.is_none() {
            break;
        }
    }
    Answers {
        queries,
        span: ledger.usage_span("requests".into()).await.unwrap(),
        quarantine,
    }
}

fn totals(daily_by_subject: &QueryResult) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for row in &daily_by_subject.rows {
        let value: i64 = row.value.to_string().parse().unwrap();
        *out.entry(row.subject.clone().unwrap()).or_default() += value;
    }
    out
}

/// Opens a store with a meter and the events, all acknowledged, nothing
/// materialised yet; checks the answers counted every event all the same.
async fn ingested(dir: &Path) -> (EmbeddedLedger, Answers) {
    let ledger = EmbeddedLedger::open(config(dir, Duration::from_secs(3_600))).unwrap();
    ledger
        .apply(meter("requests", "req"), ApplyMode::Upsert)
        .await
        .unwrap();
    let mut first = events();
    let second = first.split_off(120);
    assert_eq!(ledger.ingest(first).await.unwrap().accepted, 120);
    // A catalog change materialises what came before: the answers below
    // read store and tail both.
    ledger
        .apply(meter("other-meter", "unused"), ApplyMode::Upsert)
        .await
        .unwrap();
    assert_eq!(ledger.stats().materialise_lag_events, 0);
    // Its backfill (which materialises first as well) is done.
    let whenever = MeterQuery {
        from: jiff::Timestamp::from_second(START).unwrap(),
        to: jiff::Timestamp::from_second(START + 60).unwrap(),
        window_size: None,
        time_zone: jiff::tz::TimeZone::UTC,
        subjects: vec![],
        group_by: vec![],
        filter_group_by: Default::default(),
        limit: None,
        cursor: None,
    };
    query_meter(&ledger, "other-meter", whenever).await;
    let outcome = ledger.ingest(second.clone()).await.unwrap();
    assert_eq!(outcome.accepted, 180);
    assert!(!outcome.quarantined.is_empty());
    // Events not yet materialised are known to dedupe, and found by id.
    let again = ledger.ingest(second).await.unwrap();
    assert_eq!((again.accepted, again.duplicates), (0, 180));
    assert_eq!(ledger.stats().materialise_lag_events, 180);
    let by_id = tally_ledger::EventFilter {
        source: Some("s".into()),
        id: Some("e250".into()),
        ..Default::default()
    };
    let found = ledger.list_events(by_id).await.unwrap();
    assert_eq!(found.items.len(), 1);
    assert_eq!(found.items[0].event.id, "e250");
    let before = answers(&ledger).await;
    assert_eq!(totals(&before.queries[0]), expected_by_subject());
    assert_eq!(
        before
            .quarantine
            .iter()
            .map(|p| p.items.len())
            .sum::<usize>(),
        (0..300).filter(|i| i % 17 == 0 || i % 50 == 1).count()
    );
    (ledger, before)
}

#[tokio::test]
async fn acknowledged_events_are_answered_before_and_after_they_are_materialised() {
    let dir = tempfile::tempdir().unwrap();
    let (ledger, before) = ingested(dir.path()).await;
    // A catalog change materialises the tail; nothing an answer says moves.
    ledger
        .apply(meter("third-meter", "unused-too"), ApplyMode::Upsert)
        .await
        .unwrap();
    assert_eq!(ledger.stats().materialise_lag_events, 0);
    assert_eq!(answers(&ledger).await, before);
    // Every event is known to dedupe, materialised or not.
    let again = ledger.ingest(events()).await.unwrap();
    assert_eq!((again.accepted, again.duplicates), (0, 300));
}

#[tokio::test]
async fn lost_derived_state_is_rebuilt_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let (_ledger, before) = ingested(dir.path()).await;
        before
    };
    // Let the writer and the materialiser let go of the store.
    tokio::time::sleep(Duration::from_millis(300)).await;
    {
        let db = fjall::Database::builder(dir.path().join("fjall"))
            .open()
            .unwrap();
        let ks = |name| {
            db.keyspace(name, fjall::KeyspaceCreateOptions::default)
                .unwrap()
        };
        for name in ["rollups", "quarantine", "dedupe"] {
            let keyspace = ks(name);
            let keys: Vec<_> = keyspace.iter().map(|item| item.key().unwrap()).collect();
            assert!(!keys.is_empty(), "{name} was materialised at shutdown");
            for key in keys {
                keyspace.remove(key).unwrap();
            }
        }
        ks("meta")
            .insert("materialised", 0u64.to_be_bytes())
            .unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let ledger = EmbeddedLedger::open(config(dir.path(), Duration::from_millis(10))).unwrap();
    assert_eq!(answers(&ledger).await, before);
    let again = ledger.ingest(events()).await.unwrap();
    assert_eq!((again.accepted, again.duplicates), (0, 300));
    // Once materialised, the same.
    for _ in 0..500 {
        if ledger.stats().materialise_lag_events == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(ledger.stats().materialise_lag_events, 0);
    assert_eq!(answers(&ledger).await, before);
}

/// Changes the closed store's `dedupe` keyspace with `f`.
fn with_dedupe(dir: &Path, f: impl FnOnce(&fjall::Keyspace)) {
    let db = fjall::Database::builder(dir.join("fjall")).open().unwrap();
    let dedupe = db
        .keyspace("dedupe", fjall::KeyspaceCreateOptions::default)
        .unwrap();
    f(&dedupe);
    db.persist(fjall::PersistMode::SyncAll).unwrap();
}

/// Opens the store and checks that every event of [`events`] is refused
/// as a duplicate and can still be found and voided by (source, id).
async fn refuses_every_event_again(dir: &Path, void_id: &str) {
    let ledger = EmbeddedLedger::open(config(dir, Duration::from_millis(10))).unwrap();
    let again = ledger.ingest(events()).await.unwrap();
    assert_eq!((again.accepted, again.duplicates), (0, 300));
    let void = tally_ledger::VoidRequest {
        source: "s".into(),
        id: void_id.into(),
        reason: "test".into(),
        voided_by: "test".into(),
    };
    let outcome = ledger.void(void).await.unwrap();
    assert_eq!(outcome.record.id, void_id);
    assert!(!outcome.already_voided);
}

#[tokio::test]
async fn a_lost_or_damaged_dedupe_index_is_rebuilt_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    drop(ingested(dir.path()).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let count = |dedupe: &fjall::Keyspace| dedupe.iter().count();
    // Lost: every entry gone, the mark with them.
    let mut stored = 0;
    with_dedupe(dir.path(), |dedupe| {
        stored = count(dedupe);
        // One run of the 300 keys (a chunk and its header), the mark and
        // the layout version.
        assert_eq!(stored, 4, "one run and the marks");
        let keys: Vec<_> = dedupe.iter().map(|item| item.key().unwrap()).collect();
        for key in keys {
            dedupe.remove(key).unwrap();
        }
    });
    refuses_every_event_again(dir.path(), "e10").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Damaged: a third of the keys gone (the run's header among them),
    // the mark naming another position than the runs reach.
    with_dedupe(dir.path(), |dedupe| {
        assert_eq!(count(dedupe), stored, "rebuilt in full");
        let keys: Vec<_> = dedupe.iter().map(|item| item.key().unwrap()).collect();
        for key in keys.iter().step_by(3) {
            dedupe.remove(key.clone()).unwrap();
        }
        dedupe.insert(b"\0position", 7u64.to_be_bytes()).unwrap();
    });
    refuses_every_event_again(dir.path(), "e11").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    with_dedupe(dir.path(), |dedupe| assert_eq!(count(dedupe), stored));
}

#[tokio::test]
async fn key_filters_past_their_budget_change_no_answer() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), Duration::from_millis(10));
    config.key_filter_bytes = 1;
    let ledger = EmbeddedLedger::open(config).unwrap();
    ledger
        .apply(meter("requests", "req"), ApplyMode::Upsert)
        .await
        .unwrap();
    assert_eq!(ledger.ingest(events()).await.unwrap().accepted, 300);
    let again = ledger.ingest(events()).await.unwrap();
    assert_eq!((again.accepted, again.duplicates), (0, 300));
    let answers = answers(&ledger).await;
    assert_eq!(totals(&answers.queries[0]), expected_by_subject());
}
