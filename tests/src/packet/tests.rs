//! Unit tests of the packet builders and parsers against published bytes and their own round trips.

use std::net::Ipv4Addr;

use anyhow::Result;

use super::build::{Frame, IcmpError, TcpFlags, icmp_quote};
use super::bytes::read_u16;
use super::checksum::{internet_checksum, ipv4_header_checksum, l4_checksum, ones_complement_sum};
use super::malformed::{rewrite_ipv4_header, truncated, with_ipv4_ihl, with_ipv4_total_length};
use super::parse::{UdpChecksum, parse_eth, parse_ipv4, parse_quoted_ipv4};
use super::text::{format_mac, hexdump, parse_mac};
use super::vxlan::vxlan_encap;
use super::*;

const MAC_A: Mac = [0x02, 0, 0, 0, 0, 0x0a];
const MAC_B: Mac = [0x02, 0, 0, 0, 0, 0x0b];
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 7);

fn hex(text: &str) -> Vec<u8> {
    let digits: Vec<char> = text.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(&pair.iter().collect::<String>(), 16).unwrap())
        .collect()
}

// --- checksums against published values ---

#[test]
fn ones_complement_sum_matches_rfc1071_example() {
    // RFC 1071 §3: these bytes sum to 0xddf2, so their checksum is 0x220d.
    let data = hex("00 01 f2 03 f4 f5 f6 f7");
    assert_eq!(ones_complement_sum(&data), 0xddf2);
    assert_eq!(internet_checksum(&data), 0x220d);
}

#[test]
fn odd_trailing_byte_is_the_high_byte_of_a_word() {
    assert_eq!(ones_complement_sum(&[0x01]), 0x0100);
    // 0xabcd + 0xef00 = 0x19acd, folded to 0x9ace.
    assert_eq!(ones_complement_sum(&[0xab, 0xcd, 0xef]), 0x9ace);
}

#[test]
fn ipv4_header_checksum_matches_published_headers() {
    // Wikipedia "IPv4 header checksum" examples, with the checksum each carries.
    for (header, published) in [
        ("4500 0073 0000 4000 4011 b861 c0a8 0001 c0a8 00c7", 0xb861),
        ("4500 003c 1c46 4000 4006 b1e6 ac10 0a63 ac10 0a0c", 0xb1e6),
    ] {
        let header = hex(header);
        assert_eq!(ipv4_header_checksum(&header), published);
        assert_eq!(
            ones_complement_sum(&header),
            0xffff,
            "a correct header sums to 0xffff"
        );
        assert!(parse_quoted_ipv4(&header).unwrap().checksum_valid);
    }
}

#[test]
fn builder_reproduces_a_published_ipv4_header_byte_for_byte() {
    let published = hex("4500 0073 0000 4000 4011 b861 c0a8 0001 c0a8 00c7");
    let packet = Frame::ipv4(
        Ipv4Addr::new(192, 168, 0, 1),
        Ipv4Addr::new(192, 168, 0, 199),
    )
    .dont_fragment(true)
    .protocol(ip_proto::UDP)
    .payload(&[0; 0x73 - IPV4_HEADER_LEN])
    .build();
    assert_eq!(&packet[..IPV4_HEADER_LEN], &published[..]);
}

#[test]
fn udp_checksum_matches_a_published_dns_query() {
    // A DNS PTR query 192.168.2.145:1560 → 192.168.1.1:53 whose published checksum
    // is 0xe7dd (a well-known Stack Overflow worked example).
    let dns_query = hex(
        "0001 0100 0001 0000 0000 0000 0131 0131 0331 3638 0331 3932 0769 6e2d 6164 6472 0461 7270 6100 000c 0001",
    );
    let (src, dst) = (
        Ipv4Addr::new(192, 168, 2, 145),
        Ipv4Addr::new(192, 168, 1, 1),
    );
    let packet = Frame::ipv4(src, dst)
        .udp(1560, 53)
        .payload(&dns_query)
        .build();
    let udp = parse_ipv4(&packet).unwrap().udp().unwrap();
    assert_eq!(udp.length, 0x32);
    assert_eq!(udp.checksum, 0xe7dd);
    assert_eq!(udp.checksum_status, UdpChecksum::Valid);

    let mut segment = packet[IPV4_HEADER_LEN..].to_vec();
    segment[UDP_CHECKSUM_AT..UDP_CHECKSUM_AT + 2].fill(0);
    assert_eq!(l4_checksum(src, dst, ip_proto::UDP, &segment), 0xe7dd);
}

