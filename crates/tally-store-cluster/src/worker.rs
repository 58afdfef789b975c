//! Workers: pull subscribers of one durable consumer (`tally-materialiser`)
//! of stream `billing-usage` that materialise its `.ingest` messages into
//! ClickHouse. A batch is handled in four steps: decode (skipping `.valid`
//! and `.quarantine.*` messages, which the consumer is handed on
//! nats-server 2.9, see [`crate::layout`]); drop what ClickHouse already
//! holds under a lower stream sequence; insert the rest into `events`;
//! publish each new event on `billing.usage.<project>.valid` or its
//! verdicts on `.quarantine.<reason>`; only then acknowledge the messages.
//!
//! **Invariant:** a message is acknowledged only after its row is in
//! ClickHouse. A worker killed between the insert and the ack leaves the
//! message to be delivered again; its second insert carries the same
//! (source, id, seq) and `FINAL` reads count it once (see [`crate::ch`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{self, PullConsumer};
use async_nats::jetstream::{AckKind, Message};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tally_ledger::LedgerError;

use crate::ch::{ChError, lit};
use crate::keys;
use crate::ledger::{CONSUMER, Envelope, Inner, STREAM, storage};
use crate::measure;

/// How long a worker waits before asking again when nothing was pending.
const IDLE: Duration = Duration::from_millis(20);
/// How long to wait after ClickHouse refused a batch.
const RETRY: Duration = Duration::from_secs(1);
/// Longest a fetch may take: a pull request lost while the connection to
/// NATS was down is never answered, and would hold the worker forever.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

