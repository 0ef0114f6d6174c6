//! The NAT sites: edges moved behind masquerading routers, as behind a home
//! or mobile NAT. Every edge on one site, or ([`ClusterOptions::second_site`])
//! [`SECOND_SITE_EDGE`] on a second site behind a router of its own, so that
//! two community members must reach each other through two NATs.

use std::{fs, net::Ipv4Addr, path::Path};

use anyhow::{Context, Result, ensure};
use ipnet::Ipv4Net;

use crate::netns::{Netns, veth_pair};

use super::fixture::{Manifest, NodeRole, NodeSpec};
use super::{
    Cluster, NAT_PUBLIC_IP, NAT_SITE_IP, SECOND_NAT_PUBLIC_IP, SECOND_NAT_SITE_IP, SECOND_SITE,
    SECOND_SITE_BRIDGE, SECOND_SITE_EDGE, SITE, SITE_BRIDGE, WAN, WAN_BRIDGE, WAN_NIC,
};

#[cfg(test)]
mod tests;

/// How a NAT router maps one inside socket's flows onto its public address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// One public port per inside socket, whatever the destination (plain
    /// MASQUERADE keeps the source port when it can): the port the connector
    /// sees is the port a peer can punch a hole toward.
    EndpointIndependent,
    /// A new random public port per destination (`MASQUERADE
    /// --random-fully`): the port the connector sees is not the one a peer's
    /// packets would meet.
    Symmetric,
}

/// The second NAT site ([`ClusterOptions::second_site`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecondSite {
    /// The second router's kind (the first is endpoint-independent).
    pub nat: NatKind,
    /// The second router starts out dropping what it would forward to or
    /// from the first site's public address, as a firewall between them
    /// would, until [`Cluster::unblock_between_sites`].
    pub blocked_from_first_site: bool,
}

impl SecondSite {
    /// A second site behind a router of kind `nat`, nothing blocked.
    pub fn behind(nat: NatKind) -> Self {
        SecondSite {
            nat,
            blocked_from_first_site: false,
        }
    }
}

/// A site LAN and the router in front of it.
#[derive(Debug)]
pub(super) struct NatSite {
    /// The router's namespace.
    router: &'static str,
    /// The switch's bridge for the LAN.
    pub(super) bridge: &'static str,
    /// The switch's ports facing the router's LAN and WAN NICs.
    switch_ports: (&'static str, &'static str),
    pub(super) lan: Ipv4Net,
    /// The router's address on the LAN: the inside hosts' way to the WAN.
    pub(super) gateway: Ipv4Addr,
    /// Every packet of the site leaves with it.
    pub(super) public: Ipv4Addr,
}

/// Every edge's site, or the first of two.
pub(super) const FIRST_NAT_SITE: NatSite = NatSite {
    router: "nat",
    bridge: SITE_BRIDGE,
    switch_ports: ("nat-site", "nat-wan"),
    lan: SITE,
    gateway: NAT_SITE_IP,
    public: NAT_PUBLIC_IP,
};

/// [`SECOND_SITE_EDGE`]'s site ([`ClusterOptions::second_site`]).
pub(super) const SECOND_NAT_SITE: NatSite = NatSite {
    router: "nat-2",
    bridge: SECOND_SITE_BRIDGE,
    switch_ports: ("nat-2-site", "nat-2-wan"),
    lan: SECOND_SITE,
    gateway: SECOND_NAT_SITE_IP,
    public: SECOND_NAT_PUBLIC_IP,
};

impl NatSite {
    /// The site LAN's address with host part `host` (an edge keeps the last
    /// octet of its public address).
    pub(super) fn address(&self, host: u8) -> Ipv4Addr {
        let [a, b, c, _] = self.lan.network().octets();
        Ipv4Addr::new(a, b, c, host)
    }
}

/// The site edge `name` sits on when the edges are behind NAT.
fn site_of_edge(name: &str, second_site: bool) -> &'static NatSite {
    if second_site && name == SECOND_SITE_EDGE {
        &SECOND_NAT_SITE
    } else {
        &FIRST_NAT_SITE
    }
}

