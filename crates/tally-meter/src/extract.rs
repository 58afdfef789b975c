//! From one event to one sample of one meter.

use std::collections::BTreeSet;
use std::fmt;

use rust_decimal::Decimal;
use serde_json::Value;
use serde_json_path::JsonPath;
use tally_model::{
    Aggregation, CloudEvent, MeterDefinition, MeterPhase, MonitoredResourceType, limits,
};

use crate::value::decimal_from_json;

/// What one event contributes to one meter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub value: SampleValue,
    /// One entry per dimension of the meter, in [`CompiledMeter::dimensions`]
    /// order; `None` when the event does not carry the dimension.
    pub groups: Vec<Option<String>>,
}

/// The value an event carries for a meter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SampleValue {
    /// `COUNT` needs no value.
    None,
    Number(Decimal),
    /// `UNIQUE_COUNT` counts distinct values of any scalar type.
    Text(String),
}

/// Why a structurally valid event cannot be metered by a meter. Such events
/// are kept (quarantined), never dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unmeterable {
    MeterRetired,
    MissingValue {
        path: String,
    },
    InvalidValue {
        path: String,
        reason: String,
    },
    UndeclaredDimension {
        name: String,
    },
    MissingRequiredLabel {
        label: String,
        resource_type: String,
    },
}

impl Unmeterable {
    /// A stable, machine-readable reason code.
    pub fn code(&self) -> &'static str {
        match self {
            Unmeterable::MeterRetired => "METER_RETIRED",
            Unmeterable::MissingValue { .. } => "MISSING_VALUE",
            Unmeterable::InvalidValue { .. } => "INVALID_VALUE",
            Unmeterable::UndeclaredDimension { .. } => "UNDECLARED_DIMENSION",
            Unmeterable::MissingRequiredLabel { .. } => "MISSING_REQUIRED_LABEL",
        }
    }
}

impl fmt::Display for Unmeterable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unmeterable::MeterRetired => {
                f.write_str("the meter is Retired and accepts no new events")
            }
            Unmeterable::MissingValue { path } => write!(f, "data has no value at {path}"),
            Unmeterable::InvalidValue { path, reason } => write!(f, "value at {path}: {reason}"),
            Unmeterable::UndeclaredDimension { name } => {
                write!(f, "dimension {name:?} is not declared by the meter")
            }
            Unmeterable::MissingRequiredLabel {
                label,
                resource_type,
            } => {
                write!(f, "required label {label:?} of {resource_type} is missing")
            }
        }
    }
}

/// A label that events of a resource type must carry.
#[derive(Debug, Clone)]
pub struct RequiredLabel {
    pub name: String,
    path_text: String,
    path: JsonPath,
}

#[derive(Debug, Clone)]
struct ResourceTypeCheck {
    name: String,
    group: String,
    kind: String,
    required: Vec<RequiredLabel>,
}

/// A meter ready to evaluate events: its JSONPaths parsed once.
#[derive(Debug, Clone)]
pub struct CompiledMeter {
    pub key: String,
    pub definition: MeterDefinition,
    value_path: Option<(String, JsonPath)>,
    dimensions: Vec<(String, JsonPath)>,
    declared: BTreeSet<String>,
    resource_types: Vec<ResourceTypeCheck>,
}

fn parse_path(path: &str) -> Result<JsonPath, String> {
    tally_model::parse_json_path(path).map_err(|e| format!("{path:?} is not JSONPath: {e}"))
}

