//! Big-endian field access shared by the builders and the parsers; reads fail instead of panicking.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};

pub(super) fn write_u16(buffer: &mut [u8], at: usize, value: u16) {
    if let Some(field) = buffer.get_mut(at..at + 2) {
        field.copy_from_slice(&value.to_be_bytes());
    }
}

// ---------------------------------------------------------------------------
// Parsers
// ---------------------------------------------------------------------------

/// Reads a big-endian u16 at `at`; callers check the length first, so a short slice is
/// a bug in this module, reported as an error rather than a panic.
pub(super) fn read_u16(bytes: &[u8], at: usize) -> Result<u16> {
    match bytes.get(at..at + 2) {
        Some([high, low]) => Ok(u16::from_be_bytes([*high, *low])),
        _ => bail!("need 2 bytes at offset {at}, have {} bytes", bytes.len()),
    }
}

pub(super) fn read_u32(bytes: &[u8], at: usize) -> Result<u32> {
    match bytes.get(at..at + 4) {
        Some([b0, b1, b2, b3]) => Ok(u32::from_be_bytes([*b0, *b1, *b2, *b3])),
        _ => bail!("need 4 bytes at offset {at}, have {} bytes", bytes.len()),
    }
}

pub(super) fn read_array<const N: usize>(bytes: &[u8], at: usize) -> Result<[u8; N]> {
    bytes
        .get(at..at + N)
        .and_then(|slice| slice.try_into().ok())
        .with_context(|| format!("need {N} bytes at offset {at}, have {} bytes", bytes.len()))
}

pub(super) fn read_ipv4(bytes: &[u8], at: usize) -> Result<Ipv4Addr> {
    Ok(Ipv4Addr::from(read_array::<4>(bytes, at)?))
}
