//! Connector high availability in the datapath (#12), proven with
//! BPF_PROG_TEST_RUN and one pair of namespaces: routes through a connector
//! group follow the group's active member and move with one map write; any
//! member may send in the name of the group's prefixes, no one else may;
//! the connector answers liveness probes from its peers in XDP and in TC
//! (bytes checked by the harness's own parser, and a real UDP socket
//! accepting the reply) and drops those from strangers; Flannel VXLAN to a
//! shared VTEP address, carrying another connector's VTEP MAC, is the
//! connector's as if addressed to its own, down to a kernel `flannel.1`
//! accepting what is left to it. Needs root.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use fabedge_agent::datapath::{Attachment, Program, XdpMode};
use fabedge_common::{
    CONNECTOR_GROUP, Counter, DEFAULT_FLANNEL_PORT, DEFAULT_FLANNEL_VNI, DEFAULT_PROBE_PORT,
    GroupEntry, MAX_GROUP_MEMBERS, PeerEntry, RouteEntry, TUNNEL_DEV_MAC, TUNNEL_SRC_MAC, mark,
    probe, role, route_flags, route_kind, tunnel_mode,
};
use fabedge_tests::{
    datapath::{
        SkbIn, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TestDatapath, assert_untouched, counted,
        fixtures::*, only,
    },
    netns::{Netns, PacketSocket, veth_pair},
    packet::{Frame, Mac, UdpChecksum, parse_eth, vxlan_encap},
    xdp::{self, FibLab, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, XDP_UPLINK, run_xdp},
};

/// edge-1's second connector (the group's standby), and its WAN address.
const CONNECTOR_B_PEER: u16 = 6;
const CONNECTOR_A_WAN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const CONNECTOR_B_WAN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const EDGE1_WAN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);
const EDGE2_WAN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 12);
/// A shared VTEP address of the connector group, and the `flannel.1` MAC
/// of the connector that held it before a failover.
const VTEP_ADDR: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 200);
const OTHER_FLANNEL_MAC: Mac = [0x66, 0x66, 0, 0, 0, 0x09];

fn group(active: u16, members: &[u16]) -> GroupEntry {
    GroupEntry::new(active, members)
}

/// edge-1 (see `fixtures::edge`) whose cloud routes go through the
/// connector group {A, B}, A active.
fn grouped_edge(name: &str, mode: u8) -> Result<TestDatapath> {
    let mut dp = xdp::edge(name, mode)?;
    dp.maps
        .set_peer(CONNECTOR_B_PEER, tunnel_peer(CONNECTOR_B_WAN.octets()))?;
    sync_peer_addrs(&mut dp)?;
    dp.maps.set_groups(&BTreeMap::from([(
        CONNECTOR_GROUP,
        group(CONNECTOR_PEER, &[CONNECTOR_PEER, CONNECTOR_B_PEER]),
    )]))?;
    dp.maps.set_route(
        net("10.244.0.0/16"),
        RouteEntry {
            kind: route_kind::TUNNEL,
            flags: route_flags::VIA_GROUP,
            peer_id: CONNECTOR_GROUP,
        },
    )?;
    Ok(dp)
}

fn pod_to_cloud() -> Vec<u8> {
    Frame::eth(POD_MAC, BRIDGE_MAC)
        .ipv4(LOCAL_POD, CLOUD_POD)
        .ttl(64)
        .udp(4000, 53)
        .payload(b"to the cloud")
        .build()
}

/// The node's own packet to a cloud pod, as the kernel routes it into `fe-tunnel`.
fn host_to_cloud() -> Vec<u8> {
    Frame::eth([0; 6], [0; 6])
        .ipv4(NODE_IP, CLOUD_POD)
        .udp(4000, 53)
        .build()
}

// -- routes through a group ----------------------------------------------------

#[test]
fn group_routes_go_to_the_active_member_and_one_write_moves_the_next_packet() -> Result<()> {
    for (mode, name) in [(tunnel_mode::VXLAN, "vxlan"), (tunnel_mode::ESP, "esp")] {
        let mut dp = grouped_edge(&format!("ha-route-{name}"), mode)?;
        for (active, what) in [
            (CONNECTOR_PEER, "A active"),
            (CONNECTOR_B_PEER, "after the failover to B"),
            (CONNECTOR_PEER, "back to A"),
        ] {
            dp.maps.set_group_active(CONNECTOR_GROUP, active)?;
            let (out, delta) = counted(&dp, || dp.run(Program::FromPod, &pod_to_cloud()))?;
            assert_eq!(
                mark::tunnel_peer(out.mark),
                Some(active),
                "{name}: {what}: the mark xfrm and fe_tunnel_egress follow"
            );
            let expected = if mode == tunnel_mode::VXLAN {
                (TC_ACT_REDIRECT, only(Counter::RedirectToTunnel))
            } else {
                (TC_ACT_OK, only(Counter::PassKernel))
            };
            assert_eq!((out.action, delta), expected, "{name}: {what}");
        }
    }
    // The node's own traffic, routed by destination in fe_tunnel_egress.
    let mut dp = grouped_edge("ha-route-egress", tunnel_mode::VXLAN)?;
    for active in [CONNECTOR_PEER, CONNECTOR_B_PEER] {
        dp.maps.set_group_active(CONNECTOR_GROUP, active)?;
        let (out, delta) = counted(&dp, || dp.run(Program::TunnelEgress, &host_to_cloud()))?;
        assert_eq!((out.action, delta), (TC_ACT_OK, only(Counter::ToTunnel)));
        assert_eq!(
            dp.maps.peer_stats(active)?.tx_packets,
            1,
            "the tunnel key names peer {active}"
        );
    }
    Ok(())
}

