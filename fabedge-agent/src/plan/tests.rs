//! The planner against the example cluster (`tests/fixtures/mini-cluster.yaml`):
//! cloud-1 (connector), cloud-2 (cloud), edge-1..3, community beijing = {edge-1, edge-2}.

use std::{collections::BTreeMap, net::Ipv4Addr};

use fabedge_common::{
    DEFAULT_FLANNEL_PORT, DEFAULT_TUNNEL_PORT, ESP_IN_UDP_PORT, PeerEntry, RouteEntry, TUNNEL_DEV,
    peer_kind, role, route_flags, route_kind, tunnel_mode,
};
use ipnet::Ipv4Net;

use super::*;
use crate::{
    datapath::Program,
    model::{self, Role, Snapshot},
    source::manifest::{self, EXAMPLE_CLUSTER, set_node_annotations},
};

const CONNECTOR_MAC: [u8; 6] = [0xce, 0x0c, 0x01, 0x00, 0x00, 0x01];
const CLOUD2_MAC: [u8; 6] = [0xce, 0x0c, 0x02, 0x00, 0x00, 0x02];

fn net(text: &str) -> Ipv4Net {
    text.parse().unwrap()
}

fn ip(text: &str) -> Ipv4Addr {
    text.parse().unwrap()
}

fn cluster() -> Snapshot {
    manifest::snapshot(EXAMPLE_CLUSTER).unwrap()
}

fn settings() -> Settings {
    Settings {
        uplink: Some("eth0".into()),
        flannel_mac: Some(CONNECTOR_MAC),
        ..Settings::default()
    }
}

fn plan_for(snapshot: &Snapshot, node: &str) -> Plan {
    plan(snapshot, node, &settings(), &PeerIds::new())
        .unwrap_or_else(|e| panic!("planning {node}: {e}"))
}

/// The route for `prefix` and the peer it names (by node name).
fn route<'p>(plan: &'p Plan, prefix: &str) -> (RouteEntry, Option<&'p str>) {
    let entry = *plan
        .routes
        .get(&net(prefix))
        .unwrap_or_else(|| panic!("{}: no route for {prefix}", plan.node));
    (entry, plan.peer_name(entry.peer_id))
}

fn peer<'p>(plan: &'p Plan, node: &str) -> &'p PeerEntry {
    let id = plan
        .peer_ids
        .get(node)
        .unwrap_or_else(|| panic!("{}: {node} is not a peer", plan.node));
    &plan.peers[&id]
}

fn tunnel(flags: u8) -> impl Fn(u16) -> RouteEntry {
    move |peer_id| RouteEntry {
        kind: route_kind::TUNNEL,
        flags,
        peer_id,
    }
}

/// The four Flannel annotations the connector writes, applied to the manifest text.
fn annotated_cluster_text() -> String {
    let connector = plan_for(&cluster(), "cloud-1");
    let mut text = EXAMPLE_CLUSTER.to_owned();
    for patch in &connector.annotations {
        text = set_node_annotations(&text, &patch.node, &patch.set, &patch.remove).unwrap();
    }
    text
}

