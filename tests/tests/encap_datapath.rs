//! The plaintext tunnel's encapsulation in the forwarding program
//! (`config_flags::TC_ENCAP`, `fabedge-ebpf/src/encap.rs`), proven with
//! BPF_PROG_TEST_RUN inside a small namespace whose routes and neighbours
//! `bpf_fib_lookup` consults: the exact bytes on the wire, and every case it
//! declines going into `fe-tunnel` exactly as without it. Needs root.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::Result;
use fabedge_agent::datapath::Program;
use fabedge_common::{
    Counter, DEFAULT_TUNNEL_PORT, DEFAULT_TUNNEL_VNI, TUNNEL_DEV_MAC, TUNNEL_SRC_MAC, config_flags,
    mark, tunnel_mode,
};
use fabedge_tests::{
    datapath::{SkbIn, TC_ACT_OK, TC_ACT_REDIRECT, counted, fixtures::*, only},
    encap::{EDGE1_WAN, EDGE1_WAN_MAC, EDGE2_NIC_MAC, EDGE2_WAN, EdgeLab, edge_with_encap},
    packet::{Frame, UdpChecksum, ipv4_header_checksum, parse_eth},
};

fn pod_udp(dst: Ipv4Addr, src_port: u16) -> Vec<u8> {
    Frame::eth(POD_MAC, BRIDGE_MAC)
        .ipv4(LOCAL_POD, dst)
        .ttl(64)
        .id(0x1234)
        .tos(0x03)
        .udp(src_port, 53)
        .payload(b"edge to edge")
        .build()
}

fn counters(names: &[Counter]) -> BTreeMap<&'static str, u64> {
    names.iter().map(|c| (c.name(), 1)).collect()
}

/// The frame as the fast path hands it to `fe-tunnel`: TTL decremented.
fn decremented(frame: &[u8]) -> Vec<u8> {
    let ip = parse_eth(frame).unwrap().ipv4().unwrap();
    let mut out = frame.to_vec();
    out[14 + 8] = ip.ttl - 1;
    let check = ipv4_header_checksum(&out[14..34]);
    out[14 + 10..14 + 12].copy_from_slice(&check.to_be_bytes());
    out
}

