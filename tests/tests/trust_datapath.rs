//! The datapath's trust checks, proven with BPF_PROG_TEST_RUN: tunnel
//! destinations never leave an uplink in clear (`fe_uplink_egress`), tunnel
//! sources never arrive in clear and Flannel VXLAN comes only from known
//! VTEPs with their own sources (`fe_uplink_ingress`, the same verdict as
//! the XDP guard's), a peer reaches only what we route (`fe_tunnel_ingress`)
//! and a pod speaks only from its node's pod CIDR (`fe_from_pod`). Needs root.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::Result;
use fabedge_agent::datapath::Program;
use fabedge_common::{
    Counter, DEFAULT_TUNNEL_PORT, DEFAULT_TUNNEL_VNI, ESP_IN_UDP_PORT, PeerEntry, TUNNEL_DEV_MAC,
    TUNNEL_SRC_MAC, mark, peer_kind, route_kind, tunnel_mode,
};
use fabedge_tests::{
    datapath::{
        SkbIn, TC_ACT_OK, TC_ACT_SHOT, TestDatapath, assert_dropped, assert_untouched, counted,
        fixtures::*, only,
    },
    packet::{Frame, vxlan_encap},
    xdp::{self, XDP_DROP, XDP_UPLINK, run_xdp},
};

const EDGE2_WAN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 12);
const CONNECTOR_WAN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// A cloud metadata service: never reachable through a peer.
const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

fn udp(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    Frame::eth(UPLINK_MAC, CLOUD2_NIC_MAC)
        .ipv4(src, dst)
        .udp(40000, 8080)
        .payload(b"plain")
        .build()
}