impl Cluster {
    /// The NAT router in front of the edges ([`ClusterOptions::edges_behind_nat`]).
    pub fn nat_router(&self) -> Result<&Netns> {
        self.nat
            .as_ref()
            .context("this cluster has no NAT router (ClusterOptions::edges_behind_nat)")
    }

    /// The second site's router ([`ClusterOptions::second_site`]).
    pub fn second_nat_router(&self) -> Result<&Netns> {
        self.second_nat
            .as_ref()
            .context("this cluster has no second NAT site (ClusterOptions::second_site)")
    }

    /// The second site's router drops everything it would forward to or from
    /// the first site's public address, as a firewall between the two would:
    /// the sites reach each other only through the connector.
    pub fn block_between_sites(&self) -> Result<()> {
        wall_between_sites(self.second_nat_router()?, "-I")
            .context("blocking the path between the NAT sites")
    }

    /// Lifts [`Cluster::block_between_sites`] (or
    /// [`SecondSite::blocked_from_first_site`]).
    pub fn unblock_between_sites(&self) -> Result<()> {
        wall_between_sites(self.second_nat_router()?, "-D")
            .context("unblocking the path between the NAT sites")
    }

    /// The site `node` sits on, if it is an edge behind NAT.
    pub(super) fn nat_site_of(&self, node: &NodeSpec) -> Option<&'static NatSite> {
        (node.role == NodeRole::Edge && self.edges_behind_nat)
            .then(|| site_of_edge(&node.name, self.second_site.is_some()))
    }

    /// The NAT router's mapping changes, as when a home router reboots or an
    /// ISP reassigns addresses: from now on the edges leave as `public`
    /// (added to its WAN NIC) from a source port in `ports`, and every
    /// existing mapping is forgotten (conntrack flushed).
    pub fn change_nat_mapping(&self, public: Ipv4Addr, ports: (u16, u16)) -> Result<()> {
        let nat = self.nat_router()?;
        ensure!(
            self.second_nat.is_none() || public != SECOND_NAT_PUBLIC_IP,
            "change_nat_mapping: {public} is the second NAT site's public address"
        );
        let cidr = format!("{public}/{}", WAN.prefix_len());
        if !nat
            .ip(&["-4", "-o", "addr", "show", "dev", WAN_NIC])?
            .contains(&format!(" {cidr} "))
        {
            nat.add_addr(WAN_NIC, &cidr)?;
        }
        nat.run_ok("iptables", &["-w", "-t", "nat", "-F", "POSTROUTING"])?;
        let to = format!("{public}:{}-{}", ports.0, ports.1);
        nat.run_ok(
            "iptables",
            &[
                "-w",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                WAN_NIC,
                "-p",
                "udp",
                "-j",
                "SNAT",
                "--to-source",
                &to,
            ],
        )?;
        nat.run_ok(
            "iptables",
            &[
                "-w",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                WAN_NIC,
                "-j",
                "SNAT",
                "--to-source",
                &public.to_string(),
            ],
        )?;
        nat.run_ok("conntrack", &["-F"])
            .context("flushing the NAT's mappings (apt-get install conntrack)")?;
        Ok(())
    }
}

