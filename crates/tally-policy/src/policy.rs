//! A validated policy and what it does to a record: whether an access-log
//! record is kept and with which fields, the extra metric dimensions, head
//! sampling of traces, span attributes and GenAI token usage.

use std::borrow::Cow;

use jiff::Timestamp;
use tally_model::Manifest;

use crate::expr::CompiledExpr;
use crate::record::{AttrValue, Record};
use crate::spec::{KeyValueSpec, PolicySpec};
use crate::vocab::{self, A, ATTRIBUTES, AttrId};

/// Most target references, matches, fields, dimensions and attributes a
/// policy may list.
pub const MAX_TARGETS: usize = 16;
pub const MAX_MATCHES: usize = 16;
pub const MAX_FIELDS: usize = 64;
pub const MAX_DIMENSIONS: usize = 16;
pub const MAX_ATTRIBUTES: usize = 16;
/// Longest dimension or attribute name, and literal or header value.
pub const MAX_NAME_BYTES: usize = 256;

/// A policy's namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A target reference as written (Gateway names are in the policy's namespace).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TargetRef {
    Gateway(String),
    Namespace(String),
}

/// Where an added attribute, dimension or tag takes its value.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A request header (lower case).
    Header(String),
    Literal(String),
    /// A CEL expression over the vocabulary.
    Attribute(CompiledExpr),
}

/// `{name, from, value}`.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyValue {
    pub name: String,
    pub source: Source,
}

impl KeyValue {
    /// The value for `record`, if it has one.
    pub fn value(&self, record: &Record<'_>) -> Option<String> {
        self.value_ref(record).map(Cow::into_owned)
    }

    /// [`KeyValue::value`], borrowed from the policy or the record where
    /// it can be (a header or a literal).
    pub fn value_ref<'s>(&'s self, record: &'s Record<'_>) -> Option<Cow<'s, str>> {
        match &self.source {
            Source::Header(h) => record.header(false, h).map(Cow::Borrowed),
            Source::Literal(v) => Some(Cow::Borrowed(v)),
            Source::Attribute(e) => e.render(record).map(Cow::Owned),
        }
    }
}

/// `tracing.mode` (GEP-4768).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TracingMode {
    Enabled,
    Disabled,
    ImplementationDefault,
}

/// The tracing section.
#[derive(Debug, Clone, PartialEq)]
pub struct Tracing {
    pub mode: TracingMode,
    pub numerator: u32,
    pub denominator: u32,
    pub attributes: Vec<KeyValue>,
}

/// The access-log section.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogs {
    /// OR-ed; none keeps every record.
    pub matches: Vec<CompiledExpr>,
    /// Every attribute the matches read: one evaluation context per record.
    pub used: u64,
    /// What a kept record carries; none: every attribute it has.
    pub fields: Vec<AttrId>,
}

/// A validated policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub key: PolicyKey,
    pub created: Option<Timestamp>,
    pub generation: Option<u64>,
    pub targets: Vec<TargetRef>,
    pub access_logs: Option<AccessLogs>,
    pub dimensions: Option<Vec<KeyValue>>,
    pub tracing: Option<Tracing>,
    pub gen_ai: bool,
}

/// One value of `gen_ai.client.token.usage` (`token_type` is
/// `gen_ai.token.type`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenAiPoint {
    pub token_type: &'static str,
    pub tokens: u64,
}

