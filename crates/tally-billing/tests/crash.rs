//! kill -9 crash test of the forwarder.
//!
//! The parent runs the Amberflo test server (120 ms per answer, some 503s)
//! and re-runs this test binary as a child (`crash_child`, selected by
//! `TALLY_BILLING_CRASH_DIR`) that forwards a deterministic ledger to it
//! from a progress store in that directory, in small batches. Phase 1 holds
//! the first usage; phase 2 adds late events to windows already sent (and
//! new windows). The parent SIGKILLs children mid-run several times per
//! phase, then lets one finish: the server's sums must equal the ledger's
//! exactly.

use tally_billing::testing as support;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use rust_decimal::Decimal;
use support::{Fault, TestServer, at, config, meters, one_account_per_project, sink};
use tally_billing::{Forwarder, MemoryUsageSource, Provider};
use tally_delivery::Registry;
use tokio::io::AsyncBufReadExt as _;

const DIR_VAR: &str = "TALLY_BILLING_CRASH_DIR";
const URL_VAR: &str = "TALLY_BILLING_CRASH_URL";
const PHASE_VAR: &str = "TALLY_BILLING_CRASH_PHASE";
const PROJECTS: usize = 30;
const METERS: [&str; 2] = ["requests", "bytes"];

/// The ledger: (meter, project, second, value); phase 2 appends late events.
fn usage(phase: u32) -> Vec<(usize, usize, i64, i64)> {
    let mut events = Vec::new();
    for i in 0..1200i64 {
        let i_usize = i as usize;
        events.push((i_usize % 2, i_usize % PROJECTS, (i * 7) % 600, i % 13 + 1));
    }
    if phase >= 2 {
        for i in 0..300i64 {
            let i_usize = i as usize;
            // Into windows sent in phase 1, and a few new ones.
            events.push((
                i_usize % 2,
                (i_usize * 7) % PROJECTS,
                (i * 11) % 900,
                i % 5 + 1,
            ));
        }
    }
    events
}

fn now_of(phase: u32) -> i64 {
    if phase >= 2 { 1000 } else { 620 }
}

/// The child: runs only when re-invoked by `sums_are_exact_after_repeated_kill_9`.
#[tokio::test]
async fn crash_child() {
    let Ok(dir) = std::env::var(DIR_VAR) else {
        return;
    };
    let url = std::env::var(URL_VAR).unwrap();
    let phase: u32 = std::env::var(PHASE_VAR).unwrap().parse().unwrap();
    println!();
    let source = Arc::new(MemoryUsageSource::new());
    for (m, p, s, v) in usage(phase) {
        source.add(
            METERS[m],
            &format!("p{p}"),
            at(s),
            BTreeMap::new(),
            Decimal::from(v),
        );
    }
    let mut sink = sink(&url, Provider::Amberflo, 0);
    sink.batch_size = 10;
    let config = config(sink, meters(&METERS), std::path::Path::new(&dir));
    let attribution = one_account_per_project(PROJECTS);
    let mut forwarder = Forwarder::start(config, source, attribution, &Registry::new())
        .await
        .unwrap();
    println!("started");
    forwarder.run_once(at(now_of(phase))).await.unwrap();
    println!("planned");
    assert!(forwarder.wait_idle(Duration::from_secs(120)).await.unwrap());
    println!("idle");
}

/// Runs one child; kills it after `kill_after` unless `None`. True if it said `idle`.
async fn run_child(dir: &str, url: &str, phase: u32, kill_after: Option<Duration>) -> bool {
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(DIR_VAR, dir)
        .env(URL_VAR, url)
        .env(PHASE_VAR, phase.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut idle = false;
    let read = async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.trim() == "idle" {
                idle = true;
            }
        }
    };
    match kill_after {
        Some(after) => {
            let _ = tokio::time::timeout(after, read).await;
            // SIGKILL: no destructor, no flush.
            child.start_kill().unwrap();
        }
        None => tokio::time::timeout(Duration::from_secs(180), read)
            .await
            .unwrap(),
    }
    child.wait().await.unwrap();
    idle
}

#[tokio::test]
async fn sums_are_exact_after_repeated_kill_9() {
    if std::env::var(DIR_VAR).is_ok() {
        return;
    }
    let server = TestServer::start(support::API_KEY).await;
    // Slow enough that the kills land while the four lanes are sending.
    server.state().delay = Duration::from_millis(120);
    server.push_faults((0..20).map(|i| {
        if i % 4 == 0 {
            Fault::Status(503, None)
        } else {
            Fault::SlowAnswer(Duration::ZERO)
        }
    }));
    let dir = tempfile::tempdir().unwrap();
    let dir_text = dir.path().to_str().unwrap().to_owned();
    let mut kills = 0;
    for phase in [1, 2] {
        for kill_ms in [400, 700, 1000] {
            if !run_child(
                &dir_text,
                &server.url,
                phase,
                Some(Duration::from_millis(kill_ms)),
            )
            .await
            {
                kills += 1;
            }
        }
        assert!(
            run_child(&dir_text, &server.url, phase, None).await,
            "phase {phase} finishes"
        );
    }
    assert!(kills >= 3, "children were killed mid-run ({kills} kills)");

    let mut expected: BTreeMap<(String, String), Decimal> = BTreeMap::new();
    for (m, p, _, v) in usage(2) {
        *expected
            .entry((format!("uid-a{p}"), format!("api-{}", METERS[m])))
            .or_default() += Decimal::from(v);
    }
    assert_eq!(server.sums(), expected);
    let state = server.state();
    assert!(
        state.duplicates > 0,
        "some records were re-sent after a kill"
    );
    assert!(state.refused.is_empty(), "{:?}", state.refused);
}
