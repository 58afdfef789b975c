//! The collector end to end on a generated corpus: totals per project,
//! enrichment, and the outbox's pending/acknowledge contract.

use std::collections::BTreeMap;

use tally_collect::{AgentIdentity, Collector, CollectorConfig, CorpusConfig, write_corpus};
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
    // All files are written before the collector starts: only the newest is
    // at the path, so write without rotation here (the tail and crash tests
    // cover rotation).
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

    let (shipped, rest) = events.split_at(events.len() / 2);
    collector
        .acknowledge(shipped.iter().map(|e| e.id.as_str()))
        .unwrap();
    drop(collector);
    let collector = Collector::open(config).unwrap();
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