#[test]
fn a_group_without_a_live_member_drops_and_counts_group_down() -> Result<()> {
    for (mode, name) in [(tunnel_mode::VXLAN, "vxlan"), (tunnel_mode::ESP, "esp")] {
        let mut dp = grouped_edge(&format!("ha-down-{name}"), mode)?;
        let down = (TC_ACT_SHOT, only(Counter::DropGroupDown));
        dp.maps.set_group_active(CONNECTOR_GROUP, 0)?;
        let (out, delta) = counted(&dp, || dp.run(Program::FromPod, &pod_to_cloud()))?;
        assert_eq!((out.action, delta), down, "{name}: active 0");
        if mode == tunnel_mode::VXLAN {
            let (out, delta) = counted(&dp, || dp.run(Program::TunnelEgress, &host_to_cloud()))?;
            assert_eq!(
                (out.action, delta),
                down,
                "{name}: the node's own, active 0"
            );
        }
        // A member whose peer slot is gone (removed by an apply).
        dp.maps
            .set_group_active(CONNECTOR_GROUP, CONNECTOR_B_PEER)?;
        dp.maps.set_peer(CONNECTOR_B_PEER, PeerEntry::default())?;
        let (out, delta) = counted(&dp, || dp.run(Program::FromPod, &pod_to_cloud()))?;
        assert_eq!((out.action, delta), down, "{name}: active peer unused");
        // A route naming a group not written (yet): never the peer of the same id.
        dp.maps.set_groups(&BTreeMap::new())?;
        let (out, delta) = counted(&dp, || dp.run(Program::FromPod, &pod_to_cloud()))?;
        assert_eq!((out.action, delta), down, "{name}: group not written");
    }
    Ok(())
}