impl Policy {
    /// Validates `manifest`'s spec; the error is the `Invalid` message.
    pub fn from_manifest(manifest: &Manifest) -> Result<Policy, String> {
        let spec: PolicySpec =
            serde_json::from_value(manifest.spec.clone()).map_err(|e| format!("spec: {e}"))?;
        let key = PolicyKey {
            namespace: manifest.metadata.namespace.clone().unwrap_or_default(),
            name: manifest.metadata.name.clone(),
        };
        Ok(Policy {
            key,
            created: manifest.metadata.creation_timestamp,
            generation: manifest.metadata.generation,
            targets: targets(&spec)?,
            access_logs: spec.access_logs.as_ref().map(access_logs).transpose()?,
            dimensions: spec
                .metrics
                .as_ref()
                .map(|m| key_values("metrics.dimensions", &m.dimensions, MAX_DIMENSIONS))
                .transpose()?,
            tracing: spec.tracing.as_ref().map(tracing).transpose()?,
            gen_ai: spec.gen_ai.is_some(),
        })
    }

    /// The access-log record to export for `record`, as (OpenTelemetry
    /// attribute name, value) pairs; `None` if the policy does not keep it.
    /// (The shaping path uses [`Policy::keeps_log`] and
    /// [`Policy::log_fields`], which copy nothing.)
    pub fn keep_log<'r>(
        &'r self,
        record: &'r Record<'_>,
    ) -> Option<Vec<(&'static str, AttrValue<'r>)>> {
        self.keeps_log(record).then(|| {
            self.log_fields(record)
                .map(|(k, v)| (k, v.clone()))
                .collect()
        })
    }

    /// Whether the policy keeps the access-log record `record` (it has an
    /// `accessLogs` section and no match, or a match that is true).
    pub fn keeps_log(&self, record: &Record<'_>) -> bool {
        let Some(logs) = self.access_logs.as_ref() else {
            return false;
        };
        if logs.matches.is_empty() {
            return true;
        }
        // One interpreter context, built only if a match needs it.
        let mut context = None;
        logs.matches.iter().any(|m| {
            m.fast_matches(record).unwrap_or_else(|| {
                let context =
                    context.get_or_insert_with(|| crate::expr::context(logs.used, record));
                matches!(m.eval_in(context), Some(cel::Value::Bool(true)))
            })
        })
    }

    /// The fields a kept access-log record carries, as (OpenTelemetry
    /// attribute name, value) pairs, borrowed from the record: the listed
    /// fields it has, in the policy's order, or (none listed) every
    /// attribute it has.
    pub fn log_fields<'r>(
        &'r self,
        record: &'r Record<'_>,
    ) -> impl Iterator<Item = (&'static str, &'r AttrValue<'r>)> + 'r {
        let listed = self
            .access_logs
            .as_ref()
            .map(|l| &l.fields[..])
            .unwrap_or_default();
        let ids: Box<dyn Iterator<Item = AttrId> + 'r> = if listed.is_empty() {
            Box::new(0..vocab::COUNT)
        } else {
            Box::new(listed.iter().copied())
        };
        ids.filter_map(move |id| record.get(id).map(|v| (ATTRIBUTES[id].otel, v)))
    }

    /// The policy's extra metric dimensions for `record` (those with a value).
    pub fn dimensions(&self, record: &Record<'_>) -> Vec<(String, String)> {
        self.dimension_values(record)
            .map(|(name, v)| (name.to_owned(), v.into_owned()))
            .collect()
    }

    /// [`Policy::dimensions`], borrowed from the policy and the record.
    pub fn dimension_values<'s>(
        &'s self,
        record: &'s Record<'_>,
    ) -> impl Iterator<Item = (&'s str, Cow<'s, str>)> {
        self.dimensions
            .iter()
            .flatten()
            .filter_map(|kv| kv.value_ref(record).map(|v| (kv.name.as_str(), v)))
    }

    /// Whether a trace is kept: tracing enabled and the trace id sampled.
    pub fn keep_trace(&self, trace_id: &[u8]) -> bool {
        match &self.tracing {
            Some(t) if t.mode != TracingMode::Disabled => {
                keep_trace(trace_id, t.numerator, t.denominator)
            }
            _ => false,
        }
    }

    /// The attributes the policy adds to a kept span read as `record`.
    pub fn span_attributes(&self, record: &Record<'_>) -> Vec<(String, String)> {
        let Some(t) = &self.tracing else {
            return Vec::new();
        };
        t.attributes
            .iter()
            .filter_map(|kv| kv.value(record).map(|v| (kv.name.clone(), v)))
            .collect()
    }

    /// `gen_ai.client.token.usage` values for `record` (none without `genAI`
    /// or token counts). Input counts are `gen_ai.usage.input_tokens` as
    /// logged: per the semantic conventions it includes cached tokens
    /// (`cache_read`/`cache_creation` are parts of it, not additions).
    pub fn gen_ai_usage(&self, record: &Record<'_>) -> Vec<GenAiPoint> {
        if !self.gen_ai {
            return Vec::new();
        }
        gen_ai_usage(record)
    }
}

