//! TLS on every listener (rustls with ring; TLS 1.2 and 1.3 only): the certificate chain
//! and key from PEM files, reloaded without a restart on SIGHUP and when the files change;
//! optionally client certificates (mutual TLS) checked against a CA, whose subject's common
//! name (or first subject alternative name) names the principal when no other credentials
//! are given.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use parking_lot::{Mutex, RwLock};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tokio::net::TcpStream;

/// `[tls]` in the configuration file (docs/configuration.md, docs/security.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM: the server's certificate chain, leaf first. With `key_file`, every listener
    /// speaks TLS.
    pub cert_file: Option<PathBuf>,
    /// PEM: the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// PEM: CAs that sign client certificates (mutual TLS).
    pub client_ca_file: Option<PathBuf>,
    /// `none`, `optional` (a client may present a certificate), `required`.
    pub client_auth: ClientAuth,
    /// How often the files are checked for changes (they are also reloaded on SIGHUP).
    pub reload_check_ms: u64,
    /// A TLS handshake must end within this long.
    pub handshake_timeout_ms: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            client_auth: ClientAuth::None,
            reload_check_ms: 10_000,
            handshake_timeout_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    None,
    Optional,
    Required,
}

impl TlsConfig {
    /// Whether TLS is on: both files given (one alone is an error).
    pub fn enabled(&self) -> anyhow::Result<bool> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), Some(_)) => {}
            (None, None) => {
                if self.client_ca_file.is_some() || self.client_auth != ClientAuth::None {
                    anyhow::bail!(
                        "[tls] client_ca_file and client_auth need cert_file and key_file (the server's certificate)"
                    );
                }
                return Ok(false);
            }
            _ => anyhow::bail!("[tls] needs both cert_file and key_file"),
        }
        if self.client_auth != ClientAuth::None && self.client_ca_file.is_none() {
            anyhow::bail!("[tls] client_auth = optional or required needs client_ca_file");
        }
        Ok(true)
    }
}

/// The TLS configuration in force, replaced whole at each reload.
pub struct Tls {
    settings: TlsConfig,
    config: RwLock<Arc<rustls::ServerConfig>>,
    /// The files' modification times at the last load.
    stamps: Mutex<Vec<Option<SystemTime>>>,
}

impl Tls {
    pub fn load(settings: &TlsConfig) -> anyhow::Result<Arc<Tls>> {
        let stamps = stamps(settings);
        let config = build(settings)?;
        Ok(Arc::new(Tls {
            settings: settings.clone(),
            config: RwLock::new(Arc::new(config)),
            stamps: Mutex::new(stamps),
        }))
    }

    /// Loads the files again; on failure keeps what is in force and says why.
    pub fn reload(&self) {
        let stamps = stamps(&self.settings);
        match build(&self.settings) {
            Ok(config) => {
                *self.config.write() = Arc::new(config);
                *self.stamps.lock() = stamps;
                tracing::info!("TLS certificate reloaded");
            }
            Err(err) => {
                // Not again until the files change once more.
                *self.stamps.lock() = stamps;
                tracing::error!(error = %format!("{err:#}"), "TLS reload failed; the previous certificate stays in force");
            }
        }
    }

    pub fn reload_if_changed(&self) {
        if stamps(&self.settings) != *self.stamps.lock() {
            self.reload();
        }
    }

    /// Reloads on SIGHUP and when the files change, until the process ends.
    pub fn spawn_reloader(self: &Arc<Tls>) -> tokio::task::JoinHandle<()> {
        let every = Duration::from_millis(self.settings.reload_check_ms.max(100));
        let (tls, changed) = (self.clone(), self.clone());
        crate::reload::spawn(
            Some(every),
            move || tls.reload(),
            move || changed.reload_if_changed(),
        )
    }

    /// The handshake on an accepted connection, within `handshake_timeout_ms`.
    pub async fn accept(
        &self,
        stream: TcpStream,
    ) -> std::io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        self.accept_alpn(stream, None).await
    }

    /// `accept`, offering one ALPN protocol (gRPC clients insist on `h2`).
    pub async fn accept_alpn(
        &self,
        stream: TcpStream,
        alpn: Option<&[u8]>,
    ) -> std::io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        let config = self.config.read().clone();
        let config = match alpn {
            None => config,
            Some(protocol) => {
                let mut config = (*config).clone();
                config.alpn_protocols = vec![protocol.to_vec()];
                Arc::new(config)
            }
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let timeout = Duration::from_millis(self.settings.handshake_timeout_ms);
        match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "TLS handshake timed out (handshake_timeout_ms)",
            )),
        }
    }
}

fn stamps(settings: &TlsConfig) -> Vec<Option<SystemTime>> {
    [
        &settings.cert_file,
        &settings.key_file,
        &settings.client_ca_file,
    ]
    .into_iter()
    .map(|p| {
        p.as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .and_then(|m| m.modified().ok())
    })
    .collect()
}

fn certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not PEM certificates", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{}: no certificate in it", path.display());
    }
    Ok(certs)
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build(settings: &TlsConfig) -> anyhow::Result<rustls::ServerConfig> {
    let (Some(cert_file), Some(key_file)) = (&settings.cert_file, &settings.key_file) else {
        anyhow::bail!("[tls] needs cert_file and key_file");
    };
    let certs = certificates(cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .with_context(|| format!("{}: no private key in it", key_file.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS versions")?;
    let builder = match (&settings.client_ca_file, settings.client_auth) {
        (Some(ca), auth) if auth != ClientAuth::None => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(ca)? {
                roots
                    .add(cert)
                    .with_context(|| format!("{}: a CA certificate", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            );
            let verifier = if auth == ClientAuth::Optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(verifier.build().context("client verifier")?)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .with_context(|| format!("{} and {}", cert_file.display(), key_file.display()))?;
    config.alpn_protocols = Vec::new();
    Ok(config)
}

/// The principal a verified client certificate names: its subject's common name, else its
/// first subject alternative name (DNS, email or URI).
pub fn certificate_principal(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::*;
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).ok()?;
    if let Some(cn) = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .filter(|cn| !cn.is_empty())
    {
        return Some(cn.to_string());
    }
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::DNSName(n) | GeneralName::RFC822Name(n) | GeneralName::URI(n) => {
            Some(n.to_string())
        }
        _ => None,
    })
}

/// The principal of a TLS connection's verified client certificate, if it showed one.
pub fn peer_principal(stream: &tokio_rustls::server::TlsStream<TcpStream>) -> Option<String> {
    let (_, connection) = stream.get_ref();
    connection
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(certificate_principal)
}
