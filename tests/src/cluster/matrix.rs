//! The seed's test matrix: every path of the mini cluster and how each one is proved.

use std::collections::BTreeMap;

use fabedge_common::Counter;

use super::proofs::{At, PathSpec, Proof};

/// Every path of the seed's test matrix (DESIGN.md §1) in the mini cluster,
/// each with the statistics that prove it took fabedge's way and no other.
/// `forwarding.rs` has one test per entry, named after it.
pub fn seed_matrix() -> Vec<PathSpec> {
    use At::{Node, Pod};
    vec![
        PathSpec::new(
            "edge_pod_reaches_cloud_pod_on_connector",
            "c1",
            Pod("edge-1"),
            Pod("cloud-1"),
        )
        .tunnel("edge-1", "cloud-1")
        .tunnel("cloud-1", "edge-1"),
        PathSpec::new(
            "edge_pod_reaches_community_peer_pod_directly",
            "c2",
            Pod("edge-1"),
            Pod("edge-2"),
        )
        .tunnel("edge-1", "edge-2")
        .tunnel("edge-2", "edge-1")
        .bypassing("cloud-1"),
        PathSpec::new(
            "edge_pod_reaches_cloud_pod_through_connector_and_flannel",
            "c3",
            Pod("edge-1"),
            Pod("cloud-2"),
        )
        .tunnel("edge-1", "cloud-1")
        .counted("cloud-1", Counter::FlannelEncap)
        .counted("cloud-1", Counter::FlannelDecap)
        .from_vtep("cloud-1", "cloud-2")
        .tunnel("cloud-1", "edge-1"),
        PathSpec::new(
            "cloud_pods_reach_each_other_through_flannel_alone",
            "c4",
            Pod("cloud-1"),
            Pod("cloud-2"),
        )
        .both_ways()
        .bypassing("cloud-1")
        // The connector's uplink program saw the Flannel frames and left them to flannel.1.
        .counted("cloud-1", Counter::PassFlannel),
        PathSpec::new(
            "cloud_pod_on_connector_reaches_edge_pod",
            "",
            Pod("cloud-1"),
            Pod("edge-1"),
        )
        .tunnel("cloud-1", "edge-1")
        .tunnel("edge-1", "cloud-1"),
        PathSpec::new(
            "cloud_pod_reaches_edge_pod_through_flannel_and_connector",
            "",
            Pod("cloud-2"),
            Pod("edge-1"),
        )
        .counted("cloud-1", Counter::FlannelDecap)
        .from_vtep("cloud-1", "cloud-2")
        .tunnel("cloud-1", "edge-1")
        .tunnel("edge-1", "cloud-1")
        .counted("cloud-1", Counter::FlannelEncap),
        PathSpec::new(
            "edge_pods_outside_a_community_talk_through_connector",
            "",
            Pod("edge-3"),
            Pod("edge-1"),
        )
        .both_ways()
        .tunnel("edge-3", "cloud-1")
        .tunnel("cloud-1", "edge-1")
        .tunnel("edge-1", "cloud-1")
        .tunnel("cloud-1", "edge-3"),
        PathSpec::new(
            "edge_node_and_cloud_node_reach_each_other",
            "",
            Node("edge-1"),
            Node("cloud-2"),
        )
        .both_ways()
        .tunnel("edge-1", "cloud-1")
        .tunnel("cloud-1", "edge-1"),
        PathSpec::new(
            "community_edge_nodes_reach_each_other_directly",
            "",
            Node("edge-1"),
            Node("edge-2"),
        )
        .both_ways()
        .tunnel("edge-1", "edge-2")
        .tunnel("edge-2", "edge-1")
        .bypassing("cloud-1"),
        PathSpec::new(
            "cloud_node_reaches_edge_node_outside_community",
            "",
            Node("cloud-2"),
            Node("edge-3"),
        )
        .tunnel("cloud-1", "edge-3")
        .tunnel("edge-3", "cloud-1"),
        PathSpec::new(
            "edge_pod_reaches_cloud_node",
            "",
            Pod("edge-1"),
            Node("cloud-2"),
        )
        .tunnel("edge-1", "cloud-1")
        // Cloud-2 answers an edge pod CIDR through Flannel, i.e. to the connector's VTEP.
        .counted("cloud-1", Counter::FlannelDecap)
        .tunnel("cloud-1", "edge-1"),
        PathSpec::new(
            "cloud_pod_reaches_edge_node",
            "",
            Pod("cloud-2"),
            Node("edge-1"),
        )
        .tunnel("cloud-1", "edge-1")
        .tunnel("edge-1", "cloud-1")
        // The edge node's answers to a cloud pod leave the connector through Flannel's VXLAN.
        .counted("cloud-1", Counter::FlannelEncap),
    ]
}