#[test]
fn set_group_active_refuses_a_peer_that_is_no_member() -> Result<()> {
    let mut dp = grouped_edge("ha-refuse", tunnel_mode::VXLAN)?;
    let err = dp
        .maps
        .set_group_active(CONNECTOR_GROUP, EDGE2_PEER)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "peer 2 is not a member of group 1 (members [1, 6]): FE_GROUPS unchanged; apply a plan \
         that lists it first"
    );
    assert_eq!(dp.maps.group(CONNECTOR_GROUP)?.active, CONNECTOR_PEER);
    // Writers clear what they are not given.
    let groups = BTreeMap::from([(3, group(EDGE2_PEER, &[EDGE2_PEER]))]);
    assert_eq!(dp.maps.set_groups(&groups)?, 2);
    assert_eq!(dp.maps.group_entries()?, groups);
    let full = group(1, &[1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(full.members.len(), MAX_GROUP_MEMBERS);
    assert!(full.has_member(7) && !full.has_member(8));
    Ok(())
}

// -- who may send in a group's name ------------------------------------------

#[test]
fn any_member_may_send_in_a_group_prefixs_name_and_no_one_else() -> Result<()> {
    // ESP: the SA that decrypted it names the sender.
    let dp = grouped_edge("ha-sender-esp", tunnel_mode::ESP)?;
    let decrypted = Frame::eth(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC)
        .ipv4(CLOUD_POD, LOCAL_POD)
        .udp(53, 4000)
        .build();
    for (peer, expected) in [
        (CONNECTOR_PEER, (TC_ACT_OK, only(Counter::FromTunnel))),
        // The standby forwards too (a cloud node whose Flannel still sends
        // to B, or B taking over before the edge noticed).
        (CONNECTOR_B_PEER, (TC_ACT_OK, only(Counter::FromTunnel))),
        (EDGE2_PEER, (TC_ACT_SHOT, only(Counter::DropSpoofed))),
    ] {
        let skb = SkbIn {
            mark: mark::from_tunnel(0, peer),
            ..SkbIn::default()
        };
        let (out, delta) = counted(&dp, || dp.run_with(Program::TunnelIngress, &decrypted, skb))?;
        assert_eq!((out.action, delta), expected, "ESP from peer {peer}");
    }
    assert_eq!(dp.maps.peer_stats(CONNECTOR_B_PEER)?.rx_packets, 1);

    // Our VXLAN at the NIC: the outer source must be a member's address.
    // (`fe_tunnel_ingress` in VXLAN mode asks the same `sender_at` with the
    // tunnel key's remote, which BPF_PROG_TEST_RUN cannot supply.)
    let dp = grouped_edge("ha-sender-xdp", tunnel_mode::VXLAN)?;
    let inner = Frame::eth(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC)
        .ipv4(CLOUD_POD, LOCAL_POD)
        .udp(53, 4000)
        .build();
    for (outer_src, expected) in [
        (CONNECTOR_A_WAN, (XDP_PASS, only(Counter::XdpPass))),
        (CONNECTOR_B_WAN, (XDP_PASS, only(Counter::XdpPass))),
        (EDGE2_WAN, (XDP_DROP, only(Counter::XdpDropSpoofed))),
    ] {
        let frame = xdp::tunnel_frame(outer_src, NODE_IP, &inner);
        let (out, delta) = counted(&dp, || run_xdp(&dp, XDP_UPLINK, &frame, 1))?;
        assert_eq!((out.action, delta), expected, "VXLAN from {outer_src}");
    }
    Ok(())
}

// -- a punched community peer (hole punching, ESP) ----------------------------

#[test]
fn a_punched_peers_prefix_goes_through_the_connector_until_direct_and_comes_from_either()
-> Result<()> {
    let mut dp = grouped_edge("ha-punched", tunnel_mode::ESP)?;
    let to_peer = Frame::eth(POD_MAC, BRIDGE_MAC)
        .ipv4(LOCAL_POD, PEER_POD)
        .ttl(64)
        .udp(4000, 53)
        .payload(b"to edge-2")
        .build();
    let from_peer = Frame::eth(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC)
        .ipv4(PEER_POD, LOCAL_POD)
        .udp(53, 4000)
        .build();
    let peer_route = |flags: u8| RouteEntry {
        kind: route_kind::TUNNEL,
        flags,
        peer_id: EDGE2_PEER,
    };
    let relayed = route_flags::PUNCHED | route_flags::RELAYED;
    let sent_to = |dp: &TestDatapath| -> Result<(i32, Option<u16>)> {
        let (out, delta) = counted(dp, || dp.run(Program::FromPod, &to_peer))?;
        let counted_as = if out.action == TC_ACT_OK {
            only(Counter::PassKernel)
        } else {
            only(Counter::DropGroupDown)
        };
        assert_eq!(delta, counted_as, "action {}", out.action);
        Ok((out.action, mark::tunnel_peer(out.mark)))
    };
    let received_from = |dp: &TestDatapath, peer: u16| -> Result<(i32, Counter)> {
        let skb = SkbIn {
            mark: mark::from_tunnel(0, peer),
            ..SkbIn::default()
        };
        let (out, delta) = counted(dp, || dp.run_with(Program::TunnelIngress, &from_peer, skb))?;
        let counter = if out.action == TC_ACT_OK {
            Counter::FromTunnel
        } else {
            Counter::DropSpoofed
        };
        assert_eq!(delta, only(counter), "from peer {peer}");
        Ok((out.action, counter))
    };
    let accepted = (TC_ACT_OK, Counter::FromTunnel);
    let spoofed = (TC_ACT_SHOT, Counter::DropSpoofed);

    // Relayed: to the connector group's active member, whichever it is.
    dp.maps
        .set_route(net("10.234.2.0/24"), peer_route(relayed))?;
    assert_eq!(sent_to(&dp)?, (TC_ACT_OK, Some(CONNECTOR_PEER)));
    dp.maps
        .set_group_active(CONNECTOR_GROUP, CONNECTOR_B_PEER)?;
    assert_eq!(sent_to(&dp)?, (TC_ACT_OK, Some(CONNECTOR_B_PEER)));
    dp.maps.set_group_active(CONNECTOR_GROUP, 0)?;
    assert_eq!(
        sent_to(&dp)?.0,
        TC_ACT_SHOT,
        "no live connector: dropped and counted, never sent to the peer"
    );
    dp.maps.set_group_active(CONNECTOR_GROUP, CONNECTOR_PEER)?;

    // Either end may switch first: the peer's packets come direct or
    // relayed by any connector, in both states; no one else's.
    for (flags, state) in [(relayed, "relayed"), (route_flags::PUNCHED, "direct")] {
        dp.maps.set_route(net("10.234.2.0/24"), peer_route(flags))?;
        for peer in [EDGE2_PEER, CONNECTOR_PEER, CONNECTOR_B_PEER] {
            assert_eq!(received_from(&dp, peer)?, accepted, "{state}: from {peer}");
        }
        assert_eq!(
            received_from(&dp, ORPHAN_PEER)?,
            spoofed,
            "{state}: from a stranger"
        );
    }
    // Direct: one write, and the next packet goes to the peer.
    assert_eq!(sent_to(&dp)?, (TC_ACT_OK, Some(EDGE2_PEER)));

    // Without the flag, a connector may not speak for a community peer.
    dp.maps.set_route(net("10.234.2.0/24"), peer_route(0))?;
    assert_eq!(received_from(&dp, CONNECTOR_PEER)?, spoofed);
    assert_eq!(received_from(&dp, EDGE2_PEER)?, accepted);
    Ok(())
}

// -- the probe reflector -------------------------------------------------------

/// A probe header (`fabedge_common::probe::ProbeHeader`) spelled out byte by byte.
fn probe_payload(kind: u8, seq: u32, token: [u8; 16]) -> Vec<u8> {
    let mut out = b"feP1".to_vec();
    out.extend([kind, 0, 0, 0]);
    out.extend(seq.to_be_bytes());
    out.extend([0; 4]);
    out.extend(token);
    assert_eq!(out.len(), size_of::<probe::ProbeHeader>());
    out
}

const TOKEN: [u8; 16] = *b"sixteen-by-token";

/// A probe from edge-1's NIC to `dst` on the connector.
fn probe_frame(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dport: u16,
    payload: &[u8],
    checksum: bool,
) -> Vec<u8> {
    let udp = Frame::eth(xdp::EDGE1_NIC_MAC, UPLINK_MAC)
        .ipv4(src, dst)
        .id(7)
        .ttl(61)
        .udp(40001, dport)
        .payload(payload);
    if checksum { udp } else { udp.zero_checksum() }.build()
}

/// The reply a kernel would have sent from the probe port, built
/// independently of the program.
fn expected_reply(to: Ipv4Addr, from: Ipv4Addr, payload: &[u8], checksum: bool) -> Vec<u8> {
    let udp = Frame::eth(UPLINK_MAC, xdp::EDGE1_NIC_MAC)
        .ipv4(from, to)
        .id(7)
        .ttl(61)
        .udp(DEFAULT_PROBE_PORT, 40001)
        .payload(payload);
    if checksum { udp } else { udp.zero_checksum() }.build()
}

/// The connector with the reflector on.
fn reflector(name: &str, mode: u8) -> Result<TestDatapath> {
    let mut dp = xdp::connector(name)?;
    let mut config = dp.maps.config()?;
    config.tunnel_mode = mode;
    config.probe_port = DEFAULT_PROBE_PORT;
    dp.maps.set_config(config)?;
    dp.maps.set_vtep_addrs(&BTreeSet::from([VTEP_ADDR]))?;
    Ok(dp)
}

/// `frame` answered by XDP and by TC with exactly `expected`.
fn assert_answered(dp: &TestDatapath, frame: &[u8], expected: &[u8], what: &str) -> Result<()> {
    let (out, delta) = counted(dp, || run_xdp(dp, XDP_UPLINK, frame, 1))?;
    assert_eq!(
        (out.action, delta),
        (XDP_TX, only(Counter::ProbeAnswered)),
        "XDP: {what}"
    );
    assert_eq!(out.data, expected, "XDP: {what}");
    let (out, delta) = counted(dp, || dp.run(Program::UplinkIngress, frame))?;
    assert_eq!(
        (out.action, delta),
        (TC_ACT_REDIRECT, only(Counter::ProbeAnswered)),
        "TC: {what}"
    );
    assert_eq!(out.data, expected, "TC: {what}");
    Ok(())
}

#[test]
fn the_connector_answers_probes_from_its_peers_in_xdp_and_tc() -> Result<()> {
    let request = probe_payload(probe::REQUEST, 41, TOKEN);
    let reply = probe_payload(probe::REPLY, 41, TOKEN);
    let connector = Ipv4Addr::from(CONNECTOR_LAN);
    for (mode, name) in [(tunnel_mode::VXLAN, "vxlan"), (tunnel_mode::ESP, "esp")] {
        let dp = reflector(&format!("ha-probe-{name}"), mode)?;
        // ESP mode answers only while the ESP-in-UDP socket is held (see
        // the test below); the test runs look sockets up in this namespace.
        let ns = Netns::new(&format!("ha-probe-{name}"))?;
        let _esp_socket = ns.enter(|| Ok(std::net::UdpSocket::bind("0.0.0.0:4500")?))?;
        for (to, checksum, what) in [
            (connector, true, "to the node's address"),
            (connector, false, "without a UDP checksum"),
            (VTEP_ADDR, true, "to a shared VTEP address"),
        ] {
            let frame = probe_frame(EDGE1_WAN, to, DEFAULT_PROBE_PORT, &request, checksum);
            let expected = expected_reply(EDGE1_WAN, to, &reply, checksum);
            ns.enter(|| assert_answered(&dp, &frame, &expected, &format!("{name}: {what}")))?;
            // What the prober's kernel checks, by the harness's parser.
            let ip = parse_eth(&expected)?.ipv4()?;
            assert!(ip.checksum_valid);
            let udp = ip.udp()?;
            let status = if checksum {
                UdpChecksum::Valid
            } else {
                UdpChecksum::Absent
            };
            assert_eq!(
                (udp.src_port, udp.dst_port, udp.checksum_status, udp.payload),
                (DEFAULT_PROBE_PORT, 40001, status, &reply[..])
            );
        }
    }
    Ok(())
}

/// ESP mode: without a socket on UDP 4500 (the agent is dead, or the
/// node's pinned datapath is back before its agent) the kernel would drop
/// every ESP packet an edge sends here, so the connector must not look
/// alive: probes go unanswered and are counted. Once the socket is held
/// again, they are answered. VXLAN mode needs no socket.
#[test]
fn an_esp_connector_answers_probes_only_while_its_esp_socket_is_held() -> Result<()> {
    let request = probe_payload(probe::REQUEST, 7, TOKEN);
    let reply = probe_payload(probe::REPLY, 7, TOKEN);
    let connector = Ipv4Addr::from(CONNECTOR_LAN);
    let frame = probe_frame(EDGE1_WAN, connector, DEFAULT_PROBE_PORT, &request, true);
    let expected = expected_reply(EDGE1_WAN, connector, &reply, true);
    let ns = Netns::new("ha-probe-ready")?;
    let dp = reflector("ha-probe-ready", tunnel_mode::ESP)?;
    ns.enter(|| {
        let (out, delta) = counted(&dp, || run_xdp(&dp, XDP_UPLINK, &frame, 1))?;
        assert_eq!(
            (out.action, delta),
            (XDP_DROP, only(Counter::DropProbeNotReady)),
            "XDP without the ESP socket"
        );
        let (out, delta) = counted(&dp, || dp.run(Program::UplinkIngress, &frame))?;
        assert_eq!(
            (out.action, delta),
            (TC_ACT_SHOT, only(Counter::DropProbeNotReady)),
            "TC without the ESP socket"
        );
        // Another port held is not the ESP socket.
        let _other = std::net::UdpSocket::bind("0.0.0.0:4501")?;
        let (out, _) = counted(&dp, || run_xdp(&dp, XDP_UPLINK, &frame, 1))?;
        assert_eq!(out.action, XDP_DROP, "XDP with only UDP 4501 held");
        let esp = std::net::UdpSocket::bind("0.0.0.0:4500")?;
        assert_answered(&dp, &frame, &expected, "with the ESP socket")?;
        // The agent dies: its socket closes, the answers stop.
        drop(esp);
        let (out, delta) = counted(&dp, || dp.run(Program::UplinkIngress, &frame))?;
        assert_eq!(
            (out.action, delta),
            (TC_ACT_SHOT, only(Counter::DropProbeNotReady)),
            "TC after the ESP socket closed"
        );
        Ok(())
    })?;
    // VXLAN mode in the same namespace, no socket: answered.
    let vxlan = reflector("ha-probe-ready-vxlan", tunnel_mode::VXLAN)?;
    ns.enter(|| assert_answered(&vxlan, &frame, &expected, "VXLAN mode, no socket"))?;
    Ok(())
}

/// ESP mode, an edge behind NAT: its probes and its ESP in UDP come from
/// the NAT's public address, not from its tunnel endpoint. Until the agent
/// indexes that address as the edge's (`Plan::esp_senders`, learnt from its
/// hellos) both die as a stranger's; then both are let in; when the NAT
/// moves on and the address is dropped from the index, they die again.
#[test]
fn an_esp_connector_answers_probes_and_takes_esp_from_where_an_edges_nat_shows_it() -> Result<()> {
    const NAT_PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 250);
    let request = probe_payload(probe::REQUEST, 9, TOKEN);
    let reply = probe_payload(probe::REPLY, 9, TOKEN);
    let connector = Ipv4Addr::from(CONNECTOR_LAN);
    let probe = probe_frame(NAT_PUBLIC, connector, DEFAULT_PROBE_PORT, &request, true);
    let expected = expected_reply(NAT_PUBLIC, connector, &reply, true);
    let esp = Frame::eth(xdp::EDGE1_NIC_MAC, UPLINK_MAC)
        .ipv4(NAT_PUBLIC, connector)
        .udp(20016, 4500)
        .zero_checksum()
        .payload(&[0, 0, 0x12, 0x34, 0, 0, 0, 1, 0xee, 0xee, 0xee, 0xee])
        .build();
    let ns = Netns::new("ha-probe-nat")?;
    let mut dp = reflector("ha-probe-nat", tunnel_mode::ESP)?;
    ns.enter(|| {
        let _esp_socket = UdpSocket::bind("0.0.0.0:4500")?;
        let stranger = |dp: &TestDatapath, when: &str| -> Result<()> {
            let (out, delta) = counted(dp, || run_xdp(dp, XDP_UPLINK, &probe, 1))?;
            assert_eq!(
                (out.action, delta),
                (XDP_DROP, only(Counter::DropProbeUnknownSource)),
                "a probe from the NAT {when}"
            );
            let (out, delta) = counted(dp, || run_xdp(dp, XDP_UPLINK, &esp, 1))?;
            assert_eq!(
                (out.action, delta),
                (XDP_DROP, only(Counter::XdpDropUnknownTunnelSource)),
                "ESP from the NAT {when}"
            );
            Ok(())
        };
        stranger(&dp, "before its address is the edge's")?;
        xdp::sync_peer_addrs_and_esp_senders(&mut dp, &BTreeMap::from([(NAT_PUBLIC, EDGE1_PEER)]))?;
        assert_answered(&dp, &probe, &expected, "a probe from the edge's NAT")?;
        let (out, delta) = counted(&dp, || run_xdp(&dp, XDP_UPLINK, &esp, 1))?;
        assert_eq!(
            (out.action, delta),
            (XDP_PASS, only(Counter::XdpPass)),
            "ESP from the edge's NAT"
        );
        assert_eq!(out.data, esp, "the guard never rewrites");
        xdp::sync_peer_addrs(&mut dp)?;
        stranger(&dp, "after the NAT moved on")
    })
}

