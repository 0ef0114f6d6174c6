//! Datapath fuzzing: every TC program takes a large number of random and
//! mutated frames through BPF_PROG_TEST_RUN, and every verdict is checked
//! against what the datapath promises: only the program's own verdicts, every
//! `TC_ACT_SHOT` counted by exactly one drop counter, checksums that were right
//! on the way in still right on the way out, and nothing sent toward an
//! address that is not a configured peer. The uplink's XDP program
//! `fe_xdp_uplink` takes the same seeds and mutations in each configuration
//! it has (connector, VXLAN edge, ESP edge), against XDP's own promises (see
//! its section below). Needs root.
//!
//! Each node runs with every value of the configuration flags that change
//! what these programs do (`TC_ENCAP` for TC in VXLAN mode, `XDP_POD_RX`
//! for XDP), the frames split evenly between them.
//!
//! `FABEDGE_FUZZ_FRAMES` sets the frames per TC program and per XDP
//! configuration (default below);
//! `FABEDGE_FUZZ_SEED` replays a run (every run prints its seed).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use fabedge_agent::datapath::Program;
use fabedge_common::{
    Counter, DEFAULT_TUNNEL_VNI, ESP_IN_UDP_PORT, PodPortEntry, TUNNEL_DEV_MAC, TUNNEL_SRC_MAC,
    config_flags, mark, peer_kind, route_kind,
    services::{Backend, BackendKey, ServiceEntry, ServiceKey, backend_flags, service_flags},
    tunnel_mode,
};
use fabedge_tests::{
    datapath::{
        SkbIn, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TEST_RUN_IFINDEX, TestDatapath, counted,
        fixtures::*,
    },
    encap::EdgeLab,
    packet::{
        ETH_HEADER_LEN, Frame, IcmpError, Mac, TcpFlags, UdpChecksum, hexdump,
        ipv4_header_checksum, l4_checksum, parse_eth, vxlan_encap,
    },
    xdp::{
        self, CONNECTOR_WAN, CONNECTOR_WAN_MAC, FibLab, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX,
        XDP_UPLINK, XdpOutcome, run_xdp,
    },
};

/// Frames per program when `FABEDGE_FUZZ_FRAMES` is not set.
const DEFAULT_FRAMES: u64 = 1_000_000;
/// Frames between two reads of the drop counters.
const BATCH: usize = 1024;
/// One frame in this many is checked counter by counter.
const SAMPLE_EVERY: u64 = 499;
/// Findings printed before the rest are only counted.
const MAX_FINDINGS: usize = 20;
/// `BPF_PROG_TEST_RUN` refuses skb data larger than a page minus its
/// headroom and shared info; stay under it.
const MAX_FRAME: usize = 3000;

/// Flannel's, the IANA one and ours.
const VXLAN_PORTS: [u16; 3] = [8472, 4789, fabedge_common::DEFAULT_TUNNEL_PORT];
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;

// ---------------------------------------------------------------------------
// The table: which program runs against which fixture, and what it may answer.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fixture {
    EdgeVxlan,
    EdgeEsp,
    Connector,
}

/// One program under fuzz: the fixtures it runs in (frames split evenly) and
/// every verdict it may return.
struct Case {
    program: Program,
    fixtures: &'static [Fixture],
    verdicts: &'static [i32],
}

const CASES: &[Case] = &[
    Case {
        program: Program::FromPod,
        fixtures: &[Fixture::EdgeVxlan, Fixture::EdgeEsp, Fixture::Connector],
        verdicts: &[TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT],
    },
    Case {
        program: Program::ToPod,
        fixtures: &[Fixture::EdgeVxlan],
        verdicts: &[TC_ACT_OK, TC_ACT_SHOT],
    },
    Case {
        program: Program::TunnelIngress,
        fixtures: &[Fixture::EdgeEsp, Fixture::EdgeVxlan, Fixture::Connector],
        verdicts: &[TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT],
    },
    Case {
        program: Program::TunnelEgress,
        fixtures: &[Fixture::EdgeVxlan, Fixture::EdgeEsp, Fixture::Connector],
        verdicts: &[TC_ACT_OK, TC_ACT_SHOT],
    },
    Case {
        program: Program::UplinkIngress,
        fixtures: &[Fixture::Connector, Fixture::EdgeVxlan, Fixture::EdgeEsp],
        verdicts: &[TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT],
    },
    Case {
        program: Program::UplinkEgress,
        fixtures: &[Fixture::EdgeVxlan, Fixture::EdgeEsp, Fixture::Connector],
        verdicts: &[TC_ACT_OK, TC_ACT_SHOT],
    },
    Case {
        program: Program::PodPort,
        fixtures: &[Fixture::EdgeVxlan],
        verdicts: &[TC_ACT_OK, TC_ACT_SHOT],
    },
];

#[test]
fn fuzz_from_pod() -> Result<()> {
    fuzz(Program::FromPod)
}

#[test]
fn fuzz_to_pod() -> Result<()> {
    fuzz(Program::ToPod)
}

#[test]
fn fuzz_tunnel_ingress() -> Result<()> {
    fuzz(Program::TunnelIngress)
}

#[test]
fn fuzz_tunnel_egress() -> Result<()> {
    fuzz(Program::TunnelEgress)
}

#[test]
fn fuzz_uplink_ingress() -> Result<()> {
    fuzz(Program::UplinkIngress)
}

#[test]
fn fuzz_uplink_egress() -> Result<()> {
    fuzz(Program::UplinkEgress)
}

#[test]
fn fuzz_pod_port() -> Result<()> {
    fuzz(Program::PodPort)
}

// ---------------------------------------------------------------------------
// A small deterministic PRNG (SplitMix64): reproducible from the printed seed.
// ---------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (((self.next() >> 32) * n as u64) >> 32) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn env_u64(name: &str) -> Result<Option<u64>> {
    match std::env::var(name) {
        Ok(text) => {
            let text = text.trim();
            let value = match text.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => text.parse(),
            };
            value
                .map(Some)
                .with_context(|| format!("{name}={text:?} is not a number"))
        }
        Err(_) => Ok(None),
    }
}

// ---------------------------------------------------------------------------
// Fixtures: the shared edge/connector datapaths plus Services and their flows.
// ---------------------------------------------------------------------------

fn frontend(dp: &mut TestDatapath, id: u32, port: u16, proto: u8, flags: u8, backends: &[Backend]) {
    for (slot, backend) in backends.iter().enumerate() {
        dp.maps
            .backends
            .insert(
                BackendKey {
                    service_id: id,
                    slot: slot as u32,
                },
                *backend,
                0,
            )
            .expect("writing a backend");
    }
    let entry = ServiceEntry {
        id,
        count: backends.len() as u16,
        flags,
        _pad: 0,
        affinity_timeout: 60,
    };
    let key = ServiceKey {
        addr: VIP.octets(),
        port,
        proto,
        _pad: 0,
    };
    dp.maps
        .services
        .insert(key, entry, 0)
        .expect("writing a frontend");
}

fn backend(addr: Ipv4Addr, port: u16, flags: u8) -> Backend {
    Backend {
        addr: addr.octets(),
        port,
        flags,
        _pad: 0,
    }
}

fn load(fixture: Fixture, name: &str) -> Result<TestDatapath> {
    let mut dp = match fixture {
        Fixture::EdgeVxlan => edge(name, tunnel_mode::VXLAN)?,
        Fixture::EdgeEsp => edge(name, tunnel_mode::ESP)?,
        Fixture::Connector => connector(name)?,
    };
    // The test run's port is the pod LOCAL_POD's (`fe_pod_port`).
    dp.maps.pod_ports.insert(
        TEST_RUN_IFINDEX,
        PodPortEntry {
            addr: LOCAL_POD.octets(),
        },
        0,
    )?;
    // TCP to a remote and a local backend, UDP to a remote one, a sticky
    // Service, and one TCP and one UDP Service without endpoints (rejects).
    frontend(
        &mut dp,
        1,
        80,
        TCP,
        0,
        &[
            backend(PEER_POD, 8080, 0),
            backend(LOCAL_POD_2, 8080, backend_flags::LOCAL),
        ],
    );
    frontend(&mut dp, 2, 53, UDP, 0, &[backend(PEER_POD, 5353, 0)]);
    frontend(
        &mut dp,
        3,
        443,
        TCP,
        service_flags::AFFINITY,
        &[backend(CLOUD_POD, 8443, 0)],
    );
    frontend(&mut dp, 4, 81, TCP, 0, &[]);
    frontend(&mut dp, 5, 54, UDP, 0, &[]);
    // Open the Service flows so replies and ICMP errors find conntrack entries.
    for seed in seeds().iter().filter(|s| s.opens_flow) {
        dp.run(Program::FromPod, &seed.frame)?;
    }
    Ok(dp)
}

/// Addresses a frame may be encapsulated toward in `fixture`: its peers' underlays.
fn underlays(dp: &TestDatapath) -> Vec<[u8; 4]> {
    (0..16)
        .filter_map(|id| dp.maps.peer(id).ok())
        .filter(|p| p.kind == peer_kind::TUNNEL || p.kind == peer_kind::FLANNEL_VTEP)
        .map(|p| p.underlay_ip)
        .collect()
}

/// Peer ids a to-tunnel mark may name in `fixture`.
fn tunnel_peer_ids(dp: &TestDatapath) -> Vec<u16> {
    (0..16)
        .filter(|&id| dp.maps.peer(id).is_ok_and(|p| p.kind == peer_kind::TUNNEL))
        .collect()
}

// ---------------------------------------------------------------------------
// Seeds
// ---------------------------------------------------------------------------

