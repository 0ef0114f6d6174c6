//! Frame builders: Ethernet, IPv4, UDP, TCP and ICMP, described outside-in and finished with
//! `build()`.

use std::fmt;
use std::net::Ipv4Addr;
use std::ops::{BitOr, BitOrAssign};

use super::bytes::write_u16;
use super::checksum::{internet_checksum, ipv4_header_checksum, l4_checksum};
use super::{
    ETH_HEADER_LEN, ICMP_CHECKSUM_AT, ICMP_HEADER_LEN, ICMP_QUOTED_DATA_LEN, IPV4_CHECKSUM_AT,
    IPV4_FLAG_DONT_FRAGMENT, IPV4_HEADER_LEN, Mac, TCP_CHECKSUM_AT, TCP_HEADER_LEN, TCP_OPTION_MSS,
    UDP_CHECKSUM_AT, UDP_HEADER_LEN, VXLAN_FLAG_VNI_VALID, VXLAN_HEADER_LEN, VXLAN_VNI_MASK,
    ethertype, icmp_code, icmp_type, ip_proto,
};

// ---------------------------------------------------------------------------
// Builders
// ---------------------------------------------------------------------------

/// Where a frame description starts: [`Frame::eth`] for an Ethernet frame (what TC and
/// XDP programs see), [`Frame::ipv4`] for a bare IPv4 packet (e.g. the original packet
/// an ICMP error quotes).
pub struct Frame;

impl Frame {
    /// An Ethernet frame from `src` to `dst`, EtherType IPv4 unless changed.
    pub fn eth(src: Mac, dst: Mac) -> EthBuilder {
        EthBuilder {
            src,
            dst,
            ethertype: ethertype::IPV4,
            payload: Vec::new(),
        }
    }

    /// An IPv4 packet with no link-layer header.
    pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr) -> Ipv4Builder {
        Ipv4Builder::new(None, src, dst)
    }
}

/// An Ethernet header, and optionally a raw payload (for non-IP EtherTypes).
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a frame description does nothing until `.build()`"]
pub struct EthBuilder {
    src: Mac,
    dst: Mac,
    ethertype: u16,
    payload: Vec<u8>,
}

impl EthBuilder {
    /// Sets the EtherType. Set before `.ipv4(..)` to write a wrong one on an IPv4 frame.
    pub fn ethertype(mut self, ethertype: u16) -> Self {
        self.ethertype = ethertype;
        self
    }

    /// Raw bytes after the Ethernet header (ARP, garbage, ...).
    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// An ARP message over Ethernet/IPv4 (`op` 1 request, 2 reply) from
    /// `sender` (hardware, protocol address) about `target`; the EtherType
    /// becomes ARP. A gratuitous ARP names one address as sender and target.
    pub fn arp(mut self, op: u16, sender: (Mac, Ipv4Addr), target: (Mac, Ipv4Addr)) -> Self {
        let mut body = Vec::with_capacity(28);
        body.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
        body.extend_from_slice(&ethertype::IPV4.to_be_bytes());
        body.extend_from_slice(&[6, 4]);
        body.extend_from_slice(&op.to_be_bytes());
        body.extend_from_slice(&sender.0);
        body.extend_from_slice(&sender.1.octets());
        body.extend_from_slice(&target.0);
        body.extend_from_slice(&target.1.octets());
        self.ethertype = ethertype::ARP;
        self.payload = body;
        self
    }

    /// Continues with an IPv4 header from `src` to `dst`.
    pub fn ipv4(self, src: Ipv4Addr, dst: Ipv4Addr) -> Ipv4Builder {
        Ipv4Builder::new(Some(self), src, dst)
    }

    pub fn build(self) -> Vec<u8> {
        self.wrap(&self.payload)
    }

    /// This Ethernet header followed by `l3`.
    fn wrap(&self, l3: &[u8]) -> Vec<u8> {
        let mut frame = Vec::with_capacity(ETH_HEADER_LEN + l3.len());
        frame.extend_from_slice(&self.dst);
        frame.extend_from_slice(&self.src);
        frame.extend_from_slice(&self.ethertype.to_be_bytes());
        frame.extend_from_slice(l3);
        frame
    }
}

