//! A sink's lanes: `maxInFlight` `tally-delivery` sinks to one provider, so
//! that many requests are in flight at once and one stalled request holds
//! only its own batch. Records wait in the forwarder's backlog in
//! batch-sized chunks; a feeder task hands the next chunk to a lane only
//! once that lane is empty (its last batch delivered or dead-lettered), so
//! a stalled lane holds its one batch and nothing else. Every lane draws
//! its dead-letter ids from the forwarder's one counter, so the id a lane
//! logs is the id the forwarder stores and the CLI shows.
//!
//! **Invariant:** a record leaves the backlog only into a lane's queue; the
//! backlog and the lanes' queues are in memory (what they hold is pending
//! in the progress store and queued again after a restart).

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tally_delivery::{
    AttemptReport, BatchOutcome, DeadLetter, EgressGuard, EncodeError, EnqueueError, Item,
    QueueError, Registry, Sink, SinkConfig, StartError,
};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use crate::forwarder::ForwarderConfig;
use crate::provider::ProviderEncoder;

/// The sinks of one forwarder, and the backlog their feeder draws from.
pub(crate) struct Lanes {
    shared: Arc<Shared>,
    chunk: usize,
    feeder: JoinHandle<()>,
}

struct Shared {
    sinks: Vec<Sink>,
    backlog: Mutex<Backlog>,
    /// Rung when chunks are added or a lane empties.
    wake: Notify,
    /// Rung when the backlog shrinks.
    space: Notify,
    max_backlog: usize,
}

#[derive(Default)]
struct Backlog {
    chunks: VecDeque<Vec<Item>>,
    items: usize,
}

impl Shared {
    fn backlog(&self) -> MutexGuard<'_, Backlog> {
        self.backlog
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Hands chunks to empty lanes until none is empty or none is left.
    async fn feed(&self) {
        for sink in &self.sinks {
            if sink.queue_depth() > 0 {
                continue;
            }
            let chunk = {
                let mut backlog = self.backlog();
                let Some(chunk) = backlog.chunks.pop_front() else {
                    return;
                };
                backlog.items -= chunk.len();
                chunk
            };
            self.space.notify_waiters();
            if let Err(e) = sink.enqueue_all(chunk).await {
                // Only a stopping lane refuses; the records stay pending in
                // the progress store and are queued again after a restart.
                tracing::debug!(lane = %sink.id(), error = %e, "lane refused records");
            }
        }
    }
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
        let wake = Arc::new(Notify::new());
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
            sink_config.queue.max_items = config.sink.batch_size.max(1) as u64;
            sink_config.queue.dead_letter_ids = Some(Arc::clone(&hooks.dead_ids));
            let tx = hooks.outcomes.clone();
            let attempt = Arc::clone(&hooks.attempt);
            let wake = Arc::clone(&wake);
            let sink = Sink::builder(sink_config, encoder)
                .egress(guard.clone())
                .registry(registry)
                .on_outcome(move |outcome| {
                    let _ = tx.send((lane, outcome.clone()));
                    wake.notify_one();
                })
                .on_attempt(move |report| attempt(report))
                .start()?;
            sinks.push(sink);
        }
        let shared = Arc::new(Shared {
            sinks,
            backlog: Mutex::default(),
            wake: Notify::new(),
            space: Notify::new(),
            max_backlog: usize::try_from(config.max_queued_records).unwrap_or(usize::MAX),
        });
        let feeder = tokio::spawn(feed_forever(Arc::clone(&shared), wake));
        let chunk = config.sink.batch_size.max(1);
        Ok((
            Lanes {
                shared,
                chunk,
                feeder,
            },
            guard,
        ))
    }

    /// Adds `items` to the backlog in batch-sized chunks, waiting while the
    /// backlog holds `max_queued_records` or more.
    pub async fn enqueue(&self, items: Vec<Item>) -> Result<(), EnqueueError> {
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            loop {
                let space = self.shared.space.notified();
                if self.shared.backlog().items < self.shared.max_backlog {
                    break;
                }
                space.await;
            }
            let chunk: Vec<Item> = items.by_ref().take(self.chunk).collect();
            let mut backlog = self.shared.backlog();
            backlog.items += chunk.len();
            backlog.chunks.push_back(chunk);
            drop(backlog);
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    /// Requests retried by every lane since start.
    pub fn retries(&self) -> u64 {
        self.shared
            .sinks
            .iter()
            .map(|s| s.metrics().retries())
            .sum()
    }

    /// Records in the backlog and in every lane, batches in flight included.
    pub fn queue_depth(&self) -> u64 {
        let lanes: u64 = self.shared.sinks.iter().map(Sink::queue_depth).sum();
        lanes + self.shared.backlog().items as u64
    }

    /// Lane `lane`'s dead letter `id`, if it still holds it.
    pub async fn dead_letter(
        &self,
        lane: usize,
        id: u64,
    ) -> Result<Option<DeadLetter>, QueueError> {
        let Some(sink) = self.shared.sinks.get(lane) else {
            return Ok(None);
        };
        Ok(sink.dead_letters().await?.into_iter().find(|l| l.id == id))
    }

    /// Drops lane `lane`'s copy of dead letter `id` (the forwarder keeps it).
    pub async fn forget_dead_letter(&self, lane: usize, id: u64) {
        if let Some(sink) = self.shared.sinks.get(lane) {
            let _ = sink.delete_dead_letter(id).await;
        }
    }

    /// Stops the feeder, then every lane after at most `grace` (what the
    /// backlog holds stays pending in the progress store).
    pub async fn shutdown(&self, grace: Duration) {
        self.feeder.abort();
        futures::future::join_all(self.shared.sinks.iter().map(|s| s.shutdown(grace))).await;
    }
}

impl Drop for Lanes {
    fn drop(&mut self) {
        self.feeder.abort();
    }
}

/// The feeder: whenever chunks arrive or a lane empties, hands chunks to
/// the empty lanes.
async fn feed_forever(shared: Arc<Shared>, lane_emptied: Arc<Notify>) {
    loop {
        shared.feed().await;
        tokio::select! {
            () = shared.wake.notified() => {}
            () = lane_emptied.notified() => {}
        }
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
