//! kill -9 crash test of a durable disk queue.
//!
//! The parent runs a receiver (deduping by key, failing every 5th request,
//! 30 ms per answer)
//! and re-runs this test binary as a child (`crash_child`, selected by
//! `TALLY_DELIVERY_CRASH_DIR`). The child enqueues items durably, printing
//! `acked <i>` once `enqueue_all` returned, while its sink delivers. The
//! parent SIGKILLs it mid-run several times and restarts it; a last child
//! only drains. Every acknowledged item must have reached the receiver.

use tally_testkit::line_receiver as support;

use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{Lines, Receiver, item};
use tally_delivery::{Sink, SinkConfig, Storage};
use tokio::io::AsyncBufReadExt as _;

const DIR_VAR: &str = "TALLY_DELIVERY_CRASH_DIR";
const URL_VAR: &str = "TALLY_DELIVERY_CRASH_URL";
const RANGE_VAR: &str = "TALLY_DELIVERY_CRASH_RANGE";
const SYNC_VAR: &str = "TALLY_DELIVERY_CRASH_SYNC";
const TOTAL: usize = 3000;

fn config(dir: &str, sync: bool) -> SinkConfig {
    let mut config = SinkConfig::new("crash");
    config.batch.max_items = 50;
    config.batch.timeout = Duration::from_millis(20);
    config.retry.initial_backoff = Duration::from_millis(5);
    config.retry.max_backoff = Duration::from_millis(50);
    config.retry.max_attempts = u32::MAX;
    config.queue.storage = Storage::Disk {
        path: dir.into(),
        sync,
    };
    config
}

/// The child: runs only when re-invoked by `every_acknowledged_item_survives_kill_9`.
#[tokio::test]
async fn crash_child() {
    let Ok(dir) = std::env::var(DIR_VAR) else {
        return;
    };
    let url = reqwest::Url::parse(&std::env::var(URL_VAR).unwrap()).unwrap();
    let range = std::env::var(RANGE_VAR).unwrap();
    let (start, end) = range.split_once("..").unwrap();
    let (start, end): (usize, usize) = (start.parse().unwrap(), end.parse().unwrap());
    // The harness has printed `test crash_child ... ` without a newline.
    println!();
    let sync = std::env::var(SYNC_VAR).unwrap() == "1";
    let sink = Sink::builder(config(&dir, sync), Lines::new(url))
        .start()
        .unwrap();
    let mut next = start;
    while next < end {
        let upto = (next + 10).min(end);
        sink.enqueue_all((next..upto).map(|i| item(i, 40)).collect())
            .await
            .unwrap();
        for i in next..upto {
            println!("acked {i}");
        }
        next = upto;
    }
    while sink.queue_depth() > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("drained");
}

/// Runs one child over `range`; kills it after `kill_after` unless `None`.
/// Returns the acknowledged indexes and whether it said `drained`.
async fn run_child(
    sync: bool,
    dir: &str,
    url: &str,
    range: std::ops::Range<usize>,
    kill_after: Option<Duration>,
) -> (Vec<usize>, bool) {
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(DIR_VAR, dir)
        .env(URL_VAR, url)
        .env(RANGE_VAR, format!("{}..{}", range.start, range.end))
        .env(SYNC_VAR, if sync { "1" } else { "0" })
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let stdout = child.stdout.take().unwrap();
    let reader = tokio::spawn({
        let lines = lines.clone();
        async move {
            let mut stdout = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = stdout.next_line().await {
                lines.lock().unwrap().push(line);
            }
        }
    });
    match kill_after {
        Some(after) => {
            tokio::time::sleep(after).await;
            child.kill().await.unwrap(); // SIGKILL
        }
        None => {
            let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
                .await
                .expect("the draining child finishes")
                .unwrap();
            assert!(status.success());
        }
    }
    reader.await.unwrap();
    let lines = lines.lock().unwrap();
    let acked = lines
        .iter()
        .filter_map(|l| l.strip_prefix("acked "))
        .map(|n| n.parse().unwrap())
        .collect();
    (acked, lines.iter().any(|l| l == "drained"))
}

/// With fsync, and without (the write reaches the OS before `enqueue`
/// returns, which is enough for kill -9).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_item_survives_kill_9() {
    if std::env::var(DIR_VAR).is_ok() {
        return;
    }
    survives_kill_9(true).await;
    survives_kill_9(false).await;
}

async fn survives_kill_9(sync: bool) {
    let receiver = Receiver::start().await;
    receiver.fail_every(5);
    // A slow receiver, so a backlog is queued when the child is killed.
    receiver.set_always(Some(support::Fault::Hang(Duration::from_millis(30))));
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().join("queue").to_string_lossy().into_owned();
    let url = receiver.url().to_string();

    let mut acked = BTreeSet::new();
    let mut next = 0;
    // Six kills, whether the child is still enqueueing or only delivering.
    let kills = 6;
    for _ in 0..kills {
        let kill_after = Duration::from_millis(150 + fastrand::u64(0..350));
        let (got, _) = run_child(sync, &dir, &url, next..TOTAL, Some(kill_after)).await;
        // Items past the last acknowledged one may or may not be on disk; they
        // are enqueued again, and the receiver dedupes them.
        next = got.iter().max().map_or(next, |&i| i + 1);
        acked.extend(got);
    }
    let (_, drained) = run_child(sync, &dir, &url, TOTAL..TOTAL, None).await;
    assert!(drained);
    assert!(!acked.is_empty());

    let received = receiver.unique();
    let lost: Vec<usize> = acked
        .iter()
        .copied()
        .filter(|i| !received.contains(&format!("k{i}")))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged items lost: {lost:?}",
        lost.len()
    );
    assert!(receiver.raw_items() >= acked.len() as u64);
    eprintln!(
        "sync {sync}: {kills} kills, {} acknowledged, {} received ({} raw)",
        acked.len(),
        received.len(),
        receiver.raw_items()
    );
}
