//! A typed HTTP client for the Tally API.
//!
//! ```no_run
//! # async fn example() -> Result<(), tally_client::ClientError> {
//! use tally_client::TallyClient;
//! let client = TallyClient::new("http://127.0.0.1:8080", Some("secret".into()))?;
//! let outcome = client
//!     .send_events(&[serde_json::json!({
//!         "specversion": "1.0", "id": "1", "source": "gw", "type": "requests", "subject": "acme",
//!     })])
//!     .await?;
//! println!("accepted {}", outcome.accepted);
//! # Ok(()) }
//! ```
//!
//! Every non-2xx answer becomes [`ClientError::Api`], carrying the server's
//! `application/problem+json` details. The bearer token never appears in an
//! error or in `Debug` output.

#![warn(missing_docs)]

mod error;
mod types;

use std::fmt;
use std::time::Duration;

use jiff::Timestamp;
use reqwest::header::{CONTENT_TYPE, HeaderValue};
use reqwest::{Method, RequestBuilder, Response, Url};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tally_model::{Kind, Manifest, OpenMeterMeter};

pub use error::ClientError;
pub use tally_compute::lifecycle::{LifecycleEvent, LifecycleKind, Reason};
pub use tally_compute::store::InstanceSummary;

/// A page of `GET /api/v1/instances`.
pub type InstancePage = tally_compute::store::Page<InstanceSummary>;
/// A page of `GET /api/v1/instances/{instance}/events`.
pub type LifecycleEventPage = tally_compute::store::Page<LifecycleEvent>;
pub use tally_ledger::{
    ApplyAction, EventPage, IngestOutcome, QuarantineNotice, QuarantinePage, QuarantinedEvent,
    StoredEvent, VoidOutcome, VoidPage, VoidRecord,
};
pub use tally_meter::WindowSize;
pub use types::{
    ApplyResult, EventListParams, MeterQueryParams, MeterQueryResponse, MeterQueryRow,
    QuarantineListParams,
};

/// Media type of an ingest request body.
pub const CLOUDEVENTS_BATCH: &str = "application/cloudevents-batch+json";

/// A client for one Tally server. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct TallyClient {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
}

