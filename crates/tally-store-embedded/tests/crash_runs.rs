//! Dedupe runs survive `kill -9` while they are written and merged.
//!
//! A child process (this test binary again, running [`child_ingests`])
//! opens a store whose key budget is tiny, so that nearly every group
//! commit writes a dedupe run and idle moments merge them, and ingests
//! batches, printing each batch it had acknowledged. The parent kills it
//! with SIGKILL at a different moment each round, opens the store, and
//! every acknowledged event must be refused as a duplicate; a batch sent
//! but not acknowledged is stored at most once. In the end every event
//! ever sent is stored exactly once.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::json;
use tally_ledger::Ledger;
use tally_model::{CloudEvent, parse_event};
use tally_store_embedded::{EmbeddedLedger, StoreConfig};

const BATCH: usize = 64;
const ROUNDS: usize = 4;
const CHILD_DIR: &str = "TALLY_CRASH_RUNS_DIR";
const CHILD_FROM: &str = "TALLY_CRASH_RUNS_FROM";

fn config(dir: &Path) -> StoreConfig {
    let mut config = StoreConfig::new(dir);
    config.max_lateness = jiff::SignedDuration::from_hours(24 * 365 * 50);
    config.dedupe_horizon = config.max_lateness;
    // `recent` holds 64 keys; merged runs up to 256: a run is written
    // every group commit, and merges follow whenever the writer is idle.
    config.key_filter_bytes = 32 << 10;
    config
}

/// Batch `b`: new ids, and one id of the batch before (a duplicate when
/// that batch was stored), so that lookups go through the runs.
fn batch(b: usize) -> Vec<CloudEvent> {
    let mut ids: Vec<String> = (0..BATCH).map(|i| format!("b{b}-{i}")).collect();
    if b > 0 {
        ids.push(format!("b{}-{}", b - 1, b % BATCH));
    }
    ids.into_iter()
        .map(|id| {
            let event = json!({"specversion": "1.0", "id": id, "source": "crash", "type": "t",
                "subject": "s", "time": "2026-01-01T00:00:00Z", "data": {"value": 1}});
            parse_event(event, jiff::Timestamp::now()).unwrap()
        })
        .collect()
}

/// The child: ingests batches from `TALLY_CRASH_RUNS_FROM` on until it is
/// killed, printing `acked <b>` once batch `b` is acknowledged. Does
/// nothing unless started by [`dedupe_runs_survive_sigkill`].
#[tokio::test]
#[ignore = "run by dedupe_runs_survive_sigkill as its child"]
async fn child_ingests() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let from: usize = std::env::var(CHILD_FROM).unwrap().parse().unwrap();
    let ledger = EmbeddedLedger::open(config(Path::new(&dir))).unwrap();
    println!("open");
    for b in from.. {
        ledger.ingest(batch(b)).await.unwrap();
        println!("acked {b}");
    }
}

/// Re-sends batches `0..end`: (accepted, duplicates).
async fn resend(ledger: &EmbeddedLedger, end: usize) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for b in 0..end {
        let o = ledger.ingest(batch(b)).await.unwrap();
        out.push((o.accepted, o.duplicates));
    }
    out
}

#[tokio::test]
async fn dedupe_runs_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let (mut acked, mut sent) = (0usize, 0usize);
    for round in 0..ROUNDS {
        let mut child = Command::new(&exe)
            .args(["--exact", "child_ingests", "--ignored", "--nocapture"])
            .env(CHILD_DIR, dir.path())
            .env(CHILD_FROM, sent.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // Kill after a different number of batches each round.
        let kill_after = 20 + 13 * round;
        let mut seen = 0;
        for line in lines {
            let line = line.unwrap();
            if let Some(b) = line.strip_prefix("acked ") {
                acked = b.parse::<usize>().unwrap() + 1;
                seen += 1;
                if seen == kill_after {
                    break;
                }
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // The batch after the last acknowledged one may have been stored.
        sent = acked + 1;
        let ledger = EmbeddedLedger::open(config(dir.path())).unwrap();
        let (in_memory, in_runs, _) = ledger.dedupe_sizes();
        let runs = ledger.dedupe_runs();
        let again = resend(&ledger, acked).await;
        for (b, (accepted, duplicates)) in again.iter().enumerate() {
            assert_eq!(
                (*accepted, *duplicates as usize),
                (0, batch(b).len()),
                "round {round}: batch {b} was acknowledged, yet not every event is refused \
                 ({in_memory} keys in memory, {in_runs} in runs at open)"
            );
        }
        // The unacknowledged batch lands once, whether or not it was stored.
        let last = ledger.ingest(batch(acked)).await.unwrap();
        assert_eq!(last.accepted + last.duplicates, batch(acked).len() as u64);
        let last = ledger.ingest(batch(acked)).await.unwrap();
        assert_eq!(
            last.accepted, 0,
            "round {round}: batch {acked} stored twice"
        );
        assert!(in_runs > 0, "round {round}: no run had been written");
        eprintln!(
            "round {round}: killed after batch {}; {in_runs} keys in {runs} runs, {in_memory} in memory at open",
            acked - 1
        );
    }
    // Every event ever sent is stored exactly once: a last re-send of
    // everything accepts nothing.
    let ledger = EmbeddedLedger::open(config(dir.path())).unwrap();
    let again = resend(&ledger, sent).await;
    assert!(again.iter().all(|(accepted, _)| *accepted == 0));
}