struct Seed {
    name: &'static str,
    frame: Vec<u8>,
    /// Run once through `fe_from_pod` at fixture setup (opens a Service flow).
    opens_flow: bool,
}

fn seed(name: &'static str, frame: Vec<u8>) -> Seed {
    Seed {
        name,
        frame,
        opens_flow: false,
    }
}

fn flow(name: &'static str, frame: Vec<u8>) -> Seed {
    Seed {
        name,
        frame,
        opens_flow: true,
    }
}

fn pod() -> fabedge_tests::packet::EthBuilder {
    Frame::eth(POD_MAC, BRIDGE_MAC)
}

/// `frame` (Ethernet + IPv4) with `options` appended to its IPv4 header.
fn with_ip_options(frame: Vec<u8>, options: &[u8]) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0, "options pad to 32-bit words");
    let ip = ETH_HEADER_LEN;
    let mut out = frame[..ip + 20].to_vec();
    out.extend_from_slice(options);
    out.extend_from_slice(&frame[ip + 20..]);
    out[ip] = 0x40 | ((20 + options.len()) / 4) as u8;
    let total = u16::from_be_bytes([out[ip + 2], out[ip + 3]]) + options.len() as u16;
    out[ip + 2..ip + 4].copy_from_slice(&total.to_be_bytes());
    fix_ipv4_checksum(&mut out, ip);
    out
}

/// `frame` with its IPv4 fragment field set (flags and offset), checksum fixed.
fn as_fragment(mut frame: Vec<u8>, more: bool, offset: u16) -> Vec<u8> {
    let ip = ETH_HEADER_LEN;
    let field = if more { 0x2000 } else { 0 } | (offset & 0x1fff);
    frame[ip + 6..ip + 8].copy_from_slice(&field.to_be_bytes());
    fix_ipv4_checksum(&mut frame, ip);
    frame
}

