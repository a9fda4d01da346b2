//! Where a registry may send requests: the addresses instances may register
//! (`--allow-targets`, and a principal's `targets` in the ACL), checked when they
//! register and again whenever a name is resolved to connect (the registry's
//! resolver), so that neither an address nor a DNS answer that changes after
//! registration can aim health checks, notifications or the gateway's traffic at an
//! address outside the list.
//!
//! A list is comma-separated entries `NET[:PORTS]`: `NET` an IP address, a CIDR
//! block (`10.0.0.0/8`, `fd00::/8`; IPv6 in brackets when ports follow:
//! `[fd00::/8]:8000-8999`), `loopback` (127.0.0.0/8 and ::1) or `any`; `PORTS` a port
//! or an inclusive range (`8000-8999`), every port when absent.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::time::Duration;

/// How long resolving a registered host name may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// A block of addresses: an address and how many leading bits of it must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Block {
    addr: IpAddr,
    prefix: u8,
}

impl Block {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                masked(u128::from(u32::from(net)) << 96, self.prefix)
                    == masked(u128::from(u32::from(ip)) << 96, self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                masked(u128::from(net), self.prefix) == masked(u128::from(ip), self.prefix)
            }
            _ => false,
        }
    }
}

fn masked(bits: u128, prefix: u8) -> u128 {
    match prefix {
        0 => 0,
        p => bits & (u128::MAX << (128 - u32::from(p.min(128)))),
    }
}

/// An IPv4 address written as IPv6 (`::ffff:127.0.0.1`) is that IPv4 address: it
/// must not slip past a rule written for IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 @ IpAddr::V4(_) => v4,
    }
}

/// One entry: blocks of addresses and the ports allowed on them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    blocks: Vec<Block>,
    ports: RangeInclusive<u16>,
    text: String,
}

impl Rule {
    fn allows_ip(&self, ip: IpAddr) -> bool {
        self.blocks.iter().any(|block| block.contains(ip))
    }
}

/// The addresses the registry may send to (see the module docs for the syntax).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowTargets {
    rules: Vec<Rule>,
}

/// Why a list of targets does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("target entry {entry:?}: {why}")]
pub struct BadTargets {
    entry: String,
    why: String,
}

impl FromStr for AllowTargets {
    type Err = BadTargets;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let rules = text
            .split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .map(parse_rule)
            .collect::<Result<Vec<_>, _>>()?;
        if rules.is_empty() {
            return Err(BadTargets {
                entry: text.to_owned(),
                why: "no entries: give NET[:PORTS],... or `any`".into(),
            });
        }
        Ok(Self { rules })
    }
}

impl fmt::Display for AllowTargets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let texts: Vec<&str> = self.rules.iter().map(|rule| rule.text.as_str()).collect();
        f.write_str(&texts.join(","))
    }
}

fn parse_rule(entry: &str) -> Result<Rule, BadTargets> {
    let bad = |why: &str| BadTargets {
        entry: entry.to_owned(),
        why: why.to_owned(),
    };
    // `[v6/len]:ports`, `v4/len:ports`, a keyword with ports, or a bare NET.
    let (net, ports) = if let Some(rest) = entry.strip_prefix('[') {
        let (net, after) = rest
            .split_once(']')
            .ok_or_else(|| bad("an opening `[` without its `]`"))?;
        match after {
            "" => (net, None),
            after => (
                net,
                Some(
                    after
                        .strip_prefix(':')
                        .ok_or_else(|| bad("expected `:PORTS` after `]`"))?,
                ),
            ),
        }
    } else if entry.matches(':').count() == 1 {
        let (net, ports) = entry.split_once(':').unwrap_or((entry, ""));
        (net, Some(ports))
    } else {
        (entry, None)
    };
    let ports = match ports {
        None => 1..=u16::MAX,
        Some(ports) => parse_ports(ports).ok_or_else(|| {
            bad("ports are a port or an inclusive range from 1 to 65535, such as 8000-8999")
        })?,
    };
    let blocks = match net {
        "any" => vec![
            Block {
                addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                prefix: 0,
            },
            Block {
                addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                prefix: 0,
            },
        ],
        "loopback" => vec![
            Block {
                addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
                prefix: 8,
            },
            Block {
                addr: IpAddr::V6(Ipv6Addr::LOCALHOST),
                prefix: 128,
            },
        ],
        net => vec![parse_block(net).ok_or_else(|| {
            bad("expected an IP address, a CIDR block such as 10.0.0.0/8, `loopback` or `any`")
        })?],
    };
    Ok(Rule {
        blocks,
        ports,
        text: entry.to_owned(),
    })
}

fn parse_ports(text: &str) -> Option<RangeInclusive<u16>> {
    let (low, high) = text.split_once('-').unwrap_or((text, text));
    let (low, high): (u16, u16) = (low.trim().parse().ok()?, high.trim().parse().ok()?);
    (low >= 1 && low <= high).then_some(low..=high)
}

fn parse_block(text: &str) -> Option<Block> {
    let (addr, prefix) = text.split_once('/').unwrap_or((text, ""));
    let addr = canonical(addr.parse::<IpAddr>().ok()?);
    let width = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        "" => width,
        prefix => prefix.parse::<u8>().ok().filter(|p| *p <= width)?,
    };
    Some(Block { addr, prefix })
}

impl AllowTargets {
    /// Every address on every port.
    pub fn any() -> Self {
        Self::from_str("any").unwrap_or(Self { rules: Vec::new() })
    }

    /// The addresses either list allows.
    #[must_use]
    pub fn union(&self, other: &Self) -> Self {
        let mut rules = self.rules.clone();
        rules.extend(other.rules.iter().cloned());
        Self { rules }
    }

