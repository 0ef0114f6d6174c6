//! ClusterIP translation in the kernel programs, proven with
//! BPF_PROG_TEST_RUN: frames in; verdict, exact addresses, ports and valid
//! checksums, conntrack entries and counters out. Needs root.

use std::{collections::BTreeSet, net::Ipv4Addr};

use anyhow::Result;
use fabedge_agent::datapath::Program;
use fabedge_common::{
    Counter,
    services::{
        Backend, BackendKey, CtKey, ServiceEntry, ServiceKey, backend_flags, ct_flags,
        service_flags,
    },
    tunnel_mode,
};
use fabedge_tests::{
    datapath::{Outcome, TC_ACT_OK, TC_ACT_REDIRECT, TestDatapath, fixtures::*},
    packet::{Frame, TcpFlags, UdpChecksum, icmp_type, parse_eth},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const TCP: u8 = 6;
const UDP: u8 = 17;

fn remote(addr: Ipv4Addr, port: u16) -> Backend {
    Backend {
        addr: addr.octets(),
        port,
        flags: 0,
        _pad: 0,
    }
}

fn local(addr: Ipv4Addr, port: u16) -> Backend {
    Backend {
        addr: addr.octets(),
        port,
        flags: backend_flags::LOCAL,
        _pad: 0,
    }
}

/// Program frontend `VIP:port/proto` (id `id`) with `backends`, as apply would.
fn frontend(
    dp: &mut TestDatapath,
    id: u32,
    port: u16,
    proto: u8,
    flags: u8,
    backends: &[Backend],
) -> Result<()> {
    let maps = &mut dp.maps;
    for (slot, backend) in backends.iter().enumerate() {
        maps.backends.insert(
            BackendKey {
                service_id: id,
                slot: slot as u32,
            },
            *backend,
            0,
        )?;
    }
    let entry = ServiceEntry {
        id,
        count: backends.len() as u16,
        flags,
        _pad: 0,
        affinity_timeout: 60,
    };
    maps.services.insert(
        ServiceKey {
            addr: VIP.octets(),
            port,
            proto,
            _pad: 0,
        },
        entry,
        0,
    )?;
    Ok(())
}

fn tcp_frame(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: TcpFlags) -> Vec<u8> {
    Frame::eth(POD_MAC, BRIDGE_MAC)
        .ipv4(src.0, dst.0)
        .ttl(64)
        .tcp(src.1, dst.1)
        .seq(1000)
        .flags(flags)
        .payload(b"hello")
        .build()
}

fn udp_frame(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    Frame::eth(POD_MAC, BRIDGE_MAC)
        .ipv4(src.0, dst.0)
        .ttl(64)
        .udp(src.1, dst.1)
        .payload(b"query?")
        .build()
}

/// (source, destination) of a frame's TCP or UDP packet, with every checksum checked.
fn endpoints(out: &Outcome) -> ((Ipv4Addr, u16), (Ipv4Addr, u16)) {
    let ip = parse_eth(&out.data)
        .and_then(|e| e.ipv4())
        .expect("an IPv4 frame");
    assert!(ip.checksum_valid, "IPv4 header checksum");
    let (sport, dport) = match ip.protocol {
        TCP => {
            let tcp = ip.tcp().expect("TCP");
            assert!(tcp.checksum_valid, "TCP checksum");
            (tcp.src_port, tcp.dst_port)
        }
        UDP => {
            let udp = ip.udp().expect("UDP");
            assert_eq!(udp.checksum_status, UdpChecksum::Valid, "UDP checksum");
            (udp.src_port, udp.dst_port)
        }
        other => panic!("protocol {other}"),
    };
    ((ip.src, sport), (ip.dst, dport))
}

fn ct_key(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), proto: u8) -> CtKey {
    CtKey {
        saddr: src.0.octets(),
        daddr: dst.0.octets(),
        sport: src.1,
        dport: dst.1,
        proto,
        _pad: [0; 3],
    }
}

