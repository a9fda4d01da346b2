//! One listener for everything: gRPC (`log.v1.Log`, health, reflection) over HTTP/2
//! and the HTTP/JSON API over HTTP/1.1 or HTTP/2, told apart by path.
//!
//! Thread per core: each serving thread accepts from the same socket and drives its
//! connections on its own single-threaded runtime, so a request is decoded, handed to
//! its topic's writer and answered without waking another serving thread. The
//! topics' writer threads are shared by all of them.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::serve::ListenerExt;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use keel_proto::log::v1::log_server::LogServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::grpc::LogService;
use crate::http;
use crate::topics::Topics;

/// Serves `topics` on `listener` until `shutdown` completes, then stops accepting,
/// gives in-flight requests the configured grace period, ends every stream, and
/// closes the topics (queued appends written, logs synced).
///
/// # Errors
///
/// I/O errors of the listener, of starting a serving thread, or of building the
/// reflection service.
pub async fn serve(
    listener: TcpListener,
    topics: Arc<Topics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let token = CancellationToken::new();
    let config = topics.config().clone();
    let max_message = config.max_body_bytes as usize;

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<LogServer<LogService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(keel_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(std::io::Error::other)?;
    let log = LogServer::new(LogService::new(Arc::clone(&topics), token.clone()))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let grpc = tonic::service::Routes::new(log)
        .add_service(health)
        .add_service(reflection)
        .into_axum_router();
    let app = http::router(Arc::clone(&topics), token.clone())
        .merge(grpc)
        .fallback(http::fallback);

    let listener = listener.into_std()?;
    let mut threads = FuturesUnordered::new();
    for worker in 0..config.serving_threads() {
        let (listener, app, stop) = (listener.try_clone(), app.clone(), token.clone());
        let (finished, finished_rx) = oneshot::channel();
        let grace = config.shutdown_grace;
        let spawned = listener.and_then(|listener| {
            std::thread::Builder::new()
                .name(format!("keel-log-{worker}"))
                .spawn(move || {
                    let _ = finished.send(serve_thread(listener, app, stop, grace));
                })
        });
        if let Err(err) = spawned {
            token.cancel();
            return Err(err);
        }
        threads.push(finished_rx);
    }

    let mut failure = tokio::select! {
        () = shutdown => None,
        // A serving thread that ends before shutdown has failed.
        Some(ended) = threads.next() => Some(thread_result(ended)),
    };
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    health_reporter
        .set_not_serving::<LogServer<LogService>>()
        .await;
    token.cancel();
    while let Some(ended) = threads.next().await {
        if let Err(err) = thread_result(ended) {
            failure.get_or_insert(Err(err));
        }
    }
    tokio::task::spawn_blocking(move || topics.close())
        .await
        .map_err(std::io::Error::other)?;
    tracing::info!("log service stopped");
    failure.unwrap_or(Ok(()))
}

fn thread_result(
    ended: Result<std::io::Result<()>, oneshot::error::RecvError>,
) -> std::io::Result<()> {
    ended.unwrap_or_else(|_| Err(std::io::Error::other("a serving thread panicked")))
}

/// One serving thread: a single-threaded runtime serving `listener` until `stop`,
/// then for at most `grace` while in-flight requests finish.
fn serve_thread(
    listener: std::net::TcpListener,
    app: Router,
    stop: CancellationToken,
    grace: std::time::Duration,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        // gRPC writes headers, data and trailers separately: without TCP_NODELAY,
        // Nagle's algorithm holds the trailers until the client's delayed ACK (~40 ms).
        let listener = TcpListener::from_std(listener)?.tap_io(|tcp| {
            if let Err(err) = tcp.set_nodelay(true) {
                tracing::warn!(error = %err, "cannot set TCP_NODELAY on a connection");
            }
        });
        let draining = stop.clone();
        let server = axum::serve(listener, app)
            .with_graceful_shutdown(async move { draining.cancelled().await });
        let deadline = async {
            stop.cancelled().await;
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            served = server => served,
            () = deadline => {
                tracing::warn!(?grace, "grace period over; dropping the connections still open");
                Ok(())
            }
        }
    })
}
