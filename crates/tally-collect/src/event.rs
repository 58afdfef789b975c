//! Platform usage CloudEvents with deterministic ids.

use serde_json::{Map, Value, json};
use tally_model::CloudEvent;
use ulid::Ulid;
use xxhash_rust::xxh3::xxh3_128_with_seed;

use crate::aggregate::WindowUsage;
use crate::enrich::EnrichmentIndex;

/// Fixed seed of the id hash: changing it changes every event id.
const EVENT_ID_SEED: u64 = 0x7461_6c6c_7963_6f6c; // "tallycol"

/// Who emits the events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    /// Distinguishes agents that could see the same traffic (e.g. the node
    /// name); part of every event id.
    pub agent_id: String,
    /// The CloudEvent `source`, the ledger's dedupe namespace.
    pub source: String,
}

/// The event id of one usage amount: a ULID whose 48-bit time part is the
/// window start and whose 80 random bits are an XXH3-128 (fixed seed) of
/// (agent id, project, namespace, route, window, meter, round).
pub fn event_id(agent_id: &str, usage: &WindowUsage) -> Ulid {
    let route = &usage.route;
    let mut key = Vec::with_capacity(128);
    for part in [
        agent_id,
        &route.project,
        &route.namespace,
        &route.name,
        usage.meter.meter_name(),
    ] {
        key.extend_from_slice(&(part.len() as u64).to_le_bytes());
        key.extend_from_slice(part.as_bytes());
    }
    key.extend_from_slice(&usage.window_start_millis.to_le_bytes());
    key.extend_from_slice(&usage.round.to_le_bytes());
    let window_start = u64::try_from(usage.window_start_millis).unwrap_or(0);
    Ulid::from_parts(window_start, xxh3_128_with_seed(&key, EVENT_ID_SEED))
}

/// Builds the platform usage event of one amount.
pub fn usage_event(
    agent: &AgentIdentity,
    usage: &WindowUsage,
    enrichment: &EnrichmentIndex,
) -> CloudEvent {
    let route = &usage.route;
    let known = enrichment.dimensions(&route.namespace, &route.name);
    let mut dimensions = Map::new();
    let mut put = |name: &str, value: &str| {
        dimensions.insert(name.to_owned(), Value::String(value.to_owned()));
    };
    put("httproute_name", &route.name);
    put("httproute_namespace", &route.namespace);
    put("project_name", &route.project);
    for (name, value) in [
        ("region", &known.region),
        ("gateway", &known.gateway),
        ("gateway_namespace", &known.gateway_namespace),
        ("gateway_class", &known.gateway_class),
    ] {
        if let Some(value) = value {
            put(name, value);
        }
    }
    let mut resource = json!({
        "group": "gateway.networking.k8s.io",
        "kind": "HTTPRoute",
        "namespace": route.namespace,
        "name": route.name,
    });
    if let (Some(uid), Some(object)) = (known.route_uid, resource.as_object_mut()) {
        object.insert("uid".into(), Value::String(uid));
    }
    CloudEvent {
        specversion: "1.0".into(),
        id: event_id(&agent.agent_id, usage).to_string(),
        source: agent.source.clone(),
        kind: usage.meter.meter_name().into(),
        subject: format!("projects/{}", route.project),
        time: jiff::Timestamp::from_millisecond(usage.window_start_millis)
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH),
        datacontenttype: Some("application/json".into()),
        dataschema: None,
        data: Some(json!({
            "value": usage.amount(),
            "dimensions": dimensions,
            "resource": resource,
        })),
        extensions: Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::Meter;
    use crate::route::RouteKey;

    fn usage(round: u64, meter: Meter) -> WindowUsage {
        WindowUsage {
            route: RouteKey {
                project: "p".into(),
                namespace: "ns".into(),
                name: "api".into(),
            },
            window_start_millis: 1_714_564_800_000,
            meter,
            value: 1 << 40,
            round,
        }
    }

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let a = event_id("node-1", &usage(3, Meter::Requests));
        assert_eq!(a, event_id("node-1", &usage(3, Meter::Requests)));
        assert_ne!(a, event_id("node-2", &usage(3, Meter::Requests)));
        assert_ne!(a, event_id("node-1", &usage(4, Meter::Requests)));
        assert_ne!(a, event_id("node-1", &usage(3, Meter::EgressBytes)));
        assert_eq!(a.timestamp_ms(), 1_714_564_800_000);
    }

    #[test]
    fn event_has_the_platform_shape() {
        let agent = AgentIdentity {
            agent_id: "node-1".into(),
            source: "tally-collect/node-1".into(),
        };
        let event = usage_event(
            &agent,
            &usage(1, Meter::EgressBytes),
            &EnrichmentIndex::default(),
        );
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(
            json["type"],
            "networking.datumapis.com/gateway/egress-bytes"
        );
        assert_eq!(json["subject"], "projects/p");
        assert_eq!(json["time"], "2024-05-01T12:00:00Z");
        assert_eq!(json["data"]["value"], "1099511627776");
        assert_eq!(json["data"]["dimensions"]["httproute_namespace"], "ns");
        assert_eq!(json["data"]["resource"]["kind"], "HTTPRoute");
        assert!(json["data"]["dimensions"].get("region").is_none());
        let parsed = tally_model::parse_event(json, jiff::Timestamp::UNIX_EPOCH).unwrap();
        assert_eq!(parsed, event);
    }
}
