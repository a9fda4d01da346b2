//! `keel up`: the whole system on loopback, supervised.
//!
//! Each part is a child process running this same binary (`keel registry serve`,
//! `keel log serve`, `keel gateway serve`, `keel demo ...`), started in dependency
//! order. A part is up once it has printed its address and answers its health
//! check (and, for a registered service, once the registry lists it). A part that
//! exits is reported and restarted on the same address with backoff. On Ctrl-C the
//! parts stop in reverse order, each with SIGTERM and a grace period: the gateway
//! first, then the demos and the log service (each deregisters, then drains), the
//! registry last.
//!
//! With `--cluster N`, every stateful part is replicated: N registry nodes and N log
//! nodes (Raft, each with its own data directory under `cluster/`), two gateways
//! behind a front door on the gateway port (a TCP balancer in this process), and two
//! instances of each demo. Every part is given every registry node and every log
//! node, so any one process can be killed and the rest carry on while it restarts.
//!
//! No orphans: the children run in their own process group (a terminal's Ctrl-C
//! reaches only `keel up`, which stops them in order) and exit by themselves when
//! their stdin, a pipe from `keel up`, closes, which happens however `keel up`
//! ends, even by SIGKILL.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use keel_demo::Demo;
use tokio::process::{Child, ChildStdin};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use cluster::Cluster;
use supervisor::{Starter, stop_all, supervise};

mod cluster;
mod front;
mod secure;
mod supervisor;

/// The environment variable that tells a part it runs under `keel up`: it also stops
/// when its stdin closes.
pub const SUPERVISED_ENV: &str = "KEEL_SUPERVISED";

/// How long a part may take to print its address and pass its health check.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest wait before restarting a part that keeps failing.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A part that ran this long before exiting is restarted without delay growth.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// Failed restarts in a row after which a part is given up.
const MAX_FAILED_STARTS: u32 = 5;
/// The most instances of one demo.
const MAX_INSTANCES: usize = 16;

/// Settings of `keel up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where every part keeps its data: log/ (topics), grading/ (SQLite),
    /// up-logs/ (each part's own log file).
    #[arg(long, env = "KEEL_DATA_DIR", default_value = "keel-data")]
    data_dir: PathBuf,
    /// Start empty: delete the data the parts keep under --data-dir (log/, grading/,
    /// cluster/, up-logs/, secure/) first.
    #[arg(long)]
    fresh: bool,
    /// Run the system highly available: N registry nodes and N log nodes, each a
    /// Raft cluster (N is 3 or 5; data under --data-dir/cluster/), two gateways
    /// behind the gateway port, and two instances of each demo (unless --instances
    /// says otherwise). Kill any one process: the rest carry on while it restarts.
    #[arg(long, value_name = "N", value_parser = parse_cluster)]
    cluster: Option<usize>,
    /// How many instances of a demo service to run, e.g. visit=3 (repeatable).
    /// Extra instances listen on free ports.
    #[arg(long = "instances", value_name = "SERVICE=N", value_parser = parse_instances)]
    instances: Vec<(Demo, usize)>,
    /// TLS on the registry, the log service and the gateway, mutual TLS between
    /// cluster nodes, and an ACL: a development CA and certificates are made in
    /// --data-dir/secure/ (and kept), with a client certificate for you
    /// (principal `client`, allowed everything). Prints how to call it with curl.
    #[arg(long)]
    secure: bool,
    /// The registry's port; 0 picks a free one.
    #[arg(long, default_value_t = 20000)]
    registry_port: u16,
    /// The gateway's port; 0 picks a free one.
    #[arg(long, default_value_t = 20001)]
    gateway_port: u16,
    /// The log service's port; 0 picks a free one.
    #[arg(long, default_value_t = 20002)]
    log_port: u16,
    /// The first visit instance's port; 0 picks a free one.
    #[arg(long, default_value_t = 20003)]
    visit_port: u16,
    /// The first grading instance's port; 0 picks a free one.
    #[arg(long, default_value_t = 20004)]
    grading_port: u16,
    /// The first portal instance's port; 0 picks a free one.
    #[arg(long, default_value_t = 20005)]
    portal_port: u16,
    /// How long each part may take to stop before it is killed (more than 0s).
    #[arg(long, default_value = "10s", value_parser = parse_grace)]
    grace: Duration,
}