fn seeds() -> Vec<Seed> {
    let remote_reply_quote = Frame::ipv4(LOCAL_POD, PEER_POD)
        .udp(40002, 5353)
        .payload(b"query?")
        .build();
    let our_vxlan_inner = Frame::eth(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC)
        .ipv4(PEER_POD, LOCAL_POD)
        .ttl(63)
        .tcp(34000, 8080)
        .flags(TcpFlags::ACK)
        .payload(b"over our tunnel")
        .build();
    let flannel_inner = Frame::eth(CLOUD2_VTEP_MAC, FLANNEL_MAC)
        .ipv4(CLOUD_POD, LOCAL_POD)
        .ttl(63)
        .udp(5353, 53)
        .payload(b"from the cloud")
        .build();
    let mut esp = vec![0, 0, 0x10, 0x01, 0, 0, 0, 7]; // SPI, sequence
    esp.extend((0u8..48).map(|i| i.wrapping_mul(37)));
    vec![
        // Pod traffic.
        seed(
            "pod udp to a community peer",
            pod()
                .ipv4(LOCAL_POD, PEER_POD)
                .id(7)
                .udp(40000, 53)
                .payload(b"fabedge?")
                .build(),
        ),
        seed(
            "pod tcp syn to the cloud",
            pod()
                .ipv4(LOCAL_POD, CLOUD_POD)
                .dont_fragment(true)
                .tcp(41000, 80)
                .flags(TcpFlags::SYN)
                .mss(1460)
                .build(),
        ),
        seed(
            "pod icmp echo to a peer",
            pod()
                .ipv4(LOCAL_POD, PEER_POD)
                .icmp_echo_request(9, 1)
                .payload(b"ping")
                .build(),
        ),
        seed(
            "pod udp to a local pod",
            pod().ipv4(LOCAL_POD, LOCAL_POD_2).udp(1, 2).build(),
        ),
        seed(
            "pod udp, ttl 1",
            pod().ipv4(LOCAL_POD, PEER_POD).ttl(1).udp(1, 2).build(),
        ),
        seed(
            "pod udp to an orphan route",
            pod().ipv4(LOCAL_POD, ORPHAN).udp(1, 2).build(),
        ),
        // Services.
        flow(
            "service tcp syn (remote and local backends)",
            pod()
                .ipv4(LOCAL_POD, VIP)
                .tcp(40001, 80)
                .seq(1000)
                .flags(TcpFlags::SYN)
                .build(),
        ),
        flow(
            "service tcp data",
            pod()
                .ipv4(LOCAL_POD, VIP)
                .tcp(40001, 80)
                .seq(1001)
                .flags(TcpFlags::ACK | TcpFlags::PSH)
                .payload(b"GET / HTTP/1.1\r\n\r\n")
                .build(),
        ),
        flow(
            "service udp",
            pod()
                .ipv4(LOCAL_POD, VIP)
                .udp(40002, 53)
                .payload(b"query?")
                .build(),
        ),
        flow(
            "service udp without checksum",
            pod()
                .ipv4(LOCAL_POD_2, VIP)
                .udp(40003, 53)
                .zero_checksum()
                .payload(b"query!")
                .build(),
        ),
        flow(
            "sticky service tcp",
            pod()
                .ipv4(LOCAL_POD, VIP)
                .tcp(40004, 443)
                .flags(TcpFlags::SYN)
                .build(),
        ),
        seed(
            "service without endpoints, tcp",
            pod()
                .ipv4(LOCAL_POD, VIP)
                .tcp(40005, 81)
                .seq(5)
                .flags(TcpFlags::SYN)
                .build(),
        ),
        seed(
            "service without endpoints, udp",
            pod()
                .ipv4(LOCAL_POD, VIP)
                .udp(40006, 54)
                .payload(b"anyone?")
                .build(),
        ),
        seed(
            "reply of a remote udp backend",
            Frame::eth(TUNNEL_SRC_MAC, BRIDGE_MAC)
                .ipv4(PEER_POD, LOCAL_POD)
                .udp(5353, 40002)
                .payload(b"answer")
                .build(),
        ),
        seed(
            "reply of a local tcp backend to the cluster ip",
            pod()
                .ipv4(LOCAL_POD_2, VIP)
                .tcp(8080, 40001)
                .flags(TcpFlags::SYN | TcpFlags::ACK)
                .build(),
        ),
        seed(
            "icmp port unreachable quoting a translated flow",
            Frame::eth(TUNNEL_SRC_MAC, BRIDGE_MAC)
                .ipv4(PEER_POD, LOCAL_POD)
                .icmp_error(IcmpError::PortUnreachable, &remote_reply_quote)
                .build(),
        ),
        seed(
            "icmp time exceeded quoting a translated flow",
            Frame::eth(TUNNEL_SRC_MAC, BRIDGE_MAC)
                .ipv4(Ipv4Addr::new(10, 1, 0, 254), LOCAL_POD)
                .icmp_error(IcmpError::TtlExceeded, &remote_reply_quote)
                .build(),
        ),
        // Tunnels.
        seed(
            "flannel vxlan for an edge pod",
            vxlan_encap(
                Frame::eth(CLOUD2_NIC_MAC, UPLINK_MAC),
                Ipv4Addr::from(CLOUD2_LAN),
                Ipv4Addr::from(CONNECTOR_LAN),
                41234,
                8472,
                1,
                &flannel_inner,
            ),
        ),
        seed(
            "our vxlan from a peer",
            vxlan_encap(
                Frame::eth(CLOUD2_NIC_MAC, UPLINK_MAC),
                Ipv4Addr::new(198, 18, 0, 12),
                NODE_IP,
                50000,
                fabedge_common::DEFAULT_TUNNEL_PORT,
                DEFAULT_TUNNEL_VNI,
                &our_vxlan_inner,
            ),
        ),
        seed("decapsulated frame from a peer", our_vxlan_inner.clone()),
        seed(
            "esp in udp 4500",
            Frame::eth(CLOUD2_NIC_MAC, UPLINK_MAC)
                .ipv4(Ipv4Addr::new(198, 18, 0, 12), NODE_IP)
                .udp(ESP_IN_UDP_PORT, ESP_IN_UDP_PORT)
                .zero_checksum()
                .payload(&esp)
                .build(),
        ),
        seed(
            "flannel vxlan from a stranger",
            vxlan_encap(
                Frame::eth(CLOUD2_NIC_MAC, UPLINK_MAC),
                UNKNOWN,
                Ipv4Addr::from(CONNECTOR_LAN),
                41234,
                8472,
                1,
                &flannel_inner,
            ),
        ),
        seed(
            "plain packet on the uplink in the name of a remote pod",
            Frame::eth(CLOUD2_NIC_MAC, UPLINK_MAC)
                .ipv4(PEER_POD, LOCAL_POD)
                .udp(1, 2)
                .payload(b"forged")
                .build(),
        ),
        seed(
            "cloud node to an edge node ip",
            Frame::eth(CLOUD2_NIC_MAC, UPLINK_MAC)
                .ipv4(Ipv4Addr::from(CLOUD2_LAN), NODE_IP)
                .icmp_echo_request(1, 1)
                .build(),
        ),
        seed(
            "tunnel traffic to a cloud pod (flannel encap)",
            Frame::eth(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC)
                .ipv4(LOCAL_POD, CLOUD_POD)
                .udp(40000, 8080)
                .payload(b"to the cloud")
                .build(),
        ),
        seed(
            "host traffic into the tunnel",
            Frame::eth([0; 6], [0; 6])
                .ipv4(NODE_IP, Ipv4Addr::new(10, 244, 9, 9))
                .udp(1, 2)
                .build(),
        ),
        seed(
            "decapsulated frame from an orphan route's prefix",
            Frame::eth(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC)
                .ipv4(ORPHAN, LOCAL_POD)
                .udp(1, 2)
                .build(),
        ),
        // Layer-3 (ESP xfrm device): IPv4 at offset 0.
        seed(
            "bare ipv4 on the xfrm device",
            Frame::ipv4(PEER_POD, LOCAL_POD)
                .udp(1, 2)
                .payload(b"decrypted")
                .build(),
        ),
        // IP options and fragments.
        seed(
            "pod udp with nop and router-alert options",
            with_ip_options(
                pod().ipv4(LOCAL_POD, PEER_POD).udp(1, 2).build(),
                &[1, 1, 1, 0, 0x94, 4, 0, 0],
            ),
        ),
        seed(
            "service tcp with record-route option",
            with_ip_options(
                pod()
                    .ipv4(LOCAL_POD, VIP)
                    .tcp(40007, 80)
                    .flags(TcpFlags::SYN)
                    .build(),
                &[7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ),
        ),
        seed(
            "first fragment to a service",
            as_fragment(
                pod()
                    .ipv4(LOCAL_POD, VIP)
                    .udp(40008, 53)
                    .payload(&[0x55; 64])
                    .build(),
                true,
                0,
            ),
        ),
        seed(
            "later fragment to a peer",
            as_fragment(
                pod()
                    .ipv4(LOCAL_POD, PEER_POD)
                    .protocol(UDP)
                    .payload(&[0xaa; 40])
                    .build(),
                false,
                185,
            ),
        ),
        // Sizes.
        seed(
            "oversize pod udp (above the tunnel mtu)",
            pod()
                .ipv4(LOCAL_POD, PEER_POD)
                .dont_fragment(true)
                .udp(1, 2)
                .payload(&[0x11; 1500])
                .build(),
        ),
        seed(
            "jumbo pod tcp",
            pod()
                .ipv4(LOCAL_POD, VIP)
                .tcp(40001, 80)
                .flags(TcpFlags::ACK)
                .payload(&[0x22; 2800])
                .build(),
        ),
        // Not IPv4.
        seed("arp", pod().ethertype(0x0806).payload(&[0; 28]).build()),
        seed(
            "arp who-has from the pod",
            pod()
                .arp(1, (POD_MAC, LOCAL_POD), ([0; 6], LOCAL_POD_2))
                .build(),
        ),
        seed("ipv6", pod().ethertype(0x86dd).payload(&[0x60; 48]).build()),
    ]
}

// ---------------------------------------------------------------------------
// Mutations
// ---------------------------------------------------------------------------

fn fix_ipv4_checksum(frame: &mut [u8], ip: usize) {
    let Some(&first) = frame.get(ip) else { return };
    let ihl = usize::from(first & 0x0f) * 4;
    if ihl < 20 || frame.len() < ip + ihl {
        return;
    }
    frame[ip + 10..ip + 12].fill(0);
    let check = ipv4_header_checksum(&frame[ip..ip + ihl]);
    frame[ip + 10..ip + 12].copy_from_slice(&check.to_be_bytes());
}

/// Recomputes the L4 checksum of an unfragmented TCP/UDP/ICMP packet whose
/// lengths agree, so mutated frames also reach the code that rewrites them.
fn fix_l4_checksum(frame: &mut [u8], ip: usize) {
    let Some(header) = frame.get(ip..ip + 20) else {
        return;
    };
    let ihl = usize::from(header[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let fragment = u16::from_be_bytes([header[6], header[7]]) & 0x3fff != 0;
    let protocol = header[9];
    let src = Ipv4Addr::new(header[12], header[13], header[14], header[15]);
    let dst = Ipv4Addr::new(header[16], header[17], header[18], header[19]);
    if ihl < 20 || total < ihl || ip + total > frame.len() || fragment {
        return;
    }
    let l4 = &mut frame[ip + ihl..ip + total];
    let at = match protocol {
        TCP if l4.len() >= 20 => 16,
        UDP if l4.len() >= 8 && usize::from(u16::from_be_bytes([l4[4], l4[5]])) == l4.len() => 6,
        ICMP if l4.len() >= 8 => 2,
        _ => return,
    };
    l4[at..at + 2].fill(0);
    let check = if protocol == ICMP {
        fabedge_tests::packet::internet_checksum(l4)
    } else {
        match l4_checksum(src, dst, protocol, l4) {
            0 if protocol == UDP => 0xffff,
            c => c,
        }
    };
    l4[at..at + 2].copy_from_slice(&check.to_be_bytes());
}

/// Offsets where a header ends, for truncation: Ethernet, IPv4 (as its IHL
/// says), L4 and, through VXLAN, the inner headers.
fn boundaries(frame: &[u8]) -> Vec<usize> {
    let mut cuts = vec![ETH_HEADER_LEN, ETH_HEADER_LEN + 1];
    let mut ip = ETH_HEADER_LEN;
    for _ in 0..2 {
        let Some(&first) = frame.get(ip) else { break };
        let ihl = usize::from(first & 0x0f) * 4;
        cuts.extend([ip + 10, ip + 20, ip + ihl]);
        let l4 = ip + ihl.max(20);
        cuts.extend([l4 + 4, l4 + 8, l4 + 14, l4 + 20, l4 + 28]);
        // Through a VXLAN header to the inner Ethernet and IPv4 headers.
        cuts.extend([l4 + 16, l4 + 30]);
        ip = l4 + 16 + ETH_HEADER_LEN;
    }
    cuts
}

/// Where IPv4 headers are in `frame` (outer, and inner through VXLAN).
fn ipv4_offsets(frame: &[u8]) -> Vec<usize> {
    let mut found = Vec::new();
    if frame.get(12..14) == Some(&[0x08, 0x00]) {
        found.push(ETH_HEADER_LEN);
        if let Some(&first) = frame.get(ETH_HEADER_LEN) {
            let inner = ETH_HEADER_LEN + usize::from(first & 0x0f) * 4 + 16 + ETH_HEADER_LEN;
            if frame.get(ETH_HEADER_LEN + 9) == Some(&UDP)
                && frame.get(inner - 2..inner) == Some(&[0x08, 0x00])
            {
                found.push(inner);
            }
        }
    } else if frame.first().is_some_and(|b| b >> 4 == 4) {
        found.push(0);
    }
    found
}

fn mutate(rng: &mut Rng, frame: &mut Vec<u8>) {
    let rounds = 1 + rng.below(3);
    for _ in 0..rounds {
        let len = frame.len();
        // Headers are where decisions are made: aim most edits at the first 100 bytes.
        let pos = if rng.chance(80) {
            rng.below(len.min(100))
        } else {
            rng.below(len)
        };
        match rng.below(10) {
            0 | 1 => frame[pos] ^= 1 << rng.below(8),
            2 => frame[pos] = 0,
            3 => frame[pos] = 0xff,
            4 => frame[pos] = rng.byte(),
            5 => {
                let cut = *rng.pick(&boundaries(frame));
                frame.truncate(cut.clamp(ETH_HEADER_LEN, len));
            }
            6 => {
                // IPv4 total length or IHL lies, checksum fixed or not.
                let offsets = ipv4_offsets(frame);
                if let Some(&ip) = offsets.get(rng.below(offsets.len().max(1))) {
                    if frame.len() >= ip + 20 {
                        if rng.chance(50) {
                            let total = u16::from_be_bytes([frame[ip + 2], frame[ip + 3]]);
                            let lie = match rng.below(5) {
                                0 => 0,
                                1 => 0xffff,
                                2 => total.wrapping_add(1 + rng.below(64) as u16),
                                3 => total.wrapping_sub(1 + rng.below(64) as u16),
                                _ => rng.next() as u16,
                            };
                            frame[ip + 2..ip + 4].copy_from_slice(&lie.to_be_bytes());
                        } else {
                            frame[ip] = (frame[ip] & 0xf0) | rng.below(16) as u8;
                        }
                        if rng.chance(70) {
                            fix_ipv4_checksum(frame, ip);
                        }
                    }
                }
            }
            7 => {
                // UDP length lies.
                let offsets = ipv4_offsets(frame);
                if let Some(&ip) = offsets.get(rng.below(offsets.len().max(1))) {
                    let l4 = ip + usize::from(frame.get(ip).map_or(5, |b| b & 0x0f)) * 4;
                    if frame.len() >= l4 + 8 {
                        let lie = match rng.below(4) {
                            0 => 0,
                            1 => 7,
                            2 => 0xffff,
                            _ => rng.next() as u16,
                        };
                        frame[l4 + 4..l4 + 6].copy_from_slice(&lie.to_be_bytes());
                    }
                }
            }
            8 => {
                // Random append (Ethernet padding, trailing garbage, oversize).
                let extra = if rng.chance(10) {
                    rng.below(MAX_FRAME)
                } else {
                    1 + rng.below(64)
                };
                for _ in 0..extra {
                    frame.push(rng.byte());
                }
                frame.truncate(MAX_FRAME);
            }
            _ => {
                // A random 16-bit field (ports, ids, lengths, checksums).
                if pos + 1 < frame.len() {
                    let value = rng.next() as u16;
                    frame[pos..pos + 2].copy_from_slice(&value.to_be_bytes());
                }
            }
        }
    }
    // Often make the damage consistent again so deeper code runs on it.
    for ip in ipv4_offsets(frame) {
        if rng.chance(60) {
            fix_ipv4_checksum(frame, ip);
        }
        if rng.chance(40) {
            fix_l4_checksum(frame, ip);
        }
    }
}

fn random_frame(rng: &mut Rng) -> Vec<u8> {
    let longest = if rng.chance(10) { MAX_FRAME } else { 120 };
    let len = ETH_HEADER_LEN + rng.below(longest);
    let mut frame: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
    if rng.chance(80) {
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        if len > ETH_HEADER_LEN && rng.chance(80) {
            frame[ETH_HEADER_LEN] = 0x45;
        }
        if len >= ETH_HEADER_LEN + 20 {
            if rng.chance(50) {
                let total = (len - ETH_HEADER_LEN) as u16;
                frame[16..18].copy_from_slice(&total.to_be_bytes());
            }
            frame[ETH_HEADER_LEN + 9] = *rng.pick(&[TCP, UDP, ICMP, 50]);
            fix_ipv4_checksum(&mut frame, ETH_HEADER_LEN);
        }
    }
    frame
}

/// Frames `BPF_PROG_TEST_RUN` refuses with EINVAL before any program runs
/// (Linux 6.18 pulls the IPv4 or IPv6 header it claims into the skb head).
fn refused_by_test_run(frame: &[u8]) -> bool {
    match frame.get(12..14) {
        Some([0x08, 0x00]) => frame.len() < ETH_HEADER_LEN + 20,
        Some([0x86, 0xdd]) => frame.len() < ETH_HEADER_LEN + 40,
        _ => frame.len() < ETH_HEADER_LEN,
    }
}

/// Skb metadata: marks our programs read (to-tunnel and from-tunnel marks,
/// mostly of configured peers), foreign marks, and now and then GSO sizes.
fn random_skb(rng: &mut Rng, peers: &[u16]) -> SkbIn {
    let peer = if rng.chance(60) && !peers.is_empty() {
        *rng.pick(peers)
    } else {
        rng.below(8) as u16
    };
    let mark = match rng.below(10) {
        0..=2 => 0,
        3..=5 => mark::to_tunnel(0, peer),
        6..=8 => mark::from_tunnel(rng.next() as u32 & 0xc0ff, peer),
        _ => rng.next() as u32,
    };
    let (gso_segs, gso_size) = if rng.chance(5) {
        (1 + rng.below(4) as u32, rng.below(2000) as u32)
    } else {
        (0, 0)
    };
    SkbIn {
        mark,
        gso_segs,
        gso_size,
    }
}

// ---------------------------------------------------------------------------
// Invariants
// ---------------------------------------------------------------------------

/// Whether every checksum a receiver verifies is right: each IPv4 header and,
/// for an unfragmented TCP/UDP/ICMP packet, its L4 checksum; through VXLAN,
/// the inner packet's too. `None`: not a frame the parsers understand.
fn checksums_valid(frame: &[u8]) -> Option<bool> {
    let ip = parse_eth(frame).ok()?.ipv4().ok()?;
    if !ip.checksum_valid {
        return Some(false);
    }
    if ip.is_fragment() {
        return Some(true);
    }
    match ip.protocol {
        TCP => Some(ip.tcp().ok()?.checksum_valid),
        ICMP => Some(ip.icmp().ok()?.checksum_valid),
        UDP => {
            let udp = ip.udp().ok()?;
            if udp.checksum_status == UdpChecksum::Invalid {
                return Some(false);
            }
            // Through VXLAN, the inner packet counts too: one the parsers
            // cannot read makes the whole frame uncheckable.
            if VXLAN_PORTS.contains(&udp.dst_port) {
                checksums_valid(udp.vxlan().ok()?.inner)
            } else {
                Some(true)
            }
        }
        _ => Some(true),
    }
}

struct Checker<'a> {
    case: &'a Case,
    /// The seed the current frame was made from.
    origin: &'a str,
    fixture: Fixture,
    /// `DatapathConfig::flags` of the fixture.
    flags: u8,
    underlays: Vec<[u8; 4]>,
    tunnel_peers: Vec<u16>,
    findings: Vec<String>,
    finding_count: usize,
}

impl Checker<'_> {
    fn finding(&mut self, what: String, frame: &[u8], skb: SkbIn) {
        self.finding_count += 1;
        if self.findings.len() < MAX_FINDINGS {
            self.findings.push(format!(
                "{} in {:?} (config flags {:#x}), frame from {:?}: {what}\n  skb mark {:#x} gso {}x{}\n{}",
                self.case.program.symbol(),
                self.fixture,
                self.flags,
                self.origin,
                skb.mark,
                skb.gso_segs,
                skb.gso_size,
                hexdump(frame)
            ));
        }
    }

    /// Everything checkable from one run's input and output.
    fn check(&mut self, frame: &[u8], skb: SkbIn, action: i32, data: &[u8], out_mark: u32) {
        if !self.case.verdicts.contains(&action) {
            self.finding(
                format!("verdict {action} is not one of {:?}", self.case.verdicts),
                frame,
                skb,
            );
            return;
        }
        if action == TC_ACT_SHOT {
            return;
        }
        if data != frame
            && checksums_valid(frame) == Some(true)
            && checksums_valid(data) == Some(false)
        {
            self.finding(
                format!(
                    "rewritten to a frame with a bad checksum (verdict {action}):\n{}",
                    hexdump(data)
                ),
                frame,
                skb,
            );
        }
        if out_mark != skb.mark
            && let Some(peer) = mark::tunnel_peer(out_mark)
            && !self.tunnel_peers.contains(&peer)
        {
            self.finding(
                format!("marked for tunnel peer {peer}, which is not configured"),
                frame,
                skb,
            );
        }
        if data.len() > frame.len() {
            // Grown: encapsulated (UDP), or a reject built in place (TCP RST,
            // ICMP). An encapsulated frame goes only to a peer's underlay.
            let outer = parse_eth(data).and_then(|e| e.ipv4());
            match outer {
                Ok(ip) if ip.protocol != UDP || self.underlays.contains(&ip.dst.octets()) => {}
                Ok(ip) => self.finding(
                    format!(
                        "encapsulated toward {}, not a configured peer {:?}",
                        ip.dst, self.underlays
                    ),
                    frame,
                    skb,
                ),
                Err(e) => self.finding(
                    format!("grew into an unparseable frame: {e:#}\n{}", hexdump(data)),
                    frame,
                    skb,
                ),
            }
        }
    }
}

fn drop_total(dp: &TestDatapath) -> u64 {
    Counter::ALL
        .iter()
        .filter(|c| c.is_drop())
        .map(|&c| dp.counter(c))
        .sum()
}

/// Drop counters that moved, by name.
fn drop_deltas(before: &[(Counter, u64)], after: &[(Counter, u64)]) -> BTreeMap<&'static str, u64> {
    before
        .iter()
        .zip(after)
        .filter(|((c, b), (_, a))| c.is_drop() && a != b)
        .map(|((c, b), (_, a))| (c.name(), a - b))
        .collect()
}

