//! Dev-only test helpers shared across crates, so no test reaches into
//! another crate's `tests/` with `#[path]`. Never a dependency of the
//! binary (only `[dev-dependencies]` name it).
//!
//! - [`victoria_metrics`]: a real VictoriaMetrics on loopback.
//! - [`cpu::cpu_seconds`]: this process's CPU time, for benchmarks.

pub mod cpu;
pub mod victoria_metrics;