/// A grace period: a duration longer than zero, since a part given none is killed
/// before it can deregister or sync its data.
fn parse_grace(text: &str) -> Result<Duration, String> {
    let grace = crate::values::parse_duration(text)?;
    if grace.is_zero() {
        return Err("a grace of 0s would kill every part before it deregisters and syncs; give at least e.g. 1s".into());
    }
    Ok(grace)
}

/// A cluster size: an odd number that survives the loss of a node.
fn parse_cluster(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n @ (3 | 5)) => Ok(n),
        _ => Err(format!(
            "a cluster is 3 nodes (survives one loss) or 5 (survives two), got {text:?}"
        )),
    }
}

fn parse_instances(text: &str) -> Result<(Demo, usize), String> {
    let (name, count) = text
        .split_once('=')
        .ok_or_else(|| format!("expected SERVICE=N, e.g. visit=3, got {text:?}"))?;
    let demo = Demo::ALL
        .into_iter()
        .find(|d| d.name() == name)
        .ok_or_else(|| format!("no demo service {name:?}: visit, grading or portal"))?;
    match count.parse::<usize>() {
        Ok(n) if (1..=MAX_INSTANCES).contains(&n) => Ok((demo, n)),
        _ => Err(format!("N must be 1 to {MAX_INSTANCES}, got {count:?}")),
    }
}

/// What a part is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Registry,
    Log,
    Gateway,
    Demo(Demo),
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Registry => "registry",
            Self::Log => "log",
            Self::Gateway => "gateway",
            Self::Demo(demo) => demo.name(),
        }
    }
}

/// A part as started: how to start it again, and where it answers.
#[derive(Debug, Clone)]
struct Spec {
    label: String,
    kind: Kind,
    /// Arguments after the binary, without `--addr`.
    args: Vec<String>,
    /// Where it listens: the requested address at first, the bound one after.
    addr: String,
    log_file: PathBuf,
}

/// Where a running part answers.
#[derive(Debug, Clone, Copy)]
struct Bound {
    addr: SocketAddr,
    admin: Option<SocketAddr>,
}

/// A running child and the pipe whose closing stops it.
struct Running {
    child: Child,
    _stdin: Option<ChildStdin>,
    bound: Bound,
    /// It kept failing to start and is no longer restarted.
    given_up: bool,
}

/// Runs `keel up` until `shutdown` completes.
///
/// # Errors
///
/// A port is in use, a part fails to start, or a part failed to stop cleanly.
pub async fn up(
    args: UpArgs,
    log_level: &str,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the keel binary")?;
    let data_dir = args.data_dir.clone();
    if args.fresh {
        for sub in ["log", "grading", "cluster", "up-logs", "secure"] {
            let path = data_dir.join(sub);
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    return Err(err).with_context(|| format!("removing {}", path.display()));
                }
            }
        }
    }
    let logs_dir = data_dir.join("up-logs");
    std::fs::create_dir_all(&logs_dir)
        .with_context(|| format!("creating {}", logs_dir.display()))?;
    check_ports(&args)?;

    let secure = if args.secure {
        Some(secure::Secure::prepare(&data_dir.join("secure"))?)
    } else {
        None
    };
    let client_tls = secure.as_ref().map(secure::Secure::client_tls);
    let http = keel_serve::client::with_tls(keel_serve::client::builder(), client_tls.as_ref())?
        .timeout(Duration::from_secs(2))
        .build()
        .context("building the HTTP client")?;
    let starter = Starter {
        exe,
        log_level: log_level.to_owned(),
        http,
        registry: String::new(),
        secure,
    };
    let stop = CancellationToken::new();
    let mut parts: Vec<(Spec, Running)> = Vec::new();
    let mut front = None;
    let started = match args.cluster {
        None => start_all(&args, &data_dir, &logs_dir, starter, &mut parts).await,
        Some(nodes) => {
            let cluster = Cluster {
                nodes,
                args: &args,
                data_dir: &data_dir,
                logs_dir: &logs_dir,
            };
            cluster.start(starter, &mut parts, &stop, &mut front).await
        }
    };
    let starter = match started {
        Ok(starter) => starter,
        Err(err) => {
            eprintln!("keel up: {err:#}; stopping what started");
            stop.cancel();
            stop_all(parts, args.grace).await;
            return Err(err);
        }
    };
    let roles = roles(&parts, client_tls.as_ref()).await;
    println!(
        "{}",
        table(
            &parts,
            &data_dir,
            front.as_ref(),
            &roles,
            starter.secure.as_ref()
        )
    );

    // Supervise until shutdown, then stop in reverse start order.
    let supervisors: Vec<JoinHandle<(Spec, Running)>> = parts
        .into_iter()
        .map(|(spec, running)| {
            tokio::spawn(supervise(spec, running, starter.clone(), stop.clone()))
        })
        .collect();
    shutdown.await;
    eprintln!("keel up: stopping");
    stop.cancel();
    if let Some(front) = front {
        let _ = front.task.await;
    }
    let mut parts = Vec::new();
    for supervisor in supervisors {
        match supervisor.await {
            Ok(part) => parts.push(part),
            Err(err) => eprintln!("keel up: a supervisor failed: {err}"),
        }
    }
    if stop_all(parts, args.grace).await {
        eprintln!("keel up: stopped");
        Ok(())
    } else {
        bail!("some parts did not stop cleanly (see above)")
    }
}

