//! A running sink: its queue, and the task that batches, sends, retries and
//! dead-letters.
//!
//! **Invariant:** a sink built with [`SinkBuilder::egress`] sends only
//! through its guard's client, and checks an IP-literal host against the
//! guard's policy before every request; a refused destination dead-letters
//! the batch at once (reason [`DESTINATION_REFUSED`]), with no retry.

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use reqwest::header::{CONTENT_ENCODING, HeaderValue, RETRY_AFTER};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::egress::{EgressGuard, EgressPolicy, refusal_in};
use crate::metrics::{ComponentKind, ComponentMetrics, Registry};
use crate::queue::{DeadLetter, EnqueueError, Entry, Queue, QueueError, now_ms};
use crate::retry::{backoff_ceiling, full_jitter, parse_retry_after};
use crate::{Answer, Encoder, HttpRequest, Item, SinkConfig, Verdict};

/// Bytes of an answer's body kept in a dead letter.
const DEAD_LETTER_BODY_BYTES: usize = 4096;
/// Bytes of an answer's body read for classification.
const ANSWER_BODY_BYTES: usize = 1 << 20;

/// The dead-letter reason of a batch whose destination the egress policy
/// refused (see [`SinkBuilder::egress`]).
pub const DESTINATION_REFUSED: &str = "destination refused";

/// Why a sink could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The queue could not be opened.
    #[error("opening the queue of sink {sink}: {source}")]
    Queue {
        /// The sink's id.
        sink: String,
        /// The failure.
        source: QueueError,
    },
    /// `start` was called outside a Tokio runtime.
    #[error("sink {sink} must be started inside a Tokio runtime")]
    NoRuntime {
        /// The sink's id.
        sink: String,
    },
    /// The default HTTP client could not be built.
    #[error("building the HTTP client of sink {sink}: {source}")]
    Client {
        /// The sink's id.
        sink: String,
        /// The failure.
        source: reqwest::Error,
    },
}

/// What became of one batch, told to the outcome hook once its fate is
/// durable (delivered and removed from the queue, or dead-lettered).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    /// The keys of the batch's items, in queue order.
    pub keys: Vec<Bytes>,
    /// What happened.
    pub result: BatchResult,
}

/// The fate of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchResult {
    /// The receiver acknowledged it; `rejected` items were refused by it.
    Delivered {
        /// Items the receiver refused (counted as dropped).
        rejected: u64,
    },
    /// It went to the dead-letter list.
    DeadLettered {
        /// The dead letter's id.
        id: u64,
        /// Why.
        reason: String,
    },
}

/// Called with every batch's outcome, on the sink's task: keep it quick. A
/// panic in it is caught, logged and counted (`errors_total{stage="outcome_hook"}`).
pub type OutcomeHook = Arc<dyn Fn(&BatchOutcome) + Send + Sync>;

/// One HTTP attempt at a batch, as told to the attempt hook: enough for a
/// caller to keep a health status (last error, retries) per sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptReport<'a> {
    /// Items in the batch.
    pub items: usize,
    /// Which attempt this was (1 for the first).
    pub attempt: u32,
    /// The answer's status; `None` for a transport error (refused, timeout).
    pub status: Option<u16>,
    /// What the answer meant.
    pub verdict: Verdict,
    /// Whether the batch will be tried again.
    pub will_retry: bool,
    /// The transport error (or the egress refusal), or the first 4 KiB of
    /// the answer's body.
    pub detail: &'a str,
}

/// Called after every attempt, on the sink's task: keep it quick. A panic in
/// it is caught, logged and counted (`errors_total{stage="attempt_hook"}`).
pub type AttemptHook = Arc<dyn Fn(&AttemptReport<'_>) + Send + Sync>;

/// What [`Sink::shutdown`] left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Items not delivered in the grace period.
    pub left_in_queue: u64,
    /// Whether those items are kept on disk for the next start (otherwise
    /// they were lost and counted as dropped with reason `shutdown`).
    pub kept_on_disk: bool,
}

/// Builds and starts a [`Sink`].
pub struct SinkBuilder<E: Encoder> {
    config: SinkConfig,
    encoder: E,
    client: Option<reqwest::Client>,
    egress: Option<EgressGuard>,
    registry: Option<Registry>,
    hook: Option<OutcomeHook>,
    attempt_hook: Option<AttemptHook>,
}

