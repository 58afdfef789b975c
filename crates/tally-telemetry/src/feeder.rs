//! The task of one (exporter, sink): batches shares by data points,
//! converts to delta when the sink asks for it, and queues batches in its
//! `tally-delivery` sink, which sends and retries. Pulled windows are queued
//! with their checkpoint in one atomic write.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use jiff::Timestamp;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use prost::Message as _;
use tally_delivery::{
    AttemptReport, BatchOutcome, BatchResult, DESTINATION_REFUSED, EgressGuard, Item, Sink,
    Storage, Verdict,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::delta::DeltaConverter;
use crate::encoder::{InFlight, OtlpEncoder, points_of};
use crate::exporter::{Compression, SinkConfig};
use crate::options::{PipelineOptions, QueueStorage};
use crate::otlp;
use crate::sink::{DropReason, Fragment, Message, Refusal, SinkShared, mark_key};
use crate::split::split;
use crate::sync::lock;
use crate::victoria::Checkpoint;

/// The task of one sink: batches shares, converts to delta, and queues
/// batches in its delivery sink.
pub(crate) struct Feeder {
    pub(crate) id: String,
    pub(crate) config: SinkConfig,
    pub(crate) shared: Arc<SinkShared>,
    pub(crate) options: PipelineOptions,
    pub(crate) egress: EgressGuard,
    pub(crate) delta: Option<DeltaConverter>,
    pub(crate) batch: Vec<u8>,
    pub(crate) batch_points: u64,
    pub(crate) batch_started: Option<tokio::time::Instant>,
}

impl Feeder {
    pub(crate) async fn run(
        mut self,
        mut rx: mpsc::Receiver<Message>,
        wait_for: Option<JoinHandle<()>>,
    ) {
        if let Some(previous) = wait_for {
            let _ = previous.await;
        }
        let (dead_tx, mut dead_rx) = mpsc::unbounded_channel::<u64>();
        let sink = match self.start(dead_tx) {
            Ok(sink) => sink,
            Err(e) => {
                tracing::error!(sink = %self.id, error = %e, "exporter sink could not start");
                let error = e.to_string();
                *lock(&self.shared.start_error) = Some(error.clone());
                let refusal = || Refusal::Other(format!("the sink could not start: {error}"));
                while let Some(message) = rx.recv().await {
                    match message {
                        Message::Share(f) => {
                            self.shared
                                .drop_points(DropReason::SinkNotStarted, f.points, true);
                        }
                        Message::Pulled { ack, .. } => {
                            let _ = ack.send(Err(refusal()));
                        }
                        Message::Cursor { reply, .. } => {
                            let _ = reply.send(Err(refusal()));
                        }
                    }
                }
                return;
            }
        };
        loop {
            let deadline = self.batch_started.map(|t| t + self.config.batch.timeout);
            tokio::select! {
                biased;
                Some(id) = dead_rx.recv() => {
                    // Counted as dropped by the outcome hook; nothing is kept.
                    let _ = sink.delete_dead_letter(id).await;
                }
                message = rx.recv() => match message {
                    Some(Message::Share(f)) => self.add(&sink, f).await,
                    Some(Message::Pulled { source, fragment, next_start_ms, ack }) => {
                        // What was batched before goes first.
                        self.flush(&sink).await;
                        let result = self.queue_pulled(&sink, &source, fragment, next_start_ms).await;
                        let _ = ack.send(result);
                    }
                    Some(Message::Cursor { source, reply }) => {
                        let _ = reply.send(self.cursor(&sink, &source).await);
                    }
                    None => break,
                },
                () = sleep_until(deadline), if deadline.is_some() => self.flush(&sink).await,
            }
        }
        self.flush(&sink).await;
        sink.shutdown(self.options.shutdown_grace).await;
        let left = self.shared.queued.swap(0, Ordering::Relaxed);
        self.shared.metrics.set_queue_depth(0);
        if left > 0 && !matches!(self.options.storage, QueueStorage::Disk { .. }) {
            self.shared.metrics.add_dropped(
                DropReason::Shutdown.as_str(),
                u64::try_from(left).unwrap_or(0),
            );
        }
        tracing::info!(sink = %self.id, "exporter sink stopped");
    }

    pub(crate) fn start(
        &self,
        dead_tx: mpsc::UnboundedSender<u64>,
    ) -> Result<Sink, tally_delivery::StartError> {
        let mut config = tally_delivery::SinkConfig::new(self.id.clone());
        // Batching by data points happens here; every item is one request.
        config.batch.max_items = 1;
        config.batch.max_bytes = usize::MAX;
        config.batch.timeout = Duration::ZERO;
        let retry = &self.config.retry;
        config.retry.max_attempts = if retry.enabled {
            retry.max_attempts.max(1)
        } else {
            1
        };
        config.retry.initial_backoff = retry.backoff;
        config.retry.max_backoff = self.options.max_backoff.max(retry.backoff);
        config.retry.max_retry_after = self.options.max_retry_after;
        config.retry.max_elapsed = Some(retry.max_elapsed);
        config.retry.request_timeout = self
            .config
            .request_timeout
            .unwrap_or(self.options.request_timeout);
        config.queue.max_items = self.options.queue_max_batches.max(1);
        config.queue.max_bytes = self.options.queue_max_bytes.max(1);
        config.queue.storage = match &self.options.storage {
            QueueStorage::Memory => Storage::Memory,
            QueueStorage::Disk { dir, sync } => Storage::Disk {
                path: dir.join(self.id.replace('/', "_")),
                sync: *sync,
            },
        };
        let in_flight = Arc::new(InFlight::default());
        let encoder = OtlpEncoder {
            url: self.config.metrics_url.clone(),
            encoding: self.config.encoding,
            gzip: self.config.compression == Compression::Gzip,
            shared: Arc::clone(&self.shared),
            in_flight: Arc::clone(&in_flight),
        };
        let on_outcome = {
            let shared = Arc::clone(&self.shared);
            let in_flight = Arc::clone(&in_flight);
            move |outcome: &BatchOutcome| {
                let points = points_of(&outcome.keys);
                match &outcome.result {
                    BatchResult::Delivered { .. } => {
                        let rejected = in_flight.rejected.swap(0, Ordering::Relaxed).min(points);
                        shared.metrics.add_sent(points - rejected);
                        shared.queued_add(-((points - rejected) as i64));
                        shared.drop_points(DropReason::RejectedByReceiver, rejected, true);
                        shared.succeed(rejected == 0);
                    }
                    BatchResult::DeadLettered { id, reason: why } => {
                        let why = match why.as_str() {
                            "permanent error" => DropReason::PermanentError,
                            "encoding failed" => DropReason::EncodeFailed,
                            DESTINATION_REFUSED => DropReason::DestinationRefused,
                            _ => DropReason::RetriesExhausted,
                        };
                        shared.drop_points(why, points, true);
                        let _ = dead_tx.send(*id);
                    }
                }
            }
        };
        let on_attempt = {
            let shared = Arc::clone(&self.shared);
            let in_flight = Arc::clone(&in_flight);
            move |attempt: &AttemptReport<'_>| {
                if attempt.will_retry {
                    shared.metrics.add_retry();
                    shared
                        .points_retried
                        .fetch_add(in_flight.points.load(Ordering::Relaxed), Ordering::Relaxed);
                }
                match attempt.status {
                    None => {
                        shared.metrics.add_error("send");
                        shared.fail(format!("request failed: {}", attempt.detail));
                    }
                    // The classifier recorded what the answer meant.
                    Some(_) if !matches!(attempt.verdict, Verdict::Delivered { .. }) => {
                        shared.metrics.add_error("response");
                    }
                    Some(_) => {}
                }
            }
        };
        // Delivery metrics count batches: a private registry keeps them apart
        // from the data point counters of this component.
        Sink::builder(config, encoder)
            .egress(self.egress.clone())
            .on_outcome(on_outcome)
            .on_attempt(on_attempt)
            .start()
    }

    /// Queues a pulled fragment, cut in batches of `batch.maxSize` points,
    /// and its checkpoint, in one atomic write; or nothing.
    async fn queue_pulled(
        &mut self,
        sink: &Sink,
        source: &str,
        fragment: Fragment,
        next_start_ms: i64,
    ) -> Result<(), Refusal> {
        let refused = |e: String| Refusal::Other(format!("sink {}: {e}", self.config.name));
        let checkpoint = serde_json::to_vec(&Checkpoint { next_start_ms })
            .map_err(|e| refused(e.to_string()))?;
        let points = fragment.points;
        let max = self.config.batch.max_size.max(1) as u64;
        let item = |bytes: Bytes, points: u64| {
            Item::new(Bytes::copy_from_slice(&points.to_le_bytes()), bytes)
        };
        let items = if points == 0 {
            Vec::new()
        } else if !self.config.batch.enabled || points <= max {
            vec![item(fragment.bytes, points)]
        } else {
            let request = ExportMetricsServiceRequest::decode(&fragment.bytes[..])
                .map_err(|e| refused(format!("a pulled share does not decode: {e}")))?;
            split(request, max)
                .into_iter()
                .map(|part| {
                    let n = otlp::data_point_count(&part) as u64;
                    item(Bytes::from(part.encode_to_vec()), n)
                })
                .collect()
        };
        // Counted as queued before the write, so a fast delivery never
        // makes the depth negative.
        self.shared.queued_add(points as i64);
        match sink
            .try_enqueue_marked(items, vec![(mark_key(source), Bytes::from(checkpoint))])
            .await
        {
            Ok(()) => {
                self.shared.metrics.add_received(points);
                Ok(())
            }
            Err(e) => {
                self.shared.queued_add(-(points as i64));
                let message = format!("sink {}: {e}", self.config.name);
                Err(match e {
                    tally_delivery::EnqueueError::TooLarge { .. } => Refusal::TooLarge(message),
                    _ => Refusal::Other(message),
                })
            }
        }
    }

    /// The checkpoint of pull source `source` recorded in the sink's queue.
    async fn cursor(&self, sink: &Sink, source: &str) -> Result<Option<i64>, Refusal> {
        let refused = |e: String| {
            Refusal::Other(format!(
                "sink {}: reading the checkpoint of source {source}: {e}",
                self.config.name
            ))
        };
        match sink.mark(mark_key(source)).await {
            Ok(None) => Ok(None),
            Ok(Some(bytes)) => serde_json::from_slice::<Checkpoint>(&bytes)
                .map(|c| Some(c.next_start_ms))
                .map_err(|e| refused(e.to_string())),
            Err(e) => Err(refused(e.to_string())),
        }
    }

    async fn add(&mut self, sink: &Sink, fragment: Fragment) {
        let max = self.config.batch.max_size.max(1) as u64;
        let batching = self.config.batch.enabled;
        if self.delta.is_none() && (!batching || fragment.points <= max) {
            return self.add_part(sink, &fragment.bytes, fragment.points).await;
        }
        // The slow path: decode our own encoding to convert or split it.
        let mut request = match ExportMetricsServiceRequest::decode(&fragment.bytes[..]) {
            Ok(request) => request,
            Err(e) => {
                tracing::error!(sink = %self.id, error = %e, "a routed share does not decode");
                self.shared.metrics.add_error("encode");
                self.shared
                    .drop_points(DropReason::EncodeFailed, fragment.points, true);
                return;
            }
        };
        if let Some(delta) = &mut self.delta {
            delta.convert(&mut request);
            let left = otlp::data_point_count(&request) as u64;
            self.shared.drop_points(
                DropReason::DeltaBaseline,
                fragment.points.saturating_sub(left),
                true,
            );
        }
        let limit = if batching { max } else { u64::MAX };
        for part in split(request, limit) {
            let points = otlp::data_point_count(&part) as u64;
            self.add_part(sink, &part.encode_to_vec(), points).await;
        }
    }

    async fn add_part(&mut self, sink: &Sink, bytes: &[u8], points: u64) {
        if points == 0 {
            return;
        }
        if !self.config.batch.enabled {
            self.batch.extend_from_slice(bytes);
            self.batch_points = points;
            return self.flush(sink).await;
        }
        let max = self.config.batch.max_size.max(1) as u64;
        if self.batch_points > 0 && self.batch_points + points > max {
            self.flush(sink).await;
        }
        if self.batch_started.is_none() {
            self.batch_started = Some(tokio::time::Instant::now());
        }
        self.batch.extend_from_slice(bytes);
        self.batch_points += points;
        if self.batch_points >= max {
            self.flush(sink).await;
        }
    }

    async fn flush(&mut self, sink: &Sink) {
        self.batch_started = None;
        let points = std::mem::take(&mut self.batch_points);
        let data = std::mem::take(&mut self.batch);
        if points == 0 {
            return;
        }
        let item = Item::new(Bytes::copy_from_slice(&points.to_le_bytes()), data);
        if let Err(e) = sink.try_enqueue(item).await {
            tracing::debug!(sink = %self.id, error = %e, points, "batch not queued");
            let why = match e.reason() {
                "queue_full" => DropReason::QueueFull,
                "too_large" => DropReason::TooLarge,
                "shutdown" => DropReason::Shutdown,
                _ => DropReason::StorageError,
            };
            self.shared.drop_points(why, points, true);
        }
    }
}

pub(crate) async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

pub(crate) fn now_unix_nano() -> u64 {
    u64::try_from(Timestamp::now().as_nanosecond()).unwrap_or(0)
}
