//! The command line: `keel log serve`, `keel produce`, `keel consume`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr as _;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use keel_log::{SyncPolicy, parse_size};

use crate::values::parse_duration;
use records::{consume, produce};
use serve::{serve, serve_demo, serve_gateway, serve_registry, shutdown};

mod chaos;
mod cluster;
mod records;

mod serve;

/// Exit code for an invalid configuration (`EX_USAGE`).
const EXIT_CONFIG: u8 = 64;
/// Exit code for a failure while running (`EX_SOFTWARE`).
const EXIT_FAILURE: u8 = 70;
/// Default address of the log service, as in the original system.
const DEFAULT_LOG_ADDR: &str = "127.0.0.1:20002";

/// keel: a durable log service, registry and gateway for microservice back ends.
#[derive(Debug, Parser)]
#[command(
    name = "keel",
    version,
    about = "keel: a durable log service, a service registry and a load-balancing gateway for microservice back ends. `keel up` runs the whole system locally.",
    long_about = None
)]
pub struct Cli {
    /// Log filter: error, warn, info, debug, trace, or a full RUST_LOG directive.
    #[arg(long, global = true, env = "KEEL_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The log service.
    Log {
        #[command(subcommand)]
        command: LogCommand,
    },
    /// The service registry.
    Registry {
        #[command(subcommand)]
        command: RegistryCommand,
    },
    /// The gateway.
    Gateway {
        #[command(subcommand)]
        command: GatewayCommand,
    },
    /// Append records to a topic: the VALUEs given, or one record per line of stdin.
    Produce(ProduceArgs),
    /// Read records from a topic, optionally following new ones.
    Consume(ConsumeArgs),
    /// Start the whole system locally (registry, log service, gateway, demo
    /// services), supervised, until Ctrl-C.
    Up(crate::up::UpArgs),
    /// Look at and change a replicated log service cluster.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Fault injection: run 3-node log clusters through kills, pauses, network
    /// partitions and damaged files while clients write and read, then check that
    /// nothing acknowledged was lost, duplicated or read stale.
    Chaos {
        #[command(subcommand)]
        command: ChaosCommand,
    },
    /// Run one demo service alone (`keel up` runs them all).
    Demo {
        #[command(subcommand)]
        demo: DemoCommand,
    },
    /// Bearer tokens for servers with an ACL (--acl).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Certificates for TLS.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// GET a URL and exit 0 if it answers 2xx, 1 otherwise (a container's health
    /// check, where there is no curl): e.g. `keel probe http://localhost:20002/readyz`.
    Probe(ProbeArgs),
}

