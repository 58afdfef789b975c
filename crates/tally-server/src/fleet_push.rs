//! Pushes the compute fleet metrics to VictoriaMetrics when
//! `victoriaMetrics:` is configured: every `pushInterval` (default 15 s) the
//! families `crate::compute::Compute::render_metrics` puts on `/metrics`
//! (lifecycle transitions, scheduling latency histogram, crash/OOM and
//! error counters, per-instance allocation, use and start time) are
//! rendered once, stamped with the render time in milliseconds, and
//! imported through VictoriaMetrics' `/api/v1/import/prometheus` (under
//! `pushUrl`, default `url`) with `extra_label=tally_node=<pushNode>`, so
//! the nodes of a cluster keep their own series.
//!
//! Delivery is the `tally-delivery` sink `victoriametrics_fleet` (its
//! counters on `/metrics` as `tally_component_*{component_id=...}`): an
//! in-memory queue of at most [`MAX_QUEUED`] snapshots (a full queue drops
//! the new one, counted), batched, retried with backoff. A snapshot sent
//! twice carries the same timestamps, so it is the same samples again.
//! Snapshots queued when the process dies are lost: the next render after a
//! restart carries the counters' new values, which PromQL's `rate` reads
//! as a reset.
//!
//! Per-instance series carry `namespace` when it is known, so the
//! project-scoped PromQL endpoint (`crate::promql`) shows a project its own
//! instances' allocation, use and uptime, and nothing else; fleet-wide
//! series have no `namespace` and are seen by operators only.
//!
//! **Never:** push to an endpoint a customer chose (the URL is the
//! operator's configuration), or wait on VictoriaMetrics in the render.

use std::sync::Arc;
use std::time::Duration;

use tally_delivery::{
    EncodeError, Encoder, HttpRequest, Item, Registry, Sink, SinkConfig, Storage,
};

use crate::compute::Compute;

/// Most snapshots waiting for VictoriaMetrics (an hour at the default
/// interval).
pub const MAX_QUEUED: u64 = 240;
/// Most snapshot bytes waiting.
pub const MAX_QUEUED_BYTES: u64 = 256 << 20;
/// The sink's component id.
pub const SINK_ID: &str = "victoriametrics_fleet";

/// Where and how often the fleet metrics go.
#[derive(Debug, Clone)]
pub struct FleetPush {
    /// `<base>/api/v1/import/prometheus?extra_label=tally_node=<node>`.
    pub url: reqwest::Url,
    pub interval: Duration,
}

impl FleetPush {
    /// Imports into the VictoriaMetrics at `base` (single node, or a
    /// vminsert tenant prefix such as `http://vminsert:8480/insert/0/prometheus`).
    pub fn new(base: &str, node: &str, interval: Duration) -> anyhow::Result<FleetPush> {
        let mut url = reqwest::Url::parse(&format!(
            "{}/api/v1/import/prometheus",
            base.trim_end_matches('/')
        ))
        .map_err(|e| anyhow::anyhow!("victoriaMetrics push URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            anyhow::bail!("victoriaMetrics push URL: the scheme must be http or https");
        }
        url.query_pairs_mut()
            .append_pair("extra_label", &format!("tally_node={node}"));
        Ok(FleetPush { url, interval })
    }
}

/// A batch of snapshots is one import body: their texts, one after another.
struct Import(reqwest::Url);

impl Encoder for Import {
    fn encode(&self, items: &[Item]) -> Result<HttpRequest, EncodeError> {
        let body: Vec<u8> = items.iter().flat_map(|i| i.data.iter().copied()).collect();
        Ok(HttpRequest::post(self.0.clone()).body(body).gzip(true))
    }
}

/// The samples of a Prometheus text exposition, each stamped with `ms`;
/// comment lines are left out (VictoriaMetrics ignores them).
pub fn stamp(exposition: &str, ms: i64) -> String {
    let mut out = String::with_capacity(exposition.len() + exposition.len() / 4);
    for line in exposition.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push_str(line);
        out.push(' ');
        out.push_str(&ms.to_string());
        out.push('\n');
    }
    out
}

/// Starts the sink and the task that renders into it every interval.
pub fn start(
    compute: Compute,
    push: FleetPush,
    registry: &Registry,
) -> anyhow::Result<(Arc<Sink>, tokio::task::JoinHandle<()>)> {
    let mut config = SinkConfig::new(SINK_ID);
    config.queue.max_items = MAX_QUEUED;
    config.queue.max_bytes = MAX_QUEUED_BYTES;
    config.queue.storage = Storage::Memory;
    config.batch.max_items = 20;
    config.batch.timeout = Duration::from_millis(100);
    config.retry.max_elapsed = Some(Duration::from_secs(600));
    let sink = Sink::builder(config, Import(push.url.clone()))
        .registry(registry)
        .start()
        .map_err(|e| anyhow::anyhow!("the VictoriaMetrics fleet sink: {e}"))?;
    let sink = Arc::new(sink);
    let feeding = Arc::clone(&sink);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(push.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = jiff::Timestamp::now();
            let mut text = String::new();
            compute.render_metrics_at(&mut text, now);
            let ms = now.as_millisecond();
            let item = Item::new(ms.to_string(), stamp(&text, ms));
            // A full queue drops this snapshot (counted by the sink); the
            // next one carries the counters forward.
            if let Err(e) = feeding.try_enqueue(item).await {
                tracing::debug!(error = %e, "fleet metrics snapshot not queued");
            }
        }
    });
    Ok((sink, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_stamped_and_comments_dropped() {
        let text = "# HELP a x\n# TYPE a counter\na{k=\"v\"} 1\n\nb 2.5\n";
        assert_eq!(stamp(text, 1700), "a{k=\"v\"} 1 1700\nb 2.5 1700\n");
    }

    #[test]
    fn the_url_names_the_import_path_and_the_node() {
        let p = FleetPush::new("http://vm:8428/", "node-1", Duration::from_secs(1)).unwrap();
        assert_eq!(
            p.url.as_str(),
            "http://vm:8428/api/v1/import/prometheus?extra_label=tally_node%3Dnode-1"
        );
        assert!(FleetPush::new("ftp://vm", "n", Duration::from_secs(1)).is_err());
    }
}