#[test]
fn ipv4_header_checksum_ignores_the_field_it_fills() {
    let packet = Frame::ipv4(POD_A, POD_B).ttl(3).id(0x1234).build();
    let header = &packet[..IPV4_HEADER_LEN];
    let mut zeroed = header.to_vec();
    zeroed[IPV4_CHECKSUM_AT..IPV4_CHECKSUM_AT + 2].fill(0);
    assert_eq!(ipv4_header_checksum(header), ipv4_header_checksum(&zeroed));
    assert_eq!(
        ipv4_header_checksum(header),
        read_u16(header, IPV4_CHECKSUM_AT).unwrap()
    );
}

#[test]
fn every_built_checksum_resums_to_all_ones() {
    let payloads: [&[u8]; 4] = [b"", b"x", b"even", &[0xff; 1001]];
    for payload in payloads {
        let udp = Frame::ipv4(POD_A, POD_B)
            .udp(5353, 53)
            .payload(payload)
            .build();
        let tcp = Frame::ipv4(POD_A, POD_B)
            .tcp(40000, 80)
            .seq(7)
            .payload(payload)
            .build();
        let icmp = Frame::ipv4(POD_A, POD_B)
            .icmp_echo_request(9, 1)
            .payload(payload)
            .build();
        for packet in [&udp, &tcp, &icmp] {
            assert_eq!(ones_complement_sum(&packet[..IPV4_HEADER_LEN]), 0xffff);
        }
        for (packet, protocol) in [(&udp, ip_proto::UDP), (&tcp, ip_proto::TCP)] {
            let segment = &packet[IPV4_HEADER_LEN..];
            assert_eq!(
                l4_checksum(POD_A, POD_B, protocol, segment),
                0,
                "payload {} bytes",
                payload.len()
            );
        }
        assert_eq!(ones_complement_sum(&icmp[IPV4_HEADER_LEN..]), 0xffff);
    }
}

#[test]
fn udp_checksum_that_computes_to_zero_is_sent_as_all_ones() {
    // With checksum field and payload word zero the segment sums to S, and its
    // checksum is !S; using !S as the payload word makes the sum 0xffff, checksum 0.
    let base = Frame::ipv4(POD_A, POD_B)
        .udp(1, 2)
        .payload(&[0, 0])
        .zero_checksum()
        .build();
    let filler = l4_checksum(POD_A, POD_B, ip_proto::UDP, &base[IPV4_HEADER_LEN..]).to_be_bytes();
    let packet = Frame::ipv4(POD_A, POD_B).udp(1, 2).payload(&filler).build();
    let udp = parse_ipv4(&packet).unwrap().udp().unwrap();
    assert_eq!(udp.checksum, 0xffff);
    assert_eq!(udp.checksum_status, UdpChecksum::Valid);
}

// --- round trips ---

#[test]
fn ethernet_round_trip_with_raw_payload() {
    let frame = Frame::eth(MAC_A, MAC_B)
        .ethertype(ethertype::ARP)
        .payload(b"arp?")
        .build();
    let eth = parse_eth(&frame).unwrap();
    assert_eq!(
        (eth.src, eth.dst, eth.ethertype, eth.payload),
        (MAC_A, MAC_B, ethertype::ARP, &b"arp?"[..])
    );
    assert_eq!(&frame[..6], &MAC_B, "destination comes first on the wire");
    assert!(eth.ipv4().unwrap_err().to_string().contains("not IPv4"));
}

#[test]
fn ipv4_round_trip_keeps_every_field() {
    let frame = Frame::eth(MAC_A, MAC_B)
        .ipv4(POD_A, POD_B)
        .ttl(17)
        .id(0xbeef)
        .tos(0xb8)
        .dont_fragment(true)
        .protocol(47)
        .payload(b"gre?")
        .build();
    let ip = parse_eth(&frame).unwrap().ipv4().unwrap();
    assert_eq!(ip.header_len, IPV4_HEADER_LEN);
    assert_eq!(
        (ip.src, ip.dst, ip.ttl, ip.id, ip.tos, ip.protocol),
        (POD_A, POD_B, 17, 0xbeef, 0xb8, 47)
    );
    assert!(ip.dont_fragment && !ip.more_fragments && ip.fragment_offset == 0);
    assert_eq!(ip.total_length, 24);
    assert!(ip.checksum_valid);
    assert_eq!(ip.payload, b"gre?");
}

