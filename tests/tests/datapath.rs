//! Every forwarding decision of the kernel programs, proven with
//! BPF_PROG_TEST_RUN: crafted frame in; verdict, exact bytes, skb mark and
//! counters out. Needs root.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::Result;
use fabedge_agent::datapath::Program;
use fabedge_common::{Counter, TUNNEL_DEV_MAC, TUNNEL_SRC_MAC, mark, route_kind, tunnel_mode};
use fabedge_tests::{
    datapath::{
        SkbIn, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TestDatapath, counted, fixtures::*, only,
    },
    packet::{self, Frame, TcpFlags, UdpChecksum, parse_eth, vxlan_encap},
};

fn pod_udp(dst: Ipv4Addr, ttl: u8) -> Vec<u8> {
    Frame::eth(POD_MAC, BRIDGE_MAC)
        .ipv4(LOCAL_POD, dst)
        .ttl(ttl)
        .id(7)
        .udp(40000, 53)
        .payload(b"fabedge?")
        .build()
}

fn both(first: Counter, second: Counter) -> BTreeMap<&'static str, u64> {
    BTreeMap::from([(first.name(), 1), (second.name(), 1)])
}

/// The IPv4 packet of a frame, its TTL and header checksum validity.
fn ip_of(frame: &[u8]) -> packet::Ipv4Packet<'_> {
    parse_eth(frame)
        .and_then(|e| e.ipv4())
        .expect("an IPv4 frame")
}

#[test]
fn pod_to_local_pod_is_left_to_the_kernel_untouched() -> Result<()> {
    let dp = edge("dp-local", tunnel_mode::VXLAN)?;
    let frame = pod_udp(LOCAL_POD_2, 64);
    let (out, delta) = counted(&dp, || dp.run(Program::FromPod, &frame))?;
    assert_eq!(out.action, TC_ACT_OK);
    assert_eq!(out.data, frame, "local delivery must not change a byte");
    assert_eq!(out.mark, 0);
    assert_eq!(delta, only(Counter::PassLocal));
    // The node's own address (hostNetwork endpoints) likewise.
    let (out, delta) = counted(&dp, || dp.run(Program::FromPod, &pod_udp(NODE_IP, 64)))?;
    assert_eq!((out.action, delta), (TC_ACT_OK, only(Counter::PassLocal)));
    Ok(())
}

#[test]
fn pod_to_community_peer_is_redirected_into_the_tunnel_with_ttl_decremented() -> Result<()> {
    let dp = edge("dp-peer", tunnel_mode::VXLAN)?;
    let frame = pod_udp(PEER_POD, 64);
    let (out, delta) = counted(&dp, || dp.run(Program::FromPod, &frame))?;
    assert_eq!(out.action, TC_ACT_REDIRECT);
    assert_eq!(out.mark, mark::to_tunnel(0, EDGE2_PEER));
    assert_eq!(delta, only(Counter::RedirectToTunnel));
    let ip = ip_of(&out.data);
    assert_eq!(ip.ttl, 63);
    assert!(
        ip.checksum_valid,
        "IPv4 header checksum after TTL decrement"
    );
    // Nothing but TTL and header checksum changed.
    let mut expected = frame.clone();
    expected[14 + 8] = 63;
    expected[14 + 10..14 + 12].copy_from_slice(&out.data[14 + 10..14 + 12]);
    assert_eq!(out.data, expected);
    Ok(())
}

#[test]
fn pod_to_cloud_goes_to_the_connector_peer() -> Result<()> {
    let dp = edge("dp-conn", tunnel_mode::VXLAN)?;
    let (out, delta) = counted(&dp, || dp.run(Program::FromPod, &pod_udp(CLOUD_POD, 64)))?;
    assert_eq!(out.action, TC_ACT_REDIRECT);
    assert_eq!(mark::tunnel_peer(out.mark), Some(CONNECTOR_PEER));
    assert_eq!(delta, only(Counter::RedirectToTunnel));
    Ok(())
}