#[test]
fn tcp_to_cluster_ip_is_dnat_to_a_remote_backend_and_the_reply_gets_the_service_address_back()
-> Result<()> {
    let mut dp = edge("lb-tcp", tunnel_mode::VXLAN)?;
    frontend(&mut dp, 1, 80, TCP, 0, &[remote(PEER_POD, 8080)])?;
    let client = (LOCAL_POD, 40000);

    let syn = tcp_frame(client, (VIP, 80), TcpFlags::SYN);
    let out = dp.run(Program::FromPod, &syn)?;
    assert_eq!(
        out.action, TC_ACT_REDIRECT,
        "into the tunnel toward the backend's node"
    );
    assert_eq!(endpoints(&out), (client, (PEER_POD, 8080)));
    assert_eq!(out.data.len(), syn.len());
    assert_eq!(dp.counter(Counter::ServiceNewFlow), 1);

    let forward = dp.maps.ct.get(&ct_key(client, (VIP, 80), TCP), 0)?;
    assert_eq!(
        (forward.addr, forward.port, forward.flags),
        (PEER_POD.octets(), 8080, ct_flags::FORWARD)
    );
    let reply = dp.maps.ct.get(&ct_key((PEER_POD, 8080), client, TCP), 0)?;
    assert_eq!(
        (reply.addr, reply.port, reply.flags & ct_flags::REPLY),
        (VIP.octets(), 80, ct_flags::REPLY)
    );

    // The backend's SYN-ACK, routed toward the bridge.
    let synack = tcp_frame((PEER_POD, 8080), client, TcpFlags::SYN | TcpFlags::ACK);
    let out = dp.run(Program::ToPod, &synack)?;
    assert_eq!(out.action, TC_ACT_OK);
    assert_eq!(endpoints(&out), ((VIP, 80), client));

    // The rest of the flow follows the same entry, without a new choice.
    let out = dp.run(
        Program::FromPod,
        &tcp_frame(client, (VIP, 80), TcpFlags::ACK),
    )?;
    assert_eq!(endpoints(&out), (client, (PEER_POD, 8080)));
    assert_eq!(dp.counter(Counter::ServiceNewFlow), 1);
    assert_eq!(dp.counter(Counter::ServiceTranslated), 3);
    Ok(())
}

#[test]
fn udp_to_cluster_ip_is_translated_both_ways_with_valid_checksums() -> Result<()> {
    let mut dp = edge("lb-udp", tunnel_mode::VXLAN)?;
    frontend(&mut dp, 7, 53, UDP, 0, &[remote(CLOUD_POD, 5353)])?;
    let client = (LOCAL_POD, 33333);
    let out = dp.run(Program::FromPod, &udp_frame(client, (VIP, 53)))?;
    assert_eq!(out.action, TC_ACT_REDIRECT);
    assert_eq!(endpoints(&out), (client, (CLOUD_POD, 5353)));
    let out = dp.run(Program::ToPod, &udp_frame((CLOUD_POD, 5353), client))?;
    assert_eq!(endpoints(&out), ((VIP, 53), client));
    Ok(())
}

#[test]
fn udp_without_checksum_keeps_none_after_translation() -> Result<()> {
    let mut dp = edge("lb-udp0", tunnel_mode::VXLAN)?;
    frontend(&mut dp, 7, 53, UDP, 0, &[remote(CLOUD_POD, 5353)])?;
    let frame = Frame::eth(POD_MAC, BRIDGE_MAC)
        .ipv4(LOCAL_POD, VIP)
        .udp(1234, 53)
        .zero_checksum()
        .payload(b"x")
        .build();
    let out = dp.run(Program::FromPod, &frame)?;
    let ip = parse_eth(&out.data)?.ipv4()?;
    assert_eq!(ip.dst, CLOUD_POD);
    assert!(ip.checksum_valid);
    assert_eq!(
        ip.udp()?.checksum_status,
        UdpChecksum::Absent,
        "0 means no checksum and must stay 0"
    );
    Ok(())
}

