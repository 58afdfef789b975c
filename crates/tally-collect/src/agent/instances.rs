//! Compute instance lifecycle forwarding (`--instances`): the compute
//! controllers on a node post lifecycle CloudEvents to the agent's
//! `POST /v1/instances/events`, and the agent forwards them to
//! `tally serve`'s `POST /api/v1/instances/events`.
//!
//! A request takes the media types and gzip of `/v1/connections` and is
//! validated whole by the very code serve validates with
//! ([`tally_compute::lifecycle::from_values`]: types, required `data`
//! fields, Kubernetes names, lengths): one bad event answers `400
//! application/problem+json` listing every bad event, and nothing is kept.
//! Valid events are queued in their canonical form
//! ([`LifecycleEvent::to_cloud_event`](tally_compute::LifecycleEvent::to_cloud_event),
//! the agent's receive time standing in for a missing `time`) in a
//! `tally-delivery` disk queue under `state_dir/instances/queue`, fsync'd
//! before the `202`. The queue's sink sends them in NDJSON batches and
//! retries with backoff (every 5xx, 408, 429, connection errors) for as
//! long as it takes; an event leaves the disk only once serve answered 2xx
//! for its batch. A batch serve refuses for good (4xx) is dead-lettered on
//! disk and counted in `tally_component_*{component="instances"}`.
//!
//! **Guarantee:** at least once from the agent's `202` on, across agent
//! kill -9 and serve restarts; serve drops re-sends by (`source`, `id`), so
//! each event is stored once. While the queue holds `maxQueuedEvents`
//! events or `maxQueuedBytes` bytes, requests answer `503` with
//! `Retry-After` and nothing is kept.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use jiff::Timestamp;
use serde_json::json;
use tally_delivery::{
    EncodeError, Encoder, EnqueueError, HttpRequest, Item, Registry, Secret, Sink, SinkConfig,
    Storage,
};
use tally_model::{BatchError, split_batch};

use super::connections::{problem, unavailable};
use super::spool::{MAX_BODY_BYTES, decode_body, media_type};
use super::{AgentConfig, AgentError, HttpState};
use crate::agent::clock::Clock;
use crate::agent::config::InstancesConfig;

/// The receiver's state: the forwarding sink and the clock that dates
/// events without a `time`.
pub(crate) struct Forwarder {
    sink: Sink,
    clock: Clock,
}

impl Forwarder {
    /// Opens the disk queue and starts forwarding what it holds.
    pub(crate) fn start(
        config: &AgentConfig,
        instances: &InstancesConfig,
        registry: &Registry,
    ) -> Result<Forwarder, AgentError> {
        let mut sink_config = SinkConfig::new("instances");
        sink_config.batch.max_items = config.batch_size;
        sink_config.batch.timeout = config.batch_timeout;
        sink_config.retry.max_attempts = u32::MAX;
        sink_config.retry.max_elapsed = None;
        sink_config.retry.max_backoff = config.max_backoff;
        sink_config.retry.max_retry_after = config.max_backoff.max(Duration::from_secs(1));
        sink_config.retry.request_timeout = config.request_timeout;
        sink_config.retry = sink_config.retry.retry_all_5xx();
        sink_config.queue.max_items = instances.max_queued_events;
        sink_config.queue.max_bytes = instances.max_queued_bytes;
        sink_config.queue.storage = Storage::Disk {
            path: config.state_dir.join("instances").join("queue"),
            sync: true,
        };
        let url = instances
            .url
            .join("/api/v1/instances/events")
            .map_err(|e| AgentError::Config(format!("building the lifecycle URL: {e}")))?;
        let encoder = LifecycleEncoder {
            url,
            token: config.token.clone(),
        };
        let sink = Sink::builder(sink_config, encoder)
            .registry(registry)
            .start()
            .map_err(|e| AgentError::Sink(format!("starting the lifecycle forwarder: {e}")))?;
        Ok(Forwarder {
            sink,
            clock: config.clock.clone(),
        })
    }

