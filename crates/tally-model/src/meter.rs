//! `MeterDefinition` and `MonitoredResourceType`: typed specs, validation,
//! the forward-only phase rules, and the OpenMeter view of a meter.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use serde_json_path::JsonPath;

use crate::resource::{Kind, Manifest, ObjectMeta, ResourceError, validate_name};

/// How deep brackets and parentheses may nest in a JSONPath: filters
/// nested deeper take serde_json_path exponential time to parse, and a
/// few hundred levels overflow the stack.
pub const MAX_JSON_PATH_DEPTH: usize = 10;

/// Parses a JSONPath (RFC 9535) of a meter or resource type, refusing one
/// nested deeper than [`MAX_JSON_PATH_DEPTH`], or ending inside a `\u`
/// escape, unread. The error is the reason alone; callers say which path
/// it is.
pub fn parse_json_path(path: &str) -> Result<JsonPath, String> {
    if crate::nesting::nesting_exceeds(path.as_bytes(), MAX_JSON_PATH_DEPTH) {
        return Err(format!(
            "brackets and parentheses nest deeper than {MAX_JSON_PATH_DEPTH} levels"
        ));
    }
    if ends_inside_unicode_escape(path) {
        return Err("the path ends inside a \\u escape".into());
    }
    JsonPath::parse(path).map_err(|e| e.to_string())
}

/// Whether `path` ends within the four hex digits of a `\u` escape:
/// serde_json_path 0.7 reads those with a streaming parser and panics
/// ("we do not use streaming parsers") when the text ends there. Such a
/// path is an unterminated string, never valid.
fn ends_inside_unicode_escape(path: &str) -> bool {
    path.rfind("\\u").is_some_and(|at| {
        let rest = &path.as_bytes()[at + 2..];
        rest.len() < 4 && rest.iter().all(u8::is_ascii_hexdigit)
    })
}

/// The JSONPath of member `name` of the node at `parent`, whatever the
/// name holds (RFC 9535 escapes in a single-quoted name).
fn member_path(parent: &str, name: &str) -> String {
    let mut path = format!("{parent}['");
    for c in name.chars() {
        match c {
            '\\' => path.push_str("\\\\"),
            '\'' => path.push_str("\\'"),
            c if u32::from(c) < 0x20 => path.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => path.push(c),
        }
    }
    path.push_str("']");
    path
}

/// How a meter combines the values of its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Aggregation {
    Sum,
    Count,
    UniqueCount,
    Avg,
    Min,
    Max,
    Latest,
}

impl Aggregation {
    pub const ALL: [Aggregation; 7] = [
        Aggregation::Sum,
        Aggregation::Count,
        Aggregation::UniqueCount,
        Aggregation::Avg,
        Aggregation::Min,
        Aggregation::Max,
        Aggregation::Latest,
    ];

    /// The OpenMeter spelling, upper case.
    pub fn as_str(self) -> &'static str {
        match self {
            Aggregation::Sum => "SUM",
            Aggregation::Count => "COUNT",
            Aggregation::UniqueCount => "UNIQUE_COUNT",
            Aggregation::Avg => "AVG",
            Aggregation::Min => "MIN",
            Aggregation::Max => "MAX",
            Aggregation::Latest => "LATEST",
        }
    }

    /// Whether events must carry a value for this aggregation.
    pub fn needs_value(self) -> bool {
        self != Aggregation::Count
    }
}

impl fmt::Display for Aggregation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Aggregation {
    type Err = String;

    /// Case-insensitive; `UniqueCount` and `unique_count` are the same.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let normal: String = s
            .chars()
            .filter(|c| *c != '_')
            .map(|c| c.to_ascii_uppercase())
            .collect();
        Aggregation::ALL
            .into_iter()
            .find(|a| a.as_str().replace('_', "") == normal)
            .ok_or_else(|| {
                format!("unknown aggregation {s:?}; use SUM, COUNT, UNIQUE_COUNT, AVG, MIN, MAX or LATEST")
            })
    }
}

impl Serialize for Aggregation {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Aggregation {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A meter's life cycle. Phases only move forward.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum MeterPhase {
    #[default]
    Draft,
    Published,
    Deprecated,
    Retired,
}

/// `spec.measurement` of a `MeterDefinition`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeterMeasurement {
    pub aggregation: Aggregation,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dimensions: Vec<String>,
}

/// `spec.event` of a `MeterDefinition`: how events map to the meter. Every
/// field is optional; the defaults read the platform's own usage events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeterEventMapping {
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_property: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dimensions: BTreeMap<String, String>,
}

