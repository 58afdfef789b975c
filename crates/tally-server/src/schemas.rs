//! The shapes of the OpenMeter-compatible bodies, for `/openapi.json`.
//!
//! The handlers answer with the model's and the ledger's own types, which
//! know nothing of OpenAPI; these mirror them field by field so that the
//! document is precise enough to generate a typed client. The SDK suite
//! (`crates/tally/tests/sdk.rs`) validates every answer it records against
//! the document, so a mirror that drifts from what is sent fails there.
#![allow(dead_code)]

use std::collections::BTreeMap;

use serde_json::Value;
use utoipa::ToSchema;

/// An aggregation.
#[derive(ToSchema)]
pub enum MeterAggregation {
    #[schema(rename = "SUM")]
    Sum,
    #[schema(rename = "COUNT")]
    Count,
    #[schema(rename = "UNIQUE_COUNT")]
    UniqueCount,
    #[schema(rename = "AVG")]
    Avg,
    #[schema(rename = "MIN")]
    Min,
    #[schema(rename = "MAX")]
    Max,
    #[schema(rename = "LATEST")]
    Latest,
}

/// A window size.
#[derive(ToSchema)]
pub enum WindowSize {
    #[schema(rename = "MINUTE")]
    Minute,
    #[schema(rename = "HOUR")]
    Hour,
    #[schema(rename = "DAY")]
    Day,
    #[schema(rename = "MONTH")]
    Month,
}

/// A meter (the OpenMeter view of a `MeterDefinition`).
#[derive(ToSchema)]
#[schema(as = Meter)]
#[allow(non_snake_case)]
pub struct Meter {
    /// The MeterDefinition's uid.
    id: String,
    slug: String,
    #[schema(nullable = false)]
    name: Option<String>,
    #[schema(nullable = false)]
    description: Option<String>,
    aggregation: MeterAggregation,
    eventType: String,
    /// JSONPath of the value in the event's `data`.
    #[schema(nullable = false)]
    valueProperty: Option<String>,
    /// Dimension name to JSONPath.
    groupBy: BTreeMap<String, String>,
    #[schema(format = DateTime)]
    createdAt: String,
    #[schema(format = DateTime)]
    updatedAt: String,
}

/// What `POST /api/v1/meters` takes.
#[derive(ToSchema)]
#[allow(non_snake_case)]
pub struct MeterCreate {
    slug: String,
    #[schema(nullable = false)]
    name: Option<String>,
    #[schema(nullable = false)]
    description: Option<String>,
    aggregation: MeterAggregation,
    eventType: String,
    #[schema(nullable = false)]
    valueProperty: Option<String>,
    #[schema(nullable = false)]
    groupBy: Option<BTreeMap<String, String>>,
}

/// What `PUT /api/v1/meters/{slug}` takes.
#[derive(ToSchema)]
#[allow(non_snake_case)]
pub struct MeterUpdate {
    #[schema(nullable = false)]
    name: Option<String>,
    #[schema(nullable = false)]
    description: Option<String>,
    #[schema(nullable = false)]
    groupBy: Option<BTreeMap<String, String>>,
}

/// What `POST /api/v1/meters/{slug}/query` takes.
#[derive(ToSchema)]
#[allow(non_snake_case)]
pub struct MeterQueryRequest {
    /// Accepted and ignored.
    #[schema(nullable = false)]
    clientId: Option<String>,
    #[schema(nullable = false, format = DateTime)]
    from: Option<String>,
    #[schema(nullable = false, format = DateTime)]
    to: Option<String>,
    #[schema(nullable = false)]
    windowSize: Option<WindowSize>,
    #[schema(nullable = false)]
    windowTimeZone: Option<String>,
    #[schema(nullable = false)]
    subject: Option<Vec<String>>,
    #[schema(nullable = false)]
    groupBy: Option<Vec<String>>,
    /// One value per dimension.
    #[schema(nullable = false)]
    filterGroupBy: Option<BTreeMap<String, Vec<String>>>,
    #[schema(nullable = false)]
    limit: Option<u64>,
    #[schema(nullable = false)]
    cursor: Option<String>,
}

