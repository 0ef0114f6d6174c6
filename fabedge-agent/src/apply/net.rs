//! Links, addresses and routes, through route netlink ([`rtnl`]): no
//! iproute2 on the node. Every route we install carries protocol
//! `RTPROT_FABEDGE`, which is how we recognise (and only ever delete) our
//! own. Each writer compares first and changes only what differs.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;

use super::rtnl::{LinkChange, LinkInfo, LinkKind, RouteSpec, Rtnl, msg::RT_TABLE_MAIN};
use crate::{
    model::{format_mac, parse_mac},
    plan::KernelRoute,
};

/// Routing protocol id marking routes fabedge owns (`ip route show proto 0xfe`).
pub const RTPROT_FABEDGE: u8 = 0xfe;

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

impl From<&LinkInfo> for Link {
    fn from(info: &LinkInfo) -> Self {
        Link {
            name: info.name.clone(),
            kind: info.kind.clone(),
            mac: info.mac.map(format_mac),
            mtu: info.mtu,
            up: info.flags & super::rtnl::msg::IFF_UP != 0,
            noarp: info.flags & super::rtnl::msg::IFF_NOARP != 0,
            vxlan_port: info.vxlan_port,
            vxlan_external: info.vxlan_external,
        }
    }
}

pub fn link(name: &str) -> Result<Option<Link>> {
    Ok(Rtnl::open()?.link(name)?.as_ref().map(Link::from))
}

pub fn require_link(name: &str) -> Result<Link> {
    link(name)?.with_context(|| format!("interface {name} does not exist"))
}

/// The name of `iface`'s veth peer when `iface` is a veth and its peer runs
/// no XDP program; `None` for other links, or a peer with a program.
///
/// Native XDP_TX out of a veth queues the frame on the peer's ring, and the
/// kernel (`veth_xdp_flush` in 6.1 and 6.12) wakes the peer only when the
/// peer has an XDP program itself (redirects wake it anyway): without one the frames
/// wait for the next packet the peer's stack sends, and are lost when the
/// ring fills (`ethtool -S`: `rx_queue_0_xdp_tx_errors`).
pub fn veth_peer_without_xdp(iface: &str) -> Result<Option<String>> {
    let mut nl = Rtnl::open_strict()?;
    let Some(link) = nl.link(iface)? else {
        return Ok(None);
    };
    let (Some("veth"), Some(peer)) = (link.kind.as_deref(), link.link) else {
        return Ok(None);
    };
    let peer = match link.link_netnsid {
        Some(netnsid) => nl.link_in(netnsid, peer)?,
        None => nl.links()?.into_iter().find(|l| l.index == peer),
    }
    .with_context(|| format!("reading the veth peer (ifindex {peer}) of {iface}"))?;
    Ok((!peer.xdp_attached).then_some(peer.name))
}

/// The link `name` after creating it as `kind` (down, kernel defaults).
fn create_link(nl: &mut Rtnl, name: &str, kind: &LinkKind) -> Result<LinkInfo> {
    nl.add_link(name, kind)?;
    nl.link(name)?
        .with_context(|| format!("link {name} vanished right after it was created"))
}

/// Create `name` as `kind` (fails if it exists).
pub fn add_link(name: &str, kind: &LinkKind) -> Result<()> {
    Rtnl::open()?.add_link(name, kind)?;
    Ok(())
}

/// Set what `change` names on `name`, if it differs from `current`.
fn change_link(nl: &mut Rtnl, current: &LinkInfo, wanted: LinkChange) -> Result<()> {
    let up = current.flags & super::rtnl::msg::IFF_UP != 0;
    let noarp = current.flags & super::rtnl::msg::IFF_NOARP != 0;
    let change = LinkChange {
        mac: wanted.mac.filter(|mac| current.mac != Some(*mac)),
        mtu: wanted.mtu.filter(|&mtu| current.mtu != mtu),
        up: wanted.up.filter(|&on| on != up),
        noarp: wanted.noarp.filter(|&on| on != noarp),
    };
    if change != LinkChange::default() {
        nl.set_link(current, &change)?;
    }
    Ok(())
}

/// Give `name` `mtu` and bring it up (what differs only).
pub fn set_mtu_up(name: &str, mtu: u32) -> Result<()> {
    let mut nl = Rtnl::open()?;
    let current = nl
        .link(name)?
        .with_context(|| format!("interface {name} does not exist"))?;
    change_link(
        &mut nl,
        &current,
        LinkChange {
            mtu: Some(mtu),
            up: Some(true),
            ..LinkChange::default()
        },
    )
}