impl MeterEventMapping {
    fn is_default(&self) -> bool {
        self == &MeterEventMapping::default()
    }
}

/// `spec` of a `MeterDefinition`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeterDefinition {
    pub meter_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default)]
    pub phase: MeterPhase,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub monitored_resource_types: Vec<String>,
    pub measurement: MeterMeasurement,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub billing: Option<Value>,
    #[serde(default, skip_serializing_if = "MeterEventMapping::is_default")]
    pub event: MeterEventMapping,
}

/// The JSONPath that reads a platform usage event's value.
pub const DEFAULT_VALUE_PROPERTY: &str = "$.value";

impl MeterDefinition {
    /// Parses and validates the spec of a manifest.
    pub fn from_manifest(manifest: &Manifest) -> Result<Self, ResourceError> {
        let invalid = |message: String| ResourceError::Invalid {
            kind: Kind::MeterDefinition,
            name: manifest.metadata.name.clone(),
            message,
        };
        validate_name(&manifest.metadata.name).map_err(invalid)?;
        let spec: MeterDefinition = serde_json::from_value(manifest.spec.clone())
            .map_err(|e| invalid(format!("spec: {e}")))?;
        spec.validate().map_err(invalid)?;
        Ok(spec)
    }

    fn validate(&self) -> Result<(), String> {
        if self.meter_name.trim().is_empty() {
            return Err("spec.meterName is required".into());
        }
        if self.event_type().is_empty() {
            return Err("spec.event.type must not be empty".into());
        }
        for (field, value) in [
            ("spec.meterName", self.meter_name.as_str()),
            ("spec.event.type", self.event_type()),
        ] {
            crate::limits::check_len(field, value, crate::limits::MAX_ATTRIBUTE_BYTES)
                .map_err(|e| format!("{field} {}", e.reason))?;
        }
        let dimensions = self.group_by().len();
        if dimensions > crate::limits::MAX_METER_DIMENSIONS {
            return Err(format!(
                "the meter declares {dimensions} dimensions; the limit is {}",
                crate::limits::MAX_METER_DIMENSIONS
            ));
        }
        if let Some(path) = self.value_property() {
            parse_json_path(path)
                .map_err(|e| format!("spec.event.valueProperty {path:?} is not JSONPath: {e}"))?;
        } else if self.measurement.aggregation.needs_value() {
            return Err(format!(
                "aggregation {} needs spec.event.valueProperty",
                self.measurement.aggregation
            ));
        }
        for (name, path) in self.group_by() {
            // `billing_account` is the ledger's: usage grouped by the account
            // its project was bound to at the time.
            if name.is_empty()
                || ["subject", "windowStart", "windowEnd", "billing_account"]
                    .contains(&name.as_str())
            {
                return Err(format!("dimension name {name:?} is reserved or empty"));
            }
            if name.len() > crate::limits::MAX_DIMENSION_NAME_BYTES {
                return Err(format!(
                    "dimension name of {} bytes is longer than the limit of {} bytes",
                    name.len(),
                    crate::limits::MAX_DIMENSION_NAME_BYTES
                ));
            }
            parse_json_path(&path)
                .map_err(|e| format!("dimension {name:?}: {path:?} is not JSONPath: {e}"))?;
        }
        Ok(())
    }

    /// The CloudEvents `type` this meter reads.
    pub fn event_type(&self) -> &str {
        self.event.event_type.as_deref().unwrap_or(&self.meter_name)
    }

    /// JSONPath of the value, if the aggregation uses one.
    pub fn value_property(&self) -> Option<&str> {
        match (&self.event.value_property, self.measurement.aggregation) {
            (Some(path), _) => Some(path),
            (None, Aggregation::Count) => None,
            (None, _) => Some(DEFAULT_VALUE_PROPERTY),
        }
    }

    /// Dimension name → JSONPath. Declared dimensions without an explicit
    /// path read `$.dimensions.<name>`, the platform's event shape.
    pub fn group_by(&self) -> BTreeMap<String, String> {
        let mut paths = self.event.dimensions.clone();
        for name in &self.measurement.dimensions {
            paths
                .entry(name.clone())
                .or_insert_with(|| member_path("$.dimensions", name));
        }
        paths
    }

    /// Whether events must not carry `data.dimensions` keys the meter does
    /// not declare. True for meters that read the platform's own shape.
    pub fn strict_dimensions(&self) -> bool {
        self.event.dimensions.is_empty() && !self.measurement.dimensions.is_empty()
    }

