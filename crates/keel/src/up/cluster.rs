//! `keel up --cluster N`: the parts of a highly available system, started in
//! dependency order: the registry nodes, the log nodes, the front door and the
//! gateways behind it, then the demos.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use keel_demo::Demo;
use tokio_util::sync::CancellationToken;

use super::supervisor::Starter;
use super::{Front, Kind, Running, Spec, UpArgs, front};

/// Gateways behind the front door.
const GATEWAYS: usize = 2;

/// Instances of each demo, unless `--instances` says otherwise.
const DEMO_INSTANCES: usize = 2;

/// What `keel up --cluster` starts.
pub(super) struct Cluster<'a> {
    pub(super) nodes: usize,
    pub(super) args: &'a UpArgs,
    pub(super) data_dir: &'a Path,
    pub(super) logs_dir: &'a Path,
}

impl Cluster<'_> {
    fn spec(&self, label: &str, kind: Kind, args: Vec<String>, addr: String) -> Spec {
        Spec {
            label: label.to_owned(),
            kind,
            args,
            addr,
            log_file: self
                .logs_dir
                .join(format!("{}.log", label.replace('#', "-"))),
        }
    }

    /// The addresses of a Raft group's nodes. A group's members are in its Raft log
    /// with their addresses, so a group keeps them from run to run: they are chosen
    /// once (the first node on `port`, or a free one if 0; the others on free
    /// ports) and kept in `cluster/<group>-nodes` beside the nodes' data.
    fn node_addrs(&self, group: &str, port: u16) -> anyhow::Result<Vec<String>> {
        let dir = self.data_dir.join("cluster");
        let file = dir.join(format!("{group}-nodes"));
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                let addrs: Vec<String> = text.lines().map(str::to_owned).collect();
                if addrs.len() != self.nodes {
                    anyhow::bail!(
                        "{} holds a {group} cluster of {} nodes, not {}: run with --cluster {}, or start over with --fresh",
                        dir.display(),
                        addrs.len(),
                        self.nodes,
                        addrs.len()
                    );
                }
                if port != 0 && addrs[0] != format!("127.0.0.1:{port}") {
                    eprintln!(
                        "keel up: the {group} nodes keep the addresses they were created with ({}); --fresh starts over on new ones",
                        addrs.join(", ")
                    );
                }
                Ok(addrs)
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let addrs = (0..self.nodes)
                    .map(|n| {
                        let port = if n == 0 && port != 0 {
                            port
                        } else {
                            free_port()?
                        };
                        Ok(format!("127.0.0.1:{port}"))
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                std::fs::write(&file, addrs.join("\n"))
                    .with_context(|| format!("writing {}", file.display()))?;
                Ok(addrs)
            }
            Err(err) => Err(err).with_context(|| format!("reading {}", file.display())),
        }
    }

    /// Starts one Raft group (`registry` or `log`) of `self.nodes` nodes with
    /// `extra` arguments each, and waits until it has a leader.
    async fn start_group(
        &self,
        starter: &Starter,
        kind: Kind,
        port: u16,
        extra: &[String],
        parts: &mut Vec<(Spec, Running)>,
    ) -> anyhow::Result<Vec<SocketAddr>> {
        let name = kind.name();
        let addrs = self.node_addrs(name, port)?;
        let peers = addrs
            .iter()
            .enumerate()
            .map(|(n, addr)| format!("{}={addr}", n + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut bound = Vec::new();
        for (n, addr) in addrs.iter().enumerate() {
            let id = n + 1;
            let dir = self.data_dir.join("cluster").join(format!("{name}-{id}"));
            let mut args = vec![
                name.to_owned(),
                "serve".to_owned(),
                "--data-dir".to_owned(),
                dir.display().to_string(),
                "--node-id".to_owned(),
                id.to_string(),
                "--peers".to_owned(),
                peers.clone(),
            ];
            args.extend(extra.iter().cloned());
            let spec = self.spec(&format!("{name}#{id}"), kind, args, addr.clone());
            let running = starter.start(&spec).await?;
            bound.push(running.bound.addr);
            parts.push((spec.with_addr(running.bound), running));
        }
        starter
            .until_ready(&bound)
            .await
            .with_context(|| format!("the {name} cluster"))?;
        Ok(bound)
    }

    /// Starts everything; the front door runs until `stop`.
    pub(super) async fn start(
        &self,
        mut starter: Starter,
        parts: &mut Vec<(Spec, Running)>,
        stop: &CancellationToken,
        front_door: &mut Option<Front>,
    ) -> anyhow::Result<Starter> {
        let args = self.args;
        let strings = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();

        // Frequent checks, so that a dead instance leaves the table within seconds;
        // everything runs on this host, so nothing registers another.
        let registries = self
            .start_group(
                &starter,
                Kind::Registry,
                args.registry_port,
                &strings(&["--check-interval", "5s", "--allow-targets", "loopback"]),
                parts,
            )
            .await?;
        starter.registry = urls(starter.scheme(), &registries);

        let logs = self
            .start_group(
                &starter,
                Kind::Log,
                args.log_port,
                &["--registry".to_owned(), starter.registry.clone()],
                parts,
            )
            .await?;

        // The front door holds its port from now on.
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.gateway_port))
            .await
            .with_context(|| format!("binding the front door on port {}", args.gateway_port))?;
        let front_addr = listener.local_addr().context("the front door's address")?;
        let mut gateways = Vec::new();
        for n in 1..=GATEWAYS {
            let mut gateway_args = strings(&["gateway", "serve", "--admin-addr", "127.0.0.1:0"]);
            gateway_args.extend(["--registry".into(), starter.registry.clone()]);
            gateway_args.extend(["--log-service".into(), urls(starter.scheme(), &logs)]);
            // The log service too, so that /log/v1/topics/... reaches its API.
            for name in Demo::ALL.map(Demo::name).into_iter().chain(["log"]) {
                gateway_args.extend(["--strip-prefix".into(), name.into()]);
            }
            let spec = self.spec(
                &format!("gateway#{n}"),
                Kind::Gateway,
                gateway_args,
                "127.0.0.1:0".into(),
            );
            let running = starter.start(&spec).await?;
            gateways.push(running.bound.addr);
            parts.push((spec.with_addr(running.bound), running));
        }
        *front_door = Some(Front {
            addr: front_addr,
            task: tokio::spawn(front::serve(listener, gateways, stop.clone())),
        });

        super::start_demos(
            args,
            self.data_dir,
            self.logs_dir,
            &starter,
            DEMO_INSTANCES,
            parts,
        )
        .await?;
        Ok(starter)
    }
}

/// `http://a,http://b,...` (or `https`): how the other parts are told of a group's
/// nodes.
fn urls(scheme: &str, addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|addr| format!("{scheme}://{addr}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A port free now (for a node whose address its peers must know before it starts).
fn free_port() -> anyhow::Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port for a node")?;
    Ok(listener.local_addr().context("finding a free port")?.port())
}