#[test]
fn foreign_mark_bits_survive_our_mark() -> Result<()> {
    let dp = edge("dp-markbits", tunnel_mode::VXLAN)?;
    // kube-proxy's masquerade bit must stay set.
    let out = dp.run_with(
        Program::FromPod,
        &pod_udp(PEER_POD, 64),
        SkbIn {
            mark: 0x4000,
            ..SkbIn::default()
        },
    )?;
    assert_eq!(out.mark, 0x4000 | mark::to_tunnel(0, EDGE2_PEER));
    Ok(())
}

#[test]
fn expiring_ttl_is_handed_to_the_kernel_for_time_exceeded() -> Result<()> {
    let dp = edge("dp-ttl", tunnel_mode::VXLAN)?;
    let frame = pod_udp(PEER_POD, 1);
    let (out, delta) = counted(&dp, || dp.run(Program::FromPod, &frame))?;
    assert_eq!(
        out.action, TC_ACT_OK,
        "the kernel must see it to answer ICMP time-exceeded"
    );
    assert_eq!(out.data, frame, "TTL left for the kernel to judge");
    assert_eq!(delta, only(Counter::PuntTtl));
    Ok(())
}

#[test]
fn packets_too_big_for_the_tunnel_are_handed_to_the_kernel() -> Result<()> {
    let dp = edge("dp-mtu", tunnel_mode::VXLAN)?;
    let big = Frame::eth(POD_MAC, BRIDGE_MAC)
        .ipv4(LOCAL_POD, PEER_POD)
        .dont_fragment(true)
        .udp(1, 2)
        .payload(&[0u8; 1450])
        .build();
    let (out, delta) = counted(&dp, || dp.run(Program::FromPod, &big))?;
    assert_eq!(
        out.action, TC_ACT_OK,
        "the kernel answers fragmentation-needed for DF"
    );
    assert_eq!(out.data, big);
    assert_eq!(delta, only(Counter::PuntMtu));

    // A GSO super-packet whose segments fit takes the fast path; one whose
    // segments do not, does not.
    // (Test-run frames must fit a page, hence two segments.)
    let gso = Frame::eth(POD_MAC, BRIDGE_MAC)
        .ipv4(LOCAL_POD, PEER_POD)
        .tcp(1, 2)
        .flags(TcpFlags::ACK)
        .payload(&[0u8; 2720])
        .build();
    let fits = SkbIn {
        gso_segs: 2,
        gso_size: 1360,
        ..SkbIn::default()
    };
    assert_eq!(
        dp.run_with(Program::FromPod, &gso, fits)?.action,
        TC_ACT_REDIRECT
    );
    // Full-size segments: 1410 payload + 20 IP + 20 TCP = 1450, exactly the tunnel MTU.
    let full = SkbIn {
        gso_segs: 2,
        gso_size: 1410,
        ..SkbIn::default()
    };
    assert_eq!(
        dp.run_with(Program::FromPod, &gso, full)?.action,
        TC_ACT_REDIRECT
    );
    let too_big = SkbIn {
        gso_segs: 2,
        gso_size: 1411,
        ..SkbIn::default()
    };
    assert_eq!(
        dp.run_with(Program::FromPod, &gso, too_big)?.action,
        TC_ACT_OK
    );
    Ok(())
}

#[test]
fn unknown_destination_is_dropped_and_counted() -> Result<()> {
    let dp = edge("dp-noroute", tunnel_mode::VXLAN)?;
    let (out, delta) = counted(&dp, || dp.run(Program::FromPod, &pod_udp(UNKNOWN, 64)))?;
    assert_eq!(out.action, TC_ACT_SHOT);
    assert_eq!(delta, only(Counter::DropNoRoute));
    Ok(())
}

