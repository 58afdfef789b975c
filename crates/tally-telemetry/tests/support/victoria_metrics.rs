//! A real VictoriaMetrics for a test: the shared helper of `tally-testkit`.
pub use tally_testkit::victoria_metrics::*;