impl fmt::Debug for TallyClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TallyClient")
            .field("base_url", &self.base.as_str())
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl TallyClient {
    /// A client for the server at `base_url` (e.g. `http://127.0.0.1:8080`;
    /// `http://` is assumed when no scheme is given). When `token` is set,
    /// every request sends `Authorization: Bearer <token>`.
    pub fn new(base_url: &str, token: Option<String>) -> Result<Self, ClientError> {
        let invalid = |reason: &str| ClientError::InvalidUrl {
            url: base_url.to_owned(),
            reason: reason.to_owned(),
        };
        let trimmed = base_url.trim();
        let with_scheme = if trimmed.contains("://") {
            trimmed.to_owned()
        } else {
            format!("http://{trimmed}")
        };
        let base = Url::parse(&with_scheme).map_err(|e| invalid(&e.to_string()))?;
        match base.scheme() {
            "http" => {}
            "https" => {
                return Err(invalid(
                    "this build speaks plain HTTP only; reach TLS servers through a local proxy",
                ));
            }
            other => {
                return Err(invalid(&format!(
                    "unsupported scheme {other:?}; use http://"
                )));
            }
        }
        if base.cannot_be_a_base() || base.host().is_none() {
            return Err(invalid("expected http://HOST[:PORT][/PATH]"));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(invalid("the server URL must not have a query or fragment"));
        }
        if let Some(token) = &token {
            // Checked here so that the request builder never has to reject it.
            if HeaderValue::from_str(&format!("Bearer {token}")).is_err() {
                return Err(ClientError::InvalidRequest(
                    "the token contains characters that cannot be sent in an HTTP header".into(),
                ));
            }
        }
        let http = tally_delivery::client_builder()
            .user_agent(concat!("tally-client/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ClientError::InvalidRequest(format!("cannot set up HTTP: {e}")))?;
        Ok(TallyClient { http, base, token })
    }

    /// The server URL requests go to.
    pub fn base_url(&self) -> &str {
        self.base.as_str()
    }

    /// Sends a batch of CloudEvents (`POST /api/v1/events`). Nothing is stored
    /// when the server refuses any event; the error lists every problem.
    pub async fn send_events(&self, events: &[Value]) -> Result<IngestOutcome, ClientError> {
        let url = self.url(&["api", "v1", "events"], &[]);
        let body = serde_json::to_vec(events)
            .map_err(|e| ClientError::InvalidRequest(format!("cannot encode events: {e}")))?;
        // The server answers 204 unless asked for what it stored.
        let request = self
            .request(Method::POST, &url)
            .header(CONTENT_TYPE, CLOUDEVENTS_BATCH)
            .header("prefer", "return=representation")
            .body(body);
        self.json(request, &url).await
    }

    /// One page of stored events, newest first (`GET /api/v2/events`).
    pub async fn list_events(&self, params: &EventListParams) -> Result<EventPage, ClientError> {
        let url = self.url(&["api", "v2", "events"], &params.to_pairs());
        self.json(self.request(Method::GET, &url), &url).await
    }

    /// Voids a stored event (`POST /api/v1/events/void`): it stops counting
    /// in every meter; an audit record is kept.
    pub async fn void_event(
        &self,
        source: &str,
        id: &str,
        reason: &str,
    ) -> Result<VoidOutcome, ClientError> {
        let url = self.url(&["api", "v1", "events", "void"], &[]);
        let body = serde_json::json!({"source": source, "id": id, "reason": reason});
        let request = self
            .request(Method::POST, &url)
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_string());
        self.json(request, &url).await
    }

    /// One page of the void audit trail, newest first (`GET /api/v1/events/voids`).
    pub async fn list_voids(
        &self,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<VoidPage, ClientError> {
        let mut pairs = vec![("limit".to_owned(), limit.to_string())];
        if let Some(c) = cursor {
            pairs.push(("cursor".to_owned(), c.to_owned()));
        }
        let url = self.url(&["api", "v1", "events", "voids"], &pairs);
        self.json(self.request(Method::GET, &url), &url).await
    }

    /// Every meter, in the OpenMeter shape (`GET /api/v1/meters`).
    pub async fn list_meters(&self) -> Result<Vec<OpenMeterMeter>, ClientError> {
        let url = self.url(&["api", "v1", "meters"], &[]);
        self.json(self.request(Method::GET, &url), &url).await
    }

    /// One meter (`GET /api/v1/meters/{slug}`).
    pub async fn get_meter(&self, slug: &str) -> Result<OpenMeterMeter, ClientError> {
        let url = self.url(&["api", "v1", "meters", slug], &[]);
        self.json(self.request(Method::GET, &url), &url).await
    }

    /// Creates a meter (`POST /api/v1/meters`); returns it as stored.
    pub async fn create_meter(
        &self,
        meter: &OpenMeterMeter,
    ) -> Result<OpenMeterMeter, ClientError> {
        let url = self.url(&["api", "v1", "meters"], &[]);
        self.json(self.request(Method::POST, &url).json(meter), &url)
            .await
    }

    /// Deletes a meter (`DELETE /api/v1/meters/{slug}`).
    pub async fn delete_meter(&self, slug: &str) -> Result<(), ClientError> {
        let url = self.url(&["api", "v1", "meters", slug], &[]);
        self.send(self.request(Method::DELETE, &url), &url)
            .await
            .map(drop)
    }

    /// One page of a meter query (`GET /api/v1/meters/{slug}/query`).
    pub async fn query_meter(
        &self,
        slug: &str,
        params: &MeterQueryParams,
    ) -> Result<MeterQueryResponse, ClientError> {
        let url = self.url(&["api", "v1", "meters", slug, "query"], &params.to_pairs());
        self.json(self.request(Method::GET, &url), &url).await
    }

    /// Creates or updates the resources of a YAML text (several documents
    /// and `List`s allowed) with `POST /apis/apply`. All or nothing.
    pub async fn apply(&self, yaml: &str) -> Result<Vec<ApplyResult>, ClientError> {
        let url = self.url(&["apis", "apply"], &[]);
        let request = self
            .request(Method::POST, &url)
            .header(CONTENT_TYPE, "application/yaml")
            .body(yaml.to_owned());
        let response: types::ApplyResponse = self.json(request, &url).await?;
        Ok(response.results)
    }

    /// Every resource of a kind the token may see, by (namespace, name)
    /// (`GET /apis/{plural}`), optionally of one namespace.
    pub async fn list_resources(
        &self,
        kind: Kind,
        namespace: Option<&str>,
    ) -> Result<Vec<Manifest>, ClientError> {
        let query: Vec<(String, String)> = namespace
            .map(|ns| ("namespace".to_owned(), ns.to_owned()))
            .into_iter()
            .collect();
        let url = self.url(&["apis", kind.plural()], &query);
        let list: types::ManifestList = self.json(self.request(Method::GET, &url), &url).await?;
        Ok(list.items)
    }

    /// The path of one resource: `/apis/{plural}/{name}` for cluster-scoped
    /// kinds, `/apis/{plural}/{namespace}/{name}` for namespaced ones.
    fn resource_url(&self, kind: Kind, namespace: Option<&str>, name: &str) -> Url {
        match namespace.filter(|_| kind.namespaced()) {
            Some(ns) => self.url(&["apis", kind.plural(), ns, name], &[]),
            None => self.url(&["apis", kind.plural(), name], &[]),
        }
    }

    /// One resource, with status.
    pub async fn get_resource(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Manifest, ClientError> {
        let url = self.resource_url(kind, namespace, name);
        self.json(self.request(Method::GET, &url), &url).await
    }

    /// Deletes a resource.
    pub async fn delete_resource(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<(), ClientError> {
        let url = self.resource_url(kind, namespace, name);
        self.send(self.request(Method::DELETE, &url), &url)
            .await
            .map(drop)
    }

    /// A meter checked against the events of its type in `[from, to)`
    /// (`GET /api/v1/meters/{slug}/validate`; the server's defaults when
    /// `None`).
    pub async fn validate_meter(
        &self,
        slug: &str,
        from: Option<Timestamp>,
        to: Option<Timestamp>,
    ) -> Result<tally_meter::validate::ValidationAnswer, ClientError> {
        let mut pairs = optional_pair("from", from.map(|t| t.to_string()).as_deref());
        pairs.extend(optional_pair("to", to.map(|t| t.to_string()).as_deref()));
        let url = self.url(&["api", "v1", "meters", slug, "validate"], &pairs);
        self.json(self.request(Method::GET, &url), &url).await
    }

    /// One page of quarantined events, newest first (`GET /api/v1/quarantine`).
    pub async fn list_quarantine(
        &self,
        params: &QuarantineListParams,
    ) -> Result<QuarantinePage, ClientError> {
        let url = self.url(&["api", "v1", "quarantine"], &params.to_pairs());
        self.json(self.request(Method::GET, &url), &url).await
    }

    /// One page of instances with lifecycle events (`GET /api/v1/instances`),
    /// of `project` (default: the token's only project).
    pub async fn list_instances(
        &self,
        project: Option<&str>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<InstancePage, ClientError> {
        let mut pairs = optional_pair("project", project);
        pairs.push(("limit".to_owned(), limit.to_string()));
        pairs.extend(optional_pair("cursor", cursor));
        let url = self.url(&["api", "v1", "instances"], &pairs);
        self.json(self.request(Method::GET, &url), &url).await
    }

    /// One page of an instance's lifecycle events, in arrival order
    /// (`GET /api/v1/instances/{instance}/events`).
    pub async fn instance_events(
        &self,
        instance: &str,
        project: Option<&str>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<LifecycleEventPage, ClientError> {
        let mut pairs = optional_pair("project", project);
        pairs.push(("limit".to_owned(), limit.to_string()));
        pairs.extend(optional_pair("cursor", cursor));
        let url = self.url(&["api", "v1", "instances", instance, "events"], &pairs);
        self.json(self.request(Method::GET, &url), &url).await
    }

    /// The billing forwarder's state per sink and meter
    /// (`GET /api/v1/billing/status`).
    pub async fn billing_status(&self, sink: Option<&str>) -> Result<Value, ClientError> {
        let pairs = optional_pair("sink", sink);
        let url = self.url(&["api", "v1", "billing", "status"], &pairs);
        self.json(self.request(Method::GET, &url), &url).await
    }

    /// Batches a provider refused for good, with its answer
    /// (`GET /api/v1/billing/deadletters`).
    pub async fn billing_dead_letters(&self, sink: Option<&str>) -> Result<Value, ClientError> {
        let pairs = optional_pair("sink", sink);
        let url = self.url(&["api", "v1", "billing", "deadletters"], &pairs);
        self.json(self.request(Method::GET, &url), &url).await
    }

    /// Sends a dead letter again
    /// (`POST /api/v1/billing/deadletters/{sink}/{id}/retry`).
    pub async fn billing_retry_dead_letter(
        &self,
        sink: &str,
        id: u64,
    ) -> Result<Value, ClientError> {
        let id = id.to_string();
        let url = self.url(
            &["api", "v1", "billing", "deadletters", sink, &id, "retry"],
            &[],
        );
        self.json(self.request(Method::POST, &url), &url).await
    }

    /// Sends every dead letter of a sink again
    /// (`POST /api/v1/billing/deadletters/{sink}/retry`).
    pub async fn billing_retry_all_dead_letters(&self, sink: &str) -> Result<Value, ClientError> {
        let url = self.url(&["api", "v1", "billing", "deadletters", sink, "retry"], &[]);
        self.json(self.request(Method::POST, &url), &url).await
    }

    /// The ledger's totals against the acknowledged ones and the provider's
    /// own per billing account and meter (`GET /api/v1/billing/reconcile`).
    pub async fn billing_reconcile(
        &self,
        from: jiff::Timestamp,
        to: jiff::Timestamp,
        sink: Option<&str>,
    ) -> Result<Value, ClientError> {
        let mut pairs = vec![
            ("from".to_owned(), from.to_string()),
            ("to".to_owned(), to.to_string()),
        ];
        pairs.extend(optional_pair("sink", sink));
        let url = self.url(&["api", "v1", "billing", "reconcile"], &pairs);
        self.json(self.request(Method::GET, &url), &url).await
    }

    /// A meter's change feed after `after` (`GET /api/v1/meters/{slug}/changes`).
    pub async fn meter_changes(
        &self,
        slug: &str,
        after: tally_ledger::ChangeCursor,
        limit: usize,
    ) -> Result<tally_ledger::ChangePage, ClientError> {
        let pairs = [
            ("after".to_owned(), after.to_string()),
            ("limit".to_owned(), limit.to_string()),
        ];
        let url = self.url(&["api", "v1", "meters", slug, "changes"], &pairs);
        self.json(self.request(Method::GET, &url), &url).await
    }

    /// The server's version, as its API document states it
    /// (`GET /openapi.json`, `info.version`).
    pub async fn server_version(&self) -> Result<String, ClientError> {
        let url = self.url(&["openapi.json"], &[]);
        let document: types::ApiDocument = self.json(self.request(Method::GET, &url), &url).await?;
        Ok(document.info.version)
    }

    /// Whether the server process is up (`GET /healthz`).
    pub async fn health(&self) -> Result<(), ClientError> {
        let url = self.url(&["healthz"], &[]);
        self.send(self.request(Method::GET, &url), &url)
            .await
            .map(drop)
    }

    /// Whether the server can take writes (`GET /readyz`); an
    /// [`ClientError::Api`] with status 503 when it cannot.
    pub async fn ready(&self) -> Result<(), ClientError> {
        let url = self.url(&["readyz"], &[]);
        self.send(self.request(Method::GET, &url), &url)
            .await
            .map(drop)
    }

    /// The base URL with `segments` appended (each percent-encoded) and the
    /// query `pairs`.
    /// The lines of one instance (`GET /api/v1/projects/{project}/instances/{instance}/logs`):
    /// `{lines: [{time, instance, stream, line}], truncated}`, oldest first.
    pub async fn instance_logs(
        &self,
        project: &str,
        instance: &str,
        params: &LogParams,
    ) -> Result<Value, ClientError> {
        let url = self.logs_url(project, instance, params, false);
        self.json(self.request(Method::GET, &url), &url).await
    }

    /// Follows one instance's lines: those `params` select, then each new
    /// line as the server stores it.
    pub async fn follow_instance_logs(
        &self,
        project: &str,
        instance: &str,
        params: &LogParams,
    ) -> Result<LogFollower, ClientError> {
        let url = self.logs_url(project, instance, params, true);
        let response = self.send(self.request(Method::GET, &url), &url).await?;
        Ok(LogFollower {
            response,
            url,
            buffer: Vec::new(),
        })
    }

    fn logs_url(&self, project: &str, instance: &str, params: &LogParams, follow: bool) -> Url {
        let mut pairs = Vec::new();
        let mut add = |k: &str, v: String| pairs.push((k.to_owned(), v));
        if let Some(since) = &params.since {
            add("since", since.clone());
        }
        if let Some(stream) = &params.stream {
            add("stream", stream.clone());
        }
        for grep in &params.grep {
            add("grep", grep.clone());
        }
        if let Some(limit) = params.limit {
            add("limit", limit.to_string());
        }
        if follow {
            add("follow", "true".into());
        }
        self.url(
            &[
                "api",
                "v1",
                "projects",
                project,
                "instances",
                instance,
                "logs",
            ],
            &pairs,
        )
    }

    fn url(&self, segments: &[&str], pairs: &[(String, String)]) -> Url {
        let mut url = self.base.clone();
        // `new` refused URLs that cannot be a base, so this always succeeds.
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        if !pairs.is_empty() {
            url.query_pairs_mut().extend_pairs(pairs);
        }
        url
    }

    fn request(&self, method: Method, url: &Url) -> RequestBuilder {
        let request = self.http.request(method, url.clone());
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends a request; any non-2xx answer becomes [`ClientError::Api`].
    async fn send(&self, request: RequestBuilder, url: &Url) -> Result<Response, ClientError> {
        let response = request.send().await.map_err(|e| transport_error(url, &e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| transport_error(url, &e))?;
        Err(error::api_error(status, &body))
    }

    /// Sends a request and decodes its JSON answer.
    async fn json<T: DeserializeOwned>(
        &self,
        request: RequestBuilder,
        url: &Url,
    ) -> Result<T, ClientError> {
        let response = self.send(request, url).await?;
        let body = response
            .bytes()
            .await
            .map_err(|e| transport_error(url, &e))?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode {
            url: url.to_string(),
            reason: e.to_string(),
        })
    }
}

fn optional_pair(key: &str, value: Option<&str>) -> Vec<(String, String)> {
    value
        .map(|v| vec![(key.to_owned(), v.to_owned())])
        .unwrap_or_default()
}

fn transport_error(url: &Url, error: &reqwest::Error) -> ClientError {
    let reason = error::root_cause(error);
    if error.is_connect() {
        ClientError::Connect {
            url: url.to_string(),
            reason,
        }
    } else if error.is_timeout() {
        ClientError::Transport {
            url: url.to_string(),
            reason: format!("timed out ({reason})"),
        }
    } else {
        ClientError::Transport {
            url: url.to_string(),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_joined_and_encoded() {
        let client = TallyClient::new("127.0.0.1:9/base/", None).unwrap();
        let url = client.url(
            &["api", "v1", "meters", "a b/c", "query"],
            &[("k".into(), "x&y".into())],
        );
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:9/base/api/v1/meters/a%20b%2Fc/query?k=x%26y"
        );
        let client = TallyClient::new("http://localhost:8080", None).unwrap();
        assert_eq!(
            client.url(&["healthz"], &[]).as_str(),
            "http://localhost:8080/healthz"
        );
    }

    #[test]
    fn refuses_unusable_urls() {
        for bad in [
            "https://x",
            "ftp://x",
            "http://",
            "http://x/?q=1",
            "http://[::1",
        ] {
            let err = TallyClient::new(bad, None).unwrap_err();
            assert!(
                matches!(err, ClientError::InvalidUrl { .. }),
                "{bad}: {err}"
            );
        }
        let err = TallyClient::new("http://x", Some("bad\ntoken".into())).unwrap_err();
        assert!(!err.to_string().contains("bad\ntoken"));
    }
}

/// What `tally logs` asks for.
#[derive(Debug, Clone, Default)]
pub struct LogParams {
    /// A duration back from now (`1h`) or an RFC 3339 time.
    pub since: Option<String>,
    /// `stdout` or `stderr`.
    pub stream: Option<String>,
    /// Every text a line must contain.
    pub grep: Vec<String>,
    /// At most this many lines (the newest).
    pub limit: Option<usize>,
}

/// An open follow of an instance's logs (NDJSON, one line each).
pub struct LogFollower {
    response: Response,
    url: Url,
    buffer: Vec<u8>,
}

/// The longest NDJSON line a follower accepts.
const MAX_FOLLOW_LINE: usize = 1 << 20;

impl LogFollower {
    /// The next lines (`{time, instance, stream, line}`), waiting for them;
    /// `None` once the server ends the stream.
    pub async fn next(&mut self) -> Result<Option<Vec<Value>>, ClientError> {
        loop {
            if let Some(end) = self.buffer.iter().rposition(|b| *b == b'\n') {
                let rest = self.buffer.split_off(end + 1);
                let complete = std::mem::replace(&mut self.buffer, rest);
                let lines: Vec<Value> = complete
                    .split(|b| *b == b'\n')
                    .filter(|l| !l.is_empty())
                    .filter_map(|l| serde_json::from_slice(l).ok())
                    .collect();
                if !lines.is_empty() {
                    return Ok(Some(lines));
                }
            }
            if self.buffer.len() > MAX_FOLLOW_LINE {
                return Err(ClientError::InvalidRequest(
                    "the server sent a log line longer than 1 MiB".into(),
                ));
            }
            match self
                .response
                .chunk()
                .await
                .map_err(|e| transport_error(&self.url, &e))?
            {
                Some(chunk) => self.buffer.extend_from_slice(&chunk),
                None => return Ok(None),
            }
        }
    }
}
