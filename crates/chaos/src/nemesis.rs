//! The faults: what each does to the cluster, and how it heals.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cluster::Cluster;

/// How long a fault lasts before it heals: several election timeouts.
const FAULT_TIME: Duration = Duration::from_millis(1500);

/// A fault, and how it heals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Nemesis {
    /// SIGKILL the leader; restart it after a while.
    KillLeader,
    /// SIGKILL a random node; restart it after a while.
    KillRandom,
    /// SIGKILL a majority; restart them after a while.
    KillMajority,
    /// SIGSTOP the leader for longer than an election; then SIGCONT.
    PauseLeader,
    /// Cut the leader off from the other nodes, both ways (clients still reach it).
    PartitionLeader,
    /// Split the nodes into a random minority and majority.
    PartitionHalves,
    /// Two nodes cannot reach each other; the leader reaches both.
    PartitionBridge,
    /// The followers drop what the leader sends them; the leader hears them.
    PartitionOneWay,
    /// The leader's network link goes down (clients lose it too); then up.
    LinkDown,
    /// A follower's Raft log loses the end of its last entry (a torn write).
    TornTail,
    /// A bit flips in a sealed segment of a follower's topic.
    CorruptSealed,
    /// A bit flips in the active segment of a follower's topic.
    CorruptActive,
    /// A bit flips in a follower's Raft log.
    CorruptRaftLog,
    /// A bit flips in a follower's Raft metadata (its vote).
    CorruptMeta,
    /// A follower restarts with an empty data directory.
    WipeData,
}

/// What a fault acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Processes: kill, pause.
    Process,
    /// The network between nodes: needs namespaces.
    Network,
    /// A stopped node's files.
    Disk,
}

impl Nemesis {
    /// Every fault.
    pub const ALL: [Self; 15] = [
        Self::KillLeader,
        Self::KillRandom,
        Self::KillMajority,
        Self::PauseLeader,
        Self::PartitionLeader,
        Self::PartitionHalves,
        Self::PartitionBridge,
        Self::PartitionOneWay,
        Self::LinkDown,
        Self::TornTail,
        Self::CorruptSealed,
        Self::CorruptActive,
        Self::CorruptRaftLog,
        Self::CorruptMeta,
        Self::WipeData,
    ];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::KillLeader => "kill-leader",
            Self::KillRandom => "kill-random",
            Self::KillMajority => "kill-majority",
            Self::PauseLeader => "pause-leader",
            Self::PartitionLeader => "partition-leader",
            Self::PartitionHalves => "partition-halves",
            Self::PartitionBridge => "partition-bridge",
            Self::PartitionOneWay => "partition-one-way",
            Self::LinkDown => "link-down",
            Self::TornTail => "torn-tail",
            Self::CorruptSealed => "corrupt-sealed",
            Self::CorruptActive => "corrupt-active",
            Self::CorruptRaftLog => "corrupt-raft-log",
            Self::CorruptMeta => "corrupt-meta",
            Self::WipeData => "wipe-data",
        }
    }

    /// The fault named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|n| n.name() == name)
    }

    /// Whether it means anything for `service` (the registry has no topics).
    pub fn applies_to(self, service: crate::Service) -> bool {
        service == crate::Service::Log || !matches!(self, Self::CorruptSealed | Self::CorruptActive)
    }

    /// What it acts on.
    pub fn kind(self) -> Kind {
        match self {
            Self::KillLeader | Self::KillRandom | Self::KillMajority | Self::PauseLeader => {
                Kind::Process
            }
            Self::PartitionLeader
            | Self::PartitionHalves
            | Self::PartitionBridge
            | Self::PartitionOneWay
            | Self::LinkDown => Kind::Network,
            Self::TornTail
            | Self::CorruptSealed
            | Self::CorruptActive
            | Self::CorruptRaftLog
            | Self::CorruptMeta
            | Self::WipeData => Kind::Disk,
        }
    }
}

/// A source of choices (victims, bits) that a run's seed makes repeatable.
pub(crate) struct Dice(u64);

impl Dice {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// A number below `bound` (xorshift).
    pub(crate) fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound.max(1)
    }
}

/// Where a fault strikes: the leader, a follower, and the nodes' names.
struct Targets {
    size: usize,
    leader: usize,
    follower: usize,
    names: Vec<String>,
}

impl Targets {
    fn name(&self, at: usize) -> String {
        self.names[at].clone()
    }
}

