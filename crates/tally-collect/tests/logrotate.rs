//! The collector against Debian's own `logrotate`, in `create` and
//! `copytruncate` modes: rotated files already on disk at the first start
//! are read (oldest first), later rotations — while reading, between two
//! polls, and while the collector is down — count every line exactly once.
//!
//! Without logrotate installed the tests are skipped, unless
//! `TALLY_REQUIRE_PEERS` is set (CI's `.ci/run`), where they fail.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use tally_collect::{
    AgentIdentity, Collector, CollectorConfig, CorpusConfig, CorpusGenerator, seconds_as_millis,
};

struct Rotation {
    binary: PathBuf,
    config: PathBuf,
    state: PathBuf,
}

impl Rotation {
    fn new(binary: PathBuf, dir: &Path, log: &Path, mode: &str) -> Rotation {
        let config = dir.join("logrotate.conf");
        std::fs::write(
            &config,
            format!(
                "{} {{\n  rotate 20\n  {mode}\n  nocompress\n  missingok\n  ifempty\n}}\n",
                log.display()
            ),
        )
        .unwrap();
        Rotation {
            binary,
            config,
            state: dir.join("logrotate.state"),
        }
    }

    /// `logrotate -f`: rotates now.
    fn rotate(&self) {
        let output = Command::new(&self.binary)
            .arg("-f")
            .arg("-s")
            .arg(&self.state)
            .arg(&self.config)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "logrotate failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Appends the generator's next `n` lines to `log`.
fn write(generator: &mut CorpusGenerator, log: &Path, n: usize) {
    let mut text = String::new();
    for line in generator.by_ref().take(n) {
        text.push_str(&line);
        text.push('\n');
    }
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    file.write_all(text.as_bytes()).unwrap();
}

fn drain(collector: &mut Collector) {
    while collector.poll().unwrap().lines > 0 {}
}

/// Per project: requests, ingress and egress bytes, connection milliseconds.
fn totals(collector: &Collector) -> BTreeMap<String, [u128; 4]> {
    let mut got: BTreeMap<String, [u128; 4]> = BTreeMap::new();
    for event in collector.pending(usize::MAX).unwrap() {
        let project = event.subject.strip_prefix("projects/").unwrap().to_owned();
        let value = event.data.as_ref().unwrap()["value"]
            .as_str()
            .unwrap()
            .to_owned();
        let (index, amount) = match event.kind.rsplit('/').next().unwrap() {
            "requests" => (0, value.parse().unwrap()),
            "ingress-bytes" => (1, value.parse().unwrap()),
            "egress-bytes" => (2, value.parse().unwrap()),
            "connection-seconds" => (3, seconds_as_millis(&value).unwrap()),
            other => panic!("unknown meter {other}"),
        };
        got.entry(project).or_default()[index] += amount;
    }
    got
}

fn exact_through_logrotate(mode: &str) {
    let Some(binary) = tally_testkit::logrotate::binary() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let rotation = Rotation::new(binary, dir.path(), &log, mode);
    let mut generator = CorpusGenerator::new(CorpusConfig {
        lines: 100_000,
        routes: 8,
        projects: 3,
        ..CorpusConfig::default()
    });
    let config = CollectorConfig {
        checkpoint_every_lines: 250,
        ..CollectorConfig::new(
            log.clone(),
            dir.path().join("state"),
            AgentIdentity {
                agent_id: "node-a".into(),
                source: "tally-collect/node-a".into(),
            },
        )
    };
    // Before the first start: access.log.2, access.log.1, access.log.
    write(&mut generator, &log, 400);
    rotation.rotate();
    write(&mut generator, &log, 400);
    rotation.rotate();
    write(&mut generator, &log, 400);
    let mut collector = Collector::open(config.clone()).unwrap();
    drain(&mut collector);
    // Rotated between two polls, with lines not read yet.
    write(&mut generator, &log, 300);
    rotation.rotate();
    write(&mut generator, &log, 300);
    drain(&mut collector);
    // Rotated twice while reading.
    for _ in 0..2 {
        write(&mut generator, &log, 200);
        collector.poll().unwrap();
        rotation.rotate();
    }
    write(&mut generator, &log, 100);
    // Rotated while the collector is down, with lines not yet checkpointed.
    collector.poll().unwrap();
    drop(collector);
    rotation.rotate();
    write(&mut generator, &log, 300);
    let mut collector = Collector::open(config).unwrap();
    drain(&mut collector);
    collector.flush().unwrap();

    let expected = generator.expected();
    let want: BTreeMap<String, [u128; 4]> = expected
        .per_project
        .iter()
        .map(|(project, t)| {
            let t = [
                u128::from(t.requests),
                t.ingress_bytes,
                t.egress_bytes,
                t.connection_millis,
            ];
            (project.clone(), t)
        })
        .collect();
    assert_eq!(totals(&collector), want, "{mode}");
    assert_eq!(
        collector.diagnostics().malformed(),
        expected.malformed,
        "{mode}"
    );
}

#[test]
fn logrotate_create_counts_every_line_once() {
    exact_through_logrotate("create");
}

#[test]
fn logrotate_copytruncate_counts_every_line_once() {
    exact_through_logrotate("copytruncate");
}
