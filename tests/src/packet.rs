//! Builders and parsers for the frames datapath tests feed to `BPF_PROG_TEST_RUN`.
//!
//! Frames are described outside-in and finished with `build()`:
//!
//! ```
//! use std::net::Ipv4Addr;
//! use fabedge_tests::packet::{Frame, parse_eth};
//!
//! let frame = Frame::eth([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
//!     .ipv4(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2))
//!     .ttl(64)
//!     .udp(1234, 53)
//!     .payload(b"q")
//!     .build();
//!
//! let udp = parse_eth(&frame)?.ipv4()?.udp()?;
//! assert_eq!(udp.payload, b"q");
//! # anyhow::Ok(())
//! ```
//!
//! Every length and checksum is computed by the builder unless a test overrides it
//! on purpose (`.checksum(..)`, `.zero_checksum()`, [`with_ipv4_ihl`], ...).
//! Parsers never panic: short or inconsistent input is an `Err` that says what is wrong.
//! This module is a test oracle, so it shares no code with the datapath under test.

use std::fmt;
use std::net::Ipv4Addr;
use std::ops::{BitOr, BitOrAssign};

use anyhow::{Context, Result, bail, ensure};

/// An Ethernet (MAC) address.
pub type Mac = [u8; 6];

pub const ETH_HEADER_LEN: usize = 14;
/// An IPv4 header without options.
pub const IPV4_HEADER_LEN: usize = 20;
pub const UDP_HEADER_LEN: usize = 8;
/// A TCP header without options.
pub const TCP_HEADER_LEN: usize = 20;
/// Type, code, checksum and the 4-byte rest of header.
pub const ICMP_HEADER_LEN: usize = 8;
pub const VXLAN_HEADER_LEN: usize = 8;
/// The IANA VXLAN port (Linux VXLAN devices default to 8472 unless told `dstport 4789`).
pub const VXLAN_UDP_PORT: u16 = 4789;

/// EtherTypes used in tests.
pub mod ethertype {
    pub const IPV4: u16 = 0x0800;
    pub const ARP: u16 = 0x0806;
    pub const VLAN: u16 = 0x8100;
    pub const IPV6: u16 = 0x86dd;
}

/// IP protocol numbers used in tests.
pub mod ip_proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

/// ICMP message types used in tests.
pub mod icmp_type {
    pub const ECHO_REPLY: u8 = 0;
    pub const DEST_UNREACHABLE: u8 = 3;
    pub const ECHO_REQUEST: u8 = 8;
    pub const TIME_EXCEEDED: u8 = 11;
}

/// ICMP codes used in tests (destination-unreachable codes unless noted).
pub mod icmp_code {
    pub const NET_UNREACHABLE: u8 = 0;
    pub const HOST_UNREACHABLE: u8 = 1;
    pub const PROTOCOL_UNREACHABLE: u8 = 2;
    pub const PORT_UNREACHABLE: u8 = 3;
    pub const FRAGMENTATION_NEEDED: u8 = 4;
    /// Code of a time-exceeded message sent by a router that hit TTL 0.
    pub const TTL_EXCEEDED_IN_TRANSIT: u8 = 0;
}

const IPV4_FLAG_DONT_FRAGMENT: u16 = 0x4000;
const IPV4_FLAG_MORE_FRAGMENTS: u16 = 0x2000;
const IPV4_FRAGMENT_OFFSET_MASK: u16 = 0x1fff;
/// Byte offset of the header checksum inside an IPv4 header.
const IPV4_CHECKSUM_AT: usize = 10;
const UDP_CHECKSUM_AT: usize = 6;
const TCP_CHECKSUM_AT: usize = 16;
const ICMP_CHECKSUM_AT: usize = 2;
/// The VXLAN "I" flag: the VNI field is valid (RFC 7348).
pub const VXLAN_FLAG_VNI_VALID: u8 = 0x08;
const VXLAN_VNI_MASK: u32 = 0x00ff_ffff;
const TCP_OPTION_END: u8 = 0;
const TCP_OPTION_NOP: u8 = 1;
const TCP_OPTION_MSS: u8 = 2;
/// RFC 792: an ICMP error quotes the original IP header plus the first 64 bits of its data.
const ICMP_QUOTED_DATA_LEN: usize = 8;

// ---------------------------------------------------------------------------
// Checksums (RFC 1071)
// ---------------------------------------------------------------------------

