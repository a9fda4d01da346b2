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
//! No orphans: the children run in their own process group (a terminal's Ctrl-C
//! reaches only `keel up`, which stops them in order) and exit by themselves when
//! their stdin, a pipe from `keel up`, closes, which happens however `keel up`
//! ends, even by SIGKILL.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use keel_demo::Demo;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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
    /// up-logs/) first.
    #[arg(long)]
    fresh: bool,
    /// How many instances of a demo service to run, e.g. visit=3 (repeatable).
    /// Extra instances listen on free ports.
    #[arg(long = "instances", value_name = "SERVICE=N", value_parser = parse_instances)]
    instances: Vec<(Demo, usize)>,
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
    let grace = crate::cli::parse_duration(text)?;
    if grace.is_zero() {
        return Err("a grace of 0s would kill every part before it deregisters and syncs; give at least e.g. 1s".into());
    }
    Ok(grace)
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
        for sub in ["log", "grading", "up-logs"] {
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

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .context("building the HTTP client")?;
    let starter = Starter {
        exe,
        log_level: log_level.to_owned(),
        http,
        registry: String::new(),
    };
    let mut parts: Vec<(Spec, Running)> = Vec::new();
    let started = start_all(&args, &data_dir, &logs_dir, starter, &mut parts).await;
    let starter = match started {
        Ok(starter) => starter,
        Err(err) => {
            eprintln!("keel up: {err:#}; stopping what started");
            stop_all(parts, args.grace).await;
            return Err(err);
        }
    };
    println!("{}", table(&parts, &data_dir));

    // Supervise until shutdown, then stop in reverse start order.
    let stop = CancellationToken::new();
    let supervisors: Vec<JoinHandle<(Spec, Running)>> = parts
        .into_iter()
        .map(|(spec, running)| {
            tokio::spawn(supervise(spec, running, starter.clone(), stop.clone()))
        })
        .collect();
    shutdown.await;
    eprintln!("keel up: stopping");
    stop.cancel();
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
    let spec = |label: &str, kind, args: Vec<String>, port: u16| Spec {
        label: label.to_owned(),
        kind,
        args,
        addr: format!("127.0.0.1:{port}"),
        log_file: logs_dir.join(format!("{}.log", label.replace('#', "-"))),
    };
    let strings = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();

    let registry = spec(
        "registry",
        Kind::Registry,
        // Frequent checks, so that a dead instance leaves the table within seconds.
        strings(&["registry", "serve", "--check-interval", "5s"]),
        args.registry_port,
    );
    let running = starter.start(&registry).await?;
    starter.registry = format!("http://{}", running.bound.addr);
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
    let log_url = format!("http://{}", running.bound.addr);
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

    let grading_dir = data_dir.join("grading").display().to_string();
    for demo in Demo::ALL {
        let count = args
            .instances
            .iter()
            .rev()
            .find(|(d, _)| *d == demo)
            .map_or(1, |(_, n)| *n);
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
            ];
            let part = spec(
                &format!("{}#{n}", demo.name()),
                Kind::Demo(demo),
                demo_args,
                port,
            );
            let running = starter.start(&part).await?;
            parts.push((part.with_addr(running.bound), running));
        }
    }
    Ok(starter)
}

impl Spec {
    /// The spec that restarts this part where it first bound.
    fn with_addr(mut self, bound: Bound) -> Self {
        self.addr = bound.addr.to_string();
        self
    }
}

/// Starts parts and waits until they are up.
#[derive(Debug, Clone)]
struct Starter {
    exe: PathBuf,
    log_level: String,
    http: reqwest::Client,
    /// The registry's URL once it runs.
    registry: String,
}