#[test]
fn route_to_a_missing_peer_is_dropped_and_counted() -> Result<()> {
    let dp = edge("dp-orphan", tunnel_mode::VXLAN)?;
    let (out, delta) = counted(&dp, || dp.run(Program::FromPod, &pod_udp(ORPHAN, 64)))?;
    assert_eq!(out.action, TC_ACT_SHOT);
    assert_eq!(delta, only(Counter::DropUnknownPeer));
    Ok(())
}

#[test]
fn malformed_and_truncated_headers_are_dropped_and_counted() -> Result<()> {
    let dp = edge("dp-malformed", tunnel_mode::VXLAN)?;
    let frame = pod_udp(PEER_POD, 64);
    // (A frame cut inside its IPv4 header is refused by BPF_PROG_TEST_RUN
    // itself on current kernels; the uplink test below cuts an inner header.)
    for (what, bad) in [
        ("IHL below 5", packet::with_ipv4_ihl(&frame, 4)?),
        (
            "total length below the header",
            packet::with_ipv4_total_length(&frame, 12)?,
        ),
    ] {
        let (out, delta) = counted(&dp, || dp.run(Program::FromPod, &bad))?;
        assert_eq!(out.action, TC_ACT_SHOT, "{what}");
        assert_eq!(delta, only(Counter::DropMalformed), "{what}");
    }
    // Non-IPv4 (ARP) is not ours to judge.
    let arp = Frame::eth(POD_MAC, [0xff; 6])
        .ethertype(0x0806)
        .payload(&[0u8; 28])
        .build();
    let (out, delta) = counted(&dp, || dp.run(Program::FromPod, &arp))?;
    assert_eq!((out.action, delta), (TC_ACT_OK, only(Counter::PassNonIpv4)));
    Ok(())
}

#[test]
fn unconfigured_datapath_passes_everything() -> Result<()> {
    let dp = TestDatapath::new("dp-unconfigured")?;
    let (out, delta) = counted(&dp, || dp.run(Program::FromPod, &pod_udp(UNKNOWN, 64)))?;
    assert_eq!(
        (out.action, delta),
        (TC_ACT_OK, only(Counter::NotConfigured))
    );
    Ok(())
}

#[test]
fn esp_mode_marks_for_xfrm_and_leaves_forwarding_to_the_kernel() -> Result<()> {
    let dp = edge("dp-esp", tunnel_mode::ESP)?;
    let frame = pod_udp(PEER_POD, 64);
    let (out, delta) = counted(&dp, || dp.run(Program::FromPod, &frame))?;
    assert_eq!(out.action, TC_ACT_OK);
    assert_eq!(
        out.data, frame,
        "the kernel decrements TTL on its forward path"
    );
    assert_eq!(out.mark, mark::to_tunnel(0, EDGE2_PEER));
    // The kernel routes it into fe-tunnel, whose egress program counts it for the peer.
    assert_eq!(delta, only(Counter::PassKernel));
    assert_eq!(dp.maps.peer_stats(EDGE2_PEER)?.tx_packets, 0);
    Ok(())
}

#[test]
fn without_the_fast_path_vxlan_traffic_is_marked_for_the_kernel_and_still_encapsulated()
-> Result<()> {
    let mut dp = edge("dp-no-fast-path", tunnel_mode::VXLAN)?;
    let mut config = dp.maps.config()?;
    config.flags = fabedge_common::config_flags::NO_FAST_PATH;
    dp.maps.set_config(config)?;
    let frame = pod_udp(PEER_POD, 64);
    let (out, delta) = counted(&dp, || dp.run(Program::FromPod, &frame))?;
    assert_eq!((out.action, delta), (TC_ACT_OK, only(Counter::PassKernel)));
    assert_eq!(
        out.data, frame,
        "the kernel forwards it (and decrements TTL)"
    );
    assert_eq!(out.mark, mark::to_tunnel(0, EDGE2_PEER));
    // Routed into fe-tunnel, the egress program encapsulates toward the peer.
    let routed = SkbIn {
        mark: out.mark,
        ..SkbIn::default()
    };
    let (out, delta) = counted(&dp, || dp.run_with(Program::TunnelEgress, &frame, routed))?;
    assert_eq!((out.action, delta), (TC_ACT_OK, only(Counter::ToTunnel)));
    assert_eq!(dp.maps.peer_stats(EDGE2_PEER)?.tx_packets, 1);
    Ok(())
}

