//! Validation of `Exporter` manifests into compiled exporters, and the
//! Kubernetes-style `Accepted` condition that reports the outcome.

use std::fmt;
use std::time::Duration;

use serde::Serialize;
use tally_model::Manifest;
use url::Url;

use crate::selector::{KindSelector, LabelSelector, SeriesSelector};
use crate::spec::{
    self, AuthenticationSpec, BatchSpec, ExporterSpec, HeaderSpec, MetricsSourceSpec,
    ResourceSelectorSpec, RetrySpec, SecretRefSpec, SinkSpec,
};

/// Names an exporter: its namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExporterKey {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ExporterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A validated, compiled exporter.
#[derive(Debug, Clone)]
pub struct Exporter {
    pub key: ExporterKey,
    pub generation: Option<u64>,
    /// The metrics sources.
    pub sources: Vec<Source>,
    /// Whether a source takes the project's policy-kept access logs.
    pub logs: bool,
    /// Whether a source takes the project's policy-sampled spans.
    pub traces: bool,
    pub sinks: Vec<SinkConfig>,
}

/// What a sink carries: each signal has its own OTLP path and its own
/// delivery sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Signal {
    Metrics,
    Logs,
    Traces,
}

impl Signal {
    /// `metrics`, `logs`, `traces`.
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::Metrics => "metrics",
            Signal::Logs => "logs",
            Signal::Traces => "traces",
        }
    }
}

/// A compiled source.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub selection: Selection,
}

/// What a source selects, always within what the exporter may see.
#[derive(Debug, Clone)]
pub enum Selection {
    /// Empty `metricsql` (or no selector): every series of the exporter's namespace.
    All,
    /// A MetricsQL series selector over the exporter's namespace.
    Series(SeriesSelector),
    /// Resource selectors; a series is selected if any selector matches.
    Resources(Vec<ResourceSelector>),
}

/// A compiled resource selector.
#[derive(Debug, Clone)]
pub struct ResourceSelector {
    /// `None`: the exporter's own namespace only. `Some`: namespaces of the
    /// exporter's project whose labels match.
    pub namespaces: Option<LabelSelector>,
    /// Labels of the resource itself.
    pub labels: LabelSelector,
    /// Empty: any kind.
    pub kinds: Vec<KindSelector>,
}

/// Temporality a sink wants for sums and histograms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Temporality {
    Cumulative,
    Delta,
}

/// Body encoding of OTLP/HTTP requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Encoding {
    Protobuf,
    Json,
}

/// Body compression of OTLP/HTTP requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Compression {
    Gzip,
    None,
}

/// A reference to one key of a secret in the exporter's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    pub name: String,
    pub key: String,
}

/// How a sink authenticates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication {
    None,
    /// `Authorization: Bearer <secret key>`.
    BearerToken(SecretRef),
    /// `Authorization: Basic base64(username:password)` from the named secret's
    /// keys `username` and `password`.
    Basic(String),
}

/// Where a header's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderValueSource {
    Literal(String),
    Secret(SecretRef),
}

/// An extra request header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderConfig {
    pub name: String,
    pub value: HeaderValueSource,
}

/// Batching settings, for the delivery crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    pub enabled: bool,
    pub timeout: Duration,
    pub max_size: usize,
}

/// The default `batch.maxSize`, in data points: the OpenTelemetry
/// Collector's batch processor default (`send_batch_size`), so the requests
/// of a collector sending with its defaults pass whole. A request's share
/// larger than `maxSize` must be decoded, split and encoded again, which
/// costs more than routing it (BENCHMARKS.md: 0.84 M points per CPU-second
/// at 500 against 1.8 M at 8,192, for requests of 5,000 points).
pub const DEFAULT_BATCH_MAX_SIZE: usize = 8192;

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            enabled: true,
            timeout: Duration::from_secs(5),
            max_size: DEFAULT_BATCH_MAX_SIZE,
        }
    }
}

/// Retry settings, for the delivery crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryConfig {
    pub enabled: bool,
    /// `u32::MAX` when not given: `max_elapsed` is the budget.
    pub max_attempts: u32,
    pub backoff: Duration,
    /// No retry starts later than this after a batch's first attempt.
    pub max_elapsed: Duration,
}

