//! The one delivery mechanism every Tally sink uses to push data to a remote
//! HTTP endpoint (edge agent → ledger, billing forwarder → provider,
//! exporters → customer OTLP endpoints).
//!
//! A sink only *encodes*: it implements [`Encoder`] (a batch of opaque
//! [`Item`]s → an [`HttpRequest`], and optionally what an answer means). This
//! crate does the rest, once, for every sink:
//!
//! - a bounded queue per sink, in memory or on disk (fjall), limited by items
//!   and bytes; [`Sink::enqueue`] waits when it is full, [`Sink::try_enqueue`]
//!   refuses and counts the drop. With [`Storage::Disk`] and `sync`, an item
//!   is fsync'd before `enqueue` returns and leaves the disk only once its
//!   batch was delivered or dead-lettered (so it survives kill -9);
//! - batching by [`BatchConfig`] `max_items`, `max_bytes` and `timeout`;
//! - retries with exponential backoff and full jitter, `Retry-After`
//!   (delta-seconds or HTTP-date, capped; it throttles the whole sink, so the
//!   next batch waits it out too, even if the one it answered is given up),
//!   attempt and time limits, a request timeout;
//! - a dead-letter list (status, first 4 KiB of the answer, attempts, time)
//!   to list, re-queue or delete;
//! - an outcome hook per batch carrying the items' keys, so a caller can
//!   checkpoint after the receiver acknowledged;
//! - [`Registry`]: the component metrics every Tally component shares,
//!   rendered in the Prometheus text format;
//! - [`EgressGuard`]: for a sink whose endpoint a customer chose, a client
//!   that dials no loopback, private, link-local... address unless the
//!   operator's [`EgressPolicy`] allows it (checked at connect time),
//!   follows no redirect and uses no proxy ([`SinkBuilder::egress`]).
//!
//! Each sink runs on its own task with its own queue, so one slow or dead
//! endpoint never slows another. Delivery is at least once: a batch may be
//! sent again after a crash or a lost answer, so receivers dedupe by key.
//!
//! **Never:** look inside items, log or show secrets (wrap them in
//! [`Secret`]; [`HttpRequest::secret_header`] marks them sensitive), build a
//! `reqwest::Client` without [`client_builder`], send to an endpoint a
//! customer chose without an [`EgressGuard`], or remove an item from a
//! queue before its batch's fate is decided.
//!
//! ```no_run
//! use tally_delivery::{Encoder, EncodeError, HttpRequest, Item, Sink, SinkConfig};
//!
//! struct NdJson(reqwest::Url);
//!
//! impl Encoder for NdJson {
//!     fn encode(&self, items: &[Item]) -> Result<HttpRequest, EncodeError> {
//!         let body: Vec<u8> = items
//!             .iter()
//!             .flat_map(|i| i.data.iter().copied().chain([b'\n']))
//!             .collect();
//!         Ok(HttpRequest::post(self.0.clone()).body(body).gzip(true))
//!     }
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let url = reqwest::Url::parse("http://127.0.0.1:8080/ingest")?;
//! let sink = Sink::builder(SinkConfig::new("example"), NdJson(url))
//!     .on_outcome(|outcome| println!("{:?}", outcome.result))
//!     .start()?;
//! sink.enqueue(Item::new("id-1", r#"{"n":1}"#)).await?;
//! sink.shutdown(std::time::Duration::from_secs(5)).await;
//! # Ok(()) }
//! ```

use std::sync::Once;

mod config;
mod egress;
mod encode;
mod metrics;
mod queue;
mod retry;
mod sink;

pub use config::{BatchConfig, QueueConfig, RetryConfig, SinkConfig, Storage};
pub use egress::{
    AddressClass, EgressConfig, EgressConfigError, EgressGuard, EgressPolicy, EgressRefused,
    address_class,
};
pub use encode::{Answer, EncodeError, Encoder, HttpRequest, Item, Secret, Verdict};
pub use metrics::{ComponentKind, ComponentMetrics, Registry};
pub use queue::{DeadLetter, EnqueueError, QueueError};
pub use sink::{
    AttemptHook, AttemptReport, BatchOutcome, BatchResult, DESTINATION_REFUSED, OutcomeHook,
    ShutdownReport, Sink, SinkBuilder, StartError, read_capped,
};

/// Installs the process-wide TLS crypto provider (`ring`) once.
///
/// Tally uses one crypto provider for every crate (`ring`, which the NATS
/// client also brings), so reqwest is built without a provider of its own and
/// any HTTP client must be made after this has run. [`client_builder`] calls
/// it; call it directly only when building a `reqwest::Client` some other
/// way.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only if another provider was installed first, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A `reqwest::ClientBuilder` with TLS ready to use.
pub fn client_builder() -> reqwest::ClientBuilder {
    install_crypto_provider();
    reqwest::Client::builder()
}
