//! Starting, watching and stopping the parts of `keel up`: each part a child
//! process, up once it printed its banner and answers its health check, restarted
//! with backoff when it exits, stopped with SIGTERM and a grace period.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::secure::Secure;
use super::{
    Bound, Kind, MAX_BACKOFF, MAX_FAILED_STARTS, Running, STABLE_AFTER, START_TIMEOUT,
    SUPERVISED_ENV, Spec,
};

/// Starts parts and waits until they are up.
#[derive(Debug, Clone)]
pub(super) struct Starter {
    pub(super) exe: PathBuf,
    pub(super) log_level: String,
    pub(super) http: reqwest::Client,
    /// The registry's URL once it runs (its nodes' URLs, comma-separated, for a
    /// cluster).
    pub(super) registry: String,
    /// With `--secure`: the flags and tokens each part gets.
    pub(super) secure: Option<Secure>,
}

impl Starter {
    /// Starts `spec` and waits until it is up.
    pub(super) async fn start(&self, spec: &Spec) -> anyhow::Result<Running> {
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
        if let Some(secure) = &self.secure {
            let (args, env) = secure.part(spec.kind);
            command.args(args).envs(env);
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

    /// How the registry and the log service are called: `https` with `--secure`.
    pub(super) fn scheme(&self) -> &'static str {
        if self.secure.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Whether a part answers its health check and, if it registers, is listed.
    async fn is_up(&self, kind: Kind, bound: Bound) -> bool {
        let scheme = self.scheme();
        let health = match kind {
            Kind::Registry | Kind::Log => format!("{scheme}://{}/healthz", bound.addr),
            Kind::Gateway => match bound.admin {
                Some(admin) => format!("{scheme}://{admin}/healthz"),
                None => return false,
            },
            Kind::Demo(_) => format!("{scheme}://{}/heart-beat", bound.addr),
        };
        if !self.ok(&health).await {
            return false;
        }
        match kind {
            Kind::Registry | Kind::Gateway => true,
            Kind::Log | Kind::Demo(_) => {
                let me = format!("{scheme}://{}", bound.addr);
                // Any registry node answers for the cluster.
                for registry in self.registry.split(',') {
                    let url = format!("{registry}/v1/services/{}", kind.name());
                    let listed = async {
                        let instances: Vec<serde_json::Value> =
                            self.http.get(&url).send().await.ok()?.json().await.ok()?;
                        Some(instances.iter().any(|i| i["url"] == me.as_str()))
                    };
                    if let Some(listed) = listed.await {
                        return listed;
                    }
                }
                false
            }
        }
    }

    /// Waits until every one of a Raft group's nodes is ready (`/readyz`): the
    /// group has a leader and each node has caught up.
    pub(super) async fn until_ready(&self, nodes: &[SocketAddr]) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        for node in nodes {
            let url = format!("{}://{node}/readyz", self.scheme());
            while !self.ok(&url).await {
                if Instant::now() >= deadline {
                    bail!("node {node} not ready after {START_TIMEOUT:?}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
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
            .trim_start_matches("https://")
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
pub(super) async fn supervise(
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
pub(super) async fn stop_all(mut parts: Vec<(Spec, Running)>, grace: Duration) -> bool {
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
}