/// Fails naming the flag when a fixed port is taken, before anything starts.
fn check_ports(args: &UpArgs) -> anyhow::Result<()> {
    let fixed = [
        ("registry", args.registry_port),
        ("gateway", args.gateway_port),
        ("log", args.log_port),
        ("visit", args.visit_port),
        ("grading", args.grading_port),
        ("portal", args.portal_port),
    ];
    let mut seen = BTreeMap::new();
    for (part, port) in fixed {
        if port == 0 {
            continue;
        }
        if let Some(other) = seen.insert(port, part) {
            bail!("port {port} is given to both {other} and {part}: change one with --{part}-port");
        }
        if let Err(err) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            bail!(
                "port {port} ({part}) is not available ({err}): stop what uses it, or choose another with --{part}-port"
            );
        }
    }
    Ok(())
}

/// Starts every part in dependency order, adding each to `parts` once it is up.
async fn start_all(
    args: &UpArgs,
    data_dir: &Path,
    logs_dir: &Path,
    mut starter: Starter,
    parts: &mut Vec<(Spec, Running)>,
) -> anyhow::Result<Starter> {
    let spec = |label: &str, kind, args: Vec<String>, port: u16| {
        part_spec(logs_dir, label, kind, args, format!("127.0.0.1:{port}"))
    };
    let strings = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();

    let registry = spec(
        "registry",
        Kind::Registry,
        // Frequent checks, so that a dead instance leaves the table within seconds;
        // everything runs on this host, so nothing registers another.
        strings(&[
            "registry",
            "serve",
            "--check-interval",
            "5s",
            "--allow-targets",
            "loopback",
        ]),
        args.registry_port,
    );
    let running = starter.start(&registry).await?;
    starter.registry = format!("{}://{}", starter.scheme(), running.bound.addr);
    parts.push((registry.with_addr(running.bound), running));

    let log_data = data_dir.join("log").display().to_string();
    let log = spec(
        "log",
        Kind::Log,
        vec![
            "log".into(),
            "serve".into(),
            "--data-dir".into(),
            log_data,
            "--registry".into(),
            starter.registry.clone(),
        ],
        args.log_port,
    );
    let running = starter.start(&log).await?;
    let log_url = format!("{}://{}", starter.scheme(), running.bound.addr);
    parts.push((log.with_addr(running.bound), running));

    let mut gateway_args = strings(&["gateway", "serve", "--admin-addr", "127.0.0.1:0"]);
    gateway_args.extend(["--registry".into(), starter.registry.clone()]);
    gateway_args.extend(["--log-service".into(), log_url]);
    for demo in Demo::ALL {
        gateway_args.extend(["--strip-prefix".into(), demo.name().into()]);
    }
    let gateway = spec("gateway", Kind::Gateway, gateway_args, args.gateway_port);
    let running = starter.start(&gateway).await?;
    parts.push((gateway.with_addr(running.bound), running));

    start_demos(args, data_dir, logs_dir, &starter, 1, parts).await?;
    Ok(starter)
}

