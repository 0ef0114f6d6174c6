//! Links, addresses and routes, through iproute2's JSON interface.
//! Every route we install carries protocol `RTPROT_FABEDGE`, which is how we
//! recognise (and only ever delete) our own.

use std::{net::Ipv4Addr, process::Command};

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;
use serde::Deserialize;

use crate::plan::KernelRoute;

/// Routing protocol id marking routes fabedge owns (`ip route show proto 0xfe`).
pub const RTPROT_FABEDGE: u8 = 0xfe;

/// Run `ip ARGS`, returning stdout; the error names the command and its stderr.
pub fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running ip {} (is iproute2 installed?)", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[derive(Debug, Deserialize)]
struct LinkJson {
    ifname: String,
    #[serde(default)]
    address: Option<String>,
    mtu: u32,
    #[serde(default)]
    flags: Vec<String>,
    #[serde(default)]
    linkinfo: Option<LinkInfoJson>,
}

#[derive(Debug, Deserialize)]
struct LinkInfoJson {
    info_kind: Option<String>,
    #[serde(default)]
    info_data: Option<serde_json::Value>,
}

/// What we know of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub kind: Option<String>,
    pub mac: Option<String>,
    pub mtu: u32,
    pub up: bool,
    pub noarp: bool,
    /// VXLAN only: destination port and whether it is collect-metadata.
    pub vxlan_port: Option<u16>,
    pub vxlan_external: bool,
}

pub fn link(name: &str) -> Result<Option<Link>> {
    let out = Command::new("ip")
        .args(["-j", "-d", "link", "show", "dev", name])
        .output()
        .context("running ip link show")?;
    if !out.status.success() {
        return Ok(None);
    }
    let links: Vec<LinkJson> = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing `ip -j link show {name}`"))?;
    Ok(links.into_iter().next().map(|l| {
        let data = l
            .linkinfo
            .as_ref()
            .and_then(|i| i.info_data.clone())
            .unwrap_or_default();
        Link {
            kind: l.linkinfo.as_ref().and_then(|i| i.info_kind.clone()),
            mac: l.address,
            mtu: l.mtu,
            up: l.flags.iter().any(|f| f == "UP"),
            noarp: l.flags.iter().any(|f| f == "NOARP"),
            vxlan_port: data.get("port").and_then(|p| p.as_u64()).map(|p| p as u16),
            vxlan_external: data
                .get("external")
                .and_then(|e| e.as_bool())
                .unwrap_or(false),
            name: l.ifname,
        }
    }))
}

pub fn require_link(name: &str) -> Result<Link> {
    link(name)?.with_context(|| format!("interface {name} does not exist"))
}

/// Make `name` a bridge with `address` (gateway of the pod CIDR), up.
pub fn ensure_bridge(name: &str, address: Ipv4Net, mtu: Option<u32>) -> Result<()> {
    match link(name)? {
        Some(l) if l.kind.as_deref() == Some("bridge") => {}
        Some(l) => bail!(
            "{name} exists but is a {:?}, not a bridge: remove it or choose another bridge name",
            l.kind
        ),
        None => {
            ip(&["link", "add", name, "type", "bridge"])?;
        }
    }
    if let Some(mtu) = mtu {
        ip(&["link", "set", name, "mtu", &mtu.to_string()])?;
    }
    ensure_address(name, address)?;
    ip(&["link", "set", name, "up"])?;
    Ok(())
}

/// Make `name` a collect-metadata VXLAN device on `port`, NOARP, with `mac` and `mtu`.
pub fn ensure_vxlan_external(name: &str, port: u16, mac: &str, mtu: u32) -> Result<()> {
    if let Some(l) = link(name)? {
        let right =
            l.kind.as_deref() == Some("vxlan") && l.vxlan_external && l.vxlan_port == Some(port);
        if !right {
            // Wrong shape (another port, or not ours): recreate. Only our name is touched.
            ip(&["link", "del", name])?;
        }
    }
    if link(name)?.is_none() {
        ip(&[
            "link",
            "add",
            name,
            "type",
            "vxlan",
            "external",
            "dstport",
            &port.to_string(),
            "nolearning",
        ])?;
    }
    ip(&[
        "link",
        "set",
        name,
        "address",
        mac,
        "mtu",
        &mtu.to_string(),
        "arp",
        "off",
        "up",
    ])?;
    Ok(())
}

