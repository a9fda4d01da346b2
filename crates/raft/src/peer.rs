//! Connections to other nodes' `keel.raft.v1.Raft` service: plaintext, or, when the
//! cluster runs TLS, mutual TLS (this node's certificate as its client certificate,
//! the cluster's CA as the only trust anchor).

use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// How this node reaches the others over TLS.
#[derive(Debug, Clone)]
pub struct PeerTls {
    config: ClientTlsConfig,
}

impl PeerTls {
    /// Trusting `ca_pem` and presenting `cert_pem` with `key_pem` (PEM texts).
    pub fn new(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Self {
        Self {
            config: ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca_pem))
                .identity(Identity::from_pem(cert_pem, key_pem)),
        }
    }

    /// Read from the PEM files: the CA, this node's certificate and its key.
    ///
    /// # Errors
    ///
    /// A file cannot be read.
    pub fn from_files(
        ca: &std::path::Path,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> std::io::Result<Self> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|err| {
                std::io::Error::new(err.kind(), format!("{}: {err}", path.display()))
            })
        };
        Ok(Self::new(&read(ca)?, &read(cert)?, &read(key)?))
    }
}

/// The endpoint of the node at `addr` (`host:port`, or an `http://` or `https://`
/// URL): TLS when `tls` is given, whatever the scheme says.
///
/// # Errors
///
/// The address is malformed.
pub fn endpoint(addr: &str, tls: Option<&PeerTls>) -> Result<Endpoint, tonic::transport::Error> {
    let bare = addr
        .strip_prefix("http://")
        .or_else(|| addr.strip_prefix("https://"))
        .unwrap_or(addr)
        .trim_end_matches('/');
    let endpoint = match tls {
        None => Endpoint::from_shared(format!("http://{bare}"))?,
        Some(tls) => {
            Endpoint::from_shared(format!("https://{bare}"))?.tls_config(tls.config.clone())?
        }
    };
    Ok(endpoint
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true))
}