#[test]
fn ipv4_parser_ignores_ethernet_padding() {
    let mut frame = Frame::eth(MAC_A, MAC_B)
        .ipv4(POD_A, POD_B)
        .udp(1, 2)
        .build();
    frame.resize(60, 0); // minimum Ethernet frame size without FCS
    let udp = parse_eth(&frame).unwrap().ipv4().unwrap().udp().unwrap();
    assert_eq!(udp.payload, b"");
    assert_eq!(udp.checksum_status, UdpChecksum::Valid);
}

#[test]
fn bad_header_checksum_is_reported_not_rejected() {
    let frame = Frame::eth(MAC_A, MAC_B)
        .ipv4(POD_A, POD_B)
        .header_checksum(0x1234)
        .build();
    let ip = parse_eth(&frame).unwrap().ipv4().unwrap();
    assert_eq!(ip.checksum, 0x1234);
    assert!(!ip.checksum_valid);
}

#[test]
fn udp_round_trip_and_checksum_choices() {
    let frame = Frame::eth(MAC_A, MAC_B)
        .ipv4(POD_A, POD_B)
        .udp(1234, 53)
        .payload(b"q")
        .build();
    let udp = parse_eth(&frame).unwrap().ipv4().unwrap().udp().unwrap();
    assert_eq!(
        (udp.src_port, udp.dst_port, udp.length, udp.payload),
        (1234, 53, 9, &b"q"[..])
    );
    assert_eq!(udp.checksum_status, UdpChecksum::Valid);

    let zero = Frame::eth(MAC_A, MAC_B)
        .ipv4(POD_A, POD_B)
        .udp(1234, 53)
        .zero_checksum()
        .build();
    assert_eq!(
        parse_eth(&zero)
            .unwrap()
            .ipv4()
            .unwrap()
            .udp()
            .unwrap()
            .checksum_status,
        UdpChecksum::Absent
    );

    let bad = Frame::eth(MAC_A, MAC_B)
        .ipv4(POD_A, POD_B)
        .udp(1234, 53)
        .checksum(0xdead)
        .build();
    assert_eq!(
        parse_eth(&bad)
            .unwrap()
            .ipv4()
            .unwrap()
            .udp()
            .unwrap()
            .checksum_status,
        UdpChecksum::Invalid
    );
}

#[test]
fn udp_checksum_covers_the_pseudo_header() {
    let frame = Frame::eth(MAC_A, MAC_B)
        .ipv4(POD_A, POD_B)
        .udp(1234, 53)
        .payload(b"q")
        .build();
    // Rewrite the destination address (as a DNAT without L4 fix-up would).
    let mut natted = frame.clone();
    natted[ETH_HEADER_LEN + 16..ETH_HEADER_LEN + 20].copy_from_slice(&[10, 96, 0, 10]);
    let natted = rewrite_ipv4_header(&natted, |_| {}).unwrap();
    let ip = parse_eth(&natted).unwrap().ipv4().unwrap();
    assert!(ip.checksum_valid);
    assert_eq!(ip.udp().unwrap().checksum_status, UdpChecksum::Invalid);
}

#[test]
fn tcp_round_trip_with_flags_options_and_payload() {
    let frame = Frame::eth(MAC_A, MAC_B)
        .ipv4(POD_A, POD_B)
        .tcp(40000, 443)
        .seq(0x0102_0304)
        .ack(0x0a0b_0c0d)
        .flags(TcpFlags::SYN | TcpFlags::ACK)
        .window(29200)
        .mss(1360)
        .payload(b"hello")
        .build();
    let ip = parse_eth(&frame).unwrap().ipv4().unwrap();
    let tcp = ip.tcp().unwrap();
    assert_eq!(
        (tcp.src_port, tcp.dst_port, tcp.seq, tcp.ack),
        (40000, 443, 0x0102_0304, 0x0a0b_0c0d)
    );
    assert_eq!(tcp.flags, TcpFlags::SYN | TcpFlags::ACK);
    assert!(tcp.flags.contains(TcpFlags::SYN) && !tcp.flags.contains(TcpFlags::RST));
    assert_eq!(
        (tcp.window, tcp.header_len, tcp.mss()),
        (29200, 24, Some(1360))
    );
    assert_eq!(tcp.payload, b"hello");
    assert!(tcp.checksum_valid);

    let bad = Frame::ipv4(POD_A, POD_B).tcp(1, 2).checksum(0).build();
    assert!(!parse_ipv4(&bad).unwrap().tcp().unwrap().checksum_valid);
}