#[test]
fn a_local_backend_sees_the_cluster_ip_as_client_and_its_reply_is_translated_at_the_bridge_ingress()
-> Result<()> {
    let mut dp = edge("lb-local", tunnel_mode::VXLAN)?;
    frontend(&mut dp, 2, 80, TCP, 0, &[local(LOCAL_POD_2, 8080)])?;
    let client = (LOCAL_POD, 40001);
    let out = dp.run(
        Program::FromPod,
        &tcp_frame(client, (VIP, 80), TcpFlags::SYN),
    )?;
    assert_eq!(
        out.action, TC_ACT_OK,
        "left to the kernel, which delivers over the bridge"
    );
    // The client's own port is kept when it is free.
    assert_eq!(endpoints(&out), ((VIP, 40001), (LOCAL_POD_2, 8080)));

    let out = dp.run(
        Program::FromPod,
        &tcp_frame(
            (LOCAL_POD_2, 8080),
            (VIP, 40001),
            TcpFlags::SYN | TcpFlags::ACK,
        ),
    )?;
    assert_eq!(out.action, TC_ACT_OK);
    assert_eq!(endpoints(&out), ((VIP, 80), client));
    Ok(())
}

#[test]
fn hairpin_a_pod_reaching_its_own_service_gets_its_own_reply() -> Result<()> {
    let mut dp = edge("lb-hairpin", tunnel_mode::VXLAN)?;
    frontend(&mut dp, 3, 80, TCP, 0, &[local(LOCAL_POD, 8080)])?;
    let client = (LOCAL_POD, 40002);
    let out = dp.run(
        Program::FromPod,
        &tcp_frame(client, (VIP, 80), TcpFlags::SYN),
    )?;
    // Source rewritten: the pod would drop a packet from its own address,
    // and the node one from its own (the gateway's).
    assert_eq!(endpoints(&out), ((VIP, 40002), (LOCAL_POD, 8080)));
    let out = dp.run(
        Program::FromPod,
        &tcp_frame(
            (LOCAL_POD, 8080),
            (VIP, 40002),
            TcpFlags::SYN | TcpFlags::ACK,
        ),
    )?;
    assert_eq!(endpoints(&out), ((VIP, 80), client));
    Ok(())
}

#[test]
fn two_clients_with_the_same_port_to_one_local_backend_get_distinct_source_ports() -> Result<()> {
    let mut dp = edge("lb-snatport", tunnel_mode::VXLAN)?;
    frontend(&mut dp, 4, 80, TCP, 0, &[local(LOCAL_POD_2, 8080)])?;
    let first = dp.run(
        Program::FromPod,
        &tcp_frame((LOCAL_POD, 5000), (VIP, 80), TcpFlags::SYN),
    )?;
    let other_client = Ipv4Addr::new(10, 234, 1, 9);
    let second = dp.run(
        Program::FromPod,
        &tcp_frame((other_client, 5000), (VIP, 80), TcpFlags::SYN),
    )?;
    let (first_src, _) = endpoints(&first);
    let (second_src, _) = endpoints(&second);
    assert_eq!(first_src, (VIP, 5000));
    assert_eq!(second_src.0, VIP);
    assert_ne!(
        second_src.1, 5000,
        "the reply tuple at the ClusterIP must stay unique"
    );
    let out = dp.run(
        Program::FromPod,
        &tcp_frame((LOCAL_POD_2, 8080), second_src, TcpFlags::ACK),
    )?;
    assert_eq!(endpoints(&out), ((VIP, 80), (other_client, 5000)));
    Ok(())
}

#[test]
fn a_service_without_endpoints_answers_tcp_with_rst_from_the_service_address() -> Result<()> {
    let mut dp = edge("lb-rst", tunnel_mode::VXLAN)?;
    frontend(&mut dp, 5, 80, TCP, 0, &[])?;
    let client = (LOCAL_POD, 40003);
    let syn = Frame::eth(POD_MAC, BRIDGE_MAC)
        .ipv4(LOCAL_POD, VIP)
        .tcp(40003, 80)
        .seq(1000)
        .flags(TcpFlags::SYN)
        .build();
    let out = dp.run(Program::FromPod, &syn)?;
    assert_eq!(out.action, TC_ACT_REDIRECT, "sent back out of the bridge");
    let eth = parse_eth(&out.data)?;
    assert_eq!((eth.src, eth.dst), (BRIDGE_MAC, POD_MAC));
    assert_eq!(endpoints(&out), ((VIP, 80), client));
    let tcp = eth.ipv4()?.tcp()?;
    assert_eq!(tcp.flags, TcpFlags::RST | TcpFlags::ACK);
    assert_eq!((tcp.seq, tcp.ack), (0, 1001), "acknowledges the SYN");
    assert_eq!(dp.counter(Counter::ServiceRejected), 1);
    Ok(())
}

