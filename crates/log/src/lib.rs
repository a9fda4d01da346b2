//! keel's log service: named topics of durable records over gRPC and HTTP/JSON, and
//! the central sink for other services' log lines.
//!
//! ```text
//!  gRPC log.v1.Log ─┐                           ┌─> topic "default" ─ writer thread ─> keel-commitlog
//!  HTTP /, /v1/... ─┼─> one listener ─> serving ─> Topics ─> topic "logs"    ─ writer thread ─> keel-commitlog
//!  HTTP POST /log ──┘    threads (one per core) └─> topic ...        (group commit per topic)
//! ```
//!
//! - **Thread per core:** each serving thread accepts from the one listener and drives
//!   its connections on its own single-threaded runtime, so a request never wakes
//!   another serving thread; all of them share the topics.
//! - Each topic has **one writer thread** fed by a bounded queue: it takes every
//!   waiting append, writes them with one `append_batch` (one write, one sync), and
//!   only then answers each with its offset.
//! - **Reads never wait for the writer**; streaming reads (gRPC streams, Server-Sent
//!   Events) wait on the topic's next-offset signal when caught up, so an idle tail
//!   costs nothing.
//! - **Errors** are [`LogServiceError`], mapped to gRPC codes and HTTP statuses in one
//!   place.
//!
//! This crate owns the service and its client; storage is `keel-commitlog`, wire
//! types are `keel-proto`. It knows nothing of the registry or the gateway.

pub mod cluster;
mod config;
mod error;
mod grpc;
mod http;
mod metrics;
pub mod replica;
mod server;
mod tail;
mod topic;
mod topic_name;
mod topics;

pub use config::LogServiceConfig;
pub use error::LogServiceError;
pub use grpc::LogGrpc;
/// The storage settings of a topic, from the commit log.
pub use keel_commitlog::{
    LogConfig, ParseError, RecoveryReport, Retention, SyncPolicy, Truncation, parse_size,
};
pub use keel_log_client::{
    Channel, Client, ClientError, Credentials, ResponseBody, Shipper, ShipperStats, TopicInfo,
};
pub use server::{serve, serve_node};
pub use topic_name::{MAX_TOPIC_NAME, validate_topic_name};
pub use topics::{Topics, repair_topic};

/// Opens the topics of `config` and serves them on `listener` until `shutdown`
/// completes (see [`serve`]).
///
/// # Errors
///
/// [`LogServiceError::InvalidConfig`] for a setting out of range; the error of opening
/// a topic; [`LogServiceError::Serve`] when the listener or a serving thread fails.
pub async fn run(
    listener: tokio::net::TcpListener,
    config: LogServiceConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), LogServiceError> {
    config.validate()?;
    let topics = std::sync::Arc::new(Topics::open(config).await?);
    serve(listener, topics, shutdown)
        .await
        .map_err(|err| LogServiceError::Serve(std::sync::Arc::new(err)))
}