/// Rewrites the manifest so that every edge's ExternalIP is on its site's LAN
/// (same last octet): behind a NAT, a node knows only its private address.
pub(super) fn move_edges_to_the_site_lans(path: &Path, second_site: bool) -> Result<()> {
    let mut text =
        fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    for spec in Manifest::read(path)?
        .nodes
        .iter()
        .filter(|n| n.role == NodeRole::Edge)
    {
        let public = spec
            .external_ip
            .with_context(|| format!("edge node {} has no ExternalIP", spec.name))?;
        let [.., last] = public.octets();
        let private = site_of_edge(&spec.name, second_site).address(last);
        let (old, new) = (
            format!("{{type: ExternalIP, address: {public}}}"),
            format!("{{type: ExternalIP, address: {private}}}"),
        );
        ensure!(
            text.matches(&old).count() == 1,
            "edge node {}: expected one `{old}` in the manifest",
            spec.name
        );
        text = text.replace(&old, &new);
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The NAT sites' bridges and routers on `switch` (whose WAN bridge exists):
/// the first site's router, endpoint-independent, and the second's if asked.
pub(super) fn create_nat_sites(
    switch: &Netns,
    second: Option<SecondSite>,
) -> Result<(Netns, Option<Netns>)> {
    let first = create_nat_site(switch, &FIRST_NAT_SITE, NatKind::EndpointIndependent)?;
    let Some(second) = second else {
        return Ok((first, None));
    };
    let router = create_nat_site(switch, &SECOND_NAT_SITE, second.nat)?;
    if second.blocked_from_first_site {
        wall_between_sites(&router, "-I").context("blocking the path between the NAT sites")?;
    }
    Ok((first, Some(router)))
}

/// `site`'s bridge and router: `eth-site` on the site LAN, `eth-wan` on the
/// WAN as the site's public address; masquerades what the site sends out
/// (as `kind` maps it) and forwards from the WAN only what belongs to a
/// mapping the site opened. Like a home router, it drops whatever the WAN
/// opens toward the router itself: a hole punch that arrives before the
/// inside host's own packet left leaves no conntrack entry behind, which
/// would make the router pick another port for the inside host (the
/// simultaneous-open clash).
fn create_nat_site(switch: &Netns, site: &NatSite, kind: NatKind) -> Result<Netns> {
    let context = || format!("creating the NAT router {} ({kind:?})", site.router);
    switch.bridge(site.bridge).with_context(context)?;
    let nat = Netns::new(site.router)?;
    for (nic, port, bridge, address, net) in [
        (
            "eth-site",
            site.switch_ports.0,
            site.bridge,
            site.gateway,
            site.lan,
        ),
        (WAN_NIC, site.switch_ports.1, WAN_BRIDGE, site.public, WAN),
    ] {
        veth_pair(&nat, nic, switch, port).with_context(context)?;
        switch
            .attach_to_bridge(port, bridge)
            .with_context(context)?;
        nat.add_addr(nic, &format!("{address}/{}", net.prefix_len()))
            .with_context(context)?;
    }
    nat.set_sysctl("net.ipv4.ip_forward", "1")
        .with_context(context)?;
    let mut masquerade = vec![
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-o",
        WAN_NIC,
        "-j",
        "MASQUERADE",
    ];
    if kind == NatKind::Symmetric {
        masquerade.push("--random-fully");
    }
    for rule in [
        &masquerade[..],
        &["-P", "FORWARD", "DROP"],
        &[
            "-A", "FORWARD", "-i", "eth-site", "-o", WAN_NIC, "-j", "ACCEPT",
        ],
        &[
            "-A",
            "FORWARD",
            "-m",
            "conntrack",
            "--ctstate",
            "ESTABLISHED,RELATED",
            "-j",
            "ACCEPT",
        ],
        &[
            "-A",
            "INPUT",
            "-i",
            WAN_NIC,
            "-m",
            "conntrack",
            "--ctstate",
            "NEW",
            "-j",
            "DROP",
        ],
    ] {
        let mut args = vec!["-w"];
        args.extend_from_slice(rule);
        nat.run_ok("iptables", &args).with_context(context)?;
    }
    Ok(nat)
}

/// Inserts (`-I`) or deletes (`-D`) the second router's rules that drop what
/// it would forward to or from the first site's public address.
fn wall_between_sites(second_router: &Netns, action: &str) -> Result<()> {
    let first = FIRST_NAT_SITE.public.to_string();
    for direction in ["-s", "-d"] {
        second_router.run_ok(
            "iptables",
            &["-w", action, "FORWARD", direction, &first, "-j", "DROP"],
        )?;
    }
    Ok(())
}

/// A port forward in front of a node: UDP to `port` of any of its addresses
/// reaches its UDP 4500; replies leave from `port` (conntrack undoes the DNAT).
pub(super) fn forward_port_to_esp(netns: &Netns, port: u16) -> Result<()> {
    let (port, esp) = (
        port.to_string(),
        fabedge_common::ESP_IN_UDP_PORT.to_string(),
    );
    netns.run_ok(
        "iptables",
        &[
            "-w",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "udp",
            "--dport",
            &port,
            "-j",
            "REDIRECT",
            "--to-ports",
            &esp,
        ],
    )?;
    Ok(())
}
