//! The serving commands: `keel log serve`, `keel registry serve`, `keel gateway
//! serve`, `keel demo ...`, each with its configuration layered from defaults, a TOML
//! file, `KEEL_*` variables and flags, and shutdown on a signal.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use keel_log::LogServiceConfig;
use keel_raft::membership::{ClusterOptions, Membership};

use super::{DemoCommand, Failure, GatewayServeArgs, NodeFlags, RegistryServeArgs, ServeArgs};

/// The layout of a keel config file (`--config`).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ConfigFile {
    log: LogServiceConfig,
    registry: keel_registry::RegistryConfig,
    gateway: keel_gateway::GatewayConfig,
}

fn read_config_file(path: Option<&PathBuf>) -> anyhow::Result<ConfigFile> {
    let Some(path) = path else {
        return Ok(ConfigFile::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
}

/// Binds `addr`, with an error that says how to pick another address.
async fn bind(addr: &str, flag: &str) -> Result<tokio::net::TcpListener, Failure> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {addr}: is another process using it? Choose another with {flag}"
            )
        })
        .map_err(Failure::Run)
}

fn registry_config(args: &RegistryServeArgs) -> anyhow::Result<keel_registry::RegistryConfig> {
    let mut config = read_config_file(args.config.as_ref())?.registry;
    if let Some(addr) = &args.addr {
        config.addr = addr.clone();
    }
    if let Some(every) = args.check_interval {
        config.check_interval = every;
    }
    if let Some(timeout) = args.check_timeout {
        config.check_timeout = timeout;
    }
    if let Some(failures) = args.check_failures {
        config.check_failures = failures;
    }
    if let Some(after) = args.deregister_after {
        config.deregister_after = after;
    }
    if let Some(targets) = &args.allow_targets {
        config.allow_targets = Some(targets.clone());
    }
    if let Some(acl) = &args.acl {
        config.acl = Some(acl.clone());
    }
    if let Some(tls) = args.tls.files() {
        config.tls = Some(tls);
    }
    if let Some(ca) = &args.instances_ca {
        config.instances_ca = Some(ca.clone());
    }
    if let Err(err) = config.validate() {
        bail!("registry.{err}");
    }
    Ok(config)
}

fn gateway_config(args: &GatewayServeArgs) -> anyhow::Result<keel_gateway::GatewayConfig> {
    let mut config = read_config_file(args.config.as_ref())?.gateway;
    if let Some(addr) = &args.addr {
        config.addr = addr.clone();
    }
    if let Some(registry) = &args.registry {
        config.registry = registry.clone();
    }
    if let Some(token) = &args.auth.token {
        config.registry_token = Some(token.clone());
    }
    if let Some(files) = args.auth.tls_files() {
        config.client_tls = Some(files);
    }
    if let Some(tls) = args.tls.files() {
        config.tls = Some(tls);
    }
    if let Some(timeout) = args.request_timeout {
        config.request_timeout = timeout;
    }
    if !args.strip_prefix.is_empty() {
        config.strip_prefix = args.strip_prefix.clone();
    }
    if let Some(url) = &args.log_service {
        config.log_service = Some(url.clone());
    }
    if let Some(token) = &args.log_service_token {
        config.log_service_token = Some(token.clone());
    }
    if let Err(err) = config.validate() {
        bail!("gateway.{err}");
    }
    Ok(config)
}

pub(super) async fn serve_gateway(args: GatewayServeArgs) -> Result<(), Failure> {
    let config = gateway_config(&args).map_err(Failure::Config)?;
    let listener = bind(&config.addr, "--addr or KEEL_GATEWAY_ADDR").await?;
    let admin = bind(&args.admin_addr, "--admin-addr or KEEL_GATEWAY_ADMIN_ADDR").await?;
    let addr = listener
        .local_addr()
        .map_err(|err| Failure::Run(err.into()))?;
    let admin_addr = admin.local_addr().map_err(|err| Failure::Run(err.into()))?;
    let stop = shutdown();
    // The admin port takes the front's certificate.
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    println!(
        "keel gateway listening on {addr} (admin: {scheme}://{admin_addr}/metrics), registry {}",
        config.registry
    );
    let _ = std::io::stdout().flush();
    keel_gateway::run(listener, admin, config, stop)
        .await
        .map_err(|err| Failure::Run(anyhow::anyhow!(err)))
}

