//! The JetStream layout: one stream `billing-usage` holding three kinds of
//! subjects, the dedupe bucket, and the migration from the older layout.
//!
//! | subject | published by | payload |
//! |---|---|---|
//! | `billing.usage.<project>.ingest` | ingest nodes, `Nats-Msg-Id` = dedupe key | [`crate::ledger::Envelope`] |
//! | `billing.usage.<project>.valid` | workers, `Nats-Msg-Id` = `v.<dedupe key>` | `{seq, ingestedAt, event}` |
//! | `billing.usage.<project>.quarantine.<reason>` | workers, `Nats-Msg-Id` = `q.<key of (meter, dedupe key)>` | `{seq, meter, reason, message, event}` |
//!
//! `seq` is the stream sequence of the `.ingest` message. A worker killed
//! after publishing and before its ack publishes the same ids again; the
//! broker answers them `duplicate` within `duplicate_window`.
//!
//! **The workers' consumer** filters `billing.usage.*.ingest` on
//! nats-server 2.10 and later. On 2.9 (Debian's) it takes the whole stream
//! and workers acknowledge `.valid` and `.quarantine.*` messages unread:
//! 2.9 walks every subject of a block for each message a wildcard-filtered
//! consumer is handed, which cost 18 ms of server CPU per event in the
//! benchmark (BENCHMARKS.md), against 27 µs unfiltered.
//!
//! **Dedupe bucket** `tally-dedupe` (a key-value bucket): one key per
//! dedupe key, created with `Nats-Expected-Last-Subject-Sequence: 0` after
//! the event's PubAck; the create that finds the key taken answers the event
//! `duplicate`. Its age limit is [`dedupe_horizon`]: longer than any two
//! copies of an event can be apart and both be admitted, so the count is
//! exact over the whole horizon (see `ledger.rs` for the argument).
//!
//! **Migration:** a stream `billing-usage-quarantine` (the layout before
//! quarantined events moved into `billing-usage`) claims the quarantine
//! subjects, so on start its messages are read (at most
//! [`MAX_MIGRATION_BYTES`]), the stream is deleted, `billing-usage` takes
//! the subjects, and the messages are published again with their ids. A
//! node killed between the delete and the re-publish loses those
//! notifications; the quarantine listing does not read them (it evaluates
//! the materialised events), so no answer changes.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use jiff::SignedDuration;

use crate::ledger::ClusterLedgerConfig;

/// The stream every event goes through.
pub const STREAM: &str = "billing-usage";
/// The stream quarantined events went to before they moved into
/// [`STREAM`]; migrated and deleted on start.
pub const LEGACY_QUARANTINE_STREAM: &str = "billing-usage-quarantine";
/// The key-value bucket of every dedupe key within [`dedupe_horizon`].
pub const DEDUPE_BUCKET: &str = "tally-dedupe";
/// The subjects of [`STREAM`].
pub const SUBJECTS: [&str; 3] = [
    "billing.usage.*.ingest",
    "billing.usage.*.valid",
    "billing.usage.*.quarantine.*",
];
/// Most bytes of the legacy stream moved on start; a larger one refuses to
/// start (purge it: its messages are notifications, not usage).
pub const MAX_MIGRATION_BYTES: u64 = 256 << 20;
/// Clock difference between nodes the dedupe horizon allows for.
const CLOCK_SLACK: Duration = Duration::from_secs(24 * 3600);

/// How long a dedupe key is kept: an event is admitted only while
/// `now - max_lateness <= time <= now + max_future`, so two admitted copies
/// are at most `max_lateness + max_future` apart (plus the nodes' clock
/// difference, [`CLOCK_SLACK`]).
pub fn dedupe_horizon(config: &ClusterLedgerConfig) -> Duration {
    let span = config.max_lateness.saturating_add(config.max_future);
    Duration::try_from(span.max(SignedDuration::ZERO))
        .unwrap_or_default()
        .saturating_add(CLOCK_SLACK)
}

/// Whether this server's consumers filter a wildcard cheaply (2.10+).
pub fn filters_cheaply(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (2, 10)
}

