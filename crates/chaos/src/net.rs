//! The nodes' own network: one Linux network namespace per node, each joined by a
//! veth pair to a bridge in a switch namespace, which a last veth pair joins to the
//! namespace the suite runs in (where the clients are). Made with iproute2 as root,
//! removed when the run ends, and swept on the next run if a run was killed.
//!
//! ```text
//!  suite (clients) ── kc<tag>h ═══ host ─┐
//!                     10.213.x.254        br0 (namespace kc<tag>-sw)
//!  kc<tag>-1: eth0 10.213.x.1 ═══ n1 ────┤
//!  kc<tag>-2: eth0 10.213.x.2 ═══ n2 ────┤
//!  kc<tag>-3: eth0 10.213.x.3 ═══ n3 ────┘
//! ```
//!
//! A partition is a set of one-way cuts: packets from node A to node B are dropped
//! by a blackhole route to B inside A's namespace (a TCP connection needs both ways,
//! so a cut stops every call that A makes to B or B makes to A, while A still hears
//! B's packets). A link can also be set down. Nothing leaves the namespaces the
//! suite made, and the suite's own namespace gains one veth on a private subnet.

use std::process::{Command, Output, Stdio};

/// The network of one run.
#[derive(Debug)]
pub(crate) struct Net {
    tag: u32,
    subnet: u8,
    size: usize,
}

/// The first byte of every run's namespaces' names.
const PREFIX: &str = "kc";

impl Net {
    /// Whether namespaces can be made here: root, iproute2, and the kernel allows
    /// it. The reason when not.
    pub(crate) fn available() -> Result<(), String> {
        if !rustix::process::geteuid().is_root() {
            return Err("not root".into());
        }
        let probe = format!("{PREFIX}probe{}", std::process::id());
        match ip(&["netns", "add", &probe]) {
            Ok(()) => {
                let _ = ip(&["netns", "del", &probe]);
                Ok(())
            }
            Err(err) => Err(err),
        }
    }

    /// Makes the namespaces, the bridge and the links of `size` nodes.
    ///
    /// # Errors
    ///
    /// An `ip` command failed (what it printed); whatever was made is removed.
    pub(crate) fn create(size: usize) -> Result<Self, String> {
        sweep_stale();
        let tag = std::process::id();
        // A subnet of its own per run, so that runs side by side do not meet.
        let subnet = u8::try_from(20 + tag % 200).unwrap_or(20);
        let net = Self { tag, subnet, size };
        net.build().inspect_err(|_| drop_net(&net))?;
        Ok(net)
    }

    fn build(&self) -> Result<(), String> {
        let switch = self.switch();
        ip(&["netns", "add", &switch])?;
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", "br0", "up"])?;
        for node in 0..self.size {
            let ns = self.namespace(node);
            let port = format!("n{}", node + 1);
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
                "netns", &switch,
            ])?;
            ip(&["-n", &switch, "link", "set", &port, "master", "br0", "up"])?;
            let addr = format!("{}/24", self.ip(node));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        let host = self.host_link();
        ip(&[
            "link", "add", &host, "type", "veth", "peer", "name", "host", "netns", &switch,
        ])?;
        ip(&["-n", &switch, "link", "set", "host", "master", "br0", "up"])?;
        let addr = format!("10.213.{}.254/24", self.subnet);
        ip(&["addr", "add", &addr, "dev", &host])?;
        ip(&["link", "set", &host, "up"])?;
        Ok(())
    }

    /// Node `node`'s (0-based) address.
    pub(crate) fn ip(&self, node: usize) -> String {
        format!("10.213.{}.{}", self.subnet, node + 1)
    }

    /// Node `node`'s namespace.
    pub(crate) fn namespace(&self, node: usize) -> String {
        format!("{PREFIX}{}-{}", self.tag, node + 1)
    }

    fn switch(&self) -> String {
        format!("{PREFIX}{}-sw", self.tag)
    }

    fn host_link(&self) -> String {
        format!("{PREFIX}{}h", self.tag)
    }

    /// Drops every packet node `from` sends to node `to`.
    pub(crate) fn cut(&self, from: usize, to: usize) -> Result<(), String> {
        let route = format!("{}/32", self.ip(to));
        ip(&[
            "-n",
            &self.namespace(from),
            "route",
            "replace",
            "blackhole",
            &route,
        ])
    }

    /// Sets node `node`'s link down or up.
    pub(crate) fn link(&self, node: usize, up: bool) -> Result<(), String> {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.namespace(node), "link", "set", "eth0", state])
    }

    /// Removes every cut and sets every link up.
    pub(crate) fn heal(&self) -> Result<(), String> {
        for node in 0..self.size {
            self.link(node, true)?;
            ip(&[
                "-n",
                &self.namespace(node),
                "route",
                "flush",
                "type",
                "blackhole",
            ])?;
        }
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        drop_net(self);
    }
}

/// Removes a run's namespaces (killing what still runs in them) and its link.
fn drop_net(net: &Net) {
    let _ = ip(&["link", "del", &net.host_link()]);
    for node in 0..net.size {
        remove_namespace(&net.namespace(node));
    }
    remove_namespace(&net.switch());
}

fn remove_namespace(name: &str) {
    if let Ok(output) = run_ip(&["netns", "pids", name]) {
        for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
            if let Some(pid) = pid
                .parse::<i32>()
                .ok()
                .and_then(rustix::process::Pid::from_raw)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
    let _ = ip(&["netns", "del", name]);
}

/// Removes the namespaces of runs whose process is gone (killed before it could
/// clean up).
fn sweep_stale() {
    let Ok(output) = run_ip(&["netns", "list"]) else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some((tag, _)) = rest.split_once('-') else {
            continue;
        };
        if tag.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{tag}")).exists() {
            tracing::info!(namespace = name, "removing a namespace a killed run left");
            let _ = ip(&["link", "del", &format!("{PREFIX}{tag}h")]);
            remove_namespace(name);
        }
    }
}

fn run_ip(args: &[&str]) -> std::io::Result<Output> {
    Command::new("ip").args(args).stdin(Stdio::null()).output()
}

/// Runs `ip args`; what it printed on failure.
fn ip(args: &[&str]) -> Result<(), String> {
    match run_ip(args) {
        Ok(output) if output.status.success() => Ok(()),
        Ok(output) => Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )),
        Err(err) => Err(format!("ip {}: {err}", args.join(" "))),
    }
}