pub(super) async fn serve_registry(args: RegistryServeArgs) -> Result<(), Failure> {
    let config = registry_config(&args).map_err(Failure::Config)?;
    let listener = bind(&config.addr, "--addr or KEEL_REGISTRY_ADDR").await?;
    let addr = listener
        .local_addr()
        .map_err(|err| Failure::Run(err.into()))?;
    let cluster = cluster_options(&args.node_flags(), addr).map_err(Failure::Config)?;
    let stop = shutdown();
    let Some(cluster) = cluster else {
        println!("keel registry listening on {addr} (HTTP)");
        let _ = std::io::stdout().flush();
        return keel_registry::run(listener, config, stop)
            .await
            .map_err(|err| Failure::Run(anyhow::anyhow!(err)));
    };
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("keel-data/registry"));
    println!(
        "keel registry node {} listening on {addr} (HTTP and gRPC keel.raft.v1.Raft), data in {}",
        cluster.node_id,
        data_dir.display()
    );
    let _ = std::io::stdout().flush();
    let node = keel_registry::replica::start(&config, &data_dir, &cluster)
        .await
        .map_err(|err| Failure::Run(anyhow::anyhow!(err)))?;
    if let Membership::Join(via) = &cluster.membership {
        let joining = node.clone();
        let (via, advertise) = (via.clone(), cluster.advertise.clone());
        tokio::spawn(async move {
            if let Err(err) = joining.join(&via, &advertise).await {
                tracing::error!(error = %err, "cannot join the cluster");
            }
        });
    }
    keel_registry::run_node(listener, config, node, stop).await;
    Ok(())
}

fn serve_config(args: &ServeArgs) -> anyhow::Result<LogServiceConfig> {
    let mut config = read_config_file(args.config.as_ref())?.log;
    if let Some(dir) = &args.data_dir {
        config.data_dir = dir.clone();
    }
    if let Some(addr) = &args.addr {
        config.addr = addr.clone();
    }
    if let Some(sync) = args.sync {
        config.log.sync = sync;
    }
    if let Some(bytes) = args.max_record_bytes {
        config.log.max_record_bytes = bytes;
        // Keep room for the largest record in a request.
        config.max_body_bytes = config.max_body_bytes.max(bytes + 64 * 1024);
    }
    if let Some(bytes) = args.segment_bytes {
        config.log.segment_bytes = bytes;
    }
    if let Some(bytes) = args.retention_bytes {
        config.log.retention.bytes = Some(bytes);
    }
    if let Some(age) = args.retention_age {
        config.log.retention.age = Some(age);
    }
    if args.no_auto_create {
        config.auto_create_topics = false;
    }
    if let Some(workers) = args.workers {
        config.workers = workers;
    }
    if let Some(acl) = &args.acl {
        config.acl = Some(acl.clone());
    }
    if let Some(tls) = args.tls.files() {
        config.tls = Some(tls);
    }
    if let Err(err) = config.validate() {
        bail!("{err}");
    }
    Ok(config)
}

/// The cluster settings of a serving command, when it runs as a node.
fn cluster_options(
    args: &NodeFlags<'_>,
    bound: std::net::SocketAddr,
) -> anyhow::Result<Option<ClusterOptions>> {
    let Some(node_id) = args.node_id else {
        return Ok(None);
    };
    let membership = match (args.peers, args.join) {
        (Some(peers), None) => Membership::Peers(
            keel_raft::membership::parse_peers(peers)
                .map_err(|err| anyhow::anyhow!("--peers: {err}"))?,
        ),
        (None, Some(join)) => Membership::Join(join.clone()),
        (None, None) => Membership::Wait,
        (Some(_), Some(_)) => bail!("--peers and --join exclude each other"),
    };
    let advertise = match (args.advertise, &membership) {
        (Some(advertise), _) => advertise.clone(),
        (None, Membership::Peers(peers)) => peers
            .get(&node_id)
            .cloned()
            .with_context(|| format!("--peers does not name this node ({node_id})"))?,
        (None, Membership::Join(_) | Membership::Wait) => bound.to_string(),
    };
    if bound.port()
        != advertise
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or(0)
    {
        tracing::warn!(%bound, advertise, "this node listens on another port than the one the cluster knows it by");
    }
    // With TLS, nodes reach each other over mutual TLS: each presents its own
    // certificate, and trusts the client CA alone.
    let tls = match args.tls.files() {
        None => {
            if args.acl.is_some() {
                tracing::warn!(
                    "a plaintext cluster node with an ACL: other nodes call its Raft service without credentials, so the ACL must allow `anonymous` admin on the cluster (anyone reaching this port); run the cluster on mutual TLS (--tls-cert, --tls-key, --tls-client-ca)"
                );
            }
            None
        }
        Some(files) => {
            let Some(ca) = &files.client_ca else {
                bail!(
                    "a cluster node with --tls-cert needs --tls-client-ca too: nodes present their certificates to each other (mutual TLS), and this CA verifies them"
                );
            };
            Some(keel_raft::peer::PeerTls::from_files(
                ca,
                &files.cert,
                &files.key,
            )?)
        }
    };
    Ok(Some(ClusterOptions {
        node_id,
        advertise,
        membership,
        settings: keel_raft::NodeSettings {
            snapshot_every: args.snapshot_every,
            tls,
            ..keel_raft::NodeSettings::default()
        },
    }))
}