    /// Whether `addr` may be sent to. An unspecified address (`0.0.0.0`, `::`) never
    /// may: connecting to it reaches this host, whatever the list says of loopback.
    pub fn allows(&self, addr: SocketAddr) -> bool {
        let ip = canonical(addr.ip());
        !ip.is_unspecified()
            && self
                .rules
                .iter()
                .any(|rule| rule.ports.contains(&addr.port()) && rule.allows_ip(ip))
    }

    /// Whether `ip` may be sent to on some port (what a resolver can tell: the port
    /// comes from the URL, checked when it was registered).
    pub fn allows_ip(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        !ip.is_unspecified() && self.rules.iter().any(|rule| rule.allows_ip(ip))
    }

    /// Checks that `url` (`http(s)://host[:port][/path]`) reaches only allowed
    /// addresses: an address as written, a name as it resolves now (every address it
    /// resolves to).
    ///
    /// # Errors
    ///
    /// [`TargetRefused`] naming the address refused, or the name that does not
    /// resolve.
    pub async fn check_url(&self, url: &str) -> Result<(), TargetRefused> {
        let refused = |why: String| TargetRefused(format!("{url}: {why}; allowed: {self}"));
        let (host, port) = host_and_port(url).ok_or_else(|| refused("no host".into()))?;
        let addrs: Vec<SocketAddr> = match host.trim_matches(['[', ']']).parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => {
                let lookup = tokio::net::lookup_host((host, port));
                match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
                    Ok(Ok(addrs)) => addrs.collect(),
                    Ok(Err(err)) => return Err(refused(format!("{host} does not resolve: {err}"))),
                    Err(_) => {
                        return Err(refused(format!(
                            "{host} did not resolve within {RESOLVE_TIMEOUT:?}"
                        )));
                    }
                }
            }
        };
        if addrs.is_empty() {
            return Err(refused(format!("{host} resolves to no address")));
        }
        match addrs.iter().find(|addr| !self.allows(**addr)) {
            Some(addr) => Err(refused(format!("{addr} is not an allowed target"))),
            None => Ok(()),
        }
    }
}

/// Why a URL may not be registered: which address is refused, and the list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TargetRefused(String);

/// The host (brackets kept for IPv6) and port of an `http(s)://` URL.
fn host_and_port(url: &str) -> Option<(&str, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    let default = if scheme == "https" { 443 } else { 80 };
    match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => Some((host, port.parse().ok()?)),
        _ => Some((authority, default)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(list: &str, addr: &str) -> bool {
        let list: AllowTargets = list.parse().expect("a list");
        list.allows(addr.parse().expect("an address"))
    }

    #[test]
    fn entries_should_match_their_blocks_and_ports() {
        assert!(allows("loopback", "127.0.0.1:80"));
        assert!(allows("loopback", "127.9.9.9:80"));
        assert!(allows("loopback", "[::1]:80"));
        assert!(!allows("loopback", "10.0.0.1:80"));
        assert!(allows("10.0.0.0/8:8000-8999", "10.1.2.3:8000"));
        assert!(allows("10.0.0.0/8:8000-8999", "10.1.2.3:8999"));
        assert!(!allows("10.0.0.0/8:8000-8999", "10.1.2.3:9000"));
        assert!(!allows("10.0.0.0/8:8000-8999", "11.1.2.3:8000"));
        assert!(allows("192.168.1.7", "192.168.1.7:22"));
        assert!(!allows("192.168.1.7", "192.168.1.8:22"));
        assert!(allows("[fd00::/8]:443", "[fd12::1]:443"));
        assert!(!allows("[fd00::/8]:443", "[fd12::1]:80"));
        assert!(allows("127.0.0.1:20000-20100,10.0.0.0/8", "10.0.0.1:1"));
        assert!(allows("any", "8.8.8.8:53"));
        assert!(allows("any", "[2001:db8::1]:53"));
    }

    #[test]
    fn an_ipv4_address_written_as_ipv6_should_meet_the_ipv4_rules() {
        assert!(!allows("10.0.0.0/8", "[::ffff:127.0.0.1]:80"));
        assert!(allows("loopback", "[::ffff:127.0.0.1]:80"));
    }

    #[test]
    fn an_unspecified_address_should_never_be_allowed() {
        assert!(!allows("any", "0.0.0.0:80"));
        assert!(!allows("any", "[::]:80"));
        assert!(!allows("0.0.0.0/0", "0.0.0.0:80"));
    }

    #[test]
    fn malformed_entries_should_be_refused_with_the_entry() {
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0.0/8:0",
            "10.0.0.0/8:9-8",
            "host.example",
            "[fd00::/8",
            "[fd00::/8]8000",
            "loopback:70000",
        ] {
            let err = bad.parse::<AllowTargets>().expect_err(bad);
            assert!(err.to_string().contains("target entry"), "{err}");
        }
    }

    #[tokio::test]
    async fn a_url_should_be_checked_at_its_port_and_every_address_it_resolves_to() {
        let list: AllowTargets = "127.0.0.1:20000-20100".parse().expect("a list");
        assert!(list.check_url("http://127.0.0.1:20001").await.is_ok());
        assert!(list.check_url("http://127.0.0.1:20001/x/y").await.is_ok());
        let err = list
            .check_url("http://127.0.0.1:22")
            .await
            .expect_err("port 22");
        assert!(err.to_string().contains("127.0.0.1:22"), "{err}");
        assert!(list.check_url("http://10.0.0.1:20001").await.is_err());
        assert!(list.check_url("http://127.0.0.1").await.is_err());
        let loopback: AllowTargets = "loopback:20000-20100".parse().expect("a list");
        assert!(loopback.check_url("http://localhost:20001").await.is_ok());
        assert!(loopback.check_url("http://localhost:22").await.is_err());
    }
}
