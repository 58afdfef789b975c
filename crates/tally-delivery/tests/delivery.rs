//! The delivery machinery over real HTTP on loopback, against a receiver
//! with injected faults.

use tally_testkit::line_receiver as support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{Fault, Lines, Receiver, Seen, closed_port_url, item};
use tally_delivery::{
    Answer, BatchOutcome, BatchResult, EncodeError, Encoder, EnqueueError, HttpRequest, Item,
    Registry, Sink, SinkBuilder, SinkConfig, Storage, Verdict,
};

const LIMIT: Duration = Duration::from_secs(20);

/// A config with quick retries and short timeouts.
fn quick(id: &str) -> SinkConfig {
    let mut config = SinkConfig::new(id);
    config.batch.max_items = 20;
    config.batch.timeout = Duration::from_millis(20);
    config.retry.initial_backoff = Duration::from_millis(5);
    config.retry.max_backoff = Duration::from_millis(50);
    config.retry.request_timeout = Duration::from_millis(300);
    config.retry.max_attempts = 100;
    config
}

fn on_disk(mut config: SinkConfig, dir: &tempfile::TempDir) -> SinkConfig {
    config.queue.storage = Storage::Disk {
        path: dir.path().join(&config.id),
        sync: true,
    };
    config
}

/// Collects every outcome the sink reports.
fn outcomes() -> (
    Arc<Mutex<Vec<BatchOutcome>>>,
    impl Fn(&BatchOutcome) + Send + Sync + 'static,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink_side = seen.clone();
    (seen, move |o: &BatchOutcome| {
        sink_side.lock().unwrap().push(o.clone())
    })
}

/// Starts a sink and queues items `0..n` of `len` bytes in one write.
async fn start_with_items<E: Encoder>(builder: SinkBuilder<E>, n: usize, len: usize) -> Sink {
    let sink = builder.start().unwrap();
    sink.enqueue_all((0..n).map(|i| item(i, len)).collect())
        .await
        .unwrap();
    sink
}