#[test]
fn tcp_mss_is_found_after_other_options() {
    let segment_with = |options: &[u8]| {
        let mut packet = Frame::ipv4(POD_A, POD_B).tcp(1, 2).build();
        packet.extend_from_slice(options);
        let data_offset = ((TCP_HEADER_LEN + options.len()) / 4) as u8;
        packet[IPV4_HEADER_LEN + 12] = data_offset << 4;
        let total = packet.len() as u16;
        packet[2..4].copy_from_slice(&total.to_be_bytes());
        packet
    };
    // NOP, NOP, SACK-permitted (4, 2), MSS 1460.
    let packet = segment_with(&[1, 1, 4, 2, 2, 4, 0x05, 0xb4]);
    assert_eq!(
        parse_ipv4(&packet).unwrap().tcp().unwrap().mss(),
        Some(1460)
    );
    // A zero option length would loop forever if trusted.
    let packet = segment_with(&[8, 0, 0, 0]);
    assert_eq!(parse_ipv4(&packet).unwrap().tcp().unwrap().mss(), None);
}

#[test]
fn tcp_flags_print_like_tcpdump() {
    assert_eq!(format!("{:?}", TcpFlags::SYN | TcpFlags::ACK), "SYN|ACK");
    assert_eq!(format!("{:?}", TcpFlags::NONE), "NONE");
}

#[test]
fn icmp_echo_round_trip() {
    for (request, frame) in [
        (
            true,
            Frame::eth(MAC_A, MAC_B)
                .ipv4(POD_A, POD_B)
                .icmp_echo_request(0x4242, 7)
                .payload(b"ping")
                .build(),
        ),
        (
            false,
            Frame::eth(MAC_B, MAC_A)
                .ipv4(POD_B, POD_A)
                .icmp_echo_reply(0x4242, 7)
                .payload(b"ping")
                .build(),
        ),
    ] {
        let icmp = parse_eth(&frame).unwrap().ipv4().unwrap().icmp().unwrap();
        let expected_type = if request {
            icmp_type::ECHO_REQUEST
        } else {
            icmp_type::ECHO_REPLY
        };
        assert_eq!((icmp.icmp_type, icmp.code), (expected_type, 0));
        assert_eq!((icmp.echo_id(), icmp.echo_seq()), (Some(0x4242), Some(7)));
        assert_eq!(icmp.body, b"ping");
        assert!(icmp.checksum_valid);
        assert!(icmp.next_hop_mtu().is_none());
        assert!(icmp.quoted_packet().is_err(), "an echo quotes nothing");
    }
}

