//! `keel up --secure`: the same parts with TLS on every keel listener (the
//! registry, the log service, the gateway's front port), mutual TLS between
//! cluster nodes, and an ACL with a principal for each part.
//!
//! `--data-dir/secure/` holds a development CA, one certificate for every node
//! (`keel`, also valid for `localhost` and 127.0.0.1) and a client certificate for
//! the user (principal `client`, allowed everything); they are made on the first
//! run and kept, so a `curl --cacert` stays valid from run to run. The ACL is
//! written anew at each start with new tokens for the parts, which get them in
//! their environment, never on a command line. The demo services serve TLS too,
//! with the node certificate: the registry checks them and the gateway reaches
//! them over TLS.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use keel_auth::mint::{Ca, Leaf};
use keel_demo::Demo;
use keel_serve::tls::ClientTlsFiles;

use super::Kind;

/// How long the development certificates are valid.
const DAYS: i64 = 365;

/// The certificate every node presents, and its principal.
const NODE: &str = "keel";

/// The secure setup of one run: where its files are, and the parts' tokens.
#[derive(Debug, Clone)]
pub(super) struct Secure {
    dir: PathBuf,
    /// A token by principal, for the parts that call others.
    tokens: BTreeMap<&'static str, String>,
}

impl Secure {
    /// Makes the CA and certificates in `dir` unless they are there, and writes
    /// the ACL with new tokens.
    ///
    /// # Errors
    ///
    /// A file cannot be written or read, or no random token can be made.
    pub(super) fn prepare(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        if !dir.join("ca.pem").exists() {
            mint(dir)?;
        }
        let mut tokens = BTreeMap::new();
        for principal in ["log", "gateway"]
            .into_iter()
            .chain(Demo::ALL.map(Demo::name))
        {
            let token = keel_auth::token::generate()
                .map_err(|_| anyhow::anyhow!("no random source for a token"))?;
            tokens.insert(principal, token);
        }
        let secure = Self {
            dir: dir.to_owned(),
            tokens,
        };
        let acl = secure.file("acl.toml");
        crate::cli::write_file(std::path::Path::new(&acl), secure.acl().as_bytes(), true)
            .with_context(|| format!("writing {acl}"))?;
        Ok(secure)
    }

    /// The path of `name` in the directory, as an argument.
    pub(super) fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// What the user (and `keel up` itself) calls with: the CA, and the client
    /// certificate.
    pub(super) fn client_tls(&self) -> ClientTlsFiles {
        ClientTlsFiles {
            ca: self.dir.join("ca.pem"),
            identity: Some((self.dir.join("client.pem"), self.dir.join("client.key"))),
        }
    }

    /// The flags and environment `kind` runs with.
    pub(super) fn part(&self, kind: Kind) -> (Vec<String>, Vec<(String, String)>) {
        let flag = |name: &str, file: &str| [name.to_owned(), self.file(file)];
        let serve_tls = [
            flag("--tls-cert", &format!("{NODE}.pem")),
            flag("--tls-key", &format!("{NODE}.key")),
        ];
        // The registry and the log service verify client certificates, which name
        // principals; the gateway's front and the demos ask for none (a browser
        // calls the gateway).
        let verify_clients = flag("--tls-client-ca", "ca.pem");
        let acl = flag("--acl", "acl.toml");
        let token = |principal: &str, var: &str| {
            self.tokens
                .get(principal)
                .map(|token| (var.to_owned(), token.clone()))
        };
        let (flags, env) = match kind {
            Kind::Registry => (
                vec![verify_clients, acl, flag("--instances-ca", "ca.pem")],
                vec![],
            ),
            Kind::Log => (
                vec![verify_clients, acl, flag("--registry-ca", "ca.pem")],
                vec![token("log", "KEEL_LOG_REGISTRY_TOKEN")],
            ),
            Kind::Gateway => (
                vec![flag("--ca", "ca.pem")],
                vec![
                    token("gateway", "KEEL_TOKEN"),
                    token("gateway", "KEEL_GATEWAY_LOG_SERVICE_TOKEN"),
                ],
            ),
            Kind::Demo(demo) => (
                vec![flag("--ca", "ca.pem")],
                vec![token(demo.name(), "KEEL_TOKEN")],
            ),
        };
        (
            serve_tls.into_iter().chain(flags).flatten().collect(),
            env.into_iter().flatten().collect(),
        )
    }

