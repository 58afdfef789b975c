//! The composition root of `tally serve`: chooses the backend from the
//! config (the embedded store, or a cluster node with `cluster:`), opens
//! it, and hands the server a `dyn Ledger` and a `dyn ResourceStore` — and
//! on a cluster the shared lifecycle and instance log stores (ClickHouse);
//! without them the server keeps those in its data directory.

use std::sync::Arc;

use anyhow::Context;
use tally_ledger::ResourceStore;
use tally_server::{Backend, ClusterConfig, ServeConfig};
use tally_store_cluster::ch::Ch;
use tally_store_cluster::{
    ClusterLedger, ClusterLedgerConfig, ClusterLifecycle, ClusterLogStore, KvResources,
    KvResourcesConfig,
};
use tally_store_embedded::{EmbeddedLedger, StoreConfig};

/// [`Backend::vital`] name of the watch of a cluster's resources bucket.
const RESOURCES_WATCH: &str = "the watch of the cluster's resources";

/// Opens the backend `config` names.
pub async fn open(config: &ServeConfig) -> anyhow::Result<Backend> {
    config.check()?;
    match &config.cluster {
        None => open_embedded(config).await,
        Some(cluster) => open_cluster(config, cluster).await,
    }
}

/// The embedded store in `config.data_dir`.
async fn open_embedded(config: &ServeConfig) -> anyhow::Result<Backend> {
    let mut store = StoreConfig::new(&config.data_dir);
    if let Some(mib) = config.store_cache_mib {
        store.cache_bytes = mib.saturating_mul(1 << 20);
    }
    store.dedupe_horizon = days(config.dedupe_horizon_days);
    (store.max_lateness, store.max_future) = admission_bounds(config);
    if let Some(events) = config.max_unmaterialised_events {
        store.max_unmaterialised_events = events;
    }
    store.materialise_patience = config.materialise_patience();
    let ledger = tokio::task::spawn_blocking(move || EmbeddedLedger::open(store))
        .await
        .context("opening the store")?
        .with_context(|| format!("opening the store in {}", config.data_dir.display()))?;
    let resources: Arc<dyn ResourceStore> = Arc::new(ledger.resources());
    Ok(Backend {
        ledger: Arc::new(ledger),
        resources,
        vital: Vec::new(),
        lifecycle: None,
        logs: None,
    })
}

/// A cluster node: resources in the cluster's JetStream key-value bucket,
/// the ledger on JetStream and ClickHouse.
async fn open_cluster(config: &ServeConfig, cluster: &ClusterConfig) -> anyhow::Result<Backend> {
    let kv = KvResourcesConfig::new(cluster.nats.clone(), cluster.resources_bucket.clone());
    let (resources, watch) = KvResources::connect(&kv)
        .await
        .context("cluster: the resources bucket")?;
    let resources: Arc<dyn ResourceStore> = Arc::new(resources);
    let ledger = cluster_ledger(config, cluster).await?;
    ledger.set_resources(resources.clone());
    let ch = Ch::new(
        &cluster.clickhouse,
        &cluster.database,
        ClusterLedgerConfig::new(String::new(), String::new()).clickhouse_timeout,
    )
    .context("cluster: ClickHouse for lifecycle events and instance logs")?;
    let lifecycle = ClusterLifecycle::open(ch.clone()).await;
    let logs = if config.logs.enabled {
        Some(ClusterLogStore::open(ch, config.logs.store_config(&config.data_dir)).await)
    } else {
        None
    };
    Ok(Backend {
        ledger,
        resources,
        vital: vec![(RESOURCES_WATCH, watch)],
        lifecycle: Some(Arc::new(lifecycle)),
        logs: logs.map(|store| Arc::new(store) as _),
    })
}

/// The cluster's ledger (JetStream ingest, workers, ClickHouse), with the
/// admission settings of `config`.
async fn cluster_ledger(
    config: &ServeConfig,
    cluster: &ClusterConfig,
) -> anyhow::Result<Arc<ClusterLedger>> {
    let mut ledger = ClusterLedgerConfig::new(cluster.nats.clone(), cluster.clickhouse.clone());
    ledger.database = cluster.database.clone();
    ledger.default_project = cluster.default_project.clone();
    ledger.workers = cluster.workers;
    (ledger.max_lateness, ledger.max_future) = admission_bounds(config);
    let ledger = ClusterLedger::connect(ledger)
        .await
        .context("cluster: the ledger (JetStream and ClickHouse)")?;
    Ok(Arc::new(ledger))
}

fn days(days: u32) -> jiff::SignedDuration {
    jiff::SignedDuration::from_hours(i64::from(days) * 24)
}

/// How late and how far ahead of the clock an event may be, as every
/// backend admits it: `maxLatenessDays` (default the dedupe horizon) and
/// `maxFutureHours`.
fn admission_bounds(config: &ServeConfig) -> (jiff::SignedDuration, jiff::SignedDuration) {
    let lateness = config
        .max_lateness_days
        .unwrap_or(config.dedupe_horizon_days);
    let future = jiff::SignedDuration::from_hours(i64::from(config.max_future_hours));
    (days(lateness), future)
}