impl<E: Encoder> SinkBuilder<E> {
    /// Uses this HTTP client (build it with [`crate::client_builder`]);
    /// default: a client from [`crate::client_builder`]. For Tally's own
    /// endpoints only: a sink whose endpoint someone else chose uses
    /// [`SinkBuilder::egress`].
    pub fn client(mut self, client: reqwest::Client) -> Self {
        self.client = Some(client);
        self.egress = None;
        self
    }

    /// Sends through `guard` (its client, and its policy for IP-literal
    /// hosts), for an endpoint a customer chose: a refused destination
    /// dead-letters the batch without a retry. Replaces any [`Self::client`].
    pub fn egress(mut self, guard: EgressGuard) -> Self {
        self.client = None;
        self.egress = Some(guard);
        self
    }

    /// Reports metrics in this registry (default: a private one).
    pub fn registry(mut self, registry: &Registry) -> Self {
        self.registry = Some(registry.clone());
        self
    }

    /// Calls `hook` with the outcome of every batch.
    pub fn on_outcome(mut self, hook: impl Fn(&BatchOutcome) + Send + Sync + 'static) -> Self {
        self.hook = Some(Arc::new(hook));
        self
    }

    /// Calls `hook` after every HTTP attempt (delivered, retried or given up).
    pub fn on_attempt(mut self, hook: impl Fn(&AttemptReport<'_>) + Send + Sync + 'static) -> Self {
        self.attempt_hook = Some(Arc::new(hook));
        self
    }

    /// Opens the queue (a disk queue resumes what it held) and spawns the
    /// sink's task on the current Tokio runtime.
    pub fn start(self) -> Result<Sink, StartError> {
        let id = self.config.id.clone();
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| StartError::NoRuntime { sink: id.clone() })?;
        let queue = Queue::open(&self.config.queue).map_err(|source| StartError::Queue {
            sink: id.clone(),
            source,
        })?;
        let (client, egress) = match (self.client, self.egress) {
            (_, Some(guard)) => (guard.client().clone(), Some(guard.policy().clone())),
            (Some(client), None) => (client, None),
            (None, None) => crate::client_builder()
                .build()
                .map(|client| (client, None))
                .map_err(|source| StartError::Client {
                    sink: id.clone(),
                    source,
                })?,
        };
        let registry = self.registry.unwrap_or_default();
        let metrics = registry.component(ComponentKind::Sink, &id);
        metrics.set_queue_depth(queue.depth().0);
        let queue = Arc::new(queue);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let driver = Driver {
            queue: queue.clone(),
            metrics: metrics.clone(),
            encoder: self.encoder,
            client,
            egress,
            config: self.config,
            hook: self.hook,
            attempt_hook: self.attempt_hook,
            shutdown: shutdown_rx,
            draining: false,
            throttled_until: None,
        };
        let task = runtime.spawn(driver.run());
        Ok(Sink {
            id,
            queue,
            metrics,
            shutdown: shutdown_tx,
            task: Mutex::new(Some(task)),
        })
    }
}

/// A running sink. Items handed to it are batched, sent, retried and, failing
/// all that, dead-lettered, on its own task: a slow or dead endpoint never
/// slows another sink. Dropping it stops its task at once; call
/// [`Sink::shutdown`] to drain first.
pub struct Sink {
    id: String,
    queue: Arc<Queue>,
    metrics: Arc<ComponentMetrics>,
    shutdown: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("id", &self.id)
            .field("queue_depth", &self.queue_depth())
            .finish_non_exhaustive()
    }
}

/// Runs a queue operation, off the async threads when it touches the disk.
async fn on_queue<T: Send + 'static>(
    queue: &Arc<Queue>,
    op: impl FnOnce(&Queue) -> Result<T, QueueError> + Send + 'static,
) -> Result<T, QueueError> {
    if !queue.is_disk() {
        return op(queue);
    }
    let queue = queue.clone();
    tokio::task::spawn_blocking(move || op(&queue))
        .await
        .map_err(|e| QueueError::Corrupt(format!("queue task failed: {e}")))?
}

impl Sink {
    /// A builder for a sink that sends what `encoder` makes of each batch.
    pub fn builder<E: Encoder>(config: SinkConfig, encoder: E) -> SinkBuilder<E> {
        SinkBuilder {
            config,
            encoder,
            client: None,
            egress: None,
            registry: None,
            hook: None,
            attempt_hook: None,
        }
    }

    /// The sink's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The sink's metrics.
    pub fn metrics(&self) -> &Arc<ComponentMetrics> {
        &self.metrics
    }

