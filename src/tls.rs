//! One process-wide TLS crypto provider.
//!
//! pingora's rustls build and reqwest (built with `rustls-no-provider`) share rustls; rustls
//! needs exactly one process default provider before any client or server config is built.
//! Installing pingora's choice keeps a single crypto stack for TLS.

/// Installs the provider if none is installed yet. Cheap and idempotent; called before any
/// TLS-capable client is built.
pub fn install_crypto_provider() {
    pingora::tls::install_default_crypto_provider();
}