/// Token usage of a record, by `gen_ai.token.type`.
pub fn gen_ai_usage(record: &Record<'_>) -> Vec<GenAiPoint> {
    let count = |a: A| match record.get(a as usize) {
        Some(AttrValue::Int(n)) => u64::try_from(*n).ok(),
        _ => None,
    };
    let mut out = Vec::with_capacity(2);
    if let Some(n) = count(A::GenAiInputTokens) {
        out.push(GenAiPoint {
            token_type: "input",
            tokens: n,
        });
    }
    if let Some(n) = count(A::GenAiOutputTokens) {
        out.push(GenAiPoint {
            token_type: "output",
            tokens: n,
        });
    }
    out
}

/// Head sampling by trace id, so a trace is kept or dropped whole: the last
/// 7 bytes of the id (its random part per W3C Trace Context level 2) read
/// as a number R < 2^56 are kept iff R / 2^56 < numerator / denominator.
pub fn keep_trace(trace_id: &[u8], numerator: u32, denominator: u32) -> bool {
    if denominator == 0 || numerator >= denominator {
        return denominator != 0;
    }
    if trace_id.len() < 7 {
        return false;
    }
    let tail = &trace_id[trace_id.len() - 7..];
    let r = tail
        .iter()
        .fold(0u128, |acc, &b| (acc << 8) | u128::from(b));
    r * u128::from(denominator) < u128::from(numerator) << 56
}

fn targets(spec: &PolicySpec) -> Result<Vec<TargetRef>, String> {
    if spec.target_refs.is_empty() {
        return Err("spec.targetRefs: at least one target is required".into());
    }
    if spec.target_refs.len() > MAX_TARGETS {
        return Err(format!("spec.targetRefs: at most {MAX_TARGETS} targets"));
    }
    let mut out = Vec::new();
    for (i, t) in spec.target_refs.iter().enumerate() {
        let at = format!("spec.targetRefs[{i}]");
        if !is_object_name(&t.name) {
            return Err(format!("{at}.name: {:?} is not a resource name", t.name));
        }
        let target = match (t.group.as_str(), t.kind.as_str()) {
            ("gateway.networking.k8s.io", "Gateway") => TargetRef::Gateway(t.name.clone()),
            ("" | "core", "Namespace") => TargetRef::Namespace(t.name.clone()),
            (g, k) => {
                return Err(format!(
                    "{at}: a target is a Gateway (group gateway.networking.k8s.io) or a Namespace (group \"\"), not {k:?} of group {g:?}"
                ));
            }
        };
        if !out.contains(&target) {
            out.push(target);
        }
    }
    Ok(out)
}