    /// Checks that `next` may replace `self`: phases move only forward, and
    /// from `Published` on, the fields that give past usage its meaning are frozen.
    pub fn check_update(&self, next: &MeterDefinition) -> Result<(), String> {
        if next.phase < self.phase {
            return Err(format!(
                "phase may only move forward (Draft → Published → Deprecated → Retired); it is {:?} and cannot become {:?}",
                self.phase, next.phase
            ));
        }
        if self.phase >= MeterPhase::Published {
            let frozen: [(&str, String, String); 5] = [
                (
                    "spec.meterName",
                    self.meter_name.clone(),
                    next.meter_name.clone(),
                ),
                (
                    "spec.measurement.unit",
                    format!("{:?}", self.measurement.unit),
                    format!("{:?}", next.measurement.unit),
                ),
                (
                    "spec.measurement.aggregation",
                    self.measurement.aggregation.to_string(),
                    next.measurement.aggregation.to_string(),
                ),
                (
                    "spec.event.type",
                    self.event_type().into(),
                    next.event_type().into(),
                ),
                (
                    "spec.event.valueProperty",
                    format!("{:?}", self.value_property()),
                    format!("{:?}", next.value_property()),
                ),
            ];
            if let Some((field, old, new)) = frozen.into_iter().find(|(_, old, new)| old != new) {
                return Err(format!(
                    "{field} cannot change once a meter is {:?} (it is {old}, the update says {new}); create a new meter instead",
                    self.phase
                ));
            }
        }
        Ok(())
    }

    /// Whether a change from `self` to `next` changes what the meter computes
    /// from the log, so that its rollups must be rebuilt.
    pub fn measures_differently(&self, next: &MeterDefinition) -> bool {
        self.event_type() != next.event_type()
            || self.value_property() != next.value_property()
            || self.measurement.aggregation != next.measurement.aggregation
            || self.group_by() != next.group_by()
            || self.strict_dimensions() != next.strict_dimensions()
    }
}

/// One label of a `MonitoredResourceType`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceLabel {
    pub name: String,
    #[serde(default)]
    pub required: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Where in the event's `data` the label is read; `$.resource.<name>`
    /// unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

impl ResourceLabel {
    pub fn path(&self) -> String {
        self.path
            .clone()
            .unwrap_or_else(|| member_path("$.resource", &self.name))
    }
}

/// `spec.gvk` of a `MonitoredResourceType`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupVersionKind {
    #[serde(default)]
    pub group: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    #[serde(default)]
    pub kind: String,
}

/// `spec` of a `MonitoredResourceType`: a billable kind of resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MonitoredResourceType {
    pub resource_type_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default)]
    pub gvk: GroupVersionKind,
    #[serde(default)]
    pub labels: Vec<ResourceLabel>,
}

impl MonitoredResourceType {
    pub fn from_manifest(manifest: &Manifest) -> Result<Self, ResourceError> {
        let invalid = |message: String| ResourceError::Invalid {
            kind: Kind::MonitoredResourceType,
            name: manifest.metadata.name.clone(),
            message,
        };
        validate_name(&manifest.metadata.name).map_err(invalid)?;
        let spec: MonitoredResourceType = serde_json::from_value(manifest.spec.clone())
            .map_err(|e| invalid(format!("spec: {e}")))?;
        if spec.resource_type_name.trim().is_empty() {
            return Err(invalid("spec.resourceTypeName is required".into()));
        }
        for label in &spec.labels {
            if label.name.is_empty() {
                return Err(invalid("every label needs a name".into()));
            }
            let path = label.path();
            parse_json_path(&path).map_err(|e| {
                invalid(format!(
                    "label {:?}: {path:?} is not JSONPath: {e}",
                    label.name
                ))
            })?;
        }
        Ok(spec)
    }

    /// Whether an event whose `data.resource` says (`group`, `kind`) is of this type.
    pub fn matches_resource(&self, group: Option<&str>, kind: Option<&str>) -> bool {
        group.is_none_or(|g| g == self.gvk.group) && kind.is_none_or(|k| k == self.gvk.kind)
    }
}