/// An IPv4 header (no options). Defaults: TTL 64, ID 0, TOS 0, DF clear, protocol 0.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a frame description does nothing until `.build()`"]
pub struct Ipv4Builder {
    eth: Option<EthBuilder>,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    tos: u8,
    id: u16,
    ttl: u8,
    dont_fragment: bool,
    protocol: u8,
    header_checksum: Option<u16>,
    payload: Vec<u8>,
}

impl Ipv4Builder {
    fn new(eth: Option<EthBuilder>, src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        Self {
            eth,
            src,
            dst,
            tos: 0,
            id: 0,
            ttl: 64,
            dont_fragment: false,
            protocol: 0,
            header_checksum: None,
            payload: Vec::new(),
        }
    }

    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    pub fn id(mut self, id: u16) -> Self {
        self.id = id;
        self
    }

    /// Type of service / DSCP+ECN byte.
    pub fn tos(mut self, tos: u8) -> Self {
        self.tos = tos;
        self
    }

    pub fn dont_fragment(mut self, dont_fragment: bool) -> Self {
        self.dont_fragment = dont_fragment;
        self
    }

    /// Protocol number for a raw payload set with [`Ipv4Builder::payload`]; the L4
    /// builders (`udp`, `tcp`, `icmp_*`) set their own.
    pub fn protocol(mut self, protocol: u8) -> Self {
        self.protocol = protocol;
        self
    }

    /// Writes `checksum` instead of the computed header checksum (negative tests).
    pub fn header_checksum(mut self, checksum: u16) -> Self {
        self.header_checksum = Some(checksum);
        self
    }

    /// Raw bytes after the IPv4 header, sent as [`Ipv4Builder::protocol`].
    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    pub fn udp(self, src_port: u16, dst_port: u16) -> UdpBuilder {
        UdpBuilder {
            ip: self,
            src_port,
            dst_port,
            payload: Vec::new(),
            checksum: ChecksumChoice::Computed,
        }
    }

    pub fn tcp(self, src_port: u16, dst_port: u16) -> TcpBuilder {
        TcpBuilder {
            ip: self,
            src_port,
            dst_port,
            seq: 0,
            ack: 0,
            flags: TcpFlags::NONE,
            window: 65535,
            mss: None,
            payload: Vec::new(),
            checksum: ChecksumChoice::Computed,
        }
    }

    pub fn icmp_echo_request(self, id: u16, seq: u16) -> IcmpBuilder {
        self.icmp_echo(icmp_type::ECHO_REQUEST, id, seq)
    }

    pub fn icmp_echo_reply(self, id: u16, seq: u16) -> IcmpBuilder {
        self.icmp_echo(icmp_type::ECHO_REPLY, id, seq)
    }

    /// An ICMP error about `original`, an IPv4 packet without its Ethernet header (e.g.
    /// `&frame[ETH_HEADER_LEN..]`). Quotes the original header plus 8 bytes of its data,
    /// as RFC 792 asks; replace the quote with `.payload(..)` to quote more.
    pub fn icmp_error(self, error: IcmpError, original: &[u8]) -> IcmpBuilder {
        let (icmp_type, code, rest_of_header) = error.type_code_and_rest();
        IcmpBuilder {
            ip: self,
            icmp_type,
            code,
            rest_of_header,
            payload: icmp_quote(original).to_vec(),
            checksum: ChecksumChoice::Computed,
        }
    }

    fn icmp_echo(self, icmp_type: u8, id: u16, seq: u16) -> IcmpBuilder {
        let [id_high, id_low] = id.to_be_bytes();
        let [seq_high, seq_low] = seq.to_be_bytes();
        IcmpBuilder {
            ip: self,
            icmp_type,
            code: 0,
            rest_of_header: [id_high, id_low, seq_high, seq_low],
            payload: Vec::new(),
            checksum: ChecksumChoice::Computed,
        }
    }