impl Starter {
    async fn start(&self, spec: &Spec) -> anyhow::Result<Running> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log_file)
            .with_context(|| format!("opening {}", spec.log_file.display()))?;
        let mut command = Command::new(&self.exe);
        command
            .args(&spec.args)
            .args(["--addr", &spec.addr, "--log-level", &self.log_level]);
        // The user's KEEL_* settings are for keel up, not for every part.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("KEEL_") {
                command.env_remove(key);
            }
        }
        command
            .env(SUPERVISED_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", spec.label))?;
        let stdin = child.stdin.take();
        let deadline = Instant::now() + START_TIMEOUT;
        let bound = match self.until_up(spec, &mut child, deadline).await {
            Ok(bound) => bound,
            Err(err) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                let tail = log_tail(&spec.log_file, 5);
                bail!("{} did not start: {err:#}{tail}", spec.label);
            }
        };
        Ok(Running {
            child,
            _stdin: stdin,
            bound,
            given_up: false,
        })
    }

    /// Reads the address the child prints first, then waits for its health.
    async fn until_up(
        &self,
        spec: &Spec,
        child: &mut Child,
        deadline: Instant,
    ) -> anyhow::Result<Bound> {
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::select! {
            line = tokio::time::timeout_at(deadline.into(), lines.next_line()) => {
                line.context("no address printed in time")?.context("reading its output")?
            }
            status = child.wait() => bail!("exited with {}", describe(status?)),
        };
        let first = first.context("exited before printing its address")?;
        // Later output is not needed; keep the pipe drained.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let bound = parse_banner(&first)
            .with_context(|| format!("no address in its first line {first:?}"))?;
        loop {
            let ready = tokio::select! {
                ready = self.is_up(spec.kind, bound) => ready,
                status = child.wait() => bail!("exited with {}", describe(status?)),
            };
            if ready {
                return Ok(bound);
            }
            if Instant::now() >= deadline {
                bail!("not healthy after {START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether a part answers its health check and, if it registers, is listed.
    async fn is_up(&self, kind: Kind, bound: Bound) -> bool {
        let health = match kind {
            Kind::Registry | Kind::Log => format!("http://{}/healthz", bound.addr),
            Kind::Gateway => match bound.admin {
                Some(admin) => format!("http://{admin}/healthz"),
                None => return false,
            },
            Kind::Demo(_) => format!("http://{}/heart-beat", bound.addr),
        };
        if !self.ok(&health).await {
            return false;
        }
        match kind {
            Kind::Registry | Kind::Gateway => true,
            Kind::Log | Kind::Demo(_) => {
                let url = format!("{}/v1/services/{}", self.registry, kind.name());
                let listed = async {
                    let instances: Vec<serde_json::Value> =
                        self.http.get(&url).send().await.ok()?.json().await.ok()?;
                    let me = format!("http://{}", bound.addr);
                    Some(instances.iter().any(|i| i["url"] == me.as_str()))
                };
                listed.await.unwrap_or(false)
            }
        }
    }

    async fn ok(&self, url: &str) -> bool {
        matches!(self.http.get(url).send().await, Ok(r) if r.status().is_success())
    }
}

/// The address (and admin address) from a part's first line, e.g.
/// `keel gateway listening on 127.0.0.1:20001 (admin: http://127.0.0.1:4711/metrics), ...`.
fn parse_banner(line: &str) -> Option<Bound> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.windows(2).position(|w| w == ["listening", "on"])?;
    let addr = words.get(at + 2)?.trim_end_matches(',').parse().ok()?;
    let admin = words.windows(2).find(|w| w[0] == "(admin:").and_then(|w| {
        w[1].trim_start_matches("http://")
            .split('/')
            .next()?
            .parse()
            .ok()
    });
    Some(Bound { addr, admin })
}

/// The last `n` lines of a part's log file, to show why it failed.
fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = format!("\n  (its log, {}):", path.display());
    for line in &lines[lines.len().saturating_sub(n)..] {
        let _ = write!(out, "\n    {line}");
    }
    out
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        _ => status.to_string(),
    }
}

/// Watches one part: when it exits, reports it and starts it again (same address)
/// with backoff, until `stop`; after [`MAX_FAILED_STARTS`] failed starts in a row it
/// gives the part up and says so. Returns the part as it is then.
async fn supervise(
    spec: Spec,
    mut running: Running,
    starter: Starter,
    stop: CancellationToken,
) -> (Spec, Running) {
    let mut backoff = Duration::from_millis(250);
    let mut since = Instant::now();
    loop {
        let status = tokio::select! {
            status = running.child.wait() => status,
            () = stop.cancelled() => return (spec, running),
        };
        let how = status.map_or_else(|err| err.to_string(), describe);
        if since.elapsed() >= STABLE_AFTER {
            backoff = Duration::from_millis(250);
        }
        eprintln!(
            "keel up: {} exited ({how}); restarting in {backoff:?} (its log: {})",
            spec.label,
            spec.log_file.display()
        );
        let mut failed_starts = 0;
        loop {
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = stop.cancelled() => return (spec, running),
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            let restarted = tokio::select! {
                restarted = starter.start(&spec) => restarted,
                () = stop.cancelled() => return (spec, running),
            };
            match restarted {
                Ok(again) => {
                    running = again;
                    since = Instant::now();
                    let pid = running.child.id().unwrap_or_default();
                    eprintln!("keel up: {} restarted (pid {pid})", spec.label);
                    break;
                }
                Err(err) => {
                    failed_starts += 1;
                    if failed_starts >= MAX_FAILED_STARTS {
                        eprintln!(
                            "keel up: {} failed to start {failed_starts} times in a row ({err:#}); giving up on it. The other parts keep running",
                            spec.label
                        );
                        running.given_up = true;
                        stop.cancelled().await;
                        return (spec, running);
                    }
                    eprintln!(
                        "keel up: restarting {} failed: {err:#}; next try in {backoff:?}",
                        spec.label
                    );
                }
            }
        }
    }
}