/// The OpenMeter API's view of a meter (`/api/v1/meters`): what
/// `POST /api/v1/meters` takes and what every meter route answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OpenMeterMeter {
    pub slug: String,
    /// The MeterDefinition's uid (read-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// A human-readable name (`spec.displayName`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub aggregation: Aggregation,
    pub event_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_property: Option<String>,
    #[serde(default)]
    pub group_by: BTreeMap<String, String>,
    /// Accepted for compatibility; every meter can be queried in every window size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_size: Option<String>,
    /// When the meter was created (read-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<jiff::Timestamp>,
    /// When the meter last changed (read-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<jiff::Timestamp>,
    /// OpenMeter's `eventFrom` (events before it are not metered) and
    /// `metadata`: not kept, so refused when given (see
    /// [`OpenMeterMeter::unsupported`]).
    #[serde(default, skip_serializing)]
    pub event_from: Option<Value>,
    #[serde(default, skip_serializing)]
    pub metadata: Option<Value>,
}

impl OpenMeterMeter {
    /// The first field given that Tally does not keep, if any.
    pub fn unsupported(&self) -> Option<&'static str> {
        let given = |v: &Option<Value>| {
            v.as_ref().is_some_and(|v| {
                !(v.is_null() || v.as_object().is_some_and(serde_json::Map::is_empty))
            })
        };
        if given(&self.event_from) {
            Some("eventFrom")
        } else if given(&self.metadata) {
            Some("metadata")
        } else {
            None
        }
    }

    /// The `MeterDefinition` manifest this OpenMeter meter stands for.
    pub fn to_manifest(&self) -> Manifest {
        let spec = MeterDefinition {
            meter_name: self.slug.clone(),
            display_name: self.name.clone(),
            description: self.description.clone(),
            phase: MeterPhase::Draft,
            monitored_resource_types: vec![],
            measurement: MeterMeasurement {
                aggregation: self.aggregation,
                unit: None,
                dimensions: vec![],
            },
            billing: None,
            event: MeterEventMapping {
                event_type: Some(self.event_type.clone()),
                value_property: self.value_property.clone(),
                dimensions: self.group_by.clone(),
            },
        };
        Manifest {
            api_version: Kind::MeterDefinition.api_version().into(),
            kind: Kind::MeterDefinition.as_str().into(),
            metadata: ObjectMeta {
                name: self.slug.clone(),
                ..ObjectMeta::default()
            },
            spec: serde_json::to_value(spec).unwrap_or(Value::Null),
            status: None,
            extra: Default::default(),
        }
    }

    /// The OpenMeter view of a stored meter.
    pub fn from_definition(metadata: &ObjectMeta, meter: &MeterDefinition) -> Self {
        OpenMeterMeter {
            slug: metadata.name.clone(),
            id: metadata.uid.clone(),
            name: meter.display_name.clone(),
            description: meter.description.clone(),
            aggregation: meter.measurement.aggregation,
            event_type: meter.event_type().to_owned(),
            value_property: meter.value_property().map(str::to_owned),
            group_by: meter.group_by(),
            window_size: None,
            created_at: metadata.creation_timestamp,
            updated_at: metadata.update_timestamp.or(metadata.creation_timestamp),
            event_from: None,
            metadata: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn manifest(spec: Value) -> Manifest {
        Manifest {
            api_version: "billing.miloapis.com/v1alpha1".into(),
            kind: "MeterDefinition".into(),
            metadata: ObjectMeta {
                name: "requests".into(),
                ..Default::default()
            },
            spec,
            status: None,
            extra: Default::default(),
        }
    }

    fn platform_meter() -> MeterDefinition {
        MeterDefinition::from_manifest(&manifest(json!({
            "meterName": "networking.datumapis.com/gateway/requests",
            "phase": "Published",
            "measurement": {"aggregation": "Sum", "unit": "{request}", "dimensions": ["region"]},
        })))
        .unwrap()
    }

    #[test]
    fn platform_defaults_read_the_usage_event_shape() {
        let m = platform_meter();
        assert_eq!(m.event_type(), "networking.datumapis.com/gateway/requests");
        assert_eq!(m.value_property(), Some("$.value"));
        assert_eq!(m.group_by()["region"], "$.dimensions['region']");
        assert!(m.strict_dimensions());
    }

    #[test]
    fn aggregation_spellings() {
        for s in ["SUM", "Sum", "sum"] {
            assert_eq!(s.parse::<Aggregation>().unwrap(), Aggregation::Sum);
        }
        assert_eq!(
            "UniqueCount".parse::<Aggregation>().unwrap(),
            Aggregation::UniqueCount
        );
        assert_eq!(
            "unique_count".parse::<Aggregation>().unwrap(),
            Aggregation::UniqueCount
        );
        assert!("median".parse::<Aggregation>().is_err());
    }

    #[test]
    fn published_meters_freeze_their_meaning() {
        let old = platform_meter();
        let mut next = old.clone();
        next.measurement.unit = Some("By".into());
        let err = old.check_update(&next).unwrap_err();
        assert!(err.contains("spec.measurement.unit"), "{err}");
        let mut next = old.clone();
        next.phase = MeterPhase::Draft;
        assert!(old.check_update(&next).unwrap_err().contains("forward"));
        let mut next = old.clone();
        next.phase = MeterPhase::Deprecated;
        next.description = Some("now with words".into());
        assert!(old.check_update(&next).is_ok());
    }

    #[test]
    fn drafts_may_change() {
        let mut old = platform_meter();
        old.phase = MeterPhase::Draft;
        let mut next = old.clone();
        next.measurement.aggregation = Aggregation::Max;
        assert!(old.check_update(&next).is_ok());
        assert!(old.measures_differently(&next));
    }

    #[test]
    fn rejects_bad_paths_and_missing_values() {
        let err = MeterDefinition::from_manifest(&manifest(json!({
            "meterName": "x", "measurement": {"aggregation": "SUM"}, "event": {"valueProperty": "$[?"}
        })))
        .unwrap_err();
        assert!(err.to_string().contains("valueProperty"), "{err}");
        let count = MeterDefinition::from_manifest(&manifest(json!({
            "meterName": "x", "measurement": {"aggregation": "COUNT"}
        })))
        .unwrap();
        assert_eq!(count.value_property(), None);
    }

    #[test]
    fn declared_names_read_their_own_member() {
        for name in [
            "region",
            "a'b",
            "a\\",
            "\\'",
            "\\\\",
            "new\nline\u{1}",
            "é ]['",
        ] {
            let meter = MeterDefinition::from_manifest(&manifest(json!({
                "meterName": "x", "measurement": {"aggregation": "COUNT", "dimensions": [name]}
            })))
            .unwrap();
            let data = json!({"dimensions": {name: "v", "a": "w"}, "resource": {name: "r"}});
            let path = parse_json_path(&meter.group_by()[name]).unwrap();
            assert_eq!(
                path.query(&data).exactly_one().ok(),
                Some(&json!("v")),
                "{name:?}"
            );
            let label = ResourceLabel {
                name: name.into(),
                required: true,
                description: None,
                path: None,
            };
            let path = parse_json_path(&label.path()).unwrap();
            assert_eq!(
                path.query(&data).exactly_one().ok(),
                Some(&json!("r")),
                "{name:?}"
            );
        }
    }

    #[test]
    fn refuses_deeply_nested_paths_unread() {
        // Nested filters take serde_json_path time exponential in depth
        // (20 levels: seconds); hundreds of levels overflow the stack.
        let nested = |depth: usize| format!("$.a{}{}", "[?@".repeat(depth), "]".repeat(depth));
        assert!(parse_json_path(&nested(3)).is_ok());
        for path in [
            nested(40),
            format!("$[?{}@.x{}]", "(".repeat(100_000), ")".repeat(100_000)),
        ] {
            let err = MeterDefinition::from_manifest(&manifest(json!({
                "meterName": "x", "measurement": {"aggregation": "SUM"}, "event": {"valueProperty": path}
            })))
            .unwrap_err();
            assert!(err.to_string().contains("nest deeper than 10"), "{err}");
        }
        assert!(parse_json_path("$['[[[[[[[[[[[[[[[[[[[[[']").is_ok());
    }

    #[test]
    fn refuses_paths_ending_inside_an_escape_without_panicking() {
        for path in [
            r"$['\u",
            r"$['\uD",
            r"$['\u00",
            r"$['\uD800\u",
            r"$['\uD800\uD",
        ] {
            let err = parse_json_path(path).unwrap_err();
            assert!(err.contains("inside a \\u escape"), "{path}: {err}");
        }
        assert!(parse_json_path(r"$['\u00e9\uD83D\uDE00']").is_ok());
        assert!(parse_json_path(r"$['\u00e").is_err());
    }

    #[test]
    fn openmeter_view_round_trips() {
        let om: OpenMeterMeter = serde_json::from_value(json!({
            "slug": "tokens", "aggregation": "SUM", "eventType": "prompt",
            "valueProperty": "$.tokens", "groupBy": {"model": "$.model"}
        }))
        .unwrap();
        let manifest = om.to_manifest();
        let def = MeterDefinition::from_manifest(&manifest).unwrap();
        assert_eq!(
            OpenMeterMeter::from_definition(&manifest.metadata, &def),
            om
        );
    }
}