#[test]
fn icmp_errors_quote_the_original_header_and_eight_bytes() {
    let original = Frame::ipv4(POD_A, POD_B)
        .ttl(1)
        .udp(5000, 53)
        .payload(b"a long question")
        .build();
    let router = Ipv4Addr::new(10, 244, 2, 1);
    let cases = [
        (
            IcmpError::PortUnreachable,
            icmp_type::DEST_UNREACHABLE,
            icmp_code::PORT_UNREACHABLE,
        ),
        (
            IcmpError::HostUnreachable,
            icmp_type::DEST_UNREACHABLE,
            icmp_code::HOST_UNREACHABLE,
        ),
        (
            IcmpError::NetUnreachable,
            icmp_type::DEST_UNREACHABLE,
            icmp_code::NET_UNREACHABLE,
        ),
        (
            IcmpError::FragmentationNeeded { next_hop_mtu: 1400 },
            icmp_type::DEST_UNREACHABLE,
            icmp_code::FRAGMENTATION_NEEDED,
        ),
        (
            IcmpError::TtlExceeded,
            icmp_type::TIME_EXCEEDED,
            icmp_code::TTL_EXCEEDED_IN_TRANSIT,
        ),
        (
            IcmpError::Other {
                icmp_type: 12,
                code: 0,
            },
            12,
            0,
        ),
    ];
    for (error, expected_type, expected_code) in cases {
        let frame = Frame::eth(MAC_B, MAC_A)
            .ipv4(router, POD_A)
            .icmp_error(error, &original)
            .build();
        let icmp = parse_eth(&frame).unwrap().ipv4().unwrap().icmp().unwrap();
        assert_eq!(
            (icmp.icmp_type, icmp.code),
            (expected_type, expected_code),
            "{error:?}"
        );
        assert!(icmp.checksum_valid);
        assert_eq!(icmp.body, &original[..IPV4_HEADER_LEN + 8]);
        if expected_type == 12 {
            continue; // not an error type this module knows how to unquote
        }
        let quoted = icmp.quoted_packet().unwrap();
        assert_eq!((quoted.src, quoted.dst, quoted.ttl), (POD_A, POD_B, 1));
        assert_eq!(quoted.ports().unwrap(), (5000, 53));
        assert_eq!(
            usize::from(quoted.total_length),
            original.len(),
            "the original's length, not the quote's"
        );
        assert!(quoted.checksum_valid);
    }
    let frag_needed = Frame::ipv4(router, POD_A)
        .icmp_error(
            IcmpError::FragmentationNeeded { next_hop_mtu: 1400 },
            &original,
        )
        .build();
    assert_eq!(
        parse_ipv4(&frag_needed)
            .unwrap()
            .icmp()
            .unwrap()
            .next_hop_mtu(),
        Some(1400)
    );
}

#[test]
fn icmp_error_about_a_short_packet_quotes_what_there_is() {
    let stub = [0x45, 0, 0, 20];
    assert_eq!(icmp_quote(&stub), &stub);
    let frame = Frame::ipv4(POD_B, POD_A)
        .icmp_error(IcmpError::PortUnreachable, &stub)
        .build();
    let icmp = parse_ipv4(&frame).unwrap().icmp().unwrap();
    assert_eq!(icmp.body, &stub);
    assert!(icmp.quoted_packet().is_err());
}

#[test]
fn vxlan_nests_a_whole_frame() {
    let inner = Frame::eth(MAC_A, MAC_B)
        .ipv4(POD_A, POD_B)
        .udp(1234, 53)
        .payload(b"q")
        .build();
    let (node_mac_a, node_mac_b) = ([0x52, 0x54, 0, 0, 0, 1], [0x52, 0x54, 0, 0, 0, 2]);
    let (node_a, node_b) = (
        Ipv4Addr::new(192, 168, 1, 10),
        Ipv4Addr::new(192, 168, 1, 20),
    );
    let frame = vxlan_encap(
        Frame::eth(node_mac_a, node_mac_b),
        node_a,
        node_b,
        40001,
        VXLAN_UDP_PORT,
        0x0abcde,
        &inner,
    );
    assert_eq!(
        frame.len(),
        ETH_HEADER_LEN + IPV4_HEADER_LEN + UDP_HEADER_LEN + VXLAN_HEADER_LEN + inner.len()
    );

    let outer_eth = parse_eth(&frame).unwrap();
    assert_eq!((outer_eth.src, outer_eth.dst), (node_mac_a, node_mac_b));
    let outer_ip = outer_eth.ipv4().unwrap();
    assert_eq!(
        (outer_ip.src, outer_ip.dst, outer_ip.protocol),
        (node_a, node_b, ip_proto::UDP)
    );
    assert!(outer_ip.checksum_valid);
    let outer_udp = outer_ip.udp().unwrap();
    assert_eq!(
        (outer_udp.src_port, outer_udp.dst_port),
        (40001, VXLAN_UDP_PORT)
    );
    assert_eq!(
        outer_udp.checksum_status,
        UdpChecksum::Absent,
        "Linux VXLAN sends no outer checksum"
    );
    let vxlan = outer_udp.vxlan().unwrap();
    assert_eq!((vxlan.flags, vxlan.vni), (VXLAN_FLAG_VNI_VALID, 0x0abcde));
    assert!(vxlan.vni_valid());
    assert_eq!(vxlan.inner, &inner[..]);

    let inner_udp = parse_eth(vxlan.inner)
        .unwrap()
        .ipv4()
        .unwrap()
        .udp()
        .unwrap();
    assert_eq!((inner_udp.dst_port, inner_udp.payload), (53, &b"q"[..]));
    assert_eq!(inner_udp.checksum_status, UdpChecksum::Valid);
}

