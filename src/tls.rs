//! TLS with rustls and its `ring` provider (no aws-lc, so nothing needs cmake): server
//! configs from PEM files for `tls:` SIP listeners and the HTTPS webhook, the client config
//! for TLS upstreams, and the HTTPS listener handed to `axum::serve`.
//!
//! Upstream certificates are verified against the Mozilla roots bundled in the binary
//! (`webpki-roots`: no system store, no network) plus the PEM certificates of
//! `sip.tls_ca`, for a private CA or a self-signed agent. The name checked is the host of
//! the upstream URI as configured (`sips:agent.example:5061` → `agent.example`), or its IP
//! address when it is written as one; an in-dialog request to a peer that is not a
//! configured upstream is checked against the IP address it goes to.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Why a TLS config could not be built. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read certificates: {reason}")]
    Certs { path: PathBuf, reason: String },
    #[error("{path}: no certificate in the file (PEM \"BEGIN CERTIFICATE\" expected)")]
    NoCert { path: PathBuf },
    #[error("{path}: cannot read a private key: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("certificate and key do not make a TLS config: {0}")]
    Config(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM file (a chain: leaf first).
///
/// # Errors
/// The file cannot be read, or holds no certificate.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let problem = |reason: String| TlsError::Certs {
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| problem(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| problem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCert {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
///
/// # Errors
/// The file cannot be read or holds no key.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Key {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// A server config from a PEM chain and key; `alpn` lists the protocols offered
/// (`http/1.1` for the webhook, none for SIP).
///
/// # Errors
/// A file cannot be read, or the key does not match the certificate.
pub fn server_config(
    cert: &Path,
    key: &Path,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs(cert)?;
    let key = load_key(key)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The client config for TLS upstreams: the bundled Mozilla roots plus every certificate
/// in `ca` (`sip.tls_ca`).
///
/// # Errors
/// `ca` cannot be read or holds no usable certificate.
pub fn client_config(ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca {
        for cert in load_certs(path)? {
            roots.add(cert).map_err(|e| TlsError::Certs {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        }
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Reads every TLS file the config names, as `precall run` will: the problems, each
/// naming its key and file (for `precall check`).
pub fn check_files(config: &crate::config::Config) -> Vec<String> {
    let mut problems = Vec::new();
    let tls = &config.sip.tls;
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        if let Err(e) = server_config(cert, key, &[]) {
            problems.push(format!("sip.tls_cert/tls_key: {e}"));
        }
    }
    if let Some(ca) = &tls.ca {
        if let Err(e) = client_config(Some(ca)) {
            problems.push(format!("sip.tls_ca: {e}"));
        }
    }
    if let Some(http) = &config.http.tls {
        if let Err(e) = server_config(&http.cert, &http.key, &[]) {
            problems.push(format!("http.tls_cert/tls_key: {e}"));
        }
    }
    problems
}

/// How long a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once on one listener; past it new connections wait in the
/// kernel's backlog, so a flood of idle connections cannot pile up tasks.
const HANDSHAKES_MAX: usize = 256;

/// An HTTPS listener for `axum::serve`: accepts TCP, runs each TLS handshake on its own
/// task (a slow client never blocks the next), and yields finished connections.
pub struct HttpsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl HttpsListener {
    /// Starts accepting on `tcp` until `stop` is cancelled.
    ///
    /// # Errors
    /// The socket's local address cannot be read.
    pub fn new(
        tcp: TcpListener,
        config: Arc<ServerConfig>,
        stop: CancellationToken,
    ) -> io::Result<HttpsListener> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        let slots = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_MAX));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                    return;
                };
                let accepted = tokio::select! {
                    () = stop.cancelled() => return,
                    r = tcp.accept() => r,
                };
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(error) => {
                        debug!(%error, "HTTPS accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(error)) => debug!(%error, %peer, "HTTPS handshake failed"),
                        Err(_) => debug!(%peer, "HTTPS handshake timed out"),
                    }
                });
            }
        });
        Ok(HttpsListener { ready, local })
    }
}

impl axum::serve::Listener for HttpsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(pair) => pair,
            // The accept loop stopped (shutdown): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert_path = dir.join("cert.pem");
        let key_path = dir.join("key.pem");
        std::fs::write(&cert_path, cert.cert.pem()).unwrap();
        std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("precall-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn server_and_client_configs_load_from_pem() {
        let dir = temp_dir("load");
        let (cert, key) = self_signed(&dir);
        let server = server_config(&cert, &key, &[b"http/1.1"]).unwrap();
        assert_eq!(server.alpn_protocols, vec![b"http/1.1".to_vec()]);
        let client = client_config(Some(&cert)).unwrap();
        drop(client);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn errors_name_the_file() {
        let dir = temp_dir("errors");
        let (cert, key) = self_signed(&dir);
        let missing = dir.join("missing.pem");
        let e = server_config(&missing, &key, &[]).unwrap_err().to_string();
        assert!(e.contains("missing.pem"), "{e}");
        // a key where the certificate should be: no certificate in it
        let e = server_config(&key, &key, &[]).unwrap_err().to_string();
        assert!(e.contains("no certificate"), "{e}");
        let e = server_config(&cert, &cert, &[]).unwrap_err().to_string();
        assert!(e.contains("private key"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
