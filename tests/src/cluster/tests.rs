//! Unit tests of the cluster harness that need no namespaces: the fixture, leases, statistics and
//! the seed matrix.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use fabedge_agent::model::annotation;
use fabedge_common::{Counter, PeerStats};

use super::fixture::{Manifest, NodeRole, flannel_lease};
use super::matrix::seed_matrix;
use super::proofs::{ClusterStats, NodeStats, Proof};
use super::*;

#[test]
fn fixture_describes_the_mini_cluster() {
    let manifest = Manifest::read(Path::new(FIXTURE)).unwrap();
    let roles: BTreeMap<&str, NodeRole> = manifest
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), n.role))
        .collect();
    assert_eq!(
        roles,
        BTreeMap::from([
            ("cloud-1", NodeRole::Connector),
            ("cloud-2", NodeRole::Cloud),
            ("edge-1", NodeRole::Edge),
            ("edge-2", NodeRole::Edge),
            ("edge-3", NodeRole::Edge),
        ])
    );
    let connector = manifest.nodes.iter().find(|n| n.name == "cloud-1").unwrap();
    assert_eq!(connector.tunnel_endpoint, Ipv4Addr::new(198, 18, 0, 1));
    // Only the cloud nodes carry leases until the connector writes the edges'.
    assert_eq!(
        manifest.leases.keys().collect::<Vec<_>>(),
        ["cloud-1", "cloud-2"]
    );
    assert_eq!(
        manifest.leases["cloud-2"].public_ip,
        Ipv4Addr::new(10, 1, 0, 2)
    );
}

#[test]
fn incomplete_flannel_leases_are_ignored() {
    let complete = BTreeMap::from([
        (
            annotation::FLANNEL_BACKEND_TYPE.to_owned(),
            "vxlan".to_owned(),
        ),
        (
            annotation::FLANNEL_BACKEND_DATA.to_owned(),
            r#"{"VtepMAC":"ce:0c:01:00:00:01"}"#.to_owned(),
        ),
        (
            annotation::FLANNEL_PUBLIC_IP.to_owned(),
            "10.1.0.1".to_owned(),
        ),
    ]);
    assert!(flannel_lease(&complete).is_some());
    for key in [
        annotation::FLANNEL_BACKEND_TYPE,
        annotation::FLANNEL_BACKEND_DATA,
        annotation::FLANNEL_PUBLIC_IP,
    ] {
        let mut partial = complete.clone();
        partial.remove(key);
        assert_eq!(flannel_lease(&partial), None, "without {key}");
    }
}

#[test]
fn growth_is_measured_per_node_and_peer() {
    let stats = |to_tunnel: u64, tx: u64| ClusterStats {
        nodes: BTreeMap::from([(
            "edge-1".to_owned(),
            NodeStats {
                counters: BTreeMap::from([("to_tunnel".to_owned(), to_tunnel)]),
                peers: BTreeMap::from([(
                    "cloud-1".to_owned(),
                    PeerStats {
                        tx_packets: tx,
                        ..Default::default()
                    },
                )]),
            },
        )]),
    };
    let growth = stats(10, 7).since(&stats(4, 2));
    assert_eq!(growth.counter("edge-1", Counter::ToTunnel), 6);
    assert_eq!(growth.peer("edge-1", "cloud-1").tx_packets, 5);
    assert_eq!(growth.peer("edge-1", "edge-2"), PeerStats::default());
    assert!(
        Proof::Bypassed { node: "edge-1" }
            .check(&growth, 3)
            .is_err()
    );
    assert!(
        Proof::Bypassed { node: "cloud-1" }
            .check(&growth, 3)
            .is_ok()
    );
}

#[test]
fn every_seed_path_has_a_unique_name() {
    let mut names: Vec<&str> = seed_matrix().iter().map(|p| p.name).collect();
    let count = names.len();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), count);
}