#[derive(Debug, Args)]
struct ProbeArgs {
    /// The URL to GET.
    url: String,
    /// How long to wait for the answer.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    timeout: Duration,
    /// For an https URL: trust this CA (PEM) [default: the platform's roots].
    #[arg(long, env = "KEEL_CA")]
    ca: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Make a development CA and certificates, as PEM files in --out: ca.pem (and
    /// ca.key, to sign more), <node>.pem and <node>.key for each --node (valid for
    /// the node's name, localhost and 127.0.0.1; also good as a client certificate
    /// between nodes), and client.pem and client.key (principal `client`). For a
    /// secure cluster on one machine in a minute; a real deployment brings its own
    /// PKI.
    Dev(CertsDevArgs),
}

#[derive(Debug, clap::Args)]
struct CertsDevArgs {
    /// The directory to write into (made if missing).
    #[arg(long)]
    out: PathBuf,
    /// A node name (a DNS name its certificate is valid for); repeat for each node.
    #[arg(long = "node", required = true)]
    nodes: Vec<String>,
    /// How long the certificates are valid.
    #[arg(long, default_value_t = 365)]
    days: i64,
    /// Replace files that are already there.
    #[arg(long)]
    force: bool,
}

/// TLS for a serving command.
#[derive(Debug, clap::Args)]
struct ServerTlsArgs {
    /// Serve TLS only (gRPC and HTTP alike), with this certificate chain (PEM, leaf
    /// first); needs --tls-key. [default: plaintext]
    #[arg(long, env = "KEEL_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "KEEL_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Ask clients for a certificate and verify it against this CA (PEM): a verified
    /// certificate names its principal (its common name) for the ACL; clients
    /// without one may still call with a token. Cluster nodes present their own
    /// certificates to each other, so they need this set.
    #[arg(long, env = "KEEL_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
}

impl ServerTlsArgs {
    fn files(&self) -> Option<keel_serve::tls::ServerTlsFiles> {
        Some(keel_serve::tls::ServerTlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }
}

/// How a client command reaches a service that has TLS or an ACL.
#[derive(Debug, Clone, clap::Args)]
struct ClientAuthArgs {
    /// Connect with TLS, trusting this CA (PEM) for the service's certificate.
    #[arg(long, env = "KEEL_CA")]
    ca: Option<PathBuf>,
    /// Present this client certificate (PEM; its common name is the principal);
    /// needs --key and --ca.
    #[arg(long, env = "KEEL_CERT", requires_all = ["key", "ca"])]
    cert: Option<PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(long, env = "KEEL_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// Call with this bearer token (`keel token create` makes one).
    #[arg(long, env = "KEEL_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl ClientAuthArgs {
    /// The TLS files to call with, when --ca is given.
    fn tls_files(&self) -> Option<keel_serve::tls::ClientTlsFiles> {
        Some(keel_serve::tls::ClientTlsFiles {
            ca: self.ca.clone()?,
            identity: self.cert.clone().zip(self.key.clone()),
        })
    }
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Make a token for PRINCIPAL: prints the token (shown once, keep it secret) on
    /// stdout, and on stderr the [[token]] entry, holding only its SHA-256, to add
    /// to the ACL file (or adds it itself with --acl). Servers pick the change up
    /// within a second, or at once on SIGHUP. To revoke a token, delete its entry.
    Create(TokenCreateArgs),
}

#[derive(Debug, clap::Args)]
struct TokenCreateArgs {
    /// Who the token names, as ACL rules refer to it (`anonymous` is taken).
    principal: String,
    /// Append the entry to this ACL file instead of printing it.
    #[arg(long)]
    acl: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum ChaosCommand {
    /// Run a schedule of faults against a cluster of this binary's log service;
    /// exits 1 when the checker finds a violation. The history, the faults'
    /// timeline and the verdict go to --dir.
    Run(ChaosArgs),
}

/// Settings of `keel chaos run`.
#[derive(Debug, Args)]
struct ChaosArgs {
    /// The faults, comma-separated, or a kind (process, network, disk), or all.
    /// Process: kill-leader, kill-random, kill-majority, pause-leader. Network:
    /// partition-leader, partition-halves, partition-bridge, partition-one-way,
    /// link-down. Disk (on a stopped follower): torn-tail, corrupt-sealed,
    /// corrupt-active, corrupt-raft-log, corrupt-meta, wipe-data. Each fault runs
    /// against a fresh cluster of its own, at least once, repeated until its share
    /// of --time-limit is up.
    #[arg(long, default_value = "all")]
    nemesis: String,
    /// How long the faults go on in all (shared among them), e.g. 120s.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    time_limit: Duration,
    /// Concurrent appending clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Where the nodes run: namespaces (each node its own network namespace, as
    /// root; partitions possible), loopback (127.0.0.1 ports; network faults
    /// skipped), or auto (namespaces where they can be made).
    #[arg(long, value_enum, default_value_t = ChaosNetwork::Auto)]
    network: ChaosNetwork,
    /// The replicated service under test: log (appends and linearizable reads of a
    /// topic), registry (registrations, deregistrations and `?consistent` lookups),
    /// or all (each fault against each).
    #[arg(long, value_enum, default_value_t = ChaosService::All)]
    service: ChaosService,
    /// The log's clients append without producer ids (plain produces, retried):
    /// a retry may store a value twice, which the run counts but does not fail on.
    /// Without it they append as idempotent producers, and a duplicate fails the run.
    #[arg(long)]
    plain_producers: bool,
    /// Makes the choice of victims and damaged bits repeatable [default: the time].
    #[arg(long)]
    seed: Option<u64>,
    /// Where the runs keep the nodes' data, the histories, the verdicts and the
    /// summary table.
    #[arg(long, default_value = "target/chaos")]
    dir: PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ChaosService {
    Log,
    Registry,
    All,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ChaosNetwork {
    Auto,
    Namespaces,
    Loopback,
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Members, voters and learners, the leader, the term, the commit and applied
    /// index, and how far each member lags the leader.
    Status(ClusterArgs),
    /// Add a node started with --node-id alone (one started with --join adds
    /// itself): as a learner until it has caught up, then (unless --learner) as a
    /// voter.
    AddNode(AddNodeArgs),
    /// Remove a node, voter or learner. A removed node cannot come back under its
    /// id with its old data; wipe it and add it under a new id.
    RemoveNode(RemoveNodeArgs),
}

/// Where the cluster is.
#[derive(Debug, Args)]
struct ClusterArgs {
    /// Any of the cluster's nodes, log service or registry (several,
    /// comma-separated: the first that answers).
    #[arg(long, env = "KEEL_LOG_ADDR", default_value = DEFAULT_LOG_ADDR)]
    addr: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// The cluster runs TLS: trust this CA (PEM).
    #[arg(long, env = "KEEL_CA")]
    ca: Option<PathBuf>,
    /// The client certificate to call with (PEM); a cluster on TLS asks for one.
    /// With an ACL, its principal needs `admin` on the cluster.
    #[arg(long, env = "KEEL_CERT", requires_all = ["key", "ca"])]
    cert: Option<PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(long, env = "KEEL_KEY", requires = "cert")]
    key: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct AddNodeArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// The new node's id.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    node_id: u64,
    /// The new node's address (its --advertise or --addr).
    #[arg(long)]
    node_addr: String,
    /// Keep it a learner: it replicates but does not vote.
    #[arg(long)]
    learner: bool,
}

#[derive(Debug, Args)]
struct RemoveNodeArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// The node to remove.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    node_id: u64,
}

#[derive(Debug, Subcommand)]
enum DemoCommand {
    /// GET / counts a visit (shared through the log service's `visits` topic).
    Visit(DemoArgs),
    /// Students and grades: GET /students, POST /students/{id}/grades. Grades are
    /// events in the log service's `grading` topic; each instance serves them from
    /// a SQLite view of its own, and is ready once that view has caught up.
    Grading(DemoArgs),
    /// A web page: students, a grade form, the registry's table, recent log lines.
    Portal(DemoArgs),
}

/// Settings of a demo service.
#[derive(Debug, Args)]
struct DemoArgs {
    /// Address to listen on [default: visit 127.0.0.1:20003, grading :20004,
    /// portal :20005]; port 0 picks a free one.
    #[arg(long)]
    addr: Option<String>,
    /// The registry's URL, or a registry cluster's nodes, comma-separated.
    #[arg(
        long,
        env = "KEEL_REGISTRY_URL",
        default_value = "http://127.0.0.1:20000"
    )]
    registry: String,
    /// Where grading keeps its view of the `grading` topic, a SQLite file of its
    /// own (<INSTANCE>.sqlite3); rebuilt from the topic when missing or damaged.
    #[arg(long, default_value = "keel-data/grading")]
    data_dir: PathBuf,
    /// This instance's name, which names its files: keep it across restarts and
    /// give each instance sharing --data-dir its own [default: the host's name].
    #[arg(long, env = "KEEL_INSTANCE")]
    instance: Option<String>,
    /// How to call the registry and the log service: with TLS (--ca, and --cert
    /// and --key for a certificate naming the service), and with a bearer token
    /// when they have an ACL.
    #[command(flatten)]
    auth: ClientAuthArgs,
    /// Serve TLS (the instance registers an https URL).
    #[command(flatten)]
    tls: ServerTlsArgs,
    /// The host:port others reach this instance at [default: the bound address];
    /// set it when listening on 0.0.0.0 (in a container, its service name and port).
    #[arg(long, env = "KEEL_ADVERTISE")]
    advertise: Option<String>,
}

#[derive(Debug, Subcommand)]
enum LogCommand {
    /// Run the log service: gRPC (log.v1.Log) and HTTP/JSON on one address.
    Serve(Box<ServeArgs>),
    /// Cut a corrupt topic at its first damaged record, so that the service can
    /// open it again. Run it only with the service stopped, on a topic the service
    /// reports `topic_unavailable` because of corrupt data: the damaged record and
    /// every later one are dropped, and their offsets will be handed out again.
    /// Prints what was cut. Copy the topic's directory first to keep the evidence.
    Repair(RepairArgs),
}

/// Settings of `keel log repair`.
#[derive(Debug, Args)]
struct RepairArgs {
    /// The log service's data directory (the one `keel log serve` runs with).
    #[arg(long, env = "KEEL_LOG_DATA_DIR", default_value = "keel-data/log")]
    data_dir: PathBuf,
    /// The topic to repair.
    #[arg(long)]
    topic: String,
}

/// Settings of `keel log serve`. Each flag overrides the config file and has a
/// `KEEL_LOG_*` environment variable; unset, the file's value or the default holds.
#[derive(Debug, Args)]
struct ServeArgs {
    /// A TOML config file; its [log] section holds the service settings
    /// (see docs/configuration.md).
    #[arg(long, env = "KEEL_CONFIG")]
    config: Option<PathBuf>,
    /// Where topics are stored [default: keel-data/log].
    #[arg(long, env = "KEEL_LOG_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address for gRPC and HTTP [default: 127.0.0.1:20002]; port 0 picks a free one.
    #[arg(long, env = "KEEL_LOG_ADDR")]
    addr: Option<String>,
    /// When appends are forced to disk: always (acknowledge after fsync), interval:DURATION
    /// (e.g. interval:10ms), or never [default: always].
    #[arg(long, env = "KEEL_LOG_SYNC", value_parser = SyncPolicy::from_str)]
    sync: Option<SyncPolicy>,
    /// Largest record accepted, e.g. 1MiB [default: 1MiB].
    #[arg(long, env = "KEEL_LOG_MAX_RECORD_BYTES", value_parser = parse_size)]
    max_record_bytes: Option<u64>,
    /// Segment file size at which a topic's log rolls, e.g. 256MiB [default: 256MiB].
    #[arg(long, env = "KEEL_LOG_SEGMENT_BYTES", value_parser = parse_size)]
    segment_bytes: Option<u64>,
    /// Drop a topic's oldest segments while it is larger than this, e.g. 10GiB.
    #[arg(long, env = "KEEL_LOG_RETENTION_BYTES", value_parser = parse_size)]
    retention_bytes: Option<u64>,
    /// Drop segments whose newest record is older than this, e.g. 7days.
    #[arg(long, env = "KEEL_LOG_RETENTION_AGE", value_parser = parse_duration)]
    retention_age: Option<Duration>,
    /// Refuse writes to topics that do not exist yet (NOT_FOUND / 404).
    #[arg(long, env = "KEEL_LOG_NO_AUTO_CREATE")]
    no_auto_create: bool,
    /// Serving threads, each driving its own connections [default: 0, one per core].
    #[arg(long, env = "KEEL_LOG_WORKERS")]
    workers: Option<usize>,
    /// An ACL file (TOML; see docs/security.md): who may produce to, consume from
    /// and manage which topics, and with what tokens. Deny by default once given;
    /// reloaded on SIGHUP and when the file changes. [default: none, everyone may
    /// do everything]
    #[arg(long, env = "KEEL_LOG_ACL")]
    acl: Option<PathBuf>,
    #[command(flatten)]
    tls: ServerTlsArgs,
    /// Register with this registry (e.g. http://127.0.0.1:20000, or a registry
    /// cluster's nodes, comma-separated) as service `log`, so services that require
    /// `log` find it; checked through /healthz.
    #[arg(long, env = "KEEL_LOG_REGISTRY")]
    registry: Option<String>,
    /// The bearer token to register with, when the registry has an ACL (its
    /// principal needs `register`, `deregister` and `read` on the service `log`,
    /// and `read` on `*`, to watch the table).
    #[arg(
        long,
        env = "KEEL_LOG_REGISTRY_TOKEN",
        hide_env_values = true,
        requires = "registry"
    )]
    registry_token: Option<String>,
    /// Trust this CA (PEM) for an `https` registry's certificate.
    #[arg(long, env = "KEEL_LOG_REGISTRY_CA", requires = "registry")]
    registry_ca: Option<PathBuf>,
    /// Run as node N of a replicated cluster: with --peers or --join, or alone to
    /// wait until `keel cluster add-node` adds it. Ids are unique and never reused:
    /// a node that lost its data rejoins under a new id. `from-hostname`: one more
    /// than the number that ends the host name (a StatefulSet's pod `keel-log-2`
    /// is node 3).
    #[arg(long, env = "KEEL_LOG_NODE_ID", value_parser = parse_node_id)]
    node_id: Option<u64>,
    /// Form a cluster of these nodes: ID=HOST:PORT,... with this node among them.
    /// Give every node the same list; start them in any order.
    #[arg(
        long,
        env = "KEEL_LOG_PEERS",
        conflicts_with = "join",
        requires = "node_id"
    )]
    peers: Option<String>,
    /// Join the running cluster that has a member at HOST:PORT: this node is added
    /// once it has caught up (through a snapshot of the topics' files if needed).
    #[arg(long, env = "KEEL_LOG_JOIN", requires = "node_id")]
    join: Option<String>,
    /// The address other nodes and clients reach this node at [default: the one in
    /// --peers, else --addr]; set it when listening on 0.0.0.0.
    #[arg(long, env = "KEEL_LOG_ADVERTISE")]
    advertise: Option<String>,
    /// A cluster node checkpoints its state and trims its Raft log after this many
    /// entries.
    #[arg(long, env = "KEEL_LOG_SNAPSHOT_EVERY", default_value_t = keel_raft::NodeSettings::default().snapshot_every, value_parser = clap::value_parser!(u64).range(1..))]
    snapshot_every: u64,
}