/// Runs `frame` counting every counter, and reports a drop not counted by
/// exactly one drop counter (or a drop counter moved by a frame not dropped).
fn run_counted(dp: &TestDatapath, checker: &mut Checker, frame: &[u8], skb: SkbIn) -> Result<i32> {
    let before = dp.counters();
    let out = dp.run_with(checker.case.program, frame, skb)?;
    let after = dp.counters();
    let drops = drop_deltas(&before, &after);
    let moved: u64 = drops.values().sum();
    let want = u64::from(out.action == TC_ACT_SHOT);
    if moved != want {
        checker.finding(
            format!(
                "verdict {} moved drop counters {drops:?} (want {want} drop counted)",
                out.action
            ),
            frame,
            skb,
        );
    }
    checker.check(frame, skb, out.action, &out.data, out.mark);
    Ok(out.action)
}

struct Totals {
    frames: u64,
    /// Generated frames the kernel would not run (see `refused_by_test_run`).
    refused: u64,
    verdicts: BTreeMap<i32, u64>,
    /// How often the paths behind the configuration flags were taken
    /// (`TC_ENCAP`, `XDP_POD_RX`), by counter name: proof they were fuzzed.
    flagged_paths: BTreeMap<&'static str, u64>,
}

/// The counters of the paths behind the configuration flags.
const FLAGGED_PATHS: [Counter; 4] = [
    Counter::TunnelEncap,
    Counter::TunnelEncapNoNeighbour,
    Counter::XdpRedirectToPod,
    Counter::XdpPassToPod,
];

impl Totals {
    fn new() -> Totals {
        Totals {
            frames: 0,
            refused: 0,
            verdicts: BTreeMap::new(),
            flagged_paths: BTreeMap::new(),
        }
    }

    /// Adds up what `dp` counted on the flagged paths.
    fn count_flagged_paths(&mut self, dp: &TestDatapath) {
        for counter in FLAGGED_PATHS {
            let n = dp.counter(counter);
            if n != 0 {
                *self.flagged_paths.entry(counter.name()).or_default() += n;
            }
        }
    }
}

impl Fixture {
    /// The values of `DatapathConfig::flags` fuzzed in this fixture (frames
    /// split evenly): the VXLAN nodes with and without the forwarding
    /// program's own encapsulation; ESP mode has no use for it.
    fn flag_variants(self) -> &'static [u8] {
        match self {
            Fixture::EdgeVxlan | Fixture::Connector => &[0, config_flags::TC_ENCAP],
            Fixture::EdgeEsp => &[0],
        }
    }
}

