//! Unit tests of the cluster harness that need no namespaces: the fixture, leases, statistics and
//! the seed matrix.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use fabedge_agent::model::annotation;
use fabedge_common::{Counter, PeerStats};

use super::fixture::{Manifest, NodeRole, flannel_lease};
use super::matrix::{seed_matrix, seed_matrix_through};
use super::proofs::{ClusterStats, NodeStats, PathSpec, Proof};
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

#[test]
fn ha_fixture_adds_a_second_connector_with_shared_vtep_addresses() {
    let manifest = Manifest::read(Path::new(HA_FIXTURE)).unwrap();
    let connectors: Vec<&NodeSpec> = manifest
        .nodes
        .iter()
        .filter(|n| n.role == NodeRole::Connector)
        .collect();
    let names: Vec<&str> = connectors.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["cloud-1", "cloud-3"]);
    let vteps: Vec<Option<Ipv4Addr>> = connectors.iter().map(|n| n.vtep_address).collect();
    assert_eq!(
        vteps,
        [
            Some(Ipv4Addr::new(10, 1, 0, 201)),
            Some(Ipv4Addr::new(10, 1, 0, 203))
        ]
    );
    let cloud_3 = connectors[1];
    assert_eq!(cloud_3.internal_ip, Ipv4Addr::new(10, 1, 0, 3));
    assert_eq!(cloud_3.tunnel_endpoint, Ipv4Addr::new(198, 18, 0, 3));
    assert_eq!(cloud_3.pod_cidr, "10.244.2.0/24".parse().unwrap());
    assert_eq!(manifest.leases["cloud-3"].vtep_mac, "ce:0c:03:00:00:03");
    // Everything else is the seed fixture's.
    let seed = Manifest::read(Path::new(FIXTURE)).unwrap();
    for node in &seed.nodes {
        let ha = manifest.nodes.iter().find(|n| n.name == node.name).unwrap();
        assert_eq!(
            NodeSpec {
                vtep_address: None,
                ..ha.clone()
            },
            *node
        );
    }
}

#[test]
fn the_seed_matrix_through_other_connectors_names_each_edge_s_connector() {
    let find = |paths: &[PathSpec], name: &str| -> PathSpec {
        paths.iter().find(|p| p.name == name).unwrap().clone()
    };
    let connectors = ["cloud-1", "cloud-3"];
    // All edges on cloud-1: the seed's proofs, direct paths kept off both connectors.
    let all_on_1 = BTreeMap::from([
        ("edge-1", "cloud-1"),
        ("edge-2", "cloud-1"),
        ("edge-3", "cloud-1"),
    ]);
    let paths = seed_matrix_through(&all_on_1, &connectors);
    let seed = seed_matrix();
    let c3 = "edge_pod_reaches_cloud_pod_through_connector_and_flannel";
    assert_eq!(find(&paths, c3).proofs, find(&seed, c3).proofs);
    let c2 = find(&paths, "edge_pod_reaches_community_peer_pod_directly");
    assert!(c2.proofs.contains(&Proof::Bypassed { node: "cloud-3" }));
    assert!(c2.proofs.contains(&Proof::Bypassed { node: "cloud-1" }));

    // edge-1 on cloud-3: its paths through "the connector" go through cloud-3.
    let split = BTreeMap::from([
        ("edge-1", "cloud-3"),
        ("edge-2", "cloud-1"),
        ("edge-3", "cloud-1"),
    ]);
    let paths = seed_matrix_through(&split, &connectors);
    let through = find(&paths, c3);
    assert!(through.proofs.contains(&Proof::Tunnel {
        from: "edge-1",
        to: "cloud-3"
    }));
    assert!(through.proofs.contains(&Proof::FromVtep {
        node: "cloud-3",
        vtep: "cloud-2"
    }));
    assert!(
        through
            .proofs
            .iter()
            .all(|p| !p.nodes().contains(&"cloud-1"))
    );
    // An end on cloud-1 while edge-1 uses cloud-3: only edge-1's own tunnel is said.
    let c1 = find(&paths, "edge_pod_reaches_cloud_pod_on_connector");
    assert_eq!(
        c1.proofs,
        [Proof::Tunnel {
            from: "edge-1",
            to: "cloud-3"
        }]
    );
    // Edges on different connectors: each edge's tunnel to its own.
    let across = find(
        &paths,
        "edge_pods_outside_a_community_talk_through_connector",
    );
    assert_eq!(
        across.proofs,
        [
            Proof::Tunnel {
                from: "edge-3",
                to: "cloud-1"
            },
            Proof::Tunnel {
                from: "edge-1",
                to: "cloud-3"
            }
        ]
    );
}
