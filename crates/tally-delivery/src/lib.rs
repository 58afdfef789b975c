//! The one delivery mechanism every Tally sink uses to push data to a remote
//! HTTP endpoint (edge agent → ledger, billing forwarder → provider,
//! exporters → customer OTLP endpoints).

use std::sync::Once;

/// Installs the process-wide TLS crypto provider (`ring`) once.
///
/// Tally uses one crypto provider for every crate (`ring`, which the NATS
/// client also brings), so reqwest is built without a provider of its own and
/// any HTTP client must be made after this has run. [`client_builder`] calls
/// it; call it directly only when building a `reqwest::Client` some other
/// way.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only if another provider was installed first, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A `reqwest::ClientBuilder` with TLS ready to use.
pub fn client_builder() -> reqwest::ClientBuilder {
    install_crypto_provider();
    reqwest::Client::builder()
}
