//! Why no plan can be made: the one error type of planning, shared by the
//! planner and its parts (peer ids).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::model::annotation;

/// Why no plan can be made. Every message names the objects involved and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "node {node} is not in the cluster snapshot; the agent's node name must be a Node's metadata.name"
    )]
    UnknownNode { node: String },
    #[error(
        "edge node {node} has no pod CIDR; its pod bridge and CNI config need one: \
         set spec.podCIDR on the Node (or run kube-controller-manager with --allocate-node-cidrs)"
    )]
    MissingPodCidr { node: String },
    #[error(
        "edge node {node}: pod CIDR {cidr} is too small for a gateway and pods; give it a /30 or larger"
    )]
    PodCidrTooSmall { node: String, cidr: Ipv4Net },
    #[error(
        "pod CIDRs overlap: node {first} has {first_cidr} and node {second} has {second_cidr}; every node needs its own"
    )]
    PodCidrOverlap {
        first: String,
        first_cidr: Ipv4Net,
        second: String,
        second_cidr: Ipv4Net,
    },
    #[error(
        "node {node}'s pod CIDR {pod_cidr} overlaps the Service CIDR {service_cidr}; \
         set the agent's service CIDR to the API server's --service-cluster-ip-range"
    )]
    ServiceCidrOverlap {
        node: String,
        pod_cidr: Ipv4Net,
        service_cidr: Ipv4Net,
    },
    #[error(
        "route {prefix} is claimed twice: as {first} and as {second}; node addresses and pod CIDRs must be unique"
    )]
    RouteConflict {
        prefix: Ipv4Net,
        first: String,
        second: String,
    },
    #[error(
        "route {prefix} ({owner}) would go into the tunnel, but it contains {endpoint}, the tunnel endpoint of \
         peer {peer}: the tunnel would carry its own packets. Fix: give {peer} a tunnel endpoint outside {prefix} \
         (an ExternalIP, or annotation {annotation} with the address its tunnel is reached at)",
        annotation = annotation::TUNNEL_ENDPOINT
    )]
    TunnelLoop {
        prefix: Ipv4Net,
        owner: String,
        peer: String,
        endpoint: Ipv4Addr,
    },
    #[error("{wanted} peers needed but peer ids run 1..={max}; the datapath cannot address more")]
    TooManyPeers { wanted: usize, max: u32 },
    #[error("setting {setting}: {problem}")]
    Setting {
        setting: &'static str,
        problem: String,
    },
}
