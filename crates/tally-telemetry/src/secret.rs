//! Secret values and their resolution into request headers. A secret value
//! never reaches a log line, an error message, a Debug print or API output.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use base64::Engine as _;

use crate::exporter::{Authentication, HeaderValueSource, SecretRef, SinkConfig};

/// A secret value. `Debug` and `Display` print `<redacted>`; the value is
/// read only with [`SecretValue::expose`], where it goes on the wire.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(String);

impl SecretValue {
    pub fn new(value: impl Into<String>) -> Self {
        SecretValue(value.into())
    }

    /// The value itself: only for putting it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(<redacted>)")
    }
}

impl fmt::Display for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Read access to `Secret` resources.
pub trait SecretStore {
    /// The value of `key` in the secret `name` of `namespace`, if both exist.
    fn secret_value(&self, namespace: &str, name: &str, key: &str) -> Option<SecretValue>;
}

/// A referenced secret or key is missing. Names the reference, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("secret {namespace}/{name} has no key {key:?} (or does not exist)")]
pub struct MissingSecret {
    pub namespace: String,
    pub name: String,
    pub key: String,
}

/// A header ready for the wire; its value may hold a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedHeader {
    pub name: String,
    pub value: SecretValue,
}

/// Resolves a sink's authentication and headers from secrets in the
/// exporter's namespace (and only there).
pub fn resolve_headers(
    sink: &SinkConfig,
    namespace: &str,
    secrets: &dyn SecretStore,
) -> Result<Vec<ResolvedHeader>, MissingSecret> {
    let lookup = |r: &SecretRef, key: &str| {
        secrets
            .secret_value(namespace, &r.name, key)
            .ok_or_else(|| MissingSecret {
                namespace: namespace.to_owned(),
                name: r.name.clone(),
                key: key.to_owned(),
            })
    };
    let mut headers = Vec::new();
    match &sink.authentication {
        Authentication::None => {}
        Authentication::BearerToken(r) => {
            let token = lookup(r, &r.key)?;
            headers.push(ResolvedHeader {
                name: "authorization".into(),
                value: SecretValue(format!("Bearer {}", token.expose())),
            });
        }
        Authentication::Basic(name) => {
            let r = SecretRef {
                name: name.clone(),
                key: String::new(),
            };
            let username = lookup(&r, "username")?;
            let password = lookup(&r, "password")?;
            let encoded = base64::engine::general_purpose::STANDARD.encode(format!(
                "{}:{}",
                username.expose(),
                password.expose()
            ));
            headers.push(ResolvedHeader {
                name: "authorization".into(),
                value: SecretValue(format!("Basic {encoded}")),
            });
        }
    }
    for header in &sink.headers {
        let value = match &header.value {
            HeaderValueSource::Literal(v) => SecretValue(v.clone()),
            HeaderValueSource::Secret(r) => lookup(r, &r.key)?,
        };
        headers.push(ResolvedHeader {
            name: header.name.clone(),
            value,
        });
    }
    Ok(headers)
}

/// Secret values by (namespace, secret name) and key.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    secrets: HashMap<(String, String), BTreeMap<String, SecretValue>>,
}

impl Secrets {
    /// No secrets.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the secret `name` of `namespace`.
    pub fn insert(
        &mut self,
        namespace: impl Into<String>,
        name: impl Into<String>,
        data: BTreeMap<String, SecretValue>,
    ) {
        self.secrets.insert((namespace.into(), name.into()), data);
    }
}

impl SecretStore for Secrets {
    fn secret_value(&self, namespace: &str, name: &str, key: &str) -> Option<SecretValue> {
        self.secrets
            .get(&(namespace.to_owned(), name.to_owned()))
            .and_then(|data| data.get(key))
            .cloned()
    }
}
