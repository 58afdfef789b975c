//! One running (exporter, sink) as the rest of the pipeline sees it: the
//! state that outlives rebuilds ([`SinkShared`]: counters, health, headers
//! resolved from secrets), and the hand-off to the sink's task
//! ([`SinkRuntime`]), which never waits for in-stream shares.
//!
//! **Never:** put a secret value in a message ([`SinkShared::fail`] scrubs
//! every value the sink's headers carry).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use jiff::Timestamp;
use reqwest::header::HeaderName;
use serde::Serialize;
use tally_delivery::{ComponentMetrics, Secret};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::exporter::{Authentication, HeaderValueSource, SinkConfig};
use crate::secret::{SecretStore, Secrets, resolve_headers};
use crate::sync::{lock, read, write};

/// Why data points were dropped: the `reason` label of `dropped_total` and
/// the keys of [`SinkStatus::points_dropped`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DropReason {
    /// The sink's hand-off or queue was full.
    QueueFull,
    /// A secret the sink needs is missing.
    SecretMissing,
    /// The endpoint refused the points for good (partial success).
    RejectedByReceiver,
    /// The endpoint answered with a status that is not retried (4xx...).
    PermanentError,
    /// Every attempt failed with a retryable error.
    RetriesExhausted,
    /// The sink was stopped (removed, changed, shut down) before sending them.
    Shutdown,
    /// The sink could not start (e.g. its disk queue could not be opened).
    SinkNotStarted,
    /// The first point of a cumulative series: the baseline of delta conversion.
    DeltaBaseline,
    /// A batch could not be encoded.
    EncodeFailed,
    /// A batch larger than the queue could ever hold.
    TooLarge,
    /// The disk queue failed.
    StorageError,
    /// The egress policy refused the endpoint's address (loopback,
    /// private...): not sent, not retried.
    DestinationRefused,
}

impl DropReason {
    /// Every reason.
    pub const ALL: [DropReason; 12] = [
        DropReason::QueueFull,
        DropReason::SecretMissing,
        DropReason::RejectedByReceiver,
        DropReason::PermanentError,
        DropReason::RetriesExhausted,
        DropReason::Shutdown,
        DropReason::SinkNotStarted,
        DropReason::DeltaBaseline,
        DropReason::EncodeFailed,
        DropReason::TooLarge,
        DropReason::StorageError,
        DropReason::DestinationRefused,
    ];

    /// The snake_case label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::SecretMissing => "secret_missing",
            DropReason::RejectedByReceiver => "rejected_by_receiver",
            DropReason::PermanentError => "permanent_error",
            DropReason::RetriesExhausted => "retries_exhausted",
            DropReason::Shutdown => "shutdown",
            DropReason::SinkNotStarted => "sink_not_started",
            DropReason::DeltaBaseline => "delta_baseline",
            DropReason::EncodeFailed => "encode_failed",
            DropReason::TooLarge => "too_large",
            DropReason::StorageError => "storage_error",
            DropReason::DestinationRefused => "destination_refused",
        }
    }
}

/// Counters and health of one sink.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SinkStatus {
    pub name: String,
    /// Data points taken into the sink.
    pub points_received: u64,
    /// Data points the endpoint acknowledged.
    pub points_exported: u64,
    /// Data points sent again after a retryable failure (once per retry).
    pub points_retried: u64,
    /// Requests sent again.
    pub requests_retried: u64,
    /// Data points lost, by reason.
    pub points_dropped: BTreeMap<String, u64>,
    /// Data points waiting to be sent.
    pub points_queued: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_success_time: Option<Timestamp>,
    /// The last failure, free of secrets; cleared by the next clean export.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When `last_error` happened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error_time: Option<Timestamp>,
}

impl SinkStatus {
    /// The `SinkHealthy`/`Ready` message of a failing sink: its last error
    /// and when.
    pub(crate) fn failing_message(&self) -> String {
        match (&self.last_error, self.last_error_time) {
            (Some(error), Some(at)) => format!("last error at {at}: {error}"),
            _ => "last error: unknown".to_owned(),
        }
    }
}

/// Headers of a sink, resolved from secrets: ready, or why not.
pub(crate) type HeaderState = Result<Arc<Vec<(HeaderName, Secret)>>, String>;

/// State of one (exporter, sink) that outlives rebuilds of its sink: counters
/// in the registry, health, and the current headers.
pub(crate) struct SinkShared {
    pub(crate) metrics: Arc<ComponentMetrics>,
    pub(crate) headers: RwLock<HeaderState>,
    /// Secret values to scrub from messages.
    pub(crate) redact: RwLock<Vec<String>>,
    pub(crate) queued: AtomicI64,
    pub(crate) points_retried: AtomicU64,
    pub(crate) failing: AtomicBool,
    pub(crate) last_success: Mutex<Option<Timestamp>>,
    pub(crate) last_error: Mutex<Option<(String, Timestamp)>>,
    pub(crate) start_error: Mutex<Option<String>>,
}

