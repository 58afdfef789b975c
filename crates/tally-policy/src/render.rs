//! The Envoy Gateway configuration equivalent to the policies in force:
//! one `EnvoyProxy` (`gateway.envoyproxy.io/v1alpha1`) per governed
//! Gateway, whose `spec.telemetry` has
//!
//! - `accessLog.settings[]`: a JSON `format` writing every field under the
//!   name Tally reads it by ([`crate::record`]), the policy's CEL `matches`,
//!   and an `OpenTelemetry` sink to the collector;
//! - `tracing`: `samplingFraction` (`numerator`/`denominator`), the
//!   OpenTelemetry `provider`, and `customTags` for `Header` and `Literal`
//!   attributes (`RequestHeader` and `Literal` tags).
//!
//! What Envoy cannot express is widened, never narrowed, so the proxy sends
//! at least what the policy keeps and Tally's own evaluation decides: a
//! match reading an attribute Tally derives (`route.*`, `project`,
//! `gen_ai.*`, `xds.*`) or types differently from Envoy (`response.flags`
//! is a string here, an integer bit set in Envoy's CEL) drops every match
//! of that policy (the proxy logs everything), and an `Attribute` tag (a
//! CEL expression) is applied by Tally, not rendered. Each omission is
//! listed in `notes`.
//!
//! Checked field by field against the `EnvoyProxy` API of Envoy Gateway
//! 1.7–1.9: `matches` holds at most [`ENVOY_MAX_MATCHES`] expressions (a
//! policy may have more; they are joined with `||`, which is what a list
//! means to both), sampling fractions are int32 (the policy refuses larger).
//! The collector is named by `host`/`port` and tags by `customTags`: both
//! are deprecated in current releases (for `backendRefs` and `tags`) but
//! accepted, and they also work on releases before 1.7.

use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::policy::{Policy, Source, TracingMode};
use crate::resolve::Target;
use crate::vocab::{A, AttrId};

/// Where the proxy sends access logs and spans (the collector's OTLP gRPC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collector {
    pub host: String,
    pub port: u16,
}

/// One rendered `EnvoyProxy` and what could not be rendered.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rendered {
    pub manifest: Value,
    pub notes: Vec<String>,
}