/// Fuzzes `case` in `fixture` with `flags`. With `TC_ENCAP` the datapath
/// runs in a namespace whose FIB knows the node's neighbours (edge-2 for an
/// edge, edge-1 and cloud-2 for the connector; the connector of an edge
/// stays unresolved), so that both the encapsulation and its fallback to
/// `fe-tunnel` are reached. Returns the CPU time it took.
#[allow(clippy::too_many_arguments)]
fn fuzz_fixture(
    case: &Case,
    fixture: Fixture,
    flags: u8,
    frames: u64,
    rng: &mut Rng,
    totals: &mut Totals,
    findings: &mut Vec<String>,
    finding_count: &mut usize,
) -> Result<Duration> {
    let name = format!("fz-{}-{fixture:?}-{flags}", case.program.cli_name());
    let mut run = || {
        let cpu_started = thread_cpu_time();
        fuzz_loaded_fixture(
            case,
            fixture,
            flags,
            &name,
            frames,
            rng,
            totals,
            findings,
            finding_count,
        )?;
        Ok(thread_cpu_time() - cpu_started)
    };
    if flags & config_flags::TC_ENCAP == 0 {
        return run();
    }
    match fixture {
        Fixture::Connector => FibLab::new(&name)?.netns.enter(run),
        Fixture::EdgeVxlan | Fixture::EdgeEsp => EdgeLab::new(&name)?.netns.enter(run),
    }
}

#[allow(clippy::too_many_arguments)]
fn fuzz_loaded_fixture(
    case: &Case,
    fixture: Fixture,
    flags: u8,
    name: &str,
    frames: u64,
    rng: &mut Rng,
    totals: &mut Totals,
    findings: &mut Vec<String>,
    finding_count: &mut usize,
) -> Result<()> {
    let mut dp = load(fixture, name)?;
    let mut config = dp.maps.config()?;
    config.flags = flags;
    dp.maps.set_config(config)?;
    let seeds = seeds();
    let mut checker = Checker {
        case,
        fixture,
        flags,
        underlays: underlays(&dp),
        tunnel_peers: tunnel_peer_ids(&dp),
        origin: "",
        findings: Vec::new(),
        finding_count: 0,
    };
    let mut batch: Vec<(&str, Vec<u8>, SkbIn)> = Vec::with_capacity(BATCH);
    let mut done = 0u64;
    while done < frames {
        batch.clear();
        let n = (frames - done).min(BATCH as u64) as usize;
        let drops_before = drop_total(&dp);
        let mut shots = 0u64;
        while batch.len() < n {
            let index = done + batch.len() as u64;
            let (origin, frame) = if rng.chance(8) {
                ("random bytes", random_frame(rng))
            } else {
                let seed = rng.pick(&seeds);
                let mut frame = seed.frame.clone();
                // A few seeds go through unmutated, the rest are damaged.
                if rng.chance(95) {
                    mutate(rng, &mut frame);
                }
                (seed.name, frame)
            };
            if refused_by_test_run(&frame) {
                totals.refused += 1;
                continue;
            }
            checker.origin = origin;
            let skb = random_skb(rng, &checker.tunnel_peers);
            let action = if index.is_multiple_of(SAMPLE_EVERY) {
                run_counted(&dp, &mut checker, &frame, skb)?
            } else {
                let out = dp.run_with(case.program, &frame, skb)?;
                checker.check(&frame, skb, out.action, &out.data, out.mark);
                out.action
            };
            shots += u64::from(action == TC_ACT_SHOT);
            *totals.verdicts.entry(action).or_default() += 1;
            batch.push((origin, frame, skb));
        }
        let moved = drop_total(&dp) - drops_before;
        if moved != shots {
            // Find the frame: replay the batch counting each one.
            let before = checker.finding_count;
            for (origin, frame, skb) in &batch {
                checker.origin = *origin;
                run_counted(&dp, &mut checker, frame, *skb)?;
            }
            if checker.finding_count == before {
                checker.finding(
                    format!(
                        "a batch of {n} frames gave {shots} drops but moved drop counters by {moved}; \
                         no single frame reproduced it on replay"
                    ),
                    &[],
                    SkbIn::default(),
                );
            }
        }
        done += n as u64;
    }
    for problem in unconfigured_peer_stats(&dp)? {
        checker.finding(problem, &[], SkbIn::default());
    }
    totals.frames += done;
    totals.count_flagged_paths(&dp);
    *finding_count += checker.finding_count;
    findings.append(&mut checker.findings);
    Ok(())
}

/// Per-peer statistics: only configured peers ever sent or received.
fn unconfigured_peer_stats(dp: &TestDatapath) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    for id in 0..16u16 {
        let stats = dp.maps.peer_stats(id)?;
        let configured = dp.maps.peer(id).is_ok_and(|p| p.kind != 0);
        if !configured && (stats.tx_packets != 0 || stats.rx_packets != 0) {
            problems.push(format!(
                "peer {id} is not configured but counted {} tx / {} rx packets",
                stats.tx_packets, stats.rx_packets
            ));
        }
    }
    Ok(problems)
}

/// The run's PRNG seed: `FABEDGE_FUZZ_SEED`, or the clock.
fn run_seed() -> Result<u64> {
    Ok(match env_u64("FABEDGE_FUZZ_SEED")? {
        Some(seed) => seed,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    })
}

/// CPU time this thread has used (user and kernel: the program runs inside
/// its syscall), which says what a run costs on an idle machine.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn fuzz(program: Program) -> Result<()> {
    let case = CASES
        .iter()
        .find(|c| c.program == program)
        .expect("every fuzzed program has a CASES entry");
    let frames = env_u64("FABEDGE_FUZZ_FRAMES")?.unwrap_or(DEFAULT_FRAMES);
    let seed = run_seed()?;
    println!(
        "{}: seed {seed:#x} (replay with FABEDGE_FUZZ_SEED={seed:#x}), {frames} frames",
        program.symbol()
    );
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut cpu = Duration::ZERO;
    let mut totals = Totals::new();
    let mut findings = Vec::new();
    let mut finding_count = 0;
    let runs: Vec<(Fixture, u8)> = case
        .fixtures
        .iter()
        .flat_map(|&f| f.flag_variants().iter().map(move |&flags| (f, flags)))
        .collect();
    let per_run = frames.div_ceil(runs.len() as u64);
    for (fixture, flags) in runs {
        cpu += fuzz_fixture(
            case,
            fixture,
            flags,
            per_run,
            &mut rng,
            &mut totals,
            &mut findings,
            &mut finding_count,
        )?;
    }
    let elapsed = started.elapsed();
    println!(
        "{}: {} frames in {:.1?} wall, {:.1?} CPU ({:.0} frames per CPU second; {} more generated \
         too short for the kernel to run), verdicts {:?}, flagged paths {:?}, {finding_count} \
         finding(s)",
        program.symbol(),
        totals.frames,
        elapsed,
        cpu,
        totals.frames as f64 / cpu.max(Duration::from_millis(1)).as_secs_f64(),
        totals.refused,
        totals.verdicts,
        totals.flagged_paths
    );
    assert!(
        finding_count == 0,
        "{} finding(s) with seed {seed:#x} (first {} below):\n\n{}",
        finding_count,
        findings.len(),
        findings.join("\n\n")
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// What the fuzzer found, pinned down (each was mishandled before its fix).
// ---------------------------------------------------------------------------

/// Runs `frame` and returns (verdict, output, counters that moved).
fn run_counting(
    dp: &TestDatapath,
    program: Program,
    frame: &[u8],
    skb: SkbIn,
) -> Result<(i32, Vec<u8>, BTreeMap<&'static str, u64>)> {
    let (out, moved) = counted(dp, || dp.run_with(program, frame, skb))?;
    Ok((out.action, out.data, moved))
}

fn flannel_seed() -> Vec<u8> {
    seeds()
        .into_iter()
        .find(|s| s.name == "flannel vxlan for an edge pod")
        .expect("seed present")
        .frame
}

#[test]
fn flannel_vxlan_that_is_a_fragment_or_lies_about_its_length_is_left_to_the_kernel() -> Result<()> {
    let dp = load(Fixture::Connector, "found-flannel")?;
    let whole = flannel_seed();
    let (action, _, moved) = run_counting(&dp, Program::UplinkIngress, &whole, SkbIn::default())?;
    assert_eq!(
        action, TC_ACT_REDIRECT,
        "the unmodified seed is decapsulated"
    );
    assert_eq!(moved.get("flannel_decap"), Some(&1));

    let first_fragment = as_fragment(whole.clone(), true, 0);
    let later_fragment = as_fragment(whole.clone(), false, 0x1e8);
    let mut short_udp = whole.clone();
    let udp = ETH_HEADER_LEN + 20;
    short_udp[udp + 4..udp + 6].copy_from_slice(&28u16.to_be_bytes());
    let mut not_ipv4_inside = whole.clone();
    let inner_type = udp + 8 + 8 + 12;
    not_ipv4_inside[inner_type..inner_type + 2].copy_from_slice(&[0x86, 0xdd]);
    for (what, frame) in [
        ("first fragment", &first_fragment),
        ("later fragment", &later_fragment),
        ("udp length 28", &short_udp),
    ] {
        let (action, out, moved) =
            run_counting(&dp, Program::UplinkIngress, frame, SkbIn::default())?;
        assert_eq!(
            (action, &out, moved.len()),
            (TC_ACT_OK, frame, 0),
            "{what}: untouched and uncounted, for the kernel to reassemble or judge"
        );
    }
    let (action, out, moved) = run_counting(
        &dp,
        Program::UplinkIngress,
        &not_ipv4_inside,
        SkbIn::default(),
    )?;
    assert_eq!(
        (action, &out, moved),
        (
            TC_ACT_OK,
            &not_ipv4_inside,
            BTreeMap::from([(Counter::PassFlannel.name(), 1)])
        ),
        "an inner IPv6 frame stays Flannel's"
    );
    Ok(())
}

#[test]
fn translation_ignores_headers_in_the_padding_after_the_ipv4_packet() -> Result<()> {
    let dp = load(Fixture::EdgeVxlan, "found-padding")?;
    // A UDP "packet" to the Service whose IPv4 total length ends at the IP
    // header: the ports are Ethernet padding, not a datagram.
    let service_udp = seeds()
        .into_iter()
        .find(|s| s.name == "service udp")
        .expect("seed present")
        .frame;
    let mut padded = service_udp.clone();
    padded[ETH_HEADER_LEN + 2..ETH_HEADER_LEN + 4].copy_from_slice(&20u16.to_be_bytes());
    fix_ipv4_checksum(&mut padded, ETH_HEADER_LEN);
    let (action, out, moved) = run_counting(&dp, Program::FromPod, &padded, SkbIn::default())?;
    assert_eq!(
        (action, &out[ETH_HEADER_LEN..], moved),
        (
            TC_ACT_SHOT,
            &padded[ETH_HEADER_LEN..],
            BTreeMap::from([(Counter::DropNoRoute.name(), 1)])
        ),
        "not translated: the ClusterIP itself has no route"
    );

    // An ICMP error whose quote ends before the quoted ports (per its total length).
    let error = seeds()
        .into_iter()
        .find(|s| s.name == "icmp port unreachable quoting a translated flow")
        .expect("seed present")
        .frame;
    let (action, out, _) = run_counting(&dp, Program::ToPod, &error, SkbIn::default())?;
    assert_eq!(action, TC_ACT_OK);
    assert_ne!(out, error, "the whole error is translated");
    let mut cut = error.clone();
    let total = (20 + 8 + 20 + 2) as u16;
    cut[ETH_HEADER_LEN + 2..ETH_HEADER_LEN + 4].copy_from_slice(&total.to_be_bytes());
    fix_ipv4_checksum(&mut cut, ETH_HEADER_LEN);
    fix_l4_checksum(&mut cut, ETH_HEADER_LEN);
    let (action, out, _) = run_counting(&dp, Program::ToPod, &cut, SkbIn::default())?;
    assert_eq!((action, &out), (TC_ACT_OK, &cut), "left as it came");
    Ok(())
}

#[test]
fn esp_ingress_refuses_a_mark_of_a_peer_that_is_not_configured() -> Result<()> {
    let dp = load(Fixture::EdgeEsp, "found-orphan")?;
    // 10.99.0.0/16 routes to peer 3, which the peer table does not have.
    let frame = Frame::eth(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC)
        .ipv4(ORPHAN, LOCAL_POD)
        .udp(1, 2)
        .build();
    let skb = SkbIn {
        mark: mark::from_tunnel(0, ORPHAN_PEER),
        ..SkbIn::default()
    };
    let (action, _, moved) = run_counting(&dp, Program::TunnelIngress, &frame, skb)?;
    assert_eq!(
        (action, moved),
        (
            TC_ACT_SHOT,
            BTreeMap::from([(Counter::DropSpoofed.name(), 1)])
        )
    );
    assert_eq!(dp.maps.peer_stats(ORPHAN_PEER)?.rx_packets, 0);
    Ok(())
}

// ---------------------------------------------------------------------------
// XDP: `fe_xdp_uplink` in each configuration it has, with the same seeds and
// mutations. XDP may only make a verdict cheaper, never different: every
// declined frame passes byte-identical, every drop is counted, and what it
// sends back out (connector, VXLAN mode) goes to a peer's tunnel with right
// checksums, made only from frames the kernel would have forwarded itself.
// ---------------------------------------------------------------------------

/// The nodes `fe_xdp_uplink` runs on, each in its own [`FibLab`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum XdpFixture {
    /// VXLAN mode with Flannel: the guard and the masquerade.
    Connector,
    /// VXLAN mode: the guard of our tunnel only.
    EdgeVxlan,
    /// ESP mode: the guard of ESP in UDP only.
    EdgeEsp,
}

