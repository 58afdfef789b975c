//! Dev-only test helpers shared across crates, so no test reaches into
//! another crate's `tests/` by a module path attribute. Never a dependency
//! of the binary (only `[dev-dependencies]` name it).
//!
//! - [`victoria_metrics`]: a real VictoriaMetrics on loopback.
//! - [`otlp_receiver`]: an OTLP/HTTP receiver (metrics, logs, traces) with
//!   injected faults, decoding with the official protobuf types.
//! - [`otlp_metrics`]: builders of OTLP metrics requests and resource
//!   indexes.
//! - [`exporters`]: exporters, secrets, snapshots and traffic for pipeline
//!   tests.
//! - [`line_receiver`]: the delivery tests' loopback receiver (one line per
//!   item, deduplicated by key) with injected faults, and its encoder.
//! - [`progress`]: waits that fail on a stall, not on a wall-clock bound.
//! - [`cpu::cpu_seconds`]: this process's CPU time, for benchmarks.
//! - [`logrotate::binary`]: Debian's `logrotate`, or a SKIPPED line.

pub mod cpu;
pub mod exporters;
pub mod line_receiver;
pub mod logrotate;
pub mod otlp_metrics;
pub mod otlp_receiver;
pub mod progress;
pub mod victoria_metrics;
