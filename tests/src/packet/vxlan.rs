//! VXLAN: wrapping a whole inner frame in outer Ethernet/IPv4/UDP, and reading it back.

use std::net::Ipv4Addr;

use anyhow::{Result, ensure};

use super::build::EthBuilder;
use super::bytes::read_array;
use super::{VXLAN_FLAG_VNI_VALID, VXLAN_HEADER_LEN};

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