/// Waits until the sink has dead letters, and returns them.
async fn wait_for_dead_letters(sink: &Sink) -> Vec<tally_delivery::DeadLetter> {
    let start = Instant::now();
    loop {
        let letters = sink.dead_letters().await.unwrap();
        if !letters.is_empty() {
            return letters;
        }
        assert!(start.elapsed() < LIMIT, "no dead letter in {LIMIT:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn exactly_once_through_faults(config: SinkConfig) {
    let receiver = Receiver::start().await;
    receiver.push_faults([
        Fault::status(429),
        Fault::status(503),
        Fault::Hang(Duration::from_secs(2)),
        Fault::status(502),
        Fault::status(504),
        Fault::Hang(Duration::from_secs(2)),
    ]);
    receiver.fail_every(7);
    let registry = Registry::new();
    let (seen, hook) = outcomes();
    let sink = Arc::new(
        Sink::builder(config, Lines::new(receiver.url()))
            .registry(&registry)
            .on_outcome(hook)
            .start()
            .unwrap(),
    );
    let n = 400;
    let mut producers = Vec::new();
    for p in 0..4 {
        let sink = sink.clone();
        producers.push(tokio::spawn(async move {
            for i in (p..n).step_by(4) {
                sink.enqueue(item(i, 30)).await.unwrap();
            }
        }));
    }
    for producer in producers {
        producer.await.unwrap();
    }
    receiver.wait_for_unique(n, LIMIT).await;
    let report = sink.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.left_in_queue, 0);

    let expected: HashSet<String> = (0..n).map(|i| format!("k{i}")).collect();
    assert_eq!(receiver.unique(), expected);
    assert!(receiver.raw_items() >= n as u64);
    // The hook saw every key delivered exactly once.
    let outcomes = seen.lock().unwrap();
    let mut delivered: Vec<Vec<u8>> = Vec::new();
    for outcome in outcomes.iter() {
        assert_eq!(outcome.result, BatchResult::Delivered { rejected: 0 });
        delivered.extend(outcome.keys.iter().map(|k| k.to_vec()));
    }
    assert_eq!(delivered.len(), n);
    let metrics = registry.component(tally_delivery::ComponentKind::Sink, sink.id());
    assert_eq!(metrics.received(), n as u64);
    assert_eq!(metrics.sent(), n as u64);
    assert!(metrics.retries() >= 6, "retries {}", metrics.retries());
    assert!(metrics.errors("send") >= 2, "timeouts are send errors");
    assert_eq!(metrics.queue_depth(), 0);
    assert_eq!(metrics.dead_lettered(), 0);
}

#[tokio::test]
async fn memory_queue_delivers_every_item_exactly_once_through_faults() {
    exactly_once_through_faults(quick("memory")).await;
}

#[tokio::test]
async fn disk_queue_delivers_every_item_exactly_once_through_faults() {
    let dir = tempfile::tempdir().unwrap();
    exactly_once_through_faults(on_disk(quick("disk"), &dir)).await;
}

#[tokio::test]
async fn batches_respect_item_and_byte_limits() {
    let receiver = Receiver::start().await;
    let mut config = quick("limits");
    config.batch.max_items = 7;
    config.batch.max_bytes = 200;
    config.batch.timeout = Duration::from_millis(50);
    let sink = Sink::builder(config, Lines::new(receiver.url()))
        .start()
        .unwrap();
    // Runs of small items close batches on count, runs of large ones on
    // bytes; one item bigger than max_bytes goes alone.
    let items: Vec<Item> = (0..300)
        .map(|i| {
            item(
                i,
                if i == 150 {
                    500
                } else if i % 20 < 10 {
                    5
                } else {
                    70
                },
            )
        })
        .collect();
    for chunk in items.chunks(50) {
        sink.enqueue_all(chunk.to_vec()).await.unwrap();
    }
    receiver.wait_for_unique(300, LIMIT).await;
    let seen = receiver.seen();
    let mut all = Vec::new();
    for request in &seen {
        assert!(request.keys.len() <= 7, "{} items", request.keys.len());
        assert!(
            request.item_bytes <= 200 || request.keys.len() == 1,
            "{} bytes in {} items",
            request.item_bytes,
            request.keys.len()
        );
        all.extend(request.keys.iter().cloned());
    }
    // Order is kept, nothing is sent twice without a failure.
    let expected: Vec<String> = (0..300).map(|i| format!("k{i}")).collect();
    assert_eq!(all, expected);
    assert!(
        seen.iter()
            .any(|r| r.item_bytes > 200 && r.keys == ["k150"])
    );
    assert!(
        seen.iter().any(|r| r.keys.len() == 7),
        "some batches full by count"
    );
    assert!(
        seen.iter().any(|r| r.keys.len() < 7 && r.item_bytes > 150),
        "some by bytes"
    );
}

#[tokio::test]
async fn a_partial_batch_waits_for_its_timeout() {
    let receiver = Receiver::start().await;
    let mut config = quick("timeout");
    config.batch.max_items = 100;
    config.batch.timeout = Duration::from_millis(400);
    let sink = Sink::builder(config, Lines::new(receiver.url()))
        .start()
        .unwrap();
    let start = Instant::now();
    sink.enqueue(item(0, 10)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    sink.enqueue(item(1, 10)).await.unwrap();
    sink.enqueue(item(2, 10)).await.unwrap();
    receiver.wait_for_unique(3, LIMIT).await;
    let seen = receiver.seen();
    assert_eq!(seen.len(), 1, "one batch of three");
    let waited = seen[0].at - start;
    assert!(
        waited >= Duration::from_millis(390),
        "sent after {waited:?}"
    );
    assert!(
        waited < Duration::from_millis(1500),
        "sent after {waited:?}"
    );
}

/// The gap between the first two requests the receiver saw.
async fn gap_after(fault: Fault, max_retry_after: Duration) -> Duration {
    let seen = seen_after(fault, max_retry_after).await;
    seen[1].at - seen[0].at
}

/// The two requests the receiver saw: the faulted one and its retry.
async fn seen_after(fault: Fault, max_retry_after: Duration) -> Vec<Seen> {
    let receiver = Receiver::start().await;
    receiver.push_faults([fault]);
    let mut config = quick("retry-after");
    config.retry.max_retry_after = max_retry_after;
    let sink = Sink::builder(config, Lines::new(receiver.url()))
        .start()
        .unwrap();
    sink.enqueue(item(0, 10)).await.unwrap();
    receiver.wait_for_unique(1, LIMIT).await;
    let seen = receiver.seen();
    assert_eq!(seen.len(), 2);
    seen
}

#[tokio::test]
async fn retry_after_is_honoured_in_both_forms_and_capped() {
    let seconds = gap_after(Fault::retry_after(429, "1"), Duration::from_secs(60)).await;
    assert!(seconds >= Duration::from_millis(1000), "{seconds:?}");
    assert!(seconds < Duration::from_millis(2500), "{seconds:?}");

    // An HTTP-date about 3 s ahead (whole seconds): the retry comes no
    // earlier than that date by the wall clock, and not long after it.
    let wall = std::time::SystemTime::now();
    let base = Instant::now();
    let at = httpdate::fmt_http_date(wall + Duration::from_secs(3));
    let date = httpdate::parse_http_date(&at).unwrap();
    let seen = seen_after(Fault::retry_after(503, &at), Duration::from_secs(60)).await;
    let retried = wall + (seen[1].at - base);
    // Instant and SystemTime are read a moment apart: allow 20 ms.
    let early = date.duration_since(retried).unwrap_or(Duration::ZERO);
    assert!(early < Duration::from_millis(20), "retried {early:?} early");
    let late = retried.duration_since(date).unwrap_or(Duration::ZERO);
    assert!(late < Duration::from_millis(1500), "retried {late:?} late");

    let capped = gap_after(Fault::retry_after(429, "3600"), Duration::from_millis(300)).await;
    assert!(capped >= Duration::from_millis(300), "{capped:?}");
    assert!(capped < Duration::from_millis(1500), "{capped:?}");

    // Without Retry-After the backoff (≤ 50 ms here, where any Retry-After
    // is at least 1 s) applies.
    let backoff = gap_after(Fault::status(429), Duration::from_secs(60)).await;
    assert!(backoff < Duration::from_millis(900), "{backoff:?}");
}

#[tokio::test]
async fn retry_after_throttles_the_next_batch_too() {
    // One attempt per batch: the 429's batch is given up at once, and the
    // next batch still waits out the Retry-After the endpoint asked for.
    let receiver = Receiver::start().await;
    receiver.push_faults([Fault::retry_after(429, "1")]);
    let mut config = quick("throttle");
    config.batch.max_items = 1;
    config.retry.max_attempts = 1;
    let sink = start_with_items(Sink::builder(config, Lines::new(receiver.url())), 2, 10).await;
    receiver.wait_for_unique(1, LIMIT).await;
    let seen = receiver.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].status, 429);
    let gap = seen[1].at - seen[0].at;
    assert!(gap >= Duration::from_millis(1000), "{gap:?}");
    assert!(gap < Duration::from_millis(2500), "{gap:?}");
    assert_eq!(wait_for_dead_letters(&sink).await.len(), 1);

    // Without Retry-After, the next batch does not wait for the backoff.
    let receiver = Receiver::start().await;
    receiver.push_faults([Fault::status(429)]);
    let mut config = quick("no-throttle");
    config.batch.max_items = 1;
    config.retry.max_attempts = 1;
    config.retry.initial_backoff = Duration::from_secs(5);
    config.retry.max_backoff = Duration::from_secs(5);
    let _sink = start_with_items(Sink::builder(config, Lines::new(receiver.url())), 2, 10).await;
    receiver.wait_for_unique(1, LIMIT).await;
    let seen = receiver.seen();
    let gap = seen[1].at - seen[0].at;
    assert!(gap < Duration::from_millis(900), "{gap:?}");
}