/// One row of a meter query.
#[derive(ToSchema)]
#[allow(non_snake_case)]
pub struct MeterQueryRow {
    /// The aggregate (exact decimal, as a JSON number).
    value: f64,
    #[schema(format = DateTime)]
    windowStart: String,
    #[schema(format = DateTime)]
    windowEnd: String,
    /// Null unless rows are per subject.
    subject: Option<String>,
    groupBy: BTreeMap<String, Option<String>>,
}

/// A meter query's answer.
#[derive(ToSchema)]
#[allow(non_snake_case)]
pub struct MeterQueryResult {
    #[schema(format = DateTime)]
    from: String,
    #[schema(format = DateTime)]
    to: String,
    windowSize: Option<WindowSize>,
    windowTimeZone: String,
    data: Vec<MeterQueryRow>,
    #[schema(nullable = false)]
    nextCursor: Option<String>,
}

/// A CloudEvents 1.0 event as stored.
#[derive(ToSchema)]
#[allow(non_snake_case)]
pub struct Event {
    specversion: String,
    id: String,
    source: String,
    #[schema(rename = "type")]
    kind: String,
    subject: String,
    #[schema(format = DateTime)]
    time: String,
    #[schema(nullable = false)]
    datacontenttype: Option<String>,
    #[schema(nullable = false)]
    dataschema: Option<String>,
    #[schema(value_type = Option<Object>, nullable = false)]
    data: Option<Value>,
}

/// The audit record of a voided event.
#[derive(ToSchema)]
#[allow(non_snake_case)]
pub struct VoidRecord {
    seq: u64,
    source: String,
    id: String,
    #[schema(rename = "type")]
    kind: String,
    subject: String,
    #[schema(format = DateTime)]
    eventTime: String,
    reason: String,
    voidedBy: String,
    #[schema(format = DateTime)]
    voidedAt: String,
}

/// A stored event: OpenMeter's `IngestedEvent`, with Tally's log position
/// and void record.
#[derive(ToSchema)]
#[allow(non_snake_case)]
pub struct IngestedEvent {
    event: Event,
    #[schema(format = DateTime)]
    ingestedAt: String,
    /// Tally stores an event when it takes it: `ingestedAt`.
    #[schema(format = DateTime)]
    storedAt: String,
    /// Position in the log.
    seq: u64,
    #[schema(nullable = false)]
    voided: Option<VoidRecord>,
}

/// A page of stored events.
#[derive(ToSchema)]
#[allow(non_snake_case)]
pub struct IngestedEventPage {
    items: Vec<IngestedEvent>,
    #[schema(nullable = false)]
    nextCursor: Option<String>,
}

/// One event stored but put in quarantine for a meter.
#[derive(ToSchema)]
pub struct QuarantineNotice {
    index: u64,
    id: String,
    meter: String,
    reason: String,
    message: String,
}

/// What an ingest did (with `Prefer: return=representation`).
#[derive(ToSchema)]
pub struct IngestOutcome {
    accepted: u64,
    duplicates: u64,
    #[schema(nullable = false)]
    quarantined: Option<Vec<QuarantineNotice>>,
    #[schema(nullable = false)]
    warnings: Option<Vec<String>>,
}

/// A subject: a key usage events name, derived from stored usage.
#[derive(ToSchema)]
#[allow(non_snake_case)]
pub struct Subject {
    /// The key itself.
    id: String,
    key: String,
    /// When its first measured usage happened.
    #[schema(format = DateTime)]
    createdAt: String,
    /// When its last measured usage happened.
    #[schema(format = DateTime)]
    updatedAt: String,
}

/// One problem with one attribute of an event.
#[derive(ToSchema)]
pub struct FieldProblem {
    field: String,
    /// A stable code: MISSING_REQUIRED_FIELD, INVALID_VALUE_TYPE, TOO_LATE, ...
    code: String,
    reason: String,
}

/// Every problem of one bad event of a request.
#[derive(ToSchema)]
pub struct EventProblem {
    /// Its position in the request.
    index: u64,
    #[schema(nullable = false)]
    id: Option<String>,
    errors: Vec<FieldProblem>,
}

/// A resource's `metadata`.
#[derive(ToSchema)]
#[allow(non_snake_case)]
pub struct ObjectMeta {
    name: String,
    #[schema(nullable = false)]
    namespace: Option<String>,
    #[schema(nullable = false)]
    labels: Option<BTreeMap<String, String>>,
    #[schema(nullable = false)]
    annotations: Option<BTreeMap<String, String>>,
    #[schema(nullable = false)]
    uid: Option<String>,
    #[schema(nullable = false, format = DateTime)]
    creationTimestamp: Option<String>,
    #[schema(nullable = false)]
    generation: Option<u64>,
    #[schema(nullable = false, format = DateTime)]
    updateTimestamp: Option<String>,
}

