//! Dev-only: the ledger's behavioural suite, written once against
//! [`tally_ledger::Ledger`] and run by each backend's tests through a
//! [`Backend`] (a ledger and a way to wait until what it acknowledged is in
//! its answers), and the real peer servers ([`peers`]) the cluster
//! backend's tests start.
//!
//! Each suite function takes a `prefix` that its meter names and event
//! types start with, so several run against one ledger without seeing
//! each other's events.

pub mod peers;
mod reference;

use std::time::Duration;

use futures::future::BoxFuture;
use jiff::{SignedDuration, Timestamp};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tally_ledger::{
    ApplyMode, ChangeCursor, EventFilter, Ledger, LedgerError, MeterQuery, QuarantineFilter,
    QueryResult, VoidRequest,
};
use tally_model::{CloudEvent, Manifest};

pub use reference::aggregations_match_the_reference;

/// A backend under test.
pub trait Backend: Sync {
    fn ledger(&self) -> &dyn Ledger;
    /// Resolves once every event acknowledged so far is in answers.
    fn settle(&self) -> BoxFuture<'_, ()>;
}

/// A `MeterDefinition` named `name` over events of `event_type`: the value
/// at `$.value` (none for COUNT), dimension `region` at `$.region`.
pub fn meter(name: &str, event_type: &str, aggregation: &str) -> Manifest {
    let value = if aggregation == "COUNT" {
        String::new()
    } else {
        ", valueProperty: $.value".to_owned()
    };
    let yaml = format!(
        "apiVersion: billing.miloapis.com/v1alpha1\n\
         kind: MeterDefinition\n\
         metadata: {{name: {name}}}\n\
         spec: {{meterName: {name}, measurement: {{aggregation: {aggregation}}}, \
         event: {{type: {event_type}{value}, dimensions: {{region: $.region}}}}}}\n"
    );
    Manifest::parse_documents(&yaml)
        .unwrap_or_else(|e| panic!("{yaml}\n{e}"))
        .remove(0)
}

/// A structurally valid event.
pub fn event(
    source: &str,
    id: &str,
    event_type: &str,
    subject: &str,
    time: Timestamp,
    data: Value,
) -> CloudEvent {
    tally_model::parse_event(
        json!({"specversion": "1.0", "id": id, "source": source, "type": event_type,
               "subject": subject, "time": time.to_string(), "data": data}),
        Timestamp::now(),
    )
    .unwrap_or_else(|e| panic!("{e:?}"))
}

/// The start of the UTC day two days ago: events around it are admitted
/// by every backend's default lateness.
pub fn base_time() -> Timestamp {
    let now = Timestamp::now().as_second();
    Timestamp::from_second(now - now.rem_euclid(86_400) - 2 * 86_400).expect("a recent day")
}

/// A whole-range query without windows.
pub fn total(from: Timestamp, to: Timestamp) -> MeterQuery {
    MeterQuery {
        from,
        to,
        window_size: None,
        time_zone: jiff::tz::TimeZone::UTC,
        subjects: vec![],
        group_by: vec![],
        filter_group_by: Default::default(),
        limit: None,
        cursor: None,
    }
}

/// Queries, retrying while the meter is not ready (backfilling).
pub async fn query_ready(ledger: &dyn Ledger, meter: &str, q: MeterQuery) -> QueryResult {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match ledger.query(meter.to_owned(), q.clone()).await {
            Err(LedgerError::NotReady { .. }) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other.unwrap_or_else(|e| panic!("query {meter}: {e}")),
        }
    }
}

/// The single value of a whole-range query (zero when it has no row).
pub async fn value(ledger: &dyn Ledger, meter: &str, from: Timestamp, to: Timestamp) -> Decimal {
    let answer = query_ready(ledger, meter, total(from, to)).await;
    assert!(answer.rows.len() <= 1, "{answer:?}");
    answer.rows.first().map_or(Decimal::ZERO, |r| r.value)
}

fn day_after(t: Timestamp) -> Timestamp {
    t + SignedDuration::from_hours(24)
}

