//! Running `keel` as a child process, and keel's servers in the test process.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub(crate) const KEEL: &str = env!("CARGO_BIN_EXE_keel");

/// A `keel log serve` child on a free port; killed on drop.
pub(crate) struct Served {
    pub(crate) child: Child,
    pub(crate) addr: String,
}

impl Served {
    pub(crate) fn start(data_dir: &Path, extra: &[&str]) -> Self {
        Self::start_with_env(data_dir, extra, &[])
    }

    pub(crate) fn start_with_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let data_dir = data_dir.to_str().expect("utf-8 temp dir");
        let mut args = vec![
            "log",
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
            data_dir,
        ];
        args.extend_from_slice(extra);
        Self::spawn(&args, env)
    }

    /// Runs `keel ARGS` and waits for the address it prints first.
    pub(crate) fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        // KEEL_TEST_BINARY runs these tests against another build (a release one, to
        // measure it).
        let binary = std::env::var("KEEL_TEST_BINARY").unwrap_or_else(|_| KEEL.to_owned());
        let mut child = Command::new(binary)
            .args(args)
            .env("KEEL_LOG_LEVEL", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn keel");
        // The first line of stdout names the bound address.
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("keel prints its address");
        let addr = line
            .split_whitespace()
            .find(|word| word.starts_with("127.0.0.1:"))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_owned();
        Self { child, addr }
    }

    /// Sends a signal by name (`INT`, `TERM`, `KILL`).
    pub(crate) fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits for the child to exit, at most `limit`.
    pub(crate) fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "keel did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A log service on 127.0.0.1:0 in a temp dir; it runs until the returned guard drops.
pub(crate) async fn start_log_service() -> (
    std::net::SocketAddr,
    (tempfile::TempDir, tokio::sync::oneshot::Sender<()>),
) {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = keel_log::LogServiceConfig {
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(keel_log::run(listener, config, async move {
        let _ = stopped.await;
    }));
    (addr, (dir, stop))
}

/// Polls `check` until it holds, failing the test after 10 s.
pub(crate) async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET url` with `client`, which must succeed, as JSON.
pub(crate) async fn get_json(client: &reqwest::Client, url: &str) -> serde_json::Value {
    let response = client.get(url).send().await.unwrap();
    assert!(
        response.status().is_success(),
        "{url}: {}",
        response.status()
    );
    response.json().await.unwrap()
}