/// The default retry budget of a sink: enough for a few minutes of faults.
pub const DEFAULT_MAX_ELAPSED: Duration = Duration::from_secs(300);
/// The longest `retry.maxElapsedTime` a sink may ask for.
const MAX_MAX_ELAPSED: Duration = Duration::from_secs(24 * 3600);
/// The longest `otlp_http.timeout` a sink may ask for.
const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            enabled: true,
            max_attempts: u32::MAX,
            backoff: Duration::from_secs(2),
            max_elapsed: DEFAULT_MAX_ELAPSED,
        }
    }
}

/// A validated OTLP/HTTP sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkConfig {
    pub name: String,
    /// The full metrics URL (`.../v1/metrics`).
    pub metrics_url: Url,
    /// The full logs URL (`.../v1/logs`).
    pub logs_url: Url,
    /// The full traces URL (`.../v1/traces`).
    pub traces_url: Url,
    pub authentication: Authentication,
    pub headers: Vec<HeaderConfig>,
    pub temporality: Temporality,
    pub encoding: Encoding,
    pub compression: Compression,
    pub batch: BatchConfig,
    pub retry: RetryConfig,
    /// `otlp_http.timeout`; `None`: the pipeline's default.
    pub request_timeout: Option<Duration>,
}

/// The reason of a refused exporter, as used in its `Accepted` condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Reason {
    InvalidSpec,
    InvalidMetricsQL,
    ConflictingSelectors,
    InvalidSelector,
    UnsupportedAuthentication,
    InvalidEndpoint,
    InvalidDuration,
    InvalidSecretReference,
    InvalidHeader,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidSpec => "InvalidSpec",
            Reason::InvalidMetricsQL => "InvalidMetricsQL",
            Reason::ConflictingSelectors => "ConflictingSelectors",
            Reason::InvalidSelector => "InvalidSelector",
            Reason::UnsupportedAuthentication => "UnsupportedAuthentication",
            Reason::InvalidEndpoint => "InvalidEndpoint",
            Reason::InvalidDuration => "InvalidDuration",
            Reason::InvalidSecretReference => "InvalidSecretReference",
            Reason::InvalidHeader => "InvalidHeader",
        }
    }
}

/// One problem of a refused exporter, at a field path such as `spec.sinks[0].batch.timeout`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub reason: Reason,
    pub message: String,
}

/// Every problem found in a refused exporter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.message())]
pub struct InvalidExporter {
    pub problems: Vec<Problem>,
}

impl InvalidExporter {
    /// The first problem's reason: what a status condition shows.
    pub fn reason(&self) -> Reason {
        self.problems
            .first()
            .map_or(Reason::InvalidSpec, |p| p.reason)
    }

    /// All problems, `path: message`, joined by `; `.
    pub fn message(&self) -> String {
        self.problems
            .iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

pub use tally_model::Condition;

/// The `Accepted` condition for a validation outcome.
pub fn accepted_condition(
    outcome: &Result<Exporter, InvalidExporter>,
    generation: Option<u64>,
) -> Condition {
    match outcome {
        Ok(exporter) => Condition {
            kind: "Accepted".into(),
            status: "True".into(),
            reason: "Accepted".into(),
            message: format!(
                "{} source(s) and {} sink(s) accepted",
                exporter.sources.len(),
                exporter.sinks.len()
            ),
            observed_generation: generation,
            sink: None,
            source: None,
        },
        Err(invalid) => Condition {
            kind: "Accepted".into(),
            status: "False".into(),
            reason: invalid.reason().as_str().into(),
            message: invalid.message(),
            observed_generation: generation,
            sink: None,
            source: None,
        },
    }
}

/// Collects problems while validating.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, reason: Reason, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            reason,
            message: message.into(),
        });
    }
}

