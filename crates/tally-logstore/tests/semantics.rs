//! The promises of the module docs, one by one: durability across reopen,
//! dedupe by id, truncation of long lines, multi-line records, order,
//! project isolation, following, the pending bounds, retention.

use std::time::Duration;

use tally_logstore::{
    EmbeddedLogStore, LogError, LogQuery, LogRecord, LogStore, MAX_LINE_BYTES, Position,
    StoreConfig, Stream, TRUNCATED_MARKER,
};

fn rec(project: &str, instance: &str, t: i64, id: Option<&str>, line: &str) -> LogRecord {
    LogRecord {
        project: project.into(),
        instance: instance.into(),
        workload: None,
        stream: Stream::Stdout,
        time_nanos: t,
        id: id.map(Into::into),
        line: line.into(),
    }
}

fn append(store: &EmbeddedLogStore, records: Vec<LogRecord>) -> tally_logstore::AppendReport {
    store
        .append(records)
        .unwrap()
        .blocking_recv()
        .unwrap()
        .unwrap()
}

fn all(project: &str) -> LogQuery {
    LogQuery {
        project: project.into(),
        since_nanos: i64::MIN,
        until_nanos: i64::MAX,
        limit: usize::MAX,
        ..LogQuery::default()
    }
}

fn lines(store: &EmbeddedLogStore, q: &LogQuery) -> Vec<String> {
    store
        .read(q)
        .unwrap()
        .lines
        .into_iter()
        .map(|l| l.line)
        .collect()
}

#[test]
fn acknowledged_lines_survive_reopen_and_ids_dedupe_across_it() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = EmbeddedLogStore::open(StoreConfig::new(dir.path())).unwrap();
        let r = append(
            &store,
            vec![
                rec("p", "i", 1, Some("a"), "one"),
                rec("p", "i", 2, Some("a"), "one again"),
            ],
        );
        assert_eq!((r.stored, r.duplicates), (1, 1));
    }
    let store = EmbeddedLogStore::open(StoreConfig::new(dir.path())).unwrap();
    let r = append(
        &store,
        vec![
            rec("p", "i", 1, Some("a"), "one"),
            rec("p", "i", 3, None, "two"),
            rec("p", "i", 3, None, "two"),
        ],
    );
    assert_eq!((r.stored, r.duplicates), (2, 1));
    assert_eq!(lines(&store, &all("p")), ["one", "two", "two"]);
    // The same id in another instance is another record.
    assert_eq!(
        append(&store, vec![rec("p", "j", 1, Some("a"), "j one")]).stored,
        1
    );
    assert_eq!(store.stats().lines, 4);
}

#[test]
fn long_lines_are_cut_with_a_marker_and_multi_line_records_stay_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedLogStore::open(StoreConfig::new(dir.path())).unwrap();
    let long = "é".repeat(MAX_LINE_BYTES); // two bytes each: cut inside a char
    let trace = "panic: boom\n  at a.rs:1\n  at b.rs:2";
    let r = append(
        &store,
        vec![rec("p", "i", 1, None, &long), rec("p", "i", 2, None, trace)],
    );
    assert_eq!(r.truncated, 1);
    let got = lines(&store, &all("p"));
    assert!(got[0].len() <= MAX_LINE_BYTES && got[0].ends_with(TRUNCATED_MARKER));
    assert_eq!(got[1], trace);
}

#[test]
fn order_per_instance_is_append_order_not_time_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedLogStore::open(StoreConfig::new(dir.path())).unwrap();
    append(
        &store,
        vec![rec("p", "i", 5, None, "a"), rec("p", "i", 1, None, "b")],
    );
    append(&store, vec![rec("p", "i", 3, None, "c")]);
    let mut q = all("p");
    assert_eq!(lines(&store, &q), ["a", "b", "c"]);
    q.newest_first = true;
    q.limit = 2;
    assert_eq!(lines(&store, &q), ["c", "b"]);
}

#[test]
fn a_project_reads_only_its_own_instances() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedLogStore::open(StoreConfig::new(dir.path())).unwrap();
    append(
        &store,
        vec![
            rec("a", "web", 1, None, "mine"),
            rec("b", "web", 1, None, "theirs"),
        ],
    );
    assert_eq!(lines(&store, &all("a")), ["mine"]);
    let mut q = all("a");
    q.instances = vec!["web".into()];
    assert_eq!(lines(&store, &q), ["mine"]);
    assert_eq!(store.instances(Some("a")).unwrap().len(), 1);
    assert_eq!(store.instances(None).unwrap().len(), 2);
}

#[test]
fn following_reads_after_a_position_when_notified() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedLogStore::open(StoreConfig::new(dir.path())).unwrap();
    let mut changes = store.subscribe();
    append(&store, vec![rec("p", "i", 1, None, "first")]);
    assert!(changes.has_changed().unwrap());
    changes.borrow_and_update();
    let page = store.read(&all("p")).unwrap();
    let last = page.lines.last().unwrap().position;
    append(
        &store,
        vec![
            rec("p", "i", 2, None, "second"),
            rec("q", "i", 2, None, "other"),
        ],
    );
    assert!(changes.has_changed().unwrap());
    let mut q = all("p");
    q.after = Some(last);
    assert_eq!(lines(&store, &q), ["second"]);
    q.after = Some(Position {
        block: u64::MAX,
        index: 0,
    });
    assert!(lines(&store, &q).is_empty());
}

