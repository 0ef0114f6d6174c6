//! Per-pod anti-spoofing on edges: `fe_pod_port` on the host-side veth of
//! every pod on `br-fabedge`, and the pod's address in `FE_POD_PORTS`, so a
//! pod sends only as itself (IPv4 source, ARP sender), also to a neighbour
//! pod on the bridge, where `fe_from_pod` never sees the packet.
//!
//! No CNI plugin tells us about pods: the agent learns them from the kernel
//! on every tick of its loop. A port of the bridge is a veth whose peer
//! (`IFLA_LINK`) lives in the pod's namespace (`IFLA_LINK_NETNSID`); the
//! pod's address is the one the CNI put on that peer, read with a dump
//! targeted at that namespace (kernel 4.20+), and only if it lies in the
//! node's pod CIDR (a `LOCAL_POD` route of `FE_ROUTES`). A pod without
//! `NET_ADMIN` cannot change that address; with `NET_RAW` (the default) it
//! can forge frames, which is what the program stops.
//!
//! This pass follows pods, not the plan, so it runs outside the
//! transactional apply: a port is guarded once learned (map entry first,
//! then the program), and let go once its veth has left the bridge
//! (program, then entry). Until a new pod is learned — at most one poll interval after
//! its CNI set its address — its port is unguarded: the program passes
//! ports it has no entry for.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use anyhow::{Context, Result};
use aya::maps::lpm_trie::Key;
use fabedge_common::{POD_BRIDGE, PodPortEntry, RouteAddr, route_kind};
use log::{info, warn};

use super::rtnl::{LinkInfo, Rtnl};
use crate::{
    datapath::{Attachment, Datapath, Program},
    maps::Maps,
};

/// A guarded port: its veth's name and the pod's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPort {
    pub iface: String,
    pub addr: Ipv4Addr,
}

/// What one pass changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PodPortChanges {
    pub guarded: Vec<PodPort>,
    pub released: Vec<String>,
    /// Ports whose pods XDP now delivers to (`--xdp-pod-rx`).
    pub xdp_delivered: Vec<String>,
}

/// The ports guarded so far, by the veth's ifindex.
#[derive(Debug, Default)]
pub struct PodPorts {
    guarded: BTreeMap<u32, PodPort>,
    /// The last problem per port, logged once until it changes.
    problems: BTreeMap<u32, String>,
    /// The same for XDP delivery to the port's pod.
    rx_problems: BTreeMap<u32, String>,
}

