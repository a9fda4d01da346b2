//! One listener for everything: gRPC (`log.v1.Log`, health, reflection) over HTTP/2
//! and the HTTP/JSON API over HTTP/1.1 or HTTP/2, told apart by path.

use std::future::Future;
use std::sync::Arc;

use axum::serve::ListenerExt;
use keel_proto::log::v1::log_server::LogServer;
use tokio::net::TcpListener;
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
/// I/O errors of the listener, or of building the reflection service.
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

    // gRPC writes headers, data and trailers separately: without TCP_NODELAY, Nagle's
    // algorithm holds the trailers until the client's delayed ACK (~40 ms).
    let listener = listener.tap_io(|tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::warn!(error = %err, "cannot set TCP_NODELAY on a connection");
        }
    });
    let signal = token.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
        health_reporter
            .set_not_serving::<LogServer<LogService>>()
            .await;
        signal.cancel();
    });
    let grace = config.shutdown_grace;
    let deadline = async {
        token.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        served = server => served?,
        () = deadline => tracing::warn!(?grace, "grace period over; dropping the connections still open"),
    }
    tokio::task::spawn_blocking(move || topics.close())
        .await
        .map_err(std::io::Error::other)?;
    tracing::info!("log service stopped");
    Ok(())
}