/// A re-sent (source, id) is stored once, within a request and across
/// requests, with the first copy's value, and answered as a duplicate.
pub async fn duplicates_are_counted_once(b: &dyn Backend, prefix: &str) {
    let ledger = b.ledger();
    let (kind, name) = (format!("{prefix}.dup"), format!("{prefix}-dup"));
    ledger
        .apply(meter(&name, &kind, "SUM"), ApplyMode::Upsert)
        .await
        .unwrap();
    let t = base_time() + SignedDuration::from_mins(90);
    let first = ledger
        .ingest(vec![
            event("s", "1", &kind, "c", t, json!({"value": 5})),
            event("s", "1", &kind, "c", t, json!({"value": 7})),
            event("s", "2", &kind, "c", t, json!({"value": 1})),
        ])
        .await
        .unwrap();
    assert_eq!((first.accepted, first.duplicates), (2, 1), "{first:?}");
    b.settle().await;
    let again = ledger
        .ingest(vec![event("s", "1", &kind, "c", t, json!({"value": 100}))])
        .await
        .unwrap();
    assert_eq!((again.accepted, again.duplicates), (0, 1), "{again:?}");
    b.settle().await;
    assert_eq!(
        value(ledger, &name, base_time(), day_after(base_time())).await,
        Decimal::from(6)
    );
    let page = ledger
        .list_events(EventFilter {
            source: Some("s".into()),
            id: Some("1".into()),
            event_type: Some(kind.clone()),
            limit: 10,
            ..EventFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].event.data, Some(json!({"value": 5})));
}

/// A voided event stops counting; voiding again answers the first record;
/// the audit trail and the change feed show it.
pub async fn voided_events_stop_counting(b: &dyn Backend, prefix: &str) {
    let ledger = b.ledger();
    let (kind, name) = (format!("{prefix}.void"), format!("{prefix}-void"));
    ledger
        .apply(meter(&name, &kind, "SUM"), ApplyMode::Upsert)
        .await
        .unwrap();
    let t = base_time() + SignedDuration::from_hours(3);
    let events: Vec<_> = (1..=3)
        .map(|i| {
            event(
                "v",
                &format!("{prefix}-{i}"),
                &kind,
                "c",
                t,
                json!({"value": i * 10}),
            )
        })
        .collect();
    ledger.ingest(events).await.unwrap();
    b.settle().await;
    let (from, to) = (base_time(), day_after(base_time()));
    assert_eq!(value(ledger, &name, from, to).await, Decimal::from(60));
    let request = VoidRequest {
        source: "v".into(),
        id: format!("{prefix}-2"),
        reason: "double billed".into(),
        voided_by: "suite".into(),
    };
    let first = ledger.void(request.clone()).await.unwrap();
    assert!(!first.already_voided);
    assert_eq!(first.record.event_type, kind);
    let second = ledger.void(request).await.unwrap();
    assert!(second.already_voided);
    assert_eq!(second.record, first.record);
    assert_eq!(value(ledger, &name, from, to).await, Decimal::from(40));
    let voids = ledger.list_voids(1000, None).await.unwrap();
    assert!(voids.items.contains(&first.record));
    let missing = ledger
        .void(VoidRequest {
            source: "v".into(),
            id: "never-stored".into(),
            reason: "r".into(),
            voided_by: "suite".into(),
        })
        .await;
    assert!(
        matches!(missing, Err(LedgerError::NotFound { .. })),
        "{missing:?}"
    );
    let mut cursor = ChangeCursor::default();
    let mut times = Vec::new();
    loop {
        let page = ledger.changes(name.clone(), cursor, 1000).await.unwrap();
        times.extend(page.times);
        cursor = page.next;
        if !page.more {
            break;
        }
    }
    // Three stored events and one void, all at `t`.
    assert_eq!(times.iter().filter(|x| **x == t).count(), 4, "{times:?}");
}

/// An event no meter reads is quarantined; a meter applied afterwards
/// counts it (backfill), and lists the events it cannot measure.
pub async fn late_meters_backfill_and_quarantine(b: &dyn Backend, prefix: &str) {
    let ledger = b.ledger();
    let (kind, name) = (format!("{prefix}.late"), format!("{prefix}-late"));
    let t = base_time() + SignedDuration::from_hours(5);
    let outcome = ledger
        .ingest(vec![
            event("l", "1", &kind, "c", t, json!({"value": 2})),
            event("l", "2", &kind, "c", t, json!({"value": 3})),
            event("l", "3", &kind, "c", t, json!({"other": 1})),
        ])
        .await
        .unwrap();
    assert_eq!(outcome.accepted, 3);
    assert!(
        outcome
            .quarantined
            .iter()
            .all(|q| q.reason == "UNKNOWN_METER"),
        "{outcome:?}"
    );
    b.settle().await;
    let unknown = ledger
        .list_quarantine(QuarantineFilter {
            meter: Some(String::new()),
            limit: 1_000,
            cursor: None,
        })
        .await
        .unwrap();
    let mut ids: Vec<_> = unknown
        .items
        .iter()
        .filter(|q| q.event.event.kind == kind)
        .map(|q| (q.event.event.id.as_str(), q.reason.as_str()))
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            ("1", "UNKNOWN_METER"),
            ("2", "UNKNOWN_METER"),
            ("3", "UNKNOWN_METER")
        ]
    );
    ledger
        .apply(meter(&name, &kind, "SUM"), ApplyMode::Upsert)
        .await
        .unwrap();
    let (from, to) = (base_time(), day_after(base_time()));
    assert_eq!(value(ledger, &name, from, to).await, Decimal::from(5));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let page = ledger
            .list_quarantine(QuarantineFilter {
                meter: Some(name.clone()),
                limit: 100,
                cursor: None,
            })
            .await
            .unwrap();
        let ids: Vec<_> = page
            .items
            .iter()
            .map(|q| q.event.event.id.as_str())
            .collect();
        if ids == ["3"] {
            assert_eq!(page.items[0].reason, "MISSING_VALUE");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "quarantine: {ids:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = ledger
        .get(tally_model::Kind::MeterDefinition, name.clone())
        .await
        .unwrap();
    assert_eq!(got.metadata.name, name);
}