#[test]
fn esp_tunnel_egress_keeps_the_peer_mark_for_xfrm_and_counts_the_peer() -> Result<()> {
    let dp = edge("dp-esp-egress", tunnel_mode::ESP)?;
    let frame = pod_udp(PEER_POD, 63);
    let marked = SkbIn {
        mark: 0x4000 | mark::to_tunnel(0, EDGE2_PEER),
        ..SkbIn::default()
    };
    let (out, delta) = counted(&dp, || dp.run_with(Program::TunnelEgress, &frame, marked))?;
    assert_eq!((out.action, delta), (TC_ACT_OK, only(Counter::ToTunnel)));
    assert_eq!(
        out.mark,
        0x4000 | mark::to_tunnel(0, EDGE2_PEER),
        "xfrm's policy for the peer matches this mark"
    );
    assert_eq!(
        out.data, frame,
        "no tunnel key, no MAC rewrite: xfrm encapsulates"
    );
    assert_eq!(dp.maps.peer_stats(EDGE2_PEER)?.tx_packets, 1);
    Ok(())
}

#[test]
fn esp_tunnel_ingress_accepts_only_sources_of_the_peer_whose_sa_decrypted() -> Result<()> {
    let dp = edge("dp-esp-ingress", tunnel_mode::ESP)?;
    // xfrm rebuilds an Ethernet header in front of what it decrypted.
    let frame = Frame::eth(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC)
        .ipv4(PEER_POD, LOCAL_POD)
        .udp(1, 2)
        .build();
    let from_edge2 = SkbIn {
        mark: mark::from_tunnel(0, EDGE2_PEER),
        ..SkbIn::default()
    };
    let (out, delta) = counted(&dp, || {
        dp.run_with(Program::TunnelIngress, &frame, from_edge2)
    })?;
    assert_eq!((out.action, delta), (TC_ACT_OK, only(Counter::FromTunnel)));
    assert_eq!(dp.maps.peer_stats(EDGE2_PEER)?.rx_packets, 1);
    // Another peer's SA cannot speak for edge-2's pods; nor can anything not decrypted by ours.
    for skb in [
        SkbIn {
            mark: mark::from_tunnel(0, EDGE2_PEER + 1),
            ..SkbIn::default()
        },
        SkbIn::default(),
    ] {
        let (out, delta) = counted(&dp, || dp.run_with(Program::TunnelIngress, &frame, skb))?;
        assert_eq!(
            (out.action, delta),
            (TC_ACT_SHOT, only(Counter::DropSpoofed))
        );
    }
    Ok(())
}

