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

mod build;
mod bytes;
mod checksum;
mod malformed;
mod parse;
#[cfg(test)]
mod tests;
mod text;
mod vxlan;

pub use build::{
    EthBuilder, Frame, IcmpBuilder, IcmpError, Ipv4Builder, TcpBuilder, TcpFlags, UdpBuilder,
    icmp_quote,
};
pub use checksum::{internet_checksum, ipv4_header_checksum, l4_checksum, ones_complement_sum};
pub use malformed::{truncated, with_ipv4_ihl, with_ipv4_total_length};
pub use parse::{
    EthFrame, IcmpMessage, Ipv4Packet, TcpSegment, UdpChecksum, UdpDatagram, parse_eth, parse_icmp,
    parse_ipv4, parse_quoted_ipv4, parse_tcp, parse_udp,
};
pub use text::{format_mac, hexdump, parse_mac};
pub use vxlan::{VxlanPacket, parse_vxlan, vxlan_encap};

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