#[test]
fn a_service_without_endpoints_answers_udp_with_port_unreachable_quoting_the_datagram() -> Result<()>
{
    let mut dp = edge("lb-unreach", tunnel_mode::VXLAN)?;
    frontend(&mut dp, 6, 53, UDP, 0, &[])?;
    let frame = udp_frame((LOCAL_POD, 40004), (VIP, 53));
    let out = dp.run(Program::FromPod, &frame)?;
    assert_eq!(out.action, TC_ACT_REDIRECT);
    let ip = parse_eth(&out.data)?.ipv4()?;
    assert!(ip.checksum_valid);
    assert_eq!((ip.src, ip.dst), (VIP, LOCAL_POD));
    let icmp = ip.icmp()?;
    assert!(icmp.checksum_valid, "ICMP checksum");
    assert_eq!(
        (icmp.icmp_type, icmp.code),
        (icmp_type::DEST_UNREACHABLE, 3)
    );
    assert_eq!(
        icmp.body,
        &frame[14..14 + 28],
        "quotes the IPv4 header and 8 bytes"
    );
    assert_eq!(dp.counter(Counter::ServiceRejected), 1);
    Ok(())
}

#[test]
fn new_flows_spread_over_backends_and_each_flow_sticks_to_its_choice() -> Result<()> {
    let mut dp = edge("lb-spread", tunnel_mode::VXLAN)?;
    frontend(
        &mut dp,
        8,
        80,
        TCP,
        0,
        &[remote(PEER_POD, 8080), remote(CLOUD_POD, 8080)],
    )?;
    let mut chosen = BTreeSet::new();
    for port in 0..32u16 {
        let client = (LOCAL_POD, 20000 + port);
        let (_, first) = endpoints(&dp.run(
            Program::FromPod,
            &tcp_frame(client, (VIP, 80), TcpFlags::SYN),
        )?);
        let (_, again) = endpoints(&dp.run(
            Program::FromPod,
            &tcp_frame(client, (VIP, 80), TcpFlags::ACK),
        )?);
        assert_eq!(first, again, "a flow never changes backend");
        chosen.insert(first.0);
    }
    // Random choice: all 32 flows on one backend has probability 2^-31.
    assert_eq!(chosen, BTreeSet::from([PEER_POD, CLOUD_POD]));
    Ok(())
}

#[test]
fn session_affinity_keeps_a_client_on_one_backend_across_flows() -> Result<()> {
    let mut dp = edge("lb-affinity", tunnel_mode::VXLAN)?;
    frontend(
        &mut dp,
        9,
        80,
        TCP,
        service_flags::AFFINITY,
        &[remote(PEER_POD, 8080), remote(CLOUD_POD, 8080)],
    )?;
    let mut chosen = BTreeSet::new();
    for port in 0..16u16 {
        let out = dp.run(
            Program::FromPod,
            &tcp_frame((LOCAL_POD, 30000 + port), (VIP, 80), TcpFlags::SYN),
        )?;
        chosen.insert(endpoints(&out).1);
    }
    assert_eq!(
        chosen.len(),
        1,
        "every flow of the client went to {chosen:?}"
    );
    Ok(())
}

#[test]
fn packets_to_other_destinations_and_other_ports_are_untouched() -> Result<()> {
    let mut dp = edge("lb-other", tunnel_mode::VXLAN)?;
    frontend(&mut dp, 10, 80, TCP, 0, &[remote(PEER_POD, 8080)])?;
    let frame = udp_frame((LOCAL_POD, 1234), (LOCAL_POD_2, 80));
    let out = dp.run(Program::FromPod, &frame)?;
    assert_eq!((out.action, &out.data), (TC_ACT_OK, &frame));
    // The ClusterIP on a port it does not serve: not translated (routed as is).
    let frame = tcp_frame((LOCAL_POD, 1234), (VIP, 81), TcpFlags::SYN);
    dp.run(Program::FromPod, &frame)?;
    assert_eq!(dp.counter(Counter::ServiceTranslated), 0);
    // Egress toward pods: only replies of known flows change.
    let frame = tcp_frame((PEER_POD, 8080), (LOCAL_POD, 1), TcpFlags::ACK);
    let out = dp.run(Program::ToPod, &frame)?;
    assert_eq!((out.action, &out.data), (TC_ACT_OK, &frame));
    Ok(())
}

