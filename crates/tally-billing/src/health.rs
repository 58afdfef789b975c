//! A sink's health, from every HTTP attempt of its lanes: the last error
//! (a reason, the answer's status, Tally's words, and since when) until a
//! batch is delivered again. **Never** holds the provider's answer body:
//! only its status code and a message written here.

use std::sync::Mutex;

use jiff::Timestamp;
use serde::Serialize;
use tally_delivery::{AttemptReport, Verdict};

/// The provider refused the API key or a batch (a permanent 4xx).
pub const PROVIDER_REJECTED: &str = "ProviderRejected";
/// The provider did not answer, or answered 429/5xx (being retried).
pub const PROVIDER_UNREACHABLE: &str = "ProviderUnreachable";
/// The egress policy refused the provider's address.
pub const DESTINATION_REFUSED: &str = "DestinationRefused";

/// The error a sink is in, until a batch is delivered again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LastError {
    /// `ProviderRejected`, `ProviderUnreachable` or `DestinationRefused`.
    pub reason: String,
    /// The answer's HTTP status; none when no answer came.
    pub status: Option<u16>,
    /// What happened and what Tally does about it, in Tally's words.
    pub message: String,
    /// When the sink entered this error (kept while the reason stays).
    pub since: Timestamp,
    /// When it was last seen.
    pub at: Timestamp,
}

/// The reason and Tally's words for an attempt that failed; `None` for a
/// delivered one.
fn classify(report: &AttemptReport<'_>) -> Option<(&'static str, String)> {
    let status = report.status;
    Some(match (report.verdict, status) {
        (Verdict::Delivered { .. }, _) => return None,
        (Verdict::Permanent, None) => (
            DESTINATION_REFUSED,
            "the egress policy refused the provider's address; records are dead-lettered \
             (allow it with egress.allow, then retry the dead letters)"
                .to_owned(),
        ),
        (Verdict::Permanent, Some(code @ (401 | 403))) => (
            PROVIDER_REJECTED,
            format!(
                "the provider refused the API key (HTTP {code}); records are dead-lettered \
                 (fix the key's Secret, then retry the dead letters)"
            ),
        ),
        (Verdict::Permanent, Some(code)) => (
            PROVIDER_REJECTED,
            format!("the provider refused a batch (HTTP {code}); it is in the dead letters"),
        ),
        (Verdict::Retryable, Some(429)) => (
            PROVIDER_UNREACHABLE,
            "the provider is throttling requests (HTTP 429); retrying".to_owned(),
        ),
        (Verdict::Retryable, Some(code)) => (
            PROVIDER_UNREACHABLE,
            format!("the provider failed (HTTP {code}); retrying"),
        ),
        (Verdict::Retryable, None) => (
            PROVIDER_UNREACHABLE,
            "no answer from the provider (connection failed or timed out); retrying".to_owned(),
        ),
    })
}

/// The last error of a sink, shared with its lanes' attempt hooks.
#[derive(Debug, Default)]
pub(crate) struct Health {
    last_error: Mutex<Option<LastError>>,
}

impl Health {
    /// Takes an attempt into account at `now`: a delivered batch clears the
    /// error; a failed one sets it (keeping `since` if the reason stays).
    pub fn observe(&self, report: &AttemptReport<'_>, now: Timestamp) {
        let mut last = self
            .last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some((reason, message)) = classify(report) else {
            *last = None;
            return;
        };
        let since = last
            .as_ref()
            .filter(|e| e.reason == reason)
            .map_or(now, |e| e.since);
        *last = Some(LastError {
            reason: reason.to_owned(),
            status: report.status,
            message,
            since,
            at: now,
        });
    }

    /// The error the sink is in, if any.
    pub fn last_error(&self) -> Option<LastError> {
        self.last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(verdict: Verdict, status: Option<u16>) -> AttemptReport<'static> {
        AttemptReport {
            items: 1,
            attempt: 1,
            status,
            verdict,
            will_retry: verdict == Verdict::Retryable,
            detail: "<html>the provider's own words</html>",
        }
    }

    #[test]
    fn errors_are_set_kept_and_cleared_without_the_remote_body() {
        let health = Health::default();
        let t = |s| Timestamp::from_second(s).unwrap();
        health.observe(&report(Verdict::Retryable, Some(503)), t(10));
        health.observe(&report(Verdict::Retryable, None), t(20));
        let error = health.last_error().unwrap();
        assert_eq!(error.reason, PROVIDER_UNREACHABLE);
        assert_eq!((error.since, error.at, error.status), (t(10), t(20), None));
        health.observe(&report(Verdict::Permanent, Some(401)), t(30));
        let error = health.last_error().unwrap();
        assert_eq!(error.reason, PROVIDER_REJECTED);
        assert_eq!((error.since, error.status), (t(30), Some(401)));
        assert!(error.message.contains("API key"));
        assert!(!format!("{error:?}").contains("own words"));
        health.observe(
            &report(Verdict::Delivered { rejected: 0 }, Some(200)),
            t(40),
        );
        assert_eq!(health.last_error(), None, "cleared on recovery");
    }
}
