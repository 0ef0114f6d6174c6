//! Parsers for Ethernet, IPv4, UDP, TCP and ICMP that report what is wrong instead of panicking.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, ensure};

use super::build::TcpFlags;
use super::bytes::{read_array, read_ipv4, read_u16, read_u32};
use super::checksum::{l4_checksum, ones_complement_sum};
use super::vxlan::{VxlanPacket, parse_vxlan};
use super::{
    ETH_HEADER_LEN, ICMP_CHECKSUM_AT, ICMP_HEADER_LEN, IPV4_CHECKSUM_AT, IPV4_FLAG_DONT_FRAGMENT,
    IPV4_FLAG_MORE_FRAGMENTS, IPV4_FRAGMENT_OFFSET_MASK, IPV4_HEADER_LEN, Mac, TCP_CHECKSUM_AT,
    TCP_HEADER_LEN, TCP_OPTION_END, TCP_OPTION_MSS, TCP_OPTION_NOP, UDP_CHECKSUM_AT,
    UDP_HEADER_LEN, ethertype, icmp_code, icmp_type, ip_proto,
};

/// A parsed Ethernet frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EthFrame<'a> {
    pub dst: Mac,
    pub src: Mac,
    pub ethertype: u16,
    pub payload: &'a [u8],
}

pub fn parse_eth(frame: &[u8]) -> Result<EthFrame<'_>> {
    ensure!(
        frame.len() >= ETH_HEADER_LEN,
        "Ethernet header truncated: {} bytes, need {ETH_HEADER_LEN}",
        frame.len()
    );
    Ok(EthFrame {
        dst: read_array(frame, 0)?,
        src: read_array(frame, 6)?,
        ethertype: read_u16(frame, 12)?,
        payload: &frame[ETH_HEADER_LEN..],
    })
}

impl<'a> EthFrame<'a> {
    /// The IPv4 packet inside; an error if the EtherType is not IPv4.
    pub fn ipv4(&self) -> Result<Ipv4Packet<'a>> {
        ensure!(
            self.ethertype == ethertype::IPV4,
            "EtherType is {:#06x}, not IPv4 ({:#06x})",
            self.ethertype,
            ethertype::IPV4
        );
        parse_ipv4(self.payload)
    }
}

/// A parsed IPv4 packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv4Packet<'a> {
    /// Header length in bytes (IHL × 4).
    pub header_len: usize,
    pub tos: u8,
    pub total_length: u16,
    pub id: u16,
    pub dont_fragment: bool,
    pub more_fragments: bool,
    /// In 8-byte units, as on the wire.
    pub fragment_offset: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub checksum: u16,
    /// Whether the header sums to `0xffff` with its checksum.
    pub checksum_valid: bool,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub options: &'a [u8],
    /// The data the total length covers (Ethernet padding after it is dropped). In a
    /// packet quoted by an ICMP error, only the data that was quoted.
    pub payload: &'a [u8],
}

/// Parses an IPv4 packet (starting at its header). Bytes past the total length
/// (Ethernet padding) are ignored; fewer bytes than the total length is an error.
pub fn parse_ipv4(packet: &[u8]) -> Result<Ipv4Packet<'_>> {
    parse_ipv4_with(packet, TruncatedPayload::Reject)
}

/// Parses the original packet an ICMP error quotes: the header must be whole, but the
/// data may stop short of the total length (usually 8 bytes are quoted).
pub fn parse_quoted_ipv4(packet: &[u8]) -> Result<Ipv4Packet<'_>> {
    parse_ipv4_with(packet, TruncatedPayload::Accept)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TruncatedPayload {
    Reject,
    Accept,
}