#[test]
fn probes_from_strangers_die_and_everything_else_passes_untouched() -> Result<()> {
    let request = probe_payload(probe::REQUEST, 1, TOKEN);
    let connector = Ipv4Addr::from(CONNECTOR_LAN);
    let dp = reflector("ha-probe-strangers", tunnel_mode::VXLAN)?;
    // A forged source would make us reflect toward a victim.
    let stranger = probe_frame(UNKNOWN, connector, DEFAULT_PROBE_PORT, &request, true);
    let (out, delta) = counted(&dp, || run_xdp(&dp, XDP_UPLINK, &stranger, 1))?;
    assert_eq!(
        (out.action, delta),
        (XDP_DROP, only(Counter::DropProbeUnknownSource))
    );
    let (out, delta) = counted(&dp, || dp.run(Program::UplinkIngress, &stranger))?;
    assert_eq!(
        (out.action, delta),
        (TC_ACT_SHOT, only(Counter::DropProbeUnknownSource))
    );

    let mut bad_magic = request.clone();
    bad_magic[3] = b'2';
    let reply = probe_payload(probe::REPLY, 1, TOKEN);
    let passed = [
        (
            "wrong magic",
            probe_frame(EDGE1_WAN, connector, DEFAULT_PROBE_PORT, &bad_magic, true),
        ),
        (
            "a reply (no ping-pong between reflectors)",
            probe_frame(EDGE1_WAN, connector, DEFAULT_PROBE_PORT, &reply, true),
        ),
        (
            "another port",
            probe_frame(EDGE1_WAN, connector, DEFAULT_PROBE_PORT + 1, &request, true),
        ),
        (
            "to an address not ours",
            probe_frame(
                EDGE1_WAN,
                Ipv4Addr::new(10, 1, 0, 99),
                DEFAULT_PROBE_PORT,
                &request,
                true,
            ),
        ),
        (
            "a probe header cut short",
            probe_frame(
                EDGE1_WAN,
                connector,
                DEFAULT_PROBE_PORT,
                &request[..31],
                true,
            ),
        ),
        (
            "a wrong IPv4 header checksum",
            Frame::eth(xdp::EDGE1_NIC_MAC, UPLINK_MAC)
                .ipv4(EDGE1_WAN, connector)
                .header_checksum(0x1234)
                .udp(40001, DEFAULT_PROBE_PORT)
                .payload(&request)
                .build(),
        ),
    ];
    for (what, frame) in &passed {
        let (out, delta) = counted(&dp, || run_xdp(&dp, XDP_UPLINK, frame, 1))?;
        assert_eq!(
            (out.action, &out.data, delta.len()),
            (XDP_PASS, frame, 0),
            "XDP: {what}"
        );
        assert_untouched(&dp, Program::UplinkIngress, frame, &format!("TC: {what}"));
    }
    // An edge, or a connector with the reflector off, answers nothing.
    let frame = probe_frame(EDGE1_WAN, connector, DEFAULT_PROBE_PORT, &request, true);
    let mut config = dp.maps.config()?;
    let mut off = dp;
    for (what, change) in [
        ("reflector off", (role::CONNECTOR, 0)),
        ("an edge", (role::EDGE, DEFAULT_PROBE_PORT)),
    ] {
        (config.role, config.probe_port) = change;
        off.maps.set_config(config)?;
        let (out, delta) = counted(&off, || run_xdp(&off, XDP_UPLINK, &frame, 1))?;
        assert_eq!(
            (out.action, &out.data, delta.len()),
            (XDP_PASS, &frame, 0),
            "{what}"
        );
        let (out, _) = counted(&off, || off.run(Program::UplinkIngress, &frame))?;
        assert_eq!((out.action, &out.data), (TC_ACT_OK, &frame), "{what}");
    }
    Ok(())
}