#[derive(Debug, Subcommand)]
enum RegistryCommand {
    /// Run the registry: registration (both original dialects), health checks,
    /// discovery, dependency notifications and watches, over HTTP/JSON.
    Serve(RegistryServeArgs),
}

/// Settings of `keel registry serve`. Each flag overrides the config file's
/// [registry] section and has a `KEEL_REGISTRY_*` environment variable.
#[derive(Debug, Args)]
struct RegistryServeArgs {
    /// A TOML config file; its [registry] section holds the settings.
    #[arg(long, env = "KEEL_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:20000]; port 0 picks a free one.
    #[arg(long, env = "KEEL_REGISTRY_ADDR")]
    addr: Option<String>,
    /// How often each instance's heartbeat URL is checked [default: 30s].
    #[arg(long, env = "KEEL_REGISTRY_CHECK_INTERVAL", value_parser = parse_duration)]
    check_interval: Option<Duration>,
    /// How long one check attempt may take [default: 2s].
    #[arg(long, env = "KEEL_REGISTRY_CHECK_TIMEOUT", value_parser = parse_duration)]
    check_timeout: Option<Duration>,
    /// Consecutive failed attempts (1s apart) that make an instance critical [default: 3].
    #[arg(long, env = "KEEL_REGISTRY_CHECK_FAILURES")]
    check_failures: Option<u32>,
    /// How long an instance may stay critical before it is removed [default: 60s].
    #[arg(long, env = "KEEL_REGISTRY_DEREGISTER_AFTER", value_parser = parse_duration)]
    deregister_after: Option<Duration>,
    /// The only addresses instances may register, and so the only ones health checks
    /// and notifications reach: NET[:PORTS],... where NET is an address, a CIDR block
    /// ([v6/len] with ports), `loopback` or `any`, and PORTS a port or a range such
    /// as 8000-8999. Names are resolved at registration and again at each connection.
    /// [default: any address]
    #[arg(long, env = "KEEL_REGISTRY_ALLOW_TARGETS")]
    allow_targets: Option<keel_auth::AllowTargets>,
    /// An ACL file (TOML; see docs/security.md): who may register, deregister and
    /// read which services, and with what tokens. Deny by default once given;
    /// reloaded on SIGHUP and when the file changes. [default: none, everyone may
    /// do everything]
    #[arg(long, env = "KEEL_REGISTRY_ACL")]
    acl: Option<PathBuf>,
    #[command(flatten)]
    tls: ServerTlsArgs,
    /// Trust this CA (PEM) for `https` instances' certificates, in health checks
    /// and notifications [default: the platform's roots].
    #[arg(long, env = "KEEL_REGISTRY_INSTANCES_CA")]
    instances_ca: Option<PathBuf>,
    /// Where a cluster node keeps its Raft log and snapshots [default:
    /// keel-data/registry]. A single registry keeps nothing on disk.
    #[arg(long, env = "KEEL_REGISTRY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Run as node N of a replicated registry: with --peers or --join, or alone to
    /// wait until `keel cluster add-node` adds it. Ids are unique and never reused:
    /// a node that lost its data rejoins under a new id. `from-hostname`: one more
    /// than the number that ends the host name (a StatefulSet's pod `keel-log-2`
    /// is node 3).
    #[arg(long, env = "KEEL_REGISTRY_NODE_ID", value_parser = parse_node_id)]
    node_id: Option<u64>,
    /// Form a cluster of these nodes: ID=HOST:PORT,... with this node among them.
    /// Give every node the same list; start them in any order.
    #[arg(
        long,
        env = "KEEL_REGISTRY_PEERS",
        conflicts_with = "join",
        requires = "node_id"
    )]
    peers: Option<String>,
    /// Join the running registry cluster that has a member at HOST:PORT.
    #[arg(long, env = "KEEL_REGISTRY_JOIN", requires = "node_id")]
    join: Option<String>,
    /// The address other nodes reach this node at [default: the one in --peers,
    /// else --addr]; set it when listening on 0.0.0.0.
    #[arg(long, env = "KEEL_REGISTRY_ADVERTISE")]
    advertise: Option<String>,
    /// A cluster node checkpoints its state and trims its Raft log after this many
    /// entries.
    #[arg(long, env = "KEEL_REGISTRY_SNAPSHOT_EVERY", default_value_t = keel_raft::NodeSettings::default().snapshot_every, value_parser = clap::value_parser!(u64).range(1..))]
    snapshot_every: u64,
}