/// Make `name` a bridge with `address` (gateway of the pod CIDR), up.
pub fn ensure_bridge(name: &str, address: Ipv4Net, mtu: Option<u32>) -> Result<()> {
    let mut nl = Rtnl::open()?;
    let current = match nl.link(name)? {
        Some(l) if l.kind.as_deref() == Some("bridge") => l,
        Some(l) => bail!(
            "{name} exists but is a {:?}, not a bridge: remove it or choose another bridge name",
            l.kind
        ),
        None => create_link(&mut nl, name, &LinkKind::Bridge)?,
    };
    change_link(
        &mut nl,
        &current,
        LinkChange {
            mtu,
            ..LinkChange::default()
        },
    )?;
    ensure_address_on(&mut nl, &current, address)?;
    change_link(
        &mut nl,
        &current,
        LinkChange {
            up: Some(true),
            ..LinkChange::default()
        },
    )
}

/// Make `name` a collect-metadata VXLAN device on `port`, NOARP, with `mac` and `mtu`.
pub fn ensure_vxlan_external(name: &str, port: u16, mac: &str, mtu: u32) -> Result<()> {
    let mac = parse_mac(mac).with_context(|| format!("{mac:?} is not a MAC address"))?;
    let mut nl = Rtnl::open()?;
    let existing = nl.link(name)?;
    let current = match existing {
        Some(l)
            if l.kind.as_deref() == Some("vxlan")
                && l.vxlan_external
                && l.vxlan_port == Some(port) =>
        {
            l
        }
        other => {
            if let Some(wrong) = other {
                // Wrong shape (another port, or not ours): recreate. Only our name is touched.
                nl.del_link(&wrong)?;
            }
            create_link(&mut nl, name, &LinkKind::VxlanExternal { port })?
        }
    };
    change_link(
        &mut nl,
        &current,
        LinkChange {
            mac: Some(mac),
            mtu: Some(mtu),
            noarp: Some(true),
            up: Some(true),
        },
    )
}

fn ensure_address_on(nl: &mut Rtnl, link: &LinkInfo, address: Ipv4Net) -> Result<()> {
    let present = nl
        .addrs()?
        .iter()
        .any(|a| a.index == link.index && a.address == address);
    if !present {
        nl.replace_addr(link, address)?;
    }
    Ok(())
}

pub fn ensure_address(dev: &str, address: Ipv4Net) -> Result<()> {
    let mut nl = Rtnl::open()?;
    let link = nl
        .link(dev)?
        .with_context(|| format!("interface {dev} does not exist"))?;
    ensure_address_on(&mut nl, &link, address)
}