fn plan_with(backends: &[Backend]) -> fabedge_agent::services::plan::ServicePlan {
    use fabedge_agent::services::plan::{Frontend, ServicePlan};
    let mut plan = ServicePlan::default();
    plan.frontends.insert(
        ServiceKey {
            addr: VIP.octets(),
            port: 80,
            proto: TCP,
            _pad: 0,
        },
        Frontend {
            name: "default/web:http".into(),
            entry: ServiceEntry {
                id: 1,
                count: backends.len() as u16,
                flags: 0,
                _pad: 0,
                affinity_timeout: 0,
            },
            backends: backends.to_vec(),
        },
    );
    plan
}

#[test]
fn removing_a_backend_deletes_its_flows_and_keeps_the_others() -> Result<()> {
    use fabedge_agent::services::apply::apply_services;
    let mut dp = edge("lb-remove", tunnel_mode::VXLAN)?;
    let report = apply_services(
        &mut dp.maps,
        &plan_with(&[remote(PEER_POD, 8080), remote(CLOUD_POD, 8080)]),
    )?;
    assert_eq!((report.frontends_written, report.backends_written), (1, 2));
    // Open flows until both backends carry one.
    let mut flows = std::collections::BTreeMap::new();
    for port in 0..32u16 {
        let client = (LOCAL_POD, 21000 + port);
        let (_, backend) = endpoints(&dp.run(
            Program::FromPod,
            &tcp_frame(client, (VIP, 80), TcpFlags::SYN),
        )?);
        flows.entry(backend.0).or_insert(client);
    }
    assert_eq!(flows.len(), 2);
    let report = apply_services(&mut dp.maps, &plan_with(&[remote(CLOUD_POD, 8080)]))?;
    assert_eq!(report.backends_removed, 1);
    assert!(
        report.flows_purged >= 2,
        "both directions of the flows to the removed backend: {report:?}"
    );
    let doomed = flows[&PEER_POD];
    let kept = flows[&CLOUD_POD];
    assert!(dp.maps.ct.get(&ct_key(doomed, (VIP, 80), TCP), 0).is_err());
    assert!(
        dp.maps
            .ct
            .get(&ct_key((PEER_POD, 8080), doomed, TCP), 0)
            .is_err()
    );
    let kept_entry = dp.maps.ct.get(&ct_key(kept, (VIP, 80), TCP), 0)?;
    assert_eq!(kept_entry.addr, CLOUD_POD.octets());
    // The next packet of the doomed flow is balanced again, to a live backend.
    let (_, backend) = endpoints(&dp.run(
        Program::FromPod,
        &tcp_frame(doomed, (VIP, 80), TcpFlags::ACK),
    )?);
    assert_eq!(backend, (CLOUD_POD, 8080));
    // Re-applying the same plan changes nothing.
    let again = apply_services(&mut dp.maps, &plan_with(&[remote(CLOUD_POD, 8080)]))?;
    assert_eq!(again.changes(), 0, "{again:?}");
    Ok(())
}

#[test]
fn conntrack_gc_expires_closed_tcp_flows_quickly_and_keeps_open_ones() -> Result<()> {
    use fabedge_agent::services::ctgc;
    let mut dp = edge("lb-gc", tunnel_mode::VXLAN)?;
    frontend(&mut dp, 1, 80, TCP, 0, &[remote(PEER_POD, 8080)])?;
    let (open, closed) = ((LOCAL_POD, 22001), (LOCAL_POD, 22002));
    for client in [open, closed] {
        dp.run(
            Program::FromPod,
            &tcp_frame(client, (VIP, 80), TcpFlags::SYN),
        )?;
        dp.run(
            Program::ToPod,
            &tcp_frame((PEER_POD, 8080), client, TcpFlags::SYN | TcpFlags::ACK),
        )?;
    }
    dp.run(
        Program::FromPod,
        &tcp_frame(closed, (VIP, 80), TcpFlags::FIN | TcpFlags::ACK),
    )?;
    assert_eq!(dp.maps.ct_entries()?.len(), 4);
    // A minute later: the closed flow is gone (both entries), the open one stays.
    let later = ctgc::monotonic_ns() + 60_000_000_000;
    let report = ctgc::collect(&mut dp.maps, later, |_| 0)?;
    assert_eq!(report.ct_expired, 2);
    assert!(dp.maps.ct.get(&ct_key(open, (VIP, 80), TCP), 0).is_ok());
    assert!(dp.maps.ct.get(&ct_key(closed, (VIP, 80), TCP), 0).is_err());
    assert!(
        dp.maps
            .ct
            .get(&ct_key((PEER_POD, 8080), closed, TCP), 0)
            .is_err()
    );
    Ok(())
}