/// A part's spec: its log file is named after its label.
fn part_spec(logs_dir: &Path, label: &str, kind: Kind, args: Vec<String>, addr: String) -> Spec {
    Spec {
        label: label.to_owned(),
        kind,
        args,
        addr,
        log_file: logs_dir.join(format!("{}.log", label.replace('#', "-"))),
    }
}

/// Starts the demo services: `default` instances of each unless `--instances` says
/// otherwise, the first on its flag's port and the others on free ones.
async fn start_demos(
    args: &UpArgs,
    data_dir: &Path,
    logs_dir: &Path,
    starter: &Starter,
    default: usize,
    parts: &mut Vec<(Spec, Running)>,
) -> anyhow::Result<()> {
    let grading_dir = data_dir.join("grading").display().to_string();
    for demo in Demo::ALL {
        let count = args
            .instances
            .iter()
            .rev()
            .find(|(d, _)| *d == demo)
            .map_or(default, |(_, n)| *n);
        let first_port = match demo {
            Demo::Visit => args.visit_port,
            Demo::Grading => args.grading_port,
            Demo::Portal => args.portal_port,
        };
        for n in 1..=count {
            let port = if n == 1 { first_port } else { 0 };
            let demo_args = vec![
                "demo".into(),
                demo.name().into(),
                "--registry".into(),
                starter.registry.clone(),
                "--data-dir".into(),
                grading_dir.clone(),
                "--instance".into(),
                format!("{}-{n}", demo.name()),
            ];
            let part = part_spec(
                logs_dir,
                &format!("{}#{n}", demo.name()),
                Kind::Demo(demo),
                demo_args,
                format!("127.0.0.1:{port}"),
            );
            let running = starter.start(&part).await?;
            parts.push((part.with_addr(running.bound), running));
        }
    }
    Ok(())
}

impl Spec {
    /// The spec that restarts this part where it first bound.
    fn with_addr(mut self, bound: Bound) -> Self {
        self.addr = bound.addr.to_string();
        self
    }
}

/// The role of each Raft node (by address): leader or follower.
async fn roles(
    parts: &[(Spec, Running)],
    tls: Option<&keel_serve::tls::ClientTlsFiles>,
) -> BTreeMap<SocketAddr, String> {
    let tls = match tls {
        Some(files) => match files
            .identity
            .as_ref()
            .map(|(cert, key)| keel_raft::peer::PeerTls::from_files(&files.ca, cert, key))
        {
            Some(Ok(tls)) => Some(tls),
            _ => return BTreeMap::new(),
        },
        None => None,
    };
    let mut roles = BTreeMap::new();
    for (spec, running) in parts {
        if !spec.args.iter().any(|a| a == "--node-id") {
            continue;
        }
        let addr = running.bound.addr;
        let role = match keel_raft::membership::admin_over(&addr.to_string(), tls.as_ref()).await {
            Ok(mut admin) => match admin
                .status(keel_proto::raft::v1::ClusterStatusRequest {})
                .await
            {
                Ok(status) => status.into_inner().role,
                Err(status) => format!("? ({})", status.message()),
            },
            Err(err) => format!("? ({err})"),
        };
        roles.insert(addr, role);
    }
    roles
}