impl Exporter {
    /// Validates an `Exporter` manifest, reporting every problem at once.
    pub fn from_manifest(manifest: &Manifest) -> Result<Exporter, InvalidExporter> {
        let mut problems = Problems::default();
        if manifest.api_version != spec::API_VERSION {
            problems.add(
                "apiVersion",
                Reason::InvalidSpec,
                format!("must be {}", spec::API_VERSION),
            );
        }
        if manifest.kind != spec::KIND {
            problems.add("kind", Reason::InvalidSpec, "must be Exporter");
        }
        if let Err(message) = tally_model::resource::validate_name(&manifest.metadata.name) {
            problems.add("metadata.name", Reason::InvalidSpec, message);
        }
        let namespace = manifest.metadata.namespace.clone().unwrap_or_default();
        if namespace.is_empty() {
            problems.add(
                "metadata.namespace",
                Reason::InvalidSpec,
                "an Exporter is namespaced; metadata.namespace is required",
            );
        }
        let spec: ExporterSpec = match serde_json::from_value(manifest.spec.clone()) {
            Ok(spec) => spec,
            Err(e) => {
                problems.add("spec", Reason::InvalidSpec, e.to_string());
                return Err(InvalidExporter {
                    problems: problems.0,
                });
            }
        };
        let (sources, logs, traces) = compile_sources(&spec, &mut problems);
        let sinks = compile_sinks(&spec, &mut problems);
        if !problems.0.is_empty() {
            return Err(InvalidExporter {
                problems: problems.0,
            });
        }
        Ok(Exporter {
            key: ExporterKey {
                namespace,
                name: manifest.metadata.name.clone(),
            },
            generation: manifest.metadata.generation,
            sources,
            logs,
            traces,
            sinks,
        })
    }
}

fn check_names<'a>(names: impl Iterator<Item = &'a str>, what: &str, problems: &mut Problems) {
    let mut seen = std::collections::HashSet::new();
    for (i, name) in names.enumerate() {
        if name.is_empty() {
            problems.add(
                format!("spec.{what}[{i}].name"),
                Reason::InvalidSpec,
                "must not be empty",
            );
        } else if !seen.insert(name) {
            problems.add(
                format!("spec.{what}[{i}].name"),
                Reason::InvalidSpec,
                format!("{name:?} is used twice"),
            );
        }
    }
}

fn compile_sources(spec: &ExporterSpec, problems: &mut Problems) -> (Vec<Source>, bool, bool) {
    if spec.sources.is_empty() {
        problems.add(
            "spec.sources",
            Reason::InvalidSpec,
            "at least one source is required",
        );
    }
    check_names(
        spec.sources.iter().map(|s| s.name.as_str()),
        "sources",
        problems,
    );
    let mut sources = Vec::new();
    let (mut logs, mut traces) = (false, false);
    for (i, source) in spec.sources.iter().enumerate() {
        let path = format!("spec.sources[{i}].metrics");
        let signals = [
            source.metrics.is_some(),
            source.logs.is_some(),
            source.traces.is_some(),
        ];
        if signals.iter().filter(|s| **s).count() != 1 {
            problems.add(
                format!("spec.sources[{i}]"),
                Reason::InvalidSpec,
                "a source has exactly one of `metrics`, `logs` or `traces`",
            );
            continue;
        }
        logs |= source.logs.is_some();
        traces |= source.traces.is_some();
        let Some(metrics) = &source.metrics else {
            continue;
        };
        if let Some(selection) = compile_selection(metrics, &path, problems) {
            sources.push(Source {
                name: source.name.clone(),
                selection,
            });
        }
    }
    (sources, logs, traces)
}

fn compile_selection(
    metrics: &MetricsSourceSpec,
    path: &str,
    problems: &mut Problems,
) -> Option<Selection> {
    let metricsql = metrics.metricsql.as_deref().map(str::trim).unwrap_or("");
    match (&metrics.resource_selectors, metricsql.is_empty()) {
        (Some(_), false) => {
            problems.add(
                path,
                Reason::ConflictingSelectors,
                "metricsql and resourceSelectors are mutually exclusive",
            );
            None
        }
        (None, true) => Some(Selection::All),
        (None, false) => match SeriesSelector::parse(metricsql) {
            Ok(selector) => Some(Selection::Series(selector)),
            Err(message) => {
                problems.add(
                    format!("{path}.metricsql"),
                    Reason::InvalidMetricsQL,
                    message,
                );
                None
            }
        },
        (Some(selectors), true) => {
            if selectors.is_empty() {
                problems.add(
                    format!("{path}.resourceSelectors"),
                    Reason::InvalidSelector,
                    "must hold at least one selector (omit it to select everything)",
                );
                return None;
            }
            let compiled: Vec<_> = selectors
                .iter()
                .enumerate()
                .filter_map(|(j, s)| {
                    compile_resource_selector(
                        s,
                        &format!("{path}.resourceSelectors[{j}]"),
                        problems,
                    )
                })
                .collect();
            (compiled.len() == selectors.len()).then_some(Selection::Resources(compiled))
        }
    }
}

