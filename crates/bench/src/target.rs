//! The service under load: one given by address, or a fresh one in this process.

use std::future::Future;
use std::thread::JoinHandle;

use anyhow::Context;
use keel_log::LogServiceConfig;
use keel_log::{LogConfig, SyncPolicy};
use tokio::sync::oneshot;

/// A server running in this process on its own thread and two-thread runtime, so that
/// the load generator does not share its executor; stopped on drop.
pub(crate) struct InProcess {
    pub(crate) addr: String,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl InProcess {
    /// Binds 127.0.0.1:0 and runs `serve(listener, stop)` on a new thread.
    pub(crate) fn start<F, Fut, E>(name: &str, serve: F) -> anyhow::Result<Self>
    where
        F: FnOnce(tokio::net::TcpListener, oneshot::Receiver<()>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        Self::start_on(name, listener, serve)
    }

    /// Runs `serve(listener, stop)` on a new thread, on a listener bound already.
    pub(crate) fn start_on<F, Fut, E>(
        name: &str,
        listener: std::net::TcpListener,
        serve: F,
    ) -> anyhow::Result<Self>
    where
        F: FnOnce(tokio::net::TcpListener, oneshot::Receiver<()>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?.to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        let label = name.to_owned();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(err) => return eprintln!("{label}: cannot start a runtime: {err}"),
                };
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(err) => return eprintln!("{label}: cannot adopt the listener: {err}"),
                    };
                    if let Err(err) = serve(listener, stopped).await {
                        eprintln!("{label} failed: {err}");
                    }
                });
            })?;
        Ok(Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A log service to drive: one given by address, or a fresh one with `sync` in a
/// temp dir.
pub(crate) struct Target {
    pub(crate) addr: String,
    _server: Option<InProcess>,
    _dir: Option<tempfile::TempDir>,
}

impl Target {
    pub(crate) fn start(addr: Option<&str>, sync: SyncPolicy) -> anyhow::Result<Self> {
        if let Some(addr) = addr {
            return Ok(Self {
                addr: addr.to_owned(),
                _server: None,
                _dir: None,
            });
        }
        Self::fresh(sync, None)
    }

    /// A fresh service in a temp dir, on TLS with `tls` when given.
    pub(crate) fn fresh(
        sync: SyncPolicy,
        tls: Option<keel_serve::tls::ServerTlsFiles>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).context("temp dir for the service")?;
        let config = LogServiceConfig {
            data_dir: dir.path().to_path_buf(),
            log: LogConfig {
                sync,
                ..LogConfig::default()
            },
            tls,
            ..LogServiceConfig::default()
        };
        let server = InProcess::start("keel-log-under-test", move |listener, stopped| {
            keel_log::run(listener, config, async move {
                let _ = stopped.await;
            })
        })?;
        Ok(Self {
            addr: server.addr.clone(),
            _server: Some(server),
            _dir: Some(dir),
        })
    }
}
