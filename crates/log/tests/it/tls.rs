//! The log service over TLS: trusted clients served, with their certificate as
//! their principal; plaintext, an unknown CA, a wrong name and an expired
//! certificate refused, with nothing written.

use std::path::{Path, PathBuf};
use std::time::Duration;

use keel_auth::mint::{Ca, Leaf};
use keel_log::{Client, ClientError, Credentials};
use keel_serve::tls::{ClientTlsFiles, ServerTlsFiles};
use tonic::Code;

use crate::support::{TestServer, config};

/// Writes `minted` as `<name>.pem` and `<name>.key` in `dir`.
fn write(dir: &Path, name: &str, minted: &keel_auth::mint::Minted) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, &minted.cert_pem).unwrap();
    std::fs::write(&key, &minted.key_pem).unwrap();
    (cert, key)
}

struct Pki {
    dir: tempfile::TempDir,
    ca: PathBuf,
    ca_authority: Ca,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca_authority = Ca::new("keel test CA", 1).unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, ca_authority.cert_pem()).unwrap();
        Self {
            dir,
            ca,
            ca_authority,
        }
    }

    fn leaf(&self, file: &str, leaf: &Leaf<'_>) -> (PathBuf, PathBuf) {
        write(
            self.dir.path(),
            file,
            &self.ca_authority.sign(leaf).unwrap(),
        )
    }

    /// A TLS log service with this CA for clients, and an ACL letting `alice`
    /// produce to and consume `logs`.
    async fn server(&self, (cert, key): (PathBuf, PathBuf)) -> TestServer {
        let acl = self.dir.path().join("acl.toml");
        std::fs::write(
            &acl,
            "[[allow]]\nprincipals = [\"alice\"]\ntopics = [\"logs\"]\nactions = [\"produce\", \"consume\"]\n",
        )
        .unwrap();
        let mut config = config(
            &self
                .dir
                .path()
                .join(format!("data-{}", cert.display().to_string().len())),
        );
        config.tls = Some(ServerTlsFiles {
            cert,
            key,
            client_ca: Some(self.ca.clone()),
        });
        config.acl = Some(acl);
        TestServer::start_with(config).await
    }

    fn credentials(&self, ca: &Path, identity: Option<(PathBuf, PathBuf)>) -> Credentials {
        let files = ClientTlsFiles {
            ca: ca.to_owned(),
            identity,
        };
        Credentials::default().with_tls(keel_serve::tls::client_config(&files, &[b"h2"]).unwrap())
    }
}

fn at(server: &TestServer, host: &str) -> String {
    format!("https://{host}:{}", server.addr.port())
}

#[tokio::test]
async fn a_tls_listener_should_serve_trusted_clients_and_refuse_the_rest() {
    let pki = Pki::new();
    let server = pki
        .server(pki.leaf("keel-1", &Leaf::node("keel-1", 1)))
        .await;
    let alice = pki.leaf("alice", &Leaf::client("alice", 1));

    // A client certificate names its principal: no token needed.
    let mut trusted = Client::connect_with(
        &at(&server, "localhost"),
        pki.credentials(&pki.ca, Some(alice.clone())),
    )
    .await
    .expect("a TLS connection");
    assert_eq!(trusted.produce("logs", "over TLS").await.unwrap(), 0);
    assert_eq!(
        &trusted.consume("logs", 0).await.unwrap().value[..],
        b"over TLS"
    );
    // The same by IP address (a SAN of the node certificate).
    let mut by_ip = Client::connect_with(
        &at(&server, "127.0.0.1"),
        pki.credentials(&pki.ca, Some(alice)),
    )
    .await
    .expect("a TLS connection by IP");
    by_ip.consume("logs", 0).await.unwrap();

    // TLS without a certificate or a token: anonymous, refused by the ACL.
    let mut anonymous =
        Client::connect_with(&at(&server, "localhost"), pki.credentials(&pki.ca, None))
            .await
            .expect("a TLS connection");
    match anonymous.produce("logs", "no").await {
        Err(ClientError::Status(status)) => assert_eq!(status.code(), Code::Unauthenticated),
        other => panic!("{other:?}"),
    }

    // Plaintext to the TLS port: no HTTP/2 connection, or no call through it.
    if let Ok(plain) = Client::connect(&server.addr.to_string()).await {
        let mut plain = plain.retry_for(Duration::ZERO);
        assert!(
            plain.produce("logs", "plain").await.is_err(),
            "a plaintext call succeeded"
        );
    }

    // A server the client's CA did not sign; a client certificate of another CA.
    let rogue = Pki::new();
    let untrusted =
        Client::connect_with(&at(&server, "localhost"), pki.credentials(&rogue.ca, None)).await;
    assert!(
        untrusted.is_err(),
        "a server certificate of an unknown CA was accepted"
    );
    let stranger = rogue.leaf("alice", &Leaf::client("alice", 1));
    let forged = Client::connect_with(
        &at(&server, "localhost"),
        pki.credentials(&pki.ca, Some(stranger)),
    )
    .await;
    if let Ok(forged) = forged {
        // TLS 1.3 reports a refused client certificate at the first read.
        let mut forged = forged.retry_for(Duration::ZERO);
        assert!(
            forged.produce("logs", "forged").await.is_err(),
            "a client certificate of an unknown CA was accepted"
        );
    }

    // Nothing refused was written.
    let next = trusted.consume("logs", 1).await;
    assert!(
        matches!(next, Err(ClientError::Status(ref s)) if s.code() == Code::OutOfRange),
        "{next:?}"
    );
}

