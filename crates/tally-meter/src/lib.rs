//! Metering semantics, independent of storage and transport.
//!
//! - [`CompiledMeter`] turns an event into a [`Sample`] (value + group values)
//!   or says exactly why the event cannot be metered.
//! - [`AggState`] is the mergeable state of one aggregation; states of minute
//!   buckets combine into any larger window exactly.
//! - [`window`] cuts `[from, to)` into MINUTE/HOUR/DAY/MONTH windows of an
//!   IANA time zone, and [`QueryPlan`] maps each window onto the fewest
//!   aligned rollup buckets (minute, hour, UTC day).
//! - [`validate`] checks a meter against real traffic before it is published.

mod extract;
mod plan;
mod state;
#[cfg(test)]
mod test_meter;
pub mod validate;
mod value;
pub mod window;

pub use extract::{CompiledMeter, RequiredLabel, Sample, SampleValue, Unmeterable};
pub use plan::{Level, QueryPlan, decompose};
pub use state::{AggState, StateError};
pub use value::{decimal_from_json, decimal_to_json};
pub use window::{Window, WindowError, WindowSize};
