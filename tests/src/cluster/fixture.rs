//! The mini cluster as `tests/fixtures/mini-cluster.yaml` describes it: nodes, roles and Flannel
//! leases.

use std::{collections::BTreeMap, fmt, fs, net::Ipv4Addr, path::Path};

use anyhow::{Context, Result};
use fabedge_agent::{
    model::{annotation, label},
    source::manifest,
};
use ipnet::Ipv4Net;

use super::{LAN_NIC, WAN_NIC};

/// The operator-set annotation naming a connector's shared VTEP address
/// (issue #12). Spelled here until the agent's `model::annotation` has it.
pub const VTEP_ADDRESS: &str = "fabedge.io/vtep-address";

// ---------------------------------------------------------------------------
// What the harness reads from the Node objects, as Flannel and a node would
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRole {
    Connector,
    Cloud,
    Edge,
}

impl fmt::Display for NodeRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeRole::Connector => "connector",
            NodeRole::Cloud => "cloud",
            NodeRole::Edge => "edge",
        })
    }
}

/// One Node of the manifest file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    pub role: NodeRole,
    pub internal_ip: Ipv4Addr,
    pub external_ip: Option<Ipv4Addr>,
    pub pod_cidr: Ipv4Net,
    /// Where fabedge tunnels reach the node: annotation
    /// `fabedge.io/tunnel-endpoint`, else the ExternalIP, else the InternalIP.
    pub tunnel_endpoint: Ipv4Addr,
    /// A connector's shared VTEP address on the cloud LAN (annotation
    /// [`VTEP_ADDRESS`]): the `public-ip` of the Flannel leases of the edges
    /// it serves first, held by whichever connector is alive for them.
    pub vtep_address: Option<Ipv4Addr>,
}

impl NodeSpec {
    /// The uplink the agent is started with: the connector's Flannel NIC, an
    /// edge node's WAN NIC; other cloud nodes need none.
    pub(super) fn uplink(&self) -> Option<&'static str> {
        match self.role {
            NodeRole::Connector => Some(LAN_NIC),
            NodeRole::Edge => Some(WAN_NIC),
            NodeRole::Cloud => None,
        }
    }

    pub(super) fn is_cloud(&self) -> bool {
        self.role != NodeRole::Edge
    }
}

/// A complete Flannel VXLAN lease from a Node's annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlannelLease {
    pub vtep_mac: String,
    pub public_ip: Ipv4Addr,
}

/// The manifest's Nodes and their Flannel leases (only complete vxlan leases;
/// Flannel ignores the rest).
#[derive(Debug, Clone)]
pub(super) struct Manifest {
    pub(super) nodes: Vec<NodeSpec>,
    pub(super) leases: BTreeMap<String, FlannelLease>,
}

impl Manifest {
    fn parse(text: &str) -> Result<Self> {
        let objects = manifest::parse(text)?;
        let mut nodes = Vec::new();
        let mut leases = BTreeMap::new();
        for object in &objects.nodes {
            let name = object
                .metadata
                .name
                .clone()
                .context("a Node without metadata.name")?;
            let context = || format!("node {name} in the manifest");
            let labels = object.metadata.labels.clone().unwrap_or_default();
            let annotations = object.metadata.annotations.clone().unwrap_or_default();
            let role = if labels.contains_key(label::EDGE) {
                NodeRole::Edge
            } else if labels.contains_key(label::CONNECTOR) {
                NodeRole::Connector
            } else {
                NodeRole::Cloud
            };
            let address = |kind: &str| -> Result<Option<Ipv4Addr>> {
                let addresses = object.status.as_ref().and_then(|s| s.addresses.as_ref());
                match addresses.into_iter().flatten().find(|a| a.type_ == kind) {
                    Some(a) => Ok(Some(
                        a.address
                            .parse()
                            .with_context(|| format!("{kind} {:?}", a.address))?,
                    )),
                    None => Ok(None),
                }
            };
            let internal_ip = address("InternalIP").with_context(context)?.with_context(|| {
                format!("node {name} has no InternalIP in status.addresses: the mini cluster needs one per node")
            })?;
            let external_ip = address("ExternalIP").with_context(context)?;
            let pod_cidr: Ipv4Net = object
                .spec
                .as_ref()
                .and_then(|s| s.pod_cidr.as_deref())
                .with_context(|| {
                    format!("node {name} has no spec.podCIDR: every mini-cluster node runs a pod")
                })?
                .parse()
                .with_context(context)?;
            let tunnel_endpoint = match annotations.get(annotation::TUNNEL_ENDPOINT) {
                Some(value) => value
                    .parse()
                    .with_context(|| format!("{}: {value:?}", annotation::TUNNEL_ENDPOINT))?,
                None => external_ip.unwrap_or(internal_ip),
            };
            let vtep_address = match annotations.get(VTEP_ADDRESS) {
                Some(value) => Some(
                    value
                        .parse()
                        .with_context(|| format!("node {name}: {VTEP_ADDRESS}: {value:?}"))?,
                ),
                None => None,
            };
            if let Some(lease) = flannel_lease(&annotations) {
                leases.insert(name.clone(), lease);
            }
            nodes.push(NodeSpec {
                name,
                role,
                internal_ip,
                external_ip,
                pod_cidr,
                tunnel_endpoint,
                vtep_address,
            });
        }
        Ok(Manifest { nodes, leases })
    }

    pub(super) fn read(path: &Path) -> Result<Self> {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Manifest::parse(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// What Flannel's subnet manager accepts as a node's lease: backend type
/// vxlan, a `VtepMAC` in the backend data and a public IP.
pub(super) fn flannel_lease(annotations: &BTreeMap<String, String>) -> Option<FlannelLease> {
    if annotations
        .get(annotation::FLANNEL_BACKEND_TYPE)
        .map(String::as_str)
        != Some("vxlan")
    {
        return None;
    }
    let data: serde_json::Value =
        serde_json::from_str(annotations.get(annotation::FLANNEL_BACKEND_DATA)?).ok()?;
    let vtep_mac = data.get("VtepMAC")?.as_str()?.to_owned();
    let public_ip = annotations
        .get(annotation::FLANNEL_PUBLIC_IP)?
        .parse()
        .ok()?;
    Some(FlannelLease {
        vtep_mac,
        public_ip,
    })
}
