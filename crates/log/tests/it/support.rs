//! A log service on 127.0.0.1:0 in a temp dir, stopped on drop.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use keel_commitlog::{LogConfig, SyncPolicy};
use keel_log::{Client, LogServiceConfig};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub(crate) struct TestServer {
    pub(crate) addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), keel_log::LogServiceError>>>,
    _dir: Option<tempfile::TempDir>,
}

pub(crate) fn config(data_dir: &Path) -> LogServiceConfig {
    LogServiceConfig {
        data_dir: data_dir.to_path_buf(),
        max_body_bytes: 2 * 1024 * 1024,
        shutdown_grace: Duration::from_secs(5),
        log: LogConfig {
            sync: SyncPolicy::Always,
            max_record_bytes: 1024 * 1024,
            ..LogConfig::default()
        },
        ..LogServiceConfig::default()
    }
}

impl TestServer {
    pub(crate) async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut server = Self::start_with(config(dir.path())).await;
        server._dir = Some(dir);
        server
    }

    pub(crate) async fn start_with(config: LogServiceConfig) -> Self {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), config).await
    }

    /// Starts on `addr`: port 0, or the address of a server stopped earlier.
    pub(crate) async fn start_on(addr: SocketAddr, config: LogServiceConfig) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(keel_log::run(listener, config, async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            task: Some(task),
            _dir: None,
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub(crate) async fn client(&self) -> Client {
        Client::connect(&self.addr.to_string())
            .await
            .expect("connect")
    }

    /// Stops the server and waits until it has closed its topics.
    pub(crate) async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("server stops within its grace period")
                .expect("server task")
                .expect("server ran cleanly");
        }
    }

    /// Keeps the data dir for a restart.
    pub(crate) fn take_dir(&mut self) -> tempfile::TempDir {
        self._dir.take().expect("owns its dir")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// What a gRPC reflection (v1) client that knows none of keel's protos learns from `request`.
pub(crate) async fn reflect(
    url: &str,
    request: tonic_reflection::pb::v1::server_reflection_request::MessageRequest,
) -> tonic_reflection::pb::v1::server_reflection_response::MessageResponse {
    use futures::StreamExt as _;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut answers = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    answers
        .next()
        .await
        .expect("an answer")
        .unwrap()
        .message_response
        .expect("a message")
}

/// Whether `python3` can import `modules` (e.g. `"grpc, grpc_reflection"`); when it
/// cannot, says the test is skipped and why.
pub(crate) fn python_has(modules: &str, packages: &str) -> bool {
    let has = std::process::Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|out| out.status.success());
    if !has {
        eprintln!("SKIPPED: python3 with {packages} is not installed (.ci/run installs it)");
    }
    has
}

/// Runs the Python program `source` with `args` (off the runtime's threads); asserts
/// it succeeded and returns what it printed, trimmed.
pub(crate) async fn run_python(source: &str, args: Vec<String>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("client.py");
    std::fs::write(&script, source).unwrap();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(script)
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