pub(super) async fn serve(args: ServeArgs) -> Result<(), Failure> {
    let config = serve_config(&args).map_err(Failure::Config)?;
    let listener = bind(&config.addr, "--addr or KEEL_LOG_ADDR").await?;
    let addr = listener
        .local_addr()
        .map_err(|err| Failure::Run(err.into()))?;
    let cluster = cluster_options(&args.node_flags(), addr).map_err(Failure::Config)?;
    if cluster.is_some() && args.sync.is_some() {
        tracing::warn!(
            "--sync does not apply to a cluster node: every acknowledged write is fsynced in the Raft log of a majority"
        );
    }
    let stop = shutdown();
    match &cluster {
        Some(cluster) => println!(
            "keel log service node {} listening on {addr} (gRPC log.v1.Log, keel.raft.v1.Raft and HTTP), data in {}",
            cluster.node_id,
            config.data_dir.display()
        ),
        None => println!(
            "keel log service listening on {addr} (gRPC log.v1.Log and HTTP), data in {}",
            config.data_dir.display()
        ),
    }
    let _ = std::io::stdout().flush();
    let shutdown: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> = match &args.registry {
        Some(registry) => {
            // With TLS on, the registry checks it, and clients find it, over https.
            let scheme = if config.tls.is_some() {
                "https"
            } else {
                "http"
            };
            // Where clients reach it: as the cluster knows it, or --advertise.
            let at = match (&cluster, &args.advertise) {
                (Some(cluster), _) => cluster.advertise.clone(),
                (None, Some(advertise)) => advertise.clone(),
                (None, None) => addr.to_string(),
            };
            let url = format!("{scheme}://{at}");
            let mut service = crate::service::ServiceConfig::new("log", url.clone(), registry);
            service.token.clone_from(&args.registry_token);
            service.tls = args
                .registry_ca
                .clone()
                .map(|ca| keel_serve::tls::ClientTlsFiles { ca, identity: None });
            Box::pin(async move {
                // Deregistered before the service stops accepting.
                let health = format!("{url}/healthz");
                let registered = crate::service::stay_registered(&service, &url, &health, stop);
                if let Err(err) = registered.await {
                    tracing::warn!(%err, "cannot register with the registry");
                }
            })
        }
        None => Box::pin(stop),
    };
    let Some(cluster) = cluster else {
        return keel_log::run(listener, config, shutdown)
            .await
            .map_err(|err| Failure::Run(anyhow::anyhow!(err)));
    };
    let node = keel_log::cluster::start(config, &cluster)
        .await
        .map_err(|err| Failure::Run(anyhow::anyhow!(err)))?;
    if let Membership::Join(via) = &cluster.membership {
        let joining = node.clone();
        let (via, advertise) = (via.clone(), cluster.advertise.clone());
        tokio::spawn(async move {
            if let Err(err) = joining.join(&via, &advertise).await {
                tracing::error!(error = %err, "cannot join the cluster");
            }
        });
    }
    keel_log::serve_node(listener, node, shutdown)
        .await
        .map_err(|err| Failure::Run(err.into()))
}

/// Completes when the process should stop: SIGINT or SIGTERM, or, under `keel up`,
/// when stdin closes (`keel up` is gone, whatever way it ended).
pub(super) fn shutdown() -> impl Future<Output = ()> + Send + 'static {
    // Installed now: a signal that arrives before the first poll is not lost.
    let signalled = crate::service::shutdown_signal();
    let supervised = std::env::var_os(crate::up::SUPERVISED_ENV).is_some();
    let (closed, stdin_closed) = tokio::sync::oneshot::channel::<()>();
    if supervised {
        std::thread::spawn(move || {
            use std::io::Read;
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 256];
            while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
            let _ = closed.send(());
        });
    }
    async move {
        if supervised {
            tokio::select! {
                () = signalled => {}
                _ = stdin_closed => tracing::info!("stdin closed: the supervisor is gone; stopping"),
            }
        } else {
            signalled.await;
        }
    }
}

pub(super) async fn serve_demo(command: DemoCommand) -> Result<(), Failure> {
    let (demo, args) = match command {
        DemoCommand::Visit(args) => (keel_demo::Demo::Visit, args),
        DemoCommand::Grading(args) => (keel_demo::Demo::Grading, args),
        DemoCommand::Portal(args) => (keel_demo::Demo::Portal, args),
    };
    let addr = args.addr.clone().unwrap_or_else(|| {
        let port = match demo {
            keel_demo::Demo::Visit => 20003,
            keel_demo::Demo::Grading => 20004,
            keel_demo::Demo::Portal => 20005,
        };
        format!("127.0.0.1:{port}")
    });
    let mut config = keel_demo::DemoConfig::new(demo, &addr, &args.registry, args.data_dir);
    config.service.tls = args.auth.tls_files();
    config.service.serve_tls = args.tls.files();
    config.service.advertise = args.advertise;
    config.service.token = args.auth.token;
    if let Some(instance) = args.instance {
        config.instance = instance;
    }
    let name = demo.name();
    keel_demo::run(
        demo,
        config,
        |addr| {
            println!("keel demo {name} listening on {addr}");
            let _ = std::io::stdout().flush();
        },
        shutdown(),
    )
    .await
    .map_err(|err| Failure::Run(anyhow::anyhow!(err)))
}