    /// Items queued, the batch in flight included.
    pub fn queue_depth(&self) -> u64 {
        self.queue.depth().0
    }

    async fn push(&self, items: Vec<Item>, wait: bool) -> Result<(), EnqueueError> {
        self.push_marked(items, Vec::new(), wait).await
    }

    async fn push_marked(
        &self,
        items: Vec<Item>,
        marks: Vec<(Bytes, Bytes)>,
        wait: bool,
    ) -> Result<(), EnqueueError> {
        let count = items.len() as u64;
        let bytes = items.iter().map(|i| i.size() as u64).sum();
        self.queue.reserve(count, bytes, wait).await?;
        on_queue(&self.queue, move |queue| queue.append(items, None, marks)).await?;
        self.metrics.add_received(count);
        self.metrics.set_queue_depth(self.queue.depth().0);
        Ok(())
    }

    /// Queues an item, waiting while the queue is full (backpressure). With a
    /// durable disk queue, the item is on disk when this returns.
    pub async fn enqueue(&self, item: Item) -> Result<(), EnqueueError> {
        self.push(vec![item], true).await
    }

    /// Queues several items in one write (one fsync on a durable queue),
    /// waiting until there is room for all of them.
    pub async fn enqueue_all(&self, items: Vec<Item>) -> Result<(), EnqueueError> {
        if items.is_empty() {
            return Ok(());
        }
        self.push(items, true).await
    }

    /// Queues an item if there is room now. A refused item is counted in
    /// `tally_component_dropped_total{reason}` (the caller need not count it).
    pub async fn try_enqueue(&self, item: Item) -> Result<(), EnqueueError> {
        let result = self.push(vec![item], false).await;
        if let Err(e) = &result {
            self.metrics.add_dropped(e.reason(), 1);
        }
        result
    }

    /// Queues `items` (possibly none) if there is room for all of them now,
    /// and writes `marks` — the caller's own (key, value) pairs, such as how
    /// far a source has read — in the same atomic write: after a crash, the
    /// marks say exactly which items were queued. A refused call writes
    /// nothing and is counted like [`Sink::try_enqueue`]'s.
    pub async fn try_enqueue_marked(
        &self,
        items: Vec<Item>,
        marks: Vec<(Bytes, Bytes)>,
    ) -> Result<(), EnqueueError> {
        let count = items.len() as u64;
        let result = self.push_marked(items, marks, false).await;
        if let Err(e) = &result {
            self.metrics.add_dropped(e.reason(), count);
        }
        result
    }

    /// The value last written for mark `key` by [`Sink::try_enqueue_marked`].
    pub async fn mark(&self, key: Bytes) -> Result<Option<Bytes>, QueueError> {
        on_queue(&self.queue, move |queue| queue.mark(&key)).await
    }

    /// The dead-letter list, oldest first.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, QueueError> {
        on_queue(&self.queue, |queue| queue.dead_letters()).await
    }

    /// Moves a dead letter's items back to the end of the queue (if there is
    /// room now). False if there is no such dead letter.
    pub async fn requeue_dead_letter(&self, id: u64) -> Result<bool, EnqueueError> {
        let Some(letter) = on_queue(&self.queue, move |queue| queue.dead_letter(id)).await? else {
            return Ok(false);
        };
        let count = letter.items.len() as u64;
        let bytes = letter.items.iter().map(|i| i.size() as u64).sum();
        self.queue.reserve(count, bytes, false).await?;
        on_queue(&self.queue, move |queue| {
            queue.append(letter.items, Some(id), Vec::new())
        })
        .await?;
        self.metrics.set_queue_depth(self.queue.depth().0);
        Ok(true)
    }

    /// Deletes a dead letter. False if there is no such dead letter.
    pub async fn delete_dead_letter(&self, id: u64) -> Result<bool, QueueError> {
        on_queue(&self.queue, move |queue| queue.delete_dead_letter(id)).await
    }

    /// Refuses new items, sends what is queued for at most `grace`, then stops
    /// the task (a request in flight is abandoned; its batch stays queued).
    /// What a disk queue still holds is sent after the next start.
    pub async fn shutdown(&self, grace: Duration) -> ShutdownReport {
        self.queue.close();
        let _ = self.shutdown.send(true);
        let task = self
            .task
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(mut task) = task
            && tokio::time::timeout(grace, &mut task).await.is_err()
        {
            task.abort();
            let _ = task.await;
        }
        let left_in_queue = self.queue.depth().0;
        let kept_on_disk = self.queue.is_disk() && left_in_queue > 0;
        if !self.queue.is_disk() && left_in_queue > 0 {
            self.metrics.add_dropped("shutdown", left_in_queue);
        }
        tracing::info!(sink = %self.id, left_in_queue, kept_on_disk, "sink stopped");
        ShutdownReport {
            left_in_queue,
            kept_on_disk,
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let task = self
            .task
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(task) = task {
            task.abort();
        }
    }
}