    /// The ACL: the user may do everything; each part what it needs.
    fn acl(&self) -> String {
        let mut acl = String::from(
            "# Written by `keel up --secure` at each start, with new tokens for its parts.\n\n",
        );
        for (principal, token) in &self.tokens {
            acl.push_str(&keel_auth::token::acl_entry(principal, token));
            acl.push('\n');
        }
        let demos = Demo::ALL
            .map(|demo| format!("\"{}\"", demo.name()))
            .join(", ");
        let _ = write!(
            acl,
            r#"# The user: the client certificate of this directory (principal "client").
[[allow]]
principals = ["client"]
topics = ["*"]
actions = ["produce", "consume", "admin"]

[[allow]]
principals = ["client"]
services = ["*"]
actions = ["register", "deregister", "read", "admin"]

# Raft between the nodes (mutual TLS, certificate "{NODE}"), and `keel cluster`.
[[allow]]
principals = ["{NODE}", "client"]
cluster = true
actions = ["admin"]

# Every part reads the registry's table; each service registers itself only.
[[allow]]
principals = ["*"]
services = ["*"]
actions = ["read"]
"#
        );
        for name in ["log"].into_iter().chain(Demo::ALL.map(Demo::name)) {
            let _ = write!(
                acl,
                "\n[[allow]]\nprincipals = [\"{name}\"]\nservices = [\"{name}\"]\nactions = [\"register\", \"deregister\"]\n"
            );
        }
        let _ = write!(
            acl,
            r#"
# The demos keep their records and log lines in the log service.
[[allow]]
principals = [{demos}]
topics = ["*"]
actions = ["produce", "consume"]

# The gateway ships its access log.
[[allow]]
principals = ["gateway"]
topics = ["access"]
actions = ["produce"]
"#
        );
        acl
    }
}

/// The CA, the node certificate and the client certificate, in `dir`.
fn mint(dir: &Path) -> anyhow::Result<()> {
    let ca = Ca::new("keel up development CA", DAYS)?;
    let node = ca.sign(&Leaf::node(NODE, DAYS))?;
    let client = ca.sign(&Leaf::client("client", DAYS))?;
    let files = [
        ("ca.key", ca.key_pem().to_owned(), true),
        (&format!("{NODE}.pem") as &str, node.cert_pem, false),
        (&format!("{NODE}.key"), node.key_pem, true),
        ("client.pem", client.cert_pem, false),
        ("client.key", client.key_pem, true),
        // Last: its presence says the others are there.
        ("ca.pem", ca.cert_pem(), false),
    ];
    for (name, text, secret) in files {
        let path = dir.join(name);
        crate::cli::write_file(&path, text.as_bytes(), secret)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_acl_should_parse_and_give_each_part_what_it_needs_only() {
        use keel_auth::{Action, Resource};
        let dir = tempfile::tempdir().unwrap();
        let secure = Secure::prepare(dir.path()).unwrap();
        let acl = std::fs::read_to_string(dir.path().join("acl.toml")).unwrap();
        let auth = keel_auth::Authorizer::from_file(&dir.path().join("acl.toml")).unwrap();
        let as_token = |principal: &str| {
            let mut headers = axum::http::HeaderMap::new();
            let value = format!("Bearer {}", secure.tokens[principal]);
            headers.insert("authorization", value.parse().unwrap());
            headers
        };
        let allowed = |principal: &str, action, resource| {
            auth.check(&as_token(principal), None, action, resource)
                .is_ok()
        };
        assert!(
            allowed("visit", Action::Register, Resource::Service("visit")),
            "{acl}"
        );
        assert!(!allowed(
            "visit",
            Action::Register,
            Resource::Service("log")
        ));
        assert!(allowed("log", Action::Register, Resource::Service("log")));
        assert!(allowed("gateway", Action::Read, Resource::Service("*")));
        assert!(allowed(
            "gateway",
            Action::Produce,
            Resource::Topic("access")
        ));
        assert!(!allowed(
            "gateway",
            Action::Consume,
            Resource::Topic("logs")
        ));
        assert!(!allowed("portal", Action::Admin, Resource::Cluster));
        // The certificates are kept from run to run; the tokens are not.
        let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
        let again = Secure::prepare(dir.path()).unwrap();
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca);
        assert_ne!(again.tokens["visit"], secure.tokens["visit"]);
    }
}