#[tokio::test]
async fn a_request_timeout_is_retried_and_configurable() {
    let receiver = Receiver::start().await;
    receiver.push_faults([Fault::Hang(Duration::from_secs(3))]);
    let mut config = quick("timeout");
    config.retry.request_timeout = Duration::from_millis(200);
    let started = Instant::now();
    let _sink = start_with_items(Sink::builder(config, Lines::new(receiver.url())), 1, 10).await;
    receiver.wait_for_unique(1, LIMIT).await;
    // The hung request was abandoned after 200 ms and retried, well before
    // the receiver would have answered it.
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn permanent_errors_dead_letter_and_do_not_block_later_batches() {
    let receiver = Receiver::start().await;
    receiver.push_faults([Fault::with_body(400, &"bad event ".repeat(1000))]);
    let mut config = quick("permanent");
    config.batch.max_items = 2;
    let (seen, hook) = outcomes();
    let sink = start_with_items(
        Sink::builder(config, Lines::new(receiver.url())).on_outcome(hook),
        10,
        5,
    )
    .await;
    receiver.wait_for_unique(8, LIMIT).await;

    let letters = sink.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.reason, "permanent error");
    assert_eq!(letter.status, Some(400));
    assert_eq!(letter.attempts, 1);
    assert_eq!(letter.body.len(), 4096, "the first 4 KiB of the answer");
    assert!(letter.body.starts_with("bad event"));
    let keys: Vec<&[u8]> = letter.items.iter().map(|i| i.key.as_ref()).collect();
    assert_eq!(keys, [b"k0".as_ref(), b"k1".as_ref()]);
    assert!(!receiver.unique().contains("k0"));
    assert!(seen.lock().unwrap().iter().any(|o| matches!(
        &o.result,
        BatchResult::DeadLettered { reason, .. } if reason == "permanent error"
    ) && o.keys.len() == 2));

    // Re-queued, it is delivered; then the list is empty.
    assert!(sink.requeue_dead_letter(letter.id).await.unwrap());
    receiver.wait_for_unique(10, LIMIT).await;
    assert!(sink.dead_letters().await.unwrap().is_empty());
    assert!(!sink.requeue_dead_letter(letter.id).await.unwrap());
    assert_eq!(sink.metrics().dead_lettered(), 2);
}

