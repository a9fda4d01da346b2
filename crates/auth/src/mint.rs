//! A development certificate authority: a CA, node certificates (each naming its
//! node, `localhost` and 127.0.0.1, good for serving and for mutual TLS between
//! nodes) and client certificates (naming a principal), as PEM. For a cluster on a
//! laptop or a test; a real deployment brings its own PKI.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
#[error("making a certificate: {0}")]
pub struct MintError(#[from] rcgen::Error);

/// A certificate and its private key, as PEM.
#[derive(Debug, Clone)]
pub struct Minted {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A node: serves TLS and is a client of the other nodes (mutual TLS).
    Node,
    /// A client only.
    Client,
}

/// A leaf certificate to make.
#[derive(Debug, Clone)]
pub struct Leaf<'a> {
    /// The subject's common name: the principal it names.
    pub name: &'a str,
    /// DNS names beyond `name` (a node's name is one too).
    pub dns: Vec<String>,
    /// IP addresses it is valid for.
    pub ips: Vec<IpAddr>,
    /// Serving, or only a client.
    pub role: Role,
    /// Valid from, and until.
    pub valid: (OffsetDateTime, OffsetDateTime),
}

impl<'a> Leaf<'a> {
    /// A node certificate for `name`: also `localhost` and 127.0.0.1, valid for
    /// `days` from an hour ago (clocks differ a little).
    pub fn node(name: &'a str, days: i64) -> Self {
        Self {
            name,
            dns: vec![name.to_owned(), "localhost".to_owned()],
            ips: vec![IpAddr::from([127, 0, 0, 1])],
            role: Role::Node,
            valid: valid_for(days),
        }
    }

    /// A client certificate naming principal `name`, valid for `days`.
    pub fn client(name: &'a str, days: i64) -> Self {
        Self {
            name,
            dns: Vec::new(),
            ips: Vec::new(),
            role: Role::Client,
            valid: valid_for(days),
        }
    }
}

impl Leaf<'_> {
    /// The same certificate, expired: valid from three days ago until yesterday
    /// (for tests of what refuses it).
    #[must_use]
    pub fn expired(mut self) -> Self {
        let now = OffsetDateTime::now_utc();
        self.valid = (now - Duration::days(3), now - Duration::days(1));
        self
    }
}

fn valid_for(days: i64) -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    (now - Duration::hours(1), now + Duration::days(days))
}

/// A certificate authority that signs leaves.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    key_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// A new CA named `name`, valid for `days`.
    ///
    /// # Errors
    ///
    /// Key generation or signing failed.
    pub fn new(name: &str, days: i64) -> Result<Self, MintError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        (params.not_before, params.not_after) = valid_for(days);
        let key = KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        Ok(Self {
            issuer: CertifiedIssuer::self_signed(params, key)?,
            key_pem,
        })
    }

    /// The CA's certificate.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA's private key: keep it to sign more later, or throw it away.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Signs `leaf`.
    ///
    /// # Errors
    ///
    /// Key generation or signing failed.
    pub fn sign(&self, leaf: &Leaf<'_>) -> Result<Minted, MintError> {
        let mut params = CertificateParams::new(leaf.dns.clone())?;
        params
            .subject_alt_names
            .extend(leaf.ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, leaf.name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = match leaf.role {
            Role::Node => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Role::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        (params.not_before, params.not_after) = leaf.valid;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Minted {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minted_node_certificate_should_chain_to_its_ca_and_name_its_node() {
        let ca = Ca::new("keel dev CA", 30).expect("a CA");
        let node = ca.sign(&Leaf::node("keel-1", 30)).expect("a node");
        let dir = tempfile::tempdir().expect("a dir");
        let (ca_file, cert_file, key_file) = (
            dir.path().join("ca.pem"),
            dir.path().join("keel-1.pem"),
            dir.path().join("keel-1.key"),
        );
        std::fs::write(&ca_file, ca.cert_pem()).expect("written");
        std::fs::write(&cert_file, &node.cert_pem).expect("written");
        std::fs::write(&key_file, &node.key_pem).expect("written");
        let certs = keel_serve::tls::load_certs(&cert_file).expect("a cert");
        assert_eq!(
            keel_serve::tls::principal_of(&certs[0]).as_deref(),
            Some("keel-1")
        );
        keel_serve::tls::server_config(&keel_serve::tls::ServerTlsFiles {
            cert: cert_file,
            key: key_file,
            client_ca: Some(ca_file),
        })
        .expect("a usable server config");
    }
}