/// A node id: a number from 1, or `from-hostname`.
fn parse_node_id(text: &str) -> Result<u64, String> {
    if text == "from-hostname" {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::env::var("HOSTNAME"))
            .map_err(|_| "the host name cannot be read".to_owned())?;
        return node_id_of_hostname(hostname.trim());
    }
    match text.parse::<u64>() {
        Ok(id) if id >= 1 => Ok(id),
        _ => Err(format!(
            "{text:?}: a node id is a number from 1, or from-hostname"
        )),
    }
}

/// One more than the ordinal that ends `hostname` (`keel-log-0` is node 1).
fn node_id_of_hostname(hostname: &str) -> Result<u64, String> {
    hostname
        .rsplit_once('-')
        .and_then(|(_, ordinal)| ordinal.parse::<u64>().ok())
        .and_then(|ordinal| ordinal.checked_add(1))
        .ok_or_else(|| {
            format!(
                "the host name {hostname:?} does not end in -<ordinal> (as a StatefulSet's pods do)"
            )
        })
}

/// The cluster flags of a serving command, whichever service it serves.
struct NodeFlags<'a> {
    node_id: Option<u64>,
    peers: Option<&'a String>,
    join: Option<&'a String>,
    advertise: Option<&'a String>,
    snapshot_every: u64,
    tls: &'a ServerTlsArgs,
    acl: Option<&'a PathBuf>,
}