const EDGE_4: &str = "---
apiVersion: v1
kind: Node
metadata: {name: edge-4, labels: {node-role.kubernetes.io/edge: \"\"}}
spec: {podCIDR: 10.234.4.0/24}
status: {addresses: [{type: InternalIP, address: 10.2.0.14}, {type: ExternalIP, address: 198.18.0.14}]}
";

#[test]
fn edge_node_reaches_community_peer_directly_and_the_rest_through_the_connector() {
    let plan = plan_for(&cluster(), "edge-1");
    assert_eq!(plan.role, Role::Edge);

    let (local_pods, _) = route(&plan, "10.234.1.0/24");
    assert_eq!(
        local_pods,
        RouteEntry {
            kind: route_kind::LOCAL_POD,
            flags: 0,
            peer_id: 0
        }
    );
    let (local_host, _) = route(&plan, "10.2.0.11/32");
    assert_eq!(
        local_host,
        RouteEntry {
            kind: route_kind::LOCAL_HOST,
            flags: route_flags::NODE_ADDR,
            peer_id: 0
        }
    );
    // Unknown destinations are dropped by default: no catch-all route.
    assert!(!plan.routes.contains_key(&net("0.0.0.0/0")));
    let opted_in = Settings {
        pod_egress_via_node: true,
        ..settings()
    };
    let with_egress = super::plan(&cluster(), "edge-1", &opted_in, &PeerIds::new()).unwrap();
    assert_eq!(
        with_egress.routes[&net("0.0.0.0/0")].kind,
        route_kind::KERNEL
    );

    let edge2 = plan.peer_ids.get("edge-2").unwrap();
    let connector = plan.peer_ids.get("cloud-1").unwrap();
    // Through the connector means through the connector group.
    let group = |flags: u8| tunnel(flags | route_flags::VIA_GROUP)(CONNECTOR_GROUP);
    assert_eq!(
        plan.groups,
        BTreeMap::from([(
            CONNECTOR_GROUP,
            GroupEntry {
                active: connector,
                members: [connector, 0, 0, 0, 0, 0, 0]
            }
        )])
    );
    assert_eq!(route(&plan, "10.234.2.0/24").0, tunnel(0)(edge2));
    assert_eq!(
        route(&plan, "10.2.0.12/32").0,
        tunnel(route_flags::NODE_ADDR)(edge2)
    );
    for pods in [
        "10.234.3.0/24",
        "10.244.0.0/24",
        "10.244.1.0/24",
        "10.96.0.0/12",
    ] {
        assert_eq!(route(&plan, pods).0, group(0), "{pods}");
    }
    for node_ip in ["10.2.0.13/32", "10.1.0.1/32", "10.1.0.2/32"] {
        assert_eq!(
            route(&plan, node_ip).0,
            group(route_flags::NODE_ADDR),
            "{node_ip}"
        );
    }
    assert_eq!(plan.routes.len(), 11, "{:#?}", plan.routes);

    assert_eq!(plan.peers.len(), 2);
    let tunnel_peer = |endpoint: &str| PeerEntry {
        kind: peer_kind::TUNNEL,
        port: DEFAULT_TUNNEL_PORT,
        underlay_ip: ip(endpoint).octets(),
        ..Default::default()
    };
    assert_eq!(*peer(&plan, "edge-2"), tunnel_peer("198.18.0.12"));
    assert_eq!(*peer(&plan, "cloud-1"), tunnel_peer("198.18.0.1"));
    assert!(plan.annotations.is_empty());
    assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
}

#[test]
fn a_punched_peer_is_routed_through_the_connector_until_its_direct_path_works() {
    use crate::esp::punch::Punched;
    let punched = |direct| Settings {
        esp_punched: BTreeMap::from([(
            "edge-2".to_owned(),
            Punched {
                endpoint: (ip("198.18.0.251"), 4500),
                direct,
            },
        )]),
        ..settings()
    };
    let relayed = plan(&cluster(), "edge-1", &punched(false), &PeerIds::new()).unwrap();
    let direct = plan(&cluster(), "edge-1", &punched(true), &PeerIds::new()).unwrap();
    let plain = plan_for(&cluster(), "edge-1");
    let edge2 = relayed.peer_ids.get("edge-2").unwrap();
    let flags = route_flags::PUNCHED | route_flags::RELAYED;
    assert_eq!(route(&relayed, "10.234.2.0/24").0, tunnel(flags)(edge2));
    assert_eq!(
        route(&relayed, "10.2.0.12/32").0,
        tunnel(flags | route_flags::NODE_ADDR)(edge2)
    );
    assert_eq!(
        route(&direct, "10.234.2.0/24").0,
        tunnel(route_flags::PUNCHED)(edge2)
    );
    assert_eq!(
        route(&direct, "10.2.0.12/32").0,
        tunnel(route_flags::PUNCHED | route_flags::NODE_ADDR)(edge2)
    );
    // Nothing else moves: the peer stays a tunnel peer (its SAs and hellos
    // go on), and every other route is the plain plan's.
    for p in [&relayed, &direct] {
        assert_eq!(p.peers, plain.peers);
        for (prefix, entry) in &plain.routes {
            if !["10.234.2.0/24", "10.2.0.12/32"].contains(&prefix.to_string().as_str()) {
                assert_eq!(p.routes[prefix], *entry, "{prefix}");
            }
        }
    }
    // The connector relays by routing every edge's prefixes to the edge,
    // whatever the edges think of each other.
    let connector = plan(&cluster(), "cloud-1", &punched(false), &PeerIds::new()).unwrap();
    let connector_plain = plan_for(&cluster(), "cloud-1");
    assert_eq!(connector.routes, connector_plain.routes);
}

#[test]
fn edge_kernel_routes_mirror_every_tunnel_prefix() {
    let plan = plan_for(&cluster(), "edge-1");
    let tunnel_prefixes: Vec<Ipv4Net> = plan
        .routes
        .iter()
        .filter(|(_, r)| r.kind == route_kind::TUNNEL)
        .map(|(p, _)| *p)
        .collect();
    let kernel: Vec<Ipv4Net> = plan.kernel_routes.iter().map(|r| r.dst).collect();
    assert_eq!(kernel, tunnel_prefixes);
    for r in &plan.kernel_routes {
        assert_eq!(r.dev.as_deref(), Some(TUNNEL_DEV));
        assert_eq!((r.via, r.src), (None, Some(ip("10.2.0.11"))));
    }
}

#[test]
fn edge_outside_the_community_reaches_its_members_through_the_connector() {
    let plan = plan_for(&cluster(), "edge-3");
    assert_eq!(plan.peer_ids.len(), 1, "{:?}", plan.peer_ids);
    assert!(plan.peer_ids.get("cloud-1").is_some());
    for prefix in ["10.234.1.0/24", "10.234.2.0/24"] {
        assert_eq!(
            route(&plan, prefix).0,
            tunnel(route_flags::VIA_GROUP)(CONNECTOR_GROUP)
        );
    }
}

#[test]
fn edge_node_gets_pod_bridge_tunnel_device_programs_and_sysctls() {
    let plan = plan_for(&cluster(), "edge-1");
    assert_eq!(
        plan.devices,
        [
            Device::Bridge {
                name: "br-fabedge".into(),
                address: net("10.234.1.1/24"),
                mtu: 1450
            },
            Device::VxlanTunnel {
                name: TUNNEL_DEV.into(),
                port: DEFAULT_TUNNEL_PORT,
                mac: fabedge_common::TUNNEL_DEV_MAC,
                mtu: 1450,
                local: None
            },
        ]
    );
    let attachments: Vec<String> = plan.attachments.iter().map(ToString::to_string).collect();
    assert_eq!(
        attachments,
        [
            "from-pod=br-fabedge",
            "to-pod=br-fabedge",
            "tunnel-ingress=fe-tunnel",
            "tunnel-egress=fe-tunnel",
            "uplink-ingress=eth0",
            "uplink-egress=eth0"
        ]
    );
    let sysctls: Vec<(&str, &str)> = plan
        .sysctls
        .iter()
        .map(|s| (s.key.as_str(), s.value.as_str()))
        .collect();
    assert_eq!(
        sysctls,
        [
            ("net/ipv4/conf/br-fabedge/rp_filter", "2"),
            ("net/ipv4/ip_forward", "1"),
            ("net/ipv4/conf/all/send_redirects", "0"),
            ("net/ipv4/conf/fe-tunnel/send_redirects", "0"),
            ("net/ipv6/conf/fe-tunnel/disable_ipv6", "1"),
        ]
    );
    assert_eq!(plan.config.role, role::EDGE);
    assert_eq!(plan.config.ready, 1);
    assert_eq!(plan.config.node_ip, [10, 2, 0, 11]);
    assert_eq!(
        (plan.config.tunnel_ifindex, plan.config.uplink_ifindex),
        (0, 0)
    );
    assert_eq!(
        (plan.config.flannel_mtu, plan.config.flannel_mac),
        (0, [0; 6])
    );
}

#[test]
fn edge_cni_config_is_a_bridge_on_the_pod_cidr() {
    let plan = plan_for(&cluster(), "edge-1");
    let cni = plan.cni.expect("edge nodes get a CNI config");
    assert_eq!(
        cni.path,
        std::path::Path::new("/etc/cni/net.d/10-fabedge.conflist")
    );
    let conf: serde_json::Value = serde_json::from_str(&cni.json).unwrap();
    assert_eq!(conf["name"], "fabedge");
    assert_eq!(conf["cniVersion"], CNI_VERSION);
    let bridge = &conf["plugins"][0];
    assert_eq!(bridge["type"], "bridge");
    assert_eq!(bridge["bridge"], "br-fabedge");
    assert_eq!(bridge["isGateway"], true);
    assert_eq!(bridge["ipMasq"], false);
    assert_eq!(bridge["hairpinMode"], true);
    assert_eq!(bridge["mtu"], 1450);
    assert_eq!(bridge["ipam"]["type"], "host-local");
    assert_eq!(bridge["ipam"]["ranges"][0][0]["subnet"], "10.234.1.0/24");
    assert_eq!(bridge["ipam"]["ranges"][0][0]["gateway"], "10.234.1.1");
    assert_eq!(bridge["ipam"]["routes"][0]["dst"], "0.0.0.0/0");
    assert_eq!(conf["plugins"].as_array().unwrap().len(), 1);
}

#[test]
fn connector_sends_edges_into_tunnels_and_cloud_pods_to_their_vtep() {
    let plan = plan_for(&cluster(), "cloud-1");
    assert_eq!(plan.role, Role::Connector);
    assert_eq!(route(&plan, "10.244.0.0/24").0.kind, route_kind::LOCAL_POD);
    assert_eq!(route(&plan, "10.1.0.1/32").0.kind, route_kind::LOCAL_HOST);
    for (edge, pods, node_ip, endpoint) in [
        ("edge-1", "10.234.1.0/24", "10.2.0.11/32", "198.18.0.11"),
        ("edge-2", "10.234.2.0/24", "10.2.0.12/32", "198.18.0.12"),
        ("edge-3", "10.234.3.0/24", "10.2.0.13/32", "198.18.0.13"),
    ] {
        let id = plan.peer_ids.get(edge).unwrap();
        assert_eq!(route(&plan, pods).0, tunnel(0)(id));
        assert_eq!(route(&plan, node_ip).0, tunnel(route_flags::NODE_ADDR)(id));
        assert_eq!(peer(&plan, edge).underlay_ip, ip(endpoint).octets());
        assert_eq!(peer(&plan, edge).kind, peer_kind::TUNNEL);
    }
    let (vtep_route, vtep_name) = route(&plan, "10.244.1.0/24");
    assert_eq!(
        (vtep_route.kind, vtep_name),
        (route_kind::CLOUD_VTEP, Some("cloud-2"))
    );
    assert_eq!(
        *peer(&plan, "cloud-2"),
        PeerEntry {
            kind: peer_kind::FLANNEL_VTEP,
            port: DEFAULT_FLANNEL_PORT,
            underlay_ip: [10, 1, 0, 2],
            vtep_mac: CLOUD2_MAC,
            ..Default::default()
        }
    );
    assert_eq!(
        route(&plan, "10.1.0.2/32").0,
        RouteEntry {
            kind: route_kind::KERNEL,
            flags: route_flags::NODE_ADDR,
            peer_id: 0
        }
    );
    assert_eq!(route(&plan, "10.96.0.0/12").0.kind, route_kind::KERNEL);
    assert_eq!(plan.routes.len(), 11, "{:#?}", plan.routes);

    let config = plan.config;
    assert_eq!(config.role, role::CONNECTOR);
    assert_eq!(config.tunnel_mode, tunnel_mode::VXLAN);
    assert_eq!(
        (config.node_ip, config.underlay_ip),
        ([10, 1, 0, 1], [10, 1, 0, 1])
    );
    assert_eq!(config.flannel_mac, CONNECTOR_MAC);
    assert_eq!(
        (config.flannel_vni, config.flannel_port),
        (1, DEFAULT_FLANNEL_PORT)
    );

    let attachments: Vec<String> = plan.attachments.iter().map(ToString::to_string).collect();
    assert_eq!(
        attachments,
        [
            "tunnel-ingress=fe-tunnel",
            "tunnel-egress=fe-tunnel",
            "uplink-ingress=eth0",
            "uplink-egress=eth0"
        ]
    );
    assert!(
        plan.sysctls
            .contains(&Sysctl::new("net/ipv4/conf/eth0/rp_filter", "2"))
    );
    assert!(
        plan.sysctls
            .contains(&Sysctl::new("net/ipv4/conf/fe-tunnel/rp_filter", "2"))
    );
    assert!(plan.cni.is_none());
    let kernel: Vec<(String, Option<String>, Option<Ipv4Addr>)> = plan
        .kernel_routes
        .iter()
        .map(|r| (r.dst.to_string(), r.dev.clone(), r.src))
        .collect();
    let expect = |dst: &str| {
        (
            dst.to_owned(),
            Some(TUNNEL_DEV.to_owned()),
            Some(ip("10.1.0.1")),
        )
    };
    assert_eq!(
        kernel,
        [
            "10.2.0.11/32",
            "10.2.0.12/32",
            "10.2.0.13/32",
            "10.234.1.0/24",
            "10.234.2.0/24",
            "10.234.3.0/24"
        ]
        .map(expect)
    );
}

#[test]
fn cloud_node_only_routes_edge_node_addresses_via_the_connector() {
    let plan = plan_for(&cluster(), "cloud-2");
    assert_eq!(plan.role, Role::Cloud);
    assert!(plan.routes.is_empty() && plan.peers.is_empty() && plan.peer_ids.is_empty());
    assert!(plan.devices.is_empty() && plan.attachments.is_empty() && plan.sysctls.is_empty());
    assert!(plan.cni.is_none() && plan.annotations.is_empty());
    let via_connector = |dst: &str| KernelRoute {
        dst: net(dst),
        dev: None,
        via: Some(ip("10.1.0.1")),
        src: None,
    };
    assert_eq!(
        plan.kernel_routes,
        ["10.2.0.11/32", "10.2.0.12/32", "10.2.0.13/32"].map(via_connector)
    );
    assert_eq!(plan.config.role, role::CLOUD);
}

#[test]
fn connector_writes_its_own_flannel_lease_onto_every_edge_node() {
    let plan = plan_for(&cluster(), "cloud-1");
    let wanted = BTreeMap::from([
        (
            "flannel.alpha.coreos.com/backend-data".to_owned(),
            r#"{"VtepMAC":"ce:0c:01:00:00:01"}"#.to_owned(),
        ),
        (
            "flannel.alpha.coreos.com/backend-type".to_owned(),
            "vxlan".to_owned(),
        ),
        (
            "flannel.alpha.coreos.com/kube-subnet-manager".to_owned(),
            "true".to_owned(),
        ),
        (
            "flannel.alpha.coreos.com/public-ip".to_owned(),
            "10.1.0.1".to_owned(),
        ),
    ]);
    let expected: Vec<AnnotationPatch> = ["edge-1", "edge-2", "edge-3"]
        .map(|node| AnnotationPatch {
            node: node.into(),
            set: wanted.clone(),
            remove: Vec::new(),
        })
        .into();
    assert_eq!(plan.annotations, expected);
}

#[test]
fn annotations_already_in_place_need_no_patch() {
    let snapshot = manifest::snapshot(&annotated_cluster_text()).unwrap();
    assert_eq!(
        snapshot.nodes["edge-2"]
            .flannel
            .as_ref()
            .map(|l| l.vtep_mac),
        Some(CONNECTOR_MAC)
    );
    assert!(plan_for(&snapshot, "cloud-1").annotations.is_empty());
}

#[test]
fn node_leaving_the_edge_loses_the_masquerade_lease() {
    let mut snapshot = manifest::snapshot(&annotated_cluster_text()).unwrap();
    snapshot.nodes.get_mut("edge-3").unwrap().role = Role::Cloud;
    let plan = plan_for(&snapshot, "cloud-1");
    assert_eq!(
        plan.annotations,
        [AnnotationPatch {
            node: "edge-3".into(),
            set: BTreeMap::new(),
            remove: model::annotation::FLANNEL_LEASE.map(String::from).into(),
        }]
    );
    // Its lease still names the connector: not a VTEP to encapsulate to.
    assert_eq!(route(&plan, "10.234.3.0/24").0.kind, route_kind::KERNEL);
    assert!(
        plan.warnings
            .iter()
            .any(|w| w.contains("edge-3") && w.contains("own Flannel lease")),
        "{:?}",
        plan.warnings
    );
}

/// The example cluster with a second connector, cloud-3, and shared VTEP
/// addresses on both connectors.
fn two_connectors() -> Snapshot {
    let mut snapshot = cluster();
    let mut second = snapshot.nodes["cloud-2"].clone();
    second.name = "cloud-3".into();
    second.role = Role::Connector;
    second.internal_ip = ip("10.1.0.3");
    second.tunnel_endpoint = ip("198.18.0.3");
    second.pod_cidr = Some(net("10.244.2.0/24"));
    let lease = second.flannel.as_mut().unwrap();
    lease.public_ip = ip("10.1.0.3");
    lease.vtep_mac = [0xce, 0x0c, 0x03, 0, 0, 3];
    second.vtep_address = Some(ip("10.1.0.203"));
    snapshot.nodes.insert(second.name.clone(), second);
    snapshot.nodes.get_mut("cloud-1").unwrap().vtep_address = Some(ip("10.1.0.201"));
    snapshot
}

#[test]
fn every_connector_is_active_and_each_edge_orders_them_into_its_group() {
    let snapshot = two_connectors();
    let edges = ["edge-1", "edge-2", "edge-3"];
    let mut primaries = std::collections::BTreeSet::new();
    for edge in edges {
        let plan = plan_for(&snapshot, edge);
        let order = crate::ha::order::failover_order(edge, &["cloud-1", "cloud-3"]);
        let ids: Vec<u16> = order
            .iter()
            .map(|c| plan.peer_ids.get(c).unwrap())
            .collect();
        assert_eq!(
            plan.groups[&CONNECTOR_GROUP],
            GroupEntry {
                active: ids[0],
                members: [ids[0], ids[1], 0, 0, 0, 0, 0]
            },
            "{edge}"
        );
        primaries.insert(order[0].clone());
        // Both are tunnel peers (ESP: SAs to both exist before a failover),
        // both are probed at their tunnel endpoints.
        assert_eq!(
            peer(&plan, "cloud-1").underlay_ip,
            ip("198.18.0.1").octets()
        );
        assert_eq!(
            peer(&plan, "cloud-3").underlay_ip,
            ip("198.18.0.3").octets()
        );
        assert_eq!(
            plan.ha.probe_targets,
            BTreeMap::from([
                ("cloud-1".to_owned(), "198.18.0.1:8476".parse().unwrap()),
                ("cloud-3".to_owned(), "198.18.0.3:8476".parse().unwrap()),
            ])
        );
        assert_eq!(plan.config.probe_port, 0, "edges answer no probes");
        assert_eq!(
            route(&plan, "10.244.2.0/24").0,
            tunnel(route_flags::VIA_GROUP)(CONNECTOR_GROUP)
        );
    }
    let settings_3 = Settings {
        flannel_mac: Some([0xce, 0x0c, 0x03, 0, 0, 3]),
        ..settings()
    };
    for (connector, settings) in [("cloud-1", settings()), ("cloud-3", settings_3)] {
        let plan = plan(&snapshot, connector, &settings, &PeerIds::new()).unwrap();
        assert_eq!(plan.role, Role::Connector, "{connector}: no standby");
        assert_eq!(plan.config.probe_port, fabedge_common::DEFAULT_PROBE_PORT);
        let own = if connector == "cloud-1" {
            "198.18.0.1"
        } else {
            "198.18.0.3"
        };
        assert_eq!(
            plan.vtep_addrs,
            [ip("10.1.0.201"), ip("10.1.0.203"), ip(own)].into(),
            "{connector}: the shared addresses and where edges probe it"
        );
        // Every connector has a tunnel to every edge.
        for edge in edges {
            assert_eq!(
                route(&plan, &format!("{}/32", snapshot.nodes[edge].internal_ip)).1,
                Some(edge)
            );
        }
        let other = if connector == "cloud-1" {
            "cloud-3"
        } else {
            "cloud-1"
        };
        assert_eq!(plan.ha.probe_targets.keys().collect::<Vec<_>>(), [other]);
        assert_eq!(plan.ha.vtep_iface.as_deref(), Some("eth0"));
        assert_eq!(
            plan.ha.connectors,
            BTreeMap::from([
                ("cloud-1".to_owned(), Some(ip("10.1.0.201"))),
                ("cloud-3".to_owned(), Some(ip("10.1.0.203"))),
            ])
        );
    }
    // With three edges, the names hash onto both connectors.
    assert_eq!(primaries.len(), 2, "{primaries:?}");
}

#[test]
fn edges_carry_their_first_connector_s_lease_at_its_vtep_address_whoever_writes_it() {
    let snapshot = two_connectors();
    let from_1 = plan_for(&snapshot, "cloud-1").annotations;
    let settings_3 = Settings {
        flannel_mac: Some([0xce, 0x0c, 0x03, 0, 0, 3]),
        ..settings()
    };
    let from_3 = plan(&snapshot, "cloud-3", &settings_3, &PeerIds::new())
        .unwrap()
        .annotations;
    assert_eq!(from_1, from_3, "connectors must never fight over a lease");
    assert_eq!(from_1.len(), 3);
    for patch in &from_1 {
        let primary = crate::ha::order::primary(&patch.node, ["cloud-1", "cloud-3"]).unwrap();
        let (mac, vtep) = match primary {
            "cloud-1" => ("ce:0c:01:00:00:01", "10.1.0.201"),
            _ => ("ce:0c:03:00:00:03", "10.1.0.203"),
        };
        assert_eq!(
            patch.set["flannel.alpha.coreos.com/public-ip"], vtep,
            "{}",
            patch.node
        );
        assert_eq!(
            patch.set["flannel.alpha.coreos.com/backend-data"],
            format!(r#"{{"VtepMAC":"{mac}"}}"#)
        );
    }
    // Cloud nodes reach edge node addresses through the same address.
    let cloud = plan_for(&snapshot, "cloud-2");
    for route in &cloud.kernel_routes {
        let edge = snapshot
            .nodes
            .values()
            .find(|n| Ipv4Net::from(n.internal_ip) == route.dst)
            .unwrap();
        let primary = crate::ha::order::primary(&edge.name, ["cloud-1", "cloud-3"]).unwrap();
        let vtep = if primary == "cloud-1" {
            "10.1.0.201"
        } else {
            "10.1.0.203"
        };
        assert_eq!(route.via, Some(ip(vtep)), "{}", edge.name);
    }
}

#[test]
fn a_vtep_address_that_is_a_node_address_or_claimed_twice_is_ignored_and_named() {
    let mut snapshot = two_connectors();
    snapshot.nodes.get_mut("cloud-3").unwrap().vtep_address = Some(ip("10.1.0.2"));
    let plan = plan_for(&snapshot, "cloud-1");
    assert_eq!(plan.vtep_addrs, [ip("10.1.0.201"), ip("198.18.0.1")].into());
    assert!(
        plan.warnings
            .iter()
            .any(|w| w.contains("cloud-3") && w.contains("10.1.0.2") && w.contains("cloud-2")),
        "{:?}",
        plan.warnings
    );
    snapshot.nodes.get_mut("cloud-3").unwrap().vtep_address = Some(ip("10.1.0.201"));
    let plan = plan_for(&snapshot, "cloud-1");
    assert_eq!(plan.vtep_addrs, [ip("198.18.0.1")].into());
    assert!(
        plan.warnings
            .iter()
            .any(|w| w.contains("cloud-1, cloud-3") && w.contains("10.1.0.201")),
        "{:?}",
        plan.warnings
    );
    // Without a usable address a connector's edges are leased at its own.
    let edge_patch = plan
        .annotations
        .iter()
        .find(|p| crate::ha::order::primary(&p.node, ["cloud-1", "cloud-3"]) == Some("cloud-3"))
        .expect("an edge of cloud-3");
    assert_eq!(
        edge_patch.set["flannel.alpha.coreos.com/public-ip"],
        "10.1.0.3"
    );
}

#[test]
fn the_vtep_address_annotation_is_read_on_connectors_and_checked() {
    let text = EXAMPLE_CLUSTER.replace(
        "    flannel.alpha.coreos.com/public-ip: 10.1.0.1\n",
        "    flannel.alpha.coreos.com/public-ip: 10.1.0.1\n    fabedge.io/vtep-address: 10.1.0.201\n",
    );
    assert_ne!(text, EXAMPLE_CLUSTER, "the fixture changed: adapt the test");
    let snapshot = manifest::snapshot(&text).unwrap();
    assert_eq!(
        snapshot.nodes["cloud-1"].vtep_address,
        Some(ip("10.1.0.201"))
    );
    let bad = text.replace(
        "fabedge.io/vtep-address: 10.1.0.201",
        "fabedge.io/vtep-address: 10.1.0.300",
    );
    let error = manifest::snapshot(&bad).unwrap_err().to_string();
    assert!(
        error.contains("cloud-1")
            && error.contains("fabedge.io/vtep-address")
            && error.contains("10.1.0.300"),
        "{error}"
    );
}

#[test]
fn peer_ids_stay_stable_when_nodes_come_and_go() {
    let first = plan_for(&cluster(), "cloud-1");
    let ids = |plan: &Plan| {
        plan.peer_ids
            .iter()
            .map(|(n, i)| (n.to_owned(), i))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(&first),
        [
            ("cloud-2".into(), 1),
            ("edge-1".into(), 2),
            ("edge-2".into(), 3),
            ("edge-3".into(), 4)
        ]
    );

    let mut changed = manifest::snapshot(&format!("{EXAMPLE_CLUSTER}{EDGE_4}")).unwrap();
    changed.nodes.remove("edge-1");
    let second = plan(&changed, "cloud-1", &settings(), &first.peer_ids).unwrap();
    assert_eq!(
        ids(&second),
        [
            ("cloud-2".into(), 1),
            ("edge-2".into(), 3),
            ("edge-3".into(), 4),
            ("edge-4".into(), 2)
        ]
    );
    // Routes and peer slots follow the ids.
    assert_eq!(
        route(&second, "10.234.4.0/24"),
        (tunnel(0)(2), Some("edge-4"))
    );
    assert_eq!(second.peers[&2].underlay_ip, [198, 18, 0, 14]);
    assert!(!second.routes.contains_key(&net("10.234.1.0/24")));
    // Replanning the same cluster changes nothing.
    assert_eq!(
        plan(&changed, "cloud-1", &settings(), &second.peer_ids).unwrap(),
        second
    );
}

#[test]
fn overlapping_pod_cidrs_name_both_nodes() {
    let mut snapshot = cluster();
    snapshot.nodes.get_mut("edge-2").unwrap().pod_cidr = Some(net("10.234.0.0/16"));
    let err = plan(&snapshot, "cloud-2", &settings(), &PeerIds::new()).unwrap_err();
    assert_eq!(
        err,
        PlanError::PodCidrOverlap {
            first: "edge-2".into(),
            first_cidr: net("10.234.0.0/16"),
            second: "edge-1".into(),
            second_cidr: net("10.234.1.0/24"),
        }
    );
    assert!(
        err.to_string()
            .contains("node edge-2 has 10.234.0.0/16 and node edge-1 has 10.234.1.0/24"),
        "{err}"
    );
}

#[test]
fn pod_cidr_inside_the_service_cidr_is_refused() {
    let mut snapshot = cluster();
    snapshot.nodes.get_mut("edge-3").unwrap().pod_cidr = Some(net("10.100.0.0/24"));
    let err = plan(&snapshot, "edge-1", &settings(), &PeerIds::new()).unwrap_err();
    assert!(
        matches!(err, PlanError::ServiceCidrOverlap { ref node, .. } if node == "edge-3"),
        "{err}"
    );
}

#[test]
fn tunnel_endpoint_inside_a_tunnelled_prefix_is_refused() {
    // The connector reached at its InternalIP, which edges route into the tunnel.
    let set = BTreeMap::from([(
        "fabedge.io/tunnel-endpoint".to_owned(),
        "10.1.0.1".to_owned(),
    )]);
    let text = set_node_annotations(EXAMPLE_CLUSTER, "cloud-1", &set, &[]).unwrap();
    let snapshot = manifest::snapshot(&text).unwrap();
    let err = plan(&snapshot, "edge-1", &settings(), &PeerIds::new()).unwrap_err();
    assert_eq!(
        err,
        PlanError::TunnelLoop {
            prefix: net("10.1.0.1/32"),
            owner: "cloud-1's InternalIP".into(),
            peer: "cloud-1".into(),
            endpoint: ip("10.1.0.1"),
        }
    );
    assert!(
        err.to_string().contains("fabedge.io/tunnel-endpoint"),
        "{err}"
    );
}

#[test]
fn duplicate_node_address_is_a_route_conflict() {
    let mut snapshot = cluster();
    snapshot.nodes.get_mut("edge-3").unwrap().internal_ip = ip("10.2.0.12");
    let err = plan(&snapshot, "cloud-1", &settings(), &PeerIds::new()).unwrap_err();
    assert!(
        matches!(&err, PlanError::RouteConflict { prefix, first, second }
            if *prefix == net("10.2.0.12/32") && first == "edge-2's InternalIP" && second == "edge-3's InternalIP"),
        "{err}"
    );
}

#[test]
fn edge_without_pod_cidr_is_left_out_with_a_warning_but_cannot_plan_itself() {
    let mut snapshot = cluster();
    snapshot.nodes.get_mut("edge-3").unwrap().pod_cidr = None;
    let plan_1 = plan_for(&snapshot, "edge-1");
    assert!(!plan_1.routes.contains_key(&net("10.234.3.0/24")));
    assert!(plan_1.routes.contains_key(&net("10.2.0.13/32")));
    assert!(
        plan_1
            .warnings
            .iter()
            .any(|w| w.contains("edge-3 has no pod CIDR")),
        "{:?}",
        plan_1.warnings
    );
    let err = plan(&snapshot, "edge-3", &settings(), &PeerIds::new()).unwrap_err();
    assert_eq!(
        err,
        PlanError::MissingPodCidr {
            node: "edge-3".into()
        }
    );
}

#[test]
fn mtus_follow_the_uplink_and_the_tunnel_mode() {
    let snapshot = cluster();
    let connector = plan_for(&snapshot, "cloud-1");
    assert_eq!(
        (connector.config.tunnel_mtu, connector.config.flannel_mtu),
        (1450, 1450)
    );

    let jumbo = Settings {
        uplink_mtu: 9000,
        ..settings()
    };
    let plan_jumbo = plan(&snapshot, "edge-1", &jumbo, &PeerIds::new()).unwrap();
    assert_eq!(plan_jumbo.config.tunnel_mtu, 8950);

    let esp = Settings {
        tunnel_mode: TunnelMode::Esp,
        ..settings()
    };
    let edge_esp = plan(&snapshot, "edge-1", &esp, &PeerIds::new()).unwrap();
    assert_eq!(edge_esp.config.tunnel_mtu, 1500 - ESP_OVERHEAD);
    assert_eq!(edge_esp.config.tunnel_mode, tunnel_mode::ESP);
    // ESP: fe-tunnel is an xfrm interface carrying our if_id, sized for ESP in UDP.
    assert!(
        matches!(
            edge_esp.devices[..],
            [
                Device::Bridge { mtu: 1420, .. },
                Device::XfrmTunnel {
                    mtu: 1420,
                    if_id: crate::esp::xfrm::FE_IF_ID,
                    ..
                }
            ]
        ),
        "{:?}",
        edge_esp.devices
    );
    assert!(
        edge_esp
            .cni
            .as_ref()
            .unwrap()
            .json
            .contains("\"mtu\": 1420"),
        "{:?}",
        edge_esp.cni
    );
    assert_eq!(
        edge_esp.attachments,
        [
            crate::datapath::Attachment::new(Program::FromPod, "br-fabedge"),
            crate::datapath::Attachment::new(Program::ToPod, "br-fabedge"),
            crate::datapath::Attachment::new(Program::TunnelIngress, TUNNEL_DEV),
            crate::datapath::Attachment::new(Program::TunnelEgress, TUNNEL_DEV),
            crate::datapath::Attachment::new(Program::UplinkIngress, "eth0"),
            crate::datapath::Attachment::new(Program::UplinkEgress, "eth0"),
        ]
    );
    assert_eq!(peer(&edge_esp, "cloud-1").port, ESP_IN_UDP_PORT);
    assert!(
        edge_esp
            .kernel_routes
            .iter()
            .all(|r| r.dev.as_deref() == Some(TUNNEL_DEV))
    );

    let tiny = Settings {
        uplink_mtu: 100,
        ..settings()
    };
    let err = plan(&snapshot, "edge-1", &tiny, &PeerIds::new()).unwrap_err();
    assert!(
        matches!(
            err,
            PlanError::Setting {
                setting: "uplink MTU",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn connector_needs_its_flannel_mac_and_uplink() {
    let snapshot = cluster();
    let no_mac = Settings {
        flannel_mac: None,
        ..settings()
    };
    let err = plan(&snapshot, "cloud-1", &no_mac, &PeerIds::new()).unwrap_err();
    assert!(err.to_string().contains("flannel.1 MAC"), "{err}");
    let no_uplink = Settings {
        uplink: None,
        ..settings()
    };
    assert!(matches!(
        plan(&snapshot, "cloud-1", &no_uplink, &PeerIds::new()),
        Err(PlanError::Setting {
            setting: "uplink",
            ..
        })
    ));
    // Edge and cloud nodes need neither.
    let bare = Settings::default();
    assert!(plan(&snapshot, "edge-1", &bare, &PeerIds::new()).is_ok());
    assert!(plan(&snapshot, "cloud-2", &bare, &PeerIds::new()).is_ok());
}

#[test]
fn unknown_node_and_clashing_ports_are_refused() {
    let snapshot = cluster();
    assert_eq!(
        plan(&snapshot, "edge-9", &settings(), &PeerIds::new()),
        Err(PlanError::UnknownNode {
            node: "edge-9".into()
        })
    );
    let clash = Settings {
        tunnel_port: DEFAULT_FLANNEL_PORT,
        ..settings()
    };
    assert!(matches!(
        plan(&snapshot, "edge-1", &clash, &PeerIds::new()),
        Err(PlanError::Setting { .. })
    ));
}

#[test]
fn role_override_replaces_the_labels() {
    let overridden = Settings {
        role_override: Some(Role::Cloud),
        ..settings()
    };
    let plan = plan(&cluster(), "edge-1", &overridden, &PeerIds::new()).unwrap();
    assert_eq!(plan.role, Role::Cloud);
    assert!(
        plan.kernel_routes
            .iter()
            .all(|r| r.dst != net("10.2.0.11/32"))
    );
}

// ---- the manifest source, through the example cluster ----

#[test]
fn manifest_reads_nodes_with_roles_addresses_and_leases() {
    let snapshot = cluster();
    let roles: Vec<(&str, Role)> = snapshot
        .nodes
        .values()
        .map(|n| (n.name.as_str(), n.role))
        .collect();
    assert_eq!(
        roles,
        [
            ("cloud-1", Role::Connector),
            ("cloud-2", Role::Cloud),
            ("edge-1", Role::Edge),
            ("edge-2", Role::Edge),
            ("edge-3", Role::Edge)
        ]
    );
    let cloud2 = &snapshot.nodes["cloud-2"];
    assert_eq!(
        (cloud2.internal_ip, cloud2.external_ip),
        (ip("10.1.0.2"), None)
    );
    assert_eq!(
        cloud2.tunnel_endpoint,
        ip("10.1.0.2"),
        "no ExternalIP: the InternalIP"
    );
    assert_eq!(snapshot.nodes["edge-1"].tunnel_endpoint, ip("198.18.0.11"));
    assert_eq!(
        cloud2.flannel,
        Some(model::FlannelLease {
            vtep_mac: CLOUD2_MAC,
            public_ip: ip("10.1.0.2"),
            backend_type: "vxlan".into()
        })
    );
    assert_eq!(
        snapshot.communities["beijing"]
            .members
            .iter()
            .collect::<Vec<_>>(),
        ["edge-1", "edge-2"]
    );
}

#[test]
fn manifest_reads_services_and_endpoint_slices() {
    let snapshot = cluster();
    let dns = &snapshot.services[&model::NamespacedName::new("kube-system", "dns")];
    assert_eq!(dns.cluster_ips, [ip("10.96.0.10")]);
    assert!(!dns.headless);
    assert_eq!(
        dns.ports,
        [
            model::ServicePort {
                name: "dns".into(),
                port: 53,
                protocol: model::Protocol::Udp,
                target_port: model::TargetPort::Number(53)
            },
            model::ServicePort {
                name: "dns-tcp".into(),
                port: 53,
                protocol: model::Protocol::Tcp,
                target_port: model::TargetPort::Number(53)
            },
        ]
    );
    assert_eq!(dns.session_affinity, model::SessionAffinity::None);
    assert_eq!(dns.internal_traffic_policy, model::TrafficPolicy::Cluster);

    let slice = &snapshot.endpoint_slices[&model::NamespacedName::new("kube-system", "dns-7x2kq")];
    assert_eq!(
        slice.service(),
        Some(model::NamespacedName::new("kube-system", "dns"))
    );
    assert_eq!(slice.ports.len(), 2);
    assert_eq!(
        slice.ports[0],
        model::EndpointPort {
            name: "dns".into(),
            port: Some(53),
            protocol: model::Protocol::Udp
        }
    );
    assert_eq!(
        slice.endpoints,
        [model::Endpoint {
            addresses: ip("10.234.1.10").into(),
            ready: true,
            serving: true,
            terminating: false,
            node_name: Some(model::node_name("edge-1")),
        }]
    );
}

#[test]
fn service_details_are_parsed_and_checked() {
    let text = "apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.20
  ports: [{port: 80, targetPort: http}]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  internalTrafficPolicy: Local
";
    let snapshot = manifest::snapshot(text).unwrap();
    let web = &snapshot.services[&model::NamespacedName::new("default", "web")];
    assert_eq!(web.ports[0].protocol, model::Protocol::Tcp);
    assert_eq!(
        web.ports[0].target_port,
        model::TargetPort::Name("http".into())
    );
    assert_eq!(
        web.session_affinity,
        model::SessionAffinity::ClientIp {
            timeout_seconds: 60
        }
    );
    assert_eq!(web.internal_traffic_policy, model::TrafficPolicy::Local);

    let headless = manifest::snapshot(&text.replace("10.96.0.20", "None")).unwrap();
    assert!(
        headless
            .services
            .values()
            .all(|s| s.headless && s.cluster_ips.is_empty())
    );

    let err =
        manifest::snapshot(&text.replace("port: 80", "port: 80, protocol: ICMP")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "manifest doc 1 (Service default/web) at line 1: spec.ports[0].protocol \"ICMP\" is not a protocol \
         Kubernetes knows; use TCP, UDP or SCTP"
    );
}

#[test]
fn bad_pod_cidr_error_names_document_node_field_and_value() {
    let text = EXAMPLE_CLUSTER.replace("podCIDR: 10.234.1.0/24", "podCIDR: 10.0.0.0/33");
    let err = manifest::snapshot(&text).unwrap_err();
    // The document starts at the `---` line before edge-1's.
    let lines: Vec<&str> = EXAMPLE_CLUSTER.lines().collect();
    let name_at = lines
        .iter()
        .position(|l| l.contains("name: edge-1"))
        .unwrap();
    let line = lines[..name_at].iter().rposition(|l| *l == "---").unwrap() + 1;
    assert_eq!(
        err.to_string(),
        format!(
            "manifest doc 3 (Node edge-1) at line {line}: spec.podCIDR \"10.0.0.0/33\" is not an IPv4 CIDR \
             (expected e.g. 10.234.1.0/24)"
        )
    );
}

#[test]
fn bad_tunnel_endpoint_annotation_names_node_field_and_value() {
    let set = BTreeMap::from([(
        "fabedge.io/tunnel-endpoint".to_owned(),
        "198.18.0".to_owned(),
    )]);
    let text = set_node_annotations(EXAMPLE_CLUSTER, "edge-2", &set, &[]).unwrap();
    let err = manifest::snapshot(&text).unwrap_err().to_string();
    assert!(err.starts_with("manifest doc 4 (Node edge-2)"), "{err}");
    assert!(
        err.contains(
            "annotation fabedge.io/tunnel-endpoint \"198.18.0\" is not an IPv4 address; set it to"
        ),
        "{err}"
    );
}

#[test]
fn bad_flannel_annotation_names_node_field_and_value() {
    let text = EXAMPLE_CLUSTER.replace(
        r#""VtepMAC":"ce:0c:02:00:00:02""#,
        r#""VtepMAC":"ce:0c:02""#,
    );
    let err = manifest::snapshot(&text).unwrap_err().to_string();
    assert!(err.starts_with("manifest doc 2 (Node cloud-2)"), "{err}");
    assert!(
        err.contains("annotation flannel.alpha.coreos.com/backend-data VtepMAC \"ce:0c:02\" is not a MAC address"),
        "{err}"
    );
}

#[test]
fn both_role_labels_are_refused() {
    let text = EXAMPLE_CLUSTER.replace(
        "    kubernetes.io/hostname: edge-2\n",
        "    kubernetes.io/hostname: edge-2\n    node-role.kubernetes.io/connector: \"\"\n",
    );
    let err = manifest::snapshot(&text).unwrap_err().to_string();
    assert!(err.starts_with("manifest doc 4 (Node edge-2)"), "{err}");
    assert!(
        err.contains(
            "carry both node-role.kubernetes.io/edge and node-role.kubernetes.io/connector"
        ),
        "{err}"
    );
}

#[test]
fn node_without_internal_ip_is_refused() {
    let text = EXAMPLE_CLUSTER.replace(
        "{type: InternalIP, address: 10.2.0.13}",
        "{type: Hostname, address: edge-3}",
    );
    let err = manifest::snapshot(&text).unwrap_err().to_string();
    assert!(
        err.contains("(Node edge-3)") && err.contains("status.addresses has no IPv4 InternalIP"),
        "{err}"
    );
}

#[test]
fn duplicate_objects_name_both_documents() {
    let err = manifest::snapshot(&format!("{EXAMPLE_CLUSTER}{EDGE_4}{EDGE_4}"))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("manifest doc 10 (Node edge-4)") && err.contains("first in doc 9"),
        "{err}"
    );
}

#[test]
fn kubectl_list_output_is_read_like_separate_documents() {
    let list = "apiVersion: v1\nkind: List\nitems:\n".to_owned()
        + &EDGE_4
            .lines()
            .skip(1)
            .enumerate()
            .map(|(i, l)| {
                if i == 0 {
                    format!("- {l}\n")
                } else {
                    format!("  {l}\n")
                }
            })
            .collect::<String>();
    let snapshot = manifest::snapshot(&list).unwrap();
    assert_eq!(
        snapshot.nodes["edge-4"].pod_cidr,
        Some(net("10.234.4.0/24"))
    );
    let broken = list.replace("10.234.4.0/24", "10.234.4.0/99");
    assert!(
        manifest::snapshot(&broken)
            .unwrap_err()
            .to_string()
            .starts_with("manifest doc 1 item 1 (Node edge-4)")
    );
}

#[test]
fn annotation_write_back_round_trips_and_keeps_other_documents() {
    let set = BTreeMap::from([
        ("example.com/a".to_owned(), "true".to_owned()),
        ("example.com/b".to_owned(), "10".to_owned()),
    ]);
    let written = set_node_annotations(EXAMPLE_CLUSTER, "edge-1", &set, &[]).unwrap();
    let snapshot = manifest::snapshot(&written).unwrap();
    let edge1 = &snapshot.nodes["edge-1"];
    assert_eq!(
        edge1.annotations.get("example.com/a").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        edge1.annotations.get("example.com/b").map(String::as_str),
        Some("10")
    );
    // The rest of the cluster is unchanged, comments included.
    let mut expected = cluster();
    expected.nodes.get_mut("edge-1").unwrap().annotations = set.clone();
    assert_eq!(snapshot, expected);
    assert!(
        written.starts_with(
            EXAMPLE_CLUSTER
                .split("---\napiVersion: v1\nkind: Node\nmetadata:\n  name: edge-1")
                .next()
                .unwrap()
        )
    );
    assert!(written.contains("# Edge nodes listed together get direct tunnels"));

    // Setting what is already there is a no-op, byte for byte.
    assert_eq!(
        set_node_annotations(&written, "edge-1", &set, &[]).unwrap(),
        written
    );
    // Removing them again leaves no annotations map behind.
    let removed = set_node_annotations(
        &written,
        "edge-1",
        &BTreeMap::new(),
        &set.keys().cloned().collect::<Vec<_>>(),
    )
    .unwrap();
    assert_eq!(manifest::snapshot(&removed).unwrap(), cluster());
    assert!(
        !removed
            .split("name: edge-1")
            .nth(1)
            .unwrap()
            .split("---")
            .next()
            .unwrap()
            .contains("annotations")
    );

    let err = set_node_annotations(EXAMPLE_CLUSTER, "edge-9", &set, &[]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "manifest (Node edge-9): is not in the manifest; add the Node before annotating it"
    );
}

#[test]
fn objects_survive_the_json_the_api_server_sends() {
    let objects = manifest::parse(EXAMPLE_CLUSTER).unwrap();
    let through_json = crate::source::Objects {
        nodes: serde_json::from_str(&serde_json::to_string(&objects.nodes).unwrap()).unwrap(),
        communities: serde_json::from_str(&serde_json::to_string(&objects.communities).unwrap())
            .unwrap(),
        services: serde_json::from_str(&serde_json::to_string(&objects.services).unwrap()).unwrap(),
        endpoint_slices: serde_json::from_str(
            &serde_json::to_string(&objects.endpoint_slices).unwrap(),
        )
        .unwrap(),
    };
    let snapshot = through_json.snapshot().unwrap();
    assert_eq!(snapshot, cluster());
    for node in ["cloud-1", "cloud-2", "edge-1", "edge-2", "edge-3"] {
        assert_eq!(plan_for(&snapshot, node), plan_for(&cluster(), node));
    }
}

#[test]
fn esp_public_endpoint_is_published_and_withdrawn_with_the_flag() {
    use crate::esp::keys::ESP_ENDPOINT_ANNOTATION;
    let mut snapshot = manifest::snapshot(&annotated_cluster_text()).unwrap();
    let forwarded: std::net::SocketAddrV4 = "192.0.2.44:14500".parse().unwrap();
    let esp = Settings {
        tunnel_mode: TunnelMode::Esp,
        esp_public_endpoint: Some(forwarded),
        ..settings()
    };
    let patch = plan(&snapshot, "cloud-1", &esp, &PeerIds::new())
        .unwrap()
        .annotations
        .into_iter()
        .find(|p| p.node == "cloud-1")
        .expect("the connector annotates itself");
    assert_eq!(
        patch.set.get(ESP_ENDPOINT_ANNOTATION).map(String::as_str),
        Some("192.0.2.44:14500")
    );
    let me = snapshot.nodes.get_mut("cloud-1").unwrap();
    me.annotations.extend(patch.set);
    // Published: no patch for it. Flag dropped: the annotation goes.
    let again = plan(&snapshot, "cloud-1", &esp, &PeerIds::new()).unwrap();
    assert!(
        !again
            .annotations
            .iter()
            .any(|p| p.set.contains_key(ESP_ENDPOINT_ANNOTATION)),
        "{:?}",
        again.annotations
    );
    let without = Settings {
        esp_public_endpoint: None,
        ..esp
    };
    let dropped = plan(&snapshot, "cloud-1", &without, &PeerIds::new()).unwrap();
    assert!(
        dropped
            .annotations
            .iter()
            .any(|p| p.node == "cloud-1" && p.remove == [ESP_ENDPOINT_ANNOTATION.to_owned()]),
        "{:?}",
        dropped.annotations
    );
}

#[test]
fn the_key_nonce_is_published_in_the_same_patch_as_the_public_key() {
    use crate::esp::keys::{KEY_NONCE_ANNOTATION, PUBLIC_KEY_ANNOTATION};
    let snapshot = manifest::snapshot(&annotated_cluster_text()).unwrap();
    let esp = Settings {
        tunnel_mode: TunnelMode::Esp,
        esp_public_key: Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into()),
        esp_generation: 1,
        esp_key_nonce: Some("AQEBAQEBAQEBAQEBAQEBAQ==".into()),
        ..settings()
    };
    let patch = plan(&snapshot, "edge-1", &esp, &PeerIds::new())
        .unwrap()
        .annotations
        .into_iter()
        .find(|p| p.node == "edge-1")
        .expect("the node annotates itself");
    // One patch: a peer never sees the key without the nonce (which it
    // would take for an agent from before nonces, and derive other keys).
    assert_eq!(
        patch.set.get(KEY_NONCE_ANNOTATION).map(String::as_str),
        Some("AQEBAQEBAQEBAQEBAQEBAQ==")
    );
    assert!(patch.set.contains_key(PUBLIC_KEY_ANNOTATION));
}

#[test]
fn vxlan_fast_path_encapsulates_in_the_program_unless_told_otherwise() {
    use fabedge_common::config_flags::{NO_FAST_PATH, TC_ENCAP};
    let snapshot = cluster();
    let flags = |settings: Settings| {
        plan(&snapshot, "edge-1", &settings, &PeerIds::new())
            .unwrap()
            .config
            .flags
    };
    assert_eq!(flags(settings()), TC_ENCAP, "the default");
    assert_eq!(
        flags(Settings {
            tunnel_key_egress: true,
            ..settings()
        }),
        0,
        "--tunnel-key-egress: fe-tunnel sets the key"
    );
    assert_eq!(
        flags(Settings {
            no_fast_path: true,
            ..settings()
        }),
        NO_FAST_PATH
    );
    assert_eq!(
        flags(Settings {
            tunnel_mode: TunnelMode::Esp,
            ..settings()
        }),
        0,
        "ESP goes through xfrm"
    );
}

/// The example cluster's prefixes: cloud and edge pod CIDRs, cloud and edge
/// node networks (the connector's tunnel endpoint, 198.18.0.1, is outside).
const CLUSTER_PREFIXES: [&str; 4] = [
    "10.244.0.0/16",
    "10.234.0.0/16",
    "10.1.0.0/16",
    "10.2.0.0/16",
];

/// What edge `me` plans with when it watches only the Nodes its view calls
/// for (`source::kube::NodeView`), routing `CLUSTER_PREFIXES` as a whole.
fn narrowed_plan(me: &str) -> Plan {
    use crate::source::kube::NodeView;
    let objects = manifest::parse(EXAMPLE_CLUSTER).unwrap();
    let view = NodeView::OwnCommunity {
        me: me.into(),
        role_override: None,
    };
    let own = objects
        .nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(me));
    let watches = view.watches(own, &objects.communities);
    let seen = crate::source::Objects {
        nodes: objects
            .nodes
            .iter()
            .filter(|node| watches.iter().any(|w| w.selects(node)))
            .cloned()
            .collect(),
        ..objects.clone()
    };
    assert!(
        seen.nodes.len() < objects.nodes.len(),
        "{me} sees every Node"
    );
    let settings = Settings {
        cluster_prefixes: CLUSTER_PREFIXES.iter().map(|p| net(p)).collect(),
        ..settings()
    };
    plan(&seen.snapshot().unwrap(), me, &settings, &PeerIds::new())
        .unwrap_or_else(|e| panic!("planning {me}: {e}"))
}

/// Where `plan`'s datapath sends `addr` (longest prefix match): the route
/// kind and the peer's name, or "connector group".
fn forwarding(plan: &Plan, addr: Ipv4Addr) -> Option<(u8, String)> {
    let (_, entry) = plan
        .routes
        .iter()
        .filter(|(prefix, _)| prefix.contains(&addr))
        .max_by_key(|(prefix, _)| prefix.prefix_len())?;
    let via = match entry.flags & route_flags::VIA_GROUP {
        0 => plan.peer_name(entry.peer_id).unwrap_or("").to_owned(),
        _ => "connector group".to_owned(),
    };
    Some((entry.kind, via))
}

/// Peers by name.
fn named_peers(plan: &Plan) -> BTreeMap<String, PeerEntry> {
    plan.peers
        .iter()
        .map(|(id, entry)| (plan.peer_name(*id).unwrap().to_owned(), *entry))
        .collect()
}

#[test]
fn an_edge_seeing_only_its_peers_and_connectors_forwards_every_cluster_address_the_same() {
    let whole = cluster();
    for me in ["edge-1", "edge-3"] {
        let full = plan_for(&whole, me);
        let narrowed = narrowed_plan(me);
        for node in whole.nodes.values() {
            let mut addrs = vec![node.internal_ip];
            addrs.extend(node.pod_cidr.map(|c| c.hosts().next().unwrap()));
            for addr in addrs {
                assert_eq!(
                    forwarding(&narrowed, addr),
                    forwarding(&full, addr),
                    "{me} → {addr} ({})",
                    node.name
                );
            }
        }
        assert_eq!(
            forwarding(&narrowed, ip("10.96.0.10")),
            forwarding(&full, ip("10.96.0.10"))
        );
        assert_eq!(named_peers(&narrowed), named_peers(&full), "{me}");
        assert_eq!(narrowed.groups, full.groups, "{me}");
        assert_eq!(narrowed.ha, full.ha, "{me}");
        assert_eq!(narrowed.services, full.services, "{me}");
        assert_eq!(
            (&narrowed.config, &narrowed.devices, &narrowed.attachments),
            (&full.config, &full.devices, &full.attachments)
        );
        // cloud-2 is neither a peer nor a connector: no route of its own.
        assert!(!narrowed.routes.contains_key(&net("10.1.0.2/32")));
    }
}

#[test]
fn cluster_prefixes_route_through_the_connector_group_behind_every_node_s_own_route() {
    let settings = Settings {
        cluster_prefixes: CLUSTER_PREFIXES.iter().map(|p| net(p)).collect(),
        ..settings()
    };
    let plan = super::plan(&cluster(), "edge-1", &settings, &PeerIds::new()).unwrap();
    for prefix in CLUSTER_PREFIXES {
        assert_eq!(
            route(&plan, prefix).0,
            tunnel(route_flags::VIA_GROUP)(CONNECTOR_GROUP),
            "{prefix}"
        );
    }
    // Inside them, the local pods and the community peer keep their own routes.
    assert_eq!(route(&plan, "10.234.1.0/24").0.kind, route_kind::LOCAL_POD);
    assert_eq!(route(&plan, "10.234.2.0/24").1, Some("edge-2"));
    // Not an edge's business elsewhere.
    let connector = super::plan(&cluster(), "cloud-1", &settings, &PeerIds::new()).unwrap();
    assert!(!connector.routes.contains_key(&net("10.2.0.0/16")));
}

#[test]
fn a_cluster_prefix_holding_a_connector_s_tunnel_endpoint_is_refused() {
    let settings = Settings {
        cluster_prefixes: vec![net("198.18.0.0/16")],
        ..settings()
    };
    let err = plan(&cluster(), "edge-3", &settings, &PeerIds::new()).unwrap_err();
    assert_eq!(
        err,
        PlanError::TunnelLoop {
            prefix: net("198.18.0.0/16"),
            owner: "cluster prefix 198.18.0.0/16 (--cluster-prefix)".into(),
            peer: "cloud-1".into(),
            endpoint: ip("198.18.0.1"),
        }
    );
}

#[test]
fn xdp_pod_rx_is_asked_of_the_datapath_in_vxlan_mode_with_the_fast_path_only() {
    use fabedge_common::config_flags::{NO_FAST_PATH, TC_ENCAP, XDP_POD_RX};
    let snapshot = cluster();
    let flags = |settings: Settings| {
        plan(&snapshot, "edge-1", &settings, &PeerIds::new())
            .unwrap()
            .config
            .flags
    };
    let on = || Settings {
        xdp_pod_rx: true,
        ..settings()
    };
    assert_eq!(flags(on()), TC_ENCAP | XDP_POD_RX);
    assert_eq!(
        flags(Settings {
            no_fast_path: true,
            ..on()
        }),
        NO_FAST_PATH,
        "--no-fast-path: the kernel delivers everything"
    );
    assert_eq!(
        flags(Settings {
            tunnel_mode: TunnelMode::Esp,
            ..on()
        }),
        0,
        "ESP: XDP sees only ciphertext"
    );
}