fn access_logs(spec: &crate::spec::AccessLogsSpec) -> Result<AccessLogs, String> {
    if spec.matches.len() > MAX_MATCHES {
        return Err(format!("spec.accessLogs.matches: at most {MAX_MATCHES}"));
    }
    if spec.fields.len() > MAX_FIELDS {
        return Err(format!("spec.accessLogs.fields: at most {MAX_FIELDS}"));
    }
    let matches: Vec<CompiledExpr> = spec
        .matches
        .iter()
        .enumerate()
        .map(|(i, m)| {
            CompiledExpr::compile_bool(&m.cel)
                .map_err(|e| format!("spec.accessLogs.matches[{i}].cel: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let mut fields = Vec::new();
    for (i, f) in spec.fields.iter().enumerate() {
        let id = vocab::lookup(f).ok_or_else(|| {
            format!("spec.accessLogs.fields[{i}]: unknown field {f:?} (see the vocabulary)")
        })?;
        if !fields.contains(&id) {
            fields.push(id);
        }
    }
    let used = matches.iter().fold(0, |bits, m| bits | m.used());
    Ok(AccessLogs {
        matches,
        used,
        fields,
    })
}

fn tracing(spec: &crate::spec::TracingSpec) -> Result<Tracing, String> {
    let mode = match spec.mode.as_deref() {
        None | Some("Enabled") => TracingMode::Enabled,
        Some("Disabled") => TracingMode::Disabled,
        Some("ImplementationDefault") => TracingMode::ImplementationDefault,
        Some(other) => {
            return Err(format!(
                "spec.tracing.mode: {other:?} is not Enabled, Disabled or ImplementationDefault"
            ));
        }
    };
    let (numerator, denominator) = match &spec.sampling_rate {
        None => (100, 100),
        Some(f) if f.denominator == 0 => {
            return Err("spec.tracing.samplingRate.denominator: must be at least 1".into());
        }
        // Envoy Gateway's `samplingFraction` fields are int32.
        Some(f) if f.denominator > i32::MAX as u32 => {
            return Err(format!(
                "spec.tracing.samplingRate.denominator: at most {}",
                i32::MAX
            ));
        }
        Some(f) if f.numerator > f.denominator => {
            return Err("spec.tracing.samplingRate: the numerator exceeds the denominator".into());
        }
        Some(f) => (f.numerator, f.denominator),
    };
    Ok(Tracing {
        mode,
        numerator,
        denominator,
        attributes: key_values("tracing.attributes", &spec.attributes, MAX_ATTRIBUTES)?,
    })
}

fn key_values(at: &str, specs: &[KeyValueSpec], max: usize) -> Result<Vec<KeyValue>, String> {
    if specs.len() > max {
        return Err(format!("spec.{at}: at most {max}"));
    }
    let mut out: Vec<KeyValue> = Vec::with_capacity(specs.len());
    for (i, kv) in specs.iter().enumerate() {
        let at = format!("spec.{at}[{i}]");
        if !valid_name(&kv.name) {
            return Err(format!(
                "{at}.name: {:?} is not a name (letters, digits, '_' and '.', at most {MAX_NAME_BYTES} bytes)",
                kv.name
            ));
        }
        if out.iter().any(|o| o.name == kv.name) {
            return Err(format!("{at}.name: {:?} is listed twice", kv.name));
        }
        if kv.value.len() > MAX_NAME_BYTES {
            return Err(format!("{at}.value: at most {MAX_NAME_BYTES} bytes"));
        }
        let source = match kv.from.as_str() {
            "Header" if is_header(&kv.value) => Source::Header(kv.value.to_ascii_lowercase()),
            "Header" => return Err(format!("{at}.value: {:?} is not a header name", kv.value)),
            "Literal" => Source::Literal(kv.value.clone()),
            "Attribute" => Source::Attribute(
                CompiledExpr::compile_scalar(&kv.value).map_err(|e| format!("{at}.value: {e}"))?,
            ),
            other => {
                return Err(format!(
                    "{at}.from: {other:?} is not Header, Literal or Attribute"
                ));
            }
        };
        out.push(KeyValue {
            name: kv.name.clone(),
            source,
        });
    }
    Ok(out)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        && !name.as_bytes()[0].is_ascii_digit()
}

fn is_header(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_!#$%&'*+.^`|~".contains(&b))
}

/// A Kubernetes object name (DNS-1123 subdomain).
fn is_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
}