/// A real UDP socket in a prober namespace sends a probe to a connector
/// namespace whose veth runs `fe_xdp_uplink` (native), then `fe_uplink_ingress`
/// (XDP off): the reply reaches the socket, so the kernel accepted its
/// addresses, ports and checksum.
#[test]
fn a_kernel_udp_socket_accepts_the_reflected_reply() -> Result<()> {
    let prober = Netns::new("ha-prober")?;
    let conn = Netns::new("ha-conn")?;
    veth_pair(&prober, "eth0", &conn, "eth0")?;
    let (prober_ip, conn_ip) = (Ipv4Addr::new(10, 77, 0, 2), Ipv4Addr::new(10, 77, 0, 1));
    prober.add_addr("eth0", "10.77.0.2/24")?;
    conn.add_addr("eth0", "10.77.0.1/24")?;
    // The prober's NIC runs XDP too, as an edge's does (unconfigured, it
    // passes everything): a veth wakes the receiver of what XDP_TX sends
    // only where an XDP program runs. Its NIC finishes checksums, as every
    // frame on a wire is finished.
    prober.run_ok("ethtool", &["-K", "eth0", "tx", "off"])?;
    let (socket, prober_xdp) = prober.enter(|| {
        let socket = UdpSocket::bind(SocketAddrV4::new(prober_ip, 0))?;
        socket.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut dp = TestDatapath::new("ha-probe-prober")?;
        dp.datapath
            .sync_xdp(&BTreeSet::from(["eth0".to_owned()]), XdpMode::Native)?;
        Ok((socket, dp))
    })?;
    let target = SocketAddrV4::new(conn_ip, DEFAULT_PROBE_PORT);
    let round_trip = |seq: u32| -> Result<()> {
        let request = probe_payload(probe::REQUEST, seq, TOKEN);
        socket.send_to(&request, target)?;
        let mut buf = [0u8; 256];
        let (len, from) = socket
            .recv_from(&mut buf)
            .with_context(|| format!("no reply to probe {seq} within 3 s"))?;
        ensure!(from == target.into(), "reply from {from}, not {target}");
        ensure!(
            buf[..len] == probe_payload(probe::REPLY, seq, TOKEN)[..],
            "reply {:?}",
            &buf[..len]
        );
        Ok(())
    };
    let moved = |dp: &TestDatapath| -> Vec<(&str, u64)> {
        dp.counters()
            .into_iter()
            .filter(|(_, v)| *v != 0)
            .map(|(c, v)| (c.name(), v))
            .collect()
    };
    conn.enter(|| {
        let mut dp = TestDatapath::new("ha-probe-conn")?;
        dp.maps.set_peer(1, tunnel_peer(prober_ip.octets()))?;
        sync_peer_addrs(&mut dp)?;
        dp.maps.set_config(fabedge_common::DatapathConfig {
            ready: 1,
            role: role::CONNECTOR,
            tunnel_mode: tunnel_mode::VXLAN,
            node_ip: conn_ip.octets(),
            underlay_ip: conn_ip.octets(),
            probe_port: DEFAULT_PROBE_PORT,
            ..Default::default()
        })?;
        dp.datapath
            .sync_xdp(&BTreeSet::from(["eth0".to_owned()]), XdpMode::Native)?;
        round_trip(1).with_context(|| format!("XDP; counters {:?}", moved(&dp)))?;
        assert_eq!(dp.counter(Counter::ProbeAnswered), 1, "answered in XDP");
        dp.datapath.sync_xdp(&BTreeSet::new(), XdpMode::Off)?;
        dp.datapath
            .attach(&Attachment::new(Program::UplinkIngress, "eth0"))?;
        round_trip(2).with_context(|| format!("TC; counters {:?}", moved(&dp)))?;
        // A checksum the prober's veth leaves unfinished (CHECKSUM_PARTIAL,
        // a local sender's): the helper leaves it for the receiver to trust.
        drop(prober_xdp);
        prober.run_ok("ethtool", &["-K", "eth0", "tx", "on"])?;
        round_trip(3)
            .with_context(|| format!("TC, partial checksum; counters {:?}", moved(&dp)))?;
        assert_eq!(dp.counter(Counter::ProbeAnswered), 3, "answered in TC");
        Ok(())
    })
}

