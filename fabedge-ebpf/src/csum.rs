//! Internet checksum arithmetic for headers we build or rewrite.

use crate::parse::{IPV4_HLEN, Ipv4Hdr};

const _: () = assert!(core::mem::size_of::<Ipv4Hdr>() == IPV4_HLEN);

/// One's-complement checksum of a 20-byte IPv4 header (checksum field zero).
#[inline(always)]
pub fn ipv4_header(header: &[u8; 20]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 20 {
        sum += u16::from_be_bytes([header[i], header[i + 1]]) as u32;
        i += 2;
    }
    fold(sum)
}

/// Whether an option-free IPv4 header's checksum is right: with its
/// checksum field, the header sums to all ones.
#[inline(always)]
pub fn ipv4_header_valid(ip: &Ipv4Hdr) -> bool {
    // SAFETY: `Ipv4Hdr` is 20 bytes of byte fields (`repr(C)`, alignment 1).
    let bytes = unsafe { &*(ip as *const Ipv4Hdr as *const [u8; IPV4_HLEN]) };
    ipv4_header(bytes) == 0
}

#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
