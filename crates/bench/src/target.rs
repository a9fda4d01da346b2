//! The service under load: one given by address, or a fresh one in this process.

use std::thread::JoinHandle;

use anyhow::Context;
use keel_commitlog::{LogConfig, SyncPolicy};
use keel_log::LogServiceConfig;
use tokio::sync::oneshot;

/// A log service to drive; a service this tool started is stopped on drop.
pub(crate) struct Target {
    pub(crate) addr: String,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

impl Target {
    /// Uses `addr`, or starts a service with `sync` on 127.0.0.1:0 in a temp dir,
    /// on its own two-thread runtime.
    pub(crate) fn start(addr: Option<&str>, sync: SyncPolicy) -> anyhow::Result<Self> {
        if let Some(addr) = addr {
            return Ok(Self {
                addr: addr.to_owned(),
                stop: None,
                thread: None,
                _dir: None,
            });
        }
        let dir = tempfile::tempdir_in(std::env::temp_dir()).context("temp dir for the service")?;
        let config = LogServiceConfig {
            data_dir: dir.path().to_path_buf(),
            log: LogConfig {
                sync,
                ..LogConfig::default()
            },
            ..LogServiceConfig::default()
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?.to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("keel-under-test".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        eprintln!("cannot start the service's runtime: {err}");
                        return;
                    }
                };
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(err) => {
                            eprintln!("cannot adopt the listener: {err}");
                            return;
                        }
                    };
                    if let Err(err) = keel_log::run(listener, config, async move {
                        let _ = stopped.await;
                    })
                    .await
                    {
                        eprintln!("the log service failed: {err}");
                    }
                });
            })?;
        Ok(Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
            _dir: Some(dir),
        })
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