// -- Flannel VXLAN to a shared VTEP address ------------------------------------

/// Flannel VXLAN from cloud-2 to `outer_dst` for `inner_dst`, whose inner
/// destination MAC is the VTEP MAC Flannel was told: after a failover,
/// another connector's.
fn flannel_to(outer_dst: Ipv4Addr, inner_dst: Ipv4Addr, ttl: u8, udp_checksum: bool) -> Vec<u8> {
    let inner = Frame::eth(CLOUD2_VTEP_MAC, OTHER_FLANNEL_MAC)
        .ipv4(CLOUD_POD, inner_dst)
        .ttl(ttl)
        .id(99)
        .udp(5353, 53)
        .payload(b"through the connector")
        .build();
    if udp_checksum {
        Frame::eth(CLOUD2_NIC_MAC, UPLINK_MAC)
            .ipv4(Ipv4Addr::from(CLOUD2_LAN), outer_dst)
            .udp(41234, DEFAULT_FLANNEL_PORT)
            .vxlan(DEFAULT_FLANNEL_VNI, &inner)
            .build()
    } else {
        vxlan_encap(
            Frame::eth(CLOUD2_NIC_MAC, UPLINK_MAC),
            Ipv4Addr::from(CLOUD2_LAN),
            outer_dst,
            41234,
            DEFAULT_FLANNEL_PORT,
            DEFAULT_FLANNEL_VNI,
            &inner,
        )
    }
}

