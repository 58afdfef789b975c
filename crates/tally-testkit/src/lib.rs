//! Dev-only test helpers shared across crates, so no test reaches into
//! another crate's `tests/` with `#[path]`. Never a dependency of the
//! binary (only `[dev-dependencies]` name it).
//!
//! - [`victoria_metrics`]: a real VictoriaMetrics on loopback.

pub mod victoria_metrics;
