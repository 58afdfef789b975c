//! The sink to the ledger's platform contract
//! (`POST /v1/usage/events:batchIngest`) and the routing of its outcomes
//! back to the inputs whose outboxes hold the events.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, mpsc};

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
        let mut request = HttpRequest::post(self.url.clone())
            .header(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            )
            .body(body)
            .gzip(true);
        if let Some(token) = &self.token {
            let value = Secret::new(format!("Bearer {}", token.expose()));
            request = request.secret_header(header::AUTHORIZATION, &value)?;
        }
        Ok(request)
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
        for event in &rejected {
            tracing::warn!(
                id = event.id.as_deref().unwrap_or("-"),
                reason = %event.reason,
                detail = %event.detail,
                "the ledger rejected a usage event; it is not sent again"
            );
            self.rejected
                .add_error(&format!("rejected_{}", event.reason));
        }
        Verdict::Delivered {
            rejected: rejected.len() as u64,
        }
    }
}