/// The sink's task.
struct Driver<E> {
    queue: Arc<Queue>,
    metrics: Arc<ComponentMetrics>,
    encoder: E,
    client: reqwest::Client,
    /// The policy of an [`EgressGuard`]'s client, for IP-literal hosts.
    egress: Option<EgressPolicy>,
    config: SinkConfig,
    hook: Option<OutcomeHook>,
    attempt_hook: Option<AttemptHook>,
    shutdown: watch::Receiver<bool>,
    draining: bool,
    /// The end of the last `Retry-After` the endpoint asked for: no request
    /// of any batch leaves before it.
    throttled_until: Option<tokio::time::Instant>,
}

/// One attempt's result.
struct Attempt {
    verdict: Verdict,
    status: Option<u16>,
    /// The answer's body (first 4 KiB) or the transport error.
    detail: String,
    retry_after: Option<Duration>,
    /// The egress policy refused the destination; nothing was sent.
    refused: bool,
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    encoder.write_all(body)?;
    encoder.finish()
}

/// `text` without the values of `headers` marked sensitive (nor their
/// credentials without the scheme, as in `Bearer <token>`).
fn scrub_secrets(text: &str, headers: &reqwest::header::HeaderMap) -> String {
    let mut secrets: Vec<&str> = Vec::new();
    for value in headers.values().filter(|v| v.is_sensitive()) {
        if let Ok(value) = value.to_str() {
            secrets.push(value);
            if let Some((_, credentials)) = value.split_once(' ') {
                secrets.push(credentials.trim());
            }
        }
    }
    secrets.retain(|s| !s.is_empty());
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut text = text.to_owned();
    for secret in secrets {
        if text.contains(secret) {
            text = text.replace(secret, "[redacted]");
        }
    }
    text
}

/// The first `cap` bytes of an answer's body (the rest is not read): for
/// every reader of a remote answer, so none is read unbounded.
pub async fn read_capped(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = cap - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= cap {
            break;
        }
    }
    Ok(body)
}

