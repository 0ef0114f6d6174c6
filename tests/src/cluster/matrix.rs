//! The seed's test matrix: every path of the mini cluster and how each one is proved.

use fabedge_common::Counter;

use super::proofs::{At, PathSpec};

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