#[test]
fn pod_to_community_peer_leaves_encapsulated_for_the_uplink_with_exact_headers() -> Result<()> {
    let lab = EdgeLab::new("fe-encap-exact")?;
    lab.netns.enter(|| {
        let dp = edge_with_encap("encap-exact")?;
        let frame = pod_udp(PEER_POD, 40000);
        // Foreign mark bits (kube-proxy's) ride along; ours are consumed.
        let skb = SkbIn {
            mark: 0x4000,
            ..SkbIn::default()
        };
        let (out, delta) = counted(&dp, || dp.run_with(Program::FromPod, &frame, skb))?;
        assert_eq!(out.action, TC_ACT_REDIRECT, "bpf_redirect to wan0");
        assert_eq!(
            delta,
            counters(&[
                Counter::RedirectToTunnel,
                Counter::ToTunnel,
                Counter::TunnelEncap
            ]),
            "the counters of the fe-tunnel path, and tunnel_encap"
        );
        assert_eq!(out.mark, 0x4000, "our mark bits cleared, foreign ones kept");
        let stats = dp.maps.peer_stats(EDGE2_PEER)?;
        assert_eq!(
            (stats.tx_packets, stats.tx_bytes),
            (1, frame.len() as u64),
            "edge-2's tx, counted on the inner frame as fe_tunnel_egress does"
        );

        // Read back by the parser (checksums verified there, not by us).
        let eth = parse_eth(&out.data)?;
        let outer = eth.ipv4()?;
        assert!(outer.checksum_valid, "outer IPv4 header checksum");
        let udp = outer.udp()?;
        assert_eq!(
            udp.checksum_status,
            UdpChecksum::Absent,
            "outer UDP checksum 0"
        );
        assert!(
            (32768..61000).contains(&udp.src_port),
            "source port {} in Linux's VXLAN range",
            udp.src_port
        );
        let vxlan = udp.vxlan()?;
        let inner = parse_eth(vxlan.inner)?;
        assert!(
            inner.ipv4()?.checksum_valid,
            "inner IPv4 checksum after the TTL decrement"
        );

        // Every byte, against an independent builder: outer Ethernet from
        // the FIB and neighbour table, IPv4 198.18.0.11 → .12 (TTL 64, DF
        // clear, the inner id, ECN carried outward: CE → ECT(0)), UDP to the
        // peer's port, VXLAN with our VNI, inner MACs as fe-tunnel's egress
        // writes them, inner packet with TTL 63.
        let inner_frame = {
            let mut f = decremented(&frame);
            f[0..6].copy_from_slice(&TUNNEL_DEV_MAC);
            f[6..12].copy_from_slice(&TUNNEL_SRC_MAC);
            f
        };
        let expected = Frame::eth(EDGE1_WAN_MAC, EDGE2_NIC_MAC)
            .ipv4(EDGE1_WAN, EDGE2_WAN)
            .ttl(64)
            .id(0x1234)
            .tos(0x02)
            .udp(udp.src_port, DEFAULT_TUNNEL_PORT)
            .zero_checksum()
            .vxlan(DEFAULT_TUNNEL_VNI, &inner_frame)
            .build();
        assert_eq!(out.data, expected, "the frame on the wire");

        // One flow, one source port (ECMP keeps it on one path); another
        // flow gets its own.
        let again = dp.run_with(Program::FromPod, &frame, skb)?;
        assert_eq!(again.data, out.data, "same flow, same bytes");
        let other = dp.run(Program::FromPod, &pod_udp(PEER_POD, 40001))?;
        let other_port = parse_eth(&other.data)?.ipv4()?.udp()?.src_port;
        assert_ne!(
            other_port, udp.src_port,
            "another flow, another source port"
        );
        Ok(())
    })
}

#[test]
fn unresolved_neighbour_goes_into_fe_tunnel_as_before() -> Result<()> {
    let lab = EdgeLab::new("fe-encap-noneigh")?;
    lab.netns.enter(|| {
        let dp = edge_with_encap("encap-noneigh")?;
        // The connector (198.18.0.1) is on wan0's subnet, unresolved.
        let frame = pod_udp(CLOUD_POD, 40000);
        let (out, delta) = counted(&dp, || dp.run(Program::FromPod, &frame))?;
        assert_eq!(
            (out.action, &out.data, delta),
            (
                TC_ACT_REDIRECT,
                &decremented(&frame),
                counters(&[Counter::RedirectToTunnel, Counter::TunnelEncapNoNeighbour])
            ),
            "redirected into fe-tunnel with the TTL decremented, nothing else"
        );
        assert_eq!(
            mark::tunnel_peer(out.mark),
            Some(CONNECTOR_PEER),
            "marked for fe_tunnel_egress"
        );
        // ... whose egress program then sets the key as it always did.
        let (egress, delta) = counted(&dp, || {
            dp.run_with(
                Program::TunnelEgress,
                &out.data,
                SkbIn {
                    mark: out.mark,
                    ..SkbIn::default()
                },
            )
        })?;
        assert_eq!((egress.action, delta), (TC_ACT_OK, only(Counter::ToTunnel)));
        Ok(())
    })
}

