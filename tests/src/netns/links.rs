//! Links, addresses, routes and sysctls inside a namespace: veth pairs, bridges, MACs.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};

use crate::packet::{Mac, format_mac, parse_mac};

use super::IFNAME_MAX_LEN;
use super::commands::run_ok;
use super::namespace::Netns;

impl Netns {
    /// Creates bridge `name` and brings it up. STP stays off, so ports forward at once.
    pub fn bridge(&self, name: &str) -> Result<()> {
        check_ifname(name)?;
        self.ip(&["link", "add", "name", name, "type", "bridge"])
            .with_context(|| format!("creating bridge {name} in netns {}", self.name))?;
        self.set_up(name)
    }

    /// Makes `port` a port of `bridge`.
    pub fn attach_to_bridge(&self, port: &str, bridge: &str) -> Result<()> {
        self.ip(&["link", "set", "dev", port, "master", bridge])
            .with_context(|| format!("adding {port} to bridge {bridge} in netns {}", self.name))
            .map(drop)
    }

    /// Adds an address like `10.244.1.2/24` to `ifname`.
    pub fn add_addr(&self, ifname: &str, cidr: &str) -> Result<()> {
        ensure!(
            cidr.contains('/'),
            "address {cidr:?} for {ifname} needs a prefix length, e.g. {cidr}/24"
        );
        self.ip(&["addr", "add", cidr, "dev", ifname])
            .with_context(|| format!("adding {cidr} to {ifname} in netns {}", self.name))
            .map(drop)
    }

    pub fn set_up(&self, ifname: &str) -> Result<()> {
        self.ip(&["link", "set", "dev", ifname, "up"])
            .with_context(|| format!("bringing {ifname} up in netns {}", self.name))
            .map(drop)
    }

    pub fn set_mac(&self, ifname: &str, mac: Mac) -> Result<()> {
        self.ip(&["link", "set", "dev", ifname, "address", &format_mac(&mac)])
            .with_context(|| format!("setting the MAC of {ifname} in netns {}", self.name))
            .map(drop)
    }

    pub fn mac(&self, ifname: &str) -> Result<Mac> {
        let address = self.link_field(ifname, "address")?;
        let text = address
            .as_str()
            .with_context(|| format!("{ifname} reports a non-text address {address}"))?;
        parse_mac(text).with_context(|| format!("MAC of {ifname} in netns {}", self.name))
    }

    pub fn ifindex(&self, ifname: &str) -> Result<u32> {
        let index = self.link_field(ifname, "ifindex")?;
        index
            .as_u64()
            .and_then(|index| u32::try_from(index).ok())
            .with_context(|| {
                format!(
                    "{ifname} in netns {} reports a bad ifindex {index}",
                    self.name
                )
            })
    }

    /// One field of `ip -j link show dev <ifname>`.
    fn link_field(&self, ifname: &str, field: &str) -> Result<serde_json::Value> {
        let json = self
            .ip(&["-j", "link", "show", "dev", ifname])
            .with_context(|| format!("looking up {ifname} in netns {}", self.name))?;
        let links: serde_json::Value = serde_json::from_str(&json)
            .with_context(|| format!("parsing `ip -j link show` output {json:?}"))?;
        links
            .get(0)
            .and_then(|link| link.get(field))
            .cloned()
            .with_context(|| format!("`ip -j link show dev {ifname}` has no {field:?}: {json}"))
    }

    /// Adds a route to `destination` (`10.244.0.0/16`, `default`).
    pub fn add_route(&self, destination: &str, next_hop: NextHop<'_>) -> Result<()> {
        let gateway;
        let mut args = vec!["route", "add", destination];
        match next_hop {
            NextHop::Gateway(address) => {
                gateway = address.to_string();
                args.extend(["via", gateway.as_str()]);
            }
            NextHop::Device(device) => args.extend(["dev", device]),
            NextHop::GatewayOnDevice(address, device) => {
                gateway = address.to_string();
                args.extend(["via", gateway.as_str(), "dev", device]);
            }
        }
        self.ip(&args)
            .with_context(|| format!("adding route {destination} in netns {}", self.name))
            .map(drop)
    }

    /// Writes a sysctl of this namespace, e.g. `("net.ipv4.ip_forward", "1")` or
    /// `("net/ipv4/conf/eth0.100/rp_filter", "0")` when a name contains dots.
    pub fn set_sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = sysctl_path(key)?;
        self.enter(|| {
            // /proc/sys/net resolves to the namespace of the thread that opens it.
            fs::write(&path, value)
                .with_context(|| format!("writing {value:?} to {}", path.display()))
        })
        .with_context(|| format!("setting sysctl {key}={value}"))
    }

    /// Reads a sysctl of this namespace (trimmed).
    pub fn sysctl(&self, key: &str) -> Result<String> {
        let path = sysctl_path(key)?;
        self.enter(|| {
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        })
        .map(|value| value.trim().to_owned())
        .with_context(|| format!("reading sysctl {key}"))
    }
}

/// Turns `net.ipv4.ip_forward` into `/proc/sys/net/ipv4/ip_forward`.
fn sysctl_path(key: &str) -> Result<PathBuf> {
    ensure!(
        !key.contains("..") && (key.starts_with("net.") || key.starts_with("net/")),
        "sysctl {key:?}: only net.* sysctls belong to a network namespace (others would \
         change the host); write it like net.ipv4.ip_forward"
    );
    let relative = if key.contains('/') {
        key.to_owned()
    } else {
        key.replace('.', "/")
    };
    Ok(Path::new("/proc/sys").join(relative))
}

/// Where a route sends its traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextHop<'a> {
    Gateway(Ipv4Addr),
    Device(&'a str),
    GatewayOnDevice(Ipv4Addr, &'a str),
}

/// Rejects interface names Linux would refuse, with the reason.
pub(super) fn check_ifname(name: &str) -> Result<()> {
    ensure!(
        name.len() <= IFNAME_MAX_LEN,
        "interface name {name:?} is {} bytes; Linux allows at most {IFNAME_MAX_LEN} (IFNAMSIZ 16 with the NUL): shorten it",
        name.len()
    );
    ensure!(
        !name.is_empty() && !name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace()),
        "interface name {name:?} must be non-empty without '/', ':' or spaces"
    );
    Ok(())
}

/// Creates a veth pair with `a_if` in `a` and `b_if` in `b`, both up. Both ends are
/// created inside their namespaces, never in the host's.
pub fn veth_pair(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    check_ifname(a_if)?;
    check_ifname(b_if)?;
    let a_end = ["link", "add", "name", a_if, "netns", a.name()];
    let b_end = ["type", "veth", "peer", "name", b_if, "netns", b.name()];
    let args = [&a_end[..], &b_end[..]].concat();
    run_ok("ip", &args).with_context(|| {
        format!(
            "creating veth {a_if} (netns {}) <-> {b_if} (netns {})",
            a.name(),
            b.name()
        )
    })?;
    a.set_up(a_if)?;
    b.set_up(b_if)
}