/// The connector the seed matrix routes every edge through.
const SEED_CONNECTOR: &str = "cloud-1";

/// [`seed_matrix`] for a cluster of several active connectors, where edge
/// `e` uses connector `connector_of[e]` (read from its datapath:
/// [`super::connector_of`]). Each path keeps its endpoints and its
/// traffic; its proofs name the connector of the edge it involves instead of
/// `cloud-1`, and a path that the seed proves to bypass the connector must
/// bypass every one of `connectors`. Where that cannot be said without
/// knowing more than "edge e uses connector C" — the path's edges use
/// different connectors, or an end is on `cloud-1` while the edge uses
/// another connector — only the edge's own tunnel to its connector is
/// proven (besides the traffic and the absence of drops, always checked).
pub fn seed_matrix_through(
    connector_of: &BTreeMap<&'static str, &'static str>,
    connectors: &[&'static str],
) -> Vec<PathSpec> {
    seed_matrix()
        .into_iter()
        .map(|path| {
            let mut edges: Vec<&'static str> = [path.from.node(), path.to.node()]
                .into_iter()
                .chain(path.proofs.iter().flat_map(|p| p.nodes()))
                .filter(|node| connector_of.contains_key(node))
                .collect();
            edges.sort();
            edges.dedup();
            let mut used: Vec<&'static str> = edges.iter().map(|e| connector_of[e]).collect();
            used.sort();
            used.dedup();
            let ends_on_seed_connector =
                path.from.node() == SEED_CONNECTOR || path.to.node() == SEED_CONNECTOR;
            let rename = |node: &'static str, to: &'static str| {
                if node == SEED_CONNECTOR { to } else { node }
            };
            let proofs: Vec<Proof> = match used.as_slice() {
                [] | [SEED_CONNECTOR] => path.proofs.clone(),
                [connector] if !ends_on_seed_connector => path
                    .proofs
                    .iter()
                    .map(|proof| match *proof {
                        Proof::Tunnel { from, to } => Proof::Tunnel {
                            from: rename(from, connector),
                            to: rename(to, connector),
                        },
                        Proof::Counted { node, counter } => Proof::Counted {
                            node: rename(node, connector),
                            counter,
                        },
                        Proof::FromVtep { node, vtep } => Proof::FromVtep {
                            node: rename(node, connector),
                            vtep,
                        },
                        Proof::Bypassed { node } => Proof::Bypassed { node },
                    })
                    .collect(),
                _ => path
                    .proofs
                    .iter()
                    .filter_map(|proof| match *proof {
                        Proof::Tunnel { from, to }
                            if to == SEED_CONNECTOR && connector_of.contains_key(from) =>
                        {
                            Some(Proof::Tunnel {
                                from,
                                to: connector_of[from],
                            })
                        }
                        Proof::Bypassed { node } => Some(Proof::Bypassed { node }),
                        _ => None,
                    })
                    .collect(),
            };
            // A path kept off the connector is kept off all of them.
            let proofs = proofs
                .into_iter()
                .flat_map(|proof| match proof {
                    Proof::Bypassed { node } if node == SEED_CONNECTOR => connectors
                        .iter()
                        .map(|&node| Proof::Bypassed { node })
                        .collect(),
                    other => vec![other],
                })
                .collect();
            PathSpec { proofs, ..path }
        })
        .collect()
}
