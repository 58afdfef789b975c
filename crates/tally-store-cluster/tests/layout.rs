//! The JetStream layout with a real nats-server (and ClickHouse): the
//! legacy quarantine stream is moved into `billing-usage`, and a duplicate
//! is counted in the ingest answer however late it comes and at whichever
//! node, even while ClickHouse is down.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use jiff::SignedDuration;
use rust_decimal::Decimal;
use serde_json::json;
use tally_ledger::{ApplyMode, Ledger};
use tally_ledger_suite::peers::{ClickHouse, Nats};
use tally_ledger_suite::{base_time, event, meter, value};
use tally_store_cluster::{ClusterLedger, ClusterLedgerConfig, LEGACY_QUARANTINE_STREAM, STREAM};

fn config(nats: &Nats, ch: &ClickHouse, database: &str) -> ClusterLedgerConfig {
    let mut config = ClusterLedgerConfig::new(nats.url(), ch.url());
    config.database = database.into();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_quarantine_stream_moves_into_billing_usage() {
    let (Some(nats), Some(ch)) = (Nats::start(), ClickHouse::start()) else {
        return;
    };
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    // The older layout: ingest alone in `billing-usage`, quarantine in a
    // stream of its own.
    js.create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec!["billing.usage.*.ingest".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    js.create_stream(stream::Config {
        name: LEGACY_QUARANTINE_STREAM.into(),
        subjects: vec!["billing.usage.*.quarantine.*".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    for (i, reason) in ["MISSING_VALUE", "MISSING_VALUE", "UNKNOWN_METER"]
        .iter()
        .enumerate()
    {
        let publish = jetstream::message::PublishMessage::build()
            .payload(Bytes::from(format!("{{\"n\":{i}}}")))
            .message_id(format!("q.{i}"));
        js.send_publish(format!("billing.usage.p.quarantine.{reason}"), publish)
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let ledger = ClusterLedger::connect(config(&nats, &ch, "legacy"))
        .await
        .unwrap();
    assert!(js.get_stream(LEGACY_QUARANTINE_STREAM).await.is_err());
    let moved = ledger
        .subject_counts("billing.usage.*.quarantine.*")
        .await
        .unwrap();
    assert_eq!(
        moved.into_iter().collect::<Vec<_>>(),
        [
            ("billing.usage.p.quarantine.MISSING_VALUE".to_owned(), 2),
            ("billing.usage.p.quarantine.UNKNOWN_METER".to_owned(), 1)
        ]
    );
    // Moved with their ids: the same notification again is a duplicate.
    let again = jetstream::message::PublishMessage::build()
        .payload(Bytes::from_static(b"{}"))
        .message_id("q.2");
    let ack = js
        .send_publish("billing.usage.p.quarantine.UNKNOWN_METER", again)
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(ack.duplicate);
    // A second start finds nothing to move and changes nothing.
    drop(ledger);
    let ledger = ClusterLedger::connect(config(&nats, &ch, "legacy"))
        .await
        .unwrap();
    let all = ledger.subject_counts("billing.usage.>").await.unwrap();
    assert_eq!(all.values().sum::<u64>(), 3, "{all:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_duplicate_at_another_node_is_counted_even_with_clickhouse_down() {
    let (Some(nats), Some(mut ch)) = (Nats::start(), ClickHouse::start()) else {
        return;
    };
    // The broker's own duplicate window is one second here, so what
    // follows is past it: only the dedupe bucket can tell.
    let mut a_config = config(&nats, &ch, "late");
    a_config.duplicate_window = Duration::from_secs(1);
    let a = ClusterLedger::connect(a_config).await.unwrap();
    let mut b_config = config(&nats, &ch, "late");
    b_config.workers = 0;
    let b = ClusterLedger::connect(b_config).await.unwrap();
    a.apply(meter("late", "late.usage", "SUM"), ApplyMode::Upsert)
        .await
        .unwrap();
    let t = base_time() + SignedDuration::from_hours(3);
    let batch: Vec<_> = (0..50)
        .map(|i| {
            event(
                "s",
                &i.to_string(),
                "late.usage",
                "c",
                t,
                json!({"value": 2}),
            )
        })
        .collect();
    let first = a.ingest(batch[..40].to_vec()).await.unwrap();
    assert_eq!((first.accepted, first.duplicates), (40, 0));
    a.settle(Duration::from_secs(60)).await.unwrap();
    ch.kill();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // Node B, past the window, ClickHouse down: 40 duplicates, 10 new,
    // and within the request a repeat is a duplicate too.
    let mut resend = batch.clone();
    resend.push(batch[45].clone());
    let second = b.ingest(resend).await.unwrap();
    assert_eq!((second.accepted, second.duplicates), (10, 41));
    let third = a.ingest(batch.clone()).await.unwrap();
    assert_eq!((third.accepted, third.duplicates), (0, 50));
    ch.resume();
    a.settle(Duration::from_secs(120)).await.unwrap();
    let (from, to) = (base_time(), base_time() + SignedDuration::from_hours(24));
    assert_eq!(value(&b, "late", from, to).await, Decimal::from(100));
    let stats = b.stats();
    assert_eq!(stats.events_duplicate_total, 41, "{stats:?}");
}