impl XdpFixture {
    fn load(self, name: &str) -> Result<TestDatapath> {
        match self {
            XdpFixture::Connector => xdp::connector(name),
            XdpFixture::EdgeVxlan => xdp::edge(name, tunnel_mode::VXLAN),
            XdpFixture::EdgeEsp => xdp::edge(name, tunnel_mode::ESP),
        }
    }

    /// Only the connector rewrites, and with `--xdp-pod-rx` a VXLAN edge
    /// delivers to its pods; elsewhere XDP passes or drops.
    fn verdicts(self, pod_rx: bool) -> &'static [u32] {
        match self {
            XdpFixture::Connector => &[XDP_PASS, XDP_DROP, XDP_TX, XDP_REDIRECT],
            XdpFixture::EdgeVxlan if pod_rx => &[XDP_PASS, XDP_DROP, XDP_REDIRECT],
            XdpFixture::EdgeVxlan | XdpFixture::EdgeEsp => &[XDP_PASS, XDP_DROP],
        }
    }

    /// With `--xdp-pod-rx`: delivery on, and one pod of the node learned
    /// behind the lab's `lan1` (test runs redirect nowhere); the connector
    /// gets a pod CIDR of its own for it. Returns the learned pods and
    /// their MACs; the node's other pods stay unlearned (the kernel's).
    fn deliver_to_pods(self, dp: &mut TestDatapath, lab: &FibLab) -> Result<Vec<([u8; 4], Mac)>> {
        let pod = match self {
            XdpFixture::Connector => {
                dp.maps
                    .set_route(net("10.244.0.0/24"), route(route_kind::LOCAL_POD, 0))?;
                CONNECTOR_POD
            }
            XdpFixture::EdgeVxlan | XdpFixture::EdgeEsp => LOCAL_POD,
        };
        let veth = lab.netns.ifindex("lan1")?;
        fabedge_tests::xdp::learn_pod(dp, veth, pod, (POD_MAC, BRIDGE_MAC), 1450)?;
        Ok(vec![(pod.octets(), POD_MAC)])
    }
}

/// A pod of the connector's own pod CIDR (with `--xdp-pod-rx`).
const CONNECTOR_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);

#[test]
fn fuzz_xdp_uplink_connector() -> Result<()> {
    fuzz_xdp(XdpFixture::Connector)
}

#[test]
fn fuzz_xdp_uplink_edge_vxlan() -> Result<()> {
    fuzz_xdp(XdpFixture::EdgeVxlan)
}

#[test]
fn fuzz_xdp_uplink_edge_esp() -> Result<()> {
    fuzz_xdp(XdpFixture::EdgeEsp)
}

/// The TC seeds plus tunnel frames aimed at each XDP configuration: what a
/// peer of the connector and of the edges sends on each tunnel port.
fn xdp_seeds() -> Vec<Seed> {
    let to_cloud = |ttl: u8, payload: usize| {
        Frame::eth(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC)
            .ipv4(LOCAL_POD, CLOUD_POD)
            .ttl(ttl)
            .udp(40000, 53)
            .payload(&vec![0x33; payload])
            .build()
    };
    let to_edge = |ttl: u8, payload: usize| {
        Frame::eth(CLOUD2_VTEP_MAC, FLANNEL_MAC)
            .ipv4(CLOUD_POD, LOCAL_POD)
            .ttl(ttl)
            .tcp(8080, 34000)
            .flags(TcpFlags::ACK)
            .payload(&vec![0x44; payload])
            .build()
    };
    let to_pod = |src: Ipv4Addr, dst: Ipv4Addr, payload: usize| {
        Frame::eth(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC)
            .ipv4(src, dst)
            .tcp(443, 35000)
            .flags(TcpFlags::ACK)
            .payload(&vec![0x55; payload])
            .build()
    };
    let flannel = |inner: &[u8]| xdp::flannel_to_connector(CLOUD2_LAN, inner);
    let tunnel = xdp::tunnel_frame;
    let esp_from = |src: Ipv4Addr, payload: &[u8]| {
        Frame::eth(CLOUD2_NIC_MAC, UPLINK_MAC)
            .ipv4(src, NODE_IP)
            .udp(ESP_IN_UDP_PORT, ESP_IN_UDP_PORT)
            .zero_checksum()
            .payload(payload)
            .build()
    };
    let edge1 = Ipv4Addr::new(198, 18, 0, 11);
    let mut esp = vec![0, 0, 0x10, 0x02, 0, 0, 0, 9];
    esp.extend([0x5a; 40]);
    let mut all = seeds();
    all.extend([
        seed(
            "xdp: flannel for an edge pod, ttl 2",
            flannel(&to_edge(2, 200)),
        ),
        seed(
            "xdp: flannel for an edge pod at the tunnel mtu",
            flannel(&to_edge(64, 1450 - 40)),
        ),
        seed(
            "xdp: flannel for an edge pod, inner fragment",
            flannel(&as_fragment(to_edge(64, 64), true, 0)),
        ),
        seed(
            "xdp: flannel with outer ip options",
            with_ip_options(flannel(&to_edge(64, 16)), &[1, 1, 1, 0]),
        ),
        seed(
            "xdp: flannel with a udp checksum",
            Frame::eth(CLOUD2_NIC_MAC, UPLINK_MAC)
                .ipv4(Ipv4Addr::from(CLOUD2_LAN), Ipv4Addr::from(CONNECTOR_LAN))
                .udp(41234, 8472)
                .vxlan(1, &to_edge(64, 32))
                .build(),
        ),
        seed(
            "xdp: our vxlan from edge-1 for a cloud pod",
            tunnel(edge1, CONNECTOR_WAN, &to_cloud(64, 100)),
        ),
        seed(
            "xdp: our vxlan from edge-1 for a cloud pod at the flannel mtu",
            tunnel(edge1, CONNECTOR_WAN, &to_cloud(64, 1450 - 28)),
        ),
        seed(
            "xdp: our vxlan from edge-1 for an edge pod",
            tunnel(
                edge1,
                CONNECTOR_WAN,
                &Frame::eth(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC)
                    .ipv4(LOCAL_POD, LOCAL_POD_2)
                    .udp(1, 2)
                    .build(),
            ),
        ),
        seed(
            "xdp: our vxlan from the connector to an edge",
            tunnel(
                CONNECTOR_WAN,
                NODE_IP,
                &Frame::eth(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC)
                    .ipv4(CLOUD_POD, LOCAL_POD)
                    .udp(53, 40000)
                    .build(),
            ),
        ),
        // `--xdp-pod-rx`: our tunnel for a learned pod (TCP with a UDP
        // checksum, an ICMP error), an unlearned one, the connector's own.
        seed(
            "xdp: our vxlan with a udp checksum from the connector to an edge pod",
            Frame::eth(CONNECTOR_WAN_MAC, xdp::EDGE1_NIC_MAC)
                .ipv4(CONNECTOR_WAN, NODE_IP)
                .udp(50000, fabedge_common::DEFAULT_TUNNEL_PORT)
                .vxlan(DEFAULT_TUNNEL_VNI, &to_pod(CLOUD_POD, LOCAL_POD, 300))
                .build(),
        ),
        seed(
            "xdp: our vxlan from the connector, an icmp error for an edge pod",
            tunnel(
                CONNECTOR_WAN,
                NODE_IP,
                &Frame::eth(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC)
                    .ipv4(CLOUD_POD, LOCAL_POD)
                    .icmp_error(
                        IcmpError::PortUnreachable,
                        &to_cloud(64, 8)[ETH_HEADER_LEN..],
                    )
                    .build(),
            ),
        ),
        seed(
            "xdp: our vxlan from the connector for an unlearned edge pod",
            tunnel(CONNECTOR_WAN, NODE_IP, &to_pod(CLOUD_POD, LOCAL_POD_2, 20)),
        ),
        seed(
            "xdp: our vxlan from edge-1 for a pod of the connector",
            tunnel(edge1, CONNECTOR_WAN, &to_pod(LOCAL_POD, CONNECTOR_POD, 64)),
        ),
        seed(
            "xdp: esp in udp from the connector",
            esp_from(CONNECTOR_WAN, &esp),
        ),
        seed("xdp: nat keepalive", esp_from(CONNECTOR_WAN, &[0xff])),
        seed(
            "xdp: non-esp marker (hello)",
            esp_from(Ipv4Addr::new(198, 18, 0, 77), &[0, 0, 0, 0, 1, 2, 3, 4]),
        ),
    ]);
    all
}