#[test]
fn xdp_masquerades_flannel_vxlan_to_a_shared_vtep_address() -> Result<()> {
    let lab = FibLab::new("ha-vtep-xdp")?;
    lab.netns.enter(|| {
        let mut dp = xdp::connector("ha-vtep-xdp")?;
        let frame = flannel_to(VTEP_ADDR, LOCAL_POD, 63, false);
        // Not (yet) one of ours: declined, untouched.
        let (out, delta) = counted(&dp, || run_xdp(&dp, XDP_UPLINK, &frame, lab.lan_ifindex))?;
        assert_eq!(
            (out.action, &out.data, delta),
            (XDP_PASS, &frame, only(Counter::XdpPass))
        );
        dp.maps.set_vtep_addrs(&BTreeSet::from([VTEP_ADDR]))?;
        let (out, delta) = counted(&dp, || run_xdp(&dp, XDP_UPLINK, &frame, lab.lan_ifindex))?;
        assert_eq!(
            (out.action, delta),
            (XDP_REDIRECT, only(Counter::XdpFlannelToTunnel))
        );
        // The same frame to the node's own address is rewritten to the same bytes.
        let own = flannel_to(Ipv4Addr::from(CONNECTOR_LAN), LOCAL_POD, 63, false);
        let reference = run_xdp(&dp, XDP_UPLINK, &own, lab.lan_ifindex)?;
        assert_eq!(out.data, reference.data);
        let inner = parse_eth(&out.data)?.ipv4()?.udp()?.vxlan()?.inner.to_vec();
        assert_eq!(parse_eth(&inner)?.dst, TUNNEL_DEV_MAC);
        Ok(())
    })
}

#[test]
fn tc_takes_flannel_vxlan_to_a_shared_vtep_address_and_hands_the_kernel_frames_it_accepts()
-> Result<()> {
    let mut dp = xdp::connector("ha-vtep-tc")?;
    dp.maps.set_vtep_addrs(&BTreeSet::from([VTEP_ADDR]))?;
    // Decapsulated into the tunnel, as to the node's own address.
    let frame = flannel_to(VTEP_ADDR, LOCAL_POD, 63, false);
    let (out, delta) = counted(&dp, || dp.run(Program::UplinkIngress, &frame))?;
    assert_eq!(out.action, TC_ACT_REDIRECT);
    assert_eq!(delta.get(Counter::FlannelDecap.name()), Some(&1));
    assert_eq!(mark::tunnel_peer(out.mark), Some(EDGE1_PEER));
    let ip = parse_eth(&out.data)?.ipv4()?;
    assert_eq!((ip.src, ip.dst, ip.ttl), (CLOUD_POD, LOCAL_POD, 62));

    // Punted to the kernel (TTL): what is left is the outer Ethernet
    // header, addressed to the receiving NIC (PACKET_HOST), and the inner packet.
    let frame = flannel_to(VTEP_ADDR, LOCAL_POD, 1, false);
    let (out, delta) = counted(&dp, || dp.run(Program::UplinkIngress, &frame))?;
    assert_eq!(out.action, TC_ACT_OK);
    assert_eq!(delta.get(Counter::PuntTtl.name()), Some(&1));
    let eth = parse_eth(&out.data)?;
    assert_eq!(eth.dst, UPLINK_MAC);
    assert_eq!(eth.ipv4()?.dst, LOCAL_POD);

    // Left to flannel.1 (a GSO frame; a destination that is not an edge's):
    // the inner frame now names this connector's flannel.1, which would
    // otherwise drop it as PACKET_OTHERHOST. Nothing else changes, and a
    // UDP checksum stays right.
    let gso = SkbIn {
        gso_segs: 2,
        gso_size: 1400,
        ..SkbIn::default()
    };
    for (what, frame, skb) in [
        ("GSO", flannel_to(VTEP_ADDR, LOCAL_POD, 63, false), gso),
        (
            "GSO, UDP checksum",
            flannel_to(VTEP_ADDR, LOCAL_POD, 63, true),
            gso,
        ),
        (
            "a cloud pod",
            flannel_to(VTEP_ADDR, Ipv4Addr::new(10, 244, 0, 5), 63, true),
            SkbIn::default(),
        ),
    ] {
        let (out, delta) = counted(&dp, || dp.run_with(Program::UplinkIngress, &frame, skb))?;
        assert_eq!(
            (out.action, delta),
            (TC_ACT_OK, only(Counter::PassFlannel)),
            "{what}"
        );
        let udp = parse_eth(&out.data)?.ipv4()?.udp()?;
        assert_ne!(udp.checksum_status, UdpChecksum::Invalid, "{what}");
        let inner = parse_eth(udp.vxlan()?.inner)?;
        assert_eq!(inner.dst, FLANNEL_MAC, "{what}");
        let mut expected = frame.clone();
        let at = out.data.len() - udp.vxlan()?.inner.len();
        expected[at..at + 6].copy_from_slice(&FLANNEL_MAC);
        expected[40..42].copy_from_slice(&out.data[40..42]);
        assert_eq!(
            out.data, expected,
            "{what}: only the inner MAC (and checksum) changed"
        );
    }
    // To the node's own address the frame is Flannel's as sent.
    let own = flannel_to(
        Ipv4Addr::from(CONNECTOR_LAN),
        Ipv4Addr::new(10, 244, 0, 5),
        63,
        false,
    );
    let (out, _) = counted(&dp, || dp.run(Program::UplinkIngress, &own))?;
    assert_eq!((out.action, &out.data), (TC_ACT_OK, &own));
    // And peer kind checks stay: a VTEP address is no licence to skip the guard.
    let mut spoofed = flannel_to(VTEP_ADDR, LOCAL_POD, 63, false);
    spoofed[26..30].copy_from_slice(&[10, 1, 0, 77]);
    let spoofed = fix_ipv4_checksum(spoofed);
    let (out, delta) = counted(&dp, || dp.run(Program::UplinkIngress, &spoofed))?;
    assert_eq!(
        (out.action, delta),
        (TC_ACT_SHOT, only(Counter::DropSpoofed))
    );
    Ok(())
}

fn fix_ipv4_checksum(mut frame: Vec<u8>) -> Vec<u8> {
    frame[24..26].copy_from_slice(&[0, 0]);
    let check = fabedge_tests::packet::ipv4_header_checksum(&frame[14..34]);
    frame[24..26].copy_from_slice(&check.to_be_bytes());
    frame
}

