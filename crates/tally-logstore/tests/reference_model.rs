//! The embedded log store against a naive model: random appends (with and
//! without record ids, across projects and instances), sweeps and reads;
//! every read equals the model's answer.

use std::time::Duration;

use proptest::prelude::*;
use tally_logstore::{
    EmbeddedLogStore, LineFilter, LogQuery, LogRecord, LogStore, StoreConfig, Stream,
};

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<LogRecord>),
    Sweep(i64),
    Read {
        project: &'static str,
        instance: Option<&'static str>,
        since: i64,
        until: i64,
        stream: Option<Stream>,
        grep: Option<&'static str>,
    },
}

fn record() -> impl Strategy<Value = LogRecord> {
    (
        prop::sample::select(vec!["p1", "p2"]),
        prop::sample::select(vec!["web-0", "web-1"]),
        any::<bool>(),
        0i64..1000,
        prop::option::of(0u8..20),
        prop::sample::select(vec![
            "GET / 200",
            "POST /x 500",
            "panic: boom\n  at main.rs:1",
            "",
        ]),
    )
        .prop_map(|(p, i, err, t, id, line)| LogRecord {
            project: p.into(),
            instance: i.into(),
            workload: Some("web".into()),
            stream: if err { Stream::Stderr } else { Stream::Stdout },
            time_nanos: t,
            id: id.map(|n| format!("r{n}")),
            line: line.into(),
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec(record(), 1..12).prop_map(Op::Append),
        1 => (0i64..1200).prop_map(Op::Sweep),
        3 => (
            prop::sample::select(vec!["p1", "p2"]),
            prop::option::of(prop::sample::select(vec!["web-0", "web-1"])),
            0i64..1000,
            0i64..1100,
            prop::option::of(prop::sample::select(vec![Stream::Stdout, Stream::Stderr])),
            prop::option::of(prop::sample::select(vec!["500", "GET", "boom"])),
        )
            .prop_map(|(project, instance, since, until, stream, grep)| Op::Read {
                project, instance, since, until, stream, grep,
            }),
    ]
}

/// The model: blocks of (project, instance) in append order.
#[derive(Default)]
struct Model {
    blocks: Vec<(String, String, Vec<LogRecord>)>,
}

impl Model {
    fn append(&mut self, records: &[LogRecord]) {
        let mut round: Vec<(String, String, Vec<LogRecord>)> = Vec::new();
        for r in records {
            let dup = r.id.is_some()
                && (self.blocks.iter().chain(round.iter()).any(|(p, i, rs)| {
                    *p == r.project && *i == r.instance && rs.iter().any(|x| x.id == r.id)
                }));
            if dup {
                continue;
            }
            match round
                .iter_mut()
                .find(|(p, i, _)| *p == r.project && *i == r.instance)
            {
                Some((_, _, rs)) => rs.push(r.clone()),
                None => round.push((r.project.clone(), r.instance.clone(), vec![r.clone()])),
            }
        }
        self.blocks.extend(round);
    }

    fn sweep(&mut self, cutoff: i64) {
        self.blocks
            .retain(|(_, _, rs)| rs.iter().map(|r| r.time_nanos).max().unwrap_or(0) >= cutoff);
    }

    fn read(
        &self,
        project: &str,
        instance: &str,
        q: &LogQuery,
        grep: Option<&str>,
    ) -> Vec<(i64, Stream, String)> {
        self.blocks
            .iter()
            .filter(|(p, i, _)| p == project && i == instance)
            .flat_map(|(_, _, rs)| rs.iter())
            .filter(|r| r.time_nanos >= q.since_nanos && r.time_nanos < q.until_nanos)
            .filter(|r| q.stream.is_none_or(|s| s == r.stream))
            .filter(|r| grep.is_none_or(|g| r.line.contains(g)))
            .map(|r| (r.time_nanos, r.stream, r.line.clone()))
            .collect()
    }
}

const RETENTION: i64 = 300;

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = StoreConfig::new(dir.path());
    config.default_retention = Duration::from_nanos(RETENTION as u64);
    let store = EmbeddedLogStore::open(config).unwrap();
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::Append(records) => {
                model.append(&records);
                let ticket = store.append(records).unwrap();
                ticket.blocking_recv().unwrap().unwrap();
            }
            Op::Sweep(now) => {
                model.sweep(now - RETENTION);
                store.sweep(now).unwrap();
            }
            Op::Read {
                project,
                instance,
                since,
                until,
                stream,
                grep,
            } => {
                let query = LogQuery {
                    project: project.into(),
                    instances: instance.map(|i| vec![i.to_owned()]).unwrap_or_default(),
                    stream,
                    since_nanos: since,
                    until_nanos: until,
                    filters: grep
                        .map(|g| vec![LineFilter::text(g, false).unwrap()])
                        .unwrap_or_default(),
                    limit: usize::MAX,
                    ..LogQuery::default()
                };
                let page = store.read(&query).unwrap();
                for i in ["web-0", "web-1"] {
                    let got: Vec<_> = page
                        .lines
                        .iter()
                        .filter(|l| l.instance == i)
                        .map(|l| (l.time_nanos, l.stream, l.line.clone()))
                        .collect();
                    let want = if instance.is_none_or(|x| x == i) {
                        model.read(project, i, &query, grep)
                    } else {
                        Vec::new()
                    };
                    assert_eq!(got, want, "instance {i} of {project}, {query:?}");
                }
            }
        }
    }
    let lines: usize = model.blocks.iter().map(|(_, _, rs)| rs.len()).sum();
    assert_eq!(store.stats().lines, lines as u64);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn the_store_answers_like_the_model(ops in prop::collection::vec(op(), 1..30)) {
        run(ops);
    }
}
