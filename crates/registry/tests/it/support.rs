//! A registry on 127.0.0.1:0 with short timings, and fake instances that record the
//! notifications they get and answer health checks as told.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Json;
use axum::http::{Method, StatusCode};
use axum::routing::{any, get};
use keel_registry::RegistryConfig;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

/// Short intervals, so that health changes show quickly; generous timeouts, so that a
/// busy machine's slow answer is never taken for a failure (a failing fake instance
/// answers 503 at once, it does not time out).
pub(crate) fn fast_config() -> RegistryConfig {
    RegistryConfig {
        check_interval: Duration::from_millis(200),
        check_timeout: Duration::from_secs(5),
        check_failures: 2,
        check_retry_delay: Duration::from_millis(50),
        deregister_after: Duration::from_millis(600),
        notify_timeout: Duration::from_secs(5),
        notify_retries: 1,
        ..RegistryConfig::default()
    }
}

pub(crate) struct TestRegistry {
    pub(crate) addr: SocketAddr,
    stop: oneshot::Sender<()>,
    served: tokio::task::JoinHandle<Result<(), keel_registry::RegistryError>>,
}

impl TestRegistry {
    pub(crate) async fn start(config: RegistryConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(keel_registry::run(listener, config, async move {
            let _ = stopped.await;
        }));
        Self { addr, stop, served }
    }

    /// Shuts the registry down and waits for it to stop, failing the test past
    /// `limit`.
    pub(crate) async fn stop_within(self, limit: Duration) {
        let _ = self.stop.send(());
        tokio::time::timeout(limit, self.served)
            .await
            .unwrap_or_else(|_| panic!("the registry did not stop within {limit:?}"))
            .unwrap()
            .unwrap();
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Health checks made so far (`keel_registry_checks_total`).
    pub(crate) async fn checks_made(&self) -> u64 {
        let metrics = keel_serve::client::new()
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metrics
            .lines()
            .find_map(|line| line.strip_prefix("keel_registry_checks_total "))
            .and_then(|count| count.parse().ok())
            .expect("the checks counter")
    }
}

/// A notification an instance received: the method and the instance JSON.
pub(crate) type Notification = (Method, Value);

/// What arrived at an instance's update URL: method, `Keel-Index`, instance id.
pub(crate) type Arrival = (Method, u64, String);

/// A fake service instance. Like the SDK, it drops a notification it has seen (the
/// same change index, method and instance: sent again by a registry that took
/// over); `arrivals` keeps everything that arrived.
pub(crate) struct Instance {
    pub(crate) addr: SocketAddr,
    pub(crate) healthy: Arc<AtomicBool>,
    pub(crate) notifications: mpsc::UnboundedReceiver<Notification>,
    pub(crate) arrivals: Arc<std::sync::Mutex<Vec<Arrival>>>,
    _stop: oneshot::Sender<()>,
}

impl Instance {
    pub(crate) async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let healthy = Arc::new(AtomicBool::new(true));
        let (tx, notifications) = mpsc::unbounded_channel();
        let health = Arc::clone(&healthy);
        let arrivals: Arc<std::sync::Mutex<Vec<Arrival>>> = Arc::default();
        let record = Arc::clone(&arrivals);
        let app = axum::Router::new()
            .route(
                "/services",
                any(
                    move |method: Method,
                          headers: axum::http::HeaderMap,
                          Json(body): Json<Value>| {
                        let (tx, record) = (tx.clone(), Arc::clone(&record));
                        async move {
                            let index = headers
                                .get(keel_registry::INDEX_HEADER)
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.parse().ok())
                                .unwrap_or(0);
                            let id = body["id"].as_str().unwrap_or_default().to_owned();
                            let arrival = (method.clone(), index, id);
                            let mut arrivals = record.lock().unwrap();
                            if !arrivals.contains(&arrival) {
                                let _ = tx.send((method, body));
                            }
                            arrivals.push(arrival);
                            StatusCode::OK
                        }
                    },
                ),
            )
            .route(
                "/heart-beat",
                get(move || {
                    let health = Arc::clone(&health);
                    async move {
                        if health.load(Ordering::SeqCst) {
                            StatusCode::OK
                        } else {
                            StatusCode::SERVICE_UNAVAILABLE
                        }
                    }
                }),
            );
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        });
        Self {
            addr,
            healthy,
            notifications,
            arrivals,
            _stop: stop,
        }
    }

    /// The next notification, within a deadline.
    pub(crate) async fn next(&mut self) -> Notification {
        tokio::time::timeout(Duration::from_secs(10), self.notifications.recv())
            .await
            .expect("a notification arrives in time")
            .expect("instance still running")
    }

    /// Dialect A registration body.
    pub(crate) fn dialect_a(&self, name: &str, required: &[&str]) -> Value {
        serde_json::json!({"Name": name, "Addr": self.addr.to_string(), "RequiredServices": required})
    }
}

/// A listener that accepts connections and never answers on them; it stops when
/// dropped.
pub(crate) struct BlackHole(tokio::task::JoinHandle<()>);

impl BlackHole {
    /// Its address, and the guard that keeps it running.
    pub(crate) async fn start() -> (SocketAddr, Self) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((connection, _)) = listener.accept().await {
                held.push(connection);
            }
        });
        (addr, Self(task))
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.0.abort();
    }
}
