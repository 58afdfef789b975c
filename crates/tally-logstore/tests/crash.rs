//! Nothing lost, nothing duplicated across kill -9: a child process appends
//! numbered batches of records with ids and prints each acknowledged batch;
//! it is SIGKILLed several times, and each restart re-sends from the last
//! batch acknowledged (the acknowledged one included, as an at-least-once
//! sender that missed the answer would). The store then holds every record
//! exactly once, in order per instance.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tally_logstore::{EmbeddedLogStore, LogQuery, LogRecord, LogStore, StoreConfig, Stream};

const CHILD_DIR: &str = "TALLY_LOGSTORE_CRASH_DIR";
const CHILD_FROM: &str = "TALLY_LOGSTORE_CRASH_FROM";
const BATCHES: u64 = 300;
const PER_BATCH: u64 = 20;
const INSTANCES: [&str; 3] = ["web-0", "web-1", "worker-0"];

fn batch(k: u64) -> Vec<LogRecord> {
    (0..PER_BATCH)
        .map(|j| {
            let n = k * PER_BATCH + j;
            LogRecord {
                project: "acme".into(),
                instance: INSTANCES[(n % 3) as usize].into(),
                workload: None,
                stream: Stream::Stdout,
                time_nanos: n as i64,
                id: Some(format!("rec-{n}")),
                line: format!("line {n} {}", "x".repeat((n % 97) as usize)),
            }
        })
        .collect()
}

#[test]
#[ignore = "the crash test's child process, started by a_killed_store_loses_and_duplicates_nothing"]
fn crash_child_process() {
    let dir = PathBuf::from(std::env::var(CHILD_DIR).expect("started by the crash test"));
    let from: u64 = std::env::var(CHILD_FROM).unwrap().parse().unwrap();
    let store = EmbeddedLogStore::open(StoreConfig::new(dir)).expect("open");
    for k in from..BATCHES {
        let report = store
            .append(batch(k))
            .unwrap()
            .blocking_recv()
            .unwrap()
            .unwrap();
        assert_eq!(report.stored + report.duplicates, PER_BATCH);
        println!("acked {k}");
    }
    println!("done");
}

fn spawn(dir: &Path, from: u64) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "crash_child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir)
        .env(CHILD_FROM, from.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

#[test]
fn a_killed_store_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked: Option<u64> = None;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for _round in 0..6 {
        let (mut child, lines) = spawn(dir.path(), acked.unwrap_or(0));
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(150 + rng % 400));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        for line in lines.try_iter() {
            if let Some(k) = line.strip_prefix("acked ") {
                acked = Some(k.parse().unwrap());
            }
        }
    }
    let (mut child, lines) = spawn(dir.path(), acked.unwrap_or(0));
    assert!(child.wait().unwrap().success());
    assert!(lines.try_iter().any(|l| l == "done"));

    let store = EmbeddedLogStore::open(StoreConfig::new(dir.path())).unwrap();
    for (i, instance) in INSTANCES.iter().enumerate() {
        let page = store
            .read(&LogQuery {
                project: "acme".into(),
                instances: vec![(*instance).into()],
                since_nanos: i64::MIN,
                until_nanos: i64::MAX,
                limit: usize::MAX,
                ..LogQuery::default()
            })
            .unwrap();
        let got: Vec<i64> = page.lines.iter().map(|l| l.time_nanos).collect();
        let want: Vec<i64> = (0..(BATCHES * PER_BATCH) as i64)
            .filter(|n| n % 3 == i as i64)
            .collect();
        assert_eq!(got, want, "{instance}: every record once, in order");
    }
    assert!(
        acked.is_some(),
        "no batch was acknowledged before the kills; the test did not test"
    );
}