/// Whether a message of [`STREAM`] is an event to materialise.
pub fn is_ingest(subject: &str) -> bool {
    subject.starts_with("billing.usage.") && subject.ends_with(".ingest")
}

/// Creates (or updates) [`STREAM`] with [`SUBJECTS`], moving the legacy
/// quarantine stream's messages into it.
pub async fn prepare(js: &jetstream::Context, config: &ClusterLedgerConfig) -> Result<(), String> {
    let moved = take_legacy(js).await?;
    js.create_or_update_stream(stream::Config {
        name: STREAM.into(),
        subjects: SUBJECTS.iter().map(|s| (*s).to_owned()).collect(),
        duplicate_window: config.duplicate_window,
        max_age: config.stream_max_age,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("creating stream {STREAM}: {e}"))?;
    let count = moved.len();
    let mut acks = Vec::with_capacity(count);
    for message in moved {
        let ack = js
            .publish_with_headers(message.subject, message.headers, message.payload)
            .await
            .map_err(|e| format!("moving a quarantine notification: {e}"))?;
        acks.push(ack);
    }
    for ack in acks {
        ack.await
            .map_err(|e| format!("moving a quarantine notification: {e}"))?;
    }
    if count > 0 {
        tracing::info!(
            count,
            "moved {LEGACY_QUARANTINE_STREAM} into {STREAM} and deleted it"
        );
    }
    Ok(())
}

/// Reads every message of the legacy quarantine stream and deletes it;
/// empty when there is none.
async fn take_legacy(
    js: &jetstream::Context,
) -> Result<Vec<jetstream::message::StreamMessage>, String> {
    let Ok(mut legacy) = js.get_stream(LEGACY_QUARANTINE_STREAM).await else {
        return Ok(Vec::new());
    };
    let state = legacy
        .info()
        .await
        .map_err(|e| format!("reading {LEGACY_QUARANTINE_STREAM}: {e}"))?
        .state
        .clone();
    if state.bytes > MAX_MIGRATION_BYTES {
        return Err(format!(
            "stream {LEGACY_QUARANTINE_STREAM} holds {} bytes, more than the {MAX_MIGRATION_BYTES} moved on start; \
             its messages are quarantine notifications (the listing does not read them): purge it \
             (`nats stream purge {LEGACY_QUARANTINE_STREAM}`) and start again",
            state.bytes
        ));
    }
    let mut moved = Vec::with_capacity(state.messages as usize);
    if state.messages > 0 {
        for seq in state.first_sequence..=state.last_sequence {
            match legacy.get_raw_message(seq).await {
                Ok(m) => moved.push(m),
                // A message deleted from the middle of the stream.
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(format!("reading {LEGACY_QUARANTINE_STREAM} #{seq}: {e}")),
            }
        }
    }
    js.delete_stream(LEGACY_QUARANTINE_STREAM)
        .await
        .map_err(|e| format!("deleting {LEGACY_QUARANTINE_STREAM}: {e}"))?;
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_filters_are_cheap_from_2_10() {
        assert!(!filters_cheaply("2.9.10"));
        assert!(filters_cheaply("2.10.0"));
        assert!(filters_cheaply("2.11.3"));
        assert!(filters_cheaply("3.0.0"));
        assert!(!filters_cheaply(""));
    }

    #[test]
    fn only_ingest_subjects_are_materialised() {
        assert!(is_ingest("billing.usage.p.ingest"));
        assert!(!is_ingest("billing.usage.p.valid"));
        assert!(!is_ingest("billing.usage.p.quarantine.MISSING_VALUE"));
        assert!(!is_ingest("billing.usage.ingest.quarantine.X"));
    }

    #[test]
    fn the_horizon_outlasts_admission() {
        let config = ClusterLedgerConfig::new("nats://x", "http://y");
        let admitted = config.max_lateness.saturating_add(config.max_future);
        let horizon = dedupe_horizon(&config);
        assert!(horizon.as_secs() as i64 > admitted.as_secs());
    }
}
