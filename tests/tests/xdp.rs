//! XDP on the uplinks: the connector's Flannel ↔ tunnel masquerade rewritten
//! in place and the tunnel guard, first under BPF_PROG_TEST_RUN (exact
//! bytes, verdicts, counters; every declined frame passes byte-identical),
//! then in the mini cluster (the seed matrix with XDP on every uplink,
//! forged tunnel traffic dying at the NIC, agent restarts under ping with no
//! loss). Needs root.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use fabedge_common::{
    Counter, DEFAULT_TUNNEL_PORT, DEFAULT_TUNNEL_VNI, TUNNEL_DEV_MAC, TUNNEL_SRC_MAC, config_flags,
    route_kind, tunnel_mode,
};
use fabedge_tests::{
    cluster::{Cluster, ClusterOptions, ECHO_PORT, PING_COUNT},
    datapath::{counted, fixtures::*, only},
    netns::PacketSocket,
    packet::{Frame, UdpChecksum, parse_eth, vxlan_encap},
    xdp::{self, *},
};

const EDGE1_WAN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);
const EDGE1_POD: Ipv4Addr = LOCAL_POD;

fn inner_udp(src_mac: [u8; 6], dst_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr, ttl: u8) -> Vec<u8> {
    Frame::eth(src_mac, dst_mac)
        .ipv4(src, dst)
        .ttl(ttl)
        .id(99)
        .udp(5353, 53)
        .payload(b"through the connector")
        .build()
}

/// Our VXLAN from an edge (`outer_src`) to the connector carrying `inner`.
fn tunnel(outer_src: Ipv4Addr, inner: &[u8]) -> Vec<u8> {
    tunnel_frame(outer_src, CONNECTOR_WAN, inner)
}

/// The outer UDP source port of a rewritten frame, after checking every
/// checksum with the harness's parsers and the port's range.
fn checked_source_port(frame: &[u8]) -> Result<u16> {
    let ip = parse_eth(frame)?.ipv4()?;
    assert!(ip.checksum_valid, "outer IPv4 header checksum");
    let udp = ip.udp()?;
    assert_eq!(
        udp.checksum_status,
        UdpChecksum::Absent,
        "VXLAN sends no UDP checksum"
    );
    let inner = parse_eth(udp.vxlan()?.inner)?.ipv4()?;
    assert!(
        inner.checksum_valid,
        "inner IPv4 header checksum after the TTL decrement"
    );
    assert!(
        (32768..61000).contains(&udp.src_port),
        "source port {} outside the kernel's VXLAN range",
        udp.src_port
    );
    Ok(udp.src_port)
}

#[test]
fn flannel_for_an_edge_pod_is_rewritten_into_our_tunnel_at_the_nic() -> Result<()> {
    let lab = FibLab::new("xdp-f2t")?;
    lab.netns.enter(|| {
        let dp = xdp::connector("xdp-f2t")?;
        let inner = inner_udp(CLOUD2_VTEP_MAC, FLANNEL_MAC, CLOUD_POD, EDGE1_POD, 63);
        let frame = flannel_to_connector(CLOUD2_LAN, &inner);
        let (out, delta) = counted(&dp, || run_xdp(&dp, XDP_UPLINK, &frame, lab.lan_ifindex))?;
        assert_eq!(out.action, XDP_REDIRECT, "the edge is behind another NIC");
        assert_eq!(delta, only(Counter::XdpFlannelToTunnel));
        let sport = checked_source_port(&out.data)?;
        // What fe-tunnel would have sent: from our WAN address to the edge's
        // tunnel port, our VNI, the inner MACs fe_tunnel_egress stamps, TTL - 1.
        let expected_inner = inner_udp(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC, CLOUD_POD, EDGE1_POD, 62);
        let expected = vxlan_encap(
            Frame::eth(CONNECTOR_WAN_MAC, EDGE1_NIC_MAC),
            CONNECTOR_WAN,
            EDGE1_WAN,
            sport,
            DEFAULT_TUNNEL_PORT,
            DEFAULT_TUNNEL_VNI,
            &expected_inner,
        );
        assert_eq!(out.data, expected);
        let stats = dp.maps.peer_stats(EDGE1_PEER)?;
        assert_eq!(
            (stats.tx_packets, stats.tx_bytes),
            (1, inner.len() as u64),
            "per-peer stats as fe_tunnel_egress counts them"
        );
        let vtep = dp.maps.peer_stats(VTEP_PEER)?;
        assert_eq!(
            (vtep.rx_packets, vtep.rx_bytes),
            (1, inner.len() as u64),
            "RX of the VTEP the frame came from, as fe_uplink_ingress counts it"
        );
        // Same flow, same port (ECMP keeps a flow on one path); another flow moves it.
        let again = run_xdp(&dp, XDP_UPLINK, &frame, lab.lan_ifindex)?;
        assert_eq!(checked_source_port(&again.data)?, sport);
        let other = inner_udp(CLOUD2_VTEP_MAC, FLANNEL_MAC, CLOUD_POD, LOCAL_POD_2, 63);
        let other = run_xdp(
            &dp,
            XDP_UPLINK,
            &flannel_to_connector(CLOUD2_LAN, &other),
            lab.lan_ifindex,
        )?;
        assert_ne!(checked_source_port(&other.data)?, sport);
        Ok(())
    })
}

#[test]
fn tunnel_traffic_for_a_cloud_pod_is_rewritten_into_flannel_at_the_nic() -> Result<()> {
    let lab = FibLab::new("xdp-t2f")?;
    lab.netns.enter(|| {
        let dp = xdp::connector("xdp-t2f")?;
        let inner = inner_udp(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC, EDGE1_POD, CLOUD_POD, 64);
        let frame = tunnel(EDGE1_WAN, &inner);
        let (out, delta) = counted(&dp, || run_xdp(&dp, XDP_UPLINK, &frame, lab.wan_ifindex))?;
        assert_eq!(out.action, XDP_REDIRECT);
        assert_eq!(delta, only(Counter::XdpTunnelToFlannel));
        let sport = checked_source_port(&out.data)?;
        // What flannel.1 expects: from the connector's Flannel address, VNI 1,
        // its VtepMAC as inner destination, our flannel.1 MAC as source.
        let expected_inner = inner_udp(FLANNEL_MAC, CLOUD2_VTEP_MAC, EDGE1_POD, CLOUD_POD, 63);
        let expected = vxlan_encap(
            Frame::eth(UPLINK_MAC, CLOUD2_NIC_MAC),
            Ipv4Addr::from(CONNECTOR_LAN),
            Ipv4Addr::from(CLOUD2_LAN),
            sport,
            8472,
            1,
            &expected_inner,
        );
        assert_eq!(out.data, expected);
        assert_eq!(dp.maps.peer_stats(VTEP_PEER)?.tx_packets, 1);
        assert_eq!(dp.maps.peer_stats(EDGE1_PEER)?.rx_packets, 1);
        // Arriving on the NIC it leaves by: sent back out with XDP_TX.
        let out = run_xdp(&dp, XDP_UPLINK, &frame, lab.lan_ifindex)?;
        assert_eq!(out.action, XDP_TX);
        assert_eq!(out.data, expected);
        Ok(())
    })
}