fn parse_ipv4_with(packet: &[u8], truncated_payload: TruncatedPayload) -> Result<Ipv4Packet<'_>> {
    ensure!(
        packet.len() >= IPV4_HEADER_LEN,
        "IPv4 header truncated: {} bytes, need at least {IPV4_HEADER_LEN}",
        packet.len()
    );
    let version = packet[0] >> 4;
    ensure!(version == 4, "IP version is {version}, not 4");
    let header_len = usize::from(packet[0] & 0x0f) * 4;
    ensure!(
        header_len >= IPV4_HEADER_LEN,
        "IPv4 IHL {} is below the minimum of 5 (a 20-byte header)",
        header_len / 4
    );
    ensure!(
        packet.len() >= header_len,
        "IPv4 header truncated: IHL says {header_len} bytes, only {} present",
        packet.len()
    );
    let total_length = read_u16(packet, 2)?;
    ensure!(
        usize::from(total_length) >= header_len,
        "IPv4 total length {total_length} is shorter than its {header_len}-byte header"
    );
    let end = match truncated_payload {
        TruncatedPayload::Reject => {
            ensure!(
                usize::from(total_length) <= packet.len(),
                "IPv4 packet truncated: total length {total_length}, only {} bytes present",
                packet.len()
            );
            usize::from(total_length)
        }
        TruncatedPayload::Accept => usize::from(total_length).min(packet.len()),
    };
    let flags_and_offset = read_u16(packet, 6)?;
    let header = &packet[..header_len];
    Ok(Ipv4Packet {
        header_len,
        tos: packet[1],
        total_length,
        id: read_u16(packet, 4)?,
        dont_fragment: flags_and_offset & IPV4_FLAG_DONT_FRAGMENT != 0,
        more_fragments: flags_and_offset & IPV4_FLAG_MORE_FRAGMENTS != 0,
        fragment_offset: flags_and_offset & IPV4_FRAGMENT_OFFSET_MASK,
        ttl: packet[8],
        protocol: packet[9],
        checksum: read_u16(packet, IPV4_CHECKSUM_AT)?,
        checksum_valid: ones_complement_sum(header) == 0xffff,
        src: read_ipv4(packet, 12)?,
        dst: read_ipv4(packet, 16)?,
        options: &packet[IPV4_HEADER_LEN..header_len],
        payload: &packet[header_len..end],
    })
}

impl<'a> Ipv4Packet<'a> {
    pub fn is_fragment(&self) -> bool {
        self.more_fragments || self.fragment_offset != 0
    }

    pub fn udp(&self) -> Result<UdpDatagram<'a>> {
        parse_udp(self)
    }

    pub fn tcp(&self) -> Result<TcpSegment<'a>> {
        parse_tcp(self)
    }

    pub fn icmp(&self) -> Result<IcmpMessage<'a>> {
        parse_icmp(self)
    }

    /// Source and destination port of a TCP or UDP payload, from its first 4 bytes —
    /// enough for the 8 bytes an ICMP error quotes.
    pub fn ports(&self) -> Result<(u16, u16)> {
        ensure!(
            self.protocol == ip_proto::TCP || self.protocol == ip_proto::UDP,
            "IPv4 protocol {} has no ports (want TCP or UDP)",
            self.protocol
        );
        ensure!(
            self.payload.len() >= 4,
            "{} data bytes, need 4 for the ports",
            self.payload.len()
        );
        Ok((read_u16(self.payload, 0)?, read_u16(self.payload, 2)?))
    }

    /// Checks the protocol and that the whole L4 message is here.
    fn expect_l4(&self, protocol: u8, name: &str) -> Result<()> {
        ensure!(
            self.protocol == protocol,
            "IPv4 protocol is {}, not {name} ({protocol})",
            self.protocol
        );
        ensure!(
            !self.is_fragment(),
            "{} → {} is a fragment (offset {}, more fragments {}); {name} needs the whole datagram",
            self.src,
            self.dst,
            self.fragment_offset,
            self.more_fragments
        );
        Ok(())
    }
}

/// What a UDP checksum says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpChecksum {
    /// The field is 0: the sender computed none (allowed for UDP over IPv4).
    Absent,
    Valid,
    Invalid,
}