/// The IPv4 packet inside a frame (bytes after the Ethernet header).
fn ip_bytes(frame: &[u8]) -> &[u8] {
    &frame[14..]
}

#[test]
fn port_unreachable_from_a_remote_backend_reaches_the_client_as_if_from_the_service() -> Result<()>
{
    use fabedge_tests::packet::{IcmpError, parse_quoted_ipv4};
    let mut dp = edge("lb-icmp", tunnel_mode::VXLAN)?;
    frontend(&mut dp, 11, 53, UDP, 0, &[remote(PEER_POD, 5353)])?;
    let client = (LOCAL_POD, 34567);
    let out = dp.run(Program::FromPod, &udp_frame(client, (VIP, 53)))?;
    let seen_by_backend = out.data.clone();
    // The backend's node answers: nothing listens on 5353.
    let error = Frame::eth(BRIDGE_MAC, POD_MAC)
        .ipv4(PEER_POD, LOCAL_POD)
        .icmp_error(IcmpError::PortUnreachable, ip_bytes(&seen_by_backend))
        .build();
    let out = dp.run(Program::ToPod, &error)?;
    assert_eq!(out.action, TC_ACT_OK);
    let ip = parse_eth(&out.data)?.ipv4()?;
    assert!(ip.checksum_valid, "outer IPv4 checksum");
    assert_eq!(
        (ip.src, ip.dst),
        (VIP, LOCAL_POD),
        "from the Service address"
    );
    let icmp = ip.icmp()?;
    assert!(icmp.checksum_valid, "ICMP checksum");
    let quoted = parse_quoted_ipv4(icmp.body)?;
    assert!(quoted.checksum_valid, "quoted IPv4 checksum");
    assert_eq!(
        (quoted.src, quoted.dst),
        (LOCAL_POD, VIP),
        "quotes what the client sent"
    );
    assert_eq!(
        &quoted.payload[..4],
        &[0x87, 0x07, 0, 53],
        "ports 34567 → 53"
    );
    Ok(())
}

#[test]
fn icmp_error_from_a_local_backend_is_translated_back_for_the_snated_client() -> Result<()> {
    use fabedge_tests::packet::{IcmpError, parse_quoted_ipv4};
    let mut dp = edge("lb-icmp-local", tunnel_mode::VXLAN)?;
    frontend(&mut dp, 12, 53, UDP, 0, &[local(LOCAL_POD_2, 5353)])?;
    let client = (LOCAL_POD, 34568);
    let out = dp.run(Program::FromPod, &udp_frame(client, (VIP, 53)))?;
    assert_eq!(endpoints(&out), ((VIP, 34568), (LOCAL_POD_2, 5353)));
    let error = Frame::eth(POD_MAC, BRIDGE_MAC)
        .ipv4(LOCAL_POD_2, VIP)
        .icmp_error(IcmpError::PortUnreachable, ip_bytes(&out.data))
        .build();
    let out = dp.run(Program::FromPod, &error)?;
    assert_eq!(
        out.action, TC_ACT_OK,
        "routed to the client like any local delivery"
    );
    let ip = parse_eth(&out.data)?.ipv4()?;
    assert!(ip.checksum_valid);
    assert_eq!((ip.src, ip.dst), (VIP, LOCAL_POD));
    let icmp = ip.icmp()?;
    assert!(icmp.checksum_valid, "ICMP checksum");
    let quoted = parse_quoted_ipv4(icmp.body)?;
    assert!(quoted.checksum_valid);
    assert_eq!((quoted.src, quoted.dst), (LOCAL_POD, VIP));
    assert_eq!(&quoted.payload[..4], &[0x87, 0x08, 0, 53]);
    Ok(())
}

