//! The composition root of `tally serve`: chooses the backend from the
//! config (the embedded store, or a cluster node with `cluster:`), opens
//! it, and hands the server a `dyn Ledger` and a `dyn ResourceStore`.
//! `tally-server` itself opens no store.

use std::sync::Arc;

use anyhow::Context;
use tally_ledger::{Ledger, ResourceStore};
use tally_server::{Backend, ClusterConfig, ServeConfig};
use tally_store_cluster::{KvResources, KvResourcesConfig};
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
    let days = |days: u32| jiff::SignedDuration::from_hours(i64::from(days) * 24);
    let mut store = StoreConfig::new(&config.data_dir);
    if let Some(mib) = config.store_cache_mib {
        store.cache_bytes = mib.saturating_mul(1 << 20);
    }
    store.dedupe_horizon = days(config.dedupe_horizon_days);
    store.max_lateness = days(
        config
            .max_lateness_days
            .unwrap_or(config.dedupe_horizon_days),
    );
    store.max_future = jiff::SignedDuration::from_hours(i64::from(config.max_future_hours));
    let ledger = tokio::task::spawn_blocking(move || EmbeddedLedger::open(store))
        .await
        .context("opening the store")?
        .with_context(|| format!("opening the store in {}", config.data_dir.display()))?;
    let resources: Arc<dyn ResourceStore> = Arc::new(ledger.resources());
    Ok(Backend {
        ledger: Arc::new(ledger),
        resources,
        vital: Vec::new(),
    })
}

/// A cluster node: resources in the cluster's JetStream key-value bucket,
/// the ledger on JetStream and ClickHouse.
async fn open_cluster(config: &ServeConfig, cluster: &ClusterConfig) -> anyhow::Result<Backend> {
    let kv = KvResourcesConfig::new(cluster.nats.clone(), cluster.resources_bucket.clone());
    let (resources, watch) = KvResources::connect(&kv)
        .await
        .context("cluster: the resources bucket")?;
    let ledger = cluster_ledger(config, cluster).await?;
    Ok(Backend {
        ledger,
        resources: Arc::new(resources),
        vital: vec![(RESOURCES_WATCH, watch)],
    })
}

/// The cluster's ledger (JetStream ingest, workers, ClickHouse).
///
/// SEAM (issue 17): the ledger half of the cluster backend,
/// `tally_store_cluster::ClusterLedger::connect(ClusterLedgerConfig {
/// nats_url, clickhouse_url, database, default_project, .. })` built from
/// `cluster` and the admission settings of `config`, is being written
/// beside this wiring; until it is merged here this build refuses to serve
/// a cluster rather than serve one without a ledger.
async fn cluster_ledger(
    config: &ServeConfig,
    cluster: &ClusterConfig,
) -> anyhow::Result<Arc<dyn Ledger>> {
    let _ = (config, cluster);
    anyhow::bail!(
        "cluster: this build of tally has no cluster ledger (JetStream ingest, ClickHouse \
         queries); serve on the embedded store (no `cluster:` section), or use a build that has it"
    )
}