fn compile_resource_selector(
    spec: &ResourceSelectorSpec,
    path: &str,
    problems: &mut Problems,
) -> Option<ResourceSelector> {
    let mut ok = true;
    let mut compile = |s: Option<&spec::LabelSelectorSpec>, field: &str| {
        s.map(|s| {
            LabelSelector::compile(s).unwrap_or_else(|message| {
                problems.add(format!("{path}.{field}"), Reason::InvalidSelector, message);
                ok = false;
                LabelSelector::default()
            })
        })
    };
    let namespaces = compile(spec.namespace_selector.as_ref(), "namespaceSelector");
    let labels = compile(spec.label_selectors.as_ref(), "labelSelectors").unwrap_or_default();
    let kinds = spec.kinds.iter().map(KindSelector::compile).collect();
    ok.then_some(ResourceSelector {
        namespaces,
        labels,
        kinds,
    })
}

fn compile_sinks(spec: &ExporterSpec, problems: &mut Problems) -> Vec<SinkConfig> {
    if spec.sinks.is_empty() {
        problems.add(
            "spec.sinks",
            Reason::InvalidSpec,
            "at least one sink is required",
        );
    }
    check_names(
        spec.sinks.iter().map(|s| s.name.as_str()),
        "sinks",
        problems,
    );
    spec.sinks
        .iter()
        .enumerate()
        .filter_map(|(i, sink)| compile_sink(sink, &format!("spec.sinks[{i}]"), problems))
        .collect()
}

fn compile_sink(sink: &SinkSpec, path: &str, problems: &mut Problems) -> Option<SinkConfig> {
    let before = problems.0.len();
    let Some(otlp) = &sink.otlp_http else {
        problems.add(path, Reason::InvalidSpec, "a sink needs `otlp_http`");
        return None;
    };
    let metrics_url = parse_endpoint(&otlp.endpoint)
        .map_err(|m| {
            problems.add(
                format!("{path}.otlp_http.endpoint"),
                Reason::InvalidEndpoint,
                m,
            )
        })
        .ok();
    let authentication = compile_authentication(
        otlp.authentication.as_ref(),
        &format!("{path}.otlp_http.authentication"),
        problems,
    );
    let mut headers = Vec::new();
    for (field, list) in [
        ("headers", &sink.headers),
        ("otlp_http.headers", &otlp.headers),
    ] {
        for (j, h) in list.iter().enumerate() {
            if let Some(h) = compile_header(h, &format!("{path}.{field}[{j}]"), problems) {
                headers.push(h);
            }
        }
    }
    let temporality = match one_of(sink.temporality.as_deref(), otlp.temporality.as_deref()) {
        Ok(value) => choice(
            value,
            &[
                ("cumulative", Temporality::Cumulative),
                ("delta", Temporality::Delta),
            ],
            &format!("{path}.temporality"),
            problems,
        ),
        Err(()) => {
            problems.add(
                format!("{path}.temporality"),
                Reason::InvalidSpec,
                "give temporality either on the sink or under otlp_http, not both",
            );
            Temporality::Cumulative
        }
    };
    let encoding = choice(
        otlp.encoding.as_deref(),
        &[("protobuf", Encoding::Protobuf), ("json", Encoding::Json)],
        &format!("{path}.otlp_http.encoding"),
        problems,
    );
    let compression = choice(
        otlp.compression.as_deref(),
        &[("gzip", Compression::Gzip), ("none", Compression::None)],
        &format!("{path}.otlp_http.compression"),
        problems,
    );
    let batch = compile_batch(sink.batch.as_ref(), &format!("{path}.batch"), problems);
    let retry = compile_retry(sink.retry.as_ref(), &format!("{path}.retry"), problems);
    let request_timeout = otlp.timeout.as_deref().map(|text| {
        bounded_duration(
            text,
            MAX_REQUEST_TIMEOUT,
            format!("{path}.otlp_http.timeout"),
            problems,
        )
    });
    if problems.0.len() != before {
        return None;
    }
    let metrics_url = metrics_url?;
    Some(SinkConfig {
        name: sink.name.clone(),
        logs_url: signal_url(&metrics_url, "logs"),
        traces_url: signal_url(&metrics_url, "traces"),
        metrics_url,
        authentication,
        headers,
        temporality,
        encoding,
        compression,
        batch,
        retry,
        request_timeout,
    })
}