#[test]
fn tunnel_egress_addresses_frames_for_the_receiving_device() -> Result<()> {
    let dp = edge("dp-egress", tunnel_mode::VXLAN)?;
    let frame = pod_udp(PEER_POD, 63);
    let marked = SkbIn {
        mark: 0x4000 | mark::to_tunnel(0, EDGE2_PEER),
        ..SkbIn::default()
    };
    let (out, delta) = counted(&dp, || dp.run_with(Program::TunnelEgress, &frame, marked))?;
    assert_eq!(out.action, TC_ACT_OK);
    assert_eq!(delta, only(Counter::ToTunnel));
    let eth = parse_eth(&out.data)?;
    assert_eq!((eth.dst, eth.src), (TUNNEL_DEV_MAC, TUNNEL_SRC_MAC));
    assert_eq!(
        &out.data[12..],
        &frame[12..],
        "only the inner MAC addresses change"
    );
    assert_eq!(out.mark, 0x4000, "our mark bits are cleared, others kept");
    assert_eq!(dp.maps.peer_stats(EDGE2_PEER)?.tx_packets, 1);

    // The node's own (unmarked) traffic is routed by destination.
    let host = Frame::eth([0; 6], [0; 6])
        .ipv4(NODE_IP, Ipv4Addr::new(10, 244, 9, 9))
        .udp(1, 2)
        .build();
    let (out, delta) = counted(&dp, || dp.run(Program::TunnelEgress, &host))?;
    assert_eq!((out.action, delta), (TC_ACT_OK, only(Counter::ToTunnel)));
    assert_eq!(dp.maps.peer_stats(CONNECTOR_PEER)?.tx_packets, 1);
    // ...and never sent to an undefined remote.
    let nowhere = Frame::eth([0; 6], [0; 6])
        .ipv4(NODE_IP, UNKNOWN)
        .udp(1, 2)
        .build();
    let (out, delta) = counted(&dp, || dp.run(Program::TunnelEgress, &nowhere))?;
    assert_eq!(
        (out.action, delta),
        (TC_ACT_SHOT, only(Counter::DropNoRoute))
    );
    Ok(())
}

#[test]
fn tunnel_ingress_refuses_packets_without_tunnel_metadata() -> Result<()> {
    let dp = edge("dp-ingress", tunnel_mode::VXLAN)?;
    let frame = Frame::eth(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC)
        .ipv4(PEER_POD, LOCAL_POD)
        .udp(1, 2)
        .build();
    let (out, delta) = counted(&dp, || dp.run(Program::TunnelIngress, &frame))?;
    assert_eq!(
        (out.action, delta),
        (TC_ACT_SHOT, only(Counter::DropSpoofed))
    );
    Ok(())
}

/// Flannel VXLAN from cloud-2 to the connector, carrying `inner`.
fn flannel_frame(inner_dst: Ipv4Addr, vni: u32, port: u16) -> (Vec<u8>, Vec<u8>) {
    let inner = Frame::eth(CLOUD2_VTEP_MAC, FLANNEL_MAC)
        .ipv4(CLOUD_POD, inner_dst)
        .ttl(63)
        .id(99)
        .udp(5353, 53)
        .payload(b"from the cloud")
        .build();
    let outer = vxlan_encap(
        Frame::eth(CLOUD2_NIC_MAC, UPLINK_MAC),
        Ipv4Addr::from(CLOUD2_LAN),
        Ipv4Addr::from(CONNECTOR_LAN),
        41234,
        port,
        vni,
        &inner,
    );
    (outer, inner)
}

#[test]
fn connector_decapsulates_flannel_vxlan_for_edge_pods_into_the_tunnel() -> Result<()> {
    let mut dp = connector("dp-decap")?;
    // The peer address index, as apply writes it: the sender's VTEP is found there.
    fabedge_tests::xdp::sync_peer_addrs(&mut dp)?;
    let (frame, inner) = flannel_frame(LOCAL_POD, 1, 8472);
    let (out, delta) = counted(&dp, || dp.run(Program::UplinkIngress, &frame))?;
    assert_eq!(out.action, TC_ACT_REDIRECT);
    assert_eq!(
        delta,
        both(Counter::FlannelDecap, Counter::RedirectToTunnel)
    );
    assert_eq!(mark::tunnel_peer(out.mark), Some(EDGE1_PEER));
    // Received from cloud-2's VTEP (the inner frame, as TX counts it).
    let vtep = dp.maps.peer_stats(VTEP_PEER)?;
    assert_eq!(
        (vtep.rx_packets, vtep.rx_bytes, vtep.tx_packets),
        (1, inner.len() as u64, 0),
        "RX of the VTEP the frame came from"
    );
    // Outer Ethernet kept, then exactly the inner IP packet with TTL - 1.
    assert_eq!(&out.data[..14], &frame[..14]);
    let mut expected_ip = inner[14..].to_vec();
    expected_ip[8] -= 1;
    let got = ip_of(&out.data);
    assert!(got.checksum_valid);
    expected_ip[10..12].copy_from_slice(&out.data[14 + 10..14 + 12]);
    assert_eq!(&out.data[14..], &expected_ip[..]);
    Ok(())
}