/// The proof with a kernel `flannel.1` programmed as Flannel programs it:
/// cloud-2 sends Flannel VXLAN to the shared VTEP address with the inner
/// destination MAC of the connector that held it before (an ICMP echo to
/// this connector's `flannel.1` address, a frame `fe_uplink_ingress`
/// leaves to `flannel.1`). Without the uplink program `flannel.1` drops it
/// (`PACKET_OTHERHOST`); with it, the echo reply comes back through
/// Flannel's VXLAN.
#[test]
fn flannel_1_accepts_vxlan_to_a_shared_vtep_address_naming_another_connectors_mac() -> Result<()> {
    let cloud = Netns::new("ha-cloud2")?;
    let conn = Netns::new("ha-vtep-conn")?;
    veth_pair(&cloud, "eth0", &conn, "eth0")?;
    cloud.add_addr("eth0", "10.1.0.2/24")?;
    conn.add_addr("eth0", "10.1.0.1/24")?;
    conn.add_addr("eth0", &format!("{VTEP_ADDR}/32"))?;
    let flannel_mac = fabedge_tests::packet::format_mac(&FLANNEL_MAC);
    let cloud2_vtep_mac = fabedge_tests::packet::format_mac(&CLOUD2_VTEP_MAC);
    for args in [
        &[
            "link",
            "add",
            "flannel.1",
            "type",
            "vxlan",
            "id",
            "1",
            "local",
            "10.1.0.1",
            "dev",
            "eth0",
            "dstport",
            "8472",
            "nolearning",
        ][..],
        &["link", "set", "flannel.1", "address", &flannel_mac, "up"],
        &["addr", "add", "10.244.0.0/32", "dev", "flannel.1"],
        // cloud-2's pods, the way Flannel routes them.
        &[
            "neigh",
            "replace",
            "10.244.1.0",
            "lladdr",
            &cloud2_vtep_mac,
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ],
        &[
            "route",
            "replace",
            "10.244.1.0/24",
            "via",
            "10.244.1.0",
            "dev",
            "flannel.1",
            "onlink",
        ],
    ] {
        conn.ip(args)?;
    }
    conn.run_ok(
        "bridge",
        &[
            "fdb",
            "append",
            &cloud2_vtep_mac,
            "dev",
            "flannel.1",
            "dst",
            "10.1.0.2",
        ],
    )?;
    let conn_mac = conn.mac("eth0")?;
    let cloud_mac = cloud.mac("eth0")?;
    let wire = PacketSocket::open(&cloud, "eth0")?;
    let echo = |seq: u16, vtep_mac: Mac| {
        let inner = Frame::eth(CLOUD2_VTEP_MAC, vtep_mac)
            .ipv4(CLOUD_POD, Ipv4Addr::new(10, 244, 0, 0))
            .icmp_echo_request(77, seq)
            .build();
        vxlan_encap(
            Frame::eth(cloud_mac, conn_mac),
            Ipv4Addr::from(CLOUD2_LAN),
            VTEP_ADDR,
            41234,
            DEFAULT_FLANNEL_PORT,
            DEFAULT_FLANNEL_VNI,
            &inner,
        )
    };
    let is_reply = |seq: u16| {
        move |frame: &[u8]| -> bool {
            let reply = || -> Result<bool> {
                let udp = parse_eth(frame)?.ipv4()?.udp()?;
                let inner = parse_eth(udp.vxlan()?.inner)?.ipv4()?;
                let icmp = inner.icmp()?;
                Ok(udp.dst_port == DEFAULT_FLANNEL_PORT
                    && inner.dst == CLOUD_POD
                    && icmp.icmp_type == 0
                    && icmp.echo_seq() == Some(seq))
            };
            reply().unwrap_or(false)
        }
    };
    // Without fabedge: flannel.1 answers what names its own MAC...
    wire.send(&echo(1, FLANNEL_MAC))?;
    ensure!(
        wire.recv_matching(Duration::from_secs(3), is_reply(1))?
            .is_some(),
        "flannel.1 does not answer on the shared VTEP address at all"
    );
    // ...and drops what names another's.
    wire.send(&echo(2, OTHER_FLANNEL_MAC))?;
    ensure!(
        wire.recv_matching(Duration::from_secs(1), is_reply(2))?
            .is_none(),
        "flannel.1 answered a frame for another MAC: this test proves nothing"
    );
    conn.enter(|| {
        let mut dp = TestDatapath::new("ha-vtep-flannel1")?;
        dp.maps.set_peer(
            VTEP_PEER,
            PeerEntry {
                kind: fabedge_common::peer_kind::FLANNEL_VTEP,
                underlay_ip: CLOUD2_LAN,
                vtep_mac: CLOUD2_VTEP_MAC,
                ..PeerEntry::default()
            },
        )?;
        dp.maps.set_route(
            net("10.244.1.0/24"),
            RouteEntry {
                kind: route_kind::CLOUD_VTEP,
                flags: 0,
                peer_id: VTEP_PEER,
            },
        )?;
        sync_peer_addrs(&mut dp)?;
        dp.maps.set_vtep_addrs(&BTreeSet::from([VTEP_ADDR]))?;
        dp.maps.set_config(fabedge_common::DatapathConfig {
            ready: 1,
            role: role::CONNECTOR,
            tunnel_mode: tunnel_mode::VXLAN,
            node_ip: CONNECTOR_LAN,
            underlay_ip: CONNECTOR_LAN,
            flannel_vni: DEFAULT_FLANNEL_VNI,
            flannel_port: DEFAULT_FLANNEL_PORT,
            flannel_mac: FLANNEL_MAC,
            ..Default::default()
        })?;
        dp.datapath
            .attach(&Attachment::new(Program::UplinkIngress, "eth0"))?;
        wire.send(&echo(3, OTHER_FLANNEL_MAC))?;
        let reply = wire.recv_matching(Duration::from_secs(3), is_reply(3))?;
        ensure!(
            reply.is_some(),
            "no echo reply through flannel.1 within 3 s; counters {:?}",
            dp.counters()
                .into_iter()
                .filter(|(_, v)| *v != 0)
                .map(|(c, v)| (c.name(), v))
                .collect::<Vec<_>>()
        );
        assert_eq!(dp.counter(Counter::PassFlannel), 1);
        Ok(())
    })
}
