//! TLS for keel's listeners and clients: rustls with the `ring` provider, from PEM
//! files. A listener given a certificate speaks TLS only (HTTP/1.1 and HTTP/2 by
//! ALPN, so gRPC and JSON still share it); given a client CA too, it asks every
//! client for a certificate and verifies the ones it gets against that CA, and the
//! principal a verified certificate names ([`principal_of`]) reaches each request as
//! a [`PeerPrincipal`] extension. Whether a request needs a certificate is the
//! caller's policy (a cluster node's Raft traffic does; a client may use a token).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
pub use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// What a TLS listener is given: its certificate chain and key (PEM), and the CA
/// that client certificates must chain to, when they are asked for.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerTlsFiles {
    /// The certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA client certificates must chain to (PEM); none: no client certificates.
    pub client_ca: Option<PathBuf>,
}

/// What a TLS client is given: the CA that the server's certificate must chain to,
/// and its own certificate and key, when it presents one. In a config file:
/// `ca`, and `cert` and `key` together.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "ClientTlsFields", into = "ClientTlsFields")]
pub struct ClientTlsFiles {
    /// The CA to trust (PEM).
    pub ca: PathBuf,
    /// A client certificate chain and its key (PEM), for mutual TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// [`ClientTlsFiles`] as a config file writes it.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientTlsFields {
    ca: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<PathBuf>,
}

impl TryFrom<ClientTlsFields> for ClientTlsFiles {
    type Error = &'static str;

    fn try_from(fields: ClientTlsFields) -> Result<Self, Self::Error> {
        let identity = match (fields.cert, fields.key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => return Err("`cert` and `key` go together"),
        };
        Ok(Self {
            ca: fields.ca,
            identity,
        })
    }
}

impl From<ClientTlsFiles> for ClientTlsFields {
    fn from(files: ClientTlsFiles) -> Self {
        let (cert, key) = files.identity.unzip();
        Self {
            ca: files.ca,
            cert,
            key,
        }
    }
}

/// A TLS file or setting that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {why}")]
pub struct TlsError {
    what: String,
    why: String,
}

impl TlsError {
    fn file(path: &Path, why: impl std::fmt::Display) -> Self {
        Self {
            what: path.display().to_string(),
            why: why.to_string(),
        }
    }

    /// A setting (not a file) that cannot be used.
    pub fn setting(why: impl std::fmt::Display) -> Self {
        Self {
            what: "TLS".into(),
            why: why.to_string(),
        }
    }
}

/// The principal a verified client certificate names, set on each request of its
/// connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPrincipal(pub Arc<str>);

/// The crypto every keel TLS config uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in the PEM file `path`.
///
/// # Errors
///
/// The file cannot be read or holds no certificate.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    named(path)?;
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| TlsError::file(path, err))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| TlsError::file(path, err))?;
    if certs.is_empty() {
        return Err(TlsError::file(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// The private key in the PEM file `path`.
///
/// # Errors
///
/// The file cannot be read or holds no key.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    named(path)?;
    PrivateKeyDer::from_pem_file(path).map_err(|err| TlsError::file(path, err))
}

/// A path left empty (a config file's `[tls]` section without `cert` or `key`)
/// is a setting to fill in, not a file that is missing.
fn named(path: &Path) -> Result<(), TlsError> {
    if path.as_os_str().is_empty() {
        return Err(TlsError::setting(
            "a certificate or key file is not set: give both cert and key (--tls-cert, --tls-key)",
        ));
    }
    Ok(())
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|err| TlsError::file(path, format!("not a usable CA certificate: {err}")))?;
    }
    Ok(roots)
}

/// A listener's TLS config: HTTP/2 and HTTP/1.1 by ALPN; with a client CA, client
/// certificates are asked for and verified, but not required.
///
/// # Errors
///
/// A file cannot be read, or the key does not fit the certificate.
pub fn server_config(files: &ServerTlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::setting)?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(load_roots(ca)?), provider)
                    .allow_unauthenticated()
                    .build()
                    .map_err(|err| TlsError::file(ca, err))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(|err| TlsError::file(&files.key, err))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client's TLS config, offering the ALPN protocols `alpn`.
///
/// # Errors
///
/// A file cannot be read, or the key does not fit the certificate.
pub fn client_config(
    files: &ClientTlsFiles,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::setting)?
        .with_root_certificates(load_roots(&files.ca)?);
    let mut config = match &files.identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|err| TlsError::file(key, err))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The principal a certificate names: its subject's common name, else its first
/// URI, else its first DNS name.
pub fn principal_of(cert: &CertificateDer<'_>) -> Option<String> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    common_name(parsed.subject())
        .or_else(|| parsed.valid_uri_names().next().map(str::to_owned))
        .or_else(|| parsed.valid_dns_names().next().map(str::to_owned))
        .filter(|name| !name.is_empty() && !name.chars().any(char::is_control))
}

/// The common name (OID 2.5.4.3) of a DER subject (the contents of its
/// `SEQUENCE`: `SET { SEQUENCE { OID, string } }`...).
fn common_name(mut subject: &[u8]) -> Option<String> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    while !subject.is_empty() {
        let (set, rest) = tlv(subject, 0x31)?;
        subject = rest;
        let mut attributes = set;
        while !attributes.is_empty() {
            let (attribute, rest) = tlv(attributes, 0x30)?;
            attributes = rest;
            let (oid, value) = tlv(attribute, 0x06)?;
            if oid != CN {
                continue;
            }
            // UTF8String, PrintableString, IA5String.
            let tag = *value.first()?;
            if !matches!(tag, 0x0c | 0x13 | 0x16) {
                return None;
            }
            let (text, _) = tlv(value, tag)?;
            return std::str::from_utf8(text).ok().map(str::to_owned);
        }
    }
    None
}

/// One DER tag-length-value with tag `tag`: its value and what follows it.
fn tlv(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&found, rest) = input.split_first()?;
    if found != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        len @ 0..=0x7f => (usize::from(len), rest),
        0x81 => (usize::from(*rest.first()?), rest.get(1..)?),
        0x82 => (
            usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?])),
            rest.get(2..)?,
        ),
        _ => return None,
    };
    Some((rest.get(..len)?, rest.get(len..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(common_name: Option<&str>, dns: &[&str]) -> CertificateDer<'static> {
        let mut params =
            rcgen::CertificateParams::new(dns.iter().map(|d| (*d).to_owned()).collect::<Vec<_>>())
                .expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(name) = common_name {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
        }
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "keel");
        let key = rcgen::KeyPair::generate().expect("a key");
        params.self_signed(&key).expect("a cert").der().clone()
    }

    #[test]
    fn the_principal_should_be_the_common_name_else_the_first_dns_name() {
        assert_eq!(
            principal_of(&cert(Some("grading"), &["grading.internal"])).as_deref(),
            Some("grading")
        );
        assert_eq!(
            principal_of(&cert(None, &["keel-2", "localhost"])).as_deref(),
            Some("keel-2")
        );
        assert_eq!(principal_of(&CertificateDer::from(vec![1, 2, 3])), None);
    }

    #[test]
    fn missing_or_wrong_files_should_name_the_file() {
        let dir = tempfile::tempdir().expect("a dir");
        let missing = dir.path().join("missing.pem");
        let err = load_certs(&missing).expect_err("missing");
        assert!(err.to_string().contains("missing.pem"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not PEM").expect("written");
        let err = load_certs(&empty).expect_err("empty");
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
        let unset = load_key(Path::new("")).expect_err("unset");
        assert!(unset.to_string().contains("--tls-key"), "{unset}");
    }
}
