//! `TelemetryPolicy`'s pure core (`telemetry.datumapis.com/v1alpha1`): what
//! a project's gateways' access logs, metrics, traces and GenAI token usage
//! look like when they reach the project's exporters.
//!
//! - [`vocab`]: the attributes a policy may name (Envoy's `request.*`,
//!   `response.*`, `connection.*`, `source.*`, `destination.*`, `xds.*`,
//!   and Tally's `route.*`, `project`, `gen_ai.*`) and their types.
//! - [`CompiledExpr`]: a CEL expression bounded, parsed and type-checked
//!   once per policy version ([`check`]); evaluation never fails a record,
//!   and a record missing an attribute does not match. Comparisons joined
//!   by `&&`/`||`/`!` are evaluated natively on the record (`fast`), the
//!   rest by the `cel` interpreter, with the same results.
//! - [`Policy::from_manifest`]: a manifest's spec validated into a policy;
//!   the error is the `Invalid` message.
//! - [`Resolution::resolve`]: which policy governs which Gateway or
//!   Namespace (Gateway over Namespace, then the oldest, then
//!   namespace/name) and every policy's status.
//! - [`JsonFields`]: a JSON access-log line's fields, borrowed from its
//!   text (no `serde_json::Value`).
//! - [`render`]: the Envoy Gateway `EnvoyProxy` `spec.telemetry` equivalent
//!   to the policies in force.
//!
//! **Never:** I/O, a clock, or knowledge of HTTP or storage. **Invariant:**
//! a policy only governs records of its own project: [`Resolution::policy_for`]
//! compares the record's project with the policy's.

pub mod check;
pub mod expr;
mod fast;
pub mod json;
pub mod policy;
pub mod record;
pub mod render;
pub mod resolve;
pub mod spec;
pub mod vocab;

pub use expr::CompiledExpr;
pub use json::JsonFields;
pub use policy::{GenAiPoint, KeyValue, Policy, PolicyKey, Source, TracingMode, keep_trace};
pub use record::{AttrValue, Field, Record, RecordBuilder};
pub use resolve::{Resolution, Target, World};