/// The Envoy command operator logging each attribute, under Tally's name.
fn operator(id: AttrId) -> Option<(&'static str, &'static str)> {
    const OPS: &[(A, &str, &str)] = &[
        (A::RequestTime, "start_time", "%START_TIME%"),
        (A::RequestMethod, "method", "%REQ(:METHOD)%"),
        (
            A::RequestPath,
            "x-envoy-origin-path",
            "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        ),
        (A::RequestHost, ":authority", "%REQ(:AUTHORITY)%"),
        (A::RequestProtocol, "protocol", "%PROTOCOL%"),
        (A::RequestId, "x-request-id", "%REQ(X-REQUEST-ID)%"),
        (A::RequestUserAgent, "user-agent", "%REQ(USER-AGENT)%"),
        (A::RequestReferer, "referer", "%REQ(REFERER)%"),
        (A::RequestDuration, "duration", "%DURATION%"),
        (A::RequestSize, "bytes_received", "%BYTES_RECEIVED%"),
        (
            A::RequestTotalSize,
            "downstream_wire_bytes_received",
            "%DOWNSTREAM_WIRE_BYTES_RECEIVED%",
        ),
        (A::ResponseCode, "response_code", "%RESPONSE_CODE%"),
        (
            A::ResponseCodeDetails,
            "response_code_details",
            "%RESPONSE_CODE_DETAILS%",
        ),
        (A::ResponseFlags, "response_flags", "%RESPONSE_FLAGS%"),
        (A::ResponseSize, "bytes_sent", "%BYTES_SENT%"),
        (
            A::ResponseTotalSize,
            "downstream_wire_bytes_sent",
            "%DOWNSTREAM_WIRE_BYTES_SENT%",
        ),
        (A::ConnectionId, "connection_id", "%CONNECTION_ID%"),
        (
            A::ConnectionSni,
            "requested_server_name",
            "%REQUESTED_SERVER_NAME%",
        ),
        (
            A::ConnectionTlsVersion,
            "downstream_tls_version",
            "%DOWNSTREAM_TLS_VERSION%",
        ),
        (
            A::SourceAddress,
            "downstream_remote_address",
            "%DOWNSTREAM_REMOTE_ADDRESS%",
        ),
        (
            A::DestinationAddress,
            "downstream_local_address",
            "%DOWNSTREAM_LOCAL_ADDRESS%",
        ),
        (A::XdsUpstreamHost, "upstream_host", "%UPSTREAM_HOST%"),
        (A::RouteName, "route_name", "%ROUTE_NAME%"),
        (
            A::Project,
            "project_name",
            "%METADATA(ROUTE:gateway.envoyproxy.io:project_name)%",
        ),
        (
            A::GenAiInputTokens,
            "gen_ai.usage.input_tokens",
            "%DYNAMIC_METADATA(io.envoy.ai_gateway:llm_input_token)%",
        ),
        (
            A::GenAiOutputTokens,
            "gen_ai.usage.output_tokens",
            "%DYNAMIC_METADATA(io.envoy.ai_gateway:llm_output_token)%",
        ),
        (
            A::GenAiCacheReadTokens,
            "gen_ai.usage.cache_read.input_tokens",
            "%DYNAMIC_METADATA(io.envoy.ai_gateway:llm_cached_input_token)%",
        ),
        (
            A::GenAiRequestModel,
            "gen_ai.request.model",
            "%REQ(X-AI-EG-MODEL)%",
        ),
        (
            A::GenAiProviderName,
            "gen_ai.provider.name",
            "%DYNAMIC_METADATA(io.envoy.ai_gateway:backend_name)%",
        ),
    ];
    OPS.iter()
        .find(|(a, _, _)| *a as usize == id)
        .map(|(_, key, op)| (*key, *op))
}

/// Most expressions in one access-log setting's `matches` (the CRD's
/// `maxItems`).
pub const ENVOY_MAX_MATCHES: usize = 10;

/// Whether Envoy knows every attribute an expression reads, with the type
/// Tally gives it (its own CEL vocabulary: `request`, `response`,
/// `connection`, `source`, `destination`; `response.flags` is an integer
/// there).
fn envoy_expressible(source: &str) -> bool {
    let derived = ["route.", "project", "gen_ai.", "xds.", "response.flags"];
    !derived.iter().any(|d| source.contains(d))
}

/// The `EnvoyProxy` for `gateway` under `policy`.
pub fn render(target: &Target, policy: &Policy, collector: &Collector) -> Option<Rendered> {
    let Target::Gateway { namespace, name } = target else {
        return None;
    };
    let mut notes = Vec::new();
    let mut telemetry = Map::new();
    if let Some(logs) = &policy.access_logs {
        telemetry.insert(
            "accessLog".into(),
            access_log(policy, logs, collector, &mut notes),
        );
    }
    if let Some(t) = &policy.tracing
        && t.mode != TracingMode::Disabled
    {
        let mut tags = Map::new();
        for kv in &t.attributes {
            match &kv.source {
                Source::Header(h) => {
                    tags.insert(kv.name.clone(), json!({"type": "RequestHeader", "requestHeader": {"name": h}}));
                }
                Source::Literal(v) => {
                    tags.insert(kv.name.clone(), json!({"type": "Literal", "literal": {"value": v}}));
                }
                Source::Attribute(e) => notes.push(format!(
                    "tracing attribute {} ({}) is a CEL expression: Tally adds it to the spans it exports",
                    kv.name,
                    e.source()
                )),
            }
        }
        let mut tracing = json!({
            "samplingFraction": {"numerator": t.numerator, "denominator": t.denominator},
            "provider": {"type": "OpenTelemetry", "host": collector.host, "port": collector.port},
        });
        if !tags.is_empty() {
            tracing["customTags"] = Value::Object(tags);
        }
        telemetry.insert("tracing".into(), tracing);
    }
    let manifest = json!({
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "EnvoyProxy",
        "metadata": {
            "name": format!("{name}-telemetry"),
            "namespace": namespace,
            "annotations": {"telemetry.datumapis.com/policy": policy.key.to_string()},
        },
        "spec": {"telemetry": Value::Object(telemetry)},
    });
    Some(Rendered { manifest, notes })
}

fn access_log(
    policy: &Policy,
    logs: &crate::policy::AccessLogs,
    collector: &Collector,
    notes: &mut Vec<String>,
) -> Value {
    let mut format = Map::new();
    let fields: Vec<AttrId> = if logs.fields.is_empty() {
        (0..crate::vocab::COUNT).collect()
    } else {
        logs.fields.clone()
    };
    // Fields Tally needs to attribute a record, whatever the policy lists.
    for id in [A::RouteName as usize, A::Project as usize]
        .into_iter()
        .chain(fields)
    {
        if let Some((key, op)) = operator(id) {
            format.insert(key.into(), Value::String(op.into()));
        }
    }
    let mut setting = json!({
        "format": {"type": "JSON", "json": Value::Object(format)},
        "sinks": [{"type": "OpenTelemetry", "openTelemetry": {"host": collector.host, "port": collector.port}}],
    });
    let matches: Vec<&str> = logs.matches.iter().map(|m| m.source()).collect();
    if matches.iter().all(|m| envoy_expressible(m)) {
        if matches.len() > ENVOY_MAX_MATCHES {
            let joined: Vec<String> = matches.iter().map(|m| format!("({m})")).collect();
            setting["matches"] = json!([joined.join(" || ")]);
        } else if !matches.is_empty() {
            setting["matches"] = json!(matches);
        }
    } else {
        notes.push(format!(
            "policy {}: a match reads attributes Tally derives; the proxy logs every request and Tally filters",
            policy.key
        ));
    }
    json!({"settings": [setting]})
}