pub fn delete_link_if_present(name: &str) -> Result<bool> {
    let mut nl = Rtnl::open()?;
    match nl.link(name)? {
        Some(link) => {
            nl.del_link(&link)?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// The device the kernel routes packets for each of `dsts` through (`ip
/// route get`); an unreachable address gives none.
pub fn route_devices(
    dsts: impl IntoIterator<Item = Ipv4Addr>,
) -> Result<BTreeMap<Ipv4Addr, String>> {
    let mut nl = Rtnl::open()?;
    let names: BTreeMap<u32, String> = nl.links()?.into_iter().map(|l| (l.index, l.name)).collect();
    let mut devices = BTreeMap::new();
    for dst in dsts {
        // Unreachable right now (ENETUNREACH): its traffic cannot arrive either.
        let Ok(Some(route)) = nl.route_to(dst) else {
            continue;
        };
        if let Some(name) = route.oif.and_then(|index| names.get(&index)) {
            devices.insert(dst, name.clone());
        }
    }
    Ok(devices)
}

/// Our routes (protocol `RTPROT_FABEDGE`) in the main table.
pub fn our_routes() -> Result<Vec<KernelRoute>> {
    let mut nl = Rtnl::open()?;
    let routes: Vec<_> = nl
        .routes()?
        .into_iter()
        .filter(|r| r.table == RT_TABLE_MAIN as u32 && r.protocol == RTPROT_FABEDGE)
        .collect();
    if routes.is_empty() {
        return Ok(Vec::new());
    }
    let names: BTreeMap<u32, String> = nl.links()?.into_iter().map(|l| (l.index, l.name)).collect();
    Ok(routes
        .into_iter()
        .map(|r| KernelRoute {
            dst: r.dst,
            dev: r.oif.map(|index| {
                names
                    .get(&index)
                    .cloned()
                    .unwrap_or_else(|| format!("if{index}"))
            }),
            via: r.gateway,
            src: r.prefsrc,
        })
        .collect())
}

/// Routes of the main table that are not ours (any other protocol: the
/// kernel's connected routes, DHCP, static routes, other daemons), by
/// destination, each described as errors name it. We never replace or
/// remove them: a planned route to one of these destinations is a conflict.
pub fn foreign_routes() -> Result<BTreeMap<Ipv4Net, String>> {
    let mut nl = Rtnl::open()?;
    let routes: Vec<_> = nl
        .routes()?
        .into_iter()
        .filter(|r| r.table == RT_TABLE_MAIN as u32 && r.protocol != RTPROT_FABEDGE)
        .collect();
    let names: BTreeMap<u32, String> = nl.links()?.into_iter().map(|l| (l.index, l.name)).collect();
    let mut foreign = BTreeMap::new();
    for route in routes {
        let described = KernelRoute {
            dst: route.dst,
            dev: route.oif.map(|index| {
                names
                    .get(&index)
                    .cloned()
                    .unwrap_or_else(|| format!("if{index}"))
            }),
            via: route.gateway,
            src: route.prefsrc,
        };
        let text = format!(
            "{} proto {}",
            describe_route(&described),
            protocol_name(route.protocol)
        );
        foreign.entry(route.dst).or_insert(text);
    }
    Ok(foreign)
}

/// A route protocol as `ip route` names it.
fn protocol_name(protocol: u8) -> String {
    match protocol {
        2 => "kernel".into(),
        3 => "boot".into(),
        4 => "static".into(),
        16 => "dhcp".into(),
        other => other.to_string(),
    }
}

/// The names of this host's interfaces.
pub fn link_names() -> Result<std::collections::BTreeSet<String>> {
    Ok(Rtnl::open()?.links()?.into_iter().map(|l| l.name).collect())
}

/// The IPv4 addresses configured on this host's interfaces.
pub fn local_addresses() -> Result<std::collections::BTreeSet<Ipv4Addr>> {
    Ok(Rtnl::open()?
        .addrs()?
        .into_iter()
        .map(|a| a.address.addr())
        .collect())
}

/// Whether an installed route is the one planned (a planned route without a
/// device accepts whichever device the kernel chose to reach `via`).
pub fn route_matches(planned: &KernelRoute, installed: &KernelRoute) -> bool {
    planned.dst == installed.dst
        && planned.via == installed.via
        && planned.src == installed.src
        && (planned.dev.is_none() || planned.dev == installed.dev)
}

/// How errors name a route: `route 10.244.2.0/24 via 10.0.0.2 dev fe-tunnel`.
pub fn describe_route(route: &KernelRoute) -> String {
    let mut text = format!("route {}", route.dst);
    if let Some(via) = route.via {
        text.push_str(&format!(" via {via}"));
    }
    if let Some(dev) = &route.dev {
        text.push_str(&format!(" dev {dev}"));
    }
    if let Some(src) = route.src {
        text.push_str(&format!(" src {src}"));
    }
    text
}

/// Install `route` in the main table, replacing any route to the same
/// destination there.
pub fn replace_route(route: &KernelRoute) -> Result<()> {
    let mut nl = Rtnl::open()?;
    let what = describe_route(route);
    let oif = match &route.dev {
        Some(dev) => Some(
            nl.link(dev)?
                .with_context(|| format!("{what}: device {dev} does not exist"))?
                .index,
        ),
        None => None,
    };
    let spec = RouteSpec {
        dst: route.dst,
        table: RT_TABLE_MAIN as u32,
        protocol: RTPROT_FABEDGE,
        oif,
        gateway: route.via,
        prefsrc: route.src,
    };
    nl.replace_route(&spec, &what)?;
    Ok(())
}

/// Remove our route to `route.dst`; one already gone is fine.
pub fn delete_route(route: &KernelRoute) -> Result<()> {
    let what = format!("deleting {}", describe_route(route));
    match Rtnl::open()?.del_route(route.dst, RT_TABLE_MAIN as u32, RTPROT_FABEDGE, &what) {
        Err(e) if e.errno() == Some(libc::ESRCH) => Ok(()),
        other => Ok(other?),
    }
}