impl PodPorts {
    /// Guard the bridge's new pod ports and let go of those that left it
    /// (and of whatever an earlier run left for ports that are gone).
    pub fn sync(&mut self, datapath: &mut Datapath, maps: &mut Maps) -> Result<PodPortChanges> {
        let mut nl = Rtnl::open_strict().context("route netlink for the pod ports")?;
        let links = nl.links()?;
        let ports: BTreeMap<u32, &LinkInfo> = match links.iter().find(|l| l.name == POD_BRIDGE) {
            Some(bridge) => links
                .iter()
                .filter(|l| l.master == Some(bridge.index))
                .map(|l| (l.index, l))
                .collect(),
            None => BTreeMap::new(),
        };
        let mut changes = PodPortChanges::default();

        for (&index, port) in &ports {
            if self
                .guarded
                .get(&index)
                .is_some_and(|p| p.iface == port.name)
            {
                continue;
            }
            match self.guard(&mut nl, datapath, maps, port) {
                Ok(Some(guarded)) => {
                    info!(
                        "pod port {}: guarded, the pod sends only as {}",
                        guarded.iface, guarded.addr
                    );
                    self.problems.remove(&index);
                    self.guarded.insert(index, guarded.clone());
                    changes.guarded.push(guarded);
                }
                // No address yet (the CNI is still at work), or no pod's.
                Ok(None) => {}
                Err(e) => {
                    let message = format!("{e:#}");
                    if self.problems.get(&index) != Some(&message) {
                        warn!("pod port {}: {message} (retrying)", port.name);
                        self.problems.insert(index, message);
                    }
                }
            }
        }

        // Gone: what we guarded, and what an earlier run left behind. A
        // netlink filter goes with its device; a TCX link's pin stays until
        // removed. A port still on the bridge keeps what an earlier run gave
        // it until this run has learned it again: a restart opens no gap.
        let names: BTreeSet<&str> = ports.values().map(|l| l.name.as_str()).collect();
        let mut released = BTreeSet::new();
        for iface in datapath.pod_ports_attached()? {
            if !names.contains(iface.as_str()) {
                datapath.detach(&Attachment::new(Program::PodPort, &iface))?;
                released.insert(iface);
            }
        }
        let gone: Vec<u32> = self
            .guarded
            .keys()
            .filter(|i| !ports.contains_key(i))
            .copied()
            .collect();
        for index in gone {
            if let Some(port) = self.guarded.remove(&index) {
                released.insert(port.iface);
            }
        }
        let entries: Vec<u32> = maps.pod_ports.keys().collect::<Result<_, _>>()?;
        for index in entries.iter().filter(|i| !ports.contains_key(i)) {
            maps.pod_ports
                .remove(index)
                .with_context(|| format!("removing port {index} from FE_POD_PORTS"))?;
        }
        changes.released = released.into_iter().collect();
        self.problems.retain(|i, _| ports.contains_key(i));
        for iface in &changes.released {
            info!("pod port {iface}: gone, released");
        }

        // XDP delivery (`--xdp-pod-rx`) for the pods guarded now.
        let pods: BTreeMap<[u8; 4], &LinkInfo> = self
            .guarded
            .iter()
            .filter_map(|(index, pod)| Some((pod.addr.octets(), *ports.get(index)?)))
            .collect();
        let bridge_mac = links
            .iter()
            .find(|l| l.name == POD_BRIDGE)
            .and_then(|l| l.mac);
        let (offered, problems) = super::pod_rx::sync(&mut nl, maps, bridge_mac, &pods)?;
        for (index, message) in problems {
            if self.rx_problems.get(&index) != Some(&message) {
                let iface = ports.get(&index).map_or("?", |l| l.name.as_str());
                warn!("pod port {iface}: {message} (retrying)");
                self.rx_problems.insert(index, message);
            }
        }
        for iface in &offered {
            self.rx_problems
                .retain(|i, _| ports.get(i).is_none_or(|l| &l.name != iface));
        }
        self.rx_problems.retain(|i, _| ports.contains_key(i));
        changes.xdp_delivered = offered;
        Ok(changes)
    }

    /// Learn `port`'s pod address and guard it; `None` while it has none.
    fn guard(
        &self,
        nl: &mut Rtnl,
        datapath: &mut Datapath,
        maps: &mut Maps,
        port: &LinkInfo,
    ) -> Result<Option<PodPort>> {
        // A veth whose peer is in another namespace; anything else on the
        // bridge is not a pod.
        let (Some(peer), Some(netnsid)) = (port.link, port.link_netnsid) else {
            return Ok(None);
        };
        let addrs = match nl.addrs_in(netnsid, peer) {
            Ok(addrs) => addrs,
            // The pod went away meanwhile.
            Err(e) if e.errno() == Some(libc::ENODEV) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let Some(addr) = addrs
            .iter()
            .map(|a| a.address.addr())
            .find(|addr| is_local_pod(maps, *addr))
        else {
            return Ok(None);
        };
        maps.pod_ports
            .insert(
                port.index,
                PodPortEntry {
                    addr: addr.octets(),
                },
                0,
            )
            .with_context(|| format!("writing {} ({addr}) to FE_POD_PORTS", port.name))?;
        datapath.attach(&Attachment::new(Program::PodPort, &port.name))?;
        Ok(Some(PodPort {
            iface: port.name.clone(),
            addr,
        }))
    }
}

/// Whether `addr` lies in this node's pod CIDR.
fn is_local_pod(maps: &Maps, addr: Ipv4Addr) -> bool {
    let key = Key::new(
        32,
        RouteAddr {
            addr: addr.octets(),
        },
    );
    matches!(maps.routes.get(&key, 0), Ok(r) if r.kind == route_kind::LOCAL_POD)
}