#[test]
fn icmp_errors_about_other_flows_are_untouched() -> Result<()> {
    use fabedge_tests::packet::IcmpError;
    let dp = edge("lb-icmp-other", tunnel_mode::VXLAN)?;
    let original = Frame::ipv4(LOCAL_POD, PEER_POD)
        .udp(1000, 2000)
        .payload(b"x")
        .build();
    let error = Frame::eth(BRIDGE_MAC, POD_MAC)
        .ipv4(PEER_POD, LOCAL_POD)
        .icmp_error(IcmpError::PortUnreachable, &original)
        .build();
    let out = dp.run(Program::ToPod, &error)?;
    assert_eq!((out.action, out.data), (TC_ACT_OK, error));
    Ok(())
}

#[test]
fn conntrack_capacity_follows_the_flag_and_a_pinned_table_of_another_size_is_refused_with_the_fix()
-> Result<()> {
    use fabedge_agent::datapath::{self, AttachMode, Datapath, PinLayout};
    let root = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/fabedge-test-{}-ct-size",
        std::process::id()
    ));
    let layout = PinLayout::new(&root);
    let result = (|| -> Result<()> {
        let dp = Datapath::load_with_ct_entries(layout.clone(), AttachMode::Auto, 1024)?;
        let info = aya::maps::MapInfo::from_pin(layout.map("FE_CT"))?;
        assert_eq!(info.max_entries(), 1024);
        drop(dp);
        let err = match Datapath::load_with_ct_entries(layout.clone(), AttachMode::Auto, 2048) {
            Ok(_) => anyhow::bail!("a pinned FE_CT of 1024 entries was adopted as 2048"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains("FE_CT") && err.contains("uninstall"), "{err}");
        Ok(())
    })();
    datapath::uninstall(&root)?;
    result
}

#[test]
fn services_left_out_of_full_maps_are_counted_for_inspect() -> Result<()> {
    use fabedge_agent::services::apply::apply_services;
    let mut dp = edge("lb-full", tunnel_mode::VXLAN)?;
    let mut plan = plan_with(&[remote(PEER_POD, 8080)]);
    plan.skipped
        .push(fabedge_agent::model::checks::Problem::new(
            "Service default/big",
            "is not programmed: ...",
        ));
    apply_services(&mut dp.maps, &plan)?;
    assert_eq!(dp.counter(Counter::ServicesNotProgrammed), 1);
    assert_eq!(
        dp.maps.service_entries()?.len(),
        1,
        "the Service that fits is programmed"
    );
    plan.skipped.clear();
    apply_services(&mut dp.maps, &plan)?;
    assert_eq!(dp.counter(Counter::ServicesNotProgrammed), 0);
    Ok(())
}

/// The cgroup v2 mount (`/sys/fs/cgroup/unified` on hybrid hosts).
fn cgroup2_root() -> Option<std::path::PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .ok()?
        .lines()
        .find_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            after
                .starts_with("cgroup2 ")
                .then(|| before.split(' ').nth(4).map(std::path::PathBuf::from))
                .flatten()
        })
}