    pub fn build(mut self) -> Vec<u8> {
        let payload = std::mem::take(&mut self.payload);
        let protocol = self.protocol;
        self.wrap(protocol, &payload)
    }

    /// The IPv4 header for `l4`, followed by `l4`, inside the Ethernet header if any.
    /// A payload too long for IPv4 gets total length 65535 rather than a wrapped value.
    fn wrap(&self, protocol: u8, l4: &[u8]) -> Vec<u8> {
        let total_length = u16::try_from(IPV4_HEADER_LEN + l4.len()).unwrap_or(u16::MAX);
        let flags = if self.dont_fragment {
            IPV4_FLAG_DONT_FRAGMENT
        } else {
            0
        };
        let mut packet = Vec::with_capacity(IPV4_HEADER_LEN + l4.len());
        packet.push(0x45); // version 4, IHL 5 (no options)
        packet.push(self.tos);
        packet.extend_from_slice(&total_length.to_be_bytes());
        packet.extend_from_slice(&self.id.to_be_bytes());
        packet.extend_from_slice(&flags.to_be_bytes());
        packet.push(self.ttl);
        packet.push(protocol);
        packet.extend_from_slice(&[0, 0]); // checksum, filled in below
        packet.extend_from_slice(&self.src.octets());
        packet.extend_from_slice(&self.dst.octets());
        let checksum = self
            .header_checksum
            .unwrap_or_else(|| ipv4_header_checksum(&packet));
        write_u16(&mut packet, IPV4_CHECKSUM_AT, checksum);
        packet.extend_from_slice(l4);
        match &self.eth {
            Some(eth) => eth.wrap(&packet),
            None => packet,
        }
    }
}

/// Whether an L4 builder computes its checksum or writes a fixed value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChecksumChoice {
    Computed,
    Fixed(u16),
}

/// A UDP header and payload. The checksum is computed over the pseudo-header unless
/// `.zero_checksum()` or `.checksum(..)` says otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a frame description does nothing until `.build()`"]
pub struct UdpBuilder {
    ip: Ipv4Builder,
    src_port: u16,
    dst_port: u16,
    payload: Vec<u8>,
    checksum: ChecksumChoice,
}

impl UdpBuilder {
    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// Sends no checksum (0), as Linux VXLAN devices do by default.
    pub fn zero_checksum(self) -> Self {
        self.checksum(0)
    }

    /// Writes `checksum` instead of the computed one (negative tests).
    pub fn checksum(mut self, checksum: u16) -> Self {
        self.checksum = ChecksumChoice::Fixed(checksum);
        self
    }

    /// Makes the payload a VXLAN header (I flag, `vni`) followed by `inner_frame`.
    /// Only the low 24 bits of `vni` fit the field.
    pub fn vxlan(mut self, vni: u32, inner_frame: &[u8]) -> Self {
        let vni_bytes = (vni & VXLAN_VNI_MASK).to_be_bytes();
        let mut payload = Vec::with_capacity(VXLAN_HEADER_LEN + inner_frame.len());
        payload.extend_from_slice(&[VXLAN_FLAG_VNI_VALID, 0, 0, 0]);
        payload.extend_from_slice(&vni_bytes[1..]);
        payload.push(0);
        payload.extend_from_slice(inner_frame);
        self.payload = payload;
        self
    }

    pub fn build(self) -> Vec<u8> {
        let length = u16::try_from(UDP_HEADER_LEN + self.payload.len()).unwrap_or(u16::MAX);
        let mut segment = Vec::with_capacity(UDP_HEADER_LEN + self.payload.len());
        segment.extend_from_slice(&self.src_port.to_be_bytes());
        segment.extend_from_slice(&self.dst_port.to_be_bytes());
        segment.extend_from_slice(&length.to_be_bytes());
        segment.extend_from_slice(&[0, 0]);
        segment.extend_from_slice(&self.payload);
        let checksum = match self.checksum {
            ChecksumChoice::Fixed(value) => value,
            ChecksumChoice::Computed => {
                match l4_checksum(self.ip.src, self.ip.dst, ip_proto::UDP, &segment) {
                    0 => 0xffff,
                    computed => computed,
                }
            }
        };
        write_u16(&mut segment, UDP_CHECKSUM_AT, checksum);
        self.ip.wrap(ip_proto::UDP, &segment)
    }
}

