//! The sink to the ledger's platform contract
//! (`POST /v1/usage/events:batchIngest`) and the routing of its outcomes
//! back to the inputs whose outboxes hold the events.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use axum::http::{StatusCode, header};
use serde::Deserialize;
use tally_delivery::{
    Answer, BatchOutcome, BatchResult, ComponentMetrics, EncodeError, Encoder, HttpRequest, Item,
    Secret, Verdict,
};

/// What the outcome hook tells an input about its events.
pub(crate) enum Ack {
    /// The ledger answered 200/207: forget them.
    Delivered(Vec<String>),
    /// Their batch failed for good (e.g. 401): keep them in the outbox and
    /// try again later.
    Failed { ids: Vec<String>, dead_letter: u64 },
}

/// Routes a batch's outcome to the inputs of its items (keys are
/// `<input number>:<event id>`).
pub(crate) fn route_outcome(senders: &Mutex<Vec<mpsc::Sender<Ack>>>, outcome: &BatchOutcome) {
    let mut by_input: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for key in &outcome.keys {
        let key = String::from_utf8_lossy(key);
        if let Some((input, id)) = key.split_once(':')
            && let Ok(input) = input.parse::<usize>()
        {
            by_input.entry(input).or_default().push(id.to_owned());
        }
    }
    let senders = senders.lock().unwrap_or_else(|p| p.into_inner());
    for (input, ids) in by_input {
        let ack = match &outcome.result {
            BatchResult::Delivered { .. } => Ack::Delivered(ids),
            BatchResult::DeadLettered { id, .. } => Ack::Failed {
                ids,
                dead_letter: *id,
            },
        };
        if let Some(sender) = senders.get(input) {
            // A stopped input forgets nothing: its outbox still holds them.
            let _ = sender.send(ack);
        }
    }
}

/// Turns outbox events into `POST /v1/usage/events:batchIngest`.
pub(crate) struct LedgerEncoder {
    pub(crate) url: reqwest::Url,
    pub(crate) token: Option<Secret>,
    pub(crate) rejected: Arc<ComponentMetrics>,
    pub(crate) warnings: WarnOnce,
}

/// One warning per cause per interval: the first occurrence of a cause is
/// logged at once, later ones are counted and logged (with how many) once
/// the interval since the last warning of that cause has passed.
pub(crate) struct WarnOnce {
    every: Duration,
    /// Per cause: when it was last logged, and occurrences since.
    causes: Mutex<HashMap<String, (Instant, u64)>>,
}

impl WarnOnce {
    pub(crate) fn new(every: Duration) -> Self {
        WarnOnce {
            every,
            causes: Mutex::new(HashMap::new()),
        }
    }

    /// Counts `n` occurrences of `cause`; `Some(count)` when a warning is
    /// due now, with the occurrences it covers.
    pub(crate) fn due(&self, cause: &str, n: u64, now: Instant) -> Option<u64> {
        let mut causes = self.causes.lock().unwrap_or_else(|p| p.into_inner());
        match causes.get_mut(cause) {
            None => {
                causes.insert(cause.to_owned(), (now, 0));
                Some(n)
            }
            Some((last, pending)) => {
                *pending += n;
                if now.duration_since(*last) < self.every {
                    return None;
                }
                *last = now;
                Some(std::mem::take(pending))
            }
        }
    }
}

#[derive(Deserialize)]
struct UsageAnswer {
    #[serde(default)]
    rejected: Vec<RejectedEvent>,
}

#[derive(Deserialize)]
struct RejectedEvent {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    detail: String,
}

/// A gzipped POST of `body` to `tally serve`, with the agent's bearer token
/// (a secret header, never logged): every agent sink's request.
pub(crate) fn post_to_serve(
    url: &reqwest::Url,
    content_type: &'static str,
    body: Vec<u8>,
    token: Option<&Secret>,
) -> Result<HttpRequest, EncodeError> {
    let mut request = HttpRequest::post(url.clone())
        .header(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(content_type),
        )
        .body(body)
        .gzip(true);
    if let Some(token) = token {
        let value = Secret::new(format!("Bearer {}", token.expose()));
        request = request.secret_header(header::AUTHORIZATION, &value)?;
    }
    Ok(request)
}

impl Encoder for LedgerEncoder {
    fn encode(&self, items: &[Item]) -> Result<HttpRequest, EncodeError> {
        let mut body =
            Vec::with_capacity(items.iter().map(|i| i.data.len() + 1).sum::<usize>() + 2);
        body.push(b'[');
        for (n, item) in items.iter().enumerate() {
            if n > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&item.data);
        }
        body.push(b']');
        post_to_serve(&self.url, "application/json", body, self.token.as_ref())
    }

    fn classify(&self, answer: &Answer<'_>) -> Verdict {
        if answer.status != StatusCode::MULTI_STATUS {
            return answer.default_verdict();
        }
        let rejected = match serde_json::from_slice::<UsageAnswer>(answer.body) {
            Ok(parsed) => parsed.rejected,
            Err(e) => {
                tracing::warn!(error = %e, "the ledger's 207 answer is not readable; counting none as rejected");
                Vec::new()
            }
        };
        let mut by_reason: BTreeMap<&str, (u64, &RejectedEvent)> = BTreeMap::new();
        for event in &rejected {
            self.rejected
                .add_error(&format!("rejected_{}", event.reason));
            by_reason.entry(&event.reason).or_insert((0, event)).0 += 1;
        }
        let now = Instant::now();
        for (reason, (n, example)) in by_reason {
            if let Some(events) = self.warnings.due(reason, n, now) {
                tracing::warn!(
                    reason,
                    events,
                    example_id = example.id.as_deref().unwrap_or("-"),
                    detail = %example.detail,
                    "the ledger rejected usage events; they are not sent again"
                );
            }
        }
        Verdict::Delivered {
            rejected: rejected.len() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_warning_per_cause_per_interval() {
        let warn = WarnOnce::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(warn.due("TOO_LATE", 2, t0), Some(2), "the first at once");
        assert_eq!(warn.due("TOO_LATE", 5, t0 + Duration::from_secs(1)), None);
        assert_eq!(
            warn.due("INVALID", 1, t0 + Duration::from_secs(2)),
            Some(1),
            "per cause"
        );
        assert_eq!(warn.due("TOO_LATE", 1, t0 + Duration::from_secs(59)), None);
        // The next warning covers every occurrence since the last one.
        assert_eq!(
            warn.due("TOO_LATE", 1, t0 + Duration::from_secs(61)),
            Some(7)
        );
        assert_eq!(warn.due("TOO_LATE", 1, t0 + Duration::from_secs(62)), None);
    }
}
