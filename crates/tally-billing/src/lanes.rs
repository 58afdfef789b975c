//! A sink's lanes: `maxInFlight` `tally-delivery` sinks to one provider, so
//! that many requests are in flight at once and one stalled request holds
//! only its own batch. Each batch-sized chunk of records goes to the lane
//! with the fewest records waiting; a stalled lane keeps what it holds and
//! gets nothing new while the others are emptier. Every lane draws its
//! dead-letter ids from the forwarder's one counter, so the id a lane logs
//! is the id the forwarder stores and the CLI shows.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tally_delivery::{
    AttemptReport, BatchOutcome, DeadLetter, EgressGuard, EncodeError, EnqueueError, Item,
    QueueError, Registry, Sink, SinkConfig, StartError,
};
use tokio::sync::mpsc;

use crate::forwarder::ForwarderConfig;
use crate::provider::ProviderEncoder;

/// The sinks of one forwarder.
pub(crate) struct Lanes {
    sinks: Vec<Sink>,
    chunk: usize,
}

/// Everything the lanes report to.
pub(crate) struct LaneHooks {
    /// Each batch's outcome, with its lane.
    pub outcomes: mpsc::UnboundedSender<(usize, BatchOutcome)>,
    /// Each HTTP attempt (for the sink's health).
    pub attempt: Arc<dyn Fn(&AttemptReport<'_>) + Send + Sync>,
    /// Where dead-letter ids come from.
    pub dead_ids: Arc<AtomicU64>,
}

/// The component id of lane `lane` of sink `name`: `billing-<name>` for the
/// first (as before lanes), `billing-<name>/<lane>` for the others.
fn lane_id(name: &str, lane: usize) -> String {
    match lane {
        0 => format!("billing-{name}"),
        n => format!("billing-{name}/{n}"),
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum LaneError {
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("building the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

impl Lanes {
    /// Starts `maxInFlight` lanes on the current Tokio runtime; returns them
    /// and the egress guard they send through.
    pub fn start(
        config: &ForwarderConfig,
        registry: &Registry,
        hooks: LaneHooks,
    ) -> Result<(Lanes, EgressGuard), LaneError> {
        let name = &config.sink.name;
        let guard = EgressGuard::new(config.egress.clone())?;
        let lanes = config.sink.max_in_flight.max(1);
        let mut sinks = Vec::with_capacity(lanes);
        for lane in 0..lanes {
            let encoder = ProviderEncoder::new(
                config.sink.provider,
                &config.sink.endpoint,
                config.api_key.clone(),
                &format!("tally/billing/{name}"),
            )?;
            let mut sink_config = SinkConfig::new(lane_id(name, lane));
            sink_config.batch.max_items = config.sink.batch_size;
            sink_config.batch.timeout = Duration::from_millis(200);
            sink_config.retry = config.retry.clone();
            sink_config.queue.max_items = (config.max_queued_records / lanes as u64)
                .max(config.sink.batch_size as u64)
                .max(1000);
            sink_config.queue.dead_letter_ids = Some(Arc::clone(&hooks.dead_ids));
            let tx = hooks.outcomes.clone();
            let attempt = Arc::clone(&hooks.attempt);
            let sink = Sink::builder(sink_config, encoder)
                .egress(guard.clone())
                .registry(registry)
                .on_outcome(move |outcome| {
                    let _ = tx.send((lane, outcome.clone()));
                })
                .on_attempt(move |report| attempt(report))
                .start()?;
            sinks.push(sink);
        }
        let chunk = config.sink.batch_size.max(1);
        Ok((Lanes { sinks, chunk }, guard))
    }

    /// Queues `items`, a batch-sized chunk at a time, each on the lane with
    /// the fewest records waiting (waiting while that lane is full).
    pub async fn enqueue(&self, items: Vec<Item>) -> Result<(), EnqueueError> {
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            let chunk: Vec<Item> = items.by_ref().take(self.chunk).collect();
            let lane = self
                .sinks
                .iter()
                .min_by_key(|sink| sink.queue_depth())
                .ok_or(EnqueueError::Closed)?;
            lane.enqueue_all(chunk).await?;
        }
        Ok(())
    }

    /// Requests retried by every lane since start.
    pub fn retries(&self) -> u64 {
        self.sinks.iter().map(|s| s.metrics().retries()).sum()
    }

    /// Records queued in every lane, batches in flight included.
    pub fn queue_depth(&self) -> u64 {
        self.sinks.iter().map(Sink::queue_depth).sum()
    }

    /// Lane `lane`'s dead letter `id`, if it still holds it.
    pub async fn dead_letter(&self, lane: usize, id: u64) -> Result<Option<DeadLetter>, QueueError> {
        let Some(sink) = self.sinks.get(lane) else {
            return Ok(None);
        };
        Ok(sink.dead_letters().await?.into_iter().find(|l| l.id == id))
    }

    /// Drops lane `lane`'s copy of dead letter `id` (the forwarder keeps it).
    pub async fn forget_dead_letter(&self, lane: usize, id: u64) {
        if let Some(sink) = self.sinks.get(lane) {
            let _ = sink.delete_dead_letter(id).await;
        }
    }

    /// Stops every lane after at most `grace`.
    pub async fn shutdown(&self, grace: Duration) {
        futures::future::join_all(self.sinks.iter().map(|s| s.shutdown(grace))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_lane_keeps_the_sinks_component_id() {
        assert_eq!(lane_id("amberflo", 0), "billing-amberflo");
        assert_eq!(lane_id("amberflo", 3), "billing-amberflo/3");
    }
}