/// Stops the parts in reverse start order; true if each exited 0 in time.
async fn stop_all(mut parts: Vec<(Spec, Running)>, grace: Duration) -> bool {
    // The gateway first, so no new requests arrive; then the demos in reverse start
    // order (a service before those it requires); the registry last, so the others
    // can deregister.
    let mut order: Vec<(usize, (Spec, Running))> = parts.drain(..).enumerate().collect();
    order.sort_by_key(|(started, (spec, _))| {
        let class = match spec.kind {
            Kind::Gateway => 0,
            Kind::Demo(_) => 1,
            Kind::Log => 2,
            Kind::Registry => 3,
        };
        (class, std::cmp::Reverse(*started))
    });
    parts.extend(order.into_iter().map(|(_, part)| part));
    let mut clean = true;
    for (spec, mut running) in parts {
        clean &= stop_one(&spec, &mut running, grace).await;
    }
    clean
}

async fn stop_one(spec: &Spec, running: &mut Running, grace: Duration) -> bool {
    if let Ok(Some(_)) = running.child.try_wait() {
        // Its exit was reported when it happened.
        if running.given_up {
            eprintln!("keel up: {} was given up earlier", spec.label);
            return false;
        }
        eprintln!(
            "keel up: {} was not running (waiting to be restarted)",
            spec.label
        );
        return true;
    }
    let terminated = running
        .child
        .id()
        .and_then(|pid| rustix::process::Pid::from_raw(i32::try_from(pid).ok()?))
        .map(|pid| rustix::process::kill_process(pid, rustix::process::Signal::TERM));
    if !matches!(terminated, Some(Ok(()))) {
        let _ = running.child.start_kill();
    }
    match tokio::time::timeout(grace, running.child.wait()).await {
        Ok(Ok(status)) if status.success() => {
            eprintln!("keel up: {} stopped", spec.label);
            true
        }
        Ok(Ok(status)) => {
            eprintln!("keel up: {} stopped with {}", spec.label, describe(status));
            false
        }
        Ok(Err(err)) => {
            eprintln!("keel up: waiting for {} failed: {err}", spec.label);
            false
        }
        Err(_) => {
            eprintln!(
                "keel up: {} did not stop within {grace:?}; killed",
                spec.label
            );
            let _ = running.child.kill().await;
            false
        }
    }
}

/// The table printed once everything is up.
fn table(parts: &[(Spec, Running)], data_dir: &Path) -> String {
    let url_of = |kind: Kind| {
        parts
            .iter()
            .find(|(spec, _)| spec.kind == kind)
            .map(|(_, running)| running.bound.addr.to_string())
            .unwrap_or_default()
    };
    let (gateway, registry, log) = (
        url_of(Kind::Gateway),
        url_of(Kind::Registry),
        url_of(Kind::Log),
    );
    let mut out = format!(
        "keel is up: {} parts, data in {} (each part's log in {})\n\n  {:<12} {:<8} {:<21} {}\n",
        parts.len(),
        data_dir.display(),
        data_dir.join("up-logs").display(),
        "PART",
        "PID",
        "ADDRESS",
        "TRY"
    );
    for (spec, running) in parts {
        let addr = running.bound.addr;
        // A URL that answers on this very part.
        let try_url = match spec.kind {
            Kind::Registry => format!("http://{addr}/v1/services"),
            Kind::Log => format!("http://{addr}/v1/topics   (and gRPC log.v1.Log)"),
            Kind::Gateway => running
                .bound
                .admin
                .map(|a| format!("http://{a}/metrics   (admin)"))
                .unwrap_or_default(),
            Kind::Demo(Demo::Grading) => format!("http://{addr}/students"),
            Kind::Demo(Demo::Visit | Demo::Portal) => format!("http://{addr}/"),
        };
        let _ = writeln!(
            out,
            "  {:<12} {:<8} {:<21} {try_url}",
            spec.label,
            running.child.id().unwrap_or_default(),
            addr.to_string(),
        );
    }
    let _ = write!(
        out,
        "\nTry:\n  curl http://{gateway}/visit/                  count a visit\n  \
         curl http://{gateway}/grading/students        students and grades\n  \
         open http://{gateway}/portal/                 the portal page\n  \
         curl http://{registry}/v1/services            the registry's table\n  \
         curl 'http://{log}/v1/topics/logs/records?from=0'   log lines\n  \
         keel consume --addr {log} -t logs --follow\n\nCtrl-C stops everything.\n"
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banners_should_give_the_address_and_admin_address() {
        let gateway = parse_banner(
            "keel gateway listening on 127.0.0.1:20001 (admin: http://127.0.0.1:4711/metrics), registry http://x",
        )
        .unwrap();
        assert_eq!(gateway.addr.to_string(), "127.0.0.1:20001");
        assert_eq!(gateway.admin.unwrap().to_string(), "127.0.0.1:4711");
        let log = parse_banner(
            "keel log service listening on 127.0.0.1:9 (gRPC log.v1.Log and HTTP), data in d",
        )
        .unwrap();
        assert_eq!(log.addr.to_string(), "127.0.0.1:9");
        assert!(log.admin.is_none());
        assert!(parse_banner("hello").is_none());
    }

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