impl SinkShared {
    pub(crate) fn new(metrics: Arc<ComponentMetrics>) -> Self {
        SinkShared {
            metrics,
            headers: RwLock::new(Err("not resolved yet".into())),
            redact: RwLock::new(Vec::new()),
            queued: AtomicI64::new(0),
            points_retried: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            last_success: Mutex::new(None),
            last_error: Mutex::new(None),
            start_error: Mutex::new(None),
        }
    }

    pub(crate) fn headers(&self) -> HeaderState {
        read(&self.headers).clone()
    }

    pub(crate) fn set_headers(&self, headers: HeaderState, redact: Vec<String>) {
        *write(&self.headers) = headers;
        *write(&self.redact) = redact;
    }

    /// `message` without any of the sink's secret values.
    pub(crate) fn scrub(&self, message: &str) -> String {
        let redact = read(&self.redact);
        let mut message = message.to_owned();
        for value in redact.iter() {
            if !value.is_empty() && message.contains(value.as_str()) {
                message = message.replace(value.as_str(), "[redacted]");
            }
        }
        message
    }

    pub(crate) fn queued_add(&self, points: i64) {
        let now = self.queued.fetch_add(points, Ordering::Relaxed) + points;
        self.metrics
            .set_queue_depth(u64::try_from(now).unwrap_or(0));
    }

    pub(crate) fn drop_points(&self, reason: DropReason, points: u64, was_queued: bool) {
        if points == 0 {
            return;
        }
        self.metrics.add_dropped(reason.as_str(), points);
        if was_queued {
            self.queued_add(-(points as i64));
        }
    }

    pub(crate) fn fail(&self, message: String) {
        let message = self.scrub(&message);
        tracing::debug!(sink = %self.metrics.id(), error = %message, "export failed");
        self.failing.store(true, Ordering::Relaxed);
        *lock(&self.last_error) = Some((message, Timestamp::now()));
    }

    /// A delivered batch; `clean` if the endpoint refused none of its points
    /// (a partial refusal stays the last error).
    pub(crate) fn succeed(&self, clean: bool) {
        self.failing.store(false, Ordering::Relaxed);
        if clean {
            *lock(&self.last_error) = None;
        }
        *lock(&self.last_success) = Some(Timestamp::now());
    }

    pub(crate) fn status(&self, name: &str) -> SinkStatus {
        let m = &self.metrics;
        let points_dropped = DropReason::ALL
            .iter()
            .filter_map(|r| {
                let n = m.dropped(r.as_str());
                (n > 0).then(|| (r.as_str().to_owned(), n))
            })
            .collect();
        let last_error = lock(&self.last_error).clone();
        SinkStatus {
            name: name.to_owned(),
            points_received: m.received(),
            points_exported: m.sent(),
            points_retried: self.points_retried.load(Ordering::Relaxed),
            requests_retried: m.retries(),
            points_dropped,
            points_queued: u64::try_from(self.queued.load(Ordering::Relaxed)).unwrap_or(0),
            last_success_time: *lock(&self.last_success),
            last_error_time: last_error.as_ref().map(|(_, at)| *at),
            last_error: last_error.map(|(message, _)| message),
        }
    }
}

/// One share of a request for one sink.
pub(crate) struct Fragment {
    pub(crate) bytes: Bytes,
    pub(crate) points: u64,
}

/// Why a sink did not take what a pull source handed it: nothing was
/// queued and its checkpoint did not move.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    /// More than the sink's queue could ever hold: pull a smaller window.
    #[error("{0}")]
    TooLarge(String),
    /// Anything else (full queue, missing secret, stopped sink...): try again later.
    #[error("{0}")]
    Other(String),
}

/// What a sink's task is asked to do.
pub(crate) enum Message {
    /// A share of an ingested request: batched with others.
    Share(Fragment),
    /// What a pull source read for this sink, with the first millisecond
    /// it has not read yet: queued (split as batches) together with that
    /// checkpoint, or refused whole.
    Pulled {
        source: String,
        fragment: Fragment,
        next_start_ms: i64,
        ack: oneshot::Sender<Result<(), Refusal>>,
    },
    /// How far this sink has taken a pull source (`None`: never).
    Cursor {
        source: String,
        reply: oneshot::Sender<Result<Option<i64>, Refusal>>,
    },
}

/// The key under which a sink's queue records a pull source's checkpoint.
pub(crate) fn mark_key(source: &str) -> Bytes {
    Bytes::from(format!("pull/{source}"))
}