async fn consumer(inner: &Inner) -> Result<PullConsumer, String> {
    let stream = inner
        .js
        .get_stream(STREAM)
        .await
        .map_err(|e| format!("opening stream {STREAM}: {e}"))?;
    stream
        .get_or_create_consumer(
            CONSUMER,
            consumer::pull::Config {
                durable_name: Some(CONSUMER.into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: inner.config.ack_wait,
                max_ack_pending: 100_000,
                filter_subject: filter_subject(inner),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("creating consumer {CONSUMER}: {e}"))
}

/// The consumer's filter: `.ingest` where the server filters a wildcard
/// cheaply, else none (see [`crate::layout`]); workers skip what is not
/// `.ingest` either way.
fn filter_subject(inner: &Inner) -> String {
    if crate::layout::filters_cheaply(&inner.nats.server_info().version) {
        crate::layout::SUBJECTS[0].to_owned()
    } else {
        String::new()
    }
}

/// The shared consumer's state.
pub(crate) async fn consumer_info(inner: &Inner) -> Result<consumer::Info, LedgerError> {
    let stream = inner
        .js
        .get_stream(STREAM)
        .await
        .map_err(|e| storage(format!("opening stream {STREAM}: {e}")))?;
    stream
        .consumer_info(CONSUMER)
        .await
        .map_err(|e| storage(format!("reading consumer {CONSUMER}: {e}")))
}

/// Records how far the consumer got, for stats and the change feed.
pub(crate) fn record_progress(inner: &Inner, info: &consumer::Info) {
    let stats = &inner.stats;
    let pending = info.num_pending + info.num_ack_pending as u64;
    stats.pending.store(pending, Ordering::Relaxed);
    // Everything up to the ack floor is materialised; with nothing pending,
    // everything the consumer was handed is.
    let below = if pending == 0 {
        info.delivered.stream_sequence + 1
    } else {
        info.ack_floor.stream_sequence + 1
    };
    stats.materialised_below.fetch_max(below, Ordering::Relaxed);
}

/// Creates the consumer, starts the configured workers and the monitor.
pub(crate) async fn start(
    inner: &Arc<Inner>,
    stopped: &tokio::sync::watch::Receiver<bool>,
) -> Result<(), String> {
    consumer(inner).await?;
    for _ in 0..inner.config.workers {
        spawn_one(inner, stopped.clone()).await?;
    }
    tokio::spawn(monitor(Arc::clone(inner), stopped.clone()));
    Ok(())
}

/// Starts one worker.
pub(crate) async fn spawn_one(
    inner: &Arc<Inner>,
    stopped: tokio::sync::watch::Receiver<bool>,
) -> Result<(), String> {
    let consumer = consumer(inner).await?;
    tokio::spawn(run(Arc::clone(inner), consumer, stopped));
    Ok(())
}

/// Refreshes the lag figures every half second.
async fn monitor(inner: Arc<Inner>, mut stopped: tokio::sync::watch::Receiver<bool>) {
    let mut caught_up = Instant::now();
    loop {
        if let Ok(info) = consumer_info(&inner).await {
            record_progress(&inner, &info);
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                caught_up = Instant::now();
            }
            let lag = caught_up.elapsed().as_millis() as u64;
            inner.stats.lag_ms.store(lag, Ordering::Relaxed);
        }
        tokio::select! {
            _ = stopped.changed() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

async fn run(
    inner: Arc<Inner>,
    consumer: PullConsumer,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        if *stopped.borrow() {
            return;
        }
        let fetched = tokio::time::timeout(FETCH_TIMEOUT, fetch(&consumer, inner.config.batch))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {FETCH_TIMEOUT:?}")));
        let batch = match fetched {
            Ok(batch) => batch,
            Err(e) => {
                tracing::warn!(error = %e, "a worker could not fetch; retrying in a second");
                tokio::select! {
                    _ = stopped.changed() => return,
                    _ = tokio::time::sleep(RETRY) => continue,
                }
            }
        };
        if batch.is_empty() {
            tokio::select! {
                _ = stopped.changed() => return,
                _ = tokio::time::sleep(IDLE) => continue,
            }
        }
        if let Err(e) = materialise(&inner, &batch).await {
            if let BatchError::ClickHouse(e) = &e {
                inner.stats.insert_error("events", e);
            }
            tracing::warn!(error = %e, events = batch.len(), "materialising a batch failed; it will be delivered again");
            for message in &batch {
                let _ = message.ack_with(AckKind::Nak(Some(RETRY))).await;
            }
            tokio::time::sleep(RETRY).await;
        }
    }
}

async fn fetch(consumer: &PullConsumer, max: usize) -> Result<Vec<Message>, String> {
    let mut messages = consumer
        .fetch()
        .max_messages(max)
        .messages()
        .await
        .map_err(|e| e.to_string())?;
    let mut batch = Vec::new();
    while let Some(message) = messages.next().await {
        batch.push(message.map_err(|e| e.to_string())?);
    }
    Ok(batch)
}

/// A row of `events`, as inserted (layout in [`crate::ch`]).
#[derive(Serialize)]
struct EventRow<'a> {
    source: &'a str,
    id: &'a str,
    seq: u64,
    version: u64,
    project: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    subject: &'a str,
    time_ns: i64,
    ingested_ms: i64,
    event: String,
}

/// What a worker publishes on `.valid` for an event every meter measures.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ValidMessage<'a> {
    seq: u64,
    ingested_at: jiff::Timestamp,
    /// `None` when the message would not fit the server's `max_payload`
    /// ([`fitted`]); the event is at `seq` in the stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a tally_model::CloudEvent>,
}

/// What a worker publishes for a quarantined event.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct QuarantineMessage<'a> {
    seq: u64,
    meter: &'a str,
    reason: &'a str,
    message: &'a str,
    /// As [`ValidMessage::event`].
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a tally_model::CloudEvent>,
}

/// Longest verdict text a slimmed message carries.
const SLIM_MESSAGE: usize = 1_024;

/// `full` if a message of it and header `id` fits `max_payload`, else
/// `slim` (without the event): a verdict that cannot be published would be
/// delivered again forever and hold every worker behind it.
fn fitted(
    full: serde_json::Result<Vec<u8>>,
    slim: impl FnOnce() -> serde_json::Result<Vec<u8>>,
    id: &str,
    max_payload: usize,
) -> serde_json::Result<Vec<u8>> {
    let full = full?;
    if full.len() + id.len() + 256 <= max_payload {
        return Ok(full);
    }
    slim()
}

