//! Where and how a billing sink forwards: the `BillingSink` resource and the
//! per-meter `spec.billing.meterApiName`.
//!
//! ```yaml
//! apiVersion: billing.miloapis.com/v1alpha1
//! kind: BillingSink
//! metadata: {name: amberflo}
//! spec:
//!   provider: amberflo            # amberflo | openmeter
//!   endpoint: https://ingest.amberflo.io   # amberflo: POST {endpoint}/ingest
//!                                          # openmeter: POST {endpoint}/api/v1/events
//!   # A BillingSink is cluster-scoped and a Secret namespaced: the Secret is
//!   # read from `namespace` (default `tally-system`); key defaults to apiKey.
//!   apiKeySecretRef: {name: amberflo-api, key: apiKey, namespace: tally-system}
//!   windowSize: 1h                # default 1h; a whole number of seconds dividing a day
//!                                 # (reading from the ledger: a whole number of minutes)
//!   startAt: 2025-01-01T00:00:00Z # first window forwarded; default: the sink's creation
//!   allowedLateness: 5m           # a window is sent this long after it ends; default 5m
//!   batchSize: 100                # records per request; default 100
//!   requestTimeout: 30s           # default 30s
//!   maxInFlight: 4                # requests in flight at once; default 4 (1..=64)
//!   maxLag: 2h5m                  # lag past this is `Backlogged`; default 2 windows + allowedLateness
//!   usageEndpoint: https://app.amberflo.io  # where the provider's usage is queried
//!                                 # (reconcile); default: for Amberflo, `endpoint` with
//!                                 # a leading `ingest.` host label replaced by `app.`,
//!                                 # else `endpoint` itself
//! ```
//!
//! Windows are hourly by default because every record costs money:
//! Amberflo prices plans by meter events (records) ingested, so a record
//! per customer, meter and dimension values per hour is 60 times cheaper
//! than per minute, at the price of up to an hour (plus `allowedLateness`)
//! of delay before the provider sees usage.
//!
//! Durations take ISO 8601 (`PT1M`) or jiff's friendly form (`1m`, `90s`).

use std::time::Duration;

use jiff::SignedDuration;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tally_model::{Manifest, MeterDefinition, MeterPhase};

use crate::attribution::{BILLING_API_VERSION, BillingResourceError};

/// The metering service a sink forwards to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Amberflo's ingest API (`POST /ingest`, `X-API-KEY`).
    Amberflo,
    /// OpenMeter's event API (`POST /api/v1/events`, CloudEvents, bearer token).
    Openmeter,
}

/// A reference to a key of a `Secret`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretKeyRef {
    /// The Secret's name.
    pub name: String,
    /// The key inside it.
    #[serde(default = "default_secret_key")]
    pub key: String,
    /// The Secret's namespace (a BillingSink is cluster-scoped).
    #[serde(default = "default_secret_namespace")]
    pub namespace: String,
}

fn default_secret_key() -> String {
    "apiKey".into()
}

/// Where a BillingSink's Secret is looked up when `apiKeySecretRef.namespace`
/// is not given.
pub const DEFAULT_SECRET_NAMESPACE: &str = "tally-system";

fn default_secret_namespace() -> String {
    DEFAULT_SECRET_NAMESPACE.into()
}

/// A parsed `BillingSink`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillingSink {
    /// `metadata.name`; also names the sink's component metrics (`billing-<name>`).
    pub name: String,
    /// Which provider.
    pub provider: Provider,
    /// The provider's base URL.
    pub endpoint: reqwest::Url,
    /// Where the API key is.
    pub api_key_secret_ref: SecretKeyRef,
    /// Window length (default one hour). A sink whose progress was made
    /// with another size keeps that size unless `windowSize` is given
    /// ([`crate::forwarder`]).
    pub window: Duration,
    /// Whether `spec.windowSize` was given (rather than defaulted).
    pub window_explicit: bool,
    /// How long after its end a window is first sent (default five minutes).
    pub allowed_lateness: Duration,
    /// Records per request (default 100).
    pub batch_size: usize,
    /// Timeout of one request (default 30 s).
    pub request_timeout: Duration,
    /// Requests in flight at once (default 4): a stalled request holds only
    /// its own batch.
    pub max_in_flight: usize,
    /// A lag past this makes the sink `Backlogged` (default: two windows
    /// plus the allowed lateness).
    pub max_lag: Duration,
    /// Where the provider's own usage totals are read (reconciliation).
    pub usage_endpoint: reqwest::Url,
    /// The first window forwarded on a first start: `spec.startAt`, else the
    /// sink's `metadata.creationTimestamp`; `None`: when the forwarder first
    /// starts.
    pub start_at: Option<jiff::Timestamp>,
}