/// One of named options; absent means the first. An unknown name is a problem.
fn choice<T: Copy>(
    value: Option<&str>,
    options: &[(&str, T)],
    path: &str,
    problems: &mut Problems,
) -> T {
    let default = options[0].1;
    let Some(value) = value else { return default };
    if let Some((_, option)) = options.iter().find(|(name, _)| *name == value) {
        return *option;
    }
    let names: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
    problems.add(
        path,
        Reason::InvalidSpec,
        format!("unknown value {value:?} (use {})", names.join(" or ")),
    );
    default
}

/// At most one of two places may set a value.
fn one_of<'a>(a: Option<&'a str>, b: Option<&'a str>) -> Result<Option<&'a str>, ()> {
    match (a, b) {
        (Some(_), Some(_)) => Err(()),
        (a, b) => Ok(a.or(b)),
    }
}

/// The URL of `signal` beside a metrics URL (`.../v1/metrics` → `.../v1/logs`).
pub fn signal_url(metrics_url: &Url, signal: &str) -> Url {
    let mut url = metrics_url.clone();
    let base = metrics_url.path().trim_end_matches("metrics");
    url.set_path(&format!("{base}{signal}"));
    url
}

/// Parses an OTLP/HTTP base endpoint into the metrics URL.
pub fn parse_endpoint(endpoint: &str) -> Result<Url, String> {
    let mut url = Url::parse(endpoint).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "scheme must be http or https, not {:?}",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("the URL has no host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials do not belong in the URL; use authentication".into());
    }
    if url.fragment().is_some() {
        return Err("the URL must not have a fragment".into());
    }
    if !url.path().ends_with("/v1/metrics") {
        let path = format!("{}/v1/metrics", url.path().trim_end_matches('/'));
        url.set_path(&path);
    }
    Ok(url)
}

fn compile_secret_ref(
    r: Option<&SecretRefSpec>,
    key_required: bool,
    path: &str,
    problems: &mut Problems,
) -> Option<SecretRef> {
    let Some(r) = r else {
        problems.add(
            path,
            Reason::InvalidSecretReference,
            "secretRef is required",
        );
        return None;
    };
    let mut ok = true;
    if r.name.is_empty() {
        problems.add(
            format!("{path}.name"),
            Reason::InvalidSecretReference,
            "is required",
        );
        ok = false;
    }
    let key = r.key.clone().unwrap_or_default();
    if key_required && key.is_empty() {
        problems.add(
            format!("{path}.key"),
            Reason::InvalidSecretReference,
            "is required",
        );
        ok = false;
    }
    ok.then(|| SecretRef {
        name: r.name.clone(),
        key,
    })
}

fn compile_authentication(
    spec: Option<&AuthenticationSpec>,
    path: &str,
    problems: &mut Problems,
) -> Authentication {
    let Some(spec) = spec else {
        return Authentication::None;
    };
    let secret_path = format!("{path}.secretRef");
    match spec.kind.as_str() {
        "bearerToken" => compile_secret_ref(spec.secret_ref.as_ref(), true, &secret_path, problems)
            .map_or(Authentication::None, Authentication::BearerToken),
        "basic" => compile_secret_ref(spec.secret_ref.as_ref(), false, &secret_path, problems)
            .map_or(Authentication::None, |r| Authentication::Basic(r.name)),
        other => {
            problems.add(
                format!("{path}.type"),
                Reason::UnsupportedAuthentication,
                format!("unknown authentication type {other:?} (use bearerToken or basic)"),
            );
            Authentication::None
        }
    }
}

const RESERVED_HEADERS: [&str; 5] = [
    "content-type",
    "content-encoding",
    "content-length",
    "host",
    "transfer-encoding",
];

fn compile_header(spec: &HeaderSpec, path: &str, problems: &mut Problems) -> Option<HeaderConfig> {
    let name = spec.name.to_ascii_lowercase();
    if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
        problems.add(
            format!("{path}.name"),
            Reason::InvalidHeader,
            format!("{:?} is not a valid header name", spec.name),
        );
        return None;
    }
    if RESERVED_HEADERS.contains(&name.as_str()) {
        problems.add(
            format!("{path}.name"),
            Reason::InvalidHeader,
            format!("{name} is set by the exporter"),
        );
        return None;
    }
    let value = match (&spec.value, &spec.secret_ref) {
        (Some(_), Some(_)) | (None, None) => {
            problems.add(
                path,
                Reason::InvalidHeader,
                "give exactly one of value and secretRef",
            );
            return None;
        }
        (Some(v), None) => {
            if reqwest::header::HeaderValue::from_str(v).is_err() {
                problems.add(
                    format!("{path}.value"),
                    Reason::InvalidHeader,
                    "not a valid header value",
                );
                return None;
            }
            HeaderValueSource::Literal(v.clone())
        }
        (None, Some(r)) => HeaderValueSource::Secret(compile_secret_ref(
            Some(r),
            true,
            &format!("{path}.secretRef"),
            problems,
        )?),
    };
    Some(HeaderConfig { name, value })
}