#[test]
fn vxlan_with_outer_checksum_and_oversized_vni() {
    let inner = Frame::eth(MAC_A, MAC_B)
        .ipv4(POD_A, POD_B)
        .icmp_echo_request(1, 1)
        .build();
    let frame = Frame::eth(MAC_A, MAC_B)
        .ipv4(
            Ipv4Addr::new(192, 168, 1, 10),
            Ipv4Addr::new(192, 168, 1, 20),
        )
        .udp(50000, 8472)
        .vxlan(0x0100_0001, &inner)
        .build();
    let udp = parse_eth(&frame).unwrap().ipv4().unwrap().udp().unwrap();
    assert_eq!(udp.checksum_status, UdpChecksum::Valid);
    assert_eq!(udp.vxlan().unwrap().vni, 1, "only 24 bits of VNI are sent");
}

// --- malformed input ---

/// Parses a frame as deep as its headers say, the way a test would.
fn parse_all(frame: &[u8]) -> Result<()> {
    let ip = parse_eth(frame)?.ipv4()?;
    match ip.protocol {
        ip_proto::UDP => {
            let udp = ip.udp()?;
            if udp.dst_port == VXLAN_UDP_PORT {
                return parse_all(udp.vxlan()?.inner);
            }
        }
        ip_proto::TCP => {
            ip.tcp()?;
        }
        ip_proto::ICMP => {
            // Quoting may fail in a truncated error; the ICMP header must not.
            let _quoted = ip.icmp()?.quoted_packet();
        }
        _ => {}
    }
    Ok(())
}

#[test]
fn every_truncation_is_an_error_never_a_panic() {
    let inner = Frame::eth(MAC_A, MAC_B)
        .ipv4(POD_A, POD_B)
        .udp(1, 2)
        .payload(b"inner")
        .build();
    let frames = [
        Frame::eth(MAC_A, MAC_B)
            .ipv4(POD_A, POD_B)
            .udp(1234, 53)
            .payload(b"q")
            .build(),
        Frame::eth(MAC_A, MAC_B)
            .ipv4(POD_A, POD_B)
            .tcp(1, 2)
            .mss(1400)
            .payload(b"data")
            .build(),
        Frame::eth(MAC_A, MAC_B)
            .ipv4(POD_A, POD_B)
            .icmp_echo_request(1, 2)
            .payload(b"x")
            .build(),
        Frame::eth(MAC_A, MAC_B)
            .ipv4(POD_B, POD_A)
            .icmp_error(IcmpError::PortUnreachable, &inner[14..])
            .build(),
        vxlan_encap(
            Frame::eth(MAC_A, MAC_B),
            POD_A,
            POD_B,
            1,
            VXLAN_UDP_PORT,
            5,
            &inner,
        ),
    ];
    for frame in &frames {
        parse_all(frame).unwrap();
        for len in 0..frame.len() {
            let short = truncated(frame, len);
            assert!(
                parse_all(&short).is_err(),
                "truncated to {len} bytes:\n{}",
                hexdump(&short)
            );
        }
    }
    assert_eq!(truncated(&frames[0], 10_000), frames[0]);
}

#[test]
fn truncated_inner_frame_fails_at_the_inner_layer() {
    let inner = Frame::eth(MAC_A, MAC_B)
        .ipv4(POD_A, POD_B)
        .udp(1, 2)
        .payload(b"inner")
        .build();
    let frame = vxlan_encap(
        Frame::eth(MAC_A, MAC_B),
        POD_A,
        POD_B,
        1,
        VXLAN_UDP_PORT,
        5,
        &inner[..30],
    );
    let vxlan = parse_eth(&frame)
        .unwrap()
        .ipv4()
        .unwrap()
        .udp()
        .unwrap()
        .vxlan()
        .unwrap();
    let error = parse_eth(vxlan.inner).unwrap().ipv4().unwrap_err();
    assert!(error.to_string().contains("truncated"), "{error}");
}