fn binding(name: &str, account: &str, project: &str, established: Timestamp) -> Manifest {
    Manifest::parse_documents(&format!(
        "apiVersion: billing.miloapis.com/v1alpha1\nkind: BillingAccountBinding\n\
         metadata: {{name: {name}}}\nspec: {{billingAccountRef: {{name: {account}}}, \
         projectRef: {{name: {project}}}}}\n\
         status: {{billingResponsibility: {{establishedAt: '{established}'}}}}\n"
    ))
    .unwrap_or_else(|e| panic!("{e}"))
    .remove(0)
}

/// Usage grouped and filtered by billing account: a project bound to one
/// account, then (from a binding established mid-minute, effective at the
/// next whole minute) to another; a project never bound is unattributed.
pub async fn usage_is_attributed_to_billing_accounts(
    b: &dyn Backend,
    resources: &dyn tally_ledger::ResourceStore,
    prefix: &str,
) {
    let ledger = b.ledger();
    let (kind, name) = (format!("{prefix}.attr"), format!("{prefix}-attr"));
    let (pa, pb) = (format!("{prefix}-pa"), format!("{prefix}-pb"));
    ledger
        .apply(meter(&name, &kind, "SUM"), ApplyMode::Upsert)
        .await
        .unwrap();
    let base = base_time();
    let at = |minutes: i64, seconds: i64| {
        base + SignedDuration::from_mins(minutes) + SignedDuration::from_secs(seconds)
    };
    let events = vec![
        event(
            "a",
            "1",
            &kind,
            &format!("projects/{pa}"),
            at(10, 0),
            json!({"value": 1}),
        ),
        event(
            "a",
            "2",
            &kind,
            &format!("projects/{pa}"),
            at(750, 20),
            json!({"value": 2}),
        ),
        event(
            "a",
            "3",
            &kind,
            &format!("projects/{pa}"),
            at(751, 0),
            json!({"value": 4}),
        ),
        event(
            "a",
            "4",
            &kind,
            &format!("projects/{pb}"),
            at(751, 0),
            json!({"value": 8}),
        ),
    ];
    ledger.ingest(events).await.unwrap();
    b.settle().await;
    for (n, (account, established)) in [("a1", at(0, 0)), ("a2", at(750, 15))].iter().enumerate() {
        resources
            .apply(
                binding(&format!("{prefix}-b{n}"), account, &pa, *established),
                ApplyMode::Upsert,
            )
            .await
            .unwrap();
    }
    let mut q = total(base, day_after(base));
    q.window_size = Some(tally_meter::WindowSize::Day);
    q.group_by = vec!["billing_account".into()];
    let rows: Vec<(Option<String>, Decimal)> = query_ready(ledger, &name, q.clone())
        .await
        .rows
        .into_iter()
        .map(|r| {
            (
                r.group_by.get("billing_account").cloned().flatten(),
                r.value,
            )
        })
        .collect();
    // 12:30:15 takes effect at 12:31: the event at 12:30:20 is still a1's.
    let want = vec![
        (None, Decimal::from(8)),
        (Some("a1".to_owned()), Decimal::from(3)),
        (Some("a2".to_owned()), Decimal::from(4)),
    ];
    let mut sorted = rows.clone();
    sorted.sort();
    assert_eq!(sorted, want, "{rows:?}");
    q.group_by = vec![];
    q.filter_group_by = [("billing_account".to_owned(), "a2".to_owned())].into();
    let only = query_ready(ledger, &name, q).await;
    assert_eq!(only.rows.len(), 1, "{only:?}");
    assert_eq!(only.rows[0].value, Decimal::from(4));
}