/// Big-endian 16-bit words of `data` added up without folding; an odd trailing byte
/// counts as the high byte of a word whose low byte is zero.
fn sum_words(data: &[u8]) -> u64 {
    let mut words = data.chunks_exact(2);
    let mut sum: u64 = words
        .by_ref()
        .map(|word| u64::from(u16::from_be_bytes([word[0], word[1]])))
        .sum();
    if let [last] = words.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// Folds carries back into the low 16 bits (end-around carry).
fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The 16-bit one's complement sum of `data` (RFC 1071), before the final complement.
/// Data that carries a correct checksum sums to `0xffff`.
pub fn ones_complement_sum(data: &[u8]) -> u16 {
    fold(sum_words(data))
}

/// The Internet checksum of `data`: the complement of its one's complement sum.
pub fn internet_checksum(data: &[u8]) -> u16 {
    !ones_complement_sum(data)
}

/// The checksum an IPv4 header should carry. The checksum field itself (bytes 10–11)
/// is skipped, so a header whose field is already filled in gives the same answer.
pub fn ipv4_header_checksum(header: &[u8]) -> u16 {
    let before_field = header.get(..IPV4_CHECKSUM_AT).unwrap_or(header);
    let after_field = header.get(IPV4_CHECKSUM_AT + 2..).unwrap_or(&[]);
    !fold(sum_words(before_field) + sum_words(after_field))
}

/// The TCP/UDP checksum over the IPv4 pseudo-header and `segment`, summed exactly as
/// given. Zero the segment's checksum field to get the value to write; leave the
/// written value in place to verify (a correct segment gives 0). UDP transmits a
/// computed 0 as `0xffff`, because 0 on the wire means "no checksum".
pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, segment: &[u8]) -> u16 {
    let pseudo_header = sum_words(&src.octets())
        + sum_words(&dst.octets())
        + u64::from(protocol)
        + segment.len() as u64;
    !fold(pseudo_header + sum_words(segment))
}

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

/// `inner_frame` VXLAN-encapsulated the way a Linux VXLAN device sends it: outer
/// Ethernet from `outer_eth`, IPv4 (TTL 64, ID 0, DF clear), UDP without checksum,
/// VXLAN header with the I flag and `vni`. For a computed outer UDP checksum, write
/// `outer_eth.ipv4(..).udp(..).vxlan(..)` instead.
pub fn vxlan_encap(
    outer_eth: EthBuilder,
    outer_src_ip: Ipv4Addr,
    outer_dst_ip: Ipv4Addr,
    src_port: u16,
    dst_port: u16,
    vni: u32,
    inner_frame: &[u8],
) -> Vec<u8> {
    outer_eth
        .ipv4(outer_src_ip, outer_dst_ip)
        .udp(src_port, dst_port)
        .zero_checksum()
        .vxlan(vni, inner_frame)
        .build()
}

fn write_u16(buffer: &mut [u8], at: usize, value: u16) {
    if let Some(field) = buffer.get_mut(at..at + 2) {
        field.copy_from_slice(&value.to_be_bytes());
    }
}

// ---------------------------------------------------------------------------
// Parsers
// ---------------------------------------------------------------------------

/// Reads a big-endian u16 at `at`; callers check the length first, so a short slice is
/// a bug in this module, reported as an error rather than a panic.
fn read_u16(bytes: &[u8], at: usize) -> Result<u16> {
    match bytes.get(at..at + 2) {
        Some([high, low]) => Ok(u16::from_be_bytes([*high, *low])),
        _ => bail!("need 2 bytes at offset {at}, have {} bytes", bytes.len()),
    }
}

fn read_u32(bytes: &[u8], at: usize) -> Result<u32> {
    match bytes.get(at..at + 4) {
        Some([b0, b1, b2, b3]) => Ok(u32::from_be_bytes([*b0, *b1, *b2, *b3])),
        _ => bail!("need 4 bytes at offset {at}, have {} bytes", bytes.len()),
    }
}

fn read_array<const N: usize>(bytes: &[u8], at: usize) -> Result<[u8; N]> {
    bytes
        .get(at..at + N)
        .and_then(|slice| slice.try_into().ok())
        .with_context(|| format!("need {N} bytes at offset {at}, have {} bytes", bytes.len()))
}

fn read_ipv4(bytes: &[u8], at: usize) -> Result<Ipv4Addr> {
    Ok(Ipv4Addr::from(read_array::<4>(bytes, at)?))
}

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

/// A parsed VXLAN header and the frame it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanPacket<'a> {
    /// [`VXLAN_FLAG_VNI_VALID`] is the only flag RFC 7348 defines.
    pub flags: u8,
    pub vni: u32,
    pub inner: &'a [u8],
}

