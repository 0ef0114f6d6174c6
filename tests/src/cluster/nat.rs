//! The NAT site: edges moved behind a masquerading router, as behind a home or mobile NAT.

use std::{fs, net::Ipv4Addr, path::Path};

use anyhow::{Context, Result, ensure};

use crate::netns::{Netns, veth_pair};

use super::fixture::{Manifest, NodeRole};
use super::{Cluster, NAT_PUBLIC_IP, NAT_SITE_IP, SITE, SITE_BRIDGE, WAN, WAN_BRIDGE, WAN_NIC};

impl Cluster {
    /// The NAT router in front of the edges ([`ClusterOptions::edges_behind_nat`]).
    pub fn nat_router(&self) -> Result<&Netns> {
        self.nat
            .as_ref()
            .context("this cluster has no NAT router (ClusterOptions::edges_behind_nat)")
    }

    /// The NAT router's mapping changes, as when a home router reboots or an
    /// ISP reassigns addresses: from now on the edges leave as `public`
    /// (added to its WAN NIC) from a source port in `ports`, and every
    /// existing mapping is forgotten (conntrack flushed).
    pub fn change_nat_mapping(&self, public: Ipv4Addr, ports: (u16, u16)) -> Result<()> {
        let nat = self.nat_router()?;
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

/// Rewrites the manifest so that every edge's ExternalIP is on the site LAN
/// (same last octet): behind a NAT, a node knows only its private address.
pub(super) fn move_edges_to_the_site_lan(path: &Path) -> Result<()> {
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
        let [a, b, c, _] = SITE.network().octets();
        let private = Ipv4Addr::new(a, b, c, last);
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

/// The edges' NAT router: `eth-site` on the site LAN, `eth-wan` on the WAN
/// as [`NAT_PUBLIC_IP`]; masquerades what the site sends out and forwards
/// from the WAN only what belongs to a mapping the site opened.
pub(super) fn create_nat_router(switch: &Netns) -> Result<Netns> {
    let nat = Netns::new("nat")?;
    let context = || "creating the NAT router".to_owned();
    for (nic, port, bridge, address, net) in [
        ("eth-site", "nat-site", SITE_BRIDGE, NAT_SITE_IP, SITE),
        (WAN_NIC, "nat-wan", WAN_BRIDGE, NAT_PUBLIC_IP, WAN),
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
    for rule in [
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            WAN_NIC,
            "-j",
            "MASQUERADE",
        ][..],
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
    ] {
        let mut args = vec!["-w"];
        args.extend_from_slice(rule);
        nat.run_ok("iptables", &args).with_context(context)?;
    }
    Ok(nat)
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
