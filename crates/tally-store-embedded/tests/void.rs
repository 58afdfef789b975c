//! Voiding takes an event out of the buckets it was rolled up into, even
//! when the meter was Retired since (Retired meters refuse *new* events):
//! SUM buckets subtract it, and a MAX meter is rebuilt from the log up to
//! where it was retired.

use std::time::Duration;

use serde_json::json;
use tally_ledger::{ApplyMode, Ledger, LedgerError, MeterQuery, VoidRequest};
use tally_model::{Manifest, parse_event};
use tally_store_embedded::{EmbeddedLedger, StoreConfig};

fn meter(phase: &str, aggregation: &str) -> Manifest {
    let yaml = format!(
        "apiVersion: billing.miloapis.com/v1alpha1\nkind: MeterDefinition\nmetadata: {{name: m-{}}}\n\
         spec: {{meterName: m-{}, phase: {phase}, measurement: {{aggregation: {aggregation}, unit: By}}, \
         event: {{type: t, valueProperty: $.value}}}}\n",
        aggregation.to_lowercase(),
        aggregation.to_lowercase(),
    );
    Manifest::parse_documents(&yaml).unwrap().remove(0)
}

async fn total(ledger: &EmbeddedLedger, name: &str) -> String {
    let q = MeterQuery {
        from: "2026-01-01T00:00:00Z".parse().unwrap(),
        to: "2026-01-02T00:00:00Z".parse().unwrap(),
        window_size: None,
        time_zone: jiff::tz::TimeZone::UTC,
        subjects: vec![],
        group_by: vec![],
        filter_group_by: Default::default(),
        limit: None,
        cursor: None,
    };
    for _ in 0..500 {
        match ledger.query(name.to_owned(), q.clone()).await {
            Err(LedgerError::NotReady { .. }) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Ok(r) => {
                return r
                    .rows
                    .first()
                    .map_or("none".into(), |row| row.value.to_string());
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("never ready")
}

#[tokio::test]
async fn voiding_reaches_the_buckets_of_a_meter_retired_since() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = StoreConfig::new(dir.path());
    config.max_lateness = jiff::SignedDuration::from_hours(24 * 365 * 50);
    let ledger = EmbeddedLedger::open(config).unwrap();
    for aggregation in ["SUM", "MAX"] {
        ledger
            .apply(meter("Published", aggregation), ApplyMode::Upsert)
            .await
            .unwrap();
    }
    let events = (1..=3)
        .map(|i| {
            let e = json!({"specversion": "1.0", "id": i.to_string(), "source": "s", "type": "t",
                           "subject": "c", "time": "2026-01-01T10:00:00Z", "data": {"value": i * 10}});
            parse_event(e, jiff::Timestamp::now()).unwrap()
        })
        .collect();
    ledger.ingest(events).await.unwrap();
    for aggregation in ["SUM", "MAX"] {
        ledger
            .apply(meter("Deprecated", aggregation), ApplyMode::Upsert)
            .await
            .unwrap();
        ledger
            .apply(meter("Retired", aggregation), ApplyMode::Upsert)
            .await
            .unwrap();
    }
    assert_eq!(total(&ledger, "m-sum").await, "60");
    assert_eq!(total(&ledger, "m-max").await, "30");
    let void = |id: &str| VoidRequest {
        source: "s".into(),
        id: id.into(),
        reason: "test".into(),
        voided_by: "test".into(),
    };
    let outcome = ledger.void(void("3")).await.unwrap();
    assert_eq!(total(&ledger, "m-sum").await, "30");
    // MAX cannot take 30 back out: it is rebuilt from the log, measuring
    // what arrived before it was Retired.
    assert!(outcome.still_counted_by.is_empty(), "{outcome:?}");
    assert_eq!(total(&ledger, "m-max").await, "20");
    // Events after retirement stay refused, in a rebuild too.
    let late = json!({"specversion": "1.0", "id": "4", "source": "s", "type": "t",
                      "subject": "c", "time": "2026-01-01T10:00:00Z", "data": {"value": 99}});
    let late = parse_event(late, jiff::Timestamp::now()).unwrap();
    let answer = ledger.ingest(vec![late]).await.unwrap();
    assert_eq!(answer.quarantined.len(), 2, "both meters refuse it");
    ledger.void(void("2")).await.unwrap();
    assert_eq!(total(&ledger, "m-max").await, "10");
    ledger.void(void("1")).await.unwrap();
    assert_eq!(
        total(&ledger, "m-sum").await,
        "none",
        "an emptied window is omitted"
    );
    assert_eq!(total(&ledger, "m-max").await, "none");
}