/// `(address, UDP port)` of every tunnel a frame may be sent into: each
/// peer's, as the peer table has it.
fn tunnel_destinations(dp: &TestDatapath) -> Result<Vec<([u8; 4], u16)>> {
    let flannel_port = dp.maps.config()?.flannel_port;
    Ok((0..64)
        .filter_map(|id| dp.maps.peer(id).ok())
        .filter_map(|p| match p.kind {
            peer_kind::TUNNEL => Some((p.underlay_ip, p.port)),
            peer_kind::FLANNEL_VTEP => Some((p.underlay_ip, flannel_port)),
            _ => None,
        })
        .collect())
}

/// Where the inner IPv4 header sits in a VXLAN frame XDP rewrites in place.
const XDP_INNER_IP: usize = ETH_HEADER_LEN + 20 + 8 + 8 + ETH_HEADER_LEN;

/// What is wrong with `frame` as a VXLAN frame XDP may finish, if anything:
/// one the kernel forwards or decapsulates (IPv4 checksums right, outer
/// and inner; lengths that agree). Returns its UDP checksum's state.
fn vxlan_input_problem(frame: &[u8]) -> Result<UdpChecksum> {
    use anyhow::ensure;
    use fabedge_tests::packet::ones_complement_sum;
    ensure!(
        frame.len() >= XDP_INNER_IP + 20,
        "sent on a {}-byte frame, too short for VXLAN",
        frame.len()
    );
    let ip = ETH_HEADER_LEN;
    let udp = ip + 20;
    let total = usize::from(u16::from_be_bytes([frame[ip + 2], frame[ip + 3]]));
    let udp_len = usize::from(u16::from_be_bytes([frame[udp + 4], frame[udp + 5]]));
    ensure!(
        ones_complement_sum(&frame[ip..ip + 20]) == 0xffff,
        "sent on a frame whose outer IPv4 checksum is wrong (the kernel drops it)"
    );
    ensure!(
        udp_len + 20 == total,
        "sent on a frame whose UDP length {udp_len} disagrees with its IPv4 total length \
         {total} (the kernel trims or drops it)"
    );
    let udp_check = u16::from_be_bytes([frame[udp + 6], frame[udp + 7]]);
    let src = Ipv4Addr::new(
        frame[ip + 12],
        frame[ip + 13],
        frame[ip + 14],
        frame[ip + 15],
    );
    let dst = Ipv4Addr::new(
        frame[ip + 16],
        frame[ip + 17],
        frame[ip + 18],
        frame[ip + 19],
    );
    ensure!(
        frame.len() >= ip + total,
        "sent on a frame shorter than its IPv4 total length (the kernel drops it)"
    );
    ensure!(
        ones_complement_sum(&frame[XDP_INNER_IP..XDP_INNER_IP + 20]) == 0xffff,
        "sent on a frame whose inner IPv4 checksum is wrong (the kernel drops it)"
    );
    Ok(if udp_check == 0 {
        UdpChecksum::Absent
    } else if l4_checksum(src, dst, UDP, &frame[udp..ip + total]) == 0 {
        UdpChecksum::Valid
    } else {
        UdpChecksum::Invalid
    })
}

/// An inner IPv4 packet (from its header on) with its TTL and header
/// checksum blanked: what XDP forwards unchanged.
fn beyond_ttl(packet: &[u8]) -> Vec<u8> {
    let mut copy = packet.to_vec();
    copy[8] = 0;
    copy[10..12].fill(0);
    copy
}

/// What is wrong with the inner packet `out_ip` (from its IPv4 header on)
/// that XDP made of `frame`'s: anything beyond its TTL, one less, and its
/// header checksum, right.
fn inner_forward_problem(frame: &[u8], out_ip: &[u8]) -> Result<()> {
    use anyhow::ensure;
    use fabedge_tests::packet::ones_complement_sum;
    ensure!(
        ones_complement_sum(&out_ip[..20]) == 0xffff,
        "inner IPv4 checksum wrong after the TTL decrement"
    );
    let (ttl_in, ttl_out) = (frame[XDP_INNER_IP + 8], out_ip[8]);
    ensure!(
        ttl_out.wrapping_add(1) == ttl_in && ttl_in > 1,
        "inner TTL {ttl_in} left as {ttl_out}"
    );
    ensure!(
        beyond_ttl(&frame[XDP_INNER_IP..]) == beyond_ttl(out_ip),
        "the inner packet changed beyond its TTL and checksum"
    );
    Ok(())
}

/// What is wrong with XDP sending `data` back out (TX or REDIRECT) in place
/// of `frame`, if anything: the input must be a frame the kernel forwards
/// ([`vxlan_input_problem`]), the output must go to a peer's tunnel with
/// its IPv4 checksums right, a UDP checksum absent, right or wrong exactly
/// as it came in, and the inner packet unchanged but for its TTL, one less,
/// and its header checksum.
fn xdp_rewrite_problem(frame: &[u8], data: &[u8], destinations: &[([u8; 4], u16)]) -> Result<()> {
    use anyhow::ensure;
    ensure!(
        data.len() == frame.len(),
        "rewrote a {}-byte frame into {} bytes (a rewrite is in place)",
        frame.len(),
        data.len()
    );
    // A UDP checksum is carried over, not verified: a wrong one must stay
    // wrong so that the receiving kernel drops the frame as ours would.
    let udp_in = vxlan_input_problem(frame)?;
    let out = parse_eth(data)?.ipv4()?;
    ensure!(
        out.checksum_valid,
        "outer IPv4 checksum wrong after the rewrite"
    );
    let out_udp = out.udp()?;
    ensure!(
        out_udp.checksum_status == udp_in,
        "UDP checksum {udp_in:?} on the way in but {:?} after the rewrite",
        out_udp.checksum_status
    );
    ensure!(
        destinations.contains(&(out.dst.octets(), out_udp.dst_port)),
        "sent toward {}:{}, which is no peer's tunnel {destinations:?}",
        out.dst,
        out_udp.dst_port
    );
    parse_eth(out_udp.vxlan()?.inner)?.ipv4()?;
    inner_forward_problem(frame, &data[XDP_INNER_IP..])
}

/// What is wrong with XDP redirecting `data` into a pod's veth in place of
/// `frame` (`--xdp-pod-rx`), if anything: the input must be a whole frame
/// the kernel decapsulates (lengths exact, a UDP checksum absent or right:
/// the kernel verifies it first), for a pod the agent learned; the output
/// is its inner frame as the pod bridge delivers it — the bridge's MAC to
/// the pod's, the packet unchanged but for its TTL, one less, and its
/// header checksum.
fn pod_delivery_problem(frame: &[u8], data: &[u8], pods: &[([u8; 4], Mac)]) -> Result<()> {
    use anyhow::ensure;
    ensure!(
        data.len() + XDP_INNER_IP == frame.len() + ETH_HEADER_LEN,
        "delivered {} bytes of a {}-byte frame (a decapsulation strips 50)",
        data.len(),
        frame.len()
    );
    let udp_in = vxlan_input_problem(frame)?;
    ensure!(
        udp_in != UdpChecksum::Invalid,
        "delivered a frame whose UDP checksum is wrong (the kernel drops it)"
    );
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    ensure!(
        frame.len() == ETH_HEADER_LEN + total,
        "delivered a frame with {} bytes behind its IPv4 packet",
        frame.len() - ETH_HEADER_LEN - total
    );
    let dst: [u8; 4] = frame[XDP_INNER_IP + 16..XDP_INNER_IP + 20].try_into()?;
    let Some((_, pod_mac)) = pods.iter().find(|(addr, _)| *addr == dst) else {
        anyhow::bail!("delivered to {dst:?}, which is no learned pod {pods:?}");
    };
    ensure!(
        data[..6] == pod_mac[..] && data[6..12] == BRIDGE_MAC[..] && data[12..14] == [0x08, 0],
        "delivered with Ethernet header {:02x?}, not the bridge's to the pod's",
        &data[..14]
    );
    inner_forward_problem(frame, &data[ETH_HEADER_LEN..])
}