/// Injects `nemesis`, waits, and heals; `note` records each step.
pub(crate) async fn inject(
    cluster: &mut Cluster,
    nemesis: Nemesis,
    dice: &mut Dice,
    note: &mut dyn FnMut(String),
) -> Result<(), String> {
    let size = cluster.nodes.len();
    let leader = cluster.leader().await.unwrap_or(0);
    let targets = Targets {
        size,
        leader,
        follower: (leader + 1 + dice.below(size as u64 - 1) as usize) % size,
        names: cluster
            .nodes
            .iter()
            .map(crate::cluster::Node::name)
            .collect(),
    };
    match nemesis.kind() {
        Kind::Process => process_fault(cluster, nemesis, &targets, dice, note).await,
        Kind::Network => network_fault(cluster, nemesis, &targets, dice, note).await,
        Kind::Disk => disk_fault(cluster, nemesis, &targets, dice, note).await,
    }
}

/// Kills or pauses processes, and brings them back.
async fn process_fault(
    cluster: &mut Cluster,
    nemesis: Nemesis,
    t: &Targets,
    dice: &mut Dice,
    note: &mut dyn FnMut(String),
) -> Result<(), String> {
    let (size, leader) = (t.size, t.leader);
    let name = |at: usize| t.name(at);
    let victims: Vec<usize> = match nemesis {
        Nemesis::KillLeader | Nemesis::PauseLeader => vec![leader],
        Nemesis::KillRandom => vec![dice.below(size as u64) as usize],
        _ => {
            let spared = dice.below(size as u64) as usize;
            (0..size).filter(|at| *at != spared).collect()
        }
    };
    let names = victims.iter().map(|at| name(*at)).collect::<Vec<_>>();
    let names = names.join(", ");
    if nemesis == Nemesis::PauseLeader {
        cluster.signal(leader, rustix::process::Signal::STOP);
        note(format!("{names} paused"));
        tokio::time::sleep(FAULT_TIME).await;
        cluster.signal(leader, rustix::process::Signal::CONT);
        note(format!("{names} resumed"));
        return Ok(());
    }
    for at in &victims {
        cluster.kill(*at);
    }
    note(format!("{names} killed"));
    tokio::time::sleep(FAULT_TIME).await;
    for at in victims {
        cluster.spawn(at).map_err(|err| err.to_string())?;
    }
    note(format!("{names} restarted"));
    Ok(())
}

/// Cuts the network between nodes, and heals it.
async fn network_fault(
    cluster: &mut Cluster,
    nemesis: Nemesis,
    t: &Targets,
    dice: &mut Dice,
    note: &mut dyn FnMut(String),
) -> Result<(), String> {
    let (size, leader) = (t.size, t.leader);
    let name = |at: usize| t.name(at);
    let Some(net) = &cluster.net else {
        return Err(format!("{} needs network namespaces", nemesis.name()));
    };
    let others = |node: usize| (0..size).filter(move |at| *at != node);
    let what = match nemesis {
        Nemesis::PartitionLeader | Nemesis::PartitionHalves => {
            let alone = if nemesis == Nemesis::PartitionLeader {
                leader
            } else {
                dice.below(size as u64) as usize
            };
            // A minority of one (of three), or of two (of five).
            let minority: Vec<usize> = (0..size.div_ceil(2) - 1)
                .map(|step| (alone + step) % size)
                .collect();
            for a in &minority {
                for b in (0..size).filter(|b| !minority.contains(b)) {
                    net.cut(*a, b)?;
                    net.cut(b, *a)?;
                }
            }
            let names = minority.iter().map(|at| name(*at)).collect::<Vec<_>>();
            format!("{} cut off from the others", names.join(", "))
        }
        Nemesis::PartitionBridge => {
            let mut ends = others(leader);
            let (a, b) = (ends.next().unwrap_or(0), ends.next().unwrap_or(0));
            net.cut(a, b)?;
            net.cut(b, a)?;
            format!(
                "{} and {} cut from each other; {} reaches both",
                name(a),
                name(b),
                name(leader)
            )
        }
        Nemesis::PartitionOneWay => {
            for to in others(leader) {
                net.cut(leader, to)?;
            }
            format!("{}'s packets to the others dropped", name(leader))
        }
        _ => {
            net.link(leader, false)?;
            format!("{}'s link down", name(leader))
        }
    };
    note(what);
    tokio::time::sleep(FAULT_TIME).await;
    net.heal()?;
    note("healed".into());
    Ok(())
}

