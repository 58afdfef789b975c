//! `LifecycleStore` against a naive model: whatever the batches and
//! duplicates, each (source, id) is stored once, at its first arrival, every
//! instance lists its events in arrival order, pages concatenate to the
//! whole, and a reopened store answers the same.

use std::collections::{BTreeMap, HashSet};

use proptest::prelude::*;
use tally_compute::lifecycle::{LifecycleEvent, LifecycleKind};
use tally_compute::store::{InstanceSummary, LifecycleStore};

fn event(source: u8, id: u8, project: u8, instance: u8, kind: usize, second: u8) -> LifecycleEvent {
    LifecycleEvent {
        source: format!("src-{source}"),
        id: format!("id-{id}"),
        kind: LifecycleKind::ALL[kind % LifecycleKind::ALL.len()],
        reason: None,
        time: jiff::Timestamp::from_second(1_800_000_000 + i64::from(second)).unwrap(),
        project: format!("p{project}"),
        instance: format!("i{instance}"),
        namespace: None,
        workload: None,
        uid: None,
        node: None,
        message: None,
    }
}

fn arb_event() -> impl Strategy<Value = LifecycleEvent> {
    (0..2u8, 0..12u8, 0..2u8, 0..3u8, 0..7usize, 0..60u8)
        .prop_map(|(s, i, p, n, k, t)| event(s, i, p, n, k, t))
}

type Model = BTreeMap<(String, String), Vec<LifecycleEvent>>;

fn all_events(
    store: &LifecycleStore,
    project: &str,
    instance: &str,
    page: usize,
) -> Vec<LifecycleEvent> {
    let mut out = Vec::new();
    let mut cursor = None;
    loop {
        let p = store
            .events(project, instance, page, cursor.as_deref())
            .unwrap()
            .unwrap();
        out.extend(p.items);
        match p.next_cursor {
            Some(c) => cursor = Some(c),
            None => return out,
        }
    }
}

fn all_instances(
    store: &LifecycleStore,
    project: Option<&str>,
    page: usize,
) -> Vec<InstanceSummary> {
    let mut out = Vec::new();
    let mut cursor = None;
    loop {
        let p = store.instances(project, page, cursor.as_deref()).unwrap();
        out.extend(p.items);
        match p.next_cursor {
            Some(c) => cursor = Some(c),
            None => return out,
        }
    }
}

fn check(store: &LifecycleStore, model: &Model, page: usize) {
    let listed: Vec<(String, String)> = all_instances(store, None, page)
        .into_iter()
        .map(|s| (s.project, s.instance))
        .collect();
    let expected: Vec<_> = model.keys().cloned().collect();
    assert_eq!(listed, expected);
    for ((project, instance), events) in model {
        assert_eq!(&all_events(store, project, instance, page), events);
        let mine = all_instances(store, Some(project), page);
        assert!(mine.iter().all(|s| &s.project == project));
        let summary = mine.iter().find(|s| &s.instance == instance).unwrap();
        assert_eq!(summary.events, events.len() as u64);
        let latest = events.iter().map(|e| e.time).max().unwrap();
        assert_eq!(summary.since, latest);
    }
    assert!(store.events("p9", "i0", 10, None).unwrap().is_none());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn stored_once_in_arrival_order(
        batches in prop::collection::vec(prop::collection::vec(arb_event(), 0..8), 1..6),
        page in 1..4usize,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut model = Model::new();
        let mut seen = HashSet::new();
        {
            let store = LifecycleStore::open(dir.path()).unwrap();
            for batch in &batches {
                let fresh = store.append(batch).unwrap();
                for (event, fresh) in batch.iter().zip(fresh) {
                    let new = seen.insert((event.source.clone(), event.id.clone()));
                    prop_assert_eq!(fresh, new);
                    if new {
                        model.entry((event.project.clone(), event.instance.clone()))
                            .or_default().push(event.clone());
                    }
                }
            }
            check(&store, &model, page);
            prop_assert_eq!(store.len().unwrap(), seen.len() as u64);
        }
        let reopened = LifecycleStore::open(dir.path()).unwrap();
        check(&reopened, &model, page);
        // Everything is still a duplicate after reopening.
        let again: Vec<_> = batches.concat();
        prop_assert!(reopened.append(&again).unwrap().iter().all(|f| !f));
    }
}

#[test]
fn a_forged_cursor_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = LifecycleStore::open(dir.path()).unwrap();
    assert!(store.instances(None, 10, Some("zz")).is_err());
    assert!(store.instances(None, 10, Some(&"ab".repeat(1000))).is_err());
    store.append(&[event(0, 0, 0, 0, 0, 0)]).unwrap();
    assert!(store.events("p0", "i0", 10, Some("x")).is_err());
}