struct XdpChecker {
    fixture: XdpFixture,
    /// `--xdp-pod-rx`: the pods learned (address, MAC), none without it.
    pods: Vec<([u8; 4], Mac)>,
    destinations: Vec<([u8; 4], u16)>,
    /// The lab's NICs (ifindex, MAC): a rewritten frame leaves with its
    /// NIC's MAC as source, by `XDP_TX` exactly when that is the ingress NIC.
    nics: [(u32, Mac); 2],
    /// The seed the current frame was made from.
    origin: &'static str,
    findings: Vec<String>,
    finding_count: usize,
}

impl XdpChecker {
    fn finding(&mut self, what: String, frame: &[u8], ifindex: u32) {
        self.finding_count += 1;
        if self.findings.len() < MAX_FINDINGS {
            self.findings.push(format!(
                "{XDP_UPLINK} in {:?} (pod rx {}), frame from {:?} on ifindex {ifindex}: \
                 {what}\n{}",
                self.fixture,
                !self.pods.is_empty(),
                self.origin,
                hexdump(frame)
            ));
        }
    }

    fn check(&mut self, frame: &[u8], ifindex: u32, out: &XdpOutcome) {
        let verdicts = self.fixture.verdicts(!self.pods.is_empty());
        if !verdicts.contains(&out.action) {
            let what = format!("verdict {} is not one of {verdicts:?}", out.action);
            return self.finding(what, frame, ifindex);
        }
        match out.action {
            XDP_DROP => {}
            XDP_PASS if out.data != frame => {
                let what = format!("XDP_PASS changed the frame into:\n{}", hexdump(&out.data));
                self.finding(what, frame, ifindex);
            }
            XDP_PASS => {}
            // Shorter by the outer headers: decapsulated into a pod's veth.
            XDP_REDIRECT if !self.pods.is_empty() && out.data.len() < frame.len() => {
                if let Err(e) = pod_delivery_problem(frame, &out.data, &self.pods) {
                    let what = format!("delivery to a pod: {e:#}\n{}", hexdump(&out.data));
                    self.finding(what, frame, ifindex);
                }
            }
            action => {
                let egress = self
                    .nics
                    .iter()
                    .find(|(_, mac)| out.data.get(6..12) == Some(&mac[..]))
                    .map(|&(index, _)| index);
                let problem = match egress {
                    Some(index) if (index == ifindex) == (action == XDP_TX) => {
                        xdp_rewrite_problem(frame, &out.data, &self.destinations)
                    }
                    _ => Err(anyhow::anyhow!(
                        "sent from NIC {egress:?} (by source MAC), arrived on {ifindex}"
                    )),
                };
                if let Err(e) = problem {
                    let what = format!("verdict {action}: {e:#}\n{}", hexdump(&out.data));
                    self.finding(what, frame, ifindex);
                }
            }
        }
    }

    /// Runs `frame` counting every counter: a drop must move exactly one
    /// drop counter by one, any other verdict none.
    fn run_counted(&mut self, dp: &TestDatapath, frame: &[u8], ifindex: u32) -> Result<u32> {
        let before = dp.counters();
        let out = run_xdp(dp, XDP_UPLINK, frame, ifindex)?;
        let drops = drop_deltas(&before, &dp.counters());
        let moved: u64 = drops.values().sum();
        let want = u64::from(out.action == XDP_DROP);
        if moved != want {
            let what = format!(
                "verdict {} moved drop counters {drops:?} (want {want} drop counted)",
                out.action
            );
            self.finding(what, frame, ifindex);
        }
        self.check(frame, ifindex, &out);
        Ok(out.action)
    }
}

/// A frame for XDP: random bytes now and then, mostly a mutated seed.
fn xdp_frame(rng: &mut Rng, seeds: &[Seed]) -> (&'static str, Vec<u8>) {
    if rng.chance(8) {
        return ("random bytes", random_frame(rng));
    }
    let seed = rng.pick(seeds);
    let mut frame = seed.frame.clone();
    if rng.chance(95) {
        mutate(rng, &mut frame);
    }
    (seed.name, frame)
}

fn fuzz_xdp_fixture(
    fixture: XdpFixture,
    pod_rx: bool,
    frames: u64,
    rng: &mut Rng,
    totals: &mut Totals,
) -> Result<(XdpChecker, Duration)> {
    let name = format!("fz-xdp-{fixture:?}-{}", u8::from(pod_rx));
    let lab = FibLab::new(&name)?;
    lab.netns.enter(|| {
        let cpu_started = thread_cpu_time();
        let mut dp = fixture.load(&name)?;
        let pods = if pod_rx {
            fixture.deliver_to_pods(&mut dp, &lab)?
        } else {
            Vec::new()
        };
        let seeds = xdp_seeds();
        let ifindexes = [lab.lan_ifindex, lab.wan_ifindex];
        let mut checker = XdpChecker {
            fixture,
            pods,
            destinations: tunnel_destinations(&dp)?,
            nics: [
                (lab.lan_ifindex, UPLINK_MAC),
                (lab.wan_ifindex, CONNECTOR_WAN_MAC),
            ],
            origin: "",
            findings: Vec::new(),
            finding_count: 0,
        };
        let mut batch: Vec<(&'static str, Vec<u8>, u32)> = Vec::with_capacity(BATCH);
        let mut done = 0u64;
        while done < frames {
            batch.clear();
            let n = (frames - done).min(BATCH as u64) as usize;
            let drops_before = drop_total(&dp);
            let mut drops = 0u64;
            while batch.len() < n {
                let index = done + batch.len() as u64;
                let (origin, frame) = xdp_frame(rng, &seeds);
                // XDP runs on anything with an Ethernet header.
                if frame.len() < ETH_HEADER_LEN {
                    totals.refused += 1;
                    continue;
                }
                let ifindex = *rng.pick(&ifindexes);
                checker.origin = origin;
                let action = if index.is_multiple_of(SAMPLE_EVERY) {
                    checker.run_counted(&dp, &frame, ifindex)?
                } else {
                    let out = run_xdp(&dp, XDP_UPLINK, &frame, ifindex)?;
                    checker.check(&frame, ifindex, &out);
                    out.action
                };
                drops += u64::from(action == XDP_DROP);
                *totals.verdicts.entry(action as i32).or_default() += 1;
                batch.push((origin, frame, ifindex));
            }
            let moved = drop_total(&dp) - drops_before;
            if moved != drops {
                // Find the frame: replay the batch counting each one.
                let before = checker.finding_count;
                for (origin, frame, ifindex) in &batch {
                    checker.origin = origin;
                    checker.run_counted(&dp, frame, *ifindex)?;
                }
                if checker.finding_count == before {
                    let what = format!(
                        "a batch of {n} frames gave {drops} drops but moved drop counters by \
                         {moved}; no single frame reproduced it on replay"
                    );
                    checker.finding(what, &[], 0);
                }
            }
            done += n as u64;
        }
        for problem in unconfigured_peer_stats(&dp)? {
            checker.finding(problem, &[], 0);
        }
        totals.frames += done;
        totals.count_flagged_paths(&dp);
        Ok((checker, thread_cpu_time() - cpu_started))
    })
}

/// `fe_xdp_uplink` on `FABEDGE_FUZZ_FRAMES` frames (default 1 M) in one
/// configuration, half of them with `--xdp-pod-rx`.
fn fuzz_xdp(fixture: XdpFixture) -> Result<()> {
    let frames = env_u64("FABEDGE_FUZZ_FRAMES")?.unwrap_or(DEFAULT_FRAMES);
    let seed = run_seed()?;
    println!(
        "{XDP_UPLINK} in {fixture:?}: seed {seed:#x} (replay with FABEDGE_FUZZ_SEED={seed:#x}), \
         {frames} frames"
    );
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut totals = Totals::new();
    let mut cpu = Duration::ZERO;
    let mut findings = Vec::new();
    let mut finding_count = 0;
    for pod_rx in [false, true] {
        let (mut checker, spent) =
            fuzz_xdp_fixture(fixture, pod_rx, frames.div_ceil(2), &mut rng, &mut totals)?;
        cpu += spent;
        finding_count += checker.finding_count;
        findings.append(&mut checker.findings);
    }
    println!(
        "{XDP_UPLINK} in {fixture:?}: {} frames in {:.1?} wall, {:.1?} CPU ({} more generated \
         shorter than an Ethernet header), verdicts {:?}, flagged paths {:?}, {finding_count} \
         finding(s)",
        totals.frames,
        started.elapsed(),
        cpu,
        totals.refused,
        totals.verdicts,
        totals.flagged_paths
    );
    assert!(
        finding_count == 0,
        "{finding_count} finding(s) with seed {seed:#x} (first {} below):\n\n{}",
        findings.len(),
        findings.join("\n\n")
    );
    Ok(())
}
