//! The collector end to end on a generated corpus: totals per project,
//! enrichment, and the outbox's pending/acknowledge contract.

use std::collections::BTreeMap;

use tally_collect::{
    AgentIdentity, Collector, CollectorConfig, CorpusConfig, GaugeSample, RouteKey, write_corpus,
};
use tally_model::Manifest;

const MANIFESTS: &str = include_str!("fixtures/gateway-api.yaml");

#[test]
fn corpus_totals_reach_the_outbox_and_acknowledged_events_leave_it() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("access.log");
    let corpus = CorpusConfig {
        lines: 5_000,
        routes: 12,
        projects: 4,
        ..CorpusConfig::default()
    };
    // One file, no rotation: the tail, logrotate and crash tests cover
    // rotation.
    let (expected, _) = write_corpus(corpus, &log_path, None).unwrap();
    let config = CollectorConfig {
        max_read_bytes: 1 << 20,
        checkpoint_every_lines: 5_000,
        ..CollectorConfig::new(
            log_path,
            dir.path().join("state"),
            AgentIdentity {
                agent_id: "node-a".into(),
                source: "tally-collect/node-a".into(),
            },
        )
    };
    let mut collector = Collector::open(config.clone()).unwrap();
    for manifest in Manifest::parse_documents(MANIFESTS).unwrap() {
        collector.enrichment_mut().upsert(&manifest).unwrap();
    }
    while collector.poll().unwrap().lines > 0 {}
    collector.flush().unwrap();
    let stats = collector.stats();
    assert_eq!(stats.received_lines, expected.lines);
    assert!(stats.emitted_events > 0);
    assert_eq!(collector.diagnostics().malformed(), expected.malformed);
    assert_eq!(
        collector.diagnostics().unattributable(),
        expected.unattributable
    );

    let events = collector.pending(usize::MAX).unwrap();
    assert_eq!(events.len() as u64, stats.emitted_events);
    let mut requests: BTreeMap<String, u64> = BTreeMap::new();
    for event in &events {
        let data = event.data.as_ref().unwrap();
        if event.kind == "networking.datumapis.com/gateway/requests" {
            let value: u64 = data["value"].as_str().unwrap().parse().unwrap();
            let project = event.subject.strip_prefix("projects/").unwrap();
            *requests.entry(project.to_owned()).or_default() += value;
        }
        if data["dimensions"]["httproute_name"] == "route-0" {
            assert_eq!(data["dimensions"]["gateway"], "edge");
            assert_eq!(data["dimensions"]["region"], "us-east-1");
            assert_eq!(data["dimensions"]["gateway_class"], "envoy");
            assert_eq!(data["resource"]["uid"], "4b1c");
        } else {
            assert!(data["dimensions"].get("gateway").is_none());
        }
    }
    let expected_requests: BTreeMap<String, u64> = expected
        .per_project
        .iter()
        .map(|(p, t)| (p.clone(), t.requests))
        .collect();
    assert_eq!(requests, expected_requests);

    assert_eq!(stats.outbox_depth, events.len());
    let (shipped, rest) = events.split_at(events.len() / 2);
    collector
        .acknowledge(shipped.iter().map(|e| e.id.as_str()))
        .unwrap();
    assert_eq!(collector.stats().outbox_depth, rest.len());
    // An acknowledgement that arrives twice removes nothing more.
    collector
        .acknowledge(shipped.iter().map(|e| e.id.as_str()))
        .unwrap();
    assert_eq!(collector.stats().outbox_depth, rest.len());
    drop(collector);
    let collector = Collector::open(config).unwrap();
    assert_eq!(collector.stats().outbox_depth, rest.len());
    let pending: Vec<_> = collector
        .pending(usize::MAX)
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    let rest: Vec<_> = rest.iter().map(|e| e.id.clone()).collect();
    assert_eq!(pending, rest);
    assert_eq!(collector.pending(3).unwrap().len(), 3);
}