/// TCP header flags, combinable with `|`: `TcpFlags::SYN | TcpFlags::ACK`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    pub const NONE: Self = Self(0);
    pub const FIN: Self = Self(0x01);
    pub const SYN: Self = Self(0x02);
    pub const RST: Self = Self(0x04);
    pub const PSH: Self = Self(0x08);
    pub const ACK: Self = Self(0x10);
    pub const URG: Self = Self(0x20);
    pub const ECE: Self = Self(0x40);
    pub const CWR: Self = Self(0x80);

    const NAMES: [(Self, &'static str); 8] = [
        (Self::FIN, "FIN"),
        (Self::SYN, "SYN"),
        (Self::RST, "RST"),
        (Self::PSH, "PSH"),
        (Self::ACK, "ACK"),
        (Self::URG, "URG"),
        (Self::ECE, "ECE"),
        (Self::CWR, "CWR"),
    ];

    /// Whether every flag in `flags` is set.
    pub fn contains(self, flags: Self) -> bool {
        self.0 & flags.0 == flags.0
    }
}

impl BitOr for TcpFlags {
    type Output = Self;
    fn bitor(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}

impl BitOrAssign for TcpFlags {
    fn bitor_assign(&mut self, other: Self) {
        self.0 |= other.0;
    }
}

/// Prints `SYN|ACK`, so assertion failures read like tcpdump.
impl fmt::Debug for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = Self::NAMES
            .iter()
            .filter(|(flag, _)| self.contains(*flag))
            .map(|(_, name)| *name)
            .collect();
        if names.is_empty() {
            f.write_str("NONE")
        } else {
            f.write_str(&names.join("|"))
        }
    }
}

/// A TCP header and payload. Defaults: seq 0, ack 0, no flags, window 65535, no options.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a frame description does nothing until `.build()`"]
pub struct TcpBuilder {
    ip: Ipv4Builder,
    src_port: u16,
    dst_port: u16,
    seq: u32,
    ack: u32,
    flags: TcpFlags,
    window: u16,
    mss: Option<u16>,
    payload: Vec<u8>,
    checksum: ChecksumChoice,
}

impl TcpBuilder {
    pub fn seq(mut self, seq: u32) -> Self {
        self.seq = seq;
        self
    }

    pub fn ack(mut self, ack: u32) -> Self {
        self.ack = ack;
        self
    }

    pub fn flags(mut self, flags: TcpFlags) -> Self {
        self.flags = flags;
        self
    }

    pub fn window(mut self, window: u16) -> Self {
        self.window = window;
        self
    }

    /// Adds a maximum-segment-size option (as SYNs carry; MSS clamping tests).
    pub fn mss(mut self, mss: u16) -> Self {
        self.mss = Some(mss);
        self
    }

    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// Writes `checksum` instead of the computed one (negative tests).
    pub fn checksum(mut self, checksum: u16) -> Self {
        self.checksum = ChecksumChoice::Fixed(checksum);
        self
    }

    pub fn build(self) -> Vec<u8> {
        let mut options = Vec::new();
        if let Some(mss) = self.mss {
            options.push(TCP_OPTION_MSS);
            options.push(4);
            options.extend_from_slice(&mss.to_be_bytes());
        }
        let header_len = TCP_HEADER_LEN + options.len();
        let data_offset_words = (header_len / 4) as u8;

        let mut segment = Vec::with_capacity(header_len + self.payload.len());
        segment.extend_from_slice(&self.src_port.to_be_bytes());
        segment.extend_from_slice(&self.dst_port.to_be_bytes());
        segment.extend_from_slice(&self.seq.to_be_bytes());
        segment.extend_from_slice(&self.ack.to_be_bytes());
        segment.push(data_offset_words << 4);
        segment.push(self.flags.0);
        segment.extend_from_slice(&self.window.to_be_bytes());
        segment.extend_from_slice(&[0, 0]); // checksum, filled in below
        segment.extend_from_slice(&[0, 0]); // urgent pointer
        segment.extend_from_slice(&options);
        segment.extend_from_slice(&self.payload);
        let checksum = match self.checksum {
            ChecksumChoice::Fixed(value) => value,
            ChecksumChoice::Computed => {
                l4_checksum(self.ip.src, self.ip.dst, ip_proto::TCP, &segment)
            }
        };
        write_u16(&mut segment, TCP_CHECKSUM_AT, checksum);
        self.ip.wrap(ip_proto::TCP, &segment)
    }
}

