//! Internet checksums (RFC 1071): the IPv4 header checksum and the L4 checksum over the pseudo-
//! header.

use std::net::Ipv4Addr;

use super::IPV4_CHECKSUM_AT;

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