/// A parsed UDP datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpDatagram<'a> {
    pub src_port: u16,
    pub dst_port: u16,
    pub length: u16,
    pub checksum: u16,
    /// Checked over the pseudo-header of the enclosing IPv4 packet.
    pub checksum_status: UdpChecksum,
    pub payload: &'a [u8],
}

/// Parses the UDP datagram in `ip`. The UDP length field must fit inside the IP payload.
pub fn parse_udp<'a>(ip: &Ipv4Packet<'a>) -> Result<UdpDatagram<'a>> {
    ip.expect_l4(ip_proto::UDP, "UDP")?;
    let segment = ip.payload;
    ensure!(
        segment.len() >= UDP_HEADER_LEN,
        "UDP header truncated: {} bytes, need {UDP_HEADER_LEN}",
        segment.len()
    );
    let length = read_u16(segment, 4)?;
    ensure!(
        usize::from(length) >= UDP_HEADER_LEN,
        "UDP length {length} is shorter than the {UDP_HEADER_LEN}-byte header"
    );
    ensure!(
        usize::from(length) <= segment.len(),
        "UDP length {length} exceeds the {} bytes the IPv4 packet carries",
        segment.len()
    );
    let datagram = &segment[..usize::from(length)];
    let checksum = read_u16(segment, UDP_CHECKSUM_AT)?;
    let checksum_status = if checksum == 0 {
        UdpChecksum::Absent
    } else if l4_checksum(ip.src, ip.dst, ip_proto::UDP, datagram) == 0 {
        UdpChecksum::Valid
    } else {
        UdpChecksum::Invalid
    };
    Ok(UdpDatagram {
        src_port: read_u16(segment, 0)?,
        dst_port: read_u16(segment, 2)?,
        length,
        checksum,
        checksum_status,
        payload: &datagram[UDP_HEADER_LEN..],
    })
}

impl<'a> UdpDatagram<'a> {
    /// The VXLAN packet this datagram carries (whatever its port).
    pub fn vxlan(&self) -> Result<VxlanPacket<'a>> {
        parse_vxlan(self.payload)
    }
}

/// A parsed TCP segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSegment<'a> {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    /// Header length in bytes (data offset × 4).
    pub header_len: usize,
    pub flags: TcpFlags,
    pub window: u16,
    pub checksum: u16,
    /// Checked over the pseudo-header of the enclosing IPv4 packet.
    pub checksum_valid: bool,
    pub urgent_pointer: u16,
    pub options: &'a [u8],
    pub payload: &'a [u8],
}

pub fn parse_tcp<'a>(ip: &Ipv4Packet<'a>) -> Result<TcpSegment<'a>> {
    ip.expect_l4(ip_proto::TCP, "TCP")?;
    let segment = ip.payload;
    ensure!(
        segment.len() >= TCP_HEADER_LEN,
        "TCP header truncated: {} bytes, need at least {TCP_HEADER_LEN}",
        segment.len()
    );
    let header_len = usize::from(segment[12] >> 4) * 4;
    ensure!(
        header_len >= TCP_HEADER_LEN,
        "TCP data offset {} is below the minimum of 5 (a 20-byte header)",
        header_len / 4
    );
    ensure!(
        segment.len() >= header_len,
        "TCP header truncated: data offset says {header_len} bytes, only {} present",
        segment.len()
    );
    Ok(TcpSegment {
        src_port: read_u16(segment, 0)?,
        dst_port: read_u16(segment, 2)?,
        seq: read_u32(segment, 4)?,
        ack: read_u32(segment, 8)?,
        header_len,
        flags: TcpFlags(segment[13]),
        window: read_u16(segment, 14)?,
        checksum: read_u16(segment, TCP_CHECKSUM_AT)?,
        checksum_valid: l4_checksum(ip.src, ip.dst, ip_proto::TCP, segment) == 0,
        urgent_pointer: read_u16(segment, 18)?,
        options: &segment[TCP_HEADER_LEN..header_len],
        payload: &segment[header_len..],
    })
}

