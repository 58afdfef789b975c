//! Compute observability's core: what the compute service's instances
//! report about themselves, and what Tally makes of it.
//!
//! - [`lifecycle`]: the lifecycle vocabulary (`LifecycleKind`, `Reason`),
//!   `LifecycleEvent` read from a CloudEvent (validated and bounded), and
//!   `derive` — the transitions an `Instance` resource's status change
//!   implies, with deterministic ids so a re-applied status is a duplicate.
//! - [`store`]: the `LifecycleEvents` contract, and `LifecycleStore`, its
//!   embedded implementation: the durable, deduplicated home of lifecycle
//!   events (its own fjall database; byte layout beside the code). A
//!   cluster implements the same trait (`tally-store-cluster`).
//! - [`metrics`]: `FleetMetrics`, the operator's counters and scheduling
//!   latency histogram, rendered as Prometheus text.
//!
//! **Never:** a clock other than a time passed in; network I/O. Only
//! `store` touches the disk.

pub mod lifecycle;
pub mod metrics;
pub mod store;
pub mod usage;

pub use lifecycle::{LifecycleEvent, LifecycleKind, Reason};
pub use metrics::FleetMetrics;
pub use store::{LifecycleEvents, LifecycleStore, StoreError};
pub use usage::{InstanceUsage, UsageKind};