/// The XDP verdict cache (the datapath's `xdp_cache`): a flow's second
/// frame gets the first one's verdict, bytes and counters (plus
/// `xdp_cached`), frames of the flow that the full path would judge
/// differently (a wrong checksum, a longer frame) are judged by it, and a
/// stranger's drops are never cached.
#[test]
fn a_flows_next_frames_take_its_cached_verdict_with_the_same_bytes_and_counts() -> Result<()> {
    let lab = FibLab::new("xdp-cache")?;
    lab.netns.enter(|| {
        stay_on_one_cpu()?;
        let dp = xdp::connector("xdp-cache")?;
        let cloud_to_edge = flannel_to_connector(
            CLOUD2_LAN,
            &inner_udp(CLOUD2_VTEP_MAC, FLANNEL_MAC, CLOUD_POD, EDGE1_POD, 63),
        );
        let edge_to_cloud = tunnel(
            EDGE1_WAN,
            &inner_udp(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC, EDGE1_POD, CLOUD_POD, 64),
        );
        let cloud_pod = flannel_to_connector(
            CLOUD2_LAN,
            &inner_udp(
                CLOUD2_VTEP_MAC,
                FLANNEL_MAC,
                CLOUD_POD,
                Ipv4Addr::new(10, 244, 0, 5),
                63,
            ),
        );
        let spoofed = tunnel(
            EDGE1_WAN,
            &inner_udp(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC, CLOUD_POD, LOCAL_POD_2, 64),
        );
        let cases = [
            (
                "Flannel → tunnel",
                &cloud_to_edge,
                lab.lan_ifindex,
                XDP_REDIRECT,
                Counter::XdpFlannelToTunnel,
            ),
            (
                "tunnel → Flannel",
                &edge_to_cloud,
                lab.wan_ifindex,
                XDP_REDIRECT,
                Counter::XdpTunnelToFlannel,
            ),
            (
                "Flannel for a cloud pod",
                &cloud_pod,
                lab.lan_ifindex,
                XDP_PASS,
                Counter::XdpPass,
            ),
            (
                "a spoofed inner source",
                &spoofed,
                lab.wan_ifindex,
                XDP_DROP,
                Counter::XdpDropSpoofed,
            ),
        ];
        for (what, frame, ifindex, verdict, counter) in cases {
            let (first, delta) = counted(&dp, || run_xdp(&dp, XDP_UPLINK, frame, ifindex))?;
            assert_eq!(
                (first.action, &delta),
                (verdict, &only(counter)),
                "{what}: first frame"
            );
            let (again, delta) = counted(&dp, || run_xdp(&dp, XDP_UPLINK, frame, ifindex))?;
            assert_eq!(again.action, verdict, "{what}: second frame");
            assert_eq!(again.data, first.data, "{what}: the cached verdict's bytes");
            assert_eq!(
                delta,
                BTreeMap::from([(counter.name(), 1), (Counter::XdpCached.name(), 1)]),
                "{what}: second frame's counters"
            );
        }
        assert_eq!(
            dp.maps.peer_stats(EDGE1_PEER)?.tx_packets,
            2,
            "cached rewrites count per peer"
        );
        assert_eq!(dp.maps.peer_stats(VTEP_PEER)?.tx_packets, 2);
        assert_eq!(dp.maps.peer_stats(VTEP_PEER)?.rx_packets, 2);

        // A flow with a cached rewrite: a frame the kernel would drop is
        // still the kernel's, byte-identical.
        let mut bad_checksum = cloud_to_edge.clone();
        bad_checksum[14 + 10] ^= 0xff;
        let (out, delta) = counted(&dp, || {
            run_xdp(&dp, XDP_UPLINK, &bad_checksum, lab.lan_ifindex)
        })?;
        assert_eq!(
            (out.action, &out.data),
            (XDP_PASS, &bad_checksum),
            "a wrong outer checksum"
        );
        assert_eq!(delta, only(Counter::XdpPass));
        // Longer than any frame the FIB checked on this path: the full path again.
        let longer = flannel_to_connector(
            CLOUD2_LAN,
            &Frame::eth(CLOUD2_VTEP_MAC, FLANNEL_MAC)
                .ipv4(CLOUD_POD, EDGE1_POD)
                .ttl(63)
                .udp(5353, 53)
                .payload(&[7u8; 900])
                .build(),
        );
        let (out, delta) = counted(&dp, || run_xdp(&dp, XDP_UPLINK, &longer, lab.lan_ifindex))?;
        assert_eq!(out.action, XDP_REDIRECT);
        assert_eq!(
            delta,
            only(Counter::XdpFlannelToTunnel),
            "a longer frame is looked up again"
        );
        checked_source_port(&out.data)?;

        // A stranger's drop is never cached: anyone could fill the cache.
        let stranger = tunnel(
            Ipv4Addr::new(198, 18, 0, 77),
            &inner_udp(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC, EDGE1_POD, CLOUD_POD, 64),
        );
        for _ in 0..2 {
            let (out, delta) =
                counted(&dp, || run_xdp(&dp, XDP_UPLINK, &stranger, lab.wan_ifindex))?;
            assert_eq!(out.action, XDP_DROP);
            assert_eq!(delta, only(Counter::XdpDropUnknownTunnelSource));
        }
        Ok(())
    })
}

