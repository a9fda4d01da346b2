//! Running the registry: the HTTP API, the health checker and the notifier.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::checker::{self, CheckStats};
use crate::config::RegistryConfig;
use crate::error::RegistryError;
use crate::http::{AppState, router};
use crate::notifier::Notifier;
use crate::registry::Registry;
use crate::replica::RegistryNode;

/// The registry of `config` and the HTTP client of its checks and notifications.
pub(crate) fn build(
    config: &RegistryConfig,
) -> Result<(Arc<Registry>, reqwest::Client), RegistryError> {
    config.validate()?;
    let files = config
        .instances_ca
        .clone()
        .map(|ca| keel_serve::tls::ClientTlsFiles { ca, identity: None });
    let mut client = keel_serve::client::with_tls(keel_serve::client::builder(), files.as_ref())
        .map_err(|err| keel_serve::InvalidConfig::new("instances_ca", err.to_string()))?
        .connect_timeout(config.check_timeout.min(config.notify_timeout))
        .pool_idle_timeout(Duration::from_secs(30))
        // A redirect would let an instance aim the registry's checks and
        // notifications at any address it names: it is an answer, not a hop.
        .redirect(reqwest::redirect::Policy::none());
    if let Some(targets) = &config.allow_targets {
        // Registered names are resolved again at every connection: one that
        // resolves elsewhere now than at registration reaches only what is allowed.
        client = client.dns_resolver(crate::resolver::Guard::new(targets.clone()));
    }
    let client = client.build().map_err(RegistryError::HttpClient)?;
    let notifier = Notifier::new(
        client.clone(),
        config.notify_timeout,
        config.notify_retries,
        config.notify_queue,
        Arc::new(crate::pacer::Pacer::new(config.max_requests_per_target)),
    );
    Ok((
        Arc::new(Registry::new(notifier, config.max_instances)),
        client,
    ))
}

/// Serves the registry on `listener` until `shutdown` completes; health checks and
/// notifications run meanwhile.
///
/// # Errors
///
/// [`RegistryError::InvalidConfig`] for a setting out of range;
/// [`RegistryError::HttpClient`] when the health checker's HTTP client cannot be
/// built.
pub async fn run(
    listener: TcpListener,
    config: RegistryConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RegistryError> {
    let (registry, client) = build(&config)?;
    let auth = authorizer(&config)?;
    let tls = tls(&config)?;
    serve(
        listener,
        config,
        Parts {
            registry,
            client,
            auth,
            tls,
            raft: None,
        },
        shutdown,
    )
    .await;
    Ok(())
}

/// The policy of `config`'s ACL file, watched for changes; open to all without one.
pub(crate) fn authorizer(
    config: &RegistryConfig,
) -> Result<Arc<keel_auth::Authorizer>, RegistryError> {
    Ok(match &config.acl {
        None => keel_auth::Authorizer::open_to_all(),
        Some(file) => {
            let auth = keel_auth::Authorizer::from_file(file)?;
            auth.watch();
            auth
        }
    })
}

/// The TLS config of `config`'s certificate, if it has one.
pub(crate) fn tls(
    config: &RegistryConfig,
) -> Result<Option<Arc<keel_serve::tls::ServerConfig>>, RegistryError> {
    config
        .tls
        .as_ref()
        .map(keel_serve::tls::server_config)
        .transpose()
        .map_err(|err| keel_serve::InvalidConfig::new("tls", err.to_string()).into())
}

/// What a registry serves with.
struct Parts {
    registry: Arc<Registry>,
    client: reqwest::Client,
    auth: Arc<keel_auth::Authorizer>,
    tls: Option<Arc<keel_serve::tls::ServerConfig>>,
    raft: Option<keel_raft::RaftService>,
}

/// Serves a cluster node (see [`crate::replica::start`]): its registry, with its
/// Raft service (`keel.raft.v1.Raft`, gRPC) on the same listener. Only while the
/// node leads does it check health and notify. The Raft node stops after the last
/// request is served.
pub async fn run_node(
    listener: TcpListener,
    config: RegistryConfig,
    node: RegistryNode,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let raft = node.raft.raft.clone();
    serve(
        listener,
        config,
        Parts {
            registry: node.registry,
            client: node.client,
            auth: node.auth,
            tls: node.tls,
            raft: Some(node.raft.service),
        },
        shutdown,
    )
    .await;
    if let Err(err) = raft.shutdown().await {
        tracing::warn!(error = %err, "stopping the Raft node failed");
    }
}

async fn serve(
    listener: TcpListener,
    config: RegistryConfig,
    parts: Parts,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let Parts {
        registry,
        client,
        auth,
        tls,
        raft,
    } = parts;
    let checks = Arc::new(CheckStats::default());
    let token = CancellationToken::new();
    let checker = tokio::spawn(checker::run(
        Arc::clone(&registry),
        config.clone(),
        client,
        Arc::clone(&checks),
        token.clone(),
    ));
    let limits = keel_serve::AppLimits {
        tls,
        header_timeout: config.header_timeout,
        // Each check may hold an outbound connection beside the served ones.
        max_connections: Some(keel_serve::connections_within_fd_limit(
            config.max_connections,
            1,
            config.check_workers + 64,
            "registry",
        )),
    };
    let ending = raft.clone();
    // With mutual TLS, only nodes (and admins) with a certificate of the cluster's
    // CA reach Raft; with an ACL, only those allowed cluster admin.
    let need_certificate = config
        .tls
        .as_ref()
        .is_some_and(|tls| tls.client_ca.is_some());
    let raft = raft.map(|raft| {
        let guard = keel_raft::cluster_guard(Arc::clone(&auth), need_certificate);
        tonic::service::Routes::new(raft.with_guard(guard).into_server()).into_axum_router()
    });
    let app = router(
        AppState {
            registry,
            config: Arc::new(config),
            checks,
            auth,
            stopping: token.clone(),
        },
        raft,
    );
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let serving = keel_serve::serve_app(listener, app, limits, token.clone());
    keel_serve::http::serve_until(serving, shutdown, async || {
        token.cancel();
        // Other nodes' forwarding streams would hold the server open.
        if let Some(raft) = &ending {
            raft.end_streams();
        }
    })
    .await;
    let _ = checker.await;
    tracing::info!("registry stopped");
}
