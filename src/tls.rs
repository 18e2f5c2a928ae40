//! TLS: one process-wide crypto provider, and the downstream certificate that reloads itself.
//!
//! pingora's rustls build and reqwest (built with `rustls-no-provider`) share rustls; rustls
//! needs exactly one process default provider before any client or server config is built.
//! Installing pingora's choice keeps a single crypto stack.
//!
//! The downstream listener's certificate sits behind a resolver that is asked on every
//! handshake, so replacing the files (cert-manager, a mounted Secret) takes effect for new
//! connections without a restart; connections already open keep theirs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use pingora::listeners::TlsAccept;
use pingora::listeners::tls::TlsSettings;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Installs the provider if none is installed yet. Cheap and idempotent; called before any
/// TLS-capable client is built.
pub fn install_crypto_provider() {
    pingora::tls::install_default_crypto_provider();
}

/// Reads a PEM certificate chain and its private key and checks they form a usable pair.
pub fn load_certified_key(cert_file: &Path, key_file: &Path) -> Result<Arc<CertifiedKey>, String> {
    install_crypto_provider();
    let certs = read_certs(cert_file)?;
    let key = read_key(key_file)?;
    let key = rustls::pki_types::PrivateKeyDer::try_from(key)
        .map_err(|e| format!("\"{}\": {e}", key_file.display()))?;
    let provider = rustls::crypto::CryptoProvider::get_default()
        .ok_or_else(|| "no TLS crypto provider is installed".to_string())?;
    let certified =
        CertifiedKey::from_der(certs.into_iter().map(Into::into).collect(), key, provider)
            .map_err(|e| {
                format!(
                    "\"{}\" and \"{}\" do not form a usable certificate and key: {e}",
                    cert_file.display(),
                    key_file.display()
                )
            })?;
    Ok(Arc::new(certified))
}

/// The downstream certificate, replaced in place when its files change.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<(Option<SystemTime>, Arc<CertifiedKey>)>,
}

impl ReloadingCert {
    /// Loads the pair now; called at start (config load already checked the files).
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Arc<ReloadingCert>, String> {
        let key = load_certified_key(cert_file, key_file)?;
        Ok(Arc::new(ReloadingCert {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            current: RwLock::new((modified(cert_file, key_file), key)),
        }))
    }

    /// Re-reads the files if either changed. A pair that does not load is logged and the
    /// previous certificate stays in use.
    pub fn reload_if_changed(&self) {
        let stamp = modified(&self.cert_file, &self.key_file);
        let unchanged = self.current.read().map(|c| c.0 == stamp).unwrap_or(false);
        if unchanged {
            return;
        }
        match load_certified_key(&self.cert_file, &self.key_file) {
            Ok(key) => {
                if let Ok(mut current) = self.current.write() {
                    *current = (stamp, key);
                }
                tracing::info!(cert = %self.cert_file.display(), "reloaded the TLS certificate");
            }
            Err(e) => {
                tracing::warn!(error = %e, "the changed TLS certificate does not load; keeping the previous one");
                if let Ok(mut current) = self.current.write() {
                    // Do not retry the same broken files every tick.
                    current.0 = stamp;
                }
            }
        }
    }

    /// Checks the files every `interval` until the returned task is aborted.
    pub fn spawn_watcher(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                match this.upgrade() {
                    Some(cert) => cert.reload_if_changed(),
                    None => return,
                }
            }
        })
    }
}

fn modified(cert_file: &Path, key_file: &Path) -> Option<SystemTime> {
    let stamp = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    match (stamp(cert_file), stamp(key_file)) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.1.clone())
    }
}

/// pingora's rustls settings take callbacks; txgate needs none beyond the resolver.
struct NoCallbacks;

#[async_trait]
impl TlsAccept for NoCallbacks {}

/// Listener settings: the reloading certificate, HTTP/2 and HTTP/1.1 by ALPN.
pub fn listener_settings(cert: Arc<ReloadingCert>) -> Result<TlsSettings, String> {
    install_crypto_provider();
    let mut settings = TlsSettings::with_callbacks(Box::new(NoCallbacks))
        .map_err(|e| format!("cannot build TLS settings: {e}"))?;
    settings.set_cert_resolver(cert);
    settings.enable_h2();
    Ok(settings)
}

/// Every certificate in a PEM file, as DER; none is an error.
pub fn read_certs(file: &Path) -> Result<Vec<Vec<u8>>, String> {
    let bytes =
        std::fs::read(file).map_err(|e| format!("cannot read \"{}\": {e}", file.display()))?;
    let certs: Vec<Vec<u8>> = rustls_pemfile::certs(&mut bytes.as_slice())
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("\"{}\" is not PEM: {e}", file.display()))?;
    if certs.is_empty() {
        return Err(format!("\"{}\" holds no PEM certificate", file.display()));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1), as DER.
pub fn read_key(file: &Path) -> Result<Vec<u8>, String> {
    let bytes =
        std::fs::read(file).map_err(|e| format!("cannot read \"{}\": {e}", file.display()))?;
    rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|e| format!("\"{}\" is not PEM: {e}", file.display()))?
        .map(|k| k.secret_der().to_vec())
        .ok_or_else(|| format!("\"{}\" holds no PEM private key", file.display()))
}