/// A `MeterDefinition` like [`meter`] (no dimensions) in `phase`.
fn meter_in_phase(name: &str, event_type: &str, aggregation: &str, phase: &str) -> Manifest {
    let yaml = format!(
        "apiVersion: billing.miloapis.com/v1alpha1\nkind: MeterDefinition\nmetadata: {{name: {name}}}\n\
         spec: {{meterName: {name}, phase: {phase}, measurement: {{aggregation: {aggregation}, unit: By}}, \
         event: {{type: {event_type}, valueProperty: $.value}}}}\n"
    );
    Manifest::parse_documents(&yaml)
        .unwrap_or_else(|e| panic!("{yaml}\n{e}"))
        .remove(0)
}

/// Phases and voids: a meter Deprecated and then Retired keeps measuring
/// what arrived before it was retired and refuses (quarantines) what comes
/// after; voiding still takes an event out of it — SUM and MAX alike (MAX
/// cannot subtract: the backend measures again what is left), down to an
/// empty window that is omitted.
pub async fn voids_reach_meters_retired_since(b: &dyn Backend, prefix: &str) {
    let ledger = b.ledger();
    let kind = format!("{prefix}.retire");
    // Dedupe is by (source, id) across types: a source of its own.
    let source = format!("{prefix}.retire");
    let (sum, max) = (format!("{prefix}-rsum"), format!("{prefix}-rmax"));
    for (name, aggregation) in [(&sum, "SUM"), (&max, "MAX")] {
        ledger
            .apply(
                meter_in_phase(name, &kind, aggregation, "Published"),
                ApplyMode::Upsert,
            )
            .await
            .unwrap();
    }
    let t = base_time() + SignedDuration::from_hours(10);
    let events = (1..=3)
        .map(|i| {
            event(
                &source,
                &i.to_string(),
                &kind,
                "c",
                t,
                json!({"value": i * 10}),
            )
        })
        .collect();
    ledger.ingest(events).await.unwrap();
    b.settle().await;
    for (name, aggregation) in [(&sum, "SUM"), (&max, "MAX")] {
        for phase in ["Deprecated", "Retired"] {
            ledger
                .apply(
                    meter_in_phase(name, &kind, aggregation, phase),
                    ApplyMode::Upsert,
                )
                .await
                .unwrap();
        }
    }
    let (from, to) = (base_time(), day_after(base_time()));
    let rows = |name: &String| {
        let name = name.clone();
        async move { query_ready(ledger, &name, total(from, to)).await.rows }
    };
    assert_eq!(value(ledger, &sum, from, to).await, Decimal::from(60));
    assert_eq!(value(ledger, &max, from, to).await, Decimal::from(30));
    let void = |id: &str| VoidRequest {
        source: source.clone(),
        id: id.into(),
        reason: "test".into(),
        voided_by: "test".into(),
    };
    let outcome = ledger.void(void("3")).await.unwrap();
    assert!(outcome.still_counted_by.is_empty(), "{outcome:?}");
    b.settle().await;
    assert_eq!(value(ledger, &sum, from, to).await, Decimal::from(30));
    assert_eq!(value(ledger, &max, from, to).await, Decimal::from(20));
    // An event after retirement is refused by both, and stays out.
    let late = event(&source, "4", &kind, "c", t, json!({"value": 99}));
    let answer = ledger.ingest(vec![late]).await.unwrap();
    assert_eq!(
        answer.quarantined.len(),
        2,
        "both meters refuse it: {answer:?}"
    );
    b.settle().await;
    ledger.void(void("2")).await.unwrap();
    b.settle().await;
    assert_eq!(value(ledger, &max, from, to).await, Decimal::from(10));
    assert_eq!(value(ledger, &sum, from, to).await, Decimal::from(10));
    ledger.void(void("1")).await.unwrap();
    b.settle().await;
    assert!(rows(&sum).await.is_empty(), "an emptied window is omitted");
    assert!(rows(&max).await.is_empty(), "an emptied window is omitted");
}

/// Every suite function, one after another, each with its own prefix.
pub async fn run_all(b: &dyn Backend, prefix: &str) {
    duplicates_are_counted_once(b, &format!("{prefix}a")).await;
    voided_events_stop_counting(b, &format!("{prefix}b")).await;
    late_meters_backfill_and_quarantine(b, &format!("{prefix}c")).await;
    aggregations_match_the_reference(b, &format!("{prefix}d"), 12).await;
    voids_reach_meters_retired_since(b, &format!("{prefix}e")).await;
}