/// `text` cut to at most `max` bytes on a character boundary.
fn cut(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

struct Decoded {
    seq: u64,
    project: String,
    envelope: Envelope,
}

/// Why a batch was not materialised.
#[derive(Debug, thiserror::Error)]
enum BatchError {
    /// Counted on `/metrics` as a failed insert into `events`.
    #[error(transparent)]
    ClickHouse(#[from] ChError),
    #[error("{0}")]
    Nats(String),
}

/// Handles one batch (the module docs' four steps); acknowledges it only
/// when every step succeeded.
async fn materialise(inner: &Inner, batch: &[Message]) -> Result<(), BatchError> {
    let decoded = decode(batch).await;
    if !decoded.is_empty() {
        inner.ensure_schema().await?;
    }
    let earlier = earlier_copies(inner, &decoded).await?;
    let fresh: Vec<&Decoded> = decoded
        .iter()
        .filter(|d| {
            let key = (
                d.envelope.event.source.as_str(),
                d.envelope.event.id.as_str(),
            );
            earlier.get(&key).is_none_or(|seq| *seq >= d.seq)
        })
        .collect();
    insert(inner, &fresh).await?;
    publish_verdicts(inner, &fresh)
        .await
        .map_err(BatchError::Nats)?;
    for message in batch {
        message
            .ack()
            .await
            .map_err(|e| BatchError::Nats(format!("acknowledging: {e}")))?;
    }
    inner.stats.batches.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Decodes a batch; a message that is not an envelope (nothing Tally
/// published) is terminated so it is never delivered again.
async fn decode(batch: &[Message]) -> Vec<Decoded> {
    let mut out = Vec::with_capacity(batch.len());
    for message in batch {
        let Ok(info) = message.info() else { continue };
        let seq = info.stream_sequence;
        if !crate::layout::is_ingest(message.subject.as_str()) {
            continue; // `.valid` / `.quarantine.*`: acknowledged with the batch
        }
        let project = message
            .subject
            .as_str()
            .split('.')
            .nth(2)
            .unwrap_or_default()
            .to_owned();
        match serde_json::from_slice::<Envelope>(&message.payload) {
            Ok(envelope) => out.push(Decoded {
                seq,
                project,
                envelope,
            }),
            Err(e) => {
                tracing::warn!(seq, error = %e, "dropping a message that is no event envelope");
                let _ = message.ack_with(AckKind::Term).await;
            }
        }
    }
    out
}

/// The lowest stream sequence ClickHouse holds for each key of the batch.
async fn earlier_copies<'a>(
    inner: &Inner,
    decoded: &'a [Decoded],
) -> Result<HashMap<(&'a str, &'a str), u64>, ChError> {
    #[derive(Deserialize)]
    struct Found {
        source: String,
        id: String,
        seq: u64,
    }
    if decoded.is_empty() {
        return Ok(HashMap::new());
    }
    let list: Vec<String> = decoded
        .iter()
        .map(|d| {
            format!(
                "({},{})",
                lit(&d.envelope.event.source),
                lit(&d.envelope.event.id)
            )
        })
        .collect();
    let sql = format!(
        "SELECT source, id, min(seq) AS seq FROM {}.events WHERE (source, id) IN ({}) GROUP BY source, id",
        inner.ch.database,
        list.join(",")
    );
    let found: Vec<Found> = inner.ch.select(&sql).await?;
    let by_key: HashMap<String, &Decoded> = decoded
        .iter()
        .map(|d| {
            (
                keys::dedupe_key(&d.envelope.event.source, &d.envelope.event.id),
                d,
            )
        })
        .collect();
    let mut out = HashMap::new();
    for f in found {
        if let Some(d) = by_key.get(&keys::dedupe_key(&f.source, &f.id)) {
            let e = &d.envelope.event;
            out.insert((e.source.as_str(), e.id.as_str()), f.seq);
        }
    }
    // Within the batch, the first copy is the earlier one.
    for d in decoded {
        let key = (
            d.envelope.event.source.as_str(),
            d.envelope.event.id.as_str(),
        );
        let seq = out.entry(key).or_insert(d.seq);
        *seq = (*seq).min(d.seq);
    }
    Ok(out)
}

async fn insert(inner: &Inner, fresh: &[&Decoded]) -> Result<(), BatchError> {
    if fresh.is_empty() {
        return Ok(());
    }
    let mut body = Vec::with_capacity(fresh.len() * 512);
    for d in fresh {
        let e = &d.envelope.event;
        let row = EventRow {
            source: &e.source,
            id: &e.id,
            seq: d.seq,
            version: u64::MAX - d.seq,
            project: &d.project,
            kind: &e.kind,
            subject: &e.subject,
            time_ns: i64::try_from(e.time.as_nanosecond()).unwrap_or(i64::MAX),
            ingested_ms: d.envelope.ingested_at.as_millisecond(),
            event: serde_json::to_string(e).map_err(|e| ChError::Decode(e.to_string()))?,
        };
        serde_json::to_writer(&mut body, &row).map_err(|e| ChError::Decode(e.to_string()))?;
        body.push(b'\n');
    }
    inner
        .ch
        .insert("events", body)
        .await
        .map_err(BatchError::ClickHouse)
}

/// Publishes each new event on `.valid`, or on `.quarantine.<reason>` once
/// per meter that cannot measure it (ids in [`crate::layout`]).
async fn publish_verdicts(inner: &Inner, fresh: &[&Decoded]) -> Result<(), String> {
    let mut acks = Vec::new();
    for d in fresh {
        let event = &d.envelope.event;
        let key = keys::dedupe_key(&event.source, &event.id);
        let verdicts = {
            let catalog = inner.catalog();
            measure::verdicts(&catalog, event, d.envelope.ingested_at)
        };
        let max_payload = inner.nats.server_info().max_payload;
        let mut messages = Vec::new();
        if verdicts.is_empty() {
            let id = format!("v.{key}");
            let valid = |event| ValidMessage {
                seq: d.seq,
                ingested_at: d.envelope.ingested_at,
                event,
            };
            let payload = fitted(
                serde_json::to_vec(&valid(Some(event))),
                || serde_json::to_vec(&valid(None)),
                &id,
                max_payload,
            );
            messages.push((keys::valid_subject(&d.project), id, payload));
        }
        for v in verdicts {
            let id = format!("q.{}", keys::dedupe_key(&v.meter, &key));
            let quarantined = |message, event| QuarantineMessage {
                seq: d.seq,
                meter: &v.meter,
                reason: &v.reason,
                message,
                event,
            };
            let payload = fitted(
                serde_json::to_vec(&quarantined(&v.message, Some(event))),
                || serde_json::to_vec(&quarantined(cut(&v.message, SLIM_MESSAGE), None)),
                &id,
                max_payload,
            );
            messages.push((keys::quarantine_subject(&d.project, &v.reason), id, payload));
        }
        for (subject, id, payload) in messages {
            let payload = payload.map_err(|e| e.to_string())?;
            let publish = async_nats::jetstream::message::PublishMessage::build()
                .payload(Bytes::from(payload))
                .message_id(id);
            let ack = inner
                .js
                .send_publish(subject, publish)
                .await
                .map_err(|e| format!("publishing a verdict: {e}"))?;
            acks.push(ack);
        }
    }
    for ack in acks {
        ack.await
            .map_err(|e| format!("publishing a verdict: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verdict_too_large_for_the_server_goes_without_its_event() {
        let full = || Ok(vec![b'x'; 1_000]);
        let slim = || Ok(b"{}".to_vec());
        assert_eq!(fitted(full(), slim, "id", 2_000).unwrap().len(), 1_000);
        assert_eq!(fitted(full(), slim, "id", 1_200).unwrap(), b"{}");
        assert_eq!(
            fitted(full(), slim, &"i".repeat(800), 2_000).unwrap(),
            b"{}"
        );
    }

    #[test]
    fn cut_keeps_whole_characters() {
        assert_eq!(cut("héllo", 2), "h");
        assert_eq!(cut("héllo", 3), "hé");
        assert_eq!(cut("abc", 10), "abc");
    }
}
