//! The command line: produce, consume, config errors, signals.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{KEEL, Served};

fn keel(args: &[&str]) -> std::process::Output {
    Command::new(KEEL)
        .args(args)
        .env("KEEL_LOG_LEVEL", "warn")
        .output()
        .expect("run keel")
}

#[test]
fn produce_and_consume_should_round_trip_values_and_stdin_lines() {
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(dir.path(), &[]);
    let out = keel(&["produce", "--addr", &served.addr, "-t", "cli", "one", "two"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "0\n1\n");

    let mut child = Command::new(KEEL)
        .args([
            "produce",
            "--addr",
            &served.addr,
            "-t",
            "cli",
            "--batch",
            "2",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"three\nfour\nfive\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("produced 3 records, offsets 2..5"));

    let out = keel(&["consume", "--addr", &served.addr, "-t", "cli"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "one\ntwo\nthree\nfour\nfive\n"
    );
    let out = keel(&[
        "consume",
        "--addr",
        &served.addr,
        "-t",
        "cli",
        "--from",
        "3",
        "--max",
        "1",
        "--format",
        "json",
    ]);
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["offset"], 3);
    assert_eq!(line["value"], "Zm91cg==");
}

#[test]
fn consume_follow_should_print_new_records_until_max() {
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(dir.path(), &[]);
    assert!(
        keel(&["produce", "--addr", &served.addr, "-t", "f", "a"])
            .status
            .success()
    );
    let follower = Command::new(KEEL)
        .args([
            "consume",
            "--addr",
            &served.addr,
            "-t",
            "f",
            "--follow",
            "--max",
            "3",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The follower prints "a", then waits for records that do not exist yet.
    let out = keel(&["produce", "--addr", &served.addr, "-t", "f", "b", "c"]);
    assert!(out.status.success());
    let out = follower.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "a\nb\nc\n");
}

#[test]
fn invalid_configuration_should_exit_64_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let out = keel(&[
        "log",
        "serve",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--segment-bytes",
        "10",
    ]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("segment_bytes"));

    let file = dir.path().join("keel.toml");
    std::fs::write(&file, "[log]\nqueue_dept = 5\n").unwrap();
    let out = keel(&["log", "serve", "--config", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("queue_dept"));
}

#[test]
fn config_file_and_env_should_layer_under_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keel.toml");
    std::fs::write(
        &file,
        "[log]\ndefault_topic = \"from-file\"\nauto_create_topics = false\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let served = Served::start(&data, &["--config", file.to_str().unwrap()]);
    // The file's default topic exists; auto-create is off, so other topics are 404s.
    let out = keel(&["produce", "--addr", &served.addr, "x"]);
    assert!(out.status.success());
    assert!(data.join("topics/from-file").is_dir());
    let out = keel(&["produce", "--addr", &served.addr, "-t", "other", "x"]);
    assert_eq!(out.status.code(), Some(70));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

#[test]
fn sigterm_and_sigint_should_stop_the_service_cleanly_with_exit_0() {
    for signal in ["TERM", "INT"] {
        let dir = tempfile::tempdir().unwrap();
        let mut served = Served::start(dir.path(), &[]);
        let out = keel(&["produce", "--addr", &served.addr, "kept"]);
        assert!(out.status.success());
        served.signal(signal);
        let status = served.wait(Duration::from_secs(15));
        assert_eq!(status.code(), Some(0), "SIG{signal}");
        // The clean close left nothing to recover.
        let served = Served::start(dir.path(), &[]);
        let out = keel(&["consume", "--addr", &served.addr]);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "kept\n");
    }
}

#[test]
fn help_should_explain_every_command() {
    for args in [
        &["--help"][..],
        &["log", "serve", "--help"],
        &["produce", "--help"],
        &["consume", "--help"],
    ] {
        let out = keel(args);
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage:"));
    }
}

#[test]
fn environment_should_configure_and_flags_should_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let out = Command::new(KEEL)
        .args(["log", "serve", "--data-dir", data])
        .env("KEEL_LOG_SEGMENT_BYTES", "10")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "the environment is read");
    assert!(String::from_utf8_lossy(&out.stderr).contains("segment_bytes"));

    // The flag wins over the bad environment value: the service starts and works.
    let served = Served::start_with_env(
        dir.path(),
        &["--segment-bytes", "1MiB"],
        &[("KEEL_LOG_SEGMENT_BYTES", "10")],
    );
    assert!(
        keel(&["produce", "--addr", &served.addr, "ok"])
            .status
            .success()
    );
}

#[test]
fn registry_serve_should_validate_its_flags_and_stop_cleanly() {
    let out = keel(&["registry", "serve", "--check-failures", "0"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("check_failures"));

    let mut served = Served::spawn(
        &[
            "registry",
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--check-interval",
            "1s",
        ],
        &[],
    );
    let mut stream = std::net::TcpStream::connect(&served.addr).unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: keel\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains("\"ok\""),
        "{answer}"
    );
    served.signal("TERM");
    assert_eq!(served.wait(Duration::from_secs(15)).code(), Some(0));
}

#[test]
fn gateway_serve_should_validate_its_flags_and_stop_cleanly() {
    let out = keel(&["gateway", "serve", "--request-timeout", "0s"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("request_timeout"));
    let mut served = Served::spawn(
        &[
            "gateway",
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--registry",
            "http://127.0.0.1:9",
        ],
        &[],
    );
    served.signal("INT");
    assert_eq!(served.wait(Duration::from_secs(15)).code(), Some(0));
}

/// `keel token create --acl` adds a token the running service picks up; the
/// client commands call with `--token`, and without one they are refused, naming
/// why.
#[test]
fn a_created_token_should_let_its_principal_produce_and_no_one_else() {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl.toml");
    std::fs::write(
        &acl,
        "[[allow]]\nprincipals = [\"writer\"]\ntopics = [\"cli\"]\nactions = [\"produce\", \"consume\"]\n",
    )
    .unwrap();
    let served = Served::start(dir.path(), &["--acl", acl.to_str().unwrap()]);
    let refused = keel(&["produce", "--addr", &served.addr, "-t", "cli", "one"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.to_lowercase().contains("credentials"), "{stderr}");

    let created = keel(&["token", "create", "writer", "--acl", acl.to_str().unwrap()]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let token = String::from_utf8(created.stdout).unwrap().trim().to_owned();
    assert!(token.starts_with("keel_"), "{token}");
    assert!(
        !std::fs::read_to_string(&acl).unwrap().contains(&token),
        "the token itself is never stored"
    );
    // The service picks the new entry up within a second or so.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = keel(&[
            "produce",
            "--addr",
            &served.addr,
            "-t",
            "cli",
            "--token",
            &token,
            "one",
        ]);
        if out.status.success() {
            assert_eq!(String::from_utf8_lossy(&out.stdout), "0\n");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = keel(&[
        "consume",
        "--addr",
        &served.addr,
        "-t",
        "cli",
        "--token",
        &token,
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "one\n");
    let wrong = keel(&[
        "consume",
        "--addr",
        &served.addr,
        "-t",
        "cli",
        "--token",
        "keel_guessed",
    ]);
    assert!(!wrong.status.success());
}

/// `keel certs dev --node keel-1` into `dir/certs`.
fn dev_certs(dir: &std::path::Path) -> std::path::PathBuf {
    let certs = dir.join("certs");
    let made = keel(&[
        "certs",
        "dev",
        "--out",
        certs.to_str().unwrap(),
        "--node",
        "keel-1",
    ]);
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    certs
}

/// The keys `keel certs dev` writes are their owner's alone, and it never replaces
/// files silently.
#[test]
fn dev_certificates_should_keep_keys_private_and_never_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dev_certs(dir.path());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(certs.join("client.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "a key readable by others: {mode:o}");
    }
    let again = keel(&[
        "certs",
        "dev",
        "--out",
        certs.to_str().unwrap(),
        "--node",
        "keel-1",
    ]);
    assert!(
        !again.status.success(),
        "existing files were overwritten without --force"
    );
}

/// `keel certs dev` makes what `keel log serve --tls-*` and `keel produce --ca
/// --cert --key` need: the client certificate names its principal for the ACL, and a
/// client without the CA cannot connect.
#[test]
fn dev_certificates_should_let_a_cli_client_reach_a_tls_service() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dev_certs(dir.path());
    let file = |name: &str| certs.join(name).to_str().unwrap().to_owned();
    let acl = dir.path().join("acl.toml");
    std::fs::write(
        &acl,
        "[[allow]]\nprincipals = [\"client\"]\ntopics = [\"*\"]\nactions = [\"produce\", \"consume\"]\n",
    )
    .unwrap();
    let (cert, key, ca) = (file("keel-1.pem"), file("keel-1.key"), file("ca.pem"));
    let served = Served::start(
        dir.path(),
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca,
            "--acl",
            acl.to_str().unwrap(),
        ],
    );
    let port = served.addr.rsplit(':').next().unwrap().to_owned();
    let addr = format!("localhost:{port}");
    let (client_cert, client_key) = (file("client.pem"), file("client.key"));
    let out = keel(&[
        "produce",
        "--addr",
        &addr,
        "-t",
        "secure",
        "--ca",
        &ca,
        "--cert",
        &client_cert,
        "--key",
        &client_key,
        "one",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "0\n");
    let out = keel(&[
        "consume",
        "--addr",
        &addr,
        "-t",
        "secure",
        "--ca",
        &ca,
        "--cert",
        &client_cert,
        "--key",
        &client_key,
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "one\n");
    // Without the CA: plaintext to a TLS port, refused.
    let out = keel(&["produce", "--addr", &addr, "-t", "secure", "two"]);
    assert!(!out.status.success());
    // TLS without a certificate or token: anonymous, refused by the ACL.
    let out = keel(&[
        "produce", "--addr", &addr, "-t", "secure", "--ca", &ca, "two",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("credentials"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `keel log serve --registry --registry-token`: the log service registers with a
/// registry that has an ACL, under its own token's principal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_service_should_register_with_a_registry_that_has_an_acl() {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl.toml");
    std::fs::write(
        &acl,
        format!(
            "[[token]]\nprincipal = \"log\"\nsha256 = \"{}\"\n\n[[allow]]\nprincipals = [\"log\"]\nservices = [\"*\"]\nactions = [\"register\", \"deregister\", \"read\"]\n",
            keel_auth::token::hash("log-token")
        ),
    )
    .unwrap();
    let registry = Served::spawn(
        &[
            "registry",
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--acl",
            acl.to_str().unwrap(),
        ],
        &[],
    );
    let registry_url = format!("http://{}", registry.addr);
    let _log = Served::start(
        dir.path(),
        &["--registry", &registry_url, "--registry-token", "log-token"],
    );
    let http = keel_serve::client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let listed: serde_json::Value = http
            .get(format!("{registry_url}/v1/services/log"))
            .bearer_auth("log-token")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap_or_default();
        if listed
            .as_array()
            .is_some_and(|instances| instances.len() == 1)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the log service never registered: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A demo service and the log service under one ACL: each registers with its own
/// token, the visit demo finds the log service through the registry and records
/// its visits in it, all with its token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demo_should_work_against_a_registry_and_log_service_with_an_acl() {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl.toml");
    let mut text = String::new();
    for principal in ["log", "visit"] {
        text.push_str(&keel_auth::token::acl_entry(
            principal,
            &format!("{principal}-token"),
        ));
    }
    text.push_str(
        "[[allow]]\nprincipals = [\"log\", \"visit\"]\nservices = [\"*\"]\nactions = [\"register\", \"deregister\", \"read\"]\n\
         [[allow]]\nprincipals = [\"visit\"]\ntopics = [\"*\"]\nactions = [\"produce\", \"consume\"]\n",
    );
    std::fs::write(&acl, text).unwrap();
    let acl = acl.to_str().unwrap();
    let registry = Served::spawn(
        &["registry", "serve", "--addr", "127.0.0.1:0", "--acl", acl],
        &[],
    );
    let registry_url = format!("http://{}", registry.addr);
    let log = Served::start(
        dir.path(),
        &[
            "--acl",
            acl,
            "--registry",
            &registry_url,
            "--registry-token",
            "log-token",
        ],
    );
    let visit = Served::spawn(
        &[
            "demo",
            "visit",
            "--addr",
            "127.0.0.1:0",
            "--registry",
            &registry_url,
            "--token",
            "visit-token",
        ],
        &[],
    );
    let http = keel_serve::client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let counted: serde_json::Value = loop {
        let answer = http
            .get(format!("http://{}/", visit.addr))
            .send()
            .await
            .unwrap();
        if answer.status().is_success() {
            break answer.json().await.unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no visit counted: {}",
            answer.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(counted["visits"], 1, "{counted}");
    // The visit is in the log service, readable with the token only.
    let url = format!("http://{}/v1/topics/visits/records?from=0", log.addr);
    assert_eq!(http.get(&url).send().await.unwrap().status(), 401);
    let records: serde_json::Value = http
        .get(&url)
        .bearer_auth("visit-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        records["records"].as_array().map(Vec::len),
        Some(1),
        "{records}"
    );
}