/// The front door of a cluster run: where it listens, and its task.
struct Front {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

/// The table printed once everything is up.
fn table(
    parts: &[(Spec, Running)],
    data_dir: &Path,
    front: Option<&Front>,
    roles: &BTreeMap<SocketAddr, String>,
    secure: Option<&secure::Secure>,
) -> String {
    // How the registry and the log service are called, and the gateway's front.
    let (s, gateway_curl, client_curl, client_flags) = match secure {
        Some(secure) => (
            "https",
            format!("curl --cacert {}", secure.file("ca.pem")),
            format!(
                "curl --cacert {} --cert {} --key {}",
                secure.file("ca.pem"),
                secure.file("client.pem"),
                secure.file("client.key")
            ),
            format!(
                " --ca {} --cert {} --key {}",
                secure.file("ca.pem"),
                secure.file("client.pem"),
                secure.file("client.key")
            ),
        ),
        None => ("http", "curl".to_owned(), "curl".to_owned(), String::new()),
    };
    let url_of = |kind: Kind| {
        parts
            .iter()
            .find(|(spec, _)| spec.kind == kind)
            .map(|(_, running)| running.bound.addr.to_string())
            .unwrap_or_default()
    };
    let (registry, log) = (url_of(Kind::Registry), url_of(Kind::Log));
    let gateway = front.map_or_else(|| url_of(Kind::Gateway), |front| front.addr.to_string());
    let mut out = format!(
        "keel is up: {} parts, data in {} (each part's log in {})\n\n  {:<12} {:<8} {:<21} {:<9} {}\n",
        parts.len(),
        data_dir.display(),
        data_dir.join("up-logs").display(),
        "PART",
        "PID",
        "ADDRESS",
        "ROLE",
        "TRY"
    );
    if let Some(front) = front {
        let _ = writeln!(
            out,
            "  {:<12} {:<8} {:<21} {:<9} {s}://{}/visit/   (in keel up: spreads connections over the gateways)",
            "front",
            "-",
            front.addr.to_string(),
            "-",
            front.addr
        );
    }
    for (spec, running) in parts {
        let addr = running.bound.addr;
        // A URL that answers on this very part.
        let try_url = match spec.kind {
            Kind::Registry => format!("{s}://{addr}/v1/services"),
            Kind::Log => format!("{s}://{addr}/v1/topics   (and gRPC log.v1.Log)"),
            Kind::Gateway => running
                .bound
                .admin
                .map(|a| format!("{s}://{a}/metrics   (admin)"))
                .unwrap_or_default(),
            Kind::Demo(Demo::Grading) => format!("{s}://{addr}/students"),
            Kind::Demo(Demo::Visit | Demo::Portal) => format!("{s}://{addr}/"),
        };
        let role = roles.get(&addr).map_or("-", String::as_str);
        let _ = writeln!(
            out,
            "  {:<12} {:<8} {:<21} {role:<9} {try_url}",
            spec.label,
            running.child.id().unwrap_or_default(),
            addr.to_string(),
        );
    }
    if front.is_some() {
        let _ = write!(
            out,
            "\nEvery part has a twin: `kill -9` any one PID above and the rest carry on while\n\
             keel up restarts it (`keel cluster status --addr {log}{client_flags}` shows\n\
             the log nodes, `--addr {registry}` the registry nodes).\n"
        );
    }
    let _ = write!(
        out,
        "\nTry:\n  {gateway_curl} {s}://{gateway}/visit/                  count a visit\n  \
         {gateway_curl} {s}://{gateway}/grading/students        students and grades\n  \
         open {s}://{gateway}/portal/                 the portal page\n  \
         {client_curl} {s}://{registry}/v1/services            the registry's table\n  \
         {client_curl} '{s}://{log}/v1/topics/logs/records?from=0'   log lines\n  \
         keel consume --addr {log}{client_flags} -t logs --follow\n"
    );
    if secure.is_some() {
        let _ = write!(
            out,
            "\nTLS everywhere keel listens, an ACL in {}; a browser will not know the \
             development CA ({}) until you import it.\n",
            data_dir.join("secure/acl.toml").display(),
            data_dir.join("secure/ca.pem").display()
        );
    }
    let _ = write!(out, "\nCtrl-C stops everything.\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grace_should_be_longer_than_zero() {
        assert_eq!(parse_grace("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_grace("0s").unwrap_err().contains("at least"));
        assert!(parse_grace("soon").unwrap_err().contains("bad duration"));
    }

    #[test]
    fn instances_should_name_a_demo_and_a_sane_count() {
        assert_eq!(parse_instances("visit=3").unwrap(), (Demo::Visit, 3));
        assert!(parse_instances("visit").unwrap_err().contains("SERVICE=N"));
        assert!(
            parse_instances("nope=2")
                .unwrap_err()
                .contains("no demo service")
        );
        assert!(parse_instances("visit=0").is_err());
        assert!(parse_instances("visit=17").is_err());
    }
}
