//! The billing forwarder's core: deliver every billing account's metered
//! usage to a third-party metering service (Amberflo first, OpenMeter too)
//! so that what the provider holds equals what Tally metered, through
//! crashes, retries and late events. Measurement only: no rates, no invoices.
//!
//! - [`attribution`]: which `BillingAccount` owns a project's usage at a time
//!   (from `BillingAccountBinding`s; pure).
//! - [`config`]: the `BillingSink` resource and each meter's api name.
//! - [`UsageSource`]: what the ledger supplies (window totals, and the times
//!   of usage that arrived since a cursor); [`MemoryUsageSource`] for tests.
//! - [`Forwarder`]: per (meter, billing account, closed window, dimension
//!   values) it sends the window's total as a record with a deterministic
//!   `uniqueId`; a window (an hour by default: every record is a billed
//!   meter event) closes `allowedLateness` after it ends. A later change to
//!   a sent window (late event, void, new binding) is sent as a correction
//!   record, a new revision carrying only the difference (negative when
//!   usage went down), so the provider's sum equals the ledger's; one pass
//!   plans at most one revision per (customer, meter, window, dimension
//!   values). Each pass's plan is committed to a fjall store (fsync)
//!   *before* it is sent, and a revision is checkpointed as acknowledged
//!   only after the provider's 2xx; after a crash the unanswered revisions
//!   are sent again with the same `uniqueId`s, which the provider dedupes:
//!   exactly once in effect. Counters (records sent, corrections, dead
//!   letters, retries, events read) and the unattributed usage of every
//!   project without a binding are stored with the progress.
//! - **How a correction reaches Amberflo:** as that signed difference record.
//!   It relies on Amberflo's documented ingest schema, whose `meterValue` is
//!   a JSON number (<https://docs.amberflo.io/docs/meter-ingestion-event-schema>),
//!   on a SUM meter adding its records up, and on deduplication by
//!   `uniqueId`. Amberflo's own undo mechanism, cancelling ingested events
//!   by filtering rule or `uniqueId`
//!   (<https://docs.amberflo.io/docs/meter-events-cancellation>), is not
//!   used: a difference record is idempotent and needs no second API.
//! - Delivery (batching, gzip, retry of 429/5xx/timeouts with backoff and
//!   `Retry-After`, dead letters for other answers) is `tally-delivery`'s;
//!   the provider adapters in [`provider`] only encode. A forwarder sends
//!   through `maxInFlight` lanes (one delivery sink each, fed a batch at a
//!   time from one backlog, so a stalled request holds only its batch;
//!   their dead-letter ids come from one stored counter, so logs and the
//!   CLI agree). Each sink sends through a `tally_delivery::EgressGuard`
//!   ([`ForwarderConfig::egress`]): a provider endpoint at a loopback,
//!   private, link-local... address is refused unless the operator allows
//!   it, and the batch is dead-lettered at once (reason `destination
//!   refused`; retry it once allowed); redirects are not followed.
//! - [`health`]: every attempt's outcome, as the sink's last error
//!   (`ProviderRejected`, `ProviderUnreachable`) until a batch is delivered
//!   again; [`runtime`] adds `Backlogged` when the lag passes `maxLag`.
//! - [`Forwarder::status`] says where forwarding stands;
//!   [`Forwarder::reconcile`] compares, per (account, meter), the ledger's
//!   totals with the provider's own, read through [`usage`] (Amberflo's
//!   usage API, OpenMeter's query API), and with what Tally recorded as
//!   acknowledged, and reports drift either way.
//!
//! **Never:** price or invoice anything; rewrite a record once planned (a
//! change is always a new revision); checkpoint before the provider
//! acknowledged; show the provider API key in a log line, an error, a
//! `Debug` print or any output (it is a [`tally_delivery::Secret`]); put
//! the provider's answer in a status or an error (only its status code and
//! Tally's words; dead letters, admin-only, keep the answer).

pub mod config;
mod forwarder;
pub mod health;
mod lanes;
mod ledger_source;
mod progress;
pub mod provider;
mod record;
pub mod runtime;
mod source;
#[cfg(feature = "test-server")]
pub mod testing;
pub mod usage;

pub use config::{BillingSink, DEFAULT_SECRET_NAMESPACE, ForwardedMeter, Provider, SecretKeyRef};
pub use forwarder::{
    Difference, ForwardError, Forwarder, ForwarderConfig, MeterStatus, PassReport, SinkStatus,
    compare_totals, parse_item_key,
};
pub use health::LastError;
pub use ledger_source::LedgerUsageSource;
pub use progress::{Counters, DeadLetterRecord, MeterCounters, ProgressError, RevisionState};
pub use record::{KeyError, RecordKey, UsageRecord};
pub use source::{
    ChangeCursor, Changes, MemoryUsageSource, SourceError, UsageQuery, UsageSource, UsageTotal,
    follow_changes,
};
pub use tally_delivery::Secret;
/// Attribution lives in the model: the ledger's queries use it too.
pub use tally_model::billing as attribution;
pub use tally_model::billing::{
    Attribution, BillingAccount, BillingAccountBinding, BillingResourceError, Owner,
};
pub use usage::{UsageQueryError, UsageReader};