#[test]
fn a_state_directory_keeps_its_window_size() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("access.log");
    write_corpus(CorpusConfig::default(), &log_path, None).unwrap();
    let agent = AgentIdentity {
        agent_id: "node-a".into(),
        source: "tally-collect/node-a".into(),
    };
    let config = CollectorConfig::new(log_path, dir.path().join("state"), agent);
    let mut collector = Collector::open(config.clone()).unwrap();
    while collector.poll().unwrap().lines > 0 {}
    assert!(!collector.pending(1).unwrap().is_empty());
    drop(collector);
    let mut other = config.clone();
    other.window.window_millis = 30_000;
    assert!(matches!(
        Collector::open(other),
        Err(tally_collect::CollectError::WindowChanged { .. })
    ));
    let mut later = config;
    later.window.allowed_lateness_millis = 5_000;
    assert!(Collector::open(later).is_ok());
}

/// Connection time per (route, window), in milliseconds: the events carry
/// exact decimal seconds.
fn connection_seconds(collector: &Collector) -> BTreeMap<(String, i64), u128> {
    let mut seconds = BTreeMap::new();
    for event in collector.pending(usize::MAX).unwrap() {
        assert_eq!(
            event.kind,
            "networking.datumapis.com/gateway/connection-seconds"
        );
        let data = event.data.as_ref().unwrap();
        let route = data["dimensions"]["httproute_name"]
            .as_str()
            .unwrap()
            .to_owned();
        let value = tally_collect::seconds_as_millis(data["value"].as_str().unwrap()).unwrap();
        *seconds
            .entry((route, event.time.as_millisecond()))
            .or_default() += value;
    }
    seconds
}

#[test]
fn gauge_samples_are_integrated_once_across_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let route = |name: &str| RouteKey {
        project: "p".into(),
        namespace: "ns".into(),
        name: name.into(),
    };
    let sample = |at_millis: i64, web: u64, api: u64| GaugeSample {
        at_millis,
        gauges: vec![(route("web"), web), (route("api"), api)],
    };
    let mut config = CollectorConfig::new(
        std::path::PathBuf::new(),
        dir.path().join("state"),
        AgentIdentity {
            agent_id: "node-a/envoy-admin".into(),
            source: "tally-collect/node-a".into(),
        },
    );
    config.window.window_millis = 10_000;
    config.window.allowed_lateness_millis = 0;
    let max_gap = 30_000;
    let mut collector = Collector::open_gauges(config.clone()).unwrap();
    collector.push_gauges(sample(5_000, 3, 1), max_gap).unwrap();
    collector
        .push_gauges(sample(15_000, 2, 0), max_gap)
        .unwrap();
    // Reopened: the last sample (15 s: 2 and 0) was checkpointed.
    drop(collector);
    let mut collector = Collector::open_gauges(config.clone()).unwrap();
    assert_eq!(collector.last_gauges(), Some(&sample(15_000, 2, 0)));
    // 24 s is not later than the previous sample: ignored. From 25 s to
    // 65 s there is no sample: not billed.
    for next in [
        sample(25_000, 5, 5),
        sample(24_000, 9, 9),
        sample(65_000, 1, 1),
        sample(70_000, 0, 0),
    ] {
        collector.push_gauges(next, max_gap).unwrap();
    }
    collector.flush().unwrap();
    let want: BTreeMap<(String, i64), u128> = [
        // web: 3 × [5, 10), 3 × [10, 15) + 2 × [15, 20), 2 × [20, 25), 1 × [65, 70)
        (("web".to_owned(), 0), 15_000),
        (("web".to_owned(), 10_000), 25_000),
        (("web".to_owned(), 20_000), 10_000),
        (("web".to_owned(), 60_000), 5_000),
        // api: 1 × [5, 15), 1 × [65, 70)
        (("api".to_owned(), 0), 5_000),
        (("api".to_owned(), 10_000), 5_000),
        (("api".to_owned(), 60_000), 5_000),
    ]
    .into_iter()
    .collect();
    assert_eq!(connection_seconds(&collector), want);
}

