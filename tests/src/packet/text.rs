//! MAC addresses as text, and hex dumps for failure messages.

use anyhow::{Context, Result};

use super::Mac;

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