#[tokio::test]
async fn a_wrong_name_or_an_expired_certificate_should_be_refused() {
    let pki = Pki::new();
    // A node certificate for another name only.
    let mut elsewhere = Leaf::node("keel-9", 1);
    elsewhere.dns = vec!["keel-9.example".into()];
    elsewhere.ips = Vec::new();
    let wrong_name = pki.server(pki.leaf("keel-9", &elsewhere)).await;
    let refused = Client::connect_with(
        &at(&wrong_name, "localhost"),
        pki.credentials(&pki.ca, None),
    )
    .await;
    assert!(
        refused.is_err(),
        "a certificate for another name was accepted"
    );

    // A node certificate that expired yesterday.
    let expired = Leaf::node("keel-1", 1).expired();
    let stale = pki.server(pki.leaf("stale", &expired)).await;
    let refused =
        Client::connect_with(&at(&stale, "localhost"), pki.credentials(&pki.ca, None)).await;
    assert!(
        refused.is_err(),
        "an expired server certificate was accepted"
    );

    // An expired client certificate, at a good server.
    let server = pki
        .server(pki.leaf("keel-1", &Leaf::node("keel-1", 1)))
        .await;
    let old = pki.leaf("old-alice", &Leaf::client("alice", 1).expired());
    if let Ok(client) = Client::connect_with(
        &at(&server, "localhost"),
        pki.credentials(&pki.ca, Some(old)),
    )
    .await
    {
        let mut client = client.retry_for(Duration::ZERO);
        assert!(
            client.produce("logs", "expired").await.is_err(),
            "an expired client certificate was accepted"
        );
    }
}

/// The HTTP API over TLS with curl, as a user would call it.
#[tokio::test]
async fn curl_should_reach_the_http_api_over_tls_with_its_cacert() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: no curl on this machine");
        return;
    }
    let pki = Pki::new();
    let server = pki
        .server(pki.leaf("keel-1", &Leaf::node("keel-1", 1)))
        .await;
    let (cert, key) = pki.leaf("alice", &Leaf::client("alice", 1));
    let url = format!("{}/v1/topics/logs/records", at(&server, "localhost"));
    let curl = |extra: &[&str]| {
        let (url, ca) = (url.clone(), pki.ca.clone());
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("curl")
                .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
                .arg(ca)
                .args(extra)
                .arg(url)
                .output()
                .unwrap()
        })
    };
    let cert = cert.to_str().unwrap().to_owned();
    let key = key.to_str().unwrap().to_owned();
    let out = curl(&["--cert", &cert, "--key", &key, "--data-binary", "from curl"])
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    let out = curl(&["--data-binary", "anonymous"]).await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "401",
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Python client the original tutorials use (`grpcio`), through
/// `grpc.secure_channel` with the CA and a client certificate: it produces and
/// consumes over TLS, its certificate naming its principal.
const PYTHON_CLIENT: &str = r#"
import sys
import grpc

ca, cert, key, addr = sys.argv[1:5]
credentials = grpc.ssl_channel_credentials(
    root_certificates=open(ca, "rb").read(),
    private_key=open(key, "rb").read(),
    certificate_chain=open(cert, "rb").read(),
)
channel = grpc.secure_channel(addr, credentials)
raw = dict(request_serializer=lambda b: b, response_deserializer=lambda b: b)
produce = channel.unary_unary("/log.v1.Log/Produce", **raw)
consume = channel.unary_unary("/log.v1.Log/Consume", **raw)

def field(number, payload):
    return bytes([number << 3 | 2, len(payload)]) + payload

value = b"from python"
produce(field(1, field(1, value)) + field(2, b"logs"), timeout=10)
answer = consume(bytes([1 << 3, 0]) + field(2, b"logs"), timeout=10)
assert value in answer, answer
print("ok")
"#;

#[tokio::test]
async fn a_python_grpc_client_should_produce_and_consume_over_tls() {
    if !crate::support::python_has("grpc", "grpcio") {
        return;
    }
    let pki = Pki::new();
    let server = pki
        .server(pki.leaf("keel-1", &Leaf::node("keel-1", 1)))
        .await;
    let (cert, key) = pki.leaf("alice", &Leaf::client("alice", 1));
    let addr = format!("localhost:{}", server.addr.port());
    let args = [&pki.ca, &cert, &key]
        .iter()
        .map(|path| path.display().to_string())
        .chain([addr])
        .collect();
    let printed = crate::support::run_python(PYTHON_CLIENT, args).await;
    assert_eq!(printed, "ok");
}