#[test]
fn wrong_ihl_is_rejected_or_misparsed_as_a_receiver_would() {
    let frame = Frame::eth(MAC_A, MAC_B)
        .ipv4(POD_A, POD_B)
        .udp(1234, 53)
        .payload(b"q")
        .build();

    let too_small = with_ipv4_ihl(&frame, 4).unwrap();
    let error = parse_eth(&too_small).unwrap().ipv4().unwrap_err();
    assert!(error.to_string().contains("IHL 4"), "{error}");

    // IHL 6 swallows the UDP ports as options; the checksum we wrote covers 20 bytes.
    let too_big = with_ipv4_ihl(&frame, 6).unwrap();
    let ip = parse_eth(&too_big).unwrap().ipv4().unwrap();
    assert_eq!((ip.header_len, ip.options.len()), (24, 4));
    assert!(!ip.checksum_valid);

    let past_the_end = with_ipv4_ihl(&truncated(&frame, ETH_HEADER_LEN + 24), 15).unwrap();
    assert!(parse_eth(&past_the_end).unwrap().ipv4().is_err());

    assert!(with_ipv4_ihl(&frame, 16).is_err());
    assert!(
        with_ipv4_ihl(&frame[..20], 5)
            .unwrap_err()
            .to_string()
            .contains("no room")
    );
}

#[test]
fn bad_total_length_is_rejected() {
    let frame = Frame::eth(MAC_A, MAC_B)
        .ipv4(POD_A, POD_B)
        .udp(1234, 53)
        .payload(b"q")
        .build();
    let ip_len = (frame.len() - ETH_HEADER_LEN) as u16;

    let beyond = with_ipv4_total_length(&frame, ip_len + 1).unwrap();
    let error = parse_eth(&beyond).unwrap().ipv4().unwrap_err();
    assert!(error.to_string().contains("truncated"), "{error}");

    let below_header = with_ipv4_total_length(&frame, 19).unwrap();
    let error = parse_eth(&below_header).unwrap().ipv4().unwrap_err();
    assert!(
        error
            .to_string()
            .contains("shorter than its 20-byte header"),
        "{error}"
    );

    // Shorter than the UDP datagram: the IP layer is fine, the UDP length is not.
    let cut = with_ipv4_total_length(&frame, ip_len - 1).unwrap();
    let ip = parse_eth(&cut).unwrap().ipv4().unwrap();
    assert!(ip.checksum_valid);
    assert!(
        ip.udp()
            .unwrap_err()
            .to_string()
            .contains("UDP length 9 exceeds")
    );
}

#[test]
fn parsers_name_the_protocol_they_expected() {
    let tcp = Frame::ipv4(POD_A, POD_B).tcp(1, 2).build();
    let error = parse_ipv4(&tcp).unwrap().udp().unwrap_err();
    assert!(error.to_string().contains("not UDP"), "{error}");
    let mut ipv6ish = tcp.clone();
    ipv6ish[0] = 0x60;
    assert!(
        parse_ipv4(&ipv6ish)
            .unwrap_err()
            .to_string()
            .contains("version is 6")
    );
}

#[test]
fn fragments_are_not_parsed_as_whole_datagrams() {
    let mut packet = Frame::ipv4(POD_A, POD_B)
        .udp(1, 2)
        .payload(b"first part")
        .build();
    packet[6] |= 0x20; // more fragments
    let ip = parse_ipv4(&packet).unwrap();
    assert!(ip.is_fragment());
    assert!(ip.udp().unwrap_err().to_string().contains("fragment"));
    assert_eq!(ip.ports().unwrap(), (1, 2));
}

#[test]
fn macs_format_and_parse() {
    assert_eq!(format_mac(&MAC_A), "02:00:00:00:00:0a");
    assert_eq!(parse_mac("02:00:00:00:00:0A").unwrap(), MAC_A);
    for bad in [
        "02:00:00:00:00",
        "02:00:00:00:00:0a:00",
        "02:00:00:00:00:zz",
        "2:00:00:00:00:0a0",
    ] {
        assert!(parse_mac(bad).is_err(), "{bad}");
    }
}

#[test]
fn hexdump_rows_are_sixteen_bytes() {
    let dump = hexdump(&[0xab; 17]);
    assert_eq!(
        dump,
        format!("0000  {}\n0010  ab\n", vec!["ab"; 16].join(" "))
    );
}