impl ServeArgs {
    fn node_flags(&self) -> NodeFlags<'_> {
        NodeFlags {
            node_id: self.node_id,
            peers: self.peers.as_ref(),
            join: self.join.as_ref(),
            advertise: self.advertise.as_ref(),
            snapshot_every: self.snapshot_every,
            tls: &self.tls,
            acl: self.acl.as_ref(),
        }
    }
}

impl RegistryServeArgs {
    fn node_flags(&self) -> NodeFlags<'_> {
        NodeFlags {
            node_id: self.node_id,
            peers: self.peers.as_ref(),
            join: self.join.as_ref(),
            advertise: self.advertise.as_ref(),
            snapshot_every: self.snapshot_every,
            tls: &self.tls,
            acl: self.acl.as_ref(),
        }
    }
}

#[derive(Debug, Subcommand)]
enum GatewayCommand {
    /// Run the gateway: routes /{service}/... to healthy instances found through the
    /// registry, with load balancing and failover.
    Serve(GatewayServeArgs),
}

/// Settings of `keel gateway serve`. Each flag overrides the config file's [gateway]
/// section and has a `KEEL_GATEWAY_*` environment variable.
#[derive(Debug, Args)]
struct GatewayServeArgs {
    /// A TOML config file; its [gateway] section holds the settings.
    #[arg(long, env = "KEEL_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:20001]; port 0 picks a free one.
    #[arg(long, env = "KEEL_GATEWAY_ADDR")]
    addr: Option<String>,
    /// Address of /healthz and /metrics [default: 127.0.0.1:0, printed at start].
    #[arg(long, env = "KEEL_GATEWAY_ADMIN_ADDR", default_value = "127.0.0.1:0")]
    admin_addr: String,
    /// The registry's URL, or a registry cluster's nodes, comma-separated
    /// [default: http://127.0.0.1:20000].
    #[arg(long, env = "KEEL_GATEWAY_REGISTRY")]
    registry: Option<String>,
    /// How to call the registry and the log service: with TLS (--ca, and --cert
    /// and --key to present a certificate), and with a bearer token to read the
    /// registry when it has an ACL (the token's principal needs `read` on `*`).
    #[command(flatten)]
    auth: ClientAuthArgs,
    #[command(flatten)]
    tls: ServerTlsArgs,
    /// How long an upstream may take to answer before 504 [default: 30s].
    #[arg(long, env = "KEEL_GATEWAY_REQUEST_TIMEOUT", value_parser = parse_duration)]
    request_timeout: Option<Duration>,
    /// A service whose /{service} prefix is removed before forwarding (repeatable);
    /// the instance is told it in X-Forwarded-Prefix.
    #[arg(long, value_name = "SERVICE")]
    strip_prefix: Vec<String>,
    /// The log service's URL, or a log cluster's nodes, comma-separated, for the
    /// access log (topic `access`).
    #[arg(long, env = "KEEL_GATEWAY_LOG_SERVICE")]
    log_service: Option<String>,
    /// The bearer token to ship the access log with, when the log service has an
    /// ACL (the token's principal needs `produce` on the topic `access`).
    #[arg(
        long,
        env = "KEEL_GATEWAY_LOG_SERVICE_TOKEN",
        hide_env_values = true,
        requires = "log_service"
    )]
    log_service_token: Option<String>,
}

