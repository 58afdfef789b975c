//! Tally's data model: usage events (CloudEvents 1.0) and the Kubernetes-style
//! resources that configure metering (`MeterDefinition`, `MonitoredResourceType`).
//!
//! This crate performs no I/O. It parses and validates; it never stores.

pub mod billing;
pub mod condition;
pub mod event;
pub mod instance;
pub mod limits;
pub mod meter;
pub mod nesting;
pub mod resource;
pub mod secret;

pub use condition::Condition;
pub use event::{
    BatchError, CloudEvent, EVENT_MEDIA_TYPES, EventError, FieldError, error_code, field_error,
    media_type, parse_event, split_batch,
};
pub use meter::{
    Aggregation, MAX_JSON_PATH_DEPTH, MeterDefinition, MeterEventMapping, MeterMeasurement,
    MeterPhase, MonitoredResourceType, OpenMeterMeter, ResourceLabel, parse_json_path,
};
pub use resource::{Kind, KindClass, Manifest, ObjectMeta, ResourceError, validate_name};