/// The ICMP errors tests send and expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IcmpError {
    NetUnreachable,
    HostUnreachable,
    PortUnreachable,
    /// Destination unreachable, fragmentation needed and DF set (RFC 1191).
    FragmentationNeeded {
        next_hop_mtu: u16,
    },
    /// Time exceeded: TTL reached zero in transit.
    TtlExceeded,
    /// Any other type and code, with an unused (zero) rest of header.
    Other {
        icmp_type: u8,
        code: u8,
    },
}

impl IcmpError {
    fn type_code_and_rest(self) -> (u8, u8, [u8; 4]) {
        use icmp_code::*;
        use icmp_type::*;
        match self {
            Self::NetUnreachable => (DEST_UNREACHABLE, NET_UNREACHABLE, [0; 4]),
            Self::HostUnreachable => (DEST_UNREACHABLE, HOST_UNREACHABLE, [0; 4]),
            Self::PortUnreachable => (DEST_UNREACHABLE, PORT_UNREACHABLE, [0; 4]),
            Self::FragmentationNeeded { next_hop_mtu } => {
                let [high, low] = next_hop_mtu.to_be_bytes();
                (DEST_UNREACHABLE, FRAGMENTATION_NEEDED, [0, 0, high, low])
            }
            Self::TtlExceeded => (TIME_EXCEEDED, TTL_EXCEEDED_IN_TRANSIT, [0; 4]),
            Self::Other { icmp_type, code } => (icmp_type, code, [0; 4]),
        }
    }
}

/// What an ICMP error quotes of `original` (an IPv4 packet): its header, as long as its
/// IHL says, plus 8 bytes of data — or less if `original` is shorter.
pub fn icmp_quote(original: &[u8]) -> &[u8] {
    let header_len = original
        .first()
        .map_or(IPV4_HEADER_LEN, |first| usize::from(first & 0x0f) * 4);
    let quote_len = header_len.max(IPV4_HEADER_LEN) + ICMP_QUOTED_DATA_LEN;
    original.get(..quote_len).unwrap_or(original)
}

/// An ICMP message: echo request/reply or an error.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a frame description does nothing until `.build()`"]
pub struct IcmpBuilder {
    ip: Ipv4Builder,
    icmp_type: u8,
    code: u8,
    rest_of_header: [u8; 4],
    payload: Vec<u8>,
    checksum: ChecksumChoice,
}

impl IcmpBuilder {
    /// Echo data, or what an error quotes (replacing the default quote).
    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// Writes `checksum` instead of the computed one (negative tests).
    pub fn checksum(mut self, checksum: u16) -> Self {
        self.checksum = ChecksumChoice::Fixed(checksum);
        self
    }

    pub fn build(self) -> Vec<u8> {
        let mut message = Vec::with_capacity(ICMP_HEADER_LEN + self.payload.len());
        message.push(self.icmp_type);
        message.push(self.code);
        message.extend_from_slice(&[0, 0]); // checksum, filled in below
        message.extend_from_slice(&self.rest_of_header);
        message.extend_from_slice(&self.payload);
        let checksum = match self.checksum {
            ChecksumChoice::Fixed(value) => value,
            ChecksumChoice::Computed => internet_checksum(&message),
        };
        write_u16(&mut message, ICMP_CHECKSUM_AT, checksum);
        self.ip.wrap(ip_proto::ICMP, &message)
    }
}