/// No cached verdict outlives what it was computed from: a map the agent
/// writes, or the kernel's neighbours and routes once the agent's watcher
/// has seen the change (without it, at most `MAX_AGE_NS`, 1 s).
#[test]
fn a_cached_verdict_never_outlives_a_map_write_or_a_kernel_change() -> Result<()> {
    let lab = FibLab::new("xdp-epoch")?;
    lab.netns.enter(|| {
        stay_on_one_cpu()?;
        let mut dp = xdp::connector("xdp-epoch")?;
        let frame = flannel_to_connector(
            CLOUD2_LAN,
            &inner_udp(CLOUD2_VTEP_MAC, FLANNEL_MAC, CLOUD_POD, EDGE1_POD, 63),
        );
        let neighbour = |addr: &str, mac: [u8; 6]| lab.neighbour(addr, mac, "wan0");
        // Where the frame went: (outer destination, its MAC), and whether
        // the cache answered.
        let send =
            |dp: &fabedge_tests::datapath::TestDatapath| -> Result<(Ipv4Addr, [u8; 6], bool)> {
                let (out, delta) =
                    counted(dp, || run_xdp(dp, XDP_UPLINK, &frame, lab.lan_ifindex))?;
                ensure!(
                    out.action == XDP_REDIRECT,
                    "verdict {} for {delta:?}",
                    out.action
                );
                let eth = parse_eth(&out.data)?;
                let ip = eth.ipv4()?;
                Ok((
                    ip.dst,
                    eth.dst,
                    delta.contains_key(Counter::XdpCached.name()),
                ))
            };
        assert_eq!(send(&dp)?, (EDGE1_WAN, EDGE1_NIC_MAC, false));
        assert_eq!(send(&dp)?, (EDGE1_WAN, EDGE1_NIC_MAC, true));

        // A map write: the edge moved. The next frame follows it.
        let moved = Ipv4Addr::new(198, 18, 0, 12);
        let moved_mac = [0x02, 0, 0, 0, 0x12, 0x01];
        neighbour("198.18.0.12", moved_mac)?;
        dp.maps.set_peer(EDGE1_PEER, tunnel_peer(moved.octets()))?;
        xdp::sync_peer_addrs(&mut dp)?;
        assert_eq!(
            send(&dp)?,
            (moved, moved_mac, false),
            "after FE_PEERS changed"
        );
        assert_eq!(send(&dp)?, (moved, moved_mac, true));

        // A kernel change nobody reports: the cached MAC stands, for at
        // most its lifetime (counted from the fill, which this renewal
        // forces now: a slow machine may take a while over the `ip` call).
        dp.maps
            .xdp_epoch
            .as_mut()
            .context("no FE_XDP_GEN")?
            .renew()?;
        assert_eq!(send(&dp)?, (moved, moved_mac, false));
        let filled = Instant::now();
        let second_mac = [0x02, 0, 0, 0, 0x12, 0x02];
        neighbour("198.18.0.12", second_mac)?;
        let first = send(&dp)?;
        if filled.elapsed() < Duration::from_millis(900) {
            assert_eq!(
                first,
                (moved, moved_mac, true),
                "no watcher: the cache is not told"
            );
        } else {
            println!(
                "the neighbour change took {:?}: the cached entry may have expired already, \
                 its standing is not checked",
                filled.elapsed()
            );
        }
        let expired = loop {
            let (_, mac, _) = send(&dp)?;
            if mac == second_mac {
                break filled.elapsed();
            }
            ensure!(
                filled.elapsed() < Duration::from_secs(3),
                "the cached MAC outlived 3 s"
            );
        };
        ensure!(
            expired >= Duration::from_millis(900),
            "the entry expired {expired:?} after its fill, before its 1 s lifetime"
        );
        // With the agent's watcher, the kernel's change voids the cache.
        let epoch = dp.maps.xdp_epoch.as_ref().context("no FE_XDP_GEN")?;
        let _watch = fabedge_agent::datapath::xdp_epoch::watch_kernel(epoch.try_clone()?)?;
        assert_eq!(
            send(&dp)?,
            (moved, second_mac, false),
            "the watcher renews at start"
        );
        assert_eq!(send(&dp)?, (moved, second_mac, true));
        let third_mac = [0x02, 0, 0, 0, 0x12, 0x03];
        let before = epoch.current()?;
        neighbour("198.18.0.12", third_mac)?;
        let deadline = Instant::now() + Duration::from_secs(2);
        while epoch.current()? == before {
            ensure!(
                Instant::now() < deadline,
                "the watcher did not renew the epoch within 2 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            send(&dp)?,
            (moved, third_mac, false),
            "after the neighbour changed"
        );
        // The route goes: the kernel would not forward, and neither do we.
        send(&dp)?;
        let before = epoch.current()?;
        lab.netns
            .ip(&["addr", "del", "198.18.0.1/24", "dev", "wan0"])?;
        while epoch.current()? == before {
            ensure!(
                Instant::now() < deadline + Duration::from_secs(2),
                "no renewal after the route went"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let (out, delta) = counted(&dp, || run_xdp(&dp, XDP_UPLINK, &frame, lab.lan_ifindex))?;
        assert_eq!(
            (out.action, &out.data),
            (XDP_PASS, &frame),
            "no route: passed unchanged"
        );
        assert!(!delta.contains_key(Counter::XdpCached.name()));
        Ok(())
    })
}

#[test]
fn everything_xdp_declines_passes_byte_identical() -> Result<()> {
    let lab = FibLab::new("xdp-decline")?;
    lab.netns.enter(|| {
        let mut dp = xdp::connector("xdp-decline")?;
        // An edge whose underlay address has a route but no neighbour yet.
        dp.maps.set_peer(6, tunnel_peer(UNRESOLVED_EDGE))?;
        dp.maps
            .set_route(net("10.234.9.0/24"), route(route_kind::TUNNEL, 6))?;
        xdp::sync_peer_addrs(&mut dp)?;

        let from_cloud = |dst: Ipv4Addr, ttl: u8| {
            flannel_to_connector(
                CLOUD2_LAN,
                &inner_udp(CLOUD2_VTEP_MAC, FLANNEL_MAC, CLOUD_POD, dst, ttl),
            )
        };
        let good = from_cloud(EDGE1_POD, 63);
        let mut more_fragments = good.clone();
        more_fragments[64 + 6] |= 0x20;
        let mut outer_fragment = good.clone();
        outer_fragment[14 + 6] |= 0x20;
        let options = {
            let inner = inner_udp(CLOUD2_VTEP_MAC, FLANNEL_MAC, CLOUD_POD, EDGE1_POD, 63);
            flannel_to_connector(
                CLOUD2_LAN,
                &fabedge_tests::packet::with_ipv4_ihl(&inner, 6)?,
            )
        };
        let too_big = flannel_to_connector(
            CLOUD2_LAN,
            &Frame::eth(CLOUD2_VTEP_MAC, FLANNEL_MAC)
                .ipv4(CLOUD_POD, EDGE1_POD)
                .udp(5353, 53)
                .payload(&[0u8; 1451 - 28])
                .build(),
        );
        let arp = Frame::eth(CLOUD2_NIC_MAC, UPLINK_MAC)
            .ethertype(0x0806)
            .payload(&[0u8; 28])
            .build();
        let plain = Frame::eth(CLOUD2_NIC_MAC, UPLINK_MAC)
            .ipv4(Ipv4Addr::from(CLOUD2_LAN), EDGE1_POD)
            .udp(1, 2)
            .build();
        let elsewhere = vxlan_encap(
            Frame::eth(CLOUD2_NIC_MAC, UPLINK_MAC),
            Ipv4Addr::from(CLOUD2_LAN),
            Ipv4Addr::new(10, 1, 0, 3),
            41234,
            8472,
            1,
            &inner_udp(CLOUD2_VTEP_MAC, FLANNEL_MAC, CLOUD_POD, EDGE1_POD, 63),
        );
        let cases: Vec<(&str, Vec<u8>, Option<Counter>)> = vec![
            (
                "Flannel for another node's VTEP",
                elsewhere,
                Some(Counter::XdpPass),
            ),
            ("TTL 1", from_cloud(EDGE1_POD, 1), Some(Counter::XdpPass)),
            (
                "inner more-fragments",
                more_fragments,
                Some(Counter::XdpPass),
            ),
            (
                "outer more-fragments",
                outer_fragment,
                Some(Counter::XdpPass),
            ),
            ("inner IP options", options, Some(Counter::XdpPass)),
            ("too big for the tunnel", too_big, Some(Counter::XdpPass)),
            (
                "a cloud pod (c4)",
                from_cloud(Ipv4Addr::new(10, 244, 0, 5), 63),
                Some(Counter::XdpPass),
            ),
            (
                "unknown destination",
                from_cloud(UNKNOWN, 63),
                Some(Counter::XdpPass),
            ),
            (
                "next hop unresolved",
                from_cloud(Ipv4Addr::new(10, 234, 9, 1), 63),
                Some(Counter::XdpPassNoNeighbour),
            ),
            ("not IPv4", arp, None),
            ("not a tunnel port", plain, None),
        ];
        for (what, frame, counter) in cases {
            let (out, delta) = counted(&dp, || run_xdp(&dp, XDP_UPLINK, &frame, lab.lan_ifindex))?;
            assert_eq!(out.action, XDP_PASS, "{what}");
            assert_eq!(out.data, frame, "{what}: XDP_PASS must leave every byte");
            let want = match counter {
                // The unresolved neighbour also declines as a whole.
                Some(Counter::XdpPassNoNeighbour) => BTreeMap::from([
                    (Counter::XdpPassNoNeighbour.name(), 1),
                    (Counter::XdpPass.name(), 1),
                ]),
                Some(c) => only(c),
                None => BTreeMap::new(),
            };
            assert_eq!(delta, want, "{what}");
        }

        // The configuration's say: no fast path, or ESP mode (guard only).
        for (what, change) in [
            ("--no-fast-path", config_flags::NO_FAST_PATH),
            ("ESP mode", 0),
        ] {
            let saved = dp.maps.config()?;
            let mut config = saved;
            if change == 0 {
                config.tunnel_mode = tunnel_mode::ESP;
            } else {
                config.flags |= change;
            }
            dp.maps.set_config(config)?;
            let (out, delta) = counted(&dp, || run_xdp(&dp, XDP_UPLINK, &good, lab.lan_ifindex))?;
            assert_eq!((out.action, &out.data), (XDP_PASS, &good), "{what}");
            assert_eq!(delta, only(Counter::XdpPass), "{what}");
            dp.maps.set_config(saved)?;
        }
        Ok(())
    })
}

/// Found by `fuzz_xdp_uplink_connector`: the rewrite writes a fresh outer
/// header and recomputes checksums incrementally, so a frame the kernel
/// drops (a wrong IPv4 header checksum, outer or inner; a UDP length that
/// disagrees with the IPv4 one; a wrong UDP checksum) was sent on, healed
/// or not. Such frames, and any with a UDP checksum (only the kernel
/// verifies it), pass untouched for the kernel to judge.
#[test]
fn frames_the_kernel_would_drop_are_never_rewritten_and_udp_checksums_are_carried_over()
-> Result<()> {
    let lab = FibLab::new("xdp-damaged")?;
    lab.netns.enter(|| {
        let dp = xdp::connector("xdp-damaged")?;
        let from_cloud = flannel_to_connector(
            CLOUD2_LAN,
            &inner_udp(CLOUD2_VTEP_MAC, FLANNEL_MAC, CLOUD_POD, EDGE1_POD, 63),
        );
        let from_edge = tunnel(
            EDGE1_WAN,
            &inner_udp(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC, EDGE1_POD, CLOUD_POD, 64),
        );
        let (outer_check, udp_len, udp_check, inner_check) = (24, 38, 40, 74);
        for (direction, good, ifindex) in [
            ("Flannel → tunnel", &from_cloud, lab.lan_ifindex),
            ("tunnel → Flannel", &from_edge, lab.wan_ifindex),
        ] {
            let out = run_xdp(&dp, XDP_UPLINK, good, ifindex)?;
            assert!(
                matches!(out.action, XDP_TX | XDP_REDIRECT),
                "{direction}: the undamaged frame is rewritten (verdict {})",
                out.action
            );
            let damaged = |at: usize, bytes: [u8; 2]| {
                let mut frame = good.clone();
                frame[at..at + 2].copy_from_slice(&bytes);
                frame
            };
            let flip = |at: usize| damaged(at, [good[at] ^ 0x10, good[at + 1]]);
            let udp_len_now = u16::from_be_bytes([good[udp_len], good[udp_len + 1]]);
            let with_checksum = {
                // The same datagram with its UDP checksum filled in.
                let ip = parse_eth(good)?.ipv4()?;
                let mut datagram = ip.payload.to_vec();
                let sum = fabedge_tests::packet::l4_checksum(ip.src, ip.dst, 17, &datagram);
                datagram[6..8].copy_from_slice(&sum.to_be_bytes());
                let mut frame = good.clone();
                frame[34..].copy_from_slice(&datagram);
                let udp = parse_eth(&frame)?.ipv4()?.udp()?;
                assert_eq!(udp.checksum_status, UdpChecksum::Valid);
                frame
            };
            for (what, frame) in [
                ("outer IPv4 checksum wrong", flip(outer_check)),
                ("inner IPv4 checksum wrong", flip(inner_check)),
                (
                    "UDP length short of the IPv4 payload",
                    damaged(udp_len, (udp_len_now - 8).to_be_bytes()),
                ),
                (
                    "UDP length past the IPv4 payload",
                    damaged(udp_len, (udp_len_now + 8).to_be_bytes()),
                ),
            ] {
                let (out, delta) = counted(&dp, || run_xdp(&dp, XDP_UPLINK, &frame, ifindex))?;
                assert_eq!(
                    (out.action, &out.data),
                    (XDP_PASS, &frame),
                    "{direction}, {what}: passed untouched"
                );
                assert_eq!(delta, only(Counter::XdpPass), "{direction}, {what}");
            }
            // A UDP checksum is carried over (RFC 1624), not verified: right
            // stays right, wrong stays wrong for the receiving kernel to drop.
            for (what, frame, expected) in [
                (
                    "UDP checksum right",
                    with_checksum.clone(),
                    UdpChecksum::Valid,
                ),
                (
                    "UDP checksum wrong",
                    {
                        let mut frame = with_checksum.clone();
                        frame[udp_check] ^= 0x10;
                        frame
                    },
                    UdpChecksum::Invalid,
                ),
                ("no UDP checksum", good.clone(), UdpChecksum::Absent),
            ] {
                let out = run_xdp(&dp, XDP_UPLINK, &frame, ifindex)?;
                assert!(
                    matches!(out.action, XDP_TX | XDP_REDIRECT),
                    "{direction}, {what}: rewritten (verdict {})",
                    out.action
                );
                let sent = parse_eth(&out.data)?.ipv4()?;
                assert!(
                    sent.checksum_valid,
                    "{direction}, {what}: outer IPv4 checksum"
                );
                assert_eq!(
                    sent.udp()?.checksum_status,
                    expected,
                    "{direction}, {what}: UDP checksum after the rewrite"
                );
            }
        }
        Ok(())
    })
}

#[test]
fn tunnel_traffic_from_strangers_and_spoofed_sources_dies_at_the_nic() -> Result<()> {
    let lab = FibLab::new("xdp-guard")?;
    lab.netns.enter(|| {
        let dp = xdp::connector("xdp-guard")?;
        let stranger_lan = [10, 1, 0, 77];
        let stranger_wan = Ipv4Addr::new(198, 18, 0, 77);
        let cases = [
            (
                "Flannel from a node that is no VTEP",
                flannel_to_connector(
                    stranger_lan,
                    &inner_udp(CLOUD2_VTEP_MAC, FLANNEL_MAC, CLOUD_POD, EDGE1_POD, 63),
                ),
                Counter::XdpDropUnknownTunnelSource,
            ),
            (
                "our VXLAN from an address that is no peer",
                tunnel(
                    stranger_wan,
                    &inner_udp(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC, EDGE1_POD, CLOUD_POD, 64),
                ),
                Counter::XdpDropUnknownTunnelSource,
            ),
            (
                "an edge sending in the name of a cloud pod",
                tunnel(
                    EDGE1_WAN,
                    &inner_udp(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC, CLOUD_POD, LOCAL_POD_2, 64),
                ),
                Counter::XdpDropSpoofed,
            ),
            (
                "a cloud node sending in the name of an edge pod",
                flannel_to_connector(
                    CLOUD2_LAN,
                    &inner_udp(CLOUD2_VTEP_MAC, FLANNEL_MAC, LOCAL_POD_2, EDGE1_POD, 63),
                ),
                Counter::XdpDropSpoofed,
            ),
        ];
        for (what, frame, counter) in cases {
            let (out, delta) = counted(&dp, || run_xdp(&dp, XDP_UPLINK, &frame, lab.lan_ifindex))?;
            assert_eq!(out.action, XDP_DROP, "{what}");
            assert_eq!(delta, only(counter), "{what}");
        }
        Ok(())
    })
}

#[test]
fn esp_mode_guard_drops_esp_from_strangers_only() -> Result<()> {
    let lab = FibLab::new("xdp-esp")?;
    lab.netns.enter(|| {
        let dp = xdp::edge("xdp-esp", tunnel_mode::ESP)?;
        let esp_in_udp = |src: Ipv4Addr, payload: &[u8]| {
            Frame::eth(EDGE1_NIC_MAC, CONNECTOR_WAN_MAC)
                .ipv4(src, EDGE1_WAN)
                .udp(4500, 4500)
                .zero_checksum()
                .payload(payload)
                .build()
        };
        let esp = [0, 0, 0x12, 0x34, 0, 0, 0, 1, 0xee, 0xee, 0xee, 0xee];
        let connector_wan = CONNECTOR_WAN;
        let stranger = Ipv4Addr::new(198, 18, 0, 77);
        let cases = [
            (
                "ESP from the connector",
                esp_in_udp(connector_wan, &esp),
                XDP_PASS,
                Some(Counter::XdpPass),
            ),
            (
                "ESP from a stranger",
                esp_in_udp(stranger, &esp),
                XDP_DROP,
                Some(Counter::XdpDropUnknownTunnelSource),
            ),
            // NAT keepalives and hellos: how a moved peer is found again.
            (
                "a keepalive from a stranger",
                esp_in_udp(stranger, &[0xff]),
                XDP_PASS,
                None,
            ),
            (
                "a hello from a stranger",
                esp_in_udp(stranger, &[0, 0, 0, 0, 1, 2, 3, 4]),
                XDP_PASS,
                None,
            ),
        ];
        for (what, frame, action, counter) in cases {
            let (out, delta) = counted(&dp, || run_xdp(&dp, XDP_UPLINK, &frame, lab.wan_ifindex))?;
            assert_eq!(out.action, action, "{what}");
            assert_eq!(out.data, frame, "{what}: the guard never rewrites");
            assert_eq!(delta, counter.map(only).unwrap_or_default(), "{what}");
        }
        Ok(())
    })
}

#[test]
fn edges_guard_their_tunnel_port_too() -> Result<()> {
    let lab = FibLab::new("xdp-edge")?;
    lab.netns.enter(|| {
        let dp = xdp::edge("xdp-edge", tunnel_mode::VXLAN)?;
        let from = |src: Ipv4Addr, inner_src: Ipv4Addr| {
            vxlan_encap(
                Frame::eth(CONNECTOR_WAN_MAC, EDGE1_NIC_MAC),
                src,
                EDGE1_WAN,
                50000,
                DEFAULT_TUNNEL_PORT,
                DEFAULT_TUNNEL_VNI,
                &inner_udp(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC, inner_src, LOCAL_POD, 63),
            )
        };
        let connector_wan = CONNECTOR_WAN;
        let cases = [
            (
                "a cloud pod through the connector",
                from(connector_wan, CLOUD_POD),
                XDP_PASS,
                Counter::XdpPass,
            ),
            (
                "the connector in the name of edge-2's pod",
                from(connector_wan, PEER_POD),
                XDP_DROP,
                Counter::XdpDropSpoofed,
            ),
            (
                "a stranger",
                from(Ipv4Addr::new(198, 18, 0, 77), CLOUD_POD),
                XDP_DROP,
                Counter::XdpDropUnknownTunnelSource,
            ),
        ];
        for (what, frame, action, counter) in cases {
            let (out, delta) = counted(&dp, || run_xdp(&dp, XDP_UPLINK, &frame, lab.wan_ifindex))?;
            assert_eq!(out.action, action, "{what}");
            assert_eq!(out.data, frame, "{what}: an edge's XDP never rewrites");
            assert_eq!(delta, only(counter), "{what}");
        }
        Ok(())
    })
}

#[test]
fn the_empty_program_passes_everything() -> Result<()> {
    let dp = xdp::connector("xdp-empty")?;
    let frame = flannel_to_connector(
        CLOUD2_LAN,
        &inner_udp(CLOUD2_VTEP_MAC, FLANNEL_MAC, CLOUD_POD, EDGE1_POD, 63),
    );
    let out = run_xdp(&dp, XDP_EMPTY, &frame, 0)?;
    assert_eq!((out.action, out.data), (XDP_PASS, frame));
    Ok(())
}

// ---------------------------------------------------------------------------
// Edge receive (`--xdp-pod-rx`): our tunnel's frames for local pods
// ---------------------------------------------------------------------------

/// The pod behind `LOCAL_POD`'s veth in the lab, and its MTU.
const POD_MTU: u16 = 1450;

/// Edge-1 with XDP delivery on and `LOCAL_POD` learned behind the lab's
/// `lan1` (any veth of the namespace: test runs redirect nowhere).
fn edge_delivering(name: &str, lab: &FibLab) -> Result<fabedge_tests::datapath::TestDatapath> {
    let mut dp = xdp::edge(name, tunnel_mode::VXLAN)?;
    let veth = lab.netns.ifindex("lan1")?;
    xdp::learn_pod(&mut dp, veth, LOCAL_POD, (POD_MAC, BRIDGE_MAC), POD_MTU)?;
    Ok(dp)
}

/// Our VXLAN from the connector to edge-1's node address carrying `inner`.
fn to_edge(inner: &[u8]) -> Vec<u8> {
    vxlan_encap(
        Frame::eth(CONNECTOR_WAN_MAC, EDGE1_NIC_MAC),
        CONNECTOR_WAN,
        NODE_IP,
        50000,
        DEFAULT_TUNNEL_PORT,
        DEFAULT_TUNNEL_VNI,
        inner,
    )
}

#[test]
fn tunnel_traffic_for_a_local_pod_is_decapsulated_into_its_veth_at_the_nic() -> Result<()> {
    let lab = FibLab::new("xdp-rx")?;
    lab.netns.enter(|| {
        let dp = edge_delivering("xdp-rx", &lab)?;
        let inner = inner_udp(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC, CLOUD_POD, LOCAL_POD, 63);
        let frame = to_edge(&inner);
        let (out, delta) = counted(&dp, || run_xdp(&dp, XDP_UPLINK, &frame, lab.wan_ifindex))?;
        assert_eq!(out.action, XDP_REDIRECT);
        assert_eq!(delta, only(Counter::XdpRedirectToPod));
        // What the pod receives over br-fabedge: the bridge's MAC to the
        // pod's, TTL one less, the packet otherwise as sent.
        assert_eq!(
            out.data,
            inner_udp(BRIDGE_MAC, POD_MAC, CLOUD_POD, LOCAL_POD, 62)
        );
        let ip = parse_eth(&out.data)?.ipv4()?;
        assert!(
            ip.checksum_valid,
            "IPv4 header checksum after the TTL decrement"
        );
        assert_eq!(
            ip.udp()?.checksum_status,
            UdpChecksum::Valid,
            "the inner UDP checksum is untouched and right"
        );
        let stats = dp.maps.peer_stats(CONNECTOR_PEER)?;
        assert_eq!(
            (stats.rx_packets, stats.rx_bytes),
            (1, inner.len() as u64),
            "per-peer RX as fe_tunnel_ingress counts it"
        );
        // With the outer UDP checksum a Linux VXLAN device sends by default,
        // verified over the whole datagram (small and full-size frames).
        for size in [0, 1400] {
            let inner = Frame::eth(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC)
                .ipv4(CLOUD_POD, LOCAL_POD)
                .ttl(63)
                .udp(5353, 53)
                .payload(&vec![0x5a; size])
                .build();
            let frame = Frame::eth(CONNECTOR_WAN_MAC, EDGE1_NIC_MAC)
                .ipv4(CONNECTOR_WAN, NODE_IP)
                .udp(50000, DEFAULT_TUNNEL_PORT)
                .vxlan(DEFAULT_TUNNEL_VNI, &inner)
                .build();
            assert_eq!(
                parse_eth(&frame)?.ipv4()?.udp()?.checksum_status,
                UdpChecksum::Valid
            );
            let (out, delta) = counted(&dp, || run_xdp(&dp, XDP_UPLINK, &frame, lab.wan_ifindex))?;
            assert_eq!(
                (out.action, delta),
                (XDP_REDIRECT, only(Counter::XdpRedirectToPod)),
                "{size} B payload with an outer UDP checksum"
            );
            assert_eq!(out.data.len(), inner.len());
        }
        // To another address of the node (its ExternalIP, say): local in the FIB.
        let lab_local = Ipv4Addr::new(198, 18, 0, 1);
        let frame = vxlan_encap(
            Frame::eth(CONNECTOR_WAN_MAC, EDGE1_NIC_MAC),
            Ipv4Addr::new(198, 18, 0, 12),
            lab_local,
            50000,
            DEFAULT_TUNNEL_PORT,
            DEFAULT_TUNNEL_VNI,
            &inner_udp(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC, PEER_POD, LOCAL_POD, 63),
        );
        let (out, delta) = counted(&dp, || run_xdp(&dp, XDP_UPLINK, &frame, lab.wan_ifindex))?;
        assert_eq!(
            (out.action, delta),
            (XDP_REDIRECT, only(Counter::XdpRedirectToPod)),
            "from edge-2 to an address the FIB calls local"
        );
        assert_eq!(
            out.data,
            inner_udp(BRIDGE_MAC, POD_MAC, PEER_POD, LOCAL_POD, 62)
        );
        Ok(())
    })
}

#[test]
fn tunnel_traffic_xdp_cannot_deliver_as_the_kernel_would_passes_unchanged() -> Result<()> {
    let lab = FibLab::new("xdp-rx-no")?;
    lab.netns.enter(|| {
        let mut dp = edge_delivering("xdp-rx-no", &lab)?;
        let udp = |ttl| inner_udp(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC, CLOUD_POD, LOCAL_POD, ttl);
        // A Service backend's reply: fe_to_pod gives it the ClusterIP back.
        let reply = Frame::eth(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC)
            .ipv4(CLOUD_POD, LOCAL_POD)
            .tcp(8080, 40001)
            .payload(b"from a backend")
            .build();
        dp.maps.ct.insert(
            fabedge_common::services::CtKey {
                saddr: CLOUD_POD.octets(),
                daddr: LOCAL_POD.octets(),
                sport: 8080,
                dport: 40001,
                proto: 6,
                _pad: [0; 3],
            },
            fabedge_common::services::CtEntry {
                flags: fabedge_common::services::ct_flags::REPLY,
                ..Default::default()
            },
            0,
        )?;
        let original = Frame::eth(BRIDGE_MAC, POD_MAC)
            .ipv4(LOCAL_POD, CLOUD_POD)
            .udp(40002, 53)
            .build();
        let icmp_error = Frame::eth(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC)
            .ipv4(CLOUD_POD, LOCAL_POD)
            .icmp_error(
                fabedge_tests::packet::IcmpError::PortUnreachable,
                &original[14..],
            )
            .build();
        let big = Frame::eth(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC)
            .ipv4(CLOUD_POD, LOCAL_POD)
            .udp(5353, 53)
            .payload(&vec![7u8; POD_MTU as usize])
            .build();
        let wrong_udp_checksum = Frame::eth(CONNECTOR_WAN_MAC, EDGE1_NIC_MAC)
            .ipv4(CONNECTOR_WAN, NODE_IP)
            .udp(50000, DEFAULT_TUNNEL_PORT)
            .checksum(0x1234)
            .vxlan(DEFAULT_TUNNEL_VNI, &udp(63))
            .build();
        let congested = Frame::eth(CONNECTOR_WAN_MAC, EDGE1_NIC_MAC)
            .ipv4(CONNECTOR_WAN, NODE_IP)
            .tos(3)
            .udp(50000, DEFAULT_TUNNEL_PORT)
            .zero_checksum()
            .vxlan(DEFAULT_TUNNEL_VNI, &udp(63))
            .build();
        let mut padded = to_edge(&udp(63));
        padded.extend([0; 6]);
        let cases = [
            (
                "a pod the agent has not learned",
                to_edge(&inner_udp(
                    TUNNEL_SRC_MAC,
                    TUNNEL_DEV_MAC,
                    CLOUD_POD,
                    LOCAL_POD_2,
                    63,
                )),
            ),
            ("a packet of a Service flow", to_edge(&reply)),
            ("an ICMP error", to_edge(&icmp_error)),
            ("TTL about to expire", to_edge(&udp(1))),
            ("longer than the pod's MTU", to_edge(&big)),
            ("a wrong outer UDP checksum", wrong_udp_checksum),
            ("outer ECN congestion experienced", congested),
            ("bytes after the packet", padded),
            (
                "an inner MAC fe-tunnel would not accept as its own",
                to_edge(&inner_udp(
                    TUNNEL_SRC_MAC,
                    POD_MAC,
                    CLOUD_POD,
                    LOCAL_POD,
                    63,
                )),
            ),
            (
                "an address that is not the node's (the kernel forwards it)",
                tunnel_frame(CONNECTOR_WAN, EDGE1_WAN, &udp(63)),
            ),
        ];
        for (what, frame) in cases {
            let (out, delta) = counted(&dp, || run_xdp(&dp, XDP_UPLINK, &frame, lab.wan_ifindex))?;
            assert_eq!(
                (out.action, &out.data, delta),
                (XDP_PASS, &frame, only(Counter::XdpPassToPod)),
                "{what}"
            );
        }

        // A veth that left FE_POD_DEVS: the pod is the kernel's again.
        let veth = lab.netns.ifindex("lan1")?;
        dp.maps.pod_devs.remove(veth)?;
        let frame = to_edge(&udp(63));
        let (out, delta) = counted(&dp, || run_xdp(&dp, XDP_UPLINK, &frame, lab.wan_ifindex))?;
        assert_eq!(
            (out.action, &out.data, delta),
            (XDP_PASS, &frame, only(Counter::XdpPassToPod)),
            "a veth not in FE_POD_DEVS"
        );

        // Off (the default): the edge's XDP only guards.
        let mut config = dp.maps.config()?;
        config.flags &= !config_flags::XDP_POD_RX;
        dp.maps.set_config(config)?;
        let (out, delta) = counted(&dp, || run_xdp(&dp, XDP_UPLINK, &frame, lab.wan_ifindex))?;
        assert_eq!(
            (out.action, &out.data, delta),
            (XDP_PASS, &frame, only(Counter::XdpPass)),
            "--xdp-pod-rx off"
        );
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// The mini cluster with XDP on every uplink
// ---------------------------------------------------------------------------

/// Poll until `counter` on `node` grew by `by` over `before`.
fn wait_for_counter(cluster: &Cluster, node: &str, counter: Counter, before: u64) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = cluster
            .counters(node)?
            .get(counter.name())
            .copied()
            .unwrap_or(0);
        if now > before {
            return Ok(now - before);
        }
        if Instant::now() >= deadline {
            bail!("{node}: {} did not grow within 5 s", counter.name());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every path of the seed matrix (with XDP's counters for the masquerade)
/// passes on `cluster`.
fn seed_matrix_passes(cluster: &Cluster, how: &str) -> Result<()> {
    let mut failures = Vec::new();
    let before = link_drops(cluster)?;
    for path in xdp_seed_matrix() {
        let outcome = cluster.check_path(&path)?;
        if outcome.passed() {
            eprintln!("{how} ok: {} ({})", path.name, outcome.evidence.join("; "));
        } else {
            failures.push(format!(
                "{}\n  {}\n  evidence: {}",
                outcome.title,
                outcome.failures().join("\n  "),
                outcome.evidence.join("; "),
            ));
        }
    }
    ensure!(
        failures.is_empty(),
        "{how}:\n{}\nlinks meanwhile: {}\n\n{}",
        failures.join("\n"),
        grown_drops(&before, &link_drops(cluster)?),
        cluster.diagnostics(&cluster.node_names())
    );
    Ok(())
}

#[test]
fn with_xdp_pod_rx_the_seed_matrix_passes_and_edge_pods_are_reached_from_the_nic() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions {
        extra_agent_args: ["--tunnel", "vxlan", "--xdp", "native", "--xdp-pod-rx"]
            .map(String::from)
            .to_vec(),
        ..ClusterOptions::default()
    })?;
    make_the_wire_real(&cluster)?;
    let before_all = link_drops(&cluster)?;
    seed_matrix_passes(&cluster, "with XDP delivering to edge pods")?;

    // The pods are learned by now: tunnel traffic for them skips fe-tunnel
    // and the pod bridge (the receiving edge's XDP counter grows by every
    // packet), and the per-peer statistics still prove the tunnel.
    for (name, receiver) in [
        ("edge_pod_reaches_community_peer_pod_directly", "edge-2"),
        ("edge_pod_reaches_community_peer_pod_directly", "edge-1"),
        (
            "cloud_pod_reaches_edge_pod_through_flannel_and_connector",
            "edge-1",
        ),
    ] {
        let path = xdp_seed_matrix()
            .into_iter()
            .find(|p| p.name == name)
            .expect("a seed path");
        let before = cluster.settled_stats()?;
        let outcome = cluster.check_path(&path)?;
        ensure!(
            outcome.passed(),
            "{name}: {}\n  links over the whole test: {}",
            outcome.failures().join("; "),
            grown_drops(&before_all, &link_drops(&cluster)?)
        );
        let grown = cluster.settled_stats()?.since(&before);
        let delivered = grown.counter(receiver, Counter::XdpRedirectToPod);
        assert!(
            delivered >= PING_COUNT as u64,
            "{name}: {receiver} {} +{delivered}, {} +{}",
            Counter::XdpRedirectToPod.name(),
            Counter::XdpPassToPod.name(),
            grown.counter(receiver, Counter::XdpPassToPod)
        );
    }
    Ok(())
}

#[test]
fn with_xdp_on_every_uplink_the_seed_matrix_passes_forgeries_die_and_restarts_lose_nothing()
-> Result<()> {
    let cluster = Cluster::start(ClusterOptions {
        extra_agent_args: ["--tunnel", "vxlan", "--xdp", "native"]
            .map(String::from)
            .to_vec(),
        // It runs in the 6.12 VM too, where a debug agent restarted under
        // ping load took over 45 s to apply its plan under TCG.
        timeout_factor: 4,
        ..ClusterOptions::default()
    })?;
    // The switch's ports run no XDP program yet: the agents said what that costs.
    let veth_warning = "eth-wan is a veth whose peer cloud-1-wan runs no XDP program";
    let warned = cluster.agent_log("cloud-1")?.matches(veth_warning).count();
    assert_eq!(
        warned,
        1,
        "cloud-1's agent warns once about its veth uplink's peer:\n{}",
        cluster.agent_logs(&["cloud-1".to_owned()])
    );
    make_the_wire_real(&cluster)?;
    for node in ["cloud-1", "edge-1"] {
        let attached = cluster.agent_inspect_table(node, "counters")?;
        assert!(
            attached.contains("xdp_pass"),
            "{node}: `inspect counters` lists the XDP counters:\n{attached}"
        );
    }

    let before_all = link_drops(&cluster)?;
    seed_matrix_passes(&cluster, "with XDP")?;

    // Neighbours are resolved now: the masquerade is XDP's alone, TC's
    // Flannel counters stay put.
    for name in [
        "cloud_pod_reaches_edge_pod_through_flannel_and_connector",
        "edge_pod_reaches_cloud_pod_through_connector_and_flannel",
    ] {
        let path = xdp_seed_matrix()
            .into_iter()
            .find(|p| p.name == name)
            .expect("a seed path");
        let before = cluster.settled_stats()?;
        let outcome = cluster.check_path(&path)?;
        ensure!(
            outcome.passed(),
            "{name}: {}\n  links over the whole test: {}",
            outcome.failures().join("; "),
            grown_drops(&before_all, &link_drops(&cluster)?)
        );
        let grown = cluster.settled_stats()?.since(&before);
        for counter in [Counter::XdpFlannelToTunnel, Counter::XdpTunnelToFlannel] {
            assert!(
                grown.counter("cloud-1", counter) >= PING_COUNT as u64,
                "{name}: cloud-1 {} +{}",
                counter.name(),
                grown.counter("cloud-1", counter)
            );
        }
        for counter in [Counter::FlannelDecap, Counter::FlannelEncap] {
            assert_eq!(
                grown.counter("cloud-1", counter),
                0,
                "{name}: TC's {} moved although XDP does the masquerade",
                counter.name()
            );
        }
        // Each flow's later frames came from the verdict cache (a flow's
        // first frame, and the first after any kernel or map change the
        // agent reports, take the full path).
        ensure!(
            grown.counter("cloud-1", Counter::XdpCached) >= PING_COUNT as u64,
            "{name}: cloud-1 xdp_cached +{} (masqueraded frames: {})",
            grown.counter("cloud-1", Counter::XdpCached),
            grown.counter("cloud-1", Counter::XdpFlannelToTunnel)
                + grown.counter("cloud-1", Counter::XdpTunnelToFlannel)
        );
        println!(
            "{name}: cloud-1 xdp_cached +{} (masqueraded frames: {})",
            grown.counter("cloud-1", Counter::XdpCached),
            grown.counter("cloud-1", Counter::XdpFlannelToTunnel)
                + grown.counter("cloud-1", Counter::XdpTunnelToFlannel)
        );
    }

    // Forged tunnel traffic, injected where the connector's WAN NIC is wired.
    let connector_ns = cluster.node_netns("cloud-1")?;
    let connector_mac = connector_ns.mac("eth-wan")?;
    let connector_wan = cluster
        .spec("cloud-1")?
        .external_ip
        .context("cloud-1's ExternalIP")?;
    let wire = PacketSocket::open(cluster.switch()?, &cluster.wan_port("cloud-1")?)?;
    let target = cluster.pod("cloud-1")?;
    let edge1_wan = cluster
        .spec("edge-1")?
        .external_ip
        .context("edge-1's ExternalIP")?;
    let edge2_pod = cluster.pod("edge-2")?.ip();
    let forge = |outer_src: Ipv4Addr, inner_src: Ipv4Addr| {
        let inner = Frame::eth(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC)
            .ipv4(inner_src, target.ip())
            .udp(40000, ECHO_PORT)
            .payload(b"forged")
            .build();
        vxlan_encap(
            Frame::eth([0x02, 0, 0, 0, 0, 0x66], connector_mac),
            outer_src,
            connector_wan,
            40000,
            DEFAULT_TUNNEL_PORT,
            DEFAULT_TUNNEL_VNI,
            &inner,
        )
    };
    let served = target.requests_served();
    for (what, frame, counter) in [
        (
            "from an address that is no peer",
            forge(Ipv4Addr::new(198, 18, 0, 77), edge2_pod),
            Counter::XdpDropUnknownTunnelSource,
        ),
        (
            "from edge-1 in the name of edge-2's pod",
            forge(edge1_wan, edge2_pod),
            Counter::XdpDropSpoofed,
        ),
    ] {
        let before = cluster
            .counters("cloud-1")?
            .get(counter.name())
            .copied()
            .unwrap_or(0);
        wire.send(&frame)?;
        let dropped = wait_for_counter(&cluster, "cloud-1", counter, before)
            .with_context(|| format!("forged tunnel packet {what}"))?;
        assert_eq!(dropped, 1, "{what}: {} +{dropped}", counter.name());
    }
    assert_eq!(
        target.requests_served(),
        served,
        "a forged datagram reached the cloud-1 pod's echo server"
    );

    // Restarts swap fe_xdp_uplink inside its pinned links: the masquerade
    // never stops, and no ping is lost while both ends' agents restart.
    let before = cluster.settled_stats()?;
    let pings = cluster.restart_agents_under_ping(
        &["cloud-1", "edge-1"],
        cluster.pod("cloud-2")?,
        cluster.pod("edge-1")?.ip(),
    )?;
    eprintln!("restarts with XDP: {}", pings.summary());
    let sent = pings.sent();
    ensure!(
        sent > 0 && pings.lost() == 0,
        "pings were lost while the agents of cloud-1 and edge-1 restarted with XDP: {}\n{}",
        pings.summary(),
        cluster.diagnostics(&["cloud-1".to_owned(), "edge-1".to_owned()])
    );
    assert_eq!(
        cluster.agent_log("cloud-1")?.matches(veth_warning).count(),
        warned,
        "with XDP on the switch's ports the restarted agent has nothing to warn about"
    );
    let grown = cluster.settled_stats()?.since(&before);
    assert!(
        grown.counter("cloud-1", Counter::XdpFlannelToTunnel) >= sent as u64
            && grown.counter("cloud-1", Counter::XdpTunnelToFlannel) >= sent as u64,
        "XDP did not carry the pings across the restarts: {:?}",
        grown.nodes.get("cloud-1").map(|n| &n.counters)
    );
    Ok(())
}
