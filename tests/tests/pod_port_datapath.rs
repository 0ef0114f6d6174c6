//! `fe_pod_port` (TC ingress of a pod's veth on the pod bridge), proven with
//! BPF_PROG_TEST_RUN: a pod sends IPv4 only from its own address and claims
//! no other address in ARP, whoever the frame is for (a neighbour pod on the
//! bridge never passes `fe_from_pod`); every such frame is dropped and
//! counted once under `drop_pod_spoofed`. A port the agent has not learned
//! passes everything. Needs root.

use std::net::Ipv4Addr;

use anyhow::Result;
use fabedge_agent::datapath::Program;
use fabedge_common::{Counter, PodPortEntry};
use fabedge_tests::{
    datapath::{self, TEST_RUN_IFINDEX, TestDatapath, fixtures::*},
    packet::{Frame, Mac, ethertype, truncated, with_ipv4_ihl},
};

const NEIGHBOUR_MAC: Mac = [0x0a, 0, 0, 0, 0, 0x03];
const BROADCAST: Mac = [0xff; 6];

/// An edge whose test port is the pod `LOCAL_POD`'s.
fn edge_with_port(name: &str) -> Result<TestDatapath> {
    let mut dp = edge(name, fabedge_common::tunnel_mode::VXLAN)?;
    dp.maps.pod_ports.insert(
        TEST_RUN_IFINDEX,
        PodPortEntry {
            addr: LOCAL_POD.octets(),
        },
        0,
    )?;
    Ok(dp)
}

fn udp_from(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    Frame::eth(POD_MAC, NEIGHBOUR_MAC)
        .ipv4(src, dst)
        .udp(40000, 8080)
        .payload(b"as whom?")
        .build()
}

/// A gratuitous ARP (request or reply) in which the pod claims `addr`.
fn gratuitous_arp(op: u16, addr: Ipv4Addr) -> Vec<u8> {
    Frame::eth(POD_MAC, BROADCAST)
        .arp(op, (POD_MAC, addr), (BROADCAST, addr))
        .build()
}

fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    Frame::eth(POD_MAC, BROADCAST)
        .arp(1, (POD_MAC, sender), ([0; 6], target))
        .build()
}

fn assert_dropped(dp: &TestDatapath, frame: &[u8], counter: Counter, what: &str) {
    datapath::assert_dropped(dp, Program::PodPort, frame, counter, what);
}

fn assert_untouched(dp: &TestDatapath, frame: &[u8], what: &str) {
    datapath::assert_untouched(dp, Program::PodPort, frame, what);
}

#[test]
fn a_pod_sends_ipv4_only_from_its_own_address() -> Result<()> {
    let dp = edge_with_port("podport-ipv4")?;
    for (what, dst) in [
        ("a neighbour pod", LOCAL_POD_2),
        ("a peer's pod", PEER_POD),
        ("a cloud pod", CLOUD_POD),
        ("the node", NODE_IP),
        ("the internet", UNKNOWN),
    ] {
        assert_untouched(
            &dp,
            &udp_from(LOCAL_POD, dst),
            &format!("as itself to {what}"),
        );
    }
    for (what, src) in [
        ("the neighbour pod", LOCAL_POD_2),
        ("the node", NODE_IP),
        ("a peer's pod", PEER_POD),
        ("a stranger", UNKNOWN),
        ("0.0.0.0", Ipv4Addr::UNSPECIFIED),
    ] {
        for (to, dst) in [("the neighbour", LOCAL_POD_2), ("a peer's pod", PEER_POD)] {
            assert_dropped(
                &dp,
                &udp_from(src, dst),
                Counter::DropPodSpoofed,
                &format!("as {what} to {to}"),
            );
        }
    }
    Ok(())
}

#[test]
fn a_pod_claims_no_other_address_in_arp() -> Result<()> {
    let dp = edge_with_port("podport-arp")?;
    assert_untouched(
        &dp,
        &arp_request(LOCAL_POD, LOCAL_POD_2),
        "who-has from itself",
    );
    assert_untouched(
        &dp,
        &gratuitous_arp(1, LOCAL_POD),
        "gratuitous ARP for itself",
    );
    assert_untouched(
        &dp,
        &arp_request(Ipv4Addr::UNSPECIFIED, LOCAL_POD),
        "an address probe (sender 0.0.0.0)",
    );
    let reply_as_neighbour = Frame::eth(POD_MAC, BRIDGE_MAC)
        .arp(2, (POD_MAC, LOCAL_POD_2), (BRIDGE_MAC, NODE_IP))
        .build();
    for (what, frame) in [
        (
            "gratuitous request for the neighbour",
            gratuitous_arp(1, LOCAL_POD_2),
        ),
        (
            "gratuitous reply for the neighbour",
            gratuitous_arp(2, LOCAL_POD_2),
        ),
        ("reply to the node as the neighbour", reply_as_neighbour),
        ("who-has as the node", arp_request(NODE_IP, LOCAL_POD_2)),
    ] {
        assert_dropped(&dp, &frame, Counter::DropPodSpoofed, what);
    }
    let claim = gratuitous_arp(2, LOCAL_POD_2);
    assert_dropped(
        &dp,
        &truncated(&claim, 14 + 14 + 2),
        Counter::DropMalformed,
        "an ARP cut inside its sender address",
    );
    Ok(())
}

#[test]
fn other_protocols_pass_and_broken_ipv4_is_dropped() -> Result<()> {
    let dp = edge_with_port("podport-other")?;
    let ipv6 = Frame::eth(POD_MAC, NEIGHBOUR_MAC)
        .ethertype(ethertype::IPV6)
        .payload(&[0x60; 40])
        .build();
    assert_untouched(&dp, &ipv6, "IPv6");
    // (The kernel's test run refuses IPv4 frames shorter than a header.)
    let spoofed = udp_from(LOCAL_POD_2, PEER_POD);
    assert_dropped(
        &dp,
        &with_ipv4_ihl(&spoofed, 4)?,
        Counter::DropMalformed,
        "IPv4 with a header length below 20 bytes",
    );
    Ok(())
}

#[test]
fn a_port_the_agent_has_not_learned_passes_everything() -> Result<()> {
    let dp = edge("podport-unlearned", fabedge_common::tunnel_mode::VXLAN)?;
    assert_untouched(&dp, &udp_from(LOCAL_POD_2, PEER_POD), "IPv4 as a neighbour");
    assert_untouched(&dp, &gratuitous_arp(2, LOCAL_POD_2), "ARP as a neighbour");
    Ok(())
}