#[test]
fn an_instance_over_its_pending_share_is_told_to_retry_others_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = StoreConfig::new(dir.path());
    config.max_pending_instance_bytes = 1000;
    let store = EmbeddedLogStore::open(config).unwrap();
    // Queue faster than the writer syncs: some appends of the noisy
    // instance are refused while its share is full.
    let big = "x".repeat(900);
    let mut tickets = Vec::new();
    let mut busy = 0;
    for _ in 0..200 {
        match store.append(vec![rec("p", "noisy", 1, None, &big)]) {
            Ok(t) => tickets.push(t),
            Err(LogError::Busy { retry_after, .. }) => {
                assert!(retry_after >= Duration::from_secs(1));
                busy += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(busy > 0, "the noisy instance was never refused");
    // A quiet instance still gets in.
    tickets.push(
        store
            .append(vec![rec("p", "quiet", 1, None, "hello")])
            .unwrap(),
    );
    for t in tickets {
        t.blocking_recv().unwrap().unwrap();
    }
    let mut q = all("p");
    q.instances = vec!["quiet".into()];
    assert_eq!(lines(&store, &q), ["hello"]);
}

#[test]
fn retention_deletes_old_blocks_per_project_and_forgets_their_ids() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = StoreConfig::new(dir.path());
    config.default_retention = Duration::from_nanos(100);
    config
        .retention
        .insert("long".into(), Duration::from_nanos(1000));
    let store = EmbeddedLogStore::open(config).unwrap();
    append(
        &store,
        vec![
            rec("short", "i", 10, Some("x"), "old"),
            rec("long", "i", 10, None, "kept"),
        ],
    );
    append(&store, vec![rec("short", "i", 500, None, "new")]);
    let before = store.stats();
    assert_eq!(store.sweep(300).unwrap(), 1);
    assert_eq!(lines(&store, &all("short")), ["new"]);
    assert_eq!(lines(&store, &all("long")), ["kept"]);
    let after = store.stats();
    assert_eq!(after.lines, before.lines - 1);
    assert_eq!(after.raw_bytes, before.raw_bytes - 3);
    // The id went with its block: the record is stored again.
    assert_eq!(
        append(&store, vec![rec("short", "i", 400, Some("x"), "old")]).stored,
        1
    );
    // Past every line, the instance is forgotten.
    store.sweep(10_000).unwrap();
    assert!(store.instances(None).unwrap().is_empty());
    assert_eq!(store.stats().lines, 0);
}

#[test]
fn records_breaking_a_bound_are_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedLogStore::open(StoreConfig::new(dir.path())).unwrap();
    let long_name = "n".repeat(300);
    assert!(matches!(
        store.append(vec![rec(&long_name, "i", 1, None, "x")]),
        Err(LogError::Invalid(_))
    ));
    assert!(matches!(
        store.append(vec![rec("p", "", 1, None, "x")]),
        Err(LogError::Invalid(_))
    ));
    assert!(matches!(
        store.append(vec![rec("p", "a\0b", 1, None, "x")]),
        Err(LogError::Invalid(_))
    ));
}

#[test]
fn a_large_round_is_cut_into_bounded_blocks_that_keep_order_and_ids() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedLogStore::open(StoreConfig::new(dir.path())).unwrap();
    // 6 MB of one instance in one append: more than one block's text
    // (tally_logstore::block::MAX_BLOCK_TEXT), compressed on several cores.
    let text = |i: usize| format!("{i:06} {}", "abcdefghij".repeat(6000));
    let records: Vec<LogRecord> = (0..100)
        .map(|i| {
            let id = format!("r{i}");
            rec("p", "big", 100 - i as i64, Some(&id), &text(i))
        })
        .chain((0..50).map(|i| rec("p", "small", i, None, &format!("small {i}"))))
        .collect();
    assert_eq!(append(&store, records.clone()).stored, 150);
    let q = LogQuery {
        instances: vec!["big".into()],
        ..all("p")
    };
    let page = store.read(&q).unwrap();
    let got: Vec<&str> = page.lines.iter().map(|l| l.line.as_str()).collect();
    let want: Vec<String> = (0..100).map(text).collect();
    assert_eq!(got, want, "append order, though times descend");
    let blocks: std::collections::BTreeSet<u64> =
        page.lines.iter().map(|l| l.position.block).collect();
    assert!(blocks.len() >= 2, "{} blocks", blocks.len());
    assert!(page.lines.windows(2).all(|w| w[0].position < w[1].position));
    // Every id of every block dedupes a re-send.
    let r = append(&store, records);
    assert_eq!((r.stored, r.duplicates), (50, 100));
    assert_eq!(store.stats().lines, 200);
}