/// Damages a stopped follower's files and restarts it.
async fn disk_fault(
    cluster: &mut Cluster,
    nemesis: Nemesis,
    t: &Targets,
    dice: &mut Dice,
    note: &mut dyn FnMut(String),
) -> Result<(), String> {
    let follower = t.follower;
    let name = |at: usize| t.name(at);
    if nemesis == Nemesis::CorruptSealed {
        // Its topic must have sealed a segment first.
        let topic = cluster.nodes[follower]
            .dir
            .join("topics")
            .join(crate::runner::TOPIC);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while segments(&topic).map_or(0, |files| files.len()) < 2 {
            if std::time::Instant::now() >= deadline {
                return Err(format!("{} sealed no segment within 30 s", name(follower)));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    cluster.kill(follower);
    let what = damage(nemesis, &cluster.nodes[follower].dir, dice)?;
    note(format!("{} stopped; {what}", name(follower)));
    cluster.spawn(follower).map_err(|err| err.to_string())?;
    note(format!("{} restarted", name(follower)));
    tokio::time::sleep(FAULT_TIME).await;
    if let Some(status) = cluster.exited(follower) {
        return Err(format!(
            "{} exited ({status}) after {}: see {}",
            name(follower),
            nemesis.name(),
            cluster.nodes[follower].dir.with_extension("log").display()
        ));
    }
    Ok(())
}

/// Damages the files of a stopped node whose data directory is `dir`; says what.
fn damage(nemesis: Nemesis, dir: &Path, dice: &mut Dice) -> Result<String, String> {
    let raft_log = dir.join("raft").join("log").join("log");
    let topic = dir.join("topics").join(crate::runner::TOPIC);
    match nemesis {
        Nemesis::WipeData => {
            std::fs::remove_dir_all(dir)
                .map_err(|err| format!("wiping {}: {err}", dir.display()))?;
            Ok("data directory emptied".into())
        }
        Nemesis::TornTail => {
            let file = segments(&raft_log)?.pop().ok_or("no Raft log segment")?;
            let end = data_end(&file)?;
            // A few bytes into the last entry (an entry's frame is longer than 24).
            let cut = 1 + dice.below(20.min(end.saturating_sub(64)).max(1));
            truncate(&file, end - cut)?;
            Ok(format!(
                "{} cut {cut} bytes short of its last entry's end",
                shown(&file, dir)
            ))
        }
        Nemesis::CorruptSealed | Nemesis::CorruptActive | Nemesis::CorruptRaftLog => {
            let (mut files, which) = match nemesis {
                Nemesis::CorruptRaftLog => (segments(&raft_log)?, "Raft log"),
                _ => (segments(&topic)?, "topic"),
            };
            let file = if nemesis == Nemesis::CorruptSealed {
                if files.len() < 2 {
                    return Err(format!("no sealed {which} segment in {}", topic.display()));
                }
                let at = dice.below(files.len() as u64 - 1) as usize;
                files.swap_remove(at)
            } else {
                files.pop().ok_or_else(|| format!("no {which} segment"))?
            };
            let bit = flip(&file, 64, dice)?;
            Ok(format!("bit {bit} of {} flipped", shown(&file, dir)))
        }
        _ => {
            let meta = dir.join("raft").join("log").join("meta.json");
            let bit = flip(&meta, 0, dice)?;
            Ok(format!("bit {bit} of {} flipped", shown(&meta, dir)))
        }
    }
}

fn shown(file: &Path, dir: &Path) -> String {
    file.strip_prefix(dir).unwrap_or(file).display().to_string()
}

/// The store files of the log in `dir`, oldest first.
fn segments(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|err| format!("{}: {err}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
        .collect();
    files.sort();
    Ok(files)
}

/// Where the records of a store file end: past its last non-zero byte (the active
/// segment's preallocated space reads as zeros).
fn data_end(file: &Path) -> Result<u64, String> {
    let bytes = std::fs::read(file).map_err(|err| format!("{}: {err}", file.display()))?;
    Ok(bytes
        .iter()
        .rposition(|b| *b != 0)
        .map_or(0, |at| at as u64 + 1))
}

fn truncate(file: &Path, len: u64) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .and_then(|f| f.set_len(len))
        .map_err(|err| format!("{}: {err}", file.display()))
}

/// Flips one bit of `file` at or after byte `from`; which bit.
fn flip(file: &Path, from: u64, dice: &mut Dice) -> Result<u64, String> {
    let mut bytes = std::fs::read(file).map_err(|err| format!("{}: {err}", file.display()))?;
    // Within the data, not the zeros preallocated after it.
    let len = data_end(file)?;
    if len <= from {
        return Err(format!("{} holds only {len} bytes", file.display()));
    }
    let bit = from * 8 + dice.below((len - from) * 8);
    let at = usize::try_from(bit / 8).map_err(|err| err.to_string())?;
    bytes[at] ^= 1 << (bit % 8);
    std::fs::write(file, bytes).map_err(|err| format!("{}: {err}", file.display()))?;
    Ok(bit)
}
