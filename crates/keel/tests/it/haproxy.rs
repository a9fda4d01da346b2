//! Debian's haproxy in front of two keel gateways, with the configuration that
//! docs/ha/haproxy.cfg documents: a gateway killed under load costs no request.
//! Skipped, saying so, where haproxy is not installed (`.ci/run` installs it).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::support::KEEL;

/// A child process killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn haproxy() -> Option<String> {
    [
        "/usr/sbin/haproxy",
        "/usr/bin/haproxy",
        "/usr/local/sbin/haproxy",
    ]
    .into_iter()
    .find(|path| std::path::Path::new(path).exists())
    .map(str::to_owned)
}

async fn until_answers(url: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(response) = keel_serve::client::new().get(url).send().await
            && response.status().is_success()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{url} did not answer within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A registry, and a service `echo` registered with it.
async fn registry_with_echo() -> (SocketAddr, oneshot::Sender<()>, oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let registry = listener.local_addr().unwrap();
    let config = keel_registry::RegistryConfig {
        check_interval: Duration::from_secs(3600),
        ..Default::default()
    };
    let (stop_registry, stopped) = oneshot::channel::<()>();
    tokio::spawn(keel_registry::run(listener, config, async move {
        let _ = stopped.await;
    }));
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo = backend.local_addr().unwrap();
    let app = axum::Router::new().fallback(|| async { "echo" });
    let (stop_echo, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(backend, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
    });
    let registered = keel_serve::client::new()
        .post(format!("http://{registry}/services"))
        .json(&serde_json::json!({"name": "echo", "addr": echo.to_string()}))
        .send()
        .await
        .unwrap();
    assert!(registered.status().is_success());
    (registry, stop_registry, stop_echo)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_in_front_of_two_gateways_should_lose_no_request_when_one_dies() {
    let Some(haproxy) = haproxy() else {
        eprintln!("SKIPPED: haproxy is not installed (apt-get install haproxy; .ci/run does)");
        return;
    };
    let (registry, _registry, _echo) = registry_with_echo().await;
    let work = tempfile::tempdir().unwrap();

    // Two gateways, each with its admin port, as the documented file expects.
    let mut gateways = Vec::new();
    let mut config = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/ha/haproxy.cfg"
    ))
    .unwrap();
    let front = free_port();
    config = config.replace("127.0.0.1:20001", &format!("127.0.0.1:{front}"));
    for n in 1..=2u16 {
        let (port, admin) = (free_port(), free_port());
        config = config
            .replace(&format!("127.0.0.1:2001{n}"), &format!("127.0.0.1:{port}"))
            .replace(&format!("port 2011{n}"), &format!("port {admin}"));
        let child = Command::new(KEEL)
            .args(["gateway", "serve", "--addr", &format!("127.0.0.1:{port}")])
            .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
            .args(["--registry", &format!("http://{registry}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        gateways.push(Process(child));
        until_answers(
            &format!("http://127.0.0.1:{port}/echo/"),
            Duration::from_secs(20),
        )
        .await;
    }
    assert!(
        !config.contains(":2001"),
        "every documented address was replaced:\n{config}"
    );
    let config_path = work.path().join("haproxy.cfg");
    std::fs::write(&config_path, &config).unwrap();
    let _haproxy = Process(
        Command::new(&haproxy)
            .arg("-f")
            .arg(&config_path)
            .arg("-db")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{front}/echo/");
    until_answers(&url, Duration::from_secs(20)).await;

    // A steady load; one gateway killed in the middle of it.
    let http = keel_serve::client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut failures = Vec::new();
    let mut answered = 0;
    let mut killed_at = None;
    let started = Instant::now();
    for n in 0..600 {
        if n == 200 {
            let _ = gateways[0].0.kill();
            let _ = gateways[0].0.wait();
            killed_at = Some(Instant::now());
        }
        match http.get(&url).send().await {
            Ok(response) if response.status().is_success() => answered += 1,
            Ok(response) => failures.push(format!("request {n}: {}", response.status())),
            Err(err) => failures.push(format!("request {n}: {err}")),
        }
        if started.elapsed() > Duration::from_secs(60) {
            break;
        }
    }
    eprintln!(
        "{answered} requests answered through haproxy; a gateway killed {:?} after the start",
        killed_at.map(|at| at.duration_since(started))
    );
    assert!(killed_at.is_some(), "the load ended before the kill");
    assert!(failures.is_empty(), "{failures:?}");
}