/// A resource of any kind; `spec` (and a Secret's `data`, `stringData`,
/// `type`) follow its kind, `status` is written by Tally.
#[derive(ToSchema)]
#[allow(non_snake_case)]
pub struct Resource {
    apiVersion: String,
    kind: String,
    metadata: ObjectMeta,
    #[schema(value_type = Option<Object>, nullable = false)]
    spec: Option<Value>,
    #[schema(value_type = Option<Object>, nullable = false)]
    status: Option<Value>,
}

/// `GET /apis/{plural}`.
#[derive(ToSchema)]
#[allow(non_snake_case)]
pub struct ResourceList {
    /// `v1`.
    apiVersion: String,
    /// `List`.
    kind: String,
    items: Vec<Resource>,
}

/// The answer to a void.
#[derive(ToSchema)]
#[allow(non_snake_case)]
pub struct VoidOutcome {
    alreadyVoided: bool,
    record: VoidRecord,
    /// Retired meters that cannot take the event back out.
    #[schema(nullable = false)]
    stillCountedBy: Option<Vec<String>>,
}

/// A page of void records.
#[derive(ToSchema)]
#[allow(non_snake_case)]
pub struct VoidPage {
    items: Vec<VoidRecord>,
    #[schema(nullable = false)]
    nextCursor: Option<String>,
}

/// A stored event a meter cannot measure, and why.
#[derive(ToSchema)]
pub struct QuarantinedEvent {
    meter: String,
    reason: String,
    message: String,
    event: StoredEvent,
}

/// An event as the ledger keeps it.
#[derive(ToSchema)]
#[allow(non_snake_case)]
pub struct StoredEvent {
    seq: u64,
    #[schema(format = DateTime)]
    ingestedAt: String,
    event: Event,
    #[schema(nullable = false)]
    voided: Option<VoidRecord>,
}

/// A page of quarantined events.
#[derive(ToSchema)]
#[allow(non_snake_case)]
pub struct QuarantinePage {
    items: Vec<QuarantinedEvent>,
    #[schema(nullable = false)]
    nextCursor: Option<String>,
}

/// An instance with lifecycle events, and its latest state.
#[derive(ToSchema)]
#[allow(non_snake_case)]
pub struct InstanceSummary {
    project: String,
    instance: String,
    #[schema(nullable = false)]
    namespace: Option<String>,
    #[schema(nullable = false)]
    workload: Option<String>,
    #[schema(nullable = false)]
    node: Option<String>,
    /// The kind of the latest event: created, scheduled, started, stopped, crashed, oom_killed, terminated.
    state: String,
    #[schema(nullable = false)]
    reason: Option<String>,
    #[schema(format = DateTime)]
    since: String,
    events: u64,
}

/// A page of instances.
#[derive(ToSchema)]
#[allow(non_snake_case)]
pub struct InstancePage {
    items: Vec<InstanceSummary>,
    #[schema(nullable = false)]
    nextCursor: Option<String>,
}

/// One lifecycle event of an instance.
#[derive(ToSchema)]
#[allow(non_snake_case)]
pub struct LifecycleEvent {
    source: String,
    id: String,
    /// created, scheduled, started, stopped, crashed, oom_killed or terminated.
    kind: String,
    /// Available, Stopping, ImageUnavailable, ConfigurationError, InstanceCrashing, Failed or Terminating.
    #[schema(nullable = false)]
    reason: Option<String>,
    #[schema(format = DateTime)]
    time: String,
    project: String,
    instance: String,
    #[schema(nullable = false)]
    namespace: Option<String>,
    #[schema(nullable = false)]
    workload: Option<String>,
    #[schema(nullable = false)]
    uid: Option<String>,
    #[schema(nullable = false)]
    node: Option<String>,
    #[schema(nullable = false)]
    message: Option<String>,
}

/// A page of lifecycle events.
#[derive(ToSchema)]
#[allow(non_snake_case)]
pub struct LifecycleEventPage {
    items: Vec<LifecycleEvent>,
    #[schema(nullable = false)]
    nextCursor: Option<String>,
}
