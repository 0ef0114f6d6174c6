//! Malformed variants of built frames: truncated, wrong IHL, wrong total length.

use anyhow::{Context, Result, ensure};

use super::bytes::write_u16;
use super::checksum::ipv4_header_checksum;
use super::{ETH_HEADER_LEN, IPV4_CHECKSUM_AT, IPV4_HEADER_LEN};

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
pub(super) fn rewrite_ipv4_header(
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