#[derive(Debug, Args)]
struct ProduceArgs {
    /// The log service (a cluster's nodes, comma-separated: writes go to the
    /// leader, and follow it when it changes).
    #[arg(long, env = "KEEL_LOG_ADDR", default_value = DEFAULT_LOG_ADDR)]
    addr: String,
    #[command(flatten)]
    auth: ClientAuthArgs,
    /// The topic [default: the service's default topic].
    #[arg(long, short, default_value = "")]
    topic: String,
    /// Lines of stdin sent per batch.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Values to append, one record each; without any, stdin is read line by line.
    values: Vec<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    /// The value as text, one record per line.
    Text,
    /// One JSON object per line: offset, timestamp_ms, value (base64).
    Json,
}

#[derive(Debug, Args)]
struct ConsumeArgs {
    /// The log service (a cluster's nodes, comma-separated).
    #[arg(long, env = "KEEL_LOG_ADDR", default_value = DEFAULT_LOG_ADDR)]
    addr: String,
    #[command(flatten)]
    auth: ClientAuthArgs,
    /// The topic [default: the service's default topic].
    #[arg(long, short, default_value = "")]
    topic: String,
    /// The first offset to read.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Keep reading new records as they are appended, until Ctrl-C.
    #[arg(long, short)]
    follow: bool,
    /// Stop after this many records.
    #[arg(long)]
    max: Option<u64>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

/// Installs the log subscriber: `filter` is a level or a RUST_LOG directive; RUST_LOG
/// wins when set.
pub fn init_tracing(filter: &str) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_owned());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs a parsed command line and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("keel: cannot start the async runtime: {err}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    // Servers run as tasks on the worker threads: a future driven by `block_on`
    // itself runs on the main thread, outside the work-stealing pool, and would
    // serialize their work there. The CLI commands hold stdio locks and stay put.
    let log_level = cli.log_level;
    let result = runtime.block_on(async move {
        let server = match cli.command {
            Command::Log {
                command: LogCommand::Serve(args),
            } => tokio::spawn(serve(*args)),
            Command::Log {
                command: LogCommand::Repair(args),
            } => return repair(&args).map_err(Failure::Run),
            Command::Registry {
                command: RegistryCommand::Serve(args),
            } => tokio::spawn(serve_registry(args)),
            Command::Gateway {
                command: GatewayCommand::Serve(args),
            } => tokio::spawn(serve_gateway(args)),
            Command::Up(args) => {
                return crate::up::up(args, &log_level, shutdown())
                    .await
                    .map_err(Failure::Run);
            }
            Command::Demo { demo } => tokio::spawn(serve_demo(demo)),
            Command::Produce(args) => return produce(args).await.map_err(Failure::Run),
            Command::Cluster { command } => {
                return cluster::run(command).await.map_err(Failure::Run);
            }
            Command::Chaos {
                command: ChaosCommand::Run(args),
            } => return chaos::run(args).await,
            Command::Consume(args) => return consume(args).await.map_err(Failure::Run),
            Command::Token {
                command: TokenCommand::Create(args),
            } => {
                check_principal(&args.principal).map_err(Failure::Config)?;
                return create_token(&args).map_err(Failure::Run);
            }
            Command::Certs {
                command: CertsCommand::Dev(args),
            } => {
                check_dev_certs(&args).map_err(Failure::Config)?;
                return dev_certs(&args).map_err(Failure::Run);
            }
            Command::Probe(args) => return probe(&args).await.map_err(Failure::Run),
        };
        server.await.unwrap_or_else(|err| {
            Err(Failure::Run(anyhow::anyhow!(
                "the server task failed: {err}"
            )))
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(err)) => {
            eprintln!("keel: invalid configuration: {}", report(&err));
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Failure::Run(err)) => {
            eprintln!("keel: {}", report(&err));
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// `keel probe`: fails unless `args.url` answers 2xx in time.
async fn probe(args: &ProbeArgs) -> anyhow::Result<()> {
    let files = args
        .ca
        .clone()
        .map(|ca| keel_serve::tls::ClientTlsFiles { ca, identity: None });
    let client = keel_serve::client::with_tls(keel_serve::client::builder(), files.as_ref())?
        .timeout(args.timeout)
        .build()?;
    let response = client
        .get(&args.url)
        .send()
        .await
        .map_err(|err| anyhow::anyhow!("{}: {err}", args.url))?;
    let status = response.status();
    anyhow::ensure!(status.is_success(), "{}: {status}", args.url);
    println!("{}: {status}", args.url);
    Ok(())
}

/// `keel log repair`: cuts a topic at its first damage and says what was cut.
fn repair(args: &RepairArgs) -> anyhow::Result<()> {
    let report = keel_log::repair_topic(&args.data_dir, &args.topic).map_err(|err| match err {
        keel_log::LogServiceError::UnknownTopic { topic } => anyhow::anyhow!(
            "no topic {topic:?} under {}: is --data-dir the one the service runs with?",
            args.data_dir.join("topics").display()
        ),
        other => other.into(),
    })?;
    if report.truncations.is_empty() && report.removed_files.is_empty() {
        println!("topic {}: no damage found; nothing was cut", args.topic);
    }
    for cut in &report.truncations {
        println!(
            "topic {}: cut {} at byte {} ({} bytes: {}); the topic now ends before offset {}",
            args.topic,
            cut.path.display(),
            cut.position,
            cut.bytes_cut,
            cut.reason,
            cut.next_offset
        );
    }
    for path in &report.removed_files {
        println!("topic {}: removed {}", args.topic, path.display());
    }
    Ok(())
}

/// An error and its causes on one line, leaving out a cause its parent's message
/// already includes.
fn report(err: &anyhow::Error) -> String {
    let mut line = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}

enum Failure {
    Config(anyhow::Error),
    Run(anyhow::Error),
}

/// Refuses a principal name an ACL file could not hold as written.
fn check_principal(principal: &str) -> anyhow::Result<()> {
    if principal.is_empty()
        || principal == keel_auth::ANONYMOUS
        || principal
            .chars()
            .any(|c| c.is_control() || c == '"' || c == '\\')
    {
        anyhow::bail!(
            "principal {principal:?}: give a name of printable characters, without quotes or backslashes, other than {:?}",
            keel_auth::ANONYMOUS
        );
    }
    Ok(())
}

/// `keel token create`: a new token for a principal, and its ACL entry.
fn create_token(args: &TokenCreateArgs) -> anyhow::Result<()> {
    use std::io::Write;

    use anyhow::Context;

    let token = keel_auth::token::generate()
        .map_err(|_| anyhow::anyhow!("the system's random source failed"))?;
    let entry = format!("\n{}", keel_auth::token::acl_entry(&args.principal, &token));
    match &args.acl {
        Some(path) => {
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(path)
                .with_context(|| format!("opening the ACL file {}", path.display()))?;
            file.write_all(entry.as_bytes())
                .with_context(|| format!("writing to {}", path.display()))?;
            eprintln!(
                "added a token for {:?} to {}; servers using it pick it up within a second",
                args.principal,
                path.display()
            );
        }
        None => eprintln!("add to the ACL file:{entry}"),
    }
    println!("{token}");
    Ok(())
}

/// Refuses what `keel certs dev` cannot make: a bad validity, a bad node name.
fn check_dev_certs(args: &CertsDevArgs) -> anyhow::Result<()> {
    if args.days < 1 {
        anyhow::bail!("--days must be at least 1");
    }
    for node in &args.nodes {
        let valid = !node.is_empty()
            && node.len() <= 253
            && node
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !valid || node == "ca" || node == "client" {
            anyhow::bail!(
                "--node {node:?}: a node name is a DNS name (letters, digits, '-', '.'), and not `ca` or `client`"
            );
        }
    }
    Ok(())
}

/// `keel certs dev`: a development CA, node certificates and a client certificate.
fn dev_certs(args: &CertsDevArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    use keel_auth::mint::{Ca, Leaf};

    std::fs::create_dir_all(&args.out).with_context(|| format!("making {}", args.out.display()))?;
    let ca = Ca::new("keel development CA", args.days)?;
    let mut files: Vec<(String, String, bool)> = vec![
        ("ca.pem".into(), ca.cert_pem(), false),
        ("ca.key".into(), ca.key_pem().to_owned(), true),
    ];
    for node in &args.nodes {
        let minted = ca.sign(&Leaf::node(node, args.days))?;
        files.push((format!("{node}.pem"), minted.cert_pem, false));
        files.push((format!("{node}.key"), minted.key_pem, true));
    }
    let client = ca.sign(&Leaf::client("client", args.days))?;
    files.push(("client.pem".into(), client.cert_pem, false));
    files.push(("client.key".into(), client.key_pem, true));
    if !args.force
        && let Some((name, ..)) = files.iter().find(|(name, ..)| args.out.join(name).exists())
    {
        anyhow::bail!(
            "{} exists already: choose another --out, or replace it with --force",
            args.out.join(name).display()
        );
    }
    for (name, text, secret) in &files {
        let path = args.out.join(name);
        write_file(&path, text.as_bytes(), *secret)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "wrote {} files to {}: ca.pem, {}, client.pem (principal \"client\"), and their keys",
        files.len(),
        args.out.display(),
        args.nodes
            .iter()
            .map(|node| format!("{node}.pem"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// Writes `bytes` to `path`, readable by its owner only when `secret`.
pub(crate) fn write_file(
    path: &std::path::Path,
    bytes: &[u8],
    secret: bool,
) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;

    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(if secret { 0o600 } else { 0o644 });
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_id_should_come_from_a_number_or_a_statefulset_pod_name() {
        assert_eq!(parse_node_id("3"), Ok(3));
        assert!(parse_node_id("0").is_err());
        assert!(parse_node_id("three").is_err());
        assert_eq!(node_id_of_hostname("keel-log-0"), Ok(1));
        assert_eq!(node_id_of_hostname("keel-registry-2"), Ok(3));
        let err = node_id_of_hostname("laptop").unwrap_err();
        assert!(err.contains("-<ordinal>"), "{err}");
    }
}