impl<E: Encoder> Driver<E> {
    async fn run(mut self) {
        loop {
            self.draining = self.draining || *self.shutdown.borrow();
            match self.next_batch().await {
                Ok(Some(entries)) => self.deliver(entries).await,
                Ok(None) => {
                    if self.draining && self.queue.depth().0 == 0 {
                        return;
                    }
                }
                Err(e) => {
                    self.metrics.add_error("queue");
                    tracing::error!(sink = %self.config.id, error = %e, "reading the queue failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Waits for something to happen: an append, a deadline, or shutdown.
    async fn wait(&mut self, deadline: Option<Duration>) {
        let sleep = async {
            match deadline {
                Some(after) => tokio::time::sleep(after).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = self.queue.appended() => {}
            () = sleep => {}
            changed = self.shutdown.changed(), if !self.draining => {
                // A dropped handle means no more items: drain too.
                let _ = changed;
                self.draining = true;
            }
        }
    }

    /// The next batch to send, once it is full, old enough, or we drain.
    /// `None` after a wait, to look again.
    async fn next_batch(&mut self) -> Result<Option<Vec<Entry>>, QueueError> {
        let batch = &self.config.batch;
        let (items, bytes) = self.queue.depth();
        if items == 0 {
            if !self.draining {
                self.wait(None).await;
            }
            return Ok(None);
        }
        let full = items >= batch.max_items as u64 || bytes >= batch.max_bytes as u64;
        if !full && !self.draining {
            let Some(oldest) = on_queue(&self.queue, |queue| queue.oldest_ms()).await? else {
                // Room is reserved but the items are not written yet.
                self.wait(None).await;
                return Ok(None);
            };
            let age = Duration::from_millis(now_ms().saturating_sub(oldest));
            if age < batch.timeout {
                self.wait(Some(batch.timeout - age)).await;
                return Ok(None);
            }
        }
        let (max_items, max_bytes) = (batch.max_items.max(1), batch.max_bytes);
        let peeked = on_queue(&self.queue, move |queue| queue.peek(max_items, max_bytes)).await?;
        if peeked.entries.is_empty() {
            self.wait(None).await;
            return Ok(None);
        }
        Ok(Some(peeked.entries))
    }

    /// An attempt that never left: the egress policy refused its destination.
    fn refused(&self, refusal: &crate::EgressRefused) -> Attempt {
        self.metrics.add_error("egress");
        Attempt {
            verdict: Verdict::Permanent,
            status: None,
            detail: refusal.to_string(),
            retry_after: None,
            refused: true,
        }
    }

    async fn attempt(&self, request: &HttpRequest, body: &Bytes) -> Attempt {
        if let Some(policy) = &self.egress
            && let Err(refusal) = policy.check_url(&request.url)
        {
            return self.refused(&refusal);
        }
        let retry = &self.config.retry;
        let mut builder = self
            .client
            .request(request.method.clone(), request.url.clone())
            .headers(request.headers.clone())
            .timeout(retry.request_timeout)
            .body(body.clone());
        if request.gzip {
            builder = builder.header(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        let response = match builder.send().await {
            Ok(response) => response,
            Err(e) => {
                if let Some(refusal) = refusal_in(&e) {
                    return self.refused(refusal);
                }
                self.metrics.add_error("send");
                return Attempt {
                    verdict: Verdict::Retryable,
                    status: None,
                    detail: error_chain(&e.without_url()),
                    retry_after: None,
                    refused: false,
                };
            }
        };
        let status = response.status();
        let headers = response.headers().clone();
        let answer_body = match read_capped(response, ANSWER_BODY_BYTES).await {
            Ok(body) => body,
            Err(e) => {
                self.metrics.add_error("send");
                return Attempt {
                    verdict: Verdict::Retryable,
                    status: Some(status.as_u16()),
                    detail: error_chain(&e.without_url()),
                    retry_after: None,
                    refused: false,
                };
            }
        };
        let verdict = self.encoder.classify(&Answer {
            status,
            headers: &headers,
            body: &answer_body,
            retryable_statuses: &retry.retryable_statuses,
        });
        if !matches!(verdict, Verdict::Delivered { .. }) {
            self.metrics.add_error("response");
        }
        let retry_after = headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let shown = &answer_body[..answer_body.len().min(DEAD_LETTER_BODY_BYTES)];
        Attempt {
            verdict,
            status: Some(status.as_u16()),
            // A careless endpoint may echo credentials in its answer.
            detail: scrub_secrets(&String::from_utf8_lossy(shown), &request.headers),
            retry_after,
            refused: false,
        }
    }

    /// Waits out the endpoint's last `Retry-After`, whichever batch it
    /// answered.
    async fn wait_throttle(&mut self) {
        if let Some(until) = self.throttled_until.take()
            && until > tokio::time::Instant::now()
        {
            tracing::debug!(sink = %self.config.id, "throttled by Retry-After");
            tokio::time::sleep_until(until).await;
        }
    }

    async fn deliver(&mut self, entries: Vec<Entry>) {
        let items: Vec<Item> = entries.iter().map(|e| e.item.clone()).collect();
        let encoded = self.encoder.encode(&items).and_then(|request| {
            let body = if request.gzip {
                Bytes::from(
                    gzip(&request.body)
                        .map_err(|e| crate::EncodeError::new(format!("gzip: {e}")))?,
                )
            } else {
                request.body.clone()
            };
            Ok((request, body))
        });
        let (request, body) = match encoded {
            Ok(encoded) => encoded,
            Err(e) => {
                self.metrics.add_error("encode");
                let failure = Attempt {
                    verdict: Verdict::Permanent,
                    status: None,
                    detail: e.to_string(),
                    retry_after: None,
                    refused: false,
                };
                return self
                    .dead_letter(entries, items, "encoding failed", &failure, 0)
                    .await;
            }
        };
        let started = Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            self.wait_throttle().await;
            let attempt = self.attempt(&request, &body).await;
            let retry = &self.config.retry;
            let delay = match attempt.retry_after {
                Some(asked) if !matches!(attempt.verdict, Verdict::Delivered { .. }) => {
                    let asked = asked.min(retry.max_retry_after);
                    // The whole sink waits, not only this batch.
                    self.throttled_until = Some(tokio::time::Instant::now() + asked);
                    asked
                }
                _ => full_jitter(backoff_ceiling(retry, attempts)),
            };
            let give_up = if attempts >= retry.max_attempts.max(1) {
                "out of attempts"
            } else if retry
                .max_elapsed
                .is_some_and(|max| started.elapsed() + delay > max)
            {
                "out of time"
            } else {
                ""
            };
            let will_retry = attempt.verdict == Verdict::Retryable && give_up.is_empty();
            self.report_attempt(items.len(), attempts, &attempt, will_retry);
            match attempt.verdict {
                Verdict::Delivered { rejected } => {
                    return self.delivered(entries, rejected).await;
                }
                Verdict::Permanent => {
                    let reason = if attempt.refused {
                        DESTINATION_REFUSED
                    } else {
                        "permanent error"
                    };
                    return self
                        .dead_letter(entries, items, reason, &attempt, attempts)
                        .await;
                }
                Verdict::Retryable => {
                    if !will_retry {
                        return self
                            .dead_letter(entries, items, give_up, &attempt, attempts)
                            .await;
                    }
                    self.metrics.add_retry();
                    tracing::warn!(
                        sink = %self.config.id,
                        attempts,
                        status = ?attempt.status,
                        delay_ms = delay.as_millis() as u64,
                        detail = %attempt.detail,
                        "delivery failed; retrying"
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    fn report_attempt(&self, items: usize, attempt: u32, last: &Attempt, will_retry: bool) {
        if let Some(hook) = &self.attempt_hook {
            let report = AttemptReport {
                items,
                attempt,
                status: last.status,
                verdict: last.verdict,
                will_retry,
                detail: &last.detail,
            };
            let call = std::panic::AssertUnwindSafe(|| hook(&report));
            if std::panic::catch_unwind(call).is_err() {
                self.metrics.add_error("attempt_hook");
                tracing::error!(sink = %self.config.id, "the attempt hook panicked");
            }
        }
    }

    fn tell(&self, entries: &[Entry], result: BatchResult) {
        if let Some(hook) = &self.hook {
            let outcome = BatchOutcome {
                keys: entries.iter().map(|e| e.item.key.clone()).collect(),
                result,
            };
            let call = std::panic::AssertUnwindSafe(|| hook(&outcome));
            if std::panic::catch_unwind(call).is_err() {
                // The batch's fate is already durable; the sink goes on.
                self.metrics.add_error("outcome_hook");
                tracing::error!(sink = %self.config.id, "the outcome hook panicked");
            }
        }
    }

    async fn delivered(&self, entries: Vec<Entry>, rejected: u64) {
        let count = entries.len() as u64;
        let rejected = rejected.min(count);
        let entries = Arc::new(entries);
        let taken = entries.clone();
        if let Err(e) = on_queue(&self.queue, move |queue| queue.take(&taken, None)).await {
            // The batch stays queued and will be sent again: at least once.
            self.metrics.add_error("queue");
            tracing::error!(sink = %self.config.id, error = %e, "removing a delivered batch failed");
            tokio::time::sleep(Duration::from_secs(1)).await;
            return;
        }
        tracing::debug!(sink = %self.config.id, items = count, rejected, "batch delivered");
        self.metrics.add_sent(count - rejected);
        if rejected > 0 {
            self.metrics.add_dropped("rejected_by_receiver", rejected);
        }
        self.metrics.set_queue_depth(self.queue.depth().0);
        self.tell(&entries, BatchResult::Delivered { rejected });
    }

    async fn dead_letter(
        &self,
        entries: Vec<Entry>,
        items: Vec<Item>,
        reason: &str,
        last: &Attempt,
        attempts: u32,
    ) {
        let count = items.len() as u64;
        let letter = DeadLetter {
            id: 0,
            reason: reason.to_owned(),
            status: last.status,
            body: last.detail.clone(),
            attempts,
            at: jiff::Timestamp::now(),
            items,
        };
        let entries = Arc::new(entries);
        let taken = entries.clone();
        match on_queue(&self.queue, move |queue| queue.take(&taken, Some(letter))).await {
            Ok(id) => {
                let id = id.unwrap_or_default();
                self.metrics.add_dead_lettered(count);
                self.metrics.set_queue_depth(self.queue.depth().0);
                tracing::warn!(
                    sink = %self.config.id,
                    dead_letter = id,
                    items = count,
                    reason,
                    status = ?last.status,
                    attempts,
                    "batch dead-lettered"
                );
                self.tell(
                    &entries,
                    BatchResult::DeadLettered {
                        id,
                        reason: reason.to_owned(),
                    },
                );
            }
            Err(e) => {
                self.metrics.add_error("queue");
                tracing::error!(sink = %self.config.id, error = %e, "dead-lettering a batch failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
