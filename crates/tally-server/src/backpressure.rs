//! Ingest under overload: what a request meets when the ledger cannot take
//! it now.
//!
//! Two bounds apply. The server's own admission budget
//! (`maxPendingEvents`: events handed to the ledger and not yet answered)
//! and the ledger's materialisation backlog ([`tally_ledger::Backlog`]:
//! acknowledged events whose derived state is not yet written, bounded by
//! `maxUnmaterialisedEvents`; past it the ledger's writer waits).
//!
//! - The platform contract (`/v1/usage/events*`) never queues behind
//!   either: a full budget or a full backlog answers `429` with
//!   `Retry-After` at once, before anything of the request is stored.
//! - The OpenMeter API (`/api/v1/events`) waits for the budget, and for a
//!   full backlog at most `ingestWaitSeconds`; then it answers `503` with
//!   `Retry-After`, nothing stored. Its clients expect a slow answer
//!   rather than a refusal, but never an unbounded one.
//!
//! **Never:** store part of a request refused here (the checks run before
//! the ledger sees it).

use std::time::{Duration, Instant};

use axum::http::StatusCode;

use crate::AppState;
use crate::problem::Problem;

/// What a refused request is asked to wait before retrying, in seconds.
pub(crate) const RETRY_AFTER_SECONDS: u64 = 1;

/// How often a waiting OpenMeter request looks at the backlog again.
const POLL: Duration = Duration::from_millis(20);

/// Default of `ingestWaitSeconds`: how long `/api/v1/events` waits for room
/// in a full backlog: longer than one bulk of materialisation takes on a
/// loaded host, so a steady sender does not see it.
pub const DEFAULT_INGEST_WAIT: Duration = Duration::from_secs(30);

/// The platform contract's refusal: `429`, `Retry-After`, nothing stored.
pub(crate) fn overloaded(why: &str) -> Problem {
    Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        format!("{why}; nothing of this request was stored, retry later"),
    )
    .with_retry_after(RETRY_AFTER_SECONDS)
}

impl AppState {
    /// The platform contract's check: `Err(429)` while the ledger's
    /// backlog is full.
    pub(crate) fn refuse_if_backlogged(&self) -> Result<(), Problem> {
        let backlog = self.ledger.backlog();
        if backlog.is_full() {
            tracing::debug!(
                events = backlog.events,
                max = backlog.max_events,
                "materialisation backlog full; platform ingest refused"
            );
            return Err(overloaded(
                "the ledger's materialisation backlog is full (maxUnmaterialisedEvents)",
            ));
        }
        Ok(())
    }

    /// The OpenMeter API's check: waits while the ledger's backlog is full,
    /// at most the configured ingest wait; then `Err(503)`.
    pub(crate) async fn wait_for_backlog(&self) -> Result<(), Problem> {
        let deadline = Instant::now() + self.ingest_wait;
        while self.ledger.backlog().is_full() {
            if Instant::now() >= deadline {
                return Err(Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "the ledger's materialisation backlog stayed full for {:?} (ingestWaitSeconds); nothing of this request was stored, retry later",
                        self.ingest_wait
                    ),
                )
                .with_retry_after(RETRY_AFTER_SECONDS));
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(())
    }

    /// Sets how long `/api/v1/events` waits for room in a full backlog.
    pub fn with_ingest_wait(mut self, wait: Duration) -> AppState {
        self.ingest_wait = wait;
        self
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use tally_store_embedded::{EmbeddedLedger, StoreConfig};

    fn event(id: &str) -> tally_model::CloudEvent {
        let value = serde_json::json!({"specversion": "1.0", "id": id, "source": "s",
            "type": "t", "subject": "c", "data": {"value": 1}});
        tally_model::parse_event(value, jiff::Timestamp::now()).unwrap()
    }

    /// A real store whose tail holds at most one event and is materialised
    /// only after a minute: one acknowledged event fills it.
    fn full_after_one_event(dir: &std::path::Path) -> EmbeddedLedger {
        let mut config = StoreConfig::new(dir);
        config.max_unmaterialised_events = 1;
        config.materialise_patience = Duration::from_secs(60);
        EmbeddedLedger::open(config).unwrap()
    }

    #[tokio::test]
    async fn a_full_backlog_refuses_the_platform_and_bounds_the_openmeter_wait() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = full_after_one_event(dir.path());
        let state = AppState::new(Arc::new(ledger), 1 << 20, None)
            .with_ingest_wait(Duration::from_millis(200));
        // Room before anything is acknowledged.
        state.refuse_if_backlogged().unwrap();
        state.wait_for_backlog().await.unwrap();

        state.ledger.ingest(vec![event("a")]).await.unwrap();
        let backlog = state.ledger.backlog();
        assert_eq!((backlog.events, backlog.max_events), (1, 1));
        let refused = state.refuse_if_backlogged().unwrap_err();
        assert_eq!(refused.status, 429);
        assert_eq!(refused.retry_after(), Some(RETRY_AFTER_SECONDS));

        let started = Instant::now();
        let timed_out = state.wait_for_backlog().await.unwrap_err();
        assert_eq!(timed_out.status, 503);
        assert_eq!(timed_out.retry_after(), Some(RETRY_AFTER_SECONDS));
        assert!(started.elapsed() >= Duration::from_millis(200));
    }
}
