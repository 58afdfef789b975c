//! The exporters' core: what customers' `Exporter` resources
//! (`telemetry.datumapis.com/v1alpha1`) ship, to where, and in which shape.
//!
//! - [`Exporter::from_manifest`] validates a manifest into a compiled exporter
//!   and [`accepted_condition`] reports the outcome as a status condition.
//! - [`Router`] selects, for every exporter, the data points of an OTLP
//!   metrics request it may see and asks for, reading namespace and resource
//!   labels from a [`ResourceIndex`].
//! - [`otlp`] decodes received OTLP/HTTP bodies, encodes per-sink requests and
//!   reads a sink's answer; [`DeltaConverter`] turns cumulative series into
//!   deltas for sinks that need them.
//! - [`victoria`] pulls series from VictoriaMetrics in checkpointed windows;
//!   [`pull`] runs that for every exporter source inside the [`Pipeline`]
//!   ([`PipelineOptions::pull`]).
//!
//! **Never:** export a series to an exporter of another project (the router
//! is the only place that decides tenancy, and it reads identity from OTLP
//! resource attributes and the index, never from data points); print a
//! secret (values are [`SecretValue`], whose Debug and Display redact); retry
//! or queue deliveries (that is `tally-delivery`'s job).

pub mod delta;
mod encoder;
pub mod exporter;
mod feeder;
pub mod index;
mod options;
pub mod otlp;
pub mod pipeline;
pub mod pull;
mod receive;
pub mod remote_write;
pub mod resources;
pub mod route;
mod routing;
pub mod secret;
pub mod selector;
pub mod shaping;
mod sink;
pub mod spec;
mod split;
mod sync;
pub mod victoria;
mod wire;

pub use delta::DeltaConverter;
pub use exporter::{
    Authentication, BatchConfig, Compression, Condition, Encoding, Exporter, ExporterKey,
    InvalidExporter, Problem, Reason, RetryConfig, Signal, SinkConfig, Temporality,
    accepted_condition,
};
pub use index::{InMemoryResourceIndex, NamespaceInfo, ResourceIndex, ResourceRef};
pub use opentelemetry_proto::tonic as proto;
pub use options::PullOptions;
pub use pipeline::{
    DropReason, ExporterStatus, IngestReport, Pipeline, PipelineError, PipelineOptions,
    QueueStorage, Secrets, ShapeReport, SinkStatus, Snapshot, UpdateReport,
};
pub use pull::SourceStatus;
pub use receive::NotReady;
pub use route::{EncodedRoute, RouteStats, Routed, Router};
pub use secret::{SecretStore, SecretValue, resolve_headers};
