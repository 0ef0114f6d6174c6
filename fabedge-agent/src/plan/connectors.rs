//! The connectors of a cluster as a group: all active, each edge ordered
//! onto them by rendezvous hashing (`ha::order`), each holding a shared
//! VTEP address on the cloud network that its successor takes over.

use std::{collections::BTreeMap, net::Ipv4Addr};

use crate::ha::order;
use crate::model::{Node, Role, Snapshot};

pub struct Connectors<'a> {
    /// Every connector, by name.
    pub nodes: Vec<&'a Node>,
    /// Connector name → its shared VTEP address, for those that have a
    /// usable one (see [`Connectors::of`]).
    pub vtep_addresses: BTreeMap<String, Ipv4Addr>,
    /// Addresses left out, and why.
    pub warnings: Vec<String>,
}

impl<'a> Connectors<'a> {
    /// A VTEP address that is another node's address, or claimed by two
    /// connectors, would steal traffic: it is left out (the connector is
    /// then reached at its own address, without cloud-side failover) and
    /// reported, on every node alike.
    pub fn of(snapshot: &'a Snapshot) -> Self {
        let nodes: Vec<&Node> = snapshot.nodes_with_role(Role::Connector).collect();
        let mut warnings = Vec::new();
        let mut claimed: BTreeMap<Ipv4Addr, Vec<&str>> = BTreeMap::new();
        for node in &nodes {
            if let Some(addr) = node.vtep_address {
                claimed.entry(addr).or_default().push(&node.name);
            }
        }
        let mut vtep_addresses = BTreeMap::new();
        for (addr, owners) in claimed {
            // An edge's lease names its connector's VTEP address: that is
            // ours, not a node's address.
            let taken_by = snapshot.nodes.values().find(|n| {
                n.internal_ip == addr
                    || n.external_ip == Some(addr)
                    || n.tunnel_endpoint == addr
                    || (n.role != Role::Edge
                        && n.flannel.as_ref().is_some_and(|l| l.public_ip == addr))
            });
            if let Some(node) = taken_by {
                warnings.push(format!(
                    "connector {}: {} {addr} is an address of node {}: ignored, set a free address on the cloud network",
                    owners.join(", "),
                    crate::model::annotation::VTEP_ADDRESS,
                    node.name
                ));
            } else if owners.len() > 1 {
                warnings.push(format!(
                    "connectors {} all claim {} {addr}: ignored on each, give every connector its own",
                    owners.join(", "),
                    crate::model::annotation::VTEP_ADDRESS
                ));
            } else {
                vtep_addresses.insert(owners[0].to_owned(), addr);
            }
        }
        Connectors {
            nodes,
            vtep_addresses,
            warnings,
        }
    }

    fn names(&self) -> Vec<&str> {
        self.nodes.iter().map(|n| n.name.as_str()).collect()
    }

    /// The connector `edge` uses while all are alive.
    pub fn primary(&self, edge: &str) -> Option<&'a Node> {
        let name = order::primary(edge, self.names())?;
        self.nodes.iter().copied().find(|n| n.name == name)
    }

    /// `edge`'s connectors, preferred first: its primary, then the
    /// primary's successors (who take over the primary's VTEP address).
    pub fn failover_order(&self, edge: &str) -> Vec<String> {
        order::failover_order(edge, &self.names())
    }

    /// Where cloud nodes send traffic for `connector`'s edges: its shared
    /// VTEP address, else its Flannel `public-ip`, else its InternalIP.
    pub fn cloud_address(&self, connector: &Node) -> Ipv4Addr {
        self.vtep_addresses
            .get(&connector.name)
            .copied()
            .unwrap_or_else(|| super::connector_underlay_ip(connector))
    }
}