#[test]
fn connector_leaves_other_flannel_traffic_to_flannel() -> Result<()> {
    let mut dp = connector("dp-flannel-pass")?;
    fabedge_tests::xdp::sync_peer_addrs(&mut dp)?;
    // Cloud pod to cloud pod (c4): not ours.
    let (frame, _) = flannel_frame(Ipv4Addr::new(10, 244, 0, 5), 1, 8472);
    let (out, delta) = counted(&dp, || dp.run(Program::UplinkIngress, &frame))?;
    assert_eq!(
        (out.action, &out.data, delta),
        (TC_ACT_OK, &frame, only(Counter::PassFlannel))
    );
    // A GRO-merged (GSO) frame for an edge pod is left to flannel.1: eBPF
    // decapsulation would keep its tunnel GSO state and mis-segment it.
    let (frame, _) = flannel_frame(LOCAL_POD, 1, 8472);
    let gso = SkbIn {
        gso_segs: 2,
        gso_size: 1400,
        ..SkbIn::default()
    };
    let (out, delta) = counted(&dp, || dp.run_with(Program::UplinkIngress, &frame, gso))?;
    assert_eq!(
        (out.action, &out.data, delta),
        (TC_ACT_OK, &frame, only(Counter::PassFlannel))
    );
    // Another VNI or port is not Flannel's: untouched and uncounted.
    for (vni, port) in [(2, 8472), (1, 4789)] {
        let (frame, _) = flannel_frame(LOCAL_POD, vni, port);
        let (out, delta) = counted(&dp, || dp.run(Program::UplinkIngress, &frame))?;
        assert_eq!(
            (out.action, &out.data, delta.len()),
            (TC_ACT_OK, &frame, 0),
            "vni {vni} port {port}"
        );
    }
    // What flannel.1 receives is Flannel's to count, not the VTEP's RX of ours.
    assert_eq!(dp.maps.peer_stats(VTEP_PEER)?.rx_packets, 0);
    Ok(())
}

#[test]
fn connector_drops_truncated_flannel_frames() -> Result<()> {
    let dp = connector("dp-flannel-trunc")?;
    let (frame, _) = flannel_frame(LOCAL_POD, 1, 8472);
    // Cut inside the inner IPv4 header.
    let cut = packet::truncated(&frame, 14 + 20 + 8 + 8 + 14 + 10);
    let (out, delta) = counted(&dp, || dp.run(Program::UplinkIngress, &cut))?;
    assert_eq!(
        (out.action, delta),
        (TC_ACT_SHOT, only(Counter::DropMalformed))
    );
    Ok(())
}

#[test]
fn connector_sends_plain_packets_for_edge_node_ips_into_the_tunnel() -> Result<()> {
    let dp = connector("dp-uplink-plain")?;
    let frame = Frame::eth(CLOUD2_NIC_MAC, UPLINK_MAC)
        .ipv4(Ipv4Addr::from(CLOUD2_LAN), NODE_IP)
        .icmp_echo_request(1, 1)
        .build();
    let (out, delta) = counted(&dp, || dp.run(Program::UplinkIngress, &frame))?;
    assert_eq!(
        (out.action, delta),
        (TC_ACT_REDIRECT, only(Counter::RedirectToTunnel))
    );
    assert_eq!(mark::tunnel_peer(out.mark), Some(EDGE1_PEER));
    // Traffic for the connector itself is not ours.
    let own = Frame::eth(CLOUD2_NIC_MAC, UPLINK_MAC)
        .ipv4(Ipv4Addr::from(CLOUD2_LAN), Ipv4Addr::from(CONNECTOR_LAN))
        .udp(1, 2)
        .build();
    let (out, delta) = counted(&dp, || dp.run(Program::UplinkIngress, &own))?;
    assert_eq!((out.action, &out.data, delta.len()), (TC_ACT_OK, &own, 0));
    Ok(())
}