/// Parses a VXLAN header (the payload of its UDP datagram).
pub fn parse_vxlan(udp_payload: &[u8]) -> Result<VxlanPacket<'_>> {
    ensure!(
        udp_payload.len() >= VXLAN_HEADER_LEN,
        "VXLAN header truncated: {} bytes, need {VXLAN_HEADER_LEN}",
        udp_payload.len()
    );
    // Bytes 4..7 hold the VNI, byte 7 is reserved.
    let [vni_high, vni_mid, vni_low, _reserved] = read_array::<4>(udp_payload, 4)?;
    Ok(VxlanPacket {
        flags: udp_payload[0],
        vni: u32::from_be_bytes([0, vni_high, vni_mid, vni_low]),
        inner: &udp_payload[VXLAN_HEADER_LEN..],
    })
}

impl VxlanPacket<'_> {
    pub fn vni_valid(&self) -> bool {
        self.flags & VXLAN_FLAG_VNI_VALID != 0
    }
}

// ---------------------------------------------------------------------------
// Malformed frames for negative tests (Ethernet frames carrying IPv4)
// ---------------------------------------------------------------------------

/// The first `len` bytes of `frame` (all of it if shorter).
pub fn truncated(frame: &[u8], len: usize) -> Vec<u8> {
    frame.get(..len).unwrap_or(frame).to_vec()
}

/// `frame` with the IPv4 IHL set to `ihl` (0–15). The header checksum is recomputed over
/// the 20 bytes actually written, so the IHL is the only thing wrong.
pub fn with_ipv4_ihl(frame: &[u8], ihl: u8) -> Result<Vec<u8>> {
    ensure!(ihl <= 0x0f, "IHL {ihl} does not fit in 4 bits; use 0..=15");
    rewrite_ipv4_header(frame, |header| header[0] = (header[0] & 0xf0) | ihl)
}

/// `frame` with the IPv4 total length set to `total_length`, checksum recomputed.
pub fn with_ipv4_total_length(frame: &[u8], total_length: u16) -> Result<Vec<u8>> {
    rewrite_ipv4_header(frame, |header| {
        header[2..4].copy_from_slice(&total_length.to_be_bytes())
    })
}

/// Copies `frame`, edits the fixed 20-byte IPv4 header after the Ethernet header and
/// recomputes its checksum.
fn rewrite_ipv4_header(
    frame: &[u8],
    edit: impl FnOnce(&mut [u8; IPV4_HEADER_LEN]),
) -> Result<Vec<u8>> {
    let mut copy = frame.to_vec();
    let header: &mut [u8; IPV4_HEADER_LEN] = copy
        .get_mut(ETH_HEADER_LEN..ETH_HEADER_LEN + IPV4_HEADER_LEN)
        .and_then(|slice| slice.try_into().ok())
        .with_context(|| {
            format!(
                "frame of {} bytes has no room for an Ethernet and IPv4 header ({} bytes); build a whole frame first",
                frame.len(),
                ETH_HEADER_LEN + IPV4_HEADER_LEN
            )
        })?;
    edit(header);
    let checksum = ipv4_header_checksum(header);
    write_u16(header, IPV4_CHECKSUM_AT, checksum);
    Ok(copy)
}

// ---------------------------------------------------------------------------
// Formatting, for assertion messages
// ---------------------------------------------------------------------------

/// `02:00:00:00:00:01`, as the agent writes MACs.
pub fn format_mac(mac: &Mac) -> String {
    fabedge_agent::model::format_mac(*mac)
}

/// Parses `02:00:00:00:00:01` (as `ip link` prints it), with the agent's parser.
pub fn parse_mac(text: &str) -> Result<Mac> {
    fabedge_agent::model::parse_mac(text).with_context(|| {
        format!("{text:?} is not a MAC address (six two-digit hex bytes separated by colons)")
    })
}

/// Bytes as offset-prefixed rows of 16 hex bytes, e.g. for `assert_eq!` messages.
pub fn hexdump(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .enumerate()
        .map(|(row, chunk)| {
            let hex: Vec<String> = chunk.iter().map(|byte| format!("{byte:02x}")).collect();
            format!("{:04x}  {}\n", row * 16, hex.join(" "))
        })
        .collect()
}

#[cfg(test)]
mod tests {
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
        let filler =
            l4_checksum(POD_A, POD_B, ip_proto::UDP, &base[IPV4_HEADER_LEN..]).to_be_bytes();
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
}