#[tokio::test]
async fn out_of_attempts_dead_letters_and_delete_removes() {
    let receiver = Receiver::start().await;
    receiver.set_always(Some(Fault::status(503)));
    let dir = tempfile::tempdir().unwrap();
    let mut config = on_disk(quick("attempts"), &dir);
    config.retry.max_attempts = 3;
    let sink = Sink::builder(config.clone(), Lines::new(receiver.url()))
        .start()
        .unwrap();
    sink.enqueue(item(0, 5)).await.unwrap();
    wait_for_dead_letters(&sink).await;
    assert_eq!(receiver.seen().len(), 3);
    sink.shutdown(Duration::from_secs(1)).await;
    drop(sink);

    // Dead letters are on disk: they are there after a restart.
    let sink = Sink::builder(config, Lines::new(receiver.url()))
        .start()
        .unwrap();
    let letters = sink.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(
        (
            letters[0].reason.as_str(),
            letters[0].status,
            letters[0].attempts
        ),
        ("out of attempts", Some(503), 3)
    );
    assert!(sink.delete_dead_letter(letters[0].id).await.unwrap());
    assert!(!sink.delete_dead_letter(letters[0].id).await.unwrap());
    assert!(sink.dead_letters().await.unwrap().is_empty());
}

#[tokio::test]
async fn out_of_time_dead_letters_after_max_elapsed() {
    let receiver = Receiver::start().await;
    receiver.set_always(Some(Fault::retry_after(503, "1")));
    let mut config = quick("elapsed");
    config.retry.max_elapsed = Some(Duration::from_millis(2500));
    let sink = Sink::builder(config, Lines::new(receiver.url()))
        .start()
        .unwrap();
    let start = Instant::now();
    sink.enqueue(item(0, 5)).await.unwrap();
    let letters = wait_for_dead_letters(&sink).await;
    // Attempts at 0 s, 1 s and 2 s; a third wait would pass 2.5 s, so the
    // letter is written at about 2 s, never as late as a fourth attempt (3 s).
    assert_eq!(
        (letters[0].reason.as_str(), letters[0].attempts),
        ("out of time", 3)
    );
    assert!(
        start.elapsed() < Duration::from_millis(2900),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn a_dead_sink_does_not_slow_a_healthy_one() {
    let healthy = Receiver::start().await;
    let hanging = Receiver::start().await;
    hanging.set_always(Some(Fault::Hang(Duration::from_secs(60))));
    let mut slow = quick("hanging");
    slow.retry.request_timeout = Duration::from_secs(30);
    let mut refused = quick("closed");
    refused.retry.max_attempts = u32::MAX;
    let sinks = [
        Sink::builder(slow, Lines::new(hanging.url()))
            .start()
            .unwrap(),
        Sink::builder(refused, Lines::new(closed_port_url()))
            .start()
            .unwrap(),
    ];
    let good = Sink::builder(quick("healthy"), Lines::new(healthy.url()))
        .start()
        .unwrap();
    let start = Instant::now();
    for i in 0..500 {
        for sink in &sinks {
            sink.enqueue(item(i, 20)).await.unwrap();
        }
        good.enqueue(item(i, 20)).await.unwrap();
    }
    healthy.wait_for_unique(500, LIMIT).await;
    // Coupled to the hanging sink, this would take at least its 30 s timeout.
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(sinks[0].queue_depth(), 500);
    assert_eq!(sinks[1].queue_depth(), 500);
    let shutdown_started = Instant::now();
    let report = sinks[0].shutdown(Duration::from_millis(200)).await;
    assert!(
        shutdown_started.elapsed() < Duration::from_secs(2),
        "shutdown is prompt"
    );
    assert_eq!(report.left_in_queue, 500);
    assert!(!report.kept_on_disk);
    assert_eq!(sinks[0].metrics().dropped("shutdown"), 500);
}

#[tokio::test]
async fn a_full_queue_refuses_try_enqueue_and_makes_enqueue_wait() {
    let receiver = Receiver::start().await;
    receiver.set_always(Some(Fault::status(503)));
    let mut config = quick("full");
    config.queue.max_items = 5;
    config.queue.max_bytes = 1000;
    let sink = Arc::new(
        Sink::builder(config, Lines::new(receiver.url()))
            .start()
            .unwrap(),
    );
    for i in 0..5 {
        sink.try_enqueue(item(i, 5)).await.unwrap();
    }
    let refused = sink.try_enqueue(item(5, 5)).await.unwrap_err();
    assert!(
        matches!(refused, EnqueueError::Full { items: 5, .. }),
        "{refused}"
    );
    assert_eq!(sink.metrics().dropped("queue_full"), 1);
    let too_big = sink.try_enqueue(item(6, 2000)).await.unwrap_err();
    assert_eq!(too_big.reason(), "too_large");

    let waiting = tokio::spawn({
        let sink = sink.clone();
        async move { sink.enqueue(item(7, 5)).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiting.is_finished(),
        "enqueue waits while the queue is full"
    );
    receiver.set_always(None);
    tokio::time::timeout(LIMIT, waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    receiver.wait_for_unique(6, LIMIT).await;
    sink.shutdown(Duration::from_secs(1)).await;
    let closed = sink.enqueue(item(8, 5)).await.unwrap_err();
    assert!(matches!(closed, EnqueueError::Closed));
}

#[tokio::test]
async fn shutdown_keeps_a_disk_queue_for_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = on_disk(quick("resume"), &dir);
    let sink = start_with_items(
        Sink::builder(config.clone(), Lines::new(closed_port_url())),
        50,
        10,
    )
    .await;
    let report = sink.shutdown(Duration::from_millis(100)).await;
    assert_eq!(report.left_in_queue, 50);
    assert!(report.kept_on_disk);
    drop(sink);

    let receiver = Receiver::start().await;
    let sink = Sink::builder(config, Lines::new(receiver.url()))
        .start()
        .unwrap();
    assert_eq!(sink.queue_depth(), 50);
    receiver.wait_for_unique(50, LIMIT).await;
    let report = sink.shutdown(Duration::from_secs(2)).await;
    assert_eq!(report.left_in_queue, 0);
}

#[tokio::test]
async fn marks_are_written_with_their_items_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = on_disk(quick("marks"), &dir);
    config.queue.max_items = 3;
    let mark = |v: &str| {
        vec![(
            bytes::Bytes::from_static(b"pull/a"),
            bytes::Bytes::from(v.to_owned()),
        )]
    };
    let sink = Sink::builder(config.clone(), Lines::new(closed_port_url()))
        .start()
        .unwrap();
    assert_eq!(sink.mark("pull/a".into()).await.unwrap(), None);
    // Marks alone, then marks with items.
    sink.try_enqueue_marked(vec![], mark("1")).await.unwrap();
    sink.try_enqueue_marked(vec![item(0, 5), item(1, 5)], mark("2"))
        .await
        .unwrap();
    // Refused whole: neither the items nor the mark are written.
    let refused = sink
        .try_enqueue_marked(vec![item(2, 5), item(3, 5)], mark("3"))
        .await
        .unwrap_err();
    assert_eq!(refused.reason(), "queue_full");
    assert_eq!(sink.metrics().dropped("queue_full"), 2);
    assert_eq!(sink.queue_depth(), 2);
    assert_eq!(
        sink.mark("pull/a".into()).await.unwrap().as_deref(),
        Some(&b"2"[..])
    );
    sink.shutdown(Duration::from_millis(50)).await;
    drop(sink);

    // The next start has both back.
    let receiver = Receiver::start().await;
    let sink = Sink::builder(config, Lines::new(receiver.url()))
        .start()
        .unwrap();
    assert_eq!(sink.queue_depth(), 2);
    assert_eq!(
        sink.mark("pull/a".into()).await.unwrap().as_deref(),
        Some(&b"2"[..])
    );
    receiver.wait_for_unique(2, LIMIT).await;
    sink.shutdown(Duration::from_secs(2)).await;

    // A memory queue keeps marks for its own life.
    let sink = Sink::builder(quick("memory-marks"), Lines::new(closed_port_url()))
        .start()
        .unwrap();
    sink.try_enqueue_marked(vec![item(0, 5)], mark("m"))
        .await
        .unwrap();
    assert_eq!(
        sink.mark("pull/a".into()).await.unwrap().as_deref(),
        Some(&b"m"[..])
    );
}

#[tokio::test]
async fn shutdown_drains_a_memory_queue_within_its_grace() {
    let receiver = Receiver::start().await;
    let mut config = quick("drain");
    config.batch.timeout = Duration::from_secs(3600);
    let sink = start_with_items(Sink::builder(config, Lines::new(receiver.url())), 5, 10).await;
    let report = sink.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.left_in_queue, 0);
    assert_eq!(receiver.unique_count(), 5, "the partial batch was flushed");
}

#[tokio::test]
async fn gzip_bodies_arrive_compressed() {
    let receiver = Receiver::start().await;
    let mut encoder = Lines::new(receiver.url());
    encoder.gzip = true;
    let sink = Sink::builder(quick("gzip"), encoder).start().unwrap();
    sink.enqueue_all((0..20).map(|i| item(i, 100)).collect())
        .await
        .unwrap();
    receiver.wait_for_unique(20, LIMIT).await;
    assert!(receiver.seen().iter().all(|r| r.gzip));
}

/// An encoder whose receiver reports rejected items in a header, like OTLP
/// partial success, and that retries every 5xx.
struct PartialSuccess(Lines);

impl Encoder for PartialSuccess {
    fn encode(&self, items: &[Item]) -> Result<HttpRequest, EncodeError> {
        self.0.encode(items)
    }

    fn classify(&self, answer: &Answer<'_>) -> Verdict {
        match answer.default_verdict() {
            Verdict::Delivered { .. } => Verdict::Delivered {
                rejected: std::str::from_utf8(answer.body)
                    .ok()
                    .and_then(|b| b.strip_prefix("rejected="))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0),
            },
            other => other,
        }
    }
}

#[tokio::test]
async fn a_sink_classifies_partial_success_and_its_own_retryable_set() {
    let receiver = Receiver::start().await;
    receiver.push_faults([Fault::status(500), Fault::with_body(200, "rejected=2")]);
    let mut config = quick("partial");
    config.retry = config.retry.retry_all_5xx();
    config.batch.max_items = 5;
    let (seen, hook) = outcomes();
    let sink = start_with_items(
        Sink::builder(config, PartialSuccess(Lines::new(receiver.url()))).on_outcome(hook),
        5,
        5,
    )
    .await;
    let start = Instant::now();
    while seen.lock().unwrap().is_empty() {
        assert!(start.elapsed() < LIMIT);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let outcome = seen.lock().unwrap()[0].clone();
    assert_eq!(outcome.result, BatchResult::Delivered { rejected: 2 });
    assert_eq!(outcome.keys.len(), 5);
    assert_eq!(sink.metrics().sent(), 3);
    assert_eq!(sink.metrics().dropped("rejected_by_receiver"), 2);
    assert_eq!(sink.metrics().retries(), 1, "500 was retried");
}

#[test]
fn starting_outside_a_runtime_is_an_error() {
    let url = closed_port_url();
    let err = Sink::builder(SinkConfig::new("no-runtime"), Lines::new(url))
        .start()
        .unwrap_err();
    assert!(
        matches!(err, tally_delivery::StartError::NoRuntime { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn a_panicking_outcome_hook_does_not_stop_the_sink() {
    let receiver = Receiver::start().await;
    let mut config = quick("hook-panic");
    config.batch.max_items = 1;
    let sink = Sink::builder(config, Lines::new(receiver.url()))
        .on_outcome(|_| panic!("hook bug"))
        .start()
        .unwrap();
    sink.enqueue_all((0..3).map(|i| item(i, 5)).collect())
        .await
        .unwrap();
    receiver.wait_for_unique(3, LIMIT).await;
    let report = sink.shutdown(Duration::from_secs(2)).await;
    assert_eq!(report.left_in_queue, 0);
    assert_eq!(sink.metrics().errors("outcome_hook"), 3);
}