#[test]
fn flannel_encap_toward_a_cloud_vtep_has_exact_outer_headers() -> Result<()> {
    // Tunnel ingress needs tunnel metadata BPF_PROG_TEST_RUN cannot give; the
    // same shared `forward` runs in fe_from_pod, so it drives the encap here,
    // from a pod of the connector's own (fe_from_pod checks the source).
    let mut dp = connector("dp-encap")?;
    let connector_pod = Ipv4Addr::new(10, 244, 0, 5);
    dp.maps
        .set_route(net("10.244.0.0/24"), route(route_kind::LOCAL_POD, 0))?;
    let frame = Frame::eth(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC)
        .ipv4(connector_pod, CLOUD_POD)
        .ttl(64)
        .id(5)
        .udp(40000, 8080)
        .payload(b"to the cloud")
        .build();
    let (out, delta) = counted(&dp, || dp.run(Program::FromPod, &frame))?;
    assert_eq!(out.action, TC_ACT_REDIRECT, "redirect_neigh to the uplink");
    assert_eq!(delta, only(Counter::FlannelEncap));
    assert_eq!(
        dp.maps.peer_stats(VTEP_PEER)?.tx_packets,
        1,
        "per-peer stats of the VTEP"
    );

    let eth = parse_eth(&out.data)?;
    assert_eq!(
        eth.ethertype, 0x0800,
        "outer MACs come from the neighbour table at redirect"
    );
    let outer = eth.ipv4()?;
    assert!(outer.checksum_valid, "outer IPv4 checksum");
    assert_eq!(
        (outer.src.octets(), outer.dst.octets()),
        (CONNECTOR_LAN, CLOUD2_LAN)
    );
    assert_eq!((outer.ttl, outer.protocol, outer.header_len), (64, 17, 20));
    assert_eq!(outer.total_length as usize, out.data.len() - 14);
    let udp = outer.udp()?;
    assert_eq!(udp.dst_port, 8472);
    assert!(
        (32768..61000).contains(&udp.src_port),
        "source port {} from the flow hash",
        udp.src_port
    );
    assert_eq!(
        udp.checksum_status,
        UdpChecksum::Absent,
        "zero, as Flannel's kernel VXLAN sends"
    );
    assert_eq!(udp.length as usize, out.data.len() - 14 - 20);
    let vxlan = udp.vxlan()?;
    assert_eq!((vxlan.flags, vxlan.vni), (0x08, 1));
    let inner = parse_eth(vxlan.inner)?;
    assert_eq!(
        (inner.dst, inner.src, inner.ethertype),
        (CLOUD2_VTEP_MAC, FLANNEL_MAC, 0x0800)
    );
    let mut expected_ip = frame[14..].to_vec();
    expected_ip[8] = 63;
    let inner_ip = inner.ipv4()?;
    assert!(inner_ip.checksum_valid);
    expected_ip[10..12].copy_from_slice(&vxlan.inner[14 + 10..14 + 12]);
    assert_eq!(
        &vxlan.inner[14..],
        &expected_ip[..],
        "inner packet intact but for TTL"
    );

    // A packet that would not fit Flannel's MTU is left to the kernel (flannel.1).
    let big = Frame::eth(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC)
        .ipv4(connector_pod, CLOUD_POD)
        .udp(1, 2)
        .payload(&[0u8; 1440])
        .build();
    let (out, delta) = counted(&dp, || dp.run(Program::FromPod, &big))?;
    assert_eq!(
        (out.action, &out.data, delta),
        (TC_ACT_OK, &big, only(Counter::PuntMtu))
    );
    Ok(())
}
