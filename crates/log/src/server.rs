//! One listener for everything: gRPC (`log.v1.Log`, health, reflection) over HTTP/2
//! and the HTTP/JSON API over HTTP/1.1 or HTTP/2, told apart by path.
//!
//! Thread per core (`keel-serve`): connections are handed in turn to serving threads,
//! each driving its own on a single-threaded runtime, so a request is decoded, handed
//! to its topic's writer and answered without waking another serving thread. The
//! topics' writer threads are shared by all of them.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use keel_proto::log::v1::log_server::LogServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::grpc::LogGrpc;
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
    serve_with(listener, topics, None, shutdown).await
}

/// Serves a cluster node: its replicated topics, with its Raft service
/// (`keel.raft.v1.Raft`) on the same listener (see [`serve`]). The Raft node stops
/// after the last request is served.
///
/// # Errors
///
/// As [`serve`].
pub async fn serve_node(
    listener: TcpListener,
    node: crate::cluster::ClusterNode,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let raft = node.raft.raft.clone();
    let served = serve_with(listener, node.topics, Some(node.raft.service), shutdown).await;
    if let Err(err) = raft.shutdown().await {
        tracing::warn!(error = %err, "stopping the Raft node failed");
    }
    served
}

async fn serve_with(
    listener: TcpListener,
    topics: Arc<Topics>,
    raft: Option<keel_raft::RaftService>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let token = CancellationToken::new();
    let config = topics.config().clone();
    let max_message = config.max_body_bytes as usize;

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<LogServer<LogGrpc>>().await;
    // Reflection in both versions tools speak: grpcurl asks for v1 first, older
    // clients (grpcio's reflection database among them) only for v1alpha. It lists the
    // services this server serves: Raft only on a cluster node.
    let mut served = vec!["log.v1.Log", "grpc.health.v1.Health"];
    if raft.is_some() {
        served.push("keel.raft.v1.Raft");
    }
    let reflection = |own: &str| {
        served.iter().copied().chain([own]).fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(keel_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
            tonic_reflection::server::Builder::with_service_name,
        )
    };
    let reflection_v1 = reflection("grpc.reflection.v1.ServerReflection")
        .build_v1()
        .map_err(std::io::Error::other)?;
    let reflection_v1alpha = reflection("grpc.reflection.v1alpha.ServerReflection")
        .build_v1alpha()
        .map_err(std::io::Error::other)?;
    let auth = match &config.acl {
        None => keel_auth::Authorizer::open_to_all(),
        Some(file) => {
            let auth = keel_auth::Authorizer::from_file(file).map_err(std::io::Error::other)?;
            auth.watch();
            auth
        }
    };
    let mut service = LogGrpc::new(Arc::clone(&topics), token.clone()).with_auth(Arc::clone(&auth));
    if let Ok(addr) = listener.local_addr() {
        service = service.with_local_addr(addr.to_string());
    }
    let log = LogServer::new(service)
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let mut routes = tonic::service::Routes::new(log)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let ending = raft.clone();
    if let Some(raft) = raft {
        // With mutual TLS, only nodes (and admins) with a certificate of the
        // cluster's CA reach Raft; with an ACL, only those allowed cluster admin.
        let need_certificate = config
            .tls
            .as_ref()
            .is_some_and(|tls| tls.client_ca.is_some());
        let guard = keel_raft::cluster_guard(Arc::clone(&auth), need_certificate);
        routes = routes.add_service(raft.with_guard(guard).into_server());
    }
    let grpc = routes.into_axum_router();
    let app = http::router(Arc::clone(&topics), token.clone(), auth)
        .merge(grpc)
        .fallback(http::fallback);

    let options = keel_serve::Options {
        threads: config.workers,
        // Each topic keeps a few files open (two per segment, and its lock).
        max_connections: Some(keel_serve::connections_within_fd_limit(
            config.max_connections,
            1,
            3 * config.max_topics + 64,
            "log service",
        )),
        // hyper cannot say when a connection waits for a request: none is shed.
        shed: Arc::default(),
        name: "keel-log".into(),
    };
    let tls = config
        .tls
        .as_ref()
        .map(keel_serve::tls::server_config)
        .transpose()
        .map_err(std::io::Error::other)?;
    let limits = keel_serve::AppLimits {
        tls,
        header_timeout: config.header_timeout,
        // The acceptor holds the connection limit for every serving thread.
        max_connections: None,
    };
    let grace = config.shutdown_grace;
    let stop = token.clone();
    let serving = keel_serve::serve(listener, options, token.clone(), move |_, handed| {
        serve_thread(handed, app.clone(), limits.clone(), stop.clone(), grace)
    });
    let served = keel_serve::http::serve_until(serving, shutdown, async || {
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
        health_reporter
            .set_not_serving::<LogServer<LogGrpc>>()
            .await;
        token.cancel();
        // Other nodes' forwarding streams would hold the server open.
        if let Some(raft) = &ending {
            raft.end_streams();
        }
    })
    .await;
    tokio::task::spawn_blocking(move || topics.close())
        .await
        .map_err(std::io::Error::other)?;
    tracing::info!("log service stopped");
    served
}

/// What one serving thread runs: `app` on the connections handed to it until `stop`,
/// then for at most `grace` while in-flight requests finish.
async fn serve_thread(
    handed: keel_serve::Handed,
    app: Router,
    limits: keel_serve::AppLimits,
    stop: CancellationToken,
    grace: std::time::Duration,
) -> std::io::Result<()> {
    let server = keel_serve::serve_app(handed, app, limits, stop.clone());
    let deadline = async {
        stop.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        () = server => Ok(()),
        () = deadline => {
            tracing::warn!(?grace, "grace period over; dropping the connections still open");
            Ok(())
        }
    }
}