impl CompiledMeter {
    /// Compiles a meter. `resource_types` are all known `MonitoredResourceType`s;
    /// those the meter names constrain its events.
    pub fn compile(
        key: &str,
        definition: &MeterDefinition,
        resource_types: &[MonitoredResourceType],
    ) -> Result<CompiledMeter, String> {
        let value_path = definition
            .value_property()
            .map(|p| parse_path(p).map(|parsed| (p.to_owned(), parsed)))
            .transpose()?;
        let dimensions = definition
            .group_by()
            .into_iter()
            .map(|(name, path)| parse_path(&path).map(|p| (name, p)))
            .collect::<Result<Vec<_>, _>>()?;
        let resource_types = resource_types
            .iter()
            .filter(|t| {
                definition
                    .monitored_resource_types
                    .contains(&t.resource_type_name)
            })
            .map(|t| {
                let required = t
                    .labels
                    .iter()
                    .filter(|l| l.required)
                    .map(|l| {
                        let path_text = l.path();
                        parse_path(&path_text).map(|path| RequiredLabel {
                            name: l.name.clone(),
                            path_text,
                            path,
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(ResourceTypeCheck {
                    name: t.resource_type_name.clone(),
                    group: t.gvk.group.clone(),
                    kind: t.gvk.kind.clone(),
                    required,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(CompiledMeter {
            key: key.to_owned(),
            declared: definition.measurement.dimensions.iter().cloned().collect(),
            definition: definition.clone(),
            value_path,
            dimensions,
            resource_types,
        })
    }

    pub fn aggregation(&self) -> Aggregation {
        self.definition.measurement.aggregation
    }

    pub fn phase(&self) -> MeterPhase {
        self.definition.phase
    }

    pub fn event_type(&self) -> &str {
        self.definition.event_type()
    }

    /// Dimension names, sorted; the order of [`Sample::groups`].
    pub fn dimensions(&self) -> impl ExactSizeIterator<Item = &str> {
        self.dimensions.iter().map(|(name, _)| name.as_str())
    }

    /// The position of dimension `name` among [`Self::dimensions`]; the
    /// error names the dimensions the meter has.
    pub fn dimension_position(&self, name: &str) -> Result<usize, String> {
        self.dimensions().position(|d| d == name).ok_or_else(|| {
            format!(
                "meter {:?} has no dimension {name:?}; it has: subject{}",
                self.key,
                self.dimensions()
                    .map(|d| format!(", {d}"))
                    .collect::<String>()
            )
        })
    }

    /// Evaluates one event.
    pub fn sample(&self, event: &CloudEvent) -> Result<Sample, Unmeterable> {
        if self.definition.phase == MeterPhase::Retired {
            return Err(Unmeterable::MeterRetired);
        }
        self.sample_in_any_phase(event)
    }

    /// Evaluates one event as if the meter were not Retired: what the meter
    /// measured of it while it still accepted events (used to take a voided
    /// event back out).
    pub fn sample_in_any_phase(&self, event: &CloudEvent) -> Result<Sample, Unmeterable> {
        let data = event.data.as_ref().unwrap_or(&Value::Null);
        self.check_labels(data)?;
        if self.definition.strict_dimensions()
            && let Some(Value::Object(dims)) = data.get("dimensions")
            && let Some(name) = dims.keys().find(|k| !self.declared.contains(*k))
        {
            return Err(Unmeterable::UndeclaredDimension { name: name.clone() });
        }
        let value = match &self.value_path {
            None => SampleValue::None,
            Some((text, path)) => {
                let node = single_node(path, data, text)?
                    .ok_or_else(|| Unmeterable::MissingValue { path: text.clone() })?;
                self.sample_value(node, text)?
            }
        };
        let groups = self
            .dimensions
            .iter()
            .map(|(name, path)| Ok(single_node(path, data, name)?.and_then(group_value)))
            .collect::<Result<Vec<_>, Unmeterable>>()?;
        check_group_sizes(&self.dimensions, &groups)?;
        Ok(Sample { value, groups })
    }

    fn sample_value(&self, node: &Value, path: &str) -> Result<SampleValue, Unmeterable> {
        let invalid = |reason: String| Unmeterable::InvalidValue {
            path: path.to_owned(),
            reason,
        };
        match (self.aggregation(), node) {
            (_, Value::Null) => Err(Unmeterable::MissingValue {
                path: path.to_owned(),
            }),
            (Aggregation::Count, _) => Ok(SampleValue::None),
            (Aggregation::UniqueCount, Value::String(s)) => Ok(SampleValue::Text(s.clone())),
            (Aggregation::UniqueCount, Value::Number(_) | Value::Bool(_)) => {
                Ok(SampleValue::Text(node.to_string()))
            }
            (Aggregation::UniqueCount, _) => Err(invalid("expected a scalar value".into())),
            (_, node) => decimal_from_json(node)
                .map(SampleValue::Number)
                .map_err(invalid),
        }
    }

    fn check_labels(&self, data: &Value) -> Result<(), Unmeterable> {
        for (t, label) in self.applicable_labels(data) {
            if !label_present(label, data)? {
                return Err(Unmeterable::MissingRequiredLabel {
                    label: label.name.clone(),
                    resource_type: t.name.clone(),
                });
            }
        }
        Ok(())
    }

    /// The required labels that apply to an event with this `data`, with
    /// their resource type, in declaration order.
    fn applicable_labels<'a>(
        &'a self,
        data: &'a Value,
    ) -> impl Iterator<Item = (&'a ResourceTypeCheck, &'a RequiredLabel)> + 'a {
        let resource = data.get("resource");
        let field = |name: &str| resource.and_then(|r| r.get(name)).and_then(Value::as_str);
        let (group, kind) = (field("group"), field("kind"));
        let single = self.resource_types.len() == 1;
        self.resource_types
            .iter()
            .filter(move |t| {
                single || (group.is_none_or(|g| g == t.group) && kind.is_none_or(|k| k == t.kind))
            })
            .flat_map(|t| t.required.iter().map(move |l| (t, l)))
    }

    /// Every required label an event lacks, as `<resource type>/<label>`
    /// (a label whose path matches several nodes counts as present here;
    /// [`CompiledMeter::sample`] refuses it as an invalid value).
    pub fn missing_required_labels(&self, data: &Value) -> Vec<String> {
        self.applicable_labels(data)
            .filter(|(_, label)| matches!(label_present(label, data), Ok(false)))
            .map(|(t, label)| format!("{}/{}", t.name, label.name))
            .collect()
    }

    /// The node an event's value is read from: `None` when the meter reads
    /// no value (`COUNT` without a path), `Some(Err)` when the path matches
    /// several nodes.
    pub fn value_node<'v>(
        &self,
        data: &'v Value,
    ) -> Option<Result<Option<&'v Value>, Unmeterable>> {
        let (text, path) = self.value_path.as_ref()?;
        Some(single_node(path, data, text))
    }

    /// The value of each dimension an event carries, in
    /// [`CompiledMeter::dimensions`] order (`None`: absent, null or ambiguous).
    pub fn group_values(&self, data: &Value) -> Vec<Option<String>> {
        self.dimensions
            .iter()
            .map(|(name, path)| {
                single_node(path, data, name)
                    .ok()
                    .flatten()
                    .and_then(group_value)
            })
            .collect()
    }
}

/// Whether an event carries a required label: a non-empty string or any
/// other non-null value.
fn label_present(label: &RequiredLabel, data: &Value) -> Result<bool, Unmeterable> {
    Ok(match single_node(&label.path, data, &label.path_text)? {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    })
}

fn single_node<'v>(
    path: &JsonPath,
    data: &'v Value,
    what: &str,
) -> Result<Option<&'v Value>, Unmeterable> {
    path.query(data)
        .at_most_one()
        .map_err(|_| Unmeterable::InvalidValue {
            path: what.to_owned(),
            reason: "the path matches more than one node".into(),
        })
}

/// The group value of a JSON node: strings as they are, other scalars as
/// JSON text, `null` as absent.
/// Refuses dimension values past [`limits::MAX_DIMENSION_VALUE_BYTES`] each
/// or [`limits::MAX_GROUP_BYTES`] together: they become index keys.
fn check_group_sizes(
    dimensions: &[(String, JsonPath)],
    groups: &[Option<String>],
) -> Result<(), Unmeterable> {
    let mut total = 0;
    for ((name, _), value) in dimensions.iter().zip(groups) {
        let len = value.as_ref().map_or(0, String::len);
        total += len;
        if len > limits::MAX_DIMENSION_VALUE_BYTES {
            return Err(Unmeterable::InvalidValue {
                path: name.clone(),
                reason: format!(
                    "the dimension value is {len} bytes long; the limit is {} bytes",
                    limits::MAX_DIMENSION_VALUE_BYTES
                ),
            });
        }
    }
    if total > limits::MAX_GROUP_BYTES {
        return Err(Unmeterable::InvalidValue {
            path: "dimensions".into(),
            reason: format!(
                "the dimension values are {total} bytes long together; the limit is {} bytes",
                limits::MAX_GROUP_BYTES
            ),
        });
    }
    Ok(())
}

fn group_value(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tally_model::parse_event;

    fn meter(spec: Value) -> MeterDefinition {
        crate::test_meter::definition(spec)
    }

    fn event(data: Value) -> CloudEvent {
        parse_event(
            json!({"specversion":"1.0","id":"1","source":"s","type":"t","subject":"c","data":data}),
            "2026-01-01T00:00:00Z".parse().unwrap(),
        )
        .unwrap()
    }

    fn http_route_type() -> MonitoredResourceType {
        serde_json::from_value(json!({
            "resourceTypeName": "networking.datumapis.com/HTTPRoute",
            "gvk": {"group": "networking.datumapis.com", "kind": "HTTPRoute"},
            "labels": [{"name": "name", "required": true}, {"name": "region"}]
        }))
        .unwrap()
    }

    #[test]
    fn platform_event_shape() {
        let def = meter(
            json!({"meterName": "t", "measurement": {"aggregation": "SUM", "dimensions": ["region"]},
                               "monitoredResourceTypes": ["networking.datumapis.com/HTTPRoute"]}),
        );
        let m = CompiledMeter::compile("m", &def, &[http_route_type()]).unwrap();
        let s = m
            .sample(&event(
                json!({"value": "42", "dimensions": {"region": "eu"}, "resource": {"name": "r"}}),
            ))
            .unwrap();
        assert_eq!(s.value, SampleValue::Number(Decimal::from(42)));
        assert_eq!(s.groups, vec![Some("eu".to_owned())]);
        assert_eq!(
            m.sample(&event(json!({"value": 1, "resource": {"name": ""}})))
                .unwrap_err(),
            Unmeterable::MissingRequiredLabel {
                label: "name".into(),
                resource_type: "networking.datumapis.com/HTTPRoute".into()
            }
        );
        assert_eq!(
            m.sample(&event(
                json!({"value": 1, "dimensions": {"zone": "a"}, "resource": {"name": "r"}})
            ))
            .unwrap_err()
            .code(),
            "UNDECLARED_DIMENSION"
        );
    }

    #[test]
    fn oversized_dimension_values_are_unmeterable_not_stored() {
        let def = meter(
            json!({"meterName": "t", "measurement": {"aggregation": "COUNT"},
            "event": {"dimensions": {"a": "$.a", "b": "$.b", "c": "$.c", "d": "$.d", "e": "$.e"}}}),
        );
        let m = CompiledMeter::compile("m", &def, &[]).unwrap();
        let at = "x".repeat(limits::MAX_DIMENSION_VALUE_BYTES);
        assert!(m.sample(&event(json!({"a": at}))).is_ok());
        // A nested value is grouped by its JSON text, which counts too.
        let nested = json!({"a": {"k": at}});
        let err = m.sample(&event(nested)).unwrap_err();
        assert!(err.to_string().contains("4096 bytes"), "{err}");
        assert_eq!(err.code(), "INVALID_VALUE");
        let each_at_limit = json!({"a": at, "b": at, "c": at, "d": at, "e": at});
        let err = m.sample(&event(each_at_limit)).unwrap_err();
        assert!(err.to_string().contains("together"), "{err}");
    }

    #[test]
    fn openmeter_style_paths_and_values() {
        let def = meter(
            json!({"meterName": "t", "measurement": {"aggregation": "SUM"},
            "event": {"valueProperty": "$.tokens", "dimensions": {"model": "$.model", "n": "$.meta.n"}}}),
        );
        let m = CompiledMeter::compile("m", &def, &[]).unwrap();
        let s = m
            .sample(&event(
                json!({"tokens": 1.5, "model": "gpt", "meta": {"n": 3}}),
            ))
            .unwrap();
        assert_eq!(s.groups, vec![Some("gpt".into()), Some("3".into())]);
        assert_eq!(
            m.sample(&event(json!({"model": "x"}))).unwrap_err().code(),
            "MISSING_VALUE"
        );
        assert_eq!(
            m.sample(&event(json!({"tokens": "many"})))
                .unwrap_err()
                .code(),
            "INVALID_VALUE"
        );
        assert_eq!(
            m.sample(&event(json!({"tokens": null})))
                .unwrap_err()
                .code(),
            "MISSING_VALUE"
        );
    }

    #[test]
    fn counts_and_unique_counts() {
        let count = CompiledMeter::compile(
            "m",
            &meter(json!({"meterName": "t", "measurement": {"aggregation": "COUNT"}})),
            &[],
        )
        .unwrap();
        assert_eq!(
            count.sample(&event(Value::Null)).unwrap().value,
            SampleValue::None
        );
        let unique = CompiledMeter::compile("m", &meter(json!({"meterName": "t", "measurement": {"aggregation": "UNIQUE_COUNT"}, "event": {"valueProperty": "$.user"}})), &[]).unwrap();
        assert_eq!(
            unique.sample(&event(json!({"user": 7}))).unwrap().value,
            SampleValue::Text("7".into())
        );
        assert_eq!(
            unique
                .sample(&event(json!({"user": [1]})))
                .unwrap_err()
                .code(),
            "INVALID_VALUE"
        );
    }

    #[test]
    fn retired_meters_refuse() {
        let def = meter(
            json!({"meterName": "t", "phase": "Retired", "measurement": {"aggregation": "COUNT"}}),
        );
        let m = CompiledMeter::compile("m", &def, &[]).unwrap();
        assert_eq!(
            m.sample(&event(Value::Null)).unwrap_err(),
            Unmeterable::MeterRetired
        );
    }
}
