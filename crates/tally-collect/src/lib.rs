//! The edge agent's core: Envoy Gateway access logs in, gateway usage
//! CloudEvents out, exactly once across restarts and retries.
//!
//! Pipeline: [`tail::FileTailer`] reads whole lines from rotating log files →
//! [`aggregate::Aggregator`] parses ([`record`]), attributes to an HTTPRoute
//! ([`route`]) and sums per (route, window) → closed amounts become
//! CloudEvents with deterministic ids ([`event`]), enriched with gateway
//! dimensions ([`enrich`]) → [`collector::Collector`] keeps them in a durable
//! outbox until the shipper acknowledges them. [`lifecycle`] validates the
//! gateway controller's connection lifecycle CloudEvents and applies them
//! once per (`source`, `id`). [`instance_log`] maps compute instances'
//! log files to instances by path pattern and joins CRI partial lines into
//! whole records. [`generate`] writes realistic
//! corpora with their exact expected totals. [`agent`] is the runtime of
//! `tally collect` built on them: config, OTLP logs receivers (gRPC and
//! HTTP), the connection lifecycle receiver, the Envoy admin gauge sampler
//! and the `tally-delivery` sink to the ledger.
//!
//! # Example
//! ```
//! use tally_collect::{AgentIdentity, Aggregator, EnrichmentIndex, WindowConfig, usage_event};
//!
//! let mut aggregator = Aggregator::new(WindowConfig::default());
//! let mut closed = Vec::new();
//! for line in [
//!     r#"{"start_time":"2024-05-01T12:00:01.250Z","route_name":"httproute/shop/api/rule/0","bytes_received":"120","bytes_sent":2048,"duration":"35"}"#,
//!     r#"{"start_time":"2024-05-01T12:00:02.000Z","route_name":"-","bytes_sent":"9"}"#,
//!     "not json",
//! ] {
//!     aggregator.push_line(line.as_bytes(), &mut closed);
//! }
//! aggregator.flush(&mut closed); // end of input
//! let agent = AgentIdentity { agent_id: "node-a".into(), source: "tally-collect/node-a".into() };
//! let events: Vec<_> = closed
//!     .iter()
//!     .map(|usage| usage_event(&agent, usage, &EnrichmentIndex::default()))
//!     .collect();
//! assert_eq!(events.len(), 4); // requests, ingress and egress bytes, connection seconds
//! assert_eq!(events[0].subject, "projects/shop");
//! assert_eq!(events[3].data.as_ref().unwrap()["value"], "0.035"); // 35 ms, exactly
//! assert_eq!(aggregator.diagnostics().unattributable(), 1);
//! assert_eq!(aggregator.diagnostics().malformed(), 1);
//! ```
//!
//! # Exactly-once invariant
//! The collector's checkpoint — file positions, the aggregator state (open
//! window sums, watermark, closing round, open
//! connections), for lifecycle inputs the (`source`, `id`) pairs applied —
//! and every event emitted since the previous checkpoint are
//! written in **one** fjall batch committed with `PersistMode::SyncAll`.
//! Events are handed out for shipping only from that outbox. So after a
//! crash the state on disk always matches the events on disk: the lines after
//! the checkpoint are read again, the same rounds close the same windows,
//! and the same event ids come out. Shipping is at-least-once; the ledger's
//! dedupe by (`source`, `id`) makes it exactly once.
//!
//! # Connection seconds: which input attributes what
//! - **Request records** (no `access_log_type`, or `NotSet`): the request's
//!   `duration` counts in the window of its `start_time`. The default for
//!   plain HTTP: a request is one use of a connection or stream.
//! - **Periodic records** (`DownstreamPeriodic`/`DownstreamEnd` keyed by
//!   `x-request-id`, `TcpPeriodic`/`TcpConnectionEnd` keyed by
//!   `connection_id`, or [`ConnectionRecord`]s): cumulative counters, of which
//!   each record adds only what its stream gained, split across the windows
//!   it spans. Use Envoy's `access_log_flush_interval` for WebSockets, gRPC
//!   streams and TCP routes, so long connections are billed every window.
//! - **Lifecycle events** ([`ConnectionEvent`] open/close, from the gateway
//!   controller as CloudEvents ([`lifecycle`]) or from embedders that see
//!   connections directly): an open connection is accounted up to the
//!   closing boundary at every round; the agent's lifecycle input runs
//!   rounds by its clock, so a connection is billed every window without
//!   further events. A close that arrives after its window closed cannot
//!   take back the time already billed (`connection_closed_late`).
//! - **Gauge samples** ([`GaugeSample`], from Envoy's admin
//!   `downstream_cx_active` gauges in [`agent`]): open connections × time
//!   since the previous sample, per mapped route.
//!
//! Without periodic records a long-lived stream is billed once, when its end
//! record arrives, in the window it started in. See [`aggregate`] for details.
//!
//! # Never
//! - Never drops a line silently: malformed and unattributable lines are
//!   counted by reason with examples ([`record::LineDiagnostics`]).
//! - Never hands out an event that is not durable, nor forgets one that was
//!   not acknowledged.
//! - Never uses a randomised hash or the wall clock for anything that decides
//!   an event id or a window. (The idle flush and the lifecycle input's
//!   clock decide when rounds run, hence how amounts split into events,
//!   never which window time belongs to; events are committed with the
//!   state that produced them, so a replay after a crash repeats none.)
//! - The core (everything but [`agent`]) never performs network I/O nor
//!   reads the clock; [`agent`] does, and leaves retries and queues to
//!   `tally-delivery`.

pub mod agent;
pub mod aggregate;
pub mod collector;
pub mod enrich;
pub mod event;
pub mod generate;
pub mod instance_log;
pub mod lifecycle;
pub mod record;
pub mod route;
pub mod tail;

pub use aggregate::{
    Aggregator, AggregatorState, ConnectionEvent, ConnectionRecord, Meter, Totals, WindowConfig,
    WindowUsage, millis_as_seconds, seconds_as_millis,
};
pub use collector::{
    CollectError, Collector, CollectorConfig, CollectorStats, GaugeSample, PollReport,
};
pub use enrich::{EnrichError, EnrichmentIndex, RouteDimensions};
pub use event::{AgentIdentity, event_id, usage_event};
pub use generate::{CorpusConfig, CorpusGenerator, ExpectedTotals, write_corpus};
pub use lifecycle::{
    CONNECTION_CLOSED, CONNECTION_OPENED, Change, LifecycleApplier, LifecycleRecord,
};
pub use record::{AccessRecord, LineDiagnostics, LineProblem, parse_access_line};
pub use route::{RouteKey, RouteName, parse_route_name};