#[test]
fn declined_encapsulations_go_into_fe_tunnel_unchanged() -> Result<()> {
    let lab = EdgeLab::new("fe-encap-declined")?;
    lab.netns.enter(|| {
        let mut dp = edge_with_encap("encap-declined")?;
        // A peer nothing routes to: no FIB result.
        let mut unrouted = dp.maps.peer(EDGE2_PEER)?;
        unrouted.underlay_ip = [203, 0, 113, 50];
        dp.maps.set_peer(EDGE2_PEER, unrouted)?;
        let frame = pod_udp(PEER_POD, 40000);
        let (out, delta) = counted(&dp, || dp.run(Program::FromPod, &frame))?;
        assert_eq!(
            (out.action, &out.data, delta),
            (
                TC_ACT_REDIRECT,
                &decremented(&frame),
                counters(&[Counter::RedirectToTunnel, Counter::TunnelEncapDeclined])
            ),
            "no route to the peer"
        );
        Ok(())
    })?;
    lab.netns.enter(|| {
        let dp = edge_with_encap("encap-gso")?;
        // A GSO packet that is not TCP: bpf_skb_adjust_room refuses to grow it.
        let frame = pod_udp(PEER_POD, 40000);
        let skb = SkbIn {
            gso_segs: 2,
            gso_size: 100,
            ..SkbIn::default()
        };
        let (out, delta) = counted(&dp, || dp.run_with(Program::FromPod, &frame, skb))?;
        assert_eq!(
            (out.action, &out.data, delta),
            (
                TC_ACT_REDIRECT,
                &decremented(&frame),
                counters(&[Counter::RedirectToTunnel, Counter::TunnelEncapDeclined])
            ),
            "UDP GSO"
        );
        Ok(())
    })
}

#[test]
fn encapsulation_keeps_the_fast_path_punts_and_esp_mode() -> Result<()> {
    let lab = EdgeLab::new("fe-encap-punts")?;
    lab.netns.enter(|| {
        let dp = edge_with_encap("encap-punts")?;
        // TTL about to expire, too big for the tunnel: the kernel's, untouched.
        let expiring = Frame::eth(POD_MAC, BRIDGE_MAC)
            .ipv4(LOCAL_POD, PEER_POD)
            .ttl(1)
            .udp(1, 2)
            .build();
        let (out, delta) = counted(&dp, || dp.run(Program::FromPod, &expiring))?;
        assert_eq!(
            (out.action, &out.data, delta),
            (TC_ACT_OK, &expiring, only(Counter::PuntTtl))
        );
        let big = Frame::eth(POD_MAC, BRIDGE_MAC)
            .ipv4(LOCAL_POD, PEER_POD)
            .udp(1, 2)
            .payload(&[0u8; 1440])
            .build();
        let (out, delta) = counted(&dp, || dp.run(Program::FromPod, &big))?;
        assert_eq!(
            (out.action, &out.data, delta),
            (TC_ACT_OK, &big, only(Counter::PuntMtu))
        );
        // The largest packet that fits is encapsulated to the uplink MTU.
        let largest = Frame::eth(POD_MAC, BRIDGE_MAC)
            .ipv4(LOCAL_POD, PEER_POD)
            .udp(1, 2)
            .payload(&[0u8; 1450 - 28])
            .build();
        let out = dp.run(Program::FromPod, &largest)?;
        assert_eq!(
            (out.action, out.data.len()),
            (TC_ACT_REDIRECT, 14 + 1500),
            "1450 inner bytes fill a 1500-byte uplink"
        );
        Ok(())
    })?;
    lab.netns.enter(|| {
        // ESP mode ignores the bit: marked for xfrm, handed to the kernel.
        let mut dp = edge("encap-esp", tunnel_mode::ESP)?;
        let mut config = dp.maps.config()?;
        config.flags = config_flags::TC_ENCAP;
        dp.maps.set_config(config)?;
        let frame = pod_udp(PEER_POD, 40000);
        let (out, delta) = counted(&dp, || dp.run(Program::FromPod, &frame))?;
        assert_eq!(
            (out.action, &out.data, delta),
            (TC_ACT_OK, &frame, only(Counter::PassKernel))
        );
        assert_eq!(mark::tunnel_peer(out.mark), Some(EDGE2_PEER));
        Ok(())
    })
}