/// A running (exporter, sink).
pub(crate) struct SinkRuntime {
    pub(crate) name: String,
    pub(crate) config: SinkConfig,
    pub(crate) shared: Arc<SinkShared>,
    pub(crate) tx: mpsc::Sender<Message>,
    pub(crate) task: Mutex<Option<JoinHandle<()>>>,
}

impl SinkRuntime {
    /// Hands a share to the sink's task without waiting; `None` if it was
    /// taken, else why its points were dropped.
    pub(crate) fn offer(&self, bytes: &Bytes, points: u64) -> Option<DropReason> {
        let shared = &self.shared;
        let refused = if self.shared.headers().is_err() {
            DropReason::SecretMissing
        } else {
            let fragment = Fragment {
                bytes: bytes.clone(),
                points,
            };
            match self.tx.try_send(Message::Share(fragment)) {
                Ok(()) => {
                    shared.metrics.add_received(points);
                    shared.queued_add(points as i64);
                    return None;
                }
                Err(mpsc::error::TrySendError::Full(_)) => DropReason::QueueFull,
                Err(mpsc::error::TrySendError::Closed(_)) => DropReason::Shutdown,
            }
        };
        shared.drop_points(refused, points, false);
        Some(refused)
    }

    pub(crate) async fn ask<T>(
        &self,
        message: impl FnOnce(oneshot::Sender<Result<T, Refusal>>) -> Message,
    ) -> Result<T, Refusal> {
        let stopped = || Refusal::Other(format!("sink {} is stopping", self.name));
        let (tx, rx) = oneshot::channel();
        self.tx.send(message(tx)).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Queues what pull source `source` read for this sink (possibly
    /// nothing) together with its new checkpoint `next_start_ms`; waits
    /// until both are written, or refused.
    pub(crate) async fn hand_pulled(
        &self,
        source: &str,
        bytes: Bytes,
        points: u64,
        next_start_ms: i64,
    ) -> Result<(), Refusal> {
        if let Err(missing) = self.shared.headers() {
            return Err(Refusal::Other(format!("sink {}: {missing}", self.name)));
        }
        self.ask(|ack| Message::Pulled {
            source: source.to_owned(),
            fragment: Fragment { bytes, points },
            next_start_ms,
            ack,
        })
        .await
    }

    /// The checkpoint of pull source `source` in this sink's queue.
    pub(crate) async fn pull_cursor(&self, source: &str) -> Result<Option<i64>, Refusal> {
        self.ask(|reply| Message::Cursor {
            source: source.to_owned(),
            reply,
        })
        .await
    }
}

/// A sink's headers (or why they cannot be made) and the secret values to
/// scrub from its messages.
pub(crate) fn resolve(
    config: &SinkConfig,
    namespace: &str,
    secrets: &Secrets,
) -> (HeaderState, Vec<String>) {
    let mut redact = Vec::new();
    let mut note = |name: &str, key: &str| {
        if let Some(v) = secrets.secret_value(namespace, name, key) {
            redact.push(v.expose().to_owned());
        }
    };
    match &config.authentication {
        Authentication::None => {}
        Authentication::BearerToken(r) => note(&r.name, &r.key),
        Authentication::Basic(name) => {
            note(name, "username");
            note(name, "password");
        }
    }
    for header in &config.headers {
        if let HeaderValueSource::Secret(r) = &header.value {
            note(&r.name, &r.key);
        }
    }
    let headers = match resolve_headers(config, namespace, secrets) {
        Ok(headers) => {
            let mut out = Vec::with_capacity(headers.len());
            let mut error = None;
            for h in headers {
                redact.push(h.value.expose().to_owned());
                match HeaderName::from_bytes(h.name.as_bytes()) {
                    Ok(name) => out.push((name, Secret::new(h.value.expose()))),
                    Err(_) => error = Some(format!("{:?} is not a valid header name", h.name)),
                }
            }
            match error {
                Some(e) => Err(e),
                None => Ok(Arc::new(out)),
            }
        }
        Err(missing) => Err(missing.to_string()),
    };
    // Longest first, so a value containing another is scrubbed whole.
    redact.sort_by_key(|v| std::cmp::Reverse(v.len()));
    (headers, redact)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_delivery::{ComponentKind, Registry};

    #[test]
    pub(crate) fn scrubbing_removes_every_secret_value() {
        let shared = SinkShared::new(Registry::new().component(ComponentKind::Sink, "x"));
        shared.set_headers(
            Err("none".into()),
            vec!["Bearer tok-123".into(), "tok-123".into()],
        );
        assert_eq!(
            shared.scrub("bad Bearer tok-123 and tok-123"),
            "bad [redacted] and [redacted]"
        );
    }
}