impl TcpSegment<'_> {
    /// The maximum-segment-size option, if present and well formed.
    pub fn mss(&self) -> Option<u16> {
        let mut rest = self.options;
        loop {
            match rest {
                [] | [TCP_OPTION_END, ..] => return None,
                [TCP_OPTION_NOP, tail @ ..] => rest = tail,
                [TCP_OPTION_MSS, 4, high, low, ..] => {
                    return Some(u16::from_be_bytes([*high, *low]));
                }
                [_kind, len, ..] if usize::from(*len) >= 2 => {
                    rest = rest.get(usize::from(*len)..)?
                }
                _ => return None, // malformed option list
            }
        }
    }
}

/// A parsed ICMP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IcmpMessage<'a> {
    pub icmp_type: u8,
    pub code: u8,
    pub checksum: u16,
    /// Whether the whole message sums to `0xffff` (ICMP has no pseudo-header).
    pub checksum_valid: bool,
    /// Bytes 4..8: echo id and sequence, or the next-hop MTU, or unused.
    pub rest_of_header: [u8; 4],
    /// Echo data, or the quoted original packet of an error.
    pub body: &'a [u8],
}

pub fn parse_icmp<'a>(ip: &Ipv4Packet<'a>) -> Result<IcmpMessage<'a>> {
    ip.expect_l4(ip_proto::ICMP, "ICMP")?;
    let message = ip.payload;
    ensure!(
        message.len() >= ICMP_HEADER_LEN,
        "ICMP header truncated: {} bytes, need {ICMP_HEADER_LEN}",
        message.len()
    );
    Ok(IcmpMessage {
        icmp_type: message[0],
        code: message[1],
        checksum: read_u16(message, ICMP_CHECKSUM_AT)?,
        checksum_valid: ones_complement_sum(message) == 0xffff,
        rest_of_header: read_array(message, 4)?,
        body: &message[ICMP_HEADER_LEN..],
    })
}

impl<'a> IcmpMessage<'a> {
    fn is_echo(&self) -> bool {
        self.icmp_type == icmp_type::ECHO_REQUEST || self.icmp_type == icmp_type::ECHO_REPLY
    }

    fn is_error(&self) -> bool {
        self.icmp_type == icmp_type::DEST_UNREACHABLE || self.icmp_type == icmp_type::TIME_EXCEEDED
    }

    /// The echo identifier, for echo requests and replies.
    pub fn echo_id(&self) -> Option<u16> {
        let [high, low, _, _] = self.rest_of_header;
        self.is_echo().then(|| u16::from_be_bytes([high, low]))
    }

    /// The echo sequence number, for echo requests and replies.
    pub fn echo_seq(&self) -> Option<u16> {
        let [_, _, high, low] = self.rest_of_header;
        self.is_echo().then(|| u16::from_be_bytes([high, low]))
    }

    /// The next-hop MTU of a fragmentation-needed error.
    pub fn next_hop_mtu(&self) -> Option<u16> {
        let [_, _, high, low] = self.rest_of_header;
        let frag_needed = self.icmp_type == icmp_type::DEST_UNREACHABLE
            && self.code == icmp_code::FRAGMENTATION_NEEDED;
        frag_needed.then(|| u16::from_be_bytes([high, low]))
    }

    /// The original packet an error quotes (header whole, data usually 8 bytes).
    pub fn quoted_packet(&self) -> Result<Ipv4Packet<'a>> {
        ensure!(
            self.is_error(),
            "ICMP type {} is not an error (destination unreachable or time exceeded), so it quotes no packet",
            self.icmp_type
        );
        parse_quoted_ipv4(self.body).context("ICMP error quotes a malformed IPv4 packet")
    }
}