    /// Stops sending; what is not yet delivered stays on disk.
    pub(crate) async fn shutdown(&self, grace: Duration) {
        let report = self.sink.shutdown(grace).await;
        tracing::info!(
            left_in_queue = report.left_in_queue,
            "lifecycle forwarder stopped; undelivered events stay queued on disk"
        );
    }
}

/// Batches of lifecycle CloudEvents as `application/x-ndjson` to serve.
struct LifecycleEncoder {
    url: reqwest::Url,
    token: Option<Secret>,
}

impl Encoder for LifecycleEncoder {
    fn encode(&self, items: &[Item]) -> Result<HttpRequest, EncodeError> {
        let mut body = Vec::with_capacity(items.iter().map(|i| i.data.len() + 1).sum());
        for item in items {
            body.extend_from_slice(&item.data);
            body.push(b'\n');
        }
        super::ledger::post_to_serve(&self.url, "application/x-ndjson", body, self.token.as_ref())
    }
}

/// `POST /v1/instances/events`.
pub(crate) async fn receive(
    State(state): State<HttpState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(forwarder) = state.instances.clone() else {
        return problem(
            StatusCode::NOT_FOUND,
            "the instance lifecycle receiver is off; start tally collect with --instances",
            None,
        );
    };
    let items = match items_of(&forwarder, &headers, body) {
        Ok(items) => items,
        Err(response) => return response,
    };
    let count = items.len();
    match forwarder.sink.try_enqueue_marked(items, Vec::new()).await {
        Ok(()) => (
            StatusCode::ACCEPTED,
            [(header::CONTENT_TYPE, "application/json")],
            json!({ "accepted": count }).to_string(),
        )
            .into_response(),
        Err(EnqueueError::TooLarge { items, bytes }) => problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{items} events of {bytes} bytes can never fit the forwarding queue; send fewer at a time"
            ),
            None,
        ),
        Err(e) => {
            tracing::warn!(error = %e, "lifecycle events refused");
            unavailable(format!(
                "the events cannot be queued for forwarding now ({e}); retry later"
            ))
        }
    }
}

/// The request's events as queue items (key `source` NUL `id`), or the
/// answer refusing it.
#[allow(clippy::result_large_err)]
fn items_of(
    forwarder: &Forwarder,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Vec<Item>, Response> {
    let body = decode_body(headers, body, MAX_BODY_BYTES)
        .map_err(|detail| problem(StatusCode::BAD_REQUEST, detail, None))?;
    let values = split_batch(&media_type(headers), &body).map_err(|e| match e {
        BatchError::Malformed(detail) => problem(StatusCode::BAD_REQUEST, detail, None),
        BatchError::UnsupportedMediaType(detail) => {
            problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, detail, None)
        }
    })?;
    let received = forwarder
        .clock
        .now_millis()
        .ok()
        .and_then(|ms| Timestamp::from_millisecond(ms).ok())
        .ok_or_else(|| unavailable("the agent's clock cannot be read".to_owned()))?;
    let events = tally_compute::lifecycle::from_values(values, received).map_err(|errors| {
        let detail = format!(
            "{} event(s) are invalid; nothing was kept (event types: {}<kind>)",
            errors.len(),
            tally_compute::lifecycle::TYPE_PREFIX
        );
        problem(
            StatusCode::BAD_REQUEST,
            detail,
            serde_json::to_value(&errors).ok(),
        )
    })?;
    let mut items = Vec::with_capacity(events.len());
    for event in &events {
        let data = serde_json::to_vec(&event.to_cloud_event()).map_err(|e| {
            problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding a lifecycle event: {e}"),
                None,
            )
        })?;
        let key = format!("{}\0{}", event.source, event.id);
        items.push(Item::new(key, data));
    }
    Ok(items)
}

/// The shared instance of a forwarder, for [`HttpState`].
pub(crate) type SharedForwarder = Arc<Forwarder>;