/// Parses a positive duration such as `5s`, `1m30s`, `250ms` or `PT5S`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let parsed: jiff::SignedDuration = text
        .trim()
        .parse()
        .map_err(|e| format!("{text:?} is not a duration like 5s or 1m30s: {e}"))?;
    if parsed.is_negative() || parsed.is_zero() {
        return Err(format!("{text:?} must be positive"));
    }
    Duration::try_from(parsed).map_err(|e| format!("{text:?}: {e}"))
}

fn duration_field(
    text: Option<&str>,
    default: Duration,
    path: String,
    problems: &mut Problems,
) -> Duration {
    match text.map(parse_duration) {
        None => default,
        Some(Ok(d)) => d,
        Some(Err(message)) => {
            problems.add(path, Reason::InvalidDuration, message);
            default
        }
    }
}

fn compile_batch(spec: Option<&BatchSpec>, path: &str, problems: &mut Problems) -> BatchConfig {
    let default = BatchConfig::default();
    let Some(spec) = spec else { return default };
    let max_size = match spec.max_size {
        Some(0) => {
            problems.add(
                format!("{path}.maxSize"),
                Reason::InvalidSpec,
                "must be at least 1",
            );
            default.max_size
        }
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        None => default.max_size,
    };
    BatchConfig {
        enabled: spec.enabled.unwrap_or(default.enabled),
        timeout: duration_field(
            spec.timeout.as_deref(),
            default.timeout,
            format!("{path}.timeout"),
            problems,
        ),
        max_size,
    }
}

fn compile_retry(spec: Option<&RetrySpec>, path: &str, problems: &mut Problems) -> RetryConfig {
    let default = RetryConfig::default();
    let Some(spec) = spec else { return default };
    if spec.max_attempts == Some(0) {
        problems.add(
            format!("{path}.maxAttempts"),
            Reason::InvalidSpec,
            "must be at least 1",
        );
    }
    let max_elapsed = spec
        .max_elapsed_time
        .as_deref()
        .map_or(default.max_elapsed, |text| {
            bounded_duration(
                text,
                MAX_MAX_ELAPSED,
                format!("{path}.maxElapsedTime"),
                problems,
            )
        });
    RetryConfig {
        enabled: spec.enabled.unwrap_or(default.enabled),
        max_attempts: spec.max_attempts.unwrap_or(default.max_attempts),
        backoff: duration_field(
            spec.backoff.as_deref(),
            default.backoff,
            format!("{path}.backoff"),
            problems,
        ),
        max_elapsed,
    }
}

/// A positive duration of at most `max`; a problem at `path` otherwise.
fn bounded_duration(text: &str, max: Duration, path: String, problems: &mut Problems) -> Duration {
    let parsed = duration_field(Some(text), max, path.clone(), problems);
    if parsed > max {
        problems.add(
            path,
            Reason::InvalidDuration,
            format!("{text:?} is longer than {}s", max.as_secs()),
        );
        return max;
    }
    parsed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_friendly_and_iso_forms() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("PT2S").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("five seconds").is_err());
        assert!(parse_duration("5").is_err());
    }

    #[test]
    fn endpoints_get_the_metrics_path_once() {
        let url = parse_endpoint("https://otlp-gateway-prod-eu-west-0.grafana.net/otlp").unwrap();
        assert_eq!(
            url.as_str(),
            "https://otlp-gateway-prod-eu-west-0.grafana.net/otlp/v1/metrics"
        );
        let url = parse_endpoint("http://127.0.0.1:4318/").unwrap();
        assert_eq!(url.as_str(), "http://127.0.0.1:4318/v1/metrics");
        let url = parse_endpoint("http://c:4318/v1/metrics").unwrap();
        assert_eq!(url.path(), "/v1/metrics");
        assert!(parse_endpoint("ftp://x/").is_err());
        assert!(parse_endpoint("not a url").is_err());
        assert!(parse_endpoint("https://user:pw@x/").is_err());
    }
}