impl BillingSink {
    /// Whether the window is a whole number of minutes: the ledger keeps
    /// minute buckets, so only such windows can be read from it exactly.
    pub fn window_is_whole_minutes(&self) -> bool {
        self.window.as_secs().is_multiple_of(60) && self.window.subsec_nanos() == 0
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SinkSpec {
    provider: Provider,
    endpoint: String,
    api_key_secret_ref: SecretKeyRef,
    window_size: Option<String>,
    allowed_lateness: Option<String>,
    batch_size: Option<usize>,
    request_timeout: Option<String>,
    start_at: Option<jiff::Timestamp>,
    max_in_flight: Option<usize>,
    max_lag: Option<String>,
    usage_endpoint: Option<String>,
}

const SECONDS_PER_DAY: u64 = 86_400;
/// Most requests in flight per sink.
pub const MAX_IN_FLIGHT: usize = 64;

/// The default usage endpoint: Amberflo ingests at `ingest.amberflo.io`
/// and answers usage queries at `app.amberflo.io`; any other endpoint (a
/// proxy, a test server, OpenMeter) answers both itself.
fn default_usage_endpoint(provider: Provider, endpoint: &reqwest::Url) -> reqwest::Url {
    let mut usage = endpoint.clone();
    if provider == Provider::Amberflo
        && let Some(rest) = endpoint.host_str().and_then(|h| h.strip_prefix("ingest."))
        && usage.set_host(Some(&format!("app.{rest}"))).is_err()
    {
        return endpoint.clone();
    }
    usage
}

fn http_url(field: &str, text: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(text).map_err(|e| format!("spec.{field} {text:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("spec.{field} must be http or https"));
    }
    Ok(url)
}

impl BillingSink {
    /// Reads and checks a `BillingSink` manifest.
    pub fn from_manifest(manifest: &Manifest) -> Result<Self, BillingResourceError> {
        if manifest.kind != "BillingSink" || manifest.api_version != BILLING_API_VERSION {
            return Err(BillingResourceError::WrongKind {
                expected: "BillingSink",
                kind: manifest.kind.clone(),
                api_version: manifest.api_version.clone(),
            });
        }
        let invalid = |message: String| BillingResourceError::Invalid {
            kind: "BillingSink",
            name: manifest.metadata.name.clone(),
            message,
        };
        let spec: SinkSpec = serde_json::from_value(manifest.spec.clone())
            .map_err(|e| invalid(format!("spec: {e}")))?;
        let endpoint = http_url("endpoint", &spec.endpoint).map_err(invalid)?;
        let usage_endpoint = match &spec.usage_endpoint {
            Some(text) => http_url("usageEndpoint", text).map_err(invalid)?,
            None => default_usage_endpoint(spec.provider, &endpoint),
        };
        let duration = |field: &str, text: Option<&String>, default: Duration| match text {
            None => Ok(default),
            Some(text) => parse_duration(text).map_err(|e| invalid(format!("spec.{field}: {e}"))),
        };
        let window = duration(
            "windowSize",
            spec.window_size.as_ref(),
            Duration::from_secs(3600),
        )?;
        let secs = window.as_secs();
        if window.subsec_nanos() != 0 || secs == 0 || !SECONDS_PER_DAY.is_multiple_of(secs) {
            return Err(invalid(
                "spec.windowSize must be a whole number of seconds that divides a day".into(),
            ));
        }
        let batch_size = spec.batch_size.unwrap_or(100);
        if batch_size == 0 {
            return Err(invalid("spec.batchSize must be at least 1".into()));
        }
        let max_in_flight = spec.max_in_flight.unwrap_or(4);
        if !(1..=MAX_IN_FLIGHT).contains(&max_in_flight) {
            return Err(invalid(format!(
                "spec.maxInFlight must be 1 to {MAX_IN_FLIGHT}"
            )));
        }
        let allowed_lateness = duration(
            "allowedLateness",
            spec.allowed_lateness.as_ref(),
            Duration::from_secs(300),
        )?;
        let max_lag = duration(
            "maxLag",
            spec.max_lag.as_ref(),
            window.saturating_mul(2).saturating_add(allowed_lateness),
        )?;
        Ok(BillingSink {
            name: manifest.metadata.name.clone(),
            provider: spec.provider,
            endpoint,
            api_key_secret_ref: spec.api_key_secret_ref,
            window,
            window_explicit: spec.window_size.is_some(),
            allowed_lateness,
            batch_size,
            request_timeout: duration(
                "requestTimeout",
                spec.request_timeout.as_ref(),
                Duration::from_secs(30),
            )?,
            start_at: spec.start_at.or(manifest.metadata.creation_timestamp),
            max_in_flight,
            max_lag,
            usage_endpoint,
        })
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let signed: SignedDuration = text
        .parse()
        .map_err(|e| format!("{text:?} is not a duration: {e}"))?;
    Duration::try_from(signed).map_err(|_| format!("{text:?} is negative"))
}

/// A meter whose usage a sink forwards, and under which name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardedMeter {
    /// The MeterDefinition's name (how the ledger knows it).
    pub meter: String,
    /// The provider's meter api name: `spec.billing.meterApiName`, else the
    /// MeterDefinition's `metadata.uid`.
    pub api_name: String,
    /// The meter's dimensions, whose values each record carries (filled in
    /// by whoever compiles the catalog; empty: no dimensions).
    #[serde(default)]
    pub dimensions: Vec<String>,
}

impl ForwardedMeter {
    /// The forwarding of a MeterDefinition: `Ok(None)` for meters that are
    /// not billed (Draft and Retired meters are never forwarded).
    pub fn from_manifest(manifest: &Manifest) -> Result<Option<Self>, BillingResourceError> {
        let invalid = |message: String| BillingResourceError::Invalid {
            kind: "MeterDefinition",
            name: manifest.metadata.name.clone(),
            message,
        };
        let definition =
            MeterDefinition::from_manifest(manifest).map_err(|e| invalid(e.to_string()))?;
        if !matches!(
            definition.phase,
            MeterPhase::Published | MeterPhase::Deprecated
        ) {
            return Ok(None);
        }
        let explicit = definition
            .billing
            .as_ref()
            .and_then(|billing| billing.get("meterApiName"))
            .and_then(Value::as_str)
            .filter(|name| !name.is_empty());
        let api_name = explicit
            .map(str::to_owned)
            .or_else(|| manifest.metadata.uid.clone().filter(|uid| !uid.is_empty()))
            .ok_or_else(|| {
                invalid("neither spec.billing.meterApiName nor metadata.uid is set".into())
            })?;
        Ok(Some(ForwardedMeter {
            meter: manifest.metadata.name.clone(),
            api_name,
            dimensions: Vec::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Manifest {
        Manifest::parse_documents(text).unwrap().remove(0)
    }

    #[test]
    fn sink_defaults_and_fields() {
        let sink = BillingSink::from_manifest(&parse(
            r#"
apiVersion: billing.miloapis.com/v1alpha1
kind: BillingSink
metadata: {name: amberflo}
spec:
  provider: amberflo
  endpoint: https://ingest.amberflo.io
  apiKeySecretRef: {name: amberflo-api}
"#,
        ))
        .unwrap();
        assert_eq!(sink.provider, Provider::Amberflo);
        assert_eq!(sink.window, Duration::from_secs(3600), "hourly by default");
        assert_eq!(sink.max_in_flight, 4);
        assert_eq!(sink.max_lag, Duration::from_secs(2 * 3600 + 300));
        assert_eq!(sink.usage_endpoint.as_str(), "https://app.amberflo.io/");
        assert_eq!(sink.allowed_lateness, Duration::from_secs(300));
        assert_eq!(sink.batch_size, 100);
        assert_eq!(sink.api_key_secret_ref.key, "apiKey");

        let sink = BillingSink::from_manifest(&parse(
            r#"
apiVersion: billing.miloapis.com/v1alpha1
kind: BillingSink
metadata: {name: om}
spec: {provider: openmeter, endpoint: "http://127.0.0.1:1", apiKeySecretRef: {name: s, key: token},
       windowSize: PT5M, allowedLateness: 90s, batchSize: 7, requestTimeout: 2s,
       maxInFlight: 2, maxLag: 1h}
"#,
        ))
        .unwrap();
        assert_eq!(sink.provider, Provider::Openmeter);
        assert_eq!(sink.window, Duration::from_secs(300));
        assert_eq!(sink.allowed_lateness, Duration::from_secs(90));
        assert_eq!(sink.batch_size, 7);
        assert_eq!(sink.max_in_flight, 2);
        assert_eq!(sink.max_lag, Duration::from_secs(3600));
        assert_eq!(sink.usage_endpoint.as_str(), "http://127.0.0.1:1/");
    }

    #[test]
    fn sink_refusals() {
        let base = "apiVersion: billing.miloapis.com/v1alpha1\nkind: BillingSink\nmetadata: {name: x}\nspec: ";
        for spec in [
            "{provider: stripe, endpoint: 'http://a', apiKeySecretRef: {name: s}}",
            "{provider: amberflo, endpoint: 'ftp://a', apiKeySecretRef: {name: s}}",
            "{provider: amberflo, endpoint: 'http://a', apiKeySecretRef: {name: s}, windowSize: 7s}",
            "{provider: amberflo, endpoint: 'http://a', apiKeySecretRef: {name: s}, batchSize: 0}",
            "{provider: amberflo, endpoint: 'http://a', apiKeySecretRef: {name: s}, allowedLateness: soon}",
            "{provider: amberflo, endpoint: 'http://a'}",
            "{provider: amberflo, endpoint: 'http://a', apiKeySecretRef: {name: s}, maxInFlight: 0}",
            "{provider: amberflo, endpoint: 'http://a', apiKeySecretRef: {name: s}, maxInFlight: 65}",
            "{provider: amberflo, endpoint: 'http://a', apiKeySecretRef: {name: s}, usageEndpoint: 'x:y'}",
        ] {
            assert!(
                BillingSink::from_manifest(&parse(&format!("{base}{spec}"))).is_err(),
                "{spec}"
            );
        }
    }

    #[test]
    fn meter_api_name_defaults_to_uid_and_drafts_are_not_forwarded() {
        let meter = |phase: &str, billing: &str| {
            parse(&format!(
                r#"
apiVersion: billing.miloapis.com/v1alpha1
kind: MeterDefinition
metadata: {{name: requests, uid: 0d7a-uid}}
spec:
  meterName: networking.datumapis.com/gateway/requests
  phase: {phase}
  measurement: {{aggregation: Sum, unit: "{{request}}"}}
  {billing}
"#
            ))
        };
        let forwarded = ForwardedMeter::from_manifest(&meter("Published", ""))
            .unwrap()
            .unwrap();
        assert_eq!(forwarded.api_name, "0d7a-uid");
        let named = ForwardedMeter::from_manifest(&meter(
            "Published",
            "billing: {meterApiName: gw-requests}",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(named.api_name, "gw-requests");
        assert_eq!(
            ForwardedMeter::from_manifest(&meter("Draft", "")).unwrap(),
            None
        );
    }
}