#[test]
fn socket_programs_attach_to_the_given_cgroup_and_uninstall_removes_them() -> Result<()> {
    use fabedge_agent::datapath::{self, AttachMode, Datapath, PinLayout, SOCK_PROGRAMS};
    let Some(root) = cgroup2_root() else {
        panic!("no cgroup2 mount on this host: the hostNetwork Service programs cannot be tested");
    };
    let cgroup = root.join(format!("fabedge-test-{}-sock", std::process::id()));
    std::fs::create_dir_all(&cgroup)?;
    let bpffs = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/fabedge-test-{}-sock",
        std::process::id()
    ));
    let layout = PinLayout::new(&bpffs);
    let attached = |cg: &std::path::Path| -> Result<String> {
        let out = std::process::Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(cg)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let result = (|| -> Result<()> {
        let mut dp = Datapath::load(layout.clone(), AttachMode::Auto)?;
        dp.attach_cgroup(&cgroup)?;
        // A restart attaches again: the pinned links are replaced, not doubled.
        dp.attach_cgroup(&cgroup)?;
        drop(dp);
        let shown = attached(&cgroup)?;
        for symbol in SOCK_PROGRAMS {
            assert!(
                layout.links_dir().join(format!("{symbol}@cgroup")).exists(),
                "{symbol} link pinned"
            );
            // bpftool prints program names truncated to 15 bytes.
            assert_eq!(
                shown.matches(&symbol[..15]).count(),
                1,
                "{symbol} attached once (after the agent exited):\n{shown}"
            );
        }
        datapath::uninstall(&bpffs)?;
        let shown = attached(&cgroup)?;
        assert!(
            !shown.contains("fe_sock"),
            "uninstall left programs on the cgroup:\n{shown}"
        );
        // And a directory that is not cgroup v2 is refused with the fix.
        let mut dp = Datapath::load(layout.clone(), AttachMode::Auto)?;
        let err = format!(
            "{:#}",
            dp.attach_cgroup(std::path::Path::new("/tmp")).unwrap_err()
        );
        assert!(
            err.contains("not a cgroup v2 directory") && err.contains("--no-cgroup"),
            "{err}"
        );
        Ok(())
    })();
    let _ = datapath::uninstall(&bpffs);
    let _ = std::fs::remove_dir(&cgroup);
    result
}

/// With FE_SERVICES full, one Service is deleted and another added in the
/// same change: the swap applies (the freed frontend goes before anything is
/// written), and the new Service's backends, written under the freed id,
/// are never what the deleted ClusterIP points at — it no longer exists.
#[test]
fn a_full_service_map_swaps_one_service_for_another_without_cross_wiring() -> Result<()> {
    use fabedge_agent::services::{
        apply::apply_services,
        plan::{Frontend, ServicePlan},
    };
    use fabedge_common::services::MAX_SERVICES;
    let mut dp = edge("lb-full-swap", tunnel_mode::VXLAN)?;
    let vip = |n: u32| Ipv4Addr::from(0x0a60_0000 + 0x100 + n);
    let frontend = |n: u32, backend: Ipv4Addr| {
        (
            ServiceKey {
                addr: vip(n).octets(),
                port: 80,
                proto: TCP,
                _pad: 0,
            },
            Frontend {
                name: format!("default/svc-{n}:http"),
                entry: ServiceEntry {
                    id: 0,
                    count: 1,
                    flags: 0,
                    _pad: 0,
                    affinity_timeout: 0,
                },
                backends: vec![remote(backend, 8080)],
            },
        )
    };
    let mut full = ServicePlan::default();
    for n in 0..MAX_SERVICES {
        let (key, f) = frontend(n, PEER_POD);
        full.frontends.insert(key, f);
    }
    let report = apply_services(&mut dp.maps, &full)?;
    assert_eq!(report.frontends_written, MAX_SERVICES as usize);

    // svc-0 goes, svc-new (backend CLOUD_POD) comes: the map stays full.
    let mut swapped = full.clone();
    let (gone, _) = frontend(0, PEER_POD);
    swapped.frontends.remove(&gone);
    let (new_key, new_frontend) = frontend(MAX_SERVICES, CLOUD_POD);
    swapped.frontends.insert(new_key, new_frontend);
    let report = apply_services(&mut dp.maps, &swapped)?;
    assert_eq!((report.frontends_removed, report.frontends_written), (1, 1));

    let services: std::collections::BTreeMap<_, _> =
        dp.maps.service_entries()?.into_iter().collect();
    assert!(
        !services.contains_key(&gone),
        "the deleted ClusterIP is still programmed"
    );
    let new_entry = services[&new_key];
    let backends: std::collections::BTreeMap<_, _> =
        dp.maps.backend_entries()?.into_iter().collect();
    let slot0 = fabedge_common::services::BackendKey {
        service_id: new_entry.id,
        slot: 0,
    };
    assert_eq!(backends[&slot0].addr, CLOUD_POD.octets());
    // Every other frontend still points at its own (PEER_POD) backend.
    for (key, entry) in &services {
        let backend = backends[&fabedge_common::services::BackendKey {
            service_id: entry.id,
            slot: 0,
        }];
        let want = if *key == new_key { CLOUD_POD } else { PEER_POD };
        assert_eq!(backend.addr, want.octets(), "{key:?} → {backend:?}");
    }
    Ok(())
}
