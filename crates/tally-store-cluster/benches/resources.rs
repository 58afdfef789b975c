//! The cluster's resource store against a real `nats-server -js` on
//! loopback: how long an apply takes to be acknowledged (and folded into
//! the writing node), and how long until a second node's watch shows it.
//! `cargo bench -p tally-store-cluster --bench resources [-- N]`;
//! figures in BENCHMARKS.md.

use std::time::{Duration, Instant};

use tally_ledger::{ApplyMode, ResourceKey, ResourceStore};
use tally_model::{Kind, Manifest};
use tally_store_cluster::testing::NatsServer;
use tally_store_cluster::{KvResources, KvResourcesConfig};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at.min(sorted.len() - 1)]
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{what}: n={} p50={:.2?} p99={:.2?} max={:.2?}",
        samples.len(),
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples[samples.len() - 1]
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(500);
    let Some(nats) = NatsServer::start_or_skip() else {
        return;
    };
    let config = KvResourcesConfig::new(nats.url(), "bench");
    let (a, _) = KvResources::connect(&config).await.unwrap();
    let (b, _) = KvResources::connect(&config).await.unwrap();
    let (mut acked, mut seen) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let started = Instant::now();
    for i in 0..n {
        let manifest = Manifest::parse_documents(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{i}, labels: \
             {{resourcemanager.miloapis.com/project-name: p{i}}}}}\n"
        ))
        .unwrap()
        .remove(0);
        let key = ResourceKey::new(Kind::Namespace, None, &format!("ns-{i}"));
        let t = Instant::now();
        a.apply(manifest, ApplyMode::Upsert).await.unwrap();
        acked.push(t.elapsed());
        let mut ticks = b.subscribe();
        while b.snapshot().get(&key).is_none() {
            let _ = tokio::time::timeout(Duration::from_millis(100), ticks.changed()).await;
        }
        seen.push(t.elapsed());
    }
    let elapsed = started.elapsed();
    report("apply acknowledged (and folded in) on node a", acked);
    report("apply visible on node b", seen);
    println!(
        "{n} sequential applies in {elapsed:.2?}: {:.0}/s",
        n as f64 / elapsed.as_secs_f64()
    );
}