fn both_modes() -> [(u8, &'static str); 2] {
    [(tunnel_mode::VXLAN, "vxlan"), (tunnel_mode::ESP, "esp")]
}

// -- fail closed: fe_uplink_egress --------------------------------------------

#[test]
fn host_and_pod_traffic_for_tunnel_destinations_never_leaves_the_uplink_in_clear() -> Result<()> {
    for (mode, name) in both_modes() {
        let dp = edge(&format!("trust-leak-{name}"), mode)?;
        for (what, frame) in [
            ("host to a cloud pod", udp(NODE_IP, CLOUD_POD)),
            ("pod to a community peer's pod", udp(LOCAL_POD, PEER_POD)),
            (
                "an ICMP error to a remote pod",
                Frame::eth(UPLINK_MAC, CLOUD2_NIC_MAC)
                    .ipv4(NODE_IP, PEER_POD)
                    .icmp_echo_request(1, 1)
                    .build(),
            ),
        ] {
            assert_dropped(
                &dp,
                Program::UplinkEgress,
                &frame,
                Counter::DropOutsideTunnel,
                &format!("{name}: {what}"),
            );
        }
    }
    let dp = connector("trust-leak-conn")?;
    assert_dropped(
        &dp,
        Program::UplinkEgress,
        &udp(Ipv4Addr::from(CONNECTOR_LAN), LOCAL_POD),
        Counter::DropOutsideTunnel,
        "connector to an edge pod",
    );
    assert_dropped(
        &dp,
        Program::UplinkEgress,
        &udp(CLOUD_POD, NODE_IP),
        Counter::DropOutsideTunnel,
        "a cloud pod's packet to an edge node forwarded by the kernel",
    );
    Ok(())
}

#[test]
fn the_egress_guard_holds_before_the_configuration_is_armed() -> Result<()> {
    let mut dp = edge("trust-leak-unarmed", tunnel_mode::ESP)?;
    let mut config = dp.maps.config()?;
    config.ready = 0;
    dp.maps.set_config(config)?;
    assert_dropped(
        &dp,
        Program::UplinkEgress,
        &udp(NODE_IP, CLOUD_POD),
        Counter::DropOutsideTunnel,
        "a tunnel route in FE_ROUTES is enough",
    );
    Ok(())
}

#[test]
fn encapsulations_and_non_tunnel_traffic_leave_the_uplink_untouched() -> Result<()> {
    let inner = Frame::eth(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC)
        .ipv4(LOCAL_POD, PEER_POD)
        .udp(1, 2)
        .build();
    let our_vxlan = vxlan_encap(
        Frame::eth(UPLINK_MAC, CLOUD2_NIC_MAC),
        NODE_IP,
        EDGE2_WAN,
        50000,
        DEFAULT_TUNNEL_PORT,
        DEFAULT_TUNNEL_VNI,
        &inner,
    );
    let esp_in_udp = Frame::eth(UPLINK_MAC, CLOUD2_NIC_MAC)
        .ipv4(NODE_IP, CONNECTOR_WAN)
        .udp(ESP_IN_UDP_PORT, ESP_IN_UDP_PORT)
        .zero_checksum()
        .payload(&[0, 0, 0, 7, 0, 0, 0, 1, 0xee, 0xee])
        .build();
    let esp = Frame::eth(UPLINK_MAC, CLOUD2_NIC_MAC)
        .ipv4(NODE_IP, EDGE2_WAN)
        .protocol(50)
        .payload(&[0, 0, 0, 7, 0, 0, 0, 1, 0xee, 0xee])
        .build();
    for (mode, name) in both_modes() {
        let mut dp = edge(&format!("trust-pass-{name}"), mode)?;
        // A peer whose endpoint lies inside a tunnel prefix (a node address
        // that is also its tunnel endpoint): its encapsulation still leaves.
        let inside = Ipv4Addr::new(10, 244, 200, 1);
        dp.maps.set_peer(
            6,
            PeerEntry {
                kind: peer_kind::TUNNEL,
                underlay_ip: inside.octets(),
                ..PeerEntry::default()
            },
        )?;
        sync_peer_addrs(&mut dp)?;
        for (what, frame) in [
            ("our vxlan to a peer", our_vxlan.clone()),
            ("esp in udp to the connector", esp_in_udp.clone()),
            ("esp to a peer", esp.clone()),
            ("host to the internet", udp(NODE_IP, UNKNOWN)),
            (
                "to a tunnel endpoint inside a tunnel prefix",
                udp(NODE_IP, inside),
            ),
            (
                "arp",
                Frame::eth(UPLINK_MAC, CLOUD2_NIC_MAC)
                    .ethertype(0x0806)
                    .payload(&[0; 28])
                    .build(),
            ),
        ] {
            assert_untouched(
                &dp,
                Program::UplinkEgress,
                &frame,
                &format!("{name}: {what}"),
            );
        }
    }
    let dp = connector("trust-pass-conn")?;
    let flannel_inner = Frame::eth(FLANNEL_MAC, CLOUD2_VTEP_MAC)
        .ipv4(LOCAL_POD, CLOUD_POD)
        .udp(1, 2)
        .build();
    let flannel = vxlan_encap(
        Frame::eth(UPLINK_MAC, CLOUD2_NIC_MAC),
        Ipv4Addr::from(CONNECTOR_LAN),
        Ipv4Addr::from(CLOUD2_LAN),
        41234,
        8472,
        1,
        &flannel_inner,
    );
    for (what, frame) in [
        ("flannel vxlan to a cloud vtep", flannel),
        (
            "an edge pod's reply to a cloud node, forwarded plain on the cloud LAN",
            udp(LOCAL_POD, Ipv4Addr::from(CLOUD2_LAN)),
        ),
        (
            "to a cloud pod (flannel's business)",
            udp(NODE_IP, CLOUD_POD),
        ),
    ] {
        assert_untouched(&dp, Program::UplinkEgress, &frame, what);
    }
    Ok(())
}

// -- anti-spoofing: fe_uplink_ingress -----------------------------------------

#[test]
fn plain_packets_in_the_name_of_tunnel_sources_die_on_the_uplink() -> Result<()> {
    for (mode, name) in both_modes() {
        let dp = edge(&format!("trust-src-{name}"), mode)?;
        for (what, src) in [
            ("a community peer's pod", PEER_POD),
            ("a cloud pod (or a Service address)", CLOUD_POD),
        ] {
            assert_dropped(
                &dp,
                Program::UplinkIngress,
                &udp(src, LOCAL_POD),
                Counter::DropTunnelSourceOutsideTunnel,
                &format!("{name}: from the LAN in the name of {what}"),
            );
        }
        // The tunnel itself arrives from peers' underlay addresses.
        let inner = Frame::eth(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC)
            .ipv4(PEER_POD, LOCAL_POD)
            .udp(1, 2)
            .build();
        let from_peer = vxlan_encap(
            Frame::eth(CLOUD2_NIC_MAC, UPLINK_MAC),
            EDGE2_WAN,
            NODE_IP,
            50000,
            DEFAULT_TUNNEL_PORT,
            DEFAULT_TUNNEL_VNI,
            &inner,
        );
        assert_untouched(&dp, Program::UplinkIngress, &from_peer, "our tunnel");
        assert_untouched(
            &dp,
            Program::UplinkIngress,
            &udp(UNKNOWN, LOCAL_POD),
            "the site's LAN to a pod (the node's business)",
        );
    }
    let dp = connector("trust-src-conn")?;
    assert_dropped(
        &dp,
        Program::UplinkIngress,
        &udp(LOCAL_POD, CLOUD_POD),
        Counter::DropTunnelSourceOutsideTunnel,
        "connector: from the LAN in the name of an edge pod",
    );
    Ok(())
}

/// Flannel VXLAN from `outer_src` carrying a packet from `inner_src` to an edge pod.
fn flannel_from(outer_src: [u8; 4], inner_src: Ipv4Addr) -> Vec<u8> {
    let inner = Frame::eth(CLOUD2_VTEP_MAC, FLANNEL_MAC)
        .ipv4(inner_src, LOCAL_POD)
        .ttl(63)
        .udp(5353, 53)
        .payload(b"from the cloud")
        .build();
    flannel_to_connector(outer_src, &inner)
}

#[test]
fn connector_tc_gives_flannel_vxlan_the_xdp_guards_verdict() -> Result<()> {
    let mut dp = xdp::connector("trust-flannel")?;
    // A second VTEP with no pods of its own.
    let cloud3 = [10, 1, 0, 3];
    dp.maps.set_peer(
        6,
        PeerEntry {
            kind: peer_kind::FLANNEL_VTEP,
            underlay_ip: cloud3,
            vtep_mac: [0x66, 0x66, 0, 0, 0, 3],
            ..PeerEntry::default()
        },
    )?;
    sync_peer_addrs(&mut dp)?;
    let dropped = [
        (
            "from a node that is no VTEP",
            flannel_from([10, 1, 0, 77], CLOUD_POD),
        ),
        (
            "a VTEP in the name of an edge pod",
            flannel_from(CLOUD2_LAN, LOCAL_POD_2),
        ),
        (
            "a VTEP in the name of another VTEP's pods",
            flannel_from(cloud3, CLOUD_POD),
        ),
    ];
    for (what, frame) in &dropped {
        assert_dropped(
            &dp,
            Program::UplinkIngress,
            frame,
            Counter::DropSpoofed,
            what,
        );
        let xdp = run_xdp(&dp, XDP_UPLINK, frame, 1)?;
        assert_eq!(xdp.action, XDP_DROP, "XDP agrees: {what}");
    }
    // What the guard lets through is decapsulated as before.
    let (out, delta) = counted(&dp, || {
        dp.run(Program::UplinkIngress, &flannel_from(CLOUD2_LAN, CLOUD_POD))
    })?;
    assert_ne!(out.action, TC_ACT_SHOT);
    assert_eq!(delta.get(Counter::FlannelDecap.name()), Some(&1));
    // A VTEP's node address (not a pod CIDR) is Flannel's business, as without fabedge.
    let (out, _) = counted(&dp, || {
        dp.run(
            Program::UplinkIngress,
            &flannel_from(CLOUD2_LAN, Ipv4Addr::from(CLOUD2_LAN)),
        )
    })?;
    assert_ne!(out.action, TC_ACT_SHOT);
    Ok(())
}

// -- a peer reaches only what we route: fe_tunnel_ingress (ESP) ----------------

/// A packet from `src` to `dst` decrypted by `peer`'s SA, through
/// `fe_tunnel_ingress`: its verdict and the counters it moved.
fn decrypted(
    dp: &TestDatapath,
    peer: u16,
    src: Ipv4Addr,
    dst: Ipv4Addr,
) -> Result<(i32, BTreeMap<&'static str, u64>)> {
    let frame = Frame::eth(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC)
        .ipv4(src, dst)
        .udp(1, 2)
        .payload(b"decrypted")
        .build();
    let skb = SkbIn {
        mark: mark::from_tunnel(0, peer),
        ..SkbIn::default()
    };
    let (out, delta) = counted(dp, || dp.run_with(Program::TunnelIngress, &frame, skb))?;
    Ok((out.action, delta))
}

#[test]
fn esp_ingress_drops_destinations_we_do_not_route() -> Result<()> {
    let dropped = (TC_ACT_SHOT, only(Counter::DropTunnelDestination));
    let accepted = (TC_ACT_OK, only(Counter::FromTunnel));

    let mut dp = edge("trust-dst-edge", tunnel_mode::ESP)?;
    for (what, dst) in [("the internet", UNKNOWN), ("a metadata service", METADATA)] {
        let verdict = decrypted(&dp, EDGE2_PEER, PEER_POD, dst)?;
        assert_eq!(verdict, dropped, "edge: {what}");
    }
    // An edge whose pods may go out through the node: not its peers.
    dp.maps
        .set_route(net("0.0.0.0/0"), route(route_kind::KERNEL, 0))?;
    let verdict = decrypted(&dp, EDGE2_PEER, PEER_POD, UNKNOWN)?;
    assert_eq!(verdict, dropped, "edge with a default route");
    for (what, dst) in [("a local pod", LOCAL_POD), ("the node", NODE_IP)] {
        let verdict = decrypted(&dp, EDGE2_PEER, PEER_POD, dst)?;
        assert_eq!(verdict, accepted, "edge: {what}");
    }

    let mut dp = connector("trust-dst-conn")?;
    let mut config = dp.maps.config()?;
    config.tunnel_mode = tunnel_mode::ESP;
    dp.maps.set_config(config)?;
    for (what, dst) in [
        ("the VPC", Ipv4Addr::new(10, 1, 0, 99)),
        ("a metadata service", METADATA),
        ("the internet", UNKNOWN),
    ] {
        let verdict = decrypted(&dp, EDGE1_PEER, LOCAL_POD, dst)?;
        assert_eq!(verdict, dropped, "connector: {what}");
    }
    for (what, dst) in [
        ("a cloud pod", CLOUD_POD),
        ("a cloud node (kernel route)", Ipv4Addr::from(CLOUD2_LAN)),
    ] {
        let verdict = decrypted(&dp, EDGE1_PEER, LOCAL_POD, dst)?;
        assert_eq!(verdict, accepted, "connector: {what}");
    }
    Ok(())
}

// -- a pod speaks only from its pod CIDR: fe_from_pod --------------------------

#[test]
fn pods_send_only_from_their_nodes_pod_cidr() -> Result<()> {
    let dp = edge("trust-pod-src", tunnel_mode::VXLAN)?;
    for (what, src) in [
        ("the node", NODE_IP),
        ("another site's pod", PEER_POD),
        ("a cloud pod", CLOUD_POD),
        ("a stranger", UNKNOWN),
        ("nobody", Ipv4Addr::UNSPECIFIED),
    ] {
        let frame = Frame::eth(POD_MAC, BRIDGE_MAC)
            .ipv4(src, LOCAL_POD_2)
            .udp(1, 2)
            .build();
        assert_dropped(&dp, Program::FromPod, &frame, Counter::DropPodSource, what);
    }
    let own = Frame::eth(POD_MAC, BRIDGE_MAC)
        .ipv4(LOCAL_POD, NODE_IP)
        .udp(1, 2)
        .build();
    let (out, delta) = counted(&dp, || dp.run(Program::FromPod, &own))?;
    assert_eq!((out.action, delta), (TC_ACT_OK, only(Counter::PassLocal)));
    Ok(())
}
