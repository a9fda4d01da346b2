//! keel's outbound HTTP clients (reqwest). Every one is built here, so that every one
//! can speak TLS: reqwest runs on rustls without a crypto provider of its own, and
//! [`builder`] installs `ring` as the process's default the first time (a program
//! that installed another first keeps its own). Clippy refuses `reqwest::Client::new`
//! and `reqwest::Client::builder` elsewhere in the workspace (`clippy.toml`): a client
//! built without the provider would panic on its first use of TLS.
//!
//! An `https` URL is verified against the platform's roots, or with [`with_tls`]
//! against a given CA, presenting a client certificate when one is given. On a
//! system without roots (an empty container image) a client still builds: an
//! `https` URL without a CA of its own is then refused at the handshake.

use std::sync::{Arc, Once, OnceLock};

use rustls::ClientConfig;

use crate::tls::{ClientTlsFiles, TlsError};

/// The ALPN protocols keel's HTTP clients offer: HTTP/2, then HTTP/1.1.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// A client builder with reqwest's defaults, able to speak TLS.
#[allow(clippy::disallowed_methods)] // the one place a reqwest client starts
pub fn builder() -> reqwest::ClientBuilder {
    static PROVIDER: Once = Once::new();
    static PLATFORM: OnceLock<Option<Arc<ClientConfig>>> = OnceLock::new();
    PROVIDER.call_once(|| {
        // Err: the program installed a provider of its own first, which stays.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    let builder = reqwest::Client::builder();
    match PLATFORM.get_or_init(|| platform_config(&ALPN).ok()) {
        Some(platform) => builder.tls_backend_preconfigured(ClientConfig::clone(platform)),
        None => builder,
    }
}

/// A TLS config that verifies servers against the platform's roots, offering the
/// ALPN protocols `alpn`. Where the platform has no roots (an empty container
/// image), it trusts nobody: a client still builds, and an `https` URL is refused
/// at its handshake, naming the unknown issuer.
///
/// # Errors
///
/// The crypto provider cannot make a config (it can, with `ring`).
pub fn platform_config(alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, TlsError> {
    use rustls_platform_verifier::BuilderVerifierExt as _;
    let builder = || {
        ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::setting)
    };
    let mut config = match builder()?.with_platform_verifier() {
        Ok(builder) => builder.with_no_client_auth(),
        Err(err) => {
            tracing::debug!(%err, "no platform roots: https needs a CA of its own");
            builder()?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A client with reqwest's defaults, like `reqwest::Client::new`.
///
/// # Panics
///
/// Like `reqwest::Client::new`, when the TLS backend cannot be set up; with the
/// provider [`builder`] installs, it can.
pub fn new() -> reqwest::Client {
    match builder().build() {
        Ok(client) => client,
        Err(err) => panic!("an HTTP client with default settings: {err}"),
    }
}

/// `builder` trusting only the CA of `files` for `https` URLs, and presenting the
/// client certificate of `files` when it has one. `None` leaves `builder` as it is.
///
/// # Errors
///
/// A file cannot be read, or the key does not fit the certificate.
pub fn with_tls(
    builder: reqwest::ClientBuilder,
    files: Option<&ClientTlsFiles>,
) -> Result<reqwest::ClientBuilder, TlsError> {
    let Some(files) = files else {
        return Ok(builder);
    };
    let config = crate::tls::client_config(files, &ALPN)?;
    Ok(builder.tls_backend_preconfigured(rustls::ClientConfig::clone(&config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_default_client_should_build_and_one_with_a_missing_ca_should_say_which_file() {
        let _ = new();
        let files = ClientTlsFiles {
            ca: "/nonexistent/ca.pem".into(),
            identity: None,
        };
        let err = with_tls(builder(), Some(&files)).err().unwrap();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }
}