#[derive(Debug, Deserialize)]
struct AddrLinkJson {
    #[serde(default)]
    addr_info: Vec<AddrInfoJson>,
}

#[derive(Debug, Deserialize)]
struct AddrInfoJson {
    local: Option<Ipv4Addr>,
    prefixlen: Option<u8>,
}

pub fn ensure_address(dev: &str, address: Ipv4Net) -> Result<()> {
    let out = ip(&["-j", "-4", "addr", "show", "dev", dev])?;
    let links: Vec<AddrLinkJson> = serde_json::from_str(&out)
        .with_context(|| format!("parsing `ip -j addr show dev {dev}`"))?;
    let present = links
        .iter()
        .flat_map(|l| &l.addr_info)
        .any(|a| a.local == Some(address.addr()) && a.prefixlen == Some(address.prefix_len()));
    if !present {
        ip(&["addr", "replace", &address.to_string(), "dev", dev])?;
    }
    Ok(())
}

pub fn delete_link_if_present(name: &str) -> Result<bool> {
    if link(name)?.is_some() {
        ip(&["link", "del", name])?;
        return Ok(true);
    }
    Ok(false)
}

#[derive(Debug, Deserialize)]
struct RouteJson {
    dst: String,
    #[serde(default)]
    dev: Option<String>,
    #[serde(default)]
    gateway: Option<Ipv4Addr>,
    #[serde(default)]
    prefsrc: Option<Ipv4Addr>,
}

/// Our routes (protocol `RTPROT_FABEDGE`) in the main table.
pub fn our_routes() -> Result<Vec<KernelRoute>> {
    let out = ip(&[
        "-j",
        "-4",
        "route",
        "show",
        "proto",
        &RTPROT_FABEDGE.to_string(),
    ])?;
    let parsed: Vec<RouteJson> =
        serde_json::from_str(&out).context("parsing `ip -j route show`")?;
    parsed
        .into_iter()
        .map(|r| {
            let dst = if r.dst.contains('/') {
                r.dst.parse()
            } else {
                format!("{}/32", r.dst).parse()
            };
            Ok(KernelRoute {
                dst: dst.with_context(|| format!("route destination {:?}", r.dst))?,
                dev: r.dev,
                via: r.gateway,
                src: r.prefsrc,
            })
        })
        .collect()
}

/// Whether an installed route is the one planned (a planned route without a
/// device accepts whichever device the kernel chose to reach `via`).
pub fn route_matches(planned: &KernelRoute, installed: &KernelRoute) -> bool {
    planned.dst == installed.dst
        && planned.via == installed.via
        && planned.src == installed.src
        && (planned.dev.is_none() || planned.dev == installed.dev)
}

pub fn replace_route(route: &KernelRoute) -> Result<()> {
    let dst = route.dst.to_string();
    let proto = RTPROT_FABEDGE.to_string();
    let mut args = vec!["route", "replace", dst.as_str(), "proto", proto.as_str()];
    if let Some(dev) = &route.dev {
        args.extend(["dev", dev.as_str()]);
    }
    let via = route.via.map(|v| v.to_string());
    let src = route.src.map(|s| s.to_string());
    match &via {
        Some(via) => args.extend(["via", via.as_str()]),
        None => args.extend(["scope", "link"]),
    }
    if let Some(src) = &src {
        args.extend(["src", src.as_str()]);
    }
    ip(&args).map(|_| ())
}

pub fn delete_route(route: &KernelRoute) -> Result<()> {
    ip(&[
        "route",
        "del",
        &route.dst.to_string(),
        "proto",
        &RTPROT_FABEDGE.to_string(),
    ])
    .map(|_| ())
}