#[test]
fn lifecycle_records_apply_once_and_open_connections_survive_reopening() {
    use std::io::Write as _;
    use tally_collect::{Change, LifecycleRecord, LineProblem};

    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("connections.log");
    let record = |id: &str, change: Change, connection: &str, route: &str, at: i64| {
        let record = LifecycleRecord {
            source: "ctrl".into(),
            id: id.into(),
            change,
            connection_id: connection.into(),
            at_millis: at,
            route_name: Some(format!("httproute/ns/{route}/rule/0")),
            httproute_namespace: None,
            httproute_name: None,
            project_name: None,
        };
        format!("{}\n", serde_json::to_string(&record).unwrap())
    };
    let append = |text: String| {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spool)
            .unwrap();
        file.write_all(text.as_bytes()).unwrap();
    };
    let mut config = CollectorConfig::new(
        spool.clone(),
        dir.path().join("state"),
        AgentIdentity {
            agent_id: "node-a/connections".into(),
            source: "tally-collect/node-a".into(),
        },
    );
    config.window.allowed_lateness_millis = 0;
    config.checkpoint_every_lines = 1;
    let horizon = 3_600_000;
    append(
        record("e1", Change::Opened, "c1", "ws", 10_000)
            + &record("e2", Change::Opened, "c2", "api", 20_000)
            + &record("e3", Change::Closed, "c2", "api", 50_500),
    );
    let mut collector = Collector::open_lifecycle(config.clone(), horizon).unwrap();
    assert_eq!(collector.poll().unwrap().lines, 3);
    // No event moves time past 3:00; the clock does: c1 is still open and
    // billed up to the end of every closed window.
    collector.advance_to(180_000).unwrap();
    let want: BTreeMap<(String, i64), u128> = [
        (("ws".to_owned(), 0), 50_000),
        (("ws".to_owned(), 60_000), 60_000),
        (("ws".to_owned(), 120_000), 60_000),
        // 30.5 s, sent at once: nothing waits for more traffic.
        (("api".to_owned(), 0), 30_500),
    ]
    .into_iter()
    .collect();
    assert_eq!(connection_seconds(&collector), want);
    let shipped: Vec<String> = collector
        .pending(usize::MAX)
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    collector
        .acknowledge(shipped.iter().map(String::as_str))
        .unwrap();
    // Reopened (as after a crash): c1 is still open, e1 still known.
    drop(collector);
    append(
        record("e1", Change::Opened, "c1", "ws", 10_000)
            + &record("e4", Change::Closed, "c1", "ws", 200_250)
            + &record("e3", Change::Closed, "c2", "api", 50_500),
    );
    let mut collector = Collector::open_lifecycle(config, horizon).unwrap();
    assert_eq!(collector.poll().unwrap().lines, 3);
    collector.advance_to(300_000).unwrap();
    let want: BTreeMap<(String, i64), u128> =
        [(("ws".to_owned(), 180_000), 20_250)].into_iter().collect();
    assert_eq!(
        connection_seconds(&collector),
        want,
        "200.25 s of c1 in all"
    );
    let counts = &collector.diagnostics().counts;
    assert_eq!(counts.get(&LineProblem::DuplicateEvent), Some(&2));
    assert_eq!(counts.get(&LineProblem::ConnectionUnknown), None);
}

#[test]
fn a_file_rotated_before_the_first_window_closed_is_found_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let line = |n: u64| {
        format!(
            "{{\"start_time\":\"2024-05-01T12:00:{:02}.000Z\",\"route_name\":\"httproute/ns/api/rule/0\",\"bytes_sent\":1}}\n",
            n % 60
        )
    };
    let config = CollectorConfig::new(
        log.clone(),
        dir.path().join("state"),
        AgentIdentity {
            agent_id: "node-a".into(),
            source: "tally-collect/node-a".into(),
        },
    );
    std::fs::write(&log, (0..100).map(line).collect::<String>()).unwrap();
    let mut collector = Collector::open(config.clone()).unwrap();
    assert_eq!(collector.poll().unwrap().lines, 100);
    // No window closed, so no event; the agent stops (as if killed) and
    // the file is rotated before it comes back.
    assert_eq!(collector.stats().emitted_events, 0);
    drop(collector);
    std::fs::rename(&log, dir.path().join("access.log.1")).unwrap();
    std::fs::write(&log, (0..50).map(line).collect::<String>()).unwrap();
    let mut collector = Collector::open(config).unwrap();
    while collector.poll().unwrap().lines > 0 {}
    collector.flush().unwrap();
    let requests: u64 = collector
        .pending(usize::MAX)
        .unwrap()
        .iter()
        .filter(|e| e.kind == "networking.datumapis.com/gateway/requests")
        .map(|e| {
            let value = e.data.as_ref().unwrap()["value"].as_str().unwrap();
            value.parse::<u64>().unwrap()
        })
        .sum();
    assert_eq!(requests, 150, "the rotated file's lines count too");
}
